"""Records that keep the aspect ratio (prepare --fit=shorter) and the content box every record carries:
MedAug's geometry crops the image itself, never the black around it, on the host and on the device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrjax import prepare
from cxrjax.data import augment as A
from cxrjax.data import device_augment as D
from cxrjax.data import images, pipeline

SIZE = 32  # shorter side; the canvas is round(32 x 1.25) = 40
SHAPES = [(48, 36), (36, 54), (40, 40), (90, 40), (33, 60), (60, 33)]  # (h, w): portrait, landscape, square, long


def _smooth(h, w, seed):
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    return np.clip(110 + 70 * np.sin(4 * x + 3 * y + seed) + 40 * np.cos(5 * y), 1, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("aspect")
    (root / "img").mkdir()
    rows = []
    for i, (h, w) in enumerate(SHAPES * 2):
        Image.fromarray(_smooth(h, w, i)).save(root / f"img/{i:02d}.png")
        rows.append({"File": f"img/{i:02d}.png", "PID": f"P{i}", "Exam": "E0", "View": "PA"})
    pd.DataFrame(rows).to_csv(root / "list.csv", index=False)
    outs = {}
    for pixels in ("png", "raw"):
        out = root / f"out-{pixels}"
        prepare.prepare_dataset("csv", out, src=root / "list.csv", csv_mapping="path=File,patient_id=PID,study_id=Exam,view=View",
                                size=SIZE, fit="shorter", pixels=pixels, workers=1, strategies=["instance"])
        outs[pixels] = out
    return root, outs


def _records(out):
    table = pd.read_parquet(out / "table.parquet")
    found = []
    for split in ("train", "valid", "test"):
        part = table[table["split"] == split]
        if not len(part):
            continue
        reader = pipeline.RecordReader(out, "csv", split)
        for _, row in part.iterrows():
            found.append((row["path"], *reader.image_and_box(int(row["record"]))))
    return found


@pytest.mark.parametrize("pixels", ["png", "raw"])
def test_shorter_fit_keeps_the_aspect_and_records_the_box(prepared, pixels):
    root, outs = prepared
    records = _records(outs[pixels])
    assert len(records) == 2 * len(SHAPES)
    for path, image, box in records:
        h, w = np.asarray(Image.open(root / path)).shape
        assert image.shape == (40, 40) and image.dtype == np.uint8
        top, left, bh, bw = (int(v) for v in box)
        scale = SIZE / min(h, w)
        assert min(bh, bw) == SIZE  # the shorter side is the training size
        assert max(bh, bw) == min(round(max(h, w) * scale), 40)  # the longer side kept up to 1.25 x
        assert (top, left) == ((40 - bh) // 2, (40 - bw) // 2)  # centred
        inside = np.zeros_like(image, bool)
        inside[top:top + bh, left:left + bw] = True
        assert (image[~inside] == 0).all() and (image[inside] > 0).all()  # black only around the image


def test_eval_transform_centre_crops_the_content(prepared):
    """Eval (MedAug: Resize(size) -> CenterCrop(size)) of a stored record = of the original file."""
    root, outs = prepared
    cfg = A.AugmentConfig(size=SIZE, geometry="shorter_side_crop")
    for path, image, box in _records(outs["png"]):
        original = np.asarray(Image.open(root / path))
        direct = A.eval_transform(images.fit_image(original, SIZE, "crop"), cfg).astype(float)
        stored = A.eval_transform(image, cfg, box).astype(float)
        assert np.abs(stored - direct).mean() < 1.0, path


def test_device_views_stay_inside_the_content_box(prepared):
    """On-device augmentation of `shorter` records with their boxes: no view of an image whose
    content fills the crop window ever shows the black margin (host path: the same geometry)."""
    _, outs = prepared
    records = _records(outs["raw"])
    imgs = jnp.asarray(np.stack([r[1] for r in records]))
    boxes = jnp.asarray(np.stack([r[2] for r in records]).astype(np.float32))
    cfg = A.AugmentConfig(size=SIZE, geometry="shorter_side_crop", rotation=0.0, hflip_prob=0.5)
    seeds = jnp.asarray(np.stack([A.view_seed(0, 0, i, 0) for i in range(len(records))]))
    views = np.asarray(D.augment_batch(imgs, seeds, cfg, boxes))[..., 0]
    zero = (0 - A.CXR_MEAN) / A.CXR_STD
    assert views.shape == (len(records), SIZE, SIZE)
    assert (views[:, 1:-1, 1:-1] > zero + 1e-3).all()  # no black inside (the rim may blend one pixel)
    without = np.asarray(D.augment_batch(imgs, seeds, cfg))[..., 0]  # ignoring the box: the margin shows
    assert (without <= zero + 1e-3).any()
    host = np.stack([A.augment(r[1], cfg, A.example_rng(0, 0, i, 0), r[2]) for i, r in enumerate(records)])
    assert (host[:, 1:-1, 1:-1] > 0).all()


def test_contrastive_batches_carry_boxes_to_the_device(prepared):
    _, outs = prepared
    cfg = pipeline.PipelineConfig(data_dir=str(outs["raw"]), strategy="instance", batch_size=4, num_workers=0,
                                  augment=A.AugmentConfig(size=SIZE, geometry="shorter_side_crop", where="device"),
                                  process_index=0, process_count=1)
    batch = next(iter(pipeline.make_dataset(cfg)))
    assert batch["query"].shape == (4, 40, 40, 1) and batch["query_box"].shape == (4, 4)
    assert (batch["query_box"][:, 2:].min(1) == SIZE).all()
    x_q = jax.jit(lambda b: D.to_views(b["query"], b["query_seed"], cfg.augment, boxes=b["query_box"]))(batch)
    assert x_q.shape == (4, SIZE, SIZE, 1)
