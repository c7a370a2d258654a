//! [`Sink`]: the executor the worker runs, one Redis server
//! ([`RedisSink`]) or a Redis Cluster ([`ClusterSink`]), chosen by
//! `[redis] url` or `[redis] cluster`.

use super::apply::ApplySink;
use super::cluster::ClusterSink;
use super::identity::{self, Identity, IdentityCheck};
use super::shared::redis_err;
use super::{ApplyStats, RedisSink, SinkError, SinkOptions, SinkTuning};
use crate::plan::Plan;

/// One Redis server or a Redis Cluster, behind the same calls.
// One per worker, created once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Sink {
    /// `[redis] url`.
    Single(RedisSink),
    /// `[redis] cluster`.
    Cluster(ClusterSink),
}

impl Sink {
    /// Connects to the cluster when `cluster` lists seed URLs, else to the
    /// server of `options.url`.
    pub async fn connect(options: &SinkOptions, cluster: &[String]) -> Result<Self, SinkError> {
        if cluster.is_empty() {
            RedisSink::connect(options).await.map(Sink::Single)
        } else {
            ClusterSink::connect(cluster, options)
                .await
                .map(Sink::Cluster)
        }
    }

    /// Takes what `[worker]` tunes (tombstone hold, pattern passes).
    pub fn tune(&mut self, tuning: &SinkTuning) {
        match self {
            Sink::Single(s) => s.tune(tuning),
            Sink::Cluster(s) => s.tune(tuning),
        }
    }

    /// The Redis URL (or the cluster's seed URLs), passwords masked.
    pub fn target(&self) -> &str {
        match self {
            Sink::Single(s) => s.target(),
            Sink::Cluster(s) => s.target(),
        }
    }
}

// The trait's futures are `Send`: spelled as `async fn` in the impl, the
// compiler checks each body against the trait's `impl Future + Send`.
impl ApplySink for Sink {
    async fn apply(&mut self, plan: &Plan) -> Result<ApplyStats, SinkError> {
        match self {
            Sink::Single(s) => s.apply(plan).await,
            Sink::Cluster(s) => s.apply(plan).await,
        }
    }

    async fn redis_run_id(&self) -> Result<String, SinkError> {
        match self {
            Sink::Single(s) => identity::redis_run_id(&mut s.connection(), s.target()).await,
            Sink::Cluster(s) => s.redis_run_id().await,
        }
    }

    async fn check_identity(
        &self,
        key: &str,
        current: &Identity,
    ) -> Result<IdentityCheck, SinkError> {
        match self {
            Sink::Single(s) => identity::check(&mut s.connection(), s.target(), key, current).await,
            Sink::Cluster(s) => {
                identity::check(&mut s.connection(), s.target(), key, current).await
            }
        }
    }

    async fn store_identity(&self, key: &str, current: &Identity) -> Result<(), SinkError> {
        match self {
            Sink::Single(s) => identity::store(&mut s.connection(), s.target(), key, current).await,
            Sink::Cluster(s) => {
                identity::store(&mut s.connection(), s.target(), key, current).await
            }
        }
    }

    async fn ping(&self) -> Result<(), SinkError> {
        match self {
            Sink::Single(s) => {
                let _: String = redis::cmd("PING")
                    .query_async(&mut s.connection())
                    .await
                    .map_err(redis_err(s.target(), "PING"))?;
                Ok(())
            }
            Sink::Cluster(s) => s.ping().await,
        }
    }

    fn target(&self) -> &str {
        Sink::target(self)
    }
}
