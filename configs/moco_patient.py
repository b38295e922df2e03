r"""MedAug's best strategy, exactly as the paper ran it: positives = same patient, same study, all
lateralities (study-same_lat-any), the query itself in its candidate set (eq. 2).

Every setting is the official run (stanfordmlgroup/MedAug README command + main_moco.py defaults;
../shared/docs/papers.md "The official run, exactly"): ResNet-18 from ImageNet (both encoders), MoCo v2
head 512 -> 512 -> 128, T 0.2, queue 24,576, momentum 0.999; Adam lr 1e-4 (wd 1e-4), x0.1 at epochs 12
and 18; batch 16 on one GPU, so BN statistics over the whole batch of 16 per encoder; 20 epochs;
Resize(320) of the shorter side -> flip -> rotation +-10 deg -> random 320 crop; CheXpert normalisation.

    python -m cxrjax.main --config=configs/moco_patient.py:demo --workdir=runs/demo      # ~2 min, 2 CPU cores
    python -m cxrjax.prepare --source=chexpert --src=/data/CheXpert --out=data/chexpert --fit=shorter --size=320
    python -m cxrjax.tools.import_torchvision resnet18-f37072fd.pth weights/r18.safetensors --in_channels 1
    python -m cxrjax.main --config=configs/moco_patient.py --config.data.dir=data/chexpert \
        --config.model.weights=weights/r18.safetensors --workdir=runs/medaug-patient
        # 20 epochs x 13,963 steps of batch 16 at 320 px: ~0.6 PFLOP; a few hours on one A100

Variants after the colon (comma-separated; configs/README.md says what each changes and why): demo,
exclude-self, padded, cosine, bn-groups, sgd, crop (MedAug's random-crop-scale row), bf16.
"""

from cxrjax.train.contrastive import apply_variants, default_config


def get_config(arg=None):
    c = default_config()
    c.data.strategy = "study-same_lat-any"
    return apply_variants(c, arg)
