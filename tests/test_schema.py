"""The canonical table's gate (`validate_table`: every rejection, with what it names) and the
patient-level hash split (fractions, stability across runs, orders and versions)."""

import hashlib

import numpy as np
import pandas as pd
import pytest

from cxrjax.data import schema
from cxrjax.data.schema import MetadataError


def _table(n=6, **columns):
    """A valid canonical table: 3 patients x 2 studies of one image each, all in train."""
    t = pd.DataFrame({
        "image_id": [f"i{k}" for k in range(n)], "path": [f"img/{k}.png" for k in range(n)],
        "patient_id": [f"p{k // 2}" for k in range(n)], "study_id": [f"p{k // 2}/s{k % 2}" for k in range(n)],
        "study_order": [k % 2 for k in range(n)], "view": ["PA", "LATERAL"] * (n // 2),
        "laterality": ["frontal", "lateral"] * (n // 2), "split": ["train"] * n,
        **{c: [np.nan] * n for c in schema.CHEXPERT_LABELS}, "report": [""] * n, "source": ["test"] * n,
    })
    for k, v in columns.items():
        t[k] = v
    return t


def test_a_valid_table_is_normalised_not_changed():
    t = _table()
    t["Cardiomegaly"] = [1, 0, -1, np.nan, 1.0, "0"]  # numbers as the CSVs give them
    t["study_order"] = [0, 1, None, 1, 0, "1"]
    t["report"] = [None, "r", "", "r", "r", "r"]
    t["extra_finding"] = ["x"] * 6  # dataset-specific columns travel along
    t["unrelated"] = 1  # anything else is dropped
    t = t[list(reversed(t.columns))]  # any column order
    out = schema.validate_table(t, where="list.csv")
    assert list(out.columns) == [*schema.COLUMNS, "extra_finding"]
    assert out["study_order"].tolist() == [0, 1, -1, 1, 0, 1] and out["study_order"].dtype == np.int64
    assert out["Cardiomegaly"].dtype == np.float32
    np.testing.assert_array_equal(out["Cardiomegaly"].to_numpy(), [1, 0, -1, np.nan, 1, 0])
    assert out["report"].tolist() == ["", "r", "", "r", "r", "r"]
    assert out["image_id"].tolist() == [f"i{k}" for k in range(6)]


@pytest.mark.parametrize("change,message", [
    (lambda t: t.drop(columns=["study_order", "source"]), "list.csv: missing canonical column(s) ['study_order', 'source']"),
    (lambda t: t.assign(Edema=[0, 0, 2, 0, 0, 0]),
     "list.csv: column 'Edema' row 2 has label 2; labels are 1, 0, -1 or blank"),
    (lambda t: t.assign(Edema=[0, "yes", 0, 0, 0, 0]), None),  # not a number: blank, not an error (below)
    (lambda t: t.assign(view=["PA", "OBLIQUE", "PA", "PA", "PA", "PA"]),
     "list.csv: column 'view' row 1 has 'OBLIQUE'; expected one of ('PA', 'AP', 'AP_SUPINE', 'FRONTAL', 'LATERAL', "
     "'UNKNOWN')"),
    (lambda t: t.assign(laterality=["frontal"] * 5 + ["side"]), "column 'laterality' row 5 has 'side'"),
    (lambda t: t.assign(split=["train"] * 3 + ["validation"] * 3),
     "list.csv: column 'split' row 3 has 'validation'; expected one of ('train', 'valid', 'test')"),
    (lambda t: t.assign(patient_id=["p0", "p0", "", None, "p2", "p2"]),
     "list.csv: 2 row(s) with empty 'patient_id' (first: row 2)"),
    (lambda t: t.assign(image_id=["a", "b", "a", "c", "b", "d"]), "list.csv: duplicate image_id(s) ['a', 'b']"),
    (lambda t: t.assign(study_id=["s"] * 6),
     "list.csv: study_id(s) shared by several patients ['s']; study ids must be unique over the table"),
    (lambda t: t.assign(split=["train", "test", "valid", "valid", "train", "train"]),
     "list.csv: 1 patient(s) appear in more than one split (p0); splits must be patient-level"),
])
def test_rejections_name_the_file_row_and_column(change, message):
    t = change(_table())
    if message is None:
        assert np.isnan(schema.validate_table(t)["Edema"].iloc[1])
        return
    with pytest.raises(MetadataError) as e:
        schema.validate_table(t, where="list.csv")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_patient_leak_lists_at_most_20_patients():
    n = 50
    t = _table(2 * n)
    t["split"] = ["train", "test"] * n  # every patient's two images in two splits
    with pytest.raises(MetadataError, match=r"50 patient\(s\) appear in more than one split \(p0, p1, .*p19 \.\.\.\)"):
        schema.check_patient_leak(t)


def test_laterality_and_study_order():
    views = pd.Series(["PA", "AP", "AP_SUPINE", "FRONTAL", "LATERAL", "UNKNOWN"])
    assert schema.laterality_of(views).tolist() == ["frontal"] * 4 + ["lateral", "unknown"]
    t = pd.DataFrame({"patient_id": ["a", "a", "a", "b", "b"], "t": [20, 5, 20, None, 3]})
    assert schema.study_order_from(t, "t").tolist() == [1, 0, 1, -1, 0]  # dense rank per patient


# ----------------------------------------------------------------------------------------------
# hash_split


def _reference_split(patient_id, fractions=(0.8, 0.1, 0.1), salt="cxrjax"):
    """The split rule as documented: u = first 8 bytes (little-endian) of sha256('salt:id') / 2**64,
    train if u < f_train, valid if u < f_train + f_valid, else test."""
    u = int.from_bytes(hashlib.sha256(f"{salt}:{patient_id}".encode()).digest()[:8], "little") / 2**64
    return "train" if u < fractions[0] else "valid" if u < fractions[0] + fractions[1] else "test"


def test_hash_split_is_pinned_across_versions():
    """Changing the hash would move patients between splits of datasets prepared before and after: a
    model pre-trained on the old train split would then be evaluated on some of its own patients."""
    ids = pd.Series(["patient00001", "patient00014", "patient64540", "10000032", "p10/p10000032", "covid:1"])
    got = schema.hash_split(ids).tolist()
    assert got == [_reference_split(p) for p in ids]
    assert got == ["valid", "test", "train", "train", "valid", "train"]


def test_hash_split_fractions():
    ids = pd.Series([f"patient{i:06d}" for i in range(40000)])
    for fractions in ((0.8, 0.1, 0.1), (0.5, 0.3, 0.2), (0.7, 0.0, 0.3)):
        share = schema.hash_split(ids, fractions).value_counts(normalize=True)
        for split, f in zip(schema.SPLITS, fractions):
            assert abs(share.get(split, 0.0) - f) < 0.01, (fractions, split, share.get(split, 0.0))  # sd < 0.0025
    assert set(schema.hash_split(ids[:500], (1.0, 0.0, 0.0))) == {"train"}
    assert set(schema.hash_split(ids[:500], (0.0, 0.0, 1.0))) == {"test"}


def test_hash_split_is_per_patient_and_independent_of_order_and_company():
    ids = pd.Series([f"P{i}" for i in range(300)] * 3, index=range(1000, 1900))  # each patient 3 times
    splits = schema.hash_split(ids)
    assert (splits.index == ids.index).all()
    assert (splits.groupby(ids).nunique() == 1).all()  # all images of a patient in one split
    one = dict(zip(ids, splits))
    shuffled = ids.sample(frac=1.0, random_state=0)
    assert dict(zip(shuffled, schema.hash_split(shuffled))) == one  # order does not matter
    subset = ids.iloc[::7]
    assert dict(zip(subset, schema.hash_split(subset))) == {p: one[p] for p in subset}  # nor the other patients
    other_salt = schema.hash_split(ids.iloc[:300], salt="another")
    assert 0.1 < (other_salt.to_numpy() != splits.iloc[:300].to_numpy()).mean() < 0.6  # the salt reshuffles


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.1, 0.2), (0.5, 0.5, 0.1, -0.1)])
def test_hash_split_bad_fractions(fractions):
    with pytest.raises(MetadataError, match="3 numbers \\(train, valid, test\\) summing to 1"):
        schema.hash_split(pd.Series(["a"]), fractions)
