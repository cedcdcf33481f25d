"""
The device side of a training run: which device --device names, the precision (autocast), the card's peak
FLOP/s for MFU, how much of a micro-batch fits its memory, and what to say when it did not. On the CPU: fp32, no
MFU, no split.

train.py, analyze.py and bench.py use it; it imports only dropupcycle and data (for Fail).
"""

import torch

from data import Fail
from dropupcycle import bf16_supported, moe_path


# Peak FLOP/s of the GPUs MFU is reported for, per autocast precision: (name, bf16, fp16), None where the card has no
# bf16 tensor cores (the project's one table; bench.py reads it too). Datasheet dense tensor-core numbers: without
# sparsity, with fp32 accumulation (GeForce cards run fp16-accumulate at twice that; autocast accumulates in fp32).
# Matched in this order against torch.cuda.get_device_name: "H100 PCIe" before "H100", "GH200" before "H200",
# "A100" before "A10", "L40S" before "L40" before "L4".
PEAK_FLOPS = [("H100 PCIe", 756e12, 756e12), ("H100", 989e12, 989e12), ("GH200", 989e12, 989e12),
              ("H200", 989e12, 989e12), ("H800", 989e12, 989e12), ("A100", 312e12, 312e12),
              ("L40S", 362e12, 362e12), ("L40", 181e12, 181e12), ("L4", 121e12, 121e12), ("A10", 125e12, 125e12),
              ("4090", 165e12, 165e12), ("3090", 71e12, 71e12), ("V100", None, 125e12), ("T4", None, 65e12)]
# The gpu preset's MoE (65,536 tokens a micro-batch, grouped path) peaked at 7.2 GiB on an H200, 1.8 GiB of it the
# corpus: activation_bytes_per_token is checked against that in test_train.py.
MEMORY_SAFETY = 0.85  # share of the free GPU memory a training step may plan to use (fragmentation, eval, compile)


def amp_dtype(device):
    """The precision of the matmuls. bf16 on GPUs that have it (sm80 on): fp32's range, no scaler. fp16 on older
    ones (T4, V100): their tensor cores run fp16 at ~8x fp32's speed, and a gradient scaler (train_run) keeps small
    gradients from underflowing fp16's 5-bit exponent. Norms, router and loss stay fp32 inside the model either way.
    fp32 on the CPU: exact and reproducible."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def autocast(device):
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def compute_description(device):
    """One line for the start of a command: the precision and which MoE implementation (moe_path) runs, and why."""
    if device.type != "cuda":
        return "fp32 | MoE experts: reference loop (CPU)"
    sm = "sm{}{}".format(*torch.cuda.get_device_capability(device))
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(device)]
    autocast_text = f"{precision} autocast" + (" + gradient scaler" if precision == "fp16" else "")
    path = {"grouped": "grouped GEMM", "dense": "dense (every expert on every token: no grouped GEMM kernel for this "
            "card in this PyTorch)"}[moe_path(device)]
    return f"{autocast_text} | MoE experts: {path} ({sm}, {precision}, PyTorch {torch.__version__})"


def activation_bytes_per_token(cfg, path):
    """Rough bytes a training step keeps per token for the backward: per layer ~12 d_model values for attention,
    norms and residuals, and per expert row a token occupies its input and output (2 d_model) and gate, up and
    silu*up (3 d_ff): top_k rows on the grouped or reference path, all n_experts on the dense path; 2 bytes each
    under autocast. Plus ~12 bytes per vocabulary entry for the logits and the loss."""
    rows = (cfg.n_experts if path == "dense" else cfg.top_k) if cfg.is_moe else 1
    return 2 * cfg.n_layer * (12 * cfg.d_model + rows * (2 * cfg.d_model + 3 * cfg.d_ff)) + 12 * cfg.vocab_size


def micro_split(cfg, rows, seq_len, device, n_params):
    """Into how many equal pieces train_run cuts each micro-batch of `rows` sequences, so that a step fits the GPU's
    free memory: gradients accumulate over the pieces, so every step sees the same data and the same global batch
    on every card (only the balancing loss, which is per batch, and the order of additions differ). 1 off the GPU."""
    if device.type != "cuda":
        return 1
    budget = MEMORY_SAFETY * torch.cuda.mem_get_info(device)[0] - 16 * n_params  # fp32 weights, grads, AdamW moments
    per_sequence = seq_len * activation_bytes_per_token(cfg, moe_path(device))
    fitting = [n for n in range(1, rows + 1) if rows % n == 0 and rows // n * per_sequence <= budget]
    return fitting[0] if fitting else rows  # one sequence at a time, the most that can be done



def gpu_peak_flops(device, dtype=torch.bfloat16):
    """Dense peak FLOP/s of the GPU in dtype (bf16 or fp16; for MFU), or None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak[dtype == torch.float16] for key, *peak in PEAK_FLOPS if key in name), None)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise Fail(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise Fail(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise Fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise Fail(f"--device {name}: only cpu and cuda are supported")
    return device


def oom_message(batch_size, seq_len, grad_accum, d_model, n_layer, n_experts):
    where = ""
    if torch.cuda.is_available():
        total = torch.cuda.mem_get_info()[1]
        where = f"; GPU {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated by PyTorch, {total / 2**30:.1f} GiB total"
    tokens = batch_size * seq_len
    return (f"CUDA out of memory with micro-batches of {batch_size} x {seq_len} = {tokens:,} tokens "
            f"(d_model {d_model}, {n_layer} layers, {n_experts} experts){where}. Try --batch-size "
            f"{max(1, batch_size // 2)} --grad-accum {grad_accum * 2} (same tokens per step) or a smaller model")
