#!/usr/bin/env bash
# Proxy overhead benchmark: pgbench side by side against one pgtwig branch:
#   direct Unix socket, direct TCP, `pgtwig up` (the daemon, as users run it), pgtwig-proxy
#   (crates/proxy/examples/fixed_route: TCP in, Unix socket to the server; current-thread
#   runtime as configured by default (one io_uring thread), with two io_uring threads, and
#   with io_uring off, epoll only), the minimal relay
#   (crates/proxy/examples/minimal_relay: the cheapest user-space relay, a reference), an
#   io_uring relay (examples/uring_relay: one io_uring_enter per message, a reference) and
#   PgBouncer (session pooling, same shape). Reports TPS, latency, the ratio to direct TCP and
#   the relay process's CPU time per transaction.
# Usage: bench/proxy.sh      (env: DURATION=10 seconds per run, ROUNDS=1 runs per cell, median
#                            shown; SCALE=10; MODE="-S -c 8 -j 2" runs that pgbench mode only;
#                            ORM_ROUNDS=3 runs of the ORM suite per target, 0 skips it;
#                            HOLD=1 sets everything up and waits, for profiling by hand)
# Needs PostgreSQL 15 binaries, pgbench, psql and pgbouncer. Runs the servers as `postgres`
# when invoked as root.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-1}
SCALE=${SCALE:-10}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

free_port() {
  python3 -c 'import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p != 5432: print(p); break'
}

if [ "$(id -u)" = 0 ]; then AS=(runuser -u postgres --); else AS=(); fi

echo "building pgtwig and fixed_route (release)..." >&2
(cd "$ROOT" && cargo build -q --release -p pgtwig --bin pgtwig --bin pgtwig-archive-wal && cargo build -q --release -p pgtwig-proxy --example fixed_route --example minimal_relay --example uring_relay)
PROXY_BIN=$TARGET_DIR/release/examples/fixed_route
MINIMAL_BIN=$TARGET_DIR/release/examples/minimal_relay
URING_BIN=$TARGET_DIR/release/examples/uring_relay
PGTWIG=$TARGET_DIR/release/pgtwig

WORK=$(mktemp -d /tmp/pgtwig-bench.XXXXXX)
chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres: "$WORK"
PIDS=()
DATA=$WORK/home/bench/branches/main/data
# Background jobs of a non-interactive shell ignore SIGINT, and runuser does not pass signals
# on, so stop the servers by their pid files and our own children with SIGTERM.
cleanup() {
  [ -f "$WORK/home/bench/daemon.pid" ] && kill -TERM "$(cat "$WORK/home/bench/daemon.pid")" 2>/dev/null
  [ -f "$WORK/pgbouncer.pid" ] && kill -TERM "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null
  [ -f "$DATA/postmaster.pid" ] && kill -INT "$(head -1 "$DATA/postmaster.pid")" 2>/dev/null
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# A pgtwig project whose root branch is the server under test. The branch's
# server is started here by hand, on pgtwig's own socket folder (so the
# daemon routes to it as to any running branch) plus a TCP port for the
# direct-TCP row.
mkdir -p "$WORK/repo" && git -C "$WORK/repo" init -q
printf 'project = "bench"\n[proxy]\nsuspend_timeout = "0"\ntls = false\n' >"$WORK/repo/.pgtwig.toml"
export PGTWIG_HOME=$WORK/home
(cd "$WORK/repo" && "$PGTWIG" init >/dev/null)
SOCK=$(cd "$WORK/repo" && "$PGTWIG" branch url main | sed 's/.*host=//')
PGPORT=$(free_port)
"${AS[@]}" "$PGBIN/postgres" -D "$DATA" -k "$SOCK" -p "$PGPORT" \
  -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=128MB \
  >"$WORK/pg.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do pg_isready -q -h "$SOCK" -p "$PGPORT" && break; sleep 0.1; done
echo "initialising pgbench scale $SCALE..." >&2
pgbench -q -i -s "$SCALE" -h "$SOCK" -p "$PGPORT" -U postgres postgres >/dev/null 2>&1

DAEMON_PORT=$(free_port)
(cd "$WORK/repo" && "$PGTWIG" up --port "$DAEMON_PORT" >/dev/null 2>"$WORK/daemon.log") &
PIDS+=($!)
PROXY_PORT=$(free_port)
"$PROXY_BIN" --listen "127.0.0.1:$PROXY_PORT" --upstream "$SOCK/.s.PGSQL.$PGPORT" --runtime current 2>"$WORK/proxy.log" &
PIDS+=($!)
PROXY_TWO_RINGS_PORT=$(free_port)
"$PROXY_BIN" --listen "127.0.0.1:$PROXY_TWO_RINGS_PORT" --upstream "$SOCK/.s.PGSQL.$PGPORT" --runtime current --io-uring-threads 2 2>"$WORK/proxy-two-rings.log" &
PIDS+=($!)
PROXY_EPOLL_PORT=$(free_port)
"$PROXY_BIN" --listen "127.0.0.1:$PROXY_EPOLL_PORT" --upstream "$SOCK/.s.PGSQL.$PGPORT" --runtime current --io-uring off 2>"$WORK/proxy-epoll.log" &
PIDS+=($!)
MINIMAL_PORT=$(free_port)
"$MINIMAL_BIN" "127.0.0.1:$MINIMAL_PORT" "$SOCK/.s.PGSQL.$PGPORT" 2>"$WORK/minimal.log" &
PIDS+=($!)
URING_PORT=$(free_port)
"$URING_BIN" "127.0.0.1:$URING_PORT" "$SOCK/.s.PGSQL.$PGPORT" 2>"$WORK/uring.log" &
PIDS+=($!)

BOUNCER_PORT=$(free_port)
cat >"$WORK/pgbouncer.ini" <<INI
[databases]
postgres = host=$SOCK port=$PGPORT
* = host=$SOCK port=$PGPORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 50
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
echo '"postgres" ""' >"$WORK/userlist.txt"
[ "$(id -u)" = 0 ] && chown postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
"${AS[@]}" pgbouncer -q "$WORK/pgbouncer.ini" &
PIDS+=($!)
sleep 0.5
for port in $DAEMON_PORT $PROXY_PORT $PROXY_TWO_RINGS_PORT $PROXY_EPOLL_PORT $MINIMAL_PORT $URING_PORT $BOUNCER_PORT; do
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.1; done
done

if [ -n "${HOLD:-}" ]; then
  # For profiling by hand: everything set up, nothing measured.
  echo "HOLD: server $SOCK port $PGPORT (tcp too); pgtwig up $DAEMON_PORT; proxy $PROXY_PORT; two-ring proxy $PROXY_TWO_RINGS_PORT; epoll-only proxy $PROXY_EPOLL_PORT; minimal $MINIMAL_PORT; io_uring $URING_PORT; pgbouncer $BOUNCER_PORT; PGTWIG_HOME=$PGTWIG_HOME; Ctrl-C ends"
  sleep infinity
fi

TARGETS=(
  "direct unix|-h $SOCK -p $PGPORT"
  "direct tcp|-h 127.0.0.1 -p $PGPORT"
  "pgtwig up (daemon)|-h 127.0.0.1 -p $DAEMON_PORT"
  "pgtwig-proxy (current-thread)|-h 127.0.0.1 -p $PROXY_PORT"
  "pgtwig-proxy (two io_uring threads)|-h 127.0.0.1 -p $PROXY_TWO_RINGS_PORT"
  "pgtwig-proxy (io_uring off: epoll only)|-h 127.0.0.1 -p $PROXY_EPOLL_PORT"
  "minimal relay (reference)|-h 127.0.0.1 -p $MINIMAL_PORT"
  "io_uring relay (reference)|-h 127.0.0.1 -p $URING_PORT"
  "pgbouncer (session)|-h 127.0.0.1 -p $BOUNCER_PORT"
)
if [ -n "${MODE:-}" ]; then
  MODES=("$MODE")
else
  MODES=(
    "-S -c 8 -j 2"
    "-S -c 1"
    "-S -C -c 8 -j 2"
  )
fi

# The relay process listening on a port (none for the direct rows), for its CPU time.
listener_pid() { ss -ltnpH "sport = :$1" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1; }
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# Each (mode, target) pair runs ROUNDS times, targets interleaved within a round (and the
# order rotated between rounds) so that background load hits them alike; the table shows the
# median round. Besides TPS and latency,
# the relay's own CPU time per transaction: far steadier than TPS between runs, it says what
# the relay costs the machine.
run_one() { # mode conn -> "tps lat cpu_us_per_txn"
  local out pid c0 c1 n
  pid=
  # The direct rows have no relay (the port is the server's own).
  [ "${2##* }" != "$PGPORT" ] && pid=$(listener_pid "${2##* }")
  [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
  # shellcheck disable=SC2086
  out=$(pgbench $1 -T "$DURATION" $2 -U postgres postgres 2>&1) || { echo "$out" >&2; exit 1; }
  [ -n "$pid" ] && c1=$(cpu_ticks "$pid")
  n=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
  local cpu=-
  [ -n "$pid" ] && [ -n "$n" ] && [ "$n" -gt 0 ] &&
    cpu=$(awk -v d="$((c1 - c0))" -v t="$TICK" -v n="$n" 'BEGIN{printf "%.1f", d / t * 1e6 / n}')
  echo "$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1) $(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p') $cpu"
}
median() { sort -n | awk '{v[NR]=$0} END{print v[int((NR+1)/2)]}'; }

echo "machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg); PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), $(pgbouncer --version | head -1)"
printf '%-38s %-18s %10s %12s %9s %14s  %s\n' target mode tps "lat avg ms" "vs tcp" "relay µs/txn" "each round: vs tcp, µs/txn"
for mode in "${MODES[@]}"; do
  declare -A RES=()
  for r in $(seq 0 $((ROUNDS - 1))); do
    # Each round starts one target later: no target always runs first, or right after
    # another (single runs drift by tens of percent on a shared VM).
    for i in $(seq 0 $((${#TARGETS[@]} - 1))); do
      t=${TARGETS[$(((i + r) % ${#TARGETS[@]}))]}
      name=${t%%|*}
      RES[$name]+="$(run_one "$mode" "${t#*|}")"$'\n'
    done
  done
  base=$(printf '%s' "${RES[direct tcp]}" | median | cut -d' ' -f1)
  for t in "${TARGETS[@]}"; do
    name=${t%%|*}
    row=$(printf '%s' "${RES[$name]}" | median)
    read -r tps lat _ <<<"$row"
    # The CPU column is the median of its own, not the median-TPS round's.
    cpu=$(printf '%s' "${RES[$name]}" | awk '{print $3}' | median)
    ratio=$(awk -v a="$tps" -v b="$base" 'BEGIN{printf "%.2f", a/b}')
    [ "$name" = "direct unix" ] && ratio="($ratio)"
    # Every round against that round's direct TCP, in round order: the rows compared within
    # one round met the same background load.
    rounds=$(paste -d' ' <(printf '%s' "${RES[$name]}") <(printf '%s' "${RES[direct tcp]}") |
      awk '{printf "%s%.2f %s", (NR > 1 ? " | " : ""), $1 / $4, $3}')
    printf '%-38s %-18s %10.0f %12s %9s %14s  %s\n' "$name" "$mode" "$tps" "$lat" "$ratio" "$cpu" "$rounds"
  done
  unset RES
done

DAEMON_PID=$(cat "$WORK/home/bench/daemon.pid")

# The cost a user feels: an ORM test suite (bench/orm-suite: Django's runner, 200 tests, each
# in a transaction with ~30 small statements; it creates and drops its test database), whole
# wall time, ORM_ROUNDS interleaved runs per target, median. ORM_ROUNDS=0 skips it.
ORM_ROUNDS=${ORM_ROUNDS:-3}
VENV=$ROOT/target/client-venv
if [ "$ORM_ROUNDS" -gt 0 ]; then
  if ! "$VENV/bin/python" -c "import django, psycopg" 2>/dev/null; then
    echo "installing tests/clients/python/requirements.txt into $VENV..." >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/tests/clients/python/requirements.txt"
  fi
  # Not PgBouncer: its parked server connection to the test database makes the runner's
  # DROP DATABASE fail (55006, "being accessed by other users"), as PgBouncer users know.
  ORM_TARGETS=(
    "direct tcp|$PGPORT"
    "pgtwig up (daemon)|$DAEMON_PORT"
  )
  declare -A ORM=()
  for r in $(seq 0 $((ORM_ROUNDS - 1))); do
    for i in 0 1; do
      t=${ORM_TARGETS[$(((i + r) % 2))]}
      t0=$(date +%s%N)
      (cd "$ROOT/bench/orm-suite" && DATABASE_URL="postgres://postgres@127.0.0.1:${t#*|}/postgres" \
        "$VENV/bin/python" manage.py test --noinput -v 0 >"$WORK/orm.log" 2>&1) ||
        { cat "$WORK/orm.log" >&2; exit 1; }
      t1=$(date +%s%N)
      ORM[${t%%|*}]+="$(( (t1 - t0) / 1000000 ))"$'\n'
    done
  done
  echo
  base=$(printf '%s' "${ORM[direct tcp]}" | median)
  for t in "${ORM_TARGETS[@]}"; do
    name=${t%%|*}
    ms=$(printf '%s' "${ORM[$name]}" | median)
    printf 'ORM suite (Django, 200 tests) %-22s %7.2f s  %5.3fx direct tcp   runs (ms): %s\n' "$name" \
      "$(awk -v m="$ms" 'BEGIN{print m/1000}')" "$(awk -v m="$ms" -v b="$base" 'BEGIN{print m/b}')" \
      "$(printf '%s' "${ORM[$name]}" | tr '\n' ' ')"
  done
fi
echo
echo "pgtwig daemon RSS after the runs: $(ps -o rss= -p "$DAEMON_PID" | awk '{printf "%.1f MiB", $1/1024}')"

# Cold start: the branch stopped, the first query through the daemon starts it.
kill -INT "$(head -1 "$DATA/postmaster.pid")"
while [ -f "$DATA/postmaster.pid" ]; do sleep 0.05; done
COLD=()
for _ in 1 2 3 4 5; do
  t0=$(date +%s%N)
  psql -X -qAt -h 127.0.0.1 -p "$DAEMON_PORT" -U postgres -c 'select 1' postgres >/dev/null
  t1=$(date +%s%N)
  COLD+=($(( (t1 - t0) / 1000000 )))
  (cd "$WORK/repo" && "$PGTWIG" branch stop main >/dev/null)
done
echo "cold start through the daemon (stopped branch -> first query answered), ms: ${COLD[*]} (median $(printf '%s\n' "${COLD[@]}" | median))"
sleep 1
echo "pgtwig daemon RSS idle: $(ps -o rss= -p "$DAEMON_PID" | awk '{printf "%.1f MiB", $1/1024}')"
# Wake-ups of the idle daemon: context switches over 10 s of each of its threads that lived
# through them (idle blocking-pool threads exit meanwhile).
switches() { for t in /proc/"$DAEMON_PID"/task/*; do echo "${t##*/} $(awk '/ctxt_switches/ {n += $2} END {print n}' "$t/status" 2>/dev/null)"; done; }
ticks0=$(cpu_ticks "$DAEMON_PID"); s0=$(switches); sleep 10; s1=$(switches); ticks1=$(cpu_ticks "$DAEMON_PID")
woke=$(join <(echo "$s0" | sort) <(echo "$s1" | sort) | awk '$2 != "" && $3 != "" {n += $3 - $2} END {printf "%.1f", n / 10}')
echo "pgtwig daemon idle for 10 s: $woke wake-ups/s, $((ticks1 - ticks0)) CPU ticks"
