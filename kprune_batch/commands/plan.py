"""`kprune plan SPEC`: compile the plan and show which filters each rule would zero (writes nothing)."""
from __future__ import annotations

import json

from kprune_batch.commands import EXIT_FAILED, EXIT_INVALID, Result
from kprune_batch.errors import SpecError
from kprune_batch.executor import STATUS_OK, LayerSelection, Opener, open_auto, run_job
from kprune_batch.plan import compile_plan
from kprune_batch.ranges import compact_ranges
from kprune_batch.spec import read_spec


def plan(spec_file: str, fmt: str = "text", opener: Opener = open_auto) -> Result:
    result = Result()
    try:
        compiled = compile_plan(read_spec(spec_file))
    except SpecError as exc:
        result.err.extend(p.render() for p in exc.problems)
        result.return_code = EXIT_INVALID
        return result
    models = []
    for job in compiled.jobs:
        outcome = run_job(job, opener=opener, write=False)
        models.append({"name": job.name, "status": outcome.status, "error": outcome.error,
                       "layers": [sel.to_json() for sel in outcome.layers],
                       "removal_touches": outcome.touched})
        if outcome.status != STATUS_OK:
            result.return_code = EXIT_FAILED
            result.err.append(f"error: {outcome.error}")
        if fmt == "text":
            result.out.extend(_text(job.name, job.input, job.output, outcome.status,
                                    outcome.layers))
            if outcome.touched:
                from kprune_batch.removal import describe

                result.out.append("  removal touches:")
                result.out.extend(f"    {describe(t)}" for t in outcome.touched)
    if fmt == "json":
        result.out.append(json.dumps({"plan": compiled.to_json(), "plan_sha256": compiled.sha256,
                                      "models": models}, indent=2))
    return result


def _text(name: str, src: str, dest: str, status: str, layers: list[LayerSelection]) -> list[str]:
    lines = [f"model {name}: {src} -> {dest}" + ("" if status == STATUS_OK else "  [FAILED]")]
    for sel in layers:
        n = len(sel.filters)
        verb = "remove" if sel.options.action == "remove" else "zero"
        lines.append(f"  {sel.path} ({sel.class_name}, {sel.n_filters} filters): would {verb} "
                     f"{compact_ranges(list(sel.filters)) or 'nothing'} "
                     f"({n} of {sel.n_filters}, {100.0 * n / sel.n_filters:.1f}%)")
        for loc, chosen in sel.by_rule.items():
            lines.append(f"    {loc}: {compact_ranges(chosen) or 'nothing'}")
    return lines
