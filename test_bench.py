"""bench.py: a CPU smoke test (tiny shapes). It checks that the benchmark runs end to end and writes its report,
not how fast anything is: speed is measured on the GPU (figures/bench.md)."""

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, HERE

import bench
import data


def test_bench_runs_on_cpu_and_writes_markdown_and_json(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a machine without transformers: rows left out
    results = bench.main(["--device", "cpu", "--out", str(tmp_path), "--warmup", "0", "--iters", "1"])

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["device"] == "cpu" and saved["layer"] and saved["step"]
    assert "transformers not importable" in saved["hf_note"]
    md = (tmp_path / "bench.md").read_text()
    for heading in ("## 1. One MoE layer", "## 2. Whole training step", "## 3. MoE overhead", "## Targets"):
        assert heading in md

    # section 1: the MoE layer, our two paths and the dense floor, timed; ours agrees with the reference loop
    layer = {r["impl"]: r for r in results["layer"] if r["weights"] == "fp32+autocast"}
    assert {"dense SwiGLU (floor)", "ours reference"} <= set(layer)
    ours = next(r for name, r in layer.items() if name.startswith("ours forward"))
    assert "error" not in ours and ours["agrees"] and ours["ms"] > 0
    assert ours["x_dense"] == pytest.approx(ours["ms"] / layer["dense SwiGLU (floor)"]["ms"], rel=0.01)

    # section 2 and 3: a dense and an MoE training step, and their time ratio next to their FLOPs ratio
    steps = {r["model"]: r for r in results["step"]}
    assert set(steps) == {"dense", "moe"} and all("error" not in r and r["tokens_per_s"] > 0 for r in steps.values())
    assert steps["moe"]["active_params"] < steps["moe"]["params"]
    (overhead,) = results["overhead"]
    time_ratio = steps["moe"]["ms"] / steps["dense"]["ms"]
    flops_ratio = steps["moe"]["flops_per_token"] / steps["dense"]["flops_per_token"]
    assert overhead["flops_ratio"] == pytest.approx(flops_ratio) and flops_ratio > 1
    assert overhead["overhead"] == pytest.approx(time_ratio / flops_ratio)  # the time the FLOPs do not explain


@pytest.mark.parametrize("flags, message", [
    (["--sections", "layer,foo"], "argument --sections: unknown section foo (use layer, step, loop)"),
    (["--iters", "0"], "argument --iters: must be a positive integer, got 0"),
    (["--router-skew", "-1"], "argument --router-skew: must be 0 or more, got -1"),
    (["--compile-mode", "fast"], "argument --compile-mode: invalid choice: 'fast'"),
    (["--device", "gpu"], "--device gpu: not a device (use auto, cpu, cuda or cuda:N)"),
    (["--sections", "layer,loop", "--loop-data", "no/such/corpus"], "--loop-data no/such/corpus: no such file or folder"),
])
def test_bad_flags_are_refused_before_anything_is_measured(tmp_path, flags, message):
    with pytest.raises(data.Fail) as e:
        bench.main([*flags, "--out", str(tmp_path / "out")])
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "bench.py", "--device", "cuda", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=ENV, cwd=HERE, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("bench.py: error: --device cuda: CUDA is not available on this machine")


def test_bench_reports_a_failing_implementation_instead_of_crashing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(bench.du.MoE, "experts_reference", broken)  # every MoE path on the CPU goes through it
    results = bench.main(["--device", "cpu", "--out", str(tmp_path), "--warmup", "0", "--iters", "1",
                          "--no-hf", "--sections", "step"])
    moe = next(r for r in results["step"] if r["model"] == "moe")
    assert "no kernel for this" in moe["error"]
    assert "| moe |" in (tmp_path / "bench.md").read_text()




def test_router_skew_times_uneven_routing_and_says_how_uneven(tmp_path):
    results = bench.main(["--device", "cpu", "--out", str(tmp_path), "--warmup", "0", "--iters", "1", "--no-hf",
                          "--sections", "step", "--router-skew", "0", "2"])
    moe = {r["router_skew"]: r for r in results["step"] if r["model"] == "moe"}
    assert set(moe) == {0.0, 2.0} and all("error" not in r for r in moe.values())
    assert moe[0.0]["load_balance"] > 0.9  # random tokens, fresh router: every expert about equally used
    assert moe[2.0]["load_balance"] < 0.6  # most tokens on the low-numbered experts
    assert len(results["overhead"]) == 1  # the MoE overhead and the targets stay those of the even routing
    assert "skew 2, balance" in (tmp_path / "bench.md").read_text()


def test_loop_section_times_train_py_s_own_step_on_random_tokens_and_on_text(tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 2000)
    calls = []
    train_step = bench.train.train_step
    monkeypatch.setattr(bench.train, "train_step", lambda *a: calls.append(a[5]) or train_step(*a))
    results = bench.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--warmup", "0", "--iters", "1", "--no-hf",
                          "--sections", "step,loop", "--loop-data", str(text)])
    rows = {(r["model"], r["tokens"]): r for r in results["loop"]}
    assert set(rows) == {(m, t) for m in ("dense", "moe") for t in ("random tokens", f"text ({text})")}
    assert all("error" not in r and r["ms"] > 0 for r in rows.values()), rows
    assert all(0 < r["load_balance"] <= 1 for (m, _), r in rows.items() if m == "moe")
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "## 4. train.py's step function" in md and "| tiny | moe | eager | random tokens |" in md
    # each row: train.py's step function itself, its first call compiling, then timed in rounds that alternate with
    # the bare step on the same model: one step timed by device events, 10 in a row by the clock
    assert calls == list(range(1 + bench.LOOP_ROUNDS * (1 + bench.LOOP_WALL_TIMES_ITERS))) * 4
    assert all(r["bare_ms"] > 0 and r["x_bare"] == r["ms"] / r["bare_ms"] for r in rows.values())
    assert all(r["bare_wall_ms"] > 0 and r["x_bare_wall"] == r["wall_ms"] / r["bare_wall_ms"] for r in rows.values())
    targets = [t for t in results["targets"] if t.startswith("train.py's step")]
    assert [t.split(",")[2].strip() for t in targets] == ["dense", "dense", "moe", "moe"]
    assert all("real text" in t for t in targets) and sum("wall clock" in t for t in targets) == 2


def test_where_train_py_uses_cuda_graphs_the_loop_section_times_its_step_in_both_modes(tmp_path, monkeypatch):
    """On one GPU train.py compiles with CUDA graphs: section 4 times its step in that mode, and in torch.compile's
    default mode (section 2's), and says how train.py's step compares with section 2's (simulated on the CPU: a
    mode that asks for graphs, a compiler that records the mode and compiles nothing)."""
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 2000)
    modes = []
    monkeypatch.setattr(bench.train, "compile_mode", lambda device, pieces, processes: "reduce-overhead")
    monkeypatch.setattr(bench.du, "compile_model", lambda model, mode=None: modes.append(mode) or model)
    results = bench.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--warmup", "0", "--iters", "1", "--no-hf",
                          "--sections", "loop", "--loop-data", str(text), "--compile"])
    assert [(r["model"], r["mode"]) for r in results["loop"]] == [
        (model, mode) for model in ("dense", "moe") for mode in ("compiled", "graphs") for _ in range(2)]
    assert modes == [None, None, "reduce-overhead", "reduce-overhead"] * 2
    loop_targets = [t for t in results["targets"] if t.startswith("train.py's step")]
    assert all(t.split(",")[3].strip() == "graphs" for t in loop_targets)  # the targets are for train.py's mode
    against_default = [t for t in loop_targets if "in torch.compile's default mode" in t]
    assert [t.split(",")[2].strip() for t in against_default] == ["dense", "moe"] and len(loop_targets) == 6
    assert "| tiny | moe | graphs | random tokens |" in (tmp_path / "out" / "bench.md").read_text()


def test_wall_clock_timing_counts_the_host_s_time_between_steps():
    """A step that keeps the host busy for 3 ms and gives the device nothing: its device events would time nearly
    nothing, the wall clock the 3 ms a training loop loses to it."""
    def host_bound_step():
        t = time.perf_counter()
        while time.perf_counter() - t < 0.003:
            pass
    assert 3.0 <= bench.wall_ms(host_bound_step, torch.device("cpu"), 5) < 30.0


def test_profile_of_the_loop_shows_where_train_py_s_step_spends_its_time(tmp_path):
    """--profile with the loop section: a profiler table per model of train.py's step function on real text, with
    the totals that say how much of a step the device computes."""
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 2000)
    bench.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--warmup", "0", "--iters", "1", "--no-hf",
                "--sections", "loop", "--loop-data", str(text), "--profile"])
    tables = (tmp_path / "out" / "bench.profile.txt").read_text().split("\n## ")
    loop_tables = [t for t in tables if "train.train_step" in t.splitlines()[0]]
    assert [t.split(",")[1].strip() for t in loop_tables] == ["dense", "MoE"]
    assert all("real text" in t and "Self CPU time total" in t and "aten::mm" in t for t in loop_tables)


def test_a_failing_profiler_costs_the_table_not_the_measurement(tmp_path):
    def fails():
        raise RuntimeError("no profiler here\nsecond line")
    text = bench.profile_table(fails, torch.device("cpu"), 3, "some step")
    assert text == "## some step\n\n(profile failed: RuntimeError: no profiler here)"
