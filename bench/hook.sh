#!/usr/bin/env bash
# What the post-checkout hook adds to `git checkout` when the target
# database branch exists: median of N checkouts back and forth, with the
# pgtwig hook installed and with hooks disabled, in one run.
# Usage: bench/hook.sh   (env: N=21)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-21}
cargo build --release --quiet -p pgtwig --bin pgtwig
PGTWIG=$PWD/target/release/pgtwig
work=$(mktemp -d /tmp/pgtwig-hook-bench-XXXX)
chmod 755 "$work"
trap 'kill -QUIT $(head -1 "$work"/home/repo/branches/*/data/postmaster.pid 2>/dev/null) 2>/dev/null; rm -rf "$work"' EXIT
export PGTWIG_HOME=$work/home
git init -q -b main "$work/repo" && cd "$work/repo"
git -c user.name=b -c user.email=b@b commit -q --allow-empty -m init
"$PGTWIG" init >/dev/null
git checkout -q -b feature 2>/dev/null   # creates the database branch (not timed)
git checkout -q main 2>/dev/null
ms() { # command... -> median milliseconds over N runs, alternating branches
    local i t0 t1 b
    for i in $(seq 1 "$N"); do
        if [ $((i % 2)) = 1 ]; then b=feature; else b=main; fi
        t0=$(date +%s%N); "$@" "$b" 2>/dev/null; t1=$(date +%s%N)
        echo $(( (t1 - t0) / 1000 ))
    done | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]/1000}'
}
with=$(ms git checkout -q)
without=$(ms git -c core.hooksPath=/dev/null checkout -q)
git checkout -q main 2>/dev/null
echo "git checkout, pgtwig hook (branch exists): $with ms"
echo "git checkout, no hooks:                   $without ms"
echo "added by the hook:                        $(awk -v a="$with" -v b="$without" 'BEGIN{printf "%.1f", a-b}') ms"
