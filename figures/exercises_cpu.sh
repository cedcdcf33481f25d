#!/usr/bin/env bash
# The CPU reference answers: the r sweep of the cpu preset and its routing (figures/sweep_cpu_*, routing_cpu_*), then
# every command of EXERCISES.md's bash blocks in file order (so later exercises reuse what earlier ones trained), each
# with what it printed but the per-step progress lines. Run from the root of a fresh checkout:
#     bash figures/exercises_cpu.sh > figures/sweep_cpu_exercises.md
set -euo pipefail
run() {  # $1: a command line as written in EXERCISES.md
    local start=$SECONDS
    echo "\$ $1"
    eval "$1" 2>&1 | grep -vE '^\[[^]]*\] step [0-9]+/[0-9]+ \|' || true
    echo "($((SECONDS - start)) s)"
    echo
}
echo '```'
run "python analyze.py sweep --preset cpu --out-dir out/cpu"
run "python analyze.py routing --preset cpu --out-dir out/cpu"
awk '/^```bash/ {inside = 1; next} /^```/ {inside = 0} inside && NF' EXERCISES.md | while IFS= read -r line; do run "$line"; done
echo '```'
