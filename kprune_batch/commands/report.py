"""`kprune report AUDIT_LOG`: a human-readable review of one run (text, Markdown or JSON); no TensorFlow."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from kprune_batch.audit import read_log
from kprune_batch.commands import EXIT_FAILED, Result
from kprune_batch.errors import MAX_LISTED, AuditLogError, printable
from kprune_batch.logfacts import REMOVED, constant_text, filter_fates
from kprune_batch.ranges import compact_ranges


def summarize(log: dict[str, Any]) -> dict[str, Any]:
    """The facts a reviewer needs, as plain data (the json format; text and Markdown render it).

    What happened to each filter comes from logfacts.filter_fates (zeroed or removed), the
    reader diff uses too; a layer's `action` is what its filters underwent."""
    git = log["spec"]["git"]
    fates = filter_fates(log)
    by_layer: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in log["zeroed"] + log["removed"]:
        by_layer[(r["model"], r["layer"])].append(r)
    models = []
    for m in log["models"]:
        layers = []
        for sel in m["layers"]:
            fate = fates.get((m["name"], sel["layer"]), {})
            records = by_layer.get((m["name"], sel["layer"]), [])
            filters = sorted(fate)
            loud = [r for r in records if not r["silent"]]
            layers.append({
                "layer": sel["layer"], "layer_class": sel["layer_class"],
                "action": "remove" if REMOVED in fate.values() else "zero",
                "filters": filters, "ranges": compact_ranges(filters),
                "count": len(filters), "total": sel["filters_total"],
                "percent": round(100.0 * len(filters) / sel["filters_total"], 1),
                "rules": {loc: compact_ranges(chosen) for loc, chosen in sel["rules"].items()},
                "silent": len(records) - len(loud),
                "not_silent": [{"filter": r["filter"], "constant": r.get("constant")}
                               for r in loud],
            })
        removal = m.get("removal")
        models.append({"name": m["name"], "status": m["status"], "error": m["error"],
                       "input": m["input"]["path"],
                       "output": m["output"]["path"] if m["output"] else None,
                       "kept": bool(m["output"]) and m["output"].get("written") is False,
                       "zeroed": sum(layer["count"] for layer in layers
                                     if layer["action"] == "zero"),
                       "removed": sum(layer["count"] for layer in layers
                                      if layer["action"] == "remove"),
                       "removal": None if not removal else {
                           key: removal.get(key) for key in (
                               "params_before", "params_after", "macs_before", "macs_after",
                               "probe_deviation", "probe_ran_on", "optimizer_state", "kept_back")},
                       "layers": layers, "impact": m.get("impact")})
    return {"run_id": log["run_id"], "status": log["status"], "spec": log["spec"]["path"],
            "commit": git.get("commit"), "dirty": git.get("dirty"),
            "git_note": git.get("reason"), "started_at": log["started_at"],
            "tool": log["tool"], "models": models}


def _git_line(s: dict[str, Any]) -> str:
    if s["commit"] is None:
        return f"not in git ({s['git_note']})" if s["git_note"] else "not in git"
    state = "dirty" if s["dirty"] else "clean"
    note = f", {s['git_note']}" if s["git_note"] else ""
    return f"{s['commit'][:12]} ({state}{note})"


def _cell(value: Any) -> str:
    """A value as text on one line: control characters escaped (a newline in a layer name must
    not end the line and start what reads as another)."""
    return printable(str(value))


def _removal_line(removal: dict[str, Any]) -> str:
    out = f"params {removal['params_before']} -> {removal['params_after']}, MACs " \
          f"{removal['macs_before']} -> {removal['macs_after']}"
    if isinstance(removal["probe_deviation"], (int, float)):
        out += f", probe deviation {removal['probe_deviation']:.3g}"
        if removal.get("probe_ran_on") == "channels_last twin":
            out += " (on the channels_last twin)"
    kept = removal.get("kept_back") or {}
    if isinstance(kept, dict) and kept:  # selected but kept for round_to: a reviewer asks why
        # they are still there
        items = [f"{printable(str(layer))} {compact_ranges(list(filters))}"
                 for layer, filters in kept.items()]
        more = f" … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
        out += f"; kept back for round_to: {'; '.join(items[:MAX_LISTED])}{more}"
    return out


def _text(s: dict[str, Any]) -> list[str]:
    c = _cell
    lines = [f"run {c(s['run_id'])}: {s['status']}", f"spec: {c(s['spec'])} @ {c(_git_line(s))}",
             f"tool: kprune {c(s['tool']['version'])}, keras {c(s['tool']['keras'])}, "
             f"tensorflow {c(s['tool']['tensorflow'])}"]
    for m in s["models"]:
        lines.append("")
        kept = " (already held these bytes: left as it was)" if m["kept"] else ""
        lines.append(f"model {c(m['name'])}: {m['status']}  {c(m['input'])} -> "
                     f"{c(m['output'] or '-')}{kept}")
        if m["error"]:
            lines.append(f"  error: {c(m['error'])}")
        if m["removal"]:
            lines.append(f"  removal: {_removal_line(m['removal'])}")
        if m["impact"]:
            lines.extend(_impact_text(m["impact"]))
        for layer in m["layers"]:
            what = "removed " if layer["action"] == "remove" and layer["count"] else ""
            lines.append(f"  {c(layer['layer'])}: {what}{layer['ranges'] or 'nothing'} "
                         f"({layer['count']} of {layer['total']}, {layer['percent']}%)")
            for loc, ranges in layer["rules"].items():
                lines.append(f"    {c(loc)}: {ranges or 'nothing'}")
            if layer["not_silent"]:
                lines.append("    not silent: " + ", ".join(
                    f"{n['filter']} (constant {constant_text(n['constant'])})"
                    for n in layer["not_silent"]))
    return lines


def _markdown(s: dict[str, Any]) -> list[str]:
    lines = [f"### kprune run {_code(s['run_id'])}: **{s['status']}**", "",
             f"- spec: {_code(s['spec'])} at {_code(_git_line(s))}",
             f"- kprune {_md(s['tool']['version'])}, Keras {_md(s['tool']['keras'])}, "
             f"TensorFlow {_md(s['tool']['tensorflow'])}", ""]
    lines += ["| model | status | input | output | zeroed | removed |", "|---|---|---|---|---|---|"]
    for m in s["models"]:
        lines.append(f"| {_md(m['name'])} | {m['status']} | {_code(m['input'])} | "
                     f"{_code(m['output']) if m['output'] else '—'}"
                     f"{' (unchanged)' if m['kept'] else ''} | {m['zeroed']} | {m['removed']} |")
    lines.extend(_impact_markdown(s["models"]))
    for m in s["models"]:
        lines.append("")
        lines.append(f"#### {_md(m['name'])}")
        if m["error"]:
            lines += ["", f"> **error:** {_md(m['error'])}"]
            continue
        if m["removal"]:
            lines += ["", f"- removal: {_removal_line(m['removal'])}"]
        lines += ["", "| layer | action | filters | count | silent | rules |",
                  "|---|---|---|---|---|---|"]
        for layer in m["layers"]:
            rules = "<br>".join(f"{_code(loc)}: {r or 'nothing'}"
                                for loc, r in layer["rules"].items())
            silent = f"{layer['silent']}/{layer['count']}"
            if layer["not_silent"]:
                silent += " (not: " + ", ".join(f"{n['filter']}→{constant_text(n['constant'])}"
                                                for n in layer["not_silent"]) + ")"
            action = "removed" if layer["action"] == "remove" else "zeroed"
            lines.append(f"| {_code(layer['layer'])} | {action} | {layer['ranges'] or '—'} | "
                         f"{layer['count']} of {layer['total']} ({layer['percent']}%) | {silent} | "
                         f"{rules} |")
    return lines


def _guards(impact: dict[str, Any]) -> str:
    set_ = [f"{k} {v:g}" for k, v in impact["guards"].items() if v is not None]
    return ", ".join(set_) or "none"


def _impact_text(impact: dict[str, Any]) -> list[str]:
    """The impact of the edit on the samples: one line, the file, the guards, each output."""
    from kprune_batch.impact import describe

    samples = impact["samples"]
    lines = [f"  impact on {describe(impact)}",
             f"    samples: {_cell(samples['path'])} (sha256 {samples['sha256'][:12]})",
             f"    guards: {_guards(impact)}"]
    for out in impact.get("outputs", []):
        lines.append(f"    output {_cell(out['name'])}: {describe({**out, 'samples': samples})}")
    return lines


def _num(value: Any, pct: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100.0 * value:.1f}%" if pct else f"{value:.3g}"


def _impact_markdown(models: list[dict[str, Any]]) -> list[str]:
    """The impact table: a row per model measured on samples (and per output of a model with
    several), failed models included: a broken guard is why nothing was written."""
    measured = [m for m in models if m["impact"]]
    if not measured:
        return []
    lines = ["", "| model | samples | max abs diff | mean abs diff | relative diff | agreement | "
                 "accuracy before | accuracy after | guards |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in measured:
        imp = m["impact"]
        rows = [(_md(m["name"]), imp)] + [(f"{_md(m['name'])} / {_md(o['name'])}", o)
                                          for o in imp.get("outputs", [])]
        for name, r in rows:
            lines.append(f"| {name} | {imp['samples']['count']} | {_num(r['max_abs_diff'])} | "
                         f"{_num(r['mean_abs_diff'])} | {_num(r['relative_diff'])} | "
                         f"{_num(r['agreement'], True)} | {_num(r['accuracy_before'], True)} | "
                         f"{_num(r['accuracy_after'], True)} | {_md(_guards(imp))} |")
    return lines


def _md(text: Any) -> str:
    """Plain text in a Markdown table cell: one line, no cell break, no HTML."""
    return (_cell(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|"))


def _code(text: Any) -> str:
    """A name or path as a code span in a table cell: a fence longer than any backtick run in
    it (CommonMark), pipes escaped (GFM splits cells before reading code spans)."""
    value = _cell(text).replace("|", "\\|")
    run = max((len(r) for r in re.findall("`+", value)), default=0)
    pad = " " if run else ""  # a span may not start or end with its own fence's character
    return f"{'`' * (run + 1)}{pad}{value}{pad}{'`' * (run + 1)}"


def report(log_path: str, fmt: str = "text") -> Result:
    result = Result()
    try:
        log = read_log(log_path)
    except AuditLogError as exc:
        result.err.append(f"error: {exc.render()}")
        result.return_code = EXIT_FAILED
        return result
    if fmt == "html":  # the review page (it reads the run's unchanged inputs too)
        from kprune_batch.commands.review_page import render

        result.out.extend(render(log).splitlines())
        return result
    summary = summarize(log)
    if fmt == "json":
        result.data = summary
    elif fmt == "markdown":
        result.out.extend(_markdown(summary))
    else:
        result.out.extend(_text(summary))
    return result
