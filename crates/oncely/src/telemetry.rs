//! Tracing spans named and attributed after OpenTelemetry's
//! [messaging semantic conventions](https://opentelemetry.io/docs/specs/semconv/messaging/kafka/),
//! and W3C trace context carried through Kafka headers.
//!
//! oncely emits [`tracing`] spans. With any subscriber they show up as usual;
//! with [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry) they
//! become OpenTelemetry spans with these names, kinds and attributes:
//!
//! | span (`otel.name`) | kind | where | attributes |
//! |---|---|---|---|
//! | `process {topic}` (batch) | consumer | one consumer batch transaction | `messaging.system` = `kafka`, `messaging.operation.type` = `process`, `messaging.operation.name`, `messaging.destination.name`, `messaging.destination.partition.id`, `messaging.consumer.group.name`, `messaging.batch.message_count`, `messaging.kafka.offset` (first offset of the batch) |
//! | `process {topic}` (event) | consumer | one event in a per-event handler | the above without the batch count, plus `messaging.message.id`, `messaging.kafka.offset`, `messaging.kafka.message.key` |
//! | `send {topic}` | producer | the outbox relay publishing one row | `messaging.system`, `messaging.operation.type` = `send`, `messaging.destination.name`, `messaging.message.id`, `messaging.kafka.message.key` |
//!
//! A key that is not UTF-8 is recorded as `hex:` followed by its bytes in hex.
//!
//! ## Trace context (cargo feature `otel`)
//!
//! With the `otel` feature, the context crosses Kafka as the W3C
//! `traceparent` and `tracestate` headers:
//!
//! - [`crate::outbox::OutgoingEvent`] gains the current span's `traceparent`
//!   when it is enqueued (unless it carries one already), so the trace of the
//!   request that wrote the event goes on through the relay;
//! - the relay's `send` span is a child of the row's `traceparent`;
//! - a per-event `process` span is a child of the record's `traceparent`, and
//!   a batch span links to every record's context (the convention for
//!   batches: one parent cannot stand for many messages).
//!
//! A header that is not a valid `traceparent` (not UTF-8, a wrong length, an
//! all-zero id) is ignored: the span then has its local parent, as without the
//! feature. Install a `tracing_opentelemetry::layer()` with your tracer (an
//! OTLP exporter, for instance) to send the spans; oncely does not pick an
//! exporter for you.

use tracing::Span;

/// `messaging.kafka.message.key`: the key as text, or `hex:…` if not UTF-8.
pub(crate) fn key_attr(key: Option<&[u8]>) -> String {
    match key {
        None => String::new(),
        Some(k) => match std::str::from_utf8(k) {
            Ok(s) if !s.contains('\0') => s.to_owned(),
            _ => {
                let mut s = String::with_capacity(4 + 2 * k.len());
                s.push_str("hex:");
                for b in k {
                    s.push_str(&format!("{b:02x}"));
                }
                s
            }
        },
    }
}

/// A W3C trace context read from headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id.
    pub trace_id: u128,
    /// The parent span id.
    pub span_id: u64,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a version-00 `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
    /// Anything else, including all-zero ids, is `None`.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let s = std::str::from_utf8(value).ok()?.trim();
        let mut parts = s.split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex =
            |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if parts.next().is_some() || version != "00" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        let tp = TraceParent {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (tp.trace_id != 0 && tp.span_id != 0).then_some(tp)
    }

    /// The header value.
    pub fn to_header(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

/// The `traceparent` and `tracestate` of headers, if the first is valid.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) fn incoming<'a, I>(headers: I) -> Option<(TraceParent, Option<&'a [u8]>)>
where
    I: IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
{
    let mut parent = None;
    let mut state = None;
    for (name, value) in headers {
        if name == crate::envelope::H_TRACEPARENT.as_bytes() {
            parent = value.and_then(TraceParent::parse);
        } else if name == b"tracestate" {
            state = value;
        }
    }
    parent.map(|p| (p, state))
}

#[cfg(feature = "otel")]
mod otel {
    use super::TraceParent;
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    fn context(tp: TraceParent, state: Option<&[u8]>) -> opentelemetry::Context {
        let state = state
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let sc = SpanContext::new(
            TraceId::from_bytes(tp.trace_id.to_be_bytes()),
            SpanId::from_bytes(tp.span_id.to_be_bytes()),
            TraceFlags::new(tp.flags),
            true,
            state,
        );
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    pub(super) fn set_parent(span: &Span, tp: TraceParent, state: Option<&[u8]>) {
        let _ = span.set_parent(context(tp, state));
    }

    pub(super) fn add_link(span: &Span, tp: TraceParent, state: Option<&[u8]>) {
        let cx = context(tp, state);
        span.add_link(cx.span().span_context().clone());
    }

    pub(super) fn current() -> Option<(TraceParent, String)> {
        let cx = Span::current().context();
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return None;
        }
        let tp = TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8(),
        };
        Some((tp, sc.trace_state().header()))
    }
}

/// Makes the record's trace context the parent of `span` (feature `otel`;
/// otherwise nothing).
pub(crate) fn set_parent<'a, I>(span: &Span, headers: I)
where
    I: IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
{
    #[cfg(feature = "otel")]
    if let Some((tp, state)) = incoming(headers) {
        otel::set_parent(span, tp, state);
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, headers.into_iter());
}

/// Links `span` to the record's trace context (feature `otel`; otherwise nothing).
pub(crate) fn add_link<'a, I>(span: &Span, headers: I)
where
    I: IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
{
    #[cfg(feature = "otel")]
    if let Some((tp, state)) = incoming(headers) {
        otel::add_link(span, tp, state);
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, headers.into_iter());
}

/// The current span's context as `traceparent` and `tracestate` header
/// values (feature `otel`, inside a sampled or unsampled OpenTelemetry span;
/// otherwise `None`).
pub fn current_traceparent() -> Option<(String, String)> {
    #[cfg(feature = "otel")]
    return otel::current().map(|(tp, state)| (tp.to_header(), state));
    #[cfg(not(feature = "otel"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_traceparents_and_ignores_hostile_ones() {
        let tp = TraceParent::parse(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").expect("valid");
        assert_eq!(tp.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(tp.span_id, 0xb7ad6b7169203331);
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_header(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        for bad in [
            &b""[..],
            b"00-abc-def-01",
            b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            b"00-0af7651916cd43dd8448eb211c80319\xff-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033\x0031-01",
            b"00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn finds_the_context_among_headers() {
        let v = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec();
        let h: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
            (b"\xffodd".to_vec(), Some(b"x".to_vec())),
            (b"tracestate".to_vec(), Some(b"k=v".to_vec())),
            (b"traceparent".to_vec(), Some(v)),
        ];
        let (tp, state) = incoming(h.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))).expect("found");
        assert_eq!(tp.span_id, 0xb7ad6b7169203331);
        assert_eq!(state, Some(&b"k=v"[..]));
        let null: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![(b"traceparent".to_vec(), None)];
        assert!(incoming(null.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))).is_none());
        assert_eq!(key_attr(Some(b"order-1")), "order-1");
        assert_eq!(key_attr(Some(b"\xff\x00")), "hex:ff00");
    }
}
