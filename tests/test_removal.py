"""Structural removal: the removed model equals the zeroed model (BN neutralised, constants folded)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import (_seeded_weights, expected_removal_params, kprune, run_model, write_spec,
                      zeroed_reference)
from kprune_batch.errors import ModelError
from kprune_batch.removal import remove_filters


def check(keras: Any, model: Any, selection: dict[str, list[int]], removed_params: int,
          **options: Any) -> Any:
    """Remove from the zeroed model; outputs equal within 1e-5 on a batch the removal never
    saw; exactly `removed_params` parameters fewer."""
    _seeded_weights(model, 21)
    approximate = options.pop("approximate", frozenset())
    ref = zeroed_reference(keras, model, selection, **options)
    result = remove_filters(keras, ref, selection, approximate=approximate)
    x = np.random.default_rng(7).normal(size=(3,) + tuple(model.inputs[0].shape[1:])).astype(
        "float32")
    expected = run_model(keras, ref, x)
    got = run_model(keras, result.model, x)
    assert np.max(np.abs(expected - got)) <= 1e-5
    assert result.params_before - result.params_after == removed_params
    assert not result.approximate
    return result


def test_conv_bn_relu_conv(keras: Any, tmp_path: Path) -> None:
    L = keras.layers
    i = keras.Input((10, 10, 3))
    x = L.Conv2D(16, 3, name="c1")(i)
    x = L.ReLU()(L.BatchNormalization(name="bn")(x))
    x = L.Conv2D(8, 3, name="c2")(x)
    model = keras.Model(i, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    # 2 filters of c1: 2*(3*3*3 + 1) kernel+bias, 2*4 BN, 2*3*3*8 input slices of c2
    result = check(keras, model, {"c1": [3, 11]}, 2 * 28 + 2 * 4 + 2 * 72)
    # c1: 8x8 outputs x 3*3*3 taps x 2 filters; c2: 6x6 outputs x 3*3 taps x 2 inputs x 8 filters
    assert result.macs_before - result.macs_after == 64 * 27 * 2 + 36 * 9 * 2 * 8
    assert result.macs_before == 64 * 3 * 3 * 3 * 16 + 36 * 3 * 3 * 16 * 8 + 8 * 2
    assert result.mappings["c1"]["old_to_new"][:5] == [0, 1, 2, -1, 3]
    path = tmp_path / "removed.keras"
    result.model.save(path)
    reloaded = keras.saving.load_model(path)
    reloaded.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(1)
    history = reloaded.fit(rng.normal(size=(4, 10, 10, 3)), rng.normal(size=(4, 2)), epochs=1,
                           verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_flatten_dense(keras: Any) -> None:
    L = keras.layers
    i = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, activation="relu", name="c1")(i)  # -> (4, 4, 4)
    model = keras.Model(i, L.Dense(3, name="d")(L.Flatten()(x)))
    # 1 filter: 3*3*2 + 1 params, and 4*4 rows of a 3-unit Dense
    check(keras, model, {"c1": [2]}, 19 + 16 * 3)


def test_depthwise_chain_and_global_pooling(keras: Any) -> None:
    L = keras.layers
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 1, name="c1")(i)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="dw")(x)
    x = L.Conv2D(4, 1, name="c2")(x)
    model = keras.Model(i, L.Dense(2)(L.GlobalMaxPooling2D()(x)))
    # c1 filter 1: 3+1; dw loses channel 1 (2 outputs): 2*9 kernel; c2 loses 2 rows of 4
    check(keras, model, {"c1": [1]}, 4 + 18 + 8)


def test_depthwise_multiplier_in_a_group(keras: Any) -> None:
    """c0's channel c is the depthwise outputs 2c and 2c+1, which meet c1's filters 2c, 2c+1
    in an Add: removing c1's filter 0 takes c1's 0-1, the depthwise layer's 0-1 and c0's 0."""
    L = keras.layers
    i = keras.Input((6, 6, 3))
    y = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(
        L.Conv2D(2, 1, name="c0")(i))
    x = L.Add(name="add")([L.Conv2D(4, 1, name="c1")(i), y])
    model = keras.Model(i, L.Conv2D(2, 1, name="head")(x))
    from kprune_batch.graph import build_graph
    from kprune_batch.removal import group_of

    group = group_of(build_graph(keras.saving.serialize_keras_object(model)), "c1")
    assert (sorted(group.members), dict(group.divisor), group.size) == (
        ["c0", "c1", "dw"], {"c1": 2, "dw": 2, "c0": 1}, 2)
    # c0 (3*2 + 2 -> 3 + 1), dw (9*2*2 + 4 -> 9*2 + 2), c1 (12 + 4 -> 6 + 2), head (8 + 2 -> 4 + 2)
    result = check(keras, model, {"c1": [0, 1], "dw": [0, 1], "c0": [0]}, 4 + 20 + 8 + 4)
    assert result.model.get_layer("dw").kernel.shape == (3, 3, 1, 2)


def test_depthwise_bias_is_folded_downstream(keras: Any) -> None:
    L = keras.layers
    i = keras.Input((8, 8, 3))
    x = L.DepthwiseConv2D(3, name="dw")(L.Conv2D(6, 1, name="c1")(i))
    model = keras.Model(i, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="c2")(x))))
    # the dw channel of c1's filter 1 keeps its bias: a constant that ends in c2's bias.
    # c1: 3 + 1; dw: 9 + 1; c2: 4 rows
    result = check(keras, model, {"c1": [1]}, 4 + 10 + 4)
    (fold,) = result.folded
    assert fold["layer"] == "c2" and fold["exact"] and not fold["bias_added"]
    dw_bias = model.get_layer("dw").get_weights()[1]  # c1's channel is 0 there
    assert fold["constants"] == [{"channel": 1, "constant": pytest.approx(dw_bias[1], abs=1e-7)}]


def bn_relu_model(keras: Any, padding: str = "valid", kernel: int = 3,
                  use_bias: bool = True) -> Any:
    """c1 -> BN -> ReLU -> c2 -> GAP -> Dense: with batchnorm: keep a removed c1 filter leaves
    relu(BN(bias)) behind in c2's input."""
    L = keras.layers
    i = keras.Input((9, 9, 3))
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(8, 3, name="c1")(i)))
    x = L.Conv2D(5, kernel, padding=padding, use_bias=use_bias, name="c2")(x)
    return keras.Model(i, L.Dense(2)(L.GlobalAveragePooling2D()(x)))


def relu_bn_of_bias(model: Any, filters: list[int]) -> np.ndarray:
    """relu(gamma * (b - mean) / sqrt(var + eps) + beta), computed here from the weights."""
    b = model.get_layer("c1").get_weights()[1].astype(np.float64)
    g, beta, mean, var = (v.astype(np.float64) for v in model.get_layer("bn").get_weights())
    eps = model.get_layer("bn").epsilon
    return np.maximum(g * (b - mean) / np.sqrt(var + eps) + beta, 0)[filters]


def loud(model: Any) -> list[int]:
    """Two filters of c1 that leave a positive constant behind (seeded as check() seeds)."""
    _seeded_weights(model, 21)
    k = relu_bn_of_bias(model, list(range(8)))
    assert np.count_nonzero(k) >= 2
    return [int(f) for f in np.flatnonzero(k)[:2]]


@pytest.mark.parametrize("padding, kernel", [("valid", 3), ("same", 1)])
def test_constant_is_folded_exactly(keras: Any, padding: str, kernel: int) -> None:
    model = bn_relu_model(keras, padding, kernel)
    filters = loud(model)
    # c1: 2 * (27 + 1), BN 2 * 4, c2: 2 * k*k*5 rows
    result = check(keras, model, {"c1": filters}, 2 * 28 + 2 * 4 + 2 * kernel * kernel * 5,
                   bias="keep", neutralize=False)
    (fold,) = result.folded
    assert fold["layer"] == "c2" and fold["exact"] and not fold["bias_added"]
    got = {c["channel"]: c["constant"] for c in fold["constants"]}
    expected = relu_bn_of_bias(model, filters)
    assert sorted(got) == filters
    for f, value in zip(filters, expected, strict=True):
        assert got[f] == pytest.approx(value, rel=1e-6)


def test_consumer_that_loses_filters_too(keras: Any) -> None:
    model = bn_relu_model(keras)
    filters = loud(model)
    # c1: 2 * 28, BN 2 * 4; c2 loses filter 4 (9 * 8 + 1) and 2 * 9 rows of its 4 others;
    # the Dense loses one row of 2
    result = check(keras, model, {"c1": filters, "c2": [4]},
                   2 * 28 + 2 * 4 + 73 + 2 * 9 * 4 + 2, bias="keep", neutralize=False)
    dense = model.layers[-1].name
    assert [f["layer"] for f in result.folded] == ["c2", dense]
    # c2's own filter 4 keeps its bias (bias: keep): GAP passes it to the Dense unchanged
    assert result.folded[1]["constants"] == [
        {"channel": 4, "constant": pytest.approx(model.get_layer("c2").get_weights()[1][4])}]


def test_use_bias_false_consumer_gets_a_bias(keras: Any) -> None:
    model = bn_relu_model(keras, use_bias=False)
    filters = loud(model)
    # c1: 2 * 28, BN 2 * 4, c2: 2 * 9 * 5 rows, and c2 gains 5 biases
    result = check(keras, model, {"c1": filters}, 2 * 28 + 2 * 4 + 2 * 9 * 5 - 5,
                   bias="keep", neutralize=False)
    assert result.folded[0]["bias_added"]
    assert result.model.get_layer("c2").use_bias


def test_same_padding_needs_approximate(keras: Any) -> None:
    model = bn_relu_model(keras, "same", 3)
    filters = loud(model)
    ref = zeroed_reference(keras, model, {"c1": filters}, bias="keep", neutralize=False)
    k = relu_bn_of_bias(model, filters)
    with pytest.raises(ModelError) as err:
        remove_filters(keras, ref, {"c1": filters})
    assert err.value.layer == "c2"
    assert err.value.message == (
        f"removed filters of 'c1' reach it as the constant {float(k[np.argmax(k)]):.6g}, and its "
        f"'same' padding means border positions see fewer of them, so folding into its bias is "
        f"not exact")
    assert err.value.hint.startswith("set approximate: true on the entries of 'c1'")
    result = remove_filters(keras, ref, {"c1": filters}, approximate=frozenset({"c1"}))
    assert result.approximate and not result.folded[0]["exact"]
    # the fold is right wherever c2's 3x3 window sees no padding, wrong only on the border
    x = np.random.default_rng(3).normal(size=(2, 9, 9, 3)).astype("float32")
    inner = [keras.Model(m.inputs, m.get_layer("c2").output)(x) for m in (ref, result.model)]
    a, b = (np.asarray(v) for v in inner)
    assert np.max(np.abs(a - b)[:, 1:-1, 1:-1]) <= 1e-5
    assert np.max(np.abs(a - b)[:, 0]) > 1e-4


def test_zero_padding_on_the_path_is_refused(keras: Any) -> None:
    L = keras.layers
    i = keras.Input((8, 8, 3))
    x = L.ZeroPadding2D(1, name="pad")(L.Conv2D(4, 1, activation="sigmoid", name="c1")(i))
    model = keras.Model(i, L.Flatten()(L.Conv2D(2, 3, name="c2")(x)))
    _seeded_weights(model, 2)
    ref = zeroed_reference(keras, model, {"c1": [1]})
    with pytest.raises(ModelError, match="reach it with values that differ across positions") \
            as err:
        remove_filters(keras, ref, {"c1": [1]})
    assert err.value.layer == "c2"


def test_sigmoid_into_flatten_dense_is_folded_per_row(keras: Any) -> None:
    L = keras.layers
    i = keras.Input((6, 6, 2))
    x = L.ZeroPadding2D(1)(L.Conv2D(4, 3, activation="sigmoid", name="c1")(i))  # -> (6, 6, 4)
    model = keras.Model(i, L.Dense(3, name="d")(L.Flatten()(x)))
    # sigmoid(0) = 0.5 inside, 0 on the padded border: each Dense row sees its own constant,
    # so the fold is exact even though the values differ across positions
    result = check(keras, model, {"c1": [1]}, 19 + 36 * 3)
    (fold,) = result.folded
    assert fold["layer"] == "d" and fold["exact"]
    constants = {c["channel"]: c["constant"] for c in fold["constants"]}
    assert sorted(constants.values()) == [0.5] * 16  # the 4x4 interior; 0 on the border
    assert sorted(constants) == sorted((h * 6 + w) * 4 + 1 for h in range(1, 5)
                                       for w in range(1, 5))


def test_separable_consumer_and_concatenate_then_bn(keras: Any) -> None:
    L = keras.layers
    i = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 1, name="a")(i)
    x = L.Concatenate(name="cat")([a, L.Conv2D(3, 1, name="b")(i)])
    x = L.BatchNormalization(name="bn_cat")(x)  # not a direct follower: keeps its statistics
    x = L.SeparableConv2D(5, 3, depth_multiplier=2, name="sep")(x)
    model = keras.Model(i, L.Dense(2)(L.GlobalMaxPooling2D()(x)))
    # a loses 1: 3 + 1; bn_cat 4; sep: depthwise 9 * 2, pointwise 2 * 5 rows
    result = check(keras, model, {"a": [1]}, 4 + 4 + 18 + 10)
    (fold,) = result.folded
    assert fold["layer"] == "sep" and fold["exact"]


def test_transposed_consumer_with_a_constant_is_refused(keras: Any) -> None:
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.Conv2DTranspose(2, 3, name="up")(L.Conv2D(4, 1, activation="sigmoid", name="c1")(i))
    model = keras.Model(i, L.Flatten()(x))
    ref = zeroed_reference(keras, model, {"c1": [0]})
    with pytest.raises(ModelError, match="folding a constant into a Conv2DTranspose is not "
                                         "supported"):
        remove_filters(keras, ref, {"c1": [0]}, approximate=frozenset({"c1"}))


@pytest.mark.parametrize("flatten_format", [None, "channels_last", "channels_first"])
def test_channels_first(keras: Any, flatten_format: str | None) -> None:
    L = keras.layers
    cf = "channels_first"
    i = keras.Input((3, 7, 9))
    x = L.Conv2D(6, 3, data_format=cf, name="c1")(i)  # -> (6, 5, 7)
    x = L.ReLU()(L.BatchNormalization(axis=1, name="bn")(x))
    x = L.MaxPooling2D(1, data_format=cf)(x)
    x = L.Conv2D(4, 3, data_format=cf, name="c2")(x)  # -> (4, 3, 5)
    if flatten_format is None:
        head = L.GlobalAveragePooling2D(data_format=cf)(x)
        rows = 0
    else:
        head = L.Flatten(data_format=flatten_format)(x)
        rows = 15 * 2 * 3  # 2 of c2's channels at 3 x 5 positions, 3 units
    model = keras.Model(i, L.Dense(3, name="d")(head))
    removed = {"c1": [1, 4], "c2": [0, 3]}
    # c1: 2 * (27 + 1); bn: 2 * 4; c2 loses 2 whole filters of 6 inputs, 2 * (54 + 1), and the
    # 2 removed inputs of the 2 it keeps, 2 * 9 * 2; d: its rows (GAP: 2 channels x 3 units)
    expected = 2 * 28 + 2 * 4 + 2 * 55 + 2 * 9 * 2 + (rows if rows else 2 * 3)
    check(keras, model, removed, expected)


def test_sequential_separable(keras: Any) -> None:
    L = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 3)), L.SeparableConv2D(6, 3, name="s1"),
                              L.Conv2D(2, 1, name="c2"), L.Flatten(), L.Dense(2)])
    # s1 filter 0 and 5: 2*(3 pointwise rows... ) pointwise (1,1,3,6) -> 2*3 + 2 bias; c2 2*2 rows
    check(keras, model, {"s1": [0, 5]}, 2 * 3 + 2 + 2 * 2)


def test_concatenate_offsets(keras: Any) -> None:
    L = keras.layers
    i = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 1, name="a")(i)
    b = L.Conv2D(5, 1, name="b")(i)
    x = L.Concatenate(name="cat")([L.ReLU()(a), b])
    x = L.ReLU(name="relu")(x)
    x = L.Concatenate(name="cat2")([L.Conv2D(2, 1, name="c")(i), x])  # offsets 2 and 2+4
    model = keras.Model(i, L.Conv2D(3, 1, name="d")(x))
    # a loses 1 and 3, b loses 0: kernels+biases 2*4 + 4; d loses 3 input rows of 3
    # (a BN after a Concatenate is not a direct follower: its constant would make removal
    # inexact, and the executor's probe comparison refuses that case)
    check(keras, model, {"a": [1, 3], "b": [0]}, 2 * 4 + 4 + 3 * 3)


def test_reshape_on_the_path_is_refused(keras: Any) -> None:
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.Reshape((4, 36), name="flat")(L.Conv2D(4, 1, name="a")(i))
    model = keras.Model(i, L.Dense(2)(x))
    with pytest.raises(ModelError, match=r"a Reshape to \(4, 36\) moves the 4 channels off"):
        remove_filters(keras, model, {"a": [0]})


def test_model_output_is_refused(keras: Any) -> None:
    i = keras.Input((6, 6, 3))
    model = keras.Model(i, keras.layers.Conv2D(4, 1, name="a")(i))
    with pytest.raises(ModelError, match="model output"):
        remove_filters(keras, model, {"a": [0]})


SPEC = """\
version: 1
models:
  - path: m.keras
    layers:
      - {name: c1, action: remove, rules: [{index: [3, 11]}]}
      - {name: c2, rules: [{index: [0]}]}
"""


@pytest.fixture
def chain_model(keras: Any, tmp_path: Path) -> Path:
    L = keras.layers
    i = keras.Input((10, 10, 3))
    x = L.Conv2D(16, 3, name="c1")(i)
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(x))
    x = L.Conv2D(8, 3, name="c2")(x)
    model = keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D(name="gap")(x)))
    _seeded_weights(model, 5)
    model.compile(optimizer="adam", loss="mse")
    model.save(tmp_path / "m.keras")
    return tmp_path / "m.keras"


def test_apply_remove_end_to_end(keras: Any, tmp_path: Path, chain_model: Path) -> None:
    spec = write_spec(tmp_path, SPEC)
    code = ("import sys; from kprune_batch.cli import main; sys.argv = ['kprune', 'plan', "
            "sys.argv[1]]\ntry:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('EXIT', code, sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('tensorflow', 'keras')))")
    plan = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True)
    lines = plan.stdout.splitlines()
    assert lines[-1] == "EXIT 0 []", plan.stdout + plan.stderr  # the plan needs no TensorFlow
    assert "  c1 (Conv2D, 16 filters): would remove 3, 11 (2 of 16, 12.5%)" in lines
    touches = lines[lines.index("  removal touches:") + 1:-1]
    assert touches == ["    c1 (Conv2D): filters removed 3, 11 (2 of 16)",
                       "    bn (BatchNormalization): channels sliced 3, 11 (2 of 16)",
                       "    relu (ReLU): passes through 3, 11 (2 of 16)",
                       "    c2 (Conv2D): input channels removed 3, 11 (2 of 16)"]
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(0)
    assert result.stdout.startswith("ok      m: zeroed 1, removed 2 filter(s) in 2 layer(s)")
    log = json.loads((tmp_path / "log.json").read_text())
    (model,) = log["models"]
    removal = model["removal"]
    assert model["backend"] == "keras" and model["backend_note"] == \
        "action: remove needs the Keras backend"
    assert removal["params_before"] - removal["params_after"] == 2 * 28 + 2 * 4 + 2 * 72
    assert removal["probe_deviation"] <= 1e-5
    assert removal["optimizer_state"] == "dropped"
    assert removal["mappings"]["c1"]["old_to_new"][3] == -1
    assert [(t["layer"], t["how"], t["removed"]) for t in removal["touched"]] == [
        ("c1", "filters", "3, 11"), ("bn", "batchnorm", "3, 11"), ("relu", "passes", "3, 11"),
        ("c2", "inputs", "3, 11")]
    assert [(r["layer"], r["filter"]) for r in log["removed"]] == [("c1", 3), ("c1", 11)]
    assert [(r["layer"], r["filter"]) for r in log["zeroed"]] == [("c2", 0)]
    out = keras.saving.load_model(tmp_path / "pruned" / "m.keras")
    before = keras.saving.load_model(chain_model)
    keep = [f for f in range(16) if f not in (3, 11)]
    assert out.get_layer("c1").kernel.shape == (3, 3, 3, 14)
    np.testing.assert_array_equal(out.get_layer("c1").kernel.numpy(),
                                  before.get_layer("c1").kernel.numpy()[..., keep])
    assert np.all(out.get_layer("c2").kernel.numpy()[..., 0] == 0)  # the zeroed filter of c2
    assert out.get_compile_config() == before.get_compile_config()
    verify = kprune("verify", tmp_path / "log.json").expect(0)
    assert verify.stdout == ("ok      m: 1 zeroed and 2 removed filter(s) verified: every weight "
                             "equals the input's with the logged slices and edits applied\n")


def test_apply_remove_refuses_clearly(keras: Any, tmp_path: Path) -> None:
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.Reshape((4, 36), name="flat")(L.Conv2D(4, 1, name="a")(i))
    keras.Model(i, L.Dense(2)(x)).save(tmp_path / "m.keras")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: m.keras\n"
                                "    layers: [{name: a, action: remove, rules: [{index: [0]}]}]\n")
    line = ("error: model 'm', layer 'flat': a Reshape to (4, 36) moves the 4 channels off their "
            "axis, so which channel goes where cannot be proven (followed: a Reshape keeping the "
            "channel axis last with its size, or to rank 1)\n")
    assert kprune("plan", spec).expect(1).stderr == line  # known before anything is written
    assert kprune("apply", spec).expect(1).stderr == line
    assert not (tmp_path / "pruned" / "m.keras").exists()


def residual_model(keras: Any, tmp_path: Path) -> Path:
    L = keras.layers
    i = keras.Input((8, 8, 3))
    stem = L.Conv2D(6, 1, name="stem")(i)
    x = L.ReLU()(L.BatchNormalization(name="bn1")(stem))
    x = L.BatchNormalization(name="bn2")(L.Conv2D(6, 3, padding="same", name="c2")(x))
    y = L.ReLU(name="merged")(L.Add(name="add")([x, L.BatchNormalization(name="bns")(stem)]))
    z = L.BatchNormalization(name="bn3")(L.Conv2D(6, 1, name="c3")(y))
    y2 = L.Add(name="add2")([z, y])
    model = keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(y2)))
    _seeded_weights(model, 8)
    model.save(tmp_path / "res.keras")
    return tmp_path / "res.keras"


@pytest.mark.parametrize("coupled, c2, c3, removed, error", [
    ("error", [1], [1], [1], None),
    ("error", [1], [2], None, "must lose the same filters, but their rules select different ones"),
    ("union", [1], [2], [1, 2], None),
    ("intersection", [1, 2], [2, 4], [2], None),
    ("intersection", [1], [2], None, "have no filter in common"),
])
def test_residual_groups(keras: Any, tmp_path: Path, coupled: str, c2: list[int],
                         c3: list[int], removed: list[int] | None, error: str | None) -> None:
    residual_model(keras, tmp_path)
    spec = write_spec(tmp_path, f"""\
        version: 1
        defaults: {{action: remove, coupled: {coupled}}}
        models:
          - path: res.keras
            layers:
              - {{name: c2, rules: [{{index: {c2}}}]}}
              - {{name: c3, rules: [{{index: {c3}}}]}}
        """)
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json")
    if error:
        result.expect(1)
        assert error in result.stderr
        assert len(result.stderr.splitlines()) == 1
        return
    result.expect(0)
    log = json.loads((tmp_path / "log.json").read_text())
    got = sorted({(r["layer"], r["filter"]) for r in log["removed"]})
    # stem is in the group though the spec does not list it (its BN meets c2's in `add`)
    assert got == sorted((layer, f) for layer in ("c2", "c3", "stem") for f in removed)
    assert {r["layer"]: sorted(r["group"]) for r in log["removed"]}["stem"] == ["c2", "c3", "stem"]
    removal = log["models"][0]["removal"]
    assert removal["probe_deviation"] <= 1e-5
    out = keras.saving.load_model(tmp_path / "pruned" / "res.keras")
    assert out.get_layer("c3").kernel.shape == (1, 1, 6 - len(removed), 6 - len(removed))


def remove_by_index(model: Any, folder: Path, layers: dict[str, list[int]],
                    options: str = "") -> dict[str, Any]:
    """Save `model` as m.keras, remove the listed filters with `kprune apply` (each entry with
    `options`, e.g. 'batchnorm: keep, '), return the log."""
    model.save(folder / "m.keras")
    entries = "\n".join(f"      - {{name: {k}, action: remove, {options}rules: [{{index: {v}}}]}}"
                        for k, v in layers.items())
    spec = write_spec(folder, f"version: 1\nmodels:\n  - path: m.keras\n    layers:\n{entries}\n")
    kprune("apply", spec, "--audit-log", folder / "log.json").expect(0)
    return json.loads((folder / "log.json").read_text())


def perturbed(model: Any, seed: int) -> Any:
    """Trained-looking BN statistics and conv/dense biases (Keras initialises them to 1, 0, 0, 1
    and 0, which would make every BN edit and bias zeroing invisible in the outputs); kernels
    keep Keras's initialisation, so activations stay finite through 50 layers."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n),
                               rng.normal(0, 0.3, n), rng.uniform(0.5, 2.0, n)])
        elif getattr(layer, "use_bias", False) and getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.1, tuple(layer.bias.shape)).astype("float32"))
    return model


# ResNet50's conv4_block1_0_conv (the stage's shortcut) meets each conv4_block{i}_3_conv in the
# stage's Adds (through their BNs), so removing its filter 7 removes filter 7 of all seven.
RESNET_STAGE4 = {f"conv4_block{i}_3_conv": [7] for i in range(1, 7)}


@pytest.mark.slow
@pytest.mark.parametrize("name, layers, coupled", [
    ("VGG16", {"block1_conv1": [0, 5], "block5_conv3": [1, 2, 3]}, {}),
    ("ResNet50", {"conv2_block1_1_conv": [0, 1], "conv3_block2_2_conv": [4],
                  "conv4_block1_0_conv": [7]}, RESNET_STAGE4),
    ("DenseNet121", {"conv2_block1_2_conv": [0, 5], "conv3_block4_1_conv": [3]}, {}),  # concat
    # a depthwise layer joins its producer's group: listed expand conv or listed depthwise
    # (Conv_1, top_conv so that the edit shows: an untrained network's output may hardly
    # depend on its early blocks)
    ("MobileNetV2", {"block_1_expand": [0, 3], "block_2_depthwise": [1, 4], "Conv_1": [1, 2, 3]},
     {"block_1_depthwise": [0, 3], "block_2_expand": [1, 4]}),
    # squeeze-excitation: the gate conv's filters are the feature map's channels
    ("EfficientNetB0", {"block2a_expand_conv": [0, 5], "block3b_se_expand": [2],
                        "top_conv": [1, 2, 3]},
     {"block2a_dwconv": [0, 5], "block2a_se_expand": [0, 5], "block3b_expand_conv": [2],
      "block3b_dwconv": [2]}),
])
def test_keras_applications_removal(keras: Any, tmp_path: Path, name: str,
                                    layers: dict[str, list[int]],
                                    coupled: dict[str, list[int]]) -> None:
    """The written model against the design's reference built here (the input with the same
    filters zeroed and their direct BN followers neutralised), on a seeded batch, within
    |removed - zeroed| <= 1e-5 + 1e-5 * |zeroed|; and its parameters, layer by layer, against a
    count worked out from the input's shapes. Logits (no softmax) so that a difference shows."""
    keras.utils.set_random_seed(5)  # Keras's initialisers: the same untrained model every run
    model = perturbed(getattr(keras.applications, name)(
        weights=None, input_shape=(64, 64, 3), classes=5, classifier_activation=None), 3)
    log = remove_by_index(model, tmp_path, layers)
    selection = {**layers, **coupled}
    assert sorted((r["layer"], r["filter"]) for r in log["removed"]) == sorted(
        (layer, f) for layer, filters in selection.items() for f in filters)
    before = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    out = keras.saving.load_model(tmp_path / "pruned" / "m.keras", compile=False)
    x = np.random.default_rng(9).normal(size=(2, 64, 64, 3)).astype("float32")
    zeroed = np.asarray(zeroed_reference(keras, before, selection)(x, training=False), np.float64)
    removed = np.asarray(out(x, training=False), np.float64)
    original = np.asarray(before(x, training=False), np.float64)
    # the edit shows, far above the bound below
    assert np.abs(zeroed - original).max() > 1e-4 * np.abs(original).max()
    assert np.all(np.abs(removed - zeroed) <= 1e-5 + 1e-5 * np.abs(zeroed)), \
        np.abs(removed - zeroed).max()
    expected = expected_removal_params(before, selection)
    assert {layer.name: layer.count_params() for layer in out.layers} == expected
    removal = log["models"][0]["removal"]
    assert out.count_params() == sum(expected.values()) == removal["params_after"]
    assert before.count_params() == removal["params_before"] > removal["params_after"]
    kprune("verify", tmp_path / "log.json").expect(0)
    out.compile(optimizer="sgd", loss="mse", run_eagerly=True)  # tracing costs 10-30 s
    rng = np.random.default_rng(0)
    out.fit(rng.normal(size=(2, 64, 64, 3)), rng.normal(size=(2, 5)), epochs=1, verbose=0)


@pytest.mark.slow
def test_mobilenetv2_removal_folds_into_projections(keras: Any, tmp_path: Path) -> None:
    """Expand convs feed depthwise layers, which join their coupled groups (zeroed and removed
    with them); with batchnorm: keep, each depthwise chain's BN (trained-looking statistics)
    turns the removed channels into constants: they are folded into the 1x1 projections (which
    have no bias, so they gain one); block_5_project couples a residual stage."""
    model = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=5)
    rng = np.random.default_rng(4)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n),
                               rng.normal(0, 0.3, n), rng.uniform(0.5, 2.0, n)])
    layers = {"Conv1": [0, 3], "block_2_expand": [1, 2, 3], "block_3_expand": [5],
              "block_5_project": [0]}
    log = remove_by_index(model, tmp_path, layers, "batchnorm: keep, ")
    removal = log["models"][0]["removal"]
    assert removal["probe_deviation"] <= 1e-5 and removal["approximate"] is False
    folded = {f["layer"] for f in removal["folded"]}
    assert {"expanded_conv_project", "block_2_project", "block_3_project"} <= folded
    removed: dict[str, list[int]] = {}
    for r in log["removed"]:
        removed.setdefault(r["layer"], []).append(r["filter"])
    dw = {"expanded_conv_depthwise": [0, 3], "block_2_depthwise": [1, 2, 3],
          "block_3_depthwise": [5]}
    selection = {**layers, **dw, "block_3_project": [0], "block_4_project": [0]}
    assert {k: sorted(v) for k, v in removed.items()} == selection
    out = keras.saving.load_model(tmp_path / "pruned" / "m.keras")
    assert out.count_params() == removal["params_after"] < removal["params_before"]
    assert out.get_layer("block_2_project").use_bias
    kprune("verify", tmp_path / "log.json").expect(0)
    x = np.random.default_rng(9).normal(size=(2, 64, 64, 3)).astype("float32")
    reference = zeroed_reference(keras, model, selection, neutralize=False)
    assert np.max(np.abs(np.asarray(reference(x)) - np.asarray(out(x)))) <= 1e-5
    out.compile(optimizer="sgd", loss="mse")
    out.fit(x, rng.normal(size=(2, 5)), epochs=1, verbose=0)


def test_round_to_keeps_back_the_largest_l1(keras: Any, tmp_path: Path, chain_model: Path) -> None:
    kernel = keras.saving.load_model(chain_model).get_layer("c1").kernel.numpy()
    l1 = np.abs(kernel.astype(np.float64)).sum(axis=(0, 1, 2))
    selected = [0, 2, 4, 6, 8]  # 16 - 5 = 11 left: round_to 4 keeps one back -> 12
    expected_back = max(selected, key=lambda f: l1[f])
    spec = write_spec(tmp_path, f"""\
        version: 1
        models:
          - path: m.keras
            layers:
              - {{name: c1, action: remove, round_to: 4, rules: [{{index: {selected}}}]}}
        """)
    log = _applied_log(spec, tmp_path)
    assert log["models"][0]["removal"]["kept_back"] == {"c1": [expected_back]}
    assert sorted(r["filter"] for r in log["removed"]) == sorted(
        set(selected) - {expected_back})
    out = keras.saving.load_model(tmp_path / "pruned" / "m.keras")
    assert out.get_layer("c1").kernel.shape[-1] == 12


def test_apply_approximate_records_the_deviation(keras: Any, tmp_path: Path) -> None:
    model = bn_relu_model(keras, "same", 3)
    filters = loud(model)
    model.save(tmp_path / "m.keras")
    k = relu_bn_of_bias(model, filters)
    text = """\
        version: 1
        defaults: {{bias: keep, batchnorm: keep, action: remove{extra}}}
        models:
          - path: m.keras
            layers: [{{name: c1, rules: [{{index: {filters}}}]}}]
        """
    spec = write_spec(tmp_path, text.format(extra="", filters=filters))
    refused = kprune("apply", spec).expect(1)
    assert refused.stderr == (
        f"error: model 'm', layer 'c2': removed filters of 'c1' reach it as the constant "
        f"{float(k.max()):.6g}, and its 'same' padding means border positions see fewer of them, "
        f"so folding into its bias is not exact; set approximate: true on the entries of 'c1' to "
        f"accept the deviation (measured and logged), or zero these filters instead "
        f"(action: zero)\n")
    assert not (tmp_path / "pruned" / "m.keras").exists()

    spec = write_spec(tmp_path, text.format(extra=", approximate: true", filters=filters))
    removal = _applied_log(spec, tmp_path)["models"][0]["removal"]
    assert removal["approximate"] is True
    assert removal["probe_deviation"] > 1e-5  # measured, recorded, allowed
    (fold,) = removal["folded"]
    assert (fold["layer"], fold["exact"], fold["bias_added"]) == ("c2", False, False)
    assert [c["channel"] for c in fold["constants"]] == filters
    assert [c["constant"] for c in fold["constants"]] == pytest.approx(list(k), rel=1e-6)
    verify = kprune("verify", tmp_path / "log.json").expect(0)
    assert verify.stdout == ("ok      m: 0 zeroed and 2 removed filter(s) verified: every weight "
                             "equals the input's with the logged slices, folds and edits "
                             "applied\n")
    # a reviewer's check must fail when the folded bias is not what the log implies
    out = keras.saving.load_model(tmp_path / "pruned" / "m.keras")
    bias = out.get_layer("c2").bias
    bias.assign(bias.numpy() + np.float32(1e-3) * (np.arange(5) == 2))
    out.save(tmp_path / "pruned" / "m.keras")
    tampered = kprune("verify", tmp_path / "log.json").expect(1)
    assert tampered.stdout.splitlines()[1:] == [
        "MISMATCH m: layer 'c2' bias element 2: max |difference| 0.001"]


def test_large_outputs_are_bounded_relatively(keras: Any, tmp_path: Path) -> None:
    """Outputs of ~1e7 carry float32 rounding of ~1 where a removed channel's constant
    (sigmoid(0) = 0.5) is folded into c2's bias: the bound is atol + rtol·|zeroed| (both 1e-5,
    recorded), not an absolute 1e-5, which refused this correct removal. The channels pass a
    GaussianNoise (the identity at inference) on their way to c2."""
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.GaussianNoise(0.1, name="noise")(L.Conv2D(16, 3, activation="sigmoid", name="c1")(i))
    x = L.Conv2D(8, 1, name="c2")(x)
    model = keras.Model(i, L.Dense(3, name="d")(L.GlobalAveragePooling2D()(x)))
    _seeded_weights(model, 31)
    c2 = model.get_layer("c2")
    c2.kernel.assign(c2.kernel.numpy() * 3e6)
    log = remove_by_index(model, tmp_path, {"c1": [2, 7, 11]})
    removal = log["models"][0]["removal"]
    assert removal["probe_tolerance"] == {"atol": 1e-5, "rtol": 1e-5}
    assert removal["probe_ran_on"] == "model"
    assert removal["probe_deviation"] > 1e-5 and removal["approximate"] is False
    # the bound, computed here from the input model zeroed by hand and the written file
    x = np.random.default_rng(5).normal(size=(4, 6, 6, 3)).astype("float32")
    want = np.asarray(zeroed_reference(keras, model, {"c1": [2, 7, 11]})(x), np.float64)
    out = keras.saving.load_model(tmp_path / "pruned" / "m.keras")
    got = np.asarray(out(x), np.float64)
    assert np.abs(want).max() > 1e6
    assert np.all(np.abs(got - want) <= 1e-5 + 1e-5 * np.abs(want))
    assert out.get_layer("c2").kernel.shape == (1, 1, 13, 8)


def test_depthwise_output_added_to_its_own_input(keras: Any, tmp_path: Path) -> None:
    """Add([x, dw(x)]): the depthwise layer's channel c meets its input channel c, so listing
    dw takes c0's filter and verify counts both removed filters (it counted the depthwise
    layer's, which has no mapping of its own, as zeroed)."""
    L = keras.layers
    i = keras.Input((8, 8, 3))
    c = L.Conv2D(4, 1, name="c0")(i)
    x = L.Add(name="add")([c, L.DepthwiseConv2D(3, padding="same", name="dw")(c)])
    model = keras.Model(i, L.Conv2D(2, 1, name="head")(x))
    _seeded_weights(model, 31)
    log = remove_by_index(model, tmp_path, {"dw": [1]})
    assert sorted((r["layer"], r["filter"]) for r in log["removed"]) == [("c0", 1), ("dw", 1)]
    assert log["zeroed"] == []
    assert kprune("verify", tmp_path / "log.json").expect(0).stdout == (
        "ok      m: 0 zeroed and 2 removed filter(s) verified: every weight equals the input's "
        "with the logged slices and edits applied\n")
    ref = zeroed_reference(keras, keras.saving.load_model(tmp_path / "m.keras"),
                           {"c0": [1], "dw": [1]})
    out = keras.saving.load_model(tmp_path / "pruned" / "m.keras")
    assert out.get_layer("dw").kernel.shape == (3, 3, 3, 1)
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype("float32")
    expected, got = run_model(keras, ref, x), run_model(keras, out, x)
    assert np.all(np.abs(expected - got) <= 1e-5 + 1e-5 * np.abs(expected))


def test_depthwise_on_the_model_input_is_refused_in_one_line(keras: Any, tmp_path: Path) -> None:
    L = keras.layers
    i = keras.Input((8, 8, 3), name="image")
    keras.Model(i, L.Conv2D(2, 1)(L.DepthwiseConv2D(3, name="dw")(i))).save(tmp_path / "m.keras")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: m.keras\n"
                                "    layers: [{name: dw, action: remove, rules: [{index: [0]}]}]\n")
    # the depthwise layer's channels are the input's: nothing upstream can lose them (the line
    # said "coupled with 'dw'" of dw itself)
    line = ("error: model 'm', layer 'image': its channels are the filters of "
            "DepthwiseConv2D 'dw', and they come from the model input\n")
    assert kprune("plan", spec).expect(1).stderr == line
    assert kprune("apply", spec).expect(1).stderr == line
    assert not (tmp_path / "pruned" / "m.keras").exists()


def test_a_grouped_producer_of_a_depthwise_layer_is_refused_naming_groups(
        keras: Any, tmp_path: Path) -> None:
    L = keras.layers
    i = keras.Input((8, 8, 4))
    x = L.DepthwiseConv2D(3, name="dw")(L.Conv2D(4, 1, groups=2, name="c0")(i))
    keras.Model(i, L.Conv2D(2, 1)(x)).save(tmp_path / "m.keras")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: m.keras\n"
                                "    layers: [{name: dw, action: remove, rules: [{index: [1]}]}]\n")
    # it said "filters of a Conv2D layer cannot be removed", as if no Conv2D could lose any
    assert kprune("plan", spec).expect(1).stderr == (
        "error: model 'm', layer 'c0': its channels are the filters of DepthwiseConv2D 'dw', and "
        "it is a grouped convolution (groups=2), whose filters cannot be removed yet\n")


def concat_group_model(keras: Any, case: str) -> Any:
    """concat(a, b) -> BN (not a direct follower: its constants are folded) added to c, so a's
    filter f is the group's channel f, b's filter f channel width(a) + f; `sink`: the
    concatenation also feeds a conv of its own; `widths`: a and b differ in width."""
    L = keras.layers
    i = keras.Input((7, 7, 3))
    wa, wb = (3, 5) if case == "widths" else (4, 4)
    cat = L.Concatenate(name="cat")([L.Conv2D(wa, 1, name="a")(i),
                                     L.Conv2D(wb, 1, name="b")(i)])
    x = L.Add(name="add")([L.BatchNormalization(name="bn")(cat),
                           L.Conv2D(wa + wb, 1, name="c")(i)])
    x = L.Conv2D(3, 1, name="head")(x)
    if case == "sink":
        x = L.Add(name="out")([x, L.Conv2D(3, 1, name="sink")(cat)])
    return keras.Model(i, L.Dense(2)(L.GlobalAveragePooling2D()(x)))


def _applied_log(spec: Path, tmp_path: Path) -> dict[str, Any]:
    """Run `kprune apply spec` (exit 0 expected) and return the audit log it wrote."""
    kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(0)
    return json.loads((tmp_path / "log.json").read_text())


def _kernel_l1(model: Any, names: Any) -> dict[str, np.ndarray]:
    """{conv: l1 of each of its filters}, from the input model's kernels in float64."""
    return {n: np.abs(model.get_layer(n).kernel.numpy().astype(np.float64)).sum(axis=(0, 1, 2))
            for n in names}


def _assert_written_equals_zeroed(keras: Any, model: Any, tmp_path: Path,
                                  selection: dict[str, list[int]], seed: int,
                                  through_concat: bool = False, output: str = "m.keras") -> None:
    """The written pruned/`output` equals `model` zeroed on `selection` (within 1e-5 +
    1e-5·|ref|; `through_concat`: batchnorm: neutralize_concat's reference), the edit shows in
    the outputs, every layer has the parameters counted here, and verify accepts the log."""
    out = keras.saving.load_model(tmp_path / "pruned" / output)
    x = np.random.default_rng(seed).normal(size=(3, 7, 7, 3)).astype("float32")
    ref = np.asarray(zeroed_reference(keras, model, selection,
                                      through_concat=through_concat)(x), np.float64)
    have = np.asarray(out(x), np.float64)
    assert np.all(np.abs(have - ref) <= 1e-5 + 1e-5 * np.abs(ref)), np.abs(have - ref).max()
    assert np.abs(ref - np.asarray(model(x), np.float64)).max() > 1e-4  # the edit shows
    assert {layer.name: layer.count_params() for layer in out.layers} == \
        expected_removal_params(model, selection, through_concat=through_concat)
    kprune("verify", tmp_path / "log.json").expect(0)


@pytest.mark.parametrize("case", ["equal", "sink", "widths"])
def test_a_concatenate_inside_a_group_loses_channels_at_offsets(keras: Any, tmp_path: Path,
                                                               case: str) -> None:
    """Ranking the group (a, b, c listed, 25 % smallest l1): channel u scores l1(c_u) plus
    l1(a_u) (u < width(a)) or l1(b_{u - width(a)}), computed here; the written model equals the
    input zeroed on those filters within 1e-5 + 1e-5·|ref|, with the parameters counted here."""
    model = concat_group_model(keras, case)
    _seeded_weights(model, 8)
    model.save(tmp_path / "m.keras")
    spec = write_spec(tmp_path, "version: 1\ndefaults: {action: remove, coupled: union}\n"
                      "models:\n  - path: m.keras\n    layers:\n" + "".join(
                          f"      - {{name: {n}, rules: [{{smallest: {{by: l1, fraction: 0.25}}}}]}}\n"
                          for n in "abc"))
    log = _applied_log(spec, tmp_path)
    l1 = _kernel_l1(model, "abc")
    wa = len(l1["a"])
    scores = l1["c"] + np.concatenate([l1["a"], l1["b"]])
    chosen = sorted(sorted(range(len(scores)), key=lambda u: (scores[u], u))[:len(scores) // 4])
    selection = {"a": [u for u in chosen if u < wa], "b": [u - wa for u in chosen if u >= wa],
                 "c": chosen}
    selection = {k: v for k, v in selection.items() if v}
    got: dict[str, list[int]] = {}
    for r in log["removed"]:
        got.setdefault(r["layer"], []).append(r["filter"])
    assert {k: sorted(v) for k, v in got.items()} == selection
    # the BN's constants, gamma * (0 - mean) / sqrt(var + eps) + beta, end in head's bias
    g, beta, mean, var = (v.astype(np.float64) for v in model.get_layer("bn").get_weights())
    constant = beta - g * mean / np.sqrt(var + model.get_layer("bn").epsilon)
    (fold,) = [f for f in log["models"][0]["removal"]["folded"] if f["layer"] == "head"]
    assert [c["channel"] for c in fold["constants"]] == chosen
    assert [c["constant"] for c in fold["constants"]] == pytest.approx(constant[chosen],
                                                                       abs=1e-6)
    _assert_written_equals_zeroed(keras, model, tmp_path, selection, seed=2)


# --- ConvNeXt-style blocks: LayerScale, LayerNormalization, Dense members, nested Sequentials --

def convnext_like(keras: Any, c0: int = 8, c1: int = 12, nested: bool = False,
                  hidden: tuple[int, int] = (32, 48)) -> Any:
    """A small ConvNeXt (keras/src/applications/convnext.py): stem conv -> LayerNorm, blocks of
    7x7-style grouped conv (groups = filters = channels) -> LayerNorm -> Dense(4C) -> GELU ->
    Dense(C) -> LayerScale -> `x + y` (an ops.numpy node); a LayerNorm -> conv downsampling, a
    GAP -> LayerNorm -> Dense head. `nested`: stem and downsampling are Sequentials, as there;
    `hidden`: the Dense(4C) widths of the two stages (a removal keeps them)."""
    from keras.src.applications.convnext import LayerScale

    L = keras.layers

    def block(x: Any, c: int, name: str) -> Any:
        h = hidden[int(name[1])]
        y = L.Conv2D(c, 3, padding="same", groups=c, name=f"{name}_dw")(x)
        y = L.LayerNormalization(epsilon=1e-6, name=f"{name}_ln")(y)
        y = L.Activation("gelu", name=f"{name}_gelu")(L.Dense(h, name=f"{name}_pw1")(y))
        y = LayerScale(0.5, c, name=f"{name}_ls")(L.Dense(c, name=f"{name}_pw2")(y))
        return x + L.Activation("linear", name=f"{name}_id")(y)

    i = keras.Input((16, 16, 3))
    stem = [L.Conv2D(c0, 2, strides=2, name="stem"), L.LayerNormalization(epsilon=1e-6,
                                                                          name="stem_ln")]
    down = [L.LayerNormalization(epsilon=1e-6, name="down_ln"),
            L.Conv2D(c1, 2, strides=2, name="down")]
    if nested:
        stem, down = [keras.Sequential(stem, name="stem_seq")], \
            [keras.Sequential(down, name="down_seq")]
    x = i
    for layer in stem:
        x = layer(x)
    x = block(block(x, c0, "s0b0"), c0, "s0b1")
    for layer in down:
        x = layer(x)
    x = block(x, c1, "s1b0")
    x = L.LayerNormalization(epsilon=1e-6, name="head_ln")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(i, L.Dense(3, name="head")(x))
    _seeded_weights(model, 12)
    return model


CONVNEXT_GROUPS = {  # (members, in the order the test reads them), by stage
    "s0": ["stem", "s0b0_dw", "s0b1_dw", "s0b0_pw2", "s0b1_pw2"],
    "s1": ["down", "s1b0_dw", "s1b0_pw2"]}
CONVNEXT_PATHS = {"stem": "stem_seq/stem", "stem_ln": "stem_seq/stem_ln", "down": "down_seq/down",
                  "down_ln": "down_seq/down_ln"}


def _layer(model: Any, name: str, nested: bool) -> Any:
    path = CONVNEXT_PATHS.get(name, name) if nested else name
    outer, _, inner = path.rpartition("/")
    return model.get_layer(outer).get_layer(inner) if outer else model.get_layer(inner)


def _convnext_spec(folder: Path, nested: bool, approximate: bool) -> Path:
    convs = ["stem", "s0b0_dw", "s0b1_dw", "down", "s1b0_dw"]  # every conv, as bench_zoo lists
    names = [CONVNEXT_PATHS.get(c, c) if nested else c for c in convs]
    extra = ", approximate: true" if approximate else ""
    return write_spec(folder, "version: 1\ndefaults: {action: remove, coupled: union" + extra +
                      "}\nmodels:\n  - path: m.keras\n    layers:\n" + "".join(
                          f"      - {{name: '{n}', rules: [{{smallest: {{by: l1, fraction: "
                          f"0.25}}}}]}}\n" for n in names))


@pytest.mark.parametrize("nested", [False, True])
def test_convnext_group_through_layernorm_is_refused_without_approximate(
        keras: Any, tmp_path: Path, nested: bool) -> None:
    convnext_like(keras, nested=nested).save(tmp_path / "m.keras")
    spec = _convnext_spec(tmp_path, nested, approximate=False)
    stem, ln = ("stem_seq/stem", "stem_seq/stem_ln") if nested else ("stem", "stem_ln")
    # it said the LayerScale's filters could not be removed, which is not the reason
    line = (f"error: model 'm', layer '{stem}': its coupled group (5 layers) passes through "
            f"LayerNormalization '{ln}', whose statistics change when channels go, so removal "
            f"cannot equal zeroing; set approximate: true to remove anyway (the deviation is "
            f"measured and recorded)\n")
    assert kprune("plan", spec).expect(1).stderr == line
    assert kprune("apply", spec).expect(1).stderr == line
    assert not (tmp_path / "pruned" / "m.keras").exists()


def _group_l1(model: Any, members: list[str], nested: bool) -> np.ndarray:
    """Per-channel score of a group: each member's per-filter l1 summed (design.md); a conv's
    filter is kernel[..., f] (the grouped conv's too: (*k, 1, filters)), a Dense unit
    kernel[:, u]."""
    total = 0.0
    for m in members:
        kernel = np.asarray(_layer(model, m, nested).kernel.numpy(), np.float64)
        total = total + np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
    return total


@pytest.mark.parametrize("nested", [False, True])
def test_convnext_removal_with_approximate(keras: Any, tmp_path: Path, nested: bool) -> None:
    from kprune_batch.probe import probe_inputs

    before = convnext_like(keras, nested=nested)
    before.save(tmp_path / "m.keras")
    spec = _convnext_spec(tmp_path, nested, approximate=True)
    log = _applied_log(spec, tmp_path)
    # expected: each stage's group loses the floor(0.25 * C) channels of smallest summed l1
    # (ties by index), in every member; the Dense(4C) inside the blocks keeps its units
    gone: dict[str, list[int]] = {}
    for stage, members in CONVNEXT_GROUPS.items():
        score = _group_l1(before, members, nested)
        channels = sorted(sorted(range(len(score)), key=lambda c: (score[c], c))[
            :len(score) // 4])
        gone.update({m: channels for m in members})
    path = (lambda m: CONVNEXT_PATHS.get(m, m)) if nested else (lambda m: m)
    got: dict[str, list[int]] = {}
    for r in log["removed"]:
        got.setdefault(r["layer"], []).append(r["filter"])
    assert {k: sorted(v) for k, v in got.items()} == {path(m): v for m, v in gone.items()}
    removal = log["models"][0]["removal"]
    assert removal["approximate"] is True
    lns = ["stem_ln", "s0b0_ln", "s0b1_ln", "down_ln", "s1b0_ln", "head_ln"]
    assert removal["statistics_changed"] == [path(n) for n in lns]

    out = keras.saving.load_model(tmp_path / "pruned" / "m.keras")
    c0, c1 = 8 - len(gone["stem"]), 12 - len(gone["down"])
    # the architecture with the smaller widths, built here: the same parameter count
    assert out.count_params() == convnext_like(keras, c0, c1, nested).count_params() == \
        removal["params_after"]
    keep = {m: [c for c in range(8 if m.startswith("s0") or m == "stem" else 12)
                if c not in v] for m, v in gone.items()}
    s0, s1 = keep["stem"], keep["down"]
    for name, kept in [("stem_ln", s0), ("s0b0_ls", s0), ("s0b1_ls", s0), ("s0b0_ln", s0),
                       ("down_ln", s0), ("s1b0_ln", s1), ("s1b0_ls", s1), ("head_ln", s1)]:
        old, new = _layer(before, name, nested), _layer(out, name, nested)
        for a, b in zip(old.weights, new.weights, strict=True):  # gamma, beta / LayerScale's
            assert np.array_equal(np.asarray(a.numpy())[kept], np.asarray(b.numpy())), name
    dw = np.asarray(_layer(before, "s1b0_dw", nested).kernel.numpy())
    new_dw = _layer(out, "s1b0_dw", nested)
    assert new_dw.groups == new_dw.filters == len(s1)
    assert np.array_equal(np.asarray(new_dw.kernel.numpy()), dw[..., s1])
    pw1 = np.asarray(_layer(before, "s0b1_pw1", nested).kernel.numpy())  # rows of the channels
    assert np.array_equal(np.asarray(_layer(out, "s0b1_pw1", nested).kernel.numpy()), pw1[s0])
    pw2 = np.asarray(_layer(before, "s0b0_pw2", nested).kernel.numpy())  # its units
    assert np.array_equal(np.asarray(_layer(out, "s0b0_pw2", nested).kernel.numpy()),
                          pw2[:, s0])

    # the recorded deviation, recomputed from the two files: the input with the removed
    # filters zeroed (kernel slice and bias) against the output, on kprune's seeded probe batch
    zeroed = keras.saving.load_model(tmp_path / "m.keras")
    for m, filters in gone.items():
        layer = _layer(zeroed, m, nested)
        kernel, bias = (np.array(v.numpy()) for v in layer.weights)
        kernel[..., filters], bias[filters] = 0, 0
        layer.set_weights([kernel, bias])
    (x,) = probe_inputs(zeroed)
    deviation = np.max(np.abs(np.asarray(out(x), np.float64) -
                              np.asarray(zeroed(x), np.float64)))
    assert deviation > 1e-5  # the LayerNorms' statistics changed: not equal
    assert removal["probe_deviation"] == pytest.approx(float(deviation), rel=1e-3)
    kprune("verify", tmp_path / "log.json").expect(0)
    out.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    history = out.fit(rng.normal(size=(2, 16, 16, 3)), rng.normal(size=(2, 3)), epochs=1,
                      verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert out(x).shape == (len(x), 3)


def test_round_to_on_a_concatenate_group_leaves_every_member_a_multiple(keras: Any,
                                                                        tmp_path: Path) -> None:
    """concat(a: 3, b: 5) added to c: 8 (only c listed), 3 of the group's channels ranked away
    with round_to: 2 (c would keep 5: round_to must keep some back). What is left comes from
    the ranking's own picks (computed here from the summed l1), every member keeps a multiple of
    2 filters, a member's filters go exactly where the group's channels do (b's filter f is
    channel 3 + f), and the written model equals the input zeroed on the final selection."""
    model = concat_group_model(keras, "widths")
    _seeded_weights(model, 11)
    model.save(tmp_path / "m.keras")
    spec = write_spec(tmp_path, "version: 1\ndefaults: {action: remove, coupled: union, "
                      "round_to: 2, max_fraction: 1.0}\nmodels:\n  - path: m.keras\n"
                      "    layers:\n      - {name: c, rules: [{smallest: {by: l1, count: 3}}]}\n")
    log = _applied_log(spec, tmp_path)
    l1 = _kernel_l1(model, "abc")
    scores = l1["c"] + np.concatenate([l1["a"], l1["b"]])
    ranked = set(sorted(range(8), key=lambda u: (scores[u], u))[:3])
    got: dict[str, set[int]] = {n: set() for n in "abc"}
    for r in log["removed"]:
        got[r["layer"]].add(r["filter"])
    channels = got["c"]
    assert channels and channels < ranked  # some kept back, the rest the ranking's picks
    assert got["a"] == {u for u in channels if u < 3}
    assert got["b"] == {u - 3 for u in channels if u >= 3}
    for n, width in {"a": 3, "b": 5, "c": 8}.items():
        assert (width - len(got[n])) % 2 == 0, (n, got)
    _assert_written_equals_zeroed(keras, model, tmp_path,
                                  {n: sorted(v) for n, v in got.items() if v}, seed=5)


def test_a_global_cap_binds_on_a_concatenate_input_inside_a_group(keras: Any,
                                                                  tmp_path: Path) -> None:
    """One ranking across the entry (a, b, c, head; count 4, max_fraction 0.5): the group
    concat(a: 3, b: 5) + c: 8 is one unit of 8 channels, head one of 3, each normalised by its
    mean. a's filters (and c's first three) are scaled down so that channels 0-2 rank first and
    an uncapped ranking would take all of a; a's cap, floor(0.5 * 3) = 1, binds: a channel
    u < 3 costs a and c a filter each, u >= 3 costs b and c, and the ranking skips a channel
    that would push any member past its cap (computed here, in order of normalised score, then
    channel, then unit). The final selection (after coupling) keeps every member within its
    cap; the written model equals the input zeroed on it, with the parameters counted here."""
    model = concat_group_model(keras, "widths")
    _seeded_weights(model, 13)
    for name in ("a", "c"):
        kernel, bias = model.get_layer(name).get_weights()
        kernel[..., :3] *= 0.05
        model.get_layer(name).set_weights([kernel, bias])
    model.save(tmp_path / "m.keras")
    spec = write_spec(tmp_path, "version: 1\ndefaults: {action: remove, coupled: union}\n"
                      "models:\n  - path: m.keras\n    layers:\n      - {match: '*', rules: "
                      "[{smallest: {by: l1, count: 4, across: entry}}]}\n")
    log = _applied_log(spec, tmp_path)
    l1 = _kernel_l1(model, ("a", "b", "c", "head"))
    caps = {"a": 1, "b": 2, "c": 4, "head": 1}  # floor(0.5 * n)
    # (scores, {member: the filters a channel costs it}) per unit, in the entry's order
    units = [(l1["c"] + np.concatenate([l1["a"], l1["b"]]),
              {"a": np.arange(8) < 3, "b": np.arange(8) >= 3, "c": np.ones(8, bool)}),
             (l1["head"], {"head": np.ones(3, bool)})]

    def ranked(capped: bool) -> list[set[int]]:
        cands = sorted((s[u] / np.mean(np.abs(s)), u, pos)
                       for pos, (s, _) in enumerate(units) for u in range(len(s)))
        spent = dict.fromkeys(caps, 0)
        taken: list[set[int]] = [set(), set()]
        for _score, u, pos in cands:
            if sum(map(len, taken)) == 4:
                break
            cost = {m: int(c[u]) for m, c in units[pos][1].items()}
            if capped and any(spent[m] + cost[m] > caps[m] for m in cost):
                continue
            spent.update({m: spent[m] + cost[m] for m in cost})
            taken[pos].add(u)
        return taken

    assert sum(u < 3 for u in ranked(capped=False)[0]) > caps["a"]  # uncapped: all of a
    group, head = ranked(capped=True)
    selection = {"a": sorted(u for u in group if u < 3),
                 "b": sorted(u - 3 for u in group if u >= 3), "c": sorted(group),
                 "head": sorted(head)}
    selection = {k: v for k, v in selection.items() if v}
    got: dict[str, list[int]] = {}
    for r in log["removed"]:
        got.setdefault(r["layer"], []).append(r["filter"])
    assert {k: sorted(v) for k, v in got.items()} == selection
    assert len(got["a"]) == caps["a"]  # the cap bound there
    assert all(len(v) <= caps[k] for k, v in got.items())
    rankings = {layer["layer"]: layer["rankings"] for layer in log["models"][0]["layers"]}
    # per layer, in its own filters: what the ranking took there, its cap, whether it bound
    # (a is at its cap; b and c never were, whatever they took)
    assert {n: [(r["taken"], r["cap"], r["cap_bound"]) for r in rankings[n]] for n in caps} == {
        n: [(len(selection.get(n, [])), caps[n], n == "a")] for n in caps}
    _assert_written_equals_zeroed(keras, model, tmp_path, selection, seed=6)


def adjust_block_model(keras: Any) -> Any:
    """NASNet's adjust block in miniature (keras/src/applications/nasnet.py _adjust_block):
    two use_bias=False 1x1 convs concatenated -> BN, added to conv 'h' -> BN 'h_bn' (a coupled
    group), then ReLU -> a 3x3 'same' separable conv, whose zero padding makes a constant
    unfoldable: only a zero reaches it exactly."""
    L = keras.layers
    i = keras.Input((7, 7, 3))
    cat = L.Concatenate(name="cat")([L.Conv2D(3, 1, use_bias=False, name="p1")(i),
                                     L.Conv2D(3, 1, use_bias=False, name="p2")(i)])
    x = L.Add(name="add")([L.BatchNormalization(name="cat_bn")(cat),
                           L.BatchNormalization(name="h_bn")(L.Conv2D(6, 1, name="h")(i))])
    x = L.SeparableConv2D(4, 3, padding="same", name="sep")(L.ReLU(name="relu")(x))
    return keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D(name="gap")(x)))


@pytest.mark.parametrize("batchnorm", ["neutralize", "neutralize_concat"])
def test_neutralize_concat_makes_a_concatenate_group_exact(keras: Any, tmp_path: Path,
                                                           batchnorm: str) -> None:
    """Removing channels of the adjust group (p1, p2, h listed, 25 % smallest summed l1): with
    the default the concatenation's BN keeps its constants, which reach the padded separable
    conv, so exact removal is refused in one line; with batchnorm: neutralize_concat that BN
    is neutralised too and the removal equals the zeroed model so edited (oracle here)."""
    model = adjust_block_model(keras)
    _seeded_weights(model, 13)
    model.save(tmp_path / "m.keras")
    spec = write_spec(tmp_path, "version: 1\ndefaults: {action: remove, coupled: union, "
                      f"batchnorm: {batchnorm}}}\nmodels:\n  - path: m.keras\n    layers:\n"
                      + "".join(f"      - {{name: {n}, rules: [{{smallest: {{by: l1, "
                                f"fraction: 0.25}}}}]}}\n" for n in ("p1", "p2", "h")))
    l1 = _kernel_l1(model, ("p1", "p2", "h"))
    scores = l1["h"] + np.concatenate([l1["p1"], l1["p2"]])
    chosen = sorted(sorted(range(6), key=lambda u: (scores[u], u))[:6 // 4])
    selection = {"p1": [u for u in chosen if u < 3], "p2": [u - 3 for u in chosen if u >= 3],
                 "h": chosen}
    selection = {k: v for k, v in selection.items() if v}
    if batchnorm == "neutralize":
        # what reaches sep: relu(cat_bn's constant + 0), h_bn being h's neutralised follower
        bn = model.get_layer("cat_bn")
        g, beta, mean, var = (v.astype(np.float64) for v in bn.get_weights())
        constant = np.maximum(beta - g * mean / np.sqrt(var + bn.epsilon), 0.0)[chosen]
        err = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(1).stderr
        assert err.splitlines()[0] == (
            "error: model 'm', layer 'sep': removed filters of 'h', 'p1', 'p2' reach it as the "
            f"constant {constant[np.argmax(np.abs(constant))]:.6g}, and its 'same' padding "
            "means border positions see fewer of them, so folding into its bias is not exact; "
            "set batchnorm: neutralize_concat on the entries of 'h', 'p1', 'p2' to silence "
            "BatchNormalization 'cat_bn' after a Concatenate for an exact removal, or set "
            "approximate: true on the entries of 'h', 'p1', 'p2' to accept the deviation "
            "(measured and logged), or zero these filters instead (action: zero)"), err
        assert not (tmp_path / "pruned" / "m.keras").exists()
        return
    log = _applied_log(spec, tmp_path)
    got: dict[str, list[int]] = {}
    for r in log["removed"]:
        got.setdefault(r["layer"], []).append(r["filter"])
    assert {k: sorted(v) for k, v in got.items()} == selection
    removal = log["models"][0]["removal"]
    assert removal["approximate"] is False and removal["folded"] == []
    _assert_written_equals_zeroed(keras, model, tmp_path, selection, seed=5, through_concat=True)


def depthwise_chain_model(keras: Any) -> Any:
    """pw -> BN -> ReLU -> 3x3 depthwise -> 1x1 projection: the depthwise layer's filters are
    pw's channels (a group), and its plan needs its input shape."""
    L = keras.layers
    i = keras.Input((7, 7, 3))
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(L.Conv2D(6, 1, name="pw")(i)))
    x = L.Conv2D(4, 1, name="proj")(L.DepthwiseConv2D(3, padding="same", name="dw")(x))
    return keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D(name="gap")(x)))


@pytest.mark.parametrize("case", ["depthwise", "adjust"])
def test_removal_from_a_legacy_h5_file(keras: Any, tmp_path: Path, case: str) -> None:
    """A .h5 file's config carries no build_config: the input shapes a removal plan needs (a
    depthwise layer's, a Concatenate's widths) come from the tensors its inbound nodes record.
    The written .h5 equals the input zeroed here, with the parameters counted here."""
    model = depthwise_chain_model(keras) if case == "depthwise" else adjust_block_model(keras)
    _seeded_weights(model, 17)
    model.save(tmp_path / "m.h5")
    if case == "depthwise":
        entries, selection, through = "      - {name: dw, rules: [{index: [1, 4]}]}\n", {
            "pw": [1, 4], "dw": [1, 4]}, False
    else:
        entries = "      - {name: p2, rules: [{index: [0]}]}\n"
        selection, through = {"p2": [0], "h": [3]}, True  # p2's filter 0: the group's channel 3
    spec = write_spec(tmp_path, "version: 1\ndefaults: {action: remove, coupled: union, "
                      "batchnorm: neutralize_concat}\nmodels:\n  - path: m.h5\n    layers:\n"
                      + entries)
    log = _applied_log(spec, tmp_path)
    got: dict[str, list[int]] = {}
    for r in log["removed"]:
        got.setdefault(r["layer"], []).append(r["filter"])
    assert {k: sorted(v) for k, v in got.items()} == selection
    _assert_written_equals_zeroed(keras, model, tmp_path, selection, seed=6,
                                  through_concat=through, output="m.h5")


def test_removal_from_a_h5_config_without_shapes_is_refused_in_one_line(keras: Any,
                                                                       tmp_path: Path) -> None:
    """With neither a build_config nor tensor shapes in the config (as a Keras 2 file), a
    depthwise layer's input channels are unknown: refused with one line, nothing written."""
    import h5py

    model = depthwise_chain_model(keras)
    model.save(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        stack = [config]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                if item.get("class_name") == "__keras_tensor__":
                    item["config"].pop("shape")
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        h5.attrs["model_config"] = json.dumps(config)
    spec = write_spec(tmp_path, "version: 1\ndefaults: {action: remove}\nmodels:\n"
                      "  - path: m.h5\n    layers:\n      - {name: dw, rules: [{index: [1]}]}\n")
    err = kprune("apply", spec).expect(1).stderr
    assert err.splitlines()[0] == (
        "error: model 'm', layer 'dw': the model config does not record this layer's input "
        "shape; save the model with Keras 3 after building it"), err
    assert not (tmp_path / "pruned" / "m.h5").exists()
