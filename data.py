"""
The data of train.py: tokenizers, the built-in corpus, the token cache and the batches.

    python data.py                      # build the token cache of the cpu preset's corpus and describe it
    python data.py --data my_text/      # the same for a folder of text files

The built-in corpora are source code that every Python installation carries, so they work offline:
  :stdlib   the standard library's .py files and C headers: the same files on every machine with the same
            Python version, so a whole class trains on the same text (the cpu preset's corpus)
  :python   the standard library plus every installed package (site-packages): much more text, but it depends
            on what is installed (the gpu preset's corpus)
Every corpus gets a short fingerprint of its tokens, printed in each summary, so two runs are comparable at a
glance. Text is split into training and validation by file (5% of the files), or by position when there is a
single file. Tokens are cached in OUT_DIR/data/ as uint16 (uint32 for vocabularies above 65,536 tokens).
Also the tools' expected failures (Fail), their command lines' one-line errors (OneLineParser) and checked
number types (positive_int and the like).
"""

import argparse
import difflib
import hashlib
import json
import math
import os
import stat
import sysconfig
import time

import ctrl_c

if __name__ == "__main__":  # Ctrl-C from here on, the seconds of slow imports included: ctrl_c.py
    ctrl_c.install()

import numpy as np
import torch

EOT = "<|endoftext|>"
# Byte-level: the 256 single bytes are the whole vocabulary, no merges, so a token is a UTF-8 byte. The split
# pattern only cuts text into pieces for the encoder (lines of at most 128 bytes: fast, never an empty match).
BYTE_PATTERN = r"[^\n]{1,128}\n?|\n"
PY_EXTS = {".py"}
C_EXTS = {".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx", ".cu", ".cuh", ".inl"}
BUILTIN_CORPORA = (":stdlib", ":python")
VAL_FRACTION = 0.05  # share of files (or, for one file, of tokens) held out for validation
CACHE_FORMAT = 3


class Fail(Exception):
    """An expected failure (bad input, missing file, full disk, ...): the tools print its message as one line
    and exit non-zero."""


class OneLineParser(argparse.ArgumentParser):
    """The tools' command lines: a bad flag is a Fail, one line, where argparse prints the usage and the error."""
    see = "--help"  # where the error sends the user

    def error(self, message):
        raise Fail(f"{message} (see {self.see})")

    def parse_args(self, args=None, namespace=None):
        opts, extras = self.parse_known_args(args, namespace)
        if extras:
            raise Fail(f"{unrecognized(extras, self.flags(opts))} (see {self.see})")
        return opts

    def flags(self, opts=None):
        """This parser's --flags, and those of the sub-command that opts chose (a parser of this class too)."""
        found = []
        for action in self._actions:
            found += [o for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse._SubParsersAction) and getattr(opts, action.dest, None) in action.choices:
                found += action.choices[getattr(opts, action.dest)].flags(opts)
        return found


def unrecognized(extras, flags):
    """The error for the arguments no parser took: each unknown flag with the nearest of flags, then any stray
    argument. The words after an unknown flag are left out: argparse cannot tell its values from the positionals
    it then takes them for (`export --dtpye bf16 SRC OUT` reads bf16 as SRC and leaves OUT over)."""
    def is_flag(word):
        try:
            float(word)
            return False
        except ValueError:
            return word.startswith("-")

    unknown, stray, positional_only = [], [], False
    for word in extras:
        option = word.split("=")[0]  # (--flag=value)
        if word == "--" and not positional_only:  # argparse's "no more flags" marker
            positional_only = True
        elif option in flags and not positional_only:  # a real flag left over was read as an argument:
            positional_only = True  # it came after a "--" that a sub-command's parser drops from its leftovers
            stray.append(word)
        elif is_flag(word) and not positional_only:
            unknown.append(option)
        elif not unknown or positional_only:
            stray.append(word)
    if not unknown:
        return f"unrecognized arguments: {' '.join(extras)}"
    by_name = {f.lstrip("-"): f for f in flags}
    named = []
    for flag in unknown:
        name = flag.lstrip("-")
        near = ([name] if name in by_name else []  # -moe-steps: --moe-steps
                or [n for n in by_name if n.startswith(name)][:2]  # --model: --models
                or [n for n in by_name if name in n.split("-")][:2]  # --lr: --dense-lr, --moe-lr
                or difflib.get_close_matches(name, by_name, n=1, cutoff=0.65))
        named.append(flag + (f" (did you mean {' or '.join(by_name[n] for n in near)}?)" if near else ""))
    text = f"unrecognized option{'s' * (len(named) > 1)} {', '.join(named)}"
    return text + (f"; unrecognized argument{'s' * (len(stray) > 1)} {' '.join(stray)}" if stray else "")


def number(kind, ok, expected, below=2**31):
    """An argparse type: a finite kind (int or float) for which ok(value) holds, else 'must be <expected>'.
    Numbers stay below `below`, 2**31 unless given, which every seed, size and step count fits: larger ones fail
    late and obscurely."""
    def convert(text):
        value = kind(text)
        if not ok(value) or math.isinf(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        if abs(value) >= below:
            raise argparse.ArgumentTypeError(f"must be below {below:,}, got {text}")
        return value
    convert.__name__ = "integer" if kind is int else "number"  # argparse names the type in its messages
    return convert


positive_int = number(int, lambda v: v >= 1, "a positive integer")
nonneg_int = number(int, lambda v: v >= 0, "0 or more")
positive_float = number(float, lambda v: v > 0, "a positive number")
nonneg_float = number(float, lambda v: v >= 0, "0 or more")
unit_float = number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
byte_count = number(int, lambda v: v >= 1, "a positive integer", below=2**63)  # a file size


# -----------------------------------------------------------------------------
# Tokenizers


TOKENIZERS = ("byte", "gpt2")  # the --tokenizer choices
TOKENIZER_HELP = "byte (offline, 257 tokens) or gpt2 (tiktoken BPE, needs its files)"


def get_tokenizer(name):
    """byte (offline, 257 tokens) or a tiktoken BPE name such as gpt2 (needs its files, downloaded once)."""
    import tiktoken

    if name == "byte":
        return tiktoken.Encoding(name="byte", pat_str=BYTE_PATTERN,
                                 mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 256})
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # no network, no cached file, proxy error, ...: all mean the same to a user
        raise Fail(f"--tokenizer {name}: tiktoken could not load its BPE files ({first_line(e, 150)}); they are "
                   f"downloaded once and cached (TIKTOKEN_CACHE_DIR): go online once, or use the offline --tokenizer "
                   f"byte")


def hf_tokenizer_name(path):
    """A tokenizer.json's name in the token cache and the runs' settings: by its content, not its folder."""
    return "hf-" + file_sha1(path)[:8]


class HFTokenizer:
    """A Hugging Face tokenizer.json (through the `tokenizers` library) with the few methods of tiktoken's
    Encoding that this project uses, so a pretrained model trains on text cut the way it was trained on."""

    def __init__(self, folder, eot_token=None):
        from tokenizers import Tokenizer

        path = os.path.join(folder, "tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:
            raise Fail(f"{path}: not a readable tokenizer.json ({first_line(e, 100)})")
        self.name = hf_tokenizer_name(path)
        self.n_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        self.eot_token = eot_token if eot_token is not None else self.n_vocab - 1

    def encode_ordinary(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts, num_threads=None):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, errors=None):
        return self.tok.decode(ids, skip_special_tokens=False)


def token_dtype(n_vocab):
    return np.uint16 if n_vocab <= 2**16 else np.uint32


# -----------------------------------------------------------------------------
# The corpus: which files, in which order, train or validation


def language_of(path):
    ext = os.path.splitext(path)[1].lower()
    return "python" if ext in PY_EXTS else "c/c++" if ext in C_EXTS else "other"


def stable_hash(text):
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def list_files(data, exclude=None):
    """The files of the corpus as (key, path, size, mtime_ns), key being a machine-independent name.

    data: ":stdlib" or ":python" (see the module docstring), a folder (every non-hidden file under it) or a file.
    exclude: a folder left out (train.py's --out-dir, when it lies inside --data: its caches are no corpus).
    """
    if data in BUILTIN_CORPORA:
        paths = sysconfig.get_paths()
        labels = ("stdlib", "include") if data == ":stdlib" else ("stdlib", "platstdlib", "purelib", "platlib", "include", "platinclude")
        roots = []  # (label, folder), each folder once even where sysconfig names it twice
        for label in labels:
            folder = os.path.realpath(paths.get(label, "") or "/nonexistent")
            if os.path.isdir(folder) and folder not in [f for _, f in roots]:
                roots.append((label, folder))
        wanted = PY_EXTS | C_EXTS
    elif os.path.isdir(data):
        roots, wanted = [("data", data)], None
    else:
        st = os.stat(data)
        return [(os.path.basename(data), data, st.st_size, st.st_mtime_ns)]
    exclude = os.path.realpath(exclude) if exclude else None
    files, seen = [], set()
    for label, root in roots:
        root = os.path.realpath(root)
        cut = len(os.path.join(root, ""))  # a key is the path after the root's separator ("/" has one already)
        # os.walk does not enter linked folders, so every folder it gives under a real root is a real path, and
        # so is every file in it that is not a link itself: only links need os.path.realpath (a stat per part)
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                             and os.path.join(folder, d) != exclude)
            if label in ("stdlib", "platstdlib") and folder == root:
                # installed packages come from purelib/platlib only (or not at all, for :stdlib): in a virtual
                # environment the base Python's site-packages holds twins of the venv's packages
                dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
            for name in sorted(names):
                path = os.path.join(folder, name)
                if name.startswith(".") or (wanted is not None and os.path.splitext(name)[1].lower() not in wanted):
                    continue
                real = os.path.realpath(path) if os.path.islink(path) else path
                if real in seen:  # stdlib may contain site-packages, a link may point at a listed file: count once
                    continue
                try:
                    st = os.stat(real)
                except OSError:  # a broken link
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                seen.add(real)
                files.append((f"{label}/{path[cut:]}", path, st.st_size, st.st_mtime_ns))
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
    if len(files) < 2:
        return files, []  # one file cannot be split by file: load_data splits its tokens by position
    val = [f for f in files if stable_hash("val:" + f[0]) % 10_000 < VAL_FRACTION * 10_000] or [files[-1]]
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


# -----------------------------------------------------------------------------
# The token cache


def write_tokens(files, enc, out_path, seen):
    """Tokenize files in batches (tiktoken's threads) and write them, each followed by <|endoftext|>.

    A file whose text is already in `seen` (hashes of every file written so far, train before val) is skipped:
    a module vendored by several packages would otherwise be trained on and also scored as held-out text.
    Returns (tokens, files) written.
    """
    dtype = token_dtype(enc.n_vocab)
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
                # the byte tokenizer's ids are exactly the UTF-8 bytes (a test checks this against tiktoken):
                # numpy gets them 10x faster than tiktoken's Python lists
                encoded = [np.frombuffer(raw, dtype=np.uint8) for raw in utf8]
            else:
                encoded = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
            for ids in encoded:
                # out.write, not ndarray.tofile: tofile loses the error of a full disk and leaves the file short
                out.write(np.append(np.asarray(ids, dtype=dtype), dtype(enc.eot_token)).tobytes())
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


def file_sha1(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokens_sha1(cache_dir, enc):
    """The fingerprint of the cached tokens themselves: equal on two machines exactly when the text is equal."""
    h = hashlib.sha1(enc.name.encode())
    for split in ("train", "val"):
        h.update(file_sha1(os.path.join(cache_dir, f"{split}.bin")).encode())
    return h.hexdigest()


def read_meta(meta_path):
    """The cache's meta.json as a dict, or None (with a warning) when it is missing, unreadable or foreign."""
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if isinstance(meta, dict) and isinstance(meta.get("settings"), dict) and \
                all(isinstance(meta.get(k), int) for k in ("train_tokens", "val_tokens", "train_files", "val_files")):
            return meta
    except (OSError, ValueError):
        pass
    print(f"warning: {meta_path} is damaged or not a token cache's: rebuilding the cache")
    return None


def build_cache(cache_dir, splits, enc, settings):
    """Tokenize the (train, val) file lists into cache_dir and write meta.json last, so that a half-built cache
    is never used. A full disk ends with one line and leaves no half-written file behind."""
    meta_path = os.path.join(cache_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    t0 = time.time()
    train_files, val_files = splits
    total_mb = sum(f[2] for f in train_files + val_files) / 1e6
    n_files = len(train_files) + len(val_files)
    print(f"tokenizing {n_files:,} file{'s' * (n_files != 1)} ({total_mb:.1f} MB) into {cache_dir} ...")
    meta, seen, tmp = dict(settings=settings), set(), None
    try:
        for split, split_files in (("train", train_files), ("val", val_files)):
            tmp = os.path.join(cache_dir, f"{split}.bin.tmp")
            meta[f"{split}_tokens"], meta[f"{split}_files"] = write_tokens(split_files, enc, tmp, seen)
            os.replace(tmp, os.path.join(cache_dir, f"{split}.bin"))
        tmp = None
        meta["tokens_sha1"] = tokens_sha1(cache_dir, enc)
        langs = {}
        for f in train_files + val_files:
            langs[language_of(f[0])] = langs.get(language_of(f[0]), 0) + 1
        meta["languages"] = langs
        meta["seconds"] = round(time.time() - t0, 1)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise Fail(f"could not write the token cache in {cache_dir} ({e.strerror or e})")
    print(f"tokenized in {meta['seconds']:.1f} s")
    return meta


def corpus_name(data):
    return data[1:] if data in BUILTIN_CORPORA else os.path.basename(os.path.normpath(data)) or "data"


def check_data_exists(data, flag="--data"):
    if data not in BUILTIN_CORPORA and not os.path.exists(data):
        builtin = f" (the built-in corpora are {' and '.join(BUILTIN_CORPORA)})" if data.startswith(":") else ""
        raise Fail(f"{flag} {data}: no such file or folder{builtin}")


def first_line(e, limit=120):
    """An exception's message cut to one line for a one-line error, or its type's name where it has none."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def os_error_text(e):
    """An OSError in one line: 'path: reason', or the reason alone where it names no file (a full disk)."""
    return f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)


def exit_on_one_line(prog, main):
    """main() of a tool run as a script: a Fail or an OSError (--out not writable, a full disk) ends it with one
    line, `prog: error: ...`, and exit status 1."""
    try:
        return main()
    except Fail as e:
        raise SystemExit(f"{prog}: error: {e}")
    except OSError as e:
        raise SystemExit(f"{prog}: error: {os_error_text(e)}")


def load_data(data, tokenizer, enc, out_dir, corpus_mb, seq_len):
    """(train tokens, val tokens, info), memmapped, built once and cached in out_dir/data.

    info: fingerprint (16 hex digits of the tokens: what a run's results depend on) and a one-line description.
    The cache's meta.json holds the settings and file listing it was made with; when they differ from the
    current ones, the cache is rebuilt.
    """
    check_data_exists(data)
    if os.path.isfile(data) and data.endswith(".bin"):
        return load_token_file(data, tokenizer, enc, seq_len)
    if os.path.isdir(data) and os.path.realpath(data) == os.path.realpath(out_dir):
        raise Fail(f"--out-dir {out_dir} is the --data folder itself: its caches and checkpoints would become corpus; "
                   f"use a subfolder (e.g. --out-dir {os.path.join(data, 'out')}) or another folder")
    try:
        files = list_files(data, exclude=out_dir)
    except OSError as e:
        raise Fail(f"--data {data}: cannot list files ({e.strerror or e})")
    if not files or sum(f[2] for f in files) == 0:
        raise Fail(f"--data {data}: no text files found" if data not in BUILTIN_CORPORA else
                   "no Python or C/C++ sources found in this Python installation; pass --data")
    train_files, val_files = select_files(files, corpus_mb)
    source = data if data in BUILTIN_CORPORA else os.path.abspath(data)
    # its digest changes when a file is added, removed, changed, or moved between the splits
    listing = [(key, size, mtime) for key, _, size, mtime in train_files + val_files] + [f[0] for f in val_files]
    settings = dict(format=CACHE_FORMAT, source=source, tokenizer=tokenizer, corpus_mb=corpus_mb,
                    val_fraction=VAL_FRACTION, files=hashlib.sha1(json.dumps(listing).encode()).hexdigest())
    cache_dir = os.path.join(out_dir, "data", f"{corpus_name(data)}-{tokenizer}")
    meta_path = os.path.join(cache_dir, "meta.json")
    meta = read_meta(meta_path)
    dtype = token_dtype(enc.n_vocab)
    if meta is not None and meta["settings"] != settings:
        changed = sorted(k for k in settings if meta["settings"].get(k) != settings[k])
        print(f"token cache {cache_dir} was made with other settings ({', '.join(changed)} changed): rebuilding")
        meta = None
    elif meta is not None and any(not os.path.exists(os.path.join(cache_dir, f"{s}.bin")) or
                                  os.path.getsize(os.path.join(cache_dir, f"{s}.bin")) != np.dtype(dtype).itemsize * meta[f"{s}_tokens"]
                                  for s in ("train", "val")):
        print(f"token cache {cache_dir} is incomplete: rebuilding")
        meta = None
    elif meta is not None and meta.get("tokens_sha1") != tokens_sha1(cache_dir, enc):
        # the right size, other tokens (a damaged or foreign file): its ids may lie outside the vocabulary, and
        # the fingerprint in every run's identity would claim text it does not hold
        print(f"warning: the token cache in {cache_dir} (train.bin, val.bin) does not match its meta.json: rebuilding")
        meta = None
    if meta is None:
        make_dirs(cache_dir)
        meta = build_cache(cache_dir, (train_files, val_files), enc, settings)
    if meta["train_tokens"] == 0 and meta["val_tokens"] == 0:
        raise Fail(f"--data {data}: no text found (all files empty or binary)")
    open_split = lambda s: np.memmap(os.path.join(cache_dir, f"{s}.bin"), dtype=dtype, mode="r") if meta[f"{s}_tokens"] else np.zeros(0, dtype)
    if meta["val_tokens"] == 0 or meta["train_tokens"] == 0:
        # one file (or one text file among binaries) cannot be split by file: split its tokens by position
        train, val = split_by_position(open_split("train" if meta["train_tokens"] else "val"), seq_len)
        empty = "validation" if meta["train_tokens"] else "training"
        how = ("one file" if meta["train_files"] + meta["val_files"] == 1 else f"no text in the {empty} files") + \
            ": split by position"
    else:
        train, val, how = open_split("train"), open_split("val"), "split by file"
    langs = ", ".join(f"{n:,} {'other text' if lang == 'other' else lang}"
                      for lang, n in sorted(meta.get("languages", {}).items()))
    what = {":stdlib": "this Python's standard library", ":python": "this Python installation"}.get(data, data)
    fingerprint = meta.get("tokens_sha1", "")[:16]
    written, listed = meta["train_files"] + meta["val_files"], sum(meta.get("languages", {}).values())
    left_out = f" listed; {listed - written:,} empty, binary or duplicate left out" if listed > written else ""
    desc = (f"{what}: {written:,} file{'s' * (written != 1)} ({langs}{left_out}), {len(train):,} train / "
            f"{len(val):,} val tokens ({how}; fingerprint {fingerprint[:8]}; cache {cache_dir})")
    return check_split(train, val, seq_len, dict(fingerprint=fingerprint, description=desc))


def load_token_file(path, tokenizer, enc, seq_len):
    """A pre-tokenized uint16 token file (nanoGPT's format): no files to split by, so the last 5% is val."""
    if enc.n_vocab > 2**16:
        raise Fail(f"--data {path}: a token file holds uint16 ids, too narrow for this tokenizer's {enc.n_vocab:,} "
                   f"tokens; give the text (a folder or a file) instead")
    size = os.path.getsize(path)
    if size < 2 or size % 2:
        raise Fail(f"--data {path}: a token file holds uint16 values, but it has {size} bytes")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    top = int(tokens.max())
    if top >= enc.n_vocab:
        raise Fail(f"--data {path}: token id {top} is outside the vocabulary of --tokenizer {tokenizer} "
                   f"({enc.n_vocab} tokens); was it made with another tokenizer?")
    train, val = split_by_position(tokens, seq_len)
    fingerprint = file_sha1(path)[:16]
    info = dict(fingerprint=fingerprint, description=f"token file {path}: {len(train):,} train / {len(val):,} val "
                                                     f"tokens (split by position; fingerprint {fingerprint[:8]})")
    return check_split(train, val, seq_len, info)


def split_by_position(tokens, seq_len):
    """The last VAL_FRACTION of the tokens (at least one window) as validation, the rest as training."""
    n_val = max(int(len(tokens) * VAL_FRACTION), seq_len + 2)
    return tokens[:-n_val], tokens[-n_val:]


def check_split(train, val, seq_len, info):
    for split, tokens in (("train", train), ("val", val)):
        if len(tokens) < seq_len + 2:
            raise Fail(f"the {split} split has only {len(tokens):,} tokens, fewer than --seq-len + 2 = {seq_len + 2}: "
                       f"give more data or a smaller --seq-len")
    return train, val, info


# -----------------------------------------------------------------------------
# Batches


def get_batch(tokens, batch_size, seq_len, rng, device, part=(0, 1)):
    """batch_size random windows of seq_len + 1 tokens -> inputs x and next-token targets y, [B, T] each.
    part=(rank, world): rank's contiguous share of the same batch_size windows (B = batch_size / world).

    tokens: the memmapped array, gathered on the host; or, on a GPU, the same tokens as a tensor there
    (corpus_to_device): then only the window starts cross to the GPU and the host never waits for it.
    """
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    share = batch_size // part[1]
    starts = starts[part[0] * share:(part[0] + 1) * share]
    if isinstance(tokens, torch.Tensor):
        starts = torch.from_numpy(starts)
        if tokens.is_cuda:
            starts = starts.pin_memory().to(tokens.device, non_blocking=True)
        chunk = tokens[starts[:, None] + torch.arange(seq_len + 1, device=tokens.device)].long()
        return chunk[:, :-1], chunk[:, 1:]
    chunk = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    if device.type == "cuda":
        chunk = chunk.pin_memory().to(device, non_blocking=True)  # overlaps the copy with the running step
    return chunk[:, :-1], chunk[:, 1:]


GPU_CORPUS_SHARE = 0.1  # the training tokens move to the GPU when they take at most this share of its free memory


def corpus_to_device(tokens, device):
    """The training tokens as an int32 tensor on the GPU when they fit easily (the same windows as the host path,
    without a host gather and copy in every step), else the memmapped array as it is."""
    if device.type != "cuda" or 4 * len(tokens) > GPU_CORPUS_SHARE * torch.cuda.mem_get_info(device)[0]:
        return tokens
    return torch.from_numpy(np.asarray(tokens).astype(np.int32)).to(device)


# -----------------------------------------------------------------------------
# Files


def make_dirs(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise Fail(f"cannot create folder {path}: {e.strerror or e}")


def atomic_write_text(path, text):
    """Write through a temporary file and rename: readers see the old or the new file, never half of one. A full
    disk ends with one line and leaves the old file and no temporary one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise Fail(f"could not write {path} ({e.strerror or e})")


if __name__ == "__main__":
    p = OneLineParser(prog="data.py", description="Build the token cache of a corpus and describe it.")
    p.add_argument("--data", default=":stdlib", help=":stdlib (default), :python, a folder, a text file or a uint16 "
                   ".bin token file")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="byte", help=TOKENIZER_HELP)
    p.add_argument("--corpus-mb", type=nonneg_float, default=8.0, help="size cap in MB, half per language (0: none)")
    p.add_argument("--out-dir", default="out")

    def main():
        a = p.parse_args()
        print(load_data(a.data, a.tokenizer, get_tokenizer(a.tokenizer), a.out_dir, a.corpus_mb, seq_len=128)[2]
              ["description"])
    exit_on_one_line("data.py", main)
