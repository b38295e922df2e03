"""A patient's illness course: one latent state per study, with graded, persistent findings.

The model is a Gaussian copula over time. Each patient has a frailty f ~ N(0, 1), which also sets
how many studies they get (sicker patients come back more often, as in CheXpert). Each study t has
an acuity a_t (frailty plus an AR(1) episode term) and each finding c a latent

    z_ct = sqrt(w_c) a_t + sqrt(1 - w_c) (sqrt(k_c) p_c + sqrt(1 - k_c) e_ct) + d_c log(1 + t),

e_ct AR(1) with phi_c, all N(0, 1) but for the drift d_c (a patient's later studies are sicker, as
in CheXpert, where effusion goes from 25 % of first studies to 50 % of fifth ones): w_c couples findings of one study (sick studies have several), k_c is the
patient's chronic share (a big heart stays big), phi_c the persistence of an episode from one study
to the next. A finding is present when z_ct passes a threshold set by its target rate; the most
marginal present ones are the uncertain (-1) ones, the rest positive (1), with a severity that grows
with how far z_ct is past the threshold (`Finding.severity`): most positives are small, a few are
large, and a finding waxes and wanes smoothly across a patient's studies.

The rates (pos / unc / neg, AP_RATE) are tuned so that the phantom's image-level label shares and view
mix match CheXpert's train table: `python benchmarks/phantom_check.py --calibrate 4` prints them, and
`--structure` shows the result beside CheXpert (docs/phantom.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from scipy.special import ndtr, ndtri

from cxrjax.data.schema import CHEXPERT_LABELS

from . import structure
from .streams import rng

PATHOLOGIES = tuple(c for c in CHEXPERT_LABELS if c not in ("No Finding", "Support Devices"))
OPACITY_CHILDREN = ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis")
DEVICES = ("ett", "ng", "cline", "pacemaker", "chest_tube")


@dataclass(frozen=True)
class Finding:
    """How one observation occurs: rates of studies, coupling, persistence, severity grading."""

    pos: float        # P(present and certain: label 1) before the drift, i.e. at a first study
    unc: float        # P(present but marginal: label -1, rendered faint), likewise
    neg: float        # P(label 0 | absent): negated in the report; otherwise left blank
    acuity: float     # w: loading on the study's acuity
    chronic: float    # k: share of the rest that is a fixed trait of the patient
    persist: float    # phi: AR(1) coefficient of the episode term between consecutive studies
    drift: float = 0.0    # latent shift per log(1 + study order): later studies of a patient are sicker
    floor: float = 0.15   # severity of the most marginal positive
    shape: float = 1.5    # severity = floor + (1 - floor) r ** shape, r uniform over positives

    def severity(self, r: float) -> float:
        return self.floor + (1.0 - self.floor) * r ** self.shape


FINDINGS = {
    "Enlarged Cardiomediastinum": Finding(0.036, 0.046, 0.112, acuity=0.05, chronic=0.5, persist=0.5),
    "Cardiomegaly": Finding(0.085, 0.029, 0.061, acuity=0.10, chronic=0.8, persist=0.6),
    "Lung Opacity": Finding(0.092, 0.038, 0.080, acuity=0.08, chronic=0.1, persist=0.4),
    "Lung Lesion": Finding(0.038, 0.007, 0.008, acuity=0.02, chronic=0.9, persist=0.8, floor=0.1),
    "Edema": Finding(0.137, 0.043, 0.139, acuity=0.12, chronic=0.2, persist=0.5, drift=0.15),
    "Consolidation": Finding(0.060, 0.116, 0.159, acuity=0.05, chronic=0.1, persist=0.4),
    "Pneumonia": Finding(0.023, 0.075, 0.012, acuity=0.05, chronic=0.1, persist=0.4),
    "Atelectasis": Finding(0.123, 0.132, 0.010, acuity=0.08, chronic=0.1, persist=0.4),
    "Pneumothorax": Finding(0.074, 0.011, 0.295, acuity=0.05, chronic=0.2, persist=0.6),
    "Pleural Effusion": Finding(0.242, 0.047, 0.274, acuity=0.25, chronic=0.3, persist=0.6, drift=0.15,
                                floor=0.1, shape=3.0),
    "Pleural Other": Finding(0.017, 0.016, 0.002, acuity=0.02, chronic=0.9, persist=0.8),
    "Fracture": Finding(0.035, 0.003, 0.012, acuity=0.02, chronic=0.8, persist=0.8, floor=0.3),
}
SUPPORT_DEVICES = Finding(0.356, 0.0, 0.056, acuity=0.20, chronic=0.2, persist=0.6, drift=0.15)
FRAILTY_SHARE = 0.4        # lambda: share of a study's acuity that is the patient's frailty
ACUITY_PERSIST = 0.5       # AR(1) of the episode part of the acuity
STUDIES_FRAILTY = 0.6      # correlation of the patient's frailty with the rank of their study count
ACUITY_DRIFT = 0.2         # acuity shift per log(1 + study order)
AP_RATE = 0.769        # P(AP) threshold; CheXpert's 84.7 % of studies follows from sick patients' many studies
VIEW_ACUITY = 0.3          # loading of the AP projection's latent on the study's acuity ...
VIEW_SETTING = 0.7         # ... and on the patient's care setting (outpatients keep getting PA + lateral)
SETTING_FRAILTY = 0.3      # correlation of the care setting with frailty
PACEMAKER = 0.05           # patients who have (or receive) a pacemaker


@dataclass(frozen=True)
class PatientLatent:
    frailty: float
    setting: float         # N(0, 1); high = inpatient (portable AP films)
    n_studies: int
    chronic: dict          # finding -> the patient's fixed N(0, 1) share
    pacemaker_at: int      # first study with a pacemaker (a large number: never)


@dataclass(frozen=True)
class StudyState:
    """The latent state of one study: what is present, how much, and how the study was taken."""

    order: int
    acuity: float          # N(0, 1); high = sick
    grade: dict            # finding -> 1 (present), -1 (marginal: uncertain), 0 (absent)
    sev: dict              # finding -> severity in [0, 1] (0 absent; faint when marginal; graded when present)
    devices: tuple         # subset of DEVICES
    frontal_view: str      # PA / AP / AP_SUPINE
    views: tuple           # every image of the study in order, e.g. ("PA", "LATERAL")
    inspiration: float     # diaphragm shift of this study (+ = lower inspiration)


@functools.lru_cache(maxsize=8192)
def patient_latent(seed: int, patient_id: str, max_studies: int = structure.MAX_STUDIES) -> PatientLatent:
    """Frailty, study count and chronic traits of one patient, from (seed, patient_id)."""
    r = rng(seed, "patient-latent", patient_id)
    f, e, q = r.standard_normal(3)
    chronic = dict(zip(PATHOLOGIES + ("Support Devices",), r.standard_normal(len(PATHOLOGIES) + 1).tolist()))
    u = r.random(4)
    rank = ndtr(STUDIES_FRAILTY * f + math.sqrt(1 - STUDIES_FRAILTY**2) * e)
    pm = int(u[1] * 6) if u[0] < PACEMAKER * (1.0 + ndtr(f)) else 10**6
    return PatientLatent(frailty=float(f), setting=float(SETTING_FRAILTY * f + math.sqrt(1 - SETTING_FRAILTY**2) * q), n_studies=structure.n_studies(float(rank), max_studies),
                         chronic=chronic, pacemaker_at=pm)


def _threshold(rate: float) -> float:
    return float(ndtri(1.0 - rate)) if rate > 0 else math.inf


@functools.lru_cache(maxsize=64)
def _thresholds(spec: Finding) -> tuple[float, float]:
    return _threshold(spec.pos), _threshold(spec.pos + spec.unc)


def _grade(spec: Finding, z: float) -> tuple[int, float]:
    """(grade, severity) of a finding with latent z."""
    t_pos, t_unc = _thresholds(spec)
    if z > t_pos:
        r = (ndtr(z) - ndtr(t_pos)) / (1.0 - ndtr(t_pos))
        return 1, float(spec.severity(float(r)))
    if z > t_unc:
        r = (ndtr(z) - ndtr(t_unc)) / max(ndtr(t_pos) - ndtr(t_unc), 1e-9)
        return -1, float(spec.floor * (0.3 + 0.5 * r))
    return 0, 0.0


def _ar(prev: float | None, phi: float, noise: float) -> float:
    return noise if prev is None else phi * prev + math.sqrt(1.0 - phi * phi) * noise


def _step(seed: int, patient_id: str, pl: PatientLatent, t: int, prev: StudyState | None,
          prev_episode: dict | None) -> tuple[StudyState, dict]:
    r = rng(seed, "study", patient_id, t)
    n = r.standard_normal(len(FINDINGS) + 4)   # a fixed number of draws per step: the course is prefix-stable
    u = r.random(16)
    names = tuple(FINDINGS) + ("Support Devices",)
    episode = {c: _ar(None if prev_episode is None else prev_episode[c], spec.persist, float(n[i]))
               for i, (c, spec) in enumerate(list(FINDINGS.items()) + [("Support Devices", SUPPORT_DEVICES)])}
    episode["acuity"] = _ar(None if prev_episode is None else prev_episode["acuity"], ACUITY_PERSIST, float(n[-1]))
    trend = math.log1p(t)
    a = math.sqrt(FRAILTY_SHARE) * pl.frailty + math.sqrt(1 - FRAILTY_SHARE) * episode["acuity"] + ACUITY_DRIFT * trend
    grade, sev = {}, {}
    for c in names:
        spec = FINDINGS.get(c, SUPPORT_DEVICES)
        own = math.sqrt(spec.chronic) * pl.chronic[c] + math.sqrt(1 - spec.chronic) * episode[c]
        z = math.sqrt(spec.acuity) * a + math.sqrt(1 - spec.acuity) * own + spec.drift * trend
        grade[c], sev[c] = _grade(spec, z)
    # lines and tubes: which ones, from how sick the study is and what it shows
    dev = set()
    if t >= pl.pacemaker_at:
        dev.add("pacemaker")
    if grade.pop("Support Devices") == 1:
        if a > 0.9 and u[0] < 0.7:
            dev.add("ett")
            if u[1] < 0.7:
                dev.add("ng")
        if u[2] < 0.65 or not dev:
            dev.add("cline")
        if (grade["Pneumothorax"] == 1 or sev["Pleural Effusion"] > 0.7) and u[3] < 0.5:
            dev.add("chest_tube")
    sev.pop("Support Devices")
    # the projection follows acuity (portable AP for the sick), the rest of the study its projection
    rest = math.sqrt(max(1.0 - VIEW_ACUITY**2 - VIEW_SETTING**2, 0.0))
    ap = VIEW_ACUITY * a + VIEW_SETTING * pl.setting + rest * float(n[-2]) > ndtri(1.0 - AP_RATE)
    view = ("AP_SUPINE" if (a > 1.2 and u[4] < 0.4) else "AP") if ap else "PA"
    views = structure.study_views(view, u[5:9])
    state = StudyState(order=t, acuity=float(a), grade=grade, sev=sev, devices=tuple(d for d in DEVICES if d in dev),
                       frontal_view=view, views=views,
                       inspiration=float(0.03 * n[-3] + (0.05 if view != "PA" else 0.0)))
    return state, episode


@functools.lru_cache(maxsize=4096)
def _course(seed: int, patient_id: str, n_steps: int) -> tuple:
    pl = patient_latent(seed, patient_id)
    states, prev, episode = [], None, None
    for t in range(n_steps):
        prev, episode = _step(seed, patient_id, pl, t, prev, episode)
        states.append(prev)
    return tuple(states)


def patient_course(seed: int, patient_id: str, n_steps: int) -> tuple:
    """The latent states of a patient's first n_steps studies (a prefix of every longer course)."""
    return _course(int(seed), str(patient_id), int(n_steps))


def study_state(seed: int, patient_id: str, order: int) -> StudyState:
    """The latent state of the patient's study number `order` (0-based)."""
    return patient_course(seed, patient_id, order + 1)[order]
