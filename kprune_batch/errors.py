"""The exception hierarchy: library code raises these with structured fields; only the CLI renders text."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# What could end a line or rewrite one on a terminal or in a log viewer: C0 and C1 controls
# (newline, carriage return, ANSI escapes), DEL, the line and paragraph separators (str.splitlines
# splits on them too) and the bidirectional overrides ("Trojan source").
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
MAX_SHOWN_PROBLEMS = 30  # per spec file; the rest are counted in one more line


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """`text` as one line that says what it holds: every control character as an escape
    (a newline as \\n, ESC as \\x1b), so a name with a newline cannot forge a second line."""
    return _UNPRINTABLE.sub(_escape, text) if _UNPRINTABLE.search(text) else text


MAX_LISTED = 5  # names shown of a long list in one line; the rest are counted
_LIST = re.compile(r"\[([^\[\]]*)\]")


def name_list(names: list[str], limit: int = MAX_LISTED) -> str:
    """'a, b, c' or, past `limit` names, 'a, b, c, d, e … and 12 more'."""
    shown = ", ".join(names[:limit])
    rest = len(names) - limit
    return f"{shown} … and {rest} more" if rest > 0 else shown


def _cap_list(match: re.Match[str]) -> str:
    items = [item.strip() for item in match.group(1).split(",") if item.strip()]
    return f"[{name_list(items)}]" if len(items) > MAX_LISTED else match.group()


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a foreign exception (Keras, TensorFlow, h5py), for one line of ours:
    a long bracketed list in it (Keras's "Existing layers are: [...]" names every layer of the
    model) capped to its first names and a count, then the whole cut at `limit` characters."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = _LIST.sub(_cap_list, text.splitlines()[0])
    return line if len(line) <= limit else line[:limit - 3] + "..."


class KpruneError(Exception):
    """Base class of every error kprune reports to a user (never a bug)."""

    def render(self) -> str:
        return printable(str(self))


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
            return printable(f"{self.file}: {where}{self.message}")
        return printable(f"{self.file}:{self.line}:{self.col}: {where}{self.message}")


class SpecError(KpruneError):
    """A spec file is invalid; carries every problem of the file, sorted by position."""

    def __init__(self, file: str, problems: list[SpecProblem]):
        self.file = file
        self.problems = sorted(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self, limit: int = MAX_SHOWN_PROBLEMS) -> list[str]:
        """One line per problem, the first `limit` of them, then one line counting the rest
        (a 10^6-entry list of wrong values is a screenful, not 10^6 lines)."""
        shown = [p.render() for p in self.problems[:limit]]
        rest = len(self.problems) - limit
        if rest > 0:
            shown.append(printable(f"... and {rest} more problem{'s' if rest > 1 else ''} in "
                                   f"{self.file}"))
        return shown

    def render(self) -> str:
        return "\n".join(self.lines())


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
        return printable(text)


class AuditLogError(KpruneError):
    """An audit log cannot be read or does not follow its schema."""


class OutputError(KpruneError):
    """An output cannot be written (folder missing or read-only, disk full, lock held)."""


# The extras that add a Keras backend (pyproject.toml [project.optional-dependencies])
KERAS_EXTRAS = "pip install 'kprune-batch[tensorflow]' (or [jax], [torch])"


class BackendMissing(ModelError):
    """Something needs a built model (a Keras backend) and no deep-learning framework is
    installed (the core install has none): the model fails, the batch goes on."""

    def __init__(self, need: str, *, model: str = "", loc: str | None = None,
                 missing: str = "keras"):
        self.need = need  # what asked for the backend: "action: remove", "--probe", "samples"...
        self.missing = missing  # the module that could not be imported
        super().__init__(f"{need} needs a Keras backend, and none is installed", model=model,
                         loc=loc, hint=KERAS_EXTRAS)

    def for_model(self, model: str) -> BackendMissing:
        return BackendMissing(self.need, model=model, loc=self.loc, missing=self.missing)
