"""Which JAX backend this process will run on: guessed before JAX starts, checked after.

Two questions at start-up, with different constraints:

- `will_run_on_cpu()` is asked BEFORE the backend exists (XLA reads XLA_FLAGS once, when it creates
  the backend, so CPU-only flags must be decided first). It must not initialise JAX, so it reads
  what decides the backend: JAX_PLATFORMS, then the accelerator plugins that are installed (the
  `jax_plugins` namespace / entry points that `jax[cuda12]` and friends install, `libtpu` for
  `jax[tpu]`, PJRT_NAMES_AND_LIBRARY_PATHS). No plugin and no platform asked for: the CPU, surely.
  A plugin installed: probably its accelerator (a GPU wheel on a machine without a GPU still falls
  back to the CPU, which then runs without the CPU tuning -- slower, never wrong).
- `require_accelerator()` is asked AFTER start-up (`jax.distributed.initialize` first): a run that
  asked for an accelerator and got the CPU stops with one line saying why, instead of training for
  days at CPU speed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
from typing import Mapping

# Distributions whose presence gives JAX a non-CPU backend (jax[tpu] installs libtpu; the GPU extras
# install a jax-*-plugin, which also registers itself in the `jax_plugins` namespace/entry points).
ACCELERATOR_DISTRIBUTIONS = ("libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
                             "jax-cuda13-pjrt", "jax-rocm7-plugin", "jax-rocm7-pjrt")


class AcceleratorError(RuntimeError):
    """An accelerator was required and the run is on the CPU; the message says what to install."""


def accelerator_plugins() -> list[str]:
    """Names of the installed packages that can give JAX an accelerator backend (never imports them)."""
    found = set()
    for name in ACCELERATOR_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
            found.add(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        found |= {f"jax_plugins:{ep.name}" for ep in importlib.metadata.entry_points(group="jax_plugins")}
    except Exception:  # a broken distribution's metadata must not stop a run
        pass
    spec = importlib.util.find_spec("jax_plugins")  # the namespace package itself holds no code
    if spec is not None and spec.submodule_search_locations:
        found |= {f"jax_plugins.{m.name}" for m in pkgutil.iter_modules(list(spec.submodule_search_locations))}
    return sorted(found)


def requested_platforms(env: Mapping[str, str] | None = None) -> list[str]:
    """JAX_PLATFORMS as a list (JAX's priority order: the first listed that starts is the default)."""
    env = os.environ if env is None else env
    value = env.get("JAX_PLATFORMS") or env.get("JAX_PLATFORM_NAME") or ""
    return [p.strip().lower() for p in value.split(",") if p.strip()]


def will_run_on_cpu(env: Mapping[str, str] | None = None, plugins: list[str] | None = None) -> bool:
    """True when JAX's default backend will be the CPU, decided without starting JAX."""
    env = os.environ if env is None else env
    platforms = requested_platforms(env)
    if platforms:
        return platforms[0] == "cpu"
    if env.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
        return False
    return not (accelerator_plugins() if plugins is None else plugins)


def require_accelerator(required: bool = True) -> str:
    """Raise AcceleratorError when `required` and JAX's default backend is the CPU; returns the backend.

    Call after `jax.distributed.initialize` (this starts the backend)."""
    import jax

    backend = jax.default_backend()
    if not required or backend != "cpu":
        return backend
    platforms, plugins = requested_platforms(), accelerator_plugins()
    if platforms and platforms[0] == "cpu":
        why = f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r} asks for it; unset it"
    elif plugins:
        visible = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES") if k in os.environ}
        why = (f"{', '.join(plugins)} is installed but found no device ({visible or 'no *_VISIBLE_DEVICES set'}); "
               "check nvidia-smi / the job's GPU request")
    else:
        why = ("this installation has no accelerator plugin: pip install -e '.[cuda12]' (NVIDIA GPUs) or "
               "-e '.[tpu]' (Cloud TPU VMs)")
    raise AcceleratorError(f"an accelerator was required (require_accelerator) but JAX runs on the CPU: {why}")
