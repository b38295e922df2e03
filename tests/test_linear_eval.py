"""Linear evaluation: labels and policies, patient-level label fractions, the probe vs scikit-learn, AUC and
its bootstrap CI vs scikit-learn, raw-pixel features vs OpenCV, external label splits (MedAug's real files),
and checkpoint -> features -> AUC beside the random and pixels rows for a tiny MoCo run and a tiny masked
vision-language (ViT) run; damaged checkpoints and config mistakes are one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxrjax.eval import linear

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- labels


def test_task_labels_policies_and_value_tasks():
    table = pd.DataFrame({
        "Pleural Effusion": [1.0, 0.0, -1.0, np.nan],
        "extra_finding": ["COVID-19", "COVID-19, ARDS", "todo", None],
    })
    tasks = [linear.parse_task("Pleural Effusion", table.columns), linear.parse_task("extra_finding=COVID-19", table.columns)]
    y = linear.task_labels(table, tasks, uncertain="ignore", blank="zeros")
    np.testing.assert_array_equal(y[:, 0], [1, 0, np.nan, 0])
    np.testing.assert_array_equal(y[:, 1], [1, 1, np.nan, np.nan])  # "todo" and empty cells are unlabelled
    y = linear.task_labels(table, tasks[:1], uncertain="ones", blank="ignore")
    np.testing.assert_array_equal(y[:, 0], [1, 0, 1, np.nan])
    y = linear.task_labels(table, tasks[:1], uncertain="zeros", blank="ignore")
    np.testing.assert_array_equal(y[:, 0], [1, 0, 0, np.nan])
    other = pd.DataFrame({"extra_finding": ["Pneumocystis", "No Finding", "COVID-19"]})
    y = linear.task_labels(other, [linear.parse_task("extra_finding=COVID-19", other.columns)])
    np.testing.assert_array_equal(y[:, 0], [0, 0, 1])


def test_task_and_policy_errors_name_the_problem():
    with pytest.raises(ValueError, match="not a CheXpert label"):
        linear.parse_task("Effusion", ["Pleural Effusion"])
    with pytest.raises(ValueError, match="no column 'extra_nope'"):
        linear.parse_task("extra_nope=x", ["extra_finding"])
    with pytest.raises(ValueError, match="uncertain="):
        linear.task_labels(pd.DataFrame({"Edema": [1.0]}), [linear.Task("Edema", "Edema")], uncertain="U-maybe")


# ---------------------------------------------------------------------------------------------- label fractions


def _cohort(n_patients=200, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_patients)
    patients = np.repeat([f"p{i:04d}" for i in range(n_patients)], sizes)
    labels = (rng.random((len(patients), 2)) < 0.3).astype(np.float32)
    return patients, labels


def test_sample_fraction_is_patient_level_and_reproducible():
    patients, labels = _cohort()
    for fraction, seed in [(0.01, 0), (0.1, 3), (1.0, 1)]:
        s = linear.sample_fraction(patients, labels, fraction, seed)
        chosen = set(patients[s.rows])
        # every image of a chosen patient is in, no image of another patient is
        assert set(np.flatnonzero(np.isin(patients, list(chosen)))) == set(s.rows)
        assert s.patients == len(chosen) == max(1, round(fraction * 200)) + s.added_for_classes
        again = linear.sample_fraction(patients, labels, fraction, seed)
        np.testing.assert_array_equal(s.rows, again.rows)
        for j in range(labels.shape[1]):
            assert set(labels[s.rows, j]) == {0.0, 1.0}
    a, b = (linear.sample_fraction(patients, labels, 0.1, k) for k in (0, 1))
    assert set(patients[a.rows]) != set(patients[b.rows])
    small, big = (linear.sample_fraction(patients, labels, f, 5) for f in (0.1, 0.5))
    if small.added_for_classes == 0:  # nested: the 10% draw is inside the 50% draw of the same seed
        assert set(small.rows) <= set(big.rows)


def test_sample_fraction_adds_a_patient_for_a_missing_class_and_refuses_impossible_tasks():
    patients = np.array([f"p{i}" for i in range(100)])
    labels = np.zeros((100, 1), np.float32)
    labels[37] = 1.0  # one positive patient in the whole split
    s = linear.sample_fraction(patients, labels, 0.01, 0)
    assert 37 in s.rows and s.patients == 1 + s.added_for_classes  # the draw, plus p37 unless it was drawn
    assert s.added_for_classes == (0 if len(s.rows) == 1 else 1)
    labels[:] = 0.0
    with pytest.raises(ValueError, match="no image of the training split has class 1"):
        linear.sample_fraction(patients, labels, 0.1, 0)


# ---------------------------------------------------------------------------------------------- probe and AUC


def test_probe_matches_sklearn_logistic_regression():
    rng = np.random.default_rng(0)
    n, d = 300, 6
    x = rng.normal(size=(n, d)).astype(np.float32) * [1, 2, 3, 0.5, 1, 4] + 1.0
    w_true = rng.normal(size=d)
    y = (rng.random(n) < 1 / (1 + np.exp(-((x - x.mean(0)) / x.std(0)) @ w_true))).astype(np.float32)
    l2 = 0.05
    probe = linear.fit_probe(x, y[:, None], l2=l2, steps=300)
    # ours: mean BCE + l2/2 |w|^2 on standardised features == sklearn's C = 1 / (l2 n)
    ref = LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=10_000).fit((x - probe.mean) / probe.std, y)
    np.testing.assert_allclose(probe.w[:, 0], ref.coef_[0], atol=2e-3)
    np.testing.assert_allclose(probe.b, ref.intercept_, atol=2e-3)
    assert 0 < probe.iterations < 300  # stopped by convergence (gradient norm < tol), not by the cap
    # a hard case: weak L2 on more features than images (near-separable); padding of rows and features exact
    x2 = rng.normal(size=(40, 100)).astype(np.float32)
    y2 = (x2[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(np.float32)
    p2 = linear.fit_probe(x2, y2[:, None], l2=1e-3, steps=300)
    ref2 = LogisticRegression(C=1.0 / (1e-3 * 40), tol=1e-12, max_iter=100_000).fit((x2 - p2.mean) / p2.std, y2)
    np.testing.assert_allclose(p2.w[:, 0], ref2.coef_[0], atol=2e-3)
    assert p2.w.shape == (100, 1)


def test_masked_loss_counts_only_labelled_rows_per_task():
    import jax.numpy as jnp
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 2)).astype(np.float32)
    y = (rng.random((50, 2)) < 0.5).astype(np.float32)
    mask = np.ones_like(y)
    mask[:20, 1] = 0  # task 1 does not count on the first 20 rows
    got = float(linear._masked_bce(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(mask)))
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = log_loss(y[:, 0], p[:, 0]) + log_loss(y[20:, 1], p[20:, 1])
    assert got == pytest.approx(want, rel=1e-5)


def reference_bootstrap(y, scores, groups, samples, seed):
    """Percentile 95% CI of the mean-over-seeds AUC when test patients are resampled with replacement
    (scikit-learn AUCs, written out directly): (lo, hi, resamples used)."""
    ok = np.isfinite(y)
    yy, ss, gg = y[ok], np.atleast_2d(scores)[:, ok], groups[ok]
    uniq = np.unique(gg)
    r = np.random.default_rng(seed)
    boots = []
    for _ in range(samples):
        pick = r.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([np.flatnonzero(gg == uniq[i]) for i in pick])
        if len(np.unique(yy[idx])) == 2:
            boots.append(np.mean([roc_auc_score(yy[idx], si[idx]) for si in ss]))
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return lo, hi, len(boots)


def test_auc_and_bootstrap_ci_against_sklearn():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 2)
    y = np.repeat(rng.random(60) < 0.4, 2).astype(np.float32)
    y[5] = np.nan  # an unused image
    scores = np.stack([y * 0.8 + rng.normal(size=len(y)) for _ in range(3)])
    s = linear.bootstrap_auc(y, scores, groups, samples=100, seed=7)
    ok = np.isfinite(y)
    expected = [roc_auc_score(y[ok], si[ok]) for si in scores]
    np.testing.assert_allclose(s.per_seed, expected, rtol=1e-12)
    assert s.mean == pytest.approx(np.mean(expected))
    assert s.sd == pytest.approx(np.std(expected, ddof=1))
    # the same cluster bootstrap written out directly
    lo, hi, used = reference_bootstrap(y, scores, groups, 100, 7)
    assert s.n_boot_used == used
    np.testing.assert_allclose([s.lo, s.hi], [lo, hi], rtol=1e-12)
    assert s.lo < s.mean < s.hi
    perfect = linear.bootstrap_auc(np.array([0, 0, 1, 1.0]), np.array([[0.1, 0.2, 0.8, 0.9]]), np.arange(4), samples=50)
    assert (perfect.mean, perfect.lo, perfect.hi) == (1.0, 1.0, 1.0)
    d, lo, hi = linear.bootstrap_auc_delta(y, scores, scores, groups, samples=50)
    assert (d, lo, hi) == (0.0, 0.0, 0.0)
    tied = np.round(scores, 1)  # many ties: the rank formula averages them as sklearn does
    np.testing.assert_allclose(linear.rank_auc(y[ok], tied[:, ok]), [roc_auc_score(y[ok], t[ok]) for t in tied],
                               rtol=1e-12)


def test_results_files(tmp_path):
    summary = pd.DataFrame([dict(model="m", task="Pleural Effusion", fraction=0.01, auc_mean=0.8, auc_sd=0.01,
                                 ci_lo=0.7, ci_hi=0.9, seeds=3, train_images_mean=12, test_images=50, test_positives=9)])
    md = linear.write_results(tmp_path, summary, pd.DataFrame([{"seed": 0}]), title="t")
    assert "| m | Pleural Effusion | 1% | 0.800 | 0.010 | [0.700, 0.900] | 3 | 12 | 50 (9) |" in md
    assert pd.read_csv(tmp_path / "results.csv").auc_mean.tolist() == [0.8]
    y = np.array([0, 1, 0, 1.0, np.nan])
    linear.plot_roc(tmp_path / "roc.png", y, np.array([[0.1, 0.9, 0.3, 0.6, 0.5]]), "t")
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------- external label splits


def _split_table():
    t = pd.DataFrame({
        "image_id": ["patient00001/study1/view1_frontal", "patient00001/study2/view1_frontal",
                     "patient00002/study1/view2_lateral", "patient00003/study1/view1_frontal", "x-ray-7"],
        "path": ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                 "CheXpert-v1.0-small/train/patient00001/study2/view1_frontal.jpg",
                 "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg",
                 "CheXpert-v1.0-small/valid/patient00003/study1/view1_frontal.jpg", "images/x-ray-7.png"],
        "split": ["train", "train", "valid", "test", "train"],
        "Pleural Effusion": [1.0, 0.0, np.nan, 1.0, 0.0],
    })
    return t


def test_label_split_files_match_on_the_chexpert_tail_and_name_every_unmatched_row(tmp_path):
    from cxrjax.eval import label_splits

    f = tmp_path / "train_semi_0.01-it0.csv"
    f.write_text(",Path,Pleural Effusion\n"
                 "3,/deep/group/CheXpert/CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,\n"  # line 2
                 "0,/deep/group/CheXpert/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,0.0\n"  # 3
                 "9,/deep/group/CheXpert/CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg,1.0\n"  # 4
                 "4,/deep/group/CheXpert/CheXpert-v1.0-small/valid/patient00003/study1/view1_frontal.jpg,1.0\n"  # 5
                 "0,/elsewhere/patient00001/study1/view1_frontal.png,1.0\n"  # 6: the same image as line 3
                 "5,/data/cxr/images/x-ray-7.png,0.0\n")  # 7: not CheXpert: a suffix of the table's path
    m = label_splits.match_file(f, label_splits.TableIndex(_split_table()), label_columns=["Pleural Effusion"])
    assert m.rows.tolist() == [2, 0, 4]  # file order; the valid-split image counts (MedAug drew from all of train)
    assert m.unmatched.line.tolist() == [4, 5, 6] and m.n_file_rows == 6
    assert "no image of the table matches" in m.unmatched.reason[0]
    assert "test split 'test'" in m.unmatched.reason[1]
    assert m.unmatched.reason[2] == "the same image as line 3"
    assert m.label_disagreements == {"Pleural Effusion": 1}  # line 3 says 0, the table says 1
    ids = tmp_path / "ids.csv"
    ids.write_text("image_id\npatient00001/study2/view1_frontal\nnope\n")
    m = label_splits.match_file(ids, label_splits.TableIndex(_split_table()))
    assert m.rows.tolist() == [1] and m.unmatched.value.tolist() == ["nope"]
    with pytest.raises(ValueError, match="no image column"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        label_splits.match_file(tmp_path / "bad.csv", label_splits.TableIndex(_split_table()))
    assert label_splits.files_for(str(tmp_path / "train_semi_{fraction}-it{seed}.csv"), (0.01, 1.0), (0,)) == \
        {(0.01, 0): f}
    with pytest.raises(FileNotFoundError, match=r"train_semi_0.001-it0.csv"):
        label_splits.files_for(str(tmp_path / "train_semi_{fraction}-it{seed}.csv"), (0.001,), (0,))


def test_label_samples_from_files_keep_train_and_valid_images_only(tmp_path, capsys):
    """linear_eval.label_samples: a file's images of train and valid form the sample (sorted rows), images of
    the test split or of any other split are named as unmatched; fraction 1.0 is the whole training split."""
    from cxrjax.eval import linear_eval

    table = _split_table()
    table.loc[4, "split"] = "extra"
    table["patient_id"] = table.image_id.str.split("/").str[0]
    (tmp_path / "s_0.5-it0.csv").write_text("image_id\n" + "\n".join(table.image_id) + "\n")
    import ml_collections as mlc

    cfg = mlc.ConfigDict(dict(label_splits=dict(files=str(tmp_path / "s_{fraction}-it{seed}.csv")), fractions=(0.5, 1.0),
                              seeds=(0,), data=dict(train_split="train", valid_split="valid", test_split="test")))
    targets = np.array([[1.0], [0.0], [1.0], [1.0], [0.0]], np.float32)
    samples = linear_eval.label_samples(cfg, table, targets, np.flatnonzero(table.split == "train"), tmp_path)
    assert samples[(0.5, 0)]["rows"].tolist() == [0, 1, 2] and samples[(0.5, 0)]["patients"] == 2
    assert samples[(1.0, 0)]["rows"].tolist() == [0, 1] and samples[(1.0, 0)]["file"] == ""
    bad = pd.read_csv(tmp_path / "label_splits_unmatched.csv")
    assert bad.line.tolist() == [5, 6]
    assert "test split" in bad.reason[0] and bad.reason[1] == "the image is in split 'extra', neither train nor valid"
    assert "s_0.5-it0.csv:6 x-ray-7: the image is in split 'extra'" in capsys.readouterr().out


def test_medaug_published_label_splits_match_every_row(shared_data, tmp_path):
    """MedAug's real split files against the table `prepare --source=chexpert` builds from the real train.csv
    and valid.csv: every row of every 1 % and 0.1 % file is one image of the training part, with the same labels."""
    import gzip

    from cxrjax.data import metadata, schema
    from cxrjax.eval import label_splits

    folder = shared_data / "medaug-label-fractions"
    chexpert = tmp_path / "CheXpert-v1.0-small"
    chexpert.mkdir()
    (chexpert / "train.csv.gz").symlink_to(shared_data / "metadata" / "chexpert_train.csv.gz")
    (chexpert / "valid.csv.gz").symlink_to(folder / "valid.csv.gz")
    table = metadata.load_chexpert(tmp_path).table
    index = label_splits.TableIndex(table)
    files = sorted(folder.glob("train_semi_*-it*.csv.gz"))
    assert len(files) == 10
    for f in files:
        with gzip.open(f, "rt") as fh:
            n_lines = sum(1 for _ in fh) - 1  # the header
        m = label_splits.match_file(f, index, test_split="test", label_columns=schema.CHEXPERT_LABELS)
        assert m.unmatched.empty, (f.name, m.unmatched.head())
        assert len(m.rows) == n_lines and len(set(m.rows)) == n_lines
        assert set(table.split.iloc[m.rows]) <= {"train", "valid"}  # never our test split (= their valid.csv)
        assert not any(m.label_disagreements.values()), m.label_disagreements
    fractions = {f.name: len(label_splits.match_file(f, index).rows) for f in files}
    assert fractions["train_semi_0.01-it0.csv.gz"] == 2259  # the data README: ~2,259 images per 1 % split
    # MedAug's valid.csv is our test split: as a training file every row is refused, with the reason
    m = label_splits.match_file(folder / "valid.csv.gz", index)
    assert len(m.rows) == 0 and len(m.unmatched) == 234 and m.unmatched.reason.str.contains("test split").all()


# ---------------------------------------------------------------------------------------------- end to end


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 40-patient phantom and a 4-step MoCo run on it (width 8)."""
    from cxrjax import prepare

    root = tmp_path_factory.mktemp("tiny")
    data = root / "phantom"
    prepare.prepare_dataset("phantom", data, patients=40, size=48, workers=1, strategies=["study-same_lat-any"])
    workdir = root / "run"
    cmd = [sys.executable, "-m", "cxrjax.main", f"--config={REPO}/configs/moco_patient.py:demo", f"--workdir={workdir}",
           f"--config.data.dir={data}", "--config.augment.size=32", "--config.model.width=8",
           "--config.moco.queue_size=64", "--config.total_steps=4", "--config.checkpoint_every=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, workdir


def tiny_tasks(data) -> tuple[str, str]:
    """Two CheXpert labels with both classes (blank = 0, uncertain left out) in every split of the tiny phantom,
    found from its table (the phantom's label mix is its own business)."""
    from cxrjax.data import schema

    table = pd.read_parquet(Path(data) / "table.parquet")
    good = []
    for c in schema.CHEXPERT_LABELS:
        y = table[c].fillna(0.0)
        if all(((y[table.split == s] == 1).sum() >= 2) and ((y[table.split == s] == 0).sum() >= 2)
               for s in ("train", "valid", "test")):
            good.append(c)
    assert len(good) >= 2, "the tiny phantom has fewer than two labels with both classes in every split"
    return good[0], good[1]


def eval_config(data_dir, *variants, **updates):
    """configs/linear_eval.py:demo shrunk for the tiny phantom (two tasks with both classes in every split)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("linear_eval_config", REPO / "configs" / "linear_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(",".join(("demo",) + variants))
    c.data.dir = str(data_dir)
    c.augment.size = 32
    c.fractions, c.seeds = (0.1, 1.0), (0, 1)
    c.bootstrap.samples = 50
    c.probe.l2_grid = (0.01, 1.0)
    c.blank = "zeros"
    c.tasks = tiny_tasks(data_dir)
    c.pixels.size = 8
    c.batch_size = 16
    c.update(updates)
    return c


def _eval_cmd(workdir, data, *extra):
    return [sys.executable, "-m", "cxrjax.linear_eval", f"--config={REPO}/configs/linear_eval.py:demo",
            f"--workdir={workdir}", f"--config.data.dir={data}", "--config.augment.size=32",
            "--config.fractions=(0.1,1.0)", "--config.seeds=(0,1)", "--config.bootstrap.samples=50",
            "--config.probe.l2_grid=(0.01,1.0)", "--config.blank=zeros", "--config.pixels.size=8",
            "--config.tasks=({!r},{!r})".format(*tiny_tasks(data)), *extra]


def _mesh():
    import jax

    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.slow
def test_pixel_features_are_the_area_resized_eval_image(tiny_run, tmp_path):
    """`pixels` = what the encoders see (record -> eval transform -> normalisation), area-resized: against
    OpenCV's INTER_AREA on the normalised images, numpy's normalisation, record by record."""
    import cv2

    from cxrjax.data import augment as augment_lib
    from cxrjax.data import pipeline
    from cxrjax.eval import features

    data, _ = tiny_run
    aug = augment_lib.AugmentConfig(size=32)
    enc = features.pixels_encoder(8)
    x, rows = features.cached_features(enc, str(data), "valid", aug, cache_dir=tmp_path, note=lambda s: None,
                                       mesh=_mesh(), batch_size=16, progress=False)
    prepared = pipeline.load_prepared(data, "valid", None)
    reader = pipeline.RecordReader(data, prepared.name, "valid")
    np.testing.assert_array_equal(rows, np.sort(prepared.split_rows))
    want = {}
    for rec, row in enumerate(prepared.split_rows):
        img = augment_lib.eval_transform(reader.image(rec), aug).astype(np.float64)
        norm = ((img / 255.0 - augment_lib.CXR_MEAN) / augment_lib.CXR_STD).astype(np.float32)
        want[int(row)] = cv2.resize(norm, (8, 8), interpolation=cv2.INTER_AREA).reshape(-1)
    assert x.shape == (len(rows), 64)
    np.testing.assert_allclose(x, np.stack([want[int(r)] for r in rows]), atol=2e-5)
    # streamed into the cache as .npy, read back (memory-mapped) by the next call
    cached = list(tmp_path.glob("valid-*.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), x)
    notes = []
    again, _ = features.cached_features(enc, str(data), "valid", aug, cache_dir=tmp_path, note=notes.append,
                                        mesh=_mesh(), batch_size=16, progress=False)
    assert "from cache" in notes[0] and np.array_equal(again, x)


@pytest.mark.slow
def test_checkpoint_to_features_to_auc_beside_random_and_pixels(tmp_path, tiny_run, capsys):
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from cxrjax.eval import linear_eval
    from cxrjax.eval import features
    from cxrjax.train import contrastive

    data, run = tiny_run
    # the partial restore reads exactly the run's query encoder (vs a full restore of the `state` item)
    enc = features.restore_encoder(run)
    assert enc.source["step"] == 4 and enc.source["width"] == 8 and enc.kind == "resnet"
    full = ocp.StandardCheckpointer().restore(run / "checkpoints" / "4" / "state")
    for path, v in nnx.to_flat_state(enc.params):
        want = full["q_params"]
        for p in path:
            want = want[p] if p in want else want[str(p)]  # list indices are saved as string keys
        want = want["value"] if isinstance(want, dict) else want  # NNX Variables are saved as {'value': ...}
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want))
    step2 = features.restore_encoder(f"{run}/2")
    assert step2.source["step"] == 2
    assert not np.array_equal(jax.tree.leaves(step2.params)[0], jax.tree.leaves(enc.params)[0])
    # the `random` row: the run's own architecture with the run's initialisation (its step 0)
    rand = features.random_like(enc, seed=0)
    cfg = contrastive.default_config()
    cfg.model.update(width=8, init="random")  # as the demo run (the paper's configs start from ImageNet)
    start = nnx.state(contrastive.build_encoders(cfg, note=lambda s: None)[0], nnx.Param)
    for a, b in zip(jax.tree.leaves(rand.params), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    out = tmp_path / "eval"
    res = linear_eval.evaluate(eval_config(data, checkpoint=str(run)), str(out))
    stdout = capsys.readouterr().out
    name = "study-same_lat-any@4"
    assert res.model.tolist() == [name, name, "random", "random", "pixels", "pixels"] * 2
    assert res.fraction.tolist() == [0.1] * 6 + [1.0] * 6 and (res.seeds == 2).all()
    t0, t1 = tiny_tasks(data)
    assert res.task.tolist() == [t0, t1] * 6
    per_seed = pd.read_csv(out / "per_seed.csv")
    assert len(per_seed) == 24 and set(per_seed.l2) <= {0.01, 1.0}
    assert (per_seed.probe_iterations < 300).all()  # every probe converged
    # the three models saw the same label samples
    assert per_seed.groupby(["fraction", "seed"]).train_images.nunique().eq(1).all()
    preds = pd.read_parquet(out / "predictions.parquet")
    table = pd.read_parquet(data / "table.parquet")
    test_rows = np.flatnonzero(table.split == "test")
    assert set(preds.row) == set(test_rows)
    # every number of the table recomputed from the saved predictions with scikit-learn and a bootstrap
    # written out in this file
    patients = table.patient_id.to_numpy()
    for r in res.itertuples():
        g = preds[(preds.model == r.model) & (preds.task == r.task) & (preds.fraction == r.fraction)]
        wide = g.pivot(index="row", columns="seed", values="score").loc[test_rows]
        y = g.drop_duplicates("row").set_index("row").label.loc[test_rows].to_numpy()
        ok = np.isfinite(y)
        aucs = [roc_auc_score(y[ok], wide[s].to_numpy()[ok]) for s in wide.columns]
        assert r.auc_mean == pytest.approx(np.mean(aucs), abs=1e-12)
        assert r.auc_sd == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
        lo, hi, used = reference_bootstrap(y, wide.to_numpy().T, patients[test_rows], 50, 0)
        assert (r.ci_lo, r.ci_hi, r.boot_used) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12), used)
        col = table[r.task].to_numpy()
        assert r.test_positives == int((col[test_rows] == 1).sum())
        ps = per_seed[(per_seed.model == r.model) & (per_seed.task == r.task) & (per_seed.fraction == r.fraction)]
        np.testing.assert_allclose(sorted(ps.auc), sorted(aucs), atol=1e-12)
    assert len(list(out.glob("roc-*.png"))) == 12
    assert f"| {name} | {t0} | 10% |" in stdout and f"| pixels | {t1} | 100% |" in stdout
    eval_json = json.loads((out / "eval.json").read_text())
    assert eval_json["encoder"]["checkpoint"] == str(run.resolve())
    assert set(eval_json["models"]) == {name, "random", "pixels"}
    # the same encoders again with another seed: every split of every model from the cache
    linear_eval.evaluate(eval_config(data, checkpoint=str(run), seeds=(3,), feature_cache=str(out / "features")),
                         str(out / "again"))
    assert capsys.readouterr().out.count("from cache") == 9


@pytest.mark.slow
def test_external_label_splits_end_to_end(tmp_path, tiny_run, capsys):
    """config.label_splits.files: the probe trains on exactly the images the files name; every unmatched row
    is printed and listed in label_splits_unmatched.csv."""
    from cxrjax.eval import linear_eval

    data, _ = tiny_run
    table = pd.read_parquet(data / "table.parquet")
    rng = np.random.default_rng(0)
    pool = np.flatnonzero(table.split.isin(["train", "valid"]))
    chosen = {}
    for seed in (0, 1):
        rows = np.sort(rng.choice(pool, 30, replace=False))
        chosen[seed] = rows
        ids = table.image_id.iloc[rows].tolist()
        if seed == 1:
            ids += ["no-such-image", table.image_id[table.split == "test"].iloc[0]]
        pd.DataFrame({"image_id": ids}).to_csv(tmp_path / f"split_0.05-it{seed}.csv", index=False)
    cfg = eval_config(data, init="pixels", baselines=(), fractions=(0.05,), seeds=(0, 1),
                      label_splits={"files": str(tmp_path / "split_{fraction}-it{seed}.csv")})
    linear_eval.evaluate(cfg, str(tmp_path / "eval"))
    out = capsys.readouterr().out
    per_seed = pd.read_csv(tmp_path / "eval" / "per_seed.csv")
    assert per_seed.train_images.tolist() == [30, 30, 30, 30]
    assert per_seed.label_split.tolist() == ["split_0.05-it0.csv"] * 2 + ["split_0.05-it1.csv"] * 2
    for seed, rows in chosen.items():
        got = per_seed[per_seed.seed == seed]
        assert (got.train_patients == table.patient_id.iloc[rows].nunique()).all()
        assert (got.train_positives.iloc[0] == int((table[tiny_tasks(data)[0]].iloc[rows] == 1).sum()))
    bad = pd.read_csv(tmp_path / "eval" / "label_splits_unmatched.csv")
    assert bad.line.tolist() == [32, 33] and bad.value.tolist()[0] == "no-such-image"
    assert "split_0.05-it1.csv:32 no-such-image: no image of the table matches" in out
    assert "split_0.05-it1.csv:33" in out and "test split 'test'" in out


def test_every_draw_at_100_percent_is_fine_tuned_once(tmp_path, tiny_run, monkeypatch):
    """At 100 % all label draws are one image set: fine-tuning runs once per distinct sample and its
    scores stand for each draw (the sweep's supervised ceiling would otherwise fine-tune it 5 times)."""
    from cxrjax.eval import linear_eval

    data, run = tiny_run
    calls = []

    def fake(config, encoder, data_dir, rows, targets, aug, seed, mesh):
        calls.append((len(rows), seed))
        n_test = int((pd.read_parquet(data / "table.parquet").split == "test").sum())
        return np.random.default_rng(len(calls)).normal(size=(n_test, targets.shape[1]))

    monkeypatch.setattr(linear_eval, "finetuned_scores", fake)
    cfg = eval_config(data, checkpoint=str(run), baselines=())
    cfg.finetune.enabled = True
    linear_eval.evaluate(cfg, str(tmp_path / "eval"))
    table = pd.read_parquet(data / "table.parquet")
    n_train = int((table.split == "train").sum())
    # two distinct 10 % draws, then one fine-tune for the two identical 100 % draws
    assert [s for _, s in calls] == [0, 1, 0] and calls[2][0] == n_train and calls[0][0] < n_train
    per_seed = pd.read_csv(tmp_path / "eval" / "per_seed.csv")
    tuned = per_seed[per_seed.model.str.endswith("(fine-tuned)") & (per_seed.fraction == 1.0)]
    assert sorted(tuned.seed.unique()) == [0, 1]
    assert tuned.groupby("task").auc.nunique().eq(1).all()   # the same scores for both draws


@pytest.mark.slow
def test_finetune_trains_the_encoder_end_to_end(tiny_run):
    from flax import nnx

    from cxrjax.data import augment as augment_lib
    from cxrjax.eval import features

    data, run = tiny_run
    mesh = _mesh()
    enc = features.restore_encoder(run, mesh)
    before = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(enc.params)}
    table = pd.read_parquet(data / "table.parquet")
    targets = linear.task_labels(table, [linear.Task("Pleural Effusion", "Pleural Effusion")])
    # 20 training images and 4 of valid (an external label split may name images of our valid split)
    rows = np.concatenate([np.flatnonzero(table.split == "train")[:20], np.flatnonzero(table.split == "valid")[:4]])
    aug = augment_lib.AugmentConfig(size=32)
    logs = []
    tuned, w, b = linear.finetune(enc, str(data), rows, targets, mesh=mesh, augment=aug, epochs=2, lr=1e-3,
                                  batch_size=8, seed=0, note=logs.append)
    assert len(logs) == 2 and "3 steps of 8" in logs[0]
    after = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(tuned.params)}
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # the encoder itself was trained
    np.testing.assert_array_equal(before[("head", "linear1", "kernel")],  # ... the frozen copy was not touched
                                  np.asarray(enc.params["head"]["linear1"]["kernel"].get_value()))
    assert tuned.source["finetuned"] and w.shape == (enc.feature_dim, 1)
    x, r = features.extract_features(tuned, str(data), "test", aug, mesh=mesh, batch_size=8, progress=False)
    scores = x @ w + b
    assert scores.shape == (int((table.split == "test").sum()), 1) and np.isfinite(scores).all()
    with pytest.raises(ValueError, match="raw-pixel baseline has none"):
        linear.finetune(features.pixels_encoder(8), str(data), rows, targets, mesh=mesh, augment=aug, epochs=1,
                        lr=1e-3, batch_size=8)


def damaged_copy(run: Path, dest: Path, step: int) -> Path:
    """A copy of a run whose checkpoint `step` has every array file truncated to half (a storage fault)."""
    import shutil

    shutil.copytree(run, dest)
    files = [f for f in (dest / "checkpoints" / str(step) / "state").rglob("*") if f.is_file() and f.stat().st_size > 64
             and f.name not in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding")]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    return dest


@pytest.mark.slow
def test_config_errors_and_a_damaged_checkpoint_are_one_clear_line(tmp_path, tiny_run):
    from cxrjax.eval import linear_eval
    from cxrjax.data.pipeline import CorruptRecordError

    data, run = tiny_run
    damaged = damaged_copy(run, tmp_path / "damaged", 4)
    # the job's errors: each an exception main() turns into one line (checked on the command line below)
    caught = (ValueError, FileNotFoundError, FloatingPointError, CorruptRecordError)
    cases = [
        (dict(checkpoint=str(tmp_path)), "not a cxrjax run"),
        (dict(checkpoint=f"{run}/3"), "has no step 3"),
        (dict(checkpoint=str(run), tasks=("Effusion",)), "not a CheXpert label"),
        (dict(init="imagenet"), "ImageNet weights are never downloaded"),
        (dict(checkpoint=str(run), data={"test_split": "holdout"}), "no test split 'holdout'"),
        (dict(checkpoint=str(run), baselines=("random,chance",)), "has ['chance']; known baselines"),
        (dict(init="pixels", finetune={"enabled": True}), "no model to fine-tune"),
    ]
    for updates, message in cases:
        with pytest.raises(caught) as e:
            linear_eval.evaluate(eval_config(data, **updates), str(tmp_path / "e"))
        assert message in str(e.value), (updates, str(e.value))
    cli = [
        ([], "needs --config.checkpoint"),
        ([f"--config.checkpoint={run}", "--config.label_splits.files=/nowhere/s_{fraction}-it{seed}.csv"],
         "label split file(s) not found: /nowhere/s_0.1-it0.csv"),
        ([f"--config.checkpoint={damaged}"], f"{damaged.resolve()}/checkpoints/4 cannot be read: the checkpoint is "
                                              "damaged ("),
    ]
    for extra, message in cli:
        r = subprocess.run(_eval_cmd(tmp_path / "e", data, *extra), capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode != 0
        assert message in r.stderr, (extra, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr[-2000:])
    assert f"try an earlier step, e.g. {damaged.resolve()}/2" in r.stderr
    # the earlier intact step of the same run still evaluates
    from cxrjax.eval import features

    assert features.restore_encoder(f"{damaged}/2").source["step"] == 2


# ---------------------------------------------------------------------------------------------- ViT (masked vision-language)


@pytest.fixture(scope="module")
def tiny_vl_run(tiny_run, tmp_path_factory):
    """A 2-step masked vision-language run (ViT-micro, 32 px, patch 8) on the same tiny phantom."""
    import importlib.util

    import jax

    from cxrjax.train import mvlm

    data, _ = tiny_run
    spec = importlib.util.spec_from_file_location("mvlm_paired", REPO / "configs" / "mvlm_paired.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("demo")
    c.data.dir = str(data)
    c.data.paired_fraction = 1.0
    c.augment.size = 32
    c.model.update(size="micro", patch=8, proj_dim=16)
    c.mask.scales = (1, 2)
    c.text.update(vocab_size=300, max_len=24)
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 2, 1, 2
    jax.config.update("jax_threefry_partitionable", True)
    work = tmp_path_factory.mktemp("vl") / "run"
    mvlm.train_and_evaluate(c, str(work))
    return data, work


def tiny_vl_run_moco(data) -> Path:
    """The tiny MoCo run of `tiny_run` (beside its phantom)."""
    return Path(data).parent / "run"


@pytest.mark.slow
def test_vit_checkpoint_through_linear_eval(tmp_path, tiny_vl_run, capsys):
    """A masked vision-language run's ViT goes through the same protocol; its features equal the image
    embedding of the model the MVLM job's own loader restores (`train.mvlm.load_run`)."""
    import jax

    from cxrjax.eval import linear_eval
    from cxrjax.data import augment as augment_lib
    from cxrjax.data import pipeline
    from cxrjax.eval import features
    from cxrjax.train import mvlm as mvlm_train

    data, work = tiny_vl_run
    enc = features.restore_encoder(work, _mesh())
    assert enc.kind == "vit" and enc.source["step"] == 2 and enc.source["image_size"] == 32
    aug = augment_lib.AugmentConfig(size=32)
    x, rows = features.extract_features(enc, str(data), "test", aug, mesh=_mesh(), batch_size=16, progress=False)
    _, _, _, model, step = mvlm_train.load_run(str(work))
    assert step == 2
    prepared = pipeline.load_prepared(data, "test", None)
    reader = pipeline.RecordReader(data, prepared.name, "test")
    imgs = np.stack([augment_lib.eval_transform(reader.image(k), aug) for k in range(prepared.n)])[..., None]
    from flax import nnx

    graphdef, state = nnx.split(model)
    want = np.asarray(jax.jit(lambda s, i: nnx.merge(graphdef, s).embed_image(i))(state, imgs))  # uint8: it normalises
    order = np.argsort(prepared.split_rows)
    assert x.shape == (prepared.n, enc.feature_dim)
    np.testing.assert_allclose(x, want[order], rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match="takes 32 px images"):
        linear_eval.evaluate(eval_config(data, checkpoint=str(work), augment={"size": 48, "eval_crop": 1.0}),
                             str(tmp_path / "e0"))
    # the ViT and the MoCo ResNet in one table (at the ViT's size), each beside its own random architecture
    moco_run = tiny_vl_run_moco(data)
    res = linear_eval.evaluate(eval_config(data, checkpoint=f"{moco_run},{work}", augment={"size": 0, "eval_crop": 1.0}),
                               str(tmp_path / "e"))
    names = ["study-same_lat-any@4", "mvlm-paired@2", "random resnet18-w8", "random vit-micro/8", "pixels"]
    assert res.model.tolist() == [m for m in names for _ in range(2)] * 2
    assert (res.seeds == 2).all() and (res["size"] == 32).all()
    per_seed = pd.read_csv(tmp_path / "e" / "per_seed.csv")
    assert per_seed.groupby(["fraction", "seed"]).train_images.nunique().eq(1).all()  # the same label samples
    models = json.loads((tmp_path / "e" / "eval.json").read_text())["models"]
    assert models["random vit-micro/8"]["init"] == "random" and models["random vit-micro/8"]["arch"] == "vit-micro/8"
    assert models["mvlm-paired@2"]["checkpoint"] == str(work.resolve())
    rand = features.random_like(enc, seed=0)
    assert rand.kind == "vit" and rand.feature_dim == enc.feature_dim
    assert f"| mvlm-paired@2 | {tiny_tasks(data)[0]} | 10% |" in capsys.readouterr().out
