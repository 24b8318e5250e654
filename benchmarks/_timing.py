"""Timing for the benchmarks: a command's wall time and peak RSS, their median over runs, a model's latency."""
from __future__ import annotations

import compileall
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def child_env(**extra: str) -> dict[str, str]:
    """The environment the timed children run in, as an installed kprune runs: pip compiles a
    package's .pyc files when it installs it, so they are compiled here first and may be
    written (PYTHONDONTWRITEBYTECODE, set on some machines, would make every run of an
    editable checkout compile its modules again: ~0.07 s of each kprune run)."""
    import kprune_batch

    compileall.compile_dir(str(Path(kprune_batch.__file__).parent), quiet=1)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run `cmd` inside a fresh Python so that ru_maxrss of RUSAGE_CHILDREN is its own."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "s = time.perf_counter()\n"
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
               "w = time.perf_counter() - s\n"
               "assert r.returncode in (0,), r.stderr.decode()[-2000:]\n"
               "print(json.dumps([w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed: {out.stderr[-3000:]}")
    wall, rss_kb = json.loads(out.stdout.strip().splitlines()[-1])
    return wall, rss_kb / 1024.0


def median_run(cmds: list[list[str]], env: dict[str, str], runs: int) -> tuple[float, float]:
    """`runs` measured runs, `cmds` taken in turn: the median wall time (s) and the largest peak
    RSS (MB) of them."""
    samples = [measure(cmds[i % len(cmds)], env) for i in range(runs)]
    return statistics.median(s[0] for s in samples), max(s[1] for s in samples)


def print_table(runs: int, columns: list[str], rows: list[str]) -> None:
    """`rows` (cells from median_run) as a Markdown table for the README, under a line saying
    what a cell is."""
    print(f"runs per cell: {runs} (median wall time; peak RSS of the child process)\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    print("\n".join(rows))


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Run `cmd` once, output captured: its wall time (s) and the finished process, whatever its
    exit code (a benchmark may want to report a refusal rather than stop)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - start, proc


def latency(model: Any, batch: int, runs: int) -> float:
    """Median wall time (s) of `runs` predict_on_batch calls on a seeded normal batch of the
    model's input shape, after one warm-up call."""
    return latencies([model], batch, runs)[0]


def latencies(models: list[Any], batch: int, runs: int) -> list[float]:
    """latency() of each model, their calls taken in turn (one call of each model per round), so
    that load from other processes on a shared machine falls on all of them alike and their
    ratios stay comparable."""
    import numpy as np

    xs = [np.random.default_rng(0).normal(size=(batch, *m.input_shape[1:])).astype("float32")
          for m in models]
    # predict_on_batch: one forward pass. model.predict() was tried first and is not usable
    # here: after its first call it took 2.58 s at batch 32 for VGG16 with and without 25 % of
    # the filters removed (predict_on_batch: 2.38 s vs 1.36 s), so it hid the speed-up.
    for model, x in zip(models, xs):
        model.predict_on_batch(x)  # warm-up (traces the function)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for model, x, took in zip(models, xs, times):
            start = time.perf_counter()
            model.predict_on_batch(x)
            took.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
