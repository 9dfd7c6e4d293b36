//! The console's web safety: who may ask, and that a change is asked for on
//! purpose, from a page of this console.
//!
//! - **Sign-in.** With `--users`, every request needs HTTP Basic
//!   (`name:secret`) or `Authorization: Bearer <secret>`; the name is the
//!   operator in the audit log. Without it (loopback only), the operator is
//!   the OS user who started the console.
//! - **Host check** (without sign-in): the `Host` header must name the
//!   loopback address the console listens on, so that a web page whose
//!   domain an attacker points at 127.0.0.1 (DNS rebinding) cannot read the
//!   console as its own origin.
//! - **POST only changes, with a CSRF token.** Every request that is not a
//!   GET or HEAD must be a POST whose form carries `csrf`, a random token of
//!   this process that only the console's own pages contain; a request from
//!   another site is also refused on its `Origin` / `Sec-Fetch-Site`
//!   headers. A read-only console refuses every POST, and every POST first
//!   checks the live cluster id again (the console runs for hours; the
//!   bootstrap address may lead elsewhere by now).
//! - **Headers**: a Content-Security-Policy that runs only the console's own
//!   scripts (no inline script, even if a value were ever rendered raw), no
//!   framing, no caching, no referrer to other sites (`same-origin`: with `no-referrer`
//!   browsers send `Origin: null`, which the CSRF check refuses).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use super::Console;

/// Forms are small: a larger body is refused before it is read whole.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Operators who may sign in, by name.
#[derive(Clone)]
pub(crate) struct Users {
    secrets: BTreeMap<String, String>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("Users").field("names", &self.secrets.keys().collect::<Vec<_>>()).finish()
    }
}

impl Users {
    /// Reads `name:secret` lines (blank lines and `#` comments skipped).
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).map_err(|e| crate::common::refused(format!("{}: {e}", path.display())))
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut secrets = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, secret)) = line.split_once(':') else {
                return Err(format!("line {}: expected `name:secret`", n + 1));
            };
            let (name, secret) = (name.trim(), secret.trim());
            if name.is_empty() || secret.len() < 12 {
                return Err(format!("line {}: a name and a secret of at least 12 characters are required", n + 1));
            }
            if secrets.insert(name.to_owned(), secret.to_owned()).is_some() {
                return Err(format!("line {}: {name} is listed twice", n + 1));
            }
        }
        if secrets.is_empty() {
            return Err("no operators listed".into());
        }
        Ok(Users { secrets })
    }

    /// The operator these credentials sign in, if any.
    fn check(&self, headers: &HeaderMap) -> Option<String> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        if let Some(b64) = value.strip_prefix("Basic ") {
            let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
            let raw = String::from_utf8(raw).ok()?;
            let (name, secret) = raw.split_once(':')?;
            let known = self.secrets.get(name)?;
            return same(known.as_bytes(), secret.as_bytes()).then(|| name.to_owned());
        }
        let token = value.strip_prefix("Bearer ")?.trim();
        // Every secret is compared, so the time taken does not tell which matched.
        let mut who = None;
        for (name, secret) in &self.secrets {
            if same(secret.as_bytes(), token.as_bytes()) {
                who = Some(name.clone());
            }
        }
        who
    }
}

/// Compares in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The guard's settings.
#[derive(Debug)]
pub(crate) struct Guard {
    users: Option<Users>,
    /// `Host` values accepted without sign-in.
    hosts: Vec<String>,
    csrf: String,
    /// Text that must never reach a page (the database URL): replaced in
    /// error messages.
    secrets: Vec<String>,
    /// The OS user who runs the console: the operator without sign-in.
    os_user: String,
}

impl Guard {
    pub(crate) fn new(users: Option<Users>, addr: SocketAddr, secrets: Vec<String>) -> Self {
        let port = addr.port();
        let mut hosts = vec![format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")];
        hosts.push(addr.to_string());
        Guard {
            users,
            hosts,
            // Two v4 UUIDs: 244 random bits from the OS generator.
            csrf: format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple()),
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
            os_user: oncely::admin::audit::Actor::current().os_user,
        }
    }

    /// The token every form of this process carries.
    pub(crate) fn csrf(&self) -> &str {
        &self.csrf
    }

    /// `text` with every secret replaced.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut t = text.to_owned();
        for s in &self.secrets {
            t = t.replace(s.as_str(), "<database url>");
        }
        t
    }
}

/// The signed-in operator and where the request came from, for the audit log.
#[derive(Debug, Clone)]
pub(crate) struct Operator {
    /// Name (sign-in) or the console's OS user.
    pub(crate) name: String,
    /// The client's address.
    pub(crate) host: String,
    /// Whether a name came from a sign-in.
    pub(crate) signed_in: bool,
}

fn refuse(status: StatusCode, msg: &str) -> Response {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>oncely console: refused</title>\
         <body style=\"font-family:sans-serif\"><h1>Refused</h1><p id=\"refusal\">{}</p>",
        super::view::escape_html(msg)
    );
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// Applies the guard to every request (see the module documentation).
pub(crate) async fn check(State(c): State<Arc<Console>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|ci| ci.0.ip().to_string());
    let g = &c.guard;
    let operator = match &g.users {
        Some(users) => match users.check(req.headers()) {
            Some(name) => Operator { name, host: peer.unwrap_or_default(), signed_in: true },
            None => {
                let mut r =
                    refuse(StatusCode::UNAUTHORIZED, "Sign in: this console requires an operator name and secret.");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"oncely console\", charset=\"UTF-8\""),
                );
                return r;
            }
        },
        None => {
            let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            if !g.hosts.iter().any(|h| h == host) {
                return refuse(
                    StatusCode::MISDIRECTED_REQUEST,
                    "This console answers only to its loopback address (the Host header names another).",
                );
            }
            Operator { name: g.os_user.clone(), host: peer.unwrap_or_default(), signed_in: false }
        }
    };
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(operator);
    let req = if parts.method == Method::GET || parts.method == Method::HEAD {
        Request::from_parts(parts, body)
    } else {
        if parts.method != Method::POST {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, "Only GET and POST.");
        }
        if c.read_only {
            return refuse(StatusCode::FORBIDDEN, "This console is read-only (--read-only): it changes nothing.");
        }
        if cross_site(&parts.headers) {
            return refuse(StatusCode::FORBIDDEN, "A change asked for from another site is refused.");
        }
        let bytes = match to_bytes(body, MAX_FORM_BYTES).await {
            Ok(b) => b,
            Err(_) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, "The form is too large."),
        };
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
        let token = fields.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v.as_str()).unwrap_or("");
        if !same(token.as_bytes(), g.csrf.as_bytes()) {
            return refuse(
                StatusCode::FORBIDDEN,
                "The form's CSRF token is missing or stale (the console restarted?): reload the page and try again.",
            );
        }
        // A console runs for hours: the bootstrap address may lead to another
        // cluster by now. Asked again before every change, as `lag --watch`
        // does every round.
        if let Err(e) = c.session.recheck_cluster().await {
            let why = match e {
                oncely::Error::Refused(r) => format!("{r}: this console refuses every change; restart it"),
                other => {
                    format!("the cluster id could not be checked before the change ({other}): nothing was changed")
                }
            };
            return refuse(StatusCode::CONFLICT, &g.scrub(&why));
        }
        Request::from_parts(parts, Body::from(bytes))
    };
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Whether the browser says the request comes from another site.
fn cross_site(h: &HeaderMap) -> bool {
    if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site != "same-origin" && site != "none" {
            return true;
        }
    }
    match (h.get(header::ORIGIN).and_then(|v| v.to_str().ok()), h.get(header::HOST).and_then(|v| v.to_str().ok())) {
        (Some("null"), _) => true,
        (Some(origin), Some(host)) => {
            let o = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            o != host
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_files_need_names_and_long_secrets() {
        let u = Users::parse("# operators\nalice:correct-horse-battery\n\nbob: another-long-secret \n").expect("ok");
        assert_eq!(u.secrets.len(), 2);
        assert!(Users::parse("alice:short").is_err());
        assert!(Users::parse("alice").is_err());
        assert!(Users::parse("a:correct-horse-battery\na:correct-horse-battery2").is_err());
        assert!(Users::parse("# nobody\n").is_err());
        assert!(!format!("{u:?}").contains("horse"), "Debug never shows a secret");
    }

    #[test]
    fn credentials_name_the_operator() {
        let u = Users::parse("alice:correct-horse-battery\nbob:another-long-secret").expect("ok");
        let mut h = HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:correct-horse-battery");
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Basic {basic}")).expect("header"));
        assert_eq!(u.check(&h).as_deref(), Some("alice"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer another-long-secret"));
        assert_eq!(u.check(&h).as_deref(), Some("bob"));
        let wrong = base64::engine::general_purpose::STANDARD.encode("alice:another-long-secret");
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Basic {wrong}")).expect("header"));
        assert_eq!(u.check(&h), None, "bob's secret does not sign alice in");
        assert_eq!(u.check(&HeaderMap::new()), None);
    }

    #[test]
    fn requests_from_another_site_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h));
    }

    #[test]
    fn secrets_are_scrubbed_from_messages() {
        let g = Guard::new(None, "127.0.0.1:1".parse().expect("addr"), vec!["postgres://u:pw@h/db".into()]);
        assert_eq!(g.scrub("cannot reach postgres://u:pw@h/db: refused"), "cannot reach <database url>: refused");
        assert_eq!(g.csrf().len(), 64);
    }
}
