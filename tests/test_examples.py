"""The digits example's data loader reads scikit-learn's bundled file directly."""

from __future__ import annotations

import numpy as np
import pytest

from examples.train_digits import digits, load_digits_split


@pytest.mark.timeout(60)
def test_digits_are_scikit_learns_digits() -> None:
    """Same pixels and labels as ``sklearn.datasets.load_digits`` (which the example reads
    around, to save every worker 1.6 CPU-seconds of imports)."""
    from sklearn.datasets import load_digits

    expected = load_digits()
    images, labels = digits()
    np.testing.assert_array_equal(images, expected.data)
    np.testing.assert_array_equal(labels, expected.target)
    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1438, 1, 8, 8)
    assert x_test.shape == (359, 1, 8, 8)
    assert float(x_train.max()) == 1.0
    assert float(x_train.min()) == 0.0
    assert sorted(set(y_test.tolist())) == list(range(10))
    assert len(y_train) + len(y_test) == 1797
