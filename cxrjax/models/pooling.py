"""ResNet's stem max-pool (3x3 window, stride 2, padding 1, NHWC) with its gradient lowered per backend.

The values and the gradient are those of `lax.reduce_window(max)` on every backend: the gradient of
each window goes to its first maximum in row-major window order (XLA's select-and-scatter, and
torch's max_pool2d indices), summed where windows overlap. Only how the backward pass is written
differs, chosen when the step is lowered (`lax.platform_dependent`):

- GPU / TPU: XLA's own select-and-scatter (a native kernel there).
- CPU: XLA:CPU expands select-and-scatter into an iota/scatter loop over the padded input: 250 ms
  of a 2.5 s ResNet-18 MoCo step at 224 px, batch 16 (benchmarks/step_profile.py). Here the
  window's first maximum is found with nine compares on the output grid and the gradient is
  written back as four stride-2 parity planes of the input (each input pixel belongs to at most
  2 x 2 windows), then interleaved: ~4x faster. Overlapping contributions are added in another
  order than XLA's, so results can differ in the last bit (tests/test_pooling.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_WINDOW, _STRIDE, _PAD = 3, 2, 1


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Max over 3x3 windows, stride 2, 1 pixel of -inf padding on each side (torchvision's
    ``MaxPool2d(3, 2, 1)``), on (B, H, W, C)."""
    if x.ndim != 4:
        raise ValueError(f"max_pool_3x3_s2 expects NHWC input, got shape {x.shape}")
    return _max_pool(x)


def _max_pool_xla(x: jax.Array) -> jax.Array:
    # a Python scalar init: JAX then recognises the max monoid (reduce_window_max, differentiable)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, _WINDOW, _WINDOW, 1), (1, _STRIDE, _STRIDE, 1),
                             ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)))


@jax.custom_vjp
def _max_pool(x: jax.Array) -> jax.Array:
    return _max_pool_xla(x)


def _forward(x):
    y = _max_pool_xla(x)
    return y, (x, y)


def _backward(residuals, g):
    x, y = residuals
    return (lax.platform_dependent(x, y, g, cpu=_parity_planes_grad, default=_select_and_scatter_grad),)


def _select_and_scatter_grad(x, y, g):
    del y
    return jax.vjp(_max_pool_xla, x)[1](g)[0]


def _parity_planes_grad(x, y, g):
    b, h, w, c = x.shape
    ho, wo = y.shape[1], y.shape[2]
    xp = jnp.pad(x, ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)), constant_values=-jnp.inf)
    zero = jnp.zeros((), g.dtype)
    # Gradient of window offset (i, j) on the output grid: g where that offset holds the window's
    # first maximum (row-major), else 0.
    taken = jnp.zeros(y.shape, bool)
    part = {}
    for i in range(_WINDOW):
        for j in range(_WINDOW):
            v = xp[:, i:i + _STRIDE * (ho - 1) + 1:_STRIDE, j:j + _STRIDE * (wo - 1) + 1:_STRIDE, :]
            hit = (v == y) & ~taken
            taken = taken | hit
            part[i, j] = jnp.where(hit, g, zero)
    # Padded row 2a + p receives offset i from output row a (p = i = 0, 1) or a - 1 (i = 2, p = 0):
    # per parity, (offset, shift by one output row).
    sources = {0: ((0, 0), (2, 1)), 1: ((1, 0),)}
    rows = []
    for p in (0, 1):
        cols = []
        for q in (0, 1):
            plane = None
            for i, si in sources[p]:
                for j, sj in sources[q]:
                    t = jnp.pad(part[i, j], ((0, 0), (si, 1 - si), (sj, 1 - sj), (0, 0)))
                    plane = t if plane is None else plane + t
            cols.append(plane)  # (B, Ho + 1, Wo + 1, C)
        rows.append(jnp.stack(cols, axis=3))  # (B, Ho + 1, Wo + 1, 2, C)
    dxp = jnp.stack(rows, axis=2).reshape(b, 2 * ho + 2, 2 * wo + 2, c)  # padded rows 0 .. 2 Ho + 1
    return dxp[:, _PAD:_PAD + h, _PAD:_PAD + w, :]


_max_pool.defvjp(_forward, _backward)
