"""An OpenAI-compatible steering server and a workshop web page (SPEC §4: Δ and strength per request; §7: sampling).

`POST /v1/chat/completions` speaks the OpenAI chat-completions schema (messages, max_tokens,
temperature, top_p, seed, stream) with one extra object, so every existing client works unchanged:

    "steering": {"concept": "references to cats", "strength": 1.0}   # concept: with --hypernet only
    "steering": {"strength": 4.0}                                    # a --vector or --psr file
    (absent)                                                         # the unsteered model

The last user message is the prompt, in the Gemma chat template. Δ is computed once per request
(hypernet.deltas) and kept fixed while decoding. Requests that arrive together (a short gathering
window) share one KV-cache decode loop, one Δ and one strength per row; a row leaves the batch as
soon as it ends, so its client does not wait for the longest row. Each row samples with its own
torch.Generator seeded by the request's seed: a row gives the tokens it gives alone, which are
model.generate's (test_all.py). `GET /` is a self-contained page (no external assets: workshops
are often offline): unsteered and steered answers side by side as they stream.

This file is the engine (the batched, steered decode loop), the loading and the command line;
lib/serve_api.py is the HTTP side: the request schema, the replies and streams, the page.

    python serve.py --vector /tmp/v.safetensors          # python steer.py export ... --out /tmp/v
    python serve.py --hypernet runs/demo/hypernet.safetensors --port 8000
    python serve.py --vector /tmp/v.safetensors --threads 1 --bench 1,4,16   # load figures (docs/serving.md)
    python -m pytest -q test_all.py -k serve              # its tests: tiny models, real HTTP, seconds
"""
import argparse
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import torch

import data
import hypernet as H
import model as M
from lib import fileio, loader, vectors
from lib.serve_api import APIError, make_server


# ----------------------------------------------------------------------------- the engine: batched, steered decoding

class Engine:
    """The loaded model and steering source, a bounded queue, and one worker thread that batches."""

    def __init__(self, base, tok, name, hyper=None, vector=None, layer=None, psr=None, max_batch=16, max_queue=64,
                 gather_ms=30, max_tokens=512, max_prompt_tokens=2048):
        self.base, self.tok, self.name, self.hyper, self.vector, self.psr = base, tok, name, hyper, vector, psr
        self.kind = "hypernet" if hyper is not None else "vector" if vector is not None else \
            "psr" if psr is not None else None
        self.layer = hyper.hcfg.layer if hyper is not None else layer
        self.max_batch, self.gather, self.max_tokens, self.max_prompt_tokens = max_batch, gather_ms / 1000, \
            max_tokens, max_prompt_tokens
        self.queue = queue.Queue(max_queue)
        self.batch_sizes = []                            # every batch's size, for tests and --bench
        self.lambdas = {}                                # PSR: layer -> λ (B,) at the last position of the last run

    def start(self):
        threading.Thread(target=self.loop, daemon=True, name="engine").start()
        return self

    def submit(self, job):
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(503, "the server is busy (request queue full); retry shortly", code="queue_full",
                           kind="server_error") from None

    def loop(self):
        while True:
            jobs = [self.queue.get()]
            until = time.monotonic() + self.gather        # gather what arrives in the window
            while len(jobs) < self.max_batch and (left := until - time.monotonic()) > 0:
                try:
                    jobs.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            self.batch_sizes.append(len(jobs))
            try:
                self.run_batch(jobs)
            except Exception as e:                        # a failed batch fails its rows; the server goes on
                print(f"serve: batch of {len(jobs)} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                for j in jobs:
                    j.events.put(("error", f"generation failed ({type(e).__name__})"))

    def check(self, job):
        """What the request schema (serve_api.parse_request) cannot know: the sampling settings pass
        model.check_sampling (no temperature that turns a row's probabilities into NaN), and a concept
        fits the hypernetwork's context. Raises APIError 400 naming the field."""
        try:
            M.check_sampling(job.temperature, 0, job.top_p)
        except ValueError as e:
            raise APIError(400, str(e), e.field) from None
        if job.concept is not None:
            n = len(H.hyper_input(self.tok, job.concept, job.prompt, self.hyper.hcfg.variant))
            most = min(self.max_prompt_tokens, self.base.cfg.max_position_embeddings)
            if n > most:
                raise APIError(400, f"'steering.concept' is {n} tokens for the hypernetwork; it takes at most {most}",
                               "steering.concept", "context_length_exceeded")

    def delta(self, job):
        """Δ (d,) of one row at strength 1, once per request (SPEC §4); zeros for an unsteered row."""
        if self.hyper is not None and job.strength != 0:
            d = H.deltas(self.base, self.tok, self.hyper, job.concept, [job.prompt], [job.ids])[0]
            if not torch.isfinite(d).all():
                raise ValueError("the hypernetwork gave a non-finite steering vector for this concept")
            return d
        if self.vector is not None:
            return self.vector
        return torch.zeros(self.base.cfg.hidden_size)

    @staticmethod
    def fail(job, e):
        """One row fails alone: its client gets the reason, the rest of its batch goes on."""
        print(f"serve: a request failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        job.events.put(("error", f"generation failed: {e}" if isinstance(e, ValueError) else
                                 f"generation failed ({type(e).__name__})"))

    def recording(self, layer, fn):
        """A PSR edit that also keeps λ at the last position of each row, for the page's shading. λ comes
        from the PSR object's `lambdas(layer, h) -> (B, T)` when it has one, else |edit(h)| (= λ |z|)."""
        def edit(h):
            out = fn(h)
            lam = self.psr.lambdas(layer, h) if hasattr(self.psr, "lambdas") else out.float().norm(dim=-1)
            self.lambdas[layer] = lam[:, -1].float()
            return out
        return edit

    def steering(self, rows, deltas):
        if not any(j.strength for j in rows):
            return None                                   # nothing steered: the plain model
        strength = torch.tensor([float(j.strength) for j in rows])
        if self.psr is not None:
            return M.Steering({l: self.recording(l, fn) for l, fn in self.psr.edits().items()}, strength)
        return M.Steering({self.layer: deltas}, strength)    # (B, d): one Δ per row, Eq. 1 in model.intervene

    @torch.inference_mode()
    def run_batch(self, rows):
        base, dev = self.base, self.base.model.embed_tokens.weight.device
        ok, deltas = [], []
        for j in rows:                                     # a row whose Δ fails leaves before the batch starts
            try:
                deltas.append(self.delta(j).float())
                ok.append(j)
            except Exception as e:
                self.fail(j, e)
        if not ok:
            return
        rows = ok
        deltas = torch.stack(deltas).to(dev)                                           # (B, d)
        gens = [torch.Generator(device=dev).manual_seed(j.seed) for j in rows]
        ids, real = M.left_pad([j.ids for j in rows], base.cfg.pad_token_id, dev)       # (B, T), left padded
        after = [M.steer_after([j.ids], j.n_prefix)[0] for j in rows]                    # SPEC §4 positions
        mask = M.left_pad(after, False, dev, torch.bool)[0]
        cache = M.KVCache(base.cfg, len(rows), ids.shape[1] + max(j.max_tokens for j in rows), dev,
                          base.model.embed_tokens.weight.dtype)
        self.lambdas = {}
        h = base.run(base.embed(ids), real, steering=self.steering(rows, deltas), steer_mask=mask, cache=cache)
        while True:
            logits = M.decode_logits(base, h[:, -1])                                    # (B, vocab)
            lam = torch.stack(list(self.lambdas.values())).mean(0).tolist() if self.lambdas else None
            finite = torch.isfinite(logits).all(-1).tolist()                           # (B,) one sync a step
            keep = []
            for b, j in enumerate(rows):                   # each row samples with its own generator
                try:                                       # a row that fails here fails alone
                    if not finite[b]:
                        raise ValueError("the model's output became non-finite (NaN or inf); a smaller steering "
                                         "strength may help")
                    t = M.sample(logits[b:b + 1], j.temperature, 0, j.top_p, [gens[b]]).item()
                except Exception as e:
                    self.fail(j, e)
                    continue
                if j.cancelled or t in self.tok.stop_ids:
                    j.events.put(("done", "stop"))
                    continue
                j.tokens.append(t)
                j.events.put(("token", t, lam[b] if lam is not None and j.steered else None))
                if len(j.tokens) == j.max_tokens:
                    j.events.put(("done", "length"))
                else:
                    keep.append(b)
            if not keep:
                return
            if len(keep) < len(rows):                      # finished rows leave the batch
                idx = torch.tensor(keep, device=dev)
                cache.keep(idx)
                rows, gens, deltas = [rows[b] for b in keep], [gens[b] for b in keep], deltas[idx]
            nxt = torch.tensor([[j.tokens[-1]] for j in rows], device=dev)              # (B, 1)
            ones = torch.ones_like(nxt, dtype=torch.bool)
            self.lambdas = {}
            h = base.run(base.embed(nxt), ones, steering=self.steering(rows, deltas), steer_mask=ones, cache=cache)

    def texts(self, job):
        """Yield (text delta, λ list) as tokens arrive, then ("", finish_reason); text is decoded from all
        tokens so far, and held back while it ends in a partial UTF-8 character."""
        tokens, sent, lams = [], "", []
        while True:
            event = job.events.get()
            if event[0] == "error":
                raise APIError(500, event[1], kind="server_error")
            if event[0] == "done":
                text = self.tok.decode(tokens)
                yield (text[len(sent):] if text.startswith(sent) else ""), lams, event[1]
                return
            tokens.append(event[1])
            if event[2] is not None:
                lams.append(event[2])
            text = self.tok.decode(tokens)
            if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                yield text[len(sent):], lams, None
                sent, lams = text, []


# ----------------------------------------------------------------------------- loading, load figures, CLI

def load_engine(args):
    """The base model and one steering source from the flags (--model default: the hypernetwork's
    training model, else the offline gemma-3-270m). Returns (engine, the fixed concept of a file or None)."""
    model = args.model
    if model is None and args.hypernet:
        model = json.loads(loader.read_header(args.hypernet)[1].get("train_config", "{}")).get("model")
    model = model or loader.DEMO_MODEL
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    base, tok = M.load(model, args.device, getattr(torch, dtype))
    kw, concept = {}, None
    if args.hypernet:
        kw["hyper"] = H.load_hypernet(args.hypernet, base).eval()
    elif args.vector:
        v, layer, meta = vectors.load_vector(args.vector, base.cfg.hidden_size, base.cfg.num_hidden_layers)
        kw.update(vector=v.to(base.model.embed_tokens.weight.device), layer=base.layer_index(layer))
        concept = meta.get("concept")
    elif args.psr:
        import psr                                    # only when asked for: the server runs without psr.py
        kw["psr"] = psr.load(args.psr, base)
        concept = getattr(kw["psr"], "concept", None)
    engine = Engine(base, tok, Path(str(model)).name, max_batch=args.max_batch, max_queue=args.max_queue,
                    gather_ms=args.gather_ms, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    **kw)
    n = sum(p.numel() for p in base.parameters())
    where = f", layer {engine.layer}" if engine.layer is not None else ""
    print(f"{engine.name}: {n / 1e6:.1f}M parameters, {dtype} on {args.device}; steering: {engine.kind or 'none'}"
          f"{where}{f' ({concept!r})' if concept else ''}", flush=True)
    return engine, concept


def bench(url, engine, levels, key=None, max_tokens=32, rounds=4):
    """Closed-loop load: c clients each send `rounds` requests back to back (greedy, max_tokens each,
    steered at strength 1, prompts from demo/instructions.json); prints requests/s, generated tokens/s
    and p50/p95 latency per level. The clients are threads of this process."""
    import requests
    from concurrent.futures import ThreadPoolExecutor
    prompts = data.load_instructions("demo")
    concepts = ["references to cats", "mentions of the ocean", "cooking terms", "financial jargon"]

    def one(i):
        steering = {"strength": 1.0, **({"concept": concepts[i % 4]} if engine.kind == "hypernet" else {})}
        body = {"model": engine.name, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "max_tokens": max_tokens, "temperature": 0, **({"steering": steering} if engine.kind else {})}
        t = time.perf_counter()
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600,
                          headers={"Authorization": f"Bearer {key}"} if key else {})
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]
    one(0)                                                    # warm-up
    print("| clients | requests | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | mean batch |\n"
          "|---|---|---|---|---|---|---|")
    for c in levels:
        n, before = c * rounds, len(engine.batch_sizes)
        with ThreadPoolExecutor(c) as ex:
            t = time.perf_counter()
            done = list(ex.map(one, range(n)))
            wall = time.perf_counter() - t
        lat = sorted(d for d, _ in done)
        sizes = engine.batch_sizes[before:]
        print(f"| {c} | {n} | {n / wall:.2f} | {sum(k for _, k in done) / wall:.1f} | {lat[(n - 1) // 2]:.2f} | "
              f"{lat[math.ceil(0.95 * n) - 1]:.2f} | {sum(sizes) / len(sizes):.1f} |", flush=True)


def count(lo):
    """argparse type: an integer >= lo."""
    def parse(text):
        v = int(text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text}")
        return v
    parse.__name__ = "integer"                          # argparse names the type in its 'invalid ... value' error
    return parse


def port(text):
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0 = any free port), got {text}")
    return v


def milliseconds(text):
    v = float(text)
    if not 0 <= v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def levels(text):
    v = [int(c) for c in text.split(",")]
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"must be client counts >= 1, e.g. 1,4,16, got {text}")
    return v


def build(argv=None):
    """Parse the flags, listen, load once, and return (server, args); the server's engine is not started yet.
    Every bad flag, a busy port or a bad host ends with one line and exit status 2 (before the model loads);
    a bad model or steering file with one line and status 1."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.error = lambda message: ap.exit(2, f"serve.py: error: {message}\n")   # one line (argparse adds the usage)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--hypernet", help="a trained hypernetwork checkpoint: requests steer with steering.concept")
    src.add_argument("--vector", help="a .safetensors/.gguf steering vector (python steer.py export)")
    src.add_argument("--psr", help="a PSR file from psr.py (SPEC §8a)")
    ap.add_argument("--model", help="base model folder or hub id (default: the hypernetwork's, else the offline "
                                    "gemma-3-270m)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    ap.add_argument("--port", type=port, default=8000, help="port to listen on (0 = any free port)")
    ap.add_argument("--api-key-env", help="name of an environment variable holding the key clients must send "
                                          "as 'Authorization: Bearer <key>'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights dtype (default: bf16 on cuda, else fp32)")
    ap.add_argument("--max-batch", type=count(1), default=16, help="most requests decoded together")
    ap.add_argument("--max-queue", type=count(1), default=64,
                    help="most requests waiting for a batch (at least 1); more get HTTP 503 at once")
    ap.add_argument("--gather-ms", type=milliseconds, default=30, help="how long a batch waits for more requests to join")
    ap.add_argument("--max-tokens", type=count(1), default=512, help="largest max_tokens a request may ask for")
    ap.add_argument("--max-prompt-tokens", type=count(1), default=2048,
                    help="longest prompt (chat template included) and longest steering concept, in tokens")
    ap.add_argument("--threads", type=count(1), help="torch CPU threads (default: torch's; 1 on a machine shared with "
                                                       "other busy processes, where more threads spin and wait)")
    ap.add_argument("--bench", type=levels, help="instead of serving: comma-separated client counts, e.g. 1,4,16 "
                                                  "(load figures)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            ap.error(f"--api-key-env: environment variable {args.api_key_env} is unset or empty")
    try:                                                # listen first: a busy port fails in a second, not after loading
        server = make_server(None, args.host, 0 if args.bench else args.port, key)
    except OSError as e:
        ap.error(f"--host/--port: {e}")
    try:
        with fileio.one_line_errors():
            server.engine, server.concept = load_engine(args)
    except BaseException:
        server.server_close()
        raise
    return server, args


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C stops it, even if started with SIGINT ignored
    server, args = build(argv)
    engine = server.engine.start()
    url = f"http://{args.host}:{server.server_address[1]}"
    if args.bench:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return bench(url, engine, args.bench, server.api_key)
    print(f"serving on {url}/ (the page) and {url}/v1 (OpenAI base_url)"
          f"{'; a key is required' if server.api_key else ''}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
        print("stopped", flush=True)
        os._exit(0)   # now: the daemon engine thread may sit in a torch call, which can stall interpreter shutdown


if __name__ == "__main__":
    main()
