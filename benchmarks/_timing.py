"""Timing for the benchmarks: a command's wall time and peak RSS, and their median over runs."""
from __future__ import annotations

import compileall
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


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
