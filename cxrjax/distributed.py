"""Multi-process start-up: decide from flags and the environment how this process joins the run.

`initialize()` must run before anything touches a JAX device. It picks one of

    explicit   coordinator/num_processes/process_id given (flags, or CXRJAX_COORDINATOR,
               CXRJAX_NUM_PROCESSES, CXRJAX_PROCESS_ID): launch/local.sh, hand-made clusters
    slurm      inside an `srun` step with more than one task: coordinator = first host of the step's
               node list, port derived from the job id; process = SLURM_PROCID of SLURM_NTASKS.
               GPUs: a task that sees exactly its own GPU(s) (srun --gpus-per-task, or one task per
               node) uses all it sees; tasks sharing a node that all see every GPU of it split them
               by SLURM_LOCALID. A job of several tasks started WITHOUT srun (the batch script itself,
               an salloc shell) is refused with one line: it would wait forever for the other tasks.
    tpu        on the workers of a multi-host Cloud TPU VM (CXRJAX_DISTRIBUTED=tpu, or the TPU
               worker list in the environment): JAX reads the topology from the TPU metadata
    single     none of the above: nothing to do (one process, all local devices)

CXRJAX_DISTRIBUTED=auto|none|explicit|slurm|tpu forces a mode (auto is the default). The decision is
a pure function of (flags, environment), `resolve`, tested without any cluster.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from typing import Mapping

MODES = ("auto", "none", "explicit", "slurm", "tpu")


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str  # 'single', 'explicit', 'slurm' or 'tpu'
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def kwargs(self) -> dict:
        """Arguments for `jax.distributed.initialize` (empty for 'tpu': JAX auto-detects).

        Everything is decided here, so JAX's own cluster detection is switched off: under SLURM it
        would otherwise fill in local_device_ids=[SLURM_LOCALID] whenever we leave it unset, and a
        one-task-per-node run would use GPU 0 of each node only."""
        if self.mode == "tpu":
            return {}
        kw = dict(coordinator_address=self.coordinator_address, num_processes=self.num_processes,
                  process_id=self.process_id, cluster_detection_method="deactivate")
        if self.local_device_ids is not None:
            kw["local_device_ids"] = list(self.local_device_ids)
        return kw


# ----------------------------------------------------------------------------------------------
# SLURM node lists: 'gpu[01-03,07],login2' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login2']


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact host list (what `scontrol show hostnames` prints), zero padding kept."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", item)
        if not m:
            if "[" in item or "]" in item:
                raise ValueError(f"cannot parse SLURM node list {nodelist!r} at {item!r}")
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"cannot parse SLURM node list {nodelist!r}: range {part!r}")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def _split_top_level(s: str) -> list[str]:
    """Split at commas outside brackets."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(s[start:i])
            start = i + 1
    out.append(s[start:])
    return [x for x in out if x]


def first_slurm_host(nodelist: str) -> str:
    """First host of the job: `scontrol show hostnames` when available (SLURM's own parser), else ours."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def slurm_port(job_id: str) -> int:
    """A port in 61440..65535 derived from the job id (two jobs on one node rarely collide; JAX's choice)."""
    return int(job_id) % 4096 + 61440


# Step ids SLURM gives the job's own processes rather than an srun step: batch script, extern,
# interactive, pending (0xfffffffa..0xffffffff over SLURM versions).
_SLURM_SPECIAL_STEP_MIN = 0xFFFFFFF0


def slurm_in_step(env: Mapping[str, str]) -> bool:
    """True inside an `srun` step; False in the batch script, an salloc shell or an interactive step."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return step.isdigit() and int(step) < _SLURM_SPECIAL_STEP_MIN


def expand_tasks_per_node(value: str) -> list[int]:
    """SLURM's '2(x3),1' -> [2, 2, 2, 1] (tasks on each node of the step, in node order)."""
    out: list[int] = []
    for part in filter(None, value.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse SLURM tasks-per-node {value!r} at {part!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            counts = expand_tasks_per_node(env[key])
            node = _int(env, "SLURM_NODEID") or 0
            if node < len(counts):
                return counts[node]
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # e.g. '4(x2)'
    return int(per_node) if per_node.isdigit() else None


def visible_gpus(env: Mapping[str, str]) -> list[str] | None:
    """The GPUs this process may use (CUDA_/ROCR_/HIP_VISIBLE_DEVICES), None when nothing restricts them."""
    for key in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if key in env:
            return [d for d in env[key].split(",") if d.strip()]
    return None


def slurm_local_devices(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """Which of the GPUs this task sees it should use (indices into what it sees; None = all of them).

    - one task on this node, or a task SLURM bound to its own GPU(s) (`srun --gpus-per-task=1`:
      CUDA_VISIBLE_DEVICES holds fewer GPUs than the node has tasks): all it sees;
    - several tasks that each see the same G GPUs (no binding): task L takes its G/tasks of them;
    - no CUDA_VISIBLE_DEVICES at all with several tasks per node: GPU SLURM_LOCALID (JAX's convention).
    """
    tasks = _tasks_on_this_node(env)
    local_id = _int(env, "SLURM_LOCALID")
    if tasks is None or tasks <= 1 or local_id is None:
        return None
    if not 0 <= local_id < tasks:
        raise ValueError(f"SLURM_LOCALID={local_id} is not in [0, {tasks}) (tasks on this node)")
    gpus = visible_gpus(env)
    if gpus is None:
        return (local_id,)
    if len(gpus) < tasks:
        return None  # bound by SLURM: exactly this task's GPUs are visible
    if len(gpus) % tasks:
        raise ValueError(f"{tasks} tasks on this node share {len(gpus)} visible GPUs ({','.join(gpus)}), which do "
                         "not split evenly; use `srun --gpus-per-task=N` or a task count that divides the GPUs")
    per_task = len(gpus) // tasks
    return tuple(range(local_id * per_task, (local_id + 1) * per_task))


# ----------------------------------------------------------------------------------------------
# The decision


def _int(env: Mapping[str, str], key: str) -> int | None:
    v = env.get(key)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {key}={v!r} is not an integer") from None


def resolve(env: Mapping[str, str], coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, mode: str | None = None) -> Plan:
    """How this process joins the run, from explicit arguments (flags) first, then `env`."""
    mode = (mode or env.get("CXRJAX_DISTRIBUTED") or "auto").lower()
    if mode not in MODES:
        raise ValueError(f"CXRJAX_DISTRIBUTED={mode!r}; expected one of {MODES}")
    coordinator_address = coordinator_address or env.get("CXRJAX_COORDINATOR") or None
    num_processes = num_processes if num_processes is not None else _int(env, "CXRJAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int(env, "CXRJAX_PROCESS_ID")

    if mode == "none":
        return Plan("single")
    if mode == "explicit" or (mode == "auto" and (coordinator_address or num_processes is not None)):
        missing = [n for n, v in (("coordinator address (--coordinator_address / CXRJAX_COORDINATOR)", coordinator_address),
                                  ("process count (--num_processes / CXRJAX_NUM_PROCESSES)", num_processes),
                                  ("process id (--process_id / CXRJAX_PROCESS_ID)", process_id)) if v is None]
        if missing:
            raise ValueError("a multi-process run needs all three of coordinator, process count and process id; "
                             f"missing: {', '.join(missing)}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
        if num_processes == 1:
            return Plan("single")
        if ":" not in coordinator_address:
            raise ValueError(f"coordinator address {coordinator_address!r} needs a port, e.g. host:12345")
        return Plan("explicit", coordinator_address, num_processes, process_id)
    if mode == "slurm" or (mode == "auto" and env.get("SLURM_JOB_ID") and (_int(env, "SLURM_NTASKS") or 1) > 1):
        for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"):
            if key not in env:
                raise ValueError(f"SLURM mode but {key} is not set: run the command under `srun`")
        if not slurm_in_step(env):
            # Process 0 would wait in jax.distributed.initialize for tasks that never start.
            raise ValueError(
                f"SLURM job {env['SLURM_JOB_ID']} has {env['SLURM_NTASKS']} tasks but this process is not an srun "
                "step (it is the batch script or an salloc shell): start it as `srun python -m cxrjax.main ...` "
                "(launch/slurm_gpu.sbatch does), or set CXRJAX_DISTRIBUTED=none for a single process")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError("SLURM mode but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
        port = _int(env, "CXRJAX_COORDINATOR_PORT") or slurm_port(env["SLURM_JOB_ID"])
        return Plan("slurm", f"{first_slurm_host(nodelist)}:{port}", int(env["SLURM_NTASKS"]),
                    int(env["SLURM_PROCID"]), slurm_local_devices(env))
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if mode == "tpu" or (mode == "auto" and len([w for w in workers.split(",") if w]) > 1):
        return Plan("tpu")
    return Plan("single")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str | None = None, env: Mapping[str, str] | None = None) -> Plan:
    """Join the multi-process run this process belongs to (no-op for a single process)."""
    plan = resolve(os.environ if env is None else env, coordinator_address, num_processes, process_id, mode)
    if plan.mode == "single":
        return plan
    import jax

    if plan.mode == "explicit" and plan.coordinator_address.split(":")[0] in ("localhost", "127.0.0.1"):
        # Several processes on one host share its CPU: gloo carries the cross-process collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**plan.kwargs())
    return plan


def barrier(name: str) -> None:
    """Every process waits here until all arrive (no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
