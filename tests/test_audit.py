"""Audit log provenance: the spec's git commit and dirty state, with and without git."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kprune_batch.audit import git_provenance, run_status


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.invalid")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "s.yaml").write_text("version: 1\n")
    git(tmp_path, "add", "specs/s.yaml")
    git(tmp_path, "commit", "-q", "-m", "spec")
    return tmp_path


def test_committed_spec_is_clean(repo: Path) -> None:
    assert git_provenance(str(repo / "specs" / "s.yaml")) == {
        "commit": git(repo, "rev-parse", "HEAD"), "dirty": False}


def test_modified_spec_is_dirty(repo: Path) -> None:
    (repo / "specs" / "s.yaml").write_text("version: 1\nmodels: []\n")
    assert git_provenance(str(repo / "specs" / "s.yaml")) == {
        "commit": git(repo, "rev-parse", "HEAD"), "dirty": True}


def test_staged_but_uncommitted_change_is_dirty(repo: Path) -> None:
    (repo / "specs" / "s.yaml").write_text("version: 1\n# staged\n")
    git(repo, "add", "specs/s.yaml")
    assert git_provenance(str(repo / "specs" / "s.yaml"))["dirty"] is True


def test_untracked_spec_is_dirty(repo: Path) -> None:
    (repo / "specs" / "new.yaml").write_text("version: 1\n")
    assert git_provenance(str(repo / "specs" / "new.yaml")) == {
        "commit": git(repo, "rev-parse", "HEAD"), "dirty": True,
        "reason": "the spec file is not tracked by git"}


def test_outside_git(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("version: 1\n")
    assert git_provenance(str(tmp_path / "s.yaml")) == {
        "commit": None, "dirty": None, "reason": "the spec is not in a git work tree"}


def test_without_git_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s.yaml").write_text("version: 1\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert git_provenance(str(tmp_path / "s.yaml")) == {
        "commit": None, "dirty": None, "reason": "git is not available"}


@pytest.mark.parametrize("statuses, expected", [
    (["ok", "ok"], "ok"), (["ok", "failed"], "partial"), (["ok", "skipped"], "partial"),
    (["failed", "skipped"], "failed"),
])
def test_run_status(statuses: list[str], expected: str) -> None:
    assert run_status(statuses) == expected


@pytest.mark.parametrize("dist", ["keras", "tensorflow", "tensorflow-cpu", "numpy", "h5py",
                                  "jax", "torch", "PyYAML", "no-such-distribution"])
def test_versions_are_importlib_metadatas(dist: str) -> None:
    """The log's tool versions, found without importing importlib.metadata (~15 ms a run),
    are the ones it gives."""
    from importlib import metadata

    from kprune_batch.audit import _version

    try:
        expected = metadata.version(dist)
    except metadata.PackageNotFoundError:
        expected = None
    assert _version(dist) == expected


def test_versions_follow_sys_path_order_and_fall_back(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kprune_batch import audit

    first, second = tmp_path / "a", tmp_path / "b"
    for folder, version in ((first, "1.2.3"), (second, "9.9")):
        info = folder / f"Fake_Dist-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: Fake_Dist\n"
                                       f"Version: {version}\n\nVersion: 0\n")
    (second / "other-1.0.egg-info").write_text("Metadata-Version: 1.0\nName: other\n"
                                               "Version: 1.0\n")
    monkeypatch.setattr(audit, "_SITE", {})
    monkeypatch.setattr("sys.path", [str(tmp_path / "missing"), str(first), str(second)])
    assert audit._fast_version("fake.dist") == "1.2.3"
    assert audit._fast_version("absent") is None
    assert audit._fast_version("other") == audit._UNSETTLED  # an egg-info: importlib reads it
    assert audit._version("other") == "1.0"
