"""Benchmark: the core install vs `[tensorflow]` (size, time), the pre-commit hook environment, and
`kprune validate` start-up with and without TensorFlow installed.

Run: python benchmarks/bench_install.py [--runs 5] [--skip-tensorflow] [--skip-hook]
Each install is a fresh `python3 -m venv` with `pip install --no-cache-dir` of this checkout (pip
reads wheels wherever its configuration points, a local mirror or PyPI: say which with the
numbers). Sizes are the venv's growth over an empty venv (du, apparent size of every file). The
hook is run for real as the README shows it (`repo:` this checkout, `rev:` its HEAD commit sha)
with `pre-commit run --all-files` in a temporary git repository holding a spec, its
`.pre-commit-config.yaml` and a CI workflow, with a fresh PRE_COMMIT_HOME (first run: clones and
builds the hook environment; later runs reuse it). HEAD is what pre-commit installs: commit first. Prints Markdown for the README.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "specs" / "examples" / "digits.yaml"


def du(path: Path) -> int:
    """Bytes of every regular file under `path` (symlinks not followed)."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def timed(cmd: list[str], **kwargs: object) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start


def install(root: Path, name: str, target: str) -> dict[str, object]:
    venv = root / name
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    empty = du(venv)
    seconds = timed([str(venv / "bin" / "pip"), "install", "--quiet", "--no-cache-dir", target],
                    cwd=REPO)
    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format", "freeze"],
                            capture_output=True, text=True, check=True).stdout.split()
    return {"venv": venv, "seconds": seconds, "bytes": du(venv) - empty,
            "packages": len(listed)}


def startup(venv: Path, runs: int) -> float:
    """Median wall time of `kprune validate` on the bundled example (one warm-up run first)."""
    cmd = [str(venv / "bin" / "kprune"), "validate", str(SPEC)]
    timed(cmd)
    return statistics.median(timed(cmd) for _ in range(runs))


def hook(root: Path, pre_commit: str, rev: str) -> dict[str, object]:
    """The README's hook example as written, `rev:` a commit sha (there are no release tags)."""
    repo = root / "spec-repo"
    (repo / "specs").mkdir(parents=True)
    (repo / ".github" / "workflows").mkdir(parents=True)
    for name in ("digits.yaml", "digits.keras", "digits_samples.npz"):
        shutil.copy(SPEC.parent / name, repo / "specs" / name)
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True,
                         text=True, check=True).stdout.strip()
    # not specs, and not read as specs: the default `files:` leaves them out
    (repo / ".pre-commit-config.yaml").write_text(
        f"repos:\n  - repo: {REPO}\n    rev: {sha}\n    hooks:\n      - id: kprune-validate\n")
    (repo / ".github" / "workflows" / "ci.yml").write_text(
        "on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps: [{run: 'true'}]\n")
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "specs"], check=True)
    home = root / "pre-commit-home"
    env = dict(os.environ, PRE_COMMIT_HOME=str(home))
    env.pop("PYTHONPATH", None)
    cmd = [pre_commit, "run", "--all-files", "--verbose"]
    start = time.perf_counter()
    first = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    first_s = time.perf_counter() - start
    again_s = []
    for _ in range(3):
        start = time.perf_counter()
        again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        again_s.append(time.perf_counter() - start)
    return {"passed": first.returncode == 0 and again.returncode == 0, "first": first_s, "again": statistics.median(again_s), "bytes": du(home),
            "tensorflow": any(home.glob("**/site-packages/tensorflow")), "sha": sha,
            "output": again.stdout}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-tensorflow", action="store_true")
    parser.add_argument("--skip-hook", action="store_true")
    parser.add_argument("--skip-installs", action="store_true")
    parser.add_argument("--rev", default="HEAD",
                        help="the commit the hook installs (e.g. one from before the core install)")
    parser.add_argument("--pre-commit", default=shutil.which("pre-commit") or "pre-commit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-install-") as tmp:
        root = Path(tmp)
        rows = [] if args.skip_installs else [("`pip install .` (core)",
                                                install(root, "core", "."))]
        if not args.skip_tensorflow and not args.skip_installs:
            rows.append(("`pip install '.[tensorflow]'`", install(root, "tf", ".[tensorflow]")))
        print(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)\n")
        if rows:
            print("| install | packages | installed size | install time | `kprune validate` "
                  f"start-up (median of {args.runs}) |")
            print("|---|---|---|---|---|")
        for label, r in rows:
            s = startup(r["venv"], args.runs)  # type: ignore[arg-type]
            print(f"| {label} | {r['packages']} | {r['bytes'] / 1e6:.0f} MB | "
                  f"{r['seconds']:.1f} s | {s:.3f} s |")
        if not args.skip_hook:
            h = hook(root, args.pre_commit, args.rev)
            print(f"\npre-commit hook (`rev: {h['sha'][:12]}...`, fresh PRE_COMMIT_HOME): "
                  f"{h['bytes'] / 1e6:.0f} MB, first `pre-commit run --all-files` "
                  f"{h['first']:.1f} s (clones and builds the environment), next runs "
                  f"{h['again']:.2f} s (median of 3); TensorFlow in it: {h['tensorflow']}; "
                  f"{'passed' if h['passed'] else 'FAILED'}")
            print("\n" + str(h["output"]).strip())


if __name__ == "__main__":
    main()
