"""Locates and loads the JSON Schemas shipped in `schema/` (inside the wheel: kprune_batch/schema/)."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parent


def schema_dir() -> Path:
    """The folder holding spec.schema.json and audit.schema.json.

    A built wheel carries them as kprune_batch/schema/ (see pyproject's force-include); a source
    checkout or editable install reads the repository's top-level schema/ folder.
    """
    for candidate in (_PACKAGE_DIR / "schema", _PACKAGE_DIR.parent / "schema"):
        if (candidate / "spec.schema.json").is_file():
            return candidate
    raise FileNotFoundError("kprune's schema folder is missing from this installation")


SCHEMA_NAMES = ("spec", "audit")


def schema_path(name: str) -> Path:
    """The file of schema `name` ('spec' or 'audit'): the one validation reads, and what
    `kprune schema NAME --path` prints for an editor's modeline."""
    return schema_dir() / f"{name}.schema.json"


@functools.lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema `name` ('spec' or 'audit')."""
    with open(schema_path(name), encoding="utf-8") as fh:
        return json.load(fh)


@functools.lru_cache(maxsize=None)
def _compiled(name: str) -> Any:
    import jsonschema_rs  # a compiled validator: ~15 ms to import, where jsonschema needs ~40

    return jsonschema_rs.validator_for(load_schema(name))


def conforms(name: str, data: Any) -> bool:
    """True if `data` is valid against schema `name`, by the compiled (Rust) validator.

    Only "yes" is trusted: on False the caller runs jsonschema, which gives the full, positioned
    error list and the final word. Where the two differ the compiled one is the stricter (ECMA-262
    `$` in patterns, non-finite numbers, non-string keys), which costs time, never a missed error;
    tests/test_schemas.py checks the direction on fuzzed documents.
    """
    try:
        return bool(_compiled(name).is_valid(data))
    except Exception:  # a value it cannot read (dates, bytes, int keys, lone surrogates...)
        return False
