r"""Paired-only vs mixed masked vision-language pre-training at equal steps, several seeds, on one prepared
data set: pre-train every (arm, seed), evaluate each on held-out data, write one table.

    python -m cxrjax.prepare --source=phantom --patients=1500 --size=64 --out=runs/mvlm-exp/data
    python -m cxrjax.eval.mvlm_experiment --data=runs/mvlm-exp/data --out=runs/mvlm-exp --seeds=0,1,2

Per (arm, seed), in a fresh process each:
  1. `python -m cxrjax.main --config=configs/mvlm_{arm}.py:{variant} --config.seed=S --config.data.dir=DATA`
     (wall time, CPU-seconds of the process and the load average before/after are recorded),
  2. `cxrjax.eval.mvlm_heldout` (held-out MLM accuracy vs the unigram baseline, MVM loss vs the
     per-patch-mean baseline, retrieval vs exact chance),
  3. `python -m cxrjax.linear_eval` on the same data (the run's ViT at its training size, frozen; the
     `random` ViT and the raw-pixel rows on the same label samples).
Results: OUT/results.json (everything) and OUT/results.md (tables). Existing run folders are resumed /
re-evaluated, not redone. The seed changes the initialisation, the data order, the masks and which
patients are paired (`data.paired_fraction` is drawn by hashing patient ids with the seed); both arms
of one seed pair the same patients, so the paired arm trains on exactly the paired part of the mixed arm.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], log: Path) -> dict:
    """Run `cmd` (output to `log`); wall seconds, CPU-seconds of the child and load averages around it."""
    load0, cpu0, t0 = os.getloadavg(), _children_cpu(), time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    out = {"wall_s": time.perf_counter() - t0, "cpu_s": _children_cpu() - cpu0,
           "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
           "command": " ".join(cmd)}
    if r.returncode:
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd}: exit {r.returncode}; see {log}")
    return out


def run_one(arm: str, seed: int, data: str, out: Path, variant: str, extra: list[str]) -> dict:
    work = out / f"{arm}-seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "experiment.log"
    py = sys.executable
    rec = {"arm": arm, "seed": seed, "workdir": str(work)}
    timing = work / "timing.json"
    if timing.is_file():
        rec["train"] = json.loads(timing.read_text())
    else:
        rec["train"] = _run([py, "-m", "cxrjax.main", f"--config=configs/mvlm_{arm}.py:{variant}",
                             f"--workdir={work}", f"--config.seed={seed}", f"--config.data.dir={data}", *extra], log)
        timing.write_text(json.dumps(rec["train"], indent=1))
    from cxrjax.eval import mvlm_heldout

    rec["heldout"] = mvlm_heldout.evaluate(str(work))
    lin = work / "linear_eval"
    if not (lin / "results.csv").is_file():
        rec["linear_eval_run"] = _run([py, "-m", "cxrjax.linear_eval", "--config=configs/linear_eval.py",
                                       f"--config.checkpoint={work}", f"--config.data.dir={data}",
                                       "--config.augment.size=0", "--config.fractions=(0.1,1.0)",
                                       "--config.seeds=(0,1,2)", f"--workdir={lin}"], log)
    rec["linear_eval"] = _read_linear(lin / "results.csv")
    return rec


def _read_linear(path: Path) -> list[dict]:
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


# ----------------------------------------------------------------------------------------------
# Tables


def _mean_sd(xs) -> str:
    xs = np.asarray([x for x in xs if x is not None], float)
    if len(xs) == 0:
        return "—"
    return f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def summary_rows(records: list[dict]) -> dict:
    """Per run: the numbers of the tables (held-out tasks, baselines, retrieval, probe AUCs)."""
    rows = []
    for r in records:
        h = r["heldout"]
        mvm1 = h["mvm"]
        row = {"arm": r["arm"], "seed": r["seed"], "wall_s": r["train"]["wall_s"], "cpu_s": r["train"]["cpu_s"],
               "load": r["train"]["load_before"][0], "mlm_acc_text": h["mlm"]["acc_text_only"],
               "mlm_acc_image": h["mlm"]["acc_with_image"], "unigram_acc": h["mlm"]["unigram_acc"]}
        for s, e in mvm1.items():
            row[f"mvm_{s}"] = e["loss_image_only"]
            row[f"mvm_{s}_base"] = e["patch_mean_baseline_image_only"]
        if isinstance(h.get("retrieval"), dict):
            i2r = h["retrieval"]["image_to_report"]
            row.update(i2r_R10=i2r["R@10"], i2r_R10_chance=i2r["chance_R@10"], i2r_R1=i2r["R@1"],
                       r2i_R10=h["retrieval"]["report_to_image"]["R@10"],
                       r2i_R10_chance=h["retrieval"]["report_to_image"]["chance_R@10"])
        for lr in r["linear_eval"]:
            if float(lr.get("fraction", 0)) == 1.0:
                row[f"auc_{lr['model']}"] = lr.get("auc_mean", lr.get("auc"))
        rows.append(row)
    return rows


def write_markdown(rows: list[dict], path: Path) -> None:
    keys = [k for k in rows[0] if k not in ("arm", "seed")]
    lines = ["| arm | seed | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(
            f"{r.get(k):.3f}" if isinstance(r.get(k), float) else str(r.get(k, "—")) for k in keys) + " |")
    lines += ["", "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        sel = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} (n={len(sel)}) | " + " | ".join(_mean_sd([r.get(k) for r in sel]) for k in keys) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="prepared data folder (python -m cxrjax.prepare ...)")
    ap.add_argument("--out", required=True, help="folder for the runs and the tables")
    ap.add_argument("--arms", default="paired,mixed", help="configs/mvlm_{arm}.py, comma-separated")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variant", default="cpu", help="config variant(s) after the colon")
    ap.add_argument("--extra", default="", help="more --config.KEY=VALUE overrides, space-separated")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for arm in a.arms.split(","):
            print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed} (load {os.getloadavg()[0]:.2f}) ...", flush=True)
            records.append(run_one(arm, seed, a.data, out, a.variant, a.extra.split()))
            (out / "results.json").write_text(json.dumps(records, indent=1, default=str))
    rows = summary_rows(records)
    write_markdown(rows, out / "results.md")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
