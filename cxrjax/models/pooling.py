"""ResNet's stem max-pool (3x3 window, stride 2, padding 1, NHWC) with its gradient lowered per backend.

The values and the gradient are those of `lax.reduce_window(max)` on every backend: the gradient of
each window goes to its first maximum in row-major window order (XLA's select-and-scatter, and
torch's max_pool2d indices), summed where windows overlap. Only how the backward pass is written
differs, chosen when the step is lowered (`lax.platform_dependent`):

- GPU / TPU: XLA's own select-and-scatter (a native kernel there).
- CPU: XLA:CPU expands select-and-scatter into an iota/scatter loop over the padded input: 250-350 ms
  alone for ResNet-18's stem at 224 px, batch 16 (benchmarks/conv_bench.py). Here the
  window's first maximum is found with nine compares on the output grid and the gradient is
  written back as four stride-2 parity planes of the input (each input pixel belongs to at most
  2 x 2 windows), then interleaved: ~4x faster. Overlapping contributions are added in another
  order than XLA's, so results can differ in the last bit (tests/test_pooling.py).

Written as a custom JVP (JAX transposes it for the backward pass), so forward mode works. Edge cases:
a window whose pixels are all -inf sends its gradient to the padding (lost), as XLA's does (torch picks
a pixel); on the CPU a window holding NaN sends it to its first NaN (XLA's may pick another pixel).
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


@jax.custom_jvp
def _max_pool(x: jax.Array) -> jax.Array:
    return _max_pool_xla(x)


@_max_pool.defjvp
def _max_pool_jvp(primals, tangents):
    # A custom JVP (not VJP): forward mode keeps working, and JAX transposes the tangent map below
    # into the backward pass -- slices of parity planes become pads, the de-interleave a re-interleave.
    (x,), (dx,) = primals, tangents
    y = _max_pool_xla(x)
    return y, lax.platform_dependent(x, y, dx, cpu=_parity_planes_tangent, default=_select_and_gather_tangent)


def _select_and_gather_tangent(x, y, dx):
    del y
    return jax.jvp(_max_pool_xla, (x,), (dx,))[1]


def _first_max_offsets(x, y):
    """{(i, j): mask on the output grid}: window offset (i, j) holds the window's first maximum
    (row-major); a NaN counts as equal to a NaN maximum."""
    ho, wo = y.shape[1], y.shape[2]
    xp = jnp.pad(x, ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)), constant_values=-jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    y_nan = jnp.isnan(y)
    hits = {}
    for i in range(_WINDOW):
        for j in range(_WINDOW):
            v = xp[:, i:i + _STRIDE * (ho - 1) + 1:_STRIDE, j:j + _STRIDE * (wo - 1) + 1:_STRIDE, :]
            hit = ((v == y) | (jnp.isnan(v) & y_nan)) & ~taken
            taken = taken | hit
            hits[i, j] = hit
    return hits


def _parity_planes_tangent(x, y, dx):
    """dy = the tangent of each window's first maximum. The padded tangent is split into its four
    stride-2 parity planes (padded row 2a + p -> plane p, row a); offset (i, j) of output (a, b) is
    plane (i % 2, j % 2) at (a + i // 2, b + j // 2): plain slices, whose transpose is a pad."""
    b, h, w, c = x.shape
    ho, wo = y.shape[1], y.shape[2]
    hits = _first_max_offsets(x, y)
    # pad to exactly 2 (Ho + 1) x 2 (Wo + 1) padded rows/cols (>= H + 2 always), then de-interleave
    dxp = jnp.pad(dx, ((0, 0), (_PAD, 2 * ho + 2 - h - _PAD), (_PAD, 2 * wo + 2 - w - _PAD), (0, 0)))
    planes = dxp.reshape(b, ho + 1, 2, wo + 1, 2, c)
    zero = jnp.zeros((), dx.dtype)
    dy = None
    for (i, j), hit in hits.items():
        part = planes[:, i // 2:i // 2 + ho, i % 2, j // 2:j // 2 + wo, j % 2, :]
        term = jnp.where(hit, part, zero)
        dy = term if dy is None else dy + term
    return dy


def _select_and_scatter_grad(x, y, g):
    """XLA's gradient (select-and-scatter), for comparisons."""
    del y
    return jax.vjp(_max_pool_xla, x)[1](g)[0]


def _parity_planes_grad(x, y, g):
    """The CPU gradient alone, as JAX transposes `_parity_planes_tangent` (for benchmarks)."""
    return jax.linear_transpose(lambda dx: _parity_planes_tangent(x, y, dx), x)(g)[0]
