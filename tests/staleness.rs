//! The staleness benchmark (issue 11, `docs/staleness.md`): racing read-through
//! readers and writers against real servers and a real worker, four strategies.
//! Ignored by default; run it through `benches/staleness.sh`.
//!
//! Workload: `STALENESS_READERS` (8) readers and `STALENESS_WRITERS` (2)
//! writers at `STALENESS_TPS` (500) transactions/s in total, ids drawn from a
//! zipf(0.99) distribution over `STALENESS_IDS` (1000) rows, a fill delay
//! between a reader's database read and its cache fill (`STALENESS_DELAYS`,
//! ms, default `0,5,20`), `STALENESS_SECS` (10) per run, `STALENESS_RUNS` (3)
//! runs, medians reported.
//!
//! A cache hit is stale when the cached row version is lower than a version
//! whose commit returned before the read started; its age is the time since
//! the first such commit returned. After each run the writers stop, the
//! worker drains (`sync_worker`), the readers stop, and every id's cached
//! version is compared with the database's: lower is a stale entry.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_invalidator::cache::{self, Lookup, VersionedCache};
use support::{PgCluster, RedisServer};

const MAPPING: &str = r#"
[[table]]
name = "items"
keys = ["u:{id}"]
versions = ["item:{id}"]
truncate = "none"

[[table]]
name = "items"
keys = ["t:{id}"]
mode = "tombstone"
truncate = "none"
"#;

/// Unlinks every key matching `ARGV[1]` (a small benchmark keyspace; never in production).
const CLEAR: &str =
    "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('UNLINK', k) end return 0";

/// Data TTL of every fill: longer than any run, so stale entries stay.
const TTL: u64 = 600;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Strategy {
    /// The lesson's pattern: the writer UNLINKs after its commit; no worker keys.
    AppDelete,
    /// The worker UNLINKs `u:{id}`.
    WorkerUnlink,
    /// The worker bumps `version:item:{id}`; readers read the version first.
    WorkerVersions,
    /// The worker tombstones `t:{id}`; readers fill through the guarded script.
    WorkerTombstones,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::AppDelete => "app delete-after-write",
            Strategy::WorkerUnlink => "worker UNLINK",
            Strategy::WorkerVersions => "worker versions",
            Strategy::WorkerTombstones => "worker tombstones + guarded fill",
        }
    }
    fn key(self, id: i32) -> String {
        match self {
            Strategy::AppDelete => format!("a:{id}"),
            Strategy::WorkerUnlink => format!("u:{id}"),
            Strategy::WorkerVersions => format!("item:{id}"),
            Strategy::WorkerTombstones => format!("t:{id}"),
        }
    }
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Zipf(s) over 1..=n by inverse CDF.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += 1.0 / (k as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf(cdf)
    }
    fn sample(&self, rng: &mut support::Rng) -> i32 {
        let u = rng.next_f64();
        let i = self.0.partition_point(|c| *c < u);
        (i.min(self.0.len() - 1) + 1) as i32
    }
}

/// Per id: (version, when its commit returned).
type Commits = Arc<Mutex<HashMap<i32, Vec<(i64, Instant)>>>>;

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    hits: AtomicU64,
    stale: AtomicU64,
    stale_10ms: AtomicU64,
    ages_us: Mutex<Vec<u64>>,
}

struct RunResult {
    stale_per_m: f64,
    stale_10ms_per_m: f64,
    stale_entries: f64,
    p99_ms: f64,
    reads_per_s: f64,
    hit_ratio: f64,
    tps: f64,
}

async fn pg_connect(pg: &PgCluster) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.conninfo(), tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

fn parse_version(v: &str) -> i64 {
    v.parse().unwrap_or(-1)
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    pg: &PgCluster,
    redis: &support::RedisServer,
    strategy: Strategy,
    fill_delay: Duration,
    secs: u64,
    ids: usize,
    readers: usize,
    writers: usize,
    tps: f64,
    seed: u64,
) -> RunResult {
    let zipf = Arc::new(Zipf::new(ids, 0.99));
    let commits: Commits = Arc::new(Mutex::new(HashMap::new()));
    let counters = Arc::new(Counters::default());
    let stop_writers = Arc::new(AtomicBool::new(false));
    let stop_readers = Arc::new(AtomicBool::new(false));
    // Reads count only while the writers run (not during the drain).
    let measuring = Arc::new(AtomicBool::new(true));
    let written = Arc::new(AtomicU64::new(0));
    let client = redis.client();

    let mut writer_tasks = Vec::new();
    for w in 0..writers {
        let db = pg_connect(pg).await;
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let (zipf, commits, stop, written) = (
            zipf.clone(),
            commits.clone(),
            stop_writers.clone(),
            written.clone(),
        );
        let period = Duration::from_secs_f64(writers as f64 / tps);
        writer_tasks.push(tokio::spawn(async move {
            let mut rng = support::Rng(seed ^ (0x9E37_79B9 + w as u64 * 7919));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let update = db
                .prepare("UPDATE items SET v = v + 1 WHERE id = $1 RETURNING v")
                .await
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let id = zipf.sample(&mut rng);
                let row = db.query_one(&update, &[&id]).await.unwrap();
                let v: i64 = row.get(0);
                let at = Instant::now();
                commits.lock().unwrap().entry(id).or_default().push((v, at));
                if strategy == Strategy::AppDelete {
                    let _: i64 = redis::cmd("UNLINK")
                        .arg(strategy.key(id))
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
                written.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let mut reader_tasks = Vec::new();
    for r in 0..readers {
        let db = pg_connect(pg).await;
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let (zipf, commits, stop, counters, measuring) = (
            zipf.clone(),
            commits.clone(),
            stop_readers.clone(),
            counters.clone(),
            measuring.clone(),
        );
        reader_tasks.push(tokio::spawn(async move {
            let mut rng = support::Rng(seed ^ (0x1234_5678 + r as u64 * 104_729));
            let select = db
                .prepare("SELECT v FROM items WHERE id = $1")
                .await
                .unwrap();
            let vc = VersionedCache::new("version:");
            while !stop.load(Ordering::Relaxed) {
                let id = zipf.sample(&mut rng);
                let key = strategy.key(id);
                let id_s = id.to_string();
                let t0 = Instant::now();
                let counted = measuring.load(Ordering::Relaxed);
                if counted {
                    counters.reads.fetch_add(1, Ordering::Relaxed);
                }
                // The cache read; a miss remembers what a fill needs.
                enum Miss {
                    Plain,
                    Versioned(i64),
                    Guarded(cache::Seen),
                }
                let (hit, miss) = match strategy {
                    Strategy::AppDelete | Strategy::WorkerUnlink => {
                        let v: Option<String> = redis::cmd("GET")
                            .arg(&key)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        (v, Miss::Plain)
                    }
                    Strategy::WorkerVersions => {
                        let (ver, v) = vc
                            .get_versioned(&mut conn, "item", &id_s, "data")
                            .await
                            .unwrap();
                        (v, Miss::Versioned(ver))
                    }
                    Strategy::WorkerTombstones => {
                        match cache::lookup(&mut conn, &key).await.unwrap() {
                            Lookup::Hit(v) => (Some(v), Miss::Plain),
                            Lookup::Miss(seen) => (None, Miss::Guarded(seen)),
                        }
                    }
                };
                if let Some(v) = hit {
                    if !counted {
                        continue;
                    }
                    counters.hits.fetch_add(1, Ordering::Relaxed);
                    let cached = parse_version(&v);
                    let first_newer = commits.lock().unwrap().get(&id).and_then(|list| {
                        list.iter()
                            .filter(|(ver, at)| *ver > cached && *at < t0)
                            .map(|(_, at)| *at)
                            .min()
                    });
                    if let Some(at) = first_newer {
                        let age = t0.duration_since(at);
                        counters.stale.fetch_add(1, Ordering::Relaxed);
                        if age > Duration::from_millis(10) {
                            counters.stale_10ms.fetch_add(1, Ordering::Relaxed);
                        }
                        counters
                            .ages_us
                            .lock()
                            .unwrap()
                            .push(age.as_micros() as u64);
                    }
                    continue;
                }
                let row = db.query_one(&select, &[&id]).await.unwrap();
                let v: i64 = row.get(0);
                if !fill_delay.is_zero() {
                    tokio::time::sleep(fill_delay).await;
                }
                let value = v.to_string();
                match miss {
                    Miss::Plain => {
                        let _: () = redis::cmd("SET")
                            .arg(&key)
                            .arg(&value)
                            .arg("EX")
                            .arg(TTL)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                    }
                    Miss::Versioned(ver) => {
                        vc.fill(&mut conn, "item", &id_s, "data", ver, &value, TTL)
                            .await
                            .unwrap();
                    }
                    Miss::Guarded(seen) => {
                        cache::guarded_fill(&mut conn, &key, &seen, &value, TTL, &[], "tag:")
                            .await
                            .unwrap();
                    }
                }
            }
        }));
    }

    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    stop_writers.store(true, Ordering::Relaxed);
    for t in writer_tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let reads = counters.reads.load(Ordering::Relaxed);
    // Drain: everything committed is invalidated, then in-flight fills end.
    tokio::task::block_in_place(|| support::sync_worker(pg, redis, Duration::from_secs(60)));
    stop_readers.store(true, Ordering::Relaxed);
    for t in reader_tasks {
        t.await.unwrap();
    }

    // Stale entries: the cached version (as a reader of this strategy sees it)
    // lower than the database's.
    let db = pg_connect(pg).await;
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let vc = VersionedCache::new("version:");
    let mut stale_entries = 0u64;
    for row in db.query("SELECT id, v FROM items", &[]).await.unwrap() {
        let id: i32 = row.get(0);
        let v: i64 = row.get(1);
        let cached = match strategy {
            Strategy::WorkerVersions => {
                vc.get_versioned(&mut conn, "item", &id.to_string(), "data")
                    .await
                    .unwrap()
                    .1
            }
            Strategy::WorkerTombstones => {
                match cache::lookup(&mut conn, &strategy.key(id)).await.unwrap() {
                    Lookup::Hit(v) => Some(v),
                    Lookup::Miss(_) => None,
                }
            }
            _ => redis::cmd("GET")
                .arg(strategy.key(id))
                .query_async(&mut conn)
                .await
                .unwrap(),
        };
        if cached.is_some_and(|c| parse_version(&c) < v) {
            stale_entries += 1;
        }
    }

    let mut ages = std::mem::take(&mut *counters.ages_us.lock().unwrap());
    ages.sort_unstable();
    let p99 = if ages.is_empty() {
        0.0
    } else {
        ages[((ages.len() as f64 * 0.99) as usize).min(ages.len() - 1)] as f64 / 1000.0
    };
    let per_m = |n: u64| n as f64 * 1e6 / reads.max(1) as f64;
    RunResult {
        stale_per_m: per_m(counters.stale.load(Ordering::Relaxed)),
        stale_10ms_per_m: per_m(counters.stale_10ms.load(Ordering::Relaxed)),
        stale_entries: stale_entries as f64,
        p99_ms: p99,
        reads_per_s: reads as f64 / elapsed,
        hit_ratio: counters.hits.load(Ordering::Relaxed) as f64 / reads.max(1) as f64,
        tps: written.load(Ordering::Relaxed) as f64 / elapsed,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[test]
#[ignore = "a benchmark: run benches/staleness.sh"]
fn staleness() {
    let secs: u64 = env("STALENESS_SECS", 10);
    let runs: usize = env("STALENESS_RUNS", 3);
    let ids: usize = env("STALENESS_IDS", 1000);
    let readers: usize = env("STALENESS_READERS", 8);
    let writers: usize = env("STALENESS_WRITERS", 2);
    let tps: f64 = env("STALENESS_TPS", 500.0);
    let delays: Vec<u64> = std::env::var("STALENESS_DELAYS")
        .unwrap_or_else(|_| "0,5,20".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();

    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL)");
    let (_cfg, _worker) = support::running_worker(
        &pg,
        &redis,
        &[("items.toml", MAPPING)],
        "tombstone_ms = 10000",
        &[],
        Duration::from_secs(30),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "staleness: {readers} readers, {writers} writers at {tps} tx/s, zipf(0.99) over {ids} ids, {secs} s per run, median of {runs} runs"
    );
    println!("| fill delay | strategy | stale reads /M | stale > 10 ms /M | stale entries after drain | stale age p99 ms | reads/s | hit ratio | writes/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut seed = 1u64;
    for &delay in &delays {
        for strategy in [
            Strategy::AppDelete,
            Strategy::WorkerUnlink,
            Strategy::WorkerVersions,
            Strategy::WorkerTombstones,
        ] {
            let mut results = Vec::new();
            for _ in 0..runs {
                // Fresh rows and an empty cache for every run.
                pg.psql(&format!(
                    "TRUNCATE items; INSERT INTO items SELECT g, 0 FROM generate_series(1, {ids}) g"
                ));
                support::sync_worker(&pg, &redis, Duration::from_secs(60));
                for pattern in ["a:*", "u:*", "t:*", "item:*", "version:*"] {
                    redis
                        .cli(&["EVAL", CLEAR, "0", pattern])
                        .expect("clear the cache");
                }
                seed += 1;
                results.push(rt.block_on(run_once(
                    &pg,
                    &redis,
                    strategy,
                    Duration::from_millis(delay),
                    secs,
                    ids,
                    readers,
                    writers,
                    tps,
                    seed,
                )));
            }
            let m = |f: fn(&RunResult) -> f64| median(results.iter().map(f).collect());
            println!(
                "| {delay} ms | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.3} | {:.0} |",
                strategy.name(),
                m(|r| r.stale_per_m),
                m(|r| r.stale_10ms_per_m),
                m(|r| r.stale_entries),
                m(|r| r.p99_ms),
                m(|r| r.reads_per_s),
                m(|r| r.hit_ratio),
                m(|r| r.tps),
            );
        }
    }
}
