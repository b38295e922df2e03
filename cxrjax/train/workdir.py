"""Where a run lives: `--workdir` as an `etils.epath.Path`, local or a URL (gs://bucket/run, s3://...).

`etils.epath` is Orbax's own path type, so the checkpoints, run.json/config.json and the metrics of a
run all go through one storage layer: a local folder is resolved to an absolute path (every process
and every message names the same folder), a URL is kept as it is -- `pathlib.Path("gs://b/run")
.resolve()` would make it the local folder `$PWD/gs:/b/run`, a private copy on each host.

gs:// needs `gcsfs` (epath's fsspec backend) and `google-cloud-storage` (Orbax's bucket checks);
TensorStore writes the checkpoint arrays with its own GCS driver.
"""

from __future__ import annotations

import os
from pathlib import Path

from etils import epath


def workdir_path(workdir) -> epath.Path:
    """--workdir as an `epath.Path`: a URL untouched, a local path absolute (`~` expanded)."""
    text = os.fspath(workdir)
    if is_url(text):
        return epath.Path(text)
    return epath.Path(Path(text).expanduser().resolve())


def is_url(path) -> bool:
    """gs://..., s3://... (anything with a scheme) -- as opposed to a local path."""
    return "://" in os.fspath(path)


def fuse_filesystem(path, mounts: str | None = None) -> str | None:
    """The FUSE file-system type (e.g. 'fuse.gcsfuse') of the mount that holds local `path`, else None.

    `mounts`: the text of /proc/mounts (read when None; None off Linux)."""
    if is_url(path):
        return None
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = str(Path(os.fspath(path)).expanduser().resolve())
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")  # /proc/mounts escapes spaces
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, best_type = point, fields[2]
    return best_type if best_type and best_type.startswith("fuse") else None


def write_atomic(path, text: str) -> None:
    """Write then rename: a reader sees the old file or the new one, never half of one (on object
    stores the rename is a copy, still never a partial file under the final name)."""
    path = epath.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
