"""`kprune merge LOG... --output PATH` on the logs of a real 2-shard run, and every way a set of
logs can fail to be one run's shards."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import kprune
from kprune_batch.files import sha256_file
from test_shards import batch_spec, read


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, small_cnn: Path) -> dict[str, Path]:
    """One spec of 4 models (m3 names no file: it fails), run unsharded (serial.json), then,
    its outputs removed, as shards 1/2 and 2/2 (shard1.json, shard2.json), and shard 2/3 of
    the same spec (third.json), and shard 1/2 again (again.json)."""
    folder = tmp_path_factory.mktemp("merge")
    spec = batch_spec(folder, small_cnn, 4, missing=(3,))
    kprune("apply", spec, "--backend", "direct", "--audit-log", folder / "serial.json").expect(1)
    shutil.rmtree(folder / "pruned")
    for name, shard, code in (("shard1", "1/2", 0), ("shard2", "2/2", 1), ("third", "2/3", 0)):
        kprune("apply", spec, "--shard", shard, "--backend", "direct",
               "--audit-log", folder / f"{name}.json").expect(code)
    # the same shard once more: its outputs already hold these bytes (written: false)
    kprune("apply", spec, "--shard", "1/2", "--backend", "direct",
           "--audit-log", folder / "again.json").expect(0)
    return {"folder": folder, "spec": spec, **{name: folder / f"{name}.json" for name in
                                               ("serial", "shard1", "shard2", "third", "again")}}


def _merge(*logs: Path, output: Path) -> Any:
    return kprune("merge", *logs, "--output", output)


def test_merged_log_is_the_serial_runs_log(run: dict[str, Path]) -> None:
    """Models and records as the unsharded run logged them, in spec order; status recomputed
    (partial: m3 failed in shard 2); earliest start, latest end; merged_from names each shard
    log by sha256; no `shard`."""
    out = run["folder"] / "merged.json"
    result = _merge(run["shard2"], run["shard1"], output=out).expect(0)  # any order
    assert result.stdout == f"merged 2 shard log(s): 4 model(s), status partial -> {out}\n"
    merged, serial = read(out), read(run["serial"])
    shards = [read(run["shard1"]), read(run["shard2"])]
    assert merged["models"] == serial["models"]
    assert [m["name"] for m in merged["models"]] == ["m0", "m1", "m2", "m3"]
    assert merged["zeroed"] == serial["zeroed"] and merged["removed"] == serial["removed"] == []
    assert merged["status"] == "partial"
    for key in ("spec", "plan_sha256", "options", "tool"):
        assert merged[key] == serial[key], key
    assert merged["started_at"] == min(s["started_at"] for s in shards)
    assert merged["finished_at"] == max(s["finished_at"] for s in shards)
    assert "shard" not in merged and "interrupted" not in merged
    assert merged["merged_from"] == [
        {"path": str(run[name]), "sha256": sha256_file(run[name]), "run_id": log["run_id"],
         "shard": {"index": k, "count": 2}}
        for k, (name, log) in enumerate(zip(("shard1", "shard2"), shards), start=1)]
    earliest = min(shards, key=lambda s: s["started_at"])
    assert merged["run_id"] == f"{earliest['run_id']}-merged"


def test_verify_report_and_diff_read_a_merged_log(run: dict[str, Path]) -> None:
    out = run["folder"] / "checked.json"
    _merge(run["shard1"], run["shard2"], output=out).expect(0)
    verified = kprune("verify", out).expect(0)
    assert verified.stdout.splitlines() == [
        *(f"ok      m{i}: 1 zeroed filter(s) verified, every other weight equals the input's"
          for i in range(3)),
        "skipped m3: status failed in the log (nothing was written)"]
    report = kprune("report", out).expect(0)
    assert report.stdout == kprune("report", run["serial"]).expect(0).stdout.replace(
        read(run["serial"])["run_id"], read(out)["run_id"])
    # the review page of the merged log is the serial run's page (but for the run id and its
    # times): the same models, layers and filter cells
    serial_page = kprune("report", run["serial"], "--format", "html").expect(0).stdout
    merged_page = kprune("report", out, "--format", "html").expect(0).stdout
    assert 'data-model="m1"' in merged_page and 'data-model="m3"' in merged_page
    for key in ("run_id", "started_at", "finished_at"):
        assert read(run["serial"])[key] in serial_page, key
        serial_page = serial_page.replace(read(run["serial"])[key], read(out)[key])
    assert merged_page == serial_page
    assert kprune("diff", run["serial"], out).expect(0).stdout == \
        "no difference in zeroed filters\n"
    assert kprune("diff", run["shard1"], out).expect(0).stdout == (
        "model m1: status absent -> ok\nmodel m3: status absent -> failed\n"
        "m1 conv2d: +1  (0 -> 1 zeroed)\n")


@pytest.mark.parametrize("logs, message", [
    (["shard1"], "shard(s) 2/2 missing: a merged log covers every shard of the run"),
    (["shard1", "shard2", "again"], "{again} and {shard1} are both shard 1/2"),
    (["shard1", "third"], "{third} is shard 2/3, {shard1} one of 2: shards of one run share one "
                          "count"),
    (["shard1", "serial"], "{serial} is not a shard log (no 'shard': the log of an unsharded "
                           "run); merge takes the logs of kprune apply --shard K/N"),
])
def test_logs_that_are_not_one_runs_shards_are_refused(run: dict[str, Path], logs: list[str],
                                                       message: str) -> None:
    out = run["folder"] / "refused.json"
    result = _merge(*(run[name] for name in logs), output=out).expect(1)
    assert result.stderr == f"error: {message.format(**run)}\n"
    assert result.stdout == "" and not out.exists()


def _edited(run: dict[str, Path], name: str, new: str, edit: Any) -> Path:
    log = read(run[name])
    edit(log)
    path = run["folder"] / f"{new}.json"
    path.write_text(json.dumps(log))
    return path


def test_another_spec_another_plan_and_a_model_twice_are_refused(
        run: dict[str, Path], small_cnn: Path, tmp_path: Path) -> None:
    # another spec: the same models, one rule changed
    other = batch_spec(tmp_path, small_cnn, 4, missing=(3,))
    other.write_text(other.read_text().replace("index: [1]", "index: [2]"))
    kprune("apply", other, "--shard", "2/2", "--backend", "direct",
           "--audit-log", tmp_path / "other.json").expect(1)
    # another plan of the same spec: another output folder
    kprune("apply", run["spec"], "--shard", "2/2", "--backend", "direct", "--output-dir",
           tmp_path / "elsewhere", "--audit-log", tmp_path / "elsewhere.json").expect(1)
    # a model twice: shard 2's log with m1 renamed m0 (consistent on its own)

    def rename(log: dict[str, Any]) -> None:
        log["models"][0]["name"] = "m0"
        for record in log["zeroed"]:
            record["model"] = "m0"

    twice = _edited(run, "shard2", "twice", rename)
    first, second = read(run["shard1"]), read(tmp_path / "other.json")
    cases = [
        (tmp_path / "other.json",
         f"{tmp_path / 'other.json'} is a run of another spec (sha256 {second['spec']['sha256']}; "
         f"{run['shard1']}: {first['spec']['sha256']})"),
        (tmp_path / "elsewhere.json",
         f"{tmp_path / 'elsewhere.json'} ran another plan of the spec (plan_sha256 "
         f"{read(tmp_path / 'elsewhere.json')['plan_sha256']}; {run['shard1']}: "
         f"{first['plan_sha256']}): another --output-dir or kprune version"),
        (twice, f"model 'm0' is in both {run['shard1']} and {twice}"),
    ]
    for log, message in cases:
        result = _merge(run["shard1"], log, output=tmp_path / "refused.json").expect(1)
        assert result.stderr == f"error: {message}\n"
    assert not (tmp_path / "refused.json").exists()


def test_a_merged_log_is_not_merged_again(run: dict[str, Path]) -> None:
    out = run["folder"] / "once.json"
    _merge(run["shard1"], run["shard2"], output=out).expect(0)
    result = _merge(out, run["shard2"], output=run["folder"] / "twice.json").expect(1)
    assert result.stderr == (f"error: {out} is not a shard log (no 'shard': a merged log); "
                             f"merge takes the logs of kprune apply --shard K/N\n")


def test_a_shard_log_moved_to_another_position_is_refused(run: dict[str, Path]) -> None:
    """Shard 1's log relabelled 2/2 and shard 2's 1/2: counts fit (2 and 2 of 4 models), but
    the rule locations name the models' real spec positions."""
    def relabel(k: int) -> Any:
        return lambda log: log["shard"].update(index=k)

    one = _edited(run, "shard1", "as-two", relabel(2))
    two = _edited(run, "shard2", "as-one", relabel(1))
    result = _merge(one, two, output=run["folder"] / "moved.json").expect(1)
    assert result.stderr == (f"error: {two}: a record of model 'm1' names rule "
                             f"models[1].layers[0].rules[0], but the model is at spec position 0 "
                             f"in shard order\n")


def test_output_over_a_shard_log_is_a_usage_error(run: dict[str, Path]) -> None:
    before = run["shard1"].read_bytes()
    result = _merge(run["shard1"], run["shard2"], output=run["shard1"]).expect(2)
    assert result.stderr == (f"error: --output {run['shard1']} is the shard log {run['shard1']}; "
                             f"kprune merge never writes over a log it reads: choose another "
                             f"path\n")
    assert run["shard1"].read_bytes() == before


# --- red team (readers): shards whose logs hold both record kinds ----------------------------

BOTH_KINDS_SPEC = """\
version: 1
output_dir: out
models:
  - name: removed
    path: rt.keras
    layers:
      - {name: c1, action: remove, coupled: union, rules: [{index: [1, 4]}]}
      - {name: nb, rules: [{index: [0]}]}
  - name: zeroed
    path: rt.h5
    layers: [{name: ct, rules: [{index: [5]}]}]
  - name: failed
    path: missing.keras
    layers: [{name: c1, rules: [{index: [0]}]}]
"""


def test_shards_with_removed_and_zeroed_records_merge_into_the_serial_log(
        keras: Any, tmp_path: Path) -> None:
    """Shard 1/2 removes (c1 and its coupled c2, the depthwise follower) and zeroes (nb) in one
    model and holds the failed model; shard 2/2 zeroes a Conv2DTranspose of a .h5. The merged
    log is the serial run's, and every reader takes it; a shard whose removed list lost a
    record is refused."""
    from conftest import residual_model, write_spec

    residual_model(keras, tmp_path)
    spec = write_spec(tmp_path, BOTH_KINDS_SPEC)
    kprune("apply", spec, "--audit-log", tmp_path / "serial.json").expect(1)
    shutil.rmtree(tmp_path / "out")
    kprune("apply", spec, "--shard", "1/2", "--audit-log", tmp_path / "s1.json").expect(1)
    kprune("apply", spec, "--shard", "2/2", "--audit-log", tmp_path / "s2.json").expect(0)
    out = tmp_path / "merged.json"
    _merge(tmp_path / "s2.json", tmp_path / "s1.json", output=out).expect(0)
    merged, serial = read(out), read(tmp_path / "serial.json")
    assert merged["models"] == serial["models"] and merged["status"] == "partial"
    assert merged["zeroed"] == serial["zeroed"] and merged["removed"] == serial["removed"]
    # which filters went, from the spec and the graph alone: the Add couples c1 and c2, the
    # depthwise (multiplier 2) follows its input channels 1 and 4
    assert {(r["layer"], r["filter"]) for r in merged["removed"]} == {
        ("c1", 1), ("c1", 4), ("c2", 1), ("c2", 4), ("dw", 2), ("dw", 3), ("dw", 8), ("dw", 9)}
    assert {(r["model"], r["layer"], r["filter"]) for r in merged["zeroed"]} == {
        ("removed", "nb", 0), ("zeroed", "ct", 5)}
    assert kprune("verify", out).expect(0).stdout.splitlines() == [
        "ok      removed: 1 zeroed and 8 removed filter(s) verified: every weight equals the "
        "input's with the logged slices and edits applied",
        "ok      zeroed: 1 zeroed filter(s) verified, every other weight equals the input's",
        "skipped failed: status failed in the log (nothing was written)"]
    report = kprune("report", out).expect(0).stdout
    assert "  c1: removed 1, 4 (2 of 8, 25.0%)\n" in report
    assert "  dw: removed 2-3, 8-9 (4 of 16, 25.0%)\n" in report
    assert "  nb: 0 (1 of 5, 20.0%)\n" in report and "  ct: 5 (1 of 6, 16.7%)\n" in report
    assert "model failed: failed" in report
    kprune("report", out, "--format", "html").expect(0)
    assert kprune("diff", tmp_path / "serial.json", out, "--exit-code").expect(0).stdout == \
        "no difference in zeroed or removed filters\n"
    shard = read(tmp_path / "s1.json")
    shard["removed"] = [r for r in shard["removed"] if (r["layer"], r["filter"]) != ("dw", 9)]
    (tmp_path / "s1.json").write_text(json.dumps(shard))
    refused = _merge(tmp_path / "s1.json", tmp_path / "s2.json", output=tmp_path / "no.json")
    assert refused.expect(1).stderr == (
        f"error: {tmp_path / 's1.json'}: not a consistent kprune audit log: "
        f"models[0].layers[3].selected: layer 'dw' selects 2-3, 8-9, but its records name "
        f"2-3, 8\n")
