//! [`Out`]: where a processor's handler puts the records it emits.
//!
//! Nothing reaches Kafka while the handler runs: the records are collected
//! and, when the handler returns `Ok`, checked (declared topic, size) and
//! sent into the open transaction together; a handler that fails emits
//! nothing, so a retry never leaves half of an event's outputs behind.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::consumer::HandlerError;
use crate::envelope::{CloudEventAttrs, EventId, RawRecord};
use crate::outbox::OutgoingEvent;

/// A record the handler emitted, not yet sent.
#[derive(Debug, Clone)]
pub(crate) struct OutRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl OutRecord {
    /// Bytes the broker counts against `max.message.bytes`, before the
    /// record and batch framing (which the runtime adds as a margin).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum::<usize>()
    }
}

/// The handler's output: records to send to the declared output topics, in
/// the transaction that also commits the input's offset.
///
/// Records emitted with [`send`](Self::send) carry CloudEvents binary-mode
/// headers with `ce_source` the processor's source (default
/// `/oncely/<processor>`), a `ce_id` derived from the input event's identity
/// and the output's position (see [`output_ce_id`]), and the input's
/// `traceparent` / `tracestate`, so the output continues the input's trace.
pub struct Out {
    pub(crate) processor: Arc<str>,
    pub(crate) source: Arc<str>,
    /// Declared output topics and their limits.
    pub(crate) outputs: Arc<HashMap<String, usize>>,
    pub(crate) input: Arc<RawRecord>,
    pub(crate) input_id: EventId,
    pub(crate) state: Option<Arc<dyn Any + Send + Sync>>,
    pub(crate) records: Vec<OutRecord>,
}

impl fmt::Debug for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Out")
            .field("processor", &self.processor)
            .field("input_id", &self.input_id)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl Out {
    /// Emits an event of type `ce_type` with JSON `data` and entity key `key`
    /// to `topic`. Fails (a permanent failure: the input is dead-lettered)
    /// when `topic` is not a declared output or `data` does not serialise.
    pub fn send<T: Serialize + ?Sized>(
        &mut self,
        topic: &str,
        key: impl AsRef<[u8]>,
        ce_type: &str,
        data: &T,
    ) -> Result<(), HandlerError> {
        let payload = serde_json::to_vec(data).map_err(HandlerError::reject)?;
        let attrs = self.attrs(ce_type);
        let ev = OutgoingEvent::with_attrs(attrs, payload).caused_by(&self.input);
        self.push_event(topic, key.as_ref(), &ev)
    }

    /// Emits an event the handler built (raw data, a subject, extra
    /// headers), as it is: its `ce_id` and `ce_source` are the ones it was
    /// built with, so to keep the derived identity build it from
    /// [`attrs`](Self::attrs). The input's trace context is added unless the
    /// event carries its own.
    pub fn send_event(&mut self, topic: &str, key: impl AsRef<[u8]>, ev: &OutgoingEvent) -> Result<(), HandlerError> {
        let traced = ev.headers().iter().any(|(k, _)| k == crate::envelope::H_TRACEPARENT);
        if traced {
            self.push_event(topic, key.as_ref(), ev)
        } else {
            let ev = ev.clone().caused_by(&self.input);
            self.push_event(topic, key.as_ref(), &ev)
        }
    }

    /// Emits a record byte for byte: key, payload and headers exactly as
    /// given (no CloudEvents headers added), e.g. to forward the input.
    pub fn send_raw(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(impl AsRef<[u8]>, impl AsRef<[u8]>)],
    ) -> Result<(), HandlerError> {
        self.check_topic(topic)?;
        self.records.push(OutRecord {
            topic: topic.to_owned(),
            key: key.map(<[u8]>::to_vec),
            payload: payload.map(<[u8]>::to_vec),
            headers: headers.iter().map(|(k, v)| (k.as_ref().to_vec(), Some(v.as_ref().to_vec()))).collect(),
        });
        Ok(())
    }

    /// CloudEvents attributes for the next output: the processor's source,
    /// type `ce_type`, `ce_time` now and the derived `ce_id` of the record
    /// [`send`](Self::send) would emit next.
    pub fn attrs(&self, ce_type: &str) -> CloudEventAttrs {
        CloudEventAttrs {
            id: output_ce_id(&self.processor, &self.input_id, self.input.timestamp_ms, self.records.len()),
            source: self.source.to_string(),
            ty: ce_type.to_owned(),
            time: Some(chrono::Utc::now()),
            subject: None,
        }
    }

    /// The processor's name (its consumer group).
    pub fn processor(&self) -> &str {
        &self.processor
    }

    /// The state given to
    /// [`ProcessorBuilder::state`](super::ProcessorBuilder::state), if it has
    /// type `S`.
    pub fn state<S: Send + Sync + 'static>(&self) -> Option<Arc<S>> {
        self.state.clone().and_then(|s| s.downcast::<S>().ok())
    }

    /// Records emitted so far for this event.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether nothing was emitted for this event (yet).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn push_event(&mut self, topic: &str, key: &[u8], ev: &OutgoingEvent) -> Result<(), HandlerError> {
        self.check_topic(topic)?;
        self.records.push(OutRecord {
            topic: topic.to_owned(),
            key: Some(key.to_vec()),
            payload: Some(ev.data().to_vec()),
            headers: ev.headers().into_iter().map(|(k, v)| (k.into_bytes(), Some(v))).collect(),
        });
        Ok(())
    }

    fn check_topic(&self, topic: &str) -> Result<(), HandlerError> {
        if self.outputs.contains_key(topic) {
            Ok(())
        } else {
            Err(HandlerError::reject(format!(
                "topic `{topic}` is not a declared output of processor `{}` (ProcessorBuilder::output)",
                self.processor
            )))
        }
    }
}

/// The `ce_id` of the `index`-th record (from 0) that processor `processor`
/// emits for the input event `input` (record timestamp `timestamp_ms`).
///
/// A UUIDv7 whose time is the input record's timestamp and whose other bits
/// are SHA-256 of `(processor, input identity, index)`: the same on every
/// re-processing of the input (after an aborted transaction, a crash, a
/// rewind of the processor's group), so an oncely consumer downstream drops
/// a re-emitted output as a duplicate even outside Kafka's transaction, and
/// time-ordered like the ids oncely's publisher assigns.
pub fn output_ce_id(processor: &str, input: &EventId, timestamp_ms: Option<i64>, index: usize) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    // Length-prefixed, so that no two different triples hash the same input.
    for part in [processor.as_bytes(), input.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update((index as u64).to_be_bytes());
    let digest = h.finalize();
    let mut rand = [0u8; 10];
    rand.copy_from_slice(&digest[..10]);
    let ms = timestamp_ms.filter(|t| *t >= 0).unwrap_or(0) as u64;
    uuid::Builder::from_unix_timestamp_millis(ms, &rand).into_uuid().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_ids_are_stable_distinct_and_uuid_v7() {
        let id = EventId::from("/s#1");
        let a = output_ce_id("p", &id, Some(1_700_000_000_000), 0);
        assert_eq!(a, output_ce_id("p", &id, Some(1_700_000_000_000), 0), "stable across re-processing");
        assert_ne!(a, output_ce_id("p", &id, Some(1_700_000_000_000), 1), "one id per output");
        assert_ne!(a, output_ce_id("q", &id, Some(1_700_000_000_000), 0), "one id per processor");
        assert_ne!(a, output_ce_id("p", &EventId::from("/s#2"), Some(1_700_000_000_000), 0));
        let u = uuid::Uuid::parse_str(&a).expect("uuid");
        assert_eq!(u.get_version_num(), 7);
        let (secs, _) = u.get_timestamp().expect("v7 timestamp").to_unix();
        assert_eq!(secs, 1_700_000_000);
    }
}
