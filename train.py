"""Train a HyperSteer hypernetwork with the LM cross-entropy of the steered base model (paper §3-4,
Eq. 4; SPEC §5). The base model is frozen; only the hypernetwork learns.

    python train.py --preset demo       # offline: gemma-3-270m + bundled demo concepts, CPU, < 10 min
    python train.py                     # the paper's Gemma-2-2b cross-attention run (one 80 GB GPU)
    python train.py --dry-run           # its plan first: split, steps, traced GPU memory, time (no weights)
    python train.py --preset demo --max-steps 20 --eval-batches 1 --samples 0 --out runs/smoke   # 1 minute
    torchrun --nproc-per-node 8 train.py                # 8 GPUs (DDP); --fsdp shards the hypernetwork (lib/dist.py)

Read top to bottom: the config and its presets (paper Table 3), examples and batches, the loss (Eq. 4),
setup, one optimizer step, the loop, checkpoints (the file format is lib/checkpoint.py's), the command line,
then what a run reports (evaluation with the right-vs-wrong-concept gap, answers, loss.png). One step
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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import hypernet as H
import model as M
from lib import checkpoint, dist, fileio, loader, memory


def flag(default, help, choices=None):
    """A TrainConfig field and its command-line flag: the help text, and the allowed values when they are few."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    model: str = flag("google/gemma-2-2b-it", "base model: local folder or hub repo id")
    model_revision: str = flag("main", "hub revision (branch, tag or commit) of --model; resolved to a commit at start")
    data: str = flag("concept16k:2b/l20/train/data.parquet", 'AxBench "dataset:path", or a local .parquet/.jsonl')
    data_revision: str = flag("main", "hub revision (branch, tag or commit) the data is pinned to")
    held_in_concepts: str = flag("", "metadata.jsonl (local or dataset:path) of the concepts evaluated held-in and "
                                     "never held out (paper: Concept500's list, SPEC §5); empty = every trained concept")
    variant: str = flag("cross_attention", "hypernetwork variant (SPEC §3)", H.VARIANTS)
    n_blocks: int = flag(22, "hypernetwork depth N (paper Table 3: 22 for 2b cross attention)")
    layer: int = flag(20, "steering layer L: Δ is added to the output of block L (SPEC §4)")
    random_init: bool = flag(False, "fresh hypernetwork weights instead of the base's (paper Table 2 ablation)")
    unit_norm: bool = flag(False, "no context: unit-norm Δ scaled by its max activation on the prompt (App. A.4)")
    freeze_embeddings: bool = flag(False, "keep the hypernetwork's embeddings fixed (CPU demos, memory)")
    cache_residual: bool = flag(False, "compute each example's frozen base residual at the steering layer once and "
                                       "reuse it in every epoch and evaluation (SPEC §5; memory: tokens x d x 4 "
                                       "bytes, the demo's ~0.1 GB, not Concept16k's terabytes)")
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
    bf16: str = flag("auto", "frozen base in bf16 + bf16 autocast (auto = on cuda and on CPUs with native bf16 "
                             "units)", ("yes", "no", "auto"))
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
    # demo: 200 steps of 4 (128 to an epoch), rows cut to 64 tokens (the LM head over 262,144 tokens on every
    # labelled position is most of a CPU step: bench.py train-step), the base residual cached (SPEC §5), one
    # evaluation at the end. Where this departs from the paper's recipe, and why: docs/demo.md.
    "demo": TrainConfig(**data.DEMO_RUN, n_blocks=2, freeze_embeddings=True, batch_size=4, lr=3e-3, epochs=200 / 128,
                        max_len=64, cache_residual=True, eval_every=200, eval_batches=16, save_every=100,
                        keywords=str(data.DEMO_KEYWORDS), out="runs/demo", device="cpu"),
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
    for f in fields(cfg):                                      # what argparse's choices refuse on the command line
        if f.metadata["choices"] and getattr(cfg, f.name) not in f.metadata["choices"]:
            raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(f.metadata['choices'])}, "
                             f"got {getattr(cfg, f.name)!r}")


# ----------------------------------------------------------------------------- examples and batches (SPEC §4, §5)

@dataclass
class Example:
    ids: np.ndarray      # chat-templated prompt + raw output
    n_prompt: int        # prompt tokens (labels start after them)
    n_prefix: int        # chat-prefix tokens, never steered (SPEC §4)
    hyper_ids: np.ndarray  # what the hypernetwork reads (hypernet.hyper_input)
    concept: str
    concept_id: int


def encode(tok, rows, max_len=128, variant=None, quiet=False):
    """Rows -> Examples, truncating the output so prompt + output <= max_len tokens. Rows whose
    prompt alone leaves no room for an output token are dropped. Prints how many were cut.
    variant: the hypernetwork variant whose input each example carries (None: no hypernetwork)."""
    out, cut, dropped = [], 0, 0
    prompts = tok.chat_batch(r["input"] for r in rows)
    answers = tok.encode_batch((r["output"] for r in rows), bos=False)  # the raw output, no <end_of_turn> (SPEC §5)
    for r, prompt, answer in zip(rows, prompts, answers):
        room = max_len - len(prompt)
        if room < 1:
            dropped += 1
            continue
        cut += len(answer) > room
        # int32 arrays, not lists: Concept16k has ~1M rows, and a list of Python ints costs ~9x more
        out.append(Example(np.asarray(prompt + answer[:room], dtype=np.int32), len(prompt), tok.chat_prefix_len,
                           np.asarray(H.hyper_input(tok, r["output_concept"], r["input"], variant) if variant else [],
                                      dtype=np.int32),
                           r["output_concept"], r["concept_id"]))
    if (cut or dropped) and not quiet:
        print(f"tokenised {len(rows)} rows: {cut} outputs truncated to max_len {max_len}, {dropped} dropped")
    return out


@dataclass
class Batch:
    """Tensors of a batch, all (B, T) unless noted, left padded:

        ids      = <pad> <bos><start_of_turn>user\\n {input} <end_of_turn>\\n<start_of_turn>model\\n {output}
        real     =   0     1 .................................................................. 1
        labels   = -100 ............................................................. output ids (shifted)
        steer    =   0     0 0 0 0 (chat prefix) 1 ............................................ 1
        prompt   =   0     1 ........................................ 1   0 ............... 0
    """
    ids: torch.Tensor         # token ids
    real: torch.Tensor        # bool: True on real tokens, False on padding
    labels: torch.Tensor      # next-token targets: -100 except where the next token is an output token
    steer: torch.Tensor       # bool: where Δ is added, real tokens after the chat prefix (SPEC §4)
    prompt: torch.Tensor      # bool: the base prompt's real tokens, X for the cross-attention hypernetwork (never the output)
    hyper_ids: torch.Tensor   # (B, Ts) what the hypernetwork reads (hypernet.hyper_input)
    hyper_real: torch.Tensor  # (B, Ts) bool: True on its real tokens
    residual: torch.Tensor = None  # (B, T, d) the frozen base's residual at the steering layer, from a ResidualCache

    def to(self, device):
        return Batch(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


class ResidualCache:
    """SPEC §5: the frozen base's residual at the steering layer over an example's prompt + output is a pure
    function of the example (the base never changes), so it is computed once, the first time a batch needs
    it, and reused by every later epoch and evaluation (--cache-residual). Each example runs alone, without
    padding, so what is kept does not depend on the batch it first came in: a resumed run reads exactly what
    an uninterrupted one does. Keyed by the example's token ids."""

    def __init__(self, base, layer, amp=contextlib.nullcontext):
        self.base, self.layer, self.amp, self.saved = base, base.layer_index(layer), amp, {}

    @torch.no_grad()
    def get(self, example):
        """(n, d): the residual over the example's n tokens, computed the first time it is asked for."""
        key = example.ids.tobytes()
        if key not in self.saved:
            with self.amp():
                ids = torch.as_tensor(example.ids, dtype=torch.long, device=self.base.model.embed_tokens.weight.device)
                self.saved[key] = self.base.residual(ids[None], None, self.layer)[0]      # (1, n) -> (n, d)
        return self.saved[key]

    def __call__(self, examples, T):
        """(B, T, d): the examples' residuals, left padded with zeros to T tokens as collate pads their ids."""
        rows = [self.get(e) for e in examples]
        out = rows[0].new_zeros(len(rows), T, rows[0].shape[-1])                          # (B, T, d)
        for b, h in enumerate(rows):
            out[b, T - len(h):] = h
        return out


def collate(examples, pad_id=0, residuals=None):
    """A list of Examples -> a Batch; with a ResidualCache, the Batch carries the base residual too."""
    ids, real = M.left_pad([e.ids for e in examples], pad_id)
    T = ids.shape[1]
    idx = torch.arange(T)[None]
    start = torch.tensor([T - len(e.ids) for e in examples])[:, None]           # first real token
    n_prompt = torch.tensor([e.n_prompt for e in examples])[:, None]
    n_prefix = torch.tensor([e.n_prefix for e in examples])[:, None]
    labels = torch.full_like(ids, -100)
    predicts = (idx >= start + n_prompt - 1) & (idx < T - 1)                    # positions predicting output
    labels[:, :-1] = torch.where(predicts[:, :-1], ids[:, 1:], -100)
    hyper_ids, hyper_real = M.left_pad([e.hyper_ids for e in examples], pad_id)
    return Batch(ids=ids, real=real, labels=labels, steer=idx >= start + n_prefix,
                 prompt=real & (idx < start + n_prompt), hyper_ids=hyper_ids, hyper_real=hyper_real,
                 residual=None if residuals is None else residuals(examples, T))


def epoch_order(n, seed, epoch):
    """The epoch's example order: a permutation seeded by (seed, epoch), so a resumed run sees
    exactly the batches an uninterrupted one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def batches(examples, batch_size, seed, epoch, pad_id=0):
    """The epoch's batches, collated one at a time."""
    order = epoch_order(len(examples), seed, epoch)
    for i in range(0, len(order), batch_size):
        yield collate([examples[j] for j in order[i:i + batch_size]], pad_id)


# ----------------------------------------------------------------------------- the loss (Eq. 4)

def steered_loss(base, hyper, batch, layer, strength=1.0):
    """Token-mean cross-entropy of the steered base model on the output tokens (Eq. 4). `hyper` is the
    hypernetwork, or under torchrun its DDP / FSDP2 form; `layer` the steering layer (SPEC §4). A batch
    collated with a ResidualCache (of this layer) brings the base residual along; else it is computed here."""
    L = base.layer_index(layer)
    h = batch.residual
    if h is None:
        with torch.no_grad():
            h = base.residual(batch.ids, batch.real, L)                       # (B, T, d), no gradients
    delta = H.steering_delta(hyper, batch.hyper_ids, batch.hyper_real, h, batch.prompt,
                             batch.prompt & batch.steer)                      # Eq. 2-3: Δ (B, d)
    h = M.intervene(h, delta, strength, batch.steer)                          # Eq. 1: h_L + strength * Δ
    out = base.run_from(h, L, batch.real)                                     # blocks L+1.. only
    sel = batch.labels != -100
    logits = base.head(out[sel])                                              # logits only where labelled
    return F.cross_entropy(logits.float(), batch.labels[sel])


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
    train_ex: list              # Examples
    held_in: list
    held_out: list
    rows: dict                  # {"held_in": rows, "held_out": rows}, for the report
    steps_per_epoch: int
    total: int                  # optimizer steps of the whole run
    commits: dict               # {"model", "data", ...: the hub commit, None for a local file} (fetch_sources)
    residuals: "ResidualCache" = None   # with --cache-residual: every batch collated with it (SPEC §5)
    started: float = 0.0        # time.time() when setup began, for the report's wall clock
    build_s: float = 0.0        # seconds spent building (offline model) or downloading the weights, left out of it


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


# ----------------------------------------------------------------------------- sources, the plan (--dry-run), the GPU check

def fetch_sources(cfg, weights=True):
    """The run's model folder and data files: local paths as they are, hub ids through the Hugging Face cache
    (loader.model_folder, data.fetch_file), each hub revision resolved to the commit it names now (None for
    a local file). The commits are printed here and recorded in every checkpoint; --resume refuses others."""
    folder = loader.model_folder(cfg.model, cfg.model_revision, weights)
    files = {"model": folder, "data": data.fetch_file(cfg.data, cfg.data_revision)}
    if cfg.held_in_concepts:
        files["held_in_concepts"] = data.fetch_file(cfg.held_in_concepts, cfg.data_revision)
    commits = {k: loader.hub_commit(f) for k, f in files.items()}
    given = {"model": (cfg.model, cfg.model_revision), "data": (cfg.data, cfg.data_revision),
             "held_in_concepts": (cfg.held_in_concepts, cfg.data_revision)}
    for k, commit in commits.items():
        if commit:                                          # hub files only (the offline demo has none)
            print(f"{k}: {given[k][0]} at {given[k][1]} = commit {commit}")
    return folder, files, commits


def run_steps(n_examples, cfg, world):
    """(optimizer steps per epoch, steps of the run): an epoch's micro-batches, grad_accum x processes a step."""
    per_epoch = max(1, math.ceil(n_examples / cfg.batch_size) // (cfg.grad_accum * world))
    return per_epoch, cfg.max_steps or math.ceil(cfg.epochs * per_epoch)


MFU = 0.40                          # model-FLOPs utilisation the dry run's time estimate assumes
CUDA_EXTRA = 2**30                  # beyond the traced peak: the CUDA context (~0.5 GiB) and the allocator's rounding
REFERENCE_GPU = ("an 80 GB H100", 80e9, 989e12)   # planned for where no GPU is found: memory, dense bf16 FLOP/s


def gib(nbytes):
    return nbytes / 2**30


def synthetic_examples(n, vocab, max_len, prompt_tokens, seed=0):
    """n AxBench-shaped training Examples of random tokens: max_len tokens of which prompt_tokens prompt
    (4 of them the chat prefix), and a 12-token steering prompt for the hypernetwork."""
    g = torch.Generator().manual_seed(seed)
    return [Example(torch.randint(3, vocab, (max_len,), generator=g).int().numpy(), prompt_tokens, 4,
                    torch.randint(3, vocab, (12,), generator=g).int().numpy(), "a concept", i) for i in range(n)]


def traced_memory(cfg, base_cfg, prompt_tokens=None, fake=True, steps=2, loss_fn=None):
    """Live tensor bytes over `steps` steps of this file's loop (loss_fn, default steered_loss; backward, clip,
    AdamW) at cfg's shapes, every row max_len tokens with `prompt_tokens` of prompt (default a quarter), traced
    by lib/memory.py on fake tensors: no GPU and no weights (~15 s on a CPU; `python bench.py memory` prints it).
    The base is bf16 with bf16 autocast unless cfg.bf16 == "no", as a run on CUDA; autocast is traced as CPU
    autocast, which casts the same matrix products. Returns {"weights", "after_step", "peak"} in bytes and
    "flops", the floating-point operations of one step's forward and backward (matrix products); for
    fsdp_memory, bytes of "base" and "hyper" weights, "adam" state, "grads_at_peak", and "units", the
    hypernetwork's FSDP2 units (dist.wrap: the embeddings, one block, the rest)."""
    prompt_tokens = cfg.max_len // 4 if prompt_tokens is None else prompt_tokens
    loss_fn = loss_fn or steered_loss
    batch = collate(synthetic_examples(cfg.batch_size, base_cfg.vocab_size, cfg.max_len, prompt_tokens))
    selected = int((batch.labels != -100).sum())
    bf16 = cfg.bf16 != "no"
    mode = memory.tensor_mode(fake)
    with mode:
        if fake:
            batch = Batch(**{k: mode.from_tensor(v) for k, v in vars(batch).items() if v is not None})
        torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)   # a fake module cannot be cast
        try:
            base = M.Gemma(base_cfg).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(torch.float32)
        hyper, _, trainable, opt = hypernet_and_optimizer(base, cfg)

        def forward_backward():
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = loss_fn(base, hyper, batch, cfg.layer)
            loss.backward()
            return loss

        def update():
            torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        inputs = [v for v in vars(batch).values() if v is not None]             # Batch.residual is None here
        traced = memory.trace_steps([*base.parameters(), *hyper.parameters(), *inputs],
                                    forward_backward, update, steps, selected, trainable)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    units = {"embeddings": size(hyper.embed_tokens), "block": max(size(b) for b in hyper.layers),
             "rest": size(hyper) - size(hyper.embed_tokens) - size(hyper.layers)}
    adam = sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values())
    return {**traced, "base": size(base), "hyper": size(hyper), "adam": adam, "units": units}


def fsdp_memory(traced, k, offload=False):
    """Per-GPU peak bytes of --fsdp on k GPUs, computed from a one-process trace (FSDP2 does not run on
    fake tensors). Traced: the frozen base (replicated: the same on every GPU), the activations and temporaries
    (each GPU runs its own micro-batch of batch_size: unchanged), the hypernetwork's weights, AdamW state and the
    gradients live at the peak. Computed: those three divided by k (FSDP2 shards every parameter, its gradient
    and its AdamW state 1/k), plus FSDP2's working set, the largest unit's parameters gathered whole twice (the
    running unit and the prefetched next) and its whole gradient before the reduce-scatter (an upper bound: the
    largest unit, the embeddings, runs first in the forward and last in the backward). offload: FSDP2's
    CPUOffloadPolicy, whose shards and AdamW step live in CPU memory instead."""
    sharded = traced["hyper"] + traced["adam"] + traced["grads_at_peak"]
    rest = traced["peak"] - traced["base"] - sharded                          # activations, temporaries, batch
    working = 3 * max(traced["units"].values()) if k > 1 or offload else 0
    return traced["base"] + rest + (0 if offload else sharded / k) + working


def gpu_memory(cfg, traced, world):
    """Peak bytes per GPU on `world` GPUs: with --fsdp fsdp_memory (the hypernetwork, its gradients and AdamW
    state sharded 1/world); else the one-process trace, plus under DDP (world > 1) its gradient buckets, at
    most the hypernetwork's fp32 size."""
    if cfg.fsdp:
        return fsdp_memory(traced, world)
    return traced["peak"] + (traced["hyper"] if world > 1 else 0)


def flags_that_fit(cfg, base_cfg, traced, world, gpu_bytes):
    """What would fit in gpu_bytes: a smaller micro-batch with more accumulation (the same examples per step),
    or --fsdp over K GPUs (K times the examples per step)."""
    fits = lambda need: need + CUDA_EXTRA <= gpu_bytes
    examples, options = cfg.batch_size * cfg.grad_accum, []
    # The step without activations (weights, AdamW state): if that does not fit, no micro-batch will.
    if fits(gpu_memory(cfg, dict(traced, peak=traced["after_step"]), world)):
        for b in sorted((b for b in range(1, cfg.batch_size) if examples % b == 0), reverse=True):
            small = replace(cfg, batch_size=b, grad_accum=examples // b)
            need = gpu_memory(small, traced_memory(small, base_cfg), world)
            if fits(need):
                options.append(f"--batch-size {b} --grad-accum {examples // b} ({gib(need):.1f} GiB)")
                break
    for k in (2, 4, 8):
        if (k > world or not cfg.fsdp) and fits(fsdp_memory(traced, k)):
            options.append(f"torchrun --nproc-per-node {k} train.py ... --fsdp ({gib(fsdp_memory(traced, k)):.1f} "
                           f"GiB per GPU, {cfg.batch_size * cfg.grad_accum * k} examples per step)")
            break
    return options


def check_gpu_memory(cfg, base_cfg, world):
    """A real run on CUDA, before any weight is downloaded or loaded: the traced peak per GPU against this GPU's
    memory. Too big stops here, with the numbers and the flags that would fit."""
    props = torch.cuda.get_device_properties(torch.device(cfg.device))
    traced = traced_memory(cfg, base_cfg)
    need = gpu_memory(cfg, traced, world)
    if need + CUDA_EXTRA > props.total_memory:
        options = flags_that_fit(cfg, base_cfg, traced, world, props.total_memory)
        raise ValueError(f"{props.name}: this run needs {gib(need):.1f} GiB per GPU (traced, python bench.py memory) + "
                         f"~1 GiB CUDA context, the GPU has {gib(props.total_memory):.1f} GiB; "
                         + ("would fit: " + "; or ".join(options) if options else
                            "no smaller micro-batch, and no --fsdp up to 8 GPUs, fits"))
    print(f"memory: {gib(need):.1f} GiB per GPU traced, of the {props.name}'s {gib(props.total_memory):.1f} GiB")


def dry_run(cfg):
    """--dry-run: resolves the model config, tokenizer and data, builds the split and prints the plan (rows,
    concepts, steps, examples and tokens per step, the traced peak memory per GPU at this world size against
    the GPU found, a time estimate at MFU); loads no weights. Under torchrun (its WORLD_SIZE, read without
    joining the group) rank 0 plans for all."""
    check_config(cfg)
    world = dist.launched_world_size()
    if dist.launched() and int(os.environ["RANK"]) != 0:
        return
    folder, files, commits = fetch_sources(cfg, weights=False)
    base_cfg = M.config_from_json(folder / "config.json")
    if cfg.max_len > base_cfg.max_position_embeddings:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the model's context of {base_cfg.max_position_embeddings}")
    tok = loader.Tokenizer(folder / "tokenizer.json")
    rows = data.read_rows(files["data"])
    train_rows, in_rows, out_rows = data.split_run(rows, cfg)
    sample = [train_rows[i] for i in epoch_order(len(train_rows), cfg.seed, 0)[:2000]]
    examples = encode(tok, sample, cfg.max_len, cfg.variant, quiet=True)
    n_train = round(len(train_rows) * len(examples) / max(len(sample), 1))   # rows whose prompt leaves room
    per_epoch, total = run_steps(n_train, cfg, world)
    per_step = cfg.batch_size * cfg.grad_accum * world
    tokens = sum(len(e.ids) for e in examples) / max(len(examples), 1)
    traced = traced_memory(cfg, base_cfg)
    need = gpu_memory(cfg, traced, world)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dist.local_device("cuda"))
        gpu, gpu_bytes, peak_flops = props.name, props.total_memory, memory.datasheet(props.name)[1]
    else:
        gpu, gpu_bytes, peak_flops = None, REFERENCE_GPU[1], None
    peak_flops = peak_flops or REFERENCE_GPU[2]
    concepts = lambda rs: len({r["concept_id"] for r in rs})
    how = (f"--fsdp on {world} GPUs, train.fsdp_memory" if cfg.fsdp and world > 1 else
           f"DDP on {world} GPUs: the one-process trace + gradient buckets" if world > 1 else "one process")
    fit = "fits" if need + CUDA_EXTRA <= gpu_bytes else "does NOT fit"
    print(f"\nplan ({cfg.model}: {base_cfg.model_type}, {base_cfg.num_hidden_layers} blocks, d={base_cfg.hidden_size}; "
          "dry run: config, tokenizer and data only, no weights)")
    print(f"  rows: {len(rows):,} read, {len(data.positives(rows)):,} positives of {concepts(data.positives(rows)):,} concepts")
    print(f"  split: train {len(train_rows):,} rows ({concepts(train_rows):,} concepts); held-in eval {len(in_rows):,} rows "
          f"({concepts(in_rows):,} concepts); held-out {len(out_rows):,} rows ({concepts(out_rows):,} concepts)")
    print(f"  steps: {total:,} optimizer steps ({cfg.epochs:g} epochs of {per_epoch:,}"
          f"{f', capped by --max-steps' if cfg.max_steps else ''}) of {per_step} examples (batch {cfg.batch_size} x "
          f"grad-accum {cfg.grad_accum} x {world} process{'es' if world > 1 else ''})")
    print(f"  tokens per step: ~{tokens * per_step:,.0f} (mean {tokens:.0f} per example over {len(sample):,} training "
          f"rows, max-len {cfg.max_len})")
    print(f"  memory per GPU: {gib(need):.1f} GiB traced peak ({how}) + ~1 GiB CUDA context; "
          + (f"GPU: {gpu}, {gib(gpu_bytes):.1f} GiB: {fit}" if gpu else f"no GPU (on {REFERENCE_GPU[0]}: {fit})"))
    if need + CUDA_EXTRA > gpu_bytes:
        options = flags_that_fit(cfg, base_cfg, traced, world, gpu_bytes)
        print("  would fit: " + ("; or ".join(options) if options else "no smaller micro-batch, no --fsdp up to 8 GPUs"))
    hours = total * cfg.grad_accum * traced["flops"] / (peak_flops * MFU) / 3600
    took = f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.0f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"
    print(f"  time: ~{took} at {MFU:.0%} MFU of {gpu or REFERENCE_GPU[0]}'s {peak_flops / 1e12:.0f} TFLOP/s bf16 "
          f"({traced['flops'] / 1e12:.2f} TFLOP per micro-batch, traced on max-len rows: an upper bound)")
    return {"rows": len(rows), "train_rows": len(train_rows), "steps": total, "per_gpu_bytes": need, "hours": hours}


def setup(cfg):
    started = time.time()
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    folder, files, commits = fetch_sources(cfg, weights=False)       # config, tokenizer and data: no weights yet
    train_rows, in_rows, out_rows = data.split_run(data.read_rows(files["data"]), cfg)  # before the model
    bf16 = use_bf16(cfg)
    if cfg.device.startswith("cuda"):                                # a GPU too small stops here, with what fits
        check_gpu_memory(cfg, M.config_from_json(folder / "config.json"), dist.world_size())
    # fp32 master weights and AdamW state; with bf16 (default on CUDA) the frozen base is bf16 and the
    # forward runs under bf16 autocast (SPEC §5). The weights come from the commit printed above.
    t = time.time()
    folder = loader.model_folder(cfg.model, commits["model"] or cfg.model_revision)   # built or fetched the first time
    build_s = time.time() - t
    base, tok = M.load(folder, cfg.device, torch.bfloat16 if bf16 else torch.float32)
    if cfg.max_len > base.cfg.max_position_embeddings:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the model's context of {base.cfg.max_position_embeddings}")
    hyper, model, trainable, opt = hypernet_and_optimizer(base, cfg)
    amp = (lambda: torch.autocast(cfg.device.split(":")[0], torch.bfloat16)) if bf16 else contextlib.nullcontext
    make = lambda rs: encode(tok, rs, cfg.max_len, cfg.variant)
    train_ex, in_ex, out_ex = make(train_rows), make(in_rows), make(out_rows)
    if not train_ex:
        raise ValueError(f"{cfg.data}: no training examples left after the split and --max-len {cfg.max_len}")
    per_epoch, total = run_steps(len(train_ex), cfg, dist.world_size())
    run = Run(cfg, base, tok, hyper, model, trainable, opt, amp, train_ex, in_ex, out_ex,
              {"held_in": in_rows, "held_out": out_rows}, per_epoch, total, commits,
              ResidualCache(base, cfg.layer, amp) if cfg.cache_residual else None, started, build_s)
    print_setup(run, bf16)             # parameters, dtype, device, memory, data, steps
    return run


# ----------------------------------------------------------------------------- one optimizer step

def linear_decay(step, total):
    """The learning-rate factor at `step` of `total`: linear decay to 0, no warmup (SPEC §5; PSR's too, §8a)."""
    return 1 - step / total


def train_step(run, step, loss_fn):
    """One clipped AdamW step at the linearly decayed lr over the next grad_accum x processes micro-batches
    of the epoch's fixed order (a resumed run continues it exactly); process r takes grad_accum of them,
    the r-th group. The loss is the token-mean over all of them: each micro-batch's mean weighs by its
    share of the step's labelled tokens, so W processes at batch B take the steps of one process at batch
    W x B (or at B with grad_accum x W). Returns the step's record."""
    cfg, world = run.cfg, dist.world_size()
    epoch, step_in_epoch = step // run.steps_per_epoch, step % run.steps_per_epoch
    first = (step_in_epoch * world + dist.rank()) * cfg.grad_accum          # this process's first micro-batch
    order = epoch_order(len(run.train_ex), cfg.seed, epoch)
    lr = cfg.lr * linear_decay(step, run.total)
    for g in run.opt.param_groups:
        g["lr"] = lr
    batches = [collate([run.train_ex[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]],
                       residuals=run.residuals) for i in range(first, first + cfg.grad_accum)]
    labelled = [int((b.labels != -100).sum()) for b in batches]
    step_labelled, = dist.sum_over_ranks(sum(labelled))                        # every process's micro-batches
    loss_sum, tokens = 0.0, 0
    for batch, n in zip(batches, labelled):
        batch = batch.to(cfg.device)
        with run.amp():
            loss = loss_fn(run.base, run.model, batch, cfg.layer) * (n / step_labelled)  # its share of the token-mean
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

def train(cfg, resume=False, overwrite=False, on_step=None):
    """The run. Under torchrun (dist.start first) every process runs all of it, in step: metrics, progress
    bar, plot and files come from rank 0; a stop (Ctrl-C or a non-finite value) in one process stops all.
    on_step(record): called on rank 0 with each step's metrics record (workshop.ipynb's live loss plot).
    First, every process must have been started with the same settings (the device's index aside)."""
    dist.check_same_settings({**asdict(cfg), "device": cfg.device.split(":")[0], "resume": resume,
                              "overwrite": overwrite})
    run = setup(cfg)
    out = Path(cfg.out)
    step = start_or_resume(run, out, resume, overwrite)
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
                rec = train_step(run, step, steered_loss)
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
                evals, line = evaluate_splits(run, steered_loss, unsteered)
                rec.update(evals)
                if line:
                    bar.write(f"step {step} eval loss: {line}")
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if on_step is not None and dist.is_main():
                on_step(rec)
            if step % cfg.save_every == 0 or step == run.total or stopping:
                save(run, step)
    finally:  # also on a NaN stop or an error: the Ctrl-C handler must not outlive the run
        bar.close()
        log.close()
        signal.signal(signal.SIGINT, old_handler)
    dist.barrier()                                # rank 0 has written the last checkpoint and metrics
    if stopping:
        sys.exit(f"interrupted at step {step}: saved {ckpt}; continue with --resume")
    if cfg.samples:
        final_measurements(run, step)      # every process generates (FSDP2 gathers); rank 0 writes
        dist.barrier()                            # ... before any process reads metrics.jsonl for the report
    if dist.is_main():
        plot(out)
    return run


# ----------------------------------------------------------------------------- command line

def add_config_flags(ap):
    """--preset and one flag per TrainConfig field, its help from the field's metadata."""
    ap.add_argument("--preset", default="paper-2b", choices=list(PRESETS), help="starting settings")
    for f in fields(TrainConfig):
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes")}.get(f.type, f.type)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, choices=f.metadata["choices"],
                        metavar=None if f.metadata["choices"] else f.type.__name__.upper(), help=f.metadata["help"],
                        **({"nargs": "?", "const": True} if f.type is bool else {}))


def config_from_args(args):
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    return replace(PRESETS[args.preset], **given)


def main(argv=None):
    ap = fileio.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    ap.add_argument("--overwrite", action="store_true", help="start over in an OUT that already holds a run")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (split, steps, tokens, traced GPU memory, "
                                                           "time) from config, tokenizer and data; load no weights")
    add_config_flags(ap)
    argv = sys.argv[1:] if argv is None else argv
    with fileio.one_line_errors("--debug" in argv):
        args = ap.parse_args(argv)
    cfg = config_from_args(args)
    if args.dry_run:
        with fileio.one_line_errors(args.debug):
            return dry_run(cfg)
    try:
        with fileio.one_line_errors(args.debug):
            cfg = replace(cfg, device=dist.start(cfg.device))      # torchrun: join the process group; else nothing
            with dist.only_main_prints():
                print_report(train(cfg, args.resume, args.overwrite))
    finally:
        dist.stop()


# ----------------------------------------------------------------------------- checkpoints (lib/checkpoint.py holds the file format)

def save(run, step):
    """OUT/checkpoint.safetensors (resumable) and OUT/hypernet.safetensors (what steer.py and serve.py load)."""
    checkpoint.check_weights(run.hyper)
    out = Path(run.cfg.out)
    weights = checkpoint.save_checkpoint(out / "checkpoint.safetensors", run.hyper, run.opt,
                                         checkpoint_meta(run.hyper, run.cfg, step, run.commits))
    if dist.is_main():
        H.save(run.hyper, out / "hypernet.safetensors", {"step": step, "train_config": json.dumps(asdict(run.cfg)),
                                                         "commits": json.dumps(run.commits)}, weights)



# What --resume may change. grad_accum may change too, with the number of processes, as long as a step's
# micro-batches (grad_accum x processes) stay as many (load_checkpoint checks it).
RESUMABLE_CHANGES = {"max_steps", "eval_every", "eval_batches", "save_every", "samples", "device", "out", "fsdp",
                     "cache_residual"}   # the cache gives the recomputed residual (test_all.py checks it)


def checkpoint_meta(hyper, cfg, step, commits=None):
    """What a checkpoint records beside the weights: the step, the three configs, the number of processes, and
    the hub commits of the model and data (fetch_sources; None for local files)."""
    return {"step": step, "train_config": json.dumps(asdict(cfg)), "hyper_config": json.dumps(asdict(hyper.hcfg)),
            "base_config": json.dumps(asdict(hyper.base_cfg)), "world_size": dist.world_size(),
            "commits": json.dumps(commits or {})}


def load_checkpoint(path, hyper, opt, cfg, commits=None):
    """Restores `hyper` and `opt` from OUT/checkpoint.safetensors; returns its step. Refuses a checkpoint
    of another base model, hypernetwork, training config or hub commit of the model or data, listing the
    differences."""
    tensors, meta = checkpoint.read_checkpoint(path)
    H.check_base(path, meta, hyper.base_cfg)
    if json.loads(meta["hyper_config"]) != asdict(hyper.hcfg):
        raise ValueError(f"{path}: checkpoint hypernetwork config {meta['hyper_config']} differs from this run's")
    theirs = json.loads(meta["train_config"])
    diff = [f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in asdict(cfg).items()   # revisions: their commits count
            if k not in RESUMABLE_CHANGES | {"grad_accum", "model_revision", "data_revision"}
            and theirs.get(k, v) != v]
    for k, commit in json.loads(meta.get("commits", "{}")).items():
        if commit != (commits or {}).get(k):
            # --data-revision pins the held-in list's repository too: a commit of one is no revision of the other
            flag = {"model": "--model-revision", "data": "" if cfg.held_in_concepts else "--data-revision"}.get(k)
            hint = f" ({flag} {commit} resumes on the checkpoint's)" if flag and commit else ""
            diff.append(f"{k} commit {commit} -> {(commits or {}).get(k)}{hint}")
    was = (theirs.get("grad_accum", cfg.grad_accum), int(meta.get("world_size", 1)))
    now = (cfg.grad_accum, dist.world_size())
    if was[0] * was[1] != now[0] * now[1]:   # another split of a step's micro-batches resumes exactly (train_step)
        diff.append(f"grad_accum x processes {was[0]} x {was[1]} -> {now[0]} x {now[1]}")
    if diff:
        raise ValueError(f"{path}: this run's settings differ from the checkpoint's ({'; '.join(diff)}); "
                         "resume with the same settings, or start over with --overwrite")
    checkpoint.restore(path, hyper, opt, tensors)
    return int(meta["step"])


def start_or_resume(run, out, resume, overwrite):
    """Creates OUT; returns the step to start from. A finished or started run is never overwritten silently."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt, metrics = out / "checkpoint.safetensors", out / "metrics.jsonl"
    recorded = len(checkpoint.read_metrics(metrics)) if metrics.exists() else 0
    if not ckpt.exists() and not recorded:            # a run that stopped before its first step left nothing to keep
        if resume:
            print(f"{out}: nothing to resume (no step was finished); starting at step 0")
        resume, overwrite = False, True
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: no checkpoint to resume from: the run recorded {recorded} steps but "
                                    f"stopped before its first save (--save-every); start over with --overwrite")
        step = load_checkpoint(ckpt, run.hyper, run.opt, run.cfg, run.commits)
        kept = checkpoint.read_metrics(metrics, up_to=step)   # records of steps after the checkpoint are redone
        dist.barrier()                             # every process has read the files before rank 0 rewrites one
        if dist.is_main():
            fileio.write_jsonl(metrics, kept)
        print(f"resumed from {ckpt} at step {step}")
        return step
    if not overwrite:
        resumable = "pass --resume to continue it or " if ckpt.exists() else ""
        raise FileExistsError(f"{out} already holds a run: {resumable}pass --overwrite to start over, or choose "
                              "another --out")
    dist.barrier()
    if dist.is_main():                                # starting over: no resumable state of the old run stays beside
        metrics.unlink(missing_ok=True)               # the new one (hypernet.safetensors is replaced at the first save)
        ckpt.unlink(missing_ok=True)
    return 0


# ============================================================================= what a run reports (paper §4's questions, at demo scale)
SWEEP = (0.0, 1.0, 2.0, 4.0)      # the report's strengths for two held-in concepts
ANSWER_TOKENS = 48               # new tokens per greedy answer of the report


def print_setup(run, bf16):
    """The facts at the start: parameters, dtype and device; the memory of the weights (the base in its
    dtype, the hypernetwork in fp32, SPEC §5) and of each trainable parameter's gradient and two AdamW
    moments (fp32); the data and the steps."""
    cfg, world = run.cfg, dist.world_size()
    n_train = sum(p.numel() for p in run.trainable)
    n_frozen = H.count_params(run.hyper) - n_train
    n_base = H.count_params(run.base)
    est = (n_base * (2 if bf16 else 4) + (n_train + n_frozen) * 4 + n_train * 12) / 2**30
    print(f"base {cfg.model}: {n_base / 1e6:.1f}M frozen parameters ({'bf16' if bf16 else 'fp32'}) on {cfg.device}")
    print(f"hypernet {cfg.variant}, N={cfg.n_blocks}, layer {cfg.layer}: {n_train / 1e6:.1f}M trainable, "
          f"{n_frozen / 1e6:.1f}M frozen; weights + AdamW ~{est:.1f} GiB before activations "
          f"(python bench.py memory for the peak)")
    concepts = lambda examples: len({e.concept_id for e in examples})
    print(f"data: {len(run.train_ex)} train examples ({concepts(run.train_ex)} concepts), {len(run.held_in)} held-in "
          f"eval, {len(run.held_out)} held-out eval ({concepts(run.held_out)} concepts); "
          f"{run.total} steps of {cfg.batch_size * cfg.grad_accum * world} examples"
          + (f" ({world} processes, {'FSDP2' if cfg.fsdp else 'DDP'})" if world > 1 else ""))
    if run.residuals:
        n = sum(len(e.ids) for e in (*run.train_ex, *run.held_in, *run.held_out))
        print(f"base residual at layer {cfg.layer} cached per example as first needed (SPEC §5): {n:,} tokens, "
              f"{n * run.base.cfg.hidden_size * (2 if bf16 else 4) / 2**20:,.0f} MiB")


@torch.no_grad()
def evaluate(run, examples, loss_fn, unsteered=None):
    """Mean loss over the first eval_batches batches: steered; steered with Δ from another concept's
    steering prompt (if that is as good, Δ learned the task, not the concept); unsteered (strength 0).
    loss_fn is train.steered_loss. The frozen base's unsteered loss never changes: pass an earlier
    evaluation's value to skip it."""
    cfg, hyper = run.cfg, run.hyper
    hyper.eval()
    pairs = zip(examples, data.next_concept(examples, lambda e: e.concept_id))
    other = [replace(e, hyper_ids=o.hyper_ids) for e, o in pairs]          # each with another concept's prompt
    losses = {"steered": [], "other_concept": [], "unsteered": []}
    for i in range(0, min(len(examples), cfg.eval_batches * cfg.batch_size), cfg.batch_size):  # fixed order
        batch = collate(examples[i:i + cfg.batch_size], residuals=run.residuals).to(cfg.device)
        swapped = collate(other[i:i + cfg.batch_size], residuals=run.residuals).to(cfg.device)   # same ids: cached
        with run.amp():
            losses["steered"].append(loss_fn(run.base, hyper, batch, run.cfg.layer).item())
            losses["other_concept"].append(loss_fn(run.base, hyper, swapped, run.cfg.layer).item())
            if unsteered is None:
                losses["unsteered"].append(loss_fn(run.base, hyper, batch, run.cfg.layer, strength=0.0).item())
    hyper.train()
    means = {k: sum(v) / max(len(v), 1) for k, v in losses.items()}
    return {**means, "unsteered": means["unsteered"] if unsteered is None else unsteered}


def evaluate_splits(run, loss_fn, unsteered):
    """evaluate() on held-in and on held-out, where they have examples: the fields of the step's metrics
    record and the progress line. `unsteered` keeps each split's unsteered loss from its first evaluation."""
    fields, parts = {}, []
    for name, ex in (("held_in", run.held_in), ("held_out", run.held_out)):
        if ex:
            res = evaluate(run, ex, loss_fn, unsteered.get(name))
            unsteered[name] = res["unsteered"]
            fields.update({f"{name}_{k}": v for k, v in res.items()})
            parts.append(f"{name.replace('_', '-')} {res['steered']:.3f} (other concept "
                         f"{res['other_concept']:.3f}, unsteered {res['unsteered']:.3f})")
    return fields, "; ".join(parts)


@torch.no_grad()
def greedy_answers(run, rows, concepts, strength, max_new_tokens=ANSWER_TOKENS, batch_size=64):
    """Greedy answers to rows' inputs, steered with Δ = H(concept, input) at `strength`: a number, or a list
    of one per row (0 = unsteered). Large batches: decoding reads every weight once per step."""
    base, tok, hyper = run.base, run.tok, run.hyper
    ids = tok.chat_batch([r["input"] for r in rows])
    deltas = torch.zeros(len(rows), base.cfg.hidden_size, device=base.model.embed_tokens.weight.device)  # (n, d)
    if strength != 0:                                                             # 0: unsteered, Δ unused
        for c in dict.fromkeys(concepts):                                         # one batch per concept
            at = [j for j, cj in enumerate(concepts) if cj == c]
            deltas[at] = H.deltas(base, tok, hyper, c, [rows[j]["input"] for j in at], [ids[j] for j in at])
    strength = torch.tensor(strength) if isinstance(strength, list) else strength
    out = []
    for j in range(0, len(rows), batch_size):
        s = strength[j:j + batch_size] if torch.is_tensor(strength) else strength
        steering = M.Steering.vector(hyper.hcfg.layer, deltas[j:j + batch_size], s)
        gens = M.generate(base, ids[j:j + batch_size], max_new_tokens, stop_ids=tok.stop_ids, steering=steering,
                          steer_masks=M.steer_after(ids[j:j + batch_size], tok.chat_prefix_len))
        out += [tok.decode(g) for g in gens]
    return out


def final_measurements(run, step):
    """The report's generations, logged to metrics.jsonl: a strength sweep for two held-in concepts and,
    with --keywords, how often the held-in answers mention their concept (unsteered, steered with the
    right concept, steered with another concept's prompt), all greedy."""
    rows, final = run.rows["held_in"], {}
    if not rows:
        return
    run.hyper.eval()
    first = {}
    for r in rows:
        first.setdefault(r["concept_id"], r)
    firsts = list(first.values())[:2]                                            # a row of each of 2 concepts
    swept = [(r, s) for r in firsts for s in SWEEP]                            # one batch
    texts = iter(greedy_answers(run, [r for r, _ in swept], [r["output_concept"] for r, _ in swept],
                                [s for _, s in swept]))
    final["sweep"] = [{"concept": r["output_concept"], "prompt": r["input"],
                       "answers": {str(s): next(texts) for s in SWEEP}} for r in firsts]
    if run.cfg.keywords:
        keywords = data.load_keywords(run.cfg.keywords)
        right = [r["output_concept"] for r in rows]
        wrong = [r["output_concept"] for r in data.next_concept(rows, lambda r: r["concept_id"])]
        answers = {"unsteered": greedy_answers(run, rows, right, 0.0), "steered": greedy_answers(run, rows, right, 1.0),
                   "other_concept": greedy_answers(run, rows, wrong, 1.0)}
        final["mentions"] = {k: sum(data.mentions(a, keywords.get(c, [])) for a, c in zip(v, right)) / len(rows)
                             for k, v in answers.items()}
        final["mentions"]["prompts"] = len(rows)
    if dist.is_main():
        with open(Path(run.cfg.out) / "metrics.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "final": final}) + "\n")


def plot(out):
    """OUT/loss.png: the training loss per step and the evaluation losses (nothing without matplotlib). A bare
    Figure, not pyplot: the caller's backend (a notebook's inline plots) stays as it is."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    recs = [r for r in checkpoint.read_metrics(out / "metrics.jsonl") if "loss" in r]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=0.8, label="train")
    for k in ("held_in_steered", "held_in_other_concept", "held_in_unsteered", "held_out_steered"):
        ev = [r for r in recs if k in r]
        ax.plot([r["step"] for r in ev], [r[k] for r in ev], "o-", label=k.replace("_", " "))
    ax.set(xlabel="step", ylabel="cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)


def verdict(gap, loss):
    if gap >= 0.02:
        return f"concept-specific: the right concept's Δ fits its outputs better by {gap:.3f} nats ({gap / loss:.1%})"
    return f"not concept-specific: another concept's Δ does as well (gap {gap:+.3f} nats); Δ learned the task"


def print_report(run):
    """The final report, read from metrics.jsonl: evaluation losses with the right-vs-wrong-concept gap,
    the strength sweep, and the concept-mention rates."""
    recs = checkpoint.read_metrics(Path(run.cfg.out) / "metrics.jsonl")
    last = ([r for r in recs if "held_in_steered" in r or "held_out_steered" in r] or [{}])[-1]
    if last:
        print(f"\nevaluation loss after {last['step']} steps (token-mean cross-entropy on the reference outputs):")
        print(f"{'':10}{'steered':>9}{'other concept':>15}{'unsteered':>11}{'gap':>8}")
    for name in ("held_in", "held_out"):
        if f"{name}_steered" in last:
            s, o, u = (last[f"{name}_{k}"] for k in ("steered", "other_concept", "unsteered"))
            print(f"{name.replace('_', '-'):10}{s:9.3f}{o:15.3f}{u:11.3f}{o - s:+8.3f}   {verdict(o - s, s)}")
    final = next((r["final"] for r in reversed(recs) if "final" in r), {})
    for item in final.get("sweep", []):
        print(f"\n[held-in] concept: {item['concept']}\nprompt: {item['prompt']}")
        for s, text in item["answers"].items():
            print(f"  strength {float(s):g}: {text.strip()[:160]!r}")
    if "mentions" in final:
        m = final["mentions"]
        print(f"\nconcept mentioned (keywords) in greedy answers to {m['prompts']} held-in prompts: unsteered "
              f"{m['unsteered']:.0%}, steered {m['steered']:.0%}, steered with another concept's prompt "
              f"{m['other_concept']:.0%}")
    print(f"\ncheckpoint: {Path(run.cfg.out) / 'hypernet.safetensors'}; curve: {Path(run.cfg.out) / 'loss.png'}")
    took = time.time() - run.started - run.build_s
    print(f"wall clock: {took // 60:.0f} min {took % 60:.0f} s from start to this report"
          + (f" (building or fetching the model, {run.build_s:.0f} s, left out)" if run.build_s >= 1 else ""))


if __name__ == "__main__":
    main()
