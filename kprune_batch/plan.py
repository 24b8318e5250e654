"""The plan: a validated spec compiled to pure, frozen, JSON-serialisable jobs (no model is opened)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from kprune_batch.spec import OPTION_KEYS, STDIN, STDIN_NAME, Spec, check_output_dir

PLAN_VERSION = 1


@dataclass(frozen=True)
class Options:
    """Every per-layer option with its effective value (defaults written out)."""

    bias: str
    batchnorm: str
    max_fraction: float
    allow_empty_layer: bool
    action: str
    coupled: str
    approximate: bool
    round_to: int


@dataclass(frozen=True)
class RuleOp:
    loc: str  # models[i].layers[j].rules[k]: the rule's place in the spec, also used in the audit log
    kind: str
    params: Any


@dataclass(frozen=True)
class LayerOp:
    loc: str  # models[i].layers[j]
    name: str | None
    match: str | None
    type: str | None
    options: Options
    rules: tuple[RuleOp, ...]

    @property
    def selector(self) -> str:
        what = f"name '{self.name}'" if self.name is not None else f"match '{self.match}'"
        return what + (f" type {self.type}" if self.type else "")


@dataclass(frozen=True)
class ImpactGuards:
    """A model's effective impact guards (its own keys over defaults.impact); None: not set."""

    max_relative_diff: float | None = None
    min_agreement: float | None = None
    max_accuracy_drop: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass(frozen=True)
class ModelJob:
    loc: str  # models[i]
    name: str
    input: str  # absolute path
    output: str  # absolute path
    format: str  # "keras" or "h5": the output keeps the input's format
    ops: tuple[LayerOp, ...]
    samples: str | None = None  # absolute path of the samples file (.npy or .npz)
    impact: ImpactGuards = ImpactGuards()
    sha256: str | None = None  # models[].sha256: the input must have this hash (pinned)
    path_in_spec: str = ""  # the input's `path` as the spec writes it (for messages)


@dataclass(frozen=True)
class Plan:
    version: int
    spec_path: str
    spec_sha256: str
    output_dir: str
    jobs: tuple[ModelJob, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists), exactly what json.dumps writes."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON form: two runs of one plan are recognisable in audit logs."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def model_format(path: str) -> str:
    return "keras" if path.endswith(".keras") else "h5"


def compile_plan(spec: Spec, output_dir: str | None = None) -> Plan:
    """Compile `spec` into a Plan. `output_dir` (from --output-dir) overrides the spec's."""
    if output_dir is not None:
        output_dir = os.path.abspath(output_dir)
        check_output_dir(spec, output_dir)
    out_dir = output_dir or spec.output_dir
    defaults = dict(spec.defaults)
    jobs = []
    for model in spec.models:
        ops = []
        for entry in model.layers:
            effective = {k: dict(entry.options).get(k, defaults[k]) for k in OPTION_KEYS}
            effective["max_fraction"] = float(effective["max_fraction"])
            ops.append(LayerOp(
                loc=entry.loc, name=entry.name, match=entry.match, type=entry.type,
                options=Options(**effective),
                rules=tuple(RuleOp(r.loc, r.kind, _freeze(r.params)) for r in entry.rules)))
        jobs.append(ModelJob(loc=model.loc, name=model.name, input=model.path,
                             output=spec.output_path(model, out_dir),
                             format=model_format(model.path), ops=tuple(ops),
                             sha256=model.sha256, path_in_spec=model.path_in_spec,
                             samples=model.samples,
                             impact=ImpactGuards(**{k: None if v is None else float(v)
                                                    for k, v in model.impact})))
    # a spec read from stdin has no path: the plan (and the audit log) say '-'
    spec_path = STDIN if spec.file == STDIN_NAME else os.path.abspath(spec.file)
    return Plan(version=PLAN_VERSION, spec_path=spec_path,
                spec_sha256=spec.sha256, output_dir=out_dir, jobs=tuple(jobs))


RANKING_DEFAULTS = {"fraction": None, "count": None, "across": "layer", "normalize": "mean"}


def _freeze(params: Any) -> Any:
    """Rule parameters as plain JSON values (index lists as lists of ints, thresholds as floats,
    a ranking with every default written out)."""
    if isinstance(params, list):
        return [int(i) for i in params]
    if "by" in params:
        out = {"by": params["by"], **RANKING_DEFAULTS, **params}
        out["fraction"] = None if out["fraction"] is None else float(out["fraction"])
        out["count"] = None if out["count"] is None else int(out["count"])
        return out
    out = {}
    for key, value in params.items():
        if key in ("below", "above"):
            out[key] = float(value)
        elif key == "element":
            out[key] = [int(i) for i in value]
        else:
            out[key] = value
    return out
