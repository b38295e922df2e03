r"""Linear evaluation of pre-trained encoders (the library behind `python -m cxrjax.linear_eval`): frozen
features -> logistic probe per label fraction and seed -> AUC with a 95% bootstrap CI, beside the baselines
(`random`: the same architecture randomly initialised; `pixels`: the raw pixels), every row on the same
label samples and test images. The protocol and every option are in configs/linear_eval.py; `evaluate`
writes the files the command's doc lists.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

BASELINES = ("random", "pixels")
MAX_UNMATCHED_SHOWN = 50  # unmatched label-split rows printed; all of them are in label_splits_unmatched.csv


def note(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_name(config, encoder) -> str:
    if config.name:
        return config.name
    src = encoder.source
    if src["init"] == "checkpoint":
        run = Path(src["checkpoint"]) / "run.json"
        info = json.loads(run.read_text()) if run.is_file() else {}
        if encoder.kind == "vit":
            kinds = "+".join(k for k, v in (info.get("shares") or {"paired": 1}).items() if v)
            return f"mvlm-{kinds}@{src['step']}"
        return f"{info.get('strategy', 'moco')}@{src['step']}"
    return src["init"]


def eval_size(config, encoders) -> int:
    """config.augment.size, or (0) the run's own training size from its config.json. A ViT is evaluated at
    the size it was trained at (its patch grid and position embeddings are fixed), and so then is every
    other model of the same evaluation (one set of images for every row of the table)."""
    vit_sizes = {int(e.source["image_size"]) for e in encoders if e.kind == "vit"}
    if len(vit_sizes) > 1:
        raise ValueError(f"the ViTs to compare were trained at different sizes {sorted(vit_sizes)} px; one evaluation "
                         "shows every model the same images: evaluate them separately")
    if vit_sizes:
        size = vit_sizes.pop()
        if config.augment.size not in (0, size):
            vit = next(e for e in encoders if e.kind == "vit")
            raise ValueError(f"the ViT of {vit.source.get('checkpoint')} takes {size} px images (its patch grid is "
                             f"fixed), not config.augment.size={config.augment.size}; set --config.augment.size=0 "
                             f"(or {size})")
        return size
    if config.augment.size > 0:
        return config.augment.size
    src = encoders[0].source
    saved = Path(src.get("checkpoint", "")) / "config.json"
    if src["init"] == "checkpoint" and saved.is_file():
        return int(json.loads(saved.read_text())["augment"]["size"])
    raise ValueError("config.augment.size=0 means 'the run's training size', but there is no run with a config.json; "
                     "set --config.augment.size")


def build_encoders(config, mesh) -> list:
    """[(name, Encoder)] of what config.init names: the runs of config.checkpoint (one, or several separated by
    commas: MoCo and masked vision-language runs side by side), ImageNet weights, a random init or the pixels."""
    from cxrjax.eval import features

    if config.init == "checkpoint":
        runs = [c.strip() for c in config.checkpoint.split(",") if c.strip()]
        if not runs:
            raise ValueError("config.init='checkpoint' needs --config.checkpoint=WORKDIR[/STEP] (a MoCo or masked "
                             "vision-language run; several separated by commas); or use --config.init=random / "
                             "imagenet / pixels")
        if config.name and len(runs) > 1:
            raise ValueError("config.name names one model; with several checkpoints leave it empty")
        out = []
        for run in runs:
            enc = features.restore_encoder(run, mesh)
            name = model_name(config, enc)
            taken = {n for n, _ in out}
            out.append((name if name not in taken else f"{name} ({run})", enc))
        return out
    if config.checkpoint:
        raise ValueError(f"config.checkpoint is set but config.init={config.init!r}; use init='checkpoint'")
    if config.init not in features.INITS:
        raise ValueError(f"config.init={config.init!r}; expected one of {features.INITS}")
    if config.init == "pixels":
        enc = features.pixels_encoder(config.pixels.size, config.augment.size)
    else:
        enc = features.build_encoder(config.model, config.init, weights=config.weights, seed=config.seed, mesh=mesh)
    return [(model_name(config, enc), enc)]


def _architecture(enc) -> str:
    src = enc.source
    return src["arch"] if enc.kind == "vit" else f"{src['arch']}-w{src['width']}"


def build_baselines(config, mains, size: int, mesh) -> list:
    """[(name, Encoder)] of config.baselines: 'random' = each evaluated architecture randomly initialised with
    config.seed (named 'random', or 'random <arch>' when several architectures are compared; config.model's
    when the only evaluated row is the raw pixels), 'pixels' = the raw pixels."""
    from cxrjax.eval import features

    # --config.baselines=random,pixels arrives as one string: split on commas too
    wanted = [b.strip() for item in config.baselines for b in str(item).split(",") if b.strip()]
    unknown = [b for b in wanted if b not in BASELINES]
    if unknown:
        raise ValueError(f"config.baselines has {unknown}; known baselines: {list(BASELINES)}")
    encoders = [e for _, e in mains]
    out = []
    for b in dict.fromkeys(wanted):  # unique, in order
        if b == "pixels":
            if not any(e.kind == "pixels" for e in encoders):
                out.append(("pixels", features.pixels_encoder(config.pixels.size, size)))
            continue
        models = [e for e in encoders if e.kind != "pixels"]
        if not models:
            out.append(("random", features.build_encoder(config.model, "random", seed=config.seed, mesh=mesh)))
            continue
        arch = {}
        for e in models:
            arch.setdefault(_architecture(e), e)
        for a, e in arch.items():
            if e.source.get("init") == "random" and e.source.get("seed") == config.seed:
                continue  # the evaluated model is this baseline
            out.append(("random" if len(arch) == 1 else f"random {a}", features.random_like(e, config.seed, mesh)))
    return out


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


def label_samples(config, table, targets, r_tr, workdir):
    """{(fraction, seed): dict(rows = table rows of the training sample, patients, added_for_classes, file)}.

    cxrjax's own draw (by patient, `linear.sample_fraction`), or with config.label_splits.files the images
    each split file names (any split but the test split; unmatched rows listed); fraction 1.0 = all of train.
    """
    import numpy as np
    import pandas as pd

    from cxrjax.data import schema
    from cxrjax.eval import label_splits, linear

    patients = table["patient_id"].to_numpy()
    files = (label_splits.files_for(config.label_splits.files, config.fractions, config.seeds)
             if config.label_splits.files else {})
    index = label_splits.TableIndex(table) if files else None
    samples, unmatched = {}, []
    for fraction in config.fractions:
        for seed in config.seeds:
            key = (float(fraction), int(seed))
            if key in files:
                m = label_splits.match_file(files[key], index, test_split=config.data.test_split,
                                            label_columns=schema.CHEXPERT_LABELS)
                split_of = table["split"].to_numpy()[m.rows]
                usable = np.isin(split_of, [config.data.train_split, config.data.valid_split])
                if not usable.all():  # an image of a split the evaluation has no features of
                    lines = m.lines[~usable]
                    extra = pd.DataFrame({"file": m.file, "line": lines, "value": table["image_id"].to_numpy()[
                        m.rows[~usable]], "reason": [f"the image is in split {s!r}, neither train nor valid"
                                                     for s in split_of[~usable]]})
                    m = dataclasses.replace(m, rows=m.rows[usable], lines=m.lines[usable],
                                            unmatched=pd.concat([m.unmatched, extra], ignore_index=True))
                unmatched.append(m.unmatched)
                differ = {c: n for c, n in m.label_disagreements.items() if n}
                note(f"Label split {files[key]}: {len(m.rows)} of {m.n_file_rows} rows matched"
                     + (f"; labels differing from the table's: {differ} (the table's are used)" if differ else ""))
                if not len(m.rows):
                    raise ValueError(f"label split {files[key]}: no row matches an image of the table (see "
                                     f"{workdir}/label_splits_unmatched.csv)")
                rows = np.sort(m.rows)
                samples[key] = dict(rows=rows, patients=int(len(np.unique(patients[rows]))), added_for_classes=0,
                                    file=Path(files[key]).name)
                for j in range(targets.shape[1]):
                    if set(np.unique(targets[rows, j][np.isfinite(targets[rows, j])])) != {0.0, 1.0}:
                        raise ValueError(f"label split {files[key]}: task {j} lacks a class among its images; "
                                         "the probe cannot be trained")
            else:
                s = linear.sample_fraction(patients[r_tr], targets[r_tr], fraction, seed)
                samples[key] = dict(rows=r_tr[s.rows], patients=s.patients, added_for_classes=s.added_for_classes,
                                    file="")
    if files:
        bad = pd.concat(unmatched, ignore_index=True)
        bad.to_csv(workdir / "label_splits_unmatched.csv", index=False)
        note(f"Label splits: {len(bad)} unmatched row(s) (all in {workdir / 'label_splits_unmatched.csv'})")
        for r in bad.head(MAX_UNMATCHED_SHOWN).itertuples(index=False):
            note(f"  unmatched {r.file}:{r.line} {r.value}: {r.reason}")
        if len(bad) > MAX_UNMATCHED_SHOWN:
            note(f"  ... and {len(bad) - MAX_UNMATCHED_SHOWN} more in label_splits_unmatched.csv")
    return samples


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

    if config.label_splits.files:  # a missing file is an error before any feature is extracted
        from cxrjax.eval import label_splits

        label_splits.files_for(config.label_splits.files, config.fractions, config.seeds)

    note(f"Creating the encoder(s) ({config.init}) ...")
    mains = build_encoders(config, mesh)
    name, encoder = mains[0]  # the first evaluated model: its features fix the row order of the splits
    aug = augment_lib.AugmentConfig(size=eval_size(config, [e for _, e in mains]), eval_crop=config.augment.eval_crop)
    taken = {n for n, _ in mains}
    models = mains + [(n, e) for n, e in build_baselines(config, mains, aug.size, mesh) if n not in taken]
    if config.finetune.enabled and encoder.kind == "pixels":
        raise ValueError("config.finetune.enabled: the raw pixels (init=pixels) have no model to fine-tune")
    tuned_models = {n for n, e in mains if e.kind != "pixels"} if config.finetune.enabled else set()
    cache = config.feature_cache or workdir / "features"
    feats = {}  # model -> role -> (x, rows)
    for model, enc in models:
        feats[model] = {}
        for role, split in splits.items():
            if split not in present:
                continue
            output = "backbone" if enc.kind == "pixels" else config.output
            note(f"Features of split {split!r}: {model} ({aug.size} px, {output}) ...")
            feats[model][role] = features.cached_features(
                enc, data_dir, split, aug, cache_dir=cache, note=note, mesh=mesh, batch_size=config.batch_size,
                output=output, num_workers=config.data.num_workers, name=config.data.name)

    r_tr = feats[name]["train"][1]
    r_te = feats[name]["test"][1]
    y_te = targets[r_te]
    has_valid = "valid" in feats[name]
    for j, t in enumerate(tasks):
        classes = set(np.unique(y_te[np.isfinite(y_te[:, j]), j]).tolist())
        if classes != {0.0, 1.0}:
            note(f"WARNING: task {t.name!r} has class(es) {sorted(classes)} only among the {splits['test']!r} images: "
                 "its AUC is undefined (NaN). Choose another task or split.")
    grid = tuple(float(v) for v in config.probe.l2_grid)
    samples = label_samples(config, table, targets, r_tr, workdir)

    def rows_features(model, rows):
        """Features of table `rows` (sorted) from the model's train / valid features (a label split may name
        images of our valid split: MedAug drew its splits from all of CheXpert's train.csv)."""
        out = np.empty((len(rows), feats[model]["train"][0].shape[1]), np.float32)
        done = np.zeros(len(rows), bool)
        for role in ("train", "valid"):
            if role in feats[model]:
                x, r = feats[model][role]
                pos = np.clip(np.searchsorted(r, rows), 0, len(r) - 1)
                hit = r[pos] == rows
                out[hit] = x[pos[hit]]
                done |= hit
        assert done.all(), "label sample rows outside train/valid"
        return out

    note(f"Probing {len(models)} model(s) x {len(tasks)} task(s) x {len(config.fractions)} fraction(s) x "
         f"{len(config.seeds)} seed(s) ...")
    per_seed, preds = [], []
    # every draw at 100 % is the same image set: fine-tune it once (the first draw's seed) and let its scores
    # stand for the others, as the frozen probe's copies do -- fine-tuning is the costly part of the run
    tuned_scores = {}
    for (fraction, seed), sample in samples.items():
        rows = sample["rows"]
        ys = targets[rows]
        if has_valid:  # L2 chosen on valid images of patients outside the sample
            r_va = feats[name]["valid"][1]
            va_keep = ~np.isin(patients[r_va], patients[rows])
        for model, enc in models:
            xs = rows_features(model, rows)
            x_te = feats[model]["test"][0]
            fitted = {}
            if has_valid:
                x_va = np.asarray(feats[model]["valid"][0])[va_keep]
                l2, valid_aucs = linear.select_l2(xs, ys, x_va, targets[r_va[va_keep]], grid, steps=config.probe.steps,
                                                  tol=config.probe.tol, probes=fitted)
            else:
                l2, valid_aucs = float("nan"), {}
            chosen = l2 if np.isfinite(l2) else float(config.probe.l2)
            probe = fitted.get(chosen) or linear.fit_probe(xs, ys, l2=chosen, steps=config.probe.steps,
                                                           tol=config.probe.tol)
            results = [(model, linear.predict(probe, x_te), probe.final_loss, probe.iterations)]
            if model in tuned_models:
                key = (model, rows.tobytes())
                if key not in tuned_scores:
                    tuned_scores[key] = finetuned_scores(config, enc, data_dir, rows, targets, aug, seed, mesh)
                results.append((f"{model} (fine-tuned)", tuned_scores[key], np.nan, 0))
            for label, scores, final_loss, iterations in results:
                for j, t in enumerate(tasks):
                    per_seed.append(dict(model=label, task=t.name, fraction=fraction, seed=seed,
                                         auc=linear.task_auc(y_te[:, j], scores[:, j]), l2=chosen,
                                         l2_from="valid" if np.isfinite(l2) else "fixed",
                                         valid_auc=valid_aucs.get(chosen, np.nan),
                                         train_images=len(rows), train_patients=sample["patients"],
                                         train_positives=int(np.nansum(ys[:, j] == 1)),
                                         added_for_classes=sample["added_for_classes"], label_split=sample["file"],
                                         final_loss=final_loss, probe_iterations=iterations))
                    preds.append(pd.DataFrame(dict(model=label, task=t.name, fraction=fraction, seed=seed, row=r_te,
                                                   label=y_te[:, j], score=scores[:, j])))
    per_seed = pd.DataFrame(per_seed)
    preds = pd.concat(preds, ignore_index=True)

    note(f"AUC and {config.bootstrap.samples}-sample bootstrap CIs (over test patients) ...")
    summary = []
    sources = {m: e.source for m, e in models}
    sources.update({f"{m} (fine-tuned)": {**e.source, "finetuned": True} for m, e in models if m in tuned_models})
    for (model, task, fraction), g in preds.groupby(["model", "task", "fraction"], sort=False):
        wide = g.pivot(index="row", columns="seed", values="score").loc[r_te]
        y = targets[r_te, [t.name for t in tasks].index(task)]
        s = linear.bootstrap_auc(y, wide.to_numpy().T, patients[r_te], samples=config.bootstrap.samples,
                                 seed=config.bootstrap.seed)
        ps = per_seed[(per_seed.model == model) & (per_seed.task == task) & (per_seed.fraction == fraction)]
        ok = np.isfinite(y)
        src = sources.get(model, encoder.source)
        summary.append(dict(model=model, task=task, fraction=fraction, auc_mean=s.mean, auc_sd=s.sd, ci_lo=s.lo,
                            ci_hi=s.hi, seeds=len(s.per_seed), boot_used=s.n_boot_used,
                            train_images_mean=ps.train_images.mean(), train_patients_mean=ps.train_patients.mean(),
                            test_images=int(ok.sum()), test_positives=int((y[ok] == 1).sum()),
                            test_patients=int(len(np.unique(patients[r_te][ok]))),
                            l2_median=float(ps.l2.median()), init=src.get("init"),
                            checkpoint=src.get("checkpoint", ""), label_splits=config.label_splits.files,
                            data=str(data_dir), test_split=splits["test"], size=aug.size))
        slug = "".join(ch if ch.isalnum() else "-"
                       for ch in f"{model}-{task}-{linear.format_fraction(fraction)}").strip("-")
        linear.plot_roc(workdir / f"roc-{slug}.png", y, wide.to_numpy().T,
                        f"{model}: {task}, {linear.format_fraction(fraction)} labels (test)")
    summary = pd.DataFrame(summary)
    preds.to_parquet(workdir / "predictions.parquet", index=False)
    (workdir / "eval.json").write_text(json.dumps(
        {"encoder": encoder.source, "name": name, "models": sources, "data": str(data_dir),
         "splits": splits, "size": aug.size, "config": config.to_dict()}, indent=1, default=str))
    md = linear.write_results(workdir, summary, per_seed,
                              title=f"Linear evaluation, {splits['test']} split of {data_dir} (seeds {list(config.seeds)})")
    print(md, flush=True)
    return summary
