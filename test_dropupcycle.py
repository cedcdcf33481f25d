"""Tests that check the paper's claims about the model and Drop-Upcycling, not just shapes.

Run: python -m pytest -q
"""

import inspect
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dropupcycle import (
    MoE,
    RowPermutation,
    RMSNorm,
    ModelConfig,
    Transformer,
    _grouped_mm,
    bf16_supported,
    apply_rope,
    compile_model,
    drop_upcycle,
    flops_per_token,
    load_balancing_loss,
    llama3_inv_freq,
    neurons_to_drop,
    rope_cos_sin,
    row_groups_per_expert,
    swiglu,
    top_k_indices,
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


def kurtosis(values):
    """E[z^4] of the standardised values: 3 for a normal distribution, 1.8 for a uniform one with the same std."""
    z = (values - values.mean()) / values.std()
    return (z**4).mean().item()


# -----------------------------------------------------------------------------
# Configuration


def test_default_config_is_a_valid_dense_model_with_the_papers_constants():
    cfg = ModelConfig()
    assert not cfg.is_moe
    # RoPE theta 10000 and RMSNorm eps 1e-5 (the paper's Llama models), balancing loss weight 0.02 (App. A.4)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.aux_loss_coef) == (10000.0, 1e-5, 0.02)
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
            if p.numel() >= 2**16:  # normal, not merely the right mean and std
                assert kurtosis(p.detach()) == pytest.approx(3.0, abs=0.15), name
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


def test_rope_rotates_dimension_pairs_i_and_i_plus_half_by_position_times_theta_to_the_minus_2i_over_d():
    """Llama's (Hugging Face's) layout: dimension i is paired with i + d/2, not with i + 1. A theta other than
    10000 checks that the config's theta is the one used."""
    head_dim, theta, m = 8, 500.0, 7
    cos, sin = rope_cos_sin(head_dim, 16, theta)
    x = torch.randn(head_dim, generator=torch.Generator().manual_seed(0))
    y = apply_rope(x, cos[m], sin[m])
    for i in range(head_dim // 2):
        angle = m * theta ** (-2 * i / head_dim)
        a, b = x[i].item(), x[i + head_dim // 2].item()
        assert y[i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5), i
        assert y[i + head_dim // 2].item() == pytest.approx(a * math.sin(angle) + b * math.cos(angle), abs=1e-5), i


def test_llama3_rope_keeps_high_frequencies_divides_low_ones_by_factor_and_blends_between():
    """Llama 3.1's rope_scaling: wavelengths under original/high_freq_factor keep their frequency, those over
    original/low_freq_factor are divided by factor, and the band between is interpolated smoothly."""
    factor, low, high, original = 8.0, 1.0, 4.0, 32
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    scaled = llama3_inv_freq(inv_freq, factor, low, high, original)
    bands = set()
    for f, out in zip(inv_freq.tolist(), scaled.tolist()):
        wavelength = 2 * math.pi / f
        if wavelength < original / high:
            expected, band = f, "high"
        elif wavelength > original / low:
            expected, band = f / factor, "low"
        else:
            smooth = (original / wavelength - low) / (high - low)
            expected, band = (1 - smooth) * f / factor + smooth * f, "between"
        assert out == pytest.approx(expected, rel=1e-5), wavelength
        bands.add(band)
    assert bands == {"high", "low", "between"}


def test_rmsnorm_divides_by_the_root_mean_square_and_scales_by_its_gain():
    norm = RMSNorm(6, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = 4 * torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight, atol=1e-6)


def test_swiglu_is_eq1_down_of_swish_gate_times_up():
    gen = torch.Generator().manual_seed(0)
    x, w_gate, w_up, w_down = (torch.randn(shape, generator=gen) for shape in ((5,), (7, 5), (7, 5), (5, 7)))
    assert torch.allclose(swiglu(x, w_gate, w_up, w_down), w_down @ (F.silu(w_gate @ x) * (w_up @ x)), atol=1e-5)


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_top_k_by_argmax_rounds_picks_what_torch_topk_picks_largest_first(device, k):
    scores = torch.randn(5000, 8, device=device)
    expected = scores.topk(k, dim=-1).indices
    assert torch.equal(top_k_indices(scores, k), expected)
    if device == "cuda":  # as the compiled model runs it: fused into one kernel
        assert torch.equal(torch.compile(top_k_indices)(scores, k), expected)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], device=device)
    assert top_k_indices(ties, 2).tolist() == [[1, 2], [0, 1]]  # a tie goes to the lower index


def test_the_routers_gradient_flows_through_the_chosen_logits_as_through_torch_topk():
    """route() takes the chosen logits with a gather; Eq. 3 written with torch.topk's values gives the same gate
    weights and the same router gradient."""
    layer = random_moe_layer(replace(TINY_MOE, n_experts=8, top_k=2), std=0.1)
    x = torch.randn(200, TINY.d_model)
    upstream = torch.randn(200, 2)
    _, _, weights = layer.route(x)
    (weights * upstream).sum().backward()
    ours = layer.router.weight.grad.clone()
    layer.zero_grad()
    top_logits, _ = F.linear(x, layer.router.weight).topk(2, dim=-1)
    reference = F.softmax(top_logits, dim=-1)
    (reference * upstream).sum().backward()
    assert torch.allclose(weights, reference, atol=1e-6)
    assert torch.allclose(ours, layer.router.weight.grad, atol=1e-6) and ours.abs().sum() > 0


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


def test_each_experts_rows_are_cut_into_more_groups_the_smaller_the_expert():
    assert row_groups_per_expert(256, 1024) == 4  # the gpu preset
    assert row_groups_per_expert(512, 2048) == 2  # the paper's 8x152M
    assert row_groups_per_expert(1024, 4096) == 1 and row_groups_per_expert(4096, 14336) == 1
    assert row_groups_per_expert(32, 64) == 4  # never more than 4
    assert MoE(replace(TINY_MOE, d_model=512, d_ff=2048)).row_groups == 2


def test_moving_rows_by_a_permutation_has_the_gradient_of_autograds_own_gather():
    torch.manual_seed(0)
    rows = torch.randn(12, 5, requires_grad=True)
    index = torch.randperm(12)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(12)
    grad = torch.randn(12, 5)
    moved = RowPermutation.apply(rows, index, inverse)
    (ours,) = torch.autograd.grad(moved, rows, grad)
    (autograds,) = torch.autograd.grad(rows[index], rows, grad)
    assert torch.equal(moved, rows[index]) and torch.equal(ours, autograds)


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


GRAD_NAMES = ["output", "d_x", "d_gate", "d_up", "d_down", "d_router"]


@pytest.mark.parametrize("device", DEVICES)
def test_an_expert_with_fewer_rows_than_row_groups_still_gets_its_exact_gradient(device):
    """Expert 6 gets 2 rows, cut into 4 groups (2 of them empty); expert 7 gets none."""
    torch.manual_seed(0)
    layer = random_moe_layer(replace(TINY_MOE, d_model=64, d_ff=128, n_experts=8, top_k=2), std=0.1).to(device)
    layer.row_groups = 4
    tokens = torch.arange(50, device=device)
    experts = torch.stack([tokens % 6, (tokens + 1) % 6], dim=1)  # every token on two of experts 0-5...
    experts[:2, 1] = 6  # ...but tokens 0 and 1 on expert 6 in their second slot
    weights = torch.randn(50, 2, device=device).softmax(dim=-1)
    x = torch.randn(50, 64, device=device)
    results = []
    for name in ("reference", "grouped"):
        layer.zero_grad()
        y = getattr(layer, f"experts_{name}")(x, experts, weights)
        (y.float() * torch.ones_like(y)).sum().backward()
        results.append([y.detach(), layer.gate.grad[6].clone(), layer.up.grad[6].clone(), layer.down.grad.clone()])
    assert results[0][1].abs().sum() > 0 and layer.gate.grad[7].abs().sum() == 0
    for fast, ref in zip(results[1], results[0]):
        assert relative_error(fast, ref) < 2e-2


def outputs_and_gradients(device, top_k, path_names, row_groups=1):
    """For each named experts_* path: the output and the gradients of x, the experts and the router, on the same
    layer, input and routing (expert 7 never chosen: an expert without tokens must work too)."""
    torch.manual_seed(0)
    cfg = replace(TINY_MOE, d_model=64, d_ff=128, n_experts=8, top_k=top_k)
    layer = random_moe_layer(cfg, std=0.1).to(device)
    layer.row_groups = row_groups
    x = torch.randn(300, cfg.d_model, device=device, requires_grad=True)
    grad_out = torch.randn(300, cfg.d_model, device=device)
    never_expert_7 = torch.zeros(cfg.n_experts, device=device)
    never_expert_7[7] = -1e4
    results = []
    for name in path_names:
        layer.zero_grad()
        x.grad = None
        top_logits, experts = (layer.router(x) + never_expert_7).topk(top_k, dim=-1)
        y = getattr(layer, f"experts_{name}")(x, experts, F.softmax(top_logits, dim=-1))
        (y * grad_out).sum().backward()
        grads = [x.grad, layer.gate.grad, layer.up.grad, layer.down.grad, layer.router.weight.grad]
        results.append([y.detach()] + [g.clone() for g in grads])
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("row_groups", [1, 3, 4])
def test_grouped_gemm_path_matches_reference_path_in_outputs_and_gradients(device, top_k, row_groups):
    """The fast path (sort by expert + grouped GEMM in bf16, each expert's rows cut into row_groups groups)
    computes the same Eq. 2 as the readable loop."""
    reference, grouped = outputs_and_gradients(device, top_k, ["reference", "grouped"], row_groups)
    for name, fast, ref in zip(GRAD_NAMES, grouped, reference):
        assert relative_error(fast, ref) < 2e-2, name  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert torch.all(grouped[2][7] == 0)  # the unused expert gets no gradient


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("top_k", [1, 2])
def test_dense_path_matches_reference_path_in_outputs_and_gradients(device, top_k):
    """The sync-free fallback (every expert on every token, zero gates for the unchosen) is Eq. 2 exactly: in fp32
    it differs from the loop only by the order of additions."""
    reference, dense = outputs_and_gradients(device, top_k, ["reference", "dense"])
    for name, fast, ref in zip(GRAD_NAMES, dense, reference):
        assert relative_error(fast, ref) < 1e-5, name
    assert torch.all(dense[2][7] == 0)  # the unused expert gets no gradient


def test_choosing_the_path_never_breaks_a_compiled_graph():
    """moe_path asks the GPU for its capability and bf16 support, which torch.compile cannot trace: it is marked to be
    run once at trace time, its answer a constant. Without the mark, this wrapper of it breaks the graph."""
    import dropupcycle

    def breaks_unless_constant(device):
        torch._dynamo.graph_break()  # stands in for the CUDA queries, which this CPU machine cannot make
        return "dense"  # the path that is one graph by itself (test below)

    layer = random_moe_layer()
    x = torch.randn(2, 8, TINY.d_model)
    for mark, breaks in [(lambda f: f, 1), (torch.compiler.assume_constant_result, 0)]:
        torch._dynamo.reset()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(dropupcycle, "moe_path", mark(breaks_unless_constant))
            assert torch._dynamo.explain(layer)(x).graph_break_count == breaks
    assert getattr(dropupcycle.moe_path, "_dynamo_marked_constant", False)  # the real one carries the mark


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_model_is_one_graph_on_cuda():
    model = Transformer(TINY_MOE).cuda()
    x = torch.randint(0, TINY_MOE.vocab_size, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_dense_path_compiles_to_one_graph_without_breaks(monkeypatch):
    """No data-dependent shape and no .item(): torch.compile traces the fallback whole (nothing waits for the GPU)."""
    import dropupcycle
    monkeypatch.setattr(dropupcycle, "moe_path", lambda device: "dense")
    explained = torch._dynamo.explain(random_moe_layer())(torch.randn(2, 8, TINY.d_model))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.parametrize("capability, version, bf16, expected", [
    ((9, 0), "2.11.0+cu130", True, "grouped"),   # H100/H200
    ((9, 0), "2.5.1+cu124", True, "grouped"),    # Hopper had the kernel first
    ((10, 0), "2.11.0+cu130", True, "grouped"),  # B200: a kernel from PyTorch 2.9 on
    ((10, 0), "2.8.0+cu128", True, "dense"),     # ... raised before
    ((8, 0), "2.11.0+cu130", True, "dense"),     # A100: grouped_mm would loop with host syncs
    ((8, 6), "2.11.0", True, "dense"),           # RTX 3090
    ((8, 9), "2.11.0", True, "dense"),           # RTX 4090, L4
    ((12, 0), "2.11.0", True, "dense"),          # RTX 5090: no kernel for sm120
    ((7, 5), "2.11.0", False, "dense"),          # T4: no bf16
    ((9, 0), "2.11.0", False, "dense"),          # the grouped path is bf16-only, whatever the card
])
def test_moe_path_picks_grouped_gemm_only_where_pytorch_has_a_kernel_for_the_card(monkeypatch, capability, version,
                                                                                   bf16, expected):
    import dropupcycle
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(dropupcycle, "TORCH_VERSION", tuple(int(v) for v in version.split("+")[0].split(".")[:2]))
    monkeypatch.setattr(dropupcycle, "bf16_supported", lambda device: bf16)
    assert dropupcycle.moe_path(torch.device("cuda")) == expected
    assert dropupcycle.moe_path(torch.device("cpu")) == "reference"
    monkeypatch.setattr(dropupcycle, "_grouped_mm", None)  # a PyTorch without grouped GEMM at all
    assert dropupcycle.moe_path(torch.device("cuda")) == ("dense" if expected == "grouped" else expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["grouped", "dense", "reference"])
def test_each_path_forced_on_the_gpu_matches_the_reference_under_autocast(monkeypatch, path):
    """MoE.forward on this GPU with each path forced, in the precision train.py uses here, against the fp32 loop."""
    import dropupcycle
    import train
    if path == "grouped" and not (bf16_supported("cuda") and grouped_mm_works("cuda")):
        pytest.skip("no bf16 grouped GEMM on this GPU")
    layer = random_moe_layer(replace(TINY_MOE, d_model=64, d_ff=128, n_experts=8), std=0.1).cuda()
    x = torch.randn(4, 64, 64, device="cuda", requires_grad=True)
    grad_out = torch.randn(4, 64, 64, device="cuda")
    results = []
    for forced, ctx in ((path, train.autocast(torch.device("cuda"))), ("reference", torch.autocast("cuda", enabled=False))):
        monkeypatch.setattr(dropupcycle, "moe_path", lambda device: forced)
        layer.zero_grad()
        x.grad = None
        with ctx:
            y, _ = layer(x)
        (y.float() * grad_out).sum().backward()
        results.append([y.detach(), x.grad.clone(), layer.gate.grad.clone(), layer.up.grad.clone(),
                        layer.down.grad.clone(), layer.router.weight.grad.clone()])
    for name, fast, ref in zip(GRAD_NAMES, *results):
        assert relative_error(fast, ref) < 2e-2, name  # bf16/fp16 roundings


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_on_cuda_matches_the_reference_and_trains_under_autocast():
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
    monkeypatch.setattr(layer, "experts_dense", None)
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
    with torch.no_grad():  # trained norm gains, not the 1s a fresh MoE starts with
        for name, p in dense.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
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


def test_floor_r_d_ff_is_of_r_as_written_not_of_its_rounded_product():
    dense = Transformer(replace(TINY, d_ff=100))
    assert 0.29 * 100 < 29 and neurons_to_drop(0.29, 100) == 29 and neurons_to_drop(0.999, 100) == 99
    moe = drop_upcycle(dense, n_experts=2, r=0.29)
    assert len(reinitialised_neurons(moe, dense, 0, "gate", 1)) == 29


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


def test_one_index_set_for_all_three_matrices_is_the_default():
    """Sec. 3.2.1's text: S indexes the rows of W_gate and W_up and the columns of W_down alike."""
    assert inspect.signature(drop_upcycle).parameters["shared_indices"].default is True
    dense = trained_looking_dense()
    moe = drop_upcycle(dense, n_experts=4, r=0.5)
    assert len({frozenset(reinitialised_neurons(moe, dense, 0, name, 1)) for name in ("gate", "up", "down")}) == 1


def test_upcycled_model_keeps_the_requested_experts_and_top_k():
    moe = drop_upcycle(trained_looking_dense(), n_experts=4, top_k=1, r=0.5)
    assert (moe.config.n_experts, moe.config.top_k) == (4, 1)
    assert all((block.ffn.n_experts, block.ffn.top_k) == (4, 1) for block in moe.layers)


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


def test_new_values_are_drawn_from_a_normal_distribution():
    """Eq. 4: R ~ N(mean, std^2), not merely any distribution with that mean and std."""
    cfg = replace(TINY, d_model=128, d_ff=256)
    dense = trained_looking_dense(cfg)
    moe = drop_upcycle(dense, n_experts=8, r=0.5)
    for name in ("gate", "up", "down"):
        S = sorted(reinitialised_neurons(moe, dense, 0, name, 3))  # 128 neurons x 128 weights
        assert kurtosis(expert_weights(moe, 0, name)[3][S].flatten()) == pytest.approx(3.0, abs=0.15), name


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


def test_fewer_than_two_experts_is_a_value_error():
    with pytest.raises(ValueError, match="at least 2 experts"):
        drop_upcycle(trained_looking_dense(), n_experts=1, top_k=1)


def trained_step_after_upcycling(r, aux_loss_coef):
    """The 4-expert, top-2 MoE made from trained_looking_dense with ratio r, after one backward of its training loss
    with the balancing loss weighted by aux_loss_coef."""
    moe = drop_upcycle(trained_looking_dense(), n_experts=4, top_k=2, r=r)
    moe.config.aux_loss_coef = aux_loss_coef
    idx = torch.randint(0, TINY.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    moe(idx, idx)[1].backward()
    return moe


def test_upcycled_model_trains():
    """Continued training (Sec. 3, step 3): the language-modelling loss alone (no balancing loss) sends gradients
    to the router, through the gate weights of Eq. 3, and to every expert of an r = 0.5 model; at r = 0 the
    router's is only float rounding (identical experts)."""
    router_grads = {}
    for r in (0.0, 0.5):
        ffn = trained_step_after_upcycling(r, aux_loss_coef=0.0).layers[0].ffn
        router_grads[r] = ffn.router.weight.grad.norm().item()
        assert all(ffn.gate.grad[i].abs().sum() > 0 for i in range(4))
    assert router_grads[0.5] > 1000 * router_grads[0.0]


def test_at_r0_only_the_balancing_loss_moves_the_router():
    """Identical experts make the output the same whatever the gate weights, so the language-modelling loss gives
    the router no gradient (the slow start of naive Upcycling); the balancing loss still does."""
    router_grads = [trained_step_after_upcycling(0.0, coef).layers[0].ffn.router.weight.grad.norm().item()
                    for coef in (0.0, 0.02)]
    assert router_grads[1] > 1000 * router_grads[0]


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


def test_key_and_value_projections_count_key_value_heads_and_queries_count_query_heads():
    """Table 3 with grouped-query attention (Table 2's models have as many key/value heads as query heads)."""
    gqa = ModelConfig(vocab_size=100, d_model=64, n_layer=2, n_head=8, n_kv_head=2, d_ff=128)
    mha = replace(gqa, n_kv_head=8)
    # forward: 4 s d_h d_k per key/value head and layer (K and V), times 3 for training, per token
    assert flops_per_token(mha, 32) - flops_per_token(gqa, 32) == pytest.approx(3 * 2 * 4 * 64 * 8 * (8 - 2))


def test_moe_flops_count_only_the_top_k_active_experts():
    dense, moe = DENSE_152M, MOE(DENSE_152M)
    ffn = 3 * 6 * dense.d_model * dense.d_ff * dense.n_layer  # 6 d_h d_f per layer, times 3 for training
    assert flops_per_token(moe, 4096) - flops_per_token(dense, 4096) == pytest.approx(ffn)  # 2 experts - 1 FFN
    assert flops_per_token(replace(moe, n_experts=64), 4096) == flops_per_token(moe, 4096)
