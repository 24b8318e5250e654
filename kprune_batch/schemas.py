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


@functools.lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema `name` ('spec' or 'audit')."""
    with open(schema_dir() / f"{name}.schema.json", encoding="utf-8") as fh:
        return json.load(fh)
