"""The built-in synthetic chest X-ray data set (the "phantom"): CheXpert's study structure, graded findings.

Everything in cxrjax can run without real data because this package makes a canonical table
(`schema.validate_table`) whose images are rendered on demand:

- structure.py  CheXpert train's studies per patient, images per study and views (measured numbers);
- anatomy.py    a patient's persistent anatomy (habitus, lungs, heart, ribs, vessels, finding sites);
- course.py     the illness course: per study an acuity and, per finding, a latent that sets presence,
                uncertainty (-1) and a graded severity, persistent across a patient's studies;
- labels.py     the 14 CheXpert labels of a study (1 / 0 / -1 / blank), the labeller's conventions;
- reports.py    the study's report text, consistent with the labels, with severity words;
- table.py      `make_table(n_patients, seed)`: the canonical table;
- scene.py, frontal.py, lateral.py, raster.py, render.py: `render_image(row, size)`;
- cli.py        `python -m cxrjax.data.phantom --grid=... | --bench=...`.

Determinism: the data set is a pure function of (n_patients, seed) (and the image size): every random
draw comes from a (seed, kind, key) stream (streams.py), so a patient, a study, an image or a report
is the same whatever else was generated, in any order or process. A row alone re-renders its image
(`render_image(row)` reads `extra_seed`, the ids, the view and the labels).

`VERSION` changes whenever the generator's output changes; caches of prepared phantom data must key on
it (with patients, size and seed).

    python -m cxrjax.data.phantom --grid=/tmp/phantom_grid.png --patients=4 --seed=0 --size=256
    python -m cxrjax.data.phantom --bench=500 --size=64
    python benchmarks/phantom_check.py --structure     # side by side with CheXpert's train table
"""

from .anatomy import Anatomy, patient_anatomy
from .cli import main, write_sample_grid
from .course import FINDINGS, StudyState, patient_course, patient_latent, study_state
from .labels import study_labels
from .raster import tune_allocator
from .render import render_image, render_images
from .reports import study_report
from .streams import stable_int_hash
from .table import SOURCE, make_table

# 1: the single-module phantom (<= 1 frontal + 1 lateral per study); 2: CheXpert structure, graded findings;
# 3: real films' per-image nuisance (positioning, inspiration, exposure, tone, scatter, grid, collimation,
#    burnt-in text, external devices), docs/phantom.md. The table is the same in 2 and 3; the row's
#    `extra_phantom_version` picks the renderer (a table without it was made by version 2).
VERSION = "3"
RENDER_VERSIONS = ("2", "3")

__all__ = [
    "VERSION", "RENDER_VERSIONS", "SOURCE", "make_table", "render_image", "render_images", "write_sample_grid", "main",
    "tune_allocator", "patient_anatomy", "Anatomy", "patient_course", "patient_latent", "study_state",
    "StudyState", "study_labels", "study_report", "stable_int_hash", "FINDINGS",
]
