"""The GPU measurements, on random weights in the Gemma-2-2b shapes in bf16: speed against `transformers`
and the memory-bandwidth roofline, a training step (SPEC §5), and the evaluation's sampling (SPEC §7).
gpu_session.sh runs them on a lent device machine; --smoke runs each on a tiny CPU model, to check the code path.

    python bench_gpu.py speed                   # prefill 512/2048, decode batch 1/64, batch-1 decode vs the roofline
    python bench_gpu.py train                   # a training step: time, tokens/s, memory, MFU; vs two passes
    python bench_gpu.py eval                    # steered sampling generations/s vs transformers
    python bench_gpu.py train --smoke           # tiny CPU variant (each command takes --smoke)
    bash gpu_session.sh                         # all of them, and a GPU demo run, for the device machine
"""
import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

import bench
import flex
import memory
import model as M
import train


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
    times = [bench.timed(lambda: dst.copy_(src), sync) for _ in range(repeats + 1)][1:]    # the first warms up
    return 2 * nbytes / statistics.median(times)


def decode_bytes(cfg, batch, context, dtype_bytes=2):
    """The fewest bytes one decode step reads: every weight once (the tied embedding once, as the LM head)
    and each row's KV cache (sliding layers read at most their window)."""
    kv = sum(min(context, cfg.sliding_window) if t == "sliding_attention" else context for t in cfg.layer_types)
    return (bench.base_params(cfg) + 2 * kv * cfg.num_key_value_heads * cfg.head_dim * batch) * dtype_bytes


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
    print(f"random weights, Gemma-2 shapes ({bench.base_params(cfg) / 1e9:.2f}B), bf16, attention "
          f"{'FlexAttention' if flex.FLEX == device else 'plain'} (prefill) / plain (decode), median of {args.repeats}")
    rows = bench.bench_pair(ours, hf, cfg.vocab_size, device, args.repeats, args.decode_tokens, prefill, batches)
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
    examples = memory.synthetic_examples(cfg.batch_size * (args.steps + 2), base_cfg.vocab_size, cfg.max_len,
                                         args.prompt_tokens)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {"device": name, "config": dataclasses.asdict(cfg)}
    for label, loss_fn in (("spec5", train.steered_loss), ("two_pass", train.two_pass_loss)):
        hyper, model, trainable, opt = train.hypernet_and_optimizer(base, cfg)
        amp = lambda: torch.autocast(device, torch.bfloat16)
        run = train.Run(cfg, base, None, hyper, model, trainable, opt, amp, examples, [], [], {},
                        len(examples) // cfg.batch_size, 10**9)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = [bench.timed(lambda: train.train_step(run, i, loss_fn), sync)
                 for i in range(args.steps + 2)][2:]                                    # the first 2 warm up
        step = statistics.median(times)
        traced = memory.train_memory(cfg, base_cfg, args.prompt_tokens, loss_fn=loss_fn)
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
                    t = statistics.median(bench.timed(lambda: fn(*args_b, new), sync) for _ in range(args.repeats))
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    args = ap.parse_args(argv)
    return {"speed": gpu_bench, "train": gpu_train, "eval": gpu_eval}[args.command](args)


if __name__ == "__main__":
    main()
