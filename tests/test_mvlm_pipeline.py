"""The vision-language input: masking statistics per scale, fixed-share mixed batches, modality slots,
patient-level pairing, and exact resume of the iterator."""

import numpy as np
import pytest

from cxrjax.data import augment as augment_lib
from cxrjax.data import pipeline
from cxrjax.data import vl_pipeline as V
from cxrjax.text import tokenizer as T


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_block_masks_have_the_ratio_and_are_aligned_blocks(scale):
    grid, ratio = 16, 0.5
    g = grid // scale
    masks = np.stack([V.block_mask(grid, scale, ratio, np.random.default_rng(i)) for i in range(400)])
    assert masks.shape == (400, grid * grid)
    np.testing.assert_array_equal(masks.sum(1), round(ratio * g * g) * scale * scale)  # exact per example
    blocks = masks.reshape(400, g, scale, g, scale)
    assert (blocks.all(axis=(2, 4)) == blocks.any(axis=(2, 4))).all()  # each aligned block all-or-nothing
    freq = masks.mean(0)  # every patch equally likely to be masked
    assert np.abs(freq - ratio).max() < 0.1
    # the smallest ratio still masks one block
    assert V.block_mask(grid, scale, 1e-3, np.random.default_rng(0)).sum() == scale * scale


def test_mlm_masking_statistics_match_bert():
    cfg = V.MaskConfig()
    rng = np.random.default_rng(0)
    vocab, n_rep, length = 500, 2000, 40
    chosen = masked = random = kept = candidates = 0
    for _ in range(n_rep):
        n = rng.integers(10, length)
        ids = np.zeros(length, np.int32)
        ids[:n] = rng.integers(5, vocab, n)
        ids[n - 1] = T.SEP_ID
        inputs, labels = V.mlm_mask(ids, cfg, vocab, rng)
        t = labels >= 0
        assert (labels[t] == ids[t]).all() and (ids[t] >= 5).all()  # targets: ordinary word pieces only
        assert (inputs[~t] == ids[~t]).all()  # nothing else changes ([SEP], [PAD] never)
        candidates += n - 1
        chosen += t.sum()
        masked += (inputs[t] == T.MASK_ID).sum()
        kept += (inputs[t] == ids[t]).sum()
        random += ((inputs[t] != ids[t]) & (inputs[t] != T.MASK_ID)).sum()
    assert chosen / candidates == pytest.approx(0.15, abs=0.01)
    assert masked / chosen == pytest.approx(0.8, abs=0.02)
    assert random / chosen == pytest.approx(0.1, abs=0.02)  # a random piece may equal the original: ~0.2 % of 10 %
    assert kept / chosen == pytest.approx(0.1, abs=0.02)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from cxrjax import prepare

    d = tmp_path_factory.mktemp("vl_phantom")
    prepare.prepare_dataset("phantom", d, patients=40, size=32, workers=1, strategies=[])
    return str(d)


def vl_config(data_dir, shares=(("paired", 0.5), ("image", 0.25), ("text", 0.25)), fraction=0.5, batch=8,
              shards=1, process=(0, 1)):
    pc = pipeline.PipelineConfig(data_dir=data_dir, batch_size=batch, seed=3, mode="eval", num_workers=0,
                                 augment=augment_lib.AugmentConfig(size=32), process_index=process[0],
                                 process_count=process[1])
    return V.VLConfig(pipeline=pc, shares=shares, paired_fraction=fraction, max_len=24, patch=8,
                      mask=V.MaskConfig(scales=(1, 2)), batch_shards=shards)


def test_mixed_batches_have_fixed_shares_and_static_slots(phantom):
    cfg = vl_config(phantom)
    tok = T.train_tokenizer(V.tokenizer_corpus(cfg), 300)
    it = V.make_vl_dataset(cfg, tok).__iter__()
    for _ in range(3):
        b = next(it)
        np.testing.assert_array_equal(b["source"], [0, 0, 0, 0, 1, 1, 2, 2])
        assert b["image"].shape == (8, 32, 32, 1) and b["text_ids"].shape == (8, 24)
        # the fields the step is compiled for before any data exists (train.mvlm.abstract_batch)
        spec = V.example_spec(32, 24, 8)
        assert {k: ((8, *shape), dtype) for k, (shape, dtype) in spec.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
        np.testing.assert_array_equal(b["image_present"], [1, 1, 1, 1, 1, 1, 0, 0])
        np.testing.assert_array_equal(b["text_present"], [1, 1, 1, 1, 0, 0, 1, 1])
        assert not b["image"][6:].any() and not b["patch_mask"][6:].any() and (b["mask_scale"][6:] == -1).all()
        assert not b["text_valid"][4:6].any() and (b["text_labels"][4:6] == -1).all()
        assert (b["patch_mask"][:6].sum(1) == 8).all()  # 50 % of the 4x4 grid, at both scales
        assert ((b["text_labels"] >= 0) <= b["text_valid"]).all()


def test_each_batch_shard_holds_its_share_of_every_kind(phantom):
    """With 4 batch shards the batch is 4 blocks of [2 paired, 1 image, 1 text] (the step takes a kind
    with a local slice); the examples are those of the 1-shard batch, regrouped. Two processes with 2
    shards each: process p's batch is blocks 2p, 2p+1 of the same global layout."""
    tok = T.train_tokenizer(V.tokenizer_corpus(vl_config(phantom)), 300)
    batch = lambda cfg: next(V.make_vl_dataset(cfg, tok).__iter__())
    one, four = batch(vl_config(phantom, batch=16)), batch(vl_config(phantom, batch=16, shards=4))
    np.testing.assert_array_equal(four["source"], [0, 0, 1, 2] * 4)
    assert V.kind_rows({"paired": 8, "image": 4, "text": 4}, 4)["paired"].tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    order = np.array([0, 1, 8, 12, 2, 3, 9, 13, 4, 5, 10, 14, 6, 7, 11, 15])  # 1-shard row of each 4-shard row
    for k in ("row", "source", "image", "patch_mask", "text_ids", "text_labels"):
        np.testing.assert_array_equal(four[k], one[k][order], err_msg=k)
    halves = [batch(vl_config(phantom, batch=16, shards=4, process=(p, 2))) for p in range(2)]
    for h in halves:
        np.testing.assert_array_equal(h["source"], [0, 0, 1, 2] * 2)
    with pytest.raises(ValueError, match="4 image examples per batch do not split over the 8 batch shards"):
        vl_config(phantom, batch=16, shards=8)


def test_unpaired_streams_come_from_other_patients(phantom):
    cfg = vl_config(phantom)
    table = V.read_split_table(phantom, "train")
    recs = V.source_records(table, cfg.paired_fraction, cfg.pipeline.seed)
    pat = table.set_index("record")["patient_id"]
    paired = set(pat.loc[recs["paired"]])
    assert paired and not paired & set(pat.loc[recs["text"]])
    assert not set(recs["paired"]) & set(recs["image"])  # a paired image never enters as image-only
    assert set(pat.loc[recs["text"]]) <= set(pat.loc[recs["image"]])  # the unpaired patients give both
    assert len(recs["paired"]) + len(recs["image"]) == len(table)


def test_shares_must_give_whole_examples(phantom):
    with pytest.raises(ValueError, match="whole number"):
        vl_config(phantom, shares=(("paired", 0.3), ("image", 0.7)))
    with pytest.raises(ValueError, match="unknown kinds"):
        vl_config(phantom, shares=(("pairs", 1.0),))
    with pytest.raises(ValueError, match="at least 2x2 blocks"):
        V.VLConfig(pipeline=vl_config(phantom).pipeline, patch=8, mask=V.MaskConfig(scales=(1, 4)))


def test_resume_gives_the_same_next_batch(phantom):
    cfg = vl_config(phantom)
    tok = T.train_tokenizer(V.tokenizer_corpus(cfg), 300)
    it = V.make_vl_dataset(cfg, tok).__iter__()
    for _ in range(5):  # past the end of the smallest stream's epoch (reshuffled)
        next(it)
    state = it.get_state()
    expect = [next(it) for _ in range(2)]
    again = V.make_vl_dataset(cfg, tok).__iter__()
    again.set_state(state)
    for e in expect:
        got = next(again)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k], err_msg=k)


def test_reports_from_another_source(phantom, tmp_path):
    import pandas as pd
    import shutil

    d = tmp_path / "with_reports"
    shutil.copytree(phantom, d)
    pd.DataFrame({"report": ["No acute findings.", "Small left effusion.", ""]}).to_parquet(d / "reports.parquet")
    cfg = vl_config(str(d))
    cfg = V.VLConfig(pipeline=cfg.pipeline, shares=(("paired", 0.5), ("text", 0.5)), paired_fraction=1.0,
                     text_source="reports", max_len=24, patch=8, mask=V.MaskConfig(scales=(1, 2)))
    tok = T.train_tokenizer(V.tokenizer_corpus(cfg), 300)
    b = next(V.make_vl_dataset(cfg, tok).__iter__())
    np.testing.assert_array_equal(b["source"], [0, 0, 0, 0, 2, 2, 2, 2])
    texts = {T.decode(tok, np.where(b["text_labels"][i] >= 0, b["text_labels"][i], b["text_ids"][i])) for i in range(4, 8)}
    assert texts <= {"no acute findings.", "small left effusion."}


def test_16_bit_records_are_normalised_by_their_full_scale(tmp_path):
    """The same images prepared as 8-bit and as 16-bit records give the same normalised batch (to the
    8-bit rounding of the augmentation's interpolation); 16-bit pixels stay uint16 up to the device."""
    import jax.numpy as jnp
    import pandas as pd
    from PIL import Image

    from cxrjax import prepare
    from cxrjax.data import phantom
    from cxrjax.models import mvlm

    table = phantom.make_table(6, seed=1).head(8)
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for i, row in enumerate(table.itertuples()):
        Image.fromarray(phantom.render_image(table.iloc[i], size=48)).save(src / f"{i}.png")
        rows.append({"File": f"{i}.png", "PID": f"p{i}", "Report": row.report, "Split": "train"})
    pd.DataFrame(rows).to_csv(src / "meta.csv", index=False)
    mapping = "path=File,patient_id=PID,report=Report,split=Split"
    out = {}
    for bits in (8, 16):
        d = tmp_path / f"bits{bits}"
        prepare.prepare_dataset("csv", d, src=str(src / "meta.csv"), csv_mapping=mapping, size=48, bit_depth=bits,
                                workers=1, strategies=[])
        pc = pipeline.PipelineConfig(data_dir=str(d), batch_size=8, seed=3, mode="eval", num_workers=0,
                                     augment=augment_lib.AugmentConfig(size=32), process_index=0, process_count=1)
        cfg = V.VLConfig(pipeline=pc, shares=(("paired", 0.5), ("image", 0.25), ("text", 0.25)), paired_fraction=0.5,
                         max_len=24, patch=8, mask=V.MaskConfig(scales=(1, 2)))
        tok = T.train_tokenizer(list(table["report"]), 300)
        out[bits] = next(V.make_vl_dataset(cfg, tok).__iter__())
    b8, b16 = out[8], out[16]
    assert b8["image"].dtype == np.uint8 and b16["image"].dtype == np.uint16
    np.testing.assert_array_equal(b8["row"], b16["row"])  # the same examples, masks and views
    np.testing.assert_array_equal(b8["patch_mask"], b16["patch_mask"])
    x8, x16 = np.asarray(mvlm.normalize(jnp.asarray(b8["image"]))), np.asarray(mvlm.normalize(jnp.asarray(b16["image"])))
    one_level = 1 / 255 / augment_lib.CXR_STD  # one 8-bit grey level, normalised
    assert np.abs(x16 - x8).max() <= 1.01 * one_level
    assert np.abs(x16 - x8).mean() < 0.3 * one_level
    assert x16[b16["image_present"]].std() > 0.5  # real images, not blanks
    t8, t16 = mvlm.patch_targets(jnp.asarray(b8["image"]), 8), mvlm.patch_targets(jnp.asarray(b16["image"]), 8)
    flat = np.asarray(t8).std(-1) > 0.5  # per-patch normalised targets agree where a patch has contrast
    assert np.abs(np.asarray(t16) - np.asarray(t8))[flat].mean() < 0.05
