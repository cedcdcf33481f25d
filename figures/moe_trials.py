"""Trials of MoE-layer variants on one GPU, against the committed layer (a record of what was tried, not part of the
product): layer forward + backward and whole compiled training steps, each variant patched in turn. Writes $OUT/exp.json."""
import argparse, json, os, sys, time, types
sys.path.insert(0, os.getcwd())
import torch
import torch.nn.functional as F
import bench
import dropupcycle as du

OUT = os.environ.get("OUT", "/tmp/exp")
os.makedirs(OUT, exist_ok=True)
results = []
T0 = time.time()


def log(**row):
    row["t"] = round(time.time() - T0, 1)
    results.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, "exp.json"), "w") as f:
        json.dump(results, f, indent=1)


ORIG_GROUPED = du.MoE.experts_grouped
ORIG_ROUTE = du.MoE.route
ORIG_LBL = du.load_balancing_loss
_gmm = du._grouped_mm


def make_grouped(split=1, fuse=False, key=None):
    def experts_grouped(self, x, experts, weights):
        N, k = experts.shape
        bf16 = torch.bfloat16
        keys = experts.flatten() if key is None else experts.flatten().to(key)
        sorted_experts, order = keys.sort(stable=True)
        where = torch.empty_like(order)
        where[order] = torch.arange(order.numel(), device=x.device)
        ids = torch.arange(self.n_experts, device=x.device, dtype=sorted_experts.dtype)
        ends = torch.searchsorted(sorted_experts, ids, right=True, out_int32=True)
        if split > 1:
            starts = torch.cat([ends.new_zeros(1), ends[:-1]])
            counts = ends - starts
            j = torch.arange(1, split + 1, device=x.device, dtype=torch.int32)
            offsets = (starts[:, None] + counts[:, None] * j // split).flatten().to(torch.int32)
            rep = lambda w: w.repeat_interleave(split, dim=0)
        else:
            offsets, rep = ends, (lambda w: w)
        x_rows = x.to(bf16).unsqueeze(1).expand(N, k, -1).reshape(N * k, -1)
        x_sorted = x_rows.new_empty(x_rows.shape).index_copy(0, where, x_rows)
        if fuse:
            w_gu = rep(torch.cat([self.gate, self.up], dim=1).to(bf16)).transpose(1, 2)
            h = _gmm(x_sorted, w_gu, offs=offsets)
            h_gate, h_up = h.chunk(2, dim=-1)
        else:
            h_gate = _gmm(x_sorted, rep(self.gate.to(bf16)).transpose(1, 2), offs=offsets)
            h_up = _gmm(x_sorted, rep(self.up.to(bf16)).transpose(1, 2), offs=offsets)
        out = _gmm(F.silu(h_gate) * h_up, rep(self.down.to(bf16)).transpose(1, 2), offs=offsets)
        out = out.new_empty(out.shape).index_copy(0, order, out).view(N, k, -1)
        return (out * weights.to(bf16)[..., None]).sum(dim=1).to(x.dtype)
    return experts_grouped


def top_k_max(scores, k):
    masked = scores.detach()
    idx = []
    cols = torch.arange(scores.shape[-1], device=scores.device)
    for _ in range(k):
        i = masked.argmax(dim=-1)
        idx.append(i)
        masked = torch.where(cols == i[:, None], float("-inf"), masked)
    return torch.stack(idx, dim=-1)


def route_max(self, x):
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.float(), self.router.weight.float())
    experts = top_k_max(logits, self.top_k)
    weights = F.softmax(logits.gather(-1, experts), dim=-1)
    return logits, experts, weights


def route_unsorted(self, x):
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.float(), self.router.weight.float())
    top_logits, experts = logits.topk(self.top_k, dim=-1, sorted=False)
    return logits, experts, F.softmax(top_logits, dim=-1)


def lbl_max(router_logits, top_k):
    n_experts = router_logits.shape[-1]
    probs = F.softmax(router_logits.float(), dim=-1)
    chosen = top_k_max(probs, top_k)
    f = F.one_hot(chosen, n_experts).float().sum(dim=1).mean(dim=0)
    return n_experts * (f * probs.mean(dim=0)).sum()


def lbl_unsorted(router_logits, top_k):
    n_experts = router_logits.shape[-1]
    probs = F.softmax(router_logits.float(), dim=-1)
    chosen = probs.topk(top_k, dim=-1, sorted=False).indices
    f = F.one_hot(chosen, n_experts).float().sum(dim=1).mean(dim=0)
    return n_experts * (f * probs.mean(dim=0)).sum()


ROUTES = {"topk": (ORIG_ROUTE, ORIG_LBL), "max": (route_max, lbl_max), "unsorted": (route_unsorted, lbl_unsorted)}


def apply(split=1, fuse=False, key=None, route="topk"):
    du.MoE.experts_grouped = make_grouped(split, fuse, key)
    du.MoE.route, du.load_balancing_loss = ROUTES[route]


def layer_rows(d, d_ff, n_tok, variants, skew=0.0):
    device = torch.device("cuda")
    torch.manual_seed(2)
    x = torch.randn(1, n_tok, d, device=device, requires_grad=True)
    dy = torch.randn(1, n_tok, d, device=device)
    moe = bench.make_moe(d, d_ff, device, torch.float32)
    if skew:
        bench.skew_routing(moe, skew)
    dense = bench.make_dense(d, d_ff, device, torch.float32)
    params = list(moe.parameters())
    apply()
    bench.run_fwd_bwd(bench.reference_forward(moe), params, x, dy, True)
    ref = [x.grad.clone()] + [p.grad.clone() for p in params]
    torch._dynamo.reset()
    cd = du.compile_model(dense, dynamic=False)
    dparams = list(dense.parameters())
    bench.run_fwd_bwd(lambda t: cd(t)[0], dparams, x, dy, True)
    dense_ms = bench.timeit(lambda: bench.run_fwd_bwd(lambda t: cd(t)[0], dparams, x, dy, True), device, 5, 30)
    log(kind="layer", d=d, d_ff=d_ff, tokens=n_tok, skew=skew, variant="dense floor", ms=dense_ms)
    for name, kw in variants:
        try:
            apply(**kw)
            torch._dynamo.reset()
            cm = du.compile_model(moe, dynamic=False)
            fwd = lambda t: cm(t)[0]
            bench.run_fwd_bwd(fwd, params, x, dy, True)
            got = [x.grad.clone()] + [p.grad.clone() for p in params]
            err = max(bench.rel_err(a, b) for a, b in zip(got, ref))
            ms = bench.timeit(lambda: bench.run_fwd_bwd(fwd, params, x, dy, True), device, 5, 30)
            ms2 = bench.timeit(lambda: bench.run_fwd_bwd(fwd, params, x, dy, True), device, 5, 30)
            log(kind="layer", d=d, d_ff=d_ff, tokens=n_tok, skew=skew, variant=name, ms=ms, ms_again=ms2,
                x_dense=min(ms, ms2) / dense_ms, rel_err=err)
        except Exception as e:
            log(kind="layer", d=d, d_ff=d_ff, tokens=n_tok, variant=name, error=bench.error_text(e))
    apply()
    torch._dynamo.reset()


def step_rows(variants, skew=None):
    device = torch.device("cuda")
    g = bench.GPU
    shape = {k: g[k] for k in ("n_layer", "d_model", "d_ff", "n_head", "n_kv_head")}
    for name, kind, mode, kw in variants:
        try:
            apply(**kw)
            args = types.SimpleNamespace(compile_mode=mode, warmup=5, iters=30, profile=False)
            cfg = bench.step_config(kind, shape, g["seq_len"])
            r = bench.bench_one_step(cfg, g["batch_size"], g["seq_len"], "compiled", device, args, None, None,
                                     skew if kind == "moe" else None)
            log(kind="step", model=kind, compile_mode=mode, variant=name, skew=skew, ms=r["ms"],
                mtok_s=r["tokens_per_s"] / 1e6, first_step_s=r["first_step_s"], graphs=r.get("graphs"),
                breaks=r.get("graph_breaks"), balance=r.get("load_balance"))
        except Exception as e:
            log(kind="step", model=kind, compile_mode=mode, variant=name, error=bench.error_text(e))
    apply()


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    which = sys.argv[1:] or ["layer", "step"]
    L = [("base", {}), ("split2", dict(split=2)), ("split4", dict(split=4)), ("split8", dict(split=8)),
         ("fuse", dict(fuse=True)), ("fuse+split4", dict(fuse=True, split=4)),
         ("key int32", dict(key=torch.int32)), ("key uint8", dict(key=torch.uint8)),
         ("route max", dict(route="max")), ("route unsorted", dict(route="unsorted"))]
    if "layer" in which:
        layer_rows(256, 1024, 65536, L)
        layer_rows(512, 2048, 32768, [v for v in L if v[0] in ("base", "split2", "split4", "fuse", "route max")])
    if "step" in which:
        S = [("dense", "dense", None, {}), ("dense", "dense", "reduce-overhead", {}),
             ("base", "moe", None, {}), ("route max", "moe", None, dict(route="max")),
             ("route unsorted", "moe", None, dict(route="unsorted")),
             ("split4", "moe", None, dict(split=4)), ("split4+max", "moe", None, dict(split=4, route="max")),
             ("split4+max+fuse", "moe", None, dict(split=4, route="max", fuse=True)),
             ("base", "moe", "reduce-overhead", {})]
        step_rows(S)
    if "skewstep" in which:
        step_rows([(name, "moe", None, kw) for name, kw in L[:3]], 2.0)
        step_rows([(name, "moe", None, kw) for name, kw in L[:3]], 1.0)
    if "skew" in which:  # uneven routing, as real text gives (the base here routes by argmax rounds)
        for skew in (0.0, 2.0):
            layer_rows(256, 1024, 65536, L[:4], skew)
        layer_rows(512, 2048, 32768, L[:3], 2.0)
        step_rows([(name, "moe", None, kw) for name, kw in L[:4]], 2.0)
