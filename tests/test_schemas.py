"""schemas.conforms: the compiled check may only ever be stricter than jsonschema, never laxer."""
from __future__ import annotations

import copy
import json
import os
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
SCHEMA = Path(__file__).resolve().parent.parent / "schema" / "spec.schema.json"


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


# --- what editors show: titles, defaults, examples ------------------------------------------------

def _subschemas(node: Any, pointer: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(JSON pointer, schema) of every schema object inside `node` (examples not entered)."""
    out = []
    if isinstance(node, dict):
        out.append((pointer, node))
        for key, value in node.items():
            if key in ("examples", "default", "const", "enum"):
                continue
            if key in ("properties", "$defs"):
                for name, sub in value.items():
                    out.extend(_subschemas(sub, f"{pointer}/{key}/{name}"))
            elif isinstance(value, dict):
                out.extend(_subschemas(value, f"{pointer}/{key}"))
            elif isinstance(value, list):
                for i, sub in enumerate(value):
                    out.extend(_subschemas(sub, f"{pointer}/{key}/{i}"))
    return out


def _fields(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every property schema: what an editor hovers over."""
    return [(p, s) for p, s in _subschemas(schema) if "/properties/" in p
            and p.rsplit("/", 2)[-2] == "properties"]


def test_every_spec_field_has_title_description_and_examples() -> None:
    schema = load_schema("spec")
    missing = [f"{p}: {k}" for p, s in _fields(schema) for k in ("title", "description",
                                                                   "examples") if k not in s]
    assert missing == []
    assert len(_fields(schema)) > 50
    assert not [p for p, s in _subschemas(schema) if "not implemented" in s.get("description", "")]


def test_every_schema_example_is_valid_where_it_stands() -> None:
    schema = load_schema("spec")
    bad = []
    for pointer, sub in _subschemas(schema):
        check = jsonschema.Draft202012Validator({**sub, "$defs": schema["$defs"]})
        bad += [f"{pointer}: {example!r}" for example in sub.get("examples", [])
                if not check.is_valid(example)]
    assert bad == []


def test_schema_defaults_are_what_the_plan_fills_in(tmp_path: Path) -> None:
    """Every `default` in the spec schema equals the value the plan writes out when the key is
    left out (a default the test cannot place fails it: add it below)."""
    from kprune_batch.plan import compile_plan
    from kprune_batch.spec import parse_spec

    text = ("version: 1\nmodels:\n  - path: m.keras\n    layers:\n      - name: c\n        rules:\n"
            "          - smallest: {by: l1, fraction: 0.5}\n")
    spec_file = tmp_path / "spec.yaml"
    plan = compile_plan(parse_spec(text, str(spec_file))).to_json()
    (job,) = plan["jobs"]
    (op,) = job["ops"]
    filled = {"/properties/output_dir": os.path.relpath(plan["output_dir"], tmp_path)}
    for key, value in op["options"].items():  # neither defaults nor the entry set it
        filled[f"/$defs/options/properties/{key}"] = value
        filled[f"/$defs/layer/properties/{key}"] = value
    for key, value in job["impact"].items():
        filled[f"/$defs/impact/properties/{key}"] = value
    ranking = op["rules"][0]["params"]
    for key in ("across", "normalize"):
        filled[f"/$defs/ranking/properties/{key}"] = ranking[key]
    defaults = {p: s["default"] for p, s in _subschemas(load_schema("spec")) if "default" in s}
    assert defaults == filled
    assert all(type(defaults[p]) is type(filled[p]) for p in defaults)


# --- check-jsonschema (and so editors: both read YAML 1.2) agree with kprune validate ------------

BASE = """\
version: 1
models:
  - path: m.keras
    layers:
      - name: conv1
        rules:
          - index: [4, 7]
"""
# (name, text, accepted): specs that YAML 1.1 (PyYAML's default) and YAML 1.2 read differently
AGREEMENT = [
    ("negative-exponent", BASE.replace("- index: [4, 7]", "- mean: {below: -4e-3}"), True),
    ("exponent-no-dot", BASE.replace("- index: [4, 7]", "- l1: {above: 1e5}"), True),
    ("fraction-exponent", BASE.replace("version: 1\n", "version: 1\ndefaults: {max_fraction: 5e-1}\n"),
     True),
    ("octal-0o", BASE.replace("[4, 7]", "[0o17]"), True),
    ("version-0o1", BASE.replace("version: 1", "version: 0o1"), True),
    ("layer-named-off", BASE.replace("name: conv1", "name: off"), True),
    ("model-named-a-date", BASE.replace("  - path:", "  - name: 2024-01-01\n    path:"), True),
    ("true-capital", BASE.replace("- name: conv1\n", "- name: conv1\n        allow_empty_layer: True\n"),
     True),
    ("yes", BASE.replace("- name: conv1\n", "- name: conv1\n        allow_empty_layer: yes\n"), False),
    ("on", BASE.replace("- name: conv1\n", "- name: conv1\n        approximate: on\n"), False),
    ("no", BASE.replace("version: 1\n", "version: 1\ndefaults: {allow_empty_layer: no}\n"), False),
    ("sexagesimal", BASE.replace("- name: conv1\n", "- name: conv1\n        round_to: 1:30\n"),
     False),
]
# kprune-only: semantic checks the schema cannot express (check-jsonschema accepts these)
KPRUNE_ONLY = [
    ("infinite-threshold", BASE.replace("- index: [4, 7]", "- mean: {below: .inf}"),
     "7:27: models[0].layers[0].rules[0].mean.below: threshold must be a finite number, got inf"),
]


def _check_jsonschema() -> str:
    import shutil
    import sys

    found = shutil.which("check-jsonschema", path=os.pathsep.join(
        [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if found is None:
        pytest.skip("check-jsonschema is not installed (it is in the test extra)")
    return found


def test_check_jsonschema_and_kprune_validate_agree(tmp_path: Path) -> None:
    import subprocess

    files = {}
    for name, text, _ in AGREEMENT + KPRUNE_ONLY:
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(text)
    # offline: the schema is a local file with a urn: $id and only local $refs; a proxy that
    # refuses every connection makes any fetch an error
    env = dict(os.environ, HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               NO_PROXY="")
    out = subprocess.run([_check_jsonschema(), "--schemafile", str(SCHEMA), "-o", "json",
                          "--verbose", *map(str, files.values())], capture_output=True, text=True, env=env,
                         timeout=120)
    report = json.loads(out.stdout)
    failed = {e["filename"] for e in report["errors"] + report["parse_errors"]}
    assert set(report["successes"]) | failed == {str(f) for f in files.values()}
    theirs = {name: str(files[name]) in report["successes"] for name in files}
    result = kprune("validate", *files.values())
    ours = {name: f"{files[name]}: ok (" in result.stdout for name in files}
    expected = {name: accepted for name, _, accepted in AGREEMENT}
    assert {n: theirs[n] for n in expected} == expected, out.stdout + out.stderr
    assert {n: ours[n] for n in expected} == expected, result.stderr
    for name, _, message in KPRUNE_ONLY:
        assert theirs[name] and not ours[name]
        assert f"{files[name]}:{message}" in result.stderr.splitlines()
