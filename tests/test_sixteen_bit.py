"""16-bit records (prepare --bit_depth=16) give what 8-bit records of the same images give, on every
path: one MoCo train step (host and on-device augmentation), feature extraction and export. The 8-bit
source images make the 16-bit pixels exactly v x 257; what may differ is the resampling rounding of the
two depths (the records are fitted at 36 px, the views at 28 px: every path interpolates)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrjax import prepare
from cxrjax.data import pipeline


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        h, w = 50 + (i % 5) * 3, 44
        y, x = np.mgrid[0:h, 0:w] / 50.0
        img = 100 + 60 * np.sin(4 * x + 3 * y + i) + 20 * rng.random((h, w))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"img/{i:02d}.png")
        rows.append({"File": f"img/{i:02d}.png", "PID": f"P{i // 4}", "Exam": f"E{(i % 4) // 2}",
                     "View": "PA" if i % 2 else "LATERAL", "Pleural Effusion": float(i % 3 == 0)})
    pd.DataFrame(rows).to_csv(root / "list.csv", index=False)
    out = {}
    for depth in (8, 16):
        out[depth] = root / f"out{depth}"
        prepare.prepare_dataset("csv", out[depth], src=root / "list.csv", size=36, bit_depth=depth, workers=1,
                                csv_mapping="path=File,patient_id=PID,study_id=Exam,view=View",
                                strategies=["study-same_lat-any"])
    return out


def _config(data_dir, where):
    from configs import moco_patient

    c = moco_patient.get_config("demo")
    c.data.dir = str(data_dir)
    c.model.width = 8
    c.augment.update(size=28, where=where)
    c.batch_size, c.moco.queue_size, c.probe.every = 8, 32, 0
    return c


@pytest.mark.parametrize("where", ["host", "device"])
def test_one_train_step_is_the_same_from_8_and_16_bit_records(records, where):
    """The pipeline: the same views from both depths, up to the resampling rounding (a 16-bit batch read as
    if its maximum were 255 would be ~257x off). The step: a 16-bit batch holding exactly v x 257 of the
    8-bit batch gives the 8-bit batch's loss and similarities (normalisation by the dtype's maximum)."""
    from cxrjax.train import contrastive as ct
    from cxrjax.train import mesh as mesh_lib

    batches = {}
    for depth, data_dir in records.items():
        config = _config(data_dir, where)
        mesh = ct.make_mesh(config)
        pcfg = dataclasses.replace(ct.pipeline_config(config, str(data_dir)), num_workers=0)
        it = pipeline.make_iterator(pcfg, mesh, axis=mesh_lib.BATCH_AXES)
        batches[depth] = next(it)
        it.close()
        assert batches[depth]["query"].dtype == (np.uint16 if depth == 16 else np.uint8)
    for view in ("query", "key"):
        v8 = np.asarray(batches[8][view]) / 255.0
        v16 = np.asarray(batches[16][view]) / 65535.0
        assert np.abs(v8 - v16).max() < 2.5 / 255 and np.abs(v8 - v16).mean() < 0.5 / 255, view
    for k in ("row", "partner_row", "patient", "study"):
        np.testing.assert_array_equal(np.asarray(batches[8][k]), np.asarray(batches[16][k]))

    config = _config(records[8], where)
    mesh = ct.make_mesh(config)
    setup = ct.build_training(config, mesh, total_steps=10)
    b8 = batches[8]
    exact16 = dict(b8, **{v: jax.device_put(np.asarray(b8[v]).astype(np.uint16) * 257, b8[v].sharding)
                          for v in ("query", "key")})
    _, m8 = setup.train_step(setup.state, b8)
    setup = ct.build_training(config, mesh, total_steps=10)  # the step donates its state
    _, m16 = setup.train_step(setup.state, exact16)
    for k in ("loss", "pos_sim", "neg_sim"):
        assert float(m16[k]) == pytest.approx(float(m8[k]), abs=1e-5), (k, float(m8[k]), float(m16[k]))


def test_features_and_export_are_the_same_from_8_and_16_bit_records(records, tmp_path):
    from cxrjax.data import augment
    from cxrjax.eval import features
    from cxrjax.eval.export import export_embeddings
    from cxrjax.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh({"data": -1})
    aug = augment.AugmentConfig(size=28, where="host")
    model_cfg = _config(records[8], "host").model
    encoder = features.build_encoder(model_cfg, "random", seed=0, mesh=mesh)
    got, exported = {}, {}
    for depth, data_dir in records.items():
        feats, rows = features.extract_features(encoder, str(data_dir), "train", aug, mesh=mesh, batch_size=8,
                                                progress=False)
        got[depth] = feats
        out = tmp_path / f"emb{depth}.parquet"
        meta = export_embeddings(encoder, str(data_dir), str(out), mesh=mesh, augment=aug, raw_ids=True,
                                 batch_size=8, progress=False)
        exported[depth] = pd.read_parquet(out).sort_values("image_id")
        assert len(meta) == len(exported[depth])
    scale = np.abs(got[8]).mean()
    assert np.abs(got[8] - got[16]).mean() < 0.02 * scale  # rounding only (a 257x mix-up is ~100 % of scale)
    e8, e16 = (np.stack(exported[d]["embedding"].to_numpy()) for d in (8, 16))
    assert np.array_equal(exported[8]["image_id"].to_numpy(), exported[16]["image_id"].to_numpy())
    assert np.abs(e8 - e16).mean() < 0.02 * np.abs(e8).mean()
    assert jax.device_count() == 8
