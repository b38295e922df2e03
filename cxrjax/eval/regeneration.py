r"""Regeneration of masked patches: PSNR / SSIM per mask scale and a PNG grid to look at.

    python -m cxrjax.eval.regeneration --checkpoint=runs/mvlm-mixed-demo [--split=test] [--rows=8]

For every held-out image and every mask scale of the run (1x1, 2x2, 4x4 patch blocks) a fixed mask
(seeded by the run's seed and the image's table row) hides `mask.image_ratio` of the patches; the model
sees the masked image (and the image's report when it has one and --with_report) and regenerates the
masked patches. With `model.norm_pix` the prediction is per-patch normalised (MAE's target): it is put
back into pixels with the TRUE patch's mean and std, as MAE's visualisations do -- so the low
frequencies are given, and the baseline to beat is "fill each masked patch with its true mean", reported
beside the model (`baseline_patch_mean`). PSNR: over the masked pixels only, 8-bit range (16-bit records
are scaled to it). SSIM: Gaussian
window (11 taps, sigma 1.5, K1 0.01, K2 0.03, Wang et al. 2004 / scikit-image's gaussian_weights=True),
mean over the windows that lie inside the image, original vs regenerated composite.
Writes WORKDIR/eval_regeneration_<split>.json and WORKDIR/regeneration_<split>.png
(rows: examples; columns: original | masked | regenerated, one mask scale per row in turn).
"""

from __future__ import annotations

import json

import numpy as np

from cxrjax import cli
from cxrjax.train import workdir as workdir_lib


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return (w / w.sum()).astype(np.float32)


def ssim(a, b, data_range: float = 255.0, size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """Mean SSIM of two batches of single-channel images (B, H, W) (jax.numpy), per image -> (B,)."""
    import jax
    import jax.numpy as jnp

    w = jnp.asarray(gaussian_window(size, sigma))

    def blur(x):  # separable Gaussian, 'valid' windows only
        x = x[:, None]  # (B, 1, H, W)
        x = jax.lax.conv_general_dilated(x, w[None, None, :, None], (1, 1), "VALID")
        return jax.lax.conv_general_dilated(x, w[None, None, None, :], (1, 1), "VALID")[:, 0]

    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(1, 2))


def psnr_masked(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """PSNR per image over the pixels where `mask` (B, H, W) is True."""
    err = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2 * mask).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)
    return 10 * np.log10(data_range**2 / np.maximum(err, 1e-12))


def to_pixels(normalised):
    """Inverse of augment.normalize (uint8 range), as float."""
    from cxrjax.data import augment as augment_lib

    return (np.asarray(normalised, np.float64) * augment_lib.CXR_STD + augment_lib.CXR_MEAN) * 255.0


def regenerate(model, images: np.ndarray, patch_mask: np.ndarray, text_ids, text_valid, norm_pix: bool,
               batch_size: int = 32):
    """-> (regenerated composite, patch-mean baseline composite), both (B, S, S) float pixels."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cxrjax.models import mvlm, vit

    graphdef, params = nnx.split(model)
    patch = model.cfg.vit.patch

    @jax.jit
    def predict(params, x, m, ids, valid):
        mdl = nnx.merge(graphdef, params)
        img_states, _ = mdl(x, jnp.ones((x.shape[0],), bool), m, ids, valid)
        return mdl.regenerate(img_states)

    outs = []
    for s in range(0, len(images), batch_size):
        sl = slice(s, s + batch_size)
        outs.append(np.asarray(predict(params, images[sl], patch_mask[sl], text_ids[sl], text_valid[sl])))
    pred = np.concatenate(outs)
    true = np.asarray(vit.patchify(mvlm.normalize(jnp.asarray(images)), patch))  # normalised pixels (uint8/uint16)
    mean, std = true.mean(-1, keepdims=True), np.sqrt(true.var(-1, keepdims=True) + 1e-6)
    pred_pix = pred * std + mean if norm_pix else pred
    m = patch_mask[..., None]
    regen = np.where(m, pred_pix, true)
    base = np.where(m, np.broadcast_to(mean, true.shape), true)
    back = lambda p: to_pixels(np.asarray(vit.unpatchify(jnp.asarray(p), patch))[..., 0]).clip(0, 255)
    return back(regen), back(base)


def evaluate(workdir: str, split: str | None = None, rows: int = 8, with_report: bool = True,
             step: int | None = None) -> dict:
    from cxrjax.data import augment as augment_lib
    from cxrjax.data import vl_pipeline
    from cxrjax.models import mvlm
    from cxrjax.text import tokenizer as tok_lib
    from cxrjax.train import mvlm as train_mvlm

    config, data_dir, tokenizer, model, step = train_mvlm.load_run(workdir, step)
    split = split or config.eval.split
    aug = augment_lib.AugmentConfig.from_dict(config.augment)
    held = vl_pipeline.load_eval_split(data_dir, split, aug, config.data.name)
    images = held["image"]
    n, grid, patch = len(images), aug.size // config.model.patch, config.model.patch
    ids, valid = tok_lib.encode(tokenizer, held["report"], config.text.max_len)
    has = np.array([bool(r.strip()) for r in held["report"]]) & with_report
    valid = valid & has[:, None]
    scales = [int(s) for s in config.mask.scales]
    result = {"workdir": str(workdir_lib.workdir_path(workdir)), "step": step, "split": split, "n_images": n,
              "with_report": bool(with_report), "images_with_report": int(has.sum()),
              "mask_ratio": config.mask.image_ratio, "norm_pix": bool(config.model.norm_pix), "scales": {}}
    shown = []
    for si, s in enumerate(scales):
        masks = np.stack([vl_pipeline.block_mask(grid, s, config.mask.image_ratio,
                                                 np.random.default_rng([config.seed, int(r), s])) for r in held["row"]])
        regen, base = regenerate(model, images, masks, ids, valid, config.model.norm_pix, config.eval.batch_size)
        pix_mask = masks.reshape(n, grid, grid).repeat(patch, 1).repeat(patch, 2)
        orig = images[..., 0].astype(np.float64) * (255.0 / mvlm.max_pixel_value(images.dtype))  # 8-bit scale
        result["scales"][f"{s}x{s}"] = {
            "psnr_masked": float(psnr_masked(orig, regen, pix_mask).mean()),
            "ssim": float(np.asarray(ssim(orig, regen)).mean()),
            "baseline_patch_mean": {"psnr_masked": float(psnr_masked(orig, base, pix_mask).mean()),
                                    "ssim": float(np.asarray(ssim(orig, base)).mean())},
        }
        for j in range(si, min(rows, n), len(scales)):
            shown.append((j, s, orig[j], np.where(pix_mask[j], 0.0, orig[j]), regen[j]))
    png = workdir_lib.workdir_path(workdir) / f"regeneration_{split}.png"
    write_grid(sorted(shown, key=lambda t: t[0]), png)
    result["grid"] = str(png)
    (workdir_lib.workdir_path(workdir) / f"eval_regeneration_{split}.json").write_text(json.dumps(result, indent=1))
    return result


def write_grid(rows, path) -> None:
    """rows of (index, scale, original, masked, regenerated) -> a PNG with one titled row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    for r, (j, s, *imgs) in enumerate(rows):
        for c, (img, title) in enumerate(zip(imgs, ("original", f"masked ({s}x{s} blocks)", "regenerated"))):
            axes[r, c].imshow(img, cmap="gray", vmin=0, vmax=255)
            axes[r, c].set_axis_off()
            axes[r, c].set_title(f"#{j} {title}" if c == 0 else title, fontsize=7)
    fig.tight_layout()
    with path.open("wb") as f:  # a local path or a gs:// URL (etils.epath)
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def main(argv):
    from absl import flags

    del argv  # cli.parse_flags refuses positional arguments
    f = flags.FLAGS
    try:
        r = evaluate(f.checkpoint, f.split, f.rows, f.with_report, f.step)
    except (ValueError, FileNotFoundError) as e:
        cli.fail("cxrjax.eval.regeneration", str(e), cli.EXIT_ERROR)
    print(json.dumps(r, indent=1))


def run():
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Workdir of a masked vision-language run.", required=True)
    flags.DEFINE_string("split", None, "Held-out split (default: the run's config.eval.split).")
    flags.DEFINE_integer("rows", 8, "Examples shown in the PNG grid.")
    flags.DEFINE_bool("with_report", True, "Give the model the image's report (when it has one).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    cli.run(main, prog="cxrjax.eval.regeneration", config_flag=None)


if __name__ == "__main__":
    run()
