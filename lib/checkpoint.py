"""Resumable training state for train.py (SPEC §5): the hypernetwork, its AdamW state and the step in one
safetensors file, written atomically; a checkpoint of another base model, hypernetwork or training config
is refused. Also metrics.jsonl, trimmed back to the checkpoint's step on resume.

    python train.py --preset demo --resume      # continue an interrupted run (Ctrl-C saves)
    python -m pytest -q test_all.py -k "checkpoint or resume"
"""


import torch

from lib import dist, fileio, loader


def check_weights(hyper, limit=1e6):
    """Weights that are non-finite or past `limit` in magnitude (an exploding run) are never saved. Under
    FSDP each process checks its own shards."""
    for name, p in hyper.named_parameters():
        p = dist.local(p)
        if p.requires_grad and p.numel() and not (torch.isfinite(p).all() and p.abs().max() <= limit):
            raise FloatingPointError(f"weights of {name} are non-finite or exploded (|w| up to {p.abs().max():.3g})")


def save_checkpoint(path, module, opt, metadata):
    """Module weights + AdamW state in one safetensors file with `metadata`, written atomically. Under torchrun
    every process calls it (FSDP2 gathers the whole state onto rank 0) and rank 0 alone writes the same file as
    one process would. Returns the module's weights (on rank 0)."""
    if dist.is_sharded(module):
        weights, state = dist.full_state(module, opt)
    else:
        names = {p: n for n, p in module.named_parameters()}
        weights, state = module.state_dict(), {names[p]: st for p, st in opt.state.items()}
    tensors = dict(weights)
    for name, st in state.items():
        for k, v in st.items():
            tensors[f"optim.{name}.{k}"] = v.reshape(-1).clone() if k == "step" else v
    if dist.is_main():
        loader.save_safetensors(path, tensors, metadata)
    return weights


def read_checkpoint(path):
    """(tensors, metadata) of a checkpoint file, with the file named in a one-line error when it is unreadable."""
    try:
        tensors, meta = loader.read_safetensors(path)
    except ValueError as e:
        raise ValueError(f"{path}: corrupted or unreadable checkpoint ({str(e).replace(f'{path}: ', '')})") from None
    if "step" not in meta or "train_config" not in meta:
        raise ValueError(f"{path}: not a train.py checkpoint")
    return tensors, meta


def restore(path, module, opt, tensors):
    """Loads save_checkpoint's weights and AdamW state into `module` and `opt` (strict: names and shapes)."""
    dev = next(module.parameters()).device
    model_state = {k: v.to(dev) for k, v in tensors.items() if not k.startswith("optim.")}
    loader.check_state_dict(path, {k: v.shape for k, v in module.state_dict().items()},
                            {k: v.shape for k, v in model_state.items()}, "this run's hypernetwork")
    optim_state = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            name, k = key[len("optim."):].rsplit(".", 1)
            optim_state.setdefault(name, {})[k] = v.reshape(()) if k == "step" else v.to(dev)
    if dist.is_sharded(module):                  # every process reads the whole file and keeps its shards
        dist.load_full_state(module, opt, model_state, optim_state)
        return
    module.load_state_dict(model_state, strict=True)
    by_name = dict(module.named_parameters())
    for name, st in optim_state.items():
        opt.state[by_name[name]].update(st)


def read_metrics(path, up_to=None):
    """Records of metrics.jsonl (append-only: a half-written last line, a crash, is cut off with a warning);
    a malformed line before it is an error."""
    recs = [r for _, r in fileio.read_jsonl(path, "metrics file", append_only=True)]
    return [r for r in recs if up_to is None or r["step"] <= up_to]
