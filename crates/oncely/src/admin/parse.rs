//! Parsing of the operator's values: times (a time zone is required),
//! durations (ISO 8601 `PT1H` or `1h30m`), partition selections
//! (`orders:0,2-4`) and reset files (Kafka's CSV: `topic,partition,offset`).
//!
//! Errors are plain sentences meant for the operator (clap shows them as
//! usage errors).

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};

/// Parses a point in time that names its time zone: RFC 3339
/// (`2026-03-21T02:44:00Z`, `2026-03-21T02:44:00.5+01:00`, a space instead of
/// `T` is accepted) or with a `+0100` style offset. A time without a zone is
/// refused: at 3 AM nobody should have to guess which zone a tool assumes.
pub fn parse_datetime(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%z"] {
        if let Ok(t) = DateTime::<FixedOffset>::parse_from_str(s, f) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d"].iter().any(|f| {
        chrono::NaiveDateTime::parse_from_str(s, f).is_ok() || chrono::NaiveDate::parse_from_str(s, f).is_ok()
    });
    if naive {
        Err(format!(
            "`{s}` has no time zone: add one, e.g. `{s}Z` for UTC or `{s}+01:00` (the zone is required so that \
             nobody has to guess which one a tool assumes)"
        ))
    } else {
        Err(format!("`{s}` is not a time: write RFC 3339 with a zone, e.g. 2026-03-21T02:44:00Z"))
    }
}

/// Parses a duration: ISO 8601 (`PT1H`, `P1DT2H30M`, `PT0.5S`; as Kafka's
/// `--by-duration`) or short units (`90s`, `15m`, `1h30m`, `2d`, `500ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("`{s}` is not a duration: write e.g. PT1H, P1DT2H, 1h30m, 15m or 30s");
    if t.is_empty() {
        return Err(bad());
    }
    let iso = t.starts_with(['P', 'p']);
    let mut rest = if iso { &t[1..] } else { t };
    let mut total = 0f64;
    let mut in_time = !iso;
    let mut any = false;
    while !rest.is_empty() {
        if iso && (rest.starts_with('T') || rest.starts_with('t')) {
            if in_time {
                return Err(bad());
            }
            in_time = true;
            rest = &rest[1..];
            continue;
        }
        let n_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if n_len == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..n_len].parse().map_err(|_| bad())?;
        rest = &rest[n_len..];
        let u_len = rest.find(|c: char| c.is_ascii_digit() || c == '.' || c == 'T' || c == 't').unwrap_or(rest.len());
        let unit = rest[..u_len].to_ascii_lowercase();
        rest = &rest[u_len..];
        let secs = match (iso, in_time, unit.as_str()) {
            (true, false, "w") | (false, _, "w") => 7.0 * 86_400.0,
            (true, false, "d") | (false, _, "d") => 86_400.0,
            (true, true, "h") | (false, _, "h") => 3_600.0,
            (true, true, "m") | (false, _, "m" | "min") => 60.0,
            (true, true, "s") | (false, _, "s") => 1.0,
            (false, _, "ms") => 0.001,
            _ => return Err(bad()),
        };
        total += n * secs;
        any = true;
    }
    if !any || !total.is_finite() || total > 1e12 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

/// A topic and optionally some of its partitions, as `-t` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSelection {
    /// Topic.
    pub topic: String,
    /// The partitions chosen; `None` means all of them.
    pub partitions: Option<Vec<i32>>,
}

/// Parses `orders` (every partition), `orders:0,1,5` or `orders:0-3,7`.
pub fn parse_topic_selection(s: &str) -> Result<TopicSelection, String> {
    let (topic, parts) = match s.split_once(':') {
        Some((t, p)) => (t.trim(), Some(p)),
        None => (s.trim(), None),
    };
    if topic.is_empty() || !topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("`{topic}` is not a valid topic name"));
    }
    let partitions = match parts {
        None => None,
        Some(p) => {
            let mut set = BTreeSet::new();
            for item in p.split(',').map(str::trim) {
                let bad = || format!("`{item}` in `{s}` is not a partition or a range like 0-3");
                match item.split_once('-') {
                    Some((a, b)) => {
                        let (a, b): (i32, i32) =
                            (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                        if a > b || a < 0 {
                            return Err(bad());
                        }
                        set.extend(a..=b);
                    }
                    None => {
                        let n: i32 = item.parse().map_err(|_| bad())?;
                        if n < 0 {
                            return Err(bad());
                        }
                        set.insert(n);
                    }
                }
            }
            Some(set.into_iter().collect())
        }
    };
    Ok(TopicSelection { topic: topic.to_owned(), partitions })
}

/// One line of a reset file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// Parses a reset plan file as Kafka's `kafka-consumer-groups --reset-offsets
/// --export` writes it: `topic,partition,offset` per line, or
/// `group,topic,partition,offset` (then every group must be `group`). Blank
/// lines and lines starting with `#` are ignored.
pub fn parse_offsets_csv(text: &str, group: &str) -> Result<Vec<FileOffset>, String> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let n = i + 1;
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        let (topic, partition, offset) = match cols[..] {
            [t, p, o] => (t, p, o),
            [g, t, p, o] => {
                if g != group {
                    return Err(format!("line {n}: group `{g}` is not the group being reset (`{group}`)"));
                }
                (t, p, o)
            }
            _ => return Err(format!("line {n}: expected topic,partition,offset, got `{line}`")),
        };
        let partition: i32 = partition
            .parse()
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(|| format!("line {n}: `{partition}` is not a partition"))?;
        let offset: i64 =
            offset.parse().ok().filter(|o| *o >= 0).ok_or_else(|| format!("line {n}: `{offset}` is not an offset"))?;
        if topic.is_empty() {
            return Err(format!("line {n}: empty topic"));
        }
        if !seen.insert((topic.to_owned(), partition)) {
            return Err(format!("line {n}: {topic}[{partition}] is listed twice"));
        }
        out.push(FileOffset { topic: topic.to_owned(), partition, offset });
    }
    if out.is_empty() {
        return Err("the file lists no offsets".into());
    }
    Ok(out)
}

/// The plan's new offsets as Kafka's `kafka-consumer-groups --reset-offsets
/// --export` prints them for one group: `topic,partition,offset` per line,
/// every planned partition, sorted; [`parse_offsets_csv`] reads it back. A
/// partition that goes back to no commit cannot be said in that format: an
/// error naming it.
pub fn format_offsets_csv(plan: &crate::admin::plan::Plan) -> Result<String, String> {
    let mut out = String::new();
    for p in &plan.partitions {
        let Some(offset) = p.new else {
            return Err(format!(
                "{}[{}] goes back to no committed offset, which Kafka's CSV cannot say",
                p.topic, p.partition
            ));
        };
        out.push_str(&format!("{},{},{offset}\n", p.topic, p.partition));
    }
    Ok(out)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC (`-` when out of range).
pub fn format_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

/// Formats a duration compactly: `0s`, `45s`, `12m05s`, `3h07m`, `2d04h`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m{:02}s", s / 60, s % 60),
        3_600..=86_399 => format!("{}h{:02}m", s / 3_600, (s % 3_600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3_600),
    }
}

/// Parses bytes written in hex (`00ff41`, optionally `0x00ff41`; case and
/// spaces between pairs do not matter): how an operator names a Kafka key
/// that is not UTF-8.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let t = s.trim();
    let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    let digits: Vec<u8> = t.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() % 2 != 0 {
        return Err(format!("`{s}` is not hex: it has an odd number of digits"));
    }
    digits
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16);
            let lo = (pair[1] as char).to_digit(16);
            match (hi, lo) {
                (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
                _ => Err(format!("`{s}` is not hex: `{}` is not a pair of hex digits", String::from_utf8_lossy(pair))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_parse_with_or_without_prefix() {
        assert_eq!(parse_hex("00ff41").expect("hex"), b"\x00\xffA".to_vec());
        assert_eq!(parse_hex("0xFF 00").expect("hex"), vec![0xff, 0]);
        assert_eq!(parse_hex("").expect("empty"), Vec::<u8>::new());
        assert!(parse_hex("abc").expect_err("odd").contains("odd number"));
        assert!(parse_hex("zz").expect_err("not hex").contains("`zz`"));
    }

    #[test]
    fn datetimes_need_a_zone() {
        let t = parse_datetime("2026-03-21T02:44:00Z").expect("utc");
        assert_eq!(t.timestamp(), 1_774_061_040);
        assert_eq!(parse_datetime("2026-03-21T03:44:00+01:00").expect("offset"), t);
        assert_eq!(parse_datetime("2026-03-21 03:44:00+0100").expect("compact offset"), t);
        assert_eq!(parse_datetime("2026-03-21T02:44:00.250Z").expect("ms").timestamp_millis() % 1000, 250);
        let e = parse_datetime("2026-03-21T02:44:00").expect_err("no zone");
        assert!(e.contains("no time zone"), "{e}");
        assert!(parse_datetime("2026-03-21").expect_err("date").contains("no time zone"));
        assert!(parse_datetime("yesterday").expect_err("junk").contains("not a time"));
    }

    #[test]
    fn durations_iso_and_short() {
        let h = Duration::from_secs(3600);
        assert_eq!(parse_duration("PT1H"), Ok(h));
        assert_eq!(parse_duration("1h"), Ok(h));
        assert_eq!(parse_duration("P1DT2H30M"), Ok(Duration::from_secs(86_400 + 9_000)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("PT0.5S"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        // In ISO, M before T is months: refused rather than guessed.
        for bad in ["", "P", "PT", "P1M", "1x", "h", "-1h", "PT1H2", "P1TT1H"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_selections() {
        assert_eq!(parse_topic_selection("orders"), Ok(TopicSelection { topic: "orders".into(), partitions: None }));
        assert_eq!(
            parse_topic_selection("orders:3,0-2,2"),
            Ok(TopicSelection { topic: "orders".into(), partitions: Some(vec![0, 1, 2, 3]) })
        );
        for bad in ["", ":1", "a b", "t:", "t:x", "t:3-1", "t:-1"] {
            assert!(parse_topic_selection(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reset_files_as_kafka_exports_them() {
        let v = parse_offsets_csv("# plan\norders,0,10\n\norders,1,20\n", "g").expect("csv");
        assert_eq!(v.len(), 2);
        assert_eq!(v[1], FileOffset { topic: "orders".into(), partition: 1, offset: 20 });
        assert_eq!(parse_offsets_csv("g,orders,0,5", "g").expect("with group")[0].offset, 5);
        assert!(parse_offsets_csv("other,orders,0,5", "g").expect_err("group").contains("other"));
        assert!(parse_offsets_csv("orders,0,10\norders,0,11", "g").expect_err("dup").contains("twice"));
        assert!(parse_offsets_csv("orders,0,-1", "g").expect_err("neg").contains("line 1"));
        assert!(parse_offsets_csv("orders,0", "g").is_err());
        assert!(parse_offsets_csv("\n# nothing\n", "g").is_err());
    }

    #[test]
    fn an_exported_plan_reads_back_as_the_same_offsets() {
        use crate::admin::plan::{plan, PartitionState, PlanOptions, Requested};
        let st =
            |t: &str, p, cur| PartitionState { topic: t.into(), partition: p, current: cur, log_start: 0, log_end: 50 };
        let inputs = vec![
            (st("payments", 1, Some(7)), Requested::Current),
            (st("orders", 0, Some(9)), Requested::Offset(3)),
            (st("orders", 2, None), Requested::Current),
        ];
        let p = plan(&inputs, PlanOptions::default()).expect("plan");
        let csv = format_offsets_csv(&p).expect("csv");
        assert_eq!(csv, "orders,0,3\norders,2,50\npayments,1,7\n");
        let back: Vec<(String, i32, i64)> = parse_offsets_csv(&csv, "g")
            .expect("reads back")
            .into_iter()
            .map(|f| (f.topic, f.partition, f.offset))
            .collect();
        assert_eq!(
            back,
            p.changes()
                .into_iter()
                .chain([("payments".to_owned(), 1, 7)])
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        let p = plan(&[(st("orders", 0, Some(9)), Requested::NoCommit)], PlanOptions::default()).expect("plan");
        assert!(format_offsets_csv(&p).expect_err("no commit").contains("orders[0]"));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_ms(1_774_061_040_000), "2026-03-21T02:44:00.000Z");
        assert_eq!(format_duration(Duration::from_secs(0)), "0s");
        assert_eq!(format_duration(Duration::from_secs(725)), "12m05s");
        assert_eq!(format_duration(Duration::from_secs(11_220)), "3h07m");
        assert_eq!(format_duration(Duration::from_secs(187_200)), "2d04h");
    }
}
