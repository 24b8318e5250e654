"""The audit log: one JSON document per run, its provenance fields, schema check and atomic writing."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
from typing import Any

from kprune_batch import __version__
from kprune_batch.errors import AuditLogError
from kprune_batch.files import atomic_write_bytes, read_regular
from kprune_batch.logfacts import inconsistency
from kprune_batch.schemas import conforms, load_schema

AUDIT_VERSION = 1


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def new_run_id() -> str:
    """UTC time first, so that logs named by run id sort by time; a random tail keeps them unique."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{os.urandom(3).hex()}"


def _version(dist: str) -> str | None:
    """The installed version of distribution `dist`, as importlib.metadata.version gives it."""
    found = _fast_version(dist)
    if found is not _UNSETTLED:
        return found
    from importlib import metadata  # ~15 ms to import: only where the fast look-up cannot tell

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _normalized(name: str) -> str:
    """importlib.metadata's Prepared.normalize (PEP 503, then "-" as "_")."""
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


_SITE: dict[str, list[str] | None] = {}  # sys.path entry -> its names (None: not a folder)
_UNSETTLED = "unsettled"  # _fast_version cannot tell: importlib.metadata must


def _fast_version(dist: str) -> str | None:
    """What importlib.metadata.version(dist) finds (None: not installed), found the way its
    path finder finds it: the first folder of sys.path holding a `<name>-*.dist-info` folder of
    that normalised name, whose METADATA's Version header is the version. _UNSETTLED where
    that does not settle it (an egg-info, a zip file on sys.path, no such header)."""
    wanted = _normalized(dist)
    for entry in sys.path:
        folder = entry or "."
        if folder not in _SITE:
            try:
                _SITE[folder] = os.listdir(folder)
            except FileNotFoundError:  # importlib.metadata skips it too
                _SITE[folder] = []
            except OSError:  # a zip file, say: importlib.metadata reads into it
                _SITE[folder] = None
        if _SITE[folder] is None:
            return _UNSETTLED
        for child in _SITE[folder] or ():
            low = child.lower()
            if not low.endswith((".dist-info", ".egg-info")) or \
                    _normalized(low.rpartition(".")[0].partition("-")[0]) != wanted:
                continue
            if not low.endswith(".dist-info"):
                return _UNSETTLED  # an egg-info (a file or a folder): importlib.metadata's
            try:
                with open(os.path.join(folder, child, "METADATA"), encoding="utf-8") as fh:
                    for line in fh:
                        if not line.strip():
                            break  # the end of the headers
                        key, _, value = line.partition(":")
                        if key.strip().lower() == "version":
                            return value.strip() or None
            except (OSError, UnicodeDecodeError):
                pass
            return _UNSETTLED
    return None


KERAS_BACKENDS = ("tensorflow", "jax", "torch")


def keras_backend_name() -> str:
    """The Keras backend this process uses or would use, resolved as keras/src/backend/config.py
    does (KERAS_BACKEND, else "backend" in $KERAS_HOME/keras.json, else tensorflow) without
    importing Keras: the direct backend never imports it, and the name must not depend on
    whether a model of the run happened to need Keras."""
    from kprune_batch import quiet

    if quiet._keras is not None:  # Keras imported: its own answer
        return str(quiet._keras.backend.backend())
    name = os.environ.get("KERAS_BACKEND")
    if not name:
        home = os.environ.get("KERAS_HOME") or os.path.join(
            os.path.expanduser("~") if os.access(os.path.expanduser("~"), os.W_OK) else "/tmp",
            ".keras")
        try:
            with open(os.path.join(home, "keras.json"), encoding="utf-8") as fh:
                name = json.load(fh).get("backend")
        except (OSError, ValueError, AttributeError):
            name = None
    return str(name or "tensorflow")


def tool_versions() -> dict[str, Any]:
    """Versions from package metadata: no TensorFlow import needed. `backend` names the Keras
    backend; under jax or torch its framework's version is added under the framework's name
    (`tensorflow` keeps its meaning: the installed TensorFlow, whichever backend ran)."""
    backend = keras_backend_name()
    tool = {"name": "kprune-batch", "version": __version__, "keras": _version("keras"),
            "tensorflow": _version("tensorflow") or _version("tensorflow-cpu"),
            "backend": backend}
    if backend == "jax":
        tool["jax"] = _version("jax")
    elif backend == "torch":
        tool["torch"] = _version("torch")
    tool.update({"numpy": _version("numpy"), "h5py": _version("h5py"),
                 "python": platform.python_version()})
    return tool


def git_provenance(path: str) -> dict[str, Any]:
    """{commit, dirty} of the file at `path` in its git work tree; `reason` when there is none.

    dirty is true when the file differs from HEAD (staged or not) or is not tracked at all.
    """
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True,
                              timeout=30, check=False)

    try:
        head = git("rev-parse", "--verify", "-q", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "reason": "git is not available"}
    inside = git("rev-parse", "--is-inside-work-tree")
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return {"commit": None, "dirty": None, "reason": "the spec is not in a git work tree"}
    if head.returncode != 0:
        return {"commit": None, "dirty": True, "reason": "the repository has no commit yet"}
    commit = head.stdout.strip()
    tracked = git("ls-files", "--error-unmatch", "--", name).returncode == 0
    if not tracked:
        return {"commit": commit, "dirty": True, "reason": "the spec file is not tracked by git"}
    changed = git("diff", "--quiet", "HEAD", "--", name).returncode != 0
    return {"commit": commit, "dirty": changed}


def run_status(model_statuses: list[str]) -> str:
    ok = sum(1 for s in model_statuses if s == "ok")
    if ok == len(model_statuses):
        return "ok"
    return "partial" if ok else "failed"


def validate_log(log: dict[str, Any]) -> list[str]:
    """Schema violations of an audit log, as 'json.path: message' strings (sorted, all of them).

    The compiled check answers for a valid log (a 13k-record ResNet50 removal log: jsonschema
    alone needs 1.4 s); only a log it does not pass is checked again by jsonschema for messages.
    """
    if conforms("audit", log):
        return []
    import jsonschema

    from kprune_batch.spec import json_path

    validator = jsonschema.Draft202012Validator(load_schema("audit"))
    return sorted(f"{json_path(e.absolute_path) or '(root)'}: {e.message}"
                  for e in validator.iter_errors(log))


def write_log(path: str, log: dict[str, Any]) -> None:
    """Check the log against its schema, then write it atomically (a bug here must not go unseen)."""
    problems = validate_log(log)
    if problems:
        raise AuditLogError(f"internal error: the audit log does not follow its schema: {problems[0]}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, dumps_log(log).encode())


# Lists whose items are written one per line, each compact: a ranking over every conv of a
# ResNet50 gives 6,640 records, which json.dumps(indent=2) writes in ~1 s of pure Python (the C
# encoder only runs without indent) as ~200,000 lines; one record per line is as diffable.
_ONE_PER_LINE = frozenset({"zeroed", "removed", "layers", "touched", "folded"})


# one encoder for every record (json.dumps builds one per call: a fifth of the log's cost);
# its defaults are json.dumps's (separators ", " and ": ", ensure_ascii)
_ENCODE = json.JSONEncoder(allow_nan=False).encode


def _c_encoder() -> Any:
    """json's C encoder, made once: JSONEncoder.encode makes one per call, with a table of the
    objects it is inside (a circular-reference check a log built here never needs); ~25 % of
    the encoding of a 6,640-record log. Same text as _ENCODE (NaN refused); None without the
    C accelerator (another Python), where _ENCODE is used."""
    from json import encoder

    if encoder.c_make_encoder is None:  # pragma: no cover - CPython always has it
        return None
    make = encoder.c_make_encoder(None, json.JSONEncoder().default,
                                  encoder.encode_basestring_ascii, None, ": ", ", ", False,
                                  False, False)
    return lambda value: "".join(make(value, 0))


_ENCODE_ITEM = _c_encoder() or _ENCODE


def dumps_log(log: dict[str, Any]) -> str:
    """The log as JSON text: nested objects indented, record lists one compact item per line,
    lists of plain values on one line. Deterministic (reproducible runs write the same bytes)."""
    return _pretty(log, 0) + "\n"


def _pretty(value: Any, level: int, compact_items: bool = False) -> str:
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_pretty(v, level + 1, k in _ONE_PER_LINE)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [inner + (_ENCODE_ITEM(v) if compact_items else _pretty(v, level + 1))
                 for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return _ENCODE(value)


def read_log(path: str) -> dict[str, Any]:
    """Load and schema-check an audit log; AuditLogError with one clear line if that fails."""
    try:
        # a regular file only, read no further than its size: a FIFO or /dev/zero given as a
        # log (or planted where one was) must not hang verify, report or diff
        log = json.loads(read_regular(path).decode("utf-8"), parse_constant=_not_json,
                         parse_float=_finite)
    except RecursionError:  # json's own limit, on a crafted deep nesting
        raise AuditLogError(f"{path}: not a JSON audit log (nested too deeply)") from None
    except FileNotFoundError:
        raise AuditLogError(f"{path}: no such audit log") from None
    except OSError as exc:
        raise AuditLogError(f"{path}: cannot read audit log: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuditLogError(f"{path}: not a JSON audit log ({exc})") from None
    if not isinstance(log, dict):
        raise AuditLogError(f"{path}: not a kprune audit log (top level is not an object)")
    try:
        problems = validate_log(log)
    except RecursionError:  # jsonschema walks a nesting that json could still read
        problems = ["(root): nested too deeply"]
    if problems:
        raise AuditLogError(f"{path}: not a valid kprune audit log: {_clip(problems[0])}")
    problem = inconsistency(log)
    if problem:
        raise AuditLogError(f"{path}: not a consistent kprune audit log: {_clip(problem)}")
    return log


def _not_json(name: str) -> float:
    # write_log refuses NaN and infinities (allow_nan=False): a log holding one was not written
    # by kprune, and a NaN filter statistic or index would compare as nothing at all
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as inf
        raise ValueError(f"{text} is not a finite number")
    return value


def _clip(text: str, limit: int = 240) -> str:
    """A schema message quotes the failing value: a whole model entry is not one line's worth."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def command_line() -> list[str]:
    return [os.path.basename(sys.argv[0])] + sys.argv[1:]
