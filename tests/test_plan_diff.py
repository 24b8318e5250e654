"""`kprune plan SPEC --base REV`: the plan of a spec change, in real git repositories. Expected
changes are worked out here from the two versions' own plans (`kprune plan --format json` of
each version as a file of its own)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from conftest import REPO, kprune
from kprune_batch.ranges import compact_ranges

EXAMPLE = REPO / "specs" / "examples" / "digits.keras"

BASE = """\
# the reviewed spec
version: 1
models:
  - name: digits
    path: models/digits.keras
    layers:
      - name: conv1
        rules:
          - index: [4, 7]
      - match: "conv[23]"
        max_fraction: 0.25
        rules:
          - mean: {below: -0.004}
"""


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
                          "-c", "commit.gpgsign=false", *args], cwd=repo, capture_output=True,
                         text=True, check=True)
    return out.stdout


def repo_with(tmp_path: Path, committed: str, folder: str = "specs/team") -> Path:
    """A git repository holding the model and `committed` as FOLDER/spec.yaml (one commit)."""
    repo = tmp_path / "repo"
    spec_dir = repo / folder
    (spec_dir / "models").mkdir(parents=True)
    shutil.copy(EXAMPLE, spec_dir / "models" / "digits.keras")
    (spec_dir / "spec.yaml").write_text(committed)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "base")
    return spec_dir / "spec.yaml"


def selections(spec: Path, text: str) -> dict[str, dict[str, Any]]:
    """layer -> its plan entry, for `text` planned as a spec file beside `spec`."""
    other = spec.with_name("expected-" + hashlib.sha256(text.encode()).hexdigest()[:8] + ".yaml")
    other.write_text(text)
    try:
        data = json.loads(kprune("plan", other, "--format", "json", "--backend", "direct")
                          .expect(0).stdout)
    finally:
        other.unlink()
    return {layer["layer"]: layer for layer in data["models"][0]["layers"]}


def test_plan_base_shows_plus_minus_and_options_per_layer(tmp_path: Path) -> None:
    spec = repo_with(tmp_path, BASE)
    new = BASE.replace("index: [4, 7]", "index: [4, 5, 9]").replace("below: -0.004",
                                                                    "below: -0.002")
    spec.write_text(new)
    old_sel, new_sel = selections(spec, BASE), selections(spec, new)
    expected = {}
    for layer, after in new_sel.items():
        plus = sorted(set(after["selected"]) - set(old_sel[layer]["selected"]))
        minus = sorted(set(old_sel[layer]["selected"]) - set(after["selected"]))
        if plus or minus:
            expected[layer] = (plus, minus)
    assert "conv1" in expected and expected["conv1"][1] == [7]  # the edit does change things
    out = kprune("plan", spec, "--base", "HEAD", "--format", "json", cwd=tmp_path).expect(0)
    data = json.loads(out.stdout)
    assert data["base"] == "HEAD" and not data["new_spec"]
    (model,) = data["models"]
    assert model["state"] == "changed"
    got = {layer["layer"]: (layer["newly_selected"], layer["no_longer_selected"])
           for layer in model["layers"]}
    assert got == expected

    def rules_of(sel: dict[str, Any], f: int) -> list[str]:
        return [loc for loc, chosen in sel["rules"].items() if f in chosen]

    for layer in model["layers"]:  # why: the work tree's rules for +, those at REV for -
        name = layer["layer"]
        assert layer["rules"] == {
            **{str(f): rules_of(old_sel[name], f) for f in expected[name][1]},
            **{str(f): rules_of(new_sel[name], f) for f in expected[name][0]}}
    # text: one + and one - line per changed layer, with the counts
    text = kprune("plan", spec, "--base", "HEAD", cwd=tmp_path).expect(0).stdout.splitlines()
    assert text[0] == f"plan of {spec}: HEAD -> work tree"
    plus_total = sum(len(p) for p, _ in expected.values())
    minus_total = sum(len(m) for _, m in expected.values())
    assert text[1] == f"model digits: changed (+{plus_total} -{minus_total} filters)"
    conv1 = text.index(f"  conv1 (Conv2D, 16 filters): {len(old_sel['conv1']['selected'])} -> "
                       f"{len(new_sel['conv1']['selected'])} of 16 selected")
    index_rule = "models[0].layers[0].rules[0]"
    assert all(rules_of(new_sel["conv1"], f) == [index_rule] for f in expected["conv1"][0])
    assert text[conv1 + 1:conv1 + 3] == [
        f"    + {compact_ranges(expected['conv1'][0])} ({index_rule})",
        f"    - 7 ({index_rule})"]
    # markdown: a table row per changed layer
    md = kprune("plan", spec, "--base", "HEAD", "--format", "markdown").expect(0).stdout
    assert md.splitlines()[0] == f"### kprune plan: `{spec}` at `HEAD` → work tree"
    assert "| layer | selected | + newly selected |" in md
    assert (f"| `conv1` | {len(old_sel['conv1']['selected'])} → "
            f"{len(new_sel['conv1']['selected'])} of 16 | "
            f"{compact_ranges(expected['conv1'][0])} (`{index_rule}`) | 7 (`{index_rule}`) | — |"
            ) in md.splitlines()


def test_changed_options_and_removal_touches(tmp_path: Path) -> None:
    spec = repo_with(tmp_path, BASE)
    new = BASE.replace("  - name: digits\n", "  - name: digits\n    output: other.keras\n") \
        .replace("      - name: conv1\n", "      - name: conv1\n        action: remove\n")
    spec.write_text(new)
    data = json.loads(kprune("plan", spec, "--base", "HEAD", "--format", "json").expect(0).stdout)
    (model,) = data["models"]
    assert model["model"] == {"output": {"before": str(spec.parent / "pruned" / "digits.keras"),
                                         "after": str(spec.parent / "pruned" / "other.keras")}}
    conv1 = next(layer for layer in model["layers"] if layer["layer"] == "conv1")
    assert conv1["options"] == {"action": {"before": "zero", "after": "remove"}}
    assert conv1["newly_selected"] == conv1["no_longer_selected"] == []
    # the touches are exactly what `kprune plan` of the new spec says the removal touches
    plain = json.loads(kprune("plan", spec, "--format", "json", "--backend", "direct")
                       .expect(0).stdout)
    assert model["removal_touches"] == {"added": plain["models"][0]["removal_touches"],
                                        "dropped": []}
    assert model["removal_touches"]["added"][0]["layer"] == "conv1"
    text = kprune("plan", spec, "--base", "HEAD").expect(0).stdout.splitlines()
    assert "    action: zero -> remove" in text
    assert "  removal touches:" in text
    first = text[text.index("  removal touches:") + 1]
    assert first.startswith("    + conv1 (Conv2D): filters removed ")
    md = kprune("plan", spec, "--base", "HEAD", "--format", "markdown").expect(0).stdout
    assert "```diff\n+ conv1 (Conv2D): filters removed " in md


def test_unchanged_spec_and_a_spec_new_in_the_work_tree(tmp_path: Path) -> None:
    spec = repo_with(tmp_path, BASE)
    spec.write_text(BASE.replace("# the reviewed spec", "# only a comment changed"))
    out = kprune("plan", spec, "--base", "HEAD").expect(0)
    assert out.stdout.splitlines() == [f"plan of {spec}: HEAD -> work tree",
                                       "model digits: unchanged"]
    added = spec.with_name("added.yaml")
    added.write_text(BASE)
    data = json.loads(kprune("plan", added, "--base", "HEAD", "--format", "json")
                      .expect(0).stdout)
    assert data["new_spec"] is True
    sel = selections(spec, BASE)
    (model,) = data["models"]
    assert model["state"] == "added"
    assert {layer["layer"]: layer["newly_selected"] for layer in model["layers"]} == \
        {name: layer["selected"] for name, layer in sel.items() if layer["selected"]}


def test_a_model_failing_in_either_version_exits_1(tmp_path: Path) -> None:
    spec = repo_with(tmp_path, BASE)
    spec.write_text(BASE.replace("index: [4, 7]", "index: [4, 70]"))
    out = kprune("plan", spec, "--base", "HEAD").expect(1)
    error = ("model 'digits', layer 'conv1': models[0].layers[0].rules[0]: index 70 is out of "
             "range: the layer has 16 filters (valid: 0..15)")
    assert out.stderr.splitlines() == [f"error (in the work tree): {error}"]
    assert out.stdout.splitlines()[1:] == ["model digits: failed",
                                           f"  error (in the work tree): {error}"]


def test_either_version_invalid_exits_2_saying_which(tmp_path: Path) -> None:
    spec = repo_with(tmp_path, BASE.replace("version: 1", "version: 2"))
    spec.write_text(BASE.replace("max_fraction: 0.25", "max_fraction: lots"))
    out = kprune("plan", spec, "--base", "HEAD").expect(2)
    assert out.stderr.splitlines() == [
        f"{spec} (at HEAD):2:10: version: 2 must be the integer 1 (the only spec language "
        f"version this kprune knows)",
        f"{spec} (in the work tree):11:23: models[0].layers[1].max_fraction: 'lots' is not of "
        f"type 'number'"]
    assert out.stdout == ""


def test_a_revision_that_is_not_a_commit_or_no_repository_exits_2(tmp_path: Path) -> None:
    spec = repo_with(tmp_path, BASE)
    out = kprune("plan", spec, "--base", "no-such-branch").expect(2)
    assert out.stderr.splitlines() == [
        f"error: cannot read {spec} at no-such-branch: 'no-such-branch' is not a commit of the "
        f"repository"]
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "spec.yaml").write_text(BASE)
    out = kprune("plan", loose / "spec.yaml", "--base", "HEAD").expect(2)
    assert out.stderr.splitlines() == [
        f"error: cannot read {loose / 'spec.yaml'} at HEAD: {loose} is not in a git repository"]
    assert kprune("plan", spec, "--format", "markdown").expect(2).stderr.splitlines()[-1] == \
        "Error: --format markdown shows a spec change: give --base REV"


def test_a_repinned_model_is_planned_with_the_old_selection_on_the_new_file(
        tmp_path: Path) -> None:
    stale = "0" * 64  # quoted below: 64 digits alone would read as an integer
    committed = BASE.replace("    path: models/digits.keras\n",
                             f"    path: models/digits.keras\n    sha256: '{stale}'\n")
    spec = repo_with(tmp_path, committed)
    current = hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    spec.write_text(committed.replace(stale, current))
    data = json.loads(kprune("plan", spec, "--base", "HEAD", "--format", "json").expect(0).stdout)
    (model,) = data["models"]
    assert model["state"] == "changed" and model["errors"] == {}
    assert model["model"] == {"sha256": {"before": stale, "after": current}}
    assert model["layers"] == []
    # the work tree's own pin is checked: a stale pin there fails the model
    spec.write_text(committed)
    out = kprune("plan", spec, "--base", "HEAD").expect(1)
    assert out.stderr.splitlines() == [
        f"error (in the work tree): model 'digits': models/digits.keras changed since the spec "
        f"was written (sha256 {current[:4]}..., spec says 0000...); review its selection, then "
        f"update sha256 (kprune pin)"]
