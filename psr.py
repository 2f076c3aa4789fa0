"""PSR: activation steering that mimics prompting (arXiv 2605.03907, SPEC §8a).

A prompt is itself an activation intervention. With x' = steering prompt + instruction x, sample the
model's own answer y' ~ B(x'); on the answer tokens, Δ_PS = A_l(x' ⊕ y') − A_l(x ⊕ y') is what the
prompt did to layer l. Its size varies by orders of magnitude from token to token, so PSR learns a
per-token function of the activation itself instead of one constant vector:

    λ_l(h_t) = ReLU(w_l · h_t + b_l)        h_t <- h_t + strength * λ_l(h_t) * z_l      (2d + 1 per layer)

S-PSR ("single") edits the steering layer and imitates it and every later layer; A-PSR ("all") edits
and imitates every layer, chained: layer l's probe reads the activation with the earlier edits added,
because model.Gemma.run applies a Steering's edits in layer order. PSR goes through the project's one
intervention mechanism (model.Steering / model.intervene), like every other method. Here, in order: the
edit, its losses and training, and the command; then its data (y' sampled and cached, the two views, their
residuals on the answer tokens) and its evaluation (CE and effect recovered, paper Fig. 2 and 3).

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
import zlib
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import data
import model as M
from hypernet import check_base
from lib import chat_api, fileio, loader, vectors
from train import linear_decay

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
    shapes, meta = loader.read_header(path)
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
    loader.check_state_dict(path, want, shapes,
                            f"a {psr.variant} PSR at layers {layers}, d={d}")
    tensors, _ = loader.read_safetensors(path)
    vectors.check_steering_file(path, tensors, want, layers, base.cfg.num_hidden_layers, f"a {psr.variant} PSR")
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_decay(s, steps))
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
    base, tok = M.load(args.model, args.device)
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
    ce, recovered, rel, figures = evaluate(base, tok, psr, train_ex, eval_pairs, L, start, args, out)
    seconds["analyses"] = time.time() - clock
    x = eval_ins[0]                                                    # one greedy example, unseen in training
    example = greedy_example(base, tok, psr, steer_text, x, args)
    summary = dict(concept=args.concept, variant=args.variant, loss=loss, layer=L, layers=layers,
                   strength=args.strength, steering_prompt=steer_text, n_train=len(train_pairs),
                   n_eval=len(eval_pairs), epochs=epochs, loss_history=history, ce=ce,
                   prompt_effect_recovered=recovered["steered"], prompt_effect_recovered_constant=recovered["constant"],
                   rel_rmse={m: {str(l): v for l, v in enumerate(r)} for m, r in rel.items()},
                   seconds={k: round(v, 1) for k, v in seconds.items()}, figures=figures,
                   example=dict(instruction=x, **example),
                   settings={k: v for k, v in vars(args).items() if k != "debug"})
    report(out, summary, rel, seconds)
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


# ============================================================================= from psr_data.py (merged)
# ----------------------------------------------------------------------------- y' ~ B(x') and the two views

@dataclass
class Pair:
    plain: list                 # x ⊕ y' token ids
    prompted: list              # x' ⊕ y'
    n_answer: int               # answer positions: the last prompt token and y' (the last n_answer of both)
    n_prefix: int               # chat prefix of the plain view, never steered (SPEC §4)


def views(tok, x, xp, y, n_prefix=None):
    """The two views of one sample. x, xp: the prompts as text (chat template included); y: y' as the
    sampled ids, or as text (then each view is tokenised whole and y' must come out the same in both)."""
    x_ids, xp_ids = tok.encode(x), tok.encode(xp)
    if isinstance(y, str):
        full, fullp = tok.encode(x + y), tok.encode(xp + y)
        if full[:len(x_ids)] != x_ids or fullp[:len(xp_ids)] != xp_ids or full[len(x_ids):] != fullp[len(xp_ids):]:
            raise ValueError(f"y' {y[:40]!r} tokenises differently after the plain and the prompted prompt; "
                             "Δ_PS needs the same answer tokens in both views")
        y = full[len(x_ids):]
    if x_ids[-1] != xp_ids[-1]:
        raise ValueError(f"the two prompts end in different tokens ({x_ids[-1]} and {xp_ids[-1]}): "
                         "the answer positions (from the last prompt token) cannot be aligned")
    return Pair(x_ids + list(y), xp_ids + list(y), len(y) + 1, tok.chat_prefix_len if n_prefix is None else n_prefix)


def read_samples(path):
    """Rows of a samples.jsonl; a partly written last line (a killed run) is cut off and sampled again."""
    return [row for _, row in fileio.read_jsonl(path, "samples file (remove it or pass another --samples)",
                                                append_only=True)]


def sample_answers(base, tok, steer_text, instructions, path, args):
    """y' ~ B(x') for every instruction (args.samples_per_instruction each), appended to `path` and
    reused on a rerun with the same settings. Each row's seed depends only on the row."""
    settings = dict(steering_prompt=steer_text, temperature=args.temperature, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, model=str(args.model))
    key = lambda r: (r["instruction"], r["sample"])
    have = {key(r): r for r in read_samples(path) if r.get("settings") == settings}
    jobs = [dict(instruction=x, sample=s, settings=settings, seed=zlib.crc32(f"{args.seed}:{s}:{x}".encode()))
            for x in instructions for s in range(args.samples_per_instruction)]
    todo = [j for j in jobs if key(j) not in have]
    with open(path, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), args.gen_batch_size):
            batch = todo[i:i + args.gen_batch_size]
            prompts = tok.chat_batch(baselines.prompted(steer_text, j["instruction"]) for j in batch)
            outs = M.generate(base, prompts, args.max_new_tokens, stop_ids=tok.stop_ids, temperature=args.temperature,
                              top_k=args.top_k, seeds=[j["seed"] for j in batch])
            for j, y in zip(batch, outs):
                have[key(j)] = dict(j, y_ids=y, y_text=tok.decode(y))
                f.write(json.dumps(have[key(j)], ensure_ascii=False) + "\n")
            f.flush()
    return [have[key(j)] for j in jobs], len(todo)


def judged_ok(row, concept, cfg):
    """SPEC §8a: keep y' whose judged fluency (coherence) and concept presence are at least 0.5 of 2."""
    import judge
    r = dict(concept=concept, instruction=row["instruction"], text=row["y_text"])
    return all(judge.parse_rating(chat_api.chat(judge.judge_messages(r, c), cfg)) >= 1 for c in ("concept", "fluency"))


def sample_pairs(base, tok, args, out):
    """The command's data: the steering prompt (SPEC §8; written by the judge with --judge-url), a fixed
    split of the instructions, y' ~ B(x') for each (sample_answers), judged with --judge-url, and each
    sample's two views. Returns the steering prompt, the eval instructions, the train and eval pairs,
    and how many answers were sampled and reused."""
    judge_cfg = None
    if args.judge_url:
        judge_cfg = chat_api.JudgeConfig(base_url=args.judge_url, model=args.judge_model,
                                         cache_dir=str(out / ".judge_cache"))
    steer_text = baselines.steering_prompt(args.concept, judge_cfg)
    instructions = data.read_instructions(args.instructions)
    if args.n_train + args.n_eval > len(instructions):
        raise ValueError(f"--n-train {args.n_train} + --n-eval {args.n_eval} > the {len(instructions)} instructions")
    order = random.Random(args.seed).sample(instructions, len(instructions))
    eval_ins, train_ins = order[:args.n_eval], order[args.n_eval:args.n_eval + args.n_train]

    samples = Path(args.samples or out / "samples.jsonl")
    rows, made = sample_answers(base, tok, steer_text, eval_ins + train_ins, samples, args)
    if judge_cfg is not None:
        rows = [r for r in rows if judged_ok(r, args.concept, judge_cfg)]
    chat = lambda text: tok.CHAT.format(prompt=text.strip())
    pairs = {x: [] for x in eval_ins + train_ins}
    for r in rows:
        if r["y_ids"]:                                                 # an empty answer has nothing to imitate
            x = r["instruction"]
            pairs[x].append(views(tok, chat(x), chat(baselines.prompted(steer_text, x)), r["y_ids"]))
    train_pairs, eval_pairs = [p for x in train_ins for p in pairs[x]], [p for x in eval_ins for p in pairs[x]]
    if not train_pairs or not eval_pairs:
        raise ValueError(f"no usable samples left for training ({len(train_pairs)}) or evaluation ({len(eval_pairs)})")
    return steer_text, eval_ins, train_pairs, eval_pairs, made, len(rows) - made


# ----------------------------------------------------------------------------- activations

def collate(pairs, view, pad_id, dev):
    """Left-padded ids and real (B, T), the steered positions (B, T; after the chat prefix, SPEC §4) and
    the answer mask (B, A): both views end in the answer, so it is the last A columns, right-aligned."""
    seqs = [getattr(p, view) for p in pairs]
    ids, real = M.left_pad(seqs, pad_id, dev)
    T, A = ids.shape[1], max(p.n_answer for p in pairs)
    starts = torch.tensor([T - len(s) + p.n_prefix for s, p in zip(seqs, pairs)], device=dev)
    steer = torch.arange(T, device=dev)[None] >= starts[:, None]
    answer = torch.arange(A, device=dev)[None] >= A - torch.tensor([p.n_answer for p in pairs], device=dev)[:, None]
    return ids, real, steer, answer


def states(base, h, real, start=0, steering=None, steer_mask=None, last=1):
    """Run blocks start.. one at a time through Gemma.run (which applies `steering`'s edits after the blocks
    it names); returns the residual after every block at the last `last` positions, (L, B, last, d), and
    the final residual (B, T, d)."""
    out = []
    for i in range(start, base.cfg.num_hidden_layers):
        h = base.run(h, real, start=i, stop=i + 1, steering=steering, steer_mask=steer_mask)
        out.append(h[:, -last:])
    return torch.stack(out), h


@torch.no_grad()
def prepare(base, pairs, start, batch_size=8):
    """Per pair: the prompted (target) and unsteered plain residuals after blocks start.. on its answer
    positions, (L, a, d), and the plain view's input to block `start` (T, d) (S-PSR starts there)."""
    dev, out = base.model.embed_tokens.weight.device, []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        ids, real, _, answer = collate(chunk, "prompted", base.cfg.pad_token_id, dev)
        target = states(base, base.embed(ids), real, 0, last=answer.shape[1])[0][start:]
        ids, real, _, _ = collate(chunk, "plain", base.cfg.pad_token_id, dev)
        h_in = base.run(base.embed(ids), real, stop=start)
        plain = states(base, h_in, real, start, last=answer.shape[1])[0]
        for b, p in enumerate(chunk):
            a, n = p.n_answer, len(p.plain)
            out.append(dict(pair=p, target=target[:, b, -a:], plain=plain[:, b, -a:], h_in=h_in[b, -n:]))
    return out


def answer_nll(base, h, ids, answer):
    """Token-mean cross-entropy of each row's y' (B,) from the final residual h (B, T, d): the answer
    columns but the last predict y' (the first answer column is the last prompt token)."""
    A = answer.shape[1]
    tmask = answer[:, :-1] & answer[:, 1:]                             # (B, A - 1) positions predicting y'
    ce = F.cross_entropy(base.head(h[:, -A:-1][tmask]).float(), ids[:, -A + 1:][tmask], reduction="none")  # (N,)
    rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(tmask)[tmask]
    return torch.zeros(len(ids), device=ids.device).index_add(0, rows, ce) / tmask.sum(-1).clamp(min=1)


# ============================================================================= from psr_eval.py (merged)
@torch.no_grad()
def answer_ce(base, pairs, view="plain", steering=None, batch_size=8):
    """Mean over pairs of the token-mean cross-entropy of y' given x (view "plain") or x' ("prompted")."""
    dev, total = base.model.embed_tokens.weight.device, 0.0
    for i in range(0, len(pairs), batch_size):
        ids, real, steer, answer = collate(pairs[i:i + batch_size], view, base.cfg.pad_token_id, dev)
        h = base.run(base.embed(ids), real, steering=steering, steer_mask=steer)
        total += answer_nll(base, h, ids, answer).sum().item()
    return total / len(pairs)


@torch.no_grad()
def rel_rmse(base, examples, steering, batch_size=8):
    """Per layer: RMSE(steered − prompted) / RMSE(unsteered − prompted) of the residuals on the answer
    positions, pooled over `examples` (prepared from block 0). 1 = no closer to the prompted activations
    than not steering at all; 0 = the prompt's accumulated effect Δ_PS_acc reproduced exactly."""
    dev, num, den = base.model.embed_tokens.weight.device, 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids, real, steer, answer = collate([e["pair"] for e in chunk], "plain", base.cfg.pad_token_id, dev)
        acts = states(base, base.embed(ids), real, 0, steering, steer, last=answer.shape[1])[0]   # (L, B, A, d)
        for b, e in enumerate(chunk):
            a = e["pair"].n_answer
            num = num + ((acts[:, b, -a:] - e["target"]) ** 2).sum((1, 2))
            den = den + ((e["plain"] - e["target"]) ** 2).sum((1, 2))
    return (num / den).sqrt().tolist()


def plot(out, tok, example, lambdas, layers, rel, steer_layer):
    """OUT/psr_norms.png (Fig. 2: per-token ‖Δ_PS‖ over one answer at a few layers, log scale, and the
    learned λ beside it) and OUT/psr_rmse.png (Fig. 3: relative RMSE per layer of each method)."""
    from matplotlib.figure import Figure                               # not pyplot: the caller's backend stays
    p = example["pair"]
    labels = [repr(tok.decode([t]))[1:-1][:10] for t in p.plain[-p.n_answer:]]
    fig = Figure(figsize=(13, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    for l in layers:
        ax1.plot((example["target"][l] - example["plain"][l]).norm(dim=-1).cpu(), marker=".", label=f"layer {l}")
    for l, lam in lambdas.items():
        ax2.plot(lam.cpu(), marker=".", label=f"layer {l}")
    ax1.set(yscale="log", title="‖Δ_PS‖ per answer token (prompted − plain)", ylabel="norm")
    ax2.set(title="learned λ per answer token (0 = not steered)", ylabel="λ = ReLU(w·h + b)")
    ax2.set_yscale("symlog", linthresh=1e-2)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "psr_norms.png", dpi=80)
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    for name, values in rel.items():
        ax.plot(range(len(values)), values, marker=".", label=name)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axvline(steer_layer, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="layer (output of block L)", ylabel="RMSE(method − prompted) / RMSE(unsteered − prompted)",
           title="how close each method comes to the prompted activations")
    ax.yaxis.label.set_size(7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "psr_rmse.png", dpi=80)
    return [str(out / "psr_norms.png"), str(out / "psr_rmse.png")]


def evaluate(base, tok, psr, train_ex, eval_pairs, layer, start, args, out):
    """CE of the held-back answers per method, the prompt effect recovered, the relative RMSE per layer, and
    the figures (λ over the first eval answer). The constant vector is the mean Δ_PS of the training answers
    at the steering layer, added there. Returns ce, recovered, rel, figures."""
    n, L = base.cfg.num_hidden_layers, layer
    eval_ex = prepare(base, eval_pairs, 0, args.batch_size)
    mean_delta = torch.cat([(e["target"] - e["plain"])[L - start] for e in train_ex]).mean(0)   # (d,)
    methods = {"constant": M.Steering.vector(L, mean_delta, 1.0), args.variant: M.Steering(psr.edits(), args.strength)}
    ce = {"unsteered": answer_ce(base, eval_pairs), "prompted": answer_ce(base, eval_pairs, "prompted"),
          "steered": answer_ce(base, eval_pairs, steering=methods[args.variant]),
          "constant": answer_ce(base, eval_pairs, steering=methods["constant"])}
    recovered = {m: (ce["unsteered"] - ce[k]) / (ce["unsteered"] - ce["prompted"])
                 for m, k in (("steered", "steered"), ("constant", "constant"))}
    rel = {m: rel_rmse(base, eval_ex, s, args.batch_size) for m, s in methods.items()}
    with torch.no_grad():                                              # λ over the first eval answer
        e = eval_ex[0]
        dev = base.model.embed_tokens.weight.device
        ids, real, steer, _ = collate([e["pair"]], "plain", base.cfg.pad_token_id, dev)
        base(ids, real, steering=methods[args.variant], steer_mask=steer)
        shown = sorted({max(1, n // 6), L, (L + n) // 2, n - 1} & set(range(n)))
        lambdas = {l: psr.last_lambda[l][0, -e["pair"].n_answer:] for l in psr.layers if l in shown}
    figures = []
    try:
        figures = plot(out, tok, e, lambdas, shown, rel, L)
    except ImportError:
        print("matplotlib is not installed: no figures")
    return ce, recovered, rel, figures


@torch.no_grad()
def token_lambdas(base, psr, ids, n_prefix, strength=1.0):
    """λ_l(h_t) at every edited layer and every token of one sequence `ids` (a list), steered by the PSR at
    `strength` after the first n_prefix tokens (SPEC §4): (layers in psr.layers order, T), each layer's λ
    read from the activation that arrives there (earlier edits applied). The notebook's heatmap."""
    dev = base.model.embed_tokens.weight.device
    steer_mask = torch.tensor(M.steer_after([ids], n_prefix), device=dev)
    base.run(base.embed(torch.tensor([ids], device=dev)), steering=M.Steering(psr.edits(), strength),
             steer_mask=steer_mask)                                    # the residual stream only: no logits needed
    return torch.stack([psr.last_lambda[l][0] for l in psr.layers]).float().cpu()


def greedy_example(base, tok, psr, steer_text, x, args):
    """Greedy answers to instruction x: unsteered, prompted (x'), and steered by the PSR at --strength."""
    prompts = [tok.chat(x)[0], tok.chat(baselines.prompted(steer_text, x))[0], tok.chat(x)[0]]
    outs = M.generate(base, prompts, args.example_tokens, stop_ids=tok.stop_ids,
                      steering=M.Steering(psr.edits(), torch.tensor([0.0, 0.0, args.strength])),
                      steer_masks=M.steer_after(prompts, tok.chat_prefix_len))
    return dict(zip(("unsteered", "prompted", f"PSR {args.variant}"), (tok.decode(o) for o in outs)))


def report(out, summary, rel, seconds):
    """OUT/summary.json, and the printed table: per method CE(y' | x) of the held-back answers, the effect
    recovered, and the relative RMSE at the steering layer and the last; the time of each stage; the example."""
    fileio.write_text(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
    ce, L, variant, example = summary["ce"], summary["layer"], summary["variant"], dict(summary["example"])
    print(f"\nheld-back answers of {summary['n_eval']} unseen instructions | CE(y' | x) | effect recovered | "
          f"rel. RMSE at layers {L}, {len(rel[variant]) - 1}")                  # rel: one value per layer
    for name, key in (("unsteered", "unsteered"), ("prompted (x')", "prompted"), ("constant vector", "constant"),
                      (f"PSR {variant}", "steered")):
        r = rel.get({"steered": variant}.get(key, key))
        rr = f"{r[L]:.3f}, {r[-1]:.3f}" if r else {"unsteered": "1, 1", "prompted": "0, 0"}[key]
        print(f"{name:<18} {ce[key]:>10.3f} {(ce['unsteered'] - ce[key]) / (ce['unsteered'] - ce['prompted']):>12.2f}"
              f"   {rr}")
    print(f"\nsampling {seconds['sampling']:.0f}s, training {seconds['training']:.0f}s, "
          f"analyses {seconds['analyses']:.0f}s; wrote {out / 'psr.safetensors'}, {out / 'summary.json'}"
          + "".join(f", {f}" for f in summary["figures"]))
    print(f"\ngreedy, unseen instruction: {example.pop('instruction')}")
    for k, v in example.items():
        print(f"  {k:<12}| {' '.join(v.split())}")


if __name__ == "__main__":
    main()
