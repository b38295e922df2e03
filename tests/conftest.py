"""Test set-up: 8 simulated CPU devices (forced before JAX starts, then checked) and the shared-data location."""

import os
import re
import tempfile
from pathlib import Path

import pytest

DEVICES = 8  # the simulated device count every multi-device test is written for

# Forced, not setdefault: a user's XLA_FLAGS without the device count (or with another one) would
# otherwise leave one device and let the device tests pass on it. Their other flags are kept.
_user_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_user_flags.strip()} --xla_force_host_platform_device_count={DEVICES}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"  # the simulated devices are CPU devices, whatever else is installed

# One persistent XLA compilation cache for the test process, its xdist sibling and every job the tests
# start as a subprocess (they inherit the environment): the same demo-size steps are compiled by many
# tests, and a cache hit loads the executable instead (same program bit for bit: the key is the HLO,
# the flags and the device set). Kept between runs under the user's cache folder; set
# JAX_COMPILATION_CACHE_DIR to move it, or to an empty string to compile everything afresh.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxrjax" / "jax-cache-tests"
    try:
        _cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (some CI runners): a per-user folder in the temp directory
        _cache = Path(tempfile.gettempdir()) / f"cxrjax-jax-cache-tests-{os.getuid()}"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")  # skip the many tiny jits

# Real public data lives beside the repo (../shared/data); a fresh clone may not have it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_sessionstart(session):
    """Stop before any test if JAX does not see the 8 devices (e.g. its backend started before this file ran)."""
    if getattr(session.config.option, "numprocesses", None) and not hasattr(session.config, "workerinput"):
        return  # the pytest-xdist controller runs no test; each worker checks
    import jax

    if jax.device_count() != DEVICES or jax.default_backend() != "cpu":
        pytest.exit(f"tests need {DEVICES} simulated CPU devices; JAX sees {jax.device_count()} "
                    f"{jax.default_backend()} device(s) (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}). Was JAX's backend "
                    "initialised before tests/conftest.py ran (a plugin)?", returncode=3)


@pytest.fixture
def eight_devices():
    """The 8 simulated devices, checked (for tests that build meshes from them)."""
    import jax

    devices = jax.devices()
    assert len(devices) == DEVICES, f"expected {DEVICES} devices, JAX sees {len(devices)}"
    return devices


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
