"""Checkpoint files: safetensors, tokenizer.json, Hugging Face hub downloads and the offline gemma-3-270m
build (SPEC §2), and the project's one strict state-dict check. model.load builds a Gemma from them.

    folder = loader.model_folder()                          # the offline gemma-3-270m (built once)
    folder = loader.model_folder("google/gemma-2-2b-it")   # a hub repo id (HF_TOKEN for gated models)
    python -c "import model; model.load()"                   # the model itself (model.py)

Hub files land in $HYPERSTEER_CACHE (default ~/.cache/hypersteer)/<kind>s--<owner>--<name>/<revision>/,
written to `<name>.part` first (resumed with an HTTP Range request) and renamed when complete.
HF_TOKEN, when set, is sent as a bearer token and never printed or stored. Nothing is unpickled.
"""
import json
import math
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

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_header(path):
    """A .safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
    name to its dtype, shape and byte range, then the raw bytes. Returns (header, data start, metadata),
    with every range checked before anything is read: in bounds, disjoint, and size = dtype x shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise ValueError
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a readable safetensors file") from None
    meta = header.pop("__metadata__", None) or {}
    data_size, ranges = size - 8 - n, []
    for name, info in header.items():
        try:
            dtype, shape, (lo, hi) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            ok = all(isinstance(i, int) and i >= 0 for i in [*shape, lo, hi]) and lo <= hi
        except (KeyError, TypeError, ValueError):
            ok = False
        if ok and hi > data_size:
            raise ValueError(f"{path}: truncated file (tensor {name!r} ends past the end of the file)")
        if not ok or hi - lo != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has a bad dtype, shape or byte range in the header")
        ranges.append((lo, hi, name))
    for (_, end, a), (start, _, b) in zip(sorted(ranges), sorted(ranges)[1:]):
        if start < end:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap in the file")
    return header, 8 + n, meta


def read_safetensors(path, device="cpu", dtype=None):
    """(tensors, metadata) of a whole file, one tensor at a time straight from the file (no memory map,
    so nothing else stays resident), each moved to `device` (and `dtype`, if given) as it is read.
    Files written by save_safetensors carry a CRC32 per tensor in their metadata; the bytes read are
    checked against it (a corrupted checkpoint fails)."""
    header, start, meta = read_header(path)
    crcs = json.loads(meta.get("crc32", "{}"))
    tensors = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            f.seek(start + lo)
            buf = bytearray(hi - lo)
            if f.readinto(buf) != hi - lo:
                raise ValueError(f"{path}: truncated file (tensor {name!r} ends early)")
            if name in crcs and zlib.crc32(buf) != crcs[name]:
                raise ValueError(f"{path}: tensor {name!r} is corrupted (checksum mismatch)")
            kind = DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=kind) if buf else torch.empty(0, dtype=kind)   # frombuffer refuses b""
            tensors[name] = t.reshape(info["shape"]).to(device=device, dtype=dtype)
    return tensors, meta


def save_safetensors(path, tensors, metadata=None, checksum=True):
    """Atomically write tensors + string metadata (JSON values for configs), with a CRC32 per tensor
    unless checksum=False (files meant for other tools). Refuses non-finite floating-point values:
    a NaN or inf weight is never saved."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: refusing to save non-finite values in {', '.join(bad[:3])}")
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if checksum:
        meta["crc32"] = json.dumps({k: zlib.crc32(v.reshape(-1).view(torch.uint8).numpy()) for k, v in tensors.items()})

    def write(tmp):
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except SafetensorError as e:     # how safetensors reports a full disk: "I/O error: ... (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            raise OSError(int(code[1]), os.strerror(int(code[1]))) if code else OSError(str(e)) from None
    return write_atomic(path, write)


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

    def pieces(self, ids):
        """The token strings of ids, special tokens included ("<bos>", "▁party"): labels for per-token plots."""
        return [self.tok.id_to_token(int(i)) for i in ids]

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
    check_state_dict(folder, shapes, {k: info["shape"] for f in files for k, info in read_header(f)[0].items()}, what)
    state = {}
    for f in files:
        state.update(read_safetensors(f, device, dtype)[0])
    return state
