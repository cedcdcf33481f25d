"""Tests that check the paper's claims about the model and Drop-Upcycling, not just shapes.

Run: python -m pytest -q
"""

import json
import math
import os
import random
import shlex
import shutil
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
    assert model.aux_loss is not None and model.aux_loss.item() >= 1.0
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
            else:  # the released code: an independent S per matrix
                assert not (sets["gate"] == sets["up"] == sets["down"])


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_r0_keeps_and_r1_replaces_the_whole_ffn(r):
    dense = trained_looking_dense()
    moe = drop_upcycle(dense, n_experts=4, r=r)
    for name in ("gate", "up", "down"):
        n = len(reinitialised_neurons(moe, dense, 0, name, expert=2))
        assert n == (0 if r == 0 else TINY.d_ff)


def test_new_values_follow_the_mean_and_std_of_the_dropped_slice_only():
    """Step 2 uses the statistics of the dropped neurons S, not of the whole matrix: with one outlier
    neuron, experts whose S contains it get much wider new values than experts whose S does not."""
    cfg = replace(TINY, d_model=128, d_ff=64)
    dense = trained_looking_dense(cfg)
    with torch.no_grad():
        for block in dense.layers:
            block.ffn.gate.weight[0] *= 30
            block.ffn.up.weight[0] += 1.0
            block.ffn.down.weight[:, 0] *= 30
    moe = drop_upcycle(dense, n_experts=8, r=0.25)
    with_outlier = 0
    for layer in range(cfg.n_layer):
        for expert in range(8):
            for name in ("gate", "up", "down"):
                S = sorted(reinitialised_neurons(moe, dense, layer, name, expert))
                with_outlier += 0 in S
                new = expert_weights(moe, layer, name)[expert][S]
                old = dense_weight(dense, layer, name)[S]
                se = old.std().item() / math.sqrt(old.numel())  # standard error of the mean
                assert abs(new.mean().item() - old.mean().item()) < 5 * se, (layer, expert, name)
                assert new.std().item() == pytest.approx(old.std().item(), rel=0.1), (layer, expert, name)
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
    out, _ = swept
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
    assert all(d == dense[0] for d in dense)  # one dense model
    # the two r = 0.5 runs start from different experts, so their curves differ
    logs = {n: train.val_curve(os.path.join(out, n, "log.csv")) for n in names}
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
