"""`kprune apply SPEC`: run every model job, write outputs and the run's audit log."""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
from typing import Any, Iterator

from kprune_batch.audit import (AUDIT_VERSION, command_line, git_provenance, new_run_id,
                                run_status, tool_versions, utc_now, write_log)
from kprune_batch.commands import EXIT_FAILED, EXIT_INVALID, EXIT_OK, Result
from kprune_batch.errors import AuditLogError, SpecError
from kprune_batch.executor import (STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ModelOutcome,
                                   Opener, open_auto, run_job)
from kprune_batch.files import remove_stale_temps
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
def _lock(folder: str) -> Iterator[bool]:
    """An exclusive lock on `folder` so two runs never interleave writes; yields False if held."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
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


def apply(spec_file: str, audit_log: str | None = None, output_dir: str | None = None,
          fail_fast: bool = False, probe: bool = False, opener: Opener = open_auto,
          jobs: int = 1, progress: bool = False) -> Result:
    result = Result()
    started = utc_now()
    try:
        spec = read_spec(spec_file)
        plan = compile_plan(spec, output_dir=output_dir)
    except SpecError as exc:
        result.err.extend(p.render() for p in exc.problems)
        result.return_code = EXIT_INVALID
        return result
    run_id = new_run_id()
    log_path = os.path.abspath(audit_log) if audit_log else os.path.join(
        plan.output_dir, "audit", f"{run_id}.json")
    stop = _Stop()
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(_lock(plan.output_dir))
        except OSError as exc:
            result.err.append(f"error: cannot use output folder {plan.output_dir}: {exc.strerror}")
            result.return_code = EXIT_FAILED
            return result
        if not held:
            message = (f"another kprune apply is writing to {plan.output_dir} (lock "
                       f"{os.path.join(plan.output_dir, LOCK_NAME)}); run again when it has finished")
            result.err.append(f"error: {message}")
            outcomes = [ModelOutcome(job=j, status=STATUS_SKIPPED, error=message) for j in plan.jobs]
        else:
            for job in plan.jobs:  # a SIGKILLed earlier run may have left temp files behind
                remove_stale_temps(job.output)
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
