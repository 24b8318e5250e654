"""One function per CLI command; each returns a Result whose return_code the CLI exits with."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

# Where a command that streams (apply) sends each line as soon as it is known: (line, to_stderr)
Emit = Callable[[str, bool], None]


@dataclass
class Result:
    """What a command prints (stdout lines, stderr lines), its results as one JSON-able document
    (`data`: what --format json prints instead of `out`; None where the command stopped before
    it had results) and the exit code it decided."""

    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    return_code: int = EXIT_OK
    data: Any = None

    def say(self, line: str, err: bool = False) -> None:
        """Keep `line` for the end of the command (the Emit of a command that does not stream)."""
        (self.err if err else self.out).append(line)
