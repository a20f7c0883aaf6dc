#!/usr/bin/env bash
# `pgtwig diff --data` of a pgbench branch after 100 updated rows, extent-aware
# against `--full`, side by side (issue 15). Each figure is the median of REPS
# runs of the whole command (both servers already running).
#
# Usage: bench/data-diff.sh [REFLINK_DIR]     # SCALE=300 REPS=3 by default
#   REFLINK_DIR defaults to $PGTWIG_TEST_REFLINK_DIR or /mnt/pgtwig-xfs (see .ci/run)
# Scale 300 is ~4.5 GiB of tables and indexes; the WAL archive of the load is
# pruned as it goes (`gc --history --older-than 0`) so that it fits an 8 GiB
# loop device.
set -euo pipefail
cd "$(dirname "$0")/.."
REFLINK_DIR=${1:-${PGTWIG_TEST_REFLINK_DIR:-/mnt/pgtwig-xfs}}
SCALE=${SCALE:-300}
REPS=${REPS:-3}
# The clone writes next to nothing; the default margin (1 GiB) plus its WAL
# estimate does not fit beside a 4.5 GiB parent on an 8 GiB device.
export PGTWIG_FREE_SPACE_MARGIN=${PGTWIG_FREE_SPACE_MARGIN:-256MiB}

cargo build --release --quiet
PGTWIG=$PWD/target/release/pgtwig
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

home=$(mktemp -d "$REFLINK_DIR/pgtwig-bench-diff-XXXX")
chmod 755 "$home"
pruner=
cleanup() {
    [ -n "$pruner" ] && kill "$pruner" 2>/dev/null || true
    for pid in "$home"/state/*/branches/*/data/postmaster.pid; do
        [ -f "$pid" ] && kill -QUIT "$(head -1 "$pid")" 2>/dev/null || true
    done
    sleep 1
    rm -rf "$home"
}
trap cleanup EXIT
repo=$home/repo
mkdir -p "$repo" && git -C "$repo" init -q
pg() { (cd "$repo" && PGTWIG_HOME=$home/state "$PGTWIG" "$@") 2> >(grep -v "^pgtwig: database" >&2); }
pg init >/dev/null 2>&1
pg branch start main >/dev/null 2>&1
url=$(pg branch url main)
psql "$url" -qc "create database app"
app() { local u; u=$(pg branch url "$1"); echo "${u/\/postgres\?/\/app?}"; }

( while sleep 5; do pg gc --history --older-than 0 >/dev/null 2>&1 || true; done ) &
pruner=$!
t0=$(now)
pgbench -i -q -s "$SCALE" "$(app main)" >/dev/null 2>&1
kill "$pruner"; pruner=
psql "$url" -qc "checkpoint"
pg gc --history --older-than 0 >/dev/null
echo "pgbench -i -s $SCALE: $(echo "$(now) - $t0" | bc) s; $(psql "$(app main)" -qAtc "select pg_size_pretty(pg_database_size('app'))")"

pg branch create pr >/dev/null
pg branch start pr >/dev/null
# 100 rows spread over the whole table: ~200 changed blocks (old and new versions).
rows=$((SCALE * 100000))
psql "$(app pr)" -qc "update pgbench_accounts set abalance = abalance + 1
    where aid in (select 1 + (i * 2999993::bigint) % $rows from generate_series(1, 100) i)"
df -h "$REFLINK_DIR" | tail -1

run() {
    local i t0 out
    for i in $(seq 1 "$REPS"); do
        t0=$(now)
        out=$(pg diff --data main pr --database app --json "$@" 2>/dev/null || true)
        echo "$(now) - $t0" | bc
        echo "$out" > "$home/last.json"
    done | median
}
summary() {
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); t=[x for x in d["tables"] if x["table"]=="public.pgbench_accounts"][0]
print(d["method"], "changed=%d" % t["changed"], "read %s of %s blocks" % (t.get("blocks_read"), t.get("blocks_total")))' "$home/last.json"
}
fast=$(run); fast_how=$(summary)
full=$(run --full); full_how=$(summary)
printf "%-10s %-34s %-40s %s\n" scale "method" "result" "median seconds ($REPS runs)"
printf "%-10s %-34s %-40s %s\n" "$SCALE" "extent-aware (default)" "$fast_how" "$fast"
printf "%-10s %-34s %-40s %s\n" "$SCALE" "--full (ordered hash, every row)" "$full_how" "$full"
echo "speed-up: $(echo "scale=1; $full / $fast" | bc)x"
