"""Every convolution family zeroed on the right axis, nested models, through the real CLI.

Expected elements are written out per family here with plain indexing (not via families.py).
"""
from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import pytest

from conftest import _seeded_weights, assert_only_changed, kprune, layer_weights, write_spec

# How filter f sits in each layer's kernel, spelled out independently of kprune's table.
KERNEL_MASKS: dict[str, tuple[str, Callable[[np.ndarray, int], None]]] = {
    "Conv": ("kernel", lambda m, f: m.__setitem__((..., f), True)),
    "Transpose": ("kernel", lambda m, f: m.__setitem__((..., f, slice(None)), True)),
    "Depthwise": ("kernel", lambda m, f: m.__setitem__((..., f // m.shape[-1], f % m.shape[-1]),
                                                       True)),
    "Separable": ("pointwise_kernel", lambda m, f: m.__setitem__((..., f), True)),
}


def family_key(cls: str) -> str:
    if "Transpose" in cls:
        return "Transpose"
    if cls.startswith("Depthwise"):
        return "Depthwise"
    if cls.startswith("Separable"):
        return "Separable"
    return "Conv"


@pytest.fixture(scope="module")
def zoo(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three models covering every family, plus a nested one; layer name -> (class, filters)."""
    folder = tmp_path_factory.mktemp("zoo")
    L = keras.layers
    i2 = keras.Input((12, 12, 4), name="in2")
    x = L.Conv2D(6, 3, groups=2, padding="same", name="grouped")(i2)
    x = L.Conv2DTranspose(5, 3, padding="same", name="up")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = L.SeparableConv2D(7, 3, depth_multiplier=2, padding="same", name="sep")(x)
    x = L.Conv2D(4, 1, use_bias=False, name="nobias")(x)
    x = L.Permute((3, 1, 2), name="to_cf")(x)
    x = L.Conv2D(3, 3, data_format="channels_first", name="cf")(x)
    m2 = keras.Model(i2, x, name="zoo2")
    i1 = keras.Input((16, 3), name="in1")
    y = L.Conv1D(6, 3, name="c1d")(i1)
    y = L.Conv1DTranspose(4, 3, name="t1d")(y)
    y = L.DepthwiseConv1D(3, depth_multiplier=3, name="dw1d")(y)
    y = L.SeparableConv1D(5, 3, name="sep1d")(y)
    m1 = keras.Model(i1, y, name="zoo1")
    i3 = keras.Input((6, 6, 6, 2), name="in3")
    z = L.Conv3D(4, 2, name="c3d")(i3)
    z = L.Conv3DTranspose(3, 2, name="t3d")(z)
    m3 = keras.Model(i3, z, name="zoo3")
    # nested: a Sequential backbone and a functional block inside a functional block
    backbone = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(5, 3, name="c1"),
                                 L.Conv2D(4, 1, name="c2")], name="backbone")
    ii = keras.Input((6, 6, 4))
    inner = keras.Model(ii, L.Conv2D(3, 1, name="conv")(ii), name="inner")
    oi = keras.Input((6, 6, 4))
    outer = keras.Model(oi, inner(oi), name="outer")
    ni = keras.Input((8, 8, 3), name="image")
    mn = keras.Model(ni, L.Conv2D(2, 1, name="head")(outer(backbone(ni))), name="nested")
    paths = {}
    for i, model in enumerate((m2, m1, m3, mn)):
        _seeded_weights(model, 10 + i)
        paths[model.name] = folder / f"{model.name}.keras"
        model.save(paths[model.name])
    return {"folder": folder, "paths": paths}


SELECTIONS = {
    "zoo2": {"grouped": [0, 5], "up": [1, 4], "dw": [0, 3, 7], "sep": [2, 6], "nobias": [1],
             "cf": [2]},
    "zoo1": {"c1d": [1, 2], "t1d": [3], "dw1d": [0, 4, 8], "sep1d": [0, 1]},
    "zoo3": {"c3d": [3], "t3d": [0]},
    "nested": {"backbone/c1": [0, 4], "outer/inner/conv": [1], "head": [0]},
}


@pytest.fixture(scope="module")
def zoo_applied(zoo: dict[str, Any]) -> dict[str, Any]:
    lines = ["version: 1", "output_dir: out", "models:"]
    for model, layers in SELECTIONS.items():
        lines += [f"  - path: {model}.keras", "    layers:"]
        for layer, filters in layers.items():
            lines.append(f"      - {{name: '{layer}', rules: [{{index: {filters}}}]}}")
    spec = write_spec(zoo["folder"], "\n".join(lines) + "\n")
    result = kprune("apply", spec, "--audit-log", zoo["folder"] / "log.json", "--probe").expect(0)
    return {"log": json.loads((zoo["folder"] / "log.json").read_text()), "result": result}


@pytest.mark.parametrize("model", list(SELECTIONS))
def test_each_family_zeroed_on_its_axis(keras: Any, zoo: dict, zoo_applied: dict,
                                        model: str) -> None:
    before = layer_weights(keras, zoo["paths"][model])
    after = layer_weights(keras, zoo["folder"] / "out" / f"{model}.keras")
    classes = {r["layer"]: r["layer_class"] for r in zoo_applied["log"]["zeroed"]
               if r["model"] == model}
    allowed = {}
    for layer, filters in SELECTIONS[model].items():
        var, mark = KERNEL_MASKS[family_key(classes[layer])]
        mask = np.zeros(before[layer][var].shape, bool)
        for f in filters:
            mark(mask, f)
        # each filter owns exactly 1/n of the kernel: the mask is neither too small nor broadcast
        assert mask.sum() == len(filters) * (mask.size // _n_filters(classes[layer], mask))
        assert np.all(after[layer][var][mask] == 0), layer
        allowed[(layer, var)] = mask
        if "bias" in before[layer]:
            bias_mask = np.zeros(before[layer]["bias"].shape, bool)
            bias_mask[filters] = True
            assert np.all(after[layer]["bias"][filters] == 0)
            allowed[(layer, "bias")] = bias_mask
    assert_only_changed(before, after, allowed)


def _n_filters(cls: str, kernel: np.ndarray) -> int:
    key = family_key(cls)
    if key == "Transpose":
        return kernel.shape[-2]
    if key == "Depthwise":
        return kernel.shape[-2] * kernel.shape[-1]
    return kernel.shape[-1]


def test_every_record_is_silent_and_probed(zoo_applied: dict) -> None:
    zeroed = zoo_applied["log"]["zeroed"]
    expected = {(m, layer, f) for m, layers in SELECTIONS.items()
                for layer, filters in layers.items() for f in filters}
    assert {(r["model"], r["layer"], r["filter"]) for r in zeroed} == expected
    assert all(r["silent"] for r in zeroed)
    assert all(r["probe"] == {"max_abs": 0.0, "layer_max_abs": 0.0} for r in zeroed)
    assert {r["layer"]: r["bias"] for r in zeroed}["nobias"] == "none"
    assert {r["layer"]: r["layer_class"] for r in zeroed}["outer/inner/conv"] == "Conv2D"
    for model in zoo_applied["log"]["models"]:
        assert model["probe"]["max_abs"] == 0.0


def test_nested_layer_is_found_by_path_and_glob(zoo: dict) -> None:
    spec = write_spec(zoo["folder"], """\
        version: 1
        output_dir: out-glob
        models:
          - path: nested.keras
            layers:
              - {match: "*/c?", rules: [{index: [0]}]}
        """, "glob.yaml")
    result = kprune("plan", spec).expect(0)
    assert result.stdout.splitlines()[1:] == [
        "  backbone/c1 (Conv2D, 5 filters): would zero 0 (1 of 5, 20.0%)",
        "    models[0].layers[0].rules[0]: 0",
        "  backbone/c2 (Conv2D, 4 filters): would zero 0 (1 of 4, 25.0%)",
        "    models[0].layers[0].rules[0]: 0",
    ]
    bad = write_spec(zoo["folder"], """\
        version: 1
        output_dir: out-glob
        models:
          - path: nested.keras
            layers:
              - {name: backbone/c1x, rules: [{index: [0]}]}
        """, "bad.yaml")
    result = kprune("plan", bad).expect(1)
    assert result.stderr == "error: model 'nested': models[0].layers[0]: no layer named " \
                            "'backbone/c1x' in the model; did you mean 'backbone/c1'?\n"
    assert not (zoo["folder"] / "out-glob").exists()
