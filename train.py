"""
Drop-Upcycling, step 3: train a dense model, turn it into an MoE, keep training, and compare the inits.

    python train.py                        # the full comparison (--init all) with this machine's preset
    python train.py --init drop --r 0.5    # dense (trained once, then reused), drop-upcycle, train the MoE
    python train.py --sample out/moe-drop-r0.5 --prompt "def "   # print samples from a checkpoint

Read top to bottom:
  1. presets and command line
  2. tokenizer and data: the built-in corpus (this Python installation's source code), token cache, batches
  3. one training run: optimizer, schedule, loop, validation, checkpoints, Ctrl-C
  4. the experiment: dense once, then every requested MoE init from the same dense weights and data order
  5. report: CSVs -> figure (the paper's Fig. 3, top row) and summary table
  6. main: every expected failure becomes one line on stderr and a non-zero exit
"""

import argparse
import csv
import hashlib
import json
import math
import os
import signal
import sys
import sysconfig
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F

from dropupcycle import ModelConfig, Transformer, compile_model, drop_upcycle, flops_per_token

# -----------------------------------------------------------------------------
# 1. Presets and command line

# Every value can be overridden by the flag of the same name (underscores become dashes).
PRESETS = {
    # 2-core laptop CPU: the whole --init all in under 3 minutes. Shows the shape of the experiment (scratch far
    # behind, naive starting lowest, drop starting higher and learning faster); drop r=0.5 only draws level with
    # naive at the last step: too short for a clear crossover.
    "cpu": dict(
        d_model=128, n_layer=2, n_head=4, n_kv_head=4, d_ff=512, n_experts=8, top_k=2, seq_len=128,
        batch_size=16, grad_accum=1,
        dense_steps=400, dense_lr=3e-3, dense_warmup=40,
        moe_steps=240, moe_lr=2e-3, moe_warmup=20,
        eval_interval=40, eval_batches=8, log_interval=20, ckpt_interval=200,
        corpus_mb=8.0, compile=False,
    ),
    # One H100: the whole --init all, compile included, in 4m26s (figures/crossover_summary.md). A small
    # model (4.3M dense params; MoE 26M, 7.5M active) at 65k tokens a step sees many tokens per parameter: the dense
    # model 131M (30 per parameter: trained long, like the paper's dense models), each MoE init 131M, enough for
    # drop r=0.5 to overtake naive Upcycling at about a third of the MoE phase. The learning rates keep the paper's
    # ratios (Appendix A.4): MoE peak 2/3 of the dense peak and about 7x the dense model's final learning rate.
    "gpu": dict(
        d_model=256, n_layer=4, n_head=4, n_kv_head=4, d_ff=1024, n_experts=8, top_k=2, seq_len=512,
        batch_size=128, grad_accum=1,
        dense_steps=2000, dense_lr=3e-3, dense_warmup=100,
        moe_steps=2000, moe_lr=2e-3, moe_warmup=100,
        eval_interval=100, eval_batches=10, log_interval=50, ckpt_interval=1000,
        corpus_mb=0.0, compile=True,
    ),
}
# The paper's recipe (Appendix A.4), the same for every preset
BETAS, ADAM_EPS, MIN_LR_RATIO = (0.9, 0.95), 1e-8, 0.1
VAL_FRACTION = 0.05  # share of files held out for validation
MOE_INITS = ["scratch", "naive", "drop"]
ALL_RUNS = [("scratch", None), ("naive", 0.0), ("drop", 0.5), ("drop", 1.0)]  # --init all, in this order


class Fail(Exception):
    """An expected failure (bad input, missing file, ...): main() prints its message as one line and exits."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; a user needs only the error
        raise Fail(f"{message} (see --help)")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonneg_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonneg_float(text):
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def unit_float(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


# argparse names the converter in its messages ("invalid positive_int value"): say what was expected instead
for _fn, _name in [(positive_int, "integer"), (nonneg_int, "integer"), (positive_float, "number"),
                   (nonneg_float, "number"), (unit_float, "number")]:
    _fn.__name__ = _name


def build_parser():
    p = OneLineParser(
        description="Dense pretraining, then (Drop-)Upcycling to an MoE and continued training; compares MoE inits.",
        epilog="With no arguments: the full comparison (--init all) with the preset for this machine.",
    )
    p.add_argument("--init", choices=["all", "dense", *MOE_INITS], default=None,
                   help="which run: all (default) = dense, then scratch, naive, drop r=0.5, drop r=1.0")
    p.add_argument("--r", type=unit_float, default=None, help="re-initialisation ratio for --init drop (default 0.5)")
    p.add_argument("--independent-indices", action="store_true",
                   help="with --init drop: a separate neuron set S for W_gate, W_up and W_down (the authors' released "
                        "code) instead of one S shared by all three (the paper's text, the default)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="size of the experiment (default: gpu with CUDA, else cpu)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--out-dir", default="out", help="folder for token cache, checkpoints, CSVs, figure and summary")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds the dense init, the data order and the upcycling")
    p.add_argument("--data", default=None, help="text file, folder of text files, or uint16 token file (.bin); default: this Python's source code")
    p.add_argument("--tokenizer", choices=["byte", "gpt2"], default="byte", help="byte (offline, 257 tokens) or gpt2 (tiktoken BPE, needs its files)")
    p.add_argument("--corpus-mb", type=nonneg_float, default=None, help="cap the text corpus at this many MB, half per language (0: no cap)")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (preset default: on for gpu)")
    g = p.add_argument_group("model (override the preset)")
    g.add_argument("--d-model", type=positive_int, help="residual width")
    g.add_argument("--n-layer", type=positive_int, help="number of transformer blocks")
    g.add_argument("--n-head", type=positive_int, help="attention heads")
    g.add_argument("--n-kv-head", type=positive_int, help="key/value heads (fewer than --n-head: grouped-query attention)")
    g.add_argument("--d-ff", type=positive_int, help="FFN intermediate size (of the dense FFN and of each expert)")
    g.add_argument("--n-experts", type=positive_int, help="experts per MoE layer")
    g.add_argument("--top-k", type=positive_int, help="experts per token")
    g.add_argument("--seq-len", type=positive_int, help="tokens per training sequence")
    g = p.add_argument_group("training (override the preset)")
    g.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step")
    g.add_argument("--dense-steps", type=positive_int, help="optimizer steps of the dense phase")
    g.add_argument("--dense-lr", type=positive_float, help="peak learning rate of the dense phase")
    g.add_argument("--dense-warmup", type=nonneg_int, help="linear warmup steps of the dense phase")
    g.add_argument("--moe-steps", type=positive_int, help="optimizer steps of the MoE phase (same for every init)")
    g.add_argument("--moe-lr", type=positive_float, help="peak learning rate of the MoE phase")
    g.add_argument("--moe-warmup", type=nonneg_int, help="linear warmup steps of the MoE phase")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.1, help="AdamW weight decay on weight matrices (not norms)")
    g.add_argument("--grad-clip", type=positive_float, default=1.0, help="clip the global gradient norm to this")
    g.add_argument("--aux-loss-coef", type=nonneg_float, default=0.02, help="weight of the MoE balancing loss")
    g.add_argument("--eval-interval", type=positive_int, help="steps between validation losses")
    g.add_argument("--eval-batches", type=positive_int, help="micro-batches per validation loss")
    g.add_argument("--log-interval", type=positive_int, help="steps between progress lines")
    g.add_argument("--ckpt-interval", type=positive_int, help="steps between checkpoints")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample", metavar="CKPT", help="print samples from a checkpoint (file or run folder) and exit")
    g.add_argument("--prompt", default="def ", help="text the samples start from")
    g.add_argument("--num-samples", type=positive_int, default=2, help="how many samples")
    g.add_argument("--sample-tokens", type=positive_int, default=200, help="tokens per sample")
    g.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)

    # fill every unset value from the preset
    if args.preset is None:
        args.preset = "gpu" if torch.cuda.is_available() and args.device in ("auto", "cuda") or args.device.startswith("cuda:") else "cpu"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.r is not None and args.init != "drop":
        raise Fail(f"--r applies to --init drop only (--init {args.init or 'all'} fixes its own r)")
    if args.independent_indices and args.init != "drop":
        raise Fail(f"--independent-indices applies to --init drop only (got --init {args.init or 'all'})")
    if args.init == "drop" and args.r is None:
        args.r = 0.5
    return args


# -----------------------------------------------------------------------------
# 2. Tokenizer and data

EOT = "<|endoftext|>"
# Byte-level: the 256 single bytes are the whole vocabulary, no merges, so a token is a UTF-8 byte. The split
# pattern only cuts text into pieces for the encoder (lines of at most 128 bytes: fast, never an empty match).
BYTE_PATTERN = r"[^\n]{1,128}\n?|\n"
PY_EXTS = {".py"}
C_EXTS = {".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx", ".cu", ".cuh", ".inl"}


def get_tokenizer(name):
    import tiktoken

    if name == "byte":
        return tiktoken.Encoding(name="byte", pat_str=BYTE_PATTERN,
                                 mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 256})
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # no network, no cached file, proxy error, ...: all mean the same to a user
        reason = str(e).splitlines()[0][:150] if str(e) else type(e).__name__
        raise Fail(f"--tokenizer {name}: tiktoken could not load its BPE files ({reason}); they are downloaded once "
                   f"and cached (TIKTOKEN_CACHE_DIR): go online once, or use the offline --tokenizer byte")


def language_of(path):
    ext = os.path.splitext(path)[1].lower()
    return "python" if ext in PY_EXTS else "c/c++" if ext in C_EXTS else "other"


def stable_hash(text):
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def list_files(data):
    """The files of the corpus as (key, path, size, mtime_ns), key being a machine-independent name.

    Default: the .py and C/C++ files of this Python installation (stdlib, site-packages, headers).
    --data FOLDER: every non-hidden file under it. --data FILE: that file.
    """
    if data is None:
        paths = sysconfig.get_paths()
        roots = []  # (label, folder), each folder once even where sysconfig names it twice
        for label in ("stdlib", "platstdlib", "purelib", "platlib", "include", "platinclude"):
            folder = os.path.realpath(paths.get(label, "") or "/nonexistent")
            if os.path.isdir(folder) and folder not in [f for _, f in roots]:
                roots.append((label, folder))
        wanted = PY_EXTS | C_EXTS
    elif os.path.isdir(data):
        roots, wanted = [("data", data)], None
    else:
        st = os.stat(data)
        return [(os.path.basename(data), data, st.st_size, st.st_mtime_ns)]
    files, seen = [], set()
    for label, root in roots:
        for folder, dirs, names in os.walk(root, onerror=None):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            if data is None and label in ("stdlib", "platstdlib") and folder == root:
                # installed packages come from purelib/platlib only: in a virtual environment the base Python's
                # site-packages (inside stdlib) holds twins of the venv's packages, which would put copies of the
                # same file on both sides of the train/val split
                dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
            for name in sorted(names):
                path = os.path.join(folder, name)
                if name.startswith(".") or (wanted is not None and os.path.splitext(name)[1].lower() not in wanted):
                    continue
                real = os.path.realpath(path)
                if real in seen or not os.path.isfile(real):  # stdlib may contain site-packages: count once
                    continue
                seen.add(real)
                st = os.stat(real)
                files.append((f"{label}/{os.path.relpath(path, root)}", path, st.st_size, st.st_mtime_ns))
    return files


def select_files(files, corpus_mb):
    """Deterministic order (by a hash of each file's name: well mixed, stable as files come and go), an optional
    size cap that keeps every language (half the cap each), and the train/val split by file."""
    files = sorted(files, key=lambda f: (stable_hash(f[0]), f[0]))
    if corpus_mb > 0:
        languages = sorted({language_of(f[0]) for f in files})
        budget = corpus_mb * 1e6 / len(languages)
        kept, used = [], {lang: 0 for lang in languages}
        for f in files:
            lang = language_of(f[0])
            if used[lang] < budget:
                kept.append(f)
                used[lang] += f[2]
        files = kept
    val = [f for f in files if stable_hash("val:" + f[0]) % 10_000 < VAL_FRACTION * 10_000]
    if not val and len(files) > 1:
        val = [files[-1]]  # a small corpus still gets a held-out file
    val_keys = {f[0] for f in val}
    train = [f for f in files if f[0] not in val_keys]
    return train, val


def read_text(path):
    """The file as text, or None for binary files. Invalid UTF-8 bytes become U+FFFD rather than failing."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise Fail(f"cannot read {path}: {e.strerror or e}")
    if b"\0" in raw[:8192]:
        return None
    return raw.decode("utf-8", errors="replace")


def write_tokens(files, enc, out_path, seen):
    """Tokenize files in batches (tiktoken's threads) and append them, each followed by <|endoftext|>, as uint16.

    A file whose text is already in `seen` (hashes of every file written so far, train before val) is skipped:
    a module vendored by several packages would otherwise be trained on and also scored as held-out text.
    """
    n_tokens, n_files, batch, batch_bytes = 0, 0, [], 0
    with open(out_path, "wb") as out:
        def flush():
            nonlocal n_tokens, n_files
            texts, utf8 = [], []
            for text in (read_text(path) for path in batch):
                raw = text.encode("utf-8") if text else b""
                digest = hashlib.sha1(raw).digest()
                if raw and digest not in seen:
                    seen.add(digest)
                    texts.append(text)
                    utf8.append(raw)
            if enc.name == "byte":
                # the byte tokenizer's ids are exactly the UTF-8 bytes (test_dropupcycle.py checks this against tiktoken):
                # numpy gets them 10x faster than tiktoken's Python lists
                encoded = [np.frombuffer(raw, dtype=np.uint8) for raw in utf8]
            else:
                encoded = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
            for ids in encoded:
                np.append(np.asarray(ids, dtype=np.uint16), np.uint16(enc.eot_token)).tofile(out)
                n_tokens += len(ids) + 1
            n_files += len(texts)
            batch.clear()

        for _, path, size, _ in files:
            batch.append(path)
            batch_bytes += size
            if batch_bytes > 16e6 or len(batch) >= 2048:
                flush()
                batch_bytes = 0
        flush()
    return n_tokens, n_files


def load_data(args, enc):
    """Train and val token arrays (memmapped uint16) and a description, built once and cached in out_dir/data.

    The cache's meta.json holds the settings and the file listing's fingerprint it was made with; when they differ
    from the current ones, the cache is rebuilt. meta.json is written last, so a half-built cache is never used.
    """
    vocab = enc.n_vocab
    if args.data is not None and not os.path.exists(args.data):
        raise Fail(f"--data {args.data}: no such file or folder")
    if args.data is not None and os.path.isfile(args.data) and args.data.endswith(".bin"):
        # a pre-tokenized uint16 token file (nanoGPT's format): no files to split by, so the last 5% is val
        size = os.path.getsize(args.data)
        if size < 2 or size % 2:
            raise Fail(f"--data {args.data}: a token file holds uint16 values, but it has {size} bytes")
        tokens = np.memmap(args.data, dtype=np.uint16, mode="r")
        top = int(tokens.max())
        if top >= vocab:
            raise Fail(f"--data {args.data}: token id {top} is outside the vocabulary of --tokenizer {args.tokenizer} "
                       f"({vocab} tokens); was it made with another tokenizer?")
        n_val = max(int(len(tokens) * VAL_FRACTION), args.seq_len + 2)
        train, val = tokens[:-n_val], tokens[-n_val:]
        st = os.stat(args.data)
        fingerprint = hashlib.sha1(f"{os.path.abspath(args.data)}:{size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        info = dict(fingerprint=fingerprint, description=f"token file {args.data}: {len(train):,} train / {len(val):,} val tokens (split by position)")
        return check_split(train, val, args, info)

    try:
        files = list_files(args.data)
    except OSError as e:
        raise Fail(f"--data {args.data}: cannot list files ({e.strerror or e})")
    if not files or sum(f[2] for f in files) == 0:
        raise Fail(f"--data {args.data}: no text files found" if args.data else "no Python or C/C++ sources found in this Python installation; pass --data")
    corpus_mb = args.corpus_mb
    train_files, val_files = select_files(files, corpus_mb)
    source = "python-sources" if args.data is None else os.path.abspath(args.data)
    listing = hashlib.sha1(json.dumps([f[0::2] + (f[3],) for f in train_files + val_files] + [f[0] for f in val_files]).encode())
    settings = dict(format=2, source=source, tokenizer=args.tokenizer, corpus_mb=corpus_mb, val_fraction=VAL_FRACTION,
                    files=listing.hexdigest())
    fingerprint = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    name = "python-sources" if args.data is None else os.path.basename(os.path.normpath(args.data)) or "data"
    cache_dir = os.path.join(args.out_dir, "data", f"{name}-{args.tokenizer}")
    meta_path = os.path.join(cache_dir, "meta.json")
    meta = None
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        if meta is not None and meta.get("settings") != settings:
            changed = sorted(k for k in settings if meta.get("settings", {}).get(k) != settings[k])
            print(f"token cache {cache_dir} was made with other settings ({', '.join(changed)} changed): rebuilding")
            meta = None
        elif meta is not None and any(not os.path.exists(os.path.join(cache_dir, f"{s}.bin")) or
                                      os.path.getsize(os.path.join(cache_dir, f"{s}.bin")) != 2 * meta.get(f"{s}_tokens", -1)
                                      for s in ("train", "val")):
            print(f"token cache {cache_dir} is incomplete: rebuilding")
            meta = None
    if meta is None:
        make_dirs(cache_dir)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        t0 = time.time()
        total_mb = sum(f[2] for f in train_files + val_files) / 1e6
        print(f"tokenizing {len(train_files) + len(val_files):,} files ({total_mb:.1f} MB) into {cache_dir} ...")
        meta, seen = dict(settings=settings), set()
        for split, split_files in (("train", train_files), ("val", val_files)):
            tmp = os.path.join(cache_dir, f"{split}.bin.tmp")
            meta[f"{split}_tokens"], meta[f"{split}_files"] = write_tokens(split_files, enc, tmp, seen)
            os.replace(tmp, os.path.join(cache_dir, f"{split}.bin"))
        langs = {}
        for f in train_files + val_files:
            langs[language_of(f[0])] = langs.get(language_of(f[0]), 0) + 1
        meta["languages"] = langs
        meta["seconds"] = round(time.time() - t0, 1)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        print(f"tokenized in {meta['seconds']:.1f} s")
    if meta["train_tokens"] == 0 and meta["val_tokens"] == 0:
        raise Fail(f"--data {args.data}: no text found (all files empty or binary)")
    if meta["val_tokens"] == 0:
        # a single file (or a single text file among binaries) cannot be split by file: split it by position
        tokens = np.memmap(os.path.join(cache_dir, "train.bin"), dtype=np.uint16, mode="r")
        n_val = max(int(len(tokens) * VAL_FRACTION), args.seq_len + 2)
        train, val, how = tokens[:-n_val], tokens[-n_val:], "one file: split by position"
    else:
        train = np.memmap(os.path.join(cache_dir, "train.bin"), dtype=np.uint16, mode="r") if meta["train_tokens"] else np.zeros(0, np.uint16)
        val = np.memmap(os.path.join(cache_dir, "val.bin"), dtype=np.uint16, mode="r")
        how = "split by file"
    langs = ", ".join(f"{n:,} {lang}" for lang, n in sorted(meta.get("languages", {}).items()))
    desc = (f"{'this Python installation' if args.data is None else args.data}: {meta['train_files'] + meta['val_files']:,} "
            f"files ({langs}), {len(train):,} train / {len(val):,} val tokens ({how}; cache {cache_dir})")
    return check_split(train, val, args, dict(fingerprint=fingerprint, description=desc))


def check_split(train, val, args, info):
    for split, tokens in (("train", train), ("val", val)):
        if len(tokens) < args.seq_len + 2:
            raise Fail(f"the {split} split has only {len(tokens):,} tokens, fewer than --seq-len + 2 = {args.seq_len + 2}: "
                       f"give more data or a smaller --seq-len")
    return train, val, info


def get_batch(tokens, batch_size, seq_len, rng, device):
    """batch_size random windows of seq_len + 1 tokens -> inputs x and next-token targets y, [B, T] each."""
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    chunk = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    if device.type == "cuda":
        chunk = chunk.pin_memory().to(device, non_blocking=True)  # overlaps the copy with the running step
    return chunk[:, :-1], chunk[:, 1:]


def step_rng(seed, phase, step):
    # The data of a step is a function of (seed, phase, step) alone: every MoE init sees the same batches, and a
    # resumed run continues the data stream exactly without saving any loader state.
    return np.random.default_rng([seed, {"dense": 0, "moe": 1}[phase], step])


# -----------------------------------------------------------------------------
# 3. One training run

STOP = {"signal": None, "training": False}  # set by the SIGINT/SIGTERM handler, read once per step


def on_signal(signum, frame):
    if STOP["training"] and STOP["signal"] is None:
        STOP["signal"] = signum  # finish this step, save a checkpoint, exit
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step (again to quit now)",
              flush=True)
    else:
        raise KeyboardInterrupt  # outside training, or a second Ctrl-C: stop at once


def lr_at(step, max_steps, peak, warmup):
    """Linear warmup to peak, then cosine decay to MIN_LR_RATIO * peak at max_steps (Appendix A.4)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model, lr, weight_decay, device):
    # decay the weight matrices (embeddings, projections, experts, router), not the norms' gains
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=ADAM_EPS, fused=device.type == "cuda")


def autocast(device):
    # bf16 on the GPU (norms and the loss stay fp32 inside the model); plain fp32 on the CPU: exact and reproducible
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model, val_batches, device):
    """Mean next-token cross-entropy on fixed held-out windows: the language-modelling loss alone, without the
    balancing term that the model adds to its training loss, so dense and every MoE are comparable."""
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in val_batches:
        with autocast(device):
            logits, _ = model(x)
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    model.train()
    return (total / len(val_batches)).item()


def gpu_peak_flops(device):
    """bf16 dense peak of the GPU (for MFU), or None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
        if key in name:
            return peak
    return None


def make_dirs(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise Fail(f"cannot create folder {path}: {e.strerror or e}")


def atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(state, path):
    """Write to a temporary file, flush it to disk, then rename over the old checkpoint: a crash or a full disk
    during the save leaves the previous checkpoint as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise Fail(f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint is unchanged")
        raise


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise Fail(f"checkpoint {path} is unreadable (truncated or corrupt: {reason}); delete it to start that run over")
    if not isinstance(ckpt, dict) or not {"model", "settings", "step"} <= set(ckpt):
        raise Fail(f"checkpoint {path} is not a train.py checkpoint; delete it to start that run over")
    return ckpt


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def settings_diff(old, new):
    old, new = flatten(old), flatten(new)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys[:6]) + (" ..." if len(keys) > 6 else "")


CSV_FIELDS = ["step", "tokens", "train_loss", "val_loss", "aux_loss", "lr", "time"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Run:
    """One training run (the dense model, or one MoE init): its folder, settings and schedule."""

    def __init__(self, name, phase, model_cfg, settings, args):
        self.name, self.phase, self.model_cfg, self.settings = name, phase, model_cfg, settings
        self.dir = os.path.join(args.out_dir, name)
        self.ckpt_path = os.path.join(self.dir, "ckpt.pt")
        self.csv_path = os.path.join(self.dir, "log.csv")
        self.result_path = os.path.join(self.dir, "result.json")
        self.steps = args.dense_steps if phase == "dense" else args.moe_steps
        self.lr = args.dense_lr if phase == "dense" else args.moe_lr
        self.warmup = args.dense_warmup if phase == "dense" else args.moe_warmup

    def existing(self, args):
        """The run's checkpoint if one exists and matches the current settings; None if there is none.
        Refuses (Fail) a checkpoint made with other settings rather than mixing results."""
        if not os.path.exists(self.ckpt_path):
            return None
        ckpt = load_checkpoint(self.ckpt_path)
        if ckpt["settings"] != self.settings:
            raise Fail(f"{self.dir} holds a run with other settings ({settings_diff(ckpt['settings'], self.settings)}); "
                       f"use another --out-dir, or delete {self.dir} to replace it")
        if not ckpt.get("finished") and not args.resume:
            raise Fail(f"{self.dir} holds an unfinished run (step {ckpt['step']}/{self.steps}): pass --resume to "
                       f"continue it, or delete {self.dir} to start it over")
        return ckpt


def train_run(run, model, train_model, args, data, device, ckpt=None):
    """Train model from its current weights (or from ckpt, an unfinished checkpoint) for run.steps steps.

    model is the module, train_model the same module or its torch.compile wrapper. Writes log.csv, checkpoints
    and result.json into run.dir; returns the result dict.
    """
    train_tokens, val_batches = data
    cfg = run.model_cfg
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    optimizer = make_optimizer(model, run.lr, args.weight_decay, device)
    start_step, elapsed = 0, 0.0
    make_dirs(run.dir)
    if ckpt is not None:  # --resume: weights, optimizer, RNG, clock; the data stream follows from the step
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        start_step, elapsed = ckpt["step"], ckpt["elapsed"]
        rows = [r for r in read_csv(run.csv_path) if int(r["step"]) <= start_step] if os.path.exists(run.csv_path) else []
        print(f"[{run.name}] resuming at step {start_step}/{run.steps}")
    else:
        rows = []
    with open(run.csv_path, "w", newline="") as f:  # rewrite: drops rows logged after the checkpoint
        csv.DictWriter(f, CSV_FIELDS).writeheader()
        csv.DictWriter(f, CSV_FIELDS).writerows(rows)
    with open(os.path.join(run.dir, "settings.json"), "w") as f:
        json.dump(run.settings, f, indent=1)
    csv_file = open(run.csv_path, "a", newline="")
    writer = csv.DictWriter(csv_file, CSV_FIELDS)

    flops = flops_per_token(cfg, args.seq_len)
    peak = gpu_peak_flops(device)
    last_saved = start_step if ckpt is not None else None

    def checkpoint(step, finished=False):
        nonlocal last_saved
        state = dict(model=model.state_dict(), settings=run.settings, step=step, finished=finished,
                     model_config=asdict(cfg), tokenizer=args.tokenizer, elapsed=elapsed + time.time() - t_start,
                     rng=dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
        if not finished:  # a finished run is only ever reused or sampled: no optimizer state needed (half the size)
            state["optimizer"] = optimizer.state_dict()
        save_checkpoint(state, run.ckpt_path)
        last_saved = step

    def log_row(step, train_loss="", val_loss="", aux="", lr=""):
        writer.writerow(dict(step=step, tokens=step * tokens_per_step, train_loss=train_loss, val_loss=val_loss,
                             aux_loss=aux, lr=lr, time=round(elapsed + time.time() - t_start, 3)))
        csv_file.flush()

    t_start = time.time()
    if start_step == 0:
        val = evaluate(train_model, val_batches, device)  # the loss at the upcycling point, before any MoE step
        log_row(0, val_loss=repr(val))
        print(f"[{run.name}] step 0/{run.steps} | val {val:.4f}")
    pending = []  # (step, ce, aux) tensors since the last progress line: read back with one device sync
    t_interval, steady_tokens, steady_time, interval_index = time.time(), 0, 0.0, 0
    last_lr, result_val = 0.0, None
    STOP["training"] = True
    try:
        for step in range(start_step, run.steps):
            lr = lr_at(step, run.steps, run.lr, run.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rng = step_rng(args.seed, run.phase, step)
            ce_sum, aux_sum = 0.0, 0.0
            for _ in range(args.grad_accum):
                x, y = get_batch(train_tokens, args.batch_size, args.seq_len, rng, device)
                with autocast(device):
                    _, loss = train_model(x, y)
                (loss / args.grad_accum).backward()
                # log the cross-entropy alone (comparable with dense), the balancing loss separately
                aux = model.aux_loss if cfg.is_moe else None
                ce = loss.detach() - cfg.aux_loss_coef * aux if aux is not None else loss.detach()
                ce_sum = ce_sum + ce / args.grad_accum
                aux_sum = aux_sum + (aux / args.grad_accum if aux is not None else 0.0)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            pending.append((done, ce_sum, aux_sum))
            last_lr = lr

            is_eval = done % args.eval_interval == 0 or done == run.steps
            is_ckpt = done % args.ckpt_interval == 0 or done == run.steps or STOP["signal"] is not None
            if done % args.log_interval == 0 or is_eval or is_ckpt:
                # one sync: the losses since the last line; a NaN stops the run before it can reach a checkpoint
                losses = torch.stack([torch.as_tensor(c, device=device).float() for _, c, _ in pending]).cpu()
                bad = (~torch.isfinite(losses)).nonzero()
                if len(bad):
                    bad_step = pending[bad[0, 0].item()][0]
                    kept = f"the last good checkpoint ({run.ckpt_path}, step {last_saved}) is kept" if last_saved is not None else "no checkpoint had been written yet"
                    raise Fail(f"[{run.name}] loss became {losses[bad[0, 0]].item()} at step {bad_step}: stopping; {kept}. "
                               f"Try a lower learning rate (--{run.phase}-lr {run.lr / 3:.2g}) in a fresh --out-dir")
                train_loss = losses.mean().item()
                aux_mean = torch.stack([torch.as_tensor(a, device=device).float() for _, _, a in pending]).mean().item() if cfg.is_moe else None
                now = time.time()
                interval_time, interval_tokens = now - t_interval, len(pending) * tokens_per_step
                if interval_index > 0:  # the first interval of a process includes warm-up (and compilation)
                    steady_tokens, steady_time = steady_tokens + interval_tokens, steady_time + interval_time
                interval_index += 1
                tok_s = interval_tokens / interval_time
                mfu = f" | MFU {flops * tok_s / peak:.1%}" if peak else ""
                rate = steady_time / steady_tokens * tokens_per_step if steady_tokens else interval_time / len(pending)
                aux_text = f" | aux {aux_mean:.3f}" if aux_mean is not None else ""
                print(f"[{run.name}] step {done}/{run.steps} | loss {train_loss:.4f}{aux_text} | lr {lr:.2e} | "
                      f"{tok_s / 1e3:,.1f}k tok/s{mfu} | ETA {fmt_time(rate * (run.steps - done))}", flush=True)
                val_loss = ""
                if is_eval:
                    result_val = evaluate(train_model, val_batches, device)
                    if not math.isfinite(result_val):
                        raise Fail(f"[{run.name}] validation loss became {result_val} at step {done}: stopping; "
                                   f"the last good checkpoint ({run.ckpt_path}, step {last_saved}) is kept")
                    val_loss = repr(result_val)
                    print(f"[{run.name}] step {done}/{run.steps} | val {result_val:.4f}", flush=True)
                log_row(done, repr(train_loss), val_loss, repr(aux_mean) if aux_mean is not None else "", repr(lr))
                pending = []
                t_interval = time.time()  # evaluation time is not training time
                if (is_ckpt or STOP["signal"] is not None) and done < run.steps:  # a signal may have come meanwhile
                    checkpoint(done)
                if STOP["signal"] is not None and done < run.steps:
                    signum = STOP["signal"]
                    csv_file.close()
                    print(f"[{run.name}] stopped at step {done}/{run.steps}; checkpoint saved to {run.ckpt_path}. "
                          f"Continue with the same command plus --resume", flush=True)
                    raise SystemExit(128 + signum)
    finally:
        STOP["training"] = False
    csv_file.close()
    wall = elapsed + time.time() - t_start
    tok_s = steady_tokens / steady_time if steady_time else run.steps * tokens_per_step / max(wall, 1e-9)
    result = dict(name=run.name, final_val_loss=result_val, steps=run.steps, tokens=run.steps * tokens_per_step,
                  wall_time=round(wall, 1), tokens_per_s=round(tok_s), mfu=round(flops * tok_s / peak, 4) if peak else None,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", last_lr=last_lr)
    atomic_write_text(run.result_path, json.dumps(result, indent=1))
    checkpoint(run.steps, finished=True)
    print(f"[{run.name}] done: val {result_val:.4f}, {fmt_time(wall)}, {tok_s / 1e3:,.1f}k tok/s")
    if STOP["signal"] is not None:  # the signal came during the last step: this run is complete, stop here
        raise SystemExit(128 + STOP["signal"])
    return result


# -----------------------------------------------------------------------------
# 4. The experiment


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


def model_configs(args, vocab_size):
    try:
        dense = ModelConfig(vocab_size=vocab_size, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                            n_kv_head=args.n_kv_head, d_ff=args.d_ff, max_seq_len=args.seq_len,
                            aux_loss_coef=args.aux_loss_coef)
        if args.n_experts < 2:
            raise ValueError(f"an MoE needs at least 2 experts, got --n-experts {args.n_experts}")
        moe = replace(dense, n_experts=args.n_experts, top_k=args.top_k)
    except ValueError as e:
        raise Fail(f"invalid model shape: {e}")
    return dense, moe


def planned_inits(args):
    if args.init in (None, "all"):
        return list(ALL_RUNS)
    if args.init == "dense":
        return []
    return [(args.init, {"scratch": None, "naive": 0.0, "drop": args.r}[args.init])]


def run_name(init, r, shared_indices=True):
    # independent index sets get their own folder, so both variants of one r can sit side by side
    return (f"moe-drop-r{r:g}" + ("" if shared_indices else "-indep")) if init == "drop" else f"moe-{init}"


def common_settings(args, data_info):
    return dict(data=data_info["fingerprint"], tokenizer=args.tokenizer, seed=args.seed, seq_len=args.seq_len,
                batch_size=args.batch_size, grad_accum=args.grad_accum, weight_decay=args.weight_decay,
                grad_clip=args.grad_clip, betas=list(BETAS), eps=ADAM_EPS, min_lr_ratio=MIN_LR_RATIO)


def maybe_compile(model, args, check_batch, name):
    """model itself, or its torch.compile wrapper once that is seen to compute the same function on one
    validation batch (else a warning, and eager mode: slower, never wrong). The whole model is one graph,
    MoE layers included (dropupcycle.compile_model says what it takes to keep them right)."""
    if not args.compile:
        return model
    compiled = compile_model(model)
    x, y = check_batch
    model.eval()
    with torch.no_grad(), autocast(model.embed.weight.device):
        losses = [F.cross_entropy(m(x)[0].float().view(-1, model.config.vocab_size), y.reshape(-1)).item() for m in (model, compiled)]
    model.train()
    print(f"[{name}] torch.compile check on a validation batch: loss {losses[1]:.4f} compiled, {losses[0]:.4f} eager")
    if not abs(losses[1] - losses[0]) < 0.005:  # bf16 differences are ~1e-3
        print(f"[{name}] WARNING: the compiled model disagrees with eager mode: training this model without compile")
        return model
    return compiled


def experiment(args):
    device = resolve_device(args.device)
    if args.compile and device.type != "cuda":
        print("note: --compile on the CPU needs a C++ compiler and mostly measures compile time")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    enc = get_tokenizer(args.tokenizer)
    dense_cfg, moe_cfg = model_configs(args, enc.n_vocab)
    inits = planned_inits(args)
    make_dirs(args.out_dir)
    if not os.access(args.out_dir, os.W_OK):
        raise Fail(f"--out-dir {args.out_dir}: folder is not writable")

    what = {None: "no --init given: running the full comparison (--init all)", "all": "--init all"}.get(args.init, f"--init {args.init}")
    print(f"{what} | preset {args.preset} | device {device}{' | compile' if args.compile else ''} | out {args.out_dir}")
    names = ["dense"] + [run_name(i, r, not args.independent_indices) for i, r in inits]
    print("runs: " + ", ".join(names))
    if args.resume and not any(os.path.exists(os.path.join(args.out_dir, name, "ckpt.pt")) for name in names):
        raise Fail(f"--resume: no checkpoint in {args.out_dir} for these runs (nothing to resume); run without --resume")
    train_tokens, val_tokens, data_info = load_data(args, enc)
    print(f"data: {data_info['description']}")

    # fixed validation windows (independent of --seed): every run and every seed is scored on the same text
    val_rng = np.random.default_rng(1234)
    val_batches = [get_batch(val_tokens, args.batch_size, args.seq_len, val_rng, device) for _ in range(args.eval_batches)]
    data = (train_tokens, val_batches)

    common = common_settings(args, data_info)
    dense_settings = dict(phase="dense", model=asdict(dense_cfg), steps=args.dense_steps, lr=args.dense_lr,
                          warmup=args.dense_warmup, **common)
    dense_run = Run("dense", "dense", dense_cfg, dense_settings, args)
    moe_runs = []
    for init, r in inits:
        settings = dict(phase="moe", init=init, r=r, model=asdict(moe_cfg), steps=args.moe_steps, lr=args.moe_lr,
                        warmup=args.moe_warmup, shared_indices=not args.independent_indices, dense=dense_settings if init != "scratch" else None,
                        **common)
        moe_runs.append(Run(run_name(init, r, settings["shared_indices"]), "moe", moe_cfg, settings, args))
    # check every existing checkpoint before any work: settings mismatches and corrupt files fail fast
    existing = {run.name: run.existing(args) for run in [dense_run] + moe_runs}

    dense_model = Transformer(dense_cfg)
    n_dense = dense_model.num_params()
    moe_probe = Transformer(moe_cfg) if moe_runs else None
    print(f"dense: {n_dense / 1e6:.2f}M params" + (f" | MoE: {moe_probe.num_params() / 1e6:.2f}M params, "
                                                    f"{moe_probe.num_params(active=True) / 1e6:.2f}M active" if moe_probe else ""))
    del moe_probe
    t_all = time.time()

    # Phase 1: the dense model. Trained once; any later command with the same settings reuses it.
    needs_dense_weights = any(run.settings["init"] != "scratch" and not (existing[run.name] or {}).get("finished") for run in moe_runs)
    ckpt = existing["dense"]
    if ckpt is not None and ckpt.get("finished"):
        print(f"[dense] reusing the finished dense model in {dense_run.dir}")
        dense_model.load_state_dict(ckpt["model"])
        dense_model.to(device)
    else:
        torch.manual_seed(args.seed)
        dense_model = Transformer(dense_cfg).to(device)
        train_run(dense_run, dense_model, maybe_compile(dense_model, args, val_batches[0], "dense"), args, data, device, ckpt)
    del ckpt
    if not needs_dense_weights:
        dense_model = dense_model.to("cpu")

    # Phase 2: every MoE init, each from the same dense weights, with the same data stream and step count.
    # One MoE module is trained in turn with each init's weights, so torch.compile compiles it once.
    moe_model, moe_train_model = None, None
    for i, run in enumerate(moe_runs):
        ckpt = existing[run.name]
        if ckpt is not None and ckpt.get("finished"):
            print(f"[{run.name}] reusing the finished run in {run.dir}")
            continue
        print(f"--- MoE run {i + 1}/{len(moe_runs)}: {run.name} ({fmt_time(time.time() - t_all)} so far)")
        if moe_model is None:
            moe_model = Transformer(moe_cfg).to(device)
        init, r = run.settings["init"], run.settings["r"]
        if ckpt is None:
            if init == "scratch":  # Sec. 4: every weight N(0, 0.02), router included
                torch.manual_seed(args.seed + 1)
                start = Transformer(moe_cfg)
            else:  # naive Upcycling is r = 0
                start = drop_upcycle(dense_model, n_experts=args.n_experts, top_k=args.top_k, r=r, seed=args.seed,
                                     shared_indices=run.settings["shared_indices"])
            moe_model.load_state_dict(start.state_dict())
            del start
        if moe_train_model is None:  # compiled once, after the first init's weights are in
            moe_train_model = maybe_compile(moe_model, args, val_batches[0], run.name)
        train_run(run, moe_model, moe_train_model, args, data, device, ckpt)
        if init == "naive" and ckpt is None:  # identical experts compute the dense FFN: same loss at the start
            start_val, dense_val = val_curve(run.csv_path)[2][0], val_curve(dense_run.csv_path)[2][-1]
            print(f"[{run.name}] check: naive Upcycling starts at val {start_val:.4f}; the dense model ended at {dense_val:.4f}")
        del ckpt
    report(args, dense_run, moe_runs)
    print(f"total time {fmt_time(time.time() - t_all)}")


# -----------------------------------------------------------------------------
# 5. Report: figure and summary table from the runs' CSVs


LABELS = {"moe-scratch": "MoE from scratch", "moe-naive": "naive Upcycling (r=0)"}
COLORS = {"dense": "black", "moe-scratch": "tab:gray", "moe-naive": "tab:blue", "moe-drop-r0.5": "tab:green",
          "moe-drop-r1": "tab:red"}
OTHER_COLORS = ["tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def color_of(name, runs):
    """The fixed colour of an --init all run; the other runs of a figure (another r, independent sets) take the
    remaining colours in their order in runs, so that up to six of them never share one (and never take
    matplotlib's default cycle, which starts with naive Upcycling's blue)."""
    others = [run for run in runs if run not in COLORS]
    return COLORS.get(name) or OTHER_COLORS[others.index(name) % len(OTHER_COLORS)]


def val_curve(csv_path):
    rows = [r for r in read_csv(csv_path) if r["val_loss"]]
    return np.array([int(r["step"]) for r in rows]), np.array([int(r["tokens"]) for r in rows]), np.array([float(r["val_loss"]) for r in rows])


def overtake_step(steps, diff):
    """First evaluation step from which diff (this init minus naive) stays below zero to the end, or None."""
    above = np.nonzero(diff >= 0)[0]
    first = 0 if len(above) == 0 else above[-1] + 1
    return int(steps[first]) if first < len(steps) else None


def report(args, dense_run, moe_runs):
    """Figure and summary of the dense run and every finished MoE run in out_dir that shares its settings
    (the ones trained now and any trained before with the same dense model and MoE settings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    candidates = [run_name(i, r) for i, r in ALL_RUNS] + [run.name for run in moe_runs]
    template = moe_runs[0].settings if moe_runs else None
    for name in candidates:
        folder = os.path.join(args.out_dir, name)
        if name in runs or not os.path.exists(os.path.join(folder, "result.json")):
            continue
        with open(os.path.join(folder, "settings.json")) as f:
            settings = json.load(f)
        if template is None or {k: v for k, v in settings.items() if k not in ("init", "r", "dense", "shared_indices")} != \
                {k: v for k, v in json.loads(json.dumps(template)).items() if k not in ("init", "r", "dense", "shared_indices")}:
            continue  # trained with other settings: not comparable
        runs[name] = folder
    if not os.path.exists(dense_run.result_path):
        return
    with open(dense_run.result_path) as f:
        results = {"dense": json.load(f)}
    curves = {"dense": val_curve(dense_run.csv_path)}
    for name, folder in runs.items():
        with open(os.path.join(folder, "result.json")) as f:
            results[name] = json.load(f)
        curves[name] = val_curve(os.path.join(folder, "log.csv"))
    dense_tokens = results["dense"]["tokens"]

    # summary table
    naive = curves.get("moe-naive")
    lines = ["| run | final val loss | vs naive | overtakes naive at step (tokens) | wall time | tokens/s | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        steps, tokens, loss = curves[name]
        vs, cross = "", ""
        if naive is not None and name not in ("dense", "moe-naive") and len(steps) == len(naive[0]) and np.array_equal(steps, naive[0]):
            vs = f"{loss[-1] - naive[2][-1]:+.4f}"
            s = overtake_step(steps, loss - naive[2])
            cross = "never" if s is None else f"{s} ({s * res['tokens'] / res['steps'] / 1e6:.1f}M)"
        mfu = f"{res['mfu']:.1%}" if res.get("mfu") else "n/a"
        lines.append(f"| {name} | {res['final_val_loss']:.4f} | {vs} | {cross} | {fmt_time(res['wall_time'])} | "
                     f"{res['tokens_per_s'] / 1e3:,.0f}k | {mfu} |")
    device = results["dense"]["device"]
    header = (f"Validation loss (cross-entropy, nats/token, {args.tokenizer} tokenizer) after {results['dense']['steps']} dense steps "
              f"({dense_tokens / 1e6:.1f}M tokens) and {args.moe_steps} MoE steps "
              f"({args.moe_steps * args.batch_size * args.seq_len * args.grad_accum / 1e6:.1f}M tokens); device {device}, seed {args.seed}.")
    table = header + "\n\n" + "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(args.out_dir, "summary.md"), table)
    print("\n" + table)

    # figure: (left) loss against tokens, dense then every MoE init, as the paper's Fig. 3 top row, with an inset
    # on the second half of the MoE phase; (right) each init's loss minus naive Upcycling's: the crossover is where
    # a curve goes below zero
    fig, (ax, ax_zoom, ax_diff) = plt.subplots(1, 3, figsize=(19, 5.5), gridspec_kw=dict(width_ratios=[1.2, 1, 1]))
    label_of = lambda name: LABELS.get(name, f"Drop-Upcycling (r={name.split('-r')[-1]})")
    d_steps, d_tokens, d_loss = curves["dense"]
    for a in (ax, ax_zoom):
        a.plot(d_tokens / 1e6, d_loss, color=color_of("dense", runs), label="dense")
        for name in runs:
            steps, tokens, loss = curves[name]
            a.plot((dense_tokens + tokens) / 1e6, loss, color=color_of(name, runs), label=label_of(name))
        a.axvline(dense_tokens / 1e6, color="black", ls=":", lw=1)
        a.set_xlabel("training tokens (M): dense phase, then MoE phase")
        a.grid(alpha=0.3)
    ax.text(dense_tokens / 1e6, 0.02, " upcycling", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
    # y range: from the best loss up to the dense loss a tenth into its training (the first steps are off the chart)
    everything = np.concatenate([d_loss] + [curves[name][2] for name in runs])
    lo, hi = everything.min(), d_loss[min(len(d_loss) - 1, max(1, len(d_loss) // 10))]
    ax.set_ylim(lo - 0.03 * (hi - lo), hi)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("dense, then each MoE init: validation loss")
    ax.legend(fontsize=8, loc="upper right")
    # zoom: from the upcycling point on, y range set by the upcycled inits after their first tenth of the MoE phase
    upcycled = [name for name in runs if name != "moe-scratch"] or list(runs)
    window = [v for name in upcycled for v in curves[name][2][max(1, len(curves[name][2]) // 10):]] or list(d_loss[-3:])
    pad = 0.08 * (max(window) - min(window)) + 1e-4
    ax_zoom.set_ylim(min(window) - pad, max(window) + pad)
    ax_zoom.set_xlim(dense_tokens / 1e6 - 0.03 * args.moe_steps * results["dense"]["tokens"] / results["dense"]["steps"] / 1e6,
                     None)
    ax_zoom.set_title("zoom on the MoE phase")
    if naive is not None and len(runs) > 1:
        finals = []
        for name in runs:
            steps, tokens, loss = curves[name]
            if name == "moe-naive" or not np.array_equal(steps, naive[0]):
                continue
            diff = loss - naive[2]
            ax_diff.plot(tokens / 1e6, diff, color=color_of(name, runs), label=label_of(name), marker=".", ms=3)
            if name != "moe-scratch":
                finals.append((name != "moe-drop-r0.5", abs(diff[-1])))  # drop r=0.5's final gap sorts first
            s = overtake_step(steps, diff)
            if name == "moe-drop-r0.5" and s is not None:
                x = s * results[name]["tokens"] / results[name]["steps"] / 1e6
                ax_diff.axvline(x, color=color_of(name, runs), ls=":", lw=1)
                ax_diff.annotate(f"overtakes naive at step {s}\n({x:.3g}M tokens)", (x, 0), xytext=(6, -28),
                                 textcoords="offset points", fontsize=8, color=color_of(name, runs))
        ax_diff.axhline(0, color=color_of("moe-naive", runs), lw=1, label=label_of("moe-naive"))
        # symmetric log scale: linear within +-linthresh (the small final gaps), logarithmic beyond (the large
        # differences right after upcycling), so both are readable in one panel
        linthresh = max(2 * min(finals)[1] if finals else 0.0, 1e-3)
        ax_diff.set_yscale("symlog", linthresh=linthresh, linscale=1.5)
        ax_diff.axhspan(-linthresh, linthresh, color="0.95", zorder=0)
        ax_diff.set_xlabel("MoE-phase tokens (M)")
        ax_diff.set_ylabel(f"val loss minus naive Upcycling's (symlog; linear within +-{linthresh:.2g})")
        ax_diff.set_title("difference to naive Upcycling (below 0: better than naive)")
        ax_diff.legend(fontsize=8)
        ax_diff.grid(alpha=0.3)
    else:
        ax_diff.axis("off")
        ax_diff.text(0.5, 0.5, "run --init naive too (or --init all)\nto see the difference to naive Upcycling",
                     ha="center", va="center", transform=ax_diff.transAxes)
    fig.suptitle(header, fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out_dir, "loss_curves.png")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"figure: {path} | summary: {os.path.join(args.out_dir, 'summary.md')} | CSVs: {args.out_dir}/*/log.csv")


# -----------------------------------------------------------------------------
# 6. Sampling and main


def sample(args):
    path = os.path.join(args.sample, "ckpt.pt") if os.path.isdir(args.sample) else args.sample
    if not os.path.exists(path):
        raise Fail(f"--sample {args.sample}: no checkpoint there")
    ckpt = load_checkpoint(path)
    device = resolve_device(args.device)
    enc = get_tokenizer(ckpt.get("tokenizer", "byte"))
    model = Transformer(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    prompt = enc.encode_ordinary(args.prompt) or [enc.eot_token]
    torch.manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    with autocast(device):
        out = model.generate(idx, args.sample_tokens, temperature=args.temperature, top_k=50)
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i + 1} ({path}, step {ckpt['step']})")
        print(enc.decode([t for t in row if t < enc.n_vocab], errors="replace"))


def main(argv=None):
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    STOP["signal"] = None
    prog = os.path.basename(sys.argv[0]) if argv is None else "train.py"
    args = None
    try:
        args = parse_args(argv)
        if args.sample:
            sample(args)
        else:
            experiment(args)
    except Fail as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.OutOfMemoryError as e:
        print(f"{prog}: error: {oom_message(args, e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (checkpoints already on disk are kept; --resume continues from them)", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def oom_message(args, e):
    where = ""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        where = f"; GPU {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated by PyTorch, {total / 2**30:.1f} GiB total"
    tokens = args.batch_size * args.seq_len
    return (f"CUDA out of memory with micro-batches of {args.batch_size} x {args.seq_len} = {tokens:,} tokens "
            f"(d_model {args.d_model}, {args.n_layer} layers, {args.n_experts} experts){where}. Try --batch-size "
            f"{max(1, args.batch_size // 2)} --grad-accum {args.grad_accum * 2} (same tokens per step) or a smaller model")


if __name__ == "__main__":
    main()
