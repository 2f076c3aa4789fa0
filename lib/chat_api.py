"""A cached, retrying client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, llama.cpp
server, Ollama), used by the LLM judge (SPEC §7) and by the prompting baseline's prompt writer (SPEC §8).
It never writes the API key: the key is read from the environment and replaced by *** in every answer,
cache file and error message, even when a server echoes it back.

    python judge.py gens.jsonl --base-url http://localhost:11434/v1 --model qwen2.5:7b   # the judge
    python steer.py eval --method prompting --judge-url URL --out gens.jsonl            # the prompt writer

Every answer is cached on disk, one file per request named by the sha256 of the full request (model,
messages, temperature), so nothing is paid for twice. 429, 5xx, timeouts and connection errors are
retried with exponential backoff; a request that still fails, or whose reply is not text, raises
JudgeError and is not cached, so it is sent again next time.
"""
import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests

from lib import fileio

TOKENS = ("prompt_tokens", "completion_tokens")


@dataclass
class JudgeConfig:
    """The endpoint, how it is called and what it costs: judge.py's flags; steer.py and psr.py --judge-url."""
    base_url: str = "https://api.openai.com/v1"  # OpenAI-compatible; /chat/completions is appended
    model: str = "gpt-4o-mini"  # the papers' judge
    temperature: float = 0.0  # SPEC §7: deterministic judging
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the variable holding the key; no key -> no header
    workers: int = 16  # concurrent requests (bounded thread pool)
    timeout: float = 60.0  # seconds per HTTP request
    max_retries: int = 6  # retries after the first try, on 429, 5xx, timeouts, connection errors
    backoff_base: float = 1.0  # first retry waits ~this many seconds, doubling, with jitter
    backoff_max: float = 60.0  # cap on a single wait, Retry-After included
    cache_dir: str = ".judge_cache"  # one JSON file per request
    price_in: float = 0.15  # USD per 1M prompt tokens (gpt-4o-mini)
    price_out: float = 0.60  # USD per 1M completion tokens (gpt-4o-mini)
    est_output_tokens: int = 120  # assumed reply length, for --dry-run estimates


class JudgeError(RuntimeError):
    """A request that failed for good (after retries, or a non-retryable HTTP error)."""


def request_body(messages, cfg):
    return {"model": cfg.model, "messages": messages, "temperature": cfg.temperature}


def cache_path(body, cfg):
    """The cache key is the full request body only: no API key, no headers, no URL."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return Path(cfg.cache_dir) / (hashlib.sha256(canonical.encode("utf-8")).hexdigest() + ".json")


def api_key(cfg):
    """The key from the environment ("" when unset); surrounding whitespace is never part of it."""
    return os.environ.get(cfg.api_key_env, "").strip()


def redact(obj, key):
    """obj (a string, or lists and dicts of them) with the API key replaced by *** everywhere."""
    if len(key) < 4:
        return obj
    if isinstance(obj, str):
        return obj.replace(key, "***")
    if isinstance(obj, list):
        return [redact(x, key) for x in obj]
    if isinstance(obj, dict):
        return {redact(k, key): redact(v, key) for k, v in obj.items()}
    return obj


def _retry_after(resp):
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


_local = threading.local()  # one requests.Session per worker thread (sessions are not thread-safe)
RETRYABLE = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


def post_chat(body, cfg, key):
    """POST one request, retrying 429, 5xx, timeouts and connection errors with exponential
    backoff and jitter (honouring Retry-After). Returns the response JSON or raises JudgeError."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    for attempt in range(cfg.max_retries + 1):
        wait = None
        try:
            resp = _local.session.post(url, json=body, headers=headers, timeout=cfg.timeout)
        except RETRYABLE as e:
            problem = f"{type(e).__name__}: {e}"
        except requests.RequestException as e:  # a bad URL or header: retrying won't help
            raise JudgeError(f"{url}: {type(e).__name__}: {e}") from None
        else:
            if resp.status_code == 200:
                try:
                    return resp.json()
                except ValueError:
                    raise JudgeError(f"{url}: the reply is not JSON") from None
            problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if resp.status_code != 429 and resp.status_code < 500:  # 400/401/404: retrying won't help
                raise JudgeError(f"{url}: {problem}")
            wait = _retry_after(resp)
        if attempt < cfg.max_retries:
            if wait is None:
                wait = cfg.backoff_base * 2 ** attempt * random.uniform(0.5, 1.0)
            time.sleep(min(wait, cfg.backoff_max))
    raise JudgeError(f"{url}: gave up after {cfg.max_retries + 1} tries; last {problem}")


def reply_text(data):
    """The answer in a 200 reply. A reply that is not text (content null, a number, a list; no
    choices; no message) raises JudgeError: SPEC §7 counts it as a failed request, never a 0."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise JudgeError(f"the reply is not text: {json.dumps(data)[:200]}")
    return content


def token_count(usage, name):
    """A token count from a reply's usage block; missing, malformed or negative -> 0. The paid
    answer matters more than its bookkeeping, so a bad usage block never loses it."""
    try:
        return max(0, int(float(usage.get(name))))
    except (AttributeError, TypeError, ValueError, OverflowError):
        return 0


def read_cache(path):
    """A cached (reply, usage), or None when absent or unreadable: then the request is sent again."""
    try:
        hit = json.loads(path.read_text(encoding="utf-8"))
        reply, usage = hit["reply"], {k: token_count(hit["usage"], k) for k in TOKENS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (reply, usage) if isinstance(reply, str) else None


def cached_chat(messages, cfg):
    """One chat completion through the disk cache -> (reply, usage, from_cache). Only text answers
    are cached; the key is redacted from the answer and from error messages."""
    body = request_body(messages, cfg)
    path = cache_path(body, cfg)
    hit = read_cache(path)
    if hit:
        return (*hit, True)
    key = api_key(cfg)
    try:
        data = post_chat(body, cfg, key)
        reply = redact(reply_text(data), key)
    except JudgeError as e:
        raise JudgeError(" ".join(redact(str(e), key).split())) from None  # one line, no key
    usage = {k: token_count(data.get("usage"), k) for k in TOKENS}
    entry = {"request": body, "reply": reply, "usage": usage}
    fileio.write_text(path, json.dumps(redact(entry, key), ensure_ascii=False))   # never half a file
    return reply, usage, False


def chat(messages, cfg=None):
    """Reusable client: one cached, retried chat completion -> the reply text (raises JudgeError).
    baselines.steering_prompt uses it to have an LLM write the prompting baseline's prompts (SPEC §8)."""
    return cached_chat(messages, cfg or JudgeConfig())[0]
