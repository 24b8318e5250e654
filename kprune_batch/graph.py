"""The layer graph of a saved model config: full layer paths, classes, configs and consumers.

Built from the config alone (Keras's `model.get_config()`, `config.json` in a .keras file, the
`model_config` attribute of a .h5 file), so it needs neither TensorFlow nor Keras.

A config read from a file may be crafted, so everything the graph (and the direct backend after
it) relies on is checked here and a malformed config raises ConfigError, one line naming the
layer; nothing recurses on the file's nesting (a 5,000-deep list must not be a RecursionError).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from kprune_batch.families import (ACTIVATION_LAYER_CLASSES, BATCHNORM_CLASSES,
                                   ZERO_PRESERVING_CLASSES, family_of)

MODEL_CLASSES = ("Functional", "Sequential", "Model")
OUTPUT = "<output>"  # consumer marker: the tensor leaves the top-level model
MAX_MODEL_NESTING = 64  # models inside models; real ones nest 2 or 3 deep
# A Functional config lists the Keras operations called on symbolic tensors (`x + 1.0` is a
# keras.src.ops.numpy.Add) among its layers, with the operation class's own module
# (keras/src/models/functional.py get_config serializes every entry of `self.operations`;
# serialization_lib gives a class without a public API name its `__module__`). They are called
# like layers (functional_from_config.process_node) but are not Layers: not in `model.layers`,
# not found by `get_layer`, no variables, nothing in the weights file (saving_lib saves layers).
OPERATION_MODULE_PREFIX = "keras.src.ops."


class ConfigError(ValueError):
    """A model config that no Keras could have written (a crafted or damaged file).

    A ValueError, so the direct backend treats it as "cannot prove this file" (the auto backend
    then lets Keras decide); the Keras backend builds its graph from Keras's own config.
    """

    def __init__(self, what: str, layer: str | None = None):
        where = f"layer '{layer}': " if layer else ""
        super().__init__(f"the model config is malformed: {where}{what}")


@dataclass
class GraphLayer:
    path: str  # "outer/inner" for a layer inside a nested model
    class_name: str
    config: dict[str, Any]
    calls: int = 1  # how many times the layer is called (a shared layer: > 1)
    consumers: list[str] = field(default_factory=list)
    build_config: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # producers, in the order of the inputs
    # the module of a Keras operation node (e.g. "keras.src.ops.numpy"), None for a layer.
    # Its class_name is the operation's class, which may read like a layer's ("Add", "Multiply")
    operation: str | None = None
    # the shapes of the tensors its one inbound node consumes, in order, as a Keras 3 config
    # writes them beside each keras_history (a .h5 file's config has no build_config); else None
    inbound_shapes: list[Any] | None = None

    @property
    def input_shape(self) -> Any:
        """Its input's shape (a list of shapes for several inputs) as Keras recorded it: the
        build_config's, else that of the tensors in its inbound node (a .h5 config); or None."""
        shape = self.build_config.get("input_shape")
        if shape is not None or not self.inbound_shapes:
            return shape
        return self.inbound_shapes[0] if len(self.inbound_shapes) == 1 else self.inbound_shapes

    @property
    def holds_weights(self) -> bool:
        """False for a nested model (its layers hold them) and an operation node (none)."""
        return self.operation is None and self.class_name not in MODEL_CLASSES


@dataclass
class LayerGraph:
    layers: dict[str, GraphLayer]  # in config order, nested layers right after their model

    def consumers(self, path: str) -> list[str]:
        return self.layers[path].consumers

    def conv_paths(self) -> list[str]:
        return list(self.layers)


def channel_concat(graph: LayerGraph, path: str, data_format: str) -> list[int] | None:
    """The widths of a Concatenate's inputs if it joins them on the channel axis (called once,
    each input once), so that input i's channel c is its channel offset_i + c; else None."""
    node = graph.layers[path]
    shapes = node.input_shape
    if node.class_name != "Concatenate" or node.calls != 1 or \
            len(set(node.sources)) != len(node.sources) or \
            not isinstance(shapes, (list, tuple)) or len(shapes) != len(node.sources) or \
            not all(isinstance(s, (list, tuple)) and s for s in shapes):
        return None
    rank = len(shapes[0])
    axis = node.config.get("axis", -1)
    channel = 1 if data_format == "channels_first" else rank - 1
    if not isinstance(axis, int) or axis % rank != channel or \
            not all(isinstance(s[channel], int) for s in shapes):
        return None
    return [int(s[channel]) for s in shapes]


def _is_model(layer: Any) -> bool:
    if not isinstance(layer, dict):
        return False
    cfg = layer.get("config")
    return layer.get("class_name") in MODEL_CLASSES and isinstance(cfg, dict) and "layers" in cfg


def operation_module(layer: dict[str, Any]) -> str | None:
    """The module of a config entry that is a Keras operation rather than a layer, or None."""
    module = layer.get("module")
    return module if isinstance(module, str) and module.startswith(OPERATION_MODULE_PREFIX) \
        else None


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _walk(obj: Any) -> Iterator[Any]:
    """Every dict and list inside `obj`, depth first in document order, without recursion."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            yield item
            stack.extend(reversed(item))


def _tensor_entries(obj: Any) -> Iterator[tuple[dict[str, Any] | None, list | tuple | None]]:
    """Every tensor an inbound node consumes, in document order, without recursion: (the
    `config` of a Keras 3 `__keras_tensor__`, None) or (None, a Keras 2 [layer_name,
    node_index, tensor_index, kwargs] list)."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            cfg = item.get("config")
            if item.get("class_name") == "__keras_tensor__" and isinstance(cfg, dict):
                yield cfg, None
                continue
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            if len(item) >= 3 and isinstance(item[0], str) and _is_index(item[1]) \
                    and _is_index(item[2]):
                yield None, item
                continue
            stack.extend(reversed(item))


def _histories(obj: Any, layer: str | None = None) -> Iterator[tuple[str, int]]:
    """(layer name, tensor index) of every tensor an inbound node consumes, Keras 3 or 2 style.

    A history whose fields are not a name and indices raises ConfigError (Keras writes
    keras_history as [layer name, node index, tensor index]: keras/src/ops/node.py)."""
    for cfg, legacy in _tensor_entries(obj):
        if legacy is not None:
            yield legacy[0], legacy[2]
            continue
        hist = cfg.get("keras_history")
        if isinstance(hist, (list, tuple)) and hist:
            if not isinstance(hist[0], str) or not all(_is_index(h) for h in hist[1:3]):
                raise ConfigError(f"keras_history {_short(hist)} is not [layer name, "
                                  f"node index, tensor index]", layer)
            yield hist[0], hist[2] if len(hist) > 2 else 0


def _tensor_shapes(obj: Any) -> list[Any] | None:
    """The `shape` of every tensor an inbound node consumes, in the order _histories yields
    them, as Keras 3 writes it beside each keras_history; None when one has none (Keras 2)."""
    shapes = []
    for cfg, _ in _tensor_entries(obj):
        shape = cfg.get("shape") if cfg is not None else None
        if not isinstance(shape, (list, tuple)):
            return None
        shapes.append(list(shape))
    return shapes or None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _positive_int(value: Any) -> bool:
    # below 2^31: a dimension TensorFlow can hold (a larger one cannot be a saved layer's)
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2 ** 31


def _check_layer(layer: dict[str, Any], path: str) -> None:
    """The config fields kprune reads of a convolution or BatchNormalization layer: what Keras's
    own constructors insist on (keras/src/layers/convolutional/base_conv.py: filters and groups
    positive integers, filters divisible by groups), so a crafted value fails here, named."""
    cls, cfg = layer["class_name"], layer["config"]
    build = layer.get("build_config")
    if build is not None and not isinstance(build, dict):
        raise ConfigError(f"build_config is {_short(build)}, not a mapping", path)
    family = family_of(cls)
    if family is None and cls not in BATCHNORM_CLASSES:
        return
    shape = (build or {}).get("input_shape")
    if shape is not None and not (isinstance(shape, (list, tuple)) and all(
            d is None or _is_index(d) for d in shape)):
        raise ConfigError(f"build_config.input_shape is {_short(shape)}, not a list of sizes",
                          path)
    if family is None:
        return
    size = cfg.get("kernel_size")
    if not (_positive_int(size) or isinstance(size, (list, tuple)) and size
            and all(_positive_int(k) for k in size)):
        raise ConfigError(f"kernel_size is {_short(size)}, not positive integers below 2^31",
                          path)
    keys = ("depth_multiplier",) if family.name in ("depthwise", "separable") else ()
    if family.name != "depthwise":
        keys += ("filters",)
    if family.name == "conv":
        keys += ("groups",)
    for key in keys:
        value = cfg.get(key, None if key == "filters" else 1)
        if not _positive_int(value):
            shown = f"{value} (a JSON number too large for a float)" \
                if isinstance(value, float) and math.isinf(value) else _short(value)
            raise ConfigError(f"{key} is {shown}, not a positive integer below 2^31", path)
    if family.name == "conv" and cfg["filters"] % cfg.get("groups", 1):
        raise ConfigError(f"filters ({cfg['filters']}) is not divisible by groups "
                          f"({cfg.get('groups', 1)})", path)


class _Builder:
    def __init__(self) -> None:
        self.layers: dict[str, GraphLayer] = {}

    def edge(self, src: str, dst: str) -> None:
        consumers = self.layers[src].consumers
        if dst not in consumers:
            consumers.append(dst)

    def model(self, model: dict[str, Any], prefix: str) -> tuple[list[str], list[str]]:
        """Add a (nested) model; return (entry paths per input, exit paths per output)."""
        if prefix.count("/") > MAX_MODEL_NESTING:
            raise ConfigError(f"models are nested more than {MAX_MODEL_NESTING} deep")
        cfg = model["config"]
        if not isinstance(cfg.get("layers"), (list, tuple)):
            raise ConfigError(f"its layer list is {_short(cfg.get('layers'))}, not a list",
                              prefix.rstrip("/") or None)
        if model.get("class_name") == "Sequential":
            return self._sequential(cfg, prefix)
        return self._functional(cfg, prefix)

    def _name(self, layer: Any, prefix: str, index: int) -> str:
        where = f"layer #{index} of " + (f"'{prefix.rstrip('/')}'" if prefix else "the model")
        if not isinstance(layer, dict):
            raise ConfigError(f"{where} is {_short(layer)}, not a layer mapping")
        cfg = layer.get("config")
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: its config is {_short(cfg)}, not a mapping")
        name = layer.get("name") or cfg.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{where}: its name is {_short(name)}, not a layer name")
        if not isinstance(layer.get("class_name"), str):
            raise ConfigError(f"class_name is {_short(layer.get('class_name'))}",
                              prefix + name)
        if prefix + name in self.layers:
            raise ConfigError("two layers have this name (Keras requires unique names)",
                              prefix + name)
        return name

    def _add(self, layer: dict[str, Any], name: str, prefix: str,
             calls: int) -> tuple[list[str], list[str]]:
        path = prefix + name
        if _is_model(layer):
            self.layers[path] = GraphLayer(path, layer["class_name"], layer["config"], calls)
            return self.model(layer, path + "/")
        _check_layer(layer, path)
        self.layers[path] = GraphLayer(path, layer["class_name"], layer["config"], calls,
                                       build_config=layer.get("build_config") or {},
                                       operation=operation_module(layer))
        return [path], [path]

    def _sequential(self, cfg: dict[str, Any], prefix: str) -> tuple[list[str], list[str]]:
        entries: list[str] = []
        previous: list[str] = []
        for index, layer in enumerate(cfg["layers"]):
            ins, outs = self._add(layer, self._name(layer, prefix, index), prefix, 1)
            for src in previous:
                for dst in ins:
                    self.edge(src, dst)
                    self.layers[dst].sources.append(src)
            if not entries:
                entries = ins
            previous = outs
        return entries, previous

    def _functional(self, cfg: dict[str, Any], prefix: str) -> tuple[list[str], list[str]]:
        ports: dict[str, tuple[list[str], list[str]]] = {}
        names = []
        for index, layer in enumerate(cfg["layers"]):
            name = self._name(layer, prefix, index)
            nodes = layer.get("inbound_nodes") or []
            if not isinstance(nodes, (list, tuple)):
                raise ConfigError(f"inbound_nodes is {_short(nodes)}, not a list", prefix + name)
            ports[name] = self._add(layer, name, prefix, max(1, len(nodes)))
            names.append(name)
        for layer, name in zip(cfg["layers"], names):
            nodes = layer.get("inbound_nodes") or []
            if len(nodes) == 1 and prefix + name in self.layers:  # (not a nested model's)
                self.layers[prefix + name].inbound_shapes = _tensor_shapes(nodes[0])
            for src_name, tensor in _histories(nodes, prefix + name):
                if src_name not in ports:
                    raise ConfigError(f"it consumes a tensor of layer '{src_name}', which is not "
                                      f"in the model", prefix + name)
                exits = ports[src_name][1]
                # a nested model has exactly its exits; other layers one output unless their
                # class may have several (a tensor index is then not checkable from the config)
                counted = prefix + src_name not in exits or _single_output(
                    self.layers[prefix + src_name])
                if tensor >= len(exits) and counted:
                    raise ConfigError(f"it consumes output {tensor} of layer '{src_name}', which "
                                      f"has {len(exits)}", prefix + name)
                sources = [exits[tensor]] if tensor < len(exits) and len(exits) > 1 else exits
                for src in sources:
                    for dst in ports[name][0]:
                        self.edge(src, dst)
                        self.layers[dst].sources.append(src)

        def ends(key: str, which: int) -> list[str]:
            out = []
            for item in _names(cfg.get(key)):
                if item not in ports:
                    raise ConfigError(f"{key} names layer '{item}', which is not in the model",
                                      prefix.rstrip("/") or None)
                out += ports[item][which]
            return out

        return ends("input_layers", 0), ends("output_layers", 1)


# Built-in classes of CNNs that always return one tensor (an RNN with return_state or an attention
# layer returning its scores may return several, so a tensor index is checked only for these).
_SINGLE_OUTPUT = frozenset(BATCHNORM_CLASSES + ACTIVATION_LAYER_CLASSES + ZERO_PRESERVING_CLASSES + (
    "Dense", "Flatten", "Reshape", "Permute", "Softmax", "Rescaling", "Normalization",
    "LayerNormalization", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum",
    "Concatenate", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D"))


def _single_output(node: GraphLayer) -> bool:
    """Layers with exactly one output tensor (a tensor index above 0 cannot name one of them);
    an operation node's outputs are not known from its name (ops.Split returns several)."""
    if node.operation is not None:
        return False
    return family_of(node.class_name) is not None or node.class_name in _SINGLE_OUTPUT


def _names(spec: Any) -> list[str]:
    """Layer names in an input_layers/output_layers entry ([name, node, tensor] or a list of them),
    in document order."""
    return [item[0] for item in _walk(spec)
            if isinstance(item, (list, tuple)) and item and isinstance(item[0], str)]


def build_graph(model_config: dict[str, Any]) -> LayerGraph:
    """The graph of a serialized model ({'class_name': ..., 'config': {...}}); ConfigError if the
    config is not one Keras could have written."""
    builder = _Builder()
    if not _is_model(model_config):
        raise ConfigError("not a Functional or Sequential model config")
    _, exits = builder.model(model_config, "")
    for path in exits:
        builder.layers[path].consumers.append(OUTPUT)
    return LayerGraph(builder.layers)
