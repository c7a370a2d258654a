#!/usr/bin/env bash
# Pattern passes at scale (see BENCHMARKS.md, "What `patterns.sh` does").
#
#   benches/patterns.sh                          # keyspaces of 0, 1,000,000, 5,000,000 keys
#   BENCH_KEYSPACES="0 1000000" BENCH_ROWS=500 benches/patterns.sh
#   BENCH_SCAN_COUNTS="1000 250" benches/patterns.sh   # contenders for [worker] pattern_scan_count
#   BENCH_YIELDS="true false" benches/patterns.sh      # contenders for [worker] pattern_pass_yield
#
# Throwaway PostgreSQL and Redis. Per keyspace size: Redis is emptied and
# filled with unrelated keys (DEBUG POPULATE), the worker started, and
# benches/bench_tool.rs `patterns` runs 3 repetitions of: one pattern pass
# against a bare `SCAN ... MATCH` pass from the same machine (a), then
# BENCH_ROWS update transactions on `posts` (keys = post:{id}, patterns =
# post:{id}:comments:*) interleaved with BENCH_ROWS on `items` (keys =
# item:{id}), measuring the plain keys' commit-to-deleted latency (b), the
# drain time (c) and the worker's CPU (d). It prints each repetition and the
# medians, and fails if a comment key survived or another key was deleted.
set -euo pipefail

# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"

KEYSPACES=${BENCH_KEYSPACES:-"0 1000000 5000000"}
ROWS=${BENCH_ROWS:-2000}
REPS=${BENCH_REPS:-3}
SCAN_COUNTS=${BENCH_SCAN_COUNTS:-1000}
YIELDS=${BENCH_YIELDS:-false}
export BENCH_REDIS_ARGS="--enable-debug-command local"

bench_setup_dirs
build_release
build_bench_tool
start_postgres
start_redis
sql "CREATE TABLE posts (id int PRIMARY KEY, title text);
     CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
     INSERT INTO posts (id) SELECT g FROM generate_series(0, $ROWS + $REPS) g;
     INSERT INTO items (id) SELECT g FROM generate_series(0, $ROWS) g;" >/dev/null
mkdir -p "$BENCH_TMP/mappings"
cat >"$BENCH_TMP/mappings/patterns.toml" <<'TOML'
[[table]]
name = "posts"
keys = ["post:{id}"]
patterns = ["post:{id}:comments:*"]

[[table]]
name = "items"
keys = ["item:{id}"]
TOML
cfg="$BENCH_TMP/worker.toml"
cat >"$cfg" <<CONF
mappings = "$BENCH_TMP/mappings"

[postgres]
url = "$(pg_url tcp)"
slot = "$WORKER_SLOT"
publication = "$PUB"

[redis]
url = "redis://127.0.0.1:$REDIS_PORT/0"

[worker]
max_batch_delay_ms = ${BENCH_MAX_BATCH_DELAY_MS:-5}
pattern_scan_count = 1000
pattern_pass_yield = false

[metrics]
listen = "127.0.0.1:$METRICS_PORT"
CONF
"$BIN" --config "$cfg" setup >"$BENCH_TMP/setup.log" 2>&1 || { cat "$BENCH_TMP/setup.log" >&2; die setup; }

log "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for keys in $KEYSPACES; do
    rcli FLUSHALL >/dev/null
    if ((keys > 0)); then
        log "filling Redis with $keys unrelated keys"
        rcli DEBUG POPULATE "$keys" key 10 >/dev/null
    fi
    for contender in $(for c in $SCAN_COUNTS; do for y in $YIELDS; do echo "$c/$y"; done; done); do
        count=${contender%/*} yield=${contender#*/}
        sed -e "s/^pattern_scan_count = .*/pattern_scan_count = $count/" \
            -e "s/^pattern_pass_yield = .*/pattern_pass_yield = $yield/" "$cfg" >"$cfg.$count.$yield"
        "$BIN" --config "$cfg.$count.$yield" run 2>"$BENCH_TMP/worker-$keys-$count-$yield.log" &
        WORKER_PID=$!
        # FLUSHALL removed the worker's identity record: let its identity flush
        # (guarantee 6) happen now, not in the middle of the first repetition.
        sql "UPDATE items SET v = v WHERE id = 0" >/dev/null
        for _ in $(seq 1200); do
            [[ $(rcli EXISTS "cache-invalidator:$WORKER_SLOT:identity") == 1 ]] && break
            sleep 0.1
        done
        echo "== keyspace $keys, pattern_scan_count $count, pattern_pass_yield $yield, $ROWS + $ROWS transactions, $REPS repetitions (load average $(cut -d' ' -f1-3 /proc/loadavg))"
        "$TOOL" patterns --pg "host=127.0.0.1 port=$PGPORT user=postgres dbname=bench" \
            --redis "redis://127.0.0.1:$REDIS_PORT/0" --slot "$WORKER_SLOT" --pid "$WORKER_PID" \
            --rows "$ROWS" --reps "$REPS"
        echo "worker: passes $(metric_sum cache_invalidator_pattern_pass_seconds_count), pass seconds total $(metric_sum cache_invalidator_pattern_pass_seconds_sum), peak RSS $(awk '/VmHWM/ {print $2 / 1024 " MB"}' "/proc/$WORKER_PID/status")"
        kill "$WORKER_PID"
        wait "$WORKER_PID" || true
        WORKER_PID=
    done
done
