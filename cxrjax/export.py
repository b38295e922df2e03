r"""Export image embeddings of a prepared data set for downstream notebooks (pandas / polars).

    python -m cxrjax.export --checkpoint=runs/demo --data=data/phantom --out=embeddings.parquet --size=56
    python -m cxrjax.export --checkpoint=runs/medaug/40000 --data=data/chexpert --out=emb/ --format=npy
    python -m cxrjax.export --init=random --width=16 --data=data/phantom --out=random.parquet --size=56

One row per image, in table order within each split: `row` (the table.parquet row), the canonical metadata
columns (image_id, patient_id, study_id, study_order, view, laterality, split, source, the 14 labels) and
`embedding` (a fixed-size list of float32). `--format=npy` writes OUT/embeddings.npy (n, d) +
OUT/metadata.parquet (same rows, same order). A masked vision-language run exports its ViT's pooled image
embedding at its training size. Embeddings stream to disk as they are computed (parquet row groups of
16,384 images): memory does not grow with the number of images (benchmarks/export_bench.py).
8- and 16-bit records (`prepare --bit_depth=16`) are each normalised by their own maximum.

Pseudonymisation (default): patient_id, study_id and image_id are replaced by a salted hash
(HMAC-SHA256, 16 hex digits) and `path` and report text are left out (paths and ids embed the
dataset's patient numbers). The salt is --salt, or the one in OUT.salt.txt from an earlier export, or a new
random one written there (never into the exported table): keep it private, reuse it to get the same
pseudonyms across exports. `--raw_ids` keeps the original ids and path.
"""

from __future__ import annotations

from absl import flags, logging

from cxrjax import cli, xla_cpu

PROG = "cxrjax.export"
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "A cxrjax MoCo or masked vision-language run: WORKDIR (latest "
                                  "step) or WORKDIR/STEP.")
_INIT = flags.DEFINE_enum("init", "checkpoint", ["checkpoint", "imagenet", "random"], "Where the encoder comes from.")
_WEIGHTS = flags.DEFINE_string("weights", "", "--init=imagenet: weights from cxrjax.tools.import_torchvision.")
_ARCH = flags.DEFINE_string("arch", "resnet18", "--init=imagenet/random: architecture.")
_WIDTH = flags.DEFINE_integer("width", 64, "--init=imagenet/random: ResNet width (64 = torchvision).")
_SEED = flags.DEFINE_integer("seed", 0, "--init=random: init seed.")
_DATA = flags.DEFINE_string("data", None, "Prepared data folder (python -m cxrjax.prepare --out=...).")
_SPLITS = flags.DEFINE_list("splits", ["train", "valid", "test"], "Splits to export (those present).")
_OUT = flags.DEFINE_string("out", None, "embeddings.parquet, or a folder with --format=npy.")
_FORMAT = flags.DEFINE_enum("format", "parquet", ["parquet", "npy"], "One parquet, or embeddings.npy + metadata.parquet.")
_OUTPUT = flags.DEFINE_enum("output", "backbone", ["backbone", "head"], "Pooled backbone features or the MoCo embedding.")
_SIZE = flags.DEFINE_integer("size", 0, "Eval image size (px); 0 = the run's training size from its config.json.")
_EVAL_CROP = flags.DEFINE_float("eval_crop", 1.0, "Central fraction kept by the eval transform.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch (a multiple of the devices).")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "Decoding processes (0 = threads of this process).")
_RAW_IDS = flags.DEFINE_boolean("raw_ids", False, "Keep the raw patient/study/image ids and paths (no pseudonyms).")
_SALT = flags.DEFINE_string("salt", "", "Pseudonymisation salt (default: OUT.salt.txt, created if absent).")
flags.mark_flags_as_required(["data", "out"])


def main(argv) -> None:
    del argv  # cli.parse_flags refuses positional arguments
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    xla_cpu.tune()  # before JAX creates its backend
    from cxrjax.data.pipeline import CorruptRecordError
    from cxrjax.eval.export import export_run, salt_path
    from cxrjax.train.checkpoint import CheckpointError

    try:
        meta = export_run(_DATA.value, _OUT.value, checkpoint=_CHECKPOINT.value, init=_INIT.value, weights=_WEIGHTS.value,
                          arch=_ARCH.value, width=_WIDTH.value, seed=_SEED.value, size=_SIZE.value,
                          eval_crop=_EVAL_CROP.value, splits=tuple(_SPLITS.value), fmt=_FORMAT.value,
                          output=_OUTPUT.value, raw_ids=_RAW_IDS.value, salt=_SALT.value, batch_size=_BATCH.value,
                          num_workers=_WORKERS.value)
    except (ValueError, FileNotFoundError, CorruptRecordError, CheckpointError) as e:
        cli.fail(PROG, str(e), cli.EXIT_ERROR)
    where = _OUT.value if _FORMAT.value == "parquet" else f"{_OUT.value}/embeddings.npy + metadata.parquet"
    ids = "raw ids" if _RAW_IDS.value else f"pseudonymised ids (salt in {salt_path(_OUT.value)})"
    print(f"wrote {len(meta)} embeddings to {where} ({ids})")


def run() -> None:
    cli.run(main, prog=PROG, config_flag=None)


if __name__ == "__main__":
    run()
