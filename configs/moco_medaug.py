r"""Any MedAug pair strategy, named after the colon: study-{same,different,any}_lat-{same,different,any}.

MedAug's official run (configs/moco_patient.py, which is `study-same_lat-any`) with another positive-pair
strategy. Positives always share the patient; the strategy fixes the study and the laterality
(frontal/lateral); the query is in its own candidate set (eq. 2).

    python -m cxrjax.main --config=configs/moco_medaug.py:study-different_lat-any,demo --workdir=runs/demo-diff
    python -m cxrjax.main --config=configs/moco_medaug.py:study-same_lat-same --config.data.dir=data/chexpert \
        --config.model.weights=weights/r18.safetensors --workdir=runs/medaug-same-same       # ~1 GPU-day

MedAug's §4.3 negatives (their moco/moco/builder.py), each a variant on top of any strategy; "hard" = a
queue key with the query's laterality:
    lat-only   --negative_laterality_only: only same-laterality keys as negatives, and keys of the query's
               own patient and study left out (their false-negative mask)        [paper: 0.872]
    reweight   --target-hard-negative 0.9: same-laterality keys carry 90 % of the denominator [0.864]
    append     --append-hard-negative 0.1: 10 % of K random same-laterality keys appended   [0.875]
    synthetic  --synthesize-hard-samples: append + as many normalised mixes of two of them  [0.870]
    fn-mask    leave keys of the query's own patient and study out of the negatives (combinable)
    hardneg    metadata hard negatives: 4 images of the same patient from other studies per query
               (refused with strategies that draw positives from other studies)
and the shared variants of configs/moco_patient.py (demo, exclude-self, padded, cosine, bn-groups, sgd, crop, bf16).
"""

from cxrjax.data.pairs import STRATEGIES
from cxrjax.train.contrastive import apply_variants, default_config

NEGATIVES = {
    "lat-only": dict(hard_mode="same_laterality_only"),
    "reweight": dict(hard_mode="reweight", hard_weight=0.9),
    "append": dict(hard_mode="append", append_fraction=0.1),
    "synthetic": dict(hard_mode="synthetic", append_fraction=0.1),
    "fn-mask": dict(mask_false_negatives="study"),
}


def get_config(arg=None):
    names = [a for a in (arg or "").split(",") if a]
    strategies = [a for a in names if a in STRATEGIES]
    if len(strategies) != 1:
        raise ValueError(f"name exactly one strategy after the colon; one of {', '.join(STRATEGIES)}")
    c = default_config()
    c.data.strategy = strategies[0]
    rest = []
    for name in names:
        if name in NEGATIVES:
            c.moco.update(NEGATIVES[name])
        elif name == "hardneg":
            c.data.hard_negatives, c.data.num_hard_negatives = "patient-other-study", 4
        elif name not in STRATEGIES:
            rest.append(name)
    return apply_variants(c, ",".join(rest))
