"""keras.applications models nobody here wrote (operation nodes, nested Sequentials, depthwise
and squeeze-excitation groups): zeroed, probed and verified; removed exactly."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from conftest import expected_removal_params, kprune, write_spec, zeroed_reference

ZOO = {
    # `x + 3.0` / `x * (1/6)` of hard_sigmoid are keras.src.ops.numpy nodes; SE blocks
    "mnv3": lambda keras: keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), minimalistic=False, include_preprocessing=True,
        classifier_activation=None),
    # a nested Sequential stem starting with keras.Input, Sequentials fed by ops.numpy.Add,
    # grouped (depthwise) Conv2D, LayerScale, LayerNormalization
    "cnx": lambda keras: keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3)),
}


# removal: depthwise layers join their producers' groups, SE gates the feature map's, residual
# Adds couple stages, a Concatenate lays its inputs' channels end to end (logits, no softmax: a
# near-uniform softmax of an untrained model would hide a difference). Each family at its
# smallest legal input side (keras/src/applications/*.py: min_size 75 for InceptionV3, 71 for
# Xception, 32 elsewhere); VGG16 without its 4096-wide Dense layers, which would dominate the run.
BUILDS = {"mn": ("MobileNet", 32, {}), "mnv2": ("MobileNetV2", 32, {}),
          "effb0": ("EfficientNetB0", 32, {}), "effv2b0": ("EfficientNetV2B0", 32, {}),
          "vgg": ("VGG16", 32, {"include_top": False, "pooling": "avg"}),
          "rn50": ("ResNet50", 32, {}), "rn50v2": ("ResNet50V2", 32, {}),
          "dn121": ("DenseNet121", 32, {}), "incv3": ("InceptionV3", 75, {}),
          "xcp": ("Xception", 71, {})}
REMOVABLE = {
    name: (lambda build, side, extra: lambda keras: getattr(keras.applications, build)(
        weights=None, input_shape=(side, side, 3), classifier_activation=None, **extra))(*b)
    for name, b in BUILDS.items()}
SIDE = {name: side for name, (_, side, _) in BUILDS.items()}  # the rest: 32
# a Concatenate inside Add-coupled groups (each input's channels at its offset); removable
# exactly with batchnorm: neutralize_concat, else only with approximate: true
APPROXIMATE = {"nas": lambda keras: keras.applications.NASNetMobile(
    weights=None, input_shape=(32, 32, 3), classifier_activation=None)}
# every conv but those whose channels are the model's output (the classifier; VGG16's last conv)
REMOVE_MATCH = {"mn": ["conv1", "conv_[dp]w_*"], "mnv3": ["*onv*"], "vgg": [
    "block[1-4]_conv*", "block5_conv[12]"]} | {name: ["*"] for name in (
        "mnv2", "effb0", "effv2b0", "rn50", "rn50v2", "dn121", "incv3", "xcp")}
# (a layer, a layer its group must hold): depthwise layers and SE gates come with their
# producers, a stage's residual Adds couple its shortcut and last convs (ResNet50V2's last block
# of a stage through its MaxPooling shortcut, Xception's middle flow between SeparableConv2Ds);
# None: concatenations and plain chains couple nothing, every group a single layer
GROUPED = {"mn": ("conv_pw_1", "conv_dw_2"), "mnv2": ("block_1_expand", "block_1_depthwise"),
           "mnv3": ("expanded_conv_1_expand", "expanded_conv_1_depthwise"),
           "effb0": ("block2a_expand_conv", "block2a_se_expand"),
           "effv2b0": ("block4a_expand_conv", "block4a_se_expand"),
           "rn50": ("conv3_block1_0_conv", "conv3_block4_3_conv"),
           "rn50v2": ("conv3_block1_0_conv", "conv3_block4_3_conv"),
           "xcp": ("block5_sepconv3", "block12_sepconv3"),
           "vgg": None, "dn121": None, "incv3": None}
# zeroed with --probe and verified: every family (one spec, TensorFlow started once)
ZERO = [*ZOO, *REMOVABLE, *APPROXIMATE]
# one rng stream draws every model's BN statistics: families added later are built last, so
# the earlier ones keep the statistics their tests were written against (NASNet's refusal
# names the first padded consumer its constants reach)
BUILD_ORDER = [*ZOO, "mn", "mnv2", "effb0", "effv2b0", *APPROXIMATE,
               "vgg", "rn50", "rn50v2", "dn121", "incv3", "xcp"]


@pytest.fixture(scope="session")
def zoo(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zoo")
    rng = np.random.default_rng(19)
    builds = {**ZOO, **REMOVABLE, **APPROXIMATE}
    assert sorted(BUILD_ORDER) == sorted(builds)
    for name in BUILD_ORDER:
        build = builds[name]
        keras.utils.set_random_seed(19)  # Keras's initialisers: the same model every run
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


def _kernel(variables: list[np.ndarray], cls: str) -> np.ndarray:
    """(filters, -1) of a layer's variables: a SeparableConv2D's filters are its pointwise
    kernel's (its variables: depthwise kernel, pointwise kernel, bias; base_separable_conv.py)."""
    return _filters(variables[1 if cls == "SeparableConv2D" else 0], cls == "DepthwiseConv2D")


def _bias(variables: list[np.ndarray], cls: str) -> np.ndarray | None:
    """The bias among a conv layer's variables (the last, after its kernels), if it has one."""
    return variables[-1] if len(variables) > (2 if cls == "SeparableConv2D" else 1) else None


@pytest.mark.slow
def test_zoo_zero_probe_verify(zoo: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "version: 1\nmodels:\n" + "".join(
        f"  - {{path: {zoo / name}.keras, layers: [{{match: '*', rules: "
        f"[{{smallest: {{by: l1, fraction: 0.25}}}}]}}]}}\n" for name in ZERO))
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
            old, new = _kernel(before[name], cls), _kernel(after[name], cls)
            l1 = np.abs(old.astype(np.float64)).sum(axis=1)
            want = sorted(sorted(range(len(l1)), key=lambda f: (l1[f], f))[:len(l1) // 4])
            got = sorted(r["filter"] for r in records if r["layer"] == layer)
            assert got == want, layer
            assert not new[want].any()
            kept = [f for f in range(len(l1)) if f not in want]
            assert np.array_equal(new[kept].view(np.uint8), old[kept].view(np.uint8))
            if _bias(before[name], cls) is not None:
                assert not _bias(after[name], cls)[want].any()
            if cls == "SeparableConv2D":  # the depthwise kernel is its input's, unchanged
                assert np.array_equal(after[name][0].view(np.uint8),
                                      before[name][0].view(np.uint8)), layer
        for r in records:  # a channel claimed silent measured 0 where it was judged
            if r["silent"]:
                assert r["probe"]["max_abs"] == 0.0


@pytest.mark.slow
def test_zoo_zero_neutralize_concat_probe_verify(keras: Any, zoo: Path, tmp_path: Path) -> None:
    """DenseNet121 (chains of Concatenates, each feeding the next block's BN) and NASNetMobile
    (each adjust block's concat -> BN) zeroed with batchnorm: neutralize_concat and --probe:
    every variable of the written file equals the input zeroed here (conftest's oracle: the BNs
    behind concatenations at the offsets Keras's tensor shapes give), some record edits a BN
    behind a concatenation at a channel that is not its filter, every silent claim measured 0,
    and verify agrees."""
    names = ["dn121", "nas"]
    spec = write_spec(tmp_path, "version: 1\ndefaults: {batchnorm: neutralize_concat}\n"
                      "models:\n" + "".join(
                          f"  - {{path: {zoo / name}.keras, layers: [{{match: '*', rules: "
                          f"[{{smallest: {{by: l1, fraction: 0.25}}}}]}}]}}\n" for name in names))
    kprune("apply", spec, "--probe", "--audit-log", tmp_path / "log.json").expect(0)
    kprune("verify", tmp_path / "log.json").expect(0)
    log = json.loads((tmp_path / "log.json").read_text())
    for name in names:
        records = [r for r in log["zeroed"] if r["model"] == name]
        selection: dict[str, list[int]] = {}
        for r in records:
            selection.setdefault(r["layer"], []).append(r["filter"])
        assert any(e.get("channel", r["filter"]) != r["filter"]
                   for r in records for e in r["batchnorm"]), name
        assert all(r["probe"]["max_abs"] == 0.0 for r in records if r["silent"]), name
        model = keras.saving.load_model(zoo / f"{name}.keras")
        reference = zeroed_reference(keras, model, selection, clone=False, through_concat=True)
        after = _weights(tmp_path / "pruned" / f"{name}.keras")
        for layer in reference.layers:
            for want, got in zip(layer.get_weights(), after.get(layer.name, []), strict=True):
                assert np.array_equal(np.asarray(want).view(np.uint8), got.view(np.uint8)), \
                    (name, layer.name)


def _group_l1(before: dict[str, list[np.ndarray]], members: list[str],
              classes: dict[str, str]) -> np.ndarray:
    """A coupled group's per-channel score: the members' per-filter l1 summed (design.md)."""
    return sum(np.abs(_kernel(before[m], classes[m]).astype(np.float64)).sum(axis=1)
               for m in members)


def _params(path: Path) -> int:
    """Every variable of every layer in a .keras file, counted with h5py."""
    return sum(int(np.prod(v.shape)) for vs in _weights(path).values() for v in vs)


def _in_float64(keras: Any, model: Any) -> Any:
    """`model` rebuilt from its config with every layer's dtype policy float64, its weights
    cast: the same function without float32's round-off."""
    config = model.get_config()
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("class_name") == "DTypePolicy" and isinstance(item.get("config"), dict):
                item["config"]["name"] = "float64"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    twin = keras.Model.from_config(config)
    twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    assert all(w.dtype == "float64" for w in twin.weights)
    return twin


def _train_step(model: Any, x: np.ndarray, rng: np.random.Generator) -> None:
    """One training step towards random targets, run eagerly (the same ops: tracing the train
    step of a DenseNet121 took 14 s of its 15 here), the loss finite."""
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    history = model.fit(x, rng.normal(size=(len(x),) + tuple(model.output.shape[1:])),
                        epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.slow
def test_zoo_removal_equals_zeroing(keras: Any, zoo: Path, tmp_path: Path) -> None:
    """25 % smallest l1 of every conv removed (coupled: union); each group loses the channels
    of its summed l1 (recomputed here), the written model equals the input zeroed here on the
    same filters within the documented bound, it has the parameters its file holds, reloads
    and trains a step; verify agrees."""
    names = list(REMOVE_MATCH)
    spec = write_spec(tmp_path, "version: 1\ndefaults: {action: remove, coupled: union}\n"
                      "models:\n" + "".join(
                          f"  - path: {zoo / name}.keras\n    layers:\n" + "".join(
                              f"      - {{match: '{m}', rules: [{{smallest: {{by: l1, "
                              f"fraction: 0.25}}}}]}}\n" for m in REMOVE_MATCH[name])
                          for name in names))
    kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(0)
    verified = kprune("verify", tmp_path / "log.json").expect(0).stdout
    # the direct reader throughout: DenseNet's and Inception's Concatenates store nothing
    assert "read with Keras" not in verified, verified
    log = json.loads((tmp_path / "log.json").read_text())
    rng = np.random.default_rng(3)
    for entry in log["models"]:
        name = entry["name"]
        assert entry["status"] == "ok", entry
        before = _weights(zoo / f"{name}.keras")
        records = [r for r in log["removed"] if r["model"] == name]
        classes = {r["layer"]: r["layer_class"] for r in records}
        removed: dict[str, set[int]] = {}
        for r in records:
            removed.setdefault(r["layer"], set()).add(r["filter"])
        groups = {r["layer"]: r.get("group", [r["layer"]]) for r in records}
        for layer, members in groups.items():
            n = _kernel(before[layer], classes[layer]).shape[0]
            scores = _group_l1(before, members, classes)
            want = set(sorted(range(n), key=lambda f: (scores[f], f))[:n // 4])
            assert removed[layer] == want, (name, layer)
        if GROUPED[name] is None:
            assert all(members == [layer] for layer, members in groups.items()), name
        else:
            assert GROUPED[name][1] in groups[GROUPED[name][0]], (name, groups[GROUPED[name][0]])
        model = keras.saving.load_model(zoo / f"{name}.keras")
        out = keras.saving.load_model(tmp_path / "pruned" / f"{name}.keras")
        side = SIDE.get(name, 32)
        x = rng.normal(size=(2, side, side, 3)).astype("float32") * 50.0
        original = np.asarray(model(x), np.float64)
        zeroed = np.asarray(zeroed_reference(
            keras, model, {k: sorted(v) for k, v in removed.items()}, clone=False)(x),
            np.float64)
        got = np.asarray(out(x), np.float64)
        bound = 1e-5 + 1e-5 * np.abs(zeroed)
        assert np.all(np.abs(got - zeroed) <= bound), (name, np.abs(got - zeroed).max())
        assert np.abs(zeroed - original).max() > 100 * bound.max(), name  # the edit shows
        params = _params(tmp_path / "pruned" / f"{name}.keras")
        assert params == out.count_params() == entry["removal"]["params_after"]
        if name != "mnv3":  # (its operation nodes are not layers the count walks through)
            expected = expected_removal_params(model, {k: sorted(v) for k, v in removed.items()})
            assert {layer.name: layer.count_params() for layer in out.layers} == expected
        assert params < _params(zoo / f"{name}.keras") == entry["removal"]["params_before"]
        _train_step(out, x, rng)


def _remove_25_percent(zoo: Path, tmp_path: Path, name: str,
                       defaults: str = "approximate: true", refused_first: bool = True
                       ) -> tuple[str | None, dict, dict[str, set[int]], dict[str, str]]:
    """25 % smallest l1 of every conv of zoo model `name` (coupled: union), first with the
    defaults (which must fail, when `refused_first`), then with `defaults` added (which must
    pass, verify agreeing; the removal approximate only with approximate: true): the first
    run's first error line, the second run's log, {layer: removed filters} and {layer: class}
    from it."""
    entry = "      - {match: '*', rules: [{smallest: {by: l1, fraction: 0.25}}]}\n"
    first = None
    if refused_first:
        exact = write_spec(tmp_path, "version: 1\ndefaults: {action: remove, coupled: union}\n"
                           f"models:\n  - path: {zoo / name}.keras\n    layers:\n{entry}")
        first = kprune("apply", exact).expect(1).stderr.splitlines()[0]
    spec = write_spec(tmp_path, "version: 1\ndefaults: {action: remove, coupled: union, "
                      f"{defaults}}}\nmodels:\n  - path: {zoo / name}.keras\n"
                      f"    layers:\n{entry}")
    kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(0)
    kprune("verify", tmp_path / "log.json").expect(0)
    log = json.loads((tmp_path / "log.json").read_text())
    (model_entry,) = log["models"]
    removal = model_entry["removal"]
    assert model_entry["status"] == "ok"
    assert removal["approximate"] is ("approximate: true" in defaults), removal["approximate"]
    removed: dict[str, set[int]] = {}
    for r in log["removed"]:
        removed.setdefault(r["layer"], set()).add(r["filter"])
    return first, log, removed, {r["layer"]: r["layer_class"] for r in log["removed"]}


def _assert_nasnet_groups(zoo: Path, log: dict, removed: dict[str, set[int]],
                          classes: dict[str, str]) -> None:
    """Each group lost the channels of its summed l1 (a cell's adjust_conv_2 filter f being
    channel width(adjust_conv_1) + f of its group: keras's nasnet.py _adjust_block
    concatenates [p1, p2], which the cell adds to its normal_conv_1 output), some of them
    groups with a Concatenate inside."""
    before = _weights(zoo / "nas.keras")

    def l1(layer: str) -> np.ndarray:  # a separable conv's filters: its pointwise kernel's
        kernel = _kernel(before[layer], classes.get(layer, "Conv2D"))
        return np.abs(kernel.astype(np.float64)).sum(axis=1)

    concatenated = 0
    for layer in removed:
        members = next(r for r in log["removed"] if r["layer"] == layer).get("group", [layer])
        size = max(len(l1(m)) for m in members)
        scores, offsets = np.zeros(size), {}
        for m in members:
            offsets[m] = 0
            if len(l1(m)) < size:  # an input of the adjust block's Concatenate
                assert m.startswith(("adjust_conv_1_", "adjust_conv_2_")), m
                if m.startswith("adjust_conv_2_"):
                    offsets[m] = len(l1(m.replace("adjust_conv_2_", "adjust_conv_1_")))
                concatenated += 1
            scores[offsets[m]:offsets[m] + len(l1(m))] += l1(m)
        chosen = sorted(range(size), key=lambda u: (scores[u], u))[:size // 4]
        n = len(l1(layer))
        want = {u - offsets[layer] for u in chosen if 0 <= u - offsets[layer] < n}
        assert removed[layer] == want, layer
    assert concatenated  # the groups with a Concatenate inside were among them


@pytest.mark.slow
def test_zoo_nasnet_removal_needs_approximate(keras: Any, zoo: Path, tmp_path: Path) -> None:
    """NASNetMobile, 25 % smallest l1 of every conv (coupled: union). A BatchNormalization
    after a Concatenate is no direct follower, so the zeroed reference keeps its constants, and
    they reach zero-padded separable convs: exact removal is refused naming the consumer and
    batchnorm: neutralize_concat. With approximate: true it is removed (_assert_nasnet_groups),
    the deviation from the zeroed input is logged and small, verify agrees, the model reloads
    and trains a step."""
    first, log, removed, classes = _remove_25_percent(zoo, tmp_path, "nas")
    removal = log["models"][0]["removal"]
    model = keras.saving.load_model(zoo / "nas.keras")
    # the adjust blocks' BNs: each consumes a Concatenate (the pruned convs reach them all)
    after_concat = [layer.name for layer in model.layers
                    if isinstance(layer, keras.layers.BatchNormalization) and isinstance(
                        layer.input._keras_history.operation, keras.layers.Concatenate)]
    assert after_concat[0] == "adjust_bn_stem_2", after_concat
    who = "'adjust_conv_1_stem_2', 'adjust_conv_2_stem_2'"
    assert first == (
        "error: model 'nas', layer 'separable_conv_1_reduction_right1_stem_2': removed filters "
        f"of {who} reach it with values that differ across positions (zero padding or a padded "
        "depthwise layer on the way), so no constant can be folded into its bias exactly; set "
        f"batchnorm: neutralize_concat on the entries of {who} to silence BatchNormalization "
        f"'adjust_bn_stem_2' after a Concatenate (and {len(after_concat) - 1} more) for an "
        "exact removal, or set "
        f"approximate: true on the entries of {who} to accept the deviation (measured and "
        "logged), or zero these filters instead (action: zero)")
    _assert_nasnet_groups(zoo, log, removed, classes)
    out = keras.saving.load_model(tmp_path / "pruned" / "nas.keras")
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype("float32") * 50.0
    original = np.asarray(model(x), np.float64)
    zeroed = np.asarray(zeroed_reference(
        keras, model, {k: sorted(v) for k, v in removed.items()}, clone=False)(x), np.float64)
    got = np.asarray(out(x), np.float64)
    deviation = np.abs(got - zeroed).max()
    assert 1e-5 < removal["probe_deviation"] and 1e-5 < deviation  # not exact: folded inside
    assert deviation < 0.01 * np.abs(zeroed).max() < np.abs(zeroed - original).max(), deviation
    params = _params(tmp_path / "pruned" / "nas.keras")
    assert params == out.count_params() == removal["params_after"]
    assert params < _params(zoo / "nas.keras") == removal["params_before"]
    _train_step(out, x, np.random.default_rng(4))


@pytest.mark.slow
def test_zoo_nasnet_removal_is_exact_with_neutralize_concat(keras: Any, zoo: Path,
                                                            tmp_path: Path) -> None:
    """NASNetMobile as above with batchnorm: neutralize_concat: each adjust block's BN after
    its Concatenate is neutralised too, so nothing reaches the padded separable convs and the
    removal is exact: the written model equals the input zeroed here (BNs behind
    concatenations included, at the filters' offsets) within 1e-5 + 1e-5·|ref|, and within
    1e-9·(1 + |ref|) when both run in float64 on inputs 50 times larger (where float32's
    round-off over 200 layers alone exceeds the first bound), the edit shows, parameters
    counted from the file, verify agrees, it reloads and trains a step."""
    _, log, removed, classes = _remove_25_percent(
        zoo, tmp_path, "nas", "batchnorm: neutralize_concat", refused_first=False)
    removal = log["models"][0]["removal"]
    assert removal["folded"] == [] or all(f["exact"] for f in removal["folded"])
    _assert_nasnet_groups(zoo, log, removed, classes)
    model = keras.saving.load_model(zoo / "nas.keras")
    out = keras.saving.load_model(tmp_path / "pruned" / "nas.keras")
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype("float32")
    original = np.asarray(model(x), np.float64)
    reference = zeroed_reference(keras, model, {k: sorted(v) for k, v in removed.items()},
                                 clone=False, through_concat=True)
    zeroed = np.asarray(reference(x), np.float64)
    got = np.asarray(out(x), np.float64)
    bound = 1e-5 + 1e-5 * np.abs(zeroed)
    assert np.all(np.abs(got - zeroed) <= bound), np.abs(got - zeroed).max()
    assert np.abs(zeroed - original).max() > 100 * bound.max()  # the edit shows
    x64 = x.astype(np.float64) * 50.0
    zeroed64 = np.asarray(_in_float64(keras, reference)(x64))
    got64 = np.asarray(_in_float64(keras, out)(x64))
    assert np.all(np.abs(got64 - zeroed64) <= 1e-9 * (1 + np.abs(zeroed64))), \
        np.abs(got64 - zeroed64).max()
    params = _params(tmp_path / "pruned" / "nas.keras")
    assert params == out.count_params() == removal["params_after"]
    assert params < _params(zoo / "nas.keras") == removal["params_before"]
    _train_step(out, x, np.random.default_rng(4))


@pytest.mark.slow
def test_zoo_convnext_removal_needs_approximate(keras: Any, zoo: Path, tmp_path: Path) -> None:
    """ConvNeXtTiny, 25 % smallest l1 of every conv (coupled: union): a stage's residual group
    (its downsampling conv inside a nested Sequential, every block's second Dense through its
    LayerScale, the blocks' 7x7 grouped convs) passes through LayerNormalizations, so exact
    removal is refused naming one; with approximate: true it is removed, each group losing the
    channels of its members' summed l1 (recomputed here), the output differs from the zeroed
    input (LayerNorm statistics change) but stays finite, parameters counted from the file,
    verify agrees, the model reloads and trains a step."""
    first, log, removed, classes = _remove_25_percent(zoo, tmp_path, "cnx")
    removal = log["models"][0]["removal"]
    assert "passes through LayerNormalization '" in first and first.endswith(
        "whose statistics change when channels go, so removal cannot equal zeroing; set "
        "approximate: true to remove anyway (the deviation is measured and recorded)"), first
    before = _weights(zoo / "cnx.keras")
    assert "Dense" in classes.values()  # the blocks' second Dense came with the groups

    def l1(layer: str) -> np.ndarray:  # conv (grouped too) and Dense: filters on the last axis
        kernel = before[layer.rsplit("/", 1)[-1]][0]
        return np.abs(_filters(kernel, False).astype(np.float64)).sum(axis=1)

    for layer in removed:
        members = next(r for r in log["removed"] if r["layer"] == layer).get("group", [layer])
        scores = sum(l1(m) for m in members)
        want = set(sorted(range(len(scores)), key=lambda u: (scores[u], u))[:len(scores) // 4])
        assert removed[layer] == want, layer
    model = keras.saving.load_model(zoo / "cnx.keras")
    out = keras.saving.load_model(tmp_path / "pruned" / "cnx.keras")
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype("float32")
    zeroed = np.asarray(zeroed_reference(
        keras, model, {k: sorted(v) for k, v in removed.items()}, clone=False)(x), np.float64)
    got = np.asarray(out(x), np.float64)
    assert np.all(np.isfinite(got)) and np.abs(got - zeroed).max() > 1e-5  # not exact
    params = _params(tmp_path / "pruned" / "cnx.keras")
    assert params == out.count_params() == removal["params_after"]
    assert params < _params(zoo / "cnx.keras") == removal["params_before"]
    _train_step(out, x, np.random.default_rng(4))
