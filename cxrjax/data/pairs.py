"""MedAug pair groups: for every image, the images it may be paired with, as a CSR index.

MedAug (Vu et al., MLHC 2021) builds a MoCo positive pair from two *different* images of one patient
chosen with metadata. A strategy is declarative: positives always share the patient, and the
strategy says whether they must share the study (`same`), must come from another study
(`different`) or either (`any`), and likewise for laterality (frontal / lateral).

Choices made here (one rule for every strategy):

* **Groups hold OTHER images only** (`include_self=False`, the default): the positive is a different
  image whenever one qualifies, which is the point of the method. An image for which no other image
  qualifies falls back to itself (two augmentations of one image, i.e. instance discrimination) and
  is flagged in `PairIndex.fallback`.
* `include_self=True` reproduces MedAug's eq. 2 exactly: the image itself is added to its own group
  for every strategy, so self-pairs happen with probability 1/|group|.
* `fallback[i]` means "no image other than i qualifies" (the group is exactly ``[i]``), with or
  without `include_self`; the `instance` strategy is therefore all-fallback by definition.
* Laterality `unknown` matches only under laterality `any`: under `same`/`different` such an image
  neither gets nor serves as a candidate (it falls back to itself).
* Study identity is the full `study_id` (MedAug's code kept only the last digit of the study number,
  merging study10 with study0; we do not).

Groups are computed once, fully vectorised: rows are sorted by patient, every within-patient
(query, candidate) pair is generated with `np.repeat`/`np.arange` arithmetic (sum over patients of
count**2 pairs; ~2.2 M for the CheXpert train table, processed in bounded chunks), filtered by one
predicate, and scattered into CSR order without a sort. Hard negatives from metadata reuse the same
builder with a different predicate and no fallback.

Sampling is counter-based: the partner of query row r in epoch e under seed s is a pure function of
(s, e, r) through a splitmix64 hash, so it does not depend on batch composition, order, sharding or
the number of hosts, and it changes from epoch to epoch (MedAug re-draws every time x is loaded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.data.schema import LATERALITIES

__all__ = [
    "Strategy",
    "STRATEGIES",
    "BEST_STRATEGY",
    "HARD_NEGATIVES",
    "PairIndex",
    "PairIndexError",
    "get_strategy",
    "build_pair_index",
    "build_hard_negative_index",
    "metadata_codes",
    "save_pair_index",
    "load_pair_index",
    "group_size_stats",
    "with_self",
    "check_hard_negatives_compatible",
    "sample_positive",
    "positive_of",
    "sample_hard_negatives",
]

_MATCH = ("same", "different", "any")
_ROLES = ("positive", "hard_negative")
_UNKNOWN = LATERALITIES.index("unknown")
_FORMAT_VERSION = 1


class PairIndexError(ValueError):
    """A bad pair-index file or argument; the message names the file / value at fault."""


@dataclass(frozen=True)
class Strategy:
    """Which images of the same patient may be paired with a query.

    study / laterality: 'same', 'different' or 'any' (relative to the query image).
    instance: the group is the image alone (plain MoCo instance discrimination); study and
    laterality are then ignored.
    """

    name: str
    study: str = "any"
    laterality: str = "any"
    instance: bool = False

    def __post_init__(self):
        for field, value in (("study", self.study), ("laterality", self.laterality)):
            if value not in _MATCH:
                raise ValueError(f"Strategy {self.name!r}: {field}={value!r}; expected one of {_MATCH}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Strategy":
        return cls(**d)


def _grid(study: str, laterality: str) -> Strategy:
    return Strategy(f"study-{study}_lat-{laterality}", study, laterality)


STRATEGIES: dict[str, Strategy] = {
    "instance": Strategy("instance", instance=True),
    **{s.name: s for s in (_grid(st, lat) for st in _MATCH for lat in _MATCH)},
    # Add a strategy with one line, e.g.  "my-name": Strategy("my-name", study="same", laterality="different"),
}
BEST_STRATEGY = "study-same_lat-any"  # MedAug's best (same patient, same study, all lateralities)

# Hard negatives chosen from metadata (MedAug §4.3 found these do not help; kept as an option to
# measure). They are pair groups like positives, built by the same machinery, without fallback.
# MedAug's loss-time "hard" negatives (queue keys with the query's laterality) and its false-negative
# masking (same patient / study) need only `metadata_codes`, not an index.
HARD_NEGATIVES: dict[str, Strategy] = {
    "patient-other-study": Strategy("patient-other-study", study="different", laterality="any"),
    "study-other-laterality": Strategy("study-other-laterality", study="same", laterality="different"),
}


def get_strategy(name: str | Strategy) -> Strategy:
    """The registered strategy called `name` (a Strategy passes through)."""
    if isinstance(name, Strategy):
        return name
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown pair strategy {name!r}; valid: {sorted(STRATEGIES)}") from None


@dataclass
class PairIndex:
    """CSR pair groups over the rows of a canonical table.

    The group of row i is ``members[offsets[i]:offsets[i+1]]`` (int32 table rows, ascending).
    role 'positive': never empty (fallback rows hold ``[i]``). role 'hard_negative': may be empty.
    """

    offsets: np.ndarray  # int64, (n+1,)
    members: np.ndarray  # int32, (offsets[-1],)
    fallback: np.ndarray  # bool, (n,)
    strategy: Strategy
    include_self: bool = False
    role: str = "positive"

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def group(self, i: int) -> np.ndarray:
        return self.members[self.offsets[i]:self.offsets[i + 1]]

    def spec(self) -> dict:
        return {
            "format_version": _FORMAT_VERSION,
            "strategy": self.strategy.to_dict(),
            "include_self": bool(self.include_self),
            "role": self.role,
        }


# ----------------------------------------------------------------------------------------------
# Building


def metadata_codes(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Integer codes per row (table order) for loss-time masking of MoCo queue entries.

    patient / study: dense codes by first appearance (0..n_patients-1, 0..n_studies-1; studies are
    coded by the full study_id, which is unique over the table). laterality: fixed vocabulary index
    into `schema.LATERALITIES` (frontal 0, lateral 1, unknown 2), so codes agree across tables;
    note that two 'unknown' images compare equal.
    """
    _require(table, ("patient_id", "study_id", "laterality"))
    patient = pd.factorize(table["patient_id"], sort=False)[0]
    study = pd.factorize(table["study_id"], sort=False)[0]
    lat_str = table["laterality"].astype(str).to_numpy()
    lat = np.full(len(table), _UNKNOWN, np.int32)
    for i, name in enumerate(LATERALITIES):
        lat[lat_str == name] = i
    bad = ~np.isin(lat_str, LATERALITIES)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"laterality row {i} is {lat_str[i]!r}; expected one of {LATERALITIES}")
    if (patient < 0).any() or (study < 0).any():
        raise ValueError("patient_id / study_id must not be missing (NaN)")
    return {"patient": patient.astype(np.int32), "study": study.astype(np.int32), "laterality": lat}


def _require(table, cols):
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"expected the canonical metadata table (a pandas DataFrame), got {type(table).__name__}")
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise ValueError(f"metadata table lacks column(s) {missing} needed for pair groups")


def _accept(strategy: Strategy, codes: dict, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The one predicate: may candidate row c serve query row q (same patient already holds)?

    Self-pairs (q == c) are rejected here; the builder adds self by `include_self` / fallback.
    """
    ok = q != c
    if strategy.instance:
        return np.zeros_like(ok)
    if strategy.study != "any":
        same = codes["study"][q] == codes["study"][c]
        ok &= same if strategy.study == "same" else ~same
    if strategy.laterality != "any":
        lq, lc = codes["laterality"][q], codes["laterality"][c]
        ok &= (lq != _UNKNOWN) & (lc != _UNKNOWN)
        ok &= (lq == lc) if strategy.laterality == "same" else (lq != lc)
    return ok


def _build(table: pd.DataFrame, strategy: Strategy, include_self: bool, role: str,
           max_pairs_per_chunk: int) -> PairIndex:
    """Generic builder: all within-patient (query, candidate) pairs -> predicate -> CSR."""
    codes = metadata_codes(table)
    n = len(table)
    patient = codes["patient"]
    order = np.argsort(patient, kind="stable")  # rows of one patient contiguous, ascending within
    sizes = np.bincount(patient)                  # patient codes are dense 0..P-1
    starts = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=starts[1:])
    block_pairs = sizes.astype(np.int64) ** 2
    # Chunk whole patients so one chunk holds at most ~max_pairs_per_chunk pairs (a single patient
    # larger than that is its own chunk): bounded memory on any table, still no per-row loop.
    chunk_id = np.cumsum(block_pairs) // max(int(max_pairs_per_chunk), 1)
    cuts = np.flatnonzero(np.diff(chunk_id)) + 1
    bounds = np.concatenate([[0], cuts, [len(sizes)]])

    kept_q, kept_c = [], []
    no_other = np.zeros(n, bool)
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        if b1 <= b0:
            continue
        bs = sizes[b0:b1].astype(np.int64)
        p0, p1 = int(starts[b0]), int(starts[b1])
        # each sorted position i (patient block size s, block start st) pairs with st..st+s-1
        pos_size = np.repeat(bs, bs)                               # (p1-p0,)
        pos_start = np.repeat(starts[b0:b1] - p0, bs)
        m = int(pos_size.sum())
        first = np.zeros(len(pos_size), np.int64)
        np.cumsum(pos_size[:-1], out=first[1:])
        qpos = np.repeat(np.arange(p1 - p0, dtype=np.int64), pos_size)
        cpos = np.repeat(pos_start - first, pos_size) + np.arange(m, dtype=np.int64)
        rows = order[p0:p1]
        q, c = rows[qpos], rows[cpos]
        other = _accept(strategy, codes, q, c)
        # all pairs of a query are in this chunk (patients are never split), so "no other image
        # qualifies" is known here; the self pair (q == c) is in the generated set already.
        no_other_pos = np.bincount(qpos[other], minlength=p1 - p0) == 0
        no_other[rows] = no_other_pos
        is_self = qpos == cpos
        if include_self:
            keep = other | is_self
        elif role == "positive":
            keep = other | (is_self & no_other_pos[qpos])  # empty group -> [self]
        else:
            keep = other
        kept_q.append(q[keep])
        kept_c.append(c[keep])
    q = np.concatenate(kept_q) if kept_q else np.zeros(0, np.int64)
    c = np.concatenate(kept_c) if kept_c else np.zeros(0, np.int64)
    counts = np.bincount(q, minlength=n)

    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    # Kept pairs are grouped by query (queries in sorted-position order) with candidates ascending;
    # scatter each query's run to its CSR slot in table-row order -- no sort needed.
    run_counts = counts[order]
    run_first = np.zeros(n, np.int64)
    np.cumsum(run_counts[:-1], out=run_first[1:])
    dest = np.repeat(offsets[order] - run_first, run_counts) + np.arange(len(c), dtype=np.int64)
    members = np.empty(len(c), np.int32)
    members[dest] = c
    fallback = no_other if role == "positive" else np.zeros(n, bool)
    return PairIndex(offsets, members, fallback.astype(bool), strategy, bool(include_self), role)


def build_pair_index(table: pd.DataFrame, strategy: str | Strategy, include_self: bool = False,
                     *, max_pairs_per_chunk: int = 1 << 24) -> PairIndex:
    """Positive-pair groups for every row of the canonical `table` under `strategy`.

    Needs columns patient_id, study_id, laterality. Groups hold other images of the same patient
    that satisfy the strategy; an empty group becomes ``[self]`` with ``fallback=True``.
    `include_self=True` adds the image itself to every group (MedAug eq. 2, self-pairs happen).
    Memory is bounded by `max_pairs_per_chunk` candidate pairs at a time (patients are never split,
    so a single patient with c images costs c*c pairs; CheXpert's largest has 92 images).
    """
    strategy = get_strategy(strategy)
    _require(table, ("patient_id", "study_id", "laterality"))
    return _build(table, strategy, include_self, "positive", max_pairs_per_chunk)


def build_hard_negative_index(table: pd.DataFrame, kind: str, *, max_pairs_per_chunk: int = 1 << 24) -> PairIndex:
    """Metadata hard-negative groups (`HARD_NEGATIVES`); empty groups allowed, never includes self."""
    try:
        spec = HARD_NEGATIVES[kind]
    except KeyError:
        raise ValueError(f"unknown hard-negative kind {kind!r}; valid: {sorted(HARD_NEGATIVES)}") from None
    _require(table, ("patient_id", "study_id", "laterality"))
    return _build(table, spec, False, "hard_negative", max_pairs_per_chunk)


def with_self(index: PairIndex, include: bool) -> PairIndex:
    """The same groups under the other self rule, without rebuilding from the table.

    include=True: MedAug's eq. 2 -- every row's group also holds the row itself, so the query is drawn
    as its own partner with probability 1 / |group| (a fallback row's group stays [self]).
    include=False: cxrjax's rule -- the row is removed from its group unless nothing else is left.
    Vectorised over the CSR arrays (O(members)); members stay ascending within a group.
    """
    if index.role != "positive":
        raise ValueError("with_self applies to positive pair groups, not to hard negatives")
    if bool(index.include_self) == bool(include):
        return index
    n = index.n
    q = np.repeat(np.arange(n, dtype=np.int64), index.sizes)
    members = index.members.astype(np.int64)
    if include:
        add = ~index.fallback  # fallback rows already hold exactly [self]
        q = np.concatenate([q, np.flatnonzero(add)])
        members = np.concatenate([members, np.flatnonzero(add)])
    else:
        keep = (members != q) | index.fallback[q]
        q, members = q[keep], members[keep]
    order = np.lexsort((members, q))
    q, members = q[order], members[order]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(q, minlength=n), out=offsets[1:])
    return PairIndex(offsets, members.astype(np.int32), index.fallback.copy(), index.strategy, bool(include), index.role)


def check_hard_negatives_compatible(strategy: str | Strategy, hard_negatives: str | None) -> None:
    """Refuse metadata hard negatives that the positive strategy may also draw as positives.

    E.g. 'patient-other-study' hard negatives (same patient, another study) with positives from any
    or different studies: one image would be pulled towards the query and pushed away from it.
    The message names both settings (config.data.strategy / config.data.hard_negatives)."""
    if not hard_negatives:
        return
    strategy = get_strategy(strategy)
    try:
        hard = HARD_NEGATIVES[hard_negatives]
    except KeyError:
        raise ValueError(f"unknown hard-negative kind {hard_negatives!r}; valid: {sorted(HARD_NEGATIVES)}") from None
    if strategy.instance:
        return

    def allowed(match):
        return {"same": {"same"}, "different": {"different"}, "any": {"same", "different"}}[match]

    if allowed(strategy.study) & allowed(hard.study) and allowed(strategy.laterality) & allowed(hard.laterality):
        raise ValueError(
            f"config.data.hard_negatives={hard_negatives!r} (same patient, study {hard.study}, laterality "
            f"{hard.laterality}) conflicts with config.data.strategy={strategy.name!r}, which draws positives from "
            f"those same images; use a same-study strategy with 'patient-other-study', or drop the hard negatives")


# ----------------------------------------------------------------------------------------------
# Persistence


def save_pair_index(path: str | os.PathLike, index: PairIndex) -> Path:
    """Write `index` to `path` (.npz: offsets, members, fallback, spec JSON); atomic replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            offsets=np.asarray(index.offsets, np.int64),
            members=np.asarray(index.members, np.int32),
            fallback=np.asarray(index.fallback, bool),
            spec=np.array(json.dumps(index.spec(), sort_keys=True)),
        )
    os.replace(tmp, path)
    return path


def load_pair_index(path: str | os.PathLike, n_rows: int | None = None) -> PairIndex:
    """Read and validate a pair index written by `save_pair_index`.

    n_rows: if given, the index must cover exactly this many table rows.
    """
    path = Path(path)

    def fail(msg):
        raise PairIndexError(f"pair index {path}: {msg}")

    if not path.exists():
        fail("file not found (run prepare to build the pair groups)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("offsets", "members", "fallback", "spec") if k not in z.files]
            if missing:
                fail(f"missing array(s) {missing}; not a cxrjax pair index (rebuild it)")
            offsets, members, fallback = z["offsets"], z["members"], z["fallback"]
            spec_json = str(z["spec"][()])
    except PairIndexError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        fail(f"unreadable or corrupted ({type(e).__name__}: {e}); delete it and rebuild")
    try:
        spec = json.loads(spec_json)
        strategy = Strategy.from_dict(spec["strategy"])
        include_self = bool(spec["include_self"])
        role = spec.get("role", "positive")
    except (ValueError, KeyError, TypeError) as e:
        fail(f"bad spec {spec_json!r} ({e})")
    if role not in _ROLES:
        fail(f"role {role!r}; expected one of {_ROLES}")
    if offsets.ndim != 1 or members.ndim != 1 or fallback.ndim != 1:
        fail("offsets, members and fallback must be 1-D")
    if not np.issubdtype(offsets.dtype, np.integer) or not np.issubdtype(members.dtype, np.integer):
        fail(f"offsets/members must be integers, got {offsets.dtype}/{members.dtype}")
    if fallback.dtype != bool:
        fail(f"fallback must be bool, got {fallback.dtype}")
    n = len(offsets) - 1
    if n < 0:
        fail("offsets is empty (needs n+1 entries)")
    if len(fallback) != n:
        fail(f"fallback has {len(fallback)} entries but offsets describe {n} rows")
    if n_rows is not None and n != n_rows:
        fail(f"covers {n} rows but the table has {n_rows}; rebuild it for this table")
    if offsets[0] != 0:
        fail(f"offsets[0] = {offsets[0]}, expected 0")
    if (np.diff(offsets) < 0).any():
        fail(f"offsets not monotone (first decrease at row {int(np.flatnonzero(np.diff(offsets) < 0)[0])})")
    if offsets[-1] != len(members):
        fail(f"offsets[-1] = {offsets[-1]} but there are {len(members)} members")
    if len(members) and (members.min() < 0 or members.max() >= n):
        fail(f"members out of range [0, {n}) (min {members.min()}, max {members.max()})")
    if role == "positive" and n and (np.diff(offsets) == 0).any():
        fail("a positive group is empty (every row needs at least itself)")
    return PairIndex(offsets.astype(np.int64), members.astype(np.int32), fallback, strategy, include_self, role)


# ----------------------------------------------------------------------------------------------
# Statistics


def group_size_stats(index: PairIndex) -> dict:
    """Summary for the run manifest. Group sizes exclude fallback rows (whose group is [self]).

    self_pair_rate_*: the share of draws that pair an image with itself (two augmentations of one
    image) under each rule, averaged over images: cxrjax's exclude-self rule self-pairs only the
    fallback rows; MedAug's eq. 2 (include self) draws the query itself with probability 1 / |group|."""
    sizes = index.sizes[~index.fallback]
    n_fb = int(index.fallback.sum())
    n = index.n
    other = index.sizes - (1 if index.include_self else 0)  # candidates other than the image itself
    other = np.where(index.fallback, 0, other)

    def stat(f):
        return float(f(sizes)) if len(sizes) else 0.0

    return {
        "strategy": index.strategy.name,
        "include_self": bool(index.include_self),
        "role": index.role,
        "n_images": int(n),
        "n_fallback": n_fb,
        "frac_fallback": n_fb / n if n else 0.0,
        "self_pair_rate_exclude_self": n_fb / n if n else 0.0,
        "self_pair_rate_include_self": float(np.mean(1.0 / (other + 1))) if n else 0.0,
        "group_size_min": int(sizes.min()) if len(sizes) else 0,
        "group_size_median": stat(np.median),
        "group_size_mean": stat(np.mean),
        "group_size_p95": stat(lambda s: np.percentile(s, 95)),
        "group_size_max": int(sizes.max()) if len(sizes) else 0,
        "n_pairs": int(len(index.members)),
    }


# ----------------------------------------------------------------------------------------------
# Counter-based sampling

_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM_POSITIVE = 0x5A17_0001
_STREAM_HARD_NEG = 0x5A17_0002


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _splitmix64_int(x: int) -> int:
    """The same finaliser on a Python int (for per-call keys: no array overhead)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _key(seed: int, epoch: int, stream: int) -> np.uint64:
    k = _splitmix64_int(int(seed) & _M64)
    k = _splitmix64_int(k ^ (int(epoch) & _M64))
    return np.uint64(_splitmix64_int(k ^ stream))


def _uniform_index(h: np.ndarray, size: np.ndarray) -> np.ndarray:
    """floor(u * size) with u the top 32 bits of h (bias <= size / 2**32)."""
    return (((h >> np.uint64(32)) * size.astype(np.uint64)) >> np.uint64(32)).astype(np.int64)


def _check_rows(index: PairIndex, rows) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be integer table rows, got dtype {rows.dtype}")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= index.n):
        raise IndexError(f"rows out of range [0, {index.n}) (min {rows.min()}, max {rows.max()})")
    return rows


def sample_positive(index: PairIndex, rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One partner per query row, uniform over its group, a pure function of (seed, epoch, row).

    Independent of batch composition / order; changes across epochs. Fallback rows return themselves.
    """
    rows = _check_rows(index, rows)
    start = index.offsets[rows]
    size = index.offsets[rows + 1] - start
    if (size == 0).any():
        raise ValueError("empty group in a positive index (use sample_hard_negatives for hard negatives)")
    with np.errstate(over="ignore"):
        h = _splitmix64(rows.astype(np.uint64) ^ _key(seed, epoch, _STREAM_POSITIVE))
    return index.members[start + _uniform_index(h, size)].astype(np.int64)


def positive_of(index: PairIndex, row: int, seed: int, epoch: int) -> int:
    """`sample_positive` for one row, in Python int arithmetic: the same partner, without the ~15 numpy
    calls on 1-element arrays that made it 10x slower per example in the input pipeline."""
    row = int(row)
    if not 0 <= row < index.n:
        raise IndexError(f"row {row} out of range [0, {index.n})")
    start, end = int(index.offsets[row]), int(index.offsets[row + 1])
    if end == start:
        raise ValueError("empty group in a positive index (use sample_hard_negatives for hard negatives)")
    h = _splitmix64_int(row ^ int(_key(seed, epoch, _STREAM_POSITIVE)))
    return int(index.members[start + (((h >> 32) * (end - start)) >> 32)])


def sample_hard_negatives(index: PairIndex, rows: np.ndarray, k: int, seed: int, epoch: int) -> np.ndarray:
    """(len(rows), k) hard negatives per query, drawn uniformly WITH replacement from its group.

    Deterministic from (seed, epoch, row, slot); rows whose group is empty get -1 in every slot.
    """
    rows = _check_rows(index, rows).reshape(-1)
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    start = index.offsets[rows][:, None]
    size = (index.offsets[rows + 1][:, None] - start)
    with np.errstate(over="ignore"):
        base = _splitmix64(rows.astype(np.uint64) ^ _key(seed, epoch, _STREAM_HARD_NEG))
        h = _splitmix64(base[:, None] + np.arange(k, dtype=np.uint64)[None, :] * _GOLDEN)
    pick = _uniform_index(h, np.broadcast_to(size, h.shape))
    out = np.full((len(rows), k), -1, np.int64)
    ok = np.broadcast_to(size > 0, out.shape)
    if len(index.members):
        idx = np.where(ok, start + pick, 0)
        out[ok] = index.members[idx[ok]]
    return out
