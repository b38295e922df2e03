"""The online probe: out-of-fold kNN / logistic AUC on features, patient-level folds, and the probe a
MoCo run builds from its config (fixed images on the device, the query backbone in eval mode)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrjax.train import online_probe


def test_probe_metrics_separate_informative_from_random_features():
    rng = np.random.default_rng(0)
    n = 200
    labels = (rng.random(n) < 0.4).astype(int)
    folds = (np.arange(n) // 10) % 2  # patients of 10 images, alternate halves
    informative = np.c_[labels + 0.3 * rng.normal(size=n), rng.normal(size=(n, 7))]
    good = online_probe.probe_metrics(informative, labels, folds, k=10)
    noise = online_probe.probe_metrics(rng.normal(size=(n, 8)), labels, folds, k=10)
    assert good["probe_logistic_auc"] > 0.95 and good["probe_knn_auc"] > 0.75 and good["probe_knn_acc"] > 0.7
    assert abs(noise["probe_logistic_auc"] - 0.5) < 0.12 and abs(noise["probe_knn_auc"] - 0.5) < 0.12
    # out of fold: flipping the labels of one half changes only the other half's fit -> AUC drops
    flipped = labels.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]
    assert online_probe.probe_metrics(informative, flipped, folds)["probe_logistic_auc"] < 0.5
    assert online_probe.probe_metrics(informative, np.zeros(n, int), folds) == {}


def test_folds_keep_a_patient_together():
    patients = np.repeat(np.arange(50), 4)
    folds = np.array([online_probe.hash_fold(int(p), 0) for p in patients])
    assert all(len(set(folds[patients == p])) == 1 for p in range(50))
    assert 15 < folds.reshape(50, 4)[:, 0].sum() < 35


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cxrjax import prepare

    d = tmp_path_factory.mktemp("probe")
    prepare.prepare_dataset("phantom", d, patients=60, size=48, workers=1, strategies=["study-same_lat-any"])
    return d


def test_the_run_probe_embeds_its_images_with_the_query_backbone(tiny, eight_devices):
    import jax

    from configs import moco_patient
    from cxrjax.models import moco
    from cxrjax.train import contrastive as ct

    config = moco_patient.get_config("demo")
    config.data.dir = str(tiny)
    config.augment.size = 40
    config.batch_size, config.moco.queue_size = 16, 64
    config.probe.update(every=5, split="train", max_images=48)
    mesh = ct.make_mesh(config)
    setup = ct.build_training(config, mesh, total_steps=10)
    probe = online_probe.OnlineProbe.build(config, str(tiny), mesh, setup.q_graph)
    assert probe is not None and probe.images.shape[1:] == (40, 40, 1) and len(probe.labels) <= 48
    assert probe.images.shape[0] % 8 == 0 and len(probe.images.sharding.device_set) == 8
    assert probe.due(10) and not probe.due(7)
    out = probe(setup.state)
    assert set(out) == {"probe_knn_auc", "probe_knn_acc", "probe_logistic_auc"}
    # the features are the backbone's in eval mode: the same as a direct forward of one image
    feats = np.asarray(probe.forward(setup.state.q_params, setup.state.q_stats, probe.images))
    from flax import nnx
    from cxrjax.data import augment

    model = nnx.merge(setup.q_graph, jax.device_get(setup.state.q_params), jax.device_get(setup.state.q_stats))
    direct = np.asarray(model.features(augment.normalize(np.asarray(probe.images[:1])), train=False))
    np.testing.assert_allclose(feats[:1], direct, rtol=1e-4, atol=1e-5)
    config.probe.every = 0
    assert online_probe.OnlineProbe.build(config, str(tiny), mesh, setup.q_graph) is None
