"""Masked vision-language model (Wang et al. 2021; single-stream like M3AE) and its losses.

One pre-LN transformer over [CLS, image patch tokens, report word pieces]:
    token  = content + type embedding (0 CLS, 1 image, 2 text) + position embedding
             (fixed 2-D sin-cos for patches as in MAE; learned 1-D for word pieces)
    masked patches are replaced by a learned [MASK] patch embedding (SimMIM-style replacement, not
    MAE's dropping: static shapes, and every block scale uses one code path); a patch token depends
    on its own patch's pixels only (both stems, `vit.PatchEmbed`), so the pixels under a mask reach no
    output (tested)
    pixels: uint8 or uint16 records, normalised on the device by their dtype's full scale (255 / 65535)
    attention: a token may attend to the CLS token and to every present token -- an absent modality
    (image-only / text-only examples) is invisible, so their outputs cannot depend on its content.
Heads:
    MLM: dense -> GELU -> LayerNorm -> decoder TIED to the word-piece embedding (+ a bias), BERT's;
    the decoder matmul accumulates and returns float32 logits under a bfloat16 compute dtype.
    MVM (regeneration): linear -> the patch's pixels, normalised per patch (MAE's norm_pix target);
    float32 output likewise.
    ITC (optional): linear projections of the pooled single-modality embeddings, InfoNCE with a
    learned temperature (CLIP), on paired examples.
Pooled embedding (features, retrieval): the mean of the final token states of one modality, from a
forward pass that contains only that modality (`embed_image`, `embed_text`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cxrjax.data import augment as augment_lib
from cxrjax.models import vit

TYPE_CLS, TYPE_IMAGE, TYPE_TEXT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class MVLMConfig:
    vit: vit.ViTConfig
    vocab_size: int
    max_len: int = 128
    proj_dim: int = 128  # ITC projection size (0 = no ITC heads)
    norm_pix: bool = True  # MVM target: pixels normalised per patch (MAE); False: the image's normalised pixels

    def __post_init__(self):
        if self.vocab_size < 6:
            raise ValueError(f"vocab_size {self.vocab_size} is too small for a report tokenizer")


class MVLM(nnx.Module):
    def __init__(self, cfg: MVLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v = cfg.vit
        d, dt = v.hidden, v.compute_dtype
        emb_init = nnx.initializers.normal(0.02)
        self.patch_embed = vit.PatchEmbed(v, rngs=rngs)
        self.token_embed = nnx.Embed(cfg.vocab_size, d, dtype=dt, rngs=rngs,
                                     embedding_init=vit.partitioned(emb_init, ("vocab", "embed")))
        self.cls = nnx.Param(emb_init(rngs.params(), (d,)))
        self.mask_patch = nnx.Param(emb_init(rngs.params(), (d,)))
        self.type_embed = nnx.Param(emb_init(rngs.params(), (3, d)))
        self.text_pos = nnx.Param(vit.partitioned(emb_init, (None, "embed"))(rngs.params(), (cfg.max_len, d)))
        self.encoder = vit.Encoder(v, rngs=rngs)
        self.mlm_dense = nnx.Linear(d, d, dtype=dt, rngs=rngs, kernel_init=vit.partitioned(vit.dense_init, ("embed", None)))
        self.mlm_norm = nnx.LayerNorm(d, epsilon=1e-6, dtype=dt, rngs=rngs)
        self.mlm_bias = nnx.Param(jnp.zeros((cfg.vocab_size,)))
        self.mvm_head = nnx.Linear(d, v.patch_dim, dtype=dt, preferred_element_type=jnp.float32, rngs=rngs,
                                   kernel_init=vit.partitioned(vit.dense_init, ("embed", "patch")))
        if cfg.proj_dim:
            self.image_proj = nnx.Linear(d, cfg.proj_dim, use_bias=False, dtype=dt, rngs=rngs,
                                         kernel_init=vit.partitioned(vit.dense_init, ("embed", None)))
            self.text_proj = nnx.Linear(d, cfg.proj_dim, use_bias=False, dtype=dt, rngs=rngs,
                                        kernel_init=vit.partitioned(vit.dense_init, ("embed", None)))
            self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07)))  # CLIP's initial temperature

    # -- the joint pass ----------------------------------------------------------------------

    def __call__(self, image, image_present, patch_mask, text_ids, text_valid) -> tuple[jax.Array, jax.Array]:
        """The joint pass. image (B,S,S,1) uint8/uint16 or float (already normalised); image_present (B,);
        patch_mask (B,N) True = masked; text_ids (B,L); text_valid (B,L) (all False = no text).
        -> (image token states (B,N,D), text token states (B,L,D)).

        `image=None` / `text_ids=None`: a single-modality pass whose sequence holds no tokens of the other
        modality at all (returned as None) -- the same states as a joint pass with that modality absent
        (absent tokens get no attention), for fewer FLOPs."""
        out = self.encoder(*self._sequence(image, image_present, patch_mask, text_ids, text_valid))
        n = self.cfg.vit.num_patches if image is not None else 0
        return (out[:, 1 : 1 + n] if image is not None else None,
                out[:, 1 + n :] if text_ids is not None else None)

    def _sequence(self, image, image_present, patch_mask, text_ids, text_valid):
        """The encoder's input: [CLS, patches, word pieces] embedded (absent parts left out), and key validity."""
        v, dt = self.cfg.vit, self.cfg.vit.compute_dtype
        parts, valid = [], []
        if image is not None:
            img = self.patch_embed(normalize(image).astype(dt))
            img = jnp.where(patch_mask[..., None], self.mask_patch[...].astype(dt), img)
            parts.append(img + jnp.asarray(vit.sincos_2d(v.grid, v.hidden), dt) + self.type_embed[TYPE_IMAGE].astype(dt))
            valid.append(jnp.broadcast_to(image_present[:, None], img.shape[:2]))
        if text_ids is not None:
            txt = self.token_embed(text_ids) + self.text_pos[...][: text_ids.shape[1]].astype(dt)
            parts.append(txt + self.type_embed[TYPE_TEXT].astype(dt))
            valid.append(text_valid)
        b = parts[0].shape[0]
        cls = jnp.broadcast_to((self.cls[...] + self.type_embed[TYPE_CLS]).astype(dt), (b, 1, v.hidden))
        return jnp.concatenate([cls, *parts], axis=1), jnp.concatenate([jnp.ones((b, 1), bool), *valid], 1)

    # -- heads -------------------------------------------------------------------------------

    def mlm_logits(self, text_states: jax.Array) -> jax.Array:
        """(B,L,D) -> (B,L,vocab) float32: the decoder matmul accumulates in and returns float32 whatever
        the compute dtype (bfloat16 logits would round a logit of 10 to steps of 0.06)."""
        h = self.mlm_norm(jax.nn.gelu(self.mlm_dense(text_states), approximate=False))
        emb = self.token_embed.embedding[...].astype(h.dtype)
        return jnp.einsum("bld,vd->blv", h, emb, preferred_element_type=jnp.float32) + self.mlm_bias[...]

    def regenerate(self, image_states: jax.Array) -> jax.Array:
        """(B,N,D) -> predicted patch pixels (B,N,patch*patch*C) float32, in the MVM target's normalisation."""
        return self.mvm_head(image_states).astype(jnp.float32)

    # -- single-modality embeddings (features, retrieval, ITC) -------------------------------

    def embed_image(self, image: jax.Array) -> jax.Array:
        """(B,S,S,1) -> (B,D): mean of the patch states of an image-only, unmasked pass."""
        b, n = image.shape[0], self.cfg.vit.num_patches
        states, _ = self(image, jnp.ones((b,), bool), jnp.zeros((b, n), bool), None, None)
        return pool_image(states)

    def image_layer_states(self, image: jax.Array) -> list[jax.Array]:
        """(B,S,S,1) -> the patch states (B,N,D) of an image-only, unmasked pass at every depth: the encoder's
        input, each block's output, the final (normed) states -- whose mean is `embed_image`."""
        b, n = image.shape[0], self.cfg.vit.num_patches
        x, valid = self._sequence(image, jnp.ones((b,), bool), jnp.zeros((b, n), bool), None, None)
        return [h[:, 1 : 1 + n] for h in self.encoder(x, valid, layers=True)]

    def embed_text(self, text_ids: jax.Array, text_valid: jax.Array) -> jax.Array:
        """(B,L) ids -> (B,D): mean over the valid word-piece states of a text-only pass."""
        _, states = self(None, None, None, text_ids, text_valid)
        return pool_text(states, text_valid)


def max_pixel_value(dtype) -> float:
    """Full scale of stored pixels: 255 for uint8 records, 65535 for 16-bit records (prepare --bit_depth=16)."""
    if dtype == jnp.uint8:
        return 255.0
    if dtype == jnp.uint16:
        return 65535.0
    raise ValueError(f"images must be uint8 or uint16 pixels (or already-normalised floats), got {dtype}")


def normalize(image: jax.Array) -> jax.Array:
    """uint8/uint16 pixels -> float32 normalised (augment.normalize at the dtype's full scale); floats pass."""
    if jnp.issubdtype(image.dtype, jnp.floating):
        return image
    return augment_lib.normalize(image, max_value=max_pixel_value(image.dtype))


def pool_image(image_states: jax.Array) -> jax.Array:
    return image_states.astype(jnp.float32).mean(axis=1)


def pool_text(text_states: jax.Array, text_valid: jax.Array) -> jax.Array:
    w = text_valid[..., None].astype(jnp.float32)
    return (text_states.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


# ----------------------------------------------------------------------------------------------
# Losses (pure functions of arrays; each returns (loss, metrics))


def patch_targets(image: jax.Array, patch: int, norm_pix: bool = True) -> jax.Array:
    """uint8/uint16 image -> per-patch regeneration targets (B,N,P): normalised pixels, then (norm_pix)
    each patch standardised by its own mean/std (MAE)."""
    x = vit.patchify(normalize(image), patch)
    if norm_pix:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        x = (x - mean) / jnp.sqrt(var + 1e-6)
    return x


def mvm_sums(pred, target, patch_mask, image_present, mask_scale, num_scales: int) -> dict:
    """The sums behind `mvm_loss` (squared error and count over the masked patches of present images,
    in total and per scale): summed over batch shards, they give the global batch's loss exactly."""
    err = ((pred - target) ** 2).mean(-1)  # (B,N)
    w = (patch_mask & image_present[:, None]).astype(jnp.float32)
    out = {"mvm_err": (err * w).sum(), "mvm_n": w.sum()}
    for s in range(num_scales):
        ws = w * (mask_scale == s)[:, None]
        out[f"mvm_err{s}"], out[f"mvm_n{s}"] = (err * ws).sum(), ws.sum()
    return out


def mvm_from_sums(sums: dict, num_scales: int):
    loss = sums["mvm_err"] / jnp.maximum(sums["mvm_n"], 1.0)
    metrics = {f"mvm_loss_scale{s}": sums[f"mvm_err{s}"] / jnp.maximum(sums[f"mvm_n{s}"], 1.0) for s in range(num_scales)}
    metrics["mvm_loss"] = loss
    return loss, metrics


def mvm_loss(pred, target, patch_mask, image_present, mask_scale, num_scales: int):
    """MSE over the masked patches of present images only; per-scale losses as metrics.

    pred/target (B,N,P); patch_mask (B,N); mask_scale (B,) index of the block scale (-1: no image)."""
    return mvm_from_sums(mvm_sums(pred, target, patch_mask, image_present, mask_scale, num_scales), num_scales)


def mlm_sums(logits, labels) -> dict:
    """The sums behind `mlm_loss`: cross-entropy, correct predictions and count over the targets."""
    w = (labels >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return {"mlm_ce": (ce * w).sum(), "mlm_correct": ((logits.argmax(-1) == labels) * w).sum(), "mlm_n": w.sum()}


def mlm_from_sums(sums: dict):
    n = jnp.maximum(sums["mlm_n"], 1.0)
    loss = sums["mlm_ce"] / n
    return loss, {"mlm_loss": loss, "mlm_acc": sums["mlm_correct"] / n}


def mlm_loss(logits, labels):
    """Cross-entropy over the MLM targets (labels >= 0) and their accuracy."""
    return mlm_from_sums(mlm_sums(logits, labels))


def itc_loss(image_emb, text_emb, logit_scale, valid):
    """Symmetric InfoNCE between the paired rows marked `valid` (others neither queries nor negatives)."""
    i = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True).clip(1e-6)
    t = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True).clip(1e-6)
    scale = jnp.exp(jnp.clip(logit_scale, 0.0, math.log(100.0)))  # CLIP caps the scale at 100
    logits = scale * i @ t.T
    pair = valid[:, None] & valid[None, :]
    logits = jnp.where(pair, logits, -1e9)
    labels = jnp.arange(logits.shape[0])
    n = jnp.maximum(valid.sum(), 1)
    l_i = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    l_t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    loss = (jnp.where(valid, l_i + l_t, 0.0)).sum() / (2 * n)
    acc = (jnp.where(valid, logits.argmax(-1) == labels, False)).sum() / n
    return loss, {"itc_loss": loss, "itc_acc": acc, "itc_scale": scale}


def build(cfg: MVLMConfig, seed: int) -> MVLM:
    """The model with its parameters on the host (sharding is applied by the trainer, not eagerly)."""
    with nnx.use_eager_sharding(False):
        return MVLM(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
