"""Fixtures and helpers shared by the tool tests (test_train.py, test_analyze.py, test_bench.py): a tiny corpus,
flags for a seconds-long run, the real CLI in a subprocess, and the one-line error check.
Runs whose losses are compared bit for bit all go through the CLI in subprocesses with the same environment.
"""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_PY = os.path.join(HERE, "train.py")
# one thread: identical floating-point reductions in every process, and no fight over the 2 cores
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# A string exec at exit, as on the GPU machine (Python 3.12, CUDA torch): Python then forgets an uncaught
# KeyboardInterrupt and exits with status 1, so only a tool that ends itself by SIGINT (ctrl_c.py) still dies by it.
EXEC_AT_EXIT = "import atexit\natexit.register(lambda: exec('pass', {}))\n"


def tool_with_exec_at_exit(tool):
    """The command line that runs tool as `python tool.py` does, with EXEC_AT_EXIT."""
    return [sys.executable, "-c", EXEC_AT_EXIT + "import os, runpy, sys\n"
            "sys.argv = sys.argv[1:]\n"
            "sys.path[0] = os.path.dirname(sys.argv[0])\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')", os.path.join(HERE, tool)]


def sigint_default():
    """preexec_fn of a child that must receive a Ctrl-C: a SIGINT ignored by pytest's own parent (pytest run as a
    background job) would be ignored by the child too, and not even a shell can undo that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_corpus(folder):
    """A small two-language corpus: 6 Python and 6 C files with different content, and one binary file."""
    os.makedirs(os.path.join(folder, "pkg"), exist_ok=True)
    for i in range(6):
        with open(os.path.join(folder, "pkg", f"mod{i}.py"), "w") as f:
            f.write("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # é\n\n" for j in range(60)))
        with open(os.path.join(folder, f"src{i}.c"), "w") as f:
            f.write("".join(f"int g{i}_{j}(int x) {{ return x << {j % 7}; }}\n" for j in range(60)))
    with open(os.path.join(folder, "blob.bin.dat"), "wb") as f:
        f.write(bytes(range(256)) * 4)  # has NUL bytes: skipped as binary
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs on one thread too: with other jobs on the 2 cores, two spinning threads run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def tiny(train_corpus, out_dir, moe_steps=120, dense_steps=20):
    """Flags for a seconds-long run: 1 layer, d_model 32, 4 experts, 32-token sequences."""
    return ["--data", train_corpus, "--out-dir", str(out_dir), "--device", "cpu", "--preset", "cpu",
            "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--n-kv-head", "2", "--d-ff", "64",
            "--n-experts", "4", "--top-k", "2", "--seq-len", "32", "--batch-size", "4",
            "--dense-steps", str(dense_steps), "--moe-steps", str(moe_steps), "--dense-warmup", "2", "--moe-warmup", "2",
            "--eval-interval", "10", "--eval-batches", "2", "--log-interval", "5", "--ckpt-interval", "10"]


def cli(args, **kw):
    return subprocess.run([sys.executable, TRAIN_PY, *args], capture_output=True, text=True, env=ENV, cwd=HERE,
                          timeout=300, **kw)


def run_main(argv, capsys):
    """train.main in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        train.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_finished_run(folder, settings, val_losses, final_batches):
    """A finished run's three files as train.py writes them (no checkpoint): validation every 100 steps of 32
    tokens, for the tables and comparisons alone."""
    os.makedirs(folder)
    steps = 100 * (len(val_losses) - 1)
    result = dict(name=os.path.basename(folder), final_val_loss=val_losses[-1], final_val_batches=final_batches,
                  steps=steps, tokens=32 * steps, device="cpu", wall_time=1.0, tokens_per_s=6400.0)
    rows = [f"{100 * i},{3200 * i},,{loss!r},0.01,,," for i, loss in enumerate(val_losses)]
    for file, text in (("settings.json", json.dumps(settings)), ("result.json", json.dumps(result)),
                       ("log.csv", "step,tokens,train_loss,val_loss,val_se,aux_loss,lr,time\n" + "\n".join(rows) + "\n")):
        with open(os.path.join(folder, file), "w") as f:
            f.write(text)


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def drop_run(train_corpus, tmp_path_factory):
    """The reference: `train.py --init drop` through the real CLI, uninterrupted."""
    out = tmp_path_factory.mktemp("drop_run")
    result = cli(["--init", "drop", "--r", "0.5", *tiny(train_corpus, out)])
    assert result.returncode == 0, result.stderr
    return out, result


def assert_one_line_error(code, err):
    assert code not in (0, None), err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("train.py: error: ")
    return lines[0]


