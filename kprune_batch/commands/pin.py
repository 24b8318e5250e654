"""`kprune pin SPEC...`: write each model file's current sha256 into the spec (models[].sha256),
changing nothing else in the file.

The edit is made in the text, at the positions the YAML parser gives for each model's `path`
and `sha256` values: every other byte (comments, key order, flow or block style, quoting,
indentation, line endings, a missing final newline) stays as it was. A round-trip library
(ruamel.yaml) re-emits the whole document and normalises indentation and spacing, which a
reviewer then sees as a diff; the text edit cannot. The edited text is parsed again and must
give the same data apart from the new hashes, or the file is left alone.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

import yaml

from kprune_batch.commands import EXIT_FAILED, EXIT_INVALID, Result
from kprune_batch.errors import SpecError
from kprune_batch.files import NotRegularFile, atomic_write, sha256_file
from kprune_batch.spec import ModelSpec, load_yaml, plain_is_string, read_spec

SHOWN = 12  # hex digits of a hash in pin's lines (the file holds all 64)


class PinError(Exception):
    """The text of one model cannot be edited safely (a merge key, an alias, a block scalar)."""


@dataclass(frozen=True)
class _Edit:
    start: int  # character offsets into the spec's text
    end: int
    text: str


def pin(files: list[str]) -> Result:
    result = Result()
    for file in files:
        _pin_one(file, result)
    return result


def _pin_one(file: str, result: Result) -> None:
    try:
        spec = read_spec(file)
    except SpecError as exc:
        result.err.extend(exc.lines())
        result.return_code = EXIT_INVALID
        return
    target = os.path.realpath(file)  # a spec behind a link: the link stays a link
    with open(target, "rb") as fh:
        raw = fh.read()
    text = raw.decode("utf-8")  # read_spec checked that it is UTF-8
    hashes: dict[str, str] = {}
    errors = len(result.err)
    new: dict[int, str] = {}  # model index -> its file's sha256, where it differs from the spec
    lines: list[str] = []
    for i, model in enumerate(spec.models):
        current = _hash(model, file, result, hashes)
        if current is None or current == model.sha256:
            continue
        new[i] = current
        if model.sha256 is None:
            lines.append(f"{file}: model '{model.name}' pinned: sha256 {current[:SHOWN]}... "
                         f"({model.path_in_spec})")
        else:
            lines.append(f"{file}: model '{model.name}' changed: sha256 "
                         f"{model.sha256[:SHOWN]}... -> {current[:SHOWN]}... "
                         f"({model.path_in_spec}); review its selection")
    if not new:
        if len(result.err) == errors:
            result.out.append(f"{file}: no model changed")
        return
    try:
        edited = _edited(text, new)
    except PinError as exc:
        result.err.append(f"error: {file}: {exc}; nothing was written")
        result.return_code = max(result.return_code, EXIT_FAILED)
        return
    _write(target, edited.encode("utf-8"))
    result.out.extend(lines)


def _hash(model: ModelSpec, file: str, result: Result, cache: dict[str, str]) -> str | None:
    if model.path in cache:
        return cache[model.path]
    problem = None
    try:
        cache[model.path] = sha256_file(model.path)
        return cache[model.path]
    except FileNotFoundError:
        problem = f"input file {model.path} does not exist"
    except NotRegularFile as exc:
        problem = f"input {model.path} is {exc.kind}, not a model file"
    except OSError as exc:
        problem = f"input file {model.path} cannot be read: {exc.strerror}"
    result.err.append(f"error: {file}: model '{model.name}': {problem}; its sha256 is left as "
                      f"it was")
    result.return_code = max(result.return_code, EXIT_FAILED)
    return None


def _edited(text: str, new: dict[int, str]) -> str:
    """`text` with models[i].sha256 set to new[i], every other character kept."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)  # character offsets (libyaml's are bytes)
    models = _value(root, "models")
    assert isinstance(models, yaml.SequenceNode)
    shared = _shared_nodes(root)
    edits = []
    for i, digest in new.items():
        node = models.value[i]
        where = f"models[{i}]"
        if not isinstance(node, yaml.MappingNode) or id(node) in shared:
            raise PinError(f"{where} is written through a YAML alias; add its sha256 by hand")
        edits.append(_edit(text, node, digest, where, shared))
    out = text
    for edit in sorted(edits, key=lambda e: e.start, reverse=True):
        out = out[:edit.start] + edit.text + out[edit.end:]
    _check_same_data(text, out, new)
    return out


def _edit(text: str, node: yaml.MappingNode, digest: str, where: str,
          shared: set[int]) -> _Edit:
    keys = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
    value = _plain_or_quoted(digest)
    if "sha256" in keys:
        old = keys["sha256"][1]
        if id(old) in shared or not isinstance(old, yaml.ScalarNode):
            raise PinError(f"{where}.sha256 is shared through a YAML alias; update it by hand")
        quote = {"'": "'", '"': '"'}.get(old.style or "", "")
        token = f"{quote}{old.value}{quote}"
        end = old.end_mark.index
        if text[end - len(token):end] != token:  # an escape or a line break inside the value
            raise PinError(f"{where}.sha256 is not written as one plain or quoted string")
        return _Edit(end - len(token), end, f"{quote}{digest}{quote}" if quote else value)
    if "path" not in keys:
        raise PinError(f"{where}.path comes from a YAML merge key; add its sha256 by hand")
    key, path = keys["path"]
    if not isinstance(path, yaml.ScalarNode) or path.style in ("|", ">"):
        raise PinError(f"{where}.path is not a one-line string")
    end = path.end_mark.index
    if node.flow_style:  # {name: m, path: m.keras, layers: [...]}
        return _Edit(end, end, f", sha256: {value}")
    # block style: a line of its own right after the path's line, at the path key's column
    newline = text.find("\n", end)
    if newline < 0:  # the path's line is the file's last, without a final newline
        eol = "\r\n" if "\r\n" in text else "\n"
        return _Edit(len(text), len(text), f"{eol}{' ' * key.start_mark.column}sha256: {value}")
    eol = "\r\n" if text[newline - 1:newline] == "\r" else "\n"
    return _Edit(newline + 1, newline + 1, f"{' ' * key.start_mark.column}sha256: {value}{eol}")


def _plain_or_quoted(digest: str) -> str:
    # 64 decimal digits would read as an integer (a chance of 1 in 10^13, but not none), digits
    # around one 'e' as a YAML 1.2 float
    return digest if plain_is_string(digest) else f"'{digest}'"


def _value(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _shared_nodes(root: yaml.Node) -> set[int]:
    """id() of every node reached more than once (an anchor used by an alias or a merge):
    editing its text would change each place that uses it."""
    seen: set[int] = set()
    shared: set[int] = set()
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            shared.add(id(node))
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend((k, v))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return shared


def _check_same_data(before: str, after: str, new: dict[int, str]) -> None:
    """The edited text must mean the old one with the new hashes, and nothing else."""
    old_data, _, _ = load_yaml(before, "")
    new_data, _, problems = load_yaml(after, "")
    for i, digest in new.items():
        old_data["models"][i]["sha256"] = digest
    if problems or new_data != old_data:  # pragma: no cover - a bug in _edit
        raise PinError("the edited spec would not read as the old one with new hashes (a bug: "
                       "please report it with the spec)")


def _write(target: str, data: bytes) -> None:
    mode = stat.S_IMODE(os.stat(target).st_mode)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # the spec keeps its permissions (a new file would take the umask's)

    atomic_write(target, write)
