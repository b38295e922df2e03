"""`python -m cxrjax.data.phantom`: a PNG grid of sample images, or the rendering speed.

    python -m cxrjax.data.phantom --grid=/tmp/phantom_grid.png --patients=4 --seed=0 --size=256
    python -m cxrjax.data.phantom --bench=500 --size=64      # images/s on one core
    python -m cxrjax.data.phantom --takes=docs/phantom_takes.png --size=128   # one study, v2 beside v3, 6 takes
"""

from __future__ import annotations

import argparse
import time

from cxrjax.data.schema import CHEXPERT_LABELS

from .raster import tune_allocator
from .render import render_image, render_scene
from .scene import scene
from .table import make_table

_SHORT = {"No Finding": "normal", "Enlarged Cardiomediastinum": "ECM", "Cardiomegaly": "cardiomeg", "Lung Opacity": "opac",
          "Lung Lesion": "lesion", "Edema": "edema", "Consolidation": "consol", "Pneumonia": "pneumonia",
          "Atelectasis": "atelect", "Pneumothorax": "PTX", "Pleural Effusion": "effusion", "Pleural Other": "pl.other",
          "Fracture": "fracture", "Support Devices": "devices"}


def _caption(row) -> str:
    parts = []
    for c in CHEXPERT_LABELS:
        v = row[c]
        if v == 1.0:
            parts.append(_SHORT[c])
        elif v == -1.0:
            parts.append(_SHORT[c] + "?")
    return f"{row['study_id']} {row['view']}", " ".join(parts)


def write_sample_grid(path, n_patients: int = 4, seed: int = 0, size: int = 256, max_studies: int = 4) -> str:
    """PNG grid: one row per patient, its images across studies, with a caption of each study's labels."""
    from PIL import Image, ImageDraw

    table = make_table(n_patients, seed, max_studies=max_studies)
    groups = [g for _, g in table.groupby("patient_id", sort=True)]
    ncol = max(len(g) for g in groups)
    cap = 26
    canvas = Image.new("L", (ncol * (size + 4), len(groups) * (size + cap + 4)), 0)
    draw = ImageDraw.Draw(canvas)
    for i, g in enumerate(groups):
        for j, (_, row) in enumerate(g.iterrows()):
            x0, y0 = j * (size + 4), i * (size + cap + 4)
            canvas.paste(Image.fromarray(render_image(row, size)), (x0, y0))
            line1, line2 = _caption(row)
            draw.text((x0 + 2, y0 + size + 1), line1, fill=255)
            draw.text((x0 + 2, y0 + size + 13), line2[: max(10, size // 6)], fill=200)
    canvas.save(str(path))
    return str(path)


def write_takes(path, seed: int = 0, size: int = 128, takes: int = 6, versions=("2", "3")) -> str:
    """PNG: the frontal and the lateral of one study rendered `takes` times (as if re-filmed: each take its
    own positioning and acquisition, findings unchanged), one row per (version, view)."""
    from PIL import Image, ImageDraw

    table = make_table(40, seed)
    both = table.groupby("study_id")["laterality"].agg(lambda v: {"frontal", "lateral"} <= set(v))
    effusion = table.groupby("study_id")["Pleural Effusion"].max() == 1.0
    sid = both[both & effusion].index[0]   # a finding to see unchanged through every take
    study = table[table["study_id"] == sid].drop_duplicates("laterality")
    cap = 14
    rows = [(v, row) for v in versions for _, row in study.iterrows()]
    canvas = Image.new("L", (takes * (size + 4) + 60, len(rows) * (size + cap + 4)), 0)
    draw = ImageDraw.Draw(canvas)
    for i, (v, row) in enumerate(rows):
        y0 = i * (size + cap + 4)
        draw.text((2, y0 + size // 2), f"v{v}\n{row['view']}", fill=255)
        sc = scene(row)
        for k in range(takes):
            image_id = row["image_id"] if k == 0 else f"{row['image_id']}#take{k}"
            canvas.paste(Image.fromarray(render_scene(sc, image_id, size, v)), (60 + k * (size + 4), y0))
        draw.text((62, y0 + size + 1), f"{sid}: " + (_caption(row)[1] or "no finding"), fill=200)
    canvas.save(str(path))
    return str(path)


def bench(n: int, size: int, seed: int = 0) -> float:
    table = make_table(max(1, n // 2), seed)
    rows = [r for _, r in table.iterrows()][:n]
    tune_allocator()  # as prepare's workers do
    render_image(rows[0], size)
    t0, c0 = time.perf_counter(), time.process_time()
    for r in rows:
        render_image(r, size)
    return len(rows) / (time.perf_counter() - t0), len(rows) / (time.process_time() - c0)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cxrjax.data.phantom",
                                 description="Synthetic chest X-ray studies: write a sample grid PNG or benchmark rendering.")
    ap.add_argument("--grid", help="write a PNG grid of sample images to this path")
    ap.add_argument("--patients", type=int, default=4, help="patients (grid rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--max_studies", type=int, default=4)
    ap.add_argument("--bench", type=int, default=0, help="render this many images and print images/s")
    ap.add_argument("--takes", help="write a PNG of one study rendered several times, version 2 beside version 3")
    args = ap.parse_args(argv)
    if not args.grid and not args.bench and not args.takes:
        ap.error("nothing to do: pass --grid=OUT.png, --takes=OUT.png and/or --bench=N")
    if args.takes:
        print(f"wrote {write_takes(args.takes, args.seed, args.size)}: one study, 6 takes, versions 2 and 3")
    if args.grid:
        out = write_sample_grid(args.grid, args.patients, args.seed, args.size, args.max_studies)
        print(f"wrote {out}: {args.patients} patients, seed {args.seed}, {args.size}x{args.size}")
    if args.bench:
        wall, cpu = bench(args.bench, args.size, args.seed)
        print(f"rendered {args.bench} images at {args.size}x{args.size}: {wall:.1f} images/s wall-clock, "
              f"{cpu:.1f} images/s per CPU-second (one core)")


if __name__ == "__main__":
    main()

