r"""Plain MoCo v2 (instance discrimination): the positive is the query image under a second augmentation.

MedAug's "MoCo v2, instance discrimination" baseline: every other setting as configs/moco_patient.py
(MedAug's official run). Their code crashed in this mode (an undefined variable); cxrjax runs it.

    python -m cxrjax.main --config=configs/moco_instance.py:demo --workdir=runs/demo-instance
    python -m cxrjax.main --config=configs/moco_instance.py --config.data.dir=data/chexpert \
        --config.model.weights=weights/r18.safetensors --workdir=runs/medaug-instance
"""

from cxrjax.train.contrastive import apply_variants, default_config


def get_config(arg=None):
    c = default_config()
    c.data.strategy = "instance"
    return apply_variants(c, arg)
