"""The selection stage: ranking rules (per layer, across an entry), bn_gamma, coupling and guards.

Every expected selection is computed here with plain numpy/python from the weights Keras loads
from the input file, never from kprune's own numbers.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import _seeded_weights, kprune, layer_weights, write_spec

CONVS = ("conv_a", "conv_b", "conv_c")


@pytest.fixture(scope="session")
def rank_cnn(keras: Any, models_dir: Path) -> Path:
    """conv_a (10) -> bn_a -> relu -> conv_b (12) -> bn_b -> conv_c (8, no BN) -> gap -> dense.
    conv_a's filters 2, 5 and 7 have identical kernels (ties by every statistic)."""
    L = keras.layers
    i = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(10, 3, padding="same", name="conv_a")(i)
    x = L.Activation("relu", name="relu_a")(L.BatchNormalization(name="bn_a")(x))
    x = L.BatchNormalization(name="bn_b")(L.Conv2D(12, 3, padding="same", name="conv_b")(x))
    x = L.Conv2D(8, 1, name="conv_c")(x)
    model = keras.Model(i, L.Dense(3, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    _seeded_weights(model, 21)
    a = model.get_layer("conv_a")
    kernel = a.kernel.numpy()
    kernel[..., 5] = kernel[..., 2]
    kernel[..., 7] = kernel[..., 2]
    a.kernel.assign(kernel)
    path = models_dir / "rank.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def rank_weights(keras: Any, rank_cnn: Path) -> dict[str, dict[str, np.ndarray]]:
    return layer_weights(keras, rank_cnn)


def l1(kernel: np.ndarray) -> np.ndarray:
    """Per-filter l1 of a Conv2D kernel (filters on the last axis), in float64."""
    return np.abs(kernel.astype(np.float64)).reshape(-1, kernel.shape[-1]).sum(axis=0)


def smallest(scores: np.ndarray, k: int, largest: bool = False) -> list[int]:
    """The k smallest (largest) scores, ties by filter index, lowest first: a plain sort."""
    key = (lambda f: (-scores[f], f)) if largest else (lambda f: (scores[f], f))
    return sorted(sorted(range(len(scores)), key=key)[:k])


def run(folder: Path, text: str, *args: str, code: int = 0) -> tuple[Any, dict[str, Any] | None]:
    spec = write_spec(folder, text)
    result = kprune("apply", spec, "--audit-log", folder / "log.json", *args).expect(code)
    log_file = folder / "log.json"
    return result, json.loads(log_file.read_text()) if log_file.exists() else None


def zeroed_by_layer(log: dict[str, Any], kind: str = "zeroed") -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for record in log[kind]:
        out.setdefault(record["layer"], []).append(record["filter"])
    return {k: sorted(v) for k, v in out.items()}


def zero_filters_in_file(keras: Any, path: Path) -> dict[str, list[int]]:
    """Filters whose whole kernel slice is 0 in a written file, per conv layer."""
    weights = layer_weights(keras, path)
    return {name: [int(f) for f in np.flatnonzero(
        ~weights[name]["kernel"].reshape(-1, weights[name]["kernel"].shape[-1]).any(axis=0))]
        for name in CONVS}


# --- per-layer rankings ------------------------------------------------------------------------

@pytest.mark.parametrize("rule, expect", [
    ("smallest: {by: l1, fraction: 0.25}", lambda s, n: smallest(s, math.floor(0.25 * n))),
    ("largest: {by: l1, count: 3}", lambda s, n: smallest(s, 3, largest=True)),
    ("smallest: {by: l2, fraction: 0.3}", None),  # checked with l2 below
])
def test_per_layer_ranking_matches_numpy(keras: Any, tmp_path: Path, rank_cnn: Path,
                                         rank_weights: dict, rule: str, expect: Any) -> None:
    _, log = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers:
              - match: "conv_*"
                rules: [{{{rule}}}]
        """)
    want = {}
    for name in CONVS:
        kernel = rank_weights[name]["kernel"]
        n = kernel.shape[-1]
        if expect is None:
            l2 = np.sqrt((kernel.astype(np.float64).reshape(-1, n) ** 2).sum(axis=0))
            want[name] = smallest(l2, math.floor(0.3 * n))
        else:
            want[name] = expect(l1(kernel), n)
    assert zeroed_by_layer(log) == want
    # the file holds exactly those zeroed kernels, nothing else zero
    assert zero_filters_in_file(keras, tmp_path / "pruned" / "rank.keras") == want


def test_ties_go_to_the_lowest_filter_index(tmp_path: Path, rank_cnn: Path,
                                            rank_weights: dict) -> None:
    scores = l1(rank_weights["conv_a"]["kernel"])
    assert scores[2] == scores[5] == scores[7]
    # a count that cuts through the tied filters 2, 5, 7 wherever they rank
    tied_rank = sorted(range(10), key=lambda f: (scores[f], f)).index(2)
    _, log = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers:
              - name: conv_a
                max_fraction: 1.0
                rules: [{{smallest: {{by: l1, count: {tied_rank + 2}}}}}]
        """)
    chosen = zeroed_by_layer(log)["conv_a"]
    assert 2 in chosen and 5 in chosen and 7 not in chosen


def test_ranking_records_position_score_and_cutoff(tmp_path: Path, rank_cnn: Path,
                                                   rank_weights: dict) -> None:
    _, log = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers:
              - name: conv_b
                rules:
                  - smallest: {{by: l1, count: 4}}
                  - index: [0, 11]
        """)
    scores = l1(rank_weights["conv_b"]["kernel"])
    order = sorted(range(12), key=lambda f: (scores[f], f))
    records = {r["filter"]: r for r in log["zeroed"]}
    assert sorted(records) == sorted(set(order[:4]) | {0, 11})
    for position, f in enumerate(order[:4], start=1):
        (pick,) = records[f]["ranking"]
        assert pick["rule"] == "models[0].layers[0].rules[0]"
        assert pick["position"] == position
        assert pick["score"] == pytest.approx(scores[f], rel=1e-12)
    for f in (0, 11):  # provenance: union of the rules, each filter names every rule choosing it
        want = ["models[0].layers[0].rules[1]"]
        if f in order[:4]:
            want.insert(0, "models[0].layers[0].rules[0]")
        assert records[f]["rules"] == want
    (layer,) = log["models"][0]["layers"]
    (ranking,) = layer["rankings"]
    assert ranking == {"rule": "models[0].layers[0].rules[0]", "order": "smallest", "by": "l1",
                       "across": "layer", "normalize": None, "requested": 4, "taken": 4,
                       "cutoff": pytest.approx(scores[order[3]], rel=1e-12), "cap": None,
                       "cap_bound": False}


def test_count_beyond_the_layer_fails_the_model(tmp_path: Path, rank_cnn: Path,
                                                small_cnn: Path) -> None:
    result, log = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers: [{{name: conv_c, rules: [{{largest: {{by: l2, count: 9}}}}]}}]
          - path: {small_cnn}
            layers: [{{name: conv2d, rules: [{{index: [1]}}]}}]
        """, code=1)
    assert result.stderr == (
        "error: model 'rank', layer 'conv_c': models[0].layers[0].rules[0]: count 9 is more "
        "than the layer has: 8 filters; use a count of at most 8, or a fraction\n")
    assert [m["status"] for m in log["models"]] == ["failed", "ok"]


def test_ranking_beyond_max_fraction_fails_with_the_guard(tmp_path: Path, rank_cnn: Path) -> None:
    result, _ = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers: [{{name: conv_c, rules: [{{smallest: {{by: l1, fraction: 0.75}}}}]}}]
        """, code=1)
    assert result.stderr == (
        "error: model 'rank', layer 'conv_c': the rules would zero 6 of 8 filters (75.0%), more "
        "than max_fraction 0.5 allows (4); selected by models[0].layers[0].rules[0] (6); "
        "tighten the rules or raise max_fraction for this entry\n")
    assert not (tmp_path / "pruned" / "rank.keras").exists()


# --- bn_gamma ----------------------------------------------------------------------------------

def test_bn_gamma_ranks_by_the_batchnorm_follower(tmp_path: Path, rank_cnn: Path,
                                                  rank_weights: dict) -> None:
    _, log = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers:
              - name: conv_a   # BN reached through nothing: conv_a -> bn_a
                rules: [{{smallest: {{by: bn_gamma, count: 3}}}}]
              - name: conv_b
                rules: [{{bn_gamma: {{below: 0.1}}}}]
        """)
    gamma_a = np.abs(rank_weights["bn_a"]["gamma"].astype(np.float64))
    gamma_b = np.abs(rank_weights["bn_b"]["gamma"].astype(np.float64))
    assert zeroed_by_layer(log) == {
        "conv_a": smallest(gamma_a, 3),
        "conv_b": [int(f) for f in np.flatnonzero(gamma_b < 0.1)],
    }


def test_bn_gamma_without_a_follower_fails_naming_the_layer(tmp_path: Path,
                                                            rank_cnn: Path) -> None:
    result, _ = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers: [{{name: conv_c, rules: [{{smallest: {{by: bn_gamma, count: 1}}}}]}}]
        """, code=1)
    assert result.stderr == (
        "error: model 'rank', layer 'conv_c': models[0].layers[0].rules[0]: bn_gamma needs the "
        "layer's one BatchNormalization follower, but it has no BatchNormalization follower; "
        "rank this layer by a kernel statistic (l1, l2, ...)\n")


# --- one ranking across the entry ----------------------------------------------------------------

def global_expected(weights: dict, names: tuple[str, ...], k: int, normalize: str,
                    caps: dict[str, int], already: dict[str, set[int]] | None = None
                    ) -> dict[str, list[int]]:
    """The contract's global ranking, written out plainly: scores normalised per layer, one
    list sorted by (score, filter index, layer position); a filter another rule already took
    costs nothing, any other is skipped when its layer is at its cap."""
    already = already or {}
    cands = []
    for pos, name in enumerate(names):
        s = l1(weights[name]["kernel"])
        scale = {"mean": np.mean(np.abs(s)), "max": np.max(np.abs(s)), "none": 1.0}[normalize]
        cands += [(s[f] / scale, f, pos, name) for f in range(len(s))]
    taken: dict[str, set[int]] = {n: set() for n in names}
    count = 0
    for _score, f, _pos, name in sorted(cands):
        if count == k:
            break
        have = already.get(name, set())
        if f not in have and len(have | taken[name]) >= caps[name]:
            continue
        taken[name].add(f)
        count += 1
    return {n: sorted(v | already.get(n, set())) for n, v in taken.items()
            if v | already.get(n, set())}


@pytest.mark.parametrize("normalize", ["mean", "max", "none"])
def test_global_ranking_with_each_normalisation(tmp_path: Path, rank_cnn: Path,
                                                rank_weights: dict, normalize: str) -> None:
    _, log = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers:
              - match: "conv_*"
                rules: [{{smallest: {{by: l1, fraction: 0.3, across: entry,
                                      normalize: {normalize}}}}}]
        """)
    caps = {"conv_a": 5, "conv_b": 6, "conv_c": 4}  # floor(0.5 * n)
    want = global_expected(rank_weights, CONVS, math.floor(0.3 * 30), normalize, caps)
    assert zeroed_by_layer(log) == want
    assert sum(map(len, want.values())) == math.floor(0.3 * 30)


def test_global_ranking_skips_past_a_cap_that_binds(tmp_path: Path, rank_cnn: Path,
                                                    rank_weights: dict) -> None:
    # normalize: none on raw l1: conv_c's 1x1 kernels (12 weights) have far smaller l1 than the
    # 3x3 ones, so an uncapped ranking would take all of conv_c first; the cap (0.25 * 8 = 2) binds
    _, log = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers:
              - match: "conv_*"
                max_fraction: 0.25
                rules: [{{smallest: {{by: l1, count: 6, across: entry, normalize: none}}}}]
        """)
    caps = {"conv_a": 2, "conv_b": 3, "conv_c": 2}
    want = global_expected(rank_weights, CONVS, 6, "none", caps)
    assert zeroed_by_layer(log) == want
    assert len(want["conv_c"]) == 2
    rankings = {layer["layer"]: layer["rankings"][0] for layer in log["models"][0]["layers"]}
    assert rankings["conv_c"]["cap_bound"] is True and rankings["conv_c"]["cap"] == 2
    assert {k: r["taken"] for k, r in rankings.items()} == \
        {k: len(want.get(k, [])) for k in CONVS}
    assert all(r["requested"] == 6 for r in rankings.values())


def test_global_cap_counts_what_other_rules_took(tmp_path: Path, rank_cnn: Path,
                                                 rank_weights: dict) -> None:
    # conv_c may lose 4 of 8; an index rule takes 3 of them first, so the ranking may add only
    # one filter there that the index rule did not take
    _, log = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers:
              - name: conv_c
                rules: [{{index: [5, 6, 7]}}]
              - match: "conv_*"
                rules: [{{smallest: {{by: l1, count: 8, across: entry, normalize: none}}}}]
        """)
    caps = {"conv_a": 5, "conv_b": 6, "conv_c": 4}
    want = global_expected(rank_weights, CONVS, 8, "none", caps, already={"conv_c": {5, 6, 7}})
    got = zeroed_by_layer(log)
    assert got == want
    assert len(got["conv_c"]) == 4  # the cap bound: 3 by index, 1 more by the ranking
    s = l1(rank_weights["conv_c"]["kernel"])
    first_new = next(f for f in sorted(range(8), key=lambda f: (s[f], f)) if f not in (5, 6, 7))
    assert got["conv_c"] == sorted({5, 6, 7, first_new})


def test_global_count_beyond_the_entry_fails(tmp_path: Path, rank_cnn: Path) -> None:
    result, _ = run(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers:
              - match: "conv_*"
                rules: [{{smallest: {{by: l1, count: 31, across: entry}}}}]
        """, code=1)
    assert result.stderr == (
        "error: model 'rank': models[0].layers[0].rules[0]: count 31 is more than the entry "
        "(3 layer(s)) has: 30 filters; use a count of at most 30, or a fraction\n")


# --- coupled groups (action: remove) -------------------------------------------------------------

@pytest.fixture(scope="session")
def residual(keras: Any, models_dir: Path) -> Path:
    """stem -> (bn1, relu) -> c2 -> bn2 -+- add -> relu -> c3 -> bn3 -+- add2 -> gap -> dense
                              stem -> bns ---+            merged ------+
    stem, c2 and c3 form one coupled group of 6 channels; `lone` is outside it."""
    L = keras.layers
    i = keras.Input((8, 8, 3))
    stem = L.Conv2D(6, 1, name="stem")(i)
    x = L.ReLU()(L.BatchNormalization(name="bn1")(stem))
    x = L.BatchNormalization(name="bn2")(L.Conv2D(6, 3, padding="same", name="c2")(x))
    y = L.ReLU(name="merged")(L.Add(name="add")([x, L.BatchNormalization(name="bns")(stem)]))
    z = L.BatchNormalization(name="bn3")(L.Conv2D(6, 1, name="c3")(y))
    y2 = L.Add(name="add2")([z, y])
    w = L.ReLU()(L.BatchNormalization(name="bnl")(L.Conv2D(8, 1, name="lone")(y2)))
    model = keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(w)))
    _seeded_weights(model, 8)
    path = models_dir / "res.keras"
    model.save(path)
    return path


def test_ranking_in_a_coupled_group_scores_the_group(keras: Any, tmp_path: Path,
                                                     residual: Path) -> None:
    # both listed members rank by the group's summed l1, so coupled: error sees no conflict
    _, log = run(tmp_path, f"""\
        version: 1
        defaults: {{action: remove}}
        models:
          - path: {residual}
            layers:
              - {{name: c2, rules: [{{smallest: {{by: l1, count: 2}}}}]}}
              - {{name: c3, rules: [{{smallest: {{by: l1, count: 2}}}}]}}
        """)
    w = layer_weights(keras, residual)
    group = l1(w["stem"]["kernel"]) + l1(w["c2"]["kernel"]) + l1(w["c3"]["kernel"])
    want = smallest(group, 2)
    assert zeroed_by_layer(log, "removed") == {"c2": want, "c3": want, "stem": want}
    out = keras.saving.load_model(tmp_path / "pruned" / "res.keras")
    kept = [f for f in range(6) if f not in want]
    np.testing.assert_array_equal(out.get_layer("c3").kernel.numpy(),
                                  w["c3"]["kernel"][:, :, kept][..., kept])


@pytest.fixture(scope="session")
def depthwise_chain(keras: Any, models_dir: Path) -> Path:
    """c1 -> BN -> ReLU -> dw (depth_multiplier 1) -> BN -> ReLU -> c2 (MobileNet's pattern)."""
    L = keras.layers
    i = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization(name="bn1")(L.Conv2D(8, 3, name="c1")(i)))
    x = L.ReLU()(L.BatchNormalization(name="bn2")(
        L.DepthwiseConv2D(3, padding="same", name="dw")(x)))
    model = keras.Model(i, L.Conv2D(4, 1, name="c2")(x))
    _seeded_weights(model, 12)
    path = models_dir / "dwchain.keras"
    model.save(path)
    return path


def test_a_listed_depthwise_layer_removes_its_producers_channels(
        keras: Any, tmp_path: Path, depthwise_chain: Path) -> None:
    # the depthwise layer's filter c is its input channel c: ranking it ranks c1's filters and
    # its own together (summed l1), and both lose them; c2 loses the input channels
    _, log = run(tmp_path, f"""\
        version: 1
        models:
          - path: {depthwise_chain}
            layers: [{{name: dw, action: remove, rules: [{{smallest: {{by: l1, count: 3}}}}]}}]
        """)
    w = layer_weights(keras, depthwise_chain)
    dw = np.abs(w["dw"]["kernel"].astype(np.float64)).sum(axis=(0, 1, 3))  # (3, 3, 8, 1)
    want = smallest(l1(w["c1"]["kernel"]) + dw, 3)
    assert zeroed_by_layer(log, "removed") == {"c1": want, "dw": want}
    group = {r["layer"]: r["group"] for r in log["removed"]}
    assert group == {"c1": ["dw", "c1"], "dw": ["dw", "c1"]}
    out = keras.saving.load_model(tmp_path / "pruned" / "dwchain.keras")
    kept = [f for f in range(8) if f not in want]
    np.testing.assert_array_equal(out.get_layer("c1").kernel.numpy(), w["c1"]["kernel"][..., kept])
    np.testing.assert_array_equal(out.get_layer("dw").kernel.numpy(),
                                  w["dw"]["kernel"][:, :, kept])
    np.testing.assert_array_equal(out.get_layer("c2").kernel.numpy(),
                                  w["c2"]["kernel"][:, :, kept])
    assert out.get_layer("bn2").gamma.shape == (5,)
    plan = kprune("plan", tmp_path / "spec.yaml").expect(0).stdout.splitlines()
    starts = [i for i, line in enumerate(plan) if line.startswith(("  dw (", "  c1 ("))]
    assert "    coupled with c1" in plan[starts[0]:starts[1]]  # under dw, listed
    assert "    (not listed: follows its coupled group dw, c1)" in plan


def test_a_depthwise_multiplier_ranks_channels(keras: Any, tmp_path: Path) -> None:
    # depth_multiplier 2: the depthwise layer's filters 2c, 2c+1 are c0's channel c, one unit
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(L.Conv2D(5, 1, name="c0")(i))
    model = keras.Model(i, L.Conv2D(2, 1, name="head")(x))
    _seeded_weights(model, 5)
    model.save(tmp_path / "m2.keras")
    _, log = run(tmp_path, """\
        version: 1
        models:
          - path: m2.keras
            layers: [{name: dw, action: remove, rules: [{smallest: {by: l1, count: 2}}]}]
        """)
    w = layer_weights(keras, tmp_path / "m2.keras")
    dw = np.abs(w["dw"]["kernel"].astype(np.float64)).sum(axis=(0, 1, 3))  # (3, 3, 5, 2)
    want = smallest(l1(w["c0"]["kernel"]) + dw, 2)
    assert zeroed_by_layer(log, "removed") == {
        "c0": want, "dw": sorted(2 * c + m for c in want for m in (0, 1))}
    picks = {r["filter"]: r["ranking"][0]["position"] for r in log["removed"]
             if r["layer"] == "dw"}
    assert sorted(picks.values()) == [1, 1, 2, 2]  # a channel's two filters share its place
    out = keras.saving.load_model(tmp_path / "pruned" / "m2.keras")
    kept = [c for c in range(5) if c not in want]
    np.testing.assert_array_equal(out.get_layer("dw").kernel.numpy(),
                                  w["dw"]["kernel"][:, :, kept])
    assert out.get_layer("head").kernel.shape == (1, 1, 6, 2)


@pytest.fixture(scope="session")
def multiplier_chain(keras: Any, models_dir: Path) -> Path:
    """c0 (4) -> dw (depth_multiplier 2, 8 filters: two per channel of c0) -> head."""
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(L.Conv2D(4, 1, name="c0")(i))
    model = keras.Model(i, L.Conv2D(2, 1, name="head")(x))
    _seeded_weights(model, 6)
    path = models_dir / "mult.keras"
    model.save(path)
    return path


def test_a_count_beyond_a_multiplier_groups_channels_names_channels(
        tmp_path: Path, multiplier_chain: Path) -> None:
    # 8 filters but 4 channels: the count is of channels, and the message says so (it said
    # "4 filters" of an 8-filter layer)
    result, _ = run(tmp_path, f"""\
        version: 1
        models:
          - path: {multiplier_chain}
            layers: [{{name: dw, action: remove, rules: [{{smallest: {{by: l1, count: 5}}}}]}}]
        """, code=1)
    assert result.stderr == (
        "error: model 'mult', layer 'dw': models[0].layers[0].rules[0]: count 5 is more than "
        "the layer's coupled group has: 4 channels (2 of the layer's 8 filters each); use a count "
        "of at most 4, or a fraction\n")


def test_a_global_count_beyond_an_entry_with_a_group_names_units_and_channels(
        tmp_path: Path, multiplier_chain: Path) -> None:
    # c0 and dw are one unit of 4 channels (12 filters), head 2: it said "the entry (2 layer(s))
    # has: 6 filters" of an entry of 3 layers and 14 filters
    result, _ = run(tmp_path, f"""\
        version: 1
        models:
          - path: {multiplier_chain}
            layers:
              - {{match: "*", action: remove,
                 rules: [{{smallest: {{by: l1, count: 7, across: entry}}}}]}}
        """, code=1)
    assert result.stderr == (
        "error: model 'mult': models[0].layers[0].rules[0]: count 7 is more than the entry "
        "(2 ranking unit(s), a coupled group being one) has: 6 channels; use a count of at most "
        "6, or a fraction\n")


@pytest.mark.parametrize("coupled, removed", [
    ("error", None), ("union", {"c0": [0, 1, 2], "dw": [0, 1, 2, 3, 4, 5]}),
    ("intersection", {"c0": [1], "dw": [2, 3]})])
def test_a_listed_depthwise_layer_and_its_listed_producer_couple(
        tmp_path: Path, multiplier_chain: Path, coupled: str,
        removed: dict[str, list[int]] | None) -> None:
    # dw's filters 0 and 3 are channels 0 and 1; c0 selects 1 and 2: no merge couples them,
    # the depthwise layer does (the message said "meet in an Add-type merge")
    result, log = run(tmp_path, f"""\
        version: 1
        defaults: {{action: remove, coupled: {coupled}, max_fraction: 0.75}}
        models:
          - path: {multiplier_chain}
            layers:
              - {{name: dw, rules: [{{index: [0, 3]}}]}}
              - {{name: c0, rules: [{{index: [1, 2]}}]}}
        """, code=1 if removed is None else 0)
    if removed is None:
        assert result.stderr == (
            "error: model 'mult', layer 'dw': the layers dw, c0 (listed) are coupled by a "
            "depthwise layer (its filters are its input's channels) and must lose the same "
            "filters, but their rules select different ones: dw (models[0].layers[0]) selects "
            "0, 3; c0 (models[0].layers[1]) selects 1-2; set coupled: union or coupled: "
            "intersection on the entries\n")
        return
    assert zeroed_by_layer(log, "removed") == removed


def test_a_concatenate_inside_a_group_maps_its_inputs_to_offsets(keras: Any,
                                                                 tmp_path: Path) -> None:
    # NASNet's cells add a concatenation of two convs to a third conv's output: c's filter 2
    # is the concatenation's channel 2, b's filter 0
    L = keras.layers
    i = keras.Input((6, 6, 3))
    cat = L.Concatenate(name="cat")([L.Conv2D(2, 1, name="a")(i), L.Conv2D(2, 1, name="b")(i)])
    x = L.Add(name="add")([cat, L.Conv2D(4, 1, name="c")(i)])
    keras.Model(i, L.Conv2D(2, 1, name="head")(x)).save(tmp_path / "cat.keras")
    write_spec(tmp_path, "version: 1\nmodels:\n  - path: cat.keras\n    layers: "
                         "[{name: c, action: remove, rules: [{index: [0, 2]}]}]\n")
    out = kprune("plan", tmp_path / "spec.yaml").expect(0).stdout
    assert out.split("\n")[1:] == [
        "  c (Conv2D, 4 filters): would remove 0, 2 (2 of 4, 50.0%)",
        "    models[0].layers[0].rules[0]: 0, 2",
        "    coupled with a, b",
        "  a (Conv2D, 2 filters): would remove 0 (1 of 2, 50.0%)",
        "    (not listed: follows its coupled group c, a, b)",
        "  b (Conv2D, 2 filters): would remove 0 (1 of 2, 50.0%)",
        "    (not listed: follows its coupled group c, a, b)",
        "  removal touches:",
        "    c (Conv2D): filters removed 0, 2 (2 of 4)",
        "    add (Add): passes through 0, 2 (2 of 4)",
        "    head (Conv2D): input channels removed 0, 2 (2 of 4)",
        "    a (Conv2D): filters removed 0 (1 of 2)",
        "    b (Conv2D): filters removed 0 (1 of 2)",
        "    cat (Concatenate): concatenated channels removed 0, 2 (2 of 4)",
        ""]


def test_a_concatenate_of_one_tensor_twice_inside_a_group_is_refused(keras: Any,
                                                                     tmp_path: Path) -> None:
    L = keras.layers
    i = keras.Input((6, 6, 3))
    a = L.Conv2D(2, 1, name="a")(i)
    x = L.Add(name="add")([L.Concatenate(name="cat")([a, a]), L.Conv2D(4, 1, name="c")(i)])
    keras.Model(i, L.Conv2D(2, 1, name="head")(x)).save(tmp_path / "twice.keras")
    write_spec(tmp_path, "version: 1\nmodels:\n  - path: twice.keras\n    layers: "
                         "[{name: c, action: remove, rules: [{index: [0]}]}]\n")
    assert kprune("plan", tmp_path / "spec.yaml").expect(1).stderr == (
        "error: model 'twice', layer 'cat': its channels meet those of 'c' in Add 'add', and a "
        "Concatenate inside a coupled group must be called once, join each tensor once and "
        "join on the channel axis (with known input shapes)\n")


def test_guard_holds_after_coupling(tmp_path: Path, residual: Path) -> None:
    # each entry alone selects <= half, but the union makes c2, c3 and stem lose 4 of 6
    result, log = run(tmp_path, f"""\
        version: 1
        defaults: {{action: remove, coupled: union}}
        models:
          - path: {residual}
            layers:
              - {{name: c2, rules: [{{index: [0, 1, 2]}}]}}
              - {{name: c3, rules: [{{index: [3]}}]}}
        """, code=1)
    assert result.stderr == (
        "error: model 'res', layer 'c2': the rules would zero 4 of 6 filters (66.7%), more than "
        "max_fraction 0.5 allows (3); selected by models[0].layers[0].rules[0] (3); coupled "
        "with c3 (listed) and stem (came with the group); tighten the rules or raise "
        "max_fraction for this entry\n")
    assert log["models"][0]["status"] == "failed"
    assert not (tmp_path / "pruned" / "res.keras").exists()


def test_unlisted_member_takes_its_own_groups_options(tmp_path: Path, residual: Path) -> None:
    # `lone` (batchnorm: keep) is listed first; the group's unlisted stem must take the options
    # of the group's own listed members (batchnorm: neutralize), not those of the first entry
    result = kprune("plan", write_spec(tmp_path, f"""\
        version: 1
        defaults: {{action: remove, coupled: union}}
        models:
          - path: {residual}
            layers:
              - {{name: lone, batchnorm: keep, max_fraction: 0.9, rules: [{{index: [0]}}]}}
              - {{name: c2, rules: [{{index: [1]}}]}}
              - {{name: c3, max_fraction: 0.4, rules: [{{index: [1]}}]}}
        """), "--format", "json").expect(0)
    layers = {layer["layer"]: layer for layer in json.loads(result.stdout)["models"][0]["layers"]}
    assert layers["stem"]["entries"] == []
    assert layers["stem"]["options"]["batchnorm"] == "neutralize"
    assert layers["stem"]["max_fraction"] == 0.4  # the smallest of its group's listed members
    assert layers["lone"]["options"]["batchnorm"] == "keep"


def test_group_members_whose_options_differ_are_an_error(tmp_path: Path, residual: Path) -> None:
    result = kprune("plan", write_spec(tmp_path, f"""\
        version: 1
        defaults: {{action: remove}}
        models:
          - path: {residual}
            layers:
              - {{name: c2, rules: [{{index: [1]}}]}}
              - {{name: c3, bias: keep, rules: [{{index: [1]}}]}}
        """)).expect(1)
    assert result.stderr == (
        "error: model 'res', layer 'c2': models[0].layers[1] sets bias: keep, but "
        "models[0].layers[0] sets bias: zero in the coupled group of c2, c3 (listed) and stem "
        "(came with the group); give them the same value\n")


def test_coupled_error_names_listed_and_unlisted_members(tmp_path: Path, residual: Path) -> None:
    result = kprune("plan", write_spec(tmp_path, f"""\
        version: 1
        defaults: {{action: remove}}
        models:
          - path: {residual}
            layers:
              - {{name: c2, rules: [{{index: [1]}}]}}
              - {{name: c3, rules: [{{index: [2]}}]}}
        """)).expect(1)
    assert result.stderr == (
        "error: model 'res', layer 'c2': the layers c2, c3 (listed) and stem (came with the "
        "group) meet in an Add-type merge and must lose the same filters, but their rules "
        "select different ones: c2 (models[0].layers[0]) selects 1; c3 (models[0].layers[1]) "
        "selects 2; set coupled: union or coupled: intersection on the entries\n")


# --- plan and purity -----------------------------------------------------------------------------

NO_TF = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "jax", "torch"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def test_plan_shows_rank_and_cutoff_without_tensorflow(tmp_path: Path, rank_cnn: Path,
                                                       rank_weights: dict) -> None:
    spec = write_spec(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers: [{{name: conv_b, rules: [{{smallest: {{by: l1, count: 2}}}}]}}]
        """)
    code = NO_TF + "from kprune_batch.cli import main\nsys.argv = ['kprune', 'plan', sys.argv[1]]\nmain()\n"
    proc = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = l1(rank_weights["conv_b"]["kernel"])
    a, b = sorted(range(12), key=lambda f: (s[f], f))[:2]
    lines = proc.stdout.splitlines()
    lo, hi = sorted([a, b])
    ranges = f"{lo}-{hi}" if hi == lo + 1 else f"{lo},{hi}"  # the plan's compact range format
    assert f"    models[0].layers[0].rules[0]: {ranges}" in lines
    assert f"      smallest by l1 (per layer): took 2 of 2, cutoff {s[b]:.6g}" in lines
    assert f"      ranked: #1 filter {a} ({s[a]:.6g}), #2 filter {b} ({s[b]:.6g})" in lines


def test_selection_stage_runs_without_tensorflow(tmp_path: Path, rank_cnn: Path,
                                                 rank_weights: dict) -> None:
    spec = write_spec(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers: [{{match: "conv_*", rules: [{{smallest: {{by: l1, fraction: 0.25,
                                                              across: entry}}}}]}}]
        """)
    code = NO_TF + """
import json
from kprune_batch.backends.direct import DirectModelWeights
from kprune_batch.plan import compile_plan
from kprune_batch.selection import select_model
from kprune_batch.spec import read_spec
job = compile_plan(read_spec(sys.argv[1])).jobs[0]
weights = DirectModelWeights(job.input, job.name)
print(json.dumps(select_model(job, weights).to_json()))
assert not any(m.split(".")[0] in ("tensorflow", "keras") for m in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = {layer["layer"]: layer["selected"] for layer in json.loads(proc.stdout)}
    caps = {"conv_a": 5, "conv_b": 6, "conv_c": 4}
    want = global_expected(rank_weights, CONVS, math.floor(0.25 * 30), "mean", caps)
    assert {k: v for k, v in got.items() if v} == want


def test_both_backends_select_the_same(tmp_path: Path, rank_cnn: Path) -> None:
    # the stage reads weights only through ModelWeights: Keras-loaded and file-read weights
    # must give the same final selection, rankings and picks
    spec = write_spec(tmp_path, f"""\
        version: 1
        models:
          - path: {rank_cnn}
            layers:
              - match: "conv_[ab]"
                rules: [{{largest: {{by: bn_gamma, count: 1}}}}]
              - match: "conv_*"
                rules:
                  - smallest: {{by: l1, fraction: 0.3, across: entry}}
                  - sign: {{element: [0, 0, 0], zero: zero}}
        """)
    plans = {}
    for backend in ("direct", "keras"):
        out = kprune("plan", spec, "--format", "json", "--backend", backend).expect(0)
        plans[backend] = json.loads(out.stdout)["models"][0]["layers"]
    assert plans["direct"] == plans["keras"]
    assert sum(len(layer["selected"]) for layer in plans["direct"]) >= 9  # floor(0.3 * 30)


def test_a_group_that_cannot_be_removed_only_fails_a_selection(keras: Any,
                                                               tmp_path: Path) -> None:
    L = keras.layers
    i = keras.Input((6, 6, 3))
    # a one-channel gate broadcast over c1's four channels: they cannot lose the same ones
    x = L.Multiply(name="mul")([L.Conv2D(4, 1, name="c1")(i), L.Conv2D(1, 1, name="g")(i)])
    model = keras.Model(i, L.Conv2D(2, 1, name="head")(x))
    _seeded_weights(model, 3)
    model.save(tmp_path / "bc.keras")
    spec = "version: 1\nmodels:\n  - path: bc.keras\n    layers: [{name: c1, action: remove, " \
           "rules: [{index: %s}]}]\n"
    write_spec(tmp_path, spec % "[0]")
    assert kprune("plan", tmp_path / "spec.yaml").expect(1).stderr == (
        "error: model 'bc', layer 'g': its channels meet those of 'c1' in Multiply 'mul', and "
        "the tensors it joins have different channel counts (a broadcast)\n")
    # the same entry whose rule selects nothing is harmless
    write_spec(tmp_path, spec.replace("{index: %s}", "{l1: {below: -1}}"))
    kprune("plan", tmp_path / "spec.yaml").expect(0)


def test_group_text_says_who_is_listed_and_caps_long_groups() -> None:
    from kprune_batch.selection import group_text

    assert group_text(["c2", "stem", "c3"], ["c2", "c3"]) == \
        "c2, c3 (listed) and stem (came with the group)"
    members = [f"block{i}_conv" for i in range(12)]
    assert group_text(members, ["block3_conv"]) == (
        "block3_conv (listed) and block0_conv, block1_conv, block2_conv, block4_conv, "
        "block5_conv … and 6 more (came with the group)")
