"""Hugging Face hub downloads over plain `requests` (used by model.py and data.py).

    https://huggingface.co/<repo>/resolve/<revision>/<path>              (models)
    https://huggingface.co/datasets/<repo>/resolve/<revision>/<path>     (datasets, SPEC §6)

Files land in $HYPERSTEER_CACHE (default ~/.cache/hypersteer)/<kind>--<owner>--<name>/<revision>/,
written to `<name>.part` first (resumed with an HTTP Range request after an interruption) and
renamed when complete. HF_TOKEN, when set, is sent as a bearer token and never printed or stored.
"""
import json
import os
from pathlib import Path

import requests
from tqdm import tqdm

def cache_root():
    return Path(os.environ.get("HYPERSTEER_CACHE", Path.home() / ".cache" / "hypersteer"))


def safe_join(folder, name):
    """folder/name, refusing names that leave the folder (an index entry like '../x' or '/etc/x')."""
    folder = Path(folder).resolve()
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise ValueError(f"refusing file name {name!r}: it points outside {folder}")
    p = (folder / name).resolve()
    if folder not in p.parents:
        raise ValueError(f"refusing file name {name!r}: it points outside {folder}")
    return p


def shard_names(index):
    """The shard file names listed by a model.safetensors.index.json."""
    try:
        return sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{index}: malformed index ({e})") from None


def fetch(url, dest, what):
    """Download url to dest (resuming dest.part); a clear one-line error on HTTP failure."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    done = part.stat().st_size if part.exists() else 0
    if done:
        headers["Range"] = f"bytes={done}-"
    try:
        r = requests.get(url, headers=headers, stream=True, timeout=60)
    except requests.RequestException as e:
        raise ConnectionError(f"{what}: download failed ({type(e).__name__}); check your network") from None
    if r.status_code in (401, 403):
        raise PermissionError(f"{what}: HTTP {r.status_code}: gated or private. Accept the licence on "
                              f"the model's hub page and set HF_TOKEN to a token that has access")
    if r.status_code == 404:
        raise FileNotFoundError(f"{what}: HTTP 404: no such repository, revision or file")
    if r.status_code == 416:  # the .part is already complete
        part.rename(dest)
        return dest
    if r.status_code not in (200, 206):
        raise ConnectionError(f"{what}: HTTP {r.status_code} from the hub")
    if r.status_code == 200:
        done = 0  # the server ignored the Range header: start over
    total = done + int(r.headers.get("Content-Length", 0)) or None
    try:
        with open(part, "ab" if done else "wb") as f, tqdm(total=total, initial=done, unit="B", unit_scale=True,
                                                           desc=dest.name, disable=total is None or total < 1e6) as bar:
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except requests.RequestException as e:
        raise ConnectionError(f"{what}: download interrupted ({type(e).__name__}); run again to resume") from None
    part.rename(dest)
    return dest


def hf_file(repo, path, revision="main", kind="model"):
    """One file of a hub repository, cached; kind is "model" or "dataset"."""
    folder = cache_root() / f"{kind}s--{repo.replace('/', '--')}" / revision
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    prefix = f"{hub}/datasets" if kind == "dataset" else hub
    return fetch(f"{prefix}/{repo}/resolve/{revision}/{path}", safe_join(folder, path), f"{repo}/{path}@{revision}")


def hf_download(repo, revision="main"):
    """A model's config.json, tokenizer.json and safetensors (single or sharded) -> local folder."""
    hf_file(repo, "config.json", revision)
    folder = hf_file(repo, "tokenizer.json", revision).parent
    try:
        index = hf_file(repo, "model.safetensors.index.json", revision)
    except FileNotFoundError:
        hf_file(repo, "model.safetensors", revision)
        return folder
    try:
        shards = shard_names(index)
    except ValueError:
        index.unlink()  # fetched again next time
        raise
    for name in shards:
        safe_join(folder, name)  # refuse before fetching anything outside the folder
    for name in shards:
        hf_file(repo, name, revision)
    return folder
