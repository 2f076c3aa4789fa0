"""FlexAttention fast path for soft-capped Gemma-2 attention on CUDA (SPEC §2); proven equal to
model.attend's plain path in test_all.py.

FlexAttention (torch >= 2.5) computes the same soft-capped, masked attention as one fused kernel. The
soft-capping is a score_mod and the causal + left-padding + sliding-window mask a mask_mod, from which
create_block_mask also learns which 128 x 128 tiles are all masked and skips them. model.py asks
use_flex whether to take this path, builds the masks with flex_masks and attends with flex_attend.

    python -m pytest -q test_all.py -k flex       # equal to the plain path (forward on CPU; + backward on CUDA)
    python bench.py gpu-speed                     # prefill speed with it against transformers, on a GPU
"""
import torch

FLEX = "cuda"     # device type on which use_flex picks FlexAttention; None = the plain path everywhere
_flex_compiled = None


def use_flex(cfg, x, cache=None):
    """FlexAttention for soft-capped attention (SDPA cannot soft-cap) on the FLEX device, in training and
    in a prefill (an empty KV cache); never in a decode step, where one query row gains nothing."""
    return (x.device.type == FLEX and cfg.attn_logit_softcapping is not None
            and (cache is None or cache.length == 0))


def flex_masks(cfg, real):
    """BlockMasks equal to model.attention_inputs' boolean masks when the T queries are all the keys
    (S = T). real (B, T) is True on real tokens; each query also sees itself (no empty row)."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, T = real.shape

    def full(b, h, qi, ki):
        return (ki <= qi) & (real[b, ki] | (ki == qi))

    def sliding(b, h, qi, ki):
        return full(b, h, qi, ki) & (qi - ki < cfg.sliding_window)

    return {name: create_block_mask(fn, B, None, T, T, device=real.device)
            for name, fn in (("full_attention", full), ("sliding_attention", sliding))}


def flex_attend(q, k, v, block_mask, scale, softcap):
    """model.attend's maths through FlexAttention, compiled into one kernel on CUDA (eager elsewhere:
    the unfused reference, forward only on CPU, which is what the CPU test runs)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention
    fn = flex_attention
    if q.is_cuda:
        _flex_compiled = _flex_compiled or torch.compile(flex_attention)
        fn = _flex_compiled

    if torch.is_autocast_enabled(q.device.type):                       # one dtype, as autocast gives the matmuls
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)

    def soft_cap(score, b, h, qi, ki):
        return softcap * torch.tanh(score / softcap)                   # Gemma-2 score soft-capping

    return fn(q, k, v, score_mod=None if softcap is None else soft_cap, block_mask=block_mask, scale=scale,
              enable_gqa=k.shape[1] != q.shape[1])
