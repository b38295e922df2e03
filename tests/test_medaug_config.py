"""The paper configs ARE MedAug's official run: every setting checked against the numbers of the paper
and its code (../shared/docs/papers.md, "The official run, exactly"), written here, not read from
cxrjax's defaults."""

from __future__ import annotations

import pytest

from configs import moco_instance, moco_medaug, moco_patient
from cxrjax.data.pairs import STRATEGIES

# README command: -a resnet18 --lr 0.0001 --batch-size 16 --epochs 20 --mlp --moco-t 0.2 --from-imagenet
#   --aug-setting chexpert --rotate 10 --maintain-ratio, one GPU; main_moco.py defaults: --moco-k 24576,
#   --moco-m 0.999, --moco-dim 128, Adam (betas 0.9, 0.999) wd 1e-4, --schedule 12 18 24 (x0.1), no --cos,
#   --img-size 320 --crop 320; image_transform.py: mean .5020, std .085585.
PAPER = {
    "model.arch": "resnet18", "model.init": "imagenet", "model.hidden_dim": 512, "model.embed_dim": 128,
    "model.width": 64, "moco.temperature": 0.2, "moco.queue_size": 24576, "moco.momentum": 0.999,
    "optim.name": "adam", "optim.lr": 1e-4, "optim.weight_decay": 1e-4, "optim.b1": 0.9, "optim.b2": 0.999,
    "optim.schedule": "step", "optim.milestones": (12, 18, 24), "optim.decay": 0.1, "optim.warmup_steps": 0,
    "optim.scale_by_batch": False, "batch_size": 16, "epochs": 20, "total_steps": 0,
    "augment.size": 320, "augment.geometry": "shorter_side_crop", "augment.rotation": 10.0,
    "augment.hflip_prob": 0.5, "augment.brightness": 0.0, "augment.contrast": 0.0, "augment.blur_prob": 0.0,
    "augment.eval_crop": 1.0,
    # one GPU: BN statistics over the whole batch of 16 per encoder
    "moco.shuffle_bn_groups": 1,
    # eq. 2: the query is in its own candidate set; no metadata negatives, no masking (hard_negative=random)
    "data.include_self": True, "data.hard_negatives": None, "moco.hard_mode": "none",
    "moco.mask_false_negatives": "none",
}


def _get(config, dotted):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("make", [lambda: moco_patient.get_config(), lambda: moco_instance.get_config(),
                                  *[(lambda s=s: moco_medaug.get_config(s)) for s in STRATEGIES if s != "instance"]])
def test_paper_configs_are_the_official_run(make):
    config = make()
    wrong = {k: (_get(config, k), v) for k, v in PAPER.items() if _get(config, k) != v}
    assert not wrong, f"differs from MedAug's run (config, paper): {wrong}"


def test_strategies_and_normalisation():
    from cxrjax.data import augment

    assert moco_patient.get_config().data.strategy == "study-same_lat-any"  # their --same-patient --same-study
    assert moco_instance.get_config().data.strategy == "instance"
    assert moco_medaug.get_config("study-different_lat-same").data.strategy == "study-different_lat-same"
    assert (augment.CXR_MEAN, augment.CXR_STD) == (0.5020, 0.085585)


@pytest.mark.parametrize("variant, key, value", [
    ("exclude-self", "data.include_self", False), ("padded", "augment.geometry", "resized_crop"),
    ("cosine", "optim.schedule", "cosine"), ("bn-groups", "moco.shuffle_bn_groups", 8),
    ("crop", "augment.crop_scale", (0.95, 1.0))])
def test_cxrjax_choices_are_named_variants(variant, key, value):
    config = moco_patient.get_config(variant)
    assert _get(config, key) == value
    differs = [k for k, v in PAPER.items() if _get(config, k) != v]
    assert differs == [key] or (variant in ("padded", "crop") and differs == ["augment.geometry"]), differs


@pytest.mark.parametrize("variant, mode", [("lat-only", "same_laterality_only"), ("reweight", "reweight"),
                                           ("append", "append"), ("synthetic", "synthetic")])
def test_hard_negative_variants(variant, mode):
    c = moco_medaug.get_config(f"study-same_lat-any,{variant}")
    assert c.moco.hard_mode == mode
    assert (c.moco.hard_weight, c.moco.append_fraction) == (0.9, 0.1)  # --target-hard-negative 0.9 / README 0.1
    assert moco_medaug.get_config("study-same_lat-any,fn-mask").moco.mask_false_negatives == "study"


def test_step_schedule_decays_at_epochs_12_and_18():
    from cxrjax.train import contrastive

    c = moco_patient.get_config()
    schedule = contrastive.learning_rate(c, total_steps=2000, steps_per_epoch=100)
    lr = {step: float(schedule(step)) for step in (0, 1199, 1200, 1799, 1800, 1999)}
    assert lr[0] == lr[1199] == pytest.approx(1e-4)
    assert lr[1200] == lr[1799] == pytest.approx(1e-5)
    assert lr[1800] == lr[1999] == pytest.approx(1e-6)
    cos = contrastive.learning_rate(moco_patient.get_config("cosine"), total_steps=2000, steps_per_epoch=100)
    assert float(cos(1000)) == pytest.approx(0.5e-4, rel=1e-3)


def test_metadata_hard_negatives_with_positives_from_other_studies_are_refused(tmp_path):
    from cxrjax.train import contrastive

    c = moco_medaug.get_config("study-any_lat-any,hardneg")
    with pytest.raises(ValueError, match=r"hard_negatives='patient-other-study'.*strategy='study-any_lat-any'"):
        contrastive.pipeline_config(c, str(tmp_path))
    ok = moco_medaug.get_config("study-same_lat-any,hardneg")
    assert contrastive.pipeline_config(ok, str(tmp_path)).hard_negatives == "patient-other-study"
