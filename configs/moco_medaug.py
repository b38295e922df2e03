r"""Any MedAug pair strategy, named after the colon: study-{same,different,any}_lat-{same,different,any}.

Positives always share the patient; the strategy fixes the study and the laterality (frontal/lateral).
Same settings as configs/moco_patient.py (which is `study-same_lat-any`).

    python -m cxrjax.main --config=configs/moco_medaug.py:study-different_lat-any,demo --workdir=runs/demo-diff
    python -m cxrjax.main --config=configs/moco_medaug.py:study-same_lat-same --config.data.dir=data/chexpert \
        --config.model.weights=weights/r18.safetensors --workdir=runs/medaug-same-same

Add `,hardneg` for metadata hard negatives (4 images of the same patient from other studies per query).
"""

from cxrjax.data.pairs import STRATEGIES
from cxrjax.train.contrastive import apply_variants, default_config


def get_config(arg=None):
    names = [a for a in (arg or "").split(",") if a]
    strategies = [a for a in names if a in STRATEGIES]
    if len(strategies) != 1:
        raise ValueError(f"name exactly one strategy after the colon; one of {', '.join(STRATEGIES)}")
    c = default_config()
    c.data.strategy = strategies[0]
    if "hardneg" in names:
        c.data.hard_negatives, c.data.num_hard_negatives = "patient-other-study", 4
    return apply_variants(c, ",".join(a for a in names if a not in STRATEGIES and a != "hardneg"))
