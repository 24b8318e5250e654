"""Crafted inputs: a model config no Keras wrote, an audit log with surprising values, names with
control characters. Each is one line naming what is wrong, the right exit code, the batch goes on."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import kprune, write_spec


def rewrite_config(src: Path, dst: Path, edit: Callable[[str], str]) -> Path:
    """A copy of the .keras file `src` whose config.json is edit(config text); every other member
    is copied byte for byte (same names, same order, same compression)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "config.json":
                data = edit(data.decode()).encode()
            zout.writestr(info, data)
    return dst


def edit_layer(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        config = json.loads(text)
        layer = next(l for l in config["config"]["layers"] if l["name"] == name)
        change(layer)
        return json.dumps(config)
    return edit


def set_config(name: str, key: str, value: Any) -> Callable[[str], str]:
    return edit_layer(name, lambda layer: layer["config"].__setitem__(key, value))


def edit_model(change: Callable[[dict[str, Any]], None]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        config = json.loads(text)
        change(config)
        return json.dumps(config)
    return edit


def _deep(text: str) -> str:
    # 5,000 nested lists inside a layer's inbound nodes: json.loads itself gives up (RecursionError)
    return text.replace('"inbound_nodes": [', '"inbound_nodes": [' + "[" * 5000 + "]" * 5000 + ",",
                        1)


MALFORMED = "the model config is malformed: "
# (model name, edit of config.json, the error after "model 'NAME': ")
CRAFTED = [
    ("groups0", set_config("conv2d", "groups", 0),
     MALFORMED + "layer 'conv2d': groups is 0, not a positive integer below 2^31"),
    ("filters_inf", lambda t: t.replace('"filters": 6', '"filters": 1e999'),
     MALFORMED + "layer 'conv2d': filters is inf (a JSON number too large for a float), not a "
                 "positive integer below 2^31"),
    ("filters_float", set_config("conv2d", "filters", 6.5),
     MALFORMED + "layer 'conv2d': filters is 6.5, not a positive integer below 2^31"),
    ("filters_huge", set_config("conv2d", "filters", 10 ** 30),
     MALFORMED + f"layer 'conv2d': filters is {10 ** 30}, not a positive integer below 2^31"),
    ("groups_indivisible", set_config("conv2d", "groups", 4),
     MALFORMED + "layer 'conv2d': filters (6) is not divisible by groups (4)"),
    ("layers_not_a_list", edit_model(lambda c: c["config"].__setitem__("layers", {"a": 1})),
     MALFORMED + "its layer list is {'a': 1}, not a list"),
    ("layer_not_a_mapping", edit_model(lambda c: c["config"]["layers"].insert(1, 7)),
     MALFORMED + "layer #1 of the model is 7, not a layer mapping"),
    ("unknown_source", edit_layer("conv2d", lambda l: l["inbound_nodes"][0]["args"][0]["config"]
                                  .__setitem__("keras_history", ["ghost", 0, 0])),
     MALFORMED + "layer 'conv2d': it consumes a tensor of layer 'ghost', which is not in the "
                 "model"),
    ("tensor_out_of_range", edit_layer("conv2d", lambda l: l["inbound_nodes"][0]["args"][0][
        "config"].__setitem__("keras_history", ["act", 0, 99])),
     MALFORMED + "layer 'conv2d': it consumes output 99 of layer 'act', which has 1"),
    ("history_not_indices", edit_layer("conv2d", lambda l: l["inbound_nodes"][0]["args"][0][
        "config"].__setitem__("keras_history", ["act", 0, 1e999])),
     MALFORMED + "layer 'conv2d': keras_history ['act', 0, inf] is not [layer name, node index, "
                 "tensor index]"),
    ("deep", _deep, "Keras could not load the model (RecursionError: maximum recursion depth "
                    "exceeded while decoding a JSON array from a unicode string)"),
]


@pytest.fixture(scope="module")
def crafted_batch(tmp_path_factory: pytest.TempPathFactory, small_cnn: Path) -> dict[str, Any]:
    """One spec: every crafted model, then the intact one; run serially and with --jobs 2."""
    folder = tmp_path_factory.mktemp("crafted")
    for name, edit, _ in CRAFTED:
        rewrite_config(small_cnn, folder / f"{name}.keras", edit)
    (folder / "intact.keras").write_bytes(small_cnn.read_bytes())
    entries = "".join(f"  - path: {name}.keras\n    layers: [{{name: conv2d, rules: [{{index: [0]}}]}}]\n"
                      for name in [c[0] for c in CRAFTED] + ["intact"])
    spec = write_spec(folder, "version: 1\nmodels:\n" + entries)
    runs = {}
    for mode, extra in (("serial", []), ("jobs", ["--jobs", "2"])):
        log = folder / f"{mode}.json"
        result = kprune("apply", spec, "--audit-log", log, "--output-dir", folder / mode, *extra)
        runs[mode] = (result, json.loads(log.read_text()))
    return {"folder": folder, "runs": runs}


@pytest.mark.parametrize("mode", ["serial", "jobs"])
def test_crafted_configs_fail_their_model_and_the_batch_goes_on(crafted_batch: dict[str, Any],
                                                                mode: str) -> None:
    folder = crafted_batch["folder"]
    result, log = crafted_batch["runs"][mode]
    result.expect(1)
    statuses = {m["name"]: m["status"] for m in log["models"]}
    assert statuses == {**{c[0]: "failed" for c in CRAFTED}, "intact": "ok"}
    assert log["status"] == "partial"
    assert (folder / mode / "intact.keras").is_file()
    # nothing for a failed model (the lock file may stay: kprune's own bookkeeping)
    assert sorted(p.name for p in (folder / mode).glob("*.keras")) == ["intact.keras"]
    errors = result.stderr.splitlines()
    assert len(errors) == len(CRAFTED), result  # exactly one line per failed model
    for name, _, message in CRAFTED:
        line = next(e for e in errors if e.startswith(f"error: {folder / name}.keras: "))
        assert line == f"error: {folder / name}.keras: model '{name}': {message}"
        assert "internal error" not in line and "cannot process this model" not in line
        entry = next(m for m in log["models"] if m["name"] == name)
        assert line == f"error: {entry['error']}"
    out = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    assert out == [f"ok      intact: zeroed 1 filter(s) in 1 layer(s) -> {folder / mode}/intact.keras"]


def test_crafted_configs_read_the_same_with_and_without_jobs(crafted_batch: dict[str, Any]) -> None:
    (serial, serial_log), (jobs, jobs_log) = crafted_batch["runs"]["serial"], \
        crafted_batch["runs"]["jobs"]
    assert sorted(serial.stderr.splitlines()) == sorted(jobs.stderr.splitlines())
    assert [(m["name"], m["status"], m["error"]) for m in serial_log["models"]] == \
        [(m["name"], m["status"], m["error"]) for m in jobs_log["models"]]


def test_direct_backend_names_the_malformed_field(tmp_path: Path, small_cnn: Path) -> None:
    model = rewrite_config(small_cnn, tmp_path / "g.keras", set_config("conv2d", "groups", 0))
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: g.keras\n    layers: "
                                "[{name: conv2d, rules: [{index: [0]}]}]\n")
    result = kprune("apply", spec, "--backend", "direct", "--audit-log", tmp_path / "log.json")
    result.expect(1)
    assert result.stderr == (f"error: {model}: model 'g': {MALFORMED}layer 'conv2d': groups is 0, "
                             f"not a positive integer below 2^31\n")
    assert not list(tmp_path.glob("pruned/*.keras"))


# --- forged lines: names and paths with control characters ---------------------------------------

def test_newlines_in_names_and_paths_cannot_forge_error_lines(keras: Any, tmp_path: Path) -> None:
    """A layer name and a model path holding a newline (and an ANSI escape in a model name): each
    failed model is exactly one stderr line, the control characters escaped."""
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="conv\nerror: forged")(inputs)
    folder = tmp_path / "in\nerror: forged"
    folder.mkdir()
    keras.Model(inputs, x).save(folder / "m.keras")
    spec = write_spec(tmp_path, r'''
        version: 1
        models:
          - name: "layer\e[2K"
            path: "in\nerror: forged/m.keras"
            layers: [{name: "conv\nerror: forged", rules: [{index: [9]}]}]
          - name: missing
            path: "in\nerror: forged/missing.keras"
            layers: [{name: conv, rules: [{index: [0]}]}]
        ''')
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(1)
    assert "\x1b" not in result.stderr + result.stdout
    where = str(folder).replace("\n", "\\n")
    errors = result.stderr.splitlines()
    assert len(errors) == 2, result
    assert errors[0] == ("error: model 'layer\\x1b[2K', layer 'conv\\nerror: forged': "
                         "models[0].layers[0].rules[0]: index 9 is out of range: the layer has 4 "
                         "filters (valid: 0..3)")
    assert errors[1] == (f"error: model 'missing': input file {where}/missing.keras does not "
                         f"exist; check the model's 'path' (relative to the spec file's folder)")
    log = json.loads((tmp_path / "log.json").read_text())
    assert [f"error: {m['error']}" for m in log["models"]] == errors
    assert result.stdout.splitlines() == ["0 ok, 2 failed, 0 skipped",
                                          f"audit log: {tmp_path / 'log.json'}"]
    # the spec path itself in a validation error
    bad = write_spec(folder, "version: 2\nmodels: []\n", "bad.yaml")
    lines = kprune("validate", bad).expect(2).stderr.splitlines()
    assert lines and all(line.startswith(f"{where}/bad.yaml:") for line in lines)


def test_crafted_legacy_h5_config_fails_its_model(tmp_path: Path, small_cnn_h5: Path) -> None:
    import h5py

    model = tmp_path / "g.h5"
    model.write_bytes(small_cnn_h5.read_bytes())
    with h5py.File(model, "r+") as h5:
        raw = h5.attrs["model_config"]
        text = raw.decode() if isinstance(raw, bytes) else raw
        h5.attrs["model_config"] = set_config("conv2d", "filters", 0)(text)
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: g.h5\n    layers: "
                                "[{name: conv2d, rules: [{index: [0]}]}]\n")
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(1)
    assert result.stderr == (f"error: {model}: model 'g': {MALFORMED}layer 'conv2d': filters is 0, "
                             f"not a positive integer below 2^31\n")
    assert json.loads((tmp_path / "log.json").read_text())["models"][0]["status"] == "failed"
