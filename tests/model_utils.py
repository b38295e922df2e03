"""Helpers shared by the model tests."""

import jax.numpy as jnp
import numpy as np
from flax import nnx


def fast_init(factory, seed=0):
    """Build a model abstractly and fill it from numpy (He-normal kernels, BN identity).

    Eager NNX init compiles one PRNG kernel per distinct shape (seconds each on a busy 2-core
    machine); tests whose claim does not involve the initialiser use this instead.
    """
    model = nnx.eval_shape(factory)
    rng = np.random.default_rng(seed)
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "kernel":
            val = rng.normal(size=var.shape) * np.sqrt(2.0 / np.prod(var.shape[:-1]))
        elif path[-1] in ("scale", "var"):
            val = np.ones(var.shape)
        else:
            val = np.zeros(var.shape)
        var.set_value(jnp.asarray(val, var.dtype))
    nnx.update(model, state)
    return model


def torchvision_models():
    """Real `torchvision.models`. torch and torchvision are test dependencies (`pip install -e ".[test]"`
    installs both): a missing one fails the test instead of skipping the parity checks silently.

    PyPI's torchvision wheels are CUDA builds. Beside a CPU-only torch (this project's machines: the local
    torch 2.13.0+cpu wheel) their compiled ops (nms, roi_align, ...: detection only) cannot load, and
    `import torchvision` then fails where it registers those ops' meta and autograd kernels ('operator
    torchvision::nms does not exist'). The ResNets use none of them: they are imported without those two
    registration modules. Where the ops load, torchvision is imported untouched.
    """
    import sys
    import types

    import pytest

    try:
        import torch  # noqa: F401
        import torchvision
    except ModuleNotFoundError as e:
        pytest.fail(f'{e.name} is a test dependency: pip install -e ".[test]"')
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        import torchvision
    return torchvision.models


def randomize_torch_batchnorm(net, seed=0):
    """Random BN affine parameters AND running statistics in a torch module (a mapping that swaps
    weight/bias or mean/var, or drops a layer's statistics, then changes the outputs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                mod.num_batches_tracked.fill_(100)
    return net
