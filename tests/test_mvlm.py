"""The masked vision-language model and its losses: modality isolation, masked pixels that reach no
output (both stems), masked-only losses, float32 MLM logits under bf16, attention against a numpy
reference, rematerialisation, which parameters decay, where the paired rows of a global batch are,
sharding annotations, and the same loss on 1 and 8 (simulated) devices."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cxrjax.data import augment
from cxrjax.models import mvlm, vit
from cxrjax.train import mvlm as train_mvlm

S, PATCH, L, VOCAB = 32, 8, 16, 64
N = (S // PATCH) ** 2


def fast_model(proj_dim=16, seed=0, **vit_options):
    """A tiny model filled from numpy (eager NNX init compiles a kernel per shape: slow on 2 cores)."""
    cfg = mvlm.MVLMConfig(vit.ViTConfig(size="micro", image_size=S, patch=PATCH, **vit_options), vocab_size=VOCAB,
                          max_len=L, proj_dim=proj_dim)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: mvlm.MVLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        val = np.ones(var.shape) if path[-1] == "scale" else rng.normal(size=var.shape) * 0.05
        var.set_value(jnp.asarray(val, var.dtype))
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def model():
    return fast_model()


def random_batch(seed=0, b=4):
    r = np.random.default_rng(seed)
    return dict(
        image=r.integers(0, 256, (b, S, S, 1)).astype(np.uint8),
        image_present=np.array([True, True, False, True][:b]),
        patch_mask=r.random((b, N)) < 0.5,
        text_ids=r.integers(5, VOCAB, (b, L)).astype(np.int32),
        text_valid=np.array([[True] * 10 + [False] * 6, [False] * L, [True] * L, [True] * 4 + [False] * 12][:b]),
    )


def forward(model, b):
    return model(jnp.asarray(b["image"]), jnp.asarray(b["image_present"]), jnp.asarray(b["patch_mask"]),
                 jnp.asarray(b["text_ids"]), jnp.asarray(b["text_valid"]))


def test_unpaired_examples_never_see_the_other_modality(model):
    b = random_batch()
    img, txt = forward(model, b)
    other = dict(b)
    r = np.random.default_rng(1)
    other["text_ids"] = r.integers(5, VOCAB, (4, L)).astype(np.int32)  # row 1 is image-only: no valid text
    other["image"] = r.integers(0, 256, (4, S, S, 1)).astype(np.uint8)
    other["image"][[0, 1, 3]] = b["image"][[0, 1, 3]]  # row 2 is text-only: its image slot changes
    other["text_ids"][[0, 2, 3]] = b["text_ids"][[0, 2, 3]]
    img2, txt2 = forward(model, other)
    np.testing.assert_array_equal(np.asarray(img[1]), np.asarray(img2[1]))  # image-only: text content irrelevant
    np.testing.assert_array_equal(np.asarray(txt[2]), np.asarray(txt2[2]))  # text-only: image content irrelevant
    # and a paired example does attend across modalities
    other["text_ids"][0] = r.integers(5, VOCAB, L)
    img3, _ = forward(model, other)
    assert np.abs(np.asarray(img3[0]) - np.asarray(img[0])).max() > 1e-4


def test_single_modality_passes_equal_joint_passes_with_the_other_modality_absent(model):
    """The train step runs image-only and text-only rows through passes that hold no tokens of the other
    modality: the states must be those of a joint pass in which that modality is absent."""
    b = random_batch()
    n = len(b["image"])
    img_joint, _ = model(jnp.asarray(b["image"]), jnp.ones(n, bool), jnp.asarray(b["patch_mask"]),
                         jnp.asarray(b["text_ids"]), jnp.zeros((n, L), bool))
    img_only, none = model(jnp.asarray(b["image"]), jnp.ones(n, bool), jnp.asarray(b["patch_mask"]), None, None)
    assert none is None and img_only.shape == (n, N, 32)
    np.testing.assert_allclose(np.asarray(img_only), np.asarray(img_joint), atol=2e-5)
    valid = jnp.asarray(b["text_valid"])
    _, txt_joint = model(jnp.asarray(b["image"]), jnp.zeros(n, bool), jnp.asarray(b["patch_mask"]),
                         jnp.asarray(b["text_ids"]), valid)
    none, txt_only = model(None, None, None, jnp.asarray(b["text_ids"]), valid)
    assert none is None
    rows = b["text_valid"].any(1)  # rows with some text (a row without any attends to CLS alone either way)
    np.testing.assert_allclose(np.asarray(txt_only)[rows], np.asarray(txt_joint)[rows], atol=2e-5)


def test_image_layer_states_are_the_patch_states_at_every_depth(model):
    img = jnp.asarray(random_batch(3)["image"])
    states = model.image_layer_states(img)
    d = model.cfg.vit.hidden
    assert len(states) == len(model.encoder.blocks) + 2 and all(h.shape == (4, N, d) for h in states)
    # depth 0: the patch embedding + 2-D sin-cos positions + the image type embedding, built here by hand
    x = (np.asarray(img, np.float64) / 255 - augment.CXR_MEAN) / augment.CXR_STD
    patches = x.reshape(4, S // PATCH, PATCH, S // PATCH, PATCH).transpose(0, 1, 3, 2, 4).reshape(4, N, -1)
    k = np.asarray(model.patch_embed.proj.kernel[...], np.float64).reshape(-1, d)
    want = (patches @ k + np.asarray(model.patch_embed.proj.bias[...]) + vit.sincos_2d(S // PATCH, d)
            + np.asarray(model.type_embed[...])[mvlm.TYPE_IMAGE])
    np.testing.assert_allclose(np.asarray(states[0]), want, rtol=1e-4, atol=1e-4)
    # the last: the final states, whose mean is the probe feature
    np.testing.assert_allclose(np.asarray(states[-1].mean(1)), np.asarray(model.embed_image(img)), rtol=1e-6, atol=1e-6)
    # each block changes the states, and the final LayerNorm normalises the last block's output
    assert all(float(jnp.abs(a - b).max()) > 1e-3 for a, b in zip(states[:-1], states[1:]))
    last = np.asarray(states[-2], np.float64)
    normed = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-6)
    scale, bias = np.asarray(model.encoder.norm.scale[...]), np.asarray(model.encoder.norm.bias[...])
    np.testing.assert_allclose(np.asarray(states[-1]), normed * scale + bias, rtol=1e-4, atol=1e-4)


def test_padding_is_ignored(model):
    b = random_batch()
    img, txt = forward(model, b)
    other = dict(b, text_ids=np.where(b["text_valid"], b["text_ids"], 7).astype(np.int32))
    img2, txt2 = forward(model, other)
    np.testing.assert_allclose(np.asarray(img[0]), np.asarray(img2[0]), atol=1e-6)
    v = b["text_valid"][0]
    np.testing.assert_allclose(np.asarray(txt[0][v]), np.asarray(txt2[0][v]), atol=1e-6)


def test_mvm_loss_only_counts_masked_patches_of_present_images():
    r = np.random.default_rng(0)
    pred, target = r.normal(size=(3, N, 64)), r.normal(size=(3, N, 64))
    mask = r.random((3, N)) < 0.5
    present = np.array([True, True, False])
    scale = np.array([0, 2, 1], np.int32)
    loss, m = mvlm.mvm_loss(pred, target, mask, present, scale, 3)
    err = ((pred - target) ** 2).mean(-1)
    w = mask & present[:, None]
    np.testing.assert_allclose(float(loss), err[w].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["mvm_loss_scale0"]), err[0][mask[0]].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["mvm_loss_scale2"]), err[1][mask[1]].mean(), rtol=1e-5)
    assert float(m["mvm_loss_scale1"]) == 0.0  # the only scale-1 row has no image
    t2 = target.copy()
    t2[~w] += 100.0  # unmasked patches and the absent image
    assert float(mvlm.mvm_loss(pred, t2, mask, present, scale, 3)[0]) == pytest.approx(float(loss), rel=1e-6)
    t2 = target.copy()
    t2[0, np.flatnonzero(mask[0])[0]] += 1.0
    assert float(mvlm.mvm_loss(pred, t2, mask, present, scale, 3)[0]) != pytest.approx(float(loss), rel=1e-6)


def test_mlm_loss_only_counts_targets():
    r = np.random.default_rng(0)
    logits = r.normal(size=(2, L, VOCAB)).astype(np.float32)
    labels = np.full((2, L), -1, np.int32)
    labels[0, 3], labels[1, 5], labels[1, 6] = 10, 20, 30
    loss, m = mvlm.mlm_loss(logits, labels)
    lp = jax.nn.log_softmax(logits)
    expect = -(lp[0, 3, 10] + lp[1, 5, 20] + lp[1, 6, 30]) / 3
    np.testing.assert_allclose(float(loss), float(expect), rtol=1e-5)
    logits2 = logits.copy()
    logits2[labels < 0] = r.normal(size=(int((labels < 0).sum()), VOCAB))
    assert float(mvlm.mlm_loss(logits2, labels)[0]) == pytest.approx(float(loss), rel=1e-6)
    # accuracy: argmax == label over the 3 targets only; make exactly targets 0 and 2 right
    logits2[0, 3, 10] = logits2[0, 3].max() + 1
    logits2[1, 5, 20] = logits2[1, 5].min() - 1
    logits2[1, 6, 30] = logits2[1, 6].max() + 1
    logits2[labels < 0, 0] = 1e3  # non-targets: a wrong argmax that must not count
    assert float(mvlm.mlm_loss(logits2, labels)[1]["mlm_acc"]) == pytest.approx(2 / 3)


def test_patch_targets_are_normalised_per_patch():
    img = np.random.default_rng(0).integers(0, 256, (2, S, S, 1)).astype(np.uint8)
    t = np.asarray(mvlm.patch_targets(jnp.asarray(img), PATCH))
    assert t.shape == (2, N, PATCH * PATCH)
    np.testing.assert_allclose(t.mean(-1), 0, atol=1e-4)
    np.testing.assert_allclose(t.std(-1), 1, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(vit.unpatchify(vit.patchify(jnp.asarray(img), PATCH), PATCH)), img)


def test_large_parameters_carry_logical_axis_names(model):
    params = nnx.state(model, nnx.Param)
    named = {"/".join(map(str, p)): v.get_metadata().get("out_sharding") for p, v in nnx.to_flat_state(params)}
    assert named["encoder/blocks/0/attn/q"] == ("embed", "heads", "kv")
    assert named["encoder/blocks/0/attn/out"] == ("heads", "kv", "embed")
    assert named["encoder/blocks/0/mlp/fc1/kernel"] == ("embed", "mlp")
    assert named["token_embed/embedding"] == ("vocab", "embed")
    assert named["patch_embed/proj/kernel"] == ("patch", "embed")
    assert named["mvm_head/kernel"] == ("embed", "patch")
    assert all(v for k, v in named.items() if k.endswith("kernel"))  # every dense kernel is annotated
    assert named["encoder/blocks/0/norm1/scale"] is None  # small parameters stay replicated


def test_logical_names_map_to_the_mesh_contract():
    from cxrjax.train import mesh as mesh_lib

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    spec = functools.partial(mesh_lib.logical_to_spec, mesh=mesh, min_size=0)
    assert spec(("embed", "heads", "kv"), (32, 2, 16)) == P("fsdp", "model", None)
    assert spec(("embed", "mlp"), (128, 512)) == P("fsdp", "model")
    assert spec(("vocab", "embed"), (63, 128)) == P(None, "fsdp")  # 63 % 2: replicated
    assert spec(None, (128,)) == P()


def tiny_config():
    c = train_mvlm.default_config()
    c.batch_size = 8
    c.augment.size = S
    c.model.update(size="micro", patch=PATCH, proj_dim=16)
    c.text.max_len = L
    c.optim.warmup_steps = 1
    return c


COUNTS = {"paired": 4, "image": 2, "text": 2}


def train_batch(seed=0, counts=COUNTS):
    """Kind-ordered rows: counts["paired"] paired, then image-only, then text-only (8 by default)."""
    r = np.random.default_rng(seed)
    n_p, n_i, n_t = counts["paired"], counts["image"], counts["text"]
    n = n_p + n_i + n_t
    present_img = np.repeat([True, True, False], [n_p, n_i, n_t])
    present_txt = np.repeat([True, False, True], [n_p, n_i, n_t])
    labels = np.where(r.random((n, L)) < 0.3, r.integers(5, VOCAB, (n, L)), -1).astype(np.int32)
    return dict(
        image=(r.integers(0, 256, (n, S, S, 1)) * present_img[:, None, None, None]).astype(np.uint8),
        image_present=present_img, patch_mask=(r.random((n, N)) < 0.5) & present_img[:, None],
        mask_scale=np.where(present_img, r.integers(0, 3, n), -1).astype(np.int32),
        text_ids=r.integers(5, VOCAB, (n, L)).astype(np.int32) * present_txt[:, None],
        text_labels=np.where(present_txt[:, None], labels, -1).astype(np.int32),
        text_valid=np.broadcast_to(present_txt[:, None], (n, L)).copy(), text_present=present_txt,
        source=np.repeat(np.arange(3, dtype=np.int32), [n_p, n_i, n_t]), row=np.arange(n, dtype=np.int64),
    )


def layout(x, counts, shards):
    """Kind-ordered rows -> the global batch of a mesh with `shards` batch shards (the pipeline's layout:
    one [paired, image, text] block per shard), by the library's `interleave` checked against hand-made
    orders in test_the_global_batch_is_one_kind_ordered_block_per_batch_shard."""
    from cxrjax.data import vl_pipeline as V

    edges = np.cumsum([0] + [counts[k] for k in V.KINDS])
    return V.interleave({k: {"x": x[edges[i] : edges[i + 1]]} for i, k in enumerate(V.KINDS)}, shards)["x"]


def step_on(mesh, config, batch, steps=3, counts=COUNTS):
    setup = train_mvlm.build_training(config, mesh, VOCAB, total_steps=10, counts=counts)
    shards = train_mvlm.mesh_lib.batch_shards(mesh)
    state, losses = setup.state, []
    for _ in range(steps):
        b = {k: jax.device_put(layout(v, counts, shards), setup.batch_sharding) for k, v in batch.items()}
        state, m = setup.train_step(state, b)
        losses.append({k: float(v) for k, v in m.items()})
    return losses, jax.device_get(state.params)


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_loss():
    """The same global batch (8 paired, 8 image-only, 8 text-only) on 1 device, 8 devices and a
    2 x 2 x 2 data/fsdp/model mesh: same losses, gradient norms and parameters after 3 steps."""
    config = tiny_config()
    config.batch_size = 24
    counts = {"paired": 8, "image": 8, "text": 8}
    batch = train_batch(counts=counts)
    one = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    eight = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    fsdp = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    l1, p1 = step_on(one, config, batch, counts=counts)
    l8, p8 = step_on(eight, config, batch, counts=counts)
    lf, pf = step_on(fsdp, config, batch, counts=counts)  # the annotations actually shard parameters over fsdp/model
    for other in (l8, lf):
        for a, b in zip(l1, other):
            for k in ("loss", "mlm_loss", "mvm_loss", "itc_loss", "mvm_loss_scale0", "mvm_loss_scale2", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=2e-5, abs=1e-6), k
    assert l1[2]["loss"] != l1[1]["loss"]  # real updates happened (the warmup's first lr is 0)
    for x, y, z in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), jax.tree.leaves(pf)):
        np.testing.assert_allclose(x, y, atol=2e-5)
        np.testing.assert_allclose(x, z, atol=2e-5)


def test_conv_stem_and_bfloat16_compute_run():
    model = fast_model(proj_dim=0, stem="conv", dtype="bfloat16")
    b = random_batch()
    img, txt = forward(model, b)
    assert img.shape == (4, N, 32) and txt.shape == (4, L, 32) and img.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(img, np.float32)).all()
    assert model.regenerate(img).shape == (4, N, PATCH * PATCH) and model.mlm_logits(txt).dtype == jnp.float32
    params = nnx.state(model, nnx.Param)
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(params))  # params stay float32


# ----------------------------------------------------------------------------------------------
# Masked pixels, precision, attention, remat, weight decay, paired rows


def all_outputs(model, b):
    img, txt = forward(model, b)
    return {"image_states": img, "text_states": txt, "regenerated": model.regenerate(img),
            "mlm_logits": model.mlm_logits(txt)}


@pytest.mark.parametrize("stem", ["none", "conv"])
def test_pixels_under_the_mask_reach_no_output(stem):
    """Masked vision modelling must not see its targets: new pixels inside masked patches change no
    output bit; the same change inside a visible patch does change the outputs."""
    model = fast_model(stem=stem)
    b = random_batch()
    before = all_outputs(model, b)
    r = np.random.default_rng(5)
    pix_mask = b["patch_mask"].reshape(4, S // PATCH, S // PATCH).repeat(PATCH, 1).repeat(PATCH, 2)[..., None]
    hidden = dict(b, image=np.where(pix_mask, r.integers(0, 256, b["image"].shape), b["image"]).astype(np.uint8))
    assert (hidden["image"] != b["image"]).any()
    after = all_outputs(model, hidden)
    for k in before:
        np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(before[k]), err_msg=k)
    # control: the same perturbation of the visible patches of row 0 moves its outputs
    visible = dict(b, image=np.where(~pix_mask, r.integers(0, 256, b["image"].shape), b["image"]).astype(np.uint8))
    moved = all_outputs(model, visible)
    assert np.abs(np.asarray(moved["image_states"][0]) - np.asarray(before["image_states"][0])).max() > 1e-3


def test_mlm_logits_are_float32_under_bfloat16():
    """bf16 compute, float32 logits: the decoder matmul must not round its result to bf16 (a bf16
    result cast to float32 is exactly representable in bf16; an f32-accumulated one almost never)."""
    m16, m32 = fast_model(dtype="bfloat16"), fast_model()
    states = jnp.asarray(np.random.default_rng(0).normal(size=(2, L, 32)), jnp.float32)
    logits = np.asarray(m16.mlm_logits(states.astype(jnp.bfloat16)))
    assert logits.dtype == np.float32
    as_bf16 = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
    assert (as_bf16 == logits).mean() < 0.05
    np.testing.assert_allclose(logits, np.asarray(m32.mlm_logits(states)), atol=0.1)  # same model, bf16 inputs
    assert m16.regenerate(states.astype(jnp.bfloat16)).dtype == jnp.float32


def reference_attention(x, q, k, v, qkv_bias, out, out_bias, key_valid):
    """Masked softmax attention written out in numpy float64."""
    x = np.asarray(x, np.float64)
    qh = np.einsum("btd,dhk->bthk", x, q) + qkv_bias[0]
    kh = np.einsum("btd,dhk->bthk", x, k) + qkv_bias[1]
    vh = np.einsum("btd,dhk->bthk", x, v) + qkv_bias[2]
    logits = np.einsum("bqhk,bthk->bhqt", qh, kh) / np.sqrt(q.shape[-1])
    logits = np.where(key_valid[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bqhk,hkd->bqd", np.einsum("bhqt,bthk->bqhk", w, vh), out) + out_bias


def test_attention_matches_a_numpy_reference_with_the_key_mask():
    model = fast_model()
    attn = model.encoder.blocks[0].attn
    r = np.random.default_rng(0)
    with nnx.use_eager_sharding(False):
        attn.qkv_bias[...] = jnp.asarray(r.normal(size=attn.qkv_bias.shape) * 0.1, jnp.float32)
        attn.out_bias[...] = jnp.asarray(r.normal(size=attn.out_bias.shape) * 0.1, jnp.float32)
    x = r.normal(size=(3, 7, 32)).astype(np.float32)
    key_valid = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0, 0]], bool)
    got = np.asarray(attn(jnp.asarray(x), jnp.asarray(key_valid)))
    p = {n: np.asarray(getattr(attn, n)[...], np.float64) for n in ("q", "k", "v", "qkv_bias", "out", "out_bias")}
    np.testing.assert_allclose(got, reference_attention(x, **p, key_valid=key_valid), atol=2e-5)
    x2 = x.copy()
    x2[1, [1, 2, 5]] += 10.0  # masked keys/values: the other queries' outputs do not move
    got2 = np.asarray(attn(jnp.asarray(x2), jnp.asarray(key_valid)))
    np.testing.assert_allclose(got2[1, [0, 3, 4, 6]], got[1, [0, 3, 4, 6]], atol=1e-5)


def test_attention_kernel_choice(monkeypatch):
    assert vit.attention_implementation("auto", jnp.float32) == "xla"
    assert vit.attention_implementation("auto", jnp.bfloat16) == "xla"  # this is a CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert vit.attention_implementation("auto", jnp.bfloat16) == "cudnn"  # fused flash kernel on GPU
    assert vit.attention_implementation("auto", jnp.float32) == "xla"  # cuDNN's kernel takes 16-bit inputs only
    assert vit.attention_implementation("xla", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="attention"):
        vit.ViTConfig(attention="flash")


def test_remat_recomputes_blocks_and_gives_the_same_gradients():
    b = random_batch()

    def grads_and_flops(remat):
        model = fast_model(remat=remat)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            img, txt = nnx.merge(graphdef, p)(jnp.asarray(b["image"]), jnp.asarray(b["image_present"]),
                                              jnp.asarray(b["patch_mask"]), jnp.asarray(b["text_ids"]),
                                              jnp.asarray(b["text_valid"]))
            return (img**2).mean() + (txt**2).mean()

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return jax.tree.leaves(compiled(params)), compiled.cost_analysis()["flops"]

    g0, f0 = grads_and_flops("none")
    g1, f1 = grads_and_flops("full")
    for a, c in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)
    assert f1 > 1.15 * f0  # the forward pass of every block runs again in the backward pass
    with pytest.raises(ValueError, match="remat"):
        vit.ViTConfig(remat="yes")


def test_weight_decay_applies_to_matrices_only():
    model = fast_model()
    params = nnx.state(model, nnx.Param)
    mask = train_mvlm.decay_mask(params)
    flat = {"/".join(map(str, p)): bool(v.get_value()) for p, v in nnx.to_flat_state(mask)}
    decayed = {k for k, v in flat.items() if v}
    per_block = {"attn/q", "attn/k", "attn/v", "attn/out", "mlp/fc1/kernel", "mlp/fc2/kernel"}
    assert decayed == ({f"encoder/blocks/{i}/{n}" for i in range(2) for n in per_block}
                       | {"patch_embed/proj/kernel", "token_embed/embedding", "mlm_dense/kernel", "mvm_head/kernel",
                          "image_proj/kernel", "text_proj/kernel"})
    for k in ("encoder/blocks/0/attn/qkv_bias", "type_embed", "text_pos", "cls", "mask_patch", "logit_scale",
              "mlm_bias", "encoder/norm/scale", "mvm_head/bias"):
        assert flat[k] is False, k
    # and the optimizer acts on it: zero gradients -> only the decayed leaves shrink, by (1 - lr * wd)
    config = tiny_config()
    config.optim.update(warmup_steps=0, lr=0.1, weight_decay=0.5, clip_norm=0.0)
    tx, _ = train_mvlm.optimizer(config, total_steps=10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax_apply(params, updates)
    for path, v in nnx.to_flat_state(params):
        name = "/".join(map(str, path))
        after = np.asarray(dict(nnx.to_flat_state(new))[path].get_value())
        expect = np.asarray(v.get_value()) * (1 - 0.1 * 0.5 if name in decayed else 1.0)
        np.testing.assert_allclose(after, expect, rtol=1e-6, err_msg=name)


def optax_apply(params, updates):
    import optax

    return optax.apply_updates(params, updates)


def test_the_global_batch_is_one_kind_ordered_block_per_batch_shard():
    from cxrjax.data import vl_pipeline as V

    counts = {"paired": 4, "image": 2, "text": 2}
    assert V.shard_slices(counts, 1) == {"paired": (0, 4), "image": (4, 6), "text": (6, 8)}
    assert V.shard_slices(counts, 2) == {"paired": (0, 2), "image": (2, 3), "text": (3, 4)}
    two = V.kind_rows(counts, 2)
    assert two["paired"].tolist() == [0, 1, 4, 5] and two["image"].tolist() == [2, 6] and two["text"].tolist() == [3, 7]
    assert layout(np.arange(8), counts, 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]  # kind-ordered rows, regrouped
    with pytest.raises(ValueError, match="2 image examples per batch do not split over the 4 batch shards"):
        V.shard_slices(counts, 4)
