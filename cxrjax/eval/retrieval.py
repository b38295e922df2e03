r"""Image <-> report retrieval and a linear probe on the masked vision-language encoder.

    python -m cxrjax.eval.retrieval --checkpoint=runs/mvlm-mixed-demo [--split=test] [--label="Pleural Effusion"]

Embeddings: the mean of the final token states of a single-modality, unmasked forward pass
(`MVLM.embed_image` / `embed_text`), passed through the ITC projection when the run trained one
(otherwise the raw pooled states), L2-normalised; similarity = cosine.
Retrieval on the held-out split's images that have a report. Reports are deduplicated (the phantom,
and real studies, give one report to several images): image->report ranks the distinct reports, the
right one being the image's; report->image ranks the images, any image of that report counting as a hit.
rank = 1 + the number of irrelevant items scored above the best relevant one.
Linear probe: scikit-learn LogisticRegression on the (unprojected) image features of the train split,
AUC (roc_auc_score) on the eval split; only rows labelled 1 (positive) or 0 (negative) are used: blank
(not mentioned / not annotated -- e.g. every COVID-collection image) and uncertain (-1) rows are left out.
Writes WORKDIR/eval_retrieval_<split>.json.
"""

from __future__ import annotations

import json

import numpy as np

from cxrjax import cli
from cxrjax.train import workdir as workdir_lib

KS = (1, 5, 10)


def ranks(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(Q, G) scores and (Q, G) bool relevance -> (Q,) rank of the best relevant item (1 = top)."""
    sim = np.asarray(similarity, np.float64)
    rel = np.asarray(relevant, bool)
    if sim.shape != rel.shape or not rel.any(axis=1).all():
        raise ValueError("every query needs at least one relevant item, and scores/relevance the same shape")
    best = np.where(rel, sim, -np.inf).max(axis=1)
    return 1 + (np.where(rel, -np.inf, sim) > best[:, None]).sum(axis=1)


def retrieval_metrics(similarity: np.ndarray, relevant: np.ndarray, ks=KS) -> dict:
    r = ranks(similarity, relevant)
    return {**{f"R@{k}": float((r <= k).mean()) for k in ks}, "mean_rank": float(r.mean()),
            "median_rank": float(np.median(r)), "n_queries": int(len(r)), "n_gallery": int(similarity.shape[1])}


def report_groups(reports: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct reports (first-seen order) and, per image, the index of its report."""
    distinct, index = [], {}
    of_image = np.array([index.setdefault(r, len(index)) for r in reports], np.int64)
    distinct = sorted(index, key=index.get)
    return distinct, of_image


def both_directions(image_emb: np.ndarray, text_emb: np.ndarray, of_image: np.ndarray) -> dict:
    """image_emb (n, d) per image; text_emb (m, d) per distinct report; of_image (n,) report of each image."""
    i = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True).clip(1e-12)
    t = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True).clip(1e-12)
    sim = i @ t.T
    rel = of_image[:, None] == np.arange(len(t))[None, :]
    return {"image_to_report": retrieval_metrics(sim, rel), "report_to_image": retrieval_metrics(sim.T, rel.T),
            "chance_R@1_image_to_report": 1.0 / len(t)}


def binary_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CheXpert column -> (y, keep): 1 positive, 0 negative; blank (NaN) and uncertain (-1) left out."""
    keep = (labels == 0) | (labels == 1)
    return (labels == 1).astype(np.int64), keep


def linear_probe(train_x, train_y, test_x, test_y, C: float = 1.0, seed: int = 0) -> dict:
    """LogisticRegression on standardised features -> test AUC (needs both classes in train and test)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for name, y in (("train", train_y), ("test", test_y)):
        if len(np.unique(y)) < 2:
            raise ValueError(f"linear probe: the {name} split has only one class ({np.unique(y)}); no AUC")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    clf.fit(train_x, train_y)
    auc = roc_auc_score(test_y, clf.predict_proba(test_x)[:, 1])
    return {"auc": float(auc), "n_train": int(len(train_y)), "n_test": int(len(test_y)),
            "train_positives": int(train_y.sum()), "test_positives": int(test_y.sum())}


# ----------------------------------------------------------------------------------------------
# Features of a trained model


def image_features(model, images: np.ndarray, batch_size: int = 64, project: bool = False) -> np.ndarray:
    """(n, S, S, 1) uint8 -> (n, D) pooled image embeddings (jitted, in batches)."""
    import jax
    from flax import nnx

    graphdef, params = nnx.split(model)

    @jax.jit
    def f(params, x):
        m = nnx.merge(graphdef, params)
        e = m.embed_image(x)
        return m.image_proj(e) if project else e

    return _batched(lambda x: f(params, x), [images], batch_size)


def text_features(model, ids: np.ndarray, valid: np.ndarray, batch_size: int = 64, project: bool = False) -> np.ndarray:
    import jax
    from flax import nnx

    graphdef, params = nnx.split(model)

    @jax.jit
    def f(params, i, v):
        m = nnx.merge(graphdef, params)
        e = m.embed_text(i, v)
        return m.text_proj(e) if project else e

    return _batched(lambda i, v: f(params, i, v), [ids, valid], batch_size)


def _batched(fn, arrays, batch_size):
    n = len(arrays[0])
    out = []
    for s in range(0, n, batch_size):
        chunk = [a[s : s + batch_size] for a in arrays]
        pad = batch_size - len(chunk[0])  # one compiled shape: pad the last batch
        if pad:
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
        out.append(np.asarray(fn(*chunk))[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate(workdir: str, split: str | None = None, label: str | None = None, step: int | None = None) -> dict:
    """Retrieval (both directions) and the linear probe of the run in `workdir`; written to JSON."""
    from cxrjax.data import augment as augment_lib
    from cxrjax.data import schema, vl_pipeline
    from cxrjax.text import tokenizer as tok_lib
    from cxrjax.train import mvlm as train_mvlm

    config, data_dir, tokenizer, model, step = train_mvlm.load_run(workdir, step)
    split = split or config.eval.split
    label = label or config.eval.label
    if label not in schema.CHEXPERT_LABELS:
        raise ValueError(f"--label={label!r} is not a CheXpert label; expected one of {schema.CHEXPERT_LABELS}")
    aug = augment_lib.AugmentConfig.from_dict(config.augment)
    bs = config.eval.batch_size
    project = config.loss.itc > 0
    held = vl_pipeline.load_eval_split(data_dir, split, aug, config.data.name)
    result = {"workdir": str(workdir_lib.workdir_path(workdir)), "step": step, "split": split, "data_dir": data_dir,
              "embedding": "mean-pooled single-modality pass" + (" + ITC projection" if project else "")}

    with_report = np.array([bool(r.strip()) for r in held["report"]])
    if with_report.sum() >= 2:
        reports = [r for r, k in zip(held["report"], with_report) if k]
        distinct, of_image = report_groups(reports)
        ids, valid = tok_lib.encode(tokenizer, distinct, config.text.max_len)
        img = image_features(model, held["image"][with_report], bs, project)
        txt = text_features(model, ids, valid, bs, project)
        result["retrieval"] = both_directions(img, txt, of_image)
    else:
        result["retrieval"] = f"skipped: split {split!r} has {int(with_report.sum())} images with a report"

    train = vl_pipeline.load_eval_split(data_dir, config.data.split, aug, config.data.name)
    col = schema.CHEXPERT_LABELS.index(label)
    ytr, ktr = binary_labels(train["labels"][:, col])
    yte, kte = binary_labels(held["labels"][:, col])
    try:
        result["linear_probe"] = {"label": label, **linear_probe(
            image_features(model, train["image"][ktr], bs), ytr[ktr],
            image_features(model, held["image"][kte], bs), yte[kte], seed=config.seed)}
    except ValueError as e:
        result["linear_probe"] = f"skipped: {e}"
    out = workdir_lib.workdir_path(workdir) / f"eval_retrieval_{split}.json"
    out.write_text(json.dumps(result, indent=1))
    return result


def main(argv):
    from absl import flags

    f = flags.FLAGS
    del argv
    try:
        r = evaluate(f.checkpoint, f.split, f.label, f.step)
    except (ValueError, FileNotFoundError) as e:
        cli.fail("cxrjax.eval.retrieval", str(e), cli.EXIT_ERROR)
    print(json.dumps(r, indent=1))


def run():
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Workdir of a masked vision-language run (config.json, "
                        "tokenizer.json, checkpoints/).", required=True)
    flags.DEFINE_string("split", None, "Held-out split (default: the run's config.eval.split).")
    flags.DEFINE_string("label", None, "CheXpert label of the linear probe (default: config.eval.label).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    cli.run(main, prog="cxrjax.eval.retrieval", config_flag=None)


if __name__ == "__main__":
    run()
