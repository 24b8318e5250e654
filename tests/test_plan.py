"""The plan: pure JSON data with every default written out; `kprune plan` reads models, writes nothing."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kprune, write_spec
from kprune_batch.plan import compile_plan
from kprune_batch.spec import read_spec

SPEC = """\
version: 1
defaults: {bias: keep, max_fraction: 0.75}
models:
  - path: m.keras
    output: sub/edited.keras
    layers:
      - {name: conv2d, rules: [{index: [0, 2]}, {l2: {above: 1}}]}
      - {match: "conv2d_*", batchnorm: keep, rules: [{sign: {element: [0, 0, 0], zero: positive}}]}
"""


def test_plan_is_frozen_json_with_defaults_written_out(tmp_path: Path) -> None:
    plan = compile_plan(read_spec(write_spec(tmp_path, SPEC)))
    data = plan.to_json()
    assert json.loads(json.dumps(data)) == data
    (job,) = data["jobs"]
    assert job["output"] == str(tmp_path / "pruned" / "sub" / "edited.keras")
    assert job["format"] == "keras"
    first, second = job["ops"]
    assert first["options"] == {"bias": "keep", "batchnorm": "neutralize", "max_fraction": 0.75,
                                "allow_empty_layer": False, "action": "zero", "coupled": "error",
                                "approximate": False, "round_to": 1}
    assert second["options"]["batchnorm"] == "keep"
    assert [r["loc"] for r in first["rules"]] == ["models[0].layers[0].rules[0]",
                                                  "models[0].layers[0].rules[1]"]
    assert first["rules"][1] == {"loc": "models[0].layers[0].rules[1]", "kind": "l2",
                                 "params": {"above": 1.0}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.jobs[0].name = "x"  # type: ignore[misc]
    assert plan.sha256 == compile_plan(read_spec(tmp_path / "spec.yaml")).sha256


def test_compiling_a_plan_does_not_import_tensorflow(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC)
    code = ("import sys; from kprune_batch.plan import compile_plan; "
            "from kprune_batch.spec import read_spec; compile_plan(read_spec(sys.argv[1])); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_plan_cli_json_and_writes_nothing(tmp_path: Path, small_cnn: Path) -> None:
    shutil.copy(small_cnn, tmp_path / "m.keras")
    spec = write_spec(tmp_path, SPEC.replace("{l2: {above: 1}}", "{l2: {above: 1000}}"))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = kprune("plan", spec, "--format", "json").expect(0)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    data = json.loads(result.stdout)
    (model,) = data["models"]
    assert model["status"] == "ok"
    layers = {entry["layer"]: entry for entry in model["layers"]}
    assert layers["conv2d"]["rules"] == {"models[0].layers[0].rules[0]": [0, 2],
                                         "models[0].layers[0].rules[1]": []}
    assert layers["conv2d"]["filters_total"] == 6
    assert set(layers) == {"conv2d", "conv2d_1"}
    assert data["plan_sha256"] == compile_plan(read_spec(spec)).sha256
