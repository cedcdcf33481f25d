"""
Drop-Upcycling, step 3: train a dense model, turn it into an MoE, keep training, and compare the inits.

    python train.py                        # the full comparison (--init all) with this machine's preset
    python train.py --init drop --r 0.5    # dense (trained once, then reused), drop-upcycle, train the MoE
    python train.py --sample out/moe-drop-r0.5 --prompt "def "   # print samples from a checkpoint

Read top to bottom:
  1. presets and command line
  2. one training run: optimizer, schedule, the loop ("once in a while: evaluate, log, save"), checkpoints
  3. the experiment: dense once, then every requested MoE init from the same dense weights and data order
  4. sampling and main: every expected failure becomes one line on stderr and a non-zero exit
The data (corpus, tokenizer, token cache, batches) is data.py's job, the figure and summary plot.py's (the runs'
names too: its labels and colours follow them), a run's folder (settings, checkpoints, log, lock, Ctrl-C)
runs.py's, and the device, precision, MFU and memory fit gpus.py's.
"""

import argparse
import gc
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, replace

import ctrl_c

if __name__ == "__main__":  # Ctrl-C from here on, the seconds of slow imports included: ctrl_c.py
    ctrl_c.install()

import numpy as np
import torch

import distributed
import plot
from data import (TOKENIZER_HELP, TOKENIZERS, Fail, HFTokenizer, OneLineParser, atomic_write_text, check_data_exists,
                  corpus_to_device, get_batch, get_tokenizer, load_data, make_dirs, nonneg_float, nonneg_int,
                  positive_float, positive_int, unit_float)
from dropupcycle import ModelConfig, Transformer, compile_model, drop_upcycle, flops_per_token, neurons_to_drop, upcycled_config
from gpus import amp_dtype, autocast, compute_description, gpu_peak_flops, micro_split, oom_message, resolve_device
from runs import (CSV_FIELDS, LOCK, STOP, Run, load_checkpoint, load_model, lock_out_dir, on_signal,
                  restore, run_as_script, save_checkpoint, tokenizer_dir_of)

# -----------------------------------------------------------------------------
# 1. Presets and command line

# Every value can be overridden by the flag of the same name (underscores become dashes).
PRESETS = {
    # 2-core laptop CPU: the whole --init all in about 5 minutes (figures/cpu_summary.md), on the standard library
    # (the same text on every machine with the same Python version). Shows the shape of the experiment: scratch far
    # behind, naive starting lowest, drop starting higher and learning faster; far too short for a crossover.
    "cpu": dict(
        d_model=128, n_layer=2, n_head=4, n_kv_head=4, d_ff=512, n_experts=8, top_k=2, seq_len=128,
        batch_size=16, grad_accum=1,
        dense_steps=400, dense_lr=3e-3, dense_warmup=40,
        moe_steps=240, moe_lr=2e-3, moe_warmup=20,
        eval_interval=40, eval_batches=8, log_interval=20, ckpt_interval=200,
        data=":stdlib", corpus_mb=8.0, compile=False,
    ),
    # One GPU: a small model (4.3M dense params; MoE 26M, 7.5M active) at 65k tokens a step sees many tokens per
    # parameter: the dense model 131M (30 per parameter: trained long, like the paper's dense models), each MoE init
    # 131M, enough for drop r=0.5 to overtake naive Upcycling. The learning rates keep the paper's ratios (Appendix
    # A.4): MoE peak 2/3 of the dense peak and about 7x the dense model's final learning rate.
    "gpu": dict(
        d_model=256, n_layer=4, n_head=4, n_kv_head=4, d_ff=1024, n_experts=8, top_k=2, seq_len=512,
        batch_size=128, grad_accum=1,
        dense_steps=2000, dense_lr=3e-3, dense_warmup=100,
        moe_steps=2000, moe_lr=2e-3, moe_warmup=100,
        eval_interval=100, eval_batches=10, log_interval=50, ckpt_interval=1000,
        data=":python", corpus_mb=0.0, compile=True,
    ),
}
# The paper's recipe (Appendix A.4), the same for every preset
BETAS, ADAM_EPS, MIN_LR_RATIO = (0.9, 0.95), 1e-8, 0.1
MOE_INITS = ["scratch", "naive", "drop"]
# --init all, in this order: (init, r, shared index sets). Drop r = 0.5 twice: with one index set S for all three
# matrices (the paper's text) and with one per matrix (the authors' released code, which made the paper's numbers).
ALL_RUNS = [("scratch", None, True), ("naive", 0.0, True), ("drop", 0.5, True), ("drop", 0.5, False), ("drop", 1.0, True)]


def build_parser():
    p = OneLineParser(
        description="Dense pretraining, then (Drop-)Upcycling to an MoE and continued training; compares MoE inits.",
        epilog="With no arguments: the full comparison (--init all) with the preset for this machine.",
    )
    p.add_argument("--init", choices=["all", "dense", *MOE_INITS], default=None,
                   help="which run: all (default) = dense, then scratch, naive, drop r=0.5 (both index-set variants), drop r=1.0")
    # --reinit-ratio for torchrun, which takes --r for an abbreviation of its own --rdzv-*, --role, ... flags
    p.add_argument("--r", "--reinit-ratio", dest="r", type=unit_float, default=None,
                   help="re-initialisation ratio for --init drop (default 0.5)")
    p.add_argument("--independent-indices", action="store_true",
                   help="with --init drop: a separate neuron set S for W_gate, W_up and W_down (the authors' released "
                        "code) instead of one S shared by all three (the paper's text, the default)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="size of the experiment (default: gpu with CUDA, else cpu)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--out-dir", default="out", help="folder for token cache, checkpoints, CSVs, figure and summary")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds the dense init, the data order and the upcycling")
    p.add_argument("--data", default=None, help=":stdlib (cpu preset), :python (gpu preset: stdlib + installed packages), "
                                                "a text file, a folder of text files, or a uint16 token file (.bin)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="byte", help=TOKENIZER_HELP)
    p.add_argument("--corpus-mb", type=nonneg_float, default=None, help="cap the text corpus at this many MB, half per language (0: no cap)")
    p.add_argument("--dense-from", metavar="HF_DIR", help="skip the dense phase: upcycle this pretrained Hugging Face Llama "
                                                         "(folder or hub id) and train with its own tokenizer")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer state "
                                                       "over the processes (FSDP2) instead of copying the model (DDP)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (preset default: on for gpu)")
    g = p.add_argument_group("model (override the preset)")
    g.add_argument("--d-model", type=positive_int, help="residual width")
    g.add_argument("--n-layer", type=positive_int, help="number of transformer blocks")
    g.add_argument("--n-head", type=positive_int, help="attention heads")
    g.add_argument("--n-kv-head", type=positive_int, help="key/value heads (fewer than --n-head: grouped-query attention)")
    g.add_argument("--d-ff", type=positive_int, help="FFN intermediate size (of the dense FFN and of each expert)")
    g.add_argument("--n-experts", type=positive_int, help="experts per MoE layer")
    g.add_argument("--top-k", type=positive_int, help="experts per token")
    g.add_argument("--seq-len", type=positive_int, help="tokens per training sequence")
    g = p.add_argument_group("training (override the preset)")
    g.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch (under torchrun: of all processes together)")
    g.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step")
    g.add_argument("--dense-steps", type=positive_int, help="optimizer steps of the dense phase")
    g.add_argument("--dense-lr", type=positive_float, help="peak learning rate of the dense phase")
    g.add_argument("--dense-warmup", type=nonneg_int, help="linear warmup steps of the dense phase")
    g.add_argument("--moe-steps", type=positive_int, help="optimizer steps of the MoE phase (same for every init)")
    g.add_argument("--moe-lr", type=positive_float, help="peak learning rate of the MoE phase")
    g.add_argument("--moe-warmup", type=nonneg_int, help="linear warmup steps of the MoE phase")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.1, help="AdamW weight decay on weight matrices (not norms)")
    g.add_argument("--grad-clip", type=positive_float, default=1.0, help="clip the global gradient norm to this")
    g.add_argument("--aux-loss-coef", type=nonneg_float, default=0.02, help="weight of the MoE balancing loss")
    g.add_argument("--eval-interval", type=positive_int, help="steps between validation losses")
    g.add_argument("--eval-batches", type=positive_int, help="micro-batches per validation loss")
    g.add_argument("--log-interval", type=positive_int, help="steps between progress lines and train-loss rows")
    g.add_argument("--ckpt-interval", type=positive_int, help="steps between checkpoints")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample", metavar="CKPT", help="print samples from a checkpoint (file or run folder) and exit")
    g.add_argument("--prompt", default="def ", help="text the samples start from")
    g.add_argument("--num-samples", type=positive_int, default=2, help="how many samples")
    g.add_argument("--sample-tokens", type=positive_int, default=200, help="tokens per sample")
    g.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature")
    return p


SAMPLING_FLAGS = ("prompt", "num_samples", "sample_tokens", "temperature")  # what --sample uses besides:
SHARED_FLAGS = ("device", "seed")  # what sampling and training both use


def given_flags(argv):
    """{dest: flag} of the flags argv sets, in argv's order, whatever their values: parsed as parse_args parses
    them (an abbreviation or --flag=value counts too), with no defaults. flag is spelt as in argv (--r or
    --reinit-ratio), or in full where argv abbreviates it."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    words = {word.split("=", 1)[0] for word in (sys.argv[1:] if argv is None else argv) if word.startswith("--")}
    names = {a.dest: next((o for o in a.option_strings if any(o.startswith(w) for w in words)), a.dest)
             for a in parser._actions}
    return {dest: names[dest] for dest in vars(parser.parse_args(argv))}


def check_sampling_flags(argv, sample):
    """--sample reads its model's settings from the checkpoint, and a training run draws no samples: a flag of
    the other kind in argv would be ignored without a word, so it is refused."""
    if sample == "":
        raise Fail("--sample needs a checkpoint file or a run folder")
    for dest, flag in given_flags(argv).items():
        if dest == "sample" or dest in SHARED_FLAGS:
            continue
        if sample is not None and dest not in SAMPLING_FLAGS:
            allowed = ", ".join("--" + d.replace("_", "-") for d in SAMPLING_FLAGS + SHARED_FLAGS)
            raise Fail(f"{flag} has no effect with --sample, which takes only {allowed} (the model and its settings "
                       f"come from the checkpoint)")
        if sample is None and dest in SAMPLING_FLAGS:
            raise Fail(f"{flag} applies to --sample only")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_sampling_flags(argv, args.sample)
    if args.preset is None:
        args.preset = "gpu" if resolve_device(args.device).type == "cuda" else "cpu"
    for key, value in PRESETS[args.preset].items():  # fill every unset value from the preset
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.r is not None and args.init != "drop":
        raise Fail(f"--r applies to --init drop only (--init {args.init or 'all'} fixes its own r)")
    if args.independent_indices and args.init != "drop":
        raise Fail(f"--independent-indices applies to --init drop only (got --init {args.init or 'all'})")
    if args.init == "drop" and args.r is None:
        args.r = 0.5
    check_data_exists(args.data)  # before any folder is made
    for phase in ("dense", "moe"):
        steps, warmup = getattr(args, f"{phase}_steps"), getattr(args, f"{phase}_warmup")
        if warmup >= steps and not (phase == "dense" and args.dense_from):
            print(f"note: --{phase}-warmup {warmup} >= --{phase}-steps {steps}: the learning rate never decays")
    return args


# -----------------------------------------------------------------------------
# 2. One training run

def lr_at(step, max_steps, peak, warmup):
    """Linear warmup to peak, then cosine decay to MIN_LR_RATIO * peak at max_steps (Appendix A.4)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model, lr, weight_decay, device):
    # decay the weight matrices (embeddings, projections, experts, router), not the norms' gains
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=ADAM_EPS, fused=device.type == "cuda")


def cross_entropy_part(model, loss):
    """The language-modelling part of a training loss (detached): an MoE's loss includes its weighted balancing
    term, which is logged separately, so that dense and every MoE are comparable."""
    cfg = model.config
    # a new tensor either way: under CUDA graphs (compile_mode) the model's next call writes over its outputs
    return loss.detach() - cfg.aux_loss_coef * model.aux_loss if cfg.is_moe else loss.detach().clone()


def begin_step(train_model):
    """Tells torch.compile's CUDA graphs (compile_mode) that a new forward begins, so that its replay may reuse the
    memory of the last one's outputs and activations (otherwise an evaluation's forwards, which have no backward,
    would each be recorded as a graph of its own). No effect on eager models and other modes."""
    if hasattr(train_model, "_orig_mod"):
        torch.compiler.cudagraph_mark_step_begin()


def evaluate(model, train_model, val_batches, device, split=1):
    """(mean, standard error, per-batch losses) of the next-token cross-entropy over fixed held-out batches: the
    language-modelling loss alone, without the balancing term. Every run is scored on the same batches, so the
    noise of a difference between two runs is that of the per-batch differences (plot.compare_to_naive); the
    standard error here is that of one run's number.

    A compiled model is run as in a training step, gradients on and no backward: torch.compile then needs no
    second, inference graph, whose compiling took 7-8 s per model on an H200 (figures/compile_trials_h200.json),
    more than all of a run's evaluations take. So each batch goes in the step's `split` pieces (the same graph,
    and no more memory than a step), and each piece's saved activations are freed before the next forward."""
    compiled = hasattr(train_model, "_orig_mod")
    losses = []
    with torch.set_grad_enabled(compiled), distributed.grad_sync(train_model, False):  # (DDP: no backward comes)
        for x, y in val_batches:
            pieces = []
            for x_piece, y_piece in zip(x.chunk(split), y.chunk(split)):
                begin_step(train_model)
                with autocast(device):
                    pieces.append(cross_entropy_part(model, train_model(x_piece, y_piece)[1]))
            losses.append(mean_of(pieces))
    losses = distributed.mean(torch.stack(losses).double().cpu())  # each rank scored its share of every batch
    se = losses.std().item() / math.sqrt(len(losses)) if len(losses) > 1 else float("nan")
    return losses.mean().item(), se, losses.tolist()


def train_step(model, train_model, optimizer, scaler, s, step, train_tokens, device, split):
    """One optimizer step at `step`: its learning rate, its grad_accum micro-batches (each cut into `split` pieces),
    clipping, the update. Returns (lr, cross-entropy, balancing loss), the losses still on the device (no sync)."""
    lr = lr_at(step, s["steps"], s["lr"], s["warmup"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    rng = np.random.default_rng([s["seed"], {"dense": 0, "moe": 1}[s["phase"]], step])  # data of a step: (seed, phase, step)
    ce_parts, aux_parts = [], []  # each piece's losses, left on the device
    pieces = s["grad_accum"] * split  # equal pieces: the mean of their losses is the step's loss
    for micro in range(s["grad_accum"]):
        x, y = get_batch(train_tokens, s["batch_size"], s["seq_len"], rng, device, distributed.rows())
        for piece, (x_piece, y_piece) in enumerate(zip(x.chunk(split), y.chunk(split))):
            last = micro == s["grad_accum"] - 1 and piece == split - 1
            begin_step(train_model)
            with distributed.grad_sync(train_model, last):  # all-reduce once per step
                with autocast(device):
                    _, loss = train_model(x_piece, y_piece)
                scaler.scale(loss / pieces if pieces > 1 else loss).backward()
            # log the cross-entropy alone (comparable with dense), the balancing loss separately
            ce_parts.append(cross_entropy_part(model, loss))
            if model.config.is_moe:
                aux_parts.append(model.aux_loss.clone())  # (a copy, as in cross_entropy_part)
    scaler.unscale_(optimizer)  # clip the true gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
    scaler.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return lr, mean_of(ce_parts), mean_of(aux_parts) if aux_parts else 0.0


def mean_of(losses):
    """The mean of a step's piece losses; with one piece, no arithmetic: the training loop of a small model waits
    for the host, and each extra operation is a launch (tens of microseconds on an H200 host)."""
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def train_run(run, model, train_model, train_tokens, val_batches, device, ckpt_interval, ckpt=None, later_flops=0.0,
              split=1):
    """Train model from its current weights (or from ckpt, an unfinished checkpoint) for the run's steps.

    model is the module, train_model the same module or its torch.compile wrapper. Writes log.csv, checkpoints
    and result.json into run.dir and returns the result dict. A resumed run writes what an uninterrupted one would.
    later_flops: the training FLOPs of the runs this command trains after this one, for the overall ETA.
    split: pieces each micro-batch is cut into to fit the GPU's memory (micro_split); the step's data stays the same.
    """
    s = run.settings
    cfg = ModelConfig(**s["model"])
    tokens_per_step = s["batch_size"] * s["seq_len"] * s["grad_accum"]
    distributed.reshard(model)  # (training_module's check ran a forward: under FSDP2 the optimizer needs the shards)
    optimizer = make_optimizer(model, s["lr"], s["weight_decay"], device)
    # fp16 autocast: the loss is scaled up before backward so that small gradients survive fp16, unscaled before
    # clipping; a step whose gradients overflowed is skipped and the scale lowered. A no-op in bf16 and fp32.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    start_step, elapsed, pending = 0, 0.0, []  # pending: (step, ce, aux) since the last log row
    if ckpt is not None:
        start_step, elapsed, pending = restore(ckpt, model, optimizer, scaler, device)
        print(f"[{run.name}] resuming at step {start_step}/{s['steps']}")
    csv_file = run.open_log(start_step if ckpt is not None else None)

    flops = flops_per_token(cfg, s["seq_len"])
    peak = gpu_peak_flops(device, amp_dtype(device))
    peak = peak and peak * distributed.world()  # tokens/s count every rank
    t_start = time.time()
    last_saved = start_step if ckpt is not None else None

    def checkpoint(step, finished=False):
        nonlocal last_saved
        # weights are written only when seen to give a finite loss: an update can turn them to NaN after the
        # last loss that was checked, and such a checkpoint would fail again when resumed or sampled
        if not finished:
            check = evaluate(model, train_model, val_batches[:1], device, split)[0]
            if not math.isfinite(check):
                raise Fail(f"[{run.name}] the weights after step {step} give a validation loss of {check}: stopping "
                           f"without saving them; {kept()}. Try a lower learning rate (--{s['phase']}-lr {s['lr'] / 3:.2g}) in a fresh --out-dir")
        model_sd, optimizer_sd = distributed.full_state(model, None if finished else optimizer)  # collective
        state = dict(model=model_sd, settings=s, step=step, finished=finished, model_config=asdict(cfg),
                     tokenizer=s["tokenizer"], tokenizer_dir=run.tokenizer_dir,
                     elapsed=elapsed + time.time() - t_start, pending=pending,
                     rng=dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
        if not finished:  # a finished run is only ever reused or sampled: no optimizer state needed (half the size)
            state["optimizer"], state["scaler"] = optimizer_sd, scaler.state_dict()
        if distributed.is_main():
            save_checkpoint(state, run.ckpt_path)
        distributed.barrier()  # no rank runs on, or exits on a signal, while rank 0 writes: torchrun would kill it
        last_saved = step

    def kept():
        return (f"the last good checkpoint ({run.ckpt_path}, step {last_saved}) is kept" if last_saved is not None
                else "no checkpoint had been written yet")

    def log_row(step, **values):
        row = dict(step=step, tokens=step * tokens_per_step, time=round(elapsed + time.time() - t_start, 3), **values)
        try:
            csv_file.write(",".join(str(row.get(k, "")) for k in CSV_FIELDS) + "\n")
            csv_file.flush()
        except OSError as e:
            raise Fail(f"could not write {run.csv_path} ({e.strerror or e}); --resume continues from the last checkpoint")

    result_val = None
    if start_step == 0:
        result_val, se, val_batches_losses = evaluate(model, train_model, val_batches, device, split)  # the starting weights (an MoE's: the upcycling point)
        log_row(0, val_loss=repr(result_val), val_se=repr(se))
        if s["steps"]:
            print(f"[{run.name}] step 0/{s['steps']} | val {result_val:.4f} ± {se:.4f}")
    t_interval, steady_tokens, steady_time, first_interval = time.time(), 0, 0.0, True
    STOP["training"] = True
    # Python's automatic garbage collection would now and then stop the host for a full sweep of every object
    # (compiled graphs hold many) while the GPU runs dry; instead the young objects are collected at each log row,
    # all of them at each checkpoint
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for step in range(start_step, s["steps"]):
            lr, ce, aux = train_step(model, train_model, optimizer, scaler, s, step, train_tokens, device, split)
            done = step + 1
            pending.append((done, ce, aux))
            if distributed.world() > 1:  # a signal on any rank stops every rank after this step
                STOP["signal"] = distributed.agree_signal(STOP["received"])

            # once in a while: read the losses back (one device sync), log, evaluate, save
            is_log = done % s["log_interval"] == 0 or done % s["eval_interval"] == 0 or done == s["steps"]
            is_ckpt = (done % ckpt_interval == 0 or STOP["signal"] is not None) and done < s["steps"]
            if not (is_log or is_ckpt):
                continue
            if distributed.world() > 1:  # every rank logs (and checks) the mean over ranks
                means = distributed.mean([[float(c), float(a)] for _, c, a in pending]).tolist()
                pending = [(st, c, a) for (st, _, _), (c, a) in zip(pending, means)]
            pending = [(st, float(c), float(a)) for st, c, a in pending]
            gc.collect(1)  # the young objects only: cheap
            bad = [(st, c) for st, c, _ in pending if not math.isfinite(c)]
            if bad:
                raise Fail(f"[{run.name}] loss became {bad[0][1]} at step {bad[0][0]}: stopping; {kept()}. Try a lower "
                           f"learning rate (--{s['phase']}-lr {s['lr'] / 3:.2g}) in a fresh --out-dir")
            if is_log:
                train_loss = sum(c for _, c, _ in pending) / len(pending)
                aux_mean = sum(a for _, _, a in pending) / len(pending) if cfg.is_moe else None
                interval_time, interval_tokens = time.time() - t_interval, len(pending) * tokens_per_step
                if not first_interval:  # the first interval of a process includes warm-up (and compilation)
                    steady_tokens, steady_time = steady_tokens + interval_tokens, steady_time + interval_time
                first_interval = False
                tok_s = interval_tokens / interval_time
                mfu = f" | MFU {flops * tok_s / peak:.1%}" if peak else ""
                sec_per_step = (steady_time / steady_tokens * tokens_per_step if steady_tokens
                                else interval_time / len(pending))
                eta = sec_per_step * (s["steps"] - done)
                eta_all = (f" (all runs {plot.fmt_time(eta + later_flops / flops * sec_per_step / tokens_per_step)})"
                           if later_flops else "")
                aux_text = f" | aux {aux_mean:.3f}" if aux_mean is not None else ""
                print(f"[{run.name}] step {done}/{s['steps']} | loss {train_loss:.4f}{aux_text} | lr {lr:.2e} | "
                      f"{tok_s / 1e3:,.1f}k tok/s{mfu} | ETA {plot.fmt_time(eta)}{eta_all}", flush=True)
                val = dict(val_loss="", val_se="")
                if done % s["eval_interval"] == 0 or done == s["steps"]:
                    result_val, se, val_batches_losses = evaluate(model, train_model, val_batches, device, split)
                    if not math.isfinite(result_val):
                        raise Fail(f"[{run.name}] validation loss became {result_val} at step {done}: stopping; {kept()}")
                    val = dict(val_loss=repr(result_val), val_se=repr(se))
                    print(f"[{run.name}] step {done}/{s['steps']} | val {result_val:.4f} ± {se:.4f}", flush=True)
                log_row(done, train_loss=repr(train_loss), aux_loss=repr(aux_mean) if aux_mean is not None else "",
                        lr=repr(lr), **val)
                pending = []
                t_interval = time.time()  # evaluation time is not training time
            if is_ckpt or (STOP["signal"] is not None and done < s["steps"]):  # a signal may have come meanwhile
                checkpoint(done)
                gc.collect()  # everything, also what outlived the young generation (a full sweep is slow: rarely)
                if is_log:
                    t_interval = time.time()  # nor is saving (nor the sweep)
            if STOP["signal"] is not None and done < s["steps"]:
                csv_file.close()
                print(f"[{run.name}] stopped at step {done}/{s['steps']}; checkpoint saved to {run.ckpt_path}. "
                      f"Continue with the same command plus --resume", flush=True)
                raise SystemExit(128 + STOP["signal"])
    finally:
        STOP["training"] = False
        if gc_was_enabled:
            gc.enable()
    csv_file.close()
    wall = elapsed + time.time() - t_start
    tok_s = steady_tokens / steady_time if steady_time else s["steps"] * tokens_per_step / max(wall, 1e-9)
    result = dict(name=run.name, final_val_loss=result_val, final_val_batches=val_batches_losses, steps=s["steps"], tokens=s["steps"] * tokens_per_step,
                  wall_time=round(wall, 1), tokens_per_s=round(tok_s), mfu=round(flops * tok_s / peak, 4) if peak else None,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  peak_memory_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
                  processes=distributed.world(), parallel=("fsdp" if distributed.STATE["fsdp"] else "ddp") if distributed.world() > 1 else None)
    if distributed.is_main():
        atomic_write_text(run.result_path, json.dumps(result, indent=1))
    if s["steps"]:  # a pretrained model that was only scored (--dense-from) stays where it came from
        checkpoint(s["steps"], finished=True)
    memory = f", peak GPU memory {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] else ""
    if s["steps"]:
        print(f"[{run.name}] done: val {result_val:.4f}, {plot.fmt_time(wall)}, {tok_s / 1e3:,.1f}k tok/s{memory}")
    else:
        print(f"[{run.name}] the pretrained model, scored without training: val {result_val:.4f} ± {se:.4f}")
    if STOP["signal"] is not None:  # the signal came during the last step: this run is complete, stop here
        raise SystemExit(128 + STOP["signal"])
    return result


# -----------------------------------------------------------------------------
# 3. The experiment


def dense_config(vocab_size, d_model, n_layer, n_head, n_kv_head, d_ff, seq_len):
    if d_model % n_head:  # (ModelConfig would also accept a d_head of its own, which train.py has no flag for)
        raise Fail(f"invalid model shape: --n-head {n_head} must divide --d-model {d_model}")
    try:
        return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head,
                           n_kv_head=n_kv_head, d_ff=d_ff, max_seq_len=seq_len)
    except ValueError as e:
        raise Fail(f"invalid model shape: {e}")


def moe_config(dense_cfg, n_experts, top_k, aux_loss_coef):
    """The dense shape with experts, and the balancing loss's weight: an MoE setting, no part of the dense run's
    identity (a new --aux-loss-coef reuses the trained dense model)."""
    try:
        return replace(upcycled_config(dense_cfg, n_experts, top_k), aux_loss_coef=aux_loss_coef)
    except ValueError as e:
        raise Fail(f"invalid model shape: {e}")


def pretrained_dense(dense_from, seq_len, n_experts, top_k, aux_loss_coef):
    """(the --dense-from model, its tokenizer, its source record); the MoE flags are checked before a large load."""
    from hf import load_pretrained  # safetensors and tokenizers are needed only here

    moe_config(ModelConfig(), n_experts, top_k, aux_loss_coef)
    return load_pretrained(dense_from, seq_len)


def planned_runs(init, r, independent_indices):
    """The MoE runs of a command as (init, r, shared index sets)."""
    if init in (None, "all"):
        return list(ALL_RUNS)
    if init == "dense":
        return []
    return [(init, {"scratch": None, "naive": 0.0, "drop": r}[init], not independent_indices)]


VAL_WINDOWS_SEED = 1234  # fixed validation windows, independent of --seed: every run and seed is scored on the same text


def training_recipe(*, seed, seq_len, batch_size, grad_accum, weight_decay, grad_clip, eval_batches, eval_interval,
                    log_interval):
    """The settings every run of a command shares: with a run's phase, model, data and schedule, its identity
    (see Run): everything that changes a number it records."""
    return dict(seed=seed, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, weight_decay=weight_decay,
                grad_clip=grad_clip, betas=list(BETAS), eps=ADAM_EPS, min_lr_ratio=MIN_LR_RATIO,
                eval_batches=eval_batches, eval_interval=eval_interval, log_interval=log_interval,
                val_windows_seed=VAL_WINDOWS_SEED)


def run_settings(phase, model_cfg, data_fingerprint, tokenizer, steps, lr, warmup, recipe):
    """What a run's numbers depend on: its identity (see Run)."""
    return dict(phase=phase, model=asdict(model_cfg), data=data_fingerprint, tokenizer=tokenizer, steps=steps,
                lr=lr, warmup=warmup, **recipe)


def compile_mode(device, pieces, processes):
    """torch.compile's mode for a model trained in steps of `pieces` forwards and backwards by `processes`
    processes: CUDA graphs ("reduce-overhead") on one GPU where a step is one piece, else the default. A small
    model's step is hundreds of short kernels, and a host that launches them one at a time can fall behind the
    GPU (the gpu preset's dense step on some H200 machines, figures/bench.md); a graph's replay launches a whole
    forward or backward at once.
    A replay writes over the outputs of the last one, gradients included, so steps that add up the gradients of
    several pieces, and DDP and FSDP with their hooks, keep the default mode."""
    return "reduce-overhead" if device.type == "cuda" and processes == 1 and pieces == 1 else None


def training_module(model, use_compile, check_batch, name, split=1, grad_accum=1):
    """The module the training step calls: model itself, under torchrun wrapped in DDP (or sharded by FSDP2 in
    place), then with use_compile its torch.compile wrapper once that is seen to compute the same loss on one
    validation batch, in the training step's split pieces (else a warning, and eager mode: slower, never wrong).
    The whole model is one graph, MoE layers included (dropupcycle.compile_model says what it takes to keep them
    right)."""
    wrapped = distributed.wrap(model)  # under torchrun: DDP, or FSDP2 in place; compiled after wrapping
    if not use_compile:
        return wrapped
    device = check_batch[0].device
    mode = compile_mode(device, grad_accum * split, distributed.world())
    compiled = compile_model(wrapped, mode=mode)
    losses = [evaluate(model, m, [check_batch], device, split)[0] for m in (wrapped, compiled)]  # (means over ranks)
    graphs = " (CUDA graphs)" if mode == "reduce-overhead" else ""
    print(f"[{name}] torch.compile{graphs} check on a validation batch: loss {losses[1]:.4f} compiled, {losses[0]:.4f} eager")
    if not abs(losses[1] - losses[0]) < 0.005:  # bf16 differences are ~1e-3
        print(f"[{name}] WARNING: the compiled model disagrees with eager mode: training this model without compile")
        return wrapped
    return compiled


def setup_device(device_name, fsdp, use_compile):
    device = distributed.setup(resolve_device(device_name), fsdp)  # under torchrun: this rank's device
    if use_compile and device.type != "cuda":
        print("note: --compile on the CPU needs a C++ compiler and mostly measures compile time")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def claim_out_dir(out_dir, resume, names):
    """Checks --resume against the folder, and locks out_dir."""
    if resume and not any(os.path.exists(os.path.join(out_dir, name, "ckpt.pt")) for name in names):
        raise Fail(f"--resume: no checkpoint in {out_dir} for these runs (nothing to resume); run without --resume")
    if distributed.is_main():
        make_dirs(out_dir)
        if not os.access(out_dir, os.W_OK):
            raise Fail(f"--out-dir {out_dir}: folder is not writable")
        lock_out_dir(out_dir)


def prepare_data(data, tokenizer, enc, out_dir, corpus_mb, seq_len, batch_size, eval_batches, device):
    """(training tokens on the device, the fixed validation batches, the data's description and fingerprint)."""
    train_tokens, val_tokens, data_info = load_data(data, tokenizer, enc, out_dir, corpus_mb, seq_len)
    print(f"data: {data_info['description']}")
    val_rng = np.random.default_rng(VAL_WINDOWS_SEED)
    val_batches = [get_batch(val_tokens, batch_size, seq_len, val_rng, device, distributed.rows())
                   for _ in range(eval_batches)]
    train_tokens = corpus_to_device(train_tokens, device)  # on a GPU, the host stays out of the training step
    return train_tokens, val_batches, data_info


def plan_runs(out_dir, planned, dense_cfg, moe_cfg, data_fingerprint, tokenizer, source, *, recipe, dense_schedule,
              moe_schedule, resume):
    """(the dense Run, the MoE Runs, each run's existing checkpoint or None, the FLOPs left after a run (for the ETA)).
    A schedule is (steps, peak lr, warmup steps). Every existing checkpoint is checked before any work: settings
    mismatches and corrupt files fail fast."""
    if source is not None:  # --dense-from: no dense phase
        dense_schedule = (0, *dense_schedule[1:])
    tokenizer_dir = source and source["path"]
    dense_run = Run("dense", out_dir, run_settings("dense", dense_cfg, data_fingerprint, tokenizer, *dense_schedule,
                                                   recipe), tokenizer_dir)
    if source is not None:
        dense_run.settings["source"] = source
    moe_runs = []
    for init, r, shared in planned:
        settings = dict(run_settings("moe", moe_cfg, data_fingerprint, tokenizer, *moe_schedule, recipe),
                        init=init, r=r, shared_indices=shared, dense=dense_run.settings if init != "scratch" else None)
        moe_runs.append(Run(plot.run_name(init, r, shared), out_dir, settings, tokenizer_dir))
    existing = {run.name: run.existing(resume) for run in [dense_run] + moe_runs}
    todo = [run for run in [dense_run] + moe_runs if not (existing[run.name] or {}).get("finished")]
    run_flops = {}
    for run in todo:
        s = run.settings
        run_flops[run.name] = (s["steps"] * s["batch_size"] * s["seq_len"] * s["grad_accum"] *
                               flops_per_token(ModelConfig(**s["model"]), s["seq_len"]))
    flops_after = lambda run: sum(run_flops[r.name] for r in todo[todo.index(run) + 1:])
    return dense_run, moe_runs, existing, flops_after


def micro_splits(dense_cfg, moe_cfg, with_moe, batch_size, seq_len, device):
    """Prints both models' sizes; returns {phase: pieces}: a micro-batch too big for this GPU is cut into pieces
    (after the corpus took its share of the memory)."""
    with torch.device("meta"):  # shapes only: the MoE of a 1B dense model would take 28 GB and a minute to init
        dense_probe = Transformer(dense_cfg)
        moe_probe = Transformer(moe_cfg) if with_moe else None
    print(f"dense: {dense_probe.num_params() / 1e6:.2f}M params" + (f" | MoE: {moe_probe.num_params() / 1e6:.2f}M params, "
                                                                    f"{moe_probe.num_params(active=True) / 1e6:.2f}M active" if moe_probe else ""))
    rows = batch_size // distributed.world()
    split = {"dense": micro_split(dense_cfg, rows, seq_len, device, dense_probe.num_params()),
             "moe": micro_split(moe_cfg, rows, seq_len, device, moe_probe.num_params()) if moe_probe else 1}
    for phase, n in split.items():
        if n > 1:
            print(f"{phase}: micro-batch of {rows} sequences cut into {n} pieces of {rows // n} to fit the GPU's "
                  f"free memory (gradients accumulate: the same data and global batch per step)")
    return split


def train_dense(run, model, ckpt, train_tokens, val_batches, device, flops_after, split, *, use_compile, ckpt_interval,
                fsdp):
    """Phase 1: the dense model. Trained once; any later command with the same settings reuses it. model is the
    --dense-from model, or None. Returns the trained dense model (full weights, also under --fsdp)."""
    cfg = ModelConfig(**run.settings["model"])
    if "source" in run.settings:  # --dense-from: scored once on the validation windows, so the figure and summary have its loss
        model.to(device)
        train_run(run, model, model, train_tokens, val_batches, device, ckpt_interval)
    elif ckpt is not None and ckpt.get("finished"):
        print(f"[dense] reusing the finished dense model in {run.dir}")
        model = Transformer(cfg)
        model.load_state_dict(ckpt["model"])
        model.to(device)
    else:
        torch.manual_seed(run.settings["seed"])
        model = Transformer(cfg).to(device)
        train_run(run, model, training_module(model, use_compile, val_batches[0], "dense", split, run.settings["grad_accum"]),
                  train_tokens, val_batches, device, ckpt_interval, ckpt, flops_after(run), split)
        if fsdp and distributed.world() > 1:  # sharded: upcycle from the full weights rank 0 just saved
            distributed.barrier()
            model = Transformer(cfg)
            model.load_state_dict(load_checkpoint(run.ckpt_path)["model"])
    return model


def moe_start(init, r, shared_indices, dense_model, moe_cfg, seed, device):
    """An MoE init's weights: Sec. 4's scratch baseline (every weight N(0, 0.02), router included), or the dense
    model drop-upcycled (naive Upcycling is r = 0)."""
    if init == "scratch":
        torch.manual_seed(seed + 1)
        return Transformer(moe_cfg).to(device)
    start = drop_upcycle(dense_model, n_experts=moe_cfg.n_experts, top_k=moe_cfg.top_k, r=r, seed=seed,
                         shared_indices=shared_indices)
    start.config = replace(start.config, aux_loss_coef=moe_cfg.aux_loss_coef)  # an MoE setting
    assert start.config == moe_cfg
    return start


def train_moe_inits(runs, dense_run, dense_model, moe_cfg, existing, train_tokens, val_batches, device, flops_after,
                    split, *, use_compile, ckpt_interval, t_all):
    """Phase 2: every MoE init, each from the same dense weights, with the same data stream and step count.
    One MoE module is trained in turn with each init's weights, so torch.compile compiles it once."""
    moe_model, moe_train_model = None, None
    for i, run in enumerate(runs):
        ckpt = existing[run.name]
        if ckpt is not None and ckpt.get("finished"):
            print(f"[{run.name}] reusing the finished run in {run.dir}")
            continue
        print(f"--- MoE run {i + 1}/{len(runs)}: {run.name} ({plot.fmt_time(time.time() - t_all)} so far)")
        s = run.settings
        start = None if ckpt is not None else moe_start(s["init"], s["r"], s["shared_indices"], dense_model, moe_cfg,
                                                        s["seed"], device)
        if moe_model is None:  # one MoE in memory at a time: a 1B dense model makes a 7B MoE
            moe_model = (start if start is not None else Transformer(moe_cfg)).to(device)
        elif start is not None:
            distributed.load_full_state(moe_model, start.state_dict())  # sharded after the first init under --fsdp
        del start
        if moe_train_model is None:  # compiled once, after the first init's weights are in
            moe_train_model = training_module(moe_model, use_compile, val_batches[0], run.name, split, s["grad_accum"])
        train_run(run, moe_model, moe_train_model, train_tokens, val_batches, device, ckpt_interval, ckpt,
                  flops_after(run), split)
        if s["init"] == "naive" and ckpt is None and distributed.is_main():  # identical experts compute the dense FFN: same loss at the start
            csv_path = run.csv_path
            try:
                start_val = plot.val_curve(csv_path)[2][0]
                csv_path = dense_run.csv_path
                dense_val = plot.val_curve(csv_path)[2][-1]
                print(f"[{run.name}] check: naive Upcycling starts at val {start_val:.4f}; the dense model ended at {dense_val:.4f}")
            except (OSError, ValueError, KeyError, IndexError):
                print(f"warning: {csv_path} is damaged: no check of naive Upcycling's start against the dense model")


SHAPE = {}  # the model shape experiment() trains (a --dense-from model has its own), for main()'s OOM message


def experiment(args):
    """The paper's steps in order: a dense model (trained here, or --dense-from), every MoE init made from its
    weights and trained on the same data for the same steps, then the comparison (analyze.py calls this per run).
    The flags become values here; the functions above take only the values they use."""
    t_all = time.time()  # the command's time, reading and tokenizing the data included
    device = setup_device(args.device, args.fsdp, args.compile)
    if args.batch_size % distributed.world():
        raise Fail(f"--batch-size {args.batch_size} (sequences per micro-batch, all processes together) must be "
                   f"divisible by the {distributed.world()} processes")
    moe_flags = dict(n_experts=args.n_experts, top_k=args.top_k, aux_loss_coef=args.aux_loss_coef)
    if args.dense_from:  # a pretrained model: its own shape and tokenizer, no dense phase
        dense_model, enc, source = pretrained_dense(args.dense_from, args.seq_len, **moe_flags)
        dense_cfg, tokenizer = dense_model.config, enc.name
    else:
        enc, dense_model, source, tokenizer = get_tokenizer(args.tokenizer), None, None, args.tokenizer
        dense_cfg = dense_config(enc.n_vocab, args.d_model, args.n_layer, args.n_head, args.n_kv_head, args.d_ff,
                                 args.seq_len)
    moe_cfg = moe_config(dense_cfg, **moe_flags)
    SHAPE.update(d_model=dense_cfg.d_model, n_layer=dense_cfg.n_layer, n_experts=args.n_experts)  # for main()'s OOM message
    planned = planned_runs(args.init, args.r, args.independent_indices)
    if args.init == "drop" and args.r > 0 and neurons_to_drop(args.r, moe_cfg.d_ff) == 0:
        raise Fail(f"--r {args.r:g} re-initialises none of an expert's {moe_cfg.d_ff} neurons (floor(r d_ff) = 0): "
                   f"that is naive Upcycling, --init naive")
    distributed.startup_barrier(first=True)  # ranks > 0 wait here for rank 0's checks and token cache
    names = ["dense"] + [plot.run_name(*p) for p in planned]
    claim_out_dir(args.out_dir, args.resume, names)
    what = {None: "no --init given: running the full comparison (--init all)", "all": "--init all"}.get(args.init, f"--init {args.init}")
    procs = f" x {distributed.world()} processes ({'FSDP2' if args.fsdp else 'DDP'})" if distributed.world() > 1 else ""
    print(f"{what} | preset {args.preset} | device {device}{procs}{' | compile' if args.compile else ''} | out {args.out_dir}")
    print(compute_description(device))
    print("runs: " + ", ".join(names))
    train_tokens, val_batches, data_info = prepare_data(args.data, tokenizer, enc, args.out_dir, args.corpus_mb,
                                                        args.seq_len, args.batch_size, args.eval_batches, device)
    recipe = training_recipe(seed=args.seed, seq_len=args.seq_len, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                             eval_batches=args.eval_batches, eval_interval=args.eval_interval,
                             log_interval=args.log_interval)
    dense_run, moe_runs, existing, flops_after = plan_runs(
        args.out_dir, planned, dense_cfg, moe_cfg, data_info["fingerprint"], tokenizer, source,
        recipe=recipe, dense_schedule=(args.dense_steps, args.dense_lr, args.dense_warmup),
        moe_schedule=(args.moe_steps, args.moe_lr, args.moe_warmup), resume=args.resume)
    distributed.startup_barrier(first=False)

    split = micro_splits(dense_cfg, moe_cfg, bool(moe_runs), args.batch_size, args.seq_len, device)
    dense_model = train_dense(dense_run, dense_model, existing["dense"], train_tokens, val_batches, device, flops_after,
                              split["dense"], use_compile=args.compile, ckpt_interval=args.ckpt_interval, fsdp=args.fsdp)
    train_moe_inits(moe_runs, dense_run, dense_model, moe_cfg, existing, train_tokens, val_batches, device, flops_after,
                    split["moe"], use_compile=args.compile, ckpt_interval=args.ckpt_interval, t_all=t_all)
    if distributed.is_main():  # with any runs of earlier commands that share these settings
        if not plot.report(args.out_dir, dense_run.settings, moe_runs[0].settings if moe_runs else None,
                           data_info["fingerprint"]):
            print(f"warning: no summary or figure written: every run is compared with the dense run in {dense_run.dir}")
    print(f"total time {plot.fmt_time(time.time() - t_all)}")
    distributed.barrier()  # ranks leave together: one tearing down its process group while rank 0 still works can abort


# -----------------------------------------------------------------------------
# 4. Sampling and main


def sample(path, *, device_name, prompt, num_samples, sample_tokens, temperature, seed):
    """Prints num_samples continuations of prompt from the model in checkpoint path (a file or a run folder)."""
    model, ckpt, path = load_model(path, if_damaged=None, flag="--sample")
    tokenizer, tokenizer_dir = ckpt.get("tokenizer", "byte"), tokenizer_dir_of(ckpt)
    if tokenizer.startswith("hf-") and tokenizer_dir is None:
        raise Fail(f"checkpoint {path} was trained with a Hugging Face tokenizer ({tokenizer}) from a folder it does "
                   f"not record, or that no longer holds it: nothing to decode the samples with")
    enc = HFTokenizer(tokenizer_dir) if tokenizer_dir else get_tokenizer(tokenizer)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise Fail(f"checkpoint {path} holds non-finite weights (NaN or inf): nothing to sample from")
    device = resolve_device(device_name)
    model.to(device).eval()
    torch.manual_seed(seed)
    idx = torch.tensor([enc.encode_ordinary(prompt) or [enc.eot_token]] * num_samples, device=device)
    with autocast(device):
        out = model.generate(idx, sample_tokens, temperature=temperature, top_k=50)
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i + 1} ({path}, step {ckpt['step']})")
        print(enc.decode([t for t in row if t < enc.n_vocab], errors="replace"))


def main(argv=None):
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    STOP["signal"] = None
    SHAPE.clear()
    prog = os.path.basename(sys.argv[0]) if argv is None else "train.py"
    args = None
    try:
        args = parse_args(argv)
        if args.sample is not None:
            if distributed.is_main():  # under torchrun, one process samples
                sample(args.sample, device_name=args.device, prompt=args.prompt, num_samples=args.num_samples,
                       sample_tokens=args.sample_tokens, temperature=args.temperature, seed=args.seed)
        else:
            experiment(args)
    except Fail as e:
        distributed.wait_for_rank0()  # a failure rank 0 sees too is reported once, by rank 0
        if distributed.is_main() or distributed.STATE["past_startup"]:
            where = f"[rank {distributed.rank()}] " if distributed.rank() > 0 else ""
            print(f"{prog}: error: {where}{e}", file=sys.stderr)
        distributed.leave(1)
    except torch.OutOfMemoryError:
        if args.sample is not None:
            message = "CUDA out of memory while sampling: try fewer --num-samples or --sample-tokens, or --device cpu"
        else:
            shape = SHAPE or dict(d_model=args.d_model, n_layer=args.n_layer, n_experts=args.n_experts)
            message = oom_message(args.batch_size, args.seq_len, args.grad_accum, **shape)
        print(f"{prog}: error: {message}", file=sys.stderr)
        distributed.leave(1)
    except KeyboardInterrupt as e:
        if not distributed.is_main():
            distributed.leave(ctrl_c.exit_status(e))
        print(f"{prog}: interrupted (checkpoints already on disk are kept; --resume continues from them)", file=sys.stderr)
        distributed.leave(ctrl_c.exit_status(e))
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        distributed.leave(1)
    except Exception:  # under torchrun: another rank failed and said why, or a bug (its traceback)
        distributed.crash()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for f in LOCK.values():
            f.close()
        LOCK.clear()
        distributed.teardown()


if __name__ == "__main__":
    run_as_script(main)
