"""The selection stage: from a model's config and kernels to the frozen selection of every layer.

resolve entries -> compute statistics -> apply rules (index, threshold, sign, ranking) -> union
-> couple (action: remove) -> round_to -> guard. Pure: it reads weights through the
`ModelWeights` interface (`graph` and `variables()`), writes nothing and imports no TensorFlow,
so `plan`, the executor and any later reader (plan diff, review page) share one answer.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from kprune_batch.errors import MAX_LISTED, ModelError, name_list
from kprune_batch.families import Family, canonical_class, family_of, member_family_of
from kprune_batch.graph import LayerGraph
from kprune_batch.plan import LayerOp, ModelJob, Options, RuleOp
from kprune_batch.rules import (DATA_KINDS, RANKING_KINDS, STAT_KINDS, RuleError, budget,
                                check_finite, filter_stats, normalized, rank_order, select,
                                threshold)

# Data statistics of layers, measured on the model's samples by the executor's provider
# (impact.Measurer.data_statistics, which needs TensorFlow): called once per model with every
# layer path that needs them, and the layers to measure only where they can be (plan); returns
# {path: {"at": measured layer, "samples": count, "apoz": (n,), "activation_mean": (n,)}}.
DataProvider = Callable[[LayerGraph, Iterable[str], Iterable[str]],
                        Mapping[str, Mapping[str, Any]]]

# Options every layer of one coupled group must share (they decide how the group's channels are
# edited and coupled); `approximate` and `max_fraction` stay per layer.
GROUP_OPTIONS = ("action", "bias", "batchnorm", "coupled", "round_to")
# Options two entries naming the same layer must share.
LAYER_OPTIONS = ("bias", "batchnorm", "action")


@dataclass(frozen=True)
class RankPick:
    """Why a ranking rule selected a filter: its 1-based position in the ranking and its score
    (`normalized`: the score the ranking compared, where across: entry)."""

    rule: str
    position: int
    score: float
    normalized: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"rule": self.rule, "position": self.position, "score": self.score}
        if self.normalized is not None:
            out["normalized"] = self.normalized
        return out


@dataclass(frozen=True)
class Ranking:
    """What one ranking rule did in one layer: how many it took, the cutoff score (the score of
    the last filter it took, normalised where across: entry) and, for a ranking across an entry,
    whether the layer's cap (max_fraction, never the whole layer) made it skip candidates."""

    rule: str
    order: str  # smallest | largest
    by: str
    across: str
    normalize: str | None
    requested: int  # of the layer (across: layer) or of the entry (across: entry)
    taken: int  # in this layer
    cutoff: float | None
    cap: int | None = None
    cap_bound: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "order": self.order, "by": self.by, "across": self.across,
                "normalize": self.normalize, "requested": self.requested, "taken": self.taken,
                "cutoff": self.cutoff, "cap": self.cap, "cap_bound": self.cap_bound}


@dataclass(frozen=True)
class LayerSelection:
    """The final selection of one layer: union of its entries' rules, after coupling, ranking,
    round_to and the guards."""

    path: str
    class_name: str
    n_filters: int
    options: Options
    max_fraction: float
    allow_empty_layer: bool
    entries: tuple[str, ...]  # locations of the layer entries that resolve to this layer
    by_rule: Mapping[str, tuple[int, ...]]  # rule location -> filters it selects here
    filters: Mapping[int, tuple[str, ...]]  # final filter -> every rule location selecting it
    stats: Mapping[int, Mapping[str, float]]  # kernel statistics of the final and kept-back filters
    group: tuple[str, ...] = ()  # coupled members (action: remove), this layer included
    kept_back: tuple[int, ...] = ()  # selected but kept for round_to
    ranked: Mapping[int, tuple[RankPick, ...]] = field(default_factory=dict)
    rankings: tuple[Ranking, ...] = ()
    # data statistics of every filter, where measured: {"at", "samples", "apoz", "activation_mean"}
    data: Mapping[str, Any] | None = None

    @property
    def family(self) -> Family:
        family = member_family_of(self.class_name)
        assert family is not None  # convolutions, and Dense layers as group members
        return family

    @property
    def listed(self) -> bool:
        """False for a coupled-group member that no entry names (it follows its group)."""
        return bool(self.entries)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": self.path, "layer_class": self.class_name, "filters_total": self.n_filters,
            "entries": list(self.entries), "options": asdict(self.options),
            "max_fraction": self.max_fraction,
            "rules": {loc: list(chosen) for loc, chosen in self.by_rule.items()},
            "selected": sorted(self.filters)}
        if self.rankings:
            out["rankings"] = [r.to_json() for r in self.rankings]
        if len(self.group) > 1:
            out["group"] = list(self.group)
        if self.kept_back:
            out["kept_back"] = list(self.kept_back)
        if self.data is not None:
            out["data_statistics"] = {"at": self.data["at"], "samples": self.data["samples"],
                                      **{k: [float(v) for v in self.data[k]] for k in DATA_KINDS}}
        return out


@dataclass(frozen=True)
class ModelSelection:
    layers: tuple[LayerSelection, ...]

    @property
    def removing(self) -> tuple[LayerSelection, ...]:
        return tuple(s for s in self.layers if s.options.action == "remove" and s.filters)

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.layers]


def select_model(job: ModelJob, weights: Any, data: DataProvider | None = None,
                 measure_all: bool = False) -> ModelSelection:
    """Evaluate every rule of `job` on the input model's weights and return the final, guarded
    selection of every layer (ModelError naming the model and layer for anything wrong).

    `data` measures data statistics (apoz, activation_mean) on the samples: for the layers whose
    rules use them, or with `measure_all` for every layer (plan shows them)."""
    try:
        return _Stage(job, weights, data, measure_all).run()
    except ModelError as exc:
        raise exc if exc.model else exc.for_model(job.name) from None


# --- the working state -----------------------------------------------------------------------


@dataclass
class _Layer:
    path: str
    class_name: str
    family: Family
    n: int
    stats: dict[str, np.ndarray]  # kernel statistics of every filter (float64)
    weights: Any  # the model's weights: kernels are read again when a rule needs the slices
    options: Options
    max_fraction: float
    allow_empty_layer: bool
    entries: list[str] = field(default_factory=list)
    by_rule: dict[str, list[int]] = field(default_factory=dict)
    group: list[str] = field(default_factory=list)
    ranked: dict[int, list[RankPick]] = field(default_factory=dict)
    rankings: list[Ranking] = field(default_factory=list)
    final: list[int] = field(default_factory=list)
    kept_back: list[int] = field(default_factory=list)
    # filter f is channel unit_of[f] of its coupled group's `units` channels (several filters
    # per channel: a depthwise layer with depth_multiplier > 1, or a layer its outputs meet;
    # only some of the channels: an input of a Concatenate inside the group); None outside
    # groups (filter f is channel f)
    unit_of: np.ndarray | None = None
    units: int = 0
    merges: list[str] = field(default_factory=list)  # the merges coupling its group, if any

    @property
    def channels(self) -> int:
        """Channels of its ranking unit (its group's, or its own filters)."""
        return self.n if self.unit_of is None else self.units

    @property
    def div(self) -> int:
        """d where filter f is channel f // d of all the group's channels (1 outside groups);
        0 where the layer covers only some of them (a Concatenate input)."""
        if self.unit_of is None:
            return 1
        d = self.n // self.units if self.units else 0
        uniform = d * self.units == self.n and np.array_equal(self.unit_of,
                                                              np.arange(self.n) // max(d, 1))
        return d if uniform else 0

    def per_channel(self) -> np.ndarray:
        """How many of its filters each channel of its unit stands for."""
        if self.unit_of is None:
            return np.ones(self.n, dtype=np.int64)
        return np.bincount(self.unit_of, minlength=self.units)

    def to_channels(self, filters: Iterable[int]) -> set[int]:
        if self.unit_of is None:
            return {int(f) for f in filters}
        return {int(self.unit_of[f]) for f in filters}

    def to_filters(self, channels: Iterable[int]) -> list[int]:
        if self.unit_of is None:
            return sorted(int(c) for c in channels)
        wanted = np.fromiter((int(c) for c in channels), dtype=np.int64)
        return [int(f) for f in np.flatnonzero(np.isin(self.unit_of, wanted))]

    @property
    def slices(self) -> np.ndarray:
        # not kept: holding every kernel of a ResNet50 would double the run's peak memory
        return self.family.filter_view(_kernel(self.weights, self.path, self.family))

    def selected(self) -> set[int]:
        return {f for chosen in self.by_rule.values() for f in chosen}

    def cap(self) -> int:
        """The most filters the guards allow this layer to lose."""
        cap = int(self.max_fraction * self.n + 1e-9)
        return cap if self.allow_empty_layer else min(cap, self.n - 1)


class _Stage:
    def __init__(self, job: ModelJob, weights: Any, data: DataProvider | None = None,
                 measure_all: bool = False):
        self.job = job
        self.weights = weights
        self.graph: LayerGraph = weights.graph
        self.layers: dict[str, _Layer] = {}
        self.resolved: list[tuple[LayerOp, list[str]]] = []
        self._bn: dict[str, np.ndarray] = {}
        self._provider = data
        self._measure_all = measure_all
        self._data: Mapping[str, Mapping[str, Any]] = {}
        self._group_errors: dict[str, ModelError] = {}

    def run(self) -> ModelSelection:
        for op in self.job.ops:
            paths = resolve(op, self.graph)
            self.resolved.append((op, paths))
            for path in paths:
                self._add_entry(op, path)
        self._form_groups()
        self._measure()
        # Rules that look at one layer first, then rankings across entries in spec order: a
        # global ranking's cap counts what the other rules already took, so it never pushes a
        # layer past its guard.
        for op, paths in self.resolved:
            for rule in op.rules:
                if not _across_entry(rule):
                    for path in paths:
                        self._apply(rule, self.layers[path])
        for op, paths in self.resolved:
            for rule in op.rules:
                if _across_entry(rule):
                    self._rank_entry(rule, paths)
        for layer in self.layers.values():
            layer.final = sorted(layer.selected())
        self._couple()
        for path, exc in self._group_errors.items():
            if self.layers[path].final:
                raise exc
        self._round_to()
        listed = [path for path, layer in self.layers.items() if layer.entries]
        for layer in self.layers.values():
            _check_guards(layer, listed)
        return ModelSelection(tuple(self._freeze(layer) for layer in self.layers.values()))

    # resolve + merge

    def _new_layer(self, path: str, options: Options, entries: list[str]) -> _Layer:
        node = self.graph.layers[path]
        family = member_family_of(node.class_name)
        assert family is not None
        kernel = _kernel(self.weights, path, family)
        return _Layer(path=path, class_name=node.class_name, family=family,
                      n=family.n_filters(kernel.shape),
                      stats=filter_stats(family.filter_view(kernel)), weights=self.weights,
                      options=options,
                      max_fraction=options.max_fraction,
                      allow_empty_layer=options.allow_empty_layer, entries=entries)

    def _add_entry(self, op: LayerOp, path: str) -> None:
        layer = self.layers.get(path)
        if layer is None:
            self.layers[path] = self._new_layer(path, op.options, [op.loc])
            return
        _agree(LAYER_OPTIONS, [(layer.entries[0], layer.options), (op.loc, op.options)],
               "for the same layer", layer=path, hint="give both entries the same value")
        layer.max_fraction = min(layer.max_fraction, op.options.max_fraction)
        layer.allow_empty_layer = layer.allow_empty_layer and op.options.allow_empty_layer
        layer.entries.append(op.loc)

    def _form_groups(self) -> None:
        """Coupled groups of the removing layers (DepGraph-style, from the config): unlisted
        members join with the options of the listed members of their own group."""
        done: set[str] = set()
        for path in list(self.layers):
            layer = self.layers[path]
            if layer.options.action != "remove" or path in done:
                continue
            # only here: a spec that removes nothing never imports removal (~7 ms)
            from kprune_batch.removal import group_of

            try:
                group = group_of(self.graph, path)
                members, merges = list(group.members), list(group.merges)
            except ModelError as exc:
                # e.g. its channels meet a depthwise layer's: only an error if the layer ends up
                # losing filters (a removal entry whose rules select nothing stays harmless)
                self._group_errors[path] = exc
                continue
            done.update(members)
            if len(members) == 1:
                continue
            listed = [self.layers[m] for m in members if m in self.layers]
            if group.normalized and not all(m.options.approximate for m in listed):
                # checked before unlisted members join: only an error if a member loses filters
                exc = ModelError(
                    f"its coupled group ({len(members)} layers) passes through "
                    f"LayerNormalization '{group.normalized[0]}', whose statistics change when "
                    f"channels go, so removal cannot equal zeroing", layer=path,
                    hint="set approximate: true to remove anyway (the deviation is measured "
                         "and recorded)")
                for m in listed:
                    self._group_errors[m.path] = exc
                continue
            _agree(GROUP_OPTIONS, [(m.entries[0], m.options) for m in listed],
                   f"in the coupled group of {group_text(members, [m.path for m in listed])}",
                   layer=path)
            for m in members:
                if m not in self.layers:
                    self.layers[m] = self._new_layer(m, listed[0].options, [])
                    self.layers[m].max_fraction = min(x.max_fraction for x in listed)
                    self.layers[m].allow_empty_layer = all(x.allow_empty_layer for x in listed)
                self.layers[m].group = list(members)
                self.layers[m].unit_of = np.asarray(group.unit_of[m], dtype=np.int64)
                self.layers[m].units = group.size
                self.layers[m].merges = merges
                if self.layers[m].n != len(group.unit_of[m]):
                    raise ModelError(f"the config gives the layer {len(group.unit_of[m])}"
                                     f" filters, its kernel {self.layers[m].n}", layer=m)

    def _measure(self) -> None:
        """Data statistics of every layer a data rule looks at (a ranking unit's coupled members
        too), in one call of the provider: one pass of the input model over the samples."""
        wanted: list[str] = []
        for op, paths in self.resolved:
            for rule in op.rules:
                if rule.kind in DATA_KINDS or (rule.kind in RANKING_KINDS
                                               and rule.params["by"] in DATA_KINDS):
                    for path in paths:
                        wanted += [m.path for m in self._unit(self.layers[path])]
        # plan measures every layer it can too (it shows them); apply only what rules use
        optional = list(self.layers) if self._measure_all else []
        if self._provider is None:
            if wanted:
                raise ModelError("data statistics (apoz, activation_mean) need the model's "
                                 "samples, and it has none", hint="give the model 'samples'")
            return
        if wanted or optional:
            self._data = self._provider(self.graph, list(dict.fromkeys(wanted)), optional)

    def _data_stat(self, kind: str, layer: _Layer) -> np.ndarray:
        values = np.asarray(self._data[layer.path][kind], dtype=np.float64)
        if values.shape != (layer.n,):
            raise ModelError(f"{kind} was measured on {values.size} channels at "
                             f"'{self._data[layer.path]['at']}', but the layer has {layer.n} "
                             f"filters", layer=layer.path,
                             hint="use a kernel statistic for this layer")
        return values

    # rules

    def _unit(self, layer: _Layer) -> list[_Layer]:
        """The layers whose channels a ranking scores together with `layer`'s: its coupled
        group under action: remove (so every listed member ranks the same channels), else it."""
        return [self.layers[m] for m in layer.group] if layer.group else [layer]

    def _scores(self, by: str, unit: list[_Layer], loc: str) -> np.ndarray:
        """Statistic `by` of each channel of a ranking unit: summed over a group's members, and
        over the filters of a member that are one channel (a depthwise multiplier's)."""
        total = np.zeros(unit[0].channels, dtype=np.float64)
        for layer in unit:
            try:
                if by == "bn_gamma":
                    values = self._bn_gamma(layer, loc)
                elif by in DATA_KINDS:
                    values = self._data_stat(by, layer)
                else:
                    check_finite(by, None, layer.stats)
                    values = layer.stats[by]
                # a filter adds to its channel (several to one: a depthwise multiplier's)
                total += np.bincount(layer.unit_of, weights=values, minlength=len(total)) \
                    if layer.unit_of is not None else values
            except RuleError as exc:
                raise ModelError(f"{loc}: {exc.message}", layer=layer.path, hint=exc.hint) from None
        return total

    def _bn_gamma(self, layer: _Layer, loc: str) -> np.ndarray:
        """|gamma| of the layer's BatchNormalization follower: the one `batchnorm: neutralize`
        edits (reached directly or through activation and zero-preserving layers)."""
        if layer.path not in self._bn:
            from kprune_batch.silence import channel_fate

            fate = channel_fate(self.graph, layer.path, 0, 0.0, True, self.weights.variables)
            followers = sorted(set(fate.followers))
            if len(followers) != 1:
                what = "no BatchNormalization follower" if not followers else \
                    f"{len(followers)} BatchNormalization followers ({', '.join(followers)})"
                raise ModelError(f"{loc}: bn_gamma needs the layer's one BatchNormalization "
                                 f"follower, but it has {what}", layer=layer.path,
                                 hint="rank this layer by a kernel statistic (l1, l2, ...)")
            variables = self.weights.variables(followers[0])
            if "gamma" not in variables:
                raise ModelError(f"{loc}: bn_gamma needs gamma, but BatchNormalization "
                                 f"'{followers[0]}' has scale=False", layer=layer.path,
                                 hint="rank this layer by a kernel statistic (l1, l2, ...)")
            gamma = np.abs(np.asarray(variables["gamma"], dtype=np.float64))
            if gamma.shape != (layer.n,):
                raise ModelError(f"{loc}: BatchNormalization '{followers[0]}' has "
                                 f"{gamma.size} gammas for {layer.n} filters", layer=layer.path)
            if not np.isfinite(gamma).all():
                bad = int(np.flatnonzero(~np.isfinite(gamma))[0])
                raise ModelError(f"{loc}: gamma of filter {bad} in '{followers[0]}' is NaN or "
                                 f"infinite; a bn_gamma rule cannot compare it",
                                 layer=layer.path)
            self._bn[layer.path] = gamma
        return self._bn[layer.path]

    def _apply(self, rule: RuleOp, layer: _Layer) -> None:
        """A rule that looks at one layer (or its coupled group): index, threshold, sign, or a
        ranking across: layer."""
        params = rule.params
        try:
            if rule.kind in RANKING_KINDS:
                chosen = self._rank_layer(rule, layer)
            elif rule.kind == "bn_gamma":
                chosen = threshold(self._bn_gamma(layer, rule.loc), params)
            elif rule.kind in DATA_KINDS:
                chosen = threshold(self._data_stat(rule.kind, layer), params)
            elif rule.kind in STAT_KINDS:
                check_finite(rule.kind, None, layer.stats)
                chosen = threshold(layer.stats[rule.kind], params)
            else:
                chosen = select(rule.kind, params, layer.slices)
        except RuleError as exc:
            raise ModelError(f"{rule.loc}: {exc.message}", layer=layer.path,
                             hint=exc.hint) from None
        layer.by_rule[rule.loc] = sorted(set(layer.by_rule.get(rule.loc, [])) | set(chosen))

    def _rank_layer(self, rule: RuleOp, layer: _Layer) -> list[int]:
        """The layer's k best channels (of its group under action: remove: fraction and count
        are of channels, each a depthwise multiplier's filters at once), as its filters."""
        p = rule.params
        scores = self._scores(p["by"], self._unit(layer), rule.loc)
        if layer.div > 1:  # the count is of channels, each several of the layer's filters
            k = budget(p, layer.channels, "the layer's coupled group",
                       f"channels ({layer.div} of the layer's {layer.n} filters each)")
        elif layer.div == 0:  # the layer has filters in only some of the group's channels
            k = budget(p, layer.channels, "the layer's coupled group",
                       f"channels (the layer's {layer.n} filters are "
                       f"{int(np.count_nonzero(layer.per_channel()))} of them)")
        else:
            k = budget(p, layer.channels)
        chosen = rank_order(scores, rule.kind)[:k].tolist()
        values = scores.tolist()  # the same floats as float(scores[c]), without a scalar each
        for position, c in enumerate(chosen, start=1):
            pick = RankPick(rule.loc, position, float(values[c]))
            for f in ([c] if layer.unit_of is None else layer.to_filters([c])):
                layer.ranked.setdefault(f, []).append(pick)
        layer.rankings.append(Ranking(
            rule=rule.loc, order=rule.kind, by=p["by"], across="layer", normalize=None,
            requested=k, taken=len(chosen),
            cutoff=float(scores[chosen[-1]]) if chosen else None))
        return layer.to_filters(chosen)

    def _rank_entry(self, rule: RuleOp, paths: list[str]) -> None:
        """One ranking over every layer the entry resolved to ("global pruning"). A coupled
        group is one unit (its channels scored by the sum over members, counted once); each
        unit's scores are normalised first; a unit never loses more than its cap allows."""
        p = rule.params
        units: list[list[_Layer]] = []
        seen: set[str] = set()
        for path in paths:
            if path in seen:
                continue
            unit = self._unit(self.layers[path])
            seen.update(m.path for m in unit)
            units.append(unit)
        raw = [self._scores(p["by"], unit, rule.loc) for unit in units]
        norm = [normalized(s, p["normalize"]) for s in raw]
        total = sum(len(s) for s in raw)
        try:
            if any(len(unit) > 1 for unit in units):  # a group's members count its channels once
                k = budget(p, total, f"the entry ({len(units)} ranking unit(s), a coupled group "
                                     f"being one)", "channels")
            else:
                k = budget(p, total, where=f"the entry ({len(units)} layer(s))")
        except RuleError as exc:
            raise ModelError(f"{rule.loc}: {exc.message}", hint=exc.hint) from None
        scores = np.concatenate(norm) if norm else np.zeros(0)
        unit_of = np.concatenate([np.full(len(s), i) for i, s in enumerate(raw)]) if raw \
            else np.zeros(0, dtype=np.int64)
        filter_of = np.concatenate([np.arange(len(s)) for s in raw]) if raw \
            else np.zeros(0, dtype=np.int64)
        # ties by filter index, lowest first, then by the layer's place in the entry
        order = rank_order(scores, rule.kind, tiebreak=filter_of * len(units) + unit_of)
        taken: list[set[int]] = [set() for _ in units]  # channels
        already = [set().union(*(m.to_channels(m.selected()) for m in unit)) for unit in units]
        # a channel costs each member the filters it stands for there; none may pass its cap
        per = [[m.per_channel() for m in unit] for unit in units]
        spent = [[int(p[sorted(already[u])].sum()) for p in per[u]] for u in range(len(units))]
        # per member: did its own cap (in its filters) stop a candidate (reported per layer)
        bound = [[False] * len(unit) for unit in units]
        position = 0
        cutoff = None
        # the walk below visits up to every filter of the entry (26,560 for ResNet50's convs):
        # its numbers as Python lists and the caps made once (tolist: the same floats and ints
        # as item by item), not a numpy scalar and a cap() per look
        member_caps = [[m.cap() for m in unit] for unit in units]
        per_list = [[p.tolist() for p in per[u]] for u in range(len(units))]
        raw_list, norm_list = [r.tolist() for r in raw], [n.tolist() for n in norm]
        score_list, unit_list, filter_list = scores.tolist(), unit_of.tolist(), filter_of.tolist()
        for i in order.tolist():
            if position == k:
                break
            u, f = int(unit_list[i]), int(filter_list[i])
            fresh = f not in already[u] and f not in taken[u]
            if fresh:
                after = [s + int(p[f]) for p, s in zip(per_list[u], spent[u])]
                over = [a > cap for a, cap in zip(after, member_caps[u])]
                if any(over):
                    bound[u] = [b or o for b, o in zip(bound[u], over)]
                    continue
                spent[u] = after
            position += 1
            taken[u].add(f)
            cutoff = float(score_list[i])
            pick = RankPick(rule.loc, position, float(raw_list[u][f]), float(norm_list[u][f]))
            for m in units[u]:
                for g in ([f] if m.unit_of is None else m.to_filters([f])):
                    m.ranked.setdefault(g, []).append(pick)
        for u, unit in enumerate(units):
            for j, m in enumerate(unit):
                mine = m.to_filters(taken[u])  # this member's filters of the channels taken
                if m.path in paths:  # a member outside the entry follows by coupling
                    m.by_rule[rule.loc] = sorted(set(m.by_rule.get(rule.loc, [])) | set(mine))
                # `requested` counts the entry's units (a group's channels once); `taken`, `cap`
                # and `cap_bound` are this layer's own, in its filters (a Concatenate input or a
                # depthwise member does not have one filter per group channel)
                m.rankings.append(Ranking(
                    rule=rule.loc, order=rule.kind, by=p["by"], across="entry",
                    normalize=p["normalize"], requested=k, taken=len(mine), cutoff=cutoff,
                    cap=member_caps[u][j], cap_bound=bound[u][j]))

    # couple, round, guard

    def _couple(self) -> None:
        """Every member of a coupled group ends with the same filters: union or intersection
        of what the listed members select; `coupled: error` refuses listed members that differ."""
        done: set[str] = set()
        for layer in self.layers.values():
            if not layer.group or layer.path in done:
                continue
            members = [self.layers[m] for m in layer.group]
            done.update(layer.group)
            listed = [m for m in members if m.entries]
            mode = listed[0].options.coupled
            values = [m.to_channels(m.final) for m in listed]
            supports = [m.to_channels(range(m.n)) for m in listed]
            chosen = _combine(values, supports, mode)
            if chosen is None:
                detail = [f"{m.path} ({m.entries[0]}) selects {_short(m.final)}"
                          for m in listed[:MAX_LISTED]]
                if len(listed) > MAX_LISTED:
                    detail.append(f"… and {len(listed) - MAX_LISTED} more")
                group = group_text(layer.group, [m.path for m in listed])
                # a depthwise layer and its producer share channels without any merge
                how = ("meet in an Add-type merge" if layer.merges else
                       "are coupled by a depthwise layer (its filters are its input's channels)")
                raise ModelError(
                    f"the layers {group} {how} and must lose the same "
                    f"filters, but their rules select different ones: {'; '.join(detail)}",
                    layer=listed[0].path,
                    hint="set coupled: union or coupled: intersection on the entries")
            if mode == "intersection" and not chosen and any(values):
                raise ModelError(f"the coupled layers {', '.join(layer.group)} have no filter in "
                                 f"common to remove (coupled: intersection)", layer=listed[0].path)
            for m in members:
                m.final = m.to_filters(chosen)

    def _round_to(self) -> None:
        """Keep selected filters back, largest l1 norm first (summed over a coupled group's
        members), until each removing layer's remaining count is a multiple of round_to (of
        channels, where a group's member has several filters per channel)."""
        done: set[str] = set()
        for layer in self.layers.values():
            step = layer.options.round_to
            if layer.options.action != "remove" or step <= 1 or layer.path in done:
                continue
            unit = self._unit(layer)
            done.update(m.path for m in unit)
            chosen = set(layer.to_channels(layer.final))
            for m in unit:  # a Concatenate input's final filters are some of the group's
                chosen |= m.to_channels(m.final)
            scores = self._scores("l1", unit, "round_to")
            # each member's channels (its own: a Concatenate input has only some of the
            # group's): every member's remaining count must be a multiple of round_to
            supports = [m.to_channels(range(m.n)) for m in unit]
            kept_back = []
            while True:
                short = [s for s in supports if chosen & s and len(s - chosen) % step]
                if not short:
                    break
                c = max(chosen & short[0], key=lambda g: (float(scores[g]), -g))
                chosen.remove(c)
                kept_back.append(c)
            for m in unit:
                m.final = m.to_filters(chosen)
                m.kept_back = m.to_filters(kept_back)

    def _freeze(self, layer: _Layer) -> LayerSelection:
        final = set(layer.final)
        group = set(layer.group) or {layer.path}
        filters = {}
        # a group member's filter is there because of every member's rules that chose its channel
        by_channel: dict[int, set[str]] = {}
        for m in group:
            member = self.layers[m]
            for loc, chosen in member.by_rule.items():
                for c in member.to_channels(chosen):
                    by_channel.setdefault(c, set()).add(loc)
        ordered: dict[frozenset[str], tuple[str, ...]] = {}  # most filters share their rules
        for f in layer.final:
            channel = f if layer.unit_of is None else int(layer.unit_of[f])
            locs = frozenset(by_channel.get(channel, ()))
            if locs not in ordered:
                ordered[locs] = tuple(sorted(locs, key=loc_key))
            filters[f] = ordered[locs]
        keep = sorted(final | set(layer.kept_back))
        data = self._data.get(layer.path)
        # a filter's record carries its data statistics where they were measured
        stats = {**layer.stats, **({k: self._data_stat(k, layer) for k in DATA_KINDS}
                                   if data is not None else {})}
        columns = {k: np.asarray(v).tolist() for k, v in stats.items()}
        return LayerSelection(
            path=layer.path, class_name=layer.class_name, n_filters=layer.n,
            options=layer.options, max_fraction=layer.max_fraction,
            allow_empty_layer=layer.allow_empty_layer, entries=tuple(layer.entries),
            by_rule={loc: tuple(layer.by_rule[loc]) for loc in sorted(layer.by_rule, key=loc_key)},
            filters=filters,
            # as Python floats (tolist: one conversion per array, not one numpy scalar a value);
            # a slice holding NaN/inf (selected by an index rule) has no statistic: null, since
            # the log is strict JSON and a NaN would stop it being written after the output was
            stats={f: {k: _finite_or_none(c[f]) for k, c in columns.items()} for f in keep},
            group=tuple(layer.group), kept_back=tuple(layer.kept_back),
            ranked={f: tuple(picks) for f, picks in layer.ranked.items() if f in final},
            rankings=tuple(layer.rankings), data=data)


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _combine(values: list[set[int]], supports: list[set[int]], mode: str) -> set[int] | None:
    """The channels a coupled group loses from its listed members' (`values`, each within its
    `supports`, the channels it has filters in): union, or the channels every member having
    filters in them selects (intersection); None where `error` and two members having filters
    in one channel disagree on it."""
    out = set()
    for c in set().union(*supports):
        votes = [c in v for v, s in zip(values, supports) if c in s]
        if mode == "error" and any(v != votes[0] for v in votes):
            return None
        if all(votes) if mode == "intersection" else any(votes):
            out.add(c)
    return out


def _across_entry(rule: RuleOp) -> bool:
    return rule.kind in RANKING_KINDS and rule.params.get("across") == "entry"


def _short(filters: list[int]) -> str:
    from kprune_batch.ranges import compact_ranges

    text = compact_ranges(filters) or "nothing"
    return text if len(text) <= 40 else text[:37] + "..."


def _agree(keys: tuple[str, ...], who: list[tuple[str, Options]], where: str,
           layer: str | None = None, hint: str = "give them the same value") -> None:
    """The one check that entries sharing a layer or a coupled group set the same options."""
    for key in keys:
        values = {}
        for loc, options in who:
            values.setdefault(getattr(options, key), loc)
        if len(values) > 1:
            (first, a), (second, b) = list(values.items())[:2]
            raise ModelError(f"{b} sets {key}: {_yaml(second)}, but {a} sets {key}: "
                             f"{_yaml(first)} {where}", layer=layer, hint=hint)


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def loc_key(loc: str) -> list[int]:
    """Sort key of a spec location: models[0].layers[10] after models[0].layers[9]."""
    return [int(part.split("]")[0]) for part in loc.split("[")[1:]]


def _kernel(weights: Any, path: str, family: Family) -> np.ndarray:
    variables = weights.variables(path)
    name = family.kernel_name(variables)
    if name is not None:
        return variables[name]
    raise ModelError(f"has no '{family.kernel_var}' variable (is it built?)", layer=path)


def group_text(members: list[str], listed: list[str]) -> str:
    """Members of a coupled group for one line: those the spec lists, then those that came with
    the group, each list capped ('a, b (listed) and c … and 40 more (came with the group)')."""
    named = [m for m in members if m in listed]
    came = [m for m in members if m not in listed]
    parts = [f"{name_list(named)} (listed)"] if named else []
    if came:
        parts.append(f"{name_list(came)} (came with the group)")
    return " and ".join(parts)


def _check_guards(layer: _Layer, listed: list[str] | None = None) -> None:
    """The guards, on the final selection (after coupling, ranking and round_to)."""
    count, total = len(layer.final), layer.n
    if not count:
        return
    rules = ", ".join(f"{loc} ({len(layer.by_rule[loc])})"
                      for loc in sorted(layer.by_rule, key=loc_key) if layer.by_rule[loc])
    if not layer.entries or len(layer.group) > 1:
        others = [m for m in layer.group if m != layer.path]
        rules = (f"{rules}; " if rules else "") + \
            f"coupled with {group_text(others, listed or [])}"
    if count == total and not layer.allow_empty_layer:
        raise ModelError(
            f"the rules would zero all {total} filters of the layer (selected by {rules})",
            layer=layer.path,
            hint="if that is intended, set allow_empty_layer: true (and max_fraction: 1.0) on "
                 "the entry")
    if count > layer.max_fraction * total + 1e-9:
        raise ModelError(
            f"the rules would zero {count} of {total} filters ({100.0 * count / total:.1f}%), "
            f"more than max_fraction {layer.max_fraction:g} allows "
            f"({int(layer.max_fraction * total + 1e-9)}); selected by {rules}",
            layer=layer.path, hint="tighten the rules or raise max_fraction for this entry")


def resolve(op: LayerOp, graph: LayerGraph) -> list[str]:
    """The layer paths a layer entry names (exact name) or matches (glob over convolution layers)."""
    if op.name is not None:
        if op.name not in graph.layers:
            near = difflib.get_close_matches(op.name, list(graph.layers), n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'?" if near else "run 'kprune plan' to list the layers"
            raise ModelError(f"{op.loc}: no layer named '{op.name}' in the model", hint=hint)
        node = graph.layers[op.name]
        if family_of(node.class_name) is None:
            raise ModelError(f"{op.loc}: layer '{op.name}' is a {node.class_name} layer; only "
                             f"convolution layers have filters")
        if op.type is not None and canonical_class(node.class_name) != canonical_class(op.type):
            raise ModelError(f"{op.loc}: layer '{op.name}' is a {node.class_name}, not a {op.type}")
        return [op.name]
    convs = [p for p, n in graph.layers.items() if family_of(n.class_name) is not None]
    typed = [p for p in convs if op.type is None
             or canonical_class(graph.layers[p].class_name) == canonical_class(op.type)]
    found = [p for p in typed if fnmatch.fnmatchcase(p, op.match or "")]
    if not found:
        near = difflib.get_close_matches(op.match or "", typed, n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'?" if near else (
            f"the model's convolution layers are: {', '.join(typed[:8])}"
            + (" ..." if len(typed) > 8 else "") if typed else "the model has no such layers")
        kind = f"{op.type} " if op.type else "convolution "
        raise ModelError(f"{op.loc}: match '{op.match}' matches no {kind}layer", hint=hint)
    return found
