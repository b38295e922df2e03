"""Is pre-training working? A label probe that watches the encoder while it trains.

Every `config.probe.every` steps the query encoder's backbone (eval mode, running BN statistics) embeds
a fixed labelled subset of a held-out split (`config.probe.split`, default valid; up to `max_images`
images with a 0/1 label for `task` -- MedAug's policy: uncertain left out, blank = negative), and two
cheap probes score it with 2-fold cross-fitting over patients (fit on one half of the patients, score
the other, and back), so every image gets an out-of-fold score:

    probe_knn_auc / probe_knn_acc   k nearest neighbours by cosine similarity (k = `knn_k`), score =
                                    share of positive neighbours; accuracy at 0.5
    probe_logistic_auc              L2 logistic regression on standardised features (scikit-learn)

The images stay on the device (uint8, batch-sharded like the train step); one jitted forward per
probe; only the (n, d) features come to the host. Logged to metrics.jsonl and TensorBoard with the loss.
The linear-evaluation job remains the measurement; this is the gauge on the dashboard.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cxrjax.data import augment as augment_lib
from cxrjax.data import pipeline, schema
from cxrjax.train import mesh as mesh_lib


def default_probe_config():
    import ml_collections as mlc

    return mlc.ConfigDict(dict(
        every=0,  # steps between probes; 0 = off
        split="valid", task="Pleural Effusion", max_images=512, knn_k=10, l2=1.0, seed=0,
    ))


@dataclasses.dataclass
class OnlineProbe:
    every: int
    images: jax.Array      # (n_pad, S, S, 1) uint8/uint16, batch-sharded
    labels: np.ndarray     # (n,) 0/1
    folds: np.ndarray      # (n,) 0/1: patient-level halves
    forward: object        # jitted (params, stats, images) -> (n_pad, d)
    knn_k: int
    l2: float

    @classmethod
    def build(cls, config, data_dir: str, mesh, graphdef, note=lambda s: None) -> "OnlineProbe | None":
        pc = config.get("probe")
        if pc is None or not pc.every:
            return None
        if pc.task not in schema.CHEXPERT_LABELS:
            raise ValueError(f"config.probe.task={pc.task!r}; expected one of the CheXpert labels")
        aug = augment_lib.AugmentConfig.from_dict({**dict(config.augment), "where": "host"})
        data = pipeline.load_prepared(data_dir, pc.split, None, name=config.data.get("name"))
        column = schema.CHEXPERT_LABELS.index(pc.task)
        y = data.labels[data.split_rows, column]
        y = np.where(np.isnan(y), 0.0, y)  # MedAug: blank = negative, uncertain (-1) left out
        usable = np.flatnonzero(y >= 0)
        rng = np.random.default_rng(pc.seed)
        chosen = np.sort(rng.permutation(usable)[:pc.max_images])
        labels = y[chosen].astype(np.int64)
        if len(chosen) < 20 or labels.min() == labels.max():
            note(f"online probe off: split {pc.split!r} has {len(chosen)} images labelled for {pc.task!r} "
                 f"({int(labels.sum()) if len(labels) else 0} positive)")
            return None
        reader = pipeline.open_reader(data)
        stack = []
        for record in chosen:
            image, box = reader.image_and_box(int(record))
            stack.append(augment_lib.eval_transform(image, aug, box))
        shards = mesh_lib.num_batch_shards(mesh)
        n_pad = -(-len(stack) // shards) * shards
        imgs = np.zeros((n_pad, aug.size, aug.size, 1), stack[0].dtype)
        imgs[:len(stack), ..., 0] = np.stack(stack)
        batched = NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))
        replicated = NamedSharding(mesh, P())
        patient = data.codes["patient"][data.split_rows[chosen]]
        folds = (np.asarray([hash_fold(int(p), pc.seed) for p in patient])).astype(np.int64)

        def forward(params, stats, images):
            model = nnx.merge(graphdef, params, stats, copy=True)
            x = augment_lib.normalize(images, max_value=255.0 if images.dtype == jnp.uint8 else 65535.0)
            return model.features(x, train=False).astype(jnp.float32)

        note(f"online probe every {pc.every} steps: {len(chosen)} {pc.split} images, {int(labels.sum())} positive "
             f"for {pc.task}, {len(set(patient.tolist()))} patients")
        return cls(every=int(pc.every), images=jax.device_put(imgs, batched), labels=labels, folds=folds,
                   forward=jax.jit(forward, in_shardings=(replicated, replicated, batched)), knn_k=int(pc.knn_k),
                   l2=float(pc.l2))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, state) -> dict[str, float]:
        """Probe a MoCo train state's query encoder."""
        feats = np.asarray(jax.device_get(self.forward(state.q_params, state.q_stats, self.images)))
        return probe_metrics(feats[:len(self.labels)], self.labels, self.folds, k=self.knn_k, l2=self.l2)


def hash_fold(patient_code: int, seed: int) -> int:
    """0 or 1: which half a patient's images are in (a fixed function of the patient and the seed)."""
    from cxrjax.data import pairs

    return int(pairs._splitmix64_int((patient_code * 0x9E3779B1 + seed) & pairs._M64) >> 63)


def probe_metrics(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, *, k: int = 10,
                  l2: float = 1.0) -> dict[str, float]:
    """Out-of-fold kNN and logistic-regression scores of `features` (2-fold over `folds`) -> AUCs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    knn = np.zeros(len(labels))
    logit = np.zeros(len(labels))
    for f in (0, 1):
        fit, score = folds != f, folds == f
        if not score.any() or len(set(labels[fit].tolist())) < 2:
            return {}
        sim = x[score] @ x[fit].T
        kk = min(k, int(fit.sum()))
        nearest = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        knn[score] = labels[fit][nearest].mean(1)
        mu, sd = features[fit].mean(0), features[fit].std(0) + 1e-6
        clf = LogisticRegression(C=1.0 / l2, max_iter=200)
        clf.fit((features[fit] - mu) / sd, labels[fit])
        logit[score] = clf.decision_function((features[score] - mu) / sd)
    if labels.min() == labels.max():
        return {}
    return {"probe_knn_auc": float(roc_auc_score(labels, knn)),
            "probe_knn_acc": float(np.mean((knn >= 0.5) == labels)),
            "probe_logistic_auc": float(roc_auc_score(labels, logit))}
