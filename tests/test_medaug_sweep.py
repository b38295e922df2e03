"""launch/medaug_sweep.py: what the presets run (dry run), model matching with §4.3 variants, the power report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import medaug_sweep  # noqa: E402

TABLE1 = ("instance", "study-same_lat-same", "study-same_lat-different", "study-same_lat-any", "study-any_lat-any",
          "study-different_lat-any")


def _dry_run(*args) -> list[str]:
    r = subprocess.run([sys.executable, str(REPO / "launch" / "medaug_sweep.py"), *args, "--dry_run"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    return [line[2:] for line in r.stdout.splitlines() if line.startswith("$ ")]


def test_power_preset_runs_every_table1_row_the_append_variant_and_a_ceiling(tmp_path):
    cmds = _dry_run("--preset=power", f"--out={tmp_path}")
    seeds = medaug_sweep.POWER_SEEDS.split(",")
    pre = [c for c in cmds if "cxrjax.main" in c]
    assert len(pre) == 7 * len(seeds)
    for s in TABLE1[1:]:
        assert sum(f"configs/moco_medaug.py:{s},demo " in c for c in pre) == len(seeds), s
    assert sum("configs/moco_instance.py:demo " in c for c in pre) == len(seeds)
    assert sum("configs/moco_medaug.py:study-same_lat-any,append,demo " in c for c in pre) == len(seeds)
    assert all(f"--config.total_steps={medaug_sweep.POWER_STEPS} " in c for c in pre)
    prep = [c for c in cmds if "cxrjax.prepare" in c]
    assert len(prep) == 1 and f"--patients={medaug_sweep.POWER_PATIENTS}" in prep[0]
    ceiling = [c for c in cmds if "eval/supervised" in c]
    assert len(ceiling) == 1 and "--config.finetune.enabled=True" in ceiling[0] and "--config.init=random" in ceiling[0]
    assert "'--config.fractions=(0.01,0.1,1.0,)'" in ceiling[0] and "'--config.seeds=(0,1,2,3,4,)'" in ceiling[0]
    # the mini preset has no ceiling and no variant; a v2 phantom is asked for by name
    mini = _dry_run("--preset=mini", f"--out={tmp_path / 'm'}", "--phantom_version=2")
    assert not [c for c in mini if "eval/supervised" in c] and not [c for c in mini if ",append," in c]
    assert "--phantom_version=2" in [c for c in mini if "cxrjax.prepare" in c][0]


def test_unknown_variant_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "launch" / "medaug_sweep.py"), f"--out={tmp_path}", "--dry_run",
                        "--strategies=instance,study-same_lat-any+apend"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "study-same_lat-any+apend" in r.stderr


def test_variant_rows_are_matched_by_their_workdir():
    ck = {"study-same_lat-any": ["/o/pretrain/study-same_lat-any-seed0", "/o/pretrain/study-same_lat-any-seed1"],
          "study-same_lat-any+append": ["/o/pretrain/study-same_lat-any+append-seed0",
                                        "/o/pretrain/study-same_lat-any+append-seed1"]}
    names = ["study-same_lat-any@400", "study-same_lat-any@400 (/o/pretrain/study-same_lat-any-seed1)",
             "study-same_lat-any@400 (/o/pretrain/study-same_lat-any+append-seed0)",
             "study-same_lat-any@400 (/o/pretrain/study-same_lat-any+append-seed1)"]
    m = medaug_sweep.match_models(names, list(ck), [0, 1], ck)
    assert m["study-same_lat-any"] == names[:2]
    assert m["study-same_lat-any+append"] == names[2:]


def _fake_pilot(out: Path, seeds=3, patients=80, gain=0.5):
    """A finished sweep's folder: table, sweep.json and one predictions file (b = instance + a gain)."""
    rng = np.random.default_rng(0)
    (out / "data").mkdir(parents=True)
    pid = np.repeat([f"p{i}" for i in range(patients)], 2)
    split = np.where(np.arange(len(pid)) < len(pid) // 2, "test", "train")
    pd.DataFrame({"patient_id": pid, "split": split}).to_parquet(out / "data" / "table.parquet")
    test = np.flatnonzero(split == "test")
    y = (rng.random(len(test)) < 0.5).astype(float)
    recs = []
    for name, g in (("instance", 0.0), ("study-same_lat-any", gain)):
        for s in range(seeds):
            for label_seed in range(2):
                score = y * (1.0 + g) + rng.normal(0, 1, len(test)) + rng.normal(0, 0.2) * y
                recs += [dict(model=f"{name}@10" if s == 0 else f"{name}@10 (w{s})", task="T", fraction=1.0,
                              seed=label_seed, row=int(r), label=float(l), score=float(v))
                         for r, l, v in zip(test, y, score)]
    (out / "eval" / "checkpoints").mkdir(parents=True)
    pd.DataFrame(recs).to_parquet(out / "eval" / "checkpoints" / "predictions.parquet")
    methods = {m: [f"{m}@10"] + [f"{m}@10 (w{s})" for s in range(1, seeds)] for m in ("instance", "study-same_lat-any")}
    args = dict(strategies="instance,study-same_lat-any", seeds=",".join(map(str, range(seeds))), steps=10,
                patients=patients, tasks="T", fractions="1.0", data_dir="")
    (out / "sweep.json").write_text(json.dumps({"args": args, "methods": methods}))


def test_power_report_from_a_pilot(tmp_path, capsys):
    _fake_pilot(tmp_path / "pilot")
    medaug_sweep.main([f"--out={tmp_path / 'x'}", f"--power_from={tmp_path / 'pilot'}", "--bootstrap=200",
                       "--seeds=0,1,2,3,4,5,6,7", "--patients=2000", "--power_target=0.05"])
    text = capsys.readouterr().out
    row = [line for line in text.splitlines() if line.startswith("| T | 100% | same study, all lateralities")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].split("|")[1:-1]]
    delta, mde_pilot, mde_planned = float(cells[3]), float(cells[6]), float(cells[7])
    assert delta > 0.05                       # the planted gain shows
    assert mde_planned < mde_pilot            # 8 seeds x 1000 test patients vs 3 x 40
    # both MDEs follow 2.80 x sqrt(s2_seed / S + u_patient / N) from the printed SDs (3-decimal rounding):
    # the pilot at 3 seeds x 40 test patients, the plan at 8 seeds x 2000 x 50 % = 1000 test patients
    sd_seed, sd_patient, z = float(cells[4]), float(cells[5]), 1.959964 + 0.841621
    assert mde_pilot == pytest.approx(z * np.sqrt(sd_seed ** 2 / 3 + sd_patient ** 2 / 40), abs=2e-3)
    assert mde_planned == pytest.approx(z * np.sqrt(sd_seed ** 2 / 8 + sd_patient ** 2 / 1000), abs=2e-3)
    assert "Cheapest size reaching the target" in text and "seeds x" in text
