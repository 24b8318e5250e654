"""Benchmark: the usual load/set_weights/save script vs `kprune apply` (direct backend) vs a copy.

Run: python benchmarks/bench_backends.py [--runs 3] [--cache DIR] [--batch-only]
Builds ResNet50 and VGG16 (weights=None, 224x224) once into the cache folder, then times each
way in a fresh subprocess (so `import tensorflow` is paid where a real job pays it) and reports
medians, ratios and the child's peak RSS (ru_maxrss). Also times a batch of 100 small models
with `--jobs 1` and `--jobs 2` (alternated, each run into an empty output folder; --batch-only
times just that). Prints a Markdown table for the README. Two reference rows price kprune's own
guarantees without kprune: a durable, atomic copy, and one sha256 of the file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import child_env, measure, median_run, print_table  # noqa: E402  (one harness)

USUAL = textwrap.dedent("""\
    import sys
    import keras
    src, dest = sys.argv[1], sys.argv[2]
    model = keras.saving.load_model(src)
    layer = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)][0]
    kernel, bias = layer.get_weights()
    kernel[..., 0] = 0
    bias[0] = 0
    layer.set_weights([kernel, bias])
    model.save(dest)
""")

COPY = "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])"

# What kprune's own guarantees cost without kprune: the copy made durable and atomic as kprune
# writes it (temp file beside it, fsync, rename over the previous one), and one sha256 of the
# file (kprune computes two: the input's and the output's).
DURABLE_COPY = textwrap.dedent("""\
    import os, shutil, sys, tempfile
    src, dest = sys.argv[1], sys.argv[2]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)))
    os.close(fd)
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
""")
SHA256 = textwrap.dedent("""\
    import hashlib, sys
    digest = hashlib.sha256()
    with open(sys.argv[1], "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    print(digest.hexdigest())
""")


def build(cache: Path, env: dict[str, str],
          names: tuple[str, ...] = ("ResNet50", "VGG16")) -> dict[str, Path]:
    """keras.applications models (weights=None, 224x224) saved once into the cache folder."""
    paths = {name: cache / f"{name}.keras" for name in names}
    missing = [n for n, p in paths.items() if not p.exists()]
    if missing:
        for name in missing:
            subprocess.run([sys.executable, "-c",
                            f"import keras; keras.applications.{name}(weights=None)"
                            f".save({str(paths[name])!r})"], check=True, env=env,
                           stderr=subprocess.DEVNULL)
    return paths


def small_batch(folder: Path, env: dict[str, str], n: int = 100) -> Path:
    code = textwrap.dedent(f"""\
        import keras
        i = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(8, 3, name="c1")(i)
        x = keras.layers.BatchNormalization(name="bn")(x)
        m = keras.Model(i, keras.layers.Conv2D(8, 3, name="c2")(x))
        m.save({str(folder / 'm0.keras')!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, stderr=subprocess.DEVNULL)
    lines = ["version: 1", "output_dir: out", "models:"]
    for i in range(n):
        if i:
            shutil.copyfile(folder / "m0.keras", folder / f"m{i}.keras")
        lines += [f"  - path: m{i}.keras", "    layers: [{name: c1, rules: [{index: [1, 2]}]}]"]
    spec = folder / "batch.yaml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def batch_lines(env: dict[str, str], runs: int) -> list[str]:
    """The 100-model batch with --jobs 1 and --jobs 2, `runs` times each, alternated (so that
    load from other work on the machine falls on both alike): median wall time, models/s."""
    kprune = [sys.executable, "-m", "kprune_batch"]
    batch_dir = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    spec = small_batch(batch_dir, env)
    samples: dict[str, list[tuple[float, float]]] = {"1": [], "2": []}
    for _ in range(runs):
        for jobs in samples:
            shutil.rmtree(batch_dir / "out", ignore_errors=True)
            samples[jobs].append(measure(kprune + ["apply", str(spec), "--jobs", jobs,
                                                   "--audit-log", str(batch_dir / "log.json")],
                                         env))
    shutil.rmtree(batch_dir, ignore_errors=True)
    lines = []
    for jobs, got in samples.items():
        wall = statistics.median(w for w, _ in got)
        lines.append(f"batch of 100 small .keras models, `kprune apply --jobs {jobs}`: {wall:.2f} s "
                     f"({100 / wall:.0f} models/s; runs {', '.join(f'{w:.2f}' for w, _ in got)}), "
                     f"peak RSS {max(r for _, r in got):.0f} MB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kprune-bench"))
    parser.add_argument("--batch-only", action="store_true",
                        help="Time only the 100-model batch (--jobs 1 and --jobs 2).")
    args = parser.parse_args()
    env = child_env()
    if args.batch_only:
        print("\n".join(batch_lines(env, args.runs)))
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    models = build(cache, env)
    kprune = [sys.executable, "-m", "kprune_batch"]
    rows = []
    for name, path in models.items():
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        first_conv = {"ResNet50": "conv1_conv", "VGG16": "block1_conv1"}[name]
        for spec, index in (("a.yaml", 0), ("b.yaml", 1)):
            (work / spec).write_text(
                f"version: 1\noutput_dir: out\nmodels:\n  - path: {path}\n"
                f"    layers: [{{name: {first_conv}, rules: [{{index: [{index}]}}]}}]\n")
        usual = work / "usual.py"
        usual.write_text(USUAL)

        def apply(spec: str, *extra: str) -> list[str]:
            return kprune + ["apply", str(work / spec), "--audit-log", str(work / "log.json"),
                             *extra]

        # Each way is a list of commands run in turn. The kprune rows alternate two specs (filter
        # 0, filter 1), so every run replaces the previous run's output with different bytes, as
        # the usual script does; the re-run row repeats one spec on an output that is already up
        # to date (after one untimed run), which kprune leaves as it is.
        ways = {
            "usual script (load, set_weights, save)": [[sys.executable, str(usual), str(path),
                                                        str(work / "usual.keras")]],
            "kprune apply (direct backend)": [apply("a.yaml"), apply("b.yaml")],
            "kprune apply --backend keras": [apply("a.yaml", "--backend", "keras"),
                                             apply("b.yaml", "--backend", "keras")],
            "kprune apply, re-run, output already up to date": [
                apply("a.yaml", "--output-dir", str(work / "rerun"))],
            "plain file copy": [[sys.executable, "-c", COPY, str(path), str(work / "copy.keras")]],
            "durable copy (temp file, fsync, rename)": [[sys.executable, "-c", DURABLE_COPY,
                                                         str(path), str(work / "durable.keras")]],
            "sha256 of the file, once": [[sys.executable, "-c", SHA256, str(path)]],
        }
        measure(ways["kprune apply, re-run, output already up to date"][0], env)  # untimed
        results = {way: median_run(cmds, env, args.runs) for way, cmds in ways.items()}
        base = results["usual script (load, set_weights, save)"][0]
        copy = results["plain file copy"][0]
        size = path.stat().st_size / 1e6
        for way, (wall, rss) in results.items():
            rows.append(f"| {name} ({size:.0f} MB) | {way} | {wall:.2f} | {wall / base:.3f}x | "
                        f"{wall / copy:.1f}x | {rss:.0f} |")
        shutil.rmtree(work, ignore_errors=True)
    batch = batch_lines(env, args.runs)
    print_table(args.runs, ["model", "way", "wall s", "vs usual", "vs copy", "peak RSS MB"], rows)
    print("\n" + "\n".join(batch))


if __name__ == "__main__":
    main()
