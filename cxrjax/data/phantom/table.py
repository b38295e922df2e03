"""The phantom's canonical metadata table: one row per image, CheXpert's structure, rendered on demand."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrjax.data import schema

from . import structure
from .anatomy import patient_anatomy
from .course import patient_course, patient_latent
from .labels import study_labels
from .reports import study_report

SOURCE = "phantom"
EXTRA_COLUMNS = ("extra_seed", "extra_sex", "extra_age", "extra_phantom_version")


def make_table(n_patients: int, seed: int = 0, *, max_studies: int = structure.MAX_STUDIES,
               split_fractions=(0.8, 0.1, 0.1), version: str | None = None) -> pd.DataFrame:
    """Canonical metadata table of a synthetic cohort (one row per image; images rendered on demand).

    Patients `p00000..` with CheXpert's distribution of studies per patient (cut at `max_studies`),
    studies `p00012/s02` (study_order 2) holding CheXpert's mix of images
    (`p00012/s02/view1_frontal`, `.../view2_lateral`, ...), the study's 14 labels and report on every
    image of the study, patient-level hash splits. Extra columns: `extra_seed` (needed to re-render),
    `extra_sex`, `extra_age`, `extra_phantom_version` (the renderer its images are drawn with: `version`,
    default the current `VERSION`; the table itself is the same in every version). A pure function of
    (n_patients, seed, max_studies, split_fractions, version), and patient i is the same whatever n_patients.
    """
    from . import RENDER_VERSIONS, VERSION

    version = VERSION if version is None else str(version)
    if version not in RENDER_VERSIONS:
        raise ValueError(f"phantom version {version!r} is not one of {', '.join(RENDER_VERSIONS)} "
                         f"(version 1 is no longer rendered)")
    if n_patients < 0 or max_studies < 1:
        raise ValueError(f"need n_patients >= 0 and max_studies >= 1, got {n_patients}, {max_studies}")
    rows = []
    for i in range(n_patients):
        pid = f"p{i:05d}"
        an = patient_anatomy(seed, pid)
        k = patient_latent(seed, pid, max_studies).n_studies
        prev, prev_lab = None, None
        for st in patient_course(seed, pid, k):
            labels = study_labels(seed, pid, st)
            report = study_report(seed, pid, st, labels, prev, prev_lab)
            sid = f"{pid}/s{st.order:02d}"
            for j, view in enumerate(st.views):
                lat = "lateral" if view == "LATERAL" else "frontal"
                rows.append({"image_id": f"{sid}/view{j + 1}_{lat}", "path": "", "patient_id": pid, "study_id": sid,
                             "study_order": st.order, "view": view, **labels, "report": report,
                             "source": SOURCE, "extra_seed": int(seed), "extra_sex": an.sex, "extra_age": an.age,
                             "extra_phantom_version": version})
            prev, prev_lab = st, labels
    cols = list(schema.COLUMNS) + list(EXTRA_COLUMNS)
    t = pd.DataFrame(rows, columns=[c for c in cols if c not in ("laterality", "split")])
    t["laterality"] = schema.laterality_of(t["view"])
    t["split"] = schema.hash_split(t["patient_id"], split_fractions)
    t = schema.validate_table(t, where=f"phantom(n_patients={n_patients}, seed={seed})")
    t["extra_seed"] = t["extra_seed"].astype(np.int64)
    t["extra_age"] = t["extra_age"].astype(np.int64)
    return t
