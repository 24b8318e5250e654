"""The executor: opens each job's model through a backend, selects filters, edits, writes outputs."""
from __future__ import annotations

import contextlib
import errno
import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kprune_batch.backends.base import ModelWeights
from kprune_batch.errors import KpruneError, ModelError, first_line
from kprune_batch.families import family_of
from kprune_batch.logfacts import bn_channel
from kprune_batch.files import (NotRegularFile, atomic_write, fsync_file, open_regular,
                                sha256_file)
from kprune_batch.plan import ModelJob
from kprune_batch.selection import LayerSelection, select_model
from kprune_batch.silence import Fate, channel_fate

STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"


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
    impact: dict[str, Any] | None = None  # measured on the samples (also when a guard failed)
    written: bool = True  # False: the output already held exactly these bytes and was kept


Opener = Callable[[ModelJob], ModelWeights]


def open_keras(job: ModelJob, need: str = "--backend keras", loc: str | None = None
               ) -> ModelWeights:
    """Load the model with Keras (safe mode): the reference backend, for every model. `need`
    and `loc` say what asked for it when no framework is installed (BackendMissing)."""
    from kprune_batch.backends.keras_backend import KerasModelWeights
    from kprune_batch.quiet import require_keras

    require_keras(need, model=job.name, loc=loc)

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
        weights = open_keras(job, need=f"this model (the direct backend cannot edit it: {exc})")
        weights.fallback_reason = str(exc)  # type: ignore[attr-defined]
        return weights


OPENERS: dict[str, Opener] = {"auto": open_auto, "direct": open_direct, "keras": open_keras}


# --- editing ---------------------------------------------------------------------------------


class _HandOn:
    """`weights` for the selection stage, keeping what it reads for the edit that follows.

    The selection reads every kernel it ranks; the edit needs the same arrays (they are copies,
    see ModelWeights.variables): handed on, each is read once and zeroed in place, not read
    again and copied (a ranking over every conv of ResNet50: ~200 MB of reads and copies). The
    peak memory stays what the edit holds anyway, the zeroed kernels.
    """

    def __init__(self, weights: ModelWeights):
        self._weights = weights
        self._kept: dict[str, dict[str, np.ndarray]] = {}

    def __getattr__(self, name: str) -> Any:  # graph, backend, ...: the model's own
        return getattr(self._weights, name)

    def variables(self, layer_path: str) -> dict[str, np.ndarray]:
        if layer_path not in self._kept:
            self._kept[layer_path] = self._weights.variables(layer_path)
        return self._kept[layer_path]

    def of(self, weights: ModelWeights) -> bool:
        return weights is self._weights

    def take(self, layer_path: str) -> dict[str, np.ndarray] | None:
        """The layer's arrays, now the caller's to change (None if the selection did not read
        them)."""
        return self._kept.pop(layer_path, None)


NEUTRALIZING = ("neutralize", "neutralize_concat")  # batchnorm values that edit a BN follower


def _bn_record(edit: Any, channel: int, filter_: int) -> dict[str, Any]:
    """A BN edit of `filter_` at the BN's `channel`, as the audit log records it: `channel`
    only where it is not the filter (a follower behind a Concatenate, batchnorm:
    neutralize_concat; logfacts.bn_channel reads it)."""
    out = {"layer": edit.layer, "variable": edit.variable, "value": edit.value}
    if channel != filter_:
        out["channel"] = channel
    return out


def edit_model(job: ModelJob, weights: ModelWeights, selections: list[LayerSelection],
               handed_on: Callable[[str], dict[str, np.ndarray] | None] | None = None
               ) -> list[dict[str, Any]]:
    """Zero the selected filters (kernel slice, bias, BN follower) in `weights`; return records.

    `handed_on(path)`: the layer's input arrays as already read (the caller's to change), or
    None to read them from `weights`."""
    records: list[dict[str, Any]] = []
    pending_bn: dict[tuple[str, str], np.ndarray] = {}
    original: dict[str, dict[str, np.ndarray]] = {}

    def input_variables(path: str) -> dict[str, np.ndarray]:
        if path not in original:
            kept = handed_on(path) if handed_on is not None else None
            original[path] = kept if kept is not None else weights.variables(path)
        return original[path]

    for sel in selections:
        if not sel.filters:
            continue
        variables = input_variables(sel.path)
        kernel_name = sel.family.kernel_name(variables)
        assert kernel_name is not None  # the selection stage read the kernel already
        filters = list(sel.filters)
        # variables() gives copies, ours to change: zeroed in place, not copied once more
        weights.assign(sel.path, kernel_name,
                       sel.family.zeroed(variables[kernel_name], filters, in_place=True))
        bias = variables.get("bias")
        if bias is not None and sel.options.bias == "zero":
            new_bias = bias.copy()
            new_bias[filters] = 0
            weights.assign(sel.path, "bias", new_bias)
        neutralize = sel.options.batchnorm in NEUTRALIZING
        through_concat = sel.options.batchnorm == "neutralize_concat"
        zero_bias = bias is None or sel.options.bias == "zero"
        # a ranking over every conv of ResNet50 writes 6,640 records: what is the same for a
        # whole layer (or a whole fate) is made once, not once per filter
        bias_text = "none" if bias is None else ("zeroed" if zero_bias else "kept")
        group = {"group": list(sel.group)} if len(sel.group) > 1 else {}
        pres = [0.0] * len(filters) if zero_bias else bias[filters].tolist()  # float(bias[f])
        fates: dict[float, tuple[Fate, list[dict[str, Any]], list[str], int]] = {}
        # the filters of each fate (by identity): its BatchNorm edits are the same values for
        # each, assigned to all of them at once after the layer's records
        fated: dict[int, tuple[Fate, list[int], int]] = {}
        for f, pre in zip(filters, pres):
            if neutralize and pre in fates:
                fate, batchnorm, notes, template = fates[pre]
            else:
                # a kept BN's statistics differ per channel; neutralising makes the fate depend
                # on the channel's constant only (its edits are on the channel itself, or at a
                # Concatenate's fixed offset from it: applied as `f` + shift below): once per
                # layer and constant, not once per filter
                fate = channel_fate(weights.graph, sel.path, f, pre, neutralize, input_variables,
                                    through_concat)
                template = f
                batchnorm = [_bn_record(e, e.channel, f) for e in fate.edits]
                notes = list(fate.notes)
                if fate.constant is not None and not math.isfinite(fate.constant):
                    # a NaN/inf weight on the way (a kept BN's statistics, a kept bias): the
                    # log is strict JSON, so the value is told in the notes, the constant null
                    notes.append(f"the channel's constant output is {fate.constant}, not a "
                                 f"finite number (recorded as constant: null)")
                    fate.constant = None
                if neutralize:
                    fates[pre] = (fate, batchnorm, notes, template)
            if fate.edits:
                fated.setdefault(id(fate), (fate, [], template))[1].append(f)
            if f != template and any(e.channel != template for e in fate.edits):
                # through a Concatenate the BN channel moves with the filter: its own list
                batchnorm = [_bn_record(e, f + e.channel - template, f) for e in fate.edits]
            ranked = sel.ranked.get(f)
            records.append({
                "model": job.name,
                "layer": sel.path,
                "layer_class": sel.class_name,
                "filter": f,
                "rules": list(sel.filters[f]),
                **({"ranking": [pick.to_json() for pick in ranked]} if ranked is not None
                   else {}),
                "stats": sel.stats[f],
                "bias": bias_text,
                # shared by the records of one fate (read only, as every record's lists are)
                "batchnorm": batchnorm,
                "silent": fate.silent,
                "constant": None if fate.silent else fate.constant,
                "notes": notes,
                **group,
            })
        # in the order the filters' own assignments would come (a BatchNorm two layers reach
        # gets the later layer's values; one fate's edits in their order)
        for fate, fs, template in fated.values():
            at = np.asarray(fs, dtype=np.int64)
            for edit in fate.edits:
                key = (edit.layer, edit.variable)
                if key not in pending_bn:
                    pending_bn[key] = input_variables(edit.layer)[edit.variable].copy()
                # edit.channel is the template filter's channel: the same shift for each
                pending_bn[key][at + (edit.channel - template)] = edit.value
        # done with this layer's input values (channel_fate reads only BatchNorm layers'):
        # keeping every kernel until the end would double the peak memory of a large edit
        original.pop(sel.path, None)
    for (layer, variable), value in pending_bn.items():
        weights.assign(layer, variable, value)
    return records


def run_job(job: ModelJob, opener: Opener = open_keras, write: bool = True,
            probe: bool = False) -> ModelOutcome:
    """Run one model job to completion; every failure becomes a `failed` outcome, never a raise."""
    outcome = ModelOutcome(job=job, status=STATUS_FAILED)
    weights = None
    try:
        if problem := _check_input(job, _format_problem):
            raise ModelError(problem[0], model=job.name, file=job.input, hint=problem[1])
        if probe and write:  # before anything is read: the probe runs the written model
            from kprune_batch.quiet import require_keras

            require_keras("--probe", model=job.name)
        input_stat = _stat_key(job.input)
        if job.sha256 is not None:  # before any backend reads it, so before anything is written
            outcome.input_sha256 = _check_pin(job)
        weights = opener(job)
        outcome.backend = weights.backend
        outcome.backend_note = getattr(weights, "fallback_reason", None)
        measurer = None
        if job.samples is not None:
            # Keras only now: a model without samples never needs TensorFlow for this
            from kprune_batch.impact import Measurer

            measurer = Measurer(job)  # checks the samples before anything is selected
        reads = _HandOn(weights) if write else weights
        selection = select_model(job, reads,
                                 data=measurer.data_statistics if measurer else None,
                                 measure_all=not write)
        outcome.layers = list(selection.layers)
        removing = list(selection.removing)
        if not write:
            if removing:  # what the removal will touch, from the config (no TensorFlow)
                outcome.touched = _plan_removal(job, weights, removing)
            outcome.status = STATUS_OK
            return outcome
        if removing and weights.backend != "keras":
            # removal rebuilds the model from its config: only the Keras backend can
            weights.close()
            weights = None  # closed: a failing open_keras must not close it twice
            weights = open_keras(job, need="action: remove",
                                 loc=next(iter(removing[0].entries), None))
            outcome.backend = weights.backend
            outcome.backend_note = "action: remove needs the Keras backend"
        records = edit_model(job, weights, outcome.layers,
                             reads.take if isinstance(reads, _HandOn) and reads.of(weights)
                             else None)
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
        if measurer is not None:
            def impact_check(tmp: str) -> None:
                from kprune_batch.impact import check_guards

                outcome.impact = measurer.impact(tmp)  # the written file, before the rename
                check_guards(outcome.impact, job.impact, job.name)

            checks.append(impact_check)

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
        else:  # a pinned input was hashed already (and input_unchanged saw the same stat)
            outcome.input_sha256 = outcome.input_sha256 or _hash_input(job)
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


def _plan_removal(job: ModelJob, weights: ModelWeights,
                  removing: list[LayerSelection]) -> list[dict[str, Any]]:
    from kprune_batch.removal import plan_removal

    try:
        plan = plan_removal(weights.graph, {s.path: list(s.filters) for s in removing},
                            coupled="union",  # already coupled: members are equal
                            approximate=frozenset(s.path for s in removing
                                                  if s.options.approximate))
    except ModelError as exc:
        raise exc.for_model(job.name) from None
    return [t.to_json() for t in plan.touches]


# The contract's bound on |removed - zeroed| outputs, elementwise: atol + rtol * |zeroed| (an
# absolute bound alone refuses correct removals of models whose outputs are large)
PROBE_ATOL = 1e-5
PROBE_RTOL = 1e-5


def within_bound(reference: np.ndarray, value: np.ndarray) -> bool:
    """|value - reference| <= PROBE_ATOL + PROBE_RTOL * |reference| everywhere (NaN: not)."""
    ref = np.asarray(reference, np.float64)
    return bool(np.all(np.abs(np.asarray(value, np.float64) - ref)
                       <= PROBE_ATOL + PROBE_RTOL * np.abs(ref)))


def _remove(job: ModelJob, weights: Any, removing: list[LayerSelection]) -> dict[str, Any]:
    """Physically remove the (already zeroed, BN-neutralised) filters; prove the result equal.

    The reference is the zeroed model itself: a seeded probe batch must give the same outputs
    from the rebuilt model within PROBE_ATOL + PROBE_RTOL * |reference|, or nothing is written
    (unless a fold was inexact under approximate: true; the deviation is then only recorded).
    Where this CPU cannot run a channels_first model, both run as their channels_last twins.
    """
    from kprune_batch.probe import probe_inputs
    from kprune_batch.quiet import import_keras, native_stderr_silenced, to_numpy
    from kprune_batch.removal import remove_filters
    from kprune_batch.twin import run_points

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
                feed=feed, reference=True,
                through_concat=frozenset(s.path for s in removing
                                         if s.options.batchnorm == "neutralize_concat"))
            reference, ran_on = result.reference, result.reference_ran_on
            removed, _ = run_points(keras, result.model, feed, [("", "model")])
    except ModelError as exc:
        raise exc.for_model(job.name) from None
    except Exception as exc:  # Keras refusing the rebuilt config: a case removal does not know
        raise ModelError(f"rebuilding the model without the filters failed ({type(exc).__name__}: "
                         f"{first_line(exc)}); nothing was written",
                         model=job.name, hint="zero these filters instead (action: zero)") from exc
    pairs = list(zip(reference, removed, strict=True))
    deviation = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                    for a, b in pairs)
    exact = all(within_bound(a, b) for a, b in pairs)
    if not result.approximate and not exact:
        raise ModelError(f"the model with filters removed differs from the zeroed model by "
                         f"{deviation:.3g} on the probe batch (allowed {PROBE_ATOL:g} + "
                         f"{PROBE_RTOL:g}·|zeroed output|); nothing was written", model=job.name,
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
            "kept_back": {s.path: list(s.kept_back) for s in removing if s.kept_back},
            "macs_before": result.macs_before, "macs_after": result.macs_after,
            "params_after": result.params_after, "probe_deviation": deviation,
            "probe_tolerance": {"atol": PROBE_ATOL, "rtol": PROBE_RTOL}, "probe_ran_on": ran_on,
            "folded": result.folded, "approximate": result.approximate,
            "statistics_changed": result.statistics_changed,
            "dropped_layers": result.dropped_layers, "optimizer_state": optimizer}


def static_check(path: str, job: ModelJob, records: list[dict[str, Any]],
                 layout: Any = None) -> str:
    """Re-open a directly written file and confirm every recorded edit holds exactly.

    The direct backend runs no model, so without --probe this is its proof: each zeroed kernel
    slice and bias is 0 and each BatchNorm edit has its recorded value. `layout`: the input's
    DirectModelWeights, whose proven mapping the written copy shares.
    """
    from kprune_batch.backends.direct import DirectModelWeights

    written = DirectModelWeights(path, job.name, layout=layout)
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_layer.setdefault(r["layer"], []).append(r)
    followers: dict[str, dict[str, np.ndarray]] = {}  # BatchNorm layers: small, several readers

    def follower(layer: str) -> dict[str, np.ndarray]:
        if layer not in followers:
            followers[layer] = written.variables(layer)
        return followers[layer]

    try:
        # once per layer, not per record (a ranking over every conv edits thousands of filters),
        # and each layer's arrays dropped before the next is read: holding every kernel read
        # back would add the whole model to the peak memory
        for layer, layer_records in by_layer.items():
            family = family_of(layer_records[0]["layer_class"])
            assert family is not None
            layer_vars = written.variables(layer)
            kernel = layer_vars[family.kernel_name(layer_vars) or family.kernel_var]
            filters = [r["filter"] for r in layer_records]
            # every check a whole array at a time (6,640 records for a ranking over every conv
            # of ResNet50); the one-record check below then names what a failing one lacks
            wrong = family.loud_filters(kernel, filters)
            bias = layer_vars.get("bias")
            if bias is not None:
                zeroed = np.array([r["bias"] == "zeroed" for r in layer_records], dtype=bool)
                wrong = wrong | (zeroed & (bias[filters] != 0))
            edits: dict[tuple[str, str], tuple[list[int], list[int], list[float]]] = {}
            for i, r in enumerate(layer_records):
                for edit in r["batchnorm"]:
                    at, fs, values = edits.setdefault((edit["layer"], edit["variable"]),
                                                      ([], [], []))
                    at.append(i)
                    fs.append(bn_channel(r, edit))
                    values.append(edit["value"])
            for (bn, variable), (at, fs, values) in edits.items():
                bad = _differs(follower(bn)[variable], fs, values)
                wrong[np.asarray(at, dtype=np.int64)[bad]] = True
            for i in np.flatnonzero(wrong)[:1]:
                r = layer_records[int(i)]
                problems = []
                if family.loud_filters(kernel, [r["filter"]])[0]:
                    problems.append("kernel slice")
                if r["bias"] == "zeroed" and bias is not None and bias[r["filter"]] != 0:
                    problems.append("bias")
                for edit in r["batchnorm"]:
                    if _differs(follower(edit["layer"])[edit["variable"]], [bn_channel(r, edit)],
                                [edit["value"]])[0]:
                        problems.append(f"{edit['layer']}.{edit['variable']}")
                raise ModelError(f"the written file does not hold the edit of filter "
                                 f"{r['filter']} ({', '.join(problems)}); nothing was written",
                                 model=job.name, layer=layer,
                                 hint="please report this as a bug, with the audit log")
            del layer_vars, kernel, bias
    finally:
        written.close()
    return "ok"


def _differs(held: np.ndarray, filters: list[int], values: list[float]) -> np.ndarray:
    """Whether each `held[f]` differs from its recorded value, taken as the variable's dtype
    stores it (what the edit wrote; NaN differs from everything)."""
    return held[filters] != np.asarray(values, dtype=held.dtype)


def _first_line(exc: BaseException) -> str:
    return first_line(exc) if str(exc).strip() else "(no message)"


def _stat_key(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _check_pin(job: ModelJob) -> str:
    """The input's sha256, which must be the one the spec pins (models[].sha256): after a
    retrain the same index lists name other filters, so another file fails the model. The
    file is read once more for this (the direct backend hashes it again while copying):
    ~0.4 s per 550 MB, only for pinned models."""
    actual = _hash_input(job)
    if actual != job.sha256:
        assert job.sha256 is not None
        n = 4  # as short as the contract's example, longer only if the two would read alike
        while actual[:n] == job.sha256[:n]:
            n += 4
        raise ModelError(f"{job.path_in_spec or job.input} changed since the spec was written "
                         f"(sha256 {actual[:n]}..., spec says {job.sha256[:n]}...)",
                         model=job.name, hint="review its selection, then update sha256 "
                                              "(kprune pin)")
    return actual


def _hash_input(job: ModelJob) -> str:
    """The input's sha256 (ModelError if it cannot be read)."""
    return _check_input(job, sha256_file)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0 unless the file has a user block


def _format_problem(path: str) -> tuple[str, str] | None:
    """Why the input at `path` is not what its suffix says, as (message, hint); None if it is
    (or the check cannot tell: an HDF5 file with a user block starts elsewhere).

    Keras decides by zipfile.is_zipfile whether a `.keras` is an archive and otherwise says
    "File not found" (keras/src/saving/saving_api.py, load_model), the direct backend "File is
    not a zip file": both backends fail such a file with this one line instead."""
    if path.endswith(".h5"):
        # h5py's own line for a zip is "file signature not found", which does not say why
        with open_regular(path) as fh:
            if fh.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE and zipfile.is_zipfile(fh):
                return ("not an HDF5 file: it is a zip archive (a .keras model)",
                        "name it .keras (Keras reads a .h5 file only as HDF5)")
        return None
    if not path.endswith(".keras"):
        return None
    with open_regular(path) as fh:
        if zipfile.is_zipfile(fh):
            return None
        fh.seek(0)
        head = fh.read(len(_HDF5_SIGNATURE))
    if head.startswith(b"PK\x03\x04"):  # a zip's first local header, its end cut off
        return ("the file is not a readable Keras model (a zip archive cut short: no zip end "
                "record)", "check the file is a complete .keras or .h5 model")
    if head == _HDF5_SIGNATURE:
        return ("not a .keras archive: it is an HDF5 file (a legacy .h5 model)",
                "name it .h5 (Keras reads a .keras file only as a zip archive)")
    return ("not a .keras archive (no zip end record)",
            "re-save it with keras.saving.save_model, or pass the .h5 file")


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
            reason = f"{type(exc).__name__}: {first_line(exc) if str(exc) else ''}"
        raise ModelError(f"cannot write output {job.output}: {reason}", model=job.name,
                         hint="nothing was written under the output's name; check the output "
                              "folder and free space") from exc
