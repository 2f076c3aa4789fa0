"""Train a HyperSteer hypernetwork with the LM cross-entropy of the steered base model (paper §3-4,
Eq. 4; SPEC §5). The base model is frozen; only the hypernetwork learns.

    python train.py --preset demo       # offline: gemma-3-270m + bundled demo concepts, CPU, < 10 min
    python train.py                     # the paper's Gemma-2-2b cross-attention run (one 80 GB GPU)
    python train.py --preset demo --max-steps 20 --eval-batches 1 --samples 0 --out runs/smoke   # 1 minute
    torchrun --nproc-per-node 8 train.py                # 8 GPUs (DDP); --fsdp shards the hypernetwork (dist.py)

Read top to bottom: the config, the loss (one step's maths), setup, one optimizer step, the loop, the
command line; the evaluation and the final report are report.py's, checkpoints checkpoint.py's. One step
(SPEC §5 compute structure): the base residual h_L at the steering layer over prompt + output, once,
without gradients; Δ = H(s, X = h_L over the prompt); the steered pass runs only blocks L+1.. from
h_L + Δ; the loss reaches H through Δ alone. Under torchrun every process takes its slice of each
optimizer step's examples (train_step).
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
import dist
import fileio
import hypernet as H
import loader
import model as M
import report


def flag(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = flag("google/gemma-2-2b-it", "base model: local folder or hub repo id")
    data: str = flag("concept16k:2b/l20/train/data.parquet", 'AxBench "dataset:path", or a local .parquet/.jsonl')
    data_revision: str = flag("main", "hub revision (branch, tag or commit) the data is pinned to")
    held_in_concepts: str = flag("", "metadata.jsonl (local or dataset:path) of the concepts evaluated held-in and "
                                     "never held out (paper: Concept500's list, SPEC §5); empty = every trained concept")
    variant: str = flag("cross_attention", "hypernetwork: no_context | in_context | cross_attention")
    n_blocks: int = flag(22, "hypernetwork depth N (paper Table 3: 22 for 2b cross attention)")
    layer: int = flag(20, "steering layer L: Δ is added to the output of block L (SPEC §4)")
    random_init: bool = flag(False, "fresh hypernetwork weights instead of the base's (paper Table 2 ablation)")
    unit_norm: bool = flag(False, "no context: unit-norm Δ scaled by its max activation on the prompt (App. A.4)")
    freeze_embeddings: bool = flag(False, "keep the hypernetwork's embeddings fixed (CPU demos, memory)")
    batch_size: int = flag(12, "examples per micro-batch and process (paper 2b: 12)")
    grad_accum: int = flag(1, "micro-batches per optimizer step and process (a step: batch x accum x processes)")
    lr: float = flag(8e-5, "peak learning rate, decayed linearly to 0 (paper 2b: 8e-5)")
    weight_decay: float = flag(0.0, "AdamW weight decay (paper: 0)")
    epochs: float = flag(3.0, "passes over the training rows (fractions allowed)")
    max_steps: int = flag(0, "stop after this many optimizer steps (0 = epochs decide)")
    clip: float = flag(1.0, "gradient-norm clip")
    max_len: int = flag(256, "prompt + output tokens per example")
    held_out_concepts: int = flag(500, "concepts removed from training for held-out evaluation")
    held_out_fraction: float = flag(0.0, "if > 0: this fraction of the concepts is held out instead")
    held_out_ids: str = flag("", "comma-separated concept ids to hold out instead (the demo's fixed choice)")
    eval_rows: int = flag(2, "rows per trained concept kept from training for held-in evaluation")
    eval_every: int = flag(500, "steps between evaluations")
    eval_batches: int = flag(20, "batches per split per evaluation")
    save_every: int = flag(500, "steps between checkpoints")
    samples: int = flag(1, "1 = finish with the report's generations (strength sweep, concept-mention rate); 0 = none")
    keywords: str = flag("", "JSON of keywords per concept for the final report's concept-mention rate "
                             "(never used in training); empty = no mention rate")
    out: str = flag("runs/paper-2b", "folder for checkpoints, metrics.jsonl, loss.png")
    bf16: str = flag("auto", "frozen base in bf16 + bf16 autocast: yes | no | auto (= on cuda and on CPUs with "
                             "native bf16 units)")
    seed: int = flag(0, "data order, held-out split and init seed")
    device: str = flag("cuda" if torch.cuda.is_available() else "cpu", "cpu or cuda")
    fsdp: bool = flag(False, "under torchrun: shard the hypernetwork, its gradients and AdamW state (FSDP2) "
                             "instead of a whole copy per process (DDP)")


PAPER_2B = dict(held_in_concepts="concept500:2b/l20/train/data.parquet")    # held-in = Concept500's list (SPEC §5)
PAPER_9B = dict(model="google/gemma-2-9b-it", data="concept16k:9b/l20/train/data.parquet", lr=5e-6,
                held_in_concepts="concept500:9b/l20/train/data.parquet")
PRESETS = {  # paper Table 3 (SPEC §3); `demo` is the offline CPU main job
    "paper-2b": TrainConfig(**PAPER_2B),
    "paper-2b-in-context": TrainConfig(**PAPER_2B, variant="in_context", n_blocks=26, batch_size=6, out="runs/paper-2b-ic"),
    "paper-2b-no-context": TrainConfig(**PAPER_2B, variant="no_context", n_blocks=26, batch_size=6, out="runs/paper-2b-nc"),
    "paper-9b": TrainConfig(**PAPER_9B, n_blocks=34, batch_size=4, out="runs/paper-9b"),
    "paper-9b-in-context": TrainConfig(**PAPER_9B, variant="in_context", n_blocks=42, batch_size=6,
                                       out="runs/paper-9b-ic"),
    "paper-9b-no-context": TrainConfig(**PAPER_9B, variant="no_context", n_blocks=42, batch_size=6,
                                       out="runs/paper-9b-nc"),
    "demo": TrainConfig(**data.DEMO_RUN, n_blocks=2, freeze_embeddings=True, batch_size=4, lr=3e-3, epochs=1.25,
                        max_len=96, eval_every=80, eval_batches=16, save_every=80, keywords=str(data.DEMO_KEYWORDS),
                        out="runs/demo", device="cpu"),
}


def check_config(cfg):
    """Bad values fail here, before any work, with the flag's name."""
    for k in ("batch_size", "grad_accum", "lr", "epochs", "clip", "eval_every", "eval_batches", "save_every",
              "n_blocks"):
        if not math.isfinite(getattr(cfg, k)) or getattr(cfg, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(cfg, k)}")
    for k in ("max_steps", "held_out_concepts", "eval_rows", "samples", "weight_decay"):
        if not math.isfinite(getattr(cfg, k)) or getattr(cfg, k) < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(cfg, k)}")
    if not 0 <= cfg.held_out_fraction < 1:
        raise ValueError(f"--held-out-fraction must be in [0, 1), got {cfg.held_out_fraction}")
    if cfg.max_len < 8:
        raise ValueError(f"--max-len must be at least 8 tokens, got {cfg.max_len}")
    if cfg.bf16 not in ("yes", "no", "auto"):
        raise ValueError(f"--bf16 must be yes, no or auto, got {cfg.bf16!r}")
    H.HyperConfig(cfg.variant, cfg.n_blocks, cfg.layer)        # names a bad --variant


# ----------------------------------------------------------------------------- the loss (Eq. 4)

def steered_loss(base, hyper, batch, strength=1.0):
    """Token-mean cross-entropy of the steered base model on the output tokens (Eq. 4)."""
    L = base.layer_index(hyper.hcfg.layer)
    with torch.no_grad():
        h = base.residual(batch.ids, batch.real, L)                           # (B, T, d), no gradients
    delta = hyper(batch.hyper_ids, batch.hyper_real, h, batch.x_mask, batch.x_mask & batch.steer)  # Eq. 2-3: Δ (B, d)
    h = M.intervene(h, delta, strength, batch.steer)                          # Eq. 1: h_L + strength * Δ
    out = base.run_from(h, L, batch.real)                                     # blocks L+1.. only
    sel = batch.labels != -100
    logits = base.head(out[sel])                                              # logits only where labelled
    return F.cross_entropy(logits.float(), batch.labels[sel])


def two_pass_loss(base, hyper, batch):
    """The public code's structure, kept for the speed comparison only: the base runs once for X and
    again, whole and with gradients through every block, for the steered output."""
    L = base.layer_index(hyper.hcfg.layer)
    with torch.no_grad():
        x = base.residual(batch.ids, batch.real, L)
    delta = hyper(batch.hyper_ids, batch.hyper_real, x, batch.x_mask, batch.x_mask & batch.steer)
    logits = base(batch.ids, batch.real, steering=M.Steering.vector(L, delta), steer_mask=batch.steer)
    sel = batch.labels != -100
    return F.cross_entropy(logits[sel].float(), batch.labels[sel])


# ----------------------------------------------------------------------------- setup

def hypernet_and_optimizer(base, cfg):
    """The hypernetwork in fp32 (master weights, SPEC §5) on the base's device, the module the training
    forward runs (itself, or under torchrun its DDP / FSDP2 form, dist.wrap), its trainable parameters,
    and their AdamW (one tensor at a time: no foreach copies of 2.6B parameters)."""
    hcfg = H.HyperConfig(cfg.variant, cfg.n_blocks, cfg.layer, cfg.random_init, cfg.unit_norm, cfg.freeze_embeddings)
    hyper = H.HyperSteer.from_base(base, hcfg).train()   # built in fp32 (the default dtype), base weights copied in
    model = dist.wrap(hyper, cfg.fsdp)                   # FSDP2 shards `hyper` in place: build AdamW after
    trainable = [p for p in hyper.parameters() if p.requires_grad]
    return hyper, model, trainable, torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                      foreach=False)


@dataclass
class Run:
    """Everything the loop needs, built once by setup()."""
    cfg: TrainConfig
    base: M.Gemma
    tok: loader.Tokenizer
    hyper: H.HyperSteer
    model: torch.nn.Module      # what the training forward runs: hyper, or its DDP wrapper (dist.wrap)
    trainable: list
    opt: torch.optim.Optimizer
    amp: object                 # a context manager factory: bf16 autocast or nothing
    train_ex: list              # data.Examples
    held_in: list
    held_out: list
    rows: dict                  # {"held_in": rows, "held_out": rows}, for the report
    steps_per_epoch: int
    total: int                  # optimizer steps of the whole run


def use_bf16(cfg):
    """--bf16 auto: on CUDA, and on CPUs with native bf16 matrix units (AVX512-BF16 or AMX), where bf16 matrix
    products run faster than fp32 (measured 1.4x faster on the demo, README)."""
    if cfg.bf16 != "auto":
        return cfg.bf16 == "yes"
    if cfg.device != "cpu":
        return cfg.device.startswith("cuda")
    try:
        cpu_flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags


def setup(cfg):
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    train_rows, in_rows, out_rows = data.split_run(data.load_rows(cfg.data, cfg.data_revision), cfg)  # before the model
    bf16 = use_bf16(cfg)
    # fp32 master weights and AdamW state; with bf16 (default on CUDA) the frozen base is bf16 and the
    # forward runs under bf16 autocast (SPEC §5).
    base, tok = loader.load(cfg.model, cfg.device, torch.bfloat16 if bf16 else torch.float32)
    if cfg.max_len > base.cfg.max_position_embeddings:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the model's context of {base.cfg.max_position_embeddings}")
    hyper, model, trainable, opt = hypernet_and_optimizer(base, cfg)
    amp = (lambda: torch.autocast(cfg.device.split(":")[0], torch.bfloat16)) if bf16 else contextlib.nullcontext
    make = lambda rs: data.encode(tok, rs, cfg.max_len, cfg.variant)
    train_ex, in_ex, out_ex = make(train_rows), make(in_rows), make(out_rows)
    if not train_ex:
        raise ValueError(f"{cfg.data}: no training examples left after the split and --max-len {cfg.max_len}")
    world = dist.world_size()
    per_epoch = max(1, math.ceil(len(train_ex) / cfg.batch_size) // (cfg.grad_accum * world))
    total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    run = Run(cfg, base, tok, hyper, model, trainable, opt, amp, train_ex, in_ex, out_ex,
              {"held_in": in_rows, "held_out": out_rows}, per_epoch, total)
    report.print_setup(run, bf16)             # parameters, dtype, device, memory, data, steps
    return run


# ----------------------------------------------------------------------------- one optimizer step

def train_step(run, step, loss_fn=steered_loss):
    """One clipped AdamW step at the linearly decayed lr over the next grad_accum x processes micro-batches
    of the epoch's fixed order (a resumed run continues it exactly); process r takes grad_accum of them,
    the r-th group. The loss is the token-mean over all of them: each micro-batch's mean weighs by its
    share of the step's labelled tokens, so W processes at batch B take the steps of one process at batch
    W x B (or at B with grad_accum x W). Returns the step's record."""
    cfg, world = run.cfg, dist.world_size()
    epoch, step_in_epoch = step // run.steps_per_epoch, step % run.steps_per_epoch
    first = (step_in_epoch * world + dist.rank()) * cfg.grad_accum          # this process's first micro-batch
    order = data.epoch_order(len(run.train_ex), cfg.seed, epoch)
    lr = cfg.lr * (1 - step / run.total)                                       # linear decay, no warmup
    for g in run.opt.param_groups:
        g["lr"] = lr
    batches = [data.collate([run.train_ex[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]])
               for i in range(first, first + cfg.grad_accum)]
    labelled = [int((b.labels != -100).sum()) for b in batches]
    step_labelled, = dist.sum_over_ranks(sum(labelled))                        # every process's micro-batches
    loss_sum, tokens = 0.0, 0
    for batch, n in zip(batches, labelled):
        batch = batch.to(cfg.device)
        with run.amp():
            loss = loss_fn(run.base, run.model, batch) * (n / step_labelled)  # its share of the token-mean
        (loss * world).backward()                     # DDP / FSDP average gradients over processes: undo the 1/W
        loss_sum += loss.item()
        tokens += int(batch.real.sum())
    loss_sum, tokens = dist.sum_over_ranks(loss_sum, tokens)                   # the whole step's, on every process
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"loss is {loss_sum}")
    gnorm = dist.item(torch.nn.utils.clip_grad_norm_(run.trainable, cfg.clip))
    if not math.isfinite(gnorm):
        raise FloatingPointError(f"gradient norm is {gnorm}")
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": gnorm, "tokens": int(tokens)}


# ----------------------------------------------------------------------------- the loop

def train(cfg, resume=False, overwrite=False, two_pass=False):
    """The run. Under torchrun (dist.start first) every process runs all of it, in step: metrics, progress
    bar, plot and files come from rank 0; a stop (Ctrl-C or a non-finite value) in one process stops all."""
    run = setup(cfg)
    out = Path(cfg.out)
    step = checkpoint.start_or_resume(run, out, resume, overwrite)
    ckpt = out / "checkpoint.safetensors"

    stop, stopping = {"now": False}, False
    old_handler = signal.signal(signal.SIGINT, lambda *a: stop.update(now=True))  # Ctrl-C: finish the step, save, exit
    bar = tqdm(total=run.total, initial=step, desc="train", dynamic_ncols=True, disable=not dist.is_main())
    log = open(out / "metrics.jsonl" if dist.is_main() else os.devnull, "a")
    t0, tokens, unsteered = time.time(), 0, {}
    try:
        while step < run.total and not stopping:
            error = None
            try:
                rec = train_step(run, step, two_pass_loss if two_pass else steered_loss)
                checkpoint.check_weights(run.hyper)
            except FloatingPointError as e:   # nothing of this step is saved
                error = e
            stopping, failed = dist.any_rank(stop["now"], error is not None)   # every process stops together
            if failed:
                where = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written"
                raise SystemExit(f"{error or 'non-finite values in another process'} at step {step}: stopping; "
                                 f"{where}; try a lower --lr")
            step, tokens = rec["step"], tokens + rec.pop("tokens")
            rec["tokens_per_s"] = tokens / (time.time() - t0)
            if cfg.device.startswith("cuda"):
                rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", **({"mem": f"{rec['peak_mem_gib']:.1f}G"} if "peak_mem_gib" in rec else {}))
            if step % cfg.eval_every == 0 or step == run.total:
                evals, line = report.evaluate_splits(run, steered_loss, unsteered)
                rec.update(evals)
                if line:
                    bar.write(f"step {step} eval loss: {line}")
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % cfg.save_every == 0 or step == run.total or stopping:
                checkpoint.save(run, step)
    finally:  # also on a NaN stop or an error: the Ctrl-C handler must not outlive the run
        bar.close()
        log.close()
        signal.signal(signal.SIGINT, old_handler)
    dist.barrier()                                # rank 0 has written the last checkpoint and metrics
    if stopping:
        sys.exit(f"interrupted at step {step}: saved {ckpt}; continue with --resume")
    if cfg.samples:
        report.final_measurements(run, step)      # every process generates (FSDP2 gathers); rank 0 writes
        dist.barrier()                            # ... before any process reads metrics.jsonl for the report
    if dist.is_main():
        report.plot(out)
    return run


# ----------------------------------------------------------------------------- command line

def add_config_flags(ap):
    """--preset and one flag per TrainConfig field, its help from the field's metadata."""
    ap.add_argument("--preset", default="paper-2b", choices=list(PRESETS), help="starting settings")
    for f in fields(TrainConfig):
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes")}.get(f.type, f.type)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, metavar=f.type.__name__.upper(),
                        help=f.metadata["help"], **({"nargs": "?", "const": True} if f.type is bool else {}))


def config_from_args(args):
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    return replace(PRESETS[args.preset], **given)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    ap.add_argument("--overwrite", action="store_true", help="start over in an OUT that already holds a run")
    ap.add_argument("--two-pass", action="store_true", help="run the base twice per step (speed comparison only)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    add_config_flags(ap)
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    try:
        with fileio.one_line_errors(args.debug):
            cfg = replace(cfg, device=dist.start(cfg.device))      # torchrun: join the process group; else nothing
            with dist.only_main_prints():
                report.print_report(train(cfg, args.resume, args.overwrite, args.two_pass))
    finally:
        dist.stop()


if __name__ == "__main__":
    main()
