r"""MedAug's experiment end to end, with several pre-training seeds: pre-train every pair strategy
`--seeds` times, evaluate all checkpoints with the linear-evaluation job on the same label draws and test
images beside random-init and raw-pixel baselines, and report AUC with 95% CIs that resample pre-training
seeds and test patients, paired deltas against instance discrimination, and a figure.

    python launch/medaug_sweep.py --preset=mini --out=runs/sweep-mini                     # phantom, ~60 min, 2 CPU cores
    python launch/medaug_sweep.py --preset=mini --source=shared --out=runs/sweep-shared    # ../shared/data, real images
    python launch/medaug_sweep.py --preset=mini --out=runs/x --dry_run                     # print the commands
    python launch/medaug_sweep.py --preset=power --out=runs/sweep-power                    # powered: ~53 min, 2 cores
    python launch/medaug_sweep.py --preset=power --power_from=runs/pilot --out=runs/x      # power from a finished sweep

Every stage is a subprocess running a user-facing command (printed before it runs; `OUT/logs/`), so a
stage can be re-run by hand, and re-running the sweep resumes: finished pre-trainings are skipped by the
trainer, evaluations by their results file. The compiled train step is shared through JAX's persistent
compilation cache (OUT/jax-cache): every strategy and seed runs the same program.

Pre-training: configs/moco_medaug.py:<strategy>,demo (configs/moco_instance.py:demo) -- MedAug's run at demo
size: ResNet-18 width 16 from random init, 56 px views from 64 px records, queue 64, momentum 0.99, Adam
1e-3, batch 16, whole-batch BN, the query in its own candidate set (eq. 2) -- for `--steps` steps, seed s
(the init, data order and augmentations; strategy s and instance s start from the same weights).
Evaluation: configs/linear_eval.py (MedAug's protocol: frozen backbone, logistic layer, uncertain labels
left out, blank = 0) on 1 % (five label draws, as MedAug's five 1 % splits), 10 % and 100 % of the
training patients; random init (the 3 seeds' initial weights) and raw pixels (32 x 32) alongside.
Statistics: cxrjax/eval/compare.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("instance", "study-same_lat-same", "study-same_lat-different", "study-same_lat-any",
              "study-any_lat-any", "study-different_lat-any")
# a §4.3 negative variant on top of a strategy is named strategy+variant (configs/moco_medaug.py's NEGATIVES)
HARD_NEGATIVE_VARIANTS = ("lat-only", "reweight", "append", "synthetic")
LABELS = {"instance": "MoCo v2, instance discrimination", "study-same_lat-same": "same study, same laterality",
          "study-same_lat-different": "same study, distinct lateralities",
          "study-same_lat-any": "same study, all lateralities", "study-any_lat-any": "all studies",
          "study-different_lat-any": "distinct studies", "random": "random init (no pre-training)",
          "pixels": "raw pixels (32 x 32)", "imagenet": "ImageNet",
          "study-same_lat-any+append": "same study, all lateralities + appended hard negatives (§4.3)",
          "supervised": "supervised ceiling: random init fine-tuned end to end on the same labels"}
POWER_SEEDS, POWER_STEPS, POWER_PATIENTS = "0,1,2,3,4", 400, 5000   # from the v3 pilot: docs/medaug_results.md
CEILING_EPOCHS = 12   # the supervised ceiling's fine-tuning epochs (benchmarks/phantom_check.py --supervised: 12)
PRESETS = {
    # issue 14's "MedAug in miniature": the strategies MedAug's Table 1 compares, 3 seeds each
    "mini": dict(strategies="instance,study-same_lat-any,study-same_lat-same,study-any_lat-any,study-different_lat-any",
                 seeds="0,1,2", steps=400, patients=600, label_seeds="0,1,2,3,4", fractions="0.01,0.1,1.0",
                 ceiling=False),
    # issue 29's powered sweep: every Table 1 strategy, MedAug's best §4.3 variant (append, 0.875) and a
    # supervised ceiling; seeds and patients from the power calculation on the v3 pilot (docs/medaug_results.md,
    # `--power_from`: 1 % labels, MDE <= 0.03 at 80 % power); steps the pilot's, where its variances were measured
    "power": dict(strategies="instance,study-same_lat-same,study-same_lat-different,study-same_lat-any,"
                             "study-any_lat-any,study-different_lat-any,study-same_lat-any+append",
                  seeds=POWER_SEEDS, steps=POWER_STEPS, patients=POWER_PATIENTS, label_seeds="0,1,2,3,4",
                  fractions="0.01,0.1,1.0", ceiling=True),
}
SOURCES = {"phantom": dict(tasks="Pleural Effusion", blank="zeros"),
           "shared": dict(tasks="Pleural Effusion,extra_finding=COVID-19", blank="ignore")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder of the sweep")
    p.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    p.add_argument("--source", default="phantom", choices=sorted(SOURCES), help="phantom or ../shared/data")
    p.add_argument("--src", default=str(REPO.parent / "shared" / "data"), help="--source=shared: the data folder")
    p.add_argument("--data_dir", default="", help="an already prepared data folder (skips preparation)")
    p.add_argument("--patients", type=int, default=None, help="phantom patients (preset default)")
    p.add_argument("--steps", type=int, default=None, help="pre-training steps (preset default)")
    p.add_argument("--strategies", default=None, help="comma-separated pair strategies (preset default)")
    p.add_argument("--seeds", default=None, help="pre-training seeds (preset default)")
    p.add_argument("--label_seeds", default=None, help="label-draw seeds of the probe (preset default)")
    p.add_argument("--fractions", default=None, help="label fractions (preset default)")
    p.add_argument("--tasks", default=None, help="linear-eval tasks (default per source)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    p.add_argument("--ceiling", type=int, default=None, help="1: add the supervised ceiling row (preset default)")
    p.add_argument("--phantom_version", default=None, help="phantom renderer (default: the current one)")
    p.add_argument("--power_from", default="", metavar="PILOT_OUT",
                   help="print the power calculation from a finished sweep folder (a pilot) and exit")
    p.add_argument("--power_target", type=float, default=0.03, help="--power_from: the delta to detect (AUC)")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k, v in SOURCES[args.source].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.blank = SOURCES[args.source]["blank"]
    return args


def run(cmd: list[str], args, log: Path) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if args.dry_run:
        return 0.0
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(Path(args.out).resolve() / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise SystemExit(f"medaug_sweep: stage failed ({r.returncode}) after {time.time() - t0:.0f}s; log {log}\n"
                         f"{log.read_text()[-3000:]}")
    print(f"  done in {time.time() - t0:.0f}s (log {log})", flush=True)
    return time.time() - t0


def prepare(args, out: Path) -> tuple[Path, float]:
    if args.data_dir:
        return Path(args.data_dir).resolve(), 0.0
    data = out / "data"
    cmd = [sys.executable, "-m", "cxrjax.prepare", f"--source={args.source}", f"--out={data}", "--size=64"]
    cmd += [f"--patients={args.patients}"] if args.source == "phantom" else [f"--src={args.src}"]
    if args.source == "phantom" and args.phantom_version:
        cmd += [f"--phantom_version={args.phantom_version}"]
    if (data / "manifest.json").is_file():
        return data, 0.0
    return data, run(cmd, args, out / "logs" / "prepare.log")


def pretrain(args, strategy: str, seed: int, data: Path, out: Path) -> tuple[Path, float]:
    workdir = out / "pretrain" / f"{strategy}-seed{seed}"
    if (workdir / "checkpoints" / str(args.steps)).is_dir() and not args.dry_run:
        print(f"  {workdir} holds step {args.steps}; skipped", flush=True)
        return workdir, 0.0
    config = ("configs/moco_instance.py:demo" if strategy == "instance"   # strategy+variant -> its config variants
              else f"configs/moco_medaug.py:{strategy.replace('+', ',')},demo")
    cmd = [sys.executable, "-m", "cxrjax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.data.dir={data}", f"--config.total_steps={args.steps}", f"--config.checkpoint_every={args.steps}",
           f"--config.seed={seed}", "--config.probe.every=0"]
    return workdir, run(cmd, args, out / "logs" / f"pretrain-{strategy}-seed{seed}.log")


def evaluate(args, name: str, data: Path, out: Path, *init: str) -> tuple[Path, float]:
    workdir = out / "eval" / name
    if (workdir / "results.csv").is_file() and not args.dry_run:
        print(f"  {workdir}/results.csv exists; skipped", flush=True)
        return workdir, 0.0
    tasks = ",".join(f"'{t}'" for t in args.tasks.split(","))
    cmd = [sys.executable, "-m", "cxrjax.linear_eval", "--config=configs/linear_eval.py:demo", f"--workdir={workdir}",
           f"--config.data.dir={data}", f"--config.tasks=({tasks},)", f"--config.blank={args.blank}",
           f"--config.fractions=({args.fractions},)", f"--config.seeds=({args.label_seeds},)",
           f"--config.feature_cache={out / 'features'}", "--config.bootstrap.samples=200", *init]
    return workdir, run(cmd, args, out / "logs" / f"eval-{name}.log")


def scores_by_method(preds: pd.DataFrame, methods: dict[str, list[str]], task: str, fraction: float):
    """{method: (n_pre, n_label, n_test)} probe scores, the test rows and their labels."""
    p = preds[(preds.task == task) & (np.isclose(preds.fraction, fraction))]
    p = p[np.isfinite(p.label)]
    rows = np.sort(p.row.unique())
    labels = p.groupby("row")["label"].first().reindex(rows).to_numpy()
    out = {}
    for method, models in methods.items():
        per_model = []
        for m in models:
            wide = p[p.model == m].pivot(index="row", columns="seed", values="score").reindex(rows)
            if wide.isna().any().any():
                raise ValueError(f"{m}: no score for some test rows of {task} at {fraction}")
            per_model.append(wide.to_numpy().T)  # (n_label, n_test)
        out[method] = np.stack(per_model)
    return out, rows, labels


def analyse(args, out: Path, data: Path, methods: dict[str, list[str]], evals: list[Path], reference: str):
    from cxrjax.eval import compare

    preds = pd.concat([pd.read_parquet(e / "predictions.parquet") for e in evals], ignore_index=True)
    preds = preds.drop_duplicates(["model", "task", "fraction", "seed", "row"])
    table = pd.read_parquet(data / "table.parquet", columns=["patient_id"])
    recs = []
    for task in args.tasks.split(","):
        for fraction in [float(f) for f in args.fractions.split(",")]:
            scores, rows, labels = scores_by_method(preds, methods, task, fraction)
            res, delta = compare.compare(scores, labels, table["patient_id"].to_numpy()[rows], reference=reference,
                                         samples=args.bootstrap, seed=0)
            for m, r in res.items():
                d = delta.get(m, (np.nan,) * 3)
                recs.append(dict(task=task, fraction=fraction, method=m, label=LABELS.get(m, m), auc=r.mean,
                                 sd_seeds=r.sd_seeds, sd_labels=r.sd_labels, ci_lo=r.ci[0], ci_hi=r.ci[1],
                                 delta=d[0], delta_lo=d[1], delta_hi=d[2], seeds=len(r.per_seed),
                                 per_seed=" ".join(f"{x:.3f}" for x in r.per_seed), test_images=len(rows),
                                 test_positives=int(labels.sum()),
                                 test_patients=int(pd.Series(table["patient_id"].to_numpy()[rows]).nunique())))
    return pd.DataFrame(recs)


def markdown(df: pd.DataFrame, reference: str) -> str:
    lines = []
    for (task, fraction), g in df.groupby(["task", "fraction"], sort=False):
        g0 = g.iloc[0]
        if g0.test_positives in (0, g0.test_images):  # one class: AUC is undefined, not a number to print
            lines += ["", f"**{task}, {fraction:.0%}**: left out -- the test split holds {g0.test_images} images, "
                          f"{g0.test_positives} positive (one class: AUC undefined)."]
            continue
        lines += ["", f"**{task}, {fraction:.0%} of the training patients' labels** (test: {g0.test_images} images, "
                      f"{g0.test_positives} positive, {g0.test_patients} patients)", "",
                  f"| pre-training | AUC | SD seeds | SD label draws | 95% CI (seeds x patients) | Δ vs "
                  f"{LABELS[reference]} [95% CI] | per seed |", "|---|---|---|---|---|---|---|"]
        for x in g.itertuples(index=False):
            delta = "—" if x.method == reference else f"{x.delta:+.3f} [{x.delta_lo:+.3f}, {x.delta_hi:+.3f}]"
            sd = "—" if not np.isfinite(x.sd_seeds) else f"{x.sd_seeds:.3f}"
            lines.append(f"| {x.label} | {x.auc:.3f} | {sd} | {x.sd_labels:.3f} | [{x.ci_lo:.3f}, {x.ci_hi:.3f}] "
                         f"| {delta} | {x.per_seed} |")
    return "\n".join(lines) + "\n"


def figure(df: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df[(df.test_positives > 0) & (df.test_positives < df.test_images)]  # AUC defined (see markdown)
    tasks = list(dict.fromkeys(df.task))
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (m, g) in enumerate(df[df.task == task].groupby("method", sort=False)):
            g = g.sort_values("fraction")
            style = dict(ls="--") if m in ("random", "pixels") else {}
            ax.plot(g.fraction, g.auc, marker="o", label=LABELS.get(m, m), color=f"C{i}", **style)
            ax.fill_between(g.fraction, g.ci_lo, g.ci_hi, alpha=0.12, color=f"C{i}")
        ax.set_xscale("log"), ax.set_xlabel("fraction of training patients labelled"), ax.set_ylabel("test AUC")
        ax.set_title(task, fontsize=10), ax.axhline(0.5, color="grey", lw=0.6)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(textwrap.fill(title, 90), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    strategies = [s for s in args.strategies.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    unknown = [s for s in strategies if s.split("+")[0] not in STRATEGIES and not s.startswith("study-")
               or any(v not in HARD_NEGATIVE_VARIANTS for v in s.split("+")[1:])]
    if unknown:
        raise SystemExit(f"medaug_sweep: unknown strategies {unknown}; MedAug's are {', '.join(STRATEGIES)}, "
                         f"each optionally +{'/+'.join(HARD_NEGATIVE_VARIANTS)}")
    if args.power_from:
        print(power_report(args, Path(args.power_from)))
        return

    data, prepare_s = prepare(args, out)
    # a re-run (e.g. to redraw the figure) skips finished stages: their times come from the first run
    previous = json.loads((out / "sweep.json").read_text()).get("wall_s", {}) if (out / "sweep.json").is_file() else {}
    walls: dict[str, float] = {"prepare": prepare_s}
    checkpoints: dict[str, list[str]] = {}
    for s in strategies:
        for seed in seeds:
            workdir, walls[f"pretrain {s} seed {seed}"] = pretrain(args, s, seed, data, out)
            checkpoints.setdefault(s, []).append(str(workdir))
    # one evaluation of every checkpoint: the same label draws, test images and raw-pixel row for all
    all_ckpts = [c for s in strategies for c in checkpoints[s]]
    ev_main, walls["evaluate checkpoints + pixels"] = evaluate(
        args, "checkpoints", data, out, f"--config.checkpoint={','.join(all_ckpts)}", "--config.baselines=('pixels',)")
    evals = [ev_main]
    for seed in seeds:  # random init of each pre-training seed: the weights every strategy started from
        e, walls[f"evaluate random seed {seed}"] = evaluate(args, f"random-seed{seed}", data, out,
                                                            "--config.init=random", f"--config.seed={seed}",
                                                            f"--config.name=random-seed{seed}", "--config.baselines=()")
        evals.append(e)
    if args.ceiling:   # supervised from scratch on each label draw: what the labels alone can reach
        e, walls["evaluate supervised ceiling"] = evaluate(
            args, "supervised", data, out, "--config.init=random", "--config.seed=0", "--config.name=ceiling",
            "--config.baselines=()", "--config.finetune.enabled=True", f"--config.finetune.epochs={CEILING_EPOCHS}",
            "--config.finetune.lr=1e-3")
        evals.append(e)
    if args.dry_run:
        return
    names = pd.read_parquet(ev_main / "predictions.parquet").model.unique().tolist()
    methods = match_models(names, strategies, seeds, checkpoints)
    methods["random"] = [f"random-seed{s}" for s in seeds]
    methods["pixels"] = ["pixels"]
    if args.ceiling:
        methods["supervised"] = ["ceiling (fine-tuned)"]
    reference = "instance" if "instance" in methods else strategies[0]
    t_analysis = time.time()
    df = analyse(args, out, data, methods, evals, reference)
    walls = {k: (v if v > 0 else previous.get(k, 0.0)) for k, v in walls.items()}
    minutes = sum(walls.values()) / 60 + (time.time() - t_analysis) / 60
    load = os.getloadavg()
    title = (f"MedAug in miniature on {args.source} ({data.name}): {len(strategies)} strategies x {len(seeds)} "
             f"pre-training seeds, {args.steps} steps each; label draws {args.label_seeds}")
    header = (f"{title}. 95% CI: {args.bootstrap} hierarchical bootstrap replicates over pre-training seeds and "
              f"test patients (cxrjax/eval/compare.py); deltas paired by seed and test patients. Wall time "
              f"{minutes:.1f} min (the stages' times summed, kept across re-runs in sweep.json; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}).\n\n"
              f"    python launch/medaug_sweep.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])) + "\n")
    df.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(header + markdown(df, reference))
    (out / "sweep.json").write_text(json.dumps({"args": vars(args), "methods": methods, "wall_s": walls,
                                                "minutes": minutes, "load": load}, indent=1))
    figure(df, out / "auc_vs_labels.png", title)
    print(header + markdown(df, reference), flush=True)


def power_report(args, pilot: Path) -> str:
    """The power calculation (cxrjax/eval/power.py) from a finished sweep: per label fraction and strategy, the
    variance components of its delta vs instance discrimination, the minimum detectable difference (80 % power,
    two-sided 5 %) at the pilot's size and at this preset's, and the cheapest (seeds, patients) reaching
    --power_target for every strategy at that fraction."""
    from cxrjax.eval import power

    meta = json.loads((pilot / "sweep.json").read_text())
    pa = argparse.Namespace(**meta["args"])
    methods = {m: v for m, v in meta["methods"].items() if m in STRATEGIES or "+" in m}
    evals = sorted(p for p in (pilot / "eval").iterdir() if (p / "predictions.parquet").is_file())
    preds = pd.concat([pd.read_parquet(e / "predictions.parquet") for e in evals], ignore_index=True)
    preds = preds.drop_duplicates(["model", "task", "fraction", "seed", "row"])
    table = pd.read_parquet(Path(pa.data_dir or pilot / "data") / "table.parquet", columns=["patient_id", "split"])
    test_share = table.loc[table.split == "test", "patient_id"].nunique() / table["patient_id"].nunique()
    seeds_now, patients_now = len(args.seeds.split(",")), args.patients
    planned = max(1, round(patients_now * test_share))   # this preset's test patients
    lines = [f"Power from the pilot {pilot} ({pa.strategies}; seeds {pa.seeds}; {pa.steps} steps; {pa.patients} "
             f"patients, {test_share:.1%} of them in test): 80 % power, two-sided 5 %; MDE = minimum detectable "
             f"difference of the paired delta vs instance discrimination (AUC).", "",
             f"| task | labels | strategy | pilot delta | SD seeds (per-seed delta) | SD per test patient | MDE at the "
             f"pilot's size | MDE at {seeds_now} seeds x {patients_now} patients |", "|---|---|---|---|---|---|---|---|"]
    plans = []
    for task in pa.tasks.split(","):
        for fraction in [float(f) for f in pa.fractions.split(",")]:
            scores, rows, labels = scores_by_method(preds, methods, task, fraction)
            if labels.sum() in (0, len(labels)):
                continue
            clusters = table["patient_id"].to_numpy()[rows]
            comps = []
            for m in methods:
                if m == "instance":
                    continue
                c = power.delta_variance(scores[m], scores["instance"], labels, clusters, samples=args.bootstrap)
                comps.append(c)
                lines.append(f"| {task} | {fraction:.0%} | {LABELS.get(m, m)} | {c.delta:+.3f} | {math.sqrt(c.s2_seed):.3f} | "
                             f"{math.sqrt(c.u_patient):.3f} | {c.mde(c.seeds, c.patients):.3f} | {c.mde(seeds_now, planned):.3f} |")
            best = power.plan(comps, args.power_target, seed_options=range(2, 11),
                              patient_options=range(50, 2001, 10),
                              cost=lambda s, n: s * (60 + n / test_share * 0.01))   # pre-training dominates
            plans.append(f"- {task}, {fraction:.0%}: " + (
                f"{best[0]} seeds x {best[1]} test patients (~{round(best[1] / test_share)} patients) reach MDE "
                f"{best[2]:.3f} <= {args.power_target}" if best else
                f"no option up to 10 seeds x 2000 test patients reaches {args.power_target}"))
    return "\n".join(lines + ["", "Cheapest size reaching the target for every strategy:"] + plans) + "\n"


def match_models(names, strategies, seeds, checkpoints) -> dict[str, list[str]]:
    """The evaluation's row names of each strategy's checkpoints, in seed order. linear_eval names a run
    `<strategy>@<step>`, and a repeated name `<strategy>@<step> (<workdir>)`."""
    out = {}
    for s in strategies:
        mine = []
        for workdir in checkpoints[s]:
            base = s.split("+")[0]   # a variant's run is named after its strategy
            hit = [n for n in names if n.endswith(f"({workdir})") and n.startswith(f"{base}@")]
            if not hit:  # the first run of that name carries no workdir
                hit = [n for n in names if n.startswith(f"{base}@") and "(" not in n]
            if len(hit) != 1:
                raise SystemExit(f"medaug_sweep: cannot find the evaluation row of {workdir} among {names}")
            mine.append(hit[0])
        out[s] = mine
    return out


if __name__ == "__main__":
    main()
