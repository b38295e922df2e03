"""What to draw for one table row: the patient's anatomy, the study's findings at their severity, devices.

Presence comes from the row's labels (editing a label in a row changes its image), details (side,
lobe, size, severity) from the patient's latent course, so a row alone re-renders its image.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from cxrjax.data.schema import CHEXPERT_LABELS

from .anatomy import Anatomy, patient_anatomy
from .course import FINDINGS, OPACITY_CHILDREN, PATHOLOGIES, StudyState, study_state
from .raster import Geom, gauss2, ramp, vessel_table
from .streams import rng


@dataclass
class Scene:
    """Everything the view drawers need for one image."""

    an: Anatomy
    st: StudyState
    view: str
    s: dict          # finding -> render strength = severity (0 absent; faint for uncertain)
    devices: tuple
    vessels: np.ndarray
    texture_key: str                 # study-level textures: the same on every image of the study
    seed: int
    patches: dict = field(default_factory=dict)


EDITED_SEVERITY = 0.5   # a positive label the latent course does not have (an edited row): a moderate finding


def _strength(c: str, label: float, st: StudyState) -> float:
    """Render strength of finding c: its latent severity when the label agrees with the course, a
    moderate (positive) or faint (uncertain) one when the row's label was edited, 0 when not present."""
    g, sev = st.grade[c], st.sev[c]
    if label == 1.0:
        return sev if g == 1 else EDITED_SEVERITY
    if label == -1.0:
        return sev if g == -1 else 0.5 * FINDINGS[c].floor
    return 0.0


def scene(row) -> Scene:
    """The scene of one table row (a dict or Series with the canonical columns and extra_seed)."""
    seed, pid = int(row["extra_seed"]), str(row["patient_id"])
    an = patient_anatomy(seed, pid)
    st = study_state(seed, pid, int(row["study_order"]))
    lab = {c: float(row[c]) for c in CHEXPERT_LABELS}
    s = {c: _strength(c, lab[c], st) for c in PATHOLOGIES}
    if st.grade["Lung Opacity"] == 0 and any(lab[c] in (1.0, -1.0) for c in OPACITY_CHILDREN):
        s["Lung Opacity"] = 0.0   # labelled for its children: they are the opacity
    devices = st.devices if lab["Support Devices"] == 1.0 else ()
    if lab["Support Devices"] == 1.0 and not devices:
        devices = ("cline",)
    return Scene(an=an, st=st, view=str(row["view"]), s=s, devices=devices, vessels=vessels_of(seed, pid),
                 texture_key=str(row["study_id"]), seed=seed)


def image_geom(seed: int, image_id: str, version: str = "2") -> tuple[Geom, np.random.Generator]:
    """Patient positioning of one image (rotation, shift, magnification) and its acquisition stream.

    Version 2: a well-centred patient (rotation SD 2 degrees, shift SD 1.5 % of the width, scale SD 4 %).
    Version 3: the spread measured on real films (`benchmarks/film_nuisance.py`, docs/phantom.md) from a
    stream of its own, so version 2's images are unchanged."""
    if version == "2":
        r = rng(seed, "image", image_id)
        n = r.standard_normal(4)
        geom = Geom(rot=float(np.clip(n[0], -2.5, 2.5)) * 0.035, tx=float(np.clip(n[1], -2, 2)) * 0.03,
                    ty=float(np.clip(n[2], -2, 2)) * 0.03 + 0.02, scale=float(1.0 + 0.04 * np.clip(n[3], -2, 2)))
        return geom, r
    r = rng(seed, "image-v3", image_id)
    n = r.standard_normal(4)
    p = POSITIONING_V3
    geom = Geom(rot=math.radians(p["rotation_sd_deg"]) * float(np.clip(n[0], -2.5, 2.5)),
                tx=2 * p["shift_x_sd"] * float(np.clip(n[1], -2.5, 2.5)),
                ty=2 * p["shift_y_sd"] * float(np.clip(n[2], -2.5, 2.5)) + p["shift_y_mean"],
                scale=float(math.exp(p["log_scale_mean"] + p["log_scale_sd"] * float(np.clip(n[3], -2.5, 2.5)))))
    return geom, r


# Version 3's positioning, per image: SDs as fractions of the image width (shift), degrees and log-scale,
# set to the robust SDs measured on NIH's 64 px films (benchmarks/film_nuisance.py, docs/phantom.md);
# the mean scale makes the chest fill the film as it does on real films (the phantom's chest at scale 1
# is ~0.75 of the width).
POSITIONING_V3 = {"rotation_sd_deg": 2.0, "shift_x_sd": 0.025, "shift_y_sd": 0.08, "shift_y_mean": 0.02,
                  "log_scale_mean": 0.1, "log_scale_sd": 0.07}


def patchy(sc: Scene, X, Y, n: int, key: str):
    """Study-level blotchy texture in [0, 1] (same pattern on every image and tile of the study)."""
    g = sc.patches.get((key, n))
    if g is None:
        r = rng(sc.seed, "texture", f"{sc.texture_key}:{key}")
        g = sc.patches[(key, n)] = ndimage.zoom(r.random((n, n)).astype(np.float32), 4, order=1, mode="nearest")
    m = g.shape[0]
    i = np.clip((Y + 1.3) * ((m - 1) / 2.6), 0, m - 1).astype(np.int32)
    j = np.clip((X + 1.3) * ((m - 1) / 2.6), 0, m - 1).astype(np.int32)
    return g.ravel().take(i * m + j)


def blob_opacity(sc, ctx, O, cx, cy, sx, sy, strength, key, n=14, base=0.55, gain=0.6, thr=0.25, mask_side=0):
    """Patchy lobar opacity (consolidation-like) added into O within a window."""
    w = ctx.win(cx, cy, 2.2 * sx, 2.2 * sy)
    if w is None:
        return None
    X, Y = ctx.x[w], ctx.y[w]
    g = gauss2(X - cx, Y - cy, sx, sy)
    if mask_side:
        g = g * ramp(mask_side * X, ctx.e1)
    O[w] += strength * np.clip((g * (base + gain * patchy(sc, X, Y, n, key)) - thr) * 2.5, 0, 1)
    return w


def box(ctx, A, gx, gy, rx, ry, dens):
    """A bright rounded rectangle (pacemaker generator)."""
    w = ctx.win(gx, gy, rx + 0.02, ry + 0.02)
    if w:
        qx, qy = (ctx.x[w] - gx) * (1 / rx), (ctx.y[w] - gy) * (1 / ry)
        qx, qy = qx * qx, qy * qy
        A[w] += dens * ramp(1.0 - (qx * qx + qy * qy), 0.2)


@functools.lru_cache(maxsize=1024)
def vessels_of(seed: int, patient_id: str) -> np.ndarray:
    """The patient's lung-marking lookup table (persistent anatomy)."""
    return vessel_table(patient_anatomy(seed, patient_id).vessels)


def effusion_height(sv: float) -> float:
    """Fluid height above the costophrenic angle (normalised units; the hemithorax is ~1.1 high) at
    severity sv: a trace blunts the angle by a few pixels at 64 px, a large effusion reaches the mid zone."""
    return 0.03 + 0.7 * sv ** 1.5


def effusion_density(sv: float) -> float:
    """Relative density of the fluid shadow: a thin layer of fluid is fainter than a deep one."""
    return min(1.0, 0.45 + 0.9 * sv)
