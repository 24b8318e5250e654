"""`kprune report` and `kprune diff` read only the audit log (no TensorFlow) and say what changed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kprune, write_spec

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
    assert "| model | status | input | output | zeroed |" in out
    assert f"| m | ok | `{runs['folder'] / 'm.keras'}` | `{runs['folder'] / 'pruned' / 'm.keras'}` " \
           f"| 5 |" in out
    assert "| `conv2d_1` | 0, 3-5 | 4 of 8 (50.0%) | 4/4 | `models[0].layers[0].rules[0]`: 0, 3-5 |" \
        in out


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
