"""Trials (not part of the product), one GPU run:
loop: where train.py's gpu-preset loop loses time against bench's bare step: device-event median (bench's number),
      wall-clock mean over 300 steps, host time per call; train.py's loop pattern (a sync every 50 steps, an
      evaluation every 100, off the clock); CUDA graphs for the dense bare step.
layer: the paper-shape MoE layer with expert order by counting (one-hot cumsum) instead of a radix sort; profiler
      GPU-time sums besides timings (the timings are noisy)."""
import gc, json, os, statistics, sys, time, types
sys.path.insert(0, os.getcwd())
import numpy as np
import torch
import torch.nn.functional as F
import bench, data, gpus, train
import dropupcycle as du

OUT = os.environ.get("OUT", "/tmp/exp")
os.makedirs(OUT, exist_ok=True)
results, T0 = [], time.time()
dev = torch.device("cuda")


def log(**row):
    row["t"] = round(time.time() - T0, 1)
    results.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, "loop_trials.json"), "w") as f:
        json.dump(results, f, indent=1)


def wall(fn, n):
    torch.cuda.synchronize()
    host = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        a = time.perf_counter()
        fn()
        host += time.perf_counter() - a
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n, 1e3 * host / n


def gpu_ms(fn, n=10):
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / n


def loop_rows(kind, tokens, val_batches, mode=None, rounds=2, loop=True):
    g = bench.GPU
    shape = {k: g[k] for k in ("n_layer", "d_model", "d_ff", "n_head", "n_kv_head")}
    B, T = g["batch_size"], g["seq_len"]
    cfg = bench.step_config(kind, shape, T)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = du.Transformer(cfg).to(dev)
    run = du.compile_model(model, mode=mode)
    opt = train.make_optimizer(model, 3e-4, 0.1, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    s = dict(model=vars(cfg) if False else None, lr=3e-4, steps=10**6, warmup=100, seed=0, phase="moe" if cfg.is_moe else "dense",
             batch_size=B, seq_len=T, grad_accum=1, grad_clip=1.0)
    counter = iter(range(10**9))
    fx, fy = data.get_batch(tokens, B, T, np.random.default_rng(1), dev)
    params = list(model.parameters())
    bare = lambda: bench.bare_step(run, params, opt, fx, fy, lambda: gpus.autocast(dev))
    step = lambda: train.train_step(model, run, opt, scaler, s, next(counter), tokens, dev, 1)
    t0 = time.time(); step(); torch.cuda.synchronize(); first = time.time() - t0
    for _ in range(20):
        step()
    name = f"{kind}{'' if mode is None else ' ' + mode}"
    log(kind="loop", model=name, first_step_s=round(first, 1), gpu_ms_bare=gpu_ms(bare), gpu_ms_step=gpu_ms(step))
    for r in range(rounds):
        for which, fn in (("bare", bare), ("train_step", step)):
            med = bench.timeit(fn, dev, 10, 100)
            w, h = wall(fn, 300)
            log(kind="loop", model=name, round=r, fn=which, median_ms=med, wall_ms=w, host_ms=h)
        if loop and mode is None:  # train.py's pattern: read the losses every 50 steps, evaluate every 100 off the clock
            gc.disable()
            pending, timed, n = [], 0.0, 0
            t = time.perf_counter()
            for i in range(1, 301):
                _, ce, aux = step()
                pending.append(ce)
                if i % 50 == 0:
                    [float(c) for c in pending]
                    pending = []
                    gc.collect(1)
                    timed += time.perf_counter() - t
                    n += 50
                    if i % 100 == 0:
                        train.evaluate(model, run, val_batches, dev, 1)
                    t = time.perf_counter()
            gc.enable()
            log(kind="loop", model=name, round=r, fn="train.py pattern", wall_ms=1e3 * timed / n)
    del model, run, opt


def counting_patch():
    """experts_grouped with the sort replaced by counting: the same order, where and ends."""
    src_fn = du.MoE.experts_grouped

    def experts_grouped(self, x, experts, weights):
        N, k = experts.shape
        bf16 = torch.bfloat16
        flat = experts.flatten()
        E = self.n_experts
        hits = flat[None, :] == torch.arange(E, device=x.device)[:, None]  # [E, N*k]
        ranks = hits.to(torch.int32).cumsum(1)
        counts = ranks[:, -1]
        ends = counts.cumsum(0, dtype=torch.int32)
        starts = ends - counts
        where = (starts[flat] + ranks.gather(0, flat[None]).squeeze(0) - 1).long()
        order = torch.empty_like(where)
        order[where] = torch.arange(where.numel(), device=x.device)
        G = self.row_groups
        cuts = torch.arange(1, G + 1, device=x.device, dtype=torch.int32)
        offsets = (starts[:, None] + counts[:, None] * cuts // G).flatten().to(torch.int32)

        def group_weights(w):
            w = w.to(bf16)
            return (w if G == 1 else w.repeat_interleave(G, dim=0)).transpose(1, 2)

        x_rows = x.to(bf16).unsqueeze(1).expand(N, k, -1).reshape(N * k, -1)
        x_sorted = du.RowPermutation.apply(x_rows, order, where)
        h_gate = du._grouped_mm(x_sorted, group_weights(self.gate), offs=offsets)
        h_up = du._grouped_mm(x_sorted, group_weights(self.up), offs=offsets)
        out = du._grouped_mm(F.silu(h_gate) * h_up, group_weights(self.down), offs=offsets)
        out = du.RowPermutation.apply(out, where, order).view(N, k, -1)
        return (out * weights.to(bf16)[..., None]).sum(dim=1).to(x.dtype)
    return src_fn, experts_grouped


ORIG, COUNT = counting_patch()


def layer_rows(d, d_ff, n_tok, skew, variants):
    torch.manual_seed(2)
    x = torch.randn(1, n_tok, d, device=dev, requires_grad=True)
    dy = torch.randn(1, n_tok, d, device=dev)
    moe = bench.make_moe(d, d_ff, dev, torch.float32)
    if skew:
        bench.skew_routing(moe, skew)
    dense = bench.make_dense(d, d_ff, dev, torch.float32)
    params, dparams = list(moe.parameters()), list(dense.parameters())
    du.MoE.experts_grouped = ORIG
    moe.row_groups = du.row_groups_per_expert(d, d_ff)
    bench.run_fwd_bwd(bench.reference_forward(moe), params, x, dy, True)
    ref = [x.grad.clone()] + [p.grad.clone() for p in params]
    torch._dynamo.reset()
    cd = du.compile_model(dense, dynamic=False)
    dfn = lambda: bench.run_fwd_bwd(lambda t: cd(t)[0], dparams, x, dy, True)
    dfn()
    floor = [bench.timeit(dfn, dev, 5, 50)]
    floor_gpu = gpu_ms(dfn, 5)
    log(kind="layer", d=d, d_ff=d_ff, tokens=n_tok, skew=skew, variant="dense floor", ms=floor[0], gpu_ms=floor_gpu)
    for name, fn, G in variants:
        try:
            du.MoE.experts_grouped = fn
            moe.row_groups = G
            torch._dynamo.reset()
            cm = du.compile_model(moe, dynamic=False)
            mfn = lambda: bench.run_fwd_bwd(lambda t: cm(t)[0], params, x, dy, True)
            mfn()
            got = [x.grad.clone()] + [p.grad.clone() for p in params]
            err = max(bench.rel_err(a, b) for a, b in zip(got, ref))
            times, dts = [], []
            for _ in range(3):
                times.append(bench.timeit(mfn, dev, 5, 50))
                dts.append(bench.timeit(dfn, dev, 5, 50))
            g_ms = gpu_ms(mfn, 5)
            log(kind="layer", d=d, d_ff=d_ff, tokens=n_tok, skew=skew, variant=name, ms=times, dense_ms=dts,
                x_dense=min(times) / min(dts + floor), gpu_ms=g_ms, x_dense_gpu=g_ms / floor_gpu, rel_err=err)
        except Exception as e:
            log(kind="layer", variant=name, error=bench.error_text(e))
    du.MoE.experts_grouped = ORIG
    torch._dynamo.reset()


if __name__ == "__main__":
    which = sys.argv[1:] or ["loop", "layer"]
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    if "layer" in which:
        V = [("sort G2", ORIG, 2), ("count G2", COUNT, 2), ("sort G1", ORIG, 1), ("count G1", COUNT, 1)]
        layer_rows(512, 2048, 32768, 0.0, V)
        layer_rows(512, 2048, 32768, 2.0, V)
        layer_rows(512, 2048, 65536, 0.0, V[:2])
    if "loop" in which:
        enc = data.get_tokenizer("byte")
        text, val, _ = data.load_data(":python", "byte", enc, "out/loop_trials", 0.0, 512)
        tokens = data.corpus_to_device(text, dev)
        vrng = np.random.default_rng(train.VAL_WINDOWS_SEED)
        val_batches = [data.get_batch(val, 128, 512, vrng, dev) for _ in range(10)]
        loop_rows("dense", tokens, val_batches)
        loop_rows("moe", tokens, val_batches)
        if "graphs" in which:
            loop_rows("dense", tokens, val_batches, mode="reduce-overhead", rounds=1, loop=False)
    log(kind="done")
