"""files.copy_patched: one pass that copies, patches, hashes both sides and checks a CRC."""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import pytest

from kprune_batch.files import COPY_BLOCK, CorruptInput, copy_patched, crc32


def test_copy_patched_bytes_and_hashes(tmp_path: Path) -> None:
    data = bytes(range(256)) * ((3 * COPY_BLOCK) // 256 + 17)  # several blocks, a ragged end
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    # one patch inside a block, one across a block boundary, one at the very end
    patches = [(10, b"XYZ"), (COPY_BLOCK - 2, b"abcdef"), (len(data) - 4, b"1234")]
    expected = bytearray(data)
    for offset, new in patches:
        expected[offset:offset + len(new)] = new
    region = (5, 2 * COPY_BLOCK, zlib.crc32(data[5:5 + 2 * COPY_BLOCK]))
    sha_in, sha_out = copy_patched(str(src), str(tmp_path / "out.bin"), patches, region)
    assert (tmp_path / "out.bin").read_bytes() == bytes(expected)
    assert sha_in == hashlib.sha256(data).hexdigest()
    assert sha_out == hashlib.sha256(expected).hexdigest()
    assert src.read_bytes() == data


def test_copy_patched_refuses_a_corrupt_input(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"\0" * 1000)
    with pytest.raises(CorruptInput, match="does not match the zip directory"):
        copy_patched(str(src), str(tmp_path / "out.bin"), [], (100, 500, 12345))
    with pytest.raises(CorruptInput, match=r"places bytes 900\.\.1100 past the end of the file "
                                           r"\(1000 bytes; the file is truncated\)"):
        copy_patched(str(src), str(tmp_path / "out.bin"), [], (900, 200, zlib.crc32(b"")))


@pytest.mark.parametrize("patch", [(998, b"abc"), (-1, b"a")])
def test_copy_patched_refuses_a_patch_outside_the_file(tmp_path: Path, patch: tuple) -> None:
    """Never silently dropped: the output would not be what the caller hashed and recorded."""
    src = tmp_path / "in.bin"
    src.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match=f"patch of {len(patch[1])} bytes at {patch[0]} lies "
                                         f"outside"):
        copy_patched(str(src), str(tmp_path / "out.bin"), [patch])
    assert not (tmp_path / "out.bin").exists()


def test_crc32_is_zlibs_crc32() -> None:
    """The fast CRC (ISA-L when installed) must give zlib's values, running value included."""
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 3 * 1024 * 1024 + 17, dtype=np.uint8).tobytes()
    assert crc32(data) == zlib.crc32(data)
    running = 0
    for start in range(0, len(data), 1_000_003):
        running = crc32(memoryview(data)[start:start + 1_000_003], running)
    assert running == zlib.crc32(data)
    assert crc32(b"") == zlib.crc32(b"") == 0
