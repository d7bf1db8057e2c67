import itertools

import numpy as np
import pytest

from lussray.eval.matching import cooccurrence, hungarian_mapping, match_presence


def test_cooccurrence_counts_images_not_pixels():
    # image 0: generated {1, 2}, GT {1}; image 1: generated {2}, GT {1, 3}; image 2: nothing.
    cooc = cooccurrence(
        np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([0, 1, 1]), np.array([1, 1, 3]), 3, 3
    )
    expected = np.zeros((3, 3), int)
    expected[0, 0] = 1  # 1 with 1 in image 0
    expected[1, 0] = 2  # 2 with 1 in images 0 and 1
    expected[1, 2] = 1  # 2 with 3 in image 1
    np.testing.assert_array_equal(cooc, expected)


@pytest.mark.parametrize("seed", range(5))
def test_recovers_a_permutation(seed):
    rng = np.random.default_rng(seed)
    num_classes = 30
    perm = rng.permutation(num_classes) + 1  # generated id of GT class j is perm[j - 1]
    gt_sets, pred_sets = [], []
    for _ in range(200):
        gt = set(rng.choice(np.arange(1, num_classes + 1), size=rng.integers(1, 3), replace=False).tolist())
        noise = set(rng.integers(1, num_classes + 1, size=rng.integers(0, 2)).tolist())
        gt_sets.append(gt)
        pred_sets.append({int(perm[j - 1]) for j in gt} | noise)
    mapping = match_presence(pred_sets, gt_sets, num_classes)
    assert mapping[0] == 0
    for j in range(1, num_classes + 1):
        assert mapping[perm[j - 1]] == j


@pytest.mark.parametrize("seed", range(10))
def test_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    cooc = rng.integers(0, 4, size=(5, 5))
    mapping = hungarian_mapping(cooc)
    assert sorted(mapping[1:].tolist()) == [1, 2, 3, 4, 5]
    best = max(sum(cooc[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    assert sum(cooc[i - 1, mapping[i] - 1] for i in range(1, 6)) == best


def test_rejects_ids_above_n():
    with pytest.raises(ValueError):
        match_presence([{4}], [{1}], 3)
