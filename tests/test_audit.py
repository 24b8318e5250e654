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
