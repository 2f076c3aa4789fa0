"""AxBench data and the bundled demo concepts: reading rows, the held-in / held-out split, instructions and
keywords (SPEC §5, §6). Rows follow the AxBench schema: input (instruction), output (reference response),
output_concept, concept_genre, category (positive|negative), dataset_category, concept_id. HyperSteer trains
on the positives; train.py turns a row into a training example (train.encode, train.Batch).

    python data.py                          # summarise the bundled demo data and its split
    python data.py --dataset concept500     # download AxBench Concept500 (2b, l20) and summarise it
"""
import random
import warnings
from collections import Counter
from pathlib import Path


from lib import fileio
from lib.fileio import one_line_errors, read_json
from lib.loader import DEMO_MODEL, hub_file

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
        raw = [r for _, r in fileio.read_jsonl(path, "data file", skip_malformed=True)]   # bad JSON: None, skipped below
        have = set().union(*(r.keys() for r in raw if isinstance(r, dict))) if raw else set()
    missing = [c for c in COLUMNS if c not in have]
    if missing:
        raise ValueError(f"{path}: not AxBench-shaped data: no column {', '.join(missing)}")
    rows = [r for r in raw if valid(r)]
    if not positives(rows):                          # blame the file, not a later flag that finds no concept
        raise ValueError(f"{path}: no valid positive AxBench row ({len(raw)} rows, {len(raw) - len(rows)} malformed; "
                         "a positive row has category 'positive', a concept_id >= 0 and every column filled)")
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
    names = set()
    for n, row in fileio.read_jsonl(path, "metadata file"):
        try:
            names.add(str(row["concept"] if "concept" in row else row["output_concept"]))
        except (KeyError, TypeError):
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


def distinct_words(text):
    """A judge-free fluency proxy: the share of distinct words among the text's words (1 = no word twice).
    Steered too hard, a model loops on a few words, and this falls toward 0; an empty text counts as 0."""
    words = text.lower().split()
    return len(set(words)) / len(words) if words else 0.0


def main():
    ap = fileio.ArgumentParser(description="Download (optionally) and summarise AxBench-shaped data.")
    ap.add_argument("--dataset", default=None, help="concept10 | concept500 | concept16k (default: bundled demo)")
    ap.add_argument("--path", default="2b/l20/train/data.parquet", help="file inside the dataset repo")
    ap.add_argument("--revision", default="main", help="dataset revision (branch or commit) to pin")
    with one_line_errors():
        args = ap.parse_args()
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
