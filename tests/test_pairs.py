"""Tests for cxrjax.data.pairs: MedAug pair groups, hard negatives, persistence, sampling."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from cxrjax.data.pairs import (
    HARD_NEGATIVES,
    STRATEGIES,
    PairIndexError,
    Strategy,
    build_hard_negative_index,
    build_pair_index,
    get_strategy,
    check_hard_negatives_compatible,
    group_size_stats,
    load_pair_index,
    metadata_codes,
    positive_of,
    sample_hard_negatives,
    sample_positive,
    save_pair_index,
    with_self,
)

# Hand-made table; patients interleaved so table order != patient order.
#   A: s1 = frontal(0) + lateral(2); s2 = two frontals (3, 5); s3 = one unknown-laterality image (7)
#   B: s1 = frontal(1); s2 = lateral(6)
#   C: a single image (4)
ROWS = [
    ("A", "A/s1", "frontal"),   # 0
    ("B", "B/s1", "frontal"),   # 1
    ("A", "A/s1", "lateral"),   # 2
    ("A", "A/s2", "frontal"),   # 3
    ("C", "C/s1", "frontal"),   # 4
    ("A", "A/s2", "frontal"),   # 5
    ("B", "B/s2", "lateral"),   # 6
    ("A", "A/s3", "unknown"),   # 7
]


def _table(rows=ROWS):
    return pd.DataFrame(rows, columns=["patient_id", "study_id", "laterality"])


FB = None  # "no other image qualifies" -> group is [self], fallback=True
# Expected groups of OTHER images (include_self=False), worked out by hand.
EXPECTED = {
    "instance": [FB] * 8,
    "study-same_lat-same": [FB, FB, FB, [5], FB, [3], FB, FB],
    "study-same_lat-different": [[2], FB, [0], FB, FB, FB, FB, FB],
    "study-same_lat-any": [[2], FB, [0], [5], FB, [3], FB, FB],
    "study-different_lat-same": [[3, 5], FB, FB, [0], FB, [0], FB, FB],
    "study-different_lat-different": [FB, [6], [3, 5], [2], FB, [2], [1], FB],
    "study-different_lat-any": [[3, 5, 7], [6], [3, 5, 7], [0, 2, 7], FB, [0, 2, 7], [1], [0, 2, 3, 5]],
    "study-any_lat-same": [[3, 5], FB, FB, [0, 5], FB, [0, 3], FB, FB],
    "study-any_lat-different": [[2], [6], [0, 3, 5], [2], FB, [2], [1], FB],
    "study-any_lat-any": [[2, 3, 5, 7], [6], [0, 3, 5, 7], [0, 2, 5, 7], FB, [0, 2, 3, 7], [1], [0, 2, 3, 5]],
}
EXPECTED_HARD = {
    "patient-other-study": [[3, 5, 7], [6], [3, 5, 7], [0, 2, 7], [], [0, 2, 7], [1], [0, 2, 3, 5]],
    "study-other-laterality": [[2], [], [0], [], [], [], [], []],
}


def _check_csr(idx, n):
    assert idx.offsets.dtype == np.int64 and idx.offsets.shape == (n + 1,)
    assert idx.members.dtype == np.int32
    assert idx.fallback.dtype == bool and idx.fallback.shape == (n,)
    assert idx.offsets[0] == 0 and idx.offsets[-1] == len(idx.members)
    assert (np.diff(idx.offsets) >= 0).all()
    if len(idx.members):
        assert idx.members.min() >= 0 and idx.members.max() < n
    for i in range(n):
        g = idx.group(i)
        assert (np.diff(g) > 0).all(), f"row {i} members not strictly ascending: {g}"


# ------------------------------------------------------------------------------------------------
# Strategies registry


def test_registry_has_instance_and_nine_grid_strategies():
    assert set(STRATEGIES) == set(EXPECTED)
    assert len(STRATEGIES) == 10
    s = get_strategy("study-same_lat-any")
    assert (s.study, s.laterality, s.instance) == ("same", "any", False)
    assert get_strategy(s) is s
    with pytest.raises(ValueError, match="study-same_lat-any"):
        get_strategy("study-sam_lat-any")
    with pytest.raises(ValueError, match="study"):
        Strategy("bad", study="sometimes")


# ------------------------------------------------------------------------------------------------
# Exact memberships


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_groups_without_self(name):
    idx = build_pair_index(_table(), name)
    _check_csr(idx, 8)
    assert idx.strategy == STRATEGIES[name] and idx.include_self is False
    for i, exp in enumerate(EXPECTED[name]):
        if exp is FB:
            assert idx.fallback[i], (name, i)
            assert idx.group(i).tolist() == [i], (name, i)
        else:
            assert not idx.fallback[i], (name, i)
            assert idx.group(i).tolist() == exp, (name, i)
            assert i not in exp


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_groups_with_self(name):
    idx = build_pair_index(_table(), name, include_self=True)
    _check_csr(idx, 8)
    assert idx.include_self is True
    for i, exp in enumerate(EXPECTED[name]):
        assert idx.group(i).tolist() == sorted(set(exp or []) | {i}), (name, i)
        assert idx.fallback[i] == (exp is FB), (name, i)


def test_unknown_laterality_only_matches_under_any():
    t = _table()
    for name, s in STRATEGIES.items():
        idx = build_pair_index(t, name)
        for i in range(8):
            if s.laterality != "any" and i != 7:
                assert 7 not in idx.group(i).tolist(), name
        if s.laterality != "any":
            assert idx.fallback[7] and idx.group(7).tolist() == [7]


def test_chunking_gives_identical_index():
    t = _table()
    for name in STRATEGIES:
        a = build_pair_index(t, name)
        for chunk in (1, 2, 5, 30):
            b = build_pair_index(t, name, max_pairs_per_chunk=chunk)
            np.testing.assert_array_equal(a.offsets, b.offsets)
            np.testing.assert_array_equal(a.members, b.members)
            np.testing.assert_array_equal(a.fallback, b.fallback)


def _brute(table, s: Strategy, include_self: bool):
    p, st, lat = (table[c].to_numpy() for c in ("patient_id", "study_id", "laterality"))
    groups, fb = [], []
    for i in range(len(table)):
        g = []
        for j in range(len(table)):
            if j == i or p[j] != p[i] or s.instance:
                continue
            if s.study == "same" and st[j] != st[i] or s.study == "different" and st[j] == st[i]:
                continue
            if s.laterality != "any":
                if "unknown" in (lat[i], lat[j]):
                    continue
                if (lat[i] == lat[j]) != (s.laterality == "same"):
                    continue
            g.append(j)
        fb.append(not g)
        groups.append(sorted(set(g) | {i}) if include_self or not g else g)
    return groups, fb


def test_random_table_matches_brute_force():
    rng = np.random.default_rng(0)
    n = 300
    pat = rng.integers(0, 40, n)
    stu = rng.integers(0, 4, n)
    t = pd.DataFrame({
        "patient_id": [f"p{x}" for x in pat],
        "study_id": [f"p{x}/s{y}" for x, y in zip(pat, stu)],
        "laterality": rng.choice(["frontal", "lateral", "unknown"], n, p=[0.6, 0.3, 0.1]),
    })
    for name, s in STRATEGIES.items():
        for inc in (False, True):
            idx = build_pair_index(t, name, include_self=inc, max_pairs_per_chunk=97)
            groups, fb = _brute(t, s, inc)
            _check_csr(idx, n)
            assert [idx.group(i).tolist() for i in range(n)] == groups, (name, inc)
            assert idx.fallback.tolist() == fb, (name, inc)


def test_with_self_converts_between_the_two_rules():
    """with_self gives exactly the index build_pair_index makes under the other rule, both ways."""
    rng = np.random.default_rng(1)
    n = 200
    pat = rng.integers(0, 30, n)
    t = pd.DataFrame({"patient_id": [f"p{x}" for x in pat],
                      "study_id": [f"p{x}/s{y}" for x, y in zip(pat, rng.integers(0, 3, n))],
                      "laterality": rng.choice(["frontal", "lateral", "unknown"], n, p=[0.6, 0.3, 0.1])})
    for name in STRATEGIES:
        without, with_ = build_pair_index(t, name), build_pair_index(t, name, include_self=True)
        for src, dst in ((without, with_), (with_, without)):
            got = with_self(src, dst.include_self)
            assert got.include_self == dst.include_self, name
            np.testing.assert_array_equal(got.offsets, dst.offsets)
            np.testing.assert_array_equal(got.members, dst.members)
            np.testing.assert_array_equal(got.fallback, dst.fallback)


def test_self_pair_rates_of_both_rules():
    """The manifest's self-pair rates, by hand on the 8-row table: study-same_lat-any groups (others)
    are 4 fallbacks + four pairs of two images -> eq. 2 draws self 1/1 x 4 + 1/2 x 4 of the time."""
    s = group_size_stats(build_pair_index(_table(), "study-same_lat-any"))
    assert s["self_pair_rate_exclude_self"] == 0.5
    assert s["self_pair_rate_include_self"] == pytest.approx((4 * 1 + 4 * 0.5) / 8)
    s2 = group_size_stats(build_pair_index(_table(), "study-same_lat-any", include_self=True))
    assert s2["self_pair_rate_include_self"] == s["self_pair_rate_include_self"]
    assert s2["self_pair_rate_exclude_self"] == s["self_pair_rate_exclude_self"]


@pytest.mark.parametrize("strategy, hard, refused", [
    ("study-same_lat-any", "patient-other-study", False), ("study-any_lat-any", "patient-other-study", True),
    ("study-different_lat-same", "patient-other-study", True), ("instance", "patient-other-study", False),
    ("study-same_lat-same", "study-other-laterality", False), ("study-same_lat-any", "study-other-laterality", True),
    ("study-different_lat-any", "study-other-laterality", False), ("study-any_lat-any", None, False)])
def test_hard_negatives_that_positives_may_draw_are_refused(strategy, hard, refused):
    if refused:
        with pytest.raises(ValueError, match=f"hard_negatives={hard!r}.*strategy={strategy!r}"):
            check_hard_negatives_compatible(strategy, hard)
    else:
        check_hard_negatives_compatible(strategy, hard)


def test_empty_and_single_row_tables():
    idx = build_pair_index(_table([]), "study-same_lat-any")
    assert idx.n == 0 and len(idx.members) == 0 and idx.offsets.tolist() == [0]
    idx = build_pair_index(_table([("P", "P/s", "frontal")]), "study-any_lat-any")
    assert idx.group(0).tolist() == [0] and idx.fallback.tolist() == [True]


def test_missing_column_is_a_clear_error():
    with pytest.raises(ValueError, match="laterality"):
        build_pair_index(_table().drop(columns="laterality"), "instance")


# ------------------------------------------------------------------------------------------------
# Hard negatives and codes


@pytest.mark.parametrize("kind", sorted(EXPECTED_HARD))
def test_hard_negative_groups_exact(kind):
    assert set(HARD_NEGATIVES) == set(EXPECTED_HARD)
    idx = build_hard_negative_index(_table(), kind)
    _check_csr(idx, 8)
    assert idx.role == "hard_negative" and not idx.fallback.any()
    assert [idx.group(i).tolist() for i in range(8)] == EXPECTED_HARD[kind]
    with pytest.raises(ValueError, match="patient-other-study"):
        build_hard_negative_index(_table(), "nope")


def test_metadata_codes():
    c = metadata_codes(_table())
    assert c["patient"].dtype == np.int32 and c["patient"].tolist() == [0, 1, 0, 0, 2, 0, 1, 0]
    assert c["study"].tolist() == [0, 1, 0, 2, 3, 2, 4, 5]
    assert c["laterality"].tolist() == [0, 0, 1, 0, 0, 0, 1, 2]  # frontal 0, lateral 1, unknown 2


# ------------------------------------------------------------------------------------------------
# Stats and persistence


def test_group_size_stats():
    idx = build_pair_index(_table(), "study-same_lat-any")
    s = group_size_stats(idx)
    assert s["n_images"] == 8 and s["n_fallback"] == 4 and s["frac_fallback"] == 0.5
    assert (s["group_size_min"], s["group_size_max"], s["group_size_mean"]) == (1, 1, 1.0)
    assert s["n_pairs"] == 8 and s["strategy"] == "study-same_lat-any"
    s = group_size_stats(build_pair_index(_table(), "study-any_lat-any"))
    assert s["n_fallback"] == 1 and s["group_size_max"] == 4 and s["group_size_min"] == 1
    assert s["group_size_median"] == 4.0


@pytest.mark.parametrize("maker", [
    lambda t: build_pair_index(t, "study-different_lat-any", include_self=True),
    lambda t: build_pair_index(t, "instance"),
    lambda t: build_hard_negative_index(t, "study-other-laterality"),
])
def test_save_load_round_trip(tmp_path, maker):
    idx = maker(_table())
    path = save_pair_index(tmp_path / "sub" / "pairs.npz", idx)
    assert path == tmp_path / "sub" / "pairs.npz" and path.exists()
    back = load_pair_index(path, n_rows=8)
    np.testing.assert_array_equal(back.offsets, idx.offsets)
    np.testing.assert_array_equal(back.members, idx.members)
    np.testing.assert_array_equal(back.fallback, idx.fallback)
    assert back.strategy == idx.strategy and back.include_self == idx.include_self and back.role == idx.role
    assert back.offsets.dtype == np.int64 and back.members.dtype == np.int32
    with pytest.raises(PairIndexError, match="table has 9"):
        load_pair_index(path, n_rows=9)


def test_load_rejects_corrupted_files(tmp_path):
    idx = build_pair_index(_table(), "study-any_lat-any")
    good = save_pair_index(tmp_path / "good.npz", idx)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(PairIndexError, match="garbage.npz"):
        load_pair_index(garbage)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(PairIndexError, match="truncated.npz"):
        load_pair_index(truncated)

    spec = np.array('{"strategy": {"name": "x", "study": "any", "laterality": "any", "instance": false}, '
                    '"include_self": false, "role": "positive"}')
    bad_cases = {
        "nonmono.npz": (dict(offsets=np.array([0, 2, 1, 3]), members=np.array([0, 1, 2], np.int32)), "monotone"),
        "count.npz": (dict(offsets=np.array([0, 1, 2, 4]), members=np.array([0, 1, 2], np.int32)), "members"),
        "range.npz": (dict(offsets=np.array([0, 1, 2, 3]), members=np.array([0, 1, 7], np.int32)), "out of range"),
    }
    for fname, (arrays, msg) in bad_cases.items():
        p = tmp_path / fname
        np.savez(p, fallback=np.zeros(3, bool), spec=spec, **arrays)
        with pytest.raises(PairIndexError, match=msg) as e:
            load_pair_index(p)
        assert fname in str(e.value)

    p = tmp_path / "nomembers.npz"
    np.savez(p, offsets=np.array([0]), fallback=np.zeros(0, bool), spec=spec)
    with pytest.raises(PairIndexError, match="nomembers.npz.*members"):
        load_pair_index(p)
    with pytest.raises(PairIndexError, match="missing.npz.*not found"):
        load_pair_index(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------------
# Sampling


def test_sample_positive_in_group_deterministic_and_epoch_dependent():
    idx = build_pair_index(_table(), "study-any_lat-any")
    rows = np.tile(np.arange(8), 50)
    a = sample_positive(idx, rows, seed=1, epoch=0)
    assert a.shape == rows.shape
    for r, m in zip(rows, a):
        assert m in idx.group(r)
    np.testing.assert_array_equal(a, sample_positive(idx, rows, seed=1, epoch=0))
    # fallback row 4 (single-image patient) pairs with itself; others never with themselves
    assert (a[rows == 4] == 4).all() and (a[rows != 4] != rows[rows != 4]).all()
    # one row's partner over 200 epochs / seeds: not constant
    r0 = np.zeros(1, np.int64)
    by_epoch = {int(sample_positive(idx, r0, 1, e)[0]) for e in range(200)}
    by_seed = {int(sample_positive(idx, r0, s, 0)[0]) for s in range(200)}
    assert by_epoch == set(idx.group(0).tolist()) and by_seed == set(idx.group(0).tolist())
    big = np.arange(8)
    diffs = sum((sample_positive(idx, big, 1, e) != sample_positive(idx, big, 1, e + 1)).sum() for e in range(50))
    assert diffs > 100  # 7 rows with groups of size 1..4; ~ 2/3 change per epoch


def test_positive_of_is_sample_positive_for_one_row():
    """The scalar path the input pipeline uses gives exactly the vectorised partners."""
    idx = build_pair_index(_table(), "study-any_lat-any")
    rows = np.arange(idx.n)
    for seed, epoch in [(0, 0), (1, 3), (2**63 + 5, 7), (12345, 2**40)]:
        want = sample_positive(idx, rows, seed, epoch)
        assert [positive_of(idx, r, seed, epoch) for r in rows] == want.tolist()
    with pytest.raises(IndexError, match="out of range"):
        positive_of(idx, idx.n, 0, 0)


def test_sample_positive_uniform_over_group_of_four():
    idx = build_pair_index(_table(), "study-any_lat-any")
    group = idx.group(0).tolist()
    assert len(group) == 4
    n = 40_000
    draws = np.concatenate([sample_positive(idx, np.zeros(1, np.int64), 7, e) for e in range(n)])
    counts = np.array([(draws == g).sum() for g in group])
    assert counts.sum() == n
    assert (np.abs(counts - n / 4) <= 0.15 * n / 4).all(), counts
    # also uniform across rows at one (seed, epoch): 10k patients x 5 images in one study; each
    # row's group is the other 4, and the drawn member's rank within the group is ~uniform
    many = pd.DataFrame({"patient_id": np.repeat(np.arange(10_000), 5).astype(str)})
    many["study_id"] = many["patient_id"] + "/s"
    many["laterality"] = "frontal"
    idx5 = build_pair_index(many, "study-same_lat-same")
    rows = np.arange(len(many))
    d = sample_positive(idx5, rows, 5, 3)
    rank = (idx5.members.reshape(-1, 4) == d[:, None]).argmax(1)
    assert (d != rows).all() and (idx5.members.reshape(-1, 4)[rows, rank] == d).all()
    c = np.bincount(rank, minlength=4)
    assert (np.abs(c - len(rows) / 4) <= 0.15 * len(rows) / 4).all(), c


def test_sample_positive_independent_of_batch_order_and_composition():
    rng = np.random.default_rng(3)
    n = 400
    pat = rng.integers(0, 30, n)
    t = pd.DataFrame({
        "patient_id": [f"p{x}" for x in pat],
        "study_id": [f"p{x}/s{y}" for x, y in zip(pat, rng.integers(0, 3, n))],
        "laterality": rng.choice(["frontal", "lateral"], n),
    })
    idx = build_pair_index(t, "study-any_lat-any")
    rows = np.arange(n)
    full = sample_positive(idx, rows, seed=11, epoch=4)
    perm = rng.permutation(n)
    np.testing.assert_array_equal(sample_positive(idx, rows[perm], 11, 4), full[perm])
    sub = rows[::7]
    np.testing.assert_array_equal(sample_positive(idx, sub, 11, 4), full[sub])
    np.testing.assert_array_equal(sample_positive(idx, rows[[5]], 11, 4), full[[5]])
    with pytest.raises(IndexError):
        sample_positive(idx, np.array([n]), 11, 4)


def test_sample_hard_negatives():
    idx = build_hard_negative_index(_table(), "patient-other-study")
    rows = np.arange(8)
    k = 5
    out = sample_hard_negatives(idx, rows, k, seed=2, epoch=0)
    assert out.shape == (8, k) and out.dtype == np.int64
    for r in rows:
        g = idx.group(r).tolist()
        if not g:
            assert (out[r] == -1).all()
        else:
            assert set(out[r].tolist()) <= set(g)
    np.testing.assert_array_equal(out, sample_hard_negatives(idx, rows, k, 2, 0))
    np.testing.assert_array_equal(sample_hard_negatives(idx, rows[::-1], k, 2, 0), out[::-1])
    assert not np.array_equal(out, sample_hard_negatives(idx, rows, k, 2, 1))
    # with replacement: a group of 1 repeats its member
    assert (out[1] == 6).all()
    assert sample_hard_negatives(idx, rows, 0, 2, 0).shape == (8, 0)
    # slots are not all equal for a group of 4
    wide = sample_hard_negatives(idx, np.array([7]), 64, 2, 0)[0]
    assert set(wide.tolist()) == {0, 2, 3, 5}


# ------------------------------------------------------------------------------------------------
# Real CheXpert table

def _chexpert_table(shared_data):
    """The real CheXpert train.csv through the chexpert adapter (skips without ../shared/data)."""
    from cxrjax.data.metadata import load_chexpert_csv

    return load_chexpert_csv(shared_data / "metadata" / "chexpert_train.csv.gz").table


def test_real_chexpert_table(shared_data):
    t = _chexpert_table(shared_data)
    n = len(t)
    assert n > 200_000
    codes = metadata_codes(t)
    pat, stu, lat = codes["patient"], codes["study"], codes["laterality"]
    q_of = lambda idx: np.repeat(np.arange(n), np.diff(idx.offsets))  # noqa: E731

    study_size = t.groupby("study_id")["study_id"].transform("size").to_numpy()
    patient_size = t.groupby("patient_id")["patient_id"].transform("size").to_numpy()
    known = t["laterality"].to_numpy() != "unknown"
    study_lat_size = t.groupby(["study_id", "laterality"])["study_id"].transform("size").to_numpy()
    expected_fallback = {
        "instance": np.ones(n, bool),
        "study-same_lat-any": study_size == 1,
        "study-any_lat-any": patient_size == 1,
        "study-different_lat-any": patient_size == study_size,
        "study-same_lat-same": ~known | (study_lat_size == 1),
    }
    for name, s in STRATEGIES.items():
        idx = build_pair_index(t, name)
        assert idx.n == n
        q = q_of(idx)
        m = idx.members.astype(np.int64)
        assert (pat[m] == pat[q]).all(), name
        assert (np.diff(idx.offsets) >= 1).all()
        others = m != q
        assert (others | idx.fallback[q]).all(), name  # self only as a fallback
        if s.study == "same":
            assert (stu[m] == stu[q]).all(), name
        if s.study == "different":
            assert (stu[m[others]] != stu[q[others]]).all(), name
        if s.laterality == "same":
            assert (lat[m[others]] == lat[q[others]]).all(), name
        if name in expected_fallback:
            assert idx.fallback.sum() == expected_fallback[name].sum(), name
            np.testing.assert_array_equal(idx.fallback, expected_fallback[name])
        if name == "study-same_lat-any":
            sizes = np.diff(idx.offsets)
            np.testing.assert_array_equal(sizes, np.maximum(study_size - 1, 1))
        if name == "study-any_lat-any":
            assert len(idx.members) == int((np.maximum(patient_size - 1, 1)).sum())
    # sampling on the real index stays in the group
    idx = build_pair_index(t, "study-same_lat-any")
    rows = np.arange(n)
    part = sample_positive(idx, rows, 0, 0)
    assert (stu[part] == stu).all() and ((part != rows) | idx.fallback).all()
