"""The project's own files, written and read so that a crash or a bad file costs one clear line, and
the way every command fails: the one atomic writer (checkpoints, vectors, reports, metrics), the one
JSONL reader (data, metrics, generations, PSR samples; append-only files cut a torn last line), JSON files with
one-line errors, and one_line_errors, which each command-line entry point runs inside (exit status 1), with
ArgumentParser (usage errors: exit status 2) and its flag types. What SPEC §5 (resumable checkpoints) and §7
(resumable generations, cached judge answers) rely on.

    python -m pytest -q test_all.py -k "one_line or half_written or resumed_run"   # their tests
"""
import argparse
import contextlib
import json
import math
import os
import threading
import warnings
from pathlib import Path


@contextlib.contextmanager
def one_line_errors(debug=False, also=()):
    """For command-line entry points: the project's errors (a bad file, flag or value; `also` adds more
    kinds) end the command with one line naming it and a non-zero exit; --debug shows the traceback."""
    try:
        yield
    except (OSError, ValueError, *also) as e:
        if debug:
            raise
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse, failing the way every command here fails on a usage error (an unknown, missing or malformed flag,
    a bad choice, a combination the command refuses: ap.error): argparse's exit status 2 with one line naming
    the flag, without the usage dump (--help shows it). Every other error is one_line_errors' exit status 1.
    Subcommands' parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())}\n")


def checked(kind, check):
    """argparse type: kind(text), then check(value) (a ValueError becomes argparse's one-line error naming the
    flag), e.g. checked(float, lambda v: model.check_sampling(temperature=v)) for --temperature."""
    def parse(text):
        v = kind(text)
        try:
            check(v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return v
    parse.__name__ = kind.__name__                   # argparse: "invalid float value: 'x'"
    return parse


def finite(text):
    """argparse type: a finite float (strengths, temperatures: nan and inf are refused)."""
    v = float(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def positive_int(text):
    """argparse type: an integer >= 1."""
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return v


def non_negative(kind):
    """argparse type: a finite number of `kind` (int or float) >= 0."""
    def check(text):
        v = kind(text)
        if not (math.isfinite(v) and v >= 0):
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return v
    return check


def write_atomic(path, write):
    """write(tmp) to a temporary file beside `path`, then rename it onto `path`: a crash or a full
    disk never leaves a half-written file, and the previous version stays until the new one is whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")   # unique per writer
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"{path}: could not write ({e.strerror or e}); the previous file is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path, text):
    """`text` into `path` as UTF-8 through write_atomic, creating the folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_jsonl(path, records):
    """Replace a JSONL file with `records`, one JSON object a line, atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path, what="JSONL file", append_only=False, skip_malformed=False):
    """[(line number, value)] of a JSONL file, one JSON value per non-empty line: the project's one JSONL reader.
    A line that is not UTF-8 or not JSON is a one-line error naming file:line and `what` (with skip_malformed its
    value is None instead, for callers that count bad rows). append_only: a file written a line at a time
    (metrics, generations, PSR samples) that a crash can leave with a partly written last line; that line is cut
    off the file, with a warning, so the work it recorded is done again. A missing file has no lines."""
    path = Path(path)
    if not path.exists():
        if append_only:
            return []
        raise FileNotFoundError(f"{path}: {what} not found")
    raw = path.read_bytes()
    if append_only:
        keep = raw[:raw.rfind(b"\n") + 1]
        if len(keep) < len(raw):
            warnings.warn(f"{path}: dropping a partly written last line ({len(raw) - len(keep)} bytes)", stacklevel=3)
            with open(path, "r+b") as f:
                f.truncate(len(keep))
        raw = keep
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start}) in this {what}") from None
        except json.JSONDecodeError as e:
            if not skip_malformed:
                raise ValueError(f"{path}:{n}: not valid JSON in this {what} ({e.msg})") from None
            out.append((n, None))
    return out


def read_json(path, what="file"):
    """The value in a JSON file; a missing or malformed file is a one-line error naming it as `what`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed {what} ({type(e).__name__})") from None
