"""The layer graph of a saved model config: full layer paths, classes, configs and consumers.

Built from the config alone (Keras's `model.get_config()`, `config.json` in a .keras file, the
`model_config` attribute of a .h5 file), so it needs neither TensorFlow nor Keras.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

MODEL_CLASSES = ("Functional", "Sequential", "Model")
OUTPUT = "<output>"  # consumer marker: the tensor leaves the top-level model


@dataclass
class GraphLayer:
    path: str  # "outer/inner" for a layer inside a nested model
    class_name: str
    config: dict[str, Any]
    calls: int = 1  # how many times the layer is called (a shared layer: > 1)
    consumers: list[str] = field(default_factory=list)
    build_config: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # producers, in the order of the inputs


@dataclass
class LayerGraph:
    layers: dict[str, GraphLayer]  # in config order, nested layers right after their model

    def consumers(self, path: str) -> list[str]:
        return self.layers[path].consumers

    def conv_paths(self) -> list[str]:
        return list(self.layers)


def _is_model(layer: dict[str, Any]) -> bool:
    cfg = layer.get("config")
    return layer.get("class_name") in MODEL_CLASSES and isinstance(cfg, dict) and "layers" in cfg


def _histories(obj: Any) -> Iterator[tuple[str, int]]:
    """(layer name, tensor index) of every tensor an inbound node consumes, Keras 3 or 2 style."""
    if isinstance(obj, dict):
        cfg = obj.get("config")
        if obj.get("class_name") == "__keras_tensor__" and isinstance(cfg, dict):
            hist = cfg.get("keras_history")
            if isinstance(hist, (list, tuple)) and hist:
                yield str(hist[0]), int(hist[2]) if len(hist) > 2 else 0
            return
        for value in obj.values():
            yield from _histories(value)
    elif isinstance(obj, (list, tuple)):
        # Keras 2: [layer_name, node_index, tensor_index, kwargs]
        if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int) \
                and isinstance(obj[2], int):
            yield obj[0], obj[2]
            return
        for value in obj:
            yield from _histories(value)


class _Builder:
    def __init__(self) -> None:
        self.layers: dict[str, GraphLayer] = {}

    def edge(self, src: str, dst: str) -> None:
        consumers = self.layers[src].consumers
        if dst not in consumers:
            consumers.append(dst)

    def model(self, model: dict[str, Any], prefix: str) -> tuple[list[str], list[str]]:
        """Add a (nested) model; return (entry paths per input, exit paths per output)."""
        cfg = model["config"]
        if model.get("class_name") == "Sequential":
            return self._sequential(cfg, prefix)
        return self._functional(cfg, prefix)

    def _add(self, layer: dict[str, Any], prefix: str, calls: int) -> tuple[list[str], list[str]]:
        name = layer.get("name") or layer["config"]["name"]
        path = prefix + name
        if _is_model(layer):
            self.layers[path] = GraphLayer(path, layer["class_name"], layer["config"], calls)
            return self.model(layer, path + "/")
        build = layer.get("build_config")
        self.layers[path] = GraphLayer(path, layer["class_name"], layer.get("config", {}), calls,
                                       build_config=build if isinstance(build, dict) else {})
        return [path], [path]

    def _sequential(self, cfg: dict[str, Any], prefix: str) -> tuple[list[str], list[str]]:
        entries: list[str] = []
        previous: list[str] = []
        for layer in cfg["layers"]:
            ins, outs = self._add(layer, prefix, 1)
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
        for layer in cfg["layers"]:
            name = layer.get("name") or layer["config"]["name"]
            ports[name] = self._add(layer, prefix, max(1, len(layer.get("inbound_nodes") or [])))
        for layer in cfg["layers"]:
            name = layer.get("name") or layer["config"]["name"]
            for src_name, tensor in _histories(layer.get("inbound_nodes") or []):
                exits = ports[src_name][1]
                sources = [exits[tensor]] if tensor < len(exits) and len(exits) > 1 else exits
                for src in sources:
                    for dst in ports[name][0]:
                        self.edge(src, dst)
                        self.layers[dst].sources.append(src)
        entries = [p for item in _names(cfg.get("input_layers")) for p in ports[item][0]]
        exits = [p for item in _names(cfg.get("output_layers")) for p in ports[item][1]]
        return entries, exits


def _names(spec: Any) -> list[str]:
    """Layer names in an input_layers/output_layers entry ([name, node, tensor] or a list of them)."""
    if isinstance(spec, (list, tuple)) and len(spec) >= 1 and isinstance(spec[0], str):
        return [spec[0]]
    if isinstance(spec, (list, tuple)):
        return [name for item in spec for name in _names(item)]
    return []


def build_graph(model_config: dict[str, Any]) -> LayerGraph:
    """The graph of a serialized model ({'class_name': ..., 'config': {...}})."""
    builder = _Builder()
    if not _is_model(model_config):
        raise ValueError("not a Functional or Sequential model config")
    _, exits = builder.model(model_config, "")
    for path in exits:
        builder.layers[path].consumers.append(OUTPUT)
    return LayerGraph(builder.layers)
