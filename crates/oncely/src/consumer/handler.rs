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
    /// Where `cx.publish` writes.
    pub(crate) publish: PublishTo,
    pub(crate) effects: Vec<crate::store::effects::NewIntent>,
    pub(crate) registry: Arc<crate::effects::Registry>,
    /// The record being handled (per-event handlers), for `traceparent`.
    pub(crate) record: Option<Arc<RawRecord>>,
    /// Set when the handler used something the consumer is not configured
    /// for (an unregistered effect): the consumer stops.
    pub(crate) misconfigured: Option<String>,
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
            // A configuration error, not the event's: retrying or
            // dead-lettering would do the same to every event. The lane
            // rolls the batch back and stops the consumer with this error.
            let msg = format!(
                "effect `{name}` is not registered with consumer {} (register it with effect_executor, or with effect_semantics when another process runs it)",
                self.consumer
            );
            self.misconfigured = Some(msg.clone());
            return Err(HandlerError::retry(msg));
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
            ordering_key: entity.map(|e| crate::effects::ordering_key(name, e)),
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
        self.publish_event(topic, key, &ev).await
    }

    /// [`publish`](Self::publish) of an event built by the caller.
    pub async fn publish_event(
        &mut self,
        topic: &str,
        key: &str,
        event: &crate::outbox::OutgoingEvent,
    ) -> crate::Result<crate::outbox::Enqueued> {
        let shadow = match &self.publish {
            PublishTo::Outbox => None,
            PublishTo::Shadow(suffix) => Some(format!("{topic}{suffix}")),
            PublishTo::Nowhere => {
                // A projection rebuild: the events were published when the live
                // consumer handled these records; publishing them again would be
                // a side effect. Nothing is written (id 0).
                tracing::debug!(
                    consumer = &*self.consumer,
                    topic,
                    ce_id = event.ce_id(),
                    "Publish suppressed (projection rebuild)."
                );
                return Ok(crate::outbox::Enqueued {
                    id: 0,
                    ce_id: event.ce_id().to_owned(),
                    lane: crate::outbox::lane_of(Some(key.as_bytes())),
                });
            }
        };
        // A projection rebuild publishing to shadow topics writes what the
        // fixed code would have published, for validation downstream.
        crate::outbox::enqueue(&mut self.tx, shadow.as_deref().unwrap_or(topic), key, event).await
    }

    /// The suffix [`publish`](Self::publish) adds to every topic (a
    /// projection rebuild publishing to shadow topics,
    /// `.rebuild.<target>`); `None` otherwise.
    pub fn shadow_topic_suffix(&self) -> Option<&str> {
        match &self.publish {
            PublishTo::Shadow(suffix) => Some(suffix),
            _ => None,
        }
    }

    /// Whether [`publish`](Self::publish) is suppressed (a projection
    /// rebuild): it returns without writing to the outbox.
    pub fn is_publish_suppressed(&self) -> bool {
        matches!(self.publish, PublishTo::Nowhere)
    }
}

/// Where [`Cx::publish`] writes: the outbox, nowhere (a projection
/// rebuild), or the outbox under `<topic><suffix>` (a rebuild publishing to
/// shadow topics).
#[derive(Debug, Clone)]
pub(crate) enum PublishTo {
    Outbox,
    Nowhere,
    Shadow(Arc<str>),
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

/// The state a handler takes as its third argument: what was given to
/// [`ConsumerBuilder::state`](super::ConsumerBuilder::state). A handler that
/// takes `State<S>` only compiles on a builder whose state is an `S`, so a
/// forgotten `.state(..)` is a compile error, not a dead letter per event.
///
/// ```
/// # use oncely::{Consumer, Cx, Event, HandlerError, State};
/// struct Gateway { url: String }
/// async fn on_order(ev: Event<serde_json::Value>, cx: &mut Cx, gw: State<Gateway>) -> Result<(), HandlerError> {
///     let _ = (&ev, cx, &gw.url);
///     Ok(())
/// }
/// let _builder = Consumer::builder("billing").state(Gateway { url: "https://gw".into() }).handler(on_order);
/// ```
///
/// Without the state, it does not compile:
///
/// ```compile_fail
/// # use oncely::{Consumer, Cx, Event, HandlerError, State};
/// struct Gateway { url: String }
/// async fn on_order(ev: Event<serde_json::Value>, cx: &mut Cx, gw: State<Gateway>) -> Result<(), HandlerError> {
///     Ok(())
/// }
/// let _builder = Consumer::builder("billing").handler(on_order);
/// ```
#[derive(Debug)]
pub struct State<S>(pub Arc<S>);

impl<S> Clone for State<S> {
    fn clone(&self) -> Self {
        State(self.0.clone())
    }
}

impl<S> std::ops::Deref for State<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

/// A handler function with state: implemented for every
/// `async fn(Event<T>, &mut Cx, State<S>) -> Result<(), HandlerError>`.
pub trait StatefulHandlerFn<'a, T, S>: Send + Sync + 'static {
    /// The handler's future.
    type Fut: Future<Output = Result<(), HandlerError>> + Send + 'a;
    /// Calls the handler.
    fn call(&self, ev: Event<T>, cx: &'a mut Cx, state: State<S>) -> Self::Fut;
}

impl<'a, T, S, F, Fut> StatefulHandlerFn<'a, T, S> for F
where
    F: Fn(Event<T>, &'a mut Cx, State<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'a,
    T: 'a,
{
    type Fut = Fut;
    fn call(&self, ev: Event<T>, cx: &'a mut Cx, state: State<S>) -> Fut {
        (self)(ev, cx, state)
    }
}

/// A batch handler function with state: implemented for every
/// `async fn(Vec<Event<T>>, &mut Cx, State<S>) -> Result<(), HandlerError>`.
pub trait StatefulBatchHandlerFn<'a, T, S>: Send + Sync + 'static {
    /// The handler's future.
    type Fut: Future<Output = Result<(), HandlerError>> + Send + 'a;
    /// Calls the handler.
    fn call(&self, evs: Vec<Event<T>>, cx: &'a mut Cx, state: State<S>) -> Self::Fut;
}

impl<'a, T, S, F, Fut> StatefulBatchHandlerFn<'a, T, S> for F
where
    F: Fn(Vec<Event<T>>, &'a mut Cx, State<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'a,
    T: 'a,
{
    type Fut = Fut;
    fn call(&self, evs: Vec<Event<T>>, cx: &'a mut Cx, state: State<S>) -> Fut {
        (self)(evs, cx, state)
    }
}

/// Marks a handler without state (`async fn(Event<T>, &mut Cx)`).
#[derive(Debug)]
pub enum WithoutState {}
/// Marks a handler with state (`async fn(Event<T>, &mut Cx, State<S>)`).
#[derive(Debug)]
pub enum WithState {}

/// Anything [`ConsumerBuilder::handler`](super::ConsumerBuilder::handler) and
/// [`route`](super::ConsumerBuilder::route) take: an async fn of the event
/// and the context, with or without the builder's state `S`. `M` is a marker
/// the compiler infers.
pub trait IntoHandler<T, S, M>: Sized {
    #[doc(hidden)]
    fn into_erased(self, state: Arc<S>) -> Erased;
}

impl<T, S, H> IntoHandler<T, S, WithoutState> for H
where
    T: DecodePayload,
    H: for<'a> HandlerFn<'a, T>,
{
    fn into_erased(self, _state: Arc<S>) -> Erased {
        Erased(Arc::new(Typed { handler: self, _t: PhantomData }))
    }
}

impl<T, S, H> IntoHandler<T, S, WithState> for H
where
    T: DecodePayload,
    S: Send + Sync + 'static,
    H: for<'a> StatefulHandlerFn<'a, T, S>,
{
    fn into_erased(self, state: Arc<S>) -> Erased {
        Erased(Arc::new(TypedWithState { handler: self, state, _t: PhantomData }))
    }
}

/// Anything [`ConsumerBuilder::batch_handler`](super::ConsumerBuilder::batch_handler)
/// takes: an async fn of the batch's events and the context, with or without
/// the builder's state `S`.
pub trait IntoBatchHandler<T, S, M>: Sized {
    #[doc(hidden)]
    fn into_erased(self, state: Arc<S>) -> Erased;
}

impl<T, S, H> IntoBatchHandler<T, S, WithoutState> for H
where
    T: DecodePayload,
    H: for<'a> BatchHandlerFn<'a, T>,
{
    fn into_erased(self, _state: Arc<S>) -> Erased {
        Erased(Arc::new(TypedBatch { handler: self, _t: PhantomData }))
    }
}

impl<T, S, H> IntoBatchHandler<T, S, WithState> for H
where
    T: DecodePayload,
    S: Send + Sync + 'static,
    H: for<'a> StatefulBatchHandlerFn<'a, T, S>,
{
    fn into_erased(self, state: Arc<S>) -> Erased {
        Erased(Arc::new(TypedBatchWithState { handler: self, state, _t: PhantomData }))
    }
}

/// A decoded record, as the runtime sees it.
pub(crate) enum Decoded {
    /// An event for the handler.
    Event(Box<dyn Any + Send>),
    /// No route takes this CloudEvents type, and the policy is to skip it.
    Unrouted(String),
}

/// A handler as the consumer keeps it (opaque).
#[doc(hidden)]
pub struct Erased(pub(crate) Arc<dyn ErasedHandler>);

impl fmt::Debug for Erased {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Erased(..)")
    }
}

/// The runtime's view of a handler: decode, then call. Type-erased so the
/// runtime is not generic over the event type.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    fn decode_any(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError>;
    /// Decodes a record for the handler (a router may also skip it).
    fn decode(&self, id: EventId, record: Arc<RawRecord>) -> Result<Decoded, DecodeError> {
        self.decode_any(id, record).map(Decoded::Event)
    }
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
    fn decode_any(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError> {
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
    fn decode_any(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError> {
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

pub(crate) struct TypedWithState<T, S, H> {
    handler: H,
    state: Arc<S>,
    _t: PhantomData<fn() -> T>,
}

impl<T, S, H> ErasedHandler for TypedWithState<T, S, H>
where
    T: DecodePayload,
    S: Send + Sync + 'static,
    H: for<'a> StatefulHandlerFn<'a, T, S>,
{
    fn decode_any(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError> {
        Ok(Box::new(decode_event::<T>(id, record)?))
    }

    fn is_batch(&self) -> bool {
        false
    }

    fn call<'a>(&'a self, evs: Vec<Box<dyn Any + Send>>, cx: &'a mut Cx) -> BoxFuture<'a, Result<(), HandlerError>> {
        match downcast_all::<T>(evs) {
            Some(mut v) if v.len() == 1 => match v.pop() {
                Some(ev) => Box::pin(self.handler.call(ev, cx, State(self.state.clone()))),
                None => Box::pin(async { Err(HandlerError::reject("internal: no event")) }),
            },
            _ => Box::pin(async { Err(HandlerError::reject("internal: event type mismatch")) }),
        }
    }
}

pub(crate) struct TypedBatchWithState<T, S, H> {
    handler: H,
    state: Arc<S>,
    _t: PhantomData<fn() -> T>,
}

impl<T, S, H> ErasedHandler for TypedBatchWithState<T, S, H>
where
    T: DecodePayload,
    S: Send + Sync + 'static,
    H: for<'a> StatefulBatchHandlerFn<'a, T, S>,
{
    fn decode_any(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError> {
        Ok(Box::new(decode_event::<T>(id, record)?))
    }

    fn is_batch(&self) -> bool {
        true
    }

    fn call<'a>(&'a self, evs: Vec<Box<dyn Any + Send>>, cx: &'a mut Cx) -> BoxFuture<'a, Result<(), HandlerError>> {
        match downcast_all::<T>(evs) {
            Some(v) => Box::pin(self.handler.call(v, cx, State(self.state.clone()))),
            None => Box::pin(async { Err(HandlerError::reject("internal: event type mismatch")) }),
        }
    }
}

/// What happens to an event whose CloudEvents type no route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Unrouted {
    /// Counted (`oncely_events_total{outcome="unrouted"}`), logged at debug,
    /// and skipped: claimed in the inbox, no handler runs (default: topics
    /// often carry types a consumer does not care about).
    #[default]
    Skip,
    /// Dead-lettered with reason `unrouted-type`.
    DeadLetter,
}

/// Routes events by their CloudEvents type (`ce_type`) to typed handlers.
pub(crate) struct Router {
    pub(crate) routes: std::collections::HashMap<String, Arc<dyn ErasedHandler>>,
    pub(crate) unrouted: Unrouted,
}

/// A routed event: which route, and the event it decoded.
struct RoutedEvent(Arc<dyn ErasedHandler>, Box<dyn Any + Send>);

impl Router {
    pub(crate) fn decode_routed(&self, id: EventId, record: Arc<RawRecord>) -> Result<Decoded, DecodeError> {
        let ty = match record.header(crate::envelope::H_TYPE) {
            Some(Some(t)) => std::str::from_utf8(t).ok().map(str::to_owned),
            _ => None,
        };
        let Some(ty) = ty else {
            return Err(DecodeError::MissingHeader { header: crate::envelope::H_TYPE.into() });
        };
        match self.routes.get(&ty) {
            Some(route) => Ok(Decoded::Event(Box::new(RoutedEvent(route.clone(), route.decode_any(id, record)?)))),
            None => match self.unrouted {
                Unrouted::Skip => Ok(Decoded::Unrouted(ty)),
                Unrouted::DeadLetter => Err(DecodeError::UnroutedType { ty }),
            },
        }
    }
}

impl ErasedHandler for Router {
    fn decode_any(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError> {
        match self.decode_routed(id, record)? {
            Decoded::Event(e) => Ok(e),
            Decoded::Unrouted(ty) => Err(DecodeError::UnroutedType { ty }),
        }
    }

    fn decode(&self, id: EventId, record: Arc<RawRecord>) -> Result<Decoded, DecodeError> {
        self.decode_routed(id, record)
    }

    fn is_batch(&self) -> bool {
        false
    }

    fn call<'a>(
        &'a self,
        mut evs: Vec<Box<dyn Any + Send>>,
        cx: &'a mut Cx,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        match (evs.len(), evs.pop().map(|e| e.downcast::<RoutedEvent>())) {
            (1, Some(Ok(routed))) => {
                let RoutedEvent(route, ev) = *routed;
                Box::pin(async move { route.call(vec![ev], cx).await })
            }
            _ => Box::pin(async { Err(HandlerError::reject("internal: routed event mismatch")) }),
        }
    }
}
