r"""Masked vision-language pre-training (Wang et al. 2021) on PAIRED image-report data only.

ViT-B/16 at 224 px, one stream over [CLS, patches, word pieces]; MLM (15 %, BERT 80/10/10) + multi-scale
masked vision modelling (50 % of patches in 1x1 / 2x2 / 7x7 blocks of the 14x14 patch grid -- 1/2/4 at
64 px in the demo --, MSE on normalised masked patches)
+ image-report contrastive loss (weight 0.5) on the paired rows; AdamW 1.5e-4, warmup + cosine, clip 1.

    python -m cxrjax.main --config=configs/mvlm_paired.py:demo --workdir=runs/mvlm-paired-demo   # 200 steps x ~11 GFLOP
    python -m cxrjax.prepare --source=mimic --src=/data/mimic-cxr-jpg --out=data/mimic --size=256
    python -m cxrjax.main --config=configs/mvlm_paired.py --config.data.dir=data/mimic --workdir=runs/mvlm-paired
    python -m cxrjax.eval.retrieval --checkpoint=runs/mvlm-paired-demo        # R@1/5/10, mean rank, linear probe
    python -m cxrjax.eval.regeneration --checkpoint=runs/mvlm-paired-demo     # PSNR/SSIM + PNG grid

Variants after the colon (comma-separated): demo (phantom; tiny ViT, 64 px, patch 8, 200 steps), bf16,
conv (patch-local CNN stem), small / large (ViT-S/16, ViT-L/16), remat (rematerialise every block: less
activation memory for ~1/3 more compute). Every config and variant trains a step at its own resolution
in tests/test_mvlm_configs.py (narrow width, same depth, patch grid, stem and dtype). The demo pairs only a quarter of the patients
(`data.paired_fraction=0.25`) so that it trains on exactly the paired part of configs/mvlm_mixed.py:demo.
Measured wall time of the demo: 20-25 min on the shared 2-core CPU with a load average of 14-22
(other jobs running); it is compute-bound (XLA:CPU), so an idle machine is several times faster.
"""

from cxrjax.train.mvlm import apply_variants, default_config


def get_config(arg=None):
    c = default_config()
    c.data.shares = {"paired": 1.0}
    c.data.paired_fraction = 1.0
    c = apply_variants(c, arg)
    variants = (arg or "").split(",")
    if "demo" in variants:
        c.data.paired_fraction = 0.25
    if "cpu" in variants:
        c.data.paired_fraction = 0.5  # half the patients paired (the same ones in both configs)
    return c
