"""MFU from XLA's per-device FLOP count: a hand count on a sharded matmul, and the peak table against
the device-kind strings JAX reports on each platform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cxrjax.train import flops


def test_step_flops_is_per_device_and_mfu_is_not_divided_again(eight_devices):
    m, k, n = 64, 32, 16
    mesh = jax.make_mesh((8,), ("data",), devices=eight_devices)
    x = jax.device_put(np.ones((m, k), np.float32), NamedSharding(mesh, P("data")))
    w = jax.device_put(np.ones((k, n), np.float32), NamedSharding(mesh, P()))
    compiled = jax.jit(lambda x, w: jnp.dot(x, w)).lower(x, w).compile()
    per_device = 2 * (m // 8) * k * n  # multiply-adds of each device's 8 rows
    assert flops.step_flops(compiled) == per_device
    # a device that does per_device FLOPs in 1 us on a 275 TFLOP/s v4 chip
    assert flops.utilisation(per_device, 1e-6, "TPU v4") == pytest.approx(per_device / 1e-6 / 275e12)
    assert flops.utilisation(per_device, 1e-6, "cpu") is None


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v5p", 459.0), ("TPU v6 lite", 918.0),
    ("NVIDIA A100-SXM4-40GB", 312.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("cpu", None), ("Interpreter", None)])
def test_peak_table_matches_reported_device_kinds(kind, peak):
    """The strings are what `jax.devices()[0].device_kind` prints on each platform ("TPU v5" is v5p and
    a prefix of "TPU v5 lite", v5e: the longest prefix must win)."""
    assert flops.peak_tflops(kind) == peak
