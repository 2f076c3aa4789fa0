"""Steering with HyperSteer, the AxBench evaluation generations, the baselines and vector export
(SPEC §4, §6, §7, §8).

    # unsteered and steered answers side by side (greedy; CPU, seconds); --sweep for several strengths
    python steer.py --hypernet runs/demo/hypernet.safetensors --concept "mentions of cats" \
        --prompt "Give me tips for a picnic" --sweep
    # SPEC §7 generations -> JSONL for judge.py (resumable); --instructions demo runs offline
    python steer.py eval --hypernet runs/demo/hypernet.safetensors --split held-out --out runs/demo/gens.jsonl
    python steer.py eval --hypernet runs/demo/hypernet.safetensors --split held-out --out /tmp/gens.jsonl \
        --instructions demo --grid 0.5,1 --max-concepts 2 --max-new-tokens 16       # tiny CPU variant
    # baselines on the same split, base model and layer (SPEC §8), into the same file
    python steer.py baseline --method diffmean --hypernet runs/demo/hypernet.safetensors --out runs/demo/gens.jsonl
    # a steering vector as safetensors + llama.cpp control-vector GGUF (SPEC §4)
    python steer.py export --hypernet runs/demo/hypernet.safetensors --concept "mentions of cats" \
        --prompt "Give me tips for a picnic" --out runs/demo/cats        # -> cats.safetensors, cats.gguf
    python judge.py runs/demo/gens.jsonl --dry-run

Every generation row: method, split, concept, concept_id, instruction_index (0-9), instruction,
strength, text, seed. The seed depends only on (concept_id, instruction_index, strength), so every
method samples with the same random numbers and a resumed run reproduces the rows it lost.
"""
import argparse
import itertools
import json
import random
import sys
import textwrap
import warnings
import zlib
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import hypernet as H
import model as M
import train
from hub import hf_file

DEMO_INSTRUCTIONS = Path(__file__).resolve().parent / "demo" / "instructions.json"
HYPER_GRID = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]   # SPEC §7: Δ unnormalised, around 0.2-2
VECTOR_GRID = HYPER_GRID + [2.5, 3.0, 4.0, 5.0]                    # AxBench's grid, times max_act (SPEC §8)
METHODS = {"prompting": "Prompting", "diffmean": "DiffMean", "reft-r1": "ReFT-r1"}
PROMPT_TEMPLATE = "In your answer, include content about {concept}, even if it seems unrelated to the question."


# ----------------------------------------------------------------------------- instructions (SPEC §6)

def load_instructions(source="alpaca", revision="main"):
    """'alpaca': AlpacaEval's 805 instructions (fetched once over requests into the hub cache); 'demo':
    the bundled 60, an offline stand-in for AlpacaEval under the same selection rule; else a JSON
    list of {"instruction": ...} objects or strings."""
    if source == "alpaca":
        path = hf_file("tatsu-lab/alpaca_eval", "alpaca_eval.json", revision, kind="dataset")
    else:
        path = DEMO_INSTRUCTIONS if source == "demo" else Path(source)
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
        return [x["instruction"] if isinstance(x, dict) else str(x) for x in items]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a JSON list of instructions ({type(e).__name__}: {e})") from None


def pick_instructions(instructions, concept_id, n=10):
    """SPEC §6: the first n of numpy.random.RandomState(concept_id).permutation(len(instructions))
    (what AxBench's pandas df.sample(n, random_state=concept_id) draws)."""
    order = np.random.RandomState(concept_id).permutation(len(instructions))[:n]
    return [instructions[i] for i in order]


def row_seed(concept_id, instruction_index, strength, seed=0):
    return zlib.crc32(f"{seed}:{concept_id}:{instruction_index}:{float(strength)!r}".encode())


# ----------------------------------------------------------------------------- steering vectors

@torch.no_grad()
def activations(base, tok, rows, layer, max_len=256, batch_size=8):
    """Layer-L residuals (N_tokens, d) over rows' prompt + output tokens after the chat prefix, no padding."""
    dev, out = base.model.embed_tokens.weight.device, []
    examples = data.encode(tok, rows, lambda t, c, i: [t.bos_id], max_len, quiet=True)
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(dev) for k, v in data.collate(examples[i:i + batch_size], base.cfg.pad_token_id).items()}
        out.append(base.residual(b["ids"], b["pad"], layer)[b["steer"]].float())
    return torch.cat(out)


def diffmean(pos, neg):
    """SPEC §8: w = mean(positive activations) - mean(negative activations), unit length."""
    w = pos.float().mean(0) - neg.float().mean(0)
    return w / w.norm()


def train_reft_r1(base, tok, rows, layer, max_len=256, epochs=3, batch_size=6, lr=1e-2, k=8, l1=0.005, seed=0):
    """SPEC §8 ReFT-r1: latent z_t = ReLU(h_t · w); the steered pass adds mean(top-k z) * w at every steered
    position; loss = LM cross-entropy on the outputs + λ mean|z| over the other positions, λ ramped
    0 -> l1; w stays unit length (gradient parallel to w removed, renormalised after every step)."""
    dev = base.model.embed_tokens.weight.device
    examples = data.encode(tok, rows, lambda t, c, i: [t.bos_id], max_len, quiet=True)
    w = torch.full((base.cfg.hidden_size,), 0.01, device=dev, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    total, step = epochs * -(-len(examples) // batch_size), 0
    for epoch in range(epochs):
        for b in data.batches(examples, batch_size, seed, epoch, base.cfg.pad_token_id):
            b = {key: v.to(dev) for key, v in b.items()}
            with torch.no_grad():
                h = base.residual(b["ids"], b["pad"], layer)                      # (B, T, d), frozen
            mask = b["steer"]
            z = torch.relu(h.float() @ w)                                          # (B, T) latents
            top = z.masked_fill(~mask, -1.0).topk(min(k, z.shape[1]), dim=-1)     # (B, k)
            real = top.values >= 0                                                 # rows shorter than k
            mean_top = (top.values.clamp(min=0) * real).sum(-1) / real.sum(-1).clamp(min=1)
            steered = M.add_steering(h, M.Steer(layer, mean_top[:, None] * w, 1.0, mask))
            out = base.run_from(steered, layer, b["pad"])
            sel = b["labels"] != -100
            loss = F.cross_entropy(base.head(out[sel]).float(), b["labels"][sel])
            rest = mask.scatter(1, top.indices, False)                             # non-top-k positions
            if rest.any():
                loss = loss + l1 * step / max(total - 1, 1) * z[rest].abs().mean()
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                w.grad -= (w.grad @ w) / (w @ w) * w                              # stay on the sphere
                opt.step()
                w /= w.norm()
            step += 1
    return w.detach()


def negatives(rows, concept_id, n):
    """SPEC §8: the concept's genre's negatives (AxBench: category negative, concept_id -1), at most n.
    Data without negatives (the bundled demo) gets a stand-in: the other concepts' positives of that genre."""
    genre = next(r["concept_genre"] for r in rows if r["concept_id"] == concept_id)
    neg = [r for r in rows if r["category"] == "negative" and r["concept_genre"] == genre]
    neg = neg or [r for r in data.positives(rows) if r["concept_id"] != concept_id and r["concept_genre"] == genre]
    if not neg:
        raise ValueError(f"concept {concept_id}: no negatives of genre {genre!r} in the data")
    return random.Random(concept_id).sample(neg, min(n, len(neg)))                # a fixed sample


def vector_baseline(base, tok, rows, concept_id, layer, method, max_len=256):
    """(w, max_act) for DiffMean or ReFT-r1 (SPEC §8); Δ = strength * max_act * w, max_act the largest
    latent h_t · w on the concept's positive examples."""
    pos = [r for r in data.positives(rows) if r["concept_id"] == concept_id]
    neg = negatives(rows, concept_id, len(pos))
    acts = activations(base, tok, pos, layer, max_len)
    if method == "diffmean":
        w = diffmean(acts, activations(base, tok, neg, layer, max_len))
    else:
        w = train_reft_r1(base, tok, pos + neg, layer, max_len)
    return w, (acts @ w).max().item()


def steering_prompt(concept, judge_cfg=None):
    """The prompting baseline's instruction (SPEC §8): a fixed template, or written by an LLM through
    judge.py's cached client when an endpoint is configured."""
    if judge_cfg is None:
        return PROMPT_TEMPLATE.format(concept=concept)
    import judge
    ask = (f'Write one short instruction telling an AI assistant to include content about "{concept}" in its '
           "answer to any question, even where it seems unrelated. Reply with the instruction alone.")
    reply = judge.chat([{"role": "user", "content": ask}], judge_cfg)
    return reply.strip().strip('"') or PROMPT_TEMPLATE.format(concept=concept)


# ----------------------------------------------------------------------------- generation (SPEC §7)

def steered_generate(base, layer, prompts, steer_from, vectors=None, seeds=0, max_new_tokens=128, temperature=1.0):
    """One batched KV-cache generate with a per-row Δ already times its strength, vectors (B, d); a zero
    row adds exactly 0, so it is the unsteered model. Steered: prompt positions from steer_from[b] and
    every generated token (SPEC §4)."""
    steer = None if vectors is None else M.Steer(layer, vectors, 1.0)
    return M.generate(base, prompts, max_new_tokens, temperature, seeds=seeds, steer=steer, steer_from=steer_from)


def row_key(row):
    return row["method"], int(row["concept_id"]), int(row["instruction_index"]), float(row["strength"])


def read_done(path):
    """Keys of the rows already in a generations file. A crash can leave a partly written last line:
    it is cut off (with a warning) and generated again."""
    path = Path(path)
    if not path.exists():
        return set()
    raw = path.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1]
    if len(keep) < len(raw):
        warnings.warn(f"{path}: dropping a partly written last line ({len(raw) - len(keep)} bytes)", stacklevel=2)
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    done = set()
    for n, line in enumerate(keep.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                done.add(row_key(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: not a generations row; fix or remove the file") from None
    return done


def generate_rows(base, tok, out, method, split, concepts, instructions, grid, layer, deltas=None,
                  prompt_for=None, batch_size=8, max_new_tokens=128, temperature=1.0, seed=0):
    """SPEC §7: for each (concept_id, concept), its 10 instructions (SPEC §6) x the strength grid, one
    sampled generation each, appended to `out` as JSONL one batch at a time. Rows already there are
    skipped, so a killed run resumes. deltas(concept_id, concept, instructions) -> (n, d) Δ at strength 1,
    or None for none; prompt_for(concept, instruction) -> the user turn (default: the instruction).
    Returns (rows already there, rows written)."""
    done, jobs, total = read_done(out), [], 0
    for cid, concept in concepts:
        for idx, text in enumerate(pick_instructions(instructions, cid)):
            for s in grid:
                row = dict(method=method, split=split, concept=concept, concept_id=cid, instruction_index=idx,
                           instruction=text, strength=float(s), text=None, seed=row_seed(cid, idx, s, seed))
                total += 1
                if row_key(row) not in done:  # text is filled in once generated
                    jobs.append(row)
    cache = {}  # {concept_id: (10, d) Δ} of the current concept (jobs come concept by concept)
    with open(out, "a", encoding="utf-8") as f, tqdm(total=total, initial=total - len(jobs), unit="gen",
                                                       desc=method, dynamic_ncols=True) as bar:
        for i in range(0, len(jobs), batch_size):
            batch, prompts, vectors = jobs[i:i + batch_size], [], []
            for r in batch:
                if deltas is not None and r["concept_id"] not in cache:
                    cache = {r["concept_id"]: deltas(r["concept_id"], r["concept"],
                                                     pick_instructions(instructions, r["concept_id"]))}
                user = prompt_for(r["concept"], r["instruction"]) if prompt_for else r["instruction"]
                prompts.append(tok.chat(user))
                if deltas is not None:
                    vectors.append(r["strength"] * cache[r["concept_id"]][r["instruction_index"]])
            outs = steered_generate(base, layer, [p for p, _ in prompts], [n for _, n in prompts],
                                    torch.stack(vectors) if vectors else None, [r["seed"] for r in batch],
                                    max_new_tokens, temperature)
            for r, o in zip(batch, outs):
                f.write(json.dumps({**r, "text": tok.decode(o)}, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    return total - len(jobs), len(jobs)


# ----------------------------------------------------------------------------- vector files (SPEC §4)

def save_vector(prefix, vector, layer, model_hint, method, concept):
    """PREFIX.safetensors (one float32 `direction.{L}` [d], string metadata model_hint, layer, d_model, method,
    concept) and PREFIX.gguf, a llama.cpp control vector. llama.cpp adds `direction.N` to the output of
    0-indexed block N (its loader stores it at data[N - 1] and its apply loop maps that back to block N),
    the SPEC §4 convention, so no shift is needed; it refuses direction.0, though, and steers every
    position (BOS and chat template included), not only those after the chat prefix."""
    from safetensors.torch import save_file
    import gguf
    v = vector.detach().float().cpu().contiguous()
    meta = {"model_hint": model_hint, "layer": str(layer), "d_model": str(v.numel()), "method": method,
            "concept": concept}
    save_file({f"direction.{layer}": v}, f"{prefix}.safetensors", metadata=meta)
    if layer == 0:
        warnings.warn("llama.cpp rejects direction.0: the GGUF will not load there", stacklevel=2)
    w = gguf.GGUFWriter(f"{prefix}.gguf", "controlvector")                  # general.architecture
    w.add_string("controlvector.model_hint", model_hint)                    # what repeng writes
    w.add_uint32("controlvector.layer_count", 1)
    for k in ("method", "concept"):
        w.add_string(f"controlvector.{k}", meta[k])
    w.add_tensor(f"direction.{layer}", v.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_vector(path):
    """(vector (d,), layer, metadata) from a save_vector file, .safetensors or .gguf."""
    if str(path).endswith(".gguf"):
        import gguf
        r = gguf.GGUFReader(str(path))
        t = next(t for t in r.tensors if t.name.startswith("direction."))
        meta = {k.split(".", 1)[1]: r.fields[k].contents() for k in r.fields if k.startswith("controlvector.")}
        return torch.tensor(np.array(t.data, dtype=np.float32)), int(t.name.split(".")[1]), meta
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        (name,), meta = list(f.keys()), f.metadata() or {}
        return f.get_tensor(name), int(name.split(".")[1]), meta


# ----------------------------------------------------------------------------- runs and splits

def load_run(args):
    """The run's TrainConfig (from the checkpoint's train_config metadata, else the demo preset; --model,
    --data and --layer override), base model, tokenizer, hypernetwork or None, and steering layer."""
    known, tc = {f.name for f in fields(train.TrainConfig)}, {}
    if getattr(args, "hypernet", None):
        from safetensors import safe_open
        if not Path(args.hypernet).is_file():
            raise FileNotFoundError(f"{args.hypernet}: no such hypernetwork checkpoint")
        try:
            with safe_open(args.hypernet, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise ValueError(f"{args.hypernet}: not a readable safetensors file ({e})") from None
        if "train_config" not in meta:
            warnings.warn(f"{args.hypernet}: no train_config metadata; using the demo preset's split", stacklevel=2)
        tc = json.loads(meta.get("train_config", "{}"))
        tc.update({k: v for k, v in json.loads(meta.get("hyper_config", "{}")).items() if k == "layer"})
    cfg = replace(train.PRESETS["demo"], **{k: v for k, v in tc.items() if k in known})
    given = {k: getattr(args, k, None) for k in ("model", "data", "layer")}
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    base, tok = M.load(cfg.model, args.device, getattr(torch, dtype))
    hyper = H.load_hypernet(args.hypernet, base).eval() if getattr(args, "hypernet", None) else None
    return cfg, base, tok, hyper, cfg.layer


def split_concepts(rows, cfg, split, concept_ids=None):
    """[(concept_id, concept)] of a split, rebuilt exactly as train.py split the run's data, so held-out
    concepts were never trained on; concept_ids picks a list instead."""
    pos = data.positives(rows)
    names = {r["concept_id"]: r["output_concept"] for r in pos}
    if concept_ids:
        unknown = [c for c in concept_ids if c not in names]
        if unknown:
            raise ValueError(f"no concept with id {', '.join(map(str, unknown))} in the data")
        return [(c, names[c]) for c in concept_ids]
    out_ids = {r["concept_id"] for r in train.split_rows(cfg, pos)[2]}
    return sorted((c, n) for c, n in names.items() if (c in out_ids) == (split == "held-out"))


def cmd_generate(args, method):
    cfg, base, tok, hyper, layer = load_run(args)
    layer = base.layer_index(layer)
    rows = train.load_data(cfg)
    ids = [int(c) for c in args.concept_ids.split(",")] if args.concept_ids else None
    concepts = split_concepts(rows, cfg, args.split, ids)[:args.max_concepts or None]
    split = "list" if ids else args.split
    instructions = load_instructions(args.instructions, args.alpaca_revision)
    grid = [float(s) for s in args.grid.split(",")] if args.grid else None
    deltas, prompt_for, name = None, None, METHODS.get(method)
    if method == "hypersteer":
        name = f"HyperSteer {hyper.hcfg.variant.replace('_', ' ')}"
        deltas = lambda cid, concept, ins: H.deltas(base, tok, hyper, concept, ins)
        grid = grid or HYPER_GRID
    elif method == "prompting":  # one row per instruction, strength 1: there is no knob to select
        judge_cfg = None
        if args.judge_url:
            import judge
            judge_cfg = judge.JudgeConfig(base_url=args.judge_url, model=args.judge_model,
                                          cache_dir=str(Path(args.out).parent / ".judge_cache"))
        texts = {c: steering_prompt(c, judge_cfg) for _, c in concepts}
        prompt_for, grid = (lambda concept, instruction: f"{texts[concept]}\n\n{instruction}"), [1.0]
    else:
        def deltas(cid, concept, ins):
            w, max_act = vector_baseline(base, tok, rows, cid, layer, method, cfg.max_len)
            return (max_act * w).expand(len(ins), -1)
        grid = grid or VECTOR_GRID
    print(f"{name}: {len(concepts)} {split} concepts x {min(10, len(instructions))} instructions x {len(grid)} "
          f"strengths, layer {layer}, up to {args.max_new_tokens} new tokens at temperature {args.temperature}")
    skipped, made = generate_rows(base, tok, args.out, name, split, concepts, instructions, grid, layer, deltas,
                                  prompt_for, args.batch_size, args.max_new_tokens, args.temperature, args.seed)
    print(f"wrote {made} rows to {args.out} ({skipped} already there)")


def cmd_export(args):
    cfg, base, tok, hyper, layer = load_run(args)
    layer = base.layer_index(layer)
    if args.method:
        rows = train.load_data(cfg)
        (_, concept), = split_concepts(rows, cfg, None, [args.concept_id])
        w, max_act = vector_baseline(base, tok, rows, args.concept_id, layer, args.method, cfg.max_len)
        vector, method = max_act * w, METHODS[args.method]          # strength 1 = max_act (SPEC §8)
    else:
        vector = H.deltas(base, tok, hyper, args.concept, [args.prompt])[0]
        method, concept = f"HyperSteer {hyper.hcfg.variant.replace('_', ' ')}", args.concept
    save_vector(args.out, vector, layer, base.cfg.model_type, method, concept)
    print(f"{method} vector for {concept!r}, layer {layer}, |Δ| = {vector.norm():.2f}: "
          f"wrote {args.out}.safetensors and {args.out}.gguf")


def cmd_steer(args):
    cfg, base, tok, hyper, layer = load_run(args)
    if hyper is not None and args.concept:
        delta = H.deltas(base, tok, hyper, args.concept, [args.prompt])[0]
    elif args.vector and hyper is None:
        delta, layer, meta = load_vector(args.vector)
        args.concept = f"{meta.get('concept')!r} ({meta.get('method')} vector from {args.vector})"
    else:
        raise ValueError("give --hypernet with --concept, or --vector")
    grid = [float(s) for s in args.sweep.split(",")] if args.sweep else [0.0, args.strength]
    ids, n_prefix = tok.chat(args.prompt)
    with torch.no_grad():
        h = base.residual(torch.tensor([ids], device=base.model.embed_tokens.weight.device), None, layer)[0, n_prefix:]
    print(f"|Δ| = {delta.norm():.1f} at layer {layer}; the residual there has mean norm "
          f"{h.float().norm(dim=-1).mean():.1f}")
    outs = steered_generate(base, layer, [ids] * len(grid), [n_prefix] * len(grid),
                            torch.stack([s * delta.to(base.model.embed_tokens.weight) for s in grid]),
                            [args.seed] * len(grid), args.max_new_tokens, args.temperature)
    texts = [tok.decode(o).replace("\n", " ") for o in outs]
    print(f"prompt:  {args.prompt}\nconcept: {args.concept}\n")
    if args.sweep:  # one row per strength: watch the concept appear, then fluency break at high strength
        for s, t in zip(grid, texts):
            print(f"strength {s:>4g} | {t}\n")
        return
    cols = [textwrap.wrap(t, 56) or [""] for t in texts]
    print(f"{'unsteered':<57}| steered, strength {args.strength:g}\n{'-' * 57}+{'-' * 57}")
    for a, b in itertools.zip_longest(*cols, fillvalue=""):
        print(f"{a:<57}| {b}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv and argv[0] in ("eval", "baseline", "export") else "steer"
    ap = argparse.ArgumentParser(prog=f"steer.py{'' if cmd == 'steer' else ' ' + cmd}",
                                 description=__doc__.split("\n\n")[0],
                                 epilog="commands: steer.py (interactive) | steer.py eval | steer.py baseline | "
                                        "steer.py export; each takes --help")
    add = ap.add_argument
    add("--hypernet", required=cmd == "eval", help="trained hypernetwork checkpoint (sets model, data split and layer)")
    add("--model", help="base model folder or hub id (default: the checkpoint's, else the demo model)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    add("--dtype", choices=["float32", "bfloat16"], help="base weights dtype (default: bf16 on cuda, else fp32)")
    add("--seed", type=int, default=0, help="sampling seed (mixed with concept, instruction and strength)")
    if cmd == "steer":
        add("--vector", help="steer with an exported .safetensors/.gguf vector instead of a hypernetwork")
        add("--concept", default="", help="steering prompt s (a concept)")
        add("--prompt", required=True, help="base prompt x (an instruction, put in the chat template)")
        add("--strength", type=float, default=1.0, help="h <- h + strength * Δ (0 = unsteered, negative inverts)")
        add("--sweep", nargs="?", const="0,0.5,1,2,4,8", help="comma-separated strengths to compare in one table")
        add("--max-new-tokens", type=int, default=64, help="tokens to generate")
        add("--temperature", type=float, default=0.0, help="0 = greedy (reproducible)")
    if cmd in ("baseline", "export"):
        add("--method", required=cmd == "baseline", help="baseline (SPEC §8)",
            choices=list(METHODS) if cmd == "baseline" else ["diffmean", "reft-r1"])
        add("--data", help="AxBench .parquet/.jsonl or dataset:path (default: the checkpoint's, else the demo)")
        add("--layer", type=int, help="steering layer without a checkpoint (default: the demo preset's)")
    if cmd in ("eval", "baseline"):
        add("--out", required=True, help="generations JSONL, appended to and resumed")
        add("--split", default="held-out", choices=["held-in", "held-out"], help="concepts to evaluate")
        add("--concept-ids", help="comma-separated concept ids instead of a split (split 'list')")
        add("--max-concepts", type=int, default=0, help="only the first N concepts of the split (0 = all)")
        add("--instructions", default="alpaca", help="alpaca (AlpacaEval, downloaded) | demo (bundled, offline) | PATH")
        add("--alpaca-revision", default="main", help="revision of tatsu-lab/alpaca_eval to pin")
        add("--grid", help="comma-separated strengths (default: 0.2..2.0, plus 2.5-5 for vector baselines)")
        add("--max-new-tokens", type=int, default=128, help="tokens per generation (SPEC §7: 128)")
        add("--temperature", type=float, default=1.0, help="sampling temperature (SPEC §7: 1.0)")
        add("--batch-size", type=int, default=8, help="generations per batch")
        add("--judge-url", help="prompting: an OpenAI-compatible endpoint that writes the steering prompts")
        add("--judge-model", default="gpt-4o-mini", help="prompting: the model behind --judge-url")
    if cmd == "export":
        add("--concept", help="HyperSteer: the steering prompt s")
        add("--prompt", default="", help="HyperSteer: the base prompt x that Δ is computed for")
        add("--concept-id", type=int, help="DiffMean / ReFT-r1: the concept to train a vector for")
        add("--out", required=True, help="output prefix: writes PREFIX.safetensors and PREFIX.gguf")
    args = ap.parse_args(argv[cmd != "steer":])
    if cmd == "export" and not (args.method and args.concept_id is not None or args.hypernet and args.concept):
        ap.error("export needs --hypernet with --concept (and --prompt), or --method with --concept-id")
    try:
        if cmd == "steer":
            cmd_steer(args)
        elif cmd == "export":
            cmd_export(args)
        else:
            cmd_generate(args, "hypersteer" if cmd == "eval" else args.method)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
