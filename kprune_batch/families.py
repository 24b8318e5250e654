"""The layer-family table: which variable holds a layer's filters, on which axis, and what follows it.

Every other module (rules, executor, silence analysis, future backends) asks this table; no other
module knows a kernel layout. Layout facts are from the Keras 3 sources (keras/src/layers/convolutional/).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Family:
    """How one family of convolution layers stores its filters."""

    name: str
    classes: tuple[str, ...]
    kernel_var: str  # the Keras 3 variable name (layer.weights[i].name)
    legacy_kernel_vars: tuple[str, ...]  # names a Keras 2 / legacy .h5 file may use
    description: str

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return (self.kernel_var,) + self.legacy_kernel_vars

    def kernel_name(self, variables: dict[str, Any]) -> str | None:
        """Which of a layer's variables holds the filters (Keras 3 name first), or None."""
        return next((n for n in self.kernel_names if n in variables), None)

    def n_filters(self, kernel_shape: tuple[int, ...]) -> int:
        if self.name == "depthwise":
            return int(kernel_shape[-2]) * int(kernel_shape[-1])
        if self.name == "conv_transpose":
            return int(kernel_shape[-2])
        return int(kernel_shape[-1])

    def slice_shape(self, kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one filter's kernel slice (the kernel with the filter axis fixed)."""
        if self.name == "depthwise":
            return tuple(int(d) for d in kernel_shape[:-2])
        if self.name == "conv_transpose":
            return tuple(int(d) for d in kernel_shape[:-2]) + (int(kernel_shape[-1]),)
        return tuple(int(d) for d in kernel_shape[:-1])

    def filter_view(self, kernel: np.ndarray) -> np.ndarray:
        """The kernel as (n_filters, *slice_shape); a writable view when `kernel` is C-contiguous.

        Conv*: kernel (*k, in/groups, filters), filters on axis -1 (base_conv.py build()).
        Conv*Transpose: kernel (*k, filters, in), filters on axis -2 (base_conv_transpose.py build()).
        DepthwiseConv*: kernel (*k, in, mult); output channel c*mult + m (base_depthwise_conv.py
        call() reshapes the same way), so a C-order reshape of the last two axes gives the channel.
        SeparableConv*: pointwise_kernel (1.., in*mult, filters), filters on axis -1.
        """
        if self.name == "depthwise":
            flat = kernel.reshape(kernel.shape[:-2] + (kernel.shape[-2] * kernel.shape[-1],))
            return np.moveaxis(flat, -1, 0)
        if self.name == "conv_transpose":
            return np.moveaxis(kernel, -2, 0)
        return np.moveaxis(kernel, -1, 0)

    def zeroed(self, kernel: np.ndarray, filters: list[int]) -> np.ndarray:
        """A copy of `kernel` with the given filters' slices set to 0 (nothing else touched)."""
        out = np.array(kernel, copy=True, order="C")
        view = self.filter_view(out)
        if filters:
            view[np.asarray(filters, dtype=np.int64)] = 0
        return out


FAMILIES: tuple[Family, ...] = (
    Family("conv", ("Conv1D", "Conv2D", "Conv3D"), "kernel", ("kernel",),
           "kernel, filter axis -1"),
    Family("conv_transpose", ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"), "kernel",
           ("kernel",), "kernel, filter axis -2"),
    Family("depthwise", ("DepthwiseConv1D", "DepthwiseConv2D"), "kernel",
           ("depthwise_kernel", "kernel"), "depthwise kernel (..., in, mult), channel c*mult+m"),
    Family("separable", ("SeparableConv1D", "SeparableConv2D"), "pointwise_kernel",
           ("pointwise_kernel",), "pointwise_kernel, filter axis -1"),
)

_BY_CLASS = {cls: fam for fam in FAMILIES for cls in fam.classes}
# Keras keeps these aliases (keras/src/layers/__init__.py); configs normally hold the canonical name.
_ALIASES = {
    "Convolution1D": "Conv1D", "Convolution2D": "Conv2D", "Convolution3D": "Conv3D",
    "Convolution1DTranspose": "Conv1DTranspose", "Convolution2DTranspose": "Conv2DTranspose",
    "Convolution3DTranspose": "Conv3DTranspose",
    "SeparableConvolution1D": "SeparableConv1D", "SeparableConvolution2D": "SeparableConv2D",
}

CONV_CLASSES: tuple[str, ...] = tuple(_BY_CLASS) + tuple(_ALIASES)


def family_of(class_name: str) -> Family | None:
    """The family of a layer class name, or None for a layer without filters."""
    return _BY_CLASS.get(_ALIASES.get(class_name, class_name))


def canonical_class(class_name: str) -> str:
    return _ALIASES.get(class_name, class_name)


# --- what follows a layer -------------------------------------------------------------------

BATCHNORM_CLASSES = ("BatchNormalization",)
# Stateless, elementwise activation layers a channel passes through on its way to a BN follower.
ACTIVATION_LAYER_CLASSES = ("Activation", "ReLU", "LeakyReLU", "ELU")
# Layers that keep each channel on its axis and map a channel that is 0 everywhere to 0 (pooling
# of zeros, dropout of zeros, zero padding of zeros): a BN after them is still a follower of a
# silenced channel. A nested model's InputLayer is the tensor itself.
ZERO_PRESERVING_CLASSES = (
    "InputLayer", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D",
    "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D",
)


def _erf(x: float) -> float:
    return math.erf(x)


# Elementwise activations as float64 functions of a scalar, matching keras/src/activations/
# activations.py (Keras 3 defaults: leaky_relu negative_slope=0.2, elu alpha=1.0, gelu approximate=False).
_ACTIVATIONS: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x,
    "relu": lambda x: max(x, 0.0),
    "relu6": lambda x: min(max(x, 0.0), 6.0),
    "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)),
    "hard_sigmoid": lambda x: min(max(x + 3.0, 0.0), 6.0) / 6.0,
    "tanh": math.tanh,
    "elu": lambda x: x if x > 0 else math.expm1(x),
    "selu": lambda x: 1.0507009873554805 * (x if x > 0 else 1.6732632423543772 * math.expm1(x)),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "silu": lambda x: x / (1.0 + math.exp(-x)),
    "swish": lambda x: x / (1.0 + math.exp(-x)),
    "hard_silu": lambda x: x * min(max(x + 3.0, 0.0), 6.0) / 6.0,
    "hard_swish": lambda x: x * min(max(x + 3.0, 0.0), 6.0) / 6.0,
    "softplus": lambda x: math.log1p(math.exp(-abs(x))) + max(x, 0.0),
    "softsign": lambda x: x / (1.0 + abs(x)),
    "exponential": math.exp,
    "leaky_relu": lambda x: x if x >= 0 else 0.2 * x,
    "mish": lambda x: x * math.tanh(math.log1p(math.exp(-abs(x))) + max(x, 0.0)),
    "tanh_shrink": lambda x: x - math.tanh(x),
    "hard_tanh": lambda x: min(max(x, -1.0), 1.0),
}


def activation_name(value: Any) -> str | None:
    """The name of a serialized activation (a string, or Keras's {'config': name} dict), or None."""
    if value is None:
        return "linear"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        inner = value.get("config")
        if isinstance(inner, str):
            return inner
        if isinstance(inner, dict) and isinstance(inner.get("name"), str):
            return inner["name"]
    return None


def activation_value(class_name: str, config: dict[str, Any], x: float) -> float | None:
    """The output of a layer's elementwise activation at constant input x, or None if unknown.

    For a convolution layer this is its `activation` argument; for an activation layer, its own
    function (ReLU/LeakyReLU/ELU keep their parameters in the config: keras/src/layers/activations/).
    """
    if class_name == "ReLU":
        neg = float(config.get("negative_slope") or 0.0)
        thr = float(config.get("threshold") or 0.0)
        max_value = config.get("max_value")
        y = x if x >= thr else neg * (x - thr)
        if max_value is not None:
            y = min(y, float(max_value))
        return y
    if class_name == "LeakyReLU":
        slope = config.get("negative_slope", config.get("alpha", 0.3))
        return x if x >= 0 else float(slope) * x
    if class_name == "ELU":
        alpha = float(config.get("alpha", 1.0))
        return x if x > 0 else alpha * math.expm1(x)
    name = activation_name(config.get("activation"))
    fn = _ACTIVATIONS.get(name) if name else None
    return None if fn is None else float(fn(float(x)))
