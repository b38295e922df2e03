"""The phantom data set: CheXpert's study structure, graded findings, label/report consistency, determinism.

The CheXpert numbers below were measured on the real train table (223,414 images; docs/phantom.md) and
are written here, not computed by the code under test. Shares of the phantom are computed here with
pandas from the table alone.
"""

from __future__ import annotations

import re
from pathlib import Path
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cxrjax.data import pairs, phantom, schema
from cxrjax.data.schema import CHEXPERT_LABELS

SIZE = 128

# CheXpert-v1.0-small train.csv, per image unless said otherwise (docs/phantom.md).
CHEXPERT = {
    "alone": 0.688,            # images alone in their study
    "one_plus_one": 0.266,     # images of a study with exactly one frontal and one lateral
    "same_lat_mate": 0.039,    # images with a study-mate of their own laterality
    "images_per_study": 1.19,
    "one_study_patients": 0.520,
    "studies_per_patient": 2.91,
    "AP": 0.723, "PA": 0.132, "LATERAL": 0.145,
}
# (positive, uncertain, negative, blank) shares of images, CheXpert train.
CHEXPERT_LABEL_SHARES = {
    "No Finding": (0.100, 0.000, 0.000, 0.900),
    "Enlarged Cardiomediastinum": (0.048, 0.056, 0.097, 0.799),
    "Cardiomegaly": (0.121, 0.036, 0.050, 0.793),
    "Lung Opacity": (0.473, 0.025, 0.030, 0.473),
    "Lung Lesion": (0.041, 0.007, 0.006, 0.947),
    "Edema": (0.234, 0.058, 0.093, 0.615),
    "Consolidation": (0.066, 0.124, 0.126, 0.684),
    "Pneumonia": (0.027, 0.084, 0.013, 0.876),
    "Atelectasis": (0.149, 0.151, 0.006, 0.694),
    "Pneumothorax": (0.087, 0.014, 0.252, 0.647),
    "Pleural Effusion": (0.386, 0.052, 0.158, 0.404),
    "Pleural Other": (0.016, 0.012, 0.001, 0.971),
    "Fracture": (0.040, 0.003, 0.011, 0.945),
    "Support Devices": (0.519, 0.005, 0.027, 0.448),
}
DEMO_PATIENTS = 300   # the demo cohort suggested in docs/phantom.md: >= 30 effusion-positive test images


@pytest.fixture(scope="module")
def cohort():
    return phantom.make_table(2000, seed=0)


@pytest.fixture(scope="module")
def table():
    # version 2's positioning is tight: the anatomy tests below read findings at fixed image coordinates
    # (the anatomy and findings are drawn by the same code in both versions; version 3 is tested below)
    return phantom.make_table(200, seed=0, version="2")


@pytest.fixture(scope="module")
def small():
    return phantom.make_table(12, seed=5, version="2")


@pytest.fixture(scope="module")
def small3():
    return phantom.make_table(12, seed=5, version="3")


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


def test_version_tag():
    assert phantom.VERSION == "3" and phantom.RENDER_VERSIONS == ("2", "3")
    assert (phantom.make_table(3)["extra_phantom_version"] == "3").all()
    with pytest.raises(ValueError, match="phantom version '1'"):
        phantom.make_table(3, version="1")


def test_table_is_canonical(table):
    t = schema.validate_table(table)
    assert list(t.columns[: len(schema.COLUMNS)]) == list(schema.COLUMNS)
    assert (table["source"] == "phantom").all() and (table["path"] == "").all()
    assert table["image_id"].str.fullmatch(r"p\d{5}/s\d{2}/view\d_(frontal|lateral)").all()
    assert (table["image_id"].str.extract(r"_(\w+)$")[0] == table["laterality"]).all()
    assert (table["study_id"] == table["image_id"].str.rsplit("/", n=1).str[0]).all()
    assert (table["patient_id"] == table["study_id"].str.split("/").str[0]).all()
    assert (table["laterality"] == schema.laterality_of(table["view"])).all()
    assert set(table["split"]) == set(schema.SPLITS)
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert (table["report"].str.len() > 20).all()
    assert (table["extra_seed"] == 0).all()
    orders = table.groupby("patient_id")["study_order"].agg(lambda s: sorted(set(s)))
    assert all(o == list(range(len(o))) for o in orders)


def _study_shares(t: pd.DataFrame) -> dict:
    lat = t["laterality"]
    n_front = t.groupby("study_id")["laterality"].transform(lambda s: (s == "frontal").sum())
    n_lat = t.groupby("study_id")["laterality"].transform(lambda s: (s == "lateral").sum())
    studies = t.groupby("patient_id")["study_id"].nunique()
    return {
        "alone": ((n_front + n_lat) == 1).mean(),
        "one_plus_one": ((n_front == 1) & (n_lat == 1)).mean(),
        "same_lat_mate": np.where(lat == "frontal", n_front >= 2, n_lat >= 2).mean(),
        "images_per_study": len(t) / t["study_id"].nunique(),
        "one_study_patients": (studies == 1).mean(),
        "studies_per_patient": studies.mean(),
        "AP": t["view"].isin(["AP", "AP_SUPINE"]).mean(), "PA": (t["view"] == "PA").mean(),
        "LATERAL": (t["view"] == "LATERAL").mean(),
    }


def test_study_structure_matches_chexpert(cohort):
    got = _study_shares(cohort)
    tol = {"alone": 0.03, "one_plus_one": 0.03, "same_lat_mate": 0.012, "images_per_study": 0.03,
           "one_study_patients": 0.03, "studies_per_patient": 0.25, "AP": 0.03, "PA": 0.03, "LATERAL": 0.03}
    for k, want in CHEXPERT.items():
        assert abs(got[k] - want) <= tol[k], (k, got[k], want)
    # the shares partition the images: alone + 1F1L + the rest (two frontals / two laterals / three images)
    assert got["alone"] + got["one_plus_one"] + got["same_lat_mate"] == pytest.approx(1.0, abs=0.01)
    studies = cohort.groupby("patient_id")["study_id"].nunique()
    assert studies.max() >= 20            # CheXpert's long tail of frequent patients
    comp = cohort.groupby("study_id")["laterality"].agg(lambda s: (int((s == "frontal").sum()), int((s == "lateral").sum())))
    assert {(1, 0), (1, 1), (2, 0), (1, 2), (2, 1)} <= set(comp)
    # single-image studies are portable AP films; PA studies come with a lateral (CheXpert: 98.6 % / 88 %)
    first = cohort.drop_duplicates("study_id").set_index("study_id")["view"]
    single = comp[comp == (1, 0)].index
    assert first[single].isin(["AP", "AP_SUPINE"]).mean() > 0.9
    pa = first[first == "PA"].index
    assert (comp[pa] == (1, 1)).mean() > 0.8


def test_label_shares_match_chexpert(cohort):
    for c, want in CHEXPERT_LABEL_SHARES.items():
        v = cohort[c]
        got = ((v == 1).mean(), (v == -1).mean(), (v == 0).mean(), v.isna().mean())
        # No Finding: the phantom has slightly more clean studies (12.7 % vs 10.0 % at 2000 patients)
        tol = 0.035 if c == "No Finding" else 0.03
        for g, w, kind in zip(got, want, ("1", "-1", "0", "blank")):
            assert abs(g - w) <= tol, (c, kind, round(g, 3), w)


def test_nine_strategies_give_different_pair_groups(cohort):
    t = cohort[cohort["patient_id"] < "p00600"].reset_index(drop=True)
    groups = {}
    for name in pairs.STRATEGIES:
        if name == "instance":
            continue
        index = pairs.build_pair_index(t, name)
        with_partner = ~index.fallback
        assert with_partner.mean() > 0.02, name   # every strategy pairs some images with another image
        groups[name] = (tuple(index.offsets), tuple(index.members))
    assert len(groups) == 9
    assert len(set(groups.values())) == 9          # no two strategies define the same pair groups
    same_same = ~pairs.build_pair_index(t, "study-same_lat-same").fallback
    assert 0.02 < same_same.mean() < 0.07           # CheXpert: 3.9 % of images have such a partner


def test_study_images_share_labels_and_report(cohort):
    cols = list(CHEXPERT_LABELS) + ["report", "study_order", "patient_id"]
    per_study = cohort[["study_id"] + cols].fillna(-9).astype(str).groupby("study_id").nunique()
    assert (per_study == 1).all().all()


def test_label_conventions(cohort):
    studies = cohort.drop_duplicates("study_id")
    for c in CHEXPERT_LABELS:
        assert set(studies[c].dropna().unique()) <= {1.0, 0.0, -1.0}
    path = [c for c in CHEXPERT_LABELS if c not in ("No Finding", "Support Devices")]
    any_path = studies[path].isin([1.0, -1.0]).any(axis=1)
    assert not ((studies["No Finding"] == 1) & any_path).any()   # No Finding only without findings
    assert studies["No Finding"].isin([0.0, -1.0]).sum() == 0
    # Lung Opacity is the parent of the parenchymal findings
    kids = ["Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis"]
    assert (studies.loc[(studies[kids] == 1).any(axis=1), "Lung Opacity"] == 1).all()
    # findings persist and change across a patient's studies (CheXpert: P(1 | previous 1) = 0.71, else 0.29)
    s = studies.sort_values(["patient_id", "study_order"])
    pos = (s["Pleural Effusion"] == 1).to_numpy()
    same = s["patient_id"].to_numpy()[1:] == s["patient_id"].to_numpy()[:-1]
    after_pos, after_neg = pos[1:][same & pos[:-1]].mean(), pos[1:][same & ~pos[:-1]].mean()
    assert after_pos > 0.55 and after_neg < 0.4 and after_pos > after_neg + 0.25, (after_pos, after_neg)


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
    "Support Devices": r"tube|catheter|pacemaker|(?<!pleural )\bline\b|drain|device",
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
                assert mentions and all(re.search(HEDGE, s) or re.search(NEG, s) for s in mentions), (c, row["report"])
                assert any(re.search(HEDGE, s) for s in mentions), (c, row["report"])
            elif c not in ("Support Devices", "Cardiomegaly", "Enlarged Cardiomediastinum"):
                assert not mentions, (c, row["report"])   # blank = not mentioned
            checked[v if v == v else 1.0] += 1 if v == v else 0
    assert min(checked.values()) > 50
    assert studies["report"].str.contains("No pleural effusion|no pleural effusion|No effusion").sum() > 20
    assert studies["report"].nunique() > 0.8 * len(studies)
    # the examination line names the study's images
    for _, row in studies.iterrows():
        exam = row["report"].split("\n")[0].lower()
        views = table.loc[table["study_id"] == row["study_id"], "view"].tolist()
        assert ("lateral" in exam) == ("LATERAL" in views), (exam, views)


def _effusion_word(report: str) -> str | None:
    m = re.search(r"\b(small|moderate|large)\b[^.]*effusion", report.lower())
    return m.group(1) if m else None


def test_effusion_reports_carry_severity_words(cohort):
    studies = cohort.drop_duplicates("study_id")
    pos = studies[studies["Pleural Effusion"] == 1]
    words = pos["report"].map(_effusion_word)
    assert words.notna().mean() > 0.6                # most positive reports grade the effusion
    share = words.value_counts(normalize=True)
    assert share["small"] > share["moderate"] > 0.1 and share["large"] > 0.05, share.to_dict()
    # a negative or blank study never calls an effusion small/moderate/large
    assert studies.loc[studies["Pleural Effusion"] != 1, "report"].map(_effusion_word).isna().all()


def _effusion_footprint(row, size=64) -> float:
    """Pixels brightened by the row's own effusion: its image minus the same row with effusion 0."""
    clean = _edit(row, Pleural_Effusion=0.0)
    a = phantom.render_image(row, size).astype(float)
    b = phantom.render_image(clean, size).astype(float)
    return float(((a - b) > 25).sum())


def test_effusions_are_graded_and_match_their_report_word(cohort):
    pa = cohort[(cohort["view"] == "PA") & (cohort["Pleural Effusion"] == 1)].drop_duplicates("study_id").head(60)
    foot = np.array([_effusion_footprint(r) for _, r in pa.iterrows()])
    words = pa["report"].map(_effusion_word).to_numpy()
    # graded: many positives are subtle (a few pixels at 64 px), few are large
    assert (foot < 40).mean() > 0.35 and (foot > 150).mean() > 0.05, np.sort(foot)
    by_word = {w: foot[words == w].mean() for w in ("small", "moderate", "large") if (words == w).any()}
    assert by_word["small"] < by_word.get("moderate", np.inf) < by_word.get("large", np.inf), by_word
    # the same study's lateral image shows the fluid too (posterior sulcus)
    lat = cohort[(cohort["view"] == "LATERAL") & (cohort["Pleural Effusion"] == 1)]
    big = [r for _, r in lat.iterrows() if _effusion_word(r["report"]) in ("moderate", "large")][:6]
    assert len(big) >= 3 and all(_effusion_footprint(r) > 20 for r in big)


def test_demo_cohort_has_enough_effusion_positives_in_test():
    t = phantom.make_table(DEMO_PATIENTS, seed=0)
    assert ((t["split"] == "test") & (t["Pleural Effusion"] == 1)).sum() >= 30


def test_make_table_is_deterministic():
    a = phantom.make_table(25, seed=3)
    b = phantom.make_table(25, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = phantom.make_table(25, seed=4)
    assert not a["report"].equals(c["report"]) or len(a) != len(c)
    # a patient does not depend on how many patients were generated
    big = phantom.make_table(40, seed=3)
    pd.testing.assert_frame_equal(big[big["patient_id"].isin(a["patient_id"])].reset_index(drop=True), a)
    # a shorter cap keeps each patient's first studies unchanged (the course is prefix-stable)
    cut = phantom.make_table(25, seed=3, max_studies=2)
    assert cut.groupby("patient_id")["study_id"].nunique().max() == 2
    common = sorted(set(cut["study_id"]) & set(a["study_id"]))
    assert len(common) >= 25
    pd.testing.assert_frame_equal(cut[cut["study_id"].isin(common)].reset_index(drop=True),
                                  a[a["study_id"].isin(common)].reset_index(drop=True))


@pytest.mark.parametrize("version", ["2", "3"])
def test_render_is_deterministic_and_row_local(version):
    small = phantom.make_table(12, seed=5, version=version)
    imgs = phantom.render_images(small, size=SIZE)
    assert imgs.shape == (len(small), SIZE, SIZE) and imgs.dtype == np.uint8
    again = phantom.render_images(small, size=SIZE)
    assert imgs.tobytes() == again.tobytes()
    rev = phantom.render_images(small.iloc[::-1], size=SIZE)[::-1]
    assert np.array_equal(rev, imgs)
    for i in (0, len(small) // 2, len(small) - 1):
        alone = phantom.render_image(small.iloc[i].to_dict(), size=SIZE)
        assert np.array_equal(alone, imgs[i])
    other = phantom.render_images(phantom.make_table(12, seed=6, version=version), size=SIZE)
    assert not np.array_equal(other[0], imgs[0])
    # two images of one study are different images
    st = small.groupby("study_id").filter(lambda g: len(g) >= 2)
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
    """PA images of n patients from studies without an effusion (labels edited below add one)."""
    rows = table[(table["view"] == "PA") & table["Pleural Effusion"].isna()].drop_duplicates("patient_id")
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
        assert base_b > base_a + 10, (row["image_id"], base_a, base_b)
        # the apex is not affected
        assert abs(_region(a, lo, hi, -0.55, -0.35) - _region(b, lo, hi, -0.55, -0.35)) < 15
    # lateral view: the posterior sulcus fills
    lat = table[(table["view"] == "LATERAL") & table["Pleural Effusion"].isna()].drop_duplicates("patient_id").head(5)
    for _, row in lat.iterrows():
        clean = _edit(row, Pleural_Effusion=0.0)
        a = phantom.render_image(clean, SIZE).astype(float)
        b = phantom.render_image(_edit(clean, Pleural_Effusion=1.0), SIZE).astype(float)
        brighter = (b - a > 10)[SIZE // 3:, SIZE // 2:]   # the posterior lower quadrant (spine to the right)
        assert brighter.sum() > 100 and (b - a < -10).sum() < 10, row["image_id"]


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
    """16 x 16 block means of the central 3/4 (no collimation edge or marker), rank-normalised (no tone curve)."""
    n = img.shape[0]
    c = img[n // 8: n - n // 8, n // 8: n - n // 8].astype(float)
    m = c.shape[0] // 16 * 16
    x = c[:m, :m].reshape(16, m // 16, 16, m // 16).mean(axis=(1, 3)).ravel()
    x = x.argsort().argsort().astype(float)
    return (x - x.mean()) / x.std()


def test_same_patient_images_are_more_similar(table):
    fr = table[(table["laterality"] == "frontal")]
    multi = fr.groupby("patient_id").filter(lambda g: g["study_id"].nunique() >= 2).drop_duplicates("study_id")
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
    r = subprocess.run([sys.executable, "-m", "cxrjax.data.phantom", "--bench=4", "--size=32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "images/s" in r.stdout, r.stderr


# --- version 3: real films' per-image nuisance ---------------------------------------------------------

# Measured on ../shared/data's 1,000 NIH ChestX-ray14 films at 64 px by benchmarks/film_nuisance.py
# (2026-12-07; docs/phantom.md): the real films' spread that version 3 is calibrated to.
NIH_NUISANCE = {"shift y, % of width (robust SD)": 8.9, "scale, % (robust SD)": 14.1,
                "shift x, % of width (robust SD)": 2.93, "rotation, degrees (robust SD)": 2.44,
                "mean grey level: SD over films": 23.2, "grey-level SD (contrast): SD over films": 10.5,
                "2nd percentile grey: SD over films": 16.3, "98th percentile grey: SD over films": 19.0}


def _film_nuisance():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import film_nuisance

    return film_nuisance


def test_version_2_renders_as_before():
    """Version 2 stays selectable and unchanged: the digest of 80 images rendered by the version-2
    generator before version 3 existed (commit 6377989)."""
    import hashlib

    t = phantom.make_table(30, seed=0, version="2")
    h = hashlib.sha256()
    for _, r in t.iterrows():
        for s in (64, 200):
            h.update(phantom.render_image(r, s).tobytes())
    assert len(t) == 80 and h.hexdigest()[:16] == "6142fa078c315c93"
    # a table written before the version column existed renders as version 2
    old = t.drop(columns=["extra_phantom_version"]).iloc[0].to_dict()
    assert np.array_equal(phantom.render_image(old, 64), phantom.render_image(t.iloc[0], 64))


def test_tables_of_both_versions_differ_only_in_the_version_column():
    a, b = phantom.make_table(20, seed=1, version="2"), phantom.make_table(20, seed=1, version="3")
    pd.testing.assert_frame_equal(a.drop(columns="extra_phantom_version"), b.drop(columns="extra_phantom_version"))
    assert not np.array_equal(phantom.render_image(a.iloc[0], 64), phantom.render_image(b.iloc[0], 64))


def test_version_3_spread_matches_real_films_and_version_2_does_not():
    fn = _film_nuisance()
    spread = {}
    for v in ("2", "3"):
        images, _ = fn.phantom_frontals(100, v)
        spread[v], _ = fn.measure(images, rounds=2)
    for key, real in NIH_NUISANCE.items():
        assert 0.7 * real < spread["3"][key] < 1.35 * real, (key, spread["3"][key], real)
    # the knobs version 3 adds: version 2 is far from the real films in each
    for key in ("shift y, % of width (robust SD)", "scale, % (robust SD)", "2nd percentile grey: SD over films",
                "98th percentile grey: SD over films"):
        assert spread["2"][key] < 0.6 * NIH_NUISANCE[key], (key, spread["2"][key])


def test_registration_recovers_planted_positioning():
    """The measuring tool measures what it claims: films of one patient shifted / rotated / scaled by
    known amounts come back with those amounts."""
    import cv2

    fn = _film_nuisance()
    base = phantom.render_image(phantom.make_table(1, seed=0, version="2").iloc[0], 64).astype(np.float32)
    rng = np.random.default_rng(0)
    films, truth = [], []
    for _ in range(40):
        dx, dy, rot, sc = rng.normal(0, 2.0), rng.normal(0, 3.0), rng.normal(0, 3.0), np.exp(rng.normal(0, 0.06))
        m = cv2.getRotationMatrix2D((31.5, 31.5), -rot, sc)   # OpenCV: positive angle = counter-clockwise
        m[:, 2] += (dx, dy)
        films.append(cv2.warpAffine(base, m, (64, 64), borderMode=cv2.BORDER_REPLICATE))
        truth.append((100 * dx / 64, 100 * dy / 64, rot, 100 * np.log(sc)))
    _, geo = fn.measure(np.clip(np.stack(films), 0, 255).astype(np.uint8), rounds=2)
    truth = np.array(truth)
    for j, k in enumerate(("shift_x", "shift_y", "rotation", "scale")):
        assert np.corrcoef(geo[k], truth[:, j])[0, 1] > 0.9, k


def test_version_3_takes_differ_while_findings_persist(table):
    """Re-filming one study (a new image id: new positioning and acquisition) changes the film, not its
    findings; the frontal and the lateral of one study have their own positioning."""
    from cxrjax.data.phantom.render import render_scene
    from cxrjax.data.phantom.scene import image_geom, scene

    rows = table[(table["view"] == "PA") & (table["Pleural Effusion"] == 1)]
    rows = [r for _, r in rows.iterrows() if _effusion_word(r["report"]) in ("moderate", "large")][:3]
    assert len(rows) == 3
    for row in rows:
        sc, clean = scene(row), scene(_edit(row, Pleural_Effusion=0.0))
        takes = []
        for k in range(4):
            image_id = f"{row['image_id']}#take{k}"
            a = render_scene(sc, image_id, 64, "3").astype(float)
            b = render_scene(clean, image_id, 64, "3").astype(float)
            assert ((a - b) > 15).sum() > 20, (row["image_id"], k)   # the effusion shows in every take
            takes.append(a)
        assert min(np.abs(takes[i] - takes[j]).mean() for i in range(4) for j in range(i)) > 5
    both = table.groupby("study_id").filter(lambda g: set(g["laterality"]) == {"frontal", "lateral"})
    ids = both[both["study_id"] == both["study_id"].iloc[0]]["image_id"].tolist()
    g = [image_geom(0, i, "3")[0] for i in ids]
    assert (g[0].tx, g[0].ty, g[0].scale) != (g[1].tx, g[1].ty, g[1].scale)


def test_cache_names_and_manifest_carry_the_version(tmp_path):
    import ml_collections as mlc

    from cxrjax import prepare
    from cxrjax.train import contrastive

    ph = mlc.ConfigDict(dict(patients=300, size=64, seed=0, version="2"))
    assert contrastive.phantom_cache_name(ph) == "phantom-v2-p300-s64-seed0"
    ph.version = "3"
    assert contrastive.phantom_cache_name(ph) == "phantom-v3-p300-s64-seed0"
    assert contrastive.default_config().phantom.version == phantom.VERSION
    m = prepare.prepare_dataset("phantom", tmp_path / "d", patients=6, size=32, seed=0, phantom_version="2",
                                workers=1, strategies=["instance"])
    assert m["phantom"]["version"] == "2"
    t = pd.read_parquet(tmp_path / "d" / "table.parquet")
    assert (t["extra_phantom_version"] == "2").all()
