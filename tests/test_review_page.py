"""`kprune report LOG --format html`: the review page, rendered in a real headless browser
(Debian's chromium: .ci/run installs it)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import REPO, kprune, layer_weights, residual_model, write_spec
from kprune_batch.errors import printable

EXAMPLE = REPO / "specs" / "examples" / "digits.keras"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run "
                             "installs it)")
HOSTILE = "<i>x&amp;\"y'</i>\n\x1b[31m"


class Dom(HTMLParser):
    """Each layer block (data-layer) with the class of each of its filter cells, the texts of
    the page, and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[tuple[str, str], list[str]] = {}
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.hist_marks: dict[tuple[str, str], list[str]] = {}
        self._model = ""
        self._layer: tuple[str, str] | None = None
        self._in_text = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if "data-model" in a:
            self._model = a["data-model"] or ""
        if "data-layer" in a:
            self._layer = (self._model, a["data-layer"] or "")
            self.layers[self._layer] = []
            self.hist_marks[self._layer] = []
        if tag == "rect" and "data-filter" in a and self._layer is not None:
            self.layers[self._layer].append((a.get("class") or "").removeprefix("f "))
        self._in_text = tag == "text"

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_text and self._layer is not None:
            self.hist_marks[self._layer].append(data)

    def handle_endtag(self, tag: str) -> None:
        self._in_text = False


def parse(page: str) -> Dom:
    dom = Dom()
    dom.feed(page)
    return dom


def browse(page: Path, shot: Path) -> tuple[str, list[str]]:
    """(the DOM chromium built from `page`, its console lines), and a screenshot at `shot`."""
    assert CHROMIUM is not None
    base = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
            f"--user-data-dir={page.parent / 'chromium-profile'}", "--enable-logging=stderr",
            "--v=0"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True)
    snap = subprocess.run([*base, "--window-size=1200,1600", f"--screenshot={shot}",
                           page.as_uri()], capture_output=True, text=True, timeout=120,
                          check=True)
    console = [line for line in (dom.stderr + snap.stderr).splitlines()
               if "CONSOLE" in line or "Uncaught" in line or "Refused to" in line]
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return dom.stdout, console


def run(tmp_path: Path, spec_text: str, *args: str) -> tuple[dict[str, Any], Path]:
    spec = write_spec(tmp_path, spec_text)
    log = tmp_path / "log.json"
    kprune("apply", spec, "--audit-log", log, *args)
    return json.loads(log.read_text()), log


EXAMPLE_SPEC = f"""\
version: 1
models:
  - name: digits
    path: digits.keras
    layers:
      - name: conv1
        rules:
          - index: [4, 7]
      - match: "conv[23]"
        max_fraction: 0.25
        rules:
          - mean: {{below: -0.004}}
      - name: conv1
        rules:
          - sign: {{element: [0, 0, 0], zero: negative}}
  - name: {json.dumps(HOSTILE)}
    path: missing.keras
    layers: [{{name: conv1, rules: [{{index: [0]}}]}}]
"""


def expected_states(log: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """Every listed layer's filters as the log says: zeroed, removed, kept back or kept."""
    out = {}
    for model in log["models"]:
        for sel in model["layers"]:
            states = ["kept"] * sel["filters_total"]
            for f in sel.get("kept_back", []):
                states[f] = "kept-back"
            for kind in ("zeroed", "removed"):
                for r in log[kind]:
                    if (r["model"], r["layer"]) == (model["name"], sel["layer"]):
                        states[r["filter"]] = kind
            out[(printable(model["name"]), printable(sel["layer"]))] = states
    return out


@needs_browser
def test_the_page_of_a_run_renders_every_layer_in_a_real_browser(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "digits.keras")
    log, log_path = run(tmp_path, EXAMPLE_SPEC, "--backend", "direct")
    assert [m["status"] for m in log["models"]] == ["ok", "failed"]
    out = kprune("report", log_path, "--format", "html").expect(0)
    page = tmp_path / "page.html"
    page.write_text(out.stdout)
    # self-contained: nothing that could fetch (the CSP forbids it too)
    assert not re.search(r"https?:|<script|<link|<img|src=|url\(|@import", out.stdout)
    assert "Content-Security-Policy" in out.stdout
    dom_text, console = browse(page, tmp_path / "page.png")
    assert console == []
    dom = parse(dom_text)
    assert dom.layers == expected_states(log)
    # the threshold rule's histograms mark the threshold (read from the unchanged spec)
    assert dom.hist_marks[("digits", "conv2")][-1] == "below -0.004"
    assert dom.hist_marks[("digits", "conv1")] == []  # index and sign rules: no statistic
    # the failed model and its error, escaped (no <i> element, the name's text as printable)
    assert "i" not in dom.tags
    text = "".join(dom.text)
    error = log["models"][1]["error"]
    assert printable(error) in text and printable(HOSTILE) in text


@needs_browser
def test_the_browser_check_sees_console_errors(tmp_path: Path) -> None:
    """The control: a page that logs an error and throws is caught by `browse`."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('boom');"
                    "undefinedFunction();</script></body></html>")
    _, console = browse(page, tmp_path / "bad.png")
    assert any("boom" in line for line in console)
    assert any("Uncaught" in line for line in console)


def test_a_removal_run_shows_removed_kept_back_not_silent_and_the_cutoff(
        tmp_path: Path, small_cnn: Path) -> None:
    shutil.copy(small_cnn, tmp_path / "m.keras")
    log, log_path = run(tmp_path, """\
        version: 1
        models:
          - path: m.keras
            layers:
              - name: conv2d_1
                action: remove
                round_to: 2
                rules: [{smallest: {by: l1, count: 3}}]
              - name: conv2d
                bias: keep
                rules: [{index: [0, 1, 2]}]
        """)
    assert log["status"] == "ok", log["models"][0]["error"]
    states = expected_states(log)
    assert states[("m", "conv2d_1")].count("removed") == 2
    assert states[("m", "conv2d_1")].count("kept-back") == 1
    loud = [r for r in log["zeroed"] if not r["silent"]]  # relu(bias) > 0 of a kept bias
    assert loud
    page = kprune("report", log_path, "--format", "html").expect(0).stdout
    dom = parse(page)
    assert dom.layers == states
    (ranking,) = next(s for s in log["models"][0]["layers"] if s["layer"] == "conv2d_1")[
        "rankings"]
    assert dom.hist_marks[("m", "conv2d_1")][-1] == f"cutoff {ranking['cutoff']:.4g}"
    models_part = page[page.index('<section class="model"'):]  # after the legend's own dot
    assert models_part.count('class="loud" cx=') == len(loud)
    text = "".join(dom.text)
    for r in loud:
        assert (f"filter {r['filter']}: zeroed\nrules: {r['rules'][0]}\n" in text
                and f"not silent: constant output {r['constant']:.4g}" in text)


def test_names_are_escaped_everywhere(tmp_path: Path) -> None:
    """A crafted log whose model and layer names hold markup, quotes and control characters."""
    shutil.copy(EXAMPLE, tmp_path / "digits.keras")
    log, log_path = run(tmp_path, EXAMPLE_SPEC, "--backend", "direct")
    name, layer = "m<script>alert(1)</script>", "l\"'><b onmouseover=x>&amp;\nz"
    for m in log["models"]:
        if m["name"] == "digits":
            m["name"] = name
            m["layers"][0]["layer"] = layer
    for r in log["zeroed"]:
        r["model"] = name
        if r["layer"] == "conv1":
            r["layer"] = layer
    crafted = tmp_path / "crafted.json"
    crafted.write_text(json.dumps(log))
    page = kprune("report", crafted, "--format", "html").expect(0).stdout
    dom = parse(page)
    assert not dom.tags & {"script", "b", "i"}
    assert (printable(name), printable(layer)) in dom.layers
    assert "&lt;script&gt;" in page and "&quot;&#x27;&gt;&lt;b" in page


def test_the_impact_table_and_an_unreadable_log(tmp_path: Path) -> None:
    from kprune_batch.commands.review_page import Extra, render

    shutil.copy(EXAMPLE, tmp_path / "digits.keras")
    log, log_path = run(tmp_path, EXAMPLE_SPEC, "--backend", "direct")
    log["models"][0]["impact"] = {
        "samples": {"path": "/s/<calib>.npz", "sha256": "0" * 64, "count": 64},
        "max_abs_diff": 0.25, "mean_abs_diff": 0.01, "relative_diff": 0.03,
        "agreement": 0.984375, "accuracy_before": 0.9, "accuracy_after": 0.875,
        "guards": {"max_relative_diff": 0.05, "min_agreement": None, "max_accuracy_drop": 0.05}}
    page = render(log, Extra())
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", page)
    assert rows == [("max |Δ output|", "0.25", "—"), ("mean |Δ output|", "0.01", "—"),
                    ("relative difference", "0.03", "≤ 0.05"),
                    ("argmax agreement", "0.9844", "—"), ("accuracy before", "0.9", "—"),
                    ("accuracy after", "0.875", "drop ≤ 0.05")]
    assert "Impact on 64 samples (<code>/s/&lt;calib&gt;.npz</code>)" in page
    log_path.write_text("{")
    out = kprune("report", log_path, "--format", "html").expect(1)
    assert out.stdout == "" and out.stderr.startswith("error: ")


# --- red team (readers): both record kinds, a failed and an up-to-date model on one page -------

MIXED_SPEC = """\
version: 1
output_dir: out
models:
  - name: k
    path: rt.keras
    layers:
      - {name: c1, action: remove, coupled: union, rules: [{index: [1, 4]}]}
      - {name: ct, rules: [{smallest: {by: l2, count: 2}}]}
      - {name: nb, rules: [{index: [0]}]}
  - name: h
    path: rt.h5
    layers:
      - {name: dw, rules: [{l1: {below: THRESHOLD}}]}
  - name: gone
    path: missing.keras
    layers: [{name: c1, rules: [{index: [0]}]}]
"""


def test_a_page_of_zeroed_and_removed_filters_a_failed_and_an_unchanged_model(
        keras: Any, tmp_path: Path) -> None:
    residual_model(keras, tmp_path)
    weights = {name: layer_weights(keras, tmp_path / "rt.keras")[name]["kernel"]
               for name in ("ct", "dw")}
    ct = np.sqrt((weights["ct"].astype(np.float64) ** 2).sum(axis=(0, 1, 3)))  # filter axis -2
    dw = np.abs(weights["dw"].astype(np.float64)).reshape(9, -1).sum(axis=0)  # f = c * 2 + m
    expected = {("k", layer): ["kept"] * n for layer, n in
                (("c1", 8), ("c2", 8), ("dw", 16), ("ct", 6), ("nb", 5))}
    for layer, filters in (("c1", [1, 4]), ("c2", [1, 4]), ("dw", [2, 3, 8, 9])):
        for f in filters:  # the Add couples c1 and c2; the depthwise follows its channels
            expected[("k", layer)][f] = "removed"
    for f in np.argsort(ct, kind="stable")[:2]:  # ties: the lower index first
        expected[("k", "ct")][int(f)] = "zeroed"
    expected[("k", "nb")][0] = "zeroed"
    threshold = float(np.sort(dw)[3:5].mean())  # between the 4th and 5th smallest l1
    expected[("h", "dw")] = ["zeroed" if v < threshold else "kept" for v in dw]
    assert expected[("h", "dw")].count("zeroed") == 4
    spec = write_spec(tmp_path, MIXED_SPEC.replace("THRESHOLD", repr(threshold)))
    kprune("apply", spec, "--audit-log", tmp_path / "first.json").expect(1)
    kprune("apply", spec, "--audit-log", tmp_path / "again.json").expect(1)
    for log in ("first.json", "again.json"):
        page = kprune("report", tmp_path / log, "--format", "html").expect(0).stdout
        dom = parse(page)
        assert {key: [s.split()[0] for s in states] for key, states in dom.layers.items()} \
            == expected
        text = " ".join(dom.text)
        assert "model 'gone': input file " in text and "missing.keras does not exist" in text
        unchanged = text.count("(unchanged: already held these bytes)")
        assert unchanged == (2 if log == "again.json" else 0)
    if CHROMIUM is not None:  # both kinds and the error render without a console error
        (tmp_path / "page.html").write_text(page)
        dom_text, console = browse(tmp_path / "page.html", tmp_path / "page.png")
        assert console == []
        assert {key: [s.split()[0] for s in states]
                for key, states in parse(dom_text).layers.items()} == expected
