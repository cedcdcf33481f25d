"""Tests that check the paper's claims about the model and Drop-Upcycling, not just shapes.

Run: python -m pytest -q
"""

import csv
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import analyze
import bench
import train
from dropupcycle import (
    MoE,
    ModelConfig,
    Transformer,
    _grouped_mm,
    apply_rope,
    compile_model,
    drop_upcycle,
    flops_per_token,
    load_balancing_loss,
    rope_cos_sin,
    swiglu,
)

TINY = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64, max_seq_len=32)
TINY_MOE = replace(TINY, n_experts=4, top_k=2)


def trained_looking_dense(cfg=TINY, seed=0):
    """A dense model whose FFN weights are not N(0, 0.02) any more, like a trained one: distinct per-matrix
    means and scales, so that 'new values follow the dropped slice's statistics' is a real check."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            for j, lin in enumerate((block.ffn.gate, block.ffn.up, block.ffn.down)):
                lin.weight.mul_(1 + i + j).add_(0.01 * (j - 1))
    return model


def expert_weights(moe_model, layer, name):
    """Expert weights of one layer with the intermediate (neuron) axis first: [E, d_ff, d_model]."""
    w = getattr(moe_model.layers[layer].ffn, name)
    return w.transpose(1, 2) if name == "down" else w


def dense_weight(dense_model, layer, name):
    w = getattr(dense_model.layers[layer].ffn, name).weight
    return w.T if name == "down" else w


def reinitialised_neurons(moe_model, dense_model, layer, name, expert):
    """Indices of the neurons (rows with the neuron axis first) that differ from the dense model."""
    changed = (expert_weights(moe_model, layer, name)[expert] != dense_weight(dense_model, layer, name)).any(dim=1)
    return set(torch.nonzero(changed).flatten().tolist())


# -----------------------------------------------------------------------------
# Configuration


def test_default_config_is_a_valid_dense_model():
    cfg = ModelConfig()
    assert not cfg.is_moe
    logits, loss = Transformer(cfg)(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, cfg.vocab_size) and loss is None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_head=3), "n_head"),  # 3 does not divide d_model = 32
        (dict(n_kv_head=3), "n_kv_head"),  # 3 does not divide n_head = 4
        (dict(n_experts=4, top_k=5), "top_k"),
        (dict(n_experts=4, top_k=0), "top_k"),
        (dict(d_model=0), "d_model"),
        (dict(d_ff=-1), "d_ff"),
        (dict(n_head=32, n_kv_head=32), "even"),  # head_dim 1: RoPE rotates pairs
    ],
)
def test_invalid_config_raises_a_value_error_saying_what_is_wrong(change, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **change)


def test_dense_config_ignores_top_k():
    replace(TINY, n_experts=1, top_k=2)  # top_k > n_experts is fine when there is no MoE layer


def test_init_is_normal_0_02_and_norms_start_at_one():
    model = Transformer(replace(TINY, d_model=128, d_ff=512))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        else:
            assert abs(p.mean().item()) < 0.002 and abs(p.std().item() - 0.02) < 0.002, name
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.embed.weight.data_ptr() != model.lm_head.weight.data_ptr()  # untied


# -----------------------------------------------------------------------------
# The Llama backbone


@pytest.mark.parametrize("cfg", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_causality_future_tokens_never_change_earlier_logits(cfg):
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % cfg.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 16
    cos, sin = rope_cos_sin(head_dim, 64, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m, n):  # query at position m, key at position n
        return apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])

    assert torch.allclose(score(5, 2), score(40, 37), atol=1e-5)
    assert torch.allclose(score(9, 9), q @ k, atol=1e-5)  # same position: no rotation left
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_grouped_query_attention_shares_each_kv_head_with_its_query_group():
    """The attention layer equals the textbook formula with each KV head repeated n_head / n_kv_head times."""
    torch.manual_seed(0)
    model = Transformer(TINY)
    attn, (B, T) = model.layers[0].attn, (2, 12)
    x = torch.randn(B, T, TINY.d_model)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    hd, group = TINY.head_dim, TINY.n_head // TINY.n_kv_head
    q = apply_rope(attn.q(x).view(B, T, TINY.n_head, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k(x).view(B, T, TINY.n_kv_head, hd).transpose(1, 2), cos, sin)
    v = attn.v(x).view(B, T, TINY.n_kv_head, hd).transpose(1, 2)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    expected = attn.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))
    assert torch.allclose(attn(x, cos, sin), expected, atol=1e-5)
    assert attn.k.weight.shape[0] == TINY.n_kv_head * hd  # fewer KV parameters than query parameters


# -----------------------------------------------------------------------------
# The MoE layer (Eq. 2-3) and the balancing loss


def random_moe_layer(cfg=TINY_MOE, seed=0, std=0.2):
    torch.manual_seed(seed)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=std)
    return layer


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_token_reaches_exactly_top_k_experts_with_gate_weights_summing_to_one(top_k):
    layer = random_moe_layer(replace(TINY_MOE, top_k=top_k))
    x = torch.randn(100, TINY.d_model)
    logits, experts, weights = layer.route(x)
    assert experts.shape == (100, top_k) and weights.shape == (100, top_k)
    assert all(len(set(row)) == top_k for row in experts.tolist())
    assert torch.allclose(weights.sum(-1), torch.ones(100))
    # Eq. 3 equals Mixtral's softmax over all experts -> top-k -> renormalise
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    assert torch.equal(experts, top_i)
    assert torch.allclose(weights, top_p / top_p.sum(-1, keepdim=True), atol=1e-6)


def test_moe_layer_computes_eq2_token_by_token():
    layer = random_moe_layer()
    x = torch.randn(2, 5, TINY.d_model)
    y, logits = layer(x)
    assert y.shape == x.shape and logits.shape == (10, TINY_MOE.n_experts)
    flat = x.reshape(10, -1)
    _, experts, weights = layer.route(flat)
    for t in range(10):  # y = sum over the chosen experts i of g(x)_i * SwiGLU_i(x)
        expected = sum(
            weights[t, s] * swiglu(flat[t], layer.gate[i], layer.up[i], layer.down[i])
            for s, i in enumerate(experts[t].tolist())
        )
        assert torch.allclose(y.reshape(10, -1)[t], expected, atol=1e-5)


def grouped_mm_works(device):
    if _grouped_mm is None:
        return False
    try:
        a = torch.randn(8, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(2, 16, 16, device=device, dtype=torch.bfloat16)
        out = _grouped_mm(a, b, offs=torch.tensor([3, 8], dtype=torch.int32, device=device))
        out.backward(torch.randn_like(out))
        return True
    except (RuntimeError, NotImplementedError):
        return False


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not grouped_mm_works("cpu"), reason="no CPU grouped GEMM")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()  # 0 when both are 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_gemm_path_matches_reference_path_in_outputs_and_gradients(device, top_k):
    """The fast path (sort by expert + grouped GEMM in bf16) computes the same Eq. 2 as the readable loop."""
    cfg = replace(TINY_MOE, d_model=64, d_ff=128, n_experts=8, top_k=top_k)
    layer = random_moe_layer(cfg, std=0.1).to(device)
    x = torch.randn(300, cfg.d_model, device=device, requires_grad=True)
    grad_out = torch.randn(300, cfg.d_model, device=device)
    never_expert_7 = torch.zeros(cfg.n_experts, device=device)
    never_expert_7[7] = -1e4  # an expert without tokens: an empty group must work too
    results = []
    for path in (layer.experts_reference, layer.experts_grouped):
        layer.zero_grad()
        x.grad = None
        top_logits, experts = (layer.router(x) + never_expert_7).topk(top_k, dim=-1)
        y = path(x, experts, F.softmax(top_logits, dim=-1))
        (y * grad_out).sum().backward()
        grads = [x.grad, layer.gate.grad, layer.up.grad, layer.down.grad, layer.router.weight.grad]
        results.append([y.detach()] + [g.clone() for g in grads])
    names = ["output", "d_x", "d_gate", "d_up", "d_down", "d_router"]
    for name, fast, ref in zip(names, results[1], results[0]):
        assert relative_error(fast, ref) < 2e-2, name  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert torch.all(results[1][2][7] == 0)  # the unused expert gets no gradient


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_uses_the_grouped_path_on_cuda_and_trains_under_autocast():
    layer = random_moe_layer(replace(TINY_MOE, d_model=64, d_ff=128, n_experts=8), std=0.1).cuda()
    x = torch.randn(4, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = layer(x)
    _, experts, weights = layer.route(x.view(-1, 64))
    assert relative_error(y.view(-1, 64), layer.experts_reference(x.view(-1, 64), experts, weights)) < 2e-2
    y.float().sum().backward()
    assert layer.gate.grad is not None and layer.router.weight.grad is not None


def test_compile_model_tiles_only_moe_models_in_1d(monkeypatch):
    compile_model(random_moe_layer(), mode="reduce-overhead")  # a mode and options at once would raise
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.setdefault(type(module).__name__, kw))
    compile_model(Transformer(replace(TINY_MOE, n_experts=1)), mode="reduce-overhead")
    compile_model(random_moe_layer(), mode="reduce-overhead")
    assert seen["Transformer"] == {"mode": "reduce-overhead"}  # dense: left as asked
    assert seen["MoE"] == {"mode": None, "options": {"triton.cudagraphs": True, "triton.max_tiles": 1}}
    seen.clear()
    compile_model(Transformer(TINY_MOE))  # MoE layers inside a model count too
    assert seen["Transformer"] == {"mode": None, "options": {"triton.max_tiles": 1}}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_moe_model_gives_every_token_the_output_of_eager_mode():
    # With inductor's default 2-D tiles, a few % of the tokens came out 5-90% wrong from the second MoE layer of
    # a graph on, in every compile of this shape tried (PyTorch 2.11, H100): compile_model tiles in 1-D. Naive
    # Upcycling (r = 0) makes every expert the same FFN, so routing near-ties cannot change any token's output.
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=256, n_layer=3, n_head=4, n_kv_head=4, d_ff=1024, max_seq_len=512)
    moe = drop_upcycle(Transformer(cfg).cuda(), r=0.0)
    x = torch.randint(0, 256, (64, 512), device="cuda")
    torch._dynamo.reset()
    compiled = compile_model(moe)

    def check(eager, fast):
        eager, fast = eager.detach().float().flatten(0, 1), fast.detach().float().flatten(0, 1)
        per_token = (fast - eager).norm(dim=-1) / eager.norm(dim=-1)
        assert per_token.max() < 0.05, f"{int((per_token > 0.05).sum())} tokens off by more than 5%"

    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            for _ in range(2):  # the wrong tokens were different ones in every call
                check(moe(x)[0], compiled(x)[0])
        check(moe(x)[0], compiled(x)[0])  # the training graph's forward, which train.py runs


def test_cpu_forward_uses_the_reference_path(monkeypatch):
    layer = random_moe_layer()
    monkeypatch.setattr(layer, "experts_grouped", None)  # would fail if called
    layer(torch.randn(1, 4, TINY.d_model))


def test_balancing_loss_is_top_k_for_perfectly_balanced_routing():
    n_experts, top_k, n_tokens = 8, 2, 800
    # token t prefers experts t % 8 and (t + 1) % 8: every expert gets the same share of both slots,
    # and by symmetry every expert has the same mean probability
    logits = torch.zeros(n_tokens, n_experts)
    t = torch.arange(n_tokens)
    logits[t, t % n_experts] = 3.0
    logits[t, (t + 1) % n_experts] = 2.0
    assert load_balancing_loss(logits, top_k).item() == pytest.approx(top_k, rel=1e-5)
    assert load_balancing_loss(logits, 1).item() == pytest.approx(1, rel=1e-5)


def test_balancing_loss_of_hand_computed_routing():
    """aux = E * sum_i f_i P_i on logits whose softmax is known exactly (logits = log p)."""
    # top-2 of 4 experts, 3 tokens; chosen: {0, 1}, {3, 2}, {0, 2}
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.3, 0.1]])
    # f = (2, 1, 2, 1) / 3 (both slots counted), P = (1/3, 0.2, 0.8/3, 0.2): aux = 4 * 8/15 = 32/15
    assert load_balancing_loss(p.log(), 2).item() == pytest.approx(32 / 15, rel=1e-6)
    # top-1 of 2 experts: three tokens at p = (0.6, 0.4) pick expert 0, one at p = (0, 1) picks expert 1;
    # f = (0.75, 0.25), P = (0.45, 0.55): aux = 2 * 0.475 = 0.95. The loss is not bounded below by 1
    # (nor by top_k); perfect balance gives top_k, but unbalanced routing can give less.
    p = torch.tensor([[0.6, 0.4]] * 3 + [[0.0, 1.0]])
    assert load_balancing_loss(p.log(), 1).item() == pytest.approx(0.95, rel=1e-6)
    # upper bound E: f_i <= 1 (an expert is in a token's top-k at most once) and sum_i P_i = 1; reached when
    # every token puts all its probability on one expert
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5)
    assert load_balancing_loss(p.log(), 2).item() == pytest.approx(4.0, rel=1e-6)


def test_balancing_loss_grows_as_routing_concentrates():
    n_experts, top_k = 8, 2
    logits = torch.randn(1000, n_experts) * 0.01  # near uniform
    losses = []
    for strength in [0.0, 1.0, 3.0, 10.0]:
        concentrated = logits.clone()
        concentrated[:, :2] += strength  # experts 0 and 1 take more and more of the tokens
        losses.append(load_balancing_loss(concentrated, top_k).item())
    assert losses[0] == pytest.approx(top_k, rel=0.02)
    assert all(a < b for a, b in zip(losses, losses[1:]))
    assert losses[-1] == pytest.approx(n_experts, rel=0.01)  # all tokens to 0 and 1, half the probability each


def test_moe_loss_is_cross_entropy_plus_weighted_balancing_loss():
    torch.manual_seed(0)
    model = Transformer(TINY_MOE)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    logits, loss = model(idx, idx)
    ce = F.cross_entropy(logits.view(-1, TINY.vocab_size), idx.view(-1))
    assert model.aux_loss is not None and model.aux_loss.item() > 0
    assert loss.item() == pytest.approx(ce.item() + 0.02 * model.aux_loss.item(), rel=1e-6)
    dense = Transformer(TINY)
    logits, loss = dense(idx, idx)
    assert dense.aux_loss is None
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, TINY.vocab_size), idx.view(-1)).item())


def test_the_balancing_loss_pools_router_logits_of_all_layers():
    torch.manual_seed(0)
    model = Transformer(TINY_MOE)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    captured = []
    hooks = [block.ffn.register_forward_hook(lambda m, i, o: captured.append(o[1])) for block in model.layers]
    model(idx, idx)
    for h in hooks:
        h.remove()
    assert len(captured) == TINY.n_layer
    assert model.aux_loss.item() == pytest.approx(load_balancing_loss(torch.cat(captured), 2).item(), rel=1e-6)


# -----------------------------------------------------------------------------
# Drop-Upcycling (Sec. 3)


@pytest.mark.parametrize("top_k", [1, 2])
def test_r0_naive_upcycling_reproduces_the_dense_model(top_k):
    dense = trained_looking_dense().eval()
    moe = drop_upcycle(dense, n_experts=4, top_k=top_k, r=0.0).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    assert torch.allclose(moe(idx)[0], dense(idx)[0], atol=1e-5, rtol=1e-5)


def test_expert_replication_copies_every_non_ffn_weight_and_inits_the_router_uniformly():
    dense = trained_looking_dense()
    moe = drop_upcycle(dense, n_experts=8, r=0.5)
    dense_state, moe_state = dense.state_dict(), moe.state_dict()
    for name, value in dense_state.items():
        if ".ffn." not in name:
            assert torch.equal(moe_state[name], value), name
    routers = torch.cat([block.ffn.router.weight.flatten() for block in moe.layers])
    bound = 0.02 * math.sqrt(3)  # = 0.0346
    assert routers.abs().max() <= bound and routers.min() < -0.9 * bound and routers.max() > 0.9 * bound
    assert routers.std().item() == pytest.approx(0.02, rel=0.05)  # Appendix C.1: U(-0.0346, 0.0346)


def test_the_dense_model_is_not_modified():
    dense = trained_looking_dense()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    drop_upcycle(dense, r=1.0)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


@pytest.mark.parametrize("r", [0.1, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("shared_indices", [True, False])
def test_exactly_floor_r_d_ff_neurons_are_reinitialised_per_expert_and_matrix(r, shared_indices):
    dense = trained_looking_dense()
    moe = drop_upcycle(dense, n_experts=4, r=r, shared_indices=shared_indices)
    n_drop = math.floor(r * TINY.d_ff)
    for layer in range(TINY.n_layer):
        for expert in range(4):
            sets = {}
            for name in ("gate", "up", "down"):
                S = reinitialised_neurons(moe, dense, layer, name, expert)
                assert len(S) == n_drop, (layer, expert, name)
                # every element of a dropped neuron is new; every other weight is bit-identical
                new = expert_weights(moe, layer, name)[expert]
                old = dense_weight(dense, layer, name)
                keep = sorted(set(range(TINY.d_ff)) - S)
                assert torch.equal(new[keep], old[keep])
                assert torch.all(new[sorted(S)] != old[sorted(S)])
                sets[name] = S
            if shared_indices:  # Sec. 3.2.1: one S for gate rows, up rows and down columns
                assert sets["gate"] == sets["up"] == sets["down"]
            else:  # the released code: an independent S per matrix, so every pair of matrices differs
                assert sets["gate"] != sets["up"], (layer, expert)
                assert sets["gate"] != sets["down"], (layer, expert)
                assert sets["up"] != sets["down"], (layer, expert)


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_r0_keeps_and_r1_replaces_the_whole_ffn(r):
    dense = trained_looking_dense()
    moe = drop_upcycle(dense, n_experts=4, r=r)
    for name in ("gate", "up", "down"):
        n = len(reinitialised_neurons(moe, dense, 0, name, expert=2))
        assert n == (0 if r == 0 else TINY.d_ff)


def test_new_values_follow_the_mean_and_std_of_the_dropped_slice_only():
    """Step 2 draws every new value of a matrix from N(mean, std^2), two scalars of the dropped neurons S (the
    slice W[S]): not from the whole matrix's statistics, nor from each dropped neuron's own. The dense neurons
    here have very different means (-1 .. 1) and small, different scales (0.01 .. 0.1), plus one outlier
    neuron (mean 10, std 3): the slice's std is then set by the spread of the neuron means, so per-neuron
    statistics would give new neurons that keep their old mean and a 5-50x smaller std; and the whole
    matrix's std (outlier included) is far wider than that of a slice without the outlier."""
    cfg = replace(TINY, d_model=128, d_ff=64)
    dense = trained_looking_dense(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in range(cfg.n_layer):
            for k, name in enumerate(("gate", "up", "down")):
                w = dense_weight(dense, layer, name)  # [d_ff, d_model] view, neuron j = row j
                means = 0.1 * (k - 1) + torch.linspace(-1, 1, cfg.d_ff)[torch.randperm(cfg.d_ff, generator=gen)]
                scales = torch.linspace(0.01, 0.1, cfg.d_ff)[torch.randperm(cfg.d_ff, generator=gen)]
                means[0], scales[0] = 10.0, 3.0  # the outlier neuron
                w.copy_(means[:, None] + scales[:, None] * torch.randn(w.shape, generator=gen))
    moe = drop_upcycle(dense, n_experts=8, r=0.25)
    with_outlier = 0
    for layer in range(cfg.n_layer):
        for expert in range(8):
            for name in ("gate", "up", "down"):
                where = (layer, expert, name)
                S = sorted(reinitialised_neurons(moe, dense, layer, name, expert))
                with_outlier += 0 in S
                new = expert_weights(moe, layer, name)[expert][S]  # [n_drop, d_model]
                old = dense_weight(dense, layer, name)[S]
                mean, std = old.mean().item(), old.std().item()  # the two scalars of step 2
                # the slice as a whole
                assert abs(new.mean().item() - mean) < 5 * std / math.sqrt(old.numel()), where
                assert new.std().item() == pytest.approx(std, rel=0.1), where
                # every new neuron on its own follows the same two scalars, whatever its old mean and scale
                row_se = std / math.sqrt(cfg.d_model)
                assert (new.mean(dim=1) - mean).abs().max().item() < 5 * row_se, where
                assert torch.allclose(new.std(dim=1), torch.full((len(S),), std), rtol=0.3), where
    assert 0 < with_outlier < 3 * cfg.n_layer * 8  # both kinds of S occurred


def test_experts_differ_from_one_another_and_across_layers():
    moe = drop_upcycle(trained_looking_dense(), n_experts=4, r=0.5)
    sets = [reinitialised_neurons(moe, trained_looking_dense(), layer, "gate", e) for layer in range(2) for e in range(4)]
    assert len({frozenset(s) for s in sets}) == len(sets)  # 8 different index sets
    gates = moe.layers[0].ffn.gate
    assert not any(torch.equal(gates[a], gates[b]) for a in range(4) for b in range(a + 1, 4))


@pytest.mark.parametrize("r", [0.25, 0.5, 0.75])
def test_two_experts_share_about_one_minus_r_squared_of_the_dense_neurons(r):
    """Sec. 3.2.2: each expert keeps a fraction (1 - r) of the neurons, so two experts share about (1 - r)^2."""
    cfg = replace(TINY, d_ff=512)
    dense = trained_looking_dense(cfg)
    moe = drop_upcycle(dense, n_experts=8, r=r)
    shares = []
    for layer in range(cfg.n_layer):
        kept = [set(range(cfg.d_ff)) - reinitialised_neurons(moe, dense, layer, "gate", e) for e in range(8)]
        shares += [len(kept[a] & kept[b]) / cfg.d_ff for a in range(8) for b in range(a + 1, 8)]
    assert sum(shares) / len(shares) == pytest.approx((1 - r) ** 2, abs=0.02)


def test_same_seed_same_model_different_seed_different_experts():
    dense = trained_looking_dense()
    a, b = drop_upcycle(dense, r=0.5, seed=3), drop_upcycle(dense, r=0.5, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = drop_upcycle(dense, r=0.5, seed=4)
    assert not torch.equal(a.layers[0].ffn.gate, c.layers[0].ffn.gate)
    assert not torch.equal(a.layers[0].ffn.router.weight, c.layers[0].ffn.router.weight)


def test_runs_that_differ_only_in_r_start_from_the_same_router():
    dense = trained_looking_dense()
    routers = [drop_upcycle(dense, r=r, seed=0).layers[1].ffn.router.weight for r in (0.0, 0.5, 1.0)]
    assert torch.equal(routers[0], routers[1]) and torch.equal(routers[0], routers[2])


@pytest.mark.parametrize("r", [-0.1, 1.5, float("nan")])
def test_r_outside_0_1_is_a_value_error(r):
    with pytest.raises(ValueError, match="r must be in"):
        drop_upcycle(trained_looking_dense(), r=r)


def test_upcycled_model_trains():
    """Continued training (Sec. 3, step 3): gradients reach the router and every expert of an r = 0.5 model."""
    moe = drop_upcycle(trained_looking_dense(), n_experts=4, r=0.5)
    idx = torch.randint(0, TINY.vocab_size, (4, 32))
    _, loss = moe(idx, idx)
    loss.backward()
    ffn = moe.layers[0].ffn
    assert ffn.router.weight.grad.abs().sum() > 0
    assert all(ffn.gate.grad[i].abs().sum() > 0 for i in range(4))


# -----------------------------------------------------------------------------
# Accounting: the paper's Table 4 (parameters) and Table 2 (FLOPs)


def table4_config(layers, d_model, d_ff, heads, kv_heads, vocab, n_experts=1):
    return ModelConfig(
        vocab_size=vocab, d_model=d_model, n_layer=layers, n_head=heads, n_kv_head=kv_heads, d_ff=d_ff,
        max_seq_len=4096, n_experts=n_experts, top_k=2,
    )


DENSE_152M = table4_config(12, 512, 2048, 8, 8, 99_574)
DENSE_1_5B = table4_config(24, 2048, 7168, 16, 8, 48_586)
DENSE_3_7B = table4_config(28, 3072, 8192, 24, 24, 99_574)
DENSE_13B = table4_config(40, 5120, 13824, 40, 40, 99_574)
MOE = lambda cfg: replace(cfg, n_experts=8)  # noqa: E731


def printed_as(value, printed):
    """True if value, rounded or truncated at the last digit printed in e.g. '1.5B' or '417M', gives it."""
    unit = {"M": 1e6, "B": 1e9}[printed[-1]]
    digits = printed[:-1]
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    scaled = value / unit * 10**decimals
    target = round(float(digits) * 10**decimals)
    return target in (round(scaled), math.floor(scaled))


@pytest.mark.parametrize(
    "cfg, active, total",
    [
        (DENSE_152M, "152M", "152M"),
        (DENSE_1_5B, "1.5B", "1.5B"),
        (DENSE_3_7B, "3.7B", "3.7B"),
        (DENSE_13B, "13B", "13B"),
        (MOE(DENSE_152M), "190M", "417M"),
        (MOE(DENSE_1_5B), "2.6B", "8.9B"),
        (MOE(DENSE_3_7B), "5.9B", "18B"),
    ],
)
def test_parameter_counts_match_table4(cfg, active, total):
    with torch.device("meta"):  # no memory: only shapes
        model = Transformer(cfg)
    assert printed_as(model.num_params(), total), model.num_params()
    assert printed_as(model.num_params(active=True), active), model.num_params(active=True)


def test_printed_as_rejects_wrong_numbers():
    assert printed_as(1.558e9, "1.5B") and printed_as(5.897e9, "5.9B")
    assert not printed_as(1.65e9, "1.5B") and not printed_as(151.4e6, "152M") and not printed_as(19.2e9, "18B")


@pytest.mark.parametrize(
    "cfg, tokens, flops",
    [
        (DENSE_3_7B, 1000e9, 2.70e22),
        (MOE(DENSE_3_7B), 500e9, 1.98e22),
        (DENSE_13B, 805e9, 7.43e22),
        (DENSE_3_7B, 2072e9, 5.58e22),
    ],
)
def test_training_flops_match_table2(cfg, tokens, flops):
    assert tokens * flops_per_token(cfg, seq_len=4096) == pytest.approx(flops, rel=0.005)


def test_moe_flops_count_only_the_top_k_active_experts():
    dense, moe = DENSE_152M, MOE(DENSE_152M)
    ffn = 3 * 6 * dense.d_model * dense.d_ff * dense.n_layer  # 6 d_h d_f per layer, times 3 for training
    assert flops_per_token(moe, 4096) - flops_per_token(dense, 4096) == pytest.approx(ffn)  # 2 experts - 1 FFN
    assert flops_per_token(replace(moe, n_experts=64), 4096) == flops_per_token(moe, 4096)


# -----------------------------------------------------------------------------
# bench.py: a CPU smoke test (tiny shapes). It checks that the benchmark runs end to end and writes its report,
# not how fast anything is: speed is measured on the GPU, figures/bench.md.
def test_bench_runs_on_cpu_and_writes_markdown_and_json(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a machine without transformers: rows left out
    results = bench.main(["--device", "cpu", "--out", str(tmp_path), "--warmup", "0", "--iters", "1"])

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["device"] == "cpu" and saved["layer"] and saved["step"]
    assert "transformers not importable" in saved["hf_note"]
    md = (tmp_path / "bench.md").read_text()
    for heading in ("## 1. One MoE layer", "## 2. Whole training step", "## 3. MoE overhead", "## Targets"):
        assert heading in md

    # section 1: the MoE layer, our two paths and the dense floor, timed; ours agrees with the reference loop
    layer = {r["impl"]: r for r in results["layer"] if r["weights"] == "fp32+autocast"}
    assert {"dense SwiGLU (floor)", "ours reference"} <= set(layer)
    ours = next(r for name, r in layer.items() if name.startswith("ours forward"))
    assert "error" not in ours and ours["agrees"] and ours["ms"] > 0
    assert layer["dense SwiGLU (floor)"]["x_dense"] == 1.0

    # section 2 and 3: a dense and an MoE training step, and their time ratio next to their FLOPs ratio
    steps = {r["model"]: r for r in results["step"]}
    assert set(steps) == {"dense", "moe"} and all("error" not in r and r["tokens_per_s"] > 0 for r in steps.values())
    assert steps["moe"]["active_params"] < steps["moe"]["params"]
    (overhead,) = results["overhead"]
    assert overhead["flops_ratio"] > 1 and overhead["overhead"] > 0


def test_bench_reports_a_failing_implementation_instead_of_crashing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(bench.du.MoE, "experts_reference", broken)  # every MoE path on the CPU goes through it
    results = bench.main(["--device", "cpu", "--out", str(tmp_path), "--warmup", "0", "--iters", "1",
                          "--no-hf", "--sections", "step"])
    moe = next(r for r in results["step"] if r["model"] == "moe")
    assert "no kernel for this" in moe["error"]
    assert "| moe |" in (tmp_path / "bench.md").read_text()


# -----------------------------------------------------------------------------
# analyze.py: the paper's analyses (Sec. 5.3 r sweep, Sec. 5.4 routing) and the classroom exercises.
# Routing statistics with known routing in and known numbers out, the commands end to end on a tiny corpus.
HERE = os.path.dirname(os.path.abspath(__file__))

# A model and schedule small enough that a whole sweep (dense + 8 MoE runs) takes seconds on one CPU core
TINY_CLI = ["--d-model", "32", "--n-layer", "2", "--n-head", "2", "--n-kv-head", "2", "--d-ff", "64", "--n-experts", "4",
        "--seq-len", "32", "--batch-size", "4", "--dense-steps", "4", "--moe-steps", "4", "--eval-interval", "2",
        "--eval-batches", "1", "--log-interval", "2", "--dense-warmup", "1", "--moe-warmup", "1"]


def make_corpus(root):
    """Two domains, one folder each, of made-up Python-ish and C-ish text, with at least one held-out
    (validation) file per domain: file names are picked by train.py's own split rule."""
    rng = random.Random(0)
    vocab = {"python": (".py", "def return self import lambda for in yield".split()),
             "c": (".c", "int void struct return { } ; #include".split())}
    for domain, (ext, words) in vocab.items():
        os.makedirs(os.path.join(root, domain))
        n_val, i = 0, 0
        while i < 12 or n_val == 0:
            key = f"data/{domain}/f{i}{ext}"
            is_val = train.stable_hash("val:" + key) % 10_000 < train.VAL_FRACTION * 10_000
            if i < 12 or is_val:
                n_val += is_val
                with open(os.path.join(root, domain, f"f{i}{ext}"), "w") as f:
                    f.write(" ".join(rng.choice(words) for _ in range(300)) + "\n")
            i += 1
    return str(root)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, corpus):
    """One tiny sweep (dense, naive, five r, r = 0.5 independent, scratch) and its routing analysis."""
    out = str(tmp_path_factory.mktemp("sweep"))
    flags = ["--preset", "cpu", "--out-dir", out, "--data", corpus, *TINY_CLI]
    analyze.main(["sweep", *flags])
    analyze.main(["routing", *flags])
    return out, flags


# -----------------------------------------------------------------------------
# Routing statistics: known routing in, known numbers out


def test_count_assignments_counts_every_top_k_slot():
    experts = torch.tensor([[0, 1], [0, 2], [3, 0]])  # 3 tokens, top-2
    assert analyze.count_assignments(experts, 5).tolist() == [3, 1, 1, 1, 0]


def test_load_balance_is_one_for_uniform_and_zero_for_one_expert():
    assert analyze.load_balance(np.ones(8)) == pytest.approx(1.0)
    assert analyze.load_balance([5, 0, 0, 0, 0, 0, 0, 0]) == pytest.approx(0.0)
    # all on two of eight experts (what the paper saw for naive Upcycling): log 2 / log 8 = 1/3
    assert analyze.load_balance([1, 1, 0, 0, 0, 0, 0, 0]) == pytest.approx(1 / 3)
    # unnormalised counts give the same as the distribution
    assert analyze.load_balance([30, 10]) == pytest.approx(analyze.load_balance([0.75, 0.25]))


def test_js_divergence_known_values():
    assert analyze.js_divergence([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7]]) == pytest.approx(0.0, abs=1e-12)
    assert analyze.js_divergence([[1, 0], [0, 1]]) == pytest.approx(math.log(2))  # disjoint experts
    assert analyze.js_divergence(np.eye(3)) == pytest.approx(math.log(3))  # three domains, disjoint
    # against the textbook form 0.5 KL(P||M) + 0.5 KL(Q||M)
    P, Q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    M = (P + Q) / 2
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)
    assert analyze.js_divergence([P, Q]) == pytest.approx(0.5 * kl(P, M) + 0.5 * kl(Q, M))
    assert 0.2157 < analyze.js_divergence([P, Q]) < 0.2159


def test_routing_stats_of_known_counts():
    # python tokens all to experts 0-1, C tokens all to experts 2-3: perfectly balanced overall, fully specialised
    s = analyze.routing_stats([[5, 5, 0, 0], [0, 0, 5, 5]])
    assert s["balance"] == pytest.approx(1.0) and s["js"] == pytest.approx(math.log(2))
    np.testing.assert_allclose(s["dists"][0], [0.5, 0.5, 0, 0])
    # both domains on the same two experts: routed alike, and badly balanced
    s = analyze.routing_stats([[5, 5, 0, 0], [4, 6, 0, 0]])
    assert s["balance"] == pytest.approx(0.5, abs=0.01) and s["js"] < 0.01


def test_route_counts_match_the_models_own_routing():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, n_kv_head=2, d_ff=32, max_seq_len=16,
                      n_experts=4, top_k=2)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 64, (40,)).tolist()  # 2 windows of 16; the last 8 tokens do not fill a window
    counts = analyze.route_counts(model, tokens, 16, 1, torch.device("cpu"))
    # independently: the inputs of each MoE layer, routed by MoE.route
    expected = torch.zeros(2, 4, dtype=torch.long)
    inputs = []
    hooks = [b.ffn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in model.layers]
    with torch.no_grad():
        model(torch.tensor(tokens[:32]).view(2, 16))
        for layer, (block, x) in enumerate(zip(model.layers, inputs)):
            _, experts, _ = block.ffn.route(x.reshape(-1, 32))
            expected[layer] = torch.bincount(experts.flatten(), minlength=4)
    for h in hooks:
        h.remove()
    assert counts.tolist() == expected.tolist()
    assert counts.sum(dim=1).tolist() == [32 * 2, 32 * 2]  # every token counted in both of its slots


# -----------------------------------------------------------------------------
# Step-0 measurements: router gradient and neuron overlap


def test_router_gets_no_lm_gradient_at_r0_and_never_with_top1():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, n_kv_head=2, d_ff=64, max_seq_len=16)
    dense = Transformer(cfg)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    naive = analyze.router_grad_norms(dense, 0.0, 4, 2, 0.02, x, y)
    drop = analyze.router_grad_norms(dense, 0.5, 4, 2, 0.02, x, y)
    assert naive["lm_router"] < 1e-6 * drop["lm_router"]  # identical experts: the gates do not matter
    assert naive["aux_router"] > 0 and naive["lm_experts"] > 0  # the balancing loss still moves the router
    top1 = analyze.router_grad_norms(dense, 0.5, 4, 1, 0.02, x, y)
    assert top1["lm_router"] == 0.0 and top1["aux_router"] > 0  # a top-1 gate is always exactly 1


def test_overlap_follows_one_minus_r_squared_and_index_sets():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layer=2, n_head=2, n_kv_head=2, d_ff=256, max_seq_len=16)
    dense = Transformer(cfg)
    shared = analyze.overlap_stats(dense, 0.5, 8, shared_indices=True)
    assert shared["intact"] == pytest.approx(0.5)  # exactly floor(r d_ff) dropped, the same in all three matrices
    assert shared["pair_kept"] == pytest.approx(0.25, abs=0.02)
    independent = analyze.overlap_stats(dense, 0.5, 8, shared_indices=False)
    assert independent["pair_kept"] == pytest.approx(0.25, abs=0.02)
    assert independent["intact"] == pytest.approx(0.125, abs=0.02)  # (1 - r)^3
    assert analyze.overlap_stats(dense, 0.0, 4, True)["pair_intact"] == 1.0


# -----------------------------------------------------------------------------
# sweep and routing end to end on a tiny corpus


def test_sweep_trains_every_r_from_one_dense_model(swept):
    out, flags = swept
    names = ["moe-naive", "moe-drop-r0.1", "moe-drop-r0.25", "moe-drop-r0.5", "moe-drop-r0.75", "moe-drop-r1",
             "moe-drop-r0.5-indep", "moe-scratch"]
    settings = {}
    for name in names:
        with open(os.path.join(out, name, "settings.json")) as f:
            settings[name] = json.load(f)
    assert settings["moe-drop-r0.5"]["shared_indices"] is True
    assert settings["moe-drop-r0.5-indep"]["shared_indices"] is False
    assert {settings[n]["r"] for n in names[:6]} == {0.0, 0.1, 0.25, 0.5, 0.75, 1.0}
    dense = [settings[n]["dense"] for n in names[:7]]
    assert all(d == dense[0] for d in dense)  # one dense model's settings
    logs = {n: train.val_curve(os.path.join(out, n, "log.csv")) for n in names}
    # ... and its weights: every upcycled run's step-0 validation loss (logged before any MoE step) is that of
    # drop_upcycle applied to the saved dense checkpoint with the run's settings, on the same validation windows
    args = train.parse_args(flags)
    _, val_tokens, _ = train.load_data(args, train.get_tokenizer(args.tokenizer))
    val_rng = np.random.default_rng(1234)  # train.experiment's fixed validation windows
    cpu = torch.device("cpu")
    val_batches = [train.get_batch(val_tokens, args.batch_size, args.seq_len, val_rng, cpu) for _ in range(args.eval_batches)]
    ckpt = train.load_checkpoint(os.path.join(out, "dense", "ckpt.pt"))
    dense_model = Transformer(ModelConfig(**ckpt["model_config"]))
    dense_model.load_state_dict(ckpt["model"])
    dense_final = train.val_curve(os.path.join(out, "dense", "log.csv"))[2][-1]
    assert train.evaluate(dense_model, val_batches, cpu) == dense_final  # the same windows as the runs'
    assert logs["moe-naive"][2][0] == pytest.approx(dense_final, abs=1e-5)  # identical experts: the dense function
    for n in names[:7]:
        s = settings[n]
        moe = drop_upcycle(dense_model, n_experts=s["model"]["n_experts"], top_k=s["model"]["top_k"], r=s["r"],
                           seed=s["seed"], shared_indices=s["shared_indices"])
        assert train.evaluate(moe, val_batches, cpu) == logs[n][2][0], n
    # the two r = 0.5 runs start from different experts, so their curves differ
    assert all(np.array_equal(logs[n][0], logs["moe-naive"][0]) for n in names)  # same evaluation steps
    assert not np.array_equal(logs["moe-drop-r0.5"][2], logs["moe-drop-r0.5-indep"][2])
    with open(os.path.join(out, "sweep_summary.md")) as f:
        table = f.read()
    assert all(f"| {n} |" in table for n in names) and "python analyze.py sweep" in table
    assert os.path.getsize(os.path.join(out, "sweep_loss.png")) > 10_000


def test_routing_writes_consistent_statistics(swept):
    out, _ = swept
    with open(os.path.join(out, "routing_counts.json")) as f:
        raw = json.load(f)
    assert set(raw) >= {"moe-naive", "moe-drop-r0.5", "moe-scratch", "moe-drop-r0.5-indep"}
    for name, res in raw.items():
        assert res["domains"] == ["c", "python"]
        counts = np.array(res["counts"])  # [layers, domains, experts]
        assert counts.shape == (2, 2, 4)
        assert (counts.sum(axis=2) == res["tokens_per_domain"] * res["top_k"]).all()
        for layer in range(2):
            assert res["balance"][layer] == pytest.approx(analyze.load_balance(counts[layer].sum(axis=0)))
            assert res["js"][layer] == pytest.approx(analyze.js_divergence(counts[layer]))
    with open(os.path.join(out, "routing_summary.md")) as f:
        assert "| moe-naive |" in f.read()
    assert os.path.getsize(os.path.join(out, "routing_specialisation.png")) > 10_000


def test_bad_input_gives_one_line_and_nonzero_exit(swept, tmp_path, capsys):
    out, flags = swept
    cases = [
        ["sweep", "--r", "0.5", "--out-dir", str(tmp_path)],  # sweep chooses --r itself
        ["routing", "--out-dir", str(tmp_path / "empty"), *flags[flags.index("--data") :]],  # no runs there
        ["routing", "--preset", "cpu", "--out-dir", out, "--data", __file__],  # one file: no domains
        ["overlap", "--r", "1.5"],
        ["router-grad", "--dense-ckpt", os.path.join(out, "moe-naive")],  # an MoE, not a dense checkpoint
        ["router-grad", "--top-k", "9"],
        ["nonsense"],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as e:
            analyze.main(argv)
        assert e.value.code == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("analyze.py: error:") and "\n" not in err, (argv, err)
    # and from the shell: no traceback
    proc = subprocess.run([sys.executable, "analyze.py", "overlap", "--n-experts", "1"], cwd=HERE,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# The classroom exercises: every command runs (a few steps each), and the README lists them


def exercise_commands():
    return [cmd for ex in analyze.EXERCISES for cmd in ex["commands"]]


def test_every_exercise_command_runs(tmp_path, corpus, swept, capsys):
    """Each command as written, with out/ moved to tmp_path and the tiny model and schedule appended. out/cpu
    starts as a copy of the tiny sweep (same flags), so exercise 1's sweep finds its runs done: this checks
    the command, not the training, which test_sweep_* covers."""
    shutil.copytree(swept[0], tmp_path / "out" / "cpu")
    for command in exercise_commands():
        words = shlex.split(command)
        assert words[0] == "python" and words[1] in ("train.py", "analyze.py"), command
        argv = [str(tmp_path / w) if w.startswith("out/") else w for w in words[2:]]
        takes_train_flags = words[1] == "train.py" or argv[0] in ("sweep", "routing")
        if takes_train_flags:
            argv += ["--data", corpus, *TINY_CLI]
        main = train.main if words[1] == "train.py" else analyze.main
        try:
            main(argv)
        except SystemExit as e:
            pytest.fail(f"{command} exited with {e.code}: {capsys.readouterr().err}")
    assert os.path.exists(tmp_path / "out/cpu-noaux/routing_summary.md")


def test_readme_lists_every_exercise_command():
    text = analyze.exercises_markdown()
    assert all(cmd in text for cmd in exercise_commands()) and len(analyze.EXERCISES) in range(6, 9)
    readme = os.path.join(HERE, "README.md")
    with open(readme) as f:
        readme_text = f.read()
    assert "## Exercises" in readme_text
    missing = [cmd for cmd in exercise_commands() if cmd not in readme_text]
    assert not missing, f"README.md's Exercises section lacks {missing}; paste python analyze.py exercises"


# -----------------------------------------------------------------------------
# train.py: data, tokenizer, the real CLI end to end, resume, and every expected failure (issue 5).
# Training runs use a tiny model on a tiny corpus made in a temporary folder; runs whose losses are compared bit
# for bit all go through the CLI in subprocesses with the same environment.
TRAIN_PY = os.path.join(HERE, "train.py")
# one thread: identical floating-point reductions in every process, and no fight over the 2 cores
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_corpus(folder):
    """A small two-language corpus: 6 Python and 6 C files with different content, and one binary file."""
    os.makedirs(os.path.join(folder, "pkg"), exist_ok=True)
    for i in range(6):
        with open(os.path.join(folder, "pkg", f"mod{i}.py"), "w") as f:
            f.write("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # é\n\n" for j in range(60)))
        with open(os.path.join(folder, f"src{i}.c"), "w") as f:
            f.write("".join(f"int g{i}_{j}(int x) {{ return x << {j % 7}; }}\n" for j in range(60)))
    with open(os.path.join(folder, "blob.bin.dat"), "wb") as f:
        f.write(bytes(range(256)) * 4)  # has NUL bytes: skipped as binary
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs on one thread too: with other jobs on the 2 cores, two spinning threads run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def tiny(train_corpus, out_dir, moe_steps=120, dense_steps=20):
    """Flags for a seconds-long run: 1 layer, d_model 32, 4 experts, 32-token sequences."""
    return ["--data", train_corpus, "--out-dir", str(out_dir), "--device", "cpu", "--preset", "cpu",
            "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--n-kv-head", "2", "--d-ff", "64",
            "--n-experts", "4", "--top-k", "2", "--seq-len", "32", "--batch-size", "4",
            "--dense-steps", str(dense_steps), "--moe-steps", str(moe_steps), "--dense-warmup", "2", "--moe-warmup", "2",
            "--eval-interval", "10", "--eval-batches", "2", "--log-interval", "5", "--ckpt-interval", "10"]


def cli(args, **kw):
    return subprocess.run([sys.executable, TRAIN_PY, *args], capture_output=True, text=True, env=ENV, cwd=HERE,
                          timeout=300, **kw)


def run_main(argv, capsys):
    """train.main in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        train.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def drop_run(train_corpus, tmp_path_factory):
    """The reference: `train.py --init drop` through the real CLI, uninterrupted."""
    out = tmp_path_factory.mktemp("drop_run")
    result = cli(["--init", "drop", "--r", "0.5", *tiny(train_corpus, out)])
    assert result.returncode == 0, result.stderr
    return out, result


def assert_one_line_error(code, err):
    assert code not in (0, None), err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("train.py: error: ")
    return lines[0]


# -----------------------------------------------------------------------------
# tokenizer and data


def test_byte_tokenizer_round_trip_and_ids_are_utf8_bytes():
    enc = train.get_tokenizer("byte")
    assert enc.n_vocab == 257 and enc.eot_token == 256
    for text in ["def f(x):\n    return x\n", "naïve → Drop-Upcycling 🙂", "", "\n\n\t  x", "<|endoftext|> is text here"]:
        ids = enc.encode_ordinary(text)
        assert ids == list(text.encode("utf-8"))  # what the corpus builder's numpy fast path writes
        assert enc.decode(ids) == text


def test_corpus_listing_is_deterministic_and_split_by_file(train_corpus):
    files = train.list_files(train_corpus)
    assert len(files) == 13
    train1, val1 = train.select_files(files, corpus_mb=0)
    train2, val2 = train.select_files(list(reversed(files)), corpus_mb=0)
    assert (train1, val1) == (train2, val2)  # order of discovery does not matter
    keys_train, keys_val = {f[0] for f in train1}, {f[0] for f in val1}
    assert keys_val and keys_train and not keys_train & keys_val
    assert keys_train | keys_val == {f[0] for f in files}


def test_corpus_cap_keeps_both_languages_deterministically():
    files = [(f"lib/m{i}.py", f"/x/m{i}.py", 1000, 0) for i in range(50)] + \
            [(f"inc/h{i}.h", f"/x/h{i}.h", 1000, 0) for i in range(50)]
    train_a, val_a = train.select_files(files, corpus_mb=0.02)  # 20 kB: 10 kB per language
    train_b, val_b = train.select_files(files[::-1], corpus_mb=0.02)
    kept = train_a + val_a
    assert (train_a, val_a) == (train_b, val_b)
    assert {train.language_of(f[0]) for f in kept} == {"python", "c/c++"}
    assert sum(train.language_of(f[0]) == "python" for f in kept) == 10
    assert len(kept) == 20


def test_default_corpus_is_this_pythons_source_code():
    files = train.list_files(None)
    languages = {train.language_of(f[0]) for f in files}
    assert "python" in languages and len(files) > 100
    assert any(f[0].endswith("json/decoder.py") for f in files)  # the standard library is in
    # installed packages are listed once, from purelib/platlib: never through stdlib's site-packages, where a
    # virtual environment's base Python keeps twins of them (same file on both sides of the split)
    assert not [f[0] for f in files if f[0].split("/")[1] in ("site-packages", "dist-packages")]
    assert any(f[0].startswith(("purelib/", "platlib/")) for f in files)
    names = [f[0].split("/", 1)[1] for f in files]
    assert len(names) == len(set(names))  # no file twice under two roots


def test_token_cache_holds_whole_files_is_reused_and_rebuilt_when_data_change(train_corpus, tmp_path, capsys):
    data = write_corpus(str(tmp_path / "data"))
    args = train.parse_args(tiny(data, tmp_path / "out"))
    enc = train.get_tokenizer("byte")
    train_tokens, val_tokens, info = train.load_data(args, enc)
    assert "tokenizing" in capsys.readouterr().out
    # val.bin is whole held-out files, each followed by <|endoftext|>
    _, val_files = train.select_files(train.list_files(data), 0)
    expected = b"".join(open(f[1], "rb").read() + b"<|endoftext|>" for f in val_files)
    assert enc.decode_bytes(list(val_tokens)) == expected
    assert len(train_tokens) + len(val_tokens) == sum(len(open(p, "rb").read()) + 1 for _, p, _, _ in train.list_files(data)
                                                      if p.endswith((".py", ".c")))
    # same settings: reused, not rebuilt
    _, _, info2 = train.load_data(args, enc)
    assert "tokenizing" not in capsys.readouterr().out and info2["fingerprint"] == info["fingerprint"]
    # a file changed: rebuilt, with a message saying why
    with open(os.path.join(data, "src0.c"), "a") as f:
        f.write("int extra;\n")
    train_tokens3, val_tokens3, info3 = train.load_data(args, enc)
    assert "rebuilding" in capsys.readouterr().out and info3["fingerprint"] != info["fingerprint"]
    assert len(train_tokens3) + len(val_tokens3) == len(train_tokens) + len(val_tokens) + len("int extra;\n")


def test_a_file_repeated_under_many_names_is_tokenized_once_so_validation_never_repeats_training(tmp_path, capsys):
    data = tmp_path / "twins"
    vendored = "def vendored(x):\n    return x + 1\n" * 40
    for i in range(40):  # one module vendored by 40 packages: by name, some copies fall in val, some in train
        (data / f"pkg{i}").mkdir(parents=True)
        (data / f"pkg{i}" / "vendored.py").write_text(vendored)
        (data / f"own{i}.py").write_text(f"def own_{i}(x):\n    return x * {i}\n" * 40)
    train_files, val_files = train.select_files(train.list_files(str(data)), 0)
    assert any(f[0].endswith("vendored.py") for f in train_files) and val_files
    args = train.parse_args(tiny(str(data), tmp_path / "out"))
    train_tokens, val_tokens, _ = train.load_data(args, train.get_tokenizer("byte"))
    everything = bytes(np.asarray(train_tokens, dtype=np.uint8)) + bytes(np.asarray(val_tokens, dtype=np.uint8))
    assert everything.count(vendored.encode()) == 1  # 40 copies, kept once
    assert vendored.encode() not in bytes(np.asarray(val_tokens, dtype=np.uint8))  # and in train, as train is first


# -----------------------------------------------------------------------------
# the CLI end to end


def test_cli_drop_run_writes_csvs_checkpoints_figure_and_summary(drop_run):
    out, result = drop_run
    assert "[moe-drop-r0.5] done" in result.stdout
    for path in ["dense/ckpt.pt", "dense/log.csv", "moe-drop-r0.5/ckpt.pt", "moe-drop-r0.5/log.csv",
                 "loss_curves.png", "summary.md"]:
        assert os.path.getsize(out / path) > 0, path
    rows = csv_rows(out / "moe-drop-r0.5" / "log.csv")
    assert list(rows[0]) == ["step", "tokens", "train_loss", "val_loss", "aux_loss", "lr", "time"]
    assert [int(r["step"]) for r in rows] == list(range(0, 121, 5))
    assert int(rows[-1]["tokens"]) == 120 * 4 * 32
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == 13 and all(math.isfinite(v) for v in vals) and vals[-1] < vals[1]
    # the balancing loss is logged: positive and at most n_experts (= 4; f_i <= 1, sum_i P_i = 1). It has no
    # lower bound of 1 or top_k: perfect balance gives top_k, unbalanced routing can give less
    assert all(0.0 < float(r["aux_loss"]) <= 4.0 for r in rows[1:])
    ckpt = torch.load(out / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["step"] == 120 and ckpt["settings"]["r"] == 0.5
    with open(out / "summary.md") as f:
        assert "moe-drop-r0.5" in f.read()


def test_second_init_reuses_dense_and_naive_starts_at_the_dense_loss(drop_run, train_corpus, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)
    code, stdout, err = run_main(["--init", "naive", *tiny(train_corpus, out)], capsys)
    assert code == 0, err
    assert "reusing the finished dense model" in stdout
    dense_final = float(csv_rows(out / "dense" / "log.csv")[-1]["val_loss"])
    naive_start = float(csv_rows(out / "moe-naive" / "log.csv")[0]["val_loss"])
    drop_start = float(csv_rows(out / "moe-drop-r0.5" / "log.csv")[0]["val_loss"])
    assert naive_start == pytest.approx(dense_final, abs=1e-5)  # identical experts: the dense function
    assert drop_start > naive_start + 1e-3  # half the FFN neurons re-initialised: worse at first
    summary = open(out / "summary.md").read()
    assert "moe-naive" in summary and "moe-drop-r0.5" in summary


def test_sample_prints_text_from_a_checkpoint(drop_run, capsys):
    code, stdout, err = run_main(["--sample", str(drop_run[0] / "moe-drop-r0.5"), "--sample-tokens", "16",
                                  "--device", "cpu"], capsys)
    assert code == 0, err
    assert stdout.count("--- sample") == 2


def test_help_has_one_line_per_option():
    parser = train.build_parser()
    for action in parser._actions:
        assert action.help and "\n" not in action.help, action.option_strings
    assert len(parser.format_help()) > 0


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    lrs = [train.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert train.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_overtake_step_is_the_last_sign_change():
    steps = np.array([0, 10, 20, 30, 40])
    assert train.overtake_step(steps, np.array([0.1, 0.05, -0.01, -0.02, -0.03])) == 20
    assert train.overtake_step(steps, np.array([0.1, -0.05, 0.01, -0.02, -0.03])) == 30
    assert train.overtake_step(steps, np.array([0.1, 0.05, 0.01, 0.02, -0.0])) is None


# -----------------------------------------------------------------------------
# no lost work: interrupt and resume, NaN, failed saves


def test_sigint_saves_and_resume_reproduces_the_uninterrupted_run_exactly(drop_run, train_corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, TRAIN_PY, "--init", "drop", "--r", "0.5", *tiny(train_corpus, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=HERE)
    for line in proc.stdout:  # interrupt once the MoE phase is under way
        if line.startswith("[moe-drop-r0.5] step 10/"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stdout
    ckpt = torch.load(out / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)
    assert not ckpt["finished"] and 10 <= ckpt["step"] < 120
    resumed = cli(["--init", "drop", "--r", "0.5", "--resume", *tiny(train_corpus, out)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {ckpt['step']}/120" in resumed.stdout
    reference = csv_rows(drop_run[0] / "moe-drop-r0.5" / "log.csv")
    rows = csv_rows(out / "moe-drop-r0.5" / "log.csv")
    drop_time = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]
    assert drop_time(rows) == drop_time(reference)  # every loss, bit for bit
    final = torch.load(out / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)["model"]
    ref_final = torch.load(drop_run[0] / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)


def test_sigterm_during_dense_phase_saves_a_checkpoint(train_corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, TRAIN_PY, "--init", "dense", *tiny(train_corpus, out, dense_steps=2000)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=HERE)
    for line in proc.stdout:
        if line.startswith("[dense] step 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "Traceback" not in stderr
    assert os.path.exists(out / "dense" / "ckpt.pt"), stdout
    ckpt = torch.load(out / "dense" / "ckpt.pt", weights_only=True)
    assert 5 <= ckpt["step"] < 2000 and "optimizer" in ckpt


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(train_corpus, tmp_path, capsys, monkeypatch):
    real_lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, *a: float("nan") if step >= 12 else real_lr_at(step, *a))
    code, _, err = run_main(["--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)
    line = assert_one_line_error(code, err)
    assert "at step 14" in line and "step 10) is kept" in line  # update 13 wrote NaNs: step 14 sees them
    ckpt = torch.load(tmp_path / "dense" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_mid_write(obj, f):
        real_save(obj, f)
        f.seek(0)
        f.truncate(10)  # half-written file ...
        raise OSError(28, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(train.Fail, match="previous checkpoint is unchanged"):
        train.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


# -----------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, no traceback


def test_cli_errors_for_invalid_r_and_missing_data_are_one_line(tmp_path):
    for args, expected in [(["--init", "drop", "--r", "1.5"], "--r: must be in [0, 1]"),
                           (["--data", str(tmp_path / "missing")], "no such file or folder")]:
        result = cli([*args, "--out-dir", str(tmp_path / "out")])
        line = assert_one_line_error(result.returncode, result.stderr)
        assert expected in line and result.stdout.count("step") == 0


@pytest.mark.parametrize("flags, expected", [
    (["--r", "abc", "--init", "drop"], "invalid number value: 'abc'"),
    (["--r", "-0.1", "--init", "drop"], "must be in [0, 1]"),
    (["--r", "0.5", "--init", "naive"], "--r applies to --init drop only"),
    (["--init", "bogus"], "invalid choice: 'bogus'"),
    (["--top-k", "5"], "top_k (5) must be between 1 and n_experts (4)"),
    (["--n-experts", "1"], "at least 2 experts"),
    (["--d-model", "30", "--n-head", "4"], "n_head (4) must divide d_model (30)"),
    (["--n-kv-head", "3", "--n-head", "4"], "n_kv_head (3) must divide n_head (4)"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--seq-len", "-3"], "--seq-len: must be a positive integer"),
    (["--dense-lr", "0"], "--dense-lr: must be a positive number"),
    (["--seq-len", "100000"], "fewer than --seq-len + 2"),
])
def test_bad_flags_give_one_clear_line(flags, expected, train_corpus, tmp_path, capsys):
    code, _, err = run_main([*tiny(train_corpus, tmp_path), *flags], capsys)
    assert expected in assert_one_line_error(code, err)


def test_bad_data_gives_one_clear_line(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    binary_only = tmp_path / "binary"
    binary_only.mkdir()
    (binary_only / "x.py").write_bytes(b"\0" * 100)
    big_ids = tmp_path / "tokens.bin"
    np.array([1, 2, 300, 4] * 100, dtype=np.uint16).tofile(big_ids)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    for data, expected in [(empty, "no text files found"), (binary_only, "no text found"),
                           (big_ids, "token id 300 is outside the vocabulary"), (odd, "holds uint16 values")]:
        code, _, err = run_main(tiny(str(data), tmp_path / "out"), capsys)
        assert expected in assert_one_line_error(code, err), data
    # an unreadable file (as root, permissions do not stop reads: make open() fail the way it would)
    unreadable = write_corpus(str(tmp_path / "unreadable"))
    target = os.path.join(unreadable, "src3.c")

    def deny(path, *a, **kw):
        if path == target:
            raise PermissionError(13, "Permission denied", path)
        return open(path, *a, **kw)

    monkeypatch.setattr(train, "open", deny, raising=False)
    code, _, err = run_main(tiny(unreadable, tmp_path / "out2"), capsys)
    assert f"cannot read {target}: Permission denied" in assert_one_line_error(code, err)


def test_token_file_data_trains(tmp_path, capsys):
    tokens = tmp_path / "tokens.bin"
    np.frombuffer(("int main(void) { return 0; }\n" * 400).encode(), dtype=np.uint8).astype(np.uint16).tofile(tokens)
    code, stdout, err = run_main(["--init", "dense", *tiny(str(tokens), tmp_path / "out")], capsys)
    assert code == 0, err
    assert "split by position" in stdout


def test_gpt2_tokenizer_offline_is_one_clear_line(train_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))  # no cached BPE files ...
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):  # ... and no network
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    code, _, err = run_main(["--tokenizer", "gpt2", *tiny(train_corpus, tmp_path / "out")], capsys)
    assert "--tokenizer gpt2: tiktoken could not load its BPE files" in assert_one_line_error(code, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(train_corpus, tmp_path, capsys):
    code, _, err = run_main([*tiny(train_corpus, tmp_path), "--device", "cuda"], capsys)
    assert "CUDA is not available" in assert_one_line_error(code, err)


def test_unwritable_out_dir(train_corpus, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_main(tiny(train_corpus, blocker / "out"), capsys)
    assert "cannot create folder" in assert_one_line_error(code, err)


def test_resume_errors(drop_run, train_corpus, tmp_path, capsys):
    import shutil

    # nothing to resume
    code, _, err = run_main(["--resume", "--init", "drop", *tiny(train_corpus, tmp_path / "fresh")], capsys)
    assert "no checkpoint" in assert_one_line_error(code, err)
    # a checkpoint made with other settings: refused with the difference, with or without --resume
    out = tmp_path / "copy"
    shutil.copytree(drop_run[0], out)
    for extra in ([], ["--resume"]):
        code, _, err = run_main([*extra, "--init", "drop", *tiny(train_corpus, out), "--d-ff", "128"], capsys)
        line = assert_one_line_error(code, err)
        assert "other settings" in line and "model.d_ff: 64 -> 128" in line
    # a truncated checkpoint, and one that is garbage
    ckpt = out / "moe-drop-r0.5" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    code, _, err = run_main(["--resume", "--init", "drop", *tiny(train_corpus, out)], capsys)
    assert "is unreadable (truncated or corrupt" in assert_one_line_error(code, err)
    ckpt.write_bytes(b"not a checkpoint at all")
    code, _, err = run_main(["--resume", "--init", "drop", *tiny(train_corpus, out)], capsys)
    assert "is unreadable" in assert_one_line_error(code, err)


def test_unfinished_run_is_not_overwritten_without_resume(train_corpus, tmp_path, capsys, monkeypatch):
    real_lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, *a: float("nan") if step >= 12 else real_lr_at(step, *a))
    run_main(["--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)  # dies at step 13, ckpt at 10
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    code, _, err = run_main(["--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)
    assert "unfinished run (step 10/40): pass --resume" in assert_one_line_error(code, err)


def test_cuda_oom_is_reported_with_sizes_and_a_suggestion(train_corpus, tmp_path, capsys, monkeypatch):
    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_run", oom)
    code, _, err = run_main(["--init", "dense", *tiny(train_corpus, tmp_path)], capsys)
    line = assert_one_line_error(code, err)
    assert "4 x 32 = 128 tokens" in line and "--batch-size 2 --grad-accum 2" in line


def test_compile_is_used_only_where_it_agrees_with_eager_mode(monkeypatch, capsys):
    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper: the real compile is too slow here
        def __init__(self, model, shift=0.0, **kwargs):
            super().__init__()
            self.model, self.shift, self.kwargs = model, shift, kwargs

        def forward(self, *a):
            logits, loss = self.model(*a)
            return logits + self.shift * torch.arange(logits.shape[-1]), loss

    cfg = train.ModelConfig(vocab_size=257, d_model=32, n_layer=2, n_head=2, n_kv_head=2, d_ff=64, max_seq_len=16,
                            n_experts=4)
    model = train.Transformer(cfg)
    args = train.parse_args(["--compile", "--device", "cpu"])
    x = torch.randint(0, 257, (2, 16))
    monkeypatch.setattr(torch, "compile", Compiled)
    compiled = train.maybe_compile(model, args, (x, x), "moe")
    assert isinstance(compiled, Compiled) and compiled.model is model
    assert compiled.kwargs["options"]["triton.max_tiles"] == 1  # through compile_model
    monkeypatch.setattr(torch, "compile", lambda m, **kw: Compiled(m, shift=0.01))  # a compiler that gets it wrong
    assert train.maybe_compile(model, args, (x, x), "moe") is model
    assert "WARNING: the compiled model disagrees with eager mode" in capsys.readouterr().out


def test_report_gives_runs_outside_init_all_a_colour_of_their_own():
    # the default colour cycle starts with naive Upcycling's blue: r = 0.5-indep was drawn in it once
    runs = ["moe-naive", "moe-drop-r0.5", "moe-drop-r0.5-indep", "moe-drop-r0.75", "moe-drop-r0.1", "moe-drop-r0.25"]
    others = [train.color_of(name, runs) for name in runs[2:]]
    assert len(set(others)) == len(others) and not set(others) & set(train.COLORS.values())
    assert train.color_of("moe-naive", runs) == "tab:blue"
