"""The channels_last twin: a channels_first model rebuilt channels_last, for CPUs that cannot run NCHW convolutions.

TensorFlow 2.21's CPU kernels refuse channels_first (NCHW) convolutions where oneDNN does not take
them (an AMD EPYC machine: `UnimplementedError`), so a channels_first model cannot be run there:
not for the probe, not for the proof of a removal. Its twin computes the same function on
transposed tensors: every channels_first layer becomes channels_last, every tensor that was
(N, C, *spatial) is (N, *spatial, C), every axis argument follows, and the weights are the same
arrays (Keras 3 stores a convolution's kernel as kernel_size + (in, out) for both data formats:
keras/src/layers/convolutional/base_conv.py build()). What is not provably the same (a layer that
reads the axis order and has no axis argument kprune knows: Reshape, Permute, Dense on a
transposed tensor, an operation node, a nested model) is refused with NotProvable, and the
caller runs the model as it is (and says so where that fails).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from kprune_batch.families import ACTIVATION_LAYER_CLASSES, BATCHNORM_CLASSES
from kprune_batch.graph import MODEL_CLASSES, _histories, operation_module
from kprune_batch.quiet import to_numpy

RAN_ON_TWIN = "channels_last twin"
FORCE_ENV = "KPRUNE_CHANNELS_LAST_TWIN"  # "1": use the twin on every CPU (tests, odd hardware)

# layers that act on each element (or each channel with no axis argument) alike in both layouts
# (a dropout with a noise_shape is not: the shape names axes)
_ELEMENTWISE = frozenset(ACTIVATION_LAYER_CLASSES + ("Identity", "GaussianNoise",
                                                     "GaussianDropout", "Dropout",
                                                     "AlphaDropout"))
_MERGES = frozenset(("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"))
# channels_first/last layers whose output keeps spatial axes (vs GlobalPooling and Flatten)
_FLAT_OUTPUT = ("GlobalAveragePooling", "GlobalMaxPooling", "Flatten")


class NotProvable(ValueError):
    """The twin would not provably compute the same function; `str()` says where."""


@dataclass
class Twin:
    model: Any  # the channels_last Keras model, with the original's weights
    transposed: dict[str, bool]  # layer name -> its output is (N, *spatial, C) in the twin
    inputs_transposed: list[bool]  # per model input

    def to_twin(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.moveaxis(x, 1, -1) if t else x
                for x, t in zip(inputs, self.inputs_transposed, strict=True)]


def has_channels_first(config: dict[str, Any]) -> bool:
    return '"channels_first"' in _dumps(config)


def _dumps(config: Any) -> str:
    import json

    return json.dumps(config)


_REFUSES: bool | None = None


def cpu_refuses_nchw(keras: Any) -> bool:
    """Whether this process's framework cannot run a channels_first convolution (measured once,
    on a 1x1 convolution of a 1x1x2x2 tensor); KPRUNE_CHANNELS_LAST_TWIN=1 says yes."""
    global _REFUSES
    if os.environ.get(FORCE_ENV) == "1":
        return True
    if _REFUSES is None:
        try:
            layer = keras.layers.Conv2D(1, 1, data_format="channels_first")
            np.asarray(layer(np.zeros((1, 1, 2, 2), "float32")))
            _REFUSES = False
        except Exception:  # noqa: BLE001 - UnimplementedError, or whatever the backend raises
            _REFUSES = True
    return _REFUSES


def runnable(keras: Any, model: Any) -> tuple[Any, Twin | None, str | None]:
    """(model to run, its Twin or None, why no twin could be used where one was needed).

    The model itself where this CPU runs it (or it has no channels_first layer), else its twin
    when provably equivalent, else the model itself with the reason (running it will fail)."""
    if not cpu_refuses_nchw(keras):  # first: most CPUs, and no serialization for them
        return model, None, None
    config = keras.saving.serialize_keras_object(model)
    if not has_channels_first(config):
        return model, None, None
    try:
        twin = channels_last_twin(keras, model, config)
    except NotProvable as exc:
        return model, None, str(exc)
    return twin.model, twin, None


def channels_last_twin(keras: Any, model: Any, config: dict[str, Any] | None = None) -> Twin:
    """The twin of a Functional or Sequential model (NotProvable where it cannot be exact)."""
    config = copy.deepcopy(config or keras.saving.serialize_keras_object(model))
    if config.get("class_name") == "Sequential":
        config = _sequential_as_functional(config, model)
    elif config.get("class_name") not in ("Functional", "Model"):
        raise NotProvable(f"a {config.get('class_name')} model")
    cfg = config["config"]
    transposed: dict[str, bool] = {}

    def rank_of(name: str) -> int:
        from kprune_batch.backends.keras_backend import find_node

        out = find_node(model, name).output
        if isinstance(out, (list, tuple)):
            raise NotProvable(f"'{name}' has several outputs")
        return len(out.shape)

    out_layers: list[dict[str, Any]] = []
    for layer in cfg["layers"]:
        _strip(layer)
        name, cls, lcfg = layer["name"], layer["class_name"], layer["config"]
        sources = [(src, rank_of(src)) for src, _ in _tensors(layer.get("inbound_nodes") or [])]
        ins = [transposed[src] for src, _ in sources]
        rank = max([r for _, r in sources] or [0])
        if cls == "InputLayer":
            shape = lcfg.get("batch_shape") or lcfg.get("batch_input_shape")
            first = _input_layout(cfg["layers"], name)
            if first and len(shape) >= 3:
                lcfg["batch_shape"] = [shape[0], *shape[2:], shape[1]]
                lcfg.pop("batch_input_shape", None)
            transposed[name] = bool(first and len(shape) >= 3)
            out_layers.append(layer)
            continue
        if operation_module(layer) is not None or cls in MODEL_CLASSES:
            if any(ins):
                raise NotProvable(f"'{name}' ({cls}) reads a channels_first tensor")
            if cls in MODEL_CLASSES and has_channels_first(layer):
                raise NotProvable(f"nested model '{name}' has channels_first layers")
            transposed[name] = False
            out_layers.append(layer)
            continue
        fmt = lcfg.get("data_format")
        if fmt == "channels_first":
            if not all(ins) and sources and rank >= 3:
                raise NotProvable(f"'{name}' is channels_first but its input is not")
            lcfg["data_format"] = "channels_last"
            transposed[name] = not cls.startswith(_FLAT_OUTPUT) or bool(lcfg.get("keepdims"))
        elif not any(ins):
            transposed[name] = False
        elif cls == "Flatten":  # channels_last Flatten of a (N, C, *s) tensor: C-major order
            permute = _permute_before(layer, rank, cfg["layers"])
            out_layers.append(permute)
            transposed[permute["name"]] = transposed[name] = False
        elif fmt is not None:
            raise NotProvable(f"'{name}' is channels_last but reads a channels_first tensor")
        elif cls in _ELEMENTWISE and not lcfg.get("noise_shape"):
            transposed[name] = True
        elif cls in BATCHNORM_CLASSES or cls in ("LayerNormalization", "Concatenate", "Softmax"):
            if not all(ins):
                raise NotProvable(f"'{name}' mixes channels_first and other tensors")
            key = "axis"
            lcfg[key] = _map_axes(lcfg.get(key, -1), rank, name)
            transposed[name] = True
        elif cls in _MERGES:
            if not all(ins):
                raise NotProvable(f"'{name}' mixes channels_first and other tensors")
            transposed[name] = True
        else:
            raise NotProvable(f"'{name}' ({cls}) reads a channels_first tensor and kprune does "
                              f"not know that it is the same on a channels_last one")
        out_layers.append(layer)
    cfg["layers"] = out_layers
    inputs = [transposed[entry[0]] for entry in _entries(cfg.get("input_layers"))]
    twin_model = keras.Model.from_config(copy.deepcopy(cfg))  # (from_config pops keys)
    for layer in _leaf_layers(model):
        twin_model.get_layer(layer.name).set_weights(layer.get_weights())
    return Twin(twin_model, transposed, inputs)


def _leaf_layers(model: Any) -> list[Any]:
    return [layer for layer in model.layers if layer.weights]


def _strip(layer: dict[str, Any]) -> None:
    # build shapes are the original's layout; the twin's layers build on their first call
    layer.pop("build_config", None)
    layer.pop("compile_config", None)


def _tensors(nodes: Any) -> list[tuple[str, Any]]:
    """(producer name, keras_tensor config) of every tensor a layer's inbound nodes consume."""
    out = []
    for item in _walk_tensors(nodes):
        hist = item["config"]["keras_history"]
        out.append((hist[0], item["config"]))
    if not out:  # Keras 2 style [name, node, tensor, kwargs]
        out = [(name, None) for name, _ in _histories(nodes)]
    return out


def _walk_tensors(obj: Any) -> list[dict[str, Any]]:
    found, stack = [], [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("class_name") == "__keras_tensor__":
                found.append(item)
                continue
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return found


def _entries(spec: Any) -> list[list[Any]]:
    if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], str):
        return [list(spec)]
    if isinstance(spec, (list, tuple)):
        return [e for item in spec for e in _entries(item)]
    if isinstance(spec, dict):
        return [e for item in spec.values() for e in _entries(item)]
    return []


def _input_layout(layers: list[dict[str, Any]], name: str) -> bool:
    """Whether input `name` is channels_first: the first layers with a data_format it reaches
    (through layers without one) all say channels_first. Mixed is not provable."""
    consumers: dict[str, list[dict[str, Any]]] = {}
    for layer in layers:
        for src, _ in _tensors(layer.get("inbound_nodes") or []):
            consumers.setdefault(src, []).append(layer)
    formats, todo, seen = set(), [name], {name}
    while todo:
        for layer in consumers.get(todo.pop(), []):
            fmt = layer["config"].get("data_format")
            if fmt is not None:
                formats.add(fmt)
            elif layer["name"] not in seen and layer["class_name"] not in MODEL_CLASSES:
                seen.add(layer["name"])
                todo.append(layer["name"])
    if len(formats) > 1:
        raise NotProvable(f"input '{name}' feeds channels_first and channels_last layers")
    return formats == {"channels_first"}


def _map_axes(axis: Any, rank: int, name: str) -> Any:
    """An axis of a (N, C, *s) tensor as the same axis of the (N, *s, C) twin tensor."""
    def one(a: Any) -> int:
        if not isinstance(a, int) or rank < 3 or not -rank <= a < rank:
            raise NotProvable(f"'{name}' has axis {a!r} on a rank-{rank} tensor")
        a %= rank
        return 0 if a == 0 else rank - 1 if a == 1 else a - 1
    if isinstance(axis, (list, tuple)):
        return [one(a) for a in axis]
    return one(axis)


def _permute_before(flatten: dict[str, Any], rank: int,
                    layers: list[dict[str, Any]]) -> dict[str, Any]:
    """A Permute that gives a channels_last Flatten of the twin the original's (C, *s) order;
    the Flatten is rewired to read it."""
    taken = {layer["name"] for layer in layers}
    name, n = f"{flatten['name']}_twin_permute", 0
    while name in taken:
        n += 1
        name = f"{flatten['name']}_twin_permute_{n}"
    permute = {"module": "keras.layers", "class_name": "Permute", "registered_name": None,
               "name": name,
               "config": {"name": name, "trainable": False,
                          "dims": [rank - 1, *range(1, rank - 1)]},
               "inbound_nodes": copy.deepcopy(flatten["inbound_nodes"])}
    for tensor in _walk_tensors(flatten["inbound_nodes"]):
        tensor["config"]["keras_history"] = [name, 0, 0]
    return permute


def _sequential_as_functional(config: dict[str, Any], model: Any) -> dict[str, Any]:
    """A Sequential config as the Functional config of the same layers (one chain)."""
    from kprune_batch.backends.keras_backend import find_node

    layers = config["config"]["layers"]
    if not layers or layers[0].get("class_name") != "InputLayer":
        raise NotProvable("a Sequential model without an InputLayer")
    chain, previous = [], None
    for layer in layers:
        layer = copy.deepcopy(layer)
        layer["name"] = layer["config"]["name"]
        if previous is None:
            layer["inbound_nodes"] = []
        else:
            out = find_node(model, previous).output
            layer["inbound_nodes"] = [{"args": [{"class_name": "__keras_tensor__", "config": {
                "shape": list(out.shape), "dtype": str(out.dtype),
                "keras_history": [previous, 0, 0]}}], "kwargs": {}}]
        previous = layer["name"]
        chain.append(layer)
    first = chain[0]["name"]
    return {"class_name": "Functional", "config": {
        "name": config["config"].get("name"), "trainable": True, "layers": chain,
        "input_layers": [first, 0, 0], "output_layers": [previous, 0, 0]}}


def run_points(keras: Any, model: Any, feed: Any, points: list[tuple[str, str]],
               training: bool = False,
               take: list[tuple[int, list[int]] | None] | None = None
               ) -> tuple[list[np.ndarray], str]:
    """Values at `points` ((layer name, "input" | "output") of top-level layers, or ("", "model")
    for the model's outputs, flattened) on `feed`, in the model's own layout, and what ran:
    "model", or the channels_last twin where this CPU cannot run the model (its values moved
    back to (N, C, *s)). `take[i]` = (axis, indices): only those entries of point i's axis (in
    the model's own layout), gathered in the run itself, so that the whole tensor never
    becomes a numpy array (a removal's sinks: ~0.7 GB of ResNet50's activations otherwise)."""
    run, twin, _why = runnable(keras, model)
    feeds = list(feed) if isinstance(feed, (list, tuple)) else [feed]
    if twin is not None:
        feeds = twin.to_twin(feeds)
    wanted, back = [], []
    for i, (name, which) in enumerate(points):
        if which == "model":
            outs = keras.tree.flatten(run.outputs)
            wanted += outs
            back += [_is_transposed(twin, t) for t in outs]
            continue
        tensor = getattr(run.get_layer(name), which)
        transposed = _is_transposed(twin, tensor)
        if take is not None and take[i] is not None:
            axis, indices = take[i]  # type: ignore[misc]
            rank = len(tensor.shape)
            axis %= rank
            if transposed:  # the twin holds (N, *s, C) for (N, C, *s): axis 1 is last
                axis = rank - 1 if axis == 1 else axis - (axis > 1)
            tensor = keras.ops.take(tensor, np.asarray(indices, dtype="int32"), axis=axis)
        wanted.append(tensor)
        back.append(transposed)
    inputs = run.inputs if len(run.inputs) > 1 else run.inputs[0]
    values = keras.tree.flatten(keras.Model(inputs, wanted)(
        feeds if len(feeds) > 1 else feeds[0], training=training))
    values = [to_numpy(keras, v) for v in values]  # torch outputs require grad
    out = [np.moveaxis(v, -1, 1) if t else v
           for v, t in zip(values, back, strict=True)]
    return out, "model" if twin is None else RAN_ON_TWIN


def _is_transposed(twin: Twin | None, tensor: Any) -> bool:
    return twin is not None and twin.transposed.get(tensor._keras_history[0].name, False)
