"""kprune-batch: declarative, auditable filter surgery for Keras 3 CNNs."""
from __future__ import annotations

__version__ = "0.1.0"
