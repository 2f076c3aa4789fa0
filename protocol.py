"""The AxBench steering evaluation (SPEC §6, §7), in the order the paper runs it: the concepts of a split and
the 10 instructions of each concept, the strength grid, the seeds, the generations file and its resume (and its
shards), then the selection on instructions 0-4 and the score on 5-9. steer.py eval samples the rows
(generate_rows), judge.py rates them and calls summarize.

    python steer.py eval --hypernet runs/demo/hypernet.safetensors --out runs/demo/gens.jsonl   # writes
    python judge.py runs/demo/gens.jsonl --dry-run                                              # reads
    python steer.py eval --method diffmean --split held-in --instructions demo --grid 1,2 --max-concepts 1 \
        --max-new-tokens 16 --out /tmp/gens.jsonl                                             # tiny CPU variant

Every generation row: method, split, concept, concept_id, instruction_index (0-9), instruction,
strength, text, seed, producer. The seed depends only on (concept_id, instruction_index, strength), so
every method samples with the same random numbers and a resumed run reproduces the rows it lost;
`producer` fingerprints the checkpoint and settings, and a file holding another producer's rows of
the same method is refused. A row's key is (method, concept_id, instruction_index, strength): a resumed
run, or shards merged into one file (merge_shards), holds each key once. The file being written is read
append-only (read_resumable: a torn last line is generated again); finished files are read strictly
(read_generations: any malformed line is an error naming file and line). Rows used together pass check_rows:
one method's rows from one producer, and (for the judge) each key once; a merge also checks each shard file
against the row counts its .done file recorded.
"""
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

import data
import model as M
from lib import dist, fileio

REQUIRED = ("method", "concept", "instruction_index", "instruction", "strength", "text")   # what judge.py reads
CRITERIA = ("concept", "instruction", "fluency")   # the judge's three ratings of a generation


# ----------------------------------------------------------------------------- concepts and their instructions (SPEC §5, §6)

def concepts_of_split(rows, settings, split, concept_ids=None):
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


def pick_instructions(instructions, concept_id, n=10):
    """SPEC §6: the first n of numpy.random.RandomState(concept_id).permutation(len(instructions))
    (what AxBench's pandas df.sample(n, random_state=concept_id) draws)."""
    order = np.random.RandomState(concept_id).permutation(len(instructions))[:n]
    return [instructions[i] for i in order]



# ----------------------------------------------------------------------------- the strength grid and the seeds

HYPER_GRID = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]   # SPEC §7: Δ unnormalised, around 0.2-2
VECTOR_GRID = HYPER_GRID + [2.5, 3.0, 4.0, 5.0]                    # AxBench's grid, times max_act (SPEC §8)


def parse_grid(text, flag="--grid"):
    try:
        grid = [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not grid or not all(math.isfinite(s) for s in grid):
        raise ValueError(f"{flag}: strengths must be finite numbers, got {text!r}")
    return grid


def row_seed(concept_id, instruction_index, strength, seed=0):
    return zlib.crc32(f"{seed}:{concept_id}:{instruction_index}:{float(strength)!r}".encode())


# ----------------------------------------------------------------------------- a method and its sampling

@dataclass
class Method:
    """One evaluated method, as generate_rows samples it (steer.py builds it: steer.method_for)."""
    name: str                             # "HyperSteer cross attention", "DiffMean", "Prompting", ...
    grid: list                            # the strengths to sample
    edits_for: Optional[Callable] = None  # (concept_id, concept, instructions, chat_ids) -> one {layer: edit} per
                                          #   instruction at strength 1; None: nothing is added (prompting)
    prompt_for: Optional[Callable] = None  # (concept, instruction) -> the user turn; None: the instruction itself
    source: Optional[str] = None          # the file it comes from, fingerprinted into the rows' producer


@dataclass
class Sampling:
    """How each generation is sampled (SPEC §7)."""
    max_new_tokens: int = 128             # SPEC §7: up to 128 new tokens
    temperature: float = 1.0              # SPEC §7: 1.0
    top_k: int = 50                       # SPEC §7: Hugging Face's default of 50 (0 = all)
    seed: int = 0                         # mixed into every row's seed


# ----------------------------------------------------------------------------- the generations file and its resume

def row_key(row):
    return row["method"], int(row["concept_id"]), int(row["instruction_index"]), float(row["strength"])


def read_resumable(path):
    """Rows already in a generations file (a partly written last line is cut off and generated again)."""
    rows = []
    for n, row in fileio.read_jsonl(path, "generations file", append_only=True):
        try:
            row_key(row)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: not a generations row; fix or remove the file") from None
        rows.append(row)
    return rows


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


def generate_rows(base, tok, out, method: Method, *, split, concepts, instructions, sampling: Sampling,
                  producer="", batch_size=8, overwrite=False):
    """SPEC §7: for each (concept_id, concept), its 10 instructions (SPEC §6) x the method's strength grid, one
    sampled generation each, appended to `out` as JSONL one batch at a time; rows already there are skipped,
    so a killed run resumes. Returns (rows already there, rows written)."""
    name, grid, edits_for, prompt_for = method.name, method.grid, method.edits_for, method.prompt_for
    old = read_resumable(out)
    foreign = [r for r in old if r["method"] == name and r.get("producer") != producer]
    if foreign and not overwrite:
        raise ValueError(f"{out}: holds {len(foreign)} {name} rows made by another checkpoint or other settings; "
                         "write to another --out, or pass --overwrite to replace them")
    if foreign:
        kept = [r for r in old if r not in foreign]
        fileio.write_jsonl(out, kept)
        old = kept
    done, total = {row_key(r) for r in old}, 0
    jobs = {}                                                         # concept -> rows still to generate
    for cid, concept in concepts:
        for idx, text in enumerate(pick_instructions(instructions, cid)):
            for s in grid:
                row = dict(method=name, split=split, concept=concept, concept_id=cid, instruction_index=idx,
                           instruction=text, strength=float(s), text=None, seed=row_seed(cid, idx, s, sampling.seed),
                           producer=producer)
                total += 1
                if row_key(row) not in done:
                    jobs.setdefault((cid, concept), []).append(row)
    todo = sum(map(len, jobs.values()))
    with open(out, "a", encoding="utf-8") as f, tqdm(total=total, initial=total - todo, unit="gen", desc=name,
                                                       dynamic_ncols=True) as bar:
        for (cid, concept), rows in jobs.items():                     # one concept at a time: Δ once per (s, x)
            ins = pick_instructions(instructions, cid)
            users = [prompt_for(concept, x) if prompt_for else x for x in ins]
            chat_ids = tok.chat_batch(users)
            edits = edits_for(cid, concept, ins, chat_ids) if edits_for else None
            for i in range(0, len(rows), batch_size):
                batch = rows[i:i + batch_size]
                prompts = [chat_ids[r["instruction_index"]] for r in batch]
                steering = None if edits is None else M.Steering(
                    stack_edits([edits[r["instruction_index"]] for r in batch]),
                    torch.tensor([r["strength"] for r in batch]))
                outs = M.generate(base, prompts, sampling.max_new_tokens, stop_ids=tok.stop_ids,
                                  temperature=sampling.temperature, top_k=sampling.top_k,
                                  seeds=[r["seed"] for r in batch], steering=steering,
                                  steer_masks=M.steer_after(prompts, tok.chat_prefix_len))
                for r, o in zip(batch, outs):
                    f.write(json.dumps({**r, "text": tok.decode(o)}, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(batch))
    return total - todo, todo


# ----------------------------------------------------------------------------- reading finished files (judge.py)

def check_rows(placed, repeats_ok=False):
    """The rule every reader of generations applies to the rows it is about to use together, placed as
    [("file:line", row)]: one method's rows come from one producer (a second checkpoint or other settings under
    the same method name would be averaged into its score), and, unless repeats_ok (a merge, which keeps one
    copy of a row it finds twice), each key once (a file given twice, or two runs' files). Errors name both places."""
    producer, first = {}, {}
    for where, r in placed:
        m, p = r["method"], r.get("producer")
        if producer.setdefault(m, (p, where))[0] != p:
            raise ValueError(f"{producer[m][1]} and {where}: {m} rows from two producers (another checkpoint or "
                             "other settings under one method name); keep each run's rows in their own file")
        key = (m, r.get("concept_id", r["concept"]), r["instruction_index"], r["strength"])
        if key in first and not repeats_ok:
            raise ValueError(f"{first[key]} and {where}: the same {m} row (concept {key[1]}, instruction {key[2]}, "
                             f"strength {key[3]}) twice: a file given twice, or two runs' rows in one file")
        first.setdefault(key, where)


def read_generations(paths):
    """Rows of steer.py's finished generations JSONL files, checked together (check_rows); ValueError naming
    file:line on a bad line, and naming both files on a file given twice or rows of two producers."""
    given = {}
    for path in paths:
        if (real := Path(path).resolve()) in given:
            raise ValueError(f"{path}: given twice" + (f" (also as {given[real]})" if str(given[real]) != str(path)
                                                       else ""))
        given[real] = path
    rows, placed = [], []
    for path in paths:
        before = len(placed)
        for n, row in fileio.read_jsonl(path, "generations file"):
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: not a JSON object")
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
            idx, strength = row["instruction_index"], row["strength"]
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < 10:
                raise ValueError(f"{path}:{n}: instruction_index must be an integer 0-9 (SPEC §7), got {idx!r}")
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
                raise ValueError(f"{path}:{n}: strength must be a finite number, got {strength!r}")
            row["strength"] = float(strength)
            bad = [k for k in ("method", "concept", "instruction", "text") if not isinstance(row[k], str)]
            if bad:                                   # a null text would be sent to the judge, and paid for, as "None"
                raise ValueError(f"{path}:{n}: {', '.join(bad)} must be text")
            row.setdefault("split", "all")
            rows.append(row)
            placed.append((f"{path}:{n}", row))
        if len(placed) == before:
            raise ValueError(f"{path}: holds no generations rows")
    check_rows(placed)
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
    and, when done, OUT.shard-i-of-n.jsonl.done (mark_done: the rows it holds, per method). The shard that finds
    all n done merges them into OUT; on machines without a shared disk, copy the shard files and their .done
    files together and run `python steer.py merge --out OUT --shards n`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{i}-of-{n}{out.suffix}")


def mark_done(shard, method):
    """Record in SHARD.done how many rows of `method` the finished `shard` holds (other methods' counts are kept),
    so that a merge can tell a whole shard file from a missing or cut-short one."""
    done, rows = Path(f"{shard}.done"), sum(r["method"] == method for r in read_resumable(shard))
    try:
        counts = read_done(done) if done.exists() else {}
    except ValueError:                                                # an older or damaged marker: this run's count
        counts = {}
    fileio.write_text(done, json.dumps({**counts, method: rows}) + "\n")


def read_done(done):
    counts = fileio.read_json(done, "shard .done file")
    if not isinstance(counts, dict) or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
        raise ValueError(f"{done}: malformed .done file (expected {{method: rows}}); run that shard again")
    return counts


def merge_shards(out, n):
    """OUT's rows, then each shard's, each row key once, written atomically into OUT. Returns the number of
    rows, or None while a shard is not done. Refused, naming the files: a shard whose file holds fewer or more
    rows than its .done file promised (missing, cut short, or written to since), and one method's rows from
    two producers (shards run with other checkpoints or settings into one --out)."""
    shards = [shard_path(out, i, n) for i in range(n)]
    waiting = [str(i) for i, p in enumerate(shards) if not Path(f"{p}.done").exists()]
    if waiting:
        print(f"{out}: shard(s) {', '.join(waiting)} of {n} not done yet; the last one to finish merges")
        return None
    placed = [(f"{out}:{i}", r) for i, r in enumerate(read_resumable(out), 1)]
    for i, path in enumerate(shards):
        promised, rows = read_done(Path(f"{path}.done")), read_resumable(path)
        if not path.exists():
            raise ValueError(f"{path}: missing, though {path}.done says it is finished; run the eval with "
                             f"--shard {i}/{n} again")
        held = {m: sum(r["method"] == m for r in rows) for m in {*promised, *(r["method"] for r in rows)}}
        wrong = {m: k for m, k in held.items() if k != promised.get(m, 0)}
        if wrong:
            m = next(iter(wrong))
            raise ValueError(f"{path}: holds {wrong[m]} {m} rows, its .done file promised {promised.get(m, 0)} "
                             f"(cut short, or written to since); run that eval with --shard {i}/{n} again")
        placed += [(f"{path}:{j}", r) for j, r in enumerate(rows, 1)]
    check_rows(placed, repeats_ok=True)
    merged = {}
    for _, r in placed:
        merged.setdefault(row_key(r), r)                              # a row found twice (a re-merge): one copy
    fileio.write_jsonl(out, merged.values())
    print(f"merged {n} shards into {out}: {len(merged)} rows")
    return len(merged)


# ----------------------------------------------------------------------------- selection on instructions 0-4, score on 5-9

def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def choose_strength(rows):
    """SPEC §7 for one concept: the strength with the best mean score on instructions 0-4 (ties ->
    the smaller |strength|, the weaker intervention), scored by its mean on instructions 5-9."""
    by_strength = {}
    for r in rows:
        by_strength.setdefault(r["strength"], []).append(r)
    select = {s: _mean(r["score"] for r in rs if r["instruction_index"] < 5)
              for s, rs in by_strength.items()}
    candidates = sorted((s for s in select if select[s] is not None), key=lambda s: (abs(s), s))
    best = max(candidates, key=lambda s: round(select[s], 9)) if candidates else None  # first max wins
    held = [r for r in by_strength.get(best, []) if r["instruction_index"] >= 5]
    out = {"concept_id": rows[0].get("concept_id"), "concept": rows[0]["concept"], "strength": best,
           "select_score": select.get(best), "score": _mean(r["score"] for r in held), "n_eval": len(held)}
    out["ratings"] = {c: _mean(r["ratings"][c] for r in held) for c in CRITERIA}  # criterion means
    return out


def summarize(rated):
    """Per (method, split): chosen strength per concept and the mean over concepts (paper Table 1)."""
    groups = {}
    for r in rated:
        g = groups.setdefault((r["method"], r["split"]), {"failed": 0, "concepts": {}})
        g["failed"] += len(r["failed"])
        if r["score"] is not None:  # rows with a failed request wait for the next run
            g["concepts"].setdefault(r.get("concept_id", r["concept"]), []).append(r)
    results = []
    for (method, split), g in groups.items():
        concepts = [choose_strength(rows) for rows in g["concepts"].values()]
        scored = [c for c in concepts if c["score"] is not None]
        results.append({"method": method, "split": split, "score": _mean(c["score"] for c in scored),
                        "n_concepts": len(scored), "n_concepts_unscored": len(concepts) - len(scored),
                        "ratings": {c: _mean(x["ratings"][c] for x in scored) for c in CRITERIA},
                        "failed_requests": g["failed"], "concepts": concepts})
    return results
