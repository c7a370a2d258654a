#!/usr/bin/env bash
# End-to-end drain benchmark: cache-invalidator against pg_recvlogical, on one
# machine, in one run. See BENCHMARKS.md for what is measured and why.
#
#   benches/e2e.sh                        # 3 runs of W1, W2, W3 over TCP and the unix socket
#   BENCH_QUICK=1 BENCH_RUNS=1 benches/e2e.sh        # smoke test, small sizes
#   BENCH_WORKLOADS=w1 BENCH_TRANSPORTS=unix benches/e2e.sh
#
# Environment: BENCH_RUNS (3), BENCH_WORKLOADS (w1,w2,w3), BENCH_TRANSPORTS
# (tcp,unix), BENCH_QUICK (0), BENCH_SAMPLE (10000 keys checked per run),
# BENCH_NO_BUILD (use the existing target/release), BENCH_KEEP (keep the temp
# dir), BENCH_OUT (also write the result table there), BENCH_MAX_BATCH_OPS,
# BENCH_MAX_BATCH_DELAY_MS ([worker] settings).
set -euo pipefail

# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"

RUNS=${BENCH_RUNS:-3}
WORKLOADS=${BENCH_WORKLOADS:-w1,w2,w3}
TRANSPORTS=${BENCH_TRANSPORTS:-tcp,unix}
SAMPLE=${BENCH_SAMPLE:-10000}
if [[ ${BENCH_QUICK:-0} == 1 ]]; then
    W1_ROWS=20000; W2_TXNS=4000; W2_USERS=2000; W3_ROWS=5000
else
    W1_ROWS=1000000; W2_TXNS=100000; W2_USERS=100000; W3_ROWS=200000
fi
OWNERS=1000

bench_setup_dirs
build_release
build_bench_tool

log "temp dir $BENCH_TMP; postgres :$PGPORT (socket $SOCKDIR), redis :$REDIS_PORT"
start_postgres
start_redis
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
POLL_URL="host=127.0.0.1 port=$PGPORT user=postgres dbname=bench"
apply_schema

log "loading: items $W1_ROWS rows, users $W2_USERS rows"
sql "INSERT INTO items SELECT g, g % $OWNERS, 0 FROM generate_series(1, $W1_ROWS) g ON CONFLICT DO NOTHING" >/dev/null
sql "INSERT INTO users (id, name, email) SELECT g, 'user ' || g, 'u' || g || '@bench.invalid' FROM generate_series(1, $W2_USERS) g ON CONFLICT DO NOTHING" >/dev/null
sql "VACUUM ANALYZE" >/dev/null
# W3's COPY source: id, owner_id, ~200 bytes of text; written once, read by the server.
W3_FILE="$BENCH_TMP/w3.tsv"
awk -v n="$W3_ROWS" -v o="$OWNERS" 'BEGIN {
    pad = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo";
    for (i = 1; i <= n; i++) printf "%d\t%d\t%s %d\n", i, i % o, substr(pad, 1, 200), i }' >"$W3_FILE"
[[ $(id -u) == 0 ]] && chown postgres: "$W3_FILE"
W2_SCRIPT="$BENCH_TMP/w2.sql"
printf '%s\n' '\set id random(1, :nusers)' 'UPDATE users SET updated_at = now() WHERE id = :id;' >"$W2_SCRIPT"

RESULTS="$BENCH_TMP/results.tsv"
printf 'workload\ttransport\trun\trows\trecv_s\tworker_s\trss_kb\tredis_cpu_s\tfallbacks\trecv_cpu_s\tworker_cpu_s\n' >"$RESULTS"
TCK=$(clk_tck)

# A sample of ids: all of 1..n when n <= SAMPLE, else SAMPLE random ones.
sample_ids() { python3 -c "import random,sys; n,k=int(sys.argv[1]),int(sys.argv[2]); ids=range(1,n+1) if n<=k else random.sample(range(1,n+1),k); print('\n'.join(map(str,ids)))" "$1" "$SAMPLE"; }

# The application's cache before the workload: keys the workload must invalidate.
prepare_cache() {
    local wl=$1
    sample_ids "$2" >"$BENCH_TMP/sample"
    case $wl in
    w1) awk -v o="$OWNERS" '{ print "SET item:" $1 " c" } END { for (i = 0; i < o; i++) print "SET owner:" i ":items c" }' "$BENCH_TMP/sample" ;;
    w2) awk '{ print "SET user:" $1 ":profile c"; print "SET m:user:" $1 " c"; print "SADD tag:user:" $1 " m:user:" $1; print "SET version:user:" $1 " 5" }' "$BENCH_TMP/sample" ;;
    w3) awk -v o="$OWNERS" '{ print "SET doc:" $1 " c" } END { for (i = 0; i < o; i++) print "SET owner:" i ":docs c" }' "$BENCH_TMP/sample" ;;
    esac | rcli >/dev/null
}

# Every sampled key the workload touched is gone (tags: member and set gone,
# versions bumped); untouched sampled keys are still there.
check_cache() {
    local wl=$1 bad
    case $wl in
    w1) bad=$(awk -v o="$OWNERS" '{ print "EXISTS item:" $1 } END { for (i = 0; i < o; i++) print "EXISTS owner:" i ":items" }' "$BENCH_TMP/sample" | rcli | grep -vc '^0$' || true) ;;
    w3) bad=$(awk -v o="$OWNERS" '{ print "EXISTS doc:" $1 } END { for (i = 0; i < o; i++) print "EXISTS owner:" i ":docs" }' "$BENCH_TMP/sample" | rcli | grep -vc '^0$' || true) ;;
    w2)
        sql "SELECT id FROM users WHERE updated_at >= '$W2_T0'" | sort >"$BENCH_TMP/touched"
        sort "$BENCH_TMP/sample" >"$BENCH_TMP/sample.sorted"
        join "$BENCH_TMP/sample.sorted" "$BENCH_TMP/touched" >"$BENCH_TMP/hit"
        comm -23 "$BENCH_TMP/sample.sorted" "$BENCH_TMP/touched" >"$BENCH_TMP/miss"
        bad=$(awk '{ print "EXISTS user:" $1 ":profile"; print "EXISTS m:user:" $1; print "EXISTS tag:user:" $1 }' "$BENCH_TMP/hit" | rcli | grep -vc '^0$' || true)
        bad=$((bad + $(awk '{ print "GET version:user:" $1 }' "$BENCH_TMP/hit" | rcli | awk '$1 <= 5' | wc -l)))
        local kept
        kept=$(awk '{ print "EXISTS user:" $1 ":profile" }' "$BENCH_TMP/miss" | rcli | grep -vc '^1$' || true)
        [[ $kept == 0 ]] || die "w2: $kept untouched users lost their key"
        log "w2: $(wc -l <"$BENCH_TMP/hit") sampled users updated, $(wc -l <"$BENCH_TMP/miss") not"
        ;;
    esac
    [[ $bad == 0 ]] || die "$wl: $bad sampled keys were not invalidated"
}

run_workload() {
    case $1 in
    w1) sql "UPDATE items SET v = v + 1" >/dev/null ;;
    w2)
        W2_T0=$(sql "SELECT now()")
        pgbench -n -h "$SOCKDIR" -p "$PGPORT" -U postgres -c 2 -j 2 -t $((W2_TXNS / 2)) \
            -D nusers="$W2_USERS" -f "$W2_SCRIPT" bench >"$BENCH_TMP/pgbench.log" 2>&1 \
            || { cat "$BENCH_TMP/pgbench.log" >&2; die pgbench; }
        ;;
    w3) sql "COPY docs FROM '$W3_FILE'" >/dev/null ;;
    esac
}

rows_of() { case $1 in w1) echo "$W1_ROWS" ;; w2) echo "$W2_TXNS" ;; w3) echo "$W3_ROWS" ;; esac; }

# Prints "seconds cpu_seconds" of pg_recvlogical.
time_recv() {
    local transport=$1 end=$2 t0 t1 c0 c1
    times >"$BENCH_TMP/times.0"
    t0=$(now_s)
    "$RECVLOGICAL" -d bench -h "$(pg_host "$transport")" -p "$PGPORT" -U postgres --no-loop \
        --start -S "$RECV_SLOT" -P pgoutput -o proto_version=1 -o publication_names="$PUB" \
        --endpos "$end" -f /dev/null 2>>"$BENCH_TMP/recv.log" || die "pg_recvlogical failed: $(tail -3 "$BENCH_TMP/recv.log")"
    t1=$(now_s)
    times >"$BENCH_TMP/times.1"
    c0=$(children_cpu_s "$BENCH_TMP/times.0")
    c1=$(children_cpu_s "$BENCH_TMP/times.1")
    echo "$(echo "$t1 - $t0" | bc -l) $(echo "$c1 - $c0" | bc -l)"
}

# Prints "seconds rss_kb redis_cpu_s fallbacks cpu_s".
time_worker() {
    local transport=$1 end=$2 cfg="$BENCH_TMP/worker-$1.toml" cpu0 cpu1 out wlog
    wlog="$BENCH_TMP/worker-$transport-$3.log"
    cpu0=$(proc_cpu_ticks "$REDIS_PID")
    out=$("$TOOL" drain --pg "$POLL_URL" --slot "$WORKER_SLOT" --end "$end" --metrics "127.0.0.1:$METRICS_PORT" \
        -- "$BIN" --config "$cfg" run 2>"$wlog") || { tail -20 "$wlog" >&2; die "worker drain failed"; }
    cpu1=$(proc_cpu_ticks "$REDIS_PID")
    if grep -q "a value needed by a mapping was unknown" "$wlog"; then
        grep "a value needed" "$wlog" | head -3 >&2
        die "the worker fired a fallback"
    fi
    if grep -E "ERROR|WARN" "$wlog" | grep -vq "flush marker"; then
        log "worker warnings (first 5):"
        grep -E "ERROR|WARN" "$wlog" | grep -v "flush marker" | head -5 >&2
    fi
    local secs rss fb cpu
    secs=$(sed -n 's/.*seconds=\([^ ]*\).*/\1/p' <<<"$out")
    cpu=$(sed -n 's/.*cpu_s=\([^ ]*\).*/\1/p' <<<"$out")
    rss=$(sed -n 's/.*rss_kb=\([^ ]*\).*/\1/p' <<<"$out")
    fb=$(sed -n 's/.*fallbacks=\([^ ]*\).*/\1/p' <<<"$out")
    [[ $fb == na || $fb == 0 ]] || die "fallbacks_total = $fb"
    echo "$secs $rss $(echo "($cpu1 - $cpu0) / $TCK" | bc -l) $fb $cpu"
}

one_run() {
    local wl=$1 transport=$2 run=$3 n end recv worker
    n=$(rows_of "$wl")
    write_config "$transport" "$BENCH_TMP/worker-$transport.toml"
    drop_slot "$WORKER_SLOT"
    drop_slot "$RECV_SLOT"
    [[ $wl == w3 ]] && sql "TRUNCATE docs" >/dev/null
    sql "VACUUM items, users, docs" >/dev/null
    rcli FLUSHALL >/dev/null
    # Both slots before the workload; the worker's by `setup` (publication, slot, marker).
    "$BIN" --config "$BENCH_TMP/worker-$transport.toml" setup >"$BENCH_TMP/setup.log" 2>&1 \
        || { cat "$BENCH_TMP/setup.log" >&2; die setup; }
    sql "SELECT pg_create_logical_replication_slot('$RECV_SLOT', 'pgoutput')" >/dev/null
    case $wl in w1) prepare_cache w1 "$W1_ROWS" ;; w2) prepare_cache w2 "$W2_USERS" ;; w3) prepare_cache w3 "$W3_ROWS" ;; esac
    local t0 t1
    t0=$(now_s)
    run_workload "$wl"
    t1=$(now_s)
    end=$(sql "SELECT pg_current_wal_insert_lsn()")
    log "$wl/$transport run $run: workload took $(printf %.1f "$(echo "$t1 - $t0" | bc -l)") s, end LSN $end"
    # Alternate who goes first, so neither always finds the WAL in the page cache.
    if ((run % 2 == 1)); then
        recv=$(time_recv "$transport" "$end")
        worker=$(time_worker "$transport" "$end" "$wl-$run")
    else
        worker=$(time_worker "$transport" "$end" "$wl-$run")
        recv=$(time_recv "$transport" "$end")
    fi
    check_cache "$wl"
    read -r ws rss rcpu fb wcpu <<<"$worker"
    read -r recv recv_cpu <<<"$recv"
    log "$wl/$transport run $run: pg_recvlogical $(printf %.2f "$recv") s, worker $(printf %.2f "$ws") s (x$(printf %.2f "$(echo "$ws / $recv" | bc -l)")), rss $((rss / 1024)) MB, cpu: pg_recvlogical $(printf %.2f "$recv_cpu") s, worker $(printf %.2f "$wcpu") s, redis $(printf %.2f "$rcpu") s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$transport" "$run" "$n" "$recv" "$ws" "$rss" "$rcpu" "$fb" "$recv_cpu" "$wcpu" >>"$RESULTS"
}

for run in $(seq "$RUNS"); do
    for wl in ${WORKLOADS//,/ }; do
        for transport in ${TRANSPORTS//,/ }; do
            one_run "$wl" "$transport" "$run"
        done
    done
done

python3 "$BENCH_ROOT/benches/summarize.py" "$RESULTS" | tee "${BENCH_OUT:-/dev/null}"
log "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
