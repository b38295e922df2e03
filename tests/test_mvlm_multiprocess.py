"""The image-report contrastive loss over several processes: 2 processes (jax.distributed, gloo) give the
same losses, gradient norms and parameters as 1 process on the same global batch.

With several processes the global batch is the processes' local batches side by side, each block of a
batch shard being [paired, image, text]: the paired rows of process 1 sit after process 0's image and
text rows. Taking the first B_paired rows (as the step once did) mixes image-only rows into the
contrastive loss and drops process 1's pairs; the step gathers every shard's paired embeddings.

Run as a script, this file is one worker: `python tests/test_mvlm_multiprocess.py PROCESS_ID
NUM_PROCESSES PORT OUT.json` (the test starts them).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
STEPS = 3
KEYS = ("loss", "itc_loss", "itc_acc", "mlm_loss", "mvm_loss", "grad_norm")


SHARDS = 2  # both runs: 2 devices, one batch shard each


def local_rows(process_id: int, num_processes: int) -> np.ndarray:
    """Rows of test_mvlm.train_batch (4 paired, 2 image, 2 text) that one process holds, in its local
    order: one [paired, image, text] block per batch shard it owns (vl_pipeline.shard_slices)."""
    paired, image, text = np.arange(4), np.arange(4, 6), np.arange(6, 8)
    blocks = [np.concatenate([np.split(k, SHARDS)[j] for k in (paired, image, text)]) for j in range(SHARDS)]
    mine = np.split(np.arange(SHARDS), num_processes)[process_id]
    return np.concatenate([blocks[j] for j in mine])


def worker(process_id: int, num_processes: int, port: int, out: str) -> None:
    from cxrjax import distributed

    if num_processes > 1:
        distributed.initialize(f"localhost:{port}", num_processes, process_id)
    import jax
    from flax import nnx

    sys.path.insert(0, str(HERE))
    from test_mvlm import COUNTS, VOCAB, tiny_config, train_batch

    from cxrjax.data import pipeline
    from cxrjax.train import mesh as mesh_lib
    from cxrjax.train import mvlm

    config = tiny_config()
    config.optim.update(lr=0.05, warmup_steps=0)  # visible updates from the first step
    mesh = mesh_lib.make_mesh(config.mesh)
    setup = mvlm.build_training(config, mesh, VOCAB, total_steps=10, counts=COUNTS)
    batch = train_batch()
    rows = local_rows(process_id, num_processes)
    local = {k: v[rows] for k, v in batch.items()}
    state, log = setup.state, []
    for _ in range(STEPS):
        state, m = setup.train_step(state, pipeline.to_global(local, setup.batch_sharding))
        log.append({k: float(m[k]) for k in KEYS})
    params = {"/".join(map(str, path)): np.asarray(v.get_value().addressable_data(0)).tolist()
              for path, v in nnx.to_flat_state(state.params)}
    if process_id == 0:
        Path(out).write_text(json.dumps({"log": log, "params": params, "processes": jax.process_count(),
                                         "devices": jax.device_count()}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(num_processes: int, devices_per_process: int, out: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(num_processes), str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_give_the_contrastive_loss_of_one(tmp_path):
    assert sorted(np.concatenate([local_rows(i, 2) for i in range(2)]).tolist()) == list(range(8))
    assert local_rows(1, 2).tolist() == [2, 3, 5, 7]  # process 1 holds paired rows 2, 3 of the batch
    assert local_rows(0, 1).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]  # one process: both blocks
    one = _run(1, 2, tmp_path / "one.json")  # 1 process x 2 devices
    two = _run(2, 1, tmp_path / "two.json")  # 2 processes x 1 device
    assert (one["processes"], two["processes"], one["devices"], two["devices"]) == (1, 2, 2, 2)
    for a, b in zip(one["log"], two["log"]):
        for k in KEYS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    assert one["log"][2]["loss"] != one["log"][0]["loss"]  # the parameters moved
    assert sorted(one["params"]) == sorted(two["params"]) and len(one["params"]) > 20
    for name, a in one["params"].items():
        a, b = np.asarray(a), np.asarray(two["params"][name])
        if name.endswith("attn/qkv_bias"):
            # the key bias adds q.b_k to every logit of a query: softmax ignores it, its gradient is
            # exactly 0 and Adam turns the rounding noise into steps of any sign. Query/value biases only.
            a, b = a[[0, 2]], b[[0, 2]]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)  # 3 Adam steps of lr 0.05


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
