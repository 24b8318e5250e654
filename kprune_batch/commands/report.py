"""`kprune report AUDIT_LOG`: a human-readable review of one run (text, Markdown or JSON); no TensorFlow."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from kprune_batch.audit import read_log
from kprune_batch.commands import EXIT_FAILED, Result
from kprune_batch.errors import AuditLogError
from kprune_batch.ranges import compact_ranges


def summarize(log: dict[str, Any]) -> dict[str, Any]:
    """The facts a reviewer needs, as plain data (the json format; text and Markdown render it)."""
    git = log["spec"]["git"]
    by_layer: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in log["zeroed"]:
        by_layer[(r["model"], r["layer"])].append(r)
    models = []
    for m in log["models"]:
        layers = []
        for sel in m["layers"]:
            records = by_layer.get((m["name"], sel["layer"]), [])
            filters = sorted(r["filter"] for r in records)
            loud = [r for r in records if not r["silent"]]
            layers.append({
                "layer": sel["layer"], "layer_class": sel["layer_class"],
                "filters": filters, "ranges": compact_ranges(filters),
                "count": len(filters), "total": sel["filters_total"],
                "percent": round(100.0 * len(filters) / sel["filters_total"], 1),
                "rules": {loc: compact_ranges(chosen) for loc, chosen in sel["rules"].items()},
                "silent": len(records) - len(loud),
                "not_silent": [{"filter": r["filter"], "constant": r.get("constant")}
                               for r in loud],
            })
        models.append({"name": m["name"], "status": m["status"], "error": m["error"],
                       "input": m["input"]["path"],
                       "output": m["output"]["path"] if m["output"] else None,
                       "kept": bool(m["output"]) and m["output"].get("written") is False,
                       "zeroed": sum(layer["count"] for layer in layers), "layers": layers})
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


def _text(s: dict[str, Any]) -> list[str]:
    lines = [f"run {s['run_id']}: {s['status']}", f"spec: {s['spec']} @ {_git_line(s)}",
             f"tool: kprune {s['tool']['version']}, keras {s['tool']['keras']}, "
             f"tensorflow {s['tool']['tensorflow']}"]
    for m in s["models"]:
        lines.append("")
        kept = " (already held these bytes: left as it was)" if m["kept"] else ""
        lines.append(f"model {m['name']}: {m['status']}  {m['input']} -> "
                     f"{m['output'] or '-'}{kept}")
        if m["error"]:
            lines.append(f"  error: {m['error']}")
        for layer in m["layers"]:
            lines.append(f"  {layer['layer']}: {layer['ranges'] or 'nothing'} ({layer['count']} of "
                         f"{layer['total']}, {layer['percent']}%)")
            for loc, ranges in layer["rules"].items():
                lines.append(f"    {loc}: {ranges or 'nothing'}")
            if layer["not_silent"]:
                lines.append("    not silent: " + ", ".join(
                    f"{n['filter']} (constant {n['constant']})" for n in layer["not_silent"]))
    return lines


def _markdown(s: dict[str, Any]) -> list[str]:
    lines = [f"### kprune run `{s['run_id']}`: **{s['status']}**", "",
             f"- spec: `{s['spec']}` at `{_git_line(s)}`",
             f"- kprune {s['tool']['version']}, Keras {s['tool']['keras']}, "
             f"TensorFlow {s['tool']['tensorflow']}", ""]
    lines += ["| model | status | input | output | zeroed |", "|---|---|---|---|---|"]
    for m in s["models"]:
        lines.append(f"| {m['name']} | {m['status']} | `{m['input']}` | "
                     f"{'`' + m['output'] + '`' if m['output'] else '—'}"
                     f"{' (unchanged)' if m['kept'] else ''} | {m['zeroed']} |")
    for m in s["models"]:
        lines.append("")
        lines.append(f"#### {m['name']}")
        if m["error"]:
            lines += ["", f"> **error:** {_md(m['error'])}"]
            continue
        lines += ["", "| layer | zeroed filters | count | silent | rules |",
                  "|---|---|---|---|---|"]
        for layer in m["layers"]:
            rules = "<br>".join(f"`{loc}`: {r or 'nothing'}" for loc, r in layer["rules"].items())
            silent = f"{layer['silent']}/{layer['count']}"
            if layer["not_silent"]:
                silent += " (not: " + ", ".join(f"{n['filter']}→{n['constant']}"
                                                for n in layer["not_silent"]) + ")"
            lines.append(f"| `{layer['layer']}` | {layer['ranges'] or '—'} | {layer['count']} of "
                         f"{layer['total']} ({layer['percent']}%) | {silent} | {rules} |")
    return lines


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def report(log_path: str, fmt: str = "text") -> Result:
    result = Result()
    try:
        summary = summarize(read_log(log_path))
    except AuditLogError as exc:
        result.err.append(f"error: {exc}")
        result.return_code = EXIT_FAILED
        return result
    if fmt == "json":
        result.out.extend(json.dumps(summary, indent=2).splitlines())  # one line per element
    elif fmt == "markdown":
        result.out.extend(_markdown(summary))
    else:
        result.out.extend(_text(summary))
    return result
