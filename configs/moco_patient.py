r"""MedAug's best strategy: positives = same patient, same study, all lateralities (study-same_lat-any).

Paper settings (Vu et al. 2021): ResNet-18 from ImageNet, MoCo v2 head, Adam 1e-4 (wd 1e-4), batch 16,
20 epochs, 320 px, horizontal flip + rotation +-10 deg, queue 24,576, momentum 0.999, T = 0.2.

    python -m cxrjax.main --config=configs/moco_patient.py:demo --workdir=runs/demo      # ~2 min, 2 CPU cores
    python -m cxrjax.prepare --source=chexpert --src=/data/CheXpert --out=data/chexpert --size=320
    python -m cxrjax.tools.import_torchvision resnet18-f37072fd.pth weights/r18.safetensors --in_channels 1
    python -m cxrjax.main --config=configs/moco_patient.py --config.data.dir=data/chexpert \
        --config.model.weights=weights/r18.safetensors --workdir=runs/medaug-patient

Variants after the colon (comma-separated): demo, sgd (MoCo v2's SGD 0.03 x batch/256 + cosine),
crop (random crop scale [0.95, 1], MedAug's best row), bf16.
"""

from cxrjax.train.contrastive import apply_variants, default_config


def get_config(arg=None):
    c = default_config()
    c.data.strategy = "study-same_lat-any"
    return apply_variants(c, arg)
