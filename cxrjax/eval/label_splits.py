"""Externally fixed label splits: the training images of each (fraction, seed) read from CSV files, as the
published evaluations ship them (MedAug: `label_fractions/train_semi_0.01-it{0..4}.csv`, five 1 % splits
drawn per image), instead of cxrjax's own per-patient draw.

A split file is a CSV with one row per training image, identified by either
  * an `image_id` column holding the prepared table's image ids, or
  * a `Path` / `path` column: a CheXpert-style path is matched on its `patientN/studyM/viewK_*` tail (the
    file's absolute prefix -- MedAug's is `/deep/group/CheXpert/CheXpert-v1.0-small/train/` -- is
    ignored; CheXpert's image id IS that tail without the extension), any other path on the table's
    `path` column (exactly, or as its suffix after a '/').
Rows that match nothing, or an image of the evaluation's test split (a leak), or repeat an earlier row,
are *unmatched*: each one is named (file:line, the value, why) and left out, never silently dropped.
Labels come from the prepared table (the file's own label columns are compared and disagreements
counted, not used).

`files_for(template, fractions, seeds)` expands a path template such as
`.../train_semi_{fraction}-it{seed}.csv.gz` ({fraction} is written like 0.01 / 0.001; fraction 1.0 needs
no file: it is the whole training split).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd

_CHEXPERT_TAIL = re.compile(r"(patient\d+/study\d+/[^/]+?)(?:\.[^./]*)?$")
ID_COLUMNS = ("image_id",)
PATH_COLUMNS = ("Path", "path")


def chexpert_tail(path: str) -> str | None:
    """'/deep/.../train/patient00077/study1/view2_lateral.jpg' -> 'patient00077/study1/view2_lateral'."""
    m = _CHEXPERT_TAIL.search(str(path).strip())
    return m.group(1) if m else None


def format_fraction(fraction: float) -> str:
    """0.01 -> '0.01', 0.001 -> '0.001', 0.1 -> '0.1' (the spelling of MedAug's file names)."""
    return repr(float(fraction))


def files_for(template: str, fractions, seeds) -> dict[tuple[float, int], Path]:
    """{(fraction, seed): file} for every fraction < 1 and seed; a missing file is a one-line error."""
    if "{seed}" not in template or "{fraction}" not in template:
        raise ValueError(f"label_splits.files={template!r} must contain {{fraction}} and {{seed}}, e.g. "
                         "train_semi_{fraction}-it{seed}.csv.gz")
    out, missing = {}, []
    for f in fractions:
        if float(f) >= 1.0:
            continue  # all labels: the whole training split
        for s in seeds:
            p = Path(template.format(fraction=format_fraction(f), seed=int(s))).expanduser()
            (out.__setitem__((float(f), int(s)), p) if p.is_file() else missing.append(str(p)))
    if missing:
        raise FileNotFoundError(f"label split file(s) not found: {', '.join(missing[:5])}"
                                f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''} "
                                f"(from label_splits.files={template!r}; fractions {list(fractions)}, seeds {list(seeds)})")
    return out


@dataclasses.dataclass
class SplitMatch:
    file: str
    rows: np.ndarray  # table rows of the matched images, in file order, int64
    lines: np.ndarray  # their lines in the file (header = 1)
    unmatched: pd.DataFrame  # file, line, value, reason
    label_disagreements: dict  # CheXpert column -> rows whose file label differs from the table's

    @property
    def n_file_rows(self) -> int:
        return len(self.rows) + len(self.unmatched)


def read_split_file(path: str | Path) -> tuple[pd.DataFrame, str]:
    """The file as strings (ids keep leading zeros) and the column that identifies the images."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: cannot read as CSV ({type(e).__name__}: {e})") from None
    for col in ID_COLUMNS + PATH_COLUMNS:
        if col in df.columns:
            return df, col
    raise ValueError(f"{path}: no image column; expected one of {list(ID_COLUMNS + PATH_COLUMNS)}, "
                     f"found {list(df.columns)[:20]}")


class TableIndex:
    """Lookups from the prepared table: image id, CheXpert path tail, path and path suffixes -> row."""

    def __init__(self, table: pd.DataFrame):
        self.table = table
        ids = table["image_id"].astype(str).to_numpy()
        self.by_id = pd.Series(np.arange(len(table)), index=ids)
        self.by_id = self.by_id[~self.by_id.index.duplicated()]
        paths = table["path"].astype(str).to_numpy() if "path" in table else np.array([], str)
        tails = pd.Series([chexpert_tail(p) for p in paths], dtype=object)
        self.by_tail = pd.Series(np.arange(len(paths)), index=tails.to_numpy())
        self.by_tail = self.by_tail[self.by_tail.index.notna() & ~self.by_tail.index.duplicated()]
        self.by_path = pd.Series(np.arange(len(paths)), index=paths)
        self.by_path = self.by_path[~self.by_path.index.duplicated()]

    def lookup(self, value: str, column: str) -> int:
        """The table row of one file value, or -1."""
        value = value.strip()
        if column in ID_COLUMNS:
            return int(self.by_id.get(value, -1))
        tail = chexpert_tail(value)
        if tail is not None:
            row = self.by_id.get(tail, self.by_tail.get(tail, -1))
            if row >= 0:
                return int(row)
        row = self.by_path.get(value, -1)
        if row < 0:  # a path with another prefix: the longest suffix of it the table knows
            parts = value.replace("\\", "/").split("/")
            for i in range(1, len(parts)):
                row = self.by_path.get("/".join(parts[i:]), -1)
                if row >= 0:
                    break
        return int(row)


def match_file(path: str | Path, index: TableIndex, *, test_split: str | None = "test",
               label_columns=()) -> SplitMatch:
    """Map one split file onto the table: matched rows (file order) + every unmatched row with its reason."""
    df, column = read_split_file(path)
    table = index.table
    rows = np.array([index.lookup(v, column) for v in df[column].to_numpy()], np.int64)
    reason = np.full(len(df), "", object)
    reason[rows < 0] = f"no image of the table matches this {column}"
    found = rows >= 0
    if test_split is not None and "split" in table:
        in_test = np.zeros(len(df), bool)
        in_test[found] = table["split"].to_numpy()[rows[found]] == test_split
        reason[in_test] = f"the image is in the evaluation's test split {test_split!r} (a training label there would leak)"
    seen = {}
    for i in np.flatnonzero(found & (reason == "")):
        first = seen.setdefault(int(rows[i]), i)
        if first != i:
            reason[i] = f"the same image as line {first + 2}"
    ok = reason == ""
    unmatched = pd.DataFrame({"file": str(path), "line": np.flatnonzero(~ok) + 2,  # header = line 1
                              "value": df[column].to_numpy()[~ok], "reason": reason[~ok]})
    disagree = {}
    for c in label_columns:
        if c in df.columns and c in table:
            mine = pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64)[ok]
            theirs = table[c].to_numpy(np.float64)[rows[ok]]
            differ = ~((mine == theirs) | (np.isnan(mine) & np.isnan(theirs)))
            disagree[c] = int(differ.sum())
    return SplitMatch(str(path), rows[ok], np.flatnonzero(ok) + 2, unmatched, disagree)
