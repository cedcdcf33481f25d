#!/usr/bin/env bash
# How the H200 references in figures/ were made (crossover_*, seeds_*, lr_*, long_*), from the repository root.
# The GPU machine runs a command for at most 10 minutes, so the work is several commands; the seed-0 dense model
# travels from the first to the others as a file, so that every MoE run starts from the same dense weights:
#
#   bash figures/reference_h200.sh seeds OUT         # seed 0: python train.py (--init all), timed, its dense model
#                                                    # packed; seeds 1, 2: naive and both r = 0.5 (SEEDS="0 1 2")
#   bash figures/reference_h200.sh lr OUT DENSE      # MoE peak LR (LRS="5e-4 1e-3 4e-3"; 2e-3 is seed 0's runs)
#                                                    # for naive, both r = 0.5 and scratch (RUNS)
#   bash figures/reference_h200.sh long OUT DENSE    # naive and both r = 0.5 (RUNS), MoE phase 4x longer
#
# DENSE: the folder holding dense.tar.part-* written by the first command. Runs go one after the other: two or
# three side by side on one H200 were slower together than one after the other (1.43M tokens/s each for two MoE
# runs against 3.09M for one). Each command stops its runs at BUDGET seconds (default 540) and packs the logs (no
# checkpoints) into $OUT. EXTRA: train.py flags added to every run (a quick rehearsal on a CPU).
set -u
part=$1 out=$2 dense=${3:-}
budget=${BUDGET:-540}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
declare -A INIT=([naive]="naive" [drop]="drop --r 0.5" [drop-indep]="drop --r 0.5 --independent-indices"
                 [scratch]="scratch")
train() { timeout -k 20 $((budget - SECONDS > 1 ? budget - SECONDS : 1)) python train.py "$@" ${EXTRA:-}; }

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
*) echo "usage: bash figures/reference_h200.sh seeds|lr|long OUT [DENSE]"; exit 2 ;;
esac

if [ -n "${OUT:-}" ]; then  # on the GPU machine: the logs come back, the dense model too (in pieces under 16 MiB)
    tar czf "$OUT/$part.tgz" --exclude=data --exclude='ckpt.pt*' --exclude='*.tmp' --exclude=.lock \
        --exclude='dense.tar.part-*' -C "$out" .
    cp "$out"/dense.tar.part-* "$OUT/" 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$OUT/gpu.txt"
    python -c "import torch; print(torch.__version__, torch.version.cuda)" >>"$OUT/gpu.txt"
fi
