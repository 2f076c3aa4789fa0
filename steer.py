"""Steering a model, and the AxBench evaluation generations of every method (SPEC §4, §6, §7).

    # unsteered and steered answers side by side (greedy; CPU, seconds); --sweep for several strengths
    python steer.py compare --hypernet runs/demo/hypernet.safetensors --concept "references to cats" \
        --prompt "Give me tips for a picnic" --sweep 0,1,2,4
    python steer.py compare --prompt "The capital of France is" --raw        # a plain greedy continuation
    # SPEC §7 generations -> JSONL for judge.py (resumable); --instructions demo runs offline
    python steer.py eval --hypernet runs/demo/hypernet.safetensors --split held-out --out runs/demo/gens.jsonl
    python steer.py eval --method diffmean --hypernet runs/demo/hypernet.safetensors --out runs/demo/gens.jsonl
    python steer.py eval --hypernet runs/demo/hypernet.safetensors --split held-out --out /tmp/gens.jsonl \
        --instructions demo --grid 0.5,1 --max-concepts 2 --max-new-tokens 16       # tiny CPU variant
    # concepts split over processes: 8 GPUs, or --shard i/n on n machines (then steer.py merge, see protocol.shard_path)
    torchrun --nproc-per-node 8 steer.py eval --hypernet runs/paper-2b/hypernet.safetensors --out runs/paper-2b/gens.jsonl
    # a steering vector as safetensors + llama.cpp control-vector GGUF (SPEC §4)
    python steer.py export --hypernet runs/demo/hypernet.safetensors --concept "references to cats" \
        --prompt "Give me tips for a picnic" --out runs/demo/cats        # -> cats.safetensors, cats.gguf

One steering prompt, end to end: compare() tokenises the prompt once; hypernet.deltas reads the base
residual at layer L over it and returns Δ = H(s, x); model.generate runs with
Steering({L: Δ}, strength), and model.intervene adds strength * Δ to the residual (Eq. 1). sweep() is that
generation for several prompts and strengths in one batch (compare --sweep, the workshop notebook).
eval builds the method (method_for -> protocol.Method) and samples its rows with protocol.generate_rows.
"""
import argparse
import hashlib
import itertools
import json
import sys
import textwrap
import warnings
from pathlib import Path

import torch

import baselines
import data
import hypernet as H
import model as M
import protocol
from lib import chat_api, dist, fileio, loader, vectors

METHODS = ("hypersteer", "prompting", "diffmean", "reft-r1", "psr")
NAMES = {"prompting": "Prompting", "diffmean": "DiffMean", "reft-r1": "ReFT-r1"}


# ----------------------------------------------------------------------------- a run's model and split

def file_fingerprint(path):
    """What identifies a checkpoint: its per-tensor checksums when it has them, else size and time."""
    meta = loader.read_header(path)[1]
    st = Path(path).stat()
    return meta.get("crc32") or f"{st.st_size}:{st.st_mtime_ns}"


def load_run(args):
    """(base, tokenizer, hypernetwork or None, the run's settings): from the checkpoint's train_config
    metadata when --hypernet is given (so the split is the one it trained on), else the offline demo's;
    --model, --data and --layer override."""
    settings = dict(data.DEMO_RUN)
    if getattr(args, "hypernet", None):
        meta = loader.read_header(args.hypernet)[1]
        if "train_config" not in meta:
            warnings.warn(f"{args.hypernet}: no train_config metadata; using the demo's split", stacklevel=2)
        settings.update(json.loads(meta.get("train_config", "{}")))
        if getattr(args, "model", None) is None:          # the base model's hub commit it trained on (train.py)
            settings["model_revision"] = json.loads(meta.get("commits", "{}")).get("model") or \
                settings.get("model_revision", "main")
    if getattr(args, "data", None) and not getattr(args, "hypernet", None):
        settings["held_out_ids"] = ""                    # the demo's held-out ids name concepts of the demo data only
    settings.update({k: getattr(args, k) for k in ("model", "data", "layer") if getattr(args, k, None) is not None})
    args.device = dist.local_device(args.device)                      # cuda:LOCAL_RANK under torchrun
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    base, tok = M.load(settings["model"], args.device, getattr(torch, dtype), settings.get("model_revision", "main"))
    hyper = H.load_hypernet(args.hypernet, base).eval() if getattr(args, "hypernet", None) else None
    if hyper is not None:
        settings["layer"] = hyper.hcfg.layer
    return base, tok, hyper, settings


# ----------------------------------------------------------------------------- evaluation generations (SPEC §7)

def hypersteer_method(base, tok, hyper, source=None):
    """A trained hypernetwork as a protocol.Method: Δ = H(s, x) for every (concept, instruction), added at the
    layer it was trained for, on the SPEC §7 grid."""
    layer = base.layer_index(hyper.hcfg.layer)
    edits = lambda cid, concept, ins, ids: [{layer: d} for d in H.deltas(base, tok, hyper, concept, ins, ids)]
    return protocol.Method(f"HyperSteer {hyper.hcfg.variant.replace('_', ' ')}", list(protocol.HYPER_GRID), edits,
                           source=source)


def method_for(args, base, tok, hyper, settings, rows):
    """The protocol.Method of --method: its name, strength grid, and what it adds (or how it prompts)."""
    layer, method = base.layer_index(settings["layer"]), args.method
    if method == "hypersteer":
        if hyper is None:
            raise ValueError("--method hypersteer needs --hypernet")
        return hypersteer_method(base, tok, hyper, args.hypernet)
    if method == "psr":
        import psr
        if not args.psr:
            raise ValueError("--method psr needs --psr FILE")
        model_psr = psr.load(args.psr, base)
        edits = lambda cid, concept, ins, ids: [model_psr.edits()] * len(ins)
        return protocol.Method(f"PSR {model_psr.variant}", psr.GRID, edits, source=args.psr)
    if method == "prompting":  # one row per instruction, strength 1: there is no knob to select
        judge_cfg = None
        if args.judge_url:
            judge_cfg = chat_api.JudgeConfig(base_url=args.judge_url, model=args.judge_model,
                                             cache_dir=str(Path(args.out).parent / ".judge_cache"))
        prompt_for = lambda concept, x: baselines.prompted(baselines.steering_prompt(concept, judge_cfg), x)
        return protocol.Method("Prompting", [1.0], prompt_for=prompt_for)

    def edits(cid, concept, ins, ids):
        w, max_act = baselines.vector_baseline(base, tok, rows, cid, layer, method, settings.get("max_len", 256))
        return [{layer: max_act * w}] * len(ins)                     # Δ = strength * max_act * w (SPEC §8)
    return protocol.Method(NAMES[method], protocol.VECTOR_GRID, edits, source=args.hypernet)


def cmd_eval(args):
    base, tok, hyper, settings = load_run(args)
    rows = data.load_rows(settings["data"], settings.get("data_revision", "main"))
    ids = [int(c) for c in args.concept_ids.split(",")] if args.concept_ids else None
    concepts = protocol.concepts_of_split(rows, settings, args.split, ids)[:args.max_concepts or None]
    if not concepts:
        hint = "" if hyper else " (without --hypernet nothing is held out: use --split held-in or --concept-ids)"
        raise ValueError(f"--split {args.split}: no concepts to evaluate in {settings['data']}{hint}")
    shard, n_shards = protocol.shard_of(args.shard)          # (rank, world size) under torchrun, else (0, 1)
    out = protocol.shard_path(args.out, shard, n_shards) if n_shards > 1 else Path(args.out)
    concepts = concepts[shard::n_shards]
    split = "list" if ids else args.split
    instructions = data.load_instructions(args.instructions, args.alpaca_revision)
    method = method_for(args, base, tok, hyper, settings, rows)
    if args.grid and args.method != "prompting":
        method.grid = args.grid
    producer = json.dumps({"source": file_fingerprint(method.source) if method.source else None,
                           "model": settings["model"],
                           "layer": base.layer_index(settings["layer"]), "max_new_tokens": args.max_new_tokens,
                           "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
                           "judge_url": args.judge_url if args.method == "prompting" else None}, sort_keys=True)
    producer = hashlib.sha256(producer.encode()).hexdigest()[:16]
    print(f"{method.name}: {len(concepts)} {split} concepts x {min(10, len(instructions))} instructions x {len(method.grid)} "
          f"strengths, layer {base.layer_index(settings['layer'])}, up to {args.max_new_tokens} new tokens at temperature "
          f"{args.temperature}, top-k {args.top_k}")
    sampling = protocol.Sampling(args.max_new_tokens, args.temperature, args.top_k, args.seed)
    skipped, made = protocol.generate_rows(base, tok, out, method, split=split, concepts=concepts,
                                           instructions=instructions, sampling=sampling, producer=producer,
                                           batch_size=args.batch_size, overwrite=args.overwrite)
    print(f"wrote {made} rows to {out} ({skipped} already there)")
    if n_shards > 1:
        protocol.mark_done(out, method.name)
        protocol.merge_shards(args.out, n_shards)


def cmd_merge(args):
    if protocol.merge_shards(args.out, args.shards) is None:
        raise ValueError(f"{args.out}: not every shard is done (each writes its .done file when it finishes)")


# ----------------------------------------------------------------------------- compare and export

def sweep(base, tok, prompts, edits, strengths, max_new_tokens=48, *, raw=False, temperature=0.0, seed=0,
          batch_size=16):
    """Answers to every prompt at every strength, {strength: [answer per prompt]}, greedy by default: Eq. 1
    with one strength per row of a batched generate, every row sampled with the same seed, so two rows
    differ only by their strength. edits {layer: Δ (d,) or a per-token function} is shared by all prompts
    (None: unsteered); raw: no chat template, a plain continuation (only <bos> is never steered)."""
    ids, n_prefix = ([tok.encode(p) for p in prompts], 1) if raw else (tok.chat_batch(prompts), tok.chat_prefix_len)
    jobs = [(s, i) for s in strengths for i in range(len(prompts))]
    out = {s: [None] * len(prompts) for s in strengths}
    for j in range(0, len(jobs), batch_size):
        batch = jobs[j:j + batch_size]
        rows = [ids[i] for _, i in batch]
        steering = None if edits is None else M.Steering(edits, torch.tensor([float(s) for s, _ in batch]))
        gens = M.generate(base, rows, max_new_tokens, stop_ids=tok.stop_ids, temperature=temperature,
                          seeds=[seed] * len(rows), steering=steering, steer_masks=M.steer_after(rows, n_prefix))
        for (s, i), g in zip(batch, gens):
            out[s][i] = tok.decode(g)
    return out


def cmd_compare(args):
    base, tok, hyper, settings = load_run(args)
    ids, n_prefix = (tok.encode(args.prompt), 1) if args.raw else tok.chat(args.prompt)
    if len(ids) + args.max_new_tokens > base.cfg.max_position_embeddings:
        raise ValueError(f"--prompt: {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} exceed the model's "
                         f"context of {base.cfg.max_position_embeddings}")
    layer, edits, what = settings["layer"], None, "unsteered"        # a vector file or PSR brings its own
    if hyper is not None and args.concept:
        delta = H.deltas(base, tok, hyper, args.concept, [args.prompt], [ids])[0]          # Δ = H(s, x), (d,)
        edits, what = {layer: delta}, f"concept {args.concept!r}, |Δ| = {delta.norm():.1f} at layer {layer}"
    elif args.vector:
        delta, layer, meta = vectors.load_vector(args.vector, base.cfg.hidden_size, base.cfg.num_hidden_layers)
        edits, what = {layer: delta}, f"{meta.get('method')} vector for {meta.get('concept')!r} at layer {layer}"
    elif args.psr:
        import psr
        model_psr = psr.load(args.psr, base)
        edits, what = model_psr.edits(), f"PSR ({model_psr.variant}) at layers {model_psr.layers}"
    elif hyper is not None:
        raise ValueError("--hypernet needs --concept")
    grid = args.sweep or [0.0, args.strength]
    if edits is None:
        grid = [0.0]
    answers = sweep(base, tok, [args.prompt], edits, grid, args.max_new_tokens, raw=args.raw,
                    temperature=args.temperature, seed=args.seed)
    texts = [answers[s][0] for s in grid]
    if edits is None:
        print(args.prompt + texts[0] if args.raw else texts[0])
        return
    print(f"prompt: {args.prompt}\nsteering: {what}\n")
    if args.sweep:  # one row per strength: watch the concept appear, then fluency break at high strength
        for s, t in zip(grid, texts):
            print(f"strength {s:>4g} | {t.replace(chr(10), ' ')}\n")
        return
    cols = [textwrap.wrap(t.replace("\n", " "), 56) or [""] for t in texts]
    print(f"{'unsteered':<57}| steered, strength {args.strength:g}\n{'-' * 57}+{'-' * 57}")
    for a, b in itertools.zip_longest(*cols, fillvalue=""):
        print(f"{a:<57}| {b}")


def cmd_export(args):
    base, tok, hyper, settings = load_run(args)
    layer = base.layer_index(settings["layer"])
    if args.method:
        rows = data.load_rows(settings["data"], settings.get("data_revision", "main"))
        (_, concept), = protocol.concepts_of_split(rows, settings, None, [args.concept_id])
        w, max_act = baselines.vector_baseline(base, tok, rows, args.concept_id, layer, args.method)
        vector, method = max_act * w, NAMES[args.method]          # strength 1 = max_act (SPEC §8)
    else:
        vector = H.deltas(base, tok, hyper, args.concept, [args.prompt])[0]
        method, concept = f"HyperSteer {hyper.hcfg.variant.replace('_', ' ')}", args.concept
    vectors.save_vector(args.out, vector, layer, base.cfg.model_type, method, concept, args.overwrite)
    print(f"{method} vector for {concept!r}, layer {layer}, |Δ| = {vector.norm():.2f}: "
          f"wrote {args.out}.safetensors and {args.out}.gguf")


def sampling_flag(field, kind):
    """argparse type for --temperature / --top-k: a value model.check_sampling accepts (the sampler guard
    serve.py's requests pass too), so a tiny or negative temperature is one line, not NaN or a traceback."""
    return fileio.checked(kind, lambda v: M.check_sampling(**{field: v}))


def grid_flag(text):
    """argparse type for --grid / --sweep: protocol.parse_grid, so a bad strength is a usage error before any
    work (not after the model and the instructions are loaded)."""
    try:
        return protocol.parse_grid(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    common = fileio.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--hypernet", help="trained hypernetwork checkpoint (sets the model, data split and layer)")
    add("--model", help="base model folder or hub id (default: the checkpoint's, else the offline demo model)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    add("--dtype", choices=["float32", "bfloat16"], help="base weights dtype (default: bf16 on cuda, else fp32)")
    add("--seed", type=int, default=0, help="sampling seed (mixed with concept, instruction and strength)")
    add("--psr", help="a PSR file from psr.py (SPEC §8a)")
    add("--debug", action="store_true", help="show tracebacks")
    ap = fileio.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", parents=[common], help="unsteered and steered answers side by side")
    p.add_argument("--prompt", required=True, help="base prompt x (an instruction, put in the chat template)")
    p.add_argument("--concept", default="", help="steering prompt s (a concept), with --hypernet")
    p.add_argument("--vector", help="steer with an exported .safetensors/.gguf vector")
    p.add_argument("--strength", type=fileio.finite, default=1.0, help="h <- h + strength * Δ (0 = unsteered, negative inverts)")
    p.add_argument("--sweep", nargs="?", type=grid_flag, const=[0.0, 0.5, 1.0, 2.0, 4.0, 8.0],
                   help="comma-separated strengths to compare in one table")
    p.add_argument("--raw", action="store_true", help="no chat template (plain continuation)")
    p.add_argument("--max-new-tokens", type=fileio.positive_int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=sampling_flag("temperature", float), default=0.0,
                   help=f"0 = greedy (reproducible), else at least {M.MIN_TEMPERATURE}")

    p = sub.add_parser("eval", parents=[common], help="SPEC §7 generations of a method, for judge.py")
    p.add_argument("--method", default="hypersteer", choices=METHODS, help="what steers (SPEC §8, §8a)")
    p.add_argument("--out", required=True, help="generations JSONL, appended to and resumed")
    p.add_argument("--overwrite", action="store_true", help="replace this method's rows made by other settings")
    p.add_argument("--data", help="AxBench .parquet/.jsonl or dataset:path (default: the checkpoint's, else the demo)")
    p.add_argument("--layer", type=int, help="steering layer without a checkpoint (default: the demo's)")
    p.add_argument("--split", default="held-out", choices=["held-in", "held-out"], help="concepts to evaluate")
    p.add_argument("--concept-ids", help="comma-separated concept ids instead of a split (split 'list')")
    p.add_argument("--max-concepts", type=int, default=0, help="only the first N concepts of the split (0 = all)")
    p.add_argument("--instructions", default="alpaca", help="alpaca (AlpacaEval, downloaded) | demo (bundled) | PATH")
    p.add_argument("--alpaca-revision", default="main", help="revision of tatsu-lab/alpaca_eval to pin")
    p.add_argument("--grid", type=grid_flag, help="comma-separated strengths (default: 0.2..2.0, plus 2.5-5 for vector baselines)")
    p.add_argument("--max-new-tokens", type=fileio.positive_int, default=128, help="tokens per generation (SPEC §7: 128)")
    p.add_argument("--temperature", type=sampling_flag("temperature", float), default=1.0,
                   help=f"sampling temperature (SPEC §7: 1.0; 0 = greedy, else at least {M.MIN_TEMPERATURE})")
    p.add_argument("--top-k", type=sampling_flag("top_k", int), default=50,
                   help="sample from the k likeliest tokens (SPEC §7: 50; 0 = all)")
    p.add_argument("--batch-size", type=fileio.positive_int, default=8, help="generations per batch")
    p.add_argument("--judge-url", help="prompting: an OpenAI-compatible endpoint that writes the steering prompts")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="prompting: the model behind --judge-url")
    p.add_argument("--shard", help="i/n: this process takes every n-th concept from the i-th (0-based) into "
                                   "OUT.shard-i-of-n.jsonl; the last shard to finish merges into OUT "
                                   "(default under torchrun: rank/world size)")

    p = sub.add_parser("merge", help="merge finished eval shards (OUT.shard-i-of-n.jsonl) into OUT")
    p.add_argument("--out", required=True, help="the generations JSONL the shards were written for")
    p.add_argument("--shards", type=fileio.positive_int, required=True, help="n, the number of shards")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("export", parents=[common], help="a steering vector as safetensors + llama.cpp GGUF")
    p.add_argument("--concept", help="HyperSteer: the steering prompt s")
    p.add_argument("--prompt", default="", help="HyperSteer: the base prompt x that Δ is computed for")
    p.add_argument("--method", choices=["diffmean", "reft-r1"], help="a baseline vector instead of HyperSteer")
    p.add_argument("--concept-id", type=int, help="DiffMean / ReFT-r1: the concept to train a vector for")
    p.add_argument("--data", help="AxBench data for --method (default: the checkpoint's, else the demo)")
    p.add_argument("--layer", type=int, help="steering layer without a checkpoint (default: the demo's)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.safetensors and PREFIX.gguf")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")

    argv = sys.argv[1:] if argv is None else argv
    with fileio.one_line_errors("--debug" in argv):
        args = ap.parse_args(argv)
        if args.command == "export" and args.psr:                     # refused before any file is read
            ap.error("export --psr: a PSR adds a different amount at every token (λ(h_t) z, a function of the "
                     "activation), not one constant vector, so it has no vector file; use it with compare/eval --psr "
                     "or serve.py --psr")
        if args.command == "export" and not (args.method and args.concept_id is not None or args.hypernet and args.concept):
            ap.error("export needs --hypernet with --concept (and --prompt), or --method with --concept-id")
    with fileio.one_line_errors(args.debug):
        {"compare": cmd_compare, "eval": cmd_eval, "export": cmd_export, "merge": cmd_merge}[args.command](args)


if __name__ == "__main__":
    main()
