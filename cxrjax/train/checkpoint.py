"""Orbax checkpoints of a run: the train state and the data iterator's state, saved together.

One `CheckpointManager` under `WORKDIR/checkpoints`, async, every N steps and at the end, keeping the
last k. Each step is a Composite of `state` (the train-state pytree, written by every process
cooperatively) and `data` (the Grain iterator state, one JSON file per process), so a resumed run sees
exactly the batches it would have seen. `WORKDIR/run.json` records what the checkpoints were made
with; resuming with an incompatible model is refused with a message saying what differs.
`WORKDIR/config.json` holds the run's full resolved config (for evaluation jobs and people).

Restoring onto another mesh (8 devices -> 4, another process count for the state) is Orbax's
resharding: `restore` reads into whatever shardings the abstract state carries.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from cxrjax.data import pipeline


class CheckpointError(RuntimeError):
    """A workdir whose checkpoints cannot be resumed by this config."""


class Checkpointer:
    def __init__(self, workdir, *, every_steps: int, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        if not (force or self.manager.should_save(step)):
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=pipeline.checkpoint_args(data_iterator),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state, data_iterator):
        """Restore `step` into the shapes/shardings of `abstract_state`; sets the iterator's state."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=pipeline.checkpoint_args(data_iterator, restore=True),
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"cannot restore step {step} from {self.directory}: {e}\n"
                "The checkpoint does not match this config (model, optimizer, queue or number of "
                "processes differ). Use a new --workdir, or the config the checkpoint was made with."
            ) from e
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_run_compatible(workdir, fingerprint: dict) -> None:
    """First run: write WORKDIR/run.json. Later runs: refuse to resume with different essentials.

    Every process reads, all wait, then process 0 writes: no process reads a half-written file, and
    all of them agree on whether the workdir is compatible.
    """
    from cxrjax import distributed

    path = Path(workdir) / "run.json"
    old = json.loads(path.read_text()) if path.exists() else None
    distributed.barrier("cxrjax: run.json read")
    if old is not None:
        # The state restores onto any mesh; process_count is in the fingerprint because the data
        # iterator's state is per process.
        diff = {k: (old.get(k), v) for k, v in fingerprint.items() if old.get(k) != v}
        if diff:
            shown = "; ".join(f"{k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"{workdir} holds a run made with a different setup ({shown}). "
                "Use a new --workdir, or the same settings to resume."
            )
        return
    if jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(fingerprint, indent=1, sort_keys=True))
    distributed.barrier("cxrjax: run.json written")


def save_config(workdir, config) -> Path:
    """Write the run's full resolved config to WORKDIR/config.json (process 0; every run overwrites it,
    so it shows the config of the latest (re)start). Evaluation jobs read it to rebuild the encoder."""
    path = Path(workdir) / "config.json"
    if jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        text = config.to_json_best_effort(indent=1, sort_keys=True) if hasattr(config, "to_json_best_effort") \
            else json.dumps(config, indent=1, sort_keys=True, default=repr)
        _write_atomic(path, text + "\n")
    return path


def load_config(workdir):
    """WORKDIR/config.json as a ConfigDict (what `save_config` wrote)."""
    import ml_collections as mlc

    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} the --workdir of a pre-training run?")
    return mlc.ConfigDict(json.loads(path.read_text()))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
