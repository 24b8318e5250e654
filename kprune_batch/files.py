"""File handling shared by every writer: hashing and atomic replacement in the destination folder;
reading only regular files (never a FIFO or a device that would block or never end)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
from typing import Any, BinaryIO, Callable, Iterable, Iterator

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message ("a FIFO (named pipe)")."""
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


class NotRegularFile(OSError):
    """A path that must be a regular file is something else: reading a FIFO blocks until a
    writer comes (forever, in a batch job), /dev/zero never ends, a folder has no bytes."""

    def __init__(self, path: str, mode: int):
        self.kind = file_kind(mode)
        if os.path.islink(path):
            self.kind += f" (a link to {os.path.realpath(path)})"
        super().__init__(errno.EINVAL, f"it is {self.kind}, not a regular file", path)


def open_regular(path: str) -> BinaryIO:
    """Open `path` for reading if it is a regular file (links followed), else NotRegularFile.

    O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer (open(2)); with it the
    open returns at once and fstat says what the file is, with no window between the check and
    the open. The descriptor is made blocking again for the reads of a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str) -> bytes:
    """The bytes of a regular file, read no further than the size it has when opened."""
    with open_regular(path) as fh:
        return fh.read(os.fstat(fh.fileno()).st_size)


def sha256_file(path: str) -> str:
    """sha256 of a regular file's bytes up to its size when opened (NotRegularFile otherwise:
    a FIFO would block and /dev/zero never end)."""
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        left = os.fstat(fh.fileno()).st_size
        while left > 0 and (block := fh.read(min(1 << 20, left))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


COPY_BLOCK = 1 << 22
_QUEUE_BLOCKS = 3  # blocks queued per worker: bounds memory at ~12 blocks (48 MB)

try:  # ISA-L's CRC-32 is ~7x zlib's (0.03 s vs 0.24 s on a 554 MB member); same values
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - platforms without an isal wheel
    from zlib import crc32 as _crc32


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """zlib-compatible CRC-32, from the fastest implementation installed."""
    return _crc32(data, value)


class CorruptInput(ValueError):
    """The input's bytes do not match the CRC-32 its zip directory records for them."""


def _patched(block: bytes, pos: int, patches: list[tuple[int, bytes]]) -> bytes | bytearray:
    """`block` (the file's bytes from `pos`) with the parts of `patches` that fall inside it."""
    out: bytes | bytearray = block
    end = pos + len(block)
    for offset, data in patches:
        lo, hi = max(offset, pos), min(offset + len(data), end)
        if lo < hi:
            if out is block:
                out = bytearray(block)
            out[lo - pos:hi - pos] = data[lo - offset:hi - offset]
    return out


class _Pieces:
    """The patched bytes of each block as pieces that are views (of the block read and of the
    patches' own bytes), never a copy: a ranking over every conv of ResNet50 patches ~all of
    its 103 MB, which copying block by block cost ~0.06 s of CPU (holding the GIL the hashing
    threads wait for). Patches sorted; overlapping ones (never in real edits: no two datasets
    share bytes) are applied in that order by _patched, as one piece per block."""

    def __init__(self, patches: list[tuple[int, bytes]]):
        self._patches = [(offset, memoryview(data).cast("B")) for offset, data in patches]
        self._overlap = any(a[0] + len(a[1]) > b[0] for a, b in zip(patches, patches[1:]))
        self._raw = patches
        self._next = 0  # the first patch that may still reach the current block

    def of(self, block: bytes, pos: int) -> list[memoryview | bytes | bytearray]:
        """The pieces of `block` patched, in order; blocks must come in file order."""
        if self._overlap:
            return [_patched(block, pos, self._raw)]
        end = pos + len(block)
        patches = self._patches
        while self._next < len(patches) and \
                patches[self._next][0] + len(patches[self._next][1]) <= pos:
            self._next += 1
        view = memoryview(block)
        pieces: list[memoryview | bytes | bytearray] = []
        at = pos
        i = self._next
        while i < len(patches) and patches[i][0] < end:
            offset, data = patches[i]
            lo, hi = max(offset, pos), min(offset + len(data), end)
            if lo < hi:
                if at < lo:
                    pieces.append(view[at - pos:lo - pos])
                pieces.append(data[lo - offset:hi - offset])
                at = hi
            i += 1
        if at < end or not pieces:
            pieces.append(view[at - pos:])
        return pieces


def copy_patched(src: str, dest: str, patches: list[tuple[int, bytes]],
                 crc_range: tuple[int, int, int] | None = None) -> tuple[str, str]:
    """Copy `src` to `dest` in one pass, writing each (offset, bytes) patch over the copy;
    return the sha256 of `src` and of `dest` as read and written.

    One read of the input instead of four (hash it, copy it, CRC the member, hash the output),
    pipelined (see _patched_pass); the writer starts write-back of the copy as it goes
    (POSIX_FADV_DONTNEED starts it on Linux) so the caller's fsync finds little left.
    `crc_range` (start, size, crc) checks the CRC-32 of those input bytes as they pass: a
    corrupt input raises CorruptInput instead of being copied on; patches must lie inside the
    file (ValueError otherwise: a caller's bug, never silently dropped).
    """
    _check_ranges(src, patches, crc_range)  # before `dest` is created
    with open(dest, "wb") as fout:
        started = [0]

        def write(pos: int, size: int, pieces: list[Any]) -> None:
            for piece in pieces:
                fout.write(piece)
            end = pos + size
            if hasattr(os, "posix_fadvise") and end - started[0] >= 16 * COPY_BLOCK:
                fout.flush()
                os.posix_fadvise(fout.fileno(), started[0], end - started[0],
                                 os.POSIX_FADV_DONTNEED)
                started[0] = end

        return _patched_pass(src, patches, crc_range, write)


class _Differs(Exception):
    """Raised inside patched_equals' pass at the first block that differs."""


def patched_equals(src: str, other: str, patches: list[tuple[int, bytes]],
                   crc_range: tuple[int, int, int] | None = None) -> tuple[str, str] | None:
    """If `other` already holds exactly the bytes copy_patched(src, _, patches) would write,
    the sha256 of `src` and of those bytes (found in the same one pass, nothing written);
    else None, as soon as a block differs. The same checks as copy_patched apply to `src`."""
    _check_ranges(src, patches, crc_range)
    try:
        fother = open_regular(other)
    except OSError:  # missing, unreadable, or not a regular file: not the same either way
        return None
    if os.fstat(fother.fileno()).st_size != os.path.getsize(src):
        fother.close()
        return None
    with fother:
        def compare(_pos: int, size: int, pieces: list[Any]) -> None:
            try:
                theirs = fother.read(size)
            except OSError:
                raise _Differs from None  # unreadable is not the same: it gets rewritten
            if len(theirs) != size:
                raise _Differs
            at = 0
            for piece in pieces:  # startswith at an offset: a memcmp, no slice copied
                if not theirs.startswith(piece, at):
                    raise _Differs
                at += len(piece)

        try:
            return _patched_pass(src, patches, crc_range, compare)
        except _Differs:
            return None


def _check_ranges(src: str, patches: list[tuple[int, bytes]],
                  crc_range: tuple[int, int, int] | None) -> None:
    size = os.path.getsize(src)
    for offset, data in patches:
        if offset < 0 or offset + len(data) > size:
            raise ValueError(f"patch of {len(data)} bytes at {offset} lies outside {src} "
                             f"({size} bytes)")
    if crc_range is not None and crc_range[0] + crc_range[1] > size:
        raise CorruptInput(f"{src}: the zip directory places bytes {crc_range[0]}.."
                           f"{crc_range[0] + crc_range[1]} past the end of the file ({size} bytes;"
                           f" the file is truncated)")


def _patched_pass(src: str, patches: list[tuple[int, bytes]],
                  crc_range: tuple[int, int, int] | None,
                  sink: Callable[[int, int, list[Any]], None]) -> tuple[str, str]:
    """Read `src` once and hand `sink` its bytes with `patches` applied, block by block in order
    (sink(offset, size, pieces): the block's patched bytes as the concatenation of `pieces`,
    views valid during the call, see _Pieces); return the sha256 of `src` and of the patched
    bytes.

    Pipelined: this thread reads blocks and applies the patches; three workers take each block,
    one hashing the input and checking the CRC, one hashing the patched bytes, one running
    `sink` (hashlib, the CRC and file I/O release the GIL, so the two hashes, which are most of
    the CPU, run on two cores side by side, and neither waits for the disk). An exception in a
    worker stops the reading and is re-raised here. Callers check the ranges first
    (_check_ranges).
    """
    import queue
    import threading

    # distinct offsets in real edits, so the data (memoryviews there) is never compared
    pieces_of = _Pieces(sorted(patches))
    sha_in, sha_out = hashlib.sha256(), hashlib.sha256()
    crc = [0]
    errors: list[BaseException] = []

    def check(pos: int, block: bytes, _pieces: list[Any]) -> None:
        sha_in.update(block)
        if crc_range is not None:
            lo, hi = max(crc_range[0], pos), min(crc_range[0] + crc_range[1], pos + len(block))
            if lo < hi:
                crc[0] = crc32(memoryview(block)[lo - pos:hi - pos], crc[0])

    def hash_out(_pos: int, _block: bytes, pieces: list[Any]) -> None:
        for piece in pieces:
            sha_out.update(piece)

    def to_sink(pos: int, block: bytes, pieces: list[Any]) -> None:
        sink(pos, len(block), pieces)

    def worker(jobs: queue.Queue, step: Callable[[int, bytes, list[Any]], None]) -> None:
        # Keeps draining after a failure so the reader never blocks on a full queue.
        while (job := jobs.get()) is not None:
            if not errors:
                try:
                    step(*job)
                except BaseException as exc:  # re-raised in the calling thread below
                    errors.append(exc)

    with open_regular(src) as fin:
        left = os.fstat(fin.fileno()).st_size  # bounded: what _check_ranges measured, no more
        steps = (check, hash_out, to_sink)
        queues: list[queue.Queue] = [queue.Queue(_QUEUE_BLOCKS) for _ in steps]
        threads = [threading.Thread(target=worker, args=(q, step), daemon=True)
                   for q, step in zip(queues, steps)]
        for thread in threads:
            thread.start()
        try:
            pos = 0
            while not errors and left > 0 and (block := fin.read(min(COPY_BLOCK, left))):
                job = (pos, block, pieces_of.of(block, pos))
                for q in queues:
                    q.put(job)
                pos += len(block)
                left -= len(block)
        finally:
            for q in queues:
                q.put(None)
            for thread in threads:
                thread.join()
    if errors:
        raise errors[0]
    if crc_range is not None and crc[0] != crc_range[2]:
        raise CorruptInput(f"{src}: the CRC-32 of bytes {crc_range[0]}.."
                           f"{crc_range[0] + crc_range[1]} does not match the zip directory (the"
                           f" file is corrupt)")
    return sha_in.hexdigest(), sha_out.hexdigest()


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


TEMP_MARK = ".kprune-tmp"  # in every temp file name kprune makes, and in no other name it uses


def _temp_pattern(dest: str) -> re.Pattern[str]:
    """Names of the temp files temp_path_beside makes for `dest`, including what writers add to
    them (Keras's staging `.keras`, the direct backend's `.weights.h5`)."""
    return re.compile(rf"\.{re.escape(os.path.basename(dest))}\.[0-9a-f]{{16}}"
                      rf"{re.escape(TEMP_MARK)}(\.[A-Za-z0-9]+)*")


def remove_stale_temps(dest: str, keep: Iterable[str] = ()) -> list[str]:
    """Delete temp files a killed run left beside `dest` (call only while holding the run lock).

    Only names kprune itself makes (its marker and random part: see temp_path_beside), only
    regular files (a link is never followed, nor removed), and never a file in `keep` (the
    files the run reads: its inputs and spec), compared by path and by inode so that neither
    a link nor a hard link makes one look like a temp file.
    """
    folder = os.path.dirname(os.path.abspath(dest)) or "."
    pattern = _temp_pattern(dest)
    kept_paths, kept_files = set(), set()
    for path in keep:
        kept_paths.update({os.path.abspath(path), os.path.realpath(path)})
        with contextlib.suppress(OSError):
            st = os.stat(path)
            kept_files.add((st.st_dev, st.st_ino))
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if not pattern.fullmatch(name) or path in kept_paths:
                continue
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in kept_files:
                    os.unlink(path)
                    removed.append(name)
    return removed


@contextlib.contextmanager
def temp_path_beside(dest: str, suffix: str = "") -> Iterator[str]:
    """A fresh temporary path in dest's folder (so a rename is atomic); removed if still there.

    The file is created here, exclusively and without following a link (O_EXCL, O_NOFOLLOW),
    and left in place for the writer (Keras, h5py, the copy pass) to write over: its name is
    this run's from the start, nothing planted in the folder can be written through. Created
    with 0o666 so the umask gives the output the permissions of any new file.
    """
    folder = os.path.dirname(os.path.abspath(dest)) or "."
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(dest)}.{os.urandom(8).hex()}"
                                   f"{TEMP_MARK}{suffix}")
        try:
            os.close(os.open(tmp, flags, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(dest: str, write: Callable[[str], None], suffix: str = "",
                 check: Callable[[str], None] | None = None,
                 keep_identical: bool = False) -> bool:
    """Call write(tmp) for a temporary path beside `dest`, fsync it, then rename it onto `dest`.

    A reader never sees a partial file under `dest`: either the old file or the complete new one.
    `check(tmp)` may inspect the complete file first and raise to keep it from ever being renamed.
    With `keep_identical`, a `dest` that already holds exactly the new bytes is left as it is
    (same inode and time stamps). Returns whether `dest` was replaced.
    """
    with temp_path_beside(dest, suffix) as tmp:
        write(tmp)
        if check is not None:
            check(tmp)
        if keep_identical and same_bytes(tmp, dest):
            fsync_file(dest)  # it may have been copied there without one
            return False
        fsync_file(tmp)
        os.replace(tmp, dest)
    with contextlib.suppress(OSError):
        dir_fd = os.open(os.path.dirname(os.path.abspath(dest)) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return True


def fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def same_bytes(a: str, b: str) -> bool:
    """Whether two files hold the same bytes (False if either cannot be read as a file).
    Not filecmp.cmp: its cache trusts size and mtime."""
    try:
        if not os.path.isfile(b) or os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                block = fa.read(COPY_BLOCK)
                if block != fb.read(COPY_BLOCK):
                    return False
                if not block:
                    return True
    except OSError:
        return False


def atomic_write_bytes(dest: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(dest, write)
