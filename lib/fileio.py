"""The project's own files, written and read so that a crash or a bad file costs one clear line, and
the way every command fails: the one atomic writer (checkpoints, vectors, reports, metrics), the one
reader of append-only JSONL files (generations, PSR samples), JSON files with one-line errors, and
one_line_errors, which each command-line entry point runs inside. What SPEC §5 (resumable checkpoints) and
§7 (resumable generations, cached judge answers) rely on.

    python -m pytest -q test_all.py -k "one_line or half_written or resumed_run"   # their tests
"""
import contextlib
import json
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


def complete_lines(path):
    """The complete lines of an append-only JSONL file. A crash can leave a partly written last line:
    it is cut off the file (with a warning), so the work it recorded is done again."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1]
    if len(keep) < len(raw):
        warnings.warn(f"{path}: dropping a partly written last line ({len(raw) - len(keep)} bytes)", stacklevel=3)
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    try:
        return [line for line in keep.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_json(path, what="file"):
    """The value in a JSON file; a missing or malformed file is a one-line error naming it as `what`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed {what} ({type(e).__name__})") from None
