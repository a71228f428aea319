//! What nearly every request reads, kept in the process: balance rows (`rm.balances`) and the
//! grants of API keys. Both are kept true by PostgreSQL's `NOTIFY`, sent in the transaction that
//! changes them, so every process hears of a change when it commits:
//! - the balances projector names the accounts of each batch it applies to the live read model
//!   with the checkpoint it moved to (`projections::balances::CHANGED_CHANNEL`), and a rebuild's
//!   swap says "everything";
//! - any change to a row of `api_keys` (a revocation) names the key's token hash, from a trigger
//!   (`keys::REVOKED_CHANNEL`), whoever makes it.
//!
//! Nothing is served from memory unless the listener is connected and has lately heard from the
//! database: it pings itself through the pool (a `NOTIFY` on a channel of its own, carrying when
//! it was sent) every half second, and memory is served only within `HEARD_FOR` of the sending of
//! the last ping heard. Notifications arrive in commit order, so a process serving memory has
//! heard every change committed more than `HEARD_FOR` ago: a revocation waits that long before it
//! answers (`revoked`), and then no process serves the key. A connection that stays silent longer
//! (cut without a word) is dropped and listened again. While not listening, everything kept is
//! dropped and reads go to the database. Whatever is kept is also dropped after `KEPT_FOR`, a
//! bound for changes made without an announcement.
//!
//! A read that missed loads the row and keeps it only if no change was heard while it loaded:
//! `invalidations` counts the changes heard, bumped and acted on under the write side of `gate`,
//! and a load keeps its row under the read side only if the count has not moved since it began.
//! Read-your-writes: a command's response first catches the read models up to a position, then
//! waits until this process has heard the balances projector reach it (`caught_up`), so no row
//! older than the command is served afterwards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use domain::AccountId;
use projections::balances::{BalanceRow, Changed};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::keys::{self, Grant};

/// Balance rows kept at most (about 300 bytes each).
pub const BALANCES_KEPT: usize = 20_000;
/// Grants kept at most.
pub const GRANTS_KEPT: usize = 20_000;
/// How long anything is kept at most.
pub const KEPT_FOR: Duration = Duration::from_secs(30);
/// How long a command's response waits to hear its change before dropping everything kept.
const HEAR_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before listening again after the connection was lost.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// How often the listener pings itself.
const PING_EVERY: Duration = Duration::from_millis(500);
/// How long after a ping heard was sent memory may still be served: everything committed before
/// the ping had been heard when the ping was.
pub const HEARD_FOR: Duration = Duration::from_millis(1_500);

/// A kept value and when it was loaded (milliseconds since `ReadCache::started`).
#[derive(Clone)]
struct Kept<V> {
    value: V,
    loaded_ms: u64,
}

pub struct ReadCache {
    balances: quick_cache::sync::Cache<Uuid, Kept<Arc<BalanceRow>>>,
    grants: quick_cache::sync::Cache<[u8; 32], Kept<Grant>>,
    /// Changes heard so far.
    invalidations: AtomicU64,
    /// Taken for writing to count a change and drop what it names, for reading to keep a row:
    /// a row is never kept between a change's count and its drop.
    gate: RwLock<()>,
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
    /// closed; it holds one connection of the pool and uses another twice a second). Until the
    /// listener listens, every read goes to the database.
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
            gate: RwLock::new(()),
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
        if let Some(row) = self.served(&self.balances, &account_id.0) {
            return Ok(Some(row));
        }
        let before = self.invalidations.load(Ordering::SeqCst);
        let loaded_ms = self.now_ms();
        let row = crate::reads::account(pool, account_id).await?.map(Arc::new);
        if let Some(row) = &row {
            self.keep(&self.balances, account_id.0, row.clone(), before, loaded_ms);
        }
        Ok(row)
    }

    /// What `token` (whose `keys::token_hash` is `hash`) opens now (as `keys::grant`).
    pub async fn grant(&self, pool: &PgPool, token: &str, hash: [u8; 32]) -> sqlx::Result<Option<Grant>> {
        if let Some(grant) = self.served(&self.grants, &hash) {
            return Ok(Some(grant));
        }
        let before = self.invalidations.load(Ordering::SeqCst);
        let loaded_ms = self.now_ms();
        let grant = keys::grant(pool, token).await?;
        if let Some(grant) = grant {
            self.keep(&self.grants, hash, grant, before, loaded_ms);
        }
        Ok(grant)
    }

    /// What memory holds for `key`, if it may be served (listening, and loaded within `KEPT_FOR`).
    fn served<K, V>(&self, map: &quick_cache::sync::Cache<K, Kept<V>>, key: &K) -> Option<V>
    where
        K: Eq + std::hash::Hash + Clone,
        V: Clone,
    {
        if !self.listening() {
            return None;
        }
        let kept = map.get(key)?;
        if self.now_ms().saturating_sub(kept.loaded_ms) >= KEPT_FOR.as_millis() as u64 {
            map.remove(key);
            return None;
        }
        Some(kept.value)
    }

    /// Keeps what a load found, unless a change was heard since it began (`before`) or the
    /// listener is not listening.
    fn keep<K, V>(&self, map: &quick_cache::sync::Cache<K, Kept<V>>, key: K, value: V, before: u64, loaded_ms: u64)
    where
        K: Eq + std::hash::Hash + Clone,
        V: Clone,
    {
        let _gate = self.gate.read().expect("the read cache's gate");
        if self.listening() && self.invalidations.load(Ordering::SeqCst) == before {
            map.insert(key, Kept { value, loaded_ms });
        }
    }

    /// Counts a change and drops what it names, with no row kept in between.
    fn invalidate(&self, drop: impl FnOnce(&ReadCache)) {
        let _gate = self.gate.write().expect("the read cache's gate");
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        drop(self);
    }

    /// Drops everything kept.
    pub fn forget_all(&self) {
        self.invalidate(|cache| {
            cache.balances.clear();
            cache.grants.clear();
        });
    }

    /// After a key's revocation committed: drops every grant kept here, then waits `HEARD_FOR`
    /// (and a little), after which every process that serves memory has heard the revocation
    /// (it has heard a ping sent after it committed, and notifications arrive in commit order).
    pub async fn revoked(&self) {
        self.invalidate(|cache| cache.grants.clear());
        tokio::time::sleep(HEARD_FOR + Duration::from_millis(100)).await;
    }

    /// Waits until this process has heard the balances projector reach `position` (the position
    /// the read models were just caught up to), so that no older row is served from here on. If
    /// memory is not being served, or the change is not heard in time, everything kept is
    /// dropped instead.
    pub async fn caught_up(&self, position: i64) {
        if !self.listening() {
            self.forget_all();
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
                let until = sent.saturating_add(HEARD_FOR.as_millis() as u64);
                self.fresh_until.fetch_max(until, Ordering::SeqCst);
            }
            return;
        }
        if channel == keys::REVOKED_CHANNEL {
            self.invalidate(|cache| match <[u8; 32]>::try_from(hex::decode(payload).unwrap_or_default()) {
                Ok(hash) => {
                    cache.grants.remove(&hash);
                }
                Err(_) => cache.grants.clear(),
            });
            return;
        }
        let changed = Changed::parse(payload);
        self.invalidate(|cache| match &changed {
            Some(Changed {
                accounts: Some(accounts), ..
            }) => {
                for account in accounts {
                    cache.balances.remove(account);
                }
            }
            _ => cache.balances.clear(),
        });
        let Some(Changed { position, .. }) = changed else {
            tracing::warn!(payload, "a balances change that does not parse: the kept rows are dropped");
            return;
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
        // A checkpoint can only be lower than one heard before if the database was restored.
        self.heard.send_replace(checkpoint);
        self.listening.store(true, Ordering::SeqCst);
    }

    fn deaf(&self) {
        self.listening.store(false, Ordering::SeqCst);
        self.forget_all();
    }
}

/// The listener: connects, listens, reads the balances checkpoint, then hands every notification
/// to the cache; on a lost or silent connection it stops serving from memory and connects again.
async fn listen(pool: PgPool, cache: Weak<ReadCache>) {
    loop {
        if pool.is_closed() {
            return;
        }
        let result = listen_once(&pool, &cache).await;
        let Some(live) = cache.upgrade() else { return };
        live.deaf();
        match result {
            Ok(()) => return,
            Err(_) if pool.is_closed() => return,
            Err(error) => {
                tracing::warn!(%error, "the read cache's listener lost its connection; reads go to the database until it listens again")
            }
        }
        drop(live);
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
    let checkpoint: i64 = sqlx::query_scalar("SELECT COALESCE((SELECT position FROM checkpoints WHERE name = 'balances'), 0)")
        .fetch_one(pool)
        .await?;
    let listened_ms = match cache.upgrade() {
        Some(cache) => {
            cache.listening_from(checkpoint);
            cache.now_ms()
        }
        None => return Ok(()),
    };
    let silent = Arc::new(Notify::new());
    let _pinger = AbortOnDrop(tokio::spawn(ping(
        pool.clone(),
        cache.clone(),
        own_channel.clone(),
        listened_ms,
        silent.clone(),
    )));
    loop {
        // Only a silent connection's wait is cut short, and that connection is dropped with it.
        let notification = tokio::select! {
            notification = listener.try_recv() => notification?,
            () = silent.notified() => {
                let error = "no ping heard for twice the time memory may be served: the connection is dropped";
                return match cache.upgrade() {
                    Some(_) => Err(sqlx::Error::Protocol(error.into())),
                    None => Ok(()),
                };
            }
        };
        let Some(cache) = cache.upgrade() else { return Ok(()) };
        match notification {
            Some(notification) => cache.heard(notification.channel(), notification.payload(), &own_channel),
            None => return Err(sqlx::Error::Protocol("the connection was lost".into())),
        }
    }
}

/// Pings the listener through the pool (a `NOTIFY` on its own channel whose payload is when it
/// was sent); tells it when nothing has been heard for twice `HEARD_FOR`, or the cache is gone.
async fn ping(pool: PgPool, cache: Weak<ReadCache>, channel: String, listened_ms: u64, silent: Arc<Notify>) {
    loop {
        // Silent: nothing heard for `HEARD_FOR` past the last ping's validity (or since listening).
        let sent = cache.upgrade().and_then(|cache| {
            let heard_until = cache
                .fresh_until
                .load(Ordering::SeqCst)
                .max(listened_ms + HEARD_FOR.as_millis() as u64);
            let now = cache.now_ms();
            (now < heard_until + HEARD_FOR.as_millis() as u64).then_some(now)
        });
        let Some(sent) = sent else {
            silent.notify_one();
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
