"""`kprune apply SPEC --ray`: one Ray task per model on a real local Ray that the run starts
(2 CPUs here), writing what a serial run writes. Direct backend: no TensorFlow in the tasks."""
from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import kprune
from kprune_batch.files import sha256_file
from test_shards import _wait_for, batch_spec, read

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install '.[ray]')")


def _records(log: dict) -> tuple:
    """What a log says about the models, apart from the run's own time, id and command."""
    return log["status"], log["models"], log["zeroed"], log["removed"], log["plan_sha256"]


@needs_ray
def test_ray_writes_what_a_serial_run_writes(tmp_path: Path, small_cnn: Path) -> None:
    """5 models, m3 failing (no file): the same exit code, the same error line, byte-identical
    outputs and equal log entries as a serial run of the same spec."""
    spec = batch_spec(tmp_path, small_cnn, 5, missing=(3,))
    serial = kprune("apply", spec, "--backend", "direct", "--audit-log",
                    tmp_path / "serial.json").expect(1)
    expected = {p.name: p.read_bytes() for p in (tmp_path / "pruned").glob("*.keras")}
    shutil.rmtree(tmp_path / "pruned")
    ray = kprune("apply", spec, "--backend", "direct", "--audit-log", tmp_path / "ray.json",
                 "--ray").expect(1)
    assert ray.stderr == serial.stderr
    assert ray.stderr.startswith("error: model 'm3': input file ") and ray.stderr.count("\n") == 1
    # lines in the order the models finish (README, "Output of apply"): the same lines
    assert sorted(ray.stdout.splitlines()) == sorted(
        serial.stdout.replace("serial.json", "ray.json").splitlines())
    assert ray.stdout.splitlines()[-2:] == ["4 ok, 1 failed, 0 skipped",
                                            f"audit log: {tmp_path / 'ray.json'}"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "pruned").glob("*.keras")} == expected
    assert sorted(expected) == ["m0.keras", "m1.keras", "m2.keras", "m4.keras"]
    assert _records(read(tmp_path / "ray.json")) == _records(read(tmp_path / "serial.json"))


@needs_ray
def test_sigterm_stops_handing_out_models(tmp_path: Path, small_cnn: Path) -> None:
    """SIGTERM once the first output is written: the running tasks finish their models, the
    outstanding ones never start; the log says which (ok ones have their output, the rest are
    skipped with the reason), interrupted SIGTERM, exit 1."""
    spec = batch_spec(tmp_path, small_cnn, 60)
    proc = subprocess.Popen([sys.executable, "-m", "kprune_batch", "apply", str(spec),
                             "--backend", "direct", "--audit-log", str(tmp_path / "log.json"),
                             "--ray"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    _wait_for(tmp_path / "pruned" / "m0.keras", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    log = read(tmp_path / "log.json")
    assert log["interrupted"] == "SIGTERM"
    statuses = [m["status"] for m in log["models"]]
    ok = statuses.count("ok")
    assert 1 <= ok < 60 and set(statuses) == {"ok", "skipped"}
    for m in log["models"]:
        written = (tmp_path / "pruned" / f"{m['name']}.keras").exists()
        assert written == (m["status"] == "ok"), m["name"]
        if m["status"] == "skipped":
            assert m["error"] == "not run: kprune was stopped by SIGTERM"
    assert len(log["zeroed"]) == ok


@needs_ray
def test_a_second_sigterm_cancels_running_tasks(tmp_path: Path, small_cnn: Path) -> None:
    """m0 (direct, no TensorFlow) is quick; m1..m3 measure their impact on samples, so each task
    imports TensorFlow first (seconds). SIGTERM once m0 is written, again a second later: the
    two running tasks are killed (skipped, no output), m3 never starts, the log is written,
    exit 1; nothing half-written is left under the output name."""
    np.save(tmp_path / "s.npy", np.random.default_rng(0).normal(size=(64, 8, 8, 3))
            .astype("float32"))
    lines = ["version: 1", "output_dir: pruned", "models:"]
    for i in range(4):
        shutil.copy(small_cnn, tmp_path / f"m{i}.keras")
        lines += [f"  - path: m{i}.keras", *(["    samples: s.npy"] if i else []),
                  "    layers: [{name: conv2d, rules: [{index: [0]}]}]"]
    spec = tmp_path / "spec.yaml"
    spec.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "kprune_batch", "apply", str(spec),
                             "--audit-log", str(tmp_path / "log.json"), "--ray"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    _wait_for(tmp_path / "pruned" / "m0.keras", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    log = read(tmp_path / "log.json")
    assert log["interrupted"] == "SIGTERM"
    models = {m["name"]: m for m in log["models"]}
    assert models["m0"]["status"] == "ok"
    assert models["m3"] == {**models["m3"], "status": "skipped",
                            "error": "not run: kprune was stopped by SIGTERM"}
    cancelled = [n for n in ("m1", "m2") if models[n]["error"] == (
        "cancelled while running by a second SIGTERM: no output recorded (a temp file it left "
        "is removed by the next run)")]
    assert cancelled, (models, out, err)  # TensorFlow's import alone outlasts the second
    for name in cancelled:
        assert models[name]["status"] == "skipped" and models[name]["output"] is None
        assert not (tmp_path / "pruned" / f"{name}.keras").exists()
    for name, m in models.items():
        if m["status"] == "ok":
            assert sha256_file(tmp_path / "pruned" / f"{name}.keras") == m["output"]["sha256"]


@needs_ray
def test_ray_and_jobs_is_a_usage_error(tmp_path: Path, small_cnn: Path) -> None:
    spec = batch_spec(tmp_path, small_cnn, 1)
    result = kprune("apply", spec, "--jobs", "2", "--ray")
    assert (result.code, result.stdout, result.stderr) == (
        2, "", "error: --jobs and --ray do not go together: with --ray, Ray runs as many "
               "models at once as its cluster has CPUs\n")


def test_without_ray_installed_one_line_names_the_extra(tmp_path: Path, small_cnn: Path) -> None:
    """Ray hidden from the run (a sitecustomize marks the module absent): exit 1, nothing opened,
    no log."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    spec = batch_spec(tmp_path, small_cnn, 1)
    result = kprune("apply", spec, "--ray", env={"PYTHONPATH": str(hide)})
    assert (result.code, result.stdout, result.stderr) == (
        1, "", "error: --ray needs Ray, which is not installed: pip install "
               "'kprune-batch[ray]'\n")
    assert not (tmp_path / "pruned").exists()
