"""The power calculation (cxrjax/eval/power.py): its variance components against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrjax.eval import power


def _pilot(rng, seeds=4, draws=3, patients=60, per_patient=3, shift=0.3):
    """Scores of two methods on one test set: b = a + a seed-dependent gain on the positives."""
    n = patients * per_patient
    clusters = np.repeat(np.arange(patients), per_patient)
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    base = labels * 1.0 + rng.normal(0, 1, (seeds, draws, n))
    gain = shift + rng.normal(0, 0.2, (seeds, 1, 1))
    return base, base + gain * labels, labels, clusters


def test_seed_variance_is_the_variance_of_per_seed_auc_deltas():
    a, b, y, cl = _pilot(np.random.default_rng(0))
    v = power.delta_variance(b, a, y, cl, samples=200)
    per_seed = [np.mean([roc_auc_score(y, b[p, l]) - roc_auc_score(y, a[p, l]) for l in range(a.shape[1])])
                for p in range(a.shape[0])]
    assert v.delta == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert v.s2_seed == pytest.approx(np.var(per_seed, ddof=1), rel=1e-9)
    assert v.delta > 0.02 and v.seeds == 4 and v.patients == 60


def test_patient_variance_is_per_patient():
    """Copying every test patient k times (new ids, same films) divides the bootstrap variance of the delta by
    ~k, so the per-patient component stays put and the standard error at the pilot's size shrinks."""
    a, b, y, cl = _pilot(np.random.default_rng(1))
    one = power.delta_variance(b, a, y, cl, samples=2000, seed=0)
    k = 4
    cl4 = np.concatenate([cl + i * 1000 for i in range(k)])
    four = power.delta_variance(np.tile(b, k), np.tile(a, k), np.tile(y, k), cl4, samples=2000, seed=0)
    assert four.patients == k * one.patients
    assert four.u_patient == pytest.approx(one.u_patient, rel=0.25)
    assert four.s2_seed == pytest.approx(one.s2_seed, rel=1e-9)   # the same per-seed deltas


def test_mde_and_plan():
    c = power.DeltaVariance(delta=0.0, s2_seed=0.0002, u_patient=0.04, seeds=3, patients=56)
    se = np.sqrt(0.0002 / 5 + 0.04 / 200)
    assert c.mde(5, 200) == pytest.approx((1.959964 + 0.841621) * se, rel=1e-5)
    # cheapest option under the default cost (seeds x patients) that reaches 0.03 for the worse component
    worse = power.DeltaVariance(delta=0.0, s2_seed=0.0004, u_patient=0.04, seeds=3, patients=56)
    s, n, m = power.plan([c, worse], 0.03, seed_options=range(2, 11), patient_options=range(100, 1001, 50))
    assert m <= 0.03 and worse.mde(s, n) == pytest.approx(m)
    assert all(worse.mde(s2, n2) > 0.03 for s2 in range(2, 11) for n2 in range(100, 1001, 50) if s2 * n2 < s * n)
    assert power.plan([worse], 0.001, seed_options=[2], patient_options=[100]) is None
    with pytest.raises(ValueError, match=">= 2 pre-training seeds"):
        power.delta_variance(np.zeros((1, 1, 4)), np.zeros((1, 1, 4)), np.array([0, 1, 0, 1]), np.arange(4))
