"""device_augment: bit-identical for the same seeds, layout-independent, the host path's geometry and
intensity for the same parameters, and the configured distributions (flip rate, angle, crop scale)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.data import augment as A
from cxrjax.data import device_augment as D

CFG = A.AugmentConfig(size=48, where="device")
STRONG = A.AugmentConfig(size=48, brightness=0.4, contrast=0.4, jitter_prob=0.8, blur_prob=0.5, where="device")


def _images(n, side=64, seed=0, dtype=np.uint8):
    """Smooth random images (bilinear sampling of noise would hide geometry errors in the noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 3, 3)
        im = 0.5 + 0.25 * np.sin(2 * np.pi * a * x + b) * np.cos(2 * np.pi * c * y) + 0.2 * x
        out.append(np.clip(im, 0, 1))
    top = 255 if dtype == np.uint8 else 65535
    return (np.stack(out) * top).round().astype(dtype)


def _seeds(rows, seed=0, epoch=0, slot=0):
    return np.stack([A.view_seed(seed, epoch, r, slot) for r in rows])


def test_view_seed_is_a_pure_function_of_the_example():
    s = A.view_seed(7, 1, 123, 0)
    assert s.dtype == np.uint32 and s.shape == (2,)
    assert np.array_equal(s, A.view_seed(7, 1, 123, 0))
    others = [A.view_seed(8, 1, 123, 0), A.view_seed(7, 2, 123, 0), A.view_seed(7, 1, 124, 0), A.view_seed(7, 1, 123, 1)]
    assert len({tuple(s)} | {tuple(o) for o in others}) == 5


@pytest.mark.parametrize("cfg", [CFG, STRONG], ids=["medaug", "strong"])
def test_same_seeds_bit_identical_shapes_and_range(cfg):
    imgs = _images(6)
    seeds = _seeds(range(6))
    a = np.asarray(D.augment_batch(imgs[..., None], seeds, cfg))
    b = np.asarray(D.augment_batch(imgs, seeds, cfg))  # (B, H, W) accepted too
    assert a.shape == (6, 48, 48, 1) and a.dtype == np.float32
    assert np.array_equal(a, b)
    lo, hi = A.normalize(np.float32(0)), A.normalize(np.float32(255))
    assert np.isfinite(a).all() and a.min() >= lo - 1e-4 and a.max() <= hi + 1e-4
    c = np.asarray(D.augment_batch(imgs, _seeds(range(6), epoch=1), cfg))
    assert all(not np.array_equal(a[i], c[i]) for i in range(6))  # another epoch, other views


def test_independent_of_batch_layout():
    """An example's view depends on its seed and pixels only: not on batch size or position."""
    imgs, seeds = _images(8), _seeds(range(8))
    full = np.asarray(D.augment_batch(imgs, seeds, STRONG))
    perm = np.array([5, 2, 7, 0])
    part = np.asarray(D.augment_batch(imgs[perm], seeds[perm], STRONG))
    np.testing.assert_allclose(part, full[perm], rtol=0, atol=1e-5)


def test_sharded_over_devices_equals_single_device():
    n = jax.device_count()
    imgs, seeds = _images(n), _seeds(range(n))
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    out = D.augment_batch(jax.device_put(imgs, sharding), jax.device_put(seeds, sharding), CFG)
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
    # the two compilations may round the sample coordinates differently (FMA contraction); next to the
    # zero border a 1e-5 px shift is up to 1e-3 grey levels = 5e-5 normalised units
    np.testing.assert_allclose(np.asarray(out), np.asarray(D.augment_batch(imgs, seeds, CFG)), atol=2e-4)


def _host_params(p: dict, i: int) -> A.Params:
    f = {k: float(np.asarray(v)[i]) for k, v in p.items()}
    return A.Params((f["cx"], f["cy"], f["cw"], f["ch"]), f["angle"], bool(f["flip"]), f["brightness"],
                    f["contrast"], 0.0)


def test_matches_the_host_transform_for_the_same_parameters():
    """Warp + jitter against augment.apply (OpenCV) with the very parameters the device drew."""
    cfg = A.AugmentConfig(size=48, rotation=25.0, crop_scale=(0.5, 1.0), brightness=0.3, contrast=0.3,
                          jitter_prob=1.0, where="device")
    imgs, seeds = _images(8, seed=1), _seeds(range(8), seed=5)
    p = D.batch_params(jnp.asarray(seeds), cfg, 64, 64)
    dev = np.asarray(jax.vmap(lambda im, q: D.apply_params(im, q, cfg, 255.0))(jnp.asarray(imgs), p))
    for i in range(8):
        host = A.apply(imgs[i], _host_params(p, i), 48).astype(np.float32)
        diff = np.abs(dev[i] - host)
        # the host rounds twice (warp, then the jitter table) to uint8, i.e. up to 1 grey level apart,
        # and OpenCV's fixed-point weights (1/32 px) move edges a little: compare away from the border
        assert diff[4:-4, 4:-4].mean() < 1.0 and np.median(diff) <= 1.0, (i, diff.mean(), diff.max())


def test_exact_geometry_identity_flip_and_quarter():
    img = _images(1)[0]
    ident = {"cx": 32.0, "cy": 32.0, "cw": 64.0, "ch": 64.0, "angle": 0.0, "flip": False}
    out = np.asarray(D.warp(jnp.asarray(img), D.affine_coefficients(ident, 64), 64))
    np.testing.assert_allclose(out, img, atol=1e-3)
    flipped = np.asarray(D.warp(jnp.asarray(img), D.affine_coefficients({**ident, "flip": True}, 64), 64))
    np.testing.assert_allclose(flipped, img[:, ::-1], atol=1e-3)
    quarter = {**ident, "cx": 16.0, "cy": 16.0, "cw": 32.0, "ch": 32.0}
    np.testing.assert_allclose(np.asarray(D.warp(jnp.asarray(img), D.affine_coefficients(quarter, 32), 32)),
                               img[:32, :32], atol=1e-3)


def test_parameter_distributions_follow_the_config():
    n = 4000
    seeds = jnp.asarray(_seeds(range(n), seed=11))
    p = {k: np.asarray(v) for k, v in D.batch_params(seeds, STRONG, 256, 200).items()}
    assert abs(p["flip"].mean() - 0.5) < 0.04  # 4000 coins: sd 0.008
    assert np.abs(p["angle"]).max() <= 10.0 and np.abs(p["angle"]).max() > 9.9 and abs(p["angle"].mean()) < 0.4
    area = p["cw"] * p["ch"] / (256 * 200)
    assert area.min() >= 0.95 - 1e-4 and area.max() <= 1.0 + 1e-4
    ratio = p["cw"] / p["ch"]
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert (p["cx"] - p["cw"] / 2 >= -1e-3).all() and (p["cx"] + p["cw"] / 2 <= 200 + 1e-3).all()  # inside
    jittered = (p["brightness"] != 1) | (p["contrast"] != 1)
    assert abs(jittered.mean() - 0.8) < 0.04
    assert p["brightness"].min() >= 0.6 - 1e-6 and p["brightness"].max() <= 1.4 + 1e-6
    blurred = p["blur_sigma"] > 0
    assert abs(blurred.mean() - 0.5) < 0.04
    assert p["blur_sigma"][blurred].min() >= 0.1 - 1e-6 and p["blur_sigma"].max() <= 2.0 + 1e-6
    fixed = {k: np.asarray(v) for k, v in
             D.batch_params(seeds[:200], A.AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), rotation=0,
                                                         hflip_prob=0), 64, 64).items()}
    assert (fixed["angle"] == 0).all() and not fixed["flip"].any() and np.allclose(fixed["cw"], 64)


def test_blur():
    """Per-image sigma in one batch: 0 = identity, weights sum to 1, scipy's Gaussian (mirror) otherwise."""
    x = jnp.asarray(_images(2), jnp.float32)
    out = np.asarray(D.gaussian_blur(x, jnp.array([0.0, 1.5]), 6))
    np.testing.assert_allclose(out[0], x[0], atol=1e-3)
    from scipy import ndimage

    ref = ndimage.gaussian_filter(np.asarray(x[1]), 1.5, mode="mirror", truncate=6 / 1.5)
    np.testing.assert_allclose(out[1], ref, atol=0.05)
    flat = np.asarray(D.gaussian_blur(jnp.full((1, 20, 30), 77.0), jnp.array([2.0]), 6))
    np.testing.assert_allclose(flat, 77.0, rtol=1e-5)


def test_uint16_eval_and_contrastive_views():
    imgs16 = _images(3, dtype=np.uint16)
    out = np.asarray(D.augment_batch(imgs16, _seeds(range(3)), CFG))
    np.testing.assert_allclose(out, np.asarray(D.augment_batch((imgs16 // 257).astype(np.uint8), _seeds(range(3)), CFG)),
                               atol=0.05)  # same picture at 16 bit
    ev = np.asarray(D.eval_batch(_images(2), CFG))
    host = np.stack([A.normalize(A.eval_transform(im, CFG)) for im in _images(2)])
    assert ev.shape == (2, 48, 48, 1) and np.abs(ev[..., 0] - host).mean() < 0.6 / (255 * A.CXR_STD)
    batch = {"query": _images(4)[..., None], "key": _images(4, seed=2)[..., None], "query_seed": _seeds(range(4)),
             "key_seed": _seeds(range(4), slot=1), "hard_negatives": _images(8, seed=3).reshape(4, 2, 64, 64, 1),
             "hard_negative_seeds": np.stack([_seeds(range(4), slot=2), _seeds(range(4), slot=3)], 1)}
    q, k, h = jax.jit(lambda b: D.contrastive_views(b, CFG))(batch)
    assert q.shape == k.shape == (4, 48, 48, 1) and h.shape == (4, 2, 48, 48, 1)
    np.testing.assert_allclose(np.asarray(h[:, 1]), np.asarray(D.augment_batch(batch["hard_negatives"][:, 1],
                                                                               batch["hard_negative_seeds"][:, 1], CFG)),
                               atol=1e-5)
    host_batch = {"query": batch["query"][:, :48, :48], "key": batch["key"][:, :48, :48]}  # host-augmented: only normalised
    q2, _, none = D.contrastive_views(host_batch, CFG)
    assert none is None and np.allclose(np.asarray(q2), A.normalize(host_batch["query"]))


def test_shorter_side_crop_distributions_match_the_host():
    """MedAug's geometry draws the same distribution of crops on both paths (portrait 256 x 200)."""
    cfg = A.AugmentConfig(size=64, geometry="shorter_side_crop", rotation=10.0, hflip_prob=0.5)
    n = 3000
    dev = {k: np.asarray(v) for k, v in D.batch_params(jnp.asarray(_seeds(range(n), seed=3)), cfg, 256, 200).items()}
    host = [A.sample_params(cfg, A.example_rng(3, 0, i, 0), 256, 200) for i in range(n)]
    np.testing.assert_allclose(dev["cw"], 200.0, rtol=1e-6)  # shorter side -> size: the crop is 200 px square
    for name, h in (("cx", [p.crop[0] for p in host]), ("cy", [p.crop[1] for p in host]),
                    ("angle", [p.angle for p in host])):
        h = np.asarray(h)
        # same mean and spread (3000 draws: the standard errors are ~2 % of the spread)
        assert abs(dev[name].mean() - h.mean()) < 0.08 * h.std() + 1e-6, name
        assert abs(dev[name].std() - h.std()) < 0.08 * h.std() + 1e-6, name
    # the window slides over the 56 px of slack along the longer (vertical) side
    unrotated = np.abs(dev["angle"]) < 0.5
    assert dev["cy"][unrotated].min() < 100 + 4 and dev["cy"][unrotated].max() > 156 - 4
