r"""Linear evaluation of a pre-trained encoder: frozen features -> logistic probe per label fraction and seed
-> AUC with a 95% bootstrap CI. The protocol and every option are in configs/linear_eval.py.

    python -m cxrjax.linear_eval --config=configs/linear_eval.py:demo --config.checkpoint=runs/demo --workdir=OUT
    python -m cxrjax.linear_eval --config=configs/linear_eval.py:demo --config.init=random --workdir=OUT

WORKDIR receives results.csv (one row per model/task/fraction), results.md (the same as a table),
per_seed.csv, predictions.parquet (test scores per seed, for paired comparisons), roc-*.png, eval.json
(what was evaluated) and features/ (the cached features, reused by later runs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from cxrjax import xla_cpu

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/linear_eval.py[:demo]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (results, ROC curves, feature cache).")
flags.mark_flags_as_required(["config", "workdir"])


def note(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_name(config, encoder) -> str:
    if config.name:
        return config.name
    src = encoder.source
    if src["init"] == "checkpoint":
        run = Path(src["checkpoint"]) / "run.json"
        strategy = json.loads(run.read_text()).get("strategy", "moco") if run.is_file() else "moco"
        return f"{strategy}@{src['step']}"
    return src["init"]


def eval_size(config, encoder) -> int:
    """config.augment.size, or (0) the run's own training size from its config.json."""
    if config.augment.size > 0:
        return config.augment.size
    saved = Path(encoder.source.get("checkpoint", "")) / "config.json"
    if encoder.source["init"] == "checkpoint" and saved.is_file():
        return int(json.loads(saved.read_text())["augment"]["size"])
    raise ValueError("config.augment.size=0 means 'the run's training size', but the run has no config.json; "
                     "set --config.augment.size")


def build_encoder(config, mesh):
    from cxrjax.eval import features

    if config.init == "checkpoint":
        if not config.checkpoint:
            raise ValueError("config.init='checkpoint' needs --config.checkpoint=WORKDIR[/STEP] (a MoCo run); "
                             "or use --config.init=random / imagenet")
        return features.restore_encoder(config.checkpoint, mesh)
    if config.checkpoint:
        raise ValueError(f"config.checkpoint is set but config.init={config.init!r}; use init='checkpoint'")
    if config.init not in features.INITS:
        raise ValueError(f"config.init={config.init!r}; expected one of {features.INITS}")
    return features.build_encoder(config.model, config.init, weights=config.weights, seed=config.seed, mesh=mesh)


def finetuned_scores(config, encoder, data_dir, rows, targets, aug, seed, mesh):
    """Fine-tune a copy of the encoder + heads on the label sample `rows`; (n_test, T) logits on the test split.

    Training views use the trainer's default augmentation (MedAug: flip + rotation +-10 deg, no crop) at the
    eval size; test images the eval transform, BatchNorm in eval mode."""
    from cxrjax.data import augment as augment_lib
    from cxrjax.eval import features, linear
    from cxrjax.train import contrastive

    train_aug = augment_lib.AugmentConfig.from_dict({**contrastive.default_config().augment.to_dict(), "size": aug.size})
    f = config.finetune
    tuned, w, b = linear.finetune(encoder, data_dir, rows, targets, mesh=mesh, augment=train_aug, epochs=f.epochs,
                                  lr=f.lr, batch_size=f.batch_size, weight_decay=f.weight_decay, seed=seed,
                                  name=config.data.name, note=note)
    x, r = features.extract_features(tuned, data_dir, config.data.test_split, aug, mesh=mesh,
                                     batch_size=config.batch_size, num_workers=config.data.num_workers,
                                     name=config.data.name, progress=False)
    return x @ w + b


def evaluate(config, workdir: str):
    """The linear-evaluation job; returns the summary table (a DataFrame, also written to WORKDIR)."""
    import numpy as np
    import pandas as pd

    from cxrjax.data import augment as augment_lib
    from cxrjax.eval import features, linear
    from cxrjax.train import contrastive

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not config.fractions or not config.seeds or not config.tasks:
        raise ValueError("config.fractions, config.seeds and config.tasks must each name at least one value")

    note("Creating mesh ...")
    mesh = contrastive.make_mesh(config)

    note("Loading data and labels ...")
    data_dir = contrastive.prepared_data_dir(config, note)
    table = pd.read_parquet(Path(data_dir) / "table.parquet")
    tasks = [linear.parse_task(t, table.columns) for t in config.tasks]
    targets = linear.task_labels(table, tasks, uncertain=config.uncertain, blank=config.blank,
                                 unlabelled_values=tuple(config.unlabelled_values))
    patients = table["patient_id"].to_numpy()
    splits = {"train": config.data.train_split, "valid": config.data.valid_split, "test": config.data.test_split}
    present = set(table["split"].unique())
    for role in ("train", "test"):
        if splits[role] not in present:
            raise ValueError(f"{data_dir}/table.parquet has no {role} split {splits[role]!r} (splits: {sorted(present)})")

    note(f"Creating the encoder ({config.init}) ...")
    encoder = build_encoder(config, mesh)
    name = model_name(config, encoder)
    aug = augment_lib.AugmentConfig(size=eval_size(config, encoder), eval_crop=config.augment.eval_crop)
    cache = config.feature_cache or workdir / "features"
    feats = {}
    for role, split in splits.items():
        if split not in present:
            continue
        note(f"Features of split {split!r} ({aug.size} px, {config.output}) ...")
        x, rows = features.cached_features(encoder, data_dir, split, aug, cache_dir=cache, note=note, mesh=mesh,
                                           batch_size=config.batch_size, output=config.output,
                                           num_workers=config.data.num_workers, name=config.data.name)
        feats[role] = (x, rows)

    x_tr, r_tr = feats["train"]
    x_te, r_te = feats["test"]
    y_tr, y_te = targets[r_tr], targets[r_te]
    has_valid = "valid" in feats
    for j, t in enumerate(tasks):
        classes = set(np.unique(y_te[np.isfinite(y_te[:, j]), j]).tolist())
        if classes != {0.0, 1.0}:
            note(f"WARNING: task {t.name!r} has class(es) {sorted(classes)} only among the {splits['test']!r} images: "
                 "its AUC is undefined (NaN). Choose another task or split.")
    grid = tuple(float(v) for v in config.probe.l2_grid)

    note(f"Probing {len(tasks)} task(s) x {len(config.fractions)} fraction(s) x {len(config.seeds)} seed(s) ...")
    per_seed, preds = [], []
    for fraction in config.fractions:
        for seed in config.seeds:
            sample = linear.sample_fraction(patients[r_tr], y_tr, fraction, seed)
            xs, ys = x_tr[sample.rows], y_tr[sample.rows]
            l2, valid_aucs = (linear.select_l2(xs, ys, feats["valid"][0], targets[feats["valid"][1]], grid,
                                               steps=config.probe.steps) if has_valid else (float("nan"), {}))
            chosen = l2 if np.isfinite(l2) else float(config.probe.l2)
            probe = linear.fit_probe(xs, ys, l2=chosen, steps=config.probe.steps)
            results = [(name, linear.predict(probe, x_te), probe.final_loss)]
            if config.finetune.enabled:
                results.append((f"{name} (fine-tuned)", finetuned_scores(config, encoder, data_dir, r_tr[sample.rows],
                                                                        targets, aug, seed, mesh), np.nan))
            for model, scores, final_loss in results:
                for j, t in enumerate(tasks):
                    per_seed.append(dict(model=model, task=t.name, fraction=fraction, seed=seed,
                                         auc=linear.task_auc(y_te[:, j], scores[:, j]), l2=chosen,
                                         l2_from="valid" if np.isfinite(l2) else "fixed",
                                         valid_auc=valid_aucs.get(chosen, np.nan),
                                         train_images=len(sample.rows), train_patients=sample.patients,
                                         train_positives=int(np.nansum(ys[:, j] == 1)),
                                         added_for_classes=sample.added_for_classes, final_loss=final_loss))
                    preds.append(pd.DataFrame(dict(model=model, task=t.name, fraction=fraction, seed=seed, row=r_te,
                                                   label=y_te[:, j], score=scores[:, j])))
    per_seed = pd.DataFrame(per_seed)
    preds = pd.concat(preds, ignore_index=True)

    note(f"AUC and {config.bootstrap.samples}-sample bootstrap CIs (over test patients) ...")
    summary = []
    for (model, task, fraction), g in preds.groupby(["model", "task", "fraction"], sort=False):
        wide = g.pivot(index="row", columns="seed", values="score").loc[r_te]
        y = targets[r_te, [t.name for t in tasks].index(task)]
        s = linear.bootstrap_auc(y, wide.to_numpy().T, patients[r_te], samples=config.bootstrap.samples,
                                 seed=config.bootstrap.seed)
        ps = per_seed[(per_seed.model == model) & (per_seed.task == task) & (per_seed.fraction == fraction)]
        ok = np.isfinite(y)
        summary.append(dict(model=model, task=task, fraction=fraction, auc_mean=s.mean, auc_sd=s.sd, ci_lo=s.lo,
                            ci_hi=s.hi, seeds=len(s.per_seed), boot_used=s.n_boot_used,
                            train_images_mean=ps.train_images.mean(), train_patients_mean=ps.train_patients.mean(),
                            test_images=int(ok.sum()), test_positives=int((y[ok] == 1).sum()),
                            test_patients=int(len(np.unique(patients[r_te][ok]))),
                            l2_median=float(ps.l2.median()), init=config.init, checkpoint=config.checkpoint,
                            data=str(data_dir), test_split=splits["test"], size=aug.size))
        kind = "-finetuned" if model != name else ""
        slug = "".join(ch if ch.isalnum() else "-" for ch in f"{task}-{linear.format_fraction(fraction)}").strip("-")
        linear.plot_roc(workdir / f"roc-{slug}{kind}.png", y, wide.to_numpy().T,
                        f"{model}: {task}, {linear.format_fraction(fraction)} labels (test)")
    summary = pd.DataFrame(summary)
    preds.to_parquet(workdir / "predictions.parquet", index=False)
    (workdir / "eval.json").write_text(json.dumps(
        {"encoder": encoder.source, "name": name, "data": str(data_dir), "splits": splits, "size": aug.size,
         "config": config.to_dict()}, indent=1, default=str))
    md = linear.write_results(workdir, summary, per_seed,
                              title=f"Linear evaluation, {splits['test']} split of {data_dir} (seeds {list(config.seeds)})")
    print(md, flush=True)
    return summary


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides look like --config.tasks=...")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config.get("job") != "linear_eval":
        raise app.UsageError(f"config.job={config.get('job')!r}; use configs/linear_eval.py")
    xla_cpu.tune()  # same XLA:CPU convolution choice as the trainer (before JAX creates its backend)
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from cxrjax.data.pipeline import CorruptRecordError

    try:
        evaluate(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FloatingPointError, CorruptRecordError) as e:
        raise SystemExit(f"cxrjax.linear_eval: error: {e}") from None


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
