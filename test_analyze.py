"""analyze.py: the paper's analyses (Sec. 5.3 r sweep, Sec. 5.4 routing) and the classroom exercises.
Routing statistics with known routing in and known numbers out, the commands end to end on a tiny corpus."""

import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import HERE, write_finished_run

import analyze
import plot
import data
import runs
import train
from dropupcycle import ModelConfig, Transformer, drop_upcycle


# A model and schedule small enough that a whole sweep (dense + 8 MoE runs) takes seconds on one CPU core
TINY_CLI = ["--d-model", "32", "--n-layer", "2", "--n-head", "2", "--n-kv-head", "2", "--d-ff", "64", "--n-experts", "4",
        "--seq-len", "32", "--batch-size", "4", "--dense-steps", "4", "--moe-steps", "4", "--eval-interval", "2",
        "--eval-batches", "1", "--log-interval", "2", "--dense-warmup", "1", "--moe-warmup", "1"]


def make_corpus(root):
    """Two domains, one folder each, of made-up Python-ish and C-ish text, with at least one held-out
    (validation) file per domain: file names are picked by train.py's own split rule."""
    rng = random.Random(0)
    vocab = {"python": (".py", "def return self import lambda for in yield".split()),
             "c": (".c", "int void struct return { } ; #include".split())}
    for domain, (ext, words) in vocab.items():
        os.makedirs(os.path.join(root, domain))
        n_val, i = 0, 0
        while i < 12 or n_val == 0:
            key = f"data/{domain}/f{i}{ext}"
            is_val = data.stable_hash("val:" + key) % 10_000 < data.VAL_FRACTION * 10_000
            if i < 12 or is_val:
                n_val += is_val
                with open(os.path.join(root, domain, f"f{i}{ext}"), "w") as f:
                    f.write(" ".join(rng.choice(words) for _ in range(300)) + "\n")
            i += 1
    return str(root)


def assert_one_line_analyze_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        analyze.main(argv)
    assert e.value.code == 1, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("analyze.py: error:") and "\n" not in err, (argv, err)
    return err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, corpus):
    """One tiny sweep (dense, naive, five r, r = 0.5 independent, scratch) and its routing analysis."""
    out = str(tmp_path_factory.mktemp("sweep"))
    flags = ["--preset", "cpu", "--out-dir", out, "--data", corpus, *TINY_CLI]
    analyze.main(["sweep", *flags])
    analyze.main(["routing", *flags])
    return out, flags


# -----------------------------------------------------------------------------
# Routing statistics: known routing in, known numbers out


def test_count_assignments_counts_every_top_k_slot():
    experts = torch.tensor([[0, 1], [0, 2], [3, 0]])  # 3 tokens, top-2
    assert analyze.count_assignments(experts, 5).tolist() == [3, 1, 1, 1, 0]


def test_load_balance_is_one_for_uniform_and_zero_for_one_expert():
    assert analyze.load_balance(np.ones(8)) == pytest.approx(1.0)
    assert analyze.load_balance([5, 0, 0, 0, 0, 0, 0, 0]) == pytest.approx(0.0)
    # all on two of eight experts (what the paper saw for naive Upcycling): log 2 / log 8 = 1/3
    assert analyze.load_balance([1, 1, 0, 0, 0, 0, 0, 0]) == pytest.approx(1 / 3)
    # unnormalised counts give the same as the distribution
    assert analyze.load_balance([30, 10]) == pytest.approx(analyze.load_balance([0.75, 0.25]))


def test_js_divergence_known_values():
    assert analyze.js_divergence([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7]]) == pytest.approx(0.0, abs=1e-12)
    assert analyze.js_divergence([[1, 0], [0, 1]]) == pytest.approx(math.log(2))  # disjoint experts
    assert analyze.js_divergence(np.eye(3)) == pytest.approx(math.log(3))  # three domains, disjoint
    # against the textbook form 0.5 KL(P||M) + 0.5 KL(Q||M)
    P, Q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    M = (P + Q) / 2
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)
    assert analyze.js_divergence([P, Q]) == pytest.approx(0.5 * kl(P, M) + 0.5 * kl(Q, M))
    assert 0.2157 < analyze.js_divergence([P, Q]) < 0.2159


def test_routing_stats_of_known_counts():
    # python tokens all to experts 0-1, C tokens all to experts 2-3: perfectly balanced overall, fully specialised
    s = analyze.routing_stats([[5, 5, 0, 0], [0, 0, 5, 5]])
    assert s["balance"] == pytest.approx(1.0) and s["js"] == pytest.approx(math.log(2))
    np.testing.assert_allclose(s["dists"][0], [0.5, 0.5, 0, 0])
    # both domains on the same two experts: routed alike, and badly balanced
    s = analyze.routing_stats([[5, 5, 0, 0], [4, 6, 0, 0]])
    assert s["balance"] == pytest.approx(0.5, abs=0.01) and s["js"] < 0.01


def test_route_counts_match_the_models_own_routing():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, n_kv_head=2, d_ff=32, max_seq_len=16,
                      n_experts=4, top_k=2)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 64, (40,)).tolist()  # 2 windows of 16; the last 8 tokens do not fill a window
    counts = analyze.route_counts(model, tokens, 16, 1, torch.device("cpu"))
    # independently: the inputs of each MoE layer, routed by MoE.route
    expected = torch.zeros(2, 4, dtype=torch.long)
    inputs = []
    hooks = [b.ffn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in model.layers]
    with torch.no_grad():
        model(torch.tensor(tokens[:32]).view(2, 16))
        for layer, (block, x) in enumerate(zip(model.layers, inputs)):
            _, experts, _ = block.ffn.route(x.reshape(-1, 32))
            expected[layer] = torch.bincount(experts.flatten(), minlength=4)
    for h in hooks:
        h.remove()
    assert counts.tolist() == expected.tolist()
    assert counts.sum(dim=1).tolist() == [32 * 2, 32 * 2]  # every token counted in both of its slots


# -----------------------------------------------------------------------------
# Step-0 measurements: router gradient and neuron overlap


def test_router_gets_no_lm_gradient_at_r0_and_never_with_top1():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, n_kv_head=2, d_ff=64, max_seq_len=16)
    dense = Transformer(cfg)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    naive = analyze.router_grad_norms(dense, 0.0, 4, 2, 0.02, x, y)
    drop = analyze.router_grad_norms(dense, 0.5, 4, 2, 0.02, x, y)
    assert naive["lm_router"] < 1e-6 * drop["lm_router"]  # identical experts: the gates do not matter
    assert naive["aux_router"] > 0 and naive["lm_experts"] > 0  # the balancing loss still moves the router
    top1 = analyze.router_grad_norms(dense, 0.5, 4, 1, 0.02, x, y)
    assert top1["lm_router"] == 0.0 and top1["aux_router"] > 0  # a top-1 gate is always exactly 1


def test_overlap_follows_one_minus_r_squared_and_index_sets():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layer=2, n_head=2, n_kv_head=2, d_ff=256, max_seq_len=16)
    dense = Transformer(cfg)
    shared = analyze.overlap_stats(dense, 0.5, 8, shared_indices=True)
    assert shared["intact"] == pytest.approx(0.5)  # exactly floor(r d_ff) dropped, the same in all three matrices
    assert shared["pair_kept"] == pytest.approx(0.25, abs=0.02)
    independent = analyze.overlap_stats(dense, 0.5, 8, shared_indices=False)
    assert independent["pair_kept"] == pytest.approx(0.25, abs=0.02)
    assert independent["intact"] == pytest.approx(0.125, abs=0.02)  # (1 - r)^3
    assert analyze.overlap_stats(dense, 0.0, 4, True)["pair_intact"] == 1.0


# -----------------------------------------------------------------------------
# sweep and routing end to end on a tiny corpus


def test_sweep_trains_every_r_from_one_dense_model(swept):
    out, flags = swept
    names = ["moe-naive", "moe-drop-r0.1", "moe-drop-r0.25", "moe-drop-r0.5", "moe-drop-r0.75", "moe-drop-r1",
             "moe-drop-r0.5-indep", "moe-scratch"]
    settings = {}
    for name in names:
        with open(os.path.join(out, name, "settings.json")) as f:
            settings[name] = json.load(f)
    assert settings["moe-drop-r0.5"]["shared_indices"] is True
    assert settings["moe-drop-r0.5-indep"]["shared_indices"] is False
    assert {settings[n]["r"] for n in names[:6]} == {0.0, 0.1, 0.25, 0.5, 0.75, 1.0}
    dense = [settings[n]["dense"] for n in names[:7]]
    assert all(d == dense[0] for d in dense)  # one dense model's settings
    logs = {n: plot.val_curve(os.path.join(out, n, "log.csv")) for n in names}
    # ... and its weights: every upcycled run's step-0 validation loss (logged before any MoE step) is that of
    # drop_upcycle applied to the saved dense checkpoint with the run's settings, on the same validation windows
    args = train.parse_args(flags)
    _, val_tokens, _ = data.load_data(args.data, args.tokenizer, data.get_tokenizer(args.tokenizer), args.out_dir, args.corpus_mb, args.seq_len)
    val_rng = np.random.default_rng(train.VAL_WINDOWS_SEED)  # the runs' fixed validation windows
    cpu = torch.device("cpu")
    val_batches = [data.get_batch(val_tokens, args.batch_size, args.seq_len, val_rng, cpu) for _ in range(args.eval_batches)]
    ckpt = train.load_checkpoint(os.path.join(out, "dense", "ckpt.pt"))
    dense_model = Transformer(ModelConfig(**ckpt["model_config"]))
    dense_model.load_state_dict(ckpt["model"])
    dense_final = plot.val_curve(os.path.join(out, "dense", "log.csv"))[2][-1]
    assert train.evaluate(dense_model, dense_model, val_batches, cpu)[0] == dense_final  # the same windows as the runs'
    assert logs["moe-naive"][2][0] == pytest.approx(dense_final, abs=1e-5)  # identical experts: the dense function
    for n in names[:7]:
        s = settings[n]
        moe = drop_upcycle(dense_model, n_experts=s["model"]["n_experts"], top_k=s["model"]["top_k"], r=s["r"],
                           seed=s["seed"], shared_indices=s["shared_indices"])
        assert train.evaluate(moe, moe, val_batches, cpu)[0] == logs[n][2][0], n
    # the two r = 0.5 runs start from different experts, so their curves differ
    assert all(np.array_equal(logs[n][0], logs["moe-naive"][0]) for n in names)  # same evaluation steps
    assert not np.array_equal(logs["moe-drop-r0.5"][2], logs["moe-drop-r0.5-indep"][2])
    with open(os.path.join(out, "sweep_summary.md")) as f:
        table = f.read()
    assert all(f"| {n} |" in table for n in names) and "python analyze.py sweep" in table
    for name, r, sets in [("moe-drop-r0.5", "0.5", "shared"), ("moe-drop-r0.5-indep", "0.5", "independent"),
                          ("moe-naive", "0", "-"), ("moe-scratch", "-", "-")]:
        assert f"| {name} | {r} | {sets} |" in table
    assert os.path.getsize(os.path.join(out, "sweep_loss.png")) > 10_000


def test_a_sweep_counts_in_its_eta_only_the_runs_it_has_yet_to_train(swept, tmp_path, capsys):
    out, flags = swept
    shutil.copytree(out, tmp_path / "out")
    flags = [str(tmp_path / "out") if f == out else f for f in flags]
    analyze.main(["sweep", "--r-values", "0.1", "0.25", "0.5", "0.6", "0.75", "0.9", "1", *flags])
    printed = capsys.readouterr().out
    assert printed.count("done: val") == 2  # r = 0.6 and r = 0.9; the eight finished runs are reused
    assert "===== sweep: 1 run left, ETA" in printed  # after r = 0.6: r = 0.9 (not the five runs after it)
    assert "runs left" not in printed


def test_routing_writes_consistent_statistics(swept):
    out, _ = swept
    with open(os.path.join(out, "routing_counts.json")) as f:
        raw = json.load(f)
    assert set(raw) >= {"moe-naive", "moe-drop-r0.5", "moe-scratch", "moe-drop-r0.5-indep"}
    for name, res in raw.items():
        assert res["domains"] == ["c", "python"]
        counts = np.array(res["counts"])  # [layers, domains, experts]
        assert counts.shape == (2, 2, 4)
        assert (counts.sum(axis=2) == res["tokens_per_domain"] * res["top_k"]).all()
        for layer in range(2):
            assert res["balance"][layer] == pytest.approx(analyze.load_balance(counts[layer].sum(axis=0)))
            assert res["js"][layer] == pytest.approx(analyze.js_divergence(counts[layer]))
    with open(os.path.join(out, "routing_summary.md")) as f:
        assert "| moe-naive |" in f.read()
    assert os.path.getsize(os.path.join(out, "routing_specialisation.png")) > 10_000


def test_dense_ckpt_is_found_from_the_out_dir_the_run_folder_or_the_file(swept):
    out, _ = swept
    paths = [analyze.dense_for_probe(given, seed=0)[1]
             for given in (out, os.path.join(out, "dense"), os.path.join(out, "dense", "ckpt.pt"))]
    assert paths == [os.path.join(out, "dense", "ckpt.pt")] * 3


def test_bad_input_gives_one_line_and_nonzero_exit(swept, tmp_path, capsys):
    out, flags = swept
    data_flags = flags[flags.index("--data") :]
    cases = [
        (["sweep", "--r", "0.5", "--out-dir", str(tmp_path)], "sweep chooses --r itself"),
        (["routing", "--out-dir", str(tmp_path / "empty"), *data_flags], "no finished MoE run in"),  # no runs there
        (["routing", "--out-dir", str(tmp_path / "missing"), *data_flags], "no finished MoE run in"),
        (["routing", "--preset", "cpu", "--out-dir", out, "--data", __file__],  # one file: no domains
         "routing needs text of two or more domains"),
        (["overlap", "--r", "1.5"], "argument --r: must be in [0, 1], got 1.5"),
        (["router-grad", "--dense-ckpt", os.path.join(out, "moe-naive")], "that is an MoE checkpoint"),
        (["router-grad", "--dense-ckpt", str(tmp_path / "missing")], "missing: no checkpoint there"),
        (["router-grad", "--top-k", "9"], "--top-k must be between 1 and --n-experts (8), got 9"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ]
    for argv, message in cases:
        assert message in assert_one_line_analyze_error(argv, capsys), (argv, message)
    assert not (tmp_path / "missing").exists()  # no corpus cached in a folder that holds no runs
    # a --dense-from run's dense/ holds the pretrained model's settings and score, no checkpoint: said so
    (tmp_path / "hf-run" / "dense").mkdir(parents=True)
    (tmp_path / "hf-run" / "dense" / "settings.json").write_text(json.dumps(dict(source=dict(path="llama", files=[]))))
    with pytest.raises(SystemExit):
        analyze.main(["router-grad", "--dense-ckpt", str(tmp_path / "hf-run")])
    assert "a --dense-from run's dense model is the Hugging Face folder" in capsys.readouterr().err
    # and from the shell: no traceback
    proc = subprocess.run([sys.executable, "analyze.py", "overlap", "--n-experts", "1"], cwd=HERE,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["routing", "--all-layer"], "unrecognized option --all-layer (did you mean --all-layers?)"),
    (["sweep", "--rvalues", "0.5", "1"], "unrecognized option --rvalues (did you mean --r-values?)"),
    (["sweep", "--moe-stepz", "3"], "unrecognized option --moe-stepz (did you mean --moe-steps?)"),  # train.py's
    (["seeds", "out", "--moe-stepz", "3"], "unrecognized option --moe-stepz (see python analyze.py seeds --help)"),
    (["routing", "--model", "x"], "unrecognized option --model (did you mean --models?)"),  # not train.py's --d-model
    (["lr", "--lr", "1e-3"], "unrecognized option --lr (did you mean --lrs?)"),
    (["sweep", "--ratio", "0.5"], "unrecognized option --ratio (see"),  # not --reinit-ratio: sweep sets it itself
    (["sweep", "-r-values", "0.5"], "unrecognized option -r-values (did you mean --r-values?)"),
])
def test_a_misspelt_flag_is_named_with_the_nearest_one_of_the_command_and_of_train_py_where_it_forwards(argv, message):
    # sweep, lr and routing hand unknown flags to train.py; seeds takes none of train.py's
    with pytest.raises(data.Fail) as e:
        analyze.parse_args(argv)
    assert str(e.value).startswith(message), str(e.value)


# -----------------------------------------------------------------------------
# The classroom exercises: EXERCISES.md is their one source; every command in its bash blocks runs


def exercises():
    """[(title, text, commands)] of EXERCISES.md: one per '## N.' section, commands from its bash blocks."""
    with open(os.path.join(HERE, "EXERCISES.md")) as f:
        sections = re.split(r"^## (?=\d+\.)", f.read(), flags=re.M)[1:]
    found = []
    for section in sections:
        title, text = section.split("\n", 1)
        blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
        commands = [line for block in blocks for line in block.splitlines() if line.strip()]
        found.append((title, text, commands))
    return found


def test_exercises_say_what_they_need_and_how_long_they_take():
    found = exercises()
    assert len(found) in range(6, 9)
    for title, text, commands in found:
        assert "*Needs:*" in text and re.search(r"\*Time:\* \d", text), title
        assert commands, title


def test_every_exercise_command_runs(tmp_path, corpus, swept, capsys):
    """Each command as written, with out/ moved to tmp_path and the tiny model and schedule appended. out/cpu
    starts as a copy of the tiny sweep (same flags), so the sweep exercise finds its runs done: this checks
    the command, not the training, which test_sweep_* covers."""
    shutil.copytree(swept[0], tmp_path / "out" / "cpu")
    for command in (c for _, _, commands in exercises() for c in commands):
        words = shlex.split(command)
        assert words[0] == "python" and words[1] in ("train.py", "analyze.py"), command
        argv = [str(tmp_path / w) if w.startswith("out/") else w for w in words[2:]]
        takes_train_flags = words[1] == "train.py" or argv[0] in ("sweep", "routing")
        if takes_train_flags:
            argv += ["--data", corpus, *TINY_CLI]
        main = train.main if words[1] == "train.py" else analyze.main
        try:
            main(argv)
        except SystemExit as e:
            pytest.fail(f"{command} exited with {e.code}: {capsys.readouterr().err}")
    assert os.path.exists(tmp_path / "out/ex-noaux/routing_summary.md")


# -----------------------------------------------------------------------------
# lr: every init at each MoE learning rate, from one dense model

LRS = [1e-3, 4e-3]
LR_RUN_NAMES = ["moe-naive", "moe-drop-r0.5", "moe-drop-r0.5-indep", "moe-scratch"]


@pytest.fixture(scope="module")
def lr_swept(tmp_path_factory, corpus):
    """One tiny lr sweep over two rates (dense + 8 MoE runs), with what it printed."""
    import contextlib
    import io

    out = str(tmp_path_factory.mktemp("lr"))
    flags = ["--preset", "cpu", "--out-dir", out, "--data", corpus, *TINY_CLI]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        analyze.main(["lr", "--lrs", *map(str, LRS), *flags])
    return out, flags, printed.getvalue()


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def test_lr_trains_the_dense_model_once_and_copies_it_bit_for_bit(lr_swept):
    out, _, printed = lr_swept
    assert printed.count("[dense] step 0/") == 1  # trained once, in out/dense
    folders = [os.path.join(out, "lr-" + analyze.lr_text(lr)) for lr in LRS]
    assert [os.path.basename(f) for f in folders] == ["lr-1e-3", "lr-4e-3"]
    assert printed.count("[dense] reusing the finished dense model") == 4 * len(LRS)  # every MoE run used the copy
    assert printed.count("tokenized in") == 1  # one token cache, hard-linked into every rate's folder
    for folder in folders:
        for root, _, files in os.walk(os.path.join(out, "data")):
            for name in files:
                linked = os.path.join(folder, "data", os.path.relpath(root, os.path.join(out, "data")), name)
                assert os.path.samefile(os.path.join(root, name), linked)
    source = train.load_checkpoint(os.path.join(out, "dense", "ckpt.pt"))
    for folder in folders:
        with open(os.path.join(out, "dense", "ckpt.pt"), "rb") as a, open(os.path.join(folder, "dense", "ckpt.pt"), "rb") as b:
            assert a.read() == b.read(), folder
        copy = train.load_checkpoint(os.path.join(folder, "dense", "ckpt.pt"))
        assert copy["settings"] == source["settings"]
        assert all(torch.equal(copy["model"][k], v) for k, v in source["model"].items())


def test_lr_trains_every_init_at_every_rate_from_that_dense_model(lr_swept):
    out, _, _ = lr_swept
    dense = read_json(out, "dense", "settings.json")
    for lr in LRS:
        folder = os.path.join(out, "lr-" + analyze.lr_text(lr))
        for name in LR_RUN_NAMES:
            s = read_json(folder, name, "settings.json")
            assert s["lr"] == lr and s["phase"] == "moe", (lr, name)
            assert s["init"] == name.split("-")[1] and s["shared_indices"] == (name != "moe-drop-r0.5-indep")
            assert s["dense"] == (None if name == "moe-scratch" else dense)
            assert os.path.exists(os.path.join(folder, name, "result.json"))
    # the rates give different runs; the same init at one rate starts from the same weights (same step-0 loss)
    naive = [plot.val_curve(os.path.join(out, "lr-" + analyze.lr_text(lr), "moe-naive", "log.csv"))[2] for lr in LRS]
    assert naive[0][0] == naive[1][0] and naive[0][-1] != naive[1][-1]


def test_lr_table_names_each_inits_best_rate(lr_swept):
    out, _, _ = lr_swept
    with open(os.path.join(out, "lr_summary.md")) as f:
        table = f.read()
    assert "Made with: `python analyze.py lr --lrs 0.001 0.004" in table
    for name in LR_RUN_NAMES:
        losses = {lr: read_json(out, "lr-" + analyze.lr_text(lr), name, "result.json")["final_val_loss"] for lr in LRS}
        best = min(losses, key=losses.get)
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} | "))  # the first table's row
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == [(f"**{losses[lr]:.4f}**" if lr == best else f"{losses[lr]:.4f}") for lr in LRS], row
        assert cells[3].split()[0] == analyze.lr_text(best), row
    assert "its best lr" in table and "| moe-drop-r0.5-indep |" in table
    assert os.path.getsize(os.path.join(out, "lr_loss.png")) > 10_000


def test_lr_report_leaves_out_a_rate_never_trained_and_names_it(lr_swept, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(lr_swept[0], copy)
    analyze.main(["lr", "--report-only", "--lrs", "1e-4", *map(str, LRS), "8e-3", "--out-dir", str(copy)])
    printed = capsys.readouterr().out
    assert f"{copy}/lr-8e-3/moe-naive: no finished run, left out" in printed
    table = (copy / "lr_summary.md").read_text()
    assert "| lr 8e-3 |" in table
    # the best of two trained rates is at the edge of what was tried, whatever rates were only named
    first_table = table.split("Final validation loss of each run")[1].split("\n\n")[1]
    rows = [line for line in first_table.splitlines() if line.startswith("| moe-")]
    assert len(rows) == 4 and all("(edge of the grid)" in row for row in rows), rows


def test_a_damaged_run_file_leaves_that_run_out_of_the_sweep_and_lr_tables_with_a_warning(swept, lr_swept, tmp_path,
                                                                                          capsys):
    sweep, lr = tmp_path / "sweep", tmp_path / "lr"
    shutil.copytree(swept[0], sweep)
    shutil.copytree(lr_swept[0], lr)
    (sweep / "moe-drop-r0.5" / "result.json").write_text('{"final')
    (lr / f"lr-{analyze.lr_text(LRS[1])}" / "moe-scratch" / "log.csv").write_text("step,val_loss\nx,y\n")
    analyze.main(["sweep", "--report-only", "--out-dir", str(sweep)])
    analyze.main(["lr", "--report-only", "--lrs", *map(str, LRS), "--out-dir", str(lr)])
    printed = capsys.readouterr().out
    assert f"warning: {sweep / 'moe-drop-r0.5'} has a damaged" in printed
    assert f"warning: {lr / ('lr-' + analyze.lr_text(LRS[1])) / 'moe-scratch'} has a damaged" in printed
    assert "| moe-drop-r0.5 |" not in (sweep / "sweep_summary.md").read_text()
    assert "| moe-naive |" in (sweep / "sweep_summary.md").read_text()
    # the dense run's settings, which the table's header reads: nothing to compare with, said in one line
    (sweep / "dense" / "settings.json").write_text("{}")
    assert "no finished dense and naive runs" in assert_one_line_analyze_error(
        ["sweep", "--report-only", "--out-dir", str(sweep)], capsys)


def test_the_sweep_table_names_the_tokenizer_and_seed_its_runs_were_trained_with_not_the_flags(swept, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(swept[0], copy)
    analyze.main(["sweep", "--report-only", "--out-dir", str(copy), "--seed", "7", "--tokenizer", "gpt2"])
    table = (copy / "sweep_summary.md").read_text()
    assert "(byte tokenizer)" in table and "seed 0." in table, table.splitlines()[0]


def test_the_routing_table_counts_the_tokens_routed_in_the_models_own_windows(swept, tmp_path):
    # --seq-len 40 for models of 32-token windows: the tokens are routed in windows of 32, and counted so
    out, flags = swept
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    flags = [*flags, "--seq-len", "40", "--routing-tokens", "100"]
    flags[flags.index("--out-dir") + 1] = str(copy)
    analyze.main(["routing", *flags])
    raw = json.loads((copy / "routing_counts.json").read_text())
    assert {res["tokens_per_domain"] for res in raw.values()} == {96}  # 3 windows of 32
    assert (copy / "routing_summary.md").read_text().startswith("Routing of 96 held-out tokens per domain")


def test_routing_replot_refuses_damaged_counts_and_unknown_models_in_one_line(swept, tmp_path, capsys):
    out, flags = swept
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # an unknown run is named before any model is routed, not after all of them
    flags = [*flags, "--models", "moe-naiv"]
    flags[flags.index("--out-dir") + 1] = str(copy)
    with pytest.raises(SystemExit):
        analyze.main(["routing", *flags])
    printed = capsys.readouterr()
    assert "--models moe-naiv: no routing of that run; the runs routed are moe-naive, " in printed.err
    assert "held-out tokens" not in printed.out
    assert "--models moe-naiv: no routing of that run" in assert_one_line_analyze_error(
        ["routing", "--report-only", "--out-dir", str(copy), "--models", "moe-naiv"], capsys)
    for damaged in ("{}", "garbage", '{"moe-naive": {"counts": 1}}'):
        (copy / "routing_counts.json").write_text(damaged)
        assert "routing_counts.json is damaged; run python analyze.py routing without --report-only again" in \
            assert_one_line_analyze_error(["routing", "--report-only", "--out-dir", str(copy)], capsys)


def test_lr_rerun_reuses_every_run(lr_swept, capsys):
    out, flags, _ = lr_swept
    before = {lr: os.path.getmtime(os.path.join(out, "lr-" + analyze.lr_text(lr), "moe-naive", "ckpt.pt")) for lr in LRS}
    analyze.main(["lr", "--lrs", *map(str, LRS), *flags])
    printed = capsys.readouterr().out
    assert "step 0/" not in printed and "done: val" not in printed and "copied the dense" not in printed  # no training
    assert printed.count("reusing the finished") == 1 + 4 * len(LRS) * 2  # dense once; each MoE run: its dense + itself
    assert all(os.path.getmtime(os.path.join(out, "lr-" + analyze.lr_text(lr), "moe-naive", "ckpt.pt")) == t
               for lr, t in before.items())


def test_lr_bad_input_gives_one_line_and_nonzero_exit(lr_swept, tmp_path, capsys):
    out, flags, _ = lr_swept
    fresh = ["--preset", "cpu", "--out-dir", str(tmp_path / "fresh"), "--data", flags[flags.index("--data") + 1]]
    cases = [(["lr", "--lrs", "0", *fresh], "argument --lrs: must be a positive number, got 0"),
             (["lr", "--lrs", "1e-3", "-1", *fresh], "argument --lrs: must be a positive number, got -1"),
             (["lr", "--moe-lr", "1e-3", *fresh], "lr chooses --moe-lr itself"),
             (["lr", "--moe-l=1e-3", *fresh], "lr chooses --moe-lr itself"),
             (["lr", "--init", "naive", *fresh], "lr chooses --init itself"),
             (["lr", "--independent-indices", *fresh], "lr chooses --independent-indices itself"),
             (["sweep", "--ini", "naive", *fresh], "sweep chooses --init itself")]  # train.py's abbreviation too
    for argv, message in cases:
        assert message in assert_one_line_analyze_error(argv, capsys), (argv, message)
    assert not os.path.exists(tmp_path / "fresh")  # refused before any work
    # a rate folder whose dense model is not the copy of out/dense is refused, not trained from another start
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "lr-4e-3" / "dense" / "ckpt.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SystemExit) as e:
        analyze.main(["lr", "--lrs", *map(str, LRS), *flags[:flags.index("--out-dir")], "--out-dir", str(copy),
                      *flags[flags.index("--out-dir") + 2:]])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "is not a copy of the dense model" in err and "\n" not in err
    # the report, too, refuses rates that did not start from one dense model (runs assembled from elsewhere)
    with open(copy / "lr-1e-3" / "dense" / "log.csv", "a") as f:
        f.write("2000,0,,,,,,,0\n")
    report = ["lr", "--report-only", "--lrs", *map(str, LRS), "--out-dir", str(copy)]
    assert "are different dense models (their log.csv differ)" in assert_one_line_analyze_error(report, capsys)


# -----------------------------------------------------------------------------
# seeds: a gap is called real only beyond the spread of the seeds

def write_seed_run(folder, name, seed, val_losses, final_batches, lr=0.002):
    """A finished run of one seed's folder, validated every 100 steps over 200."""
    dense = dict(phase="dense", seed=seed, steps=200, lr=0.003)
    settings = dense if name == "dense" else dict(phase="moe", seed=seed, steps=200, lr=lr, init=name, dense=dense)
    write_finished_run(os.path.join(folder, name), settings, val_losses, final_batches)


def seed_folders(root, gaps, lr=0.002):
    """One folder per seed: dense, naive (2.1, then 2.0) and each run of gaps (2.2, then 2.0 plus its gap)."""
    folders = []
    for seed in range(len(next(iter(gaps.values())))):
        folder = str(root / f"seed{seed}")
        write_seed_run(folder, "dense", seed, [3.0, 2.5, 2.2], [2.2] * 4)
        write_seed_run(folder, "moe-naive", seed, [2.2, 2.1, 2.0], [1.99, 2.01, 1.98, 2.02])
        for name, per_seed in gaps.items():
            g = per_seed[seed]
            write_seed_run(folder, name, seed, [4.0, 2.2, 2.0 + g], [1.99 + g, 2.01 + g, 1.98 + g, 2.02 + g], lr)
        folders.append(folder)
    return folders


def test_a_gap_to_naive_counts_only_when_every_seed_puts_it_on_the_same_side_beyond_their_spread(tmp_path, capsys):
    gaps = {"moe-drop-r0.5": [-0.02, -0.018, -0.022],          # same side in every seed, mean far beyond the sd
            "moe-drop-r0.5-indep": [-0.03, -0.03, 0.001],      # mean beyond the sd, but one seed on the other side
            "moe-drop-r1": [-0.001, -0.001, -0.03]}            # every seed below, but the mean inside the sd
    folders = seed_folders(tmp_path, gaps)
    out = tmp_path / "seeds.md"
    analyze.main(["seeds", *folders, "--out", str(out)])
    table = out.read_text()
    assert table in capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if " minus moe-naive |" in line}
    for name, per_seed in gaps.items():
        mean, sd = np.mean(per_seed), np.std(per_seed, ddof=1)
        assert f"{mean:+.4f} ± {sd:.4f}" in rows[f"{name} minus moe-naive"], (name, rows)
    assert rows["moe-drop-r0.5 minus moe-naive"].endswith("| below in all 3 seeds |")
    assert rows["moe-drop-r0.5-indep minus moe-naive"].endswith("| within the seed spread (noise) |")
    assert rows["moe-drop-r1 minus moe-naive"].endswith("| within the seed spread (noise) |")
    # the crossover of each seed: the step from which the run stays below naive (seed 2 of indep never is)
    assert "| 200, 200, 200 |" in rows["moe-drop-r0.5 minus moe-naive"]
    assert "| 200, 200, never |" in rows["moe-drop-r0.5-indep minus moe-naive"]
    # the two r = 0.5 variants are compared with each other too, seed by seed
    assert "| moe-drop-r0.5-indep minus moe-drop-r0.5 |" in table
    assert [seed.split(" | ")[0] for seed in table.splitlines() if seed.startswith("| dense |")] == ["| dense"]


def test_two_seeds_are_too_few_to_call_a_gap_real(tmp_path, capsys):
    analyze.main(["seeds", *seed_folders(tmp_path, {"moe-drop-r0.5": [-0.01, -0.02]})])
    out = capsys.readouterr().out
    assert "Seeds 0, 1 of the same runs (" in out
    row = next(line for line in out.splitlines() if line.startswith("| moe-drop-r0.5 minus"))
    assert row.endswith("| 2 seeds: too few to judge |")


def test_one_seed_is_called_one_seed(tmp_path, capsys):
    analyze.main(["seeds", seed_folders(tmp_path, {"moe-drop-r0.5": [-0.01]})[0]])
    out = capsys.readouterr().out
    assert "Seed 0 alone (" in out and "Seeds" not in out
    row = next(line for line in out.splitlines() if line.startswith("| moe-drop-r0.5 minus"))
    assert row.endswith("| 1 seed: too few to judge |")


def seeds_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        analyze.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("analyze.py: error:") and "\n" not in err, err
    return err


def test_seeds_refuses_folders_that_differ_in_more_than_the_seed(tmp_path, capsys):
    folders = seed_folders(tmp_path / "a", {"moe-drop-r0.5": [-0.02, -0.01]})
    other = seed_folders(tmp_path / "b", {"moe-drop-r0.5": [-0.02, -0.01, -0.03]}, lr=0.004)[2]  # seed 2, other MoE lr
    assert "differ in more than the seed (lr" in seeds_error(["seeds", *folders, other], capsys)
    # a run that the lowest seed lacks is compared between the seeds that have it
    shutil.rmtree(os.path.join(folders[0], "moe-drop-r0.5"))
    assert "moe-drop-r0.5 in " in seeds_error(["seeds", *folders, other], capsys)
    assert "both hold seed 0" in seeds_error(["seeds", folders[0], folders[0]], capsys)
    (tmp_path / "empty").mkdir()
    assert "no finished dense and naive runs" in seeds_error(["seeds", folders[0], str(tmp_path / "empty")], capsys)
    assert "none: no such folder" in seeds_error(["seeds", folders[0], str(tmp_path / "none")], capsys)


@pytest.mark.parametrize("command, argv, says_resume", [("overlap", ["overlap"], False),
                                                        ("sweep", ["sweep", "--out-dir", "unused"], True)])
def test_ctrl_c_is_one_line_that_offers_resume_only_where_runs_are_trained(command, argv, says_resume, monkeypatch,
                                                                          capsys):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze, command, interrupted)
    with pytest.raises(SystemExit) as e:
        analyze.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and err.startswith("analyze.py: interrupted") and "\n" not in err
    assert ("--resume" in err) == says_resume


def test_a_sigterm_outside_training_exits_with_sigterms_status_and_the_handlers_are_put_back(monkeypatch, capsys):
    def terminated(*_):
        runs.on_signal(signal.SIGTERM, None)  # as the handler does when no run is training

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(analyze, "overlap", terminated)
    with pytest.raises(SystemExit) as e:
        analyze.main(["overlap"])
    assert e.value.code == 128 + signal.SIGTERM and capsys.readouterr().err.startswith("analyze.py: interrupted")
    assert signal.getsignal(signal.SIGTERM) is before
