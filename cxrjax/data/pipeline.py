"""The Grain input pipeline: prepared ArrayRecord shards -> contrastive batches as global jax.Arrays.

Read top to bottom, the stages are:

    PipelineConfig                      what to read and how (one dataclass; `from_dict` for configs)
    load_prepared(out, split, ...)      table.parquet + pairs/<strategy>.npz -> small numpy arrays
    RecordReader (record_reader.py)     raw records of one split (ArrayRecord, random access) + decode
    ContrastiveExample / EvalExample    one (epoch, record) -> one example dict (decode, pair, augment)
    make_dataset(cfg)                   range(n) -> shuffle(seed; reshuffled every epoch) -> [p::P]
                                        -> repeat -> map(example) -> batch (skipping corrupt records)
                                        -> mp_prefetch(workers) -> corrupt-record accounting
    DeviceIterator / make_iterator      numpy batches -> global jax.Arrays on the mesh's data axis,
                                        prefetched to the device, checkpointable
    VLExample                           one vision-language example (paired / image / text); the
                                        masked vision-language job's batches: `vl_pipeline`

Determinism: the order of epoch e is grain's index shuffle with seed (hash(seed) + e); process p of P
takes positions p, p+P, ... of it, so P processes together see every record of the split once per
epoch. The positive partner of a query is `pairs.sample_positive(index, row, seed, epoch)` and its
augmentations come from `augment.example_rng(seed, epoch, row, slot)`: both are pure functions of
the example, not of the batch, worker or process layout. Batch composition depends on
(seed, process layout, num_workers): restore a checkpoint with the same ones to see the same batches.

A batch (local to the process, numpy; global jax.Arrays after `DeviceIterator`), contrastive mode:
    query, key        (B, S, S, 1) uint8 -- normalise on the device (`augment.normalize`): 4x less
                      host->device traffic than float32, and the cast is free inside the jitted step
    row, partner_row  (B,) int64 table rows of the query and of the key's image (== row for
                      instance discrimination / fallback rows)
    patient, study, laterality            (B,) int32 codes of the query (`pairs.metadata_codes`)
    key_study, key_laterality             (B,) int32 codes of the key image (the queue stores keys)
    epoch             (B,) int32
    hard_negatives    (B, k, S, S, 1) uint8 and hard_negative_rows (B, k) int64 (-1 = none: the
                      query's group is empty; the image is then zeros) -- only when configured
  with augment.where="device" the images are the prepared pixels (B, P, P, 1) (P = prepare --size,
  no augmentation on the host: records are read and stacked, nothing else) plus per view
    query_seed, key_seed (B, 2) uint32, hard_negative_seeds (B, k, 2)
                      `augment.view_seed(seed, epoch, row, slot)`; the train step turns them into
                      views with `device_augment.contrastive_views` (jitted, on the accelerator)
Eval mode: image (B, S, S, 1) uint8 (resize + centre crop), labels (B, 14) float32 (NaN blank),
row, patient, study, laterality, epoch.

Corrupt records: a record that cannot be read or decoded is reported (split, record, shard file,
reason), counted and skipped; past `max_corrupt` the iterator raises `CorruptRecordError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Mapping

import grain
import numpy as np
import pandas as pd

from cxrjax.data import augment as augment_lib
from cxrjax.data import images, pairs, records, schema, tfds_source
from cxrjax.data.record_reader import (  # noqa: F401  (re-exported: pipeline.RecordReader etc.)
    CorruptRecordError, RecordError, RecordReader, ShardedRecords, decode_record, describe_report)

# array_record and TFDS's proto are imported here, on the importing thread, never lazily inside a
# reader thread: importing TFDS runs `etils.epy.lazy_imports()` blocks that swap `builtins.__import__`
# process-wide, and a thread importing array_record during that window got a LazyModule stub
# ("'LazyModule' object is not callable", seen intermittently when restoring under load).
# JAX is imported inside the device-side functions only: the decode workers are spawned processes
# that unpickle this module, and must not pay for (or fight over threads with) a JAX import.

log = logging.getLogger(__name__)

MODES = ("contrastive", "eval")
CORRUPT_KEY = "_corrupt"  # per-batch list of corrupt-record reports (worker -> main process)


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything the input pipeline needs; `from_dict` accepts an ml_collections ConfigDict.

    data_dir: the prepare output directory (table.parquet, pairs/, <name>/1.0.0/, manifest.json).
    name: the records' dataset name (default: manifest.json's `name`, or the only one present).
    split: 'train' / 'valid' / 'test'.
    mode: 'contrastive' (query + key [+ hard negatives]) or 'eval' (one eval-transformed image + labels).
    strategy: pair strategy file pairs/<strategy>.npz ('instance' needs no file).
    include_self: MedAug's eq. 2 -- the query is in its own candidate set (drawn as its own partner
        with probability 1 / |group|); False: cxrjax's rule, another image whenever one qualifies.
        Applied to whatever the prepared index holds (`pairs.with_self`).
    hard_negatives: kind in pairs.HARD_NEGATIVES (file pairs/hard-<kind>.npz) or None;
        num_hard_negatives images per query are drawn from it.
    batch_size: GLOBAL batch size; each of process_count processes yields batch_size / process_count.
    seed: shuffles, partners and augmentations derive from it. num_epochs: None = repeat forever.
    shuffle: False keeps record order (eval). drop_remainder: False yields a smaller last batch.
    num_workers: decoding processes (grain mp_prefetch); 0 = decode in this process's threads,
        -1 = auto (the number of CPU cores). read_threads: threads per process that run the map.
    worker_buffer_size: batches each worker keeps ready. device_prefetch: batches kept on device.
    max_corrupt: corrupt records tolerated before the run stops.
    process_index / process_count: default jax.process_index() / jax.process_count(); set them to
        simulate a multi-host layout (tests) or when not using JAX's distributed runtime.
    """

    data_dir: str
    name: str | None = None
    split: str = "train"
    mode: str = "contrastive"
    strategy: str = pairs.BEST_STRATEGY
    include_self: bool = False
    hard_negatives: str | None = None
    num_hard_negatives: int = 0
    batch_size: int = 256
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    drop_remainder: bool = True
    augment: augment_lib.AugmentConfig = augment_lib.AugmentConfig()
    num_workers: int = -1
    read_threads: int = 2
    worker_buffer_size: int = 2
    device_prefetch: int = 2
    max_corrupt: int = 100
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self):
        def check(ok, what):
            if not ok:
                raise ValueError(f"PipelineConfig: {what}")

        check(self.split in schema.SPLITS, f"split {self.split!r}; expected one of {schema.SPLITS}")
        check(self.mode in MODES, f"mode {self.mode!r}; expected one of {MODES}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.num_epochs is None or self.num_epochs >= 1, f"num_epochs must be None or >= 1, got {self.num_epochs}")
        check(self.num_workers >= -1, f"num_workers must be -1 (auto), 0 or more, got {self.num_workers}")
        check(self.read_threads >= 1, f"read_threads must be >= 1, got {self.read_threads}")
        check(self.max_corrupt >= 0, f"max_corrupt must be >= 0, got {self.max_corrupt}")
        check(self.num_hard_negatives >= 0, "num_hard_negatives must be >= 0")
        check(not (self.num_hard_negatives and not self.hard_negatives),
              "num_hard_negatives > 0 needs hard_negatives (a kind in pairs.HARD_NEGATIVES)")
        if self.hard_negatives is not None:
            check(self.hard_negatives in pairs.HARD_NEGATIVES,
                  f"hard_negatives {self.hard_negatives!r}; expected one of {sorted(pairs.HARD_NEGATIVES)}")
        if self.strategy != "instance":
            pairs.get_strategy(self.strategy)
        if not isinstance(self.augment, augment_lib.AugmentConfig):
            object.__setattr__(self, "augment", augment_lib.AugmentConfig.from_dict(self.augment))

    @classmethod
    def from_dict(cls, d) -> "PipelineConfig":
        return cls(**augment_lib.known_fields(cls, d))

    def layout(self) -> tuple[int, int]:
        """(process_index, process_count), each from JAX unless given."""
        index, count = self.process_index, self.process_count
        if index is None or count is None:
            import jax

            index = jax.process_index() if index is None else index
            count = jax.process_count() if count is None else count
        if not 0 <= index < count:
            raise ValueError(f"process_index {index} not in [0, process_count={count})")
        return index, count

    def local_batch_size(self) -> int:
        _, count = self.layout()
        if self.batch_size % count:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by process_count {count}")
        return self.batch_size // count

    def workers(self) -> int:
        return auto_workers() if self.num_workers == -1 else self.num_workers


MAX_AUTO_WORKERS = 16  # past this, more decode processes only add memory (and IPC) on any node we measured


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what SLURM's --cpus-per-task, taskset or a
    cgroup cpuset grant), not the node's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers() -> int:
    """num_workers=-1: one decode process per available CPU, one left for the training process itself,
    at most MAX_AUTO_WORKERS (logged by the trainers)."""
    return max(1, min(MAX_AUTO_WORKERS, available_cpus() - 1))


def check_shared_memory(cfg: PipelineConfig, example_bytes: int, path: str = "/dev/shm") -> None:
    """Worker processes hand batches over in shared memory (/dev/shm); Docker's default of 64 MB is
    too small for a few batches of images. Refuse up front, in one line, instead of a worker dying
    with a bus error mid-run."""
    workers = cfg.workers()
    if not workers:
        return
    try:
        st = os.statvfs(path)
    except OSError:
        return  # no /dev/shm (not Linux): multiprocessing uses its own mechanism
    free = st.f_bavail * st.f_frsize
    # every worker keeps worker_buffer_size batches, plus one in flight to the main process
    need = workers * (cfg.worker_buffer_size + 1) * cfg.local_batch_size() * example_bytes
    if need > free:
        raise ValueError(
            f"{path} has {free / 2**20:.0f} MiB free, but {workers} pipeline workers x "
            f"{cfg.worker_buffer_size + 1} batches of {cfg.local_batch_size()} examples need ~{need / 2**20:.0f} MiB of "
            f"shared memory: start the container with --shm-size={max(1, int(2 * need / 2**30) + 1)}g (Docker), or "
            f"lower config.data.num_workers / worker_buffer_size")


# ----------------------------------------------------------------------------------------------
# Prepared data: the table and the pair groups, reduced to numpy arrays (these travel to workers)


@dataclasses.dataclass
class PreparedData:
    """What the example transforms need of one split, as plain numpy arrays (cheap to pickle).

    split_rows[record] = table row of that record; record_of_row[row] = its record in this split
    (-1 for rows of other splits). Codes are over the whole table (pairs.metadata_codes).
    """

    out: str
    name: str
    split: str
    split_rows: np.ndarray  # int64 (n_split,)
    record_of_row: np.ndarray  # int64 (n_table,)
    codes: dict[str, np.ndarray]  # patient / study / laterality, int32 (n_table,)
    labels: np.ndarray  # float32 (n_table, 14)
    positives: pairs.PairIndex | None
    hard: pairs.PairIndex | None

    @property
    def n(self) -> int:
        return len(self.split_rows)


def dataset_name(out: str | Path, name: str | None = None) -> str:
    """The records' dataset name: given, from manifest.json, or the only dataset folder in `out`."""
    if name:
        return name
    manifest = Path(out) / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["name"]
    found = sorted(p.parent.name for p in Path(out).glob(f"*/{records.RECORD_VERSION}"))
    if len(found) != 1:
        raise FileNotFoundError(f"{out}: cannot tell the records' dataset name (found {found or 'none'}); "
                                "pass name= or run cxrjax.prepare")
    return found[0]


def load_prepared(out: str | Path, split: str = "train", strategy: str | None = pairs.BEST_STRATEGY,
                  hard_negatives: str | None = None, name: str | None = None, *,
                  include_self: bool | None = None) -> PreparedData:
    """Read table.parquet and the pair index of `strategy` (None: no partners, eval) for `split`;
    `include_self` True / False turns the groups to that self rule (None: as prepared)."""
    out = Path(out)
    table_path = out / "table.parquet"
    if not table_path.is_file():
        raise FileNotFoundError(f"{table_path} not found; run `python -m cxrjax.prepare --out={out}` first")
    import pyarrow.parquet as pq

    if "record" not in pq.read_schema(table_path).names:
        raise ValueError(f"{table_path} has no `record` column (written by an old prepare?)")
    cols = ["patient_id", "study_id", "laterality", "split", "record", *schema.CHEXPERT_LABELS]
    table = pd.read_parquet(table_path, columns=cols)
    in_split = (table["split"] == split).to_numpy()
    rec = table["record"].to_numpy(np.int64)
    split_rows = np.flatnonzero(in_split).astype(np.int64)
    n = len(split_rows)
    if not np.array_equal(np.sort(rec[split_rows]), np.arange(n)):
        raise ValueError(f"{table_path}: records of split {split!r} are not 0..{n - 1}")
    split_rows = split_rows[np.argsort(rec[split_rows], kind="stable")]
    record_of_row = np.full(len(table), -1, np.int64)
    record_of_row[split_rows] = np.arange(n)

    def index_file(fname):
        index = pairs.load_pair_index(out / "pairs" / fname, n_rows=len(table))
        # a group may only hold rows of the query's split (prepare guarantees it; check cheaply)
        q = np.repeat(np.arange(index.n), index.sizes)
        bad = in_split[q] & ~in_split[index.members]
        if bad.any():
            raise ValueError(f"{out / 'pairs' / fname}: row {int(q[bad][0])} of split {split!r} is paired with "
                             f"row {int(index.members[bad][0])} of another split")
        return index

    if strategy is None:
        positives = None
    elif strategy == "instance" and not (out / "pairs" / "instance.npz").is_file():
        positives = pairs.PairIndex(np.arange(len(table) + 1, dtype=np.int64), np.arange(len(table), dtype=np.int32),
                                    np.ones(len(table), bool), pairs.get_strategy("instance"))
    else:
        positives = index_file(f"{strategy}.npz")
    if positives is not None and include_self is not None:
        positives = pairs.with_self(positives, include_self)
    hard = index_file(f"hard-{hard_negatives}.npz") if hard_negatives else None
    return PreparedData(
        out=str(out), name=dataset_name(out, name), split=split, split_rows=split_rows,
        record_of_row=record_of_row, codes=pairs.metadata_codes(table),
        labels=table[list(schema.CHEXPERT_LABELS)].to_numpy(np.float32), positives=positives, hard=hard,
    )


# ----------------------------------------------------------------------------------------------
# Records (cxrjax.data.record_reader; the names stay importable from here)


def open_reader(data: PreparedData):
    """The reader of a prepared folder's split: its own records (`RecordReader`), or -- when its
    manifest points at a TFDS dataset (`cxrjax.data.tfds_source.materialize`) -- that dataset's files,
    read through the feature map (`tfds_source.TfdsReader`, the same interface)."""
    return tfds_source.open_reader(data.out, data.name, data.split)



# ----------------------------------------------------------------------------------------------
# One example


def _corrupt(report: dict) -> dict:
    return {CORRUPT_KEY: report}


def _is_good(ex: dict) -> bool:
    """Not a corrupt-record marker (a filter for streams without the batch-level skip)."""
    return CORRUPT_KEY not in ex


def example_bytes(cfg: PipelineConfig, data: PreparedData, reader) -> int:
    """Bytes of one example's images in a batch: the views (query, key, hard negatives) at the size the
    workers hand over (finished views on the host path, the records' pixels on the device path)."""
    fmt = getattr(reader, "format", None)
    pixel = 2 if fmt is not None and fmt.dtype == "uint16" else 1
    if cfg.mode == "eval":
        views, side = 1, cfg.augment.size
    else:
        views = 2 + (cfg.num_hard_negatives if cfg.hard_negatives else 0)
        side = _device_input_size(data, cfg.augment) if cfg.augment.where == "device" else cfg.augment.size
    return views * side * side * pixel


def _device_input_size(data: PreparedData, aug: augment_lib.AugmentConfig) -> int:
    """Side of the square images handed to on-device augmentation: the prepared records' size
    (manifest.json), else -- a source whose images vary in size -- the training size."""
    try:
        rec = json.loads((Path(data.out) / "manifest.json").read_text()).get("records", {})
        size = rec.get("canvas") or rec.get("size")
    except (OSError, ValueError, AttributeError):
        size = None
    return int(size) if size else int(aug.size)


class ContrastiveExample:
    """(index, (epoch, record)) -> query + key (+ hard negatives), or a corrupt-record marker."""

    def __init__(self, data: PreparedData, reader: RecordReader, cfg: PipelineConfig):
        if data.positives is None:
            raise ValueError("contrastive examples need a positive pair index (strategy)")
        self.data, self.reader = data, reader
        self.seed, self.aug = cfg.seed, cfg.augment
        self.k = cfg.num_hard_negatives if data.hard is not None else 0
        self.on_device = augment_lib.resolve_where(cfg.augment.where) == "device"
        self.input_size = _device_input_size(data, cfg.augment) if self.on_device else 0

    def view(self, image: np.ndarray, box, epoch: int, row: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(view, content box). Host: the augmented view (the box then covers all of it). Device: the
        prepared pixels and their box (augmented in the step); images of another shape (a foreign TFDS
        source) are padded to the common square the batch needs, their box moved with them."""
        if self.on_device:
            h, w = image.shape
            box = np.array([0, 0, h, w], np.float32) if box is None else np.asarray(box, np.float32)
            if image.shape != (self.input_size, self.input_size):
                image, (top, left, nh, _) = images.fit_image_box(image, self.input_size, "pad")
                scale = nh / h
                box = np.array([top + scale * box[0], left + scale * box[1], scale * box[2], scale * box[3]],
                               np.float32)
            return image, box
        rng = augment_lib.example_rng(self.seed, epoch, row, slot)
        return augment_lib.augment(image, self.aug, rng, box), None

    def __call__(self, item: tuple[int, int]) -> dict:
        epoch, record = item
        d = self.data
        row = int(d.split_rows[record])
        partner = pairs.positive_of(d.positives, row, self.seed, epoch)
        try:
            image, box = self.reader.image_and_box(record)
            other, other_box = ((image, box) if partner == row else
                                self.reader.image_and_box(int(d.record_of_row[partner])))
            (query, q_box), (key, k_box) = self.view(image, box, epoch, row, 0), self.view(other, other_box, epoch, row, 1)
            ex = {
                "query": query[..., None], "key": key[..., None],
                "row": np.int64(row), "partner_row": np.int64(partner), "epoch": np.int32(epoch),
                "patient": d.codes["patient"][row], "study": d.codes["study"][row],
                "laterality": d.codes["laterality"][row],
                "key_study": d.codes["study"][partner], "key_laterality": d.codes["laterality"][partner],
            }
            if self.on_device:
                ex["query_seed"] = augment_lib.view_seed(self.seed, epoch, row, 0)
                ex["key_seed"] = augment_lib.view_seed(self.seed, epoch, row, 1)
                ex["query_box"], ex["key_box"] = q_box, k_box
            if self.k:
                hard = pairs.sample_hard_negatives(d.hard, np.array([row]), self.k, self.seed, epoch)[0]
                imgs = np.zeros((self.k, *query.shape, 1), query.dtype)
                boxes = np.tile(np.array([0, 0, *query.shape], np.float32), (self.k, 1))
                for j, h in enumerate(hard):
                    if h >= 0:
                        v, v_box = self.view(*self.reader.image_and_box(int(d.record_of_row[h])), epoch, row, 2 + j)
                        imgs[j, ..., 0] = v
                        if v_box is not None:
                            boxes[j] = v_box
                ex["hard_negatives"], ex["hard_negative_rows"] = imgs, hard.astype(np.int64)
                if self.on_device:
                    ex["hard_negative_seeds"] = np.stack(
                        [augment_lib.view_seed(self.seed, epoch, row, 2 + j) for j in range(self.k)])
                    ex["hard_negative_boxes"] = boxes
        except RecordError as e:
            return _corrupt(e.report)
        return ex


class EvalExample:
    """(index, (epoch, record)) -> eval-transformed image + labels, or a corrupt-record marker."""

    def __init__(self, data: PreparedData, reader: RecordReader, cfg: PipelineConfig):
        self.data, self.reader, self.aug = data, reader, cfg.augment

    def __call__(self, item: tuple[int, int]) -> dict:
        epoch, record = item
        d = self.data
        row = int(d.split_rows[record])
        try:
            image, box = self.reader.image_and_box(record)
            image = augment_lib.eval_transform(image, self.aug, box)
        except RecordError as e:
            return _corrupt(e.report)
        return {"image": image[..., None], "labels": d.labels[row], "row": np.int64(row), "epoch": np.int32(epoch),
                "patient": d.codes["patient"][row], "study": d.codes["study"][row],
                "laterality": d.codes["laterality"][row]}


# ----------------------------------------------------------------------------------------------
# Batching that skips corrupt records (runs in the workers) and the corrupt-record account (main)


class _SkipCorruptBatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool):
        super().__init__(parent)
        self.batch_size, self.drop_remainder = batch_size, drop_remainder

    def __iter__(self):
        return _SkipCorruptBatchIterator(self._parent.__iter__(), self.batch_size, self.drop_remainder)


class _SkipCorruptBatchIterator(grain.DatasetIterator):
    """Stacks `batch_size` good examples; corrupt markers met on the way ride along in CORRUPT_KEY."""

    def __init__(self, parent, batch_size: int, drop_remainder: bool):
        super().__init__(parent)
        self.batch_size, self.drop_remainder = batch_size, drop_remainder

    def __next__(self) -> dict:
        good, bad = [], []
        while len(good) < self.batch_size:
            try:
                ex = next(self._parent)
            except StopIteration:
                if good and not self.drop_remainder:
                    break  # a smaller last batch
                if bad:  # a dropped (or empty) tail: still deliver its reports; the next call ends
                    return {CORRUPT_KEY: bad}
                raise
            (bad.append(ex[CORRUPT_KEY]) if CORRUPT_KEY in ex else good.append(ex))
        batch = {k: np.stack([ex[k] for ex in good]) for k in good[0]}
        batch[CORRUPT_KEY] = bad
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _CorruptAccountDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_corrupt: int):
        super().__init__(parent)
        self.max_corrupt = max_corrupt

    def __iter__(self):
        return CorruptAccountIterator(self._parent.__iter__(), self.max_corrupt)


class CorruptAccountIterator(grain.DatasetIterator):
    """Counts (and logs) the corrupt records reported in the batches; the count is checkpointed."""

    def __init__(self, parent, max_corrupt: int):
        super().__init__(parent)
        self.max_corrupt = max_corrupt
        self.corrupt_count = 0
        self.corrupt_reports: list[dict] = []  # the most recent ones (for a summary)

    def __next__(self) -> dict:
        batch = next(self._parent)
        while len(batch) == 1 and CORRUPT_KEY in batch:  # reports only (end of the data)
            self._count(batch.pop(CORRUPT_KEY))
            batch = next(self._parent)
        self._count(batch.pop(CORRUPT_KEY, ()))
        return batch

    def _count(self, reports) -> None:
        for r in reports:
            self.corrupt_count += 1
            self.corrupt_reports = (self.corrupt_reports + [r])[-20:]
            log.warning("skipped %s (%d so far, limit %d)", describe_report(r), self.corrupt_count, self.max_corrupt)
            if self.corrupt_count > self.max_corrupt:
                raise CorruptRecordError(
                    f"{self.corrupt_count} corrupt records met, more than max_corrupt={self.max_corrupt}; last: "
                    f"{describe_report(r)}. Re-run prepare for this data, or raise max_corrupt to go on.")

    def get_state(self):
        return {"parent": self._parent.get_state(), "corrupt_count": self.corrupt_count}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.corrupt_count = int(state["corrupt_count"])


# ----------------------------------------------------------------------------------------------
# The dataset


def _shuffle_seed(seed: int) -> int:
    """A 32-bit shuffle seed from the run seed (grain reshuffles epoch e with seed + e)."""
    return int(pairs._splitmix64_int((int(seed) ^ 0x5A17_0003) & ((1 << 64) - 1)) >> 32)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The records of epoch `epoch` in the order all processes together read them (for tests/tools)."""
    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=_shuffle_seed(seed))
    return np.array([ds[epoch * n + i] - epoch * n for i in range(n)], np.int64)


def prepared_for(cfg: PipelineConfig) -> PreparedData:
    """`load_prepared` with what `cfg` asks for (pairs and hard negatives only in contrastive mode)."""
    contrastive = cfg.mode == "contrastive"
    return load_prepared(cfg.data_dir, cfg.split, cfg.strategy if contrastive else None,
                         cfg.hard_negatives if contrastive else None, cfg.name,
                         include_self=cfg.include_self if contrastive else None)


def example_dataset(cfg: PipelineConfig, data: PreparedData | None = None,
                    reader: RecordReader | None = None, transform=None) -> grain.MapDataset:
    """The per-example MapDataset of this process: shuffle -> process slice -> repeat -> examples.

    Elements are example dicts (or corrupt markers {CORRUPT_KEY: report}). Position i of this
    process's stream belongs to epoch i // len(slice).
    """
    data = data or prepared_for(cfg)
    reader = reader or open_reader(data)
    if len(reader) != data.n:
        raise ValueError(f"split {data.split!r}: table.parquet lists {data.n} records but the shards hold "
                         f"{len(reader)}; the records and the table come from different prepare runs")
    index, count = cfg.layout()
    ds = grain.MapDataset.range(data.n)
    if cfg.shuffle:
        ds = ds.shuffle(seed=_shuffle_seed(cfg.seed))  # epoch e of an index >= n: reshuffled with seed + e
    ds = ds[index::count]
    per_epoch = len(ds)
    if per_epoch == 0:
        raise ValueError(f"split {data.split!r} has {data.n} records: nothing for process {index} of {count}")
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map_with_index(functools.partial(_with_epoch, per_epoch))
    if transform is None:
        transform = (ContrastiveExample if cfg.mode == "contrastive" else EvalExample)(data, reader, cfg)
    return ds.map(transform)


def _with_epoch(per_epoch: int, i: int, record: int) -> tuple[int, int]:
    return i // per_epoch, int(record)


def make_dataset(cfg: PipelineConfig, data: PreparedData | None = None,
                 reader: RecordReader | None = None) -> grain.IterDataset:
    """This process's batches (numpy dicts, local batch size), decoded by `cfg.workers()` processes."""
    data = data or prepared_for(cfg)
    reader = reader or open_reader(data)
    if cfg.workers() > 0:
        check_shared_memory(cfg, example_bytes(cfg, data, reader))
    ds = example_dataset(cfg, data, reader)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              # capped: grain 0.2's prefetch-depth measurement walks every
                                              # ready future per element (78 s of a 190 s export at 512)
                                              prefetch_buffer_size=min(2 * cfg.local_batch_size(), 128)))
    it = _SkipCorruptBatchDataset(it, cfg.local_batch_size(), cfg.drop_remainder)
    if cfg.workers() > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers(),
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return _CorruptAccountDataset(it, cfg.max_corrupt)


def _absl_flags_parsed() -> None:
    """grain's mp_prefetch reads absl flags; outside an absl app (tests, notebooks) take defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------------------------
# Device side


def batch_sharding(mesh, axis: str = "data"):
    """NamedSharding that splits the leading (batch) dimension over `axis` of `mesh`."""
    import jax

    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict:
    """Each process's local slice -> global jax.Arrays (batch dim sharded over the data axis)."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


class DeviceIterator(grain.DatasetIterator):
    """Global jax.Array batches, `depth` of them prepared ahead in a background thread.

    Checkpointable: `get_state()` is the state of the grain iterator right after the last batch
    handed out by `next()` -- batches prefetched but not yet consumed are produced again after a
    restore. Works with grain's Orbax handler: `grain.checkpoint.CheckpointSave(it)` /
    `CheckpointRestore(it)` in an `ocp.args.Composite` (see `checkpoint_args`).
    With sharding=None batches stay numpy (no device transfer).
    """

    def __init__(self, parent: grain.DatasetIterator, sharding=None, depth: int = 2):
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        super().__init__(parent)
        self.sharding, self.depth = sharding, max(int(depth), 1)
        self._state = parent.get_state()

    # the producer thread is the only user of the parent iterator while it runs
    def _produce(self, q: queue.Queue, stop: threading.Event):
        while not stop.is_set():
            try:
                batch = next(self._parent)
                state = self._parent.get_state()
                if self.sharding is not None:
                    batch = to_global(batch, self.sharding)
                item = (batch, state, None)
            except BaseException as e:  # StopIteration too: delivered in order, then the thread ends
                item = (None, None, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def start_prefetch(self) -> None:
        if self._thread is None:
            self._stop = threading.Event()
            self._queue = queue.Queue(self.depth)
            self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True,
                                            name="cxrjax-device-prefetch")
            self._thread.start()

    def _halt(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    def __next__(self) -> dict:
        self.start_prefetch()
        batch, state, error = self._queue.get()
        if error is not None:
            self._halt()
            raise error
        self._state = state
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self._halt()  # drop what was prefetched from the old position
        self._parent.set_state(state)
        self._state = state

    @property
    def corrupt_count(self) -> int:
        return int(self._state.get("corrupt_count", 0))

    def close(self) -> None:
        self._halt()
        self._parent.close()
        super().close()


def make_iterator(cfg: PipelineConfig, mesh=None, *, data: PreparedData | None = None,
                  axis: str = "data") -> DeviceIterator:
    """The training iterator: global batches on `mesh` (sharded over `axis`), prefetched.

    mesh=None keeps numpy batches (tests, tools). Call `.close()` when done (stops the workers).
    """
    it = make_dataset(cfg, data).__iter__()
    return DeviceIterator(it, batch_sharding(mesh, axis) if mesh is not None else None, cfg.device_prefetch)


class IteratorSnapshot:
    """The iterator state as of the save call: an async save must not read a state the loop has moved past."""

    def __init__(self, iterator):
        state = iterator.get_state()
        # grain's handler writes a non-DatasetIterator's state as bytes; a dict becomes the same JSON
        # a DatasetIterator's would, so restoring into the live iterator reads it back as a dict.
        self._state = json.dumps(state, indent=4).encode() if isinstance(state, dict) else state

    def get_state(self):
        return self._state


def checkpoint_args(iterator, restore: bool = False):
    """Orbax args for the iterator item of an `ocp.args.Composite` (grain's Orbax handler).

    Saving takes a snapshot of the state now; restoring sets the state of the live `iterator`.
    """
    if restore:
        return grain.checkpoint.CheckpointRestore(iterator)
    return grain.checkpoint.CheckpointSave(IteratorSnapshot(iterator))


# ----------------------------------------------------------------------------------------------
# Vision-language examples (mixed into fixed-share batches by `vl_pipeline`)


VL_KINDS = ("paired", "image", "text")


class VLExample:
    """(index, (epoch, record)) -> a vision-language example of one kind, or a corrupt marker.

    paired: image + report; image: image only; text: report only (the image is not decoded).
    Images get one training view (slot 0 of `augment.example_rng`); reports are raw text (the
    tokenizer runs later, in cxrjax.data.text).
    """

    def __init__(self, data: PreparedData, reader: RecordReader, cfg: PipelineConfig, kind: str):
        if kind not in VL_KINDS:
            raise ValueError(f"kind {kind!r}; expected one of {VL_KINDS}")
        self.data, self.reader, self.cfg, self.kind = data, reader, cfg, kind

    def __call__(self, item: tuple[int, int]) -> dict:
        epoch, record = item
        row = int(self.data.split_rows[record])
        want = {"paired": ("image", "report"), "image": ("image",), "text": ("report",)}[self.kind]
        try:
            f = self.reader.features(record, want)
        except RecordError as e:
            return _corrupt(e.report)
        ex = {"row": np.int64(row), "epoch": np.int32(epoch)}
        if "image" in f:
            rng = augment_lib.example_rng(self.cfg.seed, epoch, row, 0)
            ex["image"] = augment_lib.augment(f["image"], self.cfg.augment, rng)[..., None]
        if "report" in f:
            ex["report"] = f["report"]
        return ex
