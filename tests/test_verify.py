"""`kprune verify`: passes on a clean run, fails with a clear line after each kind of tampering."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import kprune, write_spec

SPEC = """\
version: 1
models:
  - path: small.keras
    layers:
      - name: conv2d_1
        rules: [{index: [2, 5]}]
  - path: other.keras
    layers:
      - name: nope
        rules: [{index: [0]}]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, small_cnn: Path) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("verify")
    shutil.copy(small_cnn, folder / "small.keras")
    shutil.copy(small_cnn, folder / "other.keras")
    spec = write_spec(folder, SPEC)
    kprune("apply", spec, "--audit-log", folder / "log.json").expect(1)
    return {"folder": folder, "log": folder / "log.json",
            "output": folder / "pruned" / "small.keras"}


@pytest.fixture
def tampered(run: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A copy of the run (outputs, inputs and a log pointing at them) that a test may damage."""
    folder = tmp_path / "copy"
    shutil.copytree(run["folder"], folder)
    text = (folder / "log.json").read_text().replace(str(run["folder"]), str(folder))
    (folder / "log.json").write_text(text)
    return {"folder": folder, "log": folder / "log.json",
            "output": folder / "pruned" / "small.keras"}


def test_clean_run_verifies(run: dict[str, Any]) -> None:
    result = kprune("verify", run["log"], "--probe").expect(0)
    assert result.stdout.splitlines() == [
        "ok      small: 2 zeroed filter(s) verified, every other weight equals the input's",
        "skipped other: status failed in the log (nothing was written)",
    ]


def _edit(keras: Any, path: Path, layer: str, change: Any) -> None:
    model = keras.saving.load_model(str(path))
    target = model.get_layer(layer)
    change(target)
    model.save(path)


def test_unzeroed_filter_is_found(keras: Any, tampered: dict[str, Any]) -> None:
    def restore(layer: Any) -> None:
        kernel = layer.kernel.numpy()
        kernel[..., 5] = 0.25
        layer.kernel.assign(kernel)

    _edit(keras, tampered["output"], "conv2d_1", restore)
    result = kprune("verify", tampered["log"]).expect(1)
    lines = result.stdout.splitlines()
    assert f"MISMATCH small: output file {tampered['output']} does not match the sha256 in the " \
           f"log (replaced or modified since the run)" in lines
    assert "MISMATCH small: layer 'conv2d_1' kernel zeroed filter 5: max |difference| 0.25" in lines


def test_changed_untouched_weight_is_found(keras: Any, tampered: dict[str, Any]) -> None:
    def nudge(layer: Any) -> None:
        kernel = layer.kernel.numpy()
        kernel[0, 0, 0, 3] += 0.5
        layer.kernel.assign(kernel)

    _edit(keras, tampered["output"], "conv2d", nudge)
    lines = kprune("verify", tampered["log"]).expect(1).stdout.splitlines()
    (mismatch,) = [line for line in lines if "layer 'conv2d'" in line]
    assert mismatch.startswith("MISMATCH small: layer 'conv2d' kernel untouched filter 3: max "
                               "|difference| 0.5")


def test_replaced_file_is_found(tampered: dict[str, Any], small_cnn: Path) -> None:
    shutil.copy(small_cnn, tampered["output"])
    lines = kprune("verify", tampered["log"]).expect(1).stdout.splitlines()
    assert lines[0] == (f"MISMATCH small: output file {tampered['output']} does not match the "
                        f"sha256 in the log (replaced or modified since the run)")
    assert "MISMATCH small: layer 'conv2d_1' kernel zeroed filter 2 (+1 more): max |difference| " \
           in "\n".join(lines)


@pytest.mark.parametrize("which", ["output", "input"])
def test_missing_file_is_reported(tampered: dict[str, Any], which: str) -> None:
    path = tampered["output"] if which == "output" else tampered["folder"] / "small.keras"
    path.unlink()
    result = kprune("verify", tampered["log"]).expect(1)
    assert result.stdout.splitlines()[0] == f"MISMATCH small: {which} file {path} is missing"
    assert result.stderr == ""


@pytest.mark.parametrize("content, message", [
    (None, "no such audit log"),
    ("{not json", "not a JSON audit log"),
    ('{"version": 1}', "not a valid kprune audit log: (root): 'command' is a required property"),
])
def test_unreadable_log(tmp_path: Path, content: str | None, message: str) -> None:
    log = tmp_path / "log.json"
    if content is not None:
        log.write_text(content)
    result = kprune("verify", log).expect(1)
    assert result.stderr.startswith(f"error: {log}: {message}")
    assert len(result.stderr.splitlines()) == 1


# --- crafted logs: schema-valid, surprising values -------------------------------------------------

def _crafted(log_path: Path, change: Any, name: str = "crafted.json") -> Path:
    log = json.loads(log_path.read_text())
    change(log)
    out = log_path.parent / name
    out.write_text(json.dumps(log))
    return out


def _first(log: dict[str, Any]) -> dict[str, Any]:
    return log["zeroed"][0]


@pytest.mark.parametrize("change, message", [
    (lambda l: _first(l).__setitem__("layer", "ghost"),
     "zeroed[0].layer: names layer 'ghost', which model 'small' does not list"),
    (lambda l: _first(l).__setitem__("filter", 8),
     "zeroed[0].filter: 8 is out of range (layer 'conv2d_1' has 8)"),
    (lambda l: _first(l).__setitem__("filter", 10 ** 30),
     f"zeroed[0].filter: {10 ** 30} is out of range (layer 'conv2d_1' has 8)"),
    (lambda l: _first(l).__setitem__("layer_class", "Dense"),
     "zeroed[0].layer_class: Dense, but the model lists layer 'conv2d_1' as Conv2D"),
    (lambda l: _first(l).__setitem__("model", "other"),
     "zeroed[0].model: a record for model 'other', whose status is failed"),
    (lambda l: _first(l).__setitem__("model", "nobody"),
     "zeroed[0].model: names model 'nobody', which the log does not list"),
    (lambda l: l["zeroed"].append(dict(_first(l))),
     "zeroed[2]: filter 2 of layer 'conv2d_1' is recorded twice"),
    (lambda l: l["models"][0]["layers"][0].__setitem__("filters_total", 0),
     "models[0].layers[0].filters_total: 0 (a layer has at least one filter)"),
    (lambda l: l["models"][0]["layers"][0]["rules"].__setitem__("x", [99]),
     "models[0].layers[0].rules['x']: filter 99 is out of range (the layer has 8)"),
    (lambda l: l["models"].append(dict(l["models"][0])), "models[2].name: model 'small' is "
                                                         "listed twice"),
])
def test_inconsistent_log_is_one_line(run: dict[str, Any], change: Any, message: str) -> None:
    log = _crafted(run["log"], change)
    for command in (["verify", log], ["report", log], ["diff", run["log"], log]):
        result = kprune(*command).expect(1)
        assert result.stderr == f"error: {log}: not a consistent kprune audit log: {message}\n"
        assert result.stdout == ""


@pytest.mark.parametrize("text, message", [
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not a JSON audit log (nested too deeply)"),
    ('{"a": ' + "[" * 900 + "]" * 900 + "}", "not a valid kprune audit log: (root): "),
    ('{"a": NaN}', "not a JSON audit log (NaN is not a JSON number)"),
    ('{"a": 1e999}', "not a JSON audit log (1e999 is not a finite number)"),
    ('{"a": ' + "9" * 5000 + "}", "not a JSON audit log (Exceeds the limit (4300 digits) for "
                                  "integer string conversion"),
])
def test_hostile_json_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    log = tmp_path / "log.json"
    log.write_text(text)
    for command in (["verify", log], ["report", log], ["diff", log, log]):
        result = kprune(*command).expect(1)
        assert result.stderr.startswith(f"error: {log}: {message}"), result
        assert len(result.stderr.splitlines()) == 1 and "internal error" not in result.stderr


@pytest.mark.parametrize("change, problem", [
    # consistent in itself, but not with the model files it names: a mismatch, not a crash
    (lambda l: (l["models"][0]["layers"][0].__setitem__("layer", "ghost"),
                [r.__setitem__("layer", "ghost") for r in l["zeroed"]]),
     "the log names layer 'ghost', which the input does not have"),
    (lambda l: (l["models"][0]["layers"][0].__setitem__("filters_total", 100),
                _first(l).__setitem__("filter", 50)),
     "the log names filter 50 of layer 'conv2d_1', which has 8 in the input"),
    (lambda l: (l["models"][0]["layers"][0].__setitem__("layer_class", "Conv1D"),
                [r.__setitem__("layer_class", "Conv1D") for r in l["zeroed"]]),
     "the log says layer 'conv2d_1' is a Conv1D, the input's is a Conv2D"),
    (lambda l: _first(l)["batchnorm"][0].__setitem__("variable", "nope"),
     "the log edits bn/nope[2], which the input does not have"),
])
def test_log_that_does_not_fit_the_input_is_a_mismatch(run: dict[str, Any], change: Any,
                                                       problem: str) -> None:
    log = _crafted(run["log"], change)
    result = kprune("verify", log).expect(1)
    assert f"MISMATCH small: {problem}" in result.stdout.splitlines(), result
    assert result.stderr == ""


def test_operation_nodes_and_nested_models_verify(keras: Any, tmp_path: Path) -> None:
    """What a functional config can hold besides layers (issue 19): `x + 1.0` and `x * 0.5`
    are keras.src.ops.numpy nodes (no layer, no weights), a nested Sequential starts with
    keras.Input, and a nested model is fed by an operation. --probe and verify follow them, and
    the direct backend needs no Keras for them."""
    L = keras.layers
    stem = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(6, 3, padding="same", name="s"),
                             L.BatchNormalization(name="sbn")], name="stem")
    block_in = keras.Input((8, 8, 6))
    block = keras.Model(block_in, L.Conv2D(4, 1, name="b")(block_in), name="block")
    i = keras.Input((8, 8, 3))
    x = stem(i) + 1.0  # an operation between a layer and the nested model it feeds
    y = block(x * 0.5)
    out = L.Dense(2, name="d")(L.GlobalAveragePooling2D()(L.Conv2D(3, 1, name="c")(y)))
    model = keras.Model(i, out)
    from conftest import _seeded_weights

    _seeded_weights(model, 12)
    model.save(tmp_path / "ops.keras")
    spec = write_spec(tmp_path, """\
        version: 1
        models:
          - path: ops.keras
            layers:
              - {name: stem/s, rules: [{index: [0, 5]}]}
              - {name: block/b, rules: [{index: [1]}]}
              - {name: c, rules: [{index: [2]}]}
        """)
    kprune("apply", spec, "--probe", "--audit-log", tmp_path / "log.json").expect(0)
    log = json.loads((tmp_path / "log.json").read_text())
    (entry,) = log["models"]
    assert entry["backend"] == "direct" and entry["probe"]["status"] == "ok"
    assert sorted((r["layer"], r["filter"], r["silent"]) for r in log["zeroed"]) == [
        ("block/b", 1, True), ("c", 2, True), ("stem/s", 0, True), ("stem/s", 5, True)]
    result = kprune("verify", tmp_path / "log.json", "--probe").expect(0)
    assert result.stdout == ("ok      ops: 4 zeroed filter(s) verified, every other weight "
                             "equals the input's\n")
