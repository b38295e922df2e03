"""The ('data', 'fsdp', 'model') mesh from config and the parameter sharding rules (8 simulated devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cxrjax.train import mesh as mesh_lib


def test_mesh_shape_fills_the_free_axis_and_checks_the_product():
    assert mesh_lib.mesh_shape({"data": -1, "fsdp": 1, "model": 1}, 8) == (8, 1, 1)
    assert mesh_lib.mesh_shape({"data": 2, "fsdp": -1, "model": 2}, 8) == (2, 2, 2)
    assert mesh_lib.mesh_shape({"data": -1}, 4) == (4, 1, 1)  # missing axes are 1
    with pytest.raises(ValueError, match="has 4 devices but 8 are visible"):
        mesh_lib.mesh_shape({"data": 4, "fsdp": 1, "model": 1}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": 3, "model": 1}, 8)
    with pytest.raises(ValueError, match="at most one is -1"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axes \\['tensor'\\]"):
        mesh_lib.mesh_shape({"data": -1, "tensor": 2}, 8)


def test_make_mesh_on_8_devices():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_processes_go_over_data_then_fsdp_and_model_stays_in_a_host():
    # 4 hosts x 4 devices
    assert mesh_lib._dcn_split((16, 1, 1), 4, 4) == ((4, 1, 1), (4, 1, 1))
    assert mesh_lib._dcn_split((2, 4, 2), 4, 4) == ((1, 2, 2), (2, 2, 1))
    assert mesh_lib._dcn_split((1, 8, 2), 4, 4) == ((1, 2, 2), (1, 4, 1))
    with pytest.raises(ValueError, match="stays inside a host"):
        mesh_lib._dcn_split((2, 1, 8), 2, 4)
    with pytest.raises(ValueError, match="multiple of the process count"):
        mesh_lib._dcn_split((3, 1, 2), 4, 6)


def test_hybrid_mesh_keeps_each_process_devices_together():
    """Fake 2 processes x 4 devices: `data` crosses processes, `model` never does."""
    class Dev:
        def __init__(self, i):
            self.id, self.process_index, self.platform, self.device_kind = i, i // 4, "cpu", "cpu"
            self.slice_index = 0

        def __repr__(self):
            return f"D{self.id}"

    from jax.experimental import mesh_utils

    devs = [Dev(i) for i in range(8)]
    ici, dcn = mesh_lib._dcn_split((2, 2, 2), 2, 4)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devs, process_is_granule=True)
    assert grid.shape == (2, 2, 2)
    for d in range(2):  # each data index is one process; model pairs are in one process
        assert {x.process_index for x in grid[d].flat} == {d}


def test_logical_rules():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    spec = lambda names, shape, **kw: mesh_lib.logical_to_spec(names, shape, mesh, **kw)
    assert spec(("embed", "mlp"), (768, 3072)) == P("fsdp", "model")
    assert spec(("heads", "embed"), (768, 768)) == P("model", "fsdp")
    assert spec(("vocab", "embed"), (30522, 768)) == P("model", "fsdp")
    assert spec(("patch", "embed"), (256, 768)) == P(None, "fsdp")
    assert spec(("embed", "kv"), (768, 768)) == P("fsdp", None)
    assert spec(("mlp",), (3072,)) == P()  # below the size threshold (a bias): replicated
    assert spec(None, (768, 768)) == P()  # no names: replicated
    assert spec(("embed", "mlp"), (769, 3072)) == P(None, "model")  # 769 % 2: that dim replicated
    assert spec(("embed", "mlp"), (64, 64), min_size=0) == P("fsdp", "model")
    # An axis of size 1 is dropped (same layout, simpler spec).
    mesh1 = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    assert mesh_lib.logical_to_spec(("embed", "mlp"), (768, 3072), mesh1) == P(None, None)
    with pytest.raises(ValueError, match="2 axis names"):
        spec(("embed", "mlp"), (768, 30, 4))


class _Mlp(nnx.Module):
    """A transformer-style block annotated as the ViT engineer does."""

    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(256, 512, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(512, 256, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)
        self.norm = nnx.LayerNorm(256, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(self.norm(x))))


def _split_mlp():
    with nnx.use_eager_sharding(False):
        model = _Mlp(nnx.Rngs(0))
    return nnx.split(model, nnx.Param)


def test_state_sharding_follows_the_annotations_and_the_optimizer_mirrors_them():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    _, params = _split_mlp()
    tx = optax.adamw(1e-3)
    abstract = jax.eval_shape(lambda: {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)})
    shard = mesh_lib.state_sharding(abstract, mesh)
    assert jax.tree.structure(shard) == jax.tree.structure(abstract)
    specs = {jax.tree_util.keystr(k): s.spec for k, s in jax.tree_util.tree_leaves_with_path(shard)}
    up, down = "['up']['kernel']", "['down']['kernel']"
    assert specs[f"['params']{up}.value"] == P("fsdp", "model")
    assert specs[f"['params']{down}.value"] == P("model", "fsdp")
    assert specs["['params']['up']['bias'].value"] == P()
    assert specs["['params']['norm']['scale'].value"] == P()
    adam = [k for k in specs if k.startswith("['opt']") and k.endswith(f"{up}.value")]
    assert len(adam) == 2 and all(specs[k] == P("fsdp", "model") for k in adam)  # mu and nu
    assert specs["['step']"] == P()


def test_fsdp_step_equals_the_replicated_step():
    """One SGD step of the annotated block: FSDP x tensor-parallel layout == everything replicated."""
    graph, params = _split_mlp()
    tx = optax.sgd(0.5, momentum=0.9)  # not Adam: its first step ~ sign(grad) amplifies rounding
    x = jax.random.normal(jax.random.key(1), (16, 256))

    def step(params, opt, x):
        def loss_fn(p):
            return jnp.mean(nnx.merge(graph, p)(x) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    results = {}
    for name, spec in (("replicated", {"data": -1}), ("fsdp", {"data": 2, "fsdp": 2, "model": 2})):
        mesh = mesh_lib.make_mesh(spec)
        abstract = jax.eval_shape(lambda: (params, tx.init(params)))
        shard = mesh_lib.state_sharding(abstract, mesh)
        p, o = jax.jit(lambda: (params, tx.init(params)), out_shardings=shard)()
        xs = jax.device_put(x, NamedSharding(mesh, mesh_lib.batch_spec()))
        f = jax.jit(step, in_shardings=(*shard, xs.sharding), out_shardings=(*shard, NamedSharding(mesh, P())))
        new_p, _, loss = f(p, o, xs)
        if name == "fsdp":
            assert new_p["up"]["kernel"].value.sharding.spec == P("fsdp", "model")
            assert len(new_p["up"]["kernel"].value.addressable_shards[0].data.reshape(-1)) == 256 * 512 // 4
        results[name] = (float(loss), jax.device_get(new_p["up"]["kernel"].value))
    assert abs(results["fsdp"][0] - results["replicated"][0]) < 1e-6
    np.testing.assert_allclose(results["fsdp"][1], results["replicated"][1], rtol=1e-5, atol=1e-6)


def test_moco_state_queue_over_data_params_replicated():
    """The MoCo train state on data=4 x fsdp=2: ResNet replicated, queue split along K over data x fsdp."""
    from cxrjax.train import contrastive as ct

    config = ct.apply_variants(ct.default_config(), "demo")
    config.mesh.update(data=4, fsdp=2)
    config.moco.queue_size = 64
    mesh = ct.make_mesh(config)
    sh = ct.build_training(config, mesh, total_steps=10).state_sharding
    # the queue is split over every batch axis, like the keys that fill it (issue 19: never all-gathered)
    batch = P(("data", "fsdp"))
    assert sh.queue.keys.spec == batch and sh.queue.patient.spec == batch and sh.queue.ptr.spec == P()
    assert all(s.spec == P() for s in jax.tree.leaves(sh.q_params))
    assert all(s.spec == P() for s in jax.tree.leaves(sh.opt_state))
