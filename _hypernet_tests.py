"""Tests for hypernet.py (SPEC §3): tiny random Gemma-2 and Gemma-3 bases on CPU, plus the paper's
parameter counts on the meta device (no memory).

    python -m pytest -q _hypernet_tests.py
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model as M
from hypernet import HyperConfig, HyperSteer, count_params, hyper_input, load_hypernet, save

LAYOUT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
              sliding_window=5, pad_token_id=0)
KINDS = ["gemma2", "gemma3_text"]
VARIANTS = ["no_context", "in_context", "cross_attention"]
LAYER, N = 2, 3  # steering layer and hypernetwork depth on the 4-block tiny base


def tiny_base(kind, seed=0):
    """A frozen tiny random base. Norm weights are randomised: left at 0 they would hide (1 + w) bugs."""
    torch.manual_seed(seed)
    if kind == "gemma2":
        cfg = M.GemmaConfig(model_type="gemma2", **LAYOUT)
    else:
        cfg = M.GemmaConfig(model_type="gemma3_text", **LAYOUT, attn_logit_softcapping=None,
                            final_logit_softcapping=None, rope_theta=1e6,
                            layer_types=["sliding_attention", "full_attention"] * 2)
    base = M.Gemma(cfg)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.5)
    return base.eval().requires_grad_(False)


def hypernet(base, variant, randomise=True, **kw):
    """A hypernetwork from `base`; randomise=True also gives the head and the new norms random
    values, so Δ is not trivially 0 and the (1 + w) of every norm matters."""
    hyper = HyperSteer.from_base(base, HyperConfig(variant, n_blocks=N, layer=LAYER, **kw))
    if randomise:
        with torch.no_grad():
            hyper.head.weight.normal_(0, 0.1)
            hyper.head.bias.normal_(0, 0.1)
            for n, p in hyper.named_parameters():
                if "cross" in n and "norm" in n or "kv_layernorm" in n or n == "norm.weight":
                    p.normal_(0, 0.5)
    return hyper


def left_pad(seqs, value=0):
    """(ids (B, T), mask (B, T)) from token lists, left padded; works for (T, d) tensors too."""
    T = max(len(s) for s in seqs)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    if torch.is_tensor(seqs[0]):
        out = torch.full((len(seqs), T, seqs[0].shape[-1]), float(value))
    else:
        out = torch.full((len(seqs), T), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, T - len(s):] = torch.as_tensor(s)
        mask[b, T - len(s):] = True
    return out, mask


def inputs(base, seed=0):
    """Three examples of different lengths: steering ids, base prompt ids, and X (the base residual
    at the steering layer over the left-padded prompts)."""
    g = torch.Generator().manual_seed(seed)
    steer = [[2] + torch.randint(3, 128, (n,), generator=g).tolist() for n in (6, 3, 9)]
    prompts = [[2] + torch.randint(3, 128, (n,), generator=g).tolist() for n in (10, 4, 7)]
    s_ids, s_mask = left_pad(steer)
    p_ids, p_mask = left_pad(prompts)
    x = base.residual(p_ids, p_mask, LAYER)  # (B, Tx, d)
    return steer, prompts, s_ids, s_mask, p_ids, p_mask, x


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_step0_is_the_base_model(kind, variant):
    base = tiny_base(kind)
    hyper = hypernet(base, variant, randomise=False)
    _, _, s_ids, s_mask, p_ids, p_mask, x = inputs(base)
    with torch.no_grad():
        delta = hyper(s_ids, s_mask, x, p_mask)
        assert delta.shape == (3, 64) and delta.dtype == torch.float32
        assert torch.equal(delta, torch.zeros(3, 64))  # the zero head: Δ is exactly 0 at step 0
        steered = base(p_ids, p_mask, steer=M.Steer(LAYER, delta, 1.0, p_mask))
        assert torch.equal(steered, base(p_ids, p_mask))
        # Δ comes back in the base compute dtype: that of x (here bf16), else of the embeddings.
        out = hypernet(base, variant)(s_ids, s_mask, x.bfloat16(), p_mask)
        assert out.shape == (3, 64) and out.dtype == torch.bfloat16 and out.abs().sum() > 0
    if variant == "cross_attention":
        with pytest.raises(ValueError, match="needs x"):
            hyper(s_ids, s_mask)
    with pytest.raises(ValueError, match="left-padded"):
        hyper(s_ids.flip(1), s_mask.flip(1), x, p_mask)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_equals_one_at_a_time(kind, variant):
    base = tiny_base(kind)
    hyper = hypernet(base, variant)
    steer, prompts, s_ids, s_mask, p_ids, p_mask, x = inputs(base)
    with torch.no_grad():
        batch = hyper(s_ids, s_mask, x, p_mask)
        assert torch.isfinite(batch).all()
        for b in range(3):
            ids, p = torch.tensor([steer[b]]), torch.tensor([prompts[b]])
            one = hyper(ids, torch.ones_like(ids, dtype=torch.bool), base.residual(p, None, LAYER), None)
            assert (one[0] - batch[b]).abs().max() < 1e-5, b
        if variant == "cross_attention":
            # X at padding positions is never read: garbage there changes nothing, bit for bit.
            junk = x.clone()
            junk[~p_mask] = 1e4 * torch.randn(int((~p_mask).sum()), 64)
            assert torch.equal(hyper(s_ids, s_mask, junk, p_mask), batch)
            # ...while the real positions of X do matter, in content but not in order: cross attention
            # has no RoPE, so shuffling X's tokens leaves Δ unchanged.
            assert not torch.allclose(hyper(s_ids, s_mask, x + p_mask[..., None], p_mask), batch)
            shuffled = torch.cat([x[:, :4], x[:, 4:][:, torch.randperm(x.shape[1] - 4)]], 1)  # row 0 is unpadded
            assert (hyper(s_ids, s_mask, shuffled, p_mask)[0] - batch[0]).abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_cross_block_matches_the_spec_formula(kind):
    """SPEC §3 per block, written out with einsum: self-attention as in the base, then
    S + PostNorm_c(CrossAttn(Q = PreNorm_c(S), K = V = KVNorm(X))) with GQA, the base's score scale
    and soft-capping, Gemma-3's q/k norms, no RoPE, padding keys masked; then the FFN."""
    base = tiny_base(kind)
    blk = hypernet(base, "cross_attention").layers[1]
    cfg, a = base.cfg, blk.cross_attn
    B, T, Tx, nh, nkv, hs = 2, 6, 5, 4, 2, 16
    with torch.no_grad():
        for n, p in blk.named_parameters():
            if "cross" in n or "kv_" in n:
                p.normal_(0, 0.3)
        s, x = torch.randn(B, T, 64), torch.randn(B, Tx, 64)
        s_mask = torch.ones(B, T, dtype=torch.bool)
        x_mask = torch.tensor([[True] * Tx, [False, False, True, True, True]])
        rot, masks = base.attention_inputs(s_mask, T)
        cos, sin, mask = *rot[blk.layer_type], masks[blk.layer_type]
        out = blk(s, cos, sin, mask, x, x_mask[:, None, None, :].expand(B, 1, T, Tx))

        h = s + blk.post_attention_layernorm(blk.self_attn(blk.input_layernorm(s), cos, sin, mask))
        q = (blk.pre_cross_layernorm(h) @ a.q_proj.weight.T).view(B, T, nh, hs)
        kv = blk.kv_layernorm(x)
        k, v = (kv @ a.k_proj.weight.T).view(B, Tx, nkv, hs), (kv @ a.v_proj.weight.T).view(B, Tx, nkv, hs)
        if cfg.qk_norm:
            q, k = a.q_norm(q), a.k_norm(k)
        k, v = k.repeat_interleave(nh // nkv, 2), v.repeat_interleave(nh // nkv, 2)  # query head i -> kv head i // 2
        scores = torch.einsum("bthd,bshd->bhts", q, k) * cfg.query_pre_attn_scalar ** -0.5
        if cfg.attn_logit_softcapping:
            scores = cfg.attn_logit_softcapping * torch.tanh(scores / cfg.attn_logit_softcapping)
        scores = scores.masked_fill(~x_mask[:, None, None, :], float("-inf"))
        y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, nh * hs) @ a.o_proj.weight.T
        h = h + blk.post_cross_layernorm(y)
        ref = h + blk.post_feedforward_layernorm(blk.mlp(blk.pre_feedforward_layernorm(h)))
    assert (out - ref).abs().max() < 1e-4


def test_hyper_input(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials + ["user", "model", "\n"] + [f"w{i}" for i in range(20)])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    raw.add_special_tokens(specials)
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = M.Tokenizer(tmp_path / "tokenizer.json")
    w = {i: vocab[f"w{i}"] for i in range(5)}
    concept, instruction = "w1 w2", "w3 w4"
    # <bos> + raw text, no chat template; in context appends the raw base prompt after a newline.
    assert hyper_input(tok, concept, instruction, "no_context") == [2, w[1], w[2]]
    assert hyper_input(tok, concept, instruction, "cross_attention") == [2, w[1], w[2]]
    assert hyper_input(tok, concept, instruction, "in_context") == [2, w[1], w[2], vocab["\n"], w[3], w[4]]
    with pytest.raises(ValueError, match="unknown hypernetwork variant"):
        hyper_input(tok, concept, instruction, "prompting")


# ----------------------------------------------------------------------------- init and training

@pytest.mark.parametrize("kind", KINDS)
def test_copied_blocks_equal_the_base_at_init(kind):
    base = tiny_base(kind)
    hyper = hypernet(base, "cross_attention", randomise=False)
    mine = hyper.state_dict()
    assert torch.equal(mine["embed_tokens.weight"], base.model.embed_tokens.weight)
    copied = 0
    for k, v in base.model.state_dict().items():
        if k.startswith("layers.") and int(k.split(".")[1]) < N:
            assert torch.equal(mine[k], v), k
            copied += 1
    assert copied == N * (11 if kind == "gemma2" else 13)  # 7 linears + 4 norms (+ q/k norms on Gemma-3)
    new = {k: v for k, v in mine.items() if k not in base.model.state_dict()}
    for k, v in new.items():
        if k.endswith("_proj.weight"):                     # cross-attention projections: normal(0, 0.02)
            assert abs(v.std().item() - 0.02) < 0.004, k
        else:                                              # new norms and the head: exactly zero
            assert torch.equal(v, torch.zeros_like(v)), k
    assert {k.split(".")[-2] for k in new if k.startswith("layers.0.")} >= {
        "q_proj", "k_proj", "v_proj", "o_proj", "pre_cross_layernorm", "post_cross_layernorm", "kv_layernorm"}
    # Functionally: a no-context hypernetwork's N blocks reproduce the base's residual after block N-1.
    nc = hypernet(base, "no_context")
    seen = {}
    nc.layers[-1].register_forward_hook(lambda mod, inp, out: seen.update(h=out))
    ids, mask = left_pad([[2, 5, 6, 7, 8, 9, 10], [2, 11, 12]])
    with torch.no_grad():
        nc(ids, mask)
        assert torch.equal(seen["h"][mask], base.residual(ids, mask, N - 1)[mask])
    # --random-init (paper Table 2 ablation): fresh weights, head still zero.
    rnd = HyperSteer.from_base(base, HyperConfig("cross_attention", N, LAYER, random_init=True))
    assert not torch.equal(rnd.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert abs(rnd.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.004
    assert torch.equal(rnd.layers[0].input_layernorm.weight, torch.zeros(64))
    assert torch.equal(rnd.head.weight, torch.zeros(64, 64)) and torch.equal(rnd.head.bias, torch.zeros(64))


@pytest.mark.parametrize("kind,variant,freeze", [("gemma2", "cross_attention", False),
                                                 ("gemma3_text", "cross_attention", False),
                                                 ("gemma2", "in_context", True),
                                                 ("gemma3_text", "no_context", False)])
def test_every_trainable_parameter_moves(kind, variant, freeze):
    base = tiny_base(kind)
    hyper = hypernet(base, variant, randomise=False, freeze_embeddings=freeze)
    _, _, s_ids, s_mask, p_ids, p_mask, x = inputs(base)
    targets = torch.randint(0, 128, p_ids.shape, generator=torch.Generator().manual_seed(1))
    trainable = {n: p for n, p in hyper.named_parameters() if p.requires_grad}
    assert ("embed_tokens.weight" in trainable) != freeze
    start = {n: p.detach().clone() for n, p in hyper.named_parameters()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.0)  # decay 0: only gradients move weights

    def step():
        delta = hyper(s_ids, s_mask, x, p_mask)
        logits = base(p_ids, p_mask, steer=M.Steer(LAYER, delta, 1.0, p_mask))   # Eq. 1, frozen base
        F.cross_entropy(logits[p_mask], targets[p_mask]).backward()              # toy Eq. 4
        opt.step()
        opt.zero_grad()

    # Step 1: the head's weight is 0, so dΔ/d(body) = W · ... = 0: only the head's weight and bias
    # get a gradient, and Adam leaves zero-gradient parameters exactly where they were.
    step()
    moved = {n for n, p in hyper.named_parameters() if not torch.equal(p, start[n])}
    assert moved == {"head.weight", "head.bias"}
    # Step 2: the head is no longer 0, gradients reach every parameter, and every trainable one moves.
    step()
    moved = {n for n, p in hyper.named_parameters() if not torch.equal(p, start[n])}
    assert moved == set(trainable), set(trainable) - moved
    if variant == "cross_attention":
        assert {"layers.0.cross_attn.q_proj.weight", "layers.0.kv_layernorm.weight"} <= moved
    if freeze:
        assert torch.equal(hyper.embed_tokens.weight, start["embed_tokens.weight"])


def test_paper_parameter_counts_on_meta_device():
    """Paper App. A.3.1: N = 22 cross-attention blocks on Gemma-2-2b ≈ 0.998x the base's parameters;
    one cross-attention block ≈ 1.18x a standard block."""
    with torch.device("meta"):
        base = M.Gemma(M.gemma2_2b())
    hyper = HyperSteer.from_base(base, HyperConfig("cross_attention", n_blocks=22))
    assert hyper.head.weight.is_meta
    nb, nh = count_params(base), count_params(hyper)
    bb, hb = count_params(base.model.layers[0]), count_params(hyper.layers[0])
    print(f"\nGemma-2-2b {nb:,} params; hypernetwork N=22 {nh:,} = {nh / nb:.4f}x (paper 0.998x)"
          f"\nbase block {bb:,}; cross-attention block {hb:,} = {hb / bb:.4f}x (paper 1.18x)")
    assert abs(nh / nb / 0.998 - 1) < 0.01
    assert abs(hb / bb / 1.18 - 1) < 0.01


# ----------------------------------------------------------------------------- checkpoints

def test_save_load_round_trip_and_mismatches(tmp_path):
    base = tiny_base("gemma2")
    hyper = hypernet(base, "cross_attention")
    path = tmp_path / "hyper.safetensors"
    save(hyper, path, extra_meta={"step": 7})
    assert [p.name for p in tmp_path.iterdir()] == ["hyper.safetensors"]  # no temp file left behind
    loaded = load_hypernet(path, base, HyperConfig("cross_attention", N, LAYER, freeze_embeddings=True))
    assert loaded.hcfg.variant == "cross_attention" and not loaded.embed_tokens.weight.requires_grad
    assert loaded.state_dict().keys() == hyper.state_dict().keys()
    for k, v in hyper.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    _, _, s_ids, s_mask, _, p_mask, x = inputs(base)
    with torch.no_grad():
        assert torch.equal(loaded(s_ids, s_mask, x, p_mask), hyper(s_ids, s_mask, x, p_mask))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["step"] == "7" and json.loads(meta["hyper_config"])["n_blocks"] == N

    # Another base model, another variant or depth, a tampered file, a foreign file: one clear line each.
    with pytest.raises(ValueError, match=r"trained for base model gemma2, 4 blocks, d=64.*not gemma3_text"):
        load_hypernet(path, tiny_base("gemma3_text"))
    with pytest.raises(ValueError, match="variant 'cross_attention', expected 'no_context'"):
        load_hypernet(path, base, HyperConfig("no_context", N, LAYER))
    with pytest.raises(ValueError, match="n_blocks 3, expected 2"):
        load_hypernet(path, base, HyperConfig("cross_attention", 2, LAYER))
    state = load_file(str(path))
    del state["layers.1.cross_attn.q_proj.weight"]
    state["head.bias"] = torch.zeros(63)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"missing layers\.1\.cross_attn\.q_proj\.weight; wrong shape head\.bias"):
        load_hypernet(tmp_path / "bad.safetensors", base)
    save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a HyperSteer checkpoint"):
        load_hypernet(tmp_path / "plain.safetensors", base)
    with pytest.raises(FileNotFoundError):
        load_hypernet(tmp_path / "none.safetensors", base)
