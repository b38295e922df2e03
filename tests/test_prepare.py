"""prepare: records + table + pair indexes + manifest; resumable, idempotent, honest about bad input."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrjax import prepare
from cxrjax.data import images, pairs, records, schema


def _csv_dataset(tmp_path, n=12):
    """A generic-CSV dataset of real image files: 4 patients x 3 images, one missing, one corrupt."""
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"img/{i:03d}.png"
        if i == 5:
            (root / name).write_bytes(b"not a png at all")  # corrupt
        elif i != 7:  # 7 is missing
            a = (rng.random((40 + i, 30)) * 255).astype(np.uint8)
            Image.fromarray(a).save(root / name)
        rows.append({"File": name, "PID": f"P{i // 3}", "Exam": f"E{(i % 3) // 2}", "View": "PA" if i % 2 else "L"})
    pd.DataFrame(rows).to_csv(root / "list.csv", index=False)
    return root


def _prepare_csv(root, out, **kw):
    return prepare.prepare_dataset(
        "csv", out, src=root / "list.csv", csv_mapping="path=File,patient_id=PID,study_id=Exam,view=View",
        size=32, workers=1, shard_size=4, **kw,
    )


def test_csv_records_bad_inputs_and_tfds_read_back(tmp_path):
    m = _prepare_csv(_csv_dataset(tmp_path), tmp_path / "out")
    out = tmp_path / "out"
    assert m["input_rows"] == 12 and m["counts"]["images"] == 10
    reasons = {b["path"]: b["reason"] for b in m["bad_inputs"]["items"]}
    assert set(reasons) == {"img/005.png", "img/007.png"}
    assert "file not found" in reasons["img/007.png"] and "decode" in reasons["img/005.png"]
    assert json.loads((out / "manifest.json").read_text())["bad_inputs"]["count"] == 2

    table = pd.read_parquet(out / "table.parquet")
    assert len(table) == 10 and "img/005.png" not in set(table["path"])
    schema.validate_table(table)  # still a canonical table
    for split, part in table.groupby("split"):
        assert part["record"].tolist() == list(range(len(part)))
        source = records.open_split(out, "csv", split)
        assert len(source) == len(part)
        for _, row in part.iterrows():  # record i of a split is the i-th table row of that split
            ex = source[int(row["record"])]
            assert ex["image_id"].decode() == row["image_id"]
            assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint8
            expect = images.fit_image(images.load_image(tmp_path / "ds" / row["path"]), 32)
            np.testing.assert_array_equal(ex["image"][..., 0], expect)  # lossless


def test_rerun_is_idempotent_and_resumes(tmp_path):
    root, out = _csv_dataset(tmp_path), tmp_path / "out"
    first = _prepare_csv(root, out)
    assert first["records"]["shards_written_this_run"] > 0
    files = sorted(p.name for p in (out / "csv" / "1.0.0").iterdir())
    shard = sorted((out / "csv" / "1.0.0").glob("csv-train.array_record-*"))[0]
    before = shard.read_bytes()

    again = _prepare_csv(root, out)
    assert again["records"]["shards_written_this_run"] == 0  # nothing duplicated or rewritten
    assert sorted(p.name for p in (out / "csv" / "1.0.0").iterdir()) == files
    assert again["counts"] == first["counts"]

    # A run killed mid-shard leaves a .tmp and no progress file: the re-run rewrites just that shard.
    (out / "_progress" / f"train-00000-of-{len(first['records']['shard_lengths']['train']):05d}.json").unlink()
    shard.with_name(shard.name + ".tmp").write_bytes(b"partial")
    shard.unlink()
    resumed = _prepare_csv(root, out)
    assert resumed["records"]["shards_written_this_run"] == 1
    assert shard.read_bytes() == before
    assert sum(len(records.open_split(out, "csv", s)) for s in resumed["records"]["shard_lengths"]) == 10


def test_changed_plan_removes_stale_shards(tmp_path):
    root, out = _csv_dataset(tmp_path), tmp_path / "out"
    _prepare_csv(root, out)
    prepare.prepare_dataset("csv", out, src=root / "list.csv", csv_mapping="path=File,patient_id=PID,study_id=Exam,view=View",
                            size=32, workers=1, shard_size=100)
    splits = sorted(set(pd.read_parquet(out / "table.parquet")["split"]))
    assert len(splits) >= 2
    # one shard per split now; the 4-image shards of the first plan are gone
    names = sorted(p.name for p in (out / "csv" / "1.0.0").glob("*.array_record-*"))
    assert names == [f"csv-{s}.array_record-00000-of-00001" for s in splits]


def test_phantom_prepare_parallel_and_pairs(tmp_path):
    out = tmp_path / "ph"
    m = prepare.prepare_dataset("phantom", out, patients=12, size=48, workers=2, shard_size=8,
                                strategies=["instance", "study-same_lat-any"])
    table = pd.read_parquet(out / "table.parquet")
    assert m["bad_inputs"]["count"] == 0 and len(table) == m["input_rows"]
    assert sorted(p.name for p in (out / "pairs").iterdir()) == [
        "hard-patient-other-study.npz", "hard-study-other-laterality.npz", "instance.npz", "study-same_lat-any.npz"]
    index = pairs.load_pair_index(out / "pairs" / "study-same_lat-any.npz", n_rows=len(table))
    for i in range(len(table)):
        for j in index.group(i):
            assert table.at[j, "study_id"] == table.at[i, "study_id"]
            assert table.at[j, "split"] == table.at[i, "split"]
    # Parallel output equals sequential output, byte for byte.
    prepare.prepare_dataset("phantom", tmp_path / "seq", patients=12, size=48, workers=1, shard_size=8,
                            strategies=["instance"])
    for f in sorted((out / "phantom" / "1.0.0").glob("*.array_record-*")):
        assert f.read_bytes() == (tmp_path / "seq" / "phantom" / "1.0.0" / f.name).read_bytes()


def test_pairs_only(tmp_path):
    m = _prepare_csv(_csv_dataset(tmp_path), tmp_path / "out", pairs_only=True)
    table = pd.read_parquet(tmp_path / "out" / "table.parquet")
    assert m["records"] is None and len(table) == 12 and (table["record"] == -1).all()
    assert not (tmp_path / "out" / "csv").exists()
    assert set(m["pairs"]["strategies"]) == set(pairs.STRATEGIES) | {f"hard-{k}" for k in pairs.HARD_NEGATIVES}


def test_errors_are_clear(tmp_path):
    with pytest.raises(schema.MetadataError, match="unknown --source"):
        prepare.prepare_dataset("imagenet", tmp_path)
    with pytest.raises(schema.MetadataError, match="--src is required"):
        prepare.prepare_dataset("chexpert", tmp_path)
    with pytest.raises(ValueError, match="study-same_lat-any"):
        prepare.prepare_dataset("phantom", tmp_path, strategies=["same-study"])
    r = subprocess.run([sys.executable, "-m", "cxrjax.prepare", "--source=nih", f"--src={tmp_path}", f"--out={tmp_path}/o"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "Data_Entry_2017" in r.stderr


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "cxrjax.prepare", "--help"], capture_output=True, text=True)
    # absl exits 1 after --help; what matters is that the text is there.
    assert "--source" in r.stdout and "--pairs_only" in r.stdout and "Traceback" not in r.stderr


def test_real_shared_data(tmp_path, shared_data):
    m = prepare.prepare_dataset("shared", tmp_path, src=shared_data, size=64, workers=2,
                                strategies=["study-same_lat-any"],
                                reports=shared_data / "iu-reports" / "NLMCXR_reports.tgz")
    assert m["input_rows"] == 1384 and m["bad_inputs"]["count"] == 0 and m["counts"]["images"] == 1384
    assert m["reports"] == 3955
    table = pd.read_parquet(tmp_path / "table.parquet")
    assert set(table["source"]) == {"covid-chestxray", "nih-cxr14"}
    ex = records.open_split(tmp_path, "shared", "train")[0]
    first = table[table["split"] == "train"].iloc[0]
    assert ex["image_id"].decode() == first["image_id"] and ex["image"].shape == (64, 64, 1)
    np.testing.assert_array_equal(ex["labels"], first[list(schema.CHEXPERT_LABELS)].to_numpy(np.float32))


def test_no_tensorflow_needed(tmp_path):
    """Writing and reading records never imports TensorFlow (TFDS's numpy path only)."""
    code = (
        "import sys\n"
        "from cxrjax import prepare\n"
        "from cxrjax.data import records\n"
        f"prepare.prepare_dataset('phantom', r'{tmp_path}', patients=3, size=32, workers=1, strategies=['instance'])\n"
        f"x = records.open_split(r'{tmp_path}', 'phantom', 'train')[0]\n"
        "assert x['image'].shape == (32, 32, 1)\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_raw_pixel_records(tmp_path):
    """--pixels=raw: the same pixels as the PNG records, as a fixed-shape TFDS Tensor that TFDS reads
    back (no TensorFlow); the reader tells the formats apart; switching format rewrites the shards."""
    root = _csv_dataset(tmp_path)
    png = _prepare_csv(root, tmp_path / "png")
    raw = _prepare_csv(root, tmp_path / "raw", pixels="raw")
    assert raw["records"]["pixels"] == "raw" and png["records"]["pixels"] == "png"
    assert raw["counts"] == png["counts"]
    assert records.image_format(tmp_path / "raw", "csv") == records.ImageFormat("raw", "uint8", (32, 32))
    assert records.image_format(tmp_path / "png", "csv") == records.ImageFormat("png", "uint8", None)
    for split in png["records"]["shard_lengths"]:
        a, b = records.open_split(tmp_path / "png", "csv", split), records.open_split(tmp_path / "raw", "csv", split)
        for i in range(len(a)):
            assert b[i]["image"].shape == (32, 32) and b[i]["image"].dtype == np.uint8
            np.testing.assert_array_equal(b[i]["image"], a[i]["image"][..., 0])
            assert b[i]["image_id"] == a[i]["image_id"]
    # raw records hold size*size bytes of pixels (+ the metadata) per image
    assert raw["records"]["bytes"] >= 10 * 32 * 32
    again = _prepare_csv(root, tmp_path / "raw", pixels="raw")
    assert again["records"]["shards_written_this_run"] == 0
    switched = _prepare_csv(root, tmp_path / "raw")  # same out, PNG now: every shard is rewritten
    assert switched["records"]["shards_written_this_run"] == sum(map(len, png["records"]["shard_lengths"].values()))
    assert records.image_format(tmp_path / "raw", "csv").pixels == "png"
    with pytest.raises(ValueError, match="--pixels must be one of"):
        _prepare_csv(root, tmp_path / "bad", pixels="jpeg")
