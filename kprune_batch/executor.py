"""The executor: opens each job's model through a backend, selects filters, edits, writes outputs."""
from __future__ import annotations

import contextlib
import difflib
import errno
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kprune_batch.backends.base import ModelWeights
from kprune_batch.errors import KpruneError, ModelError
from kprune_batch.families import Family, canonical_class, family_of
from kprune_batch.files import (NotRegularFile, atomic_write, fsync_file, open_regular,
                                sha256_file)
from kprune_batch.plan import LayerOp, ModelJob, Options
from kprune_batch.rules import RuleError, filter_stats, select
from kprune_batch.silence import channel_fate

STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"


@dataclass
class LayerSelection:
    """What the rules select in one layer (union over every entry resolving to it)."""

    path: str
    class_name: str
    family: Family
    n_filters: int
    options: Options
    max_fraction: float
    allow_empty_layer: bool
    entries: list[str]  # locations of the layer entries that resolve to this layer
    by_rule: dict[str, list[int]]  # rule location -> filters it selects
    filters: dict[int, list[str]]  # filter -> every rule location that selects it (sorted)
    stats: dict[int, dict[str, float]] = field(default_factory=dict)
    group: list[str] = field(default_factory=list)  # coupled members (action: remove)
    kept_back: list[int] = field(default_factory=list)  # selected but kept for round_to

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.path, "layer_class": self.class_name, "filters_total": self.n_filters,
                "entries": self.entries, "max_fraction": self.max_fraction,
                "rules": self.by_rule, "selected": sorted(self.filters)}


@dataclass
class ModelOutcome:
    job: ModelJob
    status: str
    error: str | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None
    layers: list[LayerSelection] = field(default_factory=list)
    zeroed: list[dict[str, Any]] = field(default_factory=list)
    backend: str = "keras"
    backend_note: str | None = None  # why the direct backend was not used, when it was not
    probe: Any = "skipped"
    static_check: str = "skipped"
    removed: list[dict[str, Any]] = field(default_factory=list)
    removal: dict[str, Any] | None = None
    touched: list[dict[str, Any]] = field(default_factory=list)  # plan only: Touch.to_json()
    written: bool = True  # False: the output already held exactly these bytes and was kept


Opener = Callable[[ModelJob], ModelWeights]


def open_keras(job: ModelJob) -> ModelWeights:
    """Load the model with Keras (safe mode): the reference backend, for every model."""
    from kprune_batch.backends.keras_backend import KerasModelWeights

    return KerasModelWeights(job.input, job.name)


def open_direct(job: ModelJob) -> ModelWeights:
    """Edit the file with h5py only; a model the direct backend cannot prove fails."""
    from kprune_batch.backends.direct import DirectBackendUnsupported, DirectModelWeights

    try:
        return DirectModelWeights(job.input, job.name)
    except DirectBackendUnsupported as exc:
        raise ModelError(f"the direct backend cannot edit this file: {exc}", model=job.name,
                         file=job.input, hint="use --backend auto or --backend keras") from None


def open_auto(job: ModelJob) -> ModelWeights:
    """The direct backend where it can prove its mapping, else Keras (the reason is recorded)."""
    from kprune_batch.backends.direct import DirectBackendUnsupported, DirectModelWeights

    try:
        return DirectModelWeights(job.input, job.name)
    except DirectBackendUnsupported as exc:
        weights = open_keras(job)
        weights.fallback_reason = str(exc)  # type: ignore[attr-defined]
        return weights


OPENERS: dict[str, Opener] = {"auto": open_auto, "direct": open_direct, "keras": open_keras}


# --- selection ---------------------------------------------------------------------------------


def _resolve(op: LayerOp, weights: ModelWeights, model: str) -> list[str]:
    """The layer paths a layer entry names (exact name) or matches (glob over convolution layers)."""
    graph = weights.graph
    if op.name is not None:
        if op.name not in graph.layers:
            near = difflib.get_close_matches(op.name, list(graph.layers), n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'?" if near else "run 'kprune plan' to list the layers"
            raise ModelError(f"{op.loc}: no layer named '{op.name}' in the model", model=model,
                             hint=hint)
        node = graph.layers[op.name]
        if family_of(node.class_name) is None:
            raise ModelError(f"{op.loc}: layer '{op.name}' is a {node.class_name} layer; only "
                             f"convolution layers have filters", model=model)
        if op.type is not None and canonical_class(node.class_name) != canonical_class(op.type):
            raise ModelError(f"{op.loc}: layer '{op.name}' is a {node.class_name}, not a {op.type}",
                             model=model)
        return [op.name]
    convs = [p for p, n in graph.layers.items() if family_of(n.class_name) is not None]
    typed = [p for p in convs if op.type is None
             or canonical_class(graph.layers[p].class_name) == canonical_class(op.type)]
    found = [p for p in typed if fnmatch.fnmatchcase(p, op.match or "")]
    if not found:
        near = difflib.get_close_matches(op.match or "", typed, n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'?" if near else (
            f"the model's convolution layers are: {', '.join(typed[:8])}"
            + (" ..." if len(typed) > 8 else "") if typed else "the model has no such layers")
        kind = f"{op.type} " if op.type else "convolution "
        raise ModelError(f"{op.loc}: match '{op.match}' matches no {kind}layer", model=model,
                         hint=hint)
    return found


def select_filters(job: ModelJob, weights: ModelWeights) -> list[LayerSelection]:
    """Evaluate every rule of the job on the input model's weights; check the guards."""
    selections: dict[str, LayerSelection] = {}
    for op in job.ops:
        for path in _resolve(op, weights, job.name):
            node = weights.graph.layers[path]
            family = family_of(node.class_name)
            assert family is not None
            sel = selections.get(path)
            if sel is None:
                kernel = _kernel(weights, path, family, job.name)
                sel = selections[path] = LayerSelection(
                    path=path, class_name=node.class_name, family=family,
                    n_filters=family.n_filters(kernel.shape), options=op.options,
                    max_fraction=op.options.max_fraction,
                    allow_empty_layer=op.options.allow_empty_layer, entries=[], by_rule={},
                    filters={})
                sel.stats = _slices_and_stats(kernel, family)
            else:
                for key in ("bias", "batchnorm", "action"):
                    mine, theirs = getattr(op.options, key), getattr(sel.options, key)
                    if mine != theirs:
                        raise ModelError(
                            f"{op.loc} sets {key}: {mine}, but {sel.entries[0]} sets {key}: "
                            f"{theirs} for the same layer", model=job.name, layer=path,
                            hint="give both entries the same value")
                sel.max_fraction = min(sel.max_fraction, op.options.max_fraction)
                sel.allow_empty_layer = sel.allow_empty_layer and op.options.allow_empty_layer
            sel.entries.append(op.loc)
            slices = sel.family.filter_view(_kernel(weights, path, family, job.name))
            for rule in op.rules:
                try:
                    chosen = select(rule.kind, rule.params, slices)
                except RuleError as exc:
                    raise ModelError(f"{rule.loc}: {exc.message}", model=job.name, layer=path,
                                     hint=exc.hint) from exc
                sel.by_rule[rule.loc] = chosen
                for f in chosen:
                    sel.filters.setdefault(f, []).append(rule.loc)
    for sel in selections.values():
        sel.filters = {f: sorted(set(locs), key=_loc_key) for f, locs in sorted(sel.filters.items())}
        _check_guards(sel, job.name)
    return list(selections.values())


def _loc_key(loc: str) -> list[int]:
    return [int(part.split("]")[0]) for part in loc.split("[")[1:]]


def _kernel(weights: ModelWeights, path: str, family: Family, model: str) -> np.ndarray:
    variables = weights.variables(path)
    name = family.kernel_name(variables)
    if name is not None:
        return variables[name]
    raise ModelError(f"has no '{family.kernel_var}' variable (is it built?)", model=model,
                     layer=path)


def _slices_and_stats(kernel: np.ndarray, family: Family) -> dict[int, dict[str, float]]:
    stats = filter_stats(family.filter_view(kernel))
    return {f: {k: float(v[f]) for k, v in stats.items()} for f in range(len(stats["mean"]))}


def _check_guards(sel: LayerSelection, model: str) -> None:
    count, total = len(sel.filters), sel.n_filters
    if not count:
        return
    rules = ", ".join(f"{loc} ({len(chosen)})" for loc, chosen in sel.by_rule.items() if chosen)
    if count == total and not sel.allow_empty_layer:
        raise ModelError(
            f"the rules would zero all {total} filters of the layer (selected by {rules})",
            model=model, layer=sel.path,
            hint="if that is intended, set allow_empty_layer: true (and max_fraction: 1.0) on "
                 "the entry")
    if count > sel.max_fraction * total + 1e-9:
        raise ModelError(
            f"the rules would zero {count} of {total} filters ({100.0 * count / total:.1f}%), "
            f"more than max_fraction {sel.max_fraction:g} allows "
            f"({int(sel.max_fraction * total + 1e-9)}); selected by {rules}",
            model=model, layer=sel.path,
            hint="tighten the rules or raise max_fraction for this entry")


# --- editing ---------------------------------------------------------------------------------


def edit_model(job: ModelJob, weights: ModelWeights,
               selections: list[LayerSelection]) -> list[dict[str, Any]]:
    """Zero the selected filters (kernel slice, bias, BN follower) in `weights`; return records."""
    records: list[dict[str, Any]] = []
    pending_bn: dict[tuple[str, str], np.ndarray] = {}
    original: dict[str, dict[str, np.ndarray]] = {}

    def input_variables(path: str) -> dict[str, np.ndarray]:
        if path not in original:
            original[path] = weights.variables(path)
        return original[path]

    for sel in selections:
        if not sel.filters:
            continue
        variables = input_variables(sel.path)
        kernel_name = sel.family.kernel_name(variables)
        assert kernel_name is not None  # select_filters read the kernel already
        filters = list(sel.filters)
        weights.assign(sel.path, kernel_name, sel.family.zeroed(variables[kernel_name], filters))
        bias = variables.get("bias")
        if bias is not None and sel.options.bias == "zero":
            new_bias = bias.copy()
            new_bias[filters] = 0
            weights.assign(sel.path, "bias", new_bias)
        for f in filters:
            pre = 0.0 if bias is None or sel.options.bias == "zero" else float(bias[f])
            fate = channel_fate(weights.graph, sel.path, f, pre,
                                sel.options.batchnorm == "neutralize", input_variables)
            for edit in fate.edits:
                key = (edit.layer, edit.variable)
                if key not in pending_bn:
                    pending_bn[key] = input_variables(edit.layer)[edit.variable].copy()
                pending_bn[key][edit.channel] = edit.value
            records.append({
                "model": job.name,
                "layer": sel.path,
                "layer_class": sel.class_name,
                "filter": f,
                "rules": sel.filters[f],
                "stats": sel.stats[f],
                "bias": "none" if bias is None else ("zeroed" if sel.options.bias == "zero"
                                                     else "kept"),
                "batchnorm": [{"layer": e.layer, "variable": e.variable, "value": e.value}
                              for e in fate.edits],
                "silent": fate.silent,
                "constant": None if fate.silent else fate.constant,
                "notes": fate.notes,
                **({"group": sel.group} if len(sel.group) > 1 else {}),
            })
    for (layer, variable), value in pending_bn.items():
        weights.assign(layer, variable, value)
    return records


def run_job(job: ModelJob, opener: Opener = open_keras, write: bool = True,
            probe: bool = False) -> ModelOutcome:
    """Run one model job to completion; every failure becomes a `failed` outcome, never a raise."""
    outcome = ModelOutcome(job=job, status=STATUS_FAILED)
    weights = None
    try:
        _check_input(job)
        input_stat = _stat_key(job.input)
        weights = opener(job)
        outcome.backend = weights.backend
        outcome.backend_note = getattr(weights, "fallback_reason", None)
        outcome.layers = select_filters(job, weights)
        removing = [sel for sel in outcome.layers if sel.options.action == "remove" and sel.filters]
        if not write:
            if removing:  # what the removal will touch, from the config (no TensorFlow)
                removing = _couple_selections(job, weights, outcome.layers, removing)
                outcome.touched = _plan_removal(job, weights, removing)
            outcome.status = STATUS_OK
            return outcome
        if removing and weights.backend != "keras":
            # removal rebuilds the model from its config: only the Keras backend can
            weights.close()
            weights = open_keras(job)
            outcome.backend = weights.backend
            outcome.backend_note = "action: remove needs the Keras backend"
        if removing:
            removing = _couple_selections(job, weights, outcome.layers, removing)
        records = edit_model(job, weights, outcome.layers)
        removed_layers = {sel.path for sel in removing}
        outcome.zeroed = [r for r in records if r["layer"] not in removed_layers]
        outcome.removed = [r for r in records if r["layer"] in removed_layers]
        if removing:
            outcome.removal = _remove(job, weights, removing)
        checks: list[Callable[[str], None]] = []
        if probe:
            from kprune_batch.probe import measure

            def probe_check(tmp: str) -> None:
                outcome.probe = measure(tmp, outcome.zeroed, job.name)

            checks.append(probe_check)
        else:
            for record in outcome.zeroed + outcome.removed:
                record["probe"] = "skipped"
            if weights.backend == "direct":
                def static(tmp: str) -> None:
                    outcome.static_check = static_check(tmp, job, outcome.zeroed, weights)

                checks.append(static)

        def input_unchanged(_tmp: str) -> None:
            # a stat comparison instead of hashing the input again (0.4 s for 550 MB)
            if _stat_key(job.input) != input_stat:
                raise ModelError("the input file changed while kprune was reading it; nothing "
                                 "was written", model=job.name, file=job.input,
                                 hint="run again when nothing else writes to it")

        checks.append(input_unchanged)

        def run_checks(tmp: str) -> None:
            for check in checks:
                check(tmp)

        outcome.written = _write_output(job, weights, run_checks)
        if weights.hashes is not None:  # computed while copying: the bytes read and written
            outcome.input_sha256, outcome.output_sha256 = weights.hashes
        else:
            outcome.input_sha256 = _hash_input(job)
            outcome.output_sha256 = sha256_file(job.output)
        outcome.status = STATUS_OK
    except Exception as exc:  # noqa: BLE001 - whatever breaks inside one model fails that model
        if not isinstance(exc, KpruneError):
            from kprune_batch import quiet

            if quiet.debugging():
                import traceback

                traceback.print_exc()
            # a crafted or unforeseen file (a config Keras or h5py chokes on, a RecursionError
            # from absurd nesting): one line naming the model, the batch goes on
            exc = ModelError(f"cannot process this model: {type(exc).__name__}: "
                             f"{_first_line(exc)}", model=job.name, file=job.input,
                             hint="run with --debug for the traceback")
        outcome.error = exc.render()
        if outcome.input_sha256 is None:  # a failed model's log entry still names its input
            with contextlib.suppress(KpruneError):
                outcome.input_sha256 = _hash_input(job)
        outcome.zeroed = []
        outcome.removed = []
        outcome.removal = None
    finally:
        if weights is not None:
            weights.close()
    return outcome


def _couple_selections(job: ModelJob, weights: ModelWeights, layers: list[LayerSelection],
                       removing: list[LayerSelection]) -> list[LayerSelection]:
    """Extend the removal selections to whole coupled groups (layers meeting in an Add-type
    merge lose the same filters), adding group members the spec did not list."""
    from kprune_batch.removal import _couple, coupled_group

    modes = {sel.options.coupled for sel in removing}
    if len(modes) > 1:
        raise ModelError(f"entries removing filters set different 'coupled' values "
                         f"({', '.join(sorted(modes))})", model=job.name,
                         hint="give them the same value")
    try:
        coupled = _couple(weights.graph, {s.path: list(s.filters) for s in removing}, modes.pop())
        groups = {path: coupled_group(weights.graph, path)[0] for path in coupled}
    except ModelError as exc:
        raise exc.for_model(job.name) from None
    by_path = {sel.path: sel for sel in layers}
    template = removing[0]
    for path, filters in coupled.items():
        sel = by_path.get(path)
        if sel is None:
            node = weights.graph.layers[path]
            family = family_of(node.class_name)
            assert family is not None
            kernel = _kernel(weights, path, family, job.name)
            sel = LayerSelection(path=path, class_name=node.class_name, family=family,
                                 n_filters=family.n_filters(kernel.shape), options=template.options,
                                 max_fraction=template.max_fraction, allow_empty_layer=False,
                                 entries=[], by_rule={}, filters={},
                                 stats=_slices_and_stats(kernel, family))
            layers.append(sel)
            by_path[path] = sel
        elif sel.options.action != "remove":
            raise ModelError(f"the layer must lose the same filters as its coupled group, but "
                             f"its entry says action: {sel.options.action}", model=job.name,
                             layer=path, hint="give the group's entries the same action")
        members = groups[path]
        why = {f: sorted({loc for m in members if m in by_path
                          for loc in by_path[m].filters.get(f, [])}, key=_loc_key)
               for f in filters}
        sel.filters = {f: why[f] for f in filters}
        sel.group = members
    _round_to(job, [by_path[p] for p in coupled], by_path)
    return [by_path[p] for p in coupled if by_path[p].filters]


def _round_to(job: ModelJob, removing: list[LayerSelection],
              by_path: dict[str, LayerSelection]) -> None:
    """Keep selected filters back, largest l1 norm first (summed over a coupled group's members),
    until each layer's remaining filter count is a multiple of round_to."""
    values = {sel.options.round_to for sel in removing}
    if len(values) > 1:
        raise ModelError(f"entries removing filters set different 'round_to' values "
                         f"({', '.join(map(str, sorted(values)))})", model=job.name,
                         hint="give them the same value")
    step = values.pop() if values else 1
    if step <= 1:
        return
    done: set[tuple[str, ...]] = set()
    for sel in removing:
        members = tuple(sorted(sel.group or [sel.path]))
        if members in done:
            continue
        done.add(members)
        chosen = sorted(sel.filters)
        l1 = {f: sum(by_path[m].stats[f]["l1"] for m in members) for f in chosen}
        kept_back = []
        while chosen and (sel.n_filters - len(chosen)) % step:
            f = max(chosen, key=lambda g: (l1[g], -g))
            chosen.remove(f)
            kept_back.append(f)
        for m in members:
            by_path[m].filters = {f: by_path[m].filters[f] for f in chosen}
            by_path[m].kept_back = sorted(kept_back)


def _plan_removal(job: ModelJob, weights: ModelWeights,
                  removing: list[LayerSelection]) -> list[dict[str, Any]]:
    from kprune_batch.removal import plan_removal

    try:
        plan = plan_removal(weights.graph, {s.path: list(s.filters) for s in removing},
                            coupled="union")  # already coupled: members are equal
    except ModelError as exc:
        raise exc.for_model(job.name) from None
    return [t.to_json() for t in plan.touches]


REMOVAL_TOLERANCE = 1e-5  # the contract's bound on |removed - zeroed| outputs


def _remove(job: ModelJob, weights: Any, removing: list[LayerSelection]) -> dict[str, Any]:
    """Physically remove the (already zeroed, BN-neutralised) filters; prove the result equal.

    The reference is the zeroed model itself: a seeded probe batch must give the same outputs
    from the rebuilt model within REMOVAL_TOLERANCE, or nothing is written (unless a fold was
    inexact under approximate: true; the deviation is then only recorded).
    """
    from kprune_batch.probe import probe_inputs
    from kprune_batch.quiet import import_keras, native_stderr_silenced
    from kprune_batch.removal import remove_filters

    keras = import_keras()
    model = weights.model
    try:
        with native_stderr_silenced():
            x = probe_inputs(model)
            feed = x if len(x) > 1 else x[0]
            result = remove_filters(
                keras, model, {s.path: list(s.filters) for s in removing},
                coupled="union",  # already coupled: members are equal
                approximate=frozenset(s.path for s in removing if s.options.approximate),
                feed=feed)
            reference = model(feed, training=False)
            removed = result.model(feed, training=False)
    except ModelError as exc:
        raise exc.for_model(job.name) from None
    except Exception as exc:  # Keras refusing the rebuilt config: a case removal does not know
        raise ModelError(f"rebuilding the model without the filters failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written",
                         model=job.name, hint="zero these filters instead (action: zero)") from exc
    pairs = zip(keras.tree.flatten(reference), keras.tree.flatten(removed), strict=True)
    deviation = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
    if not result.approximate and not deviation <= REMOVAL_TOLERANCE:
        raise ModelError(f"the model with filters removed differs from the zeroed model by "
                         f"{deviation:.3g} on the probe batch (allowed {REMOVAL_TOLERANCE:g}); "
                         f"nothing was written", model=job.name,
                         hint="please report this as a bug, with the spec")
    optimizer = "none"
    if getattr(model, "compiled", False) and model.optimizer is not None:
        # the optimizer's slot variables have the old shapes: the state is dropped, the
        # compile configuration kept
        result.model.compile_from_config(model.get_compile_config())
        optimizer = "dropped"
    weights.model = result.model
    return {"mappings": result.mappings, "touched": result.touches,
            "params_before": result.params_before,
            "kept_back": {s.path: s.kept_back for s in removing if s.kept_back},
            "macs_before": result.macs_before, "macs_after": result.macs_after,
            "params_after": result.params_after, "probe_deviation": deviation,
            "folded": result.folded, "approximate": result.approximate,
            "optimizer_state": optimizer}


def static_check(path: str, job: ModelJob, records: list[dict[str, Any]],
                 layout: Any = None) -> str:
    """Re-open a directly written file and confirm every recorded edit holds exactly.

    The direct backend runs no model, so without --probe this is its proof: each zeroed kernel
    slice and bias is 0 and each BatchNorm edit has its recorded value. `layout`: the input's
    DirectModelWeights, whose proven mapping the written copy shares.
    """
    from kprune_batch.backends.direct import DirectModelWeights

    written = DirectModelWeights(path, job.name, layout=layout)
    try:
        for r in records:
            family = family_of(r["layer_class"])
            assert family is not None
            variables = written.variables(r["layer"])
            kernel = variables[family.kernel_name(variables) or family.kernel_var]
            problems = []
            if np.any(family.filter_view(kernel)[r["filter"]] != 0):
                problems.append("kernel slice")
            if r["bias"] == "zeroed" and variables["bias"][r["filter"]] != 0:
                problems.append("bias")
            for edit in r["batchnorm"]:
                if written.variables(edit["layer"])[edit["variable"]][r["filter"]] != edit["value"]:
                    problems.append(f"{edit['layer']}.{edit['variable']}")
            if problems:
                raise ModelError(f"the written file does not hold the edit of filter "
                                 f"{r['filter']} ({', '.join(problems)}); nothing was written",
                                 model=job.name, layer=r["layer"],
                                 hint="please report this as a bug, with the audit log")
    finally:
        written.close()
    return "ok"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "(no message)"


def _stat_key(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _hash_input(job: ModelJob) -> str:
    """The input's sha256 (ModelError if it cannot be read)."""
    return _check_input(job, sha256_file)


def _check_input(job: ModelJob, read: Callable[[str], Any] = lambda p: open_regular(p).close()
                 ) -> Any:
    """Fail the model before any backend runs if the input is missing, unreadable or not a
    regular file: a FIFO would block every reader (Keras, h5py, the hash) forever and
    /dev/zero never ends, so the backends, which open the path themselves, never see one."""
    if not os.path.exists(job.input):
        raise ModelError(f"input file {job.input} does not exist", model=job.name,
                         hint="check the model's 'path' (relative to the spec file's folder)")
    try:
        return read(job.input)
    except NotRegularFile as exc:
        raise ModelError(f"input {job.input} is {exc.kind}, not a model file",
                         model=job.name) from None
    except PermissionError:
        raise ModelError(f"input file {job.input} is not readable (permission denied)",
                         model=job.name) from None
    except OSError as exc:
        raise ModelError(f"input file {job.input} cannot be read: {exc.strerror}",
                         model=job.name) from None


def _write_output(job: ModelJob, weights: ModelWeights,
                  check: Callable[[str], None] | None) -> bool:
    """Write the edited model to job.output; False if it already held exactly those bytes (a
    re-run of an unchanged spec on unchanged inputs) and was left as it was."""
    folder = os.path.dirname(job.output)
    try:
        os.makedirs(folder, exist_ok=True)
        matched = weights.matches(job.output) if os.path.isfile(job.output) else False
        if matched:
            if check is not None:
                check(job.output)
            fsync_file(job.output)
            return False
        # the temp name keeps the format's ending: Keras picks the format from the file name
        return atomic_write(job.output, weights.save, suffix=os.path.splitext(job.output)[1],
                            check=check, keep_identical=matched is None)
    except KpruneError:
        raise
    except Exception as exc:  # Keras and h5py wrap OS errors in their own types
        errno_ = getattr(exc, "errno", None)
        if errno_ == errno.ENOSPC or "No space left" in str(exc):
            reason = "the disk is full"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ModelError(f"cannot write output {job.output}: {reason}", model=job.name,
                         hint="nothing was written under the output's name; check the output "
                              "folder and free space") from exc
