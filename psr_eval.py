"""How close PSR comes to the prompt (SPEC §8a "analyses to reproduce"), measured on held-back instructions
never trained on, for unsteered, prompted (x'), a constant vector (the mean Δ_PS at the steering layer)
and the trained PSR: the cross-entropy of the prompted answers y' given the plain x and the share of the
prompt's effect recovered; the relative RMSE per layer against the prompted residuals (paper Fig. 3);
the per-token ‖Δ_PS‖ beside the learned λ (Fig. 2); one greedy example; summary.json and the table.

    python psr.py --concept "the moon" --variant all --out runs/psr-moon-all   # ends with these (README)
    python -m pytest -q test_all.py -k psr_cli
"""
import json

import torch

import baselines
import fileio
import model as M
from psr_data import answer_nll, collate, prepare, states


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p = example["pair"]
    labels = [repr(tok.decode([t]))[1:-1][:10] for t in p.plain[-p.n_answer:]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 3.8))
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
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
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
    plt.close("all")
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
