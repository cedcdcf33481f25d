"""Where python train.py's time outside its training goes on the GPU machine: imports, CUDA set-up, listing and
tokenizing the corpus, the copy to the GPU, and the interpreter's exit after a compiled, graphed model.

Run from the repository root: BEFORE=DIR OUT=DIR PYTHONPATH=. python figures/startup_trials.py (DIR: a copy of the
code before the faster list_files, whose listing is timed beside the current one)."""
import json, os, subprocess, sys, tempfile, time
T0 = time.time()
import torch
T1 = time.time()
import train, data, gpus  # noqa
T2 = time.time()
out = dict(import_torch=T1 - T0, import_train=T2 - T1)
t = time.time(); torch.zeros(1, device="cuda"); torch.cuda.synchronize(); out["cuda_init"] = time.time() - t
import importlib.util
spec = importlib.util.spec_from_file_location("data_before", os.environ["BEFORE"] + "/data.py")
before = importlib.util.module_from_spec(spec); spec.loader.exec_module(before)
for name, mod in (("list_files_before", before), ("list_files_now", data), ("list_files_now_again", data)):
    t = time.time(); n = len(mod.list_files(":python")); out[name] = time.time() - t
out["files"] = n
enc = data.get_tokenizer("byte")
tmp = tempfile.mkdtemp()
t = time.time(); tr, va, info = data.load_data(":python", "byte", enc, tmp, 0.0, 512); out["load_data_cold"] = time.time() - t
t = time.time(); tr, va, info = data.load_data(":python", "byte", enc, tmp, 0.0, 512); out["load_data_cached"] = time.time() - t
t = time.time(); dev = data.corpus_to_device(tr, torch.device("cuda")); torch.cuda.synchronize(); out["corpus_to_device"] = time.time() - t
print(json.dumps(out), flush=True)
child = r'''
import time, torch, train, dropupcycle as du
from dataclasses import replace
cfg = du.ModelConfig(vocab_size=257, d_model=256, n_layer=4, n_head=4, n_kv_head=4, d_ff=1024, max_seq_len=512, n_experts=8)
m = du.Transformer(cfg).cuda()
c = du.compile_model(m, mode="reduce-overhead")
opt = train.make_optimizer(m, 1e-3, 0.1, torch.device("cuda"))
x = torch.randint(0, 257, (128, 512), device="cuda")
for _ in range(4):
    train.begin_step(c)
    with train.autocast(torch.device("cuda")):
        c(x, x)[1].backward()
    opt.step(); opt.zero_grad(set_to_none=True)
torch.cuda.synchronize()
print("END", time.time(), flush=True)
'''
for label in ("exit_after_graphs",):
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=150)
    end = time.time()
    last = [l for l in r.stdout.splitlines() if l.startswith("END")]
    out[label] = end - float(last[0].split()[1]) if last else r.stderr[-500:]
print(json.dumps(out), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "startup_trials_h200.json"), "w"), indent=1)
