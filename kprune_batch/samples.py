"""Samples: the inputs (and optional labels) an edit is measured on, read from .npy or .npz files.

Never unpickled: numpy is always called with allow_pickle=False, so a file holding Python objects
is refused instead of running code. A `.npy` is memory-mapped and read batch by batch, so a
samples file larger than RAM is never held whole (an `.npz` member cannot be mapped: numpy reads
it whole when it is first used, one member at a time). Pure numpy: no TensorFlow.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from kprune_batch.errors import ModelError
from kprune_batch.files import NotRegularFile, open_regular, sha256_file

SAMPLE_SUFFIXES = (".npy", ".npz")
LABELS_KEY = "y"
INPUTS_KEY = "x"


@dataclass(frozen=True)
class InputSpec:
    """One model input as its config declares it: name and shape (None: any size)."""

    name: str
    shape: tuple[int | None, ...]  # without the batch axis

    def expected(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"(N, {dims})" if dims else "(N,)"


@dataclass
class Samples:
    """Validated samples: one array per model input (same count), optional integer labels."""

    path: str
    sha256: str
    inputs: list[np.ndarray]  # in the order of the model's inputs; memory-mapped for a .npy
    names: list[str]
    labels: np.ndarray | None  # (count, ...) integer class labels (one-hot already reduced)

    @property
    def count(self) -> int:
        return int(self.inputs[0].shape[0])

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "count": self.count}

    def batches(self, size: int) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """(start, stop, one array per input) for consecutive batches of at most `size`."""
        for start in range(0, self.count, size):
            stop = min(start + size, self.count)
            yield start, stop, [np.ascontiguousarray(x[start:stop]) for x in self.inputs]

    def feed(self, batch: list[np.ndarray]) -> object:
        """A batch as the model takes it: the array, or a mapping by input name."""
        return batch[0] if len(batch) == 1 else dict(zip(self.names, batch, strict=True))


def _fail(message: str, model: str, path: str, hint: str | None = None) -> ModelError:
    del path  # every message names the samples file itself, once
    return ModelError(message, model=model, hint=hint)


def load_samples(path: str, inputs: Sequence[InputSpec], model: str) -> Samples:
    """Read and check the samples at `path` for a model with `inputs`; ModelError (one line that
    names the expected shape) for a missing, unreadable, corrupt, pickled or misshapen file."""
    want = " and ".join(f"'{i.name}' {i.expected()}" for i in inputs)
    if not os.path.exists(path):
        raise _fail(f"samples file {path} does not exist", model, path,
                    hint="check the model's 'samples' (relative to the spec file's folder)")
    try:
        open_regular(path).close()
        digest = sha256_file(path)
    except NotRegularFile as exc:
        raise _fail(f"samples {path} is {exc.kind}, not a .npy or .npz file", model, path) from None
    except OSError as exc:
        raise _fail(f"samples file {path} cannot be read: {exc.strerror}", model, path) from None
    if path.endswith(".npy"):
        arrays = {INPUTS_KEY: _load_npy(path, model, want)}
    else:
        arrays = _load_npz(path, model, want)
    labels = arrays.pop(LABELS_KEY, None)
    if len(inputs) == 1 and set(arrays) in ({INPUTS_KEY}, {inputs[0].name}):
        chosen = list(arrays.values())
    elif set(arrays) == {i.name for i in inputs}:
        chosen = [arrays[i.name] for i in inputs]
    else:
        keys = ", ".join(sorted(arrays)) or "none"
        names = ", ".join(f"'{i.name}'" for i in inputs)
        raise _fail(f"samples file {path} has the input key(s) {keys}, but the model's input(s) "
                    f"are {names}: expected "
                    + (f"key 'x' {inputs[0].expected()}" if len(inputs) == 1
                       else f"one key per input: {want}"), model, path)
    for spec, array in zip(inputs, chosen, strict=True):
        _check_input(array, spec, path, model, len(inputs) > 1)
    counts = {int(a.shape[0]) for a in chosen}
    if len(counts) > 1:
        raise _fail(f"samples file {path} holds different sample counts per input "
                    f"({', '.join(str(int(a.shape[0])) for a in chosen)}); expected {want} "
                    f"with one N", model, path)
    count = counts.pop()
    if count == 0:
        raise _fail(f"samples file {path} holds no samples; expected {want} with N >= 1",
                    model, path)
    return Samples(path=path, sha256=digest, inputs=chosen, names=[i.name for i in inputs],
                   labels=None if labels is None else _labels(labels, count, path, model))


def _load_npy(path: str, model: str, want: str) -> np.ndarray:
    try:
        # mmap: a samples file is read batch by batch, never held whole
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise _refusal(exc, path, model, want) from None
    except OSError as exc:
        raise _fail(f"samples file {path} is not a readable .npy file ({_first(exc)}); "
                    f"expected {want}", model, path) from None


def _load_npz(path: str, model: str, want: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        raise _refusal(exc, path, model, want) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise _fail(f"samples file {path} is not a readable .npz file ({_first(exc)}); "
                    f"expected {want}", model, path) from None


def _refusal(exc: ValueError, path: str, model: str, want: str) -> ModelError:
    # numpy raises ValueError "Object arrays cannot be loaded when allow_pickle=False" for an
    # array of dtype object (lib/_format_impl.py read_array; "Array can't be memory-mapped:
    # Python objects in dtype." from open_memmap), "This file contains pickled (object) data"
    # for a file that is neither .npy nor .npz (lib/_npyio_impl.py load, which would unpickle
    # it), and ValueError for a broken header
    if "Object arrays" in str(exc) or "Python objects" in str(exc):
        return _fail(f"samples file {path} holds Python objects (dtype object), which kprune "
                     f"never unpickles; expected numbers {want}", model, path)
    if "pickled" in str(exc):
        return _fail(f"samples file {path} is neither .npy nor .npz data (numpy would read it "
                     f"as a pickle, which kprune never does); expected {want}", model, path)
    return _fail(f"samples file {path} is not a readable numpy file ({_first(exc)}); "
                 f"expected {want}", model, path)


def _check_input(array: np.ndarray, spec: InputSpec, path: str, model: str, named: bool) -> None:
    what = f"samples '{spec.name}'" if named else "samples"
    if array.dtype.kind not in "biuf":
        raise _fail(f"{what} in {path} have dtype {array.dtype}, not numbers; the model's input "
                    f"'{spec.name}' expects {spec.expected()}", model, path)
    shape = tuple(int(d) for d in array.shape)
    fits = len(shape) == len(spec.shape) + 1 and all(
        d is None or d == s for d, s in zip(spec.shape, shape[1:], strict=True))
    if not fits:
        raise _fail(f"{what} in {path} have shape {_shape(shape)}, but the model's input "
                    f"'{spec.name}' expects {spec.expected()}", model, path)
    if array.dtype.kind == "f" and array.size and not _all_finite(array):
        raise _fail(f"{what} in {path} hold NaN or infinite values; impact cannot be measured "
                    f"on them", model, path)


def _all_finite(array: np.ndarray, block: int = 4096) -> bool:
    """Checked in blocks of samples: a memory-mapped file is never read whole at once."""
    return all(bool(np.isfinite(array[i:i + block]).all()) for i in range(0, len(array), block))


def _labels(y: np.ndarray, count: int, path: str, model: str) -> np.ndarray:
    """Integer class labels from `y`: integers (N,) or (N, ...), or one-hot (N, ..., C) reduced
    by argmax over the last axis (any numeric dtype whose rows are one 1 and zeros)."""
    if y.dtype.kind not in "biuf" or not y.shape or int(y.shape[0]) != count:
        raise _fail(f"samples 'y' in {path} have shape {_shape(tuple(y.shape))} and dtype "
                    f"{y.dtype}; expected integer labels (N,) or one-hot labels (N, classes) "
                    f"with N = {count}", model, path)
    if y.ndim >= 2 and y.shape[-1] > 1:
        onehot = np.asarray(y)
        if np.all((onehot == 0) | (onehot == 1)) and np.all(onehot.sum(axis=-1) == 1):
            return np.argmax(onehot, axis=-1)
    values = np.asarray(y)
    if values.dtype.kind == "f" and not np.all(values == np.round(values)):
        raise _fail(f"samples 'y' in {path} are neither integer labels nor one-hot rows; "
                    f"expected integer labels (N,) or one-hot labels (N, classes)", model, path)
    if values.ndim >= 2 and values.shape[-1] == 1:
        values = values[..., 0]
    return values.astype(np.int64)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
