//! Records read straight off the broker with the Kafka protocol (Fetch v4
//! over a plain TCP connection), without librdkafka.
//!
//! librdkafka's header accessor returns a header name as a NUL-terminated C
//! string (no length), and rdkafka's Rust wrapper then panics on a name that
//! is not UTF-8; so neither can check byte for byte what a producer wrote.
//! This reader decodes the record batches the broker stores (magic 2,
//! uncompressed, which is what oncely's producers send) and returns keys,
//! values and headers as bytes, null and empty told apart.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};

/// A record as the broker stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Timestamp (ms).
    pub timestamp_ms: i64,
    /// Key; `None`: null.
    pub key: Option<Vec<u8>>,
    /// Value; `None`: null.
    pub value: Option<Vec<u8>>,
    /// Headers in order: name bytes, value (`None`: null).
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Every record of `topic`'s partition `partition` up to its high watermark.
pub fn fetch_all(bootstrap: &str, topic: &str, partition: i32) -> Result<Vec<WireRecord>> {
    let (leader, high) = leader_and_end(bootstrap, topic, partition)?;
    let mut conn = TcpStream::connect(&leader).with_context(|| format!("connecting to the leader {leader}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = Vec::new();
    let mut next = 0i64;
    let mut correlation = 0i32;
    while next < high {
        correlation += 1;
        let records = fetch(&mut conn, correlation, topic, partition, next)?;
        let before = out.len();
        decode_batches(&records, partition, next, &mut out)?;
        ensure!(out.len() > before, "the fetch at offset {next} of {topic}/{partition} returned no record");
        next = out.last().map_or(next, |r: &WireRecord| r.offset + 1);
    }
    out.retain(|r| r.offset < high);
    Ok(out)
}

fn leader_and_end(bootstrap: &str, topic: &str, partition: i32) -> Result<(String, i64)> {
    let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(bootstrap).client_config()?.create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let t = md.topics().iter().find(|t| t.name() == topic).context("topic not in metadata")?;
    let p = t.partitions().iter().find(|p| p.id() == partition).context("partition not in metadata")?;
    let b = md.brokers().iter().find(|b| b.id() == p.leader()).context("leader not in metadata")?;
    let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    Ok((format!("{}:{}", b.host(), b.port()), high))
}

/// Sends one Fetch v4 request and returns the partition's record bytes.
fn fetch(conn: &mut TcpStream, correlation: i32, topic: &str, partition: i32, offset: i64) -> Result<Vec<u8>> {
    let mut req = Vec::new();
    req.extend(1i16.to_be_bytes()); // api key: Fetch
    req.extend(4i16.to_be_bytes()); // version 4: the oldest Kafka 4 accepts, record batches v2
    req.extend(correlation.to_be_bytes());
    put_str(&mut req, "oncely-testkit-wire");
    req.extend((-1i32).to_be_bytes()); // replica id: a consumer
    req.extend(500i32.to_be_bytes()); // max wait ms
    req.extend(1i32.to_be_bytes()); // min bytes
    req.extend((64i32 << 20).to_be_bytes()); // max bytes
    req.push(0); // isolation: read uncommitted
    req.extend(1i32.to_be_bytes()); // one topic
    put_str(&mut req, topic);
    req.extend(1i32.to_be_bytes()); // one partition
    req.extend(partition.to_be_bytes());
    req.extend(offset.to_be_bytes());
    req.extend((32i32 << 20).to_be_bytes()); // partition max bytes
    let len = i32::try_from(req.len())?;
    conn.write_all(&len.to_be_bytes())?;
    conn.write_all(&req)?;

    let mut size = [0u8; 4];
    conn.read_exact(&mut size)?;
    let mut resp = vec![0u8; usize::try_from(i32::from_be_bytes(size))?];
    conn.read_exact(&mut resp)?;
    let mut r = Reader::new(&resp);
    ensure!(r.i32()? == correlation, "a response to another request");
    let _throttle = r.i32()?;
    ensure!(r.i32()? == 1, "one topic in the response");
    ensure!(r.str()? == topic.as_bytes(), "another topic in the response");
    ensure!(r.i32()? == 1, "one partition in the response");
    ensure!(r.i32()? == partition, "another partition in the response");
    let error = r.i16()?;
    ensure!(error == 0, "fetch error code {error}");
    let _high = r.i64()?;
    let _last_stable = r.i64()?;
    let aborted = r.i32()?;
    for _ in 0..aborted.max(0) {
        r.i64()?;
        r.i64()?;
    }
    let n = r.i32()?;
    Ok(if n < 0 { Vec::new() } else { r.bytes(usize::try_from(n)?)?.to_vec() })
}

fn decode_batches(mut data: &[u8], partition: i32, from: i64, out: &mut Vec<WireRecord>) -> Result<()> {
    // The last batch may be cut short by the size limits: stop there.
    while data.len() >= 12 {
        let base_offset = i64::from_be_bytes(data[0..8].try_into()?);
        let batch_len = usize::try_from(i32::from_be_bytes(data[8..12].try_into()?))?;
        if data.len() < 12 + batch_len {
            break;
        }
        let mut b = Reader::new(&data[12..12 + batch_len]);
        data = &data[12 + batch_len..];
        let _leader_epoch = b.i32()?;
        let magic = b.i8()?;
        ensure!(magic == 2, "record batch magic {magic}: only v2 is read");
        let _crc = b.i32()?;
        let attributes = b.i16()?;
        ensure!(attributes & 0x07 == 0, "a compressed batch (attributes {attributes:#x}): not read");
        let _last_delta = b.i32()?;
        let base_ts = b.i64()?;
        let _max_ts = b.i64()?;
        let _producer_id = b.i64()?;
        let _producer_epoch = b.i16()?;
        let _base_seq = b.i32()?;
        let count = b.i32()?;
        let control = attributes & 0x20 != 0;
        for _ in 0..count {
            let len = usize::try_from(b.varint()?)?;
            let mut rec = Reader::new(b.bytes(len)?);
            let _attrs = rec.i8()?;
            let ts_delta = rec.varint()?;
            let offset_delta = rec.varint()?;
            let key = rec.nullable()?;
            let value = rec.nullable()?;
            let n_headers = rec.varint()?;
            let mut headers = Vec::new();
            for _ in 0..n_headers {
                let Some(name) = rec.nullable()? else { bail!("a header without a name") };
                headers.push((name, rec.nullable()?));
            }
            let offset = base_offset + offset_delta;
            if !control && offset >= from {
                out.push(WireRecord { partition, offset, timestamp_ms: base_ts + ts_delta, key, value, headers });
            }
        }
    }
    Ok(())
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    // Names here are short test names: the length fits in an i16.
    buf.extend((s.len() as i16).to_be_bytes());
    buf.extend(s.as_bytes());
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.data.len() >= n, "truncated: {n} bytes wanted, {} left", self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn i8(&mut self) -> Result<i8> {
        Ok(i8::from_be_bytes(self.bytes(1)?.try_into()?))
    }

    fn i16(&mut self) -> Result<i16> {
        Ok(i16::from_be_bytes(self.bytes(2)?.try_into()?))
    }

    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.bytes(4)?.try_into()?))
    }

    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(self.bytes(8)?.try_into()?))
    }

    fn str(&mut self) -> Result<&'a [u8]> {
        let n = self.i16()?;
        self.bytes(usize::try_from(n.max(0))?)
    }

    /// A zig-zag varint (Kafka's record fields).
    fn varint(&mut self) -> Result<i64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.bytes(1)?[0];
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
            }
        }
        bail!("a varint longer than 64 bits")
    }

    /// Varint length then bytes; length -1 is null.
    fn nullable(&mut self) -> Result<Option<Vec<u8>>> {
        let n = self.varint()?;
        if n < 0 {
            return Ok(None);
        }
        Ok(Some(self.bytes(usize::try_from(n)?)?.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_zigzag() {
        for (bytes, want) in [(&[0x00][..], 0), (&[0x01], -1), (&[0x02], 1), (&[0x03], -2), (&[0xac, 0x02], 150)] {
            assert_eq!(Reader::new(bytes).varint().expect("varint"), want, "{bytes:?}");
        }
    }

    #[test]
    fn a_record_batch_decodes_with_null_and_empty_apart() {
        // One record: key null, value empty, header name "\xff\0" with a null value.
        let mut rec = vec![0u8]; // attributes
        rec.push(0x04); // timestamp delta 2
        rec.push(0x00); // offset delta 0
        rec.push(0x01); // key length -1
        rec.push(0x00); // value length 0
        rec.push(0x02); // one header
        rec.push(0x04); // name length 2
        rec.extend([0xff, 0x00]);
        rec.push(0x01); // value length -1
        let mut records = vec![(rec.len() as u8) << 1];
        records.extend(&rec);
        let mut batch = Vec::new();
        batch.extend(0i32.to_be_bytes()); // leader epoch
        batch.push(2); // magic
        batch.extend(0i32.to_be_bytes()); // crc (not checked)
        batch.extend(0i16.to_be_bytes()); // attributes
        batch.extend(0i32.to_be_bytes()); // last offset delta
        batch.extend(1000i64.to_be_bytes()); // base timestamp
        batch.extend(1000i64.to_be_bytes()); // max timestamp
        batch.extend((-1i64).to_be_bytes());
        batch.extend((-1i16).to_be_bytes());
        batch.extend((-1i32).to_be_bytes());
        batch.extend(1i32.to_be_bytes()); // one record
        batch.extend(&records);
        let mut data = Vec::new();
        data.extend(7i64.to_be_bytes()); // base offset
        data.extend((batch.len() as i32).to_be_bytes());
        data.extend(&batch);
        let mut out = Vec::new();
        decode_batches(&data, 3, 0, &mut out).expect("decode");
        assert_eq!(
            out,
            vec![WireRecord {
                partition: 3,
                offset: 7,
                timestamp_ms: 1002,
                key: None,
                value: Some(Vec::new()),
                headers: vec![(vec![0xff, 0x00], None)],
            }]
        );
    }
}
