"""
bench.py: how fast dropupcycle.py trains on one GPU, and what its MoE layer costs over a dense one.

    python bench.py                                # CUDA: the full run (about 3 minutes on an H100), into out/bench
    python bench.py --device cpu --out /tmp/bench  # CPU: tiny shapes, fewer rows; a smoke test, not a benchmark

Four measurements, all in one process (--sections: layer and step by default, loop on request):
  1. One MoE layer, forward + backward: our grouped-GEMM path (eager and torch.compile'd), our reference loop,
     Hugging Face's MixtralSparseMoeBlock in every experts implementation the installed transformers offers,
     and a dense SwiGLU top_k * d_ff wide: the same active FLOPs, so the floor an MoE layer cannot beat.
     Every output (and our gradients) is first checked against our reference loop. Two weight dtypes:
     fp32 weights under bf16 autocast (how train.py trains) and bf16 weights (fairest to the peers).
  2. Whole training steps (forward, backward, grad clipping, AdamW), dense and MoE, eager and compiled:
     tokens/s, MFU (flops_per_token counts active parameters only, over the GPU's dense peak in its autocast
     precision), peak memory, compile time, and the graphs/graph breaks torch.compile made. Random tokens through a
     fresh router spread evenly over the experts; --router-skew adds MoE rows with the uneven routing of
     real text, each with the load balance it gave.
  3. MoE step time / dense step time next to MoE FLOPs / dense FLOPs per token: the excess is what the
     MoE machinery (routing, sorting, grouped GEMMs) costs beyond its arithmetic.
  4. (loop) train.py's own step function on the first config, in train.py's mode, on random tokens and on real
     text: against the bare step of 2, what train.py's loop adds, and what real text (its routing) adds; timed
     by device events and by the wall clock (the GPU may wait for the host between steps).
It prints a table and writes bench.md and bench.json (rewritten after every row) to --out.
"""

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import shlex
import statistics
import sys
import time

import ctrl_c

if __name__ == "__main__":  # Ctrl-C from here on, the seconds of slow imports included: ctrl_c.py
    ctrl_c.install()

import numpy as np
import torch
import torch.nn as nn

import analyze
import data
import dropupcycle as du
import gpus
import train

# What each device runs. CUDA: the paper's 8x152M shapes and train.py's gpu preset. CPU: tiny, so that the smoke
# test takes seconds.
GPU = train.PRESETS["gpu"]
LAYER_SHAPES = {  # name, d_model, d_ff, token counts; 8 experts, top-2 everywhere
    "cuda": [("demo (GPU preset)", GPU["d_model"], GPU["d_ff"], [GPU["batch_size"] * GPU["seq_len"]]),
             ("paper 8x152M", 512, 2048, [16384, 32768, 65536]), ("1024/4096", 1024, 4096, [32768])],
    "cpu": [("tiny", 32, 64, [256])],
}
STEP_CONFIGS = {  # name, model shape, batch, seq; vocab 257 (train.py's bytes)
    "cuda": [("GPU preset", {k: GPU[k] for k in ("n_layer", "d_model", "d_ff", "n_head", "n_kv_head")},
              GPU["batch_size"], GPU["seq_len"]),
             ("large (152M shape)", dict(n_layer=12, d_model=512, d_ff=2048, n_head=8, n_kv_head=8), 64, 512)],
    "cpu": [("tiny", dict(n_layer=2, d_model=32, d_ff=64, n_head=2, n_kv_head=2), 2, 32)],
}
N_EXPERTS, TOP_K = 8, 2
LOOP_ROUNDS = 3  # alternating rounds of train.py's step and the bare step (section 4)
LOOP_WALL_TIMES_ITERS = 10  # a wall-clock timing of section 4: 10 x --iters steps in a row

# the speed targets: MoE layer within 1.2x of the dense one, step MFU, MoE overhead over its FLOPs, train.py's
# step within 5% of the bare step
LAYER_VS_DENSE, STEP_MFU_DENSE, STEP_MFU_MOE, OVERHEAD, LOOP_VS_BARE = 1.2, 0.40, 0.30, 1.15, 1.05


def step_config(kind, shape, seq):
    """The ModelConfig of a whole-model row: dense, or the MoE of the same shape (8 experts, top-2)."""
    moe_kw = dict(n_experts=N_EXPERTS, top_k=TOP_K) if kind == "moe" else {}
    return du.ModelConfig(vocab_size=257, max_seq_len=seq, **shape, **moe_kw)


def error_text(e):
    """A row's one-line account of why it could not be measured."""
    return f"{type(e).__name__}: {data.first_line(e, 200)}"[:200]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup, iters):
    """Median time of fn() in ms. On CUDA the work is asynchronous: device events around every call, recorded
    back to back without waiting in between (as in a training loop), read after one final synchronize."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def wall_ms(fn, device, iters):
    """Mean wall-clock time of iters calls of fn() in a row, in ms, synchronized only before and after: what a
    training loop's tokens/s sees. Where the host is slower than the GPU, each step's device events (timeit) miss
    the host's stalls between steps, and a median misses its occasional slow steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return 1e3 * (time.perf_counter() - t0) / iters


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def peak_mib(device, base=0):
    return (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None


def rel_err(a, b):
    """||a - b|| / ||b||, in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# -----------------------------------------------------------------------------
# 1. One MoE layer, forward + backward


def make_moe(d, d_ff, device, dtype, seed=0):
    torch.manual_seed(seed)
    cfg = du.ModelConfig(d_model=d, d_ff=d_ff, n_head=1, n_kv_head=1, n_experts=N_EXPERTS, top_k=TOP_K)
    moe = du.MoE(cfg)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.02)  # as Transformer.reset_parameters: a mildly uneven random routing
    return moe.to(device, dtype)


def make_dense(d, d_ff, device, dtype):
    """The floor: a dense SwiGLU top_k * d_ff wide does exactly the active FLOPs of the MoE layer's experts."""
    torch.manual_seed(1)
    dense = du.SwiGLU(du.ModelConfig(d_model=d, d_ff=TOP_K * d_ff, n_head=1, n_kv_head=1))
    for p in dense.parameters():
        nn.init.normal_(p, std=0.02)
    return dense.to(device, dtype)


def reference_forward(moe):
    """MoE.forward with the reference loop forced (forward itself takes the grouped path on CUDA)."""

    def forward(x):
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        _, experts, weights = moe.route(x2)
        return moe.experts_reference(x2, experts, weights).view(B, T, D)

    return forward


def hf_implementations():
    """Hugging Face's experts implementations in the installed transformers, or (None, why not)."""
    try:
        import transformers
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: F401
    except Exception as e:  # transformers is optional: the peer rows are then left out, with this note
        return None, f"transformers not importable ({type(e).__name__}: {e}); Hugging Face rows left out"
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        impls = ["eager"] + list(ALL_EXPERTS_FUNCTIONS.keys())
    except Exception:  # older versions: only the per-expert loop
        impls = ["eager"]
    return impls, f"transformers {transformers.__version__}: experts implementations {impls}"


def hf_block(moe, impl, device, dtype):
    """Hugging Face's MixtralSparseMoeBlock holding exactly our MoE's weights, in experts implementation impl."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, d_ff, d = moe.gate.shape
    cfg = MixtralConfig(hidden_size=d, intermediate_size=d_ff, num_local_experts=E, num_experts_per_tok=moe.top_k,
                        num_attention_heads=1, num_key_value_heads=1, router_jitter_noise=0.0, hidden_act="silu")
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():  # their layout: gate_up_proj [E, 2*d_ff, d] is our gate and up stacked, gate first
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.gate, moe.up], dim=1))
        block.experts.down_proj.copy_(moe.down)
    block = block.to(device, dtype)

    def forward(x):
        y = block(x)
        return y[0] if isinstance(y, tuple) else y  # 4.x returned (hidden, router_logits)

    return forward, block


def hf_routed_reference(moe, block):
    """Our reference loop fed with Hugging Face's routing. Their router runs in the autocast dtype, ours in
    fp32, so near-ties can go to different experts: this checks their expert computation against ours."""

    def forward(x):
        x2 = x.reshape(-1, x.shape[-1])
        _, scores, experts = block.gate(x2)  # transformers 5.x: logits, top-k weights, top-k indices
        return moe.experts_reference(x2, experts, scores).view_as(x)

    return forward


def run_fwd_bwd(forward, params, x, dy, autocast):
    """One forward + backward through the layer, fresh gradients (as a training step sees it)."""
    x.grad = None
    for p in params:
        p.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = forward(x)
    y.backward(dy)
    return y


def bench_layers(device, record, *, use_hf, use_compile, compile_tokens, tol, warmup, iters):
    impls, note = hf_implementations() if use_hf else (None, "Hugging Face rows skipped (--no-hf)")
    print(note)
    record("hf_note", note)
    hf_broken = {}  # (implementation, weights) -> why it cannot run here (found once, not retried at every shape)
    for name, d, d_ff, token_counts in LAYER_SHAPES[device.type]:
        for n_tok in token_counts:
            for wdtype in (torch.float32, torch.bfloat16):
                weights = "fp32+autocast" if wdtype == torch.float32 else "bf16"
                autocast = True  # bf16 weights under autocast too: a no-op for them, and the same code path
                torch.manual_seed(2)
                x = torch.randn(1, n_tok, d, device=device, dtype=wdtype, requires_grad=True)
                dy = torch.randn(1, n_tok, d, device=device, dtype=wdtype)
                moe = make_moe(d, d_ff, device, wdtype)
                dense = make_dense(d, d_ff, device, wdtype)
                moe_params = list(moe.parameters())
                # truth: our reference loop, same weights, same precision regime
                y_ref = run_fwd_bwd(reference_forward(moe), moe_params, x, dy, autocast).detach()
                grads_ref = [x.grad.clone()] + [p.grad.clone() for p in moe_params]
                flops = 3 * 2 * n_tok * TOP_K * 3 * d * d_ff  # fwd + bwd (2x fwd), active expert matmuls
                compiled_here = use_compile and wdtype == torch.float32 and n_tok in compile_tokens
                rows = []  # (label, mode, forward, parameters, check our parameters' gradients too); dense first
                rows.append(("dense SwiGLU (floor)", "eager", lambda t: dense(t)[0], list(dense.parameters()), False))
                if compiled_here:
                    cdense = du.compile_model(dense, dynamic=False)
                    rows.append(("dense SwiGLU (floor)", "compiled", lambda t: cdense(t)[0], list(dense.parameters()),
                                 False))
                # MoE.forward: the grouped path on CUDA; on CPU it falls back to the reference loop
                ours = "ours grouped" if device.type == "cuda" else "ours forward (reference on CPU)"
                rows.append((ours, "eager", lambda t: moe(t)[0], moe_params, True))
                if compiled_here:
                    cmoe = du.compile_model(moe, dynamic=False)
                    rows.append((ours, "compiled", lambda t: cmoe(t)[0], moe_params, True))
                rows.append(("ours reference", "eager", reference_forward(moe), moe_params, False))
                for impl in impls or []:
                    rows.append((f"HF {impl}", "eager", impl, None, False))
                dense_ms = {}
                for label, mode, forward, params, check_grads in rows:
                    row = dict(shape=name, d_model=d, d_ff=d_ff, tokens=n_tok, weights=weights, impl=label, mode=mode)
                    block = None
                    if label.startswith("HF") and (forward, weights) in hf_broken:
                        continue  # failed once already, reported then
                    try:
                        if label.startswith("HF"):
                            impl = forward
                            if impl == "batched_mm":  # it gathers every assignment's weight matrices: [N*k, ...]
                                need = 2 * n_tok * TOP_K * 3 * d * d_ff * x.element_size()  # fwd copy + its grad
                                free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else float("inf")
                                if need > 0.8 * free:
                                    raise MemoryError(f"skipped: would gather {need / 2**30:.0f} GiB of expert "
                                                      f"weights, {free / 2**30:.0f} GiB free")
                            forward, block = hf_block(moe, impl, device, wdtype)
                            params = list(block.parameters())
                        t0 = time.perf_counter()
                        y = run_fwd_bwd(forward, params, x, dy, autocast)  # the first call compiles, if compiled
                        sync(device)
                        if mode == "compiled":
                            row["compile_s"] = round(time.perf_counter() - t0, 1)
                        if label != "ours reference" and not label.startswith("dense"):  # agree before timing
                            y_true, dx_true = y_ref, grads_ref[0]
                            if block is not None:
                                dx = x.grad.clone()
                                y_true = run_fwd_bwd(hf_routed_reference(moe, block), params, x, dy, autocast)
                                y_true, dx_true, x.grad = y_true.detach(), x.grad.clone(), dx
                            errs = [rel_err(y, y_true), rel_err(x.grad, dx_true)]
                            if check_grads:
                                errs += [rel_err(p.grad, g) for p, g in zip(params, grads_ref[1:])]
                            row["rel_err"] = max(errs)
                            row["agrees"] = bool(row["rel_err"] < tol)
                        del y
                        base = reset_peak(device)
                        ms = timeit(lambda: run_fwd_bwd(forward, params, x, dy, autocast), device,
                                    warmup, iters)
                        row.update(ms=ms, tflops=flops / ms / 1e9, peak_mib=peak_mib(device, base))
                        if label.startswith("dense"):
                            dense_ms[mode] = ms
                        row["x_dense"] = ms / dense_ms.get(mode, dense_ms.get("eager", float("nan")))
                    except Exception as e:  # an implementation that cannot run here is a result, not a crash
                        msg = error_text(e)
                        row["error"] = msg
                        if label.startswith("HF") and not isinstance(e, (MemoryError, torch.OutOfMemoryError)):
                            hf_broken[impl, weights] = msg
                    finally:
                        del block
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    record("layer", row)
                    print(fmt_layer_row(row), flush=True)
                del moe, dense, x, dy, y_ref, grads_ref
                torch._dynamo.reset()  # each compiled layer above is done with; keep recompile limits untouched


def fmt_layer_row(r):
    if "error" in r:
        return (f"{r['shape']:>13} {r['tokens']:>6} {r['weights']:>13} {r['impl'] + ' ' + r['mode']:>30}  "
                f"-- {r['error']}")
    agree = "" if "rel_err" not in r else f"  rel err {r['rel_err']:.1e}{'' if r['agrees'] else ' MISMATCH'}"
    return (f"{r['shape']:>13} {r['tokens']:>6} {r['weights']:>13} {r['impl'] + ' ' + r['mode']:>30} "
            f"{r['ms']:8.2f} ms {r['tflops']:6.3g} TFLOP/s {r['x_dense']:5.2f}x dense{agree}")


# -----------------------------------------------------------------------------
# 2. Whole training steps


def peak_flops(device, override):
    """The card's dense peak in the precision the steps autocast to (bf16, or fp16 on cards without it), as
    train.py's MFU uses."""
    if override:
        return override * 1e12
    return gpus.gpu_peak_flops(device, gpus.amp_dtype(device))


def bench_steps(device, record, profiles, *, use_compile, compile_mode, peak, router_skews, warmup, iters):
    for name, shape, batch, seq in STEP_CONFIGS[device.type]:
        for kind, skew in [("dense", None)] + [("moe", skew) for skew in router_skews]:
            cfg = step_config(kind, shape, seq)
            for mode in ("eager", "compiled") if use_compile else ("eager",):
                row = dict(config=name, model=kind, mode=mode, batch=batch, seq=seq, **shape)
                if kind == "moe":
                    row["router_skew"] = skew
                try:
                    # profile the largest config's steps, reusing the (compiled) model just measured
                    prof = (profiles if profiles is not None and name == STEP_CONFIGS[device.type][-1][0] and not skew
                            else None)
                    row.update(bench_one_step(cfg, batch, seq, mode, compile_mode, device, peak, prof, skew,
                                              warmup=warmup, iters=iters))
                except Exception as e:
                    row["error"] = error_text(e)
                record("step", row)
                print(fmt_step_row(row), flush=True)


def skew_routing(model, skew):
    """Adds -skew * e to expert e's router logit in every MoE layer, so that the low-numbered experts get most of
    the tokens. A fresh router routes random tokens evenly; real text goes far less evenly to the experts of one
    layer (naive Upcycling: load balance 0.36-0.46, figures/routing_gpu_summary.md), and the grouped GEMMs then get
    unequal groups. This times that case. MoE.route itself is unchanged; its top-k and softmax are redone here,
    the same way, on the biased logits."""
    for moe in (m for m in model.modules() if isinstance(m, du.MoE)):
        bias = -skew * torch.arange(moe.n_experts, dtype=torch.float32, device=moe.router.weight.device)  # [E]

        def route(x, moe=moe, bias=bias):
            logits = du.MoE.route(moe, x)[0] + bias  # [N, E]
            return (logits, *du.top_k_gates(logits, moe.top_k))
        moe.route = route


@torch.no_grad()
def routing_balance(model, inputs):
    """Mean over the MoE layers of the load balance of their routing of inputs (analyze.load_balance: 1 when
    every expert gets the same share of the assignments)."""
    balances = []

    def measure(moe, args):
        x = args[0].reshape(-1, args[0].shape[-1])  # [N, d_model]
        experts = moe.route(x)[1]
        balances.append(analyze.load_balance(analyze.count_assignments(experts, moe.n_experts).cpu().numpy()))
    hooks = [m.register_forward_pre_hook(measure) for m in model.modules() if isinstance(m, du.MoE)]
    try:
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(balances) / len(balances)


def bare_step(run, params, optimizer, inputs, targets, autocast):
    """One training step with nothing around it (section 2; section 4's yardstick): forward and backward under
    autocast() (a context), gradient clipping, the optimizer's update."""
    with autocast():
        _, loss = run(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_one_step(cfg, batch, seq, mode, compile_mode, device, peak, profiles=None, router_skew=None, *, warmup, iters):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = du.Transformer(cfg).to(device)  # fp32 master weights under autocast (bf16 where the GPU has it): train.py's
    idx = torch.randint(0, 256, (batch, seq + 1), device=device)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    out = {}
    if cfg.is_moe:
        if router_skew:
            skew_routing(model, router_skew)
        out["load_balance"] = routing_balance(model, inputs)
    params = list(model.parameters())
    opt = train.make_optimizer(model, 3e-4, 0.1, device)  # train.py's AdamW: the step section 4 compares with
    run = du.compile_model(model, mode=compile_mode) if mode == "compiled" else model

    def step():
        train.begin_step(run)  # (under CUDA graphs this step's replay may overwrite the last one's outputs)
        bare_step(run, params, opt, inputs, targets, lambda: gpus.autocast(device))

    counters = torch._dynamo.utils.counters
    counters.clear()
    t0 = time.perf_counter()
    step()  # the first step compiles (and warms up caches and allocators either way)
    sync(device)
    out["first_step_s"] = round(time.perf_counter() - t0, 1)
    if mode == "compiled":
        out["graphs"] = counters["stats"]["unique_graphs"]
        out["graph_breaks"] = sum(counters["graph_break"].values())
        out["break_reasons"] = sorted(counters["graph_break"])[:5]
    reset_peak(device)
    ms = timeit(step, device, warmup, iters)
    fpt = du.flops_per_token(cfg, seq)
    tok_s = batch * seq / ms * 1e3
    out.update(ms=ms, tokens_per_s=tok_s, flops_per_token=fpt, achieved_tflops=fpt * tok_s / 1e12,
               mfu=fpt * tok_s / peak if peak else None,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
               params=model.num_params(), active_params=model.num_params(active=True))
    if profiles is not None:
        kind = "MoE" if cfg.is_moe else "dense"
        title = f"training step, {kind}, {mode}, batch {batch} x {seq}, 3 steps"
        profiles.append(profile_table(step, device, 3, title))
    del model, opt, run
    return out


def fmt_step_row(r):
    head = f"{r['config']:>20} {r['model']:>5} {r['mode']:>8}"
    if "error" in r:
        return f"{head}  -- {r['error']}"
    mfu = f"{100 * r['mfu']:5.1f}% MFU" if r["mfu"] is not None else "  n/a MFU"
    breaks = f"  {r['graphs']} graphs, {r['graph_breaks']} breaks" if "graphs" in r else ""
    mem = f"{r['peak_gib']:5.1f} GiB" if r["peak_gib"] is not None else ""
    routing = f"  routing skew {r['router_skew'] or 0:g}, balance {r['load_balance']:.2f}" if "load_balance" in r else ""
    return (f"{head} {r['ms']:8.2f} ms/step {r['tokens_per_s'] / 1e6:6.2f} Mtok/s {mfu} {mem}"
            f"  first step {r['first_step_s']} s{breaks}{routing}")


def overheads(steps):
    """Section 3: MoE/dense step time next to MoE/dense FLOPs per token, per config and mode."""
    out = []
    by = {(r["config"], r["model"], r["mode"]): r for r in steps if "error" not in r and not r.get("router_skew")}
    for (config, model, mode), moe in by.items():
        dense = by.get((config, "dense", mode))
        if model != "moe" or dense is None:
            continue
        time_ratio, flops_ratio = moe["ms"] / dense["ms"], moe["flops_per_token"] / dense["flops_per_token"]
        out.append(dict(config=config, mode=mode, time_ratio=time_ratio, flops_ratio=flops_ratio,
                        overhead=time_ratio / flops_ratio))
    return out


# -----------------------------------------------------------------------------
# 4. train.py's own step, as its loop calls it


def bench_loop(device, record, profiles, *, loop_data, loop_corpus_mb, cache_dir, use_compile, warmup, iters):
    """train.train_step, the function train.py's loop calls once a step (learning rate, a batch gathered from the
    corpus, forward and backward under train.py's autocast, clipping, fused AdamW), on random tokens and on batches
    of real text (--loop-data), each timed against the bare step of section 2 on the same compiled model and a fixed
    batch of the same input, in alternating rounds: machines and minutes differ by more than the few % sought here.
    In train.py's own mode (train.compile_mode: CUDA graphs on one GPU, else compiled when compiling, else eager),
    and where that is CUDA graphs, also in torch.compile's default mode, the one section 2 times. Against the bare
    step, what the loop adds; across the two inputs, what real text adds (its routing, for the MoE); across the
    modes, what the graphs save.
    --profile: a torch.profiler table of 10 steps on real text per model in train.py's mode; its device time per
    step against the row's ms/step is the share of the step the GPU computes (the rest it waits for the host)."""
    name, shape, batch, seq = STEP_CONFIGS[device.type][0]
    enc = data.get_tokenizer("byte")
    text, _, _ = data.load_data(loop_data, "byte", enc, cache_dir, loop_corpus_mb, seq)
    corpora = {"random tokens": torch.randint(0, 256, (1 << 22,), dtype=torch.int32, device=device)
               if device.type == "cuda" else torch.randint(0, 256, (1 << 16,), dtype=torch.int32).numpy(),
               f"text ({loop_data})": data.corpus_to_device(text, device)}
    # train.py's own mode, and where that is CUDA graphs, also the default compiled mode: what the graphs save
    modes = {"compiled" if use_compile else "eager": None}
    graphs = train.compile_mode(device, 1, 1) if use_compile else None  # (one piece a step, one process)
    if graphs:
        modes["graphs"] = graphs
    train_mode = "graphs" if graphs else next(iter(modes))
    for kind in ("dense", "moe"):
        cfg = step_config(kind, shape, seq)
        for (mode, compile_mode), (tokens_name, tokens) in itertools.product(modes.items(), corpora.items()):
            row = dict(config=name, model=kind, mode=mode, batch=batch, seq=seq, tokens=tokens_name,
                       train_mode=mode == train_mode)
            try:
                profiled = profiles is not None and tokens_name.startswith("text") and mode == train_mode
                prof = profiles if profiled else None
                row.update(bench_loop_step(cfg, batch, seq, mode, compile_mode, device, tokens, prof, warmup=warmup,
                                           iters=iters))
            except Exception as e:
                row["error"] = error_text(e)
            record("loop", row)
            print(fmt_loop_row(row), flush=True)


def bench_loop_step(cfg, batch, seq, mode, compile_mode, device, tokens, profiles=None, *, warmup, iters):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = du.Transformer(cfg).to(device)
    run = du.compile_model(model, mode=compile_mode) if mode != "eager" else model
    optimizer = train.make_optimizer(model, 3e-4, 0.1, device)
    scaler = torch.amp.GradScaler(device.type, enabled=gpus.amp_dtype(device) == torch.float16)
    settings = dict(model=dataclasses.asdict(cfg), lr=3e-4, steps=10**6, warmup=100, seed=0,
                    phase="moe" if cfg.is_moe else "dense", batch_size=batch, seq_len=seq, grad_accum=1, grad_clip=1.0)
    steps = iter(range(10**9))
    out = {}
    if cfg.is_moe:  # the routing of the batches this row trains on
        x, _ = data.get_batch(tokens, batch, seq, np.random.default_rng(0), device)
        out["load_balance"] = routing_balance(model, x)

    def step():
        train.train_step(model, run, optimizer, scaler, settings, next(steps), tokens, device, 1)

    fixed_x, fixed_y = data.get_batch(tokens, batch, seq, np.random.default_rng(1), device)
    params = list(model.parameters())

    def bare():  # section 2's step on a fixed batch, in train.py's precision
        train.begin_step(run)
        bare_step(run, params, optimizer, fixed_x, fixed_y, lambda: gpus.autocast(device))

    step()  # compiles
    sync(device)
    wall_steps = LOOP_WALL_TIMES_ITERS * iters
    rounds = [(timeit(step, device, warmup, iters), timeit(bare, device, warmup, iters),
               wall_ms(step, device, wall_steps), wall_ms(bare, device, wall_steps))
              for _ in range(LOOP_ROUNDS)]
    ms, bare_ms, wall, bare_wall = (statistics.median(times) for times in zip(*rounds))
    out.update(ms=ms, tokens_per_s=batch * seq / ms * 1e3, bare_ms=bare_ms, x_bare=ms / bare_ms,
               wall_ms=wall, bare_wall_ms=bare_wall, x_bare_wall=wall / bare_wall)
    if profiles is not None:
        kind = "MoE" if cfg.is_moe else "dense"
        title = f"train.train_step, {kind}, {mode}, real text, batch {batch} x {seq}, 10 steps ({ms:.2f} ms/step timed)"
        profiles.append(profile_table(step, device, 10, title))
    del model, run, optimizer
    return out


def fmt_loop_row(r):
    head = f"{r['config']:>20} {r['model']:>5} {r['mode']:>8} {r['tokens']:>28}"
    if "error" in r:
        return f"{head}  -- {r['error']}"
    balance = f"  routing balance {r['load_balance']:.2f}" if "load_balance" in r else ""
    return f"{head} {r['ms']:8.2f} ms/step {r['tokens_per_s'] / 1e6:6.2f} Mtok/s{balance}"


# -----------------------------------------------------------------------------
# Graph breaks, profiles, and the report


def explain_moe_layer(device):
    """torch._dynamo.explain on one MoE layer under autocast: graphs and graph breaks, with reasons."""
    moe = make_moe(64, 128, device, torch.float32)
    x = torch.randn(2, 64, 64, device=device, requires_grad=True)
    torch._dynamo.reset()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ex = torch._dynamo.explain(moe)(x)
    torch._dynamo.reset()
    return dict(graphs=ex.graph_count, graph_breaks=ex.graph_break_count,
                reasons=[str(r.reason)[:200] for r in ex.break_reasons][:5])


def profile_table(fn, device, n, title):
    """torch.profiler over n calls of fn: the top operators and kernels by device time (CPU time on CPU). A profiler
    that fails costs the table, not the measurement it was to explain."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            for _ in range(n):
                fn()
            sync(device)
    except Exception as e:
        return f"## {title}\n\n(profile failed: {error_text(e)})"
    table = prof.key_averages()
    # the device-time column's name changed across PyTorch versions; CPU time where there is no device
    sorts = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for sort in sorts:
        try:
            return f"## {title}\n\n" + table.table(sort_by=sort, row_limit=35)
        except Exception:
            continue
    return f"## {title}\n\n(no profile)"


def profile_layers(device):
    """Profiles of the paper-shape MoE layer (ours, eager) and its dense floor: where the MoE's time goes."""
    name, d, d_ff, tokens = LAYER_SHAPES[device.type][min(1, len(LAYER_SHAPES[device.type]) - 1)]
    n_tok = tokens[len(tokens) // 2]
    x = torch.randn(1, n_tok, d, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    texts = []
    for label, mod in (("MoE layer, ours, eager", make_moe(d, d_ff, device, torch.float32)),
                       ("dense SwiGLU (floor), eager", make_dense(d, d_ff, device, torch.float32))):
        params = list(mod.parameters())
        fn = lambda m=mod: run_fwd_bwd(lambda t: m(t)[0], params, x, dy, True)  # noqa: E731
        for _ in range(3):
            fn()
        texts.append(profile_table(fn, device, 5, f"{label}: {name}, {n_tok} tokens, fp32+autocast, 5 fwd+bwd"))
    return texts


def targets(results):
    """The speed targets, each MET or MISSED with the measured number."""
    lines = []
    layers = [r for r in results["layer"] if "error" not in r]
    for (shape, tok, weights, mode) in sorted({(r["shape"], r["tokens"], r["weights"], r["mode"]) for r in layers
                                               if r["impl"] == "ours grouped"}):
        ours = next(r for r in layers if (r["shape"], r["tokens"], r["weights"], r["mode"], r["impl"])
                    == (shape, tok, weights, mode, "ours grouped"))
        hf = [r for r in layers if r["impl"].startswith("HF") and (r["shape"], r["tokens"]) == (shape, tok)]
        best_hf = min(hf, key=lambda r: r["ms"]) if hf else None
        ok = ours["x_dense"] <= LAYER_VS_DENSE
        line = (f"layer {shape}, {tok} tokens, {weights}, {mode}: {ours['x_dense']:.2f}x dense "
                f"(target <= {LAYER_VS_DENSE}x) {'MET' if ok else 'MISSED'}")
        if best_hf is not None:
            line += (f"; vs fastest HF ({best_hf['impl']}, {best_hf['weights']}, {best_hf['ms']:.2f} ms): "
                     f"{best_hf['ms'] / ours['ms']:.2f}x faster {'MET' if ours['ms'] < best_hf['ms'] else 'MISSED'}")
        lines.append(line)
    steps = {(r["config"], r["model"], r["mode"]): r for r in results["step"]
             if "error" not in r and not r.get("router_skew")}  # the targets are for the even routing
    big = results["step"][-1]["config"] if results["step"] else None  # the largest config, measured last
    for mode in ("eager", "compiled"):
        for model, goal in (("dense", STEP_MFU_DENSE), ("moe", STEP_MFU_MOE)):
            r = steps.get((big, model, mode))
            if r and r["mfu"] is not None:
                lines.append(f"step MFU, {big}, {model}, {mode}: {100 * r['mfu']:.1f}% (target >= {100 * goal:.0f}%) "
                             f"{'MET' if r['mfu'] >= goal else 'MISSED'}")
    for o in results["overhead"]:
        lines.append(f"MoE overhead, {o['config']}, {o['mode']}: time ratio {o['time_ratio']:.2f} / FLOPs ratio "
                     f"{o['flops_ratio']:.2f} = {o['overhead']:.2f} (target <= {OVERHEAD}) "
                     f"{'MET' if o['overhead'] <= OVERHEAD else 'MISSED'}")
    for r in results["loop"]:  # the target is for train.py as it runs: rows in its mode
        if "error" not in r and r["tokens"].startswith("text") and r["train_mode"]:
            for how, ratio in (("device-timed", r["x_bare"]), ("wall clock", r["x_bare_wall"])):
                lines.append(f"train.py's step, {r['config']}, {r['model']}, {r['mode']}, real text, {how}: "
                             f"{ratio:.2f}x the bare step (target <= {LOOP_VS_BARE}) "
                             f"{'MET' if ratio <= LOOP_VS_BARE else 'MISSED'}")
    loops = {(r["model"], r["mode"], r["tokens"]): r for r in results["loop"] if "error" not in r}
    for (model, mode, tokens), r in loops.items():
        default = loops.get((model, "compiled", tokens))
        if mode == "graphs" and tokens.startswith("text") and default:  # train.py against section 2's compiled step
            ratio = r["wall_ms"] / default["bare_wall_ms"]
            lines.append(f"train.py's step, {r['config']}, {model}, graphs, real text, wall clock: {ratio:.2f}x the "
                         f"bare step (section 2's step) in torch.compile's default mode (target <= {LOOP_VS_BARE}) "
                         f"{'MET' if ratio <= LOOP_VS_BARE else 'MISSED'}")
    for r in steps.values():
        if "graph_breaks" in r:
            lines.append(f"torch.compile, {r['config']}, {r['model']}: {r['graphs']} graph(s), {r['graph_breaks']} "
                         f"graph break(s) {'MET' if r['graph_breaks'] == 0 else 'MISSED'}")
    return lines


def peak_text(peak_tflops):
    return f"{peak_tflops:g} TFLOP/s" if peak_tflops else "unknown (no MFU)"


def markdown(results):
    m = results["meta"]
    md = ["# bench.py results\n", f"- command: `{m['command']}`", f"- device: {m['device']}",
          f"- software: torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}",
          f"- date: {m['date']}", f"- dense peak used for MFU (autocast precision): {peak_text(m['peak_tflops'])}",
          f"- {results.get('hf_note', '')}", ""]
    md += ["## 1. One MoE layer, forward + backward (8 experts, top-2)\n",
           "Dense SwiGLU is top_k * d_ff wide: the same active FLOPs, the floor. `x dense` compares with the dense "
           "layer in the same weights and mode. `rel err`: worst of output and gradients against our reference "
           "loop; for HF, output and input gradient against our reference loop fed with HF's routing (their router "
           "runs in bf16 under autocast, ours in fp32, so near-ties may pick other experts).\n",
           "| shape | tokens | weights | implementation | mode | ms | TFLOP/s | x dense | rel err | peak MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["layer"]:
        if "error" in r:
            continue  # listed below the table
        err = f"{r['rel_err']:.1e}{'' if r['agrees'] else ' MISMATCH'}" if "rel_err" in r else "(truth)" \
            if r["impl"] == "ours reference" else ""
        mode = r["mode"] + (f" ({r['compile_s']} s)" if "compile_s" in r else "")
        pk = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else ""
        md.append(f"| {r['shape']} | {r['tokens']} | {r['weights']} | {r['impl']} | {mode} | {r['ms']:.2f} | "
                  f"{r['tflops']:.3g} | {r['x_dense']:.2f} | {err} | {pk} |")
    failed = [r for r in results["layer"] if "error" in r]
    if failed:
        md += ["\nNot run here:\n"] + [f"- {r['impl']}, {r['weights']} weights, {r['shape']}, {r['tokens']} tokens: "
                                         f"{r['error']}" for r in failed]
    mode = results["meta"]["args"].get("compile_mode") or "default"
    md += [f"\n## 2. Whole training step (forward, backward, clip, fused AdamW; fp32 weights, bf16 autocast; "
           f"torch.compile mode: {mode})\n",
           "MFU = flops_per_token (active parameters, attention included) x tokens/s / peak. First step: "
           "includes compilation when compiled.\n",
           "Routing: the MoE's router-logit skew (0: a fresh router, random tokens) and the load balance it gave "
           "(1: every expert of a layer equally used; naive Upcycling on real text: 0.36-0.46 per layer).\n",
           "| config | model | mode | ms/step | tokens/s | MFU | peak GiB | first step s | graphs / breaks | routing |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["step"]:
        if "error" in r:
            md.append(f"| {r['config']} | {r['model']} | {r['mode']} | {r['error']} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        gb = f"{r['graphs']} / {r['graph_breaks']}" if "graphs" in r else ""
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else ""
        routing = f"skew {r['router_skew'] or 0:g}, balance {r['load_balance']:.2f}" if "load_balance" in r else ""
        md.append(f"| {r['config']} | {r['model']} | {r['mode']} | {r['ms']:.2f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                  f"{mem} | {r['first_step_s']} | {gb} | {routing} |")
    md += ["\n## 3. MoE overhead: step-time ratio vs FLOPs ratio\n",
           "| config | mode | MoE/dense step time | MoE/dense FLOPs | overhead |", "|---|---|---|---|---|"]
    for o in results["overhead"]:
        md.append(f"| {o['config']} | {o['mode']} | {o['time_ratio']:.2f} | {o['flops_ratio']:.2f} | "
                  f"{o['overhead']:.2f} |")
    if results.get("loop"):
        md += ["\n## 4. train.py's step function (train.train_step, as its loop calls it)\n",
               "Learning rate, a batch from the corpus on the device, forward and backward under train.py's autocast, "
               f"clipping, fused AdamW. `bare ms`: section 2's step (no loop around it, one fixed batch of the same "
               f"input) on the same compiled model, timed in {LOOP_ROUNDS} rounds alternating with train.py's step "
               "(medians); `vs bare`: their ratio, above 1 what the loop costs. The wall columns: "
               f"{LOOP_WALL_TIMES_ITERS} x --iters steps in a row timed by the clock (the median of the rounds), as train.py's "
               "tokens/s are; where they exceed the device-timed ms, the GPU waited for the host. Mode `graphs`: "
               "torch.compile's reduce-overhead mode (CUDA graphs), train.py's on one GPU; `compiled`: the default "
               "mode, section 2's.\n",
               "| config | model | mode | batches | ms/step | tokens/s | bare ms | vs bare | wall ms/step | bare wall ms "
               "| vs bare, wall | routing balance |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["loop"]:
            if "error" in r:
                md.append(f"| {r['config']} | {r['model']} | {r['mode']} | {r['tokens']} | {r['error']} | | | | | | | |")
                continue
            balance = f"{r['load_balance']:.2f}" if "load_balance" in r else ""
            md.append(f"| {r['config']} | {r['model']} | {r['mode']} | {r['tokens']} | {r['ms']:.2f} | "
                      f"{r['tokens_per_s']:,.0f} | {r['bare_ms']:.2f} | {r['x_bare']:.2f} | {r['wall_ms']:.2f} | "
                      f"{r['bare_wall_ms']:.2f} | {r['x_bare_wall']:.2f} | {balance} |")
    if results.get("explain"):
        e = results["explain"]
        md += [f"\ntorch._dynamo.explain on one MoE layer: {e['graphs']} graph(s), {e['graph_breaks']} graph "
               f"break(s) {e['reasons'] or ''}"]
    md += ["\n## Targets\n"] + [f"- {line}" for line in results["targets"]]
    return "\n".join(md) + "\n"


SECTIONS = ("layer", "step", "loop")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def sections_list(text):
    """--sections: a comma list of SECTIONS."""
    sections = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        what = ", ".join(unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown section {what} (use {', '.join(SECTIONS)})")
    return sections


def main(argv=None):
    p = data.OneLineParser(prog="bench.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench", help="folder for bench.md, bench.json (and the profile)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--sections", type=sections_list, default="layer,step",
                   help="comma list of: " + ", ".join(SECTIONS))
    p.add_argument("--loop-data", default=None, help="the real text of the loop section (default: the corpus of "
                                                       "train.py's preset for the device, :python or :stdlib)")
    p.add_argument("--loop-corpus-mb", type=data.nonneg_float, default=None,
                   help="its size cap (default: the preset's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile rows (default: on for CUDA, off for CPU)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode of section 2's training steps (section 4 runs train.py's), e.g. "
                        "reduce-overhead (CUDA graphs: fewer kernel launches from the CPU); default: torch's default")
    p.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face rows")
    p.add_argument("--profile", action="store_true", help="also write torch.profiler tables to --out")
    p.add_argument("--layer-compile-tokens", type=data.positive_int, nargs="*", default=[32768, 65536],
                   help="token counts at which the layer is also compiled (each shape compiles anew)")
    p.add_argument("--warmup", type=data.nonneg_int, default=None, help="untimed calls first (default: 5 on CUDA, 1)")
    p.add_argument("--iters", type=data.positive_int, default=None, help="timed calls (default: 20 on CUDA, 3)")
    p.add_argument("--tol", type=data.positive_float, default=2e-2,
                   help="relative error that counts as agreeing (bf16)")
    p.add_argument("--peak-tflops", type=data.positive_float, default=None,
                   help="the GPU's dense peak in its autocast precision (bf16, else fp16), if the GPU is not known")
    p.add_argument("--router-skew", type=data.nonneg_float, nargs="+", default=[0.0], metavar="S",
                   help="MoE steps with each router-logit skew S (0: even routing; larger: more tokens to fewer "
                        "experts, as real text routes; each row gives the load balance it made)")
    args = p.parse_args(argv)
    device = gpus.resolve_device(args.device)
    args.device = str(device)  # as recorded in bench.json
    cuda = device.type == "cuda"
    preset = train.PRESETS["gpu" if cuda else "cpu"]
    args.loop_data = args.loop_data or preset["data"]
    if "loop" in args.sections:  # before the other sections' minutes, not after
        data.check_data_exists(args.loop_data, flag="--loop-data")
    args.loop_corpus_mb = preset["corpus_mb"] if args.loop_corpus_mb is None else args.loop_corpus_mb
    args.compile = cuda if args.compile is None else args.compile
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.iters = args.iters if args.iters is not None else (20 if cuda else 3)
    if not cuda:
        args.layer_compile_tokens = [t for shape in LAYER_SHAPES["cpu"] for t in shape[3]]
    os.makedirs(args.out, exist_ok=True)
    try:
        import transformers

        hf_version = transformers.__version__
    except Exception:
        hf_version = "absent"
    peak = peak_flops(device, args.peak_tflops)
    results = dict(meta=dict(command="python bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                             device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
                             transformers=hf_version, python=sys.version.split()[0],
                             date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                             peak_tflops=peak / 1e12 if peak else None, args=vars(args)),
                   layer=[], step=[], loop=[], overhead=[], targets=[])

    def record(kind, item):
        if kind in ("layer", "step", "loop"):
            results[kind].append(item)
        else:
            results[kind] = item
        save(results, args.out)  # after every row: a run cut short keeps what it measured

    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (norms, loss) as a training run has them
    meta = results["meta"]
    print(f"device: {meta['device']}, torch {torch.__version__}, dense peak {peak_text(meta['peak_tflops'])}")
    if "layer" in args.sections:
        bench_layers(device, record, use_hf=not args.no_hf, use_compile=args.compile,
                     compile_tokens=args.layer_compile_tokens, tol=args.tol, warmup=args.warmup, iters=args.iters)
    profiles = profile_layers(device) if args.profile else None  # None: no profiles taken
    if "step" in args.sections:
        bench_steps(device, record, profiles, use_compile=args.compile, compile_mode=args.compile_mode,
                    peak=peak, router_skews=args.router_skew, warmup=args.warmup, iters=args.iters)
        results["overhead"] = overheads(results["step"])
    if "loop" in args.sections:
        bench_loop(device, record, profiles, loop_data=args.loop_data, loop_corpus_mb=args.loop_corpus_mb,
                   cache_dir=args.out, use_compile=args.compile, warmup=args.warmup, iters=args.iters)
    if args.compile:
        try:
            record("explain", explain_moe_layer(device))
            print("torch._dynamo.explain, one MoE layer:", results["explain"])
        except Exception as e:
            record("explain", dict(graphs=None, graph_breaks=None, reasons=[f"explain failed: {e}"[:200]]))
    results["targets"] = targets(results)
    save(results, args.out)
    print("\n" + markdown(results))
    if args.profile:
        with open(os.path.join(args.out, "bench.profile.txt"), "w") as f:
            f.write("\n\n".join(profiles))
        print(f"profiles written to {os.path.join(args.out, 'bench.profile.txt')}")
    return results


def save(results, out_dir):
    data.atomic_write_text(os.path.join(out_dir, "bench.json"), json.dumps(results, indent=1, default=str))
    data.atomic_write_text(os.path.join(out_dir, "bench.md"), markdown(results))


if __name__ == "__main__":
    data.exit_on_one_line("bench.py", main)
