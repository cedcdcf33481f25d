"""Cold compile time, step time and exit time of the gpu preset's models under train.py's compile (CUDA graphs):
the whole model (full), Block.forward as a nested compile region (nested), pointwise autotuning off (nopwtune).
One process per (variant, kind), from the repository root, with empty caches, as run for compile_probe_h200.json:

    for vk in full:dense full:moe nested:dense nested:moe nopwtune:moe; do v=${vk%%:*}; k=${vk##*:}; c=$(mktemp -d)
      TORCHINDUCTOR_CACHE_DIR=$c/i TRITON_CACHE_DIR=$c/t python figures/compile_probe.py $v $k OUT/probe_${v}_$k.json
    done   # (the process's end was taken from the shell's clock, $EPOCHREALTIME, for exit_s)
"""
import json, os, sys, time
T0 = time.time()
import torch
sys.path.insert(0, os.getcwd())
import dropupcycle as du, train
variant, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
if variant == "nested":
    du.Block.forward = torch.compiler.nested_compile_region(du.Block.forward)
if variant == "nopwtune":
    torch._inductor.config.triton.autotune_pointwise = False
device = torch.device(os.environ.get("DEV", "cuda"))
torch.backends.cuda.matmul.allow_tf32 = True
cfg = du.ModelConfig(vocab_size=257, d_model=256, n_layer=4, n_head=4, n_kv_head=4, d_ff=1024, max_seq_len=512,
                     n_experts=8 if kind == "moe" else 1, top_k=2)
torch.manual_seed(0)
model = du.Transformer(cfg).to(device)
opt = train.make_optimizer(model, 1e-3, 0.1, device)
cm = model if variant == "eager" else du.compile_model(model, mode="reduce-overhead" if device.type == "cuda" else None)
g = torch.Generator(device=device).manual_seed(0)
batches = [torch.randint(0, 257, (int(os.environ.get("B", 128)), 513), device=device, generator=g) for _ in range(4)]
N = int(os.environ.get("N", 200))
res = dict(variant=variant, kind=kind, import_s=round(time.time() - T0, 2))
def sync():
    if device.type == "cuda": torch.cuda.synchronize()
def step(i):
    b = batches[i % 4]
    train.begin_step(cm)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        _, loss = cm(b[:, :-1], b[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    return loss.detach().clone()
try:
    t = time.time()
    train.begin_step(cm)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        _, l0 = cm(batches[0][:, :-1], batches[0][:, 1:])
    res["loss0"] = l0.item(); res["first_forward_s"] = round(time.time() - t, 2)
    del l0
    t = time.time(); step(0); sync(); res["first_step_s"] = round(time.time() - t, 2)
    t = time.time()
    for i in range(1, min(20, N)): step(i)
    sync(); res["steps_1_19_s"] = round(time.time() - t, 2)
    ms = []
    for r in range(3):
        t = time.time()
        for i in range(N): l = step(i)
        sync(); ms.append(round((time.time() - t) / N * 1e3, 3))
    res["step_ms"] = ms; res["loss_220"] = l.item()
    res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    res["compile_times"] = torch._dynamo.utils.compile_times(repr="str")
except Exception as e:
    res["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
res["process_so_far_s"] = round(time.time() - T0, 2)
res["end_time"] = time.time()
json.dump(res, open(out, "w"), indent=1)
print(variant, kind, {k: v for k, v in res.items() if k != "compile_times"}, flush=True)
