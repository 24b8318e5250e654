"""`kprune schema [spec|audit] [--path]`: print a shipped JSON Schema, or where it is installed."""
from __future__ import annotations

from kprune_batch.commands import Result
from kprune_batch.schemas import schema_path


def schema(name: str = "spec", path: bool = False) -> Result:
    """The schema's text (what validation reads, byte for byte) or its absolute path."""
    result = Result()
    file = schema_path(name)
    if path:
        result.out.append(str(file))
    else:
        result.out.extend(file.read_text(encoding="utf-8").splitlines())
    return result
