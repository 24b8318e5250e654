"""The layer-family table: which variable holds a layer's filters, on which axis, and what follows it.

Every other module (rules, executor, silence analysis, future backends) asks this table; no other
module knows a kernel layout. Layout facts are from the Keras 3 sources (keras/src/layers/convolutional/).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # numpy is imported where arrays are handled: validate reads this table only
    import numpy as np


@dataclass(frozen=True)
class Family:
    """How one family of convolution layers stores its filters."""

    name: str
    classes: tuple[str, ...]
    kernel_var: str  # the Keras 3 variable name (layer.weights[i].name)
    legacy_kernel_vars: tuple[str, ...]  # names a Keras 2 / legacy .h5 file may use
    description: str
    # how a removal slices this family where it consumes removed channels (removal.Touch.how)
    input_touch: str = "inputs"

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
        import numpy as np

        if self.name == "depthwise":
            flat = kernel.reshape(kernel.shape[:-2] + (kernel.shape[-2] * kernel.shape[-1],))
            return np.moveaxis(flat, -1, 0)
        if self.name == "conv_transpose":
            return np.moveaxis(kernel, -2, 0)
        return np.moveaxis(kernel, -1, 0)

    def slice_axes(self, class_name: str) -> int | None:
        """Axes of one filter slice, from the class name's rank: the spatial axes, plus the
        input-channel axis except for depthwise slices (see filter_view)."""
        digits = [c for c in canonical_class(class_name) if c.isdigit()]
        if not digits:
            return None
        rank = int(digits[0])
        return rank if self.name == "depthwise" else rank + 1

    def variable_names(self, config: dict[str, Any]) -> list[str]:
        """The layer's variables in creation order (build() in keras/src/layers/convolutional/;
        = vars/0, vars/1, ... in a .keras file)."""
        bias = ["bias"] if bool(config.get("use_bias", True)) else []
        if self.name == "separable":
            return ["depthwise_kernel", "pointwise_kernel"] + bias
        return ["kernel"] + bias

    def expected_shapes(self, config: dict[str, Any], c: int) -> dict[str, tuple[int, ...]]:
        """Shapes each variable must have for `c` input channels (the build() methods)."""
        if self.name == "units":  # Dense: kernel (in, units) (keras/src/layers/core/dense.py)
            return {"kernel": (c, int(config["units"])), "bias": (int(config["units"]),)}
        k = tuple(int(v) for v in config["kernel_size"])
        if self.name == "depthwise":
            mult = int(config.get("depth_multiplier", 1))
            return {"kernel": k + (c, mult), "bias": (c * mult,)}
        filters = int(config["filters"])
        if self.name == "separable":
            mult = int(config.get("depth_multiplier", 1))
            return {"depthwise_kernel": k + (c, mult),
                    "pointwise_kernel": (1,) * len(k) + (c * mult, filters), "bias": (filters,)}
        if self.name == "conv_transpose":
            return {"kernel": k + (filters, c), "bias": (filters,)}
        groups = int(config.get("groups", 1))
        return {"kernel": k + (c // groups, filters), "bias": (filters,)}

    def stored_input_channels(self, first: tuple[int, ...], config: dict[str, Any]) -> int | None:
        """Input channels implied by the stored shape of the first variable (the kernel)."""
        if len(first) < 2:
            return None
        if self.name == "conv_transpose":
            return first[-1]
        return first[-2] * (int(config.get("groups", 1)) if self.name == "conv" else 1)

    def slice_inputs(self, variables: dict[str, np.ndarray], keep: list[int],
                     config: dict[str, Any]) -> None:
        """Keep only input channels `keep` of a layer that consumes removed channels (in place).
        A depthwise layer's own outputs c*mult..c*mult+mult-1 go with its input channel c."""
        mult = int(config.get("depth_multiplier", 1))
        expanded = [c * mult + m for c in keep for m in range(mult)]
        kernel = self.kernel_name(variables) or self.kernel_var
        if self.name == "conv_transpose":  # kernel (*k, filters, in): inputs on the last axis
            variables[kernel] = variables[kernel][..., keep]
        elif self.name == "separable":
            variables["depthwise_kernel"] = variables["depthwise_kernel"][..., keep, :]
            variables[kernel] = variables[kernel][..., expanded, :]
        else:  # conv (*k, in, filters) and depthwise (*k, in, mult)
            variables[kernel] = variables[kernel][..., keep, :]
            if self.name == "depthwise" and "bias" in variables:
                variables["bias"] = variables["bias"][expanded]

    def slice_filters(self, variables: dict[str, np.ndarray], keep: list[int]) -> None:
        """Keep only filters `keep` of a layer that loses filters (in place): the filter axis of
        its kernel (see filter_view; -2 for Conv*Transpose) and its bias."""
        kernel = self.kernel_name(variables) or self.kernel_var
        if self.name == "conv_transpose":
            variables[kernel] = variables[kernel][..., keep, :]
        else:
            variables[kernel] = variables[kernel][..., keep]
        if "bias" in variables:
            variables["bias"] = variables["bias"][keep]

    def by_filter(self, kernel: np.ndarray) -> np.ndarray:
        """A C-contiguous `kernel` as (rest, n_filters) or (rest, n_filters, inner), a view in
        the kernel's own memory order (same layouts as filter_view): an operation on some
        filters then walks the kernel front to back instead of jumping a row per weight
        (zeroing 25 % of ResNet50's filters: ~3x faster than through filter_view)."""
        assert kernel.flags.c_contiguous  # so that reshape gives a view, never a copy
        shape = tuple(int(d) for d in kernel.shape)
        if self.name == "conv_transpose":
            view = kernel.reshape((math.prod(shape[:-2]), shape[-2], shape[-1]))
        else:
            n = self.n_filters(shape)
            view = kernel.reshape((kernel.size // n if n else 0, n))
        return view

    def zeroed(self, kernel: np.ndarray, filters: list[int], in_place: bool = False
               ) -> np.ndarray:
        """`kernel` with the given filters' slices set to 0 (nothing else touched): a copy, or
        with `in_place` `kernel` itself when it is a writable C-contiguous array."""
        import numpy as np

        if in_place and kernel.flags.c_contiguous and kernel.flags.writeable:
            out = kernel
        else:
            out = np.array(kernel, copy=True, order="C")
        if filters:
            view = self.by_filter(out)
            mask = np.zeros(view.shape[1], dtype=bool)
            mask[np.asarray(filters, dtype=np.int64)] = True
            np.copyto(view, 0, where=mask if view.ndim == 2 else mask[:, None])
        return out

    def loud_filters(self, kernel: np.ndarray, filters: list[int]) -> np.ndarray:
        """For each of `filters`, whether its kernel slice holds anything but 0 (NaN counts).

        A float is 0 (or -0.0) exactly when its bits other than the sign are all 0, and NaN
        never is: the bits of every filter OR-ed together over its slice (one pass over the
        kernel in memory order, nothing allocated on the way) tell, ~4x faster than gathering
        the filters' slices and comparing them (the static check of a ranking over every conv
        of ResNet50: 23 M weights)."""
        import numpy as np

        kernel = np.ascontiguousarray(kernel)
        view = self.by_filter(kernel)
        bits = _UNSIGNED.get((kernel.dtype.kind, kernel.dtype.itemsize))
        if bits is None:  # not an IEEE float type numpy has: compare the values
            picked = view[:, filters]
            loud = np.any(picked != 0, axis=0)
            return loud if loud.ndim == 1 else np.any(loud, axis=1)
        raw = view.view(bits)
        ored = np.bitwise_or.reduce(raw, axis=(0,) if raw.ndim == 2 else (0, 2))
        magnitude = np.array(np.iinfo(bits).max >> 1, dtype=bits)  # every bit but the sign
        return (ored[filters] & magnitude) != 0


# The unsigned integer type of each IEEE floating-point type's bits (Family.loud_filters)
_UNSIGNED = {("f", 2): "uint16", ("f", 4): "uint32", ("f", 8): "uint64"}

FAMILIES: tuple[Family, ...] = (
    Family("conv", ("Conv1D", "Conv2D", "Conv3D"), "kernel", ("kernel",),
           "kernel, filter axis -1"),
    Family("conv_transpose", ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"), "kernel",
           ("kernel",), "kernel, filter axis -2", "transpose_inputs"),
    Family("depthwise", ("DepthwiseConv1D", "DepthwiseConv2D"), "kernel",
           ("depthwise_kernel", "kernel"), "depthwise kernel (..., in, mult), channel c*mult+m",
           "depthwise"),
    Family("separable", ("SeparableConv1D", "SeparableConv2D"), "pointwise_kernel",
           ("pointwise_kernel",), "pointwise_kernel, filter axis -1", "separable_inputs"),
)
INPUT_TOUCHES = tuple(sorted({fam.input_touch for fam in FAMILIES}))
# families whose filters a removal can delete (depthwise filters are their input's channels)
REMOVABLE_FAMILIES = ("conv", "separable", "conv_transpose")

_BY_CLASS = {cls: fam for fam in FAMILIES for cls in fam.classes}
# Keras keeps these aliases (keras/src/layers/__init__.py); configs normally hold the canonical name.
_ALIASES = {
    "Convolution1D": "Conv1D", "Convolution2D": "Conv2D", "Convolution3D": "Conv3D",
    "Convolution1DTranspose": "Conv1DTranspose", "Convolution2DTranspose": "Conv2DTranspose",
    "Convolution3DTranspose": "Conv3DTranspose",
    "SeparableConvolution1D": "SeparableConv1D", "SeparableConvolution2D": "SeparableConv2D",
}

CONV_CLASSES: tuple[str, ...] = tuple(_BY_CLASS) + tuple(_ALIASES)

# Dense as a coupled-group member of a removal (ConvNeXt's `pointwise_conv_2`, whose units meet
# the stage's residual Adds): kernel (in, units), bias (units,), a unit on kernel axis -1 as a
# conv's filter (keras/src/layers/core/dense.py build()). Not in FAMILIES: no rule resolves to a
# Dense layer; it is selected, zeroed and removed only as a member its group brings in.
UNITS = Family("units", ("Dense",), "kernel", ("kernel",), "kernel (in, units), unit axis -1")


def member_family_of(class_name: str) -> Family | None:
    """The family of a layer that may lose filters as a coupled-group member: a convolution's,
    or UNITS for a Dense layer."""
    return family_of(class_name) or (UNITS if class_name in UNITS.classes else None)


def family_of(class_name: str) -> Family | None:
    """The family of a layer class name, or None for a layer without filters."""
    return _BY_CLASS.get(_ALIASES.get(class_name, class_name))


def canonical_class(class_name: str) -> str:
    return _ALIASES.get(class_name, class_name)


# --- every layer kprune edits: variables and the shapes they must have -----------------------


def variable_names(class_name: str, config: dict[str, Any]) -> list[str] | None:
    """A convolution's, Dense's or BatchNormalization's variables in creation order, or None."""
    family = member_family_of(class_name)
    if family is not None:
        return family.variable_names(config)
    if canonical_class(class_name) in BATCHNORM_CLASSES:
        return ((["gamma"] if config.get("scale", True) else [])
                + (["beta"] if config.get("center", True) else [])
                + ["moving_mean", "moving_variance"])
    return None


def input_channels(class_name: str, config: dict[str, Any], build: dict[str, Any],
                   stored: dict[str, tuple[int, ...]]) -> int | None:
    """The layer's input channels: from its build shape, else (legacy .h5 configs carry no
    build_config) from the stored first variable, which the other shapes must then agree with."""
    shape = build.get("input_shape")
    cls = canonical_class(class_name)
    if isinstance(shape, list) and shape:
        if cls in BATCHNORM_CLASSES:
            axis = config.get("axis", -1)
            axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
            value = shape[axis] if isinstance(axis, int) and -len(shape) <= axis < len(shape) \
                else None
        else:
            value = shape[1] if config.get("data_format") == "channels_first" else shape[-1]
        return None if value is None else int(value)
    first = next(iter(stored.values()), None)
    if first is None or len(first) < 1:
        return None
    if cls in BATCHNORM_CLASSES:
        return first[0]
    family = member_family_of(cls)
    return None if family is None else family.stored_input_channels(first, config)


def expected_shapes(class_name: str, config: dict[str, Any], build: dict[str, Any],
                    stored: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
    """Shapes each variable must have, from the layer config and its input channels."""
    c = input_channels(class_name, config, build, stored)
    if c is None:
        return None
    if canonical_class(class_name) in BATCHNORM_CLASSES:
        return {k: (c,) for k in ("gamma", "beta", "moving_mean", "moving_variance")}
    family = member_family_of(class_name)
    return None if family is None else family.expected_shapes(config, c)


# --- what follows a layer -------------------------------------------------------------------

BATCHNORM_CLASSES = ("BatchNormalization",)
# Stateless, elementwise activation layers a channel passes through on its way to a BN follower.
ACTIVATION_LAYER_CLASSES = ("Activation", "ReLU", "LeakyReLU", "ELU")
# Layers that keep each channel on its axis and map a channel that is 0 everywhere to 0 (pooling
# of zeros, dropout of zeros, zero padding of zeros): a BN after them is still a follower of a
# silenced channel. A nested model's InputLayer is the tensor itself. GaussianNoise,
# GaussianDropout and AlphaDropout are the identity at inference (keras/src/layers/
# regularization/: `if training and rate > 0` / `stddev > 0`, else `return inputs`); in training
# GaussianNoise adds noise to a zero channel and AlphaDropout moves it, so the probe's training
# pass measures them and a silence claim through them is measured, not assumed (see README).
ZERO_PRESERVING_CLASSES = (
    "InputLayer", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D",
    "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D",
)
# Of those, the ones that move a zero channel in training mode (additive noise; AlphaDropout's
# affine correction): a BatchNormalization after them sees noise, not a constant, in training.
TRAINING_NOISE_CLASSES = ("GaussianNoise", "AlphaDropout")


# --- layers that consume channels without having filters (removal slices them) ---------------

@dataclass(frozen=True)
class RowsConsumer:
    """A layer that reads its input's last axis through the rows of `kernel` (in, out): a
    removed channel c is row c, and a constant k in it adds k * kernel[c] to the input
    projection, which its input bias absorbs."""

    name: str
    classes: tuple[str, ...]
    description: str

    def slice_rows(self, variables: dict[str, np.ndarray], keep: list[int]) -> None:
        variables["kernel"] = variables["kernel"][keep]

    def add_to_input_bias(self, class_name: str, variables: dict[str, np.ndarray],
                          delta: np.ndarray, config: dict[str, Any], dtype: Any) -> None:
        """bias += delta in float64, rounded once to `dtype`; a layer without a bias gets one.
        GRU with reset_after (the Keras 3 default) keeps (2, 3*units): row 0 is the input bias,
        row 1 the recurrent one (keras/src/layers/rnn/gru.py build() and call())."""
        two_rows = class_name == "GRU" and bool(config.get("reset_after", True))
        bias = variables.get("bias")
        if bias is None:
            bias = np.zeros((2,) + delta.shape if two_rows else delta.shape, dtype=dtype)
        out = bias.astype("float64")
        if out.ndim == 2:
            out[0] += delta
        else:
            out += delta
        variables["bias"] = out.astype(dtype)


ROWS_CONSUMERS: tuple[RowsConsumer, ...] = (
    RowsConsumer("dense", ("Dense",), "kernel (in, units): rows sliced"),
    # LSTM kernel (in, 4*units), GRU (in, 3*units), SimpleRNN (in, units): the input kernel's
    # rows; the recurrent kernel reads the state, not the channels (keras/src/layers/rnn/)
    RowsConsumer("recurrent", ("LSTM", "GRU", "SimpleRNN"), "input kernel (in, k*units): rows "
                 "sliced"),
)
_ROWS_BY_CLASS = {cls: fam for fam in ROWS_CONSUMERS for cls in fam.classes}


def rows_consumer_of(class_name: str) -> RowsConsumer | None:
    return _ROWS_BY_CLASS.get(class_name)


@dataclass(frozen=True)
class ChannelParams:
    """A layer holding one value per channel of its input's last axis in every variable
    (LayerNormalization gamma/beta, ConvNeXt's LayerScale `variable`): a removal slices them.
    `exact` is False where the layer computes statistics over the channels, which removing a
    channel changes (so the removed model cannot equal the zeroed one)."""

    name: str
    classes: tuple[str, ...]
    exact: bool
    size_key: str | None  # the config key that holds the channel count, if any
    description: str

    def slice_channels(self, variables: dict[str, np.ndarray], keep: list[int]) -> None:
        for name in variables:
            variables[name] = variables[name][keep]

    def on_channel_axis(self, config: dict[str, Any], rank: int | None) -> bool:
        """Whether the per-channel parameters are on the last axis alone."""
        if self.name != "layer_norm":
            return True
        axis = config.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if not isinstance(axis, int) or isinstance(axis, bool):
            return False
        return axis == -1 or (rank is not None and axis == rank - 1)


CHANNEL_PARAMS: tuple[ChannelParams, ...] = (
    # y = gamma * (x - mean) / sqrt(var + eps) + beta, mean and var over the channels
    # (keras/src/layers/normalization/layer_normalization.py)
    ChannelParams("layer_norm", ("LayerNormalization",), False, None,
                  "gamma, beta (channels); statistics over the channels change"),
    # x * gamma, gamma (projection_dim,) (keras/src/applications/convnext.py)
    ChannelParams("layer_scale", ("LayerScale",), True, "projection_dim", "variable (channels)"),
)
_CHANNEL_PARAMS_BY_CLASS = {cls: fam for fam in CHANNEL_PARAMS for cls in fam.classes}


def channel_params_of(class_name: str) -> ChannelParams | None:
    return _CHANNEL_PARAMS_BY_CLASS.get(class_name)


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
