"""The MoE layer against the dense floor, compiled by default and with inductor's GEMM autotuning (max_autotune_gemm:
Triton templates, the grouped-mm one included, against ATen), forward + backward, fp32 weights under bf16 autocast,
as bench.py section 1's compiled rows. One shape per process, from the repository root, with empty caches, as run
for autotune_layer_h200.json (each process stopped at 130 s):

    for spec in "512 2048 32768" "512 2048 65536" "256 1024 65536"; do for mode in default autotune; do
      set -- $spec; c=$(mktemp -d); TORCHINDUCTOR_CACHE_DIR=$c/i TRITON_CACHE_DIR=$c/t timeout 130 \
        python figures/autotune_layer.py $1 $2 $3 $mode OUT/layer_${mode}_$1_$3.json; done; done
"""
import json, os, sys, time
import torch
sys.path.insert(0, os.getcwd())
import bench, dropupcycle as du
d, d_ff, n_tok, mode, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
device = torch.device(os.environ.get("DEV", "cuda"))
torch.backends.cuda.matmul.allow_tf32 = True
opts = {"max_autotune_gemm": True} if mode == "autotune" else {}
res = dict(d_model=d, d_ff=d_ff, tokens=n_tok, mode=mode, options=opts, rows=[])
torch.manual_seed(2)
x = torch.randn(1, n_tok, d, device=device, requires_grad=True)
dy = torch.randn(1, n_tok, d, device=device)
moe = bench.make_moe(d, d_ff, device, torch.float32)
dense = bench.make_dense(d, d_ff, device, torch.float32)
mp = list(moe.parameters())
y_ref = bench.run_fwd_bwd(bench.reference_forward(moe), mp, x, dy, True).detach()
g_ref = [x.grad.clone()] + [p.grad.clone() for p in mp]
flops = 3 * 2 * n_tok * 2 * 3 * d * d_ff
for label, module, params in (("dense", dense, list(dense.parameters())), ("moe", moe, mp)):
    c = du.compile_model(module, dynamic=False, options=opts)
    fwd = lambda t: c(t)[0]
    t0 = time.perf_counter()
    try:
        y = bench.run_fwd_bwd(fwd, params, x, dy, True); bench.sync(device)
        row = dict(impl=label, compile_s=round(time.perf_counter() - t0, 1))
        if label == "moe":
            row["rel_err"] = max([bench.rel_err(y, y_ref), bench.rel_err(x.grad, g_ref[0])] +
                                 [bench.rel_err(p.grad, g) for p, g in zip(params, g_ref[1:])])
        row["ms"] = bench.timeit(lambda: bench.run_fwd_bwd(fwd, params, x, dy, True), device, 10, 50)
        row["tflops"] = flops / row["ms"] / 1e9
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            bench.run_fwd_bwd(fwd, params, x, dy, True); bench.sync(device)
        ka = prof.key_averages()
        row["kernels"] = sorted(((k.key[:90], round(k.device_time_total / 1e3, 3)) for k in ka if k.device_time_total > 0),
                                key=lambda kv: -kv[1])[:12]
    except Exception as e:
        row = dict(impl=label, error=f"{type(e).__name__}: {str(e)[:500]}")
    res["rows"].append(row)
    print({k: v for k, v in row.items() if k != "kernels"}, flush=True)
    torch._dynamo.reset()
ms = {r["impl"]: r.get("ms") for r in res["rows"]}
if ms.get("dense") and ms.get("moe"):
    res["x_dense"] = ms["moe"] / ms["dense"]
print(mode, d, d_ff, n_tok, "x_dense", res.get("x_dense"), flush=True)
json.dump(res, open(out, "w"), indent=1)
