//! The service config (`cache-invalidator.toml`): raw TOML -> validated
//! [`Config`], every error located (file:line:column) with what is allowed.
//!
//! Unknown fields are errors: a typo must never silently disable an
//! invalidation. The environment overrides the URLs
//! (`CACHE_INVALIDATOR_POSTGRES_URL`, `CACHE_INVALIDATOR_REDIS_URL`); see
//! [`EnvOverrides`]. Secrets never appear in `Debug` output.
//!
//! Why this file is long (~730 lines before its tests): the raw TOML model,
//! the validated model and the validator `V` are one seam each, but every
//! validation message names a raw field's span and builds a validated field,
//! so the three change together with every new setting; the tests (every
//! error message, located) are at the end.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::diag::{Diagnostic, LoadError};

/// A secret (password) whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the connection code only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Values taken from the environment, applied over the file. `Debug` masks
/// the URLs' passwords.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EnvOverrides {
    /// `CACHE_INVALIDATOR_POSTGRES_URL`.
    pub postgres_url: Option<String>,
    /// `CACHE_INVALIDATOR_REDIS_URL`.
    pub redis_url: Option<String>,
}

impl fmt::Debug for EnvOverrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvOverrides")
            .field(
                "postgres_url",
                &self
                    .postgres_url
                    .as_deref()
                    .map(crate::source::conninfo::mask_connection_string),
            )
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(crate::sink::mask_url),
            )
            .finish()
    }
}

impl EnvOverrides {
    /// Reads the process environment (empty values count as unset).
    pub fn from_env() -> EnvOverrides {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        EnvOverrides {
            postgres_url: get("CACHE_INVALIDATOR_POSTGRES_URL"),
            redis_url: get("CACHE_INVALIDATOR_REDIS_URL"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mappings: Option<Spanned<RawMappings>>,
    postgres: Option<Spanned<RawPostgres>>,
    redis: Option<Spanned<RawRedis>>,
    #[serde(default)]
    worker: RawWorker,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawMappings {
    Dir(String),
    Files(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    slot: Option<Spanned<String>>,
    publication: Option<Spanned<String>>,
    #[serde(default)]
    auto_setup: bool,
    visibility_check: Option<bool>,
    replicas: Option<Spanned<Vec<Spanned<String>>>>,
    replica_max_wait_ms: Option<Spanned<u64>>,
    failover_slot: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<Spanned<String>>,
    cluster: Option<Spanned<Vec<String>>>,
    password_file: Option<Spanned<String>>,
    tls_ca_file: Option<Spanned<String>>,
    tls_cert_file: Option<Spanned<String>>,
    tls_key_file: Option<Spanned<String>>,
    tag_prefix: Option<Spanned<String>>,
    version_prefix: Option<Spanned<String>>,
    #[serde(default)]
    wait_replicas: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    max_batch_delay_ms: Option<u64>,
    max_batch_ops: Option<Spanned<u64>>,
    redelete_after_ms: Option<u64>,
    tombstone_ms: Option<Spanned<u64>>,
    max_key_bytes: Option<Spanned<u64>>,
    max_refresh_bytes: Option<Spanned<u64>>,
    pattern_scan_count: Option<Spanned<u64>>,
    pattern_pass_yield: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

/// Where the mapping files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingsSource {
    /// A directory: every `*.toml` in it.
    Dir(PathBuf),
    /// A list of files.
    Files(Vec<PathBuf>),
}

impl MappingsSource {
    /// The mapping files, in load order.
    pub fn files(&self) -> Result<Vec<PathBuf>, LoadError> {
        match self {
            MappingsSource::Dir(d) => crate::map::toml_files_in(d),
            MappingsSource::Files(f) => Ok(f.clone()),
        }
    }

    /// Loads the mappings.
    pub fn load(&self) -> Result<crate::map::Mappings, LoadError> {
        crate::map::Mappings::load_files(&self.files()?)
    }
}

/// `[postgres]`.
/// `[postgres]`. `Debug` masks the URL's password.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// libpq URL (parsed by the source; may hold a password: never log it).
    pub url: String,
    /// From `password_file`, trailing newline trimmed.
    pub password: Option<Secret>,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// `run` does what `setup` does at start.
    pub auto_setup: bool,
    /// Wait until a batch's transactions are visible on the primary before
    /// applying it (default true; off only to measure its cost).
    pub visibility_check: bool,
    /// Read replicas (libpq URLs; `password_file` applies to them too): a
    /// batch waits until each replayed it. May hold passwords: never log.
    pub replicas: Vec<String>,
    /// Longest wait for a replica before a batch is applied anyway (and
    /// applied again once the replica caught up).
    pub replica_max_wait_ms: u64,
    /// Create the slot failover-enabled on PostgreSQL 17+ (default true), so
    /// that it is synchronized to standbys and survives a promotion.
    pub failover_slot: bool,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field(
                "url",
                &crate::source::conninfo::mask_connection_string(&self.url),
            )
            .field("password", &self.password)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("auto_setup", &self.auto_setup)
            .field("visibility_check", &self.visibility_check)
            .field(
                "replicas",
                &self
                    .replicas
                    .iter()
                    .map(|u| crate::source::conninfo::mask_connection_string(u))
                    .collect::<Vec<_>>(),
            )
            .field("replica_max_wait_ms", &self.replica_max_wait_ms)
            .field("failover_slot", &self.failover_slot)
            .finish()
    }
}

/// Where Redis is: `[redis] url` (or `CACHE_INVALIDATOR_REDIS_URL`) or
/// `[redis] cluster`. Every URL was read as the Redis client reads it when
/// the config was loaded. `Debug` masks the passwords.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server.
    Single(String),
    /// A Redis Cluster, through its seed URLs (at least one).
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// The URL of one connection: the server's, or the cluster's first seed
    /// (the node the start-up checks ask).
    pub fn url(&self) -> &str {
        match self {
            RedisTarget::Single(url) => url,
            RedisTarget::Cluster(seeds) => seeds.first().map(String::as_str).unwrap_or_default(),
        }
    }

    /// The cluster's seed URLs, none for one server: what `sink::Sink::connect` takes.
    pub fn seeds(&self) -> &[String] {
        match self {
            RedisTarget::Single(_) => &[],
            RedisTarget::Cluster(seeds) => seeds,
        }
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisTarget::Single(url) => f
                .debug_tuple("Single")
                .field(&crate::sink::mask_url(url))
                .finish(),
            RedisTarget::Cluster(seeds) => f
                .debug_tuple("Cluster")
                .field(
                    &seeds
                        .iter()
                        .map(|u| crate::sink::mask_url(u))
                        .collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
}

/// `[redis]`. `Debug` masks the URLs' passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `url` or `cluster`.
    pub target: RedisTarget,
    /// From `password_file`, trailing newline trimmed.
    pub password: Option<Secret>,
    /// Prefix of tag set keys.
    pub tag_prefix: String,
    /// Prefix of version keys.
    pub version_prefix: String,
    /// Replicas to WAIT for before acknowledging.
    pub wait_replicas: u32,
    /// `tls_ca_file`, `tls_cert_file`, `tls_key_file` (for `rediss://`),
    /// resolved against the config file's directory.
    pub tls: crate::sink::RedisTls,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("target", &self.target)
            .field("password", &self.password)
            .field("tag_prefix", &self.tag_prefix)
            .field("version_prefix", &self.version_prefix)
            .field("wait_replicas", &self.wait_replicas)
            .field("tls", &self.tls)
            .finish()
    }
}

/// `[worker]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Upper bound a committed change waits for batching.
    pub max_batch_delay_ms: u64,
    /// Operations per batch.
    pub max_batch_ops: usize,
    /// > 0: a second pass of each batch's deletes after this delay.
    pub redelete_after_ms: u64,
    /// Hold time of tombstones.
    pub tombstone_ms: u64,
    /// Longest placeholder value rendered into a key (bytes); longer fires the fallback.
    pub max_key_bytes: usize,
    /// Largest value a `refresh` rule sets (bytes); a larger one unlinks its key instead.
    pub max_refresh_bytes: usize,
    /// Keys a pattern pass asks SCAN for per call (docs/operations.md, "Patterns and what they cost").
    pub pattern_scan_count: usize,
    /// Pattern passes rest between SCAN calls while other invalidations flow (docs/operations.md).
    pub pattern_pass_yield: bool,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Listen address of /metrics, /livez, /readyz; `None` disables.
    pub listen: Option<std::net::SocketAddr>,
}

/// The validated service config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The config file.
    pub path: PathBuf,
    /// Where the mappings are (relative paths resolved against the config file).
    pub mappings: MappingsSource,
    /// `[postgres]`.
    pub postgres: PostgresConfig,
    /// `[redis]`.
    pub redis: RedisConfig,
    /// `[worker]`.
    pub worker: WorkerConfig,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
}

impl Config {
    /// The sink options of `[redis]`, the one constructor every command uses.
    /// `url` is [`RedisTarget::url`]: with `cluster`, the first seed (what a
    /// single connection such as the start-up checks' uses; `Sink::connect`
    /// takes [`RedisTarget::seeds`] beside the options). Commands run without
    /// the worker's delayed second pass; [`Config::worker_sink_options`] adds it.
    pub fn sink_options(&self) -> crate::sink::SinkOptions {
        crate::sink::SinkOptions {
            url: self.redis.target.url().to_owned(),
            password: self.redis.password.as_ref().map(|p| p.expose().to_owned()),
            wait_replicas: self.redis.wait_replicas,
            redelete_after: None,
            tls: self.redis.tls.clone(),
        }
    }

    /// What `[worker]` tunes in the sink: tombstone hold, pattern passes.
    pub fn sink_tuning(&self) -> crate::sink::SinkTuning {
        crate::sink::SinkTuning {
            tombstone_hold: std::time::Duration::from_millis(self.worker.tombstone_ms),
            pattern_scan_count: self.worker.pattern_scan_count,
            pattern_pass_yield: self.worker.pattern_pass_yield,
        }
    }

    /// [`Config::sink_options`] with `[worker] redelete_after_ms`, for `run`.
    pub fn worker_sink_options(&self) -> crate::sink::SinkOptions {
        crate::sink::SinkOptions {
            redelete_after: (self.worker.redelete_after_ms > 0)
                .then(|| std::time::Duration::from_millis(self.worker.redelete_after_ms)),
            ..self.sink_options()
        }
    }

    /// Reads and validates `path`, applying `env` over it.
    pub fn load(path: &Path, env: &EnvOverrides) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text, env)
    }

    /// Validates the text of a config file; `path` locates errors and relative paths.
    pub fn parse(path: &Path, text: &str, env: &EnvOverrides) -> Result<Config, LoadError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| LoadError::Invalid(vec![Diagnostic::from_toml(path, text, &e)]))?;
        let mut v = V {
            path,
            text,
            base: path.parent().unwrap_or(Path::new("")).to_path_buf(),
            diags: Vec::new(),
        };
        let cfg = v.validate(raw, env);
        match cfg {
            Some(c) if v.diags.is_empty() => Ok(c),
            _ => Err(LoadError::Invalid(v.diags)),
        }
    }

    /// The planner context this config implies (epoch left to the caller).
    pub fn planner_context(&self, epoch: impl Into<String>) -> crate::plan::PlannerContext {
        crate::plan::PlannerContext {
            tag_prefix: self.redis.tag_prefix.clone(),
            version_prefix: self.redis.version_prefix.clone(),
            epoch: epoch.into(),
            max_batch_ops: self.worker.max_batch_ops,
            max_key_bytes: self.worker.max_key_bytes,
            max_refresh_bytes: self.worker.max_refresh_bytes,
        }
    }
}

struct V<'a> {
    path: &'a Path,
    text: &'a str,
    base: PathBuf,
    diags: Vec<Diagnostic>,
}

/// PostgreSQL replication slot names: lower-case letters, digits, underscore, at most 63.
fn valid_slot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl V<'_> {
    fn error(&mut self, offset: usize, msg: impl Into<String>) {
        self.diags
            .push(Diagnostic::at(self.path, self.text, offset, msg));
    }

    /// Reads `url` as the Redis client will (scheme, host, port, database),
    /// so that no later step finds it invalid; `field` names it in the error.
    fn check_redis_url(&mut self, offset: usize, field: &str, url: &str) {
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
            let mut reason = e.to_string();
            if let Some(pw) = url::Url::parse(url)
                .ok()
                .and_then(|u| u.password().map(str::to_owned))
            {
                reason = reason.replace(&pw, "***");
            }
            self.error(
                offset,
                format!(
                    "{field}: invalid Redis URL {} ({reason}): write redis://[user:password@]host:port/db, or rediss:// for TLS",
                    crate::sink::mask_url(url)
                ),
            );
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn read_secret(&mut self, f: &Spanned<String>) -> Option<Secret> {
        let path = self.resolve(f.get_ref());
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let s = s.strip_suffix('\n').unwrap_or(&s);
                let s = s.strip_suffix('\r').unwrap_or(s);
                Some(Secret(s.to_owned()))
            }
            Err(e) => {
                self.error(
                    f.span().start,
                    format!("cannot read password_file {}: {e}", path.display()),
                );
                None
            }
        }
    }

    fn validate(&mut self, raw: RawConfig, env: &EnvOverrides) -> Option<Config> {
        let mappings = match &raw.mappings {
            None => MappingsSource::Dir(self.resolve("mappings")),
            Some(m) => {
                match m.get_ref() {
                    RawMappings::Dir(d) if d.is_empty() => {
                        self.error(
                            m.span().start,
                            "empty `mappings`: name a directory of *.toml files or a list of files",
                        );
                        MappingsSource::Files(Vec::new())
                    }
                    RawMappings::Dir(d) => {
                        let p = self.resolve(d);
                        if p.is_dir() || !d.ends_with(".toml") {
                            MappingsSource::Dir(p)
                        } else {
                            MappingsSource::Files(vec![p])
                        }
                    }
                    RawMappings::Files(f) => {
                        if f.is_empty() {
                            self.error(m.span().start, "empty `mappings`: name a directory of *.toml files or a list of files");
                        }
                        MappingsSource::Files(f.iter().map(|f| self.resolve(f)).collect())
                    }
                }
            }
        };

        let pg_span = raw.postgres.as_ref().map(|p| p.span().start).unwrap_or(0);
        let pg = raw.postgres.map(Spanned::into_inner);
        let url = match (&env.postgres_url, pg.as_ref().and_then(|p| p.url.as_ref())) {
            (Some(u), _) => Some(u.clone()),
            (None, Some(u)) if u.get_ref().is_empty() => {
                self.error(
                    u.span().start,
                    "empty postgres url: e.g. \"postgres://cache_invalidator@127.0.0.1:5432/app\"",
                );
                None
            }
            (None, Some(u)) => Some(u.get_ref().clone()),
            (None, None) => {
                self.error(
                    pg_span,
                    "missing `url` in [postgres]: set it (e.g. url = \"postgres://cache_invalidator@127.0.0.1:5432/app\") or CACHE_INVALIDATOR_POSTGRES_URL",
                );
                None
            }
        };
        let mut slot = "cache_invalidator".to_owned();
        let mut publication = "cache_invalidator".to_owned();
        let mut pg_password = None;
        let mut auto_setup = false;
        let mut visibility_check = true;
        let mut replicas = Vec::new();
        let mut replica_max_wait_ms = 30_000;
        let mut failover_slot = true;
        if let Some(pg) = &pg {
            if let Some(s) = &pg.slot {
                if valid_slot_name(s.get_ref()) {
                    slot = s.get_ref().clone();
                } else {
                    self.error(
                        s.span().start,
                        format!("invalid slot name {:?}: use lower-case letters, digits and underscores, at most 63 characters", s.get_ref()),
                    );
                }
            }
            if let Some(p) = &pg.publication {
                if p.get_ref().is_empty() || p.get_ref().len() > 63 {
                    self.error(
                        p.span().start,
                        "invalid publication name: 1 to 63 characters",
                    );
                } else {
                    publication = p.get_ref().clone();
                }
            }
            if let Some(f) = &pg.password_file {
                pg_password = self.read_secret(f);
            }
            auto_setup = pg.auto_setup;
            visibility_check = pg.visibility_check.unwrap_or(true);
            if let Some(list) = &pg.replicas {
                for r in list.get_ref() {
                    match crate::source::ConnectionSettings::parse(r.get_ref(), None) {
                        Ok(_) => replicas.push(r.get_ref().clone()),
                        Err(e) => self.error(
                            r.span().start,
                            format!("invalid replica URL: {e}; write a libpq URL like \"postgres://cache_invalidator@10.0.0.6:5432/app\""),
                        ),
                    }
                }
            }
            if let Some(ms) = &pg.replica_max_wait_ms {
                if *ms.get_ref() == 0 {
                    self.error(
                        ms.span().start,
                        "replica_max_wait_ms = 0: a batch would never wait for a replica; at least 1 (default 30000)",
                    );
                }
                replica_max_wait_ms = *ms.get_ref();
            }
            failover_slot = pg.failover_slot.unwrap_or(true);
        }

        let redis_span = raw.redis.as_ref().map(|r| r.span().start).unwrap_or(0);
        let redis = raw.redis.map(Spanned::into_inner);
        let cluster: Vec<String> = redis
            .as_ref()
            .and_then(|r| r.cluster.as_ref())
            .map(|c| c.get_ref().clone())
            .unwrap_or_default();
        let file_url = redis.as_ref().and_then(|r| r.url.as_ref());
        if let (Some(_), Some(c)) = (file_url, redis.as_ref().and_then(|r| r.cluster.as_ref())) {
            self.error(c.span().start, "[redis] has both `url` and `cluster`: use `url` for one server or `cluster` for a Redis Cluster, not both");
        }
        if let Some(c) = redis.as_ref().and_then(|r| r.cluster.as_ref()) {
            if c.get_ref().is_empty() {
                self.error(
                    c.span().start,
                    "empty `cluster`: list at least one seed URL, e.g. [\"redis://10.0.0.1:6379\"]",
                );
            }
        }
        let redis_url = match (&env.redis_url, file_url) {
            (Some(u), _) => {
                self.check_redis_url(redis_span, "CACHE_INVALIDATOR_REDIS_URL", u);
                Some(u.clone())
            }
            (None, Some(u)) => {
                self.check_redis_url(u.span().start, "[redis] url", u.get_ref());
                Some(u.get_ref().clone())
            }
            (None, None) => None,
        };
        if let Some(c) = redis.as_ref().and_then(|r| r.cluster.as_ref()) {
            for (i, seed) in c.get_ref().iter().enumerate() {
                self.check_redis_url(c.span().start, &format!("[redis] cluster[{i}]"), seed);
            }
        }
        if redis_url.is_none() && cluster.is_empty() {
            self.error(
                redis_span,
                "missing `url` in [redis]: set it (e.g. url = \"redis://127.0.0.1:6379/0\"), `cluster`, or CACHE_INVALIDATOR_REDIS_URL",
            );
        }
        let mut tag_prefix = "tag:".to_owned();
        let mut version_prefix = "version:".to_owned();
        let mut redis_password = None;
        let mut wait_replicas = 0;
        let mut redis_tls = crate::sink::RedisTls::default();
        if let Some(r) = &redis {
            if let Some(t) = &r.tag_prefix {
                if t.get_ref().is_empty() {
                    self.error(t.span().start, "empty tag_prefix: tag sets would share the keyspace of cached keys; e.g. \"tag:\"");
                }
                tag_prefix = t.get_ref().clone();
            }
            if let Some(t) = &r.version_prefix {
                if t.get_ref().is_empty() {
                    self.error(t.span().start, "empty version_prefix: version keys would share the keyspace of cached keys; e.g. \"version:\"");
                }
                if t.get_ref() == &tag_prefix {
                    self.error(t.span().start, "version_prefix equals tag_prefix: tag sets and version keys must not collide");
                }
                version_prefix = t.get_ref().clone();
            }
            if let Some(f) = &r.password_file {
                redis_password = self.read_secret(f);
            }
            wait_replicas = r.wait_replicas;
            redis_tls = crate::sink::RedisTls {
                ca_file: r.tls_ca_file.as_ref().map(|f| self.resolve(f.get_ref())),
                cert_file: r.tls_cert_file.as_ref().map(|f| self.resolve(f.get_ref())),
                key_file: r.tls_key_file.as_ref().map(|f| self.resolve(f.get_ref())),
            };
            if let (Some(f), None) | (None, Some(f)) = (&r.tls_cert_file, &r.tls_key_file) {
                self.error(
                    f.span().start,
                    "tls_cert_file and tls_key_file go together: set both (PEM files) or neither",
                );
            }
            let plain = |u: &str| u.starts_with("redis://");
            if let Some(f) = r
                .tls_ca_file
                .iter()
                .chain(&r.tls_cert_file)
                .chain(&r.tls_key_file)
                .next()
            {
                if redis_url.as_deref().is_some_and(plain) || cluster.iter().any(|u| plain(u)) {
                    self.error(
                        f.span().start,
                        "TLS files are set but the Redis URL is redis://: use rediss:// for TLS",
                    );
                }
            }
        }

        let w = raw.worker;
        let max_batch_ops = match &w.max_batch_ops {
            Some(n) if *n.get_ref() == 0 => {
                self.error(
                    n.span().start,
                    "max_batch_ops = 0: it must be at least 1 (default 10000)",
                );
                1
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
            None => 10_000,
        };
        let tombstone_ms = match &w.tombstone_ms {
            Some(n) if *n.get_ref() == 0 => {
                self.error(n.span().start, "tombstone_ms = 0: tombstones need a hold time of at least 1 ms (default 10000)");
                1
            }
            Some(n) => *n.get_ref(),
            None => 10_000,
        };
        let max_key_bytes = match &w.max_key_bytes {
            Some(n) if *n.get_ref() == 0 => {
                self.error(
                    n.span().start,
                    "max_key_bytes = 0: every key would fall back; at least 1 (default 65536)",
                );
                1
            }
            Some(n) if *n.get_ref() > 512 * 1024 * 1024 => {
                self.error(
                    n.span().start,
                    "max_key_bytes over Redis's 512 MB key limit (default 65536)",
                );
                1
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
            None => crate::plan::planner::DEFAULT_MAX_KEY_BYTES,
        };
        let max_refresh_bytes = match &w.max_refresh_bytes {
            Some(n) if *n.get_ref() == 0 => {
                self.error(
                    n.span().start,
                    "max_refresh_bytes = 0: every refreshed key would be unlinked instead; at least 1 (default 524288)",
                );
                1
            }
            Some(n) if *n.get_ref() > 512 * 1024 * 1024 => {
                self.error(
                    n.span().start,
                    "max_refresh_bytes over Redis's 512 MB value limit (default 524288)",
                );
                1
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
            None => crate::plan::planner::DEFAULT_MAX_REFRESH_BYTES,
        };
        let scan_range = crate::sink::patterns::SCAN_COUNT_RANGE;
        let pattern_scan_count = match &w.pattern_scan_count {
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n) if scan_range.contains(&n) => n,
                _ => {
                    self.error(
                        n.span().start,
                        format!(
                            "pattern_scan_count = {} is outside {}..={}: SCAN COUNT is keys per call; smaller calls hold Redis shorter, larger ones finish a pass in fewer round trips (default {})",
                            n.get_ref(),
                            scan_range.start(),
                            scan_range.end(),
                            crate::sink::patterns::DEFAULT_SCAN_COUNT
                        ),
                    );
                    crate::sink::patterns::DEFAULT_SCAN_COUNT
                }
            },
            None => crate::sink::patterns::DEFAULT_SCAN_COUNT,
        };
        let listen = raw.metrics.listen.and_then(|l| match l.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(e) => {
                self.error(
                    l.span().start,
                    format!("invalid metrics listen address {:?} ({e}): write ip:port, e.g. \"127.0.0.1:9464\"", l.get_ref()),
                );
                None
            }
        });

        Some(Config {
            path: self.path.to_path_buf(),
            mappings,
            postgres: PostgresConfig {
                url: url?,
                password: pg_password,
                slot,
                publication,
                auto_setup,
                visibility_check,
                replicas,
                replica_max_wait_ms,
                failover_slot,
            },
            redis: RedisConfig {
                target: if cluster.is_empty() {
                    RedisTarget::Single(redis_url?)
                } else {
                    RedisTarget::Cluster(cluster)
                },
                password: redis_password,
                tag_prefix,
                version_prefix,
                wait_replicas,
                tls: redis_tls,
            },
            worker: WorkerConfig {
                max_batch_delay_ms: w.max_batch_delay_ms.unwrap_or(5),
                max_batch_ops,
                redelete_after_ms: w.redelete_after_ms.unwrap_or(0),
                tombstone_ms,
                max_key_bytes,
                max_refresh_bytes,
                pattern_scan_count,
                pattern_pass_yield: w.pattern_pass_yield.unwrap_or(false),
            },
            metrics: MetricsConfig { listen },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h/0\"\n";

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/ci/c.toml"), text, &EnvOverrides::default())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(
            c.mappings,
            MappingsSource::Dir(PathBuf::from("/etc/ci/mappings"))
        );
        assert_eq!(c.postgres.slot, "cache_invalidator");
        assert_eq!(c.postgres.publication, "cache_invalidator");
        assert!(!c.postgres.auto_setup);
        assert!(c.postgres.visibility_check, "on by default");
        assert!(c.postgres.replicas.is_empty());
        assert_eq!(c.postgres.replica_max_wait_ms, 30_000);
        assert_eq!(c.redis.tag_prefix, "tag:");
        assert_eq!(c.redis.version_prefix, "version:");
        assert_eq!(c.redis.wait_replicas, 0);
        assert_eq!(
            c.worker,
            WorkerConfig {
                max_batch_delay_ms: 5,
                max_batch_ops: 10_000,
                redelete_after_ms: 0,
                tombstone_ms: 10_000,
                max_key_bytes: 65_536,
                max_refresh_bytes: 512 * 1024,
                pattern_scan_count: 1000,
                pattern_pass_yield: false,
            }
        );
        assert_eq!(c.metrics.listen, None);
    }

    #[test]
    fn redis_tls_files_resolve_and_need_rediss() {
        let c = parse("[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"rediss://h/0\"\ntls_ca_file = \"ca.pem\"\ntls_cert_file = \"/abs/c.pem\"\ntls_key_file = \"k.pem\"\n").unwrap();
        assert_eq!(c.redis.tls.ca_file, Some(PathBuf::from("/etc/ci/ca.pem")));
        assert_eq!(c.redis.tls.cert_file, Some(PathBuf::from("/abs/c.pem")));
        assert_eq!(c.redis.tls.key_file, Some(PathBuf::from("/etc/ci/k.pem")));
        let e = parse("[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h/0\"\ntls_cert_file = \"c.pem\"\n").unwrap_err();
        assert!(
            e.contains("go together") && e.contains("use rediss://"),
            "{e}"
        );
    }

    #[test]
    fn replicas_parse_and_bad_urls_are_located() {
        let c = parse("[postgres]\nurl = \"postgres://u@h/db\"\nvisibility_check = false\nreplicas = [\"postgres://u:r3pl@r1:5433/db\", \"postgres://u@r2/db?sslmode=require\"]\nreplica_max_wait_ms = 500\n[redis]\nurl = \"redis://h/0\"\n").unwrap();
        assert!(!c.postgres.visibility_check);
        assert_eq!(c.postgres.replicas.len(), 2);
        assert_eq!(c.postgres.replica_max_wait_ms, 500);
        assert!(
            !format!("{c:?}").contains("r3pl"),
            "replica passwords are masked"
        );
        let e = parse("[postgres]\nurl = \"postgres://u@h/db\"\nreplicas = [\"postgres://u@r1/db?sslmode=bogus\"]\nreplica_max_wait_ms = 0\n[redis]\nurl = \"redis://h/0\"\n").unwrap_err();
        assert!(
            e.contains("c.toml:3:") && e.contains("invalid replica URL"),
            "{e}"
        );
        assert!(
            e.contains("c.toml:4:") && e.contains("replica_max_wait_ms = 0"),
            "{e}"
        );
    }

    #[test]
    fn pattern_scan_count_is_read_and_bounded() {
        let c = parse(&format!("{MIN}[worker]\npattern_scan_count = 250\n")).unwrap();
        assert_eq!(c.worker.pattern_scan_count, 250);
        for bad in ["0", "9", "100001"] {
            let e = parse(&format!("{MIN}[worker]\npattern_scan_count = {bad}\n")).unwrap_err();
            assert!(
                e.contains("c.toml:6:")
                    && e.contains(&format!(
                        "pattern_scan_count = {bad} is outside 10..=100000"
                    )),
                "{e}"
            );
        }
    }

    #[test]
    fn debug_never_shows_passwords() {
        let env = EnvOverrides {
            postgres_url: Some("postgres://u:pgsecret1@h/db".into()),
            redis_url: Some("redis://u:redissecret1@h/0".into()),
        };
        let c = Config::parse(Path::new("/etc/ci/c.toml"), MIN, &env).unwrap();
        let shown = format!("{c:?} {env:?} {:#?}", c.redis);
        assert!(
            !shown.contains("pgsecret1") && !shown.contains("redissecret1"),
            "{shown}"
        );
        assert!(shown.contains("redis://u:***@h/0"), "{shown}");
    }

    #[test]
    fn full_config_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg"), "s3cret\n").unwrap();
        std::fs::create_dir(dir.path().join("maps")).unwrap();
        let text = r#"
mappings = "maps"
[postgres]
url = "postgres://u@h/db"
password_file = "pg"
slot = "ci_1"
publication = "pub"
auto_setup = true
[redis]
cluster = ["redis://a:6379", "redis://b:6379"]
tag_prefix = "t:"
version_prefix = "v:"
wait_replicas = 1
[worker]
max_batch_delay_ms = 2
max_batch_ops = 50
redelete_after_ms = 500
tombstone_ms = 3000
[metrics]
listen = "127.0.0.1:9464"
"#;
        let c = Config::parse(&dir.path().join("c.toml"), text, &EnvOverrides::default()).unwrap();
        assert_eq!(c.mappings, MappingsSource::Dir(dir.path().join("maps")));
        assert_eq!(c.postgres.password.as_ref().unwrap().expose(), "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(
            c.redis.target,
            RedisTarget::Cluster(vec!["redis://a:6379".into(), "redis://b:6379".into()])
        );
        assert_eq!(c.redis.target.seeds().len(), 2);
        assert_eq!(c.sink_options().url, "redis://a:6379");
        assert_eq!(c.worker.max_batch_ops, 50);
        assert_eq!(c.metrics.listen, Some(([127, 0, 0, 1], 9464).into()));
        let list = Config::parse(
            &dir.path().join("c.toml"),
            &format!("mappings = [\"a.toml\", \"/abs/b.toml\"]\n{MIN}"),
            &EnvOverrides::default(),
        )
        .unwrap();
        assert_eq!(
            list.mappings,
            MappingsSource::Files(vec![
                dir.path().join("a.toml"),
                PathBuf::from("/abs/b.toml")
            ])
        );
    }

    #[test]
    fn redis_urls_are_read_at_load_and_errors_name_the_field() {
        let e =
            parse("[postgres]\nurl = \"x\"\n[redis]\nurl = \"redis://u:hunter2@h:notaport/0\"\n")
                .unwrap_err();
        assert!(
            e.starts_with("/etc/ci/c.toml:4:7: [redis] url: invalid Redis URL"),
            "{e}"
        );
        assert!(
            e.contains("rediss:// for TLS") && !e.contains("hunter2"),
            "{e}"
        );
        let e = parse(
            "[postgres]\nurl = \"x\"\n[redis]\ncluster = [\"redis://a:6379\", \"http://b\"]\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("/etc/ci/c.toml:4:11: [redis] cluster[1]: invalid Redis URL"),
            "{e}"
        );
        let env = EnvOverrides {
            postgres_url: None,
            redis_url: Some("nope".into()),
        };
        let e = Config::parse(Path::new("c.toml"), MIN, &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CACHE_INVALIDATOR_REDIS_URL: invalid Redis URL"),
            "{e}"
        );
    }

    #[test]
    fn env_overrides_urls() {
        let env = EnvOverrides {
            postgres_url: Some("postgres://env/db".into()),
            redis_url: Some("redis://env/1".into()),
        };
        let c = Config::parse(Path::new("c.toml"), MIN, &env).unwrap();
        assert_eq!(c.postgres.url, "postgres://env/db");
        assert_eq!(c.redis.target, RedisTarget::Single("redis://env/1".into()));
        assert!(c.redis.target.seeds().is_empty());
        assert_eq!(c.sink_options().url, "redis://env/1");
        // The environment alone is enough.
        let c = Config::parse(Path::new("c.toml"), "", &env).unwrap();
        assert_eq!(c.postgres.url, "postgres://env/db");
    }

    #[test]
    fn unknown_fields_suggest() {
        assert_eq!(
            parse(&format!("{MIN}[worker]\nmax_batch_op = 5\n")).unwrap_err(),
            "/etc/ci/c.toml:6:1: unknown field `max_batch_op`: did you mean `max_batch_ops`?; allowed fields: max_batch_delay_ms, max_batch_ops, redelete_after_ms, tombstone_ms, max_key_bytes, max_refresh_bytes, pattern_scan_count, pattern_pass_yield"
        );
        assert_eq!(
            parse("[postgress]\n").unwrap_err(),
            "/etc/ci/c.toml:1:2: unknown field `postgress`: did you mean `postgres`?; allowed fields: mappings, postgres, redis, worker, metrics"
        );
        assert_eq!(
            parse("[postgres]\nurl = \"x\"\nslott = \"a\"\n[redis]\nurl = \"redis://r\"\n").unwrap_err(),
            "/etc/ci/c.toml:3:1: unknown field `slott`: did you mean `slot`?; allowed fields: url, password_file, slot, publication, auto_setup, visibility_check, replicas, replica_max_wait_ms, failover_slot"
        );
    }

    #[test]
    fn validation_errors() {
        assert_eq!(
            parse("[redis]\nurl = \"redis://r\"\n").unwrap_err(),
            "/etc/ci/c.toml:1:1: missing `url` in [postgres]: set it (e.g. url = \"postgres://cache_invalidator@127.0.0.1:5432/app\") or CACHE_INVALIDATOR_POSTGRES_URL"
        );
        assert_eq!(
            parse("[postgres]\nurl = \"x\"\n").unwrap_err(),
            "/etc/ci/c.toml:1:1: missing `url` in [redis]: set it (e.g. url = \"redis://127.0.0.1:6379/0\"), `cluster`, or CACHE_INVALIDATOR_REDIS_URL"
        );
        assert_eq!(
            parse("[postgres]\nurl = \"x\"\nslot = \"Bad-Slot\"\n[redis]\nurl = \"redis://r\"\n").unwrap_err(),
            "/etc/ci/c.toml:3:8: invalid slot name \"Bad-Slot\": use lower-case letters, digits and underscores, at most 63 characters"
        );
        assert_eq!(
            parse(&format!("{MIN}[worker]\nmax_batch_ops = 0\n")).unwrap_err(),
            "/etc/ci/c.toml:6:17: max_batch_ops = 0: it must be at least 1 (default 10000)"
        );
        assert_eq!(
            parse(&format!("{MIN}[metrics]\nlisten = \"nope\"\n")).unwrap_err(),
            "/etc/ci/c.toml:6:10: invalid metrics listen address \"nope\" (invalid socket address syntax): write ip:port, e.g. \"127.0.0.1:9464\""
        );
        assert_eq!(
            parse("[postgres]\nurl = \"x\"\n[redis]\nurl = \"redis://r\"\ncluster = [\"redis://a\"]\n").unwrap_err(),
            "/etc/ci/c.toml:5:11: [redis] has both `url` and `cluster`: use `url` for one server or `cluster` for a Redis Cluster, not both"
        );
        assert_eq!(
            parse(&format!("{MIN}tag_prefix = \"\"\n")).unwrap_err(),
            "/etc/ci/c.toml:5:14: empty tag_prefix: tag sets would share the keyspace of cached keys; e.g. \"tag:\""
        );
        let e = parse(
            "[postgres]\nurl = \"x\"\npassword_file = \"/nonexistent/pw\"\n[redis]\nurl = \"redis://r\"\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("/etc/ci/c.toml:3:17: cannot read password_file /nonexistent/pw: "),
            "{e}"
        );
        assert_eq!(
            parse("[worker]\nmax_batch_ops = \"many\"\n").unwrap_err(),
            "/etc/ci/c.toml:2:17: invalid type: string \"many\", expected u64"
        );
    }
}
