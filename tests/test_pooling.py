"""The stem max-pool (models/pooling.py): values and gradient equal to an independent loop reference
(first maximum of each window, row-major, gets the window's gradient) and to torch's max_pool2d, on even
and odd sizes, ties and -inf; on the CPU the gradient is lowered without select-and-scatter, and for GPU /
TPU XLA's select-and-scatter is kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.models import pooling


def reference(x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max pool 3x3 / 2 / pad 1 and its gradient, written as loops over windows (float64)."""
    b, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    y = np.full((b, ho, wo, c), -np.inf)
    dx = np.zeros(x.shape, np.float64)
    for n in range(b):
        for k in range(c):
            for oh in range(ho):
                for ow in range(wo):
                    best, at = -np.inf, None
                    for i in range(3):
                        for j in range(3):
                            r, s = 2 * oh + i - 1, 2 * ow + j - 1
                            if 0 <= r < h and 0 <= s < w and (at is None or x[n, r, s, k] > best):
                                best, at = x[n, r, s, k], (r, s)
                    y[n, oh, ow, k] = best
                    dx[n, at[0], at[1], k] += g[n, oh, ow, k]
    return y, dx


def _value_and_grad(x, g):
    y, pullback = jax.vjp(pooling.max_pool_3x3_s2, x)
    return y, pullback(g)[0]


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 9, 7, 2), (1, 1, 2, 1), (2, 5, 1, 3), (3, 12, 5, 4)])
@pytest.mark.parametrize("ties", [False, True])
def test_values_and_gradient_equal_the_loop_reference(shape, ties):
    rng = np.random.default_rng(sum(shape) + ties)
    x = rng.standard_normal(shape).astype(np.float32)
    if ties:  # few distinct values, zeros as after a ReLU, and one -inf pixel
        x = np.maximum(np.round(x * 1.5), 0).astype(np.float32)
        x.flat[0] = -np.inf
    ho, wo = (shape[1] - 1) // 2 + 1, (shape[2] - 1) // 2 + 1
    g = rng.standard_normal((shape[0], ho, wo, shape[3])).astype(np.float32)
    y, dx = jax.jit(_value_and_grad)(x, g)
    y_ref, dx_ref = reference(x, g)
    np.testing.assert_array_equal(np.asarray(y), y_ref.astype(np.float32))
    np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-6, atol=1e-6)
    assert ((np.asarray(dx) != 0) == (dx_ref != 0)).all()  # the same pixel of each window gets it
    # XLA's own select-and-scatter (the GPU / TPU lowering) gives the same gradient
    xla = jax.jit(pooling._select_and_scatter_grad)(x, y, g)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(dx), rtol=1e-6, atol=1e-6)


def test_forward_mode_and_half_precision():
    rng = np.random.default_rng(7)
    x = np.maximum(np.round(rng.standard_normal((2, 10, 9, 3)) * 2), 0).astype(np.float32)
    t = rng.standard_normal(x.shape).astype(np.float32)
    y, ty = jax.jvp(pooling.max_pool_3x3_s2, (x,), (t,))  # forward mode works (a custom JVP)
    _, ty_xla = jax.jvp(pooling._max_pool_xla, (x,), (t,))
    np.testing.assert_array_equal(np.asarray(ty), np.asarray(ty_xla))
    g = rng.standard_normal(y.shape).astype(np.float32)
    _, dx_ref = reference(x, g)
    for dtype in (jnp.bfloat16, jnp.float16):
        _, dx = jax.jit(_value_and_grad)(jnp.asarray(x, dtype), jnp.asarray(g, dtype))
        assert dx.dtype == dtype
        assert ((np.asarray(dx, np.float32) != 0) == (dx_ref != 0)).all()  # the same pixels
        np.testing.assert_allclose(np.asarray(dx, np.float32), dx_ref, rtol=2e-2, atol=2e-2)


def test_a_nan_window_sends_its_gradient_to_its_first_nan():
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 0, 0, 0] = x[0, 3, 3, 0] = np.nan  # in windows (0, 0) and (1, 1) only
    g = np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1)
    y, dx = jax.jit(_value_and_grad)(x, g)
    np.testing.assert_array_equal(np.isnan(np.asarray(y))[0, :, :, 0], [[True, False], [False, True]])
    dx = np.asarray(dx)[0, :, :, 0]
    # NaN windows: their NaN; zero windows: their first real pixel (row-major, padding never wins)
    assert dx[0, 0] == 1 and dx[3, 3] == 4 and dx[0, 1] == 2 and dx[1, 0] == 3 and dx.sum() == 10


def test_gradient_equals_torch_max_pool2d():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((2, 14, 14, 5)), 0).astype(np.float32)  # ReLU output: many ties at 0
    g = rng.standard_normal((2, 7, 7, 5)).astype(np.float32)
    y, dx = jax.jit(_value_and_grad)(x, g)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    yt.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(np.asarray(dx), xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


def _grad_fn(x):
    return jax.grad(lambda x: jnp.sum(pooling.max_pool_3x3_s2(x) ** 2))(x)


def test_the_backward_lowering_is_chosen_by_backend():
    x = jnp.zeros((2, 16, 16, 4))
    cpu = jax.jit(_grad_fn).trace(x).lower(lowering_platforms=("cpu",)).compile().as_text()
    assert "select-and-scatter" not in cpu and " scatter(" not in cpu and "conditional" not in cpu
    for platform in ("cuda", "tpu"):
        text = jax.jit(_grad_fn).trace(x).lower(lowering_platforms=(platform,)).as_text()
        assert "select_and_scatter" in text, platform
    assert "select_and_scatter" not in jax.jit(_grad_fn).trace(x).lower(lowering_platforms=("cpu",)).as_text()


def test_rejects_non_nhwc_input():
    with pytest.raises(ValueError, match="NHWC"):
        pooling.max_pool_3x3_s2(jnp.zeros((4, 4, 3)))
