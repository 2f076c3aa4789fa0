"""AxBench data, the bundled demo concepts, and batching for HyperSteer (SPEC §5, §6).

Rows follow the AxBench schema: input (instruction), output (reference response),
output_concept, concept_genre, category (positive|negative), dataset_category, concept_id.
HyperSteer trains on the positives. One row becomes one training example:

    ids    = <bos><start_of_turn>user\\n {input} <end_of_turn>\\n<start_of_turn>model\\n {output}
    labels =  -100 ............................................................... output ids
    steer  =  0 0 0 0 (chat prefix) 1 1 1 ...................................... 1 1 1 1 (SPEC §4)

    python data.py                          # summarise the bundled demo data and its split
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

from hypernet import hyper_input
from lib.fileio import one_line_errors, read_json
from lib.loader import DEMO_MODEL, hub_file
from model import left_pad

DEMO_DATA = Path(__file__).resolve().parent / "demo" / "concepts.jsonl"
DEMO_INSTRUCTIONS = DEMO_DATA.parent / "instructions.json"   # 60 offline evaluation instructions (AlpacaEval stand-in)
DEMO_KEYWORDS = DEMO_DATA.parent / "keywords.json"   # per concept, for the demo's concept-mention rate; never trained on
DEMO_RUN = dict(model=str(DEMO_MODEL), data=str(DEMO_DATA), layer=9, held_out_ids="4,102,202", eval_rows=8, seed=0)
# ^ the offline demo's model, data, layer and split: train.py's demo preset, and steer.py without a checkpoint
COLUMNS = {"input": str, "output": str, "output_concept": str, "concept_genre": str,
           "category": str, "dataset_category": str, "concept_id": int}
AXBENCH_PATHS = {  # SPEC §6: dataset name -> (hub repo, default path for a model/layer)
    "concept10": "pyvene/axbench-concept10",
    "concept500": "pyvene/axbench-concept500",
    "concept16k": "pyvene/axbench-concept16k",
}


def download_axbench(dataset="concept16k", path="2b/l20/train/data.parquet", revision="main"):
    """One AxBench parquet file, through the Hugging Face cache (loader.hub_file: login, HF_HUB_OFFLINE)."""
    if dataset not in AXBENCH_PATHS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(AXBENCH_PATHS)}")
    return hub_file(AXBENCH_PATHS[dataset], path, revision, kind="dataset")


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
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
        for line in text.splitlines():
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


def fetch_file(source, revision="main"):
    """A local path, or an AxBench "dataset:path" on the hub (downloaded once into the cache)."""
    if ":" in source and not Path(source).exists():
        name, path = source.split(":", 1)
        return download_axbench(name, path, revision)
    return Path(source)


def load_rows(source, revision="main"):
    """Rows of a run's data: a local .parquet/.jsonl or an AxBench "dataset:path"."""
    return read_rows(fetch_file(source, revision))


def split_concepts(rows, held_out_concepts=0, held_out_fraction=0.0, seed=0, eval_rows=2, held_in_ids=None,
                   held_out_ids=None):
    """The run's deterministic split of positive rows (SPEC §5) -> (train, held_in, held_out) row lists.
    Held-out: the concepts held_out_ids when given, else `held_out_concepts` concepts (or, when
    held_out_fraction > 0, that fraction of them) sampled by `seed`, never from held_in_ids (a paper
    run's Concept500 list); all removed from training.
    Held-in: the last `eval_rows` rows of every other concept, kept from training (unseen
    instructions of trained concepts); with held_in_ids, only those concepts are evaluated."""
    ids = sorted({r["concept_id"] for r in rows})
    pool = [c for c in ids if held_in_ids is None or c not in held_in_ids]
    if held_out_ids:
        unknown = sorted(set(held_out_ids) - set(pool))
        if unknown:
            raise ValueError(f"--held-out-ids: no concept {', '.join(map(str, unknown))} available to hold out")
        out_ids = set(held_out_ids)
    else:
        n_out = max(1, round(held_out_fraction * len(ids))) if held_out_fraction > 0 else held_out_concepts
        if not 0 <= n_out < len(ids) or n_out > len(pool):
            raise ValueError(f"held-out: {n_out} concepts asked of {len(pool)} available ({len(ids)} in the data); "
                             "lower --held-out-concepts / --held-out-fraction")
        out_ids = set(random.Random(seed).sample(pool, n_out))
    train, held_in, held_out_rows, seen = [], [], [], Counter()
    per_concept = Counter(r["concept_id"] for r in rows)
    for r in rows:
        cid = r["concept_id"]
        if cid in out_ids:
            held_out_rows.append(r)
            continue
        seen[cid] += 1
        if seen[cid] > per_concept[cid] - eval_rows:
            if held_in_ids is None or cid in held_in_ids:
                held_in.append(r)
        else:
            train.append(r)
    return train, held_in, held_out_rows


def concept_names(path):
    """The concepts of a held-in list (SPEC §5): an AxBench data file (its positives' output_concept),
    e.g. Concept500's train parquet, or a metadata.jsonl (one {"concept_id", "concept", ...} per line).
    Matched by text: concept ids differ between datasets."""
    path = Path(path)
    if path.suffix == ".parquet":
        return {r["output_concept"] for r in positives(read_rows(path))}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    names = set()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
                names.add(str(row["concept"] if "concept" in row else row["output_concept"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: not a metadata row with a concept field") from None
    return names


def split_run(rows, run):
    """(train, held-in, held-out) positive rows of a training run: `run` is its TrainConfig, or the
    train_config dict a checkpoint carries, so every script rebuilds exactly the split it trained on."""
    get = run.get if isinstance(run, dict) else lambda k, d=None: getattr(run, k, d)
    pos, held_in = positives(rows), None
    if get("held_in_concepts"):
        names = concept_names(fetch_file(get("held_in_concepts"), get("data_revision", "main")))
        held_in = {r["concept_id"] for r in pos if r["output_concept"] in names}
        print(f"held-in: {len(held_in)} of the {len(names)} concepts of {get('held_in_concepts')} are in the data")
    out_ids = [int(c) for c in str(get("held_out_ids") or "").split(",") if c.strip()]
    return split_concepts(pos, get("held_out_concepts", 0), get("held_out_fraction", 0.0), get("seed", 0),
                          get("eval_rows", 2), held_in, out_ids)


def next_concept(items, concept_of):
    """For each item, an item of the next concept (in order of first appearance, cyclic) at the same index
    within its concept: what the 'other concept' columns steer with."""
    groups = {}
    for it in items:
        groups.setdefault(concept_of(it), []).append(it)
    order, seen = list(groups), {}
    out = []
    for it in items:
        c = concept_of(it)
        i = seen[c] = seen.get(c, -1) + 1
        nxt = groups[order[(order.index(c) + 1) % len(order)]]
        out.append(nxt[i % len(nxt)])
    return out


def read_instructions(path):
    """A JSON list of instructions: strings or {"instruction": ...} objects (AlpacaEval's layout)."""
    items = read_json(path, "instructions file")
    out = [x["instruction"] if isinstance(x, dict) and "instruction" in x else x for x in items] \
        if isinstance(items, list) else []
    if not out or not all(isinstance(x, str) and x.strip() for x in out):
        raise ValueError(f"{path}: not a JSON list of instructions (strings or {{\"instruction\": ...}})")
    return out


def load_instructions(source="alpaca", revision="main"):
    """'alpaca': AlpacaEval's 805 instructions (fetched once into the Hugging Face cache); 'demo': the bundled 60,
    an offline stand-in under the same selection rule; else a JSON list of {"instruction": ...} or strings."""
    if source == "alpaca":
        path = hub_file("tatsu-lab/alpaca_eval", "alpaca_eval.json", revision, kind="dataset")
    else:
        path = DEMO_INSTRUCTIONS if source == "demo" else Path(source)
    return read_instructions(path)


def pick_instructions(instructions, concept_id, n=10):
    """SPEC §6: the first n of numpy.random.RandomState(concept_id).permutation(len(instructions))
    (what AxBench's pandas df.sample(n, random_state=concept_id) draws)."""
    order = np.random.RandomState(concept_id).permutation(len(instructions))[:n]
    return [instructions[i] for i in order]


def load_keywords(path):
    """{concept text: [keywords]} from a JSON {concept_id: {"concept": ..., "keywords": [...]}} file."""
    raw = read_json(path, "keywords file")
    try:
        return {v["concept"]: [k.lower() for k in v["keywords"]] for v in raw.values()}
    except (AttributeError, KeyError, TypeError):
        raise ValueError(f"{path}: expected {{concept_id: {{\"concept\": ..., \"keywords\": [...]}}}}") from None


def mentions(text, keywords):
    """A judge-free check that a concept shows up: any keyword is a substring of the lowercased text."""
    text = text.lower()
    return any(k in text for k in keywords)


# ----------------------------------------------------------------------------- tokenisation

@dataclass
class Example:
    ids: np.ndarray      # chat-templated prompt + raw output
    n_prompt: int        # prompt tokens (labels start after them)
    n_prefix: int        # chat-prefix tokens, never steered (SPEC §4)
    hyper_ids: np.ndarray  # what the hypernetwork reads (hypernet.hyper_input)
    concept: str
    concept_id: int


def encode(tok, rows, max_len=128, variant=None, quiet=False):
    """Rows -> Examples, truncating the output so prompt + output <= max_len tokens. Rows whose
    prompt alone leaves no room for an output token are dropped. Prints how many were cut.
    variant: the hypernetwork variant whose input each example carries (None: no hypernetwork)."""
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
                           np.asarray(hyper_input(tok, r["output_concept"], r["input"], variant) if variant else [],
                                      dtype=np.int32),
                           r["output_concept"], r["concept_id"]))
    if (cut or dropped) and not quiet:
        print(f"tokenised {len(rows)} rows: {cut} outputs truncated to max_len {max_len}, {dropped} dropped")
    return out


@dataclass
class Batch:
    """Tensors of a batch, all (B, T) unless noted, left padded:

        ids      = <pad> <bos><start_of_turn>user\\n {input} <end_of_turn>\\n<start_of_turn>model\\n {output}
        real     =   0     1 .................................................................. 1
        labels   = -100 ............................................................. output ids (shifted)
        steer    =   0     0 0 0 0 (chat prefix) 1 ............................................ 1
        x_mask   =   0     1 ........................................ 1   0 ............... 0
    """
    ids: torch.Tensor         # token ids
    real: torch.Tensor        # bool: True on real tokens, False on padding
    labels: torch.Tensor      # next-token targets: -100 except where the next token is an output token
    steer: torch.Tensor       # bool: where Δ is added, real tokens after the chat prefix (SPEC §4)
    x_mask: torch.Tensor      # bool: the base-prompt tokens, X for the cross-attention hypernetwork (never the output)
    hyper_ids: torch.Tensor   # (B, Ts) what the hypernetwork reads (hypernet.hyper_input)
    hyper_real: torch.Tensor  # (B, Ts) bool: True on its real tokens

    def to(self, device):
        return Batch(**{k: v.to(device) for k, v in vars(self).items()})


def collate(examples, pad_id=0):
    """A list of Examples -> a Batch."""
    ids, real = left_pad([e.ids for e in examples], pad_id)
    T = ids.shape[1]
    idx = torch.arange(T)[None]
    start = torch.tensor([T - len(e.ids) for e in examples])[:, None]           # first real token
    n_prompt = torch.tensor([e.n_prompt for e in examples])[:, None]
    n_prefix = torch.tensor([e.n_prefix for e in examples])[:, None]
    labels = torch.full_like(ids, -100)
    predicts = (idx >= start + n_prompt - 1) & (idx < T - 1)                    # positions predicting output
    labels[:, :-1] = torch.where(predicts[:, :-1], ids[:, 1:], -100)
    hyper_ids, hyper_real = left_pad([e.hyper_ids for e in examples], pad_id)
    return Batch(ids=ids, real=real, labels=labels, steer=idx >= start + n_prefix,
                 x_mask=real & (idx < start + n_prompt), hyper_ids=hyper_ids, hyper_real=hyper_real)


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
    with one_line_errors():
        path = download_axbench(args.dataset, args.path, args.revision) if args.dataset else DEMO_DATA
        rows = read_rows(path)
        pos = positives(rows)
        train, held_in, held_out = split_run(rows, DEMO_RUN) if path == DEMO_DATA else \
            split_concepts(pos, held_out_fraction=0.1)
    genres = Counter(r["concept_genre"] for r in pos)
    print(f"{path}: {len(rows)} rows, {len(pos)} positives, {len({r['concept_id'] for r in pos})} concepts, "
          f"genres {dict(genres)}")
    print(f"split: {len(train)} train rows, {len(held_in)} held-in eval rows, "
          f"{len(held_out)} held-out rows ({len({r['concept_id'] for r in held_out})} concepts)")


if __name__ == "__main__":
    main()
