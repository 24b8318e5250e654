"""Benchmark: `action: remove` over the keras.applications zoo: params, MACs, removal time, latency.

Run: python benchmarks/bench_zoo.py [--runs 3] [--cache DIR] [--families VGG16,ResNet50,...]
[--approximate] [--batchnorm neutralize_concat]
Each family is built with weights=None at 224x224, its BatchNormalization moving statistics made
trained-looking with a seeded rng (as tests/test_zoo.py does), and saved as .keras in the cache.
One spec per family lists every convolution layer by name except those whose channels are the
model output (MobileNet's conv_preds, MobileNetV3Small's logits), each with
`smallest: {by: l1, fraction: 0.25}`, `action: remove`, `coupled: union`; one `kprune apply` per
family (timed). Params and MACs come from the audit log's `removal` block (params_after checked
against the written model's count_params()); latency is the median predict_on_batch at batch 32
of the input and the output model, their calls taken in turn. A family kprune refuses gets one
row with its first error line.
Prints a Markdown table for the README.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import child_env, latencies, timed  # noqa: E402  (one harness for all benchmarks)

FAMILIES = ["VGG16", "ResNet50", "ResNet50V2", "DenseNet121", "InceptionV3", "Xception",
            "MobileNet", "MobileNetV2", "MobileNetV3Small", "EfficientNetB0", "EfficientNetV2B0",
            "NASNetMobile", "ConvNeXtTiny"]
BATCH = 32
ERROR_CHARS = 220  # a refusal's line, shortened in the middle (its reason is at the end)


def cached_model(keras: Any, family: str, cache: Path) -> Path:
    """The family's .keras file in the cache, built (and BN statistics set) on first use."""
    import numpy as np

    path = cache / f"{family}.keras"
    if path.exists():
        return path
    model = getattr(keras.applications, family)(weights=None, input_shape=(224, 224, 3))
    rng = np.random.default_rng(19)
    # weights=None leaves moving_mean 0 and moving_variance 1: a removed channel's BN would
    # then fold to nothing, which no trained model does
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    model.save(path)
    return path


def conv_layers(keras: Any, model: Any) -> tuple[list[str], list[str]]:
    """(the convolution layer paths to prune, those left out because their channels are a model
    output), from kprune's own graph: a conv is left out when a path from it reaches the model
    output through layers that keep its channels (Reshape, Activation, Flatten, Dropout...)
    without meeting another layer with weights."""
    from kprune_batch.families import family_of, rows_consumer_of
    from kprune_batch.graph import OUTPUT, build_graph

    graph = build_graph(keras.saving.serialize_keras_object(model))
    convs = [p for p, n in graph.layers.items() if family_of(n.class_name) is not None]

    def reaches_output(path: str, seen: set[str]) -> bool:
        for consumer in graph.consumers(path):
            if consumer == OUTPUT:
                return True
            cls = graph.layers[consumer].class_name
            if consumer in seen or family_of(cls) is not None or rows_consumer_of(cls) is not None:
                continue
            seen.add(consumer)
            if reaches_output(consumer, seen):
                return True
        return False

    out = [p for p in convs if reaches_output(p, set())]
    return [p for p in convs if p not in out], out


def spec_text(path: Path, layers: list[str], approximate: bool = False,
              batchnorm: str | None = None) -> str:
    entries = "".join(f"      - {{name: '{name}', rules: [{{smallest: {{by: l1, fraction: 0.25}}}}]}}\n"
                      for name in layers)
    extra = (", approximate: true" if approximate else "") + (
        f", batchnorm: {batchnorm}" if batchnorm else "")
    return (f"version: 1\noutput_dir: out\ndefaults: {{action: remove, coupled: union{extra}}}\n"
            f"models:\n  - path: {path}\n    layers:\n" + entries)


def first_error(proc: Any, family: str) -> str:
    lines = [line.strip() for line in (proc.stderr + "\n" + proc.stdout).splitlines()]
    line = next((x for x in lines if x.startswith(("error", "Error")) or ": error" in x),
                next((x for x in lines if x), f"exit {proc.returncode}, no output"))
    line = line.replace(f"error: model '{family}', ", "")  # the row names the model already
    line = line.replace("|", "\\|")  # a Markdown cell
    half = (ERROR_CHARS - 1) // 2
    return line if len(line) <= ERROR_CHARS else line[:half] + "…" + line[-half:]


def bench(keras: Any, family: str, cache: Path, runs: int, env: dict[str, str],
          approximate: bool = False, batchnorm: str | None = None) -> str:
    path = cached_model(keras, family, cache)
    label = family + (" (approximate: true)" if approximate else "") + (
        f" (batchnorm: {batchnorm})" if batchnorm else "")
    model = keras.saving.load_model(path)
    layers, left_out = conv_layers(keras, model)
    params_input = int(model.count_params())
    work = Path(tempfile.mkdtemp(prefix=f"bench-zoo-{family}-"))
    try:
        (work / "spec.yaml").write_text(spec_text(path, layers, approximate, batchnorm))
        took, proc = timed([sys.executable, "-m", "kprune_batch", "apply", str(work / "spec.yaml"),
                            "--audit-log", str(work / "log.json")], env)
        kept_out = ", ".join(p.rsplit("/", 1)[-1] for p in left_out) or "–"
        if proc.returncode != 0:
            return (f"| {label} | {len(layers)} | {kept_out} | refused (exit {proc.returncode}, "
                    f"{took:.1f} s): {first_error(proc, family)} ||||||||")
        removal = json.loads((work / "log.json").read_text())["models"][0]["removal"]
        pruned = keras.saving.load_model(work / "out" / f"{family}.keras")
        counted = int(pruned.count_params())
        if counted != removal["params_after"] or params_input != removal["params_before"]:
            raise SystemExit(f"{family}: the log says params {removal['params_before']} -> "
                             f"{removal['params_after']}, the files have {params_input} -> "
                             f"{counted}")
        before, after = latencies([model, pruned], BATCH, runs)
        del model, pruned
        keras.backend.clear_session()
    finally:
        shutil.rmtree(work)  # ~0.5 GB for VGG16: do not leave it in /tmp
    p0, p1 = removal["params_before"], removal["params_after"]
    m0, m1 = removal["macs_before"], removal["macs_after"]
    return (f"| {label} | {len(layers)} | {kept_out} | {p0 / 1e6:.2f} M → {p1 / 1e6:.2f} M "
            f"({p1 / p0:.3f}) | {m0 / 1e9:.2f} G → {m1 / 1e9:.2f} G ({m1 / m0:.3f}) | {took:.1f} | "
            f"{before * 1e3:.0f} | {after * 1e3:.0f} | {after / before:.3f} | "
            f"{removal['probe_deviation']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="latency repetitions (median)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kprune-bench-zoo"))
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="comma-separated keras.applications constructors")
    parser.add_argument("--approximate", action="store_true",
                        help="approximate: true in the specs' defaults (inexact folds allowed, "
                             "the probe deviation measured and logged)")
    parser.add_argument("--batchnorm", choices=("neutralize", "neutralize_concat", "keep"),
                        help="batchnorm in the specs' defaults (neutralize_concat: also the "
                             "BatchNormalizations after Concatenates)")
    args = parser.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    import keras

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    env = child_env()
    rows = []
    for family in families:
        rows.append(bench(keras, family, cache, args.runs, env, args.approximate,
                          args.batchnorm))
        print(rows[-1], file=sys.stderr, flush=True)  # progress: a full run takes ~20 min
    print(f"latency: median of {args.runs} predict_on_batch calls at batch {BATCH} after a warm-up "
          f"(CPU; input and output model in turn); ratios are after/before\n")
    print("| model | convs pruned | left out (model output) | params before → after | "
          "MACs before → after | kprune apply s | latency b32 before ms | after ms | "
          "latency after/before | probe deviation |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
