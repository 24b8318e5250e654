"""Impact, guards and data statistics (issue 15), checked against numbers the tests work out
themselves: both model files loaded with Keras and run on the samples, metrics and apoz /
activation_mean in numpy (a sub-model up to the measured tensor), never kprune's own log.

One `kprune apply` over five models and one `kprune plan` (two TensorFlow starts in all).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import kprune, write_spec

N = 200
HINT = "select fewer filters, or loosen the model's impact guards"


def _metrics(a: np.ndarray, b: np.ndarray, y: np.ndarray | None) -> dict[str, Any]:
    """The contract's impact metrics of one output, in numpy."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a - b)
    out = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "relative_diff": float(diff.max() / np.abs(a).max()),
           "agreement": None, "accuracy_before": None, "accuracy_after": None}
    if a.shape[-1] > 1:
        out["agreement"] = float(np.mean(a.argmax(-1) == b.argmax(-1)))
        if y is not None:
            out["accuracy_before"] = float(np.mean(a.argmax(-1) == y))
            out["accuracy_after"] = float(np.mean(b.argmax(-1) == y))
    return out


def _close(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(want) <= set(got)
    for key, value in want.items():
        if value is None or key.startswith(("agreement", "accuracy")):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def _channel_stats(keras: Any, model_path: Path, layer: str, x: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """apoz and mean |value| per channel of `layer`'s output (channels last), on x."""
    model = keras.saving.load_model(str(model_path), compile=False)
    sub = keras.Model(model.inputs, model.get_layer(layer).output)
    v = np.asarray(sub.predict(x, verbose=0, batch_size=N), dtype=np.float64)
    flat = v.reshape(-1, v.shape[-1])
    return np.mean(flat == 0, axis=0), np.mean(np.abs(flat), axis=0)


@pytest.fixture(scope="module")
def two_heads(keras: Any, models_dir: Path) -> Path:
    """A CNN with two outputs: 4 class scores and a single regression value."""
    from conftest import _seeded_weights

    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(6, 3, activation="relu", name="c1")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    classes = keras.layers.Dense(4, name="classes")(x)
    score = keras.layers.Dense(1, name="score")(x)
    model = keras.Model(inputs, [classes, score], name="two_heads")
    _seeded_weights(model, 5)
    path = models_dir / "two_heads.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def varied(keras: Any, models_dir: Path) -> Path:
    """A classifier whose answers vary with the input (small_cnn's biases decide its argmax
    alone on random inputs, so agreement would always be 1)."""
    from conftest import _seeded_weights

    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    logits = keras.layers.Dense(5, use_bias=False, name="logits")(x)
    model = keras.Model(inputs, logits, name="varied")
    _seeded_weights(model, 7)
    path = models_dir / "varied.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def run(keras: Any, small_cnn: Path, two_heads: Path, varied: Path,
        tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("impact")
    shutil.copy(small_cnn, folder / "m.keras")
    shutil.copy(two_heads, folder / "two.keras")
    shutil.copy(varied, folder / "v.keras")
    x = np.random.default_rng(11).normal(size=(N, 8, 8, 3)).astype("float32")
    # labels: the input model's own answers, so accuracy before is 1 and after is the agreement
    y = keras.saving.load_model(str(varied)).predict(x, verbose=0).argmax(-1)
    assert len(set(y.tolist())) >= 3
    np.savez(folder / "s.npz", x=x, y=y)
    np.save(folder / "s.npy", x)
    apoz, _ = _channel_stats(keras, folder / "m.keras", "act", x)
    _, act_mean = _channel_stats(keras, folder / "m.keras", "conv2d", x)
    top = np.sort(apoz)[::-1]
    cut = float((top[2] + top[3]) / 2)  # between the 3rd and 4th largest apoz: selects 3
    data_layers = (f"      - {{name: conv2d_1, rules: [{{apoz: {{above: {cut!r}}}}}]}}\n"
                   "      - {name: conv2d, rules: [{smallest: {by: activation_mean, count: 2}}]}\n")
    spec = write_spec(folder, f"""
        version: 1
        defaults:
          impact: {{min_agreement: 0.99, max_relative_diff: 100}}
        models:
          - name: zero
            path: v.keras
            output: zero.keras
            samples: s.npz
            impact: {{min_agreement: null}}
            layers:
              - {{name: c1, rules: [{{index: [0, 1, 2]}}]}}
          - name: remove
            path: v.keras
            output: remove.keras
            samples: s.npz
            impact: {{min_agreement: 0}}
            layers:
              - {{name: c2, action: remove, rules: [{{index: [0, 1]}}]}}
          - name: guards
            path: v.keras
            output: guards.keras
            samples: s.npz
            impact: {{max_relative_diff: 0, min_agreement: 1, max_accuracy_drop: 0}}
            layers:
              - {{name: c1, rules: [{{index: [0, 1, 2]}}]}}
          - name: two
            path: two.keras
            samples: s.npy
            impact: {{min_agreement: null}}
            layers:
              - {{name: c1, rules: [{{index: [0, 1]}}]}}
          - name: data
            path: m.keras
            output: data.keras
            samples: s.npy
            impact: {{min_agreement: null}}
            layers:
        """)
    spec.write_text(spec.read_text() + data_layers)
    result = kprune("apply", spec, "--audit-log", folder / "log.json")
    log = json.loads((folder / "log.json").read_text())
    return {"folder": folder, "x": x, "y": y, "result": result, "log": log, "spec": spec,
            "apoz": apoz, "act_mean": act_mean, "cut": cut,
            "models": {m["name"]: m for m in log["models"]}}


def _predict(keras: Any, path: Path, x: np.ndarray) -> list[np.ndarray]:
    out = keras.saving.load_model(str(path), compile=False).predict(x, verbose=0, batch_size=N)
    return [np.asarray(o) for o in (out if isinstance(out, list) else [out])]


@pytest.mark.parametrize("name", ["zero", "remove"])
def test_impact_against_the_input_model_computed_from_both_files(
        run: dict[str, Any], keras: Any, name: str) -> None:
    f = run["folder"]
    model = run["models"][name]
    assert model["status"] == "ok", model["error"]
    (before,) = _predict(keras, f / "v.keras", run["x"])
    (after,) = _predict(keras, f / "pruned" / f"{name}.keras", run["x"])
    want = _metrics(before, after, run["y"])
    assert want["accuracy_before"] == 1.0 and want["max_abs_diff"] > 0  # the edit shows
    impact = model["impact"]
    _close(impact, want)
    assert "outputs" not in impact
    assert impact["samples"]["count"] == N
    guards = {"zero": {"max_relative_diff": 100.0, "min_agreement": None,
                       "max_accuracy_drop": None},
              "remove": {"max_relative_diff": 100.0, "min_agreement": 0.0,
                         "max_accuracy_drop": None}}[name]
    assert impact["guards"] == guards  # a model's keys over defaults.impact, key by key
    if name == "remove":
        assert model["removal"]["params_after"] < model["removal"]["params_before"]


def test_a_broken_guard_fails_the_model_with_measured_and_allowed_values(
        run: dict[str, Any], keras: Any) -> None:
    f = run["folder"]
    model = run["models"]["guards"]
    # the same edit as model 'zero', which was written: its outputs are what 'guards' measured
    (before,) = _predict(keras, f / "v.keras", run["x"])
    (after,) = _predict(keras, f / "pruned" / "zero.keras", run["x"])
    m = _metrics(before, after, run["y"])
    assert m["agreement"] < 1
    message = (f"model 'guards': impact on {N} samples breaks its guards: relative_diff "
               f"{m['relative_diff']:.6g} > max_relative_diff 0; agreement {m['agreement']:.6g} "
               f"< min_agreement 1; accuracy drop {1 - m['accuracy_after']:.6g} (1 -> "
               f"{m['accuracy_after']:.6g}) > max_accuracy_drop 0; nothing was written; {HINT}")
    assert (model["status"], model["error"], model["output"]) == ("failed", message, None)
    assert f"error: {message}" in run["result"].stderr.splitlines()
    assert not (f / "pruned" / "guards.keras").exists()
    assert [p.name for p in (f / "pruned").iterdir() if "guards" in p.name] == []  # no temp left
    _close(model["impact"], m)  # what it measured stays in the log for the reviewer
    assert not [r for r in run["log"]["zeroed"] if r["model"] == "guards"]
    assert run["result"].code == 1


def test_several_outputs_per_output_and_the_worst(run: dict[str, Any], keras: Any) -> None:
    f = run["folder"]
    model = run["models"]["two"]
    assert model["status"] == "ok", model["error"]
    before = _predict(keras, f / "two.keras", run["x"])
    after = _predict(keras, f / "pruned" / "two.keras", run["x"])
    per = [_metrics(a, b, None) for a, b in zip(before, after, strict=True)]
    impact = model["impact"]
    assert [o["name"] for o in impact["outputs"]] == ["classes", "score"]
    for got, want in zip(impact["outputs"], per, strict=True):
        _close(got, want)
    assert impact["outputs"][1]["agreement"] is None  # a last axis of size 1 has no argmax
    _close(impact, {"max_abs_diff": max(p["max_abs_diff"] for p in per),
                    "mean_abs_diff": max(p["mean_abs_diff"] for p in per),
                    "relative_diff": max(p["relative_diff"] for p in per),
                    "agreement": per[0]["agreement"], "accuracy_before": None,
                    "accuracy_after": None})


def test_apoz_and_activation_mean_select_as_numpy_says(run: dict[str, Any]) -> None:
    model = run["models"]["data"]
    assert model["status"] == "ok", model["error"]
    layers = {layer["layer"]: layer for layer in model["layers"]}
    apoz, act_mean = run["apoz"], run["act_mean"]
    want_apoz = sorted(int(i) for i in np.flatnonzero(apoz > run["cut"]))
    want_act = sorted(int(i) for i in np.lexsort((np.arange(len(act_mean)), act_mean))[:2])
    assert len(want_apoz) == 3
    assert layers["conv2d_1"]["selected"] == want_apoz
    assert layers["conv2d"]["selected"] == want_act
    # measured where silence is judged: after conv2d_1's BatchNormalization and its ReLU layer
    assert layers["conv2d_1"]["data_statistics"]["at"] == "act"
    assert layers["conv2d"]["data_statistics"]["at"] == "conv2d"
    assert layers["conv2d_1"]["data_statistics"]["apoz"] == pytest.approx(apoz.tolist(), abs=0)
    assert layers["conv2d"]["data_statistics"]["activation_mean"] == pytest.approx(
        act_mean.tolist(), rel=1e-6)
    records = {(r["layer"], r["filter"]): r for r in run["log"]["zeroed"] if r["model"] == "data"}
    for f in want_apoz:
        assert records[("conv2d_1", f)]["stats"]["apoz"] == float(apoz[f])
    picks = [(p["position"], f) for (layer, f), r in records.items() if layer == "conv2d"
             for p in r["ranking"]]
    assert sorted(picks) == [(1, want_act[0]), (2, want_act[1])] or \
        sorted(picks) == [(1, want_act[1]), (2, want_act[0])]
    assert records[("conv2d", want_act[0])]["stats"]["activation_mean"] == pytest.approx(
        float(act_mean[want_act[0]]), rel=1e-6)


def test_plan_shows_the_data_statistics_and_writes_nothing(run: dict[str, Any]) -> None:
    f = run["folder"]
    spec = f / "plan.yaml"
    text = run["spec"].read_text()
    spec.write_text(text[:text.index("  - name: zero")] + text[text.index("  - name: data"):]
                    .replace("output: data.keras", "output: planned.keras"))
    out = kprune("plan", spec).expect(0).stdout.splitlines()
    assert not (f / "pruned" / "planned.keras").exists()
    apoz = [float(v) for v in run["apoz"]]
    chosen = sorted(int(i) for i in np.flatnonzero(run["apoz"] > run["cut"]))
    at = out.index(f"    data statistics on {N} samples at 'act':")
    assert out[at + 1] == (f"      apoz: min {min(apoz):.4g}, mean {sum(apoz) / len(apoz):.4g}, "
                           f"max {max(apoz):.4g}; selected "
                           + ", ".join(f"{i}: {apoz[i]:.4g}" for i in chosen))
    assert out[at + 2].startswith("      activation_mean: min ")
    # every listed layer is measured in a plan, the ranked one too
    assert f"    data statistics on {N} samples at 'conv2d':" in out


def test_guards_and_data_statistics_without_samples_are_spec_errors(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """
        version: 1
        defaults:
          impact: {min_agreement: 0.9}
        models:
          - path: a.keras
            impact: {min_agreement: null}
            layers:
              - {name: c, rules: [{index: [0]}]}
          - path: b.keras
            layers:
              - {name: c, rules: [{apoz: {above: 0.5}}, {largest: {by: activation_mean, count: 1}}]}
          - path: c.keras
            impact: {max_accuracy_drop: 0.01}
            layers:
              - {name: c, rules: [{index: [0]}]}
          - path: d.keras
            samples: d.npz
            impact: {max_relative_diff: .nan}
            layers:
              - {name: c, rules: [{index: [0]}]}
        """)
    other = write_spec(tmp_path, """
        version: 1
        models:
          - path: e.keras
            samples: e.csv
            impact: {min_agreement: 2}
            layers:
              - {name: c, rules: [{index: [0]}]}
        """, name="other.yaml")
    out = kprune("validate", spec, other).expect(2)
    need = "need the model's samples, but it has none: give 'samples' (a .npy or .npz file), or " \
           "set the guard to null for this model"
    data = "is measured on the model's samples, but it has none: give 'samples' (a .npy or .npz " \
           "file) or rank by a kernel statistic"
    rules = spec.read_text().splitlines()[10]
    apoz_col, ranking_col = rules.index("{above") + 1, rules.index("{by") + 1
    assert out.stderr.splitlines() == [
        f"{spec}:9:5: models[1]: impact guard(s) min_agreement (from defaults.impact) {need}",
        f"{spec}:11:{apoz_col}: models[1].layers[0].rules[0].apoz: apoz {data}",
        f"{spec}:11:{ranking_col}: models[1].layers[0].rules[1].largest: activation_mean {data}",
        f"{spec}:13:13: models[2].impact: impact guard(s) min_agreement, max_accuracy_drop {need}",
        f"{spec}:18:33: models[3].impact.max_relative_diff: max_relative_diff must be a finite "
        f"number, got nan",
        f"{other}:4:14: models[0].samples: 'e.csv' must be a .npy or .npz samples file path",
        f"{other}:5:29: models[0].impact.min_agreement: 2 is greater than the maximum of 1",
    ]


def test_report_shows_the_impact_in_text_and_markdown(run: dict[str, Any]) -> None:
    log_path = run["folder"] / "log.json"
    models = run["models"]

    def pct(share: float) -> str:
        return f"{100.0 * share:.1f}%"

    def line(r: dict[str, Any]) -> str:
        head = (f"accuracy {pct(r['accuracy_before'])} -> {pct(r['accuracy_after'])}, "
                if r["accuracy_before"] is not None else "")
        agreement = f"agreement {pct(r['agreement'])}, " if r["agreement"] is not None else ""
        return (f"{N} samples: {head}{agreement}max |diff| {r['max_abs_diff']:.3g} (relative "
                f"{r['relative_diff']:.3g}), mean |diff| {r['mean_abs_diff']:.3g}")

    text = kprune("report", log_path).expect(0).stdout.splitlines()
    guards = models["guards"]["impact"]
    # 'zero' made the same edit and measured the same: look in the block of model 'guards'
    block = next(i for i, t in enumerate(text) if t.startswith("model guards: failed"))
    at = text.index(f"  impact on {line(guards)}", block)
    assert text[at - 1] == f"  error: {models['guards']['error']}"
    assert text[at + 1:at + 3] == [
        f"    samples: {run['folder'] / 's.npz'} "
        f"(sha256 {guards['samples']['sha256'][:12]})",
        "    guards: max_relative_diff 0, min_agreement 1, max_accuracy_drop 0"]
    two = models["two"]["impact"]
    at = text.index(f"  impact on {line(two)}")
    assert text[at + 3:at + 5] == [f"    output {o['name']}: {line(o)}" for o in two["outputs"]]
    md = kprune("report", log_path, "--format", "markdown").expect(0).stdout.splitlines()
    head = md.index("| model | samples | max abs diff | mean abs diff | relative diff | "
                    "agreement | accuracy before | accuracy after | guards |")
    rows = md[head + 2:head + 2 + 7]
    r = guards
    assert rows[2] == (f"| guards | {N} | {r['max_abs_diff']:.3g} | {r['mean_abs_diff']:.3g} | "
                       f"{r['relative_diff']:.3g} | {pct(r['agreement'])} | 100.0% | "
                       f"{pct(r['accuracy_after'])} | max_relative_diff 0, min_agreement 1, "
                       f"max_accuracy_drop 0 |")
    assert [row.split(" | ")[0] for row in rows] == ["| zero", "| remove", "| guards", "| two",
                                                     "| two / classes", "| two / score",
                                                     "| data"]
    assert rows[5].split(" | ")[5] == "—"  # no agreement for a size-1 output


EXAMPLES = Path(__file__).resolve().parent.parent / "specs" / "examples"


def test_the_bundled_example_measures_its_held_out_digits(tmp_path: Path, keras: Any) -> None:
    import sys

    sys.path.insert(0, str(EXAMPLES))
    try:
        from make_samples import main as make_samples
    finally:
        sys.path.remove(str(EXAMPLES))
    make_samples(str(tmp_path / "again.npz"))  # the committed file is the split it writes
    with np.load(EXAMPLES / "digits_samples.npz") as committed, \
            np.load(tmp_path / "again.npz") as again:
        assert sorted(committed.files) == ["x", "y"]
        x, y = committed["x"], committed["y"]
        assert np.array_equal(x, again["x"]) and np.array_equal(y, again["y"])
    assert x.shape == (360, 8, 8, 1) and x.dtype == np.float32
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("pruned", "__pycache__"))
    out = kprune("apply", folder / "digits.yaml", "--audit-log", tmp_path / "log.json").expect(0)
    (before,) = _predict(keras, folder / "digits.keras", x)
    (after,) = _predict(keras, folder / "pruned" / "digits.keras", x)
    m = _metrics(before, after, y)
    assert m["accuracy_before"] > 0.9  # trained on the other 80 %: accuracy means something
    assert m["accuracy_before"] - m["accuracy_after"] <= 0.02 and m["agreement"] >= 0.9
    pct = "{:.1%}".format
    assert out.stdout.splitlines()[1] == (
        f"        impact on 360 samples: accuracy {pct(m['accuracy_before'])} -> "
        f"{pct(m['accuracy_after'])}, agreement {pct(m['agreement'])}, max |diff| "
        f"{m['max_abs_diff']:.3g} (relative {m['relative_diff']:.3g}), mean |diff| "
        f"{m['mean_abs_diff']:.3g}")
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["models"][0]["impact"]["guards"] == {
        "max_relative_diff": None, "min_agreement": 0.9, "max_accuracy_drop": 0.02}
    # the dead filter the apoz rule finds: zero on (nearly) every position of every sample
    records = {(r["layer"], r["filter"]): r for r in log["zeroed"]}
    assert records[("conv3", 20)]["rules"] == ["models[0].layers[1].rules[0]",
                                               "models[0].layers[2].rules[0]"]
    assert records[("conv3", 20)]["stats"]["apoz"] > 0.99


@pytest.mark.parametrize("route, at", [
    ("pool_then_bn", "act"),  # conv -> Dropout -> MaxPooling -> BN -> relu: at the BN's relu
    ("dropout_then_relu", "act"),  # conv -> Dropout -> relu -> conv: Dropout is the identity
    ("pool_then_relu", "conv"),  # conv -> MaxPooling -> relu -> conv: no BN behind the pool
])
def test_data_statistics_are_measured_where_silence_is_judged(keras: Any, tmp_path: Path,
                                                               route: str, at: str) -> None:
    """The BN behind dropout and pooling is the follower `neutralize` edits and `bn_gamma`
    reads (silence passes those layers), so apoz / activation_mean are measured at its output;
    a Dropout is the identity in inference mode, so an activation layer behind it counts; a
    pooling layer with no BN behind it ends the route (the conv's own output is measured)."""
    from conftest import _seeded_weights

    L = keras.layers
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(6, 1, name="conv")(inputs)
    if route == "pool_then_bn":
        x = L.MaxPooling2D(name="pool")(L.Dropout(0.2, name="drop")(x))
        x = L.Activation("relu", name="act")(L.BatchNormalization(name="bn")(x))
    elif route == "dropout_then_relu":
        x = L.Conv2D(4, 1, name="next")(L.ReLU(name="act")(L.Dropout(0.2, name="drop")(x)))
    else:
        x = L.Conv2D(4, 1, name="next")(L.ReLU(name="act")(L.MaxPooling2D(name="pool")(x)))
    model = keras.Model(inputs, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    _seeded_weights(model, 3)
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(2).normal(size=(32, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    apoz, act_mean = _channel_stats(keras, tmp_path / "m.keras", at, x)
    want = sorted(int(f) for f in np.argsort(act_mean, kind="stable")[:2])
    if at != "conv":  # the point matters: the conv's own output ranks differently
        _, at_conv = _channel_stats(keras, tmp_path / "m.keras", "conv", x)
        assert want != sorted(int(f) for f in np.argsort(at_conv, kind="stable")[:2])
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: m.keras\n    samples: x.npy\n"
                      "    layers: [{name: conv, rules: [{smallest: {by: activation_mean, "
                      "count: 2}}]}]\n")
    plan = json.loads(kprune("plan", spec, "--format", "json").expect(0).stdout)
    layer = plan["models"][0]["layers"][0]
    assert layer["data_statistics"]["at"] == at
    assert layer["data_statistics"]["activation_mean"] == pytest.approx(act_mean.tolist(),
                                                                         rel=1e-6)
    assert layer["data_statistics"]["apoz"] == pytest.approx(apoz.tolist(), abs=1e-12)
    assert layer["selected"] == want
