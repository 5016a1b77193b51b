"""flaxtrain.example_rng: per-example counter-based random numbers are uniform, uncorrelated and deterministic."""

import warnings

import numpy as np
import pytest

from flaxtrain import example_rng

N, LENGTH = 2000, 128


def corr(a, b):
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


def test_uniform_has_the_mean_variance_and_range_of_u01():
    u = example_rng.uniform(example_rng.keys(0, 2, 0, np.arange(N)), LENGTH, stream=0)
    assert u.shape == (N, LENGTH) and u.dtype == np.float64
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.001  # sd of the means: 0.0006, 0.0002
    # Every tenth of [0, 1) about as often (chi-squared with 9 degrees of freedom, far below its 99.9% point 27.9).
    counts = np.bincount((u * 10).astype(int).ravel(), minlength=10)
    assert ((counts - u.size / 10) ** 2 / (u.size / 10)).sum() < 27.9


def test_neighbouring_positions_keys_and_streams_are_uncorrelated():
    keys = example_rng.keys(5, 3, np.arange(N))
    u = example_rng.uniform(keys, LENGTH, stream=0)
    limit = 4 / np.sqrt(u.size / 2)  # four standard deviations of a correlation coefficient of so many pairs
    assert abs(corr(u[:, 1:], u[:, :-1])) < limit  # position p with p + 1
    assert abs(corr(u[1:], u[:-1])) < limit  # example i with i + 1 (keys of consecutive indices)
    assert abs(corr(u, example_rng.uniform(keys, LENGTH, stream=1))) < limit  # stream 0 with stream 1
    assert abs(corr(u, example_rng.uniform(example_rng.keys(6, 3, np.arange(N)), LENGTH, stream=0))) < limit  # seeds
    assert abs(corr(u, example_rng.uniform(example_rng.keys(5, 2, np.arange(N)), LENGTH, stream=0))) < limit  # tags


def test_the_same_key_and_stream_give_the_same_row_wherever_it_is_drawn():
    keys = example_rng.keys(7, 2, 1, np.arange(10))
    u = example_rng.uniform(keys, 16, stream=4)
    np.testing.assert_array_equal(u, example_rng.uniform(keys.copy(), 16, stream=4))
    np.testing.assert_array_equal(u[3:7], example_rng.uniform(keys[3:7], 16, stream=4))  # a host's share
    np.testing.assert_array_equal(u[[9, 0]], example_rng.uniform(keys[[9, 0]], 16, stream=4))
    np.testing.assert_array_equal(u[:, :8], example_rng.uniform(keys, 8, stream=4))  # shorter rows: a prefix
    # A key is a function of its parts, broadcast: the index array or the example's index alone.
    assert keys[4] == example_rng.keys(7, 2, 1, 4) == example_rng.keys(7, 2, 1, np.array([4]))[0]


def test_different_keys_streams_and_part_orders_differ():
    keys = example_rng.keys(1, 2, np.arange(10_000))
    assert len(np.unique(keys)) == len(keys)
    assert len({int(example_rng.keys(*parts)) for parts in [(1, 2), (2, 1), (1, 2, 0), (1, 2, 1), (0, 1, 2)]}) == 5
    u = example_rng.uniform(keys[:100], 32, stream=0)
    assert (u != example_rng.uniform(keys[:100], 32, stream=1)).mean() > 0.99
    assert len(np.unique(u)) == u.size  # no two of 3200 draws coincide (53 bits)


def test_integers_are_uniform_in_range():
    ids = example_rng.integers(example_rng.keys(3, np.arange(N)), LENGTH, stream=2, high=50)
    assert ids.dtype == np.int64 and ids.min() == 0 and ids.max() == 49
    counts = np.bincount(ids.ravel(), minlength=50)
    expected = ids.size / 50
    assert ((counts - expected) ** 2 / expected).sum() < 86.7  # chi-squared, 49 degrees of freedom: 99.9% point
    assert (example_rng.integers(example_rng.keys(3, np.arange(10)), 8, stream=2, high=1) == 0).all()


def test_no_overflow_warnings_and_bad_keys_raise():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        example_rng.uniform(example_rng.keys(2 ** 63 + 5, -1, np.arange(3)), 4, stream=2 ** 40)
        assert example_rng.keys(1, np.arange(0)).shape == (0,)
    with pytest.raises(TypeError):
        example_rng.uniform(np.arange(3), 4, stream=0)  # int64 indices, not keys
    with pytest.raises(TypeError):
        example_rng.keys(0.5)
