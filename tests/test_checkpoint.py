"""Checkpoints (train/checkpoint.py) and where a run lives (train/workdir.py), in-process and small:
damaged checkpoints found, named, moved aside and skipped; config mismatches NOT taken for damage;
commit-file atomicity (gs://, gcsfuse); a gs:// workdir on a fake bucket (run.json, config.json,
metrics, TensorBoard, the Orbax manager) that never touches the local disk."""

import asyncio
import gc
import json
import logging
import os
import re
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.train import checkpoint as ckpt_lib
from cxrjax.train import metrics as metrics_lib
from cxrjax.train import workdir as workdir_lib


def _state(k: int) -> dict:
    return {"w": jnp.arange(1000, dtype=jnp.float32) + k, "b": {"c": jnp.full((64, 64), k, jnp.float32)},
            "step": jnp.asarray(k, jnp.int32)}


def _abstract(tree):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), jax.eval_shape(lambda: tree))


def _iterator():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _save_steps(workdir, steps=(1, 2, 3), **kw):
    """Checkpoints of _state(k) at each step k; the iterator has yielded k elements by step k."""
    ckpt = ckpt_lib.Checkpointer(workdir, every_steps=1, keep=5, **kw)
    it = _iterator()
    for k in steps:
        while next(it) < k - 1:
            pass
        ckpt.save(k, _state(k), it)
    ckpt.close()
    return Path(workdir) / "checkpoints"


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def _array_files(step_dir: Path) -> list[Path]:
    files = [p for p in step_dir.glob("state/**/d/*") if p.is_file()]
    assert files, f"no array files under {step_dir}"  # the damage below must hit something
    return files


def _truncate_half(step_dir):
    for f in _array_files(step_dir):
        os.truncate(f, f.stat().st_size // 2)


def _empty(step_dir):
    for f in _array_files(step_dir):
        os.truncate(f, 0)


def _delete(step_dir):
    for f in _array_files(step_dir):
        f.unlink()


def _truncate_manifest(step_dir):
    manifests = list(step_dir.glob("state/**/manifest.ocdbt"))
    assert manifests
    for f in manifests:
        os.truncate(f, 10)


def _truncate_metadata(step_dir):
    os.truncate(step_dir / "state" / "_METADATA", 50)


def _truncate_iterator_state(step_dir):
    f = step_dir / "data" / "process_0-of-1.json"
    assert f.is_file()
    os.truncate(f, 5)


DAMAGE = {  # how a storage fault leaves the files -> what the one-line reason must say
    "array files truncated": (_truncate_half, "OUT_OF_RANGE"),
    "array files empty": (_empty, "OUT_OF_RANGE"),
    "array files missing": (_delete, "NOT_FOUND"),
    "OCDBT manifest truncated": (_truncate_manifest, "DATA_LOSS"),
    "array metadata truncated": (_truncate_metadata, "corrupt JSON"),
    "iterator state truncated": (_truncate_iterator_state, "corrupt JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no "Exception ignored" tracebacks
def test_damaged_newest_checkpoint_is_named_moved_aside_and_the_previous_one_restored(tmp_path, damage, caplog):
    ckdir = _save_steps(tmp_path)
    hurt, expected_reason = DAMAGE[damage]
    hurt(ckdir / "3")
    damaged_files = _files(ckdir / "3")

    ckpt = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=5)
    it = _iterator()
    notes = []
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        step, state = ckpt.restore_latest(_abstract(_state(0)), it, notes.append)
        gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]  # no flood of failed reads

    assert step == 2
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(2))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert next(it) == 2  # the data iterator resumes where step 2 left it
    assert len(notes) == 2, notes
    m = re.fullmatch(r"checkpoint step 3 is damaged \((.+)\); moved it to (.+); resuming from step 2", notes[0])
    assert m, notes[0]
    assert expected_reason in m.group(1), m.group(1)
    moved = Path(m.group(2))
    assert moved.parent == ckdir and re.fullmatch(r"3\.damaged-\d{8}T\d{6}", moved.name), moved
    assert _files(moved) == damaged_files  # moved, never deleted: every file is still there
    assert not (ckdir / "3").exists()
    assert notes[1] == f"Resuming from {ckdir / '2'} ..."

    # The manager forgot step 3: the run saves it again and a later start resumes from the new one.
    assert ckpt.latest_step() == 2
    ckpt.save(3, _state(33), it)
    ckpt.close()
    again = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=5)
    step, state = again.restore_latest(_abstract(_state(0)), _iterator(), lambda s: None)
    assert step == 3 and int(state["step"]) == 33
    again.close()
    assert moved.is_dir()  # the damaged copy is still kept beside it


def test_late_failed_reads_of_a_damaged_checkpoint_are_dropped_and_nothing_else(tmp_path, caplog):
    """Orbax's abandoned sibling reads are logged by asyncio whenever their futures are collected, which
    may be long after the restore raised (the flaky resume test of stop 22). Only those of the folder
    whose read failed are dropped, at any time after; another step's and any other error still show."""
    damaged = tmp_path / "checkpoints" / "6"
    with pytest.raises(ValueError):
        with ckpt_lib.quiet_failed_reads(damaged):
            raise ValueError("OUT_OF_RANGE: the first error, raised to the caller")

    loop = asyncio.new_event_loop()

    def abandon(exc):  # a read future that failed and that nobody awaits, collected now
        future = loop.create_future()
        future.set_exception(exc)
        del future
        gc.collect()

    def read_error(folder):
        return ValueError(f'OUT_OF_RANGE: Error reading "w.value/.zarray" in OCDBT database at local file "{folder}/state/"')

    elsewhere = Path("/elsewhere") / str(damaged).lstrip("/")  # a folder whose path ends the same way
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        abandon(read_error(damaged))
        abandon(read_error(tmp_path / "checkpoints" / "60"))  # another step: shown
        abandon(RuntimeError(f"unrelated, in {damaged}"))  # not under the folder's path: shown
        abandon(read_error(elsewhere))  # shown
        # the step, moved aside, is saved anew and that fails: shown
        abandon(ValueError(f'DATA_LOSS: Error writing "w.value/.zarray" to local file "{damaged}/state/"'))
    loop.close()
    shown = [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio"]
    assert len(shown) == 4, shown
    assert "/checkpoints/60/state/" in shown[0] and shown[1].startswith("unrelated")
    assert f'"{elsewhere}/state/"' in shown[2] and shown[3].startswith("DATA_LOSS: Error writing")
    assert all(r.getMessage().startswith("Future exception was never retrieved") for r in caplog.records)


def test_failed_reads_logged_before_the_error_reaches_the_caller_are_dropped_too(tmp_path, caplog):
    """A sibling read may fail and be logged on Orbax's thread before the first error leaves the `with`
    (seen once in the CI suite): the folder is covered from the start of the read. A read that succeeds
    leaves nothing behind, and its folder is not covered afterwards."""
    loop = asyncio.new_event_loop()

    def abandon(folder):
        future = loop.create_future()
        future.set_exception(ValueError(f'NOT_FOUND: Error reading "b.c/.zarray" in OCDBT database at local file '
                                        f'"{folder}/state/"'))
        del future
        gc.collect()

    early, fine = tmp_path / "checkpoints" / "3", tmp_path / "checkpoints" / "2"
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(ValueError):
            with ckpt_lib.quiet_failed_reads(early):
                abandon(early)  # logged while the restore is still failing: dropped
                raise ValueError("NOT_FOUND: the first error")
        with ckpt_lib.quiet_failed_reads(fine):
            abandon(fine)  # during a read that then succeeds: dropped (the filter cannot know yet)
        abandon(fine)  # after it succeeded: shown
        abandon(early)  # the failed folder stays covered: dropped
    loop.close()
    shown = [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio"]
    assert len(shown) == 1 and f'"{fine}/state/"' in shown[0], shown


def test_a_checkpoint_that_does_not_fit_the_config_is_not_damage(tmp_path):
    ckdir = _save_steps(tmp_path)
    before = _files(ckdir)
    ckpt = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=5)
    wrong = _state(0)
    wrong["w"] = jnp.zeros(999, jnp.float32)  # another model size
    with pytest.raises(ckpt_lib.CheckpointError, match="does not match this config") as e:
        ckpt.restore_latest(_abstract(wrong), _iterator(), lambda s: None)
    assert not isinstance(e.value, ckpt_lib.DamagedCheckpointError)
    ckpt.close()
    assert _files(ckdir) == before  # nothing moved


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_every_checkpoint_damaged_is_an_error_and_nothing_is_moved(tmp_path):
    ckdir = _save_steps(tmp_path, steps=(1, 2))
    _truncate_half(ckdir / "1")
    _delete(ckdir / "2")
    before = _files(ckdir)
    ckpt = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=5)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt.restore_latest(_abstract(_state(0)), _iterator(), lambda s: None)
    ckpt.close()
    text = str(e.value)
    assert "every checkpoint" in text and "step 2: NOT_FOUND" in text and "step 1: OUT_OF_RANGE" in text, text
    assert "\n" not in text
    assert _files(ckdir) == before


def test_no_checkpoint_yet(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path, every_steps=1)
    assert ckpt.restore_latest(_abstract(_state(0)), _iterator(), lambda s: None) == (0, None)
    ckpt.close()


def test_damage_reason_reads_tensorstore_and_json_errors_only():
    step_dir = "/w/checkpoints/3"
    ts = ValueError('OUT_OF_RANGE: Error opening "zarr" driver: Error reading "w/.zarray" in OCDBT database at local '
                    f'file "{step_dir}/state/": Error reading Byte range [0, 330) of local file "{step_dir}/state/d/ab'
                    '": Requested byte range [0, 330) is not valid for value of size 165 [tensorstore_spec=\'{...}\']')
    reason = ckpt_lib.damage_reason(ts, step_dir)
    assert reason == ('OUT_OF_RANGE: Error reading Byte range [0, 330) of local file "state/d/ab": Requested byte '
                      'range [0, 330) is not valid for value of size 165')
    try:
        json.loads('{"a": ')
    except json.JSONDecodeError as e:
        wrapped = RuntimeError("restore failed")
        wrapped.__cause__ = e
        assert ckpt_lib.damage_reason(wrapped).startswith("corrupt JSON")
    mismatch = ValueError("Requested shape: (999,) is not compatible with the stored shape: (1000,).")
    assert ckpt_lib.damage_reason(mismatch) is None
    assert ckpt_lib.damage_reason(KeyError("state")) is None


# ----------------------------------------------------------------------------------------------
# Commit-file atomicity (gs://, gcsfuse)

MOUNTS = """\
/dev/root / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
bucket /mnt/gcs fuse.gcsfuse rw,nosuid,nodev,relatime,user_id=0,group_id=0 0 0
/dev/sdb /mnt/gcs/local-cache ext4 rw 0 0
"""


def test_fuse_mounts_and_urls_choose_commit_file_atomicity():
    assert workdir_lib.fuse_filesystem("/mnt/gcs/runs/a/checkpoints", MOUNTS) == "fuse.gcsfuse"
    assert workdir_lib.fuse_filesystem("/mnt/gcs", MOUNTS) == "fuse.gcsfuse"
    assert workdir_lib.fuse_filesystem("/mnt/gcs/local-cache/x", MOUNTS) is None  # the longest mount wins
    assert workdir_lib.fuse_filesystem("/mnt/gcsx/run", MOUNTS) is None  # a prefix of the name is not a parent
    assert workdir_lib.fuse_filesystem("/home/me/run", MOUNTS) is None
    assert ckpt_lib.atomicity("/mnt/gcs/runs/a/checkpoints", "auto", MOUNTS) == "commit_file"
    assert ckpt_lib.atomicity("/home/me/run/checkpoints", "auto", MOUNTS) == "rename"
    assert ckpt_lib.atomicity("gs://bucket/run/checkpoints", "auto", MOUNTS) == "commit_file"
    assert ckpt_lib.atomicity("/mnt/gcs/run", "rename", MOUNTS) == "rename"  # forced
    assert ckpt_lib.atomicity("/home/me/run", "commit_file", MOUNTS) == "commit_file"
    with pytest.raises(ValueError, match="checkpoint_atomicity='atomic'"):
        ckpt_lib.atomicity("/home/me/run", "atomic", MOUNTS)


def test_commit_file_checkpoints_are_written_in_place_and_an_uncommitted_step_is_ignored(tmp_path):
    ckdir = _save_steps(tmp_path, steps=(1, 2, 3), atomicity_setting="commit_file")
    names = sorted(p.name for p in ckdir.iterdir())
    assert names == ["1", "2", "3"], names  # no STEP.orbax-checkpoint-tmp-* directory was ever renamed
    assert all((ckdir / n / "commit_success.txt").is_file() for n in names)
    (ckdir / "3" / "commit_success.txt").unlink()  # a save cut before its commit (e.g. SIGKILL)
    ckpt = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=5, atomicity_setting="commit_file")
    assert ckpt.atomicity == "commit_file" and ckpt.latest_step() == 2
    step, state = ckpt.restore_latest(_abstract(_state(0)), _iterator(), lambda s: None)
    assert step == 2 and int(state["step"]) == 2
    ckpt.close()


# ----------------------------------------------------------------------------------------------
# A gs:// workdir on a fake bucket


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """gs:// served from memory through fsspec (what epath uses for gs:// with gcsfs). Like GCS it
    cannot append to an object. The test runs in an empty cwd, to catch any local `gs:` folder."""
    import fsspec  # noqa: F401 (registers fsspec.registry)
    from etils.epath import backend as epath_backend
    from fsspec.implementations.memory import MemoryFileSystem
    from tensorboardX import record_writer

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""
        store = {}
        pseudo_dirs = [""]

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for p in ("gs://", "gcs://"):
                if path.startswith(p):
                    path = path[len(p):]
            return path.rstrip("/")

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode:
                raise NotImplementedError("GCS objects cannot be appended to")
            return super()._open(path, mode, **kwargs)

    registry = sys.modules["fsspec.registry"]._registry  # (`fsspec.registry` is its read-only view)
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, FakeGCS)  # restored after the test
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", record_writer.REGISTERED_FACTORIES.get("gs"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield FakeGCS
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert list(cwd.iterdir()) == []  # nothing was written locally


def test_workdir_path_keeps_urls_and_resolves_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(workdir_lib.workdir_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(workdir_lib.workdir_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert str(workdir_lib.workdir_path("s3://b/r")) == "s3://b/r"
    assert str(workdir_lib.workdir_path("runs/a")) == str(tmp_path.resolve() / "runs" / "a")
    assert str(workdir_lib.workdir_path("~/x")) == str(Path.home() / "x")


def test_run_files_on_a_gs_workdir(fake_gcs):
    import ml_collections as mlc

    work = "gs://bucket/run"
    ckpt_lib.check_run_compatible(work, {"job": "moco", "width": 16})
    assert json.loads(fake_gcs.store["bucket/run/run.json"].getvalue()) == {"job": "moco", "width": 16}
    ckpt_lib.check_run_compatible(work, {"job": "moco", "width": 16})  # the same setup resumes
    with pytest.raises(ckpt_lib.CheckpointError, match="width: checkpoint has 16, config has 32"):
        ckpt_lib.check_run_compatible(work, {"job": "moco", "width": 32})
    ckpt_lib.save_config(work, mlc.ConfigDict({"job": "moco", "model": {"width": 16}}))
    assert ckpt_lib.load_config(work).model.width == 16


def test_metrics_on_a_gs_workdir_and_their_resume(fake_gcs):
    work = "gs://bucket/run"
    log = metrics_lib.MetricLogger(work, total_steps=4, progress_bar=False, primary=True)
    for s in range(1, 5):
        log.write(s, {"loss": 10.0 + s})
    log.close()
    assert [d["loss"] for d in metrics_lib.read_jsonl(f"{work}/metrics.jsonl")] == [11.0, 12.0, 13.0, 14.0]
    assert metrics_lib.read_tensorboard_scalars(f"{work}/tb")["loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0)]

    # Resumed from step 2: steps 3-4 are redone; the files show each step once, the new values.
    log = metrics_lib.MetricLogger(work, total_steps=4, start_step=2, progress_bar=False, primary=True)
    log.write(3, {"loss": 23.0})
    log.flush()  # with each checkpoint: the object is rewritten whole
    assert [d["step"] for d in metrics_lib.read_jsonl(f"{work}/metrics.jsonl")] == [1, 2, 3]
    log.write(4, {"loss": 24.0})
    log.close()
    assert [d["loss"] for d in metrics_lib.read_jsonl(f"{work}/metrics.jsonl")] == [11.0, 12.0, 23.0, 24.0]
    assert metrics_lib.read_tensorboard_scalars(f"{work}/tb")["loss"] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert any(k.startswith("bucket/run/tb/events.out.tfevents.") for k in fake_gcs.store)


def test_checkpointer_on_a_gs_workdir_uses_the_url_and_commit_files(fake_gcs, monkeypatch):
    # Orbax asks google-cloud-storage whether the bucket has a hierarchical namespace (not installed
    # here; `pip install google-cloud-storage gcsfs` on a machine that uses gs://).
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    ckpt = ckpt_lib.Checkpointer("gs://bucket/run", every_steps=1)
    assert str(ckpt.directory) == "gs://bucket/run/checkpoints"
    assert ckpt.atomicity == "commit_file" and ckpt.latest_step() is None
    ckpt.close()
    assert "bucket/run/checkpoints" in fake_gcs.pseudo_dirs  # created in the bucket, not locally
