r"""Prepare a dataset for training: canonical table, sharded records, pair-group indexes, manifest.

    python -m cxrjax.prepare --source=phantom --out=data/phantom                     # built-in synthetic data
    python -m cxrjax.prepare --source=shared --src=../shared/data --out=data/shared  # COVID-19 collection + NIH subset
    python -m cxrjax.prepare --source=chexpert --src=/data/chexpert --out=data/chexpert --size=320 --fit=shorter
    python -m cxrjax.prepare --source=chexpert --src=/data/chexpert --out=OUT --pairs_only   # metadata only
    python -m cxrjax.prepare --source=phantom --out=data/phantom_raw --pixels=raw     # raw pixels: no decode per read
    python -m cxrjax.prepare --source=csv --src=my.csv --csv_mapping=path=File,patient_id=PID --out=OUT

Writes into --out:
    table.parquet            the canonical table (one row per image) + `record` (index in its split's records)
    <name>/1.0.0/            a TFDS dataset of ArrayRecord shards (tfds.data_source(name, data_dir=OUT) reads it)
    pairs/<strategy>.npz     MedAug pair groups (CSR over table rows), pairs/hard-<kind>.npz hard negatives
    reports.parquet          unpaired report text (with --reports)
    manifest.json            counts per split/view/label, bad inputs with path and reason, group-size statistics

Images keep their aspect ratio: by default the longer side is scaled to --size and the shorter one
padded with black (--fit=pad, nothing of the anatomy is lost); --fit=crop scales the shorter side and
cuts the centre; --fit=shorter scales the shorter side to --size (MedAug's Resize(320)) and keeps the
longer side up to --max_aspect times that, stored centred in a square of --size x --max_aspect (what
MedAug's geometry, augment.geometry=shorter_side_crop, needs). Every record also holds its content box,
so augmentation never mistakes the black for anatomy. Re-running with the same settings resumes an
interrupted run and never duplicates records.
"""

from __future__ import annotations

from pathlib import Path

from cxrjax.data import images, pairs, records, schema
from cxrjax.data.prepared import (  # noqa: F401  (re-exported: cxrjax.prepare.prepare_dataset etc.)
    SOURCES, build_pairs, manifest_counts, prepare_dataset, summary, write_json)

def main(argv) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    manifest = prepare_dataset(
        f.source, f.out, src=f.src, size=f.size, fit=f.fit, max_aspect=f.max_aspect, bit_depth=f.bit_depth, pixels=f.pixels, workers=f.workers,
        shard_size=f.shard_size, compress_level=f.compress_level, name=f.name, strategies=f.strategies,
        include_self=f.include_self, pairs_only=f.pairs_only, patients=f.patients, seed=f.seed, phantom_version=f.phantom_version,
        csv_mapping=f.csv_mapping, image_ext=f.image_ext, reports=f.reports, progress=True,
    )
    print(summary(manifest))
    print(f"wrote {Path(f.out).resolve()}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_enum("source", None, list(SOURCES), "Dataset layout to read (phantom needs no --src).")
    flags.DEFINE_string("src", None, "Dataset folder (or CSV file for --source=csv).")
    flags.DEFINE_string("out", None, "Output folder (created; re-running resumes).")
    flags.DEFINE_integer("size", 256, "Prepared square image size in pixels.")
    flags.DEFINE_enum("fit", "pad", list(images.FIT_MODES),
                      "pad: keep all anatomy, pad with black; crop: centre crop; shorter: shorter side = --size, "
                      "aspect kept (MedAug)")
    flags.DEFINE_float("max_aspect", images.MAX_ASPECT, "--fit=shorter: longest kept side / shorter side.")
    flags.DEFINE_integer("bit_depth", 8, "8- or 16-bit PNG records (16 for DICOM sources).")
    flags.register_validator("bit_depth", lambda v: v in (8, 16), message="--bit_depth must be 8 or 16")
    flags.DEFINE_enum("pixels", "png", list(records.PIXEL_FORMATS),
                      "png: PNG-encoded images (smaller); raw: the pixels as a fixed-shape tensor (no decode "
                      "when reading: the fast input pipeline, ~2x the disk for real radiographs).")
    flags.DEFINE_integer("workers", 0, "Parallel shard writers; 0 = all cores.")
    flags.DEFINE_integer("shard_size", 1024, "Images per ArrayRecord shard.")
    flags.DEFINE_integer("compress_level", 1, "PNG compression level 0-9 (1: fast, ~15% larger than 6).")
    flags.DEFINE_string("name", None, "TFDS dataset name of the records (default: the source name).")
    flags.DEFINE_list("strategies", None, "Pair strategies to index (default: all). " + ", ".join(pairs.STRATEGIES))
    flags.DEFINE_bool("include_self", False, "Put each image in its own pair group (MedAug eq. 2 exactly).")
    flags.DEFINE_bool("pairs_only", False, "Table + pair indexes from metadata alone, no images.")
    flags.DEFINE_integer("patients", 200, "Phantom: number of synthetic patients.")
    flags.DEFINE_integer("seed", 0, "Phantom: generator seed.")
    flags.DEFINE_string("phantom_version", None, "Phantom: renderer version (default: the current one, "
                        "cxrjax.data.phantom.VERSION; 2 = the films before real films' nuisance, docs/phantom.md).")
    flags.DEFINE_string("csv_mapping", None, "CSV: canonical=column pairs, e.g. path=File,patient_id=PID.")
    flags.DEFINE_string("image_ext", ".jpg", "MIMIC: image file extension (.jpg for MIMIC-CXR-JPG, .dcm for DICOM).")
    flags.DEFINE_string("reports", None, "OpenI NLMCXR_reports.tgz (or folder) -> reports.parquet (unpaired text).")
    flags.mark_flags_as_required(["source", "out"])


def run() -> None:
    from absl import app

    _define_flags()

    def _main(argv):
        try:
            main(argv)
        except (schema.MetadataError, pairs.PairIndexError) as e:
            # Bad input is the user's to fix: one clear line, no traceback.
            raise SystemExit(f"prepare: error: {e}") from None

    app.run(_main)


if __name__ == "__main__":
    run()
