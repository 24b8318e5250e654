"""The small interface every backend offers: a model's layer graph and its weights, editable."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from kprune_batch.graph import LayerGraph


class ModelWeights(Protocol):
    """An opened model: read and replace variables by (layer path, Keras 3 variable name), save."""

    backend: str
    graph: LayerGraph
    # (input sha256, output sha256) when save() computed both while copying; else None
    hashes: tuple[str, str] | None

    def variables(self, layer_path: str) -> dict[str, np.ndarray]:
        """The layer's variables by name, as numpy arrays (copies)."""

    def assign(self, layer_path: str, name: str, value: np.ndarray) -> None:
        """Replace one variable's value (same shape and dtype)."""

    def save(self, tmp_path: str) -> None:
        """Write the complete edited model, in the input's format, to `tmp_path`."""

    def matches(self, dest: str) -> bool | None:
        """Whether the file `dest` already holds exactly what save() would write, if that can be
        told without writing (then, when True, `hashes` is set as save() would set it); None
        when it cannot (the caller writes and compares)."""

    def close(self) -> None:
        """Release the model."""
