"""`kprune apply SPEC`: run every model job, write outputs and the run's audit log."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from kprune_batch.audit import (AUDIT_VERSION, command_line, git_provenance, new_run_id,
                                run_status, tool_versions, utc_now, write_log)
from kprune_batch.commands import EXIT_FAILED, EXIT_INVALID, EXIT_OK, Emit, Result
from kprune_batch.errors import AuditLogError, OutputError, SpecError, printable
from kprune_batch.executor import (STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, ModelOutcome,
                                   Opener, open_auto, run_job)
from kprune_batch.files import file_kind, remove_stale_temps
from kprune_batch.plan import ModelJob, Plan, compile_plan
from kprune_batch.spec import STDIN, read_spec_arg

if TYPE_CHECKING:
    from concurrent.futures import Future

    from kprune_batch.ray_runner import RaySession

LOCK_NAME = ".kprune.lock"


class _Stop:
    """Turns SIGTERM/SIGINT into a request to stop after the current model."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.count = 0  # signals received: a second one cancels running Ray tasks

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, _frame: Any) -> None:
            self.signal = signal.Signals(signum).name
            self.count += 1

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
def _lock_file(path: str) -> Iterator[int]:
    """The open descriptor of kprune's lock file `path`, proven a regular file with no other
    name. OutputError if something else lies at `path`.

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
        yield fd
    finally:
        os.close(fd)


def _flock(fd: int, how: int) -> bool:
    """Take flock `how` without waiting; False if another run's lock is in the way."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _note(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


@contextlib.contextmanager
def _lock(path: str) -> Iterator[bool]:
    """An exclusive lock on kprune's lock file `path` (so two runs never interleave writes);
    yields False if another run holds it. OutputError if something else lies at `path`."""
    with _lock_file(path) as fd:
        if not _flock(fd, fcntl.LOCK_EX):
            yield False
            return
        _note(fd, f"{os.getpid()}\n")
        yield True


# How long a shard run retries the folder lock: a shard that starts a group of shards holds
# it exclusively for the few microseconds it takes to write the count (see _join_shards).
SHARD_PATIENCE = 1.0
_COUNT_NOTE = re.compile(r"\d+ shards of (\d+)\n")


@contextlib.contextmanager
def _shared_lock(path: str, count: int) -> Iterator[int | None]:
    """The folder lock `path` held *shared* with the other shards of a run split in `count`
    shards: yields None, or when that is refused, the shard count of the run in the way (0: an
    unsharded run, which holds the lock exclusively).

    Shards of different counts must not overlap (model 0 is in shard 1 of every count), so the
    lock file says which count its current holders use. Only an exclusive holder writes it:
    the first shard of a group takes the lock exclusively, writes the count and converts to
    shared; later shards take it shared and read the count. flock(2) converts by dropping the
    lock first, so another run can slip in between: the count is read again once shared.
    """
    with _lock_file(path) as fd:
        deadline = time.monotonic() + SHARD_PATIENCE
        while True:
            if _flock(fd, fcntl.LOCK_EX):
                _note(fd, f"{os.getpid()} shards of {count}\n")
                held = _flock(fd, fcntl.LOCK_SH)
            else:
                held = _flock(fd, fcntl.LOCK_SH)
            if held:
                note = _COUNT_NOTE.fullmatch(os.pread(fd, 64, 0).decode("ascii", "replace"))
                other = int(note.group(1)) if note else 0
                if other == count:
                    yield None
                    return
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                other = 0  # held exclusively: an unsharded run (or a group's first shard)
            if time.monotonic() >= deadline:
                yield other
                return
            time.sleep(0.02)


def _hold(stack: contextlib.ExitStack, path: str, busy: str) -> str | None:
    """Take the lock at `path` for the rest of the run (None), or say why not: `busy` when
    another run holds it, or what lies at `path` instead of a lock file. OSError if it cannot
    be created at all."""
    try:
        return None if stack.enter_context(_lock(path)) else busy
    except OutputError as exc:
        return str(exc)


def shard_lock_path(output_dir: str, shard: tuple[int, int]) -> str:
    """The lock that keeps two runs of one shard of `output_dir` from interleaving."""
    return os.path.join(output_dir, f".kprune.shard-{shard[0]}-of-{shard[1]}.lock")


def hold_folder_locks(stack: contextlib.ExitStack, output_dir: str,
                      shard: tuple[int, int] | None) -> str | None:
    """Take the locks a run on `output_dir` holds until it ends (None), or say why not.

    An unsharded run takes the folder lock exclusively: it excludes every other run. A shard
    K/N takes it shared (with the other shards of N only, see _shared_lock), so that the
    shards of one run write side by side, and its own shard lock exclusively, so that two
    runs of one shard never interleave. OSError if a lock file cannot be created at all.
    """
    lock = os.path.join(output_dir, LOCK_NAME)
    busy = f"another kprune apply is writing to {output_dir} (lock {lock}); run again when " \
           f"it has finished"
    if shard is None:
        return _hold(stack, lock, busy)
    try:
        other = stack.enter_context(_shared_lock(lock, shard[1]))
    except OutputError as exc:
        return str(exc)
    if other is not None:
        return busy if other == 0 else (
            f"shards of another count (K/{other}) are writing to {output_dir} (lock {lock}); "
            f"the shards of one run share one count: run again when they have finished")
    own = shard_lock_path(output_dir, shard)
    return _hold(stack, own, f"another kprune apply of shard {shard[0]}/{shard[1]} is "
                             f"writing to {output_dir} (lock {own}); run again when it has "
                             f"finished")


SHARD_COUNT_ENV = "KPRUNE_SHARD_COUNT"
INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in each pod of an Indexed Job, 0-based
_SHARD = re.compile(r"([0-9]{1,9})/([0-9]{1,9})")


def parse_shard(text: str, environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """--shard K/N as (K, N), 1 <= K <= N; 'auto' reads a Kubernetes Indexed Job's
    JOB_COMPLETION_INDEX (0-based: K = index + 1) and KPRUNE_SHARD_COUNT (Kubernetes does not
    export the completion count: the manifest sets it). ValueError with one line otherwise."""
    if text == "auto":
        index, count = environ.get(INDEX_ENV), environ.get(SHARD_COUNT_ENV)
        for name, value in ((INDEX_ENV, index), (SHARD_COUNT_ENV, count)):
            if value is None:
                raise ValueError(f"--shard auto needs the environment variable {name} (set by "
                                 f"a Kubernetes Indexed Job, and {SHARD_COUNT_ENV} by its "
                                 f"manifest)")
            if not value.isascii() or not value.isdigit() or len(value) > 9:
                raise ValueError(f"--shard auto: {name} is {value!r}, not a whole number")
        k, n = int(index) + 1, int(count)  # type: ignore[arg-type]
        if not 1 <= k <= n:
            raise ValueError(f"--shard auto: {INDEX_ENV} {index} is not below {SHARD_COUNT_ENV} "
                             f"{count}")
        return k, n
    match = _SHARD.fullmatch(text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"--shard {text!r}: expected K/N with 1 <= K <= N (e.g. 2/8), or auto")
    return int(match.group(1)), int(match.group(2))


def shard_jobs(plan: Plan, shard: tuple[int, int] | None) -> list[ModelJob]:
    """The models of shard K/N: those at 0-based spec position i with i mod N == K - 1."""
    if shard is None:
        return list(plan.jobs)
    return [job for i, job in enumerate(plan.jobs) if i % shard[1] == shard[0] - 1]


def log_lock_path(log_path: str) -> str:
    """The lock beside an --audit-log that keeps two runs from writing the same log."""
    return os.path.join(os.path.dirname(log_path), f".{os.path.basename(log_path)}{LOCK_NAME}")


def _log_clash(log_path: str, plan: Plan, shard: tuple[int, int] | None) -> str | None:
    """What `log_path` would overwrite among the files of the run (None: nothing), by resolved
    path or by inode: the spec, every model's input and output, the folder's locks."""
    files = [("the spec file", plan.spec_path)]
    for job in plan.jobs:
        files += [(f"the input of model '{job.name}'", job.input),
                  (f"the output of model '{job.name}'", job.output)]
    files.append(("the lock file", os.path.join(plan.output_dir, LOCK_NAME)))
    if shard is not None:
        files.append(("the shard's lock file", shard_lock_path(plan.output_dir, shard)))
    for what, path in files:
        if os.path.realpath(path) == os.path.realpath(log_path):
            return f"{what} ({path})"
        with contextlib.suppress(OSError):
            if os.path.samefile(path, log_path):
                return f"{what} ({path})"
    return None


def apply(spec_file: str, audit_log: str | None = None, output_dir: str | None = None,
          fail_fast: bool = False, probe: bool = False, opener: Opener = open_auto,
          jobs: int = 1, progress: bool = False, shard: str | None = None,
          ray: str | None = None, emit: Emit | None = None) -> Result:
    """`shard`: 'K/N' or 'auto' (see parse_shard); None runs every model. `ray`: run one Ray
    task per model on the cluster at that address ('' starts a local Ray); None: no Ray.

    `emit` gets each line the moment it is known: a model's line as that model finishes (in
    the order models finish: spec order when serial, completion order with --jobs or --ray),
    then the count line and the log's path; without it the lines are kept in the Result. A
    batch killed by a CI timeout thus leaves a line for every model it finished."""
    result = Result()
    say = emit or result.say

    def fail(line: str) -> None:
        say(line, True)

    def finished(outcome: ModelOutcome) -> None:
        for line, to_stderr in outcome_lines(outcome):
            say(line, to_stderr)

    started = utc_now()
    try:
        part = None if shard is None else parse_shard(shard)
        if ray is not None and jobs > 1:
            raise ValueError("--jobs and --ray do not go together: with --ray, Ray runs as "
                             "many models at once as its cluster has CPUs")
    except ValueError as exc:  # a usage error: exit 2, nothing opened, no log
        fail(f"error: {exc}")
        result.return_code = EXIT_INVALID
        return result
    if ray is not None:
        import importlib.util

        from kprune_batch.ray_runner import EXTRA_HINT

        if importlib.util.find_spec("ray") is None:  # before anything is opened: no log
            fail(f"error: --ray needs Ray, which is not installed: {EXTRA_HINT}")
            result.return_code = EXIT_FAILED
            return result
    try:
        spec = read_spec_arg(spec_file)
        plan = compile_plan(spec, output_dir=output_dir)
    except SpecError as exc:
        for line in exc.lines():
            fail(line)
        result.return_code = EXIT_INVALID
        return result
    run_id = new_run_id()
    default_log = os.path.join(plan.output_dir, "audit", f"{run_id}.json")
    log_path = os.path.abspath(audit_log) if audit_log else default_log
    if audit_log and (clash := _log_clash(log_path, plan, part)):
        # an invalid command line, refused before anything is opened, like click's usage
        # errors (exit 2, no log: the path given for it is the problem)
        fail(f"error: --audit-log {log_path} is {clash}; kprune never writes a "
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
        todo = shard_jobs(plan, part)
        if refusal is None:
            try:
                refusal = hold_folder_locks(stack, plan.output_dir, part)
            except OSError as exc:
                fail(f"error: cannot use output folder {plan.output_dir}: {exc.strerror}")
                result.return_code = EXIT_FAILED
                return result
        session = None
        if refusal is None and ray is not None:
            from kprune_batch.ray_runner import RayUnavailable, ray_session

            try:
                session = stack.enter_context(ray_session(ray or None))
            except RayUnavailable as exc:
                refusal = str(exc)
        if refusal:
            fail(f"error: {refusal}")
            outcomes = [ModelOutcome(job=j, status=STATUS_SKIPPED, error=refusal)
                        for j in todo]
            for outcome in outcomes:
                finished(outcome)
        else:
            # neither what the run reads nor any model's output (an output may be *named*
            # like another output's temp file: it is a user's file all the same)
            keep = [plan.spec_path] + [j.input for j in plan.jobs] + [j.output for j in plan.jobs]
            # a SIGKILLed earlier run may have left temp files behind; only this shard's
            # outputs are looked at (the other shards' runs may be writing theirs right now)
            for job in todo:
                remove_stale_temps(job.output, keep=keep)
            with stop.installed():
                outcomes = _run_all(todo, stop, opener, probe, fail_fast, jobs, progress,
                                    session, on_done=finished)
        log = build_log(plan, spec_file, run_id, started, outcomes, fail_fast, probe, stop.signal,
                        shard=part)
        counts = {status: sum(1 for o in outcomes if o.status == status)
                  for status in (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)}
        say(f"{counts[STATUS_OK]} ok, {counts[STATUS_FAILED]} failed, "
            f"{counts[STATUS_SKIPPED]} skipped", False)
        try:
            write_log(log_path, log)
        except (OSError, AuditLogError) as exc:
            text = exc.strerror if isinstance(exc, OSError) else str(exc)
            fail(f"error: cannot write audit log {log_path}: {text}")
            result.return_code = EXIT_FAILED
    written = os.path.exists(log_path)
    if written:
        say(f"audit log: {log_path}", False)
    result.data = {"run_id": run_id, "status": log["status"], "counts": counts,
                   "models": [_model_json(o) for o in outcomes],
                   "audit_log": log_path if written else None}
    if result.return_code == EXIT_OK and any(o.status != STATUS_OK for o in outcomes):
        result.return_code = EXIT_FAILED
    return result


def outcome_lines(outcome: ModelOutcome) -> list[tuple[str, bool]]:
    """What apply prints for one finished model: (line, to_stderr) pairs."""
    if outcome.status == STATUS_FAILED:
        return [(f"error: {outcome.error}", True)]
    if outcome.status != STATUS_OK:
        return [(f"skipped {outcome.job.name}: {outcome.error}", False)]
    layers = len({r["layer"] for r in outcome.zeroed + outcome.removed})
    removed = f", removed {len(outcome.removed)}" if outcome.removed else ""
    kept = "" if outcome.written else " (unchanged: already held these bytes)"
    lines = [(f"ok      {outcome.job.name}: zeroed {len(outcome.zeroed)}{removed} filter(s) in "
              f"{layers} layer(s) -> {outcome.job.output}{kept}", False)]
    if outcome.impact is not None:
        from kprune_batch.impact import describe

        lines.append((f"        impact on {describe(outcome.impact)}", False))
    return lines


def _model_json(outcome: ModelOutcome) -> dict[str, Any]:
    """One model of `apply --format json` (README, "Machine-readable output")."""
    ok = outcome.status == STATUS_OK
    return {"name": outcome.job.name, "status": outcome.status, "input": outcome.job.input,
            "output": outcome.job.output if ok else None,
            "written": outcome.written if ok else None,
            "zeroed": len(outcome.zeroed), "removed": len(outcome.removed),
            "layers": len({r["layer"] for r in outcome.zeroed + outcome.removed}),
            "error": outcome.error, "impact": outcome.impact}


def _skip_reason(stop: _Stop, fail_fast: bool, done: list[ModelOutcome]) -> str | None:
    if stop.signal:
        return f"not run: kprune was stopped by {stop.signal}"
    if fail_fast and any(o.status == STATUS_FAILED for o in done):
        return "not run: an earlier model failed and --fail-fast is set"
    return None


def _run_all(todo: list[ModelJob], stop: _Stop, opener: Opener, probe: bool, fail_fast: bool,
             jobs: int, progress: bool, ray: RaySession | None = None,
             on_done: Callable[[ModelOutcome], None] = lambda _: None) -> list[ModelOutcome]:
    """Run the jobs in spec order (or `jobs` worker processes, or one Ray task each), handing
    each outcome to `on_done` as its model finishes; outcomes in spec order."""
    total = len(todo)
    done: dict[int, ModelOutcome] = {}

    def report(outcome: ModelOutcome) -> None:
        if progress:  # the progress line is cleared so that the model's own lines start clean
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        on_done(outcome)
        if progress:
            name = printable(outcome.job.name)  # a name cannot forge terminal output either
            sys.stderr.write(f"[{len(done)}/{total}] {name}: {outcome.status}")
            sys.stderr.flush()

    if ray is None and (jobs <= 1 or total <= 1):
        for i, job in enumerate(todo):
            reason = _skip_reason(stop, fail_fast, list(done.values()))
            done[i] = (ModelOutcome(job=job, status=STATUS_SKIPPED, error=reason) if reason
                       else run_job(job, opener=opener, probe=probe))
            report(done[i])
    elif ray is not None:
        _run_parallel(todo, done, lambda job: ray.submit(job, opener, probe), ray.width, stop,
                      fail_fast, report, "the Ray task failed", cancel=ray.cancel)
    else:
        import concurrent.futures  # only batches pay for these imports (~7 ms)
        import multiprocessing

        # Workers are spawned, never forked: a forked TensorFlow runtime can deadlock.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                    initializer=_worker_init,
                                                    initargs=(os.getpid(),)) as pool:
            _run_parallel(todo, done, lambda job: pool.submit(run_job, job, opener, True, probe),
                          jobs, stop, fail_fast, report, "the worker process failed")
    if progress:
        sys.stderr.write("\r\033[K")  # every model has its line: the count says the rest
        sys.stderr.flush()
    return [done[i] for i in range(total)]


def _run_parallel(todo: list[ModelJob], done: dict[int, ModelOutcome],
                  submit: Callable[[ModelJob], Future[ModelOutcome]], width: int, stop: _Stop,
                  fail_fast: bool, report: Callable[[ModelOutcome], None], died: str,
                  cancel: Callable[[list[Future[ModelOutcome]]], None] | None = None) -> None:
    """Keep `width` models in flight (worker processes or Ray tasks) until every job of `todo`
    has its outcome in `done`. A stop request (SIGTERM/SIGINT, or a failure under --fail-fast)
    hands out no more models and lets the running ones finish, as a serial run finishes its
    current model; the rest are skipped. A second signal `cancel`s the running ones (Ray)."""
    import concurrent.futures

    pending: dict[Future[ModelOutcome], int] = {}
    queue = list(enumerate(todo))
    cancelled = False
    while queue or pending:
        while queue and len(pending) < width and not _skip_reason(
                stop, fail_fast, list(done.values())):
            i, job = queue.pop(0)
            pending[submit(job)] = i
        if not pending:
            break
        if cancel is not None and stop.count > 1 and not cancelled:
            cancel(list(pending))
            cancelled = True
        finished, _ = concurrent.futures.wait(
            pending, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
            i = pending.pop(future)
            try:
                done[i] = future.result()
            except Exception as exc:  # the worker died (killed, out of memory) or was cancelled
                if cancelled:
                    done[i] = ModelOutcome(job=todo[i], status=STATUS_SKIPPED, error=(
                        f"cancelled while running by a second {stop.signal}: no output "
                        f"recorded (a temp file it left is removed by the next run)"))
                else:
                    done[i] = ModelOutcome(job=todo[i], status=STATUS_FAILED,
                                           error=f"model '{todo[i].name}': {died} "
                                                 f"({type(exc).__name__})")
            report(done[i])
    for i, job in queue:
        reason = _skip_reason(stop, fail_fast, list(done.values())) or "not run"
        done[i] = ModelOutcome(job=job, status=STATUS_SKIPPED, error=reason)
        report(done[i])


def _worker_init(parent: int) -> None:
    """Workers leave SIGINT/SIGTERM to the parent, which stops handing out models, and die with
    it: a worker outliving a SIGKILLed parent would finish its model and rename its output after
    the folder lock is gone (over what the next run writes), then block for ever on its task
    queue, whose write end every spawned worker holds too (so it never sees end of file)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # Linux: the kernel kills this process the moment the parent dies (prctl(2))
        import ctypes

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # elsewhere: a watcher thread polls the parent's pid
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.1)
            os._exit(1)

        threading.Thread(target=watch, name="kprune-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


# A spec read from stdin has no file, so no commit to name: the log's spec.path is '-' and its
# git block says why there is none (the sha256 still identifies the bytes that ran)
STDIN_GIT = {"commit": None, "dirty": None, "reason": "the spec was read from stdin"}


def build_log(plan: Plan, spec_file: str, run_id: str, started: str,
              outcomes: list[ModelOutcome], fail_fast: bool, probe: bool,
              interrupted: str | None, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """The audit log document of one run (schema/audit.schema.json); `outcomes` those of the
    run's models (a shard's), in spec order."""
    log: dict[str, Any] = {
        "version": AUDIT_VERSION,
        "run_id": run_id,
        "status": run_status([o.status for o in outcomes]),
        "spec": {"path": plan.spec_path, "sha256": plan.spec_sha256,
                 "git": STDIN_GIT if plan.spec_path == STDIN else git_provenance(spec_file)},
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
            # also for a model its guards failed: what the edit did is what the reviewer needs
            "impact": o.impact,
        } for o in outcomes],
        "zeroed": [record for o in outcomes if o.status == STATUS_OK for record in o.zeroed],
        "removed": [record for o in outcomes if o.status == STATUS_OK for record in o.removed],
    }
    if interrupted:
        log["interrupted"] = interrupted
    if shard is not None:
        log["shard"] = {"index": shard[0], "count": shard[1]}
    return log
