"""The phantom dataset: canonical table, determinism, label/report consistency, visible findings."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from cxrjax.data import phantom, schema
from cxrjax.data.schema import CHEXPERT_LABELS

SIZE = 128


@pytest.fixture(scope="module")
def table():
    return phantom.make_table(200, seed=0)


@pytest.fixture(scope="module")
def small():
    return phantom.make_table(12, seed=5)


def _region(img, x0, x1, y0, y1):
    """Mean of an image over a rectangle given in normalised coordinates ([-1, 1], y down)."""
    n = img.shape[0]
    c0, c1 = int((x0 + 1) / 2 * n), int((x1 + 1) / 2 * n)
    r0, r1 = int((y0 + 1) / 2 * n), int((y1 + 1) / 2 * n)
    return float(img[r0:r1, c0:c1].mean())


def _edit(row, **labels):
    r = row.copy()
    for k, v in labels.items():
        r[k.replace("_", " ")] = v
    r["No Finding"] = np.nan
    return r


def test_table_is_canonical(table):
    t = schema.validate_table(table)
    assert list(t.columns[: len(schema.COLUMNS)]) == list(schema.COLUMNS)
    assert (table["source"] == "phantom").all() and (table["path"] == "").all()
    assert table["image_id"].str.fullmatch(r"p\d{5}/s\d{2}/(frontal|lateral)").all()
    assert (table["study_id"] == table["image_id"].str.rsplit("/", n=1).str[0]).all()
    assert (table["patient_id"] == table["study_id"].str.split("/").str[0]).all()
    assert (table["laterality"] == schema.laterality_of(table["view"])).all()
    assert set(table["split"]) == set(schema.SPLITS)
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert (table["report"].str.len() > 20).all()
    assert (table["extra_seed"] == 0).all()


def test_studies_views_and_orders(table):
    n_studies = table.groupby("patient_id")["study_id"].nunique()
    assert n_studies.min() == 1 and n_studies.max() == 4
    assert table["patient_id"].nunique() == 200
    orders = table.groupby("patient_id")["study_order"].agg(lambda s: sorted(set(s)))
    assert all(o == list(range(len(o))) for o in orders)
    per_study = table.groupby("study_id")["laterality"].agg(list)
    assert all(lat.count("frontal") == 1 and lat.count("lateral") <= 1 for lat in per_study)
    assert set(table["laterality"]) == {"frontal", "lateral"}
    assert {"PA", "AP", "LATERAL"} <= set(table["view"])
    frac_lat = (table["laterality"] == "lateral").mean()
    assert 0.15 < frac_lat < 0.45
    few = phantom.make_table(200, seed=0, max_studies=2, lateral_prob=0.0)
    assert few.groupby("patient_id")["study_id"].nunique().max() == 2
    assert (few["laterality"] == "frontal").all()


def test_study_images_share_labels_and_report(table):
    cols = list(CHEXPERT_LABELS) + ["report", "study_order", "patient_id"]
    per_study = table[["study_id"] + cols].fillna(-9).astype(str).groupby("study_id").nunique()
    assert (per_study == 1).all().all()


def test_label_values_and_uncertainty(table):
    studies = table.drop_duplicates("study_id")
    for c in CHEXPERT_LABELS:
        assert set(studies[c].dropna().unique()) <= {1.0, 0.0, -1.0}
    uncertain = {c: int((studies[c] == -1).sum()) for c in CHEXPERT_LABELS}
    assert sum(v > 0 for v in uncertain.values()) >= 8, uncertain
    assert uncertain["Pleural Effusion"] > 5 and uncertain["Cardiomegaly"] > 5
    blank = studies[list(CHEXPERT_LABELS)].isna().mean().mean()
    assert 0.4 < blank < 0.9          # CheXpert-like: most observations unmentioned
    for c in ("Pleural Effusion", "Cardiomegaly", "Edema", "Support Devices", "Atelectasis"):
        assert (studies[c] == 1).sum() > 10, c
    # No Finding: 1 exactly when no pathology is positive or uncertain
    path = [c for c in CHEXPERT_LABELS if c not in ("No Finding", "Support Devices")]
    any_path = studies[path].isin([1.0, -1.0]).any(axis=1)
    assert ((studies["No Finding"] == 1) == ~any_path).all()
    assert studies["No Finding"].isin([1.0]).sum() > 20
    # Lung Opacity is the parent of the parenchymal findings
    kids = ["Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis"]
    assert (studies.loc[(studies[kids] == 1).any(axis=1), "Lung Opacity"] == 1).all()
    # findings evolve: some patients change labels between studies, some keep them
    eff = table.drop_duplicates("study_id").groupby("patient_id")["Pleural Effusion"].agg(lambda s: s.fillna(0).nunique())
    assert (eff > 1).sum() > 5


# Words that mention a finding, negation / hedging cues (independent of the module's templates).
TERMS = {
    "Pleural Effusion": r"effusion",
    "Pneumothorax": r"pneumothorax",
    "Edema": r"edema",
    "Consolidation": r"consolidation",
    "Pneumonia": r"pneumonia",
    "Atelectasis": r"atelectasis",
    "Fracture": r"fracture",
    "Cardiomegaly": r"cardiomegaly|heart|cardiac silhouette",
    "Lung Lesion": r"nodul|mass\b",
    "Pleural Other": r"thickening|pleural cap",
    "Enlarged Cardiomediastinum": r"mediastin",
    "Support Devices": r"tube|catheter|pacemaker|\bline\b|drain|device",
}
NEG = r"\bno\b|\bnot\b|without|normal|resolution|resolved|negative"
HEDGE = r"possib|may |cannot be excluded|questionable|could|suspicious|borderline"


def _sentences(report):
    body = report.split("\n", 1)[1]
    return [s.strip() for s in re.split(r"(?<=\.)\s+|\n", body) if s.strip()]


def test_reports_agree_with_labels(table):
    studies = table.drop_duplicates("study_id")
    checked = {1.0: 0, 0.0: 0, -1.0: 0}
    for _, row in studies.iterrows():
        sents = [s.lower() for s in _sentences(row["report"])]
        assert row["report"].startswith("EXAMINATION:") and "FINDINGS:" in row["report"] and "IMPRESSION:" in row["report"]
        for c, pat in TERMS.items():
            v = row[c]
            mentions = [s for s in sents if re.search(pat, s)]
            if c == "Support Devices" and v != 1.0:
                mentions = [s for s in mentions if "lines" not in s and "tubes" not in s and "devices" not in s]
            if v == 1.0:
                assert mentions, (c, row["report"])
                assert any(not re.search(NEG, s) for s in mentions), (c, row["report"])
            elif v == 0.0:
                # a negative finding may be negated or unmentioned, never asserted
                assert all(re.search(NEG, s) for s in mentions), (c, row["report"])
            elif v == -1.0:
                assert mentions and all(re.search(HEDGE, s) or re.search(NEG, s) for s in mentions if re.search(pat, s)), (c, row["report"])
                assert any(re.search(HEDGE, s) for s in mentions), (c, row["report"])
            elif c not in ("Support Devices", "Cardiomegaly", "Enlarged Cardiomediastinum"):
                assert not mentions, (c, row["report"])   # blank = not mentioned
            checked[v if v == v else 1.0] += 1 if v == v else 0
    assert min(checked.values()) > 50
    # negations for a subset of negatives, and varied wording
    assert studies["report"].str.contains("No pleural effusion|no pleural effusion|No effusion").sum() > 30
    assert studies["report"].str.contains("There is no pneumothorax").sum() > 5
    assert studies["report"].nunique() > 0.8 * len(studies)


def test_make_table_is_deterministic():
    a = phantom.make_table(25, seed=3)
    b = phantom.make_table(25, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = phantom.make_table(25, seed=4)
    assert not a["report"].equals(c["report"]) or len(a) != len(c)
    # a patient does not depend on how many patients were generated
    big = phantom.make_table(40, seed=3)
    pd.testing.assert_frame_equal(big[big["patient_id"].isin(a["patient_id"])].reset_index(drop=True), a)


def test_render_is_deterministic_and_row_local(small):
    imgs = phantom.render_images(small, size=SIZE)
    assert imgs.shape == (len(small), SIZE, SIZE) and imgs.dtype == np.uint8
    again = phantom.render_images(small, size=SIZE)
    assert imgs.tobytes() == again.tobytes()
    rev = phantom.render_images(small.iloc[::-1], size=SIZE)[::-1]
    assert np.array_equal(rev, imgs)
    for i in (0, len(small) // 2, len(small) - 1):
        alone = phantom.render_image(small.iloc[i].to_dict(), size=SIZE)
        assert np.array_equal(alone, imgs[i])
    other = phantom.render_images(phantom.make_table(12, seed=6), size=SIZE)
    assert not np.array_equal(other[0], imgs[0])
    # two images of one study are different images
    st = small.groupby("study_id").filter(lambda g: len(g) == 2)
    assert len(st) >= 2
    i, j = st.index[:2]
    assert np.abs(imgs[i].astype(int) - imgs[j].astype(int)).mean() > 10


def test_images_use_full_range(small):
    imgs = phantom.render_images(small, size=SIZE)
    for im in imgs:
        assert im.min() <= 10 and im.max() >= 245
        assert im.std() > 35
    # radiograph convention: the lungs (air) are darker than the spine/mediastinum (dense)
    fr = imgs[(small["laterality"] == "frontal").to_numpy()]
    lungs = np.mean([_region(im, -0.6, -0.4, -0.4, -0.1) for im in fr])
    medi = np.mean([_region(im, -0.05, 0.05, -0.4, -0.1) for im in fr])
    assert medi > lungs + 40


def _pa_rows(table, n):
    rows = table[(table["view"] == "PA")].drop_duplicates("patient_id")
    return [r for _, r in rows.head(n).iterrows()]


def test_effusion_brightens_costophrenic_region(table):
    for row in _pa_rows(table, 8):
        an = phantom.patient_anatomy(int(row["extra_seed"]), row["patient_id"])
        side = {"right": -1, "left": 1, "bilateral": -1}[an.effusion_side]
        clean = _edit(row, Pleural_Effusion=0.0, Edema=np.nan, Atelectasis=np.nan, Consolidation=np.nan,
                      Pneumonia=np.nan, Lung_Opacity=np.nan)
        eff = _edit(clean, Pleural_Effusion=1.0)
        a = phantom.render_image(clean, SIZE).astype(float)
        b = phantom.render_image(eff, SIZE).astype(float)
        lo, hi = sorted((side * 0.45, side * 0.7))
        base_a, base_b = _region(a, lo, hi, 0.25, 0.45), _region(b, lo, hi, 0.25, 0.45)
        assert base_b > base_a + 15, (row["image_id"], base_a, base_b)
        # the apex is not affected
        assert abs(_region(a, lo, hi, -0.55, -0.35) - _region(b, lo, hi, -0.55, -0.35)) < 15
    # lateral view: the posterior sulcus fills
    lat = table[table["view"] == "LATERAL"].drop_duplicates("patient_id").head(5)
    for _, row in lat.iterrows():
        clean = _edit(row, Pleural_Effusion=0.0)
        a = phantom.render_image(clean, SIZE).astype(float)
        b = phantom.render_image(_edit(clean, Pleural_Effusion=1.0), SIZE).astype(float)
        assert _region(b, 0.25, 0.55, 0.2, 0.45) > _region(a, 0.25, 0.55, 0.2, 0.45) + 10, row["image_id"]


def _heart_width(img, y):
    """Columns at heart level y (normalised) brighter than halfway between lung and mediastinum."""
    n = img.shape[0]
    r = int((y + 1) / 2 * n)
    band = img[r - 2:r + 2, int(0.1 * n):int(0.9 * n)].astype(float).mean(axis=0)
    lo, hi = np.percentile(band, 10), np.percentile(band, 95)
    return int((band > (lo + hi) / 2).sum())


def test_cardiomegaly_widens_heart(table):
    gains = []
    for row in _pa_rows(table, 8):
        clean = _edit(row, Cardiomegaly=0.0, Enlarged_Cardiomediastinum=0.0, Pleural_Effusion=0.0, Edema=0.0)
        big = _edit(clean, Cardiomegaly=1.0)
        an = phantom.patient_anatomy(int(row["extra_seed"]), row["patient_id"])
        y_heart = an.dome_r + an.dome_l - 0.15   # just above the left hemidiaphragm
        w0 = _heart_width(phantom.render_image(clean, SIZE), y_heart)
        w1 = _heart_width(phantom.render_image(big, SIZE), y_heart)
        gains.append(w1 - w0)
        assert w1 > w0 + 2, (row["image_id"], w0, w1)
    assert np.mean(gains) > 5


def test_uncertain_findings_render_fainter(table):
    row = _pa_rows(table, 1)[0]
    clean = _edit(row, Pleural_Effusion=0.0, Edema=0.0)
    an = phantom.patient_anatomy(0, row["patient_id"])
    side = {"right": -1, "left": 1, "bilateral": -1}[an.effusion_side]
    lo, hi = sorted((side * 0.45, side * 0.7))
    m = {v: _region(phantom.render_image(_edit(clean, Pleural_Effusion=v), SIZE).astype(float), lo, hi, 0.25, 0.45)
         for v in (0.0, -1.0, 1.0)}
    assert m[0.0] < m[-1.0] < m[1.0], m


def test_devices_are_bright_lines(table):
    row = _pa_rows(table, 1)[0]
    a = phantom.render_image(_edit(row, Support_Devices=np.nan), SIZE).astype(float)
    b = phantom.render_image(_edit(row, Support_Devices=1.0), SIZE).astype(float)
    assert (b - a > 20).sum() > 30


def _small_frontal(img):
    x = img.astype(float).reshape(16, img.shape[0] // 16, 16, img.shape[1] // 16).mean(axis=(1, 3)).ravel()
    return (x - x.mean()) / (x.std() + 1e-9)


def test_same_patient_images_are_more_similar(table):
    fr = table[(table["laterality"] == "frontal")]
    multi = fr.groupby("patient_id").filter(lambda g: len(g) >= 2)
    pids = list(multi["patient_id"].unique()[:20])
    feats = {}
    for pid in pids:
        rows = multi[multi["patient_id"] == pid].head(2)
        feats[pid] = [_small_frontal(phantom.render_image(r, SIZE)) for _, r in rows.iterrows()]
    same = [float(np.mean(a * b)) for a, b in feats.values()]
    diff = [float(np.mean(feats[p][0] * feats[q][1])) for p, q in zip(pids, pids[1:] + pids[:1])]
    assert np.mean(same) > np.mean(diff) + 0.03, (np.mean(same), np.mean(diff))


def test_sample_grid_and_cli(tmp_path, capsys):
    from PIL import Image

    out = phantom.write_sample_grid(tmp_path / "g.png", n_patients=2, seed=0, size=64)
    im = Image.open(out)
    assert im.size[0] >= 64 and im.size[1] >= 2 * 64
    phantom.main([f"--grid={tmp_path / 'h.png'}", "--patients=2", "--size=64"])
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "h.png").exists()
