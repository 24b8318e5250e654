"""`kprune report LOG --format html`: one self-contained review page of a run.

Per model and layer a strip of the layer's filters (kept / zeroed / removed / kept back, a dot on
a filter that is not silent; its statistics and rules in the tooltip), per rule that compares a
statistic a histogram of that statistic over the layer's filters with the threshold or the
ranking's cutoff marked, the impact table, and every error. No script, no external style, font
or image: the page carries a Content-Security-Policy that forbids fetching anything.

The audit log records the statistics of the filters a run edited, the rankings' cutoffs and
the data statistics (apoz, activation_mean) of every filter, but not the kernel statistics of
the kept filters nor the thresholds of threshold rules. Where the run's spec and input model are
still on disk with the sha256 the log gives, the page reads them for those (the spec's rules,
and each layer's kernel through the direct backend: h5py, no TensorFlow); otherwise it says what
it cannot show.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kprune_batch.errors import KpruneError, printable
from kprune_batch.logfacts import REMOVED, ZEROED, constant_text, filter_fates
from kprune_batch.ranges import compact_ranges

KERNEL_STATS = ("mean", "abs_mean", "l1", "l2")
DATA_STATS = ("apoz", "activation_mean")
KEPT, KEPT_BACK = "kept", "kept back"
STRIP_COLUMNS = 64  # filters per row of a strip
CELL_W, CELL_H = 11, 18


def esc(value: Any) -> str:
    """Text for HTML (element content or a quoted attribute): control characters shown as
    escapes (a name may hold a newline or ESC), then <, >, &, quotes as entities."""
    return html.escape(printable(str(value)), quote=True)


def num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- what the inputs add ---------------------------------------------------------------------


@dataclass
class Extra:
    """What the page read beside the log: each rule's kind and parameters (from the spec, if
    unchanged) and every filter's statistics per (model, layer) (from unchanged inputs)."""

    rules: dict[str, tuple[str, Any]] = field(default_factory=dict)
    spec_note: str | None = None
    stats: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    model_notes: dict[str, str] = field(default_factory=dict)


def read_inputs(log: dict[str, Any]) -> Extra:
    extra = Extra()
    spec = log["spec"]
    try:
        from kprune_batch.files import sha256_file
        from kprune_batch.plan import compile_plan
        from kprune_batch.spec import read_spec

        if sha256_file(spec["path"]) != spec["sha256"]:
            extra.spec_note = "the spec file changed since the run"
        else:
            for job in compile_plan(read_spec(spec["path"])).jobs:
                for op in job.ops:
                    for rule in op.rules:
                        extra.rules[rule.loc] = (rule.kind, rule.params)
    except (OSError, KpruneError) as exc:
        extra.spec_note = f"the spec cannot be read ({type(exc).__name__})"
    for model in log["models"]:
        if model["status"] == "ok" and model["layers"]:
            note = _model_stats(model, extra)
            if note:
                extra.model_notes[model["name"]] = note
    return extra


def _model_stats(model: dict[str, Any], extra: Extra) -> str | None:
    """Every filter's kernel statistics (and |gamma| where a rule ranks by bn_gamma) of the
    model's logged layers, read from its input if that is the file the run read."""
    from kprune_batch.files import sha256_file

    path, digest = model["input"]["path"], model["input"]["sha256"]
    try:
        if sha256_file(path) != digest:
            return "its input file changed since the run"
    except OSError:
        return "its input file is not there any more"
    try:
        from kprune_batch.backends.direct import DirectModelWeights
        from kprune_batch.families import family_of
        from kprune_batch.rules import filter_stats

        weights = DirectModelWeights(path, model["name"])
    except Exception as exc:  # noqa: BLE001 - a file the direct backend cannot prove
        return f"its input cannot be read without Keras ({type(exc).__name__})"
    try:
        for sel in model["layers"]:
            family = family_of(sel["layer_class"])
            if family is None:
                continue
            variables = weights.variables(sel["layer"])
            kernel = variables.get(family.kernel_name(variables) or family.kernel_var)
            if kernel is None:
                continue
            stats = filter_stats(family.filter_view(np.asarray(kernel)))
            if len(stats["l1"]) != sel["filters_total"]:
                return "its input does not fit the log"
            gamma = _bn_gamma(weights, sel["layer"], sel["filters_total"])
            if gamma is not None:
                stats["bn_gamma"] = gamma
            extra.stats[(model["name"], sel["layer"])] = stats
    except Exception as exc:  # noqa: BLE001 - a page without histograms, not a failed report
        return f"its input could not be read ({type(exc).__name__})"
    finally:
        weights.close()
    return None


def _bn_gamma(weights: Any, layer: str, n: int) -> np.ndarray | None:
    """|gamma| of the one BatchNormalization follower `neutralize` edits (selection's bn_gamma)."""
    from kprune_batch.silence import channel_fate

    try:
        followers = sorted(set(channel_fate(weights.graph, layer, 0, 0.0, True,
                                            weights.variables).followers))
        if len(followers) != 1:
            return None
        gamma = weights.variables(followers[0]).get("gamma")
    except Exception:  # noqa: BLE001 - no bn_gamma histogram then
        return None
    if gamma is None or np.shape(gamma) != (n,):
        return None
    return np.abs(np.asarray(gamma, dtype=np.float64))


# --- the page --------------------------------------------------------------------------------


STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em 2em;
color:#1d1d1f;background:#fff}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.2em;margin:1.6em 0 .3em;border-bottom:1px solid
#ddd}h3{font-size:1em;margin:1.2em 0 .3em}code{font:12px ui-monospace,Menlo,Consolas,monospace;
background:#f3f3f3;padding:0 .25em;border-radius:3px;white-space:pre-wrap;word-break:break-all}
.meta{color:#555;margin:.2em 0}.status{font-weight:600;padding:0 .4em;border-radius:3px}
.st-ok{background:#d8f0d8}.st-failed{background:#f8d4d4}.st-partial,.st-skipped{background:#f6e7c1}
.error{background:#fdecec;border-left:4px solid #d33;padding:.4em .7em;margin:.5em 0}
.note{color:#666;font-style:italic}.legend>span{display:inline-block;margin-right:1.2em}
.sw{display:inline-block;width:12px;height:12px;vertical-align:-2px;margin-right:.3em;
border:1px solid #999}.kept{fill:#dcdcdc}.zeroed{fill:#e4572e}.removed{fill:#6f2dbd}
.kept-back{fill:#f3c969}.sw.kept{background:#dcdcdc}.sw.zeroed{background:#e4572e}
.sw.removed{background:#6f2dbd}.sw.kept-back{background:#f3c969}
.loud{fill:#000;pointer-events:none}svg rect.f:hover{stroke:#000;stroke-width:1.5}
.layer{margin:.4em 0 1.2em 1em}.hists{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:.3em 0}figcaption{font-size:12px;color:#444;max-width:420px}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:.15em .5em;
text-align:left;font-size:13px}th{background:#f6f6f6}.bar{fill:#b9c3cf}.bar-sel{fill:#e4572e}
.cut{stroke:#111;stroke-width:1.5;stroke-dasharray:4 2}.axis{stroke:#888}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def render(log: dict[str, Any], extra: Extra | None = None) -> str:
    extra = read_inputs(log) if extra is None else extra
    fates = filter_fates(log)
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    for kind in (ZEROED, REMOVED):
        for r in log[kind]:
            records[(r["model"], r["layer"], int(r["filter"]))] = r
    git = log["spec"].get("git") or {}
    commit = git.get("commit")
    where = (f"{commit[:12]} ({'dirty' if git.get('dirty') else 'clean'})" if commit
             else "not in git")
    tool = log["tool"]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           # nothing may be fetched: no script, no external style, font or image
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
           'style-src \'unsafe-inline\'">',
           f"<title>kprune review: {esc(log['run_id'])}</title>",
           f"<style>{STYLE}</style>", "</head>", "<body>",
           f"<h1>kprune run <code>{esc(log['run_id'])}</code> "
           f"<span class=\"status st-{esc(log['status'])}\">{esc(log['status'])}</span></h1>",
           f"<p class=\"meta\">spec <code>{esc(log['spec']['path'])}</code> at {esc(where)} · "
           f"kprune {esc(tool.get('version'))}, Keras {esc(tool.get('keras'))}, "
           f"TensorFlow {esc(tool.get('tensorflow'))} · {esc(log['started_at'])} – "
           f"{esc(log['finished_at'])}</p>"]
    errors = [(m["name"], m["error"]) for m in log["models"] if m.get("error")]
    if errors:
        out.append('<section class="errors" id="errors"><h2>Errors</h2><ul>')
        out += [f'<li class="error">model <code>{esc(name)}</code>: {esc(error)}</li>'
                for name, error in errors]
        out.append("</ul></section>")
    if extra.spec_note:
        out.append(f'<p class="note">Thresholds are not shown: {esc(extra.spec_note)}.</p>')
    out.append('<p class="legend">' + "".join(
        f'<span><span class="sw {cls}"></span>{label}</span>' for cls, label in (
            ("kept", "kept"), ("zeroed", "zeroed"), ("removed", "removed"),
            ("kept-back", "kept back (round_to)"))) +
        '<span><svg width="12" height="12"><circle class="loud" cx="6" cy="6" r="3"/></svg> '
        'not silent</span></p>')
    for i, model in enumerate(log["models"]):
        out += _model(i, model, log, fates, records, extra)
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _model(i: int, model: dict[str, Any], log: dict[str, Any],
           fates: dict[tuple[str, str], dict[int, str]],
           records: dict[tuple[str, str, int], dict[str, Any]], extra: Extra) -> list[str]:
    name = model["name"]
    output = model["output"]["path"] if model.get("output") else "—"
    # a re-run that found the output already holding its bytes left it alone (report says so)
    kept = " (unchanged: already held these bytes)" \
        if model.get("output") and model["output"].get("written") is False else ""
    out = [f'<section class="model" id="model-{i}" data-model="{esc(name)}">',
           f"<h2>model <code>{esc(name)}</code> "
           f"<span class=\"status st-{esc(model['status'])}\">{esc(model['status'])}</span></h2>",
           f"<p class=\"meta\"><code>{esc(model['input']['path'])}</code> → "
           f"<code>{esc(output)}</code>{kept} · backend {esc(model.get('backend'))}</p>"]
    if model.get("error"):
        out.append(f'<p class="error">{esc(model["error"])}</p>')
    if name in extra.model_notes:
        out.append(f'<p class="note">Statistics of kept filters are not shown: '
                   f'{esc(extra.model_notes[name])}.</p>')
    removal = model.get("removal")
    if removal:
        out.append(f"<p>removal: parameters {num(removal.get('params_before'))} → "
                   f"{num(removal.get('params_after'))}, MACs {num(removal.get('macs_before'))} "
                   f"→ {num(removal.get('macs_after'))}, probe deviation "
                   f"{num(removal.get('probe_deviation'))}, optimizer state "
                   f"{esc(removal.get('optimizer_state'))}</p>")
    if model.get("impact"):
        out += _impact(model["impact"])
    for sel in model["layers"]:
        out += _layer(name, sel, fates.get((name, sel["layer"]), {}), records, extra)
    out.append("</section>")
    return out


IMPACT_ROWS = (("max_abs_diff", "max |Δ output|", None),
               ("mean_abs_diff", "mean |Δ output|", None),
               ("relative_diff", "relative difference", "max_relative_diff"),  # at most
               ("agreement", "argmax agreement", "min_agreement"),  # at least
               ("accuracy_before", "accuracy before", None),
               ("accuracy_after", "accuracy after", None))


def _impact(impact: dict[str, Any]) -> list[str]:
    outputs = impact.get("outputs") or []
    guards = impact.get("guards") or {}
    samples = impact.get("samples") or {}
    head = "".join(f"<th>{esc(o.get('name'))}</th>" for o in outputs)
    out = [f"<h3>Impact on {num(samples.get('count'))} samples "
           f"(<code>{esc(samples.get('path'))}</code>)</h3>",
           f'<table class="impact"><tr><th>measure</th><th>model</th>{head}<th>allowed</th></tr>']
    for key, label, guard in IMPACT_ROWS:
        allowed = None
        if guard and guards.get(guard) is not None:
            allowed = f"{'≤' if guard.startswith('max') else '≥'} {num(guards[guard])}"
        if key == "accuracy_after" and guards.get("max_accuracy_drop") is not None:
            allowed = f"drop ≤ {num(guards['max_accuracy_drop'])}"
        cells = "".join(f"<td>{num(o.get(key))}</td>" for o in outputs)
        out.append(f"<tr><td>{label}</td><td>{num(impact.get(key))}</td>{cells}"
                   f"<td>{'—' if allowed is None else allowed}</td></tr>")
    out.append("</table>")
    return out


def _layer(model: str, sel: dict[str, Any], fate: dict[int, str],
           records: dict[tuple[str, str, int], dict[str, Any]], extra: Extra) -> list[str]:
    n = sel["filters_total"]
    layer = sel["layer"]
    kept_back = set(sel.get("kept_back") or [])
    stats = dict(extra.stats.get((model, layer), {}))
    data = sel.get("data_statistics")
    if data:
        for key in DATA_STATS:
            if len(data.get(key) or []) == n:
                stats[key] = np.asarray(data[key], dtype=np.float64)
    states = []
    for f in range(n):
        states.append(fate.get(f) or (KEPT_BACK if f in kept_back else KEPT))
    edited = sum(1 for s in states if s in (ZEROED, REMOVED))
    verb = "removed" if REMOVED in states else "zeroed"
    out = [f'<div class="layer" data-layer="{esc(layer)}" data-filters="{n}">',
           f"<h3><code>{esc(layer)}</code> {esc(sel['layer_class'])} · {verb} {edited} of {n} "
           f"({100.0 * edited / n:.1f}%)"
           + (f" · kept back {len(kept_back)}" if kept_back else "") + "</h3>"]
    out += _strip(model, layer, n, states, records, stats)
    figures = []
    for loc, chosen in sel["rules"].items():
        figure = _histogram(loc, set(chosen), sel, stats, extra)
        if figure:
            figures += figure
    if figures:
        out += ['<div class="hists">', *figures, "</div>"]
    out.append('<table class="rules"><tr><th>rule</th><th>selects</th></tr>')
    for loc, chosen in sel["rules"].items():
        out.append(f"<tr><td><code>{esc(loc)}</code> {esc(_rule_text(loc, sel, extra))}</td>"
                   f"<td>{esc(compact_ranges(sorted(chosen)) or 'nothing')}</td></tr>")
    out += ["</table>", "</div>"]
    return out


def _strip(model: str, layer: str, n: int, states: list[str],
           records: dict[tuple[str, str, int], dict[str, Any]],
           stats: dict[str, np.ndarray]) -> list[str]:
    cols = min(n, STRIP_COLUMNS)
    rows = math.ceil(n / cols)
    out = [f'<svg class="strip" width="{cols * CELL_W}" height="{rows * CELL_H}" '
           f'role="img" aria-label="filters of {esc(layer)}">']
    for f, state in enumerate(states):
        x, y = (f % cols) * CELL_W, (f // cols) * CELL_H
        record = records.get((model, layer, f))
        tip = [f"filter {f}: {state}"]
        if record is not None:
            tip.append("rules: " + ", ".join(record["rules"]))
            for pick in record.get("ranking") or []:
                tip.append(f"ranked #{pick['position']} by {pick['rule']} "
                           f"(score {num(pick['score'])})")
            values = dict(record.get("stats") or {})
        else:
            values = {}
        for key, array in stats.items():
            values.setdefault(key, float(array[f]))
        if values:
            tip.append(", ".join(f"{k} {num(v)}" for k, v in values.items()))
        loud = record is not None and record.get("silent") is False
        if loud:
            tip.append(f"not silent: constant output {constant_text(record.get('constant'), num)}")
        cls = state.replace(" ", "-")
        out.append(f'<rect class="f {cls}" x="{x}" y="{y}" width="{CELL_W - 1}" '
                   f'height="{CELL_H - 1}" data-filter="{f}"><title>{"&#10;".join(map(esc, tip))}'
                   f"</title></rect>")
        if loud:
            out.append(f'<circle class="loud" cx="{x + (CELL_W - 1) / 2}" '
                       f'cy="{y + (CELL_H - 1) / 2}" r="2.5"/>')
    out.append("</svg>")
    return out


def _rule_text(loc: str, sel: dict[str, Any], extra: Extra) -> str:
    if loc in extra.rules:
        kind, params = extra.rules[loc]
        if isinstance(params, list):
            return f"{kind}: {compact_ranges(sorted(params))}"
        shown = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)
        return f"{kind}: {{{shown}}}"
    ranking = _ranking(loc, sel)
    if ranking:
        return f"{ranking['order']}: {{by: {ranking['by']}}}"
    return ""


def _ranking(loc: str, sel: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in sel.get("rankings") or [] if r["rule"] == loc), None)


def _histogram(loc: str, chosen: set[int], sel: dict[str, Any], stats: dict[str, np.ndarray],
               extra: Extra) -> list[str] | None:
    """The statistic the rule compared, over the layer's filters, with its threshold or cutoff."""
    ranking = _ranking(loc, sel)
    kind, params = extra.rules.get(loc, (None, None))
    mark: float | None = None
    if ranking is not None:
        by = ranking["by"]
        label = f"{ranking['order']} {ranking['taken']} by {by}"
        mark = ranking["cutoff"]
        scale_how = ranking.get("normalize") if ranking["across"] == "entry" else "none"
        if len(sel.get("group") or []) > 1:
            mark = None  # a coupled group ranks the sum over its members' scores
            label += " (the group's summed scores rank; this layer's own shown)"
        mark_label = "cutoff"
    elif kind in KERNEL_STATS + DATA_STATS + ("bn_gamma",) and isinstance(params, dict):
        by = kind
        bound = "below" if "below" in params else "above"
        mark = float(params[bound])
        label = f"{by} {bound} {num(mark)}"
        scale_how = "none"
        mark_label = bound
    else:
        return None
    values = stats.get(by)
    if values is None:
        return [f'<figure><figcaption><code>{esc(loc)}</code>: {esc(label)} — the values of '
                f'the kept filters are not available</figcaption></figure>']
    if scale_how in ("mean", "max"):
        from kprune_batch.rules import normalized

        values = normalized(values, scale_how)
        label += f" (normalised by the layer's {scale_how})"
    return [_histogram_svg(values, chosen, mark, mark_label, loc),
            f"<figcaption><code>{esc(loc)}</code>: {esc(label)}; {len(chosen)} selected"
            f"</figcaption></figure>"]


def _histogram_svg(values: np.ndarray, chosen: set[int], mark: float | None, mark_label: str,
                   loc: str) -> str:
    w, h, pad = 380, 120, 18
    finite = values[np.isfinite(values)]
    if not len(finite):
        return "<figure>"
    low, high = float(finite.min()), float(finite.max())
    data_low, data_high = low, high
    if mark is not None and math.isfinite(mark):
        low, high = min(low, mark), max(high, mark)
    if high - low <= 0:
        spread = abs(low) * 0.1 or 0.5
        low, high = low - spread, high + spread
    bins = int(min(40, max(8, math.ceil(math.sqrt(len(finite))))))
    width = (high - low) / bins
    if mark is not None and math.isfinite(mark) and low < mark < high:
        # a bin edge at the mark: no bar holds filters from both sides of the threshold
        low = mark - math.ceil((mark - low) / width) * width
        bins = max(1, math.ceil((high - low) / width - 1e-9))
        high = low + bins * width
    total = [0] * bins
    picked = [0] * bins
    for f, v in enumerate(values):
        if not math.isfinite(v):
            continue
        b = min(bins - 1, int((v - low) / width))
        total[b] += 1
        picked[b] += f in chosen
    top = max(total) or 1
    plot_h = h - 2 * pad
    bar_w = (w - 2) / bins
    parts = [f'<figure><svg class="hist" width="{w}" height="{h}" role="img" '
             f'aria-label="histogram for {esc(loc)}">']
    for b in range(bins):
        if not total[b]:
            continue
        x = 1 + b * bar_w
        th = plot_h * total[b] / top
        sh = plot_h * picked[b] / top
        tip = (f"{num(low + b * width)} to {num(low + (b + 1) * width)}: {total[b]} filters, "
               f"{picked[b]} selected by this rule")
        parts.append(f'<g><title>{esc(tip)}</title>'
                     f'<rect class="bar" x="{x:.2f}" y="{pad + plot_h - th:.2f}" '
                     f'width="{max(bar_w - 1, 1):.2f}" height="{th:.2f}"/>'
                     + (f'<rect class="bar-sel" x="{x:.2f}" y="{pad + plot_h - sh:.2f}" '
                        f'width="{max(bar_w - 1, 1):.2f}" height="{sh:.2f}"/>' if sh else "")
                     + "</g>")
    parts.append(f'<line class="axis" x1="0" y1="{pad + plot_h}" x2="{w}" y2="{pad + plot_h}"/>')
    def at(v: float) -> float:
        return 1 + (v - low) / (high - low) * (w - 2)

    # the smallest and largest value, where they are (the bins may reach beyond them)
    parts.append(f'<text x="{at(data_low):.2f}" y="{h - 3}">{num(data_low)}</text>'
                 f'<text x="{at(data_high):.2f}" y="{h - 3}" text-anchor="end">'
                 f'{num(data_high)}</text>')
    if mark is not None and math.isfinite(mark):
        x = at(mark)
        anchor = "end" if x > w / 2 else "start"
        parts.append(f'<line class="cut" x1="{x:.2f}" y1="{pad - 4}" x2="{x:.2f}" '
                     f'y2="{pad + plot_h}"/><text x="{x:.2f}" y="{pad - 6}" '
                     f'text-anchor="{anchor}">{esc(mark_label)} {num(mark)}</text>')
    parts.append("</svg>")
    return "".join(parts)

