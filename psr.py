"""PSR: activation steering that mimics prompting (arXiv 2605.03907, SPEC §8a).

A prompt is itself an activation intervention. With x' = steering prompt + instruction x, sample the
model's own answer y' ~ B(x'); on the answer tokens, Δ_PS = A_l(x' ⊕ y') − A_l(x ⊕ y') is what the
prompt did to layer l. Its size varies by orders of magnitude from token to token, so PSR learns a
per-token function of the activation itself instead of one constant vector:

    λ_l(h_t) = ReLU(w_l · h_t + b_l)        h_t <- h_t + strength * λ_l(h_t) * z_l      (2d + 1 per layer)

S-PSR ("single") edits the steering layer and imitates it and every later layer; A-PSR ("all") edits
and imitates every layer, chained: layer l's probe reads the activation with the earlier edits added,
because model.Gemma.run applies a Steering's edits in layer order. PSR goes through the project's one
intervention mechanism (model.Steering / model.intervene), like every other method. Here: the edit, its
losses and training, and the command; psr_data.py samples y' and computes both views' residuals,
psr_eval.py measures the result (paper Fig. 2, 3).

Decisions where the paper is silent (SPEC §8a "unknown"; all are flags): the steering prompt is the
prompting baseline's (§8, `Question:` framing); y' is sampled at temperature 1.0 with top-k 50 (§7's
sampling), up to 16 new tokens, one per instruction, from the bundled demo instructions, a fixed split
into train and eval instructions; samples are cached in samples.jsonl (a rerun reuses them). The
steered positions are §4's (every position after the chat prefix, in training too); the imitated
positions are §8a's "answer only" (last prompt token through y'), aligned from the right. z, w and b
start as the weight, weight and bias of default nn.Linear(d, 1) layers, U(±1/√d), then b is moved to
the median of −w·h over the training answers (center_probes: no probe starts dead).

    python psr.py --concept "the moon" --variant all --out runs/psr-moon-all   # 5-14 min on 2 shared CPU cores
    python psr.py --concept "the moon" --variant single --samples runs/psr-moon-all/samples.jsonl \
        --out runs/psr-moon-single                                                  # reuses the samples
    python psr.py --concept "the moon" --n-train 2 --n-eval 1 --max-new-tokens 6 --epochs 1 --out /tmp/psr
    python steer.py compare --psr runs/psr-moon-all/psr.safetensors --prompt "Plan a picnic" --sweep 0,1,2
    python -m pytest -q test_all.py -k psr
"""
import argparse
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

import data
import fileio
import loader
import model as M
import psr_eval
from hypernet import check_base
from psr_data import answer_nll, collate, prepare, sample_pairs, states

GRID = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]   # SPEC §7 strengths; 1 = what training fitted


# ----------------------------------------------------------------------------- the intervention

class PSR(nn.Module):
    """z_l, w_l (d,) and b_l () per edited layer; edits() gives model.Steering its functions."""

    def __init__(self, d, layers, variant, concept=""):
        super().__init__()
        self.variant, self.layers, self.concept = variant, sorted(layers), concept
        self.z, self.w, self.b = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for l in self.layers:  # a default nn.Linear(d, 1)'s weight and bias, U(±1/√d); z another such weight
            probe, out = nn.Linear(d, 1), nn.Linear(d, 1, bias=False)
            self.w[str(l)], self.b[str(l)] = nn.Parameter(probe.weight[0].detach()), nn.Parameter(probe.bias[0].detach())
            self.z[str(l)] = nn.Parameter(out.weight[0].detach())
        self.last_lambda = {}   # layer -> λ (B, T) of the latest call (the server's per-token shading)

    def lam(self, layer, h):
        """λ_l(h_t) = ReLU(w_l · h_t + b_l): one scalar per token, h (B, T, d) -> (B, T)."""
        return torch.relu(h @ self.w[str(layer)].to(h.dtype) + self.b[str(layer)].to(h.dtype))

    def edit(self, layer):
        def add(h):                                                    # (B, T, d) -> (B, T, d)
            lam = self.last_lambda[layer] = self.lam(layer, h)
            return lam[..., None] * self.z[str(layer)].to(h.dtype)     # intervene: h + strength * λ z (Eq. 1)
        return add

    def edits(self):
        return {l: self.edit(l) for l in self.layers}


def save(psr, path, base_cfg, extra=None):
    meta = dict(extra or {}, method="PSR", variant=psr.variant, layers=json.dumps(psr.layers), concept=psr.concept,
                base_config=json.dumps(asdict(base_cfg)), model_hint=base_cfg.model_type,
                d_model=str(base_cfg.hidden_size))
    loader.save_safetensors(path, {f"psr.{k}": v for k, v in psr.state_dict().items()}, meta)


def load(path, base):
    """A PSR file for this base model, strict: base config, width and every layer's z, w, b must fit."""
    path = Path(path)
    header, _, meta = loader.read_header(path)
    if meta.get("method") != "PSR" or meta.get("variant") not in ("single", "all"):
        raise ValueError(f"{path}: not a PSR file (metadata method {meta.get('method')!r}, variant {meta.get('variant')!r})")
    check_base(path, meta, base.cfg)
    d = base.cfg.hidden_size
    if meta.get("d_model") != str(d):
        raise ValueError(f"{path}: made for d_model {meta.get('d_model')}, the model has {d}")
    try:
        layers = [base.layer_index(int(l)) for l in json.loads(meta["layers"])]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed layers metadata ({e})") from None
    psr = PSR(d, layers, meta["variant"], meta.get("concept", ""))
    want = {f"psr.{k}": v.shape for k, v in psr.state_dict().items()}
    loader.check_state_dict(path, want, {k: info["shape"] for k, info in header.items()},
                            f"a {psr.variant} PSR at layers {layers}, d={d}")
    tensors, _ = loader.read_safetensors(path)
    psr.load_state_dict({k[4:]: v for k, v in tensors.items()})
    return psr.to(base.model.embed_tokens.weight.device).requires_grad_(False)


# ----------------------------------------------------------------------------- the losses

def steered(base, psr, examples, start, strength=1.0):
    """The steered run of a batch's plain views from their cached input to block `start`: the residuals
    after every block from start on at the answer columns (L, B, A, d), the final residual, ids, answer mask."""
    dev, pairs = base.model.embed_tokens.weight.device, [e["pair"] for e in examples]
    ids, real, steer, answer = collate(pairs, "plain", base.cfg.pad_token_id, dev)
    B, T, A = *ids.shape, answer.shape[1]
    h = torch.zeros(B, T, base.cfg.hidden_size, device=dev)
    for b, e in enumerate(examples):
        h[b, T - len(e["h_in"]):] = e["h_in"]                          # left padded like ids
    acts, h = states(base, h, real, start, M.Steering(psr.edits(), strength), steer, last=A)
    return acts, h, ids, answer


def layer_mse(acts, examples, answer):
    """Per imitated layer and example: mean over (answer positions, dims) of (steered − prompted)², (L, B)."""
    A, target = answer.shape[1], torch.zeros_like(acts)
    for b, e in enumerate(examples):
        target[:, b, A - e["pair"].n_answer:] = e["target"]
    err = ((acts - target) ** 2).mean(-1) * answer                     # (L, B, A)
    return err.sum(-1) / answer.sum(-1)


def batch_loss(base, psr, examples, start, loss="mse", norms=None, strength=1.0, lambda_reg=0.0):
    """The mean over examples of each example's own loss, so a batch equals batch 1 (SPEC §8a). mse: Σ over
    the imitated layers start.. of layer_mse / norms[l]; ll: token-mean cross-entropy of y' given x, steered."""
    acts, h, ids, answer = steered(base, psr, examples, start, strength)
    A = answer.shape[1]
    if loss == "mse":
        value = (layer_mse(acts, examples, answer) / (1.0 if norms is None else norms[:, None])).sum(0)
    else:
        value = answer_nll(base, h, ids, answer)
    if lambda_reg:  # the steered positions' λ, summed over the answer
        mass = sum((psr.last_lambda[l][:, -A:] * answer).sum(-1) for l in psr.layers) / len(psr.layers)
        value = value + lambda_reg * torch.relu(1 - mass)              # max(0, 1 − Σ_t λ_t), mean over layers
    return value.mean()


@torch.no_grad()
def center_probes(psr, examples, start):
    """b_l = −median(w_l · h) over the training answer tokens (unsteered), so λ starts positive on about half
    of them. Gemma's residual has a large shared component: a random probe is often negative on every token,
    a dead ReLU that gets no gradient and never learns."""
    for l in psr.layers:
        h = torch.cat([e["plain"][l - start] for e in examples])       # (N, d)
        psr.b[str(l)].copy_(-(h @ psr.w[str(l)]).median())


def train(base, psr, examples, start, loss, epochs, lr=1e-3, weight_decay=1e-6, batch_size=4, lambda_reg=0.0,
          seed=0, log=print):
    """AdamW with linear decay to 0 and no warmup (SPEC §8a); the MSE terms are normalised by their value
    with the initial parameters, so the loss starts at 1 per imitated layer."""
    center_probes(psr, examples, start)
    norms = None
    if loss == "mse":
        with torch.no_grad():
            per = []
            for i in range(0, len(examples), batch_size):
                acts, _, _, answer = steered(base, psr, examples[i:i + batch_size], start)
                per.append(layer_mse(acts, examples[i:i + batch_size], answer))
            norms = torch.cat(per, 1).mean(1).clamp(min=1e-12)         # (L,)
    opt = torch.optim.AdamW(psr.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(examples) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    rng, history = random.Random(seed), []
    for epoch in range(epochs):
        order = rng.sample(examples, len(examples))
        total = 0.0
        for i in range(0, len(order), batch_size):
            value = batch_loss(base, psr, order[i:i + batch_size], start, loss, norms, lambda_reg=lambda_reg)
            opt.zero_grad()
            value.backward()
            opt.step()
            sched.step()
            total += value.item() * len(order[i:i + batch_size])
        history.append(total / len(examples))
        log(f"epoch {epoch + 1}/{epochs}: {loss} loss {history[-1]:.4f}"
            + (f" ({history[-1] / len(norms):.3f} per layer)" if norms is not None else ""))
    return history


# ----------------------------------------------------------------------------- the command

def run(args):
    """Sample the pairs (psr_data), train a PSR on them and save it, then measure it on the held-back
    instructions (psr_eval). Returns the summary."""
    out = Path(args.out)
    target = out / "psr.safetensors"
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target}: exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    clock, seconds = time.time(), {}
    base, tok = loader.load(args.model, args.device)
    n, d, L = base.cfg.num_hidden_layers, base.cfg.hidden_size, base.layer_index(args.layer)
    loss = args.loss or {"single": "ll", "all": "mse"}[args.variant]      # the paper's best of each
    epochs = args.epochs or {"mse": 15, "ll": 7}[loss]
    steer_text, eval_ins, train_pairs, eval_pairs, made, reused = sample_pairs(base, tok, args, out)
    seconds["sampling"] = time.time() - clock
    print(f"{base.cfg.model_type}, {n} blocks, d={d}, {args.device}; steering prompt: {steer_text!r}")
    print(f"y' ~ B(x'): {made} sampled, {reused} reused, {len(train_pairs)} train / {len(eval_pairs)} eval "
          f"pairs ({seconds['sampling']:.0f}s)")

    clock = time.time()
    layers, start = (list(range(n)), 0) if args.variant == "all" else ([L], L)
    psr = PSR(d, layers, args.variant, args.concept)
    print(f"{args.variant} PSR at layers {layers[0]}..{layers[-1]}: {sum(p.numel() for p in psr.parameters())} "
          f"parameters (2d + 1 = {2 * d + 1} per layer); {loss} loss, {epochs} epochs, batch {args.batch_size}")
    train_ex = prepare(base, train_pairs, start, args.batch_size)
    history = train(base, psr, train_ex, start, loss, epochs, args.lr, args.weight_decay, args.batch_size,
                    args.lambda_reg, args.seed)
    psr.requires_grad_(False)
    save(psr, target, base.cfg, {"loss": loss, "steering_prompt": steer_text})
    seconds["training"] = time.time() - clock

    clock = time.time()
    ce, recovered, rel, figures = psr_eval.evaluate(base, tok, psr, train_ex, eval_pairs, L, start, args, out)
    seconds["analyses"] = time.time() - clock
    x = eval_ins[0]                                                    # one greedy example, unseen in training
    example = psr_eval.greedy_example(base, tok, psr, steer_text, x, args)
    summary = dict(concept=args.concept, variant=args.variant, loss=loss, layer=L, layers=layers,
                   strength=args.strength, steering_prompt=steer_text, n_train=len(train_pairs),
                   n_eval=len(eval_pairs), epochs=epochs, loss_history=history, ce=ce,
                   prompt_effect_recovered=recovered["steered"], prompt_effect_recovered_constant=recovered["constant"],
                   rel_rmse={m: {str(l): v for l, v in enumerate(r)} for m, r in rel.items()},
                   seconds={k: round(v, 1) for k, v in seconds.items()}, figures=figures,
                   example=dict(instruction=x, **example),
                   settings={k: v for k, v in vars(args).items() if k != "debug"})
    psr_eval.report(out, summary, rel, seconds)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--concept", required=True, help="what to steer towards (the steering prompt is written from it, SPEC §8)")
    add("--variant", default="all", choices=["single", "all"], help="S-PSR (the steering layer) or A-PSR (every layer)")
    add("--loss", choices=["mse", "ll"], help="imitate the prompted activations or maximise y' likelihood "
                                              "(default: the paper's best, ll for single, mse for all)")
    add("--layer", type=int, default=9, help="steering layer L (output of block L; the demo's is 9)")
    add("--strength", type=float, default=1.0, help="α for the evaluation and the example (training uses 1)")
    add("--out", required=True, help="folder for psr.safetensors, summary.json, samples.jsonl and the figures")
    add("--overwrite", action="store_true", help="replace an existing OUT/psr.safetensors")
    add("--samples", help="samples JSONL to read and extend (default OUT/samples.jsonl; share it between runs)")
    add("--model", default=str(loader.DEMO_MODEL), help="base model folder or hub id (default: the offline gemma-3-270m)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    add("--instructions", default=str(data.DEMO_INSTRUCTIONS), help="JSON list of instructions (default: the bundled demo's)")
    add("--n-train", type=int, default=8, help="training instructions")
    add("--n-eval", type=int, default=6, help="held-back instructions, never trained on (the CE and RMSE analyses)")
    add("--samples-per-instruction", type=int, default=1, help="answers y' sampled per instruction")
    add("--max-new-tokens", type=int, default=16, help="length of y' in tokens (at most)")
    add("--temperature", type=float, default=1.0, help="sampling temperature of y' (SPEC §8a unknown; §7's 1.0)")
    add("--top-k", type=int, default=50, help="sample y' from the k likeliest tokens (0 = all)")
    add("--epochs", type=int, help="training epochs (default: 15 for mse, 7 for ll, SPEC §8a)")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate, decayed linearly to 0")
    add("--weight-decay", type=float, default=1e-6, help="AdamW weight decay")
    add("--batch-size", type=int, default=2, help="pairs per step (equal to batch 1 in expectation: tested)")
    add("--gen-batch-size", type=int, default=24, help="answers sampled per generate call")
    add("--lambda-reg", type=float, default=0.0, help="weight of max(0, 1 − Σ_t λ_t) (paper: 0.1; off scored higher)")
    add("--example-tokens", type=int, default=24, help="greedy tokens in the printed example")
    add("--judge-url", help="OpenAI-compatible endpoint: writes the steering prompt and filters y' (concept, fluency)")
    add("--judge-model", default="gpt-4o-mini", help="the model behind --judge-url")
    add("--seed", type=int, default=0, help="seeds the instruction split, the samples and the training order")
    add("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    with fileio.one_line_errors(args.debug, also=(RuntimeError,)):
        return run(args)


if __name__ == "__main__":
    main()
