r"""What the model sees: one stored image and the views MoCo trains on, as a PNG.

    python -m cxrjax.tools.views_figure --out=docs/views.png                       # a phantom study, 320 px
    python -m cxrjax.tools.views_figure --data=data/chexpert --record=12 --out=views.png
    python -m cxrjax.tools.views_figure --config=configs/moco_patient.py:padded --out=padded.png

Row 1: the stored record (its content box outlined), MedAug's eval view (Resize + CenterCrop) and
training views of the query image; row 2: views of the same patient's same-study partner when it has one
(the positive the pair strategy draws), else more views of the query. The views are exactly the training
pipeline's (`augment.augment` with the record's box and the config's augmentation, seeds as in training).
Without --data a phantom study with a frontal and a lateral image is rendered, stored like
`prepare --fit=shorter` stores a 320 x 390 (portrait) radiograph.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import flags

_OUT = flags.DEFINE_string("out", "views.png", "output PNG")
_DATA = flags.DEFINE_string("data", "", "a prepared data folder (default: a phantom study)")
_RECORD = flags.DEFINE_integer("record", 0, "--data: the record of the train split to show")
_CONFIG = flags.DEFINE_string("config", "configs/moco_patient.py", "the MoCo config whose augmentation to use")
_VIEWS = flags.DEFINE_integer("views", 5, "training views per row")
_SEED = flags.DEFINE_integer("seed", 0, "augmentation seed (the run's config.seed)")


def _phantom_pair(size: int):
    """A phantom study with two images, stored as `--fit=shorter` stores a portrait film (shorter side
    `size`, aspect 1.22): (image, box) of the frontal and of its study-mate."""
    from cxrjax.data import images, phantom

    table = phantom.make_table(40, seed=0)
    counts = table.groupby("study_id")["image_id"].transform("size")
    row = table[counts == 2].iloc[0]
    mate = table[(table.study_id == row.study_id) & (table.image_id != row.image_id)].iloc[0]
    out = []
    for r in (row, mate):
        square = phantom.render_image(r.to_dict(), size=int(size * 1.22))
        portrait = square[:, (square.shape[1] - size) // 2:(square.shape[1] - size) // 2 + size]  # 390 x 320
        out.append(images.fit_image_box(portrait, size, "shorter"))
    return out, f"phantom {row.image_id} + {mate.image_id}"


def _prepared_pair(data_dir: str, record: int):
    from cxrjax.data import pairs, pipeline

    data = pipeline.load_prepared(data_dir, "train", "study-same_lat-any", include_self=False)
    reader = pipeline.open_reader(data)
    row = int(data.split_rows[record])
    group = data.positives.group(row)
    partner = int(group[0]) if not data.positives.fallback[row] else row
    items = [reader.image_and_box(record), reader.image_and_box(int(data.record_of_row[partner]))]
    return items, f"{data_dir} record {record} (row {row}, partner row {partner})"


def main(argv) -> None:
    del argv
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from cxrjax import cli
    from cxrjax.data import augment

    config = cli.load_config_file(_CONFIG.value)
    cfg = augment.AugmentConfig.from_dict({**dict(config.augment), "where": "host"})
    items, title = (_prepared_pair(_DATA.value, _RECORD.value) if _DATA.value else _phantom_pair(cfg.size))
    n = _VIEWS.value
    fig, axes = plt.subplots(2, n + 2, figsize=(2.2 * (n + 2), 4.8))
    for r, (image, box) in enumerate(items):
        box = None if box is None else np.asarray(box)
        ax = axes[r, 0]
        ax.imshow(image, cmap="gray", vmin=0, vmax=np.iinfo(image.dtype).max)
        if box is not None:
            ax.add_patch(Rectangle((box[1] - 0.5, box[0] - 0.5), box[3], box[2], fill=False, ec="tab:orange", lw=1))
        ax.set_title(["stored query", "stored partner"][r] + f"\n{image.shape[0]}x{image.shape[1]}", fontsize=8)
        ax = axes[r, 1]
        ax.imshow(augment.eval_transform(image, cfg, box), cmap="gray", vmin=0, vmax=np.iinfo(image.dtype).max)
        ax.set_title("eval view", fontsize=8)
        for j in range(n):
            view = augment.augment(image, cfg, augment.example_rng(_SEED.value, j, 0, r), box)
            axes[r, 2 + j].imshow(view, cmap="gray", vmin=0, vmax=np.iinfo(image.dtype).max)
            axes[r, 2 + j].set_title(f"training view (epoch {j})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{_CONFIG.value}: geometry={cfg.geometry}, rotation +-{cfg.rotation:g} deg, flip "
                 f"p={cfg.hflip_prob:g}, {cfg.size} px -- {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(_OUT.value, dpi=90)
    print(f"wrote {_OUT.value}")


def run() -> None:
    from cxrjax import cli

    cli.run(main, prog="cxrjax.tools.views_figure", config_flag=None)


if __name__ == "__main__":
    sys.exit(run())
