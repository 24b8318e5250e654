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


# --- kprune pin ------------------------------------------------------------------------------

PIN_SPEC = (
    "# yaml-language-server: $schema=../schema/spec.schema.json\n"
    "version: 1   # the only version\n"
    "output_dir: out\n"
    "models:\n"
    "  - name: block      # a block-style model without a pin\n"
    "    path: a.keras  # the file\n"
    "    layers:\n"
    "      - {name: c, rules: [{index: [1]}]}\n"
    "  - {name: flow, path: \"b.h5\", layers: [{name: c, rules: [{index: [0]}]}]}   # flow\n"
    "  - path: c.keras\n"
    "    sha256: '{OLD}'   # pinned before, quoted\n"
    "    layers: [{match: \"conv*\", rules: [{l1: {below: 0.5}}]}]\n"
    "  - layers:\n"
    "      - name: c\n"
    "        rules: [{index: [2]}]   # path below the layers\n"
    "    name: last\n"
    "    path: d.keras")  # no final newline


def pin_folder(tmp_path: Path, old: str) -> Path:
    for name, data in [("a.keras", b"a"), ("b.h5", b"b"), ("c.keras", b"c"), ("d.keras", b"d")]:
        (tmp_path / name).write_bytes(data)
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(PIN_SPEC.replace("{OLD}", old).encode())
    return spec


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pin_writes_each_hash_and_keeps_every_other_byte(tmp_path: Path) -> None:
    spec = pin_folder(tmp_path, "0" * 63 + "a")
    spec.chmod(0o640)
    out = kprune("pin", spec).expect(0)
    assert out.stdout.splitlines() == [
        f"{spec}: model 'block' pinned: sha256 {h(b'a')[:12]}... (a.keras)",
        f"{spec}: model 'flow' pinned: sha256 {h(b'b')[:12]}... (b.h5)",
        f"{spec}: model 'c' changed: sha256 {'0' * 12}... -> {h(b'c')[:12]}... (c.keras); "
        f"review its selection",
        f"{spec}: model 'last' pinned: sha256 {h(b'd')[:12]}... (d.keras)"]
    expected = (PIN_SPEC
                .replace("    path: a.keras  # the file\n",
                         f"    path: a.keras  # the file\n    sha256: {h(b'a')}\n")
                .replace('path: "b.h5", ', f'path: "b.h5", sha256: {h(b"b")}, ')
                .replace("'{OLD}'", f"'{h(b'c')}'")
                .replace("    path: d.keras", f"    path: d.keras\n    sha256: {h(b'd')}"))
    assert spec.read_bytes() == expected.encode()
    assert spec.stat().st_mode & 0o777 == 0o640
    kprune("validate", spec).expect(0)
    # a second pin finds nothing to do and leaves the file alone (same inode, same time stamp)
    before = spec.stat()
    assert kprune("pin", spec).expect(0).stdout.splitlines() == [f"{spec}: no model changed"]
    after = spec.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_pin_keeps_crlf_line_endings_and_a_double_quoted_pin(tmp_path: Path) -> None:
    (tmp_path / "m.keras").write_bytes(b"m")
    text = ("version: 1\r\nmodels:\r\n  - path: m.keras # c\r\n    layers: [{name: c, rules: "
            "[{index: [0]}]}]\r\n  - path: n.keras\r\n    sha256: \"{H}\"\r\n    layers: [{name: "
            "c, rules: [{index: [0]}]}]\r\n")
    (tmp_path / "n.keras").write_bytes(b"n")
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(text.replace("{H}", "F" * 64).encode())
    kprune("pin", spec).expect(0)
    assert spec.read_bytes() == (text.replace("# c\r\n", f"# c\r\n    sha256: {h(b'm')}\r\n")
                                 .replace("{H}", h(b"n")).encode())


def test_pin_a_missing_model_file_exits_1_and_pins_the_others(tmp_path: Path) -> None:
    spec = pin_folder(tmp_path, "0" * 64)
    (tmp_path / "b.h5").unlink()
    out = kprune("pin", spec).expect(1)
    assert out.stderr.splitlines() == [
        f"error: {spec}: model 'flow': input file {tmp_path / 'b.h5'} does not exist; its "
        f"sha256 is left as it was"]
    text = spec.read_text()
    assert 'path: "b.h5", layers' in text  # untouched
    assert f"    sha256: {h(b'a')}\n" in text and f"'{h(b'c')}'" in text


def test_pin_an_invalid_spec_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    spec = pin_folder(tmp_path, "0" * 64)
    bad = spec.read_text().replace("output_dir: out", "output_dir: out\nsurprise: 1")
    spec.write_text(bad)
    other = write_spec(tmp_path, """\
        version: 1
        models: [{path: a.keras, layers: [{name: c, rules: [{index: [1]}]}]}]
        """, name="other.yaml")
    out = kprune("pin", spec, other).expect(2)
    assert out.stderr.splitlines() == [
        f"{spec}:4:1: surprise: unknown key 'surprise' (allowed: defaults, models, output_dir, "
        f"version)"]
    assert spec.read_text() == bad
    assert other.read_text().count(h(b"a")) == 1  # the valid spec is still pinned


def test_pin_refuses_a_model_whose_path_comes_from_a_merge_key(tmp_path: Path) -> None:
    (tmp_path / "a.keras").write_bytes(b"a")
    text = ("version: 1\nmodels:\n  - &base {path: a.keras, layers: [{name: c, rules: "
            "[{index: [1]}]}]}\n  - <<: *base\n    name: two\n    output: two.keras\n"
            "  - {name: three, <<: *base, output: three.keras}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    out = kprune("pin", spec).expect(1)
    assert out.stderr.splitlines() == [
        f"error: {spec}: models[0] is written through a YAML alias; add its sha256 by hand; "
        f"nothing was written"]
    assert spec.read_text() == text
