"""Benchmark: `kprune verify` of direct-backend logs, before (Keras loads) and after (direct reader).

Run: python benchmarks/bench_verify.py --before DIR [--runs 3] [--cache DIR]
DIR is a checkout of the kprune to compare with (e.g. `git worktree add /tmp/before <commit>`);
the current checkout is the one this file lies in. Two logs, both written by `kprune apply
--backend direct`: ResNet50 (weights=None, from the cache folder bench_selection.py uses) with
`smallest: {by: l1, fraction: 0.25}` on every convolution (6,640 zeroed filters over 53 layers),
and a batch of 30 small models (bench_backends.small_batch). Each verify runs in a fresh
subprocess, with TensorFlow importable and with tensorflow, keras, jax and torch made
unimportable (a meta-path blocker in sitecustomize.py on PYTHONPATH, as tests/test_verify.py
does). Prints the median wall time and the peak RSS (ru_maxrss) as a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import child_env, median_run, print_table  # noqa: E402
from bench_backends import build, small_batch  # noqa: E402
from bench_selection import spec_text  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
BLOCKER = """\
import sys


class _NoFrameworks:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "keras", "jax", "torch"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        return None


sys.meta_path.insert(0, _NoFrameworks())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", required=True, help="a checkout of the kprune to compare with")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kprune-bench"))
    args = parser.parse_args()
    env = child_env(PYTHONPATH=str(HERE))
    cache, before = Path(args.cache).resolve(), Path(args.before).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    blocker = work / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    kprune = [sys.executable, "-m", "kprune_batch"]
    # `python -m` puts the current directory first on sys.path: run from the scratch folder,
    # or a checkout as the cwd would shadow the one PYTHONPATH names
    os.chdir(work)

    resnet = build(cache, env, ("ResNet50",))["ResNet50"]
    (work / "resnet").mkdir()
    (work / "resnet" / "spec.yaml").write_text(spec_text(resnet, "layer"))
    (work / "batch").mkdir()
    logs = {"ResNet50, every conv, 25 % smallest l1 (6,640 filters)": work / "resnet" / "log.json",
            "30 small models": work / "batch" / "log.json"}
    specs = [work / "resnet" / "spec.yaml", small_batch(work / "batch", env, n=30)]
    for spec, log in zip(specs, logs.values()):
        subprocess.run(kprune + ["apply", str(spec), "--backend", "direct", "--audit-log", str(log)],
                       check=True, env=env, stdout=subprocess.DEVNULL)

    rows = []
    for label, log in logs.items():
        for version, checkout in (("before", before), ("after", HERE)):
            for tf in ("importable", "not importable"):
                path = str(checkout) if tf == "importable" else f"{blocker}{os.pathsep}{checkout}"
                case_env = dict(env, PYTHONPATH=path)
                if version == "before" and tf == "not importable":
                    probe = subprocess.run(kprune + ["verify", str(log)], env=case_env,
                                           capture_output=True, text=True)
                    assert probe.returncode != 0
                    rows.append(f"| {label} | {version} | {tf} | fails (needs Keras) | |")
                    continue
                wall, rss = median_run([kprune + ["verify", str(log)]], case_env, args.runs)
                rows.append(f"| {label} | {version} | {tf} | {wall:.2f} | {rss:.0f} |")
    print_table(args.runs, ["log", "verify", "TensorFlow", "wall s", "peak RSS MB"], rows)


if __name__ == "__main__":
    main()
