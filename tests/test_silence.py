"""Silence: BatchNorm followers neutralised (inference and training), honest `silent` flags, probe."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import _seeded_weights, kprune, run_model, write_spec

FILTER = 1


def build(keras: Any, folder: Path, name: str, *, activation: str = "linear",
          bn: dict | None = None, act_layer: bool = False, add_branch: bool = False) -> Path:
    L = keras.layers
    inputs = keras.Input((6, 6, 3), name="x")
    x = L.Conv2D(4, 3, padding="same", activation=activation, name="conv")(inputs)
    if act_layer:
        x = L.ReLU(name="relu")(x)
    if bn is not None:
        x = L.BatchNormalization(name="bn", **bn)(x)
    if add_branch:
        other = L.Conv2D(4, 1, name="other")(inputs)
        x = L.Add(name="add")([x, other])
    outputs = L.Dense(2, name="out")(L.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inputs, outputs, name=name)
    _seeded_weights(model, 5)  # non-zero beta, moving mean and variance: trained-looking BN
    path = folder / f"{name}.keras"
    model.save(path)
    return path


def apply_one(folder: Path, model: Path, extra: str = "") -> dict:
    spec = write_spec(folder, f"""\
        version: 1
        models:
          - path: {model.name}
            layers:
              - {{name: conv, {extra} rules: [{{index: [{FILTER}]}}]}}
        """, f"{model.stem}.yaml")
    kprune("apply", spec, "--probe", "--audit-log", folder / f"{model.stem}.json").expect(0)
    return json.loads((folder / f"{model.stem}.json").read_text())


def channel(keras: Any, path: Path, layer: str, training: bool) -> np.ndarray:
    model = keras.saving.load_model(str(path), compile=False)
    probe = keras.Model(model.inputs, model.get_layer(layer).output)
    x = np.random.default_rng(7).normal(size=(8, 6, 6, 3)).astype("float32")
    return np.asarray(probe(x, training=training))[..., FILTER]


@pytest.mark.parametrize("bn", [
    {}, {"scale": False}, {"center": False}, {"scale": False, "center": False},
])
@pytest.mark.parametrize("act_layer", [False, True])
def test_batchnorm_follower_is_neutralised(keras: Any, tmp_path: Path, bn: dict,
                                           act_layer: bool) -> None:
    model = build(keras, tmp_path, "m", bn=bn, act_layer=act_layer)
    before = channel(keras, model, "bn", training=False)
    assert np.abs(before).max() > 0  # the BN's own shift would keep the channel alive
    log = apply_one(tmp_path, model)
    out = tmp_path / "pruned" / "m.keras"
    for training in (False, True):
        assert np.all(channel(keras, out, "bn", training) == 0.0), training
    (record,) = log["zeroed"]
    assert record["silent"] is True and record["constant"] is None
    assert record["probe"]["max_abs"] == 0.0  # after the BN, in both modes
    assert record["probe"]["layer_max_abs"] == 0.0  # linear conv: its own output is 0 too
    assert {e["layer"] for e in record["batchnorm"]} == {"bn"}


def test_sigmoid_conv_is_not_silent_and_records_its_constant(keras: Any, tmp_path: Path) -> None:
    model = build(keras, tmp_path, "sig", activation="sigmoid")
    log = apply_one(tmp_path, model)
    (record,) = log["zeroed"]
    assert record["silent"] is False
    assert record["constant"] == 0.5
    assert record["probe"] == {"max_abs": 0.5, "layer_max_abs": 0.5}
    assert np.all(channel(keras, tmp_path / "pruned" / "sig.keras", "conv", False) == 0.5)


def test_sigmoid_conv_with_neutralised_bn_is_silent(keras: Any, tmp_path: Path) -> None:
    model = build(keras, tmp_path, "sigbn", activation="sigmoid", bn={})
    (record,) = apply_one(tmp_path, model)["zeroed"]
    assert record["silent"] is True
    assert record["probe"] == {"max_abs": 0.0, "layer_max_abs": 0.5}  # 0.5 before the BN
    for training in (False, True):
        assert np.all(channel(keras, tmp_path / "pruned" / "sigbn.keras", "bn", training) == 0)


def test_batchnorm_keep_records_the_constant(keras: Any, tmp_path: Path) -> None:
    model = build(keras, tmp_path, "keep", bn={})
    bn = keras.saving.load_model(str(model)).get_layer("bn")
    gamma, beta, mean, var = (w.numpy().astype(np.float64)[FILTER] for w in bn.weights)
    expected = gamma * (0.0 - mean) / np.sqrt(var + bn.epsilon) + beta
    (record,) = apply_one(tmp_path, model, "batchnorm: keep,")["zeroed"]
    assert record["silent"] is False
    assert record["constant"] == pytest.approx(expected, rel=1e-12)
    assert record["batchnorm"] == []
    measured = channel(keras, tmp_path / "pruned" / "keep.keras", "bn", False)
    np.testing.assert_allclose(measured, expected, rtol=1e-5)


@pytest.mark.parametrize("bias, silent", [(-0.7, True), (0.7, False)])
def test_bias_keep_through_relu(keras: Any, tmp_path: Path, bias: float, silent: bool) -> None:
    model_path = build(keras, tmp_path, "bias", activation="relu")
    model = keras.saving.load_model(str(model_path))
    conv = model.get_layer("conv")
    b = conv.bias.numpy()
    b[FILTER] = bias
    conv.bias.assign(b)
    model.save(model_path)
    (record,) = apply_one(tmp_path, model_path, "bias: keep,")["zeroed"]
    assert record["silent"] is silent
    assert record["bias"] == "kept"
    if not silent:
        assert record["constant"] == pytest.approx(0.7, rel=1e-6)


def test_silent_channel_adds_nothing_downstream(keras: Any, tmp_path: Path) -> None:
    model = build(keras, tmp_path, "res", activation="relu", add_branch=True)
    (record,) = apply_one(tmp_path, model)["zeroed"]
    assert record["silent"] is True
    out = tmp_path / "pruned" / "res.keras"
    np.testing.assert_array_equal(channel(keras, out, "add", False),
                                  channel(keras, out, "other", False))


def test_a_wrong_silence_claim_fails_the_model(keras: Any, tmp_path: Path, monkeypatch) -> None:
    """If the static analysis ever claimed silence wrongly, the probe must stop the write."""
    from kprune_batch import executor, silence
    from kprune_batch.plan import compile_plan
    from kprune_batch.spec import read_spec

    build(keras, tmp_path, "liar", activation="sigmoid")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: liar.keras\n"
                                "    layers: [{name: conv, rules: [{index: [1]}]}]\n")
    real = silence.channel_fate

    def lying(*args: Any, **kwargs: Any) -> silence.Fate:
        fate = real(*args, **kwargs)
        fate.silent = True
        return fate

    monkeypatch.setattr(executor, "channel_fate", lying)
    (job,) = compile_plan(read_spec(spec)).jobs
    outcome = executor.run_job(job, probe=True)
    assert outcome.status == "failed"
    assert outcome.error == ("model 'liar', layer 'conv': probe measured max |activation| 0.5 on "
                             "filter 1, which kprune decided is silent; nothing was written for "
                             "this model; please report this as a bug, with the audit log")
    assert not (tmp_path / "pruned" / "liar.keras").exists()
    assert [p.name for p in (tmp_path / "pruned").iterdir()] == []


def test_channels_first_bn_follower(keras: Any, tmp_path: Path) -> None:
    L = keras.layers
    inputs = keras.Input((3, 7, 9), name="x")  # not square: see the test below
    x = L.Conv2D(4, 3, data_format="channels_first", name="conv")(inputs)
    x = L.BatchNormalization(axis=1, name="bn")(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D(data_format="channels_first")(x))
    _seeded_weights(model, 9)
    model.save(tmp_path / "cf.keras")
    (record,) = apply_one(tmp_path, tmp_path / "cf.keras")["zeroed"]
    assert record["silent"] is True and record["probe"] == {"max_abs": 0.0, "layer_max_abs": 0.0}
    out = keras.saving.load_model(str(tmp_path / "pruned" / "cf.keras"), compile=False)
    bn = out.get_layer("bn")
    assert bn.gamma.numpy()[FILTER] == 0 and bn.beta.numpy()[FILTER] == 0
    x = np.random.default_rng(1).normal(size=(2, 3, 7, 9)).astype("float32")
    for training in (False, True):
        assert np.all(run_model(keras, out, x, training, layer="bn")[:, FILTER] == 0)


def test_bn_after_pooling_and_dropout_is_still_a_follower(keras: Any, tmp_path: Path) -> None:
    L = keras.layers
    inputs = keras.Input((6, 6, 3), name="x")
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Dropout(0.3, name="drop")(x)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    _seeded_weights(model, 4)
    model.save(tmp_path / "pool.keras")
    (record,) = apply_one(tmp_path, tmp_path / "pool.keras")["zeroed"]
    assert record["silent"] is True
    assert [e["layer"] for e in record["batchnorm"]] == ["bn", "bn"]
    assert record["probe"] == {"max_abs": 0.0, "layer_max_abs": 0.0}


def conv2d_channels_first(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A 'valid', stride-1 channels_first Conv2D in float64 numpy: the reference no framework
    bug can touch. x: (n, c, h, w); kernel: (kh, kw, c, f) as Keras stores it."""
    kh, kw = kernel.shape[:2]
    n, _, h, w = x.shape
    out = np.empty((n, kernel.shape[-1], h - kh + 1, w - kw + 1))
    for i in range(h - kh + 1):
        for j in range(w - kw + 1):
            patch = x[:, :, i:i + kh, j:j + kw].astype(np.float64)
            out[:, :, i, j] = np.einsum("nchw,hwcf->nf", patch, kernel.astype(np.float64)) + bias
    return out


@pytest.mark.parametrize("size", [(6, 6), (6, 7)], ids=["4x4-out", "4x5-out"])
def test_probe_catches_what_static_analysis_cannot(keras: Any, tmp_path: Path,
                                                   size: tuple[int, int]) -> None:
    """TF 2.21 on CPU adds a channels_first Conv2D's bias along the wrong axis when the output's
    width equals the filter count (found by this probe; measured with 4 filters: 4x4 and 3x4
    outputs have it, 4x5 does not). A zeroed filter then is not 0, whatever its kernel and bias
    hold: --probe must refuse the model instead of claiming silence.

    Whether this framework has the bug is measured against a numpy convolution, on the probe's
    documented batch (README "The probe": default_rng(0), standard normal, (4, *input_shape)).
    With the bug, the refusal must give the value the framework computes for the channel; without
    it, the written model must be right (channel 1 exactly 0, the rest as numpy computes). The
    4x5 output is outside the bug's condition, so that branch runs on every framework too."""
    L = keras.layers
    inputs = keras.Input((3, *size), name="x")
    conv = L.Conv2D(4, 3, data_format="channels_first", name="conv")
    model = keras.Model(inputs, conv(inputs))
    _seeded_weights(model, 9)
    model.save(tmp_path / "sq.keras")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: sq.keras\n"
                                "    layers: [{name: conv, rules: [{index: [1]}]}]\n")
    # the model kprune should write, made by hand: filter 1's kernel slice and bias zeroed
    kernel, bias = conv.kernel.numpy(), conv.bias.numpy()
    kernel[..., 1], bias[1] = 0, 0
    conv.kernel.assign(kernel)
    conv.bias.assign(bias)
    x = np.random.default_rng(0).standard_normal((4, 3, *size)).astype("float32")
    reference = conv2d_channels_first(x, kernel, bias)
    assert not reference[:, 1].any()
    # (where this CPU cannot run channels_first convolutions, kprune and this line run the twin,
    # which has no such bug: then the written model must be right)
    framework = np.asarray(run_model(keras, model, x), np.float64)
    buggy = np.abs(framework - reference).max() > 1e-4
    result = kprune("apply", spec, "--probe", "--audit-log", tmp_path / "log.json")
    log = json.loads((tmp_path / "log.json").read_text())
    (logged,) = log["models"]
    if buggy:
        result.expect(1)
        measured = np.abs(framework[:, 1]).max()  # what the framework puts in channel 1
        assert measured > 0
        line = (f"model 'sq', layer 'conv': probe measured max |activation| {measured:.3g} on "
                f"filter 1, which kprune decided is silent; nothing was written for this model; "
                f"please report this as a bug, with the audit log")
        assert result.stderr == f"error: {line}\n"
        assert (logged["status"], logged["error"], logged["output"]) == ("failed", line, None)
        assert not (tmp_path / "pruned" / "sq.keras").exists()
    else:
        result.expect(0)
        (record,) = log["zeroed"]
        assert (record["filter"], record["silent"]) == (1, True)
        assert record["probe"] == {"max_abs": 0.0, "layer_max_abs": 0.0}
        written = keras.saving.load_model(str(tmp_path / "pruned" / "sq.keras"), compile=False)
        got = np.asarray(run_model(keras, written, x), np.float64)
        assert not got[:, 1].any()
        assert np.abs(got - reference).max() <= 1e-5


# --- what the static analysis follows, from the config alone ----------------------------------

def _fate(keras: Any, model: Any, neutralize: bool = True, through_concat: bool = False) -> Any:
    from kprune_batch.graph import build_graph
    from kprune_batch.silence import channel_fate

    graph = build_graph(keras.saving.serialize_keras_object(model))
    weights = {layer.name: {v.name: np.asarray(v) for v in layer.weights}
               for layer in model.layers}
    return channel_fate(graph, "conv", FILTER, 0.0, neutralize, lambda p: weights[p],
                        through_concat)


def test_a_concatenate_joining_a_tensor_twice_is_not_followed(keras: Any) -> None:
    """Channel f is two channels of concat([x, x]): neutralize_concat does not guess which
    input it came in by, and says so; the BN after it is left alone."""
    L = keras.layers
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(
        L.Concatenate(name="cat")([x, x])))
    fate = _fate(keras, model, through_concat=True)
    assert (fate.silent, fate.followers, fate.edits) == (True, [], [])
    assert fate.notes == ["Concatenate 'cat' is not followed (shared, joining a tensor twice, "
                          "on another axis, or its input widths not in the config): a "
                          "BatchNormalization after it is not neutralised"]


def test_an_operation_between_conv_and_batchnorm_is_not_a_follower(keras: Any) -> None:
    L = keras.layers
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, name="conv")(inputs) * 1.0  # keras.src.ops.numpy.Multiply
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(x))
    fate = _fate(keras, model)
    assert (fate.silent, fate.followers, fate.edits) == (True, [], [])
    assert fate.notes == ["'multiply' is a Keras operation (keras.src.ops.numpy.Multiply), "
                          "which kprune does not follow: BatchNormalization 'bn' after it is not "
                          "a follower"]


@pytest.mark.parametrize("noise", ["GaussianNoise", "GaussianDropout", "AlphaDropout"])
@pytest.mark.parametrize("neutralize", [True, False])
def test_noise_layers_pass_a_channel_to_its_follower(keras: Any, noise: str,
                                                      neutralize: bool) -> None:
    L = keras.layers
    inputs = keras.Input((6, 6, 3))
    x = getattr(L, noise)(0.1, name="noise")(L.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(x))
    _seeded_weights(model, 2)
    fate = _fate(keras, model, neutralize)
    assert fate.followers == ["bn"]  # identity at inference, so the BN is still the follower
    if neutralize:  # gamma = 0: exactly 0 in both modes, whatever the noise did
        assert fate.silent and {(e.variable, e.value) for e in fate.edits} == {
            ("gamma", 0.0), ("beta", 0.0)}
        return
    bn = model.get_layer("bn")
    inference = float(bn.beta[FILTER] - bn.gamma[FILTER] * bn.moving_mean[FILTER]
                      / np.sqrt(float(bn.moving_variance[FILTER]) + bn.epsilon))
    assert not fate.silent and fate.constant == pytest.approx(inference, rel=1e-6)
    if noise != "GaussianDropout":  # additive noise or AlphaDropout's shift move a zero channel
        assert fate.notes == [f"a GaussianNoise or AlphaDropout layer before BatchNormalization "
                              f"'bn' moves the channel in training mode, where only gamma = 0 "
                              f"would silence it"]


def build_concat(keras: Any, folder: Path) -> Path:
    """DenseNet- and NASNet-like: conv 'b' (bias, no activation) concatenated after conv 'a'
    into 'cat1' -> BN 'bn1' -> ReLU -> 3x3 'same' conv 'c', and 'cat1' again after 'c' in
    'cat2' -> BN 'bn2' (a chain of concatenations)."""
    L = keras.layers
    inputs = keras.Input((6, 6, 3), name="x")
    a = L.Conv2D(3, 3, padding="same", activation="relu", name="a")(inputs)
    b = L.Conv2D(4, 3, padding="same", name="b")(inputs)
    cat1 = L.Concatenate(name="cat1")([a, b])
    c = L.Conv2D(2, 3, padding="same", name="c")(L.ReLU(name="r1")(
        L.BatchNormalization(name="bn1")(cat1)))
    bn2 = L.BatchNormalization(name="bn2")(L.Concatenate(name="cat2")([c, cat1]))
    outputs = L.Dense(2, name="out")(L.GlobalAveragePooling2D(name="gap")(bn2))
    model = keras.Model(inputs, outputs, name="cat")
    _seeded_weights(model, 11)  # non-zero beta and moving mean: the BNs keep a zero channel alive
    path = folder / "cat.keras"
    model.save(path)
    return path


@pytest.mark.parametrize("batchnorm, suffix", [
    ("neutralize", ".keras"), ("neutralize_concat", ".keras"), ("neutralize_concat", ".h5")])
def test_neutralize_concat_silences_behind_concatenations(keras: Any, tmp_path: Path,
                                                          batchnorm: str, suffix: str) -> None:
    """batchnorm: neutralize_concat edits each BatchNormalization behind a Concatenate at the
    filter's channel there (offsets from Keras's own tensor shapes); neutralize leaves them.
    A .h5 file's config has no build_config: the widths come from its inbound tensors."""
    path = build_concat(keras, tmp_path)
    model = keras.saving.load_model(path)
    if suffix == ".h5":
        path = path.with_suffix(".h5")
        model.save(path)
    width_a = int(model.get_layer("a").output.shape[-1])
    width_c = int(model.get_layer("c").output.shape[-1])
    filters = [1, 2]
    spec = write_spec(tmp_path, f"""\
        version: 1
        models:
          - path: cat{suffix}
            layers:
              - {{name: b, batchnorm: {batchnorm}, rules: [{{index: {filters}}}]}}
        """)
    kprune("apply", spec, "--probe", "--audit-log", tmp_path / "log.json").expect(0)
    kprune("verify", tmp_path / "log.json").expect(0)
    log = json.loads((tmp_path / "log.json").read_text())
    out = keras.saving.load_model(tmp_path / "pruned" / f"cat{suffix}")
    at = {"bn1": [width_a + f for f in filters], "bn2": [width_c + width_a + f for f in filters]}
    for bn in ("bn1", "bn2"):
        before = {v.name: np.asarray(v) for v in model.get_layer(bn).weights}
        after = {v.name: np.asarray(v) for v in out.get_layer(bn).weights}
        for name in before:
            want = before[name].copy()
            if batchnorm == "neutralize_concat" and name in ("gamma", "beta"):
                want[at[bn]] = 0.0
            np.testing.assert_array_equal(after[name], want, err_msg=f"{bn}.{name}")
    x = np.random.default_rng(2).normal(size=(4, 6, 6, 3)).astype("float32")
    for bn in ("bn1", "bn2"):
        probe = keras.Model(out.inputs, out.get_layer(bn).output)
        for training in (False, True):
            held = np.abs(np.asarray(probe(x, training=training))[..., at[bn]]).max()
            assert bool(held == 0.0) is (batchnorm == "neutralize_concat"), (bn, training, held)
    records = sorted(log["zeroed"], key=lambda r: r["filter"])
    assert [r["filter"] for r in records] == filters
    for r, f in zip(records, filters):
        assert r["silent"] is True  # b's own output is 0 (bias zeroed, linear)
        edits = sorted((e["layer"], e["variable"], e.get("channel")) for e in r["batchnorm"])
        assert edits == ([] if batchnorm == "neutralize" else [
            ("bn1", "beta", width_a + f), ("bn1", "gamma", width_a + f),
            ("bn2", "beta", width_c + width_a + f), ("bn2", "gamma", width_c + width_a + f)])
        assert r["probe"]["max_abs"] == 0.0


def test_neutralize_concat_channels_first_and_one_conv_twice(keras: Any, tmp_path: Path) -> None:
    """Red-team regression: a channels_first Concatenate(axis=1) -> BN(axis=1) is followed at
    offset + filter, and a conv reaching one concat by two paths (ReLU and a linear Activation)
    gets both of its channels there neutralised, for several filters of the layer (the fate
    cache's shift)."""
    L = keras.layers
    inputs = keras.Input((3, 6, 6), name="x")
    a = L.Conv2D(4, 3, padding="same", name="a", data_format="channels_first")(inputs)
    b = L.Conv2D(5, 3, padding="same", name="b", data_format="channels_first")(inputs)
    cat = L.Concatenate(axis=1, name="cat")(
        [b, L.ReLU(name="r")(a), L.Activation("linear", name="lin")(a)])
    bn = L.BatchNormalization(axis=1, name="bn")(cat)
    model = keras.Model(inputs, L.Flatten(name="flat")(bn), name="cf")
    _seeded_weights(model, 5)
    model.save(tmp_path / "cf.keras")
    filters = [0, 2, 3]
    spec = write_spec(tmp_path, f"""\
        version: 1
        models:
          - path: cf.keras
            layers:
              - {{name: a, batchnorm: neutralize_concat, max_fraction: 0.9,
                  rules: [{{index: {filters}}}]}}
        """)
    kprune("apply", spec, "--probe", "--audit-log", tmp_path / "log.json").expect(0)
    kprune("verify", tmp_path / "log.json").expect(0)
    out = keras.saving.load_model(tmp_path / "pruned" / "cf.keras")
    # b's 5 channels, then a's 4 through ReLU, then a's 4 again
    at = sorted([5 + f for f in filters] + [9 + f for f in filters])
    for name, before, after in zip(("gamma", "beta", "moving_mean", "moving_variance"),
                                   model.get_layer("bn").get_weights(),
                                   out.get_layer("bn").get_weights()):
        expected = before.copy()
        if name in ("gamma", "beta"):
            expected[at] = 0.0
        np.testing.assert_array_equal(after, expected, err_msg=name)
    log = json.loads((tmp_path / "log.json").read_text())
    assert all(r["silent"] for r in log["zeroed"])
