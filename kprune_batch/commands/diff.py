"""`kprune diff OLD NEW`: which filters two runs zeroed differently, per model and layer; no TensorFlow."""
from __future__ import annotations

from collections import defaultdict

from kprune_batch.audit import read_log
from kprune_batch.commands import EXIT_FAILED, Result
from kprune_batch.errors import AuditLogError
from kprune_batch.ranges import compact_ranges


def _zeroed(log: dict) -> dict[tuple[str, str], set[int]]:
    out: dict[tuple[str, str], set[int]] = defaultdict(set)
    for r in log["zeroed"]:
        out[(r["model"], r["layer"])].add(int(r["filter"]))
    return out


def diff(old_path: str, new_path: str) -> Result:
    result = Result()
    try:
        old, new = read_log(old_path), read_log(new_path)
    except AuditLogError as exc:
        result.err.append(f"error: {exc}")
        result.return_code = EXIT_FAILED
        return result
    before, after = _zeroed(old), _zeroed(new)
    statuses_old = {m["name"]: m["status"] for m in old["models"]}
    statuses_new = {m["name"]: m["status"] for m in new["models"]}
    for name in sorted(set(statuses_old) | set(statuses_new)):
        if statuses_old.get(name) != statuses_new.get(name):
            result.out.append(f"model {name}: status {statuses_old.get(name, 'absent')} -> "
                              f"{statuses_new.get(name, 'absent')}")
    changed = False
    for key in sorted(set(before) | set(after)):
        added = sorted(after.get(key, set()) - before.get(key, set()))
        removed = sorted(before.get(key, set()) - after.get(key, set()))
        if not added and not removed:
            continue
        changed = True
        parts = []
        if added:
            parts.append(f"+{compact_ranges(added)}")
        if removed:
            parts.append(f"-{compact_ranges(removed)}")
        result.out.append(f"{key[0]} {key[1]}: {'  '.join(parts)}  "
                          f"({len(before.get(key, ()))} -> {len(after.get(key, ()))} zeroed)")
    if not changed:
        result.out.append("no difference in zeroed filters")
    return result
