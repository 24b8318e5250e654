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


def diff(old_path: str, new_path: str) -> Result:
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
    for name in sorted(set(statuses_old) | set(statuses_new)):
        if statuses_old.get(name) != statuses_new.get(name):
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
    return result
