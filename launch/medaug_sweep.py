r"""The MedAug experiment end to end: pre-train one MoCo run per pair strategy (same data, same budget),
evaluate each (and the ImageNet / random baselines) with the linear-evaluation job, and collect one table
in MedAug's layout: strategy | mean AUC | 95% CI | delta vs baseline (paired bootstrap CI).

    # phantom data, demo size (~10-15 min on 2 busy CPU cores)
    python launch/medaug_sweep.py --source=phantom --patients=500 --out=runs/sweep-phantom
    # the real public data in ../shared/data (COVID-19 collection + NIH subset), ~20-25 min
    python launch/medaug_sweep.py --source=shared --src=../shared/data --out=runs/sweep-shared \
        --tasks="Pleural Effusion,extra_finding=COVID-19" --blank=ignore
    # with ImageNet weights converted once by cxrjax.tools.import_torchvision (never downloaded)
    python launch/medaug_sweep.py ... --imagenet_weights=weights/r18-w64.safetensors --width=64

Every stage is a subprocess running the user-facing command (printed before it runs), so a stage can
be re-run by hand; re-running the sweep resumes: finished pre-trainings are skipped by the trainer,
features come from the evaluation's cache. OUT holds data/ (prepared, unless --data_dir), pretrain/<s>/,
eval/<s>/ and table.{md,csv}.

Strategies (MedAug Table 1): instance discrimination, same study x {same, distinct, all} lateralities,
all studies, distinct studies (`study-any_lat-any`, `study-different_lat-any`). The budget (steps,
image size, encoder width) is the same for every strategy and is written above the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
# MedAug Table 1 rows (the random-crop-scale rows are the `crop` config variant, not a strategy)
STRATEGIES = ("instance", "study-same_lat-same", "study-same_lat-different", "study-same_lat-any",
              "study-any_lat-any", "study-different_lat-any")
LABELS = {"instance": "MoCo v2, instance discrimination", "study-same_lat-same": "same study, same laterality",
          "study-same_lat-different": "same study, distinct lateralities",
          "study-same_lat-any": "same study, all lateralities", "study-any_lat-any": "all studies",
          "study-different_lat-any": "distinct studies", "imagenet": "ImageNet (no MoCo)",
          "random": "random init (no pre-training)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder of the sweep")
    p.add_argument("--source", default="phantom", help="cxrjax.prepare --source (phantom, shared, chexpert, ...)")
    p.add_argument("--src", default="", help="cxrjax.prepare --src (the raw dataset folder)")
    p.add_argument("--data_dir", default="", help="an already prepared data folder (skips preparation)")
    p.add_argument("--patients", type=int, default=500, help="phantom: number of synthetic patients")
    p.add_argument("--prepare_size", type=int, default=64, help="prepared image size (px)")
    p.add_argument("--size", type=int, default=56, help="training / eval image size (px)")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width (64 = torchvision)")
    p.add_argument("--steps", type=int, default=120, help="pre-training steps per strategy (batch 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="pre-training Adam learning rate")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated pair strategies")
    p.add_argument("--imagenet_weights", default="", help="ImageNet baseline weights (tools.import_torchvision)")
    p.add_argument("--tasks", default="Pleural Effusion", help="comma-separated linear-eval tasks")
    p.add_argument("--blank", default="zeros", choices=("zeros", "ignore"), help="blank-label policy")
    p.add_argument("--fractions", default="0.01,0.1,1.0", help="label fractions")
    p.add_argument("--seeds", default="0,1,2", help="label-sample seeds of the probe")
    p.add_argument("--seed", type=int, default=0, help="pre-training seed (and the random baseline's init)")
    p.add_argument("--baseline", default="", help="row the deltas refer to (default: imagenet if present, else random)")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    return p.parse_args(argv)


def run(cmd: list[str], dry_run: bool, log: Path | None = None) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if dry_run:
        return
    t0 = time.time()
    with open(log, "w") if log else open("/dev/null", "w") as f:
        r = subprocess.run(["nice", "-n", "10", *cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"medaug_sweep: stage failed ({r.returncode}) after {time.time() - t0:.0f}s; log {log}\n{tail}")
    print(f"  done in {time.time() - t0:.0f}s (log {log})", flush=True)


def prepare(args, out: Path) -> Path:
    if args.data_dir:
        return Path(args.data_dir).resolve()
    data = out / "data"
    cmd = [sys.executable, "-m", "cxrjax.prepare", f"--source={args.source}", f"--out={data}",
           f"--size={args.prepare_size}"]
    cmd += [f"--patients={args.patients}"] if args.source == "phantom" else [f"--src={args.src}"]
    if not (data / "manifest.json").is_file():
        run(cmd, args.dry_run, out / "prepare.log")
    return data


def pretrain(args, strategy: str, data: Path, out: Path) -> Path:
    workdir = out / "pretrain" / strategy
    config = ("configs/moco_instance.py:demo" if strategy == "instance"
              else f"configs/moco_medaug.py:{strategy},demo")
    cmd = [sys.executable, "-m", "cxrjax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.data.dir={data}", f"--config.total_steps={args.steps}", f"--config.checkpoint_every={args.steps}",
           f"--config.augment.size={args.size}", f"--config.model.width={args.width}", f"--config.optim.lr={args.lr}",
           f"--config.seed={args.seed}", "--config.log_every=20"]
    if args.imagenet_weights:  # MedAug initialises MoCo from ImageNet
        cmd += ["--config.model.init=imagenet", f"--config.model.weights={args.imagenet_weights}"]
    run(cmd, args.dry_run, out / f"pretrain-{strategy}.log")
    return workdir


def evaluate(args, name: str, data: Path, out: Path, *init) -> Path:
    workdir = out / "eval" / name
    if (workdir / "results.csv").is_file() and not args.dry_run:
        print(f"  {workdir}/results.csv exists; skipped", flush=True)
        return workdir
    tasks = ",".join(f"'{t}'" for t in args.tasks.split(","))
    cmd = [sys.executable, "-m", "cxrjax.linear_eval", "--config=configs/linear_eval.py:demo", f"--workdir={workdir}",
           f"--config.data.dir={data}", f"--config.augment.size={args.size}", f"--config.model.width={args.width}",
           f"--config.tasks=({tasks},)", f"--config.blank={args.blank}", f"--config.fractions=({args.fractions},)",
           f"--config.seeds=({args.seeds},)", f"--config.name={name}", "--config.bootstrap.samples=1000", *init]
    run(cmd, args.dry_run, out / f"eval-{name}.log")
    return workdir


def collect(args, rows: list[str], out: Path, data: Path, baseline: str) -> tuple[pd.DataFrame, str]:
    """One table: per task and label fraction, each model's AUC and its paired delta vs the baseline."""
    from cxrjax.eval import linear

    table = pd.read_parquet(data / "table.parquet", columns=["patient_id"])
    patients = table["patient_id"].to_numpy()
    summaries = {r: pd.read_csv(out / "eval" / r / "results.csv") for r in rows}
    preds = {r: pd.read_parquet(out / "eval" / r / "predictions.parquet") for r in rows}
    recs = []
    for (task, fraction), _ in summaries[rows[0]].groupby(["task", "fraction"], sort=False):
        def scores(r):
            p = preds[r][(preds[r].task == task) & (preds[r].fraction == fraction)]
            wide = p.pivot(index="row", columns="seed", values="score")
            labels = p.groupby("row")["label"].first().loc[wide.index].to_numpy()
            return wide.index.to_numpy(), labels, wide.to_numpy().T

        base_rows, y, base_scores = scores(baseline)
        for r in rows:
            s = summaries[r][(summaries[r].task == task) & (summaries[r].fraction == fraction)].iloc[0]
            rr, yr, sc = scores(r)
            if not np.array_equal(rr, base_rows):
                raise ValueError(f"{r} and {baseline} were evaluated on different test images")
            d, lo, hi = linear.bootstrap_auc_delta(y, sc, base_scores, patients[rr], samples=1000, seed=0)
            recs.append(dict(task=task, fraction=fraction, strategy=r, label=LABELS.get(r, r), auc_mean=s.auc_mean,
                             auc_sd=s.auc_sd, ci_lo=s.ci_lo, ci_hi=s.ci_hi, delta=d, delta_lo=lo, delta_hi=hi,
                             rel_delta=d / _mean_auc(y, base_scores),
                             test_images=s.test_images, test_positives=s.test_positives,
                             test_patients=s.test_patients, train_images=s.train_images_mean))
    df = pd.DataFrame(recs)
    lines = []
    for (task, fraction), g in df.groupby(["task", "fraction"], sort=False):
        g0 = g.iloc[0]
        lines += ["", f"**{task}, {linear.format_fraction(fraction)} of the training labels** "
                      f"(test: {g0.test_images} images, {g0.test_positives} positive, {g0.test_patients} patients; "
                      f"train sample: {g0.train_images:.0f} images on average)", "",
                  f"| pre-training | mean AUC ± SD (seeds) | 95% CI | Δ vs {LABELS.get(baseline, baseline)} [95% CI] |",
                  "|---|---|---|---|"]
        for x in g.itertuples(index=False):
            delta = "—" if x.strategy == baseline else (f"{x.delta:+.3f} ({x.rel_delta:+.1%}) "
                                                         f"[{x.delta_lo:+.3f}, {x.delta_hi:+.3f}]")
            lines.append(f"| {x.label} | {x.auc_mean:.3f} ± {x.auc_sd:.3f} | [{x.ci_lo:.3f}, {x.ci_hi:.3f}] | {delta} |")
    return df, "\n".join(lines) + "\n"


def _mean_auc(y, scores) -> float:
    from cxrjax.eval import linear

    return float(np.mean([linear.task_auc(y, s) for s in scores]))


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in STRATEGIES and not s.startswith("study-")]
    if unknown:
        raise SystemExit(f"medaug_sweep: unknown strategies {unknown}; MedAug's are {', '.join(STRATEGIES)}")
    if args.imagenet_weights and not Path(args.imagenet_weights).is_file():
        raise SystemExit(f"medaug_sweep: --imagenet_weights={args.imagenet_weights} does not exist")

    data = prepare(args, out)
    rows = []
    for s in strategies:
        workdir = pretrain(args, s, data, out)
        evaluate(args, s, data, out, f"--config.checkpoint={workdir}")
        rows.append(s)
    if args.imagenet_weights:
        evaluate(args, "imagenet", data, out, "--config.init=imagenet", f"--config.weights={args.imagenet_weights}")
        rows.append("imagenet")
    evaluate(args, "random", data, out, "--config.init=random", f"--config.seed={args.seed}")
    rows.append("random")
    if args.dry_run:
        return
    baseline = args.baseline or ("imagenet" if args.imagenet_weights else "random")
    df, md = collect(args, rows, out, data, baseline)
    header = (f"MedAug sweep on `{data}` ({args.source}); pre-training: ResNet-18 width {args.width}, "
              f"{args.size} px, batch 16, {args.steps} steps, Adam lr {args.lr}, seed {args.seed}"
              f"{', ImageNet init' if args.imagenet_weights else ', random init'}; linear eval: seeds {args.seeds}, "
              f"fractions {args.fractions}, blank={args.blank}; CI = 95% bootstrap over test patients (1000 resamples). "
              + ("" if args.imagenet_weights else "ImageNet baseline: not available (no local weights). ")
              + f"Wall time {(time.time() - t0) / 60:.1f} min.\n\n    python launch/medaug_sweep.py "
              + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])) + "\n")
    df.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(header + md)
    (out / "sweep.json").write_text(json.dumps(vars(args), indent=1))
    print(header + md, flush=True)


if __name__ == "__main__":
    main()
