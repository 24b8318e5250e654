"""The command line as a scheduler reads it: apply's line per model as it finishes and its count
line, a .keras that is no zip, --format json on every command, diff --exit-code, --debug after
the subcommand."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import kprune, write_spec

NOT_ZIP = ("not a .keras archive (no zip end record); re-save it with keras.saving.save_model, "
           "or pass the .h5 file")
HDF5_NAMED_KERAS = ("not a .keras archive: it is an HDF5 file (a legacy .h5 model); name it .h5 "
                    "(Keras reads a .keras file only as a zip archive)")


def _entry(name: str, filters: list[int], extra: str = "") -> str:
    return (f"  - path: {name}.keras\n"
            f"    layers: [{{name: conv2d, rules: [{{index: {filters}}}]{extra}}}]\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, small_cnn: Path) -> Path:
    """m0..m2 (copies of small_cnn), bad.keras (text), h5.keras (HDF5 bytes under a .keras name)."""
    where = tmp_path_factory.mktemp("cli")
    for i in range(3):
        shutil.copy(small_cnn, where / f"m{i}.keras")
    (where / "bad.keras").write_bytes(b"this is not a model\n")
    (where / "h5.keras").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 200)
    return where


def _spec(folder: Path, name: str, entries: list[tuple[str, list[int]]],
          output_dir: str = "pruned") -> Path:
    text = f"version: 1\noutput_dir: {output_dir}\nmodels:\n" + "".join(
        _entry(model, filters) for model, filters in entries)
    return write_spec(folder, text, name)


def _ok(folder: Path, name: str, n: int, output_dir: str = "pruned") -> str:
    return f"ok      {name}: zeroed {n} filter(s) in 1 layer(s) -> {folder / output_dir}/{name}.keras"


def _merged(*args: Any) -> subprocess.CompletedProcess[str]:
    """kprune with stderr into the same pipe as stdout: the order the lines were written in."""
    return subprocess.run([sys.executable, "-m", "kprune_batch", *map(str, args)], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, timeout=300)


# --- apply: a line per model as it finishes, errors in place, the count line ------------------

def test_the_first_models_line_is_out_while_the_next_still_runs(folder: Path) -> None:
    """m1 is removed (action: remove needs the Keras backend, so it starts TensorFlow: seconds);
    m0's line is read from the pipe while the process still runs: it was flushed as m0
    finished, not kept for the end of the batch. Then the reader goes away (as `| head -1`
    does): the batch still finishes and writes its log."""
    spec = write_spec(folder, "version: 1\noutput_dir: streamed\nmodels:\n" + _entry("m0", [0])
                      + _entry("m1", [0], ", action: remove"), "streamed.yaml")
    log = folder / "streamed.json"
    proc = subprocess.Popen([sys.executable, "-m", "kprune_batch", "apply", str(spec),
                             "--audit-log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        running = proc.poll() is None
        proc.stdout.close()  # type: ignore[union-attr]
        err = proc.stderr.read()  # type: ignore[union-attr]
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    assert first == _ok(folder, "m0", 1, "streamed") + "\n"
    assert running, "the process had already exited: nothing shows the line came early"
    assert (code, err) == (0, "")
    assert [m["status"] for m in json.loads(log.read_text())["models"]] == ["ok", "ok"]


@pytest.mark.parametrize("backend, extra", [("direct", []), ("keras", ["--fail-fast"])])
def test_lines_in_place_the_count_line_and_a_keras_file_that_is_no_zip(
        folder: Path, backend: str, extra: list[str]) -> None:
    """Both backends: the two non-zip .keras files fail with what is wrong with them (Keras
    itself says "File not found"), each line where its model is, the batch goes on (or, with
    --fail-fast, the rest is skipped), then the count and the log."""
    spec = _spec(folder, f"inplace-{backend}.yaml", [("m0", [0]), ("bad", [0]), ("h5", [0]),
                                                      ("m2", [1])], f"inplace-{backend}")
    log = folder / f"inplace-{backend}.json"
    proc = _merged("apply", spec, "--backend", backend, "--audit-log", log, *extra)
    assert proc.returncode == 1, proc.stdout
    bad = f"error: {folder / 'bad.keras'}: model 'bad': {NOT_ZIP}"
    h5 = f"error: {folder / 'h5.keras'}: model 'h5': {HDF5_NAMED_KERAS}"
    if extra:
        expected = [_ok(folder, "m0", 1, f"inplace-{backend}"), bad,
                    "skipped h5: not run: an earlier model failed and --fail-fast is set",
                    "skipped m2: not run: an earlier model failed and --fail-fast is set",
                    "1 ok, 1 failed, 2 skipped"]
    else:
        expected = [_ok(folder, "m0", 1, f"inplace-{backend}"), bad, h5,
                    _ok(folder, "m2", 1, f"inplace-{backend}"), "2 ok, 2 failed, 0 skipped"]
    assert proc.stdout.splitlines() == expected + [f"audit log: {log}"]
    models = json.loads(log.read_text())["models"]
    assert [m["status"] for m in models] == (["ok", "failed", "skipped", "skipped"] if extra
                                             else ["ok", "failed", "failed", "ok"])
    assert models[1]["error"] == bad[len("error: "):]


def test_jobs_print_each_model_as_it_finishes(folder: Path) -> None:
    """--jobs 2: the lines come in the order the models finish (so any order), each once; the
    count line and the log's path close the output."""
    spec = _spec(folder, "jobs.yaml", [("m0", [0]), ("bad", [0]), ("m1", [1]), ("m2", [2])],
                 "jobs")
    result = kprune("apply", spec, "--jobs", "2", "--audit-log", folder / "jobs.json").expect(1)
    lines = result.stdout.splitlines()
    assert sorted(lines[:-2]) == [_ok(folder, f"m{i}", 1, "jobs") for i in range(3)]
    assert lines[-2:] == ["3 ok, 1 failed, 0 skipped", f"audit log: {folder / 'jobs.json'}"]
    assert result.stderr == f"error: {folder / 'bad.keras'}: model 'bad': {NOT_ZIP}\n"


# --- --format json ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(folder: Path) -> dict[str, Any]:
    """Run a: m0 filter 0, bad; run b: m0 filters 0 and 2, m1 filter 1 (both direct, as JSON)."""
    out: dict[str, Any] = {}
    for name, entries in (("a", [("m0", [0]), ("bad", [0])]),
                          ("b", [("m0", [0, 2]), ("m1", [1])])):
        spec = _spec(folder, f"run-{name}.yaml", entries, f"run-{name}")
        log = folder / f"run-{name}.json"
        out[name] = kprune("apply", spec, "--format", "json", "--audit-log", log)
        out[f"{name}_log"] = log
    return out


def test_apply_json_is_one_document_and_errors_stay_on_stderr(folder: Path,
                                                              runs: dict[str, Any]) -> None:
    result = runs["a"].expect(1)
    assert result.stderr == f"error: {folder / 'bad.keras'}: model 'bad': {NOT_ZIP}\n"
    data = json.loads(result.stdout)  # the whole of stdout is the document
    log = json.loads(runs["a_log"].read_text())
    assert data["run_id"] == log["run_id"] and data["status"] == "partial"
    assert data["counts"] == {"ok": 1, "failed": 1, "skipped": 0}
    assert data["audit_log"] == str(runs["a_log"])
    m0, bad = data["models"]
    assert m0 == {"name": "m0", "status": "ok", "input": str(folder / "m0.keras"),
                  "output": str(folder / "run-a" / "m0.keras"), "written": True, "zeroed": 1,
                  "removed": 0, "layers": 1, "error": None, "impact": None}
    assert (bad["name"], bad["status"], bad["output"], bad["written"], bad["zeroed"]) == (
        "bad", "failed", None, None, 0)
    assert bad["error"] == f"{folder / 'bad.keras'}: model 'bad': {NOT_ZIP}"


def test_diff_json_and_exit_code(folder: Path, runs: dict[str, Any]) -> None:
    a, b = runs["a_log"], runs["b_log"]
    data = json.loads(kprune("diff", a, b, "--format", "json").expect(0).stdout)
    # m0's conv2d: {0} -> {0, 2}; m1's conv2d: nothing -> {1}; bad: failed -> absent, m1 absent -> ok
    assert data["old"] == str(a) and data["new"] == str(b) and data["differ"] is True
    assert data["statuses"] == [{"model": "bad", "old": "failed", "new": "absent"},
                                {"model": "m1", "old": "absent", "new": "ok"}]
    assert data["layers"] == [
        {"model": "m0", "layer": "conv2d", "added": [2], "dropped": [], "zeroed_to_removed": [],
         "removed_to_zeroed": [], "old": {"zeroed": 1, "removed": 0},
         "new": {"zeroed": 2, "removed": 0}},
        {"model": "m1", "layer": "conv2d", "added": [1], "dropped": [], "zeroed_to_removed": [],
         "removed_to_zeroed": [], "old": {"zeroed": 0, "removed": 0},
         "new": {"zeroed": 1, "removed": 0}}]
    differing = kprune("diff", a, b, "--exit-code").expect(1)
    assert differing.stderr == "" and "m0 conv2d: +2  (1 -> 2 zeroed)" in differing.stdout
    same = kprune("diff", a, a, "--exit-code", "--format", "json").expect(0)
    assert json.loads(same.stdout) == {"old": str(a), "new": str(a), "differ": False,
                                       "statuses": [], "layers": []}
    missing = kprune("diff", a, folder / "nope.json", "--exit-code", "--format", "json").expect(1)
    assert missing.stdout == "" and missing.stderr.startswith("error: ")


def test_verify_json(runs: dict[str, Any]) -> None:
    result = kprune("verify", runs["a_log"], "--format", "json").expect(0)
    assert result.stderr == ""
    assert json.loads(result.stdout) == {"audit_log": str(runs["a_log"]), "models": [
        {"name": "m0", "status": "ok", "problems": []},
        {"name": "bad", "status": "skipped", "problems": []}]}


def test_report_json_is_the_whole_of_stdout(runs: dict[str, Any]) -> None:
    data = json.loads(kprune("report", runs["b_log"], "--format", "json").expect(0).stdout)
    assert [(m["name"], m["zeroed"]) for m in data["models"]] == [("m0", 2), ("m1", 1)]


def test_plan_json_with_a_failed_model(folder: Path) -> None:
    spec = _spec(folder, "plan.yaml", [("m0", [3]), ("bad", [0])])
    result = kprune("plan", spec, "--format", "json", "--backend", "direct").expect(1)
    assert result.stderr == f"error: {folder / 'bad.keras'}: model 'bad': {NOT_ZIP}\n"
    data = json.loads(result.stdout)
    assert [(m["name"], m["status"]) for m in data["models"]] == [("m0", "ok"), ("bad", "failed")]
    assert data["models"][0]["layers"][0]["selected"] == [3]


def test_validate_json_lists_every_error_with_its_position(folder: Path) -> None:
    good = _spec(folder, "good.yaml", [("m0", [0]), ("m1", [1])])
    bad = write_spec(folder, "version: 1\nmodels:\n  - path: m.keras\n    layers:\n"
                             "      - name: conv\n        rules: [{index: [-1]}]\n"
                             "        bias: maybe\n", "invalid.yaml")
    result = kprune("validate", good, bad, "--format", "json").expect(2)
    assert result.stderr.splitlines() == [
        f"{bad}:6:26: models[0].layers[0].rules[0].index[0]: -1 is less than the minimum of 0",
        f"{bad}:7:15: models[0].layers[0].bias: 'maybe' is not one of ['zero', 'keep']"]
    assert json.loads(result.stdout) == {
        "valid": False,
        "files": [{"file": str(good), "valid": True, "models": 2, "layer_entries": 2},
                  {"file": str(bad), "valid": False, "models": None, "layer_entries": None}],
        "errors": [{"file": str(bad), "line": 6, "col": 26,
                    "path": "models[0].layers[0].rules[0].index[0]",
                    "message": "-1 is less than the minimum of 0"},
                   {"file": str(bad), "line": 7, "col": 15, "path": "models[0].layers[0].bias",
                    "message": "'maybe' is not one of ['zero', 'keep']"}]}


def test_pin_json(folder: Path) -> None:
    spec = _spec(folder, "pin.yaml", [("m0", [0])])
    digest = hashlib.sha256((folder / "m0.keras").read_bytes()).hexdigest()
    result = kprune("pin", spec, "--format", "json").expect(0)
    assert json.loads(result.stdout) == {"specs": [{
        "file": str(spec), "valid": True, "written": True,
        "models": [{"name": "m0", "path": "m0.keras", "change": "pinned", "was": None,
                    "sha256": digest}]}]}
    assert f"sha256: {digest}" in spec.read_text()


def test_merge_json(folder: Path) -> None:
    spec = _spec(folder, "shards.yaml", [("m0", [0]), ("m1", [1]), ("m2", [2])], "shards")
    for k in (1, 2):
        kprune("apply", spec, "--shard", f"{k}/2", "--audit-log",
               folder / f"shard{k}.json").expect(0)
    out = folder / "merged.json"
    result = kprune("merge", folder / "shard1.json", folder / "shard2.json", "-o", out,
                    "--format", "json").expect(0)
    merged = json.loads(out.read_text())
    assert json.loads(result.stdout) == {"output": str(out), "shards": 2, "models": 3,
                                         "status": "ok", "run_id": merged["run_id"]}


# --- --debug after the subcommand ---------------------------------------------------------------

def test_debug_after_the_subcommand_means_what_it_means_before(folder: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """An internal error: one line without --debug, the traceback with it in either place."""
    from kprune_batch import cli, quiet
    from kprune_batch.commands import validate

    def broken(files: list[str]) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(validate, "validate", broken)
    monkeypatch.setattr(quiet, "_DEBUG", False)
    spec = str(_spec(folder, "debug.yaml", [("m0", [0])]))
    plain = CliRunner().invoke(cli.cli, ["validate", spec])
    assert (plain.exit_code, plain.stderr) == (1, "error: internal error: RuntimeError: boom "
                                                  "(run with --debug for the traceback)\n")
    for args in (["--debug", "validate", spec], ["validate", spec, "--debug"]):
        monkeypatch.setattr(quiet, "_DEBUG", False)
        result = CliRunner().invoke(cli.cli, args)
        assert result.exit_code == 1 and quiet.debugging(), args
        assert "Traceback (most recent call last)" in result.stderr
        assert result.stderr.endswith("error: internal error: RuntimeError: boom (run with "
                                      "--debug for the traceback)\n")
    real = kprune("apply", _spec(folder, "debug-run.yaml", [("m0", [0])], "debug-run"),
                  "--debug", "--backend", "direct", "--format", "json").expect(0)
    assert json.loads(real.stdout)["counts"] == {"ok": 1, "failed": 0, "skipped": 0}


def test_license_is_the_one_the_metadata_names() -> None:
    root = Path(__file__).resolve().parent.parent
    assert 'license = "Apache-2.0"' in (root / "pyproject.toml").read_text()
    text = (root / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert os.path.getsize(root / "LICENSE") > 10_000


# --- the console script's exit ---------------------------------------------------------------------

ENTRY = ("import atexit, sys, types\n"
         "if sys.argv[1] == 'framework':\n"
         "    sys.modules['tensorflow'] = types.ModuleType('tensorflow')  # as if imported\n"
         "atexit.register(lambda: print('exit handler ran'))\n"
         "sys.argv = ['kprune', 'validate', *sys.argv[2:]]\n"
         "from kprune_batch.cli import entry\n"
         "entry()\n"
         "print('after entry')\n")


@pytest.mark.parametrize("framework", ["framework", "none"])
def test_console_script_exits_with_the_commands_code_and_output(folder: Path,
                                                                framework: str) -> None:
    """Once a framework was imported the console script ends without Python's finalization:
    the command's code, its lines and the exit handlers' are all there, as without one."""
    good = _spec(folder, "exit-good.yaml", [("m0", [0])])
    bad = write_spec(folder, "version: 1\nmodels: []\nextra: 1\n", "exit-bad.yaml")
    expected = {good: (0, [f"{good}: ok (1 model(s), 1 layer entry)"], ""),
                bad: (2, [], f"{bad}:2:9: models: must not be empty\n{bad}:3:1: extra: unknown key "
                             f"'extra' (allowed: defaults, models, output_dir, version)\n")}
    for spec, (code, out_lines, err) in expected.items():
        out = subprocess.run([sys.executable, "-c", ENTRY, framework, str(spec)],
                             capture_output=True, text=True, timeout=120)
        assert (out.returncode, out.stdout.splitlines(), out.stderr) == \
            (code, out_lines + ["exit handler ran"], err)


def test_console_script_imports_keras_without_sklearn_or_jax(small_cnn: Path,
                                                              tmp_path: Path) -> None:
    """`kprune apply` with the Keras backend: TensorFlow imported, scikit-learn and jax (each
    imported by Keras or TensorFlow only for features kprune does not use) not."""
    shutil.copy(small_cnn, tmp_path / "m.keras")
    spec = _spec(tmp_path, "spec.yaml", [("m", [0])])
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('LOADED', sorted(m for m in ('tensorflow', 'keras', "
            "'sklearn', 'jax') if m in sys.modules)))\n"
            "sys.argv = ['kprune', 'apply', sys.argv[1], '--backend', 'keras', '--audit-log', "
            "sys.argv[2]]\n"
            "from kprune_batch.cli import entry\n"
            "entry()\n")
    out = subprocess.run([sys.executable, "-c", code, str(spec), str(tmp_path / "log.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "LOADED ['keras', 'tensorflow']", out.stdout
    from kprune_batch import quiet

    with quiet._without(["kprune_no_such_module", "json"]):
        with pytest.raises(ImportError):
            import kprune_no_such_module  # noqa: F401
        import json as again  # already imported: not blocked
    assert again is json and "kprune_no_such_module" not in sys.modules
