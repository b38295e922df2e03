"""Comparing pre-training methods honestly: AUC with a 95% CI that resamples pre-training seeds AND
test patients, and paired deltas between methods.

A method's AUC varies with three things: the pre-training run (seed), the labelled sample the probe
is fitted on (MedAug's five 1% splits), and the test set. MedAug reports mean ± SD over label splits of
one pre-training run; near-identical runs differ by more than that. Here every number comes from
`scores[p, l, i]` -- the probe's score for test image i after pre-training seed p and label draw l:

    point estimate   mean over p and l of AUC(p, l) on the whole test set
    SD (seeds)       SD over pre-training seeds of the mean over label draws
    SD (labels)      mean over seeds of the SD over label draws (what MedAug's ± is)
    95% CI           hierarchical bootstrap: per replicate, draw the pre-training seeds with
                     replacement and the test patients with replacement (a cluster bootstrap: all
                     images of a patient together), average AUC(p, l) over the drawn seeds and all l
    paired delta     the same replicates for two methods, seeds paired by index when both have the
                     same seeds (run s of every method starts from the same initialisation and sees
                     the same data order), the same drawn test patients

AUCs of a replicate are weighted Mann-Whitney statistics (an image drawn k times has weight k), all
replicates at once with one sort per (p, l).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def cluster_weights(clusters: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples, n) multiplicities of a bootstrap over clusters (patients): each replicate draws as
    many patients as there are, with replacement; an image counts as often as its patient was drawn."""
    codes, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    counts = rng.multinomial(len(codes), np.full(len(codes), 1.0 / len(codes)), size=samples)
    return counts[:, inverse].astype(np.float64)


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of `scores` (n,) for binary `labels` (n,) under each row of `weights` (B, n): the weighted
    probability that a positive outranks a negative, ties counted half. NaN where a replicate has no
    positive or no negative."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order], weights[:, order]
    group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # equal scores share a group
    onehot = np.zeros((len(s), group[-1] + 1)) if len(s) else np.zeros((0, 0))
    onehot[np.arange(len(s)), group] = 1.0
    neg_g = (w * ~y) @ onehot
    pos_g = (w * y) @ onehot
    below = np.cumsum(neg_g, axis=1) - neg_g  # negative weight strictly below each score
    num = np.sum(pos_g * (below + 0.5 * neg_g), axis=1)
    den = pos_g.sum(1) * neg_g.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


@dataclasses.dataclass
class MethodAUC:
    mean: float
    sd_seeds: float
    sd_labels: float
    ci: tuple[float, float]
    per_seed: np.ndarray  # (n_pre,) mean over label draws of each pre-training seed
    replicates: np.ndarray  # (samples,) bootstrap means


def _auc_matrix(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, n_pre, n_label) AUCs of scores (n_pre, n_label, n) under each weight row."""
    n_pre, n_label, _ = scores.shape
    out = np.empty((weights.shape[0], n_pre, n_label))
    for p in range(n_pre):
        for l in range(n_label):
            out[:, p, l] = weighted_auc(scores[p, l], labels, weights)
    return out


def compare(scores: dict[str, np.ndarray], labels: np.ndarray, clusters: np.ndarray, *, reference: str | None = None,
            samples: int = 1000, seed: int = 0) -> tuple[dict[str, MethodAUC], dict[str, tuple[float, float, float]]]:
    """Per method (scores[name]: (n_pre, n_label, n) probe scores on the same test images) its `MethodAUC`;
    and per method the paired delta vs `reference`: (delta, ci_lo, ci_hi)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    weights = cluster_weights(clusters, samples, rng)
    full = np.ones((1, len(labels)))
    n_seeds = {k: np.asarray(v).shape[0] for k, v in scores.items()}
    # one seed draw per replicate for every method with the same number of seeds: paired by index
    draws = {n: rng.integers(0, n, size=(samples, n)) for n in set(n_seeds.values())}
    results, boot = {}, {}
    for name, sc in scores.items():
        sc = np.asarray(sc, np.float64)
        if sc.ndim != 3 or sc.shape[2] != len(labels):
            raise ValueError(f"{name}: scores must be (pre-training seeds, label draws, {len(labels)} test images), "
                             f"got {sc.shape}")
        point = _auc_matrix(sc, labels, full)[0]  # (n_pre, n_label)
        per_seed = point.mean(1)
        reps = _auc_matrix(sc, labels, weights).mean(2)  # (B, n_pre): mean over label draws
        idx = draws[sc.shape[0]]
        boot[name] = np.nanmean(np.take_along_axis(reps, idx, axis=1), axis=1)
        results[name] = MethodAUC(
            mean=float(point.mean()),
            sd_seeds=float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan"),
            sd_labels=float(point.std(axis=1, ddof=1).mean()) if point.shape[1] > 1 else float("nan"),
            ci=tuple(float(x) for x in np.nanpercentile(boot[name], [2.5, 97.5])),
            per_seed=per_seed, replicates=boot[name])
    deltas = {}
    if reference is not None:
        if reference not in scores:
            raise ValueError(f"reference {reference!r} is not among the methods {sorted(scores)}")
        for name in scores:
            d = boot[name] - boot[reference]
            lo, hi = np.nanpercentile(d, [2.5, 97.5])
            deltas[name] = (results[name].mean - results[reference].mean, float(lo), float(hi))
    return results, deltas
