# shellcheck shell=bash
# Shared by ab.sh, e2e.sh, latency.sh and patterns.sh: throwaway PostgreSQL
# and Redis, the release binary, the worker's config. Source it;
# bench_setup_dirs sets a trap that stops everything it started and removes
# its temp dir. soak.sh takes only its small helpers (log, die, free_port,
# pg_bindir, as_pg, rcli).

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BENCH_BIN:-"$BENCH_ROOT/target/release/cache-invalidator"}
PUB=bench
WORKER_SLOT=bench_worker
RECV_SLOT=bench_recv

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pg_bindir() {
    local d
    d=$(pg_config --bindir 2>/dev/null || true)
    if [[ -x "$d/initdb" ]]; then echo "$d"; return; fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

bench_setup_dirs() {
    BENCH_TMP=$(mktemp -d /tmp/ci-bench.XXXXXX)
    chmod 755 "$BENCH_TMP"
    PGDATA_DIR="$BENCH_TMP/pgdata"
    SOCKDIR="$BENCH_TMP/sock"
    mkdir -p "$SOCKDIR"
    PGPORT=$(free_port)
    REDIS_PORT=$(free_port)
    METRICS_PORT=$(free_port)
    PGBIN=$(pg_bindir)
    [[ -x "$PGBIN/initdb" ]] || die "no PostgreSQL binaries (initdb) found"
    command -v redis-server >/dev/null || die "redis-server not found"
    # The server's own pg_recvlogical, not Debian's /usr/bin wrapper: the
    # wrapper is a Perl script that adds ~30 ms of start-up to every timed run.
    RECVLOGICAL="$PGBIN/pg_recvlogical"
    [[ -x "$RECVLOGICAL" ]] || RECVLOGICAL=$(command -v pg_recvlogical) || die "pg_recvlogical not found"
    trap bench_cleanup EXIT
}

# As root, PostgreSQL runs as the `postgres` OS user in directories it owns.
as_pg() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
    if [[ $(id -u) == 0 ]]; then chown -R postgres: "$BENCH_TMP"; fi
    as_pg "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$BENCH_TMP/initdb.log" 2>&1 \
        || as_pg "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 --no-locale >"$BENCH_TMP/initdb.log" 2>&1 \
        || { cat "$BENCH_TMP/initdb.log" >&2; die "initdb"; }
    cat >>"$PGDATA_DIR/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$SOCKDIR'
wal_level = logical
max_replication_slots = 16
max_wal_senders = 16
fsync = off
synchronous_commit = on
# (off would let the WAL sender see a commit only at the WAL writer's next flush,
# up to wal_writer_delay = 200 ms later: latency.sh would measure that)
full_page_writes = off
shared_buffers = 256MB
max_wal_size = 8GB
checkpoint_timeout = 30min
autovacuum = off
logging_collector = off
CONF
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$BENCH_TMP/postgres.log" -w -t 60 start >/dev/null \
        || { cat "$BENCH_TMP/postgres.log" >&2; die "postgres did not start"; }
    PG_STARTED=1
    psql_admin -d postgres -c "CREATE DATABASE bench" >/dev/null
}

start_redis() {
    # shellcheck disable=SC2086 # BENCH_REDIS_ARGS: extra arguments, word-split on purpose
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no ${BENCH_REDIS_ARGS:-} \
        --dir "$BENCH_TMP" --logfile "$BENCH_TMP/redis.log" --daemonize no &
    REDIS_PID=$!
    for _ in $(seq 100); do
        rcli PING >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    die "redis-server did not start"
}

bench_cleanup() {
    local rc=$?
    [[ -n "${WORKER_PID:-}" ]] && kill "$WORKER_PID" 2>/dev/null
    [[ -n "${REDIS_PID:-}" ]] && kill "$REDIS_PID" 2>/dev/null
    if [[ -n "${PG_STARTED:-}" ]]; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m immediate stop >/dev/null 2>&1 || true
    fi
    wait 2>/dev/null
    if [[ -n "${BENCH_KEEP:-}" ]]; then log "kept $BENCH_TMP"; else rm -rf "$BENCH_TMP"; fi
    exit "$rc"
}

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -At -h "$SOCKDIR" -p "$PGPORT" -U postgres "$@"; }
sql() { psql_admin -d bench -c "$1"; }
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }

# transport -> libpq host argument for the client tools.
pg_host() { if [[ $1 == unix ]]; then echo "$SOCKDIR"; else echo 127.0.0.1; fi; }

pg_url() {
    if [[ $1 == unix ]]; then
        echo "postgres://postgres@/bench?host=$SOCKDIR&port=$PGPORT&sslmode=disable"
    else
        echo "postgres://postgres@127.0.0.1:$PGPORT/bench?sslmode=disable"
    fi
}

# write_config TRANSPORT FILE [POSTGRES_LINES]
# POSTGRES_LINES (default $BENCH_POSTGRES_EXTRA) go into [postgres], e.g.
# "visibility_check = false" to measure the visibility check's cost.
write_config() {
    cat >"$2" <<CONF
mappings = "${WORKER_MAPPINGS:-$BENCH_ROOT/benches/mappings}"

[postgres]
url = "$(pg_url "$1")"
slot = "$WORKER_SLOT"
publication = "$PUB"
${3:-${BENCH_POSTGRES_EXTRA:-}}

[redis]
url = "redis://127.0.0.1:$REDIS_PORT/0"

[worker]
max_batch_delay_ms = ${BENCH_MAX_BATCH_DELAY_MS:-5}
max_batch_ops = ${BENCH_MAX_BATCH_OPS:-10000}

[metrics]
listen = "127.0.0.1:$METRICS_PORT"
CONF
}

apply_schema() {
    local f
    for f in "$BENCH_ROOT"/migrations/*.sql "$BENCH_ROOT/benches/schema.sql"; do
        psql_admin -d bench -f "$f" >/dev/null
    done
}

build_release() {
    if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
        log "cargo build --release"
        (cd "$BENCH_ROOT" && cargo build --release --quiet --bin cache-invalidator "$@") || die "build"
    fi
    [[ -x "$BIN" ]] || die "$BIN missing"
}

# The helper `benches/bench_tool.rs` (an example, so the measured binary has
# no test features) unless BENCH_NO_BUILD; sets TOOL to its path.
build_bench_tool() {
    if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
        (cd "$BENCH_ROOT" && cargo build --release --quiet --example bench_tool) || die "build bench_tool"
    fi
    TOOL="$BENCH_ROOT/target/release/examples/bench_tool"
    [[ -x $TOOL ]] || die "$TOOL missing"
}

drop_slot() {
    sql "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$1'" >/dev/null
}

confirmed_lsn() {
    sql "SELECT coalesce(confirmed_flush_lsn, '0/0') FROM pg_replication_slots WHERE slot_name = '$WORKER_SLOT'"
}

# lsn_ge A B: true when LSN A >= B.
lsn_ge() { [[ $(sql "SELECT '$1'::pg_lsn >= '$2'::pg_lsn") == t ]]; }

# Clock ticks of CPU (user + system) a process used so far.
proc_cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk_tck() { getconf CLK_TCK; }
# User + system CPU seconds in a saved `times` output (its second line: the
# shell's waited-for children). `times` runs in the measuring shell itself,
# redirected to a file: in a $(...) subshell it would see that subshell's children.
children_cpu_s() { tail -1 "$1" | awk '{ n = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); n += a[1] * 60 + a[2] } print n }'; }

now_s() { date +%s.%N; }

# Prometheus value of the sum over a metric family's series ("" when unavailable).
metric_sum() {
    curl -fsS --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null \
        | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2; n++ } END { if (n) print s }'
}
