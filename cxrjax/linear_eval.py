r"""Linear evaluation of pre-trained encoders: frozen features -> logistic probe per label fraction and seed
-> AUC with a 95% bootstrap CI, beside the baselines (`random`: the same architecture randomly initialised;
`pixels`: the raw pixels) in one table, every row on the same label samples and test images. The protocol
and every option are in configs/linear_eval.py.

    python -m cxrjax.linear_eval --config=configs/linear_eval.py:demo --config.checkpoint=runs/demo --workdir=OUT
    python -m cxrjax.linear_eval --config=configs/linear_eval.py:demo --config.init=random --workdir=OUT
    python -m cxrjax.linear_eval --config=configs/linear_eval.py:demo --config.augment.size=0 \
        --config.checkpoint=runs/demo,runs/mvlm-paired --workdir=OUT      # a MoCo and a ViT run in one table

WORKDIR receives results.csv (one row per model/task/fraction), results.md (the same as a table),
per_seed.csv, predictions.parquet (test scores per model and seed, for paired comparisons), roc-*.png,
eval.json (what was evaluated), label_splits_unmatched.csv (with config.label_splits.files) and features/
(the cached features, reused by later runs).
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from cxrjax import cli, xla_cpu

PROG = "cxrjax.linear_eval"
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/linear_eval.py[:demo]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (results, ROC curves, feature cache).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    del argv  # cli.parse_flags refuses positional arguments
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config.get("job") != "linear_eval":
        cli.fail(PROG, f"config.job={config.get('job')!r}; use configs/linear_eval.py")
    xla_cpu.tune()  # same XLA:CPU convolution choice as the trainer (before JAX creates its backend)
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from cxrjax.data.pipeline import CorruptRecordError
    from cxrjax.eval.linear_eval import evaluate

    try:
        evaluate(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FloatingPointError, CorruptRecordError) as e:
        cli.fail(PROG, str(e), cli.EXIT_ERROR)


def run() -> None:
    cli.run(main, prog=PROG)


if __name__ == "__main__":
    run()
