"""Any TFDS dataset in ArrayRecord format as training input, through a feature-name mapping.

A user's own chest X-ray dataset, already a TFDS dataset (`tfds.data_source` can open it), trains
without re-encoding: `materialize` writes a *prepared-folder view* of it -- the canonical
table.parquet, the MedAug pair groups and a manifest.json pointing at the TFDS files -- and the
pipeline reads the images from the TFDS records themselves through `TfdsReader` (the
`RecordReader` interface). The config section is

    config.data.tfds = dict(name="my_cxr", data_dir="/data/tfds",
                            split="train",  # or "train=train,valid=validation" (canonical=source split)
                            feature_map=dict(image="xray", patient_id="subject", study_id="visit",
                                             view="projection", pleural_effusion="effusion"))

feature_map: canonical name -> the source's feature name. Canonical names (only `image` and
`patient_id` are required):
    image        Image feature (PNG or JPEG bytes; RGB/RGBA become grayscale, 16-bit stays 16-bit), or a
                 fixed-shape Tensor of raw pixels (H, W) / (H, W, 1) / (H, W, 3)
    image_id     text/int feature; default '<name>/<split>/<index>'
    patient_id   text/int feature (required: MedAug positives are images of one patient)
    study_id     text/int feature; default: each image is its own study
    study_order  number (e.g. days, a date as int): ranked within the patient; default unknown (-1)
    view         text or ClassLabel (PA / AP / AP supine / L / lateral / frontal ...); default UNKNOWN
    laterality   text or ClassLabel ('frontal' / 'lateral'), used where `view` is not mapped
    report       text feature; default ''
    labels       a 14-vector in schema.CHEXPERT_LABELS order (1 / 0 / -1 / NaN)
    <label>      one CheXpert observation, named as in schema.CHEXPERT_LABELS or in snake case
                 (`pleural_effusion`); a scalar int/float/bool/ClassLabel feature (1 / 0 / -1; a
                 ClassLabel's index is used as the value)
The table is built from the metadata features only: the image bytes are never decoded for it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from array_record.python import array_record_module
from PIL import Image
from tensorflow_datasets.core import features as tfds_features
from tensorflow_datasets.proto import tf_example_pb2

import cxrjax
from cxrjax.data import metadata, schema
from cxrjax.data import prepared
from cxrjax.data.record_reader import RecordError, RecordReader, ShardedRecords

REQUIRED = ("image", "patient_id")
FIELDS = ("image", "image_id", "patient_id", "study_id", "study_order", "view", "laterality", "report", "labels")
LABEL_KEYS = tuple(c.lower().replace(" ", "_") for c in schema.CHEXPERT_LABELS)  # pleural_effusion, ...
_LABEL_KEYS = {**{c: c for c in schema.CHEXPERT_LABELS}, **dict(zip(LABEL_KEYS, schema.CHEXPERT_LABELS))}
MANIFEST_KEY = "tfds_source"


class TfdsSourceError(ValueError):
    """A TFDS source that cannot be used as given; the message names the dataset, feature or row."""


# ----------------------------------------------------------------------------------------------
# The source: which TFDS dataset, which splits, which features


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A TFDS dataset on disk and how it maps onto the canonical table.

    splits: canonical split ('train' / 'valid' / 'test') -> the source's split name. A plain string
    for `split` in `from_config` means {'train': that split}.
    """

    name: str
    data_dir: str
    splits: Mapping[str, str]
    feature_map: Mapping[str, str]

    def __post_init__(self):
        fm = {k: v for k, v in dict(self.feature_map).items() if v}  # '' = not mapped (config defaults)
        unknown = [k for k in fm if k not in FIELDS and k not in _LABEL_KEYS]
        if unknown:
            raise TfdsSourceError(
                f"tfds source {self.name!r}: unknown canonical name(s) {unknown} in feature_map; expected "
                f"{', '.join(FIELDS)} or a CheXpert label ({', '.join(LABEL_KEYS)})")
        missing = [k for k in REQUIRED if not fm.get(k)]
        if missing:
            raise TfdsSourceError(
                f"tfds source {self.name!r}: feature_map needs {missing} (the source's feature names)")
        if "labels" in fm and any(k in _LABEL_KEYS for k in fm):
            raise TfdsSourceError(
                f"tfds source {self.name!r}: map either `labels` (a 14-vector) or single labels, not both")
        bad = [s for s in self.splits if s not in schema.SPLITS]
        if bad or not self.splits:
            raise TfdsSourceError(
                f"tfds source {self.name!r}: split keys {bad or '(none)'}; expected some of {schema.SPLITS}")
        object.__setattr__(self, "feature_map", fm)
        object.__setattr__(self, "splits", dict(self.splits))

    @classmethod
    def from_config(cls, c) -> "TfdsSource":
        """From `config.data.tfds` (a ConfigDict or dict with name, data_dir, split, feature_map)."""
        c = dict(c)
        unknown = set(c) - {"name", "data_dir", "split", "feature_map"}
        if unknown:
            raise TfdsSourceError(
                f"config.data.tfds: unknown key(s) {sorted(unknown)}; expected name, data_dir, split, feature_map")
        if not c.get("name") or not c.get("data_dir"):
            raise TfdsSourceError(
                "config.data.tfds needs `name` and `data_dir` (as for tfds.data_source(name, data_dir=...))")
        split = c.get("split") or "train"
        if isinstance(split, str):  # 'train' or 'train=train,valid=validation' (canonical=source)
            pairs = [p.split("=", 1) if "=" in p else ("train", p) for p in split.split(",") if p]
            splits = {k.strip(): v.strip() for k, v in pairs}
        else:
            splits = dict(split)
        return cls(str(c["name"]), str(Path(c["data_dir"]).expanduser()), splits, dict(c.get("feature_map") or {}))

    def to_json(self) -> dict:
        return {"name": self.name, "data_dir": self.data_dir, "splits": dict(self.splits),
                "feature_map": dict(self.feature_map)}

    def builder(self):
        """The TFDS builder read from the files (TFDS's own lookup; no generation code needed)."""
        from tensorflow_datasets.core import read_only_builder

        try:
            return read_only_builder.builder_from_files(self.name, data_dir=self.data_dir)
        except Exception as e:
            raise TfdsSourceError(
                f"TFDS dataset {self.name!r} not found under {self.data_dir} ({type(e).__name__}: {e}); it must be "
                "prepared there (tfds.data_source(name, data_dir=...) opens it)") from None

    def shard_files(self, builder, canonical_split: str) -> list[str]:
        """The ArrayRecord files of one split, in record order (TFDS's own file list)."""
        split = self.splits[canonical_split]
        info = builder.info
        if split not in info.splits:
            raise TfdsSourceError(f"TFDS dataset {self.name!r} has no split {split!r} (it has {sorted(info.splits)})")
        if info.file_format is None or info.file_format.value != "array_record":
            raise TfdsSourceError(
                f"TFDS dataset {self.name!r} is stored as {info.file_format and info.file_format.value}; random access "
                "needs array_record. Re-prepare it with download_and_prepare(file_format='array_record').")
        return [os.fspath(p) for p in info.splits[split].filepaths]


# ----------------------------------------------------------------------------------------------
# Decoding one serialized example (tf.train.Example, as TFDS writes it) without TensorFlow


def _scalar(feature, key: str, where: str):
    """The single value of a proto feature: str (bytes), int or float."""
    kind = feature.WhichOneof("kind")
    values = getattr(feature, kind).value if kind else ()
    if len(values) != 1:
        raise TfdsSourceError(f"{where}: feature {key!r} has {len(values)} values, expected one")
    v = values[0]
    return v.decode("utf-8") if isinstance(v, bytes) else v


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> 2-D uint8 (or uint16 for 16-bit PNG) array; colour images become grayscale
    with ITU-R 601 luma (PIL 'L', the weights of tf.image.rgb_to_grayscale)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im)
            return a.astype(np.uint16) if a.dtype != np.uint8 else a
        if im.mode != "L":
            im = im.convert("L")
        return np.asarray(im)


def _feature(features, name: str):
    """The feature connector called `name`; nested FeaturesDict entries are 'parent/child', as TFDS
    names them in the serialized example. None if there is none."""
    f = features
    for part in name.split("/"):
        if not isinstance(f, tfds_features.FeaturesDict) or part not in f.keys():
            return None
        f = f[part]
    return f


def _flat_names(features, prefix: str = "") -> list[str]:
    out = []
    for k in features.keys() if isinstance(features, tfds_features.FeaturesDict) else ():
        sub = features[k]
        out += _flat_names(sub, f"{prefix}{k}/") if isinstance(sub, tfds_features.FeaturesDict) else [prefix + k]
    return out


class _Decoder:
    """Canonical fields of one example from the source's feature names (metadata or image)."""

    def __init__(self, source: TfdsSource, features):
        self.source, self.fm = source, source.feature_map
        found = {k: _feature(features, v) for k, v in self.fm.items()}
        missing = [f"{self.fm[k]!r} (feature_map {k})" for k, f in found.items() if f is None]
        if missing:
            raise TfdsSourceError(f"TFDS dataset {source.name!r} has no feature {', '.join(missing)}; its features "
                                  f"are {sorted(_flat_names(features))}")
        image = found["image"]
        if isinstance(image, tfds_features.Image):
            self.raw_image = None
        elif isinstance(image, tfds_features.Tensor) and len(image.shape) in (2, 3) and None not in image.shape:
            self.raw_image = (np.dtype(image.np_dtype), tuple(image.shape))  # raw pixels, e.g. cxrjax --pixels=raw
        else:
            raise TfdsSourceError(f"TFDS dataset {source.name!r}: image feature {self.fm['image']!r} is "
                                  f"{type(image).__name__}; expected Image (PNG/JPEG) or a fixed-shape Tensor")
        # ClassLabel features are stored as ints: keep their names to turn view/laterality back into text.
        self.class_names = {}
        for k, f in found.items():
            names = getattr(f, "names", None)
            if names is not None:
                self.class_names[k] = list(names)

    def metadata(self, raw: bytes, where: str) -> dict:
        feature = tf_example_pb2.Example.FromString(raw).features.feature
        out = {}
        for key, name in self.fm.items():
            if key == "image":
                continue
            if name not in feature:
                raise TfdsSourceError(f"{where}: no feature {name!r} (mapped to {key!r})")
            f = feature[name]
            if key == "labels":
                kind = f.WhichOneof("kind")
                values = np.asarray(getattr(f, kind).value if kind else (), np.float32)
                if values.shape != (len(schema.CHEXPERT_LABELS),):
                    raise TfdsSourceError(f"{where}: feature {name!r} (labels) has {values.size} values, expected "
                                          f"{len(schema.CHEXPERT_LABELS)} in schema.CHEXPERT_LABELS order")
                out[key] = values
                continue
            value = _scalar(f, name, where)
            if key in self.class_names and isinstance(value, int) and key in ("view", "laterality"):
                value = self.class_names[key][value]
            out[key] = value
        return out

    def image(self, raw: bytes) -> np.ndarray:
        feature = tf_example_pb2.Example.FromString(raw).features.feature
        name = self.fm["image"]
        if name not in feature:
            raise ValueError(f"record has no feature {name!r} (the mapped image)")
        f = feature[name]
        if self.raw_image is None:
            return decode_image(f.bytes_list.value[0])
        dtype, shape = self.raw_image
        kind = f.WhichOneof("kind")
        values = f.bytes_list.value[0] if kind == "bytes_list" else getattr(f, kind).value
        if kind == "bytes_list":  # Encoding.BYTES: TFDS writes the tensor's bytes little-endian
            a = np.frombuffer(values, dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
        else:
            a = np.asarray(values, dtype).reshape(shape)
        if a.ndim == 3:  # (H, W, C): the luma of RGB(A), the only channel of (H, W, 1)
            a = a[..., 0] if a.shape[-1] == 1 else np.asarray(Image.fromarray(a[..., :3].astype(np.uint8)).convert("L"))
        return a


# ----------------------------------------------------------------------------------------------
# (a) the canonical table


def _read_all(files: list[str], chunk: int = 256):
    """(file, index in file, serialized example) of every record, in order; read in ranges (the
    reader fetches a range's chunks in parallel), never holding more than `chunk` records."""
    for f in files:
        reader = array_record_module.ArrayRecordReader(f)
        try:
            n = reader.num_records()
            for begin in range(0, n, chunk):
                for i, raw in enumerate(reader.read(begin, min(begin + chunk, n)), begin):
                    yield f, i, raw
        finally:
            reader.close()


def canonical_table(source: TfdsSource, builder=None) -> pd.DataFrame:
    """One canonical row per example of the mapped splits (in record order), validated by
    `schema.validate_table`; `record` = the example's index in its source split."""
    builder = builder or source.builder()
    decoder = _Decoder(source, builder.info.features)
    fm = source.feature_map
    rows = []
    for split in schema.SPLITS:
        if split not in source.splits:
            continue
        for record, (file, i, raw) in enumerate(_read_all(source.shard_files(builder, split))):
            where = f"TFDS {source.name!r} split {source.splits[split]!r} example {record} ({Path(file).name} #{i})"
            try:
                m = decoder.metadata(raw, where)
            except TfdsSourceError:
                raise
            except Exception as e:
                raise TfdsSourceError(f"{where}: unreadable example ({type(e).__name__}: {e})") from None
            rows.append({"split": split, "record": record, "where": where, **m})
    if not rows:
        raise TfdsSourceError(f"TFDS dataset {source.name!r}: the mapped splits {source.splits} hold no examples")
    raw = pd.DataFrame(rows)
    t = pd.DataFrame({"split": raw["split"], "record": raw["record"].astype(np.int64)})
    t["patient_id"] = raw["patient_id"].astype(str)
    default_id = source.name + "/" + raw["split"].map(source.splits) + "/" + raw["record"].astype(str)
    t["image_id"] = raw["image_id"].astype(str) if "image_id" in fm else default_id
    t["path"] = ""  # no image file: the pixels are in the TFDS records
    # Study ids must be unique over the table: kept as they are when no two patients share one,
    # else prefixed with the patient (as the adapters do); unmapped, each image is its own study.
    study = raw["study_id"].astype(str) if "study_id" in fm else t["image_id"]
    shared = pd.DataFrame({"s": study, "p": t["patient_id"]}).drop_duplicates().duplicated("s").any()
    t["study_id"] = t["patient_id"] + "/" + study if shared or "study_id" not in fm else study
    if "study_order" in fm:
        t["time"] = pd.to_numeric(raw["study_order"], errors="coerce")
        t["study_order"] = schema.study_order_from(t, "time")
    else:
        t["study_order"] = np.int64(-1)
    if "view" in fm:
        t["view"] = metadata.normalize_view(raw["view"])
        t["laterality"] = schema.laterality_of(t["view"])
    else:
        t["view"] = "UNKNOWN"
        lat = (raw["laterality"].astype(str).str.strip().str.lower() if "laterality" in fm
               else pd.Series("", index=t.index))
        t["laterality"] = lat.where(lat.isin(("frontal", "lateral")), "unknown")
    t["report"] = raw["report"].fillna("").astype(str) if "report" in fm else ""
    if "labels" in fm:
        labels = np.stack(raw["labels"].to_numpy())
        for j, c in enumerate(schema.CHEXPERT_LABELS):
            t[c] = labels[:, j]
    else:
        for c in schema.CHEXPERT_LABELS:
            t[c] = np.nan
        for key in fm:
            if key in _LABEL_KEYS:
                t[_LABEL_KEYS[key]] = pd.to_numeric(raw[key], errors="coerce").astype(np.float32)
    t["source"] = f"tfds:{source.name}"
    table = schema.validate_table(t, where=f"TFDS dataset {source.name!r} (feature_map {fm})")
    table["record"] = t["record"].to_numpy(np.int64)
    return table


# ----------------------------------------------------------------------------------------------
# (b) the reader: pipeline.RecordReader's interface over the TFDS files


class TfdsReader(ShardedRecords):
    """Random access to one split of a TFDS dataset, decoded the cxrjax way (2-D grayscale image).

    `pipeline.RecordReader`'s interface (shared `ShardedRecords`): len, where, report, read,
    features(record, want), image(record). Picklable: shards open lazily in each worker process.
    """

    def __init__(self, source: TfdsSource, split: str, builder=None):
        builder = builder or source.builder()
        self.source, self.split = source, split
        self.files = source.shard_files(builder, split)
        self._decoder = _Decoder(source, builder.info.features)
        lengths = list(builder.info.splits[source.splits[split]].shard_lengths)
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    @classmethod
    def from_manifest(cls, entry: dict, split: str) -> "TfdsReader":
        return cls(TfdsSource(entry["name"], entry["data_dir"], entry["splits"], entry["feature_map"]), split)

    def features(self, record: int, want=("image",)) -> dict:
        """image -> 2-D array; report and the other canonical text fields -> str; labels -> (14,)."""
        raw = self.read(record)
        try:
            out = {}
            meta = [k for k in want if k != "image"]
            if meta:
                m = self._decoder.metadata(raw, f"{self.source.name} {self.split} record {record}")
                for k in meta:
                    if k == "report":
                        out[k] = str(m.get("report", ""))
                    elif k == "labels":
                        out[k] = self._labels(m)
                    elif k in m:
                        out[k] = m[k]
                    else:
                        raise ValueError(f"feature_map has no {k!r}")
            if "image" in want:
                out["image"] = self._decoder.image(raw)
            return out
        except Exception as e:
            raise RecordError(self.report(record, f"undecodable: {type(e).__name__}: {e}")) from None

    def _labels(self, m: dict) -> np.ndarray:
        if "labels" in m:
            return np.asarray(m["labels"], np.float32)
        out = np.full(len(schema.CHEXPERT_LABELS), np.nan, np.float32)
        for key, value in m.items():
            if key in _LABEL_KEYS:
                out[schema.CHEXPERT_LABELS.index(_LABEL_KEYS[key])] = float(value)
        return out


def open_reader(out, name: str, split: str):
    """The reader of a prepared folder's split: `TfdsReader` if its manifest points at a TFDS source,
    else the folder's own records (`record_reader.RecordReader`). Same arguments as RecordReader."""
    entry = read_manifest_source(out)
    if entry is not None:
        return TfdsReader.from_manifest(entry, split)
    return RecordReader(out, name, split)


def read_manifest_source(out) -> dict | None:
    """The `tfds_source` entry of OUT/manifest.json, or None for a folder with its own records."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(MANIFEST_KEY)


# ----------------------------------------------------------------------------------------------
# (c) pair groups + the prepared-folder view


def materialize(source: TfdsSource, out, *, strategies=None, include_self: bool = False) -> dict:
    """Write OUT/table.parquet, OUT/pairs/*.npz and OUT/manifest.json for a TFDS source.

    OUT is then a prepared folder like `python -m cxrjax.prepare` writes, except that its images stay
    in the TFDS dataset (the manifest's `tfds_source` says where). Returns the manifest.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    builder = source.builder()
    table = canonical_table(source, builder)
    tmp = out / "table.parquet.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out / "table.parquet")
    pair_stats = prepared.build_pairs(table, out, strategies, include_self)
    files = {s: source.shard_files(builder, s) for s in source.splits}
    manifest = {
        "cxrjax_version": cxrjax.__version__,
        "name": source.name,
        "source": "tfds",
        MANIFEST_KEY: source.to_json(),
        "records": {"tfds_dir": os.fspath(builder.data_dir), "files": files,
                    "shard_lengths": {s: list(builder.info.splits[source.splits[s]].shard_lengths)
                                      for s in source.splits}},
        "counts": prepared.manifest_counts(table),
        "input_rows": len(table),
        "bad_inputs": {"count": 0, "items": []},
        "pairs": {"include_self": include_self, "strategies": pair_stats},
        "reports": None,
        "timings": {},
    }
    prepared.write_json(out / "manifest.json", manifest)
    return manifest


def prepared_view(source: TfdsSource, *, strategies=None, cache=None, note=print) -> str:
    """The prepared-folder view of `source`, materialised once into a cache folder
    ($CXRJAX_CACHE or ~/.cache/cxrjax) keyed by the source; safe to call from several processes."""
    import hashlib
    import shutil

    key = hashlib.sha256(json.dumps([source.to_json(), strategies], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache or os.environ.get("CXRJAX_CACHE", Path.home() / ".cache" / "cxrjax"))
    d = root / f"tfds-{source.name}-{key}"
    if read_manifest_source(d) == source.to_json():
        return str(d)
    note(f"Reading the metadata of TFDS dataset {source.name!r} ({source.data_dir}) into {d} ...")
    tmp = root / f".{d.name}.tmp-{os.getpid()}"
    materialize(source, tmp, strategies=strategies)
    try:
        os.rename(tmp, d)
    except OSError:  # another process got there first (same content)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(d)
