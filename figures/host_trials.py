"""Trial (not part of the product): where train_step's host time goes against the bare step (dense gpu preset,
compiled): micro-timings of its parts, cProfile of 200 steps, torch.profiler CPU tables of 20 steps."""
import cProfile, io, json, os, pstats, sys, time
sys.path.insert(0, os.getcwd())
import numpy as np
import torch
import bench, data, distributed, gpus, train
import dropupcycle as du

OUT = os.environ.get("OUT", "/tmp/exp")
dev = torch.device("cuda")
res = {}


def per_call_us(fn, n=2000):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t) / n


def wall_ms(fn, n=300):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / n


enc = data.get_tokenizer("byte")
text, val, _ = data.load_data(":python", "byte", enc, "out/loop_trials", 0.0, 512)
tokens = data.corpus_to_device(text, dev)
g = bench.GPU
B, T = g["batch_size"], g["seq_len"]
rng = np.random.default_rng(0)


def ac():
    with gpus.autocast(dev):
        pass


micro = {
    "gpus.autocast enter/exit": ac,
    "torch.autocast(bf16) enter/exit": lambda: torch.autocast("cuda", dtype=torch.bfloat16).__enter__(),
    "gpus.amp_dtype": lambda: gpus.amp_dtype(dev),
    "np default_rng([seed, phase, step])": lambda: np.random.default_rng([0, 1, 5]),
    "data.get_batch (corpus on GPU)": lambda: data.get_batch(tokens, B, T, rng, dev, (0, 1)),
    "lr_at": lambda: train.lr_at(500, 2000, 3e-3, 100),
    "grad_sync": lambda: distributed.grad_sync(None, True),
    "du.moe_path": lambda: du.moe_path(dev),
}
res["micro_us"] = {k: per_call_us(f) for k, f in micro.items()}
print(json.dumps(res, indent=1), flush=True)

for kind in ("dense", "moe"):
    shape = {k: g[k] for k in ("n_layer", "d_model", "d_ff", "n_head", "n_kv_head")}
    cfg = bench.step_config(kind, shape, T)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = du.Transformer(cfg).to(dev)
    run = du.compile_model(model)
    opt = train.make_optimizer(model, 3e-4, 0.1, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    s = dict(lr=3e-4, steps=10**6, warmup=100, seed=0, phase="moe" if cfg.is_moe else "dense",
             batch_size=B, seq_len=T, grad_accum=1, grad_clip=1.0)
    counter = iter(range(10**9))
    fx, fy = data.get_batch(tokens, B, T, np.random.default_rng(1), dev)
    params = list(model.parameters())
    bare = lambda: bench.bare_step(run, params, opt, fx, fy, lambda: gpus.autocast(dev))
    step = lambda: train.train_step(model, run, opt, scaler, s, next(counter), tokens, dev, 1)

    def fwd_only():
        with gpus.autocast(dev):
            _, loss = run(fx, fy)
        loss.backward()

    def opt_only():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for _ in range(30):
        step()
    torch.cuda.synchronize()
    r = res[kind] = {}
    for rnd in range(2):
        r[f"bare_ms_{rnd}"] = wall_ms(bare)
        r[f"step_ms_{rnd}"] = wall_ms(step)
    r["fwd_bwd_ms"] = wall_ms(fwd_only, 100)
    r["clip_opt_ms"] = wall_ms(opt_only, 100)
    opt.zero_grad(set_to_none=True)
    # the host alone: no GPU work launched? not possible; instead the host time of each part with the GPU idle
    for name, fn in (("bare", bare), ("step", step)):
        pr = cProfile.Profile()
        torch.cuda.synchronize()
        pr.enable()
        for _ in range(100):
            fn()
        torch.cuda.synchronize()
        pr.disable()
        sio = io.StringIO()
        pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(30)
        with open(os.path.join(OUT, f"profiles_{kind}.txt"), "a") as f:
            f.write(f"## cProfile {kind} {name}, 100 steps\n" + sio.getvalue() + "\n")
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        with open(os.path.join(OUT, f"profiles_{kind}.txt"), "a") as f:
            f.write(f"## torch.profiler CPU {kind} {name}, 20 steps\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
    print(json.dumps(res, indent=1), flush=True)
    with open(os.path.join(OUT, "host_trials.json"), "w") as f:
        json.dump(res, f, indent=1)
    del model, run, opt
