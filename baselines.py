"""The AxBench baselines HyperSteer is compared with (SPEC §8): prompting, DiffMean and ReFT-r1.

Each gives what steer.py's evaluation applies: prompting a user turn, DiffMean and ReFT-r1 a unit
direction w and the concept's max activation (Δ = strength * max_act * w). Their SPEC §7
generations come out of the same path as HyperSteer's:

    python steer.py eval --method diffmean --hypernet runs/demo/hypernet.safetensors --out runs/demo/gens.jsonl
    python steer.py eval --method reft-r1 --split held-in --instructions demo --grid 1,2 --max-concepts 1 \
        --max-new-tokens 16 --out /tmp/gens.jsonl                                   # tiny CPU variant
"""
import random

import torch
import torch.nn.functional as F

import data
import model as M
import train
from lib import chat_api

PROMPT_TEMPLATE = ("Include content related to {concept} in every response you give. Always reference {concept}, "
                   "even where this does not answer the question or seems out of context.")
WRITE_PROMPT = ('Write a prompt for a language model that makes it include content related to the concept "{concept}" '
                "in all of its responses. The prompt must tell the model to reference the concept even where that "
                "does not answer the question or seems out of context. You may include one or two short example "
                "responses. Return only the prompt, with nothing before or after it.")


# ----------------------------------------------------------------------------- prompting

def steering_prompt(concept, judge_cfg=None):
    """SPEC §8 prompting: an LLM writes the steering prompt (through chat_api.py's cached client) when an
    endpoint is configured; otherwise a fixed template in the same spirit."""
    if judge_cfg is None:
        return PROMPT_TEMPLATE.format(concept=concept)
    reply = chat_api.chat([{"role": "user", "content": WRITE_PROMPT.format(concept=concept)}], judge_cfg)
    return reply.strip().strip('"') or PROMPT_TEMPLATE.format(concept=concept)


def prompted(steering_prompt_text, instruction):
    """The prompting baseline's user turn (SPEC §8); the judge still sees the original instruction."""
    return f"{steering_prompt_text}\n\nQuestion: {instruction}"


# ----------------------------------------------------------------------------- DiffMean and ReFT-r1

def device_of(base):
    return base.model.embed_tokens.weight.device


@torch.no_grad()
def activations(base, tok, rows, layer, max_len=256, batch_size=8):
    """Layer-L residuals (N_tokens, d) over rows' prompt + output tokens after the chat prefix, no padding."""
    examples, out = train.encode(tok, rows, max_len, quiet=True), []
    for i in range(0, len(examples), batch_size):
        b = train.collate(examples[i:i + batch_size], base.cfg.pad_token_id).to(device_of(base))
        out.append(base.residual(b.ids, b.real, layer)[b.steer].float())
    return torch.cat(out)


def diffmean(pos, neg):
    """SPEC §8: w = mean(positive activations) - mean(negative activations), unit length."""
    w = pos.float().mean(0) - neg.float().mean(0)
    return w / w.norm()


def train_reft_r1(base, tok, rows, layer, max_len=256, epochs=3, batch_size=6, lr=1e-2, k=8, l1=0.005, seed=0):
    """SPEC §8 ReFT-r1: latent z_t = ReLU(h_t · w); the steered pass adds mean(top-k z) * w at every steered
    position; loss = LM cross-entropy on the outputs + λ mean|z| over the other positions, λ ramped
    0 -> l1; w stays unit length (gradient parallel to w removed, renormalised after every step)."""
    examples = train.encode(tok, rows, max_len, quiet=True)
    w = torch.full((base.cfg.hidden_size,), 0.01, device=device_of(base), requires_grad=True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    total, step = epochs * -(-len(examples) // batch_size), 0
    for epoch in range(epochs):
        for b in train.batches(examples, batch_size, seed, epoch, base.cfg.pad_token_id):
            b = b.to(device_of(base))
            with torch.no_grad():
                h = base.residual(b.ids, b.real, layer)                           # (B, T, d), frozen
            z = torch.relu(h.float() @ w)                                          # (B, T) latents
            top = z.masked_fill(~b.steer, -1.0).topk(min(k, z.shape[1]), dim=-1)  # (B, k)
            real = top.values >= 0                                                 # rows shorter than k
            mean_top = (top.values.clamp(min=0) * real).sum(-1) / real.sum(-1).clamp(min=1)
            steered = M.intervene(h, mean_top[:, None] * w, 1.0, b.steer)          # Eq. 1
            out = base.run_from(steered, layer, b.real)
            sel = b.labels != -100
            loss = F.cross_entropy(base.head(out[sel]).float(), b.labels[sel])
            rest = b.steer.scatter(1, top.indices, False)                          # non-top-k positions
            if rest.any():
                loss = loss + l1 * step / max(total - 1, 1) * z[rest].abs().mean()
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                w.grad -= (w.grad @ w) / (w @ w) * w                              # stay on the sphere
                opt.step()
                w /= w.norm()
            step += 1
    return w.detach()


def negatives(rows, concept_id, n):
    """SPEC §8: the concept's genre's negatives (AxBench: category negative, concept_id -1), at most n.
    Data without negatives (the bundled demo) gets a stand-in: the other concepts' positives of that genre."""
    genre = next(r["concept_genre"] for r in rows if r["concept_id"] == concept_id)
    neg = [r for r in rows if r["category"] == "negative" and r["concept_genre"] == genre]
    neg = neg or [r for r in data.positives(rows) if r["concept_id"] != concept_id and r["concept_genre"] == genre]
    neg = neg or [r for r in data.positives(rows) if r["concept_id"] != concept_id]
    if not neg:
        raise ValueError(f"concept {concept_id}: no negatives (or other concepts) in the data")
    return random.Random(concept_id).sample(neg, min(n, len(neg)))                # a fixed sample


def vector_baseline(base, tok, rows, concept_id, layer, method, max_len=256):
    """(w, max_act) for DiffMean or ReFT-r1 (SPEC §8); Δ = strength * max_act * w, max_act the largest
    latent h_t · w on the concept's positive examples."""
    pos = [r for r in data.positives(rows) if r["concept_id"] == concept_id]
    if not pos:
        raise ValueError(f"no positive rows for concept {concept_id}")
    neg = negatives(rows, concept_id, len(pos))
    acts = activations(base, tok, pos, layer, max_len)
    if method == "diffmean":
        w = diffmean(acts, activations(base, tok, neg, layer, max_len))
    elif method == "reft-r1":
        w = train_reft_r1(base, tok, pos + neg, layer, max_len)
    else:
        raise ValueError(f"unknown vector baseline {method!r}; expected diffmean or reft-r1")
    return w, (acts @ w).max().item()
