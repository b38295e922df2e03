"""Vision Transformer pieces in Flax NNX: patch embedding (linear, or a patch-local convolutional stem)
and a pre-LN transformer encoder, with logical sharding names on every large parameter.

Logical axis names (mapped to mesh axes by the trainer's rules; see `cxrjax.train.mesh.RULES`):
    'embed' hidden size, 'mlp' MLP hidden, 'heads' attention heads, 'kv' head dim,
    'patch' flattened patch pixels, 'vocab' vocabulary; None = never sharded.
Biases and LayerNorm parameters carry no annotation (replicated: they are small).

Accelerator options (`ViTConfig`): `attention` -- `jax.nn.dot_product_attention` with the XLA kernel or
cuDNN's fused (flash) kernel on GPU; `remat` -- recompute each block's activations in the backward pass
(`nnx.remat` per block) instead of keeping them, for large batches / long sequences.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

# (hidden, depth, heads, mlp): ViT-S/B/L of Dosovitskiy et al. / DeiT; `tiny` for CPU demos, `micro` for tests.
SIZES = {
    "micro": (32, 2, 2, 64),
    "tiny": (64, 4, 4, 256),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}
ATTENTION = ("auto", "xla", "cudnn")
# What a rematerialised block keeps from its forward pass: 'full' nothing (inputs only), 'dots' the
# outputs of its weight matmuls (q/k/v/out projections, MLP) -- elementwise ops and attention recomputed.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}

dense_init = nnx.initializers.truncated_normal(stddev=0.02)


def partitioned(init, names):
    return nnx.with_partitioning(init, names)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    size: str = "base"
    image_size: int = 224
    patch: int = 16
    channels: int = 1
    stem: str = "none"  # 'none' (linear patch embedding) or 'conv' (early convolutions inside each patch)
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype; parameters stay float32
    width: int = 0  # > 0: this hidden size (MLP 4x) with the size's heads -- narrow test/debug models
    depth_override: int = 0  # > 0: this many blocks instead of the size's depth -- shallow test/debug models
    remat: str = "none"  # 'none', 'full' or 'dots' (REMAT_POLICIES): rematerialise each block
    attention: str = "auto"  # 'xla', 'cudnn' (GPU, bf16/fp16) or 'auto' (cudnn where it applies, else xla)

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"ViTConfig: size {self.size!r}; expected one of {sorted(SIZES)}")
        if self.image_size % self.patch:
            raise ValueError(f"ViTConfig: image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.stem not in ("none", "conv"):
            raise ValueError(f"ViTConfig: stem {self.stem!r}; expected 'none' or 'conv'")
        if self.stem == "conv" and (self.patch & (self.patch - 1) or self.patch < 2):
            raise ValueError(f"ViTConfig: the conv stem needs a power-of-two patch, got {self.patch}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ViTConfig: dtype {self.dtype!r}; expected 'float32' or 'bfloat16'")
        if self.depth_override < 0:
            raise ValueError(f"ViTConfig: depth_override {self.depth_override} must be >= 0")
        if self.width < 0 or (self.width and (self.width % self.heads or self.width % 4)):
            raise ValueError(f"ViTConfig: width {self.width} must be a multiple of 4 and of the {self.heads} heads "
                             f"of size {self.size!r}")
        if self.remat not in ("none", *REMAT_POLICIES):
            raise ValueError(f"ViTConfig: remat {self.remat!r}; expected 'none' or one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"ViTConfig: attention {self.attention!r}; expected one of {ATTENTION}")

    @property
    def hidden(self) -> int:
        return self.width or SIZES[self.size][0]

    @property
    def depth(self) -> int:
        return self.depth_override or SIZES[self.size][1]

    @property
    def heads(self) -> int:
        return SIZES[self.size][2]

    @property
    def mlp(self) -> int:
        return 4 * self.width if self.width else SIZES[self.size][3]

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, N, patch*patch*C), patches in row-major grid order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int = 1) -> jax.Array:
    """(B, N, patch*patch*C) -> (B, H, W, C) for a square grid."""
    b, n, _ = patches.shape
    g = int(round(math.sqrt(n)))
    x = patches.reshape(b, g, g, patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * patch, g * patch, channels)


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embeddings (MAE), (grid*grid, dim) float32."""
    if dim % 4:
        raise ValueError(f"sincos position embeddings need a hidden size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        out = pos[:, None] * omega[None]
        parts += [np.sin(out), np.cos(out)]
    return np.concatenate(parts, axis=1).astype(np.float32)


class PatchEmbed(nnx.Module):
    """Image -> patch tokens: a linear map of flattened patches, or early convolutions (Xiao et al. 2021:
    stride-2 3x3 convolutions + LayerNorm + ReLU down to one pixel, then a 1x1 projection).

    The convolutions run INSIDE each patch (every patch is its own zero-padded image): a patch token is
    a function of that patch's pixels only, exactly as with the linear embedding. Xiao et al.'s stem
    slides over the whole image, so its receptive fields overlap neighbouring patches; under masked
    vision modelling that carries a masked patch's pixels into the visible tokens around it (measured:
    max |change| 0.54 of the image states), i.e. the model could see its own targets. Patch-local
    convolutions remove that path whatever the mask, and keep the visible tokens identical with and
    without masking (no train/eval mismatch that zero-filling masked pixels before a global stem would
    bring)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, dt = cfg.hidden, cfg.compute_dtype
        if cfg.stem == "none":
            self.proj = nnx.Linear(cfg.patch_dim, d, dtype=dt, rngs=rngs,
                                   kernel_init=partitioned(nnx.initializers.xavier_uniform(), ("patch", "embed")))
            self.convs = nnx.List([])
        else:
            n = int(math.log2(cfg.patch))
            widths = [min(d, 32 * 2**i) for i in range(n)]
            convs, cin = [], cfg.channels
            for w in widths:
                convs.append(nnx.Conv(cin, w, (3, 3), strides=(2, 2), padding="SAME", dtype=dt, rngs=rngs,
                                      kernel_init=partitioned(nnx.initializers.he_normal(), (None, None, None, None))))
                cin = w
            self.convs = nnx.List(convs)
            self.norms = nnx.List([nnx.LayerNorm(w, dtype=dt, rngs=rngs) for w in widths])
            self.proj = nnx.Linear(cin, d, dtype=dt, rngs=rngs,
                                   kernel_init=partitioned(nnx.initializers.xavier_uniform(), (None, "embed")))

    def __call__(self, images: jax.Array) -> jax.Array:
        """(B, S, S, C) float -> (B, N, hidden)."""
        c = self.cfg
        patches = patchify(images, c.patch)  # (B, N, p*p*C)
        if c.stem == "none":
            return self.proj(patches)
        b, n, _ = patches.shape
        x = patches.reshape(b * n, c.patch, c.patch, c.channels)  # each patch its own image
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
        return self.proj(x.reshape(b, n, x.shape[-1]))  # (B*N, 1, 1, w) -> (B, N, w)


def attention_implementation(choice: str, dtype) -> str:
    """'xla' or 'cudnn' for `jax.nn.dot_product_attention`: 'auto' takes cuDNN's fused kernel on a GPU
    backend with a 16-bit compute dtype (what it supports), XLA everywhere else."""
    if choice != "auto":
        return choice
    gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    return "cudnn" if gpu and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "xla"


class Attention(nnx.Module):
    def __init__(self, hidden: int, heads: int, dtype, *, rngs: nnx.Rngs, implementation: str = "auto"):
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        kv = hidden // heads
        init = partitioned(dense_init, ("embed", "heads", "kv"))
        self.q = nnx.Param(init(rngs.params(), (hidden, heads, kv)))
        self.k = nnx.Param(init(rngs.params(), (hidden, heads, kv)))
        self.v = nnx.Param(init(rngs.params(), (hidden, heads, kv)))
        self.qkv_bias = nnx.Param(jnp.zeros((3, heads, kv)))
        self.out = nnx.Param(partitioned(dense_init, ("heads", "kv", "embed"))(rngs.params(), (heads, kv, hidden)))
        self.out_bias = nnx.Param(jnp.zeros((hidden,)))
        self.dtype, self.scale = dtype, 1.0 / math.sqrt(kv)
        self.implementation = implementation

    def __call__(self, x: jax.Array, key_valid: jax.Array) -> jax.Array:
        """x (B, T, D); key_valid (B, T) bool: which tokens may be attended to."""
        dt = self.dtype
        b = self.qkv_bias[...].astype(dt)
        q = jnp.einsum("btd,dhk->bthk", x, self.q[...].astype(dt)) + b[0]
        k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dt)) + b[1]
        v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dt)) + b[2]
        # Logits and softmax in float32 inside the kernel (XLA: preferred_element_type float32; cuDNN: fp32
        # accumulation); the (B, heads, T, T) logits never leave it on the cuDNN path.
        y = dot_product_attention(q, k, v, key_valid[:, None, None, :], self.scale, self.implementation, dt)
        return jnp.einsum("bqhk,hkd->bqd", y, self.out[...].astype(dt)) + self.out_bias[...].astype(dt)


_warned_fallback = []


def dot_product_attention(q, k, v, mask, scale, choice: str, dtype):
    impl = attention_implementation(choice, dtype)
    if impl == "cudnn" and choice == "auto":
        try:  # cuDNN checks shapes/head size/version while tracing; 'auto' falls back to XLA
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError) as e:
            if not _warned_fallback:
                _warned_fallback.append(True)
                log.warning("cuDNN attention unavailable for this shape (%s); using XLA attention", e)
            impl = "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


class MLP(nnx.Module):
    def __init__(self, hidden: int, mlp: int, dtype, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(hidden, mlp, dtype=dtype, rngs=rngs, kernel_init=partitioned(dense_init, ("embed", "mlp")))
        self.fc2 = nnx.Linear(mlp, hidden, dtype=dtype, rngs=rngs, kernel_init=partitioned(dense_init, ("mlp", "embed")))

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, hidden: int, heads: int, mlp: int, dtype, *, rngs: nnx.Rngs, attention: str = "auto"):
        self.norm1 = nnx.LayerNorm(hidden, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.attn = Attention(hidden, heads, dtype, rngs=rngs, implementation=attention)
        self.norm2 = nnx.LayerNorm(hidden, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.mlp = MLP(hidden, mlp, dtype, rngs=rngs)

    def __call__(self, x, key_valid):
        x = x + self.attn(self.norm1(x), key_valid)
        return x + self.mlp(self.norm2(x))


def _apply_block(block: Block, x, key_valid):
    return block(x, key_valid)


class Encoder(nnx.Module):
    """`depth` pre-LN blocks and a final LayerNorm; with `cfg.remat` each block is rematerialised."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        dt = cfg.compute_dtype
        self.blocks = nnx.List([Block(cfg.hidden, cfg.heads, cfg.mlp, dt, rngs=rngs, attention=cfg.attention)
                                for _ in range(cfg.depth)])
        self.norm = nnx.LayerNorm(cfg.hidden, epsilon=1e-6, dtype=dt, rngs=rngs)
        self.remat = cfg.remat

    def __call__(self, x, key_valid, *, layers: bool = False):
        """The final states; `layers=True`: a list of the input, each block's output and the final states
        (for probing which depth holds what)."""
        apply = _apply_block if self.remat == "none" else nnx.remat(_apply_block, policy=REMAT_POLICIES[self.remat])
        states = [x]
        for block in self.blocks:
            x = apply(block, x, key_valid)
            states.append(x)
        states.append(self.norm(x))
        return states if layers else states[-1]
