"""All tests, CPU-fast: tiny random configs checked against Hugging Face `transformers` (the
numerical oracle, used here only), equivalence between two paths of our own code, real-weight
tests on the offline gemma-3-270m, and bad input.

    python -m pytest -q test_all.py
"""
import http.server
import json
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hub
import model as M

# ============================================================================ model.py (SPEC §2, §4)

LAYOUT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
              sliding_window=5, pad_token_id=0)
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def hf_pair(kind, seed=0):
    """A tiny random transformers model and ours with the same weights. Norm weights are
    randomised: left at 0 they would hide (1 + w) bugs."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    if kind == "gemma2":
        hcfg = Gemma2Config(**LAYOUT, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        hf = Gemma2ForCausalLM(hcfg)
    else:
        hcfg = Gemma3TextConfig(**LAYOUT, layer_types=MIXED, rope_theta=1e6, rope_local_base_freq=1e4)
        hf = Gemma3ForCausalLM(hcfg)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.5)
    ours = M.Gemma(M.GemmaConfig.from_dict(json.loads(hcfg.to_json_string())))
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}, strict=True)
    return hf.eval(), ours.eval()


def padded_batch(seed=0, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, :7] = False
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_logits_equal_transformers(kind):
    hf, ours = hf_pair(kind)
    ids, mask = padded_batch(T=12)  # 12 > sliding window 5
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
        out = ours(ids, mask)
    assert ours.cfg.layer_types == MIXED or kind == "gemma2"
    assert (ref - out)[mask].abs().max() < 1e-4


def test_sdpa_fast_path_equals_plain_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask |= torch.eye(7, dtype=torch.bool)
    fast = M.attend(q, k, v, mask, 0.2, None, fast=True)
    plain = M.attend(q, k, v, mask, 0.2, None, fast=False)
    assert (fast - plain).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_kv_cache_equals_full_forward(kind):
    _, ours = hf_pair(kind)
    ids, mask = padded_batch(T=14)
    with torch.no_grad():
        full = ours(ids, mask)
        cache = M.KVCache(ours.cfg, 3, 14, "cpu", torch.float32)
        steps = [ours(ids[:, :6], mask[:, :6], cache=cache)]        # prefill 6, then one at a time
        for t in range(6, 14):
            steps.append(ours(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache))
    assert (torch.cat(steps, 1) - full)[mask].abs().max() < 1e-5


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_generation_equals_one_by_one(temperature):
    _, ours = hf_pair("gemma2")
    prompts = [[2, 5, 6, 7, 8, 9, 10], [2, 11], [2, 40, 41, 42]]
    kw = dict(max_new_tokens=10, temperature=temperature, top_k=50, top_p=0.9, stop_ids=())
    batched = M.generate(ours, prompts, seeds=[7, 8, 9], **kw)
    single = [M.generate(ours, [p], seeds=[s], **kw)[0] for p, s in zip(prompts, [7, 8, 9])]
    assert batched == single and all(len(o) == 10 for o in batched)


def test_greedy_generation_equals_transformers():
    hf, ours = hf_pair("gemma3_text")
    prompt = [2, 17, 33, 90, 5, 6, 71, 12]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert M.generate(ours, [prompt], max_new_tokens=12, stop_ids=()) [0] == ref


def test_steering_strength_zero_and_layer_convention():
    hf, ours = hf_pair("gemma2")
    ids, mask = padded_batch()
    L, delta = 1, torch.randn(3, 64)
    with torch.no_grad():
        plain = ours(ids, mask)
        assert torch.equal(ours(ids, mask, steer=M.Steer(L, delta, 0.0, mask)), plain)
        steered = ours(ids, mask, steer=M.Steer(L, delta, 2.0, mask))
        assert not torch.allclose(steered, plain)
        # Our layer L == transformers' hidden_states[L + 1] == the output of decoder block L.
        hook = hf.model.layers[L].register_forward_hook(
            lambda mod, inp, out: (out[0] + 2.0 * delta[:, None] * mask[..., None],) + tuple(out[1:])
            if isinstance(out, tuple) else out + 2.0 * delta[:, None] * mask[..., None])
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
        hook.remove()
        hidden = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos,
                    output_hidden_states=True).hidden_states[L + 1]
        assert (ours.residual(ids, mask, L) - hidden)[mask].abs().max() < 1e-4
        assert (ours.residual(ids, mask, L - 4) - hidden)[mask].abs().max() < 1e-4   # negative layer
    assert (steered - ref)[mask].abs().max() < 1e-4
    # Steered generation at strength 0 is the unsteered generation, token for token.
    p = [[2, 5, 6, 7, 8], [2, 9, 10]]
    base = M.generate(ours, p, max_new_tokens=8, stop_ids=())
    assert M.generate(ours, p, 8, steer=M.Steer(L, delta[:2], 0.0), steer_from=[1, 1], stop_ids=()) == base
    assert M.generate(ours, p, 8, steer=M.Steer(L, delta[:2] * 50, 1.0), steer_from=[1, 1], stop_ids=()) != base


def test_run_from_equals_full_forward():
    _, ours = hf_pair("gemma3_text")
    ids, mask = padded_batch()
    with torch.no_grad():
        h = ours.residual(ids, mask, 1)
        assert (ours.head(ours.run_from(h, 1, mask)) - ours(ids, mask))[mask].abs().max() < 1e-5


def test_config_layouts():
    base = dict(model_type="gemma3_text", **{k: v for k, v in LAYOUT.items() if k != "pad_token_id"})
    old = M.GemmaConfig.from_dict({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4})
    new = M.GemmaConfig.from_dict({**base, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert old == new and old.rope_theta == 1e6 and old.rope_local_theta == 1e4
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        M.GemmaConfig.from_dict({**base, "model_type": "llama"})
    assert M.gemma2_2b().layer_types[:2] == ["sliding_attention", "full_attention"]


# ---------------------------------------------------------------- loading, tokenizer, bad input

def tiny_tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials + ["user", "model", "\n"] + [f"w{i}" for i in range(100)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    tok.add_special_tokens(specials)
    tok.save(str(path))


def write_checkpoint(folder, shards=1):
    _, ours = hf_pair("gemma2")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(asdict(ours.cfg)))
    tiny_tokenizer_json(folder / "tokenizer.json")
    sd = ours.state_dict()
    if shards == 1:
        save_file(sd, folder / "model.safetensors")
    else:
        keys = sorted(sd)
        parts = [keys[i::shards] for i in range(shards)]
        wmap = {}
        for i, part in enumerate(parts):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: sd[k] for k in part}, folder / name)
            wmap.update({k: name for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return ours


def test_load_sharded_checkpoint_and_tokenizer(tmp_path):
    ref = write_checkpoint(tmp_path / "m", shards=3)
    loaded, tok = M.load(tmp_path / "m")
    ids, mask = padded_batch()
    assert torch.equal(loaded(ids, mask), ref(ids, mask))
    ids, n = tok.chat("w1 w2")
    assert n == 4 and ids[:4] == [2, 4, 6, 8]


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    def err(folder):
        with pytest.raises((ValueError, OSError)) as e:
            M.load(folder)
        msg = str(e.value)
        assert "\n" not in msg
        return msg
    f = tmp_path / "shard"
    write_checkpoint(f, shards=2)
    (f / "model-00002-of-00002.safetensors").unlink()
    assert "missing shard model-00002-of-00002.safetensors" in err(f)
    f = tmp_path / "shape"
    write_checkpoint(f)
    sd = M.load(f)[0].state_dict()
    sd["model.norm.weight"] = torch.zeros(65)
    save_file(sd, f / "model.safetensors")
    assert "wrong shape model.norm.weight [65] (expected [64])" in err(f)
    f = tmp_path / "escape"
    write_checkpoint(f, shards=2)
    idx = json.loads((f / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "../x.safetensors"
    (f / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert "points outside" in err(f)
    f = tmp_path / "config"
    write_checkpoint(f)
    (f / "config.json").write_text((f / "config.json").read_text()[:40])
    assert "malformed config.json" in err(f)
    (f / "config.json").write_text(json.dumps({"model_type": "gemma2", "hidden_size": 64}))
    assert "lacks vocab_size" in err(f)
    f = tmp_path / "tok"
    write_checkpoint(f)
    (f / "tokenizer.json").unlink()
    assert "tokenizer.json not found" in err(f)
    f = tmp_path / "extra"
    write_checkpoint(f)
    sd = M.load(f)[0].state_dict()
    sd["lm_head.weight"] = torch.zeros(1)
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, f / "model.safetensors")
    msg = err(f)
    assert "missing model.layers.0.mlp.up_proj.weight" in msg and "unexpected lm_head.weight" in msg
    assert "no such model folder" in err(tmp_path / "nowhere")


# ---------------------------------------------------------------- hub downloads on 127.0.0.1

class FakeHub(http.server.BaseHTTPRequestHandler):
    files, log = {}, []

    def do_GET(self):
        FakeHub.log.append((self.path, self.headers.get("Authorization"), self.headers.get("Range")))
        if "gated" in self.path:
            return self._reply(403, b"")
        body = FakeHub.files.get(self.path)
        if body is None:
            return self._reply(404, b"")
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].rstrip("-"))
            return self._reply(206, body[start:])
        self._reply(200, body)

    def _reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HYPERSTEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    FakeHub.files, FakeHub.log = {}, []
    yield FakeHub
    server.shutdown()


def test_hub_download_resume_token_and_errors(fake_hub, tmp_path, capsys):
    src = tmp_path / "src"
    write_checkpoint(src, shards=2)
    for f in src.iterdir():
        fake_hub.files[f"/org/tiny/resolve/main/{f.name}"] = f.read_bytes()
    # An interrupted earlier download left half of shard 1 behind: it is resumed, not restarted.
    shard = "model-00001-of-00002.safetensors"
    dest = tmp_path / "cache" / "models--org--tiny" / "main"
    dest.mkdir(parents=True)
    (dest / f"{shard}.part").write_bytes(fake_hub.files[f"/org/tiny/resolve/main/{shard}"][:100])
    model, _ = M.load("org/tiny")
    assert torch.equal(model.model.norm.weight, M.load(src)[0].model.norm.weight)
    assert ("/org/tiny/resolve/main/" + shard, "Bearer hf_secret_token", "bytes=100-") in fake_hub.log
    assert "hf_secret_token" not in capsys.readouterr().err + "".join(p.name for p in dest.iterdir())
    with pytest.raises(PermissionError, match="HTTP 403: gated"):
        hub.hf_file("org/gated", "config.json")
    with pytest.raises(FileNotFoundError, match="HTTP 404"):
        hub.hf_file("org/absent", "config.json")
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"]["x"] = "../../escaped.safetensors"
    fake_hub.files = {f"/org/evil/resolve/main/{n}": b for n, b in [
        ("config.json", b"{}"), ("tokenizer.json", b"{}"),
        ("model.safetensors.index.json", json.dumps(idx).encode())]}
    with pytest.raises(ValueError, match="points outside"):
        hub.hf_download("org/evil")
    assert not (tmp_path / "cache" / "escaped.safetensors").exists()
