//! The read cache (`app::cache`): balance rows and key grants served from memory, dropped when the
//! database announces a change, never served while its listener is not listening.

use std::sync::Arc;
use std::time::{Duration, Instant};

use app::cache::ReadCache;
use app::flows::Flows;
use app::handler::{CommandHandler, Metadata, SystemClock};
use domain::{AccountId, Country, Currency};
use ledger::testing::TestDatabase;
use ledger::{EventLog, LogConfig};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;

fn admin() -> Metadata {
    Metadata::actor("admin", "cache-test")
}

async fn flows(pool: &PgPool) -> Flows {
    let log = EventLog::open(pool.clone(), LogConfig::default()).await.unwrap();
    Flows::new(CommandHandler::new(log, Arc::new(SystemClock)))
}

/// Waits (up to 5 s) until `check` holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(5), "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn balance(cache: &ReadCache, pool: &PgPool, account_id: AccountId) -> Decimal {
    cache.account(pool, account_id).await.unwrap().expect("the account's row").balance
}

/// Changes the stored row behind the cache's back (no announcement): a read that still shows
/// the old figure was served from memory.
async fn tamper(pool: &PgPool, account_id: AccountId, balance: Decimal) {
    sqlx::query("UPDATE rm.balances SET balance = $2 WHERE account_id = $1")
        .bind(account_id.0)
        .bind(balance)
        .execute(pool)
        .await
        .unwrap();
}

/// A fresh database with one account opened.
async fn an_account() -> (TestDatabase, Flows, AccountId) {
    let db = TestDatabase::new().await;
    let flows = flows(&db.pool).await;
    let account_id = AccountId::new();
    let country = Country::parse("DE").unwrap();
    flows
        .open_account(account_id, "Ada", "ada@example.com", Currency::EUR, country, &admin())
        .await
        .unwrap();
    (db, flows, account_id)
}

#[tokio::test]
async fn kept_rows_and_grants_are_dropped_by_the_changes_the_database_announces() {
    let (db, flows, account_id) = an_account().await;
    flows.adjust(account_id, dec!(10.00), "credit", &admin()).await.unwrap();
    projections::runner::catch_up_all(&db.pool).await.unwrap();

    // Two processes' caches on one database.
    let here = ReadCache::start(&db.pool);
    let there = ReadCache::start(&db.pool);
    eventually("both listening", || async { here.listening() && there.listening() }).await;

    // Kept: a change made behind the cache's back is not seen.
    assert_eq!(balance(&here, &db.pool, account_id).await, dec!(10.00));
    assert_eq!(balance(&there, &db.pool, account_id).await, dec!(10.00));
    tamper(&db.pool, account_id, dec!(999)).await;
    assert_eq!(balance(&here, &db.pool, account_id).await, dec!(10.00), "served from memory");

    // A command: once the read models are caught up and that is heard, the new figure, at once.
    flows.adjust(account_id, dec!(5.00), "credit", &admin()).await.unwrap();
    let position = projections::runner::catch_up_all(&db.pool).await.unwrap();
    here.caught_up(position).await;
    assert_eq!(balance(&here, &db.pool, account_id).await, dec!(15.00));
    // The other process hears the same announcement.
    there.caught_up(position).await;
    assert_eq!(balance(&there, &db.pool, account_id).await, dec!(15.00));

    // A rebuild's swap replaces every row: everything kept is dropped. (A wrong row kept first,
    // so that the rebuilt one can be told from it.)
    tamper(&db.pool, account_id, dec!(999)).await;
    here.forget_all();
    assert_eq!(balance(&here, &db.pool, account_id).await, dec!(999));
    tamper(&db.pool, account_id, dec!(15.00)).await;
    assert_eq!(balance(&here, &db.pool, account_id).await, dec!(999), "served from memory");
    projections::rebuild::rebuild(&db.pool, std::sync::Arc::new(projections::balances::Balances), |_, _| {})
        .await
        .unwrap();
    eventually("the swap heard", || async {
        balance(&here, &db.pool, account_id).await == dec!(15.00)
    })
    .await;

    // Grants: kept by both; a revocation answers once neither serves the key any more.
    let (_, token) = app::keys::create(&db.pool, app::people::Role::Customer, Some(account_id), "cache test")
        .await
        .unwrap();
    let (key_id, other) = app::keys::create(&db.pool, app::people::Role::Customer, Some(account_id), "kept")
        .await
        .unwrap();
    for cache in [&here, &there] {
        assert!(opens(cache, &db.pool, &token).await && opens(cache, &db.pool, &other).await);
    }
    app::keys::revoke(&db.pool, key_id).await.unwrap().expect("the key");
    here.revoked().await;
    for cache in [&here, &there] {
        assert!(!opens(cache, &db.pool, &other).await, "refused at once");
        assert!(opens(cache, &db.pool, &token).await, "another key stays");
    }
    // A key changed by hand is announced too (the trigger on api_keys).
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE token_sha256 = $1")
        .bind(app::keys::token_hash(&token).to_vec())
        .execute(&db.pool)
        .await
        .unwrap();
    for cache in [&here, &there] {
        eventually("the change heard", || async { !opens(cache, &db.pool, &token).await }).await;
    }
}

async fn opens(cache: &ReadCache, pool: &PgPool, token: &str) -> bool {
    cache.grant(pool, token, app::keys::token_hash(token)).await.unwrap().is_some()
}

#[tokio::test]
async fn nothing_is_served_from_memory_while_the_listener_is_not_listening() {
    let (db, _, account_id) = an_account().await;
    projections::runner::catch_up_all(&db.pool).await.unwrap();
    let cache = ReadCache::start(&db.pool);
    eventually("listening", || async { cache.listening() }).await;
    assert_eq!(balance(&cache, &db.pool, account_id).await, Decimal::ZERO);
    tamper(&db.pool, account_id, dec!(1)).await;
    assert_eq!(balance(&cache, &db.pool, account_id).await, Decimal::ZERO, "served from memory");

    // The listener's connection is cut: what was kept is dropped, the database answers, and
    // nothing is kept until the listener listens again (announcements in between are lost).
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE '%billing_balances%' AND pid <> pg_backend_pid()) t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(cut, 1, "the listener's connection");
    eventually("the loss noticed", || async {
        balance(&cache, &db.pool, account_id).await == dec!(1)
    })
    .await;
    eventually("listening again", || async { cache.listening() }).await;
    let kept = balance(&cache, &db.pool, account_id).await;
    assert_eq!(kept, dec!(1));
    tamper(&db.pool, account_id, dec!(3)).await;
    assert_eq!(balance(&cache, &db.pool, account_id).await, kept, "kept again");

    // A detached cache keeps nothing.
    let detached = ReadCache::detached();
    assert_eq!(balance(&detached, &db.pool, account_id).await, dec!(3));
    tamper(&db.pool, account_id, dec!(4)).await;
    assert_eq!(balance(&detached, &db.pool, account_id).await, dec!(4));
}
