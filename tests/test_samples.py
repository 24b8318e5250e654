"""Samples files (issue 15): every way a samples file can be wrong fails its own model with one
exact line naming the expected shape, nothing is ever unpickled, the other models go on.

One `kprune apply` run over a spec of many models (one TensorFlow start), checked by several tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import kprune, write_spec

WANT = "'image' (N, 8, 8, 3)"  # small_cnn's one input, as its config declares it


class _Evil:
    """Unpickling this would run a shell command creating MARKER: kprune must never do it."""

    marker = ""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _samples(folder: Path, rng: np.random.Generator) -> dict[str, str]:
    """Write one samples file per case; model name -> file name."""
    x = rng.normal(size=(6, 8, 8, 3)).astype("float32")
    files: dict[str, str] = {}

    def add(name: str, file: str) -> None:
        files[name] = file

    add("missing", "nothere.npz")
    (folder / "garbage.npz").write_bytes(b"\x00garbage, not numpy data" * 10)
    add("garbage", "garbage.npz")
    np.savez(folder / "good.npz", x=x)
    (folder / "truncated.npz").write_bytes((folder / "good.npz").read_bytes()[:300])
    add("truncated", "truncated.npz")
    evil = _Evil()
    _Evil.marker = str(folder / "PWNED")
    np.save(folder / "objects.npy", np.array([evil, 1], dtype=object), allow_pickle=True)
    add("objects", "objects.npy")
    np.savez(folder / "objects_y.npz", x=x, y=np.array([evil] * 6, dtype=object))
    add("objects_y", "objects_y.npz")
    np.save(folder / "flat.npy", x[..., 0])
    add("shape", "flat.npy")
    np.save(folder / "words.npy", np.array([["a"] * 3] * 6))
    add("words", "words.npy")
    np.savez(folder / "keys.npz", pixels=x)
    add("keys", "keys.npz")
    np.savez(folder / "short_y.npz", x=x, y=np.arange(4))
    add("short_y", "short_y.npz")
    np.savez(folder / "empty.npz", x=x[:0])
    add("empty", "empty.npz")
    bad = x.copy()
    bad[3, 1, 1, 1] = np.nan
    np.save(folder / "nan.npy", bad)
    add("nan", "nan.npy")
    np.save(folder / "nolabels.npy", x)
    add("nolabels", "nolabels.npy")  # with a max_accuracy_drop guard
    add("plain", "nolabels.npy")  # fine: measured, no accuracy
    np.savez(folder / "onehot.npz", x=x, y=np.eye(3, dtype="float32")[[0, 1, 2, 0, 1, 2]])
    add("onehot", "onehot.npz")  # fine: one-hot labels
    return files


@pytest.fixture(scope="module")
def run(small_cnn: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("samples")
    shutil.copy(small_cnn, folder / "m.keras")
    files = _samples(folder, np.random.default_rng(3))
    models = []
    for name, file in files.items():
        guard = "    impact: {max_accuracy_drop: 0.5}\n" if name == "nolabels" else ""
        models.append(f"  - name: {name}\n    path: m.keras\n    output: {name}.keras\n"
                      f"    samples: {file}\n{guard}"
                      f"    layers:\n      - {{name: conv2d_1, rules: [{{index: [1]}}]}}\n")
    spec = write_spec(folder, "version: 1\nmodels:\n" + "".join(models))
    result = kprune("apply", spec, "--audit-log", folder / "log.json")
    log = json.loads((folder / "log.json").read_text())
    return {"folder": folder, "result": result, "log": log,
            "models": {m["name"]: m for m in log["models"]}}


def test_each_bad_samples_file_fails_its_model_with_one_exact_line(run: dict[str, Any]) -> None:
    f = run["folder"]
    expected = {
        "missing": f"model 'missing': samples file {f / 'nothere.npz'} does not exist; check "
                   f"the model's 'samples' (relative to the spec file's folder)",
        "garbage": f"model 'garbage': samples file {f / 'garbage.npz'} is neither .npy nor .npz "
                   f"data (numpy would read it as a pickle, which kprune never does); "
                   f"expected {WANT}",
        "objects": f"model 'objects': samples file {f / 'objects.npy'} holds Python objects "
                   f"(dtype object), which kprune never unpickles; expected numbers {WANT}",
        "objects_y": f"model 'objects_y': samples file {f / 'objects_y.npz'} holds Python "
                     f"objects (dtype object), which kprune never unpickles; expected numbers "
                     f"{WANT}",
        "shape": f"model 'shape': samples in {f / 'flat.npy'} have shape (6, 8, 8), but the "
                 f"model's input 'image' expects (N, 8, 8, 3)",
        "words": f"model 'words': samples in {f / 'words.npy'} have dtype <U1, not numbers; the "
                 f"model's input 'image' expects (N, 8, 8, 3)",
        "keys": f"model 'keys': samples file {f / 'keys.npz'} has the input key(s) pixels, but "
                f"the model's input(s) are 'image': expected key 'x' (N, 8, 8, 3)",
        "short_y": f"model 'short_y': samples 'y' in {f / 'short_y.npz'} have shape (4,) and "
                   f"dtype int64; expected integer labels (N,) or one-hot labels (N, classes) "
                   f"with N = 6",
        "empty": f"model 'empty': samples file {f / 'empty.npz'} holds no samples; expected "
                 f"{WANT} with N >= 1",
        "nan": f"model 'nan': samples in {f / 'nan.npy'} hold NaN or infinite values; impact "
               f"cannot be measured on them",
        "nolabels": f"model 'nolabels': the impact guard max_accuracy_drop needs labels, but "
                    f"the samples file {f / 'nolabels.npy'} has no 'y'; add integer or one-hot "
                    f"labels under key 'y' to the .npz, or drop the guard",
    }
    errors = [line for line in run["result"].stderr.splitlines() if line]
    assert run["result"].code == 1, run["result"]
    truncated = [e for e in errors if e.startswith("error: model 'truncated': ")]
    assert errors == [f"error: {expected[m]}" if m in expected else truncated[0]
                      for m in run["models"] if m not in ("plain", "onehot")]
    assert truncated[0].startswith(f"error: model 'truncated': samples file "
                                   f"{f / 'truncated.npz'} is not a readable .npz file (")
    assert truncated[0].endswith(f"); expected {WANT}")
    for name, message in expected.items():
        model = run["models"][name]
        assert (model["status"], model["error"], model["output"]) == ("failed", message, None)
        assert not (f / "pruned" / f"{name}.keras").exists()


def test_nothing_is_ever_unpickled(run: dict[str, Any]) -> None:
    assert not (run["folder"] / "PWNED").exists()
    # the same file, loaded the way that would unpickle it, does run the command: the test can fail
    np.load(run["folder"] / "objects.npy", allow_pickle=True)
    assert (run["folder"] / "PWNED").exists()


def test_good_samples_are_measured_and_hashed(run: dict[str, Any], keras: Any) -> None:
    f = run["folder"]
    for name, file in (("plain", "nolabels.npy"), ("onehot", "onehot.npz")):
        model = run["models"][name]
        assert model["status"] == "ok"
        impact = model["impact"]
        assert impact["samples"] == {"path": str(f / file), "count": 6,
                                     "sha256": hashlib.sha256((f / file).read_bytes()).hexdigest()}
        assert impact["guards"] == {"max_relative_diff": None, "min_agreement": None,
                                    "max_accuracy_drop": None}
    assert run["models"]["plain"]["impact"]["accuracy_before"] is None
    # one-hot rows are read as their class index
    x = np.load(f / "onehot.npz")["x"]
    before = keras.saving.load_model(str(f / "m.keras")).predict(x, verbose=0).argmax(-1)
    labels = np.array([0, 1, 2, 0, 1, 2])
    assert run["models"]["onehot"]["impact"]["accuracy_before"] == float(np.mean(before == labels))
