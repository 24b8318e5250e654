"""Rules are pure functions from filter slices to indices; expected values computed by hand here."""
from __future__ import annotations

import numpy as np
import pytest

from kprune_batch.rules import RuleError, filter_stats, select


@pytest.fixture
def slices() -> np.ndarray:
    # 4 filters, slice shape (2, 2); filter f holds [[a, b], [c, d]]
    return np.array([
        [[1.0, -1.0], [2.0, 0.0]],     # mean 0.5, abs_mean 1.0, l1 4, l2 sqrt(6)
        [[-3.0, -1.0], [0.0, 0.0]],    # mean -1,  abs_mean 1.0, l1 4, l2 sqrt(10)
        [[0.0, 0.0], [0.0, 0.0]],      # all zero
        [[0.5, 0.5], [0.5, -0.5]],     # mean 0.25, l1 2, l2 1
    ], dtype=np.float32)


def test_stats_are_float64_and_per_filter(slices: np.ndarray) -> None:
    stats = filter_stats(slices)
    assert stats["mean"].dtype == np.float64
    assert stats["mean"].tolist() == [0.5, -1.0, 0.0, 0.25]
    assert stats["abs_mean"].tolist() == [1.0, 1.0, 0.0, 0.5]
    assert stats["l1"].tolist() == [4.0, 4.0, 0.0, 2.0]
    assert stats["l2"].tolist() == pytest.approx([6 ** 0.5, 10 ** 0.5, 0.0, 1.0])


@pytest.mark.parametrize("kind, params, expected", [
    ("index", [3, 1, 3], [1, 3]),
    ("mean", {"below": 0.25}, [1, 2]),        # strictly below: 0.25 itself is not selected
    ("mean", {"above": 0.25}, [0]),
    ("abs_mean", {"below": 0.6}, [2, 3]),
    ("l1", {"above": 3.0}, [0, 1]),
    ("l2", {"below": 1.0}, [2]),
    ("sign", {"element": [0, 0], "zero": "negative"}, [1]),
    ("sign", {"element": [0, 0], "zero": "positive"}, [0, 3]),
    ("sign", {"element": [1, 1], "zero": "zero"}, [0, 1, 2]),
    ("sign", {"element": [1, 1], "zero": "nonnegative"}, [0, 1, 2]),
    ("sign", {"element": [1, 1], "zero": "nonpositive"}, [0, 1, 2, 3]),
])
def test_rule_selects(slices: np.ndarray, kind: str, params: object, expected: list[int]) -> None:
    assert select(kind, params, slices) == expected


def test_index_out_of_range_names_the_filter_count(slices: np.ndarray) -> None:
    with pytest.raises(RuleError, match=r"^index 4 is out of range: the layer has 4 filters "
                                        r"\(valid: 0\.\.3\)$"):
        select("index", [0, 4], slices)


def test_sign_element_checked(slices: np.ndarray) -> None:
    with pytest.raises(RuleError, match=r"sign\.element has 3 number\(s\) but a filter slice of "
                                        r"this layer has 2 axes \(shape \[2, 2\]\)"):
        select("sign", {"element": [0, 0, 0], "zero": "zero"}, slices)
    with pytest.raises(RuleError, match=r"sign\.element \[0, 2\] is out of range on axis 1"):
        select("sign", {"element": [0, 2], "zero": "zero"}, slices)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_weights_are_an_error_not_silently_unselected(slices: np.ndarray, bad: float) -> None:
    slices = slices.copy()
    slices[2, 0, 1] = bad
    with pytest.raises(RuleError, match=r"^filter 2 has NaN or infinite weights"):
        select("mean", {"below": 100.0}, slices)
    assert select("index", [2], slices) == [2]  # an explicit index needs no comparison
