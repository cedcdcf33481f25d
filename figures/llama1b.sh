#!/usr/bin/env bash
# A Llama-3.2-1B-shaped model drop-upcycled to 8 experts on one GPU: the conversion (hf.py), Hugging Face's
# MixtralForCausalLM reading the result, and continued training (train.py --dense-from). The weights are random and
# the tokenizer a 128,256-word whitespace vocabulary (no download is possible where this was run): the numbers are
# time, memory and speed, not loss. Results: figures/llama1b.md. Run from the repository root:
#     bash figures/llama1b.sh [WORK_DIR]
set -euo pipefail
work=${1:-/tmp/llama1b}
mkdir -p "$work"
python - "$work" <<'PY'
import json, os, sys, torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM
work = sys.argv[1]
cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192),
                  max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(f"{work}/llama")
vocab = {w: i for i, w in enumerate(["<unk>"] + [f"w{i}" for i in range(128255)])}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save(f"{work}/llama/tokenizer.json")
print(f"Llama-3.2-1B shape: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, bf16")
PY
for r in 0.5 0; do
  /usr/bin/time -f "hf.py drop-upcycle r=$r: %e s wall, peak host memory %M KB" \
    python hf.py drop-upcycle "$work/llama" "$work/mixtral-r$r" --r $r --n-experts 8 --top-k 2 --seed 0
done
du -sh "$work/llama" "$work/mixtral-r0.5"
python - "$work" <<'PY'
import sys, torch
from transformers import LlamaForCausalLM, MixtralForCausalLM
work = sys.argv[1]
x = torch.randint(0, 128000, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
with torch.no_grad():
    dense = LlamaForCausalLM.from_pretrained(f"{work}/llama", torch_dtype=torch.float32).cuda()
    ref = dense(x).logits
    del dense
    moe = MixtralForCausalLM.from_pretrained(f"{work}/mixtral-r0", torch_dtype=torch.float32).cuda()
    out = moe(x).logits
err = ((out - ref).norm() / ref.norm()).item()
print(f"transformers MixtralForCausalLM of the r = 0 conversion vs the dense Llama (fp32, 2x256 tokens): "
      f"max |diff| {(out - ref).abs().max().item():.2e}, relative {err:.2e}")
PY
for bs in 8 4 2; do
  if python train.py --dense-from "$work/llama" --init drop --r 0.5 --data :stdlib --corpus-mb 8 --seq-len 2048 \
      --batch-size $bs --moe-steps 30 --moe-warmup 5 --eval-interval 30 --eval-batches 2 --log-interval 10 \
      --no-compile --out-dir "$work/train-bs$bs"; then break; fi
done
