"""`python -m kprune_batch` is the `kprune` console script."""
from __future__ import annotations

from kprune_batch.cli import entry

if __name__ == "__main__":
    entry()
