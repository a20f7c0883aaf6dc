#!/usr/bin/env bash
# Branch creation, side by side in one run:
#   pgtwig branch create on a reflink file system (XFS), parent stopped and running
#   pgtwig branch create on the plain file system (full-copy fallback)
#   CREATE DATABASE ... TEMPLATE of the same data
# for a ~1 GiB parent (pgbench scale 70) and a ~10 MiB one (scale 1).
# Each figure is the median of REPS runs, from command start to a branch
# that answers `select 1`.
#
# Usage: bench/branch-create.sh [REFLINK_DIR] [PLAIN_DIR]
#   REFLINK_DIR defaults to $PGTWIG_TEST_REFLINK_DIR or /mnt/pgtwig-xfs (see .ci/run)
#   PLAIN_DIR   defaults to /var/tmp
set -euo pipefail
cd "$(dirname "$0")/.."
REFLINK_DIR=${1:-${PGTWIG_TEST_REFLINK_DIR:-/mnt/pgtwig-xfs}}
PLAIN_DIR=${2:-/var/tmp}
REPS=${REPS:-5}
SCALES=${SCALES:-"70 1"}

cargo build --release --quiet
PGTWIG=$PWD/target/release/pgtwig
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

work=$(mktemp -d /tmp/pgtwig-bench-XXXX)
chmod 755 "$work"
cleanup() {
    for h in "$work"/homes/*; do
        for pid in "$h"/*/branches/*/data/postmaster.pid; do
            [ -f "$pid" ] && kill -QUIT "$(head -1 "$pid")" 2>/dev/null || true
        done
    done
    sleep 1
    rm -rf "$work" "$REFLINK_DIR"/pgtwig-bench-* "$PLAIN_DIR"/pgtwig-bench-*
}
trap cleanup EXIT
mkdir -p "$work/homes"

# setup HOME_BASE SCALE -> a project with a running root holding database "app"
setup() {
    local base=$1 scale=$2 repo
    local home
    home=$(mktemp -d "$base/pgtwig-bench-XXXX")
    chmod 755 "$home"
    ln -s "$home" "$work/homes/$(basename "$home")"
    repo=$home/repo
    mkdir -p "$repo" && git -C "$repo" init -q
    (cd "$repo" && PGTWIG_HOME=$home/state "$PGTWIG" init >/dev/null && PGTWIG_HOME=$home/state "$PGTWIG" branch start main >/dev/null)
    local url
    url=$(cd "$repo" && PGTWIG_HOME=$home/state "$PGTWIG" branch url main)
    psql "$url" -qc "create database app" >/dev/null
    pgbench -i -q -s "$scale" "${url/\/postgres\?/\/app?}" >/dev/null 2>&1
    psql "$url" -qc "checkpoint" >/dev/null
    echo "$home"
}

# time_branch HOME N -> median seconds of create+start+select 1
time_branch() {
    local home=$1 i t0 t1
    for i in $(seq 1 "$REPS"); do
        (
            cd "$home/repo"
            export PGTWIG_HOME=$home/state
            t0=$(now)
            "$PGTWIG" branch create "b$i" >/dev/null
            "$PGTWIG" branch start "b$i" >/dev/null
            psql "$("$PGTWIG" branch url "b$i")" -qAtc 'select 1' >/dev/null
            t1=$(now)
            echo "$t1 - $t0" | bc
            "$PGTWIG" branch delete "b$i" >/dev/null
        )
    done | median
}

time_template() {
    local home=$1 i t0 t1 url
    url=$(cd "$home/repo" && PGTWIG_HOME=$home/state "$PGTWIG" branch url main)
    for i in $(seq 1 "$REPS"); do
        t0=$(now)
        psql "$url" -qc "create database t$i template app" >/dev/null
        psql "${url/\/postgres\?/\/t$i?}" -qAtc 'select 1' >/dev/null
        t1=$(now)
        echo "$t1 - $t0" | bc
        psql "$url" -qc "drop database t$i" >/dev/null
    done | median
}

stop_root() { (cd "$1/repo" && PGTWIG_HOME=$1/state "$PGTWIG" branch stop main >/dev/null); }
start_root() { (cd "$1/repo" && PGTWIG_HOME=$1/state "$PGTWIG" branch start main >/dev/null); }

printf "%-8s %-10s %-44s %s\n" scale size method "median seconds ($REPS runs)"
for scale in $SCALES; do
    xfs=$(setup "$REFLINK_DIR" "$scale")
    plain=$(setup "$PLAIN_DIR" "$scale")
    size=$(du -sh --apparent-size "$xfs"/state/*/branches/main/data | cut -f1)
    printf "%-8s %-10s %-44s %s\n" "$scale" "$size" "pgtwig, reflink XFS, parent running" "$(time_branch "$xfs")"
    stop_root "$xfs"
    printf "%-8s %-10s %-44s %s\n" "$scale" "$size" "pgtwig, reflink XFS, parent stopped" "$(time_branch "$xfs")"
    printf "%-8s %-10s %-44s %s\n" "$scale" "$size" "pgtwig, plain fs (full copy), parent running" "$(time_branch "$plain")"
    stop_root "$plain"
    printf "%-8s %-10s %-44s %s\n" "$scale" "$size" "pgtwig, plain fs (full copy), parent stopped" "$(time_branch "$plain")"
    start_root "$plain"
    printf "%-8s %-10s %-44s %s\n" "$scale" "$size" "CREATE DATABASE ... TEMPLATE (plain fs)" "$(time_template "$plain")"
    start_root "$xfs"
    printf "%-8s %-10s %-44s %s\n" "$scale" "$size" "CREATE DATABASE ... TEMPLATE (XFS)" "$(time_template "$xfs")"
done
