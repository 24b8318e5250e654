"""File handling shared by every writer: hashing and atomic replacement in the destination folder."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Callable, Iterator


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def remove_stale_temps(dest: str) -> list[str]:
    """Delete temp files a killed run left beside `dest` (call only while holding the run lock)."""
    folder = os.path.dirname(os.path.abspath(dest)) or "."
    prefix = f".{os.path.basename(dest)}."
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            if name.startswith(prefix) and ".tmp" in name[len(prefix):]:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed.append(name)
    return removed


@contextlib.contextmanager
def temp_path_beside(dest: str, suffix: str = "") -> Iterator[str]:
    """A fresh temporary path in dest's folder (so a rename is atomic); removed if still there."""
    folder = os.path.dirname(os.path.abspath(dest)) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=f".tmp{suffix}",
                               dir=folder)
    os.close(fd)
    os.unlink(tmp)  # writers (Keras, h5py) create the file themselves
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(dest: str, write: Callable[[str], None], suffix: str = "",
                 check: Callable[[str], None] | None = None) -> None:
    """Call write(tmp) for a temporary path beside `dest`, fsync it, then rename it onto `dest`.

    A reader never sees a partial file under `dest`: either the old file or the complete new one.
    `check(tmp)` may inspect the complete file first and raise to keep it from ever being renamed.
    """
    with temp_path_beside(dest, suffix) as tmp:
        write(tmp)
        if check is not None:
            check(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    with contextlib.suppress(OSError):
        dir_fd = os.open(os.path.dirname(os.path.abspath(dest)) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(dest: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(dest, write)
