"""
Drop-Upcycling (Nakamura et al., ICLR 2025) in one file.

Read top to bottom next to the paper:
  1. ModelConfig                  - Table 4's columns
  2. RMSNorm, RoPE, Attention     - the Llama backbone (Appendix A.3)
  3. SwiGLU                       - the dense FFN, Eq. 1
  4. MoE, load_balancing_loss     - the Mixtral layer, Eq. 2-3, and its auxiliary loss (App. A.4, Sec. 5.4)
  5. Transformer, compile_model   - dense (Llama) when n_experts == 1, MoE (Mixtral) otherwise; torch.compile
  6. drop_upcycle                 - Sec. 3: expert replication + diversity re-initialisation (Eq. 4)
  7. flops_per_token              - Appendix A.1, Table 3

Step 3 of the method, continued training, lives in train.py.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Configuration


@dataclass
class ModelConfig:
    vocab_size: int = 257  # a byte-level tokenizer: 256 bytes + <|endoftext|>
    d_model: int = 256  # hidden size (d_h in the paper)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # < n_head means grouped-query attention
    d_ff: int = 1024  # intermediate size of the SwiGLU FFN (d_f in the paper)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_experts: int = 1  # 1: dense Llama; > 1: every FFN is a Mixtral MoE layer
    top_k: int = 2
    aux_loss_coef: float = 0.02  # Appendix A.4
    # The fields below exist for Hugging Face checkpoints (hf.py); the paper's models use the defaults.
    tie_embeddings: bool = False  # lm_head.weight IS embed.weight (SmolLM2, Llama 3.2)
    d_head: int | None = None  # explicit head dimension (HF's head_dim); None: d_model // n_head
    rope_scaling: dict | None = None  # Llama 3.1's {"rope_type": "llama3", "factor", ...}; None: plain RoPE

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "max_seq_len", "n_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_head is None and self.d_model % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide d_model ({self.d_model}), or d_head must be given")
        if self.d_head is not None and (not isinstance(self.d_head, int) or isinstance(self.d_head, bool) or self.d_head < 1):
            raise ValueError(f"d_head must be None or a positive integer, got {self.d_head!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for RoPE")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if self.rope_scaling is not None:
            check_llama3_rope_scaling(self.rope_scaling)
        if self.is_moe and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be between 1 and n_experts ({self.n_experts})")
        if not (self.rope_theta > 0 and self.norm_eps > 0 and self.aux_loss_coef >= 0):
            raise ValueError("rope_theta and norm_eps must be positive and aux_loss_coef non-negative")

    @property
    def is_moe(self):
        return self.n_experts > 1

    @property
    def head_dim(self):
        return self.d_head if self.d_head is not None else self.d_model // self.n_head


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_llama3_rope_scaling(scaling):
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        raise ValueError(f"rope_scaling must be None or a dict with rope_type 'llama3', got {scaling!r}")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    extra = sorted(set(scaling) - {"rope_type", *LLAMA3_ROPE_KEYS})
    if missing or extra:
        raise ValueError(f"rope_scaling of type llama3 needs exactly {', '.join(LLAMA3_ROPE_KEYS)}; "
                         f"missing {missing}, unexpected {extra}")
    values = [scaling[k] for k in LLAMA3_ROPE_KEYS]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"rope_scaling values must be positive numbers, got {scaling!r}")
    if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ValueError("rope_scaling needs low_freq_factor < high_freq_factor")


# -----------------------------------------------------------------------------
# 2. The Llama backbone: RMSNorm, rotary position embeddings, grouped-query attention


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 even under bf16 autocast: the mean of squares loses precision otherwise
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(head_dim, max_seq_len, theta, scaling=None):
    """cos, sin tables [max_seq_len, head_dim] for RoPE, in the half-split layout of Llama/Mixtral on HF."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, **{k: scaling[k] for k in LLAMA3_ROPE_KEYS})
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, head_dim]
    return angles.cos(), angles.sin()


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's RoPE scaling, as transformers computes it (_compute_llama3_parameters): for a longer context,
    slow (long-wavelength) frequencies are divided by factor, fast ones kept, the band between interpolated."""
    old_len = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_len / low_freq_factor, old_len / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """Rotate each (i, i + head_dim/2) pair of x [B, H, T, head_dim] by a position-dependent angle, so that
    q.k depends only on the relative position of the two tokens."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, H_kv, T, hd]
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # enable_gqa lets each group of n_head/n_kv_head query heads share one key/value head
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


# -----------------------------------------------------------------------------
# 3. The dense FFN


def swiglu(x, w_gate, w_up, w_down):
    # Eq. 1: SwiGLU(x) = (Swish(x W_gate) * x W_up) W_down. The weights are in nn.Linear layout [out, in], the
    # transposes of the paper's W (d_h x d_f for W_gate), so x W there is F.linear(x, w) = x @ w.T here
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # weight [d_ff, d_model]
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # weight [d_ff, d_model]
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)  # weight [d_model, d_ff]

    def forward(self, x):
        return swiglu(x, self.gate.weight, self.up.weight, self.down.weight), None  # None: no router logits


# -----------------------------------------------------------------------------
# 4. The Mixtral MoE layer (Sec. 3.1)


# Which GPU runs which implementation of Eq. 2 (the math is the same; a test checks each against the loop).
# Grouped GEMM (one kernel for all experts' matmuls) is public from PyTorch 2.10 on, private before.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def bf16_supported(device):
    """Whether the GPU computes in bf16 natively (Ampere, sm80, on). Emulated bf16 (a T4 or V100 will "support" it
    through fp32) is slower than fp16 and is not counted."""
    try:
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # PyTorch before 2.3 has no including_emulation and does not emulate
        return torch.cuda.get_device_capability(device) >= (8, 0)


# The device queries below would break a compiled graph in every MoE layer: torch.compile runs this once while it
# traces a forward and keeps the answer as a constant of the graph (a new device means a new graph anyway).
@torch.compiler.assume_constant_result
def moe_path(device):
    """Which implementation of Eq. 2 MoE.forward runs on device: "grouped", "dense" or "reference".

    grouped:   experts_grouped, sorted tokens + grouped GEMM in bf16; only where PyTorch has a real grouped kernel
               for the card: Hopper (sm90), and from PyTorch 2.9 on also sm100 (B200). Elsewhere _grouped_mm either
               raises (before 2.9) or falls back to a loop of matmuls that waits for the GPU at every call (2.9 on).
    dense:     experts_dense, every expert on every token: E/k times the FLOPs, but any CUDA GPU in any precision,
               and nothing waits for the GPU.
    reference: experts_reference, the readable loop; on the CPU waiting for the device costs nothing.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "reference"
    fast_majors = (9, 10) if TORCH_VERSION >= (2, 9) else (9,)
    major = torch.cuda.get_device_capability(device)[0]
    if _grouped_mm is not None and major in fast_majors and bf16_supported(device):
        return "grouped"
    return "dense"


def row_groups_per_expert(d_model, d_ff):
    """Into how many groups experts_grouped cuts each expert's rows: 4 for small experts (the gpu preset's
    256 x 1024), 2 at the paper's 512 x 2048, 1 from 1024 x 4096 on. The weight gradient of a group is one GEMM
    over its rows; a few long ones (small experts, or the uneven routing real text gives) leave most of an H200
    idle: cut in 4, the gpu preset's whole training step took 25% less time with balance 0.33 and 2-4% less with
    even routing (figures/moe_trials_h200.json). At 512 x 2048, the layer's forward and backward in 2 groups took
    12% less time than in 1 with balance 0.33 and 7% more with even routing at 32k tokens
    (figures/moe_trials2_h200.json); trained routers range from about that uneven to nearly even (balance
    0.36-0.97 by layer and init, naive 0.36-0.46: figures/routing_gpu_summary.md). Larger experts were not tried
    in groups."""
    return min(4, max(1, 2**21 // (d_model * d_ff)))


def top_k_indices(scores, k):
    """Indices of the k largest scores in each row, largest first: scores [N, E] -> [N, k], as torch.topk gives
    them (a tie, which topk leaves unordered, goes to the lower index). Found as k rounds of argmax, each masking
    the last winner: on a GPU, torch.topk runs one thread block per row, 6% of a compiled MoE training step at
    the gpu preset (figures/bench_h200_loop.profile.txt), while torch.compile fuses these k argmaxes over E columns
    into one small kernel."""
    columns = torch.arange(scores.shape[-1], device=scores.device)
    scores, chosen = scores.detach(), []
    for _ in range(k):
        best = scores.argmax(dim=-1)  # [N]
        chosen.append(best)
        scores = torch.where(columns == best[:, None], float("-inf"), scores)
    return torch.stack(chosen, dim=-1)


def top_k_gates(logits, k):
    """Eq. 3: g(x) = Softmax(Top-k(x W_router)): router logits [N, E] -> chosen experts [N, k] and their gate
    weights [N, k], the softmax over the k chosen logits (equal to Mixtral's softmax -> top-k -> renormalise)."""
    experts = top_k_indices(logits, k)
    return experts, F.softmax(logits.gather(-1, experts), dim=-1)


class RowPermutation(torch.autograd.Function):
    """rows[index] for a permutation index, with a gradient that is a gather too: grad[inverse], inverse being
    index's inverse. Autograd's own gradient of rows[index] would be a scatter-add, whose bf16 atomic adds contend
    for rows; as gathers both ways, torch.compile fuses each move into the kernel before or after it, so no moved
    copy of the rows is stored."""

    @staticmethod
    def forward(ctx, rows, index, inverse):
        ctx.save_for_backward(inverse)
        return rows[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class MoE(nn.Module):
    """n_experts SwiGLU FFNs and a router; each token goes to its top_k experts, none is dropped.

    Expert weights are stacked: expert i is (gate[i], up[i], down[i]), exactly the dense SwiGLU's weights
    with a leading expert axis, so Sec. 3's "the original FFN weights are copied to all experts" is a broadcast
    copy.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.row_groups = row_groups_per_expert(cfg.d_model, cfg.d_ff)  # experts_grouped only
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)  # W_router
        self.gate = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_ff, cfg.d_model))
        self.up = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_ff, cfg.d_model))
        self.down = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_ff))

    def route(self, x):
        """x [N, d_model] -> router logits [N, E], chosen experts [N, k], gate weights g(x) [N, k]."""
        # The router runs in fp32 even under bf16 autocast (Switch Transformer's "selective precision"): top-k
        # is a hard choice, and bf16 logits would flip near-ties, so that autocast, compiled and eager runs
        # would send some tokens to different experts. It is one tiny [N, E] matmul. (The authors' trainer ran
        # it in bf16; figures/README.md lists such differences.)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        experts, weights = top_k_gates(logits, self.top_k)  # Eq. 3
        return logits, experts, weights

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        logits, experts, weights = self.route(x)
        path = moe_path(x.device)
        experts_fn = {"grouped": self.experts_grouped, "dense": self.experts_dense, "reference": self.experts_reference}
        y = experts_fn[path](x, experts, weights)
        return y.view(B, T, D), logits  # the logits feed the balancing loss

    def experts_reference(self, x, experts, weights):
        """Eq. 2, readably: y = sum_i g(x)_i SwiGLU_i(x), one expert at a time."""
        y = torch.zeros_like(x)
        for i in range(self.n_experts):
            token, slot = torch.where(experts == i)  # which tokens chose expert i, and in which top-k slot
            if token.numel() == 0:
                continue
            out = swiglu(x[token], self.gate[i], self.up[i], self.down[i])
            y.index_add_(0, token, (out * weights[token, slot, None]).to(y.dtype))
        return y

    def experts_dense(self, x, experts, weights):
        """Eq. 2 on any device with no wait for it: every expert on every token, each output weighted by a dense
        [N, E] gate matrix that holds g(x) for the chosen experts and 0 for the others.

        E/k times the FLOPs and memory of the expert layer (4x for 8 experts, top-2), but no data-dependent shape:
        the GPU fallback where no grouped GEMM kernel exists (moe_path), traced by torch.compile as one graph.
        The zeros make it exact: an unchosen expert adds 0 to y and gets 0 gradient from that token.
        """
        gates = torch.zeros(x.shape[0], self.n_experts, dtype=weights.dtype, device=x.device)
        gates = gates.scatter(1, experts, weights)  # [N, E]; differentiable in weights (the router's gradient)
        # x [N, d_model] @ [E, d_model, d_ff] broadcasts to [E, N, d_ff]: one batched matmul for all experts
        h = F.silu(x @ self.gate.transpose(1, 2)) * (x @ self.up.transpose(1, 2))  # [E, N, d_ff]
        out = h @ self.down.transpose(1, 2)  # [E, N, d_model]
        return torch.einsum("end,ne->nd", out, gates.to(out.dtype)).to(x.dtype)

    def experts_grouped(self, x, experts, weights):
        """Eq. 2, fast: the same sum, all experts at once with grouped GEMMs in bf16 (CUDA only).

        No loop over experts, no .item() and no data-dependent shape: nothing waits for the GPU, and
        torch.compile traces the whole layer as one graph.
        """
        N, k = experts.shape
        bf16 = torch.bfloat16
        # 1. sort the N*k (token, expert) assignments by expert, so that each expert's rows are contiguous.
        #    Assignment j is token j // k, slot j % k; stable keeps each expert's tokens in their order.
        sorted_experts, order = experts.flatten().sort(stable=True)  # order[i]: assignment of sorted row i
        where = torch.empty_like(order)
        where[order] = torch.arange(order.numel(), device=x.device)  # where[j]: sorted row of assignment j
        # 2. offsets: where each group of rows ends (int32, as the kernel wants). Expert i's rows, from
        #    starts[i] to ends[i], are cut into G = self.row_groups equal groups that share its weights
        #    (row_groups_per_expert says why); autograd adds up the G weight gradients.
        expert_ids = torch.arange(self.n_experts, device=x.device)
        ends = torch.searchsorted(sorted_experts, expert_ids, right=True, out_int32=True)  # [E]
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        G = self.row_groups
        cuts = torch.arange(1, G + 1, device=x.device, dtype=torch.int32)  # [G]
        offsets = (starts[:, None] + (ends - starts)[:, None] * cuts // G).flatten().to(torch.int32)  # [E * G]

        def group_weights(w):  # [E, out, in] -> [E * G, in, out]: expert i's weights for each of its G groups
            w = w.to(bf16)
            return (w if G == 1 else w.repeat_interleave(G, dim=0)).transpose(1, 2)

        # 3. each token's k rows, in sorted order: sorted row i is assignment order[i], the row order[i] of x_rows.
        #    Compiled, the k copies and the move are one gather from x (and the gradient one gather and a sum).
        x_rows = x.to(bf16).unsqueeze(1).expand(N, k, -1).reshape(N * k, -1)  # [N*k, d_model], row j: token j // k
        x_sorted = RowPermutation.apply(x_rows, order, where)  # [N*k, d_model]
        # 4. grouped GEMMs: each group's rows times its expert's weights, one kernel for all experts. The weights
        #    go [E, out, in] -> [E * G, in, out], transposed, the layout x @ W.T needs. Gate and up are two
        #    GEMMs, not one on torch.cat([gate, up]): that was no faster on an H200, slower at the paper's shape.
        h_gate = _grouped_mm(x_sorted, group_weights(self.gate), offs=offsets)  # [N*k, d_ff]
        h_up = _grouped_mm(x_sorted, group_weights(self.up), offs=offsets)  # [N*k, d_ff]
        out = _grouped_mm(F.silu(h_gate) * h_up, group_weights(self.down), offs=offsets)  # [N*k, d_model]
        # 5. back to token order (assignment j is sorted row where[j]), then each token's k outputs weighted by
        #    g(x) and added, in bf16 like the dense FFN's output; compiled, one kernel
        out = RowPermutation.apply(out, where, order).view(N, k, -1)  # [N, k, d_model]
        return (out * weights.to(bf16)[..., None]).sum(dim=1).to(x.dtype)


def load_balancing_loss(router_logits, top_k):
    """Switch/Mixtral auxiliary loss over router logits [N, E] pooled from all MoE layers ("applied to all
    layers collectively", Sec. 5.4), weighted by 0.02 in training (App. A.4).

    aux = E * sum_i f_i * P_i, f_i: fraction of tokens that send one of their top_k slots to expert i (so
    sum_i f_i = top_k), P_i: mean router probability of expert i. Perfect balance gives aux = top_k;
    f_i carries no gradient, so the loss pushes probability away from over-used experts.
    """
    n_experts = router_logits.shape[-1]
    probs = F.softmax(router_logits.float(), dim=-1)  # [N, E]
    chosen = top_k_indices(probs, top_k)  # [N, k]
    f = F.one_hot(chosen, n_experts).float().sum(dim=1).mean(dim=0)  # [E]
    P = probs.mean(dim=0)  # [E]
    return n_experts * (f * P).sum()


# -----------------------------------------------------------------------------
# 5. The model: Llama when dense, Mixtral when every FFN is an MoE layer


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe else SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        ffn_out, router_logits = self.ffn(self.ffn_norm(x))
        return x + ffn_out, router_logits


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # untied from embed by default
        if config.tie_embeddings:
            # one Parameter under two names: the optimizer, .to() and load_state_dict keep it one tensor
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.aux_loss = None  # last unweighted balancing loss, for logging (None for a dense model)
        self.reset_parameters()

    def reset_parameters(self):
        # Sec. 4: every weight matrix N(0, 0.02), router and experts included; norms start at 1
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """idx, targets: [B, T] token ids -> logits [B, T, vocab], loss (None without targets)."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)
        router_logits = []
        for block in self.layers:
            x, logits = block(x, cos, sin)
            if logits is not None:
                router_logits.append(logits)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        if self.config.is_moe:
            aux = load_balancing_loss(torch.cat(router_logits), self.config.top_k)  # all layers pooled
            self.aux_loss = aux.detach()
            loss = loss + self.config.aux_loss_coef * aux
        return logits, loss

    def num_params(self, active=False):
        """Total parameters, or the active ones: what one token uses (top_k of the n_experts experts)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() lists a tied weight once
        if not (active and self.config.is_moe):
            return total
        inactive_experts = self.config.n_experts - self.config.top_k
        per_expert = 3 * self.config.d_model * self.config.d_ff
        return total - self.config.n_layer * inactive_experts * per_expert

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after the prompt idx [B, T] (no KV cache: short and simple)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.max_seq_len :])
            logits = logits[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return idx


def compile_model(module, **kwargs):
    """torch.compile(module, **kwargs); a module with MoE layers gets inductor's pointwise kernels tiled in 1-D.

    With 2-D tiles (the default), a compiled MoE model gave some tokens wrong outputs (PyTorch 2.11, H100):
    from the second MoE layer of a graph on, 2-15% of the tokens were 5-90% off, different ones in every call,
    in every compile of a 4-layer d_model 256 model tried (over 20; a 12-layer d_model 512 one was right); with
    1-D tiles in none, and the training step as fast.
    """
    mode = kwargs.pop("mode", None)
    if any(isinstance(m, MoE) for m in module.modules()):
        # torch.compile takes a mode or options, not both: the mode's options, then the caller's, then ours
        mode_options = torch._inductor.list_mode_options(mode) if mode else {}
        kwargs["options"] = {**mode_options, **kwargs.get("options", {}), "triton.max_tiles": 1}
        mode = None
    return torch.compile(module, mode=mode, **kwargs)


# -----------------------------------------------------------------------------
# 6. Drop-Upcycling (Sec. 3): dense Transformer -> MoE Transformer


def drop_upcycle(dense, n_experts=8, top_k=2, r=0.5, seed=0, shared_indices=True):
    """Build an MoE from a trained dense model: Sec. 3.2 expert replication, then Sec. 3.2.1 diversity
    re-initialisation of a fraction r of every expert's FFN neurons. r = 0 is naive Upcycling.

    shared_indices=True drops the same neurons S in gate, up and down: the method as Sec. 3.2.1 describes and
    argues for it, hence the default. False draws an independent S per matrix: the authors' released code, which
    produced the paper's results. That code also shuffles each expert's neurons first, which changes nothing the
    layer computes, and is left out here. Either way two experts share about (1 - r)^2 of each matrix's dense
    neurons (Sec. 3.2.2); with shared sets a fraction (1 - r) of an expert's neurons is intact in all three
    matrices, with independent ones only (1 - r)^3. The dense model is left untouched. Step 3, continued
    training, is train.py's job.
    """
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"r must be in [0, 1], got {r}")
    if dense.config.is_moe:
        raise ValueError("drop_upcycle needs a dense model (n_experts == 1)")
    cfg = upcycled_config(dense.config, n_experts, top_k)
    param = next(dense.parameters())
    # built where the dense model is (a GPU initialises billions of weights in a moment). Its N(0, 0.02) init
    # draws from torch's global generator; every value that survives below comes from the dense model or from
    # the two seeded streams
    with torch.device(param.device):
        moe = Transformer(cfg).to(param.dtype)  # tied embeddings stay tied

    # Sec. 3.2, expert replication: every non-FFN weight is copied as is ...
    dense_state = dense.state_dict()
    missing, unexpected = moe.load_state_dict({k: v for k, v in dense_state.items() if ".ffn." not in k}, strict=False)
    assert not unexpected and all(".ffn." in k for k in missing)  # only the FFNs are left to fill in
    with torch.no_grad():
        for moe_block, (router, gate, up, down) in zip(moe.layers, upcycled_ffns(dense, n_experts, r, seed, shared_indices)):
            moe_ffn = moe_block.ffn
            moe_ffn.router.weight.copy_(router)
            moe_ffn.gate.copy_(gate)
            moe_ffn.up.copy_(up)
            moe_ffn.down.copy_(down)
    return moe


def upcycled_config(dense_config, n_experts, top_k):
    """The dense model's shape with n_experts experts per FFN, top_k of them per token; a ValueError otherwise."""
    if n_experts < 2:
        raise ValueError(f"an MoE needs at least 2 experts, got n_experts {n_experts}")
    return replace(dense_config, n_experts=n_experts, top_k=top_k)  # (ModelConfig checks top_k)


@torch.no_grad()
def upcycled_ffns(dense, n_experts, r, seed, shared_indices=True):
    """The MoE FFN of every layer in turn, (router [E, d_model], gate, up, down stacked over experts): one layer
    at a time, so that hf.py can write a large MoE without holding it in memory. drop_upcycle puts them in place."""
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"r must be in [0, 1], got {r}")
    # two independent random streams, so runs that differ only in r start from the same router
    router_rng = torch.Generator().manual_seed(2 * seed)
    drop_rng = torch.Generator().manual_seed(2 * seed + 1)
    for block in dense.layers:
        ffn = block.ffn
        # ... the router is new: U(-0.0346, 0.0346), std 0.02 (Appendix C.1) ...
        bound = 0.02 * math.sqrt(3)
        router = torch.empty(n_experts, dense.config.d_model).uniform_(-bound, bound, generator=router_rng)
        # ... and W_gate^(i) = W_gate, W_up^(i) = W_up, W_down^(i) = W_down for every expert i
        gate, up, down = (lin.weight.expand(n_experts, -1, -1).clone() for lin in (ffn.gate, ffn.up, ffn.down))
        # Sec. 3.2.1, diversity re-initialisation, for every expert of every layer
        for i in range(n_experts):
            diversity_reinit(gate[i], up[i], down[i], r, shared_indices, drop_rng)
        yield router.to(gate.device, gate.dtype), gate, up, down


def neurons_to_drop(r, d_ff):
    """floor(r * d_ff), with r * d_ff rounded to 9 decimals first: in floating point 0.29 * 100 is 28.999..., which
    would floor to 28."""
    return math.floor(round(r * d_ff, 9))


def diversity_reinit(w_gate, w_up, w_down, r, shared_indices, rng):
    """Re-initialise floor(r * d_ff) intermediate neurons of one expert in place (Sec. 3.2.1, steps 1-3).

    Neuron j of the FFN is row j of W_gate and W_up ([d_ff, d_model]) and column j of W_down ([d_model, d_ff]);
    working on W_down transposed makes "neuron j" row j of all three.
    """
    d_ff = w_gate.shape[0]
    n_drop = neurons_to_drop(r, d_ff)
    if n_drop == 0:
        return  # naive Upcycling
    # Step 1: S, a random subset of floor(r * d_ff) of the d_ff intermediate indices ... (drawn and discarded for
    # independent sets too, which then draw one per matrix: one seed gives the runs in figures/ their weights)
    S = torch.randperm(d_ff, generator=rng)[:n_drop]
    for w in (w_gate, w_up, w_down.T):
        if not shared_indices:  # ... or, as in the released code, a fresh S for each matrix
            S = torch.randperm(d_ff, generator=rng)[:n_drop]
        dropped = w[S.to(w.device)].float()  # [n_drop, d_model]
        # Step 2: two scalars per matrix, mean and std of the dropped slice only
        mean, std = dropped.mean(), dropped.std()
        # Step 3, Eq. 4: W~ = I_S * R + (1 - I_S) * W, with R ~ N(mean, std^2)
        R = torch.randn(dropped.shape, generator=rng) * std.cpu() + mean.cpu()
        w[S.to(w.device)] = R.to(w.device, w.dtype)


# -----------------------------------------------------------------------------
# 7. Accounting (Appendix A.1)


def flops_per_token(config, seq_len):
    """Training FLOPs per token: the forward FLOPs of Table 3 times 3 (the backward pass costs about twice
    the forward). Matmuls only; norms, activations and the router are negligible and left out, as in the
    paper. For an MoE model n_e = top_k experts run per token, so this counts the active parameters."""
    d_h, d_f, v, d_k = config.d_model, config.d_ff, config.vocab_size, config.head_dim
    n_h, n_q = config.n_head, config.n_kv_head  # n_q: Table 3's "query groups", i.e. key/value heads
    s = seq_len
    embeddings = 2 * s * v * d_h
    attention = (
        4 * s * d_h * d_k * n_q  # "key and value projections"
        + 2 * s * d_h * d_k * n_h  # "query projections"
        + 2 * s * s * d_k * n_h  # "key @ query logits"
        + 2 * s * s * d_k * n_h  # "attention matrix computation": attention weights @ values
        + 2 * s * d_k * n_h * d_h  # "softmax @ value reductions": the output projection
    )
    ffn = 4 * s * d_h * d_f + 2 * s * d_f * d_h
    n_e = config.top_k if config.is_moe else 1
    forward = embeddings + config.n_layer * (attention + n_e * ffn) + 2 * s * d_h * v
    return 3 * forward / s
