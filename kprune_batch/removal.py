"""Structural removal: delete filters, rewire every consumer, fold what they left behind.

Scope: a top-level Functional or Sequential model; removed filters belong to Conv*/SeparableConv*/
Conv*Transpose layers (not depthwise, not grouped, not shared); channels may pass through
BatchNormalization and LayerScale (sliced), LayerNormalization (sliced; approximate only),
elementwise activations, dropout and noise layers, pooling, padding, GlobalPooling, a Reshape
keeping the channel axis, a Permute putting it first or last, Concatenate on the channel axis
(input i's channel c is channel offset_i + c of the result) and Add-type merges (whose inputs
form one coupled group that loses the same channels; a Concatenate whose output meets one
puts its inputs' producers in that group at their offsets), and end in Conv*/SeparableConv*/
Conv*Transpose (input channels sliced), DepthwiseConv* (its channels c*mult..c*mult+mult-1 go
too and the walk goes on), Dense or LSTM/GRU/SimpleRNN (input kernel rows sliced; after Flatten
in Flatten's channels_last order). A conv losing every filter into a Concatenate leaves the
model. Anything else on the path (other Reshapes and Permutes, nested or shared layers, the
model output) is refused with a ModelError naming the layer. A constant that a removed channel
still carries where it ends is folded into that layer's bias (see `_fold`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from kprune_batch.quiet import to_numpy

from kprune_batch.errors import ModelError
from kprune_batch.families import (ACTIVATION_LAYER_CLASSES, BATCHNORM_CLASSES,
                                   INPUT_TOUCHES, REMOVABLE_FAMILIES,
                                   ZERO_PRESERVING_CLASSES, channel_params_of, family_of,
                                   member_family_of,
                                   rows_consumer_of)
from kprune_batch.graph import MODEL_CLASSES, OUTPUT, build_graph, channel_concat
from kprune_batch.ranges import compact_ranges

MERGES = ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
GLOBAL_POOLING = ("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
                  "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D")
PASS_THROUGH = tuple(c for c in ZERO_PRESERVING_CLASSES if c != "InputLayer") + \
    ACTIVATION_LAYER_CLASSES  # the noise layers among them: identities at inference


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
    touches: list[dict[str, Any]] = field(default_factory=list)  # Touch.to_json(), walk order
    approximate: bool = False  # a fold was not exact (allowed by approximate: true)
    statistics_changed: list[str] = field(default_factory=list)  # LayerNorms (approximate)
    dropped_layers: list[str] = field(default_factory=list)  # emptied concat branches
    # with `reference=True`: the zeroed model's outputs on the feed (flattened) and what ran
    # (twin.run_points), taken in the same run that measured the sinks' inputs
    reference: list[np.ndarray] | None = None
    reference_ran_on: str | None = None


UNKNOWN_DIM = 32  # the probe's size for dimensions a model leaves open


def count_macs(model: Any) -> int:
    """Multiply-accumulates of one sample through the model's convolution and Dense layers.

    Each kernel-shaped weight (ndim >= 2) costs its size once per output position (per input
    position for transposed convolutions); a Dense on a rank-3+ input once per leading position.
    """
    total = 0
    for layer in _layers_by_path(model).values():  # a nested model's layers, one by one
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


def depthwise_member(node: Any) -> bool:
    """A depthwise layer called once: its filters c*mult..c*mult+mult-1 are made from its input
    channel c alone (keras/src/layers/convolutional/base_depthwise_conv.py), so it joins its
    input's coupled group, as DepGraph groups it, at channel c. So does a grouped Conv with
    groups == filters == input channels (ConvNeXt's 7x7 `depthwise_conv`): its kernel is
    (*k, 1, filters) and filter c reads input channel c alone (base_conv.py, groups)."""
    family = family_of(node.class_name)
    if family is None or node.calls != 1:
        return False
    return family.name == "depthwise" or grouped_depthwise(node)


def nested_input(node: Any) -> bool:
    """The InputLayer a nested Sequential starts with (ConvNeXt's stem): the tensor itself."""
    return node.class_name == "InputLayer" and "/" in node.path


def grouped_depthwise(node: Any) -> bool:
    """A Conv* with groups == filters == its input channels: a depthwise conv of multiplier 1."""
    family = family_of(node.class_name)
    groups = int(node.config.get("groups", 1))
    if family is None or family.name != "conv" or groups == 1 or \
            int(node.config.get("filters", 0)) != groups:
        return False
    shape = node.input_shape
    if not isinstance(shape, (list, tuple)) or not shape:
        return False
    channels = shape[1] if _format(node.config) == "channels_first" else shape[-1]
    return channels is not None and int(channels) == groups


def units_member(node: Any) -> bool:
    """A Dense layer called once: its units are its output's last axis, so reached backward from
    a merge (ConvNeXt's `pointwise_conv_2`, a Dense on a channels_last feature map) its units
    are the group's channels, as a conv's filters are."""
    return node.class_name == "Dense" and node.operation is None and node.calls == 1


def _channel_params_pass(node: Any) -> bool:
    """LayerScale / a LayerNormalization over the channel axis: per-channel parameters that a
    removal slices, so a coupled group's channels pass through them."""
    params = channel_params_of(node.class_name)
    if params is None or node.operation is not None:
        return False
    shape = node.input_shape
    rank = len(shape) if isinstance(shape, (list, tuple)) else None
    return params.on_channel_axis(node.config, rank)


def _renormalizes(node: Any) -> bool:
    """A pass-through layer whose statistics over the channels change when channels go."""
    params = channel_params_of(node.class_name)
    return params is not None and not params.exact


@dataclass(frozen=True)
class Group:
    """A coupled group: member m's filter f is the group's channel (ranking unit)
    `unit_of[m][f]` of `size`; removing a unit removes every member filter mapped to it. A
    depthwise layer's filters c*mult..c*mult+mult-1 are one unit (its input's channel c); a
    member feeding input i of a Concatenate inside the group has its filter c at the group's
    channel offset_i + c, so it covers only part of the units (`support`). `merges`: the
    Add-type merges that couple them."""

    members: tuple[str, ...]
    merges: tuple[str, ...]
    unit_of: Mapping[str, np.ndarray] = field(compare=False)
    size: int
    # LayerNormalizations the group's channels pass through (config order): removing a channel
    # changes their statistics, so the group can be removed only approximately
    normalized: tuple[str, ...] = ()

    def support(self, member: str) -> set[int]:
        """The units in which `member` has filters."""
        return set(int(u) for u in np.unique(self.unit_of[member]))

    def filters_of(self, member: str, units: Any) -> list[int]:
        """`member`'s filters that the units stand for, ascending."""
        units = np.fromiter((int(u) for u in units), dtype=np.int64)
        return [int(f) for f in np.flatnonzero(np.isin(self.unit_of[member], units))]

    @property
    def divisor(self) -> dict[str, int]:
        """{member: d} where every member's filter f is unit f // d (groups without a
        Concatenate inside); a ValueError otherwise."""
        out = {}
        for m, units in self.unit_of.items():
            d = len(units) // self.size if self.size else 1
            if d * self.size != len(units) or \
                    not np.array_equal(units, np.arange(len(units)) // d):
                raise ValueError(f"'{m}' maps its filters to the group's channels at offsets")
            out[m] = d
        return out


def combine_units(group: Group, chosen: Mapping[str, set[int]], mode: str) -> set[int] | None:
    """The units a coupled group loses from what its listed members choose (`chosen`, units):
    `union`, what any chooses; `intersection`, the units every listed member that has filters
    in them chooses (a member feeding one input of a Concatenate inside the group has no say
    about the others' units). None for `error` when two listed members disagree on a unit both
    have filters in."""
    supports = {m: group.support(m) for m in chosen}
    units = set().union(*supports.values()) if supports else set()
    out = set()
    for u in units:
        votes = [u in chosen[m] for m in chosen if u in supports[m]]
        if mode == "error" and any(v != votes[0] for v in votes):
            return None
        if all(votes) if mode == "intersection" else any(votes):
            out.add(u)
    return out


class _Channels:
    """Union-find over individual channels: every tensor a coupled group reaches is an array
    of channel ids (its channel c is id ids[c]), and two ids united are one channel of the
    group. A depthwise layer's outputs repeat its input's ids (mult each); a Concatenate's
    output is its inputs' ids one after the other (input i's channel c at offset_i + c)."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)

    def new(self, width: int) -> np.ndarray:
        start = len(self.parent)
        ids = np.arange(start, start + width, dtype=np.int64)
        self.parent = np.concatenate([self.parent, ids])
        return ids

    def find(self, ids: np.ndarray) -> np.ndarray:
        roots = np.asarray(ids, dtype=np.int64)
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self.parent[ids] = roots  # path compression
        return roots

    def union(self, a: np.ndarray, b: np.ndarray) -> str | None:
        """Make two tensors' channels the same channels; why not, if they cannot be."""
        if len(a) != len(b):
            return "broadcast"
        while True:  # links that lost a write race to another link of the same root retry
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return None
            lo, hi = np.minimum(ra, rb)[differ], np.maximum(ra, rb)[differ]
            self.parent[hi] = lo


def group_of(graph: Any, start: str) -> Group:
    """The coupled group of `start`: layers whose filters must go together with its own.

    Layers whose outputs meet in an Add-type merge (directly or through BN, activations and
    other channel-preserving layers) share channel indices, as in DepGraph's grouping; so does
    a Multiply of a feature map with a squeeze-and-excitation gate (the gate conv's filters are
    the map's channels). A depthwise layer is a member too: its filters are its input's
    channels (mult of them each), so its producers' filters join the group, and so does
    whatever its own outputs meet. A Concatenate on the channel axis whose output meets a
    merge (or a depthwise member) puts each input's channels at its offset in the group, so
    its inputs' producers join it; one whose output only feeds consumers (DenseNet's) couples
    nothing. Raises ModelError naming the layer that cannot lose them.
    """
    producers = _producers(graph)
    fmt = _format(graph.layers[start].config)
    ch = _Channels()
    tensor: dict[str, np.ndarray] = {start: ch.new(_n_filters(graph, start))}
    # inputs of a Concatenate the forward walk entered: their channels are in the group's
    # tensors downstream, but their producers join only once those channels meet a merge or
    # a depthwise member (input layer -> (the Concatenate, its channel ids))
    dormant: dict[str, tuple[str, np.ndarray]] = {}
    members, merges = [start], []
    normalized: list[str] = []  # LayerNormalizations on the way
    problems: list[tuple[str, str, str]] = []  # (layer, via, why)
    forward = [start]  # layers whose consumers are still to visit
    # (layer whose producers are still to visit, the merge or depthwise member it leads to)
    backward = [(start, start)] if depthwise_member(graph.layers[start]) else []

    def wake(ids: np.ndarray, via: str) -> None:
        """Channels `ids` couple (they reach a merge or a depthwise member): the dormant
        Concatenate inputs that carry any of them join the group."""
        if not dormant:
            return
        roots = ch.find(ids)
        for src in [s for s, (_, own) in dormant.items() if np.isin(ch.find(own), roots).any()]:
            concat, _ = dormant.pop(src)
            reach(src, concat)

    def reach(src: str, via: str) -> None:
        """`src`'s output (tensor[src]) is in the group: classify its layer."""
        node = graph.layers[src]
        cls = node.class_name
        if (_prunable(node) or depthwise_member(node) or units_member(node)) and \
                _n_filters(graph, src) != len(tensor[src]):
            problems.append((src, via, "broadcast"))  # a one-channel gate, say
            return
        if cls in BATCHNORM_CLASSES or cls in PASS_THROUGH or nested_input(node):
            backward.append((src, via))
        elif _channel_params_pass(node):
            if _renormalizes(node):
                normalized.append(src)
            backward.append((src, via))
        elif cls in MERGES:
            merges.append(src)
            backward.append((src, src))
        elif cls == "Concatenate" and channel_concat(graph, src, fmt) is not None:
            backward.append((src, via))
        elif _prunable(node) or units_member(node):
            members.append(src)
        elif depthwise_member(node):
            members.append(src)
            backward.append((src, src))
        else:
            problems.append((src, via, "cannot lose"))
            return
        forward.append(src)

    while forward or backward:
        while backward:
            path, via = backward.pop()
            node = graph.layers[path]
            widths = channel_concat(graph, path, fmt) if node.class_name == "Concatenate" \
                else None
            offsets = np.cumsum([0] + widths) if widths else None
            # a Concatenate's inputs in their order (each at its offset)
            for slot, src in enumerate(node.sources if offsets is not None
                                       else producers[path]):
                want = tensor[path]
                if depthwise_member(node):  # its input channel c is its outputs' c*mult + m
                    mult = int(node.config.get("depth_multiplier", 1))
                    fresh = ch.new(len(want) // mult)
                    if len(want) % mult or ch.union(np.repeat(fresh, mult), want):
                        problems.append((src, via, "broadcast"))
                        continue
                    want = fresh
                elif offsets is not None:  # input slot's channel c is the output's off + c
                    want = want[offsets[slot]:offsets[slot + 1]]
                if src in tensor:
                    why = ch.union(tensor[src], want)
                    if why:
                        problems.append((src, via, why))
                    elif src in dormant:  # a Concatenate input the group now reaches
                        dormant.pop(src)
                        reach(src, via)
                    continue
                tensor[src] = want
                reach(src, via)
        if not forward:
            break
        path = forward.pop()
        for nxt in graph.consumers(path):
            if nxt == OUTPUT:
                continue
            node = graph.layers[nxt]
            cls = node.class_name
            have = tensor[path]
            widths = channel_concat(graph, nxt, fmt) if cls == "Concatenate" else None
            if depthwise_member(node):
                have = np.repeat(have, int(node.config.get("depth_multiplier", 1)))
                wake(have, nxt)
            elif widths is not None:
                slot = graph.layers[nxt].sources.index(path)
                offsets = np.cumsum([0] + widths)
                if nxt in tensor:  # reached again from another input
                    why = ch.union(tensor[nxt][offsets[slot]:offsets[slot + 1]], have)
                    if why:
                        problems.append((nxt, nxt, why))
                    continue
                parts = []
                for j, src in enumerate(node.sources):
                    if src not in tensor:
                        tensor[src] = ch.new(widths[j])
                        dormant[src] = (nxt, tensor[src])
                    if len(tensor[src]) != widths[j]:
                        problems.append((src, nxt, "broadcast"))
                        break
                    parts.append(tensor[src])
                else:
                    tensor[nxt] = np.concatenate(parts)
                    forward.append(nxt)
                continue
            elif _channel_params_pass(node):
                if _renormalizes(node) and nxt not in normalized:
                    normalized.append(nxt)
            elif not (cls in BATCHNORM_CLASSES or cls in PASS_THROUGH or cls in GLOBAL_POOLING
                      or cls in MERGES or nested_input(node)):
                continue  # it consumes the channels (a sink): no coupling through it
            if nxt in tensor:  # a merge reached again
                why = ch.union(tensor[nxt], have)
                if why:
                    problems.append((nxt, nxt, why))
                else:
                    wake(have, nxt)
                continue
            tensor[nxt] = have
            forward.append(nxt)
            if cls in MERGES:
                merges.append(nxt)
                backward.append((nxt, nxt))
                wake(have, nxt)
            elif depthwise_member(node):
                members.append(nxt)
    if problems:
        raise _ungroupable(graph, start, *problems[0])
    roots = {m: ch.find(tensor[m]) for m in members}
    number: dict[int, int] = {}  # the group's channels in order of first appearance
    for m in members:
        for r in roots[m].tolist():
            number.setdefault(r, len(number))
    order = {path: i for i, path in enumerate(graph.layers)}
    return Group(tuple(members), tuple(merges),
                 {m: np.array([number[r] for r in roots[m].tolist()], dtype=np.int64)
                  for m in members}, len(number),
                 tuple(sorted(set(normalized), key=order.__getitem__)))


def coupled_group(graph: Any, start: str) -> tuple[list[str], list[str]]:
    """(member layers, merge layers) whose channels must go together with `start`'s."""
    group = group_of(graph, start)
    return list(group.members), list(group.merges)


def _n_filters(graph: Any, path: str) -> int:
    node = graph.layers[path]
    family = family_of(node.class_name)
    if family is not None and family.name == "depthwise":
        shape = node.input_shape
        if not isinstance(shape, (list, tuple)):
            raise ModelError("the model config does not record this layer's input shape",
                             layer=path, hint="save the model with Keras 3 after building it")
        axis = 1 if _format(node.config) == "channels_first" else -1
        return int(shape[axis]) * int(node.config.get("depth_multiplier", 1))
    if units_member(node):
        return int(node.config["units"])
    return int(node.config["filters"])


def _ungroupable(graph: Any, start: str, src: str, via: str, why: str) -> ModelError:
    """Why `src`, whose channels the group of `start` reaches (at `via`), cannot lose them."""
    cls, node = graph.layers[via].class_name, graph.layers[src]
    meet = (f"meet those of '{start}' in {cls} '{via}'" if cls in MERGES else
            f"are the filters of {cls} '{via}'" + (f" (coupled with '{start}')" if via != start
                                                     else ""))
    family = family_of(node.class_name)
    if why == "broadcast":
        what = "the tensors it joins have different channel counts (a broadcast)"
    elif node.class_name == "InputLayer":
        what = "they come from the model input"
    elif node.class_name == "Concatenate":  # channel_concat said no
        what = ("a Concatenate inside a coupled group must be called once, join each tensor "
                "once and join on the channel axis (with known input shapes)")
    elif family is not None and int(node.config.get("groups", 1)) != 1:
        what = (f"it is a grouped convolution (groups={node.config['groups']}), whose filters "
                f"cannot be removed yet")
    else:
        what = f"filters of a {node.class_name} layer cannot be removed"
    return ModelError(f"its channels {meet}, and {what}", layer=src)


def _couple(graph: Any, selection: dict[str, list[int]], coupled: str) -> dict[str, list[int]]:
    """The selection with every coupled group losing the same channels (union/intersection):
    member m's filter f is the group's channel unit_of[m][f]."""
    out: dict[str, list[int]] = {}
    done: set[str] = set()
    for path in selection:
        if path in done:
            continue
        group = group_of(graph, path)
        done.update(group.members)
        if len(group.members) == 1:
            out[path] = sorted(set(selection[path]))
            continue
        listed = {m: {int(group.unit_of[m][f]) for f in selection[m]}
                  for m in group.members if m in selection}
        chosen = combine_units(group, listed, coupled)
        if chosen is None:
            raise ModelError(
                f"the layers {', '.join(group.members)} "
                f"{'meet in ' + ', '.join(group.merges) if group.merges else 'share channels'} and "
                f"must lose the same filters, but their rules select different ones",
                layer=path, hint="set coupled: union or coupled: intersection on the entries")
        if coupled == "intersection" and not chosen:
            raise ModelError(f"the coupled layers {', '.join(group.members)} have no filter in "
                             f"common to remove (coupled: intersection)", layer=path)
        for m in group.members:
            filters = group.filters_of(m, chosen)
            if filters or m in selection:  # a Concatenate input may lose none of its own
                out[m] = filters
    return out


@dataclass(frozen=True)
class Touch:
    """One layer a removal changes and how: `keep` of `of` indices survive on the axis `how`
    names (filters: its output filters; batchnorm: channels; inputs, transpose_inputs,
    separable_inputs, depthwise: its input channels; rows: a Dense kernel's rows; passes and
    concat: the channels that flow through)."""

    layer: str
    class_name: str
    how: str
    keep: tuple[int, ...]
    of: int

    def to_json(self) -> dict[str, Any]:
        kept = set(self.keep)
        return {"layer": self.layer, "layer_class": self.class_name, "how": self.how,
                "removed": compact_ranges([i for i in range(self.of) if i not in kept]),
                "kept": len(self.keep), "of": self.of}


HOW = {"filters": "filters removed", "batchnorm": "channels sliced", "passes": "passes through",
       "concat": "concatenated channels removed", "inputs": "input channels removed",
       "transpose_inputs": "input channels removed", "separable_inputs": "input channels removed",
       "depthwise": "channels removed (and its outputs for them)", "rows": "kernel rows removed",
       "channel_params": "per-channel parameters sliced",
       "grouped_depthwise": "channels removed (its filters and groups for them)",
       "dropped": "removed from the model (no channels left)"}


def describe(touch: dict[str, Any]) -> str:
    """'bn (BatchNormalization): channels sliced 3, 11 (2 of 16)' from Touch.to_json()."""
    n = touch["of"] - touch["kept"]
    what = touch["removed"] if len(touch["removed"]) <= 60 else touch["removed"][:57] + "..."
    return (f"{touch['layer']} ({touch['layer_class']}): {HOW[touch['how']]} {what} "
            f"({n} of {touch['of']})")


@dataclass
class RemovalPlan:
    """What a removal will do, from the model config alone (no TensorFlow, no weights)."""

    selection: dict[str, list[int]]  # after coupling
    touches: list[Touch] = field(default_factory=list)
    sinks: dict[str, _Sink] = field(default_factory=dict)
    statistics_changed: list[str] = field(default_factory=list)  # LayerNorms on the way
    dropped: list[str] = field(default_factory=list)  # layers left without channels
    reshapes: dict[str, int] = field(default_factory=dict)  # Reshape -> its channel entry


def plan_removal(graph: Any, selection: dict[str, list[int]],
                 coupled: str = "error", approximate: frozenset[str] = frozenset()) -> RemovalPlan:
    """Couple the selection and walk every channel it removes to where it ends.

    Raises ModelError naming the layer for anything the walk cannot follow exactly (or, for
    the layers in `approximate`, approximately: a LayerNormalization over the channels).
    """
    for path, node in graph.layers.items():
        if node.class_name in MODEL_CLASSES and (node.class_name != "Sequential" or
                                                 node.calls != 1):
            raise ModelError("removal of filters in models with nested functional (or shared) "
                             "models is not supported yet (nested Sequentials are)", layer=path)
    plan = RemovalPlan(_couple(graph, selection, coupled))
    walk = _Walk(graph, plan, set(), {}, approximate)
    followers: dict[str, list[int]] = {}  # depthwise members: the walk from their producers
    for path, removed in plan.selection.items():
        node = graph.layers[path]
        family = family_of(node.class_name)
        if depthwise_member(node):  # its group holds its producers (else group_of refused)
            followers[path] = sorted(set(removed))  # sliced where the walk reaches them
            continue
        if not units_member(node) and (family is None or family.name not in REMOVABLE_FAMILIES
                                       or int(node.config.get("groups", 1)) != 1):
            raise ModelError(f"removal from a {node.class_name} layer is not supported yet",
                             layer=path)
        if node.calls != 1:
            raise ModelError("the layer is shared (called more than once)", layer=path)
        n = _n_filters(graph, path)
        gone = set(removed)  # once, not once per filter (2048 filters: ~4 M set entries)
        keep = [f for f in range(n) if f not in gone]
        flow = _Flow(keep, n, frozenset(coupled_group(graph, path)[0]), _format(node.config))
        if not keep:  # allowed by the selection stage only with allow_empty_layer: true
            _drop_branch(walk, path, flow)
            continue
        walk.touch(path, "filters", keep, n)
        _propagate(walk, path, flow)
    order = list(graph.layers)
    while walk.pending:
        concat = min(walk.pending, key=order.index)  # config order is topological
        _release_concat(walk, concat, walk.pending.pop(concat))
    reached = {t.layer: t for t in plan.touches if t.how in ("depthwise", "grouped_depthwise")}
    for path, removed in followers.items():
        touch = reached.get(path)
        mult = int(graph.layers[path].config.get("depth_multiplier", 1))
        kept = set(touch.keep) if touch is not None else set()
        if touch is None or [c * mult + m for c in range(touch.of) if c not in kept
                             for m in range(mult)] != removed:
            # coupling gave every member the same channels, so the walk from the producers
            # reaches each depthwise member with exactly its selection
            raise ModelError("the depthwise layer's selection differs from the channels its "
                             "producers lose; please report this as a bug", layer=path)
    return plan


def remove_filters(keras: Any, model: Any, selection: dict[str, list[int]],
                   coupled: str = "error", approximate: frozenset[str] = frozenset(),
                   feed: Any = None, reference: bool = False,
                   through_concat: frozenset[str] = frozenset()) -> RemovalResult:
    """A new model without the selected filters, equal to `model` on every input.

    `model` must already be the zeroed model (kernel slices, and the biases and BatchNorm
    followers as the entries ask): whatever constant a removed channel still carries to a
    consumer is measured on `feed` in that model and folded into the consumer's bias.
    `approximate` names the layers whose entries accept an inexact fold; `through_concat` those
    whose entries neutralise BatchNormalizations after Concatenates (a refusal's hint suggests
    it to the others). `reference`: also
    return `model`'s outputs on `feed` (result.reference), from the same run when there is
    something to fold (one pass of the zeroed model instead of two: ~0.4 s for ResNet50).
    """
    serialized = keras.saving.serialize_keras_object(model)
    graph = build_graph(serialized)
    plan = plan_removal(graph, selection, coupled, approximate)
    config = serialized["config"]
    by_name = _configs_by_path(config)  # "outer/inner" inside a nested Sequential
    weights = {path: {v.name: np.array(v.numpy()) for v in layer.weights}
               for path, layer in _layers_by_path(model).items()}
    original = {k: dict(v) for k, v in weights.items()}  # slicing makes new arrays
    result = RemovalResult(model=None, params_before=int(model.count_params()))
    result.selection = plan.selection
    result.touches = [t.to_json() for t in plan.touches]
    result.statistics_changed = list(plan.statistics_changed)
    result.approximate = bool(plan.statistics_changed)
    result.dropped_layers = list(plan.dropped)
    for touch in plan.touches:
        # an operation node (`x + 3.0`) is no layer and holds no weights: it only passes
        apply_touch(touch.how, list(touch.keep), touch.class_name,
                    graph.layers[touch.layer].config, weights.get(touch.layer, {}))
        by_name[touch.layer].pop("build_config", None)  # its stale input shape fails a rebuild
        for i, part in enumerate(touch.layer.split("/")[:-1]):  # so does a nested model's
            by_name["/".join(touch.layer.split("/")[:i + 1])].pop("build_config", None)
        if touch.how == "filters":
            key = "units" if touch.class_name == "Dense" else "filters"
            by_name[touch.layer]["config"][key] = len(touch.keep)
        if touch.how == "grouped_depthwise":  # groups == filters == input channels, all three
            by_name[touch.layer]["config"]["filters"] = len(touch.keep)
            by_name[touch.layer]["config"]["groups"] = len(touch.keep)
        if touch.how == "passes" and touch.class_name == "InputLayer":  # a nested model's
            shape = list(by_name[touch.layer]["config"]["batch_shape"])
            shape[-1 if shape[-1] == touch.of else 1] = len(touch.keep)
            by_name[touch.layer]["config"]["batch_shape"] = shape
        params = channel_params_of(touch.class_name)
        if touch.how == "channel_params" and params is not None and params.size_key:
            by_name[touch.layer]["config"][params.size_key] = len(touch.keep)
        if touch.layer in plan.reshapes:  # its target_shape names the channel count
            target = list(by_name[touch.layer]["config"]["target_shape"])
            target[plan.reshapes[touch.layer]] = len(touch.keep)
            by_name[touch.layer]["config"]["target_shape"] = target
        if touch.how == "filters" or touch.how == "dropped" and touch.layer in plan.selection:
            kept = {f: i for i, f in enumerate(touch.keep)}
            result.mappings[touch.layer] = {"old_to_new": [kept.get(f, -1)
                                                           for f in range(touch.of)]}
    if plan.dropped:
        _unwire(config, set(plan.dropped))
    if plan.sinks or reference:
        if feed is None:
            from kprune_batch.probe import probe_inputs

            x = probe_inputs(model)
            feed = x if len(x) > 1 else x[0]
        values, result.reference, result.reference_ran_on = _sink_inputs(
            keras, model, feed, plan.sinks, with_outputs=reference)
        if plan.sinks:
            _fold(graph, plan, original, weights, by_name, result, values, approximate,
                  through_concat)
    cls = keras.Sequential if serialized["class_name"] == "Sequential" else keras.Model
    new_model = cls.from_config(config)
    for path, layer in _layers_by_path(new_model).items():
        if layer.weights:
            mine = weights[path]
            names = [v.name for v in layer.weights]
            # a variable created without a name is uniquified per process ('variable_1'):
            # then the creation order, which the rebuilt layer shares, says which is which
            layer.set_weights([mine[n] for n in names] if all(n in mine for n in names)
                              else list(mine.values()))
    result.model = new_model
    result.params_after = int(new_model.count_params())
    result.macs_before = count_macs(model)
    result.macs_after = count_macs(new_model)
    return result


def _configs_by_path(config: dict, prefix: str = "") -> dict[str, dict]:
    """Every layer entry of a serialized model by its graph path ("outer/inner" inside nested
    models, as graph.build_graph names them)."""
    out: dict[str, dict] = {}
    for layer in config["layers"]:
        path = prefix + (layer.get("name") or layer["config"]["name"])
        out[path] = layer
        inner = layer.get("config")
        if layer.get("class_name") in MODEL_CLASSES and isinstance(inner, dict) and \
                "layers" in inner:
            out.update(_configs_by_path(inner, path + "/"))
    return out


def _layers_by_path(model: Any, prefix: str = "") -> dict[str, Any]:
    """Every layer holding its own weights by graph path (a nested model's layers, not it)."""
    out: dict[str, Any] = {}
    for layer in model.layers:
        if type(layer).__name__ in MODEL_CLASSES or hasattr(layer, "layers"):
            out.update(_layers_by_path(layer, prefix + layer.name + "/"))
        else:
            out[prefix + layer.name] = layer
    return out


def _sink_inputs(keras: Any, model: Any, feed: Any, sinks: dict[str, _Sink],
                 with_outputs: bool = False
                 ) -> tuple[list[np.ndarray], list[np.ndarray] | None, str]:
    """The removed channels of each sink's input on `feed` (only those: on the sink's axis,
    in `sink.removed`'s order), the model's outputs from the same run when `with_outputs`
    (else None), and what ran. A nested Sequential's layer's input is computed by running that
    Sequential's layers before it on the nested model's input (its tensors are not the outer
    model's, so run_points cannot name them)."""
    from kprune_batch.twin import run_points

    names = list(sinks)
    points = [(n.split("/")[0], "input") if "/" in n else (n, "input") for n in names]
    take = [None if "/" in n else (sinks[n].axis, sinks[n].removed) for n in names]
    # on the channels_last twin where this CPU cannot run channels_first convolutions (twin.py)
    extra = [("", "model")] if with_outputs else []
    values, ran_on = run_points(keras, model, feed, points + extra,
                                take=take + [None] * len(extra))
    outputs = values[len(points):] if with_outputs else None
    out = []
    for name, value in zip(names, values[:len(points)], strict=True):
        parts = name.split("/")
        if len(parts) > 2:
            raise ModelError("removal into a model nested two deep is not supported yet",
                             layer=name)
        if len(parts) == 2:
            for layer in model.get_layer(parts[0]).layers:
                if layer.name == parts[1]:
                    break
                value = layer(value, training=False)
            value = np.take(to_numpy(keras, value), sinks[name].removed, axis=sinks[name].axis)
        out.append(value)
    return out, outputs, ran_on


def apply_touch(how: str, keep: list[int], class_name: str, config: dict,
                variables: dict[str, np.ndarray]) -> None:
    """Slice one layer's variables (by name, as Keras names them) as a Touch says; shared with
    `kprune verify`, which rebuilds the expected output from the log."""
    kernel = _kernel_var(class_name, variables)
    if how == "filters":  # the family table knows the filter axis (-2 for Conv*Transpose)
        family = member_family_of(class_name)
        assert family is not None
        family.slice_filters(variables, keep)
    elif how == "channel_params":
        params = channel_params_of(class_name)
        assert params is not None
        params.slice_channels(variables, keep)
    elif how == "grouped_depthwise":  # kernel (*k, 1, filters): channel c is filter c
        family = family_of(class_name)
        assert family is not None
        family.slice_filters(variables, keep)
    elif how == "dropped":  # the layer leaves the model (`kprune verify` drops it too)
        variables.clear()
    elif how == "batchnorm":
        for name in variables:
            variables[name] = variables[name][keep]
    elif how in INPUT_TOUCHES:  # the family table knows where each family keeps its inputs
        family = family_of(class_name)
        assert family is not None and family.input_touch == how
        family.slice_inputs(variables, keep, config)
    elif how == "rows":
        variables[kernel] = variables[kernel][keep]


def _kernel_var(class_name: str, variables: dict[str, np.ndarray]) -> str:
    """The variable holding a layer's filters (a separable layer's pointwise kernel; Dense:
    kernel), in the names Keras 3 or a legacy file uses."""
    family = family_of(class_name)
    return (family.kernel_name(variables) if family else None) or "kernel"


def fold_delta(class_name: str, config: dict, variables: dict[str, np.ndarray],
               channels: list[int], constants: np.ndarray) -> np.ndarray:
    """What input channels `channels`, each the constant in `constants`, add to every output
    of a layer without padding effects: sum over kernel taps x constant (float64, all outputs)."""
    constants = np.asarray(constants, dtype="float64")
    if rows_consumer_of(class_name) is not None:  # Dense, LSTM/GRU/SimpleRNN input kernel
        return constants @ variables["kernel"][channels].astype("float64")
    if "pointwise_kernel" in variables:  # separable: depthwise taps (no bias), pointwise rows
        mult = int(config.get("depth_multiplier", 1))
        taps = variables["depthwise_kernel"][..., channels, :].astype("float64")
        through = (taps.reshape(-1, len(channels), mult).sum(axis=0)
                   * constants[:, None]).reshape(-1)
        pointwise = variables[_kernel_var(class_name, variables)]
        rows = [c * mult + m for c in channels for m in range(mult)]
        return through @ pointwise.reshape(-1, pointwise.shape[-1])[rows].astype("float64")
    taps = variables[_kernel_var(class_name, variables)][..., channels, :].astype("float64")
    return np.tensordot(taps, constants, axes=([taps.ndim - 2], [0])).reshape(
        -1, taps.shape[-1]).sum(axis=0)


def add_to_bias(variables: dict[str, np.ndarray], delta: np.ndarray, dtype: Any,
                class_name: str = "", config: dict | None = None) -> None:
    """bias += delta in float64, rounded once to the layer's dtype; a layer without a bias
    gets `delta` as its bias (a recurrent layer: its input bias, as the family table says)."""
    rows = rows_consumer_of(class_name)
    if rows is not None:
        rows.add_to_input_bias(class_name, variables, delta, config or {}, dtype)
    elif "bias" in variables:
        variables["bias"] = (variables["bias"].astype("float64") + delta).astype(dtype)
    else:
        variables["bias"] = delta.astype(dtype)


@dataclass(frozen=True)
class _Flow:
    """Removed channels on their way: which of `n` survive, whose they are, their axis."""

    keep: list[int]
    n: int
    origins: frozenset[str]  # the pruned layers (coupled groups whole) these channels come from
    data_format: str  # channels_last | channels_first, as the pruned layer wrote them
    renormalized: bool = False  # a LayerNormalization on the way (approximate: true)

    def dropped(self) -> list[int]:
        kept = set(self.keep)
        return [c for c in range(self.n) if c not in kept]


@dataclass
class _Sink:
    """A layer where removed channels end: it loses input channels (or Dense rows)."""

    kind: str  # conv | separable | transpose | dense
    removed: list[int]  # indices on the sink's input channel axis (Dense: rows)
    axis: int  # that axis in the sink's input tensor (-1 or 1)
    origins: frozenset[str]
    renormalized: bool = False  # through a LayerNormalization: the removed channels vary


@dataclass
class _Walk:
    graph: Any
    plan: RemovalPlan
    visited: set[str]  # layers already handled (a merge is reached once per member)
    # Concatenate layers collect what reaches each of their inputs before passing anything on
    pending: dict[str, dict[int, _Flow]]
    approximate: frozenset[str] = frozenset()  # pruned layers whose entries allow it

    def touch(self, layer: str, how: str, keep: list[int], of: int) -> None:
        self.plan.touches.append(Touch(layer, self.graph.layers[layer].class_name, how,
                                       tuple(keep), of))

    def input_shape(self, layer: str) -> list:
        shape = self.graph.layers[layer].input_shape
        if not isinstance(shape, (list, tuple)):  # tuples in memory, lists from config.json
            raise ModelError("the model config does not record this layer's input shape",
                             layer=layer, hint="save the model with Keras 3 after building it")
        return list(shape)


def _format(config: dict) -> str:
    return "channels_first" if config.get("data_format") == "channels_first" else "channels_last"


def _release_concat(walk: _Walk, concat: str, arrivals: dict[int, _Flow]) -> None:
    """Map what each input of a Concatenate keeps to the concatenated axis (input i's channel c
    is channel offset_i + c) and pass that on."""
    fmt = next(iter(arrivals.values())).data_format
    axis = 1 if fmt == "channels_first" else -1
    keep, offset = [], 0
    for slot, shape in enumerate(walk.input_shape(concat)):
        width = int(shape[axis])
        keep += [offset + c for c in (arrivals[slot].keep if slot in arrivals else range(width))]
        offset += width
    walk.visited.add(concat)
    if not keep:
        raise ModelError("removal would leave the Concatenate without channels", layer=concat)
    walk.touch(concat, "concat", keep, offset)
    origins = frozenset().union(*(f.origins for f in arrivals.values()))
    _propagate(walk, concat, _Flow(keep, offset, origins, fmt,
                                   any(f.renormalized for f in arrivals.values())))


def _propagate(walk: _Walk, src: str, flow: _Flow) -> None:
    graph = walk.graph
    keep, n = flow.keep, flow.n
    axis = 1 if flow.data_format == "channels_first" else -1
    for consumer in graph.consumers(src):
        if consumer == OUTPUT:
            raise ModelError("the layer's channels are a model output; removing them would change "
                             "the model's output shape", layer=src)
        if consumer in walk.visited:
            continue
        node = graph.layers[consumer]
        if node.class_name == "Concatenate":
            _arrive_at_concat(walk, src, consumer, node, flow)
            continue
        walk.visited.add(consumer)
        if node.calls != 1:
            raise ModelError("a layer on the path is shared (called more than once)",
                             layer=consumer)
        cls = node.class_name
        if "data_format" in node.config and cls != "Flatten" and \
                _format(node.config) != flow.data_format:
            raise ModelError(f"the layer reads its input as {_format(node.config)} but the "
                             f"removed channels are {flow.data_format}", layer=consumer)
        if cls in BATCHNORM_CLASSES:
            if not _bn_on_channels(node.config, walk.input_shape(consumer), flow.data_format):
                raise ModelError("the BatchNormalization does not normalise the channel axis",
                                 layer=consumer)
            walk.touch(consumer, "batchnorm", keep, n)
            _propagate(walk, consumer, flow)
        elif cls in PASS_THROUGH or cls in GLOBAL_POOLING or cls in MERGES or \
                nested_input(node):
            walk.touch(consumer, "passes", keep, n)
            _propagate(walk, consumer, flow)
        elif cls == "Flatten":
            _flatten_then_dense(walk, consumer, flow)
        elif cls == "Reshape":
            _reshape(walk, consumer, flow)
        elif cls == "Permute":
            _permute(walk, consumer, flow)
        elif rows_consumer_of(cls) is not None:  # Dense, LSTM, GRU, SimpleRNN: kernel rows
            if flow.data_format == "channels_first" and len(walk.input_shape(consumer)) > 2:
                raise ModelError(f"a {cls} layer reads the last axis, not the channels of this "
                                 f"channels_first tensor", layer=consumer)
            walk.touch(consumer, "rows", keep, n)
            walk.plan.sinks[consumer] = _Sink("dense", flow.dropped(), -1, flow.origins,
                                              flow.renormalized)
        elif channel_params_of(cls) is not None:
            _channel_params(walk, consumer, flow)
        elif family_of(cls) is not None:
            fam = family_of(cls)
            assert fam is not None
            if fam.name == "conv" and int(node.config.get("groups", 1)) != 1:
                if not grouped_depthwise(node):
                    raise ModelError("a grouped convolution consumes the channels",
                                     layer=consumer)
                # filter c reads input channel c alone: it goes with the channel, groups too
                walk.touch(consumer, "grouped_depthwise", keep, n)
                _propagate(walk, consumer, flow)
                continue
            walk.touch(consumer, fam.input_touch, keep, n)
            if fam.name != "depthwise":
                sink = {"conv": "conv", "conv_transpose": "transpose"}.get(fam.name, fam.name)
                walk.plan.sinks[consumer] = _Sink(sink, flow.dropped(), axis, flow.origins,
                                                  flow.renormalized)
            else:  # depthwise: its own channels c*mult..c*mult+mult-1 go too; whatever constant
                # they carry (its bias, say) is measured and folded where they end
                mult = int(node.config.get("depth_multiplier", 1))
                _propagate(walk, consumer, _Flow([c * mult + m for c in keep for m in range(mult)],
                                                 n * mult, flow.origins, flow.data_format,
                                                 flow.renormalized))
        else:
            raise ModelError(f"a {cls} layer consumes the channels; removal through it is not "
                             f"supported yet", layer=consumer)


def _channel_params(walk: _Walk, layer: str, flow: _Flow) -> None:
    """LayerNormalization / LayerScale on the channel axis: slice its per-channel parameters
    and go on. A LayerNormalization's mean and variance are over the channels, so without the
    removed ones they change: allowed only where every pruned layer's entry says
    approximate: true (the deviation is then measured and logged)."""
    node = walk.graph.layers[layer]
    params = channel_params_of(node.class_name)
    assert params is not None
    shape = node.input_shape
    rank = len(shape) if isinstance(shape, (list, tuple)) else None
    if flow.data_format == "channels_first" and rank != 2 or \
            not params.on_channel_axis(node.config, rank):
        raise ModelError(f"the {node.class_name} does not act on the channel axis alone",
                         layer=layer)
    renormalized = flow.renormalized
    if not params.exact:
        if not flow.origins <= walk.approximate:
            who = ", ".join(f"'{o}'" for o in sorted(flow.origins))
            raise ModelError(
                f"removed filters of {who} reach it, and a {node.class_name} computes its "
                f"statistics over the channels, so removing channels changes them and the "
                f"removed model cannot equal the zeroed one", layer=layer,
                hint=f"set approximate: true on the entries of {who} to accept the deviation "
                     f"(measured and logged), or zero these filters instead (action: zero)")
        walk.plan.statistics_changed.append(layer)
        renormalized = True
    walk.touch(layer, "channel_params", flow.keep, flow.n)
    _propagate(walk, layer, _Flow(flow.keep, flow.n, flow.origins, flow.data_format,
                                  renormalized))


def _reshape(walk: _Walk, layer: str, flow: _Flow) -> None:
    """A Reshape keeps the channel mapping when the channel axis stays whole where it was: its
    size last in the target (channels_last) or first (channels_first), since a C-order reshape
    of (..., C) to (..., C) moves whole channel vectors (keras/src/layers/reshaping/reshape.py
    is ops.reshape). A target of rank 1 is a Flatten in channels_last order."""
    node = walk.graph.layers[layer]
    target = node.config.get("target_shape")
    if not isinstance(target, (list, tuple)) or not target or \
            not all(isinstance(d, int) and not isinstance(d, bool) for d in target):
        raise ModelError("the Reshape's target_shape is not a list of sizes", layer=layer)
    where = -1 if flow.data_format == "channels_last" else 0
    if int(target[where]) == flow.n:
        walk.plan.reshapes[layer] = where % len(target)
        walk.touch(layer, "passes", flow.keep, flow.n)
        _propagate(walk, layer, flow)
    elif len(target) == 1:
        _flatten_then_dense(walk, layer, flow)
    else:
        raise ModelError(f"a Reshape to {tuple(target)} moves the {flow.n} channels off their "
                         f"axis, so which channel goes where cannot be proven (followed: a "
                         f"Reshape keeping the channel axis {'last' if where else 'first'} "
                         f"with its size, or to rank 1)", layer=layer)


def _permute(walk: _Walk, layer: str, flow: _Flow) -> None:
    """Permute(dims): output axis j+1 is input axis dims[j] (1-based, batch excluded). The
    channels keep their indices; the walk goes on if they end up last (channels_last) or
    first (channels_first)."""
    node = walk.graph.layers[layer]
    dims = node.config.get("dims")
    if not isinstance(dims, (list, tuple)) or sorted(dims) != list(range(1, len(dims) + 1)):
        raise ModelError("the Permute's dims are not a permutation", layer=layer)
    rank = len(dims) + 1
    channel = rank - 1 if flow.data_format == "channels_last" else 1
    moved_to = list(dims).index(channel) + 1
    if moved_to == rank - 1:
        fmt = "channels_last"
    elif moved_to == 1:
        fmt = "channels_first"
    else:
        raise ModelError(f"a Permute{tuple(dims)} moves the channels to axis {moved_to}, "
                         f"neither first nor last, and no consumer reads them there",
                         layer=layer)
    walk.touch(layer, "passes", flow.keep, flow.n)
    _propagate(walk, layer, _Flow(flow.keep, flow.n, flow.origins, fmt, flow.renormalized))


def _drop_branch(walk: _Walk, conv: str, flow: _Flow) -> None:
    """Every filter of `conv` goes (allow_empty_layer: true). Keras refuses a layer of 0
    filters (base_conv.py: "Expected a strictly positive value"), so the layer, and the
    channel-preserving layers between it and the one Concatenate it feeds, leave the model;
    the Concatenate loses that input (a Concatenate of one input is valid Keras)."""
    graph = walk.graph
    chain, path = [conv], conv
    while True:
        consumers = graph.consumers(path)
        nxt = consumers[0] if len(consumers) == 1 else None
        node = graph.layers[nxt] if nxt not in (None, OUTPUT) else None
        if node is None or node.calls != 1:
            raise ModelError("removal would leave the layer without filters, and its channels "
                             "do not feed only one Concatenate (through channel-preserving "
                             "layers), so it cannot leave the model", layer=conv)
        if node.class_name == "Concatenate":
            break
        if not (node.class_name in BATCHNORM_CLASSES or node.class_name in PASS_THROUGH or
                channel_params_of(node.class_name) is not None and
                channel_params_of(node.class_name).exact):
            raise ModelError(f"removal would leave the layer without filters, and the "
                             f"{node.class_name} '{nxt}' it feeds cannot lose its input (only "
                             f"a Concatenate can lose one of its inputs)", layer=conv)
        chain.append(nxt)
        path = nxt
    dropped = set(chain)
    for layer in chain:
        for src in graph.layers[layer].sources:
            if src not in dropped and all(c in dropped for c in graph.consumers(src)):
                raise ModelError(f"removal would leave the layer without filters, and "
                                 f"'{src}', which feeds only it, would feed nothing", layer=conv)
    for layer in chain:
        walk.visited.add(layer)
        walk.touch(layer, "dropped", [], flow.n)
        walk.plan.dropped.append(layer)
    concat = graph.layers[nxt]
    _arrive_at_concat(walk, path, nxt, concat, flow)


def _unwire(config: dict, dropped: set[str]) -> None:
    """Take the dropped layers out of a functional config and out of the inbound nodes that
    consume them (only Concatenate inputs: see _drop_branch)."""
    config["layers"] = [layer for layer in config["layers"]
                        if layer["config"]["name"] not in dropped]

    def kept(tensor: Any) -> bool:
        if isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__":
            return tensor["config"]["keras_history"][0] not in dropped
        return True

    for layer in config["layers"]:
        for inbound in layer.get("inbound_nodes", []):
            args = inbound.get("args")
            if args and isinstance(args[0], (list, tuple)):
                inbound["args"] = [[t for t in args[0] if kept(t)], *args[1:]]


def _bn_on_channels(config: dict, shape: list, data_format: str) -> bool:
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if not isinstance(axis, int):
        return False
    axis = axis % len(shape)
    return axis == (1 if data_format == "channels_first" else len(shape) - 1)


def _arrive_at_concat(walk: _Walk, src: str, concat: str, node: Any, flow: _Flow) -> None:
    axis = node.config.get("axis", -1)
    rank = len(walk.input_shape(concat)[0])
    channel_axis = 1 if flow.data_format == "channels_first" else rank - 1
    if not isinstance(axis, int) or axis % rank != channel_axis or \
            node.sources.count(src) != 1 or node.calls != 1:
        raise ModelError("a Concatenate that is shared, joins the same tensor twice or does not "
                         "join on the channel axis consumes the channels", layer=concat)
    walk.pending.setdefault(concat, {})[node.sources.index(src)] = flow


def _flatten_then_dense(walk: _Walk, flatten: str, flow: _Flow) -> None:
    """Flatten writes (positions, channels) in channels_last order: element (h, w, c) is row
    (h*W + w)*C + c. A channels_first tensor is transposed to that order first only when the
    Flatten itself says channels_first (keras/src/layers/reshaping/flatten.py); otherwise its
    element (c, h, w) is row c*H*W + h*W + w."""
    graph = walk.graph
    consumers = graph.consumers(flatten)
    dense = consumers[0] if len(consumers) == 1 else None
    if dense is None or dense == OUTPUT or graph.layers[dense].class_name != "Dense":
        raise ModelError("Flatten must feed exactly one Dense layer", layer=flatten)
    total = int(walk.input_shape(dense)[-1])
    n = flow.n
    positions = total // n
    channels_major = flow.data_format == "channels_first" and \
        _format(graph.layers[flatten].config) == "channels_last"
    if channels_major:
        rows = [c * positions + p for c in flow.keep for p in range(positions)]
    else:
        rows = [p * n + c for p in range(positions) for c in flow.keep]
    rows.sort()
    kept = set(rows)
    walk.touch(flatten, "passes", flow.keep, n)
    walk.touch(dense, "rows", rows, total)
    walk.visited.add(dense)
    walk.plan.sinks[dense] = _Sink("dense", [r for r in range(total) if r not in kept], -1,
                                   flow.origins)


CONSTANT_RTOL = 1e-6  # a removed channel is constant if it varies less than this (relative)


def _fold(graph: Any, plan: RemovalPlan,
          original: dict[str, dict[str, np.ndarray]], weights: dict[str, dict[str, np.ndarray]],
          by_name: dict[str, dict], result: RemovalResult, values: list[Any],
          approximate: frozenset[str], through_concat: frozenset[str] = frozenset()) -> None:
    """Fold what removed channels still carry into each sink's bias.

    A removed channel is the zeroed layer's bias (a constant) passed through BN, activations,
    pooling and merges with other removed channels: a function of nothing but the weights, so
    one probe batch measures it for every input. It is the same at every position unless
    zero padding or a padded depthwise layer on the way treats borders differently. Folding
    sum(kernel taps x constant) into the bias is exact for Dense and for convolutions without
    padding ('valid', or a 1x1 kernel); otherwise only with `approximate: true`. `values`: the
    removed channels of each sink's input on the probe batch, in plan.sinks's order
    (_sink_inputs).
    """
    for name, value in zip(plan.sinks, values, strict=True):
        sink = plan.sinks[name]
        x = np.moveaxis(np.asarray(value, dtype="float64"), sink.axis, -1)  # (..., removed)
        flat = x.reshape(-1, x.shape[-1])
        center = x[(0,) + tuple(d // 2 for d in x.shape[1:-1])]
        if sink.renormalized:  # through a LayerNorm the removed channels vary with the input
            # itself: their mean over the probe batch is the constant closest to them
            center = flat.mean(axis=0)
        varies = np.max(np.abs(flat - center), axis=0) > CONSTANT_RTOL * np.maximum(
            1.0, np.abs(center))
        if not np.any(varies) and not np.any(center):
            continue  # silent: nothing to fold
        node = graph.layers[name]
        who = ", ".join(f"'{o}'" for o in sorted(sink.origins))
        hint = (f"set approximate: true on the entries of {who} to accept the deviation "
                f"(measured and logged), or zero these filters instead (action: zero)")
        behind = [] if sink.origins <= through_concat else _bns_after_concat(graph, plan)
        if behind:  # the zeroed model keeps these channels alive: neutralised, nothing is left
            hint = (f"set batchnorm: neutralize_concat on the entries of {who} to silence "
                    f"BatchNormalization '{behind[0]}' after a Concatenate"
                    f"{f' (and {len(behind) - 1} more)' if len(behind) > 1 else ''} "
                    f"for an exact removal, or {hint}")
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
        delta = fold_delta(node.class_name, node.config, original[name], sink.removed, center)
        if name in result.mappings:  # the sink loses filters of its own as well
            delta = delta[[c for c, to in enumerate(result.mappings[name]["old_to_new"])
                           if to >= 0]]
        variables = weights[name]
        bias_added = "bias" not in variables
        if bias_added:
            by_name[name]["config"]["use_bias"] = True
        add_to_bias(variables, delta, next(iter(variables.values())).dtype, node.class_name,
                    node.config)
        exact = not (np.any(varies) or padded)
        result.approximate = result.approximate or not exact
        result.folded.append({
            "layer": name, "exact": exact, "bias_added": bias_added,
            "constants": [{"channel": int(c), "constant": float(k)}
                          for c, k in zip(sink.removed, center, strict=True) if k != 0.0],
        })


def _bns_after_concat(graph: Any, plan: RemovalPlan) -> list[str]:
    """The BatchNormalizations the plan slices whose input is a Concatenate it touches: with
    batchnorm: neutralize_concat the zeroed model would hold 0 on their removed channels."""
    concats = {t.layer for t in plan.touches if t.how == "concat"}
    return [t.layer for t in plan.touches if t.how == "batchnorm"
            and any(src in concats for src in graph.layers[t.layer].sources)]


def _kernel_size(config: dict) -> list[int]:
    size = config.get("kernel_size", 1)
    return list(size) if isinstance(size, (list, tuple)) else [size]
