"""The command line: parse, call one command function, print its result, exit with its code."""
from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from typing import Any, Callable

import click

from kprune_batch import __version__
from kprune_batch.commands import EXIT_FAILED, EXIT_INVALID, Emit, Result
from kprune_batch.errors import KpruneError, SpecError, first_line, printable
from kprune_batch.quiet import set_debug


def _echo(line: str, err: bool = False) -> None:
    # Every element of a Result is one line by contract; a name or path with a newline or an
    # ANSI escape in it must not print a second line that reads like another error
    click.echo(printable(line), err=err)


def _emitter(json_out: bool) -> Emit:
    """Where a streaming command's lines go as they come: printed and flushed at once (click.echo
    flushes), stdout lines held back with --format json (stdout is then its one document)."""
    def emit(line: str, err: bool) -> None:
        if err or not json_out:
            try:
                _echo(line, err=err)
            except BrokenPipeError:
                # the reader went away mid-batch (`kprune apply ... | head`): the batch goes on
                # and writes its log; the rest of that stream's lines go nowhere
                stream = sys.stderr if err else sys.stdout
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())

    return emit


def _finish(ctx: click.Context, call: Callable[[], Result], json_out: bool = False) -> None:
    """Run the command, print its Result (with --format json: `data` as one JSON document on
    stdout instead of `out`) and exit with its code; errors are one line each on stderr."""
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    if ctx.obj and ctx.obj.get("console"):
        _settle_gc()
    try:
        result = call()
    except SpecError as exc:
        if debug:
            traceback.print_exc()
        for line in exc.lines():
            _echo(line, err=True)
        ctx.exit(EXIT_INVALID)
    except KpruneError as exc:
        if debug:
            traceback.print_exc()
        _echo(f"error: {exc.render()}", err=True)
        ctx.exit(EXIT_FAILED)
    except Exception as exc:  # a bug: one line, and the traceback only with --debug
        if debug:
            traceback.print_exc()
        first = first_line(exc, limit=400) if str(exc).strip() else ""
        _echo(f"error: internal error: {type(exc).__name__}: {first} "
              f"(run with --debug for the traceback)", err=True)
        ctx.exit(EXIT_FAILED)
    if json_out:
        for line in result.err:
            _echo(line, err=True)
        if result.data is not None:  # ensure_ascii: every control character is escaped
            click.echo(json.dumps(result.data, indent=2, allow_nan=False))
    else:
        for line in result.out:
            _echo(line)
        for line in result.err:
            _echo(line, err=True)
    ctx.exit(result.return_code)


def _debug_given(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:  # runs after the group's callback: only ever turns --debug on
        ctx.ensure_object(dict)
        ctx.obj["debug"] = True
        set_debug(True)


# --debug after the subcommand (kprune apply spec.yaml --debug) means what it means before it
_DEBUG_HELP = "Show tracebacks and TensorFlow's own log lines."
SUB_DEBUG = click.Option(["--debug"], is_flag=True, expose_value=False, callback=_debug_given,
                         help=_DEBUG_HELP)


class _Group(click.Group):
    """Gives every subcommand the --debug option, so none can forget it."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any(p.name == "debug" for p in cmd.params):
            cmd.params.append(SUB_DEBUG)
        super().add_command(cmd, name)


def _format_option(*extra: str, help: str | None = None) -> Callable[[Any], Any]:
    """--format text|json (and `extra` formats); json: one document on stdout (README,
    "Machine-readable output")."""
    return click.option("--format", "fmt", type=click.Choice(["text", *extra, "json"]),
                        default="text", show_default=True, help=help)


BACKEND_OPTION = click.option(
    "--backend", type=click.Choice(["auto", "direct", "keras"]), default="auto",
    show_default=True,
    help="direct: edit the file with h5py (no TensorFlow); keras: load with Keras; auto: direct "
         "where its mapping is proven, else keras.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kprune")
@click.option("--debug", is_flag=True, help=_DEBUG_HELP)
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Declarative, auditable filter surgery for Keras 3 CNNs."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    set_debug(debug)


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_format_option()
@click.pass_context
def validate(ctx: click.Context, specs: tuple[str, ...], fmt: str) -> None:
    """Check spec files (schema and semantics); opens no model. Exit 0 valid, 2 invalid.

    '-' reads a spec from stdin (relative paths in it start in the current directory)."""
    from kprune_batch.commands.validate import validate as run

    _finish(ctx, lambda: run(list(specs)), json_out=fmt == "json")


@cli.command()
@click.argument("name", type=click.Choice(["spec", "audit"]), default="spec")
@click.option("--path", "path", is_flag=True,
              help="Print the installed schema file's path (for an editor's modeline) instead.")
@click.pass_context
def schema(ctx: click.Context, name: str, path: bool) -> None:
    """Print the JSON Schema of spec files (or of audit logs) that validate uses."""
    from kprune_batch.commands.schema import schema as run

    _finish(ctx, lambda: run(name, path=path))


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@_format_option("markdown", help="markdown: with --base only.")
@click.option("--base", metavar="REV",
              help="Compare with the spec as committed at this git revision (both planned "
                   "against the current model files).")
@BACKEND_OPTION
@click.pass_context
def plan(ctx: click.Context, spec: str, fmt: str, base: str | None, backend: str) -> None:
    """Show which filters each rule would zero; reads models, writes nothing."""
    from kprune_batch.commands.plan import plan as run
    from kprune_batch.executor import OPENERS

    if fmt == "markdown" and base is None:
        raise click.UsageError("--format markdown shows a spec change: give --base REV")
    _finish(ctx, lambda: run(spec, fmt, opener=OPENERS[backend], base=base),
            json_out=fmt == "json")


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--audit-log", type=click.Path(dir_okay=False),
              help="Where to write the audit log (default: OUTPUT_DIR/audit/RUN_ID.json).")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Override the spec's output_dir (relative to the current directory).")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed model.")
@click.option("--probe", is_flag=True,
              help="Run a seeded probe batch and measure every zeroed channel.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Process models in this many worker processes.")
@click.option("--shard", metavar="K/N|auto",
              help="Process only shard K of N (the models at 0-based spec position i with "
                   "i mod N = K-1); auto: K from JOB_COMPLETION_INDEX (a Kubernetes Indexed "
                   "Job's, 0-based), N from KPRUNE_SHARD_COUNT.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None,
              metavar="[ADDRESS]",
              help="Run one Ray task per model on the Ray cluster at ADDRESS (auto, HOST:PORT, "
                   "ray://HOST:PORT), or on a local Ray when no address follows (needs the "
                   "extra kprune-batch[ray]; give it after SPEC, or as --ray=ADDRESS).")
@BACKEND_OPTION
@_format_option(help="text: one line per model as it finishes; json: one document at the end.")
@click.pass_context
def apply(ctx: click.Context, spec: str, audit_log: str | None, output_dir: str | None,
          fail_fast: bool, probe: bool, jobs: int, shard: str | None, ray_address: str | None,
          backend: str, fmt: str) -> None:
    """Zero the filters the spec selects; write edited models and an audit log."""
    from kprune_batch.commands.apply import apply as run
    from kprune_batch.executor import OPENERS

    _finish(ctx, lambda: run(spec, audit_log=audit_log, output_dir=output_dir,
                             fail_fast=fail_fast, probe=probe, jobs=jobs,
                             progress=sys.stderr.isatty(), opener=OPENERS[backend],
                             shard=shard, ray=ray_address, emit=_emitter(fmt == "json")),
            json_out=fmt == "json")


@cli.command()
@click.argument("audit_log", type=click.Path(dir_okay=False))
@click.option("--probe", is_flag=True, help="Also run the probe on each output.")
@click.option("--root", type=click.Path(file_okay=False),
              help="Where the run's files are now: replaces the log's root (the longest common "
                   "directory of its input and output paths) in every path.")
@_format_option()
@click.pass_context
def verify(ctx: click.Context, audit_log: str, probe: bool, root: str | None, fmt: str) -> None:
    """Re-check a run's outputs against its audit log and inputs. Exit 0 ok, 1 mismatch."""
    from kprune_batch.commands.verify import verify as run

    _finish(ctx, lambda: run(audit_log, probe=probe, root=root), json_out=fmt == "json")


@cli.command()
@click.argument("audit_log", type=click.Path(dir_okay=False))
@_format_option("markdown", "html",
                help="html: one self-contained review page (print it to a file).")
@click.pass_context
def report(ctx: click.Context, audit_log: str, fmt: str) -> None:
    """A human-readable review of a run. Exit 1 if the log is unreadable."""
    from kprune_batch.commands.report import report as run

    _finish(ctx, lambda: run(audit_log, fmt), json_out=fmt == "json")


@cli.command()
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--exit-code", is_flag=True,
              help="Exit 1 when the runs differ (a model's status or a filter), 0 when not.")
@_format_option()
@click.pass_context
def diff(ctx: click.Context, old: str, new: str, exit_code: bool, fmt: str) -> None:
    """Filters zeroed differently by two runs, per model and layer."""
    from kprune_batch.commands.diff import diff as run

    _finish(ctx, lambda: run(old, new, exit_code=exit_code), json_out=fmt == "json")


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_format_option()
@click.pass_context
def pin(ctx: click.Context, specs: tuple[str, ...], fmt: str) -> None:
    """Write each model file's current sha256 into the spec (nothing else in it changes)."""
    from kprune_batch.commands.pin import pin as run

    _finish(ctx, lambda: run(list(specs)), json_out=fmt == "json")


@cli.command()
@click.argument("logs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write the merged audit log.")
@_format_option()
@click.pass_context
def merge(ctx: click.Context, logs: tuple[str, ...], output: str, fmt: str) -> None:
    """One audit log from the shard logs of one run (apply --shard K/N, every K once)."""
    from kprune_batch.commands.merge import merge as run

    _finish(ctx, lambda: run(list(logs), output), json_out=fmt == "json")


# Objects a run allocates between two collections of the youngest generation (CPython: 700).
GC_YOUNG_THRESHOLD = 50_000


def _settle_gc() -> None:
    """Tune the cyclic garbage collector for one command of a console run (not for a library
    caller's process, nor in-process test invocations): the command's modules are imported by
    now, so they are frozen (gc.freeze: never walked again; they live to the end anyway), and
    the youngest generation is collected after GC_YOUNG_THRESHOLD allocations, not 700. An
    apply of every conv of ResNet50 keeps thousands of records, a model config and its graph
    alive to the end: at the defaults the collector ran ~170 times in it, each older-generation
    pass walking every object numpy and the imports made (0.03-0.06 s of a ~0.6 s run). Cycles
    are still collected, only less often (the older generations keep their thresholds)."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    gc.enable()


def main() -> None:
    """The command line in the caller's process (entry() runs it as the console script)."""
    gc.disable()  # until the command's modules are imported (see _settle_gc)
    cli(prog_name="kprune", obj={"console": True})


# Modules whose presence makes the interpreter's own finalization slow (below)
_FRAMEWORKS = ("tensorflow", "torch", "jax")


def entry() -> None:
    """The `kprune` console script and `python -m kprune_batch`: main() in a process of its own.

    Only here, where the whole process is kprune's: Keras is imported without the optional
    packages nothing in kprune uses (quiet.lean_imports), and once a framework was imported the
    process ends without Python's finalization, which tears down TensorFlow's thousands of
    modules and objects one by one: ~1.3 s after a ResNet50 removal, every output long written
    and fsynced. Exit handlers, non-daemon threads and the standard streams are still run,
    joined and flushed first; under a profiler or tracer the process exits as usual. Callers
    that run main() in their own process keep both as they were.
    """
    from kprune_batch import quiet

    quiet.lean_imports(True)
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if (code is not None and not isinstance(code, int)) or \
            not any(name in sys.modules for name in _FRAMEWORKS) or \
            sys.getprofile() is not None or sys.gettrace() is not None:
        # a profiler or tracer (python -m cProfile, a debugger) writes its results only after
        # this returns
        raise SystemExit(code)
    _exit_now(code or 0)


def _exit_now(code: int) -> None:
    """What the interpreter does before it finalizes (join threads, run atexit handlers, flush
    the streams: exit 120 when stdout cannot be flushed, as Python does), then os._exit."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging.shutdown, multiprocessing's and tempfile's clean-ups
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            if stream is sys.stdout and code == 0:
                code = 120
    os._exit(code)


if __name__ == "__main__":
    entry()

