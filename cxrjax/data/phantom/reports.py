"""A study's free-text report (EXAMINATION / FINDINGS / IMPRESSION), consistent with its labels.

Positive findings are stated with their side, lobe or size and a severity word that follows the
rendered severity ("small" / "moderate" / "large" effusion, "mild" / "moderate" / "severe" edema);
uncertain ones are hedged ("possible", "cannot be excluded"); a negative label is negated or left
out; a blank one is never mentioned. Against the previous study: "new", "increased", "decreased",
"unchanged", "resolved". Wording is drawn from (seed, patient, study), so reports vary but are
deterministic.
"""

from __future__ import annotations

from .anatomy import LOBE_FRONTAL, LOBE_NAMES, Anatomy, patient_anatomy
from .course import OPACITY_CHILDREN, PATHOLOGIES, StudyState
from .streams import rng

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


def _exam(views: tuple) -> str:
    """The examination line from the study's images, e.g. ("PA", "LATERAL") -> "PA and lateral views of the chest."."""
    n_front, n_lat = sum(v != "LATERAL" for v in views), views.count("LATERAL")
    proj = {"PA": "PA", "AP": "AP", "AP_SUPINE": "supine AP"}[views[0]]
    lateral = "cross-table lateral" if views[0] == "AP_SUPINE" else "lateral"
    if not n_lat:
        if n_front == 1:
            return "PA view of the chest." if proj == "PA" else f"Portable {proj} chest radiograph."
        return f"{('Two', 'Three')[n_front - 2]} {'portable ' if proj != 'PA' else ''}frontal views of the chest."
    front = proj if n_front == 1 else f"{('Two', 'Three')[n_front - 2]} frontal"
    lat = lateral if n_lat == 1 else f"two {lateral}"
    return f"{front[0].upper() + front[1:]} and {lat} views of the chest."


def _finding_slots(c: str, an: Anatomy, st: StudyState, prev: StudyState | None, prev_lab: dict | None, lab_now) -> dict:
    s = st.sev[c] if st.sev[c] > 0 else 0.3   # a label edited without a latent finding: a small one
    size, _ = _size_words(s)
    mild, mildly = _size_words(s, "severity")
    eff_side = an.effusion_side
    lx = LOBE_FRONTAL
    slots = {
        "size": size, "mild": mild, "mildly": mildly, "small": "small" if s > 0.2 else "trace",
        "lobe": LOBE_NAMES[an.lobe],
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
        side, _, y, _ = an.lesion
        slots["zone"] = _zone(side, y)
        d_cm = 0.6 + 6.0 * min(s, 1.0)
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


def study_report(seed: int, patient_id: str, state: StudyState, labels: dict,
                 prev: StudyState | None = None, prev_labels: dict | None = None) -> str:
    """FINDINGS + IMPRESSION text consistent with the study's labels (blank labels are not mentioned)."""
    an = patient_anatomy(seed, patient_id)
    r = rng(seed, "report", patient_id, state.order)

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
    order = list(PATHOLOGIES)
    r.shuffle(order)
    for c in order:
        v = labels[c]
        if v != v:   # NaN: not mentioned
            continue
        if c == "Lung Opacity" and v == 1.0 and any(labels[k] in (1.0, -1.0) for k in OPACITY_CHILDREN):
            continue   # the children's sentences describe the opacity
        if c == "Lung Opacity" and v == -1.0 and any(labels[k] == -1.0 for k in OPACITY_CHILDREN):
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
    head = f"EXAMINATION: {_exam(state.views)}"
    if state.order > 0 and r.random() < 0.7:
        head += " COMPARISON: Prior chest radiograph."
    return f"{head}\nFINDINGS: {findings}\nIMPRESSION: {' '.join(impression)}".strip()


