"""Orbax checkpoints of a run: the train state and the data iterator's state, saved together.

One `CheckpointManager` under `WORKDIR/checkpoints`, async, every N steps and at the end, keeping the
last k. Each step is a Composite of `state` (the train-state pytree, written by every process
cooperatively) and `data` (the Grain iterator state, one JSON file per process), so a resumed run sees
exactly the batches it would have seen. `WORKDIR/run.json` records what the checkpoints were made
with; resuming with an incompatible model is refused with a message saying what differs.
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
    """First run: write WORKDIR/run.json. Later runs: refuse to resume with different essentials."""
    path = Path(workdir) / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
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
        path.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
