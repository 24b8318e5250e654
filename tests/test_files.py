"""files: the one pass that copies (or compares), patches, hashes both sides and checks a CRC;
atomic writes that keep an identical output."""
from __future__ import annotations

import hashlib
import os
import re
import stat
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kprune_batch import files
from kprune_batch.files import (COPY_BLOCK, CorruptInput, atomic_write, copy_patched, crc32,
                                patched_equals)


DATA = bytes(range(256)) * ((3 * COPY_BLOCK) // 256 + 17)  # several blocks, a ragged end
# one patch inside a block, one across a block boundary, one at the very end
PATCHES = [(10, b"XYZ"), (COPY_BLOCK - 2, b"abcdef"), (len(DATA) - 4, b"1234")]
REGION = (5, 2 * COPY_BLOCK, zlib.crc32(DATA[5:5 + 2 * COPY_BLOCK]))


def patched_data() -> bytes:
    expected = bytearray(DATA)
    for offset, new in PATCHES:
        expected[offset:offset + len(new)] = new
    return bytes(expected)


def test_copy_patched_bytes_and_hashes(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(DATA)
    sha_in, sha_out = copy_patched(str(src), str(tmp_path / "out.bin"), PATCHES, REGION)
    assert (tmp_path / "out.bin").read_bytes() == patched_data()
    assert sha_in == hashlib.sha256(DATA).hexdigest()
    assert sha_out == hashlib.sha256(patched_data()).hexdigest()
    assert src.read_bytes() == DATA


def test_patched_equals_an_up_to_date_file(tmp_path: Path) -> None:
    src, other = tmp_path / "in.bin", tmp_path / "other.bin"
    src.write_bytes(DATA)
    other.write_bytes(patched_data())
    assert patched_equals(str(src), str(other), PATCHES, REGION) == (
        hashlib.sha256(DATA).hexdigest(), hashlib.sha256(patched_data()).hexdigest())


@pytest.mark.parametrize("where", [0, COPY_BLOCK + 5, len(DATA) - 1, "shorter", "longer",
                                   "missing"])
def test_patched_equals_finds_any_difference(tmp_path: Path, where: int | str) -> None:
    src, other = tmp_path / "in.bin", tmp_path / "other.bin"
    src.write_bytes(DATA)
    theirs = bytearray(patched_data())
    if isinstance(where, int):
        theirs[where] ^= 1
    elif where == "shorter":
        del theirs[-1]
    elif where == "longer":
        theirs += b"\0"
    if where != "missing":
        other.write_bytes(bytes(theirs))
    assert patched_equals(str(src), str(other), PATCHES, REGION) is None
    assert src.read_bytes() == DATA


def test_patched_equals_still_checks_the_input(tmp_path: Path) -> None:
    """An output identical to what a corrupt input would give is no reason to pass it."""
    src, other = tmp_path / "in.bin", tmp_path / "other.bin"
    src.write_bytes(DATA)
    other.write_bytes(patched_data())
    with pytest.raises(CorruptInput, match="does not match the zip directory"):
        patched_equals(str(src), str(other), PATCHES, (REGION[0], REGION[1], REGION[2] ^ 1))


@pytest.mark.parametrize("same", [True, False])
def test_atomic_write_keeps_an_identical_file(tmp_path: Path, same: bool) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old" * 1000)
    before = os.stat(dest)
    new = b"old" * 1000 if same else b"old" * 999 + b"new"
    replaced = atomic_write(str(dest), lambda tmp: Path(tmp).write_bytes(new),
                            keep_identical=True)
    after = os.stat(dest)
    assert replaced is not same
    assert dest.read_bytes() == new
    assert (after.st_ino == before.st_ino) is same
    assert os.listdir(tmp_path) == ["out.bin"]  # no temp file left either way


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


@st.composite
def _cases(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes]], bytes]:
    """A file, patches inside it, and another file: the patched bytes, perhaps altered."""
    data = draw(st.binary(max_size=300))
    patches = []
    for _ in range(draw(st.integers(0, 4)) if data else 0):
        offset = draw(st.integers(0, len(data) - 1))
        patches.append((offset, draw(st.binary(min_size=1, max_size=len(data) - offset))))
    expected = bytearray(data)
    for offset, new in sorted(patches):
        expected[offset:offset + len(new)] = new
    other = bytearray(expected)
    change = draw(st.sampled_from(["none", "flip", "cut", "grow"]))
    if change == "flip" and other:
        other[draw(st.integers(0, len(other) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif change == "cut" and other:
        del other[draw(st.integers(0, len(other) - 1)):]
    elif change == "grow":
        other += b"x"
    return data, patches, bytes(other)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases(), block=st.sampled_from([1, 3, 64, 1000]))
def test_one_pass_against_a_bytes_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            case: tuple, block: int) -> None:
    """copy_patched writes exactly the patched bytes and patched_equals says equal exactly when
    the other file holds them, for any block size (so patches across blocks are covered)."""
    data, patches, other = case
    monkeypatch.setattr(files, "COPY_BLOCK", block)
    src, out, theirs = tmp_path / "in.bin", tmp_path / "out.bin", tmp_path / "other.bin"
    src.write_bytes(data)
    theirs.write_bytes(other)
    expected = bytearray(data)
    for offset, new in sorted(patches):
        expected[offset:offset + len(new)] = new
    hashes = (hashlib.sha256(data).hexdigest(), hashlib.sha256(expected).hexdigest())
    crc = (0, len(data), zlib.crc32(data))
    assert copy_patched(str(src), str(out), patches, crc) == hashes
    assert out.read_bytes() == bytes(expected)
    assert patched_equals(str(src), str(theirs), patches, crc) == (
        hashes if other == bytes(expected) else None)


# --- what the writers and readers accept -----------------------------------------------------

def test_temp_files_are_created_exclusively_with_ordinary_permissions(tmp_path: Path) -> None:
    """The temp name is taken at once (O_EXCL): a writer then writes into a file of this run,
    never through something planted under that name; the umask decides its mode as for any
    new file (a fixed 0o600 would make every output unreadable to the team)."""
    dest = tmp_path / "m.keras"
    old = os.umask(0o022)
    try:
        with files.temp_path_beside(str(dest), ".keras") as tmp:
            name = os.path.basename(tmp)
            st = os.lstat(tmp)
            assert stat.S_ISREG(st.st_mode) and st.st_size == 0
            assert stat.S_IMODE(st.st_mode) == 0o644
            assert re.fullmatch(r"\.m\.keras\.[0-9a-f]{16}\.kprune-tmp\.keras", name)
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == []


def test_remove_stale_temps_takes_only_its_own(tmp_path: Path) -> None:
    dest = tmp_path / "m.keras"
    ours = [".m.keras.0123456789abcdef.kprune-tmp.keras",
            ".m.keras.0123456789abcdef.kprune-tmp.keras.weights.h5"]
    others = [".m.keras.abc.tmp.keras", ".m.keras.0123456789abcdeX.kprune-tmp.keras",
              ".n.keras.0123456789abcdef.kprune-tmp.keras", "m.keras"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    spared = tmp_path / ".m.keras.1111111111111111.kprune-tmp.h5"  # an input: in `keep`
    spared.write_bytes(b"input")
    linked = tmp_path / ".m.keras.2222222222222222.kprune-tmp.h5"  # another name of an input
    os.link(tmp_path / "m.keras", linked)
    link = tmp_path / ".m.keras.3333333333333333.kprune-tmp.h5"
    link.symlink_to(tmp_path / "m.keras")
    removed = files.remove_stale_temps(str(dest), keep=[str(spared), str(tmp_path / "m.keras")])
    assert sorted(removed) == sorted(ours)
    assert sorted(os.listdir(tmp_path)) == sorted(others + [spared.name, linked.name, link.name])


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_readers_refuse_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    """Without blocking: opening a FIFO for reading waits for a writer unless O_NONBLOCK."""
    path = tmp_path / "x"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    for read in (files.sha256_file, files.read_regular, files.open_regular):
        with pytest.raises(files.NotRegularFile) as info:
            read(str(path))
        assert info.value.strerror == {
            "fifo": "it is a FIFO (named pipe), not a regular file",
            "dev-zero": "it is a character device (a link to /dev/zero), not a regular file",
            "folder": "it is a folder, not a regular file"}[kind]
    src = tmp_path / "src"
    src.write_bytes(b"")  # as long as a FIFO claims to be: only the open can tell
    assert files.patched_equals(str(src), str(path), []) is None


def test_sha256_file_reads_a_regular_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(DATA)
    assert files.sha256_file(str(path)) == hashlib.sha256(DATA).hexdigest()
    assert files.read_regular(str(path)) == DATA
