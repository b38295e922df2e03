"""Prepare throughput: records written per second, and seconds to build the pair indexes at CheXpert scale.

    python benchmarks/prepare_bench.py [--images=2000] [--size=256] [--workers=0]
    python benchmarks/prepare_bench.py --pixels_only --images=600    # (c) alone
    python benchmarks/prepare_bench.py --records_only --images=223414 --size=64   # (a) at CheXpert scale

(a) Record writing: the phantom generator renders --images images (its CheXpert-shaped table, 3.48
    images per patient: --images=223414 is CheXpert's train table in size), and cxrjax writes them as
    sharded ArrayRecord/TFDS records with all cores; peak RSS of this process and of its workers. Rendering is part of the measured time, so the figure is
    a lower bound on file-based sources: decode+resize+PNG+serialize is also measured alone on the
    real COVID-19 images when ../shared/data is present.
(b) Pair index: every MedAug strategy on a 224k-row CheXpert-shaped table. The real CheXpert train.csv
    (223,414 rows) is used from ../shared/data/metadata when present; otherwise a synthetic table with
    the same patient/study/view size distribution.
(c) Pixel formats: the same images prepared as PNG records and as raw-pixel records (--pixels=raw):
    KiB per image on disk and single-threaded read+decode time per image through
    `pipeline.RecordReader.image` (best of 3 passes over the split), on the phantom and, when
    ../shared/data is present, on the real COVID-19 + NIH images.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def bench_records(n_images: int, size: int, workers: int, shared: bool = True) -> None:
    from cxrjax import prepare

    patients = max(1, round(n_images / 3.48))  # the phantom makes 3.48 images per patient (CheXpert's shape)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        m = prepare.prepare_dataset("phantom", d, patients=patients, size=size, workers=workers, strategies=["instance"])
        dt = time.perf_counter() - t
        n = m["counts"]["images"]
        # ru_maxrss is KiB on Linux; RUSAGE_CHILDREN is the largest finished worker
        rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"records  phantom  {n} images at {size}px, workers={workers or os.cpu_count()}: "
              f"{m['timings']['records_s']:.1f} s -> {n / m['timings']['records_s']:.0f} images/s "
              f"(whole prepare {dt:.1f} s -> {n / dt:.0f} images/s, {m['records']['bytes'] / n / 1024:.1f} KiB/image); "
              f"peak RSS {rss_self:.0f} MiB (main process), {rss_child:.0f} MiB (largest worker)")
        if shared and (SHARED / "covid-chestxray").is_dir():
            shutil.rmtree(d, ignore_errors=True)
            m = prepare.prepare_dataset("shared", d, src=SHARED, size=size, workers=workers, strategies=["instance"])
            n = m["counts"]["images"]
            print(f"records  shared   {n} real JPEG/PNG files at {size}px, workers={workers or os.cpu_count()}: "
                  f"{m['timings']['records_s']:.1f} s -> {n / m['timings']['records_s']:.0f} images/s")


def bench_pixels(n_images: int, size: int, workers: int) -> None:
    from cxrjax import prepare
    from cxrjax.data import pipeline

    sources = [("phantom", None)] + ([("shared", SHARED)] if (SHARED / "covid-chestxray").is_dir() else [])
    for source, src in sources:
        per = {}
        with tempfile.TemporaryDirectory() as d:
            for pixels in ("png", "raw"):
                out = Path(d) / pixels
                m = prepare.prepare_dataset(source, out, src=src, size=size, workers=workers, pixels=pixels,
                                            patients=max(1, n_images // 3), strategies=["instance"])
                reader = pipeline.RecordReader(out, m["name"], "train")
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    for i in range(len(reader)):
                        reader.image(i)
                    best = min(best, (time.perf_counter() - t) / len(reader))
                per[pixels] = (m["records"]["bytes"] / m["counts"]["images"] / 1024, best * 1e6, len(reader))
        for pixels, (kib, us, n) in per.items():
            print(f"pixels   {source:8s} {pixels}  {size}px: {kib:6.1f} KiB/image, read+decode {us:7.1f} us/image "
                  f"({n} train records, 1 thread)")
        print(f"pixels   {source:8s} raw/png: {per['raw'][0] / per['png'][0]:.2f}x the bytes, "
              f"{per['png'][1] / per['raw'][1]:.1f}x faster to read")


def chexpert_shaped_table():
    import pandas as pd

    from cxrjax.data import metadata, schema

    real = SHARED / "metadata" / "chexpert_train.csv.gz"
    if real.is_file():
        t = time.perf_counter()
        table = metadata.load_chexpert_csv(real).table
        print(f"table    real CheXpert train.csv: {len(table)} rows loaded in {time.perf_counter() - t:.1f} s")
        return table
    rng = np.random.default_rng(0)  # ~65k patients, 1-12 studies, 1-2 views: CheXpert's shape
    patients = 65_000
    studies = rng.geometric(0.45, patients).clip(1, 40)
    rows = []
    for p, ns in enumerate(studies):
        for s in range(ns):
            for v in range(1 + (rng.random() < 0.2)):
                rows.append((f"patient{p:05d}", f"patient{p:05d}/study{s + 1}", s, "LATERAL" if v else "AP"))
    df = pd.DataFrame(rows, columns=["patient_id", "study_id", "study_order", "view"])
    df["image_id"] = df["study_id"] + "/view" + df.groupby("study_id").cumcount().astype(str)
    df["laterality"] = schema.laterality_of(df["view"])
    print(f"table    synthetic CheXpert-shaped: {len(df)} rows")
    return df


def bench_pairs() -> None:
    from cxrjax.data import pairs

    table = chexpert_shaped_table()
    total = 0.0
    for name in list(pairs.STRATEGIES) + [f"hard-{k}" for k in pairs.HARD_NEGATIVES]:
        t = time.perf_counter()
        if name.startswith("hard-"):
            index = pairs.build_hard_negative_index(table, name[5:])
        else:
            index = pairs.build_pair_index(table, name)
        dt = time.perf_counter() - t
        total += dt
        s = pairs.group_size_stats(index)
        print(f"pairs    {name:32s} {dt:6.2f} s  mean group {s['group_size_mean']:5.2f}  fallback {s['frac_fallback']:6.1%}")
    print(f"pairs    all {len(pairs.STRATEGIES) + len(pairs.HARD_NEGATIVES)} indexes on {len(table)} rows: {total:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--skip_records", action="store_true")
    ap.add_argument("--pixels_only", action="store_true", help="run (c) only")
    ap.add_argument("--records_only", action="store_true", help="run (a) only, on the phantom")
    args = ap.parse_args()
    if args.records_only:
        bench_records(args.images, args.size, args.workers, shared=False)
        return
    if args.pixels_only:
        bench_pixels(args.images, args.size, args.workers)
        return
    if not args.skip_records:
        bench_records(args.images, args.size, args.workers)
        bench_pixels(args.images, args.size, args.workers)
    bench_pairs()


if __name__ == "__main__":
    main()
