"""ResNet-18 / ResNet-50 in Flax NNX, laid out exactly like torchvision's (v1.5: stride on the 3x3).

Inputs are NHWC (1 or 3 channels). Submodule names follow torchvision's state_dict, so an ImageNet
checkpoint maps 1:1 (see `cxrjax.models.torchvision_weights`): ``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.bn1``, ..., ``layer2.0.downsample.0`` (conv) / ``.1`` (BN), ``fc``. The flat name of a
variable is its NNX path joined with dots (``layer1.0.conv1.kernel``), see `flat_state`.

Batch norm (`BatchNorm`) matches torch: eps 1e-5, running statistics updated with momentum 0.1
(decay 0.9) from the *unbiased* batch variance, normalisation with the biased one. It also takes
``num_groups``: in train mode the batch (B, ...) is viewed as (num_groups, B / num_groups, ...) and
every group is normalised with its own statistics (MoCo's shuffle BN without per-device code: the
result is a function of the global batch only, never of the device count). The running statistics
are updated with the mean of the group statistics.

Compute dtype is configurable (``dtype=jnp.bfloat16``); parameters stay float32
(``param_dtype``), BN statistics are always computed in float32, and pooled features / logits are
returned in float32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cxrjax.models import conv as conv_lib
from cxrjax.models import pooling

Dtype = Any

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for every conv.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # plain normal, as torch
# torch.nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
_fc_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nnx.Module):
    """Torch-compatible batch norm over the last axis, with optional per-group batch statistics.

    Variables (same names and types as `flax.nnx.BatchNorm`): ``scale``/``bias`` (`nnx.Param`),
    ``mean``/``var`` (`nnx.BatchStat`).
    """

    def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 zero_init_scale: bool = False):
        self.num_features = num_features
        self.momentum = momentum  # decay of the running stats: torch momentum 0.1 == 0.9 here
        self.epsilon = epsilon
        self.dtype = dtype
        init_scale = jnp.zeros if zero_init_scale else jnp.ones
        self.scale = nnx.Param(init_scale((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array, *, train: bool, num_groups: int = 1) -> jax.Array:
        c = x.shape[-1]
        if c != self.num_features:
            raise ValueError(f"BatchNorm expects {self.num_features} channels, got shape {x.shape}")
        xf = x.astype(jnp.float32)
        if train:
            b = x.shape[0]
            if num_groups < 1 or b % num_groups:
                raise ValueError(f"batch size {b} is not divisible into num_groups={num_groups}")
            xg = xf.reshape(num_groups, -1, c)  # (G, B/G * spatial, C)
            n = xg.shape[1]
            mean = xg.mean(axis=1)  # (G, C)
            var = jnp.square(xg - mean[:, None, :]).mean(axis=1)  # biased, used to normalise
            unbiased = var * (n / max(n - 1, 1))
            d = self.momentum
            self.mean[...] = d * self.mean[...] + (1 - d) * jax.lax.stop_gradient(mean.mean(0))
            self.var[...] = d * self.var[...] + (1 - d) * jax.lax.stop_gradient(unbiased.mean(0))
            scale = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)  # (G, C)
            shift = self.bias[...].astype(jnp.float32) - mean * scale
            y = xg * scale[:, None, :] + shift[:, None, :]
            return y.reshape(x.shape).astype(self.dtype)
        scale = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(self.var[...] + self.epsilon)
        shift = self.bias[...].astype(jnp.float32) - self.mean[...] * scale
        return (xf * scale + shift).astype(self.dtype)


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Conv:
    pad = (k - 1) // 2  # torchvision: 7x7 pad 3, 3x3 pad 1, 1x1 pad 0 (explicit, not "SAME")
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                    use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=_conv_init,
                    conv_general_dilated=conv_lib.conv_general_dilated,  # XLA's; a matmul for some CPU shapes
                    rngs=rngs)


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, zero_init_residual: bool = False):
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 3, stride, rngs, dtype, param_dtype)
        self.bn1 = BatchNorm(planes, dtype=dtype, param_dtype=param_dtype)
        self.conv2 = _conv(planes, planes, 3, 1, rngs, dtype, param_dtype)
        self.bn2 = BatchNorm(planes, dtype=dtype, param_dtype=param_dtype,
                             zero_init_scale=zero_init_residual)
        self.downsample = _downsample(cin, cout, stride, rngs, dtype, param_dtype)

    def __call__(self, x, *, train: bool, num_groups: int = 1):
        out = nnx.relu(self.bn1(self.conv1(x), train=train, num_groups=num_groups))
        out = self.bn2(self.conv2(out), train=train, num_groups=num_groups)
        return nnx.relu(out + _shortcut(self.downsample, x, train, num_groups))


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, zero_init_residual: bool = False):
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 1, 1, rngs, dtype, param_dtype)
        self.bn1 = BatchNorm(planes, dtype=dtype, param_dtype=param_dtype)
        self.conv2 = _conv(planes, planes, 3, stride, rngs, dtype, param_dtype)  # v1.5 stride here
        self.bn2 = BatchNorm(planes, dtype=dtype, param_dtype=param_dtype)
        self.conv3 = _conv(planes, cout, 1, 1, rngs, dtype, param_dtype)
        self.bn3 = BatchNorm(cout, dtype=dtype, param_dtype=param_dtype,
                             zero_init_scale=zero_init_residual)
        self.downsample = _downsample(cin, cout, stride, rngs, dtype, param_dtype)

    def __call__(self, x, *, train: bool, num_groups: int = 1):
        out = nnx.relu(self.bn1(self.conv1(x), train=train, num_groups=num_groups))
        out = nnx.relu(self.bn2(self.conv2(out), train=train, num_groups=num_groups))
        out = self.bn3(self.conv3(out), train=train, num_groups=num_groups)
        return nnx.relu(out + _shortcut(self.downsample, x, train, num_groups))


def _downsample(cin, cout, stride, rngs, dtype, param_dtype):
    """torchvision's ``downsample = Sequential(conv1x1, BatchNorm)``, or None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nnx.List([_conv(cin, cout, 1, stride, rngs, dtype, param_dtype),
                     BatchNorm(cout, dtype=dtype, param_dtype=param_dtype)])


def _shortcut(downsample, x, train, num_groups):
    if downsample is None:
        return x
    conv, bn = downsample
    return bn(conv(x), train=train, num_groups=num_groups)


_ARCHS: dict[str, tuple[type, Sequence[int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nnx.Module):
    """torchvision-layout ResNet. ``num_classes=0`` returns pooled features (``feature_dim``).

    ``width`` (64 = torchvision) scales every layer; smaller widths are for tests and demos only.

    Call as ``model(x, train=..., bn_groups=1)`` with x of shape (B, H, W, in_channels); the output
    is float32 (B, num_classes) or (B, feature_dim).
    """

    def __init__(self, arch: str = "resnet18", *, num_classes: int = 0, in_channels: int = 3,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 zero_init_residual: bool = False, width: int = 64, rngs: nnx.Rngs):
        if arch not in _ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(_ARCHS)}")
        block, depths = _ARCHS[arch]
        self.arch = arch
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dtype = dtype
        self.conv1 = _conv(in_channels, width, 7, 2, rngs, dtype, param_dtype)
        self.bn1 = BatchNorm(width, dtype=dtype, param_dtype=param_dtype)
        cin = width
        for i, depth in enumerate(depths):
            planes = width * 2**i
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride, rngs=rngs, dtype=dtype,
                                    param_dtype=param_dtype, zero_init_residual=zero_init_residual))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.feature_dim = cin
        if num_classes:
            self.fc = nnx.Linear(cin, num_classes, dtype=jnp.float32, param_dtype=param_dtype,
                                 kernel_init=_fc_kernel_init,
                                 bias_init=_uniform_fan_in_bias(cin), rngs=rngs)
        else:
            self.fc = None

    def __call__(self, x: jax.Array, *, train: bool, bn_groups: int = 1) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected NHWC input with {self.in_channels} channels, got {x.shape}")
        x = x.astype(self.dtype)
        x = nnx.relu(self.bn1(self.conv1(x), train=train, num_groups=bn_groups))
        x = pooling.max_pool_3x3_s2(x)  # torchvision's MaxPool2d(3, 2, 1); gradient lowered per backend
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in layer:
                x = blk(x, train=train, num_groups=bn_groups)
        x = x.astype(jnp.float32).mean(axis=(1, 2))
        if self.fc is not None:
            x = self.fc(x)
        return x


def _uniform_fan_in_bias(fan_in: int) -> Callable:
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def resnet18(**kwargs) -> ResNet:
    return ResNet("resnet18", **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet("resnet50", **kwargs)


def flat_state(model: nnx.Module) -> dict[str, jax.Array]:
    """``{"layer1.0.conv1.kernel": array, ...}`` of every Param and BatchStat of ``model``."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {".".join(str(p) for p in path): v.get_value() for path, v in nnx.to_flat_state(state)}


def num_params(model: nnx.Module) -> int:
    """Number of trainable parameters (what torch counts with ``p.numel()`` over ``parameters()``)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
