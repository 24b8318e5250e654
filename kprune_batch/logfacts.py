"""What an audit log says happened, for the commands that read logs (verify, report, diff).

A log may be crafted or edited by hand: the schema says each value has the right type, not that
the values agree with each other. `inconsistency` finds what the schema cannot (a record naming a
layer the model's entry does not list, a filter index beyond the layer's filter count, ...), so
that readers can index by what a log says without meeting a KeyError or an IndexError.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

from kprune_batch.ranges import compact_ranges

ZEROED, REMOVED = "zeroed", "removed"


def bn_channel(record: dict[str, Any], edit: dict[str, Any]) -> int:
    """The BatchNormalization channel a record's BN edit sets: the filter itself, unless the
    edit says otherwise (a follower behind a Concatenate, at the filter's offset there)."""
    return int(edit.get("channel", record["filter"]))


def constant_text(value: float | None, number: Callable[[float], str] = str) -> str:
    """A not-silent record's constant as the readers print it: null is an output that is not
    a finite number (NaN/inf: strict JSON cannot hold it; the record's notes tell the value)."""
    return "not finite (see the record's notes)" if value is None else number(value)


def inconsistency(log: dict[str, Any]) -> str | None:
    """The first way a schema-valid log contradicts itself, as 'json.path: what', or None."""
    models: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}
    for i, model in enumerate(log["models"]):
        where = f"models[{i}]"
        if model["name"] in models:
            return f"{where}.name: model '{model['name']}' is listed twice"
        if model["status"] == "ok" and model["output"] is None:
            return f"{where}.output: the model is ok but has no output"
        layers: dict[str, dict[str, Any]] = {}
        for j, sel in enumerate(model["layers"]):
            at = f"{where}.layers[{j}]"
            if sel["layer"] in layers:
                return f"{at}.layer: layer '{sel['layer']}' is listed twice"
            total = sel["filters_total"]
            if total < 1:
                return f"{at}.filters_total: {total} (a layer has at least one filter)"
            lists = [("selected", sel["selected"]), ("kept_back", sel.get("kept_back", []))]
            lists += [(f"rules['{loc}']", chosen) for loc, chosen in sel["rules"].items()]
            for key, values in lists:
                bad = next((v for v in values if not 0 <= v < total), None)
                if bad is not None:
                    return f"{at}.{key}: filter {bad} is out of range (the layer has {total})"
            layers[sel["layer"]] = sel
        models[model["name"]] = (model, layers)
        problem = _removal_inconsistency(model.get("removal"), layers, f"{where}.removal")
        if problem:
            return problem
    seen: set[tuple[str, str, int]] = set()
    for kind in (ZEROED, REMOVED):
        for k, record in enumerate(log[kind]):
            at = f"{kind}[{k}]"
            entry = models.get(record["model"])
            if entry is None:
                return f"{at}.model: names model '{record['model']}', which the log does not list"
            model, layers = entry
            if model["status"] != "ok":
                return f"{at}.model: a record for model '{model['name']}', whose status is " \
                       f"{model['status']}"
            sel = layers.get(record["layer"])
            if sel is None:
                return f"{at}.layer: names layer '{record['layer']}', which model " \
                       f"'{model['name']}' does not list"
            if record["layer_class"] != sel["layer_class"]:
                return f"{at}.layer_class: {record['layer_class']}, but the model lists " \
                       f"layer '{sel['layer']}' as {sel['layer_class']}"
            if not 0 <= record["filter"] < sel["filters_total"]:
                return f"{at}.filter: {record['filter']} is out of range (layer " \
                       f"'{sel['layer']}' has {sel['filters_total']})"
            key = (model["name"], sel["layer"], record["filter"])
            if key in seen:
                return f"{at}: filter {record['filter']} of layer '{sel['layer']}' is recorded " \
                       f"twice"
            seen.add(key)
            action = sel.get("options", {}).get("action")
            if action is not None and action != _ACTION[kind]:
                return f"{at}: filter {record['filter']} of layer '{sel['layer']}' is recorded " \
                       f"as {kind}, but the model lists the layer with action {action}"
            if kind == REMOVED and not model.get("removal"):
                return f"{at}: filter {record['filter']} of layer '{sel['layer']}' is recorded " \
                       f"as removed, but model '{model['name']}' has no removal"
    return _record_inconsistency(log, models)


# the record list each action writes (executor: a zeroing record, or a removal's)
_ACTION = {ZEROED: "zero", REMOVED: "remove"}


def _record_inconsistency(
        log: dict[str, Any],
        models: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]]) -> str | None:
    """Where a model's records disagree with what its entry says was edited: each layer's final
    selection is exactly the filters recorded for it, and a removal's index mapping and its
    'filters' touch remove exactly the removed records' filters. verify checks the files against
    the touches and the records: without this, a log whose removed list lost a record, or whose
    mapping was edited, would verify while report, diff and the review page show what did not
    happen."""
    recorded: dict[tuple[str, str], dict[str, set[int]]] = defaultdict(
        lambda: {ZEROED: set(), REMOVED: set()})
    for kind in (ZEROED, REMOVED):
        for record in log[kind]:
            recorded[(record["model"], record["layer"])][kind].add(record["filter"])
    for i, (name, (model, layers)) in enumerate(models.items()):
        if model["status"] != "ok":
            continue
        for j, sel in enumerate(model["layers"]):
            got = recorded.get((name, sel["layer"]), {ZEROED: set(), REMOVED: set()})
            edited = got[ZEROED] | got[REMOVED]
            if set(sel["selected"]) != edited:
                return f"models[{i}].layers[{j}].selected: layer '{sel['layer']}' selects " \
                       f"{_ranges(set(sel['selected']))}, but its records name " \
                       f"{_ranges(edited)}"
        removal = model.get("removal")
        if not removal:
            continue
        for layer, mapping in removal["mappings"].items():
            gone = {f for f, to in enumerate(mapping["old_to_new"]) if to == -1}
            got = recorded.get((name, layer), {ZEROED: set(), REMOVED: set()})[REMOVED]
            if gone != got:
                return f"models[{i}].removal.mappings['{layer}']: removes {_ranges(gone)}, but " \
                       f"the removed records of layer '{layer}' name {_ranges(got)}"
        for t, touch in enumerate(removal["touched"]):
            if touch["how"] != "filters":
                continue
            mapping = removal["mappings"].get(touch["layer"])
            gone = set(ranges_within(touch["removed"], touch["of"]) or ())
            if mapping is None:
                return f"models[{i}].removal.touched[{t}]: removes filters of layer " \
                       f"'{touch['layer']}', which the removal's mappings do not list"
            mapped = {f for f, to in enumerate(mapping["old_to_new"]) if to == -1}
            if len(mapping["old_to_new"]) != touch["of"] or gone != mapped:
                return f"models[{i}].removal.touched[{t}].removed: '{touch['removed']}' of " \
                       f"{touch['of']}, but mappings['{touch['layer']}'] removes " \
                       f"{_ranges(mapped)} of {len(mapping['old_to_new'])}"
    return None


def _ranges(filters: set[int]) -> str:
    return compact_ranges(sorted(filters)) or "none"


def ranges_within(text: str, n: int) -> list[int] | None:
    """'3, 9-12' -> [3, 9, 10, 11, 12] if every index is in range(n), else None (never expands
    a range beyond n: '0-999999999999' in a crafted log costs nothing)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        if not low.isdigit() or not (high or low).isdigit():
            return None
        first, last = int(low), int(high or low)
        if not first <= last < n:
            return None
        out.extend(range(first, last + 1))
    return out


def _removal_inconsistency(removal: dict[str, Any] | None, layers: dict[str, dict[str, Any]],
                           where: str) -> str | None:
    if not removal:
        return None
    for layer, mapping in removal["mappings"].items():
        old_to_new = mapping["old_to_new"]
        sel = layers.get(layer)
        if sel is None:
            return f"{where}.mappings: names layer '{layer}', which the model does not list"
        if len(old_to_new) != sel["filters_total"]:
            return f"{where}.mappings['{layer}']: {len(old_to_new)} entries for " \
                   f"{sel['filters_total']} filters"
        kept = [to for to in old_to_new if to != -1]
        if kept != list(range(len(kept))):
            return f"{where}.mappings['{layer}']: the kept filters are not numbered 0, 1, ... " \
                   f"in order"
    for t, touch in enumerate(removal["touched"]):
        at = f"{where}.touched[{t}]"
        if touch["of"] < 1:
            return f"{at}.of: {touch['of']} (a touched layer has at least one channel)"
        gone = ranges_within(touch["removed"], touch["of"])
        if gone is None:
            return f"{at}.removed: '{touch['removed']}' is not a list of channels below " \
                   f"{touch['of']}"
        if touch["kept"] != touch["of"] - len(set(gone)):
            return f"{at}.kept: {touch['kept']}, but {touch['of']} - {len(set(gone))} removed " \
                   f"leaves {touch['of'] - len(set(gone))}"
    return None


def filter_fates(log: dict[str, Any]) -> dict[tuple[str, str], dict[int, str]]:
    """(model, layer) -> {filter: 'zeroed' | 'removed'}: what happened to each filter a run
    edited, whichever list the log records it in (report and diff read only this)."""
    fates: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    for kind in (ZEROED, REMOVED):
        for record in log[kind]:
            fates[(record["model"], record["layer"])][int(record["filter"])] = kind
    return dict(fates)
