"""The MoCo step gives the same UPDATES on 1 device, 8 devices, a data x fsdp x model mesh, and 2
processes: gradient norms and losses, and every array of the train state (parameters, momentum
encoder, BatchNorm statistics, optimizer trace, queue), at each of several plain-SGD steps.

Why SGD and updates, not losses under Adam: Adam divides the gradient by its own running scale, so a
gradient summed over devices instead of averaged (psum for pmean) moves the parameters exactly as
much and the losses agree; under SGD it moves them N times as far. Parameters are compared through
their update (new - old), so the tolerance is relative to how far the step moved them: a scale
error of 2x is a relative error of 1, far outside it.

How: the 1-device run is the reference trajectory s0 -> s1 -> ... -> s4. Every other layout is
given the SAME state s_t (resharded onto its mesh) and batch t, and its s_{t+1} and metrics are
compared with the reference's -- step by step, so float rounding cannot compound. (Chaining each
layout on its own does compound: scaling the parameters of a one-device run by (1 + 1e-6) changed
its step-3 gradient norm by 50% at 32 px and by 2% at 64 px, so whole trajectories of different
layouts are not comparable at any useful tolerance.) Steps 2-4 start from states with a filled
queue, a non-zero momentum trace and moved BN statistics, so each is a different test point.

Everything goes through the public API the trainer uses (`contrastive.build_training` from a config,
its jitted step with its shardings). The batches are fixed uint8 noise images (host-augmented views,
as the pipeline hands them over), identical for every layout: the global batch and the state are
assembled from the same numpy arrays on every mesh (`jax.make_array_from_callback`), so only the
step's sharding differs. Noise, not the phantom, because the phantom's flat black borders make
max-pool windows with exact ties whose gradient XLA may route differently under a different
partitioning (a valid subgradient, not a bug, but not comparable at 1e-4).

Run as a script, this file is one process of the 2-process run:
    python tests/test_invariance.py --coordinator=localhost:PORT --num_processes=2 --process_id=I \
        --reference=REF.npz --out=F.npz
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

STEPS = 4
# Relative to the size of the update (or of the value, for what the step does not move). One step
# from the same state agrees to ~1e-6 (gradient norms) and ~1e-5 (state) across layouts -- except
# where the step itself is sensitive (see `one_device`), where the bound is 10x that sensitivity.
TOL = 2e-4


def make_config():
    from cxrjax.train import contrastive as ct

    c = ct.apply_variants(ct.default_config(), "demo")
    c.model.width = 8
    c.augment.size = 64
    c.batch_size = 16
    c.moco.update(queue_size=64, shuffle_bn=True, shuffle_bn_groups=4)  # 4 groups: divides 1, 4 and 8 devices
    # lr 0.1: at 0.2 the trajectory sits at the edge of chaos -- on some CPUs (and thread layouts) a 1e-6
    # perturbation changed steps 2-4 by 1-2 % (max-pool / ReLU flips), leaving no tight comparison
    c.optim.update(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="constant", warmup_steps=0,
                   scale_by_batch=False)
    return c


def make_batches(config, steps=STEPS) -> list[dict]:
    rng = np.random.default_rng(2024)
    b, s = config.batch_size, config.augment.size
    out = []
    for _ in range(steps):
        patient = rng.permutation(b).astype(np.int32) // 2  # 2 images per patient
        study = patient * 2 + rng.integers(0, 2, b, dtype=np.int32)
        out.append({"query": rng.integers(0, 256, (b, s, s, 1), dtype=np.uint8),
                    "key": rng.integers(0, 256, (b, s, s, 1), dtype=np.uint8),
                    "patient": patient, "study": study, "laterality": rng.integers(0, 2, b, dtype=np.int32),
                    "key_study": study, "key_laterality": rng.integers(0, 2, b, dtype=np.int32)})
    return out


def _global(value: np.ndarray, sharding):
    """The global array `value` laid out by `sharding` (each process fills its own shards)."""
    import jax

    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _to_numpy(tree) -> dict[str, np.ndarray]:
    import jax
    from jax.experimental import multihost_utils

    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        full = multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else jax.device_get(x)
        out[jax.tree_util.keystr(path)] = np.asarray(full)
    return out


class Stepper:
    """The trainer's jitted step on `mesh`, compiled once, run over the fixed batches."""

    def __init__(self, config, mesh):
        import jax

        from cxrjax.data import pipeline
        from cxrjax.train import contrastive as ct
        from cxrjax.train import mesh as mesh_lib

        self.config = config
        self.setup = ct.build_training(config, mesh, total_steps=STEPS)
        self.batch_sharding = pipeline.batch_sharding(mesh, mesh_lib.BATCH_AXES)
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(self.setup.state)
        self.keys = [jax.tree_util.keystr(p) for p, _ in leaves]
        self.shardings = jax.tree_util.tree_leaves(self.setup.state_sharding)
        assert len(self.shardings) == len(self.keys)

    def _load(self, numpy_state):
        import jax

        return jax.tree_util.tree_unflatten(
            self.treedef, [_global(numpy_state[k], sh) for k, sh in zip(self.keys, self.shardings)])

    def run(self, states: list[dict] | None = None) -> dict:
        """Without `states`: the chained trajectory from the initial state (the reference). With
        `states`: step t starts from states[t]. Returns per-step loss and gradient norm, and the
        states (numpy, by key path) s0..s_STEPS."""
        state = self.setup.state if states is None else None
        out = {"loss": [], "grad_norm": [], "inputs": [], "states": [_to_numpy(state) if states is None else states[0]]}
        for t, batch in enumerate(make_batches(self.config)):
            if states is not None:
                state = self._load(states[t])
            out["inputs"].append(out["states"][-1] if states is None else states[t])
            state, metrics = self.setup.train_step(
                state, {k: _global(v, self.batch_sharding) for k, v in batch.items()})
            out["loss"].append(float(metrics["loss"]))
            out["grad_norm"].append(float(metrics["grad_norm"]))
            out["states"].append(_to_numpy(state))
        out["loss"], out["grad_norm"] = np.array(out["loss"]), np.array(out["grad_norm"])
        return out


def differences(ref: dict, other: dict) -> list[dict]:
    """Per step: relative differences of loss and gradient norm, and for every state array the
    difference of the UPDATES (output - input of the step) relative to the reference's update, or
    to 1% of the array's size when the step barely moves it (float rounding of the value itself is
    then ~1e-4 of that); integer arrays must be equal."""
    out = []
    for t in range(1, STEPS + 1):
        prev, want, got, got_prev = ref["states"][t - 1], ref["states"][t], other["states"][t], other["inputs"][t - 1]
        assert sorted(got) == sorted(want)
        d = {"loss": abs(other["loss"][t - 1] / ref["loss"][t - 1] - 1),
             "grad_norm": abs(other["grad_norm"][t - 1] / ref["grad_norm"][t - 1] - 1), "state": {}}
        for key, w in want.items():
            g = got[key]
            assert g.shape == w.shape and g.dtype == w.dtype, (key, g.shape, w.shape, g.dtype, w.dtype)
            if not np.issubdtype(w.dtype, np.floating):  # step, rng, queue ids and pointer: exact
                d["state"][key] = 0.0 if np.array_equal(g, w) else np.inf
                continue
            w64, g64 = w.astype(np.float64), g.astype(np.float64)
            update, other_update = w64 - prev[key], g64 - got_prev[key]
            d["state"][key] = np.linalg.norm(other_update - update) / max(
                np.linalg.norm(update), 1e-2 * np.linalg.norm(w64), 1e-12)
        out.append(d)
    return out


def assert_same_updates(ref: dict, other: dict, name: str) -> None:
    """`other` equals the reference step by step, within TOL or 10x the reference's own sensitivity
    (how much the same step moves when its input state is perturbed by 1e-6), whichever is larger."""
    diffs = differences(ref, other)
    for t, (d, noise) in enumerate(zip(diffs, ref["noise"]), start=1):  # the whole table first, then the verdict
        top = sorted(d["state"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{name}: step {t}: loss {d['loss']:.1e}, gradient norm {d['grad_norm']:.1e} (sensitivity "
              f"{noise['grad_norm']:.1e}); worst state " + ", ".join(f"{k} {v:.1e}" for k, v in top))
    for t, (d, noise) in enumerate(zip(diffs, ref["noise"]), start=1):
        for what in ("grad_norm", "loss"):
            allowed = max(TOL, 10 * noise[what])
            assert d[what] < allowed, f"{name}: step {t} {what} differs by {d[what]:.2e} (allowed {allowed:.1e})"
        allowed = max(TOL, 10 * max(noise["state"].values()))
        key, err = max(d["state"].items(), key=lambda kv: kv[1])
        assert err < allowed, f"{name}: step {t} {key} differs from the 1-device step by {err:.2e} of its update " \
                              f"(allowed {allowed:.1e})"


def _perturbed(states: list[dict], scale=1e-6) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{k: (v * (1 + scale * rng.standard_normal(v.shape))).astype(v.dtype) if k.startswith(".q_params") else v
             for k, v in s.items()} for s in states]


@pytest.fixture(scope="module")
def one_device():
    """The reference trajectory on 1 device, and its sensitivity: each step again from the reference
    states with the query parameters perturbed by 1e-6 (relative), as float rounding might."""
    import jax

    from cxrjax.train import mesh as mesh_lib

    stepper = Stepper(make_config(), mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    ref = stepper.run()
    shaken = differences(ref, stepper.run(_perturbed(ref["states"])))
    ref["noise"] = [{"loss": d["loss"], "grad_norm": d["grad_norm"], "state": d["state"]} for d in shaken]
    return ref


def test_sgd_moves_the_parameters_and_the_comparison_has_power(one_device):
    """The comparisons mean something only if every step moves the parameters well beyond the
    tolerance and the step is not so sensitive that float rounding alone changes it by 1%."""
    states, sharp = one_device["states"], 0
    for t in range(1, STEPS + 1):
        q = [k for k in states[t] if k.startswith(".q_params")]
        moved = np.sqrt(sum(np.sum((states[t][k] - states[t - 1][k]) ** 2) for k in q))
        size = np.sqrt(sum(np.sum(states[t - 1][k] ** 2) for k in q))
        assert moved / size > 1e-3, (t, moved / size)
        noise = one_device["noise"][t - 1]
        print(f"step {t}: parameters moved {moved / size:.1e} of their size; sensitivity to a 1e-6 perturbation: "
              f"gradient norm {noise['grad_norm']:.1e}, state {max(noise['state'].values()):.1e}")
        sharp += noise["grad_norm"] < TOL / 10 and max(noise["state"].values()) < TOL
    assert sharp >= STEPS - 1, "the steps are too sensitive to float rounding for a tight comparison"
    assert np.isfinite(one_device["loss"]).all() and (one_device["grad_norm"] > 0).all()
    assert int(states[-1][".step"]) == STEPS and int(states[-1][".queue.ptr"]) == STEPS * 16 % 64
    assert any(k.startswith(".opt_state") for k in states[0]) and any(k.startswith(".k_stats") for k in states[0])


@pytest.mark.parametrize("layout", [{"data": 8}, {"data": 2, "fsdp": 2, "model": 2}],
                         ids=["data8", "data2-fsdp2-model2"])
def test_same_updates_on_8_devices(one_device, eight_devices, layout):
    from cxrjax.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(layout, devices=eight_devices)
    assert mesh.devices.size == 8
    assert_same_updates(one_device, Stepper(make_config(), mesh).run(one_device["states"]), f"mesh {layout}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _save_states(path, states, **extra):
    np.savez(path, **extra, **{f"s{t}:{k}": v for t, state in enumerate(states) for k, v in state.items()})


def _load_states(f) -> list[dict]:
    states: dict[int, dict] = {}
    for name in f.files:
        if name.startswith("s") and ":" in name:
            t, key = name[1:].split(":", 1)
            states.setdefault(int(t), {})[key] = f[name]
    return [states[t] for t in sorted(states)]


@pytest.mark.slow
def test_same_updates_on_2_processes(one_device, tmp_path):
    """2 processes x 2 devices, joined by jax.distributed (cxrjax.distributed, gloo on CPU)."""
    reference = tmp_path / "reference.npz"
    _save_states(reference, one_device["states"])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, f"--coordinator=localhost:{port}", "--num_processes=2",
                               f"--process_id={i}", f"--reference={reference}", f"--out={tmp_path / f'p{i}.npz'}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    for i in range(2):
        with np.load(tmp_path / f"p{i}.npz") as f:
            result = {"loss": f["loss"], "grad_norm": f["grad_norm"], "states": _load_states(f),
                      "inputs": one_device["states"][:-1]}
        assert_same_updates(one_device, result, f"2 processes (process {i})")


def _worker(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num_processes", type=int, required=True)
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from cxrjax import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    from cxrjax.train import mesh as mesh_lib

    jax.config.update("jax_threefry_partitionable", True)  # as cxrjax.main
    assert jax.process_count() == args.num_processes and jax.device_count() == 2 * args.num_processes
    config = make_config()
    with np.load(args.reference) as f:
        states = _load_states(f)
    r = Stepper(config, mesh_lib.make_mesh(config.mesh)).run(states)
    _save_states(Path(args.out), r["states"], loss=r["loss"], grad_norm=r["grad_norm"])


if __name__ == "__main__":
    _worker()
