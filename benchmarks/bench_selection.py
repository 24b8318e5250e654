"""Benchmark: ranking rules on every conv layer (issue 13) vs the usual script vs a file copy.

Run: python benchmarks/bench_selection.py [--runs 3] [--cache DIR]
Builds ResNet50, MobileNetV2 and EfficientNetB0 (weights=None, 224x224) once into the cache
folder. For each, times in a fresh subprocess (so `import tensorflow` is paid where a real job
pays it): the usual script (load, per conv: l1 of every filter, zero the 25 % smallest kernel
slices and biases, set_weights, save), `kprune apply` with `smallest: {by: l1, fraction: 0.25}`
on every convolution layer (direct backend), `kprune plan` of the same spec, and a plain copy of
the file; for ResNet50 also one ranking across all its convs (`across: entry`). Reports medians,
ratios and the child's peak RSS (ru_maxrss) as a Markdown table for the README.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import child_env, median_run, print_table  # noqa: E402  (one harness for all benchmarks)
from bench_backends import COPY, build  # noqa: E402

USUAL = textwrap.dedent("""\
    import sys
    import numpy as np
    import keras
    src, dest = sys.argv[1], sys.argv[2]
    model = keras.saving.load_model(src)
    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    for layer in model.layers:
        if not isinstance(layer, convs):
            continue
        weights = layer.get_weights()
        kernel = weights[0]
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            flat = kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
        else:
            flat = kernel.reshape(-1, kernel.shape[-1])
        l1 = np.abs(flat.astype(np.float64)).sum(axis=0)
        worst = np.argsort(l1, kind="stable")[: int(0.25 * len(l1))]
        flat[:, worst] = 0
        weights[0] = flat.reshape(kernel.shape)
        if len(weights) > 1:
            weights[1][worst] = 0
        layer.set_weights(weights)
    model.save(dest)
""")

MODELS = ("ResNet50", "MobileNetV2", "EfficientNetB0")


def spec_text(path: Path, across: str) -> str:
    extra = ", across: entry" if across == "entry" else ""
    return (f"version: 1\noutput_dir: out\nmodels:\n  - path: {path}\n"
            f"    layers: [{{match: '*', rules: [{{smallest: {{by: l1, fraction: 0.25{extra}}}}}]}}]\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kprune-bench"))
    args = parser.parse_args()
    env = child_env()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    models = build(cache, env, MODELS)
    kprune = [sys.executable, "-m", "kprune_batch"]
    rows = []
    for name, path in models.items():
        work = Path(tempfile.mkdtemp(prefix=f"bench-sel-{name}-"))
        (work / "usual.py").write_text(USUAL)
        cases = [("25 % smallest l1, every conv", "layer")]
        if name == "ResNet50":
            cases.append(("25 % smallest l1, one ranking across all convs", "entry"))
        usual = [sys.executable, str(work / "usual.py"), str(path), str(work / "usual.keras")]
        base = median_run([usual], env, args.runs)[0]
        copy = median_run([[sys.executable, "-c", COPY, str(path), str(work / "copy.keras")]],
                          env, args.runs)[0]
        size = path.stat().st_size / 1e6
        rows.append(f"| {name} ({size:.0f} MB) | usual script | {base:.2f} | 1.000x | "
                    f"{base / copy:.1f}x | |")
        for label, across in cases:
            spec = work / f"{across}.yaml"
            spec.write_text(spec_text(path, across))
            for way, cmd in (
                    ("kprune apply (direct)", kprune + ["apply", str(spec), "--audit-log",
                                                        str(work / "log.json")]),
                    ("kprune plan", kprune + ["plan", str(spec)])):
                wall, rss = median_run([cmd], env, args.runs)
                rows.append(f"| {name} ({size:.0f} MB) | {way}: {label} | {wall:.2f} | "
                            f"{wall / base:.3f}x | {wall / copy:.1f}x | {rss:.0f} |")
        rows.append(f"| {name} ({size:.0f} MB) | plain file copy | {copy:.2f} | "
                    f"{copy / base:.3f}x | 1.0x | |")
    print_table(args.runs, ["model", "way", "wall s", "vs usual", "vs copy", "peak RSS MB"], rows)


if __name__ == "__main__":
    main()
