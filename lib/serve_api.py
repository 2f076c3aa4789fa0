"""The OpenAI chat-completions API of serve.py over HTTP (SPEC §4: the steering object): the request
schema with its one extra `steering` object, where every bad field is a 400 whose OpenAI error body
names it; replies and server-sent events in the OpenAI formats; the workshop page at `GET /`.

Nothing here loads a model: parse_request turns a body into a Job for serve.Engine, and Handler sends
back what the engine produces for that Job.

    python serve.py --vector /tmp/v.safetensors          # then: curl, the openai client, or the page
    python -m pytest -q test_all.py -k serve              # its tests: tiny models, real HTTP, seconds
"""
import hmac
import json
import math
import queue
import secrets
import sys
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "serve_page.html"
MAX_BODY = 1 << 20                                  # bytes of one request body
BODY_TIMEOUT = 5                                    # seconds without a byte of a promised body: 400, not a wait
BACKLOG = 1024                                      # connections the OS holds until accepted (socketserver: 5)


class APIError(Exception):
    """An error reply in the OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request: its prompt, sampling settings and steering; events flow back to the HTTP thread."""
    prompt: str                            # the last user message, as sent
    ids: list                              # the prompt in the chat template
    n_prefix: int                          # chat-prefix length: steering starts after it (SPEC §4)
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stream: bool
    concept: str | None = None
    strength: float = 0.0                  # 0 = unsteered, exactly
    steered: bool = False                  # the request carried a steering object
    tokens: list = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)   # ("token", id, λ) / ("done", reason) / ("error", msg)
    cancelled: bool = False                # the client went away: the row leaves the batch


# ----------------------------------------------------------------------------- the request schema

def number(body, name, default, lo, hi, types=(int, float), param=None):
    """body[name] (default when absent or null), checked to be a finite number of `types` in [lo, hi];
    the error names `param` (default: name)."""
    v = body.get(name)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, types) or not math.isfinite(v) or not lo <= v <= hi:
        what = "an integer" if types is int else "a number"
        raise APIError(400, f"'{param or name}' must be {what} in [{lo}, {hi}], got {json.dumps(v)[:40]}",
                       param or name)
    return v


def user_text(messages):
    """The last user message's text (a string, or a list of {"type": "text", "text": ...} parts)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise APIError(400, "every message must be an object with a string 'role'", "messages")
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise APIError(400, "'messages' holds no user message", "messages")
    content = users[-1].get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str) or not content.strip():
        raise APIError(400, "the last user message's 'content' must be non-empty text", "messages")
    return content


def parse_request(raw, engine):
    """Bytes of a chat-completions body -> a Job, or an APIError naming the field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:      # RecursionError: [[[[...]]]]
        raise APIError(400, f"the body is not valid JSON ({type(e).__name__})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    prompt = user_text(body.get("messages"))
    if body.get("n", 1) != 1:
        raise APIError(400, "only n = 1 is supported", "n")
    if body.get("stop") is not None:
        raise APIError(400, "'stop' strings are not supported (generation stops at <end_of_turn> and <eos>)", "stop")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, name, min(128, engine.max_tokens), 1, engine.max_tokens, int)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    seed = body.get("seed")
    seed = secrets.randbits(63) if seed is None else number(body, "seed", 0, -2 ** 63, 2 ** 63 - 1, int)
    ids, n_prefix = engine.tok.chat(prompt)
    if len(ids) > engine.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this server takes at most {engine.max_prompt_tokens}",
                       "messages", "context_length_exceeded")
    if len(ids) + max_tokens > engine.base.cfg.max_position_embeddings:
        raise APIError(400, f"{len(ids)} prompt tokens + {name} {max_tokens} exceed the model's context of "
                       f"{engine.base.cfg.max_position_embeddings}", name, "context_length_exceeded")
    job = Job(prompt, ids, n_prefix, max_tokens, number(body, "temperature", 1.0, 0, 2),
              number(body, "top_p", 1.0, 1e-6, 1), seed, stream)
    s = body.get("steering")
    if s is not None:
        if not isinstance(s, dict):
            raise APIError(400, "'steering' must be an object {concept, strength}", "steering")
        if engine.kind is None:
            raise APIError(400, "this server was started without --hypernet, --vector or --psr", "steering")
        job.steered, job.strength = True, number(s, "strength", 1.0, -1e4, 1e4, param="steering.strength")
        if engine.kind == "hypernet":
            job.concept = s.get("concept")
            if not isinstance(job.concept, str) or not job.concept.strip():
                raise APIError(400, "'steering.concept' must be non-empty text (the steering prompt)",
                               "steering.concept")
        elif s.get("concept") is not None:
            raise APIError(400, f"a {engine.kind} steers toward one fixed concept: send only 'strength'",
                           "steering.concept")
    engine.check(job)                              # what needs the model: sampling values, the concept's length
    return job


# ----------------------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    server_version = "hypersteer-serve"
    timeout = 60                                           # seconds to receive a request

    def log_message(self, fmt, *args):                     # the request line and status only, never headers
        sys.stderr.write(f"serve: {self.address_string()} {fmt % args}\n")

    def reply(self, status, obj, ctype="application/json"):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorised(self):
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return True
        self.reply(401, APIError(401, "a valid 'Authorization: Bearer <key>' header is required",
                                 code="invalid_api_key", kind="authentication_error").body())
        return False

    def do_GET(self):
        engine = self.server.engine
        if self.path in ("/", "/index.html"):
            info = {"model": engine.name, "kind": engine.kind, "concept": self.server.concept,
                    "auth": self.server.api_key is not None, "max_tokens": engine.max_tokens}
            page = PAGE.read_text(encoding="utf-8").replace("__CONFIG__", json.dumps(info).replace("<", "\\u003c"))
            self.reply(200, page.encode(), "text/html; charset=utf-8")
        elif self.path == "/v1/models":
            if self.authorised():
                self.reply(200, {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                                             "owned_by": "hypersteer", "steering": engine.kind}]})
        else:
            self.reply(404, APIError(404, f"no route {self.path}", code="not_found").body())

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            return self.reply(404, APIError(404, f"no route {self.path}", code="not_found").body())
        if not self.authorised():
            return
        try:
            job = parse_request(self.body(), self.server.engine)
            self.server.engine.submit(job)
        except APIError as e:
            return self.reply(e.status, e.body())
        except Exception as e:                             # the server keeps serving after any bad request
            return self.reply(500, APIError(500, f"internal error ({type(e).__name__})", kind="server_error").body())
        try:
            (self.stream if job.stream else self.complete)(job)
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled = True                           # the worker drops the row at its next token

    def body(self):
        """The request body, exactly Content-Length bytes. A body that ends early or stalls for BODY_TIMEOUT
        seconds is a 400 (the connection is then closed: what follows on it cannot be framed)."""
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            raise APIError(400 if n < 0 else 413, f"the body needs a Content-Length of at most {MAX_BODY} bytes")
        self.connection.settimeout(BODY_TIMEOUT)
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raw = None
        finally:
            self.connection.settimeout(self.timeout)
        if raw is None or len(raw) < n:
            self.close_connection = True
            got = "stalled" if raw is None else f"ended after {len(raw)}"
            raise APIError(400, f"the body {got} of the {n} bytes its Content-Length promised", code="incomplete_body")
        return raw

    def envelope(self, kind, obj):
        return {"id": self.rid, "object": kind, "created": int(time.time()), "model": self.server.engine.name, **obj}

    def complete(self, job):
        self.rid, text, lams, finish = f"chatcmpl-{secrets.token_hex(12)}", "", [], None
        try:
            for delta, lam, finish in self.server.engine.texts(job):
                text, lams = text + delta, lams + lam
        except APIError as e:
            return self.reply(e.status, e.body())
        out = self.envelope("chat.completion", {"choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(job.ids), "completion_tokens": len(job.tokens),
                      "total_tokens": len(job.ids) + len(job.tokens)}})
        if job.steered:
            out["steering"] = {"concept": job.concept, "strength": job.strength, **({"lambda": lams} if lams else {})}
        self.reply(200, out)

    def stream(self, job):
        """Server-sent events in the OpenAI chunk format; a steered PSR row adds "steering": {"lambda": [...]},
        λ of each token in the chunk (the λ applied where that token was predicted)."""
        self.rid = f"chatcmpl-{secrets.token_hex(12)}"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def send(delta, finish=None, extra=None):
            chunk = self.envelope("chat.completion.chunk", {
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})})
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        send({"role": "assistant", "content": ""})
        try:
            for delta, lam, finish in self.server.engine.texts(job):
                if delta or lam:                           # λ of held-back bytes goes out with the rest
                    send({"content": delta}, None, {"steering": {"lambda": lam}} if lam else None)
                if finish:
                    send({}, finish)
        except APIError as e:
            self.wfile.write(f"data: {json.dumps(e.body())}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """One thread per connection; a backlog deep enough that a burst of clients is answered (200, or 503
    when the engine's queue is full), never reset by the OS before it is accepted."""
    request_queue_size = BACKLOG
    daemon_threads = True


def make_server(engine, host="127.0.0.1", port=8000, api_key=None, concept=None):
    """Listen on host:port (0 = a free port) at once; engine may be set later (serve.py binds first, so that a
    busy port fails before the model loads). A bad host or a busy port is an OSError naming the address."""
    try:
        server = Server((host, port), Handler)
    except (OSError, OverflowError) as e:        # OverflowError: a port outside 0-65535
        raise OSError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    server.engine, server.api_key, server.concept = engine, api_key, concept
    return server
