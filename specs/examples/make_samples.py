"""Write the bundled example's samples file: the held-out 20 % of scikit-learn's digits, the split
train_digits.py trained on the other 80 % of (so accuracy on them is meaningful).

Run from anywhere: `python specs/examples/make_samples.py` rewrites specs/examples/digits_samples.npz
(x: (360, 8, 8, 1) float32 in [0, 1], the model's input 'pixels'; y: (360,) integer labels).
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import digits_split  # noqa: E402


def main(dest: str) -> None:
    _, _, x, y = digits_split()
    np.savez_compressed(dest, x=x, y=y.astype(np.uint8))  # no pickled object: allow_pickle=False reads it
    print(f"{dest}: {len(x)} samples")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__),
                                                            "digits_samples.npz"))
