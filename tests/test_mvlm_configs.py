"""Every masked vision-language config and variant starts and trains a step at its own resolution.

Each case loads the experiment file with its variant, checks what the variant promises (size, patch
grid, mask scales, stem, dtype, remat), then shrinks the model to width 4 x heads and 2 blocks (same
heads, image size, patch grid, stem, dtype, remat and mask scales: everything that depends on the
resolution) and trains one step through `train_and_evaluate` on a small phantom resized to the
config's resolution. (Full depth only multiplies the compile time: ViT-L's 24 blocks cost minutes.) The phantom is fully reported (every image has a report): the
mixed config must find unpaired data in it by itself (`paired_fraction` < 1, its documented choice).
"""

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

from cxrjax.train import metrics as metrics_lib

CONFIGS = Path(__file__).parents[1] / "configs"


def load(name: str, variant: str):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant or None)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from cxrjax import prepare

    d = tmp_path_factory.mktemp("mvlm_cfg_phantom")
    prepare.prepare_dataset("phantom", d, patients=40, size=64, workers=1, strategies=[])
    return str(d)


# (config, variant): each config file with and without the demo, and every model variant at least once
# at the paper resolution (224 px, patch 16, 14x14 grid) and at the demo's (64 px, patch 8, 8x8 grid).
# Variants combine freely (comma-separated), so six runs cover them all (`cpu` includes `demo`).
CASES = [
    ("mvlm_paired", ""), ("mvlm_paired", "cpu"), ("mvlm_paired", "large,bf16"),
    ("mvlm_mixed", ""), ("mvlm_mixed", "small,conv,remat"), ("mvlm_mixed", "demo,conv,bf16,remat"),
]


def expected(variant: str) -> dict:
    v = set(variant.split(","))
    demo = bool(v & {"demo", "cpu"})  # cpu = the demo model, trained longer
    return {"size": next((s for s in ("small", "large") if s in v), "tiny" if demo else "base"),
            "image": 64 if demo else 224, "patch": 8 if demo else 16, "stem": "conv" if "conv" in v else "none",
            "dtype": "bfloat16" if "bf16" in v else "float32", "remat": "full" if "remat" in v else "none"}


@pytest.mark.slow
@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}:{v}" for n, v in CASES])
def test_config_trains_a_step_at_its_own_resolution(name, variant, phantom, tmp_path):
    from cxrjax.models import vit
    from cxrjax.train import mvlm

    c = load(name, variant)
    e = expected(variant)
    m = c.model
    assert (m.size, c.augment.size, m.patch, m.stem, m.dtype, m.remat) == (
        e["size"], e["image"], e["patch"], e["stem"], e["dtype"], e["remat"])
    grid = c.augment.size // m.patch
    assert all(grid % s == 0 and grid // s >= 2 for s in c.mask.scales), (grid, c.mask.scales)
    assert len(c.mask.scales) == 3  # multi-scale at every resolution
    if name == "mvlm_mixed":
        assert 0 < c.data.paired_fraction < 1 and c.data.text_source == "records"
    reports = pd.read_parquet(Path(phantom) / "table.parquet", columns=["report"])["report"]
    assert (reports.fillna("").str.strip() != "").all()  # fully reported, like MIMIC-CXR

    heads = vit.SIZES[m.size][2]
    c.model.width, c.model.depth = 4 * heads, 2  # head dim 4; heads, grid, stem, dtype unchanged
    c.data.dir = phantom
    c.data.num_workers = 0
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 1, 1, 1
    c.mesh.update(data=2, model=4)  # the 8 test devices; every kind of the mixed batch (4/2/2) splits over 2 shards
    c.text.update(vocab_size=200, max_len=32)
    work = tmp_path / "run"
    mvlm.train_and_evaluate(c, str(work))
    (row,) = metrics_lib.read_jsonl(work / "metrics.jsonl")
    assert row["step"] == 1
    for k in ("loss", "mlm_loss", "mvm_loss", "itc_loss"):
        assert math.isfinite(row[k]), k
    assert row["itc_loss"] > 0  # ITC ran on the paired rows (4 of the 8 in mixed, all 8 in paired)


def test_mixed_data_refuses_a_fully_reported_set_without_unpaired_patients(phantom, tmp_path):
    """paired_fraction=1 on a fully reported data set leaves no image-only example: one clear error."""
    from cxrjax.data import vl_pipeline
    from cxrjax.text import tokenizer as tok_lib

    c = load("mvlm_mixed", "demo")
    c.data.dir, c.data.paired_fraction = phantom, 1.0
    c.augment.size, c.batch_size = 64, 8
    cfg = vl_pipeline.config_from_dict(c, phantom)
    tok = tok_lib.train_tokenizer(["no acute findings"], 100)
    with pytest.raises(ValueError, match="every training image has a report.*paired_fraction"):
        vl_pipeline.make_vl_dataset(cfg, tok)


def test_mask_scales_that_do_not_fit_the_grid_name_the_ones_that_do(phantom):
    from cxrjax.data import vl_pipeline

    c = load("mvlm_paired", "")
    c.mask.scales = (1, 2, 4)
    with pytest.raises(ValueError, match=r"\[4\] do not divide the 14x14 patch grid.*scales that fit: 1, 2, 7"):
        vl_pipeline.config_from_dict(c, phantom)
