"""The layer-family table against the real Keras layers' kernels (shapes and channel order)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kprune_batch.families import activation_value, family_of


@pytest.mark.parametrize("cls, kwargs, input_shape, n_filters, slice_shape", [
    ("Conv1D", {"filters": 5, "kernel_size": 3}, (1, 9, 4), 5, (3, 4)),
    ("Conv2D", {"filters": 6, "kernel_size": 3, "groups": 2}, (1, 9, 9, 4), 6, (3, 3, 2)),
    ("Conv3D", {"filters": 2, "kernel_size": 2}, (1, 4, 4, 4, 3), 2, (2, 2, 2, 3)),
    ("Conv2DTranspose", {"filters": 5, "kernel_size": 3}, (1, 6, 6, 4), 5, (3, 3, 4)),
    ("Conv1DTranspose", {"filters": 3, "kernel_size": 2}, (1, 6, 4), 3, (2, 4)),
    ("DepthwiseConv2D", {"kernel_size": 3, "depth_multiplier": 2}, (1, 6, 6, 4), 8, (3, 3)),
    ("DepthwiseConv1D", {"kernel_size": 3, "depth_multiplier": 3}, (1, 6, 2), 6, (3,)),
    ("SeparableConv2D", {"filters": 7, "kernel_size": 3, "depth_multiplier": 2}, (1, 6, 6, 4), 7,
     (1, 1, 8)),
    ("SeparableConv1D", {"filters": 3, "kernel_size": 3}, (1, 6, 4), 3, (1, 4)),
])
def test_filter_count_and_slice_shape(keras: Any, cls: str, kwargs: dict, input_shape: tuple,
                                      n_filters: int, slice_shape: tuple) -> None:
    layer = getattr(keras.layers, cls)(**kwargs)
    layer.build(input_shape)
    fam = family_of(cls)
    kernel = {v.name: v.numpy() for v in layer.weights}[fam.kernel_var]
    assert fam.n_filters(kernel.shape) == n_filters
    assert fam.slice_shape(kernel.shape) == slice_shape
    assert fam.filter_view(kernel).shape == (n_filters,) + slice_shape
    # the layer's output channel count is the filter count (bias has one element per filter)
    if "bias" in {v.name for v in layer.weights}:
        assert {v.name: v for v in layer.weights}["bias"].shape == (n_filters,)


@pytest.mark.parametrize("cls, kwargs, input_shape", [
    ("Conv2D", {"filters": 4, "kernel_size": 3, "groups": 2}, (2, 7, 7, 4)),
    ("Conv2DTranspose", {"filters": 3, "kernel_size": 3}, (2, 5, 5, 2)),
    ("DepthwiseConv2D", {"kernel_size": 3, "depth_multiplier": 2}, (2, 6, 6, 3)),
    ("SeparableConv2D", {"filters": 4, "kernel_size": 3, "depth_multiplier": 2}, (2, 6, 6, 3)),
    ("Conv1D", {"filters": 3, "kernel_size": 2, "data_format": "channels_first"}, (2, 4, 9)),
])
def test_zeroing_a_filter_zeroes_exactly_that_output_channel(keras: Any, cls: str, kwargs: dict,
                                                             input_shape: tuple) -> None:
    """Ground truth from the layer itself: zero filter f (and its bias), run the layer, and only
    output channel f becomes 0 while every other channel is unchanged."""
    rng = np.random.default_rng(3)
    layer = getattr(keras.layers, cls)(**kwargs)
    layer.build(input_shape)
    for v in layer.weights:
        v.assign(rng.normal(size=tuple(v.shape)).astype("float32"))
    x = rng.normal(size=input_shape).astype("float32")
    before = np.asarray(layer(x))
    fam = family_of(cls)
    n = fam.n_filters(tuple({v.name: v for v in layer.weights}[fam.kernel_var].shape))
    channel_axis = 1 if kwargs.get("data_format") == "channels_first" else -1
    for f in range(n):
        weights = {v.name: v for v in layer.weights}
        kernel = weights[fam.kernel_var].numpy()
        bias = weights["bias"].numpy()
        weights[fam.kernel_var].assign(fam.zeroed(kernel, [f]))
        new_bias = bias.copy()
        new_bias[f] = 0
        weights["bias"].assign(new_bias)
        after = np.asarray(layer(x))
        weights[fam.kernel_var].assign(kernel)
        weights["bias"].assign(bias)
        moved_after = np.moveaxis(after, channel_axis, 0)
        moved_before = np.moveaxis(before, channel_axis, 0)
        assert np.all(moved_after[f] == 0), f"{cls}: channel {f} not zero"
        others = [c for c in range(n) if c != f]
        np.testing.assert_array_equal(moved_after[others], moved_before[others])


@pytest.mark.parametrize("name, x, expected", [
    ("relu", 0.0, 0.0), ("relu", -2.0, 0.0), ("sigmoid", 0.0, 0.5), ("tanh", 0.0, 0.0),
    ("linear", 1.5, 1.5), ("elu", 0.0, 0.0), ("softplus", 0.0, np.log(2.0)),
    ("hard_sigmoid", 0.0, 0.5), ("exponential", 0.0, 1.0), ("gelu", 0.0, 0.0),
])
def test_activation_values_match_keras(keras: Any, name: str, x: float, expected: float) -> None:
    mine = activation_value("Conv2D", {"activation": name}, x)
    theirs = float(np.asarray(keras.activations.get(name)(np.array([x], dtype="float32")))[0])
    assert mine == pytest.approx(expected, abs=1e-7)
    assert mine == pytest.approx(theirs, abs=1e-6)


def test_unknown_activation_is_unknown_not_zero() -> None:
    assert activation_value("Conv2D", {"activation": "softmax"}, 0.0) is None
    assert activation_value("Conv2D", {"activation": {"module": "x", "config": {"q": 1}}}, 0.0) \
        is None


@pytest.mark.parametrize("cls, shape", [
    ("Conv2D", (3, 3, 4, 6)), ("Conv1D", (2, 5, 3)), ("Conv2DTranspose", (3, 3, 5, 4)),
    ("DepthwiseConv2D", (3, 3, 4, 2)), ("SeparableConv2D", (1, 1, 8, 7)), ("Conv2D", (0, 3, 4, 5)),
])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_loud_filters_match_a_comparison_of_each_slice(cls: str, shape: tuple,
                                                       dtype: type) -> None:
    """Loud: the slice holds anything but 0 or -0.0 (NaN, inf and the smallest subnormal are
    loud), whatever the family's filter layout; expected from each slice compared with 0."""
    fam = family_of(cls)
    kernel = np.random.default_rng(3).normal(size=shape).astype(dtype)
    n = fam.n_filters(kernel.shape)
    slices = fam.filter_view(kernel)  # a writable view: setting a slice sets the kernel
    for f in range(0, n, 2):
        slices[f] = 0
    if kernel.size:
        slices[1] = -0.0  # zero
        tiny = np.finfo(dtype).smallest_subnormal
        for f, value in ((0, np.nan), (2, tiny), (4 % n, -np.inf)):
            slices[f].flat[-1] = value
    expected = [bool(np.any(slices[f] != 0)) for f in range(n)]
    picked = [f for f in range(n) if f % 3 != 2]
    assert fam.loud_filters(kernel, list(range(n))).tolist() == expected
    assert fam.loud_filters(kernel, picked).tolist() == [expected[f] for f in picked]
    assert fam.loud_filters(kernel, []).tolist() == []
