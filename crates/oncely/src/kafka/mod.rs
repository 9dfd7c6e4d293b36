//! The Kafka floor: how oncely connects to a cluster ([`KafkaConnection`],
//! applied to every client it creates), the Admin API calls rdkafka does not
//! wrap ([`admin`]), the commit-metadata markers every part agrees on, and how
//! records and headers are read from and written to librdkafka, byte for byte.
//!
//! Kafka does not require header names, header values or keys to be UTF-8,
//! and rdkafka's own header iterator (`BorrowedHeaders::try_get`) panics on a
//! header name that is not. Everything here goes through librdkafka's C API
//! instead and keeps names and values as bytes.

use std::ffi::{c_char, c_void, CStr};

use rdkafka::message::BorrowedHeaders;

pub mod admin;
mod connection;
mod headers;
pub use admin::KafkaAdmin;
pub use connection::{is_secret, KafkaConnection, PropertyValue};
pub use headers::{escape_bytes, Headers, HeadersIter};

/// Settings every oncely consumer forces (the consumer runtime's and the
/// processor's), whatever the caller says: offsets are committed by oncely
/// (after the database commit, or inside the Kafka transaction), never by a
/// timer; records of aborted transactions are never read; incremental
/// rebalances let the partitions that stay keep flowing.
pub const FORCED_CONSUMER_SETTINGS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("isolation.level", "read_committed"),
    ("partition.assignment.strategy", "cooperative-sticky"),
];

/// Settings the outbox relay forces on its producer (a caller's value for
/// any of them, or for `request.required.acks`, is refused): idempotent,
/// acknowledged by every in-sync replica, and a gap in a partition's
/// sequence is fatal instead of silently skipped, so that rows are
/// published once and in key order.
pub const FORCED_RELAY_PRODUCER_SETTINGS: &[(&str, &str)] =
    &[("enable.idempotence", "true"), ("acks", "all"), ("enable.gapless.guarantee", "true")];

/// Commit metadata oncely's consumers write with their Kafka commits; an
/// offset committed with any other metadata was moved by someone else.
pub const COMMIT_METADATA: &str = "oncely:consumer";
/// Prefix of the commit metadata written by `oncely offsets reset`.
pub const RESET_METADATA_PREFIX: &str = "oncely:reset:";

use rdkafka::message::{BorrowedMessage, OwnedHeaders};

use crate::error::{Error, Result};
use rdkafka_sys as rdsys;

/// The headers of a consumed message, in order, names and values as bytes
/// (`None` for a null value). Never panics, whatever the bytes.
///
/// librdkafka hands out a header's name as a NUL-terminated C string, so a
/// name holding a NUL byte is read up to that byte (its value is intact).
pub fn message_headers(m: &BorrowedMessage<'_>) -> Headers {
    let mut hdrs: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is a live message for the borrow of `m`; librdkafka
    // returns a pointer into it (or an error and no pointer).
    let err = unsafe { rdsys::rd_kafka_message_headers(m.ptr(), &mut hdrs) };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return Headers::new();
    }
    // SAFETY: `hdrs` belongs to the message and lives as long as `m`.
    unsafe { read_headers(hdrs) }
}

/// Header `idx` of `hdrs`: name and value (`None`: null); `None` if librdkafka
/// has no such header.
///
/// # Safety
/// `hdrs` must be a valid librdkafka headers list, and stay unchanged while
/// the returned slices are used.
unsafe fn header_at<'h>(hdrs: *const rdsys::rd_kafka_headers_t, idx: usize) -> Option<(&'h [u8], Option<&'h [u8]>)> {
    let mut name: *const c_char = std::ptr::null();
    let mut value: *const c_void = std::ptr::null();
    let mut size: usize = 0;
    // SAFETY: guaranteed by the caller; the out-pointers are valid locals.
    let err = unsafe { rdsys::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
        return None;
    }
    // SAFETY: librdkafka stores names NUL-terminated; the bytes live as long as `hdrs`.
    let name = unsafe { CStr::from_ptr(name) }.to_bytes();
    let value = (!value.is_null()).then(|| {
        if size == 0 {
            &[][..]
        } else {
            // SAFETY: `value` points at `size` bytes owned by `hdrs`.
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }
        }
    });
    Some((name, value))
}

/// Reads every header of `hdrs` into one buffer (sized first, each byte
/// written once: one allocation whatever the number of headers).
///
/// # Safety
/// `hdrs` must be a valid librdkafka headers list for the duration of the call.
unsafe fn read_headers(hdrs: *const rdsys::rd_kafka_headers_t) -> Headers {
    // SAFETY: guaranteed by the caller.
    let n = unsafe { rdsys::rd_kafka_header_cnt(hdrs) };
    // SAFETY: `idx < n`, and `hdrs` is valid for the call (the caller).
    let at = |idx| unsafe { header_at(hdrs, idx) };
    let bytes = (0..n).filter_map(at).map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len)).sum();
    let count = (0..n).filter_map(at).count();
    Headers::from_counted(count, bytes, (0..n).filter_map(at))
}

/// Builds the headers of a record to produce from name/value pairs, names as
/// bytes: rdkafka's `OwnedHeaders::insert` only takes names as `&str`.
pub fn owned_headers<N: AsRef<[u8]>, V: AsRef<[u8]>>(headers: &[(N, V)]) -> Result<OwnedHeaders> {
    let with: Vec<(&[u8], Option<&[u8]>)> = headers.iter().map(|(n, v)| (n.as_ref(), Some(v.as_ref()))).collect();
    headers_with_nulls(&with)
}

/// Headers with the given names and values (`None`: a null value), byte for
/// byte, in order.
pub fn headers_with_nulls<K, V>(headers: &[(K, Option<V>)]) -> Result<OwnedHeaders>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    kafka_headers(headers.iter().map(|(k, v)| (k.as_ref(), v.as_ref().map(AsRef::as_ref))), headers.len())
}

/// A record's [`Headers`] to produce, byte for byte, in order.
pub fn record_headers(headers: &Headers) -> Result<OwnedHeaders> {
    kafka_headers(headers.iter(), headers.len())
}

fn kafka_headers<'h>(headers: impl Iterator<Item = (&'h [u8], Option<&'h [u8]>)>, n: usize) -> Result<OwnedHeaders> {
    // A valid pointer for empty names and values: librdkafka copies zero
    // bytes from it, and a non-null value pointer is what makes an empty
    // value empty rather than null.
    static EMPTY: [u8; 1] = [0];
    let out = OwnedHeaders::new_with_capacity(n);
    // `OwnedHeaders` owns a `rd_kafka_headers_t`; `as_borrowed` is that very
    // pointer seen as the zero-sized `BorrowedHeaders` (rdkafka casts it
    // both ways, `BorrowedHeaders::from_native_ptr`), so casting it back
    // gives the native pointer. Its referent is C memory that no Rust
    // reference covers (the reference is to a zero-sized type).
    let native = out.as_borrowed() as *const BorrowedHeaders as *mut rdkafka_sys::RDKafkaHeaders;
    for (name, value) in headers {
        let name_ptr = if name.is_empty() { EMPTY.as_ptr() } else { name.as_ptr() };
        let (value_ptr, value_len) = match value {
            Some(v) => (if v.is_empty() { EMPTY.as_ptr() } else { v.as_ptr() }, v.len()),
            None => (std::ptr::null(), 0),
        };
        let name_len = isize::try_from(name.len()).map_err(|_| Error::Config("a header name is too long".into()))?;
        let value_len = isize::try_from(value_len).map_err(|_| Error::Config("a header value is too long".into()))?;
        // SAFETY: `native` points to the live, writable headers `out` owns
        // (created just above, never shared); name and value point to
        // `name_len` and `value_len` readable bytes (or the value is null
        // with length 0), which librdkafka copies before returning.
        let err = unsafe {
            rdkafka_sys::rd_kafka_header_add(
                native,
                name_ptr as *const c_char,
                name_len,
                value_ptr as *const c_void,
                value_len,
            )
        };
        if err != rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(Error::Kafka(rdkafka::error::KafkaError::MessageProduction(err.into())));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_with_any_bytes_round_trip_through_librdkafka() {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"ce_id".to_vec(), b"abc".to_vec()),
            (vec![0xff, 0xfe, b'x'], vec![0, 1, 2]),
            ("ünï".as_bytes().to_vec(), Vec::new()),
        ];
        let h = owned_headers(&pairs).expect("headers");
        // SAFETY: `h` is alive for the call.
        let back = unsafe { read_headers(h.as_borrowed() as *const _ as *const rdsys::rd_kafka_headers_t) };
        let want: Vec<(Vec<u8>, Option<Vec<u8>>)> = pairs.into_iter().map(|(k, v)| (k, Some(v))).collect();
        assert_eq!(back.to_vec(), want);
    }
}

#[cfg(test)]
mod with_nulls_tests {

    use std::ffi::CStr;

    use rdkafka::message::Headers;

    use super::*;

    /// Name bytes up to the first NUL (what librdkafka's C API can return),
    /// and the value, of header `i`.
    fn get(h: &OwnedHeaders, i: usize) -> (Vec<u8>, Option<Vec<u8>>) {
        let native = h.as_borrowed() as *const BorrowedHeaders as *const rdkafka_sys::RDKafkaHeaders;
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
        // SAFETY: `native` is `h`'s live headers; the out-pointers are valid.
        let err = unsafe { rdkafka_sys::rd_kafka_header_get_all(native, i, &mut name, &mut value, &mut size) };
        assert_eq!(err, rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        // SAFETY: librdkafka NUL-terminates the names it stores, and the
        // value (when not null) has `size` bytes; both live as long as `h`.
        unsafe {
            let name = CStr::from_ptr(name).to_bytes().to_vec();
            let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value as *const u8, size).to_vec());
            (name, value)
        }
    }

    #[test]
    fn names_and_values_are_added_byte_for_byte() {
        let headers: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
            (b"ce_id".to_vec(), Some(b"abc".to_vec())),
            (vec![0xff, 0xfe, b'x'], Some(vec![0, 1, 0])),
            (b"empty".to_vec(), Some(Vec::new())),
            (b"null".to_vec(), None),
            (Vec::new(), Some(b"nameless".to_vec())),
        ];
        let h = headers_with_nulls(&headers).expect("headers");
        assert_eq!(h.count(), headers.len());
        for (i, want) in headers.iter().enumerate() {
            assert_eq!(&get(&h, i), want, "header {i}");
        }
        // rdkafka's own reader agrees on the UTF-8 one.
        let first = h.get(0);
        assert_eq!((first.key, first.value), ("ce_id", Some(&b"abc"[..])));
    }

    #[test]
    fn a_name_with_nul_keeps_its_bytes_after_the_nul() {
        // librdkafka's accessor stops at the NUL, so the full name is checked
        // on the wire by the outbox integration test; here: the header is
        // there, and the value (stored right after the name) is intact.
        let h = headers_with_nulls(&[(b"a\0b".to_vec(), Some(b"v".to_vec()))]).expect("headers");
        assert_eq!(h.count(), 1);
        assert_eq!(get(&h, 0), (b"a".to_vec(), Some(b"v".to_vec())));
    }
}
