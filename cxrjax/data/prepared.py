"""A prepared folder from a source: table.parquet (canonical metadata) -> record shards -> pair groups ->
manifest.json (the library behind `python -m cxrjax.prepare`, whose docstring describes the sources,
the layout and the options).

    prepare_dataset(source, out, ...)   the whole thing, resumable
    build_pairs(table, out, ...)        pairs/<strategy>.npz for every strategy (also for TFDS sources)
    manifest_counts, write_json, summary
"""


from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

import cxrjax
from cxrjax.data import images, pairs, records, schema

SOURCES = ("phantom", "chexpert", "mimic", "nih", "shared", "covid", "dicom", "csv")


def _table_and_bad(source: str, src, *, patients: int, seed: int, csv_mapping: str | None, image_ext: str,
                   phantom_version: str | None = None):
    """(table, bad inputs, image root) from a dataset's own files, or the phantom generator."""
    if source == "phantom":
        from cxrjax.data import phantom

        return phantom.make_table(patients, seed=seed, version=phantom_version), [], None
    if src is None:
        raise schema.MetadataError(f"--src is required for --source={source} (the dataset's folder or file)")
    from cxrjax.data import metadata

    options = {}
    if source == "csv":
        if not csv_mapping:
            raise schema.MetadataError(
                "--source=csv needs --csv_mapping, e.g. path=File,patient_id=PatientID[,study_id=...,view=...]"
            )
        options["mapping"] = csv_mapping
    if source == "mimic":
        options["image_ext"] = image_ext
    result = metadata.load_source(source, src, **options)
    root = result.root if result.root is not None else (Path(src) if Path(src).is_dir() else Path(src).parent)
    return result.table, list(result.bad), root


def _label_counts(table: pd.DataFrame) -> dict:
    out = {}
    for c in schema.CHEXPERT_LABELS:
        v = table[c]
        out[c] = {"positive": int((v == 1).sum()), "negative": int((v == 0).sum()),
                  "uncertain": int((v == -1).sum()), "blank": int(v.isna().sum())}
    return out


def manifest_counts(table: pd.DataFrame) -> dict:
    """The manifest's `counts`: images, patients, studies, per split (views, laterality, reports), labels."""
    by_split = {}
    for split, part in table.groupby("split", sort=False):
        by_split[split] = {
            "images": len(part), "patients": int(part["patient_id"].nunique()), "studies": int(part["study_id"].nunique()),
            "views": {k: int(v) for k, v in part["view"].value_counts().items()},
            "laterality": {k: int(v) for k, v in part["laterality"].value_counts().items()},
            "with_report": int((part["report"] != "").sum()),
        }
    return {"images": len(table), "patients": int(table["patient_id"].nunique()),
            "studies": int(table["study_id"].nunique()), "splits": by_split, "labels": _label_counts(table)}


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def build_pairs(table: pd.DataFrame, out: Path, strategies=None, include_self: bool = False) -> dict:
    """Pair-group and hard-negative indexes for `table` (row order = table.parquet order) -> stats."""
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    stats = {}
    for name in strategies or pairs.STRATEGIES:
        t0 = time.perf_counter()
        index = pairs.build_pair_index(table, name, include_self=include_self)
        pairs.save_pair_index(out / "pairs" / f"{name}.npz", index)
        stats[name] = {**pairs.group_size_stats(index), "seconds": round(time.perf_counter() - t0, 3)}
    for kind in pairs.HARD_NEGATIVES:
        index = pairs.build_hard_negative_index(table, kind)
        pairs.save_pair_index(out / "pairs" / f"hard-{kind}.npz", index)
        stats[f"hard-{kind}"] = pairs.group_size_stats(index)
    return stats


def prepare_dataset(
    source: str,
    out,
    *,
    src=None,
    size: int = 256,
    fit: str = "pad",
    max_aspect: float = images.MAX_ASPECT,
    bit_depth: int = 8,
    pixels: str = "png",
    workers: int = 0,
    shard_size: int = 1024,
    compress_level: int = 1,
    name: str | None = None,
    strategies=None,
    include_self: bool = False,
    pairs_only: bool = False,
    patients: int = 200,
    seed: int = 0,
    phantom_version: str | None = None,
    csv_mapping: str | None = None,
    image_ext: str = ".jpg",
    reports=None,
    progress: bool = False,
) -> dict:
    """Run the whole preparation; returns the manifest (also written to OUT/manifest.json)."""
    if source not in SOURCES:
        raise schema.MetadataError(f"unknown --source={source!r}; choose one of {', '.join(SOURCES)}")
    if fit not in images.FIT_MODES:
        raise ValueError(f"--fit must be one of {images.FIT_MODES}, got {fit!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"--bit_depth must be 8 or 16, got {bit_depth}")
    if pixels not in records.PIXEL_FORMATS:
        raise ValueError(f"--pixels must be one of {records.PIXEL_FORMATS}, got {pixels!r}")
    if strategies:
        strategies = [pairs.get_strategy(s).name for s in strategies]  # unknown names fail before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = name or source
    timings = {}

    t0 = time.perf_counter()
    table, bad, root = _table_and_bad(source, src, patients=patients, seed=seed, csv_mapping=csv_mapping,
                                      phantom_version=phantom_version,
                                      image_ext=image_ext)
    table = schema.validate_table(table, where=f"--source={source}")
    timings["metadata_s"] = round(time.perf_counter() - t0, 3)
    n_input = len(table)

    record_info = None
    if pairs_only:
        table = table.assign(record=np.int64(-1))
    else:
        image_source = records.PhantomImages() if source == "phantom" else records.FileImages(str(root), bit_depth)
        settings = records.WriteSettings(str(out), name, size, fit, bit_depth, compress_level, image_source,
                                         pixels=pixels, max_aspect=max_aspect)
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n_input, unit="img", desc=f"records -> {out / name}", smoothing=0.1)
        result = records.write_records(table, settings, shard_size=shard_size, workers=workers,
                                       progress=bar.update if bar else None)
        if bar:
            bar.close()
        seconds = time.perf_counter() - t0
        table = result.table
        bad += [{"path": f["path"], "image_id": f["image_id"], "reason": f["reason"]} for f in result.failed]
        record_info = {
            "dir": f"{name}/{records.RECORD_VERSION}", "shard_lengths": result.shard_lengths,
            "shards_written_this_run": result.written, "size": size, "canvas": settings.canvas, "fit": fit,
            "max_aspect": max_aspect if fit == "shorter" else None, "bit_depth": bit_depth,
            "pixels": pixels, "compress_level": compress_level,
            "bytes": int(sum(f.stat().st_size for f in settings.records_dir.glob("*.array_record-*"))),
        }
        timings["records_s"] = round(seconds, 3)
        if result.written:
            timings["records_images_per_s"] = round(n_input / seconds, 1)

    tmp = out / "table.parquet.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out / "table.parquet")

    t0 = time.perf_counter()
    pair_stats = build_pairs(table, out, strategies, include_self)
    timings["pairs_s"] = round(time.perf_counter() - t0, 3)

    n_reports = None
    if reports:
        from cxrjax.data import metadata

        report_table = metadata.load_openi_reports(reports)
        report_table.to_parquet(out / "reports.parquet", index=False)
        n_reports = len(report_table)
        bad += list(report_table.attrs.get("bad", []))

    manifest = {
        "cxrjax_version": cxrjax.__version__,
        "name": name,
        "source": source,
        "src": str(Path(src).resolve()) if src else None,
        "phantom": ({"patients": patients, "seed": seed, "version": str(table["extra_phantom_version"].iloc[0])}
                    if source == "phantom" and len(table) else None),
        "pairs_only": pairs_only,
        "records": record_info,
        "counts": manifest_counts(table),
        "input_rows": n_input,
        "bad_inputs": {"count": len(bad), "items": bad},
        "pairs": {"include_self": include_self, "strategies": pair_stats},
        "reports": n_reports,
        "timings": timings,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def summary(manifest: dict) -> str:
    """A few lines for the terminal."""
    c = manifest["counts"]
    lines = [f"{c['images']} images, {c['patients']} patients, {c['studies']} studies  "
             + "  ".join(f"{s}={v['images']}" for s, v in c["splits"].items())]
    if manifest["bad_inputs"]["count"]:
        first = manifest["bad_inputs"]["items"][0]
        lines.append(f"{manifest['bad_inputs']['count']} bad input(s) listed in manifest.json "
                     f"(first: {first['path']}: {first['reason']})")
    best = manifest["pairs"]["strategies"].get(pairs.BEST_STRATEGY)
    if best:
        lines.append(f"{pairs.BEST_STRATEGY}: mean group {best['group_size_mean']:.2f}, "
                     f"{best['frac_fallback']:.1%} of images have no partner (fall back to themselves)")
    lines.append("timings: " + ", ".join(f"{k}={v}" for k, v in manifest["timings"].items()))
    return "\n".join(lines)
