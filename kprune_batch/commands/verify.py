"""`kprune verify AUDIT_LOG`: re-check written models against their log and their inputs, bit for bit."""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Callable

import numpy as np

from kprune_batch.audit import read_log
from kprune_batch.backends.direct import DirectBackendUnsupported, DirectModelWeights
from kprune_batch.commands import EXIT_FAILED, Result
from kprune_batch.errors import AuditLogError, KpruneError, first_line
from kprune_batch.families import canonical_class, family_of, member_family_of
from kprune_batch.files import sha256_file
from kprune_batch.logfacts import bn_channel
from kprune_batch.rule_kinds import STAT_KINDS

Opener = Callable[[str, str, str], Any]  # (path, model name, role) -> ModelWeights


def _direct_opener(path: str, name: str, role: str) -> DirectModelWeights:
    """The direct reader: h5py only, no framework imported."""
    try:
        return DirectModelWeights(path, name)
    except DirectBackendUnsupported as exc:
        raise DirectBackendUnsupported(f"cannot read the {role}: {exc}") from None


def _keras_opener(path: str, name: str, role: str) -> Any:
    from kprune_batch.backends.keras_backend import KerasModelWeights
    from kprune_batch.quiet import require_keras

    # the standard one line naming the extras when no framework is installed, not an
    # internal ModuleNotFoundError
    require_keras(f"reading the {role} with Keras", model=name)

    return KerasModelWeights(path, name)


def verify(log_path: str, probe: bool = False, root: str | None = None) -> Result:
    result = Result()
    try:
        log = read_log(log_path)
    except AuditLogError as exc:
        result.err.append(f"error: {exc.render()}")
        result.return_code = EXIT_FAILED
        return result
    relocate = _relocation(log, root)
    if root is not None:
        result.out.append(f"root    {relocate.old} -> {relocate.new}" if relocate.old is not None
                          else f"root    {relocate.new}: the log names no file to relocate")
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in log["zeroed"] + log.get("removed", []):
        by_model.setdefault(r["model"], []).append(r)
    checked: list[dict[str, Any]] = []  # --format json (README, "Machine-readable output")
    result.data = {"audit_log": log_path, "models": checked}
    for model in log["models"]:
        if model["status"] != "ok":
            result.out.append(f"skipped {model['name']}: status {model['status']} in the log "
                              f"(nothing was written)")
            checked.append({"name": model["name"], "status": "skipped", "problems": []})
            continue
        records = by_model.get(model["name"], [])
        removal = model.get("removal")
        problems, note = check_model(model, records, probe and not removal, removal=removal,
                                     relocate=relocate)
        suffix = f" ({note})" if note else ""
        checked.append({"name": model["name"], "status": "mismatch" if problems else "ok",
                        "problems": problems})
        if problems:
            result.return_code = EXIT_FAILED
            for problem in problems:
                result.out.append(f"MISMATCH {model['name']}: {problem}")
            if note:
                result.out.append(f"note     {model['name']}: {note}")
        elif removal:
            # counted from the log's removed list: a depthwise member loses filters without a
            # mapping of its own (its producers' mapping slices it)
            removed = sum(1 for r in log.get("removed", []) if r["model"] == model["name"])
            result.out.append(
                f"ok      {model['name']}: {len(records) - removed} zeroed and {removed} removed "
                f"filter(s) verified: every weight equals the input's with the logged slices"
                f"{', folds' if removal['folded'] else ''} and edits applied{suffix}")
        else:
            result.out.append(f"ok      {model['name']}: {len(records)} zeroed filter(s) verified, "
                              f"every other weight equals the input's{suffix}")
    return result


class _Relocation:
    """Where the log's files are now. `kprune verify LOG --root NEW`: the log's root (`old`: the
    longest common directory of every input and output path its models name, whatever their
    status) is replaced by NEW in each of them; a relative NEW is taken from the current
    directory, like every path on the command line. Without --root, the logged paths as they are."""

    def __init__(self, old: str | None, new: str | None):
        self.old, self.new = old, new

    def __call__(self, path: str) -> str:
        if self.old is None or self.new is None:
            return path
        rel = os.path.relpath(path, self.old)
        return self.new if rel == os.curdir else os.path.join(self.new, rel)

    def missing(self, role: str, logged: str) -> str:
        where = self(logged)
        if where == logged:
            return f"{role} file {logged} is missing"
        return f"{role} file {where} is missing (logged as {logged})"


def log_root(log: dict[str, Any]) -> str | None:
    """The longest common directory of every input and output path in the log (None: none)."""
    paths = [entry["path"] for m in log["models"] for entry in (m.get("input"), m.get("output"))
             if entry and entry.get("path")]
    if not paths:
        return None
    try:
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    except ValueError:  # paths on different drives (Windows): nothing in common to replace
        return None


def _relocation(log: dict[str, Any], root: str | None) -> _Relocation:
    if root is None:
        return _Relocation(None, None)
    return _Relocation(log_root(log), os.path.abspath(root))


def check_model(model: dict[str, Any], records: list[dict[str, Any]], probe: bool,
                removal: dict[str, Any] | None = None,
                relocate: _Relocation | None = None) -> tuple[list[str], str | None]:
    """Every way the output differs from what the log says it is (empty: it verifies), and
    why the Keras backend read the files when it did (None: the direct reader did)."""
    relocate = relocate or _Relocation(None, None)
    problems: list[str] = []
    src, dest = relocate(model["input"]["path"]), relocate(model["output"]["path"])
    unreadable = False
    for role, entry in (("input", model["input"]), ("output", model["output"])):
        path = relocate(entry["path"])
        if not os.path.exists(path):
            problems.append(relocate.missing(role, entry["path"]))
            continue
        try:
            digest = sha256_file(path)  # a FIFO or a device is refused, never read
        except OSError as exc:
            problems.append(f"{role} file {path} cannot be read: {exc.strerror}")
            unreadable = True
            continue
        if digest != entry["sha256"]:
            problems.append(f"{role} file {path} does not match the sha256 in the log "
                            f"(replaced or modified since the run)")
    if unreadable or not os.path.exists(dest) or not os.path.exists(src):
        return problems, None
    note = None
    try:
        problems += _compare_files(_direct_opener, src, dest, model["name"], records, removal)
    except DirectBackendUnsupported as exc:
        note = f"read with Keras: the direct reader {exc}"
        try:
            problems += _compare_files(_keras_opener, src, dest, model["name"], records, removal)
        except (KpruneError, ImportError) as err:  # no Keras installed: named, not a traceback
            return problems + [f"cannot open: {_render(err)}"], note
    except KpruneError as exc:  # a file neither backend reads (a zip bomb)
        return problems + [f"cannot open: {exc.render()}"], None
    if probe and not problems:
        from kprune_batch.probe import measure

        try:
            measure(dest, copy.deepcopy(records), model["name"])
        except KpruneError as exc:
            problems.append(exc.render())
    return problems, note


def _render(exc: BaseException) -> str:
    return exc.render() if isinstance(exc, KpruneError) else f"{type(exc).__name__}: {exc}"


def _compare_files(opener: Opener, src: str, dest: str, name: str,
                   records: list[dict[str, Any]], removal: dict[str, Any] | None) -> list[str]:
    """Open the input and the output alike and compare them. With the direct reader,
    DirectBackendUnsupported when it cannot read a file, cannot name the variables of a layer
    the removal slices or folds, or cannot tell what Keras would load (see _compare)."""
    before = opener(src, name, "input")
    try:
        after = opener(dest, name, "output")
        try:
            if removal and isinstance(before, DirectModelWeights):
                for layer in sorted({t["layer"] for t in removal["touched"]
                                     if t["how"] != "passes"} | {f["layer"]
                                                                 for f in removal["folded"]}):
                    for weights in (before, after):
                        # a layer that stores nothing (a Concatenate the removal passes) has
                        # nothing to name: only stored variables need the Keras reader
                        if layer in weights.graph.layers and not weights.named(layer) \
                                and weights.stored_shapes(layer):
                            raise DirectBackendUnsupported(
                                f"cannot name the variables of layer '{layer}' in the "
                                f"{'input' if weights is before else 'output'}")
            return _compare(before, after, records, removal)
        finally:
            after.close()
    finally:
        before.close()


def _stored(weights: Any, path: str) -> dict[str, np.ndarray]:
    """Every array of the layer: the direct reader's stored_variables (names where proven,
    dataset paths elsewhere), the Keras backend's variables."""
    if isinstance(weights, DirectModelWeights):
        return weights.stored_variables(path)
    return weights.variables(path)


def _shapes(weights: Any, path: str) -> dict[str, tuple[int, ...]]:
    if isinstance(weights, DirectModelWeights):
        return weights.stored_shapes(path)  # metadata only: no data read
    return {k: v.shape for k, v in weights.variables(path).items()}


def _log_problems(before: Any, records: list[dict[str, Any]],
                  removal: dict[str, Any] | None) -> list[str]:
    """Where the log's records name what the input does not have (a crafted or mixed-up log):
    each is a mismatch, and the edits are not applied (they could not be)."""
    layers = before.graph.layers
    problems = []
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}  # one read per layer (13k records)

    def shapes_of(path: str) -> dict[str, tuple[int, ...]]:
        if path not in shapes:
            shapes[path] = _shapes(before, path)
        return shapes[path]

    # per layer, not per record (a ranking over every conv of ResNet50 logs 6,640 records):
    # what is wrong with the layer itself, else how many filters it has
    facts: dict[tuple[str, str], str | int] = {}
    sizes: dict[tuple[str, str], int] = {}  # (BN layer, variable) -> channels, 0: none

    def layer_fact(layer: str, layer_class: str) -> str | int:
        node = layers.get(layer)
        family = member_family_of(layer_class)
        if node is None or not node.holds_weights:
            return f"the log names layer '{layer}', which the input does not have"
        if family is None or canonical_class(node.class_name) != canonical_class(layer_class):
            return f"the log says layer '{layer}' is a {layer_class}, the input's is a " \
                   f"{node.class_name}"
        variables = shapes_of(layer)
        kernel = variables.get(family.kernel_name(variables) or family.kernel_var)
        return family.n_filters(kernel) if kernel is not None else 0

    def channels(layer: str, variable: str) -> int:
        bn = layers.get(layer)
        shape = shapes_of(layer).get(variable) \
            if bn is not None and bn.holds_weights else None
        return shape[0] if shape else 0

    for r in records:
        key = (r["layer"], r["layer_class"])
        fact = facts.get(key)
        if fact is None:
            fact = facts[key] = layer_fact(*key)
        if isinstance(fact, str):
            problems.append(fact)
            continue
        if not r["filter"] < fact:
            problems.append(f"the log names filter {r['filter']} of layer '{r['layer']}', which "
                            f"has {fact} in the input")
            continue
        for edit in r.get("batchnorm", []):
            where = (edit["layer"], edit["variable"])
            size = sizes.get(where)
            if size is None:
                size = sizes[where] = channels(*where)
            if not bn_channel(r, edit) < size:
                problems.append(f"the log edits {edit['layer']}/{edit['variable']}"
                                f"[{bn_channel(r, edit)}], which the input does not have")
    if removal:
        # a channel count is at most the size of the largest variable (a crafted 'of' of 10^15
        # must not become a list of 10^15 channels)
        largest = max((int(np.prod(shape)) for path, node in layers.items()
                       if node.holds_weights
                       for shape in shapes_of(path).values()), default=0)
        for t in removal["touched"] + removal["folded"]:
            node = layers.get(t["layer"])
            # an operation node (`x + 3.0`) on the path holds no weights: it only passes
            if node is None or not node.holds_weights and t.get("how") != "passes":
                problems.append(f"the log's removal touches layer '{t['layer']}', which the "
                                f"input does not have")
            elif t.get("of", 0) > largest:
                problems.append(f"the log's removal says layer '{t['layer']}' has {t['of']} "
                                f"channels, more than any variable of the input holds")
    return problems


def _compare(before: Any, after: Any, records: list[dict[str, Any]],
             removal: dict[str, Any] | None = None) -> list[str]:
    """The output against the input with the log's edits applied, one layer at a time: each
    variable of each file read once, and only one layer's arrays held (a ranking over every
    conv of ResNet50 logs 6,640 records over 53 layers)."""
    problems = _log_problems(before, records, removal)
    if problems:
        return problems
    # an emptied Concatenate branch's layers are not in the output (removal: how "dropped")
    dropped = {t["layer"] for t in removal["touched"] if t["how"] == "dropped"} \
        if removal else set()
    if set(after.graph.layers) != set(before.graph.layers) - dropped:
        return ["the output's layers differ from the input's"]
    own: dict[str, list[dict[str, Any]]] = {}  # records by the layer whose filters they zero
    bn: dict[str, list[tuple[str, int, float]]] = {}  # BN edits by the BN layer they edit
    for r in records:
        own.setdefault(r["layer"], []).append(r)
        for edit in r.get("batchnorm", []):
            # a BN follower normalises the conv's channel axis: its channel is the filter, or
            # the filter's at a Concatenate's offset (batchnorm: neutralize_concat)
            bn.setdefault(edit["layer"], []).append((edit["variable"], bn_channel(r, edit),
                                                     edit["value"]))
    touches: dict[str, list[dict[str, Any]]] = {}
    folds: dict[str, dict[str, Any]] = {}
    for t in (removal or {}).get("touched", []):
        touches.setdefault(t["layer"], []).append(t)
    for fold in (removal or {}).get("folded", []):
        folds[fold["layer"]] = fold
    zeroed = {(r["layer"], r["filter"]) for r in records}
    problems = []
    for path, node in before.graph.layers.items():
        if not node.holds_weights or path in dropped:
            continue
        want = _stored(before, path)
        problem = _stats_problem(path, want, own.get(path, []))
        if problem:
            problems.append(problem)
        _zero(want, own.get(path, []), bn.get(path, []))
        if path in touches or path in folds:
            try:
                _remove(want, node, touches.get(path, []), folds.get(path), removal)
            except (IndexError, KeyError, ValueError, TypeError) as exc:  # slices or folds the
                # input's variables cannot take (a crafted touch or fold)
                return [f"the log's removal does not fit the input's shapes ({first_line(exc)})"]
        got = _stored(after, path)
        # paired by position, as Keras loads them (saving_lib: vars/0, vars/1, ...): a variable
        # created without a name is named "variable", "variable_1", ... by a counter of the
        # process (ConvNeXt's LayerScale), so the second model Keras loads has other names (the
        # direct reader keys such variables by dataset path, the same in both files)
        if len(got) == len(want) and set(got) != set(want):
            got = dict(zip(want, got.values()))
        for name, value in want.items():
            actual = got.get(name)
            if actual is None or actual.shape != value.shape:
                problems.append(f"layer '{path}' variable '{name}' is missing or has another shape")
                continue
            if actual.dtype != value.dtype:
                if isinstance(after, DirectModelWeights):  # Keras casts both to the layer's
                    # variable dtype on loading: the stored bits do not tell what it sees
                    raise DirectBackendUnsupported(
                        f"cannot tell what Keras loads for layer '{path}' {name}: stored as "
                        f"{actual.dtype} in the output, {value.dtype} in the input")
            elif np.array_equal(np.ascontiguousarray(value).view(np.uint8),
                                np.ascontiguousarray(actual).view(np.uint8)):  # bits: -0.0, NaN
                continue
            if path in folds and name == "bias" and \
                    np.allclose(actual, value, rtol=1e-6, atol=1e-7):
                continue  # a fold is rounded once in float64 -> dtype: compared to 1e-6
            diff = np.abs(actual.astype(np.float64) - value.astype(np.float64))
            mapping = (removal or {}).get("mappings", {}).get(path, {}).get("old_to_new")
            problems.append(_describe(path, name, diff, node.class_name, zeroed, mapping))
        extra = sorted(set(got) - set(want))
        if extra:
            problems.append(f"layer '{path}' has variable(s) the input's has not: "
                            f"{', '.join(extra)}")
        del want, got
    return problems


def _stats_problem(path: str, variables: dict[str, np.ndarray],
                   own: list[dict[str, Any]]) -> str | None:
    """Where the records' `stats` are not those of the input's kernel slices (report, diff and
    the review page show them to reviewers: a log that lies about them must not verify)."""
    from kprune_batch.rules import filter_stats

    if not own:
        return None
    family = member_family_of(own[0]["layer_class"])
    kernel = variables.get(family.kernel_name(variables) or family.kernel_var)
    if kernel is None:  # _log_problems named the layer already
        return None
    stats = {key: values.tolist() for key, values in  # floats: 6,640 records x 4 compares
             filter_stats(family.filter_view(kernel)).items()}
    bad = []
    for r in own:
        for key in STAT_KINDS:  # the schema requires these four (and allows more)
            logged, actual = r["stats"][key], stats[key][r["filter"]]
            if not math.isfinite(actual):
                actual = None  # a slice holding NaN/inf has no statistic: the run logs null
            # the run computed them from these bits in float64: equal up to the summation order
            # of another reader's memory layout
            if logged is None or actual is None:
                same = logged is None and actual is None
            else:
                same = math.isclose(logged, actual, rel_tol=1e-9, abs_tol=1e-12)
            if not same:
                bad.append((r["filter"], key, logged, actual))
                break
    if not bad:
        return None
    f, key, logged, actual = bad[0]
    more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"layer '{path}' filter {f}{more}: the log's {key} {_stat_text(logged)} is not " \
           f"the input slice's {_stat_text(actual)}"


def _stat_text(value: float | None) -> str:
    return "null" if value is None else f"{value:.6g}"


def _zero(variables: dict[str, np.ndarray], own: list[dict[str, Any]],
          bn_edits: list[tuple[str, int, float]]) -> None:
    """Apply a layer's zeroing records (kernel slice, bias) and the BN edits made to it."""
    if own:
        family = member_family_of(own[0]["layer_class"])
        kernel = family.kernel_name(variables) or family.kernel_var
        variables[kernel] = family.zeroed(variables[kernel], [r["filter"] for r in own])
        biased = [r["filter"] for r in own if r.get("bias") == "zeroed"]
        if biased:
            variables["bias"][biased] = 0
    for variable, channel, value in bn_edits:
        variables[variable][channel] = value


def _remove(variables: dict[str, np.ndarray], node: Any, touches: list[dict[str, Any]],
            fold: dict[str, Any] | None, removal: dict[str, Any]) -> None:
    """Apply the log's removal to one layer's (zeroed) input weights: sliced as each touch
    records, then its folded constants added to its bias (computed from the unsliced weights,
    as the run did)."""
    from kprune_batch.logfacts import ranges_within
    from kprune_batch.removal import add_to_bias, apply_touch, fold_delta

    unsliced = dict(variables)  # slicing makes new arrays
    for t in touches:
        gone = set(ranges_within(t["removed"], t["of"]) or ())  # checked by read_log
        apply_touch(t["how"], [i for i in range(t["of"]) if i not in gone], t["layer_class"],
                    node.config, variables)
    if fold is not None:
        channels = [c["channel"] for c in fold["constants"]]
        delta = fold_delta(node.class_name, node.config, unsliced, channels,
                           np.array([c["constant"] for c in fold["constants"]]))
        kept = removal["mappings"].get(node.path, {}).get("old_to_new")
        if kept is not None:
            delta = delta[[c for c, to in enumerate(kept) if to >= 0]]
        add_to_bias(variables, delta, next(iter(variables.values())).dtype,
                    node.class_name, node.config)


def _describe(path: str, name: str, diff: np.ndarray, class_name: str,
              zeroed: set[tuple[str, int]], old_to_new: list[int] | None = None) -> str:
    """Where a variable differs: the filters of a kernel (by the input's filter numbers, with
    the output's where a removal renumbered them), else the elements of a vector."""
    family = family_of(class_name)
    where = ""
    if not np.any(diff != 0):  # only the bits differ (-0.0 for 0.0): no element to name
        where = " (bits only)"
    elif family is not None and name in family.kernel_names:
        per_filter = family.filter_view(diff).reshape(family.n_filters(diff.shape), -1).max(axis=1)
        bad = [int(f) for f in np.flatnonzero(per_filter)]
        new_to_old = {to: f for f, to in enumerate(old_to_new or []) if to >= 0}
        first = new_to_old.get(bad[0], bad[0])
        kind = "zeroed filter" if (path, first) in zeroed else "untouched filter"
        where = f" {kind} {first}" + (f" (output's {bad[0]})" if old_to_new else "") + \
            (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
    elif diff.ndim == 1:
        bad = [int(i) for i in np.flatnonzero(diff)]
        where = f" element {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
    return f"layer '{path}' {name}{where}: max |difference| {float(np.nanmax(diff)):.6g}"
