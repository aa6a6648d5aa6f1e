import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from citrusv import rle


def test_known_mask_counts_start_with_zero_run():
    mask = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    enc = rle.encode(mask)
    assert enc == {"size": [2, 3], "counts": [0, 2, 2, 2]}
    assert sum(enc["counts"]) == 6
    np.testing.assert_array_equal(rle.decode(enc), mask)


def test_empty_and_full_masks():
    assert rle.encode(np.zeros((3, 4), bool))["counts"] == [12]
    assert rle.encode(np.ones((3, 4), bool))["counts"] == [0, 12]


@settings(max_examples=60, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_round_trip(mask):
    enc = rle.encode(mask)
    assert sum(enc["counts"]) == mask.size
    np.testing.assert_array_equal(rle.decode(enc), mask)
