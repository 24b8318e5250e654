"""`kprune verify AUDIT_LOG`: re-check written models against their log and their inputs, bit for bit."""
from __future__ import annotations

import copy
import os
from typing import Any, Callable

import numpy as np

from kprune_batch.audit import read_log
from kprune_batch.commands import EXIT_FAILED, Result
from kprune_batch.errors import AuditLogError, KpruneError, first_line
from kprune_batch.families import canonical_class, family_of
from kprune_batch.files import sha256_file

Loader = Callable[[str, str], Any]  # (path, model name) -> ModelWeights


def _keras_loader(path: str, name: str) -> Any:
    from kprune_batch.backends.keras_backend import KerasModelWeights

    return KerasModelWeights(path, name)


def verify(log_path: str, probe: bool = False, loader: Loader = _keras_loader) -> Result:
    result = Result()
    try:
        log = read_log(log_path)
    except AuditLogError as exc:
        result.err.append(f"error: {exc.render()}")
        result.return_code = EXIT_FAILED
        return result
    for model in log["models"]:
        if model["status"] != "ok":
            result.out.append(f"skipped {model['name']}: status {model['status']} in the log "
                              f"(nothing was written)")
            continue
        records = [r for r in log["zeroed"] + log.get("removed", [])
                   if r["model"] == model["name"]]
        removal = model.get("removal")
        problems = check_model(model, records, loader, probe and not removal, removal=removal)
        if problems:
            result.return_code = EXIT_FAILED
            for problem in problems:
                result.out.append(f"MISMATCH {model['name']}: {problem}")
        elif removal:
            removed = sum(1 for r in records if r["layer"] in removal["mappings"])
            result.out.append(
                f"ok      {model['name']}: {len(records) - removed} zeroed and {removed} removed "
                f"filter(s) verified: every weight equals the input's with the logged slices"
                f"{', folds' if removal['folded'] else ''} and edits applied")
        else:
            result.out.append(f"ok      {model['name']}: {len(records)} zeroed filter(s) verified, "
                              f"every other weight equals the input's")
    return result


def check_model(model: dict[str, Any], records: list[dict[str, Any]], loader: Loader,
                probe: bool, removal: dict[str, Any] | None = None) -> list[str]:
    """Every way the output differs from what the log says it is (empty: it verifies)."""
    problems: list[str] = []
    src, dest = model["input"]["path"], model["output"]["path"]
    unreadable = False
    for role, entry in (("input", model["input"]), ("output", model["output"])):
        if not os.path.exists(entry["path"]):
            problems.append(f"{role} file {entry['path']} is missing")
            continue
        try:
            digest = sha256_file(entry["path"])  # a FIFO or a device is refused, never read
        except OSError as exc:
            problems.append(f"{role} file {entry['path']} cannot be read: {exc.strerror}")
            unreadable = True
            continue
        if digest != entry["sha256"]:
            problems.append(f"{role} file {entry['path']} does not match the sha256 in the log "
                            f"(replaced or modified since the run)")
    if unreadable or not os.path.exists(dest) or not os.path.exists(src):
        return problems
    try:
        before = loader(src, model["name"])
        after = loader(dest, model["name"])
    except KpruneError as exc:
        return problems + [f"cannot open: {exc.render()}"]
    try:
        problems += _compare(before, after, records, removal)
        if probe and not problems:
            from kprune_batch.probe import measure

            try:
                measure(dest, copy.deepcopy(records), model["name"])
            except KpruneError as exc:
                problems.append(exc.render())
    finally:
        before.close()
        after.close()
    return problems


def expected_weights(before: Any, records: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """The input's weights with exactly the edits the records describe applied."""
    expected: dict[str, dict[str, np.ndarray]] = {}
    for path, node in before.graph.layers.items():
        if node.holds_weights:
            expected[path] = before.variables(path)
    for r in records:
        family = family_of(r["layer_class"])
        variables = expected[r["layer"]]
        family.filter_view(variables[family.kernel_name(variables) or family.kernel_var])[
            r["filter"]] = 0
        if r.get("bias") == "zeroed":
            variables["bias"][r["filter"]] = 0
        for edit in r.get("batchnorm", []):
            # a BN follower normalises the conv's channel axis, so its channel is the filter
            expected[edit["layer"]][edit["variable"]][int(r["filter"])] = edit["value"]
    return expected


def _after_removal(before: Any, expected: dict[str, dict[str, np.ndarray]],
                   removal: dict[str, Any]) -> set[tuple[str, str]]:
    """Apply the log's removal to `expected` (the zeroed input's weights): every touched layer
    sliced as recorded, every folded constant added to its consumer's bias. Returns the
    (layer, 'bias') pairs holding a fold (rounded once in float64 -> dtype: compared to 1e-6)."""
    from kprune_batch.logfacts import ranges_within
    from kprune_batch.removal import add_to_bias, apply_touch, fold_delta

    zeroed = {path: dict(v) for path, v in expected.items()}  # fold from the unsliced weights
    for t in removal["touched"]:
        gone = set(ranges_within(t["removed"], t["of"]) or ())  # checked by read_log
        apply_touch(t["how"], [i for i in range(t["of"]) if i not in gone], t["layer_class"],
                    before.graph.layers[t["layer"]].config, expected[t["layer"]])
    folded = set()
    for fold in removal["folded"]:
        layer = fold["layer"]
        node = before.graph.layers[layer]
        channels = [c["channel"] for c in fold["constants"]]
        delta = fold_delta(node.class_name, node.config, zeroed[layer], channels,
                           np.array([c["constant"] for c in fold["constants"]]))
        kept = removal["mappings"].get(layer, {}).get("old_to_new")
        if kept is not None:
            delta = delta[[c for c, to in enumerate(kept) if to >= 0]]
        add_to_bias(expected[layer], delta, next(iter(expected[layer].values())).dtype)
        folded.add((layer, "bias"))
    return folded


def _log_problems(before: Any, records: list[dict[str, Any]],
                  removal: dict[str, Any] | None) -> list[str]:
    """Where the log's records name what the input does not have (a crafted or mixed-up log):
    each is a mismatch, and the edits are not applied (they could not be)."""
    layers = before.graph.layers
    problems = []
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}  # one read per layer (13k records)

    def shapes_of(path: str) -> dict[str, tuple[int, ...]]:
        if path not in shapes:
            shapes[path] = {k: v.shape for k, v in before.variables(path).items()}
        return shapes[path]

    for r in records:
        node = layers.get(r["layer"])
        family = family_of(r["layer_class"])
        if node is None or not node.holds_weights:
            problems.append(f"the log names layer '{r['layer']}', which the input does not have")
            continue
        if family is None or canonical_class(node.class_name) != canonical_class(r["layer_class"]):
            problems.append(f"the log says layer '{r['layer']}' is a {r['layer_class']}, the "
                            f"input's is a {node.class_name}")
            continue
        variables = shapes_of(r["layer"])
        kernel = variables.get(family.kernel_name(variables) or family.kernel_var)
        n = family.n_filters(kernel) if kernel is not None else 0
        if not r["filter"] < n:
            problems.append(f"the log names filter {r['filter']} of layer '{r['layer']}', which "
                            f"has {n} in the input")
            continue
        for edit in r.get("batchnorm", []):
            bn = layers.get(edit["layer"])
            shape = shapes_of(edit["layer"]).get(edit["variable"]) \
                if bn is not None and bn.holds_weights else None
            if not shape or not r["filter"] < shape[0]:
                problems.append(f"the log edits {edit['layer']}/{edit['variable']}[{r['filter']}], "
                                f"which the input does not have")
    if removal:
        # a channel count is at most the size of the largest variable (a crafted 'of' of 10^15
        # must not become a list of 10^15 channels)
        largest = max((int(np.prod(shape)) for path, node in layers.items()
                       if node.holds_weights
                       for shape in shapes_of(path).values()), default=0)
        for t in removal["touched"] + removal["folded"]:
            node = layers.get(t["layer"])
            if node is None or not node.holds_weights:
                problems.append(f"the log's removal touches layer '{t['layer']}', which the "
                                f"input does not have")
            elif t.get("of", 0) > largest:
                problems.append(f"the log's removal says layer '{t['layer']}' has {t['of']} "
                                f"channels, more than any variable of the input holds")
    return problems


def _compare(before: Any, after: Any, records: list[dict[str, Any]],
             removal: dict[str, Any] | None = None) -> list[str]:
    problems = _log_problems(before, records, removal)
    if problems:
        return problems
    expected = expected_weights(before, records)
    try:
        folded = _after_removal(before, expected, removal) if removal else set()
    except (IndexError, KeyError, ValueError, TypeError) as exc:  # slices or folds the
        # input's variables cannot take (a crafted touch or fold)
        return [f"the log's removal does not fit the input's shapes ({_first_line(exc)})"]
    problems = []
    if set(after.graph.layers) != set(before.graph.layers):
        return ["the output's layers differ from the input's"]
    zeroed = {(r["layer"], r["filter"]) for r in records}
    for path, variables in expected.items():
        actual = after.variables(path)
        # paired by position, as Keras loads them (saving_lib: vars/0, vars/1, ...): a variable
        # created without a name is named "variable", "variable_1", ... by a counter of the
        # process (ConvNeXt's LayerScale), so the second model loaded has other names
        in_order = list(actual.values()) if len(actual) == len(variables) \
            and set(actual) != set(variables) else []
        for index, (name, want) in enumerate(variables.items()):
            got = in_order[index] if in_order else actual.get(name)
            if got is None or got.shape != want.shape:
                problems.append(f"layer '{path}' variable '{name}' is missing or has another shape")
                continue
            if np.array_equal(np.ascontiguousarray(want).view(np.uint8),
                              np.ascontiguousarray(got).view(np.uint8)):  # bits: -0.0, NaN
                continue
            if (path, name) in folded and np.allclose(got, want, rtol=1e-6, atol=1e-7):
                continue
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            problems.append(_describe(path, name, diff, before.graph.layers[path].class_name,
                                      zeroed))
    return problems


def _first_line(exc: BaseException) -> str:
    return first_line(exc)


def _describe(path: str, name: str, diff: np.ndarray, class_name: str,
              zeroed: set[tuple[str, int]]) -> str:
    family = family_of(class_name)
    where = ""
    if family is not None and name in family.kernel_names:
        per_filter = family.filter_view(diff).reshape(family.n_filters(diff.shape), -1).max(axis=1)
        bad = [int(f) for f in np.flatnonzero(per_filter)]
        kinds = ["zeroed filter" if (path, f) in zeroed else "untouched filter" for f in bad]
        where = f" {kinds[0]} {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
    elif diff.ndim == 1:
        bad = [int(i) for i in np.flatnonzero(diff)]
        where = f" element {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
    return f"layer '{path}' {name}{where}: max |difference| {float(np.nanmax(diff)):.6g}"
