"""Linear evaluation: labels and policies, patient-level label fractions, the probe vs scikit-learn, AUC and
its bootstrap CI vs scikit-learn, and checkpoint -> features -> AUC on a tiny MoCo run."""

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
    yy, ss, gg = y[ok], scores[:, ok], groups[ok]
    uniq = np.unique(gg)
    r = np.random.default_rng(7)
    boots = []
    for _ in range(100):
        pick = r.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([np.flatnonzero(gg == uniq[i]) for i in pick])
        if len(np.unique(yy[idx])) == 2:
            boots.append(np.mean([roc_auc_score(yy[idx], si[idx]) for si in ss]))
    assert s.n_boot_used == len(boots)
    np.testing.assert_allclose([s.lo, s.hi], np.quantile(boots, [0.025, 0.975]), rtol=1e-12)
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


def _eval_cmd(workdir, data, *extra):
    return [sys.executable, "-m", "cxrjax.linear_eval", f"--config={REPO}/configs/linear_eval.py:demo",
            f"--workdir={workdir}", f"--config.data.dir={data}", "--config.augment.size=32",
            "--config.fractions=(0.1,1.0)", "--config.seeds=(0,1)", "--config.bootstrap.samples=50",
            "--config.probe.l2_grid=(0.01,1.0)", "--config.probe.steps=50", "--config.blank=zeros",
            # two tasks with both classes in the tiny phantom's test split (it has no effusion there)
            "--config.tasks=('No Finding','Support Devices')", *extra]


@pytest.mark.slow
def test_checkpoint_to_features_to_auc(tmp_path, tiny_run):
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from cxrjax.eval import features

    data, run = tiny_run
    # the partial restore reads exactly the run's query encoder (vs a full restore of the `state` item)
    enc = features.restore_encoder(run)
    assert enc.source["step"] == 4 and enc.source["width"] == 8
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

    out = tmp_path / "eval"
    r = subprocess.run(_eval_cmd(out, data, f"--config.checkpoint={run}"), capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = pd.read_csv(out / "results.csv")
    assert res.fraction.tolist() == [0.1, 0.1, 1.0, 1.0] and (res.seeds == 2).all()
    assert res.task.tolist() == ["No Finding", "Support Devices"] * 2
    assert res.auc_mean.between(0, 1).all() and (res.ci_lo <= res.ci_hi).all()
    assert res.model.tolist() == ["study-same_lat-any@4"] * 4
    per_seed = pd.read_csv(out / "per_seed.csv")
    assert len(per_seed) == 8 and set(per_seed.l2) <= {0.01, 1.0}
    preds = pd.read_parquet(out / "predictions.parquet")
    table = pd.read_parquet(data / "table.parquet")
    assert set(preds.row) == set(np.flatnonzero(table.split == "test"))
    # AUCs recomputed from the saved predictions with scikit-learn
    for (task, fraction, seed), g in preds.groupby(["task", "fraction", "seed"]):
        ok = g.label.notna()
        want = per_seed[(per_seed.task == task) & (per_seed.fraction == fraction) & (per_seed.seed == seed)].auc.item()
        assert roc_auc_score(g.label[ok], g.score[ok]) == pytest.approx(want)
    assert len(list(out.glob("roc-*.png"))) == 4
    assert "| study-same_lat-any@4 | No Finding | 10% |" in r.stdout
    # the same encoder again with other seeds: features come from the cache, not re-extracted
    r2 = subprocess.run(_eval_cmd(out / "again", data, f"--config.checkpoint={run}", f"--config.feature_cache={out}/features",
                                  "--config.seeds=(3,)"), capture_output=True, text=True, env=_env(), timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("from cache") == 3
    eval_json = json.loads((out / "eval.json").read_text())
    assert eval_json["encoder"]["checkpoint"] == str(run.resolve())


@pytest.mark.slow
def test_finetune_trains_the_encoder_end_to_end(tiny_run):
    import jax
    from flax import nnx

    from cxrjax.data import augment as augment_lib
    from cxrjax.eval import features

    data, run = tiny_run
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    enc = features.restore_encoder(run, mesh)
    before = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(enc.params)}
    table = pd.read_parquet(data / "table.parquet")
    targets = linear.task_labels(table, [linear.Task("Pleural Effusion", "Pleural Effusion")])
    rows = np.flatnonzero(table.split == "train")[:24]
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


@pytest.mark.slow
def test_config_errors_are_one_clear_line(tmp_path, tiny_run):
    data, run = tiny_run
    cases = [
        ([], "needs --config.checkpoint"),
        ([f"--config.checkpoint={tmp_path}"], "not a cxrjax run"),
        ([f"--config.checkpoint={run}/3"], "has no step 3"),
        ([f"--config.checkpoint={run}", "--config.tasks=('Effusion',)"], "not a CheXpert label"),
        (["--config.init=imagenet"], "ImageNet weights are never downloaded"),
        ([f"--config.checkpoint={run}", "--config.data.test_split=holdout"], "no test split 'holdout'"),
    ]
    for extra, message in cases:
        r = subprocess.run(_eval_cmd(tmp_path / "e", data, *extra), capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode != 0
        assert message in r.stderr, (extra, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
