//! Helper of the end-to-end benchmarks (`benches/e2e.sh`, `benches/latency.sh`);
//! built as the example `bench_tool`. Two subcommands:
//!
//! * `drain --pg URL --slot S --end LSN [--metrics HOST:PORT] -- CMD ARGS...`
//!   spawns CMD (the worker), polls the slot's `confirmed_flush_lsn` every
//!   10 ms until it reaches LSN, reads the worker's peak RSS (`VmHWM`), its
//!   CPU time so far (user + system) and the fallback counter from `/metrics`
//!   (when served), stops the worker with SIGTERM and prints
//!   `seconds=.. rss_kb=.. cpu_s=.. fallbacks=..|na exit=..`.
//! * `latency --pg URL --redis URL --first-id N --duration S [--interval-ms 20]
//!   [--metrics HOST:PORT]`: the outside view of commit-to-invalidated latency.
//!   Per probe: cache a key, a tagged key and a version for user N, commit an
//!   UPDATE of that user, then poll Redis until the key is gone, the tagged key
//!   is gone and the version moved; prints p50/p99/max of each, and the
//!   worker's own `cache_invalidator_apply_latency_seconds` histogram when
//!   `/metrics` serves it.
//!
//! * `patterns --pg URL --redis URL --slot S --pid PID --rows N [--reps 3]`
//!   (`benches/patterns.sh`): per repetition, (a) the time of one pattern pass
//!   (commit an UPDATE of a post, wait until its comment keys are gone) and of
//!   a bare `SCAN 0 MATCH post:*:comments:* COUNT 1000` pass from this client;
//!   then N update transactions on `posts` (a pattern each) interleaved with N
//!   on `items` (a plain key each), (b) each item key's commit-to-deleted
//!   latency polled every 0.2 ms, (c) the drain time until the slot confirmed
//!   the last commit, (d) the worker's CPU seconds over it; checks every
//!   comment key is gone and the control keys and the filler are not. Prints
//!   one line per repetition and the medians.
//!
//! Polling a process' state from one long-lived connection keeps the
//! observer's own cost (one small query per 10 ms) out of the measurement.

use std::io::{Read, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn need(args: &[String], name: &str) -> Result<String, Error> {
    arg(args, name).ok_or_else(|| format!("missing {name}").into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("drain") => drain(&args).await,
        Some("latency") => latency(&args).await,
        Some("patterns") => patterns(&args).await,
        _ => Err("usage: bench_tool drain|latency|patterns ... (see the file's doc)".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_tool: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn pg(url: &str) -> Result<tokio_postgres::Client, Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds of a live process (`/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = s.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// GET /metrics over plain HTTP/1.0; `None` when nothing serves it.
fn fetch_metrics(addr: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    if !body.starts_with("HTTP/1.") || !body.contains(" 200 ") {
        return None;
    }
    Some(body.split_once("\r\n\r\n")?.1.to_string())
}

/// Sum of every series of a metric (`name` or `name{...}`).
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let base = series.split('{').next().unwrap_or(series);
        if base == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

async fn drain(args: &[String]) -> Result<(), Error> {
    let url = need(args, "--pg")?;
    let slot = need(args, "--slot")?;
    let end = need(args, "--end")?;
    let metrics = arg(args, "--metrics");
    let timeout = Duration::from_secs(
        arg(args, "--timeout-s")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(900),
    );
    let cmd_at = args
        .iter()
        .position(|a| a == "--")
        .ok_or("missing -- CMD")?;
    let cmd = &args[cmd_at + 1..];
    let (program, rest) = cmd.split_first().ok_or("empty command")?;
    let client = pg(&url).await?;
    let query = client
        .prepare(
            "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .await?;

    let started = Instant::now();
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let elapsed = loop {
        let row = client.query_opt(&query, &[&slot, &end]).await?;
        if row.is_some_and(|r| r.get::<_, bool>(0)) {
            break started.elapsed();
        }
        if let Some(status) = child.try_wait()? {
            return Err(format!("the worker exited ({status}) before confirming {end}").into());
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            return Err(format!("slot {slot} did not reach {end} within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let rss = vm_hwm_kb(pid).unwrap_or(0);
    let cpu = cpu_seconds(pid).unwrap_or(f64::NAN);
    let fallbacks = metrics
        .as_deref()
        .and_then(fetch_metrics)
        .map(|m| {
            metric_sum(&m, "cache_invalidator_fallbacks_total")
                .map_or_else(|| "0".to_string(), |v| format!("{v}"))
        })
        .unwrap_or_else(|| "na".into());
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(i32::try_from(pid)?, libc::SIGTERM);
    }
    let status = child.wait()?;
    println!(
        "seconds={:.3} rss_kb={rss} cpu_s={cpu:.2} fallbacks={fallbacks} exit={}",
        elapsed.as_secs_f64(),
        status.code().unwrap_or(-1)
    );
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    println!(
        "{name:<22} n={:<5} p50={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms",
        v.len(),
        percentile(&v, 50.0) * 1e3,
        percentile(&v, 99.0) * 1e3,
        v.last().copied().unwrap_or(f64::NAN) * 1e3
    );
}

/// Quantile estimate from cumulative Prometheus buckets (upper bound of the
/// bucket holding the quantile).
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

async fn latency(args: &[String]) -> Result<(), Error> {
    let url = need(args, "--pg")?;
    let redis_url = need(args, "--redis")?;
    let first: i64 = need(args, "--first-id")?.parse()?;
    let duration = Duration::from_secs_f64(need(args, "--duration")?.parse()?);
    let interval = Duration::from_millis(
        arg(args, "--interval-ms")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(20),
    );
    let client = pg(&url).await?;
    let update = client
        .prepare("UPDATE users SET updated_at = now() WHERE id = $1")
        .await?;
    let mut redis = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;

    let (mut key_l, mut tag_l, mut ver_l, mut all_l) = (vec![], vec![], vec![], vec![]);
    let mut timeouts = 0u32;
    let started = Instant::now();
    let mut id = first;
    while started.elapsed() < duration {
        let next = Instant::now() + interval;
        let key = format!("user:{id}:profile");
        let member = format!("probe:user:{id}:member");
        let tag = format!("tag:user:{id}");
        let version = format!("version:user:{id}");
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg("cached")
            .ignore()
            .cmd("SET")
            .arg(&member)
            .arg("cached")
            .ignore()
            .cmd("SADD")
            .arg(&tag)
            .arg(&member)
            .ignore()
            .cmd("SET")
            .arg(&version)
            .arg(10)
            .ignore()
            .query_async(&mut redis)
            .await?;
        client.execute(&update, &[&id]).await?;
        let committed = Instant::now();
        let (mut k, mut t, mut v) = (None, None, None);
        while k.is_none() || t.is_none() || v.is_none() {
            let (ke, me, ve): (bool, bool, Option<i64>) = redis::pipe()
                .exists(&key)
                .exists(&member)
                .get(&version)
                .query_async(&mut redis)
                .await?;
            let now = committed.elapsed().as_secs_f64();
            if !ke {
                k.get_or_insert(now);
            }
            if !me {
                t.get_or_insert(now);
            }
            if ve.is_some_and(|x| x > 10) {
                v.get_or_insert(now);
            }
            if committed.elapsed() > Duration::from_secs(5) {
                timeouts += 1;
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        if let (Some(k), Some(t), Some(v)) = (k, t, v) {
            key_l.push(k);
            tag_l.push(t);
            ver_l.push(v);
            all_l.push(k.max(t).max(v));
        }
        id += 1;
        tokio::time::sleep_until(next.into()).await;
    }
    println!("outside (commit returned -> change visible in Redis), polled every 0.2 ms:");
    summary("key unlinked", key_l);
    summary("tagged key unlinked", tag_l);
    summary("version bumped", ver_l);
    summary("all three", all_l);
    if timeouts > 0 {
        println!("TIMEOUTS: {timeouts} probes not invalidated within 5 s");
    }
    match arg(args, "--metrics").as_deref().and_then(fetch_metrics) {
        None => {
            println!("inside: /metrics not served by this worker build (histogram unavailable)")
        }
        Some(m) => {
            let name = "cache_invalidator_apply_latency_seconds_bucket";
            let mut buckets: Vec<(f64, f64)> = m
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| {
                    let le = l.split("le=\"").nth(1)?.split('"').next()?;
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    };
                    Some((le, l.rsplit_once(' ')?.1.parse().ok()?))
                })
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            match (
                bucket_quantile(&buckets, 0.5),
                bucket_quantile(&buckets, 0.99),
            ) {
                (Some(p50), Some(p99)) => println!(
                    "inside (commit timestamp -> Redis confirmed, histogram bucket bounds): p50 <= {:.1} ms, p99 <= {:.1} ms, n={}",
                    p50 * 1e3,
                    p99 * 1e3,
                    buckets.last().map_or(0.0, |b| b.1)
                ),
                _ => println!("inside: /metrics served but {name} has no observations yet"),
            }
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Waits until every key of `keys` is gone, polling every `every`.
async fn wait_gone(
    redis: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
    every: Duration,
    timeout: Duration,
) -> Result<(), Error> {
    let started = Instant::now();
    loop {
        let n: i64 = redis::cmd("EXISTS").arg(keys).query_async(redis).await?;
        if n == 0 {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(format!("{n} of {} keys still there after {timeout:?}", keys.len()).into());
        }
        tokio::time::sleep(every).await;
    }
}

async fn patterns(args: &[String]) -> Result<(), Error> {
    let url = need(args, "--pg")?;
    let redis_url = need(args, "--redis")?;
    let slot = need(args, "--slot")?;
    let pid: u32 = need(args, "--pid")?.parse()?;
    let rows: i32 = need(args, "--rows")?.parse()?;
    let reps: u32 = arg(args, "--reps")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let client = pg(&url).await?;
    let mut redis = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let post = client
        .prepare("UPDATE posts SET title = now()::text WHERE id = $1")
        .await?;
    let item = client
        .prepare("UPDATE items SET v = v + 1 WHERE id = $1")
        .await?;
    let confirmed = client
        .prepare(
            "SELECT coalesce(confirmed_flush_lsn >= pg_current_wal_insert_lsn(), false) \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .await?;
    let end_lsn = client
        .prepare("SELECT pg_current_wal_insert_lsn()::text")
        .await?;
    let confirmed_at = client
        .prepare(
            "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .await?;
    // Everything committed so far acknowledged (the worker is idle).
    let caught_up = |deadline: Duration| {
        let client = &client;
        let confirmed = &confirmed;
        let slot = slot.clone();
        async move {
            let started = Instant::now();
            while !client
                .query_one(confirmed, &[&slot])
                .await?
                .get::<_, bool>(0)
            {
                if started.elapsed() > deadline {
                    return Err::<(), Error>("the worker did not catch up".into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        }
    };
    let dbsize: i64 = redis::cmd("DBSIZE").query_async(&mut redis).await?;
    println!("keyspace before the workload: {dbsize} keys");
    let controls: Vec<String> = vec!["post:0:comments:1".into(), "item:0".into()];
    let (mut pass_l, mut bare_l, mut p50_l, mut p99_l, mut drain_l, mut cpu_l) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for rep in 1..=reps {
        caught_up(Duration::from_secs(600)).await?;
        // (a) one pass: a post beyond the workload's rows.
        let id = rows + i32::try_from(rep)?;
        let comments: Vec<String> = (1..=3).map(|c| format!("post:{id}:comments:{c}")).collect();
        let mut pipe = redis::pipe();
        for k in comments.iter().chain(&controls) {
            pipe.cmd("SET").arg(k).arg("cached").ignore();
        }
        let _: () = pipe.query_async(&mut redis).await?;
        client.execute(&post, &[&id]).await?;
        let t = Instant::now();
        wait_gone(
            &mut redis,
            &comments,
            Duration::from_millis(5),
            Duration::from_secs(600),
        )
        .await?;
        let pass = t.elapsed().as_secs_f64();
        caught_up(Duration::from_secs(600)).await?;
        let t = Instant::now();
        let mut cursor: u64 = 0;
        loop {
            let (next, _keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("post:*:comments:*")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut redis)
                .await?;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let bare = t.elapsed().as_secs_f64();

        // (b)-(d): the interleaved workload.
        let mut pipe = redis::pipe();
        for i in 1..=rows {
            for c in 1..=3 {
                pipe.cmd("SET")
                    .arg(format!("post:{i}:comments:{c}"))
                    .arg("cached")
                    .ignore();
            }
            pipe.cmd("SET")
                .arg(format!("item:{i}"))
                .arg("cached")
                .ignore();
        }
        let _: () = pipe.query_async(&mut redis).await?;
        let cpu0 = cpu_seconds(pid).unwrap_or(f64::NAN);
        let started = Instant::now();
        let mut lat = Vec::with_capacity(usize::try_from(rows)?);
        for i in 1..=rows {
            client.execute(&post, &[&i]).await?;
            client.execute(&item, &[&i]).await?;
            let committed = Instant::now();
            let key = format!("item:{i}");
            loop {
                let e: bool = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await?;
                if !e {
                    lat.push(committed.elapsed().as_secs_f64());
                    break;
                }
                if committed.elapsed() > Duration::from_secs(30) {
                    return Err(format!("{key} not invalidated within 30 s").into());
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let end: String = client.query_one(&end_lsn, &[]).await?.get(0);
        while !client
            .query_one(&confirmed_at, &[&slot, &end])
            .await?
            .get::<_, bool>(0)
        {
            if started.elapsed() > Duration::from_secs(1800) {
                return Err("the workload did not drain within 30 min".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid).unwrap_or(f64::NAN) - cpu0;
        // Every comment key of the workload gone; the controls and the filler kept.
        let all: Vec<String> = (1..=rows)
            .flat_map(|i| (1..=3).map(move |c| format!("post:{i}:comments:{c}")))
            .collect();
        let left: i64 = redis::cmd("EXISTS")
            .arg(&all)
            .query_async(&mut redis)
            .await?;
        let kept: i64 = redis::cmd("EXISTS")
            .arg(&controls)
            .query_async(&mut redis)
            .await?;
        let size: i64 = redis::cmd("DBSIZE").query_async(&mut redis).await?;
        let ok = left == 0 && kept == 2 && size >= dbsize;
        lat.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(&lat, 50.0) * 1e3, percentile(&lat, 99.0) * 1e3);
        println!(
            "rep {rep}: pass={pass:.3}s bare={bare:.3}s ratio={:.2} plain_p50={p50:.2}ms plain_p99={p99:.2}ms max={:.2}ms drain={drain:.2}s worker_cpu={cpu:.2}s correct={ok} (left={left} controls={kept}/2 dbsize={size})",
            pass / bare,
            lat.last().copied().unwrap_or(f64::NAN) * 1e3,
        );
        if !ok {
            return Err("wrong keys deleted or kept".into());
        }
        pass_l.push(pass);
        bare_l.push(bare);
        p50_l.push(p50);
        p99_l.push(p99);
        drain_l.push(drain);
        cpu_l.push(cpu);
    }
    let (pass, bare) = (median(pass_l), median(bare_l));
    println!(
        "median of {reps}: pass={pass:.3}s bare={bare:.3}s ratio={:.2} plain_p50={:.2}ms plain_p99={:.2}ms drain={:.2}s worker_cpu={:.2}s",
        pass / bare,
        median(p50_l),
        median(p99_l),
        median(drain_l),
        median(cpu_l)
    );
    Ok(())
}
