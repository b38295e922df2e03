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

from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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

    The batch is the *global* batch. K % B must be 0 so a batch never wraps around the end of the
    queue (as the reference MoCo). Written as a per-row select, not a dynamic_update_slice: with the
    queue split along K over the devices, every device then rewrites only its own K/N rows from the
    (small, replicated) batch of keys, and the queue itself never moves (a dynamic-offset update of a
    sharded dimension makes XLA gather the whole queue).
    """
    b, k = keys.shape[0], queue.size
    if k % b:
        raise ValueError(f"queue size K={k} must be a multiple of the (global) batch size {b}; "
                         f"choose K = {max(1, k // b) * b} or {(k // b + 1) * b}")
    if keys.shape[1] != queue.keys.shape[1]:
        raise ValueError(f"keys of dim {keys.shape[1]} for a queue of dim {queue.keys.shape[1]}")
    slot = jnp.arange(k, dtype=jnp.int32) - queue.ptr   # row r takes batch entry r - ptr ...
    inside = (slot >= 0) & (slot < b)                     # ... when that is a batch position
    src = jnp.clip(slot, 0, b - 1)

    def put(buf, v):
        new = jnp.take(jax.lax.stop_gradient(v).astype(buf.dtype), src, axis=0)
        return jnp.where(inside.reshape((k,) + (1,) * (buf.ndim - 1)), new, buf)

    return QueueState(keys=put(queue.keys, keys), patient=put(queue.patient, patient),
                      study=put(queue.study, study), laterality=put(queue.laterality, laterality),
                      ptr=((queue.ptr + b) % k).astype(jnp.int32))


# ----------------------------------------------------------------------------- shuffle BN
def permute_for_shuffle_bn(rng: Array, n: int, num_groups: int) -> tuple[Array, Array]:
    """A permutation of the global batch for shuffle BN: ``x[perm]`` is fed to the key encoder
    (whose BN normalises each contiguous group of ``n // num_groups``), ``k[inverse]`` restores order.

    With ``num_groups >= 2`` every example lands in a group other than its own (group g = positions
    g*s .. g*s+s-1): position j inside a group is filled from group ``g - o_j`` with a random offset
    ``o_j`` in [1, num_groups), so a query and its key never share BN statistics (the reference
    MoCo's uniform shuffle leaves 1/num_gpus of keys on their own GPU). ``num_groups == 1``: a plain
    random permutation (it cannot change full-batch statistics; `encode_keys_shuffled` skips it).
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
                         inputs, rng: Array, *, num_groups: int,
                         to_views: Callable = lambda x: x,
                         constrain: Callable[[Array], Array] = lambda x: x) -> tuple[Array, nnx.State]:
    """Key forward with shuffle BN: permute across groups, train-mode BN per group, un-permute.

    ``inputs``: an array, or a pytree of arrays, with the keys along the leading axis (e.g. the
    uint8 key views and their augmentation seeds); ``to_views(inputs)`` makes the encoder's float
    input (normalisation / on-device augmentation). The permutation is applied to ``inputs``, before
    ``to_views``: the one exchange shuffle BN needs moves the compact uint8 views, and augmentation
    then runs where each key now lies. ``constrain`` pins an array with the keys' leading axis to the
    batch sharding (``jax.lax.with_sharding_constraint``): after the permuting gather XLA would
    otherwise keep the whole shuffled batch on every device and run the key encoder on all of it.
    With ``num_groups == 1`` (BN over the whole batch) nothing is permuted: a permutation cannot
    change whole-batch statistics.

    Returns (keys without gradient, the key encoder's updated BN running statistics).
    """
    n = jax.tree.leaves(inputs)[0].shape[0]
    if num_groups > 1:
        perm, inverse = permute_for_shuffle_bn(rng, n, num_groups)
        inputs = jax.tree.map(lambda a: constrain(jnp.take(a, perm, axis=0)), inputs)
    x = constrain(to_views(inputs))
    k, batch_stats = apply_encoder(graphdef, params, batch_stats, x, train=True, bn_groups=num_groups)
    if num_groups > 1:
        k = jnp.take(k, inverse, axis=0)
    return jax.lax.stop_gradient(k), batch_stats


# ----------------------------------------------------------------------------- hard negatives
FalseNegatives = Literal["none", "patient", "study"]
HardMode = Literal["none", "same_laterality_only", "reweight", "append", "synthetic"]
HARD_MODES = ("none", "same_laterality_only", "reweight", "append", "synthetic")
FRONTAL, LATERAL = 0, 1  # `pairs.metadata_codes` laterality codes (schema.LATERALITIES order); 2 = unknown


def num_appended(queue_size: int, fraction: float) -> int:
    """MedAug's ``int(append_hard_negative * K)`` queue keys appended per laterality."""
    return int(fraction * queue_size)


def sample_queue_hard_negatives(rng: Array, laterality: Array, n: int) -> dict[str, Array]:
    """The random draws of MedAug's appended / synthetic hard negatives (their `sample_negative_pairs`
    and `sample_synthetic_index`), for each laterality L in (frontal, lateral):

      index[L]  (n,) queue rows: n distinct rows of laterality L drawn uniformly (without
                replacement); `valid[L]` (n,) is False where the queue holds fewer than n such rows
                (MedAug's code raises instead; here the missing ones are left out of the loss);
      pair1[L], pair2[L]  (n,) two random permutations of range(n), and frac[L] (n,) ~ U(0, 1):
                synthetic negative i mixes keys index[pair1[i]] and index[pair2[i]] with weights
                frac[i] and 1 - frac[i].
    Arrays are stacked over L: shape (2, n). One draw per batch, shared by every query of that
    laterality (as theirs).
    """
    k = laterality.shape[0]
    r_sel, r_p1, r_p2, r_frac = jax.random.split(rng, 4)
    u = jax.random.uniform(r_sel, (2, k))
    index, valid = [], []
    for lat in (FRONTAL, LATERAL):
        # the n smallest uniforms among rows of this laterality = a uniform n-subset of them
        score = jnp.where(laterality == lat, u[lat], 2.0)
        neg_top, idx = jax.lax.top_k(-score, n)
        index.append(idx.astype(jnp.int32))
        valid.append(neg_top > -2.0)
    perms = lambda r: jax.vmap(lambda rr: jax.random.permutation(rr, n))(jax.random.split(r, 2))
    return {"index": jnp.stack(index), "valid": jnp.stack(valid), "pair1": perms(r_p1).astype(jnp.int32),
            "pair2": perms(r_p2).astype(jnp.int32), "frac": jax.random.uniform(r_frac, (2, n))}


# ------------------------------------------------------------------------------------- loss
def moco_loss(q: Array, k_pos: Array, queue: QueueState, *, temperature: float = 0.2,
              q_patient: Optional[Array] = None, q_study: Optional[Array] = None,
              q_laterality: Optional[Array] = None,
              mask_false_negatives: FalseNegatives = "none",
              hard_negatives: Optional[Array] = None,
              hard_negatives_valid: Optional[Array] = None,
              hard_mode: HardMode = "none", hard_weight: float = 0.9,
              append_fraction: float = 0.1, rng: Optional[Array] = None,
              queue_logits_sharding=None,
              ) -> tuple[Array, dict[str, Array]]:
    """MoCo InfoNCE with a queue and MedAug's metadata options. Returns (mean loss, metrics).

    q, k_pos: (B, D) L2-normalised (any float dtype; computed in float32). Logits are
    ``[q.k_pos, q.queue^T (, q.hard^T, synthetic)] / temperature`` with target index 0.

    mask_false_negatives: queue entries that are positives in disguise get logit -inf:
      'patient' = same patient as the query; 'study' = same patient AND same study (MedAug's mask;
      safe whether study ids are global or per patient); 'none'. Entries with patient id -1 never
      match. The positive itself is never masked. Whatever the setting, the metrics count them
      (`false_negatives_patient`, `false_negatives_study`: queue keys per query), so a run shows how
      often a query meets its own patient / study in the queue.
    hard_negatives: (B, m, D) extra negative keys per query (key-encoder embeddings of metadata hard
      negatives: same patient, other study), appended to the logits; ``hard_negatives_valid`` (B, m)
      bool drops padding.
    hard_mode: MedAug §4.3, "hard" = a queue key with the query's laterality (their code, moco/builder.py):
      'same_laterality_only' (their --negative_laterality_only) - the denominator keeps only
        same-laterality queue keys, and also drops keys of the query's patient and study (their
        `mask_positive`); keys of unknown laterality (initial random keys, -1) are dropped;
      'reweight' (--target-hard-negative) - once the queue holds only real keys, the queue terms of
        the denominator are weighted so that same-laterality keys carry ``hard_weight`` of the total
        weight: w_hard = hard_weight / f, w_easy = (1 - hard_weight) / (1 - f), f = the share of
        the query's laterality in the whole queue (all weights 1 while f is 0 or 1);
      'append' (--append-hard-negative) - once the queue holds only real keys, n = int(append_fraction
        * K) random same-laterality queue keys (one draw per laterality per batch) are appended to the
        negatives again (counted twice in the denominator);
      'synthetic' (--synthesize-hard-samples) - 'append' plus n synthetic negatives per query,
        normalised convex mixes ``frac * k1 + (1 - frac) * k2`` of two appended keys (MoCHi-like).
      'append' / 'synthetic' need ``rng`` (see `sample_queue_hard_negatives`).
    queue_logits_sharding: optional sharding of the (B, K) queue logits, e.g. K split like the
      queue: each device then scores its own K/N keys against the (tiny, gathered) queries and only
      per-query sums cross devices; the queue itself never moves.
    """
    if mask_false_negatives not in ("none", "patient", "study"):
        raise ValueError(f"mask_false_negatives must be 'none', 'patient' or 'study', "
                         f"got {mask_false_negatives!r}")
    if hard_mode not in HARD_MODES:
        raise ValueError(f"hard_mode must be one of {HARD_MODES}, got {hard_mode!r}")
    needs = {"patient": mask_false_negatives != "none" or hard_mode == "same_laterality_only",
             "study": mask_false_negatives == "study" or hard_mode == "same_laterality_only",
             "laterality": hard_mode != "none"}
    given = {"patient": q_patient, "study": q_study, "laterality": q_laterality}
    for name, needed in needs.items():
        if needed and given[name] is None:
            raise ValueError(f"q_{name} is required for mask_false_negatives="
                             f"{mask_false_negatives!r}, hard_mode={hard_mode!r}")
    if hard_mode in ("append", "synthetic") and rng is None:
        raise ValueError(f"hard_mode={hard_mode!r} draws random queue keys: pass rng")

    f32 = jnp.float32
    hp = jax.lax.Precision.HIGHEST
    q = q.astype(f32)
    k_pos = jax.lax.stop_gradient(k_pos.astype(f32))
    keys = jax.lax.stop_gradient(queue.keys.astype(f32))
    l_pos = jnp.sum(q * k_pos, axis=-1)                        # (B,)
    if queue_logits_sharding is not None:
        # The queries' ids travel to the queue rows (B ints each), never (B, K) masks to the queries.
        everywhere = NamedSharding(queue_logits_sharding.mesh, P())
        q_patient, q_study, q_laterality = (
            None if a is None else jax.lax.with_sharding_constraint(a, everywhere)
            for a in (q_patient, q_study, q_laterality))
    l_queue = jnp.einsum("bd,kd->bk", q, keys, precision=hp)   # (B, K)
    if queue_logits_sharding is not None:
        l_queue = jax.lax.with_sharding_constraint(l_queue, queue_logits_sharding)

    metrics: dict[str, Array] = {}
    valid = jnp.ones(l_queue.shape, bool)
    same_patient = same_study = None
    if q_patient is not None:
        same_patient = (q_patient[:, None] == queue.patient[None, :]) & (queue.patient[None, :] >= 0)
        metrics["false_negatives_patient"] = same_patient.sum(1).astype(f32).mean()
        if q_study is not None:
            same_study = same_patient & (q_study[:, None] == queue.study[None, :])
            metrics["false_negatives_study"] = same_study.sum(1).astype(f32).mean()
    if mask_false_negatives != "none":
        valid &= ~(same_patient if mask_false_negatives == "patient" else same_study)

    log_w = jnp.zeros(l_queue.shape, f32)
    extra_logits, extra_valid = [], []
    if hard_mode != "none":
        same_lat = q_laterality[:, None] == queue.laterality[None, :]          # (B, K)
        full = jnp.all(queue.laterality >= 0)  # MedAug weights/appends only once the queue holds real keys
        if hard_mode == "same_laterality_only":
            valid &= same_lat & ~same_study
        elif hard_mode == "reweight":
            k = queue.size
            share = jnp.stack([jnp.sum(queue.laterality == lat) for lat in (FRONTAL, LATERAL)]).astype(f32) / k
            f = jnp.where(q_laterality == LATERAL, share[1], share[0])[:, None]   # (B, 1)
            ok = full & (f > 0) & (f < 1) & (q_laterality[:, None] <= LATERAL)
            w_hard = jnp.where(ok, hard_weight / jnp.where(ok, f, 1.0), 1.0)
            w_easy = jnp.where(ok, (1.0 - hard_weight) / jnp.where(ok, 1.0 - f, 1.0), 1.0)
            log_w = jnp.log(jnp.where(same_lat, w_hard, w_easy))
        else:  # append / synthetic
            n = num_appended(queue.size, append_fraction)
            draw = sample_queue_hard_negatives(rng, queue.laterality, n)
            # An appended key counts twice in the denominator: weight 2 on the drawn rows of the
            # query's laterality (the same loss and gradient as concatenating their logits again).
            # top_k rows are distinct, so `set` never overwrites a drawn row with an undrawn one
            drawn = jnp.stack([jnp.zeros(queue.size, bool).at[draw["index"][lat]].set(draw["valid"][lat])
                               for lat in (FRONTAL, LATERAL)])                   # (2, K)
            q_lat = jnp.clip(q_laterality, 0, 1)
            known = (q_laterality[:, None] <= LATERAL) & full
            appended = known & drawn[q_lat]
            log_w = jnp.where(appended, jnp.log(2.0), 0.0).astype(f32)
            metrics["appended"] = appended.sum(1).astype(f32).mean()
            if hard_mode == "synthetic":
                syn = []
                for lat in (FRONTAL, LATERAL):
                    idx = draw["index"][lat]
                    k1 = jnp.take(keys, jnp.take(idx, draw["pair1"][lat]), axis=0)
                    k2 = jnp.take(keys, jnp.take(idx, draw["pair2"][lat]), axis=0)
                    fr = draw["frac"][lat][:, None]
                    mix = fr * k1 + (1.0 - fr) * k2
                    mix = mix / jnp.maximum(jnp.linalg.norm(mix, axis=-1, keepdims=True), 1e-12)
                    ok = jnp.take(draw["valid"][lat], draw["pair1"][lat]) & jnp.take(draw["valid"][lat],
                                                                                      draw["pair2"][lat])
                    syn.append((jnp.einsum("bd,nd->bn", q, mix, precision=hp), ok))
                l_syn = jnp.where((q_laterality == LATERAL)[:, None], syn[1][0], syn[0][0])
                ok_syn = jnp.where((q_laterality == LATERAL)[:, None], syn[1][1][None, :], syn[0][1][None, :])
                extra_logits.append(l_syn)
                extra_valid.append(ok_syn & known)

    if hard_negatives is not None:
        h = jax.lax.stop_gradient(hard_negatives.astype(f32))
        l_hard = jnp.einsum("bd,bmd->bm", q, h, precision=hp)
        h_valid = (jnp.ones(l_hard.shape, bool) if hard_negatives_valid is None
                   else hard_negatives_valid.astype(bool))
        metrics["hard_sim"] = (jnp.sum(jnp.where(h_valid, l_hard, 0.0)) / jnp.maximum(h_valid.sum(), 1))
        extra_logits.append(l_hard)
        extra_valid.append(h_valid)

    neg_logits = [jnp.where(valid, l_queue / temperature + log_w, -jnp.inf)]
    max_neg = jnp.max(jnp.where(valid, l_queue, -jnp.inf), axis=1)
    n_extra = jnp.zeros((), f32)
    for l_x, ok in zip(extra_logits, extra_valid):
        neg_logits.append(jnp.where(ok, l_x / temperature, -jnp.inf))
        max_neg = jnp.maximum(max_neg, jnp.max(jnp.where(ok, l_x, -jnp.inf), axis=1))
        n_extra = n_extra + ok.sum().astype(f32)

    # log(exp(l_pos) + sum exp(negatives)), part by part: concatenating the K-split queue logits with
    # the others would make XLA re-lay them out across devices; per-part sums only exchange (B,) values.
    lse = l_pos / temperature
    for part in neg_logits:
        lse = jnp.logaddexp(lse, jax.nn.logsumexp(part, axis=1))
    per_example = lse - l_pos / temperature
    loss = per_example.mean()
    n_valid = valid.sum()
    metrics.update(
        loss=loss,
        pos_sim=l_pos.mean(),
        neg_sim=jnp.sum(jnp.where(valid, l_queue, 0.0)) / jnp.maximum(n_valid, 1),
        acc=jnp.mean((l_pos > max_neg).astype(f32)),  # positive beats every negative
        num_negatives=(n_valid.astype(f32) + n_extra) / q.shape[0],
    )
    return loss, metrics
