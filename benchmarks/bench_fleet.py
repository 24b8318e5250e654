"""Benchmark: one spec over many small models, and one over ResNet50 removals - serial vs
`--jobs 2` vs 2 shards in parallel vs `--ray` (a local Ray of this machine's CPUs) - and
`kprune merge` of 100 shard logs of 100 models each.

Run: python benchmarks/bench_fleet.py [--models 200] [--removals 20] [--shards 100]
[--per-shard 100] [--cache DIR]
The removal spec: 20 copies of ResNet50 (weights=None, 224x224, built once into the cache),
each removing the 25 % smallest-l1 filters of every bottleneck's first and second conv
(`*_1_conv`, `*_2_conv`: not coupled through the residual Adds) - the Keras backend, with the
removal's built-in proof.
Every run is a fresh `kprune apply` subprocess (default backend: auto, i.e. direct for these
models) into an empty output folder, timed from start to exit. The merge logs are synthetic
but schema-valid (each model entry and record is the real log's first, renamed and placed at
its spec position); merge is timed as the CLI (a subprocess) and in-process. Prints a Markdown
table for the README.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def build_model(path: Path) -> None:
    """A small CNN like the tests' (two convs with BN), saved as .keras."""
    from kprune_batch.quiet import import_keras

    keras = import_keras()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2d_1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv2d")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(path)


def write_spec(folder: Path, model: Path, n: int) -> Path:
    lines = ["version: 1", "output_dir: pruned", "models:"]
    for i in range(n):
        shutil.copy(model, folder / f"m{i}.keras")
        lines += [f"  - path: m{i}.keras",
                  f"    layers: [{{name: conv2d, rules: [{{index: [{i % 6}]}}]}}]"]
    spec = folder / "spec.yaml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


REMOVAL_LAYERS = ("'conv*_block*_1_conv'", "'conv*_block*_2_conv'")


def write_removal_spec(folder: Path, model: Path, n: int) -> Path:
    lines = ["version: 1", "output_dir: pruned", "models:"]
    for i in range(n):
        shutil.copy(model, folder / f"r{i}.keras")
        lines += [f"  - path: r{i}.keras", "    layers:"]
        lines += [f"      - {{match: {pattern}, action: remove, "
                  f"rules: [{{smallest: {{by: l1, fraction: 0.25}}}}]}}"
                  for pattern in REMOVAL_LAYERS]
    spec = folder / "removals.yaml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def resnet50(cache: Path) -> Path:
    path = cache / "ResNet50.keras"
    if not path.exists():
        from kprune_batch.quiet import import_keras

        keras = import_keras()
        cache.mkdir(parents=True, exist_ok=True)
        keras.applications.ResNet50(weights=None).save(path)
    return path


def strategies(folder: Path, spec: Path, log: Path) -> list[tuple[str, float]]:
    """Wall time of the spec run serially, with --jobs 2, as 2 parallel shards and with --ray."""
    rows = [("serial", timed(folder, ("apply", spec, "--audit-log", log))),
            ("--jobs 2", timed(folder, ("apply", spec, "--jobs", "2"))),
            ("2 shards in parallel (--shard 1/2, 2/2)",
             timed(folder, *(("apply", spec, "--shard", f"{k}/2") for k in (1, 2))))]
    if importlib.util.find_spec("ray"):
        rows.append(("--ray (local Ray, 2 CPUs; includes its ~4 s start)",
                     timed(folder, ("apply", spec, "--ray"))))
    else:
        rows.append(("--ray", float("nan")))
    return rows


def kprune(*args: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "kprune_batch", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed(folder: Path, *runs: tuple[Any, ...]) -> float:
    """Seconds until every one of the `runs` (started together) has exited 0."""
    shutil.rmtree(folder / "pruned", ignore_errors=True)
    start = time.perf_counter()
    procs = [kprune(*args) for args in runs]
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, err.decode()
    return time.perf_counter() - start


def synthetic_shards(template: dict[str, Any], folder: Path, shards: int,
                     per_shard: int) -> list[Path]:
    """`shards` shard logs of `per_shard` models each, built from a real log's first model."""
    from kprune_batch.audit import dumps_log

    model0 = template["models"][0]
    records0 = [r for r in template["zeroed"] if r["model"] == model0["name"]]
    paths = []
    for k in range(1, shards + 1):
        log = copy.deepcopy(template)
        log["shard"] = {"index": k, "count": shards}
        log["run_id"] = f"{template['run_id']}-{k}"
        log["models"], log["zeroed"] = [], []
        for j in range(per_shard):
            position = j * shards + k - 1
            name = f"m{position}"
            model = copy.deepcopy(model0)
            model["name"] = name
            model["input"]["path"] = f"/models/{name}.keras"
            model["output"]["path"] = f"/pruned/{name}.keras"
            model["output"]["sha256"] = hashlib.sha256(name.encode()).hexdigest()
            log["models"].append(model)
            for record in records0:
                log["zeroed"].append({**record, "model": name, "rules": [
                    loc.replace("models[0]", f"models[{position}]") for loc in record["rules"]]})
        path = folder / f"shard-{k}.json"
        path.write_text(dumps_log(log))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--removals", type=int, default=20)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "kprune-bench"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_model(folder / "small.keras")
        spec = write_spec(folder, folder / "small.keras", args.models)
        n = args.models
        log = folder / "serial.json"
        rows = strategies(folder, spec, log)
        removal_rows: list[tuple[str, float]] = []
        if args.removals:
            removals = write_removal_spec(folder, resnet50(Path(args.cache)), args.removals)
            removal_rows = strategies(folder, removals, folder / "removals.json")
            for i in range(args.removals):
                (folder / f"r{i}.keras").unlink()
        template = json.loads(log.read_text())
        logs = synthetic_shards(template, folder, args.shards, args.per_shard)
        merged = folder / "merged.json"
        start = time.perf_counter()
        proc = kprune("merge", *logs, "--output", merged)
        _, err = proc.communicate()
        assert proc.returncode == 0, err.decode()
        cli_merge = time.perf_counter() - start
        from kprune_batch.commands.merge import merge

        start = time.perf_counter()
        assert merge([str(p) for p in logs], str(folder / "merged2.json")).return_code == 0
        lib_merge = time.perf_counter() - start
        size = merged.stat().st_size / 1e6
    total = args.shards * args.per_shard
    print(f"| {n} small models | wall s | models/s |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {n / seconds:.1f} |")
    if removal_rows:
        print()
        print(f"| {args.removals} ResNet50 removals (224x224, Keras backend) | wall s | "
              f"s/model |")
        print("|---|---:|---:|")
        for name, seconds in removal_rows:
            print(f"| {name} | {seconds:.1f} | {seconds / args.removals:.2f} |")
    print()
    print(f"| merge {args.shards} shard logs x {args.per_shard} models ({total} models, "
          f"{size:.1f} MB merged) | s |")
    print("|---|---:|")
    print(f"| kprune merge (CLI, process start included) | {cli_merge:.2f} |")
    print(f"| merge() in-process | {lib_merge:.2f} |")


if __name__ == "__main__":
    main()
