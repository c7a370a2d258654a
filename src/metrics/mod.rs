//! Prometheus metrics, readiness/liveness state and the HTTP endpoint that
//! serves them (`[metrics] listen`: `/metrics`, `/livez`, `/readyz`).
//!
//! Crate choice: [`prometheus_client`], the official Rust client of the
//! Prometheus project. It has no global registry (the worker owns one
//! [`Metrics`] value, tests build their own), label families keyed by typed
//! label sets, lock-free counters and gauges, and it writes the OpenMetrics
//! text format that Prometheus scrapes natively. The alternative (`metrics` +
//! `metrics-exporter-prometheus`) routes every call through a global recorder
//! and key strings, and pulls in an HTTP stack of its own that we would not use.
//!
//! Layout:
//! - [`names`]: every metric name, defined once; `docs/metrics.md` and
//!   `deploy/prometheus-alerts.yml` use the same names;
//! - `labels`: the closed label sets ([`InvalidationKind`], [`RefreshOutcome`],
//!   [`FlushReason`], [`Target`], [`Role`]);
//! - `label_sets`: the label sets of labelled families and the per-table counter cache;
//! - `registry`: [`Metrics`], registration and the update methods the worker calls;
//! - `health`: [`Health`], what `/livez` and `/readyz` answer;
//! - `http`: the endpoint ([`serve`], [`serve_on`], [`bind`]);
//! - [`patterns`]: the pattern lane's metrics.

use std::sync::{Mutex, MutexGuard, PoisonError};

use prometheus_client::registry::{Metric, Registry};

mod health;
mod http;
mod label_sets;
mod labels;
pub mod names;
pub mod patterns;
mod registry;

pub use health::{Health, LIVENESS_STALE_AFTER};
pub use http::{bind, serve, serve_on, ServeError};
pub use labels::{BrokenReason, FlushReason, InvalidationKind, RefreshOutcome, Role, Target};
pub use registry::{Metrics, APPLY_LATENCY_BUCKETS, BATCH_SIZE_BUCKETS, VISIBILITY_WAIT_BUCKETS};

/// Locks a mutex, ignoring poisoning: every critical section here leaves the
/// data consistent (a counter cache, a health field), so a panic elsewhere must
/// not take the metrics endpoint down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `metric` in `r` under `name` with `help` and gives it back: the
/// registry keeps one handle, the caller the other (they share the value).
fn registered<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}
