"""Orbax checkpoints of a run: the train state and the data iterator's state, saved together.

One `CheckpointManager` under `WORKDIR/checkpoints`, async, every N steps and at the end, keeping the
last k. Each step is a Composite of `state` (the train-state pytree, written by every process
cooperatively) and `data` (the Grain iterator state, one JSON file per process), so a resumed run sees
exactly the batches it would have seen. `WORKDIR/run.json` records what the checkpoints were made
with; resuming with an incompatible model is refused with a message saying what differs.
`WORKDIR/config.json` holds the run's full resolved config (for evaluation jobs and people).

Restoring onto another mesh (8 devices -> 4, another process count for the state) is Orbax's
resharding: `restore` reads into whatever shardings the abstract state carries.

Where a run may live (`workdir_path`, train/workdir.py): a local folder or any URL `etils.epath` knows
(gs://, s3://; Orbax's own path type, so Orbax and everything here write to the same place). How a save becomes final (`atomicity`): by default Orbax writes
into `STEP.orbax-checkpoint-tmp-*` and renames it; gs:// URLs and FUSE mounts (gcsfuse: no atomic
directory rename on flat buckets, or rename as a slow copy) instead write `STEP/` in place and mark
it complete with `STEP/commit_success.txt` ("commit_file"). `auto` picks per directory;
config.checkpoint_atomicity can force either.

Damaged checkpoints (`restore_latest`): a step whose files cannot be read (truncated or missing
array files, corrupt metadata -- a storage fault, or a kill that outlived the atomic commit) is named
in one line with the reason, moved aside to `checkpoints/STEP.damaged-TIME` (never deleted), and the
next older step is tried. A checkpoint that is intact but does not fit the config is NOT damage: that
stays a CheckpointError and nothing is moved.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cxrjax.data import pipeline
from cxrjax.train.workdir import fuse_filesystem, is_url, workdir_path, write_atomic

ATOMICITY = ("auto", "rename", "commit_file")
DAMAGED_TAG = ".damaged-"


class CheckpointError(RuntimeError):
    """A workdir whose checkpoints cannot be resumed by this config."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint step whose files cannot be read (truncated, missing or corrupt)."""

    def __init__(self, step: int, directory, reason: str):
        self.step, self.directory, self.reason = step, directory, reason
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")


# ----------------------------------------------------------------------------------------------
# How a save becomes final


def atomicity(directory, setting: str = "auto", mounts: str | None = None) -> str:
    """'rename' or 'commit_file' for checkpoints in `directory` (see the module doc)."""
    if setting not in ATOMICITY:
        raise ValueError(f"config.checkpoint_atomicity={setting!r}; expected one of {ATOMICITY}")
    if setting != "auto":
        return setting
    if is_url(directory) or fuse_filesystem(directory, mounts):
        return "commit_file"
    return "rename"


# ----------------------------------------------------------------------------------------------
# The checkpoints


class Checkpointer:
    def __init__(self, workdir, *, every_steps: int, keep: int = 3, async_save: bool = True,
                 atomicity_setting: str = "auto"):
        self.directory = workdir_path(workdir) / "checkpoints"
        self.atomicity = atomicity(self.directory, atomicity_setting)
        mode = {"rename": ocp.options.AtomicityMode.ATOMIC_RENAME,
                "commit_file": ocp.options.AtomicityMode.COMMIT_FILE}[self.atomicity]
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            atomicity_options=ocp.options.AtomicityOptions(mode=mode),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        if not (force or self.manager.should_save(step)):
            return False
        if step in self.manager.all_steps():
            return False  # already saved (e.g. a stop request on a checkpoint step)
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=pipeline.checkpoint_args(data_iterator),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state, data_iterator):
        """Restore `step` into the shapes/shardings of `abstract_state`; sets the iterator's state.

        Raises DamagedCheckpointError if the step's files cannot be read, CheckpointError if they
        do not fit this config."""
        try:
            with quiet_failed_reads(self.directory / str(step)):
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=pipeline.checkpoint_args(data_iterator, restore=True),
                    ),
                )
        except Exception as e:
            reason = damage_reason(e, self.directory / str(step))
            if reason is not None:
                raise DamagedCheckpointError(step, self.directory, reason) from e
            if not isinstance(e, (ValueError, KeyError, TypeError)):
                raise
            raise CheckpointError(
                f"cannot restore step {step} from {self.directory}: {e}\n"
                "The checkpoint does not match this config (model, optimizer, queue or number of "
                "processes differ). Use a new --workdir, or the config the checkpoint was made with."
            ) from e
        return restored["state"]

    def restore_latest(self, abstract_state, data_iterator, note=print):
        """(step, state) of the newest intact checkpoint, or (0, None) if there is none yet.

        Damaged newer steps are named (one line each, via `note`), moved aside and skipped. If
        every checkpoint is damaged nothing is moved and CheckpointError says so: starting over
        in this workdir would discard the run (and its metrics) without the user choosing to."""
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            reason = None
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except DamagedCheckpointError as e:
                reason = e.reason
            reason = _agree_on_damage(reason)  # every process must take the same step
            if reason is None:
                for bad, why in damaged:
                    moved = self.move_aside(bad)
                    note(f"checkpoint step {bad} is damaged ({why}); moved it to {moved}; resuming from "
                         f"step {step}")
                note(f"Resuming from {self.directory / str(step)} ...")
                return step, state
            damaged.append((step, reason))
        if damaged:
            shown = "; ".join(f"step {s}: {why}" for s, why in damaged)
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged ({shown}). Nothing was moved or deleted. "
                "To start this run over, use a new --workdir (or move the checkpoints folder away).")
        return 0, None

    def move_aside(self, step: int) -> epath.Path:
        """Rename checkpoint `step` to STEP.damaged-TIME beside it (Orbax ignores such names; nothing
        is deleted) and let the manager forget it. Process 0 renames, all processes wait."""
        from cxrjax import distributed

        src = self.directory / str(step)
        dst = self.directory / f"{step}{DAMAGED_TAG}{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            n = 1
            while dst.exists():
                dst, n = dst.with_name(f"{step}{DAMAGED_TAG}{time.strftime('%Y%m%dT%H%M%S')}-{n}"), n + 1
            src.rename(dst)
        distributed.barrier(f"cxrjax: checkpoint {step} moved aside")
        self.manager.reload()
        return dst

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@contextlib.contextmanager
def quiet_failed_reads(directory):
    """When one array of a checkpoint cannot be read, Orbax's other reads fail too and asyncio logs
    each of their futures ("Future exception was never retrieved", hundreds of lines of TensorStore
    specs) whenever they are garbage-collected -- possibly long after the restore returned. The first
    error is the one that matters and is raised. A filter on asyncio's logger drops exactly those
    records whose exception is a TensorStore *read* error naming a file under `directory` (a
    checkpoint folder whose read failed); it stays installed, since the late ones come when they come
    (also after the step was moved aside and is saved anew: an error writing it still shows).
    Nothing else of asyncio's is hidden. Both are installed before the read: a damaged file's abandoned
    sibling reads can fail, be collected and logged on Orbax's thread as soon as the first error is
    raised, before any except clause here runs (seen once in 25 min of the suite on a loaded machine).
    A read that succeeds takes its folder off the list again (its reads left nothing behind)."""
    global _ABANDONED_READ_DIRS
    ignore_late_read_callbacks()
    added = frozenset(_path_forms(directory)) - _ABANDONED_READ_DIRS  # a folder that failed before stays on
    _ABANDONED_READ_DIRS = _ABANDONED_READ_DIRS | added  # replaced, never mutated: the filter may run on
    _install_abandoned_read_filter()                     # another thread meanwhile
    try:
        yield
    except Exception:
        gc.collect()
        raise
    _ABANDONED_READ_DIRS = _ABANDONED_READ_DIRS - added


_ABANDONED_READ_DIRS: frozenset[str] = frozenset()
_NEVER_RETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")
_READ_ERRORS = ("Error reading", "Error opening")  # TensorStore's wording for a failed read / open


def _path_forms(directory) -> list[str]:
    """How TensorStore spells `directory` in its messages: absolute, or the URL with and without its scheme."""
    text = os.fspath(directory).rstrip("/")
    return [text, text.split("://", 1)[1]] if "://" in text else [os.path.abspath(text)]


class _AbandonedReadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        dirs = _ABANDONED_READ_DIRS
        if not (dirs and record.exc_info and str(record.msg).startswith(_NEVER_RETRIEVED)):
            return True
        text = str(record.exc_info[1])
        if not any(r in text for r in _READ_ERRORS):
            return True
        # the folder itself, not one whose path merely ends the same way ("/x/otherrun/checkpoints/6/")
        return not any(re.search(r'(?:^|["\s]|://)' + re.escape(d) + "/", text) for d in dirs)


def _install_abandoned_read_filter() -> None:
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadFilter) for f in log.filters):
        log.addFilter(_AbandonedReadFilter())


def ignore_late_read_callbacks() -> None:
    """After a failed read, TensorStore may complete the other reads of that restore later, and their
    callbacks find Orbax's event loop closed: Python prints "Exception ignored ... RuntimeError: Event
    loop is closed" with a traceback; and the abandoned read coroutines, closed when garbage-collected
    (possibly much later), raise Orbax's "Encountered error while reading array index". Those reads are
    already abandoned and the first error was reported; drop exactly these two messages."""
    previous = sys.unraisablehook
    if getattr(previous, "cxrjax_late_reads", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        if type(exc) is Exception and str(exc).startswith(_ABANDONED_READ) and isinstance(exc.__cause__, GeneratorExit):
            return
        previous(unraisable)

    hook.cxrjax_late_reads = True
    sys.unraisablehook = hook


_ABANDONED_READ = "Encountered error while reading array index"  # orbax serialization.py, a read closed unfinished
# TensorStore status codes of a read that found missing, short or undecodable data.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")


def damage_reason(exc: BaseException, step_dir=None) -> str | None:
    """Why a restore failed, if it failed because files of the checkpoint are damaged (one line,
    paths relative to the step folder); None for anything else (e.g. a config mismatch)."""
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        reason = _damage_of(e)
        if reason is not None:
            prefix = f"{os.fspath(step_dir)}/" if step_dir is not None else None
            if prefix:
                reason = reason.replace(prefix, "")
            return " ".join(reason.split())
        e = e.__cause__ or e.__context__
    return None


def _damage_of(e: BaseException) -> str | None:
    if isinstance(e, json.JSONDecodeError):
        return f"corrupt JSON ({e.msg} at char {e.pos})"
    if isinstance(e, FileNotFoundError):
        return f"missing file {e.filename or e}"
    if isinstance(e, (UnicodeDecodeError, EOFError)):
        return f"unreadable file ({e})"
    text = str(e)
    m = re.search(rf"\b({'|'.join(_DAMAGE_CODES)}): ", text)
    if m is None:
        return None
    text = text[m.start():].split(" [tensorstore_spec")[0]
    parts = text.split(": ")
    # "CODE: Error opening ...: Error reading ...: <what was wrong>" -> code, the file, what was wrong
    files = [p for p in parts if "file \"" in p or "local file" in p]
    return ": ".join([m.group(1)] + files[-1:] + parts[-1:]) if len(parts) > 1 else text


def _agree_on_damage(reason: str | None) -> str | None:
    """The damage verdict of all processes: damaged if any process found it damaged."""
    if jax.process_count() == 1:
        return reason
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([reason is not None], np.int32))
    if not np.any(flags):
        return None
    return reason or "damage found by another process"


# ----------------------------------------------------------------------------------------------
# run.json and config.json


def check_run_compatible(workdir, fingerprint: dict) -> None:
    """First run: write WORKDIR/run.json. Later runs: refuse to resume with different essentials.

    Every process reads, all wait, then process 0 writes: no process reads a half-written file, and
    all of them agree on whether the workdir is compatible.
    """
    from cxrjax import distributed

    workdir = workdir_path(workdir)
    path = workdir / "run.json"
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
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(fingerprint, indent=1, sort_keys=True))
    distributed.barrier("cxrjax: run.json written")


def save_config(workdir, config) -> epath.Path:
    """Write the run's full resolved config to WORKDIR/config.json (process 0; every run overwrites it,
    so it shows the config of the latest (re)start). Evaluation jobs read it to rebuild the encoder."""
    workdir = workdir_path(workdir)
    path = workdir / "config.json"
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        text = config.to_json_best_effort(indent=1, sort_keys=True) if hasattr(config, "to_json_best_effort") \
            else json.dumps(config, indent=1, sort_keys=True, default=repr)
        write_atomic(path, text + "\n")
    return path


def load_config(workdir):
    """WORKDIR/config.json as a ConfigDict (what `save_config` wrote)."""
    import ml_collections as mlc

    path = workdir_path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} the --workdir of a pre-training run?")
    return mlc.ConfigDict(json.loads(path.read_text()))
