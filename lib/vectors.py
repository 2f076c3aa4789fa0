"""Steering-vector files (SPEC §4): one float32 `direction.L` in safetensors, and the same vector as a
llama.cpp control-vector GGUF (its --control-vector takes it), so that a HyperSteer Δ or a DiffMean /
ReFT-r1 direction can be used outside this codebase.

    python steer.py export --hypernet runs/demo/hypernet.safetensors --concept "references to cats" \
        --prompt "Give me tips for a picnic" --out runs/demo/cats        # -> cats.safetensors, cats.gguf
    python steer.py compare --vector runs/demo/cats.gguf --prompt "Plan a picnic"     # steer with it here
"""
import warnings
from pathlib import Path

import numpy as np
import torch

from lib import fileio, loader


def save_vector(prefix, vector, layer, model_hint, method, concept, overwrite=False):
    """PREFIX.safetensors (one float32 `direction.{L}` [d], string metadata model_hint, layer, d_model, method,
    concept) and PREFIX.gguf, a llama.cpp control vector. llama.cpp adds `direction.N` to the output of
    0-indexed block N (its loader stores it at data[N - 1] and its apply loop maps that back to block N),
    the SPEC §4 convention, so no shift is needed; it refuses direction.0, though, and steers every
    position (BOS and chat template included), not only those after the chat prefix."""
    import gguf
    paths = [Path(f"{prefix}.safetensors"), Path(f"{prefix}.gguf")]
    if not overwrite and any(p.exists() for p in paths):
        raise FileExistsError(f"{prefix}: {' / '.join(str(p) for p in paths if p.exists())} exists; pass --overwrite")
    v = vector.detach().float().cpu().contiguous()
    meta = {"model_hint": model_hint, "layer": str(layer), "d_model": str(v.numel()), "method": method,
            "concept": concept}
    loader.save_safetensors(paths[0], {f"direction.{layer}": v}, meta, checksum=False)
    if layer == 0:
        warnings.warn("llama.cpp rejects direction.0: the GGUF will not load there", stacklevel=2)

    def write_gguf(tmp):
        w = gguf.GGUFWriter(str(tmp), "controlvector")                     # general.architecture
        w.add_string("controlvector.model_hint", model_hint)                # what repeng writes
        w.add_uint32("controlvector.layer_count", 1)
        for k in ("method", "concept"):
            w.add_string(f"controlvector.{k}", meta[k])
        w.add_tensor(f"direction.{layer}", v.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    fileio.write_atomic(paths[1], write_gguf)


def load_vector(path, d_model=None):
    """(vector (d,), layer, metadata) from a save_vector file, .safetensors or .gguf; refuses a file that
    is not one finite direction.L of the model's width."""
    path = Path(path)
    try:
        if path.suffix == ".gguf":
            import gguf
            r = gguf.GGUFReader(str(path))
            tensors = {t.name: torch.tensor(np.array(t.data, dtype=np.float32)) for t in r.tensors}
            meta = {k.split(".", 1)[1]: r.fields[k].contents() for k in r.fields if k.startswith("controlvector.")}
        else:
            tensors, meta = loader.read_safetensors(path)
    except (ValueError, KeyError, IndexError) as e:
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise ValueError(f"{path}: not a readable vector file ({type(e).__name__})") from None
    names = [n for n in tensors if n.startswith("direction.") and n.split(".")[1].lstrip("-").isdigit()]
    if len(tensors) != 1 or len(names) != 1:
        raise ValueError(f"{path}: expected exactly one tensor direction.<layer>, found {', '.join(tensors) or 'none'}")
    v = tensors[names[0]].float().reshape(-1) if tensors[names[0]].dim() <= 1 else None
    if v is None or (d_model is not None and v.numel() != d_model):
        raise ValueError(f"{path}: direction has shape {list(tensors[names[0]].shape)}, the model needs [{d_model}]")
    if not torch.isfinite(v).all():
        raise ValueError(f"{path}: direction holds non-finite values")
    return v, int(names[0].split(".")[1]), meta
