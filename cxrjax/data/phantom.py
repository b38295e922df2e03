"""The embedded default dataset: procedural chest radiographs with patients, studies, labels and reports.

Everything in cxrjax can run without real data because this module makes a canonical table
(`schema.validate_table`) whose images are rendered on demand and carry the structure the methods
exploit:

- a *patient* has persistent anatomy (habitus, lung shape, heart size, rib pattern, diaphragm height,
  vessel pattern, a pacemaker once implanted), drawn from (seed, patient_id);
- a patient has 1..max_studies *studies* over time; a latent illness course (acuity, findings with
  onset / persistence / resolution, lines and tubes in sick episodes) evolves from study to study;
- each study has a frontal image (PA, or AP / AP_SUPINE when sick) and often a LATERAL image, with
  the study's findings visible on both (effusion blunts the lateral costophrenic angle on the frontal
  and the posterior sulcus on the lateral), and per-image acquisition variation (exposure, gamma,
  noise, rotation/shift/scale, collimation, a side marker) so two images of a study differ;
- the 14 CheXpert labels per study (1 / 0 / -1 / NaN, blanks for unmentioned, -1 for uncertain findings,
  which are rendered faint) and a free-text report (FINDINGS + IMPRESSION) consistent with them.

Determinism: every random draw comes from `np.random.default_rng([seed, stable_int_hash(key), ...])`
for a patient, a study or an image key, so the same (n_patients, seed) gives bit-identical tables,
images and reports whatever the row order or subset rendered. A row alone re-renders its image:
`render_image(row)` reads `extra_seed`, the ids, the view and the labels; the finding *details*
(side, lobe, size) come from the patient's latent course, the *presence* from the labels, so editing
a label in a row changes the image accordingly.

    python -m cxrjax.data.phantom --grid=/tmp/phantom_grid.png --patients=4 --seed=0 --size=256
    python -m cxrjax.data.phantom --bench=500        # images/s on this core
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from cxrjax.data import schema
from cxrjax.data.schema import CHEXPERT_LABELS

SOURCE = "phantom"
_PATHOLOGIES = tuple(c for c in CHEXPERT_LABELS if c not in ("No Finding", "Support Devices"))
_OPACITY_CHILDREN = ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis")
_DEVICES = ("ett", "ng", "cline", "pacemaker", "chest_tube")
_LOBES = ("RUL", "RML", "RLL", "LUL", "lingula", "LLL")
_LOBE_NAMES = {"RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe",
               "LUL": "left upper lobe", "lingula": "lingula", "LLL": "left lower lobe"}
# Lobe centres: frontal (side, |x|, y) and lateral (x = anterior(-)/posterior(+), y); spreads.
_LOBE_FRONTAL = {"RUL": (-1, 0.36, -0.42), "RML": (-1, 0.30, 0.06), "RLL": (-1, 0.42, 0.26),
                 "LUL": (1, 0.40, -0.40), "lingula": (1, 0.46, 0.04), "LLL": (1, 0.44, 0.30)}
_LOBE_LATERAL = {"RUL": (-0.02, -0.45), "RML": (-0.32, 0.12), "RLL": (0.32, 0.26),
                 "LUL": (-0.05, -0.40), "lingula": (-0.30, 0.08), "LLL": (0.36, 0.30)}


# ---------------------------------------------------------------------------------------------------
# Deterministic random streams


def stable_int_hash(key) -> int:
    """A 63-bit integer from a string key, the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little") >> 1


def _rng(seed: int, kind: str, key: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stable_int_hash(f"{kind}:{key}"), *map(int, more)])


# ---------------------------------------------------------------------------------------------------
# Patients: persistent anatomy and propensities


@dataclass(frozen=True)
class Anatomy:
    sex: str
    age: int
    frailty: float       # baseline illness, drives acuity
    chf: bool            # chronic heart failure: cardiomegaly, edema and effusion episodes
    W: float             # rib-cage half width (frontal)
    margin: float        # soft tissue beyond the ribs
    depth: float         # chest AP half depth (lateral)
    apex: float          # lung apex y
    dome_r: float        # right hemidiaphragm dome top y (PA, full inspiration)
    dome_l: float
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
    cardio_sev: float = 0.0   # chronic cardiomegaly severity (0: normal heart)
    borderline_heart: bool = False
    ecm_flag: bool = False
    effusion_side: str = "right"
    lobe: str = "RLL"
    opacity_lobe: str = "LUL"
    atel_side: int = 1
    atel: tuple = (0.45, 0.28, 0.2)   # |x|, y, angle (rad)
    ptx_side: int = 1
    lesion_p: float = 0.0
    lesion: tuple = (1, 0.4, -0.2, 0.0, 0.3)  # side, |x|, y, z (lateral x), initial size
    pleural_other: bool = False
    po_side: int = 1
    fracture_side: int = 1
    fracture_rib: float = 5.0
    fracture_u: float = 0.6
    pacemaker_at: int = 10**6          # first study with a pacemaker
    pm_side: int = 1
    cline_side: int = -1
    propensity: dict = field(default_factory=dict, repr=False)
    gastric: tuple = (0.32, 0.12, 0.07)


@functools.lru_cache(maxsize=8192)
def patient_anatomy(seed: int, patient_id: str) -> Anatomy:
    """Persistent anatomy and disease propensities of one patient, from (seed, patient_id)."""
    r = _rng(seed, "patient", patient_id)
    u = r.random(64)
    n = r.standard_normal(16)
    sex = "F" if u[0] < 0.45 else "M"
    age = int(np.clip(round(62 + 17 * n[0]), 18, 95))
    frailty = float(np.clip(r.beta(1.4, 3.2) + 0.002 * (age - 60), 0, 1))
    habitus = float(np.clip(n[1], -2, 2.5))
    W = 0.72 + 0.035 * n[2] - (0.03 if sex == "F" else 0.0)
    chf = bool(u[1] < 0.08 + 0.35 * frailty)
    vessels = r.standard_normal((2, 28, 10)).astype(np.float32)   # lung-marking noise (angle x radius)
    lx, ly = float(0.2 + 0.5 * u[20]), float(-0.55 + 0.95 * u[21])
    return Anatomy(
        sex=sex, age=age, frailty=frailty, chf=chf,
        W=float(np.clip(W, 0.6, 0.84)),
        margin=float(np.clip(0.07 + 0.035 * habitus, 0.03, 0.18)),
        depth=float(np.clip(0.66 + 0.04 * n[3] + 0.03 * habitus, 0.55, 0.82)),
        apex=float(-0.78 + 0.03 * n[4]),
        dome_r=float(0.30 + 0.04 * n[5]),
        dome_l=float(0.06 * u[2] + 0.025),
        dome_h=float(0.13 + 0.03 * u[3]),
        ctr=float(0.40 + 0.07 * u[4]),
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
        cardio_sev=float(0.25 + 0.75 * u[12]) if chf and u[13] < 0.75 else 0.0,
        borderline_heart=bool(u[14] < 0.1),
        ecm_flag=bool(u[15] < 0.05),
        effusion_side=("right", "left", "bilateral")[int(np.searchsorted([0.35, 0.6], u[16]))],
        lobe=_LOBES[int(u[17] * 6)],
        opacity_lobe=_LOBES[int(u[18] * 6)],
        atel_side=1 if u[19] < 0.6 else -1,
        atel=(float(0.35 + 0.15 * u[22]), float(0.22 + 0.08 * u[23]), float(0.35 * (u[24] - 0.5))),
        ptx_side=1 if u[25] < 0.5 else -1,
        lesion_p=float(0.15 if u[26] < 0.08 else 0.0),
        lesion=(1 if u[27] < 0.5 else -1, lx, ly, float(-0.35 + 0.7 * u[28]), float(0.1 + 0.4 * u[29])),
        pleural_other=bool(u[30] < 0.04),
        po_side=1 if u[31] < 0.5 else -1,
        fracture_side=1 if u[32] < 0.5 else -1,
        fracture_rib=float(3 + int(5 * u[33])),
        fracture_u=float(0.55 + 0.3 * u[34]),
        pacemaker_at=int(u[36] * 4) if u[35] < 0.05 + 0.12 * frailty else 10**6,
        pm_side=1 if u[37] < 0.85 else -1,
        cline_side=-1 if u[38] < 0.75 else 1,
        propensity={
            "consolidation": 0.03 + 0.08 * u[40], "atelectasis": 0.05 + 0.1 * u[41],
            "pneumothorax": 0.01 + 0.04 * u[42] * (u[43] < 0.3), "fracture": 0.015 * (u[44] < 0.4),
            "opacity": 0.03 + 0.05 * u[45], "edema": 0.02 + 0.05 * u[46], "effusion": 0.03 + 0.06 * u[47],
        },
        gastric=(float(0.28 + 0.1 * u[48]), float(0.10 + 0.05 * u[49]), float((0.05 + 0.05 * u[50]) * (u[51] < 0.85))),
    )


# ---------------------------------------------------------------------------------------------------
# The illness course: one latent state per study


@dataclass
class StudyState:
    order: int
    acuity: float
    sev: dict           # CheXpert label -> latent severity in [0, 1] (0 = absent)
    devices: tuple      # subset of _DEVICES
    frontal_view: str   # PA / AP / AP_SUPINE
    lateral_u: float    # a lateral image exists iff lateral_u < lateral probability of this view
    inspiration: float  # diaphragm shift of this study (+ = lower inspiration)
    lesion_size: float


def _step(seed: int, patient_id: str, an: Anatomy, t: int, prev: StudyState | None) -> StudyState:
    r = _rng(seed, "study", patient_id, t)
    u = r.random(48)   # a fixed number of draws per step: the course is prefix-stable
    n = r.standard_normal(8)
    p = an.propensity
    a_prev = prev.acuity if prev else an.frailty
    a = float(np.clip(0.5 * a_prev + 0.5 * an.frailty + 0.22 * n[0], 0, 1))
    ps = prev.sev if prev else {c: 0.0 for c in _PATHOLOGIES}
    pdev = set(prev.devices) if prev else set()
    sev = {c: 0.0 for c in _PATHOLOGIES}

    def course(name, k, rate, persist, lo=0.1):
        if ps[name] > 0:
            return float(np.clip(ps[name] * (0.65 + 0.7 * u[k + 1]), lo, 1)) if u[k] < persist else 0.0
        return float(0.08 + 0.92 * u[k + 1]) if u[k] < rate else 0.0

    hf = 1.0 if an.chf else 0.0
    sev["Edema"] = course("Edema", 0, p["edema"] + hf * (0.12 + 0.5 * a) + 0.1 * a, 0.35)
    sev["Pleural Effusion"] = course(
        "Pleural Effusion", 2, p["effusion"] + hf * (0.1 + 0.3 * a) + 0.25 * a + 0.3 * (sev["Edema"] > 0), 0.6)
    sev["Consolidation"] = course("Consolidation", 4, p["consolidation"] + 0.3 * a, 0.45)
    if sev["Consolidation"] > 0:
        infected = ps["Pneumonia"] > 0 if ps["Consolidation"] > 0 else u[6] < 0.6
        sev["Pneumonia"] = sev["Consolidation"] if infected else 0.0
    sev["Atelectasis"] = course("Atelectasis", 7, p["atelectasis"] + 0.3 * a, 0.4)
    sev["Pneumothorax"] = course("Pneumothorax", 9, p["pneumothorax"] + 0.05 * a + 0.08 * ("cline" in pdev), 0.5)
    sev["Fracture"] = course("Fracture", 11, p["fracture"], 0.85, lo=0.3)
    sev["Lung Opacity"] = course("Lung Opacity", 13, p["opacity"] + 0.08 * a, 0.4)
    if an.cardio_sev > 0:
        sev["Cardiomegaly"] = float(np.clip(an.cardio_sev + 0.08 * n[1] + 0.1 * (sev["Edema"] > 0), 0.12, 1))
    elif an.borderline_heart:
        sev["Cardiomegaly"] = 0.2
    if an.ecm_flag or (sev["Cardiomegaly"] >= 0.3 and u[15] < 0.35):
        sev["Enlarged Cardiomediastinum"] = max(0.4, 0.8 * sev["Cardiomegaly"])
    lesion_size = 0.0
    if an.lesion_p > 0:
        lesion_size = prev.lesion_size * (1.0 + 0.12 * u[16]) if prev and prev.lesion_size > 0 else (
            an.lesion[4] if u[17] < 0.6 else 0.0)
    sev["Lung Lesion"] = float(min(lesion_size, 1.0))
    if an.pleural_other:
        sev["Pleural Other"] = 0.2 + 0.5 * an.frailty
    # lines and tubes
    dev = set()
    if (a > 0.72 and u[20] < 0.7) or ("ett" in pdev and a > 0.5 and u[21] < 0.6):
        dev.add("ett")
        if u[22] < 0.7:
            dev.add("ng")
    if (a > 0.5 and u[23] < 0.55) or ("cline" in pdev and u[24] < 0.75):
        dev.add("cline")
    if t >= an.pacemaker_at:
        dev.add("pacemaker")
    if ((ps["Pneumothorax"] > 0.3 or ps["Pleural Effusion"] > 0.7) and u[25] < 0.7) or ("chest_tube" in pdev and u[26] < 0.5):
        dev.add("chest_tube")
    if "chest_tube" in dev and sev["Pneumothorax"] > 0:
        sev["Pneumothorax"] *= 0.5
    sick = "ett" in dev or a > 0.65 or ("cline" in dev and u[27] < 0.6)
    if sick:
        view = "AP_SUPINE" if (a > 0.8 and u[28] < 0.5) else "AP"
    else:
        view = "PA" if u[28] < 0.8 else "AP"
    return StudyState(order=t, acuity=a, sev=sev, devices=tuple(d for d in _DEVICES if d in dev),
                      frontal_view=view, lateral_u=float(u[30]),
                      inspiration=float(0.03 * n[2] + (0.05 if view != "PA" else 0.0)), lesion_size=float(lesion_size))


@functools.lru_cache(maxsize=4096)
def _course(seed: int, patient_id: str, n_steps: int) -> tuple:
    an = patient_anatomy(seed, patient_id)
    states, prev = [], None
    for t in range(n_steps):
        prev = _step(seed, patient_id, an, t, prev)
        states.append(prev)
    return tuple(states)


def patient_course(seed: int, patient_id: str, n_steps: int) -> tuple:
    """The latent states of a patient's first n_steps studies (a prefix of every longer course)."""
    return _course(int(seed), str(patient_id), int(n_steps))


def n_studies_of(seed: int, patient_id: str, max_studies: int) -> int:
    w = 0.7 ** np.arange(max_studies)
    u = _rng(seed, "n_studies", patient_id).random()
    return int(np.searchsorted(np.cumsum(w) / w.sum(), u, side="right")) + 1


# ---------------------------------------------------------------------------------------------------
# Labels: latent severity -> CheXpert values (1 / 0 / -1 / NaN)

# Probability that a negative finding is explicitly negated in the report (label 0; else blank).
_NEG_MENTION = {
    "Enlarged Cardiomediastinum": 0.25, "Cardiomegaly": 0.3, "Lung Opacity": 0.08, "Lung Lesion": 0.03,
    "Edema": 0.25, "Consolidation": 0.3, "Pneumonia": 0.05, "Atelectasis": 0.02, "Pneumothorax": 0.5,
    "Pleural Effusion": 0.55, "Pleural Other": 0.01, "Fracture": 0.08,
}


def study_labels(seed: int, patient_id: str, state: StudyState) -> dict:
    """The 14 CheXpert labels of one study from its latent state."""
    r = _rng(seed, "labels", patient_id, state.order)
    u = r.random(32)
    lab = {}
    for i, c in enumerate(_PATHOLOGIES):
        s = state.sev[c]
        if c == "Lung Opacity":
            continue
        if c == "Pneumonia" and s > 0:
            lab[c] = 1.0 if u[i] < 0.35 else -1.0
        elif s >= 0.3:
            lab[c] = -1.0 if (s < 0.4 and u[i] < 0.3) else 1.0
        elif s >= 0.1:
            lab[c] = -1.0
        else:
            lab[c] = 0.0 if u[i + 14] < _NEG_MENTION[c] else np.nan
    kids = [lab[c] for c in _OPACITY_CHILDREN]
    s = state.sev["Lung Opacity"]
    if 1.0 in kids:
        lab["Lung Opacity"] = 1.0
    elif s >= 0.3:
        lab["Lung Opacity"] = 1.0
    elif s >= 0.1 or -1.0 in kids:
        lab["Lung Opacity"] = -1.0
    else:
        lab["Lung Opacity"] = 0.0 if u[30] < _NEG_MENTION["Lung Opacity"] else np.nan
    if lab["Lung Opacity"] == 0.0:   # "lungs clear": no child may be uncertain or positive (they aren't)
        for c in _OPACITY_CHILDREN:
            lab[c] = lab[c] if lab[c] == 0.0 else np.nan
    if state.devices:
        lab["Support Devices"] = 1.0
    else:
        lab["Support Devices"] = 0.0 if u[31] < 0.04 else np.nan
    lab["No Finding"] = np.nan if any(lab[c] in (1.0, -1.0) for c in _PATHOLOGIES) else 1.0
    return {c: lab[c] for c in CHEXPERT_LABELS}


# ---------------------------------------------------------------------------------------------------
# Reports

_T = {
    "Pleural Effusion": {
        1: ["{Size} {side} pleural effusion{chg}.", "There is a {size} {side} pleural effusion{chg}.",
            "{Side} pleural effusion, {size}{chg}.", "Blunting of the {cpa} with a meniscus, consistent with a {size} {side} pleural effusion{chg}.",
            "{Size} {side} effusion{chg}."],
        -1: ["Possible {small} {side} pleural effusion.", "Blunting of the {cpa} may reflect a {small} pleural effusion.",
             "A {small} {side} pleural effusion cannot be excluded.", "Questionable {small} {side} effusion."],
        0: ["No pleural effusion.", "There is no pleural effusion.", "No effusion is seen.", "No evidence of pleural effusion."],
        "resolved": ["Interval resolution of the {side} pleural effusion.", "The previously seen {side} effusion has resolved."],
    },
    "Pneumothorax": {
        1: ["{Size} {side} pneumothorax{chg}.", "There is a {size} {side} apical pneumothorax{chg}.",
            "{Side} pneumothorax, {size}{chg}, with a visible visceral pleural line."],
        -1: ["Possible tiny {side} apical pneumothorax.", "A small {side} pneumothorax cannot be excluded.",
             "Questionable {side} apical pneumothorax."],
        0: ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax.", "No pneumothorax is seen."],
        "resolved": ["Interval resolution of the {side} pneumothorax.", "The {side} pneumothorax has resolved."],
    },
    "Cardiomegaly": {
        1: ["{Mild} cardiomegaly{chg}.", "The heart is {mildly} enlarged{chg}.", "{Mild} enlargement of the cardiac silhouette{chg}.",
            "Cardiomegaly is {mild}{chg}."],
        -1: ["Heart size is borderline, possible mild cardiomegaly.", "Possible mild cardiomegaly.",
             "The cardiac silhouette may be mildly enlarged."],
        0: ["Heart size is normal.", "The heart is not enlarged.", "Heart size is within normal limits.", "Normal heart size."],
    },
    "Enlarged Cardiomediastinum": {
        1: ["The cardiomediastinal silhouette is enlarged.", "Widening of the mediastinum.", "Enlarged cardiomediastinal contours."],
        -1: ["The mediastinum is possibly widened.", "Mediastinal contours may be mildly widened."],
        0: ["Mediastinal contours are normal.", "The mediastinum is not widened.", "Normal mediastinal contours."],
    },
    "Edema": {
        1: ["{Mild} pulmonary edema{chg}.", "Perihilar haziness consistent with {mild} pulmonary edema{chg}.",
            "There is {mild} interstitial edema{chg}.", "Findings compatible with {mild} pulmonary edema{chg}."],
        -1: ["Possible mild pulmonary edema.", "Perihilar haziness may represent mild edema.",
             "Mild interstitial edema cannot be excluded."],
        0: ["No pulmonary edema.", "There is no pulmonary edema.", "No evidence of edema."],
        "resolved": ["Interval resolution of pulmonary edema."],
    },
    "Consolidation": {
        1: ["Consolidation in the {lobe}{chg}.", "There is {lobe} consolidation with air bronchograms{chg}.",
            "Patchy consolidation of the {lobe}{chg}.", "{Lobe} consolidation{chg}."],
        -1: ["Possible consolidation in the {lobe}.", "Hazy opacity in the {lobe} may represent consolidation.",
             "Questionable {lobe} consolidation."],
        0: ["No focal consolidation.", "There is no consolidation.", "No consolidation is seen."],
        "resolved": ["Interval resolution of the {lobe} consolidation."],
    },
    "Pneumonia": {
        1: ["Findings are consistent with pneumonia.", "Consistent with {lobe} pneumonia.", "Compatible with pneumonia."],
        -1: ["Could reflect pneumonia in the appropriate clinical setting.", "Pneumonia cannot be excluded.",
             "Possibly pneumonia.", "Suspicious for pneumonia."],
        0: ["No evidence of pneumonia.", "No radiographic evidence of pneumonia."],
    },
    "Atelectasis": {
        1: ["{Side} basilar atelectasis.", "Linear plate-like atelectasis at the {side} base{chg}.",
            "There is {side} basal atelectasis{chg}.", "Subsegmental atelectasis in the {side} lower zone{chg}."],
        -1: ["Possible {side} basilar atelectasis.", "Linear opacity at the {side} base may represent atelectasis.",
             "Questionable {side} basilar atelectasis."],
        0: ["No atelectasis."],
    },
    "Lung Lesion": {
        1: ["{mm} mm nodule in the {zone}{chg}.", "There is a {mm} mm pulmonary nodule in the {zone}{chg}.",
            "A {cm} cm mass in the {zone}{chg}.", "Rounded {cm} cm mass projecting over the {zone}{chg}."],
        -1: ["Possible small nodule in the {zone}.", "A nodular density in the {zone} may represent a nodule.",
             "Questionable nodule in the {zone}."],
        0: ["No pulmonary nodules or masses.", "No nodule or mass is seen."],
    },
    "Lung Opacity": {
        1: ["Patchy opacity in the {zone}{chg}.", "There is a hazy opacity in the {zone}{chg}.", "Airspace opacity in the {zone}{chg}."],
        -1: ["Possible subtle opacity in the {zone}.", "Questionable hazy opacity in the {zone}."],
        0: ["No focal airspace opacity.", "There are no lung opacities."],
    },
    "Pleural Other": {
        1: ["{Side} apical pleural thickening.", "Pleural thickening along the {side} apex.", "{Side} apical pleural cap."],
        -1: ["Possible {side} apical pleural thickening."],
        0: ["No pleural thickening."],
    },
    "Fracture": {
        1: ["Fracture of a {side} posterior rib{chg}.", "There is a {side} rib fracture{chg}.", "{Side} posterior rib fracture{chg}."],
        -1: ["Possible {side} rib fracture.", "Questionable cortical irregularity of a {side} rib, possibly a fracture."],
        0: ["No acute fracture.", "No displaced rib fracture.", "There is no fracture."],
    },
}
_DEVICE_TEXT = {
    "ett": ["Endotracheal tube terminates {n} cm above the carina.", "The endotracheal tube is in standard position, {n} cm above the carina.",
            "ET tube tip {n} cm above the carina."],
    "ng": ["Enteric tube courses below the diaphragm.", "A nasogastric tube extends into the stomach.", "NG tube tip in the stomach."],
    "cline": ["{Cside} {cvia} central venous catheter with tip in the SVC.", "{Cside} {cvia} line terminates in the mid SVC.",
              "A {cside} {cvia} catheter ends at the cavoatrial junction."],
    "pacemaker": ["{Pside}-sided pacemaker with leads in the right atrium and right ventricle.",
                  "Dual-lead pacemaker, {pside} chest wall.", "{Pside} pectoral pacemaker device with intact leads."],
    "chest_tube": ["{Tside} chest tube in place.", "A {tside} pleural drain is present.", "{Tside} chest tube with tip at the apex."],
}
_NORMAL_IMPRESSION = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                      "Normal chest radiograph.", "No acute intrathoracic process."]
_LUNGS_CLEAR = ["The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear."]


def _size_words(s: float, kind: str = "size") -> tuple[str, str]:
    if kind == "size":
        w = "small" if s < 0.45 else ("moderate" if s < 0.75 else "large")
    else:
        w = "mild" if s < 0.45 else ("moderate" if s < 0.75 else "severe")
    return w, {"mild": "mildly", "moderate": "moderately", "severe": "severely"}.get(w, w)


def _side_word(side: int) -> str:
    return "left" if side > 0 else "right"


def _zone(side: int, y: float) -> str:
    z = "upper" if y < -0.3 else ("mid" if y < 0.1 else "lower")
    return f"{_side_word(side)} {z} zone"


def _finding_slots(c: str, an: Anatomy, st: StudyState, prev: StudyState | None, prev_lab: dict | None, lab_now) -> dict:
    s = max(st.sev[c], 0.3)
    size, _ = _size_words(s)
    mild, mildly = _size_words(s, "severity")
    eff_side = an.effusion_side
    lx = _LOBE_FRONTAL
    slots = {
        "size": size, "mild": mild, "mildly": mildly, "small": "small" if s > 0.2 else "trace",
        "lobe": _LOBE_NAMES[an.lobe],
        "cpa": "costophrenic angles" if eff_side == "bilateral" else f"{eff_side} costophrenic angle",
        "chg": "",
    }
    if c == "Pleural Effusion":
        slots["side"] = eff_side
    elif c == "Pneumothorax":
        slots["side"] = _side_word(an.ptx_side)
    elif c == "Atelectasis":
        slots["side"] = _side_word(an.atel_side)
    elif c == "Pleural Other":
        slots["side"] = _side_word(an.po_side)
    elif c == "Fracture":
        slots["side"] = _side_word(an.fracture_side)
    elif c == "Lung Lesion":
        side, _, y, _, _ = an.lesion
        slots["zone"] = _zone(side, y)
        d_cm = 0.6 + 6.0 * min(st.lesion_size, 1.0) if st.lesion_size > 0 else 1.2
        slots["mm"], slots["cm"] = str(int(round(d_cm * 10))), f"{max(d_cm, 3.1):.1f}"
    elif c == "Lung Opacity":
        side, _, y = lx[an.opacity_lobe]
        slots["zone"] = _zone(side, y)
    # interval change against the previous study (only when both are positive)
    if prev is not None and prev_lab is not None and lab_now == 1.0 and c in prev_lab:
        was = prev_lab[c]
        if was != 1.0 and was != -1.0:
            slots["chg"] = ", new since the prior study" if c not in ("Cardiomegaly",) else ""
        elif was == 1.0:
            d = st.sev[c] - prev.sev[c]
            slots["chg"] = ", increased" if d > 0.12 else (", decreased" if d < -0.12 else ", unchanged")
    if c in ("Lung Lesion",) and slots["chg"] == ", new since the prior study":
        slots["chg"] = ""
    return {**slots, **{k.capitalize(): v.capitalize() for k, v in slots.items() if k not in ("chg",)}}


def study_report(seed: int, patient_id: str, state: StudyState, labels: dict, has_lateral: bool,
                 prev: StudyState | None = None, prev_labels: dict | None = None) -> str:
    """FINDINGS + IMPRESSION text consistent with the study's labels (blank labels are not mentioned)."""
    an = patient_anatomy(seed, patient_id)
    r = _rng(seed, "report", patient_id, state.order)

    def pick(options):
        return options[int(r.integers(len(options)))]

    groups = {"devices": [], "lungs": [], "pleura": [], "heart": [], "bones": []}
    impression, hedged = [], []
    negs = []
    group_of = {"Pleural Effusion": "pleura", "Pneumothorax": "pleura", "Pleural Other": "pleura",
                "Cardiomegaly": "heart", "Enlarged Cardiomediastinum": "heart", "Fracture": "bones"}
    # devices
    if labels["Support Devices"] == 1.0:
        cs = an.cline_side
        dev_slots = {"n": str(int(r.integers(3, 7))), "cside": _side_word(cs), "Cside": _side_word(cs).capitalize(),
                     "cvia": "internal jugular" if cs < 0 else "subclavian", "pside": _side_word(an.pm_side),
                     "Pside": _side_word(an.pm_side).capitalize(), "tside": _side_word(an.ptx_side),
                     "Tside": _side_word(an.ptx_side).capitalize()}
        devs = state.devices or ("cline",)
        for d in devs:
            groups["devices"].append(pick(_DEVICE_TEXT[d]).format(**dev_slots))
        if r.random() < 0.5:
            impression.append(pick(["Lines and tubes as described.", "Support devices in standard position.",
                                    "Tubes and lines in appropriate position."]))
    elif labels["Support Devices"] == 0.0:
        groups["devices"].append(pick(["No lines or tubes.", "No support devices are seen."]))
    # findings
    order = list(_PATHOLOGIES)
    r.shuffle(order)
    for c in order:
        v = labels[c]
        if v != v:   # NaN: not mentioned
            continue
        if c == "Lung Opacity" and v == 1.0 and any(labels[k] in (1.0, -1.0) for k in _OPACITY_CHILDREN):
            continue   # the children's sentences describe the opacity
        if c == "Lung Opacity" and v == -1.0 and any(labels[k] == -1.0 for k in _OPACITY_CHILDREN):
            continue
        slots = _finding_slots(c, an, state, prev, prev_labels, v)
        if v == 0.0:
            was_pos = prev_labels is not None and prev_labels.get(c) == 1.0
            if was_pos and "resolved" in _T[c] and r.random() < 0.7:
                groups[group_of.get(c, "lungs")].append(pick(_T[c]["resolved"]).format(**slots))
            else:
                negs.append(c)
            continue
        text = pick(_T[c][int(v)]).format(**slots)
        groups[group_of.get(c, "lungs")].append(text)
        if v == 1.0 or r.random() < 0.6:
            impression.append(text)
        else:
            hedged.append(text)
    # negatives: sometimes merged ("No pleural effusion or pneumothorax."), else one sentence each
    if "Pleural Effusion" in negs and "Pneumothorax" in negs and r.random() < 0.5:
        negs.remove("Pleural Effusion"), negs.remove("Pneumothorax")
        groups["pleura"].append(pick(["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
                                      "No effusion or pneumothorax."]))
    if "Cardiomegaly" in negs and "Enlarged Cardiomediastinum" in negs and r.random() < 0.7:
        negs.remove("Cardiomegaly"), negs.remove("Enlarged Cardiomediastinum")
        groups["heart"].append(pick(["The cardiomediastinal silhouette is normal.", "Normal cardiomediastinal silhouette.",
                                     "Heart size and mediastinal contours are normal."]))
    for c in negs:
        groups[group_of.get(c, "lungs")].append(pick(_T[c][0]))
    if labels["Lung Opacity"] == 0.0 and r.random() < 0.7:
        groups["lungs"].insert(0, pick(_LUNGS_CLEAR))
    if labels["No Finding"] == 1.0 and not groups["lungs"] and r.random() < 0.5:
        groups["lungs"].append(pick(_LUNGS_CLEAR))
    keys = ["devices", "lungs", "pleura", "heart", "bones"]
    if r.random() < 0.4:
        keys = ["devices", "heart", "lungs", "pleura", "bones"]
    findings = " ".join(s for k in keys for s in groups[k])
    if not findings:
        findings = pick(["No acute findings.", "Unremarkable examination."]) if labels["No Finding"] == 1.0 else ""
    if not [s for s in impression if "Lines" not in s and "devices" not in s and "Tubes" not in s]:
        impression.extend(hedged[:1] if hedged else [pick(_NORMAL_IMPRESSION)])
    view = state.frontal_view
    exam = {"PA": "PA and lateral views of the chest." if has_lateral else "PA view of the chest.",
            "AP": "Portable AP chest radiograph." if not has_lateral else "AP and lateral views of the chest.",
            "AP_SUPINE": "Portable supine AP chest radiograph."}[view]
    head = f"EXAMINATION: {exam}"
    if state.order > 0 and r.random() < 0.7:
        head += " COMPARISON: Prior chest radiograph."
    return f"{head}\nFINDINGS: {findings}\nIMPRESSION: {' '.join(impression)}".strip()


# ---------------------------------------------------------------------------------------------------
# The table


def make_table(n_patients: int, seed: int = 0, *, max_studies: int = 4, lateral_prob: float = 0.6,
               split_fractions=(0.8, 0.1, 0.1)) -> pd.DataFrame:
    """Canonical metadata table of a synthetic cohort (one row per image; images rendered on demand).

    Patients `p00000..`, 1..max_studies studies each (`p00012/s02`), a frontal image per study and a
    lateral one with probability `lateral_prob` (PA studies) or `lateral_prob / 3` (portable AP).
    Extra columns: `extra_seed` (needed to re-render), `extra_sex`, `extra_age` (informative).
    """
    if n_patients < 0 or max_studies < 1:
        raise ValueError(f"need n_patients >= 0 and max_studies >= 1, got {n_patients}, {max_studies}")
    rows = []
    for i in range(n_patients):
        pid = f"p{i:05d}"
        an = patient_anatomy(seed, pid)
        k = n_studies_of(seed, pid, max_studies)
        course = patient_course(seed, pid, k)
        prev, prev_lab = None, None
        for st in course:
            labels = study_labels(seed, pid, st)
            p_lat = lateral_prob if st.frontal_view == "PA" else lateral_prob / 3
            has_lat = st.lateral_u < p_lat
            report = study_report(seed, pid, st, labels, has_lat, prev, prev_lab)
            sid = f"{pid}/s{st.order:02d}"
            views = [(st.frontal_view, "frontal")] + ([("LATERAL", "lateral")] if has_lat else [])
            for view, lat in views:
                rows.append({"image_id": f"{sid}/{lat}", "path": "", "patient_id": pid, "study_id": sid,
                             "study_order": st.order, "view": view, **labels, "report": report,
                             "source": SOURCE, "extra_seed": int(seed), "extra_sex": an.sex, "extra_age": an.age})
            prev, prev_lab = st, labels
    cols = list(schema.COLUMNS) + ["extra_seed", "extra_sex", "extra_age"]
    t = pd.DataFrame(rows, columns=[c for c in cols if c not in ("laterality", "split")])
    t["laterality"] = schema.laterality_of(t["view"])
    t["split"] = schema.hash_split(t["patient_id"], split_fractions)
    t = schema.validate_table(t, where=f"phantom(n_patients={n_patients}, seed={seed})")
    t["extra_seed"] = t["extra_seed"].astype(np.int64)
    t["extra_age"] = t["extra_age"].astype(np.int64)
    return t


# ---------------------------------------------------------------------------------------------------
# Rendering helpers. Shapes are analytic in normalised anatomy coordinates ([-1, 1], y down, the
# patient's right on the image left), so an image at any size shows the same anatomy. Costly
# functions are avoided on the full grid (no atan2 / pow / where); local shapes are evaluated in a
# window of the image only.


def _ramp(d, w):
    """Soft step: 0 for d << 0, 1 for d >> 0, linear over width w."""
    return np.clip(d * (1.0 / w) + 0.5, 0.0, 1.0)


def _bump(d, w):
    """Triangular profile: 1 at d=0 falling to 0 at |d|=w."""
    return np.clip(1.0 - np.abs(d) * (1.0 / w), 0.0, 1.0)


def _gauss2(dx, dy, sx, sy):
    return np.exp(-(dx * dx * (1.0 / (sx * sx)) + dy * dy * (1.0 / (sy * sy))))


_VES_A, _VES_R, _VES_RMAX = 384, 48, 1.4


def _vessel_table(noise: np.ndarray) -> np.ndarray:
    """(2, A, R) lung-marking intensity over (pseudo-angle, radius) around each hilum, from coarse noise."""
    f = ndimage.zoom(noise, (1, _VES_A / noise.shape[1], _VES_R / noise.shape[2]), order=1, mode="nearest")
    rr = np.linspace(0, _VES_RMAX, _VES_R, dtype=np.float32)[None, None, :]
    w = 0.4 * (1.15 - np.minimum(rr, 1.0))
    ridge = np.clip(1.0 - np.abs(f) / w, 0, 1) ** 2
    fade = np.clip((rr - 0.04) / 0.15, 0, 1) * np.exp(-2.0 * rr)   # no starburst at the hilum itself
    return (ridge * fade).astype(np.float32).ravel()


@functools.lru_cache(maxsize=1024)
def _vessels_of(seed: int, patient_id: str) -> np.ndarray:
    return _vessel_table(patient_anatomy(seed, patient_id).vessels)


def _vessel_lookup(table, ax, ya, hu, hy, side_index):
    """Markings radiating from hila at (+-hu, hy); `side_index` 0/1 picks each lung's own pattern."""
    dx = ax - hu
    dy = ya - hy
    adx = np.abs(dx)
    l1 = adx + np.abs(dy) + 1e-3
    a = (dy / l1 + 1.0) * (0.5 * (_VES_A - 1))            # pseudo-angle in [-1, 1] -> bins
    b = np.minimum(np.sqrt(dx * dx + dy * dy) * ((_VES_R - 1) / _VES_RMAX), _VES_R - 1)
    idx = (a.astype(np.int32) * _VES_R + b.astype(np.int32)) + side_index
    return table.take(idx)


_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Stop glibc from returning freed heap to the OS after every image (set CXRJAX_PHANTOM_MALLOPT=0 to skip).

    Process-wide, so it is only called where a process exists to render (prepare's shard workers,
    the benchmark), never as a side effect of rendering in a user's process.

    Rendering makes a few hundred short-lived arrays per image. With glibc's defaults the large ones
    are mmap-ed and the heap top is trimmed back on free, so every temporary page-faults again: that
    alone halves the throughput. Raising the trim/mmap thresholds (64 MiB / 4 MiB) keeps the pages.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("CXRJAX_PHANTOM_MALLOPT", "1") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 64 << 20)   # M_TRIM_THRESHOLD
        libc.mallopt(-3, 4 << 20)    # M_MMAP_THRESHOLD
    except (OSError, AttributeError):   # not glibc: nothing to tune
        pass


_NOISE_BANK = None


def _noise(r: np.random.Generator, size: int) -> np.ndarray:
    """Cheap deterministic unit Gaussian noise: a random window of a fixed bank, randomly flipped."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        _NOISE_BANK = np.random.default_rng(20210223).standard_normal(2**21, dtype=np.float32)
    n = size * size
    if n > _NOISE_BANK.size // 2:
        return r.standard_normal((size, size), dtype=np.float32)
    k = r.integers(0, _NOISE_BANK.size - n, size=2)
    a = _NOISE_BANK[k[0]:k[0] + n].reshape(size, size)
    b = _NOISE_BANK[k[1]:k[1] + n].reshape(size, size)[::-1, ::-1]
    return (a + b) * np.float32(math.sqrt(0.5))


@functools.lru_cache(maxsize=16)
def _pixel_grid(size: int):
    c = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0)
    return np.ascontiguousarray(np.broadcast_to(c[None, :], (size, size))), np.ascontiguousarray(np.broadcast_to(c[:, None], (size, size)))


@dataclass
class _Geom:
    """Image <-> anatomy coordinates of one image: anatomy = R(-rot) (image - shift) / scale."""
    rot: float
    tx: float
    ty: float
    scale: float

    def to_anatomy(self, xi, yi):
        c, s = math.cos(self.rot) / self.scale, math.sin(self.rot) / self.scale
        xs, ys = xi - self.tx, yi - self.ty
        return (c * xs + s * ys).astype(np.float32), (c * ys - s * xs).astype(np.float32)

    def to_image(self, xa, ya):
        c, s = math.cos(self.rot), math.sin(self.rot)
        return self.scale * (c * xa - s * ya) + self.tx, self.scale * (s * xa + c * ya) + self.ty


class _Ctx:
    """Rows [t0, t1) of one image's pixel grid in anatomy coordinates, with windowing for local shapes.

    Images are rendered in tiles of a few rows: the temporaries stay small (cache-resident, and
    below the allocator's mmap threshold, which would otherwise page-fault on every array).
    """

    def __init__(self, size: int, geom: _Geom, t0: int = 0, t1: int | None = None):
        self.size, self.geom = size, geom
        self.t0, self.t1 = t0, size if t1 is None else t1
        xi, yi = _pixel_grid(size)
        self.xi, self.yi = xi[self.t0:self.t1], yi[self.t0:self.t1]
        self.x, self.y = geom.to_anatomy(self.xi, self.yi)
        self.px = 2.0 / size
        self.e1 = max(1.5 * self.px, 0.006)

    def win(self, cx, cy, rx, ry):
        """Pixel slices covering the anatomy rectangle [cx +- rx] x [cy +- ry] (None if off-image)."""
        xs = np.array([cx - rx, cx + rx, cx - rx, cx + rx])
        ys = np.array([cy - ry, cy - ry, cy + ry, cy + ry])
        xi, yi = self.geom.to_image(xs, ys)
        n = self.size
        c0, c1 = int(max(0, math.floor((xi.min() + 1) * 0.5 * n) - 1)), int(min(n, math.ceil((xi.max() + 1) * 0.5 * n) + 1))
        r0 = max(self.t0, math.floor((yi.min() + 1) * 0.5 * n) - 1) - self.t0
        r1 = min(self.t1, math.ceil((yi.max() + 1) * 0.5 * n) + 1) - self.t0
        if c1 <= c0 or r1 <= r0:
            return None
        return (slice(int(r0), int(r1)), slice(c0, c1))


def _smooth_curve(pts, n_iter=3):
    p = np.asarray(pts, np.float64)
    for _ in range(n_iter):   # Chaikin corner cutting
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r_ = 0.25 * p[:-1] + 0.75 * p[1:]
        p = np.concatenate([p[:1], np.stack([q, r_], 1).reshape(-1, 2), p[-1:]])
    return p


class _Splat:
    """Radiopaque lines (wires, tubes) drawn as points along curves into pixel space, then blurred."""

    def __init__(self, ctx: _Ctx):
        self.size, self.geom = ctx.size, ctx.geom
        self.acc = {}

    def line(self, pts, weight: float, width: float = 0.0, offset: float = 0.0):
        p = _smooth_curve(pts)
        if offset:
            d = np.gradient(p, axis=0)
            p = p + offset * np.stack([-d[:, 1], d[:, 0]], 1) / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
        L = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        s = np.arange(0, L[-1], 1.0 / self.size)   # every half pixel
        xi, yi = self.geom.to_image(np.interp(s, L, p[:, 0]), np.interp(s, L, p[:, 1]))
        col = (xi + 1) * 0.5 * self.size - 0.5
        row = (yi + 1) * 0.5 * self.size - 0.5
        sigma_px = round(max(0.7, width * 0.5 * self.size), 1)
        ok = (row >= 0) & (row < self.size - 1) & (col >= 0) & (col < self.size - 1)
        r0, c0 = row[ok].astype(int), col[ok].astype(int)
        fr, fc = row[ok] - r0, col[ok] - c0
        w = weight * 0.5 * math.sqrt(2 * math.pi) * sigma_px   # the blurred line peaks at ~weight
        acc = self.acc.setdefault(sigma_px, np.zeros(self.size * self.size, np.float64))
        n = self.size
        for dr, dc, ww in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
            acc += np.bincount((r0 + dr) * n + c0 + dc, weights=w * ww, minlength=n * n)

    def render(self, out: np.ndarray):
        """Add the blurred lines into `out` (size, size)."""
        for sigma, acc in self.acc.items():
            out += ndimage.gaussian_filter(acc.reshape(self.size, self.size), sigma, truncate=3.0).astype(np.float32)


class _NoSplat:
    def line(self, *a, **k):
        pass


_NO_SPLAT = _NoSplat()


# ---------------------------------------------------------------------------------------------------
# Rendering: what to draw for one row


@dataclass
class _Scene:
    an: Anatomy
    st: StudyState
    view: str
    s: dict          # CheXpert label -> render strength (0 absent; faint for uncertain)
    devices: tuple
    vessels: np.ndarray
    texture_key: str                 # study-level textures: the same on every image of the study
    seed: int
    patches: dict = field(default_factory=dict)


def _render_strength(label, latent: float, default: float) -> float:
    if label == 1.0:
        return latent if latent >= 0.3 else default
    if label == -1.0:
        return latent if 0.1 <= latent < 0.3 else 0.2
    return 0.0


def _scene(row) -> _Scene:
    seed, pid = int(row["extra_seed"]), str(row["patient_id"])
    order = int(row["study_order"])
    an = patient_anatomy(seed, pid)
    st = patient_course(seed, pid, order + 1)[order]
    lab = {c: float(row[c]) for c in CHEXPERT_LABELS}
    s = {c: float(_render_strength(lab[c], st.sev[c], 0.55)) for c in _PATHOLOGIES}
    if lab["Lung Lesion"] == 1.0:
        s["Lung Lesion"] = float(st.lesion_size if st.lesion_size > 0 else an.lesion[4])
    elif lab["Lung Lesion"] == -1.0:
        s["Lung Lesion"] = 0.12
    if any(lab[c] in (1.0, -1.0) for c in _OPACITY_CHILDREN):
        s["Lung Opacity"] = 0.0   # the children are the opacity
    devices = st.devices if lab["Support Devices"] == 1.0 else ()
    if lab["Support Devices"] == 1.0 and not devices:
        devices = ("cline",)
    return _Scene(an=an, st=st, view=str(row["view"]), s=s, devices=devices, vessels=_vessels_of(seed, pid),
                  texture_key=str(row["study_id"]), seed=seed)


def _image_geom(seed: int, image_id: str) -> tuple[_Geom, np.random.Generator]:
    r = _rng(seed, "image", image_id)
    n = r.standard_normal(4)
    geom = _Geom(rot=float(np.clip(n[0], -2.5, 2.5)) * 0.035, tx=float(np.clip(n[1], -2, 2)) * 0.03,
                 ty=float(np.clip(n[2], -2, 2)) * 0.03 + 0.02, scale=float(1.0 + 0.04 * np.clip(n[3], -2, 2)))
    return geom, r


def _patchy(sc: _Scene, X, Y, n: int, key: str):
    """Study-level blotchy texture in [0, 1] (same pattern on every image and tile of the study)."""
    g = sc.patches.get((key, n))
    if g is None:
        r = _rng(sc.seed, "texture", f"{sc.texture_key}:{key}")
        g = sc.patches[(key, n)] = ndimage.zoom(r.random((n, n)).astype(np.float32), 4, order=1, mode="nearest")
    m = g.shape[0]
    i = np.clip((Y + 1.3) * ((m - 1) / 2.6), 0, m - 1).astype(np.int32)
    j = np.clip((X + 1.3) * ((m - 1) / 2.6), 0, m - 1).astype(np.int32)
    return g.ravel().take(i * m + j)


def _blob_opacity(sc, ctx, O, cx, cy, sx, sy, strength, key, n=14, base=0.55, gain=0.6, thr=0.25, mask_side=0):
    """Patchy lobar opacity (consolidation-like) added into O within a window."""
    w = ctx.win(cx, cy, 2.2 * sx, 2.2 * sy)
    if w is None:
        return None
    X, Y = ctx.x[w], ctx.y[w]
    g = _gauss2(X - cx, Y - cy, sx, sy)
    if mask_side:
        g = g * _ramp(mask_side * X, ctx.e1)
    O[w] += strength * np.clip((g * (base + gain * _patchy(sc, X, Y, n, key)) - thr) * 2.5, 0, 1)
    return w


def _frontal(sc: _Scene, ctx: _Ctx, splat: _Splat) -> np.ndarray:
    an, st, s = sc.an, sc.st, sc.s
    xa, ya, e1, px = ctx.x, ctx.y, ctx.e1, ctx.px
    ap = sc.view != "PA"
    ax = np.abs(xa)
    right = (xa < 0).astype(np.float32)   # the patient's right lung (image left)
    W = an.W
    Wb = W + an.margin
    # --- body and soft tissue
    wb_y = Wb * (1.0 + 0.06 * ya)
    q = ax / wb_y
    chord = np.sqrt(np.clip(1.0 - q * q, 0, 1))
    shoulder = an.shoulder_y + 0.1 + 0.22 * q * q
    trunk = _ramp((1.0 - q) * Wb, e1) * _ramp(ya - shoulder, 0.04)
    A = 1.35 * trunk * (0.3 + 0.7 * chord)
    wn = ctx.win(0, -0.9, 0.22, 0.25)
    if wn:
        X, Y = ctx.x[wn], ctx.y[wn]
        qn = np.abs(X) * (1 / 0.17)
        A[wn] += 0.75 * np.sqrt(np.clip(1 - qn * qn, 0, 1)) * _ramp(-0.5 - Y, 0.3) * (1 - trunk[wn])
    for sd in (-1, 1):   # humeral heads
        hx_, hy_ = sd * (Wb - 0.02), an.shoulder_y + 0.3
        wh = ctx.win(hx_, hy_ + 0.1, 0.3, 0.4)
        if wh:
            X, Y = ctx.x[wh], ctx.y[wh]
            dh = np.sqrt((X - hx_ - sd * 0.02) ** 2 + (Y - hy_ + 0.02) ** 2)
            A[wh] += 0.3 * _ramp(0.1 - dh, 0.02) * trunk[wh]
    if an.sex == "F":
        for sd in (-1, 1):
            wb = ctx.win(sd * 0.5 * W / 0.72, 0.45, 0.5, 0.42)
            if wb:
                X, Y = ctx.x[wb], ctx.y[wb]
                A[wb] += 0.2 * _gauss2(X - sd * 0.5 * W / 0.72, Y - 0.38, 0.26, 0.22) * _ramp(0.62 - Y + 0.1 * np.abs(X), 0.05)
    # --- rib cage, diaphragm, mediastinum, heart
    yc = 0.30
    Hc = yc - an.apex
    e = (xa * (1 / W)) ** 2 + ((ya - yc) * (1 / Hc)) ** 2
    dcage = (1.0 - np.sqrt(e)) * W
    cage = _ramp(dcage, e1)
    insp = st.inspiration
    dome_l = an.dome_r + an.dome_l + insp
    dome_r = an.dome_r + insp
    if s["Atelectasis"] > 0:   # volume loss lifts the hemidiaphragm
        if an.atel_side < 0:
            dome_r -= 0.06 * s["Atelectasis"]
        else:
            dome_l -= 0.06 * s["Atelectasis"]
    dome_top = dome_l + (dome_r - dome_l) * right
    ucen = 0.45 * W
    qd = (ax - ucen) * (1 / (0.55 * W))
    ydia = dome_top + an.dome_h * qd * qd
    above = _ramp(ydia - ya, e1)
    ecm = s["Enlarged Cardiomediastinum"]
    wmed = an.wmed + 0.06 * ecm + 0.025 * _ramp(-0.5 - ya, 0.2)
    medial = _ramp(np.abs(xa - 0.015) - wmed, e1)
    ctr = an.ctr
    if s["Cardiomegaly"] > 0:
        ctr = 0.52 + 0.14 * s["Cardiomegaly"] if s["Cardiomegaly"] >= 0.3 else 0.505
    ctr *= 1.07 if ap else 1.0
    tilt, ratio = an.heart_tilt, 0.72
    ha = ctr * W / math.sqrt(math.cos(tilt) ** 2 + (ratio * math.sin(tilt)) ** 2)
    hb = ratio * ha
    hx = an.heart_x + 0.02 * s["Cardiomegaly"]
    hy = dome_l - 0.55 * hb
    heart = np.zeros_like(xa)
    wh = ctx.win(hx, hy, ha * 1.05 + 0.02, ha * 1.05 + 0.02)
    if wh:
        cx, cy = ctx.x[wh] - hx, ctx.y[wh] - hy
        ct, stn = math.cos(tilt), math.sin(tilt)
        xr, yr = (ct * cx + stn * cy) * (1 / ha), (ct * cy - stn * cx) * (1 / hb)
        heart[wh] = _ramp((1.0 - np.sqrt(xr * xr + yr * yr)) * hb, e1 * 1.5)
    lung = cage * above * medial * (1.0 - 0.75 * heart)
    kx, ky = an.wmed + 0.01 + 0.03 * ecm, -0.33
    wk = ctx.win(kx, ky, 0.08, 0.08)
    if wk:
        knob = _ramp(0.06 + 0.01 * ecm - np.sqrt((ctx.x[wk] - kx) ** 2 + (ctx.y[wk] - ky) ** 2), e1)
        lung[wk] *= 1.0 - knob
        A[wk] += 0.1 * knob
    qq = (ax - ucen) * (1 / (0.6 * W))
    air = lung * (0.8 + 0.2 * np.sqrt(np.clip(1.0 - qq * qq, 0.05, 1)))
    A += 0.18 * heart
    gx, gy, gr = an.gastric   # gastric bubble under the left dome
    if gr > 0:
        wg = ctx.win(gx, dome_l + gy, gr * 1.4 + 0.02, gr + 0.02)
        if wg:
            A[wg] -= 0.45 * _ramp(gr - np.sqrt(((ctx.x[wg] - gx) * 0.7) ** 2 + (ctx.y[wg] - (dome_l + gy)) ** 2), 0.02)
    # trachea and main bronchi (air)
    carina_y = -0.24
    wt = ctx.win(0, -0.65, 0.25, 0.5)
    if wt:
        X, Y = ctx.x[wt], ctx.y[wt]
        tr = _ramp(0.032 - np.abs(X - 0.01 * (Y + 0.3)), e1) * _ramp(carina_y - Y, 0.03)
        for sd in (-1, 1):
            d = np.abs((Y - carina_y) - 0.9 * sd * X) * (1 / 1.35)
            tr = np.maximum(tr, _ramp(0.022 - d, e1) * _ramp(sd * X, e1) * _ramp(0.2 - sd * X, 0.04))
        A[wt] -= 0.35 * tr
    # --- findings -> O (opacity replacing lung air), F (pleural fluid)
    O = np.zeros_like(xa)
    F = np.zeros_like(xa)
    if s["Pleural Effusion"] > 0:
        sv = s["Pleural Effusion"]
        for sd in {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}[an.effusion_side]:
            dt = dome_r if sd < 0 else dome_l
            y_cp = dt + an.dome_h + 0.02
            if sc.view == "AP_SUPINE":   # layering: a veil over the hemithorax, denser below
                top = -0.9
            else:
                top = y_cp - (0.2 + 0.8 * sv)
            wf = ctx.win(sd * 0.5, (top + y_cp + 0.1) / 2, 0.55, (y_cp + 0.1 - top) / 2 + 0.05)
            if wf is None:
                continue
            X, Y = ctx.x[wf], ctx.y[wf]
            on = _ramp(sd * X, e1) * _ramp(dcage[wf] + 0.01, e1)
            if sc.view == "AP_SUPINE":
                F[wf] += on * _ramp(ydia[wf] + 0.05 - Y, e1) * 0.55 * sv * (0.35 + 0.65 * _ramp(Y + 0.4, 1.0))
            else:
                qx = np.abs(X) * (1 / W)
                level = y_cp - (0.02 + 0.75 * sv)    # small / uncertain: costophrenic blunting only
                ymen = level - (0.1 + 0.2 * sv) * qx * qx * qx
                grade = (0.6 + 0.4 * _ramp(Y - ymen, 0.3)) * min(1.0, 0.55 + 1.5 * sv)
                F[wf] += on * _ramp(Y - ymen, 0.05) * _ramp(y_cp + 0.1 - Y, 0.05) * grade
    if s["Edema"] > 0:
        sv = s["Edema"]
        bat = _gauss2(ax - 0.24, ya + 0.02, 0.22, 0.3)
        kerley = _bump(np.mod(ya * 28.0, 1.0) - 0.5, 0.12) * _ramp(ax - (W - 0.14), 0.02) * _ramp(ya - 0.05, 0.05)
        O += sv * (0.65 * bat * (0.7 + 0.3 * _patchy(sc, xa, ya, 8, 'edema')) + 0.12 + 0.25 * kerley)
    lobe_sev = max(s["Consolidation"], 0.8 * s["Pneumonia"])
    if lobe_sev > 0:
        sd, lu, ly = _LOBE_FRONTAL[an.lobe]
        w = _blob_opacity(sc, ctx, O, sd * lu, ly, 0.2, 0.17, lobe_sev, 'lobe', mask_side=sd)
        if w:   # air bronchograms: dark branching lines inside the opacity
            bron = _vessel_lookup(sc.vessels, ax[w], ctx.y[w], 0.12, -0.1, ((1.0 - right[w]) * (_VES_A * _VES_R)).astype(np.int32))
            O[w] *= 1.0 - np.clip(3.0 * bron, 0, 0.6)
    if s["Lung Opacity"] > 0:
        sd, lu, ly = _LOBE_FRONTAL[an.opacity_lobe]
        _blob_opacity(sc, ctx, O, sd * lu, ly, 0.16, 0.14, s["Lung Opacity"], 'opacity', n=12, base=0.4, gain=0.8, thr=0.2, mask_side=sd)
    if s["Atelectasis"] > 0:
        sd = an.atel_side
        u0, y0, ang = an.atel
        wa = ctx.win(sd * u0, y0, 0.26, 0.14)
        if wa:
            du, dy = sd * ctx.x[wa] - u0, ctx.y[wa] - y0
            along = du * math.cos(ang) + dy * math.sin(ang)
            perp = dy * math.cos(ang) - du * math.sin(ang)
            O[wa] += s["Atelectasis"] * 1.2 * _bump(perp, 0.018 + 0.02 * s["Atelectasis"]) * _ramp(0.17 - np.abs(along), 0.06)
    if s["Lung Lesion"] > 0:
        sd, lu, ly, _, _ = an.lesion
        rad = 0.02 + 0.1 * min(s["Lung Lesion"], 1.0)
        wl = ctx.win(sd * lu, ly, rad * 1.3 + 0.02, rad * 1.3 + 0.02)
        if wl:
            dx_, dy_ = ctx.x[wl] - sd * lu, ctx.y[wl] - ly
            dist = np.sqrt(dx_ * dx_ + dy_ * dy_)
            if rad > 0.06:   # lobulated mass
                dist = dist * (1.0 + 0.1 * np.cos(3 * np.arctan2(dy_, dx_ + 1e-6)))
            A[wl] += 0.35 * _ramp(rad - dist, 0.012) * (1.0 if s["Lung Lesion"] > 0.15 else 0.5)
    if s["Pleural Other"] > 0:
        sd = an.po_side
        wp = ctx.win(sd * 0.45, -0.55, 0.45, 0.35)
        if wp:
            O[wp] += s["Pleural Other"] * 1.5 * _ramp(0.035 - dcage[wp], 0.02) * _ramp(-0.35 - ctx.y[wp], 0.15) * _ramp(sd * ctx.x[wp], e1)
    np.clip(O, 0, 1, out=O)
    # --- lung markings (vessels) and hila
    hyl = -0.06 - 0.5 * insp
    ves = _vessel_lookup(sc.vessels, ax, ya, 0.2, hyl, ((1.0 - right) * (_VES_A * _VES_R)).astype(np.int32))
    hil = _gauss2(ax - 0.2, ya - hyl, 0.06, 0.09)
    mark = (0.22 + 0.12 * s["Edema"]) * ves + 0.3 * hil
    if s["Pneumothorax"] > 0:   # a pleural air rim without markings, bounded by the visceral pleural line
        sd = an.ptx_side
        dp = (0.03 + 0.2 * s["Pneumothorax"]) * (0.35 + 0.65 * _ramp(0.1 - ya, 0.6))
        on = lung * _ramp(sd * xa, e1)
        ptx = on * _ramp(dp - dcage, e1)
        mark = mark * (1.0 - ptx)
        A += 0.22 * on * _bump(dcage - dp, max(px, 0.004)) * _ramp(0.25 - ya, 0.2) - 0.08 * ptx
    A += 0.4 * O * lung - 1.05 * air * (1.0 - O) * (1.0 - F) + 0.15 * F * cage + mark * lung * (1.0 - O)
    # --- bones: posterior and anterior ribs, clavicles, scapulae, spine
    u = ax * (1 / W)
    g = ya - an.rib_arch * (u - 0.3) ** 2 + 1.05
    phi = (g - 0.08 * g * g) * (1 / an.rib_sp) + an.rib_phase
    fsd = an.fracture_side
    wfr = None
    if s["Fracture"] > 0:
        # the centre of rib k is where phi = k + rib_w / 2; shift one side of a short segment (a step)
        k = an.fracture_rib + 0.5 * an.rib_w - an.rib_phase
        gk = (1 - math.sqrt(max(1 - 0.32 * k * an.rib_sp, 0))) / 0.16
        yk = gk - 1.05 + an.rib_arch * (an.fracture_u - 0.3) ** 2
        wfr = ctx.win(fsd * an.fracture_u * W, yk, 0.1, 0.08)
        if wfr:
            uu = u[wfr]
            win = _gauss2(uu - an.fracture_u, ctx.y[wfr] - yk, 0.06, 0.05) * _ramp(fsd * ctx.x[wfr], e1)
            phi[wfr] += 0.22 * s["Fracture"] * win * np.sign(uu - an.fracture_u)
    fr = phi - np.floor(phi)
    tt = fr * (1 / an.rib_w)
    inb = tt < 1.0
    band = np.clip(np.minimum(tt, 1.0 - tt) * 7.0, 0, 1)
    rib = (0.7 * band + 0.3 * (_bump(tt - 0.1, 0.1) + _bump(tt - 0.9, 0.1))) * inb
    if s["Fracture"] > 0 and wfr:
        gap = _bump(u[wfr] - an.fracture_u, 0.012 / W) * _ramp(fsd * ctx.x[wfr], e1) * _ramp(0.05 - np.abs(ctx.y[wfr] - yk), 0.02)
        rib[wfr] *= 1.0 - 0.9 * gap * min(1.0, 2 * s["Fracture"])
    ribzone = _ramp(dcage + 0.05, 0.02) * _ramp(0.62 - ya, 0.1) * _ramp(ax - 0.05, 0.04)
    ga = ya + 0.3 * u - 0.15 * u * u + 1.2
    phia = (ga - 0.05 * ga * ga) * (1 / (an.rib_sp * 1.15)) + 0.3 + an.rib_phase
    arib = _bump(phia - np.floor(phia) - 0.2, 0.15) * _ramp(u - 0.3, 0.15) * _ramp(0.45 - ya, 0.1)
    A += (0.3 * rib + 0.1 * arib) * ribzone
    cl_y = an.clav_y - (0.06 if ap else 0.0)
    wc = ctx.win(0, cl_y - 0.1, 0.8, 0.16)
    if wc:
        X, Y = np.abs(ctx.x[wc]), ctx.y[wc]
        ycl = cl_y - 0.38 * X + 0.22 * X * X
        tcl = 0.026 + 0.016 * np.clip(1.0 - X * (1 / 0.7), 0, 1)
        A[wc] += 0.4 * _ramp(tcl - np.abs(Y - ycl), e1) * _ramp(X - 0.05, 0.02) * _ramp(0.74 - X, 0.03)
    if ap:   # scapulae project over the upper lungs on AP views
        us = W - 0.16 + 0.14 * (ya + 0.85)
        A += 0.16 * _ramp(ax - us, 0.02) * _ramp(-0.05 - ya, 0.1) * _ramp(ya + 0.9, 0.05) * _ramp(Wb - ax, e1)
    ws = ctx.win(0, 0, 0.1, 1.2)
    if ws:
        X, Y = ctx.x[ws], ctx.y[ws]
        vph = (Y + 1.0) * (1 / 0.1) + an.rib_phase
        vf = vph - np.floor(vph)
        body = _ramp(0.065 - np.abs(X), e1) * (1.0 - 0.5 * _bump(vf - 0.5, 0.12))
        ped = _gauss2(np.abs(X) - 0.05, vf - 0.3, 0.014, 0.14)
        A[ws] += (0.3 * body + 0.15 * ped) * trunk[ws]
    _frontal_devices(sc, ctx, splat, A, W, Wb)
    return A


def _box(ctx, A, gx, gy, rx, ry, dens):
    """A bright rounded rectangle (pacemaker generator)."""
    w = ctx.win(gx, gy, rx + 0.02, ry + 0.02)
    if w:
        qx, qy = (ctx.x[w] - gx) * (1 / rx), (ctx.y[w] - gy) * (1 / ry)
        qx, qy = qx * qx, qy * qy
        A[w] += dens * _ramp(1.0 - (qx * qx + qy * qy), 0.2)


def _frontal_devices(sc: _Scene, ctx: _Ctx, splat: _Splat, A, W, Wb):
    an = sc.an
    for d in sc.devices:
        if d == "ett":
            pts = [(0.02, -1.1), (0.015, -0.7), (0.0, -0.38)]
            splat.line(pts, 0.25, 0.035)
            splat.line(pts, 0.5, offset=0.012)
        elif d == "ng":
            splat.line([(0.04, -1.1), (0.03, -0.4), (0.06, 0.1), (0.2, 0.55), (0.38, 0.62)], 0.55)
        elif d == "cline":
            if an.cline_side < 0:
                pts = [(-0.3, -1.1), (-0.18, -0.8), (-0.09, -0.55), (-0.07, -0.12)]
            else:
                pts = [(0.62, -0.72), (0.3, -0.64), (0.05, -0.5), (-0.06, -0.15)]
            splat.line(pts, 0.6)
        elif d == "pacemaker":
            sd = an.pm_side
            gx, gy = sd * (W * 0.7), -0.62
            _box(ctx, A, gx, gy, 0.08, 0.055, 1.3)
            splat.line([(gx - sd * 0.05, gy), (sd * 0.25, -0.58), (-0.05, -0.35), (-0.12, 0.0), (-0.1, 0.12)], 0.6)
            splat.line([(gx - sd * 0.05, gy + 0.02), (sd * 0.25, -0.55), (-0.02, -0.3), (0.0, 0.05), (0.12, 0.28)], 0.6)
        elif d == "chest_tube":
            sd = an.ptx_side
            pts = [(sd * (Wb + 0.05), 0.4), (sd * (W - 0.08), 0.25), (sd * (W - 0.18), -0.15), (sd * 0.35, -0.58)]
            splat.line(pts, 0.2, 0.03)
            splat.line(pts, 0.45, offset=0.012)
            splat.line(pts, 0.45, offset=-0.012)


def _lateral(sc: _Scene, ctx: _Ctx, splat: _Splat) -> np.ndarray:
    """Lateral view: anterior to the image left, spine to the right."""
    an, st, s = sc.an, sc.st, sc.s
    xa, ya, e1 = ctx.x, ctx.y, ctx.e1
    D = an.depth
    insp = st.inspiration
    # body: a rounded box (chest + abdomen); raised arms cover the top
    ex = (xa - 0.03) * (1 / (D + an.margin))
    ey = (ya - 0.25) * (1 / 1.3)
    ex2, ey2 = ex * ex, ey * ey
    be = 0.5 * (ex2 + ex2 * ex2) + 0.35 * ey2 + 0.65 * ey2 * ey2
    body = _ramp((1.0 - be) * 0.5 * D, e1)
    A = 1.55 * body * (0.45 + 0.55 * np.sqrt(np.clip(1.0 - be, 0, 1)))
    wa = ctx.win(0.0, -0.95, 0.8, 0.4)
    if wa:
        A[wa] += 0.75 * _gauss2(ctx.x[wa] + 0.05, ctx.y[wa] + 0.95, 0.6, 0.22)
    # lungs (both superimposed)
    yc = 0.30
    Hc = yc - an.apex
    Dl = D - 0.07
    e = ((xa - 0.03) * (1 / Dl)) ** 2 + ((ya - yc) * (1 / Hc)) ** 2
    dcage = (1.0 - np.sqrt(e)) * Dl
    cage = _ramp(dcage, e1)
    x_st = -D + 0.09 + 0.07 * (ya + 0.7)
    ante = _ramp(xa - (x_st + 0.03), e1)
    top_r = an.dome_r - 0.04 + insp
    top_l = top_r + an.dome_l
    if s["Atelectasis"] > 0:
        top_r -= 0.03 * s["Atelectasis"]
    xc = -0.12
    qd = (xa - xc) * (1 / D)
    qd = qd * qd
    above = 0.5 * (_ramp(top_r + 0.26 * qd - ya, e1) + _ramp(top_l + 0.26 * qd - ya, e1))
    # heart: anterior, inferior, resting on the diaphragm
    ctr = an.ctr
    if s["Cardiomegaly"] > 0:
        ctr = 0.52 + 0.14 * s["Cardiomegaly"] if s["Cardiomegaly"] >= 0.3 else 0.505
    ha, hb = 0.7 * ctr * D / 0.66, 0.24
    hx, hy = -0.45 * D + 0.5 * (ha - 0.31), top_l - 0.1
    tilt = -0.55
    heart = np.zeros_like(xa)
    wh = ctx.win(hx, hy, ha + 0.05, ha + 0.05)
    if wh:
        cx, cy = ctx.x[wh] - hx, ctx.y[wh] - hy
        xr = (math.cos(tilt) * cx + math.sin(tilt) * cy) * (1 / ha)
        yr = (math.cos(tilt) * cy - math.sin(tilt) * cx) * (1 / hb)
        heart[wh] = _ramp((1.0 - np.sqrt(xr * xr + yr * yr)) * hb, e1 * 1.5)
    # aorta: ascending, arch, descending (a soft-tissue tube)
    aorta = np.zeros_like(xa)
    wao = ctx.win(0.06, 0.0, 0.3, 0.5)
    if wao:
        X, Y = ctx.x[wao], ctx.y[wao]
        ar = np.sqrt((X - 0.06) ** 2 + (Y + 0.3) ** 2)
        arch = _ramp(0.035 - np.abs(ar - 0.18), e1) * _ramp(-0.3 - Y, e1)
        desc = _ramp(0.04 - np.abs(X - 0.24 - 0.02 * Y), e1) * _ramp(Y + 0.3, e1) * _ramp(0.35 - Y, 0.1)
        asc = _ramp(0.045 - np.abs(X + 0.12), e1) * _ramp(Y + 0.3, e1) * _ramp(-0.05 - Y, 0.05)
        aorta[wao] = np.clip(arch + desc + asc, 0, 1)
    lung = cage * ante * above * (1.0 - 0.55 * heart) * (1.0 - 0.15 * aorta)
    air = lung * (0.75 + 0.25 * np.sqrt(np.clip(1.0 - e, 0, 1)))
    A += 0.08 * heart
    wt = ctx.win(0.06, -0.65, 0.15, 0.45)
    if wt:   # trachea
        tdx = ctx.x[wt] - 0.12 * (ctx.y[wt] + 1.0)
        A[wt] -= 0.3 * _ramp(0.035 - np.abs(tdx), e1) * _ramp(-0.2 - ctx.y[wt], 0.03)
    gx, gy, gr = an.gastric
    if gr > 0:
        wg = ctx.win(-0.3, top_l + 0.2 + gy, gr * 1.4 + 0.02, gr + 0.02)
        if wg:
            A[wg] -= 0.4 * _ramp(gr - np.sqrt(((ctx.x[wg] + 0.3) * 0.7) ** 2 + (ctx.y[wg] - (top_l + 0.2 + gy)) ** 2), 0.02)
    # findings
    O = np.zeros_like(xa)
    F = np.zeros_like(xa)
    if s["Pleural Effusion"] > 0:   # fluid fills the posterior costophrenic sulcus, meniscus rising posteriorly
        sv = s["Pleural Effusion"]
        amount = 1.0 if an.effusion_side == "bilateral" else 0.75
        x_post = 0.03 + Dl
        post = np.clip((xa + 0.1) * (1 / (x_post + 0.1)), 0, 1)
        y_sulc = top_l + 0.26 * ((x_post - xc) / D) ** 2
        level = y_sulc - (0.1 + 0.7 * sv)
        ymen = level + (0.35 + 0.3 * sv) * (1 - post) ** 2 - 0.05 * post
        F += amount * _ramp(dcage + 0.01, e1) * _ramp(ya - ymen, 0.04) * ante * (0.6 + 0.4 * _ramp(ya - ymen, 0.3))
    if s["Edema"] > 0:
        O += s["Edema"] * (0.55 * _gauss2(xa - 0.05, ya + 0.02, 0.3, 0.3) * (0.7 + 0.3 * _patchy(sc, xa, ya, 8, 'edema')) + 0.12)
    lobe_sev = max(s["Consolidation"], 0.8 * s["Pneumonia"])
    if lobe_sev > 0:
        lx, ly = _LOBE_LATERAL[an.lobe]
        _blob_opacity(sc, ctx, O, lx, ly, 0.2, 0.18, lobe_sev, 'lobe')
    if s["Lung Opacity"] > 0:
        lx, ly = _LOBE_LATERAL[an.opacity_lobe]
        _blob_opacity(sc, ctx, O, lx, ly, 0.16, 0.14, s["Lung Opacity"], 'opacity', n=12, base=0.4, gain=0.8, thr=0.2)
    if s["Atelectasis"] > 0:
        _, y0, ang = an.atel
        wl = ctx.win(0.15, y0, 0.3, 0.15)
        if wl:
            du, dy = ctx.x[wl] - 0.15, ctx.y[wl] - y0
            c, sn = math.cos(ang * 0.5), math.sin(ang * 0.5)
            O[wl] += s["Atelectasis"] * _bump(dy * c - du * sn, 0.018 + 0.02 * s["Atelectasis"]) * _ramp(0.2 - np.abs(du * c + dy * sn), 0.06)
    if s["Lung Lesion"] > 0:
        _, _, ly, lz, _ = an.lesion
        rad = 0.02 + 0.1 * min(s["Lung Lesion"], 1.0)
        wl = ctx.win(lz, ly, rad + 0.03, rad + 0.03)
        if wl:
            A[wl] += 0.3 * _ramp(rad - np.sqrt((ctx.x[wl] - lz) ** 2 + (ctx.y[wl] - ly) ** 2), 0.012) * (1.0 if s["Lung Lesion"] > 0.15 else 0.5)
    np.clip(O, 0, 1, out=O)
    np.clip(F, 0, 1, out=F)
    hyl = -0.06 - 0.5 * insp
    mark = 0.12 * _vessel_lookup(sc.vessels, np.abs(xa - 0.08) + 0.2, ya, 0.2, hyl, (xa > 0.08).astype(np.int32) * (_VES_A * _VES_R)) \
        + 0.35 * _gauss2(xa - 0.08, ya - hyl, 0.08, 0.1)
    A += 0.4 * O * lung - 1.1 * air * (1.0 - O) * (1.0 - F) + 0.15 * F * cage + mark * lung * (1.0 - O)
    # bones: sternum, vertebral bodies + posterior elements, faint posterior ribs
    ws = ctx.win(-D + 0.1, -0.2, 0.15, 0.6)
    if ws:
        X, Y = ctx.x[ws], ctx.y[ws]
        A[ws] += 0.35 * _ramp(0.022 - np.abs(X - (-D + 0.09 + 0.07 * (Y + 0.7))), e1) * _ramp(Y + 0.72, 0.02) * _ramp(0.28 - Y, 0.03)
    wv = ctx.win(0.62 * D + 0.12, 0, 0.3, 1.3)
    if wv:
        X, Y = ctx.x[wv], ctx.y[wv]
        x_sp = 0.62 * D + 0.06 * (Y + 0.1) ** 2 - 0.03 * Y
        vph = (Y + 1.0) * (1 / 0.105) + an.rib_phase
        vf = vph - np.floor(vph)
        inbody = _ramp(0.085 - np.abs(X - x_sp), e1)
        vb = inbody * (1.0 - 0.6 * _bump(vf - 0.5, 0.1) + 0.2 * _bump(vf - 0.42, 0.06))
        post = _ramp(0.045 - np.abs(X - x_sp - 0.17), 0.02) * (0.6 + 0.4 * _bump(vf - 0.3, 0.3))
        A[wv] += (0.32 * vb + 0.18 * post) * _ramp(0.7 - Y, 0.1)
    rph = (ya + 0.4 * (xa - 0.2)) * (1 / (an.rib_sp * 0.9)) + an.rib_phase
    A += 0.08 * _bump(rph - np.floor(rph) - 0.25, 0.18) * cage * _ramp(xa - 0.05, 0.2)
    _lateral_devices(sc, ctx, splat, A, D)
    return A


def _lateral_devices(sc: _Scene, ctx: _Ctx, splat: _Splat, A, D):
    for d in sc.devices:
        if d == "ett":
            pts = [(0.0, -1.1), (0.05, -0.7), (0.08, -0.35)]
            splat.line(pts, 0.25, 0.035)
            splat.line(pts, 0.5, offset=0.012)
        elif d == "ng":
            splat.line([(0.12, -1.1), (0.2, -0.5), (0.18, 0.2), (-0.1, 0.55), (-0.3, 0.6)], 0.55)
        elif d == "cline":
            splat.line([(0.0, -1.1), (-0.05, -0.6), (-0.12, -0.3), (-0.14, -0.1)], 0.6)
        elif d == "pacemaker":
            gx, gy = -D + 0.02, -0.6
            _box(ctx, A, gx, gy, 0.035, 0.07, 1.3)
            splat.line([(gx + 0.03, gy), (-0.2, -0.5), (-0.15, -0.2), (-0.2, 0.05), (-0.35, 0.3)], 0.6)
            splat.line([(gx + 0.03, gy + 0.02), (-0.2, -0.45), (-0.13, -0.2), (-0.1, 0.0)], 0.6)
        elif d == "chest_tube":
            pts = [(D * 0.8, 0.45), (D * 0.55, 0.2), (D * 0.35, -0.2), (0.1, -0.6)]
            splat.line(pts, 0.2, 0.03)
            splat.line(pts, 0.45, offset=0.012)
            splat.line(pts, 0.45, offset=-0.012)


def _marker(B, size, u):
    """A small bright square with a dark 'L' glyph (or its mirror, 'R'-side) near a top corner."""
    m = max(4, int(0.06 * size))
    top = int((0.05 + 0.08 * u[0]) * size)
    left = int(0.06 * size) if u[1] < 0.5 else size - int(0.06 * size) - m
    t = max(1, m // 5)
    B[top:top + m, left:left + m] = 1.0
    g0, g1 = top + t, top + m - t
    c = left + t if u[2] < 0.5 else left + m - 2 * t
    B[g0:g1, c:c + t] = 0.15
    B[g1 - t:g1, left + t:left + m - t] = 0.15


def render_image(row, size: int = 256) -> np.ndarray:
    """The (size, size) uint8 radiograph of one table row (bright = dense); deterministic."""
    sc = _scene(row)
    geom, r_img = _image_geom(int(row["extra_seed"]), str(row["image_id"]))
    acq = r_img.random(20).tolist()   # python floats: keep the arrays float32
    draw = _lateral if sc.view == "LATERAL" else _frontal
    A = np.empty((size, size), np.float32)
    splat = _Splat(_Ctx(size, geom, 0, 1))
    rows = max(1, 65536 // size)
    for t0 in range(0, size, rows):   # tiles of rows; lines are drawn once, by the first tile
        ctx = _Ctx(size, geom, t0, min(size, t0 + rows))
        A[ctx.t0:ctx.t1] = draw(sc, ctx, splat if t0 == 0 else _NO_SPLAT)
    splat.render(A)
    xi, yi = _pixel_grid(size)
    # acquisition: exposure, uneven field, window to the full range, gamma, quantum noise
    B = 1.0 - np.exp(-(0.85 + 0.35 * acq[0]) * np.maximum(A, 0.0))
    B += (0.04 * (acq[1] - 0.5)) * xi + (0.04 * (acq[2] - 0.5)) * yi
    step = max(1, size // 64)
    lo, hi = (float(v) for v in np.percentile(B[::step, ::step], (0.5, 99.7)))
    B = np.clip((B - lo) * (1.0 / max(hi - lo, 1e-3)), 0, 1)
    c = 0.6 * (acq[3] - 0.5)   # gamma-like tone curve, monotonic
    B = B + c * B * (1.0 - B)
    B = B * (0.94 + 0.06 * acq[4]) + (0.012 + 0.025 * acq[5]) * _noise(r_img, size)
    # collimation: unexposed (white) borders, each side with probability 0.3
    widths = [int((0.02 + 0.07 * a) * size) for a in acq[10:14]]
    level = 0.9 + 0.1 * acq[14]
    if acq[6] < 0.3:
        B[: widths[0]] = level
    if acq[7] < 0.3:
        B[size - widths[1]:] = level
    if acq[8] < 0.3:
        B[:, : widths[2]] = level
    if acq[9] < 0.3:
        B[:, size - widths[3]:] = level
    _marker(B, size, acq[15:18])
    return (np.clip(B, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def render_images(table: pd.DataFrame, size: int = 256) -> np.ndarray:
    """(n, size, size) uint8 images of every row of a phantom table."""
    out = np.empty((len(table), size, size), np.uint8)
    for i, (_, row) in enumerate(table.iterrows()):
        out[i] = render_image(row, size)
    return out


# ---------------------------------------------------------------------------------------------------
# Sample grid and CLI

_SHORT = {"No Finding": "normal", "Enlarged Cardiomediastinum": "ECM", "Cardiomegaly": "cardiomeg", "Lung Opacity": "opac",
          "Lung Lesion": "lesion", "Edema": "edema", "Consolidation": "consol", "Pneumonia": "pneumonia",
          "Atelectasis": "atelect", "Pneumothorax": "PTX", "Pleural Effusion": "effusion", "Pleural Other": "pl.other",
          "Fracture": "fracture", "Support Devices": "devices"}


def _caption(row) -> str:
    parts = []
    for c in CHEXPERT_LABELS:
        v = row[c]
        if v == 1.0:
            parts.append(_SHORT[c])
        elif v == -1.0:
            parts.append(_SHORT[c] + "?")
    return f"{row['study_id']} {row['view']}", " ".join(parts)


def write_sample_grid(path, n_patients: int = 4, seed: int = 0, size: int = 256, max_studies: int = 4) -> str:
    """PNG grid: one row per patient, its images across studies, with a caption of each study's labels."""
    from PIL import Image, ImageDraw

    table = make_table(n_patients, seed, max_studies=max_studies)
    groups = [g for _, g in table.groupby("patient_id", sort=True)]
    ncol = max(len(g) for g in groups)
    cap = 26
    canvas = Image.new("L", (ncol * (size + 4), len(groups) * (size + cap + 4)), 0)
    draw = ImageDraw.Draw(canvas)
    for i, g in enumerate(groups):
        for j, (_, row) in enumerate(g.iterrows()):
            x0, y0 = j * (size + 4), i * (size + cap + 4)
            canvas.paste(Image.fromarray(render_image(row, size)), (x0, y0))
            line1, line2 = _caption(row)
            draw.text((x0 + 2, y0 + size + 1), line1, fill=255)
            draw.text((x0 + 2, y0 + size + 13), line2[: max(10, size // 6)], fill=200)
    canvas.save(str(path))
    return str(path)


def _bench(n: int, size: int, seed: int = 0) -> float:
    table = make_table(max(1, n // 2), seed)
    rows = [r for _, r in table.iterrows()][:n]
    tune_allocator()  # as prepare's workers do
    render_image(rows[0], size)
    t0, c0 = time.perf_counter(), time.process_time()
    for r in rows:
        render_image(r, size)
    return len(rows) / (time.perf_counter() - t0), len(rows) / (time.process_time() - c0)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cxrjax.data.phantom",
                                 description="Synthetic chest X-ray studies: write a sample grid PNG or benchmark rendering.")
    ap.add_argument("--grid", help="write a PNG grid of sample images to this path")
    ap.add_argument("--patients", type=int, default=4, help="patients (grid rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--max_studies", type=int, default=4)
    ap.add_argument("--bench", type=int, default=0, help="render this many images and print images/s")
    args = ap.parse_args(argv)
    if not args.grid and not args.bench:
        ap.error("nothing to do: pass --grid=OUT.png and/or --bench=N")
    if args.grid:
        out = write_sample_grid(args.grid, args.patients, args.seed, args.size, args.max_studies)
        print(f"wrote {out}: {args.patients} patients, seed {args.seed}, {args.size}x{args.size}")
    if args.bench:
        wall, cpu = _bench(args.bench, args.size, args.seed)
        print(f"rendered {args.bench} images at {args.size}x{args.size}: {wall:.1f} images/s wall-clock, "
              f"{cpu:.1f} images/s per CPU-second (one core)")


if __name__ == "__main__":
    main()
