"""
A run's folder: its identity (settings), checkpoints, log.csv and lock; and Ctrl-C handling during training.

train.py, analyze.py and hf.py use it (hf.py to read a run's model); it imports none of them.
"""

import fcntl
import json
import os
import signal
import sys

import torch

import ctrl_c
import distributed
import plot
from data import Fail, atomic_write_text, first_line, hf_tokenizer_name, make_dirs
from dropupcycle import ModelConfig, Transformer


# signal: the signal the training loop stops for (under torchrun, once the ranks agree on it); received: under
# torchrun, the one this rank got, not yet agreed; training/saving: what the process is doing; deferred: a quit
# held back until the checkpoint being written is whole. on_signal sets them.
STOP = {"signal": None, "received": None, "training": False, "saving": False, "deferred": None}


def say_from_handler(text):
    """Print from a signal handler. The handler runs between two bytecodes of the main thread, which may be inside
    a print to the same stream: a second print there raises "reentrant call inside BufferedWriter", so this
    writes to the file descriptor underneath (lost where there is none, as under pytest's capsys)."""
    try:
        os.write(sys.stdout.fileno(), text.encode())
    except (OSError, ValueError, AttributeError):  # (io.UnsupportedOperation is both of the first two)
        pass


def on_signal(signum, frame):
    if STOP["training"] and distributed.world() > 1:  # torchrun: every rank stops at the step all agree on
        if STOP["received"] is None:  # (torchrun repeats a Ctrl-C to every rank: a repeat is not "quit now")
            STOP["received"] = signum
            say_from_handler(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step\n")
    elif STOP["training"] and STOP["signal"] is None:
        STOP["signal"] = signum  # finish this step, save a checkpoint, exit
        say_from_handler(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step (again to quit now)\n")
    elif STOP["saving"]:  # quit, but once the checkpoint being written is complete
        STOP["deferred"] = signum
    else:
        raise ctrl_c.Interrupted(signum)  # outside training, or a second Ctrl-C: stop at once


def run_as_script(main):
    """main() of a tool run as `python tool.py`: its stop for Ctrl-C (exit status 130, after saving a checkpoint
    where a run was training) becomes death by SIGINT, as ctrl_c.py explains. Under torchrun the status goes to
    torchrun, which reports it."""
    try:
        main()
    except SystemExit as e:
        if e.code != 130 or distributed.launched():
            raise
        ctrl_c.die_by_signal(signal.SIGINT)
        raise  # (SIGINT blocked: the status stays 130)


def save_checkpoint(state, path):
    """Write to a temporary file, flush it to disk, then rename over the old checkpoint, with SIGINT/SIGTERM held
    back meanwhile: a crash, a full disk or a second Ctrl-C during the save leaves the previous checkpoint as it was."""
    tmp = path + ".tmp"
    # the mask alone is not enough: a signal sent to the process goes to any thread that does not block it (torch
    # and tiktoken start threads), and Python then runs the handler in this thread mid-save. So on_signal also
    # defers a quit while STOP["saving"], and the quit happens below once the file is complete.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    STOP["saving"], STOP["deferred"] = True, None
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # a full disk is an OSError from open/fsync, a RuntimeError from torch.save's writer
        if os.path.exists(tmp):
            os.remove(tmp)
        raise Fail(f"could not write checkpoint {path} ({getattr(e, 'strerror', None) or first_line(e)}); the previous "
                   f"checkpoint is unchanged")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal that came meanwhile is delivered now
        STOP["saving"] = False
        if STOP["deferred"] is not None:
            signum, STOP["deferred"] = STOP["deferred"], None
            raise ctrl_c.Interrupted(signum)


def tokenizer_dir_of(ckpt):
    """The folder of the Hugging Face tokenizer a checkpoint's run read (the --dense-from model's), or None where
    none is recorded, or the folder no longer holds that tokenizer.json (the run's tokenizer name is its hash)."""
    folder = ckpt.get("tokenizer_dir")
    if not folder:  # a checkpoint without the field names the folder only as its dense model's source
        source = (ckpt["settings"].get("dense") or ckpt["settings"]).get("source")
        folder = source and source["path"]
    path = folder and os.path.join(folder, "tokenizer.json")
    return folder if path and os.path.isfile(path) and hf_tokenizer_name(path) == ckpt.get("tokenizer") else None


RUN_CHECKPOINT_ADVICE = "delete it to start that run over"  # safe advice only for a file train.py made for a run


def load_checkpoint(path, if_damaged=RUN_CHECKPOINT_ADVICE):
    """The train.py checkpoint at path, else a Fail saying what the file is, and for a run's own file what to do."""
    advice = f"; {if_damaged}" if if_damaged else ""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise Fail(f"checkpoint {path}: cannot read it ({e.strerror or e})")
    except Exception as e:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive; a cut-off one still starts so
        if zipped and "Unsupported global" in str(e):  # whole, but holds Python objects train.py never saves
            raise Fail(f"checkpoint {path} holds Python objects besides tensors and plain values: not a train.py "
                       f"checkpoint, and not loaded, since unpickling them could run any code")
        raise Fail(f"checkpoint {path} is unreadable ({'truncated or corrupt' if zipped else 'not a file torch.save wrote'})"
                   f"{advice}")
    if not isinstance(ckpt, dict) or not {"model", "settings", "step", "model_config"} <= set(ckpt):
        raise Fail(f"checkpoint {path} is not a train.py checkpoint{advice}")
    return ckpt


def load_model(path, *, if_damaged, flag=""):
    """(the model, its checkpoint, the checkpoint file) of a train.py checkpoint: a file, or a run's folder.
    flag: the command-line flag that named path, for the messages."""
    folder = path
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.exists(path):
        runs = (sorted(n for n in os.listdir(folder) if os.path.exists(os.path.join(folder, n, "ckpt.pt")))
                if os.path.isdir(folder) else [])  # an --out-dir given for one of its runs
        hint = f" (it holds the runs {', '.join(runs)}: name one of their folders)" if runs else ""
        raise Fail(f"{flag + ' ' if flag else ''}{path}: no checkpoint there{hint}")
    ckpt = load_checkpoint(path, if_damaged)
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise Fail(f"checkpoint {path} does not hold a model of its own config ({first_line(e, 100)})")
    return model, ckpt, path


def settings_diff(old, new, prefix=""):
    keys = sorted(set(old) | set(new))
    diffs = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += settings_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {a} -> {b}")
    return diffs


CSV_FIELDS = ["step", "tokens", "train_loss", "val_loss", "val_se", "aux_loss", "lr", "time"]


class Run:
    """One training run (the dense model, or one MoE init): its folder and its settings. The settings are the
    run's identity: everything that changes a number it records. A checkpoint made with other settings is refused
    rather than continued, and only runs with equal settings (but the init) are compared."""

    def __init__(self, name, out_dir, settings, tokenizer_dir=None):
        self.name, self.settings = name, settings
        # the --dense-from tokenizer's folder, for sampling and export: no part of the identity (the tokenizer's
        # content is, by its name), and a scratch run's settings name no source
        self.tokenizer_dir = tokenizer_dir
        self.dir = os.path.join(out_dir, name)
        self.ckpt_path = os.path.join(self.dir, "ckpt.pt")
        self.csv_path = os.path.join(self.dir, "log.csv")
        self.result_path = os.path.join(self.dir, "result.json")

    def existing(self, resume):
        """The run's checkpoint if one exists and matches the current settings; None if there is none."""
        if not os.path.exists(self.ckpt_path):
            return None
        ckpt = load_checkpoint(self.ckpt_path)
        if ckpt["settings"] != self.settings:
            diff = settings_diff(ckpt["settings"], self.settings)
            raise Fail(f"{self.dir} holds a run with other settings ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}); "
                       f"use another --out-dir, or delete {self.dir} to replace it")
        if not ckpt.get("finished") and not resume:
            raise Fail(f"{self.dir} holds an unfinished run (step {ckpt['step']}/{self.settings['steps']}): pass "
                       f"--resume to continue it, or delete {self.dir} to start it over")
        if ckpt.get("finished"):
            self.check_report_files()
        return ckpt

    def check_report_files(self):
        """A finished run's files for the summary, checked before any training rather than after: settings.json, a
        copy of the checkpoint's settings, is written again; a damaged result.json or log.csv, which only training
        makes, is said now (the summary leaves the run out, and the model is kept)."""
        if not distributed.is_main():
            return
        try:
            atomic_write_text(os.path.join(self.dir, "settings.json"), json.dumps(self.settings, indent=1))
        except OSError as e:
            raise Fail(f"cannot write in {self.dir} ({e.strerror or e})")
        try:
            plot.load_run(self.dir)
        except plot.DAMAGED_RUN_FILE:
            print(f"warning: {self.dir}: a finished run whose result.json or log.csv is missing or damaged: the "
                  f"summary will leave it out (delete {self.dir} to train it again)")

    def open_log(self, resumed_at):
        """The run's log.csv, open for appending rows: started afresh, or (resumed_at, a checkpoint's step) cut back to
        that step. Writes settings.json next to it. Rank 0 alone writes files: the other ranks get /dev/null."""
        if not distributed.is_main():
            return open(os.devnull, "w")
        make_dirs(self.dir)
        rows = read_log(self.csv_path, resumed_at) if resumed_at is not None and os.path.exists(self.csv_path) else []
        try:
            atomic_write_text(self.csv_path, ",".join(CSV_FIELDS) + "\n" + "".join(",".join(r.get(k) or "" for k in CSV_FIELDS) + "\n" for r in rows))
            atomic_write_text(os.path.join(self.dir, "settings.json"), json.dumps(self.settings, indent=1))
            return open(self.csv_path, "a", newline="")
        except OSError as e:
            raise Fail(f"cannot write in {self.dir} ({e.strerror or e})")


def restore(ckpt, model, optimizer, scaler, device):
    """--resume: weights, optimizer, scaler and RNG from ckpt; returns (step, elapsed time, unlogged losses). The
    data needs nothing: a step's batches follow from (seed, phase, step)."""
    distributed.load_full_state(model, ckpt["model"], optimizer, ckpt["optimizer"])
    if scaler.is_enabled() and ckpt.get("scaler"):  # (empty when saved in bf16 or fp32: the scaler starts afresh)
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["step"], ckpt["elapsed"], [tuple(p) for p in ckpt.get("pending", [])]


def read_log(path, up_to_step):
    """The rows of log.csv up to a checkpoint's step (a resumed run continues the log from there)."""
    try:
        rows = plot.read_csv(path)
        return [r for r in rows if int(r["step"]) <= up_to_step]
    except (OSError, ValueError, KeyError, TypeError):
        raise Fail(f"{path} is damaged (not a log.csv of train.py); delete the run's folder to start it over")


LOCK = {}  # out_dir -> open lock file, held for the life of the process


def lock_out_dir(out_dir):
    """One writer per output folder: a second process would interleave its rows with ours. The lock is the
    kernel's (flock), so it goes away with the process that held it, even after kill -9."""
    path = os.path.join(out_dir, ".lock")
    key = os.path.realpath(out_dir)  # one lock per folder, however it is spelled (analyze.py sweep locks it again)
    try:
        f = LOCK.get(key) or open(path, "a+")
    except OSError as e:
        raise Fail(f"could not write {path} ({e.strerror or e})")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise Fail(f"--out-dir {out_dir} is in use by {holder}; wait for it to finish, or use another --out-dir")
    LOCK[key] = f
    try:
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} ({' '.join(sys.argv[:1] + sys.argv[1:4])} ...)")
        f.flush()
    except OSError as e:
        raise Fail(f"could not write {path} ({e.strerror or e})")

