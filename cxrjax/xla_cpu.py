"""The XLA:CPU setting every cxrjax job uses; call `tune()` before JAX creates its backend.

XLA:CPU's Eigen convolutions run the ResNet step 1.5-2x faster than the YNNPACK ones jaxlib 0.10 uses
by default (benchmarks/train_bench.py). The flag is set only when the run will be on the CPU
(`backend.will_run_on_cpu`: accelerator plugins parse XLA_FLAGS too, and one that does not know a
CPU flag aborts the process), only for jaxlib 0.10 (where the flag exists), and a user's own
setting of it in XLA_FLAGS wins.
"""

from __future__ import annotations

import os
from typing import MutableMapping

from cxrjax import backend

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def tune(env: MutableMapping[str, str] | None = None, plugins: list[str] | None = None) -> bool:
    """Add the CPU flags to XLA_FLAGS in `env` (default os.environ) when they apply; True if added."""
    from importlib.metadata import PackageNotFoundError, version

    env = os.environ if env is None else env
    try:
        jaxlib_version = version("jaxlib")
    except PackageNotFoundError:
        return False
    current = env.get("XLA_FLAGS", "")
    if not jaxlib_version.startswith("0.10.") or "ynn_fusion_type" in current:
        return False
    if not backend.will_run_on_cpu(env, plugins):
        return False
    env["XLA_FLAGS"] = f"{current} {CPU_CONV_FLAG}".strip()
    return True
