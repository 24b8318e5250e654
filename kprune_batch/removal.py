"""Structural removal: delete filters, rewire every consumer, fold what they left behind.

Scope: a top-level Functional or Sequential model; removed filters belong to Conv*/SeparableConv*
layers (not depthwise, not grouped, not shared); channels may pass through BatchNormalization
(sliced), elementwise activations, dropout, pooling, padding, GlobalPooling, Concatenate on the
channel axis (input i's channel c is channel offset_i + c of the result) and Add-type merges
(whose inputs form one coupled group that loses the same channels), and end in
Conv*/SeparableConv*/Conv*Transpose (input channels sliced), DepthwiseConv* (its channels
c*mult..c*mult+mult-1 go too and the walk goes on) or Dense (rows sliced; after Flatten in
Flatten's channels_last order). Anything else on the path (Reshape, Permute, nested or shared
layers, the model output) is refused with a ModelError naming the layer. A constant that a removed
channel still carries where it ends is folded into that layer's bias (see `_fold`).
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
    folded: list[dict[str, Any]] = field(default_factory=list)  # per consumer: constants folded
    approximate: bool = False  # a fold was not exact (allowed by approximate: true)


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
                   coupled: str = "error", approximate: frozenset[str] = frozenset(),
                   feed: Any = None) -> RemovalResult:
    """A new model without the selected filters, equal to `model` on every input.

    `model` must already be the zeroed model (kernel slices, and the biases and BatchNorm
    followers as the entries ask): whatever constant a removed channel still carries to a
    consumer is measured on `feed` in that model and folded into the consumer's bias.
    `approximate` names the layers whose entries accept an inexact fold.
    """
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
    shapes = {layer.name: tuple(layer.output.shape) for layer in model.layers
              if not isinstance(layer.output, (list, tuple))}
    ctx = _Context(graph, weights, {k: list(v) for k, v in weights.items()}, by_name, result,
                   set(), {}, shapes, {})
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
        flow = _Flow(keep, n, frozenset(coupled_group(graph, path)[0]),
                     _format(node.config))
        _propagate(ctx, path, flow)
    order = [layer["config"]["name"] for layer in config["layers"]]
    while ctx.pending:
        concat = min(ctx.pending, key=order.index)  # config order is topological
        _release_concat(ctx, concat, ctx.pending.pop(concat))
    if ctx.sinks:
        _fold(keras, model, ctx, feed, approximate)
    cls = keras.Sequential if serialized["class_name"] == "Sequential" else keras.Model
    new_model = cls.from_config(config)
    for layer in new_model.layers:
        if weights.get(layer.name):
            layer.set_weights(weights[layer.name])
    result.model = new_model
    result.params_after = int(new_model.count_params())
    result.macs_before = count_macs(model)
    result.macs_after = count_macs(new_model)
    return result


@dataclass(frozen=True)
class _Flow:
    """Removed channels on their way: which of `n` survive, whose they are, their axis."""

    keep: list[int]
    n: int
    origins: frozenset[str]  # the pruned layers (coupled groups whole) these channels come from
    data_format: str  # channels_last | channels_first, as the pruned layer wrote them


@dataclass
class _Sink:
    """A layer where removed channels end: it loses input channels (or Dense rows)."""

    kind: str  # conv | separable | transpose | dense
    removed: list[int]  # indices on the sink's input channel axis (Dense: rows)
    axis: int  # that axis in the sink's input tensor (-1 or 1)
    origins: frozenset[str]


@dataclass
class _Context:
    graph: Any
    weights: dict[str, list[np.ndarray]]
    original: dict[str, list[np.ndarray]]  # the input model's arrays (never edited in place)
    by_name: dict[str, dict]
    result: RemovalResult
    visited: set[str]  # layers already handled (a merge is reached once per member)
    # Concatenate layers collect what reaches each of their inputs before passing anything on
    pending: dict[str, dict[int, _Flow]]
    shapes: dict[str, tuple]  # output shape of each layer in the input model
    sinks: dict[str, _Sink]


def _format(config: dict) -> str:
    return "channels_first" if config.get("data_format") == "channels_first" else "channels_last"


def _release_concat(ctx: _Context, concat: str, arrivals: dict[int, _Flow]) -> None:
    """Map what each input of a Concatenate keeps to the concatenated axis (input i's channel c
    is channel offset_i + c) and pass that on."""
    from kprune_batch.graph import _histories

    sources = [name for name, _ in _histories(ctx.by_name[concat].get("inbound_nodes") or [])]
    fmt = next(iter(arrivals.values())).data_format
    axis = 1 if fmt == "channels_first" else -1
    keep, offset = [], 0
    for slot, name in enumerate(sources):
        width = int(ctx.shapes[name][axis])
        keep += [offset + c for c in (arrivals[slot].keep if slot in arrivals else range(width))]
        offset += width
    ctx.visited.add(concat)
    ctx.by_name[concat].pop("build_config", None)
    origins = frozenset().union(*(f.origins for f in arrivals.values()))
    _propagate(ctx, concat, _Flow(keep, offset, origins, fmt))


def _dropped(flow: _Flow) -> list[int]:
    kept = set(flow.keep)
    return [c for c in range(flow.n) if c not in kept]


def _propagate(ctx: _Context, src: str, flow: _Flow) -> None:
    graph, weights, by_name = ctx.graph, ctx.weights, ctx.by_name
    keep, n = flow.keep, flow.n
    axis = 1 if flow.data_format == "channels_first" else -1
    for consumer in graph.consumers(src):
        if consumer == OUTPUT:
            raise ModelError("the layer's channels are a model output; removing them would change "
                             "the model's output shape", layer=src)
        if consumer in ctx.visited:
            continue
        node = graph.layers[consumer]
        if node.class_name == "Concatenate":
            _arrive_at_concat(ctx, src, consumer, node, flow)
            continue
        ctx.visited.add(consumer)
        if node.calls != 1:
            raise ModelError("a layer on the path is shared (called more than once)",
                             layer=consumer)
        cls = node.class_name
        if "data_format" in node.config and cls != "Flatten" and \
                _format(node.config) != flow.data_format:
            raise ModelError(f"the layer reads its input as {_format(node.config)} but the "
                             f"removed channels are {flow.data_format}", layer=consumer)
        w = weights[consumer]
        by_name[consumer].pop("build_config", None)
        if cls in BATCHNORM_CLASSES:
            if not _bn_on_channels(node.config, ctx.shapes[consumer], flow.data_format):
                raise ModelError("the BatchNormalization does not normalise the channel axis",
                                 layer=consumer)
            weights[consumer] = [v[keep] for v in w]
            _propagate(ctx, consumer, flow)
        elif cls in PASS_THROUGH or cls in GLOBAL_POOLING or cls in MERGES:
            _propagate(ctx, consumer, flow)
        elif cls == "Flatten":
            _flatten_then_dense(ctx, consumer, flow)
        elif cls == "Dense":
            if flow.data_format == "channels_first" and len(ctx.shapes[src]) > 2:
                raise ModelError("a Dense layer reads the last axis, not the channels of this "
                                 "channels_first tensor", layer=consumer)
            w[0] = w[0][keep]
            ctx.sinks[consumer] = _Sink("dense", _dropped(flow), -1, flow.origins)
        elif family_of(cls) is not None:
            fam = family_of(cls)
            assert fam is not None
            if fam.name == "conv":
                if int(node.config.get("groups", 1)) != 1:
                    raise ModelError("a grouped convolution consumes the channels", layer=consumer)
                w[0] = w[0][..., keep, :]
                ctx.sinks[consumer] = _Sink("conv", _dropped(flow), axis, flow.origins)
            elif fam.name == "conv_transpose":
                w[0] = w[0][..., keep]
                ctx.sinks[consumer] = _Sink("transpose", _dropped(flow), axis, flow.origins)
            elif fam.name == "separable":
                mult = int(node.config.get("depth_multiplier", 1))
                w[0] = w[0][..., keep, :]
                rows = [c * mult + m for c in keep for m in range(mult)]
                w[1] = w[1][..., rows, :]
                ctx.sinks[consumer] = _Sink("separable", _dropped(flow), axis, flow.origins)
            else:  # depthwise: its own channels c*mult..c*mult+mult-1 go too; whatever constant
                # they carry (its bias, say) is measured and folded where they end
                mult = int(node.config.get("depth_multiplier", 1))
                out_keep = [c * mult + m for c in keep for m in range(mult)]
                w[0] = w[0][..., keep, :]
                if node.config.get("use_bias", True):
                    w[1] = w[1][out_keep]
                _propagate(ctx, consumer, _Flow(out_keep, n * mult, flow.origins,
                                                flow.data_format))
        else:
            raise ModelError(f"a {cls} layer consumes the channels; removal through it is not "
                             f"supported yet", layer=consumer)


def _bn_on_channels(config: dict, shape: tuple, data_format: str) -> bool:
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if not isinstance(axis, int):
        return False
    axis = axis % len(shape)
    return axis == (1 if data_format == "channels_first" else len(shape) - 1)


def _arrive_at_concat(ctx: _Context, src: str, concat: str, node: Any, flow: _Flow) -> None:
    from kprune_batch.graph import _histories

    axis = node.config.get("axis", -1)
    rank = len(ctx.shapes[concat])
    channel_axis = 1 if flow.data_format == "channels_first" else rank - 1
    sources = [name for name, _ in _histories(ctx.by_name[concat].get("inbound_nodes") or [])]
    if not isinstance(axis, int) or axis % rank != channel_axis or sources.count(src) != 1 \
            or node.calls != 1:
        raise ModelError("a Concatenate that is shared, joins the same tensor twice or does not "
                         "join on the channel axis consumes the channels", layer=concat)
    ctx.pending.setdefault(concat, {})[sources.index(src)] = flow


def _flatten_then_dense(ctx: _Context, flatten: str, flow: _Flow) -> None:
    """Flatten writes (positions, channels) in channels_last order: element (h, w, c) is row
    (h*W + w)*C + c. A channels_first tensor is transposed to that order first only when the
    Flatten itself says channels_first (keras/src/layers/reshaping/flatten.py); otherwise its
    element (c, h, w) is row c*H*W + h*W + w."""
    graph = ctx.graph
    consumers = graph.consumers(flatten)
    dense = consumers[0] if len(consumers) == 1 else None
    if dense is None or dense == OUTPUT or graph.layers[dense].class_name != "Dense":
        raise ModelError("Flatten must feed exactly one Dense layer", layer=flatten)
    kernel = ctx.weights[dense][0]
    n = flow.n
    positions = kernel.shape[0] // n
    channels_major = flow.data_format == "channels_first" and \
        _format(graph.layers[flatten].config) == "channels_last"
    if channels_major:
        rows = [c * positions + p for c in flow.keep for p in range(positions)]
    else:
        rows = [p * n + c for p in range(positions) for c in flow.keep]
    kept = set(rows)
    ctx.weights[dense][0] = kernel[sorted(rows)]
    ctx.by_name[dense].pop("build_config", None)
    ctx.visited.add(dense)
    ctx.sinks[dense] = _Sink("dense", [r for r in range(kernel.shape[0]) if r not in kept], -1,
                             flow.origins)


CONSTANT_RTOL = 1e-6  # a removed channel is constant if it varies less than this (relative)


def _fold(keras: Any, model: Any, ctx: _Context, feed: Any,
          approximate: frozenset[str]) -> None:
    """Fold what removed channels still carry into each sink's bias.

    A removed channel is the zeroed layer's bias (a constant) passed through BN, activations,
    pooling and merges with other removed channels: a function of nothing but the weights, so
    one probe batch measures it for every input. It is the same at every position unless
    zero padding or a padded depthwise layer on the way treats borders differently. Folding
    sum(kernel taps x constant) into the bias is exact for Dense and for convolutions without
    padding ('valid', or a 1x1 kernel); otherwise only with `approximate: true`.
    """
    if feed is None:
        from kprune_batch.probe import probe_inputs

        x = probe_inputs(model)
        feed = x if len(x) > 1 else x[0]
    names = list(ctx.sinks)
    inputs = model.inputs if len(model.inputs) > 1 else model.inputs[0]  # as `feed` is given
    extractor = keras.Model(inputs, [model.get_layer(s).input for s in names])
    values = keras.tree.flatten(extractor(feed, training=False))
    for name, value in zip(names, values, strict=True):
        sink = ctx.sinks[name]
        x = np.moveaxis(np.asarray(value, dtype="float64"), sink.axis, -1)
        flat = x.reshape(-1, x.shape[-1])[:, sink.removed]
        center = x[(0,) + tuple(d // 2 for d in x.shape[1:-1])][sink.removed]
        varies = np.max(np.abs(flat - center), axis=0) > CONSTANT_RTOL * np.maximum(
            1.0, np.abs(center))
        if not np.any(varies) and not np.any(center):
            continue  # silent: nothing to fold
        node = ctx.graph.layers[name]
        who = ", ".join(f"'{o}'" for o in sorted(sink.origins))
        hint = (f"set approximate: true on the entries of {who} to accept the deviation "
                f"(measured and logged), or zero these filters instead (action: zero)")
        if sink.kind == "transpose":
            raise ModelError(f"removed filters of {who} reach it as constants, and folding a "
                             f"constant into a {node.class_name} is not supported",
                             layer=name, hint="zero these filters instead (action: zero)")
        padded = sink.kind != "dense" and node.config.get("padding", "valid") != "valid" and \
            any(int(k) != 1 for k in _kernel_size(node.config))
        allowed = sink.origins <= approximate
        if np.any(varies) and not allowed:
            raise ModelError(f"removed filters of {who} reach it with values that differ across "
                             f"positions (zero padding or a padded depthwise layer on the way), "
                             f"so no constant can be folded into its bias exactly",
                             layer=name, hint=hint)
        if padded and not allowed:
            k = float(center[np.argmax(np.abs(center))])
            raise ModelError(f"removed filters of {who} reach it as the constant {k:.6g}, and "
                             f"its '{node.config.get('padding')}' padding means border positions "
                             f"see fewer of them, so folding into its bias is not exact",
                             layer=name, hint=hint)
        original = ctx.original[name]
        if sink.kind == "dense":
            delta = center @ original[0][sink.removed].astype("float64")
        elif sink.kind == "conv":
            taps = original[0][..., sink.removed, :].astype("float64")  # (*kernel, in, out)
            delta = np.tensordot(taps, center, axes=([taps.ndim - 2], [0])).reshape(
                -1, taps.shape[-1]).sum(axis=0)
        else:  # separable: depthwise taps (no bias of their own), then pointwise rows
            mult = int(node.config.get("depth_multiplier", 1))
            depthwise, pointwise = original[0], original[1]
            taps = depthwise[..., sink.removed, :].astype("float64")
            through = (taps.reshape(-1, len(sink.removed), mult).sum(axis=0)
                       * center[:, None]).reshape(-1)
            rows = [c * mult + m for c in sink.removed for m in range(mult)]
            delta = through @ pointwise.reshape(-1, pointwise.shape[-1])[rows].astype("float64")
        if name in ctx.result.mappings:  # the sink loses filters of its own as well
            delta = delta[[c for c, to in enumerate(ctx.result.mappings[name]["old_to_new"])
                           if to >= 0]]
        w = ctx.weights[name]
        dtype = w[0].dtype
        bias_added = not node.config.get("use_bias", True)
        if bias_added:
            ctx.by_name[name]["config"]["use_bias"] = True
            w.append(delta.astype(dtype))
        else:
            w[-1] = (w[-1].astype("float64") + delta).astype(dtype)
        exact = not (np.any(varies) or padded)
        ctx.result.approximate = ctx.result.approximate or not exact
        ctx.result.folded.append({
            "layer": name, "exact": exact, "bias_added": bias_added,
            "constants": [{"channel": int(c), "constant": float(k)}
                          for c, k in zip(sink.removed, center, strict=True) if k != 0.0],
        })


def _kernel_size(config: dict) -> list[int]:
    size = config.get("kernel_size", 1)
    return list(size) if isinstance(size, (list, tuple)) else [size]
