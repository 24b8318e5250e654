"""One function per CLI command; each returns a Result whose return_code the CLI exits with."""
from __future__ import annotations

from dataclasses import dataclass, field

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


@dataclass
class Result:
    """What a command prints (stdout lines, stderr lines) and the exit code it decided."""

    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    return_code: int = EXIT_OK
