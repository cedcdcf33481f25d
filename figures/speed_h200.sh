#!/usr/bin/env bash
# The GPU commands behind figures/bench.md's H200 speed numbers, run from the repository root with OUT set to a
# folder for the results. The GPU machine runs a command for at most 10 minutes, so it is separate commands:
#
#   bash figures/speed_h200.sh tests                # the CUDA tests
#   BEFORE=DIR bash figures/speed_h200.sh bench     # bench.py (layer, step, loop, profiles) on this code, then the
#                                                   # MoE layer rows of the code in DIR (a copy of an earlier
#                                                   # version of the repository) in the same run
#   BEFORE=DIR bash figures/speed_h200.sh train     # python train.py (--init all, the gpu preset), timed from empty
#                                                   # compile caches (what a first run pays), then (BEFORE given)
#                                                   # the same with the code in DIR, on the same machine
#   WARM=1 bash figures/speed_h200.sh train         # the same, then WARM more times with the caches the first run
#                                                   # left (what a later run into a fresh --out-dir pays; the
#                                                   # token cache is made afresh); a run takes 3.5-4.2 minutes,
#                                                   # so from empty caches only WARM=1 fits in one command, and
#                                                   # BEFORE does not fit with it
#   CACHES=DIR WARM=1 bash figures/speed_h200.sh train  # the compile caches in DIR (kept between commands on one
#                                                   # machine): the first run is warm too if DIR holds caches
#   ARGS="--ckpt-interval 2000" ... train           # more flags for train.py
#   TIMEOUT=400 ... train                           # seconds one run may take (default 290; a slower GPU needs more)
#   BEFORE=DIR bash figures/speed_h200.sh loop      # bench.py's section 4 alone: train.py's step against the bare
#                                                   # step on the same compiled model, alternating; then (BEFORE
#                                                   # given) the same with the code in DIR
#
# OUT/gpu.txt (the GPU, driver, PyTorch) and OUT/cuda_tests.txt go into figures/speed_h200_runs.txt with the results.
# (The runs behind bench.md's earlier sections ran the CUDA tests as the first part of `bench`; with section 4's
# wall-clock timings, tests and bench.py together come close to the 10-minute limit.)
set -u
part=${1:-}
[ -n "${OUT:-}" ] || { echo "usage: OUT=DIR bash figures/speed_h200.sh tests|bench|train|loop" >&2; exit 2; }
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
OUT=$(realpath "$OUT")  # the BEFORE bench runs in another folder
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$OUT/gpu.txt"
python -c "import torch; print(torch.__version__, torch.version.cuda)" >>"$OUT/gpu.txt"
case $part in
tests)
    python -m pytest -q -rs test_dropupcycle.py test_train.py -k "cuda or grouped or forced or one_graph or compiled or fp16" \
        2>&1 | tail -n 5 >"$OUT/cuda_tests.txt"
    ;;
bench)
    python bench.py --sections layer,step,loop --no-hf --router-skew 0 2 --profile --out "$OUT/bench" \
        >"$OUT/bench.log" 2>&1
    if [ -n "${BEFORE:-}" ]; then
        (cd "$BEFORE" && timeout 200 python bench.py --sections layer --no-hf --out "$OUT/bench_before") \
            >"$OUT/bench_before.log" 2>&1
    fi
    ;;
train)
    # Each line of a run's log starts with the seconds since its process started (and the line "exit ..." with
    # the time the process ended), which splits off Python's start (until the first line) and its exit (after
    # "total time").
    stamp='import sys, time
t0 = float(sys.argv[1])
for line in sys.stdin:
    print(f"{time.time() - t0:7.2f} {line}", end="", flush=True)'
    train() {  # $1: the code's folder, $2: the name of its results, $3: the compile caches' folder (default: new)
        rm -rf "$1/out/speed"  # every run trained and timed afresh (train.py would reuse finished runs)
        local caches=${3:-$(mktemp -d)}  # new: nothing compiled before, inductor's and Triton's caches start empty
        mkdir -p "$caches"
        echo "compile caches $caches: $(find "$caches" -type f | wc -l) files before this run" >"$OUT/$2.log"
        start=$EPOCHREALTIME   # the whole command, from Python's start to its exit
        (set -o pipefail; cd "$1" && TORCHINDUCTOR_CACHE_DIR=$caches/inductor TRITON_CACHE_DIR=$caches/triton \
            timeout "$timeout" python train.py --out-dir out/speed ${ARGS:-} 2>&1 | python -c "$stamp" "$start") >>"$OUT/$2.log" 2>&1
        echo "exit $?; the process took $(python -c "print(round($EPOCHREALTIME - $start, 1))") s" >>"$OUT/$2.log"
        cp "$OUT/$2.log" "$1/out/speed/train.log"
        tar czf "$OUT/$2_logs.tgz" --exclude=data --exclude='ckpt.pt*' --exclude=.lock --exclude='*.png' \
            -C "$1/out/speed" .
    }
    [[ ${WARM:-0} =~ ^[0-9]+$ ]] || { echo "WARM=$WARM: a number of later runs" >&2; exit 2; }
    timeout=${TIMEOUT:-290}
    [[ $timeout =~ ^[0-9]+$ ]] || { echo "TIMEOUT=$timeout: seconds" >&2; exit 2; }
    caches=${CACHES:-$(mktemp -d)}  # shared by this code's runs: the first fills them, later runs reuse them
    train . train "$caches"
    for i in $(seq 1 "${WARM:-0}"); do train . "train_warm$i" "$caches"; done
    [ -z "${BEFORE:-}" ] || train "$BEFORE" train_before
    ;;
loop)
    python bench.py --sections loop --no-hf --out "$OUT/bench_loop" >"$OUT/bench_loop.log" 2>&1
    if [ -n "${BEFORE:-}" ]; then
        (cd "$BEFORE" && python bench.py --sections loop --no-hf --out "$OUT/bench_loop_before") \
            >"$OUT/bench_loop_before.log" 2>&1
    fi
    ;;
*) echo "usage: OUT=DIR bash figures/speed_h200.sh tests|bench|train|loop" >&2; exit 2 ;;
esac
