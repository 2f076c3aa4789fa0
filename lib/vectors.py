"""Steering-vector files (SPEC §4): one float32 `direction.L` in safetensors, and the same vector as a
llama.cpp control-vector GGUF (its --control-vector takes it), so that a HyperSteer Δ or a DiffMean /
ReFT-r1 direction can be used outside this codebase; and check_steering_file, the one validation every
steering file (vector, PSR, hypernetwork) passes when it is loaded.

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
    if not paths[0].parent.is_dir():
        raise FileNotFoundError(f"{paths[0]}: the folder {paths[0].parent} does not exist")
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


MAX_ABS = 1e6   # no trained steering file holds a value this large; one that does overflows the residual stream


def check_steering_file(path, tensors, want, layers, n_layers, what="a steering file"):
    """The one validation of every steering file (vector, PSR, hypernetwork) before it steers anything, each
    error naming the file: exactly the tensors of `want` ({name: shape}, checked by loader.check_state_dict);
    every layer of `layers` in range for an n_layers-block model (SPEC §4: negative counts from the end); every
    floating-point value finite and within ±MAX_ABS (a file without a checksum can hold anything)."""
    loader.check_state_dict(path, want, {k: v.shape for k, v in tensors.items()}, what)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(f"{path}: layer {layer!r} is out of range for a {n_layers}-block model "
                             f"(0..{n_layers - 1}, or -{n_layers}..-1 from the end)")
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor {name!r} holds non-finite values (NaN or inf)")
            if (big := t.abs().max().item()) > MAX_ABS:
                raise ValueError(f"{path}: tensor {name!r} holds values up to {big:.3g}, beyond ±{MAX_ABS:g}; "
                                 "not a trained steering file")


def load_vector(path, d_model=None, n_layers=None):
    """(vector (d,), layer, metadata) from a save_vector file, .safetensors or .gguf; refuses (naming the
    file) one that is not exactly one direction.L of the model's width at a layer it has, finite and sane."""
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
    names = [n for n in tensors if n.startswith("direction.") and n.split(".", 1)[1].lstrip("-").isdigit()]
    if len(tensors) != 1 or len(names) != 1:
        raise ValueError(f"{path}: expected exactly one tensor direction.<layer>, found {', '.join(tensors) or 'none'}")
    name, layer = names[0], int(names[0].split(".", 1)[1])
    shape = [d_model] if d_model is not None else list(tensors[name].shape)[:1] or [1]
    check_steering_file(path, tensors, {name: shape}, [layer] if n_layers is not None else [], n_layers,
                        f"a vector of the model's width [{d_model}]" if d_model is not None else "a vector")
    return tensors[name].float().reshape(-1), layer, meta
