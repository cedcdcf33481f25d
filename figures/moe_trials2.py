"""Trials of MoE-layer variants (not part of the product): layer fwd+bwd and whole compiled steps, one GPU run.
Variants: row groups for fwd/dgrad (repeat weights, the current code) or for the weight gradient only (custom
autograd Function), permutations as index_copy (current) or as gathers both ways (custom Function), gate weights
folded into the down projection's input."""
import json, os, sys, time, types
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
    with open(os.path.join(OUT, "trials.json"), "w") as f:
        json.dump(results, f, indent=1)


ORIG = du.MoE.experts_grouped
_gmm = du._grouped_mm


class ExpertMM(torch.autograd.Function):
    """x_sorted [M, in] @ w [E, in, out] by groups; the weight gradient in wgrad_groups groups per expert."""

    @staticmethod
    def forward(ctx, x, w, offsets, wgrad_offsets):
        ctx.save_for_backward(x, w, offsets, wgrad_offsets)
        return _gmm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, grad):
        x, w, offsets, wgrad_offsets = ctx.saved_tensors
        grad_x = _gmm(grad, w.transpose(1, 2), offs=offsets)
        E, G = w.shape[0], wgrad_offsets.shape[0] // w.shape[0]
        grad_w = _gmm(x.t(), grad, offs=wgrad_offsets)  # [E*G, in, out]
        if G > 1:
            grad_w = grad_w.view(E, G, *grad_w.shape[1:]).float().sum(1).to(w.dtype)
        return grad_x, grad_w, None, None


class PermuteRows(torch.autograd.Function):
    """rows[index], whose gradient is a gather too: grad[inverse] (index a permutation, inverse its inverse)."""

    @staticmethod
    def forward(ctx, rows, index, inverse):
        ctx.save_for_backward(inverse)
        return rows[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def make_grouped(split=1, wsplit=1, gather=False, fold=False, key=None):
    def experts_grouped(self, x, experts, weights):
        N, k = experts.shape
        bf16 = torch.bfloat16
        keys = experts.flatten() if key is None else experts.flatten().to(key)
        sorted_experts, order = keys.sort(stable=True)
        where = torch.empty_like(order)
        where[order] = torch.arange(order.numel(), device=x.device)
        ids = torch.arange(self.n_experts, device=x.device, dtype=sorted_experts.dtype)
        ends = torch.searchsorted(sorted_experts, ids, right=True, out_int32=True)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])

        def cut(G):
            j = torch.arange(1, G + 1, device=x.device, dtype=torch.int32)
            return (starts[:, None] + (ends - starts)[:, None] * j // G).flatten().to(torch.int32)

        offsets = cut(split) if split > 1 else ends
        rep = (lambda w: w.repeat_interleave(split, dim=0)) if split > 1 else (lambda w: w)
        if wsplit > 1:
            woffs = cut(wsplit)
            mm = lambda a, w: ExpertMM.apply(a, w, offsets, woffs)
        else:
            mm = lambda a, w: _gmm(a, w, offs=offsets)
        x_rows = x.to(bf16).unsqueeze(1).expand(N, k, -1).reshape(N * k, -1)
        if gather:
            x_sorted = PermuteRows.apply(x_rows, order, where)
        else:
            x_sorted = x_rows.new_empty(x_rows.shape).index_copy(0, where, x_rows)
        h_gate = mm(x_sorted, rep(self.gate.to(bf16)).transpose(1, 2))
        h_up = mm(x_sorted, rep(self.up.to(bf16)).transpose(1, 2))
        h = F.silu(h_gate) * h_up
        w_rows = weights.to(bf16).reshape(N * k, 1)
        if fold:
            w_sorted = PermuteRows.apply(w_rows, order, where) if gather else \
                w_rows.new_empty(w_rows.shape).index_copy(0, where, w_rows)
            h = h * w_sorted
        out = mm(h, rep(self.down.to(bf16)).transpose(1, 2))
        if gather:
            out = PermuteRows.apply(out, where, order)
        else:
            out = out.new_empty(out.shape).index_copy(0, order, out)
        if not fold:
            out = out * w_rows
        return out.view(N, k, -1).sum(dim=1).to(x.dtype)
    return experts_grouped


def apply(**kw):
    du.MoE.experts_grouped = make_grouped(**kw) if kw else ORIG


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
            t0 = time.time()
            bench.run_fwd_bwd(fwd, params, x, dy, True)
            compile_s = time.time() - t0
            got = [x.grad.clone()] + [p.grad.clone() for p in params]
            err = max(bench.rel_err(a, b) for a, b in zip(got, ref))
            ms = bench.timeit(lambda: bench.run_fwd_bwd(fwd, params, x, dy, True), device, 5, 30)
            dense_again = bench.timeit(lambda: bench.run_fwd_bwd(lambda t: cd(t)[0], dparams, x, dy, True), device, 5, 30)
            ms2 = bench.timeit(lambda: bench.run_fwd_bwd(fwd, params, x, dy, True), device, 5, 30)
            log(kind="layer", d=d, d_ff=d_ff, tokens=n_tok, skew=skew, variant=name, ms=ms, ms_again=ms2,
                dense_again=dense_again, x_dense=min(ms, ms2) / min(dense_ms, dense_again), rel_err=err,
                compile_s=round(compile_s, 1))
        except Exception as e:
            log(kind="layer", d=d, d_ff=d_ff, tokens=n_tok, skew=skew, variant=name, error=bench.error_text(e))
    apply()
    torch._dynamo.reset()


def step_rows(variants, skew=None):
    device = torch.device("cuda")
    g = bench.GPU
    shape = {k: g[k] for k in ("n_layer", "d_model", "d_ff", "n_head", "n_kv_head")}
    for name, kind, kw in variants:
        try:
            apply(**kw)
            args = types.SimpleNamespace(compile_mode=None, warmup=5, iters=40, profile=False)
            cfg = bench.step_config(kind, shape, g["seq_len"])
            r = bench.bench_one_step(cfg, g["batch_size"], g["seq_len"], "compiled", device, args, None, None,
                                     skew if kind == "moe" else None)
            log(kind="step", model=kind, variant=name, skew=skew, ms=r["ms"], mtok_s=r["tokens_per_s"] / 1e6,
                first_step_s=r["first_step_s"], graphs=r.get("graphs"), breaks=r.get("graph_breaks"),
                balance=r.get("load_balance"))
        except Exception as e:
            log(kind="step", model=kind, variant=name, error=bench.error_text(e))
    apply()


def profile_layer(d, d_ff, n_tok, kw, name):
    device = torch.device("cuda")
    torch.manual_seed(2)
    x = torch.randn(1, n_tok, d, device=device, requires_grad=True)
    dy = torch.randn(1, n_tok, d, device=device)
    moe = bench.make_moe(d, d_ff, device, torch.float32)
    params = list(moe.parameters())
    apply(**kw)
    torch._dynamo.reset()
    cm = du.compile_model(moe, dynamic=False)
    fn = lambda: bench.run_fwd_bwd(lambda t: cm(t)[0], params, x, dy, True)
    text = bench.profile_table(fn, device, 5, f"MoE layer {name}, compiled, {d}x{d_ff}, {n_tok} tokens, 5 fwd+bwd")
    with open(os.path.join(OUT, "profile.txt"), "a") as f:
        f.write(text + "\n\n")
    apply()


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    which = sys.argv[1:] or ["layer", "step"]
    cur = dict(split=2)  # the current code at 512 x 2048 (row_groups_per_expert)
    L = [("current", {}), ("G1", dict(split=1)), ("wG2", dict(wsplit=2)), ("wG4", dict(wsplit=4)),
         ("gather", dict(gather=True)), ("gather+fold", dict(gather=True, fold=True)),
         ("wG2+gather", dict(wsplit=2, gather=True)), ("wG2+gather+fold", dict(wsplit=2, gather=True, fold=True)),
         ("G2+gather", dict(split=2, gather=True)), ("fold", dict(fold=True))]
    if "layer" in which:
        for n in (32768, 65536):
            layer_rows(512, 2048, n, L)
        layer_rows(512, 2048, 32768, L, 2.0)
    if "small" in which:
        S = [("current", {}), ("G1", dict(split=1)), ("wG4", dict(wsplit=4)), ("wG8", dict(wsplit=8)),
             ("wG4+gather", dict(wsplit=4, gather=True)), ("G4+gather", dict(split=4, gather=True)),
             ("wG4+gather+fold", dict(wsplit=4, gather=True, fold=True))]
        layer_rows(256, 1024, 65536, S)
        layer_rows(256, 1024, 65536, S, 2.0)
    if "step" in which:
        S = [("dense", "dense", {}), ("current", "moe", {}), ("wG4", "moe", dict(wsplit=4)),
             ("wG4+gather", "moe", dict(wsplit=4, gather=True)), ("G4+gather", "moe", dict(split=4, gather=True)),
             ("wG4+gather+fold", "moe", dict(wsplit=4, gather=True, fold=True))]
        step_rows(S)
        step_rows(S[1:4], 2.0)
    if "profile" in which:
        profile_layer(512, 2048, 32768, {}, "current")
        profile_layer(512, 2048, 32768, dict(split=1, gather=True), "G1+gather")
