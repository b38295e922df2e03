"""Convolutions lowered per backend (models/conv.py): on the CPU the shapes it names are slices + one
matmul, with values and both gradients equal to a float64 numpy reference and to torch's conv2d; the
other shapes, and every shape on GPU / TPU, stay XLA convolutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from cxrjax.models import conv as conv_lib
from cxrjax.models import resnet

NHWC = ("NHWC", "HWIO", "NHWC")


def reference(x: np.ndarray, w: np.ndarray, g: np.ndarray | None, stride: int, pad: int):
    """Cross-correlation as a sum over the kernel taps in float64, and with `g` (the output's cotangent)
    its gradients: each tap's window gets g @ w[i, j]^T back, each tap's kernel window^T @ g."""
    n, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    y, dxp, dw = np.zeros((n, ho, wo, cout)), np.zeros_like(xp), np.zeros((kh, kw, cin, cout))
    for i in range(kh):
        for j in range(kw):
            rows, cols = slice(i, i + (ho - 1) * stride + 1, stride), slice(j, j + (wo - 1) * stride + 1, stride)
            y += xp[:, rows, cols] @ w[i, j].astype(np.float64)
            if g is not None:
                dxp[:, rows, cols] += g.astype(np.float64) @ w[i, j].T.astype(np.float64)
                dw[i, j] = np.einsum("nhwc,nhwd->cd", xp[:, rows, cols], g.astype(np.float64))
    return y, dxp[:, pad:pad + h, pad:pad + wd], dw


def _conv(x, w, stride, pad):
    return conv_lib.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=NHWC)


# (input N, H, W, Cin), kernel, Cout, stride: the first five are matmuls on the CPU, the rest convolutions
MATMUL_CASES = [((2, 2, 2, 8), 3, 6, 1),     # 2x2 output: <= SMALL_MAP positions
                ((2, 4, 3, 5), 3, 4, 2),     # stride 2, 2x2 output, odd width
                ((1, 6, 6, 256), 3, 4, 1),   # 36 positions, 256 channels: the wide rule
                ((2, 7, 5, 3), 1, 4, 2),     # 1x1 stride 2 (torchvision's downsample), odd sizes
                ((2, 5, 5, 3), 1, 4, 1)]     # 1x1 stride 1
XLA_CASES = [((2, 6, 6, 8), 3, 4, 1),        # 36 positions but 8 channels
             ((1, 7, 7, 256), 3, 4, 1),      # 49 positions
             ((2, 9, 9, 1), 7, 4, 2)]        # the 1-channel stem


@pytest.mark.parametrize("shape,k,cout,stride", MATMUL_CASES + XLA_CASES)
def test_values_and_gradients_equal_the_reference(shape, k, cout, stride):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((k, k, shape[-1], cout)).astype(np.float32)
    pad = (k - 1) // 2
    y, pullback = jax.vjp(jax.jit(lambda x, w: _conv(x, w, stride, pad)), x, w)
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = pullback(g)
    ref_y, ref_dx, ref_dw = reference(x, w, g, stride, pad)
    tol = dict(rtol=1e-4, atol=1e-4 * np.sqrt(k * k * max(shape[-1], cout) * shape[0] * y.shape[1] * y.shape[2]))
    np.testing.assert_allclose(np.asarray(y), ref_y, **tol)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, **tol)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, **tol)


def test_which_shapes_become_a_matmul():
    applies = lambda shape, k, stride: conv_lib.cpu_matmul_applies(
        shape, (k, k, shape[-1], 4), (stride, stride), (((k - 1) // 2,) * 2,) * 2)
    assert [applies(s, k, st) for s, k, _, st in MATMUL_CASES] == [True] * len(MATMUL_CASES)
    assert [applies(s, k, st) for s, k, _, st in XLA_CASES] == [False] * len(XLA_CASES)
    # ResNet-18 at 64 px: layer 3 (4x4, 256) and layer 4 (2x2) as matmuls, layers 1-2 convolutions
    assert applies((16, 2, 2, 512), 3, 1) and applies((16, 4, 4, 256), 3, 2) and applies((16, 4, 4, 256), 3, 1)
    assert not applies((16, 8, 8, 128), 3, 1) and not applies((16, 16, 16, 64), 3, 1)
    # ... at 224 px only the 1x1 downsample convolutions
    assert not applies((16, 7, 7, 512), 3, 1) and not applies((16, 14, 14, 256), 3, 2)
    assert applies((16, 56, 56, 64), 1, 2)


def test_equals_torch_conv2d_forward_and_backward():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 8)).astype(np.float32)
    g = rng.standard_normal((2, 2, 2, 8)).astype(np.float32)
    y, pullback = jax.vjp(lambda x, w: _conv(x, w, 2, 1), x, w)
    dx, dw = pullback(g)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).detach().requires_grad_(True)
    yt = torch.nn.functional.conv2d(xt, wt, stride=2, padding=1)
    yt.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), wt.grad.permute(2, 3, 1, 0).numpy(), rtol=1e-5, atol=1e-4)


def _grad_fn(x, w):
    return jax.grad(lambda x, w: jnp.sum(_conv(x, w, 1, 1) ** 2), argnums=(0, 1))(x, w)


def test_the_lowering_is_chosen_by_backend():
    x, w = jnp.zeros((4, 2, 2, 16)), jnp.zeros((3, 3, 16, 16))
    cpu = jax.jit(_grad_fn).trace(x, w).lower(lowering_platforms=("cpu",))
    assert "convolution" not in cpu.as_text() and "convolution(" not in cpu.compile().as_text()
    for platform in ("cuda", "tpu"):
        text = jax.jit(_grad_fn).trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        assert "stablehlo.convolution" in text and "dot_general" not in text, platform


def test_xla_convolutions_turns_the_cpu_matmuls_off_while_tracing_and_restores_them():
    x, w = jnp.zeros((4, 2, 2, 16)), jnp.zeros((3, 3, 16, 16))
    # a fresh function each time: jax caches the trace of a function it has traced with these shapes
    cpu_text = lambda: jax.jit(lambda x, w: _grad_fn(x, w)).trace(x, w).lower(lowering_platforms=("cpu",)).as_text()
    with pytest.raises(RuntimeError, match="inside"):
        with conv_lib.xla_convolutions():
            inside = cpu_text()
            raise RuntimeError("inside")
    assert "stablehlo.convolution" in inside and "dot_general" not in inside
    after = cpu_text()  # restored, also after an exception
    assert "convolution" not in after and "dot_general" in after


def test_other_layouts_dilations_groups_and_string_padding_stay_xla_convolutions():
    x = jnp.ones((2, 1, 4, 4))  # NCHW
    w = jnp.ones((1, 1, 1, 1))  # OIHW; read as HWIO it is a 1x1 kernel: only the layout check keeps it XLA's
    cases = [
        lambda: conv_lib.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0))),  # lax's default NCHW / OIHW
        lambda: conv_lib.conv_general_dilated(jnp.ones((2, 4, 4, 4)), jnp.ones((1, 1, 2, 4)), (1, 1),
                                              ((0, 0), (0, 0)), dimension_numbers=NHWC, feature_group_count=2),
        lambda: conv_lib.conv_general_dilated(jnp.ones((2, 4, 4, 4)), jnp.ones((1, 1, 4, 4)), (1, 1), "SAME",
                                              dimension_numbers=NHWC),
        lambda: conv_lib.conv_general_dilated(jnp.ones((2, 4, 4, 4)), jnp.ones((3, 3, 4, 4)), (1, 1),
                                              ((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=NHWC),
    ]
    for make in cases:
        text = jax.jit(make).lower().as_text()
        assert "convolution" in text and "dot_general" not in text


def test_resnet18_at_64px_leaves_only_its_large_maps_to_xla_convolutions_on_the_cpu():
    model = resnet.ResNet("resnet18", in_channels=1, width=64, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, x):  # copy=True: see moco.apply_encoder
        return jnp.sum(nnx.merge(graph, params, rest, copy=True)(x, train=True) ** 2)

    text = jax.jit(jax.grad(loss)).lower(params, rest, jnp.zeros((2, 64, 64, 1))).compile().as_text()
    convs = [line for line in text.splitlines() if " convolution(" in line]
    # left to XLA (forward, input- and kernel-gradient): the stem, layer 1 (16x16x64), layer 2 (8x8x128) and
    # layer 3's stride-2 entry (8x8x128 -> 4x4x256). Matmuls: layer 3's 4x4x256 convolutions, layer 4 (2x2
    # maps, 512 channels) and every 1x1 (the downsamples).
    assert any("f32[2,32,32,64]" in line and "size=7x7" in line for line in convs)  # the stem
    assert " dot(" in text  # ... and the rest became matmuls
    assert not any("512" in line or "size=1x1" in line for line in convs)
    layer3 = [line for line in convs if "f32[2,4,4,256]" in line]
    assert layer3 and all("stride=2x2" in line for line in layer3)


def test_an_empty_output_and_list_dilations_stay_xla_convolutions():
    y = conv_lib.conv_general_dilated(jnp.ones((2, 2, 2, 3)), jnp.ones((3, 3, 3, 4)), (2, 2), ((0, 0), (0, 0)),
                                      rhs_dilation=[1, 1], dimension_numbers=NHWC)
    assert y.shape == (2, 0, 0, 4)


def test_asymmetric_padding_rectangular_kernels_and_strides_equal_xla_convolutions():
    """Top/bottom, left/right, kh/kw and the two strides each differ (a swap of any pair would show);
    the reference is XLA's own convolution at full precision."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    strides, padding = (2, 1), ((0, 1), (2, 0))
    assert conv_lib.cpu_matmul_applies(x.shape, w.shape, strides, padding) is False  # 3 x 7 positions, 3 channels
    g = rng.standard_normal((2, 3, 7, 4)).astype(np.float32)

    def value_and_grads(conv):
        y, pullback = jax.vjp(lambda x, w: conv(x, w, strides, padding, dimension_numbers=NHWC,
                                                precision=lax.Precision.HIGHEST), x, w)
        return (y,) + pullback(g)

    def as_matmul(x, w, strides, padding, **kw):
        return conv_lib._conv_as_matmul(x, w, strides=strides, padding=padding, precision=lax.Precision.HIGHEST,
                                        preferred_element_type=None)

    for got, want in zip(value_and_grads(as_matmul), value_and_grads(lax.conv_general_dilated)):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
