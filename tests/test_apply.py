"""`kprune apply` end to end on real models: selected filters zeroed, everything else bit-identical."""
from __future__ import annotations

import copy
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import h5py
import jsonschema
import numpy as np
import pytest

from conftest import assert_only_changed, kprune, layer_weights, write_spec
from kprune_batch.files import sha256_file
from kprune_batch.schemas import load_schema

SPEC = """\
version: 1
output_dir: out
models:
  - name: small
    path: {model}
    layers:
      - name: conv2d_1
        rules:
          - index: [1, 6]
      - match: "conv2d*"
        type: Conv2D
        rules:
          - mean: {{below: {threshold}}}
      - name: conv2d
        rules:
          - sign: {{element: [0, 0, 0], zero: negative}}
"""


def expected_selection(weights: dict, threshold: float) -> dict[str, dict[int, list[str]]]:
    """Computed from the input weights with plain numpy, independently of kprune's rules."""
    out: dict[str, dict[int, list[str]]] = {"conv2d_1": {}, "conv2d": {}}

    def add(layer: str, f: int, loc: str) -> None:
        out[layer].setdefault(f, []).append(loc)

    for f in (1, 6):
        add("conv2d_1", f, "models[0].layers[0].rules[0]")
    for layer in ("conv2d_1", "conv2d"):
        k = weights[layer]["kernel"].astype(np.float64)
        for f in range(k.shape[-1]):
            if k[..., f].mean() < threshold:
                add(layer, f, "models[0].layers[1].rules[0]")
    k = weights["conv2d"]["kernel"]
    for f in range(k.shape[-1]):
        if k[0, 0, 0, f] < 0:
            add("conv2d", f, "models[0].layers[2].rules[0]")
    return {layer: dict(sorted(sel.items())) for layer, sel in out.items()}


def pick_threshold(weights: dict) -> float:
    """A threshold that selects at least one filter in each layer, within max_fraction."""
    means = sorted(weights["conv2d"]["kernel"].astype(np.float64).mean(axis=(0, 1, 2)))
    return float((means[0] + means[1]) / 2)


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory, small_cnn: Path, keras: Any) -> dict:
    folder = tmp_path_factory.mktemp("apply")
    model = folder / "models" / "small.keras"
    model.parent.mkdir()
    shutil.copy(small_cnn, model)
    before = layer_weights(keras, model)
    threshold = pick_threshold(before)
    spec = write_spec(folder, SPEC.format(model="models/small.keras", threshold=threshold))
    input_hash = sha256_file(str(model))
    result = kprune("apply", spec, "--audit-log", folder / "audit.json", cwd=folder).expect(0)
    log = json.loads((folder / "audit.json").read_text())
    return {"folder": folder, "model": model, "before": before, "threshold": threshold,
            "result": result, "log": log, "input_hash": input_hash,
            "output": folder / "out" / "small.keras"}


def test_apply_zeroes_exactly_the_selected_filters(applied: dict, keras: Any) -> None:
    before = applied["before"]
    expected = expected_selection(before, applied["threshold"])
    assert any(expected["conv2d"]) and any(expected["conv2d_1"])
    after = layer_weights(keras, applied["output"])
    allowed = {}
    for layer, selection in expected.items():
        filters = list(selection)
        kernel_mask = np.zeros(before[layer]["kernel"].shape, bool)
        kernel_mask[..., filters] = True
        bias_mask = np.zeros(before[layer]["bias"].shape, bool)
        bias_mask[filters] = True
        allowed[(layer, "kernel")] = kernel_mask
        allowed[(layer, "bias")] = bias_mask
        assert np.all(after[layer]["kernel"][..., filters] == 0)
        assert np.all(after[layer]["bias"][filters] == 0)
    # conv2d_1 feeds bn (through nothing) -> gamma and beta of its zeroed channels are 0
    bn_filters = list(expected["conv2d_1"])
    for var in ("gamma", "beta"):
        mask = np.zeros(before["bn"][var].shape, bool)
        mask[bn_filters] = True
        allowed[("bn", var)] = mask
        assert np.all(after["bn"][var][bn_filters] == 0)
    assert_only_changed(before, after, allowed)


def test_the_layer_named_conv2d_1_is_the_first_conv(applied: dict, keras: Any) -> None:
    """Keras auto-names the first conv 'conv2d' internally; kprune must follow the user's name."""
    after = layer_weights(keras, applied["output"])
    assert after["conv2d_1"]["kernel"].shape == (3, 3, 3, 8)
    kept = [f for f in range(8) if f not in expected_selection(
        applied["before"], applied["threshold"])["conv2d_1"]]
    assert np.array_equal(after["conv2d_1"]["kernel"][..., kept],
                          applied["before"]["conv2d_1"]["kernel"][..., kept])


def test_audit_log_records_every_zeroed_filter(applied: dict) -> None:
    log = applied["log"]
    jsonschema.validate(log, load_schema("audit"))
    expected = expected_selection(applied["before"], applied["threshold"])
    got = {(r["layer"], r["filter"]): r for r in log["zeroed"]}
    assert set(got) == {(layer, f) for layer, sel in expected.items() for f in sel}
    for layer, selection in expected.items():
        k = applied["before"][layer]["kernel"].astype(np.float64)
        for f, rules in selection.items():
            record = got[(layer, f)]
            assert record["rules"] == rules
            assert record["model"] == "small" and record["layer_class"] == "Conv2D"
            assert record["stats"]["mean"] == pytest.approx(k[..., f].mean(), rel=1e-12)
            assert record["stats"]["l1"] == pytest.approx(np.abs(k[..., f]).sum(), rel=1e-12)
            assert record["stats"]["l2"] == pytest.approx(np.sqrt((k[..., f] ** 2).sum()),
                                                          rel=1e-12)
            assert record["silent"] is True
    (model,) = log["models"]
    assert model["status"] == "ok" and model["error"] is None
    assert model["input"] == {"path": str(applied["model"]), "sha256": applied["input_hash"]}
    assert model["output"] == {"path": str(applied["output"]),
                               "sha256": sha256_file(str(applied["output"])), "written": True}
    assert log["status"] == "ok"
    assert log["spec"]["sha256"] == sha256_file(str(applied["folder"] / "spec.yaml"))
    assert log["tool"]["keras"].startswith("3.")


def test_input_is_untouched_and_terminal_is_quiet(applied: dict) -> None:
    assert sha256_file(str(applied["model"])) == applied["input_hash"]
    assert applied["result"].stderr == ""
    assert applied["result"].stdout.splitlines()[0].startswith("ok      small: zeroed ")


def apply_with_backend(folder: Path, source: Path, backend: str) -> tuple[Path, Path]:
    """Zero filter 2 of conv2d with `kprune apply --backend BACKEND`; (input, output) paths.
    The log must name the backend that did the work, with no fallback note."""
    model = folder / f"m{source.suffix}"
    shutil.copy(source, model)
    spec = write_spec(folder, f"version: 1\nmodels:\n  - path: {model.name}\n"
                              f"    layers: [{{name: conv2d, rules: [{{index: [2]}}]}}]\n")
    kprune("apply", spec, "--backend", backend, "--audit-log", folder / "log.json").expect(0)
    (logged,) = json.loads((folder / "log.json").read_text())["models"]
    assert (logged["backend"], logged["backend_note"]) == (backend, None)
    return model, folder / "pruned" / model.name


@pytest.mark.parametrize("backend", ["direct", "keras"])
def test_compile_config_and_optimizer_state_are_kept(tmp_path: Path, small_cnn: Path, keras: Any,
                                                     backend: str) -> None:
    model, output = apply_with_backend(tmp_path, small_cnn, backend)
    with zipfile.ZipFile(model) as zin, zipfile.ZipFile(output) as zout:
        assert [i.filename for i in zin.infolist()] == [i.filename for i in zout.infolist()]
        cfg_in = json.loads(zin.read("config.json"))
        cfg_out = json.loads(zout.read("config.json"))
        assert cfg_out["compile_config"] == cfg_in["compile_config"] is not None
        assert json.loads(zout.read("metadata.json"))["date_saved"] == \
            json.loads(zin.read("metadata.json"))["date_saved"]
        src = _optimizer_vars(zin.read("model.weights.h5"))
        dst = _optimizer_vars(zout.read("model.weights.h5"))
    assert len(src) > 2 and src.keys() == dst.keys()
    for key in src:
        assert np.array_equal(src[key], dst[key]), key
    # and as Keras itself loads it: compiled the same, the same optimizer state, the edit made
    before, after = (keras.saving.load_model(str(p)) for p in (model, output))
    assert after.get_compile_config() == before.get_compile_config()
    assert int(after.optimizer.iterations.numpy()) == int(before.optimizer.iterations.numpy()) > 0
    assert [v.path for v in after.optimizer.variables] == \
        [v.path for v in before.optimizer.variables]
    for a, b in zip(after.optimizer.variables, before.optimizer.variables, strict=True):
        assert np.array_equal(np.asarray(a.numpy()), np.asarray(b.numpy())), a.path
    assert not after.get_layer("conv2d").kernel.numpy()[..., 2].any()


def _optimizer_vars(blob: bytes) -> dict[str, np.ndarray]:
    import io

    with h5py.File(io.BytesIO(blob), "r") as f:
        group = f["optimizer/vars"]
        return {k: group[k][()] for k in group}


def test_same_spec_same_inputs_byte_identical_outputs(applied: dict) -> None:
    folder = applied["folder"]
    kprune("apply", folder / "spec.yaml", "--output-dir", folder / "again",
           "--audit-log", folder / "again.json", cwd=folder).expect(0)
    assert sha256_file(str(folder / "again" / "small.keras")) == sha256_file(str(applied["output"]))
    first = applied["log"]
    second = json.loads((folder / "again.json").read_text())
    for key in ("zeroed", "spec", "tool"):
        assert first[key] == second[key]


RERUN_SPEC = """\
version: 1
output_dir: out
models:
  - path: m.keras
    layers: [{{name: conv2d, rules: [{{index: [{index}]}}]}}]
"""


@pytest.mark.parametrize("backend", ["direct", "keras"])
def test_a_rerun_leaves_an_up_to_date_output_as_it_was(tmp_path: Path, small_cnn: Path,
                                                       backend: str) -> None:
    """A nightly re-run of an unchanged spec on unchanged models rewrites nothing: the output
    keeps its inode and time stamps, and the log says so; a changed one is written again."""
    shutil.copy(small_cnn, tmp_path / "m.keras")
    spec = write_spec(tmp_path, RERUN_SPEC.format(index=0))
    out = tmp_path / "out" / "m.keras"

    def run(log: str) -> tuple[Any, dict]:
        result = kprune("apply", spec, "--backend", backend, "--audit-log", tmp_path / log,
                        cwd=tmp_path).expect(0)
        return result, json.loads((tmp_path / log).read_text())["models"][0]

    _, first = run("1.json")
    made, made_hash = os.stat(out), sha256_file(str(out))
    assert first["output"] == {"path": str(out), "sha256": made_hash, "written": True}
    again, second = run("2.json")
    kept = os.stat(out)
    assert (kept.st_ino, kept.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    assert second["output"] == {"path": str(out), "sha256": made_hash, "written": False}
    assert second["input"] == first["input"]
    assert again.stdout.splitlines()[0].endswith(
        f"-> {out} (unchanged: already held these bytes)"), again
    kprune("verify", tmp_path / "2.json").expect(0)
    report = kprune("report", tmp_path / "2.json").expect(0)
    assert f"-> {out} (already held these bytes: left as it was)" in report.stdout, report

    # a damaged output is not up to date: it is replaced by the right bytes
    damaged = bytearray(out.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    out.write_bytes(bytes(damaged))
    _, third = run("3.json")
    assert third["output"] == {"path": str(out), "sha256": made_hash, "written": True}
    assert os.stat(out).st_ino != made.st_ino

    # and so is the output of a changed spec
    spec.write_text(RERUN_SPEC.format(index=1))
    _, fourth = run("4.json")
    assert fourth["output"]["written"] is True
    assert fourth["output"]["sha256"] == sha256_file(str(out)) != made_hash
    assert sorted(os.listdir(out.parent)) == [".kprune.lock", "m.keras"]  # no temp file left


def test_default_audit_log_location_sorts_by_time(applied: dict) -> None:
    folder = applied["folder"]
    kprune("apply", folder / "spec.yaml", "--output-dir", "o2", cwd=folder).expect(0)
    kprune("apply", folder / "spec.yaml", "--output-dir", "o2", cwd=folder).expect(0)
    logs = sorted((folder / "o2" / "audit").glob("*.json"))
    assert len(logs) == 2
    started = [json.loads(p.read_text())["started_at"] for p in logs]
    assert started == sorted(started)
    assert logs[0].stem == json.loads(logs[0].read_text())["run_id"]


def test_h5_round_trip(tmp_path: Path, small_cnn_h5: Path, keras: Any) -> None:
    shutil.copy(small_cnn_h5, tmp_path / "m.h5")
    before = layer_weights(keras, tmp_path / "m.h5")
    spec = write_spec(tmp_path, """\
        version: 1
        models:
          - path: m.h5
            layers:
              - name: head_conv
                bias: keep
                rules: [{index: [0, 3]}]
        """)
    kprune("apply", spec).expect(0)
    out = tmp_path / "pruned" / "m.h5"
    assert h5py.is_hdf5(out)
    after = layer_weights(keras, out)
    mask = np.zeros(before["head_conv"]["kernel"].shape, bool)
    mask[..., [0, 3]] = True
    assert np.all(after["head_conv"]["kernel"][..., [0, 3]] == 0)
    assert "bias" not in after["head_conv"]  # use_bias=False is normal, not an error
    assert_only_changed(before, after, {("head_conv", "kernel"): mask})


def test_one_failed_model_does_not_stop_the_others(tmp_path: Path, small_cnn: Path) -> None:
    shutil.copy(small_cnn, tmp_path / "a.keras")
    shutil.copy(small_cnn, tmp_path / "b.keras")
    spec = write_spec(tmp_path, """\
        version: 1
        models:
          - path: a.keras
            layers: [{name: conv2d_9, rules: [{index: [0]}]}]
          - path: missing.keras
            layers: [{name: conv2d, rules: [{index: [0]}]}]
          - path: b.keras
            layers: [{name: conv2d, rules: [{index: [0]}]}]
        """)
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(1)
    assert result.stderr.splitlines() == [
        "error: model 'a': models[0].layers[0]: no layer named 'conv2d_9' in the model; did you "
        "mean 'conv2d_1'?",
        f"error: model 'missing': input file {tmp_path / 'missing.keras'} does not exist; check "
        f"the model's 'path' (relative to the spec file's folder)",
    ]
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["status"] == "partial"
    assert [m["status"] for m in log["models"]] == ["failed", "failed", "ok"]
    assert not (tmp_path / "pruned" / "a.keras").exists()
    assert (tmp_path / "pruned" / "b.keras").exists()
    assert {r["model"] for r in log["zeroed"]} == {"b"}


def test_fail_fast_skips_the_rest(tmp_path: Path, small_cnn: Path) -> None:
    shutil.copy(small_cnn, tmp_path / "b.keras")
    spec = write_spec(tmp_path, """\
        version: 1
        models:
          - path: missing.keras
            layers: [{name: conv2d, rules: [{index: [0]}]}]
          - path: b.keras
            layers: [{name: conv2d, rules: [{index: [0]}]}]
        """)
    result = kprune("apply", spec, "--fail-fast", "--audit-log", tmp_path / "log.json").expect(1)
    assert "skipped b: not run: an earlier model failed and --fail-fast is set" in result.stdout
    log = json.loads((tmp_path / "log.json").read_text())
    assert [m["status"] for m in log["models"]] == ["failed", "skipped"]
    assert log["status"] == "failed"
    assert not (tmp_path / "pruned").joinpath("b.keras").exists()


@pytest.mark.parametrize("layers, message", [
    ("[{name: logits, rules: [{index: [0]}]}]",
     ": models[0].layers[0]: layer 'logits' is a Dense layer; only convolution layers have filters"),
    ("[{name: conv2d, rules: [{index: [6]}]}]",
     ", layer 'conv2d': models[0].layers[0].rules[0]: index 6 is out of range: the layer has 6 "
     "filters (valid: 0..5)"),
    ("[{name: conv2d, rules: [{index: [0, 1, 2, 3]}]}]",
     ", layer 'conv2d': the rules would zero 4 of 6 filters (66.7%), more than max_fraction 0.5 "
     "allows (3); selected by models[0].layers[0].rules[0] (4); tighten the rules or raise "
     "max_fraction for this entry"),
    ("[{name: conv2d, max_fraction: 1.0, rules: [{index: [0, 1, 2]}, {index: [3, 4, 5]}]}]",
     ", layer 'conv2d': the rules would zero all 6 filters of the layer (selected by "
     "models[0].layers[0].rules[0] (3), models[0].layers[0].rules[1] (3)); if that is intended, "
     "set allow_empty_layer: true (and max_fraction: 1.0) on the entry"),
    ("[{match: 'dense*', rules: [{index: [0]}]}]",
     ": models[0].layers[0]: match 'dense*' matches no convolution layer; the model's convolution "
     "layers are: conv2d_1, conv2d, head_conv"),
    ("[{name: conv2d, bias: keep, rules: [{index: [0]}]}, {match: 'conv2d', rules: [{index: [1]}]}]",
     ", layer 'conv2d': models[0].layers[1] sets bias: zero, but models[0].layers[0] sets bias: keep "
     "for the same layer; give both entries the same value"),
    ("[{name: conv2d, rules: [{sign: {element: [0, 0, 9], zero: zero}}]}]",
     ", layer 'conv2d': models[0].layers[0].rules[0]: sign.element [0, 0, 9] is out of range on "
     "axis 2: the filter slice has shape [3, 3, 8]"),
])
def test_model_errors_are_one_clear_line(tmp_path: Path, small_cnn: Path, layers: str,
                                         message: str) -> None:
    shutil.copy(small_cnn, tmp_path / "m.keras")
    spec = write_spec(tmp_path, f"version: 1\nmodels:\n  - path: m.keras\n    layers: {layers}\n")
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(1)
    assert result.stderr == f"error: model 'm'{message}\n"
    assert not (tmp_path / "pruned" / "m.keras").exists()
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["models"][0]["error"] == f"model 'm'{message}"


def test_allow_empty_layer(tmp_path: Path, small_cnn: Path, keras: Any) -> None:
    shutil.copy(small_cnn, tmp_path / "m.keras")
    spec = write_spec(tmp_path, """\
        version: 1
        models:
          - path: m.keras
            layers:
              - {name: conv2d, max_fraction: 1.0, allow_empty_layer: true, rules: [{l1: {above: 0}}]}
        """)
    kprune("apply", spec).expect(0)
    after = layer_weights(keras, tmp_path / "pruned" / "m.keras")
    assert not after["conv2d"]["kernel"].any() and not after["conv2d"]["bias"].any()


def test_invalid_spec_exits_2_and_writes_no_log(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "version: 1\nmodels: []\n")
    result = kprune("apply", spec).expect(2)
    assert result.stderr == f"{spec}:2:9: models: must not be empty\n"
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("backend", ["direct", "keras"])
def test_h5_keeps_training_config_and_optimizer_weights(tmp_path: Path, small_cnn_h5: Path,
                                                        keras: Any, backend: str) -> None:
    """Keras 3 re-saves a legacy .h5 without its optimizer (it is loaded uncompiled), so the
    Keras backend must carry training_config and optimizer_weights over from the input."""
    model, output = apply_with_backend(tmp_path, small_cnn_h5, backend)
    with h5py.File(model, "r") as fin, h5py.File(output, "r") as fout:
        assert fout.attrs["training_config"] == fin.attrs["training_config"]
        names: list[str] = []
        fin["optimizer_weights"].visit(names.append)
        out_names: list[str] = []
        fout["optimizer_weights"].visit(out_names.append)
        assert names and out_names == names
        datasets = [n for n in names if isinstance(fin["optimizer_weights"][n], h5py.Dataset)]
        assert len(datasets) > 2
        for name in datasets:
            assert np.array_equal(fin["optimizer_weights"][name][()],
                                  fout["optimizer_weights"][name][()]), name
    assert not layer_weights(keras, output)["conv2d"]["kernel"][..., 2].any()


def test_jobs_runs_models_in_parallel_with_the_same_result(tmp_path: Path, small_cnn: Path) -> None:
    lines = ["version: 1", "models:"]
    for i in range(3):
        shutil.copy(small_cnn, tmp_path / f"m{i}.keras")
        lines += [f"  - path: m{i}.keras", f"    layers: [{{name: conv2d, rules: [{{index: [{i}]}}]}}]"]
    lines += ["  - path: missing.keras", "    layers: [{name: conv2d, rules: [{index: [0]}]}]"]
    spec = write_spec(tmp_path, "\n".join(lines) + "\n")
    kprune("apply", spec, "--output-dir", "serial", "--audit-log", "serial.json",
           cwd=tmp_path).expect(1)
    result = kprune("apply", spec, "--jobs", "2", "--output-dir", "parallel", "--audit-log",
                    "parallel.json", cwd=tmp_path).expect(1)
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal
    serial = json.loads((tmp_path / "serial.json").read_text())
    parallel = json.loads((tmp_path / "parallel.json").read_text())
    assert [m["status"] for m in parallel["models"]] == ["ok", "ok", "ok", "failed"]
    assert parallel["zeroed"] == serial["zeroed"]
    for i in range(3):
        assert sha256_file(str(tmp_path / "serial" / f"m{i}.keras")) == \
            sha256_file(str(tmp_path / "parallel" / f"m{i}.keras"))


@pytest.mark.parametrize("path, value, message", [
    (("zeroed", 0, "filter"), -1, "zeroed[0].filter: -1 is less than the minimum of 0"),
    (("zeroed", 0, "rules"), [], "zeroed[0].rules: [] should be non-empty"),
    (("models", 0, "status"), "fine", "models[0].status: 'fine' is not one of ['ok', 'failed', "
                                      "'skipped']"),
    (("zeroed", 0, "stats", "l1"), "big",
     "zeroed[0].stats.l1: 'big' is not of type 'number', 'null'"),  # null: a NaN/inf slice
])
def test_validate_log_finds_what_jsonschema_finds(applied: dict, path: tuple, value: Any,
                                                  message: str) -> None:
    from kprune_batch.audit import validate_log

    log = copy.deepcopy(applied["log"])
    assert validate_log(log) == []
    jsonschema.validate(log, load_schema("audit"))
    node = log
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    assert validate_log(log) == [message]
