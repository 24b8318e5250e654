"""The core install: every path that needs no built model runs with no framework importable; the
rest fails its model with one line naming the extras; validate imports no numpy; the hook's files."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import FRAMEWORKS, REPO, layer_weights, without_frameworks

EXTRAS = "pip install 'kprune-batch[tensorflow]' (or [jax], [torch])"

# Runs many command lines in one process (one interpreter start for all cases): for each, the
# exit code, stdout, stderr, the framework imports attempted and whether numpy was imported yet.
DRIVER = '''
import contextlib, io, json, os, sys
import sitecustomize
from kprune_batch.cli import main


def run(cases):
    results = []
    for case in cases:
        out, err = io.StringIO(), io.StringIO()
        before = len(sitecustomize.ATTEMPTS)
        sys.argv = ["kprune", *case["args"]]
        os.chdir(case["cwd"])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code
        results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(),
                        "attempted": sitecustomize.ATTEMPTS[before:],
                        "numpy": "numpy" in sys.modules})
    return results


if __name__ == "__main__":  # --jobs workers are spawned: they import this file too
    print(json.dumps(run(json.loads(sys.argv[1]))))
'''


def run_cases(tmp_path: Path, cases: list[tuple[str, ...]]) -> list[dict[str, Any]]:
    (tmp_path / "driver.py").write_text(DRIVER)
    payload = json.dumps([{"args": list(c), "cwd": str(tmp_path)} for c in cases])
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), payload],
                          capture_output=True, text=True,
                          env={**os.environ, **without_frameworks(tmp_path / "blocker")},
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def stored_vars(path: Path) -> dict[str, list[np.ndarray]]:
    """{layer name: [vars/0, vars/1, ...]} of a .keras file, read with zipfile and h5py only:
    each layer group's `vars` carries the layer's name (keras/src/saving/saving_lib.py)."""
    import h5py

    out: dict[str, list[np.ndarray]] = {}
    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
        def visit(name: str, node: Any) -> None:
            if name.endswith("/vars") and "name" in node.attrs:
                out[str(node.attrs["name"])] = [node[str(i)][()] for i in range(len(node))]

        f.visititems(visit)
    return out


def strip_layer_name(src: Path, dest: Path) -> None:
    """A copy of `src` without the name Keras stores beside layer conv2d's variables: the direct
    backend cannot prove where conv2d is stored, so `auto` needs Keras for this file."""
    import h5py

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "model.weights.h5":
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "r+") as f:
                    for group in f["layers"].values():
                        if "vars" in group and group["vars"].attrs.get("name") == "conv2d":
                            del group["vars"].attrs["name"]
                data = buffer.getvalue()
            zout.writestr(info, data)


def spec(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_core_paths_run_without_any_framework(tmp_path: Path, keras: Any,
                                              small_cnn: Path) -> None:
    """validate, plan and apply (direct and auto), report, diff, pin and merge in a
    process where tensorflow, keras, jax and torch cannot be imported; models built here."""
    shutil.copy(small_cnn, tmp_path / "small.keras")
    shutil.copy(small_cnn, tmp_path / "other.keras")
    # one.yaml, and two.yaml's first model: small's conv2d_1 zeroed at `index`, written to `out`
    zero_small = """
        version: 1
        output_dir: {out}
        models:
          - name: small
            path: small.keras
            layers:
              - name: conv2d_1
                rules:
                  - index: {index}
        """
    one = spec(tmp_path, "one.yaml", zero_small.format(out="out", index="[0, 3]"))
    two = spec(tmp_path, "two.yaml", zero_small.format(out="out2", index="[3, 5]") + """
          - name: other
            path: other.keras
            layers:
              - name: conv2d
                rules:
                  - l1: {above: 0}
                max_fraction: 1.0
                allow_empty_layer: true
        """)
    spec(tmp_path, "remove.yaml", """
        version: 1
        models:
          - {name: small, path: small.keras,
             layers: [{name: conv2d, action: remove, rules: [{index: [1, 2]}]}]}
        """)
    pinned = spec(tmp_path, "pinned.yaml", one.read_text().replace("output_dir: out",
                                                                    "output_dir: out3"))
    cases = [
        ("validate", "one.yaml", "two.yaml"),
        ("plan", "one.yaml", "--backend", "direct"),
        ("plan", "remove.yaml"),  # a removal is planned from the config: no backend needed
        ("apply", "one.yaml", "--backend", "direct", "--audit-log", "a.json"),
        ("apply", "two.yaml", "--audit-log", "b.json"),  # auto: direct, proven
        # worker processes start with the same PYTHONPATH, so the blocker is theirs too
        ("apply", "two.yaml", "--jobs", "2", "--audit-log", "j.json", "--output-dir", "jobs"),
        ("report", "a.json"),
        ("report", "a.json", "--format", "html"),
        ("diff", "a.json", "b.json"),
        ("pin", "pinned.yaml"),
        ("apply", "pinned.yaml", "--backend", "direct", "--audit-log", "p.json"),
        ("apply", "two.yaml", "--shard", "1/2", "--audit-log", "s1.json",
         "--output-dir", "shards"),
        ("apply", "two.yaml", "--shard", "2/2", "--audit-log", "s2.json",
         "--output-dir", "shards"),
        ("merge", "s1.json", "s2.json", "--output", "merged.json"),
    ]
    results = run_cases(tmp_path, cases)
    by_case = dict(zip(cases, results, strict=True))
    out = {case: r["out"] for case, r in by_case.items()}
    for case, r in by_case.items():
        assert r["code"] == 0 and r["attempted"] == [], (case, r)
        assert "error" not in r["err"], (case, r)

    validated = by_case[("validate", "one.yaml", "two.yaml")]
    assert not validated["numpy"]  # validate came first: nothing had imported numpy yet
    assert validated["out"] == ("one.yaml: ok (1 model(s), 1 layer entry)\n"
                                "two.yaml: ok (2 model(s), 2 layer entries)\n")
    assert "  conv2d_1 (Conv2D, 8 filters): would zero 0, 3 (2 of 8, 25.0%)\n" in \
        out[("plan", "one.yaml", "--backend", "direct")]
    assert "  conv2d (Conv2D, 6 filters): would remove 1-2 (2 of 6, 33.3%)\n" in \
        out[("plan", "remove.yaml")]

    # the written weights, read with h5py here, against the input as Keras loads it
    before = layer_weights(keras, small_cnn)
    first = stored_vars(tmp_path / "out" / "small.keras")
    kernel, bias = before["conv2d_1"]["kernel"].copy(), before["conv2d_1"]["bias"].copy()
    kernel[..., [0, 3]] = 0
    bias[[0, 3]] = 0
    assert np.array_equal(first["conv2d_1"][0], kernel)
    assert np.array_equal(first["conv2d_1"][1], bias)
    stored_input = stored_vars(small_cnn)
    for layer, variables in before.items():
        if layer not in ("conv2d_1", "bn"):  # bn: channels 0 and 3 neutralised
            for i, value in enumerate(variables.values()):
                assert np.array_equal(stored_input[layer][i], value)  # the reader reads right
                assert np.array_equal(first[layer][i], value), layer
    # two.yaml's second model: l1 > 0 selects every filter of conv2d
    other = stored_vars(tmp_path / "out2" / "other.keras")
    assert not other["conv2d"][0].any() and not other["conv2d"][1].any()

    log = json.loads((tmp_path / "a.json").read_text())
    (model,) = log["models"]
    assert (model["status"], model["backend"], model["static_check"]) == ("ok", "direct", "ok")
    assert model["output"]["sha256"] == hashlib.sha256(
        (tmp_path / "out" / "small.keras").read_bytes()).hexdigest()
    for name in ("b.json", "j.json"):
        assert [(m["status"], m["backend"]) for m in
                json.loads((tmp_path / name).read_text())["models"]] == [("ok", "direct")] * 2
    assert (tmp_path / "jobs" / "other.keras").read_bytes() == \
        (tmp_path / "out2" / "other.keras").read_bytes()

    assert "  conv2d_1: 0, 3 (2 of 8, 25.0%)\n" in out[("report", "a.json")]
    assert out[("report", "a.json", "--format", "html")].startswith("<!DOCTYPE html>")
    # a.json zeroed small's 0, 3; b.json small's 3, 5 and all 6 of other's conv2d
    assert out[("diff", "a.json", "b.json")] == ("model other: status absent -> ok\n"
                                                 "other conv2d: +0-5  (0 -> 6 zeroed)\n"
                                                 "small conv2d_1: +5  -0  (2 -> 2 zeroed)\n")
    pin = yaml.safe_load((tmp_path / "pinned.yaml").read_text())
    assert pin["models"][0]["sha256"] == hashlib.sha256(small_cnn.read_bytes()).hexdigest()
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [m["name"] for m in merged["models"]] == ["small", "other"]


def test_verify_of_a_direct_run_needs_no_framework(tmp_path: Path, small_cnn: Path) -> None:
    shutil.copy(small_cnn, tmp_path / "small.keras")
    spec(tmp_path, "one.yaml", """
        version: 1
        models:
          - {name: small, path: small.keras, layers: [{name: conv2d_1, rules: [{index: [0, 3]}]}]}
        """)
    applied, verified = run_cases(tmp_path, [
        ("apply", "one.yaml", "--backend", "direct", "--audit-log", "a.json"),
        ("verify", "a.json")])
    assert applied["code"] == 0, applied
    assert (verified["code"], verified["attempted"]) == (0, []), verified
    assert verified["out"].startswith("ok      small: 2 zeroed filter(s) verified"), verified


def test_what_needs_a_built_model_fails_in_one_line_naming_the_extras(
        tmp_path: Path, small_cnn: Path) -> None:
    """action: remove, samples (impact guards, apoz), --probe, --backend keras and a file only
    Keras can edit: each fails its model with one line; the batch goes on; the log is written."""
    for name in ("a", "b", "c", "d"):
        shutil.copy(small_cnn, tmp_path / f"{name}.keras")
    strip_layer_name(small_cnn, tmp_path / "unproven.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(16, 8, 8, 3))
            .astype("float32"))
    spec(tmp_path, "needs.yaml", """
        version: 1
        output_dir: out
        models:
          - name: remove
            path: a.keras
            layers:
              - name: conv2d
                action: remove
                rules:
                  - index: [1]
          - name: guarded
            path: b.keras
            samples: x.npy
            impact: {max_relative_diff: 0.5}
            layers:
              - name: conv2d_1
                rules:
                  - index: [1]
          - name: zero
            path: c.keras
            layers:
              - name: conv2d_1
                rules:
                  - index: [2]
          - name: apoz
            path: d.keras
            samples: x.npy
            layers:
              - name: conv2d
                rules:
                  - apoz: {above: 0.99}
          - name: unproven
            path: unproven.keras
            layers:
              - name: conv2d
                rules:
                  - index: [0]
        """)
    spec(tmp_path, "plain.yaml", """
        version: 1
        output_dir: out2
        models:
          - {name: small, path: c.keras, layers: [{name: conv2d_1, rules: [{index: [2]}]}]}
        """)
    cases = [
        ("apply", "needs.yaml", "--audit-log", "needs.json"),
        ("apply", "plain.yaml", "--probe", "--audit-log", "probe.json"),
        ("apply", "plain.yaml", "--backend", "keras", "--audit-log", "keras.json"),
        ("plan", "plain.yaml", "--backend", "keras"),
    ]
    needs, probe, keras_backend, plan = run_cases(tmp_path, cases)
    unproven = tmp_path / "unproven.keras"
    assert (needs["code"], needs["err"]) == (1, (
        f"error: models[0].layers[0]: model 'remove': action: remove needs a Keras backend, and "
        f"none is installed; {EXTRAS}\n"
        f"error: models[1].samples: model 'guarded': measuring on samples needs a Keras backend, "
        f"and none is installed; {EXTRAS}\n"
        f"error: models[3].samples: model 'apoz': measuring on samples needs a Keras backend, "
        f"and none is installed; {EXTRAS}\n"
        f"error: model 'unproven': this model (the direct backend cannot edit it: cannot confirm "
        f"where layer 'conv2d' is stored (/layers/conv2d_1)) needs a Keras backend, and none is "
        f"installed; {EXTRAS}\n"))
    assert needs["out"] == (f"ok      zero: zeroed 1 filter(s) in 1 layer(s) -> "
                            f"{tmp_path / 'out' / 'c.keras'}\n"
                            f"1 ok, 4 failed, 0 skipped\n"
                            f"audit log: {tmp_path / 'needs.json'}\n")
    log = json.loads((tmp_path / "needs.json").read_text())
    assert [(m["name"], m["status"]) for m in log["models"]] == [
        ("remove", "failed"), ("guarded", "failed"), ("zero", "ok"), ("apoz", "failed"),
        ("unproven", "failed")]
    assert log["models"][0]["error"] == (
        f"models[0].layers[0]: model 'remove': action: remove needs a Keras backend, and none is "
        f"installed; {EXTRAS}")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.keras")) == ["c.keras"]
    del unproven

    for result, what, log_name in ((probe, "--probe", "probe.json"),
                                   (keras_backend, "--backend keras", "keras.json")):
        assert (result["code"], result["err"]) == (1, (
            f"error: model 'small': {what} needs a Keras backend, and none is installed; "
            f"{EXTRAS}\n")), result
        (model,) = json.loads((tmp_path / log_name).read_text())["models"]
        assert model["status"] == "failed"
    assert list((tmp_path / "out2").glob("*.keras")) == []
    assert plan["code"] == 1 and plan["err"] == (
        f"error: model 'small': --backend keras needs a Keras backend, and none is installed; "
        f"{EXTRAS}\n")


def test_validate_imports_neither_numpy_nor_a_framework() -> None:
    """With TensorFlow installed (this environment), `kprune validate` still imports none of it,
    nor numpy: the hook's start-up is yaml, the schema check and click."""
    code = textwrap.dedent("""
        import sys, runpy
        sys.argv = ["kprune", "validate", sys.argv[1]]
        try:
            runpy.run_module("kprune_batch", run_name="__main__")
        except SystemExit as exc:
            print("EXIT", exc.code)
        print(sorted({m.split(".")[0] for m in sys.modules} & {"numpy", "h5py", *%r}))
        """ % (FRAMEWORKS,))
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "specs/examples/digits.yaml")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.splitlines()[-2:] == ["EXIT 0", "[]"], proc.stdout + proc.stderr


# --- the pre-commit hook's default files ------------------------------------------------------

def hook_files() -> str:
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    return hook["files"]


@pytest.mark.parametrize("path, taken", [
    ("specs/resnet.yaml", True),
    ("specs/examples/digits.yaml", True),
    ("spec/a.yml", True),
    ("kprune/nightly.yaml", True),
    ("ml/vision/specs/resnet.yaml", True),
    ("models/resnet.kprune.yaml", True),
    ("resnet.kprune.yml", True),
    (".pre-commit-config.yaml", False),
    (".github/workflows/ci.yml", False),
    (".gitlab-ci.yml", False),
    ("docker-compose.yaml", False),
    ("k8s/job.yaml", False),
    ("myspecs/a.yaml", False),
    ("specs/README.md", False),
    ("specs/resnet.yaml.bak", False),
])
def test_hook_reads_only_spec_files(path: str, taken: bool) -> None:
    """pre-commit selects a file when re.search(files, path) matches its path relative to the
    repository root, with / separators (pre_commit/commands/run.py, filter_by_include_exclude)."""
    assert bool(re.search(hook_files(), path)) is taken


def test_the_hook_runs_for_real_on_specs_only(tmp_path: Path) -> None:
    """`pre-commit try-repo` of this checkout (its work tree, uncommitted changes included) in a
    spec repository: the hook environment is built from the core install, a valid spec passes,
    an invalid one fails with kprune's line, and the YAML that is not a spec (pre-commit's own
    config, a CI workflow) is never handed to it. Builds the environment: ~20-30 s."""
    pre_commit = shutil.which("pre-commit")
    if pre_commit is None:
        pytest.skip("pre-commit is not installed (the test extra installs it)")
    if not (REPO / ".git").exists():  # an sdist: pre-commit installs hooks from git only
        pytest.skip("the checkout is not a git repository")
    repo = tmp_path / "specs-repo"
    (repo / "specs").mkdir(parents=True)
    (repo / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(REPO / "specs/examples/digits.yaml", repo / "specs" / "good.yaml")
    (repo / "specs" / "bad.yaml").write_text("version: 2\nmodels: []\n")
    (repo / ".pre-commit-config.yaml").write_text("repos: []\n")
    (repo / ".github" / "workflows" / "ci.yml").write_text("on: push\njobs: {}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PRE_COMMIT_HOME"] = str(tmp_path / "pre-commit-home")
    proc = subprocess.run([pre_commit, "try-repo", str(REPO), "kprune-validate", "--all-files",
                           "--verbose"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    first = lines.index("- hook id: kprune-validate")
    body = [line for line in lines[first:] if line and not line.startswith("- ")]
    # kprune's own lines (pre-commit passes the files in its own order)
    assert "specs/good.yaml: ok (1 model(s), 3 layer entries)" in body, proc.stdout
    assert any(line.startswith("specs/bad.yaml:1:10: version: 2 must be the integer 1")
               for line in body), proc.stdout
    assert not any(".pre-commit-config" in line or "ci.yml" in line for line in body)


def test_only_a_missing_framework_reads_as_none_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A framework that is there but broken (a dependency of it missing) is not "none is
    installed": that import error goes on as it is."""
    from kprune_batch import quiet
    from kprune_batch.errors import BackendMissing

    def missing(name: str) -> Any:
        def fail() -> Any:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return fail

    monkeypatch.setattr(quiet, "import_keras", missing("jax.numpy"))
    with pytest.raises(BackendMissing) as caught:
        quiet.require_keras("--probe", model="m")
    assert (caught.value.render(), caught.value.missing) == (
        f"model 'm': --probe needs a Keras backend, and none is installed; {EXTRAS}", "jax")
    assert caught.value.for_model("n").render().startswith("model 'n': --probe needs")
    monkeypatch.setattr(quiet, "import_keras", missing("absl.logging"))
    with pytest.raises(ModuleNotFoundError, match="absl"):
        quiet.require_keras("--probe", model="m")
