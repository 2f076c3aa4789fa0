"""Several processes, one run: the pieces of torchrun training that train.py and steer.py use (SPEC §5), and
the evaluation's concepts split over processes or machines (steer.py eval --shard, steer.py merge).

    torchrun --nproc-per-node 8 train.py                             # DDP: every GPU holds the whole hypernetwork
    torchrun --nproc-per-node 8 train.py --preset paper-9b --fsdp    # FSDP2: its weights, gradients, AdamW state 1/8 each
    torchrun --nproc-per-node 2 train.py --preset demo --max-steps 4 --out runs/demo-2p   # CPU (gloo), a minute
    torchrun --nproc-per-node 8 steer.py eval --hypernet runs/paper-2b/hypernet.safetensors --out gens.jsonl  # 8 shards

Launched without torchrun (no RANK / WORLD_SIZE in the environment) nothing here starts a process group:
rank 0 of 1, and every function is a no-op or the identity, so one-process training is untouched.

What each process holds: the frozen base, whole (it has no gradients or optimizer state; sharding it would
all-gather all of it twice a step to save 17 GiB at 9b, see bench.py memory --fsdp); the hypernetwork, whole
(DDP, gradients averaged after backward) or sharded one block at a time (FSDP2 fully_shard, parameters
gathered for each block's forward and backward); its slice of every optimizer step's examples (train.py).
"""
import contextlib
import io
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched():
    """torchrun sets RANK and WORLD_SIZE for every process it starts."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size():
    """How many processes torchrun started (its WORLD_SIZE), read without joining their group; 1 without it."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def local_device(device):
    """cuda:LOCAL_RANK for "cuda" under torchrun (one GPU per process); else `device` as it is."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if launched() and device == "cuda" else device


def start(device):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) if it launched us; returns this process's
    device (local_device)."""
    if not launched() or dist.is_initialized():
        return device
    device = local_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=1))
    return device


def stop():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def _device():  # nccl reduces CUDA tensors only
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(*values):
    """The sums of a few numbers over all processes (the numbers themselves in one process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return tuple(t.tolist())


def any_rank(*flags):
    """For each flag: is it set in any process? One all-reduce, so that every process stops at the same step
    when one of them got Ctrl-C or saw a non-finite value."""
    if not dist.is_initialized():
        return flags
    t = torch.tensor([float(f) for f in flags], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def barrier():
    if dist.is_initialized():
        dist.barrier()


def _broadcast_text(text, src):
    """`text` of process `src`, on every process (UTF-8 bytes in a tensor: no pickle, unlike broadcast_object_list)."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=_device())
    n = torch.tensor([data.numel()], device=_device())
    dist.broadcast(n, src)
    buf = data if rank() == src else torch.empty(int(n.item()), dtype=torch.uint8, device=_device())
    dist.broadcast(buf, src)
    return bytes(buf.cpu().tolist()).decode("utf-8")


def check_same_settings(settings):
    """Every process must run with the same settings ({name: JSON value}; a run's whole config): one launched
    with another learning rate would train a diverging copy, one with another output folder fail at the end.
    Every process calls this at start; a difference raises the same one-line ValueError in all of them, naming
    the first setting that differs with rank 0's value and a differing process's. A no-op in one process."""
    if not dist.is_initialized():
        return
    mine = json.loads(json.dumps(settings, sort_keys=True, default=str))      # as JSON reads it back
    first = json.loads(_broadcast_text(json.dumps(mine, sort_keys=True), 0))
    names = sorted(first) + sorted(set(mine) - set(first))                   # rank 0's names first: one order
    differs = next((i for i, k in enumerate(names) if mine.get(k, "(absent)") != first.get(k, "(absent)")), None)
    key = len(first) + 1 if differs is None else min(differs, len(first))   # a name rank 0 lacks: len(first)
    who = torch.tensor([key * world_size() + rank()], device=_device())
    dist.all_reduce(who, op=dist.ReduceOp.MIN)                               # the first setting, its lowest rank
    index, src = divmod(int(who.item()), world_size())
    if index == len(first) + 1:                                              # every process agrees with rank 0
        return
    name, theirs = json.loads(_broadcast_text(json.dumps(
        [names[differs], mine.get(names[differs], "(absent)")] if differs is not None else None), src))
    raise ValueError(f"the processes were started with different settings: {name} is "
                     f"{json.dumps(first.get(name, '(absent)'))} in process 0 and {json.dumps(theirs)} in process "
                     f"{src}; start every process with the same flags")


def only_main_prints():
    """stdout of every process but rank 0 goes nowhere (progress bars are disabled there separately)."""
    return contextlib.nullcontext() if is_main() else contextlib.redirect_stdout(io.StringIO())


# ----------------------------------------------------------------------------- the hypernetwork across processes

def wrap(hyper, fsdp=False):
    """The module the training forward runs. One process: `hyper` itself. Under torchrun: DDP (a whole
    replica per process; backward averages the gradients over processes), or with fsdp FSDP2 in place: every
    block and the embeddings are one unit each, the rest (final norm, head) the root's, each parameter
    sharded 1/world along dim 0. fp32 all-gathers, so numerics equal one process under bf16 autocast."""
    if world_size() == 1:
        return hyper
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in hyper.layers:
            fully_shard(block)
        fully_shard(hyper.embed_tokens)     # (vocab, d): at 9b the largest unit, 3.4 GiB in fp32
        fully_shard(hyper)
        return hyper
    from torch.nn.parallel import DistributedDataParallel
    cuda = next(hyper.parameters()).device.type == "cuda"
    return DistributedDataParallel(hyper, device_ids=[torch.cuda.current_device()] if cuda else None)


def is_sharded(module):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def local(t):
    """This process's shard of an FSDP2 parameter or gradient (a DTensor); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def item(t):
    """A scalar that may be a DTensor (clip_grad_norm_ of FSDP2 gradients) as a Python number."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).item()


def full_state(module, opt):
    """(weights {name: tensor}, AdamW state {name: {key: tensor}}) of an FSDP2 module, gathered whole into
    rank 0's CPU memory; empty dicts on the other ranks. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts), get_optimizer_state_dict(module, opt, options=opts).get("state", {})


def load_full_state(module, opt, weights, optim_state):
    """full_state's inverse: every process passes the whole state and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, weights, options=opts)
    groups = get_optimizer_state_dict(module, opt, options=opts)["param_groups"]       # parameters by name
    set_optimizer_state_dict(module, opt, {"state": optim_state, "param_groups": groups}, options=opts)
