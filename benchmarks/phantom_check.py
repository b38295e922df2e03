r"""Is the phantom CheXpert-like, and are its findings graded? Every number of docs/phantom.md comes from here.

    python benchmarks/phantom_check.py --structure          # phantom (2000 patients) beside CheXpert's train table
    python benchmarks/phantom_check.py --probe              # raw-pixel linear probe, 1 % / 10 % / 100 % of patients
    python benchmarks/phantom_check.py --supervised         # ResNet-18 (width 16) trained on all labels
    python benchmarks/phantom_check.py --speed --demo       # images/s at 64 and 256 px; effusion positives in test

--structure  Reads `../shared/data/metadata/chexpert_train.csv.gz` (CheXpert-v1.0-small train.csv) with
             cxrjax's own CheXpert adapter and prints, for it and for a phantom of --patients patients, the
             study structure (images per study, share of images alone in their study / in a one-frontal +
             one-lateral study / with a same-laterality study-mate, studies per patient, view mix), the
             label shares of the 14 observations (1 / -1 / 0 / blank, per image) and, per MedAug pair
             strategy, the share of images that have a partner and the mean group size. ~1 min.
--probe      Features: the images rendered at --size, area-resized to --pixels x --pixels (the linear-eval
             `init=pixels` baseline), scaled to [0, 1] and standardised per feature. Logistic regression
             (sklearn, L2 strength chosen on the valid split by AUC) on the Pleural Effusion labels of 1 % /
             10 % / 100 % of the training patients (MedAug's protocol: uncertain masked out, blank = 0),
             5 draws each; AUC on the test split. ~2 min.
--supervised A cxrjax ResNet-18 (`cxrjax.models.resnet`, --width) trained from scratch with Adam on every
             training image and all 14 labels (masked BCE: uncertain masked, blank = 0; random shifts),
             then Pleural Effusion AUC on the test split: the labels are learnable when it is high.
             ~10-20 CPU-minutes at width 16, 64 px, 12 epochs.
--speed      Rendering throughput at 64 and 256 px, one process (wall-clock and per CPU-second).
--demo       Effusion-positive images in the test split for several cohort sizes (the demo needs >= 30).
--calibrate N  Tunes the course's rates (cxrjax/data/phantom/course.py: FINDINGS pos / unc / neg,
             SUPPORT_DEVICES, AP_RATE) in N rounds of proportional correction towards CheXpert's image-level
             label shares and AP share, and prints the constants that course.py holds.

Rendered images are cached under --cache (key: phantom VERSION + a hash of the phantom's source, patients,
size, seed), so --probe and --supervised render once.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxrjax.data import pairs, phantom  # noqa: E402
from cxrjax.data.schema import CHEXPERT_LABELS  # noqa: E402

CHEXPERT_TRAIN = REPO.parent / "shared" / "data" / "metadata" / "chexpert_train.csv.gz"
TASK = "Pleural Effusion"
# tests/test_benchmarks.py runs every part with these (seconds of work; the numbers mean nothing)
SMOKE_ARGS = ["--structure", "--calibrate=1", "--speed", "--demo", "--probe", "--supervised", "--patients=40",
              "--chexpert_rows=3000", "--speed_images=4", "--demo_patients", "20", "--seeds=1", "--epochs=1",
              "--batch=16", "--size=32", "--pixels=8", "--fractions", "0.5", "1.0", "--cache={tmp}/phantom-check"]
STRATEGY_NAMES = [s for s in pairs.STRATEGIES if s != "instance"]


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------
# Structure


def structure_stats(t: pd.DataFrame) -> dict:
    """The study-structure, view and label shares of a canonical table (one row per image)."""
    g = t.groupby("study_id")["laterality"]
    n_front = t["study_id"].map(g.agg(lambda s: int((s == "frontal").sum())))
    n_lat = t["study_id"].map(g.agg(lambda s: int((s == "lateral").sum())))
    per_study = n_front + n_lat
    frontal = (t["laterality"] == "frontal").to_numpy()
    mate = np.where(frontal, n_front >= 2, n_lat >= 2)
    studies = t.groupby("patient_id")["study_id"].nunique()
    s = {
        "images": len(t), "patients": int(t["patient_id"].nunique()), "studies": int(t["study_id"].nunique()),
        "images per study": len(t) / t["study_id"].nunique(),
        "images alone in their study": float((per_study == 1).mean()),
        "images in a 1 frontal + 1 lateral study": float(((n_front == 1) & (n_lat == 1)).mean()),
        "images with a same-laterality study-mate": float(mate.mean()),
        "studies with 2+ images": float((t.groupby("study_id").size() >= 2).mean()),
        "studies per patient (mean)": float(studies.mean()),
        "patients with 1 study": float((studies == 1).mean()),
        "patients with 2 studies": float((studies == 2).mean()),
        "patients with 3-5 studies": float(studies.between(3, 5).mean()),
        "patients with 6-10 studies": float(studies.between(6, 10).mean()),
        "patients with > 10 studies": float((studies > 10).mean()),
        "view AP (incl. supine)": float(t["view"].isin(["AP", "AP_SUPINE"]).mean()),
        "view PA": float((t["view"] == "PA").mean()),
        "view LATERAL": float((t["view"] == "LATERAL").mean()),
    }
    for c in CHEXPERT_LABELS:
        v = t[c]
        s[f"label {c}"] = tuple(float(x) for x in ((v == 1).mean(), (v == -1).mean(), (v == 0).mean(), v.isna().mean()))
    order = t.drop_duplicates("study_id").sort_values(["patient_id", "study_order"])
    pos = (order[TASK] == 1).to_numpy()
    same = (order["patient_id"].to_numpy()[1:] == order["patient_id"].to_numpy()[:-1])
    s["effusion: P(1 | previous study 1)"] = float(pos[1:][same & pos[:-1]].mean())
    s["effusion: P(1 | previous study not 1)"] = float(pos[1:][same & ~pos[:-1]].mean())
    for name in STRATEGY_NAMES:
        st = pairs.group_size_stats(pairs.build_pair_index(t, name))
        s[f"pairs {name}"] = (1.0 - st["frac_fallback"], st["group_size_mean"])
    return s


def _cell(v) -> str:
    if isinstance(v, tuple) and len(v) == 4:
        return " / ".join(f"{100 * x:.1f}" for x in v)
    if isinstance(v, tuple):
        return f"{100 * v[0]:.1f} % / {v[1]:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{100 * v:.1f} %" if v <= 1 and not math.isclose(v, 1.0) else f"{v:.2f}"


def structure_table(real: dict | None, ph: dict, patients: int) -> str:
    head = f"| | CheXpert train | phantom ({patients} patients, seed 0) |\n|---|---|---|\n"
    rows = []
    for k, v in ph.items():
        name = k
        if k.startswith("label "):
            name = f"{k[6:]}: 1 / -1 / 0 / blank (% of images)"
        elif k.startswith("pairs "):
            name = f"pair strategy `{k[6:]}`: images with a partner / mean group size"
        rows.append(f"| {name} | {_cell(real[k]) if real else 'n/a'} | {_cell(v)} |")
    return head + "\n".join(rows)


def chexpert_table(args) -> pd.DataFrame | None:
    """CheXpert's train table through cxrjax's adapter (its first --chexpert_rows rows if set), or None."""
    from cxrjax.data import metadata

    if not CHEXPERT_TRAIN.is_file():
        print(f"(no {CHEXPERT_TRAIN}: nothing to compare with)")
        return None
    path = CHEXPERT_TRAIN
    if args.chexpert_rows:
        path = Path(args.cache).expanduser() / f"chexpert_train_head{args.chexpert_rows}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.read_csv(CHEXPERT_TRAIN, nrows=args.chexpert_rows).to_csv(path, index=False)
    return metadata.load_chexpert_csv(path).table


def run_structure(args) -> None:
    t0 = time.time()
    real = chexpert_table(args)
    real = structure_stats(real) if real is not None else None
    ph = structure_stats(phantom.make_table(args.patients, seed=args.seed))
    print(structure_table(real, ph, args.patients))
    print(f"\n[structure: {time.time() - t0:.0f} s, load average {load_avg()}]")


def _label_shares(v: pd.Series) -> tuple[float, float, float]:
    return float((v == 1).mean()), float((v == -1).mean()), float((v == 0).mean())


def run_calibrate(args) -> None:
    """Tune the course's rates (course.FINDINGS pos / unc / neg, SUPPORT_DEVICES, AP_RATE) so that the
    phantom's image-level label shares and AP share match CheXpert's; prints the constants to paste."""
    import dataclasses

    from cxrjax.data.phantom import course

    real = chexpert_table(args)
    if real is None:
        return
    want = {c: _label_shares(real[c]) for c in list(course.FINDINGS) + ["Support Devices"]}
    want_ap = float(real["view"].isin(["AP", "AP_SUPINE"]).mean())
    for it in range(args.calibrate):
        for cached in (course._course, course.patient_latent, course._thresholds):
            cached.cache_clear()
        t = phantom.make_table(args.patients, seed=args.seed)
        worst = 0.0
        for c, w in want.items():
            spec = course.FINDINGS.get(c, course.SUPPORT_DEVICES)
            got = _label_shares(t[c])
            worst = max(worst, *(abs(g - x) for g, x in zip(got, w)))
            new = dataclasses.replace(
                spec, pos=spec.pos * w[0] / got[0] if got[0] else spec.pos,
                unc=spec.unc * w[1] / got[1] if got[1] and spec.unc else spec.unc,
                neg=min(1.0, spec.neg * w[2] / got[2]) if got[2] else spec.neg)
            if c in course.FINDINGS:
                course.FINDINGS[c] = new
            else:
                course.SUPPORT_DEVICES = new
        got_ap = float(t["view"].isin(["AP", "AP_SUPINE"]).mean())
        print(f"iteration {it}: largest label-share error {100 * worst:.2f} points, AP {100 * got_ap:.1f} % "
              f"(CheXpert {100 * want_ap:.1f} %)", flush=True)
        course.AP_RATE = float(np.clip(course.AP_RATE + (want_ap - got_ap), 0.01, 0.99))
    print("pos, unc, neg of the calibrated course (course.py):")
    for c, spec in list(course.FINDINGS.items()) + [("Support Devices", course.SUPPORT_DEVICES)]:
        print(f"  {c!r}: ({spec.pos:.3f}, {spec.unc:.3f}, {spec.neg:.3f})")
    print(f"  AP_RATE = {course.AP_RATE:.3f}")


# ------------------------------------------------------------------------------------------------
# Rendered data, cached


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(Path(phantom.__file__).parent.glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def rendered(args) -> tuple[pd.DataFrame, np.ndarray]:
    """(table, uint8 images (n, size, size)) of the phantom, rendered once and cached."""
    table = phantom.make_table(args.patients, seed=args.seed, version=args.version)
    key = f"phantom-v{args.version}-{_source_hash()}-p{args.patients}-s{args.size}-seed{args.seed}.npy"
    path = Path(args.cache).expanduser() / key
    if path.is_file():
        images = np.load(path)
        if len(images) == len(table):
            return table, images
    t0, c0 = time.perf_counter(), time.process_time()
    phantom.tune_allocator()
    images = phantom.render_images(table, size=args.size)
    print(f"rendered {len(images)} images at {args.size} px in {time.perf_counter() - t0:.0f} s "
          f"({len(images) / (time.process_time() - c0):.0f} images per CPU-second), load average {load_avg()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, images)
    return table, images


def targets(table: pd.DataFrame, column: str) -> np.ndarray:
    """MedAug's label policy: 1 -> 1, 0 and blank -> 0, uncertain -> NaN (masked)."""
    v = table[column].to_numpy(np.float64)
    return np.where(v == -1, np.nan, np.where(v == 1, 1.0, 0.0))


def patient_sample(patients: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows of round(fraction x patients) patients drawn with `seed`, redrawn until both classes occur."""
    uniq = np.unique(patients)
    k = max(1, int(round(fraction * len(uniq))))
    for attempt in range(100):
        chosen = np.random.default_rng([seed, attempt]).choice(uniq, k, replace=False)
        rows = np.flatnonzero(np.isin(patients, chosen) & ~np.isnan(y))
        if len(np.unique(y[rows])) == 2:
            return rows
    raise ValueError(f"no {fraction:.0%} sample with both classes")


# ------------------------------------------------------------------------------------------------
# Raw-pixel probe


def pixel_features(images: np.ndarray, side: int) -> np.ndarray:
    """Area-resize to side x side and scale to [0, 1] (the linear eval's raw-pixel features)."""
    import cv2

    out = np.stack([cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA) for im in images])
    return out.reshape(len(images), -1).astype(np.float32) / 255.0


def run_probe(args) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    table, images = rendered(args)
    x = pixel_features(images, args.pixels)
    y = targets(table, TASK)
    split = table["split"].to_numpy()
    pid = table["patient_id"].to_numpy()
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "valid", "test"))
    va, te = va[~np.isnan(y[va])], te[~np.isnan(y[te])]
    print(f"raw-pixel probe, {TASK}: {args.patients} patients, {args.size} px -> {args.pixels}x{args.pixels} features; "
          f"test {len(te)} images ({int(y[te].sum())} positive); load average {load_avg()}")
    t0 = time.time()
    for fraction in args.fractions:
        aucs = []
        for seed in range(args.seeds if fraction < 1 else 1):
            rows = tr[patient_sample(pid[tr], y[tr], fraction, seed)]
            scaler = StandardScaler().fit(x[rows])
            best = None
            for c in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
                clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x[rows]), y[rows])
                auc_v = roc_auc_score(y[va], clf.decision_function(scaler.transform(x[va])))
                if best is None or auc_v > best[0]:
                    best = (auc_v, clf)
            aucs.append(roc_auc_score(y[te], best[1].decision_function(scaler.transform(x[te]))))
        print(f"  {fraction:>5.0%} of training patients ({len(rows)} images in the last draw): "
              f"test AUC {np.mean(aucs):.3f} +- {np.std(aucs):.3f} over {len(aucs)} draws")
    print(f"[probe: {time.time() - t0:.0f} s, load average {load_avg()}]")


# ------------------------------------------------------------------------------------------------
# Supervised ResNet


def run_supervised(args) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from sklearn.metrics import roc_auc_score

    from cxrjax.models import resnet

    table, images = rendered(args)
    y_all = np.stack([targets(table, c) for c in CHEXPERT_LABELS], 1).astype(np.float32)
    split = table["split"].to_numpy()
    tr, te = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    model = resnet.ResNet("resnet18", num_classes=len(CHEXPERT_LABELS), in_channels=1, width=args.width,
                          rngs=nnx.Rngs(args.seed))
    steps_per_epoch = len(tr) // args.batch
    sched = optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch)
    optimizer = nnx.Optimizer(model, optax.adamw(sched, weight_decay=1e-4), wrt=nnx.Param)

    def normalise(x):
        return (x.astype(jnp.float32) / 255.0 - 0.5) / 0.25

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(normalise(x)[..., None], train=True)
            mask = ~jnp.isnan(y)
            per = optax.sigmoid_binary_cross_entropy(logits, jnp.where(mask, y, 0.0)) * mask
            return per.sum() / jnp.maximum(mask.sum(), 1)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def predict(model, x):
        return model(normalise(x)[..., None], train=False)

    rng = np.random.default_rng(args.seed)
    pad = args.size // 16
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    print(f"supervised ResNet-18 (width {args.width}), {len(tr)} training images, {args.epochs} epochs of "
          f"{steps_per_epoch} steps (batch {args.batch}); load average {load_avg()}")
    t0, c0 = time.time(), time.process_time()
    for epoch in range(args.epochs):
        order = rng.permutation(tr)[: steps_per_epoch * args.batch].reshape(steps_per_epoch, args.batch)
        losses = []
        for rows in order:
            dy, dx = rng.integers(0, 2 * pad + 1, 2)   # one random shift per batch
            x = padded[rows, dy:dy + args.size, dx:dx + args.size]
            losses.append(train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y_all[rows])))
        print(f"  epoch {epoch + 1}/{args.epochs}: loss {float(np.mean(jax.device_get(losses))):.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    scores = np.concatenate([np.asarray(predict(model, jnp.asarray(images[te[i:i + 256]])))
                             for i in range(0, len(te), 256)])
    print(f"test AUC ({len(te)} images), uncertain excluded, blank = 0:")
    for j, c in enumerate(CHEXPERT_LABELS):
        ok = ~np.isnan(y_all[te, j])
        if len(np.unique(y_all[te, j][ok])) == 2:
            print(f"  {c:28s} {roc_auc_score(y_all[te, j][ok], scores[ok, j]):.3f}  "
                  f"({int(y_all[te, j][ok].sum())} positive)")
    print(f"[supervised: {time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} CPU-s, load average {load_avg()}]")


# ------------------------------------------------------------------------------------------------
# Speed and the demo's size


def run_speed(args) -> None:
    from cxrjax.data.phantom import cli

    for size, n in ((64, 4 * args.speed_images), (256, args.speed_images)):
        wall, cpu = cli.bench(n, size, args.seed)
        print(f"render {n} images at {size} px: {wall:.0f} images/s wall-clock, {cpu:.0f} images per CPU-second "
              f"(one process), load average {load_avg()}")


def run_demo(args) -> None:
    print("| patients | test images | test images positive for effusion | uncertain | test patients |")
    print("|---|---|---|---|---|")
    for n in args.demo_patients:
        t = phantom.make_table(n, seed=args.seed)
        test = t[t["split"] == "test"]
        print(f"| {n} | {len(test)} | {int((test[TASK] == 1).sum())} | {int((test[TASK] == -1).sum())} | "
              f"{test['patient_id'].nunique()} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", action="store_true")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--supervised", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="N rounds of tuning the course's rates to CheXpert's label shares (prints the constants)")
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", default=phantom.VERSION, choices=phantom.RENDER_VERSIONS,
                    help="phantom renderer for --probe / --supervised (the table is the same in every version)")
    ap.add_argument("--size", type=int, default=64, help="rendered image size (px)")
    ap.add_argument("--pixels", type=int, default=32, help="raw-pixel features: side after area resizing")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--seeds", type=int, default=5, help="label draws per fraction (probe)")
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 width (supervised)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--demo_patients", type=int, nargs="+", default=[120, 150, 200, 250, 300, 350, 400, 500])
    ap.add_argument("--speed_images", type=int, default=150, help="images rendered at 256 px (4x as many at 64 px)")
    ap.add_argument("--chexpert_rows", type=int, default=0, help="use only the first N rows of CheXpert's table")
    ap.add_argument("--cache", default=os.environ.get("CXRJAX_CACHE", "~/.cache/cxrjax") + "/phantom-check")
    args = ap.parse_args(argv)
    if not any((args.structure, args.probe, args.supervised, args.speed, args.demo, args.calibrate)):
        ap.error("choose at least one of --structure, --probe, --supervised, --speed, --demo, --calibrate")
    print(f"phantom VERSION {phantom.VERSION} (rendering version {args.version}); {' '.join(sys.argv)}")
    for flag, fn in ((args.calibrate, run_calibrate), (args.structure, run_structure), (args.speed, run_speed), (args.demo, run_demo),
                     (args.probe, run_probe), (args.supervised, run_supervised)):
        if flag:
            fn(args)


if __name__ == "__main__":
    main()
