"""AxBench data, the bundled demo concepts, and batching for HyperSteer (SPEC §5, §6).

Rows follow the AxBench schema: input (instruction), output (reference response),
output_concept, concept_genre, category (positive|negative), dataset_category, concept_id.
HyperSteer trains on the positives. One row becomes one training example:

    ids    = <bos><start_of_turn>user\\n {input} <end_of_turn>\\n<start_of_turn>model\\n {output}
    labels =  -100 ............................................................... output ids
    steer  =  0 0 0 0 (chat prefix) 1 1 1 ...................................... 1 1 1 1 (SPEC §4)

    python data.py                          # summarise the bundled demo data
    python data.py --dataset concept500     # download AxBench Concept500 (2b, l20) and summarise it
"""
import argparse
import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hub import hf_file
from model import left_pad

DEMO_DATA = Path(__file__).resolve().parent / "demo" / "concepts.jsonl"
COLUMNS = {"input": str, "output": str, "output_concept": str, "concept_genre": str,
           "category": str, "dataset_category": str, "concept_id": int}
AXBENCH_PATHS = {  # SPEC §6: dataset name -> (hub repo, default path for a model/layer)
    "concept10": "pyvene/axbench-concept10",
    "concept500": "pyvene/axbench-concept500",
    "concept16k": "pyvene/axbench-concept16k",
}


def download_axbench(dataset="concept16k", path="2b/l20/train/data.parquet", revision="main"):
    """Fetch one AxBench parquet file over requests into the cache (progress bar, resumable)."""
    if dataset not in AXBENCH_PATHS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(AXBENCH_PATHS)}")
    return hf_file(AXBENCH_PATHS[dataset], path, revision, kind="dataset")


def read_rows(path):
    """All rows of an AxBench parquet or JSONL file, as dicts. A file without the AxBench columns is
    refused; malformed rows (missing or empty fields, wrong types) are skipped and counted in one
    warning, so one bad row never stops a long run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
        have, raw = set(table.column_names), table.to_pylist()
    else:
        raw, bad_json = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError:
                    bad_json += 1
                    raw.append(None)
        have = set().union(*(r.keys() for r in raw if isinstance(r, dict))) if raw else set()
    missing = [c for c in COLUMNS if c not in have]
    if missing:
        raise ValueError(f"{path}: not AxBench-shaped data: no column {', '.join(missing)}")
    rows = [r for r in raw if valid(r)]
    if len(rows) < len(raw):
        warnings.warn(f"{path}: skipped {len(raw) - len(rows)} malformed rows of {len(raw)}", stacklevel=2)
    return rows


def valid(row):
    if not isinstance(row, dict):
        return False
    for col, kind in COLUMNS.items():
        v = row.get(col)
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            return False
        if kind is str and (not isinstance(v, str) or not v.strip()):
            return False
    return True


def positives(rows):
    return [r for r in rows if r["category"] == "positive" and r["concept_id"] >= 0]


def split_concepts(rows, held_out=0.1, seed=0, eval_rows=2):
    """Deterministic split (SPEC §5). Held-out: a fraction of concepts removed from training.
    Held-in: the last `eval_rows` rows of every other concept, kept from training (unseen
    instructions of trained concepts). Returns (train, held_in, held_out) row lists."""
    ids = sorted({r["concept_id"] for r in rows})
    n_out = max(1, round(held_out * len(ids))) if held_out > 0 else 0
    out_ids = set(random.Random(seed).sample(ids, n_out))
    train, held_in, held_out_rows, seen = [], [], [], Counter()
    per_concept = Counter(r["concept_id"] for r in rows)
    for r in rows:
        cid = r["concept_id"]
        if cid in out_ids:
            held_out_rows.append(r)
            continue
        seen[cid] += 1
        (held_in if seen[cid] > per_concept[cid] - eval_rows else train).append(r)
    return train, held_in, held_out_rows


# ----------------------------------------------------------------------------- tokenisation

@dataclass
class Example:
    ids: np.ndarray      # chat-templated prompt + raw output
    n_prompt: int        # prompt tokens (labels start after them)
    n_prefix: int        # chat-prefix tokens, never steered (SPEC §4)
    hyper_ids: np.ndarray  # what the hypernetwork reads (hypernet.hyper_input)
    concept: str
    concept_id: int


def encode(tok, rows, hyper_input, max_len=128, quiet=False):
    """Rows -> Examples, truncating the output so prompt + output <= max_len tokens. Rows whose
    prompt alone leaves no room for an output token are dropped. Prints how many were cut."""
    out, cut, dropped = [], 0, 0
    prompts = tok.chat_batch(r["input"] for r in rows)
    answers = tok.encode_batch((r["output"] for r in rows), bos=False)  # the raw output, no <end_of_turn> (SPEC §5)
    for r, prompt, answer in zip(rows, prompts, answers):
        room = max_len - len(prompt)
        if room < 1:
            dropped += 1
            continue
        cut += len(answer) > room
        # int32 arrays, not lists: Concept16k has ~1M rows, and a list of Python ints costs ~9x more
        out.append(Example(np.asarray(prompt + answer[:room], dtype=np.int32), len(prompt), tok.chat_prefix_len,
                           np.asarray(hyper_input(tok, r["output_concept"], r["input"]), dtype=np.int32),
                           r["output_concept"], r["concept_id"]))
    if (cut or dropped) and not quiet:
        print(f"tokenised {len(rows)} rows: {cut} outputs truncated to max_len {max_len}, {dropped} dropped")
    return out


def collate(examples, pad_id=0):
    """A batch of Examples -> tensors, all (B, T) unless noted:
    ids, pad (real tokens), labels (next-token targets: -100 except where the next token is an
    output token), steer (positions after the chat prefix), prompt (prompt tokens: the cross-attention
    hypernetwork's context X; the output is never visible), hyper_ids / hyper_pad (B, Ts)."""
    ids, pad = left_pad([e.ids for e in examples], pad_id)
    T = ids.shape[1]
    idx = torch.arange(T)[None]
    start = torch.tensor([T - len(e.ids) for e in examples])[:, None]           # first real token
    n_prompt = torch.tensor([e.n_prompt for e in examples])[:, None]
    n_prefix = torch.tensor([e.n_prefix for e in examples])[:, None]
    labels = torch.full_like(ids, -100)
    predicts = (idx >= start + n_prompt - 1) & (idx < T - 1)                    # positions predicting output
    labels[:, :-1] = torch.where(predicts[:, :-1], ids[:, 1:], -100)
    hyper_ids, hyper_pad = left_pad([e.hyper_ids for e in examples], pad_id)
    return {"ids": ids, "pad": pad, "labels": labels,
            "steer": idx >= start + n_prefix, "prompt": pad & (idx < start + n_prompt),
            "hyper_ids": hyper_ids, "hyper_pad": hyper_pad}


def epoch_order(n, seed, epoch):
    """The epoch's example order: a permutation seeded by (seed, epoch), so a resumed run sees
    exactly the batches an uninterrupted one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def batches(examples, batch_size, seed, epoch, pad_id=0):
    """The epoch's batches, collated one at a time."""
    order = epoch_order(len(examples), seed, epoch)
    for i in range(0, len(order), batch_size):
        yield collate([examples[j] for j in order[i:i + batch_size]], pad_id)


def main():
    ap = argparse.ArgumentParser(description="Download (optionally) and summarise AxBench-shaped data.")
    ap.add_argument("--dataset", default=None, help="concept10 | concept500 | concept16k (default: bundled demo)")
    ap.add_argument("--path", default="2b/l20/train/data.parquet", help="file inside the dataset repo")
    ap.add_argument("--revision", default="main", help="dataset revision (branch or commit) to pin")
    args = ap.parse_args()
    try:
        path = download_axbench(args.dataset, args.path, args.revision) if args.dataset else DEMO_DATA
        rows = read_rows(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    pos = positives(rows)
    train, held_in, held_out = split_concepts(pos)
    genres = Counter(r["concept_genre"] for r in pos)
    print(f"{path}: {len(rows)} rows, {len(pos)} positives, {len({r['concept_id'] for r in pos})} concepts, "
          f"genres {dict(genres)}")
    print(f"split: {len(train)} train rows, {len(held_in)} held-in eval rows, "
          f"{len(held_out)} held-out rows ({len({r['concept_id'] for r in held_out})} concepts)")


if __name__ == "__main__":
    main()
