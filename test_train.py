"""train.py, data.py and plot.py: the data, the real CLI end to end, resume, and every expected failure:
one line on stderr, a non-zero exit, no lost work."""

import argparse
import inspect
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import types
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import (HERE, ENV, EXEC_AT_EXIT, TRAIN_PY, assert_one_line_error, cli, csv_rows, run_main, sigint_default,
                      tiny, tool_with_exec_at_exit, write_corpus, write_finished_run)

import data
import gpus
import plot
import runs
import train
import dropupcycle
from dropupcycle import ModelConfig, Transformer


# -----------------------------------------------------------------------------
# tokenizer and data


def test_byte_tokenizer_round_trip_and_ids_are_utf8_bytes():
    enc = data.get_tokenizer("byte")
    assert enc.n_vocab == 257 and enc.eot_token == 256
    for text in ["def f(x):\n    return x\n", "naïve → Drop-Upcycling 🙂", "", "\n\n\t  x", "<|endoftext|> is text here"]:
        ids = enc.encode_ordinary(text)
        assert ids == list(text.encode("utf-8"))  # what the corpus builder's numpy fast path writes
        assert enc.decode(ids) == text


def test_corpus_listing_is_deterministic_and_split_by_file(train_corpus):
    files = data.list_files(train_corpus)
    assert len(files) == 13
    train1, val1 = data.select_files(files, corpus_mb=0)
    train2, val2 = data.select_files(list(reversed(files)), corpus_mb=0)
    assert (train1, val1) == (train2, val2)  # order of discovery does not matter
    keys_train, keys_val = {f[0] for f in train1}, {f[0] for f in val1}
    assert keys_val and keys_train and not keys_train & keys_val
    assert keys_train | keys_val == {f[0] for f in files}


def test_corpus_cap_keeps_both_languages_deterministically():
    files = [(f"lib/m{i}.py", f"/x/m{i}.py", 1000, 0) for i in range(50)] + \
            [(f"inc/h{i}.h", f"/x/h{i}.h", 1000, 0) for i in range(50)]
    train_a, val_a = data.select_files(files, corpus_mb=0.02)  # 20 kB: 10 kB per language
    train_b, val_b = data.select_files(files[::-1], corpus_mb=0.02)
    kept = train_a + val_a
    assert (train_a, val_a) == (train_b, val_b)
    assert {data.language_of(f[0]) for f in kept} == {"python", "c/c++"}
    assert sum(data.language_of(f[0]) == "python" for f in kept) == 10
    assert len(kept) == 20


def test_default_corpus_is_this_pythons_source_code():
    files = data.list_files(":python")
    languages = {data.language_of(f[0]) for f in files}
    assert "python" in languages and len(files) > 100
    assert any(f[0].endswith("json/decoder.py") for f in files)  # the standard library is in
    # installed packages are listed once, from purelib/platlib: never through stdlib's site-packages, where a
    # virtual environment's base Python keeps twins of them (same file on both sides of the split)
    assert not [f[0] for f in files if f[0].split("/")[1] in ("site-packages", "dist-packages")]
    assert any(f[0].startswith(("purelib/", "platlib/")) for f in files)
    names = [f[0].split("/", 1)[1] for f in files]
    assert len(names) == len(set(names))  # no file twice under two roots


def test_token_cache_holds_whole_files_is_reused_and_rebuilt_when_data_change(train_corpus, tmp_path, capsys):
    folder = write_corpus(str(tmp_path / "data"))
    args = train.parse_args(tiny(folder, tmp_path / "out"))
    enc = data.get_tokenizer("byte")
    train_tokens, val_tokens, info = data.load_data(args.data, args.tokenizer, enc, args.out_dir, args.corpus_mb, args.seq_len)
    assert "tokenizing" in capsys.readouterr().out
    # val.bin is whole held-out files, each followed by <|endoftext|>
    _, val_files = data.select_files(data.list_files(folder), 0)
    expected = b"".join(open(f[1], "rb").read() + b"<|endoftext|>" for f in val_files)
    assert enc.decode_bytes(list(val_tokens)) == expected
    assert len(train_tokens) + len(val_tokens) == sum(len(open(p, "rb").read()) + 1 for _, p, _, _ in data.list_files(folder)
                                                      if p.endswith((".py", ".c")))
    # same settings: reused, not rebuilt
    _, _, info2 = data.load_data(args.data, args.tokenizer, enc, args.out_dir, args.corpus_mb, args.seq_len)
    assert "tokenizing" not in capsys.readouterr().out and info2["fingerprint"] == info["fingerprint"]
    # a file changed: rebuilt, with a message saying why
    with open(os.path.join(folder, "src0.c"), "a") as f:
        f.write("int extra;\n")
    train_tokens3, val_tokens3, info3 = data.load_data(args.data, args.tokenizer, enc, args.out_dir, args.corpus_mb, args.seq_len)
    assert "rebuilding" in capsys.readouterr().out and info3["fingerprint"] != info["fingerprint"]
    assert len(train_tokens3) + len(val_tokens3) == len(train_tokens) + len(val_tokens) + len("int extra;\n")


def test_a_file_repeated_under_many_names_is_tokenized_once_so_validation_never_repeats_training(tmp_path, capsys):
    folder = tmp_path / "twins"
    vendored = "def vendored(x):\n    return x + 1\n" * 40
    for i in range(40):  # one module vendored by 40 packages: by name, some copies fall in val, some in train
        (folder / f"pkg{i}").mkdir(parents=True)
        (folder / f"pkg{i}" / "vendored.py").write_text(vendored)
        (folder / f"own{i}.py").write_text(f"def own_{i}(x):\n    return x * {i}\n" * 40)
    train_files, val_files = data.select_files(data.list_files(str(folder)), 0)
    assert any(f[0].endswith("vendored.py") for f in train_files) and val_files
    args = train.parse_args(tiny(str(folder), tmp_path / "out"))
    train_tokens, val_tokens, _ = data.load_data(args.data, args.tokenizer, data.get_tokenizer("byte"), args.out_dir, args.corpus_mb, args.seq_len)
    everything = bytes(np.asarray(train_tokens, dtype=np.uint8)) + bytes(np.asarray(val_tokens, dtype=np.uint8))
    assert everything.count(vendored.encode()) == 1  # 40 copies, kept once
    assert vendored.encode() not in bytes(np.asarray(val_tokens, dtype=np.uint8))  # and in train, as train is first


# -----------------------------------------------------------------------------
# the CLI end to end


def test_cli_drop_run_writes_csvs_checkpoints_figure_and_summary(drop_run):
    out, result = drop_run
    assert "[moe-drop-r0.5] done" in result.stdout
    for path in ["dense/ckpt.pt", "dense/log.csv", "moe-drop-r0.5/ckpt.pt", "moe-drop-r0.5/log.csv",
                 "loss_curves.png", "summary.md"]:
        assert os.path.getsize(out / path) > 0, path
    rows = csv_rows(out / "moe-drop-r0.5" / "log.csv")
    assert list(rows[0]) == ["step", "tokens", "train_loss", "val_loss", "val_se", "aux_loss", "lr", "time"]
    assert [int(r["step"]) for r in rows] == list(range(0, 121, 5))
    assert int(rows[-1]["tokens"]) == 120 * 4 * 32
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == 13 and all(math.isfinite(v) for v in vals) and vals[-1] < vals[1]
    # the balancing loss is logged: positive and at most n_experts (= 4; f_i <= 1, sum_i P_i = 1). It has no
    # lower bound of 1 or top_k: perfect balance gives top_k, unbalanced routing can give less
    assert all(0.0 < float(r["aux_loss"]) <= 4.0 for r in rows[1:])
    ckpt = torch.load(out / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["step"] == 120 and ckpt["settings"]["r"] == 0.5
    with open(out / "summary.md") as f:
        assert "moe-drop-r0.5" in f.read()


def test_aux_loss_coef_is_an_moe_setting_the_upcycled_model_trains_with(drop_run, train_corpus, tmp_path, capsys,
                                                                        monkeypatch):
    # the balancing loss's weight is no part of the dense run (which has no router), and the upcycled model, whose
    # config drop_upcycle copies from the dense one, is trained with the weight the MoE run records
    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)
    trained_with, train_run = {}, train.train_run

    def recording_train_run(run, model, *rest):
        trained_with[run.name] = (model.config.aux_loss_coef, run.settings["model"]["aux_loss_coef"])
        return train_run(run, model, *rest)

    monkeypatch.setattr(train, "train_run", recording_train_run)
    code, stdout, err = run_main(["--init", "drop", "--r", "0.25", "--aux-loss-coef", "0", *tiny(train_corpus, out)], capsys)
    assert code == 0, err
    assert "reusing the finished dense model" in stdout
    assert trained_with == {"moe-drop-r0.25": (0.0, 0.0)}


def test_second_init_reuses_dense_and_naive_starts_at_the_dense_loss(drop_run, train_corpus, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)
    # a finished run of another r, as `--init drop --r 0.25` would have left it: no run of --init all
    shutil.copytree(out / "moe-drop-r0.5", out / "moe-drop-r0.25")
    settings = json.loads((out / "moe-drop-r0.25" / "settings.json").read_text())
    (out / "moe-drop-r0.25" / "settings.json").write_text(json.dumps(dict(settings, r=0.25)))
    code, stdout, err = run_main(["--init", "naive", *tiny(train_corpus, out)], capsys)
    assert code == 0, err
    assert "reusing the finished dense model" in stdout
    dense_final = float(csv_rows(out / "dense" / "log.csv")[-1]["val_loss"])
    naive_start = float(csv_rows(out / "moe-naive" / "log.csv")[0]["val_loss"])
    drop_start = float(csv_rows(out / "moe-drop-r0.5" / "log.csv")[0]["val_loss"])
    assert naive_start == pytest.approx(dense_final, abs=1e-5)  # identical experts: the dense function
    assert drop_start > naive_start + 1e-3  # half the FFN neurons re-initialised: worse at first
    summary = open(out / "summary.md").read()
    # every comparable finished run in the folder, whichever command trained it, and the MoE's shape
    assert "| moe-naive |" in summary and "| moe-drop-r0.5 |" in summary and "| moe-drop-r0.25 |" in summary
    assert "4 experts, top-2, balancing loss weight 0.02" in summary


def test_an_os_error_is_one_line_naming_its_file_where_it_has_one():
    assert data.os_error_text(FileNotFoundError(2, "No such file or directory", "x/y")) == "x/y: No such file or directory"
    assert data.os_error_text(OSError(28, "No space left on device")) == "No space left on device"  # no empty "':"


def test_summaries_list_dense_scratch_naive_then_drop_upcycling_by_r(tmp_path):
    names = ["moe-drop-r1", "moe-drop-r0.25", "dense", "moe-naive", "moe-drop-r0.5-indep", "moe-drop-r0.5",
             "moe-scratch", "moe-drop-r0.75", "not-a-run"]
    for name in names + ["unfinished"]:
        os.makedirs(tmp_path / name)
        if name != "unfinished":
            (tmp_path / name / "result.json").write_text("{}")
    assert plot.finished_run_names(str(tmp_path)) == [
        "dense", "moe-scratch", "moe-naive", "moe-drop-r0.25", "moe-drop-r0.5", "moe-drop-r0.5-indep", "moe-drop-r0.75",
        "moe-drop-r1", "not-a-run"]


def test_plot_py_command_line_helps_and_refuses_in_one_line(tmp_path):
    def plot_py(*args):
        return subprocess.run([sys.executable, "plot.py", *args], capture_output=True, text=True, env=ENV, cwd=HERE,
                              timeout=120)

    helped = plot_py("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: plot.py [-h] OUT_DIR") and not helped.stderr
    for args, message in [((str(tmp_path / "nothere"),), f"{tmp_path / 'nothere'}: not a folder"),
                          ((str(tmp_path),), "no finished dense run and MoE run to report"),
                          ((), "the following arguments are required: OUT_DIR")]:
        refused = plot_py(*args)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith("plot.py: error: ") and message in refused.stderr


def test_plot_py_redraws_the_summary_from_the_logs_alone(drop_run, train_corpus, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)
    assert run_main(["--init", "naive", *tiny(train_corpus, out)], capsys)[0] == 0
    written_by_train = (out / "summary.md").read_text()
    for leftover in ["summary.md", "loss_curves.png", "dense/ckpt.pt", "moe-naive/ckpt.pt", "moe-drop-r0.5/ckpt.pt"]:
        (out / leftover).unlink()  # runs copied from elsewhere: logs, settings and results, no checkpoints
    plot.report_from_logs(str(out))
    assert (out / "summary.md").read_text() == written_by_train
    assert os.path.getsize(out / "loss_curves.png") > 0
    # a run upcycled from another dense model is not compared with this one
    settings = json.loads((out / "moe-drop-r0.5" / "settings.json").read_text())
    settings["dense"]["steps"] += 1
    (out / "moe-drop-r0.5" / "settings.json").write_text(json.dumps(settings))
    plot.report_from_logs(str(out))
    assert "moe-drop-r0.5" not in (out / "summary.md").read_text()
    assert "upcycled from another dense model" in capsys.readouterr().out
    # one trained with other settings is left out too, and the note names what differs
    settings["dense"]["steps"] -= 1
    settings["model"]["aux_loss_coef"] *= 2
    (out / "moe-drop-r0.5" / "settings.json").write_text(json.dumps(settings))
    plot.report_from_logs(str(out))
    assert "moe-drop-r0.5" not in (out / "summary.md").read_text()
    assert f"note: {out / 'moe-drop-r0.5'} was trained with other settings (model): left out" in capsys.readouterr().out
    # a damaged dense run leaves nothing to compare with: an error, and the summary.md left there is named as old
    dense_result = (out / "dense" / "result.json").read_text()
    (out / "dense" / "result.json").write_text("{")
    with pytest.raises(data.Fail, match=r"compared with the dense run in .*dense \(the summary.md there is from before\)"):
        plot.report_from_logs(str(out))
    (out / "dense" / "result.json").write_text(dense_result)
    with pytest.raises(data.Fail, match="no finished dense run and MoE run to report"):  # one line, no traceback
        plot.report_from_logs(str(tmp_path))
    naive_settings = out / "moe-naive" / "settings.json"
    naive_text = naive_settings.read_text()
    naive_settings.write_text(json.dumps({k: v for k, v in json.loads(naive_text).items() if k != "model"}))
    # an MoE run's settings without its model, then the dense run's without anything: each named, not a KeyError
    with pytest.raises(data.Fail, match=r"moe-naive/settings.json is unreadable or not a train.py run's \(KeyError"):
        plot.report_from_logs(str(out))
    naive_settings.write_text(naive_text)
    (out / "dense" / "settings.json").write_text("{}")
    with pytest.raises(data.Fail, match=r"dense/settings.json is unreadable or not a train.py run's \(KeyError"):
        plot.report_from_logs(str(out))


@pytest.mark.parametrize("argv, message", [
    (["--sample", "RUN", "--init", "naive"], "--init has no effect with --sample, which takes only --prompt"),
    (["--sample", "RUN", "--reinit-ratio", "0.3"], "--reinit-ratio has no effect with --sample"),
    (["--sample", "RUN", "--no-compile"], "--no-compile has no effect with --sample"),
    (["--sample", "RUN", "--no-comp"], "--no-compile has no effect with --sample"),
    (["--prompt", "def g", "--moe-steps", "3"], "--prompt applies to --sample only"),
    (["--sample", "", "--device", "cpu"], "--sample needs a checkpoint file or a run folder"),
    (["--sample", "RUN", "--weight-decay", "0.1"], "--weight-decay has no effect with --sample"),  # its default
    (["--prompt", "def "], "--prompt applies to --sample only"),  # its default
])
def test_a_flag_that_sampling_or_training_would_ignore_is_refused(argv, message):
    with pytest.raises(data.Fail) as e:
        train.parse_args(argv)
    assert str(e.value).startswith(message), str(e.value)


def test_every_flag_sampling_uses_is_taken_with_sample():
    args = train.parse_args(["--sample", "RUN", "--prompt", "x", "--num-samples", "1", "--sample-tokens", "3",
                             "--temperature", "1", "--device", "cpu", "--seed", "1"])
    assert (args.sample, args.prompt, args.temperature, args.seed) == ("RUN", "x", 1.0, 1)


def test_sample_prints_text_from_a_checkpoint(drop_run, capsys, tmp_path):
    code, stdout, err = run_main(["--sample", str(drop_run[0] / "moe-drop-r0.5"), "--sample-tokens", "16",
                                  "--device", "cpu"], capsys)
    assert code == 0, err
    assert stdout.count("--- sample") == 2
    # a file that is no checkpoint is named as such, and not to be deleted: it is not a run's
    code, _, err = run_main(["--sample", os.path.join(HERE, "README.md"), "--device", "cpu"], capsys)
    line = assert_one_line_error(code, err)
    assert "README.md is unreadable (not a file torch.save wrote)" in line and "delete" not in line
    # a whole torch.save file holding Python objects is neither truncated nor loaded: unpickling them can run code
    torch.save(dict(model={}, settings=argparse.Namespace(lr=1)), tmp_path / "objects.pt")
    code, _, err = run_main(["--sample", str(tmp_path / "objects.pt"), "--device", "cpu"], capsys)
    line = assert_one_line_error(code, err)
    assert "objects.pt holds Python objects besides tensors and plain values: not a train.py checkpoint" in line
    # a folder without a checkpoint, and a checkpoint whose weights do not fit its own config
    code, _, err = run_main(["--sample", HERE, "--device", "cpu"], capsys)
    assert f"--sample {os.path.join(HERE, 'ckpt.pt')}: no checkpoint there" in assert_one_line_error(code, err)
    code, _, err = run_main(["--sample", str(drop_run[0]), "--device", "cpu"], capsys)  # the --out-dir, not a run
    assert "it holds the runs dense, moe-drop-r0.5: name one of their folders" in assert_one_line_error(code, err)
    ckpt = torch.load(drop_run[0] / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)
    ckpt["model_config"]["d_ff"] += 1
    torch.save(ckpt, tmp_path / "misfit.pt")
    code, _, err = run_main(["--sample", str(tmp_path / "misfit.pt"), "--device", "cpu"], capsys)
    assert "does not hold a model of its own config" in assert_one_line_error(code, err)


def test_a_run_under_dense_from_finds_its_tokenizer_folder_only_while_it_holds_that_tokenizer(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"model": "a"}')
    name = data.hf_tokenizer_name(str(folder / "tokenizer.json"))
    source = dict(path=str(folder), files=[])
    upcycled = dict(settings=dict(dense=dict(source=source)), tokenizer=name)  # its dense settings name the source
    scratch = dict(settings=dict(dense=None), tokenizer=name)  # no dense settings: no source
    assert runs.tokenizer_dir_of(upcycled) == str(folder)
    assert runs.tokenizer_dir_of(dict(settings=dict(source=source), tokenizer=name)) == str(folder)  # the dense run
    assert runs.tokenizer_dir_of(scratch) is None
    assert runs.tokenizer_dir_of(dict(scratch, tokenizer_dir=str(folder))) == str(folder)  # recorded outside the settings
    (folder / "tokenizer.json").write_text('{"model": "b"}')  # another tokenizer now: the run's is gone
    assert runs.tokenizer_dir_of(dict(scratch, tokenizer_dir=str(folder))) is None
    assert runs.tokenizer_dir_of(upcycled) is None


@pytest.mark.parametrize("argv, message", [
    (["--moe-stepz", "3"], "unrecognized option --moe-stepz (did you mean --moe-steps?) (see --help)"),
    (["--lr", "3e-3"], "unrecognized option --lr (did you mean --dense-lr or --moe-lr?)"),
    (["--zzzzzz", "--seeed=1"], "unrecognized options --zzzzzz, --seeed (did you mean --seed?)"),
    (["extra", "--moe-stepz", "3"],
     "unrecognized option --moe-stepz (did you mean --moe-steps?); unrecognized argument extra"),
    (["--dtpye", "x"], "unrecognized option --dtpye (see --help)"),  # nothing near enough: no guess
    (["-moe-steps", "3"], "unrecognized option -moe-steps (did you mean --moe-steps?)"),
    (["x", "y"], "unrecognized arguments: x y (see --help)"),
])
def test_a_misspelt_flag_is_named_alone_with_the_nearest_real_one(argv, message):
    # the words after an unknown flag are its value as far as the user knows; argparse could not tell
    with pytest.raises(data.Fail) as e:
        train.parse_args(argv)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--corpus-megabytes", "1"], "unrecognized option --corpus-megabytes (did you mean --corpus-mb?)"),
    (["--corpus-mb", "-1"], "argument --corpus-mb: must be 0 or more"),
    (["--tokenizer", "gtp2"], "argument --tokenizer: invalid choice: 'gtp2' (choose from 'byte', 'gpt2')")])
def test_data_py_bad_flag_is_one_line(tmp_path, flags, message):
    p = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--out-dir", str(tmp_path), *flags],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith(f"data.py: error: {message}") and p.stderr.count("\n") == 1
    assert not os.listdir(tmp_path)  # nothing cached


def test_a_token_cache_that_does_not_fit_on_the_disk_is_one_line_and_never_used(tmp_path):
    # a file-size limit makes every write past 4 KB fail, as a full disk does. Many small files, each written in
    # a few hundred bytes: a writer that buffers them and drops the error of its last flush keeps a short cache
    import resource
    os.makedirs(tmp_path / "corpus")
    for i in range(40):
        (tmp_path / "corpus" / f"m{i}.py").write_text("".join(f"x{i}_{j} = {j}\n" for j in range(30)))

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    p = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--data", str(tmp_path / "corpus"),
                        "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, env=ENV, timeout=60,
                       preexec_fn=small_disk)
    assert p.returncode == 1 and p.stderr.startswith("data.py: error: could not write the token cache"), p.stderr
    assert p.stderr.count("\n") == 1
    cache = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs]
    assert not [f for f in cache if f.endswith((".tmp", "meta.json"))], cache


def test_help_has_one_line_per_option():
    parser = train.build_parser()
    for action in parser._actions:
        assert action.help and "\n" not in action.help, action.option_strings


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    lrs = [train.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert train.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    peak, warmup, steps = 2.0, 10, 110  # a cosine, not any falling line between the two ends
    for step in (10, 35, 60, 85, 110):
        progress = (step - warmup) / (steps - warmup)
        expected = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert train.lr_at(step, steps, peak, warmup) == pytest.approx(expected, rel=1e-9), step


def test_overtake_step_is_the_last_sign_change():
    steps = np.array([0, 10, 20, 30, 40])
    assert plot.overtake_step(steps, np.array([0.1, 0.05, -0.01, -0.02, -0.03])) == 20
    assert plot.overtake_step(steps, np.array([0.1, -0.05, 0.01, -0.02, -0.03])) == 30
    assert plot.overtake_step(steps, np.array([0.1, 0.05, 0.01, 0.02, -0.0])) is None


def test_the_difference_panel_shows_each_final_gap_with_the_noise_the_summary_table_gives():
    # from scratch: a large gap and a large noise; r = 0.5: a small gap, small noise, above naive. One band at the
    # largest noise would put r = 0.5 inside it ("level") while the table says "above naive".
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = np.array([0, 10, 20])
    curve = lambda losses: (steps, steps * 1000, np.array(losses), np.full(3, 0.01))
    curves = {"moe-naive": curve([2.0, 1.8, 1.6]), "moe-scratch": curve([5.0, 2.4, 2.0]),
              "moe-drop-r0.5": curve([2.5, 1.9, 1.612])}
    rng = np.random.default_rng(0)
    naive_batches = list(1.6 + rng.normal(0, 0.05, 8))
    results = {"moe-naive": dict(final_val_batches=naive_batches),
               "moe-scratch": dict(final_val_batches=list(np.array(naive_batches) + 0.4 + rng.normal(0, 0.03, 8))),
               "moe-drop-r0.5": dict(final_val_batches=list(np.array(naive_batches) + 0.012 + rng.normal(0, 0.002, 8)))}
    fig, ax = plt.subplots()
    plot.diff_to_naive_panel(ax, curves, list(curves), {n: "C0" for n in curves}, results)
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    assert len(bars) == 2
    for name, bar in zip(["moe-scratch", "moe-drop-r0.5"], bars):
        gap, noise, verdict = plot.compare_to_naive(curves[name], curves["moe-naive"],
                                                    results[name]["final_val_batches"], naive_batches)
        (segment,) = bar.lines[2][0].get_segments()
        assert segment[:, 1] == pytest.approx([gap - noise, gap + noise])
        assert (verdict == "above naive") == (segment[:, 1].min() > 0)
    plt.close(fig)


# -----------------------------------------------------------------------------
# no lost work: interrupt and resume, NaN, failed saves


def test_sigint_saves_and_resume_reproduces_the_uninterrupted_run_exactly(drop_run, train_corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, TRAIN_PY, "--init", "drop", "--r", "0.5", *tiny(train_corpus, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=HERE)
    for line in proc.stdout:  # interrupt once the MoE phase is under way
        if line.startswith("[moe-drop-r0.5] step 10/"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, stderr
    assert "Traceback" not in stderr and "--resume" in stdout
    ckpt = torch.load(out / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)
    assert not ckpt["finished"] and 10 <= ckpt["step"] < 120
    resumed = cli(["--init", "drop", "--r", "0.5", "--resume", *tiny(train_corpus, out)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {ckpt['step']}/120" in resumed.stdout
    reference = csv_rows(drop_run[0] / "moe-drop-r0.5" / "log.csv")
    rows = csv_rows(out / "moe-drop-r0.5" / "log.csv")
    drop_time = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]
    assert drop_time(rows) == drop_time(reference)  # every loss, bit for bit
    final = torch.load(out / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)["model"]
    ref_final = torch.load(drop_run[0] / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)


@pytest.mark.parametrize("tool", ["train.py", "analyze.py", "hf.py", "data.py", "plot.py", "bench.py"])
def test_ctrl_c_while_torch_imports_ends_the_tool_by_sigint_without_a_traceback(tool, tmp_path):
    # -X importtime prints each import as it completes: a torch submodule's line means torch's import is under way
    command = tool_with_exec_at_exit(tool)
    proc = subprocess.Popen([command[0], "-X", "importtime", *command[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path, preexec_fn=sigint_default)
    try:
        for line in proc.stderr:
            if line.split("|")[-1].strip().startswith("torch."):
                proc.send_signal(signal.SIGINT)
                break
        out, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # death by SIGINT (not an ordinary exit status), so that a shell script running the tool stops as well
    assert proc.returncode == -signal.SIGINT, rest[-2000:]
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    assert "interrupted" not in rest and not out  # during the imports, not in train.py's or analyze.py's main()


def test_sigterm_during_dense_phase_saves_a_checkpoint(train_corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, TRAIN_PY, "--init", "dense", *tiny(train_corpus, out, dense_steps=2000)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=HERE)
    for line in proc.stdout:
        if line.startswith("[dense] step 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "Traceback" not in stderr
    assert os.path.exists(out / "dense" / "ckpt.pt"), stdout
    ckpt = torch.load(out / "dense" / "ckpt.pt", weights_only=True)
    assert 5 <= ckpt["step"] < 2000 and "optimizer" in ckpt


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(train_corpus, tmp_path, capsys, monkeypatch):
    real_lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, *a: float("nan") if step >= 12 else real_lr_at(step, *a))
    code, _, err = run_main(["--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)
    line = assert_one_line_error(code, err)
    assert "at step 14" in line and "step 10) is kept" in line  # update 13 wrote NaNs: step 14 sees them
    ckpt = torch.load(tmp_path / "dense" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_automatic_garbage_collection_is_off_while_training_and_back_on_after_even_a_failure(train_corpus, tmp_path,
                                                                                             capsys, monkeypatch):
    import gc
    enabled_during_steps, collections = [], []
    real_step, real_lr_at = train.train_step, train.lr_at
    monkeypatch.setattr(train, "train_step", lambda *a: enabled_during_steps.append(gc.isenabled()) or real_step(*a))
    gc.callbacks.append(lambda phase, info: phase == "start" and not gc.isenabled() and collections.append(info["generation"]))
    try:
        code, _, _ = run_main(["--init", "dense", *tiny(train_corpus, tmp_path / "ok", dense_steps=20)], capsys)
        assert code == 0 and len(enabled_during_steps) == 20 and not any(enabled_during_steps) and gc.isenabled()
        assert 1 in collections and 2 in collections  # while training: the young at log rows, all at checkpoints
        monkeypatch.setattr(train, "lr_at", lambda step, *a: float("nan") if step >= 3 else real_lr_at(step, *a))
        code, _, err = run_main(["--init", "dense", *tiny(train_corpus, tmp_path / "nan", dense_steps=10)], capsys)
        assert code != 0 and "loss became nan" in err and gc.isenabled()
    finally:
        gc.callbacks.pop()
        gc.enable()


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_mid_write(obj, f):
        real_save(obj, f)
        f.seek(0)
        f.truncate(10)  # half-written file ...
        raise OSError(28, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(data.Fail, match="previous checkpoint is unchanged"):
        train.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


# -----------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, no traceback


def test_cli_errors_for_invalid_r_and_missing_data_are_one_line(tmp_path):
    for args, expected in [(["--init", "drop", "--r", "1.5"], "--r/--reinit-ratio: must be in [0, 1]"),
                           (["--data", str(tmp_path / "missing")], "no such file or folder")]:
        result = cli([*args, "--out-dir", str(tmp_path / "out")])
        line = assert_one_line_error(result.returncode, result.stderr)
        assert expected in line and result.stdout.count("step") == 0


@pytest.mark.parametrize("flags, expected", [
    (["--r", "abc", "--init", "drop"], "invalid number value: 'abc'"),
    (["--r", "-0.1", "--init", "drop"], "must be in [0, 1]"),
    (["--r", "0.5", "--init", "naive"], "--r applies to --init drop only"),
    (["--r", "0.01", "--init", "drop"], "--r 0.01 re-initialises none of an expert's 64 neurons"),
    (["--init", "bogus"], "invalid choice: 'bogus'"),
    (["--top-k", "5"], "top_k (5) must be between 1 and n_experts (4)"),
    (["--n-experts", "1"], "at least 2 experts"),
    (["--d-model", "30", "--n-head", "4"], "--n-head 4 must divide --d-model 30"),
    (["--n-kv-head", "3", "--n-head", "4"], "n_kv_head (3) must divide n_head (4)"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--seq-len", "-3"], "--seq-len: must be a positive integer"),
    (["--dense-lr", "0"], "--dense-lr: must be a positive number"),
    (["--seq-len", "100000"], "fewer than --seq-len + 2"),
])
def test_bad_flags_give_one_clear_line(flags, expected, train_corpus, tmp_path, capsys):
    code, _, err = run_main([*tiny(train_corpus, tmp_path), *flags], capsys)
    assert expected in assert_one_line_error(code, err)


def test_bad_data_gives_one_clear_line(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    binary_only = tmp_path / "binary"
    binary_only.mkdir()
    (binary_only / "x.py").write_bytes(b"\0" * 100)
    big_ids = tmp_path / "tokens.bin"
    np.array([1, 2, 300, 4] * 100, dtype=np.uint16).tofile(big_ids)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    for path, expected in [(empty, "no text files found"), (binary_only, "no text found"),
                           (":stdlb", ":stdlb: no such file or folder (the built-in corpora are :stdlib and :python)"),
                           (big_ids, "token id 300 is outside the vocabulary"), (odd, "holds uint16 values")]:
        code, _, err = run_main(tiny(str(path), tmp_path / "out"), capsys)
        assert expected in assert_one_line_error(code, err), path
    # an unreadable file (as root, permissions do not stop reads: make open() fail the way it would)
    unreadable = write_corpus(str(tmp_path / "unreadable"))
    target = os.path.join(unreadable, "src3.c")

    def deny(path, *a, **kw):
        if path == target:
            raise PermissionError(13, "Permission denied", path)
        return open(path, *a, **kw)

    monkeypatch.setattr(data, "open", deny, raising=False)
    code, _, err = run_main(tiny(unreadable, tmp_path / "out2"), capsys)
    assert f"cannot read {target}: Permission denied" in assert_one_line_error(code, err)


def test_a_token_file_is_refused_for_a_vocabulary_its_uint16_ids_cannot_hold(tmp_path):
    # Llama 3's 128,256 ids: read as uint16, an id and its high half would each pass as a token of the vocabulary
    tokens = tmp_path / "tokens.bin"
    np.array([109097, 81694, 5] * 100, dtype=np.uint32).tofile(tokens)
    with pytest.raises(data.Fail) as e:
        data.load_token_file(str(tokens), "hf-llama", types.SimpleNamespace(n_vocab=128_256), seq_len=32)
    assert "too narrow for this tokenizer's 128,256 tokens" in str(e.value)


def test_token_file_data_trains(tmp_path, capsys):
    tokens = tmp_path / "tokens.bin"
    np.frombuffer(("int main(void) { return 0; }\n" * 400).encode(), dtype=np.uint8).astype(np.uint16).tofile(tokens)
    code, stdout, err = run_main(["--init", "dense", *tiny(str(tokens), tmp_path / "out")], capsys)
    assert code == 0, err
    assert "split by position" in stdout


def test_gpt2_tokenizer_offline_is_one_clear_line(train_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))  # no cached BPE files ...
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):  # ... and no network
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    code, _, err = run_main(["--tokenizer", "gpt2", *tiny(train_corpus, tmp_path / "out")], capsys)
    assert "--tokenizer gpt2: tiktoken could not load its BPE files" in assert_one_line_error(code, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_device_cuda_without_cuda(device, train_corpus, tmp_path, capsys):
    code, _, err = run_main([*tiny(train_corpus, tmp_path), "--device", device], capsys)
    assert f"--device {device}: CUDA is not available" in assert_one_line_error(code, err)
    with pytest.raises(data.Fail, match="CUDA is not available"):  # without --preset, the preset follows the device
        train.parse_args(["--data", train_corpus, "--device", device])


def test_unwritable_out_dir(train_corpus, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_main(tiny(train_corpus, blocker / "out"), capsys)
    assert "cannot create folder" in assert_one_line_error(code, err)


def test_resume_errors(drop_run, train_corpus, tmp_path, capsys):
    import shutil

    # nothing to resume
    code, _, err = run_main(["--resume", "--init", "drop", *tiny(train_corpus, tmp_path / "fresh")], capsys)
    assert "no checkpoint" in assert_one_line_error(code, err)
    assert not (tmp_path / "fresh").exists()  # no empty folder (with a lock file) left behind
    # a checkpoint made with other settings: refused with the difference, with or without --resume
    out = tmp_path / "copy"
    shutil.copytree(drop_run[0], out)
    for extra in ([], ["--resume"]):
        code, _, err = run_main([*extra, "--init", "drop", *tiny(train_corpus, out), "--d-ff", "128"], capsys)
        line = assert_one_line_error(code, err)
        assert "other settings" in line and "model.d_ff: 64 -> 128" in line
    # a truncated checkpoint, and one that is garbage
    ckpt = out / "moe-drop-r0.5" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    code, _, err = run_main(["--resume", "--init", "drop", *tiny(train_corpus, out)], capsys)
    assert "is unreadable (truncated or corrupt" in assert_one_line_error(code, err)
    ckpt.write_bytes(b"not a checkpoint at all")
    code, _, err = run_main(["--resume", "--init", "drop", *tiny(train_corpus, out)], capsys)
    assert "is unreadable" in assert_one_line_error(code, err)


def test_a_finished_runs_damaged_files_are_found_before_training(drop_run, train_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)
    (out / "dense" / "settings.json").write_text("{bad")  # a copy of the checkpoint's settings: written again
    (out / "moe-drop-r0.5" / "result.json").write_text("{bad")  # made only by training: said before any
    code, stdout, err = run_main(["--init", "all", *tiny(train_corpus, out)], capsys)  # scratch, the first, is new
    assert code == 0, err
    warning = stdout.index("moe-drop-r0.5: a finished run whose result.json or log.csv is missing or damaged")
    assert warning < stdout.index("--- MoE run 1/")
    assert json.loads((out / "dense" / "settings.json").read_text())["phase"] == "dense"
    summary = (out / "summary.md").read_text()
    assert "| dense |" in summary and "| moe-scratch |" in summary and "| moe-drop-r0.5 |" not in summary


def test_unfinished_run_is_not_overwritten_without_resume(train_corpus, tmp_path, capsys, monkeypatch):
    real_lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, *a: float("nan") if step >= 12 else real_lr_at(step, *a))
    run_main(["--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)  # dies at step 13, ckpt at 10
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    code, _, err = run_main(["--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)
    assert "unfinished run (step 10/40): pass --resume" in assert_one_line_error(code, err)


def test_cuda_oom_is_reported_with_sizes_and_a_suggestion(train_corpus, tmp_path, capsys, monkeypatch):
    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_run", oom)
    code, _, err = run_main(["--init", "dense", *tiny(train_corpus, tmp_path)], capsys)
    line = assert_one_line_error(code, err)
    assert "4 x 32 = 128 tokens" in line and "--batch-size 2 --grad-accum 2" in line
    # sampling takes no batch flags: its suggestion is its own
    monkeypatch.setattr(train, "sample", oom)
    code, _, err = run_main(["--sample", str(tmp_path), "--device", "cpu"], capsys)
    assert "out of memory while sampling: try fewer --num-samples or --sample-tokens" in assert_one_line_error(code, err)


def test_compile_is_used_only_where_it_agrees_with_eager_mode(monkeypatch, capsys):
    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper: the real compile is too slow here
        def __init__(self, model, shift=0.0, **kwargs):
            super().__init__()
            self.model, self.shift, self.kwargs = model, shift, kwargs

        def forward(self, *a):
            logits, loss = self.model(*a)
            return logits, loss + self.shift

    cfg = train.ModelConfig(vocab_size=257, d_model=32, n_layer=2, n_head=2, n_kv_head=2, d_ff=64, max_seq_len=16,
                            n_experts=4)
    model = train.Transformer(cfg)
    x = torch.randint(0, 257, (2, 16))
    monkeypatch.setattr(torch, "compile", Compiled)
    compiled = train.training_module(model, True, (x, x), "moe")
    assert isinstance(compiled, Compiled) and compiled.model is model
    assert compiled.kwargs["options"]["triton.max_tiles"] == 1  # through compile_model
    monkeypatch.setattr(torch, "compile", lambda m, **kw: Compiled(m, shift=0.01))  # a compiler that gets it wrong
    assert train.training_module(model, True, (x, x), "moe") is model
    assert "WARNING: the compiled model disagrees with eager mode" in capsys.readouterr().out


def test_a_compiled_model_is_evaluated_with_its_training_graph_and_compiled_once(monkeypatch):
    """The check, the evaluations and the training steps all run one graph: an evaluation under no_grad would make
    torch.compile trace and compile a second one. What an evaluation reports is the cross-entropy alone."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager"))  # dynamo's graphs, no compiler
    monkeypatch.setattr(dropupcycle, "moe_path", lambda device: "dense")  # one graph (the CPU's loop has breaks)
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, d_model=32, n_layer=2, n_head=2, n_kv_head=2, d_ff=64, max_seq_len=16,
                      n_experts=4)
    model = Transformer(cfg)
    batches = [(torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16))) for _ in range(2)]
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = train.training_module(model, True, batches[0], "moe")
    assert compiled is not model
    mean, _, losses = train.evaluate(model, compiled, batches, torch.device("cpu"))
    compiled(*batches[0])[1].backward()  # a training step's forward and backward
    assert counters["stats"]["unique_graphs"] == 1
    with torch.no_grad():
        expected = [torch.nn.functional.cross_entropy(model(x)[0].view(-1, 257), y.reshape(-1)).item() for x, y in batches]
    assert model.aux_loss > 1  # the balancing loss (about top_k), which the evaluation leaves out
    assert losses == pytest.approx(expected, abs=1e-5) and mean == pytest.approx(sum(expected) / 2, abs=1e-5)
    torch._dynamo.reset()


def test_an_evaluation_with_gradients_takes_the_steps_pieces_and_keeps_one_pieces_activations_at_a_time():
    """On a GPU that training cuts each micro-batch into pieces for, an evaluation that kept a whole batch's (or a
    previous piece's) activations would run out of memory where training does not."""
    class Compiled(torch.nn.Module):  # a stand-in for torch.compile's wrapper (its _orig_mod): records each call
        def __init__(self, model):
            super().__init__()
            self._orig_mod, self.rows, self.outputs_alive, self.outputs = model, [], [], []

        def forward(self, x, y):
            self.outputs_alive.append(sum(ref() is not None for ref in self.outputs))
            self.rows.append(x.shape[0])
            logits, loss = self._orig_mod(x, y)
            self.outputs.append(weakref.ref(loss))
            return logits, loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layer=2, n_head=2, n_kv_head=2, d_ff=64,
                                    max_seq_len=16, n_experts=4))
    batches = [(torch.randint(0, 257, (8, 16)), torch.randint(0, 257, (8, 16))) for _ in range(2)]
    compiled = Compiled(model)
    whole = train.evaluate(model, model, batches, torch.device("cpu"))
    in_pieces = train.evaluate(model, compiled, batches, torch.device("cpu"), split=4)
    assert compiled.rows == [2] * 8 and compiled.outputs_alive == [0] * 8
    assert in_pieces[2] == pytest.approx(whole[2], abs=1e-5)  # the mean of equal pieces' means: the batch's mean


def test_cuda_graphs_are_used_on_one_gpu_for_steps_of_one_piece_only(monkeypatch):
    """A graph's replay writes over the last one's outputs and gradients: gradients added up over several pieces,
    and DDP's or FSDP's hooks, stay in torch.compile's default mode (and the CPU has no graphs)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train.compile_mode(cuda, 1, 1) == "reduce-overhead"
    assert train.compile_mode(cuda, 2, 1) is None and train.compile_mode(cpu, 1, 1) is None
    assert train.compile_mode(cuda, 1, 2) is None
    # training_module asks for the mode of the whole step: grad_accum micro-batches, each in split pieces
    asked, given = [], []
    monkeypatch.setattr(train, "compile_mode", lambda device, pieces, processes: asked.append(pieces) or "reduce-overhead")
    monkeypatch.setattr(train, "compile_model", lambda m, mode=None: given.append(mode) or m)
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layer=1, n_head=2, n_kv_head=2, d_ff=64,
                                    max_seq_len=16))
    x = torch.randint(0, 257, (4, 16))
    train.training_module(model, True, (x, x), "dense", split=2, grad_accum=3)
    assert asked == [6] and given == ["reduce-overhead"]


EVENTS = []  # what the stand-in below and the graphs' step marker were asked to do, in order


class Replayed(torch.nn.Module):
    """A stand-in for a model compiled with CUDA graphs (its _orig_mod): each call writes over the memory of the
    last call's outputs, the balancing loss included, as a graph's replay does."""
    def __init__(self, model):
        super().__init__()
        self._orig_mod, self.last_outputs = model, []

    def forward(self, x, y):
        EVENTS.append("forward")
        for t in self.last_outputs:
            t.detach().fill_(float("nan"))
        logits, loss = self._orig_mod(x, y)
        self.last_outputs = [loss] + ([self._orig_mod.aux_loss] if self._orig_mod.config.is_moe else [])
        return logits, loss


@pytest.mark.parametrize("n_experts", [1, 4])
def test_logged_losses_outlive_the_next_replay_and_each_forward_begins_a_graph_step(n_experts, monkeypatch):
    """The losses train_step returns wait in the log until the next log row; under CUDA graphs later steps'
    replays write over the model's outputs, so what is kept must be copies. Every forward, in training and in
    evaluation, first tells the graphs that a new step begins."""
    EVENTS.clear()
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: EVENTS.append("begin"))
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, n_kv_head=2, d_ff=64, max_seq_len=16,
                      n_experts=n_experts)
    tokens = np.random.default_rng(0).integers(0, 64, size=4000).astype(np.uint16)
    settings = dict(lr=1e-3, steps=10, warmup=0, seed=0, phase="moe" if cfg.is_moe else "dense", batch_size=4,
                    seq_len=16, grad_accum=1, grad_clip=1.0)
    logged = {}
    for name in ("eager", "replayed"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        train_model = model if name == "eager" else Replayed(model)
        optimizer = train.make_optimizer(model, 1e-3, 0.1, torch.device("cpu"))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        steps = [train.train_step(model, train_model, optimizer, scaler, settings, step, tokens, torch.device("cpu"), 1)
                 for step in range(3)]
        batches = [(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))) for _ in range(3)]
        val = train.evaluate(model, train_model, batches, torch.device("cpu"))[2]
        logged[name] = [float(v) for _, ce, aux in steps for v in (ce, aux)] + val
    assert np.isfinite(logged["replayed"]).all() and logged["replayed"] == pytest.approx(logged["eager"], abs=1e-6)
    assert EVENTS == ["begin", "forward"] * (3 + 3)  # the replayed model's 3 steps and 3 evaluation batches


def test_report_gives_runs_outside_init_all_a_colour_of_their_own():
    # the default colour cycle starts with naive Upcycling's blue: r = 0.5-indep was drawn in it once
    runs = ["moe-naive", "moe-drop-r0.5", "moe-drop-r0.5-indep", "moe-drop-r0.75", "moe-drop-r0.1", "moe-drop-r0.25"]
    others = [plot.color_of(name, runs) for name in runs[3:]]
    assert len(set(others)) == len(others) and not set(others) & set(plot.COLORS.values())
    assert plot.color_of("moe-naive", runs) == "tab:blue"



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_batches_from_the_corpus_on_the_gpu_equal_those_gathered_on_the_host(device):
    tokens = np.random.default_rng(0).integers(0, 257, size=5000).astype(np.uint16)
    on_device = torch.from_numpy(tokens.astype(np.int32)).to(device)  # what data.corpus_to_device makes on a GPU
    for part in [(0, 1), (1, 2)]:
        x, y = data.get_batch(tokens, 8, 16, np.random.default_rng(3), torch.device(device), part)
        x2, y2 = data.get_batch(on_device, 8, 16, np.random.default_rng(3), torch.device(device), part)
        assert x2.dtype == x.dtype == torch.int64 and torch.equal(x, x2) and torch.equal(y, y2)
    # on a GPU the window starts cross through pinned buffers, copied while the GPU still runs earlier work: each
    # buffer must stay untouched until its copy is done, also when the next batches are made meanwhile
    busy = torch.randn(*[4096 if device == "cuda" else 64] * 2, device=device)
    host_rng, device_rng, batches = np.random.default_rng(5), np.random.default_rng(5), []
    for _ in range(20):
        busy = busy @ busy / 64  # queued work the copies wait behind
        batches.append(data.get_batch(on_device, 8, 16, device_rng, torch.device(device)))
    for x2, _ in batches:
        x, _ = data.get_batch(tokens, 8, 16, host_rng, torch.device("cpu"))
        assert torch.equal(x, x2.cpu())


# -----------------------------------------------------------------------------
# faults that must not get through: runs compared that were not measured alike, checkpoints of broken weights,
# the tool eating its own output, odd corpora, full disks, signals during a save, values too large, damaged files,
# two writers, inexact resumes


def nan_lr_from(monkeypatch, first_step, phase_steps=None):
    """From optimizer step first_step on (of the phase with phase_steps steps, or any), the learning rate is NaN:
    that update writes NaN weights. Returns the real lr_at."""
    real = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, steps, *a: float("nan") if step >= first_step and
                        phase_steps in (None, steps) else real(step, steps, *a))
    return real


def test_resume_with_a_changed_scoring_setting_is_refused_naming_it(train_corpus, tmp_path, capsys, monkeypatch):
    real = nan_lr_from(monkeypatch, 12)
    run_main(["--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)  # unfinished, ckpt at 10
    monkeypatch.setattr(train, "lr_at", real)
    for flag, value, key in [("--eval-batches", "3", "eval_batches: 2 -> 3"), ("--eval-interval", "20", "eval_interval: 10 -> 20"),
                             ("--log-interval", "10", "log_interval: 5 -> 10")]:
        code, _, err = run_main(["--resume", "--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40), flag, value], capsys)
        line = assert_one_line_error(code, err)
        assert "other settings" in line and key in line, flag
    code, stdout, err = run_main(["--resume", "--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)
    assert code == 0 and "resuming at step 10/40" in stdout, err


def test_summary_never_puts_runs_scored_differently_side_by_side(drop_run, train_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)
    # a finished drop run scored on 3 validation batches (as an older command could have left it)
    path = out / "moe-drop-r0.5" / "settings.json"
    settings = json.loads(path.read_text())
    settings["eval_batches"] = 3
    path.write_text(json.dumps(settings))
    code, _, err = run_main(["--init", "naive", *tiny(train_corpus, out)], capsys)
    assert code == 0, err
    summary = (out / "summary.md").read_text()
    assert "| moe-naive |" in summary and "moe-drop-r0.5" not in summary


def test_weights_that_turned_nan_are_never_checkpointed_resume_works_and_sampling_nan_weights_is_one_line(
        train_corpus, tmp_path, capsys, monkeypatch):
    # checkpoints at 7 and 14 (neither a log nor an eval step); update 13 writes NaN weights after step 14's
    # loss was computed: only the evaluation before the save can see them
    flags = [*tiny(train_corpus, tmp_path, dense_steps=40), "--ckpt-interval", "7"]
    real = nan_lr_from(monkeypatch, 13)
    code, _, err = run_main(["--init", "dense", *flags], capsys)
    line = assert_one_line_error(code, err)
    assert "weights after step 14" in line and "step 7) is kept" in line
    ckpt = torch.load(tmp_path / "dense" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 7 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    monkeypatch.setattr(train, "lr_at", real)
    code, stdout, err = run_main(["--resume", "--init", "dense", *flags], capsys)
    assert code == 0 and "resuming at step 7/40" in stdout, err
    # a checkpoint with NaN weights (from elsewhere): --sample says so in one line
    bad = torch.load(tmp_path / "dense" / "ckpt.pt", weights_only=True)
    next(iter(bad["model"].values())).fill_(float("nan"))
    torch.save(bad, tmp_path / "nan.pt")
    code, _, err = run_main(["--sample", str(tmp_path / "nan.pt"), "--device", "cpu", "--sample-tokens", "4"], capsys)
    assert "non-finite weights" in assert_one_line_error(code, err)


def test_out_dir_inside_the_data_folder_is_not_corpus_cache_reused_and_resume_works(tmp_path, capsys, monkeypatch):
    folder = write_corpus(str(tmp_path / "data"))
    out = os.path.join(folder, "out")
    code, stdout, err = run_main(["--init", "dense", *tiny(folder, out)], capsys)
    assert code == 0 and "tokenizing" in stdout, err
    real = nan_lr_from(monkeypatch, 12, phase_steps=40)  # the MoE phase dies after its checkpoint at step 10
    code, stdout, err = run_main(["--init", "naive", *tiny(folder, out, moe_steps=40)], capsys)
    assert "tokenizing" not in stdout and "reusing the finished dense model" in stdout, stdout + err
    assert "moe-naive/ckpt.pt, step 10) is kept" in assert_one_line_error(code, err)
    monkeypatch.setattr(train, "lr_at", real)
    code, stdout, err = run_main(["--resume", "--init", "naive", *tiny(folder, out, moe_steps=40)], capsys)
    assert code == 0 and "resuming at step 10/40" in stdout and "tokenizing" not in stdout, err
    # the data folder itself as --out-dir: its checkpoints would be corpus the next time, so it is refused
    code, _, err = run_main(["--init", "dense", *tiny(folder, folder)], capsys)
    assert "--out-dir" in assert_one_line_error(code, err)


@pytest.mark.parametrize("as_folder", [False, True])
def test_one_file_corpus_is_split_by_position_whatever_its_name(as_folder, tmp_path, capsys):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(600))
    path = tmp_path / "corpus" / "input.txt"
    path.parent.mkdir()
    path.write_text(text)
    source = str(path.parent if as_folder else path)
    args = train.parse_args(tiny(source, tmp_path / "out"))
    train_tokens, val_tokens, info = data.load_data(args.data, args.tokenizer, data.get_tokenizer("byte"), args.out_dir,
                                                    args.corpus_mb, args.seq_len)
    everything = list(text.encode()) + [256]
    n_val = int(len(everything) * data.VAL_FRACTION)
    assert list(train_tokens) == everything[:-n_val] and list(val_tokens) == everything[-n_val:]
    assert "(one file: split by position" in info["description"] and "1 file (1 other text)" in info["description"]
    code, _, err = run_main(["--init", "dense", *tiny(source, tmp_path / "out")], capsys)
    assert code == 0, err


def test_a_corpus_whose_validation_files_hold_no_text_is_split_by_position_and_says_why(tmp_path):
    folder = write_corpus(str(tmp_path / "data"))
    _, val_files = data.select_files(data.list_files(folder), 0)
    for _, path, _, _ in val_files:
        with open(path, "wb") as f:
            f.write(b"\0" * 64)  # binary: left out
    info = load_corpus(folder, tmp_path / "out")[2]
    assert "(no text in the validation files: split by position" in info["description"], info["description"]


@pytest.mark.parametrize("where, expected", [
    ("torch.save", "could not write checkpoint"),
    ("token cache", "could not write the token cache"),
    ("savefig", "loss_curves.png"),
    ("log.csv.tmp", "log.csv"),
    ("summary.md.tmp", "summary.md"),
    ("result.json.tmp", "result.json"),
    ("settings.json.tmp", "settings.json"),
    (".lock", ".lock"),
])
def test_a_full_disk_anywhere_is_one_line_and_leaves_no_temporary_file(where, expected, train_corpus, tmp_path, capsys,
                                                                         monkeypatch):
    import builtins
    import matplotlib.figure

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    if where == "torch.save":  # torch's writer reports a full disk as a RuntimeError
        def full_save(obj, f, *a, **kw):
            f.write(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/3: file write failed")
        monkeypatch.setattr(torch, "save", full_save)
    elif where == "token cache":
        real_write_tokens = data.write_tokens

        def write_half(files, enc, out_path, seen):
            real_write_tokens(files, enc, out_path, seen)
            full()
        monkeypatch.setattr(data, "write_tokens", write_half)
    elif where == "savefig":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    else:
        real_open = builtins.open
        monkeypatch.setattr(builtins, "open", lambda path, *a, **kw: full() if str(path).endswith(where) else real_open(path, *a, **kw))
    code, _, err = run_main(["--init", "dense", *tiny(train_corpus, tmp_path / "out")], capsys)
    line = assert_one_line_error(code, err)
    assert expected in line and ("No space left on device" in line or "file write failed" in line), line
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".tmp")]
    assert not leftovers


def test_a_signal_that_arrives_in_the_middle_of_a_print_is_still_announced_and_honoured(tmp_path, monkeypatch):
    # a handler runs between two bytecodes of the main thread, possibly inside its print to the same stream, where a
    # second print raises "reentrant call inside BufferedWriter" (a rank died of that in a torchrun test)
    import io
    import runs

    class SignalMidWrite(io.FileIO):
        def write(self, b):
            if b"step 5" in bytes(b):
                runs.on_signal(signal.SIGTERM, None)
            return super().write(b)

    path = tmp_path / "stdout.txt"
    stream = io.TextIOWrapper(io.BufferedWriter(SignalMidWrite(path, "w")), write_through=False)
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setitem(runs.STOP, "training", True)
    monkeypatch.setitem(runs.STOP, "signal", None)
    print("[dense] step 5/40 | loss 1.0", flush=True)
    stream.flush()
    assert runs.STOP["signal"] == signal.SIGTERM
    assert "SIGTERM received: saving a checkpoint after this step" in path.read_text()


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_a_save_lets_the_save_finish_and_exits_with_one_line(second, train_corpus, tmp_path, capsys,
                                                                                   monkeypatch):
    real_lr_at, real_save = train.lr_at, torch.save

    def lr_at(step, *a):
        if step == 12:  # first Ctrl-C: finish step 13, save, stop
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, *a)

    def save(obj, f, *a, **kw):
        if obj.get("step") == 13:  # second Ctrl-C, in the middle of writing that checkpoint
            f.write(b"the first bytes")
            assert signal.getsignal(second) is runs.on_signal  # else SIGTERM would end pytest itself
            os.kill(os.getpid(), second)
            f.seek(0)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(train, "lr_at", lr_at)
    monkeypatch.setattr(torch, "save", save)
    code, stdout, err = run_main(["--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)
    lines = err.strip().splitlines()
    assert code == 128 + second and len(lines) == 1 and lines[0].startswith("train.py: interrupted"), err
    assert os.listdir(tmp_path / "dense") and not [f for f in os.listdir(tmp_path / "dense") if f.endswith(".tmp")]
    ckpt = torch.load(tmp_path / "dense" / "ckpt.pt", weights_only=True)  # complete: the save was not cut short
    assert ckpt["step"] == 13
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    code, stdout, err = run_main(["--resume", "--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)
    assert code == 0 and "resuming at step 13/40" in stdout, err


@pytest.mark.parametrize("flag, value", [("--seed", str(2**64)), ("--seed", str(2**31)), ("--batch-size", str(2**40)),
                                         ("--dense-steps", str(2**63)), ("--dense-lr", "1e400"), ("--weight-decay", "nan"),
                                         ("--corpus-mb", "1e300")])
def test_values_the_code_cannot_hold_fail_up_front(flag, value, train_corpus, tmp_path):
    result = cli([*tiny(train_corpus, tmp_path / "out"), "--init", "dense", flag, value])
    line = assert_one_line_error(result.returncode, result.stderr)
    assert f"argument {flag}: must be" in line and value in line
    assert not os.path.exists(tmp_path / "out")


def test_damaged_cache_meta_and_token_files_are_rebuilt_with_a_warning(train_corpus, tmp_path, capsys):
    flags = ["--init", "dense", *tiny(train_corpus, tmp_path)]
    code, stdout, err = run_main(flags, capsys)
    assert code == 0, err
    cache = tmp_path / "data" / f"{os.path.basename(train_corpus)}-byte"
    (cache / "meta.json").write_text("[1, 2, 3]")  # JSON, but not an object
    code, stdout, err = run_main(flags, capsys)
    assert code == 0 and "meta.json is damaged" in stdout and "tokenizing" in stdout, err
    # right size, foreign contents: ids beyond the 257-token vocabulary
    size = (cache / "train.bin").stat().st_size
    (cache / "train.bin").write_bytes(b"\xff" * size)
    code, stdout, err = run_main(flags, capsys)
    assert code == 0 and "tokenizing" in stdout and "reusing the finished dense model" in stdout, err
    assert "warning" in stdout and "train.bin" in stdout


@pytest.mark.parametrize("damage", ["truncated result.json", "empty settings.json", "log.csv step"])
def test_damaged_files_of_a_finished_run_are_left_out_of_the_summary_with_a_warning(damage, drop_run, train_corpus,
                                                                                     tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)
    run = out / "moe-drop-r0.5"
    if damage == "truncated result.json":
        (run / "result.json").write_text((run / "result.json").read_text()[:20])
    elif damage == "empty settings.json":
        (run / "settings.json").write_text("")
    else:
        (run / "log.csv").write_text((run / "log.csv").read_text().replace("\n10,", "\nten,"))
    code, stdout, err = run_main(["--init", "naive", *tiny(train_corpus, out)], capsys)
    assert code == 0, err
    assert f"warning: {run} has a damaged" in stdout
    summary = (out / "summary.md").read_text()
    assert "| moe-naive |" in summary and "moe-drop-r0.5" not in summary


def test_a_damaged_dense_log_is_a_warning_not_a_traceback(drop_run, train_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)
    log = out / "dense" / "log.csv"
    log.write_text(log.read_text().replace("\n10,", "\nten,"))
    (out / "summary.md").unlink()
    code, stdout, err = run_main(["--init", "naive", *tiny(train_corpus, out)], capsys)
    assert code == 0 and "Traceback" not in err, err
    dense = out / "dense"
    for warning in (f"warning: {dense}: a finished run whose result.json or log.csv is missing or damaged",
                    f"warning: {dense}/log.csv is damaged: no check of naive Upcycling's start",
                    f"warning: no summary or figure written: every run is compared with the dense run in {dense}"):
        assert warning in stdout, warning
    assert not (out / "summary.md").exists()


@pytest.mark.parametrize("unreadable", ["moe-naive", "dense"])
def test_naive_upcycling_s_start_check_names_the_log_it_could_not_read(unreadable, drop_run, train_corpus, tmp_path,
                                                                        capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)
    real_val_curve = plot.val_curve

    def val_curve(csv_path):  # unreadable for the check alone, after naive Upcycling trained
        if sys._getframe(1).f_code.co_name == "train_moe_inits" and f"{os.sep}{unreadable}{os.sep}" in csv_path:
            raise ValueError("test: unreadable")
        return real_val_curve(csv_path)
    monkeypatch.setattr(plot, "val_curve", val_curve)
    code, stdout, err = run_main(["--init", "naive", *tiny(train_corpus, out)], capsys)
    assert code == 0, err
    assert f"warning: {out / unreadable / 'log.csv'} is damaged: no check of naive Upcycling's start" in stdout
    assert "check: naive Upcycling starts at" not in stdout


def test_resume_with_a_damaged_log_is_one_line_naming_it(train_corpus, tmp_path, capsys, monkeypatch):
    real = nan_lr_from(monkeypatch, 12)
    run_main(["--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)
    monkeypatch.setattr(train, "lr_at", real)
    log = tmp_path / "dense" / "log.csv"
    log.write_text(log.read_text().replace("\n5,", "\nfive,"))
    code, _, err = run_main(["--resume", "--init", "dense", *tiny(train_corpus, tmp_path, dense_steps=40)], capsys)
    assert f"{log} is damaged" in assert_one_line_error(code, err)


def test_one_process_per_out_dir_and_a_killed_holder_does_not_block(train_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, train\ntrain.lock_out_dir(sys.argv[1])\n"
                               "print('locked', flush=True)\ntime.sleep(300)", str(out)],
                              stdout=subprocess.PIPE, text=True, env=ENV, cwd=HERE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli(["--init", "dense", *tiny(train_corpus, out)])
        line = assert_one_line_error(result.returncode, result.stderr)
        assert f"is in use by process {holder.pid}" in line
    finally:
        holder.kill()  # SIGKILL: the .lock file stays, with the dead holder's pid in it
        holder.wait()
    assert str(holder.pid) in (out / ".lock").read_text()
    code, _, err = run_main(["--init", "dense", *tiny(train_corpus, out)], capsys)
    assert code == 0, err


def test_repeated_experiments_in_one_process_do_not_lock_themselves_out(train_corpus, tmp_path):
    # what analyze.py sweep does: train.experiment again and again in one process, the lock held throughout
    try:
        train.experiment(train.parse_args(["--init", "dense", *tiny(train_corpus, tmp_path / "out")]))
        train.experiment(train.parse_args(["--init", "naive", *tiny(train_corpus, str(tmp_path / "out") + "/", moe_steps=10)]))
        train.experiment(train.parse_args(["--init", "naive", *tiny(train_corpus, tmp_path / "out", moe_steps=10)]))
    finally:
        for f in train.LOCK.values():
            f.close()
        train.LOCK.clear()
    assert os.path.exists(tmp_path / "out" / "moe-naive" / "result.json")


@pytest.mark.parametrize("tool, first_moe_run", [(["train.py", "--init", "drop", "--r", "0.5"], "moe-drop-r0.5"),
                                                  (["analyze.py", "sweep", "--r-values", "0.5"], "moe-naive")])
def test_ctrl_c_in_a_shell_loop_saves_the_checkpoint_and_stops_the_loop(tool, first_moe_run, train_corpus, tmp_path):
    # a terminal's Ctrl-C goes to the shell and the tool alike; the shell goes on only if the tool exits as usual
    out = tmp_path / "out"
    flags = tiny(train_corpus, out, moe_steps=2000)  # far more steps than the signal needs to arrive in
    command = shlex.join([*tool_with_exec_at_exit(tool[0]), *tool[1:], *flags])
    script = f"for seed in 0 1; do {command} --seed $seed; echo next seed; done"
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=HERE, start_new_session=True, preexec_fn=sigint_default)
    watchdog = threading.Timer(180, os.killpg, (proc.pid, signal.SIGKILL))  # a hang fails the test, not the suite
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith(f"[{first_moe_run}] step 10/"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        stdout, stderr = proc.communicate()
    finally:
        watchdog.cancel()
    assert "next seed" not in stdout and proc.returncode == -signal.SIGINT, stdout[-2000:] + stderr
    assert "Traceback" not in stderr and "--resume" in stdout
    stopped_at = int(stdout.split(f"[{first_moe_run}] stopped at step ")[1].split("/")[0])
    ckpt = torch.load(out / first_moe_run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == stopped_at and not ckpt.get("finished")


UNCAUGHT_CTRL_C = EXEC_AT_EXIT + """import ctrl_c
ctrl_c.install()
print("started")  # into a pipe's buffer: flushed before the end
raise KeyboardInterrupt
"""


def test_an_uncaught_ctrl_c_ends_a_tool_by_sigint_without_a_traceback_whatever_runs_at_exit():
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.run([sys.executable, "-c", UNCAUGHT_CTRL_C], capture_output=True, text=True, cwd=HERE, env=env,
                       timeout=60)
    assert p.returncode == -signal.SIGINT and p.stdout == "started\n" and p.stderr == "", p


SIGNAL_BETWEEN_RUNS = EXEC_AT_EXIT + """import os, signal, sys, ctrl_c, runs, train
ctrl_c.install()
real = train.moe_start
def moe_start(*a, **kw):  # after the dense run, before the MoE's: no run is training, so the tool stops at once
    os.kill(os.getpid(), int(sys.argv[1]))
    return real(*a, **kw)
train.moe_start = moe_start
runs.run_as_script(lambda: train.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig, returncode", [(signal.SIGINT, -signal.SIGINT), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_a_signal_outside_training_ends_the_tool_as_that_signal(sig, returncode, train_corpus, tmp_path):
    # SIGTERM (a scheduler, `timeout`, `kill`) is reported as SIGTERM's 143, not as a Ctrl-C
    p = subprocess.run([sys.executable, "-c", SIGNAL_BETWEEN_RUNS, str(int(sig)), "--init", "naive",
                        *tiny(train_corpus, tmp_path / "out")], capture_output=True, text=True, env=ENV, cwd=HERE,
                       timeout=300)
    assert p.returncode == returncode, p.stdout[-2000:] + p.stderr
    assert p.stderr.startswith("train.py: interrupted") and p.stderr.count("\n") == 1, p.stderr
    assert os.path.exists(tmp_path / "out" / "dense" / "result.json")  # the finished dense run is kept


STOP_AT_MOE_STEP_13 = """import os, signal, sys, train
real = train.lr_at
def lr_at(step, steps, *a):
    if steps == 120 and step == 12:  # Ctrl-C during MoE step 13: not a log step (5), eval step (10) or ckpt step (10)
        os.kill(os.getpid(), signal.SIGINT)
    return real(step, steps, *a)
train.lr_at = lr_at
train.main(sys.argv[1:])
"""


def test_resume_from_a_stop_between_log_steps_writes_the_uninterrupted_log(drop_run, train_corpus, tmp_path):
    out = tmp_path / "out"
    flags = ["--init", "drop", "--r", "0.5", *tiny(train_corpus, out)]
    stopped = subprocess.run([sys.executable, "-c", STOP_AT_MOE_STEP_13, *flags], capture_output=True, text=True,
                             env=ENV, cwd=HERE, timeout=300)
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert torch.load(out / "moe-drop-r0.5" / "ckpt.pt", weights_only=True)["step"] == 13
    assert [int(r["step"]) for r in csv_rows(out / "moe-drop-r0.5" / "log.csv")] == [0, 5, 10]  # no row at 13
    resumed = cli([*flags, "--resume"])
    assert resumed.returncode == 0 and "resuming at step 13/120" in resumed.stdout, resumed.stderr
    rows, reference = (csv_rows(d / "moe-drop-r0.5" / "log.csv") for d in (out, drop_run[0]))
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference):  # row by row, every value but the time
        assert {k: v for k, v in row.items() if k != "time"} == {k: v for k, v in ref.items() if k != "time"}


def test_summary_of_a_dense_only_run_describes_only_the_dense_run(drop_run, train_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(drop_run[0], out)  # a finished MoE run lies in the folder too
    code, stdout, err = run_main(["--init", "dense", *tiny(train_corpus, out)], capsys)
    assert code == 0, err
    summary = (out / "summary.md").read_text()
    assert "after 20 dense steps" in summary and "MoE" not in summary and "moe-" not in summary


# -----------------------------------------------------------------------------
# any CUDA GPU (gpus.py): precision, MFU peak, memory (simulated on the CPU by monkeypatching what the GPU would report)


@pytest.mark.parametrize("name, bf16, fp16", [
    ("NVIDIA H100 80GB HBM3", 989e12, 989e12), ("NVIDIA H100 PCIe", 756e12, 756e12), ("NVIDIA H200", 989e12, 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 312e12), ("NVIDIA A10", 125e12, 125e12), ("NVIDIA L40S", 362e12, 362e12),
    ("NVIDIA L4", 121e12, 121e12), ("NVIDIA GeForce RTX 4090", 165e12, 165e12),
    ("NVIDIA GeForce RTX 3090", 71e12, 71e12), ("Tesla V100-SXM2-16GB", None, 125e12), ("Tesla T4", None, 65e12),
    ("Some Future GPU", None, None),
])
def test_mfu_peak_is_the_cards_peak_in_the_precision_used(monkeypatch, name, bf16, fp16):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda")
    assert gpus.gpu_peak_flops(cuda, torch.bfloat16) == bf16 and gpus.gpu_peak_flops(cuda, torch.float16) == fp16
    assert gpus.gpu_peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("capability, bf16, dtype, path_text", [
    ((9, 0), True, torch.bfloat16, "grouped GEMM (sm90, bf16"),   # H100/H200
    ((8, 0), True, torch.bfloat16, "dense (every expert"),        # A100
    ((8, 6), True, torch.bfloat16, "dense (every expert"),        # RTX 3090
    ((7, 5), False, torch.float16, "dense (every expert"),        # T4: fp16 and a gradient scaler
])
def test_precision_and_moe_path_follow_the_card_and_the_start_line_names_them(monkeypatch, capability, bf16, dtype,
                                                                               path_text):
    import dropupcycle
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(dropupcycle, "TORCH_VERSION", (2, 11))
    monkeypatch.setattr(dropupcycle, "bf16_supported", lambda device: bf16)
    monkeypatch.setattr(gpus, "bf16_supported", lambda device: bf16)
    cuda = torch.device("cuda")
    assert gpus.amp_dtype(cuda) == dtype
    line = gpus.compute_description(cuda)
    assert path_text in line and ("gradient scaler" in line) == (dtype == torch.float16)
    assert gpus.amp_dtype(torch.device("cpu")) == torch.float32
    assert gpus.compute_description(torch.device("cpu")) == "fp32 | MoE experts: reference loop (CPU)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_card_without_bf16_trains_in_fp16_with_the_gradient_scaler_like_bf16(train_corpus, tmp_path, capsys,
                                                                                 monkeypatch):
    """A T4 or V100, simulated on this GPU: fp16 autocast, the gradient scaler and the dense experts path, compiled,
    train the same runs as bf16 and the grouped path do, within the two precisions' rounding."""
    import dropupcycle
    curves = {}
    for precision in ("bf16", "fp16"):
        torch._dynamo.reset()  # each precision compiles its own graphs
        if precision == "fp16":
            monkeypatch.setattr(dropupcycle, "bf16_supported", lambda device: False)
            monkeypatch.setattr(gpus, "bf16_supported", lambda device: False)
        out = tmp_path / precision
        code, stdout, stderr = run_main(["--init", "drop", "--r", "0.5", *tiny(train_corpus, out), "--device", "cuda",
                                         "--compile"], capsys)
        assert code == 0, stderr
        expected = "fp16 autocast + gradient scaler | MoE experts: dense" if precision == "fp16" else "bf16 autocast"
        assert expected in stdout
        assert stdout.count("torch.compile (CUDA graphs) check") == 2  # dense and MoE: one piece a step, one GPU
        curves[precision] = [plot.val_curve(out / run / "log.csv")[2] for run in ("dense", "moe-drop-r0.5")]
    torch._dynamo.reset()
    for bf16, fp16 in zip(curves["bf16"], curves["fp16"]):
        assert np.isfinite(fp16).all() and fp16[-1] < fp16[0] - 0.5  # it learns
        assert abs(fp16[-1] - bf16[-1]) < 0.03 * bf16[-1], (fp16, bf16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_train_and_evaluate_as_the_default_mode_does_and_are_recorded_once(monkeypatch):
    """train.py's steps and evaluations, compiled with CUDA graphs (its mode on one GPU) and in torch.compile's
    default mode: the same losses; no part of the model left out of the graphs (a host sync in the MoE would be);
    and a second round of steps and evaluations replays what the first recorded (an evaluation's forwards, which
    have no backward, recorded anew each time would cost memory and time)."""
    from torch._inductor import cudagraph_trees
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = ModelConfig(vocab_size=257, d_model=64, n_layer=2, n_head=2, n_kv_head=2, d_ff=128, max_seq_len=64,
                      n_experts=4)
    tokens = torch.randint(0, 257, (1 << 16,), dtype=torch.int32, device=device)
    settings = dict(lr=1e-3, steps=100, warmup=0, seed=0, phase="moe", batch_size=8, seq_len=64, grad_accum=1,
                    grad_clip=1.0)
    counters = torch._dynamo.utils.counters

    def recorded_graphs():
        manager = cudagraph_trees.get_manager(device.index, create_if_none_exists=False)
        nodes, count = [n for ns in manager.roots.values() for n in ns], 0
        while nodes:
            count += 1
            nodes += [child for children in nodes.pop().children.values() for child in children]
        return count

    logged, graphs = {}, []
    for mode in ("reduce-overhead", None):
        torch._dynamo.reset()
        counters.clear()
        monkeypatch.setattr(train, "compile_mode", lambda device, pieces, processes: mode)
        torch.manual_seed(0)
        model = Transformer(cfg).to(device)
        val_rng = np.random.default_rng(1)
        val_batches = [data.get_batch(tokens, 8, 64, val_rng, device) for _ in range(3)]
        train_model = train.training_module(model, True, val_batches[0], "moe")
        assert train_model is not model  # the compiled model agreed with eager mode
        optimizer = train.make_optimizer(model, 1e-3, 0.1, device)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        kept, evaluations = [], []
        for round in range(2):
            kept += [train.train_step(model, train_model, optimizer, scaler, settings, step, tokens, device, 1)[1:]
                     for step in range(4 * round, 4 * round + 4)]
            evaluations += train.evaluate(model, train_model, val_batches, device)[2]
            if mode:
                graphs.append(recorded_graphs())
        logged[mode] = [float(loss) for losses in kept for loss in losses] + evaluations
        if mode:
            assert counters["inductor"]["cudagraph_skips"] == 0
    torch._dynamo.reset()
    assert graphs[0] == graphs[1] > 0, graphs
    assert logged["reduce-overhead"] == pytest.approx(logged[None], abs=2e-3)


GPU_PRESET_MOE = ModelConfig(vocab_size=257, d_model=256, n_layer=4, n_head=4, n_kv_head=4, d_ff=1024, max_seq_len=512,
                             n_experts=8, top_k=2)


def test_memory_estimate_matches_the_gpu_preset_measured_on_an_h200():
    # measured: 7.2 GiB peak on an H200 with the 1.8 GiB corpus (4 bytes x 475M tokens) on the GPU
    n_params = Transformer(GPU_PRESET_MOE).num_params()
    estimate = 128 * 512 * gpus.activation_bytes_per_token(GPU_PRESET_MOE, "grouped") + 16 * n_params
    assert estimate / 2**30 == pytest.approx(7.2 - 1.8, rel=0.15)


@pytest.mark.parametrize("free_gib, path, expected", [
    (139.0, "grouped", 1),  # H200
    (78.0, "dense", 1),     # A100 80GB
    (14.5, "dense", 2),     # T4 or any 16 GB card: 64 sequences a piece (the corpus stays on the host there)
    (14.5, "grouped", 1),
    (21.5, "dense", 1),     # RTX 3090/4090 (24 GB) with the corpus on the GPU: ~16 GiB estimated, fits
    (0.5, "dense", 128),    # nothing fits: one sequence at a time
])
def test_micro_batch_is_cut_into_pieces_only_where_the_step_would_not_fit(monkeypatch, free_gib, path, expected):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), int(free_gib * 2**30)))
    monkeypatch.setattr(gpus, "moe_path", lambda device: path)
    n_params = Transformer(GPU_PRESET_MOE).num_params()
    assert gpus.micro_split(GPU_PRESET_MOE, 128, 512, torch.device("cuda"), n_params) == expected
    assert gpus.micro_split(GPU_PRESET_MOE, 128, 512, torch.device("cpu"), n_params) == 1


# a train_step alone: a one-layer model of 64 tokens, 4 sequences of 16 a micro-batch
CPU = torch.device("cpu")
DENSE_CFG = ModelConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, n_kv_head=2, d_ff=64, max_seq_len=16)
MOE_CFG = replace(DENSE_CFG, n_experts=4, top_k=2)
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # fp32: a disabled scaler keeps no state, so one serves all


def step_settings(**over):
    s = dict(lr=1e-3, steps=10, warmup=0, seed=0, phase="moe", batch_size=4, seq_len=16, grad_accum=1,
             grad_clip=1.0)
    return {**s, **over}


def tokens64(n=4000):
    return np.random.default_rng(0).integers(0, 64, size=n).astype(np.uint16)


def test_a_step_in_pieces_logs_the_mean_of_their_losses_and_takes_the_same_update():
    """train_step with its batch cut in 2 pieces: the logged loss is the mean of the pieces' losses (the whole
    batch's loss), not their sum, and the update is the one-piece step's."""
    results = []
    for split in (1, 2):
        torch.manual_seed(0)
        model = Transformer(DENSE_CFG)
        optimizer = train.make_optimizer(model, 1e-3, 0.1, CPU)
        _, ce, aux = train.train_step(model, model, optimizer, NO_SCALER, step_settings(phase="dense"), 3, tokens64(),
                                      CPU, split)
        results.append((float(ce), aux, [p.detach().clone() for p in model.parameters()]))
    (ce_whole, aux_whole, params_whole), (ce_pieces, aux_pieces, params_pieces) = results
    assert ce_pieces == pytest.approx(ce_whole, rel=1e-5) and 3.5 < ce_whole < 5.0  # about ln 64 at the start
    assert aux_whole == aux_pieces == 0.0  # a dense model has no balancing loss
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params_whole, params_pieces))


def test_micro_batch_pieces_and_the_gradient_scaler_train_like_one_piece(drop_run, train_corpus, tmp_path, capsys,
                                                                           monkeypatch):
    """The fp16 route's plumbing on the CPU: each micro-batch in 2 pieces and the gradient scaler on (its scaling,
    unscale before clipping, step and update; fp32 math, so no step is skipped). Same data per step: the losses
    follow the one-piece run's, up to the balancing loss being taken over half batches."""
    monkeypatch.setattr(train, "micro_split", lambda *args: 2)
    monkeypatch.setattr(train, "amp_dtype", lambda device: torch.float16)  # turns the scaler on...
    monkeypatch.setattr(train, "autocast", lambda device: torch.autocast("cpu", enabled=False))  # ...math stays fp32
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["--init", "drop", "--r", "0.5", *tiny(train_corpus, out)], capsys)
    assert code == 0, stderr
    assert "moe: micro-batch of 4 sequences cut into 2 pieces of 2" in stdout
    pieces = plot.val_curve(out / "moe-drop-r0.5" / "log.csv")[2]
    whole = plot.val_curve(drop_run[0] / "moe-drop-r0.5" / "log.csv")[2]
    assert pieces[0] == pytest.approx(whole[0], abs=1e-5)  # the same upcycled start (scored in pieces too)
    assert np.allclose(pieces, whole, atol=2e-2), (pieces, whole)
    assert not np.array_equal(pieces, whole)  # (the pieces did change the computation)


# -----------------------------------------------------------------------------
# the recipe one piece at a time: what a step computes (App. A.4), and what every comparison of inits relies on

# -----------------------------------------------------------------------------
# optimizer: the paper's AdamW (App. A.4), weight decay on matrices only (README "Differences")


def test_adamw_has_the_papers_betas_and_eps_and_decays_the_weight_matrices_only():
    model = Transformer(MOE_CFG)
    opt = train.make_optimizer(model, 1e-3, 0.1, CPU)
    assert isinstance(opt, torch.optim.AdamW)
    for group in opt.param_groups:
        assert tuple(group["betas"]) == (0.9, 0.95) and group["eps"] == 1e-8
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = list(model.named_parameters())
    assert len(decay_of) == len(params)  # every parameter in exactly one group
    norms = [n for n, p in params if p.dim() < 2]
    assert norms  # RMSNorm gains exist in this model
    for name, p in params:
        assert decay_of[id(p)] == (0.1 if p.dim() >= 2 else 0.0), name


# -----------------------------------------------------------------------------
# gradient clipping: "clip the global gradient norm to this" (--grad-clip, default 1.0 as in App. A.4)


def test_train_step_clips_the_global_gradient_norm_to_the_runs_grad_clip():
    def norm_before_the_update(clip):  # the global gradient norm the optimizer steps with
        torch.manual_seed(0)
        model = Transformer(MOE_CFG)
        opt = train.make_optimizer(model, 1e-3, 0.1, CPU)
        seen = []
        opt.register_step_pre_hook(lambda o, a, k: seen.append(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()))
        train.train_step(model, model, opt, NO_SCALER, step_settings(grad_clip=clip), 0, tokens64(), CPU, 1)
        return seen[0]

    raw = norm_before_the_update(1e6)  # a bound far above it: the gradient as backward left it
    for clip in (0.05, raw / 2):  # cut to --grad-clip, whatever it is (not to the default 1.0)
        assert norm_before_the_update(clip) == pytest.approx(clip, rel=1e-3)
    assert norm_before_the_update(2 * raw) == pytest.approx(raw, rel=1e-6)  # a bound above the norm: left as it is


# -----------------------------------------------------------------------------
# data order: "a step's batches follow from (seed, phase, step)"; every MoE init sees the same data in the same order


def test_every_moe_init_gets_the_same_batches_at_each_step_and_they_depend_on_seed_phase_and_step(train_corpus,
                                                                                                  tmp_path, monkeypatch):
    args = train.parse_args(tiny(train_corpus, tmp_path / "out"))
    recipe = train.training_recipe(**{flag: getattr(args, flag) for flag in inspect.signature(train.training_recipe).parameters})
    dense_cfg = train.dense_config(257, 32, 1, 2, 2, 64, 32)
    moe_cfg = train.moe_config(dense_cfg, 4, 2, 0.02)
    _, moe_runs, _, _ = train.plan_runs(str(tmp_path / "out"), train.ALL_RUNS, dense_cfg, moe_cfg, "f" * 16, "byte",
                                        None, recipe=recipe, dense_schedule=(20, 3e-3, 2),
                                        moe_schedule=(120, 2e-3, 2), resume=False)
    tokens = np.random.default_rng(1).integers(0, 257, size=20000).astype(np.uint16)

    class Stop(Exception):
        pass

    def batches_of(settings, steps):
        got = []

        def record(*a, **kw):
            got.append(real_get_batch(*a, **kw)[0].clone())
            raise Stop  # the batch is all we want: no forward
        monkeypatch.setattr(train, "get_batch", record)
        model = Transformer(ModelConfig(**settings["model"]))
        opt = train.make_optimizer(model, 1e-3, 0.1, CPU)
        for step in steps:
            with pytest.raises(Stop):
                train.train_step(model, model, opt, NO_SCALER, settings, step, tokens, CPU, 1)
        monkeypatch.setattr(train, "get_batch", real_get_batch)
        return got

    real_get_batch = train.get_batch
    steps = [0, 1, 7, 119]
    reference = batches_of(moe_runs[0].settings, steps)
    assert len({tuple(b.flatten().tolist()) for b in reference}) == len(steps)  # each step its own windows
    for run in moe_runs[1:]:  # naive, drop r=0.5 (both index-set variants), drop r=1: the same data as scratch
        got = batches_of(run.settings, steps)
        assert all(torch.equal(a, b) for a, b in zip(got, reference)), run.name
    assert torch.equal(batches_of(moe_runs[1].settings, [119, 7])[1], reference[2])  # a step's batch, not an order's
    other_seed = dict(moe_runs[0].settings, seed=1)
    dense_phase = dict(moe_runs[0].settings, phase="dense")
    assert not torch.equal(batches_of(other_seed, [0])[0], reference[0])
    assert not torch.equal(batches_of(dense_phase, [0])[0], reference[0])


# -----------------------------------------------------------------------------
# logged losses: "log the cross-entropy alone (comparable with dense), the balancing loss separately"


def test_train_step_logs_the_cross_entropy_without_the_balancing_term_and_the_unweighted_balancing_loss():
    logged = {}
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        cfg = replace(MOE_CFG, aux_loss_coef=coef)
        model = Transformer(cfg)
        opt = train.make_optimizer(model, 1e-3, 0.1, CPU)
        _, ce, aux = train.train_step(model, model, opt, NO_SCALER, step_settings(), 0, tokens64(), CPU, 1)
        logged[coef] = (float(ce), float(aux))
    # the step's forward is the same for both weights: only the term added to the loss differs
    assert logged[1.0][0] == pytest.approx(logged[0.0][0], abs=1e-5)
    assert logged[1.0][1] == pytest.approx(logged[0.0][1], abs=1e-6)
    assert 1.0 < logged[0.0][1] <= MOE_CFG.n_experts  # the balancing loss itself (about top_k), not 0 x it


# -----------------------------------------------------------------------------
# evaluate: "the standard error here is that of one run's number"


def test_evaluate_standard_error_is_the_sample_std_of_the_batch_losses_over_sqrt_n():
    torch.manual_seed(0)
    model = Transformer(MOE_CFG)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)) for _ in range(5)]
    mean, se, losses = train.evaluate(model, model, batches, CPU)
    assert mean == pytest.approx(np.mean(losses), abs=1e-9)
    assert se == pytest.approx(np.std(losses, ddof=1) / math.sqrt(5), rel=1e-6)


# -----------------------------------------------------------------------------
# plot.compare_to_naive: gap = run minus naive at the end; noise = two standard errors of the per-batch differences


def test_compare_to_naive_gap_and_noise_against_numbers_worked_by_hand():
    steps = np.array([0, 10, 20, 30])
    naive = (steps, steps * 100, np.array([2.0, 1.9, 1.8, 1.60]), np.full(4, 0.02))
    run = (steps, steps * 100, np.array([2.5, 1.95, 1.79, 1.58]), np.full(4, 0.03))
    naive_batches = [1.5, 1.6, 1.7, 1.6]
    run_batches = [1.47, 1.59, 1.67, 1.59]  # differences -0.03, -0.01, -0.03, -0.01: mean -0.02, sd 0.011547
    gap, noise, verdict = plot.compare_to_naive(run, naive, run_batches, naive_batches)
    assert gap == pytest.approx(1.58 - 1.60)  # this run minus naive, at the last evaluation
    assert noise == pytest.approx(2 * 0.011547005 / 2, rel=1e-6)  # 2 s.e. = 2 sd / sqrt(4)
    assert verdict == "below from step 20"
    # without per-batch losses: two standard errors of the unpaired difference, sqrt(0.03^2 + 0.02^2)
    gap2, noise2, verdict2 = plot.compare_to_naive(run, naive)
    assert gap2 == gap and noise2 == pytest.approx(2 * math.hypot(0.03, 0.02)) and verdict2 == "level within noise"
    # and above: the sign of the gap says which side
    above = (steps, steps * 100, np.array([2.5, 1.95, 1.85, 1.70]), np.full(4, 0.001))
    assert plot.compare_to_naive(above, naive)[0] == pytest.approx(0.10)
    assert plot.compare_to_naive(above, naive)[2] == "above naive"
    assert plot.gap_text((gap, noise, verdict)) == "-0.0200 (±0.0115)"
    # one validation batch: no standard error, and the table says so instead of printing (±nan)
    one_batch = (steps, steps * 100, above[2], np.full(4, np.nan))
    assert plot.gap_text(plot.compare_to_naive(one_batch, naive)) == "+0.1000 (noise unknown)"


# -----------------------------------------------------------------------------
# data.py: "Every corpus gets a short fingerprint of its tokens"; the cache is rebuilt when its files change


def load_corpus(folder, out):
    args = train.parse_args(tiny(folder, out))
    return data.load_data(args.data, args.tokenizer, data.get_tokenizer("byte"), args.out_dir, args.corpus_mb,
                          args.seq_len)


def test_the_fingerprint_changes_when_a_validation_file_changes(tmp_path, capsys):
    folder = write_corpus(str(tmp_path / "data"))
    _, _, info = load_corpus(folder, tmp_path / "out")
    _, val_files = data.select_files(data.list_files(folder), 0)
    with open(val_files[0][1], "a") as f:
        f.write("# held-out text changed\n")
    _, val_tokens, info2 = load_corpus(folder, tmp_path / "out")
    assert b"held-out text changed" in bytes(np.asarray(val_tokens, dtype=np.uint8))
    assert info2["fingerprint"] != info["fingerprint"]  # the runs' identity sees the new validation text


def test_a_same_size_edit_of_a_file_rebuilds_the_token_cache(tmp_path, capsys):
    folder = write_corpus(str(tmp_path / "data"))
    _, _, info = load_corpus(folder, tmp_path / "out")
    path = os.path.join(folder, "src0.c")
    text = open(path).read()
    st = os.stat(path)
    with open(path, "w") as f:
        f.write(text.replace("int g0_0", "int h0_0", 1))  # same length, other text
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    capsys.readouterr()
    train_tokens, _, info2 = load_corpus(folder, tmp_path / "out")
    assert "rebuilding" in capsys.readouterr().out
    assert b"int h0_0" in bytes(np.asarray(train_tokens, dtype=np.uint8)) and info2["fingerprint"] != info["fingerprint"]


# -----------------------------------------------------------------------------
# a step's gradient: "equal pieces: the mean of their losses is the step's loss"; --grad-accum "micro-batches per
# optimizer step" (the OOM advice: same tokens per step). AdamW's update barely depends on the gradient's scale, and
# the existing pieces test clips to 1.0, so only the gradient itself shows a sum taken for a mean


@pytest.mark.parametrize("grad_accum, split", [(1, 2), (2, 1), (2, 2)])
def test_a_steps_gradient_is_that_of_the_mean_loss_over_all_its_micro_batches_and_pieces(grad_accum, split,
                                                                                         monkeypatch):
    torch.manual_seed(0)
    model = Transformer(DENSE_CFG)
    reference = Transformer(DENSE_CFG)
    reference.load_state_dict(model.state_dict())
    seen, grads = [], []
    real_get_batch = train.get_batch
    monkeypatch.setattr(train, "get_batch", lambda *a, **kw: seen.append(real_get_batch(*a, **kw)) or seen[-1])
    opt = train.make_optimizer(model, 1e-3, 0.1, CPU)
    opt.register_step_pre_hook(lambda o, a, k: grads.append([p.grad.clone() for p in model.parameters()]))
    settings = step_settings(phase="dense", grad_accum=grad_accum, grad_clip=1e6)  # no clipping
    train.train_step(model, model, opt, NO_SCALER, settings, 3, tokens64(), CPU, split)
    assert len(seen) == grad_accum
    if grad_accum > 1:
        assert not torch.equal(seen[0][0], seen[1][0])  # each micro-batch its own windows
    x, y = torch.cat([b[0] for b in seen]), torch.cat([b[1] for b in seen])
    reference(x, y)[1].backward()  # equal-size batches: the mean loss over all their tokens
    for p, g in zip(reference.parameters(), grads[0]):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


# -----------------------------------------------------------------------------
# gpus.micro_split: "Into how many equal pieces train_run cuts each micro-batch" (every step the same data)


def test_micro_batch_pieces_are_equal_even_where_an_uneven_cut_would_fit(monkeypatch):
    cfg = ModelConfig(vocab_size=257, d_model=256, n_layer=4, n_head=4, n_kv_head=4, d_ff=1024, max_seq_len=512,
                      n_experts=8, top_k=2)
    n_params = Transformer(cfg).num_params()
    # ~6.5 GiB of budget on the dense path: 64 sequences (7.8 GiB) do not fit, 42 (3 uneven pieces) would, 32 do
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(8.1 * 2**30), int(80 * 2**30)))
    monkeypatch.setattr(gpus, "moe_path", lambda device: "dense")
    n = gpus.micro_split(cfg, 128, 512, torch.device("cuda"), n_params)
    assert n == 4 and 128 % n == 0


# -----------------------------------------------------------------------------
# plot.finished_runs: "only runs with equal settings (but the init) are compared"


@pytest.mark.parametrize("key, value", [(None, None), ("seed", 1), ("data", "other"), ("lr", 9e-3), ("steps", 11),
                                        ("weight_decay", 0.0), ("grad_clip", 0.5), ("model", {"top_k": 1})])
def test_a_finished_run_that_differs_in_anything_but_the_init_is_left_out_of_the_comparison(key, value, tmp_path):
    dense = dict(phase="dense", seed=0, data="fp", lr=3e-3, steps=20, weight_decay=0.1, grad_clip=1.0)
    moe = dict(dense, phase="moe", lr=2e-3, steps=10, dense=dense)
    for name, settings in [("dense", dense), ("moe-naive", dict(moe, init="naive", r=0.0, shared_indices=True)),
                           ("moe-drop-r0.5", dict(moe, init="drop", r=0.5, shared_indices=True,
                                                  **({key: value} if key else {})))]:
        write_finished_run(str(tmp_path / name), settings, [2.0, 1.0], [1.0, 1.0])
    found = plot.finished_runs(str(tmp_path), dense, dict(moe, init="naive", r=0.0, shared_indices=True))
    # (None: the control, a run that differs in its init alone, is compared)
    assert set(found) == {"dense", "moe-naive"} | ({"moe-drop-r0.5"} if key is None else set())


# -----------------------------------------------------------------------------
# data.get_batch: "inputs x and next-token targets y"


def test_batch_targets_are_the_inputs_shifted_by_one_token():
    tokens = np.arange(1000, dtype=np.uint16)  # token i at position i: each window is consecutive
    for source in (tokens, torch.from_numpy(tokens.astype(np.int32))):
        x, y = data.get_batch(source, 8, 16, np.random.default_rng(0), CPU)
        assert torch.equal(y, x + 1) and x.shape == y.shape == (8, 16)
