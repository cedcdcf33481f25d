#!/usr/bin/env bash
# How the H200 references in figures/ were made (crossover_*, seeds_*, lr_*, long_*), from the repository root.
# The GPU machine runs a command for at most 10 minutes, so the work is three commands; the seed-0 dense model
# travels from the first to the others as a file, so that every MoE run of the three starts from the same weights:
#
#   bash figures/reference_h200.sh seeds OUT         # seed 0: python train.py (--init all) alone on the GPU, timed;
#                                                    # then seeds 1 and 2 (naive, both r = 0.5) side by side
#   bash figures/reference_h200.sh lr OUT DENSE      # MoE peak LR 5e-4, 1e-3, 4e-3 side by side (2e-3: seed 0's runs)
#   bash figures/reference_h200.sh long OUT DENSE    # naive and both r = 0.5, MoE phase 4x longer, side by side
#
# DENSE: the folder holding dense.tar.part-* written by the first command. Runs that share the GPU report no speed.
# Each command stops its runs at BUDGET seconds (default 540) and packs the logs (no checkpoints) into $OUT.
set -u
part=$1 out=$2 dense=${3:-}
budget=${BUDGET:-540}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
train() { python train.py "$@" ${EXTRA:-}; }  # EXTRA: flags for a quick rehearsal on a CPU
left() { echo $((budget - SECONDS > 1 ? budget - SECONDS : 1)); }

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
    train --out-dir "$out/lr/lr-2e-3" 2>&1 | tee "$out/seed0.log"
    tar cf - -C "$out/lr/lr-2e-3" dense/ckpt.pt dense/settings.json dense/result.json dense/log.csv |
        split -b 15m - "$out/dense.tar.part-"
    for seed in 1 2; do
        (for init in "naive" "drop --r 0.5" "drop --r 0.5 --independent-indices"; do
            timeout -k 20 "$(left)" python train.py --seed $seed --out-dir "$out/seed$seed" --init $init ${EXTRA:-}
        done) >"$out/seed$seed.log" 2>&1 &
    done
    wait
    ;;
lr)
    restore_dense "$out/lr/lr-5e-4" --moe-lr 0.0005
    for lr in 1e-3 4e-3; do mkdir -p "$out/lr/lr-$lr" && cp -r "$out/lr/lr-5e-4/dense" "$out/lr/lr-$lr/"; done
    for lr in 5e-4 1e-3 4e-3; do
        (for init in "naive" "drop --r 0.5" "drop --r 0.5 --independent-indices" "scratch"; do
            timeout -k 20 "$(left)" python train.py --out-dir "$out/lr/lr-$lr" --moe-lr $lr --init $init ${EXTRA:-}
        done) >"$out/lr-$lr.log" 2>&1 &
    done
    wait
    ;;
long)
    declare -A inits=([naive]="naive" [drop]="drop --r 0.5" [drop-indep]="drop --r 0.5 --independent-indices")
    for name in ${LONG_RUNS:-naive drop drop-indep}; do
        restore_dense "$out/long/$name" --moe-steps 8000
        timeout -k 20 "$(left)" python train.py --out-dir "$out/long/$name" --moe-steps 8000 --init ${inits[$name]} ${EXTRA:-} \
            >"$out/long/$name.log" 2>&1 &
    done
    wait
    # the three runs in one folder, for one figure and summary (train.py reuses finished runs and reports)
    mkdir -p "$out/long/all"
    for name in ${LONG_RUNS:-naive drop drop-indep}; do cp -r "$out/long/$name"/dense "$out/long/$name"/moe-* "$out/long/all/"; done
    train --out-dir "$out/long/all" --moe-steps 8000 --init naive >"$out/long/all.log" 2>&1
    ;;
*) echo "usage: bash figures/reference_h200.sh seeds|lr|long OUT [DENSE]"; exit 2 ;;
esac

if [ -n "${OUT:-}" ]; then  # on the GPU machine: the logs come back, the dense model too (in pieces under 16 MiB)
    tar czf "$OUT/$part.tgz" --exclude=data --exclude='ckpt.pt*' --exclude='*.tmp' --exclude=.lock --exclude='dense.tar.part-*' -C "$out" .
    cp "$out"/dense.tar.part-* "$OUT/" 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$OUT/gpu.txt"
    python -c "import torch; print(torch.__version__, torch.version.cuda)" >>"$OUT/gpu.txt"
fi
