"""Impact: the input and the edited model run on the user's samples; metrics, guards, data statistics.

Importable without TensorFlow (plan and selection name what lives here); Keras is imported only
when a model is actually run, which only a model with `samples` asks for. The input model is
loaded once per model job (`Measurer.model`) and serves the data statistics and the impact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from kprune_batch.errors import ModelError
from kprune_batch.families import (ACTIVATION_LAYER_CLASSES, BATCHNORM_CLASSES,
                                   ZERO_PRESERVING_CLASSES)
from kprune_batch.graph import OUTPUT, LayerGraph
from kprune_batch.plan import ImpactGuards
from kprune_batch.samples import InputSpec, Samples, load_samples

# Batches of the samples run through a model in inference mode. Impact compares final outputs
# (small per sample); data statistics fetch inner feature maps, which are large per sample
# (ResNet50's first block: 112x112x64 floats, 3 MB), so they run in smaller batches.
IMPACT_BATCH = 128
DATA_BATCH = 32


# --- where a channel's silence is judged (pure: the layer graph only) ---------------------------


# Zero-preserving layers that are the identity in inference mode (keras/src/layers/
# regularization/: `if training and rate > 0` / `stddev > 0`, else `return inputs`): measuring
# after them is measuring before them, so the activation layers behind them still count.
_INFERENCE_IDENTITY = frozenset(("Dropout", "SpatialDropout1D", "SpatialDropout2D",
                                 "SpatialDropout3D", "GaussianNoise", "GaussianDropout",
                                 "AlphaDropout"))


def measure_point(graph: LayerGraph, path: str) -> str:
    """The layer whose output is the channel as the rest of the model sees it: the layer itself
    (its own activation included), then on through activation layers and at most one
    BatchNormalization follower (and the activation layers after it) while each is the only
    consumer and called once - the route silence.channel_fate follows to judge silence.
    Dropout and noise layers (the identity in inference mode) are passed like activation
    layers. Before the BN, the other zero-preserving layers (pooling, padding, cropping,
    upsampling) are passed on the way to it, as silence passes them to reach the BN it
    neutralises (and bn_gamma reads); with no BN behind them they are not: the tensor before
    them is measured. A branch (two consumers) or anything else ends the route: the tensor
    there is measured."""
    from kprune_batch.silence import _bn_axis_ok  # the one place that knows a BN's axis

    node = graph.layers[path]
    if node.calls != 1:
        raise ModelError(f"the layer is called {node.calls} times (a shared layer), so its "
                         f"channels have no single output to measure data statistics on",
                         layer=path, hint="use a kernel statistic for this layer")
    # `current`: the point measured so far; `ahead`: where the walk is, past zero-preserving
    # layers (`pending`) that only count once a BN follower is reached behind them
    current = ahead = path
    through_bn = pending = False
    while True:
        consumers = graph.consumers(ahead)
        if len(consumers) != 1 or consumers[0] == OUTPUT:
            return current
        nxt = graph.layers[consumers[0]]
        if nxt.calls != 1 or nxt.operation is not None:
            return current
        if nxt.class_name in ACTIVATION_LAYER_CLASSES:
            ahead = nxt.path
            if not pending:
                current = ahead
        elif nxt.class_name in BATCHNORM_CLASSES and not through_bn and \
                _bn_axis_ok(nxt, node.config):
            current = ahead = nxt.path
            through_bn, pending = True, False
        elif nxt.class_name in _INFERENCE_IDENTITY and not pending:
            current = ahead = nxt.path  # the same values in inference mode: nothing pending
        elif nxt.class_name in ZERO_PRESERVING_CLASSES and nxt.class_name != "InputLayer" \
                and not through_bn:
            ahead, pending = nxt.path, True
        else:
            return current


def _point(graph: LayerGraph, path: str) -> str:
    at = measure_point(graph, path)
    if "/" in at:
        raise ModelError("data statistics of a layer inside a nested model are not supported",
                         layer=path, hint="use a kernel statistic for this layer")
    return at


def model_inputs(model: Any) -> list[InputSpec]:
    """The model's inputs as its config declares them (name, shape without the batch axis)."""
    return [InputSpec(str(t.name), tuple(None if d is None else int(d)
                                         for d in tuple(t.shape)[1:])) for t in model.inputs]


def _outputs(value: Any, names: list[str]) -> list[tuple[str, np.ndarray]]:
    """A model's outputs as (name, array): a dict's keys in sorted order (keras.tree's order),
    a list's by the model's output_names."""
    if isinstance(value, dict):
        return [(str(k), np.asarray(value[k])) for k in sorted(value)]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(names) != len(values):
        names = [f"output_{i}" for i in range(len(values))]
    return [(n, np.asarray(v)) for n, v in zip(names, values, strict=True)]


@dataclass
class _Output:
    """Running sums of one output's comparison over the batches."""

    name: str
    max_abs_diff: float = 0.0
    sum_abs_diff: float = 0.0
    elements: int = 0
    max_abs_input: float = 0.0
    agree: int = 0
    positions: int = 0
    classes: int = 0
    correct_before: int = 0
    correct_after: int = 0
    labelled: int = 0

    def to_json(self, labels: bool) -> dict[str, Any]:
        relative = (self.max_abs_diff / self.max_abs_input if self.max_abs_input > 0
                    else (0.0 if self.max_abs_diff == 0 else None))
        argmax = self.classes > 1
        out: dict[str, Any] = {
            "name": self.name, "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.sum_abs_diff / self.elements if self.elements else 0.0,
            "relative_diff": relative,
            "agreement": self.agree / self.positions if argmax and self.positions else None,
            "accuracy_before": None, "accuracy_after": None}
        if labels and argmax and self.labelled:
            out["accuracy_before"] = self.correct_before / self.labelled
            out["accuracy_after"] = self.correct_after / self.labelled
        return out


class Measurer:
    """The samples of one model job, checked against its input model, which is loaded once
    here and serves both the data statistics and the impact."""

    def __init__(self, job: Any):
        self.job = job
        self._model: Any = None
        self.keras = _keras(job)
        self.samples: Samples = load_samples(job.samples, model_inputs(self.model), job.name)
        if job.impact.max_accuracy_drop is not None and self.samples.labels is None:
            raise ModelError(f"the impact guard max_accuracy_drop needs labels, but the samples "
                             f"file {job.samples} has no 'y'", model=job.name,
                             hint="add integer or one-hot labels under key 'y' to the .npz, "
                                  "or drop the guard")

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = _load(self.keras, self.job.input, self.job.name, "input model")
        return self._model

    # data statistics

    def data_statistics(self, graph: LayerGraph, paths: Iterable[str],
                        optional: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        """{layer: {"at": measured layer, "samples": count, "apoz": (n,), "activation_mean":
        (n,)}} for `paths` and for those `optional` layers that can be measured (plan shows
        them), from one pass of the input model over the samples (inference mode)."""
        from kprune_batch.quiet import native_stderr_silenced

        points: dict[str, str] = {}
        for path in paths:
            points[path] = _point(graph, path)
        for path in optional:
            if path not in points:
                try:
                    points[path] = _point(graph, path)
                except ModelError:
                    continue  # a shared or nested layer: nothing to show, nothing asked for
        paths = list(points)
        tensors = sorted(set(points.values()))
        if not tensors:
            return {}
        axes = {p: 1 if graph.layers[p].config.get("data_format") == "channels_first" else -1
                for p in paths}
        zeros: dict[str, np.ndarray] = {}
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        keras = self.keras
        with native_stderr_silenced():
            extractor = keras.Model(self.model.inputs,
                                    [self.model.get_layer(t).output for t in tensors])
            for _start, _stop, batch in self.samples.batches(DATA_BATCH):
                values = extractor.predict_on_batch(self.samples.feed(batch))
                values = values if isinstance(values, (list, tuple)) else [values]
                for path in paths:
                    v = np.asarray(values[tensors.index(points[path])])
                    flat = np.moveaxis(v, axes[path], -1).reshape(-1, v.shape[axes[path]])
                    if not np.isfinite(flat).all():
                        raise ModelError(f"the input model's output at '{points[path]}' is NaN "
                                         f"or infinite on the samples; data statistics cannot "
                                         f"be measured", layer=path)
                    zeros[path] = zeros.get(path, 0) + np.count_nonzero(flat == 0, axis=0)
                    sums[path] = sums.get(path, 0) + np.abs(flat, dtype=np.float64).sum(axis=0)
                    counts[path] = counts.get(path, 0) + flat.shape[0]
        return {p: {"at": points[p], "samples": self.samples.count,
                    "apoz": np.asarray(zeros[p], dtype=np.float64) / counts[p],
                    "activation_mean": np.asarray(sums[p], dtype=np.float64) / counts[p]}
                for p in paths}

    # impact

    def impact(self, edited_path: str) -> dict[str, Any]:
        """Run the input model and the model file at `edited_path` on the samples (inference
        mode, batch by batch) and return the impact record of the audit log."""
        from kprune_batch.quiet import native_stderr_silenced

        samples = self.samples
        edited = _load(self.keras, edited_path, self.job.name, "edited model")
        names = [str(n) for n in getattr(self.model, "output_names", None) or []]
        outputs: list[_Output] = []
        with native_stderr_silenced():
            for start, stop, batch in samples.batches(IMPACT_BATCH):
                feed = samples.feed(batch)
                before = _outputs(self.model.predict_on_batch(feed), names)
                after = _outputs(edited.predict_on_batch(feed), names)
                if not outputs:
                    outputs = [_Output(name) for name, _ in before]
                labels = None if samples.labels is None else samples.labels[start:stop]
                for acc, (name, a), (_, b) in zip(outputs, before, after, strict=True):
                    _accumulate(acc, a, b, labels, self.job.name)
        if samples.labels is not None and not any(o.labelled for o in outputs):
            raise ModelError(
                f"the labels 'y' in {samples.path} have shape "
                f"{tuple(samples.labels.shape)}, which fits no output of the model "
                f"({', '.join(f'{o.name}: {o.classes} classes' for o in outputs)}); expected "
                f"one class index per sample (N,), or one-hot (N, classes)", model=self.job.name)
        per = [o.to_json(samples.labels is not None) for o in outputs]
        record: dict[str, Any] = {"samples": samples.to_json(), **_worst(per),
                                  "guards": self.job.impact.to_json()}
        if len(per) > 1:
            record["outputs"] = per
        return record


def _accumulate(acc: _Output, a: np.ndarray, b: np.ndarray, labels: np.ndarray | None,
                model: str) -> None:
    for which, value in (("input", a), ("edited", b)):
        if not np.isfinite(value).all():
            raise ModelError(f"the {which} model's output '{acc.name}' is NaN or infinite on "
                             f"the samples; impact cannot be measured", model=model)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    acc.max_abs_diff = max(acc.max_abs_diff, float(diff.max(initial=0.0)))
    acc.sum_abs_diff += float(diff.sum())
    acc.elements += int(diff.size)
    acc.max_abs_input = max(acc.max_abs_input, float(np.abs(a64).max(initial=0.0)))
    acc.classes = int(a.shape[-1]) if a.ndim >= 2 else 1
    if acc.classes <= 1:
        return
    pa, pb = np.argmax(a, axis=-1), np.argmax(b, axis=-1)
    acc.agree += int(np.count_nonzero(pa == pb))
    acc.positions += int(pa.size)
    if labels is None or labels.shape != pa.shape:
        return
    if labels.size and (labels.min() < 0 or labels.max() >= acc.classes):
        bad = int(labels[(labels < 0) | (labels >= acc.classes)].flat[0])
        raise ModelError(f"label {bad} in the samples' 'y' is not a class of output "
                         f"'{acc.name}' ({acc.classes} classes: 0..{acc.classes - 1})",
                         model=model)
    acc.correct_before += int(np.count_nonzero(pa == labels))
    acc.correct_after += int(np.count_nonzero(pb == labels))
    acc.labelled += int(labels.size)


def _worst(per: list[dict[str, Any]]) -> dict[str, Any]:
    """The model-level metrics: each output's own for a single output; else the worst of each
    over the outputs (largest differences, lowest agreement) and the accuracies of the output
    whose accuracy dropped most."""
    if len(per) == 1:
        return {k: v for k, v in per[0].items() if k != "name"}

    def worst(key: str, pick: Any) -> Any:
        values = [o[key] for o in per if o[key] is not None]
        return pick(values) if values else None

    relative = [o["relative_diff"] for o in per]
    labelled = [o for o in per if o["accuracy_before"] is not None]
    drop = max(labelled, key=lambda o: o["accuracy_before"] - o["accuracy_after"], default=None)
    return {"max_abs_diff": worst("max_abs_diff", max),
            "mean_abs_diff": worst("mean_abs_diff", max),
            # an output whose relative difference is undefined (input output 0, edited not) is
            # the worst of all
            "relative_diff": None if None in relative else max(relative),
            "agreement": worst("agreement", min),
            "accuracy_before": drop["accuracy_before"] if drop else None,
            "accuracy_after": drop["accuracy_after"] if drop else None}


def check_guards(record: dict[str, Any], guards: ImpactGuards, model: str) -> None:
    """ModelError naming every broken guard with the measured and the allowed value."""
    broken = []
    count = record["samples"]["count"]
    relative = record["relative_diff"]
    if guards.max_relative_diff is not None:
        if relative is None:
            broken.append(f"relative_diff cannot be measured (the input model's output is 0 "
                          f"everywhere, max_abs_diff {record['max_abs_diff']:.6g}), "
                          f"max_relative_diff {guards.max_relative_diff:g}")
        elif relative > guards.max_relative_diff:
            broken.append(f"relative_diff {relative:.6g} > max_relative_diff "
                          f"{guards.max_relative_diff:g}")
    agreement = record["agreement"]
    if guards.min_agreement is not None:
        if agreement is None:
            broken.append(f"agreement cannot be measured (no output has more than one class), "
                          f"min_agreement {guards.min_agreement:g}")
        elif agreement < guards.min_agreement:
            broken.append(f"agreement {agreement:.6g} < min_agreement {guards.min_agreement:g}")
    if guards.max_accuracy_drop is not None:
        before, after = record["accuracy_before"], record["accuracy_after"]
        if before is None:
            broken.append(f"accuracy cannot be measured (no output with classes fits the "
                          f"labels), max_accuracy_drop {guards.max_accuracy_drop:g}")
        elif before - after > guards.max_accuracy_drop:
            broken.append(f"accuracy drop {before - after:.6g} ({before:.6g} -> {after:.6g}) > "
                          f"max_accuracy_drop {guards.max_accuracy_drop:g}")
    if broken:
        raise ModelError(f"impact on {count} samples breaks its guards: {'; '.join(broken)}; "
                         f"nothing was written", model=model,
                         hint="select fewer filters, or loosen the model's impact guards")


def _keras(job: Any) -> Any:
    from kprune_batch.quiet import require_keras

    return require_keras("measuring on samples", model=job.name, loc=f"{job.loc}.samples")


def _load(keras: Any, path: str, model: str, what: str) -> Any:
    from kprune_batch.quiet import native_stderr_silenced

    try:
        with native_stderr_silenced():
            return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # the Keras backend would have failed on it first; say which file
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"Keras could not load the {what} to measure impact ({first})",
                         model=model, file=path) from exc


def describe(record: dict[str, Any]) -> str:
    """One line of an impact record: accuracy, agreement and differences (apply, report)."""
    parts = []
    if record.get("accuracy_before") is not None:
        parts.append(f"accuracy {_pct(record['accuracy_before'])} -> "
                     f"{_pct(record['accuracy_after'])}")
    if record.get("agreement") is not None:
        parts.append(f"agreement {_pct(record['agreement'])}")
    relative = record.get("relative_diff")
    parts.append(f"max |diff| {record['max_abs_diff']:.3g} (relative "
                 f"{'undefined' if relative is None else format(relative, '.3g')}), "
                 f"mean |diff| {record['mean_abs_diff']:.3g}")
    return f"{record['samples']['count']} samples: " + ", ".join(parts)


def _pct(share: float) -> str:
    return f"{100.0 * share:.1f}%"
