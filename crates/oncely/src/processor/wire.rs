//! Reading a consumed message for the processor: the shared reader
//! ([`RawRecord::from_message`], header names as bytes through librdkafka's C
//! API), and which header name is not UTF-8 (the processor dead-letters
//! such a record, see the module docs of [`super`]).

use std::sync::Arc;

use rdkafka::message::BorrowedMessage;

use crate::envelope::RawRecord;

/// A header as received: name and value bytes, `None` for a null value.
pub type RawHeader = (Vec<u8>, Option<Vec<u8>>);

/// A consumed record.
#[derive(Debug, Clone)]
pub(crate) struct Input {
    /// The record, headers byte for byte.
    pub record: Arc<RawRecord>,
    /// The first header name that is not UTF-8, if any.
    pub bad_header_name: Option<Vec<u8>>,
}

/// Copies a consumed message. Never panics, whatever the bytes.
pub(crate) fn read_input(m: &BorrowedMessage<'_>) -> Input {
    let record = RawRecord::from_message(m);
    let bad_header_name = record.headers.iter().find(|(k, _)| std::str::from_utf8(k).is_err()).map(|(k, _)| k.to_vec());
    Input { record: Arc::new(record), bad_header_name }
}
