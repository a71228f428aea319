//! What nearly every request reads, kept in the process: balance rows (`rm.balances`) and the
//! grants of API keys. Both are kept true by PostgreSQL's `NOTIFY`, sent in the transaction that
//! changes them, so every process hears of a change when it commits:
//! - the balances projector names the accounts of each batch it applies to the live read model
//!   with the checkpoint it moved to (`projections::balances::CHANGED_CHANNEL`), and a rebuild's
//!   swap says "everything";
//! - a key's revocation names the key's token hash (`keys::REVOKED_CHANNEL`).
//!
//! Nothing is served from memory unless the listener is connected and has lately heard from the
//! database: it pings itself through the pool (a `NOTIFY` on a channel of its own) every half
//! second, and memory is served only within `HEARD_FOR` of the last ping it heard being sent, so
//! a connection cut silently (a network partition) stops serving memory within that time. When
//! the connection drops, everything kept is dropped and reads go to the database until it
//! listens again.
//!
//! A read that missed loads the row and keeps it only if no change was heard while it loaded
//! (`invalidations` counts them; a change is counted before its entries are dropped, so a load that
//! overlaps a change either sees the counter move or started after the change had committed).
//! Read-your-writes: a command's response first catches the read models up to a position, then
//! waits until this process has heard the balances projector reach it (`caught_up`), so no row
//! older than the command is served afterwards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use domain::AccountId;
use projections::balances::{BalanceRow, Changed};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::keys::{self, Grant};

/// Balance rows kept at most (about 300 bytes each).
pub const BALANCES_KEPT: usize = 20_000;
/// Grants kept at most.
pub const GRANTS_KEPT: usize = 20_000;
/// How long a command's response waits to hear its change before dropping everything kept.
const HEAR_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before listening again after the connection was lost.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// How often the listener pings itself.
const PING_EVERY: Duration = Duration::from_millis(500);
/// How long after a ping heard was sent memory may still be served: everything committed before
/// the ping had been heard when the ping was.
pub const HEARD_FOR: Duration = Duration::from_millis(1_500);

pub struct ReadCache {
    balances: quick_cache::sync::Cache<Uuid, Arc<BalanceRow>>,
    grants: quick_cache::sync::Cache<[u8; 32], Grant>,
    /// Changes heard so far; bumped before the entries they name are dropped.
    invalidations: AtomicU64,
    /// The listener is connected and listening: only then is anything kept or served.
    listening: AtomicBool,
    /// Until when (milliseconds since `started`) memory may be served: the sending time of the
    /// last ping heard, plus `HEARD_FOR`.
    fresh_until: AtomicU64,
    started: Instant,
    /// The balances checkpoint heard last.
    heard: watch::Sender<i64>,
}

impl ReadCache {
    /// A cache over `pool`, its listener started (it stops when the cache is dropped or the pool
    /// closed). Until the listener listens, every read goes to the database.
    pub fn start(pool: &PgPool) -> Arc<ReadCache> {
        let cache = Arc::new(ReadCache::detached());
        tokio::spawn(listen(pool.clone(), Arc::downgrade(&cache)));
        cache
    }

    /// A cache without a listener: it keeps nothing and every read goes to the database.
    pub fn detached() -> ReadCache {
        ReadCache {
            balances: quick_cache::sync::Cache::new(BALANCES_KEPT),
            grants: quick_cache::sync::Cache::new(GRANTS_KEPT),
            invalidations: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            fresh_until: AtomicU64::new(0),
            started: Instant::now(),
            heard: watch::channel(0).0,
        }
    }

    /// Whether reads are served from memory: the listener is connected and has heard a ping
    /// sent less than `HEARD_FOR` ago.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst) && self.now_ms() < self.fresh_until.load(Ordering::SeqCst)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The account's row of `rm.balances` (as `crate::reads::account`).
    pub async fn account(&self, pool: &PgPool, account_id: AccountId) -> sqlx::Result<Option<Arc<BalanceRow>>> {
        if self.listening() {
            if let Some(row) = self.balances.get(&account_id.0) {
                return Ok(Some(row));
            }
        }
        let before = self.invalidations.load(Ordering::SeqCst);
        let row = crate::reads::account(pool, account_id).await?.map(Arc::new);
        if let Some(row) = &row {
            self.keep(&self.balances, account_id.0, row.clone(), before);
        }
        Ok(row)
    }

    /// What `token` (whose `keys::token_hash` is `hash`) opens now (as `keys::grant`).
    pub async fn grant(&self, pool: &PgPool, token: &str, hash: [u8; 32]) -> sqlx::Result<Option<Grant>> {
        if self.listening() {
            if let Some(grant) = self.grants.get(&hash) {
                return Ok(Some(grant));
            }
        }
        let before = self.invalidations.load(Ordering::SeqCst);
        let grant = keys::grant(pool, token).await?;
        if let Some(grant) = grant {
            self.keep(&self.grants, hash, grant, before);
        }
        Ok(grant)
    }

    /// Keeps what a load found, unless a change was heard since it began (`before`) or the
    /// listener is not listening; checked after inserting, so a change heard in between drops it.
    fn keep<K, V>(&self, map: &quick_cache::sync::Cache<K, V>, key: K, value: V, before: u64)
    where
        K: Eq + std::hash::Hash + Clone,
        V: Clone,
    {
        if !self.listening() || self.invalidations.load(Ordering::SeqCst) != before {
            return;
        }
        map.insert(key.clone(), value);
        if !self.listening() || self.invalidations.load(Ordering::SeqCst) != before {
            map.remove(&key);
        }
    }

    /// Drops every kept grant (a key was revoked in this process; the others hear it).
    pub fn forget_grants(&self) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.grants.clear();
    }

    /// Drops everything kept.
    pub fn forget_all(&self) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.balances.clear();
        self.grants.clear();
    }

    /// Waits until this process has heard the balances projector reach `position` (the position
    /// the read models were just caught up to), so that no older row is served from here on. If
    /// it is not heard in time, everything kept is dropped instead.
    pub async fn caught_up(&self, position: i64) {
        if !self.listening() {
            return;
        }
        let mut heard = self.heard.subscribe();
        if tokio::time::timeout(HEAR_TIMEOUT, heard.wait_for(|heard| *heard >= position))
            .await
            .is_err()
        {
            tracing::warn!(
                position,
                "the balances projector's change was not heard in time: the kept rows are dropped"
            );
            self.forget_all();
        }
    }

    fn heard(&self, channel: &str, payload: &str, own_channel: &str) {
        if channel == own_channel {
            // A ping: everything committed before it was sent has been heard.
            if let Ok(sent) = payload.parse::<u64>() {
                self.fresh_until.fetch_max(sent + HEARD_FOR.as_millis() as u64, Ordering::SeqCst);
            }
            return;
        }
        if channel == keys::REVOKED_CHANNEL {
            self.invalidations.fetch_add(1, Ordering::SeqCst);
            match <[u8; 32]>::try_from(hex::decode(payload).unwrap_or_default()) {
                Ok(hash) => {
                    self.grants.remove(&hash);
                }
                Err(_) => self.grants.clear(),
            }
            return;
        }
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        let position = match Changed::parse(payload) {
            Some(Changed {
                position,
                accounts: Some(accounts),
            }) => {
                for account in accounts {
                    self.balances.remove(&account);
                }
                position
            }
            Some(Changed { position, accounts: None }) => {
                self.balances.clear();
                position
            }
            None => {
                tracing::warn!(payload, "a balances change that does not parse: the kept rows are dropped");
                self.balances.clear();
                return;
            }
        };
        self.heard.send_if_modified(|heard| {
            let moved = position > *heard;
            *heard = (*heard).max(position);
            moved
        });
    }

    /// Listening (again): nothing kept from before, and the balances checkpoint as it stands now
    /// (any later move is heard).
    fn listening_from(&self, checkpoint: i64) {
        self.forget_all();
        self.heard.send_if_modified(|heard| {
            let moved = checkpoint > *heard;
            *heard = (*heard).max(checkpoint);
            moved
        });
        self.listening.store(true, Ordering::SeqCst);
    }

    fn deaf(&self) {
        self.listening.store(false, Ordering::SeqCst);
        self.forget_all();
    }
}

/// The listener: connects, listens, reads the balances checkpoint, then hands every notification
/// to the cache; on a lost connection it stops serving from memory and connects again.
async fn listen(pool: PgPool, cache: Weak<ReadCache>) {
    loop {
        if pool.is_closed() {
            return;
        }
        match listen_once(&pool, &cache).await {
            Ok(()) => return,
            Err(error) => {
                let Some(cache) = cache.upgrade() else { return };
                cache.deaf();
                if pool.is_closed() {
                    return;
                }
                tracing::warn!(%error, "the read cache's listener lost its connection; reads go to the database until it listens again");
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// One connection's life; `Ok` when the cache is gone.
async fn listen_once(pool: &PgPool, cache: &Weak<ReadCache>) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    let own_channel = format!("billing_cache_{}", Uuid::new_v4().simple());
    listener
        .listen_all([projections::balances::CHANGED_CHANNEL, keys::REVOKED_CHANNEL, &own_channel])
        .await?;
    let _pinger = AbortOnDrop(tokio::spawn(ping(pool.clone(), cache.clone(), own_channel.clone())));
    let checkpoint: i64 = sqlx::query_scalar("SELECT COALESCE((SELECT position FROM checkpoints WHERE name = 'balances'), 0)")
        .fetch_one(pool)
        .await?;
    match cache.upgrade() {
        Some(cache) => cache.listening_from(checkpoint),
        None => return Ok(()),
    }
    loop {
        let notification = listener.try_recv().await?;
        let Some(cache) = cache.upgrade() else { return Ok(()) };
        match notification {
            Some(notification) => cache.heard(notification.channel(), notification.payload(), &own_channel),
            None => return Err(sqlx::Error::Protocol("the connection was lost".into())),
        }
    }
}

/// Pings the listener through the pool: a `NOTIFY` on its own channel whose payload is when it was
/// sent.
async fn ping(pool: PgPool, cache: Weak<ReadCache>, channel: String) {
    loop {
        let Some(sent) = cache.upgrade().map(|cache| cache.now_ms()) else {
            return;
        };
        let notify = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&channel)
            .bind(sent.to_string())
            .execute(&pool);
        if let Ok(Err(error)) = tokio::time::timeout(PING_EVERY, notify).await {
            tracing::debug!(%error, "the read cache's ping failed");
        }
        tokio::time::sleep(PING_EVERY).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
