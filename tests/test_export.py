"""Embedding export: round trip (rows, ids, vectors == a direct forward pass), pseudonymisation, npy format,
streaming in row groups, 16-bit records = 8-bit records, damaged checkpoints, and the command line."""

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

from cxrjax.eval import export
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
    # one pseudonym per patient and one patient per pseudonym (joins across images work, none merge)
    pairs = set(zip(raw.patient_id, got.patient_id))
    assert len(pairs) == raw.patient_id.nunique() == got.patient_id.nunique()
    # a re-export reuses the salt
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


def test_export_streams_in_row_groups(tmp_path, phantom, encoder):
    """Small chunks: many parquet row groups / npy blocks, the same rows and vectors as one in-memory pass."""
    enc, mesh = encoder
    whole = export.export_embeddings(enc, str(phantom), str(tmp_path / "a.parquet"), mesh=mesh, augment=AUG,
                                     raw_ids=True, progress=False)
    export.export_embeddings(enc, str(phantom), str(tmp_path / "b.parquet"), mesh=mesh, augment=AUG, raw_ids=True,
                             progress=False, chunk_rows=7)
    export.export_embeddings(enc, str(phantom), str(tmp_path / "c"), mesh=mesh, augment=AUG, raw_ids=True, fmt="npy",
                             progress=False, chunk_rows=5)
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    n_split = pd.read_parquet(phantom / "table.parquet").split.value_counts()
    assert pq.ParquetFile(tmp_path / "b.parquet").num_row_groups == sum(-(-n // 7) for n in n_split)
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 3  # one per split
    pd.testing.assert_frame_equal(a.drop(columns="embedding"), b.drop(columns="embedding"))
    np.testing.assert_array_equal(np.stack(a.embedding), np.stack(b.embedding))
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "embeddings.npy"), np.stack(a.embedding))
    assert pd.read_parquet(tmp_path / "c" / "metadata.parquet").row.tolist() == whole.row.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "c"]  # no temporary files left
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["embeddings.npy", "metadata.parquet"]


# ---------------------------------------------------------------------------------------------- 16-bit records


@pytest.fixture(scope="module")
def bit_depths(tmp_path_factory):
    """The same 8-bit PNG files prepared as 8-bit and as 16-bit records (`prepare --bit_depth=16`)."""
    from PIL import Image

    from cxrjax import prepare

    root = tmp_path_factory.mktemp("bits")
    rng = np.random.default_rng(0)
    rows = []
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(24):
        img = np.clip(60 + 4 * xx + 2 * yy * (i % 3) + rng.normal(0, 20, (32, 32)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img{i}.png")
        rows.append({"File": f"img{i}.png", "PID": f"p{i // 2}", "Split": ["train", "valid", "test"][(i // 2) % 3],
                     "Effusion": float(i % 2)})
    pd.DataFrame(rows).to_csv(root / "images.csv", index=False)
    out = {}
    for bits in (8, 16):
        out[bits] = root / f"bits{bits}"
        prepare.prepare_dataset("csv", out[bits], src=root / "images.csv", size=32, bit_depth=bits, workers=1,
                                csv_mapping="path=File,patient_id=PID,split=Split,Pleural Effusion=Effusion",
                                strategies=["instance"])
    return out


def test_16_bit_records_give_the_8_bit_features_and_export(tmp_path, bit_depths, encoder):
    from cxrjax.data import pipeline

    enc, mesh = encoder
    reader = {b: pipeline.RecordReader(d, "csv", "train") for b, d in bit_depths.items()}
    img8, img16 = reader[8].image(0), reader[16].image(0)
    assert img8.dtype == np.uint8 and img16.dtype == np.uint16  # really 16-bit records (= 257 x the 8-bit pixels)
    np.testing.assert_array_equal(img16, img8.astype(np.uint16) * 257)
    # eval at 24 px: the resize interpolates, so 16-bit pixels are no longer multiples of 257 (a uint8 buffer
    # would wrap them: 257 v mod 256 = v hides the bug at the prepared size); the 8-bit views are rounded to
    # 8 bits there, hence a tolerance (measured max deviation 0.8 % of the feature scale; 181 % before the fix)
    aug = augment_lib.AugmentConfig(size=24)
    feats = {b: features.extract_features(enc, str(d), "train", aug, mesh=mesh, batch_size=8, progress=False)
             for b, d in bit_depths.items()}
    np.testing.assert_array_equal(feats[8][1], feats[16][1])
    scale = np.abs(feats[8][0]).max()
    np.testing.assert_allclose(feats[16][0], feats[8][0], atol=0.03 * scale)
    for b in (8, 16):
        export.export_embeddings(enc, str(bit_depths[b]), str(tmp_path / f"{b}.parquet"), mesh=mesh, augment=aug,
                                 raw_ids=True, progress=False)
    e8, e16 = (np.stack(pd.read_parquet(tmp_path / f"{b}.parquet").embedding) for b in (8, 16))
    np.testing.assert_allclose(e16, e8, atol=0.03 * scale)
    np.testing.assert_allclose(e8[:len(feats[8][0])], feats[8][0], rtol=1e-5, atol=1e-6)  # train rows come first


@pytest.mark.slow
def test_16_bit_records_fine_tune_as_the_8_bit_ones(bit_depths, encoder):
    """One fine-tuning step (rotation + flip views, BatchNorm in train mode) on 8- vs 16-bit records of the same
    images: the same loss and the same updated BatchNorm running statistics, up to the rounding of the 8-bit
    views. (Train-mode BatchNorm hides an input scaled 257x from the loss, not from the running statistics
    that evaluation then uses: before the fix the first layer's running mean was ~257x off.)"""
    import re

    import jax

    from cxrjax.eval import linear

    enc, mesh = encoder
    table = pd.read_parquet(bit_depths[8] / "table.parquet")
    targets = linear.task_labels(table, [linear.Task("Pleural Effusion", "Pleural Effusion")])
    rows = np.flatnonzero(table.split == "train")
    assert len(rows) == 8  # one batch: one step
    losses, stats = {}, {}
    for b, d in bit_depths.items():
        logs = []
        tuned, _, _ = linear.finetune(enc, str(d), rows, targets, mesh=mesh, augment=AUG, epochs=1, lr=1e-3,
                                      batch_size=8, seed=0, note=logs.append)
        losses[b] = float(re.search(r"loss ([-\d.]+)", logs[0]).group(1))
        stats[b] = [np.asarray(x) for x in jax.tree.leaves(tuned.stats)]
    assert losses[8] == pytest.approx(np.log(2), abs=1e-3) and losses[16] == pytest.approx(losses[8], abs=1e-3)
    before = [np.asarray(x) for x in jax.tree.leaves(enc.stats)]
    assert any(not np.allclose(a, c) for a, c in zip(stats[8], before))  # the step did update them
    for a, c in zip(stats[16], stats[8]):  # measured: within 3 % of each statistic's scale (1e6x off before)
        np.testing.assert_allclose(a, c, rtol=0, atol=0.05 * np.abs(c).max())


# ---------------------------------------------------------------------------------------------- damaged checkpoints


def fake_moco_run(workdir: Path, enc) -> Path:
    """A MoCo-shaped run holding `enc` as the query encoder at step 1 (what restore_encoder reads)."""
    import json

    import orbax.checkpoint as ocp

    model = contrastive.default_config().model
    model.update(width=enc.source["width"])
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"job": "moco", "model": model.to_dict(), "augment": {"size": 32}}))
    (workdir / "run.json").write_text(json.dumps({"job": "moco", "strategy": "instance"}))
    with ocp.CheckpointManager(workdir / "checkpoints") as m:
        m.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"q_params": enc.params, "q_stats": enc.stats})))
        m.wait_until_finished()
    return workdir


@pytest.mark.slow
def test_command_line_reads_a_run_and_a_damaged_one_is_one_line(tmp_path, phantom, encoder):
    enc, _ = encoder
    run = fake_moco_run(tmp_path / "run", enc)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "cxrjax.export", f"--checkpoint={run}", f"--data={phantom}", "--splits=test"]
    r = subprocess.run(cmd + [f"--out={tmp_path / 'ok.parquet'}"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_parquet(phantom / "table.parquet")
    n_test = int((table.split == "test").sum())
    assert f"wrote {n_test} embeddings" in r.stdout and "pseudonymised" in r.stdout
    got = pd.read_parquet(tmp_path / "ok.parquet")
    assert len(got) == n_test and "path" not in got.columns
    direct = _direct_forward(enc, phantom, table)  # at 32 px: the size in the run's config.json
    np.testing.assert_allclose(np.stack(got.embedding), np.stack([direct[r] for r in got.row]), rtol=1e-4, atol=1e-5)
    nodata = subprocess.run(cmd[:3] + [f"--data={tmp_path}", f"--out={tmp_path / 'x.parquet'}"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert nodata.returncode == 1 and "holds no table.parquet" in nodata.stderr and "Traceback" not in nodata.stderr
    # user mistakes on the command line: one line on stderr, exit 2 (cxrjax.cli, as for main / linear_eval)
    for extra, says in ((["--sise=32"], "sise"), (["stray"], "unexpected arguments ['stray']"),
                        (["--format=csv"], "--format")):
        wrong = subprocess.run(cmd + [f"--out={tmp_path / 'w.parquet'}", *extra], capture_output=True, text=True,
                               env=env, timeout=300)
        assert wrong.returncode == 2 and says in wrong.stderr, (extra, wrong.stderr[-2000:])
        assert len(wrong.stderr.strip().splitlines()) == 1 and wrong.stderr.startswith("cxrjax.export: "), wrong.stderr
    for f in (run / "checkpoints" / "1" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and not f.name.startswith("_"):
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    bad = subprocess.run(cmd + ["--raw_ids", f"--out={tmp_path / 'bad.parquet'}"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-3000:]
    assert f"{run.resolve()}/checkpoints/1 cannot be read: the checkpoint is damaged (" in bad.stderr
    assert "the run has no other checkpoint" in bad.stderr
    assert not (tmp_path / "bad.parquet").exists()
