//! The application's counters since start (billing runs, accounts set aside, due work that
//! failed), in Prometheus' text format; `/metrics` serves them after the HTTP counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct Counters {
    billing_runs: AtomicU64,
    billing_run_last_us: AtomicU64,
    billing_run_sum_us: AtomicU64,
    billing_slots_charged: AtomicU64,
    billing_failed_accounts: AtomicU64,
    due_work_failures: AtomicU64,
}

static COUNTERS: Counters = Counters {
    billing_runs: AtomicU64::new(0),
    billing_run_last_us: AtomicU64::new(0),
    billing_run_sum_us: AtomicU64::new(0),
    billing_slots_charged: AtomicU64::new(0),
    billing_failed_accounts: AtomicU64::new(0),
    due_work_failures: AtomicU64::new(0),
};

/// Counts accounts a billing run set aside because charging them failed (the rest were billed).
pub fn record_billing_failures(accounts: u64) {
    COUNTERS.billing_failed_accounts.fetch_add(accounts, Ordering::Relaxed);
}

/// Counts a step of due work (a run, a deletion, an invoice...) that failed or panicked.
pub fn record_due_work_failure() {
    COUNTERS.due_work_failures.fetch_add(1, Ordering::Relaxed);
}

/// Counts one hourly billing run of this process: how long it took and the slots it charged.
pub fn record_billing_run(elapsed: Duration, slots_charged: u64) {
    let us = elapsed.as_micros() as u64;
    COUNTERS.billing_runs.fetch_add(1, Ordering::Relaxed);
    COUNTERS.billing_run_last_us.store(us, Ordering::Relaxed);
    COUNTERS.billing_run_sum_us.fetch_add(us, Ordering::Relaxed);
    COUNTERS.billing_slots_charged.fetch_add(slots_charged, Ordering::Relaxed);
}

/// The counters in Prometheus' text format.
pub fn render() -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# TYPE billing_run_duration_seconds summary\nbilling_run_duration_seconds_sum {}\nbilling_run_duration_seconds_count {}\n",
        COUNTERS.billing_run_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        COUNTERS.billing_runs.load(Ordering::Relaxed)
    ));
    out.push_str(&format!(
        "# TYPE billing_run_last_duration_seconds gauge\nbilling_run_last_duration_seconds {}\n",
        COUNTERS.billing_run_last_us.load(Ordering::Relaxed) as f64 / 1e6
    ));
    out.push_str(&format!(
        "# TYPE billing_slots_charged_total counter\nbilling_slots_charged_total {}\n",
        COUNTERS.billing_slots_charged.load(Ordering::Relaxed)
    ));
    out.push_str(&format!(
        "# TYPE billing_failed_accounts_total counter\nbilling_failed_accounts_total {}\n",
        COUNTERS.billing_failed_accounts.load(Ordering::Relaxed)
    ));
    out.push_str(&format!(
        "# TYPE billing_due_work_failures_total counter\nbilling_due_work_failures_total {}\n",
        COUNTERS.due_work_failures.load(Ordering::Relaxed)
    ));
    out
}
