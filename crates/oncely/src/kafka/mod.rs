//! The Kafka floor: how oncely connects to a cluster ([`KafkaConnection`],
//! applied to every client it creates), and how it reads records from and
//! writes headers to librdkafka, byte for byte.
//!
//! Kafka does not require header names, header values or keys to be UTF-8,
//! and rdkafka's own header iterator (`BorrowedHeaders::try_get`) panics on a
//! header name that is not. Everything here goes through librdkafka's C API
//! instead and keeps names and values as bytes.

use std::ffi::{c_char, c_void, CStr};

mod connection;
pub use connection::{is_secret, KafkaConnection, PropertyValue};

use rdkafka::message::{BorrowedMessage, Headers as _, OwnedHeaders};
use rdkafka_sys as rdsys;

/// The headers of a consumed message, in order, names and values as bytes
/// (`None` for a null value). Never panics, whatever the bytes.
///
/// librdkafka hands out a header's name as a NUL-terminated C string, so a
/// name holding a NUL byte is read up to that byte (its value is intact).
pub fn message_headers(m: &BorrowedMessage<'_>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut hdrs: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is a live message for the borrow of `m`; librdkafka
    // returns a pointer into it (or an error and no pointer).
    let err = unsafe { rdsys::rd_kafka_message_headers(m.ptr(), &mut hdrs) };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return Vec::new();
    }
    // SAFETY: `hdrs` belongs to the message and lives as long as `m`.
    unsafe { read_headers(hdrs) }
}

/// Reads every header of `hdrs`.
///
/// # Safety
/// `hdrs` must be a valid librdkafka headers list for the duration of the call.
unsafe fn read_headers(hdrs: *const rdsys::rd_kafka_headers_t) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
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
        // SAFETY: librdkafka stores names NUL-terminated; the bytes live as long as `hdrs`.
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

/// Builds the headers of a record to produce from name/value pairs, names as
/// bytes: rdkafka's `OwnedHeaders::insert` only takes names as `&str`.
pub fn owned_headers<N: AsRef<[u8]>, V: AsRef<[u8]>>(headers: &[(N, V)]) -> OwnedHeaders {
    let h = OwnedHeaders::new_with_capacity(headers.len());
    // `as_borrowed` is a reference whose address is the native headers list
    // (rdkafka's own representation of `BorrowedHeaders`).
    let ptr = h.as_borrowed() as *const _ as *mut rdsys::rd_kafka_headers_t;
    for (name, value) in headers {
        let (name, value) = (name.as_ref(), value.as_ref());
        // SAFETY: `ptr` is the list `h` owns (writable: it was just created);
        // librdkafka copies name and value, whose lengths are passed.
        let err = unsafe {
            rdsys::rd_kafka_header_add(
                ptr,
                name.as_ptr().cast::<c_char>(),
                name.len() as isize,
                value.as_ptr().cast::<c_void>(),
                value.len() as isize,
            )
        };
        debug_assert_eq!(err, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    }
    debug_assert_eq!(h.count(), headers.len());
    h
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
        let h = owned_headers(&pairs);
        // SAFETY: `h` is alive for the call.
        let back = unsafe { read_headers(h.as_borrowed() as *const _ as *const rdsys::rd_kafka_headers_t) };
        let want: Vec<(Vec<u8>, Option<Vec<u8>>)> = pairs.into_iter().map(|(k, v)| (k, Some(v))).collect();
        assert_eq!(back, want);
    }
}
