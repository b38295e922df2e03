"""A study's latent state -> its 14 CheXpert labels (1 / 0 / -1 / NaN), the labeller's conventions.

- present (grade 1) -> 1; marginal (grade -1) -> -1 (uncertain);
- absent -> 0 when the report negates it (probability `Finding.neg`), else blank (NaN: not mentioned);
- Lung Opacity is 1 whenever one of its parenchymal children (lesion, edema, consolidation, pneumonia,
  atelectasis) is 1; "no opacity" (0) is never said next to an uncertain child (then it is blank);
- Support Devices is 1 when a line, tube or device is present, else 0 (rarely said) or blank;
- No Finding is 1 only when no pathology is 1 or -1 (and then blank in 21 % of studies, as CheXpert's
  labeller does), else blank.
"""

from __future__ import annotations

import numpy as np

from cxrjax.data.schema import CHEXPERT_LABELS

from . import course
from .course import FINDINGS, OPACITY_CHILDREN, PATHOLOGIES, StudyState
from .streams import rng

NO_FINDING_BLANK = 0.21   # CheXpert train: 2.7 % of its 12.7 % of images without any finding


def study_labels(seed: int, patient_id: str, state: StudyState) -> dict:
    """The 14 CheXpert labels of one study from its latent state."""
    u = rng(seed, "labels", patient_id, state.order).random(len(PATHOLOGIES) + 2)
    lab = {}
    for i, c in enumerate(PATHOLOGIES):
        g = state.grade[c]
        lab[c] = float(g) if g else (0.0 if u[i] < FINDINGS[c].neg else np.nan)
    if any(lab[c] == 1.0 for c in OPACITY_CHILDREN):
        lab["Lung Opacity"] = 1.0
    elif lab["Lung Opacity"] == 0.0 and any(lab[c] == -1.0 for c in OPACITY_CHILDREN):
        lab["Lung Opacity"] = np.nan
    if state.devices:
        lab["Support Devices"] = 1.0
    else:
        lab["Support Devices"] = 0.0 if u[-1] < course.SUPPORT_DEVICES.neg else np.nan
    clear = not any(lab[c] in (1.0, -1.0) for c in PATHOLOGIES)
    # CheXpert's labeller leaves No Finding blank for 21 % of its studies without any finding
    lab["No Finding"] = 1.0 if clear and u[-2] >= NO_FINDING_BLANK else np.nan
    return {c: lab[c] for c in CHEXPERT_LABELS}
