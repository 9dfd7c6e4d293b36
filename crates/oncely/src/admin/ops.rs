//! Operator actions as typed operations, one shape for all of them:
//! **preview → confirm → execute**.
//!
//! - A [`Preview`] says what will change (the [`Operation`] it carries: the
//!   offsets per partition and in total, the intent and its status, ...),
//!   where (environment, protection, live cluster id) and who asks (an
//!   [`Origin`]). Making one changes nothing, and it can be rendered as it is
//!   (it serializes to JSON), by the CLI or by a web form.
//! - Only [`Preview::confirm`] turns it into a [`Confirmed`]. It checks, here
//!   in the library, the preview's own refusals (an active group, a target
//!   outside the log, ...) and the typed confirmation against the
//!   environment's `protected` flag and the text the operation expects
//!   (`RESET <ENV> <GROUP>`, ...). A refusal is written to the audit log as
//!   `refused` and returned as [`Error::Refused`].
//! - Only a `Confirmed` can [`Confirmed::execute`]. The operation runs its
//!   last checks (recording any refusal), writes the audit record (`started`)
//!   and anything it needs to be undone (a snapshot) **before** it changes
//!   anything, then the outcome (`succeeded`, `failed` with what is known of
//!   the state after, or `refused`).
//!
//! There is no other way to an execution: [`Confirmed`] has no public
//! constructor and the audit [`Trail`] an operation runs with cannot be made
//! outside this module, so executing an unconfirmed preview does not compile:
//!
//! ```compile_fail
//! # async fn run(s: oncely::admin::session::Session, req: oncely::admin::reset::ResetRequest) -> oncely::Result<()> {
//! use oncely::admin::ops::Origin;
//! let preview = s.preview_reset(&req, Origin::cli()).await?;
//! preview.execute(&s).await?; // no such method: confirm first
//! # Ok(()) }
//! ```
//!
//! ```compile_fail
//! # fn f(p: &oncely::admin::ops::Preview<oncely::admin::reset::OffsetChange>) {
//! let c = oncely::admin::ops::Confirmed { preview: p }; // private: only `confirm` makes one
//! # }
//! ```
//!
//! The CLI and a console only render: the CLI asks for the text on its
//! terminal (or takes `--confirm`), a console renders the preview as a form
//! with a field for the text and names its signed-in operator in the
//! [`Origin`]:
//!
//! ```no_run
//! # async fn run(s: oncely::admin::session::Session, req: oncely::admin::reset::ResetRequest) -> oncely::Result<()> {
//! use oncely::admin::audit::Actor;
//! use oncely::admin::ops::Origin;
//!
//! let origin = Origin::new(Actor::named("alice", "10.0.0.7"), "console: POST /offsets/reset");
//! let preview = s.preview_reset(&req, origin).await?;
//! println!("{}", serde_json::to_string(&preview)?); // what the form shows
//! let typed = "RESET prod payments"; // what the operator typed into it
//! let done = preview.confirm(&s, Some(typed)).await?.execute(&s).await?;
//! println!("audit #{}", done.audit_id);
//! # Ok(()) }
//! ```
//!
//! A new action adopts the shape by implementing [`Operation`]: its preview
//! data (serializable), its audit action name and confirmation text, the
//! refusals its preview found, and a `run` that calls [`Trail::start`] before
//! it changes anything.

use std::future::Future;

use serde::{Serialize, Serializer};

use crate::admin::audit::{self, current_command_line, Actor, AuditEntry, AuditOutcome};
use crate::admin::session::Session;
use crate::error::{Error, Result};

/// Who asks for an operator action and through what: recorded in every audit
/// row of the action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// Who.
    pub actor: Actor,
    /// The command line (CLI) or the request (console) it came from.
    pub command_line: String,
}

impl Origin {
    /// The operator at this terminal: the OS user and host, and this
    /// process's command line.
    pub fn cli() -> Self {
        Origin { actor: Actor::current(), command_line: current_command_line() }
    }

    /// An operator named by the caller (a console's signed-in user), with a
    /// description of the request (`console: POST /offsets/reset`).
    pub fn new(actor: Actor, command_line: impl Into<String>) -> Self {
        Origin { actor, command_line: command_line.into() }
    }
}

/// An operator action that can be previewed, confirmed and executed.
///
/// Implementors are the preview data of one action. Their [`run`] is called
/// only by [`Confirmed::execute`], with a [`Trail`] that already holds the
/// audit entry; it must refuse through [`Trail::refuse`], and call
/// [`Trail::start`] before it changes anything.
///
/// [`run`]: Operation::run
pub trait Operation: Sync {
    /// What a done execution returns.
    type Output: Send;

    /// The audit action name (`offsets.reset`, `effects.resolve`, ...).
    fn action(&self) -> &'static str;

    /// The text a protected environment requires typed, e.g.
    /// `RESET <ENV> <GROUP>`.
    fn confirmation_text(&self, environment: &str) -> String;

    /// Why execution would be refused, as the preview found it; empty when
    /// it may go ahead.
    fn refusals(&self) -> &[String];

    /// The action's audit entry: `entry` carries who, where and the action;
    /// the operation adds its group, state before and details.
    fn audit_entry(&self, entry: AuditEntry) -> AuditEntry;

    /// Executes the action (see the trait's documentation).
    fn run<'a>(
        &'a self,
        session: &'a Session,
        trail: &'a mut Trail,
    ) -> impl Future<Output = Result<Self::Output>> + Send + 'a;
}

/// Why a preview may not be confirmed, or `None` when it may: the rule
/// [`Preview::confirm`] applies, pure.
///
/// The preview's own refusals come first, so that nobody types a
/// confirmation for a change that cannot happen. Then the typed text: a
/// protected environment requires exactly `expected`; on any environment a
/// text that was given and differs is refused, because it means the operator
/// believes they are somewhere else (another environment, another group).
pub fn confirmation_refusal(
    environment: &str,
    protected: bool,
    expected: &str,
    refusals: &[String],
    typed: Option<&str>,
) -> Option<String> {
    if !refusals.is_empty() {
        return Some(refusals.join("; "));
    }
    match typed {
        Some(t) if t == expected => None,
        Some(t) => Some(format!("the confirmation must be exactly `{expected}` (got `{t}`)")),
        None if protected => Some(format!(
            "environment `{environment}` is protected: executing requires the typed confirmation `{expected}` \
             (without a terminal, pass --confirm '{expected}')"
        )),
        None => None,
    }
}

/// An operation previewed in one environment: what will change, where, and
/// who asks. Nothing has changed. It reads through to the operation
/// (`preview.plan`, `preview.group`, ...), and serializes as the operation's
/// fields plus `environment`, `protected`, `cluster_id` and `confirmation`
/// (the text required, on a protected environment).
#[derive(Debug, Clone)]
pub struct Preview<O> {
    op: O,
    environment: String,
    protected: bool,
    cluster_id: String,
    confirmation: String,
    origin: Origin,
}

impl<O: Operation> Preview<O> {
    /// Wraps an operation previewed through `session`: the environment, its
    /// protection and the cluster id are the session's.
    pub fn new(session: &Session, op: O, origin: Origin) -> Self {
        let env = session.env();
        Preview {
            confirmation: op.confirmation_text(&env.name),
            op,
            environment: env.name.clone(),
            protected: env.config.protected,
            cluster_id: session.cluster_id().to_owned(),
            origin,
        }
    }

    /// The operation.
    pub fn op(&self) -> &O {
        &self.op
    }

    /// The environment's name.
    pub fn environment(&self) -> &str {
        &self.environment
    }

    /// Whether the environment is protected.
    pub fn protected(&self) -> bool {
        self.protected
    }

    /// The live cluster id the preview was made on.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Who asks.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The text a protected environment requires typed; `None` on an
    /// unprotected one.
    pub fn confirmation(&self) -> Option<&str> {
        self.protected.then_some(self.confirmation.as_str())
    }

    /// What to ask the operator to type before [`confirm`](Preview::confirm):
    /// the confirmation text on a protected environment, unless the preview
    /// is refused anyway (then asking would be pointless).
    pub fn asks_for(&self) -> Option<&str> {
        self.confirmation().filter(|_| self.op.refusals().is_empty())
    }

    /// Why execution would be refused (empty: it would go ahead, after the
    /// confirmation on a protected environment).
    pub fn refusals(&self) -> &[String] {
        self.op.refusals()
    }

    fn entry(&self) -> AuditEntry {
        let base = AuditEntry::new(&self.environment, self.op.action())
            .actor(self.origin.actor.clone())
            .command_line(self.origin.command_line.clone())
            .cluster_id(&self.cluster_id);
        let mut entry = self.op.audit_entry(base);
        if let serde_json::Value::Object(details) = &mut entry.details {
            details.insert("protected".into(), self.protected.into());
        }
        entry
    }

    /// Confirms the preview with what the operator typed (`None`: nothing
    /// was typed, or there was nowhere to type it). Refused, and recorded in
    /// the audit log as `refused`, when the preview has refusals, when the
    /// text does not match (see [`confirmation_refusal`]), or when `session`
    /// is not on the preview's environment and cluster.
    pub async fn confirm(&self, session: &Session, typed: Option<&str>) -> Result<Confirmed<'_, O>> {
        if session.env().name != self.environment || session.cluster_id() != self.cluster_id {
            return Err(Error::Refused(format!(
                "the preview was made in environment `{}` on cluster {}, not in `{}` on cluster {}",
                self.environment,
                self.cluster_id,
                session.env().name,
                session.cluster_id()
            )));
        }
        match confirmation_refusal(&self.environment, self.protected, &self.confirmation, self.refusals(), typed) {
            Some(reason) => Err(record_refusal(session, &self.entry(), reason).await),
            None => Ok(Confirmed { preview: self }),
        }
    }
}

impl<O> std::ops::Deref for Preview<O> {
    type Target = O;

    fn deref(&self) -> &O {
        &self.op
    }
}

impl<O: Serialize> Serialize for Preview<O> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a, O> {
            environment: &'a str,
            protected: bool,
            cluster_id: &'a str,
            confirmation: Option<&'a str>,
            #[serde(flatten)]
            op: &'a O,
        }
        View {
            environment: &self.environment,
            protected: self.protected,
            cluster_id: &self.cluster_id,
            confirmation: self.protected.then_some(self.confirmation.as_str()),
            op: &self.op,
        }
        .serialize(s)
    }
}

/// A preview the operator confirmed: the only thing that can execute.
#[derive(Debug)]
pub struct Confirmed<'p, O> {
    preview: &'p Preview<O>,
}

impl<O: Operation> Confirmed<'_, O> {
    /// The confirmed preview.
    pub fn preview(&self) -> &Preview<O> {
        self.preview
    }

    /// Executes the operation: its last checks (a refusal is recorded), the
    /// audit record before any change, the change, the outcome. An error
    /// after the audit record was written is recorded as the outcome
    /// (`failed`, or `refused` for a refusal) if the operation did not
    /// record one itself.
    pub async fn execute(self, session: &Session) -> Result<O::Output> {
        let p = self.preview;
        if session.env().name != p.environment || session.cluster_id() != p.cluster_id {
            return Err(Error::Refused("the preview was confirmed for another environment or cluster".into()));
        }
        let mut trail = Trail { pool: session.pool().clone(), entry: p.entry(), id: None, finished: false };
        let result = p.op.run(session, &mut trail).await;
        if let (Some(id), false) = (trail.id, trail.finished) {
            let outcome = match &result {
                Ok(_) => AuditOutcome::succeeded(None),
                Err(Error::Refused(reason)) => AuditOutcome::refused(reason.clone()),
                Err(e) => AuditOutcome::failed(e.to_string()),
            };
            if let Err(db) = audit::record_result(session.pool(), id, &outcome).await {
                tracing::warn!(error = %db, audit_id = id, "Could not record the outcome in the audit log.");
            }
        }
        result
    }
}

/// Records a refusal (best effort: the refusal stands even when the
/// database cannot record it) and returns it as the error.
async fn record_refusal(session: &Session, entry: &AuditEntry, reason: String) -> Error {
    if let Err(e) = audit::record_refused(session.pool(), entry, &reason).await {
        tracing::warn!(error = %e, action = %entry.action, "Could not record the refusal in the audit log.");
    }
    Error::Refused(reason)
}

/// The audit trail of one execution, handed to [`Operation::run`]: refusals
/// before the start are `refused` rows, [`start`](Trail::start) writes the
/// `started` row, [`finish`](Trail::finish) its outcome. Only
/// [`Confirmed::execute`] makes one.
#[derive(Debug)]
pub struct Trail {
    pool: sqlx::PgPool,
    entry: AuditEntry,
    id: Option<i64>,
    finished: bool,
}

impl Trail {
    /// The entry that is (or will be) recorded; an operation may add to its
    /// details before [`start`](Trail::start).
    pub fn entry_mut(&mut self) -> &mut AuditEntry {
        &mut self.entry
    }

    /// The audit id, once started.
    pub fn audit_id(&self) -> Option<i64> {
        self.id
    }

    /// Refuses the execution for `reason`, recorded: a `refused` row before
    /// the start, the started row's outcome after it. Returns the error to
    /// return.
    pub async fn refuse(&mut self, reason: impl Into<String>) -> Error {
        let reason = reason.into();
        let recorded = match self.id {
            None => audit::record_refused(&self.pool, &self.entry, &reason).await.map(|_| ()),
            Some(id) => {
                self.finished = true;
                audit::record_result(&self.pool, id, &AuditOutcome::refused(reason.clone())).await
            }
        };
        if let Err(e) = recorded {
            tracing::warn!(error = %e, action = %self.entry.action, "Could not record the refusal in the audit log.");
        }
        Error::Refused(reason)
    }

    /// Writes the audit record (`started`) and returns its id. Nothing may
    /// change before this returns: if it fails, nothing is done.
    pub async fn start(&mut self) -> Result<i64> {
        if let Some(id) = self.id {
            return Ok(id);
        }
        let id = audit::record_start(&self.pool, &self.entry).await?;
        self.id = Some(id);
        Ok(id)
    }

    /// Records the outcome of the started execution.
    pub async fn finish(&mut self, outcome: &AuditOutcome) -> Result<()> {
        let id = self.id.ok_or_else(|| {
            Error::Config(format!("{}: an outcome without a started audit record", self.entry.action))
        })?;
        self.finished = true;
        audit::record_result(&self.pool, id, outcome).await
    }

    /// Records the outcome, logging (not returning) a database failure: for
    /// paths that already return another error.
    pub async fn finish_quietly(&mut self, outcome: &AuditOutcome) {
        if let Err(e) = self.finish(outcome).await {
            tracing::warn!(error = %e, audit_id = ?self.id, "Could not record the outcome in the audit log.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPECTED: &str = "RESET prod payments";

    fn rule(protected: bool, refusals: &[&str], typed: Option<&str>) -> Option<String> {
        let refusals: Vec<String> = refusals.iter().map(|r| (*r).to_owned()).collect();
        confirmation_refusal("prod", protected, EXPECTED, &refusals, typed)
    }

    #[test]
    fn a_protected_environment_requires_the_exact_text() {
        assert_eq!(rule(true, &[], Some(EXPECTED)), None);
        let r = rule(true, &[], None).expect("refused without a confirmation");
        assert!(r.contains("`prod` is protected") && r.contains(EXPECTED) && r.contains("--confirm"), "{r}");
        for wrong in ["RESET staging payments", "RESET prod payments ", "reset prod payments", "", "RESET prod"] {
            let r = rule(true, &[], Some(wrong)).expect("a wrong text is refused");
            assert!(r.contains(&format!("exactly `{EXPECTED}`")) && r.contains(&format!("(got `{wrong}`)")), "{r}");
        }
    }

    #[test]
    fn an_unprotected_environment_needs_no_text_but_refuses_a_wrong_one() {
        assert_eq!(rule(false, &[], None), None);
        assert_eq!(rule(false, &[], Some(EXPECTED)), None);
        // Typed for another environment: the operator is not where they think.
        assert!(rule(false, &[], Some("RESET staging payments")).is_some());
    }

    #[test]
    fn the_previews_refusals_come_before_the_text() {
        let r = rule(true, &["group g is active", "too many"], Some(EXPECTED)).expect("refused");
        assert_eq!(r, "group g is active; too many");
        assert_eq!(rule(false, &["group g is active"], None).as_deref(), Some("group g is active"));
        assert_eq!(rule(true, &["x"], None).as_deref(), Some("x"), "no text asked for a refused change");
    }

    /// An operation that only previews.
    #[derive(Debug, Serialize)]
    struct Noop {
        group: String,
        refusals: Vec<String>,
    }

    impl Operation for Noop {
        type Output = ();

        fn action(&self) -> &'static str {
            "test.noop"
        }

        fn confirmation_text(&self, environment: &str) -> String {
            format!("NOOP {environment} {}", self.group)
        }

        fn refusals(&self) -> &[String] {
            &self.refusals
        }

        fn audit_entry(&self, entry: AuditEntry) -> AuditEntry {
            entry.group(&self.group)
        }

        async fn run(&self, _: &Session, _: &mut Trail) -> Result<()> {
            Err(Error::Refused("a test operation does not run".into()))
        }
    }

    fn preview(protected: bool, refusals: &[&str]) -> Preview<Noop> {
        let op = Noop { group: "payments".into(), refusals: refusals.iter().map(|r| (*r).to_owned()).collect() };
        Preview {
            confirmation: op.confirmation_text("prod"),
            op,
            environment: "prod".into(),
            protected,
            cluster_id: "C".into(),
            origin: Origin::new(Actor::named("alice", "10.0.0.7"), "console: POST /noop"),
        }
    }

    #[test]
    fn a_preview_asks_for_the_text_only_where_it_would_be_checked() {
        assert_eq!(preview(true, &[]).asks_for(), Some("NOOP prod payments"));
        assert_eq!(preview(true, &["group payments is active"]).asks_for(), None, "refused anyway");
        assert_eq!(preview(true, &["x"]).confirmation(), Some("NOOP prod payments"));
        assert_eq!(preview(false, &[]).asks_for(), None);
        assert_eq!(preview(false, &[]).confirmation(), None);
    }

    #[test]
    fn a_preview_renders_as_its_operation_with_where_it_was_made() {
        let v = serde_json::to_value(preview(true, &["x"])).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "environment": "prod", "protected": true, "cluster_id": "C",
                "confirmation": "NOOP prod payments", "group": "payments", "refusals": ["x"],
            })
        );
        assert_eq!(serde_json::to_value(preview(false, &[])).expect("json")["confirmation"], serde_json::Value::Null);
    }

    #[test]
    fn the_audit_entry_names_who_asked_where_and_the_protection() {
        let e = preview(true, &[]).entry();
        assert_eq!((e.actor.os_user.as_str(), e.actor.host.as_str()), ("alice", "10.0.0.7"));
        assert_eq!(e.command_line, "console: POST /noop");
        assert_eq!(
            (e.environment.as_str(), e.cluster_id.as_deref(), e.group.as_deref()),
            ("prod", Some("C"), Some("payments"))
        );
        assert_eq!(e.action, "test.noop");
        assert_eq!(e.details["protected"], true);
    }

    #[test]
    fn the_cli_origin_names_the_os_user_and_the_command_line() {
        let o = Origin::cli();
        assert!(!o.actor.os_user.is_empty() && !o.actor.host.is_empty());
        assert!(!o.command_line.is_empty());
        let o = Origin::new(Actor::named("alice", "10.0.0.7"), "console: POST /offsets/undo");
        assert_eq!(o.actor.os_user, "alice");
    }
}
