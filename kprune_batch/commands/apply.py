"""`kprune apply SPEC`: run every model job, write outputs and the run's audit log."""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat
import sys
from typing import Any, Iterator

from kprune_batch.audit import (AUDIT_VERSION, command_line, git_provenance, new_run_id,
                                run_status, tool_versions, utc_now, write_log)
from kprune_batch.commands import EXIT_FAILED, EXIT_INVALID, EXIT_OK, Result
from kprune_batch.errors import AuditLogError, OutputError, SpecError
from kprune_batch.executor import (STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ModelOutcome,
                                   Opener, open_auto, run_job)
from kprune_batch.files import file_kind, remove_stale_temps
from kprune_batch.plan import Plan, compile_plan
from kprune_batch.spec import read_spec

LOCK_NAME = ".kprune.lock"


class _Stop:
    """Turns SIGTERM/SIGINT into a request to stop after the current model."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, _frame: Any) -> None:
            self.signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (library use): no handler
                pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


@contextlib.contextmanager
def _lock(path: str) -> Iterator[bool]:
    """An exclusive lock on kprune's lock file `path` (so two runs never interleave writes);
    yields False if another run holds it. OutputError if something else lies at `path`.

    The file may be there from an earlier run (it is bookkeeping, and stays). It is opened
    without following a link (O_NOFOLLOW) or waiting on a FIFO (O_NONBLOCK), and written (our
    pid) only once it is proven to be a regular file with no other name: a link or hard link
    planted there, to an input model say, would otherwise be truncated.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISLNK(mode):
            raise OutputError(f"the lock file {path} is a symbolic link (kprune never follows "
                              f"one there); remove it and run again") from None
        if not stat.S_ISREG(mode):
            raise OutputError(f"the lock file {path} is {file_kind(mode)}, not a regular file; "
                              f"remove it and run again") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"the lock file {path} is {file_kind(st.st_mode)}, not a regular "
                              f"file; remove it and run again")
        if st.st_nlink != 1:
            raise OutputError(f"the lock file {path} has another name too (a hard link to "
                              f"another file); remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)


def _hold(stack: contextlib.ExitStack, path: str, busy: str) -> str | None:
    """Take the lock at `path` for the rest of the run (None), or say why not: `busy` when
    another run holds it, or what lies at `path` instead of a lock file. OSError if it cannot
    be created at all."""
    try:
        return None if stack.enter_context(_lock(path)) else busy
    except OutputError as exc:
        return str(exc)


def log_lock_path(log_path: str) -> str:
    """The lock beside an --audit-log that keeps two runs from writing the same log."""
    return os.path.join(os.path.dirname(log_path), f".{os.path.basename(log_path)}{LOCK_NAME}")


def _log_clash(log_path: str, plan: Plan) -> str | None:
    """What `log_path` would overwrite among the files of the run (None: nothing), by resolved
    path or by inode: the spec, every model's input and output, the folder's lock."""
    files = [("the spec file", plan.spec_path)]
    for job in plan.jobs:
        files += [(f"the input of model '{job.name}'", job.input),
                  (f"the output of model '{job.name}'", job.output)]
    files.append(("the lock file", os.path.join(plan.output_dir, LOCK_NAME)))
    for what, path in files:
        if os.path.realpath(path) == os.path.realpath(log_path):
            return f"{what} ({path})"
        with contextlib.suppress(OSError):
            if os.path.samefile(path, log_path):
                return f"{what} ({path})"
    return None


def apply(spec_file: str, audit_log: str | None = None, output_dir: str | None = None,
          fail_fast: bool = False, probe: bool = False, opener: Opener = open_auto,
          jobs: int = 1, progress: bool = False) -> Result:
    result = Result()
    started = utc_now()
    try:
        spec = read_spec(spec_file)
        plan = compile_plan(spec, output_dir=output_dir)
    except SpecError as exc:
        result.err.extend(exc.lines())
        result.return_code = EXIT_INVALID
        return result
    run_id = new_run_id()
    default_log = os.path.join(plan.output_dir, "audit", f"{run_id}.json")
    log_path = os.path.abspath(audit_log) if audit_log else default_log
    if audit_log and (clash := _log_clash(log_path, plan)):
        # an invalid command line, refused before anything is opened, like click's usage
        # errors (exit 2, no log: the path given for it is the problem)
        result.err.append(f"error: --audit-log {log_path} is {clash}; kprune never writes a "
                          f"log over a file the run reads or writes: choose another path")
        result.return_code = EXIT_INVALID
        return result
    stop = _Stop()
    with contextlib.ExitStack() as stack:
        refusal = None
        if audit_log:  # a default log path is the run's own (a fresh run id): no lock needed
            lock = log_lock_path(log_path)
            try:
                refusal = _hold(stack, lock, f"another kprune apply is writing the audit log "
                                             f"{log_path} (lock {lock}); run again when it has "
                                             f"finished, or give another --audit-log")
            except OSError as exc:
                refusal = f"cannot write audit log {log_path}: {exc.strerror}"
            if refusal:  # never replace a log another run writes; this run's goes to its own
                log_path = default_log
        if refusal is None:
            lock = os.path.join(plan.output_dir, LOCK_NAME)
            try:
                refusal = _hold(stack, lock, f"another kprune apply is writing to "
                                             f"{plan.output_dir} (lock {lock}); run again when "
                                             f"it has finished")
            except OSError as exc:
                result.err.append(f"error: cannot use output folder {plan.output_dir}: "
                                  f"{exc.strerror}")
                result.return_code = EXIT_FAILED
                return result
        if refusal:
            result.err.append(f"error: {refusal}")
            outcomes = [ModelOutcome(job=j, status=STATUS_SKIPPED, error=refusal)
                        for j in plan.jobs]
        else:
            reads = [plan.spec_path] + [j.input for j in plan.jobs]
            for job in plan.jobs:  # a SIGKILLed earlier run may have left temp files behind
                remove_stale_temps(job.output, keep=reads)
            with stop.installed():
                outcomes = _run_all(plan, stop, opener, probe, fail_fast, jobs, progress)
        log = build_log(plan, spec_file, run_id, started, outcomes, fail_fast, probe, stop.signal)
        try:
            write_log(log_path, log)
        except (OSError, AuditLogError) as exc:
            text = exc.strerror if isinstance(exc, OSError) else str(exc)
            result.err.append(f"error: cannot write audit log {log_path}: {text}")
            result.return_code = EXIT_FAILED
    for outcome in outcomes:
        if outcome.status == STATUS_OK:
            layers = len({r["layer"] for r in outcome.zeroed + outcome.removed})
            removed = f", removed {len(outcome.removed)}" if outcome.removed else ""
            kept = "" if outcome.written else " (unchanged: already held these bytes)"
            result.out.append(f"ok      {outcome.job.name}: zeroed {len(outcome.zeroed)}{removed} "
                              f"filter(s) in {layers} layer(s) -> {outcome.job.output}{kept}")
        elif outcome.status == STATUS_FAILED:
            result.err.append(f"error: {outcome.error}")
        else:
            result.out.append(f"skipped {outcome.job.name}: {outcome.error}")
    if os.path.exists(log_path):
        result.out.append(f"audit log: {log_path}")
    if result.return_code == EXIT_OK and any(o.status != STATUS_OK for o in outcomes):
        result.return_code = EXIT_FAILED
    return result


def _skip_reason(stop: _Stop, fail_fast: bool, done: list[ModelOutcome]) -> str | None:
    if stop.signal:
        return f"not run: kprune was stopped by {stop.signal}"
    if fail_fast and any(o.status == STATUS_FAILED for o in done):
        return "not run: an earlier model failed and --fail-fast is set"
    return None


def _run_all(plan: Plan, stop: _Stop, opener: Opener, probe: bool, fail_fast: bool,
             jobs: int, progress: bool) -> list[ModelOutcome]:
    """Run the jobs in spec order (or `jobs` worker processes); outcomes in spec order."""
    total = len(plan.jobs)
    done: dict[int, ModelOutcome] = {}

    def report(outcome: ModelOutcome) -> None:
        if progress:
            sys.stderr.write(f"\r[{len(done)}/{total}] {outcome.job.name}: {outcome.status}\033[K")
            sys.stderr.flush()

    if jobs <= 1 or total <= 1:
        for i, job in enumerate(plan.jobs):
            reason = _skip_reason(stop, fail_fast, list(done.values()))
            done[i] = (ModelOutcome(job=job, status=STATUS_SKIPPED, error=reason) if reason
                       else run_job(job, opener=opener, probe=probe))
            report(done[i])
    else:
        import concurrent.futures  # only batches pay for these imports (~7 ms)
        import multiprocessing

        # Workers are spawned, never forked: a forked TensorFlow runtime can deadlock.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                    initializer=_worker_init) as pool:
            pending: dict[concurrent.futures.Future[ModelOutcome], int] = {}
            queue = list(enumerate(plan.jobs))
            while queue or pending:
                while queue and len(pending) < jobs and not _skip_reason(
                        stop, fail_fast, list(done.values())):
                    i, job = queue.pop(0)
                    pending[pool.submit(run_job, job, opener, True, probe)] = i
                if not pending:
                    break
                finished, _ = concurrent.futures.wait(
                    pending, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    try:
                        done[i] = future.result()
                    except Exception as exc:  # the worker process died (killed, out of memory)
                        done[i] = ModelOutcome(job=plan.jobs[i], status=STATUS_FAILED,
                                               error=f"model '{plan.jobs[i].name}': the worker "
                                                     f"process failed ({type(exc).__name__})")
                    report(done[i])
            for i, job in queue:
                reason = _skip_reason(stop, fail_fast, list(done.values())) or "not run"
                done[i] = ModelOutcome(job=job, status=STATUS_SKIPPED, error=reason)
    if progress:
        sys.stderr.write("\n")
    return [done[i] for i in range(total)]


def _worker_init() -> None:
    """Workers leave SIGINT/SIGTERM to the parent, which stops handing out models."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_log(plan: Plan, spec_file: str, run_id: str, started: str,
              outcomes: list[ModelOutcome], fail_fast: bool, probe: bool,
              interrupted: str | None) -> dict[str, Any]:
    """The audit log document of one run (schema/audit.schema.json)."""
    log: dict[str, Any] = {
        "version": AUDIT_VERSION,
        "run_id": run_id,
        "status": run_status([o.status for o in outcomes]),
        "spec": {"path": plan.spec_path, "sha256": plan.spec_sha256,
                 "git": git_provenance(spec_file)},
        "plan_sha256": plan.sha256,
        "command": command_line(),
        "started_at": started,
        "finished_at": utc_now(),
        "tool": tool_versions(),
        "options": {"output_dir": plan.output_dir, "fail_fast": fail_fast, "probe": probe},
        "models": [{
            "name": o.job.name,
            "status": o.status,
            "backend": o.backend,
            "input": {"path": o.job.input, "sha256": o.input_sha256},
            "output": ({"path": o.job.output, "sha256": o.output_sha256, "written": o.written}
                       if o.status == STATUS_OK else None),
            "error": o.error,
            "layers": [sel.to_json() for sel in o.layers] if o.status == STATUS_OK else [],
            "backend_note": o.backend_note,
            "probe": o.probe if o.status == STATUS_OK else "skipped",
            "static_check": o.static_check if o.status == STATUS_OK else "skipped",
            "removal": o.removal if o.status == STATUS_OK else None,
        } for o in outcomes],
        "zeroed": [record for o in outcomes if o.status == STATUS_OK for record in o.zeroed],
        "removed": [record for o in outcomes if o.status == STATUS_OK for record in o.removed],
    }
    if interrupted:
        log["interrupted"] = interrupted
    return log
