"""MoCo pieces: InfoNCE vs a direct numpy implementation, queue, EMA, shuffle BN, device independence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxrjax.models.moco import (QueueState, apply_encoder, build_moco_encoder, copy_encoder,
                                ema_update,
                                encode_keys_shuffled, enqueue, init_queue, moco_loss, num_appended,
                                permute_for_shuffle_bn, sample_queue_hard_negatives)
from medaug_reference import medaug_loss
from model_utils import fast_init

T = 0.2


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _queue(rng, k=32, d=16, ids=True):
    qs = init_queue(jax.random.key(0), k, d)
    if not ids:
        return qs
    return QueueState(keys=jnp.asarray(_unit(rng, k, d)),
                      patient=jnp.asarray(rng.integers(-1, 4, k), jnp.int32),
                      study=jnp.asarray(rng.integers(0, 3, k), jnp.int32),
                      laterality=jnp.asarray(rng.integers(-1, 2, k), jnp.int32),
                      ptr=jnp.zeros((), jnp.int32))


def _np_infonce(q, k, queue_keys, *, valid=None, weight=None, hard=None, hard_valid=None, t=T):
    """-log( e^{q.k/t} / (e^{q.k/t} + sum_j w_j e^{q.n_j/t}) ), one query at a time, float64."""
    q, k, queue_keys = (np.asarray(a, np.float64) for a in (q, k, queue_keys))
    losses = []
    for i in range(q.shape[0]):
        pos = np.exp(q[i] @ k[i] / t)
        den = pos
        for j in range(queue_keys.shape[0]):
            if valid is None or valid[i, j]:
                den += (1.0 if weight is None else weight[i, j]) * np.exp(q[i] @ queue_keys[j] / t)
        if hard is not None:
            for j in range(hard.shape[1]):
                if hard_valid is None or hard_valid[i, j]:
                    den += np.exp(q[i] @ np.asarray(hard[i, j], np.float64) / t)
        losses.append(-np.log(pos / den))
    return float(np.mean(losses))


def test_loss_plain_matches_numpy():
    rng = np.random.default_rng(0)
    q, k = _unit(rng, 8, 16), _unit(rng, 8, 16)
    qs = _queue(rng)
    loss, m = jax.jit(functools.partial(moco_loss, temperature=T))(q, k, qs)
    np.testing.assert_allclose(loss, _np_infonce(q, k, qs.keys), rtol=1e-5, atol=1e-5)
    # the same thing as cross-entropy with target 0 over [l_pos, l_neg] / T
    logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ np.asarray(qs.keys).T], 1) / T
    ce = -(logits[:, 0] - np.log(np.exp(logits).sum(1))).mean()
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    np.testing.assert_allclose(m["pos_sim"], (q * k).sum(1).mean(), atol=1e-6)
    np.testing.assert_allclose(m["neg_sim"], (q @ np.asarray(qs.keys).T).mean(), atol=1e-6)
    assert float(m["num_negatives"]) == 32
    assert "false_negatives_patient" not in m  # no query metadata given: nothing to count against


@pytest.mark.parametrize("mode", ["patient", "study"])
def test_loss_false_negative_masking(mode):
    rng = np.random.default_rng(1)
    q, k = _unit(rng, 8, 16), _unit(rng, 8, 16)
    qs = _queue(rng)
    qp = rng.integers(0, 4, 8).astype(np.int32)
    qst = rng.integers(0, 3, 8).astype(np.int32)
    qpat, qstudy = np.asarray(qs.patient), np.asarray(qs.study)
    masked = np.zeros((8, 32), bool)
    for i in range(8):
        for j in range(32):
            same = qpat[j] >= 0 and qpat[j] == qp[i]
            masked[i, j] = same and (mode == "patient" or qstudy[j] == qst[i])
    assert 0 < masked.sum() < masked.size
    loss, m = moco_loss(q, k, qs, temperature=T, q_patient=qp, q_study=qst,
                        mask_false_negatives=mode)
    np.testing.assert_allclose(loss, _np_infonce(q, k, qs.keys, valid=~masked), rtol=1e-5, atol=1e-5)
    assert float(m[f"false_negatives_{mode}"]) == masked.sum() / 8
    # counted whether or not they are masked (a run without masking still shows how often they occur)
    _, m_off = moco_loss(q, k, qs, temperature=T, q_patient=qp, q_study=qst)
    assert float(m_off[f"false_negatives_{mode}"]) == masked.sum() / 8
    np.testing.assert_allclose(m["neg_sim"], (q @ np.asarray(qs.keys).T)[~masked].mean(), atol=1e-6)
    # masking changes the loss, and a query whose every queue entry is masked still has its positive
    assert abs(float(loss) - _np_infonce(q, k, qs.keys)) > 1e-3
    all_same = QueueState(qs.keys, jnp.zeros(32, jnp.int32), jnp.zeros(32, jnp.int32), qs.laterality, qs.ptr)
    loss0, m0 = moco_loss(q, k, all_same, temperature=T, q_patient=np.zeros(8, np.int32),
                          q_study=np.zeros(8, np.int32), mask_false_negatives=mode)
    assert float(loss0) == 0.0 and float(m0["acc"]) == 1.0 and float(m0["num_negatives"]) == 0
    # gradients stay finite through the -inf entries
    g = jax.grad(lambda q: moco_loss(q, k, qs, temperature=T, q_patient=qp, q_study=qst,
                                     mask_false_negatives=mode)[0])(jnp.asarray(q))
    assert np.isfinite(np.asarray(g)).all()


def test_loss_with_appended_hard_negatives_and_masking():
    rng = np.random.default_rng(2)
    q, k = _unit(rng, 8, 16), _unit(rng, 8, 16)
    hard = _unit(rng, 8, 3, 16)
    hv = rng.random((8, 3)) > 0.3
    qs = _queue(rng)
    qp = rng.integers(0, 4, 8).astype(np.int32)
    masked = (np.asarray(qs.patient)[None] == qp[:, None]) & (np.asarray(qs.patient)[None] >= 0)
    loss, m = moco_loss(q, k, qs, temperature=T, q_patient=qp, mask_false_negatives="patient",
                        hard_negatives=hard, hard_negatives_valid=hv)
    ref = _np_infonce(q, k, qs.keys, valid=~masked, hard=hard, hard_valid=hv)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["hard_sim"], np.einsum("bd,bmd->bm", q, hard)[hv].mean(), atol=1e-6)
    loss_all, _ = moco_loss(q, k, qs, temperature=T, hard_negatives=hard)
    np.testing.assert_allclose(loss_all, _np_infonce(q, k, qs.keys, hard=hard), rtol=1e-5, atol=1e-5)


def _full_queue(rng, k=48, d=16):
    """A queue of real keys only (no -1 laterality): MedAug's reweight / append act from then on."""
    return QueueState(keys=jnp.asarray(_unit(rng, k, d)),
                      patient=jnp.asarray(rng.integers(0, 4, k), jnp.int32),
                      study=jnp.asarray(rng.integers(0, 3, k), jnp.int32),
                      laterality=jnp.asarray((rng.random(k) < 0.3).astype(np.int32)),
                      ptr=jnp.zeros((), jnp.int32))


def _meta(rng, b=8):
    return (rng.integers(0, 4, b).astype(np.int32), rng.integers(0, 3, b).astype(np.int32),
            (rng.random(b) < 0.4).astype(np.int32))


@pytest.mark.parametrize("mode", ["none", "same_laterality_only", "reweight", "append", "synthetic"])
def test_loss_medaug_variants_match_their_code(mode):
    """Each §4.3 variant against the numpy transcription of MedAug's builder (tests/medaug_reference.py)."""
    rng = np.random.default_rng(3)
    q, k = _unit(rng, 8, 16), _unit(rng, 8, 16)
    qs = _full_queue(rng)
    qp, qst, ql = _meta(rng)
    key = jax.random.key(5)
    loss, m = moco_loss(q, k, qs, temperature=T, q_patient=qp, q_study=qst, q_laterality=ql,
                        hard_mode=mode, hard_weight=0.9, append_fraction=0.25, rng=key)
    draw = sample_queue_hard_negatives(key, qs.laterality, num_appended(48, 0.25))
    ref = medaug_loss(q, k, qs.keys, qs.patient, qs.study, qs.laterality, qp, qst, ql, mode=mode,
                      temperature=T, target_hard=0.9, draw=jax.tree.map(np.asarray, draw))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-5)
    if mode != "none":  # every variant changes the loss
        plain, _ = moco_loss(q, k, qs, temperature=T)
        assert abs(float(loss) - float(plain)) > 1e-3


def test_loss_medaug_variants_wait_for_a_full_queue():
    """Reweight / append act only once no initial (-1) key is left in the queue, as MedAug's code."""
    rng = np.random.default_rng(6)
    q, k = _unit(rng, 8, 16), _unit(rng, 8, 16)
    qs = _full_queue(rng)
    qs = qs.replace(laterality=qs.laterality.at[0].set(-1), patient=qs.patient.at[0].set(-1))
    qp, qst, ql = _meta(rng)
    plain, _ = moco_loss(q, k, qs, temperature=T)
    for mode in ("reweight", "append", "synthetic"):
        loss, m = moco_loss(q, k, qs, temperature=T, q_patient=qp, q_study=qst, q_laterality=ql, hard_mode=mode,
                            rng=jax.random.key(0))
        np.testing.assert_allclose(float(loss), float(plain), rtol=1e-6)


def test_sample_queue_hard_negatives_draws_distinct_same_laterality_keys():
    lat = jnp.asarray(np.r_[np.zeros(30), np.ones(6), np.full(4, -1)].astype(np.int32))
    d = jax.tree.map(np.asarray, sample_queue_hard_negatives(jax.random.key(1), lat, 10))
    for L, available in ((0, 30), (1, 6)):
        idx, ok = d["index"][L], d["valid"][L]
        assert ok.sum() == min(10, available) and len(set(idx[ok])) == ok.sum()
        assert (np.asarray(lat)[idx[ok]] == L).all()
        assert sorted(d["pair1"][L]) == list(range(10)) and sorted(d["pair2"][L]) == list(range(10))
        assert ((d["frac"][L] >= 0) & (d["frac"][L] < 1)).all()
    # uniform over the 30 frontal keys: every key drawn in a fair share of 3000 draws (10 of 30 each)
    counts = np.zeros(40)
    for i in range(300):
        dd = sample_queue_hard_negatives(jax.random.key(100 + i), lat, 10)
        np.add.at(counts, np.asarray(dd["index"][0]), 1)
    assert counts[30:].sum() == 0 and 70 < counts[:30].min() and counts[:30].max() < 130


def test_loss_rejects_unknown_modes_and_missing_inputs():
    rng = np.random.default_rng(4)
    q, k = _unit(rng, 8, 16), _unit(rng, 8, 16)
    qs = _queue(rng)
    with pytest.raises(ValueError, match="q_laterality"):
        moco_loss(q, k, qs, hard_mode="reweight")
    with pytest.raises(ValueError, match="hard_mode"):
        moco_loss(q, k, qs, hard_mode="mochi")
    with pytest.raises(ValueError, match="rng"):
        moco_loss(q, k, qs, q_laterality=np.zeros(8, np.int32), hard_mode="append")


def test_loss_accuracy_and_bf16_inputs():
    rng = np.random.default_rng(4)
    qs = _queue(rng, ids=False)
    q = _unit(rng, 8, 16)
    k = q.copy()
    k[4:] = -q[4:]  # the last four positives lose to the queue, the first four win (q.k = 1)
    _, m = moco_loss(q, k, qs, temperature=T)
    assert float(m["acc"]) == 0.5
    loss32, _ = moco_loss(q, k, qs, temperature=T)
    loss16, m16 = moco_loss(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), qs, temperature=T)
    assert loss16.dtype == jnp.float32 and m16["pos_sim"].dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


# ------------------------------------------------------------------------------------ queue
def test_queue_init_enqueue_order_and_wraparound():
    qs = init_queue(jax.random.key(0), 6, 4)
    np.testing.assert_allclose(np.linalg.norm(qs.keys, axis=1), 1.0, rtol=1e-6)
    assert (np.asarray(qs.patient) == -1).all() and int(qs.ptr) == 0 and qs.ptr.dtype == jnp.int32
    enq = jax.jit(enqueue)
    init_keys = np.asarray(qs.keys)
    batches = [np.full((2, 4), 10.0 * (s + 1), np.float32) + np.arange(2)[:, None] for s in range(4)]
    for s, b in enumerate(batches):
        ids = np.arange(2, dtype=np.int32) + 100 * (s + 1)
        qs = enq(qs, b, ids, ids + 1, ids % 2)
        assert int(qs.ptr) == (2 * (s + 1)) % 6
    # after 4 batches of 2 in a queue of 6: slots 0-1 hold batch 4 (wrapped), 2-3 batch 2, 4-5 batch 3
    np.testing.assert_array_equal(qs.keys, np.concatenate([batches[3], batches[1], batches[2]]))
    np.testing.assert_array_equal(qs.patient, [400, 401, 200, 201, 300, 301])
    np.testing.assert_array_equal(qs.study, [401, 402, 201, 202, 301, 302])
    np.testing.assert_array_equal(qs.laterality, [0, 1, 0, 1, 0, 1])
    assert qs.keys.dtype == jnp.float32 and qs.patient.dtype == jnp.int32
    # two batches only: the untouched tail still holds the initial random keys
    q2 = init_queue(jax.random.key(0), 6, 4)
    q2 = enqueue(enqueue(q2, batches[0], *[np.zeros(2, np.int32)] * 3), batches[1], *[np.zeros(2, np.int32)] * 3)
    np.testing.assert_array_equal(q2.keys[4:], init_keys[4:])


def test_queue_size_must_be_a_multiple_of_the_batch():
    qs = init_queue(jax.random.key(0), 10, 4)
    z = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="multiple of the .*batch size 4"):
        enqueue(qs, np.zeros((4, 4), np.float32), z, z, z)


# -------------------------------------------------------------------------------------- EMA
def _tiny_encoder(seed=0):
    return fast_init(lambda: build_moco_encoder("resnet18", in_channels=1, width=8, embed_dim=16,
                                                 rngs=nnx.Rngs(0)), seed)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_encoder(0)


def test_ema_update_exact(tiny):
    key = nnx.clone(tiny)
    other = _tiny_encoder(1)
    kp = nnx.state(key, nnx.Param)
    qp = nnx.state(other, nnx.Param)
    new = jax.jit(ema_update)(kp, qp, 0.99)
    for a, b, c in zip(jax.tree.leaves(kp), jax.tree.leaves(qp), jax.tree.leaves(new)):
        np.testing.assert_allclose(c, 0.99 * np.asarray(a) + 0.01 * np.asarray(b), rtol=1e-6, atol=1e-7)
    assert jax.tree.structure(new) == jax.tree.structure(kp)
    same = ema_update(kp, kp, 0.999)
    assert all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(kp)))
    # batch statistics are not part of the update (the key encoder's BN buffers are its own)
    assert not any("mean" in str(p[-1]) for p, _ in nnx.to_flat_state(new))
    d = ema_update({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, 0.75)
    np.testing.assert_array_equal(d["w"], [0.75] * 3)


def test_encoder_outputs_unit_embeddings(tiny):
    g, p, s = nnx.split(tiny, nnx.Param, nnx.BatchStat)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 1))
    emb, s2 = jax.jit(apply_encoder, static_argnames=("graphdef", "train", "bn_groups"))(
        graphdef=g, params=p, batch_stats=s, x=x, train=True, bn_groups=1)
    assert emb.shape == (4, 16) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert tiny.head.linear1.kernel.shape == (64, 64)  # hidden = feature dim (512 for width 64)
    assert jax.tree.structure(s2) == jax.tree.structure(s)


# ------------------------------------------------------------------------------- shuffle BN
@pytest.mark.parametrize("n, groups", [(16, 4), (12, 2), (8, 8), (6, 1)])
def test_permute_for_shuffle_bn(n, groups):
    perm, inv = jax.jit(permute_for_shuffle_bn, static_argnums=(1, 2))(jax.random.key(3), n, groups)
    perm, inv = np.asarray(perm), np.asarray(inv)
    assert sorted(perm) == list(range(n)) and sorted(inv) == list(range(n))
    x = np.arange(n) * 10
    np.testing.assert_array_equal(x[perm][inv], x)
    if groups > 1:
        s = n // groups
        src_group = np.arange(n) // s
        assert (src_group[perm] != np.arange(n) // s).all()  # every key leaves its query's group
    with pytest.raises(ValueError, match="num_groups"):
        permute_for_shuffle_bn(jax.random.key(0), n + 1, 2 if n % 2 == 0 else 4)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_groups"))
def _keys(graphdef, params, stats, x, rng, num_groups):
    return encode_keys_shuffled(graphdef, params, stats, x, rng, num_groups=num_groups)


@functools.partial(jax.jit, static_argnames=("graphdef", "train", "bn_groups"))
def _apply(graphdef, params, stats, x, train, bn_groups):
    return apply_encoder(graphdef, params, stats, x, train=train, bn_groups=bn_groups)


def test_shuffle_bn_unpermutes_and_uses_group_statistics(tiny):
    g, p, s = nnx.split(tiny, nnx.Param, nnx.BatchStat)
    x = jax.random.normal(jax.random.key(1), (16, 64, 64, 1))
    rng = jax.random.key(7)
    keys, new_stats = _keys(g, p, s, x, rng, 4)
    perm, inv = permute_for_shuffle_bn(rng, 16, 4)
    xs = x[perm]
    # each group of the shuffled batch alone through the encoder (plain train-mode BN), then un-permute
    parts = [_apply(g, p, s, xs[i * 4:(i + 1) * 4], True, 1)[0] for i in range(4)]
    expected = np.concatenate(parts)[np.asarray(inv)]
    np.testing.assert_allclose(keys, expected, atol=1e-5)
    # group statistics differ from full-batch statistics
    full, _ = _apply(g, p, s, x, True, 1)
    assert np.abs(np.asarray(full) - np.asarray(keys)).max() > 1e-2
    # the key encoder's BN running stats moved (its own forward pass, train mode)
    assert not np.allclose(new_stats["backbone"]["bn1"]["mean"][...], s["backbone"]["bn1"]["mean"][...])


def test_grouped_key_forward_does_not_depend_on_device_count(tiny):
    g, p, s = nnx.split(tiny, nnx.Param, nnx.BatchStat)
    x = jax.random.normal(jax.random.key(2), (16, 64, 64, 1))
    rng = jax.random.key(11)
    outs = []
    for n_dev in (1, 8):
        mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        ps, ss = jax.device_put((p, s), NamedSharding(mesh, P()))
        k, st = _keys(g, ps, ss, xs, rng, 4)
        assert len(xs.sharding.device_set) == n_dev
        outs.append((np.asarray(k), jax.tree.map(np.asarray, st)))
    assert len(jax.devices()) >= 8
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-5)
    for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ a whole step, as the trainer
@pytest.mark.slow
def test_train_step_pattern_under_jit_on_8_devices(tiny):
    """The functional pattern recommended to the trainer: EMA, shuffled keys, loss+grad, enqueue."""
    import optax

    query = copy_encoder(tiny)
    key_enc = copy_encoder(query)  # own buffers: the whole state is donated
    g, qp, qs_ = nnx.split(query, nnx.Param, nnx.BatchStat)
    _, kp, ks = nnx.split(key_enc, nnx.Param, nnx.BatchStat)
    tx = optax.adam(1e-3)
    opt = tx.init(qp)
    queue = init_queue(jax.random.key(0), 32, 16)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, x_q, x_k, patient, study, lat, rng):
        qp, qs_, kp, ks, opt, queue = state
        kp = ema_update(kp, qp, 0.99)
        k, ks = encode_keys_shuffled(g, kp, ks, x_k, rng, num_groups=4)

        def loss_fn(qp, qs_):
            q, qs_ = apply_encoder(g, qp, qs_, x_q, train=True, bn_groups=1)
            loss, metrics = moco_loss(q, k, queue, temperature=T, q_patient=patient, q_study=study,
                                      mask_false_negatives="study")
            return loss, (qs_, metrics)

        grads, (qs_, metrics) = jax.grad(loss_fn, has_aux=True)(qp, qs_)
        updates, opt = tx.update(grads, opt, qp)
        qp = optax.apply_updates(qp, updates)
        queue = enqueue(queue, k, patient, study, lat)
        return (qp, qs_, kp, ks, opt, queue), metrics

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put((qp, qs_, kp, ks, opt, queue), rep)
    r = np.random.default_rng(0)
    kp0 = jax.tree.map(np.asarray, kp)
    for i in range(2):
        x_q, x_k = (jax.device_put(r.normal(size=(16, 32, 32, 1)).astype(np.float32), dat) for _ in range(2))
        ids = jax.device_put(np.arange(16, dtype=np.int32) // 2, dat)
        state, metrics = step(state, x_q, x_k, ids, ids, ids % 2, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"])) and int(state[5].ptr) == 0  # 2 x 16 = 32
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(kp0), jax.tree.leaves(state[2])))
    np.testing.assert_allclose(np.linalg.norm(state[5].keys, axis=1), 1.0, rtol=1e-5)
