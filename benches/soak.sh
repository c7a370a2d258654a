#!/usr/bin/env bash
# Soak: a mixed workload against throwaway PostgreSQL and Redis while the
# worker is SIGKILLed and restarted periodically; reports lost invalidations
# (must be 0) and the worker's resident memory over time (must be flat).
#
#   benches/soak.sh [DURATION_S]          default 600
#
# Environment:
#   SOAK_KILL_EVERY_S   mean seconds between SIGKILLs (default 20; uniform 0.5x..1.5x)
#   SOAK_TPS            pgbench rate of the background workload (default 300)
#   SOAK_BIN            the binary (default target/release/cache-invalidator,
#                       else target/debug/cache-invalidator)
#   SOAK_KEEP=1         keep the temp dir (logs) at the end
#
# Workload (pgbench, 2 clients, rate-limited):
#   - single-row UPDATEs of `items` (keys),
#   - UPDATEs of `users` (keys, a tag set, a version),
#   - 20-row UPDATE transactions of `items`.
# Lost invalidations are measured with canaries on rows nothing else touches:
# every 200 ms the checker SETs `canary:<id>` and then commits the INSERT of
# row <id>; whatever the kills, each canary key must be gone after the drain.
# Control keys no mapping derives must survive; flushes and fallbacks are
# counted from the logs (a restart must not flush).
set -euo pipefail

# log, die, free_port, pg_bindir, as_pg, rcli (its setup functions are not used here).
# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"

DURATION=${1:-600}
KILL_EVERY=${SOAK_KILL_EVERY_S:-20}
TPS=${SOAK_TPS:-300}
ROOT=$BENCH_ROOT
BIN=${SOAK_BIN:-}
if [[ -z $BIN ]]; then
    BIN="$ROOT/target/release/cache-invalidator"
    [[ -x $BIN ]] || BIN="$ROOT/target/debug/cache-invalidator"
fi
[[ -x $BIN ]] || { echo "no binary: cargo build --release" >&2; exit 1; }

TMP=$(mktemp -d /tmp/ci-soak.XXXXXX)
chmod 755 "$TMP"
PGBIN=$(pg_bindir)
PGPORT=$(free_port)
REDIS_PORT=$(free_port)
SOCK="$TMP/sock"
mkdir -p "$SOCK" "$TMP/mappings"
WORKER_PID=
PGBENCH_PID=
REDIS_PID=

cleanup() {
    set +e
    [[ -n $PGBENCH_PID ]] && kill "$PGBENCH_PID" 2>/dev/null
    [[ -n $WORKER_PID ]] && kill -9 "$WORKER_PID" 2>/dev/null
    [[ -n $REDIS_PID ]] && kill -9 "$REDIS_PID" 2>/dev/null
    as_pg "$PGBIN/pg_ctl" -D "$TMP/pgdata" -m immediate stop >/dev/null 2>&1
    if [[ ${SOAK_KEEP:-0} == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

psql_() { "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -U postgres -h "$SOCK" -p "$PGPORT" -d postgres "$@"; }

# --- servers -----------------------------------------------------------------
[[ $(id -u) == 0 ]] && chown -R postgres: "$TMP"
as_pg "$PGBIN/initdb" -D "$TMP/pgdata" -U postgres -A trust -E UTF8 --no-locale >"$TMP/initdb.log" 2>&1 \
    || { cat "$TMP/initdb.log" >&2; die initdb; }
cat >>"$TMP/pgdata/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$SOCK'
wal_level = logical
max_replication_slots = 8
max_wal_senders = 8
fsync = off
synchronous_commit = off
full_page_writes = off
max_slot_wal_keep_size = 4GB
CONF
as_pg "$PGBIN/pg_ctl" -D "$TMP/pgdata" -l "$TMP/postgres.log" -w -t 60 start >/dev/null || die "postgres did not start"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" \
    --logfile "$TMP/redis.log" --daemonize no &
REDIS_PID=$!
for _ in $(seq 100); do rcli PING >/dev/null 2>&1 && break; sleep 0.05; done

# --- schema, mappings, setup ---------------------------------------------------
psql_ <<'SQL'
CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
INSERT INTO items (id) SELECT g FROM generate_series(1, 100000) g;
CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL DEFAULT '');
INSERT INTO users (id) SELECT g FROM generate_series(1, 10000) g;
CREATE TABLE canaries (id int PRIMARY KEY);
SQL
cat >"$TMP/mappings/soak.toml" <<'TOML'
[[table]]
name = "items"
keys = ["item:{id}"]

[[table]]
name = "users"
keys = ["user:{id}:profile"]
tags = ["user:{id}"]
versions = ["user:{id}"]

[[table]]
name = "canaries"
keys = ["canary:{id}"]
truncate = "none"
TOML
cat >"$TMP/cache-invalidator.toml" <<TOML
mappings = "mappings"

[postgres]
url = "postgres://postgres@127.0.0.1:$PGPORT/postgres"
slot = "cache_invalidator"
publication = "cache_invalidator"

[redis]
url = "redis://127.0.0.1:$REDIS_PORT/0"
TOML
CFG="$TMP/cache-invalidator.toml"
"$BIN" --config "$CFG" setup >"$TMP/setup.log" 2>&1 || { cat "$TMP/setup.log" >&2; die setup; }

for i in $(seq 1 100); do echo "SET control:$i kept"; done | rcli >/dev/null

# --- workload ------------------------------------------------------------------
cat >"$TMP/item.sql" <<'SQL'
\set id random(1, 100000)
UPDATE items SET v = v + 1 WHERE id = :id;
SQL
cat >"$TMP/user.sql" <<'SQL'
\set id random(1, 10000)
UPDATE users SET name = md5(random()::text) WHERE id = :id;
SQL
cat >"$TMP/multi.sql" <<'SQL'
\set id random(1, 99980)
UPDATE items SET v = v + 1 WHERE id >= :id AND id < :id + 20;
SQL

WORKER_N=0
start_worker() {
    WORKER_N=$((WORKER_N + 1))
    RUST_LOG=info nice -n 10 "$BIN" --config "$CFG" run >"$TMP/worker-$WORKER_N.log" 2>&1 &
    WORKER_PID=$!
    WORKER_STARTED=$(date +%s)
}

start_worker
log "soak: ${DURATION}s, SIGKILL every ~${KILL_EVERY}s, ${TPS} tps background, binary $BIN"
nice -n 10 "$PGBIN/pgbench" -n -h "$SOCK" -p "$PGPORT" -U postgres -c 2 -j 1 -R "$TPS" -T "$DURATION" \
    -f "$TMP/item.sql@6" -f "$TMP/user.sql@3" -f "$TMP/multi.sql@1" postgres >"$TMP/pgbench.log" 2>&1 &
PGBENCH_PID=$!

START=$(date +%s)
NEXT_KILL=$((START + KILL_EVERY / 2 + RANDOM % (KILL_EVERY + 1)))
NEXT_SAMPLE=$START
CANARY=0
KILLS=0
printf 'elapsed_s\trss_kb\tlag_bytes\tcanaries\tkills\n' >"$TMP/rss.tsv"
while (( $(date +%s) - START < DURATION )); do
    # A canary: cache first, then commit the row change that must invalidate it.
    CANARY=$((CANARY + 1))
    rcli SET "canary:$CANARY" cached >/dev/null
    psql_ -c "INSERT INTO canaries VALUES ($CANARY)"
    now=$(date +%s)
    if (( now >= NEXT_KILL )); then
        kill -9 "$WORKER_PID" 2>/dev/null || true
        wait "$WORKER_PID" 2>/dev/null || true
        KILLS=$((KILLS + 1))
        start_worker
        NEXT_KILL=$((now + KILL_EVERY / 2 + RANDOM % (KILL_EVERY + 1)))
    fi
    # RSS of a worker at least 3 s old (not one still starting up).
    if (( now >= NEXT_SAMPLE && now - WORKER_STARTED >= 3 )); then
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$WORKER_PID/status" 2>/dev/null || echo 0)
        lag=$(psql_ -c "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'")
        printf '%s\t%s\t%s\t%s\t%s\n' $((now - START)) "${rss:-0}" "$lag" "$CANARY" "$KILLS" >>"$TMP/rss.tsv"
        NEXT_SAMPLE=$((now + 10))
    fi
    sleep 0.2
done
wait "$PGBENCH_PID" || true
PGBENCH_PID=

# --- drain and account ---------------------------------------------------------
# A final canary the running worker must delete: everything before it is applied.
FINAL=$((CANARY + 1))
rcli SET "canary:$FINAL" cached >/dev/null
psql_ -c "INSERT INTO canaries VALUES ($FINAL)"
for _ in $(seq 1200); do
    [[ $(rcli EXISTS "canary:$FINAL") == 0 ]] && break
    sleep 0.1
done
[[ $(rcli EXISTS "canary:$FINAL") == 0 ]] || die "the worker did not drain within 120 s"
LOST=0
for i in $(seq 1 "$CANARY"); do echo "EXISTS canary:$i"; done | rcli | grep -c '^1$' >"$TMP/lost" || true
LOST=$(cat "$TMP/lost")
CONTROL=$(for i in $(seq 1 100); do echo "EXISTS control:$i"; done | rcli | grep -c '^1$' || true)
FLUSHES=$(cat "$TMP"/worker-*.log | grep -c "flushed every mapped table" || true)
MARKERS=$(cat "$TMP"/worker-*.log | grep -c "flush marker: firing" || true)
FALLBACKS=$(cat "$TMP"/worker-*.log | grep -c "a value needed by a mapping was unknown" || true)
TPS_DONE=$(grep -Eo 'tps = [0-9.]+' "$TMP/pgbench.log" | head -1 || true)

echo
echo "RSS over time (KiB), replication lag (bytes):"
column -t "$TMP/rss.tsv"
RSS_MIN=$(awk 'NR > 2 && $2 > 0 {print $2}' "$TMP/rss.tsv" | sort -n | head -1)
RSS_MAX=$(awk 'NR > 2 && $2 > 0 {print $2}' "$TMP/rss.tsv" | sort -n | tail -1)
echo
echo "duration_s=$DURATION kills=$KILLS canaries=$CANARY lost_invalidations=$LOST"
echo "control_keys_kept=$CONTROL/100 flush_markers=$MARKERS identity_flushes=$FLUSHES fallbacks=$FALLBACKS"
echo "background: pgbench $TPS_DONE; worker RSS min=${RSS_MIN:-?} KiB max=${RSS_MAX:-?} KiB"
(( LOST == 0 )) || die "$LOST lost invalidations"
(( CONTROL == 100 )) || die "control keys deleted"
(( FLUSHES == 0 )) || die "a restart flushed"
