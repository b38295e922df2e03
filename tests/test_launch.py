"""The launchers' --dry-run: every command they would run, printed, nothing run (no gcloud/SLURM needed)."""

import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def _dry(script, *args, env=None):
    r = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True, text=True,
                       timeout=60, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line and not line.startswith("#")]


def _main_args(words):
    """The arguments after `python -m cxrjax.main` in a command line."""
    i = words.index("cxrjax.main")
    return words[i + 1:]


def test_local_dry_run_starts_one_process_each_with_its_id():
    lines = _dry("local.sh", "--num_processes=3", "--devices_per_process=2", "--port=23456",
                 "--config=configs/moco_patient.py:demo", "--workdir=runs/x y", "--", "--config.seed=1")
    assert lines[0] == ["mkdir", "-p", "runs/x y/logs"]
    assert lines[-1] == ["wait"]
    procs = lines[1:-1]
    assert len(procs) == 3
    for i, words in enumerate(procs):
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in words
        assert _main_args(words)[:6] == ["--config=configs/moco_patient.py:demo", "--workdir=runs/x y",
                                          "--coordinator_address=localhost:23456", "--num_processes=3",
                                          f"--process_id={i}", "--config.seed=1"]
        assert words[-4:] == [">", f"runs/x y/logs/process_{i}.log", "2>&1", "&"]


def test_tpu_pod_dry_run_prints_create_setup_run_delete():
    lines = _dry("tpu_pod.sh", "--name=cxr-v4", "--zone=us-central2-b", "--type=v4-32", "--bucket=gs://my-bkt",
                 "--config=configs/moco_patient.py", "--run=medaug", "--spot", "--delete",
                 "--", "--config.data.dir=/mnt/my-bkt/data/chexpert")
    gcloud = [w for w in lines if w[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    assert [w[4] for w in gcloud] == ["create", "scp", "ssh", "ssh", "delete"]
    create = gcloud[0]
    assert {"cxr-v4", "--zone=us-central2-b", "--accelerator-type=v4-32", "--spot"} <= set(create)
    assert all("--worker=all" in w for w in gcloud[1:4])
    run = next(w for w in gcloud if w[4] == "ssh" and any("cxrjax.main" in x for x in w))
    remote = shlex.split(next(x for x in run if x.startswith("--command="))[len("--command="):])
    assert "CXRJAX_DISTRIBUTED=tpu" in remote
    assert _main_args(remote) == ["--config=configs/moco_patient.py", "--workdir=/mnt/my-bkt/runs/medaug",
                                  "--config.data.dir=/mnt/my-bkt/data/chexpert"]
    setup = next(x for x in gcloud[2] if x.startswith("--command="))
    assert "gcsfuse --implicit-dirs my-bkt /mnt/my-bkt" in setup and "jax[tpu]" in setup
    assert gcloud[-1][-1] == "--quiet"


def test_tpu_pod_steps_and_required_bucket():
    lines = _dry("tpu_pod.sh", "--bucket=b", "--config=c.py", "--run=r", "--steps=run")
    assert len(lines) == 1 and lines[0][4] == "ssh"  # no create, no delete unless asked
    r = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", "--config=c.py", "--run=r"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--bucket is required" in r.stderr


def test_slurm_dry_run_prints_sbatch_and_srun():
    lines = _dry("slurm_gpu.sbatch", "--nodes=4", "--gpus=8", "--partition=gpu", "--time=02:00:00",
                 "--config=configs/moco_patient.py", "--workdir=/shared/runs/m", "--", "--config.batch_size=512")
    sbatch, srun = lines
    assert sbatch[:6] == ["sbatch", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=02:00:00",
                          "--partition=gpu"]
    assert sbatch[6].endswith("slurm_gpu.sbatch") and "--dry-run" not in sbatch
    assert srun[:5] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--kill-on-bad-exit=1"]
    assert "--export=ALL,CXRJAX_DISTRIBUTED=slurm" in srun
    assert _main_args(srun) == ["--config=configs/moco_patient.py", "--workdir=/shared/runs/m",
                                "--config.batch_size=512"]


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launchers_have_help_and_reject_unknown_options(script):
    r = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "What it does" in r.stdout and "cost" in r.stdout
    r = subprocess.run(["bash", str(LAUNCH / script), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
