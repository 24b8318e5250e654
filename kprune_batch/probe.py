"""The probe: a seeded random batch through a written model, measuring every zeroed channel."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from kprune_batch.errors import ModelError, first_line
from kprune_batch.logfacts import bn_channel
from kprune_batch.quiet import import_keras, native_stderr_silenced, to_numpy

PROBE_SEED = 0
PROBE_BATCH = 4  # used for the batch dimension
PROBE_UNKNOWN_DIM = 32  # used for any other dimension the model leaves unknown (None)


def probe_inputs(model: Any) -> list[np.ndarray]:
    """Seeded standard-normal inputs shaped like the model's inputs (unknown dims documented above)."""
    rng = np.random.default_rng(PROBE_SEED)
    arrays = []
    for tensor in model.inputs:
        shape = [PROBE_BATCH] + [PROBE_UNKNOWN_DIM if d is None else int(d)
                                 for d in tuple(tensor.shape)[1:]]
        arrays.append(rng.standard_normal(shape).astype("float32"))
    return arrays


def _channel_axis(layer: Any) -> int:
    axis = getattr(layer, "axis", None)  # BatchNormalization: the axis it normalises
    if isinstance(axis, (list, tuple)) and len(axis) == 1:
        axis = axis[0]
    if isinstance(axis, int):
        return axis
    return 1 if getattr(layer, "data_format", None) == "channels_first" else -1


def _values(model: Any, inputs: list[np.ndarray], paths: list[str], training: bool,
            keras: Any) -> dict[str, np.ndarray]:
    """Output values of the layers at `paths` ('outer/inner' descends into nested models)."""
    direct = [p for p in paths if "/" not in p]
    nested: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        if "/" in p:
            head, rest = p.split("/", 1)
            nested[head].append(rest)
    wanted = [_find(model, p).output for p in direct]
    wanted += [_input_in_parent(model, h) for h in nested]
    extractor = keras.Model(model.inputs, wanted)
    results = extractor(inputs if len(inputs) > 1 else inputs[0], training=training)
    results = list(results) if isinstance(results, (list, tuple)) else [results]
    out = {p: to_numpy(keras, v) for p, v in zip(direct, results, strict=False)}
    for (head, rests), value in zip(nested.items(), results[len(direct):], strict=True):
        sub = _find(model, head)
        sub_inputs = [to_numpy(keras, v) for v in value] if isinstance(value, (list, tuple)) else [to_numpy(keras, value)]
        for rest, v in _values(sub, sub_inputs, rests, training, keras).items():
            out[f"{head}/{rest}"] = v
    return out


def measure(path: str, records: list[dict[str, Any]], model_name: str) -> dict[str, Any]:
    """Run the probe on the model file at `path` and set `probe` on each record.

    Measured, as max |value| over inference and training mode: `max_abs` at the zeroed channel's
    BatchNorm followers' outputs when it has any, else at the layer's own output; and
    `layer_max_abs` at the layer's own output (after its activation). Raises ModelError when a
    channel recorded as silent measures non-zero: a wrong silence claim must never be written.
    """
    try:
        return _measure(path, records, model_name)
    except ModelError:
        raise
    except Exception as exc:  # a model kprune cannot probe: say so rather than write it unproven
        raise ModelError(f"the probe could not run ({type(exc).__name__}: "
                         f"{first_line(exc) if str(exc) else ''}); nothing was written",
                         model=model_name, hint="run without --probe to skip the measurement"
                         ) from exc


def _measure(path: str, records: list[dict[str, Any]], model_name: str) -> dict[str, Any]:
    from kprune_batch.twin import RAN_ON_TWIN, runnable

    keras = import_keras()
    with native_stderr_silenced():
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        inputs = probe_inputs(model)
        # where this CPU cannot run channels_first convolutions: the channels_last twin, whose
        # layers have the same names and report their own channel axis (_channel_axis)
        model, twin, no_twin = runnable(keras, model)
        if twin is not None:
            inputs = twin.to_twin(inputs)
        # (path, channel) per record: a follower behind a Concatenate holds the channel at its
        # offset there (logfacts.bn_channel)
        points: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for r in records:
            followers = [(e["layer"], bn_channel(r, e)) for e in r["batchnorm"]] or \
                [(r["layer"], r["filter"])]
            points[(r["layer"], r["filter"])] = sorted(set(followers))
        paths = sorted({p for ps in points.values() for p, _ in ps} |
                       {r["layer"] for r in records})
        done = {"status": "ok", "max_abs": 0.0, "seed": PROBE_SEED}
        if twin is not None:
            done["ran_on"] = RAN_ON_TWIN
        if not paths:
            return done
        try:
            by_mode = {mode: _values(model, inputs, paths, mode, keras) for mode in (False, True)}
        except Exception as exc:
            if no_twin is None:
                raise
            raise ModelError(f"the probe could not run ({type(exc).__name__}: {first_line(exc)})"
                             f" and no channels_last twin is provably the same model ({no_twin});"
                             f" nothing was written", model=model_name,
                             hint="run without --probe to skip the measurement") from exc

    def max_abs(path: str, channel: int) -> float:
        axis = _channel_axis(_find(model, path))
        return max(float(np.max(np.abs(np.moveaxis(values[path], axis, 0)[channel])))
                   for values in by_mode.values())

    worst = 0.0
    for r in records:
        value = max(max_abs(p, c) for p, c in points[(r["layer"], r["filter"])])
        r["probe"] = {"max_abs": value, "layer_max_abs": max_abs(r["layer"], r["filter"])}
        worst = max(worst, value) if r["silent"] else worst
        if r["silent"] and value != 0.0:
            raise ModelError(
                f"probe measured max |activation| {value:.3g} on filter {r['filter']}, which "
                f"kprune decided is silent; nothing was written for this model", model=model_name,
                layer=r["layer"], hint="please report this as a bug, with the audit log")
    return {**done, "max_abs": worst}


def _input_in_parent(model: Any, name: str) -> Any:
    """The tensor of `model`'s own graph that feeds its nested model `name`.

    A nested model's `.input` belongs to its inner graph, so it is found from the parent's
    config instead: the producers named in the nested model's inbound node (Functional; a
    producer may be an operation node, which `get_layer` does not find), or the previous layer
    (Sequential).
    """
    from kprune_batch.backends.keras_backend import find_node
    from kprune_batch.graph import _histories

    layer = find_node(model, name)
    if type(model).__name__ == "Sequential":
        index = model.layers.index(layer)
        return model.inputs[0] if index == 0 else model.layers[index - 1].output
    for entry in model.get_config()["layers"]:
        if entry.get("name") == name:
            sources = list(_histories(entry.get("inbound_nodes") or []))
            tensors = []
            for src, tensor in sources:
                out = find_node(model, src).output
                tensors.append(out[tensor] if isinstance(out, (list, tuple)) else out)
            return tensors[0] if len(tensors) == 1 else tensors
    raise ValueError(f"no inbound node for nested model {name}")


def _find(model: Any, path: str) -> Any:
    from kprune_batch.backends.keras_backend import find_node

    return find_node(model, path)
