"""schemas.conforms: the compiled check may only ever be stricter than jsonschema, never laxer."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import kprune
from kprune_batch.schemas import conforms, load_schema

EXAMPLE = Path(__file__).resolve().parent.parent / "specs" / "examples" / "digits.yaml"


@pytest.fixture(scope="session")
def example_log(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real audit log: the bundled example run by the direct backend."""
    folder = tmp_path_factory.mktemp("example")
    kprune("apply", str(EXAMPLE), "--output-dir", str(folder / "out"), "--backend", "direct",
           "--audit-log", str(folder / "log.json")).expect(0)
    return json.loads((folder / "log.json").read_text())


values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(allow_nan=True),
              st.text(max_size=6), st.sampled_from(["", "zero", "keep", "remove", "ok", "a.keras",
                                                    "a.keras\n", "Conv2D", "l1", "union"])),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6)


def _nodes(node: Any, path: tuple = ()) -> list[tuple]:
    """Every JSON path inside `node` (containers included)."""
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _nodes(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _nodes(value, path + (i,))
    return out


def _mutate(doc: Any, data: st.DataObject) -> Any:
    """`doc` with a few random edits: a value replaced, a key deleted or a key added."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_nodes(doc)))
        if not path:
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["bias", "action", "name", "x", "filter", "status"]))] \
                = data.draw(values)
    return doc


def _agrees(name: str, doc: Any) -> None:
    fast = conforms(name, doc)
    full = jsonschema.Draft202012Validator(load_schema(name)).is_valid(doc)
    assert not fast or full, f"compiled check passed what jsonschema fails: {doc!r}"


def test_both_pass_the_real_documents(example_log: dict[str, Any]) -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    assert conforms("spec", spec) and conforms("audit", example_log)
    jsonschema.validate(spec, load_schema("spec"))
    jsonschema.validate(example_log, load_schema("audit"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_compiled_spec_check_is_never_laxer(data: st.DataObject) -> None:
    _agrees("spec", _mutate(yaml.safe_load(EXAMPLE.read_text()), data))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_compiled_audit_check_is_never_laxer(example_log: dict[str, Any],
                                             data: st.DataObject) -> None:
    _agrees("audit", _mutate(example_log, data))


def test_where_they_differ_the_compiled_check_is_the_stricter() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["models"][0]["path"] = "digits.keras\n"  # Python's `$` matches before a final newline,
    jsonschema.validate(doc, load_schema("spec"))  # ECMA-262's (the compiled check) does not
    assert not conforms("spec", doc)


def test_a_document_it_cannot_read_is_not_passed() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc[3] = "x"  # YAML allows integer keys; the compiled check raises on them
    assert not conforms("spec", doc)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_value_in_a_nullable_string_fails_the_log(example_log: dict[str, Any],
                                                               value: float) -> None:
    """jsonschema-rs before 0.49 passed NaN/inf where a string or null is required."""
    from kprune_batch.audit import validate_log

    log = copy.deepcopy(example_log)
    log["models"][0]["error"] = value
    assert not conforms("audit", log)
    assert validate_log(log) == [f"models[0].error: {value!r} is not of type 'string', 'null'"]
