"""HyperSteer's hypernetwork: steering prompt (+ base prompt) -> one steering vector (SPEC §3).

The paper's three variants (HyperSteer §3, App. A.3) in one module, built from a loaded base model:

    no_context       Δ = H(s)        the base's first N blocks read the steering prompt s
    in_context       Δ = H(s ⊕ x)    the same network reads s followed by the base prompt text x
    cross_attention  Δ = H(s, X)     every block also cross-attends to X, the base model's unsteered
                                     residual at the steering layer over the base prompt's tokens

All three end in the same head: last token -> final RMSNorm -> Linear(d, d) (Eq. 2-3). The head
starts at zero, so at step 0 the steered model is the base model exactly. Checkpoints are
safetensors with both configs as JSON metadata.

    python hypernet.py                          # parameter counts of the paper's 2b hypernetwork (meta device)
    python hypernet.py --variant no_context --n-blocks 26
    python -m pytest -q test_all.py -k hyper    # its CPU tests, seconds
"""
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from lib import fileio, vectors
from lib.flex import use_flex
from lib.loader import check_state_dict, read_header, read_safetensors, save_safetensors
from model import (Attention, Block, Gemma, GemmaConfig, RMSNorm, attend, attention_inputs, embed, gemma2_2b,
                   gemma2_9b, left_pad)

VARIANTS = ("no_context", "in_context", "cross_attention")


@dataclass
class HyperConfig:
    variant: str = "cross_attention"  # "no_context" | "in_context" | "cross_attention" (the paper's best)
    n_blocks: int = 22                # N, base blocks the hypernetwork copies (paper 2b: 22 cross attention, 26 others)
    layer: int = 20                   # steering layer: Δ is added after this base block and X read there (SPEC §4)
    random_init: bool = False         # paper Table 2 ablation: fresh weights instead of the base's
    unit_norm: bool = False           # App. A.4 (no context): unit-norm Δ_s scaled by its max activation on the prompt
    freeze_embeddings: bool = False   # no gradients or AdamW state for the (vocab, d) embeddings (CPU demos)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown hypernetwork variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {self.n_blocks}")
        if self.unit_norm and self.variant != "no_context":
            raise ValueError("unit_norm is the no-context variant's head (paper App. A.4); the others leave Δ unnormalised")


class CrossAttention(Attention):
    """Queries from the hypernetwork stream, keys and values from the base residual X. The base's
    head layout (and Gemma-3's per-head q/k norms); no RoPE: the two sequences' positions are
    unrelated (SPEC §3)."""

    def forward(self, s, x, mask):  # s (B, T, d), x (B, Tx, d), mask (B, 1, T, Tx)
        cfg, (B, T, _), Tx = self.cfg, s.shape, x.shape[1]
        q = self.q_proj(s).view(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)    # (B, nh, T, hs)
        k = self.k_proj(x).view(B, Tx, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)  # (B, nkv, Tx, hs)
        v = self.v_proj(x).view(B, Tx, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # Same score scale (query_pre_attn_scalar^-0.5) and, on Gemma-2, the same 50*tanh(s/50)
        # soft-capping as the copied self-attention, so both sublayers see scores on one scale.
        y = attend(q, k, v, mask, cfg.query_pre_attn_scalar ** -0.5, cfg.attn_logit_softcapping)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class CrossBlock(Block):
    """A base block with a cross-attention sublayer between self-attention and the FFN (App. A.3,
    as SPEC §3 writes it: the paper's equation is garbled). Three new norms: pre/post cross
    attention and KVNorm on X."""

    def __init__(self, cfg, layer_type):
        super().__init__(cfg, layer_type)
        self.cross_attn = CrossAttention(cfg)
        self.pre_cross_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_cross_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.kv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, s, cos, sin, mask, x, x_mask):
        """s (B, T, d) the hypernetwork stream; x (B, Tx, d) the base residual; x_mask (B, 1, T, Tx)."""
        # App. A.3: S = S + PostNorm_a(SelfAttn(PreNorm_a(S)))            causal, RoPE, softcap as in Gemma
        s = s + self.post_attention_layernorm(self.self_attn(self.input_layernorm(s), cos, sin, mask))
        # App. A.3: S = S + PostNorm_c(CrossAttn(Q = PreNorm_c(S), K = V = KVNorm(X)))
        s = s + self.post_cross_layernorm(self.cross_attn(self.pre_cross_layernorm(s), self.kv_layernorm(x), x_mask))
        # App. A.3: S = S + PostNorm_f(FFN(PreNorm_f(S)))
        return s + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(s)))


def fresh_init(module):
    """The base architecture's own initialisation (Gemma's initializer_range 0.02): normal(0, 0.02)
    linears and embeddings, zero biases, norms at weight 0 (scale 1 under Gemma's 1 + w)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, RMSNorm):
            nn.init.zeros_(m.weight)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


class HyperSteer(nn.Module):
    """H: token ids of the hypernetwork's input (+ X for cross attention) -> Δ (B, d). Parameter names
    read like the base checkpoint (embed_tokens, layers.N.self_attn.q_proj, ...) so the copy from the
    base is a plain state-dict load."""

    def __init__(self, hcfg: HyperConfig, base_cfg: GemmaConfig):
        super().__init__()
        n = hcfg.n_blocks
        if n > base_cfg.num_hidden_layers:
            raise ValueError(f"n_blocks {n} > the base model's {base_cfg.num_hidden_layers} blocks")
        self.hcfg, self.base_cfg = hcfg, base_cfg
        self.cfg = replace(base_cfg, num_hidden_layers=n, layer_types=base_cfg.layer_types[:n])
        d, block = base_cfg.hidden_size, CrossBlock if hcfg.variant == "cross_attention" else Block
        self.embed_tokens = nn.Embedding(base_cfg.vocab_size, d)
        self.layers = nn.ModuleList(block(self.cfg, t) for t in self.cfg.layer_types)
        self.norm = RMSNorm(d, base_cfg.rms_norm_eps)
        self.head = nn.Linear(d, d, bias=True)
        fresh_init(self)
        nn.init.zeros_(self.head.weight)  # SPEC §3: Δ = 0 at step 0, so training starts from the base model
        self.embed_tokens.requires_grad_(not hcfg.freeze_embeddings)

    @classmethod
    def from_base(cls, base: Gemma, hcfg: HyperConfig):
        """Build on the base's device; copy its embeddings and first N blocks unless random_init.
        New weights (cross attention, its norms, final norm, head) keep their fresh init."""
        base.layer_index(hcfg.layer)  # a steering layer the base model has
        with torch.device(base.model.embed_tokens.weight.device):
            hyper = cls(hcfg, base.cfg)
        if not hcfg.random_init:  # pretrained init beats random by +0.11 (paper Table 2)
            hyper.embed_tokens.load_state_dict(base.model.embed_tokens.state_dict())
            for mine, theirs in zip(hyper.layers, base.model.layers):  # missing = the new cross-attention keys
                assert not mine.load_state_dict(theirs.state_dict(), strict=False).unexpected_keys
        return hyper

    def forward(self, s_ids, s_real, x=None, x_real=None, x_steered=None):
        """s_ids, s_real (B, Ts): left-padded ids of the hypernetwork's input and its real-token
        mask. x (B, Tx, d), x_real (B, Tx): the base's unsteered residual at the steering layer over
        the base prompt, and the mask of the base prompt's real tokens; read by cross_attention, ignored
        otherwise. x_steered (B, Tx): the prompt positions Δ is added to, where unit_norm reads its max
        activation (default x_real). Returns Δ (B, d) in the base compute dtype (that of x, else of the
        embeddings). Called once, with named arguments, by hypernet.steering_delta."""
        B, T = s_ids.shape
        out_dtype = x.dtype if x is not None else self.embed_tokens.weight.dtype   # the base compute dtype
        s_real = s_real.bool()
        if not s_real[:, -1].all():
            raise ValueError("s_ids must be left-padded: the head reads the last token")
        h = embed(self.embed_tokens, s_ids)                     # (B, T, d), times sqrt(d) as in the base
        rot, masks = attention_inputs(self.cfg, s_real, T, h.dtype, flex=use_flex(self.cfg, h))  # causal + sliding, RoPE
        cross = self.hcfg.variant == "cross_attention"
        if cross:
            if x is None:
                raise ValueError("the cross_attention hypernetwork needs x, the base residual at the steering layer")
            x_real = torch.ones(x.shape[:2], dtype=torch.bool) if x_real is None else x_real
            x_real = x_real.to(device=x.device, dtype=torch.bool)
            if not x_real.any(-1).all():
                raise ValueError("every example needs at least one real base-prompt token in x_real")
            # Every query row, the hypernetwork's own padding rows included, sees exactly the real
            # tokens of X: never padding, never an all-masked row (which would give NaN).
            x, x_attend = x.to(h.dtype), x_real[:, None, None, :].expand(B, 1, T, -1)   # (B, Tx, d), (B, 1, T, Tx)
        for block in self.layers:
            cos, sin = rot[block.layer_type]
            if cross:
                h = block(h, cos=cos, sin=sin, mask=masks[block.layer_type], x=x, x_mask=x_attend)
            else:
                h = block(h, cos=cos, sin=sin, mask=masks[block.layer_type])
        delta = self.head(self.norm(h[:, -1]))  # Eq. 2-3: Δ = H(s, x) = W · RMSNorm(h_last) + b, (B, d)
        if self.hcfg.unit_norm:
            delta = max_activation_scaled(delta, x, x_real if x_steered is None else x_steered)
        return delta.to(out_dtype)


def max_activation_scaled(delta, x, mask):
    """App. A.4, no context end to end: the head's Δ_s is made unit-norm and scaled by its max activation,
    as ReFT-r1's max_act (SPEC §8). This project reads that activation from the base prompt itself:
    max_t ReLU(h_t · Δ̂_s) over the steered prompt tokens (mask (B, Tx)), so it exists for held-out
    concepts too, in training and at inference alike."""
    if x is None:
        raise ValueError("unit_norm needs x, the base residual at the steering layer, for its max activation")
    unit = delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-6)                # (B, d), 0 stays 0
    acts = torch.einsum("btd,bd->bt", x.float(), unit.float()).clamp_min(0)          # (B, Tx) latents
    return unit * acts.masked_fill(~mask.bool(), 0).amax(-1, keepdim=True).to(unit.dtype)


def steering_delta(hyper, s_ids, s_real, x, x_real, x_steered):
    """Δ = H(s, x), (B, d) (Eq. 2-3): the one call of HyperSteer.forward, for training (train.steered_loss, where
    `hyper` may be its DDP wrapper) and for inference (deltas) alike. x is the unsteered residual at the steering
    layer; x_real masks it to the base prompt's real tokens; x_steered marks those Δ is added to."""
    return hyper(s_ids=s_ids, s_real=s_real, x=x, x_real=x_real, x_steered=x_steered)


def hyper_input(tok, concept, instruction, variant):
    """Token ids the hypernetwork reads: <bos> + the raw steering prompt, no chat template (SPEC §3);
    in_context appends the raw base prompt on a new line (s ⊕ x). tok is a model.Tokenizer."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown hypernetwork variant {variant!r}")
    return tok.encode(f"{concept}\n{instruction}" if variant == "in_context" else concept)


@torch.no_grad()
def deltas(base, tok, hyper, concept, instructions, chat_ids=None):
    """Δ = H(s, x) (n, d) for one concept and n instructions, read from the unsteered residual at the
    steering layer over each chat-templated prompt (chat_ids, when the caller has them already):
    once per (s, x), fixed while decoding (SPEC §4)."""
    dev, pad_id = base.model.embed_tokens.weight.device, base.cfg.pad_token_id
    ids, real = left_pad(chat_ids or tok.chat_batch(instructions), pad_id, dev)
    x = base.residual(ids, real, hyper.hcfg.layer)                                  # (n, T, d)
    s_ids, s_real = left_pad([hyper_input(tok, concept, i, hyper.hcfg.variant) for i in instructions], pad_id, dev)
    steered = real & (real.cumsum(-1) > tok.chat_prefix_len)                          # after the chat prefix (SPEC §4)
    return steering_delta(hyper, s_ids, s_real, x, real, steered).float()


# ----------------------------------------------------------------------------- checkpoints

def _describe(cfg: dict):
    return (f"{cfg.get('model_type')}, {cfg.get('num_hidden_layers')} blocks, d={cfg.get('hidden_size')}, "
            f"vocab {cfg.get('vocab_size')}")


def save(hyper, path, extra_meta=None, weights=None):
    """safetensors with the hypernetwork and base configs as JSON metadata, written atomically. weights:
    its state dict when the caller has it whole already (train.py under FSDP2, where hyper holds shards)."""
    meta = dict(extra_meta or {})
    meta.update(hyper_config=json.dumps(asdict(hyper.hcfg)), base_config=json.dumps(asdict(hyper.base_cfg)))
    save_safetensors(path, hyper.state_dict() if weights is None else weights, meta)


def check_base(path, meta, base_cfg: GemmaConfig):
    """A file's base_config metadata must describe this base model (one error format for every file kind)."""
    theirs, ours = json.loads(meta.get("base_config", "{}")), json.loads(json.dumps(asdict(base_cfg)))
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ValueError(f"{path}: was trained for base model {_describe(theirs)}, "
                         f"not {_describe(ours)} (differs in {', '.join(diff)})")


def load_hypernet(path, base: Gemma, expected: HyperConfig = None):
    """A HyperSteer from `save`, on the base's device. Strict: the checkpoint must have been trained
    for this base model (and for `expected`'s variant, N and layer when given) and hold exactly the
    parameters, by name and shape, finite and sane at a layer the base has (vectors.check_steering_file, the
    check of every steering file). freeze_embeddings comes from `expected` when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such hypernetwork checkpoint")
    shapes, meta = read_header(path)                           # everything is checked before reading the data
    if "hyper_config" not in meta or "base_config" not in meta:
        raise ValueError(f"{path}: not a HyperSteer checkpoint (no hyper_config/base_config metadata)")
    check_base(path, meta, base.cfg)
    try:
        hcfg = HyperConfig(**json.loads(meta["hyper_config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed hyper_config metadata ({e})") from None
    if expected is not None:
        for k in ("variant", "n_blocks", "layer"):
            if getattr(hcfg, k) != getattr(expected, k):
                raise ValueError(f"{path}: checkpoint has {k} {getattr(hcfg, k)!r}, expected {getattr(expected, k)!r}")
        hcfg = replace(hcfg, freeze_embeddings=expected.freeze_embeddings)
    with torch.device("meta"):
        hyper = HyperSteer(hcfg, base.cfg)
    check_state_dict(path, {k: p.shape for k, p in hyper.state_dict().items()},
                     {k: s for k, s in shapes.items() if not k.startswith("optim.")},   # train.py's too
                     f"a {hcfg.variant} hypernetwork")
    state, _ = read_safetensors(path, base.model.embed_tokens.weight.device)
    state = {k: v for k, v in state.items() if not k.startswith("optim.")}
    vectors.check_steering_file(path, state, {k: p.shape for k, p in hyper.state_dict().items()}, [hcfg.layer],
                                base.cfg.num_hidden_layers, f"a {hcfg.variant} hypernetwork")
    hyper.load_state_dict(state, strict=True, assign=True)
    hyper.embed_tokens.requires_grad_(not hcfg.freeze_embeddings)
    return hyper


# ----------------------------------------------------------------------------- CLI

def main():
    ap = fileio.ArgumentParser(description="Parameter counts of a HyperSteer hypernetwork (meta device, no memory).")
    ap.add_argument("--base", default="2b", choices=["2b", "9b"], help="Gemma-2 base model shapes")
    ap.add_argument("--variant", default="cross_attention", choices=VARIANTS, help="hypernetwork variant")
    ap.add_argument("--n-blocks", type=int, default=22, help="N, base blocks copied into the hypernetwork")
    with fileio.one_line_errors():
        args = ap.parse_args()
    with torch.device("meta"):
        base = Gemma(gemma2_2b() if args.base == "2b" else gemma2_9b())
    hyper = HyperSteer.from_base(base, HyperConfig(args.variant, args.n_blocks))
    nb, nh = count_params(base), count_params(hyper)
    bb, hb = count_params(base.model.layers[0]), count_params(hyper.layers[0])
    print(f"base Gemma-2-{args.base}: {nb / 1e6:.1f}M parameters; one block {bb / 1e6:.2f}M")
    print(f"hypernetwork ({args.variant}, N={args.n_blocks}): {nh / 1e6:.1f}M = {nh / nb:.3f}x the base; "
          f"one block {hb / 1e6:.2f}M = {hb / bb:.3f}x a base block")


if __name__ == "__main__":
    main()
