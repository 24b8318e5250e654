"""Structural removal: delete filters, rewire every consumer, keep coupled groups consistent.

Scope of this version: a top-level Functional or Sequential model; removed filters belong to
Conv*/SeparableConv* layers (not depthwise, not grouped, not shared); channels may pass through
BatchNormalization (sliced), elementwise activations, dropout, pooling, padding, GlobalPooling,
Concatenate on the channel axis (input i's channel c is channel offset_i + c of the result) and
Add-type merges (whose inputs form one coupled group that loses the same channels), and end
in Conv*/SeparableConv*/Conv*Transpose/DepthwiseConv* (input channels sliced; a depthwise
consumer loses channels c*mult..c*mult+mult-1 and propagates) or Dense (rows sliced; after
Flatten row h*W*C + w*C + c, Keras being channels_last). Anything else on the path
(Reshape, Permute, nested or shared layers, the model output) is refused with a ModelError
naming the layer. Removed channels must be silent: folding a constant into the consumer's bias is
not implemented yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kprune_batch.errors import ModelError
from kprune_batch.families import (ACTIVATION_LAYER_CLASSES, BATCHNORM_CLASSES,
                                   ZERO_PRESERVING_CLASSES, family_of)
from kprune_batch.graph import MODEL_CLASSES, OUTPUT, build_graph

MERGES = ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
GLOBAL_POOLING = ("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
                  "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D")
PASS_THROUGH = tuple(c for c in ZERO_PRESERVING_CLASSES if c != "InputLayer") + \
    ACTIVATION_LAYER_CLASSES


@dataclass
class RemovalResult:
    model: Any
    mappings: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # layer -> old->new
    params_before: int = 0
    params_after: int = 0
    selection: dict[str, list[int]] = field(default_factory=dict)  # after coupling
    macs_before: int = 0
    macs_after: int = 0


UNKNOWN_DIM = 32  # the probe's size for dimensions a model leaves open


def count_macs(model: Any) -> int:
    """Multiply-accumulates of one sample through the model's convolution and Dense layers.

    Each kernel-shaped weight (ndim >= 2) costs its size once per output position (per input
    position for transposed convolutions); a Dense on a rank-3+ input once per leading position.
    """
    total = 0
    for layer in model.layers:
        kernels = [w for w in layer.weights if len(w.shape) >= 2]
        if not kernels:
            continue
        family = family_of(type(layer).__name__)
        shape = layer.input.shape if family is not None and family.name == "conv_transpose" \
            else layer.output.shape
        if family is None:
            positions_dims = list(shape[1:-1])
        elif getattr(layer, "data_format", None) == "channels_first":
            positions_dims = list(shape[2:])
        else:
            positions_dims = list(shape[1:-1])
        positions = int(np.prod([UNKNOWN_DIM if d is None else int(d) for d in positions_dims]))
        total += positions * sum(int(np.prod(w.shape)) for w in kernels)
    return total


def _producers(graph: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {p: [] for p in graph.layers}
    for path, node in graph.layers.items():
        for consumer in node.consumers:
            if consumer != OUTPUT:
                out[consumer].append(path)
    return out


def _prunable(node: Any) -> bool:
    family = family_of(node.class_name)
    return (family is not None and family.name in ("conv", "separable") and node.calls == 1
            and int(node.config.get("groups", 1)) == 1)


def coupled_group(graph: Any, start: str) -> tuple[list[str], list[str]]:
    """(member convs, merge layers) whose channels must go together with `start`'s.

    Layers whose outputs meet in an Add-type merge (directly or through BN, activations and
    other channel-preserving layers) share channel indices, as in DepGraph's grouping.
    """
    producers = _producers(graph)
    members, merges, todo = [start], [], [start]
    seen = {start}
    while todo:
        path = todo.pop()
        for nxt in graph.consumers(path):
            if nxt == OUTPUT or nxt in seen:
                continue
            cls = graph.layers[nxt].class_name
            if cls in BATCHNORM_CLASSES or cls in PASS_THROUGH or cls in GLOBAL_POOLING:
                seen.add(nxt)
                todo.append(nxt)
            elif cls in MERGES:
                seen.add(nxt)
                merges.append(nxt)
                todo.append(nxt)
                back = list(producers[nxt])
                while back:
                    src = back.pop()
                    if src in seen:
                        continue
                    seen.add(src)
                    node = graph.layers[src]
                    if node.class_name in BATCHNORM_CLASSES or node.class_name in PASS_THROUGH:
                        back.extend(producers[src])
                        todo.append(src)
                    elif node.class_name in MERGES:
                        merges.append(src)
                        back.extend(producers[src])
                        todo.append(src)
                    elif _prunable(node):
                        members.append(src)
                        todo.append(src)
                    else:
                        raise ModelError(
                            f"its channels meet those of '{start}' in {graph.layers[nxt].class_name}"
                            f" '{nxt}', and filters of a {node.class_name} layer cannot be "
                            f"removed", layer=src)
    return members, merges


def _couple(graph: Any, selection: dict[str, list[int]], coupled: str) -> dict[str, list[int]]:
    """The selection with every coupled group losing the same filters (union/intersection)."""
    out: dict[str, list[int]] = {}
    done: set[str] = set()
    for path in selection:
        if path in done:
            continue
        members, merges = coupled_group(graph, path)
        done.update(members)
        listed = {m: sorted(set(selection[m])) for m in members if m in selection}
        if len(members) == 1:
            out[path] = listed[path]
            continue
        values = list(listed.values())
        if coupled == "error" and any(v != values[0] for v in values):
            raise ModelError(
                f"the layers {', '.join(members)} meet in {', '.join(merges)} and must lose the "
                f"same filters, but their rules select different ones",
                layer=path, hint="set coupled: union or coupled: intersection on the entries")
        chosen = set(values[0])
        for v in values[1:]:
            chosen = chosen | set(v) if coupled == "union" else chosen & set(v)
        if coupled == "intersection" and not chosen:
            raise ModelError(f"the coupled layers {', '.join(members)} have no filter in common "
                             f"to remove (coupled: intersection)", layer=path)
        for m in members:
            out[m] = sorted(chosen)
    return out


def remove_filters(keras: Any, model: Any, selection: dict[str, list[int]],
                   coupled: str = "error") -> RemovalResult:
    """A new model without the selected filters, equal to the zeroed model (BN neutralised)."""
    serialized = keras.saving.serialize_keras_object(model)
    graph = build_graph(serialized)
    if any(n.class_name in MODEL_CLASSES for n in graph.layers.values()):
        raise ModelError("removal of filters in models with nested models is not supported yet")
    selection = _couple(graph, selection, coupled)
    config = serialized["config"]
    by_name = {layer["config"]["name"]: layer for layer in config["layers"]}
    weights = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers}
    result = RemovalResult(model=None, params_before=int(model.count_params()))
    result.selection = selection
    visited: set[str] = set()  # layers already sliced (a merge is reached once per member)
    # Concatenate layers collect what reaches each of their inputs before passing anything on
    pending: dict[str, dict[int, list[int]]] = {}
    channels = {layer.name: int(layer.output.shape[-1]) for layer in model.layers
                if not isinstance(layer.output, (list, tuple))}
    ctx = _Context(graph, weights, by_name, result, visited, pending, channels)
    for path, removed in selection.items():
        node = graph.layers[path]
        family = family_of(node.class_name)
        if family is None or family.name not in ("conv", "separable") or \
                int(node.config.get("groups", 1)) != 1:
            raise ModelError(f"removal from a {node.class_name} layer is not supported yet",
                             layer=path)
        if node.calls != 1:
            raise ModelError("the layer is shared (called more than once)", layer=path)
        n = int(node.config["filters"])
        keep = [f for f in range(n) if f not in set(removed)]
        if not keep:
            raise ModelError("removal would leave the layer without filters", layer=path)
        w = weights[path]
        kernel_index = 1 if family.name == "separable" else 0
        w[kernel_index] = w[kernel_index][..., keep]
        if node.config.get("use_bias", True):
            w[-1] = w[-1][keep]
        by_name[path]["config"]["filters"] = len(keep)
        by_name[path].pop("build_config", None)
        result.mappings[path] = {"old_to_new": [keep.index(f) if f in keep else -1
                                                for f in range(n)]}
        _propagate(ctx, path, keep, n)
    order = [layer["config"]["name"] for layer in config["layers"]]
    while pending:
        concat = min(pending, key=order.index)  # config order is topological
        _release_concat(ctx, concat, pending.pop(concat))
    cls = keras.Sequential if serialized["class_name"] == "Sequential" else keras.Model
    new_model = cls.from_config(config)
    for layer in new_model.layers:
        if layer.name in weights and weights[layer.name]:
            layer.set_weights(weights[layer.name])
    result.model = new_model
    result.params_after = int(new_model.count_params())
    result.macs_before = count_macs(model)
    result.macs_after = count_macs(new_model)
    return result


@dataclass
class _Context:
    graph: Any
    weights: dict[str, list[np.ndarray]]
    by_name: dict[str, dict]
    result: RemovalResult
    visited: set[str]
    pending: dict[str, dict[int, list[int]]]
    channels: dict[str, int]  # output channels of each layer in the original model


def _release_concat(ctx: _Context, concat: str, arrivals: dict[int, list[int]]) -> None:
    """Map what each input of a Concatenate keeps to the concatenated axis (input i's channel c
    is channel offset_i + c) and pass that on."""
    from kprune_batch.graph import _histories

    sources = [name for name, _ in _histories(ctx.by_name[concat].get("inbound_nodes") or [])]
    keep, offset = [], 0
    for slot, name in enumerate(sources):
        width = ctx.channels[name]
        keep += [offset + c for c in arrivals.get(slot, range(width))]
        offset += width
    ctx.visited.add(concat)
    ctx.by_name[concat].pop("build_config", None)
    _propagate(ctx, concat, keep, offset)


def _propagate(ctx: _Context, src: str, keep: list[int], n: int) -> None:
    graph, weights, by_name = ctx.graph, ctx.weights, ctx.by_name
    for consumer in graph.consumers(src):
        if consumer == OUTPUT:
            raise ModelError("the layer's channels are a model output; removing them would change "
                             "the model's output shape", layer=src)
        if consumer in ctx.visited:
            continue
        node = graph.layers[consumer]
        if node.class_name == "Concatenate":
            _arrive_at_concat(ctx, src, consumer, node, keep)
            continue
        ctx.visited.add(consumer)
        if node.calls != 1:
            raise ModelError("a layer on the path is shared (called more than once)",
                             layer=consumer)
        cls = node.class_name
        w = weights[consumer]
        by_name[consumer].pop("build_config", None)
        if cls in BATCHNORM_CLASSES:
            weights[consumer] = [v[keep] for v in w]
            _propagate(ctx, consumer, keep, n)
        elif cls in PASS_THROUGH or cls in GLOBAL_POOLING or cls in MERGES:
            _propagate(ctx, consumer, keep, n)
        elif cls == "Flatten":
            _flatten_then_dense(graph, consumer, keep, n, weights, by_name)
        elif cls == "Dense":
            w[0] = w[0][keep]
        elif family_of(cls) is not None:
            fam = family_of(cls)
            assert fam is not None
            if fam.name == "conv":
                if int(node.config.get("groups", 1)) != 1:
                    raise ModelError("a grouped convolution consumes the channels", layer=consumer)
                w[0] = w[0][..., keep, :]
            elif fam.name == "conv_transpose":
                w[0] = w[0][..., keep]
            elif fam.name == "separable":
                mult = int(node.config.get("depth_multiplier", 1))
                w[0] = w[0][..., keep, :]
                rows = [c * mult + m for c in keep for m in range(mult)]
                w[1] = w[1][..., rows, :]
            else:  # depthwise: its own channels c*mult..c*mult+mult-1 go too
                mult = int(node.config.get("depth_multiplier", 1))
                out_keep = [c * mult + m for c in keep for m in range(mult)]
                dropped = [k for k in range(n * mult) if k not in set(out_keep)]
                if node.config.get("use_bias", True) and np.any(w[1][dropped] != 0):
                    # in the zeroed reference these channels carry the depthwise bias on to the
                    # next layer: that constant must be folded there (not implemented yet)
                    raise ModelError("the depthwise layer's bias of the removed channels is not 0; "
                                     "folding that constant is not supported yet", layer=consumer)
                w[0] = w[0][..., keep, :]
                if node.config.get("use_bias", True):
                    w[1] = w[1][out_keep]
                _propagate(ctx, consumer, out_keep, n * mult)
        else:
            raise ModelError(f"a {cls} layer consumes the channels; removal through it is not "
                             f"supported yet", layer=consumer)


def _arrive_at_concat(ctx: _Context, src: str, concat: str, node: Any, keep: list[int]) -> None:
    from kprune_batch.graph import _histories

    axis = node.config.get("axis", -1)
    sources = [name for name, _ in _histories(ctx.by_name[concat].get("inbound_nodes") or [])]
    if axis not in (-1, len(ctx.by_name[concat].get("build_config", {}).get(
            "input_shape", [[0]])[0]) - 1) or sources.count(src) != 1 or node.calls != 1:
        raise ModelError("a Concatenate that is shared, joins the same tensor twice or does not "
                         "join on the channel axis consumes the channels", layer=concat)
    ctx.pending.setdefault(concat, {})[sources.index(src)] = keep


def _flatten_then_dense(graph: Any, flatten: str, keep: list[int], n: int,
                        weights: dict[str, list[np.ndarray]], by_name: dict[str, dict]) -> None:
    """Keras flattens channels_last: element (h, w, c) is row (h*W + w)*C + c."""
    (dense,) = graph.consumers(flatten) if len(graph.consumers(flatten)) == 1 else (None,)
    if dense is None or dense == OUTPUT or graph.layers[dense].class_name != "Dense":
        raise ModelError("Flatten must feed exactly one Dense layer", layer=flatten)
    kernel = weights[dense][0]
    positions = kernel.shape[0] // n
    rows = [p * n + c for p in range(positions) for c in keep]
    weights[dense][0] = kernel[rows]
    by_name[dense].pop("build_config", None)
