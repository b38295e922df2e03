"""Stop cleanly on SIGTERM: finish the step, write a checkpoint synchronously, exit with a message.

Spot TPUs, preemptible VMs, Kubernetes and SLURM (`--signal=TERM@120`, and at a time limit) send
SIGTERM some seconds before they kill a process. Without a handler Python dies at once and the run
loses everything after its last checkpoint -- or worse, the kill lands in the middle of an
asynchronous save. With `StopRequest` the training loop asks `stop.reached(step)` after every step;
when it says so the loop saves that step with `force=True`, waits for the save to be finished, and
raises `Preempted`, which `cxrjax.main` turns into one line and exit status 75 (EX_TEMPFAIL).
Running the same command again resumes from that step, bit for bit.

All processes of a run must stop after the same step (each writes its part of the checkpoint):
- one process: a Python SIGTERM handler sets a flag; the loop reads it (no device work, no sync);
- several processes (`jax.distributed`): JAX's preemption service -- it installs its own SIGTERM
  handler in every process, agrees on a step through the coordination service, and
  `jax.experimental.multihost_utils.reached_preemption_sync_point(step)` is True at that same step
  everywhere (Orbax's `CheckpointManager.should_save` uses the same call). The loop must call it at
  every step, in order, from the step it started at.
"""

from __future__ import annotations

import signal
import threading


class Preempted(Exception):
    """The run stopped early on request, after writing a checkpoint (not a failure: resume it)."""

    EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, retry"


class StopRequest:
    """`reached(step)`: True at the step after which every process of the run should save and stop.

    Use as a context manager around the training loop: it installs the SIGTERM handler (single
    process) and restores the previous one on exit."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: str | None = None  # the signal's name, once one arrived
        self._previous = {}
        self._multi = None

    def __enter__(self) -> "StopRequest":
        import jax

        self._multi = jax.process_count() > 1 and _preemption_service_running()
        if not self._multi and threading.current_thread() is threading.main_thread():
            # (JAX's service owns SIGTERM in multi-process runs; Python may only set handlers from the
            # main thread, and a loop run elsewhere -- a test, a notebook thread -- keeps the default.)
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        del frame
        self.received = signal.Signals(signum).name  # only a flag: the loop acts between steps

    def reached(self, step: int) -> bool:
        """Called once after every step (`step` = steps done). True: save `step` and stop now."""
        if self._multi:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM (preemption notice)"
                return True
            return False
        return self.received is not None

    def message(self, step: int, directory) -> str:
        return (f"{self.received or 'a stop request'} received: finished step {step}, wrote checkpoint {step} "
                f"in {directory}; run the same command to continue from it")


def _preemption_service_running() -> bool:
    import jax

    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)
