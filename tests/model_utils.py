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
