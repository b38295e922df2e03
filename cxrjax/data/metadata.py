"""Dataset adapters: each dataset's own files -> the canonical table of `cxrjax.data.schema`.

Nothing downstream reads a raw CSV; every quirk of a dataset is handled here, once. Each adapter
returns an `AdapterResult`: the validated table plus `bad`, one dict per bad input row
(`path` = "file:line" with the header as line 1, or the image path; `reason`). Policy:
  * missing patient / study id, unparseable image path, wrong modality -> row dropped and listed;
  * a label value other than 1 / 0 / -1 / blank -> row kept, that label blanked, listed;
  * a repeated image id -> first row kept, the others dropped and listed;
  * a directory that is not the expected layout -> `MetadataError` at once, naming what was
    expected and where we looked.
Adapters never crash halfway and never drop silently. Everything is vectorised pandas except the
per-file reads that cannot be (report .txt/.xml files, DICOM headers).

`path` is relative to `AdapterResult.root` (the dataset root). For CheXpert the root is the folder
*holding* `CheXpert-v1.0-small/`, because CheXpert's own `Path` column starts with that folder.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from cxrjax.data.schema import (
    CHEXPERT_LABELS,
    EXTRA_PREFIX,
    FRONTAL_VIEWS,
    LABEL_VALUES,
    SPLITS,
    MetadataError,
    hash_split,
    laterality_of,
    study_order_from,
    validate_table,
)

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass
class AdapterResult:
    table: pd.DataFrame  # already passed schema.validate_table
    bad: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}, one per bad input row
    root: Path | None = None  # directory the table's `path` column is relative to


# ----------------------------------------------------------------------------------------- helpers
class _Bad:
    """Collects reasons per input row so each bad row is reported once (reasons joined), in file order."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}  # where -> [row position, reasons]

    def add(self, where: pd.Series, mask, reason) -> None:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        reasons = reason[mask] if isinstance(reason, pd.Series) else [reason] * int(mask.sum())
        for pos, w, r in zip(np.flatnonzero(mask), where[mask], reasons):
            self.rows.setdefault(str(w), [int(pos), []])[1].append(str(r))

    def to_list(self) -> list[dict]:
        files: dict[str, int] = {}  # file -> first-seen rank, so files stay grouped
        key = {w: (files.setdefault(w.rsplit(":", 1)[0], len(files)), pos) for w, (pos, _) in self.rows.items()}
        return [{"path": w, "reason": "; ".join(self.rows[w][1])} for w in sorted(self.rows, key=key.__getitem__)]


def _find(folder: Path, name: str) -> Path | None:
    """`name` or `name.gz` inside `folder`, else None."""
    for cand in (folder / name, folder / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def _need_dir(src, what: str, expected: str) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise MetadataError(f"{what}: {src} is not a directory; expected {expected}")
    return src


def _read_csv(path: Path, required: Sequence[str], expected: str, numeric: Sequence[str] = ()) -> pd.DataFrame:
    """Columns as strings (ids like '00012' must survive) except `numeric` ones (inferred: fast labels)."""
    try:
        header = pd.read_csv(path, nrows=0).columns
        dtype = {c: str for c in header if c not in numeric}
        df = pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=[""])
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise MetadataError(f"{path}: cannot read as CSV ({e}); expected {expected}") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise MetadataError(
            f"{path}: missing column(s) {missing}; expected {expected}; found columns {list(df.columns)[:30]}"
        )
    return df


def _clean(s: pd.Series) -> pd.Series:
    """Stripped strings with blanks as NaN; numeric columns pass through."""
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s
    s = s.str.strip()
    return s.mask(s == "")


def _where(name: str, index: pd.Index) -> pd.Series:
    """'file:line' per row (header = line 1; assumes one line per record)."""
    return (name + ":" + pd.Series(np.arange(2, len(index) + 2), index=index).astype(str)).astype(object)


def _labels(raw: pd.DataFrame, columns: dict[str, str], where: pd.Series, bad: _Bad) -> dict[str, np.ndarray]:
    """Canonical label -> float32 (1/0/-1/NaN); values outside that set are blanked and listed."""
    out = {}
    for canon, col in columns.items():
        s = _clean(raw[col])
        num = pd.to_numeric(s, errors="coerce")
        wrong = s.notna() & ~num.isin(LABEL_VALUES)
        if wrong.any():
            bad.add(where, wrong, f"label {col!r}=" + s.astype(str) + " is not 1, 0, -1 or blank; label blanked")
            num = num.where(~wrong)
        out[canon] = num.to_numpy(dtype=np.float32)
    return out


def _patient_split(patients: pd.Series, fractions=DEFAULT_FRACTIONS) -> pd.Series:
    """schema.hash_split, hashing each distinct patient once (64k patients, not 223k rows)."""
    uniq = pd.Series(pd.unique(patients.to_numpy()))
    table = pd.Series(hash_split(uniq, fractions).to_numpy(), index=uniq.to_numpy())
    return patients.map(table).astype(object)


def _fill_split(patients: pd.Series, split: pd.Series, fractions=DEFAULT_FRACTIONS) -> pd.Series:
    """Rows without a split take their patient's known split, else the patient hash (no new leaks)."""
    split = split.astype(object)
    known = split.notna()
    if known.all():
        return split
    by_patient = split[known].groupby(patients[known]).first()
    out = split.where(known, patients.map(by_patient))
    left = out.isna()
    if left.any():
        out = out.where(~left, _patient_split(patients[left], fractions))
    return out.astype(object)


def _train_valid_fractions(fractions) -> tuple[float, float, float]:
    """Renormalise (train, valid, test) fractions to train/valid only (test comes from elsewhere)."""
    tr, va = float(fractions[0]), float(fractions[1])
    return (tr / (tr + va), va / (tr + va), 0.0)


def _study_order_by_time(df: pd.DataFrame, time: pd.Series) -> pd.Series:
    """Dense rank of each study's earliest time within its patient (ties share a rank; NaN -> -1)."""
    st = pd.DataFrame({"patient_id": df["patient_id"], "study_id": df["study_id"], "t": time})
    st = st.groupby("study_id", sort=False).agg(patient_id=("patient_id", "first"), t=("t", "min"))
    return df["study_id"].map(study_order_from(st, "t")).astype(np.int64)


def _finish(df: pd.DataFrame, *, source: str, where: str, bad: _Bad, root: Path | None) -> AdapterResult:
    """Drop repeated image ids (listed), add derived columns, validate."""
    dup = df["image_id"].duplicated(keep="first").to_numpy()
    bad.add(df["_where"], dup, "duplicate image_id " + df["image_id"].astype(str) + "; first occurrence kept")
    df = df.loc[~dup].copy()
    df["laterality"] = laterality_of(df["view"])
    for c in CHEXPERT_LABELS:
        if c not in df.columns:
            df[c] = np.nan
    if "report" not in df.columns:
        df["report"] = ""
    df["source"] = source
    table = validate_table(df, where=where)
    result = AdapterResult(table=table, bad=bad.to_list(), root=root)
    if result.bad:
        log.warning("%s: %d bad input row(s), e.g. %s", where, len(result.bad), result.bad[0])
    return result


# --------------------------------------------------------------------------------------------- views
_VIEW_MAP = {
    "PA": "PA",
    "AP": "AP",
    "AP SUPINE": "AP_SUPINE",
    "APS": "AP_SUPINE",
    "SUPINE AP": "AP_SUPINE",
    "L": "LATERAL",
    "LL": "LATERAL",
    "RL": "LATERAL",
    "LAT": "LATERAL",
    "LATERAL": "LATERAL",
    "XTABLE LATERAL": "LATERAL",  # MIMIC cross-table lateral
    "FRONTAL": "FRONTAL",
}


def normalize_view(series: pd.Series) -> pd.Series:
    """Any dataset's view string -> canonical VIEWS (case/space/underscore-insensitive; else UNKNOWN).

    'AP Supine'/'AP_SUPINE'/'APS' -> AP_SUPINE; 'L'/'LL'/'RL'/'Lateral' -> LATERAL; 'Frontal' with no
    projection -> FRONTAL; blank, '?' and anything unrecognised (e.g. MIMIC 'AP AXIAL', 'LAO') -> UNKNOWN.
    """
    s = pd.Series(series, copy=False)
    key = s.astype(object).where(s.notna(), "").astype(str).str.strip().str.upper()
    key = key.str.replace(r"[\s_]+", " ", regex=True)
    return key.map(_VIEW_MAP).fillna("UNKNOWN").astype(object)


# ------------------------------------------------------------------------------------------ CheXpert
_CHEXPERT_PATH = r"(patient\d+)/study(\d+)/([^/]+?)(?:\.[^./]*)?$"
_CHEXPERT_HEADER = "CheXpert train.csv/valid.csv header: Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>"


def load_chexpert_csv(csv_path, split: str | None = None, fractions=DEFAULT_FRACTIONS) -> AdapterResult:
    """One CheXpert CSV (train.csv / valid.csv, optionally .gz) -> canonical table.

    `path` keeps CheXpert's `Path` as given ('CheXpert-v1.0-small/train/patientN/studyM/viewK_x.jpg'),
    so it is relative to the folder holding `CheXpert-v1.0-small/`; `root` is set to that folder.
    study_order is the dense rank of the *integer* study number (study10 after study9; MedAug's code
    kept only the last digit). split None -> patient-hash split with `fractions`.
    """
    csv_path = Path(csv_path)
    if split is not None and split not in SPLITS:
        raise MetadataError(f"split must be one of {SPLITS} or None, got {split!r}")
    raw = _read_csv(csv_path, ["Path"] + list(CHEXPERT_LABELS), _CHEXPERT_HEADER, numeric=CHEXPERT_LABELS)
    where, bad = _where(csv_path.name, raw.index), _Bad()
    path = _clean(raw["Path"])
    ids = path.str.extract(_CHEXPERT_PATH)
    ok = ids[0].notna().to_numpy()
    bad.add(where, path.isna(), "blank Path; row dropped")
    bad.add(where, path.notna() & ~ok, "Path " + path.astype(str) + " is not .../patientN/studyM/<view>.jpg; row dropped")

    df = pd.DataFrame({"path": path, "patient_id": ids[0], "_num": pd.to_numeric(ids[1]), "_where": where})
    df["study_id"] = ids[0] + "/study" + ids[1]
    df["image_id"] = df["study_id"] + "/" + ids[2]
    if "Frontal/Lateral" in raw:
        fl = _clean(raw["Frontal/Lateral"]).str.lower()
    else:  # the test set's labels file has no view columns: CheXpert's file names say it (view1_frontal.jpg)
        fl = ids[2].str.extract(r"_(frontal|lateral)$", flags=re.IGNORECASE)[0].str.lower()
    proj = normalize_view(raw["AP/PA"]) if "AP/PA" in raw else pd.Series("UNKNOWN", index=raw.index)
    # Frontal/Lateral is authoritative; AP/PA only refines a frontal (17 real frontals say 'LL'/'RL').
    df["view"] = np.where(
        fl == "lateral", "LATERAL", np.where(fl == "frontal", proj.where(proj.isin(FRONTAL_VIEWS), "FRONTAL"), proj)
    )
    for c, v in _labels(raw, {c: c for c in CHEXPERT_LABELS}, where, bad).items():
        df[c] = v
    df = df.loc[ok].copy()
    df["study_order"] = study_order_from(df, "_num")
    df["split"] = split if split is not None else _patient_split(df["patient_id"], fractions)
    first = path.dropna().iloc[0].split("/")[0] if path.notna().any() else ""
    root = csv_path.parent.parent if first == csv_path.parent.name else csv_path.parent
    return _finish(df, source="chexpert", where=str(csv_path), bad=bad, root=root)


TEST_LABELS = "test_labels.csv"  # CheXpert's test set (500 studies, 5-radiologist consensus), public since 2022


def load_chexpert(src, fractions=None, valid_split: str | None = None, test_labels=None) -> AdapterResult:
    """CheXpert folder (`CheXpert-v1.0-small/` or its parent) -> canonical table.

    Two protocols, chosen by whether the test set's labels are there:
      * default (no test labels; MoCo-CXR, MedAug): train.csv is split by patient hash into train/valid
        (0.9/0.1), and valid.csv (the official, radiologist-labelled held-out set, disjoint patients) is the
        `test` split.
      * with the test set's labels -- `test_labels` = its CSV, or `test_labels.csv(.gz)` found in the CheXpert
        folder or `src` (columns `Path` + the 14 observations; `Path` like `test/patientN/studyM/viewK_x.jpg`,
        relative to the folder holding the CSV, views from the file names) --: train.csv is all `train`,
        valid.csv is `valid` and the test set is `test` (CheXpert's own protocol). `test_labels=False` ignores
        a test_labels.csv that is there.
    `valid_split` overrides where valid.csv goes; `fractions` how train.csv is split (default: as above).
    """
    src = _need_dir(src, "CheXpert", "a folder with train.csv and/or valid.csv (CheXpert-v1.0-small/)")
    folders = [src] + sorted(p for p in src.glob("CheXpert-v1.0*") if p.is_dir())
    for folder in folders:
        train, valid = _find(folder, "train.csv"), _find(folder, "valid.csv")
        if train or valid:
            break
    else:
        raise MetadataError(
            f"CheXpert: no train.csv / valid.csv (or .csv.gz) in {', '.join(map(str, folders))}; "
            "point at the CheXpert-v1.0-small/ folder (or the folder holding it)"
        )
    if test_labels is None:
        test = _find(folder, TEST_LABELS) or _find(src, TEST_LABELS)
    elif test_labels is False or test_labels == "":
        test = None
    else:
        test = Path(test_labels)
        if not test.is_file():
            raise MetadataError(f"CheXpert: test labels {test} not found; expected CheXpert's {TEST_LABELS}")
    if valid_split is None:
        valid_split = "valid" if test else "test"
    parts = []
    if train:
        if fractions is None:
            fractions = (1.0, 0.0, 0.0) if test else (0.9, 0.1, 0.0) if valid and valid_split == "test" else DEFAULT_FRACTIONS
        parts.append(load_chexpert_csv(train, None, fractions))
    if valid:
        parts.append(load_chexpert_csv(valid, valid_split))
    if test:
        parts.append(load_chexpert_csv(test, "test"))
        log.info("CheXpert: test split from %s (%d images); valid.csv -> %r", test, len(parts[-1].table), valid_split)
    if len(parts) == 1:
        return parts[0]
    root = parts[0].root
    tables = []
    for part in parts:  # one root for every path: the first part's (train.csv's)
        t = part.table
        if part.root is not None and Path(part.root).resolve() != Path(root).resolve():
            prefix = Path(os.path.relpath(Path(part.root).resolve(), Path(root).resolve())).as_posix()
            t = t.assign(path=t["path"].where(t["path"].str.startswith("/"), prefix + "/" + t["path"]))
        tables.append(t)
    table = validate_table(pd.concat(tables, ignore_index=True), where=f"CheXpert {folder}")
    return AdapterResult(table, [b for part in parts for b in part.bad], root)


# -------------------------------------------------------------------------------------- MIMIC-CXR-JPG
_MIMIC_SPLITS = {"train": "train", "validate": "valid", "valid": "valid", "test": "test"}
_MIMIC_EXPECTED = (
    "MIMIC-CXR-JPG root with mimic-cxr-2.0.0-metadata.csv(.gz), mimic-cxr-2.0.0-chexpert.csv(.gz), "
    "mimic-cxr-2.0.0-split.csv(.gz) and files/pXX/pNNN/sNNN/<dicom_id>.jpg"
)


def load_mimic(src, image_ext: str = ".jpg", reports: bool = True, fractions=DEFAULT_FRACTIONS) -> AdapterResult:
    """MIMIC-CXR-JPG (or MIMIC-CXR DICOM with image_ext='.dcm') -> canonical table.

    Labels come per study from the CheXpert-labeler CSV; splits from the official split CSV
    ('validate' -> 'valid'; images it does not list take their patient's split, else the hash).
    Reports are read from files/pXX/pNNN/sNNN.txt when present (the mimic-cxr-reports layout).
    """
    src = _need_dir(src, "MIMIC-CXR", _MIMIC_EXPECTED)
    meta_p = _find(src, "mimic-cxr-2.0.0-metadata.csv")
    if meta_p is None:
        raise MetadataError(f"MIMIC-CXR: no mimic-cxr-2.0.0-metadata.csv(.gz) in {src}; expected {_MIMIC_EXPECTED}")
    meta = _read_csv(meta_p, ["dicom_id", "subject_id", "study_id", "ViewPosition"], _MIMIC_EXPECTED)
    where, bad = _where(meta_p.name, meta.index), _Bad()
    subj, study, dicom = _clean(meta["subject_id"]), _clean(meta["study_id"]), _clean(meta["dicom_id"])
    for s, what in ((dicom, "dicom_id"), (subj, "subject_id"), (study, "study_id")):
        bad.add(where, s.isna(), f"blank {what}; row dropped")
    ok = (subj.notna() & study.notna() & dicom.notna()).to_numpy()

    df = pd.DataFrame({"_subj": subj, "_study": study, "image_id": dicom, "_where": where})
    df["patient_id"] = "p" + subj
    df["study_id"] = df["patient_id"] + "/s" + study
    df["path"] = "files/p" + subj.str[:2] + "/" + df["study_id"] + "/" + dicom + image_ext
    df["view"] = normalize_view(meta["ViewPosition"])
    date = pd.to_numeric(_clean(meta["StudyDate"]), errors="coerce") if "StudyDate" in meta else np.nan
    tod = pd.to_numeric(_clean(meta["StudyTime"]), errors="coerce").fillna(0) if "StudyTime" in meta else 0
    df["_t"] = date * 1e6 + tod
    df = df.loc[ok].copy()
    df["study_order"] = _study_order_by_time(df, df["_t"])

    chex_p = _find(src, "mimic-cxr-2.0.0-chexpert.csv")
    if chex_p is not None:
        lab = _read_csv(chex_p, ["subject_id", "study_id"] + list(CHEXPERT_LABELS), "mimic-cxr-2.0.0-chexpert.csv",
                        numeric=CHEXPERT_LABELS)
        lab_where = _where(chex_p.name, lab.index)
        lab_bad = _Bad()
        lab_df = pd.DataFrame(_labels(lab, {c: c for c in CHEXPERT_LABELS}, lab_where, lab_bad), index=lab.index)
        lab_df["_key"] = _clean(lab["subject_id"]) + "/" + _clean(lab["study_id"])
        lab_df = lab_df.dropna(subset=["_key"]).drop_duplicates("_key").set_index("_key")
        key = df["_subj"] + "/" + df["_study"]
        for c in CHEXPERT_LABELS:
            df[c] = key.map(lab_df[c]).to_numpy(dtype=np.float32)
        bad.rows.update(lab_bad.rows)
    else:
        log.warning("MIMIC-CXR: no mimic-cxr-2.0.0-chexpert.csv in %s; labels left blank", src)

    split = pd.Series(np.nan, index=df.index, dtype=object)
    split_p = _find(src, "mimic-cxr-2.0.0-split.csv")
    if split_p is not None:
        sp = _read_csv(split_p, ["dicom_id", "split"], "mimic-cxr-2.0.0-split.csv: dicom_id,study_id,subject_id,split")
        sp_where = _where(split_p.name, sp.index)
        value = _clean(sp["split"]).str.lower().map(_MIMIC_SPLITS)
        bad.add(sp_where, value.isna(), "split " + sp["split"].astype(str) + " is not train/validate/test; patient's split used")
        by_dicom = pd.Series(value.to_numpy(), index=_clean(sp["dicom_id"]).to_numpy())
        split = df["image_id"].map(by_dicom[~by_dicom.index.duplicated()])
    else:
        log.warning("MIMIC-CXR: no mimic-cxr-2.0.0-split.csv in %s; splits by patient hash", src)
    df["split"] = _fill_split(df["patient_id"], split, fractions)

    df["report"] = ""
    if reports and (src / "files").is_dir():
        studies = df.drop_duplicates("study_id")
        txt = {}
        for sid, rel in zip(studies["study_id"], "files/p" + studies["_subj"].str[:2] + "/" + studies["study_id"] + ".txt"):
            p = src / rel
            if p.is_file():
                txt[sid] = p.read_text(encoding="utf-8", errors="replace").strip()
        df["report"] = df["study_id"].map(txt).fillna("")
    return _finish(df, source="mimic-cxr", where=str(meta_p), bad=bad, root=src)


# ------------------------------------------------------------------------------------- NIH ChestX-ray14
NIH_CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "No Finding",
)
# CheXpert column <- NIH label(s). Enlarged Cardiomediastinum, Fracture, Support Devices: not covered (NaN).
NIH_TO_CHEXPERT = {
    "No Finding": ("No Finding",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Lung Opacity": ("Infiltration",),
    "Lung Lesion": ("Mass", "Nodule"),
    "Edema": ("Edema",),
    "Consolidation": ("Consolidation",),
    "Pneumonia": ("Pneumonia",),
    "Atelectasis": ("Atelectasis",),
    "Pneumothorax": ("Pneumothorax",),
    "Pleural Effusion": ("Effusion",),
    "Pleural Other": ("Pleural_Thickening",),
}
_NIH_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
_NIH_HEADER = (
    "Data_Entry_2017(_v2020).csv with header Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
    "Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def _read_list(folder: Path, name: str) -> set[str] | None:
    p = folder / name
    return set(p.read_text().split()) if p.is_file() else None


def load_nih(src, fractions=DEFAULT_FRACTIONS) -> AdapterResult:
    """NIH ChestX-ray14 folder (or its Data_Entry CSV) -> canonical table.

    Every image is its own study (`<pid>/f<follow-up>`), ordered by follow-up number. NIH labels are
    exhaustive over its 14 classes, so mapped CheXpert columns an image does not mention are 0; the raw
    string is kept as `extra_finding_labels`. With train_val_list.txt/test_list.txt a patient is 'test'
    if any of its images is listed in test_list, otherwise hashed between train/valid; without them
    the patient hash decides all three.
    """
    src = Path(src)
    if src.is_file():
        csv_p, src = src, src.parent
    else:
        src = _need_dir(src, "NIH ChestX-ray14", _NIH_HEADER)
        csv_p = next((p for p in (_find(src, n) for n in _NIH_CSVS) if p is not None), None)
        if csv_p is None:
            raise MetadataError(f"NIH ChestX-ray14: no {' / '.join(_NIH_CSVS)} (or .gz) in {src}; expected {_NIH_HEADER}")
    raw = _read_csv(csv_p, ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"], _NIH_HEADER)
    where, bad = _where(csv_p.name, raw.index), _Bad()
    index, pid, fu = _clean(raw["Image Index"]), _clean(raw["Patient ID"]), _clean(raw["Follow-up #"])
    fu_num = pd.to_numeric(fu, errors="coerce")
    bad.add(where, index.isna(), "blank Image Index; row dropped")
    bad.add(where, pid.isna(), "blank Patient ID; row dropped")
    bad.add(where, fu_num.isna(), "Follow-up # " + fu.astype(str) + " is not a number (no study id); row dropped")
    ok = (index.notna() & pid.notna() & fu_num.notna()).to_numpy()

    df = pd.DataFrame({"image_id": index.str.replace(r"\.[^./]*$", "", regex=True), "patient_id": pid, "_where": where})
    df["_fu"] = fu_num
    df["study_id"] = pid + "/f" + fu_num.astype(str).str.replace(r"\.0$", "", regex=True)
    df["view"] = normalize_view(raw["View Position"])
    # Image path: flat images/ or the official images_001/images/... download layout.
    df["path"] = "images/" + index
    found = {}
    for d in sorted(src.glob("images_*/images")):
        found.update({f.name: f"{d.parent.name}/images/{f.name}" for f in d.iterdir()})
    if found:
        df["path"] = index.map(found).fillna(df["path"])

    finding = _clean(raw["Finding Labels"])
    tokens = finding.str.split("|").explode().str.strip()
    unknown = tokens[tokens.notna() & ~tokens.isin(NIH_CLASSES)]
    if len(unknown):
        msg = unknown.groupby(level=0).agg(", ".join)
        bad.add(where, raw.index.isin(msg.index), "unknown NIH label(s) " + msg.reindex(raw.index).astype(str) + "; ignored")
    bad.add(where, finding.isna(), "blank Finding Labels; labels left blank")
    present = {name: tokens[tokens == name].groupby(level=0).size().reindex(raw.index).notna() for name in NIH_CLASSES}
    for canon, names in NIH_TO_CHEXPERT.items():
        hit = np.logical_or.reduce([present[n].to_numpy() for n in names])
        df[canon] = np.where(finding.isna(), np.nan, hit.astype(np.float32))
    df["extra_finding_labels"] = finding.fillna("")
    df = df.loc[ok].copy()
    df["study_order"] = study_order_from(df, "_fu")

    train_val, test = _read_list(src, "train_val_list.txt"), _read_list(src, "test_list.txt")
    if test is not None or train_val is not None:
        in_test = index[ok].isin(test or set())
        test_patients = set(df.loc[in_test.to_numpy(), "patient_id"])
        df["split"] = _patient_split(df["patient_id"], _train_valid_fractions(fractions))
        df.loc[df["patient_id"].isin(test_patients), "split"] = "test"
    else:
        df["split"] = _patient_split(df["patient_id"], fractions)
    return _finish(df, source="nih-cxr14", where=str(csv_p), bad=bad, root=src)


# ------------------------------------------------------------------------- COVID-19 image collection
_COVID_EXPECTED = (
    "covid-chestxray-dataset folder with metadata.csv (patientid, offset, ..., finding, ..., view, modality, "
    "..., folder, filename, ..., clinical_notes, ...) and images/<filename>"
)
# Pneumonia = 1 when `finding` names a pneumonia or an infection that causes one: the word pneumonia,
# COVID-19/SARS/MERS, 'bacterial'/'viral'/'fungal', or a named pathogen of the collection (Streptococcus,
# Klebsiella, ...), and Lipoid (lipoid pneumonia). ARDS alone and 'todo' stay blank.
_PNEUMONIA_RE = (
    r"pneumonia|covid|\bsars\b|\bmers\b|bacteri|viral|fung|streptococcus|klebsiella|legionella|e\.?\s?coli|mycoplasma|"
    r"pneumocystis|influenza|varicella|chlamydophila|staphylococcus|nocardia|aspergill|herpes|candida|"
    r"histoplasm|tubercul|lipoid"
)


def load_covid(src, fractions=DEFAULT_FRACTIONS) -> AdapterResult:
    """ieee8023 COVID-19 image data collection -> canonical table.

    A study is patient + offset (`<pid>/o<offset>`, ordered by offset); a row with a blank (or '?')
    offset is its own study `<pid>/img-<filename>` with study_order -1. Non-X-ray rows (CT) are dropped
    and listed. Labels: No Finding = 1 for finding 'No Finding' (and 0 for pneumonia rows); Pneumonia
    = 1 by `_PNEUMONIA_RE` (and 0 for 'No Finding' rows); the rest blank. `extra_finding` keeps the raw
    finding ('todo' = unlabelled). report = clinical_notes.
    """
    src = _need_dir(src, "COVID-19 collection", _COVID_EXPECTED)
    meta_p = src / "metadata.csv"
    if not meta_p.is_file():
        raise MetadataError(f"COVID-19 collection: no metadata.csv in {src}; expected {_COVID_EXPECTED}")
    raw = _read_csv(meta_p, ["patientid", "offset", "finding", "view", "modality", "filename"], _COVID_EXPECTED)
    where, bad = _where(meta_p.name, raw.index), _Bad()
    pid, fname, modality = _clean(raw["patientid"]), _clean(raw["filename"]), _clean(raw["modality"])
    xray = modality.str.lower().str.replace(r"[\s-]", "", regex=True).eq("xray").fillna(False).astype(bool)
    bad.add(where, pid.isna(), "blank patientid; row dropped")
    bad.add(where, fname.isna(), "blank filename; row dropped")
    bad.add(where, ~xray, "modality " + modality.astype(str) + " is not X-ray; row dropped")
    ok = (pid.notna() & fname.notna() & xray).to_numpy()

    folder = _clean(raw["folder"]).fillna("images") if "folder" in raw else "images"
    offset = pd.to_numeric(_clean(raw["offset"]), errors="coerce")  # '?' -> NaN
    off_txt = offset.astype(str).str.replace(r"\.0$", "", regex=True)
    df = pd.DataFrame({"image_id": fname, "patient_id": pid, "_off": offset, "_where": where})
    df["path"] = folder + "/" + fname
    df["study_id"] = np.where(offset.notna(), pid + "/o" + off_txt, pid + "/img-" + fname)
    df["view"] = normalize_view(raw["view"])
    finding = _clean(raw["finding"])
    no_finding = finding.str.lower().eq("no finding").fillna(False).to_numpy(bool)
    pneumonia = finding.str.lower().str.contains(_PNEUMONIA_RE, regex=True).fillna(False).to_numpy(bool)
    df["No Finding"] = np.select([no_finding, pneumonia], [1.0, 0.0], np.nan)
    df["Pneumonia"] = np.select([pneumonia, no_finding], [1.0, 0.0], np.nan)
    df["extra_finding"] = finding.fillna("")
    df["report"] = _clean(raw["clinical_notes"]).fillna("") if "clinical_notes" in raw else ""
    df = df.loc[ok].copy()
    df["study_order"] = study_order_from(df, "_off")
    df["split"] = _patient_split(df["patient_id"], fractions)
    return _finish(df, source="covid-chestxray", where=str(meta_p), bad=bad, root=src)


# ------------------------------------------------------------------------------------- shared folder
def load_shared(src, fractions=DEFAULT_FRACTIONS) -> AdapterResult:
    """The project's shared data folder (covid-chestxray/ + nih1000/) as one table.

    Paths become relative to `src` ('covid-chestxray/images/...', 'nih1000/images/...'); patient,
    study and image ids get a 'covid:' / 'nih:' prefix so the two sources cannot collide.
    """
    src = _need_dir(src, "shared data", "a folder with covid-chestxray/ and nih1000/")
    missing = [d for d in ("covid-chestxray", "nih1000") if not (src / d).is_dir()]
    if missing:
        raise MetadataError(f"shared data: {src} lacks {missing}; expected covid-chestxray/metadata.csv and nih1000/Data_Entry_2017_v2020.csv")
    parts, bad = [], []
    for sub, prefix, loader in (("covid-chestxray", "covid:", load_covid), ("nih1000", "nih:", load_nih)):
        r = loader(src / sub, fractions=fractions)
        t = r.table.copy()
        for c in ("image_id", "patient_id", "study_id"):
            t[c] = prefix + t[c]
        t["path"] = sub + "/" + t["path"]
        parts.append(t)
        bad += [{"path": f"{sub}/{b['path']}", "reason": b["reason"]} for b in r.bad]
    table = pd.concat(parts, ignore_index=True)
    extras = [c for c in table.columns if str(c).startswith(EXTRA_PREFIX)]
    table[extras] = table[extras].fillna("")
    return AdapterResult(validate_table(table, where=f"shared {src}"), bad, src)


# ----------------------------------------------------------------------------------- OpenI reports
def _openi_record(name: str, data: bytes) -> dict:
    root = ET.fromstring(data)
    sections = {
        (el.get("Label") or "").upper(): " ".join((el.text or "").split()) for el in root.iter("AbstractText")
    }
    uid = root.find("uId")
    findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
    return {
        "report_id": uid.get("id") if uid is not None and uid.get("id") else Path(name).stem,
        "indication": sections.get("INDICATION", ""),
        "comparison": sections.get("COMPARISON", ""),
        "findings": findings,
        "impression": impression,
        "report": " ".join(t for t in (findings, impression) if t),
        "image_ids": [el.get("id") for el in root.iter("parentImage") if el.get("id")],
        "mesh": [(el.text or "").strip() for el in root.iter("major") if (el.text or "").strip()],
        "_n": int(m.group(1)) if (m := re.search(r"(\d+)\.xml$", name)) else 0,
    }


def load_openi_reports(tgz_or_dir) -> pd.DataFrame:
    """OpenI / Indiana University report XMLs -> one row per report (unpaired text for the VL job).

    Reads NLMCXR_reports.tgz as a stream (nothing extracted to disk) or a folder of .xml files.
    `report` = findings + impression, the text to train on. Unparseable XML files are skipped and
    listed in `df.attrs['bad']` (same {path, reason} dicts as the adapters).
    """
    src = Path(tgz_or_dir)
    rows, bad = [], []

    def add(name: str, data: bytes) -> None:
        try:
            rows.append(_openi_record(name, data))
        except ET.ParseError as e:
            bad.append({"path": name, "reason": f"unparseable XML ({e}); report skipped"})

    if src.is_dir():
        for p in sorted(src.rglob("*.xml")):
            add(str(p.relative_to(src)), p.read_bytes())
    elif src.is_file():
        try:
            with tarfile.open(src, mode="r|*") as tar:
                for m in tar:
                    if m.isfile() and m.name.endswith(".xml"):
                        add(m.name, tar.extractfile(m).read())
        except tarfile.TarError as e:
            raise MetadataError(f"OpenI: {src} is not a readable tar archive ({e}); expected NLMCXR_reports.tgz") from e
    else:
        raise MetadataError(f"OpenI: {src} does not exist; expected NLMCXR_reports.tgz or a folder of ecgen-radiology/*.xml")
    if not rows:
        raise MetadataError(f"OpenI: no report XML files (ecgen-radiology/N.xml) found in {src}")
    cols = ["report_id", "indication", "comparison", "findings", "impression", "report", "image_ids", "mesh"]
    df = pd.DataFrame(rows).sort_values("_n", kind="stable")[cols].reset_index(drop=True)
    df.attrs["bad"] = bad
    return df


# ------------------------------------------------------------------------------------- DICOM folder
_DICOM_TAGS = ["PatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "ViewPosition", "SOPInstanceUID"]


def load_dicom_folder(src, fractions=DEFAULT_FRACTIONS, source: str = "dicom") -> AdapterResult:
    """Every *.dcm under `src` (headers only) -> canonical table; unreadable files are listed as bad."""
    import pydicom  # local: only this adapter needs it

    src = _need_dir(src, "DICOM folder", "a folder tree containing *.dcm files")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() == ".dcm" and p.is_file())
    if not files:
        raise MetadataError(f"DICOM folder: no *.dcm files under {src}")
    recs, bad = [], _Bad()
    for p in files:
        rel = p.relative_to(src).as_posix()
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=_DICOM_TAGS)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, never fatal
            bad.add(pd.Series([rel]), [True], f"unreadable DICOM ({type(e).__name__}: {e}); file skipped")
            continue
        recs.append({"_where": rel, "path": rel, **{t: str(ds.get(t, "") or "").strip() for t in _DICOM_TAGS}})
    df = pd.DataFrame(recs, columns=["_where", "path"] + _DICOM_TAGS)
    for t in ("PatientID", "StudyInstanceUID"):
        bad.add(df["_where"], df[t].eq(""), f"no {t}; file skipped")
    df = df.loc[df["PatientID"].ne("") & df["StudyInstanceUID"].ne("")].copy()
    df["patient_id"] = df["PatientID"]
    df["study_id"] = df["PatientID"] + "/" + df["StudyInstanceUID"]
    df["image_id"] = df["SOPInstanceUID"].where(df["SOPInstanceUID"].ne(""), df["path"])
    df["view"] = normalize_view(df["ViewPosition"])
    date = pd.to_numeric(df["StudyDate"].str.replace(r"\D", "", regex=True), errors="coerce")
    tod = pd.to_numeric(df["StudyTime"].str.replace(":", "", regex=False), errors="coerce").fillna(0)
    df["study_order"] = _study_order_by_time(df, date * 1e6 + tod) if len(df) else []
    df["split"] = _patient_split(df["patient_id"], fractions) if len(df) else []
    return _finish(df, source=source, where=str(src), bad=bad, root=src)


# -------------------------------------------------------------------------------------- generic CSV
_CSV_KEYS = ("image_id", "path", "patient_id", "study_id", "study_order", "view", "split", "report") + CHEXPERT_LABELS
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validate": "valid", "validation": "valid",
                  "val": "valid", "dev": "valid", "test": "test", "testing": "test"}


def parse_mapping(text: str) -> dict[str, str]:
    """'path=File,patient_id=PID,view=View' -> {'path': 'File', ...} (for command-line flags)."""
    mapping = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise MetadataError(f"mapping item {item!r} is not canonical_name=csv_column (in {text!r})")
        mapping[key.strip()] = value.strip()
    return mapping


def load_csv(csv_path, mapping: dict[str, str] | str, source: str = "csv", fractions=DEFAULT_FRACTIONS) -> AdapterResult:
    """Any CSV -> canonical table via `mapping` {canonical name: CSV column}.

    `path` and `patient_id` are required; image_id defaults to path; study_id defaults to one study per
    image and is always prefixed with the patient id; `study_order` may hold numbers or dates (ranked
    within the patient); a missing split column / blank split -> patient hash. `extra_*` keys keep
    columns verbatim. A split column that puts one patient in two splits raises MetadataError.
    """
    csv_path = Path(csv_path)
    mapping = parse_mapping(mapping) if isinstance(mapping, str) else dict(mapping)
    unknown = [k for k in mapping if k not in _CSV_KEYS and not k.startswith(EXTRA_PREFIX)]
    if unknown:
        raise MetadataError(f"mapping keys {unknown} are not canonical columns; valid: {list(_CSV_KEYS)} or extra_*")
    for k in ("path", "patient_id"):
        if k not in mapping:
            raise MetadataError(f"mapping must name the CSV column for {k!r} (got {mapping})")
    if not csv_path.is_file():
        raise MetadataError(f"CSV adapter: {csv_path} is not a file")
    raw = _read_csv(csv_path, list(mapping.values()), f"the columns named by the mapping {mapping}")
    where, bad = _where(csv_path.name, raw.index), _Bad()
    col = {k: _clean(raw[v]) for k, v in mapping.items()}
    bad.add(where, col["path"].isna(), "blank path; row dropped")
    bad.add(where, col["patient_id"].isna(), "blank patient_id; row dropped")
    ok = col["path"].notna() & col["patient_id"].notna()
    if "study_id" in col:
        bad.add(where, col["study_id"].isna(), "blank study_id; row dropped")
        ok &= col["study_id"].notna()

    df = pd.DataFrame({"path": col["path"], "patient_id": col["patient_id"], "_where": where})
    df["image_id"] = col.get("image_id", col["path"]).fillna(col["path"])
    df["study_id"] = df["patient_id"] + "/" + (col["study_id"] if "study_id" in col else "img-" + df["image_id"])
    df["view"] = normalize_view(col["view"]) if "view" in col else "UNKNOWN"
    if "report" in col:
        df["report"] = col["report"].fillna("")
    labels = {k: mapping[k] for k in CHEXPERT_LABELS if k in mapping}
    for c, v in _labels(raw, labels, where, bad).items():
        df[c] = v
    for k in mapping:
        if k.startswith(EXTRA_PREFIX):
            df[k] = col[k].fillna("")
    split = pd.Series(np.nan, index=raw.index, dtype=object)
    if "split" in col:
        split = col["split"].str.lower().map(_SPLIT_ALIASES)
        bad.add(where, col["split"].notna() & split.isna(), "split " + col["split"].astype(str) + " unknown; patient's split used")
    if "study_order" in col:
        t = pd.to_numeric(col["study_order"], errors="coerce")
        if t.isna().all() and col["study_order"].notna().any():
            dt = pd.to_datetime(col["study_order"], errors="coerce", format="mixed")
            t = (dt - pd.Timestamp(0)).dt.total_seconds()
        df["_t"] = t
    df = df.loc[ok.to_numpy()].copy()
    split = split[ok.to_numpy()]
    df["study_order"] = _study_order_by_time(df, df["_t"]) if "_t" in df else -1
    df["split"] = _fill_split(df["patient_id"], split, fractions)
    return _finish(df, source=source, where=str(csv_path), bad=bad, root=csv_path.parent)


# -------------------------------------------------------------------------------------------- registry
ADAPTERS: dict[str, Callable[..., AdapterResult]] = {
    "chexpert": load_chexpert,
    "mimic": load_mimic,
    "nih": load_nih,
    "shared": load_shared,
    "covid": load_covid,
    "dicom": load_dicom_folder,
    "csv": load_csv,
}


def load_source(name: str, src, **options) -> AdapterResult:
    """Run the adapter called `name` on `src` (options go to the adapter, e.g. mapping= for 'csv')."""
    if name not in ADAPTERS:
        raise MetadataError(f"unknown metadata source {name!r}; valid choices: {sorted(ADAPTERS)}")
    return ADAPTERS[name](src, **options)


__all__ = [
    "AdapterResult", "ADAPTERS", "NIH_TO_CHEXPERT", "load_source", "normalize_view", "load_chexpert",
    "load_chexpert_csv", "load_mimic", "load_nih", "load_covid", "load_shared", "load_openi_reports",
    "load_dicom_folder", "load_csv", "parse_mapping",
]
