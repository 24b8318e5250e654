"""Keeps TensorFlow's and Keras's start-up and save-time chatter off the user's terminal."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Iterator

_DEBUG = False


def set_debug(flag: bool) -> None:
    """With --debug, swallowed native log lines are replayed on stderr."""
    global _DEBUG
    _DEBUG = flag


def debugging() -> bool:
    """Whether --debug was given (tracebacks of swallowed per-model errors are printed)."""
    return _DEBUG


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Redirect file descriptor 2 while TensorFlow runs native code.

    TF 2.21 prints oneDNN and CUDA lines from C++ before absl logging is configured, so
    TF_CPP_MIN_LOG_LEVEL alone does not hide them; only a descriptor-level redirect does.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (embedded use): nothing to hide
        yield
        return
    import tempfile  # only where native output is silenced (with shutil, random: ~4 ms)

    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if _DEBUG:
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", "replace"))


_keras: Any = None
_LEAN = False


def lean_imports(flag: bool) -> None:
    """Whether Keras is imported without the optional packages it and TensorFlow import only
    for features kprune never uses (set by the console script, whose process is kprune's)."""
    global _LEAN
    _LEAN = flag


def _optional_imports(backend: str) -> list[str]:
    """Top-level packages imported with Keras only in passing, each caught as optional where it
    is imported: scikit-learn by keras/src/wrappers/fixes.py and sklearn_wrapper.py (the
    SKLearnClassifier wrappers), and under the TensorFlow backend jax by
    tensorflow/lite/python/util.py (`from jax import jit` for converting jax functions to
    TFLite). Together ~1 s and ~170 MB of each run that imports Keras, when installed."""
    return ["sklearn"] + (["jax"] if backend == "tensorflow" else [])


@contextlib.contextmanager
def _without(names: list[str]) -> Iterator[None]:
    """`import name` raises ImportError inside (a None in sys.modules, the documented way to
    block an import), for the names not imported yet; sys.modules is as before afterwards, so
    a later import of one of them works as usual."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def import_keras() -> Any:
    """Import Keras once, quietly, under the backend KERAS_BACKEND names (TensorFlow when unset).

    TensorFlow is imported (to quiet its logger) only when it is the backend: under jax or torch
    importing it too cost ~3 s and ~400 MB per run for nothing.
    """
    global _keras
    if _keras is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        blocked = _optional_imports(os.environ["KERAS_BACKEND"]) if _LEAN else []
        with native_stderr_silenced(), _without(blocked):
            import keras  # noqa: PLC0415 - deliberately late: a framework costs seconds to import

            try:
                import absl.logging  # noqa: PLC0415

                absl.logging.set_verbosity(absl.logging.ERROR)
            except ImportError:
                pass
            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf  # noqa: PLC0415

                tf.get_logger().setLevel("ERROR")
        _keras = keras
    return _keras


def to_numpy(keras: Any, value: Any) -> Any:
    """A backend tensor as a numpy array: np.asarray fails on torch tensors that require grad
    (a Keras model's output under KERAS_BACKEND=torch), keras.ops.convert_to_numpy detaches."""
    import numpy as np  # noqa: PLC0415

    if isinstance(value, np.ndarray):
        return value
    return keras.ops.convert_to_numpy(value)


# Top-level modules whose absence means "no Keras backend installed" (the core install has none);
# any other ImportError is a broken install and is reported as such
FRAMEWORK_MODULES = frozenset({"keras", "tensorflow", "jax", "jaxlib", "torch"})


def require_keras(need: str, model: str = "", loc: str | None = None) -> Any:
    """import_keras(), or BackendMissing naming `need` and the extras when no framework is
    installed (`pip install kprune-batch` has none)."""
    try:
        return import_keras()
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in FRAMEWORK_MODULES:
            raise
        from kprune_batch.errors import BackendMissing

        raise BackendMissing(need, model=model, loc=loc, missing=missing) from None
