//! Catch-up subscriptions: read `position > checkpoint` in pages, then wait for the head to move.
//!
//! Never missing an event rests on the appender: positions are assigned under the `ledger_head`
//! row lock and transactions commit in position order, so once position P is visible every
//! position below P is too (ARCHITECTURE.md has the argument).

use std::time::Duration;

use tokio::sync::watch;

use crate::{EventLog, RecordedEvent};

pub struct Subscription {
    log: EventLog,
    after_position: i64,
    batch_size: usize,
    head: watch::Receiver<i64>,
    poll_interval: Duration,
}

impl Subscription {
    pub(crate) fn new(
        log: EventLog,
        after_position: i64,
        batch_size: usize,
        head: watch::Receiver<i64>,
        poll_interval: Duration,
    ) -> Subscription {
        Subscription {
            log,
            after_position,
            batch_size: batch_size.clamp(1, crate::log::READ_LIMIT_MAX),
            head,
            poll_interval,
        }
    }

    /// The position of the last event handed out.
    pub fn position(&self) -> i64 {
        self.after_position
    }

    /// The next events after the last one handed out, waiting until there is at least one.
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>, sqlx::Error> {
        loop {
            self.head.borrow_and_update();
            if let Some(events) = self.try_next_batch().await? {
                return Ok(events);
            }
            // Woken by this process's writer or by NOTIFY from another process; polling covers the rest.
            let _ = tokio::time::timeout(self.poll_interval, self.head.changed()).await;
        }
    }

    /// The next events, or `None` at once when the subscriber is caught up.
    pub async fn try_next_batch(&mut self) -> Result<Option<Vec<RecordedEvent>>, sqlx::Error> {
        let events = self.log.read_all(self.after_position, self.batch_size).await?;
        let Some(last) = events.last() else {
            return Ok(None);
        };
        assert!(
            events.first().expect("not empty").position > self.after_position,
            "the log went backwards"
        );
        self.after_position = last.position;
        Ok(Some(events))
    }
}
