#!/usr/bin/env bash
# The GPU commands behind the H200 references in figures/ (crossover_*, seeds_*, lr_*, long_*), run from the
# repository root. The GPU machine runs a command for at most 10 minutes, so the work is cut into several commands;
# the seed-0 dense model travels from the first to the others as a file, so that every MoE run starts from the
# same dense weights:
#
#   SEEDS=0 bash figures/reference_h200.sh seeds OUT         # seed 0: python train.py (--init all), alone, timed;
#                                                            # its dense model packed as dense.tar.part-*
#   SEEDS="1 2" bash figures/reference_h200.sh seeds OUT     # seeds 1, 2: naive and both r = 0.5 (RUNS)
#   bash figures/reference_h200.sh lr OUT DENSE              # MoE peak LR (LRS="5e-4 1e-3 4e-3"; 2e-3 is seed 0's
#                                                            # runs) for naive, both r = 0.5 and scratch (RUNS)
#   bash figures/reference_h200.sh long OUT DENSE            # naive and both r = 0.5 (RUNS), MoE phase 4x longer
#
# DENSE: the folder holding the dense.tar.part-* of the seed-0 command. RUNS: names from naive, drop, drop-indep,
# scratch. Each gpu-preset MoE run takes about 45 s alone on an H200 (8000 steps: 2m44s), so lr and long fit in
# 10 minutes only in parts (e.g. LRS=5e-4, or RUNS=naive). Runs go one after the other: the committed learning-rate
# runs other than scratch at 1e-3 and 4e-3, and the long phase's naive and drop runs, were made by an earlier
# version of this script that ran a command's runs side by side, which was slower in total (long phase: 1.49M and
# 1.55M tokens/s for two MoE runs side by side, 3.30M for one alone; figures/long_summary.md). A run is not
# started once BUDGET seconds (default 540) have passed; the logs (no checkpoints) are then packed into $OUT.
# EXTRA: train.py flags added to every run (a quick rehearsal on a CPU).
set -u
usage() { echo "usage: bash figures/reference_h200.sh seeds OUT | lr OUT DENSE | long OUT DENSE ($1)" >&2; exit 2; }
part=${1:-} out=${2:-} dense=${3:-}
budget=${BUDGET:-540}
declare -A INIT=([naive]="naive" [drop]="drop --r 0.5" [drop-indep]="drop --r 0.5 --independent-indices"
                 [scratch]="scratch")
case $part in seeds) ;; lr | long) [ -n "$dense" ] && ls "$dense"/dense.tar.part-* >/dev/null 2>&1 ||
    usage "DENSE: no dense.tar.part-* in '$dense'" ;; *) usage "no such part: '$part'" ;; esac
[ -n "$out" ] || usage "no OUT folder"
for name in ${RUNS:-}; do [ -n "${INIT[$name]+set}" ] || usage "RUNS: no run named '$name'"; done
export PYTHONUNBUFFERED=1
mkdir -p "$out"
train() {  # python train.py under the time left; not started once it is too short to be of use
    local left=$((budget - SECONDS))
    if [ $left -lt 60 ]; then echo "not started (time budget spent): train.py $*"; return 1; fi
    timeout -k 20 $left python train.py "$@" ${EXTRA:-}
}

restore_dense() {  # the carried seed-0 dense model into $1/dense; trained afresh if this machine's corpus differs
    mkdir -p "$1"
    cat "$dense"/dense.tar.part-* | tar xf - -C "$1"
    if ! train --init dense --out-dir "$1" "${@:2}" >"$1.dense.log" 2>&1; then
        echo "the carried dense model was refused (see $1.dense.log): training it afresh here"
        rm -rf "$1/dense"
        train --init dense --out-dir "$1" "${@:2}" >>"$1.dense.log" 2>&1
    fi
}

case $part in
seeds)
    for seed in ${SEEDS:-0 1 2}; do
        if [ "$seed" = 0 ]; then
            train --out-dir "$out/lr/lr-2e-3" 2>&1 | tee "$out/seed0.log"
            tar cf - -C "$out/lr/lr-2e-3" dense/ckpt.pt dense/settings.json dense/result.json dense/log.csv |
                split -b 15m - "$out/dense.tar.part-"
        else
            for name in ${RUNS:-naive drop drop-indep}; do
                train --seed "$seed" --out-dir "$out/seed$seed" --init ${INIT[$name]}
            done >>"$out/seed$seed.log" 2>&1
        fi
    done
    ;;
lr)
    lrs=(${LRS:-5e-4 1e-3 4e-3})
    restore_dense "$out/lr/lr-${lrs[0]}" --moe-lr "${lrs[0]}"
    for lr in "${lrs[@]:1}"; do mkdir -p "$out/lr/lr-$lr" && cp -r "$out/lr/lr-${lrs[0]}/dense" "$out/lr/lr-$lr/"; done
    for lr in "${lrs[@]}"; do
        for name in ${RUNS:-naive drop drop-indep scratch}; do
            train --out-dir "$out/lr/lr-$lr" --moe-lr "$lr" --init ${INIT[$name]}
        done >>"$out/lr-$lr.log" 2>&1
    done
    ;;
long)
    for name in ${RUNS:-naive drop drop-indep}; do
        restore_dense "$out/long/$name" --moe-steps 8000
        train --out-dir "$out/long/$name" --moe-steps 8000 --init ${INIT[$name]} >"$out/long/$name.log" 2>&1
    done
    ;;
esac

if [ -n "${OUT:-}" ]; then  # on the GPU machine: the logs come back, the dense model too (in pieces under 16 MiB)
    tar czf "$OUT/$part.tgz" --exclude=data --exclude='ckpt.pt*' --exclude='*.tmp' --exclude=.lock \
        --exclude='dense.tar.part-*' -C "$out" .
    cp "$out"/dense.tar.part-* "$OUT/" 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$OUT/gpu.txt"
    python -c "import torch; print(torch.__version__, torch.version.cuda)" >>"$OUT/gpu.txt"
fi
