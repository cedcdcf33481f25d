"""Several processes through torchrun: data parallel (DDP, the default) or fully sharded (FSDP2, --fsdp).

    torchrun --standalone --nproc_per_node=N train.py ...          # N processes, one GPU each (or N CPU processes)

Under plain `python train.py` nothing here does anything (world size 1). Under torchrun:
  - every rank draws the same --batch-size windows from the step's rng and takes its contiguous share of the
    rows, so a step sees the same data as one process with the same --batch-size (the GLOBAL micro-batch);
  - gradients are averaged over ranks (DDP's all-reduce, or FSDP2's reduce-scatter); logged and validation
    losses are averaged over ranks before anyone looks at them, so every rank takes the same decisions;
  - rank 0 alone writes files and prints; small agreements (losses, the stop flag) go through a CPU (gloo) group.
"""

import contextlib
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ctrl_c

STATE = dict(rank=0, world=1, fsdp=False, device=None, cpu_group=None, past_startup=False)


def launched():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun


def rank():
    return STATE["rank"] if dist.is_initialized() else int(os.environ.get("RANK", 0)) if launched() else 0


def is_main():
    return rank() == 0


def world():
    return STATE["world"]


def setup(device, fsdp):
    """Join torchrun's process group (once; analyze.py sweep calls train.experiment repeatedly) and return this
    rank's device: cuda:LOCAL_RANK with NCCL, or the CPU with gloo. Ranks > 0 print nothing from here on."""
    if STATE["device"] is not None:
        return STATE["device"]
    from data import Fail
    if not launched():
        if fsdp:
            raise Fail("--fsdp shards the model over torchrun's processes: torchrun --standalone --nproc_per_node=N train.py --fsdp ...")
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    STATE.update(rank=dist.get_rank(), world=dist.get_world_size(), fsdp=fsdp, device=device,
                 cpu_group=dist.new_group(backend="gloo") if device.type == "cuda" else None)
    if STATE["rank"] > 0:
        sys.stdout = open(os.devnull, "w")
    return device


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
    STATE.update(rank=0, world=1, fsdp=False, device=None, cpu_group=None, past_startup=False)


def leave(code):
    """sys.exit(code); under a process group of several ranks at once, skipping Python's clean-up: a rank that
    fails while a peer waits in a collective can deadlock in the group's destructor (gloo joins its worker
    thread while holding the GIL the thread needs), and then torchrun never learns that it failed."""
    if world() > 1:
        ctrl_c.flush_output()
        os._exit(code)
    sys.exit(code)


def crash():
    """Called while handling an error that is not one of the expected, one-line failures. Under a process group of
    several ranks: a collective failing because another rank exited (that rank said why; torchrun's report names
    it) ends quietly, anything else (a bug, a CUDA fault) prints its traceback; then leave(1), whose clean-up
    cannot deadlock. With one process the error propagates as usual."""
    if world() > 1:
        if not peer_gone(sys.exc_info()[1]):
            traceback.print_exc()
        leave(1)
    raise


def startup_barrier(first):
    """Rank 0 checks the flags and files and builds the token cache first (first=True before, False after);
    the other ranks wait, then load what rank 0 made. A failure rank 0 also sees is reported by rank 0 alone."""
    if world() > 1 and first == (rank() > 0):
        dist.barrier()
    if not first:
        STATE["past_startup"] = True


def barrier():
    if world() > 1:
        dist.barrier()


def mean(values):
    """Float64 CPU tensor of numbers (or a list of them) -> its mean over ranks (each rank's share is equal)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if world() > 1:
        dist.all_reduce(values, group=STATE["cpu_group"])
        values /= world()
    return values


def agree_signal(received):
    """The stop signal any rank has received (else None), the same on every rank: called once per step."""
    if world() == 1:
        return received
    flag = torch.tensor([received or 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=STATE["cpu_group"])
    return int(flag) or None


def rows():
    """This rank's rows of a micro-batch (see data.get_batch)."""
    return (rank(), world())


def wrap(model):
    """The module the training loop calls: DDP around model, or model itself sharded in place by FSDP2
    (each Block, then the root: a Block's weights, stacked experts included, are gathered just for its
    forward and backward). Wrapped before torch.compile: one rule for both, and FSDP2's hooks must be in
    place before the optimizer sees the (sharded) parameters."""
    if world() == 1:
        return model
    if STATE["fsdp"]:
        from torch.distributed.fsdp import FSDPModule, fully_shard
        if not isinstance(model, FSDPModule):
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        return model
    device = STATE["device"]
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def reshard(model):
    """Under FSDP2, put every weight back into its shard. After a forward without a backward (a check or an
    evaluation) the root module keeps its gathered weights registered as its parameters, and an optimizer made then
    would hold those full copies instead of the shards: it would update tensors FSDP discards and could not be
    saved (get_optimizer_state_dict fails with a KeyError)."""
    if world() > 1 and STATE["fsdp"]:
        from torch.distributed.fsdp import FSDPModule
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def grad_sync(train_model, sync):
    """Context for one micro-batch's forward and backward: gradients are reduced over ranks only when sync (the
    last one). An evaluation with gradients on passes False: no backward follows, and DDP must not wait for one."""
    module = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if isinstance(module, DDP) and not sync:
        return module.no_sync()
    if world() > 1 and STATE["fsdp"] and hasattr(module, "set_requires_gradient_sync"):  # a model only scored
        module.set_requires_gradient_sync(sync)  # (--dense-from's, before upcycling) is not sharded
    return contextlib.nullcontext()


def full_state(model, optimizer=None):
    """(model state dict, optimizer state dict or None) in the one checkpoint format of a single process
    (full tensors on the CPU; the optimizer's parameters numbered in group order). Collective under FSDP;
    ranks > 0 get empty dicts there."""
    if not STATE["fsdp"] or world() == 1:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    if optimizer is None:
        return model_sd, None
    sd = get_optimizer_state_dict(model, optimizer, options=options)
    if not sd:
        return model_sd, {}
    ids = {name: i for i, name in enumerate(n for g in sd["param_groups"] for n in g["params"])}
    return model_sd, dict(state={ids[n]: s for n, s in sd["state"].items()},
                          param_groups=[dict(g, params=[ids[n] for n in g["params"]]) for g in sd["param_groups"]])


def load_full_state(model, model_sd, optimizer=None, optimizer_sd=None):
    """Load full state dicts (every rank holds them) into model and optimizer, sharded or not."""
    if not STATE["fsdp"] or world() == 1:
        model.load_state_dict(model_sd)
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        name_of = {id(p): n for n, p in model.named_parameters()}  # ids count the parameters in group order
        names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
        groups = optimizer_sd["param_groups"]
        sd = dict(state={names[i]: s for i, s in optimizer_sd["state"].items()},
                  param_groups=[dict(g, params=[names[i] for i in g["params"]]) for g in groups])
        set_optimizer_state_dict(model, optimizer, sd, options=options)


def peer_gone(error):
    """Whether error is a collective failing because another rank exited (it reported its own failure)."""
    return world() > 1 and (isinstance(error, dist.DistError) or "closed by peer" in str(error)
                            or "Connection reset" in str(error))


def wait_for_rank0():
    """A rank > 0 failed before the startup barrier: rank 0 fails the same way and says so; torchrun ends us
    when it exits."""
    if rank() > 0 and not STATE["past_startup"]:
        try:
            time.sleep(10)
        except KeyboardInterrupt:
            pass
