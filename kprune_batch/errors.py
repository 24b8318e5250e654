"""The exception hierarchy: library code raises these with structured fields; only the CLI renders text."""
from __future__ import annotations

from dataclasses import dataclass, field


class KpruneError(Exception):
    """Base class of every error kprune reports to a user (never a bug)."""

    def render(self) -> str:
        return str(self)


@dataclass(frozen=True, order=True)
class SpecProblem:
    """One problem at a position of a spec file (1-based line and column)."""

    line: int
    col: int
    path: str  # JSON path such as models[0].layers[1].rules[0]
    message: str
    file: str = field(default="", compare=False)

    def render(self) -> str:
        where = f"{self.path}: " if self.path else ""
        if self.line <= 0:  # the file itself (unreadable): no position to give
            return f"{self.file}: {where}{self.message}"
        return f"{self.file}:{self.line}:{self.col}: {where}{self.message}"


class SpecError(KpruneError):
    """A spec file is invalid; carries every problem of the file, sorted by position."""

    def __init__(self, file: str, problems: list[SpecProblem]):
        self.file = file
        self.problems = sorted(problems)
        super().__init__("\n".join(p.render() for p in self.problems))

    def render(self) -> str:
        return "\n".join(p.render() for p in self.problems)


class ModelError(KpruneError):
    """One model of a spec cannot be processed; the others still can."""

    def __init__(self, message: str, *, model: str = "", layer: str | None = None,
                 file: str | None = None, loc: str | None = None, hint: str | None = None):
        self.message = message
        self.model = model
        self.layer = layer
        self.file = file
        self.loc = loc
        self.hint = hint
        super().__init__(self.render())

    def for_model(self, model: str) -> ModelError:
        """The same error, said of `model` (library code below the executor knows no names)."""
        return ModelError(self.message, model=model, layer=self.layer, file=self.file,
                          loc=self.loc, hint=self.hint)

    def render(self) -> str:
        parts = []
        if self.model:
            parts.append(f"model '{self.model}'")
        if self.layer:
            parts.append(f"layer '{self.layer}'")
        head = ", ".join(parts)
        text = f"{head}: {self.message}" if head else self.message
        if self.loc:
            text = f"{self.loc}: {text}"
        if self.file:
            text = f"{self.file}: {text}"
        if self.hint:
            text = f"{text}; {self.hint}"
        return text


class AuditLogError(KpruneError):
    """An audit log cannot be read or does not follow its schema."""


class OutputError(KpruneError):
    """An output cannot be written (folder missing or read-only, disk full, lock held)."""
