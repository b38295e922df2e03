"""A run that dies resumes exactly: SIGKILL in the middle of an asynchronous save, SIGKILL at a random
moment, SIGTERM (preemption), a damaged newest checkpoint -- on both augmentation paths, through
`python -m cxrjax.main` in subprocesses, as users run it. Every test asserts the step the next run
resumed from, and that the resumed run logs the losses of an uninterrupted one, bit for bit."""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrjax.train import metrics as metrics_lib
from cxrjax.train import preemption

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "moco_patient.py")
STEPS = ["--config.total_steps=12", "--config.checkpoint_every=3"]

# The trainers resume through Checkpointer.restore_latest and stop through preemption.StopRequest once
# the lead / MVLM helper apply the trainer diffs of issues 16 and 19 (reliability report); until then
# these end-to-end tests cannot pass and are skipped, saying why.
needs_trainer_integration = pytest.mark.skipif(
    "restore_latest" not in (REPO / "cxrjax" / "train" / "contrastive.py").read_text()
    or "StopRequest" not in (REPO / "cxrjax" / "train" / "contrastive.py").read_text(),
    reason="train/contrastive.py does not use Checkpointer.restore_latest / preemption.StopRequest yet")

# Runs cxrjax.main with Orbax's commit (the rename of STEP.orbax-checkpoint-tmp-* to STEP) held back
# for step $HOLD_STEP: its files are all written, the save is not yet final. $HOLD_MARK is created
# when the hold starts, so the test can kill the process exactly then. Test-only: nothing in cxrjax.
HOLD_COMMIT = """
import asyncio, os, sys
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def _held(self):
    if self.get_final().name == os.environ["HOLD_STEP"]:
        open(os.environ["HOLD_MARK"], "w").close()
        await asyncio.sleep(3600)
    return await _finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = _held
from cxrjax import main
sys.argv[0] = "cxrjax"
main.run()
"""


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    from cxrjax import prepare

    d = tmp_path_factory.mktemp("phantom")
    prepare.prepare_dataset("phantom", d, patients=60, size=48, workers=1, strategies=["study-same_lat-any"])
    return d


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, phantom_dir):
    """where -> {step: loss} of a run never interrupted (built once per augmentation path)."""
    cache = {}

    def losses(where):
        if where not in cache:
            work = tmp_path_factory.mktemp(f"straight-{where}")
            _run(_args(work, phantom_dir, where))
            cache[where] = _losses(work)
            assert sorted(cache[where]) == list(range(1, 13))
        return cache[where]

    return losses


def _args(workdir, data_dir, where):
    return [f"--config={CONFIG}:demo", f"--workdir={workdir}", f"--config.data.dir={data_dir}",
            "--config.augment.size=40", "--config.log_every=1", "--config.moco.queue_size=64",
            f"--config.augment.where={where}", "--config.probe.every=0", *STEPS]


def _env(**extra):
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", **extra)


def _run(args, check=True):
    r = subprocess.run([sys.executable, "-m", "cxrjax.main", *args], capture_output=True, text=True, env=_env(),
                       timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"cxrjax.main {' '.join(args)} failed:\n{r.stderr[-4000:]}")
    return r


def _start(args, out: Path, code=None, **env):
    """A run in the background, its stdout in `out` (read after it ended)."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "cxrjax.main", *args]
    return subprocess.Popen(cmd, env=_env(**env), stdout=out.open("w"), stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _losses(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return {d["step"]: d["loss"] for d in metrics_lib.read_jsonl(path) if "loss" in d} if path.exists() else {}


def _finalized(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _in_flight(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(p.name for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name) if d.is_dir() else []


def _resumed_from(stdout: str) -> list[int]:
    return [int(s) for s in re.findall(r"^Resuming from \S+/checkpoints/(\d+) \.\.\.$", stdout, flags=re.M)]


def _assert_same_run(workdir, expected):
    assert _losses(workdir) == expected  # every step's loss, bit for bit (JSON keeps float32 values exactly)
    tb = metrics_lib.read_tensorboard_scalars(Path(workdir) / "tb")
    assert sorted(s for s, _ in tb["loss"]) == list(range(1, 13))  # each step once, as TensorBoard shows it


@pytest.mark.slow
@needs_trainer_integration
def test_kill_during_an_async_save_then_a_damaged_newest_checkpoint(tmp_path, phantom_dir, uninterrupted):
    """Device augmentation. SIGKILL while step 9's save is written but not committed; then the newest
    finished checkpoint (6) is damaged as a storage fault leaves it (array files truncated). The next
    run names step 6 and the reason, moves it aside, resumes from step 3 and logs the uninterrupted
    run's losses."""
    expected = uninterrupted("device")
    work, mark = tmp_path / "w", tmp_path / "held"
    proc = _start(_args(work, phantom_dir, "device"), tmp_path / "out1.txt", code=HOLD_COMMIT,
                  HOLD_STEP="9", HOLD_MARK=str(mark))
    _wait_for(mark.exists, proc, "the save of step 9 reached its commit")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _finalized(work) == [1, 3, 6]  # (Orbax also saves the first step)
    assert [n.split(".")[0] for n in _in_flight(work)] == ["9"], _in_flight(work)  # cut mid-save

    arrays = [p for p in (work / "checkpoints" / "6").glob("state/**/d/*") if p.is_file()]
    assert arrays
    for f in arrays:
        os.truncate(f, f.stat().st_size // 2)

    r = _run(_args(work, phantom_dir, "device"))
    assert _resumed_from(r.stdout) == [3], r.stdout[-3000:]
    # (the head of stderr names the logger and the message; its tail is TensorStore specs)
    assert "Traceback" not in r.stderr and "never retrieved" not in r.stderr, r.stderr[:3000]
    damaged = [x for x in r.stdout.splitlines() if "is damaged" in x]
    assert len(damaged) == 1 and damaged[0].startswith("checkpoint step 6 is damaged (OUT_OF_RANGE"), damaged
    assert "resuming from step 3" in damaged[0]
    moved = [p for p in (work / "checkpoints").iterdir() if p.name.startswith("6.damaged-")]
    assert len(moved) == 1 and sorted(p.name for p in moved[0].glob("state/**/d/*")) == sorted(p.name for p in arrays)
    assert _finalized(work)[-1] == 12
    _assert_same_run(work, expected)


@pytest.mark.slow
@needs_trainer_integration
def test_sigterm_then_sigkill_at_a_random_moment(tmp_path, phantom_dir, uninterrupted):
    """Host augmentation. SIGTERM: the step finishes, its checkpoint is written synchronously, exit 75
    with one line. The next run resumes from that step and is SIGKILLed at a random moment; the one
    after resumes from the newest finished checkpoint and finishes: the losses of an uninterrupted run."""
    expected = uninterrupted("host")
    work = tmp_path / "w"

    proc = _start(_args(work, phantom_dir, "host"), tmp_path / "out1.txt")
    _wait_for(lambda: max(_losses(work), default=0) >= 3, proc, "step 3 was logged")
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 75, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("cxrjax:")]  # (stderr also has the progress bar)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    m = re.fullmatch(r"cxrjax: stopped: SIGTERM received: finished step (\d+), wrote checkpoint \1 in (\S+); run the "
                     r"same command to continue from it", lines[0])
    assert m and stderr.rstrip().endswith(lines[0]), stderr[-3000:]
    stopped = int(m.group(1))
    assert 3 <= stopped < 12
    assert _finalized(work)[-1] == stopped and not _in_flight(work)  # saved synchronously, before the exit
    assert max(_losses(work)) == stopped

    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 2.0)
    out2 = tmp_path / "out2.txt"
    proc = _start(_args(work, phantom_dir, "host"), out2)
    _wait_for(lambda: max(_losses(work), default=0) > stopped, proc, f"a step after {stopped} was logged")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _resumed_from(out2.read_text()) == [stopped], out2.read_text()[-3000:]
    reached = max(_losses(work))
    assert reached < 12, f"the kill (seed {seed}, {delay:.2f} s after the first step) should land mid-run"
    newest = _finalized(work)[-1]

    r = _run(_args(work, phantom_dir, "host"))
    assert _resumed_from(r.stdout) == [newest], (seed, delay, r.stdout[-3000:])
    _assert_same_run(work, expected)


# ----------------------------------------------------------------------------------------------
# The stop request itself


def test_sigterm_sets_the_stop_request_and_the_handler_is_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopRequest() as stop:
        assert not stop.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: only a flag is set
        time.sleep(0.01)
        assert stop.reached(2) and stop.received == "SIGTERM"
        assert stop.message(2, "/w/checkpoints") == ("SIGTERM received: finished step 2, wrote checkpoint 2 in "
                                                     "/w/checkpoints; run the same command to continue from it")
    assert signal.getsignal(signal.SIGTERM) is before


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


STOP_LOOP = """
import sys, time
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from cxrjax.train import preemption
with preemption.StopRequest() as stop:
    for step in range(1, 100_000):
        time.sleep(0.02)
        if step == 10:
            print("running", flush=True)
        if stop.reached(step):
            print("stopped after", step, flush=True)
            break
"""


def test_two_processes_stop_after_the_same_step_when_one_gets_sigterm():
    """jax.distributed: SIGTERM reaches one process (one preempted host); both stop after the same
    step, through JAX's preemption sync point (the handler is JAX's, not Python's)."""
    address = f"localhost:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", STOP_LOOP, address, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "running", p.stderr.read()[-3000:] if p.poll() is not None else ""
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    steps = [int(re.fullmatch(r"stopped after (\d+)", out.strip()).group(1)) for out, _ in outs]
    assert steps[0] == steps[1] >= 10, steps


# ----------------------------------------------------------------------------------------------
# The masked vision-language job: the same damaged-checkpoint handling (train/mvlm.py)


def _tiny_mvlm_config(data_dir):
    from cxrjax.train import mvlm

    c = mvlm.apply_variants(mvlm.default_config(), "demo")
    c.data.dir = data_dir
    c.augment.size = 32
    c.model.update(size="micro", patch=8, proj_dim=16)
    c.mask.scales = (1, 2)
    c.text.update(vocab_size=300, max_len=24)
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 4, 1, 2
    return c


@pytest.mark.slow
@pytest.mark.skipif("restore_latest" not in (REPO / "cxrjax" / "train" / "mvlm.py").read_text(),
                    reason="train/mvlm.py does not use Checkpointer.restore_latest yet")
def test_mvlm_resumes_past_a_damaged_newest_checkpoint(tmp_path_factory, capsys):
    import jax

    from cxrjax import prepare
    from cxrjax.train import mvlm

    jax.config.update("jax_threefry_partitionable", True)
    data = tmp_path_factory.mktemp("mvlm_phantom")
    prepare.prepare_dataset("phantom", data, patients=40, size=32, workers=1, strategies=[])
    work = tmp_path_factory.mktemp("mvlm") / "run"
    mvlm.train_and_evaluate(_tiny_mvlm_config(str(data)), str(work))
    first = _losses(work)
    assert sorted(first) == [1, 2, 3, 4] and _finalized(work)[-2:] == [2, 4]
    for f in (work / "checkpoints" / "4").glob("state/**/d/*"):
        os.truncate(f, 0)
    capsys.readouterr()

    mvlm.train_and_evaluate(_tiny_mvlm_config(str(data)), str(work))
    out = capsys.readouterr().out
    assert _resumed_from(out) == [2], out[-3000:]
    assert re.search(r"^checkpoint step 4 is damaged \(OUT_OF_RANGE.*\); moved it to \S+/4\.damaged-\S+; resuming "
                     r"from step 2$", out, flags=re.M), out[-3000:]
    assert _losses(work) == first  # steps 3 and 4 redone exactly
