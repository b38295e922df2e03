"""A patient's persistent anatomy: body habitus, lungs, heart, ribs, vessels, and where findings sit.

Drawn once from (seed, patient_id) and the same on every image of every study of the patient, so
images of one patient resemble each other more than images of two patients (what MedAug's
same-patient positives rely on). Where a finding would appear (effusion side, lobe of a
consolidation, nodule position, fracture rib) is anatomy too: a patient's recurring effusion comes
back on the same side.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .streams import rng

LOBES = ("RUL", "RML", "RLL", "LUL", "lingula", "LLL")
LOBE_NAMES = {"RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe",
              "LUL": "left upper lobe", "lingula": "lingula", "LLL": "left lower lobe"}
# Lobe centres: frontal (side, |x|, y) and lateral (x = anterior(-)/posterior(+), y).
LOBE_FRONTAL = {"RUL": (-1, 0.36, -0.42), "RML": (-1, 0.30, 0.06), "RLL": (-1, 0.42, 0.26),
                "LUL": (1, 0.40, -0.40), "lingula": (1, 0.46, 0.04), "LLL": (1, 0.44, 0.30)}
LOBE_LATERAL = {"RUL": (-0.02, -0.45), "RML": (-0.32, 0.12), "RLL": (0.32, 0.26),
                "LUL": (-0.05, -0.40), "lingula": (-0.30, 0.08), "LLL": (0.36, 0.30)}


@dataclass(frozen=True)
class Anatomy:
    """Shapes in normalised coordinates ([-1, 1], y down, the patient's right on the image left)."""

    sex: str
    age: int
    W: float             # rib-cage half width (frontal)
    margin: float        # soft tissue beyond the ribs
    depth: float         # chest AP half depth (lateral)
    apex: float          # lung apex y
    dome_r: float        # right hemidiaphragm dome top y (PA, full inspiration)
    dome_l: float        # left dome below the right one by this much
    dome_h: float        # dome height above the costophrenic angles
    ctr: float           # normal cardiothoracic ratio
    heart_x: float
    heart_tilt: float
    wmed: float          # mediastinum half width
    rib_sp: float
    rib_phase: float
    rib_arch: float
    rib_w: float
    clav_y: float
    shoulder_y: float
    vessels: np.ndarray = field(repr=False)   # (2, 28, 10) angular x radial noise, one per hilum
    effusion_side: str = "right"
    lobe: str = "RLL"                  # consolidation / pneumonia
    opacity_lobe: str = "LUL"          # other lung opacity
    atel_side: int = 1
    atel: tuple = (0.45, 0.28, 0.2)    # |x|, y, angle (rad)
    ptx_side: int = 1
    lesion: tuple = (1, 0.4, -0.2, 0.0)  # side, |x|, y, z (lateral x)
    po_side: int = 1
    fracture_side: int = 1
    fracture_rib: float = 5.0
    fracture_u: float = 0.6
    pm_side: int = 1
    cline_side: int = -1
    gastric: tuple = (0.32, 0.12, 0.07)
    granuloma: tuple = ()              # a calcified granuloma (side, |x|, y, lateral x, radius) or none
    sternotomy: int = 0                # median sternotomy wires (their number) or 0


@functools.lru_cache(maxsize=8192)
def patient_anatomy(seed: int, patient_id: str) -> Anatomy:
    """Persistent anatomy of one patient, from (seed, patient_id)."""
    r = rng(seed, "patient", patient_id)
    u = r.random(64)
    n = r.standard_normal(16)
    sex = "F" if u[0] < 0.45 else "M"
    age = int(np.clip(round(62 + 17 * n[0]), 18, 95))
    habitus = float(np.clip(n[1], -2, 2.5))
    W = 0.72 + 0.05 * n[2] - (0.03 if sex == "F" else 0.0)
    vessels = r.standard_normal((2, 28, 10)).astype(np.float32)   # lung-marking noise (angle x radius)
    lx, ly = float(0.2 + 0.5 * u[20]), float(-0.55 + 0.95 * u[21])
    return Anatomy(
        sex=sex, age=age,
        W=float(np.clip(W, 0.58, 0.86)),
        margin=float(np.clip(0.07 + 0.035 * habitus, 0.03, 0.18)),
        depth=float(np.clip(0.66 + 0.04 * n[3] + 0.03 * habitus, 0.55, 0.82)),
        apex=float(-0.78 + 0.03 * n[4]),
        dome_r=float(0.30 + 0.05 * n[5]),
        dome_l=float(0.06 * u[2] + 0.025),
        dome_h=float(0.13 + 0.03 * u[3]),
        ctr=float(0.38 + 0.10 * u[4]),
        heart_x=float(0.09 + 0.04 * u[5]),
        heart_tilt=float(0.40 + 0.2 * u[6]),
        wmed=float(0.095 + 0.02 * u[7]),
        rib_sp=float(0.135 + 0.02 * u[8]),
        rib_phase=float(u[9]),
        rib_arch=float(0.30 + 0.12 * u[10]),
        rib_w=float(0.40 + 0.08 * u[11]),
        clav_y=float(-0.60 + 0.04 * n[6]),
        shoulder_y=float(-0.88 + 0.04 * n[7]),
        vessels=vessels,
        effusion_side=("right", "left", "bilateral")[int(np.searchsorted([0.35, 0.6], u[16]))],
        lobe=LOBES[int(u[17] * 6)],
        opacity_lobe=LOBES[int(u[18] * 6)],
        atel_side=1 if u[19] < 0.6 else -1,
        atel=(float(0.35 + 0.15 * u[22]), float(0.22 + 0.08 * u[23]), float(0.35 * (u[24] - 0.5))),
        ptx_side=1 if u[25] < 0.5 else -1,
        lesion=(1 if u[27] < 0.5 else -1, lx, ly, float(-0.35 + 0.7 * u[28])),
        po_side=1 if u[31] < 0.5 else -1,
        fracture_side=1 if u[32] < 0.5 else -1,
        fracture_rib=float(3 + int(5 * u[33])),
        fracture_u=float(0.55 + 0.3 * u[34]),
        pm_side=1 if u[37] < 0.85 else -1,
        cline_side=-1 if u[38] < 0.75 else 1,
        gastric=(float(0.28 + 0.1 * u[48]), float(0.10 + 0.05 * u[49]), float((0.05 + 0.05 * u[50]) * (u[51] < 0.85))),
        granuloma=((1 if u[53] < 0.5 else -1, float(0.15 + 0.45 * u[54]), float(-0.55 + 0.8 * u[55]),
                    float(-0.4 + 0.8 * u[56]), float(0.012 + 0.014 * u[57])) if u[52] < 0.2 else ()),
        sternotomy=int(5 + 2 * u[59]) if u[58] < 0.1 + 0.003 * max(age - 50, 0) else 0,
    )
