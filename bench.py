"""Speed and memory (SPEC §2, §5, §7): our Gemma against Hugging Face `transformers` on the same weights,
side by side in one run; a training step's traced memory and FLOPs; the Table 1 plan; the GPU measurements.

Prefill tokens/s (one 128- and one 512-token prompt, last-position logits, as generation needs) and
decode tokens/s (greedy, batch 1 and 8), printed with the ratio ours / transformers, plus the peak
memory of loading (each loader in a fresh process). Each figure is the median of --repeats runs,
alternating the two implementations so that both see the same machine state.

    python bench.py                       # gemma-3-270m, fp32, CPU (the offline model)
    python bench.py --repeats 1 --decode-tokens 16      # quicker

    python bench.py memory                      # a training step's peak memory and FLOPs, traced (no GPU)
    python bench.py memory --preset paper-9b --batch-size 8     # any train.py preset and flags
    python bench.py memory --preset paper-9b --fsdp   # + the per-GPU peak under torchrun --fsdp on 1, 2, 4, 8 GPUs
    python bench.py table1                      # the Table 1 sequence, with generations, judge cost and GPU hours

On a GPU (random weights in the Gemma-2-2b shapes, bf16; --json FILE keeps the figures; --smoke runs each on
a tiny Gemma-2 on the CPU, to check the code path):

    python bench.py gpu-speed             # prefill 512/2048, decode batch 1/64 vs transformers, + the bandwidth roofline
    python bench.py gpu-train             # a paper-2b step: time, tokens/s, peak memory, MFU; SPEC §5 vs the base run twice
    python bench.py gpu-eval              # steered top-k sampling, generations/s, ours vs transformers.generate
    python bench.py gpu-train --smoke     # tiny CPU variant
"""
import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import hypernet as H
import model as M
import protocol
import train
from lib import fileio, flex, loader


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def compare(name, ours_fn, hf_fn, work, repeats, sync):
    """Median tokens/s of both, measured alternately; prints a row, returns the figures."""
    ours_fn(), hf_fn()                                    # warm-up (allocator, kernels, caches)
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours_fn, sync))
        t_hf.append(timed(hf_fn, sync))
    a, b = work / statistics.median(t_ours), work / statistics.median(t_hf)
    print(f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |", flush=True)
    return {"name": name, "ours_tok_s": a, "hf_tok_s": b, "ratio": a / b, "ours_s": statistics.median(t_ours)}


@torch.inference_mode()
def bench_pair(ours, hf, vocab, device, repeats, decode_tokens, prefill=(128, 512), batches=(1, 8)):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    print("| measurement | ours tok/s | transformers tok/s | ratio |\n| --- | --- | --- | --- |")
    rows = []
    for T in prefill:
        ids = torch.randint(3, vocab, (1, T), generator=g).to(device)
        rows.append(compare(f"prefill {T} tokens", lambda: ours.head(ours.run(ours.embed(ids))[:, -1]),
                            lambda: hf(ids, logits_to_keep=1), T, repeats, sync))
    for B in batches:
        prompts = torch.randint(3, vocab, (B, 16), generator=g)
        ours_fn = lambda: M.generate(ours, prompts.tolist(), decode_tokens, stop_ids=())
        hf_fn = lambda: hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                    max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                    do_sample=False, pad_token_id=0)
        rows.append(compare(f"decode batch {B} ({decode_tokens} new tokens)", ours_fn, hf_fn,
                            B * decode_tokens, repeats, sync) | {"batch": B})
    return rows


def peak_load_memory(which, folder):
    """Peak resident memory (GiB) of a fresh process that imports torch, loads the model and runs one
    short forward pass (which pages in every weight that a lazily memory-mapped load left on disk)."""
    code = {"ours": f"import model, torch; model.load({str(folder)!r})[0](torch.tensor([[2, 3]]))",
            "transformers": ("import torch; from transformers import AutoModelForCausalLM; "
                             f"AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32)"
                             "(torch.tensor([[2, 3]]))"),
            "torch only": "import torch, loader"}[which]
    code += "; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**20


def cpu_bench(args):
    from transformers import AutoModelForCausalLM
    folder = loader.DEMO_MODEL
    from lib import convert_gguf
    convert_gguf.build(folder)   # before the memory measurements, so that none of them includes a build
    base = peak_load_memory("torch only", folder)
    mem = {k: peak_load_memory(k, folder) for k in ("ours", "transformers")}
    size = (folder / "model.safetensors").stat().st_size / 2**30
    print(f"peak RSS of a process that loads gemma-3-270m fp32 (weights {size:.2f} GiB) and runs a forward: "
          f"ours {mem['ours']:.2f} GiB, "
          f"transformers {mem['transformers']:.2f} GiB (importing torch alone: {base:.2f} GiB)")
    ours, _ = M.load(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"\ngemma-3-270m, fp32, CPU ({torch.get_num_threads()} threads), median of {args.repeats}")
    bench_pair(ours, hf, ours.cfg.vocab_size, "cpu", args.repeats, args.decode_tokens)


# ----------------------------------------------------------------------------- the Table 1 plan

def table1_plan(preset, cfg, concepts=500, rows=1_150_000, judge_out=120, gpu_tflops=989.0, mfu=0.40,
                gpu_bandwidth=3.35e12):
    """The documented sequence that reproduces paper Table 1 for one preset, and its dry run: generations,
    judge requests and tokens, judge cost, and GPU hours. Training hours come from the traced FLOPs of one
    step at an assumed MFU; generation hours from the decode roofline (weights read once per step of a
    batch of 64). Both are estimates, printed as such, until a GPU measures them."""
    from lib import chat_api
    import judge
    run, gens = cfg.out, f"{cfg.out}/gens.jsonl"
    ckpt = f"{run}/hypernet.safetensors"
    commands = [f"python train.py --preset {preset}"]
    methods = [("HyperSteer", "", len(protocol.HYPER_GRID), ("held-in", "held-out")),
               ("Prompting", "--method prompting --judge-url URL ", 1, ("held-in", "held-out")),
               ("DiffMean", "--method diffmean ", len(protocol.VECTOR_GRID), ("held-in",)),
               ("ReFT-r1", "--method reft-r1 ", len(protocol.VECTOR_GRID), ("held-in",))]
    n_gen = 0
    for name, flags, grid, splits in methods:
        for split in splits:
            commands.append(f"python steer.py eval {flags}--hypernet {ckpt} --split {split} --out {gens}")
            n_gen += concepts * 10 * grid
    commands.append(f"python judge.py {gens}        # -> gens.report.md: the Table 1 rows")
    requests = 3 * n_gen
    example = {"concept": "references to rental services and equipment",
               "instruction": "Give me tips for a picnic " * 3, "text": "word " * 100}  # ~128 tokens of answer
    judge_in = sum(len(m["content"]) for c in judge.CRITERIA for m in judge.judge_messages(example, c)) / 3 / 4
    cost = judge.cost(requests * judge_in, requests * judge_out, chat_api.JudgeConfig())
    base_cfg = base_config(cfg.model, cfg.model_revision)
    flops = train_memory(cfg, base_cfg, cfg.max_len // 4, steps=1)["flops"]
    steps = cfg.epochs * rows / (cfg.batch_size * cfg.grad_accum)
    train_h = steps * flops / (gpu_tflops * 1e12 * mfu) / 3600
    n_params = base_params(base_cfg)
    decode_h = n_gen / 64 * 128 * (2 * n_params / gpu_bandwidth) / 3600
    print("The sequence (each command resumes if interrupted):")
    for c in commands:
        print(f"  {c}")
    print(f"\ndry run: {n_gen:,} generations of up to 128 tokens; {requests:,} judge requests "
          f"(~{requests * judge_in / 1e6:,.0f}M prompt tokens at ~4 characters a token + "
          f"{requests * judge_out / 1e6:,.0f}M completion tokens, ~{judge_out} a reply); "
          f"judge cost ~${cost:,.0f} at gpt-4o-mini prices")
    print(f"GPU hours, estimated: training {cfg.epochs:g} epochs of ~{rows / 1e6:.2f}M rows "
          f"(Concept16k: 16k concepts x 72) = {steps:,.0f} steps x {flops / 1e12:.1f} TFLOP (traced) at {mfu:.0%} of "
          f"{gpu_tflops:.0f} TFLOP/s bf16 = {train_h:,.1f} h; generations at the decode roofline "
          f"(batch 64, {2 * n_params / 1e9:.1f} GB of bf16 weights per step, {gpu_bandwidth / 1e12:.2f} TB/s) >= "
          f"{decode_h:,.1f} h. Estimates: python bench.py gpu-train and gpu-eval measure them on a GPU.")
    return {"generations": n_gen, "requests": requests, "cost_usd": cost, "train_hours": train_h,
            "decode_hours": decode_h, "commands": commands}


def base_params(base_cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in M.Gemma(base_cfg).parameters())


def main(argv=None):
    ap = fileio.ArgumentParser(description="Ours vs transformers: prefill and decode tokens/s, load memory; "
                                             "'memory': a training step's traced peak memory and FLOPs.")
    sub = ap.add_subparsers(dest="command")
    speed = sub.add_parser("speed", help="the default: speed and load memory against transformers")
    for p in (ap, speed):
        p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
        p.add_argument("--decode-tokens", type=int, default=32, help="new tokens per decode measurement")
    mem = sub.add_parser("memory", help="peak memory and FLOPs of a training step at a run's real shapes, traced on "
                                        "fake tensors (no GPU or weights needed; rows max-len long, a quarter prompt; "
                                        "bf16 auto = as on CUDA)")
    train.add_config_flags(mem)
    plan = sub.add_parser("table1", help="the sequence that reproduces paper Table 1, with a dry run of its cost")
    train.add_config_flags(plan)
    for name in ("gpu-speed", "gpu-train", "gpu-eval"):
        sub.add_parser(name, add_help=False, help=f"on a GPU: python bench.py {name} --help")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("gpu-"):
        return gpu_main([argv[0][4:], *argv[1:]])
    with fileio.one_line_errors():
        args = ap.parse_args(argv)
    if args.command == "table1":
        with fileio.one_line_errors():
            return table1_plan(args.preset, train.config_from_args(args))
    if args.command == "memory":
        cfg = train.config_from_args(args)
        with fileio.one_line_errors():
            train.check_config(cfg)
            return print_train_memory(cfg, cfg.max_len // 4)
    cpu_bench(args)


# ============================================================================= a training step's memory and FLOPs, traced on fake tensors (SPEC §5)
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


def base_config(name, revision="main"):
    """The base model's GemmaConfig: the paper models by name (their config.json's values, no login needed),
    else config.json (a local folder's, or a hub repo's through the Hugging Face cache)."""
    known = {"google/gemma-2-2b-it": M.gemma2_2b, "google/gemma-2-9b-it": M.gemma2_9b}
    if name in known:
        return known[name]()
    path = Path(name) / "config.json"
    if not path.is_file():
        path = loader.hub_file(name, "config.json", revision)
    return M.config_from_json(path)


def synthetic_examples(n, vocab, max_len, prompt_tokens, seed=0):
    """n AxBench-shaped training Examples of random tokens: max_len tokens of which prompt_tokens prompt
    (4 of them the chat prefix), and a 12-token steering prompt for the hypernetwork."""
    g = torch.Generator().manual_seed(seed)
    return [train.Example(torch.randint(3, vocab, (max_len,), generator=g).int().numpy(), prompt_tokens, 4,
                         torch.randint(3, vocab, (12,), generator=g).int().numpy(), "a concept", i) for i in range(n)]


def two_pass_loss(base, hyper, batch, layer):
    """The public code's structure, the baseline of the speed comparison (equal to train.steered_loss, a test
    checks): the base runs once for X and again, whole and with gradients through every block."""
    L = base.layer_index(layer)
    with torch.no_grad():
        x = base.residual(batch.ids, batch.real, L)
    delta = H.steering_delta(hyper, batch.hyper_ids, batch.hyper_real, x, batch.prompt, batch.prompt & batch.steer)
    logits = base(batch.ids, batch.real, steering=M.Steering.vector(L, delta), steer_mask=batch.steer)
    sel = batch.labels != -100
    return F.cross_entropy(logits[sel].float(), batch.labels[sel])


def train_memory(cfg, base_cfg, prompt_tokens=64, fake=True, steps=2, loss_fn=train.steered_loss):
    """Live tensor bytes over `steps` steps of train.py's loop (loss_fn, backward, clip, AdamW) at cfg's
    shapes, every row max_len tokens with `prompt_tokens` of prompt. The base is bf16 with bf16
    autocast unless cfg.bf16 == "no", as train.py runs on CUDA; autocast is traced as CPU autocast,
    which casts the same matrix products. Returns {"weights", "after_step", "peak"} in bytes and
    "flops", the floating-point operations of one step's forward and backward (matrix products); for
    fsdp_memory, bytes of "base" and "hyper" weights, "adam" state, "grads_at_peak", and "units", the
    hypernetwork's FSDP2 units (dist.wrap: the embeddings, one block, the rest)."""
    batch = train.collate(synthetic_examples(cfg.batch_size, base_cfg.vocab_size, cfg.max_len, prompt_tokens))
    selected = int((batch.labels != -100).sum())
    bf16 = cfg.bf16 != "no"
    mode = FakeTensorMode() if fake else torch.device("cpu")
    with mode:
        if fake:
            batch = train.Batch(**{k: mode.from_tensor(v) for k, v in vars(batch).items()})
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
                        loss = loss_fn(base, hyper, batch, cfg.layer)
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
    """Memory and FLOPs of a step with the SPEC §5 structure and with the base run twice (two_pass_loss)."""
    t0, base_cfg = time.perf_counter(), base_config(cfg.model, cfg.model_revision)
    fast, slow = (train_memory(cfg, base_cfg, prompt_tokens, loss_fn=f)
                  for f in (train.steered_loss, two_pass_loss))
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


# ============================================================================= on a GPU: random weights in the Gemma-2-2b shapes, bf16 (gpu-speed, gpu-train, gpu-eval)
# ----------------------------------------------------------------------------- ceilings and speed

# memory bandwidth (bytes/s) and dense bf16 peak (FLOP/s) from the vendors' datasheets, by a part of the
# name torch reports ("NVIDIA H100 80GB HBM3" is the SXM part); first match wins
DATASHEET = {"H200": (4.8e12, 989e12), "H100 PCIe": (2.0e12, 756e12), "H100 NVL": (3.9e12, 835e12),
             "H100": (3.35e12, 989e12)}


def datasheet(name):
    """(bandwidth, bf16 peak) of the GPU called `name`, or (None, None) if unknown."""
    return next((v for k, v in DATASHEET.items() if k in name), (None, None))


def copy_bandwidth(device, nbytes=2**31, repeats=10):
    """Measured memory bandwidth: a device-to-device copy of nbytes, bytes read + written per second (median)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src), sync) for _ in range(repeats + 1)][1:]    # the first warms up
    return 2 * nbytes / statistics.median(times)


def decode_bytes(cfg, batch, context, dtype_bytes=2):
    """The fewest bytes one decode step reads: every weight once (the tied embedding once, as the LM head)
    and each row's KV cache (sliding layers read at most their window)."""
    kv = sum(min(context, cfg.sliding_window) if t == "sliding_attention" else context for t in cfg.layer_types)
    return (base_params(cfg) + 2 * kv * cfg.num_key_value_heads * cfg.head_dim * batch) * dtype_bytes


def gpu_setup(args):
    """(device, base config): CUDA and Gemma-2-2b shapes, or with --smoke the CPU and a tiny Gemma-2."""
    if args.smoke:
        return "cpu", M.GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16)
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (--smoke runs the same code on a tiny CPU model)")
    return "cuda", M.gemma2_2b()


def random_pair(cfg, device, dtype=torch.bfloat16):
    """transformers' Gemma2ForCausalLM with random weights, and ours sharing the same weight tensors."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    hcfg = Gemma2Config(**{k: v for k, v in dataclasses.asdict(cfg).items()
                           if k not in ("model_type", "rope_local_theta", "rope_scaling_factor")})
    hcfg._attn_implementation = "eager"       # transformers' one Gemma-2 attention with soft-capping, as ours
    with torch.device(device):
        hf = Gemma2ForCausalLM(hcfg).to(dtype).eval()
    with torch.device("meta"):
        ours = M.Gemma(cfg)
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}, assign=True)
    return ours.eval(), hf


def save_json(path, result):
    if path:
        Path(path).write_text(json.dumps(result, indent=1, default=str))


def gpu_bench(args):
    """Prefill (512, 2048 tokens) and decode (batch 1, 64) against transformers, random Gemma-2-2b weights in
    bf16; batch-1 decode against the memory-bandwidth roofline (measured copy bandwidth and datasheet)."""
    device, cfg = gpu_setup(args)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    measured, (sheet, _) = copy_bandwidth(device, 2**24 if args.smoke else 2**31), datasheet(name)
    print(f"\n{name}: device-to-device copy {measured / 1e12:.2f} TB/s (read + written)"
          + (f"; datasheet {sheet / 1e12:.2f} TB/s" if sheet else ""))
    ours, hf = random_pair(cfg, device)
    prefill, batches = ((32, 64), (1, 4)) if args.smoke else ((512, 2048), (1, 64))
    print(f"random weights, Gemma-2 shapes ({base_params(cfg) / 1e9:.2f}B), bf16, attention "
          f"{'FlexAttention' if flex.FLEX == device else 'plain'} (prefill) / plain (decode), median of {args.repeats}")
    rows = bench_pair(ours, hf, cfg.vocab_size, device, args.repeats, args.decode_tokens, prefill, batches)
    one = next(r for r in rows if r.get("batch") == 1)
    step = one["ours_s"] / args.decode_tokens                       # each step of a batch-1 generation
    need = decode_bytes(cfg, 1, 16 + args.decode_tokens // 2)
    roof = {"bytes_per_step": need, "step_s": step, "copy_bandwidth": measured, "datasheet_bandwidth": sheet,
            "fraction_measured": need / measured / step, "fraction_datasheet": need / sheet / step if sheet else None}
    print(f"decode batch 1: {step * 1e3:.2f} ms a token for {need / 1e9:.2f} GB of weights + cache = "
          f"{roof['fraction_measured']:.0%} of the roofline at the measured bandwidth"
          + (f", {roof['fraction_datasheet']:.0%} at the datasheet's" if sheet else "") + " (target >= 50%)")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    print(f"targets: prefill >= 1.0x, decode >= 1.2x; peak GPU memory {peak:.1f} GiB (both models, shared weights)")
    result = {"device": name, "rows": rows, "roofline": roof, "peak_gib": peak}
    save_json(args.json, result)
    return result


# ----------------------------------------------------------------------------- a training step, evaluation

def random_base(cfg, device, dtype=torch.bfloat16):
    """Our Gemma with random weights, built directly on the device in `dtype`, frozen."""
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return M.Gemma(cfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(torch.float32)


def gpu_train(args):
    """train.train_step timed on random Gemma-2-2b weights and synthetic AxBench-shaped rows (prompt 64 +
    output 128 tokens) in bf16 autocast with fp32 master weights: step time, tokens/s, peak memory next to
    the traced estimate, MFU from the traced FLOPs; with the SPEC §5 structure and with the base run twice."""
    device, base_cfg = gpu_setup(args)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    cfg = dataclasses.replace(train.PRESETS[args.preset], batch_size=args.batch_size, grad_accum=1, device=device,
                              max_len=args.prompt_tokens + args.output_tokens, bf16="yes")
    if args.smoke:
        cfg = dataclasses.replace(cfg, n_blocks=2, layer=2)
    peak_flops = datasheet(name)[1]
    base = random_base(base_cfg, device)
    examples = synthetic_examples(cfg.batch_size * (args.steps + 2), base_cfg.vocab_size, cfg.max_len,
                                         args.prompt_tokens)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {"device": name, "config": dataclasses.asdict(cfg)}
    for label, loss_fn in (("spec5", train.steered_loss), ("two_pass", two_pass_loss)):
        hyper, model, trainable, opt = train.hypernet_and_optimizer(base, cfg)
        amp = lambda: torch.autocast(device, torch.bfloat16)
        run = train.Run(cfg, base, None, hyper, model, trainable, opt, amp, examples, [], [], {},
                        len(examples) // cfg.batch_size, 10**9, {})
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = [timed(lambda: train.train_step(run, i, loss_fn), sync)
                 for i in range(args.steps + 2)][2:]                                    # the first 2 warm up
        step = statistics.median(times)
        traced = train_memory(cfg, base_cfg, args.prompt_tokens, loss_fn=loss_fn)
        tokens = cfg.batch_size * cfg.max_len
        r = {"step_s": step, "steps_s": times, "tokens_per_s": tokens / step, "traced_flops": traced["flops"],
             "traced_peak_gib": traced["peak"] / 2**30,
             "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
             "mfu": traced["flops"] / step / peak_flops if peak_flops else None}
        results[label] = r
        print(f"{label}: {step * 1e3:,.0f} ms a step of {cfg.batch_size} x {cfg.max_len} tokens, "
              f"{r['tokens_per_s']:,.0f} tokens/s, {traced['flops'] / 1e12:.1f} TFLOP traced"
              + (f" = MFU {r['mfu']:.1%} of {peak_flops / 1e12:.0f}" if peak_flops else "")
              + f"; peak memory {r['max_memory_allocated_gib'] or 0:.1f} GiB (traced {r['traced_peak_gib']:.1f})",
              flush=True)
        del run, hyper, trainable, opt
    results["speedup"] = results["two_pass"]["step_s"] / results["spec5"]["step_s"]
    print(f"{name}, {cfg.variant} N={cfg.n_blocks}: the SPEC §5 step is {results['speedup']:.2f}x faster than "
          f"the base run twice")
    save_json(args.json, results)
    return results


def add_steering_hook(hf, layer, vectors, strengths):
    """transformers' way: a forward hook on decoder layer `layer` adding strength * Δ to its output."""
    add = (strengths[:, None, None] * vectors[:, None, :]).to(hf.dtype)          # (B, 1, d)

    def hook(module, inputs, out):
        return (out[0] + add,) + tuple(out[1:]) if isinstance(out, tuple) else out + add
    return hf.model.layers[layer].register_forward_hook(hook)


def gpu_eval(args):
    """SPEC §7 generations per second (128 new tokens, a different Δ and strength per row, top-k 50 at
    temperature 1): ours (generate with Steering.vector) against transformers.generate with a steering hook,
    the same random weights, each at the largest batch of args.batches that fits."""
    device, cfg = gpu_setup(args)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    ours, hf = random_pair(cfg, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    layer, new = min(20, cfg.num_hidden_layers - 1), args.new_tokens
    g = torch.Generator().manual_seed(0)

    def inputs(B):
        prompts = [torch.randint(3, cfg.vocab_size, (int(n),), generator=g).tolist()
                   for n in torch.randint(40, 72, (B,), generator=g)]                     # chat prompts of 40-71 tokens
        deltas = torch.randn(B, cfg.hidden_size, generator=g).to(device)
        return prompts, deltas, (torch.rand(B, generator=g) * 2).to(device)

    def ours_fn(prompts, deltas, strengths, n):
        steering = M.Steering.vector(layer, deltas, strengths)
        return M.generate(ours, prompts, n, stop_ids=(), temperature=1.0, top_k=50, steering=steering)

    def hf_fn(prompts, deltas, strengths, n):
        ids, real = M.left_pad(prompts, 0, device)
        handle = add_steering_hook(hf, layer, deltas, strengths)
        try:
            return hf.generate(ids, attention_mask=real.long(), max_new_tokens=n, min_new_tokens=n, do_sample=True,
                               top_k=50, temperature=1.0, top_p=1.0, pad_token_id=0)
        finally:
            handle.remove()

    result = {"device": name, "new_tokens": new}
    for label, fn in (("ours", ours_fn), ("transformers", hf_fn)):
        for B in args.batches:
            try:
                with torch.inference_mode():
                    args_b = inputs(B)
                    fn(*args_b, 4)                                            # warm-up; fails fast if B is too large
                    t = statistics.median(timed(lambda: fn(*args_b, new), sync) for _ in range(args.repeats))
            except torch.OutOfMemoryError:
                print(f"{label}: batch {B} does not fit", flush=True)
                torch.cuda.empty_cache()
                continue
            result[label] = {"batch": B, "seconds": t, "generations_per_s": B / t}
            print(f"{label}: batch {B}, {new} new tokens in {t:.2f} s = {B / t:,.1f} generations/s", flush=True)
            break
    if "ours" in result and "transformers" in result:
        result["ratio"] = result["ours"]["generations_per_s"] / result["transformers"]["generations_per_s"]
        print(f"{name}: ours {result['ratio']:.2f}x transformers' generations/s (target >= 3x)")
    save_json(args.json, result)
    return result


def gpu_main(argv=None):
    ap = fileio.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    cmd = {c: sub.add_parser(c, help=h) for c, h in (
        ("speed", "prefill 512/2048 and decode batch 1/64 vs transformers, random Gemma-2-2b bf16, + roofline"),
        ("train", "a training step on random Gemma-2-2b weights: time, tokens/s, memory, MFU; vs two passes"),
        ("eval", "steered sampling generations/s at the largest batch that fits, ours vs transformers"))}
    for p in cmd.values():
        p.add_argument("--smoke", action="store_true", help="a tiny Gemma-2 on the CPU: checks the code path only")
        p.add_argument("--json", default="", help="also write the results to this JSON file")
    cmd["speed"].add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    cmd["speed"].add_argument("--decode-tokens", type=int, default=128, help="new tokens per decode measurement")
    cmd["train"].add_argument("--preset", default="paper-2b", choices=list(train.PRESETS),
                              help="hypernetwork settings (the base is always random Gemma-2-2b)")
    cmd["train"].add_argument("--batch-size", type=int, default=12, help="rows per step (paper 2b: 12)")
    cmd["train"].add_argument("--prompt-tokens", type=int, default=64, help="prompt tokens per row")
    cmd["train"].add_argument("--output-tokens", type=int, default=128, help="output tokens per row")
    cmd["train"].add_argument("--steps", type=int, default=5, help="timed steps (median), after 2 warm-up steps")
    cmd["eval"].add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[512, 256, 128, 64],
                             help="batch sizes to try, largest first (comma-separated)")
    cmd["eval"].add_argument("--new-tokens", type=int, default=128, help="new tokens per generation (SPEC §7)")
    cmd["eval"].add_argument("--repeats", type=int, default=1, help="timed runs (median)")
    with fileio.one_line_errors():
        args = ap.parse_args(argv)
    return {"speed": gpu_bench, "train": gpu_train, "eval": gpu_eval}[args.command](args)


if __name__ == "__main__":
    main()
