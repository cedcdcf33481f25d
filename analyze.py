"""
The paper's two analyses at small scale, and the small measurements behind the classroom exercises.

    python analyze.py sweep   --preset cpu --out-dir out/cpu   # Sec. 5.3, Fig. 4: the re-initialisation ratio r
    python analyze.py lr      --preset cpu --out-dir out/lr    # is naive Upcycling only hurt by the MoE learning rate?
    python analyze.py seeds out/seed0 out/seed1 out/seed2   # is each gap to naive larger than the seed spread?
    python analyze.py routing --preset cpu --out-dir out/cpu   # Sec. 5.4, Fig. 5: where each domain's tokens go
    python analyze.py router-grad --r 0 0.5                    # does the router learn from the LM loss at step 0?
    python analyze.py overlap --r 0.5                          # Sec. 3.2.2: two experts share (1 - r)^2 of the neurons

The classroom exercises built on these commands, with what each needs and how long it takes, are in EXERCISES.md.

sweep, lr and routing take every train.py flag (--preset, --out-dir, --data, model and step overrides, ...): sweep
and lr train with them, routing finds the runs and data they name. So one --out-dir holds one dense model, every
MoE run made from it, and the analyses of them.

Read top to bottom:
  1. routing statistics: load balance and domain specialisation (plain functions of counts, tested with known numbers)
  2. sweep: r in {0, 0.1, 0.25, 0.5, 0.75, 1} from one dense model, plus r = 0.5 with independent index sets
  3. lr: naive, drop r = 0.5 (both index-set variants) and scratch at each MoE peak learning rate, one dense model;
     seeds: each gap to naive in several seeds, against their spread
  4. routing: held-out text of each domain through each MoE, per layer and expert
  5. router-grad and overlap: two measurements right after upcycling, no training needed
  6. main: every expected failure becomes one line on stderr and a non-zero exit
"""

import filecmp
import json
import math
import os
import shlex
import shutil
import signal
import sys

import ctrl_c

if __name__ == "__main__":  # Ctrl-C from here on, the seconds of slow imports included: ctrl_c.py
    ctrl_c.install()

import numpy as np
import torch
import torch.nn.functional as F

import train
from dropupcycle import ModelConfig, Transformer, drop_upcycle, load_balancing_loss, neurons_to_drop, top_k_indices
from data import Fail
import data
import distributed
import gpus
import plot
from runs import RUN_CHECKPOINT_ADVICE, load_model, on_signal, run_as_script, settings_diff

# -----------------------------------------------------------------------------
# 1. Routing statistics
#
# counts[d, e]: how many of domain d's top-k assignments went to expert e (a token counts once in each of its k
# slots). Normalising a row gives the domain's routing distribution, which sums to 1.


def count_assignments(experts, n_experts):
    """experts [N, k] chosen expert ids -> [n_experts] assignment counts, every top-k slot counted."""
    return torch.bincount(experts.flatten(), minlength=n_experts)


def entropy(p):
    """Shannon entropy in nats of each distribution along the last axis (normalised first; 0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=-1)


def load_balance(usage):
    """Entropy of the expert-usage distribution relative to uniform's, log(n_experts): 1 when every expert gets
    the same share, 0 when all tokens go to one expert. (With top-k, all on k experts gives log(k)/log(E).)"""
    return float(entropy(usage) / math.log(len(usage)))


def js_divergence(distributions):
    """Jensen-Shannon divergence in nats of the rows, equal weights: H(mean) - mean(H). 0 when every domain is
    routed alike, log(n_domains) (log 2 = 0.693 for two) when the domains use disjoint sets of experts."""
    d = np.asarray(distributions, dtype=np.float64)
    d = d / d.sum(axis=-1, keepdims=True)
    return float(max(entropy(d.mean(axis=0)) - entropy(d).mean(), 0.0))  # max: rounding can give -1e-17


def routing_stats(counts):
    """counts [domains, experts] of one layer -> per-domain distributions, overall usage, balance, JS.

    Every domain contributes the same number of tokens, so the overall usage is the mean of the domains'
    distributions: the "expert usage" that the balance score rates.
    """
    counts = np.asarray(counts, dtype=np.float64)
    dists = counts / counts.sum(axis=1, keepdims=True)
    usage = dists.mean(axis=0)
    return dict(dists=dists, usage=usage, balance=load_balance(usage), js=js_divergence(dists))


# -----------------------------------------------------------------------------
# 2. The r sweep (Sec. 5.3, Figure 4)

PAPER_RS = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]


def sweep_runs(r_values):
    """(init, r, shared index sets), as train.ALL_RUNS, of every run: naive (r = 0) always, as the reference of
    the difference panel; drop for each r > 0; r = 0.5 with independent sets (the released code); scratch, for the
    routing."""
    runs = [("naive", None, True)]
    runs += [("drop", r, True) for r in sorted(set(r_values)) if r > 0]
    return runs + [("drop", 0.5, False), ("scratch", None, True)]


# the train.py flags each command sets itself, with where its own values go instead
OWN_FLAGS = {"init": ("--init", ""), "r": ("--r", " (and --r-values for the ratios)"),
             "independent_indices": ("--independent-indices", ""), "sample": ("--sample", ""),
             "moe_lr": ("--moe-lr", " (and --lrs for the MoE learning rates)")}


def chosen_train_flags(command):
    """The train.py settings (argparse dests) that sweep, lr or routing choose for each run themselves."""
    return ("init", "r", "independent_indices", "sample") + (("moe_lr",) if command == "lr" else ())


def train_argv_checked(train_argv, command):
    """train_argv, once seen not to set any of command's chosen_train_flags (parsed as train.py parses them, so an
    abbreviation or --flag=value is caught too)."""
    given = train.given_flags(train_argv)
    for key in chosen_train_flags(command):
        if key in given:
            flag, hint = OWN_FLAGS[key]
            raise Fail(f"{command} chooses {flag} itself; pass the train.py flags that all its runs share{hint}")
    return train_argv


def moe_argv(train_argv, init, r, shared):
    """train.py's command line of one MoE run."""
    argv = list(train_argv) + ["--init", init] + (["--r", f"{r:g}"] if init == "drop" else [])
    return argv + ([] if shared else ["--independent-indices"])


def train_moe_run(argv, title):
    """train.experiment for one MoE run (training the dense model first where its out-dir has none). Returns the
    run's wall time when it was trained here, None when a finished run was reused."""
    args = train.parse_args(argv)
    print(f"\n===== {title}: python train.py {shlex.join(argv)}", flush=True)
    run = (args.init, args.r, not args.independent_indices)
    reused = finished(args.out_dir, run)
    train.experiment(args)
    if reused:
        return None
    with open(result_path(args.out_dir, run)) as f:
        return json.load(f)["wall_time"]


def result_path(out_dir, run):
    """The result.json of the MoE run (init, r, shared index sets) in out_dir: there once the run has finished."""
    init, r, shared = run
    return os.path.join(out_dir, plot.run_name(init, r, shared), "result.json")


def finished(out_dir, run):
    """Whether out_dir holds the finished MoE run: a command reuses it in seconds."""
    return os.path.exists(result_path(out_dir, run))


def print_eta(command, took, left):
    """Every MoE run has the same FLOPs, so the mean wall time of those trained so far, times the runs left to
    train (finished ones are reused), gives the ETA."""
    if took and left:
        each = float(np.mean(took))
        print(f"===== {command}: {left} run{'s' * (left > 1)} left, ETA {plot.fmt_time(left * each)} ({left} x "
              f"{plot.fmt_time(each)}, the mean time of the MoE runs trained so far)", flush=True)


def sweep(opts, train_argv):
    train_argv = train_argv_checked(train_argv, "sweep")
    runs = sweep_runs(opts.r_values)
    args = train.parse_args(train_argv)
    took = []  # wall time of each MoE run trained here
    for i, (init, r, shared) in enumerate([] if opts.report_only else runs):
        # the first run trains the dense model; later runs (and reruns) reuse it
        wall = train_moe_run(moe_argv(train_argv, init, r, shared), f"sweep run {i + 1}/{len(runs)}")
        took += [wall] if wall is not None else []
        print_eta("sweep", took, sum(not finished(args.out_dir, run) for run in runs[i + 1:]))
    if distributed.is_main():  # under torchrun, rank 0 writes the figure and table
        sweep_report(args.out_dir, runs, "python analyze.py sweep " + shlex.join(opts.argv))


def sweep_report(out_dir, runs, command):
    """Figure (plot.sweep_figure: loss against MoE-phase tokens for every r, and minus naive) and table."""
    rows, curves = [], {}
    for init, r, shared in runs:
        name = plot.run_name(init, r, shared)
        folder = os.path.join(out_dir, name)
        run = plot.read_run(folder)  # (settings, result, curve); None, with a warning, when damaged
        if run is None:
            if not os.path.exists(os.path.join(folder, "result.json")):
                print(f"{name}: no finished run in {folder}, left out")
            continue
        rows.append((name, init, r, shared, run[1]))
        curves[name] = run[2]
    dense_run = plot.read_run(os.path.join(out_dir, "dense"))
    if "moe-naive" not in curves or dense_run is None:
        raise Fail(f"no finished dense and naive runs in {out_dir} "
                   f"(with --report-only: pass the training's flags)")
    dense_settings, dense = dense_run[:2]  # the header tells what the runs were trained with, not what the flags say

    naive_batches = next(res for name, _, _, _, res in rows if name == "moe-naive").get("final_val_batches")
    lines = ["| run | r | index sets | val loss right after upcycling | final val loss | minus naive (noise) | "
             "vs naive | wall time |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, init, r, shared, result in rows:
        gap = None if name == "moe-naive" else plot.compare_to_naive(
            curves[name], curves["moe-naive"], result.get("final_val_batches"), naive_batches)
        vs, verdict = ("", "") if gap is None else (plot.gap_text(gap), gap[2])
        r_text = "0" if init == "naive" else "-" if init == "scratch" else f"{r:g}"
        sets = "-" if init != "drop" else "shared" if shared else "independent"
        lines.append(f"| {name} | {r_text} | {sets} | {curves[name][2][0]:.4f} | {result['final_val_loss']:.4f} | "
                     f"{vs} | {verdict} | {plot.fmt_time(result['wall_time'])} |")
    moe = rows[0][4]
    tokenizer, seed = (dense_settings.get(key, "unrecorded") for key in ("tokenizer", "seed"))
    header = (f"Re-initialisation ratio sweep (paper Sec. 5.3, Fig. 4). Validation loss in nats/token "
              f"({tokenizer} tokenizer) after {dense['steps']} dense steps ({dense['tokens'] / 1e6:.1f}M tokens, "
              f"final dense val loss {dense['final_val_loss']:.4f}) and {moe['steps']} MoE steps "
              f"({moe['tokens'] / 1e6:.1f}M tokens), same data order for every run; device {dense['device']}, "
              f"seed {seed}. Noise: two standard errors of the per-batch differences of the two final losses "
              f"(the same validation batches for every run).")
    table = f"{header}\n\nMade with: `{command}`\n\n" + "\n".join(lines) + "\n"
    table_path, figure_path = os.path.join(out_dir, "sweep_summary.md"), os.path.join(out_dir, "sweep_loss.png")
    data.atomic_write_text(table_path, table)
    print("\n" + table)
    plot.sweep_figure(figure_path, header, curves, dense["final_val_loss"], {row[0]: row[4] for row in rows})
    print(f"figure: {figure_path} | table: {table_path}")


# -----------------------------------------------------------------------------
# 3. The learning-rate sweep: is naive Upcycling only handicapped by the MoE learning rate?
#
# Every init trains at each MoE peak learning rate, all from ONE dense model, on the same data for the same steps.
# A run's folder name does not hold its learning rate, so each rate gets its own out-dir: OUT/lr-2e-3/ and so on.
# The dense model is trained once, in OUT/dense, and its folder is copied byte for byte into each OUT/lr-*/ before
# that rate's runs: train.py then finds a finished dense run with the same settings there and reuses it, as it
# reuses one in any out-dir. The copy is the identical run (same settings, same checkpoint file).

# (init, r, shared index sets), as train.ALL_RUNS
LR_RUNS = [("naive", None, True), ("drop", 0.5, True), ("drop", 0.5, False), ("scratch", None, True)]
DEFAULT_LRS = [5e-4, 1e-3, 2e-3, 4e-3]


def lr_text(lr):
    """0.002 -> '2e-3', 0.0015 -> '1.5e-3': the learning rate in folder names and tables."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def lr_folders(out_dir, lrs):
    """{lr: OUT/lr-<lr>} for the distinct rates, in increasing order."""
    folders = {lr: os.path.join(out_dir, "lr-" + lr_text(lr)) for lr in sorted(set(lrs))}
    if len(set(folders.values())) < len(folders):
        raise Fail(f"--lrs {' '.join(map(repr, sorted(set(lrs))))}: rates that differ beyond 7 significant digits "
                   f"would share a folder")
    return folders


def copy_dense(dense_dir, out_dir):
    """Put the finished dense run of dense_dir into out_dir/dense: a byte copy, made under a temporary name and
    renamed, so that an interrupted copy never looks like a run. A copy already there must be the same file.
    The token cache next to dense_dir is shared by hard links (no second tokenization, no second GB on disk):
    data.py only ever replaces a cache file, never writes into one, so a rebuild in one folder leaves the others'."""
    cache, cache_copy = os.path.join(os.path.dirname(dense_dir), "data"), os.path.join(out_dir, "data")
    if os.path.isdir(cache) and not os.path.exists(cache_copy):
        data.make_dirs(out_dir)
        shutil.rmtree(cache_copy + ".partial", ignore_errors=True)
        shutil.copytree(cache, cache_copy + ".partial", copy_function=os.link)
        os.replace(cache_copy + ".partial", cache_copy)
    target = os.path.join(out_dir, "dense")
    if os.path.exists(target):
        ckpt = os.path.join(target, "ckpt.pt")
        if not (os.path.exists(ckpt) and filecmp.cmp(os.path.join(dense_dir, "ckpt.pt"), ckpt, shallow=False)):
            raise Fail(f"{target} is not a copy of the dense model in {dense_dir}: every learning rate must start from "
                       f"the same one; delete {target} (and that rate's MoE runs) to redo that rate from it")
        return
    data.make_dirs(out_dir)
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(dense_dir, partial)  # (a real copy: each folder's run files stay its own)
    os.replace(partial, target)
    print(f"===== lr: copied the dense model {dense_dir} -> {target}")


def lr_sweep(opts, train_argv):
    train_argv = train_argv_checked(train_argv, "lr")
    args = train.parse_args(train_argv)
    folders = lr_folders(args.out_dir, opts.lrs)
    if not opts.report_only:
        dense_dir = os.path.join(args.out_dir, "dense")
        if not args.dense_from:  # (a pretrained --dense-from model is loaded again in each folder: nothing to copy)
            print(f"\n===== lr: the dense model, trained once (or reused) in {dense_dir}", flush=True)
            train.experiment(train.parse_args(list(train_argv) + ["--init", "dense"]))
        jobs = [(lr, folder, run) for lr, folder in folders.items() for run in LR_RUNS]  # every rate's runs in turn
        took = []
        for i, (lr, folder, run) in enumerate(jobs, 1):
            if run == LR_RUNS[0] and not args.dense_from and distributed.is_main():  # a rate's first run
                copy_dense(dense_dir, folder)
            argv = moe_argv(list(train_argv) + ["--out-dir", folder, "--moe-lr", repr(lr)], *run)
            wall = train_moe_run(argv, f"lr run {i}/{len(jobs)} (MoE peak learning rate {lr_text(lr)})")
            took += [wall] if wall is not None else []
            print_eta("lr", took, sum(not finished(later_folder, later_run) for _, later_folder, later_run in jobs[i:]))
    if distributed.is_main():
        lr_report(args.out_dir, folders, "python analyze.py lr " + shlex.join(opts.argv))


def lr_report(out_dir, folders, command):
    """OUT/lr_summary.md (every run's final loss, each init's best rate, the crossover at the best rates) and
    OUT/lr_loss.png (final loss against the learning rate, plot.lr_figure)."""
    runs = {}  # (name, lr) -> (result, curve)
    for lr, folder in folders.items():
        for init, r, shared in LR_RUNS:
            name = plot.run_name(init, r, shared)
            path = os.path.join(folder, name)
            run = plot.read_run(path)  # (settings, result, curve); None, with a warning, when damaged
            if run is None:
                if not os.path.exists(os.path.join(path, "result.json")):
                    print(f"{path}: no finished run, left out")
                continue
            runs[name, lr] = run[1:]
    names = [n for n in dict.fromkeys(plot.run_name(*run) for run in LR_RUNS)
             if any((n, lr) in runs for lr in folders)]
    if "moe-naive" not in names:
        raise Fail(f"no finished naive run in {', '.join(folders.values())} (with --report-only: pass the training's flags)")
    best = {n: min((lr for lr in folders if (n, lr) in runs), key=lambda lr: runs[n, lr][0]["final_val_loss"])
            for n in names}

    def gap(name, lr, ref, ref_lr):  # (gap, noise, verdict) of run (name, lr) against (ref, ref_lr)
        (res, curve), (ref_res, ref_curve) = runs[name, lr], runs[ref, ref_lr]
        return plot.compare_to_naive(curve, ref_curve, res.get("final_val_batches"), ref_res.get("final_val_batches"))

    lrs = list(folders)
    lines = ["Final validation loss of each run (best rate of each init in bold):", "",
             "| run | " + " | ".join(f"lr {lr_text(lr)}" for lr in lrs) + " | best lr | next best minus best (noise) |",
             "| --- " * (len(lrs) + 3) + "|"]
    for name in names:
        cells = []
        for lr in lrs:
            text = f"{runs[name, lr][0]['final_val_loss']:.4f}" if (name, lr) in runs else "-"
            cells.append(f"**{text}**" if lr == best[name] else text)
        done = sorted((lr for lr in lrs if (name, lr) in runs), key=lambda lr: runs[name, lr][0]["final_val_loss"])
        trained = [lr for lr in lrs if (name, lr) in runs]  # a rate never trained is not the edge of the grid
        edge = " (edge of the grid)" if len(trained) > 1 and best[name] in (trained[0], trained[-1]) else ""
        second = ""
        if len(done) > 1:
            g = gap(name, done[1], name, done[0])
            second = f"{plot.gap_text(g)} at {lr_text(done[1])}" if g else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {lr_text(best[name])}{edge} | {second} |")
    drops = [n for n in names if n.startswith("moe-drop")]
    lines += ["", "Each init at its own best rate against naive Upcycling at its best rate "
                  f"({lr_text(best['moe-naive'])}, final loss {runs['moe-naive', best['moe-naive']][0]['final_val_loss']:.4f}):",
              "", "| run | its best lr | final val loss | minus naive (noise) | vs naive |", "| --- | --- | --- | --- | --- |"]
    for name in drops:
        g = gap(name, best[name], "moe-naive", best["moe-naive"])
        vs, verdict = (plot.gap_text(g), g[2]) if g else ("", "not comparable (other evaluation steps)")
        lines.append(f"| {name} | {lr_text(best[name])} | {runs[name, best[name]][0]['final_val_loss']:.4f} | {vs} | {verdict} |")
    lines += ["", "At the same rate: minus naive (noise), vs naive:", "",
              "| run | " + " | ".join(f"lr {lr_text(lr)}" for lr in lrs) + " |", "| --- " * (len(lrs) + 1) + "|"]
    for name in drops:
        cells = []
        for lr in lrs:
            g = gap(name, lr, "moe-naive", lr) if (name, lr) in runs and ("moe-naive", lr) in runs else None
            cells.append(f"{plot.gap_text(g)}, {g[2]}" if g else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    # every rate must start from one dense model: the same log (and checkpoint, where one was kept) in each folder
    denses = [os.path.join(folder, "dense") for lr, folder in folders.items() if any((n, lr) in runs for n in names)]
    top = os.path.join(out_dir, "dense")
    for other in denses[1:] + ([top] if os.path.isdir(top) else []):
        for file in ("log.csv", "ckpt.pt"):
            a, b = os.path.join(denses[0], file), os.path.join(other, file)
            if (file == "log.csv" or os.path.exists(a) and os.path.exists(b)) and not (
                    os.path.exists(a) and os.path.exists(b) and filecmp.cmp(a, b, shallow=False)):
                raise Fail(f"{denses[0]} and {other} are different dense models (their {file} differ): every rate "
                           f"must start from the same one")
    dense_run = plot.read_run(denses[0])
    if dense_run is None:
        raise Fail(f"no finished dense run in {denses[0]}")
    dense = dense_run[1]
    source = (f"{top}, copied into each lr-* folder" if os.path.isdir(top) else "the same dense/ in each lr-* folder")
    moe = runs["moe-naive", best["moe-naive"]][0]
    header = (f"MoE peak learning-rate sweep: naive Upcycling, Drop-Upcycling r=0.5 (shared and independent index "
              f"sets) and from scratch at each of {', '.join(lr_text(lr) for lr in lrs)} (same schedule shape: warmup, "
              f"cosine to {train.MIN_LR_RATIO:g} x peak), all from one dense model ({dense['steps']} steps, "
              f"{dense['tokens'] / 1e6:.1f}M tokens, final val loss {dense['final_val_loss']:.4f}; {source}), "
              f"{moe['steps']} MoE steps ({moe['tokens'] / 1e6:.1f}M tokens) with the same data order; validation "
              f"loss in nats/token; device {dense['device']}. Noise: two standard errors "
              f"of the per-batch differences of the two final losses (the same validation batches for every run).")
    table = f"{header}\n\nMade with: `{command}`\n\n" + "\n".join(lines) + "\n"
    table_path, figure_path = os.path.join(out_dir, "lr_summary.md"), os.path.join(out_dir, "lr_loss.png")
    data.atomic_write_text(table_path, table)
    print("\n" + table)
    losses = {n: {lr: runs[n, lr][0]["final_val_loss"] for lr in lrs if (n, lr) in runs} for n in names}
    plot.lr_figure(figure_path, header, losses, dense["final_val_loss"])
    print(f"figure: {figure_path} | table: {table_path}")


# -----------------------------------------------------------------------------
# 3b. Seeds: is a gap larger than what another seed moves it by?


def without_seed(settings):
    """A run's settings with its seed (and its dense parent's) left out: what must match across seeds."""
    s = {k: v for k, v in settings.items() if k != "seed"}
    return dict(s, dense=without_seed(s["dense"])) if s.get("dense") else s


def seed_folder_runs(folder):
    """(seed, {run name: (settings, result, curve)}) of the finished runs in one --out-dir."""
    if not os.path.isdir(folder):
        raise Fail(f"{folder}: no such folder (give the --out-dir of each seed's train.py run)")
    runs = {name: plot.read_run(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}
    runs = {name: run for name, run in runs.items() if run is not None}
    if "dense" not in runs or "moe-naive" not in runs:
        raise Fail(f"{folder}: no finished dense and naive runs (every seed is compared with its own naive Upcycling)")
    return runs["dense"][0]["seed"], runs


def mean_spread(values):
    """'mean ± sample standard deviation' of the values (the value alone for one)."""
    if len(values) == 1:
        return f"{values[0]:+.4f}"
    return f"{np.mean(values):+.4f} ± {np.std(values, ddof=1):.4f}"


def seeds_verdict(gaps):
    """A gap is called real only when at least three seeds all put it on the same side of zero and its mean is
    beyond their spread; otherwise it is noise, whatever one seed says."""
    if len(gaps) < 3:
        return f"{len(gaps)} seed{'s' * (len(gaps) > 1)}: too few to judge"
    mean, sd = float(np.mean(gaps)), float(np.std(gaps, ddof=1))
    if abs(mean) > sd and (all(g < 0 for g in gaps) or all(g > 0 for g in gaps)):
        return ("below" if mean < 0 else "above") + f" in all {len(gaps)} seeds"
    return "within the seed spread (noise)"


def seeds(opts):
    """OUT: every init's final gap to naive Upcycling and its crossover step in each seed, their mean and spread."""
    folders = {}
    for folder in opts.folders:
        seed, runs = seed_folder_runs(folder)
        if seed in folders:
            raise Fail(f"{folder} and {folders[seed][0]} both hold seed {seed}: give one folder per seed")
        folders[seed] = folder, runs
    order = sorted(folders)
    first = folders[order[0]]
    holder = {}  # run name -> the first folder that holds it: every other folder's run must match it
    for seed in order:
        folder, runs = folders[seed]
        for name, (settings, _, _) in runs.items():
            ref_folder, ref = holder.setdefault(name, (folder, settings))
            if without_seed(settings) != without_seed(ref):
                diff = settings_diff(without_seed(ref), without_seed(settings))
                raise Fail(f"{name} in {ref_folder} and in {folder} differ in more than the seed ({', '.join(diff[:4])})")
    names = sorted(dict.fromkeys(n for s in order for n in folders[s][1]), key=plot.run_order)  # as train.py's summary
    cols = " | ".join(f"seed {s}" for s in order)
    lines = ["Final validation loss of each run in each seed:", "", f"| run | {cols} | mean ± sd |",
             "| --- " * (len(order) + 2) + "|"]
    for name in names:
        finals = [folders[s][1][name][1]["final_val_loss"] if name in folders[s][1] else None for s in order]
        done = [f for f in finals if f is not None]
        spread = mean_spread(done).lstrip("+")
        lines.append(f"| {name} | " + " | ".join(f"{f:.4f}" if f is not None else "-" for f in finals) + f" | {spread} |")

    def gap(seed, name, ref):  # (final gap, evaluation noise, crossover step or None) of name minus ref in one seed
        runs = folders[seed][1]
        if name not in runs or ref not in runs:
            return None
        (_, res, curve), (_, ref_res, ref_curve) = runs[name], runs[ref]
        g = plot.compare_to_naive(curve, ref_curve, res.get("final_val_batches"), ref_res.get("final_val_batches"))
        return g and (g[0], g[1], plot.overtake_step(curve[0], curve[2] - ref_curve[2]) if g[0] < 0 else None)

    pairs = [(n, "moe-naive") for n in names if n not in ("dense", "moe-naive")]
    if "moe-drop-r0.5" in names and "moe-drop-r0.5-indep" in names:
        pairs.append(("moe-drop-r0.5-indep", "moe-drop-r0.5"))
    lines += ["", "Each run minus the reference in the same seed (final loss; in brackets the evaluation noise, two "
                  "standard errors of the per-batch differences), and the step from which it stays below:", "",
              f"| run minus reference | {cols} | mean ± sd | below from step (per seed) | verdict |",
              "| --- " * (len(order) + 4) + "|"]
    for name, ref in pairs:
        per_seed = {s: gap(s, name, ref) for s in order}
        done = [g for g in per_seed.values() if g]
        if not done:
            continue
        cells = [plot.gap_text(g) if g else "-" for g in per_seed.values()]
        steps = ", ".join(("never" if g[2] is None else str(g[2])) if g else "-" for g in per_seed.values())
        lines.append(f"| {name} minus {ref} | " + " | ".join(cells) + f" | {mean_spread([g[0] for g in done])} | "
                     f"{steps} | {seeds_verdict([g[0] for g in done])} |")
    dense = first[1]["dense"][1]
    moe = first[1]["moe-naive"][1]
    which = f"Seed {order[0]} alone" if len(order) == 1 else f"Seeds {', '.join(map(str, order))} of the same runs"
    header = (f"{which} ({dense['steps']} dense steps, {moe['steps']} MoE steps; device {dense['device']}), from "
              f"{', '.join(folders[s][0] for s in order)}. sd: sample standard deviation over the seeds. A gap counts "
              f"only when at least three seeds all put it on the same side and its mean is beyond the sd; otherwise it "
              f"is called noise.")
    table = f"{header}\n\nMade with: `python analyze.py seeds {shlex.join(opts.folders)}`\n\n" + "\n".join(lines) + "\n"
    if opts.out:
        data.atomic_write_text(opts.out, table)
    print("\n" + table + (f"table: {opts.out}" if opts.out else ""))


# -----------------------------------------------------------------------------
# 4. Routing specialisation (Sec. 5.4, Figure 5, Appendix C.2)

FIGURE_MODELS = ["moe-naive", "moe-drop-r0.5", "moe-scratch"]  # the paper's Fig. 5 columns


def domain_of(key, default_corpus):
    """The domain of a corpus file: its language for the built-in corpus, its top folder under --data."""
    if default_corpus:
        language = data.language_of(key)
        return None if language == "other" else language
    parts = key.split("/")  # "data/<domain>/.../<file>"
    return parts[1] if len(parts) > 2 else None


def heldout_tokens(data_spec, corpus_mb, enc, max_tokens):
    """{domain: token ids} from the validation files of --data data_spec only (the same file split train.py uses),
    at most max_tokens per domain, every file followed by <|endoftext|>."""
    try:
        files = data.list_files(data_spec)
    except OSError as e:
        raise Fail(f"--data {data_spec}: cannot list files ({e.strerror or e})")
    _, val_files = data.select_files(files, corpus_mb)
    tokens = {}
    for key, path, _, _ in val_files:
        domain = domain_of(key, data_spec in data.BUILTIN_CORPORA)
        if domain is None or len(tokens.get(domain, [])) >= max_tokens:
            continue
        text = data.read_text(path)
        if text:
            tokens.setdefault(domain, []).extend(enc.encode_ordinary(text) + [enc.eot_token])
    if len(tokens) < 2:
        where = "the built-in corpus" if data_spec in data.BUILTIN_CORPORA else f"--data {data_spec} (one subfolder per domain)"
        found = ", ".join(sorted(tokens)) or "none"
        raise Fail(f"routing needs held-out files of two or more domains, but the validation split of {where} has "
                   f"{found}; give more files per domain (about 1 in 20 is held out)")
    return {d: t[:max_tokens] for d, t in sorted(tokens.items())}


def moe_run_folders(out_dir, fingerprint):
    """Every finished MoE run in out_dir trained on this data, in the order of the paper's Fig. 5: naive, drop by r,
    scratch."""
    found, skipped = [], []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        folder = os.path.join(out_dir, name)
        if not all(os.path.exists(os.path.join(folder, f)) for f in ("result.json", "settings.json", "ckpt.pt")):
            continue
        try:
            with open(os.path.join(folder, "settings.json")) as f:
                settings = json.load(f)
            if settings["phase"] != "moe":
                continue
            data_fingerprint, init, r = settings["data"], settings["init"], settings.get("r") or 0.0
            independent = not settings.get("shared_indices", True)
        except (OSError, ValueError, KeyError, TypeError):
            print(f"warning: {folder} has a damaged settings.json: left out")
            continue
        if data_fingerprint != fingerprint:
            skipped.append(name)
            continue
        found.append(((["naive", "drop", "scratch"].index(init) if init in ("naive", "drop", "scratch") else 3, r,
                       independent, name), name, folder))
    if skipped:
        print(f"skipping {', '.join(skipped)}: trained on other data than these flags give (pass the training's "
              f"--data and --corpus-mb, and --tokenizer or --dense-from)")
    return [(name, folder) for _, name, folder in sorted(found)]


@torch.no_grad()
def route_counts(model, tokens, seq_len, batch_size, device):
    """Route the tokens through the model; counts [n_layer, n_experts] of top-k assignments per layer."""
    cfg = model.config
    counts = torch.zeros(cfg.n_layer, cfg.n_experts, dtype=torch.long)
    hooks = []
    for layer, block in enumerate(model.layers):
        def hook(module, inputs, output, layer=layer):
            router_logits = output[1]  # [B*T, E]: MoE.forward returns (y, router logits)
            experts = top_k_indices(router_logits, module.top_k)  # the choice MoE.route makes
            counts[layer] += count_assignments(experts, cfg.n_experts).cpu()
        hooks.append(block.ffn.register_forward_hook(hook))
    try:
        T = min(seq_len, len(tokens))
        windows = torch.tensor(tokens[: len(tokens) // T * T], dtype=torch.long).view(-1, T)
        for i in range(0, len(windows), batch_size):
            with gpus.autocast(device):
                model(windows[i : i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return counts


def routing(opts, train_argv):
    args = train.parse_args(train_argv_checked(train_argv, "routing"))
    if opts.report_only:
        return routing_replot(args.out_dir, "python analyze.py routing " + shlex.join(opts.argv), opts.models,
                              opts.all_layers)
    if args.data not in data.BUILTIN_CORPORA and not os.path.isdir(args.data):
        raise Fail(f"routing needs text of two or more domains: the built-in corpus (Python vs C/C++) or "
                   f"--data FOLDER with one subfolder per domain; --data {args.data} is not a folder")
    none_there = Fail(f"no finished MoE run in {args.out_dir} trained on this data; train some first, e.g. "
                      f"python analyze.py sweep {shlex.join(train_argv)}")
    if not any(name.startswith("moe-") for name in (os.listdir(args.out_dir) if os.path.isdir(args.out_dir) else [])):
        raise none_there  # before the corpus is read (and cached in --out-dir)
    device = gpus.resolve_device(args.device)
    if args.dense_from:  # its runs trained on the pretrained model's own tokenizer
        from hf import pretrained_tokenizer  # safetensors and tokenizers are needed only here

        enc = pretrained_tokenizer(args.dense_from, args.seq_len)[1]
    else:
        enc = data.get_tokenizer(args.tokenizer)
    # the fingerprint that tells which runs used this data
    _, _, data_info = data.load_data(args.data, enc.name, enc, args.out_dir, args.corpus_mb, args.seq_len)
    runs = moe_run_folders(args.out_dir, data_info["fingerprint"])
    if not runs:
        raise none_there
    check_models(opts.models, [name for name, _ in runs])  # before the routing, not after
    texts = heldout_tokens(args.data, args.corpus_mb, enc, opts.routing_tokens)
    n = min(len(t) for t in texts.values())  # the same number of tokens from every domain
    domains = list(texts)
    print(f"routing {n:,} held-out tokens of each domain ({', '.join(domains)}), in whole windows of each model's "
          f"sequence length, through {len(runs)} MoE model{'s' if len(runs) > 1 else ''}")

    results = {}
    for name, folder in runs:
        model, ckpt, _ = load_model(folder, if_damaged=RUN_CHECKPOINT_ADVICE)
        model.to(device).eval()
        per_domain = [route_counts(model, texts[d][:n], model.config.max_seq_len, args.batch_size, device)
                      for d in domains]
        counts = torch.stack(per_domain, dim=1).numpy()  # [n_layer, domains, experts]
        layers = [routing_stats(c) for c in counts]
        results[name] = dict(counts=counts, layers=layers, top_k=model.config.top_k,
                             tokens=int(counts[0, 0].sum()) // model.config.top_k)  # the tokens actually routed
        del model, ckpt

    command = "python analyze.py routing " + shlex.join(opts.argv)
    routing_report(args.out_dir, results, domains, command, opts.models, opts.all_layers)


def routing_replot(out_dir, command, models, all_layers):
    """Figure and tables again from routing_counts.json (no models, no data): e.g. with --all-layers or --models."""
    path = os.path.join(out_dir, "routing_counts.json")
    if not os.path.exists(path):
        raise Fail(f"--report-only: no {path}; run python analyze.py routing without --report-only first")
    try:
        with open(path) as f:
            raw = json.load(f)
        results = {name: dict(counts=np.array(r["counts"]), layers=[routing_stats(c) for c in np.array(r["counts"])],
                              top_k=r["top_k"], tokens=r["tokens_per_domain"]) for name, r in raw.items()}
        first = next(iter(raw.values()))
        domains = list(first["domains"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, StopIteration):
        raise Fail(f"--report-only: {path} is damaged; run python analyze.py routing without --report-only again")
    check_models(models, list(results))
    command = f"{first.get('command', 'unknown command')}, re-plotted with {command}"
    routing_report(out_dir, results, domains, command, models, all_layers)


def check_models(models, routed):
    unknown = [m for m in models or [] if m not in routed]
    if unknown:
        raise Fail(f"--models {' '.join(unknown)}: no routing of {'that run' if len(unknown) == 1 else 'those runs'}; "
                   f"the runs routed are {', '.join(routed)}")


def routing_report(out_dir, results, domains, command, models, all_layers):
    """routing_summary.md, routing_counts.json and the figure (plot.routing_figure: the paper's Fig. 5)."""
    n_layer = len(next(iter(results.values()))["layers"])
    n_tokens = "/".join(f"{n:,}" for n in sorted({res["tokens"] for res in results.values()}))  # what was routed
    top_k = "/".join(str(k) for k in sorted({res["top_k"] for res in results.values()}))
    header = (f"Routing of {n_tokens} held-out tokens per domain ({', '.join(domains)}; validation files only). "
              f"Load balance: entropy of the expert-usage distribution / log(n_experts), 1 = uniform. Domain "
              f"specialisation: Jensen-Shannon divergence of the domains' routing distributions, nats (0 = routed "
              f"alike, log {len(domains)} = {math.log(len(domains)):.3f} = disjoint experts). Top-{top_k} routing: "
              f"each token counted once for every expert it is sent to.")
    lines = [header, "", f"Made with: `{command}`", ""]
    for key, title in (("balance", "Load balance"), ("js", "Domain specialisation (JS divergence, nats)")):
        # the balancing loss pools all layers' router logits (Mixtral form), so it sees only the usage summed over
        # layers: that column can be near 1 while every layer sends its tokens to a few experts of its own
        pooled = " | all layers pooled (what the balancing loss sees)" if key == "balance" else ""
        lines += [f"{title}, per layer:", "",
                  "| model | " + " | ".join(f"layer {i}" for i in range(n_layer)) + f" | mean{pooled} |",
                  "| --- " * (n_layer + 2 + bool(pooled)) + "|"]
        for name, res in results.items():
            values = [layer[key] for layer in res["layers"]]
            extra = f" {load_balance(sum(l['usage'] for l in res['layers'])):.3f} |" if pooled else ""
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |{extra}")
        lines.append("")
    table = "\n".join(lines)
    data.atomic_write_text(os.path.join(out_dir, "routing_summary.md"), table)
    print("\n" + table)
    made_with = command.split(", re-plotted with")[0]  # a re-plot keeps the command that routed the tokens
    raw = {name: dict(command=made_with, domains=domains, tokens_per_domain=res["tokens"], top_k=res["top_k"],
                      counts=res["counts"].tolist(), balance=[l["balance"] for l in res["layers"]],
                      js=[l["js"] for l in res["layers"]]) for name, res in results.items()}
    data.atomic_write_text(os.path.join(out_dir, "routing_counts.json"), json.dumps(raw, indent=1))

    models = [m for m in (models or FIGURE_MODELS) if m in results] or list(results)[:3]
    layers = list(range(n_layer)) if all_layers else sorted({0, n_layer // 2, n_layer - 1})
    path = os.path.join(out_dir, "routing_specialisation.png")
    plot.routing_figure(path, header, results, domains, models, layers)
    print(f"figure: {path} | tables: {os.path.join(out_dir, 'routing_summary.md')} | counts: "
          f"{os.path.join(out_dir, 'routing_counts.json')}")


# -----------------------------------------------------------------------------
# 5. Two measurements right after upcycling: router gradient, neuron overlap


def pretrained_dense_run(folder):
    """Whether folder is the dense run of a --dense-from command: the pretrained model's settings and score, no
    checkpoint (its weights are the Hugging Face folder)."""
    try:
        with open(os.path.join(folder, "settings.json")) as f:
            return "source" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def dense_for_probe(dense_ckpt, seed):
    """(model, where it came from): a trained dense model from --dense-ckpt (train.py's
    out/.../dense/ckpt.pt), else a freshly initialised one of the cpu preset's shape (seeded by seed): the effects
    measured here follow from the construction, not the training."""
    if dense_ckpt:
        path = dense_ckpt
        candidates = [path]
        if os.path.isdir(path):  # a run's folder, or the --out-dir that holds dense/
            candidates = [os.path.join(path, "ckpt.pt"), os.path.join(path, "dense", "ckpt.pt")]
            path = next((p for p in candidates if os.path.exists(p)), candidates[0])
        if not os.path.exists(path):
            if any(pretrained_dense_run(os.path.dirname(p)) for p in candidates):
                raise Fail(f"--dense-ckpt {dense_ckpt}: a --dense-from run's dense model is the Hugging Face "
                           f"folder it names, not a train.py checkpoint; these probes read train.py's dense checkpoints")
            raise Fail(f"--dense-ckpt {dense_ckpt}: no checkpoint there; train.py writes the dense model to "
                       f"OUT_DIR/dense/ckpt.pt (python train.py --preset cpu --init dense --out-dir OUT_DIR)")
        model, ckpt, path = load_model(path, if_damaged=None)
        if model.config.is_moe:
            raise Fail(f"--dense-ckpt {dense_ckpt}: that is an MoE checkpoint; give the dense one (out/.../dense)")
        return model, path
    p = train.PRESETS["cpu"]
    cfg = ModelConfig(vocab_size=257, d_model=p["d_model"], n_layer=p["n_layer"], n_head=p["n_head"],
                      n_kv_head=p["n_kv_head"], d_ff=p["d_ff"], max_seq_len=p["seq_len"])
    torch.manual_seed(seed)
    return Transformer(cfg), "a freshly initialised dense model of the cpu preset's shape (no --dense-ckpt)"


def check_experts(n_experts, top_k):
    if n_experts < 2:
        raise Fail(f"--n-experts must be at least 2, got {n_experts}")
    if not 1 <= top_k <= n_experts:
        raise Fail(f"--top-k must be between 1 and --n-experts ({n_experts}), got {top_k}")


def router_grad_norms(dense, r, n_experts, top_k, aux_loss_coef, x, y, seed=0):
    """Gradient norms right after upcycling with ratio r (all layers together): of the routers' weights from the
    LM loss and from aux_loss_coef x the balancing loss, and of the experts' weights from the LM loss."""
    moe = drop_upcycle(dense, n_experts=n_experts, top_k=top_k, r=r, seed=seed)
    router_logits = []
    hooks = [b.ffn.register_forward_hook(lambda m, i, out: router_logits.append(out[1])) for b in moe.layers]
    logits, _ = moe(x)
    for h in hooks:
        h.remove()
    lm_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    aux_loss = aux_loss_coef * load_balancing_loss(torch.cat(router_logits), top_k)
    routers = [b.ffn.router.weight for b in moe.layers]
    experts = [w for b in moe.layers for w in (b.ffn.gate, b.ffn.up, b.ffn.down)]
    grads = torch.autograd.grad(lm_loss, routers + experts, retain_graph=True)
    aux_grads = torch.autograd.grad(aux_loss, routers, allow_unused=True, materialize_grads=True)
    norm = lambda gs: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])).item()
    return dict(lm_router=norm(grads[: len(routers)]), aux_router=norm(aux_grads),
                lm_experts=norm(grads[len(routers) :]))


def router_grad(opts):
    """Why naive Upcycling's router learns nothing from the LM loss at first: with r = 0 every expert is the dense
    FFN, so y = sum_i g_i(x) FFN(x) = FFN(x) whatever the gates are, and the loss cannot tell the router anything.
    With top-1 routing the one gate is softmax over one logit, 1 at any r: no LM gradient ever."""
    check_experts(opts.n_experts, opts.top_k)
    dense, source = dense_for_probe(opts.dense_ckpt, opts.seed)
    # any batch shows the effect, which follows from the construction; a seeded random one stays the same batch
    # whatever the files around it hold (the reference answers in figures/ do not move when a file is edited)
    T = min(128, dense.config.max_seq_len)
    batch = torch.randint(0, dense.config.vocab_size, (8, T + 1), generator=torch.Generator().manual_seed(opts.seed))
    print(f"dense model: {source}; {opts.n_experts} experts, top-{opts.top_k}; one batch of 8 x {T} random tokens "
          f"(seed {opts.seed}); gradients at step 0, before any MoE update, as L2 norms over all layers")
    print(f"| r | router grad from LM loss | router grad from {opts.aux_loss_coef:g} x balancing loss | "
          f"expert-weight grad from LM loss |")
    print("| --- | --- | --- | --- |")
    for r in opts.r:
        x, y = batch[:, :-1], batch[:, 1:]
        g = router_grad_norms(dense, r, opts.n_experts, opts.top_k, opts.aux_loss_coef, x, y, opts.seed)
        print(f"| {r:g} | {g['lm_router']:.3e} | {g['aux_router']:.3e} | {g['lm_experts']:.3e} |")


def overlap_stats(dense, r, n_experts, shared_indices, seed=0):
    """Which FFN neurons are still the dense model's right after upcycling (Sec. 3.2.2), averaged over layers
    and expert pairs. A neuron j of an expert is row j of W_gate and W_up and column j of W_down; a matrix keeps
    it when that row (column) equals the dense one. Expected, with r' = floor(r d_ff) / d_ff: two experts keep the
    same neuron in a matrix with probability (1 - r')^2; a neuron is intact in all three matrices with probability
    1 - r' for shared index sets and (1 - r')^3 for independent ones; intact in both of two experts: squared."""
    moe = drop_upcycle(dense, n_experts=n_experts, top_k=min(2, n_experts), r=r, seed=seed,
                       shared_indices=shared_indices)
    pair_kept, intact, pair_intact = [], [], []
    for dense_block, moe_block in zip(dense.layers, moe.layers):
        kept = []  # per matrix: [E, d_ff], True where the expert's neuron is the dense one
        for name in ("gate", "up", "down"):
            w_dense, w_experts = getattr(dense_block.ffn, name).weight, getattr(moe_block.ffn, name)
            if name == "down":  # neuron j is column j of W_down: make it row j like the others
                w_dense, w_experts = w_dense.T, w_experts.transpose(1, 2)
            kept.append((w_experts == w_dense).all(dim=-1))
        whole = kept[0] & kept[1] & kept[2]
        intact.append(whole.float().mean().item())
        for i in range(n_experts):
            for j in range(i + 1, n_experts):
                pair_kept.extend((k[i] & k[j]).float().mean().item() for k in kept)
                pair_intact.append((whole[i] & whole[j]).float().mean().item())
    keep = 1 - neurons_to_drop(r, dense.config.d_ff) / dense.config.d_ff
    expected_intact = keep if shared_indices else keep**3
    return dict(pair_kept=float(np.mean(pair_kept)), expected_pair_kept=keep**2, intact=float(np.mean(intact)),
                expected_intact=expected_intact, pair_intact=float(np.mean(pair_intact)),
                expected_pair_intact=expected_intact**2)


def overlap(opts):
    check_experts(opts.n_experts, opts.top_k)
    dense, source = dense_for_probe(opts.dense_ckpt, opts.seed)
    shared = not opts.independent_indices
    print(f"dense model: {source}; {opts.n_experts} experts; {'shared' if shared else 'independent'} index sets")
    print("r' = floor(r d_ff) / d_ff: the share of neurons actually re-initialised (whole neurons only)")
    print("| r | two experts keep the same neuron, per matrix | expected (1-r')^2 | neurons intact in all 3 matrices, "
          "per expert | expected | intact in both of two experts | expected |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in opts.r:
        o = overlap_stats(dense, r, opts.n_experts, shared, opts.seed)
        print(f"| {r:g} | {o['pair_kept']:.4f} | {o['expected_pair_kept']:.4f} | {o['intact']:.4f} | "
              f"{o['expected_intact']:.4f} | {o['pair_intact']:.4f} | {o['expected_pair_intact']:.4f} |")


# -----------------------------------------------------------------------------
# 6. Main


def parse_args(argv):
    p = data.OneLineParser(prog="analyze.py", description="The paper's analyses (r sweep, routing), the learning-rate "
                            "and seed checks of its comparison, and two measurements right after upcycling. The "
                            "classroom exercises that use them: EXERCISES.md.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{sweep,lr,seeds,routing,router-grad,overlap}")
    s = sub.add_parser("sweep", allow_abbrev=False,
                       help="Sec. 5.3: MoE runs for every r from one dense model; figure + table",
                       description="MoE runs for every r (plus r = 0.5 with independent index sets, and from scratch) "
                                   "from one dense model, then sweep_loss.png and sweep_summary.md in --out-dir. Every "
                                   "other flag goes to train.py (see python train.py --help).")
    s.add_argument("--r-values", type=data.unit_float, nargs="+", default=PAPER_RS, metavar="R",
                   help="ratios to train (default: the paper's 0 0.1 0.25 0.5 0.75 1)")
    s.add_argument("--report-only", action="store_true", help="no training: figure and table of the finished runs")
    s = sub.add_parser("lr", allow_abbrev=False,
                       help="naive, drop r=0.5 (both index-set variants) and scratch at each MoE learning rate",
                       description="From one dense model (trained once in --out-dir/dense), trains naive Upcycling, "
                                   "Drop-Upcycling r=0.5 with shared and with independent index sets, and an MoE from "
                                   "scratch at each MoE peak learning rate, in --out-dir/lr-<rate>/; then lr_loss.png "
                                   "and lr_summary.md in --out-dir. Every other flag goes to train.py.")
    s.add_argument("--lrs", type=data.positive_float, nargs="+", default=DEFAULT_LRS, metavar="LR",
                   help="MoE peak learning rates (default 5e-4 1e-3 2e-3 4e-3)")
    s.add_argument("--report-only", action="store_true", help="no training: figure and table of the finished runs")
    s = sub.add_parser("seeds", allow_abbrev=False, help="every init's gap to naive in several seeds: mean, spread",
                       description="Reads the finished runs of one --out-dir per seed (same settings but the seed) and "
                                   "tabulates each init's final loss, its gap to naive Upcycling and its crossover step "
                                   "in every seed, with their mean and spread.")
    s.add_argument("folders", nargs="+", metavar="OUT_DIR", help="one train.py --out-dir per seed")
    s.add_argument("--out", metavar="FILE", help="also write the table to FILE (markdown)")
    s = sub.add_parser("routing", allow_abbrev=False, help="Sec. 5.4: routing statistics of every MoE run in --out-dir",
                       description="Routes held-out text of each domain through every finished MoE run in --out-dir; "
                                   "writes routing_specialisation.png, routing_summary.md and routing_counts.json. "
                                   "Pass the data flags the runs were trained with (--preset, --data, --corpus-mb, "
                                   "--tokenizer or --dense-from); train.py's other flags are accepted too.")
    s.add_argument("--routing-tokens", type=data.positive_int, default=65536,
                   help="held-out tokens per domain (default 65536)")
    s.add_argument("--models", nargs="+", metavar="RUN",
                   help=f"runs in the figure (default: {' '.join(FIGURE_MODELS)})")
    s.add_argument("--all-layers", action="store_true", help="every layer in the figure, not only first, middle, last")
    s.add_argument("--report-only", action="store_true",
                   help="no routing: figure and tables again from routing_counts.json")
    for name, helptext in (("router-grad", "router gradient from the LM loss right after upcycling"),
                           ("overlap", "fraction of dense neurons two experts share right after upcycling")):
        s = sub.add_parser(name, allow_abbrev=False, help=helptext, description=helptext)
        s.add_argument("--r", type=data.unit_float, nargs="+", default=[0.0, 0.5], metavar="R",
                       help="ratios (default 0 0.5)")
        s.add_argument("--dense-ckpt", metavar="PATH", help="a dense checkpoint (file or folder, e.g. out/cpu/dense); "
                                                            "default: a fresh model of the cpu preset's shape")
        s.add_argument("--n-experts", type=data.positive_int, default=8, help="experts per layer (default 8)")
        s.add_argument("--seed", type=data.nonneg_int, default=0,
                       help="seed of the upcycling (and of the fresh model)")
        if name == "router-grad":
            s.add_argument("--top-k", type=data.positive_int, default=2, help="experts per token (default 2)")
            s.add_argument("--aux-loss-coef", type=data.nonneg_float, default=0.02,
                           help="balancing-loss weight (default 0.02)")
        else:
            s.add_argument("--independent-indices", action="store_true",
                           help="a separate S per matrix (the released code)")
            s.set_defaults(top_k=2)
    opts, rest = p.parse_known_args(argv)
    flags, see = p.flags(opts), f"python analyze.py {opts.command} --help"
    if opts.command in ("sweep", "lr", "routing"):  # the rest goes to train.py: what neither parser knows is wrong
        train_parser = train.build_parser()
        train_parser.see = see + "; python train.py --help"
        rest_unknown = train_parser.parse_known_args(rest)[1]
        refused = {o for a in train_parser._actions if a.dest in chosen_train_flags(opts.command)
                   for o in a.option_strings}  # no use suggesting those
        flags, see = flags + [f for f in train_parser.flags() if f not in refused], train_parser.see
    else:
        rest_unknown = rest
    if rest_unknown:
        raise Fail(f"{data.unrecognized(rest_unknown, flags)} (see {see})")
    opts.argv = list(argv)[1:]  # what followed the command: recorded in the tables
    return opts, rest


def main(argv=None):
    # Ctrl-C in a sweep saves a checkpoint, as in train.py
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = None
    try:
        opts, rest = parse_args(argv)
        if opts.command == "sweep":
            sweep(opts, rest)
        elif opts.command == "lr":
            lr_sweep(opts, rest)
        elif opts.command == "seeds":
            seeds(opts)
        elif opts.command == "routing":
            routing(opts, rest)
        elif opts.command == "router-grad":
            router_grad(opts)
        else:
            overlap(opts)
    except Fail as e:
        print(f"analyze.py: error: {e}", file=sys.stderr)
        distributed.leave(1)
    except KeyboardInterrupt as e:
        trains = opts is not None and opts.command in ("sweep", "lr")
        print("analyze.py: interrupted" + (" (finished runs and checkpoints are kept; rerun the same command, adding "
                                           "--resume for an unfinished run)" if trains else ""), file=sys.stderr)
        distributed.leave(ctrl_c.exit_status(e))
    except Exception:  # under torchrun: another rank failed and said why, or a bug (its traceback)
        distributed.crash()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    run_as_script(main)
