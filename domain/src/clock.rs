//! Time comes from a `Clock`: the system's at the edge, a controllable one in dev mode and tests.

use std::sync::Mutex;

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// An instant at the precision PostgreSQL keeps (microseconds, truncated), so a time decided in
/// memory compares with its stored copy as it did before it was stored.
pub fn stored_precision(instant: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    instant.trunc_subsecs(6)
}

/// A clock that moves only when told, and never backwards.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the clock never goes backwards: it is {now}, asked for {requested}")]
pub struct BackwardsError {
    pub now: DateTime<Utc>,
    pub requested: DateTime<Utc>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Mutex::new(stored_precision(start)),
        }
    }

    pub fn set(&self, instant: DateTime<Utc>) -> Result<DateTime<Utc>, BackwardsError> {
        let instant = stored_precision(instant);
        let mut now = self.now.lock().expect("clock lock");
        if instant < *now {
            return Err(BackwardsError {
                now: *now,
                requested: instant,
            });
        }
        *now = instant;
        Ok(instant)
    }

    pub fn advance(&self, duration: chrono::Duration) -> Result<DateTime<Utc>, BackwardsError> {
        let now = self.now();
        self.set(now + duration)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("clock lock")
    }
}
