#!/usr/bin/env bash
# A/B drain benchmark: which of several worker binaries drains a workload
# faster, with less noise than comparing separate e2e.sh runs. Each round runs
# the workload once, after creating one slot per contender, so every contender
# drains the same WAL; the contenders (the binaries given, then
# pg_recvlogical) drain it one after the other, in an order that rotates from
# round to round, each from the same Redis state. Prints, per contender, the
# medians over the rounds of the drain time, of its ratio to pg_recvlogical in
# the same round, and of its own and Redis's CPU time. See BENCHMARKS.md.
#
#   cargo build --release && cp target/release/cache-invalidator /tmp/ci-a
#   # ... change, build, copy to /tmp/ci-b ...
#   benches/ab.sh /tmp/ci-a /tmp/ci-b                 # 8 rounds of W2 over the unix socket
#   BENCH_ROUNDS=6 BENCH_WORKLOAD=w3 BENCH_TRANSPORT=tcp benches/ab.sh /tmp/ci-a /tmp/ci-b
#   # one build, two configs: BIN+LINE adds LINE to the contender's [postgres]
#   benches/ab.sh /tmp/ci-b '/tmp/ci-b+visibility_check = false'
#   # one build, two mapping directories: BIN%DIR runs the contender on DIR
#   benches/ab.sh /tmp/ci-b '/tmp/ci-b%benches/mappings-refresh'
#
# Environment: BENCH_ROUNDS (8), BENCH_WORKLOAD (w2 or w3), BENCH_TRANSPORT
# (unix or tcp), BENCH_KEEP (keep the temp dir), BENCH_NO_BUILD (do not build
# bench_tool). The binaries are used as given: build them in release mode.
set -euo pipefail

# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"

(($# >= 1)) || die "usage: benches/ab.sh BIN [BIN...] (worker binaries to compare)"
for b in "$@"; do [[ -x ${b%%[+%]*} ]] || die "${b%%[+%]*} is not an executable"; done
ROUNDS=${BENCH_ROUNDS:-8}
WL=${BENCH_WORKLOAD:-w2}
TRANSPORT=${BENCH_TRANSPORT:-unix}
[[ $WL == w2 || $WL == w3 ]] || die "BENCH_WORKLOAD must be w2 or w3"
[[ $TRANSPORT == unix || $TRANSPORT == tcp ]] || die "BENCH_TRANSPORT must be unix or tcp"
CONTENDERS=("$@" pg_recvlogical)
USERS=100000 TXNS=100000 DOCS=200000 SAMPLE=10000

bench_setup_dirs
build_bench_tool
log "temp dir $BENCH_TMP; $WL over $TRANSPORT, $ROUNDS rounds; contenders: ${CONTENDERS[*]}"
start_postgres
start_redis
apply_schema
POLL_URL="host=127.0.0.1 port=$PGPORT user=postgres dbname=bench"
TCK=$(clk_tck)
# The publication, by the first binary's `setup` (its slot is not used).
WORKER_SLOT=ab_setup write_config "$TRANSPORT" "$BENCH_TMP/worker.toml"
"${1%%[+%]*}" --config "$BENCH_TMP/worker.toml" setup >"$BENCH_TMP/setup.log" 2>&1 || { cat "$BENCH_TMP/setup.log" >&2; die setup; }
drop_slot ab_setup

# The application's cache before each worker contender (as e2e.sh: a sample of ids).
CACHE="$BENCH_TMP/cache.redis"
if [[ $WL == w2 ]]; then
    sql "INSERT INTO users (id, name, email) SELECT g, 'user ' || g, 'u' || g || '@bench.invalid' FROM generate_series(1, $USERS) g ON CONFLICT DO NOTHING" >/dev/null
    printf '%s\n' '\set id random(1, :nusers)' 'UPDATE users SET updated_at = now() WHERE id = :id;' >"$BENCH_TMP/w2.sql"
    python3 -c "import random; print('\n'.join(map(str, random.sample(range(1, $USERS + 1), $SAMPLE))))" \
        | awk '{ print "SET user:" $1 ":profile c"; print "SET m:user:" $1 " c"; print "SADD tag:user:" $1 " m:user:" $1; print "SET version:user:" $1 " 5" }' >"$CACHE"
else
    awk -v n="$DOCS" 'BEGIN { pad = sprintf("%200s", ""); gsub(/ /, "x", pad); for (i = 1; i <= n; i++) printf "%d\t%d\t%s %d\n", i, i % 1000, pad, i }' >"$BENCH_TMP/w3.tsv"
    [[ $(id -u) == 0 ]] && chown postgres: "$BENCH_TMP/w3.tsv"
    python3 -c "import random; print('\n'.join(map(str, random.sample(range(1, $DOCS + 1), $SAMPLE))))" \
        | awk '{ print "SET doc:" $1 " c" }' >"$CACHE"
fi
sql "VACUUM ANALYZE" >/dev/null

RESULTS="$BENCH_TMP/ab.tsv"
printf 'round\tcontender\tseconds\tcpu_s\tredis_cpu_s\n' >"$RESULTS"
n=${#CONTENDERS[@]}
for round in $(seq "$ROUNDS"); do
    for ((i = 0; i < n; i++)); do drop_slot "ab_$i"; done
    [[ $WL == w3 ]] && sql "TRUNCATE docs" >/dev/null
    for ((i = 0; i < n; i++)); do
        sql "SELECT pg_create_logical_replication_slot('ab_$i', 'pgoutput')" >/dev/null
    done
    if [[ $WL == w2 ]]; then
        pgbench -n -h "$SOCKDIR" -p "$PGPORT" -U postgres -c 2 -j 2 -t $((TXNS / 2)) \
            -D nusers="$USERS" -f "$BENCH_TMP/w2.sql" bench >"$BENCH_TMP/pgbench.log" 2>&1 \
            || { cat "$BENCH_TMP/pgbench.log" >&2; die pgbench; }
    else
        sql "COPY docs FROM '$BENCH_TMP/w3.tsv'" >/dev/null
    fi
    end=$(sql "SELECT pg_current_wal_insert_lsn()")
    for ((k = 0; k < n; k++)); do
        i=$(((k + round) % n))
        who=${CONTENDERS[$i]}
        slot="ab_$i"
        if [[ $who == pg_recvlogical ]]; then
            times >"$BENCH_TMP/times.0"
            t0=$(now_s)
            "$RECVLOGICAL" -d bench -h "$(pg_host "$TRANSPORT")" -p "$PGPORT" -U postgres --no-loop \
                --start -S "$slot" -P pgoutput -o proto_version=1 -o publication_names="$PUB" \
                --endpos "$end" -f /dev/null 2>>"$BENCH_TMP/recv.log" || die "pg_recvlogical failed"
            t1=$(now_s)
            times >"$BENCH_TMP/times.1"
            secs=$(echo "$t1 - $t0" | bc -l)
            cpu=$(echo "$(children_cpu_s "$BENCH_TMP/times.1") - $(children_cpu_s "$BENCH_TMP/times.0")" | bc -l)
            rcpu=0
        else
            rcli FLUSHALL >/dev/null
            rcli <"$CACHE" >/dev/null
            spec=${who%%\%*}
            mapdir=""
            [[ $who == *%* ]] && mapdir=$(cd "$BENCH_ROOT" && realpath "${who#*%}")
            extra=""
            [[ $spec == *+* ]] && extra=${spec#*+}
            WORKER_SLOT=$slot WORKER_MAPPINGS=$mapdir write_config "$TRANSPORT" "$BENCH_TMP/worker.toml" "$extra"
            c0=$(proc_cpu_ticks "$REDIS_PID")
            out=$("$TOOL" drain --pg "$POLL_URL" --slot "$slot" --end "$end" \
                -- "${spec%%+*}" --config "$BENCH_TMP/worker.toml" run 2>"$BENCH_TMP/worker.log") \
                || { tail -20 "$BENCH_TMP/worker.log" >&2; die "$who: drain failed"; }
            c1=$(proc_cpu_ticks "$REDIS_PID")
            secs=$(sed -n 's/.*seconds=\([^ ]*\).*/\1/p' <<<"$out")
            cpu=$(sed -n 's/.*cpu_s=\([^ ]*\).*/\1/p' <<<"$out")
            rcpu=$(echo "($c1 - $c0) / $TCK" | bc -l)
        fi
        printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$who" "$secs" "$cpu" "$rcpu" >>"$RESULTS"
        log "round $round: $who $(printf %.3f "$secs") s, cpu $(printf %.2f "$cpu") s, redis cpu $(printf %.2f "$rcpu") s"
    done
done

python3 - "$RESULTS" <<'PY'
import csv, statistics, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
recv = {r["round"]: float(r["seconds"]) for r in rows if r["contender"] == "pg_recvlogical"}
by = defaultdict(list)
for r in rows:
    by[r["contender"]].append(r)
print("| contender | rounds | drain s | ratio to pg_recvlogical | CPU s | Redis CPU s | ratios |")
print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
for who, rs in by.items():
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    ratios = sorted(float(r["seconds"]) / recv[r["round"]] for r in rs)
    print(f"| {who} | {len(rs)} | {med('seconds'):.3f} | {statistics.median(ratios):.3f} | {med('cpu_s'):.2f} | {med('redis_cpu_s'):.2f} | {' '.join(f'{x:.2f}' for x in ratios)} |")
PY
