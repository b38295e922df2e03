r"""cxrjax's main entry point: one config file picks the job.

    python -m cxrjax.main --config=configs/moco_patient.py:demo --workdir=runs/demo
    python -m cxrjax.main --config=configs/moco_patient.py --config.data.dir=data/chexpert --workdir=runs/medaug
    python -m cxrjax.main --config=configs/moco_patient.py --config.optim.lr=3e-4 --workdir=...   # overrides
    python -m cxrjax.main --config=configs/mvlm_paired.py:demo --workdir=runs/mvlm              # config.job picks the trainer

`--workdir` holds everything the run writes (checkpoints, metrics.jsonl, TensorBoard events, run.json,
config.json); an existing checkpoint there is resumed. Config keys that do not exist are an error.

Multi-process runs (launch/): every process runs this same command; `cxrjax.distributed.initialize`
joins them before any device is touched -- TPU pods and SLURM steps are detected from the
environment, anything else takes --coordinator_address/--num_processes/--process_id (or the
CXRJAX_COORDINATOR / CXRJAX_NUM_PROCESSES / CXRJAX_PROCESS_ID variables).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from cxrjax import xla_cpu

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/moco_patient.py[:demo].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (resumed if it has them).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for a multi-process run (else from the environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])

# config.job -> the module whose train_and_evaluate(config, workdir) runs it (imported when chosen, so
# a job's dependencies are loaded only by its runs).
JOBS = {"moco": "cxrjax.train.contrastive", "mvlm": "cxrjax.train.mvlm"}

def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides look like --config.optim.lr=0.1")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the progress bar says enough
    config = _CONFIG.value
    if config.get("job") not in JOBS:
        raise app.UsageError(f"config.job={config.get('job')!r}; expected one of {tuple(JOBS)}")

    xla_cpu.tune()  # before JAX creates its backend
    import importlib

    import jax

    from cxrjax import distributed

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before any device use
    except ValueError as e:
        raise SystemExit(f"cxrjax: error: {e}") from None
    jax.config.update("jax_threefry_partitionable", True)
    from cxrjax.data.pipeline import CorruptRecordError
    from cxrjax.train.checkpoint import CheckpointError

    try:
        trainer = importlib.import_module(JOBS[config.job])
    except ModuleNotFoundError as e:
        if e.name != JOBS[config.job]:
            raise
        raise SystemExit(f"cxrjax: error: config.job={config.job!r} needs {JOBS[config.job]}, which this "
                         "installation does not have yet") from None
    try:
        trainer.train_and_evaluate(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError, CorruptRecordError) as e:
        # Problems the user can fix get one clear line, not a traceback from deep inside JAX.
        raise SystemExit(f"cxrjax: error: {e}") from None


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
