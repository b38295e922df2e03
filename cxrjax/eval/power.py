"""How many pre-training seeds and test patients a comparison needs: a power calculation from a pilot.

A paired delta between two methods (compare.py) varies for two independent reasons:

    seeds     the pre-training run: the per-seed delta d_p (mean over label draws, whole test set) varies
              between seeds with variance s2_seed; the mean over S seeds has s2_seed / S;
    patients  the test set: with the seeds fixed, resampling the N test patients (the cluster bootstrap of
              compare.py) gives the variance of the seed-mean delta, v_test; it scales as 1 / N, so
              u_patient = v_test x N is the variance one test patient contributes.

    SE(S, N)  = sqrt(s2_seed / S + u_patient / N)
    MDE(S, N) = (z_{1 - alpha/2} + z_{power}) x SE(S, N)       (two-sided test, normal approximation)

the smallest true delta detected with that power. Both components are measured on a pilot sweep (the
same protocol, fewer seeds or patients) and carried to the planned sizes; label-draw noise is inside
s2_seed (each seed's delta is a mean over the same L label draws), so L stays as in the pilot.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

from cxrjax.eval import compare


@dataclasses.dataclass(frozen=True)
class DeltaVariance:
    """The two variance components of one paired delta, measured at a pilot's size."""

    delta: float            # the pilot's point estimate
    s2_seed: float          # variance of the per-seed delta between pre-training seeds
    u_patient: float        # variance one test patient contributes (v_test x N)
    seeds: int
    patients: int

    def se(self, seeds: int, patients: int) -> float:
        return math.sqrt(self.s2_seed / seeds + self.u_patient / patients)

    def mde(self, seeds: int, patients: int, alpha: float = 0.05, power: float = 0.8) -> float:
        return minimum_detectable(self.se(seeds, patients), alpha, power)


def minimum_detectable(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided level-alpha test detects with `power`, at standard error se."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)


def delta_variance(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, clusters: np.ndarray, *,
                   samples: int = 1000, seed: int = 0) -> DeltaVariance:
    """The variance components of method a - method b from a pilot. scores_*: (seeds, label draws, n test
    images) on the same test images, seeds paired by index (run s of both methods from the same init)."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != len(labels):
        raise ValueError(f"paired scores must have one shape (seeds, label draws, {len(labels)}), got {a.shape}, {b.shape}")
    if a.shape[0] < 2:
        raise ValueError("the seed variance needs a pilot with >= 2 pre-training seeds per method")
    full = np.ones((1, len(labels)))
    per_seed = (compare._auc_matrix(a, labels, full)[0] - compare._auc_matrix(b, labels, full)[0]).mean(1)
    w = compare.cluster_weights(clusters, samples, np.random.default_rng(seed))
    boot = (compare._auc_matrix(a, labels, w) - compare._auc_matrix(b, labels, w)).mean(axis=(1, 2))
    n = len(np.unique(clusters))
    return DeltaVariance(delta=float(per_seed.mean()), s2_seed=float(per_seed.var(ddof=1)),
                         u_patient=float(np.nanvar(boot, ddof=1) * n), seeds=a.shape[0], patients=n)


def plan(components: list[DeltaVariance], target: float, *, seed_options=range(2, 21), patient_options=(),
         cost=None, alpha: float = 0.05, power: float = 0.8):
    """The cheapest (seeds, test patients) whose MDE is <= target for every component (the pooled worst
    case), under cost(seeds, patients) (default: seeds x patients); None if no option reaches it."""
    cost = cost or (lambda s, n: s * n)
    best = None
    for s in seed_options:
        for n in patient_options:
            worst = max(c.mde(s, n, alpha, power) for c in components)
            if worst <= target and (best is None or cost(s, n) < cost(best[0], best[1])):
                best = (s, n, worst)
    return best
