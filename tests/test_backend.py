"""The backend a run will get, decided before JAX starts (CPU-only XLA flags) and checked after it
(require_accelerator), with JAX_PLATFORMS and installed plugins faked."""

import json
import os
import subprocess
import sys

import pytest

from cxrjax import backend, xla_cpu


@pytest.mark.parametrize("env,plugins,cpu", [
    ({}, [], True),  # the plain install: jaxlib's CPU backend only
    ({"JAX_PLATFORMS": "cpu"}, ["jax-cuda12-plugin"], True),  # asked for the CPU on a GPU install
    ({"JAX_PLATFORMS": "cuda"}, ["jax-cuda12-plugin"], False),
    ({"JAX_PLATFORMS": "tpu"}, [], False),
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], False),  # the first listed is the default backend
    ({"JAX_PLATFORMS": "cpu,cuda"}, [], True),
    ({"JAX_PLATFORMS": " CPU "}, [], True),
    ({"JAX_PLATFORM_NAME": "gpu"}, [], False),  # JAX's deprecated spelling
    ({}, ["jax-cuda12-plugin"], False),  # jax[cuda12] installed, nothing asked: the GPU
    ({}, ["libtpu"], False),  # jax[tpu]
    ({"PJRT_NAMES_AND_LIBRARY_PATHS": "mygpu:/opt/pjrt.so"}, [], False),  # a PJRT plugin by path
])
def test_will_run_on_cpu(env, plugins, cpu):
    assert backend.will_run_on_cpu(env, plugins) is cpu


def test_cpu_flags_only_for_a_cpu_backend():
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"}
    assert not xla_cpu.tune(env, plugins=["jax-cuda12-plugin"])
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"  # untouched
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert not xla_cpu.tune(env, plugins=["libtpu"])  # a TPU VM
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.tune(env, plugins=["jax-cuda12-plugin"])
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {xla_cpu.CPU_CONV_FLAG}"
    assert not xla_cpu.tune(env)  # set once
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}  # the user's own choice wins
    assert not xla_cpu.tune(env, plugins=[]) and env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    env = {}
    assert xla_cpu.tune(env, plugins=[]) and env["XLA_FLAGS"] == xla_cpu.CPU_CONV_FLAG


def _fake_site(root):
    """A site directory holding what `pip install jax[cuda12]` adds, without any code that runs."""
    (root / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
    (root / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("raise ImportError('never imported')\n")
    info = root / "jax_cuda12_plugin-0.10.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jax-cuda12-plugin\nVersion: 0.10.2\n")
    return root


def _probe(env):
    code = ("import json, os\n"
            "from cxrjax import backend, xla_cpu\n"
            "added = xla_cpu.tune()\n"
            "print(json.dumps([backend.accelerator_plugins(), added, os.environ.get('XLA_FLAGS', '')]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_installed_plugins_are_found_without_importing_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "PYTHONPATH")}
    plugins, added, flags = _probe(env)
    assert plugins == [] and added and flags == xla_cpu.CPU_CONV_FLAG  # this CPU-only venv
    env["PYTHONPATH"] = str(_fake_site(tmp_path))
    plugins, added, flags = _probe(env)
    assert plugins == ["jax-cuda12-plugin", "jax_plugins.xla_cuda12"]
    assert not added and flags == ""  # the GPU plugin would read XLA_FLAGS: no CPU flag in it
    plugins, added, flags = _probe({**env, "JAX_PLATFORMS": "cpu"})
    assert added and flags == xla_cpu.CPU_CONV_FLAG  # the user asked for the CPU


def test_require_accelerator_on_a_cpu_backend():
    import jax

    assert jax.default_backend() == "cpu"
    assert backend.require_accelerator(False) == "cpu"
    with pytest.raises(backend.AcceleratorError, match="JAX runs on the CPU: JAX_PLATFORMS='cpu' asks for it"):
        backend.require_accelerator(True)


def test_require_accelerator_says_what_to_install(tmp_path):
    code = ("from cxrjax import backend\n"
            "try:\n    backend.require_accelerator(True)\n"
            "except backend.AcceleratorError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ("an accelerator was required (require_accelerator) but JAX runs on the CPU: this "
                                "installation has no accelerator plugin: pip install -e '.[cuda12]' (NVIDIA GPUs) or "
                                "-e '.[tpu]' (Cloud TPU VMs)")
