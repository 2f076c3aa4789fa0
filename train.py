"""Train a HyperSteer hypernetwork with the LM cross-entropy of the steered base model (paper §3-4,
Eq. 4; SPEC §5). The base model is frozen; only the hypernetwork learns.

    python train.py --preset demo       # offline: gemma-3-270m + bundled demo concepts, CPU, < 10 min
    python train.py                     # the paper's Gemma-2-2b cross-attention run (one 80 GB GPU)
    python train.py --preset demo --max-steps 20 --eval-every 10    # a 1-minute smoke test

One step (SPEC §5 compute structure): the base residual h_L at the steering layer over prompt +
output, once, without gradients; Δ = H(s, X = h_L over the prompt); the steered pass runs only
blocks L+1.. from h_L + Δ; the loss reaches H through Δ alone.
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data
import hypernet as H
import model as M


@dataclass
class TrainConfig:
    model: str = "google/gemma-2-2b-it"        # base model: local folder or hub repo id
    data: str = "concept16k:2b/l20/train/data.parquet"  # AxBench "dataset:path", or a local .parquet/.jsonl
    data_revision: str = "main"                # hub revision the data is pinned to
    variant: str = "cross_attention"           # no_context | in_context | cross_attention
    n_blocks: int = 22                         # hypernetwork depth N (paper 2b: 22)
    layer: int = 20                            # steering layer L (SPEC §4)
    random_init: bool = False                  # paper Table 2 ablation
    freeze_embeddings: bool = False            # keep the hypernetwork's embeddings fixed (CPU demos)
    batch_size: int = 12                       # examples per micro-batch (paper 2b: 12)
    grad_accum: int = 1                        # micro-batches per optimizer step
    lr: float = 8e-5                           # peak learning rate, decayed linearly to 0 (paper: 8e-5 * sqrt(20 / N))
    weight_decay: float = 0.0                  # AdamW weight decay (paper: 0)
    epochs: float = 3.0                        # passes over the training rows (fractions allowed)
    max_steps: int = 0                         # stop after this many steps (0 = epochs decide)
    clip: float = 1.0                          # gradient-norm clip
    max_len: int = 256                         # prompt + output tokens per example
    held_out: float = 500                      # held-out concepts: a count (>= 1) or a fraction (< 1)
    eval_rows: int = 2                         # rows per trained concept kept for held-in evaluation
    eval_every: int = 500                      # steps between evaluations
    eval_batches: int = 20                     # batches per split per evaluation
    save_every: int = 500                      # steps between checkpoints
    samples: int = 4                           # steered generations printed at the end
    out: str = "runs/paper-2b"                 # checkpoints, metrics.jsonl, loss.png
    bf16: str = "auto"                         # frozen base in bf16 + bf16 autocast: yes | no | auto (= on cuda)
    seed: int = 0                              # data order, held-out split and init seed
    device: str = "cuda" if torch.cuda.is_available() else "cpu"   # cpu or cuda


PRESETS = {
    "paper-2b": TrainConfig(),
    "paper-9b": TrainConfig(model="google/gemma-2-9b-it", data="concept16k:9b/l20/train/data.parquet",
                            batch_size=4, lr=5e-6, out="runs/paper-9b"),
    "demo": TrainConfig(model=str(M.DEMO_MODEL), data=str(data.DEMO_DATA), n_blocks=2, layer=9,
                        freeze_embeddings=True, batch_size=4, lr=1e-3, epochs=1.25, max_len=96,
                        held_out=4, eval_rows=2, eval_every=57, eval_batches=5, save_every=57,
                        out="runs/demo", device="cpu"),
}


# ----------------------------------------------------------------------------- the loss

def steered_loss(base, hyper, batch, strength=1.0):
    """Eq. 4: token-mean cross-entropy of the steered base model on the output tokens."""
    L = base.layer_index(hyper.hcfg.layer)
    with torch.no_grad():
        h = base.residual(batch["ids"], batch["pad"], L)                  # (B, T, d), no gradients
    delta = hyper(batch["hyper_ids"], batch["hyper_pad"], h, batch["prompt"])   # Eq. 2-3: (B, d)
    h = M.add_steering(h, M.Steer(L, delta, strength, batch["steer"]))  # Eq. 1
    out = base.run_from(h, L, batch["pad"])                              # blocks L+1.. only
    sel = batch["labels"] != -100
    logits = base.head(out[sel])                                          # logits only where labelled
    return F.cross_entropy(logits.float(), batch["labels"][sel])


def two_pass_loss(base, hyper, batch):
    """The public code's structure, kept for the speed comparison only: the base runs once for X and
    again, whole and with gradients through every block, for the steered output."""
    L = base.layer_index(hyper.hcfg.layer)
    with torch.no_grad():
        x = base.residual(batch["ids"], batch["pad"], L)
    delta = hyper(batch["hyper_ids"], batch["hyper_pad"], x, batch["prompt"])
    logits = base(batch["ids"], batch["pad"], steer=M.Steer(L, delta, 1.0, batch["steer"]))
    sel = batch["labels"] != -100
    return F.cross_entropy(logits[sel].float(), batch["labels"][sel])


@torch.no_grad()
def evaluate(base, hyper, examples, cfg, amp, unsteered=None):
    """Mean loss over the first eval_batches batches: steered; steered with Δ from another concept's
    steering prompt (if that is as good, Δ learned the task, not the concept); unsteered (strength 0).
    The frozen base's unsteered loss never changes: pass an earlier evaluation's value to skip it."""
    half = len(examples) // 2  # rows are grouped by concept: half a split away is another concept
    other = [replace(e, hyper_ids=o.hyper_ids) for e, o in zip(examples, examples[half:] + examples[:half])]
    losses = {"steered": [], "other_concept": [], "unsteered": []}
    for i in range(0, min(len(examples), cfg.eval_batches * cfg.batch_size), cfg.batch_size):  # fixed order
        batch = {k: v.to(cfg.device) for k, v in data.collate(examples[i:i + cfg.batch_size]).items()}
        swapped = {k: v.to(cfg.device) for k, v in data.collate(other[i:i + cfg.batch_size]).items()}
        with amp():
            losses["steered"].append(steered_loss(base, hyper, batch).item())
            losses["other_concept"].append(steered_loss(base, hyper, swapped).item())
            if unsteered is None:
                losses["unsteered"].append(steered_loss(base, hyper, batch, strength=0.0).item())
    means = {k: sum(v) / max(len(v), 1) for k, v in losses.items()}
    return {**means, "unsteered": means["unsteered"] if unsteered is None else unsteered}


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, hyper, opt, step, cfg):
    """Hypernetwork + AdamW state + step in one safetensors file, written atomically (temp file, then
    rename), so an interruption never leaves a half-written checkpoint."""
    tensors = {k: v.detach().contiguous() for k, v in hyper.state_dict().items()}
    names = {p: n for n, p in hyper.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            tensors[f"optim.{names[p]}.{k}"] = v.detach().reshape(-1).clone() if k == "step" else v.contiguous()
    meta = {"step": str(step), "train_config": json.dumps(asdict(cfg)),
            "hyper_config": json.dumps(asdict(hyper.hcfg)), "base_config": json.dumps(asdict(hyper.base_cfg))}
    tmp = Path(f"{path}.tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path, hyper, opt):
    """Restore hypernetwork and optimizer from save_checkpoint's file; returns the step."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: corrupted or unreadable checkpoint ({str(e).splitlines()[0][:120]})") from None
    if "step" not in meta or json.loads(meta.get("base_config", "{}")) != asdict(hyper.base_cfg):
        raise ValueError(f"{path}: checkpoint is for another base model or not a train.py checkpoint")
    if json.loads(meta["hyper_config"]) != asdict(hyper.hcfg):
        raise ValueError(f"{path}: checkpoint hypernetwork config {meta['hyper_config']} differs from this run's")
    dev = next(hyper.parameters()).device
    hyper.load_state_dict({k: v.to(dev) for k, v in tensors.items() if not k.startswith("optim.")}, strict=True)
    by_name = dict(hyper.named_parameters())
    for key, v in tensors.items():
        if key.startswith("optim."):
            name, k = key[len("optim."):].rsplit(".", 1)
            opt.state[by_name[name]][k] = v.reshape(()) if k == "step" else v.to(dev)
    return int(meta["step"])


# ----------------------------------------------------------------------------- the loop

def load_data(cfg):
    if ":" in cfg.data and not Path(cfg.data).exists():
        name, path = cfg.data.split(":", 1)
        return data.read_rows(data.download_axbench(name, path, cfg.data_revision))
    return data.read_rows(cfg.data)


def split_rows(cfg, rows):
    """(train, held-in, held-out) positive rows of the run: the one split every script rebuilds."""
    rows = data.positives(rows)
    held_out = cfg.held_out if cfg.held_out < 1 else cfg.held_out / len({r["concept_id"] for r in rows})
    return data.split_concepts(rows, held_out, cfg.seed, cfg.eval_rows)


def hypernet_and_optimizer(base, cfg):
    """The hypernetwork in fp32 (master weights, SPEC §5) on the base's device, its trainable
    parameters, and their AdamW (one tensor at a time: no foreach copies of 2.6B parameters)."""
    hcfg = H.HyperConfig(cfg.variant, cfg.n_blocks, cfg.layer, cfg.random_init, cfg.freeze_embeddings)
    hyper = H.HyperSteer.from_base(base, hcfg).train()   # built in fp32 (the default dtype), base weights copied in
    trainable = [p for p in hyper.parameters() if p.requires_grad]
    return hyper, trainable, torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def train(cfg, resume=False, two_pass=False):
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    train_rows, in_rows, out_rows = split_rows(cfg, load_data(cfg))   # bad data fails before the model loads
    out.mkdir(parents=True, exist_ok=True)
    cuda = cfg.device.startswith("cuda")
    bf16 = cfg.bf16 == "yes" or (cfg.bf16 == "auto" and cuda)
    # fp32 master weights and AdamW state; with bf16 (default on CUDA) the frozen base is bf16 and the
    # forward runs under bf16 autocast (SPEC §5).
    base, tok = M.load(cfg.model, cfg.device, torch.bfloat16 if bf16 else torch.float32)
    hyper, trainable, opt = hypernet_and_optimizer(base, cfg)
    amp = (lambda: torch.autocast(cfg.device.split(":")[0], torch.bfloat16)) if bf16 else contextlib.nullcontext

    make = lambda rs: data.encode(tok, rs, lambda t, c, i: H.hyper_input(t, c, i, cfg.variant), cfg.max_len)
    train_ex, in_ex, out_ex = make(train_rows), make(in_rows), make(out_rows)
    per_epoch = max(1, math.ceil(len(train_ex) / cfg.batch_size) // cfg.grad_accum)
    total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)

    n_train = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in hyper.parameters()) - n_train
    n_base = sum(p.numel() for p in base.parameters())
    est = (n_base * (2 if bf16 else 4) + (n_train + n_frozen) * 4 + n_train * 12) / 2**30
    print(f"base {cfg.model}: {n_base / 1e6:.1f}M frozen parameters ({'bf16' if bf16 else 'fp32'}) on {cfg.device}")
    print(f"hypernet {cfg.variant}, N={cfg.n_blocks}, layer {cfg.layer}: {n_train / 1e6:.1f}M trainable, "
          f"{n_frozen / 1e6:.1f}M frozen; weights + AdamW ~{est:.1f} GiB before activations (--trace-memory for the peak)")
    print(f"data: {len(train_ex)} train examples ({len({e.concept_id for e in train_ex})} concepts), "
          f"{len(in_ex)} held-in eval, {len(out_ex)} held-out eval ({len({e.concept_id for e in out_ex})} concepts); "
          f"{total} steps of {cfg.batch_size * cfg.grad_accum} examples")

    ckpt, step = out / "checkpoint.safetensors", 0
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: nothing to resume")
        step = load_checkpoint(ckpt, hyper, opt)
        print(f"resumed from {ckpt} at step {step}")
        if (out / "metrics.jsonl").exists():  # drop records of steps after the checkpoint: they are redone
            kept = [l for l in open(out / "metrics.jsonl") if json.loads(l)["step"] <= step]
            (out / "metrics.jsonl").write_text("".join(kept))
    log = open(out / "metrics.jsonl", "a")

    def save():
        save_checkpoint(ckpt, hyper, opt, step, cfg)
        H.save(hyper, out / "hypernet.safetensors", {"step": str(step), "train_config": json.dumps(asdict(cfg))})

    stop = {"now": False}
    old_handler = signal.signal(signal.SIGINT, lambda *a: stop.update(now=True))  # Ctrl-C: finish the step, save, exit
    bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)
    t0, tokens, orders, unsteered = time.time(), 0, {}, {}
    try:
        while step < total and not stop["now"]:
            epoch, first = step // per_epoch, (step % per_epoch) * cfg.grad_accum
            if epoch not in orders:  # the epoch's fixed order: a resumed run continues it exactly
                orders = {epoch: data.epoch_order(len(train_ex), cfg.seed, epoch)}
            micro = [data.collate([train_ex[j] for j in orders[epoch][i * cfg.batch_size:(i + 1) * cfg.batch_size]])
                     for i in range(first, first + cfg.grad_accum)]
            lr = cfg.lr * (1 - step / total)                                   # linear decay, no warmup
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for batch in micro:
                batch = {k: v.to(cfg.device) for k, v in batch.items()}
                with amp():
                    loss = (two_pass_loss if two_pass else steered_loss)(base, hyper, batch) / len(micro)
                loss.backward()
                loss_sum += loss.item()
                tokens += int(batch["pad"].sum())
            if not math.isfinite(loss_sum):
                where = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint written yet"
                raise SystemExit(f"loss is {loss_sum} at step {step}: stopping; {where}")
            gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            rec = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": gnorm,
                   "tokens_per_s": tokens / (time.time() - t0)}
            if cuda:
                rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", **({"mem": f"{rec['peak_mem_gib']:.1f}G"} if cuda else {}))
            if step % cfg.eval_every == 0 or step == total:
                hyper.eval()
                report = []
                for name, ex in (("held_in", in_ex), ("held_out", out_ex)):
                    if ex:
                        res = evaluate(base, hyper, ex, cfg, amp, unsteered.get(name))
                        unsteered[name] = res["unsteered"]
                        rec.update({f"{name}_{k}": v for k, v in res.items()})
                        report.append(f"{name.replace('_', '-')} {rec[f'{name}_steered']:.3f} (other concept "
                                      f"{rec[f'{name}_other_concept']:.3f}, unsteered {rec[f'{name}_unsteered']:.3f})")
                hyper.train()
                if report:
                    bar.write(f"step {step} eval loss: " + "; ".join(report))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % cfg.save_every == 0 or step == total or stop["now"]:
                save()
    finally:  # also on a NaN stop or an error: the Ctrl-C handler must not outlive the run
        bar.close()
        log.close()
        signal.signal(signal.SIGINT, old_handler)
    if stop["now"]:
        save()
        sys.exit(f"interrupted at step {step}: saved {ckpt}; continue with --resume")
    plot(out)
    return base, tok, hyper, in_rows, out_rows


def plot(out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    plt.figure(figsize=(6, 3.5))
    plt.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=0.8, label="train")
    for k in ("held_in_steered", "held_out_steered", "held_in_unsteered"):
        ev = [r for r in recs if k in r]
        plt.plot([r["step"] for r in ev], [r[k] for r in ev], "o-", label=k.replace("_", " "))
    plt.xlabel("step"), plt.ylabel("cross-entropy"), plt.legend(), plt.tight_layout()
    plt.savefig(out / "loss.png", dpi=120)


def show_samples(base, tok, hyper, rows, n, title):
    """A few steered generations next to the unsteered ones (greedy, so readers can reproduce them)."""
    seen, picked = set(), []
    for r in rows:
        if r["concept_id"] not in seen:
            seen.add(r["concept_id"])
            picked.append(r)
    for r in picked[:n]:
        ids, n_prefix = tok.chat(r["input"])
        delta = H.deltas(base, tok, hyper, r["output_concept"], [r["input"]])             # (1, d)
        plain = M.generate(base, [ids], 48)[0]
        steered = M.generate(base, [ids], 48, steer=M.Steer(hyper.hcfg.layer, delta, 1.0), steer_from=[n_prefix])[0]
        print(f"\n[{title}] concept: {r['output_concept']}\nprompt:    {r['input']}\n"
              f"unsteered: {tok.decode(plain)!r}\nsteered:   {tok.decode(steered)!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper-2b", choices=list(PRESETS), help="starting settings")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    ap.add_argument("--two-pass", action="store_true", help="run the base twice per step (speed comparison only)")
    ap.add_argument("--trace-memory", action="store_true",
                    help="print a step's peak memory and FLOPs at this run's shapes, traced on fake tensors (no "
                         "GPU or weights needed; rows max-len long, a quarter prompt; bf16 auto = as on CUDA), then exit")
    # Each field's flag takes its help text from the comment beside it in TrainConfig.
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(TrainConfig), re.M))
    for f in fields(TrainConfig):
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes")}.get(f.type, f.type)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, metavar=f.type.__name__.upper(),
                        help=comments[f.name])
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    cfg = type(cfg)(**{**asdict(cfg), **{k: v for k, v in vars(args).items() if k in asdict(cfg) and v is not None}})
    try:
        if args.trace_memory:
            import bench
            return bench.print_train_memory(cfg, cfg.max_len // 4)
        base, tok, hyper, in_rows, out_rows = train(cfg, args.resume, args.two_pass)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    hyper.eval()
    last = [json.loads(l) for l in open(Path(cfg.out) / "metrics.jsonl")][-1]
    print(f"\nevaluation loss after {last['step']} steps (token-mean cross-entropy on the reference outputs):")
    print(f"{'':10}{'steered':>9}{'other concept':>15}{'unsteered':>11}")
    for name in ("held_in", "held_out"):
        if f"{name}_steered" in last:
            print(f"{name.replace('_', '-'):10}{last[name + '_steered']:9.3f}{last[name + '_other_concept']:15.3f}"
                  f"{last[name + '_unsteered']:11.3f}")
    print(f"checkpoint: {Path(cfg.out) / 'hypernet.safetensors'}")
    show_samples(base, tok, hyper, in_rows, cfg.samples // 2, "held-in")
    show_samples(base, tok, hyper, out_rows, cfg.samples - cfg.samples // 2, "held-out")


if __name__ == "__main__":
    main()
