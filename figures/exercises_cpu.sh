#!/usr/bin/env bash
# The CPU reference answers: the r sweep of the cpu preset and its routing (figures/sweep_cpu_*, routing_cpu_*), then
# every command of EXERCISES.md's bash blocks in file order (so later exercises reuse what earlier ones trained), each
# with what it printed but the per-step progress lines, its exit status and its seconds. Run from the root of a fresh
# checkout:
#     bash figures/exercises_cpu.sh > OUT.md
# figures/sweep_cpu_exercises.md is that output under a paragraph saying where and when it ran.
set -euo pipefail
run() {  # $1: a command line as written in EXERCISES.md
    local start=$SECONDS
    echo "\$ $1"
    set +e
    eval "$1" </dev/null 2>&1 | grep -vE '^\[[^]]*\] step [0-9]+/[0-9]+ \|'
    local status=${PIPESTATUS[0]}
    set -e
    echo "(exit $status, $((SECONDS - start)) s)"
    echo
}
echo '```'
run "python analyze.py sweep --preset cpu --out-dir out/cpu"
run "python analyze.py routing --preset cpu --out-dir out/cpu"
awk '/^```bash/ {inside = 1; next} /^```/ {inside = 0} inside && NF' EXERCISES.md | while IFS= read -r line; do run "$line"; done
echo '```'
