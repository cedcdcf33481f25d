set -u
# re-score the seed-0 reference's finished checkpoints per validation batch (the same windows the runs used)
python - <<'PY'
import json, os, numpy as np, torch, data, train
from dropupcycle import ModelConfig, Transformer
out = "out/ref0"; args = train.parse_args(["--out-dir", out]); dev = torch.device("cuda")
enc = data.get_tokenizer("byte")
_, val_tokens, _ = data.load_data(args.data, args.tokenizer, enc, out, args.corpus_mb, args.seq_len)
rng = np.random.default_rng(train.VAL_WINDOWS_SEED)
val = [data.get_batch(val_tokens, args.batch_size, args.seq_len, rng, dev) for _ in range(args.eval_batches)]
for name in sorted(os.listdir(out)):
    ck, res = os.path.join(out, name, "ckpt.pt"), os.path.join(out, name, "result.json")
    if not (os.path.exists(ck) and os.path.exists(res)): continue
    c = train.load_checkpoint(ck); m = Transformer(ModelConfig(**c["model_config"])); m.load_state_dict(c["model"]); m.to(dev)
    mean, se, batches = train.evaluate(m, val, dev)
    r = json.load(open(res)); print(name, "logged", r["final_val_loss"], "re-scored", mean)
    r["final_val_batches"] = batches; json.dump(r, open(res, "w"), indent=1)
PY
python train.py --out-dir out/ref0 2>&1 | tail -12
for seed in 1 2; do
  (python train.py --init naive --seed $seed --out-dir out/ref$seed && \
   python train.py --init drop --r 0.5 --seed $seed --out-dir out/ref$seed && \
   python train.py --init drop --r 0.5 --independent-indices --seed $seed --out-dir out/ref$seed) > $OUT/seed$seed.log 2>&1 &
done
wait
for seed in 1 2; do tail -9 $OUT/seed$seed.log; done
tar czf $OUT/refs.tgz out/ref*/*/log.csv out/ref*/*/result.json out/ref*/*/settings.json out/ref*/summary.md out/ref*/loss_curves.png
