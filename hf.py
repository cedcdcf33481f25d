"""
Hugging Face checkpoints in and out: a dense Llama in, a Drop-Upcycled Mixtral out.

    python hf.py drop-upcycle LLAMA_DIR OUT_DIR --r 0.5 --n-experts 8 --top-k 2 --seed 0 [--independent-indices] [--dtype bf16]
    python hf.py export CKPT_OR_RUN_DIR OUT_DIR [--dtype bf16]     # a train.py checkpoint (or run folder) -> HF folder

From Python:

    from dropupcycle import drop_upcycle
    from hf import load_hf, save_hf
    dense = load_hf("path/to/Llama-3.2-1B")            # LlamaForCausalLM, MistralForCausalLM or MixtralForCausalLM
    save_hf(drop_upcycle(dense, r=0.5), "out")         # dense -> LlamaForCausalLM, MoE -> MixtralForCausalLM

A folder is config.json plus model.safetensors, or shards listed in model.safetensors.index.json. Only what
dropupcycle.Transformer can compute is accepted: no biases, SiLU, RoPE plain or of Llama 3's type, no sliding
window; anything else is refused with one line naming the field, never silently approximated. The files are
read and written with safetensors (huggingface_hub only to download a hub id); transformers is not used.

On disk, Mixtral keeps one tensor per expert (block_sparse_moe.experts.{j}.w1/w2/w3 = gate/down/up) and the
router as block_sparse_moe.gate; transformers 5.x renames them in memory, so this file works with the files only.
"""

import json
import os
import shutil
import sys

import ctrl_c

if __name__ == "__main__":  # Ctrl-C from here on, the seconds of slow imports included: ctrl_c.py
    ctrl_c.install()

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data import (Fail, HFTokenizer, OneLineParser, byte_count, first_line, nonneg_int, os_error_text, positive_int,
                  unit_float)
from dropupcycle import LLAMA3_ROPE_KEYS, ModelConfig, Transformer, rope_cos_sin, upcycled_config, upcycled_ffns
from runs import load_model, tokenizer_dir_of

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral"}
# transformers' class defaults, for fields a config.json may leave out
DEFAULTS = {
    "llama": dict(rope_theta=1e4, rms_norm_eps=1e-6, sliding_window=None),
    "mistral": dict(rope_theta=1e4, rms_norm_eps=1e-6, sliding_window=4096),
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None),
}
DEFAULT_SHARD_BYTES = 5 * 10**9
# what drop-upcycle carries over from the source folder unchanged, so that the Mixtral is usable as it is
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class HFError(ValueError):
    """A checkpoint this file cannot represent or read; the message is one line naming the field or file."""


# -----------------------------------------------------------------------------
# Names: ours <-> Hugging Face's on-disk names


def hf_names(cfg):
    """(HF name, our state-dict name, expert index or None) for every weight, in the order files hold them."""
    names = [("model.embed_tokens.weight", "embed.weight", None)]
    for i in range(cfg.n_layer):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        names.append((hf + "input_layernorm.weight", ours + "attn_norm.weight", None))
        names += [(hf + f"self_attn.{n}_proj.weight", ours + f"attn.{n}.weight", None) for n in "qkvo"]
        names.append((hf + "post_attention_layernorm.weight", ours + "ffn_norm.weight", None))
        if not cfg.is_moe:
            names += [(hf + f"mlp.{n}_proj.weight", ours + f"ffn.{n}.weight", None) for n in ("gate", "up", "down")]
        else:
            names.append((hf + "block_sparse_moe.gate.weight", ours + "ffn.router.weight", None))
            for j in range(cfg.n_experts):  # Mixtral's w1, w2, w3 are gate, down, up
                names += [(hf + f"block_sparse_moe.experts.{j}.{w}.weight", ours + f"ffn.{n}", j)
                          for w, n in (("w1", "gate"), ("w2", "down"), ("w3", "up"))]
    names.append(("model.norm.weight", "norm.weight", None))
    if not cfg.tie_embeddings:  # a tied lm_head is the embedding, written once
        names.append(("lm_head.weight", "lm_head.weight", None))
    return names


# -----------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(c, max_seq_len=None):
    """ModelConfig from a config.json dict; HFError, one line, for anything Transformer would compute differently
    or that is not what transformers writes (a field of another type)."""
    try:
        return read_hf_config(c, max_seq_len)
    except HFError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # a list where a number goes, ...
        raise HFError(f"config.json: a field of an unexpected type ({type(e).__name__}: {first_line(e)})") from None


def read_hf_config(c, max_seq_len):
    if not isinstance(c, dict):
        raise HFError(f"config.json: holds a {type(c).__name__}, not the fields of a model")
    archs = c.get("architectures") or [c.get("model_type")]
    if not isinstance(archs, list) or not all(isinstance(a, (str, type(None))) for a in archs):
        raise HFError(f"architectures: {archs!r} is not a list of class names")
    arch = ARCHITECTURES.get(archs[0]) or (archs[0] if archs[0] in DEFAULTS else None)
    if len(archs) != 1 or arch is None:
        raise HFError(f"architectures: {archs} is not supported (LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM)")
    defaults = DEFAULTS[arch]

    def need(key):
        if key not in c:
            raise HFError(f"field {key} is missing")  # the except below names config.json
        return c[key]

    if c.get("hidden_act", "silu") != "silu":
        raise HFError(f"hidden_act: {c['hidden_act']!r} is not supported (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise HFError(f"{key}: true is not supported (Llama/Mixtral without biases only)")
    if c.get("sliding_window", defaults["sliding_window"]) is not None:
        raise HFError(f"sliding_window: {c.get('sliding_window', defaults['sliding_window'])} is not supported (only null: full attention)")
    if not isinstance(c.get("tie_word_embeddings") or False, bool):  # bool("false") would be true
        raise HFError(f"tie_word_embeddings: {c['tie_word_embeddings']!r} is not true or false")
    if c.get("router_jitter_noise"):
        raise HFError(f"router_jitter_noise: {c['router_jitter_noise']} is not supported (only 0)")

    # RoPE: transformers 4.x writes rope_theta and rope_scaling, 5.x rope_parameters holding both
    rope = c.get("rope_parameters") or dict(c.get("rope_scaling") or {}, rope_theta=c.get("rope_theta", defaults["rope_theta"]))
    if not isinstance(rope, dict):
        raise HFError(f"rope_parameters or rope_scaling: {rope!r} is not a mapping of RoPE settings")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "llama3":
        rope_scaling = {"rope_type": "llama3", **{k: rope.get(k) for k in LLAMA3_ROPE_KEYS}}
    else:
        raise HFError(f"rope_scaling: type {rope_type!r} is not supported (only default and llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"partial_rotary_factor: {rope['partial_rotary_factor']} is not supported (only 1.0)")

    moe = arch == "mixtral"
    try:
        return ModelConfig(
            vocab_size=need("vocab_size"), d_model=need("hidden_size"), n_layer=need("num_hidden_layers"),
            n_head=need("num_attention_heads"), n_kv_head=c.get("num_key_value_heads") or need("num_attention_heads"),
            d_ff=need("intermediate_size"), d_head=c.get("head_dim"),
            max_seq_len=max_seq_len or need("max_position_embeddings"),
            rope_theta=float(rope.get("rope_theta", defaults["rope_theta"])), rope_scaling=rope_scaling,
            norm_eps=float(c.get("rms_norm_eps", defaults["rms_norm_eps"])),
            tie_embeddings=c.get("tie_word_embeddings") or False,
            n_experts=need("num_local_experts") if moe else 1, top_k=need("num_experts_per_tok") if moe else 2,
            aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)) if moe else ModelConfig.aux_loss_coef,
        )
    except (ValueError, TypeError) as e:
        raise HFError(f"config.json: {e}") from None


def config_to_hf(cfg, dtype):
    """config.json for cfg, RoPE written in both 4.x (rope_theta, rope_scaling) and 5.x (rope_parameters) spelling."""
    rope_scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    c = dict(
        architectures=["MixtralForCausalLM" if cfg.is_moe else "LlamaForCausalLM"],
        model_type="mixtral" if cfg.is_moe else "llama",
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=rope_scaling,
        rope_parameters=dict(rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta),
        attention_bias=False, attention_dropout=0.0, tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=DTYPE_NAMES[dtype], dtype=DTYPE_NAMES[dtype], use_cache=True,
    )
    if cfg.is_moe:  # ours, not Mixtral's defaults (0.001 and no balancing loss at all)
        c.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_loss_coef,
                 output_router_logits=True, router_jitter_noise=0.0, sliding_window=None)
    else:
        c.update(mlp_bias=False)
    return c


# -----------------------------------------------------------------------------
# Reading


def resolve(path_or_id):
    """A local folder as is; a hub id ("org/name", not a folder here) downloaded with huggingface_hub."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if "/" not in path_or_id or os.path.isabs(path_or_id) or path_or_id.startswith(".") or os.path.exists(path_or_id):
        raise HFError(f"{path_or_id}: not a folder")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", *TOKENIZER_FILES])
    except Exception as e:
        raise HFError(f"{path_or_id}: not a folder here and downloading it failed ({first_line(e, 100)}); download it "
                      f"first: hf download {path_or_id} --local-dir DIR") from None


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: unreadable ({e})") from None


def safetensors_files(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        return sorted(set(read_json(index).get("weight_map", {}).values()))
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return ["model.safetensors"]
    raise HFError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_hf(path_or_id, dtype=None, max_seq_len=None):
    """A Transformer with the weights of a Llama, Mistral or Mixtral folder (or hub id).

    dtype: None keeps the checkpoint's (that of its embedding). max_seq_len: None is max_position_embeddings;
    a smaller value only shrinks the RoPE tables (save_hf writes it back as max_position_embeddings).
    """
    folder = resolve(path_or_id)
    cfg = config_from_hf(read_json(os.path.join(folder, "config.json")), max_seq_len)
    expected = {hf: (ours, j) for hf, ours, j in hf_names(cfg)}
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = Transformer(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}

    state, experts = {}, {}
    for name in safetensors_files(folder):
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key not in expected:
                        raise HFError(f"{name}: unexpected weight {key} (not in a {cfg.n_layer}-layer "
                                      f"{'Mixtral' if cfg.is_moe else 'Llama'} of this config)")
                    t = f.get_tensor(key)
                    if t.dtype not in DTYPE_NAMES:
                        raise HFError(f"{name}: {key} has dtype {t.dtype} (only float32, bfloat16, float16)")
                    ours, j = expected.pop(key)
                    want = shapes[ours] if j is None else shapes[ours][1:]
                    if t.shape != want:
                        raise HFError(f"{name}: {key} has shape {list(t.shape)}, config.json implies {list(want)}")
                    if j is None:
                        state[ours] = t
                    else:
                        experts.setdefault(ours, {})[j] = t
        except HFError:
            raise
        except Exception as e:  # safetensors' own errors: truncated file, bad header, ...
            raise HFError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    if expected:
        raise HFError(f"{folder}: {len(expected)} weights missing, e.g. {next(iter(expected))}")
    # to the chosen dtype one tensor at a time (each original is freed when replaced), experts stacked [E, ...]
    dtype = dtype or state["embed.weight"].dtype
    for ours in list(state):
        state[ours] = state[ours].to(dtype)
    for ours, parts in experts.items():
        state[ours] = torch.stack([parts.pop(j).to(dtype) for j in range(cfg.n_experts)])
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:  # assign gave lm_head its own Parameter object: tie them again
        model.lm_head.weight = model.embed.weight
    # the RoPE tables were built on the meta device: build them for real
    model.rope_cos, model.rope_sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    return model


# -----------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes (name, tensor) pairs into safetensors shards of at most max_shard_bytes as they come, so that
    no more than one shard is held in memory; one shard is model.safetensors, several get an index."""

    def __init__(self, out_dir, dtype, max_shard_bytes):
        self.out_dir, self.dtype, self.max_shard_bytes = out_dir, dtype, max_shard_bytes
        self.shard, self.shard_bytes, self.files, self.weight_map, self.total = {}, 0, [], {}, 0
        self.paths = []  # every file it has begun to write, for write_hf to remove after a failure

    def add(self, name, tensor):
        nbytes = tensor.numel() * self.dtype.itemsize
        if self.shard and self.shard_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        # clone: slices of one stacked expert tensor share memory, which safetensors refuses
        self.shard[name] = tensor.detach().to("cpu", self.dtype, copy=True).contiguous()
        self.shard_bytes += nbytes
        self.total += nbytes

    def flush(self):
        name = f"model-{len(self.files) + 1:05d}.safetensors.tmp"
        self.paths.append(os.path.join(self.out_dir, name))
        save_file(self.shard, self.paths[-1], metadata={"format": "pt"})
        self.files.append((name, list(self.shard)))
        self.shard, self.shard_bytes = {}, 0

    def close(self):
        if self.shard or not self.files:
            self.flush()
        n = len(self.files)
        for i, (tmp, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self.paths.append(os.path.join(self.out_dir, final))
            os.replace(os.path.join(self.out_dir, tmp), self.paths[-1])
            self.weight_map.update({k: final for k in names})
        if n > 1:
            self.paths.append(os.path.join(self.out_dir, "model.safetensors.index.json"))
            with open(self.paths[-1], "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, f, indent=2)


def check_out_dir(out_dir):
    if os.path.exists(os.path.join(out_dir, "config.json")) or os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")):
        raise HFError(f"{out_dir}: already holds a checkpoint; choose a new folder")


def prepare_out_dir(out_dir):
    check_out_dir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise HFError(f"{out_dir}: cannot create it ({e.strerror or e})") from None


def write_hf(cfg, tensor_of, out_dir, dtype, max_shard_bytes, on_layer=None, extra_config=None, tokenizer_dir=None):
    """Write the weights, the tokenizer files of tokenizer_dir (if given) and config.json; tensor_of(our name) gives
    each tensor when it is needed. config.json comes last: a folder with one is complete. A failed write (a full
    disk) removes every file it began, so that the folder can be written again."""
    prepare_out_dir(out_dir)
    writer = ShardWriter(out_dir, dtype, max_shard_bytes)
    written = writer.paths
    try:
        layer = None
        for hf, ours, j in hf_names(cfg):
            if on_layer and ours.startswith("layers.") and ours.split(".")[1] != layer:
                layer = ours.split(".")[1]
                on_layer(int(layer))
            t = tensor_of(ours)
            writer.add(hf, t if j is None else t[j])
        writer.close()
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            if os.path.exists(os.path.join(tokenizer_dir, name)):
                written.append(os.path.join(out_dir, name))
                shutil.copyfile(os.path.join(tokenizer_dir, name), written[-1])
        written.append(os.path.join(out_dir, "config.json"))
        with open(written[-1], "w") as f:
            json.dump({**config_to_hf(cfg, dtype), **(extra_config or {})}, f, indent=2)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as a SafetensorError
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        reason = e.strerror or e if isinstance(e, OSError) else first_line(e)
        what = os.path.basename(written[-1]) if written else "the weights"
        raise HFError(f"{out_dir}: could not write {what} ({reason}); nothing of it is kept") from None


def save_hf(model, out_dir, dtype=None, max_shard_bytes=DEFAULT_SHARD_BYTES, extra_config=None, tokenizer_dir=None):
    """Write model as a LlamaForCausalLM (dense) or MixtralForCausalLM (MoE) folder; dtype None keeps the model's.
    extra_config: more config.json fields (token ids, say); tokenizer_dir: a folder whose tokenizer files to copy."""
    dtype = dtype or next(model.parameters()).dtype
    state = model.state_dict()
    write_hf(model.config, state.__getitem__, out_dir, dtype, max_shard_bytes, extra_config=extra_config,
             tokenizer_dir=tokenizer_dir)


def drop_upcycle_hf(dense, out_dir, n_experts=8, top_k=2, r=0.5, seed=0, shared_indices=True, dtype=None,
                    max_shard_bytes=DEFAULT_SHARD_BYTES, log=print, extra_config=None, tokenizer_dir=None):
    """save_hf(drop_upcycle(dense, ...)) without ever holding the MoE: each layer's experts are built
    (dropupcycle.upcycled_ffns) when the writer reaches them and dropped once written. Same files, bit for bit."""
    cfg = upcycled_config(dense.config, n_experts, top_k)
    dtype = dtype or next(dense.parameters()).dtype
    state = dense.state_dict()
    ffns = upcycled_ffns(dense, n_experts, r, seed, shared_indices)
    current = {}

    def tensor_of(ours):
        if ".ffn." not in ours:
            return state[ours]
        if ours not in current:  # the writer reached the next layer's MoE: build it, forget the last one
            current.clear()
            prefix = ours[: ours.index(".ffn.")]
            router, gate, up, down = next(ffns)
            current.update({f"{prefix}.ffn.router.weight": router, f"{prefix}.ffn.gate": gate,
                            f"{prefix}.ffn.up": up, f"{prefix}.ffn.down": down})
        return current[ours]

    def on_layer(i):
        log(f"layer {i + 1}/{cfg.n_layer}: {n_experts} experts, r = {r}", flush=True)

    write_hf(cfg, tensor_of, out_dir, dtype, max_shard_bytes, on_layer, extra_config, tokenizer_dir)


# -----------------------------------------------------------------------------
# Command line


def pretrained_tokenizer(path_or_id, seq_len):
    """(folder, tokenizer) of a Hugging Face Llama folder or hub id, checked against its config.json before any
    weight is read: train.py --dense-from trains on this tokenizer, and analyze.py routing reads text with it.
    seq_len stands in for max_position_embeddings, as in load_pretrained (a config may leave that field out)."""
    try:
        folder = resolve(path_or_id)
        config = read_json(os.path.join(folder, "config.json"))
        cfg = config_from_hf(config, max_seq_len=seq_len)
        if cfg.is_moe:
            raise HFError("is already an MoE; give the dense Llama it came from")
        if not os.path.exists(os.path.join(folder, "tokenizer.json")):
            raise HFError(f"no tokenizer.json in {folder}; the model trains on its own tokenizer")
    except HFError as e:
        raise Fail(f"--dense-from {path_or_id}: {str(e).removeprefix(f'{path_or_id}: ')}")
    eos = config.get("eos_token_id")
    enc = HFTokenizer(folder, eot_token=eos[0] if isinstance(eos, list) and eos else eos)
    if enc.n_vocab > cfg.vocab_size:
        raise Fail(f"--dense-from {path_or_id}: tokenizer.json has {enc.n_vocab} tokens, the model {cfg.vocab_size}")
    if type(enc.eot_token) is not int or not 0 <= enc.eot_token < enc.n_vocab:  # it ends every file in the token cache
        raise Fail(f"--dense-from {path_or_id}: config.json's eos_token_id {eos!r} is not one of tokenizer.json's "
                   f"{enc.n_vocab} tokens")
    return folder, enc


def load_pretrained(path_or_id, seq_len):
    """train.py --dense-from: (dense model, tokenizer, source description) of a Hugging Face Llama folder or hub id."""
    folder, enc = pretrained_tokenizer(path_or_id, seq_len)
    try:
        model = load_hf(folder, dtype=torch.float32, max_seq_len=seq_len)  # fp32 master weights, as when trained here
    except HFError as e:
        raise Fail(f"--dense-from {path_or_id}: {str(e).removeprefix(f'{path_or_id}: ')}")
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".json")))
    stamp = [(f, os.path.getsize(os.path.join(folder, f)), os.path.getmtime(os.path.join(folder, f))) for f in files]
    print(f"pretrained dense model {path_or_id}: {model.num_params() / 1e6:.1f}M params, vocabulary {enc.n_vocab:,}")
    return model, enc, dict(path=os.path.abspath(folder), files=stamp)


def token_ids(folder):
    """The bos, eos and pad token ids of the Hugging Face model in folder (none where folder is None or has no
    config.json), for a config.json written from it: they belong to its tokenizer."""
    path = folder and os.path.join(folder, "config.json")
    config = read_json(path) if path and os.path.isfile(path) else {}
    return {k: config[k] for k in TOKEN_ID_FIELDS if k in config}


def main(argv=None):
    parser = OneLineParser(prog="hf.py", description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("drop-upcycle", help="HF Llama folder -> Drop-Upcycled HF Mixtral folder")
    up.add_argument("src", help="LlamaForCausalLM folder (or hub id)")
    up.add_argument("out", help="new folder for the MixtralForCausalLM")
    up.add_argument("--r", type=unit_float, default=0.5,
                    help="fraction of every expert's neurons re-initialised (0: naive Upcycling)")
    up.add_argument("--n-experts", type=positive_int, default=8, help="experts per layer")
    up.add_argument("--top-k", type=positive_int, default=2, help="experts per token")
    up.add_argument("--seed", type=nonneg_int, default=0, help="seed of the router init and the dropped neurons")
    up.add_argument("--independent-indices", action="store_true", help="a fresh neuron set per matrix (the authors' code)")
    ex = sub.add_parser("export", help="train.py checkpoint or run folder -> HF folder")
    ex.add_argument("src", help="ckpt.pt, or a run folder holding one")
    ex.add_argument("out", help="new folder for the HF checkpoint")
    for p in (up, ex):
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: the source's)")
        p.add_argument("--max-shard-bytes", type=byte_count, default=DEFAULT_SHARD_BYTES, help="shard size limit")
    try:
        args = parser.parse_args(argv)
        dtype = DTYPES[args.dtype] if args.dtype else None
        if args.command == "export":
            check_out_dir(args.out)
            model, ckpt, _ = load_model(args.src, if_damaged=None)
            tokenizer, tokenizer_dir = ckpt.get("tokenizer", "byte"), tokenizer_dir_of(ckpt)
            save_hf(model, args.out, dtype, args.max_shard_bytes, extra_config=token_ids(tokenizer_dir),
                    tokenizer_dir=tokenizer_dir)
            print(f"wrote {'Mixtral' if model.config.is_moe else 'Llama'} {args.out}")
            if tokenizer_dir:
                print(f"with the tokenizer and token ids of {tokenizer_dir}, the --dense-from model of its run")
            elif tokenizer.startswith("hf-"):
                print(f"no tokenizer files: the run read a Hugging Face tokenizer ({tokenizer}) from a folder it does "
                      f"not record, or that no longer holds it: copy that tokenizer's files in")
            elif tokenizer == "byte":
                print("no tokenizer files: the run used train.py's byte tokenizer (the token ids are UTF-8 bytes)")
            else:
                print(f"no tokenizer files: the run used tiktoken's {tokenizer} tokenizer")
            return
        check_out_dir(args.out)  # before loading a large model, not after
        try:
            upcycled_config(ModelConfig(), args.n_experts, args.top_k)  # the same checks as the model's
        except ValueError as e:
            raise HFError(str(e)) from None
        src = resolve(args.src)
        if config_from_hf(read_json(os.path.join(src, "config.json"))).is_moe:  # before reading the weights
            raise HFError(f"{args.src}: is already a Mixtral; drop-upcycle needs a dense Llama")
        dense = load_hf(src, dtype)
        print(f"{args.src}: {dense.num_params() / 1e6:.1f}M parameters, {dense.config.n_layer} layers", flush=True)
        drop_upcycle_hf(dense, args.out, args.n_experts, args.top_k, args.r, args.seed, not args.independent_indices,
                        dtype, args.max_shard_bytes, extra_config=token_ids(src), tokenizer_dir=src)  # its tokenizer
        print(f"wrote Mixtral {args.out}")
    except (HFError, Fail) as e:
        print(f"hf.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"hf.py: error: {os_error_text(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
