r"""Does a masked vision-language run learn? Its three pre-training tasks on HELD-OUT data, each next to
the baseline a model that learned nothing would reach.

    python -m cxrjax.eval.mvlm_heldout --checkpoint=runs/mvlm-mixed-cpu [--split=test]

On the held-out split (patient-level: no patient of the training split), with the eval transform:

- MLM: every held-out report, round(mask.text_prob x n) of its n word pieces replaced by [MASK]
  (fixed per row and seed; all targets masked, no BERT 10/10 noise), predicted from the text alone
  (`text_only`) and with the report's image beside it, unmasked (`with_image`). Baseline: the
  unigram-frequency predictor -- always the most frequent word piece of the TRAINING reports --, whose
  accuracy on the same targets is `unigram_acc`; `unigram_acc_expected` = sum_w p_train(w) p_heldout(w),
  the accuracy of drawing from the training unigram distribution.
- MVM: every held-out image, for each mask scale a fixed mask (seeded by the run's seed, the row and
  the scale, as `cxrjax.eval.regeneration`) of mask.image_ratio of the patches; MSE on the masked
  patches in the training target's normalisation, image alone (`image_only`) and with its report
  (`with_report`, rows that have one). Baseline: predicting each masked patch's own mean (0 in the
  per-patch-normalised target: `patch_mean_baseline`, 1 - eps; with norm_pix=False the patch mean itself).
- Retrieval (`cxrjax.eval.retrieval.both_directions`) with exact chance levels: image->report R@k
  by chance = k / (distinct reports); report->image R@k by chance = 1 - C(n-r, k) / C(n, k) averaged
  over queries with r relevant images among n.

The linear probe against raw pixels and a random ViT is `cxrjax.linear_eval` (same table as MoCo runs).
Writes WORKDIR/eval_heldout_<split>.json.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np

from cxrjax import cli
from cxrjax.text import tokenizer as tok_lib
from cxrjax.train import workdir as workdir_lib


def unigram_baseline(train_ids: list[np.ndarray], target_ids: np.ndarray) -> dict:
    """Accuracy on `target_ids` of the most frequent training word piece, and of sampling from the
    training unigram distribution (special tokens excluded)."""
    counts = Counter(int(i) for ids in train_ids for i in ids if i >= len(tok_lib.SPECIAL_TOKENS))
    if not counts or len(target_ids) == 0:
        raise ValueError("unigram baseline: no training word pieces or no held-out targets")
    top, _ = counts.most_common(1)[0]
    total = sum(counts.values())
    held = Counter(int(t) for t in target_ids)
    expected = sum(counts[w] / total * n / len(target_ids) for w, n in held.items())
    return {"unigram_piece": int(top), "unigram_acc": float(np.mean(target_ids == top)),
            "unigram_acc_expected": float(expected)}


def chance_recall(n_gallery: int, relevant: np.ndarray, k: int) -> float:
    """Expected R@k of random scores: per query with r relevant among n, P(some relevant in the top k)."""
    out = []
    for r in np.asarray(relevant, int):
        k_ = min(k, n_gallery)
        out.append(1.0 - math.comb(n_gallery - r, k_) / math.comb(n_gallery, k_) if n_gallery - r >= k_ else 1.0)
    return float(np.mean(out))


def _mlm_targets(ids: np.ndarray, valid: np.ndarray, prob: float, seed: int, rows: np.ndarray):
    """All-[MASK] corruption of round(prob x n) word pieces per report (>= 1), fixed per (seed, row)."""
    inputs, labels = ids.copy(), np.full_like(ids, -1)
    for i, row in enumerate(rows):
        cand = np.flatnonzero(valid[i] & (ids[i] >= len(tok_lib.SPECIAL_TOKENS)))
        if len(cand) == 0:
            continue
        rng = np.random.default_rng([seed, int(row), 7])
        chosen = rng.choice(cand, max(1, int(round(prob * len(cand)))), replace=False)
        labels[i, chosen] = ids[i, chosen]
        inputs[i, chosen] = tok_lib.MASK_ID
    return inputs, labels


def _batched(fn, arrays, batch_size):
    n = len(arrays[0])
    out = []
    for s in range(0, n, batch_size):
        chunk = [a[s : s + batch_size] for a in arrays]
        pad = batch_size - len(chunk[0])  # one compiled shape
        if pad:
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
        res = fn(*chunk)
        out.append(jax_tree_slice(res, batch_size - pad))
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def jax_tree_slice(res: dict, n: int) -> dict:
    return {k: np.asarray(v)[:n] for k, v in res.items()}


def evaluate(workdir: str, split: str | None = None, step: int | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cxrjax.data import augment as augment_lib
    from cxrjax.data import vl_pipeline
    from cxrjax.eval import retrieval
    from cxrjax.models import mvlm
    from cxrjax.train import mvlm as train_mvlm

    config, data_dir, tokenizer, model, step = train_mvlm.load_run(workdir, step)
    split = split or config.eval.split
    aug = augment_lib.AugmentConfig.from_dict(config.augment)
    held = vl_pipeline.load_eval_split(data_dir, split, aug, config.data.name)
    images, n = held["image"], len(held["image"])
    L, grid, patch = config.text.max_len, aug.size // config.model.patch, config.model.patch
    bs = config.eval.batch_size
    has_report = np.array([bool(r.strip()) for r in held["report"]])
    ids, valid = tok_lib.encode(tokenizer, held["report"], L)
    valid &= has_report[:, None]
    graphdef, params = nnx.split(model)
    result = {"workdir": str(workdir_lib.workdir_path(workdir)), "step": step, "split": split, "n_images": n,
              "n_reports": int(has_report.sum())}

    # -- MLM ---------------------------------------------------------------------------------------
    @jax.jit
    def mlm_pass(params, image, present, inputs, valid, labels):
        m = nnx.merge(graphdef, params)
        _, txt = m(image, present, jnp.zeros((image.shape[0], grid * grid), bool), inputs, valid)
        logits = m.mlm_logits(txt)
        w = labels >= 0
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(labels, 0)[..., None], -1)[..., 0]
        return {"correct": (logits.argmax(-1) == labels) & w, "ce": jnp.where(w, ce, 0.0)}

    r = np.flatnonzero(has_report)
    inputs, labels = _mlm_targets(ids[r], valid[r], config.mask.text_prob, config.seed, held["row"][r])
    targets = labels[labels >= 0]
    mlm = {"n_targets": int(len(targets))}
    for name, present in (("text_only", np.zeros(len(r), bool)), ("with_image", np.ones(len(r), bool))):
        img = np.where(present[:, None, None, None], images[r], 0).astype(images.dtype)
        out = _batched(lambda *a: mlm_pass(params, *a), [img, present, inputs, valid[r], labels], bs)
        mlm[f"acc_{name}"] = float(out["correct"].sum() / len(targets))
        mlm[f"loss_{name}"] = float(out["ce"].sum() / len(targets))
    train = vl_pipeline.read_split_table(data_dir, config.data.split)
    train_reports = [t for t in train["report"] if t.strip()]
    train_ids, train_valid = tok_lib.encode(tokenizer, train_reports, L)
    mlm.update(unigram_baseline([i[v] for i, v in zip(train_ids, train_valid)], targets))
    result["mlm"] = mlm

    # -- MVM ---------------------------------------------------------------------------------------
    @jax.jit
    def mvm_pass(params, image, patch_mask, text_ids, text_valid):
        m = nnx.merge(graphdef, params)
        states, _ = m(image, jnp.ones((image.shape[0],), bool), patch_mask, text_ids, text_valid)
        err = ((m.regenerate(states) - mvlm.patch_targets(image, patch, config.model.norm_pix)) ** 2).mean(-1)
        base = (mvlm.patch_targets(image, patch, config.model.norm_pix) - _patch_mean(image, patch,
                                                                                   config.model.norm_pix)) ** 2
        return {"err": jnp.where(patch_mask, err, 0.0), "base": jnp.where(patch_mask, base.mean(-1), 0.0),
                "n": patch_mask.sum(-1)}

    mvm = {}
    no_text = np.zeros_like(valid)
    for s in (int(x) for x in config.mask.scales):
        masks = np.stack([vl_pipeline.block_mask(grid, s, config.mask.image_ratio,
                                                 np.random.default_rng([config.seed, int(row), s])) for row in held["row"]])
        entry = {}
        for name, rows, tv in (("image_only", np.arange(n), no_text), ("with_report", r, valid)):
            out = _batched(lambda *a: mvm_pass(params, *a), [images[rows], masks[rows], ids[rows], tv[rows]], bs)
            entry[f"loss_{name}"] = float(out["err"].sum() / out["n"].sum())
            entry[f"patch_mean_baseline_{name}"] = float(out["base"].sum() / out["n"].sum())
        mvm[f"{s}x{s}"] = entry
    result["mvm"] = mvm

    # -- retrieval ---------------------------------------------------------------------------------
    if len(r) >= 2:
        reports = [held["report"][i] for i in r]
        distinct, of_image = retrieval.report_groups(reports)
        project = config.loss.itc > 0
        d_ids, d_valid = tok_lib.encode(tokenizer, distinct, L)
        img = retrieval.image_features(model, images[r], bs, project)
        txt = retrieval.text_features(model, d_ids, d_valid, bs, project)
        ret = retrieval.both_directions(img, txt, of_image)
        per_report = np.bincount(of_image, minlength=len(distinct))
        for k in retrieval.KS:
            ret["image_to_report"][f"chance_R@{k}"] = min(1.0, k / len(distinct))
            ret["report_to_image"][f"chance_R@{k}"] = chance_recall(len(r), per_report, k)
        result["retrieval"] = ret
    out_path = workdir_lib.workdir_path(workdir) / f"eval_heldout_{split}.json"
    out_path.write_text(json.dumps(result, indent=1))
    return result


def _patch_mean(image, patch: int, norm_pix: bool):
    """The per-patch-mean prediction in the target's normalisation: 0 when targets are normalised per
    patch; the patch's mean pixel otherwise."""
    import jax.numpy as jnp

    from cxrjax.models import mvlm, vit

    if norm_pix:
        return jnp.zeros((1, 1, 1))
    x = vit.patchify(mvlm.normalize(image), patch)
    return x.mean(-1, keepdims=True)


def main(argv):
    from absl import flags

    del argv  # cli.parse_flags refuses positional arguments
    f = flags.FLAGS
    try:
        r = evaluate(f.checkpoint, f.split, f.step)
    except (ValueError, FileNotFoundError) as e:
        cli.fail("cxrjax.eval.mvlm_heldout", str(e), cli.EXIT_ERROR)
    print(json.dumps(r, indent=1))


def run():
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Workdir of a masked vision-language run.", required=True)
    flags.DEFINE_string("split", None, "Held-out split (default: the run's config.eval.split).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    cli.run(main, prog="cxrjax.eval.mvlm_heldout", config_flag=None)


if __name__ == "__main__":
    run()
