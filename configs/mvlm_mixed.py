r"""Masked vision-language pre-training (Wang et al. 2021) on MIXED data: paired image-report examples
plus unpaired images and unpaired reports in fixed shares of every batch (paired 1/2, image 1/4, text 1/4).

Model, losses and optimiser as configs/mvlm_paired.py. Unpaired images get only the masked vision loss,
unpaired reports only MLM; an unpaired example attends to its own modality only.

Where the unpaired data come from (the choice for a data set in which EVERY image has a report, e.g.
MIMIC-CXR): `data.paired_fraction=0.5` -- the training patients are split by a hash of the patient id;
half of them are paired (image + its report), the other half's images enter as image-only and their
reports as text-only examples, never together. Images without a report (any patient) always feed the
image stream. "Images from institution A, reports from institution B" is the override
`--config.data.paired_fraction=1.0 --config.data.text_source=reports` (reports.parquet, written by
prepare --reports, e.g. OpenI) on a data set that has unreported images (e.g. NIH14 + a reported subset).

    python -m cxrjax.main --config=configs/mvlm_mixed.py:demo --workdir=runs/mvlm-mixed-demo     # 200 steps x ~7.5 GFLOP
    python -m cxrjax.prepare --source=mimic --src=/data/mimic-cxr-jpg --out=data/mimic --size=256
    python -m cxrjax.main --config=configs/mvlm_mixed.py --config.data.dir=data/mimic --workdir=runs/mvlm-mixed
    python -m cxrjax.prepare --source=shared --src=../shared/data --out=data/shared --size=64 \
        --reports=../shared/data/iu-reports/NLMCXR_reports.tgz
    python -m cxrjax.main --config=configs/mvlm_mixed.py:demo --config.data.dir=data/shared \
        --config.data.paired_fraction=1.0 --config.data.text_source=reports --workdir=runs/mvlm-mixed-shared
    python -m cxrjax.eval.retrieval --checkpoint=runs/mvlm-mixed-demo

Variants: as configs/mvlm_paired.py. In the demo a quarter of the phantom's patients are paired (the same
ones as in mvlm_paired.py:demo); the images and the reports of the other patients enter as separate
image-only and text-only streams.
"""

from cxrjax.train.mvlm import apply_variants, default_config


def get_config(arg=None):
    c = default_config()
    c.data.shares = {"paired": 0.5, "image": 0.25, "text": 0.25}
    c.data.paired_fraction = 0.5  # the other half of the patients: unpaired images + unpaired reports
    c.data.text_source = "records"  # their own reports; 'reports' = reports.parquet of another institution
    c = apply_variants(c, arg)
    variants = (arg or "").split(",")
    if "demo" in variants:
        c.data.paired_fraction = 0.25
    if "cpu" in variants:
        c.data.paired_fraction = 0.5  # half the patients paired (the same ones in both configs)
    return c
