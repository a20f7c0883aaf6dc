#!/usr/bin/env bash
# Branch creation with and without the free-space check, side by side in one run:
# `pgtwig branch create` of a running parent on a reflink file system, alternately with the
# check on (the default margin) and off (PGTWIG_FREE_SPACE_MARGIN=off, which skips statvfs
# and the estimate altogether). Each figure is the median of REPS runs of the command
# alone (the new branch is not started), interleaved so both see the same machine.
#
# Usage: bench/space-check.sh [REFLINK_DIR]
#   REFLINK_DIR defaults to $PGTWIG_TEST_REFLINK_DIR or /mnt/pgtwig-xfs (see .ci/run)
#   REPS=15 SCALE=10 PROFILE=release (PROFILE=debug uses target/debug, no release build)
set -euo pipefail
cd "$(dirname "$0")/.."
REFLINK_DIR=${1:-${PGTWIG_TEST_REFLINK_DIR:-/mnt/pgtwig-xfs}}
REPS=${REPS:-15}
SCALE=${SCALE:-10}
PROFILE=${PROFILE:-release}

if [ "$PROFILE" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
PGTWIG=$PWD/target/$PROFILE/pgtwig
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

home=$(mktemp -d "$REFLINK_DIR/pgtwig-bench-XXXX")
chmod 755 "$home"
cleanup() {
    for pid in "$home"/state/*/branches/*/data/postmaster.pid; do
        [ -f "$pid" ] && kill -QUIT "$(head -1 "$pid")" 2>/dev/null || true
    done
    sleep 1
    rm -rf "$home"
}
trap cleanup EXIT
export PGTWIG_HOME=$home/state
mkdir -p "$home/repo" && cd "$home/repo" && git init -q
"$PGTWIG" init >/dev/null
"$PGTWIG" branch start main >/dev/null
url=$("$PGTWIG" branch url main 2>/dev/null)
pgbench -i -q -s "$SCALE" "$url" >/dev/null 2>&1
psql "$url" -qc checkpoint >/dev/null

on=() off=()
for i in $(seq 1 "$REPS"); do
    for mode in on off; do
        if [ "$mode" = off ]; then margin=off; else margin=; fi
        t0=$(now)
        PGTWIG_FREE_SPACE_MARGIN=$margin "$PGTWIG" branch create "b-$mode-$i" >/dev/null
        t1=$(now)
        t=$(echo "$t1 - $t0" | bc)
        if [ "$mode" = on ]; then on+=("$t"); else off+=("$t"); fi
        "$PGTWIG" branch delete "b-$mode-$i" >/dev/null
    done
done
size=$(du -sh --apparent-size "$home"/state/*/branches/main/data | cut -f1)
wal=$(du -sh --apparent-size "$home"/state/*/branches/main/data/pg_wal | cut -f1)
echo "parent: pgbench scale $SCALE, $size data directory ($wal of WAL), running; $PROFILE build; $REPS runs each"
printf "%-34s %s\n" "free-space check" "median seconds of \`branch create\`"
printf "%-34s %s\n" "on (default margin)" "$(printf '%s\n' "${on[@]}" | median)"
printf "%-34s %s\n" "off (PGTWIG_FREE_SPACE_MARGIN=off)" "$(printf '%s\n' "${off[@]}" | median)"
