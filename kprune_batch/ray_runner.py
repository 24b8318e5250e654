"""`kprune apply SPEC --ray [ADDRESS]`: one Ray task per model, on an existing Ray cluster or a
local one started for the run. The optional extra `kprune-batch[ray]` installs Ray.

A task runs exactly what a serial run runs for the model (executor.run_job, which never raises:
a failing model comes back as its `failed` outcome), so the outputs and the log are those of a
serial run. Tasks refer to kprune's functions by module (cloudpickle pickles module-level
functions by name): every node needs kprune-batch installed, and the spec's model and output
paths must mean the same files there (a shared volume), as they do on a local Ray.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
from typing import Any, Iterator

from kprune_batch.errors import KpruneError
from kprune_batch.executor import ModelOutcome, Opener, run_job
from kprune_batch.plan import ModelJob

EXTRA_HINT = "pip install 'kprune-batch[ray]'"


class RayUnavailable(KpruneError):
    """Ray is not installed, or the cluster cannot be reached."""


class RaySession:
    """A connected Ray: submits one task per model and cancels running ones on request."""

    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_job)
        self._refs: dict[concurrent.futures.Future[ModelOutcome], Any] = {}

    @property
    def width(self) -> int:
        """Models in flight at once: the cluster's CPUs (one task takes one), at least 1.

        Submitting no more than Ray can start keeps every submitted task a running one, so that
        a stop request leaves only whole models behind (see _run_parallel in commands/apply)."""
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def submit(self, job: ModelJob, opener: Opener, probe: bool
               ) -> concurrent.futures.Future[ModelOutcome]:
        ref = self._task.remote(job, opener, True, probe)
        future = ref.future()
        self._refs[future] = ref
        return future

    def cancel(self, futures: list[concurrent.futures.Future[ModelOutcome]]) -> None:
        """Stop running tasks now (their worker processes are killed: a temp file they leave
        is removed by the next run's stale-temp cleanup)."""
        for future in futures:
            with contextlib.suppress(Exception):
                self._ray.cancel(self._refs[future], force=True)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[RaySession]:
    """Connect to the Ray cluster at `address` (any form ray.init takes: 'auto', 'HOST:PORT',
    'ray://HOST:10001'), or start a local one (address None) with this process's CPUs and no
    dashboard, shut down when the run ends. RayUnavailable, one line, if neither works."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--ray needs Ray, which is not installed: {EXTRA_HINT}") from None
    options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                               "include_dashboard": False}
    if address:
        options["address"] = address
    else:
        options["num_cpus"] = len(os.sched_getaffinity(0)) if hasattr(
            os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        from kprune_batch.quiet import native_stderr_silenced

        # Ray's start-up writes warnings (shared memory size, ports) on file descriptor 2
        with native_stderr_silenced():
            ray.init(**options)
    except Exception as exc:  # ConnectionError, a timeout, a version mismatch, ...
        where = f"at {address}" if address else "locally"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RayUnavailable(f"cannot start or reach Ray {where}: {first}") from None
    try:
        yield RaySession(ray)
    finally:
        ray.shutdown()


def failed_task(exc: BaseException) -> str:
    """Why a task returned no outcome (its worker died, it was cancelled, ...), for the log."""
    return f"the Ray task failed ({type(exc).__name__})"


