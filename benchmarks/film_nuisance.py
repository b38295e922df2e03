r"""How much do films vary in what a linear pixel probe cannot undo? Real NIH films beside the phantom.

    python benchmarks/film_nuisance.py                          # NIH (../shared/data) vs phantom v2 and v3, 64 px
    python benchmarks/film_nuisance.py --versions 3 --patients 400

Per set of frontal films at 64 px (NIH ChestX-ray14's 1,000 published 64 px films; phantom frontals of
--patients patients rendered at 64 px), measured the same way on both:

- **position / angle / scale**: each film is registered to the set's mean film by OpenCV's ECC
  (`cv2.findTransformECC`, affine, on films standardised to mean 0 / SD 1), the template re-estimated from
  the registered films three times (a Procrustes mean). From each affine: shift x / y (% of the width),
  rotation (degrees) and isotropic scale (%, log of the affine's determinant / 2). Spread = robust SD
  (1.4826 x median absolute deviation), so the few films ECC cannot register do not dominate.
- **exposure / contrast**: per film the mean grey level and the SD of grey levels (0-255); their mean and
  SD over films. Low / high grey (2nd / 98th percentile) too.
- **fine noise**: the SD of (film - its Gaussian blur, sigma 1 px) inside the central half.
- **effusion cue**: how much brighter the lower lateral lung zone (the brighter side) is on
  effusion-positive films than on the others, as Cohen's d on films standardised per image -- the simplest
  signal a linear map of the pixels can read (NIH: `Effusion` in Finding Labels; phantom: Pleural
  Effusion = 1 vs the rest).
- **pixel alikeness**: the mean correlation of a film with the set's mean film (unregistered), and the share
  of pixel variance the first 10 principal components hold (films standardised): the higher both are, the
  more a linear map of the pixels sees the same anatomy at the same place in every film.

On the phantom the true per-image positioning is known (`phantom.scene.image_geom`): the benchmark prints
the correlation of the measured shift / rotation / scale with the true ones, the check that the
registration measures what it claims.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxrjax.data import phantom  # noqa: E402

NIH = REPO.parent / "shared" / "data" / "nih1000"
SMOKE_ARGS = ["--patients=12", "--nih_images=24", "--rounds=1"]
SIZE = 64


def load_nih(limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The NIH subset's films (all frontal, PA / AP) as (n, 64, 64) uint8, and their effusion labels (n,)."""
    import cv2

    rows = pd.read_csv(NIH / "Data_Entry_2017_v2020.csv")
    if limit:
        rows = rows.head(limit)
    out = []
    for name in rows["Image Index"]:
        im = cv2.imread(str(NIH / "images" / name), cv2.IMREAD_GRAYSCALE)
        if im is None:
            raise FileNotFoundError(f"{NIH / 'images' / name}: unreadable (listed in Data_Entry_2017_v2020.csv)")
        out.append(cv2.resize(im, (SIZE, SIZE), interpolation=cv2.INTER_AREA) if im.shape != (SIZE, SIZE) else im)
    return np.stack(out), rows["Finding Labels"].str.contains("Effusion").to_numpy()


def phantom_frontals(patients: int, version: str, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    table = phantom.make_table(patients, seed=seed, version=version)
    table = table[table["laterality"] == "frontal"].reset_index(drop=True)
    return phantom.render_images(table, size=SIZE), table


def standardise(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    m = x.mean(axis=(1, 2), keepdims=True)
    s = x.std(axis=(1, 2), keepdims=True)
    return (x - m) / np.maximum(s, 1e-3)


def register(images: np.ndarray, rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(affines (n, 2, 3) mapping the template onto each film, ok (n,) bool): ECC against a Procrustes mean."""
    import cv2

    z = standardise(images)
    template = z.mean(0)
    warps = np.tile(np.eye(2, 3, dtype=np.float32), (len(z), 1, 1))
    ok = np.ones(len(z), bool)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-5)
    for _ in range(rounds):
        for i, im in enumerate(z):
            w = np.eye(2, 3, dtype=np.float32)
            try:
                _, w = cv2.findTransformECC(template, im, w, cv2.MOTION_AFFINE, criteria, None, 5)
                warps[i], ok[i] = w, True
            except cv2.error:   # ECC did not converge on this film: left out of the spread
                warps[i], ok[i] = np.eye(2, 3, dtype=np.float32), False
        aligned = np.stack([cv2.warpAffine(im, w, (SIZE, SIZE), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                           borderMode=cv2.BORDER_REPLICATE) for im, w in zip(z, warps)])
        template = aligned[ok].mean(0)
    return warps, ok


def affine_parameters(warps: np.ndarray) -> pd.DataFrame:
    """Shift (% of the width, of the template's centre), rotation (deg) and isotropic scale (%) of each affine.

    ECC's warp maps template coordinates to film coordinates: x_film = A x_template + t."""
    A, t = warps[:, :, :2].astype(np.float64), warps[:, :, 2].astype(np.float64)
    c = np.array([(SIZE - 1) / 2, (SIZE - 1) / 2])
    centre = np.einsum("nij,j->ni", A, c) + t - c          # where the template's centre lands, minus the centre
    det = np.linalg.det(A)
    rot = np.degrees(np.arctan2(A[:, 1, 0] - A[:, 0, 1], A[:, 0, 0] + A[:, 1, 1]))
    return pd.DataFrame({"shift_x": 100 * centre[:, 0] / SIZE, "shift_y": 100 * centre[:, 1] / SIZE,
                         "rotation": rot, "scale": 100 * 0.5 * np.log(np.abs(det))})


def robust_sd(v: np.ndarray) -> float:
    v = np.asarray(v, np.float64)
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def effusion_cue(images: np.ndarray, positive: np.ndarray) -> float:
    """Cohen's d of the lower lateral zone's brightness (the brighter side) between positive and other films."""
    z = standardise(images)
    n = z.shape[1]
    rows = slice(int(0.65 * n), int(0.9 * n))
    zone = np.maximum(z[:, rows, int(0.1 * n):int(0.35 * n)].mean((1, 2)), z[:, rows, int(0.65 * n):int(0.9 * n)].mean((1, 2)))
    a, b = zone[positive], zone[~positive]
    return float((a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2)) if len(a) > 1 and len(b) > 1 else float("nan")


def measure(images: np.ndarray, rounds: int = 3, positive: np.ndarray | None = None) -> tuple[dict, pd.DataFrame]:
    """The nuisance statistics of one set of films (see the module docstring) and the per-film affines."""
    from scipy import ndimage

    warps, ok = register(images, rounds)
    geo = affine_parameters(warps)[ok]
    x = images.astype(np.float32)
    means, sds = x.mean(axis=(1, 2)), x.std(axis=(1, 2))
    lo, hi = np.percentile(x.reshape(len(x), -1), [2, 98], axis=1)
    q = SIZE // 4
    fine = x - ndimage.gaussian_filter(x, (0, 1, 1))
    noise = fine[:, q:-q, q:-q].std(axis=(1, 2))
    z = standardise(images).reshape(len(images), -1)
    template = z.mean(0)
    corr = (z - z.mean(1, keepdims=True)) @ (template - template.mean()) / (
        np.linalg.norm(z - z.mean(1, keepdims=True), axis=1) * np.linalg.norm(template - template.mean()) + 1e-9)
    zc = z - z.mean(0)
    sv = np.linalg.svd(zc, compute_uv=False) ** 2
    stats = {
        "films": len(images), "registered": int(ok.sum()),
        "shift x, % of width (robust SD)": robust_sd(geo.shift_x), "shift y, % of width (robust SD)": robust_sd(geo.shift_y),
        "rotation, degrees (robust SD)": robust_sd(geo.rotation), "scale, % (robust SD)": robust_sd(geo.scale),
        "mean grey level: mean over films": float(means.mean()), "mean grey level: SD over films": float(means.std()),
        "grey-level SD (contrast): mean": float(sds.mean()), "grey-level SD (contrast): SD over films": float(sds.std()),
        "2nd percentile grey: SD over films": float(lo.std()), "98th percentile grey: SD over films": float(hi.std()),
        "fine noise SD (grey levels)": float(np.median(noise)),
        "effusion cue: lower-zone brightness, Cohen's d (positives)":
            "" if positive is None else f"{effusion_cue(images, positive):.2f} ({int(positive.sum())})",
        "correlation with the mean film": float(corr.mean()),
        "pixel variance in 10 principal components": float(sv[:10].sum() / sv.sum()),
    }
    return stats, affine_parameters(warps).assign(ok=ok)


def true_geometry(table: pd.DataFrame) -> pd.DataFrame:
    """The phantom's rendered positioning of each film (image_geom), in the units `affine_parameters` uses."""
    from cxrjax.data.phantom.scene import image_geom

    rec = []
    for row in table.itertuples(index=False):
        g, _ = image_geom(int(row.extra_seed), str(row.image_id), getattr(row, "extra_phantom_version", "2"))
        rec.append({"shift_x": 50 * g.tx, "shift_y": 50 * g.ty, "rotation": np.degrees(g.rot),
                    "scale": 100 * np.log(g.scale)})
    return pd.DataFrame(rec)


def _cell(v) -> str:
    if isinstance(v, str):
        return v
    if v is None or not np.isfinite(v):
        return ""
    return str(int(v)) if float(v).is_integer() and abs(v) >= 10 else f"{v:.3g}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", nargs="+", default=["2", phantom.VERSION], help="phantom versions to measure")
    ap.add_argument("--patients", type=int, default=300, help="phantom patients (their frontal films are measured)")
    ap.add_argument("--nih_images", type=int, default=0, help="use only the first N NIH films (0: all)")
    ap.add_argument("--rounds", type=int, default=3, help="template re-estimations")
    args = ap.parse_args(argv)
    t0 = time.time()
    columns = {}
    if NIH.is_dir():
        films, positive = load_nih(args.nih_images)
        columns["NIH ChestX-ray14 (../shared/data)"], _ = measure(films, args.rounds, positive)
    else:
        print(f"{NIH} is absent: the real films' column is left out")
    for v in dict.fromkeys(args.versions):
        images, table = phantom_frontals(args.patients, v)
        columns[f"phantom v{v}"], geo = measure(images, args.rounds, (table["Pleural Effusion"] == 1).to_numpy())
        truth = true_geometry(table)
        ok = geo.ok.to_numpy()
        # the template's own offset is arbitrary: correlation, not equality, is the check
        r = {k: float(np.corrcoef(geo[k][ok], truth[k][ok])[0, 1]) for k in ("shift_x", "shift_y", "rotation", "scale")}
        columns[f"phantom v{v}"]["registration vs true positioning (r: shift x / y, rotation, scale)"] = \
            " / ".join(f"{r[k]:.2f}" for k in r)
    df = pd.DataFrame(columns)
    print(f"Frontal films at {SIZE} px; {' '.join(sys.argv[1:]) or '(defaults)'}; {time.time() - t0:.0f} s, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| | " + " | ".join(df.columns) + " |")
    print("|---|" + "---|" * len(df.columns))
    for name, row in df.iterrows():
        print(f"| {name} | " + " | ".join(_cell(v) for v in row) + " |")


if __name__ == "__main__":
    main()
