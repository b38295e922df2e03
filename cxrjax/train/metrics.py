"""Where a run's numbers go: TensorBoard event files, a JSONL file, and a progress bar with ETA.

Only process 0 writes (every process computes the same global metrics). A resumed run first drops
JSONL lines past the step it resumed from, and tells TensorBoard to purge them, so the curves of a
killed-and-resumed run are the curves of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def note(text: str) -> None:
    """A progress line from process 0 (big_vision's write_note), before the logger exists."""
    if _is_primary():
        print(text, flush=True)


class MetricLogger:
    """`write(step, {...})` scalars to TensorBoard + JSONL; `progress(step)` drives the bar."""

    def __init__(self, workdir, *, total_steps: int, start_step: int = 0, progress_bar: bool = True,
                 primary: bool | None = None):
        self.primary = _is_primary() if primary is None else primary
        self.total_steps = total_steps
        self._bar = None
        self._tb = None
        self._jsonl = None
        if not self.primary:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "metrics.jsonl"
        _truncate_after(path, start_step)
        self._jsonl = path.open("a")
        from tensorboardX import SummaryWriter

        # TensorBoard hides earlier events with step >= purge_step: the first step this run writes.
        self._tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1 if start_step else None, flush_secs=30)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.05)
        self._last = start_step

    def write(self, step: int, metrics: dict) -> None:
        if not self.primary:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for k, v in clean.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, global_step=step)
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self._jsonl.flush()
        if self._bar is not None:
            shown = {k: clean[k] for k in ("loss", "acc", "img_per_s", "lr") if k in clean}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def progress(self, step: int) -> None:
        if self._bar is not None and step > self._last:
            self._bar.update(step - self._last)
            self._last = step

    def note(self, text: str) -> None:
        """A line above the bar (big_vision's write_note)."""
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            note(text)

    def flush(self) -> None:
        """Make everything written so far durable (called with each checkpoint: a kill loses nothing
        that the checkpoint it resumes from has seen)."""
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines written after `step` (they belong to the part of a killed run that is being redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a kill
    path.write_text("".join(x + "\n" for x in keep))


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TensorBoard event files (no TensorFlow): {tag: [(step, value), ...]}.

    Honours purges as TensorBoard does: a restart's SessionLog START at step s drops earlier events
    with step >= s.
    """
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    files = sorted(Path(logdir).glob("events.out.tfevents.*"), key=lambda f: (f.stat().st_mtime, f.name))
    for f in files:
        data = f.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            if pos + 12 + length > len(data):
                break  # a record cut by a kill
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                out = {k: [(s, v) for s, v in vals if s < event.step] for k, vals in out.items()}
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out
