r"""Linear evaluation of a pre-trained encoder (MedAug's protocol): frozen encoder, a logistic layer per
task trained on 1% / 10% / 100% of the training labels (drawn by patient, 5 seeds), AUC on the test split
with a 95% bootstrap CI. Writes WORKDIR/results.{csv,md}, per_seed.csv, predictions.parquet, roc-*.png.

    python -m cxrjax.main --config=configs/moco_patient.py:demo --workdir=runs/demo          # pre-train (~1 min)
    python -m cxrjax.linear_eval --config=configs/linear_eval.py:demo \
        --config.checkpoint=runs/demo --workdir=runs/demo-eval                                # ~1 min, 2 CPU cores
    python -m cxrjax.linear_eval --config=configs/linear_eval.py --config.checkpoint=runs/medaug-patient/40000 \
        --config.data.dir=data/chexpert --workdir=runs/medaug-patient-eval                    # the paper's setting
    python -m cxrjax.linear_eval --config=configs/linear_eval.py --config.init=imagenet \
        --config.weights=weights/r18.safetensors --config.data.dir=data/chexpert --workdir=runs/imagenet-eval
    python -m cxrjax.linear_eval --config=configs/linear_eval.py:demo --config.init=random --workdir=runs/random-eval

Initialisations (config.init): `checkpoint` (config.checkpoint = a MoCo or masked vision-language WORKDIR
for its latest step, or WORKDIR/STEP, or several separated by commas for one table; the model -- ResNet query
encoder or ViT image tower -- is rebuilt from the run's own config.json / run.json; a ViT is evaluated at its
training size, and then so is every row: use --config.augment.size=0),
`imagenet` (config.weights from `python -m cxrjax.tools.import_torchvision`; never downloaded), `random`
(config.seed; the initialisation the MoCo runs start from) or `pixels` (no model: the raw-pixel baseline).
For `imagenet` / `random` the architecture is config.model.

Baselines (config.baselines, default both): each evaluation also probes, on the same label samples and
test images, `random` (the evaluated architecture -- the checkpoint's own ResNet or ViT -- randomly
initialised with config.seed; `random <arch>` per architecture when several are compared) and `pixels`
(the eval-transformed image, normalised as the encoders see it, area-resized (OpenCV's INTER_AREA) to
config.pixels.size x config.pixels.size = 32 x 32 -> 1024 features, flattened; 0 = the eval size itself,
whose square grows fast): rows named `random` and `pixels` in the same table.
Their features are cached like the encoder's (share config.feature_cache between evaluations of one data
set to extract them once). `--config.baselines=()` turns them off.

Tasks: CheXpert label names, or `column=value` binary tasks over table.parquet columns
(e.g. `extra_finding=COVID-19` on the COVID-19 collection). Labels: uncertain (-1) 'ignore' (MedAug:
masked out of the loss) / 'zeros' / 'ones'; blank 'zeros' (MedAug) / 'ignore' (use 'ignore' when a table
mixes sources that do not report a label, e.g. `--source=shared`: the COVID rows have no effusion field).

Label samples: cxrjax draws round(fraction x patients) training *patients* per seed; or, with
config.label_splits.files = a path template with {fraction} and {seed}, the images each external split
file names (MedAug's per-image files; matched on image id or the `patientN/studyM/viewK_*` tail of a
path; images of our valid split count too, since MedAug drew from all of CheXpert's train.csv; every
unmatched row is printed and written to WORKDIR/label_splits_unmatched.csv; fraction 1.0 = all of train).
L2 is chosen on valid images of patients outside the sample.

Variants after the colon: demo (the phantom, encoder size and image size of configs/moco_patient.py:demo,
3 seeds, the random and pixels rows), finetune (also train the encoder end to end,
MedAug's second column), medaug_splits (MedAug's published label splits, the five 1 % files `train_semi_0.01-
it{0..4}`, on a CheXpert folder prepared with `python -m cxrjax.prepare --source=chexpert`; the files are
read from ../shared/data/medaug-label-fractions/ beside the repository, or
--config.label_splits.files=<MedAug>/label_fractions/train_semi_{fraction}-it{seed}.csv; add 0.001 to
config.fractions for their 0.1 % files, 1.0 for all labels):

    python -m cxrjax.linear_eval --config=configs/linear_eval.py:medaug_splits --config.checkpoint=runs/medaug-patient \
        --config.data.dir=data/chexpert --workdir=runs/medaug-patient-eval-medaug-splits
"""

from pathlib import Path

import ml_collections as mlc

from cxrjax.train.contrastive import apply_variants, default_config

# MedAug's label_fractions files as ../shared/data holds them beside this repository
MEDAUG_SPLITS = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "medaug-label-fractions"
                    / "train_semi_{fraction}-it{seed}.csv.gz")


def get_config(arg=None):
    moco = default_config()
    c = mlc.ConfigDict()
    c.job = "linear_eval"
    c.name = ""  # the model's name in the tables (default: the run's strategy / 'imagenet' / 'random')

    # What to evaluate
    c.init = "checkpoint"  # 'checkpoint' | 'imagenet' | 'random' | 'pixels'
    c.checkpoint = ""  # WORKDIR (latest step) or WORKDIR/STEP of a MoCo or masked vision-language run; a,b: several
    c.weights = ""  # init=imagenet: converted torchvision weights (.safetensors / .npz)
    c.seed = 0  # init=random: the init seed (a MoCo run with this seed starts from the same weights)
    c.model = moco.model  # architecture for init=imagenet/random (a checkpoint brings its own)
    c.model.init = "random"
    c.output = "backbone"  # features: pooled backbone (linear eval) or 'head' (the pre-training embedding)
    c.baselines = ("random", "pixels")  # rows probed beside the encoder on the same samples (see above)
    c.pixels = mlc.ConfigDict(dict(size=32))  # raw-pixel features: area-resized to size x size (0: eval size)

    # Data (python -m cxrjax.prepare); empty dir = the phantom data set, prepared and cached
    c.data = mlc.ConfigDict(dict(dir="", name=mlc.FieldReference(None, field_type=str), train_split="train",
                                 valid_split="valid", test_split="test", num_workers=0))
    c.phantom = moco.phantom
    c.augment = mlc.ConfigDict(dict(size=320, eval_crop=1.0))  # eval transform: resize + centre crop (MedAug 320)
    c.batch_size = 64  # feature extraction (global; rounded up to a multiple of the devices)
    c.feature_cache = ""  # default WORKDIR/features; share one between evaluations of the same encoder

    # Labels and the protocol
    c.tasks = ("Pleural Effusion",)  # MedAug's task
    c.uncertain = "ignore"  # MedAug: uncertain labels masked out of the loss
    c.blank = "zeros"  # MedAug: blank = negative
    c.unlabelled_values = ("", "todo")  # `column=value` tasks: cells meaning "no label"
    c.fractions = (0.01, 0.1, 1.0)  # of the training split's patients
    c.seeds = (0, 1, 2, 3, 4)  # MedAug: five 1% splits
    # External label splits: a path template with {fraction} (0.01, 0.001, ...) and {seed}; empty = our own draw
    c.label_splits = mlc.ConfigDict(dict(files=""))

    # The logistic probe: L-BFGS on standardised features until the gradient norm is below `tol` (at most
    # `steps` iterations); L2 chosen on the validation split per (fraction, seed) from l2_grid (mean AUC over
    # tasks), or the fixed `l2` when valid has no usable labels.
    c.probe = mlc.ConfigDict(dict(steps=300, tol=1e-6, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), l2=1e-2))
    c.bootstrap = mlc.ConfigDict(dict(samples=1000, seed=0))  # over test patients

    # Optional end-to-end fine-tuning (MedAug's second column): encoder + the same heads, Adam, few epochs.
    c.finetune = mlc.ConfigDict(dict(enabled=False, epochs=3, lr=3e-5, batch_size=16, weight_decay=0.0))

    c.mesh = mlc.ConfigDict(dict(data=-1))

    for v in filter(None, (arg or "").split(",")):
        if v == "demo":  # the data, encoder and image size of configs/moco_patient.py:demo
            demo = apply_variants(default_config(), "demo")
            c.data.dir = ""
            c.phantom.update(demo.phantom.to_dict())
            c.augment.size = demo.augment.size
            c.model.update(arch=demo.model.arch, width=demo.model.width)
            c.seeds = (0, 1, 2)
            c.bootstrap.samples = 500
            c.finetune.update(epochs=2, lr=1e-4)
        elif v == "finetune":
            c.finetune.enabled = True
        elif v == "medaug_splits":  # MedAug's five published 1% label splits (per image) instead of our draw
            c.label_splits.files = MEDAUG_SPLITS
            c.fractions = (0.01,)
            c.seeds = (0, 1, 2, 3, 4)
        else:
            raise ValueError(f"unknown config variant {v!r}; known: demo, finetune, medaug_splits")
    return c
