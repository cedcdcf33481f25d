"""Tests of hf.py against transformers as the oracle: tiny random Llama/Mistral/Mixtral folders written by
save_pretrained, read by load_hf; our MoE written by save_hf, read by from_pretrained. Offline, CPU, fast.

Run: python -m pytest -q test_hf.py
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import hf  # noqa: E402
from dropupcycle import ModelConfig, Transformer, drop_upcycle, load_balancing_loss  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # with head_dim 16, theta 1e4: frequencies in all three bands
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def randomise_norms(model):
    """HF inits norm gains to 1, which would hide a swapped norm: make every gain distinct."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_llama(folder, tied=False, head_dim=16, rope_scaling=LLAMA3, dtype=torch.float32, shard="20KB", seed=0):
    """A random LlamaForCausalLM (GQA, explicit head_dim != hidden/heads, llama3 RoPE) saved to folder."""
    torch.manual_seed(seed)
    # (a copy: transformers adds rope_theta to the dict it is given)
    cfg = LlamaConfig(**SMALL, head_dim=head_dim, tie_word_embeddings=tied, rope_scaling=rope_scaling and dict(rope_scaling))
    model = randomise_norms(LlamaForCausalLM(cfg)).to(dtype).eval()
    model.save_pretrained(folder, max_shard_size=shard)
    return model


def tokens(seed=1, T=24):
    return torch.randint(0, SMALL["vocab_size"], (3, T), generator=torch.Generator().manual_seed(seed))


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert asdict(a.config) == asdict(b.config)


# -----------------------------------------------------------------------------
# Reading Hugging Face checkpoints


@pytest.mark.parametrize("tied, shard, head_dim, rope_scaling", [
    (False, "20KB", 16, LLAMA3),  # sharded, explicit head_dim, Llama 3 RoPE
    (True, "1GB", 16, LLAMA3),  # one file, tied embeddings
    (False, "1GB", None, None),  # plain RoPE, head_dim = hidden / heads
])
def test_loaded_llama_computes_hf_logits(tmp_path, tied, shard, head_dim, rope_scaling):
    ref = hf_llama(tmp_path, tied=tied, head_dim=head_dim, rope_scaling=rope_scaling, shard=shard)
    assert (len(os.listdir(tmp_path)) > 3) == (shard == "20KB")  # really sharded, or really one file
    ours = hf.load_hf(str(tmp_path)).eval()
    assert ours.config.tie_embeddings == tied and (ours.lm_head.weight is ours.embed.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens())[0], ref(tokens()).logits, rtol=0, atol=1e-5)


def test_mistral_and_hf_born_mixtral_compute_hf_logits(tmp_path):
    torch.manual_seed(0)
    mistral = randomise_norms(MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None))).eval()
    mistral.save_pretrained(tmp_path / "mistral")
    mixtral = randomise_norms(MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2))).eval()
    mixtral.save_pretrained(tmp_path / "mixtral", max_shard_size="20KB")
    for ref, name in ((mistral, "mistral"), (mixtral, "mixtral")):
        ours = hf.load_hf(str(tmp_path / name)).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens())[0], ref(tokens()).logits, rtol=0, atol=1e-5)
    assert ours.config.n_experts == 4 and ours.config.rope_theta == 1e6  # Mixtral's default theta, from the file


def test_bf16_checkpoint_loads_as_bf16_or_as_requested(tmp_path):
    ref = hf_llama(tmp_path, dtype=torch.bfloat16)
    ours = hf.load_hf(str(tmp_path))
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert torch.equal(ours.layers[1].ffn.down.weight, ref.model.layers[1].mlp.down_proj.weight)
    ours32 = hf.load_hf(str(tmp_path), dtype=torch.float32)
    assert torch.equal(ours32.layers[1].ffn.down.weight, ref.model.layers[1].mlp.down_proj.weight.float())


def test_max_seq_len_override_only_shrinks_the_rope_tables(tmp_path):
    hf_llama(tmp_path)
    full, short = hf.load_hf(str(tmp_path)), hf.load_hf(str(tmp_path), max_seq_len=16)
    assert full.config.max_seq_len == 64 and short.rope_cos.shape[0] == 16
    assert torch.equal(short.rope_cos, full.rope_cos[:16]) and torch.equal(short.rope_sin, full.rope_sin[:16])


# -----------------------------------------------------------------------------
# Drop-Upcycled Mixtral, read by transformers


def test_r0_mixtral_written_from_llama_computes_the_dense_llamas_logits_in_transformers(tmp_path):
    ref = hf_llama(tmp_path / "llama")
    moe = drop_upcycle(hf.load_hf(str(tmp_path / "llama")), n_experts=4, top_k=2, r=0.0)
    hf.save_hf(moe, str(tmp_path / "moe"), max_shard_bytes=20_000)
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert mixtral.config.rope_parameters["rope_type"] == "llama3"  # the source's RoPE, not Mixtral's defaults
    with torch.no_grad():
        torch.testing.assert_close(mixtral(tokens()).logits, ref(tokens()).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_r05_hf_mixtral_logits_and_balancing_loss_equal_ours(tmp_path, tied):
    """transformers' aux_loss (attention_mask None) is our pooled load_balancing_loss exactly: it also counts
    both top-k slots in f_i and pools all layers' router logits; no factor of top_k between them."""
    hf_llama(tmp_path / "llama", tied=tied)
    moe = drop_upcycle(hf.load_hf(str(tmp_path / "llama")), n_experts=4, top_k=2, r=0.5, seed=3).eval()
    hf.save_hf(moe, str(tmp_path / "moe"))
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "moe").eval()
    cfg = json.load(open(tmp_path / "moe" / "config.json"))
    assert cfg["router_aux_loss_coef"] == moe.config.aux_loss_coef and cfg["output_router_logits"] is True
    idx = tokens()
    with torch.no_grad():
        out = mixtral(idx, labels=idx)
        logits, _ = moe(idx, idx)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, moe.aux_loss, rtol=1e-6, atol=0)
    # and it is the pooled formula over the layers' router logits that transformers returns
    pooled = torch.cat([layer.reshape(-1, 4) for layer in out.router_logits])
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(pooled, 2), rtol=1e-6, atol=0)


def test_streamed_drop_upcycle_writes_exactly_save_hf_of_drop_upcycle(tmp_path):
    hf_llama(tmp_path / "llama")
    dense = hf.load_hf(str(tmp_path / "llama"))
    hf.save_hf(drop_upcycle(dense, 4, 2, r=0.5, seed=1, shared_indices=False), str(tmp_path / "a"), max_shard_bytes=30_000)
    hf.drop_upcycle_hf(dense, str(tmp_path / "b"), 4, 2, r=0.5, seed=1, shared_indices=False, max_shard_bytes=30_000,
                       log=lambda *a, **k: None)
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
    assert_identical(hf.load_hf(str(tmp_path / "a")), hf.load_hf(str(tmp_path / "b")))


# -----------------------------------------------------------------------------
# Round trips ours -> HF -> ours


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, moe, tied, dtype):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=40, max_seq_len=32,
                      d_head=12, tie_embeddings=tied, rope_scaling=LLAMA3, rope_theta=5e5, norm_eps=1e-6,
                      n_experts=4 if moe else 1, top_k=2, aux_loss_coef=0.02)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype)
    hf.save_hf(model, str(tmp_path), max_shard_bytes=10_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    names = set(json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"])
    assert ("lm_head.weight" in names) != tied  # a tied weight is written once
    back = hf.load_hf(str(tmp_path))
    assert_identical(model, back)
    assert (back.lm_head.weight is back.embed.weight) == tied


def test_export_dtype_converts_and_unsharded_is_one_file(tmp_path):
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layer=1, n_head=4, d_ff=40, max_seq_len=32))
    hf.save_hf(model, str(tmp_path), dtype=torch.bfloat16)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    assert torch.equal(hf.load_hf(str(tmp_path)).embed.weight, model.embed.weight.to(torch.bfloat16))


# -----------------------------------------------------------------------------
# Tied embeddings and the new config fields


def test_tied_model_stays_tied_through_drop_upcycle_and_an_optimizer_step():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=32, tie_embeddings=True)
    dense = Transformer(cfg)
    assert dense.lm_head.weight is dense.embed.weight
    assert dense.num_params() == sum(p.numel() for p in Transformer(replace(cfg, tie_embeddings=False)).parameters()) - 64 * 32
    moe = drop_upcycle(dense, n_experts=4, top_k=2, r=0.5)
    assert moe.lm_head.weight is moe.embed.weight
    assert torch.equal(moe.embed.weight, dense.embed.weight)
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    idx = tokens(T=16) % 64
    moe(idx, idx)[1].backward()
    opt.step()
    assert moe.lm_head.weight is moe.embed.weight and not torch.equal(moe.embed.weight, dense.embed.weight)


def test_configs_saved_before_the_new_fields_still_load():
    old = {k: v for k, v in asdict(ModelConfig()).items() if k not in ("tie_embeddings", "d_head", "rope_scaling")}
    cfg = ModelConfig(**old)
    assert not cfg.tie_embeddings and cfg.head_dim == cfg.d_model // cfg.n_head and cfg.rope_scaling is None


@pytest.mark.parametrize("change, message", [
    (dict(d_head=7), "must be even"),
    (dict(d_head=0), "d_head"),
    (dict(d_model=30), "d_head must be given"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type 'llama3'"),
    (dict(rope_scaling={**LLAMA3, "factor": None}), "positive numbers"),
    (dict(rope_scaling={k: v for k, v in LLAMA3.items() if k != "factor"}), "missing ['factor']"),
    (dict(rope_scaling={**LLAMA3, "low_freq_factor": 4.0}), "low_freq_factor < high_freq_factor"),
    (dict(tie_embeddings=1), "tie_embeddings"),
])
def test_invalid_new_fields_raise_a_value_error_saying_what_is_wrong(change, message):
    with pytest.raises(ValueError) as e:
        ModelConfig(**change)
    assert message in str(e.value)


# -----------------------------------------------------------------------------
# Refusals: one line naming the field


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    c = json.load(open(path))
    c.update(changes)
    json.dump(c, open(path, "w"))


@pytest.mark.parametrize("changes, message", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(architectures=["Qwen2ForCausalLM"]), "architectures"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "type 'yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "type 'dynamic'"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096), "sliding_window"),
    (dict(num_hidden_layers=3), "missing, e.g. model.layers.2."),
    (dict(num_hidden_layers=1), "unexpected weight model.layers.1."),
    (dict(intermediate_size=40), "has shape"),
])
def test_unrepresentable_checkpoints_are_refused_in_one_line(tmp_path, changes, message):
    hf_llama(tmp_path, shard="1GB")
    edit_config(tmp_path, **changes)
    with pytest.raises(hf.HFError) as e:
        hf.load_hf(str(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_safetensors_is_refused_in_one_line(tmp_path, damage):
    hf_llama(tmp_path, shard="1GB")
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(hf.HFError) as e:
        hf.load_hf(str(tmp_path))
    assert "not a readable safetensors file" in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# Command line


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "hf.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=HERE, env={**os.environ, **(env or {})})


def test_cli_drop_upcycle_writes_a_mixtral_transformers_reads(tmp_path):
    ref = hf_llama(tmp_path / "llama", tied=True)
    (tmp_path / "llama" / "tokenizer.json").write_text('{"stand-in": true}')
    edit_config(tmp_path / "llama", bos_token_id=1, eos_token_id=2)
    p = run_cli("drop-upcycle", tmp_path / "llama", tmp_path / "moe", "--r", 0, "--n-experts", 4, "--top-k", 2,
                "--seed", 0, "--independent-indices", "--dtype", "fp32", "--max-shard-bytes", 20_000)
    assert p.returncode == 0, p.stderr
    assert "layer 2/2" in p.stdout
    assert (tmp_path / "moe" / "tokenizer.json").read_text() == '{"stand-in": true}'  # the dense model's tokenizer
    assert json.load(open(tmp_path / "moe" / "config.json"))["eos_token_id"] == 2
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():  # r = 0: the dense model's function
        torch.testing.assert_close(mixtral(tokens()).logits, ref(tokens()).logits, rtol=0, atol=1e-5)


def test_cli_export_writes_a_train_checkpoint_as_hf(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=32, n_experts=4, top_k=2)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    (tmp_path / "run").mkdir()
    torch.save(dict(model=model.state_dict(), model_config=asdict(cfg), settings={"lr": 2e-4}, step=7,
                    tokenizer="byte"), tmp_path / "run" / "ckpt.pt")
    p = run_cli("export", tmp_path / "run", tmp_path / "hf")
    assert p.returncode == 0, p.stderr
    assert "no tokenizer files: the run used train.py's byte tokenizer" in p.stdout  # a byte-level run
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = tokens(T=16) % 64
    with torch.no_grad():
        torch.testing.assert_close(mixtral(idx).logits, model(idx)[0], rtol=0, atol=1e-5)


def test_cli_bad_path_gives_one_line_and_exit_1(tmp_path):
    p = run_cli("drop-upcycle", tmp_path / "missing", tmp_path / "out")
    assert p.returncode == 1 and p.stderr == f"hf.py: error: {tmp_path / 'missing'}: not a folder\n"


@pytest.mark.parametrize("args, message", [
    (("drop-upcycle", "nobody/nothing", "OUT"), "hf download nobody/nothing"),  # a hub id, offline
    (("drop-upcycle", "./missing", "OUT"), "not a folder"),
    (("export", "missing.pt", "OUT"), "no checkpoint there"),
    (("export", "llama", "OUT"), "llama/ckpt.pt: no checkpoint there"),
    (("drop-upcycle", "llama", "OUT", "--r", "2"), "argument --r: must be in [0, 1], got 2"),
    (("drop-upcycle", "llama", "OUT", "--seed", str(10**23)), "argument --seed: must be below 2,147,483,648"),
    (("drop-upcycle", "llama", "OUT", "--max-shard-bytes", "-5"), "argument --max-shard-bytes: must be a positive"),
    (("drop-upcycle", "llama", "OUT", "--n-experts", str(10**11)), "argument --n-experts: must be below"),
    (("drop-upcycle", "llama", "OUT", "--top-k", "9"), "top_k (9) must be between 1 and n_experts (8)"),
    (("drop-upcycle", "llama", "OUT", "--n-experts", "1"), "at least 2 experts"),
    (("drop-upcycle", "llama", "llama"), "already holds a checkpoint"),
    (("drop-upcycle", "llama", "OUT", "--dtype", "fp8"), "invalid choice"),
    (("frobnicate",), "invalid choice"),
    # a misspelt flag makes argparse take its value for a positional; the message names the flag alone
    (("export", "--dtpye", "bf16", "llama", "OUT"), "unrecognized option --dtpye (did you mean --dtype?) (see"),
    (("export", "--seeed", "1", "llama", "OUT"), "unrecognized option --seeed (see"),  # --seed is drop-upcycle's
    # after "--" a real flag is an argument too many, not a misspelling of itself
    (("export", "llama", "OUT", "--", "--dtype", "bf16"), "error: unrecognized arguments: --dtype bf16 (see"),
])
def test_cli_bad_input_gives_one_line_and_exit_1(tmp_path, monkeypatch, capsys, args, message):
    hf_llama(tmp_path / "llama", shard="1GB")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()  # whatever transformers printed while saving the folder
    with pytest.raises(SystemExit) as e:
        hf.main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("hf.py: error: "), err
    assert message in err
    assert not os.path.exists(tmp_path / "OUT")


def test_cli_refuses_a_mixtral_from_its_config_before_reading_its_weights(tmp_path, monkeypatch):
    hf_llama(tmp_path / "llama", shard="1GB")
    edit_config(tmp_path / "llama", architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
                num_experts_per_tok=2)
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"\x07" * 64)  # reading it would fail first
    p = run_cli("drop-upcycle", tmp_path / "llama", tmp_path / "out")
    assert p.returncode == 1 and p.stderr.endswith("is already a Mixtral; drop-upcycle needs a dense Llama\n"), p.stderr


def test_a_missing_config_field_is_named_once():
    with pytest.raises(hf.HFError) as e:
        hf.config_from_hf(dict(architectures=["LlamaForCausalLM"], hidden_size=32))
    assert str(e.value).startswith("config.json: field") and str(e.value).count("config.json") == 1, str(e.value)


@pytest.mark.parametrize("config, message", [
    ([1], "config.json: holds a list"),
    (dict(architectures=[["LlamaForCausalLM"]]), "architectures: [['LlamaForCausalLM']] is not a list of class names"),
    (dict(architectures="LlamaForCausalLM"), "architectures: 'LlamaForCausalLM' is not a list of class names"),
    (dict(rope_parameters=[1]), "rope_parameters or rope_scaling: [1] is not a mapping"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings: 'false' is not true or false"),  # not read as true
    (dict(num_hidden_layers=[2]), "config.json: n_layer must be a positive integer, got [2]"),
    (dict(rms_norm_eps=[2]), "config.json: float() argument must be a string or a real number, not 'list'"),
])
def test_a_config_json_of_unexpected_types_is_one_line_naming_the_field_or_the_file(config, message):
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    with pytest.raises(hf.HFError) as e:
        hf.config_from_hf(config if isinstance(config, list) else {**base, **config})
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("full_at", ["a weights shard", "the tokenizer"])
def test_a_full_disk_leaves_no_file_behind_and_the_folder_can_be_written_again(tmp_path, full_at):
    # a file-size limit makes every write past it fail, as a full disk does: a weights shard is about 16 KB here,
    # the tokenizer 64 KB. A folder left with some files (config.json above all) would look finished
    import resource
    hf_llama(tmp_path / "llama", shard="1GB")
    (tmp_path / "llama" / "tokenizer.json").write_text(json.dumps({"stand-in": "x" * 64_000}))
    limit = 4_096 if full_at == "a weights shard" else 32_000

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    args = ["drop-upcycle", tmp_path / "llama", tmp_path / "out", "--n-experts", 4, "--max-shard-bytes", 16_000]
    p = subprocess.run([sys.executable, os.path.join(HERE, "hf.py"), *map(str, args)], capture_output=True, text=True,
                       cwd=HERE, preexec_fn=small_disk)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"hf.py: error: {tmp_path / 'out'}: could not write "), p.stderr
    assert ("tokenizer.json" in p.stderr) == (full_at == "the tokenizer"), p.stderr
    assert os.listdir(tmp_path / "out") == []
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (tmp_path / "llama" / "tokenizer.json").read_text()


# -----------------------------------------------------------------------------
# train.py --dense-from: a pretrained model upcycled and trained on its own tokenizer


def word_tokenizer(folder, n_words):
    """A tokenizer.json that splits on whitespace and knows n_words made-up words plus the corpus's words: with
    n_words above 65,536 its ids need the token cache's uint32 layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(n_words)] + \
            "def return x int g f ( ) { } ; : + * << # é".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))
    return len(vocab)


@pytest.mark.parametrize("n_words", [200, 70_000])
def test_train_dense_from_upcycles_a_pretrained_llama_and_trains_on_its_tokenizer(tmp_path, n_words):
    from conftest import ENV, TRAIN_PY, write_corpus

    src = tmp_path / "llama"
    src.mkdir()
    n_vocab = word_tokenizer(str(src), n_words)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMALL, "vocab_size": n_vocab}, tie_word_embeddings=True, eos_token_id=1)
    randomise_norms(LlamaForCausalLM(cfg)).save_pretrained(src)
    corpus = write_corpus(str(tmp_path / "corpus"))
    out = tmp_path / "out"
    flags = ["--dense-from", str(src), "--data", corpus, "--out-dir", str(out), "--device", "cpu", "--preset", "cpu",
             "--n-experts", "4", "--top-k", "2", "--seq-len", "16", "--batch-size", "2", "--moe-steps", "6",
             "--moe-warmup", "1", "--eval-interval", "3", "--eval-batches", "2", "--log-interval", "3"]
    result = subprocess.run([sys.executable, TRAIN_PY, "--init", "naive", *flags], capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    # the pretrained model is scored, not trained, and naive Upcycling starts at its loss exactly
    dense_rows = (out / "dense" / "log.csv").read_text().splitlines()
    naive_rows = (out / "moe-naive" / "log.csv").read_text().splitlines()
    assert len(dense_rows) == 2 and not (out / "dense" / "ckpt.pt").exists()
    assert "[dense] the pretrained model, scored without training: val" in result.stdout
    assert "[dense] step 0/0" not in result.stdout and "[dense] done" not in result.stdout
    assert float(dense_rows[1].split(",")[3]) == pytest.approx(float(naive_rows[1].split(",")[3]), abs=1e-5)
    meta = json.loads(next((out / "data").glob("*/meta.json")).read_text())
    itemsize = 4 if n_vocab > 2**16 else 2  # Llama 3's 128,256 tokens do not fit uint16
    assert os.path.getsize(next((out / "data").glob("*/train.bin"))) == itemsize * meta["train_tokens"]
    ckpt = torch.load(out / "moe-naive" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["vocab_size"] == n_vocab and ckpt["model_config"]["tie_embeddings"]
    if n_words > 2**16:
        return
    # the same command with --init drop reuses the token cache; then a scratch run beside it, whose settings name no
    # source. Both sample with the model's own tokenizer, and exported, carry it and the source's token ids.
    for init, run in [(["--init", "drop", "--r", "0.5"], "moe-drop-r0.5"), (["--init", "scratch"], "moe-scratch")]:
        result = subprocess.run([sys.executable, TRAIN_PY, *init, *flags], capture_output=True, text=True, env=ENV,
                                timeout=300)
        assert result.returncode == 0 and "tokenizing" not in result.stdout, result.stderr
        assert run in (out / "summary.md").read_text()
        sample = subprocess.run([sys.executable, TRAIN_PY, "--sample", str(out / run), "--prompt", "def f",
                                 "--sample-tokens", "5", "--device", "cpu"], capture_output=True, text=True, env=ENV,
                                timeout=120)
        assert sample.returncode == 0 and "def f" in sample.stdout, sample.stderr
        exported = subprocess.run([sys.executable, "hf.py", "export", str(out / run), str(tmp_path / f"{run}-hf")],
                                  capture_output=True, text=True, env=ENV, cwd=os.path.dirname(TRAIN_PY), timeout=120)
        assert exported.returncode == 0, exported.stderr
        assert (tmp_path / f"{run}-hf" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
        assert json.loads((tmp_path / f"{run}-hf" / "config.json").read_text())["eos_token_id"] == 1  # the source's
    # the source folder's tokenizer replaced by another: sampling refuses in one line, exporting leaves it out
    word_tokenizer(str(src), n_words + 1)
    sample = subprocess.run([sys.executable, TRAIN_PY, "--sample", str(out / "moe-scratch"), "--device", "cpu"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert sample.returncode == 1 and "no longer holds it" in sample.stderr and sample.stderr.count("\n") == 1, sample.stderr
    exported = subprocess.run([sys.executable, "hf.py", "export", str(out / "moe-scratch"), str(tmp_path / "changed-hf")],
                              capture_output=True, text=True, env=ENV, cwd=os.path.dirname(TRAIN_PY), timeout=120)
    assert exported.returncode == 0 and "no tokenizer files" in exported.stdout, exported.stderr
    assert not (tmp_path / "changed-hf" / "tokenizer.json").exists()


def test_routing_reads_the_text_of_runs_trained_from_a_pretrained_llama_with_its_tokenizer(tmp_path):
    from conftest import ENV, TRAIN_PY
    from test_analyze import make_corpus

    src = tmp_path / "llama"
    src.mkdir()
    n_vocab = word_tokenizer(str(src), 50)
    LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": n_vocab}, eos_token_id=1)).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    del config["max_position_embeddings"]  # optional where --seq-len gives the length
    (src / "config.json").write_text(json.dumps(config))
    flags = ["--dense-from", str(src), "--data", make_corpus(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
             "--device", "cpu", "--preset", "cpu", "--n-experts", "4", "--top-k", "2", "--seq-len", "16",
             "--batch-size", "2", "--moe-steps", "2", "--moe-warmup", "1", "--eval-interval", "2",
             "--eval-batches", "1"]
    trained = subprocess.run([sys.executable, TRAIN_PY, "--init", "naive", *flags], capture_output=True, text=True,
                             env=ENV, timeout=300)
    assert trained.returncode == 0, trained.stderr
    routed = subprocess.run([sys.executable, os.path.join(HERE, "analyze.py"), "routing", *flags], capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert routed.returncode == 0, routed.stderr
    assert "skipping" not in routed.stdout and "tokenizing" not in routed.stdout  # the runs' own token cache
    assert "| moe-naive |" in (tmp_path / "out" / "routing_summary.md").read_text()


@pytest.mark.parametrize("eos", [5_000, []])
def test_train_dense_from_with_an_eos_token_outside_the_vocabulary_is_one_line(tmp_path, eos):
    """The end-of-text token closes every file in the token cache: one the tokenizer does not have would overflow
    the cache's uint16 ids, or train the model on an id its embedding does not hold."""
    from conftest import ENV, TRAIN_PY, write_corpus

    src = tmp_path / "llama"
    src.mkdir()
    n_vocab = word_tokenizer(str(src), 200)
    LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": n_vocab})).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    result = subprocess.run([sys.executable, TRAIN_PY, "--dense-from", str(src), "--data", write_corpus(str(tmp_path)),
                             "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--preset", "cpu"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr == (f"train.py: error: --dense-from {src}: config.json's eos_token_id {eos!r} is not one of "
                             f"tokenizer.json's {n_vocab} tokens\n")


@pytest.mark.parametrize("flags, message", [(["--n-experts", "1"], "at least 2 experts"),
                                           (["--n-experts", "4", "--top-k", "5"], "top_k (5) must be between 1")])
def test_train_dense_from_with_a_bad_moe_shape_is_one_line_before_loading(tmp_path, flags, message):
    from conftest import ENV, TRAIN_PY

    result = subprocess.run([sys.executable, TRAIN_PY, "--dense-from", str(tmp_path / "missing"), *flags,
                             "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("train.py: error: invalid model shape: ") and message in result.stderr


def test_train_dense_from_a_folder_without_a_llama_is_one_line(tmp_path):
    from conftest import ENV, TRAIN_PY

    result = subprocess.run([sys.executable, TRAIN_PY, "--dense-from", str(tmp_path), "--device", "cpu"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"train.py: error: --dense-from {tmp_path}: ")
    result = subprocess.run([sys.executable, TRAIN_PY, "--dense-from", str(tmp_path / "nothere"), "--device", "cpu"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1 and result.stderr == f"train.py: error: --dense-from {tmp_path / 'nothere'}: not a folder\n"
