"""Random access to prepared records: ArrayRecord shards of one split -> raw bytes -> decoded fields.

    ShardedRecords      shard files + record offsets -> raw bytes of record i; corrupt ones raise RecordError
    RecordReader        cxrjax's own records (TFDS example protos, PNG or raw pixels), decoded without TF
    decode_record       one serialized record -> image / text / labels / box
The TFDS-dataset reader with the same interface is `tfds_source.TfdsReader`; `pipeline.open_reader`
picks one for a prepared folder.
"""

from __future__ import annotations

import io
from pathlib import Path

import grain
import numpy as np
from array_record.python import array_record_module
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from cxrjax.data import records


class CorruptRecordError(RuntimeError):
    """Too many corrupt records (or one, with max_corrupt=0); the message names the last one."""


class RecordError(Exception):
    """One record that cannot be read or decoded (caught and reported by the pipeline)."""

    def __init__(self, report: dict):
        super().__init__(describe_report(report))
        self.report = report


def describe_report(r: dict) -> str:
    return (f"corrupt record {r['record']} of split {r['split']!r} (#{r['shard_record']} in shard "
            f"{r['shard']}): {r['reason']}")


class ShardedRecords:
    """Random access to the raw records of one split spread over ArrayRecord shard files.

    Subclasses set `split`, `files` and `starts` (cumulative record counts, starting at 0) and decode
    (`features`). Picklable: the grain source is opened lazily in each process.
    """

    split: str
    files: list[str]
    starts: np.ndarray
    _source = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def where(self, record: int) -> tuple[str, int]:
        """(shard file, index within the shard) of a record."""
        k = int(np.searchsorted(self.starts, record, side="right") - 1)
        return self.files[k], int(record - self.starts[k])

    def report(self, record: int, reason: str) -> dict:
        shard, i = self.where(record)
        return {"split": self.split, "record": int(record), "shard": shard, "shard_record": i, "reason": reason}

    def read(self, record: int) -> bytes:
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.files)
        try:
            return self._source[int(record)]
        except Exception as e:  # riegeli: "Corrupted Riegeli/records file: ... hash mismatch"
            raise RecordError(self.report(record, f"unreadable: {type(e).__name__}: {e}")) from None

    def image(self, record: int) -> np.ndarray:
        return self.features(record, ("image",))["image"]

    def image_and_box(self, record: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The image and its content box (top, left, height, width), None when the records hold none
        (the whole image is content)."""
        return self.image(record), None


class RecordReader(ShardedRecords):
    """Random access to the raw records of one split, and their decoding (no TensorFlow).

    Decoding parses the TFDS example proto (upb, ~5 us) and the PNG with Pillow: ~4x faster than
    `record_features().deserialize_example_np` (measured 1.2 ms vs 0.3 ms at 64 px). Raw-pixel
    records (prepare --pixels=raw) need no decode: the image is one copy out of the record.
    The kind is read once from the dataset's features.json (`records.image_format`).
    Picklable: the shard readers are opened lazily in each process.
    """

    def __init__(self, out: str | Path, name: str, split: str):
        self.split = split
        self.format = records.image_format(out, name)
        self.files = records.shard_files(out, name, split)
        if not self.files:
            raise FileNotFoundError(f"no record shards for split {split!r} of {name!r} under {out}")
        lengths = []
        for f in self.files:
            reader = array_record_module.ArrayRecordReader(f)
            lengths.append(reader.num_records())
            reader.close()
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def features(self, record: int, want=("image",)) -> dict:
        """Decode the fields `want` of one record: image -> 2-D uint8/uint16 array, text -> str."""
        raw = self.read(record)
        try:
            return decode_record(raw, want, self.format)
        except Exception as e:
            raise RecordError(self.report(record, f"undecodable: {type(e).__name__}: {e}")) from None

    def image_and_box(self, record: int) -> tuple[np.ndarray, np.ndarray | None]:
        f = self.features(record, ("image", "box"))
        return f["image"], f["box"]


def decode_record(raw: bytes, want=("image",), fmt: records.ImageFormat | None = None) -> dict:
    """Fields of one serialized record: image (2-D array), text features (str), study_order, labels.

    `fmt` says how the image is stored (None: PNG, the format of datasets from before raw pixels).
    """
    feature = tf_example_pb2.Example.FromString(raw).features.feature
    out = {}
    for key in want:
        if key == "box" and key not in feature:  # records from before content boxes: all of it
            out[key] = None
            continue
        if key not in feature:
            raise ValueError(f"record has no feature {key!r}")
        f = feature[key]
        if key == "image" and fmt is not None and fmt.pixels == "raw":
            out[key] = _raw_image(f.bytes_list.value[0], fmt)
        elif key == "image":
            with Image.open(io.BytesIO(f.bytes_list.value[0])) as im:
                if im.format != "PNG":
                    raise ValueError(f"image is {im.format}, expected PNG")
                a = np.asarray(im)
            if a.ndim != 2:
                raise ValueError(f"image has shape {a.shape}, expected 2-D grayscale")
            out[key] = a.astype(np.uint16) if a.dtype.itemsize > 1 else a
        elif key == "study_order":
            out[key] = int(f.int64_list.value[0])
        elif key == "labels":
            out[key] = np.asarray(f.float_list.value, np.float32)
        elif key == "box":
            out[key] = np.asarray(f.int64_list.value, np.int32)
        else:
            out[key] = f.bytes_list.value[0].decode("utf-8")
    return out


def _raw_image(data: bytes, fmt: records.ImageFormat) -> np.ndarray:
    dtype = np.dtype(fmt.dtype).newbyteorder("<")  # TFDS writes tensor bytes little-endian
    expected = int(np.prod(fmt.shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"raw image has {len(data)} bytes, expected {expected} for {fmt.shape} {fmt.dtype}")
    return np.frombuffer(data, dtype).reshape(fmt.shape).astype(fmt.dtype, copy=False)
