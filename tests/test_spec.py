"""Spec parsing and validation: positions, every error at once, semantic checks, no TensorFlow."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kprune, write_spec
from kprune_batch.errors import SpecError
from kprune_batch.spec import load_yaml, read_spec

VALID = """\
version: 1
models:
  - path: models/digits.keras
    layers:
      - name: conv1
        rules:
          - index: [4, 7]
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    spec = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        read_spec(spec)
    prefix = f"{spec}:"
    return [p.render().replace(prefix, "") for p in info.value.problems]


def test_valid_spec_fills_every_default(tmp_path: Path) -> None:
    spec = read_spec(write_spec(tmp_path, VALID))
    assert dict(spec.defaults) == {"bias": "zero", "batchnorm": "neutralize", "max_fraction": 0.5,
                                   "allow_empty_layer": False, "action": "zero",
                                   "coupled": "error", "approximate": False, "round_to": 1}
    assert spec.output_dir == str(tmp_path / "pruned")
    (model,) = spec.models
    assert model.name == "digits"
    assert model.path == str(tmp_path / "models" / "digits.keras")
    assert model.layers[0].rules[0].loc == "models[0].layers[0].rules[0]"
    assert (model.layers[0].rules[0].line, model.layers[0].rules[0].col) == (7, 13)


def test_paths_are_relative_to_the_spec_not_the_cwd(tmp_path: Path, monkeypatch) -> None:
    sub = tmp_path / "specs"
    sub.mkdir()
    spec_file = write_spec(sub, VALID)
    monkeypatch.chdir(tmp_path)
    spec = read_spec(os.path.relpath(spec_file))
    assert spec.models[0].path == str(sub / "models" / "digits.keras")
    assert spec.output_dir == str(sub / "pruned")


def test_all_errors_of_a_file_at_once_sorted_by_position(tmp_path: Path) -> None:
    text = """\
    version: 2
    defaults:
      bais: zero
      batchnorm: neutralise
    models:
      - path: m.keras
        layers:
          - name: conv1
            match: x
            rules:
              - mean: {below: low}
              - l2: {below: 1, above: 2}
              - sign: {element: [0, 0], zero: neg}
              - foo: 1
    """
    assert problems(tmp_path, text) == [
        "1:10: version: 2 must be the integer 1 (the only spec language version this kprune knows)",
        "3:3: defaults.bais: unknown key 'bais'; did you mean 'bias'?",
        "4:14: defaults.batchnorm: 'neutralise' is not one of ['neutralize', "
        "'neutralize_concat', 'keep']",
        "8:9: models[0].layers[0]: give exactly one of 'name' or 'match'",
        "11:27: models[0].layers[0].rules[0].mean.below: 'low' is not of type 'number'",
        "12:17: models[0].layers[0].rules[1].l2: give exactly one of 'below' or 'above'",
        "13:43: models[0].layers[0].rules[2].sign.zero: 'neg' is not one of ['negative', "
        "'positive', 'zero', 'nonnegative', 'nonpositive']",
        "14:13: models[0].layers[0].rules[3].foo: unknown key 'foo' (allowed: abs_mean, "
        "activation_mean, apoz, bn_gamma, index, l1, l2, largest, mean, sign, smallest)",
    ]


@pytest.mark.parametrize("text, expected", [
    ("", ["1:1: the spec file is empty"]),
    ("- a\n- b\n", ["1:1: 'a mapping' expected"]),
    ("version: 1\nmodels: [\n", None),
    ("models: []\n", ["1:1: version: required key is missing",
                      "1:9: models: must not be empty"]),
    ("version: 1\nversion: 1\nmodels: []\n", None),
])
def test_structural_errors(tmp_path: Path, text: str, expected: list[str] | None) -> None:
    found = problems(tmp_path, text)
    if text.startswith("- a"):
        assert found == ["1:1: ['a', 'b'] is not of type 'object'"]
    elif text.startswith("version: 1\nmodels: ["):
        assert len(found) == 1 and found[0].startswith("3:1: YAML syntax error: ")
    elif text.startswith("version: 1\nversion"):
        assert found[0] == "2:1: version: duplicate key 'version' (first given at line 1)"
    else:
        assert found == expected


def test_python_tags_are_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = VALID + f'extra: !!python/object/apply:os.system ["touch {marker}"]\n'
    found = problems(tmp_path, text)
    assert "8:8: extra: unsupported YAML tag '!!python/object/apply:os.system': spec files may use " \
           "only plain YAML (kprune never constructs objects from tags)" in found
    assert not marker.exists()


@pytest.mark.parametrize("threshold", [".nan", ".inf", "-.inf"])
def test_non_finite_thresholds_are_invalid(tmp_path: Path, threshold: str) -> None:
    text = VALID.replace("- index: [4, 7]", f"- mean: {{below: {threshold}}}")
    (found,) = problems(tmp_path, text)
    assert found.startswith("7:27: models[0].layers[0].rules[0].mean.below: threshold must be a "
                            "finite number, got ")


@pytest.mark.parametrize("old, new, expected", [
    ("version: 1\n", "version: 1\ndefaults: {max_fraction: .nan}\n",
     "2:26: defaults.max_fraction: max_fraction must be a number from 0 to 1, got nan"),
    ("- name: conv1\n", "- name: conv1\n        max_fraction: .NaN\n",
     "6:23: models[0].layers[0].max_fraction: max_fraction must be a number from 0 to 1, got nan"),
])
def test_max_fraction_nan_is_invalid(tmp_path: Path, old: str, new: str, expected: str) -> None:
    """NaN passes the schema's bounds (every comparison is false); let through, it would switch
    the max_fraction cap off."""
    assert problems(tmp_path, VALID.replace(old, new)) == [expected]


@pytest.mark.parametrize("rule", [
    "{smallest: {by: l1, count: 2, normalize: max}}",
    "{largest: {by: l2, fraction: 0.5, across: layer, normalize: none}}",
])
def test_normalize_without_a_ranking_across_layers_is_invalid(tmp_path: Path, rule: str) -> None:
    """normalize cannot change a ranking of one layer on its own: written without across: entry
    it means the user expected one ranking across the layers and would silently not get it."""
    kind = rule[1:rule.index(":")]
    text = VALID.replace("- index: [4, 7]", f"- {rule}")
    line = text.splitlines()[6]  # the rule's line (7), the key's column counted here
    assert problems(tmp_path, text) == [
        f"7:{line.index('normalize') + 1}: models[0].layers[0].rules[0].{kind}.normalize: normalize applies only to "
        f"one ranking across layers (across: entry); add 'across: entry' or remove 'normalize'"]
    fixed = rule.replace("normalize", "across: entry, normalize").replace(
        "across: layer, across: entry", "across: entry")
    (ranking,) = read_spec(write_spec(tmp_path, VALID.replace(
        "- index: [4, 7]", f"- {fixed}"))).models[0].layers[0].rules
    assert (ranking.kind, ranking.params["across"]) == (kind, "entry")


def test_semantic_errors(tmp_path: Path) -> None:
    text = """\
    version: 1
    output_dir: .
    models:
      - path: a.keras
        layers: [{name: c, rules: [{index: [0]}]}]
      - path: sub/a.keras
        layers: [{name: c, rules: [{index: [0]}]}]
      - name: b
        path: b.keras
        output: a.keras
        layers: [{name: c, type: Conv2D, rules: [{sign: {element: [0, 0], zero: zero}}]}]
      - name: d
        path: d.h5
        output: sub/../d.h5
        layers: [{name: c, type: Dense, approximate: true, rules: [{index: [0]}]}]
    """
    (tmp_path / "sub").mkdir()
    assert problems(tmp_path, text) == [
        "4:11: models[0].path: output " + str(tmp_path / "a.keras") + " is the input file of "
        "models[0]; kprune never overwrites an input: choose another output_dir or output",
        "6:11: models[1].path: model name 'a' is already used by models[0]; give each model a "
        "unique 'name'",
        "6:11: models[1].path: output " + str(tmp_path / "a.keras") + " is already written by "
        "models[0]; give one of them another 'output'",
        "6:11: models[1].path: output " + str(tmp_path / "a.keras") + " is the input file of "
        "models[0]; kprune never overwrites an input: choose another output_dir or output",
        "10:13: models[2].output: output " + str(tmp_path / "a.keras") + " is already written by "
        "models[0]; give one of them another 'output'",
        "10:13: models[2].output: output " + str(tmp_path / "a.keras") + " is the input file of "
        "models[0]; kprune never overwrites an input: choose another output_dir or output",
        "11:63: models[2].layers[0].rules[0].sign.element: a Conv2D filter slice has 3 axes, but "
        "element has 2 number(s)",
        "14:13: models[3].output: output " + str(tmp_path / "d.h5") + " is the input file of "
        "models[3]; kprune never overwrites an input: choose another output_dir or output",
        "15:30: models[3].layers[0].type: type 'Dense' is not a convolution layer class; filters "
        "exist only in: Conv1D, Conv2D, Conv3D, Conv1DTranspose, Conv2DTranspose, "
        "Conv3DTranspose, DepthwiseConv1D, DepthwiseConv2D, SeparableConv1D, SeparableConv2D",
    ]


def test_output_onto_input_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "models")
    text = "version: 1\noutput_dir: link\nmodels:\n  - path: models/m.keras\n" \
           "    layers: [{name: c, rules: [{index: [0]}]}]\n"
    (found,) = problems(tmp_path, text)
    assert "is the input file of models[0]" in found


def test_validate_cli_exit_codes_and_no_tensorflow(tmp_path: Path) -> None:
    good = write_spec(tmp_path, VALID, "good.yaml")
    bad = write_spec(tmp_path, VALID.replace("version: 1", "version: 2"), "bad.yaml")
    kprune("validate", good).expect(0)
    result = kprune("validate", good, bad).expect(2)
    assert result.stderr == f"{bad}:1:10: version: 2 must be the integer 1 (the only spec " \
                            f"language version this kprune knows)\n"
    assert f"{good}: ok (1 model(s), 1 layer entry)" in result.stdout
    code = ("import sys; from kprune_batch.cli import main; sys.argv=['kprune','validate',"
            f"{str(good)!r}]\ntry:\n main()\nexcept SystemExit:\n pass\n"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('tensorflow','keras','h5py','numpy')]\n"
            "print('IMPORTED', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "IMPORTED []" in out.stdout, out.stdout + out.stderr


def test_validate_missing_spec_file(tmp_path: Path) -> None:
    result = kprune("validate", tmp_path / "nope.yaml").expect(2)
    assert result.stderr == f"{tmp_path / 'nope.yaml'}: cannot read spec file: No such file or " \
                            f"directory\n"


def test_schemas_ship_inside_the_wheel(tmp_path: Path) -> None:
    """Build the wheel, unpack it, and run `validate` from the unpacked wheel alone."""
    import zipfile

    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(repo)], check=True,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("kprune_batch-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "kprune_batch/schema/spec.schema.json" in names
        assert "kprune_batch/schema/audit.schema.json" in names
        zf.extractall(tmp_path / "unpacked")
    spec = write_spec(tmp_path, VALID)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "unpacked"))
    code = ("import kprune_batch.schemas as s, sys; print(s.schema_dir()); "
            "from kprune_batch.cli import main; sys.argv=['kprune','validate',sys.argv[1]]; main()")
    out = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[0] == str(tmp_path / "unpacked" / "kprune_batch" / "schema")
    # what an editor's modeline should name: the installed file that validate read above
    code = "import sys; from kprune_batch.cli import main; sys.argv=['kprune','schema','--path']; main()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.stdout == f"{tmp_path / 'unpacked' / 'kprune_batch' / 'schema' / 'spec.schema.json'}\n"


# --- large but honest specs, and many problems ---------------------------------------------------

def _index_spec(values: str) -> str:
    return ("version: 1\nmodels:\n  - path: m.keras\n    layers:\n      - name: conv2d\n"
            f"        rules:\n          - index: [{values}]\n")


def test_large_honest_specs_are_not_alias_bombs(tmp_path: Path) -> None:
    """Only values that aliases add are counted against the expansion bound: 9,000 models or a
    5,000-entry index list are large, not bombs."""
    models = "".join(f"  - name: m{i}\n    path: m{i}.keras\n    layers:\n      - name: conv2d\n"
                     f"        rules: [{{index: [0, 3]}}]\n" for i in range(9000))
    many = write_spec(tmp_path, "version: 1\nmodels:\n" + models, "many.yaml")
    long = write_spec(tmp_path, _index_spec(", ".join(map(str, range(5000)))), "long.yaml")
    result = kprune("validate", many, long).expect(0)
    assert result.stdout.splitlines() == [f"{many}: ok (9000 model(s), 9000 layer entries)",
                                          f"{long}: ok (1 model(s), 1 layer entry)"]
    assert read_spec(long).models[0].layers[0].rules[0].params == list(range(5000))


def test_aliases_count_what_they_expand(tmp_path: Path) -> None:
    # one anchored rule list reused by 2,000 models: 2,000 x 5 values through aliases, accepted
    models = "".join(f"  - {{name: m{i}, path: m{i}.keras, layers: [{{name: c, rules: *r}}]}}\n"
                     for i in range(1, 2000))
    text = ("version: 1\nmodels:\n  - {name: m0, path: m0.keras, layers: [{name: c, rules: "
            "&r [{index: [0, 1]}]}]}\n" + models)
    spec = read_spec(write_spec(tmp_path, text))
    assert [m.layers[0].rules[0].params for m in spec.models] == [[0, 1]] * 2000
    # the same list behind a 10^6-fold alias tree is refused, once
    lines = ["a0: &a0 [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)]
    found = [p for p in problems(tmp_path, "\n".join(lines) + "\n") if "alias" in p]
    # a1..a3 expand 110 + 1,110 + 11,110 values, a4 would add 111,110: it passes the bound in
    # its 8th alias (the position is the aliased node's own, in a0)
    assert found == ["1:16: a4[7][8][9][0][2]: following its aliases, the document expands to "
                     "more than 100000 values (an alias bomb?)"]


def test_many_problems_print_a_screenful_and_a_count(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, _index_spec(", ".join(["-1"] * 500)))
    result = kprune("validate", spec).expect(2)
    lines = result.stderr.splitlines()
    assert len(lines) == 31
    col = len("          - index: [") + 1
    assert lines[0] == f"{spec}:7:{col}: models[0].layers[0].rules[0].index[0]: -1 is less than " \
                       f"the minimum of 0"
    assert lines[29].startswith(f"{spec}:7:{col + 29 * 4}: models[0].layers[0].rules[0].index[29]:")
    assert lines[30] == f"... and 470 more problems in {spec}"


def test_schema_checking_stops_after_a_thousand_errors(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, _index_spec(", ".join(["-1"] * 1500)))
    with pytest.raises(SpecError) as info:
        read_spec(spec)
    assert len(info.value.problems) == 1001
    assert info.value.lines()[0] == f"{spec}: checking stopped after 1000 schema errors"
    assert info.value.lines()[-1] == f"... and 971 more problems in {spec}"


@pytest.mark.parametrize("depth", [65, 900, 100_000])
def test_deep_yaml_nesting_is_one_problem(tmp_path: Path, depth: int) -> None:
    # PyYAML's composer recursed per level: a few hundred brackets were a RecursionError
    text = "version: 1\nmodels: " + "[" * depth + "]" * depth + "\n"
    # the top-level mapping is the first level: the 64th bracket is the 65th
    assert problems(tmp_path, text) == [f"2:{9 + 63}: YAML nesting is deeper than 64 levels"]


# --- YAML 1.2: what editors and check-jsonschema read ---------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("-4e-3", -0.004), ("1e5", 100000.0), ("1E+5", 100000.0), (".5", 0.5), ("+1.", 1.0),
    (".inf", float("inf")), ("-.Inf", float("-inf")),
    ("017", 17), ("0o17", 15), ("0x1F", 31), ("+12", 12),
    ("true", True), ("False", False), ("TRUE", True),
    ("null", None), ("~", None), ("", None), ("NULL", None),
    # strings in YAML 1.2 that YAML 1.1 (PyYAML's default) reads as something else
    ("yes", "yes"), ("No", "No"), ("on", "on"), ("off", "off"), ("y", "y"),
    ("1:30", "1:30"), ("0b101", "0b101"), ("1_000", "1_000"), ("2024-01-01", "2024-01-01"),
    ("0o8", "0o8"), ("1e", "1e"), (".", "."), ("NaN", "NaN"), ("=", "="),
])
def test_plain_scalars_follow_the_yaml_1_2_core_schema(text: str, value: object) -> None:
    data, _, found = load_yaml(f"a: {text}\n", "f.yaml")
    assert found == []
    assert data["a"] == value and type(data["a"]) is type(value)


def test_yaml_1_2_without_libyaml_reads_the_same() -> None:
    text = "a: [yes, -4e-3, 017, 0o17, 1:30, .inf, ~, True]\n"
    with_libyaml = load_yaml(text, "f.yaml")[0]
    import kprune_batch.spec as spec_module

    import yaml

    assert (spec_module._CLoader is not None) == yaml.__with_libyaml__  # libyaml is used
    saved, spec_module._CLoader = spec_module._CLoader, None
    try:
        assert load_yaml(text, "f.yaml")[0] == with_libyaml == {
            "a": ["yes", -0.004, 17, 15, "1:30", float("inf"), None, True]}
    finally:
        spec_module._CLoader = saved


def test_yaml_1_1_spellings_are_reported_as_yaml_1_2_reads_them(tmp_path: Path) -> None:
    text = VALID.replace("- index: [4, 7]", "- mean: {below: -4e-3}").replace(
        "- name: conv1\n", "- name: conv1\n        allow_empty_layer: yes\n        round_to: 1:30\n"
                           "        approximate: !!bool on\n")
    assert problems(tmp_path, text) == [
        "6:28: models[0].layers[0].allow_empty_layer: 'yes' is not of type 'boolean'",
        "7:19: models[0].layers[0].round_to: '1:30' is not of type 'integer'",
        "8:22: models[0].layers[0].approximate: None is not of type 'boolean'",
        "8:22: models[0].layers[0].approximate: invalid YAML value 'on' (not a YAML 1.2 boolean: "
        "true or false)",
    ]
    spec = read_spec(write_spec(tmp_path, text.replace("yes", "true").replace("1:30", "0o10")
                                .replace("!!bool on", "false")))
    (entry,) = spec.models[0].layers
    assert dict(entry.options) == {"allow_empty_layer": True, "round_to": 8, "approximate": False}
    assert entry.rules[0].params == {"below": -0.004}


def test_pin_quotes_a_digest_that_would_read_as_a_number() -> None:
    from kprune_batch.commands.pin import _plain_or_quoted

    digest = "1" * 30 + "e" + "2" * 33
    assert _plain_or_quoted(digest) == f"'{digest}'"
    assert _plain_or_quoted("9" * 64) == f"'{'9' * 64}'"
    assert _plain_or_quoted("ab" * 32) == "ab" * 32


# --- several specs, and a spec on stdin ----------------------------------------------------------

def test_validate_reports_every_file_in_order_then_by_position(tmp_path: Path) -> None:
    one = write_spec(tmp_path, VALID.replace("version: 1", "version: 2").replace(
        "[4, 7]", "[-1]"), "b.yaml")
    good = write_spec(tmp_path, VALID, "good.yaml")
    two = write_spec(tmp_path, VALID.replace("layers:", "layer:"), "a.yaml")
    result = kprune("validate", one, good, two).expect(2)
    assert result.stderr.splitlines() == [
        f"{one}:1:10: version: 2 must be the integer 1 (the only spec language version this "
        f"kprune knows)",
        f"{one}:7:21: models[0].layers[0].rules[0].index[0]: -1 is less than the minimum of 0",
        f"{two}:3:5: models[0].layers: required key is missing",
        f"{two}:4:5: models[0].layer: unknown key 'layer'; did you mean 'layers'?",
    ]
    assert result.stdout == f"{good}: ok (1 model(s), 1 layer entry)\n"


def test_validate_reads_a_spec_from_stdin(tmp_path: Path) -> None:
    good = write_spec(tmp_path, VALID, "good.yaml")
    result = kprune("validate", "-", good, stdin=VALID).expect(0)
    assert result.stdout == f"<stdin>: ok (1 model(s), 1 layer entry)\n{good}: ok (1 model(s), " \
                            f"1 layer entry)\n"
    result = kprune("validate", good, "-", stdin=VALID + "extra: yes\n").expect(2)
    assert result.stderr == "<stdin>:8:1: extra: unknown key 'extra' (allowed: defaults, models, " \
                            "output_dir, version)\n"
    assert kprune("validate", "-", "-", stdin=VALID).expect(2).stderr == \
        "error: '-' (stdin) can be given only once\n"


def test_a_spec_on_stdin_resolves_paths_in_the_current_directory(tmp_path: Path,
                                                                 monkeypatch) -> None:
    import io

    from kprune_batch.plan import compile_plan
    from kprune_batch.spec import read_spec_arg

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(VALID.encode())))
    spec = read_spec_arg("-")
    assert spec.file == "<stdin>"
    assert spec.models[0].path == str(tmp_path / "models" / "digits.keras")
    assert spec.output_dir == str(tmp_path / "pruned")
    assert compile_plan(spec).spec_path == "-"


def test_plan_base_needs_a_file_not_stdin(tmp_path: Path) -> None:
    result = kprune("plan", "-", "--base", "HEAD", stdin=VALID).expect(2)
    assert result.stderr == "error: --base compares a spec file with its committed version: " \
                            "give the file, not '-' (stdin)\n"


# --- the shipped schema, for editors ---------------------------------------------------------------

def test_schema_command_prints_the_schema_validate_uses(tmp_path: Path) -> None:
    import json

    from kprune_batch.schemas import load_schema, schema_path

    for name in ("spec", "audit"):
        printed = kprune("schema", name, "--path").expect(0).stdout
        # the child may import an installed copy (CI installs non-editable) where this process
        # imports the checkout: the file it names holds the schema, by name and content
        assert printed.endswith(f"{Path(schema_path(name)).name}\n")
        assert json.loads(Path(printed.strip()).read_text()) == load_schema(name)
        assert json.loads(kprune("schema", name).expect(0).stdout) == load_schema(name)
    assert kprune("schema", "--path").expect(0).stdout.endswith("spec.schema.json\n")


def test_apply_reads_a_spec_from_stdin_and_logs_it_without_git(tmp_path: Path) -> None:
    """Relative paths start in the current directory; the log says '-' (there is no file, so no
    commit to name) and the sha256 of the bytes that ran."""
    import hashlib
    import json

    examples = Path(__file__).resolve().parent.parent / "specs" / "examples"
    text = VALID.replace("models/digits.keras", "digits.keras")
    kprune("apply", "-", "--backend", "direct", "--output-dir", tmp_path / "out", "--audit-log",
           tmp_path / "log.json", cwd=examples, stdin=text).expect(0)
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["spec"] == {"path": "-", "sha256": hashlib.sha256(text.encode()).hexdigest(),
                           "git": {"commit": None, "dirty": None,
                                   "reason": "the spec was read from stdin"}}
    assert log["models"][0]["input"]["path"] == str(examples / "digits.keras")
    assert (tmp_path / "out" / "digits.keras").is_file()
    kprune("verify", tmp_path / "log.json").expect(0)
