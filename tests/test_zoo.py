"""keras.applications models nobody here wrote (operation nodes, nested Sequentials): zeroed, probed, verified."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from conftest import kprune, write_spec

ZOO = {
    # `x + 3.0` / `x * (1/6)` of hard_sigmoid are keras.src.ops.numpy nodes; SE blocks
    "mnv3": lambda keras: keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), minimalistic=False, include_preprocessing=True),
    # a nested Sequential stem starting with keras.Input, Sequentials fed by ops.numpy.Add,
    # grouped (depthwise) Conv2D, LayerScale, LayerNormalization
    "cnx": lambda keras: keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3)),
}


@pytest.fixture(scope="session")
def zoo(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zoo")
    rng = np.random.default_rng(19)
    for name, build in ZOO.items():
        model = build(keras)
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):  # trained-looking statistics
                n = layer.moving_mean.shape[0]
                layer.moving_mean.assign(rng.normal(0.0, 0.5, n).astype("float32"))
                layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
        model.save(folder / f"{name}.keras")
    return folder


def _weights(path: Path) -> dict[str, list[np.ndarray]]:
    """{layer name: its variables in order} read from the .keras file's HDF5 member with h5py:
    Keras 3 writes each layer's name beside its `vars` group."""
    with zipfile.ZipFile(path) as zf:
        blob = zf.read("model.weights.h5")
    out: dict[str, list[np.ndarray]] = {}
    with h5py.File(io.BytesIO(blob), "r") as h5:
        def visit(name: str, obj: Any) -> None:
            if name.endswith("/vars") and isinstance(obj, h5py.Group) and len(obj):
                out[str(obj.attrs["name"])] = [obj[str(i)][()] for i in range(len(obj))]
        h5.visititems(visit)
    return out


def _filters(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    """(filters, -1): Conv2D filters on the last axis; DepthwiseConv2D channel c*mult+m."""
    if depthwise:
        kernel = kernel.reshape(kernel.shape[:-2] + (-1,))
    return np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)


@pytest.mark.slow
def test_zoo_zero_probe_verify(zoo: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "version: 1\nmodels:\n" + "".join(
        f"  - {{path: {zoo / name}.keras, layers: [{{match: '*', rules: "
        f"[{{smallest: {{by: l1, fraction: 0.25}}}}]}}]}}\n" for name in ZOO))
    kprune("apply", spec, "--probe", "--audit-log", tmp_path / "log.json").expect(0)
    kprune("verify", tmp_path / "log.json").expect(0)
    log = json.loads((tmp_path / "log.json").read_text())
    for entry in log["models"]:
        # operation nodes hold no weights: the direct backend maps the file without Keras
        assert (entry["status"], entry["backend"]) == ("ok", "direct"), entry
        assert entry["probe"]["status"] == "ok"
        before = _weights(zoo / f"{entry['name']}.keras")
        after = _weights(tmp_path / "pruned" / f"{entry['name']}.keras")
        records = [r for r in log["zeroed"] if r["model"] == entry["name"]]
        classes = {r["layer"]: r["layer_class"] for r in records}
        convs = {name for name, v in before.items() if v[0].ndim == 4}
        assert {layer.rsplit("/", 1)[-1] for layer in classes} == convs  # every conv
        for layer, cls in classes.items():
            name = layer.rsplit("/", 1)[-1]
            old = _filters(before[name][0], cls == "DepthwiseConv2D")
            new = _filters(after[name][0], cls == "DepthwiseConv2D")
            l1 = np.abs(old.astype(np.float64)).sum(axis=1)
            want = sorted(sorted(range(len(l1)), key=lambda f: (l1[f], f))[:len(l1) // 4])
            got = sorted(r["filter"] for r in records if r["layer"] == layer)
            assert got == want, layer
            assert not new[want].any()
            kept = [f for f in range(len(l1)) if f not in want]
            assert np.array_equal(new[kept].view(np.uint8), old[kept].view(np.uint8))
            if len(before[name]) > 1:  # its bias
                assert not after[name][1][want].any()
        for r in records:  # a channel claimed silent measured 0 where it was judged
            if r["silent"]:
                assert r["probe"]["max_abs"] == 0.0
