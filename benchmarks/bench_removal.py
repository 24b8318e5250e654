"""Benchmark: CPU latency before/after `action: remove` vs the MAC reduction; time to remove.

Run: python benchmarks/bench_removal.py [--runs 3] [--cache DIR]
For VGG16 and ResNet50 (weights=None, 224x224) it writes specs that remove 25 % and 50 % of the
filters of every conv by l1 ranking (index lists; a coupled group -- convs whose outputs meet in
an Add -- gets one ranking of its members' summed l1, so the group loses the same filters), and,
for ResNet50, once more for only the convs outside residual groups (each block's _1_conv and
_2_conv); with round_to 1 and 8; runs `kprune apply` (timed) and measures the median inference
latency (predict_on_batch) at batch 1 and 32 of the input and the output.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import child_env, latency, timed  # noqa: E402  (one harness for all benchmarks)


def removable(keras, model, scope: str) -> list[list[str]]:
    """Groups of convs that must lose the same filters (kprune's own coupled groups); scope
    'outside groups' keeps only the convs that are alone in theirs."""
    from kprune_batch.graph import build_graph
    from kprune_batch.removal import coupled_group

    graph = build_graph(keras.saving.serialize_keras_object(model))
    groups: list[list[str]] = []
    for layer in model.layers:
        if type(layer).__name__ == "Conv2D" and not any(layer.name in g for g in groups):
            groups.append(sorted(coupled_group(graph, layer.name)[0]))
    return [g for g in groups if scope == "every conv" or len(g) == 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kprune-bench"))
    args = parser.parse_args()
    import keras
    import numpy as np

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    env = child_env()
    rows = []
    cases = [("VGG16", "every conv"), ("ResNet50", "outside groups"), ("ResNet50", "every conv")]
    base: dict[str, dict[int, float]] = {}
    for name, scope in cases:
        path = cache / f"{name}.keras"
        if not path.exists():
            getattr(keras.applications, name)(weights=None).save(path)
        model = keras.saving.load_model(path)
        if name not in base:
            base[name] = {b: latency(model, b, args.runs) for b in (1, 32)}
        groups = removable(keras, model, scope)
        for fraction in (0.25, 0.5):
            for round_to in (1, 8):
                entries = []
                for group in groups:  # one l1 ranking per group, summed over its members
                    l1 = sum(np.abs(model.get_layer(m).kernel.numpy().astype(np.float64)).sum(
                        axis=(0, 1, 2)) for m in group)
                    k = int(len(l1) * fraction)
                    chosen = sorted(int(i) for i in np.argsort(l1, kind="stable")[:k])
                    entries += [f"      - {{name: {m}, action: remove, round_to: "
                                f"{round_to}, rules: [{{index: {chosen}}}]}}" for m in group]
                work = Path(tempfile.mkdtemp(prefix=f"bench-rm-{name}-"))
                spec = work / "spec.yaml"
                spec.write_text("version: 1\noutput_dir: out\ndefaults: {max_fraction: 0.75}\n"
                                f"models:\n  - path: {path}\n    layers:\n"
                                + "\n".join(entries) + "\n")
                took, proc = timed([sys.executable, "-m", "kprune_batch", "apply", str(spec),
                                    "--audit-log", str(work / "log.json")], env)
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr)
                removal = json.loads((work / "log.json").read_text())["models"][0]["removal"]
                pruned = keras.saving.load_model(work / "out" / f"{name}.keras")
                after = {b: latency(pruned, b, args.runs) for b in (1, 32)}
                mac_ratio = removal["macs_after"] / removal["macs_before"]
                shutil.rmtree(work)  # ~0.5 GB per VGG16 case: do not leave it in /tmp
                rows.append(
                    f"| {name} | {scope} | {int(fraction * 100)} % | {round_to} | {mac_ratio:.3f} | "
                    f"{after[1] / base[name][1]:.3f} | {after[32] / base[name][32]:.3f} | "
                    f"{(1 - after[32] / base[name][32]) / (1 - mac_ratio):.2f} | {took:.1f} | "
                    f"{removal['probe_deviation']:.1e} |")
    print(f"median of {args.runs} runs; latency ratios are after/before (predict_on_batch, CPU)\n")
    print("| model | convs | removed per layer | round_to | MACs after/before | latency b1 | latency b32 "
          "| latency cut / MAC cut (b32) | kprune apply s | probe deviation |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
