r"""cxrjax's main entry point: one config file picks the job.

    python -m cxrjax.main --config=configs/moco_patient.py:demo --workdir=runs/demo
    python -m cxrjax.main --config=configs/moco_patient.py --config.data.dir=data/chexpert --workdir=runs/medaug
    python -m cxrjax.main --config=configs/moco_patient.py --config.optim.lr=3e-4 --workdir=...   # overrides

`--workdir` holds everything the run writes (checkpoints, metrics.jsonl, TensorBoard events, run.json);
an existing checkpoint there is resumed. Config keys that do not exist are an error.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/moco_patient.py[:demo].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (resumed if it has them).")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = ("moco",)

# XLA:CPU's Eigen convolutions run the ResNet step 1.5-2x faster than the YNNPACK ones jaxlib 0.10 uses
# by default (benchmarks/train_bench.py). The flag exists in jaxlib 0.10 only (an unknown XLA flag
# aborts the process), it touches only the CPU backend, and a user's own XLA_FLAGS setting wins.
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _tune_xla_cpu() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        jaxlib_version = version("jaxlib")
    except PackageNotFoundError:
        return
    current = os.environ.get("XLA_FLAGS", "")
    if jaxlib_version.startswith("0.10.") and "ynn_fusion_type" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {CPU_CONV_FLAG}".strip()


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides look like --config.optim.lr=0.1")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the progress bar says enough
    config = _CONFIG.value
    if config.get("job") not in JOBS:
        raise app.UsageError(f"config.job={config.get('job')!r}; expected one of {JOBS}")

    _tune_xla_cpu()  # before JAX creates its backend
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from cxrjax.data.pipeline import CorruptRecordError
    from cxrjax.train import contrastive
    from cxrjax.train.checkpoint import CheckpointError

    try:
        contrastive.train_and_evaluate(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError, CorruptRecordError) as e:
        # Problems the user can fix get one clear line, not a traceback from deep inside JAX.
        raise SystemExit(f"cxrjax: error: {e}") from None


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
