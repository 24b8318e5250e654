"""`kprune report` and `kprune diff` read only the audit log (no TensorFlow) and say what changed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import kprune, layer_weights, write_spec

SPEC = """\
version: 1
models:
  - path: m.keras
    layers:
      - name: conv2d_1
        rules: [{{index: {first}}}]
      - name: conv2d
        rules: [{{index: [1]}}]
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, small_cnn: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("report")
    shutil.copy(small_cnn, folder / "m.keras")
    spec = write_spec(folder, SPEC.format(first="[0, 3, 4, 5]"))
    kprune("apply", spec, "--audit-log", folder / "old.json").expect(0)
    spec = write_spec(folder, SPEC.format(first="[0, 1, 4]"))
    kprune("apply", spec, "--audit-log", folder / "new.json").expect(0)
    return {"folder": folder, "old": folder / "old.json", "new": folder / "new.json"}


def test_text_report(runs: dict[str, Path]) -> None:
    log = json.loads(runs["old"].read_text())
    lines = kprune("report", runs["old"]).expect(0).stdout.splitlines()
    assert lines[0] == f"run {log['run_id']}: ok"
    assert lines[1] == f"spec: {runs['folder'] / 'spec.yaml'} @ not in git (the spec is not in a " \
                       f"git work tree)"
    assert "  conv2d_1: 0, 3-5 (4 of 8, 50.0%)" in lines
    assert "    models[0].layers[0].rules[0]: 0, 3-5" in lines
    assert "  conv2d: 1 (1 of 6, 16.7%)" in lines


def test_markdown_report_is_a_table(runs: dict[str, Path]) -> None:
    out = kprune("report", runs["old"], "--format", "markdown").expect(0).stdout
    assert "| model | status | input | output | zeroed | removed |" in out
    assert f"| m | ok | `{runs['folder'] / 'm.keras'}` | `{runs['folder'] / 'pruned' / 'm.keras'}` " \
           f"| 5 | 0 |" in out
    assert "| layer | action | filters | count | silent | rules |" in out
    assert "| `conv2d_1` | zeroed | 0, 3-5 | 4 of 8 (50.0%) | 4/4 | " \
           "`models[0].layers[0].rules[0]`: 0, 3-5 |" in out


def test_json_report(runs: dict[str, Path]) -> None:
    data = json.loads(kprune("report", runs["new"], "--format", "json").expect(0).stdout)
    (model,) = data["models"]
    assert {layer["layer"]: layer["filters"] for layer in model["layers"]} == \
        {"conv2d_1": [0, 1, 4], "conv2d": [1]}
    assert model["zeroed"] == 4


def test_diff(runs: dict[str, Path]) -> None:
    out = kprune("diff", runs["old"], runs["new"]).expect(0).stdout
    assert out == "m conv2d_1: +1  -3, 5  (4 -> 3 zeroed)\n"
    same = kprune("diff", runs["old"], runs["old"]).expect(0).stdout
    assert same == "no difference in zeroed filters\n"
    kprune("diff", runs["old"], runs["folder"] / "missing.json").expect(1)


@pytest.mark.parametrize("command", [["report", "{old}"], ["diff", "{old}", "{new}"],
                                     ["validate", "{spec}"]])
def test_reading_commands_do_not_import_tensorflow(runs: dict[str, Path],
                                                   command: list[str]) -> None:
    args = [c.format(old=runs["old"], new=runs["new"], spec=runs["folder"] / "spec.yaml")
            for c in command]
    code = ("import sys; from kprune_batch.cli import main; sys.argv = ['kprune'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
            "print('EXIT', code, 'HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert out.stdout.splitlines()[-1] == "EXIT 0 HEAVY []", out.stdout + out.stderr


# --- removal runs: report and diff read `removed` as they read `zeroed` ----------------------------

REMOVAL_SPEC = """\
version: 1
models:
  - path: m.keras
    layers:
      - {{name: c1, action: remove, rules: [{{index: {c1}}}]}}
      - {{name: c2, rules: [{{index: {c2}}}]}}
"""


@pytest.fixture(scope="module")
def removal_runs(tmp_path_factory: pytest.TempPathFactory, keras: Any) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("removal_report")
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(L.Conv2D(8, 3, name="c1")(i)))
    x = L.Conv2D(4, 3, name="c2")(x)
    keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D(name="gap")(x))).save(
        folder / "m.keras")
    logs = {}
    for name, c1, c2 in (("one", [3, 5], [0]), ("two", [3, 6], [0, 1]), ("zero", [3, 6], [0, 1]),
                         ("rounded", [2, 3, 5], [0])):
        text = REMOVAL_SPEC.format(c1=c1, c2=c2)
        if name == "zero":  # the same selection, zeroed instead of removed
            text = text.replace("action: remove", "action: zero")
        if name == "rounded":  # 8 - 3 leaves 5: round_to 2 keeps one back
            text = text.replace("action: remove", "action: remove, round_to: 2")
        spec = write_spec(folder, text, f"{name}.yaml")
        kprune("apply", spec, "--audit-log", folder / f"{name}.json", "--output-dir",
               folder / name).expect(0)
        logs[name] = folder / f"{name}.json"
    return logs


def test_report_shows_removed_filters(removal_runs: dict[str, Path]) -> None:
    log = json.loads(removal_runs["one"].read_text())
    removal = log["models"][0]["removal"]
    lines = kprune("report", removal_runs["one"]).expect(0).stdout.splitlines()
    assert "  c1: removed 3, 5 (2 of 8, 25.0%)" in lines
    assert "  c2: 0 (1 of 4, 25.0%)" in lines
    assert f"  removal: params {removal['params_before']} -> {removal['params_after']}, MACs " \
           f"{removal['macs_before']} -> {removal['macs_after']}, probe deviation " \
           f"{removal['probe_deviation']:.3g}" in lines
    out = kprune("report", removal_runs["one"], "--format", "markdown").expect(0).stdout
    assert "| `c1` | removed | 3, 5 | 2 of 8 (25.0%) | 2/2 | `models[0].layers[0].rules[0]`: 3, 5 |" \
        in out
    assert " | 1 | 2 |\n" in out  # the model row: 1 zeroed, 2 removed
    data = json.loads(kprune("report", removal_runs["one"], "--format", "json").expect(0).stdout)
    (model,) = data["models"]
    assert (model["zeroed"], model["removed"]) == (1, 2)
    assert {layer["layer"]: (layer["action"], layer["filters"]) for layer in model["layers"]} == \
        {"c1": ("remove", [3, 5]), "c2": ("zero", [0])}


def test_diff_of_removal_runs(removal_runs: dict[str, Path]) -> None:
    out = kprune("diff", removal_runs["one"], removal_runs["two"]).expect(0).stdout
    assert out == "m c1: +6  -5  (2 -> 2 removed)\nm c2: +1  (1 -> 2 zeroed)\n"
    same = kprune("diff", removal_runs["one"], removal_runs["one"]).expect(0).stdout
    assert same == "no difference in zeroed or removed filters\n"
    turned = kprune("diff", removal_runs["zero"], removal_runs["two"]).expect(0).stdout
    assert turned == "m c1: 3, 6 zeroed -> removed  (2 zeroed, 0 removed -> 0 zeroed, 2 removed)\n"


# --- forged lines: names with control characters ---------------------------------------------------

def test_markdown_cells_stay_cells(runs: dict[str, Path], tmp_path: Path) -> None:
    log = json.loads(runs["old"].read_text())
    evil = "conv|2d\n| x | y |\x1b[31m`tick`<b>"
    log["models"][0]["layers"][0]["layer"] = evil
    for record in log["zeroed"]:
        if record["layer"] == "conv2d_1":
            record["layer"] = evil
    (tmp_path / "log.json").write_text(json.dumps(log))
    out = kprune("report", tmp_path / "log.json", "--format", "markdown").expect(0).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ``")]
    assert rows == ["| `` conv\\|2d\\n\\| x \\| y \\|\\x1b[31m`tick`<b> `` | zeroed | 0, 3-5 | 4 of 8 "
                    "(50.0%) | 4/4 | `models[0].layers[0].rules[0]`: 0, 3-5 |"]
    assert "\x1b" not in out
    text = kprune("report", tmp_path / "log.json").expect(0).stdout.splitlines()
    assert "  conv|2d\\n| x | y |\\x1b[31m`tick`<b>: 0, 3-5 (4 of 8, 50.0%)" in text


def test_report_shows_filters_kept_back_for_round_to(keras: Any,
                                                     removal_runs: dict[str, Path]) -> None:
    # the filter kept back is the selected one of largest l1 (design.md), computed here
    kernel = layer_weights(keras, removal_runs["rounded"].parent / "m.keras")["c1"]["kernel"]
    l1 = np.abs(kernel.astype(np.float64)).reshape(-1, 8).sum(axis=0)
    back = max([2, 3, 5], key=lambda f: l1[f])
    out = kprune("report", removal_runs["rounded"]).expect(0).stdout
    assert f"; kept back for round_to: c1 {back}\n" in out
    md = kprune("report", removal_runs["rounded"], "--format", "markdown").expect(0).stdout
    assert f"; kept back for round_to: c1 {back}\n" in md
