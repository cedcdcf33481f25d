set -u
F="--preset gpu --dense-steps 300 --moe-steps 300 --eval-interval 150 --log-interval 50 --init naive"
mkdir -p out/b && ln -sfn ../a/data out/b/data
show() { grep -E "step (100|150|200|250|300)/300 \| loss|done:|compile check|total time|tokeniz"; }
echo "== A: corpus on the GPU"; python train.py $F --out-dir out/a 2>&1 | show
echo "== B: corpus on the host (as before)"; python -c "import sys, data, train; data.GPU_CORPUS_SHARE = 0; train.main(sys.argv[1:])" $F --out-dir out/b 2>&1 | show
echo "== host gather alone"; python - <<'PY'
import time, numpy as np, torch, data
t = np.memmap("out/a/data/python-byte/train.bin", dtype=np.uint16, mode="r"); dev = torch.device("cuda")
g = torch.from_numpy(np.asarray(t).astype(np.int32)).to(dev)
for name, tok in (("host gather + pinned copy", t), ("GPU gather", g)):
    for i in range(120):
        if i == 20: torch.cuda.synchronize(); t0 = time.perf_counter()
        data.get_batch(tok, 128, 512, np.random.default_rng([0, 0, i]), dev)
    host = (time.perf_counter() - t0) / 100; torch.cuda.synchronize(); dev_t = (time.perf_counter() - t0) / 100
    print(f"{name}: {host * 1e3:.2f} ms host time per batch, {dev_t * 1e3:.2f} ms until done")
print(f"{len(t):,} training tokens")
PY
echo "== bench.py training steps"; timeout 200 python bench.py --sections step --no-hf --out $OUT/bench 2>&1 | grep -E "GPU preset|152M|step" | tail -12
python -m pytest -q test_train.py -k "gathered_on_the_host" test_dropupcycle.py -k "cuda or grouped or compiled" 2>&1 | tail -2
