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
Steering({L: Δ}, strength), and model.intervene adds strength * Δ to the residual (Eq. 1).
eval builds each method's edits (method_for) and samples its rows with protocol.generate_rows.
"""
import argparse
import hashlib
import itertools
import json
import math
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

HYPER_GRID = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]   # SPEC §7: Δ unnormalised, around 0.2-2
VECTOR_GRID = HYPER_GRID + [2.5, 3.0, 4.0, 5.0]                    # AxBench's grid, times max_act (SPEC §8)
METHODS = ("hypersteer", "prompting", "diffmean", "reft-r1", "psr")
NAMES = {"prompting": "Prompting", "diffmean": "DiffMean", "reft-r1": "ReFT-r1"}


def parse_grid(text, flag="--grid"):
    try:
        grid = [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not grid or not all(math.isfinite(s) for s in grid):
        raise ValueError(f"{flag}: strengths must be finite numbers, got {text!r}")
    return grid


# ----------------------------------------------------------------------------- a run's model and split

def file_fingerprint(path):
    """What identifies a checkpoint: its per-tensor checksums when it has them, else size and time."""
    meta = loader.read_header(path)[2]
    st = Path(path).stat()
    return meta.get("crc32") or f"{st.st_size}:{st.st_mtime_ns}"


def load_run(args):
    """(base, tokenizer, hypernetwork or None, the run's settings): from the checkpoint's train_config
    metadata when --hypernet is given (so the split is the one it trained on), else the offline demo's;
    --model, --data and --layer override."""
    settings = dict(data.DEMO_RUN)
    if getattr(args, "hypernet", None):
        meta = loader.read_header(args.hypernet)[2]
        if "train_config" not in meta:
            warnings.warn(f"{args.hypernet}: no train_config metadata; using the demo's split", stacklevel=2)
        settings.update(json.loads(meta.get("train_config", "{}")))
    settings.update({k: getattr(args, k) for k in ("model", "data", "layer") if getattr(args, k, None) is not None})
    args.device = dist.local_device(args.device)                      # cuda:LOCAL_RANK under torchrun
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    base, tok = M.load(settings["model"], args.device, getattr(torch, dtype))
    hyper = H.load_hypernet(args.hypernet, base).eval() if getattr(args, "hypernet", None) else None
    if hyper is not None:
        settings["layer"] = hyper.hcfg.layer
    return base, tok, hyper, settings


def split_concepts(rows, settings, split, concept_ids=None):
    """[(concept_id, concept)] of a split, exactly as the run split its data (held-out concepts were
    never trained on); concept_ids picks a list instead."""
    pos = data.positives(rows)
    names = {r["concept_id"]: r["output_concept"] for r in pos}
    if concept_ids:
        unknown = [c for c in concept_ids if c not in names]
        if unknown:
            raise ValueError(f"--concept-ids: no concept with id {', '.join(map(str, unknown))} in the data")
        return [(c, names[c]) for c in concept_ids]
    _, held_in, held_out = data.split_run(rows, settings)
    return sorted({(r["concept_id"], r["output_concept"]) for r in (held_out if split == "held-out" else held_in)})


# ----------------------------------------------------------------------------- evaluation generations (SPEC §7)

def method_for(args, base, tok, hyper, settings, rows):
    """(name, grid, edits_for, prompt_for, source file) of an evaluated method."""
    layer, method = base.layer_index(settings["layer"]), args.method
    if method == "hypersteer":
        if hyper is None:
            raise ValueError("--method hypersteer needs --hypernet")
        edits = lambda cid, concept, ins, ids: [{layer: d} for d in H.deltas(base, tok, hyper, concept, ins, ids)]
        return f"HyperSteer {hyper.hcfg.variant.replace('_', ' ')}", HYPER_GRID, edits, None, args.hypernet
    if method == "psr":
        import psr
        if not args.psr:
            raise ValueError("--method psr needs --psr FILE")
        model_psr = psr.load(args.psr, base)
        edits = lambda cid, concept, ins, ids: [model_psr.edits()] * len(ins)
        return f"PSR {model_psr.variant}", psr.GRID, edits, None, args.psr
    if method == "prompting":  # one row per instruction, strength 1: there is no knob to select
        judge_cfg = None
        if args.judge_url:
            judge_cfg = chat_api.JudgeConfig(base_url=args.judge_url, model=args.judge_model,
                                             cache_dir=str(Path(args.out).parent / ".judge_cache"))
        prompt_for = lambda concept, x: baselines.prompted(baselines.steering_prompt(concept, judge_cfg), x)
        return "Prompting", [1.0], None, prompt_for, None

    def edits(cid, concept, ins, ids):
        w, max_act = baselines.vector_baseline(base, tok, rows, cid, layer, method, settings.get("max_len", 256))
        return [{layer: max_act * w}] * len(ins)                     # Δ = strength * max_act * w (SPEC §8)
    return NAMES[method], VECTOR_GRID, edits, None, args.hypernet


def cmd_eval(args):
    base, tok, hyper, settings = load_run(args)
    rows = data.load_rows(settings["data"], settings.get("data_revision", "main"))
    ids = [int(c) for c in args.concept_ids.split(",")] if args.concept_ids else None
    concepts = split_concepts(rows, settings, args.split, ids)[:args.max_concepts or None]
    shard, n_shards = protocol.shard_of(args.shard)          # (rank, world size) under torchrun, else (0, 1)
    out = protocol.shard_path(args.out, shard, n_shards) if n_shards > 1 else Path(args.out)
    concepts = concepts[shard::n_shards]
    split = "list" if ids else args.split
    instructions = data.load_instructions(args.instructions, args.alpaca_revision)
    name, grid, edits_for, prompt_for, source = method_for(args, base, tok, hyper, settings, rows)
    grid = [1.0] if args.method == "prompting" else (parse_grid(args.grid) if args.grid else grid)
    producer = json.dumps({"source": file_fingerprint(source) if source else None, "model": settings["model"],
                           "layer": base.layer_index(settings["layer"]), "max_new_tokens": args.max_new_tokens,
                           "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
                           "judge_url": args.judge_url if args.method == "prompting" else None}, sort_keys=True)
    producer = hashlib.sha256(producer.encode()).hexdigest()[:16]
    print(f"{name}: {len(concepts)} {split} concepts x {min(10, len(instructions))} instructions x {len(grid)} "
          f"strengths, layer {base.layer_index(settings['layer'])}, up to {args.max_new_tokens} new tokens at temperature "
          f"{args.temperature}, top-k {args.top_k}")
    skipped, made = protocol.generate_rows(base, tok, out, name, split, concepts, instructions, grid, edits_for,
                                              prompt_for, producer, args.batch_size, args.max_new_tokens,
                                              args.temperature, args.top_k, args.seed, args.overwrite)
    print(f"wrote {made} rows to {out} ({skipped} already there)")
    if n_shards > 1:
        Path(f"{out}.done").write_text(f"{skipped + made}\n")
        protocol.merge_shards(args.out, n_shards)


def cmd_merge(args):
    if protocol.merge_shards(args.out, args.shards) is None:
        raise ValueError(f"{args.out}: not every shard is done (each writes its .done file when it finishes)")


# ----------------------------------------------------------------------------- compare and export

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
        delta, layer, meta = vectors.load_vector(args.vector, base.cfg.hidden_size)
        edits, what = {layer: delta}, f"{meta.get('method')} vector for {meta.get('concept')!r} at layer {layer}"
    elif args.psr:
        import psr
        model_psr = psr.load(args.psr, base)
        edits, what = model_psr.edits(), f"PSR ({model_psr.variant}) at layers {model_psr.layers}"
    elif hyper is not None:
        raise ValueError("--hypernet needs --concept")
    grid = parse_grid(args.sweep, "--sweep") if args.sweep else [0.0, args.strength]
    if edits is None:
        grid = [0.0]
    steering = None if edits is None else M.Steering(edits, torch.tensor(grid))     # one strength per row
    outs = M.generate(base, [ids] * len(grid), args.max_new_tokens, stop_ids=tok.stop_ids,
                      temperature=args.temperature, seeds=[args.seed] * len(grid), steering=steering,
                      steer_masks=M.steer_after([ids] * len(grid), n_prefix))
    texts = [tok.decode(o) for o in outs]
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
        (_, concept), = split_concepts(rows, settings, None, [args.concept_id])
        w, max_act = baselines.vector_baseline(base, tok, rows, args.concept_id, layer, args.method)
        vector, method = max_act * w, NAMES[args.method]          # strength 1 = max_act (SPEC §8)
    else:
        vector = H.deltas(base, tok, hyper, args.concept, [args.prompt])[0]
        method, concept = f"HyperSteer {hyper.hcfg.variant.replace('_', ' ')}", args.concept
    vectors.save_vector(args.out, vector, layer, base.cfg.model_type, method, concept, args.overwrite)
    print(f"{method} vector for {concept!r}, layer {layer}, |Δ| = {vector.norm():.2f}: "
          f"wrote {args.out}.safetensors and {args.out}.gguf")


def finite(text):
    v = float(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return v


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--hypernet", help="trained hypernetwork checkpoint (sets the model, data split and layer)")
    add("--model", help="base model folder or hub id (default: the checkpoint's, else the offline demo model)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    add("--dtype", choices=["float32", "bfloat16"], help="base weights dtype (default: bf16 on cuda, else fp32)")
    add("--seed", type=int, default=0, help="sampling seed (mixed with concept, instruction and strength)")
    add("--psr", help="a PSR file from psr.py (SPEC §8a)")
    add("--debug", action="store_true", help="show tracebacks")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", parents=[common], help="unsteered and steered answers side by side")
    p.add_argument("--prompt", required=True, help="base prompt x (an instruction, put in the chat template)")
    p.add_argument("--concept", default="", help="steering prompt s (a concept), with --hypernet")
    p.add_argument("--vector", help="steer with an exported .safetensors/.gguf vector")
    p.add_argument("--strength", type=finite, default=1.0, help="h <- h + strength * Δ (0 = unsteered, negative inverts)")
    p.add_argument("--sweep", nargs="?", const="0,0.5,1,2,4,8", help="comma-separated strengths to compare in one table")
    p.add_argument("--raw", action="store_true", help="no chat template (plain continuation)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (reproducible)")

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
    p.add_argument("--grid", help="comma-separated strengths (default: 0.2..2.0, plus 2.5-5 for vector baselines)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens per generation (SPEC §7: 128)")
    p.add_argument("--temperature", type=finite, default=1.0, help="sampling temperature (SPEC §7: 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (SPEC §7: 50; 0 = all)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="generations per batch")
    p.add_argument("--judge-url", help="prompting: an OpenAI-compatible endpoint that writes the steering prompts")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="prompting: the model behind --judge-url")
    p.add_argument("--shard", help="i/n: this process takes every n-th concept from the i-th (0-based) into "
                                   "OUT.shard-i-of-n.jsonl; the last shard to finish merges into OUT "
                                   "(default under torchrun: rank/world size)")

    p = sub.add_parser("merge", help="merge finished eval shards (OUT.shard-i-of-n.jsonl) into OUT")
    p.add_argument("--out", required=True, help="the generations JSONL the shards were written for")
    p.add_argument("--shards", type=positive_int, required=True, help="n, the number of shards")
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

    args = ap.parse_args(argv)
    if args.command == "export" and args.psr:                         # refused before any file is read
        ap.error("export --psr: a PSR adds a different amount at every token (λ(h_t) z, a function of the activation), "
                 "not one constant vector, so it has no vector file; use it with compare/eval --psr or serve.py --psr")
    if args.command == "export" and not (args.method and args.concept_id is not None
                                                         or args.hypernet and args.concept):
        ap.error("export needs --hypernet with --concept (and --prompt), or --method with --concept-id")
    with fileio.one_line_errors(args.debug):
        {"compare": cmd_compare, "eval": cmd_eval, "export": cmd_export, "merge": cmd_merge}[args.command](args)


if __name__ == "__main__":
    main()
