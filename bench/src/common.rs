//! Helpers every benchmark uses: where the services are, topics, statistics.

use anyhow::Result;

/// Kafka bootstrap servers (`ONCELY_KAFKA_BOOTSTRAP`, as `scripts/services env` prints).
pub fn bootstrap() -> String {
    std::env::var("ONCELY_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// PostgreSQL URL (`DATABASE_URL`).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://oncely:oncely@127.0.0.1:5432/oncely".into())
}

/// Creates `topic` with `partitions` partitions, replication 1 (the test broker).
pub async fn create_topic(topic: &str, partitions: i32) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        oncely::kafka::KafkaConnection::new(bootstrap()).client_config()?.create()?;
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics([&t], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// The `p` quantile of sorted values (`None` when empty).
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}

/// CPU time (seconds) spent so far by the processes a benchmark run shares
/// the machine with, read from `/proc` (Linux): this process's waited-for
/// children (the measured variant), every `postgres` process (the
/// postmaster's reaped backends included) and the `java` broker.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    /// This process's reaped children.
    pub children: f64,
    /// PostgreSQL.
    pub postgres: f64,
    /// The Kafka broker.
    pub broker: f64,
}

impl CpuSample {
    /// Now.
    pub fn take() -> CpuSample {
        let mut s = CpuSample::default();
        if let Some(f) = stat_fields("self") {
            s.children = ticks(&f, 14) + ticks(&f, 15);
        }
        let Ok(dir) = std::fs::read_dir("/proc") else { return s };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|p| p.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let Some(f) = stat_fields(pid) else { continue };
            // utime, stime; cutime, cstime count reaped children (backends).
            let own = ticks(&f, 12) + ticks(&f, 13);
            match f.first().map(String::as_str) {
                Some("postgres") => s.postgres += own + ticks(&f, 14) + ticks(&f, 15),
                Some("java") => s.broker += own,
                _ => {}
            }
        }
        s
    }

    /// What was spent between `earlier` and `self`.
    pub fn since(self, earlier: CpuSample) -> CpuSample {
        CpuSample {
            children: self.children - earlier.children,
            postgres: self.postgres - earlier.postgres,
            broker: self.broker - earlier.broker,
        }
    }
}

/// `/proc/<pid>/stat` split around the command name: element 0 is the
/// command (proc(5)'s field 2), then field `n` is element `n - 2` (`utime`,
/// field 14, is element 12; `cutime`, field 16, element 14).
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let mut f = vec![text[open + 1..close].to_owned()];
    f.extend(text[close + 1..].split_whitespace().map(str::to_owned));
    Some(f)
}

fn ticks(f: &[String], i: usize) -> f64 {
    // USER_HZ is 100 on every Linux this runs on (`getconf CLK_TCK`).
    f.get(i).and_then(|v| v.parse::<f64>().ok()).map_or(0.0, |t| t / 100.0)
}
