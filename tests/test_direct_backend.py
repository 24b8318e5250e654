"""The direct backend gives bit-identical weights and equal audit records to the Keras backend."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import _seeded_weights, assert_only_changed, kprune, layer_weights, write_spec
from kprune_batch.executor import open_auto, open_direct, open_keras, run_job
from kprune_batch.plan import compile_plan
from kprune_batch.spec import read_spec

EVERY_CONV = """\
version: 1
output_dir: {out}
models:
  - path: {model}
    layers:
      - {{match: "*", max_fraction: 1.0, rules: [{{index: [0]}}, {{mean: {{below: -0.2}}}}]}}
"""


def both_backends(model: Path, folder: Path, spec_text: str = EVERY_CONV) -> tuple[Any, Any]:
    outcomes = []
    for name, opener in (("keras", open_keras), ("direct", open_direct)):
        spec = write_spec(folder, spec_text.format(out=f"out-{name}", model=model.name),
                          f"{name}.yaml")
        (job,) = compile_plan(read_spec(spec)).jobs
        outcome = run_job(job, opener=opener)
        assert outcome.status == "ok", outcome.error
        assert outcome.backend == name
        outcomes.append(outcome)
    return outcomes[0], outcomes[1]


def assert_equivalent(keras: Any, folder: Path, model: Path, by_keras: Any, direct: Any) -> None:
    assert by_keras.zeroed and by_keras.zeroed == [
        {**r, "probe": "skipped"} for r in direct.zeroed]
    a = layer_weights(keras, folder / "out-keras" / model.name)
    b = layer_weights(keras, folder / "out-direct" / model.name)
    assert a.keys() == b.keys()
    for layer in a:
        for var in a[layer]:
            x, y = np.atleast_1d(a[layer][var]), np.atleast_1d(b[layer][var])
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), \
                f"{layer}/{var} differs between backends"
    if model.suffix == ".keras":
        with zipfile.ZipFile(model) as zin, zipfile.ZipFile(folder / "out-direct" /
                                                            model.name) as zout:
            for i, o in zip(zin.infolist(), zout.infolist(), strict=True):
                assert (i.filename, i.date_time, i.compress_type) == \
                    (o.filename, o.date_time, o.compress_type)
                if i.filename != "model.weights.h5":
                    assert zin.read(i) == zout.read(o)


def test_small_functional_with_colliding_names(keras: Any, tmp_path: Path,
                                                small_cnn: Path) -> None:
    shutil.copy(small_cnn, tmp_path / small_cnn.name)
    by_keras, direct = both_backends(tmp_path / small_cnn.name, tmp_path)
    assert_equivalent(keras, tmp_path, tmp_path / small_cnn.name, by_keras, direct)
    assert any(r["batchnorm"] for r in direct.zeroed)  # bn follower edited the same way
    # the direct output is the input with only the edited values' bytes (and the CRC) changed
    src = (tmp_path / small_cnn.name).read_bytes()
    out = (tmp_path / "out-direct" / small_cnn.name).read_bytes()
    assert len(src) == len(out)
    changed = np.flatnonzero(np.frombuffer(src, np.uint8) != np.frombuffer(out, np.uint8))
    edited_values = sum(1 + (1 if r["bias"] == "zeroed" else 0) for r in direct.zeroed)
    assert 0 < len(changed) <= 4 * (3 * 3 * 8 * len(direct.zeroed) + edited_values) + 8
    with zipfile.ZipFile(tmp_path / "out-direct" / small_cnn.name) as zf:
        assert zf.testzip() is None  # every member's CRC-32 is right


def test_legacy_h5(keras: Any, tmp_path: Path, small_cnn_h5: Path) -> None:
    shutil.copy(small_cnn_h5, tmp_path / "small.h5")
    by_keras, direct = both_backends(tmp_path / "small.h5", tmp_path)
    assert_equivalent(keras, tmp_path, tmp_path / "small.h5", by_keras, direct)
    # the direct copy keeps every other byte: optimizer state and training config untouched
    import h5py

    with h5py.File(tmp_path / "small.h5") as fin, h5py.File(tmp_path / "out-direct" /
                                                           "small.h5") as fout:
        assert fin.attrs["training_config"] == fout.attrs["training_config"]


@pytest.fixture(scope="module")
def custom_models(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("custom")
    L = keras.layers
    seq = keras.Sequential([keras.Input((10, 10, 3)), L.Conv2D(6, 3, name="a"),
                            L.BatchNormalization(scale=False, name="bn"),
                            L.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
                            L.SeparableConv2D(5, 3, use_bias=False, name="sep"),
                            L.Conv2DTranspose(4, 2, name="up")], name="seq")
    inner = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(5, 3, name="conv2d_1"),
                              L.Conv2D(4, 1, name="conv2d")], name="inner")
    ii = keras.Input((6, 6, 4))
    block = keras.Model(ii, L.Conv2D(3, 1, name="conv2d")(ii), name="block")
    i = keras.Input((8, 8, 3))
    nested = keras.Model(i, L.Conv2D(4, 1, name="head")(block(inner(i))), name="nested")
    paths = {}
    for n, model in enumerate((seq, nested)):
        _seeded_weights(model, 30 + n)
        paths[model.name] = folder / f"{model.name}.keras"
        model.save(paths[model.name])
    return paths


@pytest.mark.parametrize("name", ["seq", "nested"])
def test_sequential_and_nested(keras: Any, tmp_path: Path, custom_models: dict[str, Path],
                               name: str) -> None:
    shutil.copy(custom_models[name], tmp_path / f"{name}.keras")
    by_keras, direct = both_backends(tmp_path / f"{name}.keras", tmp_path)
    assert_equivalent(keras, tmp_path, tmp_path / f"{name}.keras", by_keras, direct)
    layers = {r["layer"] for r in direct.zeroed}
    if name == "nested":
        assert {"inner/conv2d_1", "inner/conv2d", "block/conv2d", "head"} <= layers


APPLICATIONS = [
    ("ResNet50", (64, 64, 3)), ("MobileNetV2", (64, 64, 3)), ("VGG16", (32, 32, 3)),
    ("DenseNet121", (64, 64, 3)), ("EfficientNetB0", (64, 64, 3)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, shape", APPLICATIONS)
def test_keras_applications(keras: Any, tmp_path: Path, name: str, shape: tuple) -> None:
    model = getattr(keras.applications, name)(weights=None, input_shape=shape, classes=10)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    del model
    spec = """\
version: 1
output_dir: {out}
models:
  - path: {model}
    layers:
      - {{match: "*", max_fraction: 0.5, rules: [{{index: [0]}}]}}
"""
    by_keras, direct = both_backends(path, tmp_path, spec)
    assert len(direct.zeroed) > 10
    assert_equivalent(keras, tmp_path, path, by_keras, direct)


def test_auto_falls_back_and_says_why(tmp_path: Path, keras: Any) -> None:
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 1, name="conv2d")(inputs)
    keras.Model(inputs, keras.layers.Lambda(lambda t: t + 1.0, name="f")(x)).save(
        tmp_path / "lam.keras")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: lam.keras\n"
                                "    layers: [{name: conv2d, rules: [{index: [0]}]}]\n")
    (job,) = compile_plan(read_spec(spec)).jobs
    outcome = run_job(job, opener=open_auto)
    assert outcome.status == "failed" and "Lambda" in outcome.error  # Keras safe mode decided
    result = kprune("apply", spec, "--backend", "direct").expect(1)
    assert result.stderr == (f"error: {tmp_path / 'lam.keras'}: model 'lam': the direct backend "
                             f"cannot edit this file: the model contains a Lambda layer; use "
                             f"--backend auto or --backend keras\n")


def test_auto_fallback_that_succeeds_is_logged_with_its_reason(keras: Any, tmp_path: Path,
                                                               small_cnn: Path) -> None:
    """A .keras without the layer name Keras 3 writes beside a layer's variables (the `name`
    attribute of layers/<group>/vars, keras/src/saving/saving_lib.py H5IOStore._create_h5_group;
    older writers leave it out, and Keras's loader never reads it): the direct backend cannot
    prove which group holds layer 'conv2d', so auto falls back to Keras, which edits it right
    and the log says which backend did the work and why."""
    import h5py

    model = tmp_path / "m.keras"
    with zipfile.ZipFile(small_cnn) as zin, zipfile.ZipFile(model, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "model.weights.h5":
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "r+") as f:
                    # conv2d is the second Conv2D, so Keras stores it as layers/conv2d_1
                    assert f["layers/conv2d_1/vars"].attrs["name"] == "conv2d"
                    del f["layers/conv2d_1/vars"].attrs["name"]
                data = buffer.getvalue()
            zout.writestr(info, data)
    before = layer_weights(keras, model)  # Keras loads it as before
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: m.keras\n"
                                "    layers: [{name: conv2d, rules: [{index: [0, 4]}]}]\n")
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(0)
    assert result.stderr == ""
    log = json.loads((tmp_path / "log.json").read_text())
    (logged,) = log["models"]
    assert (logged["status"], logged["backend"], logged["backend_note"]) == (
        "ok", "keras", "cannot confirm where layer 'conv2d' is stored (/layers/conv2d_1)")
    assert [(r["layer"], r["filter"]) for r in log["zeroed"]] == [("conv2d", 0), ("conv2d", 4)]
    after = layer_weights(keras, tmp_path / "pruned" / "m.keras")
    mask = {"kernel": np.zeros(before["conv2d"]["kernel"].shape, bool),
            "bias": np.zeros(before["conv2d"]["bias"].shape, bool)}
    mask["kernel"][..., [0, 4]] = True
    mask["bias"][[0, 4]] = True
    assert not after["conv2d"]["kernel"][..., [0, 4]].any()
    assert not after["conv2d"]["bias"][[0, 4]].any()
    assert_only_changed(before, after, {("conv2d", v): m for v, m in mask.items()})
    kprune("verify", tmp_path / "log.json").expect(0)


def test_direct_apply_imports_no_tensorflow(tmp_path: Path, small_cnn: Path) -> None:
    shutil.copy(small_cnn, tmp_path / "m.keras")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: m.keras\n"
                                "    layers: [{name: conv2d_1, rules: [{index: [0]}]}]\n")
    code = ("import sys; from kprune_batch.cli import main; "
            "sys.argv = ['kprune', 'apply', sys.argv[1], '--audit-log', sys.argv[2]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('EXIT', code, sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code, str(spec), str(tmp_path / "log.json")],
                         capture_output=True, text=True)
    assert out.stdout.splitlines()[-1] == "EXIT 0 []", out.stdout + out.stderr
    log = json.loads((tmp_path / "log.json").read_text())
    (model,) = log["models"]
    assert (model["backend"], model["backend_note"], model["static_check"]) == \
        ("direct", None, "ok")
    assert {r["probe"] for r in log["zeroed"]} == {"skipped"}


def test_compressed_weights_member_is_rewritten_not_patched(keras: Any, tmp_path: Path,
                                                            small_cnn: Path) -> None:
    """A .keras whose weights entry is deflated (re-zipped by some tool) takes the rewrite path:
    same entries, order, time stamps and compression, same weights as the Keras backend."""
    with zipfile.ZipFile(small_cnn) as zin, zipfile.ZipFile(tmp_path / "small.keras", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            copy.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(copy, data)
    by_keras, direct = both_backends(tmp_path / "small.keras", tmp_path)
    assert_equivalent(keras, tmp_path, tmp_path / "small.keras", by_keras, direct)
    with zipfile.ZipFile(tmp_path / "out-direct" / "small.keras") as zf:
        assert zf.testzip() is None
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_static_check_finds_an_edit_that_did_not_land(tmp_path: Path, small_cnn: Path,
                                                      small_cnn_h5: Path, suffix: str) -> None:
    """The static check reads the written file back (sharing the input's proven mapping): a
    record whose edit is not in the file fails the model."""
    from kprune_batch.backends.direct import DirectModelWeights
    from kprune_batch.errors import ModelError
    from kprune_batch.executor import static_check

    source = small_cnn if suffix == ".keras" else small_cnn_h5
    model = tmp_path / f"m{suffix}"
    shutil.copy(source, model)
    spec = write_spec(tmp_path, f"version: 1\nmodels:\n  - path: m{suffix}\n"
                                f"    layers: [{{name: conv2d, rules: [{{index: [2]}}]}}]\n")
    (job,) = compile_plan(read_spec(spec)).jobs
    outcome = run_job(job, opener=open_direct)
    assert outcome.status == "ok" and outcome.static_check == "ok", outcome.error
    layout = DirectModelWeights(str(model), "m")
    try:
        assert static_check(job.output, job, outcome.zeroed, layout) == "ok"
        claims = [{**outcome.zeroed[0], "filter": 3}]  # filter 3 was never zeroed
        with pytest.raises(ModelError) as err:
            static_check(job.output, job, claims, layout)
    finally:
        layout.close()
    assert err.value.render() == (
        "model 'm', layer 'conv2d': the written file does not hold the edit of filter 3 (kernel "
        "slice, bias); nothing was written; please report this as a bug, with the audit log")


def test_static_check_finds_a_batchnorm_edit_that_did_not_land(tmp_path: Path,
                                                               small_cnn: Path) -> None:
    """The BatchNorm edits are checked per record too: a recorded value the file does not hold
    (here one no edit wrote) names the follower's variable."""
    from kprune_batch.backends.direct import DirectModelWeights
    from kprune_batch.errors import ModelError
    from kprune_batch.executor import static_check

    model = tmp_path / "m.keras"
    shutil.copy(small_cnn, model)
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: m.keras\n"
                                "    layers: [{name: conv2d_1, rules: [{index: [1, 5]}]}]\n")
    (job,) = compile_plan(read_spec(spec)).jobs
    outcome = run_job(job, opener=open_direct)
    assert outcome.status == "ok" and outcome.static_check == "ok", outcome.error
    second = outcome.zeroed[1]
    assert second["filter"] == 5 and second["batchnorm"]  # neutralised: the BN is edited
    edit = second["batchnorm"][-1]
    claims = [outcome.zeroed[0], {**second, "batchnorm": second["batchnorm"][:-1] + [
        {**edit, "value": 0.5}]}]
    layout = DirectModelWeights(str(model), "m")
    try:
        assert static_check(job.output, job, outcome.zeroed, layout) == "ok"
        with pytest.raises(ModelError) as err:
            static_check(job.output, job, claims, layout)
    finally:
        layout.close()
    assert err.value.render() == (
        f"model 'm', layer 'conv2d_1': the written file does not hold the edit of filter 5 "
        f"(bn.{edit['variable']}); nothing was written; please report this as a bug, with the "
        f"audit log")


@pytest.mark.parametrize("suffix, saves", [(".keras", 0), (".h5", 1)])
def test_rerun_with_an_up_to_date_output(tmp_path: Path, small_cnn: Path, small_cnn_h5: Path,
                                         monkeypatch: pytest.MonkeyPatch, suffix: str,
                                         saves: int) -> None:
    """A .keras output that already holds the patched bytes is found so in the one read pass
    (nothing written, not even a temp file); a .h5 is written to a temp file and compared."""
    from kprune_batch.backends.direct import DirectModelWeights

    model = tmp_path / f"m{suffix}"
    shutil.copy(small_cnn if suffix == ".keras" else small_cnn_h5, model)
    spec = write_spec(tmp_path, f"version: 1\nmodels:\n  - path: m{suffix}\n"
                                f"    layers: [{{name: conv2d, rules: [{{index: [2]}}]}}]\n")
    (job,) = compile_plan(read_spec(spec)).jobs
    first = run_job(job, opener=open_direct)
    assert first.status == "ok" and first.written is True, first.error
    calls = []
    real_save = DirectModelWeights.save

    def counting_save(self: Any, tmp: str) -> None:
        calls.append(tmp)
        real_save(self, tmp)

    monkeypatch.setattr(DirectModelWeights, "save", counting_save)
    second = run_job(job, opener=open_direct)
    assert second.status == "ok" and second.written is False, second.error
    assert second.static_check == "ok"
    assert (second.input_sha256, second.output_sha256) == (first.input_sha256, first.output_sha256)
    assert len(calls) == saves


@pytest.mark.parametrize("read_first", [True, False])
def test_patched_crc_with_and_without_the_old_bytes_read(tmp_path: Path, small_cnn: Path,
                                                         read_first: bool) -> None:
    """The weights member's new CRC-32 is right whether the edited datasets' old bytes were
    read through the backend first (their CRC taken from that read) or never (read from the
    file): the member's CRC, recomputed here by zipfile, holds and the written values are the
    assigned ones."""
    from kprune_batch.backends.direct import DirectModelWeights

    weights = DirectModelWeights(str(small_cnn), "small")
    try:
        if read_first:
            weights.variables("conv2d_1")
        kernel = np.full((3, 3, 3, 8), 0.5, dtype=np.float32)
        weights.assign("conv2d_1", "kernel", kernel)
        weights.assign("conv2d_1", "bias", np.arange(8, dtype=np.float32))
        weights.save(str(tmp_path / "out.keras"))
    finally:
        weights.close()
    with zipfile.ZipFile(tmp_path / "out.keras") as zf:
        assert zf.testzip() is None
    written = DirectModelWeights(str(tmp_path / "out.keras"), "small")
    try:
        values = written.variables("conv2d_1")
        assert np.array_equal(values["kernel"], kernel)
        assert values["bias"].tolist() == list(range(8))
    finally:
        written.close()
