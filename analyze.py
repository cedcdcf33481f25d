"""
The paper's two analyses at small scale, and the small measurements behind the classroom exercises.

    python analyze.py sweep   --preset cpu --out-dir out/cpu   # Sec. 5.3, Fig. 4: the re-initialisation ratio r
    python analyze.py routing --preset cpu --out-dir out/cpu   # Sec. 5.4, Fig. 5: where each domain's tokens go
    python analyze.py router-grad --r 0 0.5                    # does the router learn from the LM loss at step 0?
    python analyze.py overlap --r 0.5                          # Sec. 3.2.2: two experts share (1 - r)^2 of the neurons

The classroom exercises built on these commands, with what each needs and how long it takes, are in EXERCISES.md.

sweep and routing take every train.py flag (--preset, --out-dir, --data, model and step overrides, ...) and hand
them to train.py, so one --out-dir holds one dense model, every MoE run made from it, and the analyses of them.

Read top to bottom:
  1. routing statistics: load balance and domain specialisation (plain functions of counts, tested with known numbers)
  2. sweep: r in {0, 0.1, 0.25, 0.5, 0.75, 1} from one dense model, plus r = 0.5 with independent index sets
  3. routing: held-out text of each domain through each MoE, per layer and expert
  4. router-grad and overlap: two measurements right after upcycling, no training needed
  5. main: every expected failure becomes one line on stderr and a non-zero exit
"""

import json
import math
import os
import shlex
import signal
import sys

import numpy as np
import torch
import torch.nn.functional as F

import train
from dropupcycle import ModelConfig, Transformer, drop_upcycle, load_balancing_loss
from data import Fail
import data
import distributed
import plot

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
    """(init, r, independent index sets) of every run: naive (r = 0) always, as the reference of the difference
    panel; drop for each r > 0; r = 0.5 with independent sets (the released code); scratch, for the routing."""
    runs = [("naive", None, False)]
    runs += [("drop", r, False) for r in sorted(set(r_values)) if r > 0]
    return runs + [("drop", 0.5, True), ("scratch", None, False)]


def train_argv_checked(train_argv, command):
    for flag in ("--init", "--r", "--independent-indices", "--sample"):
        if any(a == flag or a.startswith(flag + "=") for a in train_argv):
            raise Fail(f"{command} chooses {flag} itself; pass the train.py flags that all its runs share"
                       + (" (and --r-values for the ratios)" if flag == "--r" else ""))
    return train_argv


def sweep(opts, train_argv):
    train_argv = train_argv_checked(train_argv, "sweep")
    runs = sweep_runs(opts.r_values)
    args = train.parse_args(train_argv)
    took = []  # wall time of each MoE run trained here: every run has the same FLOPs, so they give the ETA
    for i, (init, r, independent) in enumerate([] if opts.report_only else runs):
        argv = list(train_argv) + ["--init", init] + (["--r", f"{r:g}"] if init == "drop" else [])
        argv += ["--independent-indices"] if independent else []
        args = train.parse_args(argv)
        print(f"\n===== sweep run {i + 1}/{len(runs)}: python train.py {shlex.join(argv)}", flush=True)
        result = os.path.join(args.out_dir, train.run_name(init, r if r is not None else 0.0, not independent),
                              "result.json")
        reused = os.path.exists(result)
        train.experiment(args)  # trains the dense model the first time; later runs (and reruns) reuse it
        if not reused:
            with open(result) as f:
                took.append(json.load(f)["wall_time"])
        if took and i + 1 < len(runs):
            left, each = len(runs) - i - 1, float(np.mean(took))
            print(f"===== sweep: {left} run{'s' * (left > 1)} left, ETA {plot.fmt_time(left * each)} ({left} x {plot.fmt_time(each)}, "
                  f"the mean time of the MoE runs trained so far)", flush=True)
    if distributed.is_main():  # under torchrun, rank 0 writes the figure and table
        sweep_report(args, runs, "python analyze.py sweep " + shlex.join(opts.argv))


def sweep_report(args, runs, command):
    """Figure (plot.sweep_figure: loss against MoE-phase tokens for every r, and minus naive) and table."""
    rows, curves = [], {}
    for init, r, independent in runs:
        name = train.run_name(init, r if r is not None else 0.0, not independent)
        folder = os.path.join(args.out_dir, name)
        if not os.path.exists(os.path.join(folder, "result.json")):
            print(f"{name}: no finished run in {folder}, left out")
            continue
        with open(os.path.join(folder, "result.json")) as f:
            rows.append((name, init, r, independent, json.load(f)))
        curves[name] = plot.val_curve(os.path.join(folder, "log.csv"))
    if "moe-naive" not in curves or not os.path.exists(os.path.join(args.out_dir, "dense", "result.json")):
        raise Fail(f"no finished dense and naive runs in {args.out_dir} "
                   f"(with --report-only: pass the training's flags)")
    with open(os.path.join(args.out_dir, "dense", "result.json")) as f:
        dense = json.load(f)

    naive_batches = next(res for name, _, _, _, res in rows if name == "moe-naive").get("final_val_batches")
    lines = ["| run | r | index sets | val loss right after upcycling | final val loss | minus naive (noise) | "
             "vs naive | wall time |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, init, r, independent, result in rows:
        gap = None if name == "moe-naive" else plot.compare_to_naive(
            curves[name], curves["moe-naive"], result.get("final_val_batches"), naive_batches)
        vs, verdict = ("", "") if gap is None else (f"{gap[0]:+.4f} (±{gap[1]:.4f})", gap[2])
        r_text = "0" if init == "naive" else "-" if init == "scratch" else f"{r:g}"
        sets = "independent" if independent else ("shared" if init == "drop" else "-")
        lines.append(f"| {name} | {r_text} | {sets} | {curves[name][2][0]:.4f} | {result['final_val_loss']:.4f} | "
                     f"{vs} | {verdict} | {plot.fmt_time(result['wall_time'])} |")
    moe = rows[0][4]
    header = (f"Re-initialisation ratio sweep (paper Sec. 5.3, Fig. 4). Validation loss in nats/token "
              f"({args.tokenizer} tokenizer) after {dense['steps']} dense steps ({dense['tokens'] / 1e6:.1f}M tokens, "
              f"final dense val loss {dense['final_val_loss']:.4f}) and {moe['steps']} MoE steps "
              f"({moe['tokens'] / 1e6:.1f}M tokens), same data order for every run; device {dense['device']}, "
              f"seed {args.seed}. Noise: two standard errors of the difference of two final losses.")
    table = f"{header}\n\nMade with: `{command}`\n\n" + "\n".join(lines) + "\n"
    table_path, figure_path = os.path.join(args.out_dir, "sweep_summary.md"), os.path.join(args.out_dir, "sweep_loss.png")
    data.atomic_write_text(table_path, table)
    print("\n" + table)
    plot.sweep_figure(figure_path, header, curves, dense["final_val_loss"], {row[0]: row[4] for row in rows})
    print(f"figure: {figure_path} | table: {table_path}")


# -----------------------------------------------------------------------------
# 3. Routing specialisation (Sec. 5.4, Figure 5, Appendix C.2)

FIGURE_MODELS = ["moe-naive", "moe-drop-r0.5", "moe-scratch"]  # the paper's Fig. 5 columns


def domain_of(key, default_corpus):
    """The domain of a corpus file: its language for the built-in corpus, its top folder under --data."""
    if default_corpus:
        language = data.language_of(key)
        return None if language == "other" else language
    parts = key.split("/")  # "data/<domain>/.../<file>"
    return parts[1] if len(parts) > 2 else None


def heldout_tokens(args, enc, max_tokens):
    """{domain: token ids} from the validation files only (the same file split train.py uses), at most
    max_tokens per domain, every file followed by <|endoftext|>."""
    try:
        files = data.list_files(args.data)
    except OSError as e:
        raise Fail(f"--data {args.data}: cannot list files ({e.strerror or e})")
    _, val_files = data.select_files(files, args.corpus_mb)
    tokens = {}
    for key, path, _, _ in val_files:
        domain = domain_of(key, args.data in data.BUILTIN_CORPORA)
        if domain is None or len(tokens.get(domain, [])) >= max_tokens:
            continue
        text = data.read_text(path)
        if text:
            tokens.setdefault(domain, []).extend(enc.encode_ordinary(text) + [enc.eot_token])
    if len(tokens) < 2:
        where = "the built-in corpus" if args.data in data.BUILTIN_CORPORA else f"--data {args.data} (one subfolder per domain)"
        found = ", ".join(sorted(tokens)) or "none"
        raise Fail(f"routing needs held-out files of two or more domains, but the validation split of {where} has "
                   f"{found}; give more files per domain (about 1 in 20 is held out)")
    return {d: t[:max_tokens] for d, t in sorted(tokens.items())}


def moe_run_folders(out_dir, fingerprint):
    """Every finished MoE run in out_dir trained on this data, in reading order: naive, drop by r, scratch."""
    found, skipped = [], []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        folder = os.path.join(out_dir, name)
        if not all(os.path.exists(os.path.join(folder, f)) for f in ("result.json", "settings.json", "ckpt.pt")):
            continue
        with open(os.path.join(folder, "settings.json")) as f:
            settings = json.load(f)
        if settings.get("phase") != "moe":
            continue
        if settings.get("data") != fingerprint:
            skipped.append(name)
            continue
        init, r = settings["init"], settings.get("r") or 0.0
        found.append(((["naive", "drop", "scratch"].index(init) if init in ("naive", "drop", "scratch") else 3, r,
                       not settings.get("shared_indices", True), name), name, folder))
    if skipped:
        print(f"skipping {', '.join(skipped)}: trained on other data than these flags give "
              f"(pass the training's --data and --corpus-mb)")
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
            experts = router_logits.topk(module.top_k, dim=-1).indices  # the choice MoE.route makes
            counts[layer] += count_assignments(experts, cfg.n_experts).cpu()
        hooks.append(block.ffn.register_forward_hook(hook))
    try:
        T = min(seq_len, len(tokens))
        windows = torch.tensor(tokens[: len(tokens) // T * T], dtype=torch.long).view(-1, T)
        for i in range(0, len(windows), batch_size):
            with train.autocast(device):
                model(windows[i : i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return counts


def routing(opts, train_argv):
    args = train.parse_args(train_argv_checked(train_argv, "routing"))
    if opts.report_only:
        return routing_replot(opts, args)
    if args.data not in data.BUILTIN_CORPORA and not os.path.isdir(args.data):
        raise Fail(f"routing needs text of two or more domains: the built-in corpus (Python vs C/C++) or "
                   f"--data FOLDER with one subfolder per domain; --data {args.data} is not a folder")
    device = train.resolve_device(args.device)
    enc = data.get_tokenizer(args.tokenizer)
    _, _, data_info = data.load_data(args.data, args.tokenizer, enc, args.out_dir, args.corpus_mb, args.seq_len)  # the fingerprint that tells which runs used this data
    runs = moe_run_folders(args.out_dir, data_info["fingerprint"])
    if not runs:
        raise Fail(f"no finished MoE run in {args.out_dir} trained on this data; train some first, e.g. "
                   f"python analyze.py sweep {shlex.join(train_argv)}")
    texts = heldout_tokens(args, enc, opts.routing_tokens)
    n = min(len(t) for t in texts.values())  # the same number of tokens from every domain ...
    n = n // min(args.seq_len, n) * min(args.seq_len, n)  # ... in whole windows of --seq-len
    domains = list(texts)
    print(f"routing {n:,} held-out tokens of each domain ({', '.join(domains)}) through {len(runs)} MoE models")

    results = {}
    for name, folder in runs:
        ckpt = train.load_checkpoint(os.path.join(folder, "ckpt.pt"))
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        model.to(device).eval()
        per_domain = [route_counts(model, texts[d][:n], model.config.max_seq_len, args.batch_size, device)
                      for d in domains]
        counts = torch.stack(per_domain, dim=1).numpy()  # [n_layer, domains, experts]
        layers = [routing_stats(c) for c in counts]
        results[name] = dict(counts=counts, layers=layers, top_k=model.config.top_k,
                             tokens=int(counts[0, 0].sum()) // model.config.top_k)  # the tokens actually routed
        del model, ckpt

    command = "python analyze.py routing " + shlex.join(opts.argv)
    routing_report(args, results, domains, n, command, opts)


def routing_replot(opts, args):
    """Figure and tables again from routing_counts.json (no models, no data): e.g. with --all-layers or --models."""
    path = os.path.join(args.out_dir, "routing_counts.json")
    if not os.path.exists(path):
        raise Fail(f"--report-only: no {path}; run python analyze.py routing without --report-only first")
    with open(path) as f:
        raw = json.load(f)
    results = {name: dict(counts=np.array(r["counts"]), layers=[routing_stats(c) for c in np.array(r["counts"])],
                          top_k=r["top_k"], tokens=r["tokens_per_domain"]) for name, r in raw.items()}
    first = next(iter(raw.values()))
    command = (f"{first.get('command', 'unknown command')}, re-plotted with "
               f"python analyze.py routing {shlex.join(opts.argv)}")
    routing_report(args, results, first["domains"], first["tokens_per_domain"], command, opts)


def routing_report(args, results, domains, n_tokens, command, opts):
    """routing_summary.md, routing_counts.json and the figure (plot.routing_figure: the paper's Fig. 5)."""
    n_layer = len(next(iter(results.values()))["layers"])
    header = (f"Routing of {n_tokens:,} held-out tokens per domain ({', '.join(domains)}; validation files only). "
              f"Load balance: entropy of the expert-usage distribution / log(n_experts), 1 = uniform. Domain "
              f"specialisation: Jensen-Shannon divergence of the domains' routing distributions, nats (0 = routed "
              f"alike, log {len(domains)} = {math.log(len(domains)):.3f} = disjoint experts). Both top-k slots "
              f"counted.")
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
    data.atomic_write_text(os.path.join(args.out_dir, "routing_summary.md"), table)
    print("\n" + table)
    made_with = command.split(", re-plotted with")[0]  # a re-plot keeps the command that routed the tokens
    raw = {name: dict(command=made_with, domains=domains, tokens_per_domain=res["tokens"], top_k=res["top_k"],
                      counts=res["counts"].tolist(), balance=[l["balance"] for l in res["layers"]],
                      js=[l["js"] for l in res["layers"]]) for name, res in results.items()}
    data.atomic_write_text(os.path.join(args.out_dir, "routing_counts.json"), json.dumps(raw, indent=1))

    models = [m for m in (opts.models or FIGURE_MODELS) if m in results] or list(results)[:3]
    layers = list(range(n_layer)) if opts.all_layers else sorted({0, n_layer // 2, n_layer - 1})
    path = os.path.join(args.out_dir, "routing_specialisation.png")
    plot.routing_figure(path, header, results, domains, models, layers)
    print(f"figure: {path} | tables: {os.path.join(args.out_dir, 'routing_summary.md')} | counts: "
          f"{os.path.join(args.out_dir, 'routing_counts.json')}")


# -----------------------------------------------------------------------------
# 4. Two measurements right after upcycling: router gradient, neuron overlap


def dense_for_probe(opts):
    """A trained dense model from --dense-ckpt (train.py's out/.../dense/ckpt.pt), else a freshly initialised
    one of the cpu preset's shape: the effects measured here follow from the construction, not the training."""
    if opts.dense_ckpt:
        path = os.path.join(opts.dense_ckpt, "ckpt.pt") if os.path.isdir(opts.dense_ckpt) else opts.dense_ckpt
        if not os.path.exists(path):  # train.py keeps the dense model in <out-dir>/dense/ckpt.pt
            folder = os.path.dirname(path)
            out_dir = (os.path.dirname(folder) if os.path.basename(folder) == "dense" else folder) or "."
            raise Fail(f"--dense-ckpt {opts.dense_ckpt}: no checkpoint there; train one with python train.py --preset "
                       f"cpu --init dense --out-dir {out_dir} (it goes to {os.path.join(out_dir, 'dense')})")
        ckpt = train.load_checkpoint(path)
        cfg = ModelConfig(**ckpt["model_config"])
        if cfg.is_moe:
            raise Fail(f"--dense-ckpt {opts.dense_ckpt}: that is an MoE checkpoint; give the dense one (out/.../dense)")
        model = Transformer(cfg)
        model.load_state_dict(ckpt["model"])
        return model, ckpt.get("tokenizer", "byte"), path
    p = train.PRESETS["cpu"]
    cfg = ModelConfig(vocab_size=257, d_model=p["d_model"], n_layer=p["n_layer"], n_head=p["n_head"],
                      n_kv_head=p["n_kv_head"], d_ff=p["d_ff"], max_seq_len=p["seq_len"])
    torch.manual_seed(opts.seed)
    return Transformer(cfg), "byte", "a freshly initialised dense model of the cpu preset's shape (no --dense-ckpt)"


def check_experts(opts):
    if opts.n_experts < 2:
        raise Fail(f"--n-experts must be at least 2, got {opts.n_experts}")
    if not 1 <= opts.top_k <= opts.n_experts:
        raise Fail(f"--top-k must be between 1 and --n-experts ({opts.n_experts}), got {opts.top_k}")


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
    check_experts(opts)
    dense, tokenizer, source = dense_for_probe(opts)
    enc = data.get_tokenizer(tokenizer)
    with open(__file__, encoding="utf-8") as f:  # any real text will do: this file is always at hand
        ids = enc.encode_ordinary(f.read())
    T = min(128, dense.config.max_seq_len)
    batch = torch.tensor(ids[: 8 * (T + 1)], dtype=torch.long).view(8, T + 1)
    print(f"dense model: {source}; {opts.n_experts} experts, top-{opts.top_k}; one batch of 8 x {T} tokens "
          f"(the text of analyze.py); gradients at step 0, before any MoE update")
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
    keep = 1 - math.floor(r * dense.config.d_ff) / dense.config.d_ff
    expected_intact = keep if shared_indices else keep**3
    return dict(pair_kept=float(np.mean(pair_kept)), expected_pair_kept=keep**2, intact=float(np.mean(intact)),
                expected_intact=expected_intact, pair_intact=float(np.mean(pair_intact)),
                expected_pair_intact=expected_intact**2)


def overlap(opts):
    check_experts(opts)
    dense, _, source = dense_for_probe(opts)
    shared = not opts.independent_indices
    print(f"dense model: {source}; {opts.n_experts} experts; {'shared' if shared else 'independent'} index sets")
    print("| r | two experts keep the same neuron, per matrix | expected (1-r)^2 | neurons intact in all 3 matrices, "
          "per expert | expected | intact in both of two experts | expected |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in opts.r:
        o = overlap_stats(dense, r, opts.n_experts, shared, opts.seed)
        print(f"| {r:g} | {o['pair_kept']:.4f} | {o['expected_pair_kept']:.4f} | {o['intact']:.4f} | "
              f"{o['expected_intact']:.4f} | {o['pair_intact']:.4f} | {o['expected_pair_intact']:.4f} |")


# -----------------------------------------------------------------------------
# 5. Main


def parse_args(argv):
    p = train.OneLineParser(prog="analyze.py", description="The paper's analyses (r sweep, routing) and two "
                            "measurements right after upcycling. The classroom exercises that use them: EXERCISES.md.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{sweep,routing,router-grad,overlap}")
    s = sub.add_parser("sweep", allow_abbrev=False,
                       help="Sec. 5.3: MoE runs for every r from one dense model; figure + table",
                       description="MoE runs for every r (plus r = 0.5 with independent index sets, and from scratch) "
                                   "from one dense model, then sweep_loss.png and sweep_summary.md in --out-dir. Every "
                                   "other flag goes to train.py (see python train.py --help).")
    s.add_argument("--r-values", type=train.unit_float, nargs="+", default=PAPER_RS, metavar="R",
                   help="ratios to train (default: the paper's 0 0.1 0.25 0.5 0.75 1)")
    s.add_argument("--report-only", action="store_true", help="no training: figure and table of the finished runs")
    s = sub.add_parser("routing", allow_abbrev=False, help="Sec. 5.4: routing statistics of every MoE run in --out-dir",
                       description="Routes held-out text of each domain through every finished MoE run in --out-dir; "
                                   "writes routing_specialisation.png, routing_summary.md and routing_counts.json. "
                                   "Pass the data flags the runs were trained with (--preset, --data, --corpus-mb, "
                                   "--tokenizer); every other flag goes to train.py.")
    s.add_argument("--routing-tokens", type=train.positive_int, default=65536,
                   help="held-out tokens per domain (default 65536)")
    s.add_argument("--models", nargs="+", metavar="RUN",
                   help=f"runs in the figure (default: {' '.join(FIGURE_MODELS)})")
    s.add_argument("--all-layers", action="store_true", help="every layer in the figure, not only first, middle, last")
    s.add_argument("--report-only", action="store_true",
                   help="no routing: figure and tables again from routing_counts.json")
    for name, helptext in (("router-grad", "router gradient from the LM loss right after upcycling"),
                           ("overlap", "fraction of dense neurons two experts share right after upcycling")):
        s = sub.add_parser(name, allow_abbrev=False, help=helptext, description=helptext)
        s.add_argument("--r", type=train.unit_float, nargs="+", default=[0.0, 0.5], metavar="R",
                       help="ratios (default 0 0.5)")
        s.add_argument("--dense-ckpt", metavar="PATH", help="a dense checkpoint (file or folder, e.g. out/cpu/dense); "
                                                            "default: a fresh model of the cpu preset's shape")
        s.add_argument("--n-experts", type=train.positive_int, default=8, help="experts per layer (default 8)")
        s.add_argument("--seed", type=train.nonneg_int, default=0,
                       help="seed of the upcycling (and of the fresh model)")
        if name == "router-grad":
            s.add_argument("--top-k", type=train.positive_int, default=2, help="experts per token (default 2)")
            s.add_argument("--aux-loss-coef", type=train.nonneg_float, default=0.02,
                           help="balancing-loss weight (default 0.02)")
        else:
            s.add_argument("--independent-indices", action="store_true",
                           help="a separate S per matrix (the released code)")
            s.set_defaults(top_k=2)
    opts, rest = p.parse_known_args(argv)
    if rest and opts.command not in ("sweep", "routing"):
        raise Fail(f"unrecognized arguments: {' '.join(rest)} (see python analyze.py {opts.command} --help)")
    opts.argv = list(argv)[1:]  # what followed the command: recorded in the tables
    return opts, rest


def main(argv=None):
    signal.signal(signal.SIGINT, train.on_signal)  # Ctrl-C in a sweep saves a checkpoint, as in train.py
    signal.signal(signal.SIGTERM, train.on_signal)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts, rest = parse_args(argv)
        if opts.command == "sweep":
            sweep(opts, rest)
        elif opts.command == "routing":
            routing(opts, rest)
        elif opts.command == "router-grad":
            router_grad(opts)
        else:
            overlap(opts)
    except Fail as e:
        print(f"analyze.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("analyze.py: interrupted (finished runs and checkpoints are kept; rerun the same command, adding "
              "--resume for an unfinished run)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
