"""Static silence analysis: where a zeroed channel goes, which BatchNorm edits silence it, and whether it is silent.

Pure: works on the layer graph (from the model config) and numpy arrays; no TensorFlow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kprune_batch.families import (ACTIVATION_LAYER_CLASSES, BATCHNORM_CLASSES,
                                   TRAINING_NOISE_CLASSES, ZERO_PRESERVING_CLASSES,
                                   activation_value)
from kprune_batch.graph import OUTPUT, GraphLayer, LayerGraph, channel_concat



@dataclass(frozen=True)
class BnEdit:
    layer: str
    variable: str
    channel: int
    value: float


@dataclass
class Fate:
    """What a zeroed channel becomes downstream of its layer."""

    silent: bool
    constant: float | None  # inference-mode value where not silent; None when it cannot be known
    edits: list[BnEdit] = field(default_factory=list)
    followers: list[str] = field(default_factory=list)  # BatchNormalization layers on the way
    notes: list[str] = field(default_factory=list)


def _bn_axis_ok(bn: GraphLayer, conv_config: dict) -> bool:
    """Does the BN normalise the conv's channel axis? (channels_first: axis 1, else the last)."""
    axis = bn.config.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if not isinstance(axis, int):
        return False
    shape = bn.input_shape
    rank = len(shape) if isinstance(shape, list) else None
    if conv_config.get("data_format") == "channels_first":
        return axis == 1
    return axis == -1 or (rank is not None and axis == rank - 1)


def channel_fate(graph: LayerGraph, layer_path: str, channel: int, pre_activation: float,
                 neutralize: bool, variables: Callable[[str], dict[str, np.ndarray]],
                 through_concat: bool = False) -> Fate:
    """Follow channel `channel` of `layer_path`, whose pre-activation output is the constant
    `pre_activation`, through its activation, activation layers and BatchNorm followers.

    `through_concat` (`batchnorm: neutralize_concat`): also through Concatenates on the channel
    axis, where the channel becomes the result's channel offset + channel (a BnEdit's `channel`
    is then not the filter), so a BatchNormalization after a concatenation is a follower too.

    `variables(path)` returns a layer's variables by name (as the input model has them).
    The channel is silent only if every place it reaches sees exactly 0, in inference and in
    training mode; anything unknown (an activation kprune cannot evaluate, a shared layer, a BN
    on another axis) makes it not silent, never the other way round.
    """
    layer = graph.layers[layer_path]
    fate = Fate(silent=True, constant=None)
    value = activation_value(layer.class_name, layer.config, pre_activation)
    if value is None:
        fate.notes.append(f"activation of '{layer_path}' is not known to kprune")
    _follow(graph, layer_path, layer.config, channel, value, neutralize, variables, fate, set(),
            through_concat=through_concat)
    return fate


def _mark_loud(fate: Fate, value: float | None) -> None:
    if fate.silent or fate.constant is None:
        fate.constant = value
    fate.silent = False


def _follow(graph: LayerGraph, src: str, conv_config: dict, channel: int, value: float | None,
            neutralize: bool, variables: Callable[[str], dict[str, np.ndarray]], fate: Fate,
            seen: set[str], noisy: bool = False, through_concat: bool = False) -> None:
    """`noisy`: a layer on the way adds noise in training mode (TRAINING_NOISE_CLASSES)."""
    go_on = dict(noisy=noisy, through_concat=through_concat)
    for consumer in graph.consumers(src):
        if consumer == OUTPUT or consumer in seen:
            if value != 0.0:
                _mark_loud(fate, value)
            continue
        node = graph.layers[consumer]
        if node.operation is not None:
            # a Keras operation node (`x + 1.0`, ops.multiply): kprune knows no operation's
            # effect on a channel, so nothing after it is a follower (a BatchNormalization
            # behind it is not edited) and the channel is judged where it enters it
            if value != 0.0:
                _mark_loud(fate, value)
            behind = _batchnorm_behind(graph, consumer)
            note = (f"'{consumer}' is a Keras operation ({node.operation}.{node.class_name}), "
                    f"which kprune does not follow: BatchNormalization '{behind}' after it is "
                    f"not a follower")
            if behind is not None and note not in fate.notes:
                fate.notes.append(note)
            continue
        once = node.calls == 1
        if once and node.class_name in ZERO_PRESERVING_CLASSES and (
                value == 0.0 or node.class_name == "InputLayer"):
            _follow(graph, consumer, conv_config, channel, value, neutralize, variables, fate,
                    seen | {consumer}, noisy or node.class_name in TRAINING_NOISE_CLASSES,
                    through_concat)
        elif once and node.class_name in ACTIVATION_LAYER_CLASSES and value is not None:
            after = activation_value(node.class_name, node.config, value)
            _follow(graph, consumer, conv_config, channel, after, neutralize, variables, fate,
                    seen | {consumer}, **go_on)
        elif through_concat and node.class_name == "Concatenate":
            widths = channel_concat(graph, consumer, conv_config.get("data_format",
                                                                     "channels_last"))
            if widths is None:
                note = (f"Concatenate '{consumer}' is not followed (shared, joining a tensor "
                        f"twice, on another axis, or its input widths not in the config): a "
                        f"BatchNormalization after it is not neutralised")
                if note not in fate.notes:
                    fate.notes.append(note)
                if value != 0.0:
                    _mark_loud(fate, value)
                continue
            # input i's channel c is the result's channel sum(widths[:i]) + c (Keras's
            # Concatenate is ops.concatenate of its inputs in order: keras/src/layers/merging/
            # concatenate.py); channel_concat vouches each input comes once
            slot = node.sources.index(src)
            _follow(graph, consumer, conv_config, sum(widths[:slot]) + channel, value,
                    neutralize, variables, fate, seen | {consumer}, **go_on)
        elif once and node.class_name in BATCHNORM_CLASSES and _bn_axis_ok(node, conv_config):
            _batchnorm(consumer, node.config, channel, value, neutralize, variables(consumer), fate,
                       noisy)
        elif value != 0.0:
            _mark_loud(fate, value)


def _batchnorm_behind(graph: LayerGraph, start: str) -> str | None:
    """The first BatchNormalization reached from `start` through single-consumer elementwise
    nodes (what a reader would take for a follower), or None."""
    path, seen = start, {start}
    while True:
        nxt = graph.consumers(path)
        if len(nxt) != 1 or nxt[0] == OUTPUT or nxt[0] in seen:
            return None
        path = nxt[0]
        seen.add(path)
        node = graph.layers[path]
        if node.class_name in BATCHNORM_CLASSES and node.operation is None:
            return path
        if node.operation is None and node.class_name not in ZERO_PRESERVING_CLASSES \
                and node.class_name not in ACTIVATION_LAYER_CLASSES:
            return None


def _batchnorm(path: str, config: dict, channel: int, value: float | None, neutralize: bool,
               weights: dict[str, np.ndarray], fate: Fate, noisy: bool = False) -> None:
    """BN(x) = gamma * (x - mean) / sqrt(var + eps) + beta (keras/src/layers/normalization/
    batch_normalization.py); in training mode the batch mean of a constant channel is the constant.
    With `noisy` the channel is constant only in inference mode: in training its batch
    statistics are the noise's, so only gamma = 0 silences it there.
    """
    fate.followers.append(path)
    scale = "gamma" in weights
    center = "beta" in weights
    if noisy and not (neutralize and scale):
        # (the channel reaches a noise layer only as exactly 0: ZERO_PRESERVING_CLASSES)
        fate.notes.append(f"a GaussianNoise or AlphaDropout layer before BatchNormalization "
                          f"'{path}' moves the channel in training mode, where only gamma = 0 "
                          f"would silence it")
        _mark_loud(fate, 0.0 if neutralize else _inference_bn(config, weights, channel, 0.0))
    if neutralize:
        # gamma = 0 zeroes both modes exactly (0 * finite); without gamma the moving mean is set to
        # the constant input, which is exact only when that constant is 0.
        if scale:
            fate.edits.append(BnEdit(path, "gamma", channel, 0.0))
        if center:
            fate.edits.append(BnEdit(path, "beta", channel, 0.0))
        if not scale:
            fate.edits.append(BnEdit(path, "moving_mean", channel, value if value is not None else 0.0))
            if value != 0.0:
                fate.notes.append(
                    f"BatchNormalization '{path}' has scale=False and its input channel is the "
                    f"constant {value}, not 0: exact silence cannot be guaranteed")
                _mark_loud(fate, 0.0 if value is not None else None)
        return
    if value is None:
        _mark_loud(fate, None)
        return
    beta = float(weights["beta"][channel]) if center else 0.0
    inference = _inference_bn(config, weights, channel, value)
    training = beta  # (x - batch mean) is 0 for a constant channel
    if inference != 0.0 or training != 0.0:
        _mark_loud(fate, inference)


def _inference_bn(config: dict, weights: dict[str, np.ndarray], channel: int,
                  value: float) -> float:
    gamma = float(weights["gamma"][channel]) if "gamma" in weights else 1.0
    beta = float(weights["beta"][channel]) if "beta" in weights else 0.0
    mean = float(weights["moving_mean"][channel])
    var = float(weights["moving_variance"][channel])
    eps = float(config.get("epsilon", 1e-3))
    return gamma * (value - mean) / math.sqrt(var + eps) + beta
