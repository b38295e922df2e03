"""The study structure of CheXpert's train table: studies per patient, images per study, views.

Measured on the real `train.csv` (223,414 images, 64,540 patients, 187,641 studies; the command
`python benchmarks/phantom_check.py --structure` prints these numbers and the phantom's beside them):

- studies per patient: 52 % of patients have one, the tail reaches 91 (`STUDIES_PER_PATIENT`);
- a study's frontal projection is AP for 84.7 % of studies (portable, sick patients) and PA otherwise;
- what a study holds depends on that projection (`COMPOSITION`): an AP study is a single frontal
  95 % of the time, a PA study comes with a lateral 88 % of the time; 2.2 % of studies hold two or
  three frontals or two laterals (the same-laterality study-mates MedAug's "same study, same
  laterality" strategy pairs).

The phantom draws the frontal projection from the study's acuity (course.py) and the rest from these
tables, so the shares of images alone in their study (68.8 %), in a one-frontal + one-lateral study
(26.6 %) and with a same-laterality study-mate (3.9 %) follow.
"""

from __future__ import annotations

import functools

import numpy as np

# Patients of CheXpert train.csv with k = 1, 2, ..., 40 studies; 92 patients have more (41..91),
# spread here evenly over 41..60.
_COUNTS_1_TO_40 = (
    33564, 11172, 5921, 3661, 2482, 1665, 1181, 896, 696, 529, 448, 345, 280, 236, 186, 178, 146, 121, 96, 93,
    67, 49, 63, 36, 44, 41, 37, 30, 22, 25, 23, 27, 20, 10, 11, 12, 4, 13, 10, 8)
_COUNT_OVER_40, TAIL_END = 92, 60
STUDIES_PER_PATIENT = np.concatenate([np.asarray(_COUNTS_1_TO_40, np.float64),
                                      np.full(TAIL_END - 40, _COUNT_OVER_40 / (TAIL_END - 40))])
STUDIES_PER_PATIENT /= STUDIES_PER_PATIENT.sum()
MAX_STUDIES = TAIL_END

# Share of studies whose first frontal image is AP (the rest PA), CheXpert train.
AP_SHARE = 0.847

# (frontals, laterals) of a study given its frontal projection: shares of CheXpert train studies.
COMPOSITION = {
    "AP": ((1, 0, 0.9536), (1, 1, 0.0271), (1, 2, 0.0031), (2, 0, 0.0153), (2, 1, 0.0008), (3, 0, 0.0002)),
    "PA": ((1, 0, 0.0720), (1, 1, 0.8846), (1, 2, 0.0163), (2, 0, 0.0039), (2, 1, 0.0230), (3, 0, 0.0003)),
}
# A study's further frontals mostly repeat its projection (AP+AP, PA+PA); otherwise the other one.
SAME_PROJECTION = 0.9


@functools.lru_cache(maxsize=64)
def _studies_cdf(max_studies: int) -> np.ndarray:
    p = STUDIES_PER_PATIENT[:max_studies]
    return np.cumsum(p) / p.sum()


@functools.lru_cache(maxsize=4)
def _composition_cdf(projection: str) -> np.ndarray:
    c = np.cumsum([s for _, _, s in COMPOSITION[projection]])
    return c / c[-1]


def n_studies(u: float, max_studies: int = MAX_STUDIES) -> int:
    """Studies of a patient from a uniform draw u (inverse CDF of STUDIES_PER_PATIENT, cut at max_studies)."""
    if max_studies < 1:
        raise ValueError(f"max_studies must be >= 1, got {max_studies}")
    return int(min(np.searchsorted(_studies_cdf(int(max_studies)), u, side="right"), max_studies - 1)) + 1


def study_views(frontal_view: str, u: np.ndarray) -> tuple[str, ...]:
    """The views of one study's images in acquisition order, from its frontal view and 4 uniforms.

    `frontal_view` is the study's first frontal (PA / AP / AP_SUPINE); laterals follow the frontals.
    """
    projection = "PA" if frontal_view == "PA" else "AP"
    shares = COMPOSITION[projection]
    n_front, n_lat, _ = shares[min(int(np.searchsorted(_composition_cdf(projection), u[0], side="right")), len(shares) - 1)]
    other = "AP" if projection == "PA" else "PA"
    fronts = [frontal_view] + [frontal_view if u[1 + i] < SAME_PROJECTION else other for i in range(n_front - 1)]
    return tuple(fronts) + ("LATERAL",) * n_lat
