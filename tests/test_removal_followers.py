"""Removal through the consumers keras-surgeon's channel-deletion cases use (noise, Reshape,
Permute, recurrent and sequence Dense layers, LayerNorm/LayerScale), from a Conv*Transpose, and
an emptied Concatenate branch: one kprune run for all models that follow, one for the refusals."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import _seeded_weights, kprune, write_spec

# which layer loses which filters, and the entry's extra options
CASES: dict[str, dict[str, Any]] = {
    "noise1d": {"layer": "c", "filters": [1, 4]},
    "reshape_lstm": {"layer": "c", "filters": [0, 3]},
    "conv3d_gru": {"layer": "c", "filters": [2], "options": "bias: keep"},
    "permutes": {"layer": "c", "filters": [1, 2, 5]},
    "sequence": {"layer": "c", "filters": [0, 4]},
    "transpose": {"layer": "t", "filters": [1, 5]},
    "concat_branch": {"layer": "b", "filters": [0, 1, 2],
                      "options": "allow_empty_layer: true, max_fraction: 1.0"},
    "layernorm": {"layer": "c", "filters": [2], "options": "approximate: true"},
}
REFUSED: dict[str, dict[str, Any]] = {
    "layernorm_exact": {"layer": "c", "filters": [2]},
    "reshape_moves": {"layer": "c", "filters": [1]},
    "permute_middle": {"layer": "c", "filters": [1]},
    "empty_not_concat": {"layer": "c", "filters": [0, 1, 2],
                         "options": "allow_empty_layer: true, max_fraction: 1.0"},
}


def _build(keras: Any, name: str) -> Any:
    from keras.src.applications.convnext import LayerScale

    L = keras.layers
    if name == "noise1d":
        i = keras.Input((12, 3))
        x = L.Conv1D(6, 3, activation="relu", name="c")(i)
        x = L.AlphaDropout(0.1)(L.GaussianDropout(0.2)(L.GaussianNoise(0.1)(x)))
        x = L.Conv1D(4, 1, name="d")(x)
        return keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling1D()(x)))
    if name == "reshape_lstm":
        i = keras.Input((5, 5, 3))
        x = L.Reshape((25, 6), name="r")(L.Conv2D(6, 1, name="c")(i))
        return keras.Model(i, L.Dense(2, name="out")(L.LSTM(3, name="rnn")(x)))
    if name == "conv3d_gru":
        i = keras.Input((3, 4, 4, 2))
        x = L.Conv3D(5, 1, activation="relu", name="c")(i)
        x = L.Reshape((48, 5), name="r")(x)
        return keras.Model(i, L.Dense(2, name="out")(L.GRU(3, name="rnn")(x)))
    if name == "permutes":
        i = keras.Input((4, 5, 3))
        c = L.Conv2D(6, 1, name="c")(i)
        d = L.Conv2D(4, 1, name="d")(L.Permute((2, 1, 3), name="swap_hw")(c))
        e = L.Dense(3, name="e")(L.Flatten()(L.Permute((3, 1, 2), name="to_first")(c)))
        x = L.Concatenate()([L.Dense(2)(L.GlobalAveragePooling2D()(d)), e])
        return keras.Model(i, x)
    if name == "sequence":
        i = keras.Input((10, 3))
        c = L.Conv1D(6, 3, name="c")(i)
        a = L.GlobalAveragePooling1D()(L.Dense(4, name="seq")(LayerScale(0.5, 6, name="ls")(c)))
        b = L.SimpleRNN(3, name="rnn")(c)
        return keras.Model(i, L.Dense(2, name="out")(L.Concatenate()([a, b])))
    if name == "transpose":
        i = keras.Input((4, 4, 3))
        x = L.Conv2DTranspose(6, 3, strides=2, name="t")(i)
        x = L.ReLU()(L.BatchNormalization(name="bn")(x))
        x = L.Conv2D(4, 1, name="d")(x)
        return keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(x)))
    if name == "concat_branch":
        i = keras.Input((6, 6, 3))
        a = L.Conv2D(4, 1, name="a")(i)
        b = L.ReLU(name="b_relu")(L.BatchNormalization(name="b_bn")(L.Conv2D(3, 1, name="b")(i)))
        x = L.Conv2D(5, 1, name="d")(L.Concatenate(name="cat")([a, b]))
        return keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(x)))
    if name in ("layernorm", "layernorm_exact"):
        i = keras.Input((5, 5, 3))
        x = L.LayerNormalization(axis=-1, name="ln")(L.Conv2D(6, 1, name="c")(i))
        x = L.Dense(4, name="d")(LayerScale(0.5, 6, name="ls")(x))
        return keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(x)))
    if name == "reshape_moves":
        i = keras.Input((4, 4, 3))
        x = L.Reshape((4, 24), name="r")(L.Conv2D(6, 1, name="c")(i))
        return keras.Model(i, L.Dense(2)(L.Flatten()(x)))
    if name == "permute_middle":
        i = keras.Input((4, 4, 3))
        x = L.Permute((1, 3, 2), name="p")(L.Conv2D(6, 1, name="c")(i))
        return keras.Model(i, L.Dense(2)(L.Flatten()(x)))
    if name == "empty_not_concat":
        i = keras.Input((4, 4, 3))
        x = L.Conv2D(4, 1, name="d")(L.Conv2D(3, 1, name="c")(i))
        return keras.Model(i, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    raise AssertionError(name)


def _spec(folder: Path, cases: dict[str, dict[str, Any]], name: str) -> Path:
    lines = ["version: 1", "defaults: {action: remove}", "models:"]
    for model, case in cases.items():
        extra = f", {case['options']}" if case.get("options") else ""
        lines += [f"  - path: {model}.keras",
                  f"    layers: [{{name: {case['layer']}, rules: [{{index: {case['filters']}}}]"
                  f"{extra}}}]"]
    return write_spec(folder, "\n".join(lines) + "\n", name)


@pytest.fixture(scope="session")
def runs(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("followers")
    for seed, name in enumerate([*CASES, *REFUSED]):
        model = _build(keras, name)
        _seeded_weights(model, 40 + seed)
        if name == "conv3d_gru":  # a loud removed filter: relu(0.7) reaches the GRU
            model.get_layer("c").bias.assign(np.array([0.1, -0.2, 0.7, 0.3, 0.2], "float32"))
        model.save(folder / f"{name}.keras")
    ok = kprune("apply", _spec(folder, CASES, "ok.yaml"), "--audit-log", folder / "ok.json")
    refused = kprune("apply", _spec(folder, REFUSED, "refused.yaml"),
                     "--audit-log", folder / "refused.json")
    return {"folder": folder, "ok": ok, "refused": refused,
            "log": json.loads((folder / "ok.json").read_text()),
            "verify": kprune("verify", folder / "ok.json")}


def _load(keras: Any, path: Path) -> Any:
    return keras.saving.load_model(path, compile=False)


def zeroed(keras: Any, path: Path, layer: str, filters: list[int], bias: str = "zero") -> Any:
    """The contract's reference, built here: the filters' kernel slices (axis -2 for a
    Conv*Transpose, else -1) and biases 0, a direct BN follower's gamma and beta 0."""
    model = _load(keras, path)
    target = model.get_layer(layer)
    kernel = target.kernel.numpy()
    if "Transpose" in type(target).__name__:
        kernel[..., filters, :] = 0
    else:
        kernel[..., filters] = 0
    target.kernel.assign(kernel)
    if bias == "zero" and target.use_bias:
        b = target.bias.numpy()
        b[filters] = 0
        target.bias.assign(b)
    for bn in model.layers:
        if type(bn).__name__ == "BatchNormalization" and bn.input is target.output:
            g, beta, mean, var = bn.get_weights()
            g[filters], beta[filters] = 0, 0
            bn.set_weights([g, beta, mean, var])
    return model


def probe_batch(model: Any) -> np.ndarray:
    """kprune's probe batch, as its README states it: default_rng(0), standard normal, 4."""
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(0).normal(size=(4,) + shape).astype("float32")


def _keep(n: int, filters: list[int]) -> list[int]:
    return [f for f in range(n) if f not in filters]


@pytest.mark.parametrize("name", list(CASES))
def test_follows(keras: Any, runs: dict[str, Any], name: str) -> None:
    runs["ok"].expect(0)
    case = CASES[name]
    folder = runs["folder"]
    (entry,) = [m for m in runs["log"]["models"] if m["name"] == name]
    assert entry["status"] == "ok", entry["error"]
    before = _load(keras, folder / f"{name}.keras")
    after = _load(keras, folder / "pruned" / f"{name}.keras")
    filters = case["filters"]

    def w(model: Any, layer: str, var: str = "kernel") -> np.ndarray:
        return next(v.numpy() for v in model.get_layer(layer).weights if v.name == var)

    if name == "transpose":  # kernel (k, k, filters, in): filters on axis -2
        keep = _keep(6, filters)
        np.testing.assert_array_equal(w(after, "t"), w(before, "t")[..., keep, :])
        np.testing.assert_array_equal(w(after, "t", "bias"), w(before, "t", "bias")[keep])
        np.testing.assert_array_equal(w(after, "bn", "moving_mean"),
                                      w(before, "bn", "moving_mean")[keep])
        np.testing.assert_array_equal(w(after, "d"), w(before, "d")[..., keep, :])
    elif name == "concat_branch":  # b, its BN and ReLU left the model; d lost rows 4..6
        names = {layer.name for layer in after.layers}
        assert not names & {"b", "b_bn", "b_relu"}
        assert entry["removal"]["dropped_layers"] == ["b", "b_bn", "b_relu"]
        assert after.get_layer("cat").output.shape[-1] == 4
        np.testing.assert_array_equal(w(after, "d"), w(before, "d")[..., :4, :])
    else:
        n = w(before, case["layer"]).shape[-1]
        keep = _keep(n, filters)
        np.testing.assert_array_equal(w(after, "c"), w(before, "c")[..., keep])
        if name == "noise1d":
            np.testing.assert_array_equal(w(after, "d"), w(before, "d")[..., keep, :])
        elif name in ("reshape_lstm", "conv3d_gru"):  # input kernel (in, k*units): rows
            np.testing.assert_array_equal(w(after, "rnn"), w(before, "rnn")[keep])
            np.testing.assert_array_equal(w(after, "rnn", "recurrent_kernel"),
                                          w(before, "rnn", "recurrent_kernel"))
        elif name == "permutes":
            np.testing.assert_array_equal(w(after, "d"), w(before, "d")[..., keep, :])
            # to_first makes (6, 4, 5); Flatten's row of channel c at (h, w) is c*20 + h*5 + w
            rows = [c * 20 + p for c in keep for p in range(20)]
            np.testing.assert_array_equal(w(after, "e"), w(before, "e")[rows])
        elif name == "sequence":
            # LayerScale's one variable has no name of its own ('variable', uniquified per
            # process as 'variable_1', ...): read it by position
            np.testing.assert_array_equal(after.get_layer("ls").get_weights()[0],
                                          before.get_layer("ls").get_weights()[0][keep])
            np.testing.assert_array_equal(w(after, "seq"), w(before, "seq")[keep])
            np.testing.assert_array_equal(w(after, "rnn"), w(before, "rnn")[keep])
        elif name == "layernorm":
            for var in ("gamma", "beta"):
                np.testing.assert_array_equal(w(after, "ln", var), w(before, "ln", var)[keep])
            np.testing.assert_array_equal(w(after, "d"), w(before, "d")[keep])
    if name == "conv3d_gru":  # relu(0.7) * kernel[2] folded into the GRU's input bias row
        (fold,) = entry["removal"]["folded"]
        assert fold["layer"] == "rnn"
        assert fold["constants"] == [{"channel": 2, "constant": pytest.approx(0.7, abs=1e-6)}]
        bias = w(before, "rnn", "bias").astype("float64")
        bias[0] += 0.7 * w(before, "rnn")[2]
        np.testing.assert_allclose(w(after, "rnn", "bias"), bias, rtol=1e-6, atol=1e-6)

    # kprune verify rebuilds the output from the input and the log (dropped layers, folds,
    # LayerScale's unnamed variable included)
    assert f"ok      {name}: 0 zeroed and {len(filters)} removed filter(s) verified" in \
        runs["verify"].stdout.splitlines()[list(CASES).index(name)], runs["verify"]
    ref = zeroed(keras, folder / f"{name}.keras", case["layer"], filters,
                 "keep" if "bias: keep" in case.get("options", "") else "zero")
    x = probe_batch(ref)
    want = np.asarray(ref(x, training=False), dtype="float64")
    got = np.asarray(after(x, training=False), dtype="float64")
    deviation = float(np.max(np.abs(want - got)))
    if name == "layernorm":  # inexact by nature: measured and recorded, not bounded
        removal = entry["removal"]
        assert removal["approximate"] is True and removal["statistics_changed"] == ["ln"]
        assert deviation > 1e-4
        assert removal["probe_deviation"] == pytest.approx(deviation, rel=1e-4, abs=1e-7)
    else:
        assert deviation <= 1e-5 * np.max(np.abs(want)) + 1e-5
        assert entry["removal"]["approximate"] is False


def test_refusals(runs: dict[str, Any]) -> None:
    result = runs["refused"].expect(1)
    hint = ("set approximate: true on the entries of 'c' to accept the deviation (measured and "
            "logged), or zero these filters instead (action: zero)")
    assert sorted(result.stderr.splitlines()) == sorted([
        "error: model 'layernorm_exact', layer 'ln': removed filters of 'c' reach it, and a "
        "LayerNormalization computes its statistics over the channels, so removing channels "
        f"changes them and the removed model cannot equal the zeroed one; {hint}",
        "error: model 'reshape_moves', layer 'r': a Reshape to (4, 24) moves the 6 channels off "
        "their axis, so which channel goes where cannot be proven (followed: a Reshape keeping "
        "the channel axis last with its size, or to rank 1)",
        "error: model 'permute_middle', layer 'p': a Permute(1, 3, 2) moves the channels to "
        "axis 2, neither first nor last, and no consumer reads them there",
        "error: model 'empty_not_concat', layer 'c': removal would leave the layer without "
        "filters, and the Conv2D 'd' it feeds cannot lose its input (only a Concatenate can "
        "lose one of its inputs)",
    ])
    assert not list((runs["folder"] / "pruned").glob("layernorm_exact*"))
