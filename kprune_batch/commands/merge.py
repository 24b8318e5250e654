"""`kprune merge LOG... --output PATH`: one audit log from the shard logs of one run.

The shards of a run (`kprune apply SPEC --shard K/N`, K = 1..N) each log only their models. The
merged log is the log one unsharded run would have written, as far as a log can say: every model
in spec order, the records in spec order, the status over all models, the earliest start and the
latest end. It names the shard logs it was made of (`merged_from`, with their sha256) instead of
a `shard`. Whatever does not fit one run (a shard missing or given twice, another spec, another
plan, a model twice, a log that is not a shard's) is refused with one line naming it.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
from typing import Any

from kprune_batch.audit import read_log, run_status, write_log
from kprune_batch.commands import EXIT_FAILED, EXIT_INVALID, Result
from kprune_batch.errors import AuditLogError
from kprune_batch.files import sha256_file
from kprune_batch.logfacts import inconsistency

_MODEL_LOC = re.compile(r"models\[(\d+)\]")


class _Unfit(Exception):
    """A shard log that does not fit the others: one line."""


def merge(log_paths: list[str], output: str) -> Result:
    result = Result()
    output = os.path.abspath(output)
    for path in log_paths:
        if os.path.realpath(path) == os.path.realpath(output):
            # an invalid command line, refused before anything is read (exit 2, like apply's
            # --audit-log over a file of the run)
            result.err.append(f"error: --output {output} is the shard log {path}; kprune merge "
                              f"never writes over a log it reads: choose another path")
            result.return_code = EXIT_INVALID
            return result
    try:
        merged = merge_logs([(path, _read(path)) for path in log_paths])
        write_log(output, merged)
    except (AuditLogError, _Unfit) as exc:
        result.err.append(f"error: {exc.render() if isinstance(exc, AuditLogError) else exc}")
        result.return_code = EXIT_FAILED
        return result
    except OSError as exc:
        result.err.append(f"error: cannot write merged log {output}: {exc.strerror}")
        result.return_code = EXIT_FAILED
        return result
    result.data = {"output": output, "shards": len(log_paths), "models": len(merged["models"]),
                   "status": merged["status"], "run_id": merged["run_id"]}
    result.out.append(f"merged {len(log_paths)} shard log(s): {len(merged['models'])} model(s), "
                      f"status {merged['status']} -> {output}")
    return result


def _read(path: str) -> tuple[dict[str, Any], str]:
    """The shard log at `path` (schema- and consistency-checked) and the sha256 of its bytes."""
    log = read_log(path)
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise AuditLogError(f"{path}: cannot read audit log: {exc.strerror}") from None
    return log, digest


def _time(path: str, log: dict[str, Any], key: str) -> _dt.datetime:
    try:
        value = _dt.datetime.fromisoformat(log[key].replace("Z", "+00:00"))
    except ValueError:
        raise _Unfit(f"{path}: {key} {log[key]!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise _Unfit(f"{path}: {key} {log[key]!r} has no time zone")
    return value


def merge_logs(shards: list[tuple[str, tuple[dict[str, Any], str]]]) -> dict[str, Any]:
    """The merged log of `shards` [(path, (log, sha256 of its bytes))]; _Unfit when they are
    not every shard of one run exactly once."""
    by_index: dict[int, tuple[str, dict[str, Any], str]] = {}
    first_path, (first, _) = shards[0]
    for path, (log, digest) in shards:
        shard = log.get("shard")
        if shard is None:
            what = "a merged log" if "merged_from" in log else "the log of an unsharded run"
            raise _Unfit(f"{path} is not a shard log (no 'shard': {what}); merge takes the logs "
                         f"of kprune apply --shard K/N")
        k, n = shard["index"], shard["count"]
        if k > n:
            raise _Unfit(f"{path}: shard {k}/{n} is not a shard (K > N)")
        if log["spec"]["sha256"] != first["spec"]["sha256"]:
            raise _Unfit(f"{path} is a run of another spec (sha256 {log['spec']['sha256']}; "
                         f"{first_path}: {first['spec']['sha256']})")
        if log["plan_sha256"] != first["plan_sha256"]:
            raise _Unfit(f"{path} ran another plan of the spec (plan_sha256 "
                         f"{log['plan_sha256']}; {first_path}: {first['plan_sha256']}): another "
                         f"--output-dir or kprune version")
        for key, what in (("spec", "spec provenance (path, git commit)"),
                          ("options", "options"), ("tool", "tool versions")):
            if log[key] != first[key]:
                raise _Unfit(f"{path} has other {what} than {first_path}: shards of one run "
                             f"share them")
        if n != first["shard"]["count"]:
            raise _Unfit(f"{path} is shard {k}/{n}, {first_path} one of "
                         f"{first['shard']['count']}: shards of one run share one count")
        if k in by_index:
            raise _Unfit(f"{path} and {by_index[k][0]} are both shard {k}/{n}")
        by_index[k] = (path, log, digest)
    count = first["shard"]["count"]
    missing = [k for k in range(1, count + 1) if k not in by_index]
    if missing:
        raise _Unfit(f"shard(s) {', '.join(f'{k}/{count}' for k in missing)} missing: a merged "
                     f"log covers every shard of the run")
    ordered = [by_index[k] for k in range(1, count + 1)]
    total = sum(len(log["models"]) for _, log, _ in ordered)
    models: list[dict[str, Any] | None] = [None] * total
    owner: dict[str, str] = {}
    for k, (path, log, _) in enumerate(ordered, start=1):
        expected = len(range(k - 1, total, count))
        if len(log["models"]) != expected:
            raise _Unfit(f"{path}: shard {k}/{count} lists {len(log['models'])} model(s), but of "
                         f"{total} models of the shard logs it holds {expected} (position i with "
                         f"i mod {count} = {k - 1}): the logs are not one run's shards")
        for j, model in enumerate(log["models"]):
            if model["name"] in owner:
                raise _Unfit(f"model '{model['name']}' is in both {owner[model['name']]} and "
                             f"{path}")
            owner[model["name"]] = path
            models[j * count + k - 1] = model
    position = {m["name"]: i for i, m in enumerate(models)}  # type: ignore[union-attr]
    records: dict[str, dict[str, list[dict[str, Any]]]] = {"zeroed": {}, "removed": {}}
    for path, log, _ in ordered:
        for kind, per_model in records.items():
            for record in log[kind]:
                # a rule location names the model's place in the spec: it must be the place
                # the partition gives the model
                for loc in record["rules"]:
                    at = int(_MODEL_LOC.match(loc).group(1))  # type: ignore[union-attr]
                    if at != position[record["model"]]:
                        raise _Unfit(f"{path}: a record of model '{record['model']}' names rule "
                                     f"{loc}, but the model is at spec position "
                                     f"{position[record['model']]} in shard order")
                per_model.setdefault(record["model"], []).append(record)
    order = list(position)  # model names in spec order
    started = min(ordered, key=lambda s: _time(s[0], s[1], "started_at"))[1]
    finished = max(ordered, key=lambda s: _time(s[0], s[1], "finished_at"))[1]
    merged: dict[str, Any] = {
        "version": first["version"],
        "run_id": f"{started['run_id']}-merged",
        "status": run_status([m["status"] for m in models]),  # type: ignore[index]
        "spec": first["spec"],
        "plan_sha256": first["plan_sha256"],
        "command": first["command"],
        "started_at": started["started_at"],
        "finished_at": finished["finished_at"],
        "tool": first["tool"],
        "options": first["options"],
        "models": models,
        "zeroed": [r for name in order for r in records["zeroed"].get(name, [])],
        "removed": [r for name in order for r in records["removed"].get(name, [])],
    }
    stops = [f"{log['interrupted']} (shard {k}/{count})"
             for k, (_, log, _) in enumerate(ordered, start=1) if "interrupted" in log]
    if stops:
        merged["interrupted"] = "; ".join(stops)
    merged["merged_from"] = [{"path": os.path.abspath(path), "sha256": digest,
                              "run_id": log["run_id"], "shard": log["shard"]}
                             for path, log, digest in ordered]
    problem = inconsistency(merged)
    if problem:  # each shard log was consistent: only their combination can contradict
        raise _Unfit(f"the shard logs do not combine into a consistent log: {problem}")
    return merged
