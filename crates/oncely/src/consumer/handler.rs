//! The handler API: an ordinary async fn of the typed event and a context that
//! holds the open transaction.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::{PgConnection, Postgres, Transaction};

use crate::envelope::{decode_event, DecodeError, DecodePayload, Event, EventId, RawRecord};

/// How a handler failure should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureClass {
    /// Transient: try again later, with backoff.
    Retry,
    /// Transient, and the handler knows when to try again.
    RetryAfter(Duration),
    /// Permanent: dead-letter now.
    Reject,
}

/// A handler's failure, with its class. Database errors convert automatically
/// (`?` on a sqlx call) and are transient: serialization failures, deadlocks
/// and lost connections succeed on a later attempt, and other errors reach the
/// dead-letter topic after the consumer's `max_attempts`.
pub struct HandlerError {
    class: FailureClass,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl HandlerError {
    /// A transient failure: the event is retried with backoff.
    pub fn retry(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError { class: FailureClass::Retry, source: e.into() }
    }

    /// A transient failure to retry no sooner than `after`.
    pub fn retry_after(after: Duration, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError { class: FailureClass::RetryAfter(after), source: e.into() }
    }

    /// A permanent failure: the event is dead-lettered at once.
    pub fn reject(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError { class: FailureClass::Reject, source: e.into() }
    }

    /// The failure's class.
    pub fn class(&self) -> FailureClass {
        self.class
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// A name for the error's kind, stored as `kafka_dlt-exception-fqcn`.
    pub fn class_name(&self) -> String {
        if self.source.downcast_ref::<sqlx::Error>().is_some() {
            "sqlx::Error".into()
        } else if self.source.downcast_ref::<PanicError>().is_some() {
            "oncely::HandlerPanic".into()
        } else {
            match self.class {
                FailureClass::Reject => "oncely::HandlerError::Reject".into(),
                _ => "oncely::HandlerError::Retry".into(),
            }
        }
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError").field("class", &self.class).field("source", &self.source).finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError::retry(e)
    }
}

impl From<crate::Error> for HandlerError {
    fn from(e: crate::Error) -> Self {
        HandlerError::retry(e)
    }
}

/// A handler panicked; the panic message is kept.
#[derive(Debug)]
pub(crate) struct PanicError(pub String);

impl fmt::Display for PanicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handler panicked: {}", self.0)
    }
}

impl std::error::Error for PanicError {}

/// The handler's context: the open transaction of the batch (shared with the
/// inbox claim and the offset fence, so the handler's writes commit exactly
/// when the event is marked processed) and facts about the event.
///
/// The handler cannot commit or roll back the transaction: it only gets
/// `&mut PgConnection` through [`Cx::db`].
pub struct Cx {
    pub(crate) tx: Transaction<'static, Postgres>,
    pub(crate) consumer: Arc<str>,
    pub(crate) event_id: Option<EventId>,
    pub(crate) replay: bool,
    pub(crate) state: Option<Arc<dyn Any + Send + Sync>>,
    pub(crate) effects: Vec<crate::store::effects::NewIntent>,
    pub(crate) registry: Arc<crate::effects::Registry>,
    /// The record being handled (per-event handlers), for `traceparent`.
    pub(crate) record: Option<Arc<RawRecord>>,
}

impl fmt::Debug for Cx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cx").field("consumer", &self.consumer).field("event_id", &self.event_id).finish()
    }
}

impl Cx {
    /// The batch's transaction, as an executor for sqlx queries:
    /// `sqlx::query(..).execute(cx.db()).await?`.
    pub fn db(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// The consumer's name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Identity of the event being handled.
    pub fn event_id(&self) -> Option<&EventId> {
        self.event_id.as_ref()
    }

    /// The state given to [`ConsumerBuilder::state`](super::ConsumerBuilder::state),
    /// if it has type `S` (an HTTP client, settings, ...). A shared handle, so
    /// the handler can hold it while it uses [`db`](Self::db).
    pub fn state<S: Send + Sync + 'static>(&self) -> Option<Arc<S>> {
        self.state.clone().and_then(|s| s.downcast::<S>().ok())
    }

    /// Records the intent to run effect `name` with `payload` after the
    /// transaction commits, keyed `<consumer>/<name>/<event identity>`: the
    /// same key on every redelivery or replay, so the effect happens once in
    /// outcome. Recording the same effect twice for one event is a no-op (use
    /// [`effect_keyed`](Self::effect_keyed) for several calls of one effect).
    /// In replay mode the intent is recorded as suppressed and never runs.
    pub fn effect<P: serde::Serialize>(&mut self, name: &str, payload: &P) -> Result<(), HandlerError> {
        let event_id = self.event_id.clone().ok_or_else(|| {
            HandlerError::reject("no current event: a batch handler records effects with Cx::effect_for")
        })?;
        self.push_effect(&event_id, name, None, None, payload)
    }

    /// [`effect`](Self::effect) for one event of a batch handler's batch.
    pub fn effect_for<P: serde::Serialize>(
        &mut self,
        event: &EventId,
        name: &str,
        payload: &P,
    ) -> Result<(), HandlerError> {
        self.push_effect(event, name, None, None, payload)
    }

    /// Like [`effect`](Self::effect), with a suffix in the key for several
    /// calls of one effect per event (`.../receipt`, `.../reminder`).
    pub fn effect_keyed<P: serde::Serialize>(
        &mut self,
        name: &str,
        suffix: &str,
        payload: &P,
    ) -> Result<(), HandlerError> {
        let event_id = self.event_id.clone().ok_or_else(|| HandlerError::reject("no current event"))?;
        self.push_effect(&event_id, name, Some(suffix), None, payload)
    }

    /// Like [`effect`](Self::effect), and the executor runs the intents of
    /// this effect for `entity` one at a time in the order they were recorded.
    pub fn effect_ordered<P: serde::Serialize>(
        &mut self,
        name: &str,
        entity: &str,
        payload: &P,
    ) -> Result<(), HandlerError> {
        let event_id = self.event_id.clone().ok_or_else(|| HandlerError::reject("no current event"))?;
        self.push_effect(&event_id, name, None, Some(entity), payload)
    }

    fn push_effect<P: serde::Serialize>(
        &mut self,
        event_id: &EventId,
        name: &str,
        suffix: Option<&str>,
        entity: Option<&str>,
        payload: &P,
    ) -> Result<(), HandlerError> {
        let Some(semantics) = self.registry.semantics_of(name) else {
            return Err(HandlerError::retry(format!(
                "effect `{name}` is not registered with this consumer (effect_executor or effect_semantics)"
            )));
        };
        let payload = serde_json::to_value(payload).map_err(HandlerError::reject)?;
        self.effects.push(crate::store::effects::NewIntent {
            // The event's inbox key: fixed length, any identity (NUL, bytes
            // that are not UTF-8) gives a key a provider accepts.
            key: crate::effects::intent_key(&self.consumer, name, &event_id.key().to_string(), suffix),
            consumer: self.consumer.to_string(),
            effect: name.to_owned(),
            event_id: event_id.display(),
            payload,
            semantics: semantics.as_str(),
            status: if self.replay { "suppressed" } else { "pending" },
            ordering_key: entity.map(|e| format!("{name}/{e}")),
        });
        Ok(())
    }

    /// Whether the consumer runs in replay mode (side effects are suppressed).
    pub fn is_replay(&self) -> bool {
        self.replay
    }

    /// Publishes an event through the transactional outbox, in the batch's
    /// transaction: it exists exactly when the handler's writes commit. JSON
    /// `data`, a fresh UUIDv7 `ce_id`, `ce_source` `/oncely/<consumer>`. To
    /// continue the incoming event's trace or set other attributes, use
    /// [`publish_event`](Self::publish_event) with
    /// [`OutgoingEvent::caused_by`](crate::outbox::OutgoingEvent::caused_by).
    pub async fn publish<T: serde::Serialize + ?Sized>(
        &mut self,
        topic: &str,
        key: &str,
        ce_type: &str,
        data: &T,
    ) -> crate::Result<crate::outbox::Enqueued> {
        let mut ev = crate::outbox::OutgoingEvent::json(ce_type, data)?.source(format!("/oncely/{}", self.consumer));
        if let Some(rec) = &self.record {
            // Carries the incoming event's W3C trace context, if it had one.
            ev = ev.caused_by(rec);
        }
        crate::outbox::enqueue(&mut self.tx, topic, key, &ev).await
    }

    /// [`publish`](Self::publish) of an event built by the caller.
    pub async fn publish_event(
        &mut self,
        topic: &str,
        key: &str,
        event: &crate::outbox::OutgoingEvent,
    ) -> crate::Result<crate::outbox::Enqueued> {
        crate::outbox::enqueue(&mut self.tx, topic, key, event).await
    }
}

/// A handler function: implemented for every `async fn(Event<T>, &mut Cx) ->
/// Result<(), HandlerError>`.
pub trait HandlerFn<'a, T>: Send + Sync + 'static {
    /// The handler's future.
    type Fut: Future<Output = Result<(), HandlerError>> + Send + 'a;
    /// Calls the handler.
    fn call(&self, ev: Event<T>, cx: &'a mut Cx) -> Self::Fut;
}

impl<'a, T, F, Fut> HandlerFn<'a, T> for F
where
    F: Fn(Event<T>, &'a mut Cx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'a,
    T: 'a,
{
    type Fut = Fut;
    fn call(&self, ev: Event<T>, cx: &'a mut Cx) -> Fut {
        (self)(ev, cx)
    }
}

/// A batch handler function: implemented for every `async fn(Vec<Event<T>>,
/// &mut Cx) -> Result<(), HandlerError>`. It receives the new (claimed,
/// non-duplicate) events of a batch in offset order, so it can write them with
/// one multi-row statement. If it fails, oncely runs the events again one at a
/// time (a one-element vector each, in a savepoint) to find the failing one.
pub trait BatchHandlerFn<'a, T>: Send + Sync + 'static {
    /// The handler's future.
    type Fut: Future<Output = Result<(), HandlerError>> + Send + 'a;
    /// Calls the handler.
    fn call(&self, evs: Vec<Event<T>>, cx: &'a mut Cx) -> Self::Fut;
}

impl<'a, T, F, Fut> BatchHandlerFn<'a, T> for F
where
    F: Fn(Vec<Event<T>>, &'a mut Cx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'a,
    T: 'a,
{
    type Fut = Fut;
    fn call(&self, evs: Vec<Event<T>>, cx: &'a mut Cx) -> Fut {
        (self)(evs, cx)
    }
}

/// The runtime's view of a handler: decode, then call. Type-erased so the
/// runtime is not generic over the event type.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    fn decode(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError>;
    /// Whether the handler takes a whole batch at once.
    fn is_batch(&self) -> bool;
    /// Calls the handler; a per-event handler gets exactly one event.
    fn call<'a>(&'a self, evs: Vec<Box<dyn Any + Send>>, cx: &'a mut Cx) -> BoxFuture<'a, Result<(), HandlerError>>;
}

fn downcast_all<T: 'static>(evs: Vec<Box<dyn Any + Send>>) -> Option<Vec<Event<T>>> {
    evs.into_iter().map(|e| e.downcast::<Event<T>>().ok().map(|b| *b)).collect()
}

pub(crate) struct Typed<T, H> {
    pub(crate) handler: H,
    pub(crate) _t: PhantomData<fn() -> T>,
}

impl<T, H> ErasedHandler for Typed<T, H>
where
    T: DecodePayload,
    H: for<'a> HandlerFn<'a, T>,
{
    fn decode(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError> {
        Ok(Box::new(decode_event::<T>(id, record)?))
    }

    fn is_batch(&self) -> bool {
        false
    }

    fn call<'a>(&'a self, evs: Vec<Box<dyn Any + Send>>, cx: &'a mut Cx) -> BoxFuture<'a, Result<(), HandlerError>> {
        match downcast_all::<T>(evs) {
            Some(mut v) if v.len() == 1 => match v.pop() {
                Some(ev) => Box::pin(self.handler.call(ev, cx)),
                None => Box::pin(async { Err(HandlerError::reject("internal: no event")) }),
            },
            _ => Box::pin(async { Err(HandlerError::reject("internal: event type mismatch")) }),
        }
    }
}

pub(crate) struct TypedBatch<T, H> {
    pub(crate) handler: H,
    pub(crate) _t: PhantomData<fn() -> T>,
}

impl<T, H> ErasedHandler for TypedBatch<T, H>
where
    T: DecodePayload,
    H: for<'a> BatchHandlerFn<'a, T>,
{
    fn decode(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError> {
        Ok(Box::new(decode_event::<T>(id, record)?))
    }

    fn is_batch(&self) -> bool {
        true
    }

    fn call<'a>(&'a self, evs: Vec<Box<dyn Any + Send>>, cx: &'a mut Cx) -> BoxFuture<'a, Result<(), HandlerError>> {
        match downcast_all::<T>(evs) {
            Some(v) => Box::pin(self.handler.call(v, cx)),
            None => Box::pin(async { Err(HandlerError::reject("internal: event type mismatch")) }),
        }
    }
}
