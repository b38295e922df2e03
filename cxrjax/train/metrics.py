"""Where a run's numbers go: TensorBoard event files, a JSONL file, and a progress bar with ETA.

Only process 0 writes (every process computes the same global metrics). A resumed run first drops
JSONL lines past the step it resumed from, and tells TensorBoard to purge them, so the curves of a
killed-and-resumed run are the curves of an uninterrupted one.

The workdir may be a URL (gs://bucket/run; train/workdir.py). Object stores cannot append, so there
`metrics.jsonl` is rewritten whole at each `flush()` (with every checkpoint, and at the end), and
TensorBoard's event file is kept in memory and rewritten whole at each flush of tensorboardX's writer
(every 30 s) through `etils.epath` -- what tensorboardX's own gs:// writer does, but through the same
storage layer as the checkpoints (no google-cloud-storage client of its own). Both files hold scalars
only: a few MB for a long run.
"""

from __future__ import annotations

import io
import json
import math
import os
import time

from etils import epath

from cxrjax.train.workdir import is_url, workdir_path


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
        workdir = workdir_path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._path = workdir / "metrics.jsonl"
        kept = _truncate_after(self._path, start_step)
        self._remote = is_url(workdir)
        if self._remote:
            self._lines = kept  # rewritten whole at flush(): object stores cannot append
            _register_tensorboard_writer(workdir)
        else:
            self._jsonl = open(self._path, "a")
        from tensorboardX import SummaryWriter

        # TensorBoard hides earlier events with step >= purge_step: the first step this run writes.
        # The suffix keeps the file names of two starts within one second apart (the name has seconds).
        self._tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1 if start_step else None, flush_secs=30,
                                 filename_suffix=f".{time.time_ns()}")
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
        line = json.dumps({"step": step, "time": round(time.time(), 3), **clean})
        if self._remote:
            self._lines.append(line)
        else:
            self._jsonl.write(line + "\n")
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
        elif self.primary and self._remote:
            self._path.write_text("".join(x + "\n" for x in self._lines))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        elif self.primary and self._remote:
            self.flush()


def _truncate_after(path: epath.Path, step: int) -> list[str]:
    """Drop lines written after `step` (they belong to the part of a killed run that is being redone);
    returns the lines kept."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a kill
    path.write_text("".join(x + "\n" for x in keep))
    return keep


class _EpathEventFile:
    """A tensorboardX record writer for a URL: the event file in memory, rewritten whole on flush."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathEventFiles:
    """tensorboardX writer factory (see `record_writer.register_writer_factory`)."""

    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_tensorboard_writer(workdir: epath.Path) -> None:
    from tensorboardX import record_writer

    record_writer.register_writer_factory(os.fspath(workdir).split("://")[0], _EpathEventFiles())


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in epath.Path(path).read_text().splitlines() if x.strip()]


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TensorBoard event files (no TensorFlow): {tag: [(step, value), ...]}.

    Honours purges as TensorBoard does: a restart's SessionLog START at step s drops earlier events
    with step >= s.
    """
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    files = sorted(epath.Path(logdir).glob("events.out.tfevents.*"), key=lambda f: (_mtime(f), f.name))
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


def _mtime(f: epath.Path) -> float:
    return f.stat().mtime if is_url(f) else os.stat(f).st_mtime
