r"""Which features of a masked vision-language ViT does a linear probe read best? (docs/mvlm_results.md)

    python benchmarks/mvlm_probe_features.py --checkpoint=RUN --data=DATA [--task="Pleural Effusion"]
    python benchmarks/mvlm_probe_features.py --checkpoint=/tmp/run --data=/tmp/data --pretrain_steps=2   # a tiny
        # phantom (--patients) and a few steps of a tiny model first: checks the script, measures nothing

For the run's latest checkpoint, on the prepared DATA's train/test splits at the run's image size: the
patch states of an image-only unmasked pass at every depth (the encoder's input, each block, the final
normed states), mean-pooled over the patches (what `cxrjax.linear_eval` probes is the last row), the
final states pooled over a 2x2 and a 4x4 grid of patch blocks (position kept), the input embedding on
the 4x4 grid (a linear map of the pixels: what the ViT starts from), and the raw pixels area-resized to
32x32 (linear_eval's `pixels` row). Probe: scikit-learn's LogisticRegressionCV on standardised
features, L2 chosen by 5-fold AUC on the training images with folds by patient, all training labels;
AUC on the test split. Uncertain AND blank labels are left out (both splits), where linear_eval counts
blank as negative (MedAug): fewer, surer labels, so these AUCs are not linear_eval's. A second look at
which features to probe, not the evaluation: label fractions, seeds and CIs come from linear_eval.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import GroupKFold
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from cxrjax.data import augment as augment_lib, schema, vl_pipeline
from cxrjax.eval import features as features_lib

SMOKE_ARGS = ["--checkpoint={tmp}/run", "--data={tmp}/data", "--pretrain_steps=2", "--patients=120"]  # tests/test_benchmarks.py


def grid_pool(states: np.ndarray, k: int) -> np.ndarray:
    """(B, N, D) patch states on a g x g grid -> (B, k*k*D): the mean over each of k x k blocks of patches."""
    b, n, d = states.shape
    g = int(round(n ** 0.5))
    if g * g != n or g % k:
        raise ValueError(f"{n} patches do not form a square grid divisible into {k}x{k} blocks")
    return states.reshape(b, k, g // k, k, g // k, d).mean((2, 4)).reshape(b, -1)


def layer_states_fn(graphdef):
    """jitted (params, images) -> float32 patch states at every depth; the parameters are arguments (as in
    features.make_forward): not baked in as constants, and rematerialised models trace."""
    return jax.jit(lambda p, x: [h.astype(jnp.float32) for h in nnx.merge(graphdef, p).image_layer_states(x)])


def layer_states(fn, params, images: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    out = [fn(params, jnp.asarray(images[i:i + batch])) for i in range(0, len(images), batch)]
    return [np.concatenate([np.asarray(o[j]) for o in out]) for j in range(len(out[0]))]


def probe_auc(x_train, y_train, groups, x_test, y_test, seed: int = 0) -> float:
    scaler = StandardScaler().fit(x_train)
    folds = list(GroupKFold(n_splits=5).split(x_train, y_train, groups))  # a patient's images in one fold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.8: notices of 1.10 defaults
        clf = LogisticRegressionCV(Cs=8, cv=folds, scoring="roc_auc", max_iter=1000, random_state=seed)
        clf.fit(scaler.transform(x_train), y_train)
    return float(roc_auc_score(y_test, clf.decision_function(scaler.transform(x_test))))


def pretrain_tiny(workdir: str, data: str, steps: int, patients: int) -> None:
    """A phantom of `patients` at 32 px in `data` (if not prepared yet) and `steps` of configs/mvlm_mixed.py:demo
    with a micro ViT into `workdir`: something to probe, for trying the script (tests/test_benchmarks.py)."""
    from cxrjax import cli
    from cxrjax.data import prepared
    from cxrjax.train import mvlm

    if not os.path.exists(os.path.join(data, "table.parquet")):
        prepared.prepare_dataset("phantom", data, patients=patients, size=32, workers=0, strategies=[])
    c = cli.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                                          "mvlm_mixed.py") + ":demo")
    c.data.dir, c.augment.size = data, 32
    c.model.update(size="micro", patch=8, proj_dim=16)
    c.mask.scales = (1, 2)  # a 4x4 patch grid
    c.text.update(vocab_size=300, max_len=24)
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, steps, 1, steps
    mvlm.train_and_evaluate(c, workdir)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a masked vision-language WORKDIR (its latest step)")
    ap.add_argument("--data", required=True, help="a prepared data directory (train and test splits)")
    ap.add_argument("--task", default="Pleural Effusion", help="a CheXpert label")
    ap.add_argument("--pretrain_steps", type=int, default=0,
                    help="> 0: first prepare a tiny phantom in --data and train a tiny run into --checkpoint")
    ap.add_argument("--patients", type=int, default=120, help="--pretrain_steps: the phantom's size")
    a = ap.parse_args(argv)
    if a.task not in schema.CHEXPERT_LABELS:
        raise SystemExit(f"--task={a.task!r} is not a CheXpert label; one of {', '.join(schema.CHEXPERT_LABELS)}")
    t0 = time.perf_counter()
    if a.pretrain_steps > 0:
        pretrain_tiny(a.checkpoint, a.data, a.pretrain_steps, a.patients)
    encoder = features_lib.restore_encoder(a.checkpoint)
    if encoder.kind != "vit":
        raise SystemExit(f"{a.checkpoint}: a {encoder.kind} checkpoint; this probes masked vision-language ViTs")
    size = int(encoder.source["image_size"])
    column = schema.CHEXPERT_LABELS.index(a.task)
    forward = layer_states_fn(encoder.graphdef)  # one compile per batch shape for both splits
    rows = {}
    for split in ("train", "test"):
        d = vl_pipeline.load_eval_split(a.data, split, augment_lib.AugmentConfig(size=size))
        y = d["labels"][:, column]
        keep = np.isin(y, (0.0, 1.0))
        images = d["image"][keep]
        states = layer_states(forward, encoder.params, images)
        names = (["input embedding"] + [f"block {i + 1}" for i in range(len(states) - 2)] + ["final (normed)"])
        feats = {f"{n}, mean over patches": s.mean(1) for n, s in zip(names, states)}
        feats["final, 2x2 grid of means"] = grid_pool(states[-1], 2)
        feats["final, 4x4 grid of means"] = grid_pool(states[-1], 4)
        feats["input embedding, 4x4 grid of means"] = grid_pool(states[0], 4)
        pixels = features_lib.pixel_features(features_lib.PixelsSpec(32), features_lib.normalize_pixels(jnp.asarray(images)))
        feats["raw pixels 32x32 (linear_eval's `pixels`)"] = np.asarray(pixels)
        rows[split] = (feats, y[keep].astype(int), d["patient"][keep])
    (train, y_train, groups), (test, y_test, _) = rows["train"], rows["test"]
    print(f"{a.checkpoint} ({encoder.source}), {a.task}: "
          f"train {len(y_train)} images ({y_train.sum()} pos.), test {len(y_test)} ({y_test.sum()} pos.), {size} px")
    print("| features | dim | test AUC |\n|---|---|---|")
    for name in train:
        auc = probe_auc(train[name], y_train, groups, test[name], y_test)
        print(f"| {name} | {train[name].shape[1]} | {auc:.3f} |", flush=True)
    print(f"wall {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
