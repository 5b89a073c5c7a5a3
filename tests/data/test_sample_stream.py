"""SampleStream: the blend's sample order is a fixed, endless stream (it has no run-length input)."""

import numpy as np
import pytest

from megatron_xomni.data.token_dataset import SampleStream


class _Items(list):
    """A stand-in dataset: item k of dataset d is (d, k)."""


def _datasets(sizes):
    return [_Items((d, k) for k in range(n)) for d, n in enumerate(sizes)]


def _greedy(weights, n):
    """Megatron's blending rule, written out: pick the dataset furthest below its share so far."""
    counts, order = np.zeros(len(weights)), []
    w = np.asarray(weights) / sum(weights)
    for i in range(n):
        d = int(np.argmax(w * max(i, 1) - counts))
        order.append(d)
        counts[d] += 1
    return order


def test_blend_follows_the_greedy_rule_and_wraps_epochs_as_permutations():
    sizes, weights = [7, 3, 5], [0.5, 0.2, 0.3]
    stream = SampleStream(_datasets(sizes), weights, seed=11)
    items = [stream[i] for i in range(300)]
    assert [d for d, _ in items] == _greedy(weights, 300)
    for d, n in enumerate(sizes):
        seq = [k for dd, k in items if dd == d]
        assert seq[:n] == list(range(n))  # epoch 0: the dataset's own (already shuffled) order
        epochs = [seq[e * n:(e + 1) * n] for e in range(1, len(seq) // n)]
        assert epochs and all(sorted(e) == list(range(n)) for e in epochs)  # later epochs: permutations
        assert any(e != list(range(n)) for e in epochs)  # ... reshuffled


def test_prefix_is_stable_whatever_is_read_first():
    a = SampleStream(_datasets([5, 9]), [0.3, 0.7], seed=3)
    b = SampleStream(_datasets([5, 9]), [0.3, 0.7], seed=3)
    far = [b[i] for i in range(5000, 5010)]  # b builds a long index first
    assert [a[i] for i in range(2000)] == [b[i] for i in range(2000)]
    assert [a[i] for i in range(5000, 5010)] == far
    c = SampleStream(_datasets([5, 9]), [0.3, 0.7], seed=4)
    assert [a[i] for i in range(100)] != [c[i] for i in range(100)]  # the seed reshuffles later epochs


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="no samples"):
        SampleStream(_datasets([3, 0]), [0.5, 0.5], seed=0)
