"""MoCo v2 with MedAug's metadata: encoder + MLP head, momentum update, key queue, InfoNCE loss.

Pure functions of arrays / pytrees (the trainer jits them) plus two small NNX modules.

* `MoCoEncoder` = ResNet backbone -> `ProjectionHead` (Linear-ReLU-Linear, 512 -> 512 -> 128 for
  ResNet-18 as MedAug) -> L2 normalisation (float32). The key encoder starts as `copy_encoder` of
  the query encoder (MedAug: both ImageNet-initialised); not a bare ``nnx.clone``, which shares
  buffers and breaks donation.
* `ema_update(key_params, query_params, m)`: key <- m * key + (1 - m) * query over the **Params
  only**. As in the reference MoCo, the key encoder's BN running statistics are its own: they are
  updated by its own train-mode forward pass (`encode_keys_shuffled`), never EMA'd from the query
  encoder. They are not used during pre-training (both encoders run BN in train mode).
* `QueueState` / `init_queue` / `enqueue`: K keys with each key's patient, study and laterality ids
  (-1 = unknown / initial random key), written at ``ptr`` (K % batch == 0), jittable.
* `moco_loss`: logits [q.k+, q.queue (, q.hard)] / T, target 0, cross-entropy via logsumexp in
  float32; false-negative masking by patient or study; MedAug's hard-negative variants.
* Shuffle BN without per-device code: the key encoder's BN statistics are computed per group of the
  global batch (``bn_groups``, see `cxrjax.models.resnet.BatchNorm`) after a permutation that sends
  every key to a *different* group than its query's (`permute_for_shuffle_bn`); keys are un-permuted
  afterwards. Everything is a function of the global batch, so results do not depend on how many
  devices run it.

Recommended jitted train step (functional NNX; ``graphdef`` is static, states are pytrees)::

    q_graph, q_params, q_stats = nnx.split(query_encoder, nnx.Param, nnx.BatchStat)
    k_graph, k_params, k_stats = nnx.split(key_encoder, nnx.Param, nnx.BatchStat)

    def loss_fn(q_params, q_stats, k_emb, ...):
        q, q_stats = apply_encoder(q_graph, q_params, q_stats, x_q, train=True, bn_groups=Gq)
        loss, metrics = moco_loss(q, k_emb, queue, ...)
        return loss, (q_stats, metrics)

    k_params = ema_update(k_params, q_params, momentum)           # EMA *before* the keys
    k_emb, k_stats = encode_keys_shuffled(k_graph, k_params, k_stats, x_k, rng, num_groups=G)
    grads, (q_stats, metrics) = jax.grad(loss_fn, has_aux=True)(q_params, q_stats, k_emb, ...)
    queue = enqueue(queue, k_emb, patient, study, laterality)     # after the loss
"""

from __future__ import annotations

from typing import Literal, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from cxrjax.models.resnet import ResNet

Array = jax.Array


# ---------------------------------------------------------------------------------------- modules
class ProjectionHead(nnx.Module):
    """MoCo v2 MLP head: Linear(in, hidden) - ReLU - Linear(hidden, out)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: int = 128, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        hidden_features = hidden_features or in_features
        self.linear1 = nnx.Linear(in_features, hidden_features, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.linear2 = nnx.Linear(hidden_features, out_features, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.linear2(nnx.relu(self.linear1(x)))


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / max(||x||, eps)`` in float32 (torch.nn.functional.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


class MoCoEncoder(nnx.Module):
    """backbone (pooled features) -> projection head -> L2-normalised float32 embedding."""

    def __init__(self, backbone: nnx.Module, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(self, x: Array, *, train: bool, bn_groups: int = 1) -> Array:
        return l2_normalize(self.head(self.backbone(x, train=train, bn_groups=bn_groups)))

    def features(self, x: Array, *, train: bool = False) -> Array:
        """Backbone features (what linear evaluation and export use)."""
        return self.backbone(x, train=train)


def build_moco_encoder(arch: str = "resnet18", *, in_channels: int = 1, embed_dim: int = 128,
                       hidden_dim: Optional[int] = None, dtype=jnp.float32,
                       param_dtype=jnp.float32, zero_init_residual: bool = False, width: int = 64,
                       rngs: nnx.Rngs) -> MoCoEncoder:
    """ResNet feature backbone + MoCo v2 head (hidden = feature dim unless given)."""
    backbone = ResNet(arch, num_classes=0, in_channels=in_channels, dtype=dtype,
                      param_dtype=param_dtype, zero_init_residual=zero_init_residual, width=width,
                      rngs=rngs)
    head = ProjectionHead(backbone.feature_dim, hidden_dim, embed_dim, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    return MoCoEncoder(backbone, head)


def copy_encoder(encoder: nnx.Module) -> nnx.Module:
    """A key encoder: same structure and values, but its own buffers.

    ``nnx.clone`` alone shares the underlying jax.Arrays with the original; a train state holding
    both then cannot be donated to a jitted step (the same buffer donated twice: XLA error, or a
    crash on CPU).
    """
    clone = nnx.clone(encoder)
    nnx.update(clone, jax.tree.map(jnp.copy, nnx.state(clone)))
    return clone


def apply_encoder(graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State, x: Array, *,
                  train: bool, bn_groups: int = 1) -> tuple[Array, nnx.State]:
    """Functional forward of a split encoder: (embeddings, updated batch stats).

    ``graphdef, params, batch_stats = nnx.split(encoder, nnx.Param, nnx.BatchStat)``. Pure: the
    input states are not mutated (``merge(copy=True)``: NNX 0.12 would otherwise reuse the state's
    Variable objects, which fails under ``jax.grad`` inside ``jax.jit`` with a TraceContextError).
    """
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    out = model(x, train=train, bn_groups=bn_groups)
    return out, nnx.state(model, nnx.BatchStat)


# --------------------------------------------------------------------------- momentum encoder
def ema_update(key_params, query_params, momentum: float | Array):
    """key <- momentum * key + (1 - momentum) * query, leaf by leaf (Params only, see module doc)."""
    def upd(k, q):
        return (momentum * k.astype(jnp.float32)
                + (1.0 - momentum) * jax.lax.stop_gradient(q).astype(jnp.float32)).astype(k.dtype)

    return jax.tree.map(upd, key_params, query_params)


# ------------------------------------------------------------------------------------- queue
@struct.dataclass
class QueueState:
    """MoCo queue with MedAug metadata. ``ptr`` is the next write position (int32 scalar)."""

    keys: Array        # (K, D) float32, L2-normalised
    patient: Array     # (K,) int32, -1 = unknown (initial random keys)
    study: Array       # (K,) int32
    laterality: Array  # (K,) int32
    ptr: Array         # () int32

    @property
    def size(self) -> int:
        return self.keys.shape[0]


def init_queue(rng: Array, size: int, dim: int) -> QueueState:
    """Random L2-normalised keys (as the reference MoCo) with every id = -1.

    Every field is its own buffer (the whole train state may be donated to a jitted step, and
    donating one buffer twice is an error).
    """
    def minus1():
        return jnp.full((size,), -1, jnp.int32)

    return QueueState(keys=l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32)),
                      patient=minus1(), study=minus1(), laterality=minus1(),
                      ptr=jnp.zeros((), jnp.int32))


def enqueue(queue: QueueState, keys: Array, patient: Array, study: Array,
            laterality: Array) -> QueueState:
    """Write the batch's keys (and ids) at ``ptr`` (replacing the oldest), advance ``ptr`` by B mod K.

    The batch is the *global* batch (no all-gather needed under jit). K % B must be 0 so a batch
    never wraps around the end of the queue (as the reference MoCo).
    """
    b, k = keys.shape[0], queue.size
    if k % b:
        raise ValueError(f"queue size K={k} must be a multiple of the (global) batch size {b}; "
                         f"choose K = {max(1, k // b) * b} or {(k // b + 1) * b}")
    if keys.shape[1] != queue.keys.shape[1]:
        raise ValueError(f"keys of dim {keys.shape[1]} for a queue of dim {queue.keys.shape[1]}")
    ptr = queue.ptr
    put = lambda buf, v, *idx: jax.lax.dynamic_update_slice(buf, v.astype(buf.dtype), (ptr, *idx))
    return QueueState(
        keys=put(queue.keys, jax.lax.stop_gradient(keys), 0),
        patient=put(queue.patient, patient),
        study=put(queue.study, study),
        laterality=put(queue.laterality, laterality),
        ptr=((ptr + b) % k).astype(jnp.int32))


# ----------------------------------------------------------------------------- shuffle BN
def permute_for_shuffle_bn(rng: Array, n: int, num_groups: int) -> tuple[Array, Array]:
    """A permutation of the global batch for shuffle BN: ``x[perm]`` is fed to the key encoder
    (whose BN normalises each contiguous group of ``n // num_groups``), ``k[inverse]`` restores order.

    With ``num_groups >= 2`` every example lands in a group other than its own (group g = positions
    g*s .. g*s+s-1): position j inside a group is filled from group ``g - o_j`` with a random offset
    ``o_j`` in [1, num_groups), so a query and its key never share BN statistics (the reference
    MoCo's uniform shuffle leaves 1/num_gpus of keys on their own GPU). ``num_groups == 1``: a plain
    random permutation (it cannot change full-batch statistics).
    """
    if num_groups < 1 or n % num_groups:
        raise ValueError(f"batch size {n} is not divisible into num_groups={num_groups}")
    if num_groups == 1:
        perm = jax.random.permutation(rng, n)
        return perm, jnp.argsort(perm)
    s = n // num_groups
    r_slot, r_off = jax.random.split(rng)
    # slots[g, t]: the slot that source example (g, t) takes inside its destination group
    slots = jax.vmap(lambda r: jax.random.permutation(r, s))(jax.random.split(r_slot, num_groups))
    offsets = jax.random.randint(r_off, (s,), 1, num_groups)  # per destination slot
    dest_group = (jnp.arange(num_groups)[:, None] + offsets[slots]) % num_groups
    inverse = (dest_group * s + slots).reshape(n).astype(jnp.int32)  # destination of source i
    perm = jnp.zeros((n,), jnp.int32).at[inverse].set(jnp.arange(n, dtype=jnp.int32))
    return perm, inverse


def encode_keys_shuffled(graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State,
                         x: Array, rng: Array, *, num_groups: int) -> tuple[Array, nnx.State]:
    """Key forward with shuffle BN: permute across groups, train-mode BN per group, un-permute.

    Returns (keys without gradient, the key encoder's updated BN running statistics).
    """
    perm, inverse = permute_for_shuffle_bn(rng, x.shape[0], num_groups)
    k, batch_stats = apply_encoder(graphdef, params, batch_stats, x[perm], train=True,
                                   bn_groups=num_groups)
    return jax.lax.stop_gradient(k[inverse]), batch_stats


# ------------------------------------------------------------------------------------- loss
FalseNegatives = Literal["none", "patient", "study"]
HardMode = Literal["none", "same_laterality_only", "reweight"]


def moco_loss(q: Array, k_pos: Array, queue: QueueState, *, temperature: float = 0.2,
              q_patient: Optional[Array] = None, q_study: Optional[Array] = None,
              q_laterality: Optional[Array] = None,
              mask_false_negatives: FalseNegatives = "none",
              hard_negatives: Optional[Array] = None,
              hard_negatives_valid: Optional[Array] = None,
              hard_mode: HardMode = "none", hard_weight: float = 0.9,
              ) -> tuple[Array, dict[str, Array]]:
    """MoCo InfoNCE with a queue and MedAug's metadata options. Returns (mean loss, metrics).

    q, k_pos: (B, D) L2-normalised (any float dtype; computed in float32). Logits are
    ``[q.k_pos, q.queue^T, q.hard^T] / temperature`` with target index 0.

    mask_false_negatives: queue entries that are positives in disguise get logit -inf:
      'patient' = same patient as the query; 'study' = same patient AND same study (MedAug's mask;
      safe whether study ids are global or per patient); 'none'. Entries with patient id -1 never
      match. The positive itself is never masked.
    hard_negatives: (B, m, D) extra negative keys per query (e.g. key-encoder embeddings of
      metadata hard negatives: same patient, other study), appended to the logits;
      ``hard_negatives_valid`` (B, m) bool drops padding.
    hard_mode (MedAug §4.3, "hard" = queue entry with the query's laterality):
      'same_laterality_only' - the denominator keeps only same-laterality queue entries (entries
        of unknown laterality, -1, are dropped);
      'reweight' - the queue terms of the denominator are weighted so that the hard ones carry
        ``hard_weight`` of the total weight: w_hard = hard_weight * N / N_hard,
        w_easy = (1 - hard_weight) * N / N_easy over the N unmasked queue entries of that query
        (all weights 1 when a query has no hard or no easy entry). Appended hard negatives keep
        weight 1. MedAug computed the fractions over the whole queue; this uses the unmasked ones.
    """
    if mask_false_negatives not in ("none", "patient", "study"):
        raise ValueError(f"mask_false_negatives must be 'none', 'patient' or 'study', "
                         f"got {mask_false_negatives!r}")
    if hard_mode not in ("none", "same_laterality_only", "reweight"):
        raise ValueError(f"hard_mode must be 'none', 'same_laterality_only' or 'reweight', "
                         f"got {hard_mode!r}")
    needs = {"patient": mask_false_negatives != "none", "study": mask_false_negatives == "study",
             "laterality": hard_mode != "none"}
    given = {"patient": q_patient, "study": q_study, "laterality": q_laterality}
    for name, needed in needs.items():
        if needed and given[name] is None:
            raise ValueError(f"q_{name} is required for mask_false_negatives="
                             f"{mask_false_negatives!r}, hard_mode={hard_mode!r}")

    f32 = jnp.float32
    hp = jax.lax.Precision.HIGHEST
    q = q.astype(f32)
    k_pos = jax.lax.stop_gradient(k_pos.astype(f32))
    keys = jax.lax.stop_gradient(queue.keys.astype(f32))
    l_pos = jnp.sum(q * k_pos, axis=-1)                        # (B,)
    l_queue = jnp.einsum("bd,kd->bk", q, keys, precision=hp)   # (B, K)

    valid = jnp.ones(l_queue.shape, bool)
    false_neg = jnp.zeros(l_queue.shape, bool)
    if mask_false_negatives != "none":
        false_neg = (q_patient[:, None] == queue.patient[None, :]) & (queue.patient[None, :] >= 0)
        if mask_false_negatives == "study":
            false_neg &= q_study[:, None] == queue.study[None, :]
        valid &= ~false_neg
    log_w = jnp.zeros(l_queue.shape, f32)
    if hard_mode != "none":
        same_lat = q_laterality[:, None] == queue.laterality[None, :]
        if hard_mode == "same_laterality_only":
            valid &= same_lat
        else:  # reweight
            hard = valid & same_lat
            n = valid.sum(1, keepdims=True).astype(f32)
            n_hard = hard.sum(1, keepdims=True).astype(f32)
            n_easy = n - n_hard
            ok = (n_hard > 0) & (n_easy > 0)
            w_hard = jnp.where(ok, hard_weight * n / jnp.maximum(n_hard, 1.0), 1.0)
            w_easy = jnp.where(ok, (1.0 - hard_weight) * n / jnp.maximum(n_easy, 1.0), 1.0)
            log_w = jnp.log(jnp.where(hard, w_hard, w_easy))

    neg_logits = [jnp.where(valid, l_queue / temperature + log_w, -jnp.inf)]
    max_neg = jnp.max(jnp.where(valid, l_queue, -jnp.inf), axis=1)
    metrics: dict[str, Array] = {}
    if hard_negatives is not None:
        h = jax.lax.stop_gradient(hard_negatives.astype(f32))
        l_hard = jnp.einsum("bd,bmd->bm", q, h, precision=hp)
        h_valid = (jnp.ones(l_hard.shape, bool) if hard_negatives_valid is None
                   else hard_negatives_valid.astype(bool))
        neg_logits.append(jnp.where(h_valid, l_hard / temperature, -jnp.inf))
        max_neg = jnp.maximum(max_neg, jnp.max(jnp.where(h_valid, l_hard, -jnp.inf), axis=1))
        metrics["hard_sim"] = (jnp.sum(jnp.where(h_valid, l_hard, 0.0))
                               / jnp.maximum(h_valid.sum(), 1))

    logits = jnp.concatenate([(l_pos / temperature)[:, None], *neg_logits], axis=1)
    per_example = jax.nn.logsumexp(logits, axis=1) - l_pos / temperature
    loss = per_example.mean()
    n_valid = valid.sum()
    metrics.update(
        loss=loss,
        pos_sim=l_pos.mean(),
        neg_sim=jnp.sum(jnp.where(valid, l_queue, 0.0)) / jnp.maximum(n_valid, 1),
        acc=jnp.mean((l_pos > max_neg).astype(f32)),  # positive beats every negative
        num_negatives=n_valid.astype(f32) / q.shape[0],
        false_negatives=false_neg.sum().astype(f32) / q.shape[0],
    )
    return loss, metrics
