"""The held-out baselines of cxrjax.eval.mvlm_heldout, against hand counts and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cxrjax.eval import mvlm_heldout as H
from cxrjax.text import tokenizer as tok_lib

S = len(tok_lib.SPECIAL_TOKENS)  # the first ids are special tokens, never a target or a baseline guess


def test_unigram_baseline_is_the_most_frequent_training_piece():
    a, b, c = S, S + 1, S + 2
    train = [np.array([a, b, b, 0, 1]), np.array([b, c, 2])]  # b x3, a x1, c x1; special ids ignored
    targets = np.array([b, b, a, c])
    out = H.unigram_baseline(train, targets)
    assert out["unigram_piece"] == b
    assert out["unigram_acc"] == pytest.approx(2 / 4)
    # drawing from p_train = (a 1/5, b 3/5, c 1/5) on targets (b 1/2, a 1/4, c 1/4)
    assert out["unigram_acc_expected"] == pytest.approx(3 / 5 * 1 / 2 + 1 / 5 * 1 / 4 + 1 / 5 * 1 / 4)
    with pytest.raises(ValueError, match="no training word pieces"):
        H.unigram_baseline([np.array([0, 1])], targets)


@pytest.mark.parametrize("n,relevant,k", [(5, [2], 2), (6, [1, 3], 3), (4, [4], 1), (7, [1, 2, 3], 6)])
def test_chance_recall_is_the_exact_probability_under_random_ranking(n, relevant, k):
    """Brute force: every ranking of n items equally likely; a hit = some relevant item in the top k."""
    expected = []
    for r in relevant:
        hits = sum(any(x < r for x in perm[:k]) for perm in itertools.permutations(range(n)))
        expected.append(hits / math.factorial(n))
    assert H.chance_recall(n, np.array(relevant), k) == pytest.approx(np.mean(expected))


def test_mlm_targets_mask_a_fixed_share_of_word_pieces_per_row():
    rng = np.random.default_rng(0)
    ids = rng.integers(S, S + 50, size=(6, 20)).astype(np.int32)
    ids[:, 0] = 0  # a special token at the start of every row
    valid = np.ones_like(ids, bool)
    valid[3, 10:] = False  # a short report
    rows = np.arange(100, 106)
    inputs, labels = H._mlm_targets(ids, valid, 0.15, seed=1, rows=rows)
    for i in range(6):
        n = int((valid[i] & (ids[i] >= S)).sum())
        masked = labels[i] >= 0
        assert masked.sum() == max(1, round(0.15 * n))
        assert (inputs[i][masked] == tok_lib.MASK_ID).all() and (labels[i][masked] == ids[i][masked]).all()
        assert not masked[0] and not masked[~valid[i]].any()  # never a special token, never padding
        assert (inputs[i][~masked] == ids[i][~masked]).all()
    again, _ = H._mlm_targets(ids, valid, 0.15, seed=1, rows=rows)
    assert (again == inputs).all()  # fixed per (seed, row): every checkpoint is scored on the same targets
