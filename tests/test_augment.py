"""augment: one affine warp + intensity jitter + blur; exact geometry, ranges, determinism."""

import numpy as np
import pytest

from cxrjax.data import augment as A


def _image(h=64, w=64, seed=0, dtype=np.uint8):
    top = 255 if dtype == np.uint8 else 65535
    return (np.random.default_rng(seed).random((h, w)) * top).astype(dtype)


def _params(crop, angle=0.0, flip=False, brightness=1.0, contrast=1.0, sigma=0.0):
    return A.Params(crop, angle, flip, brightness, contrast, sigma)


def test_geometry_is_exact():
    """Identity, flip, 90-degree rotation, crop and 2x downscale through the one affine map."""
    a = _image()
    assert np.array_equal(A.apply(a, _params((32, 32, 64, 64)), 64), a)
    assert np.array_equal(A.apply(a, _params((32, 32, 64, 64), flip=True), 64), a[:, ::-1])
    rot = A.apply(a, _params((32, 32, 64, 64), angle=90.0), 64).astype(int)
    assert np.abs(rot - np.rot90(a, 1))[1:-1, 1:-1].max() <= 1  # float rounding of cos(90deg)
    assert np.array_equal(A.apply(a, _params((16, 16, 32, 32)), 32), a[:32, :32])  # top-left quarter
    down = A.apply(a, _params((32, 32, 64, 64)), 32).astype(float)
    assert np.abs(down - a.reshape(32, 2, 32, 2).mean((1, 3))).max() <= 1.0  # bilinear at 2x2 centres


@pytest.mark.parametrize("shape", [(80, 64), (64, 80, 1)])
def test_augment_shapes_ranges_dtype(shape):
    cfg = A.AugmentConfig(size=48, brightness=0.4, contrast=0.4, blur_prob=0.5, jitter_prob=1.0)
    img = _image(*shape[:2]).reshape(shape)
    for row in range(20):
        out = A.augment(img, cfg, A.example_rng(0, 0, row, 0))
        assert out.shape == (48, 48) and out.dtype == np.uint8
    img16 = _image(70, 60, dtype=np.uint16)
    out16 = A.augment(img16, cfg, A.example_rng(0, 0, 1, 0))
    assert out16.shape == (48, 48) and out16.dtype == np.uint16 and out16.max() > 255
    with pytest.raises(ValueError, match="uint8 or uint16"):
        A.augment(img.astype(np.float32), cfg, A.example_rng(0, 0, 0, 0))
    with pytest.raises(ValueError, match="2-D"):
        A.augment(np.zeros((8, 8, 3), np.uint8), cfg, A.example_rng(0, 0, 0, 0))


def test_deterministic_per_stream():
    cfg = A.AugmentConfig(size=32, brightness=0.4, contrast=0.4, blur_prob=0.5)
    img = _image()
    a = A.augment(img, cfg, A.example_rng(7, 3, 11, 0))
    assert np.array_equal(a, A.augment(img, cfg, A.example_rng(7, 3, 11, 0)))
    for other in [(7, 3, 11, 1), (7, 4, 11, 0), (7, 3, 12, 0), (8, 3, 11, 0)]:  # slot, epoch, row, seed
        assert not np.array_equal(a, A.augment(img, cfg, A.example_rng(*other)))


def test_sampled_params_respect_config():
    cfg = A.AugmentConfig(size=32, crop_scale=(0.5, 0.9), rotation=7.0, hflip_prob=0.3)
    h, w = 100, 80
    ps = [A.sample_params(cfg, A.example_rng(0, 0, i, 0), h, w) for i in range(400)]
    for p in ps:
        cx, cy, cw, ch = p.crop
        assert 0.5 * h * w * 0.999 <= cw * ch <= 0.9 * h * w * 1.001
        assert cw / 2 <= cx + 1e-9 and cx + cw / 2 <= w + 1e-9 and ch / 2 <= cy + 1e-9 and cy + ch / 2 <= h + 1e-9
        assert abs(p.angle) <= 7.0
        assert p.brightness == p.contrast == 1.0 and p.blur_sigma == 0.0  # off by default
    flips = np.mean([p.flip for p in ps])
    assert 0.22 < flips < 0.38
    never = A.AugmentConfig(hflip_prob=0.0)
    assert not any(A.sample_params(never, A.example_rng(0, 0, i, 0), h, w).flip for i in range(100))


def test_intensity_jitter_and_blur():
    img = np.full((32, 32), 100, np.uint8)
    img[:, 16:] = 200
    crop = (16, 16, 32, 32)
    bright = A.apply(img, _params(crop, brightness=1.2), 32).astype(int)
    assert np.abs(bright - np.clip(np.rint(img * 1.2), 0, 255)).max() <= 1
    contrast = A.apply(img, _params(crop, contrast=0.5), 32).astype(float)
    assert abs(contrast.mean() - img.mean()) < 1.0 and contrast.std() == pytest.approx(0.5 * img.std(), rel=0.02)
    sat = A.apply(img, _params(crop, brightness=1.9, contrast=1.9), 32)
    assert sat.min() >= 0 and sat.max() == 255
    blurred = A.apply(img, _params(crop, sigma=2.0), 32).astype(float)
    assert blurred[:, 14:18].std() > 0 and np.abs(np.diff(blurred, axis=1)).max() < 100  # the edge is softened
    assert blurred.mean() == pytest.approx(img.mean(), abs=2)


def test_eval_transform_is_resize_and_centre_crop():
    a = _image(64, 64)
    assert np.array_equal(A.eval_transform(a, A.AugmentConfig(size=64)), a)
    assert np.array_equal(A.eval_transform(a, A.AugmentConfig(size=32, eval_crop=0.5)), a[16:48, 16:48])
    tall = _image(80, 64)
    out = A.eval_transform(tall, A.AugmentConfig(size=64))  # centre square of the shorter side
    assert np.array_equal(out, tall[8:72])


def test_normalize_numpy_and_jax():
    import jax.numpy as jnp

    x = np.array([0, 128, 255], np.uint8)
    want = (x / 255.0 - A.CXR_MEAN) / A.CXR_STD
    np.testing.assert_allclose(A.normalize(x), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(A.normalize(jnp.asarray(x))), want, atol=1e-5)
    assert A.normalize(jnp.asarray(x)).dtype == jnp.float32


def test_config_validation():
    with pytest.raises(ValueError, match="crop_scale"):
        A.AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="hflip_prob"):
        A.AugmentConfig(hflip_prob=1.5)
    with pytest.raises(ValueError, match="unknown"):
        A.AugmentConfig.from_dict({"size": 64, "colour": 1})
    assert A.AugmentConfig.from_dict({"size": 64, "crop_scale": [0.5, 1.0]}).crop_scale == (0.5, 1.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_host_blur_is_the_truncated_gaussian_of_the_device_path(dtype):
    """OpenCV's blur = scipy's Gaussian truncated at 3 sigma with mirrored borders (jnp "reflect", the
    device path's padding), up to OpenCV's fixed-point kernel and the rounding to integers (measured
    max 1.44 grey levels for uint8, 1.82 of 65535 for uint16)."""
    from scipy import ndimage

    img = _image(48, 48, seed=3, dtype=dtype)
    for sigma in (0.4, 1.3, 2.0):
        out = A.apply(img, _params((24, 24, 48, 48), sigma=sigma), 48).astype(np.float64)
        ref = ndimage.gaussian_filter(img.astype(np.float64), sigma, mode="mirror", truncate=3.0)
        diff = np.abs(out - ref)
        assert diff.max() <= 2.0 and diff.mean() < 0.5, (sigma, diff.max(), diff.mean())


def test_auto_placement_is_the_host_on_cpu():
    assert A.resolve_where("auto") == "host"  # the tests run JAX on the CPU
    assert A.resolve_where("device") == "device" and A.resolve_where("host") == "host"
    with pytest.raises(ValueError, match="where must be one of"):
        A.AugmentConfig(where="gpu")


# ------------------------------------------------------------------ MedAug's geometry
def _smooth(h, w):
    """A smooth test radiograph (low frequencies only: resampling differences stay small)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = 120 + 60 * np.sin(5 * x + 2 * y) + 50 * np.cos(7 * y) * x + 40 * (x > 0.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def _torchvision_chain(img, size, flip, angle, ux, uy):
    """torchvision's MedAug transform on a PIL image, step by step (what its functional ops do on PIL):
    Resize(size) of the shorter side -> hflip -> rotate(angle) about the centre -> crop at the offset.
    Bilinear everywhere (torchvision's RandomRotation defaults to nearest; the distribution is the same)."""
    from PIL import Image

    h, w = img.shape
    scale = size / min(h, w)
    nw, nh = round(w * scale), round(h * scale)
    im = Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = im.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    ox, oy = ux * (nw - size), uy * (nh - size)
    return np.asarray(im.transform((size, size), Image.Transform.AFFINE, (1, 0, ox, 0, 1, oy),
                                   resample=Image.Resampling.BILINEAR)).astype(float)


@pytest.mark.parametrize("shape", [(150, 120), (120, 160)])
@pytest.mark.parametrize("flip, angle, ux, uy", [(False, 0.0, 0.0, 0.0), (True, 0.0, 1.0, 1.0),
                                                   (False, 8.0, 0.3, 0.9), (True, -10.0, 0.7, 0.2)])
def test_shorter_side_crop_is_medaugs_torchvision_chain(shape, flip, angle, ux, uy):
    img = _smooth(*shape)
    size = 60
    cx, cy, side = A.shorter_side_crop(size, 0.0, 0.0, float(shape[0]), float(shape[1]), ux, uy, angle, flip)
    ours = A.apply(img, _params((cx, cy, side, side), angle=angle, flip=flip), size).astype(float)
    # cxrjax's parameters read "rotate by angle, then flip"; torchvision's chain flips, then rotates: the
    # same view with the angle's sign turned when flipped (one-to-one, and +-angle are equally likely)
    ref = _torchvision_chain(img, size, flip, -angle if flip else angle, ux, uy)
    inner = (slice(4, -4), slice(4, -4))  # the rotation's black corners are resampled differently at their edge
    assert np.abs(ours - ref)[inner].mean() < 2.0, np.abs(ours - ref)[inner].mean()


def test_shorter_side_crop_uses_the_content_box_and_eval_centre_crop():
    """A padded record (content box inside bars) gives the views of the unpadded image."""
    img = _smooth(150, 120)
    padded = np.zeros((160, 160), np.uint8)
    padded[5:155, 20:140] = img
    cfg = A.AugmentConfig(size=60, geometry="shorter_side_crop", rotation=10.0, hflip_prob=0.5)
    for row in range(5):
        a = A.augment(img, cfg, A.example_rng(0, 0, row, 0))
        b = A.augment(padded, cfg, A.example_rng(0, 0, row, 0), box=(5, 20, 150, 120))
        assert np.array_equal(a, b)
    # eval: Resize(60) of the shorter side -> CenterCrop(60): rows 15..135 of the 150 x 120 image
    ev = A.eval_transform(padded, cfg, box=(5, 20, 150, 120)).astype(float)
    ref = _torchvision_chain(img, 60, False, 0.0, 0.5, 0.5)
    assert np.abs(ev - ref).mean() < 1.5
