"""`kprune diff OLD NEW`: which filters two runs zeroed or removed differently, per model and layer;
no TensorFlow."""
from __future__ import annotations

from kprune_batch.audit import read_log
from kprune_batch.commands import EXIT_FAILED, Result
from kprune_batch.errors import AuditLogError
from kprune_batch.logfacts import REMOVED, ZEROED, filter_fates
from kprune_batch.ranges import compact_ranges


def _count(fates: dict[int, str], kinds: set[str]) -> str:
    """'4 zeroed', '2 removed' or '1 zeroed, 2 removed' (`kinds`: the actions on either side)."""
    parts = [f"{sum(1 for k in fates.values() if k == kind)} {kind}"
             for kind in (ZEROED, REMOVED) if kind in kinds]
    return ", ".join(parts)


def _counts(fates: dict[int, str]) -> dict[str, int]:
    return {kind: sum(1 for k in fates.values() if k == kind) for kind in (ZEROED, REMOVED)}


def diff(old_path: str, new_path: str, exit_code: bool = False) -> Result:
    """`exit_code` (--exit-code): exit 1 when the runs differ, as `git diff --exit-code` does;
    an unreadable log is exit 1 either way (README, diff)."""
    result = Result()
    try:
        old, new = read_log(old_path), read_log(new_path)
    except AuditLogError as exc:
        result.err.append(f"error: {exc.render()}")
        result.return_code = EXIT_FAILED
        return result
    before, after = filter_fates(old), filter_fates(new)
    statuses_old = {m["name"]: m["status"] for m in old["models"]}
    statuses_new = {m["name"]: m["status"] for m in new["models"]}
    statuses: list[dict[str, str]] = []
    layers: list[dict[str, object]] = []
    for name in sorted(set(statuses_old) | set(statuses_new)):
        if statuses_old.get(name) != statuses_new.get(name):
            statuses.append({"model": name, "old": statuses_old.get(name, "absent"),
                             "new": statuses_new.get(name, "absent")})
            result.out.append(f"model {name}: status {statuses_old.get(name, 'absent')} -> "
                              f"{statuses_new.get(name, 'absent')}")
    changed = False
    removing = any(REMOVED in f.values() for f in (*before.values(), *after.values()))
    for key in sorted(set(before) | set(after)):
        was, now = before.get(key, {}), after.get(key, {})
        added = sorted(set(now) - set(was))
        dropped = sorted(set(was) - set(now))
        moved = sorted(f for f in set(was) & set(now) if was[f] != now[f])
        if not added and not dropped and not moved:
            continue
        changed = True
        layers.append({"model": key[0], "layer": key[1], "added": added, "dropped": dropped,
                       "zeroed_to_removed": [f for f in moved if now[f] == REMOVED],
                       "removed_to_zeroed": [f for f in moved if now[f] == ZEROED],
                       "old": _counts(was), "new": _counts(now)})
        parts = []
        if added:
            parts.append(f"+{compact_ranges(added)}")
        if dropped:
            parts.append(f"-{compact_ranges(dropped)}")
        for old_kind, new_kind in ((ZEROED, REMOVED), (REMOVED, ZEROED)):
            turned = [f for f in moved if was[f] == old_kind and now[f] == new_kind]
            if turned:
                parts.append(f"{compact_ranges(turned)} {old_kind} -> {new_kind}")
        kinds = set(was.values()) | set(now.values())
        if len(kinds) == 1:  # one action on both sides: '(4 -> 3 zeroed)'
            (kind,) = kinds
            counts = f"{len(was)} -> {len(now)} {kind}"
        else:
            counts = f"{_count(was, kinds)} -> {_count(now, kinds)}"
        result.out.append(f"{key[0]} {key[1]}: {'  '.join(parts)}  ({counts})")
    if not changed:
        result.out.append("no difference in zeroed or removed filters" if removing
                          else "no difference in zeroed filters")
    differ = bool(statuses or layers)
    result.data = {"old": old_path, "new": new_path, "differ": differ, "statuses": statuses,
                   "layers": layers}
    if exit_code and differ:
        result.return_code = EXIT_FAILED
    return result
