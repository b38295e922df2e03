"""MedAug's §4.3 hard-negative variants through the trainer's real step (`contrastive.build_training`):
the loss one jitted step reports equals the numpy transcription of MedAug's code
(tests/medaug_reference.py) on the same batch, queue and random draws."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moco_medaug
from cxrjax.data import augment as augment_lib
from cxrjax.models import moco
from cxrjax.train import contrastive as ct
from medaug_reference import medaug_loss

B, K, S = 8, 48, 24


def _config(variant: str):
    c = moco_medaug.get_config(f"study-same_lat-any,{variant}" if variant else "study-same_lat-any")
    c.model.update(arch="resnet18", width=4, init="random", embed_dim=16, hidden_dim=32)
    c.batch_size, c.moco.queue_size = B, K
    c.augment.update(size=S, where="host")
    c.moco.append_fraction = 0.25
    return c


def _batch(rng):
    img = lambda: rng.integers(0, 256, (B, S, S, 1), dtype=np.uint8)
    ids = lambda hi: rng.integers(0, hi, B).astype(np.int32)
    return {"query": img(), "key": img(), "patient": ids(4), "study": ids(3), "laterality": ids(2),
            "key_study": ids(3), "key_laterality": ids(2)}


def _full_queue(rng):
    x = rng.normal(size=(K, 16))
    return moco.QueueState(keys=jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), jnp.float32),
                           patient=jnp.asarray(rng.integers(0, 4, K), jnp.int32),
                           study=jnp.asarray(rng.integers(0, 3, K), jnp.int32),
                           laterality=jnp.asarray((rng.random(K) < 0.3).astype(np.int32)),
                           ptr=jnp.zeros((), jnp.int32))


@pytest.mark.parametrize("variant, mode", [("", "none"), ("lat-only", "same_laterality_only"),
                                           ("reweight", "reweight"), ("append", "append"),
                                           ("synthetic", "synthetic")])
def test_step_loss_equals_medaug_reference(variant, mode):
    config = _config(variant)
    assert config.moco.hard_mode == mode
    mesh = ct.make_mesh(config)
    setup = ct.build_training(config, mesh, total_steps=10)
    rng = np.random.default_rng(0)
    queue = _full_queue(rng)
    batch = _batch(rng)
    state = setup.state.replace(queue=queue)

    # the encoders as the step sees them: query == key encoder at initialisation (EMA keeps them equal)
    query, _ = ct.build_encoders(config, note=lambda s: None)
    graph, params, stats = nnx.split(query, nnx.Param, nnx.BatchStat)
    encode = lambda x: np.asarray(moco.apply_encoder(graph, params, stats, jnp.asarray(
        augment_lib.normalize(x)), train=True, bn_groups=1)[0])
    q, k = encode(batch["query"]), encode(batch["key"])
    _, _, hard_rng = jax.random.split(state.rng, 3)
    draw = moco.sample_queue_hard_negatives(hard_rng, queue.laterality,
                                            moco.num_appended(K, config.moco.append_fraction))
    expected = medaug_loss(q, k, queue.keys, queue.patient, queue.study, queue.laterality, batch["patient"],
                           batch["study"], batch["laterality"], mode=mode, temperature=config.moco.temperature,
                           target_hard=config.moco.hard_weight, draw=jax.tree.map(np.asarray, draw))

    _, metrics = setup.train_step(state, {key: jnp.asarray(v) for key, v in batch.items()})
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-5, atol=2e-5)
    # false negatives are counted whatever the variant: keys of the query's patient (and study) in the queue
    same_patient = batch["patient"][:, None] == np.asarray(queue.patient)[None, :]
    same_study = same_patient & (batch["study"][:, None] == np.asarray(queue.study)[None, :])
    np.testing.assert_allclose(float(metrics["false_negatives_patient"]), same_patient.sum(1).mean())
    np.testing.assert_allclose(float(metrics["false_negatives_study"]), same_study.sum(1).mean())
