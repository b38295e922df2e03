r"""Export and feature extraction at CheXpert scale: peak memory (RSS) and images/s against the number of images.

    python benchmarks/export_bench.py                                  # 20,000 and 200,000 images at 64 px
    python benchmarks/export_bench.py --images=20000,200000 --width=64 # a full-width ResNet-18
    python benchmarks/export_bench.py --distinct=0 --images=200000     # every image rendered (slow: see below)

What it does:
1. Renders `--distinct` phantom images (`prepare --source=phantom --pixels=raw`, 64 px) and times it.
2. Builds, for each count N of `--images`, a prepared folder of N images: the distinct images' records
   written again and again into ArrayRecord shards (each record the bytes prepare wrote; table rows with
   their own ids and patients). The decode / eval transform / forward work per image is that of N distinct
   images; only the pixels repeat. `--distinct=0` renders all N instead (the phantom renders ~200 images/s
   per core at 64 px, so 200,000 images take ~15 CPU-minutes, plus ~4 min of metadata at CheXpert scale).
3. For each N, in a fresh process each (so the peak is that job's own): `export.export_embeddings` of every
   split to parquet, and `features.cached_features` of every split (the linear-eval cache); prints the peak
   RSS of the process (ru_maxrss: includes Python, JAX and the compiled model) and the images/s of the job
   (timed from the call: process start-up and model building excluded, compilation included).

The claim being measured: features stream to disk, so the peak does not grow with N (target <= 2 GiB at
200,000 images). What does grow is the metadata table (table.parquet, a few tens of bytes per image).
Numbers go with `uptime` (printed) -- the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SMOKE_ARGS = ["--images=300,600", "--distinct=40", "--data={tmp}/bench", "--batch=32", "--width=8"]


def log(msg: str) -> None:
    print(msg, flush=True)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (prepare's worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def render_distinct(out: Path, patients: int, size: int) -> tuple[float, float]:
    """prepare --source=phantom --pixels=raw into `out` (once) -> (wall s, CPU s) it took ((0, 0) if cached)."""
    from cxrjax import prepare

    if (out / "manifest.json").is_file():
        return 0.0, 0.0
    t0, c0 = time.perf_counter(), cpu_seconds()
    prepare.prepare_dataset("phantom", out, patients=patients, size=size, pixels="raw", strategies=[], workers=0)
    return time.perf_counter() - t0, cpu_seconds() - c0


def tile(src: Path, out: Path, n_images: int, shard_size: int = 4096) -> None:
    """A prepared folder of `n_images` rows whose records cycle through `src`'s records (same split shares)."""
    import numpy as np
    import pandas as pd
    from array_record.python import array_record_module

    from cxrjax.data import pipeline, records

    if (out / "manifest.json").is_file():
        return
    manifest = json.loads((src / "manifest.json").read_text())
    name = manifest["name"]
    table = pd.read_parquet(src / "table.parquet")
    rec_dir = out / name / records.RECORD_VERSION
    rec_dir.mkdir(parents=True, exist_ok=True)
    for f in ("features.json", "dataset_info.json"):
        (rec_dir / f).write_bytes((src / name / records.RECORD_VERSION / f).read_bytes())
    reps = -(-n_images // len(table))
    parts = []
    for split, part in table.groupby("split", sort=False):
        reader = pipeline.RecordReader(src, name, split)
        raw = [reader.read(int(r)) for r in part.sort_values("record")["record"]]
        n = int(round(n_images * len(part) / len(table)))
        rows = part.sort_values("record").iloc[np.arange(n) % len(part)].copy()
        copy = np.arange(n) // len(part)
        for c in ("image_id", "patient_id", "study_id"):
            rows[c] = rows[c].astype(str) + "#" + copy.astype(str)
        rows["path"] = rows["image_id"]
        rows["record"] = np.arange(n, dtype=np.int64)
        parts.append(rows)
        count = -(-n // shard_size)
        for k in range(count):
            w = array_record_module.ArrayRecordWriter(
                str(rec_dir / f"{name}-{split}.array_record-{k:05d}-of-{count:05d}"), records.writer_options("raw"))
            for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
                w.write(raw[i % len(raw)])
            w.close()
    pd.concat(parts, ignore_index=True).to_parquet(out / "table.parquet", index=False)
    manifest.update(tiled_from=str(src), tiled_repeats=reps)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def child(args) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    from cxrjax import xla_cpu

    xla_cpu.tune()
    import jax
    import pandas as pd

    from cxrjax.eval import export
    from cxrjax.data import augment as augment_lib
    from cxrjax.eval import features
    from cxrjax.train import contrastive

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    model = contrastive.default_config().model
    model.update(arch="resnet18", width=args.width, init="random")
    enc = features.build_encoder(model, "random", seed=0, mesh=mesh)
    aug = augment_lib.AugmentConfig(size=args.size)
    splits = pd.read_parquet(Path(args.data) / "table.parquet", columns=["split"]).split
    n = len(splits)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if args.child == "export":
        export.export_embeddings(enc, args.data, str(Path(args.scratch) / "embeddings.parquet"), mesh=mesh,
                                 augment=aug, batch_size=args.batch, num_workers=args.workers, progress=False)
    else:
        for split in sorted(set(splits)):  # the splits the (tiled) table has
            features.cached_features(enc, args.data, split, aug, cache_dir=Path(args.scratch) / "features",
                                     note=lambda s: None, mesh=mesh, batch_size=args.batch,
                                     num_workers=args.workers, progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"job": args.child, "images": n, "seconds": seconds, "images_per_s": n / seconds,
                      "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_job_mib": rss_before, "cpu_s": time.process_time(), "dim": enc.feature_dim}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="20000,200000", help="comma-separated image counts to measure")
    p.add_argument("--distinct", type=int, default=2000, help="phantom images rendered (0: render every image)")
    p.add_argument("--size", type=int, default=64, help="prepared and eval image size (px)")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width (64 = torchvision's)")
    # 64: the pipeline's prefetch buffer is 2 x batch, and grain 0.2.18 polls every buffered future per element
    # (prefetch._measure_prefetch_depth): ~1.7 CPU-ms per image of pure overhead at batch 256
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: threads of the process)")
    p.add_argument("--jobs", default="export,features")
    p.add_argument("--data", default="", help="scratch folder (default: $CXRJAX_CACHE/export-bench)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    cache = Path(os.environ.get("CXRJAX_CACHE", Path.home() / ".cache" / "cxrjax"))
    root = Path(args.data or cache / "export-bench")
    root.mkdir(parents=True, exist_ok=True)
    counts = [int(v) for v in args.images.split(",")]
    log(f"uptime: {os.getloadavg()} (1/5/15-min load average), {os.cpu_count()} CPUs")
    from cxrjax.data import phantom

    per_patient = len(phantom.make_table(200, seed=0)) / 200  # the phantom's images per patient
    results = []
    for n in counts:
        if args.distinct:
            src = root / f"distinct-{args.distinct}-s{args.size}"
            t, cpu = render_distinct(src, max(1, round(args.distinct / per_patient)), args.size)
            if t:
                import pandas as pd

                k = len(pd.read_parquet(src / "table.parquet", columns=["split"]))
                log(f"prepared {k} distinct phantom images at {args.size} px (raw-pixel records) in {t:.1f} s, "
                    f"{cpu:.0f} CPU-s ({1000 * cpu / k:.1f} CPU-ms per image): all {max(counts)} would take "
                    f"~{max(counts) * cpu / k / 60:.0f} CPU-min, ~{max(counts) * t / k / 60:.0f} min at this load")
            data = root / f"tiled-{n}-from-{args.distinct}-s{args.size}"
            t0 = time.perf_counter()
            tile(src, data, n)
            log(f"{data}: {n} images ({time.perf_counter() - t0:.1f} s to write)")
        else:
            data = root / f"rendered-{n}-s{args.size}"
            t, cpu = render_distinct(data, max(1, round(n / per_patient)), args.size)
            if t:
                log(f"prepared all images of {data} at {args.size} px in {t:.1f} s, {cpu:.0f} CPU-s")
        for job in args.jobs.split(","):
            scratch = root / f"out-{job}-{n}"
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            cmd = [sys.executable, __file__, f"--child={job}", f"--data={data}", f"--scratch={scratch}",
                   f"--size={args.size}", f"--width={args.width}", f"--batch={args.batch}", f"--workers={args.workers}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"export_bench: {job} on {n} images failed:\n{r.stderr[-3000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            shutil.rmtree(scratch, ignore_errors=True)
            results.append(res)
            log(f"{job:8s} {res['images']:>8d} images: peak RSS {res['rss_peak_mib']:7.0f} MiB "
                f"(before the job {res['rss_before_job_mib']:.0f}), {res['images_per_s']:7.0f} images/s, "
                f"{res['seconds']:.1f} s, {res['cpu_s']:.0f} CPU-s in the process, {res['dim']}-d features")
    log(f"uptime: {os.getloadavg()}")
    for job in args.jobs.split(","):
        rows = [r for r in results if r["job"] == job]
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            log(f"{job}: {b['images'] / a['images']:.0f}x the images -> {b['rss_peak_mib'] / a['rss_peak_mib']:.2f}x "
                f"the peak RSS ({a['rss_peak_mib']:.0f} -> {b['rss_peak_mib']:.0f} MiB); target <= 2048 MiB")


if __name__ == "__main__":
    main()
