//! The relay while the broker is down: rows wait, nothing is lost, and
//! everything is published once the broker is back. Stops and starts the
//! shared broker, so it is ignored by default and run on its own, serially,
//! at the end of `scripts/test`.

mod outbox_support;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use oncely::outbox;
use oncely_testkit::{self as kit, app::SeqEvent};
use outbox_support::{read_to_end, relay, start, wait_drained, WAIT};
use sqlx::PgPool;

async fn enqueue_round(pool: &PgPool, topic: &str, round: i64, keys: usize, per_key: i64) -> Result<()> {
    for seq in 1..=per_key {
        let mut tx = pool.begin().await?;
        for k in 0..keys {
            let key = format!("key-{k}");
            let ev = SeqEvent { key: key.clone(), seq: round * 1000 + seq };
            outbox::enqueue(&mut tx, topic, &key, ("test.seq", &ev)).await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "restarts the shared broker; run with --ignored --test-threads=1"]
async fn rows_enqueued_while_the_broker_is_down_are_all_published_after_it_restarts() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let topic = kit::unique("outbox-restart");
    kit::create_topic(&topic, 3).await?;

    // Round 1, broker up.
    let waiting = start(relay(&db.pool, &kit::unique("relay-waits")))?;
    enqueue_round(&db.pool, &topic, 1, 10, 5).await?;
    wait_drained(&db.pool, 50).await?;

    // Round 2, broker down, default relay: records never time out, the batch
    // waits for the broker.
    let down = kit::Stopped::stop("kafka")?;
    enqueue_round(&db.pool, &topic, 2, 10, 20).await?;
    assert!(
        kit::count(&db.pool, "SELECT count(*) FROM oncely.outbox WHERE published_at IS NULL").await? > 0,
        "rows wait while the broker is down"
    );
    down.start()?;
    wait_drained(&db.pool, 250).await?;
    waiting.stop().await?;

    // Round 3, broker down, a relay with a short message timeout: its
    // attempts fail and are retried with backoff until the broker is back.
    let name = kit::unique("relay-retries");
    let retrying = start(relay(&db.pool, &name).message_timeout(Duration::from_secs(2)))?;
    let down = kit::Stopped::stop("kafka")?;
    enqueue_round(&db.pool, &topic, 3, 10, 20).await?;
    kit::wait_until(WAIT, "failed attempts while the broker is down", || async {
        Ok(outbox::events::failures_of(&name) > 0)
    })
    .await?;
    let attempts = kit::count(&db.pool, "SELECT coalesce(max(attempts), 0)::bigint FROM oncely.outbox").await?;
    assert!(attempts > 0, "failed attempts are recorded on the rows");
    let s = outbox::status(&db.pool).await?;
    assert!(s.pending > 0 && s.lanes.iter().any(|l| l.last_error.is_some()), "status shows the waiting rows");
    down.start()?;
    wait_drained(&db.pool, 450).await?;
    retrying.stop().await?;

    let rows = outbox_support::outbox_ce_ids(&db.pool).await?;
    let recs = read_to_end(&topic, 3)?;
    let on_topic: HashSet<String> = recs.iter().map(|r| r.ce_id()).collect();
    let missing = rows.iter().filter(|(_, c)| !on_topic.contains(c)).count();
    assert_eq!(missing, 0, "every row is on the topic after the restart");
    assert_eq!(on_topic.len(), rows.len());
    Ok(())
}
