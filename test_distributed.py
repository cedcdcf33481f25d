"""train.py under torchrun on the CPU (gloo), 2 processes: DDP and FSDP2 compute what one process computes with
the same global batch, a checkpoint moves between 2 processes and 1, and a failing rank ends both with its message.

The MoE balancing loss is computed over the tokens a forward sees: on 2 processes over each rank's half of the
batch (as with --grad-accum on one process), so exact comparisons use --aux-loss-coef 0."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, HERE, TRAIN_PY, csv_rows, tiny

import distributed
from dropupcycle import ModelConfig, Transformer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RUNS = ["dense", "moe-drop-r0.5"]


def flags(corpus, out):
    # Drop-Upcycling, not naive: naive Upcycling's experts are identical, so its router's gradient is only rounding
    # noise, which Adam turns into steps that differ with the order of the additions (up to 1e-3 of the norm).
    # --reinit-ratio, not --r: torchrun would take --r for an abbreviation of its own flags.
    return ["--init", "drop", "--reinit-ratio", "0.5", "--grad-accum", "2", "--aux-loss-coef", "0", *tiny(corpus, out, moe_steps=10, dense_steps=40)]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=HERE, timeout=180, **kw)


@pytest.fixture(scope="module")
def reference(train_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    result = run([sys.executable, TRAIN_PY, *flags(train_corpus, out)])
    assert result.returncode == 0, result.stderr
    return out


def assert_same_run(out, reference):
    for name in RUNS:
        rows, ref = csv_rows(out / name / "log.csv"), csv_rows(reference / name / "log.csv")
        assert [r["step"] for r in rows] == [r["step"] for r in ref]
        for r, q in zip(rows, ref):
            for key in ("train_loss", "val_loss"):
                if q[key]:
                    assert float(r[key]) == pytest.approx(float(q[key]), rel=1e-5, abs=1e-6), (name, r["step"], key)
        a = torch.load(out / name / "ckpt.pt", weights_only=True)["model"]
        b = torch.load(reference / name / "ckpt.pt", weights_only=True)["model"]
        assert a.keys() == b.keys()
        for k in b:  # relative to the whole tensor: Adam turns fp32 noise in a near-zero gradient (a rare token's
            # embedding row) into a full-size step: seen up to 3e-6 of the norm, losses within 1e-5
            assert (a[k] - b[k]).norm() <= 1e-4 * b[k].norm(), (name, k, ((a[k] - b[k]).norm() / b[k].norm()).item())


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one_with_the_same_global_batch(mode, reference, train_corpus, tmp_path):
    result = run([*TORCHRUN, TRAIN_PY, *flags(train_corpus, tmp_path), *mode])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("[dense] done") == 1  # rank 0 alone prints
    assert_same_run(tmp_path, reference)
    import json
    assert json.load(open(tmp_path / "moe-drop-r0.5" / "result.json"))["processes"] == 2


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_with_compile_two_processes_train_like_one_and_fsdp2_saves_the_shards(mode, reference, train_corpus, tmp_path):
    # --compile first checks the compiled model against eager mode with a forward; under FSDP2 that forward leaves
    # the root module's gathered weights registered, and an optimizer made from them neither trains nor saves the
    # shards. Compilation itself is replaced by a wrapper that calls the model as it is (its _orig_mod is what marks
    # a compiled model): the check and the evaluations then run with gradients on and no backward, as compiled.
    script = tmp_path / "train.py"
    script.write_text(f"""import sys
sys.path.insert(0, {HERE!r})
import torch
import train

class Compiled(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self._orig_mod = model

    def forward(self, *args):
        return self._orig_mod(*args)

train.compile_model = lambda model, **kw: Compiled(model)
train.main()
""")
    result = run([*TORCHRUN, str(script), *flags(train_corpus, tmp_path), *mode, "--compile"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.compile check" in result.stdout
    assert_same_run(tmp_path, reference)


def test_every_train_py_flag_reaches_train_py_through_torchrun():
    # torchrun's parser takes an abbreviation of its own flags from the script's arguments too
    # (github.com/pytorch/pytorch/issues/120601): --r stops it ("ambiguous option"), so the README tells torchrun
    # users to write --reinit-ratio
    from torch.distributed.run import get_args_parser

    import train

    torchrun = get_args_parser()
    flags = [o for a in train.build_parser()._actions for o in a.option_strings if o.startswith("--")]
    assert "--reinit-ratio" in flags and len(flags) > 40
    for flag in flags:
        if flag == "--r":
            continue
        try:
            script_args = torchrun.parse_args(["train.py", flag, "1"]).training_script_args
        except SystemExit:
            script_args = None
        assert script_args == [flag, "1"], flag


def test_a_model_that_is_only_scored_needs_no_gradient_sync_under_fsdp(monkeypatch):
    # --dense-from under torchrun --fsdp: the pretrained model is scored as it came, unsharded
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setitem(distributed.STATE, "fsdp", True)
    model = Transformer(ModelConfig(vocab_size=16, d_model=8, n_layer=1, n_head=1, n_kv_head=1, d_ff=16))
    with distributed.grad_sync(model, False):
        pass


def signal_workers_at_dense_step_5(corpus, out, signum, which):
    """torchrun train.py, with signum sent at dense step 5 to the worker processes at the indices which (in the
    order /proc lists torchrun's children) and not to torchrun itself: (torchrun's exit status, stdout, stderr,
    the workers' pids)."""
    proc = subprocess.Popen([*TORCHRUN, TRAIN_PY, *flags(corpus, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=HERE, start_new_session=True)
    workers = []
    for line in proc.stdout:
        if line.startswith("[dense] step 5/"):
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                workers = [int(p) for p in f.read().split()]
            for i in which:
                os.kill(workers[i], signum)
            break
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr, workers


def test_sigterm_on_one_rank_stops_both_and_resumes_on_one_process(reference, train_corpus, tmp_path):
    returncode, stdout, _, _ = signal_workers_at_dense_step_5(train_corpus, tmp_path, signal.SIGTERM, which=[-1])
    assert returncode != 0
    ckpt = torch.load(tmp_path / "dense" / "ckpt.pt", weights_only=True)
    assert 5 <= ckpt["step"] < 40 and not ckpt["finished"], stdout
    resumed = run([sys.executable, TRAIN_PY, *flags(train_corpus, tmp_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {ckpt['step']}/40" in resumed.stdout
    assert_same_run(tmp_path, reference)


def test_ctrl_c_on_every_rank_saves_the_checkpoint_and_the_ranks_exit_130_for_torchrun_not_by_sigint(train_corpus,
                                                                                                   tmp_path):
    """A rank that stops for Ctrl-C exits with status 130, which torchrun reports, instead of dying by SIGINT as
    `python train.py` does: torchrun, not a shell, is its parent (runs.run_as_script)."""
    # as a terminal's Ctrl-C reaches each rank, but torchrun is left alone to report how they ended
    returncode, stdout, stderr, workers = signal_workers_at_dense_step_5(train_corpus, tmp_path, signal.SIGINT,
                                                                         which=[0, 1])
    assert returncode != 0 and len(workers) == 2
    # torchrun's failure table: "exitcode  : 130 (pid: N)" for the first rank to end; the other may still be
    # leaving when torchrun stops it with SIGTERM. Neither may die by SIGINT.
    assert any(re.search(rf"exitcode\s*:\s*130 \(pid: {pid}\)", stderr) for pid in workers), stderr[-3000:]
    assert "SIGINT" not in stderr, stderr[-3000:]
    ckpt = torch.load(tmp_path / "dense" / "ckpt.pt", weights_only=True)
    assert 5 <= ckpt["step"] < 40 and not ckpt["finished"], stdout


def test_a_one_process_checkpoint_resumes_on_two_sharded(reference, train_corpus, tmp_path):
    proc = subprocess.Popen([sys.executable, TRAIN_PY, *flags(train_corpus, tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=HERE)
    for line in proc.stdout:
        if line.startswith("[dense] step 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    step = torch.load(tmp_path / "dense" / "ckpt.pt", weights_only=True)["step"]
    resumed = run([*TORCHRUN, TRAIN_PY, *flags(train_corpus, tmp_path), "--resume", "--fsdp"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {step}/40" in resumed.stdout
    assert_same_run(tmp_path, reference)


def script_failing_on_rank_1(tmp_path, error):
    """A train.py whose rank 1 alone raises error from its third step on (rank 0 would wait for it forever)."""
    script = tmp_path / "train.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import data, train
calls = []
def broken(*args):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) > 4:
        raise {error}
    return data.get_batch(*args)
train.get_batch = broken
train.main()
""")
    return script


def test_a_batch_the_processes_cannot_share_is_one_line_from_rank_0_before_any_folder(train_corpus, tmp_path):
    result = run([*TORCHRUN, TRAIN_PY, *flags(train_corpus, tmp_path / "out"), "--batch-size", "3"])
    ours = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode != 0 and ours == ["train.py: error: --batch-size 3 (sequences per micro-batch, all "
                                               "processes together) must be divisible by the 2 processes"], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failing_rank_ends_both_with_its_one_line(train_corpus, tmp_path):
    script = script_failing_on_rank_1(tmp_path, 'data.Fail("test: rank 1 cannot read its batch")')
    start = time.time()
    result = run([*TORCHRUN, str(script), *flags(train_corpus, tmp_path / "out")])
    assert result.returncode != 0 and time.time() - start < 120
    ours = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert ours == ["train.py: error: [rank 1] test: rank 1 cannot read its batch"], result.stderr


def test_a_bug_on_one_rank_ends_both_with_its_traceback(train_corpus, tmp_path):
    # an unexpected error is not a one-line failure, but it must not hang the other rank either
    script = script_failing_on_rank_1(tmp_path, 'ZeroDivisionError("test: a bug on rank 1")')
    start = time.time()
    result = run([*TORCHRUN, str(script), *flags(train_corpus, tmp_path / "out")])
    assert result.returncode != 0 and time.time() - start < 120
    assert "ZeroDivisionError: test: a bug on rank 1" in result.stderr