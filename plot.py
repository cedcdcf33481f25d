"""
Every figure and summary table of the project, drawn from the runs' log.csv files (and routing counts).
train.py and analyze.py call it; it imports neither.

  1. reading a run: validation curve, with the noise of each validation number
  2. comparing with naive Upcycling: the gap, its noise, and where a curve crosses
  3. the training figure (the paper's Fig. 3, top row) and summary table, and train.py's report of an out-dir
  4. the r sweep figure (Fig. 4), the learning-rate sweep figure and the routing figure (Fig. 5)
  5. from the command line: python plot.py OUT_DIR draws an out-dir's summary and figure again from its logs
"""

import csv
import json
import os

import ctrl_c

if __name__ == "__main__":  # Ctrl-C from here on, the seconds of slow imports included: ctrl_c.py
    ctrl_c.install()

import numpy as np

from data import Fail, OneLineParser, atomic_write_text, exit_on_one_line

COLORS = {"dense": "black", "moe-scratch": "tab:gray", "moe-naive": "tab:blue", "moe-drop-r0.5": "tab:green",
          "moe-drop-r0.5-indep": "tab:orange", "moe-drop-r1": "tab:red"}
OTHER_COLORS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def color_of(name, names):
    """The fixed colour of an --init all run; the other runs of a figure (another r, ...) take the remaining
    colours in their order in names, so that they never share one (nor take naive Upcycling's blue)."""
    others = [n for n in names if n not in COLORS]
    return COLORS.get(name) or OTHER_COLORS[others.index(name) % len(OTHER_COLORS)]


def run_name(init, r, shared_indices=True):
    """An MoE run's folder: moe-scratch, moe-naive, moe-drop-r0.5; independent index sets get their own folder
    (moe-drop-r0.5-indep), so both variants of one r can sit side by side."""
    return (f"moe-drop-r{r:g}" + ("" if shared_indices else "-indep")) if init == "drop" else f"moe-{init}"


def drop_r(name):
    """The r of a Drop-Upcycling run's folder name (run_name's inverse), else None."""
    try:
        return float(name.removeprefix("moe-drop-r").removesuffix("-indep")) if name.startswith("moe-drop-r") else None
    except ValueError:  # a folder named like one, not by train.py
        return None


def label_of(name):
    """moe-drop-r0.5-indep -> 'Drop-Upcycling r=0.5, independent S'."""
    r = drop_r(name)
    if r is None:
        names = {"dense": "dense", "moe-naive": "naive Upcycling (r=0)", "moe-scratch": "MoE from scratch"}
        return names.get(name, name)
    return f"Drop-Upcycling r={r:g}" + (", independent S" if name.endswith("-indep") else "")


# -----------------------------------------------------------------------------
# 1. Reading a run


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def val_curve(csv_path):
    """steps, tokens, val loss, standard error of each val loss (over its validation batches), as arrays."""
    rows = [r for r in read_csv(csv_path) if r.get("val_loss")]
    se = [float(r["val_se"]) if r.get("val_se") else np.nan for r in rows]
    return (np.array([int(r["step"]) for r in rows]), np.array([int(r["tokens"]) for r in rows]),
            np.array([float(r["val_loss"]) for r in rows]), np.array(se))


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# -----------------------------------------------------------------------------
# 2. Comparing with naive Upcycling


def overtake_step(steps, diff):
    """First evaluation step from which diff (this init minus naive) stays below zero to the end, or None."""
    above = np.nonzero(diff >= 0)[0]
    first = 0 if len(above) == 0 else above[-1] + 1
    return int(steps[first]) if first < len(steps) else None


def compare_to_naive(curve, naive, batches=None, naive_batches=None):
    """(final gap, its noise, verdict) of a run against naive Upcycling, or None when the curves do not share
    their evaluation steps. Both runs are scored on the same validation batches, so the noise is two standard
    errors of the per-batch differences of the final losses (batches: result.json's final_val_batches; without
    them, of the two losses' own standard errors, which is larger). A gap inside it is 'level within noise'."""
    steps, _, loss, se = curve
    if len(steps) != len(naive[0]) or not np.array_equal(steps, naive[0]):
        return None
    gap = loss[-1] - naive[2][-1]
    if batches and naive_batches and len(batches) == len(naive_batches) > 1:
        diff = np.array(batches) - np.array(naive_batches)
        noise = 2 * float(diff.std(ddof=1) / np.sqrt(len(diff)))
    else:
        noise = 2 * float(np.hypot(se[-1], naive[3][-1]))
    if not np.isfinite(noise) or abs(gap) > noise:
        s = overtake_step(steps, loss - naive[2]) if gap < 0 else None
        verdict = f"below from step {s}" if s is not None else "above naive" if gap > 0 else "below at the end"
    else:
        verdict = "level within noise"
    return gap, noise, verdict


def gap_text(comparison):
    """'+0.0123 (±0.0040)' of compare_to_naive's (gap, noise, verdict). Without a standard error (one validation
    batch, --eval-batches 1, has no spread) the noise is unknown, and said so."""
    gap, noise = comparison[:2]
    return f"{gap:+.4f} (±{noise:.4f})" if np.isfinite(noise) else f"{gap:+.4f} (noise unknown)"


# -----------------------------------------------------------------------------
# 3. The training figure and summary table


def summary_table(header, curves, results):
    """Markdown: one row per run, its final loss, the gap to naive with its noise, and the crossover."""
    lines = [header, "", "| run | final val loss | minus naive (noise) | vs naive | wall time | tokens/s | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    naive = curves.get("moe-naive")
    naive_batches = results.get("moe-naive", {}).get("final_val_batches")
    for name, res in results.items():
        gap = (compare_to_naive(curves[name], naive, res.get("final_val_batches"), naive_batches)
               if naive is not None and name not in ("dense", "moe-naive") else None)
        vs, verdict = ("", "") if gap is None else (gap_text(gap), gap[2])
        mfu = f"{res['mfu']:.1%}" if res.get("mfu") else "n/a"
        lines.append(f"| {name} | {res['final_val_loss']:.4f} | {vs} | {verdict} | {fmt_time(res['wall_time'])} | "
                     f"{res['tokens_per_s'] / 1e3:,.0f}k | {mfu} |")
    return "\n".join(lines) + "\n"


def diff_to_naive_panel(ax, curves, names, colors, results=None):
    """Each run's validation loss minus naive Upcycling's against MoE-phase tokens, on a linear axis. The large
    differences right after upcycling are off the chart (the y range is set by the upcycled runs' last two thirds), so the final
    gaps and the crossover stay readable. Each final gap carries an error bar of its own noise, the one the summary
    table gives (plotted only where every run was scored on the same batches: unpaired errors measure how hard the
    batches are, not the noise of a gap)."""
    naive = curves["moe-naive"]
    batches = {n: (results or {}).get(n, {}).get("final_val_batches") for n in curves}
    paired = all(batches[n] for n in names)
    late, bars = [], 0
    for name in names:
        if name == "moe-naive" or compare_to_naive(curves[name], naive) is None:
            continue
        steps, tokens, loss, se = curves[name]
        diff = loss - naive[2]
        ax.plot(tokens / 1e6, diff, color=colors[name], label=label_of(name), marker=".", ms=3)
        if name != "moe-scratch":  # far above at this scale: its curve leaves the chart, its number is in the table
            late.extend(diff[len(diff) // 3:])
        gap, noise, verdict = compare_to_naive(curves[name], naive, batches[name], batches["moe-naive"])
        if paired:
            x = tokens[-1] / 1e6 * (1 + 0.012 * bars)  # side by side at the end, not on top of each other
            ax.errorbar(x, gap, yerr=noise, color=colors[name], capsize=3, lw=1.5,
                        label=None if bars else "final gap ± its noise (2 s.e.)")
            bars += 1
        if verdict.startswith("below from step"):
            s = int(verdict.split()[-1])
            x = tokens[list(steps).index(s)] / 1e6
            ax.axvline(x, color=colors[name], ls=":", lw=1)
    ax.axhline(0, color=COLORS["moe-naive"], lw=1, label=label_of("moe-naive"))
    if late:
        lo, hi = min(min(late), 0), max(max(late), 0)
        pad = 0.15 * (hi - lo) + 1e-3
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("MoE-phase tokens (M)")
    ax.set_ylabel("val loss minus naive Upcycling's (nats/token)")
    ax.set_title("minus naive Upcycling (below 0: better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def loss_figure(path, header, curves, dense_tokens, results=None):
    """The paper's Fig. 3 (top row) at small scale: dense then every MoE init against tokens, a zoom on the MoE
    phase, and the difference to naive Upcycling. curves: {name: val_curve(...)}, "dense" among them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in curves if n != "dense"]
    colors = {n: color_of(n, list(curves)) for n in curves}
    fig, (ax, ax_zoom, ax_diff) = plt.subplots(1, 3, figsize=(19, 5.5), gridspec_kw=dict(width_ratios=[1.2, 1, 1]))
    d_loss = curves["dense"][2]
    for a in (ax, ax_zoom):
        a.plot(curves["dense"][1] / 1e6, d_loss, color=colors["dense"], label="dense")
        for name in names:
            a.plot((dense_tokens + curves[name][1]) / 1e6, curves[name][2], color=colors[name], label=label_of(name))
        a.axvline(dense_tokens / 1e6, color="black", ls=":", lw=1)
        a.set_xlabel("training tokens (M): dense phase, then MoE phase")
        a.grid(alpha=0.3)
    ax.text(dense_tokens / 1e6, 0.02, " upcycling", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
    # y range: from the best loss up to the dense loss a tenth into its training (the first steps are off the chart)
    everything = np.concatenate([curves[n][2] for n in curves])
    lo, hi = everything.min(), d_loss[min(len(d_loss) - 1, max(1, len(d_loss) // 10))]
    ax.set_ylim(lo - 0.03 * (hi - lo), hi)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("dense, then each MoE init: validation loss")
    ax.legend(fontsize=8, loc="upper right")
    # zoom: the MoE phase, y range set by the upcycled inits after their first tenth
    upcycled = [n for n in names if n != "moe-scratch"] or names or ["dense"]
    window = [v for n in upcycled for v in curves[n][2][max(1, len(curves[n][2]) // 10):]] or list(d_loss[-3:])
    pad = 0.08 * (max(window) - min(window)) + 1e-4
    ax_zoom.set_ylim(min(window) - pad, max(window) + pad)
    moe_tokens = max((curves[n][1][-1] for n in names), default=0)
    ax_zoom.set_xlim(dense_tokens / 1e6 - 0.03 * moe_tokens / 1e6, None)
    ax_zoom.set_title("zoom on the MoE phase")
    if "moe-naive" in curves and len(names) > 1:
        diff_to_naive_panel(ax_diff, curves, names, colors, results)
    else:
        ax_diff.axis("off")
        ax_diff.text(0.5, 0.5, "run --init naive too (or --init all)\nto see the difference to naive Upcycling",
                     ha="center", va="center", transform=ax_diff.transAxes)
    fig.suptitle(header, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


DAMAGED_RUN_FILE = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError)  # what load_run raises


def load_run(folder):
    """(settings, result, validation curve) of the finished run in folder; raises one of DAMAGED_RUN_FILE when one
    of its three files is missing or damaged."""
    with open(os.path.join(folder, "settings.json")) as f:
        settings = json.load(f)
    with open(os.path.join(folder, "result.json")) as f:
        result = json.load(f)
    curve = val_curve(os.path.join(folder, "log.csv"))
    float(result["final_val_loss"]), float(result["wall_time"]), float(result["tokens_per_s"])
    settings["phase"]  # a run's settings: a mapping that says which phase it trained
    return settings, result, curve


def read_run(folder):
    """load_run, or None when the run has not finished, or (with a warning) when one of its files is damaged."""
    if not os.path.exists(os.path.join(folder, "result.json")):
        return None
    try:
        return load_run(folder)
    except DAMAGED_RUN_FILE:
        print(f"warning: {folder} has a damaged result.json, settings.json or log.csv: left out of the summary")
        return None


def run_order(name):
    """The order of runs in tables: dense, scratch, naive, then Drop-Upcycling by r (shared index sets first),
    then any other folder."""
    fixed = ["dense", "moe-scratch", "moe-naive"]
    if name in fixed:
        return fixed.index(name), 0.0, name
    r = drop_r(name)
    return (len(fixed), r, name) if r is not None else (len(fixed) + 1, 0.0, name)


def finished_run_names(out_dir):
    """The run folders in out_dir holding a result.json, in run_order."""
    present = [n for n in os.listdir(out_dir) if os.path.exists(os.path.join(out_dir, n, "result.json"))]
    return sorted(present, key=run_order)


def finished_runs(out_dir, dense_settings, moe_settings):
    """{name: (result, curve)} of the finished runs in out_dir that are comparable: the dense run of
    dense_settings, and MoE runs whose settings equal moe_settings but for the init."""
    identity = lambda s: {k: v for k, v in s.items() if k not in ("init", "r", "dense", "shared_indices")}
    found = {}
    for name in finished_run_names(out_dir):
        folder = os.path.join(out_dir, name)
        run = read_run(folder)
        if run is None:
            continue
        settings, result, curve = run
        wanted = dense_settings if name == "dense" else moe_settings
        if wanted is None:
            continue  # a command that trains no MoE compares none
        ours, theirs = identity(json.loads(json.dumps(wanted))), identity(settings)
        if ours != theirs:  # not comparable
            differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            print(f"note: {folder} was trained with other settings ({', '.join(differ)}): left out of the summary")
            continue
        if settings.get("dense") not in (None, json.loads(json.dumps(dense_settings))):
            print(f"warning: {folder} was upcycled from another dense model than {out_dir}/dense: left out")
            continue
        found[name] = (result, curve)
    return found


def report(out_dir, dense_settings, moe_settings, fingerprint):
    """summary.md and loss_curves.png of the dense run and every comparable finished MoE run in out_dir, whichever
    command trained it; False, with nothing written, where the dense run that every run is compared with is not
    there or damaged."""
    runs = finished_runs(out_dir, dense_settings, moe_settings)
    if "dense" not in runs:
        return False
    results, curves = {n: r for n, (r, _) in runs.items()}, {n: c for n, (_, c) in runs.items()}
    dense, s = results["dense"], dense_settings
    start = (f"the pretrained {s['source']['path']}" if s.get("source") else
             f"{dense['steps']} dense steps ({dense['tokens'] / 1e6:.1f}M tokens)")
    header = (f"Validation loss (cross-entropy, nats/token, {s['tokenizer']} tokenizer, corpus fingerprint "
              f"{fingerprint[:8]}) after {start}")
    moe = [res for name, res in results.items() if name != "dense"]
    if moe:
        m = moe_settings["model"]
        header += (f" and {moe[0]['steps']} MoE steps ({moe[0]['tokens'] / 1e6:.1f}M tokens; {m['n_experts']} experts, "
                   f"top-{m['top_k']}, balancing loss weight {m['aux_loss_coef']:g})")
    header += (f"; device {dense['device']}, seed {s['seed']}. Noise: two standard errors of the per-batch differences "
               f"of the final losses over the {s['eval_batches']} validation batches (the same batches for every run).")
    table = summary_table(header, curves, results)
    summary_path, figure_path = os.path.join(out_dir, "summary.md"), os.path.join(out_dir, "loss_curves.png")
    atomic_write_text(summary_path, table)
    print("\n" + table)
    try:
        loss_figure(figure_path, header, curves, dense["tokens"], results)
    except OSError as e:
        raise Fail(f"could not write {figure_path} ({e.strerror or e})")
    print(f"figure: {figure_path} | summary: {summary_path} | CSVs: {out_dir}/*/log.csv")
    return True


# -----------------------------------------------------------------------------
# 4. The r sweep (Fig. 4), the learning-rate sweep and routing (Fig. 5)


def sweep_figure(path, header, curves, dense_final, results=None):
    """Loss against MoE-phase tokens for every r (the paper's Fig. 4, left), and each run minus naive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(13, 5))
    names = [n for n in curves if n != "moe-scratch"]  # far above every upcycled run at this scale: in the table
    colors = {}
    for name in names:
        r = 0.0 if name == "moe-naive" else drop_r(name)
        colors[name] = "black" if name == "moe-naive" else plt.cm.viridis(0.9 * r)
    late = []
    for name in names:
        _, tokens, loss, _ = curves[name]
        ax.plot(tokens / 1e6, loss, color=colors[name], ls="--" if name.endswith("-indep") else "-", label=label_of(name))
        late.extend(loss[1:] if len(loss) > 1 else loss)
    ax.axhline(dense_final, color="gray", ls=":", lw=1, label="dense model at upcycling")
    if late:  # high-r runs start far above (their step-0 loss is in the table)
        lo, hi = min(late), max(np.percentile(late, 90), dense_final)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
    ax.set_xlabel("MoE-phase tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss against tokens for each r (paper Fig. 4, left)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    diff_to_naive_panel(ax_diff, curves, names, colors, results)
    for line in ax_diff.get_lines():
        if line.get_label().endswith("independent S"):
            line.set_linestyle("--")
    fig.suptitle(header, fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def lr_figure(path, header, losses, dense_final):
    """Final validation loss against the MoE peak learning rate (log x), one line per init, its best rate
    starred. losses: {run name: {lr: final val loss}}. The y range is set by the upcycled inits: from scratch is
    far above them at this scale, and its line leaves the chart when it is (its numbers are in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    names = list(losses)
    upcycled = [v for n in names if n != "moe-scratch" for v in losses[n].values()] or [dense_final]
    lo, hi = min(upcycled), max(max(upcycled), dense_final)
    pad = 0.1 * (hi - lo) + 1e-3
    for name in names:
        lrs = sorted(losses[name])
        values = [losses[name][lr] for lr in lrs]
        best = min(lrs, key=losses[name].get)
        off = name == "moe-scratch" and min(values) > hi + pad
        ax.plot(lrs, values, color=color_of(name, names), ls="--" if name.endswith("-indep") else "-", marker="o",
                label=label_of(name) + (" (above the chart)" if off else ""))
        ax.plot([best], [losses[name][best]], color=color_of(name, names), marker="*", ms=16, ls="none")
    ax.axhline(dense_final, color="gray", ls=":", lw=1, label="dense model at upcycling")
    ax.plot([], [], color="black", marker="*", ms=12, ls="none", label="best rate of each init")
    ax.set_xscale("log")
    all_lrs = sorted({lr for v in losses.values() for lr in v})
    ax.set_xticks(all_lrs, [f"{lr:g}" for lr in all_lrs])
    ax.minorticks_off()
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("MoE peak learning rate (log scale)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("final loss against the MoE learning rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(header, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def routing_figure(path, header, results, domains, models, layers):
    """Like the paper's Fig. 5: one column per model, one row per layer; a bar group per expert, a bar per
    domain, height = share of that domain's expert assignments that went to that expert (sums to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(layers), len(models), figsize=(4.2 * len(models), 2.4 * len(layers) + 0.8),
                             squeeze=False, sharey=True)
    colors = plt.cm.tab10(np.arange(len(domains)))
    width = 0.8 / len(domains)
    for col, name in enumerate(models):
        res = results[name]
        n_experts = res["counts"].shape[2]
        for row, layer in enumerate(layers):
            ax, stats = axes[row, col], res["layers"][layer]
            for d, domain in enumerate(domains):
                ax.bar(np.arange(n_experts) + (d - (len(domains) - 1) / 2) * width, stats["dists"][d], width,
                       color=colors[d], label=domain)
            ax.axhline(1 / n_experts, color="black", ls=":", lw=1, label="uniform")
            ax.set_xticks(np.arange(n_experts))
            ax.set_title(f"{label_of(name)}, layer {layer}\nbalance {stats['balance']:.3f} | JS {stats['js']:.3f}",
                         fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("share of assignments", fontsize=8)
            if row == len(layers) - 1:
                ax.set_xlabel("expert", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)  # below the plots: hides no bar
    fig.suptitle(header, fontsize=7, wrap=True)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1 - 0.45 / height))
    fig.savefig(path, dpi=130)
    plt.close(fig)



# -----------------------------------------------------------------------------
# 5. From the command line: an out-dir's summary and figure again, from its logs alone


def report_from_logs(out_dir):
    """report() of the runs in out_dir with their settings read from their settings.json, not from train.py's flags:
    for runs trained apart (in several folders, or on several machines) and copied into one folder afterwards."""
    def settings_of(name):
        with open(os.path.join(out_dir, name, "settings.json")) as f:
            return json.load(f)

    present = finished_run_names(out_dir)
    moe = [n for n in present if n.startswith("moe-")]
    if "dense" not in present or not moe:
        raise Fail(f"{out_dir}: no finished dense run and MoE run to report (folders dense/ and moe-*/ with result.json)")
    name = "dense"
    try:
        dense_settings = settings_of(name)
        fingerprint = dense_settings["data"]
        name = "moe-naive" if "moe-naive" in moe else moe[0]  # the MoE settings the others are compared with
        moe_settings = settings_of(name)
        [moe_settings["model"][key] for key in ("n_experts", "top_k", "aux_loss_coef")]  # for the summary's header
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Fail(f"{os.path.join(out_dir, name, 'settings.json')} is unreadable or not a train.py run's ({e!r})")
    if not report(out_dir, dense_settings, moe_settings, fingerprint):
        stale = " (the summary.md there is from before)" if os.path.exists(os.path.join(out_dir, "summary.md")) else ""
        raise Fail(f"no summary or figure written: every run is compared with the dense run in {out_dir}/dense{stale}")


def main(argv=None):
    p = OneLineParser(prog="plot.py", description="An out-dir's summary.md and loss_curves.png again, from its runs' "
                                                 "logs and settings (runs trained apart can be copied into one folder).")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a train.py --out-dir")
    out_dir = p.parse_args(argv).out_dir
    if not os.path.isdir(out_dir):
        raise Fail(f"{out_dir}: not a folder")
    report_from_logs(out_dir)


if __name__ == "__main__":
    exit_on_one_line("plot.py", main)
