"""Speed of our Gemma against Hugging Face `transformers` on the same weights, side by side in one run;
a training step's traced memory and FLOPs (memory.py); the Table 1 plan.

Prefill tokens/s (one 128- and one 512-token prompt, last-position logits, as generation needs) and
decode tokens/s (greedy, batch 1 and 8), printed with the ratio ours / transformers, plus the peak
memory of loading (each loader in a fresh process). Each figure is the median of --repeats runs,
alternating the two implementations so that both see the same machine state.

    python bench.py                       # gemma-3-270m, fp32, CPU (the offline model)
    python bench.py --repeats 1 --decode-tokens 16      # quicker
    python bench_gpu.py speed             # the same on a GPU: random weights in the Gemma-2-2b shapes, bf16

    python bench.py memory                      # a training step's peak memory and FLOPs, traced (no GPU)
    python bench.py memory --preset paper-9b --batch-size 8     # any train.py preset and flags
    python bench.py memory --preset paper-9b --fsdp   # + the per-GPU peak under torchrun --fsdp on 1, 2, 4, 8 GPUs
    python bench.py table1                      # the Table 1 sequence, with generations, judge cost and GPU hours
"""
import argparse
import statistics
import subprocess
import sys
import time

import torch

import fileio
import loader
import memory
import model as M
import train


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
    code = {"ours": f"import loader, torch; loader.load({str(folder)!r})[0](torch.tensor([[2, 3]]))",
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
    import convert_gguf
    convert_gguf.build(folder)   # before the memory measurements, so that none of them includes a build
    base = peak_load_memory("torch only", folder)
    mem = {k: peak_load_memory(k, folder) for k in ("ours", "transformers")}
    size = (folder / "model.safetensors").stat().st_size / 2**30
    print(f"peak RSS of a process that loads gemma-3-270m fp32 (weights {size:.2f} GiB) and runs a forward: "
          f"ours {mem['ours']:.2f} GiB, "
          f"transformers {mem['transformers']:.2f} GiB (importing torch alone: {base:.2f} GiB)")
    ours, _ = loader.load(folder)
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
    import chat_api
    import judge
    import steer
    run, gens = cfg.out, f"{cfg.out}/gens.jsonl"
    ckpt = f"{run}/hypernet.safetensors"
    commands = [f"python train.py --preset {preset}"]
    methods = [("HyperSteer", "", len(steer.HYPER_GRID), ("held-in", "held-out")),
               ("Prompting", "--method prompting --judge-url URL ", 1, ("held-in", "held-out")),
               ("DiffMean", "--method diffmean ", len(steer.VECTOR_GRID), ("held-in",)),
               ("ReFT-r1", "--method reft-r1 ", len(steer.VECTOR_GRID), ("held-in",))]
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
    base_cfg = memory.base_config(cfg.model)
    flops = memory.train_memory(cfg, base_cfg, cfg.max_len // 4, steps=1)["flops"]
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
          f"{decode_h:,.1f} h. Not measured: no GPU was lent to this project yet.")
    return {"generations": n_gen, "requests": requests, "cost_usd": cost, "train_hours": train_h,
            "decode_hours": decode_h, "commands": commands}


def base_params(base_cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in M.Gemma(base_cfg).parameters())


def main(argv=None):
    ap = argparse.ArgumentParser(description="Ours vs transformers: prefill and decode tokens/s, load memory; "
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
    args = ap.parse_args(argv)
    if args.command == "table1":
        with fileio.one_line_errors():
            return table1_plan(args.preset, train.config_from_args(args))
    if args.command == "memory":
        cfg = train.config_from_args(args)
        with fileio.one_line_errors():
            train.check_config(cfg)
            return memory.print_train_memory(cfg, cfg.max_len // 4)
    cpu_bench(args)


if __name__ == "__main__":
    main()
