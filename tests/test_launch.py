"""The launchers' --dry-run: every command they would run, printed, nothing run (no gcloud/SLURM needed)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def _dry(script, *args, env=None):
    python = [f"--python={sys.executable}"] if script != "tpu_pod.sh" else []
    r = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *python, *args],
                       capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line and not line.startswith("#")]


def _main_args(words):
    """The arguments after `python -m cxrjax.main` in a command line."""
    i = words.index("cxrjax.main")
    return words[i + 1:]


def _cpus():
    return sorted(os.sched_getaffinity(0))


def test_local_dry_run_starts_one_process_each_with_its_id():
    lines = _dry("local.sh", "--num_processes=3", "--devices_per_process=2", "--port=23456", "--cpus_per_process=0",
                 "--config=configs/moco_patient.py:demo", "--workdir=runs/x y", "--", "--config.seed=1")
    assert lines[0] == ["mkdir", "-p", "runs/x y/logs"]
    assert lines[-1] == ["wait"]
    procs = lines[1:-1]
    assert len(procs) == 3
    for i, words in enumerate(procs):
        assert words[:4] == ["env", "XLA_FLAGS=--xla_force_host_platform_device_count=2", "JAX_PLATFORMS=cpu",
                             sys.executable]  # simulated devices asked for: the CPU platform with them
        assert _main_args(words)[:6] == ["--config=configs/moco_patient.py:demo", "--workdir=runs/x y",
                                          "--coordinator_address=localhost:23456", "--num_processes=3",
                                          f"--process_id={i}", "--config.seed=1"]
        assert words[-4:] == [">", f"runs/x y/logs/process_{i}.log", "2>&1", "&"]


def test_local_leaves_the_platform_alone_and_splits_gpus_and_cpus():
    """No JAX_PLATFORMS=cpu unless simulated devices are asked for (a GPU box must train on its GPUs);
    each process gets its GPUs and an even share of the CPUs this script may use."""
    lines = _dry("local.sh", "--num_processes=2", "--gpus_per_process=2", "--config=c.py", "--workdir=w")[1:-1]
    cpus, half = _cpus(), len(_cpus()) // 2
    for i, words in enumerate(lines):
        assert not any(w.startswith(("JAX_PLATFORMS", "XLA_FLAGS")) for w in words)
        assert f"CUDA_VISIBLE_DEVICES={2 * i},{2 * i + 1}" in words
        assert words[:3] == ["taskset", "-c", ",".join(map(str, cpus[i * half:(i + 1) * half]))]
    one = _dry("local.sh", "--num_processes=1", "--config=c.py", "--workdir=w")[1]
    assert one[0] == "env" and not any(w.startswith(("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_")) for w in one)
    r = subprocess.run(["bash", str(LAUNCH / "local.sh"), "--dry-run", "--num_processes=2",
                        f"--cpus_per_process={len(cpus)}", "--config=c.py", "--workdir=w"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and f"2 processes x {len(cpus)} CPUs > the {len(cpus)} CPUs" in r.stderr


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
    assert "gcsfuse --implicit-dirs my-bkt /mnt/my-bkt" in setup and 'pip install -q -U -e "$HOME/cxrjax[tpu]"' in setup
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
    # one task per node with its 8 GPUs and 8 CPUs per GPU; SIGTERM 2 minutes before the time limit
    resources = ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64"]
    assert sbatch[:7] == ["sbatch", *resources, "--time=02:00:00", "--signal=TERM@120"]
    assert sbatch[7] == "--partition=gpu"
    assert sbatch[8].endswith("slurm_gpu.sbatch") and "--dry-run" not in sbatch
    assert srun[:6] == ["srun", *resources, "--kill-on-bad-exit=1"]  # srun passes the CPUs on again
    assert "--export=ALL,CXRJAX_DISTRIBUTED=slurm" in srun
    assert _main_args(srun) == ["--config=configs/moco_patient.py", "--workdir=/shared/runs/m",
                                "--config.batch_size=512"]


def test_slurm_one_task_per_gpu_and_options():
    sbatch, srun = _dry("slurm_gpu.sbatch", "--nodes=2", "--gpus=8", "--tasks_per_node=8", "--cpus_per_gpu=12",
                        "--signal_seconds=300", "--config=c.py", "--workdir=w")
    resources = ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-task=1", "--cpus-per-task=12"]
    assert sbatch[1:5] == resources and "--signal=TERM@300" in sbatch and srun[1:5] == resources
    for bad, message in (("--tasks_per_node=3", "--tasks_per_node=3 must divide --gpus=8"),
                         ("--cpus_per_gpu=0", "--cpus_per_gpu must be a positive integer"),
                         ("--signal_seconds=0", "--signal_seconds must be a positive integer")):
        r = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--dry-run", bad, "--config=c.py",
                            "--workdir=w"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr


def test_slurm_header_requests_the_signal_and_cpus():
    """`sbatch launch/slurm_gpu.sbatch ...` uses the #SBATCH lines: they too ask for SIGTERM before the kill."""
    header = [ln.split()[1] for ln in (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "--signal=TERM@120" in header and "--cpus-per-task=64" in header and "--gpus-per-node=8" in header


def test_slurm_inside_the_allocation_runs_srun_with_what_was_allocated(tmp_path):
    """Run by sbatch (SLURM_JOB_ID set): `exec srun` with the allocation's nodes, GPUs and CPUs, whatever
    the script's defaults (a fake srun on PATH prints its arguments)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\necho "FAKE-SRUN $*"\n')
    (fake / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-3]",
           "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "40"}
    r = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config=c.py", f"--workdir={tmp_path / 'w'}"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    srun = shlex.split(next(ln for ln in r.stdout.splitlines() if ln.startswith("FAKE-SRUN")))[1:]
    assert srun[:5] == ["--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=40",
                        "--kill-on-bad-exit=1"]
    assert (tmp_path / "w").is_dir()


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launchers_have_help_and_reject_unknown_options(script):
    r = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "What it does" in r.stdout and "cost" in r.stdout
    r = subprocess.run(["bash", str(LAUNCH / script), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
