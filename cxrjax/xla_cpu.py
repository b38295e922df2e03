"""The XLA:CPU setting every cxrjax job uses; call `tune()` before JAX creates its backend.

XLA:CPU's Eigen convolutions run the ResNet step 1.5-2x faster than the YNNPACK ones jaxlib 0.10 uses
by default (benchmarks/train_bench.py). The flag exists in jaxlib 0.10 only (an unknown XLA flag
aborts the process), it touches only the CPU backend, and a user's own XLA_FLAGS setting wins.
"""

from __future__ import annotations

import os

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def tune() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        jaxlib_version = version("jaxlib")
    except PackageNotFoundError:
        return
    current = os.environ.get("XLA_FLAGS", "")
    if jaxlib_version.startswith("0.10.") and "ynn_fusion_type" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {CPU_CONV_FLAG}".strip()
