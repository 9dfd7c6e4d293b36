//! The inbox in the real database: the key computed in SQL equals the one
//! computed in Rust, the migration to keyed rows keeps every claimed identity,
//! and partition DDL never makes claims queue behind it for long.

use std::time::{Duration, Instant};

use anyhow::Result;
use oncely::envelope::inbox_key;
use oncely::EventId;
use oncely_testkit as kit;

#[tokio::test(flavor = "multi_thread")]
async fn inbox_keys_agree_in_sql_and_rust_and_survive_the_migration() -> Result<()> {
    // The same key on both sides, for bytes of every kind.
    let db = kit::TestDb::new().await?;
    let mut ids: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\0".to_vec(),
        vec![0xff, 0xfe, 0],
        b"/orders#01900000-0000-7000-8000-000000000000".to_vec(),
        b"/orders#01900000-0000-7000-8000-00000000000".to_vec(),
        b"/orders#01900000-0000-4000-8000-000000000000".to_vec(),
        b"x#0190A5B0-ABCD-7EF0-9ABC-0123456789AB".to_vec(),
        [b"\xff#".as_slice(), b"01900000-0000-7000-b000-000000000000"].concat(),
    ];
    for _ in 0..300 {
        let n = fastrand::usize(0..60);
        let mut b: Vec<u8> = (0..n).map(|_| fastrand::u8(..)).collect();
        if fastrand::bool() {
            b.extend_from_slice(uuid::Uuid::now_v7().to_string().as_bytes());
        }
        ids.push(b);
    }
    for id in &ids {
        let sql = oncely::store::inbox::key_in_sql(&db.pool, id).await?;
        assert_eq!(sql, inbox_key(id), "identity {id:?}");
    }

    // A database at migration 5, with identities claimed the old way.
    let old = kit::TestDb::empty().await?;
    oncely::store::migrate_up_to(&old.pool, 5).await?;
    sqlx::query("INSERT INTO oncely.consumers (name, inbox_retention_days) VALUES ('billing', 8)")
        .execute(&old.pool)
        .await?;
    let claimed: Vec<String> = vec![
        format!("/orders#{}", uuid::Uuid::now_v7()),
        format!("/or%23ders#{}", uuid::Uuid::now_v7()),
        "order-42".into(),
        "ünïcode#1".into(),
    ];
    for (i, id) in claimed.iter().enumerate() {
        sqlx::query(
            r#"INSERT INTO oncely.inbox (consumer, event_id, topic, partition, "offset", received_on)
               VALUES ('billing', $1, 't', 0, $2, (now() AT TIME ZONE 'UTC')::date)"#,
        )
        .bind(id)
        .bind(i as i64)
        .execute(&old.pool)
        .await?;
    }
    // A consumer seen only in the inbox gets a number too.
    sqlx::query(
        r#"INSERT INTO oncely.inbox (consumer, event_id, topic, partition, "offset", received_on)
           VALUES ('ghost', 'g-1', 't', 0, 0, (now() AT TIME ZONE 'UTC')::date)"#,
    )
    .execute(&old.pool)
    .await?;
    let applied = oncely::store::migrate(&old.pool).await?;
    assert!(applied.contains(&7), "{applied:?}");
    let billing = oncely::store::consumer_id(&old.pool, "billing").await?.expect("billing has a number");
    let mut conn = old.pool.acquire().await?;
    for id in &claimed {
        let key = EventId::from(id.as_str()).key();
        assert!(oncely::store::inbox::is_claimed(&old.pool, billing, key).await?, "{id} was carried over");
        let again = oncely::store::inbox::claim(&mut conn, billing, &[key]).await?;
        assert!(again.is_empty(), "a copy of {id} claimed before the upgrade is still a duplicate");
    }
    let ghost = oncely::store::consumer_id(&old.pool, "ghost").await?.expect("ghost has a number");
    assert!(oncely::store::inbox::is_claimed(&old.pool, ghost, EventId::from("g-1").key()).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_ddl_gives_up_quickly_behind_a_long_transaction_and_claims_go_on() -> Result<()> {
    let db = kit::TestDb::new().await?;
    let c = oncely::store::register_consumer(&db.pool, "long", 8).await?;
    let today = chrono::Utc::now().date_naive();
    sqlx::query("SELECT oncely.ensure_inbox_days($1, 1)").bind(today - chrono::Days::new(30)).execute(&db.pool).await?;
    // A long handler transaction: it has claimed (ROW EXCLUSIVE on the inbox)
    // and stays open.
    let mut long = db.pool.begin().await?;
    oncely::store::inbox::claim(&mut long, c, &[EventId::from("held-open").key()]).await?;
    let t = Instant::now();
    let trim = oncely::store::trim_inbox(&db.pool);
    // Meanwhile another lane claims: it must not wait for the DDL behind the
    // long transaction for more than the DDL's lock timeout.
    let claim = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut conn = db.pool.acquire().await?;
        let t = Instant::now();
        oncely::store::inbox::claim(&mut conn, c, &[EventId::from("other").key()]).await?;
        anyhow::Ok(t.elapsed())
    };
    let (trimmed, claim_took) = tokio::join!(tokio::time::timeout(Duration::from_secs(30), trim), claim);
    let trimmed = trimmed??;
    let claim_took = claim_took?;
    let day = format!("inbox_d{}", (today - chrono::Days::new(30)).format("%Y%m%d"));
    assert!(!trimmed.dropped.contains(&day), "it could not get its lock: left for the next pass");
    assert!(t.elapsed() < Duration::from_secs(10), "the DDL gave up after {:?}", t.elapsed());
    assert!(claim_took < Duration::from_secs(5), "a claim waited {claim_took:?} behind the DDL");
    long.commit().await?;
    let trimmed = oncely::store::trim_inbox(&db.pool).await?;
    assert!(trimmed.dropped.contains(&day), "dropped once the long transaction ended: {trimmed:?}");
    Ok(())
}
