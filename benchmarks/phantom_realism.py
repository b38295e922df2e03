r"""Does the phantom stand where real films stand? Raw pixels against a random-init ResNet, same protocol.

    python benchmarks/phantom_realism.py --out=runs/realism                       # phantom v2, v3 and NIH (~10 min)
    python benchmarks/phantom_realism.py --out=runs/realism --sets v3 --patients=600

Issue 29's calibration check (docs/phantom.md prints its table). For each data set -- the phantom rendered by
version 2 and by version 3 (`--patients` patients, seed 0) and `../shared/data` (NIH's real 64 px films, the
rows that carry an effusion label) -- prepared at 64 px, the linear-evaluation job of the MedAug sweep
(`configs/linear_eval.py:demo`: frozen backbone, logistic probe with L2 chosen on valid, Pleural Effusion,
1 % of the training patients in five label draws, 10 % and 100 %) is run on

- a randomly initialised ResNet-18 (width 16, the demo's encoder) for each of `--seeds` initialisations, and
- the raw pixels (the normalised image at 32 x 32),

on the same label draws and test images, with the same statistics as the sweep (`cxrjax/eval/compare.py`:
95 % CI over seeds and test patients; the pixels - random delta paired by test patients). What a realistic
phantom must show (issue 29): on the real films the pixel probe is at or below the random ResNet at 100 %
of the labels; the phantom should stand in the same place. The supervised ceiling on v3 comes from
`python benchmarks/phantom_check.py --supervised --version 3`.

Every stage is a command printed before it runs (logs in OUT/logs); a re-run skips finished stages.
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
sys.path.insert(0, str(REPO / "launch"))

import medaug_sweep  # noqa: E402  (its stages and statistics: one protocol for both)

SETS = {"v2": dict(source="phantom", version="2", blank="zeros"), "v3": dict(source="phantom", version="3", blank="zeros"),
        "nih": dict(source="shared", version=None, blank="ignore")}
NAMES = {"v2": "phantom v2", "v3": "phantom v3", "nih": "NIH films (../shared/data)"}
TASK = "Pleural Effusion"
SMOKE_ARGS = ["--out={tmp}/realism", "--sets", "v3", "--patients=40", "--seeds=0", "--fractions=0.5,1.0",
              "--label_seeds=0", "--bootstrap=20"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--patients", type=int, default=600, help="phantom patients (the MedAug sweep's size)")
    p.add_argument("--src", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--seeds", default="0,1,2", help="random initialisations")
    p.add_argument("--label_seeds", default="0,1,2,3,4")
    p.add_argument("--fractions", default="0.01,0.1,1.0")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--dry_run", action="store_true")
    return p.parse_args(argv)


def stage_args(args, name: str) -> argparse.Namespace:
    """The sweep's own argument namespace for one data set: its stages take it."""
    s = SETS[name]
    return argparse.Namespace(out=str(Path(args.out).resolve() / name), dry_run=args.dry_run, tasks=TASK, blank=s["blank"],
                              fractions=args.fractions, label_seeds=args.label_seeds, bootstrap=args.bootstrap,
                              source=s["source"], src=args.src, patients=args.patients, data_dir="")


def prepare(sa, version: str | None) -> Path:
    out = Path(sa.out)
    data = out / "data"
    cmd = [sys.executable, "-m", "cxrjax.prepare", f"--source={sa.source}", f"--out={data}", "--size=64"]
    cmd += [f"--patients={sa.patients}", f"--phantom_version={version}"] if sa.source == "phantom" else [f"--src={sa.src}"]
    if not (data / "manifest.json").is_file():
        medaug_sweep.run(cmd, sa, out / "logs" / "prepare.log")
    return data


def measure(args, name: str) -> pd.DataFrame:
    sa = stage_args(args, name)
    out = Path(sa.out)
    t0 = time.time()
    data = prepare(sa, SETS[name]["version"])
    seeds = [int(s) for s in args.seeds.split(",")]
    evals = []
    for i, seed in enumerate(seeds):
        e, _ = medaug_sweep.evaluate(sa, f"random-seed{seed}", data, out, "--config.init=random", f"--config.seed={seed}",
                                     f"--config.name=random-seed{seed}",
                                     "--config.baselines=('pixels',)" if i == 0 else "--config.baselines=()")
        evals.append(e)
    if args.dry_run:
        return pd.DataFrame(), pd.DataFrame()
    methods = {"random": [f"random-seed{s}" for s in seeds], "pixels": ["pixels"]}
    df = medaug_sweep.analyse(sa, out, data, methods, evals, reference="random")
    by_view = views(evals, data, methods).assign(set=name)
    return df.assign(set=name, minutes=(time.time() - t0) / 60), by_view


def views(evals: list[Path], data: Path, methods: dict[str, list[str]]) -> pd.DataFrame:
    """AUC within each view (all / frontal / AP / PA), mean over initialisations and label draws: does the
    pixels' standing come from telling views apart (effusion is commoner on AP films, laterals differ)?"""
    from sklearn.metrics import roc_auc_score

    t = pd.read_parquet(data / "table.parquet", columns=["view", "laterality"])
    preds = pd.concat([pd.read_parquet(e / "predictions.parquet") for e in evals], ignore_index=True)
    preds = preds[(preds.task == TASK) & np.isfinite(preds.label)].drop_duplicates(["model", "fraction", "seed", "row"])
    subsets = {"all": np.ones(len(t), bool), "frontal": (t.laterality == "frontal").to_numpy(),
               "AP": (t.view == "AP").to_numpy(), "PA": (t.view == "PA").to_numpy()}
    recs = []
    for fraction, p in preds.groupby("fraction"):
        for view, mask in subsets.items():
            q = p[mask[p.row.to_numpy()]]
            y = q.groupby("row").label.first()
            if y.nunique() < 2:
                continue
            rec = dict(fraction=fraction, view=view, images=len(y), positives=int(y.sum()))
            for method, models in methods.items():
                r = q[q.model.isin(models)]
                rec[method] = float(np.mean([roc_auc_score(g.label, g.score) for _, g in r.groupby(["model", "seed"])]))
            recs.append(rec)
    return pd.DataFrame(recs)


def table(df: pd.DataFrame) -> str:
    lines = ["| data set | labels | test images (positive) | random-init ResNet-18 (w16) [95% CI] | raw pixels 32x32 [95% CI] "
             "| pixels - random [95% CI] |", "|---|---|---|---|---|---|"]
    for (name, fraction), g in df.groupby(["set", "fraction"], sort=False):
        r, p = g[g.method == "random"].iloc[0], g[g.method == "pixels"].iloc[0]
        lines.append(f"| {NAMES[name]} | {fraction:.0%} | {r.test_images} ({r.test_positives}) | {r.auc:.3f} "
                     f"[{r.ci_lo:.3f}, {r.ci_hi:.3f}] | {p.auc:.3f} [{p.ci_lo:.3f}, {p.ci_hi:.3f}] | "
                     f"{p.delta:+.3f} [{p.delta_lo:+.3f}, {p.delta_hi:+.3f}] |")
    return "\n".join(lines) + "\n"


def view_table(v: pd.DataFrame) -> str:
    lines = ["| data set | labels | view | test images (positive) | random init | raw pixels |", "|---|---|---|---|---|---|"]
    for r in v.itertuples(index=False):
        lines.append(f"| {NAMES[r.set]} | {r.fraction:.0%} | {r.view} | {r.images} ({r.positives}) | {r.random:.3f} | {r.pixels:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    frames, by_view = [], []
    for name in args.sets:
        if SETS[name]["source"] == "shared" and not Path(args.src).is_dir():
            print(f"{args.src} is absent: the NIH row is left out")
            continue
        df, v = measure(args, name)
        frames.append(df)
        by_view.append(v)
    if args.dry_run or not frames:
        return
    df = pd.concat(frames, ignore_index=True)
    v = pd.concat(by_view, ignore_index=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(args.out) / "realism.csv", index=False)
    md = (f"Pleural Effusion, linear probe (configs/linear_eval.py:demo), 64 px; random init: seeds {args.seeds}; label "
          f"draws {args.label_seeds}; phantom {args.patients} patients, seed 0. {(time.time() - t0) / 60:.1f} min, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}.\n\n    python benchmarks/phantom_realism.py "
          + " ".join(argv if argv is not None else sys.argv[1:]) + "\n\n" + table(df)
          + "\nWithin each view (mean AUC over initialisations and label draws):\n\n" + view_table(v))
    (Path(args.out) / "realism.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
