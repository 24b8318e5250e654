"""Selection rules: pure numpy functions from a layer's filter slices to the filter indices they select."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kprune_batch.errors import KpruneError

RULE_KINDS = ("index", "mean", "abs_mean", "l1", "l2", "sign")
STAT_KINDS = ("mean", "abs_mean", "l1", "l2")
SIGNS = ("negative", "positive", "zero", "nonnegative", "nonpositive")


class RuleError(KpruneError):
    """A rule cannot be evaluated on a layer's kernel (index out of range, NaN weights, ...)."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message)


def filter_stats(slices: np.ndarray) -> dict[str, np.ndarray]:
    """Per-filter statistics of `slices` (n_filters, ...), computed in float64."""
    flat = np.asarray(slices, dtype=np.float64).reshape(slices.shape[0], -1)
    absval = np.abs(flat)
    return {
        "mean": flat.mean(axis=1),
        "abs_mean": absval.mean(axis=1),
        "l1": absval.sum(axis=1),
        "l2": np.sqrt((flat * flat).sum(axis=1)),
    }


def _nonfinite_filters(slices: np.ndarray) -> list[int]:
    flat = np.asarray(slices, dtype=np.float64).reshape(slices.shape[0], -1)
    return [int(i) for i in np.flatnonzero(~np.isfinite(flat).all(axis=1))]


def select(kind: str, params: Any, slices: np.ndarray) -> list[int]:
    """The sorted filter indices that rule `kind` with `params` selects from `slices`.

    `slices` is the layer's kernel as (n_filters, *slice_shape) (families.Family.filter_view).
    A threshold or sign rule on a filter holding NaN/inf is an error: NaN compares false with
    everything, so it would silently never be selected (nor kept on purpose).
    """
    n = int(slices.shape[0])
    if kind == "index":
        bad = sorted({int(i) for i in params if not 0 <= int(i) < n})
        if bad:
            raise RuleError(
                f"index {bad[0]} is out of range: the layer has {n} filters (valid: 0..{n - 1})")
        return sorted({int(i) for i in params})
    nonfinite = _nonfinite_filters(slices)
    if nonfinite:
        raise RuleError(
            f"filter {nonfinite[0]} has NaN or infinite weights "
            f"({len(nonfinite)} filter(s) affected); a '{kind}' rule cannot compare them",
            hint="fix the model, or select those filters with an 'index' rule")
    if kind in STAT_KINDS:
        values = filter_stats(slices)[kind]
        params = dict(params)
        if "below" in params:
            return [int(i) for i in np.flatnonzero(values < float(params["below"]))]
        return [int(i) for i in np.flatnonzero(values > float(params["above"]))]
    if kind == "sign":
        return _select_sign(params, slices)
    raise RuleError(f"unknown rule kind '{kind}'")


def _select_sign(params: Mapping[str, Any], slices: np.ndarray) -> list[int]:
    element = [int(e) for e in params["element"]]
    slice_shape = tuple(slices.shape[1:])
    if len(element) != len(slice_shape):
        raise RuleError(
            f"sign.element has {len(element)} number(s) but a filter slice of this layer has "
            f"{len(slice_shape)} axes (shape {list(slice_shape)})",
            hint=f"give one index per axis, e.g. {[0] * len(slice_shape)}")
    for axis, (e, size) in enumerate(zip(element, slice_shape, strict=True)):
        if not 0 <= e < size:
            raise RuleError(
                f"sign.element {element} is out of range on axis {axis}: the filter slice has "
                f"shape {list(slice_shape)}")
    values = np.asarray(slices[(slice(None),) + tuple(element)], dtype=np.float64)
    test = {
        "negative": values < 0,
        "positive": values > 0,
        "zero": values == 0,
        "nonnegative": values >= 0,
        "nonpositive": values <= 0,
    }[params["zero"]]
    return [int(i) for i in np.flatnonzero(test)]
