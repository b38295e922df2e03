"""FLOPs of a compiled step and the model-FLOPs utilisation (MFU) they imply, per device.

`compiled.cost_analysis()` describes the per-device program XLA built (after SPMD partitioning: a step
sharded over N devices counts 1/N of the batch's FLOPs), so the utilisation of a device is

    mfu = step_flops / step_time / peak_flops_of_that_device

with no further division by the device count. Peaks are dense bf16 (the datasheet numbers MFU is
usually quoted against); matched on `jax.Device.device_kind`, longest prefix first, because one kind
string can be a prefix of another ("TPU v5" is v5p, "TPU v5 lite" is v5e).
"""

from __future__ import annotations

# device_kind prefix -> peak dense bf16 TFLOP/s per device (chip for TPUs, GPU for NVIDIA)
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,       # v5p reports its kind as "TPU v5"
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
    "TPU7x": 2307.0,       # Ironwood, fp8 4614
    "NVIDIA A100": 312.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100": 989.0,  # SXM / NVL
    "NVIDIA H200": 989.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10G": 70.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """The peak of the longest matching prefix, or None (CPUs and unknown devices)."""
    for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return PEAK_TFLOPS[prefix]
    return None


def step_flops(compiled) -> float:
    """XLA's FLOP count of one call of a compiled (per-device) program; 0 when the backend has none."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float((cost or {}).get("flops", 0.0))
    except Exception:  # cost analysis is best effort on some backends
        return 0.0


def utilisation(flops_per_device: float, seconds_per_step: float, device_kind: str) -> float | None:
    """Model-FLOPs utilisation of one device, or None when its peak is unknown."""
    peak = peak_tflops(device_kind)
    if not peak or seconds_per_step <= 0:
        return None
    return flops_per_device / seconds_per_step / (peak * 1e12)
