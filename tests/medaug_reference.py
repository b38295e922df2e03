"""An independent numpy implementation of MedAug's MoCo loss with its §4.3 hard-negative variants.

Written from the official code (stanfordmlgroup/MedAug, moco/moco/builder.py `forward`, `mask_positive`,
`reweight_logits`, `get_weight`, `normalize_synthesis`; moco/moco/loss.py `WeightedSoftmaxMoCoLoss`) in
its own formulation -- logits concatenated and masked in place, appended logits really appended, the
weighted log-sum-exp of their loss -- not in cxrjax's (per-part log-sum-exp, weight 2 for an appended
key). Float64, one batch at a time. The random draws of the append / synthetic variants (which keys,
which pairs, which fractions) are passed in, so both implementations see the same ones.
"""

from __future__ import annotations

import numpy as np


def medaug_loss(q, k, queue_keys, queue_patient, queue_study, queue_lat, q_patient, q_study, q_lat, *,
                mode: str = "none", temperature: float = 0.2, target_hard: float = 0.9, draw=None) -> float:
    q, k, queue_keys = (np.asarray(a, np.float64) for a in (q, k, queue_keys))
    queue_patient, queue_study, queue_lat = map(np.asarray, (queue_patient, queue_study, queue_lat))
    q_patient, q_study, q_lat = map(np.asarray, (q_patient, q_study, q_lat))
    n_keys = queue_keys.shape[0]
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue_keys.T], 1) / temperature
    weight = np.ones_like(logits)
    full = (queue_lat == -1).sum() == 0
    if mode == "same_laterality_only":  # builder: logits[:, 1:][mask_neg | mask_pos] = -inf
        mask_neg = q_lat[:, None] != queue_lat[None, :]
        mask_pos = (q_patient[:, None] == queue_patient[None, :]) & (q_study[:, None] == queue_study[None, :])
        neg = logits[:, 1:]
        neg[mask_neg | mask_pos] = -np.inf
    elif mode == "reweight" and full:  # reweight_logits + get_weight
        mask_neg = q_lat[:, None] != queue_lat[None, :]
        perc_lat = (queue_lat == 1).sum() / n_keys
        perc_front = 1.0 - perc_lat
        target_easy = 1.0 - target_hard

        def get_weight(easy, hard):
            return 1 + (easy - target_easy) / hard, target_easy / easy  # w_h, w_e

        w_f_h, w_f_e = get_weight(perc_lat, perc_front)
        w_l_h, w_l_e = get_weight(perc_front, perc_lat)
        lat = q_lat[:, None].astype(np.float64)
        m = mask_neg.astype(np.float64)
        weight[:, 1:] = ((1 - lat) * (1 - m) * w_f_h + (1 - lat) * m * w_f_e
                         + lat * (1 - m) * w_l_h + lat * m * w_l_e)
    elif mode in ("append", "synthetic") and full:
        index, valid = np.asarray(draw["index"]), np.asarray(draw["valid"])
        n = index.shape[1]
        width = 2 * n if mode == "synthetic" else n
        appended = np.full((len(q), width), -np.inf)
        for lat in (0, 1):
            rows = q_lat == lat
            if not rows.any():
                continue
            sel = index[lat]
            block = logits[rows, 1:][:, sel].copy()
            block[:, ~valid[lat]] = -np.inf  # the queue held fewer than n keys of this laterality
            if mode == "synthetic":
                i1, i2 = np.asarray(draw["pair1"][lat]), np.asarray(draw["pair2"][lat])
                frac = np.asarray(draw["frac"][lat], np.float64)[None, :]
                syn = frac * block[:, i1] + (1 - frac) * block[:, i2]
                q1 = queue_keys[sel[i1]] * frac.T
                q2 = queue_keys[sel[i2]] * (1 - frac.T)
                norm = np.sqrt(2 * (q1 * q2).sum(1) + (q1 * q1).sum(1) + (q2 * q2).sum(1))
                block = np.concatenate([block, syn / norm[None, :]], 1)
            appended[rows] = block
        logits = np.concatenate([logits, appended], 1)
        weight = np.ones_like(logits)
    # WeightedSoftmaxMoCoLoss (plain cross-entropy with target 0 when every weight is 1)
    finite = np.isfinite(logits)
    m = np.max(np.where(finite, logits, -np.inf), axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.sum(np.where(finite, np.exp(logits - m), 0.0) * weight, axis=1))
    return float(np.mean(-logits[:, 0] + lse))
