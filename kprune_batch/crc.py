"""CRC-32 of a byte range after patching a few spans of it, without reading the range again.

CRC-32 is affine over GF(2): for messages of equal length, crc(new) = crc(old) ^ L(old ^ new),
where L is the CRC with zero initial value and no final xor (linear: L(old ^ new) = L(old) ^
L(new)). old ^ new is zero outside the patched spans, and appending k zero bytes to a message multiplies L by x^(8k) mod P, which is
the operator zlib's crc32_combine() builds by repeated squaring (zlib/crc32.c). So the new
CRC costs O(patched bytes + log(range)) instead of a pass over a 500 MB weights member.
"""
from __future__ import annotations

from functools import lru_cache

_POLY = 0xEDB88320  # CRC-32 (reflected), as zlib


def _times(matrix: tuple[int, ...], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _square(matrix: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(matrix, matrix[n]) for n in range(32))


@lru_cache(maxsize=None)
def _zero_bytes_operator(log2: int) -> tuple[int, ...]:
    """The operator that appends 2**log2 zero bytes to L."""
    if log2 == 0:
        one_bit = (_POLY,) + tuple(1 << n for n in range(31))
        return _square(_square(_square(one_bit)))  # 8 zero bits
    return _square(_zero_bytes_operator(log2 - 1))


def _shift(value: int, zero_bytes: int) -> int:
    """L(m + zero_bytes * b'\\0') from L(m)."""
    bit = 0
    while zero_bytes:
        if zero_bytes & 1:
            value = _times(_zero_bytes_operator(bit), value)
        zero_bytes >>= 1
        bit += 1
    return value


def linear(data: bytes | memoryview) -> int:
    """L(data): the CRC register run from 0 with no final xor. zlib's crc32(data, value) starts
    from ~value and returns ~register (zlib/crc32.c), so value 0xFFFFFFFF starts it at 0: one
    pass over `data` with the fast CRC (ISA-L where installed; a ranking over every conv
    patches whole kernels, ~100 MB of spans for a ResNet50), no zero buffer, no copy."""
    from kprune_batch.files import crc32

    return crc32(data, 0xFFFFFFFF) ^ 0xFFFFFFFF


def patched_crc32(old_crc: int, size: int,
                  spans: list[tuple[int, bytes | memoryview | int, bytes | memoryview]]) -> int:
    """CRC-32 of a `size`-byte range whose CRC was `old_crc`, after replacing the bytes at each
    (offset in the range, old bytes, new bytes); spans must not overlap. The old bytes may be
    given as their linear(), an int, when they were seen before (as many bytes as the new)."""
    crc = old_crc
    for offset, old, new in spans:
        known = isinstance(old, int)
        if (not known and len(old) != len(new)) or offset < 0 or offset + len(new) > size:
            raise ValueError("a patch must keep its length and stay inside the range")
        # L is linear: L(old ^ new) = L(old) ^ L(new), so neither an xor nor its copy is made
        delta = (old if known else linear(old)) ^ linear(new)
        if delta:  # 0 when the span's bytes did not change (or changed CRC-invisibly: same)
            crc ^= _shift(delta, size - offset - len(new))
    return crc & 0xFFFFFFFF
