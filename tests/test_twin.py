"""The channels_last twin: the same function as the channels_first model, or refused, and used by the CLI where a CPU cannot run NCHW."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import _seeded_weights, kprune, write_spec


def _direct(keras: Any, model: Any, x: np.ndarray) -> np.ndarray | None:
    """The model run as it is, or None where this CPU refuses NCHW convolutions."""
    from kprune_batch.twin import cpu_refuses_nchw

    if cpu_refuses_nchw(keras):
        return None
    return np.asarray(model(x, training=False))


def cf_model(keras: Any, head: str) -> Any:
    L = keras.layers
    cf = "channels_first"
    i = keras.Input((3, 7, 9))
    x = L.Conv2D(6, 3, data_format=cf, name="c1")(i)
    x = L.ReLU()(L.BatchNormalization(axis=1, name="bn")(x))
    x = L.Dropout(0.2)(L.MaxPooling2D(1, data_format=cf)(x))
    y = L.Conv2D(2, 1, data_format=cf, name="side")(x)
    x = L.Concatenate(axis=1)([L.Conv2D(4, 3, data_format=cf, padding="same", name="c2")(x), y])
    x = L.Add()([x, L.ZeroPadding2D(0, data_format=cf)(x)])
    if head == "gap":
        x = L.GlobalAveragePooling2D(data_format=cf)(x)
    else:
        x = L.Flatten(data_format=None if head == "flatten" else head)(x)
    model = keras.Model(i, L.Dense(3, name="d")(x))
    _seeded_weights(model, 3)
    return model


@pytest.mark.parametrize("head", ["gap", "flatten", "channels_last", "channels_first"])
def test_twin_computes_the_same_function(keras: Any, head: str) -> None:
    from kprune_batch.twin import channels_last_twin

    model = cf_model(keras, head)
    twin = channels_last_twin(keras, model)
    x = np.random.default_rng(2).normal(size=(2, 3, 7, 9)).astype("float32")
    got = np.asarray(twin.model(twin.to_twin([x])[0], training=False))
    # every layer runs channels_last; the weights are the model's arrays, unchanged
    assert all(getattr(layer, "data_format", "channels_last") == "channels_last"
               for layer in twin.model.layers)
    for layer in model.layers:
        for a, b in zip(layer.get_weights(), twin.model.get_layer(layer.name).get_weights(),
                        strict=True):
            assert np.array_equal(a, b)
    want = _direct(keras, model, x)
    if want is None:
        pytest.skip("this CPU cannot run the channels_first model to compare with")
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6), np.abs(got - want).max()


def test_sequential_twin(keras: Any) -> None:
    from kprune_batch.twin import channels_last_twin

    L = keras.layers
    model = keras.Sequential([keras.Input((3, 8, 8)), L.Conv2D(4, 3, data_format="channels_first"),
                              L.BatchNormalization(axis=1), L.Flatten(), L.Dense(2)])
    _seeded_weights(model, 4)
    twin = channels_last_twin(keras, model)
    x = np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype("float32")
    got = np.asarray(twin.model(twin.to_twin([x])[0]))
    want = _direct(keras, model, x)
    if want is None:
        pytest.skip("this CPU cannot run the channels_first model to compare with")
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_twin_refuses_what_is_not_provably_the_same(keras: Any) -> None:
    from kprune_batch.twin import NotProvable, channels_last_twin

    L = keras.layers
    i = keras.Input((3, 6, 6))
    x = L.Conv2D(4, 3, data_format="channels_first", name="c")(i)
    reshaped = keras.Model(i, L.Reshape((4, 16), name="r")(x))
    with pytest.raises(NotProvable, match="^'r' \\(Reshape\\) reads a channels_first tensor and "
                                          "kprune does not know that it is the same on a "
                                          "channels_last one$"):
        channels_last_twin(keras, reshaped)
    dense = keras.Model(i, L.Dense(2, name="dense")(x))  # acts on the width axis here
    with pytest.raises(NotProvable, match="^'dense' \\(Dense\\) reads a channels_first tensor"):
        channels_last_twin(keras, dense)
    mixed = keras.Model(i, L.Conv2D(2, 1, name="cl")(x))  # channels_last conv on NCHW data
    with pytest.raises(NotProvable, match="^'cl' is channels_last but reads a channels_first "
                                          "tensor$"):
        channels_last_twin(keras, mixed)


@pytest.fixture(scope="module")
def cf_file(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    L = keras.layers
    folder = tmp_path_factory.mktemp("twin")
    i = keras.Input((3, 7, 9), name="x")
    x = L.Conv2D(6, 3, data_format="channels_first", name="c1")(i)
    x = L.ReLU()(L.BatchNormalization(axis=1, name="bn")(x))
    x = L.Conv2D(4, 3, data_format="channels_first", name="c2")(x)
    model = keras.Model(i, L.Dense(3, name="d")(L.Flatten()(x)))
    _seeded_weights(model, 6)
    model.save(folder / "cf.keras")
    return folder / "cf.keras"


def test_cli_proves_on_the_twin_where_nchw_is_refused(keras: Any, cf_file: Path,
                                                      tmp_path: Path) -> None:
    """KPRUNE_CHANNELS_LAST_TWIN=1 makes this CPU behave as one that refuses NCHW: the probe of a
    zeroing and the proof of a removal run on the twin, say so, and find what the model run
    as it is finds (where it runs)."""
    spec = write_spec(tmp_path, f"""\
        version: 1
        models:
          - {{name: zero, path: {cf_file}, output: zero.keras,
              layers: [{{name: c1, rules: [{{index: [1, 4]}}]}}]}}
          - {{name: remove, path: {cf_file}, output: remove.keras,
              layers: [{{name: c1, action: remove, rules: [{{index: [1, 4]}}]}}]}}
        """)
    logs = {}
    for mode, env in (("twin", {"KPRUNE_CHANNELS_LAST_TWIN": "1"}), ("as-is", {})):
        log_path = tmp_path / f"{mode}.json"
        kprune("apply", spec, "--probe", "--audit-log", log_path, "--output-dir",
               tmp_path / mode, env=env).expect(0)
        logs[mode] = json.loads(log_path.read_text())
        kprune("verify", log_path, env=env).expect(0)
    twin, as_is = logs["twin"], logs["as-is"]
    zero_t, remove_t = twin["models"]
    assert zero_t["probe"]["ran_on"] == "channels_last twin"
    assert remove_t["removal"]["probe_ran_on"] == "channels_last twin"
    assert remove_t["removal"]["probe_tolerance"] == {"atol": 1e-5, "rtol": 1e-5}
    from kprune_batch.twin import cpu_refuses_nchw

    if cpu_refuses_nchw(keras):
        return  # both runs were on the twin
    zero_a, remove_a = as_is["models"]
    assert "ran_on" not in zero_a["probe"] and remove_a["removal"]["probe_ran_on"] == "model"
    assert [r["probe"] for r in twin["zeroed"]] == [r["probe"] for r in as_is["zeroed"]]
    assert (tmp_path / "twin" / "zero.keras").read_bytes() == \
        (tmp_path / "as-is" / "zero.keras").read_bytes()
    assert abs(remove_t["removal"]["probe_deviation"] - remove_a["removal"]["probe_deviation"]) \
        <= 1e-5


def test_where_no_twin_is_provable_the_model_runs_as_it_is(keras: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from kprune_batch.twin import FORCE_ENV, runnable

    L = keras.layers
    inner_in = keras.Input((3, 6, 6))
    inner = keras.Model(inner_in, L.Conv2D(2, 1, data_format="channels_first")(inner_in),
                        name="inner")
    i = keras.Input((3, 6, 6))
    model = keras.Model(i, inner(i))
    monkeypatch.setenv(FORCE_ENV, "1")
    run, twin, why = runnable(keras, model)
    assert (run, twin, why) == (model, None, "nested model 'inner' has channels_first layers")
    plain = keras.Model(i, L.Conv2D(2, 1, name="cl")(i))  # nothing channels_first: itself
    assert runnable(keras, plain) == (plain, None, None)


@pytest.mark.parametrize("axis, indices", [(1, [0, 2, 5]), (2, [4, 0]), (3, [6]), (-1, [1, 6])])
def test_run_points_take_gathers_on_the_models_own_axes(keras: Any, monkeypatch: pytest.MonkeyPatch,
                                                        axis: int, indices: list[int]) -> None:
    """`take` on a channels_first model run as its twin (forced) names the model's own axes: the
    values equal the whole tensor's entries at those indices, for the channel axis (last in the
    twin) and the spatial ones (one to the left there); a channels_last model's likewise."""
    from kprune_batch.twin import FORCE_ENV, run_points

    monkeypatch.setenv(FORCE_ENV, "1")
    model = cf_model(keras, "gap")  # c2's input: (N, 6, 5, 7)
    x = np.random.default_rng(4).normal(size=(2, 3, 7, 9)).astype("float32")
    (whole,), ran_on = run_points(keras, model, x, [("c2", "input")])
    assert ran_on == "channels_last twin" and whole.shape == (2, 6, 5, 7)
    (part, out), _ = run_points(keras, model, x, [("c2", "input"), ("", "model")],
                                take=[(axis, indices), None])
    assert np.array_equal(part, np.take(whole, indices, axis=axis))
    assert np.array_equal(out, run_points(keras, model, x, [("", "model")])[0][0])

    L = keras.layers
    i = keras.Input((8, 7, 3))
    h = L.ReLU(name="r")(L.Conv2D(7, 3, name="a")(i))
    plain = keras.Model(i, L.Conv2D(2, 1, name="b")(h))  # b's input: (N, 6, 5, 7) as well
    _seeded_weights(plain, 5)
    xl = np.random.default_rng(5).normal(size=(2, 8, 7, 3)).astype("float32")
    want = np.asarray(keras.Model(i, h)(xl, training=False))
    (got,), ran_on = run_points(keras, plain, xl, [("b", "input")], take=[(axis, indices)])
    assert ran_on == "model" and np.array_equal(got, np.take(want, indices, axis=axis))
