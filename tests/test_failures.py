"""Batch jobs never lose data: bad model files, write faults, signals, concurrent runs, fuzzed specs."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import kprune, layer_weights, write_spec
from kprune_batch.commands.validate import validate
from kprune_batch.errors import SpecError
from kprune_batch.files import sha256_file
from kprune_batch.spec import parse_spec

ONE_MODEL = "version: 1\nmodels:\n  - path: {path}\n    layers: [{{name: conv2d, rules: [{{index: [0]}}]}}]\n"


def run_one(folder: Path, path: str) -> tuple[Any, dict]:
    spec = write_spec(folder, ONE_MODEL.format(path=path))
    result = kprune("apply", spec, "--audit-log", folder / "log.json").expect(1)
    return result, json.loads((folder / "log.json").read_text())


@pytest.fixture
def lambda_model(keras: Any, tmp_path: Path) -> Path:
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 1, name="conv2d")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    path = tmp_path / "lam.keras"
    keras.Model(inputs, x).save(path)
    return path


def test_truncated_keras_file(tmp_path: Path, small_cnn: Path) -> None:
    data = small_cnn.read_bytes()
    (tmp_path / "m.keras").write_bytes(data[: len(data) // 2])
    result, log = run_one(tmp_path, "m.keras")
    assert result.stderr == (f"error: {tmp_path / 'm.keras'}: model 'm': the file is not a "
                             f"readable Keras model (a zip archive cut short: no zip end "
                             f"record); check the file is a complete .keras or .h5 model\n")
    assert log["models"][0]["status"] == "failed" and log["models"][0]["output"] is None


def _without_member(src: Path, dest: Path, member: str | None) -> None:
    """dest: the zip at src with `member` left out (None: every member, named dest)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dest, "w") as zo:
        for name in zi.namelist():
            if name != member:
                zo.writestr(name, zi.read(name))


@pytest.mark.parametrize("name, member, message", [
    ("m.h5", None, "not an HDF5 file: it is a zip archive (a .keras model); name it .keras "
                   "(Keras reads a .h5 file only as HDF5)"),
    ("m.keras", "config.json", "the .keras archive has no 'config.json' member (not a complete "
                               "Keras model); re-save it with keras.saving.save_model"),
    ("m.keras", "model.weights.h5", "the .keras archive has no 'model.weights.h5' member (not "
                                    "a complete Keras model); re-save it with "
                                    "keras.saving.save_model"),
])
def test_an_archive_that_is_not_a_complete_model_says_what_to_do(
        tmp_path: Path, small_cnn: Path, name: str, member: str | None, message: str) -> None:
    """A .keras zip named .h5 and a .keras missing one of the members Keras opens each fail
    the model with one line that says what to do, the input untouched, nothing written."""
    _without_member(small_cnn, tmp_path / name, member)
    before = (tmp_path / name).read_bytes()
    result, log = run_one(tmp_path, name)
    assert result.stderr == f"error: {tmp_path / name}: model 'm': {message}\n", result
    assert log["models"][0]["status"] == "failed"
    assert (tmp_path / name).read_bytes() == before
    assert [p.name for p in (tmp_path / "pruned").iterdir()] == [".kprune.lock"]


def test_flipped_weight_byte_is_not_copied_on(keras: Any, tmp_path: Path,
                                              small_cnn: Path) -> None:
    """A weight byte that no longer matches the zip's CRC-32 (bit rot) fails the model; the
    direct backend's copy checks the CRC as it reads instead of writing a fresh one."""
    data = bytearray(small_cnn.read_bytes())
    needle = layer_weights(keras, small_cnn)["logits"]["kernel"].tobytes()
    at = bytes(data).find(needle)
    assert at > 0 and bytes(data).find(needle, at + 1) < 0
    data[at + 5] ^= 0x10
    (tmp_path / "m.keras").write_bytes(bytes(data))
    result, log = run_one(tmp_path, "m.keras")
    assert result.stderr.startswith("error: model 'm': ")
    assert "does not match the zip directory (the file is corrupt); restore the file from a " \
           "good copy\n" in result.stderr
    assert log["models"][0]["status"] == "failed"
    assert log["models"][0]["input"]["sha256"] == sha256_file(tmp_path / "m.keras")
    assert not (tmp_path / "pruned" / "m.keras").exists()
    assert [p.name for p in (tmp_path / "pruned").iterdir()] == [".kprune.lock"]  # no temp file


@pytest.mark.parametrize("name, content", [
    ("garbage.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 100),
    ("text.keras", b"this is not a model\n"),
])
def test_corrupt_or_foreign_files(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    result, log = run_one(tmp_path, name)
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: {tmp_path / name}: model '{Path(name).stem}': ")
    assert "Traceback" not in result.stderr
    assert (tmp_path / name).read_bytes() == content
    assert not (tmp_path / "pruned" / name).exists()


def test_weights_only_h5_is_not_a_model(keras: Any, tmp_path: Path, small_cnn: Path) -> None:
    keras.saving.load_model(str(small_cnn)).save_weights(tmp_path / "w.weights.h5")
    shutil.copy(tmp_path / "w.weights.h5", tmp_path / "w.h5")
    result, _ = run_one(tmp_path, "w.h5")
    assert result.stderr.startswith(f"error: {tmp_path / 'w.h5'}: model 'w': ")
    assert len(result.stderr.splitlines()) == 1


def test_lambda_layer_is_refused_in_safe_mode(tmp_path: Path, lambda_model: Path) -> None:
    result, log = run_one(tmp_path, "lam.keras")
    assert result.stderr == (
        f"error: {lambda_model}: model 'lam': the model contains a Lambda layer, whose Python "
        f"code Keras refuses to load in safe mode; kprune always loads models with "
        f"safe_mode=True; replace the Lambda with a registered layer\n")


def test_custom_layer_class_is_refused(keras: Any, tmp_path: Path) -> None:
    @keras.saving.register_keras_serializable(package="kprune_tests")
    class Twice(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return x * 2.0

    inputs = keras.Input((4, 4, 1))
    x = Twice(name="twice")(keras.layers.Conv2D(2, 1, name="conv2d")(inputs))
    keras.Model(inputs, x).save(tmp_path / "custom.keras")
    result, _ = run_one(tmp_path, "custom.keras")
    assert result.stderr.startswith(f"error: {tmp_path / 'custom.keras'}: model 'custom': the "
                                    f"model uses a layer class Keras does not know (")
    assert result.stderr.endswith("; kprune loads only built-in Keras layers\n")


def test_nan_weights_fail_threshold_rules(keras: Any, tmp_path: Path, small_cnn: Path) -> None:
    model = keras.saving.load_model(str(small_cnn))
    kernel = model.get_layer("conv2d").kernel.numpy()
    kernel[0, 0, 0, 2] = np.nan
    model.get_layer("conv2d").kernel.assign(kernel)
    model.save(tmp_path / "nan.keras")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: nan.keras\n"
                                "    layers: [{name: conv2d, rules: [{mean: {below: 0}}]}]\n")
    result = kprune("apply", spec).expect(1)
    assert result.stderr == (
        "error: model 'nan', layer 'conv2d': models[0].layers[0].rules[0]: filter 2 has NaN or "
        "infinite weights (1 filter(s) affected); a 'mean' rule cannot compare them; fix the "
        "model, or select those filters with an 'index' rule\n")


@pytest.mark.parametrize("backend", ["auto", "keras"])
def test_index_rule_zeroes_nan_filters_and_logs_them(keras: Any, tmp_path: Path, small_cnn: Path,
                                                     backend: str) -> None:
    """The refusal above says to select NaN/inf filters with an index rule: that run must write
    its output *and* its log (the statistics of such a slice are not JSON numbers: null), and the
    written file must hold zeros exactly there and the input's bits everywhere else."""
    model = keras.saving.load_model(str(small_cnn))
    kernel = model.get_layer("conv2d").kernel.numpy()
    kernel[0, 0, 0, 2] = np.nan
    kernel[1, 1, 1, 4] = np.inf
    model.get_layer("conv2d").kernel.assign(kernel)
    model.save(tmp_path / "nan.keras")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: nan.keras\n"
                                "    layers: [{name: conv2d, rules: [{index: [2, 3, 4]}]}]\n")
    log_path = tmp_path / "log.json"
    kprune("apply", spec, "--audit-log", log_path, "--backend", backend).expect(0)
    log = json.loads(log_path.read_text())
    assert log["status"] == "ok"
    stats = {r["filter"]: r["stats"] for r in log["zeroed"]}
    assert sorted(stats) == [2, 3, 4]
    for f in (2, 4):
        assert stats[f] == {"mean": None, "abs_mean": None, "l1": None, "l2": None}
    slice3 = kernel[..., 3].astype(np.float64)
    assert stats[3]["l1"] == pytest.approx(np.abs(slice3).sum(), rel=1e-12)
    before = layer_weights(keras, tmp_path / "nan.keras")
    after = layer_weights(keras, tmp_path / "pruned" / "nan.keras")
    expected_kernel = before["conv2d"]["kernel"].copy()
    expected_kernel[..., [2, 3, 4]] = 0
    expected_bias = before["conv2d"]["bias"].copy()
    expected_bias[[2, 3, 4]] = 0
    for layer, variables in before.items():
        for name, value in variables.items():
            want = {("conv2d", "kernel"): expected_kernel,
                    ("conv2d", "bias"): expected_bias}.get((layer, name), value)
            assert after[layer][name].tobytes() == want.tobytes(), (layer, name)
    kprune("verify", log_path).expect(0)
    kprune("report", log_path, "--format", "html").expect(0)
    # verify recomputes the stats: null only where the slice is not finite
    want3 = float(np.abs(slice3).sum())
    for f, value, line in [(3, None, f"the log's l1 null is not the input slice's {want3:.6g}"),
                           (2, 1.5, "the log's l1 1.5 is not the input slice's null")]:
        tampered = json.loads(log_path.read_text())
        next(r for r in tampered["zeroed"] if r["filter"] == f)["stats"]["l1"] = value
        (tmp_path / "tampered.json").write_text(json.dumps(tampered))
        result = kprune("verify", tmp_path / "tampered.json").expect(1)
        assert [x for x in result.stdout.splitlines() if x.startswith("MISMATCH")] == [
            f"MISMATCH nan: layer 'conv2d' filter {f}: {line}"], result


def test_a_kept_batchnorm_with_nan_statistics_still_logs(keras: Any, tmp_path: Path,
                                                        small_cnn: Path) -> None:
    """batchnorm: keep behind a zeroed filter whose BN channel holds a NaN moving mean: the
    channel's constant output is NaN, which strict JSON cannot hold; the run must not crash
    after writing the output (it did: no log), the record says constant null and why."""
    model = keras.saving.load_model(str(small_cnn))
    mean = model.get_layer("bn").moving_mean.numpy()
    mean[3] = np.nan
    model.get_layer("bn").moving_mean.assign(mean)
    model.save(tmp_path / "m.keras")
    spec = write_spec(tmp_path, "version: 1\nmodels:\n  - path: m.keras\n    layers: [{name: "
                                "conv2d_1, batchnorm: keep, rules: [{index: [2, 3]}]}]\n")
    log_path = tmp_path / "log.json"
    kprune("apply", spec, "--audit-log", log_path).expect(0)
    log = json.loads(log_path.read_text())
    records = {r["filter"]: r for r in log["zeroed"]}
    bn = layer_weights(keras, tmp_path / "m.keras")["bn"]
    want2 = float(bn["gamma"][2]) * (0.0 - float(bn["moving_mean"][2])) / np.sqrt(
        float(bn["moving_variance"][2]) + 1e-3) + float(bn["beta"][2])
    assert records[2]["silent"] is False
    assert records[2]["constant"] == pytest.approx(want2, rel=1e-6)
    assert records[3]["silent"] is False and records[3]["constant"] is None
    assert records[3]["notes"] == ["the channel's constant output is nan, not a finite number "
                                   "(recorded as constant: null)"]
    kprune("verify", log_path).expect(0)
    text = kprune("report", log_path).expect(0).stdout
    assert f"    not silent: 2 (constant {records[2]['constant']}), 3 (constant not finite (see " \
           f"the record's notes))\n" in text, text
    markdown = kprune("report", log_path, "--format", "markdown").expect(0).stdout
    assert f"(not: 2→{records[2]['constant']}, 3→not finite (see the record's notes))" \
        in markdown, markdown
    page = kprune("report", log_path, "--format", "html").expect(0).stdout
    assert "not silent: constant output not finite (see the record&#x27;s notes)" in page


def test_output_folder_that_cannot_be_created(tmp_path: Path, small_cnn: Path) -> None:
    shutil.copy(small_cnn, tmp_path / "m.keras")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    spec = write_spec(tmp_path, ONE_MODEL.format(path="m.keras").replace(
        "version: 1\n", "version: 1\noutput_dir: blocker/out\n"))
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(1)
    assert result.stderr == (f"error: cannot use output folder {tmp_path / 'blocker' / 'out'}: "
                             f"Not a directory\n")


@pytest.mark.parametrize("backend", ["keras", "direct"])
def test_disk_full_leaves_nothing_under_the_final_name(tmp_path: Path, small_cnn: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        backend: str) -> None:
    """Fault injected in the writer: half a file is written, then ENOSPC (for the direct backend
    inside the pipelined copy, whose writer thread must hand the error back, not hang)."""
    from kprune_batch import files
    from kprune_batch.backends import keras_backend
    from kprune_batch.executor import open_direct, open_keras, run_job
    from kprune_batch.plan import compile_plan
    from kprune_batch.spec import read_spec

    shutil.copy(small_cnn, tmp_path / "m.keras")
    (tmp_path / "pruned").mkdir()
    old = tmp_path / "pruned" / "m.keras"
    old.write_bytes(b"output of an earlier run")

    def full_disk(self: Any, tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    class FullDisk(io.FileIO):
        def write(self, data: Any) -> int:
            super().write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_full(path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return FullDisk(path, mode) if mode == "wb" else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(keras_backend.KerasModelWeights, "save", full_disk)
    monkeypatch.setattr(files, "open", open_full, raising=False)
    (job,) = compile_plan(read_spec(write_spec(tmp_path, ONE_MODEL.format(path="m.keras")))).jobs
    outcome = run_job(job, opener=open_keras if backend == "keras" else open_direct)
    assert outcome.backend == backend
    assert outcome.status == "failed"
    assert outcome.error == (f"model 'm': cannot write output {old}: the disk is full; nothing "
                             f"was written under the output's name; check the output folder and "
                             f"free space")
    assert old.read_bytes() == b"output of an earlier run"
    assert sorted(p.name for p in old.parent.iterdir()) == ["m.keras"]


def test_existing_output_is_replaced(tmp_path: Path, small_cnn: Path, keras: Any) -> None:
    shutil.copy(small_cnn, tmp_path / "m.keras")
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "m.keras").write_bytes(b"stale")
    kprune("apply", write_spec(tmp_path, ONE_MODEL.format(path="m.keras"))).expect(0)
    assert layer_weights(keras, tmp_path / "pruned" / "m.keras")["conv2d"]["kernel"][..., 0].max() == 0
    leftovers = [p.name for p in (tmp_path / "pruned").iterdir() if p.name.startswith(".m.keras")]
    assert leftovers == []


def test_a_second_run_does_not_interleave(tmp_path: Path, small_cnn: Path) -> None:
    shutil.copy(small_cnn, tmp_path / "m.keras")
    spec = write_spec(tmp_path, ONE_MODEL.format(path="m.keras"))
    (tmp_path / "pruned").mkdir()
    with open(tmp_path / "pruned" / ".kprune.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running `kprune apply` holds it
        result = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(1)
    assert result.stderr == (f"error: another kprune apply is writing to {tmp_path / 'pruned'} "
                             f"(lock {tmp_path / 'pruned' / '.kprune.lock'}); run again when it "
                             f"has finished\n")
    assert not (tmp_path / "pruned" / "m.keras").exists()
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["status"] == "failed" and log["models"][0]["status"] == "skipped"


def _batch(tmp_path: Path, small_cnn: Path, n: int) -> Path:
    lines = ["version: 1", "models:"]
    for i in range(n):
        shutil.copy(small_cnn, tmp_path / f"m{i}.keras")
        lines += [f"  - path: m{i}.keras", "    layers: [{name: conv2d, rules: [{index: [0]}]}]"]
    return write_spec(tmp_path, "\n".join(lines) + "\n")


def _start(spec: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kprune_batch", "apply", str(spec), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _complete_outputs(keras: Any, folder: Path) -> list[str]:
    """The finished outputs in `folder` (each a complete zip that Keras loads). pathlib's glob
    also matches hidden names: a killed run's temp file (.m1.keras.<random>...) is not one."""
    names = []
    for p in sorted(p for p in folder.glob("*.keras") if not p.name.startswith(".")):
        with zipfile.ZipFile(p) as zf:
            assert zf.testzip() is None
        layer_weights(keras, p)  # loads: complete
        names.append(p.name)
    return names


def _model_in_progress(folder: Path, proc: subprocess.Popen[str], timeout: float = 120) -> int:
    """Wait until some model m<k> is being written and return k.

    Seen in one listing of the output folder: a file that is neither the lock nor a finished
    output is the temp file of the model being processed (outputs are renamed into place when
    complete, so no other temp file exists then), beside exactly m0..m<k-1> finished."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()  # finished without being caught at work
        assert time.monotonic() < deadline, "no model was seen in progress"
        names = set(os.listdir(folder)) if folder.is_dir() else set()
        finished = {n for n in names if n.startswith("m") and n.endswith(".keras")
                    and n[1:-6].isdigit()}
        if names - finished - {".kprune.lock"}:
            k = len(finished)
            assert finished == {f"m{i}.keras" for i in range(k)}, names
            return k
        time.sleep(0.002)


def test_sigterm_stops_after_the_current_model(tmp_path: Path, small_cnn: Path,
                                               keras: Any) -> None:
    """SIGTERM sent while a model is being processed (its temp file exists): that model is
    finished and written, every later one is skipped with the reason, the log says so.
    --probe makes each model's write window long (it loads and runs the temp file)."""
    n = 6
    spec = _batch(tmp_path, small_cnn, n)
    proc = _start(spec, "--probe", "--audit-log", str(tmp_path / "log.json"))
    k = _model_in_progress(tmp_path / "pruned", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert k <= n - 2, f"caught only m{k} at work: no later model left to skip"
    log = json.loads((tmp_path / "log.json").read_text())
    statuses = [m["status"] for m in log["models"]]
    assert log["status"] == "partial" and log["interrupted"] == "SIGTERM"
    assert statuses == ["ok"] * (k + 1) + ["skipped"] * (n - k - 1), (k, statuses)
    reason = "not run: kprune was stopped by SIGTERM"
    assert [m["error"] for m in log["models"][k + 1:]] == [reason] * (n - k - 1)
    assert [m["output"] for m in log["models"][k + 1:]] == [None] * (n - k - 1)
    assert [line for line in out.splitlines() if line.startswith("skipped")] == [
        f"skipped m{i}: {reason}" for i in range(k + 1, n)]
    assert err == ""
    written = _complete_outputs(keras, tmp_path / "pruned")
    assert written == [f"m{i}.keras" for i in range(k + 1)]
    assert sorted(os.listdir(tmp_path / "pruned")) == [".kprune.lock"] + written  # no temp left
    for m in log["models"][:k + 1]:
        assert sha256_file(m["output"]["path"]) == m["output"]["sha256"]


def test_sigkill_leaves_only_complete_files_and_the_next_run_cleans_up(
        tmp_path: Path, small_cnn: Path, keras: Any) -> None:
    spec = _batch(tmp_path, small_cnn, 4)
    inputs = {p.name: sha256_file(str(p)) for p in tmp_path.glob("m*.keras")}
    proc = _start(spec)
    _wait_for(tmp_path / "pruned" / "m0.keras", proc)
    time.sleep(0.3)
    proc.kill()
    proc.communicate()
    _complete_outputs(keras, tmp_path / "pruned")
    assert {p.name: sha256_file(str(p)) for p in tmp_path.glob("m*.keras")} == inputs
    # as if killed: a temp name kprune makes (files.temp_path_beside), spelled out here
    (tmp_path / "pruned" / ".m3.keras.0123456789abcdef.kprune-tmp.keras").write_bytes(b"PK half")
    kprune("apply", spec).expect(0)
    assert _complete_outputs(keras, tmp_path / "pruned") == [f"m{i}.keras" for i in range(4)]
    assert [p.name for p in (tmp_path / "pruned").iterdir() if "tmp" in p.name] == []


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (read from /proc: a zombie is not live)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat_line = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat_line.rpartition(")")[2].split()[:2]
            if int(ppid) == pid and state != "Z":
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigkill_with_jobs_takes_the_workers_down_too(tmp_path: Path, small_cnn: Path,
                                                       keras: Any) -> None:
    """SIGKILL of `apply --jobs 2` (a CI timeout, the OOM killer) while workers are at work:
    the workers die with it. Found by red-teaming: they were orphaned, finished their models and
    renamed outputs *after* the run holding the folder lock was gone (over what the next run had
    written and logged, so its verify failed), then hung for ever holding their memory."""
    spec = _batch(tmp_path, small_cnn, 8)
    proc = _start(spec, "--jobs", "2", "--probe")
    out = tmp_path / "pruned"
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(".kprune-tmp" in n for n in os.listdir(out))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no model was seen in progress"
        time.sleep(0.005)
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers  # the two workers (and multiprocessing's resource tracker)
    proc.kill()
    proc.wait()
    try:
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in workers if _alive(pid)] == []
    finally:
        for pid in workers:  # never leave this test's own processes behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)  # a surviving worker held the pipes open: this would hang
    _complete_outputs(keras, out)
    kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(0)
    kprune("verify", tmp_path / "log.json").expect(0)
    assert [n for n in os.listdir(out) if ".kprune-tmp" in n] == []


def test_stale_temp_cleanup_spares_an_output_named_like_a_temp_file(tmp_path: Path,
                                                                     small_cnn: Path) -> None:
    """An output whose name has the pattern of another output's temp file is an output all the
    same: found by red-teaming, the next run's clean-up deleted it, so when that model then
    failed its earlier output was gone (a failed model must leave it untouched)."""
    for name in ("a", "b"):
        shutil.copy(small_cnn, tmp_path / f"{name}.keras")
    text = ("version: 1\nmodels:\n"
            "  - path: a.keras\n    output: .b.keras.0123456789abcdef.kprune-tmp.keras\n"
            "    layers: [{{name: conv2d, rules: [{{index: [{index}]}}]}}]\n"
            "  - path: b.keras\n    layers: [{{name: conv2d, rules: [{{index: [0]}}]}}]\n")
    spec = write_spec(tmp_path, text.format(index=0))
    kprune("apply", spec).expect(0)
    kept = tmp_path / "pruned" / ".b.keras.0123456789abcdef.kprune-tmp.keras"
    before = sha256_file(str(kept))
    write_spec(tmp_path, text.format(index=99))  # model a now fails
    result = kprune("apply", spec, "--audit-log", tmp_path / "log.json").expect(1)
    assert result.stderr == ("error: model 'a', layer 'conv2d': models[0].layers[0].rules[0]: "
                             "index 99 is out of range: the layer has 6 filters (valid: 0..5)\n")
    assert sha256_file(str(kept)) == before


# --- fuzzing: validate never raises, always 0 or 2 ---------------------------------------------

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                         st.text(max_size=8), st.sampled_from(["conv*", "zero", "keep", "remove",
                                                               "index", "mean", ".nan"]))
json_like = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(
                                   ["version", "models", "path", "layers", "name", "match",
                                    "rules", "index", "mean", "below", "above", "sign",
                                    "element", "zero", "defaults", "bias", "type", "x"]),
                                   children, max_size=5)),
    max_leaves=20)


def _check_validate(tmp_path: Path, text: str) -> None:
    spec = tmp_path / "fuzz.yaml"
    spec.write_text(text, encoding="utf-8")
    result = validate([str(spec)])
    assert result.return_code in (0, 2)
    assert all(line.startswith(str(spec)) for line in result.err)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_fuzz_arbitrary_text(tmp_path: Path, text: str) -> None:
    _check_validate(tmp_path, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_like)
def test_fuzz_arbitrary_documents(tmp_path: Path, doc: Any) -> None:
    _check_validate(tmp_path, json.dumps(doc, allow_nan=True))


VALID_SPEC = (Path(__file__).resolve().parent.parent / "specs" / "examples" / "digits.yaml")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 2000), insert=st.text(max_size=6), delete=st.integers(0, 8))
def test_fuzz_mutated_valid_spec(tmp_path: Path, cut: int, insert: str, delete: int) -> None:
    text = VALID_SPEC.read_text()
    cut = cut % (len(text) + 1)
    _check_validate(tmp_path, text[:cut] + insert + text[cut + delete:])


TOP_KEYS = "(allowed: defaults, models, output_dir, version)"


@pytest.mark.parametrize("text, problems", [
    ("version: 1\nmodels: *a\n", ["2:9: YAML syntax error: found undefined alias 'a'"]),
    ("? [a, b]\n: c\n", ["1:1: models: required key is missing",
                         "1:1: version: required key is missing",
                         "1:3: mapping keys must be plain scalars"]),
    ("a: &x [*x]\n", [f"1:1: a: unknown key 'a' {TOP_KEYS}", "1:1: models: required key is missing",
                      "1:1: version: required key is missing",
                      "1:4: a[0]: YAML alias refers to itself (or nesting is too deep)"]),
    ("\t", ["1:1: YAML syntax error: while scanning for the next token, found character '\\t' "
            "that cannot start any token"]),
    ("%YAML 9\n", ["1:8: YAML syntax error: while scanning a directive, expected a digit or '.', "
                   "but found '\\n'"]),
])
def test_parse_spec_only_raises_spec_errors(text: str, problems: list[str]) -> None:
    """Each hostile document is refused (never accepted, never another exception), with exactly
    these problems."""
    with pytest.raises(SpecError) as info:
        parse_spec(text, "x.yaml")
    assert [p.render() for p in info.value.problems] == [f"x.yaml:{p}" for p in problems]


@pytest.mark.parametrize("text, message", [
    ("a: &x [*x]\n", "1:4: a[0]: YAML alias refers to itself (or nesting is too deep)"),
    ("version: !!int abc\n", "1:10: version: invalid YAML value 'abc' (not a YAML 1.2 integer: "
                             "decimal digits, 0o octal or 0x hex)"),
    ("version: 1\x1f\n", "1:11: YAML error: unacceptable character #x001f (special characters "
                         "are not allowed)"),
])
def test_hostile_yaml_is_one_clear_problem(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "x.yaml")
    assert f"x.yaml:{message}" in [p.render() for p in info.value.problems]


def test_alias_bomb_is_refused() -> None:
    """10**9 values through aliases are refused, not expanded (how fast is a benchmark's
    question, not a unit test's: an expansion would exhaust memory or hang, never pass)."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(SpecError) as info:
        parse_spec("\n".join(lines) + "\n", "bomb.yaml")
    assert any("expands to more than 100000 values" in p.message for p in info.value.problems)


def test_unreadable_model_file(tmp_path: Path, small_cnn: Path) -> None:
    """Permission denied, checked as an unprivileged user (root reads everything)."""
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run kprune as an unprivileged user")
    folder = Path(tempfile.mkdtemp(prefix="kprune-perm-"))
    try:
        folder.chmod(0o777)
        shutil.copy(small_cnn, folder / "m.keras")
        (folder / "m.keras").chmod(0o000)
        spec = write_spec(folder, ONE_MODEL.format(path="m.keras"))
        spec.chmod(0o644)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
               "-m", "kprune_batch", "apply", str(spec)]
        probe = subprocess.run(cmd[:5] + ["-c", "import kprune_batch"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("the unprivileged user cannot run this Python environment")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr == (f"error: model 'm': input file {folder / 'm.keras'} is not "
                               f"readable (permission denied)\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_h5_outputs_are_byte_identical_across_runs(tmp_path: Path, small_cnn_h5: Path) -> None:
    shutil.copy(small_cnn_h5, tmp_path / "m.h5")
    spec = write_spec(tmp_path, ONE_MODEL.format(path="m.h5"))
    kprune("apply", spec, "--output-dir", tmp_path / "one").expect(0)
    time.sleep(1.1)  # a save-time timestamp would now differ
    kprune("apply", spec, "--output-dir", tmp_path / "two").expect(0)
    assert sha256_file(str(tmp_path / "one" / "m.h5")) == sha256_file(str(tmp_path / "two" / "m.h5"))


def test_input_changed_during_the_run_writes_nothing(tmp_path: Path, small_cnn: Path) -> None:
    from kprune_batch.executor import open_direct, run_job
    from kprune_batch.plan import compile_plan
    from kprune_batch.spec import read_spec

    shutil.copy(small_cnn, tmp_path / "m.keras")
    (job,) = compile_plan(read_spec(write_spec(tmp_path, ONE_MODEL.format(path="m.keras")))).jobs

    def meddling_opener(job: Any) -> Any:
        weights = open_direct(job)
        with open(job.input, "ab") as fh:  # another process appends to the input meanwhile
            fh.write(b"\0")
        return weights

    outcome = run_job(job, opener=meddling_opener)
    assert outcome.status == "failed"
    assert outcome.error == (f"{tmp_path / 'm.keras'}: model 'm': the input file changed while "
                             f"kprune was reading it; nothing was written; run again when nothing "
                             f"else writes to it")
    assert not (tmp_path / "pruned" / "m.keras").exists()


def test_a_foreign_error_line_caps_keras_layer_lists() -> None:
    """Keras's get_layer names every layer of the model in one line ("Existing layers are:
    [...]": 200 names for MobileNetV3): kprune's lines show the first few and a count."""
    from kprune_batch.errors import first_line

    names = ", ".join(f"'layer_{i}'" for i in range(200))
    exc = ValueError(f"No such layer: add. Existing layers are: [{names}].\nsecond line")
    assert first_line(exc) == ("No such layer: add. Existing layers are: ['layer_0', 'layer_1', "
                               "'layer_2', 'layer_3', 'layer_4' … and 195 more].")
    assert first_line(ValueError("shapes [1, 2] and [3]")) == "shapes [1, 2] and [3]"
    assert first_line(ValueError("x" * 300)) == "x" * 197 + "..."
