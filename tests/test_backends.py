"""The Keras-backend paths (apply --backend keras, --probe, action: remove, verify) under jax and torch."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import _seeded_weights, kprune, layer_weights, write_spec

BACKENDS = ["jax", "torch"]


@pytest.fixture(scope="session")
def residual(keras: Any, models_dir: Path) -> Path:
    """A compiled functional model with BN and a residual Add (TensorFlow backend)."""
    i = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(i)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu", name="act")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    y = keras.layers.BatchNormalization(name="bn2")(y)
    z = keras.layers.Add(name="add")([x, y])
    z = keras.layers.Conv2D(6, 1, name="c3")(z)
    z = keras.layers.GlobalAveragePooling2D(name="gap")(z)
    model = keras.Model(i, keras.layers.Dense(3, name="logits")(z))
    _seeded_weights(model, 3)
    model.compile(optimizer="adam", loss="mse")
    path = models_dir / "residual.keras"
    model.save(path)
    return path


def _spec(folder: Path, model: Path) -> Path:
    return write_spec(folder, f"""
        version: 1
        output_dir: out
        models:
          - name: zero
            path: {model}
            output: zero.keras
            layers: [{{name: c1, rules: [{{index: [1, 2]}}]}}]
          - name: remove
            path: {model}
            output: remove.keras
            layers: [{{name: c3, action: remove, rules: [{{index: [0, 4]}}]}}]
          - name: measured
            path: {model}
            output: measured.keras
            samples: x.npy
            impact: {{max_relative_diff: 100}}
            layers: [{{name: c1, rules: [{{index: [1, 2]}}]}}]
        """)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_paths_under_backend(backend: str, keras: Any, residual: Path,
                                   tmp_path: Path) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (CI installs it: .ci/run)")
    spec = _spec(tmp_path, residual)
    x = np.random.default_rng(5).normal(size=(16, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    env = {"KERAS_BACKEND": backend}
    log = tmp_path / "log.json"
    kprune("apply", spec, "--backend", "keras", "--probe", "--audit-log", log, cwd=tmp_path,
           env=env).expect(0)
    kprune("verify", log, cwd=tmp_path, env=env).expect(0)
    record = json.loads(log.read_text())
    assert record["tool"]["backend"] == backend
    assert record["tool"][backend] == importlib.metadata.version(backend)
    outputs = {m["name"]: Path(m["output"]["path"]) for m in record["models"]}
    before = layer_weights(keras, residual)  # the test process runs TensorFlow
    zeroed = layer_weights(keras, outputs["zero"])
    for layer, variables in before.items():
        for name, old in variables.items():
            new = zeroed[layer][name]
            if layer == "c1" and name == "kernel":
                old = old.copy()
                old[..., [1, 2]] = 0
            elif layer == "c1" and name == "bias":
                old = old.copy()
                old[[1, 2]] = 0
            elif layer == "bn1" and name in ("gamma", "beta"):
                old = old.copy()
                old[[1, 2]] = 0
            assert np.array_equal(old, new), (layer, name)
    removed = layer_weights(keras, outputs["remove"])
    kept = [f for f in range(6) if f not in (0, 4)]
    assert np.array_equal(removed["c3"]["kernel"], before["c3"]["kernel"][..., kept])
    assert np.array_equal(removed["c3"]["bias"], before["c3"]["bias"][kept])
    assert removed["logits"]["kernel"].shape == (4, 3)
    # samples + a guard under the backend: the logged impact is what TensorFlow measures here
    impact = next(m for m in record["models"] if m["name"] == "measured")["impact"]
    want = np.abs(keras.saving.load_model(residual).predict(x, verbose=0)
                  - keras.saving.load_model(outputs["measured"]).predict(x, verbose=0)).max()
    assert want > 0 and impact["samples"]["count"] == 16
    assert impact["max_abs_diff"] == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    for out in ("zero", "remove", "measured"):  # loads, compiled, under TensorFlow
        loaded = keras.saving.load_model(outputs[out])
        assert type(loaded.optimizer).__name__ == "Adam"
