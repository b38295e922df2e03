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

Initialisations (config.init): `checkpoint` (config.checkpoint = a MoCo WORKDIR for its latest step, or
WORKDIR/STEP; the model is rebuilt from the run's own config.json / run.json), `imagenet` (config.weights
from `python -m cxrjax.tools.import_torchvision`; never downloaded) or `random` (config.seed; the
initialisation the MoCo runs start from). For `imagenet` / `random` the architecture is config.model.

Tasks: CheXpert label names, or `column=value` binary tasks over table.parquet columns
(e.g. `extra_finding=COVID-19` on the COVID-19 collection). Labels: uncertain (-1) 'ignore' (MedAug:
masked out of the loss) / 'zeros' / 'ones'; blank 'zeros' (MedAug) / 'ignore' (use 'ignore' when a table
mixes sources that do not report a label, e.g. `--source=shared`: the COVID rows have no effusion field).

Variants after the colon: demo (phantom data, the demo encoder size, 3 seeds; ~1 min on 2 busy CPU cores),
finetune (also train the encoder end to end, MedAug's second column). The demo phantom (120 patients) has
only 2 positive effusion images in its test split, so demo AUCs are a smoke test: for numbers use a larger
data set (launch/medaug_sweep.py uses a 500-patient phantom; docs/medaug_results.md).
"""

import ml_collections as mlc

from cxrjax.train.contrastive import default_config


def get_config(arg=None):
    moco = default_config()
    c = mlc.ConfigDict()
    c.job = "linear_eval"
    c.name = ""  # the model's name in the tables (default: the run's strategy / 'imagenet' / 'random')

    # What to evaluate
    c.init = "checkpoint"  # 'checkpoint' | 'imagenet' | 'random'
    c.checkpoint = ""  # WORKDIR (latest step) or WORKDIR/STEP of a cxrjax MoCo run
    c.weights = ""  # init=imagenet: converted torchvision weights (.safetensors / .npz)
    c.seed = 0  # init=random: the init seed (a MoCo run with this seed starts from the same weights)
    c.model = moco.model  # architecture for init=imagenet/random (a checkpoint brings its own)
    c.model.init = "random"
    c.output = "backbone"  # features: pooled backbone (linear eval) or 'head' (the MoCo embedding)

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

    # The logistic probe: L-BFGS on standardised features; L2 chosen on the validation split per
    # (fraction, seed) from l2_grid (mean AUC over tasks), or the fixed `l2` when valid has no usable labels.
    c.probe = mlc.ConfigDict(dict(steps=300, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), l2=1e-2))
    c.bootstrap = mlc.ConfigDict(dict(samples=1000, seed=0))  # over test patients

    # Optional end-to-end fine-tuning (MedAug's second column): encoder + the same heads, Adam, few epochs.
    c.finetune = mlc.ConfigDict(dict(enabled=False, epochs=3, lr=3e-5, batch_size=16, weight_decay=0.0))

    c.mesh = mlc.ConfigDict(dict(data=-1))

    for v in filter(None, (arg or "").split(",")):
        if v == "demo":  # the encoder of configs/moco_patient.py:demo, on its phantom data
            c.data.dir = ""
            c.phantom.patients, c.phantom.size = 120, 64
            c.augment.size = 56
            c.model.update(arch="resnet18", width=16)
            c.seeds = (0, 1, 2)
            c.bootstrap.samples = 500
            c.finetune.update(epochs=2, lr=1e-4)
        elif v == "finetune":
            c.finetune.enabled = True
        else:
            raise ValueError(f"unknown config variant {v!r}; known: demo, finetune")
    return c
