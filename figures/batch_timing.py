"""Trial (not part of the product): host time of one get_batch on a GPU corpus, window starts through .pin_memory()
(the code before) against a pinned buffer from PyTorch's cache (data.to_device)."""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import numpy as np
import torch
import data

dev = torch.device("cuda")
tokens = torch.randint(0, 256, (1 << 26,), dtype=torch.int32, device=dev)


def before(tokens, batch_size, seq_len, rng):
    starts = torch.from_numpy(rng.integers(0, len(tokens) - seq_len - 1, size=batch_size))
    starts = starts.pin_memory().to(tokens.device, non_blocking=True)
    chunk = tokens[starts[:, None] + torch.arange(seq_len + 1, device=tokens.device)].long()
    return chunk[:, :-1], chunk[:, 1:]


def per_call_us(fn, n=3000):
    rng = np.random.default_rng(0)
    for _ in range(100):
        fn(tokens, 128, 512, rng)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(tokens, 128, 512, rng)
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t) / n


res = {}
for rnd in range(3):
    res[f"pin_memory_us_{rnd}"] = per_call_us(before)
    res[f"cached_pinned_us_{rnd}"] = per_call_us(lambda t, b, s, r: data.get_batch(t, b, s, r, dev))
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ["OUT"], "batch_timing.json"), "w"), indent=1)
