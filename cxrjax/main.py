r"""cxrjax's main entry point: one config file picks the job.

    python -m cxrjax.main --config=configs/moco_patient.py:demo --workdir=runs/demo
    python -m cxrjax.main --config=configs/moco_patient.py --config.data.dir=data/chexpert --workdir=runs/medaug
    python -m cxrjax.main --config=configs/moco_patient.py --config.optim.lr=3e-4 --workdir=...   # overrides
    python -m cxrjax.main --config=configs/mvlm_paired.py:demo --workdir=runs/mvlm              # config.job picks the trainer

`--workdir` holds everything the run writes (checkpoints, metrics.jsonl, TensorBoard events, run.json,
config.json); an existing checkpoint there is resumed (a damaged newest checkpoint is named, moved
aside to checkpoints/STEP.damaged-TIME and the newest intact one is used). A local path or any URL
`etils.epath` knows (gs://bucket/run, s3://...).

Config keys that do not exist are an error, whether set on the command line (`--config.KEY=...`) or in
the config file (compared with the job's `default_config()`); the closest existing key is named.

Exit status: 0 done; 2 a mistake on the command line or in the config file (one line on stderr);
1 the run cannot go on (bad data, a refused checkpoint, a NaN loss: one line saying what to do);
75 (EX_TEMPFAIL) stopped by SIGTERM (preemption, a scheduler's time limit) after finishing the step
and writing a checkpoint: run the same command to continue, bit for bit.

Multi-process runs (launch/): every process runs this same command; `cxrjax.distributed.initialize`
joins them before any device is touched -- TPU pods and SLURM steps are detected from the
environment, anything else takes --coordinator_address/--num_processes/--process_id (or the
CXRJAX_COORDINATOR / CXRJAX_NUM_PROCESSES / CXRJAX_PROCESS_ID variables).
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from cxrjax import backend, cli, xla_cpu
from cxrjax.jobs import check_config_keys, job_module

PROG = "cxrjax"
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/moco_patient.py[:demo].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs://... URL) for checkpoints and metrics "
                               "(resumed if it has them).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for a multi-process run (else from the environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_REQUIRE_ACCELERATOR = flags.DEFINE_bool(
    "require_accelerator", False, "Stop at start-up unless JAX runs on a GPU/TPU (also config.require_accelerator).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    del argv  # cli.parse_flags refuses positional arguments
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the progress bar says enough
    config = _CONFIG.value
    xla_cpu.tune()  # before JAX creates its backend
    try:
        trainer = job_module(config)
        check_config_keys(config, trainer, config_flags.get_config_filename(flags.FLAGS["config"]))
    except cli.UsageError as e:
        cli.fail(PROG, str(e))

    import jax

    from cxrjax import distributed

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before any device use
        backend.require_accelerator(_REQUIRE_ACCELERATOR.value or bool(config.get("require_accelerator", False)))
    except (ValueError, backend.AcceleratorError) as e:
        cli.fail(PROG, str(e), cli.EXIT_ERROR)
    jax.config.update("jax_threefry_partitionable", True)
    from cxrjax.data.pipeline import CorruptRecordError
    from cxrjax.train.checkpoint import CheckpointError
    from cxrjax.train.preemption import Preempted

    try:
        trainer.train_and_evaluate(config, _WORKDIR.value)
    except Preempted as e:
        cli.fail(PROG, str(e), Preempted.EXIT_CODE, label="stopped")
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError, CorruptRecordError) as e:
        # Problems the user can fix get one clear line, not a traceback from deep inside JAX.
        cli.fail(PROG, str(e), cli.EXIT_ERROR)


def run() -> None:
    cli.run(main, prog=PROG)


if __name__ == "__main__":
    run()
