"""A training step's peak memory and FLOPs, traced on fake tensors with no GPU and no weights, at any
train.py preset's real shapes (SPEC §5: the steered step, and the base run twice); and the per-GPU
peak under `torchrun --fsdp`, computed from that trace.

Two steps of train.py's own loop (the loss, backward, clipping, AdamW) run on FakeTensors while a
dispatch mode counts the bytes of every live tensor, as torch.cuda.max_memory_allocated would, and
torch's FlopCounterMode counts the first step's FLOPs. A test checks the counter against a real CPU
step; bench_gpu.py train puts the measured peak next to this estimate, bench.py table1 turns the
FLOPs into GPU hours.

    python bench.py memory                      # paper-2b: peak memory and FLOPs of a step
    python bench.py memory --preset paper-9b --fsdp     # + the per-GPU peak on 1, 2, 4, 8 GPUs
    python bench.py memory --preset demo        # the offline gemma-3-270m (tiny CPU variant)
"""
import contextlib
import time
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_flatten

import data
import loader
import model as M
import train


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storage, counted as ops create tensors and as Python frees them, with the
    peak: what torch.cuda.max_memory_allocated reports, less the caching allocator's rounding.
    Fake tensors have shapes but no values, so the step's value reads are answered without data: a
    scalar read gives 1 (the input validation's boolean checks pass; AdamW's step count only sets its
    bias correction), and selecting rows of a (B, T) tensor with a boolean mask gives `selected` rows
    (the labelled positions of train.steered_loss's `out[sel]`). grads_at_peak: bytes of the `watch`
    parameters' gradients live at the peak."""

    def __init__(self, tensors, selected, watch=()):
        super().__init__()
        self.now = self.peak = self.grads_at_peak = 0
        self.seen, self.selected, self.watch = set(), selected, list(watch)
        self.track(tensors)

    def track(self, tensors):
        for t in tensors:
            st = t.untyped_storage()
            if st._cdata not in self.seen:
                self.seen.add(st._cdata)
                self.now += st.nbytes()
                weakref.finalize(st, self.free, st._cdata, st.nbytes())
        if self.now > self.peak:
            self.peak = self.now
            self.grads_at_peak = sum(p.grad.untyped_storage().nbytes() for p in self.watch if p.grad is not None)

    def free(self, key, nbytes):
        self.seen.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if isinstance(x, FakeTensor) and func is torch.ops.aten._local_scalar_dense.default:
            return True if x.dtype == torch.bool else 1
        if isinstance(x, FakeTensor) and func is torch.ops.aten.index.Tensor and args[1][0].dtype == torch.bool:
            out = x.new_empty((self.selected, *x.shape[args[1][0].dim():]))
        else:
            out = func(*args, **(kwargs or {}))
        self.track(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def base_config(name):
    """The base model's GemmaConfig: the paper models by name, else config.json (local or hub)."""
    known = {"google/gemma-2-2b-it": M.gemma2_2b, "google/gemma-2-9b-it": M.gemma2_9b}
    if name in known:
        return known[name]()
    path = Path(name) / "config.json"
    if not path.is_file():
        path = loader.hf_file(name, "config.json")
    return loader.config_from_json(path)


def synthetic_examples(n, vocab, max_len, prompt_tokens, seed=0):
    """n AxBench-shaped training Examples of random tokens: max_len tokens of which prompt_tokens prompt
    (4 of them the chat prefix), and a 12-token steering prompt for the hypernetwork."""
    g = torch.Generator().manual_seed(seed)
    return [data.Example(torch.randint(3, vocab, (max_len,), generator=g).int().numpy(), prompt_tokens, 4,
                         torch.randint(3, vocab, (12,), generator=g).int().numpy(), "a concept", i) for i in range(n)]


def train_memory(cfg, base_cfg, prompt_tokens=64, fake=True, steps=2, loss_fn=train.steered_loss):
    """Live tensor bytes over `steps` steps of train.py's loop (loss_fn, backward, clip, AdamW) at cfg's
    shapes, every row max_len tokens with `prompt_tokens` of prompt. The base is bf16 with bf16
    autocast unless cfg.bf16 == "no", as train.py runs on CUDA; autocast is traced as CPU autocast,
    which casts the same matrix products. Returns {"weights", "after_step", "peak"} in bytes and
    "flops", the floating-point operations of one step's forward and backward (matrix products); for
    fsdp_memory, bytes of "base" and "hyper" weights, "adam" state, "grads_at_peak", and "units", the
    hypernetwork's FSDP2 units (dist.wrap: the embeddings, one block, the rest)."""
    batch = data.collate(synthetic_examples(cfg.batch_size, base_cfg.vocab_size, cfg.max_len, prompt_tokens))
    selected = int((batch.labels != -100).sum())
    bf16 = cfg.bf16 != "no"
    mode = FakeTensorMode() if fake else torch.device("cpu")
    with mode:
        if fake:
            batch = data.Batch(**{k: mode.from_tensor(v) for k, v in vars(batch).items()})
        torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)   # a fake module cannot be cast
        try:
            base = M.Gemma(base_cfg).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(torch.float32)
        hyper, _, trainable, opt = train.hypernet_and_optimizer(base, cfg)
        counter = LiveBytes([*base.parameters(), *hyper.parameters(), *vars(batch).values()], selected, trainable)
        weights, flops = counter.now, FlopCounterMode(display=False)
        with counter:
            for step in range(steps):  # the second step is the steady state: AdamW state lives from the first
                with flops if step == 0 else contextlib.nullcontext():
                    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                        loss = loss_fn(base, hyper, batch)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    units = {"embeddings": size(hyper.embed_tokens), "block": max(size(b) for b in hyper.layers),
             "rest": size(hyper) - size(hyper.embed_tokens) - size(hyper.layers)}
    adam = sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values())
    return {"weights": weights, "after_step": counter.now, "peak": counter.peak, "flops": flops.get_total_flops(),
            "base": size(base), "hyper": size(hyper), "adam": adam, "grads_at_peak": counter.grads_at_peak,
            "units": units}


def fsdp_memory(traced, k, offload=False):
    """Per-GPU peak bytes of train.py --fsdp on k GPUs, computed from a one-process trace (FSDP2 does not run on
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


def print_train_memory(cfg, prompt_tokens):
    """Memory and FLOPs of a step with the SPEC §5 structure and with the base run twice (--two-pass)."""
    t0, base_cfg = time.perf_counter(), base_config(cfg.model)
    fast, slow = (train_memory(cfg, base_cfg, prompt_tokens, loss_fn=f)
                  for f in (train.steered_loss, train.two_pass_loss))
    print(f"{cfg.model}, {cfg.variant} N={cfg.n_blocks}, layer {cfg.layer}, batch {cfg.batch_size} x {cfg.max_len} "
          f"tokens ({prompt_tokens} prompt), {'bf16 base + autocast' if cfg.bf16 != 'no' else 'fp32'}; "
          f"traced on fake tensors in {time.perf_counter() - t0:.0f} s:")
    print(f"  weights (base + hypernetwork) {fast['weights'] / 2**30:.1f} GiB; + AdamW state after a step "
          f"{fast['after_step'] / 2**30:.1f} GiB; peak during a step {fast['peak'] / 2**30:.1f} GiB")
    print(f"  a step: {fast['flops'] / 1e12:.1f} TFLOP (SPEC §5 structure) vs {slow['flops'] / 1e12:.1f} TFLOP and "
          f"{slow['peak'] / 2**30:.1f} GiB peak with the base run twice: {slow['flops'] / fast['flops']:.2f}x the work")
    print("  (a GPU adds its CUDA context, ~0.5 GiB, and the caching allocator's rounding)")
    if cfg.fsdp:
        print_fsdp_memory(cfg, fast)


def print_fsdp_memory(cfg, traced, world_sizes=(1, 2, 4, 8), gpu_gib=80):
    gib = lambda b: b / 2**30
    u, sharded = traced["units"], traced["hyper"] + traced["adam"] + traced["grads_at_peak"]
    print("\ntorchrun --nproc-per-node K train.py --fsdp: per-GPU peak "
          "(fsdp_memory: traced at K = 1, sharding computed)")
    print(f"  traced: base {gib(traced['base']):.1f} GiB (replicated), hypernetwork {gib(traced['hyper']):.1f} + AdamW "
          f"{gib(traced['adam']):.1f} + gradients live at the peak {gib(traced['grads_at_peak']):.1f} GiB "
          f"(sharded 1/K), the rest {gib(traced['peak'] - traced['base'] - sharded):.1f}"
          f" GiB; FSDP2 units: embeddings {gib(u['embeddings']):.2f}, a block {gib(u['block']):.2f} GiB")
    print("  | GPUs K | global batch | per-GPU peak | + CPU offload (host RAM per GPU) | base sharded too |")
    print("  | --- | --- | --- | --- | --- |")
    smallest = None
    for k in world_sizes:
        peak, off = fsdp_memory(traced, k), fsdp_memory(traced, k, offload=True)
        host = sharded / k
        both = peak - traced["base"] * (1 - 1 / k)
        print(f"  | {k} | {cfg.batch_size * cfg.grad_accum * k} | {gib(peak):.1f} GiB | {gib(off):.1f} GiB "
              f"({gib(host):.1f} GiB) | {gib(both):.1f} GiB |")
        if smallest is None and gib(peak) + 1 < gpu_gib * 1e9 / 2**30:
            smallest = k
    print(f"  smallest K whose peak (+ ~1 GiB CUDA context) fits {gpu_gib} GB GPUs: "
          f"{smallest or f'none up to {world_sizes[-1]}'} (without CPU offload)")
    print("  an upper bound: the working set (3 x the largest unit) is added to the traced peak wherever it falls"
          " (at 9b, the optimizer step, when FSDP2 holds no unit whole); 'base sharded too' leaves out the base"
          " blocks it would gather (< 1 GiB)")
