"""Spec files: safe YAML loading with positions, schema and semantic validation, the typed `Spec`."""
from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from kprune_batch.errors import SpecError, SpecProblem
from kprune_batch.families import FAMILIES, family_of
from kprune_batch.schemas import conforms, load_schema

OPTION_DEFAULTS: dict[str, Any] = {
    "bias": "zero",
    "batchnorm": "neutralize",
    "max_fraction": 0.5,
    "allow_empty_layer": False,
    "action": "zero",
    "coupled": "error",
    "approximate": False,
    "round_to": 1,
}
OPTION_KEYS = tuple(OPTION_DEFAULTS)
DEFAULT_OUTPUT_DIR = "pruned"
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")

_STANDARD_TAGS = {
    "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null", "tag:yaml.org,2002:timestamp",
}


# --- positions ---------------------------------------------------------------------------------

Path_ = tuple  # a JSON path as a tuple of keys (str) and indices (int)


def json_path(parts: Iterable[Any]) -> str:
    """('models', 0, 'layers') -> 'models[0].layers'."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class Positions:
    """1-based (line, col) of every value and every mapping key of a YAML document."""

    values: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    keys: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)  # id() of every node converted
    expanded: int = 0  # values converted again, through an alias

    def of(self, path: Iterable[Any], key: bool = False) -> tuple[int, int]:
        path = tuple(path)
        table = self.keys if key else self.values
        while path:
            if path in table:
                return table[path]
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), (1, 1))


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def load_yaml(text: str, file: str) -> tuple[Any, Positions, list[SpecProblem]]:
    """Parse `text` safely into plain data, positions and the problems found on the way.

    A syntax error or an empty document raises SpecError at once (there is no data to check).

    Plain scalars resolve by the YAML 1.2 core schema, as editors and check-jsonschema read
    them (`yes` is a string, `-4e-3` a number). Only the YAML core tags are accepted (never a
    Python tag: nothing in a spec can execute).
    Duplicate keys, which PyYAML would silently collapse, are errors.
    """
    try:
        with _gc_paused():
            root, loader = _compose(text)
    except _TooDeep as exc:
        line, col = _mark(exc.node)
        raise SpecError(file, [SpecProblem(line, col, "", f"YAML nesting is deeper than "
                                                          f"{MAX_DEPTH} levels", file)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or "syntax error"
        if exc.context:
            what = f"{exc.context}, {what}"
        raise SpecError(file, [SpecProblem(line, col, "", f"YAML syntax error: {what}",
                                           file)]) from None
    except yaml.YAMLError as exc:
        line, col = _reader_position(text, exc)
        message = str(getattr(exc, "reason", "") or exc).splitlines()[0]
        if isinstance(exc, yaml.reader.ReaderError):
            message = f"unacceptable character #x{exc.character:04x} (special characters are " \
                      f"not allowed)"
        raise SpecError(file, [SpecProblem(line, col, "", f"YAML error: {message}", file)]) from None
    if root is None:
        raise SpecError(file, [SpecProblem(1, 1, "", "the spec file is empty", file)])
    problems: list[SpecProblem] = []
    positions = Positions()
    with _gc_paused():
        data = _convert(root, (), loader, positions, problems, file, ())
    positions.seen.clear()  # only the conversion needs it (a large spec: ~10^5 ids)
    return data, positions, problems


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Building a large tree of new objects triggers the cyclic collector again and again, each
    pass over every object made so far (a 20,000-model spec: 3.7 s of 4.5 s); nothing here
    needs it, so it waits until the tree is built."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- YAML 1.2 core schema -------------------------------------------------------------------------
# PyYAML resolves plain scalars by YAML 1.1 rules (yes/no/on/off are booleans, 1e5 is a string, 017
# is octal, 1:30 is sexagesimal); yaml-language-server and check-jsonschema read YAML 1.2, so an
# editor showed `below: -4e-3` as valid and kprune refused it. Specs are read by the 1.2 core schema
# (yaml.org/spec/1.2.2, 10.3.2), with PyYAML's parser and its marks (positions) kept. One
# extension, as PyYAML and ruamel.yaml have it: '<<' merge keys.

_CORE_RESOLVERS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), "~nN"),
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), "tTfF"),
    ("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
     "-+0123456789"),
    ("tag:yaml.org,2002:float", re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), "-+.0123456789"),
    ("tag:yaml.org,2002:merge", re.compile(r"^<<$"), "<"),
)
_CORE = {tag: pattern for tag, pattern, _ in _CORE_RESOLVERS}


class _CoreResolver(yaml.resolver.BaseResolver):
    """Plain scalars resolve by the YAML 1.2 core schema (everything else is a string)."""


for _tag, _pattern, _first in _CORE_RESOLVERS:
    _CoreResolver.add_implicit_resolver(_tag, _pattern, list(_first) + ([""] if _tag.endswith(
        ":null") else []))


def _core_int(_loader: Any, node: yaml.ScalarNode) -> int:
    text = node.value
    if not _CORE["tag:yaml.org,2002:int"].match(text):  # an explicit !!int on another text
        raise ValueError("not a YAML 1.2 integer: decimal digits, 0o octal or 0x hex")
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)  # 017 is 17: the 1.2 core schema has no C-style octal


def _core_float(_loader: Any, node: yaml.ScalarNode) -> float:
    text = node.value
    if not (_CORE["tag:yaml.org,2002:float"].match(text)
            or _CORE["tag:yaml.org,2002:int"].match(text)):
        raise ValueError("not a YAML 1.2 float")
    if text.lstrip("-+").lower() in (".inf", ".nan"):
        return float(text.replace(".", "", 1))
    return float(_core_int(_loader, node)) if text.startswith(("0o", "0x")) else float(text)


def _core_bool(_loader: Any, node: yaml.ScalarNode) -> bool:
    if not _CORE["tag:yaml.org,2002:bool"].match(node.value):
        raise ValueError("not a YAML 1.2 boolean: true or false")
    return node.value.lower() == "true"


class _CoreConstructor(yaml.constructor.SafeConstructor):
    """SafeConstructor with the 1.2 core schema's int, float and bool (null is the same)."""


for _tag, _construct in (("int", _core_int), ("float", _core_float), ("bool", _core_bool)):
    _CoreConstructor.add_constructor(f"tag:yaml.org,2002:{_tag}", _construct)


class _CoreLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser,
                  yaml.composer.Composer, _CoreConstructor, _CoreResolver):
    def __init__(self, stream: str):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _CoreConstructor.__init__(self)
        _CoreResolver.__init__(self)


try:  # libyaml's parser: ~13x PyYAML's on a large spec
    from yaml.cyaml import CParser as _CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _CParser = None
_CLoader: Any = None
if _CParser is not None:
    class _CoreCLoader(_CParser, _CoreConstructor, _CoreResolver):  # type: ignore[misc, valid-type]
        def __init__(self, stream: str):
            _CParser.__init__(self, stream)
            _CoreConstructor.__init__(self)
            _CoreResolver.__init__(self)

    _CLoader = _CoreCLoader


def plain_is_string(text: str) -> bool:
    """Whether `text`, written as a plain (unquoted) YAML scalar, reads back as that string."""
    return _CoreResolver().resolve(yaml.ScalarNode, text, (True, False)) == _STR


class _TooDeep(Exception):
    def __init__(self, node: yaml.Node):
        self.node = node


def _compose(text: str) -> tuple[yaml.Node | None, Any]:
    """(root node, the loader that made it) of the single document in `text`.

    Events come from libyaml where it is installed (a 20,000-model spec: ~1 s instead of ~15 s
    of pure-Python parsing); an error is worded by PyYAML's own parser, which reads the text
    again (errors are rare and this keeps every message as PyYAML words it), as is text with
    characters PyYAML's reader refuses. Nodes are composed without recursion (PyYAML's composer
    recurses per level: a few hundred nested brackets were a RecursionError) and no deeper than
    MAX_DEPTH.
    """
    if _CLoader is not None and not yaml.reader.Reader.NON_PRINTABLE.search(text):
        loader = _CLoader(text)
        try:
            return _compose_events(loader), loader
        except yaml.YAMLError:
            pass  # read again below, for PyYAML's wording of the error
        finally:
            loader.dispose()
    loader = _CoreLoader(text)  # the reader rejects control characters right here
    try:
        return _compose_events(loader), loader
    finally:
        loader.dispose()


def _compose_events(loader: Any) -> yaml.Node | None:
    """What yaml.composer.Composer.get_single_node builds (same nodes, tags, anchors and
    errors), with an explicit stack instead of recursion."""
    get = loader.get_event
    get()  # StreamStart
    if loader.check_event(yaml.StreamEndEvent):
        get()
        return None
    get()  # DocumentStart
    anchors: dict[str, yaml.Node] = {}
    stack: list[Any] = []  # the open collections
    keys: list[Any] = []  # per open collection: a mapping's key waiting for its value
    root: yaml.Node | None = None
    resolved: dict[tuple[str, Any], str] = {}
    scalar_event, alias_event = yaml.ScalarEvent, yaml.AliasEvent
    ends = (yaml.SequenceEndEvent, yaml.MappingEndEvent)
    kinds = {yaml.SequenceStartEvent: yaml.SequenceNode, yaml.MappingStartEvent: yaml.MappingNode}
    ScalarNode, SequenceNode = yaml.ScalarNode, yaml.SequenceNode
    while root is None or stack:
        event = get()
        cls = event.__class__
        if cls in ends:
            stack.pop().end_mark = event.end_mark
            keys.pop()
            continue
        if cls is alias_event:
            if event.anchor not in anchors:
                raise yaml.composer.ComposerError(None, None, f"found undefined alias "
                                                  f"{event.anchor!r}", event.start_mark)
            node = anchors[event.anchor]
        else:
            anchor = event.anchor
            if anchor is not None and anchor in anchors:
                raise yaml.composer.ComposerError(
                    f"found duplicate anchor {anchor!r}; first occurrence",
                    anchors[anchor].start_mark, "second occurrence", event.start_mark)
            tag = event.tag
            if cls is scalar_event:
                if tag is None or tag == "!":  # the same keys recur in every model: resolve once
                    key = (event.value, event.implicit)
                    tag = resolved.get(key)
                    if tag is None:
                        tag = resolved[key] = loader.resolve(ScalarNode, event.value,
                                                             event.implicit)
                node = ScalarNode(tag, event.value, event.start_mark, event.end_mark,
                                  style=event.style)
            else:
                kind = kinds[cls]
                if tag is None or tag == "!":
                    tag = loader.resolve(kind, None, event.implicit)
                node = kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
            if anchor is not None:
                anchors[anchor] = node
        # attach the node to the open collection (or make it the root)
        if not stack:
            root = node
        elif stack[-1].__class__ is SequenceNode:
            stack[-1].value.append(node)
        elif keys[-1] is None:
            keys[-1] = node
        else:
            stack[-1].value.append((keys[-1], node))
            keys[-1] = None
        if cls is not scalar_event and cls is not alias_event:
            if len(stack) >= MAX_DEPTH:
                raise _TooDeep(node)
            stack.append(node)
            keys.append(None)
    get()  # DocumentEnd
    if not loader.check_event(yaml.StreamEndEvent):
        event = get()
        raise yaml.composer.ComposerError("expected a single document in the stream",
                                          root.start_mark, "but found another document",
                                          event.start_mark)
    get()
    return root


def _reader_position(text: str, exc: yaml.YAMLError) -> tuple[int, int]:
    position = getattr(exc, "position", None)
    if not isinstance(position, int):
        return 1, 1
    before = text[:position]
    return before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1


MAX_DEPTH = 64  # far deeper than any spec; stops self-referencing aliases
# Values that aliases add beyond their first occurrence (a spec's own values are not counted: a
# 20,000-model spec is large, not a bomb); stops "billion laughs" alias expansion.
MAX_EXPANDED = 100_000


def _convert(node: yaml.Node, path: tuple, loader: yaml.SafeLoader, positions: Positions,
             problems: list[SpecProblem], file: str, ancestors: tuple[int, ...],
             repeat: bool = False) -> Any:
    positions.values[path] = _mark(node)
    if id(node) in ancestors or len(ancestors) > MAX_DEPTH:
        line, col = _mark(node)
        problems.append(SpecProblem(line, col, json_path(path),
                                    "YAML alias refers to itself (or nesting is too deep)", file))
        return None
    ancestors = ancestors + (id(node),)
    # a node converted before is reached again through an alias (or a '<<' merge): it and
    # everything below it are expansion
    repeat = repeat or id(node) in positions.seen
    positions.seen.add(id(node))
    if repeat:
        positions.expanded += 1
        if positions.expanded > MAX_EXPANDED:
            if positions.expanded == MAX_EXPANDED + 1:
                line, col = _mark(node)
                problems.append(SpecProblem(
                    line, col, json_path(path), f"following its aliases, the document expands "
                    f"to more than {MAX_EXPANDED} values (an alias bomb?)", file))
            return None
    if node.tag not in _STANDARD_TAGS:
        line, col = _mark(node)
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        problems.append(SpecProblem(line, col, json_path(path),
                                    f"unsupported YAML tag '{tag}': spec files may use only "
                                    f"plain YAML (kprune never constructs objects from tags)", file))
        return None
    if isinstance(node, yaml.MappingNode):
        try:
            loader.flatten_mapping(node)  # resolves '<<' merge keys like SafeLoader does
        except yaml.MarkedYAMLError as exc:
            line, col = _mark(node)
            problems.append(SpecProblem(line, col, json_path(path), f"YAML error: {exc.problem}", file))
            return None
        out: dict[Any, Any] = {}
        first_seen: dict[Any, tuple[int, int]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _STANDARD_TAGS:
                line, col = _mark(key_node)
                problems.append(SpecProblem(line, col, json_path(path),
                                            "mapping keys must be plain scalars", file))
                continue
            key = _scalar(key_node, loader, path, problems, file)
            key = key if isinstance(key, str) else str(key)
            if key in first_seen:
                line, col = _mark(key_node)
                problems.append(SpecProblem(line, col, json_path(path + (key,)),
                                            f"duplicate key '{key}' (first given at line "
                                            f"{first_seen[key][0]})", file))
                continue
            first_seen[key] = _mark(key_node)
            positions.keys[path + (key,)] = _mark(key_node)
            out[key] = _convert(value_node, path + (key,), loader, positions, problems, file,
                                ancestors, repeat)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(child, path + (i,), loader, positions, problems, file, ancestors, repeat)
                for i, child in enumerate(node.value)]
    return _scalar(node, loader, path, problems, file)


_STR = "tag:yaml.org,2002:str"


def _scalar(node: yaml.Node, loader: yaml.SafeLoader, path: tuple, problems: list[SpecProblem],
            file: str) -> Any:
    if node.tag == _STR:  # what SafeConstructor.construct_yaml_str returns, without its calls
        return node.value
    try:
        return loader.construct_object(node)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        line, col = _mark(node)
        why = str(exc) if str(exc).startswith("not a YAML 1.2") else type(exc).__name__
        problems.append(SpecProblem(line, col, json_path(path),
                                    f"invalid YAML value {node.value!r} ({why})", file))
        return None


# --- the typed spec ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    kind: str
    params: Any  # plain JSON data: a list for index, a mapping otherwise
    loc: str
    line: int
    col: int


@dataclass(frozen=True)
class LayerEntry:
    loc: str
    line: int
    col: int
    name: str | None
    match: str | None
    type: str | None
    options: tuple[tuple[str, Any], ...]  # only the options this entry sets itself
    rules: tuple[RuleSpec, ...]


@dataclass(frozen=True)
class ModelSpec:
    loc: str
    line: int
    col: int
    name: str
    path: str  # absolute, resolved against the spec's folder
    output: str | None  # as written (relative to output_dir), None for the default
    layers: tuple[LayerEntry, ...]
    samples: str | None = None  # absolute, resolved against the spec's folder
    # effective impact guards: the model's own keys over defaults.impact (None: switched off)
    impact: tuple[tuple[str, Any], ...] = ()
    sha256: str | None = None  # models[].sha256 (lower case): the file the spec was written for
    path_in_spec: str = ""  # `path` as written, for messages about the file


@dataclass(frozen=True)
class Spec:
    file: str  # as given on the command line
    folder: str  # absolute folder of the spec file: relative paths start here
    sha256: str
    version: int
    output_dir: str  # absolute
    defaults: tuple[tuple[str, Any], ...]  # every option, defaults written out
    models: tuple[ModelSpec, ...]
    positions: Positions = field(compare=False, repr=False)

    def output_path(self, model: ModelSpec, output_dir: str | None = None) -> str:
        base = output_dir if output_dir is not None else self.output_dir
        rel = model.output if model.output is not None else os.path.basename(model.path)
        return os.path.normpath(os.path.join(base, rel))


STDIN = "-"  # the command-line argument that means: read the spec from standard input
STDIN_NAME = "<stdin>"  # how such a spec is named in messages (Spec.file)


def read_spec(file: str | os.PathLike[str]) -> Spec:
    """Read, parse and validate a spec file; raise SpecError with every problem found."""
    file = str(file)
    try:
        # a regular file only, read no further than its size: a FIFO or /dev/zero given as a
        # spec (a git hook runs validate unattended) must not hang
        from kprune_batch.files import read_regular

        raw = read_regular(file)
    except OSError as exc:
        raise SpecError(file, [SpecProblem(0, 0, "", f"cannot read spec file: {exc.strerror}",
                                           file)]) from None
    return _parse_bytes(raw, file)


def read_spec_arg(arg: str) -> Spec:
    """read_spec, where '-' reads the spec from standard input (named STDIN_NAME in messages;
    its relative paths start in the current directory)."""
    if arg != STDIN:
        return read_spec(arg)
    import sys

    return _parse_bytes(sys.stdin.buffer.read(), STDIN_NAME)


def _parse_bytes(raw: bytes, file: str) -> Spec:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(file, [SpecProblem(1, 1, "", f"the spec file is not UTF-8 text ({exc.reason})",
                                           file)]) from None
    return parse_spec(text, file, sha256=hashlib.sha256(raw).hexdigest())


def parse_spec(text: str, file: str, sha256: str | None = None) -> Spec:
    """Validate spec text that was read from `file` (used for relative paths and messages)."""
    data, positions, problems = load_yaml(text, file)
    problems += schema_problems(data, positions, file)
    if not problems:
        problems = semantic_problems(data, positions, file)
    if problems:
        raise SpecError(file, problems)
    return _build(data, positions, file, sha256 or hashlib.sha256(text.encode()).hexdigest())


def schema_problems(data: Any, positions: Positions, file: str) -> list[SpecProblem]:
    """Every schema violation of `data`, as positioned problems with readable messages."""
    if conforms("spec", data):
        return []  # the usual case, without importing jsonschema (~40 ms)
    import jsonschema  # deferred: keeps `import kprune_batch.spec` cheap for tools that only read specs

    schema = load_schema("spec")
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for count, error in enumerate(validator.iter_errors(data)):
        if count == MAX_SCHEMA_ERRORS:  # 10^6 wrong values: ~25 s just to list them
            problems.append(SpecProblem(0, 0, "", f"checking stopped after {MAX_SCHEMA_ERRORS} "
                                                  f"schema errors", file))
            break
        problems.extend(_explain(error, positions, file))
    return sorted(set(problems))


MAX_SCHEMA_ERRORS = 1000


def _explain(error: Any, positions: Positions, file: str) -> list[SpecProblem]:
    path = tuple(error.absolute_path)
    sub = error.schema if isinstance(error.schema, dict) else {}
    kind = error.validator

    def at(p: tuple, message: str, key: bool = False) -> SpecProblem:
        line, col = positions.of(p, key=key)
        return SpecProblem(line, col, json_path(p), message, file)

    if kind == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(sub.get("properties", {}))
        out = []
        for key in error.instance:
            if key in allowed:
                continue
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f" (allowed: {', '.join(allowed)})"
            out.append(at(path + (key,), f"unknown key '{key}'{extra}", key=True))
        return out
    if kind == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return [at(path + (k,), "required key is missing") for k in missing] or [at(path, error.message)]
    if kind == "oneOf" and "x-message-oneOf" in sub:
        return [at(path, sub["x-message-oneOf"])]
    if kind in ("minProperties", "maxProperties") and "x-message-count" in sub:
        return [at(path, sub["x-message-count"])]
    if kind in ("const", "pattern") and "x-message" in sub:
        return [at(path, f"{error.instance!r} {sub['x-message']}")]
    if kind == "minItems" and error.validator_value == 1:
        return [at(path, "must not be empty")]
    return [at(path, error.message)]


def semantic_problems(data: dict[str, Any], positions: Positions, file: str) -> list[SpecProblem]:
    """Checks the schema cannot express (data is schema-valid); no model file is opened."""
    problems: list[SpecProblem] = []

    def add(path: tuple, message: str, key: bool = False) -> None:
        line, col = positions.of(path, key=key)
        problems.append(SpecProblem(line, col, json_path(path), message, file))

    def finite_fraction(path: tuple, options: dict[str, Any]) -> None:
        # NaN passes jsonschema's minimum/maximum (every comparison is false) and would make the
        # max_fraction guard `count > nan * total` never fire: the cap would be silently off.
        value = options.get("max_fraction")
        if value is not None and not math.isfinite(float(value)):
            add(path + ("max_fraction",),
                f"max_fraction must be a number from 0 to 1, got {value!r}")

    finite_fraction(("defaults",), data.get("defaults") or {})
    problems.extend(_impact_problems(data, positions, file))
    for i, model in enumerate(data["models"]):
        for j, entry in enumerate(model["layers"]):
            finite_fraction(("models", i, "layers", j), entry)
            cls = entry.get("type")
            if cls is not None and family_of(cls) is None:
                add(("models", i, "layers", j, "type"),
                    f"type '{cls}' is not a convolution layer class; filters exist only in: "
                    f"{', '.join(c for fam in FAMILIES for c in fam.classes)}")
            for k, rule in enumerate(entry["rules"]):
                (kind, params), = rule.items()
                rpath = ("models", i, "layers", j, "rules", k, kind)
                if isinstance(params, dict):
                    for bound in ("below", "above"):
                        if bound in params and not math.isfinite(float(params[bound])):
                            add(rpath + (bound,),
                                f"threshold must be a finite number, got {params[bound]!r}")
                    # NaN passes the schema's bounds (every comparison is false)
                    fraction = params.get("fraction")
                    if fraction is not None and not 0 < float(fraction) <= 1:
                        add(rpath + ("fraction",),
                            f"fraction must be a number greater than 0 and at most 1, got "
                            f"{fraction!r}")
                if kind in ("smallest", "largest") and "normalize" in params \
                        and params.get("across", "layer") != "entry":
                    # a layer ranked on its own keeps its order under any normalisation: the
                    # user most likely meant one ranking across the entry's layers
                    add(rpath + ("normalize",),
                        "normalize applies only to one ranking across layers (across: entry); "
                        "add 'across: entry' or remove 'normalize'", key=True)
                if kind == "sign" and cls is not None and family_of(cls) is not None:
                    axes = family_of(cls).slice_axes(cls)  # type: ignore[union-attr]
                    if axes is not None and len(params["element"]) != axes:
                        add(rpath + ("element",),
                            f"a {cls} filter slice has {axes} axes, but element has "
                            f"{len(params['element'])} number(s)")
    problems.extend(_path_problems(data, positions, file))
    return problems


IMPACT_GUARDS = ("max_relative_diff", "min_agreement", "max_accuracy_drop")


def _impact_problems(data: dict[str, Any], positions: Positions, file: str) -> list[SpecProblem]:
    """Impact guards and data statistics need `samples`: a guard left set (after defaults.impact,
    key by key) or a rule using apoz/activation_mean on a model without samples is an error."""
    from kprune_batch.rule_kinds import DATA_KINDS

    problems: list[SpecProblem] = []

    def add(path: tuple, message: str) -> None:
        line, col = positions.of(path)
        problems.append(SpecProblem(line, col, json_path(path), message, file))

    defaults = (data.get("defaults") or {}).get("impact") or {}
    for where, guards in [(("defaults", "impact"), defaults)] + [
            (("models", i, "impact"), m.get("impact") or {}) for i, m in enumerate(data["models"])]:
        for key, value in guards.items():
            if value is not None and not math.isfinite(float(value)):  # NaN passes the schema
                add(where + (key,), f"{key} must be a finite number, got {value!r}")
    for i, model in enumerate(data["models"]):
        if "samples" in model:
            continue
        own = model.get("impact") or {}
        effective = {**defaults, **own}
        set_ = [k for k in IMPACT_GUARDS if effective.get(k) is not None]
        if set_:
            where = ("models", i, "impact") if any(own.get(k) is not None for k in set_) \
                else ("models", i)
            origin = "" if where[-1] == "impact" else " (from defaults.impact)"
            add(where, f"impact guard(s) {', '.join(set_)}{origin} need the model's samples, "
                       f"but it has none: give 'samples' (a .npy or .npz file), or set the "
                       f"guard to null for this model")
        for j, entry in enumerate(model["layers"]):
            for k, rule in enumerate(entry["rules"]):
                (kind, params), = rule.items()
                stat = kind if kind in DATA_KINDS else (
                    params.get("by") if isinstance(params, dict) else None)
                if stat in DATA_KINDS:
                    add(("models", i, "layers", j, "rules", k, kind),
                        f"{stat} is measured on the model's samples, but it has none: give "
                        f"'samples' (a .npy or .npz file) or rank by a kernel statistic")
    return problems


def _spec_folder(file: str) -> str:
    if file == STDIN_NAME:  # no folder of its own: relative paths start where kprune runs
        return os.getcwd()
    return os.path.dirname(os.path.abspath(file))


def model_name(model: dict[str, Any]) -> str:
    return model.get("name") or Path(model["path"]).stem


def _path_problems(data: dict[str, Any], positions: Positions, file: str,
                   output_dir: str | None = None) -> list[SpecProblem]:
    """Duplicate model names, two models writing one output, an output that is an input."""
    folder = _spec_folder(file)
    out_dir = output_dir or os.path.join(folder, data.get("output_dir", DEFAULT_OUTPUT_DIR))
    problems: list[SpecProblem] = []

    def add(path: tuple, message: str) -> None:
        line, col = positions.of(path)
        problems.append(SpecProblem(line, col, json_path(path), message, file))

    names: dict[str, int] = {}
    outputs: dict[str, int] = {}
    inputs = {os.path.realpath(os.path.join(folder, m["path"])): i
              for i, m in enumerate(data["models"])}
    for i, model in enumerate(data["models"]):
        name = model_name(model)
        if name in names:
            where = ("name",) if "name" in model else ("path",)
            add(("models", i) + where,
                f"model name '{name}' is already used by models[{names[name]}]; give each model "
                f"a unique 'name'")
        names.setdefault(name, i)
        rel = model.get("output", os.path.basename(model["path"]))
        where = ("output",) if "output" in model else ("path",)
        if not _inside_output_dir(rel):
            add(("models", i) + where,
                f"output '{rel}' is outside output_dir: give a path relative to output_dir, "
                f"without '..'")
            continue
        # where Spec.output_path puts it: a link at the output's own name is replaced by the
        # rename, never written through; a link among its folders would put the file elsewhere
        real_dir = os.path.realpath(out_dir)
        parent, base = os.path.split(os.path.normpath(os.path.join(out_dir, rel)))
        landing = os.path.join(os.path.realpath(parent), base)
        if os.path.commonpath([real_dir, landing]) != real_dir:
            add(("models", i) + where,
                f"output '{rel}' resolves to {landing}, outside output_dir "
                f"{os.path.normpath(out_dir)} (a link in the output folder)")
            continue
        target = os.path.realpath(os.path.join(out_dir, rel))
        if target in outputs:
            add(("models", i) + where,
                f"output {target} is already written by models[{outputs[target]}]; give one of "
                f"them another 'output'")
        outputs.setdefault(target, i)
        if target in inputs:
            add(("models", i) + where,
                f"output {target} is the input file of models[{inputs[target]}]; kprune never "
                f"overwrites an input: choose another output_dir or output")
    return problems


def _inside_output_dir(rel: str) -> bool:
    """Whether an `output` names a file below output_dir (the run locks that folder and only
    that folder: an absolute path or a '..' would write where another run may be writing)."""
    norm = os.path.normpath(rel)
    return not (os.path.isabs(rel) or norm == os.curdir or norm == os.pardir
                or norm.startswith(os.pardir + os.sep))


def check_output_dir(spec: Spec, output_dir: str) -> None:
    """Re-run the output checks for an --output-dir given on the command line."""
    problems = _path_problems(spec_data(spec), spec.positions, spec.file, output_dir=output_dir)
    if problems:
        raise SpecError(spec.file, problems)


def spec_data(spec: Spec) -> dict[str, Any]:
    """The parts of a Spec that the path checks need, as plain data."""
    return {"models": [{"name": m.name, "path": m.path,
                        **({"output": m.output} if m.output is not None else {})}
                       for m in spec.models]}


def _build(data: dict[str, Any], positions: Positions, file: str, sha256: str) -> Spec:
    folder = _spec_folder(file)
    defaults = dict(OPTION_DEFAULTS)
    defaults.update(data.get("defaults") or {})
    impact_defaults = defaults.pop("impact", None) or {}
    models = []
    for i, model in enumerate(data["models"]):
        layers = []
        for j, entry in enumerate(model["layers"]):
            rules = []
            for k, rule in enumerate(entry["rules"]):
                (kind, params), = rule.items()
                rpath = ("models", i, "layers", j, "rules", k)
                line, col = positions.of(rpath)
                rules.append(RuleSpec(kind, params, json_path(rpath), line, col))
            lpath = ("models", i, "layers", j)
            line, col = positions.of(lpath)
            layers.append(LayerEntry(
                loc=json_path(lpath), line=line, col=col, name=entry.get("name"),
                match=entry.get("match"), type=entry.get("type"),
                options=tuple((k, entry[k]) for k in OPTION_KEYS if k in entry),
                rules=tuple(rules)))
        mpath = ("models", i)
        line, col = positions.of(mpath)
        models.append(ModelSpec(
            loc=json_path(mpath), line=line, col=col, name=model_name(model),
            samples=(os.path.normpath(os.path.join(folder, model["samples"]))
                     if "samples" in model else None),
            impact=tuple(sorted({**impact_defaults, **(model.get("impact") or {})}.items())),
            path=os.path.normpath(os.path.join(folder, model["path"])),
            output=model.get("output"), layers=tuple(layers),
            sha256=model["sha256"].lower() if "sha256" in model else None,
            path_in_spec=model["path"]))
    return Spec(file=file, folder=folder, sha256=sha256, version=int(data["version"]),
                output_dir=os.path.normpath(os.path.join(folder, data.get("output_dir",
                                                                          DEFAULT_OUTPUT_DIR))),
                defaults=tuple(defaults.items()), models=tuple(models), positions=positions)
