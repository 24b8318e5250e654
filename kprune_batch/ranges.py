"""Compact index ranges for people: [3, 9, 10, 11, 12] -> '3, 9-12'."""
from __future__ import annotations


def compact_ranges(indices: list[int]) -> str:
    parts: list[str] = []
    values = sorted(set(indices))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts)


def parse_ranges(text: str) -> list[int]:
    """The inverse of compact_ranges: '3, 9-12' -> [3, 9, 10, 11, 12]."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out
