"""Embedding export: round trip (rows, ids, vectors == a direct forward pass), pseudonymisation, npy format,
and the command line."""

import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cxrjax import export
from cxrjax.data import augment as augment_lib
from cxrjax.data import pipeline
from cxrjax.eval import features
from cxrjax.train import contrastive

REPO = Path(__file__).resolve().parents[1]
AUG = augment_lib.AugmentConfig(size=32)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from cxrjax import prepare

    d = tmp_path_factory.mktemp("phantom")
    prepare.prepare_dataset("phantom", d, patients=24, size=40, workers=1, strategies=["study-same_lat-any"])
    return d


@pytest.fixture(scope="module")
def encoder():
    model = contrastive.default_config().model
    model.update(width=8)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return features.build_encoder(model, "random", seed=3, mesh=mesh), mesh


def _direct_forward(enc, data_dir, table):
    """Each image decoded from its record, eval-transformed, through the encoder one at a time (no mesh)."""
    from flax import nnx

    model = nnx.merge(enc.graphdef, jax.device_get(enc.params), jax.device_get(enc.stats))
    out = {}
    for split in ("train", "valid", "test"):
        data = pipeline.load_prepared(data_dir, split, None)
        reader = pipeline.RecordReader(data_dir, data.name, split)
        for rec, row in enumerate(data.split_rows):
            img = augment_lib.eval_transform(reader.image(rec), AUG)[None, ..., None]
            out[int(row)] = np.asarray(model.features(augment_lib.normalize(img), train=False))[0]
    return out


def test_parquet_round_trip_with_pseudonyms(tmp_path, phantom, encoder):
    enc, mesh = encoder
    out = tmp_path / "emb.parquet"
    meta = export.export_embeddings(enc, str(phantom), str(out), mesh=mesh, augment=AUG, batch_size=16, progress=False)
    table = pd.read_parquet(phantom / "table.parquet")
    got = pd.read_parquet(out)
    assert len(got) == len(table) == len(meta)  # one row per image of every split
    assert sorted(got.row) == list(range(len(table)))
    emb = np.stack(got.embedding.to_numpy())
    assert emb.shape == (len(table), enc.feature_dim) and emb.dtype == np.float32
    assert pq.read_schema(out).field("embedding").type.list_size == enc.feature_dim  # fixed-size list
    direct = _direct_forward(enc, phantom, table)
    np.testing.assert_allclose(emb, np.stack([direct[r] for r in got.row]), rtol=1e-4, atol=1e-5)

    # pseudonymised: salted HMAC of the raw id, the salt beside the file and nowhere in it
    salt = (tmp_path / "emb.parquet.salt.txt").read_text().strip()
    assert oct((tmp_path / "emb.parquet.salt.txt").stat().st_mode)[-3:] == "600"
    raw = table.iloc[got.row]
    for col in ("patient_id", "study_id", "image_id"):
        want = [hmac.new(salt.encode(), v.encode(), hashlib.sha256).hexdigest()[:16] for v in raw[col]]
        assert got[col].tolist() == want
        assert not set(got[col]) & set(table[col])
    assert "path" not in got.columns and "report" not in got.columns
    assert salt.encode() not in out.read_bytes()
    assert got.split.tolist() == raw.split.tolist() and got.view.tolist() == raw.view.tolist()
    # the same patient keeps one pseudonym (joins across images work); a re-export reuses the salt
    assert got.groupby("patient_id").size().sum() == len(got)
    again = export.export_embeddings(enc, str(phantom), str(out), mesh=mesh, augment=AUG, splits=("test",), progress=False)
    assert set(again.patient_id) <= set(got.patient_id)
    other = export.export_embeddings(enc, str(phantom), str(tmp_path / "o.parquet"), mesh=mesh, augment=AUG,
                                     splits=("test",), salt="another salt", progress=False)
    assert not set(other.patient_id) & set(got.patient_id)


def test_raw_ids_and_npy_format(tmp_path, phantom, encoder):
    enc, mesh = encoder
    meta = export.export_embeddings(enc, str(phantom), str(tmp_path / "npy"), mesh=mesh, augment=AUG, fmt="npy",
                                    raw_ids=True, splits=("valid", "test"), batch_size=8, progress=False)
    assert meta.columns[0] == "row" and "path" in meta.columns
    table = pd.read_parquet(phantom / "table.parquet")
    vecs = np.load(tmp_path / "npy" / "embeddings.npy")
    got = pd.read_parquet(tmp_path / "npy" / "metadata.parquet")
    want_rows = np.flatnonzero(table.split.isin(["valid", "test"]))
    assert len(vecs) == len(got) == len(want_rows) and sorted(got.row) == want_rows.tolist()
    for col in ("patient_id", "study_id", "image_id", "path"):
        assert got[col].tolist() == table.iloc[got.row][col].tolist()
    assert not (tmp_path / "npy" / "salt.txt").exists()  # raw ids: no salt made
    par = export.export_embeddings(enc, str(phantom), str(tmp_path / "p.parquet"), mesh=mesh, augment=AUG,
                                   raw_ids=True, splits=("valid", "test"), progress=False)
    # another batch size: same vectors up to float rounding (XLA picks per-shape convolution algorithms)
    np.testing.assert_allclose(np.stack(pd.read_parquet(tmp_path / "p.parquet").embedding), vecs, rtol=1e-5, atol=1e-5)
    assert par.row.tolist() == got.row.tolist()
    with pytest.raises(ValueError, match="none of the splits"):
        export.export_embeddings(enc, str(phantom), str(tmp_path / "x.parquet"), mesh=mesh, augment=AUG,
                                 splits=("holdout",), progress=False)


@pytest.mark.slow
def test_command_line(tmp_path, phantom):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = tmp_path / "cli.parquet"
    cmd = [sys.executable, "-m", "cxrjax.export", "--init=random", "--width=8", f"--data={phantom}", f"--out={out}",
           "--size=32", "--splits=test"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    n_test = int((pd.read_parquet(phantom / "table.parquet").split == "test").sum())
    assert f"wrote {n_test} embeddings" in r.stdout and "pseudonymised" in r.stdout
    assert len(pd.read_parquet(out)) == n_test
    bad = subprocess.run(cmd[:3] + [f"--data={tmp_path}", f"--out={out}", "--size=32"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode != 0 and "holds no table.parquet" in bad.stderr and "Traceback" not in bad.stderr
