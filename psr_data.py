"""PSR's data (SPEC §8a): the model's own answers y' ~ B(x') to the prompted instructions, sampled once and
cached; each sample's two views, x ⊕ y' and x' ⊕ y'; and their residuals on the answer tokens, the
prompted one being what PSR learns to imitate (Δ_PS = prompted − plain). psr.py trains on them and
psr_eval.py measures with them.

    python psr.py --concept "the moon" --n-train 2 --n-eval 1 --max-new-tokens 6 --epochs 1 --out /tmp/psr
    python -m pytest -q test_all.py -k psr
"""
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import baselines
import chat_api
import data
import fileio
import model as M


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
    try:
        return [json.loads(line) for line in fileio.complete_lines(path)]
    except json.JSONDecodeError:
        raise ValueError(f"{path}: not a samples file; remove it or pass another --samples") from None


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
