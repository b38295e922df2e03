"""Input of the masked vision-language job: per-source Grain streams -> fixed-share mixed batches.

    VLConfig                      the pipeline config + shares, pairing, text source, masking
    source_records(...)           which train records are paired / image-only / text-only (by patient)
    block_mask, mlm_mask          multi-scale block masking of patches; BERT masking of word pieces
    VLSlots                       one example of any kind -> the same static slots (image + text +
                                  presence flags + masks), so one compiled step handles every mix
    make_vl_dataset(cfg, tok)     per source: shuffle -> [p::P] -> repeat -> decode/augment (pipeline's
                                  VLExample) -> slots -> batch(share x B); zipped and concatenated
    make_vl_iterator              -> pipeline.DeviceIterator (global arrays, checkpointable state)
    load_eval_split               a held-out split fully in memory (eval transform), for the eval jobs

"Unpaired" is a property of the stream, not of the file: with `paired_fraction` < 1 the patients of
the train split are divided (by a hash of the patient id) into a paired part, whose images enter
with their reports, and an unpaired part, whose images and reports enter as separate image-only and
text-only streams (the model never sees them together). With `text_source='reports'` the text-only
stream is `reports.parquet` instead (e.g. OpenI reports from another institution: "images from A,
reports from B").

A batch (global, after the device iterator); B = sum of the per-source counts. The global batch is one
block per batch shard of the mesh, each block [paired, image, text] (`shard_slices`), so every device
holds its share of every kind and the paired rows are NOT the first B_paired rows (`kind_rows`):
    image (B, S, S, 1) uint8, or uint16 for 16-bit records (zeros when absent); normalised on the device
    by the dtype's full scale (`models.mvlm.normalize`)
                                                    image_present (B,) bool
    patch_mask (B, N) bool, True = masked           mask_scale (B,) int32 index into cfg.mask.scales
    text_ids (B, L) int32 (after MLM corruption)    text_labels (B, L) int32 (original id; -1 = no target)
    text_valid (B, L) bool (no text: all False)     text_present (B,) bool
    source (B,) int32 (0 paired, 1 image, 2 text)   row (B,) int64 (table row; report index for 'reports')
Masks are drawn on the host from (seed, epoch, row, source): a pure function of the example, so they
do not depend on the batch, worker or device layout.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from pathlib import Path

import grain
import numpy as np
import pandas as pd

from cxrjax.data import augment as augment_lib
from cxrjax.data import pipeline
from cxrjax.text import tokenizer as tok_lib

log = logging.getLogger(__name__)

KINDS = ("paired", "image", "text")
SOURCE_CODE = {k: i for i, k in enumerate(KINDS)}
TEXT_SOURCES = ("records", "reports")
_MASK_SLOT = 1000  # example_rng slot of the masks (augmentation uses slots 0..)


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """image_ratio: fraction of patches masked (exact per example, in blocks of the drawn scale);
    scales: block sides in patches, one drawn uniformly per example (the grid must divide by each);
    text_prob: fraction of word pieces chosen as MLM targets ([SEP] and [PAD] never), of which
    text_mask_frac become [MASK], text_random_frac a random word piece, the rest stay (BERT 80/10/10)."""

    image_ratio: float = 0.5
    scales: tuple[int, ...] = (1, 2, 4)
    text_prob: float = 0.15
    text_mask_frac: float = 0.8
    text_random_frac: float = 0.1

    def __post_init__(self):
        if not 0 < self.image_ratio < 1:
            raise ValueError(f"mask.image_ratio must be in (0, 1), got {self.image_ratio}")
        if not self.scales or any(int(s) < 1 for s in self.scales):
            raise ValueError(f"mask.scales must be positive block sides, got {self.scales}")
        if not 0 < self.text_prob < 1:
            raise ValueError(f"mask.text_prob must be in (0, 1), got {self.text_prob}")
        if self.text_mask_frac < 0 or self.text_random_frac < 0 or self.text_mask_frac + self.text_random_frac > 1:
            raise ValueError("mask.text_mask_frac and text_random_frac must be >= 0 with a sum <= 1")


@dataclasses.dataclass(frozen=True)
class VLConfig:
    """pipeline: data_dir, split, GLOBAL batch_size, seed, augment, workers (pipeline.PipelineConfig).
    shares: fraction of each batch per kind ({'paired': 0.5, 'image': 0.25, 'text': 0.25}); each
        share x batch_size must be a whole number (static shapes). Kinds with share 0 are not read.
    paired_fraction: fraction of the train split's patients whose images come with their reports.
    text_source: 'records' (reports of the unpaired patients) or 'reports' (reports.parquet).
    max_len: word pieces per report, [SEP] included. patch: ViT patch side (for the mask grid)."""

    pipeline: pipeline.PipelineConfig
    shares: tuple[tuple[str, float], ...] = (("paired", 1.0),)
    paired_fraction: float = 1.0
    text_source: str = "records"
    max_len: int = 128
    patch: int = 16
    mask: MaskConfig = MaskConfig()
    batch_shards: int = 1  # the mesh's batch shards (data x fsdp): the layout of `shard_slices`

    def __post_init__(self):
        shares = dict(self.shares)
        if set(shares) - set(KINDS):
            raise ValueError(f"data.shares has unknown kinds {sorted(set(shares) - set(KINDS))}; expected {KINDS}")
        if not 0 <= self.paired_fraction <= 1:
            raise ValueError(f"data.paired_fraction must be in [0, 1], got {self.paired_fraction}")
        if self.text_source not in TEXT_SOURCES:
            raise ValueError(f"data.text_source {self.text_source!r}; expected one of {TEXT_SOURCES}")
        size = self.pipeline.augment.size
        grid, rem = divmod(size, self.patch)
        if rem:
            raise ValueError(f"augment.size {size} is not a multiple of the patch {self.patch}")
        bad = [s for s in self.mask.scales if grid % s or grid // s < 2]
        if bad:
            fit = [s for s in range(1, grid // 2 + 1) if grid % s == 0]
            raise ValueError(f"mask.scales {tuple(self.mask.scales)}: {bad} do not divide the {grid}x{grid} patch grid "
                             f"({size} px / patch {self.patch}) into at least 2x2 blocks; scales that fit: "
                             f"{', '.join(map(str, fit))} (--config.mask.scales=...)")
        self.counts()

    def counts(self) -> dict[str, int]:
        """Examples of each kind per GLOBAL batch (paired first), exact or an error."""
        out = kind_counts(self.shares, self.pipeline.batch_size)
        _, count = self.pipeline.layout()
        if self.batch_shards % count:
            raise ValueError(f"{self.batch_shards} batch shards do not split over {count} processes")
        shard_slices(out, self.batch_shards)  # every kind splits over the batch shards, or a one-line error
        return out

    @property
    def grid(self) -> int:
        return self.pipeline.augment.size // self.patch


def kind_counts(shares, batch_size: int) -> dict[str, int]:
    """{kind: examples per global batch} from the shares (a dict or (kind, share) pairs), in KINDS order;
    every share x batch_size a whole number and the counts summing to batch_size, or a one-line error."""
    shares = dict(shares)
    out = {}
    for kind in KINDS:
        share = float(shares.get(kind, 0.0))
        n = share * batch_size
        if share < 0 or abs(n - round(n)) > 1e-6:
            raise ValueError(f"data.shares[{kind!r}]={share} x batch_size {batch_size} is not a whole number of examples")
        if round(n):
            out[kind] = int(round(n))
    if sum(out.values()) != batch_size:
        raise ValueError(f"data.shares {shares} give {sum(out.values())} examples, not batch_size {batch_size}")
    return out


def example_spec(size: int, max_len: int, patch: int, dtype=np.uint8) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every field of one example as `VLSlots` makes it (a batch adds a leading axis);
    what the step is compiled for before any data exists (train.mvlm.abstract_batch)."""
    n = (size // patch) ** 2
    return {"row": ((), np.dtype(np.int64)), "source": ((), np.dtype(np.int32)),
            "image": ((size, size, 1), np.dtype(dtype)), "image_present": ((), np.dtype(bool)),
            "patch_mask": ((n,), np.dtype(bool)), "mask_scale": ((), np.dtype(np.int32)),
            "text_ids": ((max_len,), np.dtype(np.int32)), "text_labels": ((max_len,), np.dtype(np.int32)),
            "text_valid": ((max_len,), np.dtype(bool)), "text_present": ((), np.dtype(bool))}


def shard_slices(counts: dict[str, int], shards: int) -> dict[str, tuple[int, int]]:
    """(start, stop) of each kind inside every batch shard's block of the global batch.

    The global batch is `shards` equal blocks, one per batch shard of the mesh (contiguous rows, as
    the batch sharding lays them out), each [paired, image, text] with counts[kind] / shards of each
    kind. So every device holds its share of every kind: the step takes a kind with a local slice and
    each encoder pass runs on 1/shards of its rows per device, whatever the device or process order."""
    out, start = {}, 0
    for kind in KINDS:
        if counts.get(kind):
            if counts[kind] % shards:
                raise ValueError(f"{counts[kind]} {kind} examples per batch do not split over the {shards} batch "
                                 f"shards of the mesh; make every kind's share x batch_size a multiple of {shards} "
                                 f"(--config.batch_size)")
            n = counts[kind] // shards
            out[kind] = (start, start + n)
            start += n
    return out


def kind_rows(counts: dict[str, int], shards: int = 1) -> dict[str, np.ndarray]:
    """Rows of the GLOBAL batch that hold each kind (the layout of `shard_slices`)."""
    per_shard = sum(counts.values()) // shards
    return {k: np.concatenate([s * per_shard + np.arange(a, b) for s in range(shards)]).astype(np.int64)
            for k, (a, b) in shard_slices(counts, shards).items()}


def interleave(batches: dict[str, dict], local_shards: int) -> dict:
    """This process's per-kind batches -> its local batch: `local_shards` blocks of [paired, image, text]
    (its part of the global layout of `shard_slices`; the process's devices take the blocks in order)."""
    kinds = [k for k in KINDS if k in batches]
    out = {}
    for key in batches[kinds[0]]:
        split = {kind: np.split(batches[kind][key], local_shards) for kind in kinds}
        out[key] = np.concatenate([split[kind][j] for j in range(local_shards) for kind in kinds])
    return out


# ----------------------------------------------------------------------------------------------
# Which records feed which stream


def _unit_hash(key: str, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def read_split_table(data_dir: str | Path, split: str) -> pd.DataFrame:
    """patient_id, report, record of the split's rows, in record order."""
    t = pd.read_parquet(Path(data_dir) / "table.parquet", columns=["patient_id", "split", "record", "report", "source"])
    t = t[t["split"] == split].sort_values("record")
    t["report"] = t["report"].fillna("").astype(str)
    return t


def source_records(table: pd.DataFrame, paired_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Record ids of each stream: paired = rows with a report of the paired patients; image = every
    other row (unpaired patients, and rows without a report); text = rows with a report of the
    unpaired patients. Patient-level, so a patient's image and report never meet unless paired."""
    patients = table["patient_id"].astype(str).to_numpy()
    in_paired = np.array([_unit_hash(p, seed) < paired_fraction for p in patients], bool)
    has_report = (table["report"].str.strip() != "").to_numpy()
    rec = table["record"].to_numpy(np.int64)
    return {"paired": rec[in_paired & has_report], "image": rec[~(in_paired & has_report)],
            "text": rec[~in_paired & has_report]}


def load_reports(data_dir: str | Path) -> list[str]:
    path = Path(data_dir) / "reports.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data.text_source='reports' needs prepare's --reports "
                                "(e.g. --reports=../shared/data/iu-reports/NLMCXR_reports.tgz)")
    reports = pd.read_parquet(path, columns=["report"])["report"].fillna("").astype(str)
    return [r for r in reports if r.strip()]


def tokenizer_corpus(cfg: VLConfig) -> list[str]:
    """The report text the job trains on (train split only): the tokenizer is fitted to exactly this."""
    table = read_split_table(cfg.pipeline.data_dir, cfg.pipeline.split)
    recs = source_records(table, cfg.paired_fraction, cfg.pipeline.seed)
    counts = cfg.counts()
    by_record = table.set_index("record")["report"]
    texts = list(by_record.loc[recs["paired"]]) if "paired" in counts else []
    if "text" in counts:
        texts += load_reports(cfg.pipeline.data_dir) if cfg.text_source == "reports" else list(by_record.loc[recs["text"]])
    return texts


# ----------------------------------------------------------------------------------------------
# Masks (numpy, on the host, per example)


def block_mask(grid: int, scale: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(grid*grid,) bool: round(ratio * (grid/scale)^2) distinct scale x scale blocks, aligned to
    the scale's grid, chosen uniformly (at least one)."""
    g = grid // scale
    n = max(1, int(round(ratio * g * g)))
    blocks = np.zeros(g * g, bool)
    blocks[rng.choice(g * g, n, replace=False)] = True
    m = blocks.reshape(g, g).repeat(scale, 0).repeat(scale, 1)
    return m.reshape(-1)


def mlm_mask(ids: np.ndarray, cfg: MaskConfig, vocab_size: int, rng: np.random.Generator):
    """BERT masking of one report: -> (inputs, labels); labels = -1 where there is no target.

    round(text_prob x n) targets (at least one) among the n word pieces that are not special tokens."""
    candidates = np.flatnonzero(ids >= len(tok_lib.SPECIAL_TOKENS))
    inputs, labels = ids.copy(), np.full_like(ids, -1)
    if len(candidates) == 0:
        return inputs, labels
    n = max(1, int(round(cfg.text_prob * len(candidates))))
    chosen = rng.choice(candidates, n, replace=False)
    labels[chosen] = ids[chosen]
    u = rng.random(n)
    to_mask = u < cfg.text_mask_frac
    to_random = (u >= cfg.text_mask_frac) & (u < cfg.text_mask_frac + cfg.text_random_frac)
    inputs[chosen[to_mask]] = tok_lib.MASK_ID
    inputs[chosen[to_random]] = rng.integers(len(tok_lib.SPECIAL_TOKENS), vocab_size, to_random.sum())
    return inputs, labels


class VLSlots:
    """An example of any kind -> the static slots of a batch (absent modality: zeros, not present)."""

    def __init__(self, cfg: VLConfig, tokenizer, kind: str, dtype=np.uint8):
        self.cfg, self.kind = cfg, kind
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab_size()
        self.size = cfg.pipeline.augment.size
        self.dtype = np.dtype(dtype)  # of the stored pixels: uint8, or uint16 for 16-bit records

    def __call__(self, ex: dict) -> dict:
        c, L = self.cfg, self.cfg.max_len
        row, epoch = int(ex["row"]), int(ex["epoch"])
        rng = augment_lib.example_rng(c.pipeline.seed, epoch, row, _MASK_SLOT + SOURCE_CODE[self.kind])
        out = {"row": np.int64(row), "source": np.int32(SOURCE_CODE[self.kind])}
        if "image" in ex:
            scale_index = int(rng.integers(len(c.mask.scales)))
            image = np.asarray(ex["image"])
            if image.dtype != self.dtype:
                raise ValueError(f"image of row {row} is {image.dtype}, the records hold {np.dtype(self.dtype)}")
            out.update(image=image, image_present=np.bool_(True),
                       patch_mask=block_mask(c.grid, int(c.mask.scales[scale_index]), c.mask.image_ratio, rng),
                       mask_scale=np.int32(scale_index))
        else:
            out.update(image=np.zeros((self.size, self.size, 1), self.dtype), image_present=np.bool_(False),
                       patch_mask=np.zeros(c.grid**2, bool), mask_scale=np.int32(-1))
        if "report" in ex:
            ids, valid = tok_lib.encode(self.tokenizer, [ex["report"]], L)
            inputs, labels = mlm_mask(ids[0], c.mask, self.vocab, rng)
            out.update(text_ids=inputs, text_labels=labels, text_valid=valid[0], text_present=np.bool_(True))
        else:
            out.update(text_ids=np.zeros(L, np.int32), text_labels=np.full(L, -1, np.int32),
                       text_valid=np.zeros(L, bool), text_present=np.bool_(False))
        return out

    def __getstate__(self):  # tokenizers.Tokenizer pickles through its JSON form (decode workers)
        d = dict(self.__dict__)
        d["tokenizer"] = self.tokenizer.to_str()
        return d

    def __setstate__(self, d):
        from tokenizers import Tokenizer

        d["tokenizer"] = Tokenizer.from_str(d["tokenizer"])
        self.__dict__.update(d)


# ----------------------------------------------------------------------------------------------
# Streams and the mixed batches


class _ReportExample:
    """(epoch, index) -> a text-only example from reports.parquet."""

    def __init__(self, reports: list[str]):
        self.reports = reports

    def __call__(self, item):
        epoch, i = item
        return {"row": np.int64(i), "epoch": np.int32(epoch), "report": self.reports[i]}


def _stream(ids: np.ndarray, cfg: pipeline.PipelineConfig, salt: int, transform) -> grain.MapDataset:
    """ids -> shuffled (reshuffled each epoch) -> this process's slice -> repeated -> transform((epoch, id))."""
    index, count = cfg.layout()
    ds = grain.MapDataset.range(len(ids))
    if cfg.shuffle:
        ds = ds.shuffle(seed=(pipeline._shuffle_seed(cfg.seed) + salt) % 2**32)
    ds = ds[index::count]
    per_epoch = len(ds)
    if per_epoch == 0:
        raise ValueError(f"a stream of {len(ids)} examples has nothing for process {index} of {count}")
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map_with_index(functools.partial(pipeline._with_epoch, per_epoch))
    return ds.map(_ById(ids, transform))


class _ById:
    """(epoch, position) -> transform((epoch, ids[position])) (a class: picklable for decode workers)."""

    def __init__(self, ids: np.ndarray, transform):
        self.ids, self.transform = ids, transform

    def __call__(self, item):
        return self.transform((item[0], int(self.ids[item[1]])))


@dataclasses.dataclass(frozen=True)
class _Interleave:
    kinds: tuple[str, ...]
    local_shards: int

    def __call__(self, batches: tuple[dict, ...]) -> dict:
        return interleave(dict(zip(self.kinds, batches)), self.local_shards)


def make_vl_dataset(cfg: VLConfig, tokenizer, data: pipeline.PreparedData | None = None) -> grain.IterDataset:
    """This process's mixed batches (numpy dicts): one batched stream per kind, zipped, concatenated."""
    pc = cfg.pipeline
    data = data or pipeline.load_prepared(pc.data_dir, pc.split, None, None, pc.name)
    reader = pipeline.RecordReader(data.out, data.name, data.split)
    table = read_split_table(pc.data_dir, pc.split)
    recs = source_records(table, cfg.paired_fraction, pc.seed)
    _, count = pc.layout()
    dtype = np.dtype(reader.format.dtype)  # uint8, or uint16 for 16-bit records: kept to the device
    streams = []
    for kind, n in cfg.counts().items():
        if kind == "text" and cfg.text_source == "reports":
            reports = load_reports(pc.data_dir)
            ids, example = np.arange(len(reports)), _ReportExample(reports)
        else:
            ids, example = recs[kind], pipeline.VLExample(data, reader, pc, kind)
        if len(ids) == 0:
            why = {"paired": "no training image of the paired patients has a report",
                   "image": "every training image has a report and belongs to a paired patient",
                   "text": "no unpaired patient has a report"}[kind]
            raise ValueError(f"data.shares asks for {kind} examples but there are none in split {pc.split!r} of "
                             f"{pc.data_dir}: {why} (paired_fraction={cfg.paired_fraction}, "
                             f"text_source={cfg.text_source!r}); change data.paired_fraction or data.shares")
        log.info("vision-language stream %s: %d examples, %d per batch", kind, len(ids), n)
        ds = _stream(ids, pc, SOURCE_CODE[kind], example).filter(pipeline._is_good).map(VLSlots(cfg, tokenizer, kind, dtype))
        streams.append(ds.to_iter_dataset(grain.ReadOptions(num_threads=pc.read_threads, prefetch_buffer_size=2 * n))
                       .batch(n // count, drop_remainder=True))
    it = grain.experimental.ZipIterDataset(streams).map(_Interleave(tuple(cfg.counts()), cfg.batch_shards // count))
    if pc.workers() > 0:
        pipeline._absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=pc.workers(),
                                                         per_worker_buffer_size=pc.worker_buffer_size))
    return it


def make_vl_iterator(cfg: VLConfig, tokenizer, mesh=None, *, axis=("data",)) -> pipeline.DeviceIterator:
    """Global batches on `mesh` (batch dim over `axis`), prefetched, checkpointable (grain state)."""
    import jax

    it = make_vl_dataset(cfg, tokenizer).__iter__()
    sharding = None
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(a for a in axis if a in mesh.axis_names)))
    return pipeline.DeviceIterator(it, sharding, cfg.pipeline.device_prefetch)


# ----------------------------------------------------------------------------------------------
# Held-out data for the eval jobs


def load_eval_split(data_dir: str | Path, split: str, augment: augment_lib.AugmentConfig,
                    name: str | None = None, with_images: bool = True) -> dict:
    """All images of `split` with the eval transform (resize + centre crop), their reports and labels.

    Returns image (n, S, S, 1) uint8 (uint16 for 16-bit records), report (list of str, '' = none), labels (n, 14) float32,
    row (n,) int64, patient (n,) str, source (n,) str. Corrupt records are left out with a warning."""
    data = pipeline.load_prepared(data_dir, split, None, None, name)
    table = read_split_table(data_dir, split)
    reader = pipeline.RecordReader(data.out, data.name, data.split)
    keep, images = [], []
    for record in range(data.n):
        if with_images:
            try:
                images.append(augment_lib.eval_transform(reader.image(record), augment)[..., None])
            except pipeline.RecordError as e:
                log.warning("left out of the eval set: %s", e)
                continue
        keep.append(record)
    keep = np.asarray(keep, np.int64)
    rows = data.split_rows[keep]
    t = table.set_index("record").loc[keep]
    out = {"report": list(t["report"]), "labels": data.labels[rows], "row": rows,
           "patient": t["patient_id"].astype(str).to_numpy(), "source": t["source"].astype(str).to_numpy()}
    if with_images:
        dtype = np.dtype(reader.format.dtype)
        out["image"] = np.stack(images).astype(dtype) if images else np.zeros((0, augment.size, augment.size, 1), dtype)
    return out


def config_from_dict(config, data_dir: str, batch_shards: int = 1) -> VLConfig:
    """The VLConfig of an ml_collections job config (sections data, augment, model, mask); batch_shards:
    the mesh's (`train.mesh.batch_shards`)."""
    d = config.data
    pc = pipeline.PipelineConfig(
        data_dir=data_dir, name=d.name, split=d.split, mode="eval", batch_size=config.batch_size, seed=config.seed,
        num_workers=d.num_workers, read_threads=d.read_threads, device_prefetch=d.device_prefetch,
        max_corrupt=d.max_corrupt, augment=augment_lib.AugmentConfig.from_dict(config.augment))
    m = config.mask
    return VLConfig(
        pipeline=pc, shares=tuple((k, float(v)) for k, v in dict(d.shares).items()),
        paired_fraction=d.paired_fraction, text_source=d.text_source, max_len=config.text.max_len,
        patch=config.model.patch, batch_shards=batch_shards,
        mask=MaskConfig(image_ratio=m.image_ratio, scales=tuple(int(s) for s in m.scales), text_prob=m.text_prob,
                        text_mask_frac=m.text_mask_frac, text_random_frac=m.text_random_frac))
