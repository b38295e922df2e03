"""The masked vision-language job end to end on a tiny phantom: train, resume = uninterrupted, and the
retrieval / regeneration eval jobs reading its checkpoint, checked against independent recomputations."""

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
    # 8 devices as 2 batch shards x 4-way tensor parallelism: the 4 paired + 2 image + 2 text rows split
    # over the batch shards (every kind over every shard), and the job runs on a model axis end to end
    c.mesh.update(data=2, model=4)
    c.eval.batch_size = 16
    return c


@pytest.mark.slow
def test_train_resume_and_evaluate(phantom, tmp_path):
    import jax

    import jax.numpy as jnp
    import numpy as np
    import pandas as pd

    from cxrjax.data import augment as augment_lib
    from cxrjax.data import vl_pipeline
    from cxrjax.eval import regeneration, retrieval
    from cxrjax.text import tokenizer as tok_lib
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

    # a second fresh run of the same seed (its own tokenizer trained again) = the first, bit for bit, over
    # every step (step 1's learning rate is 0 in the warm-up: the later steps are what test the training)
    mvlm.train_and_evaluate(tiny_config(phantom), str(tmp_path / "fresh"))
    assert (tmp_path / "fresh" / "tokenizer.json").read_text() == (work / "tokenizer.json").read_text()
    second = {d["step"]: d for d in metrics_lib.read_jsonl(tmp_path / "fresh" / "metrics.jsonl")}
    assert first[3]["lr"] > 0 and first[4]["loss"] != first[1]["loss"]
    for step in (1, 2, 3, 4):
        for k in ("loss", "mlm_loss", "mvm_loss", "itc_loss", "grad_norm", "lr"):
            assert second[step][k] == first[step][k], (step, k)

    # kill after step 2: drop the last checkpoint, resume -> steps 3 and 4 exactly as before
    shutil.rmtree(work / "checkpoints" / "4")
    mvlm.train_and_evaluate(tiny_config(phantom), str(work))
    again = {d["step"]: d for d in metrics_lib.read_jsonl(work / "metrics.jsonl")}
    for step in (3, 4):
        for k in ("loss", "mlm_loss", "mvm_loss", "itc_loss"):
            assert again[step][k] == first[step][k], (step, k)

    # Retrieval, recomputed independently: the test images with a report, the distinct reports, one
    # unbatched forward pass each, cosine similarities, ranks by sorting.
    r = retrieval.evaluate(str(work), split="test")
    assert json.loads((work / "eval_retrieval_test.json").read_text())["step"] == 4
    cfg, data_dir, tok, model, step = mvlm.load_run(str(work))
    assert step == 4
    held = vl_pipeline.load_eval_split(data_dir, "test", augment_lib.AugmentConfig.from_dict(cfg.augment))
    table = pd.read_parquet(Path(phantom) / "table.parquet")
    test_reports = table.loc[table["split"] == "test", "report"].fillna("")
    keep = [i for i, rep in enumerate(held["report"]) if rep.strip()]
    reports = [held["report"][i] for i in keep]
    distinct = list(dict.fromkeys(reports))
    assert len(keep) == int((test_reports.str.strip() != "").sum()) and set(distinct) == set(test_reports) - {""}
    img = np.asarray(model.image_proj(model.embed_image(jnp.asarray(held["image"][keep]))))
    ids, valid = tok_lib.encode(tok, distinct, cfg.text.max_len)
    txt = np.asarray(model.text_proj(model.embed_text(jnp.asarray(ids), jnp.asarray(valid))))
    sim = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    truth = np.array([distinct.index(rep) for rep in reports])
    rank = np.array([1 + (row > row[t] + 1e-6).sum() for row, t in zip(sim, truth)])  # 1e-6: float noise of batching
    i2r = r["retrieval"]["image_to_report"]
    assert (i2r["n_queries"], i2r["n_gallery"]) == (len(keep), len(distinct))
    for k in (1, 5, 10):
        assert i2r[f"R@{k}"] == pytest.approx((rank <= k).mean(), abs=1.5 / len(keep)), k
    assert i2r["mean_rank"] == pytest.approx(rank.mean(), rel=0.02)
    assert r["retrieval"]["report_to_image"]["n_queries"] == len(distinct)

    # Regeneration: the "true patch mean" baseline is a closed form -- PSNR over the masked pixels of
    # 255^2 / (the pixels' variance around their own patch mean) -- recomputed here from the images.
    g = regeneration.evaluate(str(work), split="test", rows=4)
    assert set(g["scales"]) == {"1x1", "2x2"} and g["n_images"] == len(held["image"])
    grid, patch = cfg.augment.size // cfg.model.patch, cfg.model.patch
    x = held["image"][..., 0].astype(np.float64)
    n = len(x)
    patches = x.reshape(n, grid, patch, grid, patch).transpose(0, 1, 3, 2, 4).reshape(n, grid * grid, patch * patch)
    sq_dev = ((patches - patches.mean(-1, keepdims=True)) ** 2).mean(-1)  # (n, patches)
    for s in (1, 2):
        masks = np.stack([vl_pipeline.block_mask(grid, s, cfg.mask.image_ratio, np.random.default_rng([cfg.seed, int(r_), s]))
                          for r_ in held["row"]])
        expect = np.mean(10 * np.log10(255.0**2 / np.maximum((sq_dev * masks).sum(1) / masks.sum(1), 1e-12)))
        got = g["scales"][f"{s}x{s}"]
        assert got["baseline_patch_mean"]["psnr_masked"] == pytest.approx(expect, rel=1e-3)
        assert got["psnr_masked"] != got["baseline_patch_mean"]["psnr_masked"]  # the model's prediction is used
    assert Path(g["grid"]).stat().st_size > 1000
