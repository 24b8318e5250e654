"""`kprune apply SPEC --shard K/N`: a deterministic part of the spec's models, shards of one run
writing side by side into one output folder, two runs of one shard (or a shard and an unsharded
run) never at once. Direct backend throughout: no TensorFlow in the runs."""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import kprune, write_spec
from kprune_batch.commands.apply import hold_folder_locks
from kprune_batch.files import sha256_file


def batch_spec(folder: Path, small_cnn: Path, n: int, output_dir: str = "pruned",
               missing: tuple[int, ...] = ()) -> Path:
    """A spec of `n` copies of small_cnn, m0..m{n-1}, model i zeroing filter i % 6 of conv2d
    (so that every model's output differs); the models in `missing` name no file."""
    lines = ["version: 1", f"output_dir: {output_dir}", "models:"]
    for i in range(n):
        if i not in missing and not (folder / f"m{i}.keras").exists():
            shutil.copy(small_cnn, folder / f"m{i}.keras")
        lines += [f"  - path: m{i}.keras",
                  f"    layers: [{{name: conv2d, rules: [{{index: [{i % 6}]}}]}}]"]
    return write_spec(folder, "\n".join(lines) + "\n", name=f"{output_dir}.yaml")


def shard_run(spec: Path, k: int, n: int, log: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kprune_batch", "apply", str(spec), "--shard",
                             f"{k}/{n}", "--backend", "direct", "--audit-log", str(log), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen[str], code: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, (proc.args, out, err)
    return out, err


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_two_shards_side_by_side_write_what_one_run_writes(tmp_path: Path,
                                                          small_cnn: Path) -> None:
    """Shards 1/2 and 2/2 started together on one output folder both succeed; each log lists
    exactly its models (positions 0, 2, 4 and 1, 3) with their records and its `shard`; the
    outputs are the bytes an unsharded run writes, and the logs carry its spec and plan hashes."""
    spec = batch_spec(tmp_path, small_cnn, 5)
    kprune("apply", spec, "--backend", "direct", "--audit-log", tmp_path / "serial.json").expect(0)
    serial = read(tmp_path / "serial.json")
    expected = {i: (tmp_path / "pruned" / f"m{i}.keras").read_bytes() for i in range(5)}
    shutil.rmtree(tmp_path / "pruned")
    procs = [shard_run(spec, k, 2, tmp_path / f"shard{k}.json") for k in (1, 2)]
    outs = [finish(p) for p in procs]
    for (out, err), log_name in zip(outs, ("shard1.json", "shard2.json")):
        assert err == "" and out.endswith(f"audit log: {tmp_path / log_name}\n")
    for i in range(5):
        assert (tmp_path / "pruned" / f"m{i}.keras").read_bytes() == expected[i]
    assert "shard" not in serial
    for k, positions in ((1, [0, 2, 4]), (2, [1, 3])):
        log = read(tmp_path / f"shard{k}.json")
        names = [f"m{i}" for i in positions]
        assert log["shard"] == {"index": k, "count": 2}
        assert log["status"] == "ok"
        assert [m["name"] for m in log["models"]] == names
        assert [(r["model"], r["filter"]) for r in log["zeroed"]] == \
            [(f"m{i}", i % 6) for i in positions]
        assert log["spec"]["sha256"] == serial["spec"]["sha256"]
        # one plan for every shard (the whole spec's): merge recognises a run's shards by it
        assert log["plan_sha256"] == serial["plan_sha256"]
        for m in log["models"]:
            assert m["output"]["sha256"] == sha256_file(tmp_path / "pruned" / f"{m['name']}.keras")


def test_a_shard_opens_only_its_models(tmp_path: Path, small_cnn: Path) -> None:
    """Model m1 names no file: shard 1/2 never looks at it (exit 0, not in its log); shard 2/2
    fails it with the usual one line and still writes m3."""
    spec = batch_spec(tmp_path, small_cnn, 4, missing=(1,))
    first = kprune("apply", spec, "--shard", "1/2", "--backend", "direct",
                   "--audit-log", tmp_path / "one.json").expect(0)
    assert "m1" not in first.stdout + first.stderr
    assert [m["name"] for m in read(tmp_path / "one.json")["models"]] == ["m0", "m2"]
    second = kprune("apply", spec, "--shard", "2/2", "--backend", "direct",
                    "--audit-log", tmp_path / "two.json").expect(1)
    assert second.stderr == (f"error: model 'm1': input file {tmp_path / 'm1.keras'} does not "
                             f"exist; check the model's 'path' (relative to the spec file's "
                             f"folder)\n")
    log = read(tmp_path / "two.json")
    assert log["status"] == "partial"
    assert [(m["name"], m["status"]) for m in log["models"]] == [("m1", "failed"), ("m3", "ok")]
    assert sorted(p.name for p in (tmp_path / "pruned").glob("*.keras")) == \
        ["m0.keras", "m2.keras", "m3.keras"]


def test_a_shard_beyond_the_models_runs_nothing(tmp_path: Path, small_cnn: Path) -> None:
    spec = batch_spec(tmp_path, small_cnn, 2)
    kprune("apply", spec, "--shard", "3/3", "--audit-log", tmp_path / "log.json").expect(0)
    log = read(tmp_path / "log.json")
    assert (log["status"], log["models"], log["zeroed"], log["shard"]) == \
        ("ok", [], [], {"index": 3, "count": 3})


@pytest.mark.parametrize("value, env, message", [
    ("0/2", {}, "--shard '0/2': expected K/N with 1 <= K <= N (e.g. 2/8), or auto"),
    ("3/2", {}, "--shard '3/2': expected K/N with 1 <= K <= N (e.g. 2/8), or auto"),
    ("1/0", {}, "--shard '1/0': expected K/N with 1 <= K <= N (e.g. 2/8), or auto"),
    ("+1/2", {}, "--shard '+1/2': expected K/N with 1 <= K <= N (e.g. 2/8), or auto"),
    ("two", {}, "--shard 'two': expected K/N with 1 <= K <= N (e.g. 2/8), or auto"),
    ("auto", {"KPRUNE_SHARD_COUNT": "4"},
     "--shard auto needs the environment variable JOB_COMPLETION_INDEX (set by a Kubernetes "
     "Indexed Job, and KPRUNE_SHARD_COUNT by its manifest)"),
    ("auto", {"JOB_COMPLETION_INDEX": "0"},
     "--shard auto needs the environment variable KPRUNE_SHARD_COUNT (set by a Kubernetes "
     "Indexed Job, and KPRUNE_SHARD_COUNT by its manifest)"),
    ("auto", {"JOB_COMPLETION_INDEX": "-1", "KPRUNE_SHARD_COUNT": "4"},
     "--shard auto: JOB_COMPLETION_INDEX is '-1', not a whole number"),
    ("auto", {"JOB_COMPLETION_INDEX": "4", "KPRUNE_SHARD_COUNT": "4"},
     "--shard auto: JOB_COMPLETION_INDEX 4 is not below KPRUNE_SHARD_COUNT 4"),
])
def test_a_bad_shard_is_a_usage_error(tmp_path: Path, small_cnn: Path, value: str,
                                      env: dict[str, str], message: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2, one line, nothing opened and no log, like click's own usage errors."""
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    monkeypatch.delenv("KPRUNE_SHARD_COUNT", raising=False)
    spec = batch_spec(tmp_path, small_cnn, 2)
    result = kprune("apply", spec, "--shard", value, env=env)
    assert (result.code, result.stdout, result.stderr) == (2, "", f"error: {message}\n")
    assert not (tmp_path / "pruned").exists()


def test_shard_auto_reads_the_indexed_job_environment(tmp_path: Path, small_cnn: Path) -> None:
    """JOB_COMPLETION_INDEX is 0-based: index 1 of 2 is shard 2/2 (models m1, m3)."""
    spec = batch_spec(tmp_path, small_cnn, 4)
    kprune("apply", spec, "--shard", "auto", "--backend", "direct", "--audit-log",
           tmp_path / "log.json", env={"JOB_COMPLETION_INDEX": "1",
                                       "KPRUNE_SHARD_COUNT": "2"}).expect(0)
    log = read(tmp_path / "log.json")
    assert log["shard"] == {"index": 2, "count": 2}
    assert [m["name"] for m in log["models"]] == ["m1", "m3"]


@contextlib.contextmanager
def held(folder: Path, shard: tuple[int, int] | None) -> Any:
    """The locks a run of `shard` (None: unsharded) holds on `folder`, taken by kprune's own
    function in this process, so that the run they keep out is certainly concurrent."""
    with contextlib.ExitStack() as stack:
        assert hold_folder_locks(stack, str(folder), shard) is None
        yield


def test_runs_a_held_shard_excludes(tmp_path: Path, small_cnn: Path) -> None:
    """While shard 1/2 runs: 1/2 again refuses (one line, models skipped, log written), shards
    of another count and an unsharded run refuse, 2/2 runs."""
    spec = batch_spec(tmp_path, small_cnn, 3)
    out = tmp_path / "pruned"
    lock, own = out / ".kprune.lock", out / ".kprune.shard-1-of-2.lock"
    with held(out, (1, 2)):
        again = kprune("apply", spec, "--shard", "1/2", "--audit-log", tmp_path / "a.json")
        other = kprune("apply", spec, "--shard", "1/3", "--audit-log", tmp_path / "b.json")
        whole = kprune("apply", spec, "--audit-log", tmp_path / "c.json")
        kprune("apply", spec, "--shard", "2/2", "--backend", "direct").expect(0)
    same = (f"another kprune apply of shard 1/2 is writing to {out} (lock {own}); run again when "
            f"it has finished")
    count = (f"shards of another count (K/2) are writing to {out} (lock {lock}); the shards of "
             f"one run share one count: run again when they have finished")
    busy = f"another kprune apply is writing to {out} (lock {lock}); run again when it has finished"
    for result, log, message, names in ((again, "a", same, ["m0", "m2"]),
                                        (other, "b", count, ["m0"]),
                                        (whole, "c", busy, ["m0", "m1", "m2"])):
        result.expect(1)
        assert result.stderr == f"error: {message}\n"
        assert [(m["name"], m["status"], m["error"]) for m in read(tmp_path / f"{log}.json")[
            "models"]] == [(name, "skipped", message) for name in names]
    assert sorted(p.name for p in out.glob("*.keras")) == ["m1.keras"]


def test_an_unsharded_run_excludes_every_shard(tmp_path: Path, small_cnn: Path) -> None:
    spec = batch_spec(tmp_path, small_cnn, 2)
    out = tmp_path / "pruned"
    with held(out, None):
        result = kprune("apply", spec, "--shard", "2/2").expect(1)
    assert result.stderr == (f"error: another kprune apply is writing to {out} (lock "
                             f"{out / '.kprune.lock'}); run again when it has finished\n")
    assert not list(out.glob("*.keras"))


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_a_real_shard_run_in_progress_excludes_its_twin(tmp_path: Path,
                                                        small_cnn: Path) -> None:
    """Real processes: shard 1/2 of 40 models is stopped (SIGSTOP) after its first output, so
    what follows certainly overlaps it: a second 1/2 refuses with one line, 2/2 runs through,
    an unsharded run refuses; resumed, the first finishes every one of its models."""
    spec = batch_spec(tmp_path, small_cnn, 40)
    out = tmp_path / "pruned"
    first = shard_run(spec, 1, 2, tmp_path / "first.json")
    try:
        _wait_for(out / "m0.keras", first)
        first.send_signal(signal.SIGSTOP)
        twin = kprune("apply", spec, "--shard", "1/2", "--backend", "direct",
                      "--audit-log", tmp_path / "twin.json").expect(1)
        kprune("apply", spec, "--shard", "2/2", "--backend", "direct",
               "--audit-log", tmp_path / "two.json").expect(0)
        kprune("apply", spec, "--audit-log", tmp_path / "whole.json").expect(1)
    finally:
        first.send_signal(signal.SIGCONT)
    finish(first)
    own = out / ".kprune.shard-1-of-2.lock"
    assert twin.stderr == (f"error: another kprune apply of shard 1/2 is writing to {out} (lock "
                           f"{own}); run again when it has finished\n")
    assert {m["status"] for m in read(tmp_path / "twin.json")["models"]} == {"skipped"}
    assert {m["status"] for m in read(tmp_path / "whole.json")["models"]} == {"skipped"}
    assert [m["status"] for m in read(tmp_path / "first.json")["models"]] == ["ok"] * 20
    assert [m["status"] for m in read(tmp_path / "two.json")["models"]] == ["ok"] * 20
    assert len(list(out.glob("*.keras"))) == 40


def test_stale_temp_cleanup_touches_only_this_shards_outputs(tmp_path: Path,
                                                            small_cnn: Path) -> None:
    """A killed run's temp files beside m0 (shard 1/2's) and m1 (shard 2/2's): shard 2/2 removes
    only m1's; m0's may be a temp file shard 1/2 is writing right now."""
    spec = batch_spec(tmp_path, small_cnn, 2)
    out = tmp_path / "pruned"
    out.mkdir()
    theirs = out / ".m0.keras.0123456789abcdef.kprune-tmp.keras"
    ours = out / ".m1.keras.0123456789abcdef.kprune-tmp.keras"
    theirs.write_bytes(b"shard 1 writing")
    ours.write_bytes(b"left by a killed run")
    kprune("apply", spec, "--shard", "2/2", "--backend", "direct").expect(0)
    assert theirs.read_bytes() == b"shard 1 writing"
    assert not ours.exists()


def test_the_indexed_job_manifest_runs_every_shard_and_merges_them(tmp_path: Path,
                                                                     small_cnn: Path) -> None:
    """docs/k8s-indexed-job.yaml: KPRUNE_SHARD_COUNT equals completions in both Jobs, and the
    pod and merge scripts, run here by sh with /data pointing at a temporary folder and
    JOB_COMPLETION_INDEX set as Kubernetes sets it, give one merged log of every model."""
    import os

    import yaml

    from conftest import REPO

    job, merge_job = yaml.safe_load_all((REPO / "docs" / "k8s-indexed-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]["containers"][0]
    merger = merge_job["spec"]["template"]["spec"]["containers"][0]
    count = job["spec"]["completions"]
    for container in (pod, merger):
        assert {e["name"]: e["value"] for e in container["env"]} == \
            {"KPRUNE_SHARD_COUNT": str(count)}
    data = tmp_path / "data"
    (data / "specs").mkdir(parents=True)
    batch_spec(data / "specs", small_cnn, 2 * count + 1).rename(data / "specs" / "fleet.yaml")
    bin_dir = tmp_path / "bin"  # `kprune` as the image has it: this checkout's
    bin_dir.mkdir()
    (bin_dir / "kprune").write_text(f"#!/bin/sh\nexec {sys.executable} -m kprune_batch \"$@\"\n")
    (bin_dir / "kprune").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "KPRUNE_SHARD_COUNT": str(count)}

    def sh(script: str, **extra: str) -> None:
        subprocess.run(["/bin/sh", "-c", script.replace("/data", str(data))], check=True,
                       env={**env, **extra}, timeout=300, stdin=subprocess.DEVNULL,
                       capture_output=True)

    procs = [subprocess.Popen(["/bin/sh", "-c", pod["args"][0].replace("/data", str(data))],
                              env={**env, "JOB_COMPLETION_INDEX": str(i)},
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
             for i in range(count)]
    assert [p.wait(timeout=300) for p in procs] == [0] * count
    sh(merger["args"][0])
    merged = read(data / "logs" / "kprune-nightly" / "merged.json")
    assert [m["name"] for m in merged["models"]] == [f"m{i}" for i in range(2 * count + 1)]
    assert merged["status"] == "ok" and len(merged["merged_from"]) == count
    assert (data / "logs" / "kprune-nightly" / "report.md").read_text().startswith("### kprune")
