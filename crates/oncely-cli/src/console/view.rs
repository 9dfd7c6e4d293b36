//! Turning library values into what a page shows: bytes as escaped text and
//! hex, times, durations, chart data. Templates HTML-escape every value on
//! top of this; nothing here produces markup.

use std::time::Duration;

use chrono::{DateTime, Utc};
use oncely::admin::parse::{format_duration, format_ms};
use oncely::envelope::escape_bytes;

/// The page frame: which environment, who, and the form token.
#[derive(Debug, Clone)]
pub(crate) struct Chrome {
    pub(crate) title: String,
    pub(crate) nav: &'static str,
    pub(crate) env: String,
    pub(crate) protected: bool,
    pub(crate) cluster_id: String,
    pub(crate) bootstrap: String,
    pub(crate) read_only: bool,
    pub(crate) operator: String,
    pub(crate) csrf: String,
}

/// Bytes for a person: escaped text (control characters and bytes that are
/// not UTF-8 as `\u{..}` / `\xNN`, see [`escape_bytes`]), and hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shown {
    /// Escaped text.
    pub(crate) text: String,
    /// Lower-case hex.
    pub(crate) hex: String,
    /// Whether the bytes are UTF-8 without control characters (the text is
    /// then exactly the bytes).
    pub(crate) plain: bool,
    /// Size in bytes.
    pub(crate) len: usize,
}

impl Shown {
    pub(crate) fn of(bytes: &[u8]) -> Self {
        let text = escape_bytes(bytes);
        let plain = std::str::from_utf8(bytes).is_ok_and(|s| s == text);
        Shown { text, hex: oncely::admin::dlq::hex(bytes), plain, len: bytes.len() }
    }

    pub(crate) fn of_opt(bytes: Option<&[u8]>) -> Option<Self> {
        bytes.map(Self::of)
    }
}

/// Escapes text for HTML (the guard's plain pages; templates escape by themselves).
pub(crate) fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON that is safe inside `<script type="application/json">`: `<`, `>`
/// and `&` as unicode escapes, so no value can close the element.
pub(crate) fn script_json(v: &serde_json::Value) -> String {
    serde_json::to_string(v)
        .unwrap_or_else(|_| "null".into())
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

pub(crate) fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(crate) fn time_opt(t: &Option<DateTime<Utc>>) -> String {
    t.as_ref().map_or_else(|| "-".into(), time)
}

pub(crate) fn ms(t: Option<i64>) -> String {
    t.map_or_else(|| "-".into(), format_ms)
}

pub(crate) fn age_ms(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), |m| format_duration(Duration::from_millis(m.max(0) as u64)))
}

pub(crate) fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_shown_escaped_and_in_hex() {
        let s = Shown::of(b"<script>");
        assert_eq!((s.text.as_str(), s.plain, s.len), ("<script>", true, 8), "escaping for HTML is the template's");
        let s = Shown::of(b"a\xff\x00");
        assert_eq!((s.text.as_str(), s.hex.as_str(), s.plain), ("a\\xff\\u{0}", "61ff00", false));
    }

    #[test]
    fn json_cannot_close_its_script_element() {
        let j = script_json(&serde_json::json!({"t": "</script><script>alert(1)</script>&"}));
        assert!(!j.contains('<') && !j.contains('>') && !j.contains('&'), "{j}");
        let back: serde_json::Value = serde_json::from_str(&j).expect("still JSON");
        assert_eq!(back["t"], "</script><script>alert(1)</script>&");
        assert_eq!(escape_html("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }
}
