//! `oncely console` in a real browser: the built binary serving the pages,
//! headless Chromium driven over WebDriver (chromedriver, both from Debian's
//! packages, installed by `scripts/test`), against the real broker and a
//! fresh database. The guard (sign-in, CSRF, read-only, Host) is tested over
//! plain HTTP. With `ONCELY_SCREENSHOTS=1` the tests leave screenshots of the
//! main pages in `docs/console/` (how the documentation's are made); without
//! it they take them (the page must render) and keep them in the temp dir.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use oncely::kafka::admin::KafkaAdmin;
use oncely_testkit as kit;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::io::AsyncBufReadExt;

const WAIT: Duration = Duration::from_secs(60);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// One test's world: topic, group, database, config file with environments
/// `local` and `prod` (protected).
struct World {
    dir: PathBuf,
    config: PathBuf,
    db: kit::TestDb,
    topic: String,
    group: String,
    admin: KafkaAdmin,
}

impl World {
    async fn new(prefix: &str, partitions: i32) -> Result<Self> {
        kit::init_tracing();
        let topic = kit::unique(prefix);
        let group = kit::unique(&format!("{prefix}-g"));
        kit::create_topic(&topic, partitions).await?;
        let db = kit::TestDb::new().await?;
        let admin = KafkaAdmin::new(kit::connection(), &[])?;
        let cluster_id = admin.describe_cluster().await?.cluster_id;
        let dir = std::env::temp_dir().join(kit::unique("oncely-console-test"));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("oncely.toml");
        let env = |name: &str, protected: bool| {
            format!(
                "[env.{name}]\nbootstrap_servers = \"{}\"\ndatabase_url = \"{}\"\ncluster_id = \"{cluster_id}\"\nprotected = {protected}\n\n",
                kit::bootstrap(),
                db.url
            )
        };
        std::fs::write(&config, format!("default_env = \"local\"\n\n{}{}", env("local", false), env("prod", true)))?;
        Ok(World { dir, config, db, topic, group, admin })
    }

    async fn committed(&self) -> Result<Vec<Option<i64>>> {
        let parts = self.admin.topic_partitions(&self.topic).await?;
        let asked: Vec<(String, i32)> = parts.iter().map(|p| (self.topic.clone(), *p)).collect();
        let got = self.admin.list_consumer_group_offsets(&self.group, Some(&asked)).await?;
        Ok(got.into_iter().map(|o| o.offset).collect())
    }

    /// Commits offsets for the group as a plain client would (no member).
    async fn commit(&self, offsets: &[(i32, i64)]) -> Result<()> {
        let (group, topic, offsets) = (self.group.clone(), self.topic.clone(), offsets.to_vec());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let consumer: BaseConsumer = kit::connection()
                .client_config()?
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for (p, o) in offsets {
                tpl.add_partition_offset(&topic, p, Offset::Offset(o))?;
            }
            consumer.commit(&tpl, CommitMode::Sync)?;
            Ok(())
        })
        .await?
    }

    async fn produce(&self, partition: i32, n: usize) -> Result<()> {
        let producer: FutureProducer = kit::connection().client_config()?.create()?;
        for i in 0..n {
            let payload = format!("record-{i}");
            let rec = FutureRecord::to(&self.topic).partition(partition).key("k").payload(&payload);
            producer.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    /// Runs `oncely --config <ours> ARGS` to completion.
    async fn oncely(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"));
        cmd.arg("--config").arg(&self.config).args(args).stdin(Stdio::null());
        clean_env(&mut cmd);
        cmd.output().await.context("running oncely")
    }

    /// Starts `oncely --config <ours> [--env ENV] console --listen 127.0.0.1:0 EXTRA`.
    async fn console(&self, env: &str, extra: &[&str]) -> Result<ConsoleProc> {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"));
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--env", env, "console", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        clean_env(&mut cmd);
        let mut child = cmd.spawn().context("starting oncely console")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .context("the console did not print its address")??
            .context("the console exited before printing its address")?;
        let url = line.rsplit(' ').next().context("no address")?.trim_end_matches('/').to_owned();
        ensure!(url.starts_with("http://127.0.0.1:"), "unexpected first line: {line}");
        Ok(ConsoleProc { _child: child, url })
    }

    async fn audit_rows(&self, action: &str) -> Result<Vec<(String, String, String)>> {
        Ok(sqlx::query_as("SELECT result, os_user, command_line FROM oncely.audit_log WHERE action = $1 ORDER BY id")
            .bind(action)
            .fetch_all(&self.db.pool)
            .await?)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn clean_env(cmd: &mut tokio::process::Command) {
    for v in [
        "ONCELY_CONFIG",
        "ONCELY_ENV",
        "ONCELY_BOOTSTRAP_SERVERS",
        "ONCELY_DATABASE_URL",
        "ONCELY_CLUSTER_ID",
        "ONCELY_PROTECTED",
        "ONCELY_CONSOLE_USERS",
    ] {
        cmd.env_remove(v);
    }
}

/// A running console (killed when dropped).
struct ConsoleProc {
    _child: tokio::process::Child,
    url: String,
}

/// Headless Chromium behind its own chromedriver (killed when dropped).
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
    profile: PathBuf,
}

impl Browser {
    async fn start() -> Result<Self> {
        for exe in [CHROMIUM, CHROMEDRIVER] {
            if !std::path::Path::new(exe).exists() {
                bail!("{exe} is missing: scripts/test installs chromium and chromium-driver (apt-get)");
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromedriver")?;
        let status = format!("http://127.0.0.1:{port}/status");
        kit::wait_until(WAIT, "chromedriver to answer", || async {
            Ok(reqwest::get(&status).await.map(|r| r.status().is_success()).unwrap_or(false))
        })
        .await?;
        let profile = std::env::temp_dir().join(kit::unique("oncely-chromium"));
        std::fs::create_dir_all(&profile)?;
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }
        });
        let serde_json::Value::Object(caps) = caps else { bail!("capabilities") };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .context("starting a WebDriver session")?;
        Ok(Browser { client, _driver: driver, profile })
    }

    async fn goto(&self, url: &str) -> Result<()> {
        self.client.goto(url).await?;
        Ok(())
    }

    async fn text(&self, css: &str) -> Result<String> {
        Ok(self.client.find(Locator::Css(css)).await.with_context(|| format!("no {css}"))?.text().await?)
    }

    async fn body(&self) -> Result<String> {
        self.text("body").await
    }

    async fn fill(&self, css: &str, value: &str) -> Result<()> {
        let e = self.client.find(Locator::Css(css)).await.with_context(|| format!("no {css}"))?;
        e.clear().await?;
        e.send_keys(value).await?;
        Ok(())
    }

    async fn click(&self, css: &str) -> Result<()> {
        self.client.find(Locator::Css(css)).await.with_context(|| format!("no {css}"))?.click().await?;
        Ok(())
    }

    /// Waits until the page's text contains `what`.
    async fn wait_text(&self, what: &str) -> Result<()> {
        self.wait_text_for(what, WAIT).await
    }

    async fn wait_text_for(&self, what: &str, wait: Duration) -> Result<()> {
        let waited = kit::wait_until(wait, &format!("the page to show `{what}`"), || async {
            Ok(self.body().await.map(|b| b.contains(what)).unwrap_or(false))
        })
        .await;
        if waited.is_err() {
            let url = self.client.current_url().await.map(|u| u.to_string()).unwrap_or_default();
            let body = self.body().await.unwrap_or_default();
            return waited.with_context(|| format!("at {url}, the page shows:\n{body}"));
        }
        waited
    }

    /// Saves a screenshot as `docs/console/<name>.png` (`ONCELY_SCREENSHOTS`
    /// set) or in the temp dir, so a test run leaves the tree clean.
    async fn screenshot(&self, name: &str) -> Result<()> {
        let png = self.client.screenshot().await?;
        let dir = if std::env::var_os("ONCELY_SCREENSHOTS").is_some() {
            kit::repo_root().join("docs/console")
        } else {
            std::env::temp_dir().join("oncely-console-screenshots")
        };
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.png")), png)?;
        Ok(())
    }

    async fn close(self) -> Result<()> {
        let profile = self.profile.clone();
        self.client.close().await?;
        let _ = std::fs::remove_dir_all(profile);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_groups_page_shows_a_rewound_groups_rewind_badge_and_its_history() -> Result<()> {
    let w = World::new("console-rewind", 2).await?;
    w.produce(0, 12).await?;
    w.produce(1, 8).await?;
    w.commit(&[(0, 12), (1, 8)]).await?;
    // `oncely watch` recorded where the group was...
    let out = w.oncely(&["watch", "--once", "-g", &w.group]).await?;
    ensure!(out.status.success(), "{out:?}");
    // ...then someone rewinds it with Kafka's own tool, as in the incident.
    kit::kafka_tool(
        "kafka-consumer-groups",
        &[
            "--bootstrap-server",
            &kit::bootstrap(),
            "--group",
            &w.group,
            "--topic",
            &w.topic,
            "--reset-offsets",
            "--to-earliest",
            "--execute",
        ],
    )?;
    ensure!(w.committed().await? == vec![Some(0), Some(0)], "the tool rewound the group");

    let console = w.console("local", &[]).await?;
    let b = Browser::start().await?;
    b.goto(&console.url).await?;
    // The page fills in as the background round over every group of the
    // (shared, busy) cluster ends: wait for it by the page's own polling.
    b.wait_text_for(&w.group, Duration::from_secs(300)).await?;
    let row = format!("tr[data-group='{}'] .status", w.group);
    assert_eq!(b.text(&row).await?, "REWIND", "the rewound group is flagged");
    assert_eq!(b.text("#groups tbody tr:first-child .status").await?, "REWIND", "the worst groups come first");
    b.screenshot("groups").await?;
    // Filtered by name: just this group.
    b.goto(&format!("{}/?q={}", console.url, w.group)).await?;
    b.wait_text(&w.group).await?;
    let rows = b.client.find_all(Locator::Css("#groups tbody tr")).await?;
    assert_eq!(rows.len(), 1, "the filter keeps only the named group");

    // Its page: partitions, the chart of its history, the trail.
    b.click(&format!("tr[data-group='{}'] a", w.group)).await?;
    b.wait_text("Committed offsets over time").await?;
    assert_eq!(b.text("#group-status").await?, "REWIND");
    let partitions = b.text("#partitions").await?;
    ensure!(partitions.contains(&w.topic), "{partitions}");
    // The chart is drawn by uPlot from the snapshots (a canvas in its container).
    kit::wait_until(WAIT, "the chart to be drawn", || async {
        Ok(b.client.find(Locator::Css("#offset-chart canvas")).await.is_ok())
    })
    .await?;
    b.screenshot("group").await?;
    b.close().await?;
    Ok(())
}

/// Reads the CSRF token and plan of the execute form on the current page.
async fn execute_form(b: &Browser) -> Result<()> {
    b.client.find(Locator::Css("#execute-form")).await.context("no execute form on the preview")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_is_previewed_confirmed_through_the_form_refused_on_a_wrong_text_and_undone_from_the_page() -> Result<()>
{
    let w = World::new("console-reset", 2).await?;
    w.produce(0, 10).await?;
    w.produce(1, 10).await?;
    w.commit(&[(0, 10), (1, 10)]).await?;
    let console = w.console("prod", &[]).await?;
    let b = Browser::start().await?;
    b.goto(&format!("{}/groups/{}", console.url, w.group)).await?;
    b.wait_text("PROTECTED").await?;
    b.client.find(Locator::Css("body.protected")).await.context("a protected environment looks different")?;

    // Bad input: a datetime without its zone. A clear message, nothing changes.
    b.click("#reset-link").await?;
    b.wait_text("Reset offsets of").await?;
    b.client.find(Locator::Css("#target")).await?.select_by_value("datetime").await?;
    b.fill("#value", "2026-03-21T02:44:00").await?;
    b.click("#preview").await?;
    b.wait_text("zone").await?;
    ensure!(b.text("#form-error").await?.contains("zone"), "the message says what is wrong");

    // The preview: shift back by 4 on both partitions.
    b.client.find(Locator::Css("#target")).await?.select_by_value("shift").await?;
    b.fill("#value", "-4").await?;
    b.fill("#topics", &w.topic).await?;
    b.click("#preview").await?;
    b.wait_text("re-delivered").await?;
    assert_eq!(b.text("#total-redelivered").await?, "8");
    execute_form(&b).await?;
    let expected = format!("RESET prod {}", w.group);
    assert_eq!(b.text("#expected-confirmation").await?, expected);
    b.screenshot("reset-preview").await?;

    // A confirmation that does not match: refused, audited, nothing moved.
    b.fill("#confirm", &format!("RESET staging {}", w.group)).await?;
    b.click("#execute").await?;
    b.wait_text("Nothing was changed").await?;
    ensure!(b.text("#form-error").await?.contains(&format!("exactly `{expected}`")));
    assert_eq!(w.committed().await?, vec![Some(10), Some(10)], "a wrong confirmation changes nothing");
    let rows = w.audit_rows("offsets.reset").await?;
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["refused"]);

    // The right one: executed, the offsets moved in Kafka, audited first.
    b.fill("#confirm", &expected).await?;
    b.click("#execute").await?;
    b.wait_text("Executed: audit #").await?;
    assert_eq!(w.committed().await?, vec![Some(6), Some(6)]);
    let rows = w.audit_rows("offsets.reset").await?;
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["refused", "succeeded"]);
    let os_user = oncely::admin::audit::Actor::current().os_user;
    ensure!(rows[1].1 == os_user, "the operator is recorded: {rows:?}");
    ensure!(rows[1].2.starts_with("console: POST /groups/"), "the request is recorded: {rows:?}");
    let audit_id: i64 = b.text("#audit-id").await?.parse()?;
    let snapshot: i64 =
        kit::count(&w.db.pool, &format!("SELECT count(*) FROM oncely.offset_snapshots WHERE audit_id = {audit_id}"))
            .await?;
    assert_eq!(snapshot, 1, "the snapshot undo restores was taken");
    b.screenshot("reset-done").await?;

    // Undo from the result page.
    b.click("#undo-this").await?;
    b.wait_text("Undo the last change").await?;
    b.fill("#confirm", &expected).await?;
    b.click("#execute").await?;
    b.wait_text("Executed: audit #").await?;
    assert_eq!(w.committed().await?, vec![Some(10), Some(10)], "undo restored the offsets");
    let undos = w.audit_rows("offsets.undo").await?;
    assert_eq!(undos.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["succeeded"]);

    // The group's page shows the trail with both changes marked.
    b.goto(&format!("{}/groups/{}", console.url, w.group)).await?;
    b.wait_text("Audit trail").await?;
    let trail = b.text("#audit").await?;
    ensure!(trail.contains("offsets.reset") && trail.contains("offsets.undo"), "{trail}");
    kit::wait_until(WAIT, "the chart to be drawn", || async {
        Ok(b.client.find(Locator::Css("#offset-chart canvas")).await.is_ok())
    })
    .await?;
    let data = b.client.execute("return document.getElementById('chart-data').textContent;", vec![]).await?;
    let data: serde_json::Value = serde_json::from_str(data.as_str().unwrap_or_default())?;
    let kinds: Vec<&str> =
        data["marks"].as_array().map(|m| m.iter().filter_map(|m| m["kind"].as_str()).collect()).unwrap_or_default();
    assert_eq!(kinds, ["reset", "undo"], "both changes are marked on the chart: {data}");
    b.screenshot("group-changes").await?;
    b.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_dry_run_shows_the_records_it_would_send_and_hostile_bytes_render_as_text() -> Result<()> {
    let w = World::new("console-dlq", 1).await?;
    let payload: &[u8] = b"<script>window.__xss = 1</script>\x00\xff";
    let id: i64 = sqlx::query_scalar(
        r#"INSERT INTO oncely.dead_letters
             (consumer, topic, partition, "offset", event_id, key, payload, header_keys, header_values, reason, error, error_class)
           VALUES ('pay', $1, 0, 7, '/s#1', $2, $3, $4, $5, 'rejected', '<b>boom</b>', 'test') RETURNING id"#,
    )
    .bind(&w.topic)
    .bind(&b"k\xfe<i>"[..])
    .bind(payload)
    .bind(vec![b"ce_id".to_vec(), b"bad\xffname<script>".to_vec()])
    .bind(vec![Some(b"1".to_vec()), Some(b"<img src=x onerror=alert(1)>".to_vec())])
    .fetch_one(&w.db.pool)
    .await?;
    let mut others = Vec::new();
    for offset in [8i64, 9] {
        let other: i64 = sqlx::query_scalar(
            r#"INSERT INTO oncely.dead_letters (consumer, topic, partition, "offset", event_id, key, payload, reason, error, error_class)
               VALUES ('pay', $1, 0, $2, $3, 'k2', '{}', 'rejected', 'boom', 'test') RETURNING id"#,
        )
        .bind(&w.topic)
        .bind(offset)
        .bind(format!("/s#{offset}"))
        .fetch_one(&w.db.pool)
        .await?;
        others.push(other);
    }
    let console = w.console("local", &[]).await?;
    let b = Browser::start().await?;

    // Inspect: every byte shown as text, nothing interpreted.
    b.goto(&format!("{}/dlq/{id}", console.url)).await?;
    b.wait_text("Payload").await?;
    assert_eq!(b.text("#payload").await?, "<script>window.__xss = 1</script>\\u{0}\\xff");
    let headers = b.text("#headers").await?;
    ensure!(headers.contains("bad\\xffname<script>"), "the header name is escaped text: {headers}");
    ensure!(headers.contains("<img src=x onerror=alert(1)>"), "{headers}");
    ensure!(b.text("#key").await?.contains("k\\xfe<i>"));
    ensure!(b.text("#error").await?.contains("<b>boom</b>"));
    let ran = b.client.execute("return window.__xss === undefined && document.querySelectorAll('#payload script, #headers img, #key i').length === 0;", vec![]).await?;
    assert_eq!(ran, serde_json::Value::Bool(true), "no script ran, no element was made from the data");
    b.screenshot("dead-letter").await?;

    // The dry run from the list: what would be sent, and nothing sent.
    b.goto(&format!("{}/dlq", console.url)).await?;
    b.wait_text("Dead letters").await?;
    b.click(&format!("#pick-{id}")).await?;
    b.click("#redrive-dry-run").await?;
    b.wait_text("Redrive: dry run").await?;
    let sent = b.text(&format!("tr[data-would-send='{id}']")).await?;
    ensure!(sent.contains(&w.topic) && sent.contains("k\\xfe<i>") && sent.contains("oncely-redrive"), "{sent}");
    ensure!(sent.contains("bad\\xffname<script>"), "the headers it would carry: {sent}");
    let count: i32 = sqlx::query_scalar("SELECT redrive_count FROM oncely.dead_letters WHERE id = $1")
        .bind(id)
        .fetch_one(&w.db.pool)
        .await?;
    assert_eq!(count, 0, "a dry run sends nothing");
    b.screenshot("redrive-dry-run").await?;

    // Executed from the page (unprotected: no text to type).
    b.click("#execute").await?;
    b.wait_text("Redrove 1 dead letter(s)").await?;
    let count: i32 = sqlx::query_scalar("SELECT redrive_count FROM oncely.dead_letters WHERE id = $1")
        .bind(id)
        .fetch_one(&w.db.pool)
        .await?;
    assert_eq!(count, 1);

    // A slow redrive (all three at 0.5/s: 4 s) runs in the console and the
    // page follows it without a reload.
    b.goto(&format!("{}/dlq?all=on", console.url)).await?;
    b.wait_text("Dead letters").await?;
    for i in std::iter::once(id).chain(others.iter().copied()) {
        b.click(&format!("#pick-{i}")).await?;
    }
    b.fill("#rate", "0.5").await?;
    b.click("#redrive-dry-run").await?;
    b.wait_text("Redrive: dry run").await?;
    b.click("#execute").await?;
    b.wait_text("going on at the rate limit").await?;
    b.client.execute("window.__same_page = true;", vec![]).await?;
    b.wait_text("Redrove 3 dead letter(s)").await?;
    let same = b.client.execute("return window.__same_page === true;", vec![]).await?;
    assert_eq!(same, serde_json::Value::Bool(true), "no reload: the page updated itself");
    ensure!(b.text("#job-progress").await?.starts_with("3 of 3"));
    let rows = w.audit_rows("dlq.redrive").await?;
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["succeeded", "succeeded"]);
    b.close().await?;
    Ok(())
}

/// The CSRF token of a page (from its hidden field).
fn csrf_of(html: &str) -> Result<String> {
    let at = html.find("name=\"csrf\" value=\"").context("no csrf field")? + "name=\"csrf\" value=\"".len();
    Ok(html[at..].chars().take_while(|c| *c != '"').collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_guards_every_change() -> Result<()> {
    let w = World::new("console-guard", 1).await?;
    let key = "pay/charge-card//guard#1";
    sqlx::query(
        "INSERT INTO oncely.effects (key, consumer, effect, event_id, payload, semantics, status)
         VALUES ($1, 'pay', 'charge-card', '/guard#1', '{}', 'at_most_once', 'unknown')",
    )
    .bind(key)
    .execute(&w.db.pool)
    .await?;
    let status = || async {
        let s: String = sqlx::query_scalar("SELECT status FROM oncely.effects WHERE key = $1")
            .bind(key)
            .fetch_one(&w.db.pool)
            .await?;
        anyhow::Ok(s)
    };
    let http = reqwest::Client::new();
    let q = serde_urlencoded::to_string([("key", key), ("as", "done"), ("reason", "checked")])?;

    // Elsewhere than loopback only with sign-in.
    let out = w.oncely(&["console", "--listen", "0.0.0.0:0"]).await?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("--users"));

    // Loopback, no sign-in: a POST without the token, or from another site, is refused.
    let c = w.console("local", &[]).await?;
    let page = http.get(format!("{}/effects/resolve?{q}", c.url)).send().await?;
    assert_eq!(page.status(), 200);
    let csp = page.headers().get("content-security-policy").context("CSP")?.to_str()?.to_owned();
    ensure!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = page.text().await?;
    ensure!(!html.contains(&w.db.url) && !html.contains("oncely:oncely@"), "no secret on a page");
    let token = csrf_of(&html)?;
    let form = [("key", key), ("as", "done"), ("reason", "checked")];
    let r = http
        .post(format!("{}/effects/resolve", c.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(form)?)
        .send()
        .await?;
    assert_eq!(r.status(), 403, "no token");
    let mut with_token = form.to_vec();
    with_token.push(("csrf", &token));
    let r = http
        .post(format!("{}/effects/resolve", c.url))
        .header("Origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(&with_token)?)
        .send()
        .await?;
    assert_eq!(r.status(), 403, "from another site");
    // A page whose domain points at 127.0.0.1 (DNS rebinding) is not answered.
    let r = http.get(format!("{}/", c.url)).header("Host", "evil.example").send().await?;
    assert_eq!(r.status(), 421);
    // GET never changes anything.
    let r = http.get(format!("{}/effects/resolve?{q}&csrf={token}", c.url)).send().await?;
    assert_eq!(r.status(), 200);
    assert_eq!(status().await?, "unknown");
    assert!(w.audit_rows("effects.resolve").await?.is_empty(), "nothing was even attempted");

    // Every page renders; bad input is a message; no page shows a secret.
    sqlx::query(
        r#"INSERT INTO oncely.parked (consumer, topic, partition, "offset", entity_key, key, status)
           VALUES ('pay', 'orders', 0, 1, '\xff00'::bytea, '\xff00'::bytea, 'dead'), ('pay', 'orders', 0, 2, '\xff00'::bytea, '\xff00'::bytea, 'held')"#,
    )
    .execute(&w.db.pool)
    .await?;
    // A rebuild 40 records behind its live consumer.
    sqlx::query(
        "INSERT INTO oncely.projection_rebuilds (target, projection, consumer, rebuild_consumer, live_schema, tables, from_spec)
         VALUES ('billing_v2', 'billing', 'pay', 'pay.rebuild.billing_v2', 'public', '{invoices}', 'earliest')",
    )
    .execute(&w.db.pool)
    .await?;
    sqlx::query(
        "INSERT INTO oncely.offsets (consumer, topic, partition, next_offset, epoch)
         VALUES ('pay', 'orders', 0, 100, 0), ('pay.rebuild.billing_v2', 'orders', 0, 60, 0)",
    )
    .execute(&w.db.pool)
    .await?;
    for (path, want, text) in [
        ("/", 200, "Consumer groups"),
        ("/projections", 200, "<td class=\"num\">40</td>"),
        ("/projections", 200, "60.0 % (60 of 100)"),
        ("/snapshots", 200, "Snapshots"),
        ("/dlq", 200, "Dead letters"),
        ("/parked", 200, "key_hex=ff00"),
        ("/parked/release?consumer=pay&key_hex=ff00", 200, "held events"),
        ("/parked/release?consumer=pay&key_hex=00", 200, "REFUSED: no held events for key \\u{0}"),
        ("/parked/release?consumer=pay&key_hex=zz", 400, "is not hex"),
        ("/effects", 200, key),
        ("/outbox", 200, "relays running"),
        ("/audit?since=24h", 200, "Audit log"),
        ("/audit?since=yesterday", 400, "Since:"),
        ("/groups/no-such-group-here", 404, "Unknown group"),
        ("/groups/no-such-group-here/reset/preview?target=offset&value=ten", 400, "is not a whole number"),
        ("/dlq/abc", 400, "is not a dead letter id"),
        ("/nowhere", 404, "no such page"),
    ] {
        let r = http.get(format!("{}{path}", c.url)).send().await?;
        let code = r.status().as_u16();
        let body = r.text().await?;
        ensure!(code == want, "{path}: {code}, not {want}:\n{body}");
        ensure!(body.contains(text), "{path} does not show `{text}`:\n{body}");
        ensure!(!body.contains(&w.db.url) && !body.contains("oncely:oncely@"), "{path} shows a secret");
    }
    drop(c);

    // Read-only: every POST refused, even with the token.
    let c = w.console("local", &["--read-only"]).await?;
    let html = http.get(format!("{}/effects/resolve?{q}", c.url)).send().await?.text().await?;
    ensure!(!html.contains("id=\"execute-form\""), "a read-only console offers no action");
    ensure!(html.contains("READ-ONLY"));
    let r = http
        .post(format!("{}/effects/resolve", c.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(&with_token)?)
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    assert_eq!(status().await?, "unknown");
    drop(c);

    // Sign-in: the name is the operator in the audit record.
    let users = w.dir.join("users");
    std::fs::write(&users, "# console operators\nalice:correct-horse-battery\n")?;
    let users_arg = users.display().to_string();
    let c = w.console("prod", &["--users", &users_arg]).await?;
    let r = http.get(format!("{}/", c.url)).send().await?;
    assert_eq!(r.status(), 401);
    ensure!(r.headers().contains_key("www-authenticate"));
    let r = http.get(format!("{}/", c.url)).basic_auth("alice", Some("wrong-secret-here")).send().await?;
    assert_eq!(r.status(), 401);
    let page = http
        .get(format!("{}/effects/resolve?{q}", c.url))
        .basic_auth("alice", Some("correct-horse-battery"))
        .send()
        .await?;
    assert_eq!(page.status(), 200);
    let token = csrf_of(&page.text().await?)?;
    let expected = format!("RESOLVE prod {key}");
    let post = |confirm: &'static str| {
        let form = vec![
            ("key", key.to_owned()),
            ("as", "done".to_owned()),
            ("reason", "checked".to_owned()),
            ("csrf", token.clone()),
            ("confirm", if confirm.is_empty() { expected.clone() } else { confirm.to_owned() }),
        ];
        let body = serde_urlencoded::to_string(&form).unwrap_or_default();
        http.post(format!("{}/effects/resolve", c.url))
            .basic_auth("alice", Some("correct-horse-battery"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let r = post("RESOLVE staging nope").await?;
    assert_eq!(r.status(), 409, "a wrong confirmation is refused");
    ensure!(r.text().await?.contains("Nothing was changed"));
    assert_eq!(status().await?, "unknown");
    let r = post("").await?;
    assert_eq!(r.status(), 200, "the right one goes ahead");
    assert_eq!(status().await?, "done");
    let rows = w.audit_rows("effects.resolve").await?;
    let got: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    assert_eq!(got, [("refused", "alice"), ("succeeded", "alice")]);
    Ok(())
}
