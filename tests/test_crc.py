"""crc.patched_crc32 against zlib.crc32 of the patched bytes, computed here."""
from __future__ import annotations

import random
import zlib

import pytest

from kprune_batch.crc import linear, patched_crc32


@pytest.mark.parametrize("size", [1, 7, 4096, 100_003, 3_000_000])
def test_patched_crc_equals_a_full_recompute(size: int) -> None:
    rng = random.Random(size)
    for _ in range(20):
        data = bytearray(rng.randbytes(size))
        old = zlib.crc32(data)
        spans, pos = [], 0
        while pos < size and rng.random() < 0.8:
            offset = rng.randrange(pos, size)
            length = rng.randint(1, min(5000, size - offset))
            new = rng.randbytes(length)
            spans.append((offset, bytes(data[offset:offset + length]), new))
            data[offset:offset + length] = new
            pos = offset + length
        assert patched_crc32(old, size, spans) == zlib.crc32(data)
        # the old bytes given as their linear() (as the direct backend keeps them from its
        # reads) give the same CRC
        seen = [(offset, linear(before), new) for offset, before, new in spans]
        assert patched_crc32(old, size, seen) == zlib.crc32(data)


def test_a_patch_must_keep_its_length() -> None:
    with pytest.raises(ValueError, match="keep its length"):
        patched_crc32(0, 10, [(2, b"ab", b"abc")])
    with pytest.raises(ValueError, match="inside the range"):
        patched_crc32(0, 10, [(9, b"ab", b"cd")])


def test_patched_crc_of_large_memoryview_spans() -> None:
    # the direct backend hands whole kernels as memoryviews of numpy arrays (MBs each)
    rng = random.Random(5)
    data = bytearray(rng.randbytes(9_000_000))
    old = zlib.crc32(data)
    spans = []
    for offset, length in ((17, 2_500_000), (3_000_001, 4_000_000), (8_999_990, 10)):
        new = memoryview(bytearray(rng.randbytes(length)))
        spans.append((offset, bytes(data[offset:offset + length]), new))
        data[offset:offset + length] = new
    spans.append((2_600_000, bytes(data[2_600_000:2_600_100]), bytes(data[2_600_000:2_600_100])))
    assert patched_crc32(old, len(data), spans) == zlib.crc32(data)
