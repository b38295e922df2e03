"""TFDS interoperability: cxrjax datasets as TFDS builders, and any TFDS dataset as training input.

Everything here runs without TensorFlow (the last test checks that it was never imported).
The foreign dataset is written by TFDS's own writer (GeneratorBasedBuilder, array_record, JPEG bytes),
which works without TensorFlow in tensorflow-datasets 4.9.10.
"""

import inspect
import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cxrjax.data import metadata, pairs, pipeline, schema, tfds_builders, tfds_source

STRATEGIES = ["instance", "study-same_lat-any"]


# ----------------------------------------------------------------------------------------------
# Builders


def _build_phantom(data_dir, **kw):
    options = dict(patients=8, size=32, workers=1, shard_size=8, strategies=STRATEGIES)
    b = tfds.builder("cxr_phantom", data_dir=data_dir, **{**options, **kw})
    b.download_and_prepare()
    return b


def test_builders_are_registered_with_versions_and_instructions():
    assert sorted(tfds_builders.BUILDERS) == ["cxr_chexpert", "cxr_covid", "cxr_mimic", "cxr_nih14", "cxr_phantom"]
    for name, cls in tfds_builders.BUILDERS.items():
        assert tfds.builder_cls(name) is cls
        assert str(cls.VERSION) == "1.0.0"
        # every real dataset is a manual download whose instructions name the files it needs
        assert bool(cls.MANUAL_DOWNLOAD_INSTRUCTIONS) == (name != "cxr_phantom")


@pytest.fixture(scope="module")
def phantom_tfds(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    _build_phantom(d)
    return d


def test_phantom_builder_reads_back_with_data_source(phantom_tfds):
    d = phantom_tfds
    prepared = tfds_builders.prepared_dir(d, "cxr_phantom")
    assert prepared == d / "cxr_phantom" / "1.0.0" / "cxrjax"
    table = pd.read_parquet(prepared / "table.parquet")
    assert sorted(p.name for p in (prepared / "pairs").iterdir()) == sorted(
        [f"{s}.npz" for s in STRATEGIES] + [f"hard-{k}.npz" for k in pairs.HARD_NEGATIVES])
    assert not list((d / "cxr_phantom").glob(".*cxrjax-work"))  # the work folder became `cxrjax/`
    for split, part in table.groupby("split"):
        ds = tfds.data_source("cxr_phantom", data_dir=d, split=split)
        assert len(ds) == len(part)
        for _, row in part.iterrows():
            ex = ds[int(row["record"])]
            assert ex["image_id"].decode() == row["image_id"] and ex["patient_id"].decode() == row["patient_id"]
            assert ex["study_id"].decode() == row["study_id"] and ex["view"].decode() == row["view"]
            assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint8
            np.testing.assert_array_equal(ex["labels"], row[list(schema.CHEXPERT_LABELS)].to_numpy(np.float32))
    # The TFDS folder and the prepared folder share the shard files (hard links, not copies).
    shards = sorted(p.name for p in (d / "cxr_phantom" / "1.0.0").glob("*.array_record-*"))
    assert shards and shards == sorted(p.name for p in (prepared / "cxr_phantom" / "1.0.0").glob("*.array_record-*"))
    assert {s.split(".array_record")[0] for s in shards} == {f"cxr_phantom-{split}" for split in set(table["split"])}
    for shard in shards:
        assert (d / "cxr_phantom" / "1.0.0" / shard).samefile(prepared / "cxr_phantom" / "1.0.0" / shard)
    # The prepared folder is what the pipeline reads: same records, same number of them.
    data = pipeline.load_prepared(prepared, "train", "study-same_lat-any")
    assert data.name == "cxr_phantom" and len(pipeline.RecordReader(prepared, data.name, "train")) == data.n


def test_built_dataset_is_reused_and_builder_pickles(phantom_tfds):
    b = tfds.builder("cxr_phantom", data_dir=phantom_tfds)
    assert b.info.file_format.value == "array_record"
    assert {s: b.info.splits[s].num_examples for s in b.info.splits} == {
        s: int(n) for s, n in pd.read_parquet(tfds_builders.prepared_dir(phantom_tfds, "cxr_phantom") /
                                              "table.parquet")["split"].value_counts().items()}
    before = sorted(p.name for p in (phantom_tfds / "cxr_phantom" / "1.0.0").iterdir())
    b.download_and_prepare()  # exists: reused, nothing rebuilt
    assert sorted(p.name for p in (phantom_tfds / "cxr_phantom" / "1.0.0").iterdir()) == before
    clone = pickle.loads(pickle.dumps(tfds.builder("cxr_phantom", data_dir=phantom_tfds, size=32)))
    assert clone._prepare_options["size"] == 32 and clone.data_dir == b.data_dir


def test_manual_dataset_without_manual_dir_says_what_to_download(tmp_path):
    b = tfds.builder("cxr_nih14", data_dir=tmp_path / "tfds")
    with pytest.raises(AssertionError, match="Data_Entry_2017"):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "empty")))


def test_covid_collection_builder(tmp_path, shared_data):
    src = shared_data / "covid-chestxray"
    b = tfds.builder("cxr_covid", data_dir=tmp_path, size=32, workers=2, strategies=["study-same_lat-any"])
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(src)))
    expected = schema.validate_table(metadata.load_source("covid", src).table)
    table = pd.read_parquet(tfds_builders.prepared_dir(tmp_path, "cxr_covid") / "table.parquet")
    assert len(table) == len(expected) == 384  # every image of the collection readable (README)
    assert sorted(table["image_id"]) == sorted(expected["image_id"])  # table.parquet is in record order
    for split, part in table.groupby("split"):
        ds = tfds.data_source("cxr_covid", data_dir=tmp_path, split=split)
        assert len(ds) == len(part) == b.info.splits[split].num_examples
        ids = [ds[i]["image_id"].decode() for i in range(len(ds))]
        assert ids == part.sort_values("record")["image_id"].tolist()
        first = ds[0]
        assert first["image"].shape == (32, 32, 1) and first["source"].decode() == "covid-chestxray"


def test_raw_pixel_build_is_itself_a_tfds_source(tmp_path):
    """A cxrjax dataset read back through the generic TFDS path gives the same table and pixels."""
    _build_phantom(tmp_path, pixels="raw")
    prepared = tfds_builders.prepared_dir(tmp_path, "cxr_phantom")
    identity = {k: k for k in ("image", "image_id", "patient_id", "study_id", "study_order", "view", "report",
                               "labels")}
    source = tfds_source.TfdsSource("cxr_phantom", str(tmp_path), {"train": "train", "valid": "valid"}, identity)
    table = tfds_source.canonical_table(source)
    want = pd.read_parquet(prepared / "table.parquet")
    want = want[want["split"].isin(["train", "valid"])].reset_index(drop=True)
    columns = ["image_id", "patient_id", "study_id", "study_order", "view", "laterality", "split", "record",
               "report", *schema.CHEXPERT_LABELS]
    pd.testing.assert_frame_equal(table[columns], want[columns], check_dtype=False)
    reader, records = tfds_source.TfdsReader(source, "train"), pipeline.RecordReader(prepared, "cxr_phantom", "train")
    assert reader._decoder.raw_image == (np.dtype(np.uint8), (32, 32))
    for record in (0, len(reader) - 1):
        np.testing.assert_array_equal(reader.image(record), records.image(record))


# ----------------------------------------------------------------------------------------------
# A foreign TFDS dataset: other feature names, JPEG colour images, ClassLabel views


class ForeignCxr(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """16 training images (4 patients x 2 visits x frontal+lateral) + 4 validation images."""

    VERSION = tfds.core.Version("2.1.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # see CxrBuilder.code_path (TFDS 4.9.10 needs importlib_resources otherwise)
        return epath.Path(inspect.getfile(cls))

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "xray": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "subject": tfds.features.Text(), "visit": np.int64, "day": np.int64,
            "projection": tfds.features.ClassLabel(names=["PA", "AP", "LL"]),
            "effusion": np.int64, "note": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(16)), "validation": self._generate_examples(range(16, 20))}

    def _generate_examples(self, indices):
        for i in indices:
            yield f"img{i:02d}", foreign_example(i)


def foreign_example(i: int) -> dict:
    rng = np.random.default_rng(i)
    rgb = (rng.random((20 + i, 24, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return {"xray": buf.getvalue(), "subject": f"s{i // 4}", "visit": (i % 4) // 2, "day": 10 * ((i % 4) // 2),
            "projection": 2 if i % 2 else i % 4 // 2, "effusion": (i // 4) % 2, "note": f"note {i}"}


FEATURE_MAP = {"image": "xray", "patient_id": "subject", "study_id": "visit", "study_order": "day",
               "view": "projection", "report": "note", "pleural_effusion": "effusion"}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign")
    ForeignCxr(data_dir=d, file_format="array_record").download_and_prepare()
    return tfds_source.TfdsSource("foreign_cxr", str(d), {"train": "train", "valid": "validation"}, FEATURE_MAP)


def test_foreign_source_canonical_table(foreign):
    table = tfds_source.canonical_table(foreign)
    assert len(table) == 20 and table["split"].value_counts().to_dict() == {"train": 16, "valid": 4}
    # TFDS stores examples shuffled by key: compare row by row with what tfds.data_source returns.
    for split, source_split in (("train", "train"), ("valid", "validation")):
        ds = tfds.data_source("foreign_cxr", data_dir=foreign.data_dir, split=source_split)
        part = table[table["split"] == split].sort_values("record")
        assert part["record"].tolist() == list(range(len(ds)))
        for record, row in zip(part["record"], part.itertuples()):
            ex = ds[record]
            i = int(ex["note"].decode().split()[1])
            want = foreign_example(i)
            assert row.patient_id == want["subject"]
            assert row.study_id == f"{want['subject']}/{want['visit']}"
            assert row.study_order == want["visit"]  # days 0 / 10 ranked within the patient
            assert row.view == ["PA", "AP", "LATERAL"][want["projection"]]
            assert row.laterality == ("lateral" if i % 2 else "frontal")
            assert row.report == f"note {i}" and row.source == "tfds:foreign_cxr"
            assert row.image_id == f"foreign_cxr/{source_split}/{record}"
    assert table["Pleural Effusion"].tolist() == [(int(p[1:]) % 2) for p in table["patient_id"]]
    assert table[[c for c in schema.CHEXPERT_LABELS if c != "Pleural Effusion"]].isna().all().all()


def test_foreign_source_pairs_and_reader(foreign, tmp_path):
    m = tfds_source.materialize(foreign, tmp_path / "view", strategies=["study-same_lat-any"])
    assert m["counts"]["images"] == 20 and m["tfds_source"]["feature_map"] == FEATURE_MAP
    table = pd.read_parquet(tmp_path / "view" / "table.parquet")
    index = pairs.load_pair_index(tmp_path / "view" / "pairs" / "study-same_lat-any.npz", n_rows=len(table))
    for row in range(len(table)):
        # each study is one frontal + one lateral image: the group is exactly the other one
        others = table.index[(table["study_id"] == table.at[row, "study_id"]) & (table.index != row)].tolist()
        assert sorted(index.group(row).tolist()) == others and len(others) == 1
    reader = tfds_source.open_reader(tmp_path / "view", "foreign_cxr", "train")
    assert isinstance(reader, tfds_source.TfdsReader) and len(reader) == 16
    reader = pickle.loads(pickle.dumps(reader))  # workers receive it pickled
    ds = tfds.data_source("foreign_cxr", data_dir=foreign.data_dir, split="train")
    for record in (0, 7, 15):
        gray = reader.image(record)
        want = np.asarray(Image.fromarray(ds[record]["xray"]).convert("L"))  # TFDS's decode, then luma
        assert gray.dtype == np.uint8 and gray.ndim == 2
        np.testing.assert_array_equal(gray, want)
        f = reader.features(record, ("report", "labels"))
        assert f["report"] == ds[record]["note"].decode()
        assert f["labels"][schema.CHEXPERT_LABELS.index("Pleural Effusion")] == ds[record]["effusion"]
    # the prepared folder is a drop-in for the pipeline's table/pair loading
    data = pipeline.load_prepared(tmp_path / "view", "train", "study-same_lat-any")
    assert data.name == "foreign_cxr" and data.n == 16
    assert isinstance(pipeline.open_reader(data), tfds_source.TfdsReader)  # what the training pipeline reads


def test_foreign_source_errors_name_the_problem(foreign):
    with pytest.raises(tfds_source.TfdsSourceError, match="has no feature 'patient' \\(feature_map patient_id\\)"):
        tfds_source.canonical_table(tfds_source.TfdsSource(foreign.name, foreign.data_dir, {"train": "train"},
                                                           {**FEATURE_MAP, "patient_id": "patient"}))
    with pytest.raises(tfds_source.TfdsSourceError, match="needs \\['patient_id'\\]"):
        tfds_source.TfdsSource(foreign.name, foreign.data_dir, {"train": "train"}, {"image": "xray"})
    with pytest.raises(tfds_source.TfdsSourceError, match="unknown canonical name"):
        tfds_source.TfdsSource(foreign.name, foreign.data_dir, {"train": "train"}, {**FEATURE_MAP, "effusion": "x"})
    with pytest.raises(tfds_source.TfdsSourceError, match="no split 'test'"):
        tfds_source.canonical_table(
            tfds_source.TfdsSource(foreign.name, foreign.data_dir, {"test": "test"}, FEATURE_MAP))
    with pytest.raises(tfds_source.TfdsSourceError, match="not found under"):
        tfds_source.TfdsSource("no_such_cxr", foreign.data_dir, {"train": "train"}, FEATURE_MAP).builder()
    # the same patient in two splits is refused (patient-level splits), naming the patient
    leak = tfds_source.TfdsSource(foreign.name, foreign.data_dir, {"train": "train", "valid": "validation"},
                                  {**FEATURE_MAP, "patient_id": "effusion"})
    with pytest.raises(schema.MetadataError, match="more than one split"):
        tfds_source.canonical_table(leak)


def test_from_config_and_prepared_view(foreign, tmp_path):
    import ml_collections as mlc

    c = mlc.ConfigDict(dict(name=foreign.name, data_dir=foreign.data_dir, split="train=train,valid=validation",
                            feature_map={**FEATURE_MAP, "labels": "", "image_id": ""}))
    source = tfds_source.TfdsSource.from_config(c)
    assert source.splits == {"train": "train", "valid": "validation"} and source.feature_map == FEATURE_MAP
    d = tfds_source.prepared_view(source, strategies=["study-same_lat-any"], cache=tmp_path, note=lambda s: None)
    assert Path(d).parent == tmp_path and tfds_source.read_manifest_source(d) == source.to_json()
    mtime = (Path(d) / "table.parquet").stat().st_mtime_ns
    assert tfds_source.prepared_view(source, strategies=["study-same_lat-any"], cache=tmp_path) == d
    assert (Path(d) / "table.parquet").stat().st_mtime_ns == mtime  # cached, not rewritten
    with pytest.raises(tfds_source.TfdsSourceError, match="unknown key"):
        tfds_source.TfdsSource.from_config({**dict(c), "splits": "x"})


# ----------------------------------------------------------------------------------------------
# Training from TFDS-built data


def _demo_config(data_dir):
    from cxrjax.train import contrastive

    c = contrastive.apply_variants(contrastive.default_config(), "demo")
    c.data.dir = str(data_dir)
    c.augment.size = 24
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 3, 1, 3
    c.moco.queue_size, c.moco.shuffle_bn_groups = 16, 2
    return c


@pytest.mark.slow
def test_train_demo_steps_from_builder_and_foreign_source(phantom_tfds, foreign, tmp_path, monkeypatch):
    # (1) a cxrjax builder's output: a prepared folder, no pipeline change needed
    _train_three_steps(_demo_config(tfds_builders.prepared_dir(phantom_tfds, "cxr_phantom")), tmp_path / "run-builder")

    # (2) a foreign TFDS dataset through its feature map (config.data.tfds), prepared into the cache
    config = _demo_config("")
    monkeypatch.setenv("CXRJAX_CACHE", str(tmp_path / "cache"))
    config.data.tfds.update(name=foreign.name, data_dir=foreign.data_dir, split="train=train,valid=validation")
    config.data.tfds.feature_map.update(FEATURE_MAP)
    _train_three_steps(config, tmp_path / "run-foreign")
    views = [p for p in (tmp_path / "cache").rglob("table.parquet")]
    assert len(views) == 1 and len(pd.read_parquet(views[0])) == 20  # the foreign metadata, prepared once


def _train_three_steps(config, workdir):
    from cxrjax.train import contrastive, metrics

    last = contrastive.train_and_evaluate(config, str(workdir))
    logged = metrics.read_jsonl(workdir / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2, 3] and np.isfinite(last["loss"])
    assert (workdir / "checkpoints" / "3").is_dir()


# ----------------------------------------------------------------------------------------------
# No TensorFlow anywhere


def test_build_and_read_in_a_fresh_process_without_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "import tensorflow_datasets as tfds\n"
        "import cxrjax.data.tfds_builders\n"
        f"tfds.builder('cxr_phantom', data_dir=r'{tmp_path}', patients=3, size=32, workers=1,"
        " strategies=['instance']).download_and_prepare()\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    # A notebook that never imports cxrjax: TFDS finds the dataset from its files alone.
    code = (
        "import sys\n"
        "import tensorflow_datasets as tfds\n"
        f"ds = tfds.data_source('cxr_phantom', data_dir=r'{tmp_path}', split='train')\n"
        "assert ds[0]['image'].shape == (32, 32, 1) and 'cxrjax' not in sys.modules\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_this_module_never_imported_tensorflow():
    assert "tensorflow" not in sys.modules
