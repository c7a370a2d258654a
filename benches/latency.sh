#!/usr/bin/env bash
# Commit-to-invalidated latency at a steady load (see BENCHMARKS.md).
#
#   benches/latency.sh                  # 1,000 tx/s for 20 s, over TCP
#   BENCH_RATE=500 BENCH_SECONDS=10 BENCH_TRANSPORTS=unix benches/latency.sh
#
# pgbench keeps BENCH_RATE single-row UPDATEs of users per second (2 clients)
# while benches/bench_tool.rs probes 50 times a second on other users: cache a
# key, a tagged key and a version, commit an UPDATE, poll Redis until all three
# are invalidated. The worker's own histogram is read from /metrics when served.
set -euo pipefail

# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"

RATE=${BENCH_RATE:-1000}
SECONDS_=${BENCH_SECONDS:-20}
TRANSPORTS=${BENCH_TRANSPORTS:-tcp}
USERS=20000
LOAD_USERS=10000

bench_setup_dirs
build_release
build_bench_tool
start_postgres
start_redis
apply_schema
sql "INSERT INTO users (id, name, email) SELECT g, 'user ' || g, 'u' || g || '@bench.invalid' FROM generate_series(1, $USERS) g ON CONFLICT DO NOTHING" >/dev/null
SCRIPT="$BENCH_TMP/load.sql"
printf '%s\n' '\set id random(1, :nusers)' 'UPDATE users SET updated_at = now() WHERE id = :id;' >"$SCRIPT"

for transport in ${TRANSPORTS//,/ }; do
    cfg="$BENCH_TMP/worker-$transport.toml"
    write_config "$transport" "$cfg"
    drop_slot "$WORKER_SLOT"
    "$BIN" --config "$cfg" setup >"$BENCH_TMP/setup.log" 2>&1 || { cat "$BENCH_TMP/setup.log" >&2; die setup; }
    "$BIN" --config "$cfg" run 2>"$BENCH_TMP/worker-$transport.log" &
    WORKER_PID=$!
    end=$(sql "SELECT pg_current_wal_insert_lsn()")
    for _ in $(seq 300); do lsn_ge "$(confirmed_lsn)" "$end" && break; sleep 0.1; done
    log "$transport: worker caught up; $RATE tx/s for $SECONDS_ s"
    pgbench -n -h "$(pg_host "$transport")" -p "$PGPORT" -U postgres -c 2 -j 2 -R "$RATE" -T "$SECONDS_" \
        -D nusers="$LOAD_USERS" -f "$SCRIPT" bench >"$BENCH_TMP/pgbench.log" 2>&1 &
    PGBENCH_PID=$!
    echo "== latency, $transport, $RATE tx/s + probes"
    "$TOOL" latency --pg "host=$(pg_host "$transport") port=$PGPORT user=postgres dbname=bench" \
        --redis "redis://127.0.0.1:$REDIS_PORT/0" --first-id $((LOAD_USERS + 1)) \
        --duration "$SECONDS_" --metrics "127.0.0.1:$METRICS_PORT"
    wait "$PGBENCH_PID" || { cat "$BENCH_TMP/pgbench.log" >&2; die pgbench; }
    grep -E '^(tps|latency average|number of transactions actually processed)' "$BENCH_TMP/pgbench.log" | sed 's/^/pgbench: /'
    echo "worker peak RSS: $(awk '/VmHWM/ {print $2 / 1024 " MB"}' "/proc/$WORKER_PID/status")"
    kill "$WORKER_PID"
    wait "$WORKER_PID" || true
    WORKER_PID=
    grep -q "a value needed by a mapping was unknown" "$BENCH_TMP/worker-$transport.log" && die "fallback fired"
done
