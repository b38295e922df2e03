"""Convolutions lowered per backend: the shapes XLA:CPU convolves slowly become slices and one matmul.

`conv_general_dilated` is `lax.conv_general_dilated` (same arguments, same values up to the order of
the sums), given to `nnx.Conv` by the ResNet. On GPU and TPU it *is* XLA's convolution. On the CPU
(`lax.platform_dependent`, chosen when the step is lowered) the convolutions that XLA:CPU's Eigen
kernels run slowly are computed as a matrix product instead: the input padded, the kh x kw strided
windows sliced and concatenated along the channels ([N, Ho, Wo, kh*kw*Cin], "im2col"), times the
kernel reshaped to [kh*kw*Cin, Cout]. Its gradients are slices/pads and two more matmuls.

Which shapes (NHWC / HWIO, no dilation, one group, explicit padding): forward + both gradients, batch 16,
2 AMD EPYC cores, `python benchmarks/conv_bench.py --matmul --stages=0 --skip=torch --size=S` for S = 64,
128, 224 (2026-11-30 23:51-23:54 UTC; single calls move by ~10 %):

- k x k kernels with at most 4 output positions (layer 4 at 64 px): 9-50x faster -- Eigen spends ~390 ms
  on a 3x3 convolution of 16 x 2 x 2 x 512 and its gradients, the matmul 8 ms. (This made a 64 px MoCo
  step 2.0 s, slower than a 128 px one.)
- k x k kernels with at most 36 output positions and at least 256 input channels (layer 4 at 128 px,
  layer 3 at 64 px): 1.02-1.27x. With fewer channels or larger maps Eigen's convolution is as fast or
  faster (0.4-1.0x): those stay convolutions, as does the 1-channel stem.
- 1x1 kernels, any stride: ResNet-18's downsample convolutions together 1.39x at 224 px, ResNet-50's
  1x1 convolutions together 1.09-1.26x (single shapes 0.5-2x: XLA's gradients of a 1x1 convolution
  are the slow part, the matmul's are plain GEMMs).

In the trainer's MoCo step (ResNet-18, batch 16, with and without this lowering taking turns:
`python benchmarks/train_bench.py --skip=torch --xla_conv --sizes=64,128,224`): 64 px 10.1x, 128 px 1.04x,
224 px 0.99x (only the downsamples change there). XLA counts the matmul's multiplications by the
padding's zeros, which its convolution does not: the step's FLOP count rises 8 % at 128 px (63.7 -> 68.6
GFLOP; on the CPU only).
"""

from __future__ import annotations

import contextlib
import functools

import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
SMALL_MAP = 4  # output positions: k x k convolutions this small are always faster as a matmul on the CPU
WIDE_MAP, WIDE_CHANNELS = 36, 256  # ... and up to this many with at least this many input channels
_matmuls_enabled = True  # False inside `xla_convolutions()`


@contextlib.contextmanager
def xla_convolutions():
    """Within: every convolution traced is XLA's, on the CPU too -- the program GPU/TPU compile, and the
    A/B baseline of the benchmarks. Acts when a function is traced, not when it runs: jax reuses the
    trace of a function it already traced with the same shapes, so trace a fresh one (e.g. a new build of
    the step) inside."""
    global _matmuls_enabled
    before, _matmuls_enabled = _matmuls_enabled, False
    try:
        yield
    finally:
        _matmuls_enabled = before


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
    """`lax.conv_general_dilated`, lowered as a matmul on the CPU for the shapes `cpu_matmul_applies` names."""
    xla = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
        out_sharding=out_sharding)
    plain = (out_sharding is None and feature_group_count == 1 and batch_group_count == 1
             and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
             and not isinstance(padding, str) and lhs.ndim == 4 and rhs.ndim == 4
             and _is_nhwc(lhs.shape, rhs.shape, dimension_numbers))
    if not (plain and _matmuls_enabled and cpu_matmul_applies(lhs.shape, rhs.shape, window_strides, padding)):
        return xla(lhs, rhs)
    matmul = functools.partial(_conv_as_matmul, strides=tuple(window_strides),
                               padding=tuple(tuple(p) for p in padding), precision=precision,
                               preferred_element_type=preferred_element_type)
    return lax.platform_dependent(lhs, rhs, cpu=matmul, default=xla)


def cpu_matmul_applies(lhs_shape, rhs_shape, strides, padding) -> bool:
    """Whether an NHWC x HWIO convolution runs faster as a matmul on the CPU (the module docstring)."""
    kh, kw, cin, _ = rhs_shape
    if kh == kw == 1:
        return True
    if cin == 1:  # the stem: Eigen's convolution wins (and the patches would be 49x the image)
        return False
    positions = 1
    for size, k, s, (lo, hi) in zip(lhs_shape[1:3], (kh, kw), strides, padding):
        positions *= max(0, (size + lo + hi - k) // s + 1)
    return 0 < positions and (positions <= SMALL_MAP or (positions <= WIDE_MAP and cin >= WIDE_CHANNELS))


def _is_nhwc(lhs_shape, rhs_shape, dimension_numbers) -> bool:
    if dimension_numbers is None:  # lax's default is NCHW / OIHW
        return False
    want = lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == want


def _conv_as_matmul(lhs, rhs, *, strides, padding, precision, preferred_element_type):
    kh, kw, cin, cout = rhs.shape
    n, h, w, _ = lhs.shape
    (pt, pb), (pl, pr) = padding
    ho, wo = (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1
    x = lhs
    if any(padding[0] + padding[1]):  # (a negative pad crops)
        x = lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    windows = [lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * strides[0] + 1, j + (wo - 1) * strides[1] + 1, cin),
                         (1, strides[0], strides[1], 1))
               for i in range(kh) for j in range(kw)]  # (i, j, channel) order = the kernel's HWIO rows
    patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    # one 2-D matmul: XLA:CPU runs it ~2x faster than the same product written on the 4-D patches
    out = lax.dot_general(patches.reshape(n * ho * wo, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                          (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(n, ho, wo, cout)
