//! Reading a consumed message and writing record headers byte for byte.
//!
//! Private to the processor until the shared reader lands (the envelope's
//! `RawRecord` gets byte header names and one safe reader for every
//! runtime); then [`read_input`] and [`byte_headers`] are swapped for it.
//!
//! Kafka does not require header names to be UTF-8, and rdkafka's header
//! iterator (`BorrowedHeaders::iter` / `try_get`) panics on a name that is
//! not: headers are read here through librdkafka's C API
//! (`rd_kafka_message_headers`, `rd_kafka_header_get_all`), names as bytes.

use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};
use rdkafka_sys as rdsys;

use crate::envelope::RawRecord;

/// A header as received: name and value bytes, `None` for a null value.
pub type RawHeader = (Vec<u8>, Option<Vec<u8>>);

/// A consumed record: the envelope's [`RawRecord`] (whose header names are
/// text today) and the headers exactly as they came.
#[derive(Debug, Clone)]
pub(crate) struct Input {
    /// The record, with every header whose name is UTF-8.
    pub record: Arc<RawRecord>,
    /// Every header, in order, names and values as bytes.
    pub raw_headers: Vec<RawHeader>,
    /// The first header name that is not UTF-8, if any (such a record is
    /// dead-lettered: see the module docs of [`super`]).
    pub bad_header_name: Option<Vec<u8>>,
}

/// Copies a consumed message. Never panics, whatever the bytes.
pub(crate) fn read_input(m: &BorrowedMessage<'_>) -> Input {
    let raw_headers = message_headers(m);
    let mut bad_header_name = None;
    let mut headers = Vec::with_capacity(raw_headers.len());
    for (name, value) in &raw_headers {
        match std::str::from_utf8(name) {
            Ok(n) => headers.push((n.to_owned(), value.clone())),
            Err(_) => {
                bad_header_name.get_or_insert_with(|| name.clone());
            }
        }
    }
    let record = RawRecord {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
    };
    Input { record: Arc::new(record), raw_headers, bad_header_name }
}

/// The headers of a consumed message, in order, names and values as bytes
/// (`None`: a null value; empty when it has none). Never panics, whatever
/// the bytes.
///
/// librdkafka keeps a header's name NUL-terminated, so a name holding a NUL
/// byte is read up to that byte; its value is intact.
pub fn message_headers(m: &BorrowedMessage<'_>) -> Vec<RawHeader> {
    let mut hdrs: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is a live message for the borrow of `m`; librdkafka
    // stores a pointer into it in `hdrs`, or returns an error and leaves it.
    let err = unsafe { rdsys::rd_kafka_message_headers(m.ptr(), &mut hdrs) };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return Vec::new();
    }
    // SAFETY: `hdrs` belongs to the message, which outlives this call.
    unsafe { read_headers(hdrs) }
}

/// Every header of `hdrs`.
///
/// # Safety
/// `hdrs` must be a valid librdkafka header list for the duration of the call.
unsafe fn read_headers(hdrs: *const rdsys::rd_kafka_headers_t) -> Vec<RawHeader> {
    // SAFETY: guaranteed by the caller.
    let n = unsafe { rdsys::rd_kafka_header_cnt(hdrs) };
    let mut out = Vec::with_capacity(n);
    for idx in 0..n {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `idx < n`; the out-pointers are valid locals.
        let err = unsafe { rdsys::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka stores names NUL-terminated, alive as long as `hdrs`.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
        let value = (!value.is_null()).then(|| {
            if size == 0 {
                Vec::new()
            } else {
                // SAFETY: `value` points at `size` bytes owned by `hdrs`.
                unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
            }
        });
        out.push((name, value));
    }
    out
}

/// Record headers to produce, names and values as bytes (`None`: a null
/// value). rdkafka's `OwnedHeaders::insert` only takes names as `&str`.
pub fn byte_headers<N: AsRef<[u8]>, V: AsRef<[u8]>>(headers: &[(N, Option<V>)]) -> OwnedHeaders {
    let h = OwnedHeaders::new_with_capacity(headers.len());
    // rdkafka represents `&BorrowedHeaders` as a reference whose address is
    // the native header list.
    let ptr = h.as_borrowed() as *const _ as *mut rdsys::rd_kafka_headers_t;
    for (name, value) in headers {
        let name = name.as_ref();
        let (vptr, vlen) = match value {
            Some(v) => (v.as_ref().as_ptr().cast::<c_void>(), v.as_ref().len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `ptr` is the list `h` owns, just created and not shared;
        // librdkafka copies the name and the value, whose lengths are given.
        unsafe { rdsys::rd_kafka_header_add(ptr, name.as_ptr().cast::<c_char>(), name.len() as isize, vptr, vlen) };
    }
    h
}

/// Bytes as readable text for logs and error messages: UTF-8 as it is,
/// control characters and invalid bytes escaped (`\u{0}`, `\xff`), quoted.
pub(crate) fn escape(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' || c == '"' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_with_any_bytes_round_trip_through_librdkafka() {
        let pairs: Vec<RawHeader> = vec![
            (b"ce_id".to_vec(), Some(b"abc".to_vec())),
            (vec![0xff, 0xfe, b'x'], Some(vec![0, 1, 0, 2])),
            ("ünï".as_bytes().to_vec(), Some(Vec::new())),
            (b"null".to_vec(), None),
        ];
        let h = byte_headers(&pairs);
        // SAFETY: `h` is alive for the call.
        let back = unsafe { read_headers(h.as_borrowed() as *const _ as *const rdsys::rd_kafka_headers_t) };
        assert_eq!(back, pairs);
    }

    #[test]
    fn escape_shows_every_byte() {
        assert_eq!(escape(b"ce_id"), "\"ce_id\"");
        assert_eq!(escape(&[0xff, b'a', 0, b'"']), "\"\\xffa\\u{0}\\\"\"");
    }
}
