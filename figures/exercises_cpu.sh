#!/usr/bin/env bash
# The CPU reference answers: every command of EXERCISES.md's bash blocks in file order (so later exercises reuse what
# earlier ones trained, as a student's would), then the paper's full r sweep of the cpu preset and its routing in the
# folder of exercise 6 (figures/sweep_cpu_*, routing_cpu_*), each command with what it printed but the per-step
# progress lines, its exit status and its seconds. Run from the root of a fresh checkout:
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
awk '/^```bash/ {inside = 1; next} /^```/ {inside = 0} inside && NF' EXERCISES.md | while IFS= read -r line; do run "$line"; done
run "python analyze.py sweep --preset cpu --out-dir out/cpu"
run "python analyze.py routing --preset cpu --out-dir out/cpu"
echo '```'
