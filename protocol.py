"""Generations files (SPEC §7): the evaluation's sampled answers, made here and scored by judge.py.

    python steer.py eval --hypernet runs/demo/hypernet.safetensors --out runs/demo/gens.jsonl   # writes
    python judge.py runs/demo/gens.jsonl --dry-run                                              # reads

Every generation row: method, split, concept, concept_id, instruction_index (0-9), instruction,
strength, text, seed, producer. The seed depends only on (concept_id, instruction_index, strength), so
every method samples with the same random numbers and a resumed run reproduces the rows it lost;
`producer` fingerprints the checkpoint and settings, and a file holding another producer's rows of
the same method is refused. A row's key is (method, concept_id, instruction_index, strength): a resumed
run, or shards merged into one file (merge_shards), holds each key once.

Two readers, because the two sides need different things: generate_rows appends to a file as it goes,
so read_resumable cuts a partly written last line (a killed run) and generates it again; judge.py reads
finished files, so read_generations refuses any malformed line, naming file and line, rather than
score a different set of rows.
"""
import json
import os
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

import data
import model as M
from lib import dist, fileio

REQUIRED = ("method", "concept", "instruction_index", "instruction", "strength", "text")   # what judge.py reads


# ----------------------------------------------------------------------------- the file, as it is written

def row_key(row):
    return row["method"], int(row["concept_id"]), int(row["instruction_index"]), float(row["strength"])


def read_resumable(path):
    """Rows already in a generations file (a partly written last line is cut off and generated again)."""
    rows = []
    for n, line in enumerate(fileio.complete_lines(path), 1):
        try:
            row = json.loads(line)
            row_key(row)
            rows.append(row)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: not a generations row; fix or remove the file") from None
    return rows


# ----------------------------------------------------------------------------- sampling the rows

def row_seed(concept_id, instruction_index, strength, seed=0):
    return zlib.crc32(f"{seed}:{concept_id}:{instruction_index}:{float(strength)!r}".encode())


def stack_edits(per_row):
    """[{layer: edit}] one per row -> {layer: (B, d) stacked vectors, or the rows' one shared function}."""
    out = {}
    for layer in per_row[0]:
        edits = [e[layer] for e in per_row]
        if torch.is_tensor(edits[0]):
            out[layer] = torch.stack(edits)
        elif all(e is edits[0] for e in edits):
            out[layer] = edits[0]
        else:
            raise ValueError("a batch mixes different per-token functions")
    return out


def generate_rows(base, tok, out, method, split, concepts, instructions, grid, edits_for=None, prompt_for=None,
                  producer="", batch_size=8, max_new_tokens=128, temperature=1.0, top_k=50, seed=0, overwrite=False):
    """SPEC §7: for each (concept_id, concept), its 10 instructions (SPEC §6) x the strength grid, one
    sampled generation each, appended to `out` as JSONL one batch at a time; rows already there are
    skipped, so a killed run resumes. edits_for(concept_id, concept, instructions, chat_ids) -> one
    {layer: edit} per instruction at strength 1 (None: unsteered); prompt_for(concept, instruction) ->
    the user turn. Returns (rows already there, rows written)."""
    old = read_resumable(out)
    foreign = [r for r in old if r["method"] == method and r.get("producer") != producer]
    if foreign and not overwrite:
        raise ValueError(f"{out}: holds {len(foreign)} {method} rows made by another checkpoint or other settings; "
                         "write to another --out, or pass --overwrite to replace them")
    if foreign:
        kept = [r for r in old if r not in foreign]
        fileio.write_jsonl(out, kept)
        old = kept
    done, total = {row_key(r) for r in old}, 0
    jobs = {}                                                         # concept -> rows still to generate
    for cid, concept in concepts:
        for idx, text in enumerate(data.pick_instructions(instructions, cid)):
            for s in grid:
                row = dict(method=method, split=split, concept=concept, concept_id=cid, instruction_index=idx,
                           instruction=text, strength=float(s), text=None, seed=row_seed(cid, idx, s, seed),
                           producer=producer)
                total += 1
                if row_key(row) not in done:
                    jobs.setdefault((cid, concept), []).append(row)
    todo = sum(map(len, jobs.values()))
    with open(out, "a", encoding="utf-8") as f, tqdm(total=total, initial=total - todo, unit="gen", desc=method,
                                                       dynamic_ncols=True) as bar:
        for (cid, concept), rows in jobs.items():                     # one concept at a time: Δ once per (s, x)
            ins = data.pick_instructions(instructions, cid)
            users = [prompt_for(concept, x) if prompt_for else x for x in ins]
            chat_ids = tok.chat_batch(users)
            edits = edits_for(cid, concept, ins, chat_ids) if edits_for else None
            for i in range(0, len(rows), batch_size):
                batch = rows[i:i + batch_size]
                prompts = [chat_ids[r["instruction_index"]] for r in batch]
                steering = None if edits is None else M.Steering(
                    stack_edits([edits[r["instruction_index"]] for r in batch]),
                    torch.tensor([r["strength"] for r in batch]))
                outs = M.generate(base, prompts, max_new_tokens, stop_ids=tok.stop_ids, temperature=temperature,
                                  top_k=top_k, seeds=[r["seed"] for r in batch], steering=steering,
                                  steer_masks=M.steer_after(prompts, tok.chat_prefix_len))
                for r, o in zip(batch, outs):
                    f.write(json.dumps({**r, "text": tok.decode(o)}, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(batch))
    return total - todo, todo


# ----------------------------------------------------------------------------- reading them for the judge

def read_generations(paths):
    """Rows of steer.py's generations JSONL files; ValueError naming file:line on a bad line."""
    rows = []
    for path in paths:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: not a JSON object")
                missing = [k for k in REQUIRED if k not in row]
                if missing:
                    raise ValueError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
                try:
                    row["instruction_index"] = int(row["instruction_index"])
                    row["strength"] = float(row["strength"])
                except (ValueError, TypeError):
                    raise ValueError(f"{path}:{n}: instruction_index and strength must be numbers") from None
                row.setdefault("split", "all")
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- sharded work (steer.py eval --shard, torchrun)

def shard_of(text=None):
    """(i, n) from "--shard i/n" (0 <= i < n), else this process's (rank, world size) under torchrun, else (0, 1)."""
    if text is None:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if dist.launched() else (0, 1)
    try:
        i, n = (int(s) for s in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected i/n such as 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_path(out, i, n):
    """Shard i of n writes OUT.shard-i-of-n.jsonl (resumable like OUT), taking every n-th concept from the i-th,
    and, when done, OUT.shard-i-of-n.jsonl.done. The shard that finds all n done merges them into OUT; on
    machines without a shared disk, copy the shard files and their .done files together and run
    `python steer.py merge --out OUT --shards n`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{i}-of-{n}{out.suffix}")


def merge_shards(out, n):
    """OUT's rows, then each shard's, each row key once, written atomically into OUT. Returns the number of
    rows, or None while a shard is not done. Rows of one key from different producers are refused."""
    shards = [shard_path(out, i, n) for i in range(n)]
    waiting = [str(i) for i, p in enumerate(shards) if not Path(f"{p}.done").exists()]
    if waiting:
        print(f"{out}: shard(s) {', '.join(waiting)} of {n} not done yet; the last one to finish merges")
        return None
    rows = {}
    for path in [Path(out), *shards]:
        for r in read_resumable(path):
            key = row_key(r)
            if rows.setdefault(key, r).get("producer") != r.get("producer"):
                raise ValueError(f"{path}: row {key} was made by another checkpoint or other settings "
                                 f"than {out}'s; merge into another --out")
    fileio.write_jsonl(out, rows.values())
    print(f"merged {n} shards into {out}: {len(rows)} rows")
    return len(rows)
