"""`kprune plan SPEC`: compile the plan and show which filters each rule would zero (writes nothing)."""
from __future__ import annotations

from kprune_batch.commands import EXIT_FAILED, EXIT_INVALID, Result
from kprune_batch.errors import SpecError, name_list
from kprune_batch.executor import STATUS_OK, Opener, open_auto, run_job
from kprune_batch.plan import compile_plan
from kprune_batch.ranges import compact_ranges
from kprune_batch.selection import LayerSelection
from kprune_batch.spec import STDIN, read_spec_arg


def plan(spec_file: str, fmt: str = "text", opener: Opener = open_auto,
         base: str | None = None) -> Result:
    if base is not None:  # the plan of a spec change: the spec at `base` against the work tree
        from kprune_batch.commands.plan_diff import plan_diff

        if spec_file == STDIN:
            return Result(err=["error: --base compares a spec file with its committed version: "
                               "give the file, not '-' (stdin)"], return_code=EXIT_INVALID)

        return plan_diff(spec_file, base, fmt, opener=opener)
    result = Result()
    try:
        compiled = compile_plan(read_spec_arg(spec_file))
    except SpecError as exc:
        result.err.extend(exc.lines())
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
        result.data = {"plan": compiled.to_json(), "plan_sha256": compiled.sha256,
                       "models": models}
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
            lines.append(f"    {loc}: {compact_ranges(list(chosen)) or 'nothing'}")
            lines.extend(_ranking_lines(sel, loc))
        if not sel.listed:
            lines.append(f"    (not listed: follows its coupled group {', '.join(sel.group)})")
        elif len(sel.group) > 1:  # its channels are its group's: ranked and removed together
            others = [m for m in sel.group if m != sel.path]
            lines.append(f"    coupled with {name_list(others)}")
        if sel.kept_back:
            lines.append(f"    kept back for round_to: {compact_ranges(list(sel.kept_back))}")
        lines.extend(_data_lines(sel))
    return lines


def _data_lines(sel: LayerSelection) -> list[str]:
    """A layer's data statistics (plan with samples): where they were measured, their range over
    the filters, and the value of each selected filter (the first few)."""
    if sel.data is None:
        return []
    lines = [f"    data statistics on {sel.data['samples']} samples at '{sel.data['at']}':"]
    for kind in ("apoz", "activation_mean"):
        values = sel.data[kind]
        chosen = sorted(sel.filters)
        shown = ", ".join(f"{f}: {values[f]:.4g}" for f in chosen[:RANKED_SHOWN])
        more = f", ... {len(chosen) - RANKED_SHOWN} more" if len(chosen) > RANKED_SHOWN else ""
        lines.append(f"      {kind}: min {min(values):.4g}, mean {sum(values) / len(values):.4g}, "
                     f"max {max(values):.4g}" + (f"; selected {shown}{more}" if chosen else ""))
    return lines


RANKED_SHOWN = 8  # a ranking over thousands of filters shows its first few picks, then a count


def _ranking_lines(sel: LayerSelection, loc: str) -> list[str]:
    """What a ranking rule took in the layer, its cutoff, and its first picks with their scores."""
    lines = []
    for r in sel.rankings:
        if r.rule != loc:
            continue
        where = "per layer" if r.across == "layer" else f"across the entry, normalize {r.normalize}"
        cutoff = "no cutoff" if r.cutoff is None else f"cutoff {r.cutoff:.6g}"
        cap = f", cap {r.cap} bound" if r.cap_bound else ""
        of = "" if r.across == "layer" else " in the entry"
        lines.append(f"      {r.order} by {r.by} ({where}): took {r.taken} of {r.requested}"
                     f"{of}, {cutoff}{cap}")
        picks = sorted((p.position, f, p.score) for f, ps in sel.ranked.items() for p in ps
                       if p.rule == loc)
        shown = ", ".join(f"#{pos} filter {f} ({score:.6g})"
                          for pos, f, score in picks[:RANKED_SHOWN])
        more = f", ... {len(picks) - RANKED_SHOWN} more" if len(picks) > RANKED_SHOWN else ""
        if picks:
            lines.append(f"      ranked: {shown}{more}")
    return lines
