"""Linear evaluation on frozen features: labels, patient-level label fractions, the logistic probe,
AUC with a bootstrap confidence interval, and the results files (CSV, Markdown table, ROC PNGs).

    task_labels(table, tasks, ...)   table.parquet -> (n_table, T) targets in {0, 1}, NaN = not used
    sample_fraction(...)             a label fraction of the training split, drawn by patient, per seed
    fit_probe / predict              logistic regression, one output per task, masked loss, L-BFGS (optax)
    select_l2                        the L2 strength chosen on the validation split
    bootstrap_auc                    mean AUC over seeds + 95% CI by resampling test *patients*
    write_results / plot_roc         results.csv, results.md, per_seed.csv, roc-*.png

Tasks: a CheXpert column ("Pleural Effusion") or a binary task over any table column written
`column=value` (e.g. `extra_finding=COVID-19`: 1 where one of the comma-separated parts of the cell
equals the value, 0 for any other labelled value, unused where the cell is empty or in
`unlabelled_values`, e.g. the COVID collection's "todo").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from cxrjax.data import schema

UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")  # CheXpert's U-Zeros / U-Ones / masked (MedAug: ignore)
BLANK_POLICIES = ("zeros", "ignore")  # MedAug: blank = negative


# ----------------------------------------------------------------------------------------------
# Labels


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # as given in config.tasks (also the name in the results)
    column: str
    value: str | None = None  # None: a CheXpert column (1/0/-1/NaN); else a `column=value` binary task


def parse_task(spec: str, columns) -> Task:
    """'Pleural Effusion' or 'extra_finding=COVID-19' -> Task; an unknown column is a clear error."""
    column, _, value = spec.partition("=")
    column, value = column.strip(), value.strip()
    if value:
        if column not in columns:
            raise ValueError(f"task {spec!r}: table.parquet has no column {column!r}; columns: {sorted(columns)}")
        return Task(spec, column, value)
    if column not in schema.CHEXPERT_LABELS:
        raise ValueError(f"task {spec!r} is not a CheXpert label {list(schema.CHEXPERT_LABELS)}; for another "
                         "column write `column=value` (e.g. extra_finding=COVID-19)")
    return Task(spec, column)


def task_labels(table: pd.DataFrame, tasks: list[Task], *, uncertain: str = "ignore", blank: str = "zeros",
                unlabelled_values=("", "todo")) -> np.ndarray:
    """(n_table, T) float32 targets: 1 / 0, NaN where a row does not count for that task."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain={uncertain!r}; expected one of {UNCERTAIN_POLICIES}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank={blank!r}; expected one of {BLANK_POLICIES}")
    out = np.full((len(table), len(tasks)), np.nan, np.float32)
    skip = {str(v).strip().lower() for v in unlabelled_values}
    for j, t in enumerate(tasks):
        if t.value is None:
            y = table[t.column].to_numpy(np.float32).copy()
            y[y == -1] = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}[uncertain]
            if blank == "zeros":
                y[np.isnan(table[t.column].to_numpy(np.float32))] = 0.0
            out[:, j] = y
        else:
            cell = table[t.column].astype("string").str.strip()
            labelled = cell.notna() & ~cell.str.lower().isin(skip)
            parts = cell.fillna("").str.split(",")
            hit = parts.map(lambda ps: any(p.strip() == t.value for p in ps))
            out[:, j] = np.where(labelled.to_numpy(bool), hit.to_numpy(bool).astype(np.float32), np.nan)
    return out


# ----------------------------------------------------------------------------------------------
# Label fractions, by patient


@dataclasses.dataclass
class Sample:
    rows: np.ndarray  # indices into the arrays given to sample_fraction, sorted
    patients: int
    added_for_classes: int  # patients added beyond the fraction so that every task has both classes


def sample_fraction(patients: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> Sample:
    """Images of round(fraction x patients) patients (at least one), drawn with `seed`.

    Patient-level (all images of a drawn patient, as the splits are), reproducible per seed, and nested
    (a patient in the 1% sample is in the 10% one of the same seed). If a task lacks a class in the draw,
    the next patients of the same permutation having that class are added (counted in
    `added_for_classes`); if no patient of the split has it, a ValueError names the task.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    uniq, inverse = np.unique(patients, return_inverse=True)
    order = np.random.default_rng([seed, 0x1AB]).permutation(len(uniq))
    k = max(1, int(round(fraction * len(uniq))))
    chosen = np.zeros(len(uniq), bool)
    chosen[order[:k]] = True
    added = 0
    for j in range(labels.shape[1]):
        for cls in (0.0, 1.0):
            has = np.zeros(len(uniq), bool)
            has[inverse[labels[:, j] == cls]] = True
            if not has.any():
                raise ValueError(f"task {j}: no image of the training split has class {int(cls)}; the probe cannot "
                                 "be trained (choose another task or check the label policy)")
            if not (has & chosen).any():
                nxt = next(p for p in order if has[p])
                chosen[nxt] = True
                added += 1
    rows = np.flatnonzero(chosen[inverse])
    return Sample(rows, int(chosen.sum()), added)


# ----------------------------------------------------------------------------------------------
# The probe


def _masked_bce(logits, y, mask):
    """Mean binary cross-entropy per task over the rows that count, summed over tasks."""
    per = optax.sigmoid_binary_cross_entropy(logits, jnp.where(mask, y, 0.0)) * mask
    return jnp.sum(jnp.sum(per, 0) / jnp.maximum(jnp.sum(mask, 0), 1.0))


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_lbfgs(x, y, mask, l2, steps: int, tol):
    """L-BFGS (optax, zoom line search) from zero until the gradient's L2 norm is below `tol` or `steps`
    iterations ran -> (params, final loss, iterations, final gradient norm)."""
    d, t = x.shape[1], y.shape[1]
    params = {"w": jnp.zeros((d, t), jnp.float32), "b": jnp.zeros((t,), jnp.float32)}

    def loss(p):
        return _masked_bce(x @ p["w"] + p["b"], y, mask) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def running(carry):
        _, _, i, grad_norm = carry
        return (i < steps) & (grad_norm > tol)

    def step(carry):
        p, s, i, _ = carry
        value, grad = value_and_grad(p, state=s)
        updates, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), s, i + 1, optax.tree_utils.tree_norm(grad)

    params, _, iters, grad_norm = jax.lax.while_loop(
        running, step, (params, opt.init(params), jnp.int32(0), jnp.float32(jnp.inf)))
    return params, loss(params), iters, grad_norm


@dataclasses.dataclass
class Probe:
    """A fitted linear layer on standardised features (mean/std of its training sample)."""

    mean: np.ndarray
    std: np.ndarray
    w: np.ndarray
    b: np.ndarray
    l2: float
    final_loss: float
    iterations: int = 0  # L-BFGS iterations run (== steps: stopped by the cap, not by convergence)


MIN_ROWS_PAD, MIN_DIM_PAD = 1024, 1024  # shape buckets: one compiled probe serves every small sample / feature size


def fit_probe(features: np.ndarray, targets: np.ndarray, *, l2: float, steps: int = 300, tol: float = 1e-6) -> Probe:
    """Logistic regression, one output per task; rows whose target is NaN do not count for that task.

    Features are standardised (the L2 strength then means the same for every encoder). The sample is
    fitted to convergence: L-BFGS stops when the gradient's L2 norm is below `tol` (1e-6: weights within
    ~1e-4 of scikit-learn's exact solution even at l2 = 1e-4; typically 10-80 iterations), at most `steps`
    iterations. The sample is padded to a power of two of at least 1024 rows with masked rows, and the features to a power of two of
    at least 1024 with zero columns (their weights get no gradient and stay 0: the fit is exactly the
    unpadded one), so one compiled L-BFGS program serves every fraction, seed and encoder of a small
    evaluation (compiling it takes seconds; running it, tenths).
    """
    mean = np.asarray(features.mean(0), np.float32)
    std = np.asarray(features.std(0), np.float32) + 1e-6
    n, d = features.shape
    n_pad = 1 << max(MIN_ROWS_PAD.bit_length() - 1, math.ceil(math.log2(max(n, 1))))
    d_pad = 1 << max(MIN_DIM_PAD.bit_length() - 1, math.ceil(math.log2(max(d, 1))))
    xp = np.zeros((n_pad, d_pad), np.float32)
    yp = np.zeros((n_pad, targets.shape[1]), np.float32)
    mp = np.zeros_like(yp)
    xp[:n, :d], mask = (features - mean) / std, np.isfinite(targets)
    yp[:n], mp[:n] = np.nan_to_num(targets), mask
    params, loss, iters, _ = _fit_lbfgs(jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(mp), jnp.float32(l2), steps,
                                        jnp.float32(tol))
    loss = float(loss)
    if not np.isfinite(loss):
        raise FloatingPointError(f"the probe's loss is {loss} (l2={l2}); features may hold NaN/Inf")
    return Probe(mean, std, np.asarray(params["w"])[:d], np.asarray(params["b"]), float(l2), loss, int(iters))


def predict(probe: Probe, features: np.ndarray) -> np.ndarray:
    """(n, T) logits."""
    return ((features - probe.mean) / probe.std) @ probe.w + probe.b


def task_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC over the rows with a finite target; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(targets)
    y = targets[ok]
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, scores[ok]))


def select_l2(train_x, train_y, valid_x, valid_y, grid, *, steps: int, tol: float = 1e-6,
              probes: dict | None = None) -> tuple[float, dict]:
    """The L2 strength of `grid` with the best mean validation AUC over tasks (ties: the stronger one).

    Returns (l2, {l2: mean valid AUC}); with no usable validation labels returns (nan, {}). `probes`: a dict
    that receives every fitted Probe by its L2 (so the chosen one need not be fitted again).
    """
    scores = {}
    for l2 in grid:
        p = fit_probe(train_x, train_y, l2=l2, steps=steps, tol=tol)
        if probes is not None:
            probes[float(l2)] = p
        s = predict(p, valid_x)
        aucs = [task_auc(valid_y[:, j], s[:, j]) for j in range(valid_y.shape[1])]
        aucs = [a for a in aucs if np.isfinite(a)]
        if aucs:
            scores[float(l2)] = float(np.mean(aucs))
    if not scores:
        return float("nan"), {}
    best = max(scores.values())
    return max(l2 for l2, v in scores.items() if v >= best - 1e-12), scores


# ----------------------------------------------------------------------------------------------
# AUC over seeds with a bootstrap CI


def rank_auc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of `scores` (S, n) against binary `y` (n,) by the Mann-Whitney rank formula
    (ties averaged: equal to sklearn's roc_auc_score); ~50x faster than calling it in a bootstrap loop."""
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = pos.sum(), (~pos).sum()
    ranks = rankdata(np.atleast_2d(scores), axis=1)
    return (ranks[:, pos].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _patient_resamples(groups: np.ndarray, samples: int, seed: int):
    """Index arrays of `samples` cluster-bootstrap resamples (patients drawn with replacement)."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        yield np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])


@dataclasses.dataclass
class AucSummary:
    mean: float  # mean over seeds of the test AUC
    sd: float  # SD over seeds (the label-sample variability; MedAug reports mean +- SD)
    lo: float  # 95% bootstrap CI of the mean over seeds (test-set variability)
    hi: float
    per_seed: list[float]
    n_boot_used: int


def bootstrap_auc(targets: np.ndarray, scores_per_seed: np.ndarray, groups: np.ndarray, *, samples: int = 1000,
                  seed: int = 0, level: float = 0.95) -> AucSummary:
    """Mean AUC over seeds and its percentile CI from resampling test *patients* (`groups`) with replacement.

    The images of a patient are correlated, so resampling patients (cluster bootstrap) gives an honest
    interval. Every seed's scores are evaluated on the same resample and averaged; resamples holding one
    class only are skipped (counted in n_boot_used). targets: (n,) with NaN = unused; scores: (S, n).
    """
    scores_per_seed = np.atleast_2d(scores_per_seed)
    ok = np.isfinite(targets)
    y, s, g = targets[ok], scores_per_seed[:, ok], groups[ok]
    per_seed = [task_auc(y, si) for si in s]
    boots = []
    for idx in _patient_resamples(g, samples, seed):
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        boots.append(rank_auc(yb, s[:, idx]).mean())
    alpha = (1 - level) / 2
    lo, hi = (np.quantile(boots, [alpha, 1 - alpha]) if boots else (np.nan, np.nan))
    return AucSummary(float(np.mean(per_seed)), float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                      float(lo), float(hi), per_seed, len(boots))


def bootstrap_auc_delta(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, groups: np.ndarray, *,
                        samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Paired difference of mean-over-seeds AUC, model a minus model b, on the same test images:
    (delta, CI low, CI high), both models evaluated on every patient resample (cluster bootstrap)."""
    ok = np.isfinite(targets)
    y, g = targets[ok], groups[ok]
    a, b = np.atleast_2d(scores_a)[:, ok], np.atleast_2d(scores_b)[:, ok]
    delta = float(np.mean([task_auc(y, s) for s in a]) - np.mean([task_auc(y, s) for s in b]))
    boots = []
    for idx in _patient_resamples(g, samples, seed):
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        boots.append(rank_auc(yb, a[:, idx]).mean() - rank_auc(yb, b[:, idx]).mean())
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha]) if boots else (np.nan, np.nan)
    return delta, float(lo), float(hi)


# ----------------------------------------------------------------------------------------------
# Results files


def format_fraction(f: float) -> str:
    return f"{f * 100:g}%"


def results_markdown(df: pd.DataFrame, title: str = "") -> str:
    """A table a paper could print: one row per (model, task, fraction)."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| model | task | labels | mean AUC | ± SD (seeds) | 95% CI | seeds | train images | test images (pos) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples(index=False):
        lines.append(f"| {r.model} | {r.task} | {format_fraction(r.fraction)} | {r.auc_mean:.3f} | {r.auc_sd:.3f} | "
                     f"[{r.ci_lo:.3f}, {r.ci_hi:.3f}] | {r.seeds} | {r.train_images_mean:.0f} | "
                     f"{r.test_images} ({r.test_positives}) |")
    return "\n".join(lines) + "\n"


def write_results(workdir: str | Path, summary: pd.DataFrame, per_seed: pd.DataFrame, title: str = "") -> str:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summary.to_csv(workdir / "results.csv", index=False)
    per_seed.to_csv(workdir / "per_seed.csv", index=False)
    md = results_markdown(summary, title)
    (workdir / "results.md").write_text(md)
    return md


def plot_roc(path: str | Path, targets: np.ndarray, scores_per_seed: np.ndarray, title: str) -> None:
    """ROC curve of every seed's probe on the test split (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    ok = np.isfinite(targets)
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    for i, s in enumerate(np.atleast_2d(scores_per_seed)):
        if len(np.unique(targets[ok])) < 2:
            break
        fpr, tpr, _ = roc_curve(targets[ok], s[ok])
        ax.plot(fpr, tpr, lw=1, label=f"seed {i}: AUC {task_auc(targets, s):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# End-to-end fine-tuning (MedAug's second column): encoder + the same logistic heads


class _TrainView:
    """(epoch, table row) -> one augmented training view + targets (host side, in grain's workers/threads).

    `readers[k]` reads the records of split k; `where[row]` = (k, record) of each table row (-1: none)."""

    def __init__(self, readers, where, targets, augment, seed):
        self.readers, self.where, self.targets = readers, where, targets
        self.augment, self.seed = augment, seed

    def __call__(self, item):
        from cxrjax.data import augment as augment_lib

        epoch, row = item
        k, record = self.where[row]
        img = self.readers[int(k)].image(int(record))
        view = augment_lib.augment(img, self.augment, augment_lib.example_rng(self.seed, epoch, row, 0))
        return {"image": view[..., None], "targets": self.targets[row]}


def finetune(encoder, data_dir: str, rows: np.ndarray, targets: np.ndarray, *, mesh, augment, epochs: int, lr: float,
             batch_size: int, weight_decay: float = 0.0, seed: int = 0, name: str | None = None, note=print):
    """Train backbone + one logistic output per task end to end on table `rows` (the label sample).

    Adam, BatchNorm in train mode (running statistics updated), masked BCE as the probe; training views
    use `augment` (MedAug: flip + rotation), drawn per (seed, epoch, row). The global batch is
    min(batch_size, |rows|) rounded down to a multiple of the data-parallel devices, last partial
    batch of an epoch dropped. Returns (Encoder with the fine-tuned backbone, head w (d, T), head b (T,)).
    """
    import grain
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from cxrjax.data import pipeline
    from cxrjax.eval import features

    # The label sample's images: of the training split, or also of valid (external label splits such as
    # MedAug's were drawn from all of CheXpert's train.csv, part of which is our valid split)
    readers, where = [], None
    for split in ("train", "valid"):
        data = pipeline.load_prepared(data_dir, split, None, name=name)
        if where is None:
            where = np.full((len(data.record_of_row), 2), -1, np.int64)
        mine = data.record_of_row[rows] >= 0
        if mine.any():
            where[rows[mine]] = np.stack([np.full(mine.sum(), len(readers)), data.record_of_row[rows[mine]]], 1)
            readers.append(pipeline.RecordReader(data.out, data.name, split))
    if (where[rows, 0] < 0).any():
        raise ValueError("finetune: every row must belong to the training (or validation) split")
    batched, replicated = features.batch_sharding(mesh), NamedSharding(mesh, P())
    n_dev = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names]))
    b = min(batch_size, len(rows)) // n_dev * n_dev
    if b == 0:
        raise ValueError(f"finetune: {len(rows)} training images cannot fill a batch over {n_dev} devices")
    steps_per_epoch = len(rows) // b
    view = _TrainView(readers, where, np.nan_to_num(targets, nan=-1.0), augment, seed)
    order = grain.MapDataset.source(np.asarray(rows, np.int64)).shuffle(seed=seed).repeat(epochs)  # reshuffled per epoch

    def epoch_batches(e):
        n = len(rows)
        return order[e * n:(e + 1) * n].map(lambda r: (e, int(r))).map(view).batch(b, drop_remainder=True)

    if encoder.kind == "pixels":
        raise ValueError("fine-tuning needs a model: the raw-pixel baseline has none (leave it out of fine-tuning)")
    d, t = encoder.feature_dim, targets.shape[1]
    head = {"w": jnp.zeros((d, t), jnp.float32), "b": jnp.zeros((t,), jnp.float32)}
    params = {"encoder": encoder.params, "head": jax.device_put(head, replicated)}
    tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))
    graphdef = encoder.graphdef

    kind = encoder.kind

    def loss_fn(p, stats, images, y):
        # 8- and 16-bit records alike: normalised by their own maximum
        x = features.normalize_pixels(images)
        if kind == "resnet":
            model = nnx.merge(graphdef, p["encoder"], stats, copy=True)
        else:  # a ViT has no batch statistics
            model = nnx.merge(graphdef, p["encoder"], copy=True)
        feats = features.encoder_features(kind, model, x, train=True).astype(jnp.float32)
        logits = feats @ p["head"]["w"] + p["head"]["b"]
        new_stats = nnx.state(model, nnx.BatchStat) if kind == "resnet" else stats
        return _masked_bce(logits, y, (y >= 0).astype(jnp.float32)), new_stats

    def step(p, opt_state, stats, images, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, stats, images, y)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, stats, loss

    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    train_step = jax.jit(step, in_shardings=(replicated, replicated, replicated, batched, batched),
                         out_shardings=(replicated, replicated, replicated, replicated), donate_argnums=(0, 1, 2))
    # Own copies: the step donates its inputs, and the frozen encoder's buffers must stay valid.
    params, stats = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, encoder.stats)
    loss = None
    for e in range(epochs):
        for batch in epoch_batches(e):
            images = jax.make_array_from_process_local_data(batched, batch["image"])
            y = jax.make_array_from_process_local_data(batched, batch["targets"].astype(np.float32))
            params, opt_state, stats, loss = train_step(params, opt_state, stats, images, y)
        note(f"  fine-tune epoch {e + 1}/{epochs} ({steps_per_epoch} steps of {b}): loss {float(loss):.4f}")
    if loss is not None and not np.isfinite(float(loss)):
        raise FloatingPointError(f"fine-tuning diverged (loss {float(loss)}); lower config.finetune.lr")
    tuned = dataclasses.replace(encoder, params=params["encoder"], stats=stats,
                                source={**encoder.source, "finetuned": True})
    return tuned, np.asarray(params["head"]["w"]), np.asarray(params["head"]["b"])
