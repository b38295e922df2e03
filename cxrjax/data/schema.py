"""The canonical metadata table: one row per image, the same columns for every dataset.

Every adapter in `cxrjax.data.metadata` produces exactly this table and nothing downstream reads a
dataset's raw files. `validate_table` is the gate: it coerces dtypes, refuses duplicate image ids and
patient leaks between splits, and says which file/column is at fault.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

# The 14 CheXpert observations, in CheXpert's column order. Values: 1 positive, 0 negative,
# -1 uncertain, NaN not mentioned (blank).
CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
LABEL_VALUES = (1.0, 0.0, -1.0)  # plus NaN

# Canonical views. Frontal = PA, AP, AP_SUPINE, FRONTAL (projection not recorded); lateral = LATERAL
# (LL/RL/L collapse into it).
VIEWS = ("PA", "AP", "AP_SUPINE", "FRONTAL", "LATERAL", "UNKNOWN")
FRONTAL_VIEWS = ("PA", "AP", "AP_SUPINE", "FRONTAL")
LATERALITIES = ("frontal", "lateral", "unknown")
SPLITS = ("train", "valid", "test")

META_COLUMNS = (
    "image_id",     # str, unique over the table
    "path",         # str, image file relative to the dataset root ('' when there is no image)
    "patient_id",   # str
    "study_id",     # str, unique over the table (adapters prefix it with the patient id)
    "study_order",  # int64, 0-based rank of the study in the patient's timeline; -1 unknown
    "view",         # one of VIEWS
    "laterality",   # one of LATERALITIES, derived from view
    "split",        # one of SPLITS
)
TAIL_COLUMNS = ("report", "source")  # report: str ('' when absent); source: dataset/institution
COLUMNS = META_COLUMNS + CHEXPERT_LABELS + TAIL_COLUMNS
# Adapters may keep dataset-specific columns (e.g. the COVID collection's `finding`) under this prefix;
# they travel with the table but nothing generic depends on them.
EXTRA_PREFIX = "extra_"


class MetadataError(ValueError):
    """Bad metadata input; the message names the file/row/column and what to do."""


def laterality_of(view: pd.Series) -> pd.Series:
    """frontal / lateral / unknown from canonical view names."""
    out = np.where(view.isin(FRONTAL_VIEWS), "frontal", np.where(view == "LATERAL", "lateral", "unknown"))
    return pd.Series(out, index=view.index, dtype=object)


def study_order_from(table: pd.DataFrame, time_column: str) -> pd.Series:
    """0-based dense rank of each study's time within its patient (-1 where time is unknown)."""
    t = pd.to_numeric(table[time_column], errors="coerce")
    order = t.groupby(table["patient_id"]).rank(method="dense") - 1
    return order.fillna(-1).astype(np.int64)


def hash_split(patient_id: pd.Series, fractions=(0.8, 0.1, 0.1), salt: str = "cxrjax") -> pd.Series:
    """Patient-level split from a stable hash of the patient id (same id -> same split, any run)."""
    if len(fractions) != len(SPLITS) or abs(sum(fractions) - 1.0) > 1e-6:
        raise MetadataError(f"split fractions must be 3 numbers (train, valid, test) summing to 1, got {fractions}")
    bounds = np.cumsum(fractions)[:-1]
    u = np.array(
        [int.from_bytes(hashlib.sha256(f"{salt}:{p}".encode()).digest()[:8], "little") / 2**64 for p in patient_id],
        dtype=np.float64,
    )
    return pd.Series(np.asarray(SPLITS, dtype=object)[np.searchsorted(bounds, u, side="right")], index=patient_id.index)


def check_patient_leak(table: pd.DataFrame, where: str = "table") -> None:
    """Refuse a table in which one patient appears in more than one split."""
    n_splits = table.groupby("patient_id", sort=False)["split"].nunique()
    leaked = n_splits.index[n_splits > 1]
    if len(leaked):
        shown = ", ".join(map(str, leaked[:20])) + (" ..." if len(leaked) > 20 else "")
        raise MetadataError(
            f"{where}: {len(leaked)} patient(s) appear in more than one split ({shown}); splits must be "
            "patient-level. Fix the split column, or drop it and let cxrjax assign splits by patient hash."
        )


def validate_table(table: pd.DataFrame, where: str = "table") -> pd.DataFrame:
    """Check and normalise a canonical table; returns it with canonical column order and dtypes."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise MetadataError(f"{where}: missing canonical column(s) {missing}")
    extras = [c for c in table.columns if str(c).startswith(EXTRA_PREFIX)]
    t = table.loc[:, list(COLUMNS) + extras].reset_index(drop=True).copy()
    for c in ("image_id", "path", "patient_id", "study_id", "view", "laterality", "split", "report", "source"):
        t[c] = t[c].fillna("").astype(str).astype(object)
    t["study_order"] = pd.to_numeric(t["study_order"], errors="coerce").fillna(-1).astype(np.int64)
    for c in CHEXPERT_LABELS:
        t[c] = pd.to_numeric(t[c], errors="coerce").astype(np.float32)
        bad = t[c].notna() & ~t[c].isin(LABEL_VALUES)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise MetadataError(f"{where}: column {c!r} row {i} has label {float(t[c].iloc[i]):g}; labels are 1, 0, -1 or blank")
    for c, allowed in (("view", VIEWS), ("laterality", LATERALITIES), ("split", SPLITS)):
        bad = ~t[c].isin(allowed)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise MetadataError(f"{where}: column {c!r} row {i} has {t[c].iloc[i]!r}; expected one of {allowed}")
    for c in ("image_id", "patient_id", "study_id"):
        empty = t[c] == ""
        if empty.any():
            raise MetadataError(f"{where}: {int(empty.sum())} row(s) with empty {c!r} (first: row {int(np.flatnonzero(empty)[0])})")
    dup = t["image_id"].duplicated(keep=False)
    if dup.any():
        raise MetadataError(f"{where}: duplicate image_id(s) {sorted(set(t.loc[dup, 'image_id']))[:10]}")
    study_patients = t.groupby("study_id", sort=False)["patient_id"].nunique()
    if (study_patients > 1).any():
        raise MetadataError(
            f"{where}: study_id(s) shared by several patients {list(study_patients.index[study_patients > 1][:10])}; "
            "study ids must be unique over the table (prefix them with the patient id)"
        )
    check_patient_leak(t, where)
    return t


def empty_labels(n: int) -> dict[str, np.ndarray]:
    """All-blank label columns for adapters whose dataset has no CheXpert labels."""
    return {c: np.full(n, np.nan, np.float32) for c in CHEXPERT_LABELS}
