"""What a train.py run reports, and the measurements behind it (paper §4's questions, at demo scale): the
facts at the start; the evaluation losses with the right-vs-wrong-concept gap, during training and in
the final report; a strength sweep of greedy answers; how often the answers mention their concept
(judge-free keywords, never used in training); the loss curve, loss.png. The final generations are
logged to metrics.jsonl, and the final report reads only that file.

    python train.py --preset demo       # the report in README "Expected output"
    python -m pytest -q test_all.py -k report
"""
import json
from dataclasses import replace
from pathlib import Path

import torch

import data
import dist
import hypernet as H
import model as M
from checkpoint import read_metrics

SWEEP = (0.0, 1.0, 2.0, 4.0)


def print_setup(run, bf16):
    """The facts at the start: parameters, dtype and device; the memory of the weights (the base in its
    dtype, the hypernetwork in fp32, SPEC §5) and of each trainable parameter's gradient and two AdamW
    moments (fp32); the data and the steps."""
    cfg, world = run.cfg, dist.world_size()
    n_train = sum(p.numel() for p in run.trainable)
    n_frozen = H.count_params(run.hyper) - n_train
    n_base = H.count_params(run.base)
    est = (n_base * (2 if bf16 else 4) + (n_train + n_frozen) * 4 + n_train * 12) / 2**30
    print(f"base {cfg.model}: {n_base / 1e6:.1f}M frozen parameters ({'bf16' if bf16 else 'fp32'}) on {cfg.device}")
    print(f"hypernet {cfg.variant}, N={cfg.n_blocks}, layer {cfg.layer}: {n_train / 1e6:.1f}M trainable, "
          f"{n_frozen / 1e6:.1f}M frozen; weights + AdamW ~{est:.1f} GiB before activations "
          f"(python bench.py memory for the peak)")
    concepts = lambda examples: len({e.concept_id for e in examples})
    print(f"data: {len(run.train_ex)} train examples ({concepts(run.train_ex)} concepts), {len(run.held_in)} held-in "
          f"eval, {len(run.held_out)} held-out eval ({concepts(run.held_out)} concepts); "
          f"{run.total} steps of {cfg.batch_size * cfg.grad_accum * world} examples"
          + (f" ({world} processes, {'FSDP2' if cfg.fsdp else 'DDP'})" if world > 1 else ""))


@torch.no_grad()
def evaluate(run, examples, loss_fn, unsteered=None):
    """Mean loss over the first eval_batches batches: steered; steered with Δ from another concept's
    steering prompt (if that is as good, Δ learned the task, not the concept); unsteered (strength 0).
    loss_fn is train.steered_loss. The frozen base's unsteered loss never changes: pass an earlier
    evaluation's value to skip it."""
    cfg, hyper = run.cfg, run.hyper
    hyper.eval()
    pairs = zip(examples, data.next_concept(examples, lambda e: e.concept_id))
    other = [replace(e, hyper_ids=o.hyper_ids) for e, o in pairs]          # each with another concept's prompt
    losses = {"steered": [], "other_concept": [], "unsteered": []}
    for i in range(0, min(len(examples), cfg.eval_batches * cfg.batch_size), cfg.batch_size):  # fixed order
        batch = data.collate(examples[i:i + cfg.batch_size]).to(cfg.device)
        swapped = data.collate(other[i:i + cfg.batch_size]).to(cfg.device)
        with run.amp():
            losses["steered"].append(loss_fn(run.base, hyper, batch).item())
            losses["other_concept"].append(loss_fn(run.base, hyper, swapped).item())
            if unsteered is None:
                losses["unsteered"].append(loss_fn(run.base, hyper, batch, strength=0.0).item())
    hyper.train()
    means = {k: sum(v) / max(len(v), 1) for k, v in losses.items()}
    return {**means, "unsteered": means["unsteered"] if unsteered is None else unsteered}


def evaluate_splits(run, loss_fn, unsteered):
    """evaluate() on held-in and on held-out, where they have examples: the fields of the step's metrics
    record and the progress line. `unsteered` keeps each split's unsteered loss from its first evaluation."""
    fields, parts = {}, []
    for name, ex in (("held_in", run.held_in), ("held_out", run.held_out)):
        if ex:
            res = evaluate(run, ex, loss_fn, unsteered.get(name))
            unsteered[name] = res["unsteered"]
            fields.update({f"{name}_{k}": v for k, v in res.items()})
            parts.append(f"{name.replace('_', '-')} {res['steered']:.3f} (other concept "
                         f"{res['other_concept']:.3f}, unsteered {res['unsteered']:.3f})")
    return fields, "; ".join(parts)


@torch.no_grad()
def greedy_answers(run, rows, concepts, strength, max_new_tokens=48, batch_size=16):
    """Greedy answers to rows' inputs, steered with Δ = H(concept, input) at `strength` (0 = unsteered)."""
    base, tok, hyper = run.base, run.tok, run.hyper
    ids = tok.chat_batch([r["input"] for r in rows])
    deltas = torch.stack([H.deltas(base, tok, hyper, c, [r["input"]], [i])[0] for r, c, i in zip(rows, concepts, ids)])
    out = []
    for j in range(0, len(rows), batch_size):
        steering = M.Steering.vector(hyper.hcfg.layer, deltas[j:j + batch_size], strength)
        gens = M.generate(base, ids[j:j + batch_size], max_new_tokens, stop_ids=tok.stop_ids, steering=steering,
                          steer_masks=M.steer_after(ids[j:j + batch_size], tok.chat_prefix_len))
        out += [tok.decode(g) for g in gens]
    return out


def final_measurements(run, step):
    """The report's generations, logged to metrics.jsonl: a strength sweep for two held-in concepts and,
    with --keywords, how often the held-in answers mention their concept (unsteered, steered with the
    right concept, steered with another concept's prompt), all greedy."""
    rows, final = run.rows["held_in"], {}
    if not rows:
        return
    run.hyper.eval()
    first = {}
    for r in rows:
        first.setdefault(r["concept_id"], r)
    firsts = list(first.values())[:2]                                            # a row of each of 2 concepts
    final["sweep"] = [{"concept": r["output_concept"], "prompt": r["input"],
                       "answers": {str(s): greedy_answers(run, [r], [r["output_concept"]], s)[0] for s in SWEEP}}
                      for r in firsts]
    if run.cfg.keywords:
        keywords = data.load_keywords(run.cfg.keywords)
        right = [r["output_concept"] for r in rows]
        wrong = [r["output_concept"] for r in data.next_concept(rows, lambda r: r["concept_id"])]
        answers = {"unsteered": greedy_answers(run, rows, right, 0.0), "steered": greedy_answers(run, rows, right, 1.0),
                   "other_concept": greedy_answers(run, rows, wrong, 1.0)}
        final["mentions"] = {k: sum(data.mentions(a, keywords.get(c, [])) for a, c in zip(v, right)) / len(rows)
                             for k, v in answers.items()}
        final["mentions"]["prompts"] = len(rows)
    if dist.is_main():
        with open(Path(run.cfg.out) / "metrics.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "final": final}) + "\n")


def plot(out):
    """OUT/loss.png: the training loss per step and the evaluation losses (nothing without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    plt.figure(figsize=(6, 3.5))
    plt.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=0.8, label="train")
    for k in ("held_in_steered", "held_in_other_concept", "held_in_unsteered", "held_out_steered"):
        ev = [r for r in recs if k in r]
        plt.plot([r["step"] for r in ev], [r[k] for r in ev], "o-", label=k.replace("_", " "))
    plt.xlabel("step"), plt.ylabel("cross-entropy"), plt.legend(), plt.tight_layout()
    plt.savefig(out / "loss.png", dpi=120)
    plt.close()


def verdict(gap, loss):
    if gap >= 0.02:
        return f"concept-specific: the right concept's Δ fits its outputs better by {gap:.3f} nats ({gap / loss:.1%})"
    return f"not concept-specific: another concept's Δ does as well (gap {gap:+.3f} nats); Δ learned the task"


def print_report(run):
    """The final report, read from metrics.jsonl: evaluation losses with the right-vs-wrong-concept gap,
    the strength sweep, and the concept-mention rates."""
    recs = read_metrics(Path(run.cfg.out) / "metrics.jsonl")
    last = [r for r in recs if "held_in_steered" in r or "held_out_steered" in r][-1]
    print(f"\nevaluation loss after {last['step']} steps (token-mean cross-entropy on the reference outputs):")
    print(f"{'':10}{'steered':>9}{'other concept':>15}{'unsteered':>11}{'gap':>8}")
    for name in ("held_in", "held_out"):
        if f"{name}_steered" in last:
            s, o, u = (last[f"{name}_{k}"] for k in ("steered", "other_concept", "unsteered"))
            print(f"{name.replace('_', '-'):10}{s:9.3f}{o:15.3f}{u:11.3f}{o - s:+8.3f}   {verdict(o - s, s)}")
    final = next((r["final"] for r in reversed(recs) if "final" in r), {})
    for item in final.get("sweep", []):
        print(f"\n[held-in] concept: {item['concept']}\nprompt: {item['prompt']}")
        for s, text in item["answers"].items():
            print(f"  strength {float(s):g}: {text.strip()[:160]!r}")
    if "mentions" in final:
        m = final["mentions"]
        print(f"\nconcept mentioned (keywords) in greedy answers to {m['prompts']} held-in prompts: unsteered "
              f"{m['unsteered']:.0%}, steered {m['steered']:.0%}, steered with another concept's prompt "
              f"{m['other_concept']:.0%}")
    print(f"\ncheckpoint: {Path(run.cfg.out) / 'hypernet.safetensors'}; curve: {Path(run.cfg.out) / 'loss.png'}")
