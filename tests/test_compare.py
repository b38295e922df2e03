"""eval.compare: weighted AUC against scikit-learn on duplicated data, the cluster bootstrap, and a
hierarchical CI that widens with pre-training-seed variance."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrjax.eval import compare


def test_weighted_auc_equals_sklearn_on_the_duplicated_sample():
    rng = np.random.default_rng(0)
    n = 60
    labels = rng.random(n) < 0.4
    scores = np.round(rng.normal(size=n) + labels, 1)  # rounded: ties included
    weights = rng.integers(0, 4, size=(5, n))
    got = compare.weighted_auc(scores, labels, weights)
    for b in range(5):
        rep = np.repeat(np.arange(n), weights[b])
        assert got[b] == pytest.approx(roc_auc_score(labels[rep], scores[rep]), abs=1e-12)
    assert compare.weighted_auc(scores, labels, np.ones((1, n)))[0] == pytest.approx(roc_auc_score(labels, scores))
    assert np.isnan(compare.weighted_auc(scores, np.zeros(n, bool), np.ones((1, n))))[0]


def test_cluster_weights_draw_whole_patients():
    clusters = np.array([0, 0, 0, 1, 2, 2])
    w = compare.cluster_weights(clusters, 2000, np.random.default_rng(1))
    assert w.shape == (2000, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 4] == w[:, 5]).all()  # a patient's images move together
    per_patient = w[:, [0, 3, 4]]
    assert (per_patient.sum(1) == 3).all()  # 3 patients drawn each time
    np.testing.assert_allclose(per_patient.mean(0), 1.0, atol=0.06)


def _scores(rng, n_pre, n_label, labels, seed_sd, label_sd=0.05):
    """Probe scores whose quality (signal) differs by pre-training seed with SD `seed_sd`."""
    out = np.empty((n_pre, n_label, len(labels)))
    for p in range(n_pre):
        strength = 1.0 + rng.normal(0, seed_sd)
        for l in range(n_label):
            out[p, l] = strength * labels + rng.normal(0, 1.0 + rng.normal(0, label_sd), len(labels))
    return out


def test_hierarchical_ci_covers_seed_variance_and_pairs_deltas():
    rng = np.random.default_rng(2)
    n = 300
    labels = rng.random(n) < 0.4
    clusters = np.arange(n) // 3
    steady = _scores(rng, 3, 5, labels, seed_sd=0.0)
    shaky = _scores(rng, 3, 5, labels, seed_sd=0.6)
    res, delta = compare.compare({"steady": steady, "shaky": shaky, "same": steady}, labels, clusters,
                                 reference="steady", samples=500, seed=0)
    width = lambda r: r.ci[1] - r.ci[0]  # noqa: E731
    assert width(res["shaky"]) > width(res["steady"])  # seed variance widens the interval
    assert res["shaky"].sd_seeds > 3 * res["steady"].sd_seeds
    assert res["steady"].ci[0] < res["steady"].mean < res["steady"].ci[1]
    d, lo, hi = delta["same"]
    assert d == 0 and lo == 0 and hi == 0  # identical scores, paired replicates: no spurious difference
    d, lo, hi = delta["shaky"]
    assert lo < d < hi
    with pytest.raises(ValueError, match="test images"):
        compare.compare({"bad": steady[:, :, :10]}, labels, clusters)
