"""Resumable training state for train.py (SPEC §5): the hypernetwork, its AdamW state and the step in one
safetensors file, written atomically; a checkpoint of another base model, hypernetwork or training config
is refused. Also metrics.jsonl, trimmed back to the checkpoint's step on resume.

    python train.py --preset demo --resume      # continue an interrupted run (Ctrl-C saves)
    python -m pytest -q test_all.py -k "checkpoint or resume"
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch

import dist
import fileio
import hypernet as H
import loader

RESUMABLE_CHANGES = {"max_steps", "eval_every", "eval_batches", "save_every", "samples", "device", "out", "fsdp"}
# grad_accum may change too, with the number of processes: a step's micro-batches (grad_accum x processes) may not


def check_weights(hyper, limit=1e6):
    """Weights that are non-finite or past `limit` in magnitude (an exploding run) are never saved. Under
    FSDP each process checks its own shards."""
    for name, p in hyper.named_parameters():
        p = dist.local(p)
        if p.requires_grad and p.numel() and not (torch.isfinite(p).all() and p.abs().max() <= limit):
            raise FloatingPointError(f"weights of {name} are non-finite or exploded (|w| up to {p.abs().max():.3g})")


def save_checkpoint(path, hyper, opt, step, cfg):
    """Hypernetwork + AdamW state + step in one safetensors file, written atomically. Under torchrun every
    process calls it (FSDP2 gathers the whole state onto rank 0) and rank 0 alone writes the same file as one
    process would, plus the number of processes. Returns the hypernetwork's weights (on rank 0)."""
    if dist.is_sharded(hyper):
        weights, state = dist.full_state(hyper, opt)
    else:
        names = {p: n for n, p in hyper.named_parameters()}
        weights, state = hyper.state_dict(), {names[p]: st for p, st in opt.state.items()}
    tensors = dict(weights)
    for name, st in state.items():
        for k, v in st.items():
            tensors[f"optim.{name}.{k}"] = v.reshape(-1).clone() if k == "step" else v
    if dist.is_main():
        loader.save_safetensors(path, tensors, {"step": step, "train_config": json.dumps(asdict(cfg)),
                                                "hyper_config": json.dumps(asdict(hyper.hcfg)),
                                                "base_config": json.dumps(asdict(hyper.base_cfg)),
                                                "world_size": dist.world_size()})
    return weights


def save(run, step):
    """OUT/checkpoint.safetensors (resumable) and OUT/hypernet.safetensors (what steer.py and serve.py load)."""
    check_weights(run.hyper)
    out = Path(run.cfg.out)
    weights = save_checkpoint(out / "checkpoint.safetensors", run.hyper, run.opt, step, run.cfg)
    if dist.is_main():
        H.save(run.hyper, out / "hypernet.safetensors", {"step": step, "train_config": json.dumps(asdict(run.cfg))},
               weights)


def load_checkpoint(path, hyper, opt, cfg):
    """Restore hypernetwork and optimizer from save_checkpoint's file; returns the step. Refuses a
    checkpoint of another base model, hypernetwork or training config (listing the differences)."""
    try:
        tensors, meta = loader.read_safetensors(path)
    except ValueError as e:
        raise ValueError(f"{path}: corrupted or unreadable checkpoint ({str(e).replace(f'{path}: ', '')})") from None
    if "step" not in meta or "train_config" not in meta:
        raise ValueError(f"{path}: not a train.py checkpoint")
    H.check_base(path, meta, hyper.base_cfg)
    if json.loads(meta["hyper_config"]) != asdict(hyper.hcfg):
        raise ValueError(f"{path}: checkpoint hypernetwork config {meta['hyper_config']} differs from this run's")
    theirs = json.loads(meta["train_config"])
    diff = [f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in asdict(cfg).items()
            if k not in RESUMABLE_CHANGES | {"grad_accum"} and theirs.get(k, v) != v]
    was = (theirs.get("grad_accum", cfg.grad_accum), int(meta.get("world_size", 1)))
    now = (cfg.grad_accum, dist.world_size())
    if was[0] * was[1] != now[0] * now[1]:   # another split of a step's micro-batches resumes exactly (train_step)
        diff.append(f"grad_accum x processes {was[0]} x {was[1]} -> {now[0]} x {now[1]}")
    if diff:
        raise ValueError(f"{path}: this run's settings differ from the checkpoint's ({'; '.join(diff)}); "
                         "resume with the same settings, or start over with --overwrite")
    dev = next(hyper.parameters()).device
    model_state = {k: v.to(dev) for k, v in tensors.items() if not k.startswith("optim.")}
    loader.check_state_dict(path, {k: v.shape for k, v in hyper.state_dict().items()},
                            {k: v.shape for k, v in model_state.items()}, "this run's hypernetwork")
    optim_state = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            name, k = key[len("optim."):].rsplit(".", 1)
            optim_state.setdefault(name, {})[k] = v.reshape(()) if k == "step" else v.to(dev)
    if dist.is_sharded(hyper):                  # every process reads the whole file and keeps its shards
        dist.load_full_state(hyper, opt, model_state, optim_state)
        return int(meta["step"])
    hyper.load_state_dict(model_state, strict=True)
    by_name = dict(hyper.named_parameters())
    for name, st in optim_state.items():
        opt.state[by_name[name]].update(st)
    return int(meta["step"])


def read_metrics(path, up_to=None):
    """Records of metrics.jsonl (fileio.complete_lines: a half-written last line, a crash, is cut off with a
    warning); a malformed line before it is an error."""
    recs = []
    for n, line in enumerate(fileio.complete_lines(path), 1):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: malformed metrics line") from None
    return [r for r in recs if up_to is None or r["step"] <= up_to]


def start_or_resume(run, out, resume, overwrite):
    """Creates OUT; returns the step to start from. A finished or started run is never overwritten silently."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt, metrics = out / "checkpoint.safetensors", out / "metrics.jsonl"
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: nothing to resume")
        step = load_checkpoint(ckpt, run.hyper, run.opt, run.cfg)
        kept = read_metrics(metrics, up_to=step)   # records of steps after the checkpoint are redone
        dist.barrier()                             # every process has read the files before rank 0 rewrites one
        if dist.is_main():
            fileio.write_jsonl(metrics, kept)
        print(f"resumed from {ckpt} at step {step}")
        return step
    if (ckpt.exists() or metrics.exists()) and not overwrite:
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it or --overwrite to "
                              "start over, or choose another --out")
    dist.barrier()
    if dist.is_main():
        metrics.unlink(missing_ok=True)
    return 0
