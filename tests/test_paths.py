"""Paths a spec repository or a command line can carry: links, FIFOs, devices and names that try to
make kprune destroy an input, write outside its output folder, lose a log or hang."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import kprune, write_spec
from kprune_batch.files import sha256_file

TWO_MODELS = """\
version: 1
models:
  - path: {first}
    layers: [{{name: conv2d, rules: [{{index: [0]}}]}}]
  - path: {second}
    layers: [{{name: conv2d, rules: [{{index: [1]}}]}}]
"""
ONE_MODEL = ("version: 1\nmodels:\n  - path: m.keras\n{extra}"
             "    layers: [{{name: conv2d, rules: [{{index: [0]}}]}}]\n")


def _models(folder: Path, small_cnn: Path, *names: str) -> dict[str, bytes]:
    """Copies of small_cnn under `names`; returns their bytes to compare with afterwards."""
    out = {}
    for name in names:
        shutil.copy(small_cnn, folder / name)
        out[name] = (folder / name).read_bytes()
    return out


def _unchanged(folder: Path, before: dict[str, bytes]) -> None:
    for name, data in before.items():
        assert not (folder / name).is_symlink() and (folder / name).read_bytes() == data, name


# --- the lock file -------------------------------------------------------------------------------

def _make_lock(kind: str, lock: Path, folder: Path) -> None:
    if kind == "symlink to an input":
        lock.symlink_to(folder / "m.keras")
    elif kind == "dangling symlink":
        lock.symlink_to(folder / "created-through-the-link")
    elif kind == "hard link to an input":
        os.link(folder / "m.keras", lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()


LOCK_REFUSALS = {
    "symlink to an input": "is a symbolic link (kprune never follows one there)",
    "dangling symlink": "is a symbolic link (kprune never follows one there)",
    "hard link to an input": "has another name too (a hard link to another file)",
    "fifo": "is a FIFO (named pipe), not a regular file",
    "directory": "is a folder, not a regular file",
}


@pytest.mark.parametrize("kind", list(LOCK_REFUSALS))
def test_a_planted_lock_file_is_refused_and_never_written(tmp_path: Path, small_cnn: Path,
                                                          kind: str) -> None:
    """A `.kprune.lock` that arrives with a spec repository: a link to an input model must
    not truncate it. The run refuses with one line (exit 1), skips every model and still
    writes its log."""
    before = _models(tmp_path, small_cnn, "m.keras")
    spec = write_spec(tmp_path, ONE_MODEL.format(extra=""))
    (tmp_path / "pruned").mkdir()
    lock = tmp_path / "pruned" / ".kprune.lock"
    _make_lock(kind, lock, tmp_path)
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json", timeout=120).expect(1)
    message = (f"the lock file {lock} {LOCK_REFUSALS[kind]}; remove it and run again")
    assert result.stderr == f"error: {message}\n"
    _unchanged(tmp_path, before)
    assert not (tmp_path / "created-through-the-link").exists()
    assert not (tmp_path / "pruned" / "m.keras").exists()
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["status"] == "failed"
    assert [(m["status"], m["error"]) for m in log["models"]] == [("skipped", message)]


def test_an_ordinary_lock_file_is_reused(tmp_path: Path, small_cnn: Path) -> None:
    """kprune's own lock from an earlier run stays and is taken again (and holds this pid)."""
    _models(tmp_path, small_cnn, "m.keras")
    spec = write_spec(tmp_path, ONE_MODEL.format(extra=""))
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / ".kprune.lock").write_text("12345\n")
    kprune("apply", spec).expect(0)
    assert (tmp_path / "pruned" / "m.keras").is_file()
    assert (tmp_path / "pruned" / ".kprune.lock").read_text().strip().isdigit()


# --- --audit-log -------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["input", "link to the input", "output", "spec", "lock"])
def test_audit_log_at_an_input_or_output_is_refused(tmp_path: Path, small_cnn: Path,
                                                   target: str) -> None:
    """A log path that is (or resolves to) a file of the run would replace it: refused as an
    invalid command line (exit 2, like click's usage errors; no model opened, no log)."""
    before = _models(tmp_path, small_cnn, "m.keras")
    spec = write_spec(tmp_path, ONE_MODEL.format(extra=""))
    (tmp_path / "pruned").mkdir()
    earlier_output = b"output of an earlier run"
    (tmp_path / "pruned" / "m.keras").write_bytes(earlier_output)
    (tmp_path / "pruned" / ".kprune.lock").write_text("")
    log, what = {
        "input": (tmp_path / "m.keras", f"the input of model 'm' ({tmp_path / 'm.keras'})"),
        "link to the input": (tmp_path / "log.json",
                              f"the input of model 'm' ({tmp_path / 'm.keras'})"),
        "output": (tmp_path / "pruned" / "m.keras",
                   f"the output of model 'm' ({tmp_path / 'pruned' / 'm.keras'})"),
        "spec": (spec, f"the spec file ({spec})"),
        "lock": (tmp_path / "pruned" / ".kprune.lock",
                 f"the lock file ({tmp_path / 'pruned' / '.kprune.lock'})"),
    }[target]
    if target == "link to the input":
        log.symlink_to(tmp_path / "m.keras")
    spec_text = spec.read_text()
    result = kprune("apply", spec, "--audit-log", log, timeout=120).expect(2)
    assert result.stderr == (f"error: --audit-log {log} is {what}; kprune never writes a log "
                             f"over a file the run reads or writes: choose another path\n")
    assert result.stdout == ""
    _unchanged(tmp_path, before)
    assert (tmp_path / "pruned" / "m.keras").read_bytes() == earlier_output
    assert spec.read_text() == spec_text
    assert not (tmp_path / "pruned" / "audit").exists()


def _batch(folder: Path, small_cnn: Path, n: int, output_dir: str) -> Path:
    lines = ["version: 1", f"output_dir: {output_dir}", "models:"]
    for i in range(n):
        if not (folder / f"m{i}.keras").exists():
            shutil.copy(small_cnn, folder / f"m{i}.keras")
        lines += [f"  - path: m{i}.keras", "    layers: [{name: conv2d, rules: [{index: [0]}]}]"]
    return write_spec(folder, "\n".join(lines) + "\n", name=f"{output_dir}.yaml")


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_a_log_another_run_is_writing_is_not_replaced(tmp_path: Path, small_cnn: Path) -> None:
    """Two real runs given the same --audit-log: the first is stopped (SIGSTOP) in the middle
    of its batch, so the second certainly runs while the first holds the log; the second
    refuses with one line and writes its log under its own output folder instead; the first,
    resumed, writes the shared path. Both logs exist and each names its own spec."""
    first = _batch(tmp_path, small_cnn, 4, "one")
    second = _batch(tmp_path, small_cnn, 1, "two")
    shared = tmp_path / "shared.json"
    proc = subprocess.Popen([sys.executable, "-m", "kprune_batch", "apply", str(first),
                             "--audit-log", str(shared)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "one" / "m0.keras", proc)
        proc.send_signal(signal.SIGSTOP)
        result = kprune("apply", second, "--audit-log", shared, timeout=120).expect(1)
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    sidecar = tmp_path / ".shared.json.kprune.lock"
    message = (f"another kprune apply is writing the audit log {shared} (lock {sidecar}); "
               f"run again when it has finished, or give another --audit-log")
    assert result.stderr == f"error: {message}\n"
    (own,) = (tmp_path / "two" / "audit").iterdir()
    assert result.stdout == f"skipped m0: {message}\n0 ok, 0 failed, 1 skipped\naudit log: {own}\n"
    assert not (tmp_path / "two" / "m0.keras").exists()
    theirs = json.loads(own.read_text())
    assert theirs["spec"]["path"] == str(second) and theirs["status"] == "failed"
    ours = json.loads(shared.read_text())
    assert ours["spec"]["path"] == str(first) and ours["status"] == "ok"
    assert f"audit log: {shared}\n" in out


def test_a_held_log_lock_is_respected(tmp_path: Path, small_cnn: Path) -> None:
    """The same with the lock held by this test: deterministic, and the log already at the
    shared path (another run's) keeps its bytes."""
    spec = _batch(tmp_path, small_cnn, 1, "pruned")
    shared = tmp_path / "shared.json"
    shared.write_text('{"written by": "another run"}\n')
    with open(tmp_path / ".shared.json.kprune.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        kprune("apply", spec, "--audit-log", shared, timeout=120).expect(1)
    assert shared.read_text() == '{"written by": "another run"}\n'
    assert not (tmp_path / "pruned" / "m0.keras").exists()
    (own,) = (tmp_path / "pruned" / "audit").iterdir()
    assert json.loads(own.read_text())["models"][0]["status"] == "skipped"


# --- stale temp files --------------------------------------------------------------------------

def test_stale_temp_cleanup_spares_inputs_and_links(tmp_path: Path, small_cnn: Path) -> None:
    """An input named like an old temp file of an output is read, not deleted; a link with a
    temp file's name is not followed; only kprune's own leftover is removed."""
    out = tmp_path / "pruned"
    out.mkdir()
    decoy = ".m.keras.0123456789abcdef.kprune-tmp.keras"  # exactly kprune's own pattern
    shutil.copy(small_cnn, out / decoy)
    before = {decoy: (out / decoy).read_bytes()}
    before.update(_models(tmp_path, small_cnn, "m.keras", "other.keras"))
    link = out / ".m.keras.fedcba9876543210.kprune-tmp.keras"
    link.symlink_to(tmp_path / "other.keras")
    old_style = out / ".m.keras.abcd1234.tmp.keras"  # another program's name: not kprune's
    old_style.write_bytes(b"not ours")
    leftover = out / ".m.keras.00112233445566aa.kprune-tmp.keras.weights.h5"
    leftover.write_bytes(b"PK half")
    spec = write_spec(tmp_path, TWO_MODELS.format(first="m.keras", second=f"pruned/{decoy}")
                      .replace("    layers: [{name: conv2d, rules: [{index: [1]}]}]",
                               "    output: decoy.keras\n"
                               "    layers: [{name: conv2d, rules: [{index: [1]}]}]"))
    kprune("apply", spec, timeout=120).expect(0)
    _unchanged(tmp_path, {k: v for k, v in before.items() if k != decoy})
    assert (out / decoy).read_bytes() == before[decoy]
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "other.keras")
    assert old_style.read_bytes() == b"not ours"
    assert not leftover.exists()
    assert (out / "m.keras").is_file() and (out / "decoy.keras").is_file()


# --- outputs stay inside output_dir ------------------------------------------------------------

@pytest.mark.parametrize("output", ["../../x.keras", "sub/../../x.keras", "/tmp/x.keras"])
def test_output_outside_output_dir_is_invalid(tmp_path: Path, output: str) -> None:
    spec = write_spec(tmp_path, ONE_MODEL.format(extra=f"    output: {output}\n"))
    result = kprune("validate", spec).expect(2)
    assert result.stderr == (f"{spec}:4:13: models[0].output: output '{output}' is outside "
                             f"output_dir: give a path relative to output_dir, without '..'\n")


def test_output_through_a_link_out_of_output_dir_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "pruned").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "pruned" / "sub").symlink_to(tmp_path / "elsewhere")
    spec = write_spec(tmp_path, ONE_MODEL.format(extra="    output: sub/m.keras\n"))
    result = kprune("validate", spec).expect(2)
    assert result.stderr == (f"{spec}:4:13: models[0].output: output 'sub/m.keras' resolves to "
                             f"{tmp_path / 'elsewhere' / 'm.keras'}, outside output_dir "
                             f"{tmp_path / 'pruned'} (a link in the output folder)\n")


def test_output_inside_a_subfolder_is_fine(tmp_path: Path, small_cnn: Path) -> None:
    _models(tmp_path, small_cnn, "m.keras")
    spec = write_spec(tmp_path, ONE_MODEL.format(extra="    output: a/./b/../m2.keras\n"))
    kprune("apply", spec, timeout=120).expect(0)
    assert (tmp_path / "pruned" / "a" / "m2.keras").is_file()


def test_apply_refuses_an_output_outside_too(tmp_path: Path, small_cnn: Path) -> None:
    before = _models(tmp_path, small_cnn, "m.keras")
    (tmp_path / "cfg").mkdir()
    spec = write_spec(tmp_path / "cfg", ONE_MODEL.replace("m.keras", "../m.keras").format(
        extra="    output: ../../outside.keras\n"))
    result = kprune("apply", spec, "--output-dir", tmp_path / "out", timeout=120).expect(2)
    assert result.stderr.startswith(f"{spec}:4:13: models[0].output: output "
                                    f"'../../outside.keras' is outside output_dir")
    _unchanged(tmp_path, before)
    assert not (tmp_path.parent / "outside.keras").exists()
    assert not (tmp_path / "outside.keras").exists()


# --- FIFOs, devices, folders as files ----------------------------------------------------------

def _odd(kind: str, path: Path) -> str:
    if kind == "fifo":
        os.mkfifo(path)
        return "a FIFO (named pipe)"
    if kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
        return "a character device (a link to /dev/zero)"
    path.mkdir()
    return "a folder"


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "folder"])
def test_odd_model_path_fails_that_model_only(tmp_path: Path, small_cnn: Path, kind: str) -> None:
    """Never a hang: the odd model fails with one line, the batch goes on, the log is written."""
    before = _models(tmp_path, small_cnn, "good.keras")
    what = _odd(kind, tmp_path / "odd.keras")
    spec = write_spec(tmp_path, TWO_MODELS.format(first="odd.keras", second="good.keras"))
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json", timeout=120).expect(1)
    assert result.stderr == (f"error: model 'odd': input {tmp_path / 'odd.keras'} is {what}, "
                             f"not a model file\n")
    log = json.loads((tmp_path / "log.json").read_text())
    assert [m["status"] for m in log["models"]] == ["failed", "ok"]
    assert log["models"][0]["input"]["sha256"] is None
    _unchanged(tmp_path, before)
    kprune("plan", spec, timeout=120).expect(1)


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])  # a folder: click's usage error
def test_odd_audit_log_path_is_one_line(tmp_path: Path, kind: str) -> None:
    what = _odd(kind, tmp_path / "log.json")
    for command in ("verify", "report"):
        result = kprune(command, tmp_path / "log.json", timeout=60).expect(1)
        assert result.stderr == (f"error: {tmp_path / 'log.json'}: cannot read audit log: "
                                 f"it is {what}, not a regular file\n")


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_verify_never_hangs_on_a_file_the_log_names(tmp_path: Path, small_cnn: Path,
                                                    kind: str) -> None:
    _models(tmp_path, small_cnn, "m.keras")
    spec = write_spec(tmp_path, ONE_MODEL.format(extra=""))
    kprune("apply", spec, "--audit-log", tmp_path / "log.json", timeout=120).expect(0)
    out = tmp_path / "pruned" / "m.keras"
    out.unlink()
    what = _odd(kind, out)
    result = kprune("verify", tmp_path / "log.json", timeout=60).expect(1)
    assert result.stdout == (f"MISMATCH m: output file {out} cannot be read: it is {what}, "
                             f"not a regular file\n")


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_odd_spec_path_is_one_line(tmp_path: Path, kind: str) -> None:
    """validate runs in git hooks: a FIFO or /dev/zero given as the spec must not hang it."""
    what = _odd(kind, tmp_path / "spec.yaml")
    for command in ("validate", "plan", "apply"):
        result = kprune(command, tmp_path / "spec.yaml", timeout=60).expect(2)
        assert result.stderr == (f"{tmp_path / 'spec.yaml'}: cannot read spec file: it is "
                                 f"{what}, not a regular file\n")
