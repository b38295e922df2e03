"""The masked vision-language job end to end on a tiny phantom: train, resume = uninterrupted, and the
retrieval / regeneration eval jobs reading its checkpoint."""

import json
import shutil
from pathlib import Path

import pytest

from cxrjax.train import metrics as metrics_lib


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from cxrjax import prepare

    d = tmp_path_factory.mktemp("mvlm_phantom")
    prepare.prepare_dataset("phantom", d, patients=40, size=32, workers=1, strategies=[])
    return str(d)


def tiny_config(data_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mvlm_mixed", Path(__file__).parents[1] / "configs" / "mvlm_mixed.py")
    mixed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mixed)
    c = mixed.get_config("demo")  # the experiment file itself, shrunk
    c.data.dir = data_dir
    c.data.paired_fraction = 0.5
    c.augment.size = 32
    c.model.update(size="micro", patch=8, proj_dim=16)
    c.mask.scales = (1, 2)
    c.text.update(vocab_size=300, max_len=24)
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 4, 1, 2
    c.eval.batch_size = 16
    return c


@pytest.mark.slow
def test_train_resume_and_evaluate(phantom, tmp_path):
    import jax

    from cxrjax.eval import regeneration, retrieval
    from cxrjax.train import mvlm

    jax.config.update("jax_threefry_partitionable", True)
    work = tmp_path / "run"
    config = tiny_config(phantom)
    mvlm.train_and_evaluate(config, str(work))
    first = {d["step"]: d for d in metrics_lib.read_jsonl(work / "metrics.jsonl")}
    assert sorted(first) == [1, 2, 3, 4]
    for d in first.values():
        for k in ("loss", "mlm_loss", "mlm_acc", "mvm_loss", "mvm_loss_scale0", "mvm_loss_scale1", "itc_loss"):
            assert k in d and d[k] == d[k], k  # present and not NaN
    assert (work / "tokenizer.json").is_file() and (work / "config.json").is_file()

    # kill after step 2: drop the last checkpoint, resume -> steps 3 and 4 exactly as before
    shutil.rmtree(work / "checkpoints" / "4")
    mvlm.train_and_evaluate(tiny_config(phantom), str(work))
    again = {d["step"]: d for d in metrics_lib.read_jsonl(work / "metrics.jsonl")}
    for step in (3, 4):
        for k in ("loss", "mlm_loss", "mvm_loss", "itc_loss"):
            assert again[step][k] == first[step][k], (step, k)

    r = retrieval.evaluate(str(work), split="test")
    for direction in ("image_to_report", "report_to_image"):
        m = r["retrieval"][direction]
        assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1 and 1 <= m["mean_rank"] <= m["n_gallery"]
    assert json.loads((work / "eval_retrieval_test.json").read_text())["step"] == 4
    g = regeneration.evaluate(str(work), split="test", rows=4)
    assert set(g["scales"]) == {"1x1", "2x2"}
    for s in g["scales"].values():
        assert s["psnr_masked"] > 0 and -1 <= s["ssim"] <= 1
    assert Path(g["grid"]).stat().st_size > 1000
