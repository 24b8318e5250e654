"""Pinned inputs: models[].sha256 fails a model whose file changed; `kprune pin` writes the hashes
and changes nothing else in the spec file."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from conftest import REPO, kprune, write_spec

EXAMPLE = REPO / "specs" / "examples" / "digits.keras"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pinned_spec(folder: Path, pin: str) -> Path:
    return write_spec(folder, f"""\
        version: 1
        models:
          - name: m
            path: m.keras
            sha256: {pin}
            layers:
              - {{name: conv1, rules: [{{index: [1]}}]}}
        """)


def test_a_pinned_model_with_its_own_hash_plans_and_applies(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "m.keras")
    spec = pinned_spec(tmp_path, sha(tmp_path / "m.keras").upper())  # either case is a sha256
    kprune("plan", spec, "--backend", "direct").expect(0)
    log = tmp_path / "log.json"
    kprune("apply", spec, "--backend", "direct", "--audit-log", log).expect(0)
    entry = json.loads(log.read_text())["models"][0]
    assert entry["status"] == "ok"
    assert entry["input"]["sha256"] == sha(tmp_path / "m.keras")


def test_a_changed_model_file_fails_with_the_contract_line_and_nothing_is_written(
        tmp_path: Path) -> None:
    model = tmp_path / "m.keras"
    shutil.copy(EXAMPLE, model)
    pin = "3f00" + "0" * 60
    actual = sha(model)
    assert not actual.startswith("3f00")
    spec = pinned_spec(tmp_path, pin)
    line = (f"error: model 'm': m.keras changed since the spec was written (sha256 "
            f"{actual[:4]}..., spec says 3f00...); review its selection, then update sha256 "
            f"(kprune pin)")
    plan = kprune("plan", spec, "--backend", "direct").expect(1)
    assert plan.stderr.splitlines() == [line]
    log = tmp_path / "log.json"
    applied = kprune("apply", spec, "--backend", "direct", "--audit-log", log).expect(1)
    assert line in applied.stderr.splitlines()
    assert not (tmp_path / "pruned" / "m.keras").exists()
    entry = json.loads(log.read_text())["models"][0]
    assert entry["status"] == "failed" and entry["output"] is None
    assert entry["error"] == line.removeprefix("error: ")
    assert entry["input"]["sha256"] == actual


def test_hashes_alike_in_their_first_digits_are_shown_until_they_differ(tmp_path: Path) -> None:
    model = tmp_path / "m.keras"
    shutil.copy(EXAMPLE, model)
    actual = sha(model)
    pin = actual[:6] + ("0" if actual[6] != "0" else "1") + actual[7:]
    plan = kprune("plan", pinned_spec(tmp_path, pin), "--backend", "direct").expect(1)
    assert f"(sha256 {actual[:8]}..., spec says {pin[:8]}...)" in plan.stderr


def test_sha256_must_be_64_hex_digits(tmp_path: Path) -> None:
    spec = pinned_spec(tmp_path, "abc123")
    out = kprune("validate", spec).expect(2)
    assert out.stderr.splitlines() == [
        f"{spec}:5:13: models[0].sha256: 'abc123' must be a sha256: 64 hex digits (kprune pin "
        f"writes the model file's)"]
