"""Compile time and step time of the gpu preset's models, whole-model compile against regional compile (each
Block compiled on its own: one graph serves every layer), each in a fresh process with an empty inductor cache.
Not part of the product. Writes $OUT/compile.json."""
import json, os, subprocess, sys, tempfile, time
sys.path.insert(0, os.getcwd())

OUT = os.environ.get("OUT", "/tmp/exp")


def one(kind, mode):
    import torch
    import torch.nn.functional as F
    import dropupcycle as du
    import train
    torch.backends.cuda.matmul.allow_tf32 = True
    g = train.PRESETS["gpu"]
    device = torch.device("cuda")
    cfg = du.ModelConfig(vocab_size=257, d_model=g["d_model"], n_layer=g["n_layer"], n_head=g["n_head"],
                         n_kv_head=g["n_kv_head"], d_ff=g["d_ff"], max_seq_len=g["seq_len"],
                         **(dict(n_experts=8, top_k=2) if kind == "moe" else {}))
    torch.manual_seed(0)
    model = du.Transformer(cfg).to(device)
    idx = torch.randint(0, 256, (g["batch_size"], g["seq_len"] + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4, fused=True)
    t0 = time.perf_counter()
    if mode == "full":
        run = du.compile_model(model)
    elif mode == "regional":
        opts = {"triton.max_tiles": 1} if cfg.is_moe else {}
        for block in model.layers:
            block.compile(options=opts) if opts else block.compile()
        run = model
    else:
        run = model
    ac = lambda: torch.autocast("cuda", dtype=torch.bfloat16)

    def step():
        with ac():
            _, loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def evaluate():
        model.eval()
        with torch.no_grad(), ac():
            logits, _ = run(x)
            l = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        model.train()
        return l

    def timeit(fn, n):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            a.record(); fn(); b.record()
        torch.cuda.synchronize()
        return sorted(a.elapsed_time(b) for a, b in ev)[n // 2]

    step(); torch.cuda.synchronize()
    train_compile = time.perf_counter() - t0
    t1 = time.perf_counter()
    evaluate(); torch.cuda.synchronize()
    eval_compile = time.perf_counter() - t1
    step_ms = timeit(step, 40)
    eval_ms = timeit(evaluate, 20)
    row = dict(kind=kind, mode=mode, first_step_s=round(train_compile, 2), first_eval_s=round(eval_compile, 2),
               step_ms=step_ms, eval_ms=eval_ms)
    if mode == "full":  # eager evaluation beside the compiled training
        saved = run
        run = model
        row["eager_eval_ms"] = timeit(evaluate, 20)
        run = saved
        step_again = timeit(step, 40)
        row["step_ms_again"] = step_again
    print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        one(*sys.argv[1:])
        sys.exit()
    rows = []
    combos = [("dense", "full"), ("dense", "regional"), ("moe", "full"), ("moe", "regional")]
    for kind, mode in combos:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="ind"))
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, kind, mode], env=env, capture_output=True, text=True, timeout=240)
        found = [l[4:] for l in p.stdout.splitlines() if l.startswith("ROW ")]
        row = json.loads(found[0]) if found else dict(kind=kind, mode=mode, error=p.stderr[-1500:])
        row["process_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(OUT, "compile.json"), "w") as f:
            json.dump(rows, f, indent=1)
