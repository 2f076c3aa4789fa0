"""Speed of our Gemma against Hugging Face `transformers` on the same weights, side by side in one run.

Prefill tokens/s (one 128- and one 512-token prompt, last-position logits, as generation needs) and
decode tokens/s (greedy, batch 1 and 8), printed with the ratio ours / transformers, plus the peak
memory of loading (each loader in a fresh process). Each figure is the median of --repeats runs,
alternating the two implementations so that both see the same machine state.

    python bench.py                       # gemma-3-270m, fp32, CPU (the offline model)
    python bench.py --repeats 1 --decode-tokens 16      # quicker
On a CUDA machine it also runs random weights in the Gemma-2-2b shapes in bf16 (--gpu-only for just that).
"""
import argparse
import statistics
import subprocess
import sys
import time

import torch

import model as M


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def compare(name, ours_fn, hf_fn, work, repeats, sync):
    """Median tokens/s of both, measured alternately; returns a printable row."""
    ours_fn(), hf_fn()                                    # warm-up (allocator, kernels, caches)
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours_fn, sync))
        t_hf.append(timed(hf_fn, sync))
    a, b = work / statistics.median(t_ours), work / statistics.median(t_hf)
    row = f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |"
    print(row, flush=True)
    return row


@torch.inference_mode()
def bench_pair(ours, hf, vocab, device, repeats, decode_tokens):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    print("| measurement | ours tok/s | transformers tok/s | ratio |\n| --- | --- | --- | --- |")
    rows = []
    for T in (128, 512):
        ids = torch.randint(3, vocab, (1, T), generator=g).to(device)
        rows.append(compare(f"prefill {T} tokens", lambda: ours.head(ours.run(ours.embed(ids))[:, -1]),
                            lambda: hf(ids, logits_to_keep=1), T, repeats, sync))
    for B in (1, 8):
        prompts = torch.randint(3, vocab, (B, 16), generator=g)
        ours_fn = lambda: M.generate(ours, prompts.tolist(), decode_tokens, stop_ids=())
        hf_fn = lambda: hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                    max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                    do_sample=False, pad_token_id=0)
        rows.append(compare(f"decode batch {B} ({decode_tokens} new tokens)", ours_fn, hf_fn,
                            B * decode_tokens, repeats, sync))
    return rows


def peak_load_memory(which, folder):
    """Peak resident memory (GiB) of a fresh process that imports torch, loads the model and runs one
    short forward pass (which pages in every weight that a lazily memory-mapped load left on disk)."""
    code = {"ours": f"import model, torch; model.load({str(folder)!r})[0](torch.tensor([[2, 3]]))",
            "transformers": ("import torch; from transformers import AutoModelForCausalLM; "
                             f"AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32)"
                             "(torch.tensor([[2, 3]]))"),
            "torch only": "import torch, model"}[which]
    code += "; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**20


def cpu_bench(args):
    from transformers import AutoModelForCausalLM
    folder = M.DEMO_MODEL
    import convert_gguf
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


def gpu_bench(args):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from dataclasses import asdict
    cfg = M.gemma2_2b()
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(Gemma2Config(**{k: v for k, v in asdict(cfg).items()
                                            if k not in ("model_type", "rope_local_theta", "rope_scaling_factor")}))
    hf = hf.to("cuda", torch.bfloat16).eval()
    ours = M.Gemma(cfg).to("cuda", torch.bfloat16).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    print(f"\nrandom weights, Gemma-2-2b shapes, bf16, {torch.cuda.get_device_name()}, median of {args.repeats}")
    bench_pair(ours, hf, cfg.vocab_size, "cuda", args.repeats, args.decode_tokens)
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (both models loaded)")


def main():
    ap = argparse.ArgumentParser(description="Ours vs transformers: prefill and decode tokens/s, load memory.")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="new tokens per decode measurement")
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU benchmark")
    args = ap.parse_args()
    if not args.gpu_only:
        cpu_bench(args)
    if torch.cuda.is_available():
        gpu_bench(args)


if __name__ == "__main__":
    main()
