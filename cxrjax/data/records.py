"""Sharded ArrayRecord files of prepared images: one record format, and it is a TFDS dataset.

Each record is a `tfds.features.FeaturesDict`-serialized example (image + the canonical metadata),
written by our own parallel workers, and the folder gets TFDS's `dataset_info.json`/`features.json`,
so the same files are read by the Grain pipeline and by `tfds.data_source(name, data_dir=...)` in a
notebook — without TensorFlow. Layout under the prepare output dir `OUT`:

    OUT/<name>/1.0.0/<name>-<split>.array_record-00000-of-00004   (+ dataset_info.json, features.json)
    OUT/_progress/<split>-00000-of-00004.json                      (one per finished shard)

A shard is written to a temporary file and renamed when complete; its progress file records which
images it holds and which failed. A re-run with the same plan skips finished shards, so an
interrupted prepare resumes and a repeated one duplicates nothing.

Pixels are stored one of two ways (`pixels=`), and the reader tells them apart from `features.json`:

* "png": a `tfds.features.Image` (PNG bytes; ~2x smaller for real radiographs, costs a decode per read);
* "raw": a fixed-shape `tfds.features.Tensor` (size, size) uint8/uint16 with BYTES encoding: the
  record holds the pixels as they are, so reading an image is one copy out of the record, no decode.
  TFDS decodes it without TensorFlow too (`np.frombuffer`).

Records are in table order within each split; images that fail to load are left out, listed with
their reason, and the surviving rows get a `record` column: their index in their split's data source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from cxrjax.data import images, schema

RECORD_VERSION = "1.0.0"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
TEXT_FEATURES = ("image_id", "patient_id", "study_id", "view", "laterality", "report", "source")
PIXEL_FORMATS = ("png", "raw")


def image_feature(bit_depth: int = 8, pixels: str = "png", size: int | None = None):
    """The TFDS feature of the image: PNG-encoded, or the raw (size, size) pixels."""
    import tensorflow_datasets as tfds

    dtype = np.uint16 if bit_depth == 16 else np.uint8
    if pixels == "png":
        return tfds.features.Image(shape=(None, None, 1), dtype=dtype, encoding_format="png")
    if pixels == "raw":
        if not size:
            raise ValueError("raw pixel records need the image size")
        # BYTES: the array's bytes in one bytes_list entry (the default would write a varint per pixel)
        return tfds.features.Tensor(shape=(size, size), dtype=dtype, encoding=tfds.features.Encoding.BYTES)
    raise ValueError(f"pixels must be one of {PIXEL_FORMATS}, got {pixels!r}")


def record_features(bit_depth: int = 8, pixels: str = "png", size: int | None = None):
    """The TFDS features of one record (what `tfds.data_source(...)[i]` returns)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "image": image_feature(bit_depth, pixels, size),
            # Where the image lies in the stored square (top, left, height, width): padded / `shorter`
            # records hold black around it, which augmentation must not treat as anatomy.
            "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
            **{name: tfds.features.Text() for name in TEXT_FEATURES},
            "study_order": np.int64,
            # The 14 CheXpert observations in schema.CHEXPERT_LABELS order: 1, 0, -1 or NaN (blank).
            "labels": tfds.features.Tensor(shape=(len(schema.CHEXPERT_LABELS),), dtype=np.float32),
        }
    )


# --- where the pixels come from -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileImages:
    """Images read from files under `root` (row['path'] is relative to it)."""

    root: str
    bit_depth: int = 8

    def __call__(self, row: dict, size: int, fit: str, max_aspect: float = images.MAX_ASPECT):
        """(stored square, content box) of one row's image file."""
        return images.fit_image_box(images.load_image(Path(self.root) / row["path"], self.bit_depth), size, fit,
                                    max_aspect)

    def describe(self) -> str:
        return f"files:{Path(self.root).resolve()}:{self.bit_depth}"


@dataclasses.dataclass(frozen=True)
class PhantomImages:
    """Images rendered by the phantom generator from the row itself (no files)."""

    def __call__(self, row: dict, size: int, fit: str, max_aspect: float = images.MAX_ASPECT):
        """(stored square, content box): the rendered (size, size) radiograph, fitted like a file's."""
        from cxrjax.data import phantom

        if multiprocessing.parent_process() is not None:
            phantom.tune_allocator()  # a dedicated worker process: the allocator tweak doubles throughput
        return images.fit_image_box(phantom.render_image(row, size=size), size, fit, max_aspect)

    def describe(self) -> str:
        return "phantom"


# --- the shard plan -------------------------------------------------------------------------------


@dataclasses.dataclass
class ShardTask:
    split: str
    index: int
    count: int
    positions: np.ndarray  # table positions of the shard's rows, in table order
    fingerprint: str
    rows: list | None = None  # the rows as dicts, filled only while the shard is being dispatched

    @property
    def tag(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}"


@dataclasses.dataclass(frozen=True)
class WriteSettings:
    out: str
    name: str
    size: int
    fit: str
    bit_depth: int
    compress_level: int
    image_source: Callable
    pixels: str = "png"
    max_aspect: float = images.MAX_ASPECT  # fit="shorter"

    def __post_init__(self):
        if self.pixels not in PIXEL_FORMATS:
            raise ValueError(f"pixels must be one of {PIXEL_FORMATS}, got {self.pixels!r}")

    @property
    def canvas(self) -> int:
        """Side of the stored square images (`size`, or more for fit="shorter")."""
        return images.canvas_size(self.size, self.fit, self.max_aspect)

    @property
    def records_dir(self) -> Path:
        return Path(self.out) / self.name / RECORD_VERSION

    def shard_path(self, task: ShardTask) -> Path:
        return self.shard_file(task.split, task.index, task.count)

    def shard_file(self, split: str, index: int, count: int) -> Path:
        return self.records_dir / f"{self.name}-{split}.array_record-{index:05d}-of-{count:05d}"

    def progress_path(self, task: ShardTask) -> Path:
        return Path(self.out) / "_progress" / f"{task.tag}.json"


def plan_shards(table: pd.DataFrame, settings: WriteSettings, shard_size: int) -> list[ShardTask]:
    """Cut each split (in table order) into shards of at most `shard_size` images."""
    source = settings.image_source.describe()
    tasks = []
    ids = table["image_id"].to_numpy()
    for split in schema.SPLITS:
        where = np.flatnonzero((table["split"] == split).to_numpy())
        count = -(-len(where) // shard_size)
        for index in range(count):
            positions = where[index * shard_size : (index + 1) * shard_size]
            key = [RECORD_VERSION, source, settings.size, settings.fit, settings.bit_depth,
                   settings.compress_level, split, ids[positions].tolist()]
            if settings.pixels != "png":  # keeps the fingerprints of existing PNG shards unchanged
                key.append(settings.pixels)
            if settings.fit == "shorter":
                key.append(settings.max_aspect)
            key = json.dumps(key)
            tasks.append(ShardTask(split, index, count, positions, hashlib.sha256(key.encode()).hexdigest()))
    return tasks


def _with_rows(tasks: list[ShardTask], table: pd.DataFrame, settings: WriteSettings):
    """Yield (task, settings) with the task's rows materialised just in time (constant memory: the
    pool's feeder blocks on its pipe, so only the shards in flight are held as dicts)."""
    for task in tasks:
        yield dataclasses.replace(task, rows=table.iloc[task.positions].to_dict("records")), settings


class _Serializer:
    """FeaturesDict -> bytes, with proto map keys sorted.

    TFDS's own `serialize_example` writes the feature map in hash order, which changes with each
    process's string-hash seed: same content, different bytes. Sorted keys make a shard's bytes a
    pure function of its inputs (parallel == sequential == re-run).
    """

    def __init__(self, bit_depth: int, pixels: str = "png", size: int | None = None):
        from tensorflow_datasets.core import example_serializer

        self.features = record_features(bit_depth, pixels, size)
        self._proto = example_serializer.ExampleSerializer(self.features.get_serialized_info())

    def __call__(self, example: dict) -> bytes:
        encoded = self.features.encode_example(example)
        return self._proto.get_tf_example(encoded).SerializeToString(deterministic=True)


_SERIALIZERS: dict = {}


def writer_options(pixels: str) -> str:
    """ArrayRecord options: one record per chunk (random access). PNG bytes are already compressed;
    raw pixels are stored uncompressed, because fast reading is what they are for: a 256 px phantom
    image took 182 CPU-us to read with ArrayRecord's default zstd vs 88 uncompressed, which costs 15%
    more bytes (64.8 vs 56.5 KiB per record)."""
    return "group_size:1,uncompressed" if pixels == "raw" else "group_size:1"


def write_shard(task: ShardTask, settings: WriteSettings) -> dict:
    """Write one shard (atomically) and its progress file; returns the progress record."""
    from array_record.python import array_record_module

    which = (settings.bit_depth, settings.pixels, settings.canvas)
    serialize = _SERIALIZERS.get(which)
    if serialize is None:
        serialize = _SERIALIZERS[which] = _Serializer(*which)
    final = settings.shard_path(task)
    tmp = final.with_name(final.name + ".tmp")
    ok, failed = [], []
    writer = array_record_module.ArrayRecordWriter(str(tmp), writer_options(settings.pixels))
    try:
        for row in task.rows:
            try:
                image, box = settings.image_source(row, settings.size, settings.fit, settings.max_aspect)
                example = {
                    **{name: str(row[name]) for name in TEXT_FEATURES},
                    "image": _image_value(image, settings),
                    "box": np.asarray(box, np.int32),
                    "study_order": int(row["study_order"]),
                    "labels": np.asarray([row[c] for c in schema.CHEXPERT_LABELS], np.float32),
                }
                writer.write(serialize(example))
                ok.append(row["image_id"])
            except Exception as e:  # one bad image must not end a run of hours: list it and go on
                failed.append({"image_id": row["image_id"], "path": row["path"], "reason": f"{type(e).__name__}: {e}"})
    finally:
        writer.close()
    os.replace(tmp, final)
    progress = {"fingerprint": task.fingerprint, "ok": ok, "failed": failed}
    ppath = settings.progress_path(task)
    ppath.write_text(json.dumps(progress))
    return progress


def _image_value(image: np.ndarray, settings: WriteSettings):
    if settings.pixels == "png":
        # Already-encoded PNG bytes: TFDS stores them as they are (no TF, our compression level).
        return images.encode_png(image, settings.compress_level)
    image = np.asarray(image)
    image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    if image.shape != (settings.canvas, settings.canvas):
        raise ValueError(f"image has shape {image.shape}, raw records need ({settings.canvas}, {settings.canvas})")
    return image


def _write_shard_star(args) -> tuple[str, dict]:
    task, settings = args
    return task.tag, write_shard(task, settings)


def _finished(task: ShardTask, settings: WriteSettings) -> dict | None:
    """The progress record of a shard finished by an earlier run with the same plan, else None."""
    ppath = settings.progress_path(task)
    if not (ppath.is_file() and settings.shard_path(task).is_file()):
        return None
    try:
        progress = json.loads(ppath.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return progress if progress.get("fingerprint") == task.fingerprint else None


@dataclasses.dataclass
class RecordsResult:
    table: pd.DataFrame  # rows whose image was written, with `record` (index within its split)
    failed: list  # dicts image_id, path, reason
    shard_lengths: dict  # split -> [records per shard]
    written: int  # shards written by this run (the rest were already done)


def write_records(
    table: pd.DataFrame,
    settings: WriteSettings,
    *,
    shard_size: int = 1024,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> RecordsResult:
    """Write all splits of `table` as sharded records; parallel over shards, resumable, idempotent.

    `workers=0` uses every core; 1 writes in this process. `progress(n)` is called with the number of
    images each finished shard covered.
    """
    settings.records_dir.mkdir(parents=True, exist_ok=True)
    (Path(settings.out) / "_progress").mkdir(parents=True, exist_ok=True)
    tasks = plan_shards(table, settings, shard_size)
    _remove_stale_shards(settings, tasks)
    results: dict[str, dict] = {}
    todo = []
    for task in tasks:
        done = _finished(task, settings)
        if done is None:
            todo.append(task)
        else:
            results[task.tag] = done
            if progress:
                progress(len(task.positions))
    workers = workers or os.cpu_count() or 1
    if todo:
        if workers == 1 or len(todo) == 1:
            completed: Iterable = (_write_shard_star(args) for args in _with_rows(todo, table, settings))
            for tag, record in completed:
                results[tag] = record
                if progress:
                    progress(len(record["ok"]) + len(record["failed"]))
        else:
            # spawn: workers must not inherit a parent that may hold JAX/XLA threads.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(todo))) as pool:
                for tag, record in pool.imap_unordered(_write_shard_star, _with_rows(todo, table, settings)):
                    results[tag] = record
                    if progress:
                        progress(len(record["ok"]) + len(record["failed"]))

    failed, shard_lengths, keep = [], {}, []
    for task in tasks:
        record = results[task.tag]
        shard_lengths.setdefault(task.split, []).append(len(record["ok"]))
        failed.extend(record["failed"])
        keep.extend(record["ok"])
    _write_tfds_metadata(settings, shard_lengths)
    out = table.set_index("image_id", drop=False).loc[keep].reset_index(drop=True)
    out["record"] = out.groupby("split", sort=False).cumcount().astype(np.int64)
    return RecordsResult(out, failed, shard_lengths, written=len(todo))


def _remove_stale_shards(settings: WriteSettings, tasks: list[ShardTask]) -> None:
    """Shard files of an earlier plan (other shard count, or a split now empty) would be read as data."""
    planned = {settings.shard_path(t).name for t in tasks}
    for f in settings.records_dir.glob(f"{settings.name}-*.array_record-*"):
        if f.name not in planned:
            f.unlink()
    for f in (Path(settings.out) / "_progress").glob("*.json"):
        if f.stem not in {t.tag for t in tasks}:
            f.unlink()


def _write_tfds_metadata(settings: WriteSettings, shard_lengths: dict) -> None:
    import tensorflow_datasets as tfds

    split_infos = []
    for split, lengths in shard_lengths.items():
        template = tfds.core.ShardedFileTemplate(
            data_dir=settings.records_dir, template=FILENAME_TEMPLATE, dataset_name=settings.name,
            split=split, filetype_suffix="array_record",
        )
        num_bytes = sum(
            settings.shard_file(split, i, len(lengths)).stat().st_size for i in range(len(lengths))
        )
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes,
                                               filename_template=template))
    tfds.folder_dataset.write_metadata(
        data_dir=settings.records_dir,
        features=record_features(settings.bit_depth, settings.pixels, settings.canvas),
        split_infos=split_infos,
        filename_template=FILENAME_TEMPLATE,
        description=(
            f"Chest radiographs prepared by cxrjax at {settings.canvas}x{settings.canvas} ({settings.fit}, size {settings.size}), "
            f"{settings.bit_depth}-bit {'PNG' if settings.pixels == 'png' else 'raw pixels'}, with the canonical metadata. Join with table.parquet on image_id."
        ),
        check_data=False,
    )


def open_split(out: str | Path, name: str, split: str):
    """The TFDS data source of one split (random access, numpy examples, no TensorFlow)."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(str(Path(out) / name / RECORD_VERSION)).as_data_source(split=split)


def shard_files(out: str | Path, name: str, split: str) -> list[str]:
    """The ArrayRecord files of one split, in record order (for grain.sources.ArrayRecordDataSource)."""
    files = sorted((Path(out) / name / RECORD_VERSION).glob(f"{name}-{split}.array_record-*-of-*"))
    return [str(f) for f in files if not f.name.endswith(".tmp")]


@dataclasses.dataclass(frozen=True)
class ImageFormat:
    """How a dataset's records hold their pixels (read from its features.json)."""

    pixels: str  # "png" or "raw"
    dtype: str  # "uint8" or "uint16"
    shape: tuple | None  # (size, size) for raw records, None for PNG (any size)


def image_format(out: str | Path, name: str) -> ImageFormat:
    """The pixel format of dataset `name` under `out` (PNG datasets from before `pixels=` included)."""
    path = Path(out) / name / RECORD_VERSION / "features.json"
    try:
        image = json.loads(path.read_text())["featuresDict"]["features"]["image"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {Path(out) / name} a cxrjax prepare output?") from None
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: no readable `image` feature ({type(e).__name__}: {e}); re-run prepare") from None
    kind = image.get("pythonClassName", "").rsplit(".", 1)[-1]
    if kind == "Image":
        return ImageFormat("png", image["image"]["dtype"], None)
    if kind == "Tensor":
        t = image["tensor"]
        if t.get("encoding") != "bytes":
            raise ValueError(f"{path}: raw image tensor with encoding {t.get('encoding')!r}; expected 'bytes'")
        return ImageFormat("raw", t["dtype"], tuple(int(d) for d in t["shape"]["dimensions"]))
    raise ValueError(f"{path}: image feature {kind!r} is neither Image (png) nor Tensor (raw)")
