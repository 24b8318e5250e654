"""`kprune plan SPEC --base REV`: what a spec change does, for the review of a pull request.

The spec as committed at REV and as it is in the work tree are both planned against the current
model files (reading models, writing nothing; the direct backend needs no TensorFlow), and the
two selections are compared per model and layer: filters newly selected (+), no longer selected
(-), changed options and changed removal touches. Paths in the committed spec resolve against
the spec's folder on disk, as the work tree's do: the question is what the edit changes, not
what the old model files were.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from kprune_batch.commands import EXIT_FAILED, EXIT_INVALID, Result
from kprune_batch.commands.report import _cell, _code, _md
from kprune_batch.errors import SpecError, SpecProblem
from kprune_batch.executor import STATUS_OK, ModelOutcome, Opener, open_auto, run_job
from kprune_batch.plan import ModelJob, compile_plan
from kprune_batch.ranges import compact_ranges
from kprune_batch.removal import describe
from kprune_batch.selection import LayerSelection
from kprune_batch.spec import Spec, parse_spec, read_spec

WORK_TREE = "in the work tree"


class BaseUnreadable(Exception):
    """git cannot give the spec at REV (no repository, no such revision)."""


@dataclass
class LayerChange:
    layer: str
    layer_class: str
    filters_total: int
    before: list[int]  # selected at REV ([] for a layer the old spec did not reach)
    after: list[int]
    options: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (before, after)
    kept_back: tuple[list[int], list[int]] | None = None
    # filter -> the rules selecting it: in the work tree for a + filter, at REV for a - filter
    why: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def added(self) -> list[int]:
        return sorted(set(self.after) - set(self.before))

    @property
    def dropped(self) -> list[int]:
        return sorted(set(self.before) - set(self.after))

    def to_json(self) -> dict[str, Any]:
        out = {"layer": self.layer, "layer_class": self.layer_class,
               "filters_total": self.filters_total, "newly_selected": self.added,
               "no_longer_selected": self.dropped, "before": self.before, "after": self.after,
               "options": {k: {"before": b, "after": a} for k, (b, a) in self.options.items()},
               "rules": {str(f): list(locs) for f, locs in sorted(self.why.items())}}
        if self.kept_back is not None:
            out["kept_back"] = {"before": self.kept_back[0], "after": self.kept_back[1]}
        return out


@dataclass
class ModelChange:
    name: str
    state: str  # added | dropped | changed | unchanged | failed
    errors: dict[str, str]  # "base" / "work tree" -> the model's error there
    model: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # input, output, sha256
    layers: list[LayerChange] = field(default_factory=list)
    touches_added: list[dict[str, Any]] = field(default_factory=list)
    touches_dropped: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "errors": self.errors,
                "model": {k: {"before": b, "after": a} for k, (b, a) in self.model.items()},
                "layers": [layer.to_json() for layer in self.layers],
                "removal_touches": {"added": self.touches_added,
                                    "dropped": self.touches_dropped}}


def plan_diff(spec_file: str, base: str, fmt: str = "text", opener: Opener = open_auto) -> Result:
    result = Result()
    at_base = f"at {base}"
    try:
        old_text = _committed(spec_file, base)
    except BaseUnreadable as exc:
        result.err.append(f"error: cannot read {spec_file} {at_base}: {exc}")
        result.return_code = EXIT_INVALID
        return result
    specs: dict[str, Spec | None] = {}
    for where, read in ((at_base, lambda: None if old_text is None else _parse(old_text,
                                                                               spec_file)),
                        (WORK_TREE, lambda: read_spec(spec_file))):
        try:
            specs[where] = read()
        except SpecError as exc:  # say which version is invalid
            label = f"{spec_file} ({where})"
            result.err.extend(SpecError(label, [dataclasses.replace(p, file=label)
                                                for p in exc.problems]).lines())
            result.return_code = EXIT_INVALID
    if result.return_code:
        return result
    old, new = specs[at_base], specs[WORK_TREE]
    assert new is not None
    # the committed spec's pins are not checked: a change that re-pins a retrained model is
    # reviewed by what the old selection means on the new file (the pin change is shown)
    old_jobs = compile_plan(old).jobs if old is not None else ()
    new_jobs = compile_plan(new).jobs
    outcomes: list[tuple[ModelJob, ModelOutcome]] = []

    def outcome_of(job: ModelJob) -> ModelOutcome:
        for done, outcome in outcomes:  # a model the change leaves alone is planned once
            if done == job:
                return outcome
        outcome = run_job(job, opener=opener, write=False)
        outcomes.append((job, outcome))
        return outcome

    before = {job.name: (job, outcome_of(dataclasses.replace(job, sha256=None)))
              for job in old_jobs}
    after = {job.name: (job, outcome_of(job)) for job in new_jobs}
    changes = [_compare(name, before.get(name), after.get(name), base)
               for name in [*after, *(n for n in before if n not in after)]]
    for change in changes:
        for where, error in change.errors.items():
            result.err.append(f"error ({where}): {error}")
            result.return_code = EXIT_FAILED
    header = {"spec": spec_file, "base": base, "new_spec": old is None}
    if fmt == "json":
        result.data = {**header, "models": [c.to_json() for c in changes]}
    elif fmt == "markdown":
        result.out.extend(_markdown(header, changes))
    else:
        result.out.extend(_text(header, changes))
    return result


def _committed(spec_file: str, rev: str) -> bytes | None:
    """The spec's text at `rev`, or None where `rev` has no such file (a spec the change adds).

    `REV:./name` is resolved by git relative to the folder it runs in (gitrevisions(7)), so a
    spec anywhere in the work tree is found without working out its path from the top."""
    folder = os.path.dirname(os.path.abspath(spec_file))
    name = os.path.basename(spec_file)

    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(["git", "-C", folder, *args], capture_output=True,
                                  stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError:
            raise BaseUnreadable("git is not installed") from None

    if rev.startswith("-"):  # never an option to git
        raise BaseUnreadable(f"'{rev}' is not a revision")
    found = git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    if found.returncode != 0:
        inside = git("rev-parse", "--git-dir")
        if inside.returncode != 0:
            raise BaseUnreadable(f"{folder} is not in a git repository")
        raise BaseUnreadable(f"'{rev}' is not a commit of the repository")
    commit = found.stdout.decode().strip()
    blob = git("cat-file", "blob", f"{commit}:./{name}")
    if blob.returncode != 0:
        if git("cat-file", "-e", f"{commit}:./{name}").returncode != 0:
            return None
        raise BaseUnreadable(_first_line(blob.stderr))
    return blob.stdout


def _first_line(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return text.splitlines()[0] if text else "git failed"


def _parse(raw: bytes, spec_file: str) -> Spec:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(spec_file, [SpecProblem(1, 1, "", f"the spec file is not UTF-8 text "
                                                          f"({exc.reason})", spec_file)]) from None
    # the file name places relative paths in the spec's folder on disk, as for the work tree
    return parse_spec(text, spec_file, sha256=hashlib.sha256(raw).hexdigest())


# --- comparing -------------------------------------------------------------------------------


Side = tuple[ModelJob, ModelOutcome]


def _compare(name: str, old: Side | None, new: Side | None, base: str) -> ModelChange:
    errors = {}
    for where, side in ((f"at {base}", old), (WORK_TREE, new)):
        if side is not None and side[1].status != STATUS_OK:
            errors[where] = side[1].error or "failed"
    state = "added" if old is None else "dropped" if new is None else "changed"
    change = ModelChange(name=name, state=state, errors=errors)
    if errors:
        change.state = "failed"
        return change
    if old is not None and new is not None:
        for key in ("input", "output", "sha256"):
            b, a = getattr(old[0], key), getattr(new[0], key)
            if b != a:
                change.model[key] = (b, a)
    old_layers = {s.path: s for s in old[1].layers} if old else {}
    new_layers = {s.path: s for s in new[1].layers} if new else {}
    for path in [*new_layers, *(p for p in old_layers if p not in new_layers)]:
        layer = _compare_layer(old_layers.get(path), new_layers.get(path))
        if layer is not None:
            change.layers.append(layer)
    old_touches = old[1].touched if old else []
    new_touches = new[1].touched if new else []
    change.touches_added = [t for t in new_touches if t not in old_touches]
    change.touches_dropped = [t for t in old_touches if t not in new_touches]
    if state == "changed" and not (change.model or change.layers or change.touches_added
                                   or change.touches_dropped):
        change.state = "unchanged"
    return change


def _compare_layer(old: LayerSelection | None, new: LayerSelection | None) -> LayerChange | None:
    some = new or old
    assert some is not None
    change = LayerChange(layer=some.path, layer_class=some.class_name,
                         filters_total=some.n_filters,
                         before=sorted(old.filters) if old else [],
                         after=sorted(new.filters) if new else [])
    if old is not None and new is not None:
        b, a = asdict(old.options), asdict(new.options)
        change.options = {k: (b[k], a[k]) for k in b if b[k] != a[k]}
        if old.kept_back != new.kept_back:
            change.kept_back = (list(old.kept_back), list(new.kept_back))
    if not (change.added or change.dropped or change.options or change.kept_back):
        return None
    change.why = {**{f: tuple(old.filters[f]) for f in change.dropped if old is not None},
                  **{f: tuple(new.filters[f]) for f in change.added if new is not None}}
    return change


def _because(layer: LayerChange, filters: list[int], code: bool = False) -> str:
    """'3, 9-10 (models[0].layers[1].rules[0]); 12 (... rules[0], ... rules[1])': the filters
    grouped by the rules that select them (those of the work tree for +, of REV for -)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for f in filters:
        groups.setdefault(layer.why.get(f, ()), []).append(f)
    show = _code if code else _cell
    parts = []
    for locs, chosen in groups.items():
        by = f" ({', '.join(show(loc) for loc in locs)})" if locs else ""
        parts.append(f"{compact_ranges(chosen)}{by}")
    return "; ".join(parts)


# --- rendering -------------------------------------------------------------------------------


def _counts(layer: LayerChange) -> str:
    return f"{len(layer.before)} -> {len(layer.after)} of {layer.filters_total}"


def _text(header: dict[str, Any], changes: list[ModelChange]) -> list[str]:
    c = _cell
    note = " (the spec is new: it is not in that revision)" if header["new_spec"] else ""
    lines = [f"plan of {c(header['spec'])}: {c(header['base'])} -> work tree{note}"]
    for m in changes:
        lines.append(f"model {c(m.name)}: {_state(m)}")
        for where, error in m.errors.items():
            lines.append(f"  error ({where}): {c(error)}")
        for key, (b, a) in m.model.items():
            lines.append(f"  {key}: {c(b)} -> {c(a)}")
        for layer in m.layers:
            lines.append(f"  {c(layer.layer)} ({layer.layer_class}, {layer.filters_total} "
                         f"filters): {_counts(layer)} selected")
            if layer.added:
                lines.append(f"    + {_because(layer, layer.added)}")
            if layer.dropped:
                lines.append(f"    - {_because(layer, layer.dropped)}")
            for key, (b, a) in layer.options.items():
                lines.append(f"    {key}: {c(b)} -> {c(a)}")
            if layer.kept_back is not None:
                lines.append(f"    kept back for round_to: "
                             f"{compact_ranges(layer.kept_back[0]) or 'none'} -> "
                             f"{compact_ranges(layer.kept_back[1]) or 'none'}")
        if m.touches_added or m.touches_dropped:
            lines.append("  removal touches:")
            lines.extend(f"    + {c(describe(t))}" for t in m.touches_added)
            lines.extend(f"    - {c(describe(t))}" for t in m.touches_dropped)
    return lines


def _state(m: ModelChange) -> str:
    added = sum(len(layer.added) for layer in m.layers)
    dropped = sum(len(layer.dropped) for layer in m.layers)
    counts = f"+{added} -{dropped} filters"
    return {"added": f"new in the work tree ({counts})",
            "dropped": f"no longer in the spec ({counts})",
            "changed": f"changed ({counts})", "unchanged": "unchanged",
            "failed": "failed"}[m.state]


def _markdown(header: dict[str, Any], changes: list[ModelChange]) -> list[str]:
    note = " (a new spec)" if header["new_spec"] else ""
    lines = [f"### kprune plan: {_code(header['spec'])} at {_code(header['base'])} → work "
             f"tree{note}", ""]
    lines += ["| model | change |", "|---|---|"]
    lines += [f"| {_md(m.name)} | {_md(_state(m))} |" for m in changes]
    for m in changes:
        if m.state == "unchanged":
            continue
        lines += ["", f"#### {_md(m.name)}", ""]
        for where, error in m.errors.items():
            lines.append(f"> **error ({where}):** {_md(error)}")
        for key, (b, a) in m.model.items():
            lines.append(f"- {key}: {_code(b)} → {_code(a)}")
        if m.layers:
            if m.errors or m.model:
                lines.append("")
            lines += ["| layer | selected | + newly selected | − no longer selected | "
                      "changed options |", "|---|---|---|---|---|"]
            for layer in m.layers:
                options = "<br>".join(f"{_md(k)}: {_md(b)} → {_md(a)}"
                                      for k, (b, a) in layer.options.items())
                if layer.kept_back is not None:
                    options += ("<br>" if options else "") + (
                        f"kept back: {compact_ranges(layer.kept_back[0]) or 'none'} → "
                        f"{compact_ranges(layer.kept_back[1]) or 'none'}")
                lines.append(f"| {_code(layer.layer)} | {_counts(layer).replace('->', '→')} | "
                             f"{_because(layer, layer.added, code=True) or '—'} | "
                             f"{_because(layer, layer.dropped, code=True) or '—'} | "
                             f"{options or '—'} |")
        if m.touches_added or m.touches_dropped:
            lines += ["", "Removal touches:", ""]
            lines += _fenced("diff", [f"+ {_cell(describe(t))}" for t in m.touches_added]
                             + [f"- {_cell(describe(t))}" for t in m.touches_dropped])
    return lines


def _fenced(info: str, body: list[str]) -> list[str]:
    """A fenced code block (GitHub colours a `diff` block's + and - lines) whose fence is longer
    than any backtick run in it, so no layer name can close it (CommonMark 4.5)."""
    run = max((len(r) for line in body for r in re.findall("`+", line)), default=0)
    fence = "`" * max(3, run + 1)
    return [f"{fence}{info}", *body, fence]
