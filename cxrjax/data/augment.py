"""Chest X-ray augmentations: one affine warp + intensity jitter + Gaussian blur, per example.

What the CXR contrastive literature uses (MoCo-CXR, Sowrirajan et al. 2021; MedAug, Vu et al. 2021):
random resized crop (MedAug's best variant: area scale [0.95, 1]), rotation by a few degrees (+-10),
horizontal flip; MoCo v2 adds brightness/contrast jitter and Gaussian blur (off by default here:
the CXR papers did not use them; switch them on in the config to measure).

How it runs (no per-pixel Python):

* crop + scale + rotation + flip are composed into ONE inverse affine map (output pixel -> source
  pixel) and applied by Pillow's C `Image.transform(AFFINE, BILINEAR)` straight from the decoded
  record to the output size. Unlike torchvision's chain (crop, then rotate the crop), the corners
  a rotation uncovers are filled with real image content where the source has any (black only
  outside the source image), and the image is resampled once instead of twice.
* brightness / contrast are one 256-entry lookup table for uint8 images (`Image.point`);
* blur is Pillow's Gaussian blur (`radius` is the standard deviation, in output pixels).

Determinism: every random draw of an example comes from `example_rng(seed, epoch, row, slot)`
(slot 0 = the query view, 1 = the key view, 2+j = hard negative j), a pure function of those numbers,
so the same example gets the same augmentation whatever the worker, process, batch or resume.

Where it runs (`AugmentConfig.where`): "host" applies all of the above in the pipeline's workers
(numpy/Pillow; batches carry finished 224-px views). "device" leaves the prepared pixels as they are
and ships, per view, `view_seed(seed, epoch, row, slot)` (2 uint32 words, a pure function of the same
numbers); `cxrjax.data.device_augment.augment_batch` then draws the parameters with jax.random and does
the same transforms jitted and vectorised on the accelerator, inside the train step. The two paths
draw different random numbers (numpy vs jax.random) from the same example identity, with the same
distributions; both are deterministic and resume-exact.

Images are 2-D (H, W) or (H, W, 1) uint8 (or uint16 for 16-bit records) and come back as
(size, size) arrays of the same dtype; `normalize` turns a batch into float32 (numpy or jax.numpy),
which is meant to run on the device inside the train step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageFilter

from cxrjax.data import pairs

# MedAug's normalisation (their code, on [0, 1] intensities).
CXR_MEAN = 0.5020
CXR_STD = 0.0856

_MAX_CROP_TRIES = 10  # torchvision's RandomResizedCrop: 10 tries, then the whole image
WHERE = ("host", "device")
_STREAM_AUGMENT = 0x5A17_0004  # the pair sampler uses streams ..01 and ..02 of the same hash


def known_fields(cls, d) -> dict:
    """`d` (a dict or ml_collections ConfigDict) as a dict, refusing keys that are not fields of `cls`."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    return d


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (per view) and the eval transform.

    size: output side in pixels (square).
    crop_scale: (min, max) area of the crop as a fraction of the source image (torchvision
        RandomResizedCrop semantics); (1, 1) with crop_ratio (1, 1) disables cropping.
    crop_ratio: (min, max) aspect ratio w/h of the crop, drawn log-uniformly.
    rotation: maximum absolute rotation in degrees (uniform in [-rotation, rotation]).
    hflip_prob: probability of a horizontal flip. A flip moves the heart to the other side (the
        patient's anatomy is not symmetric); MoCo-CXR and MedAug flip, set 0 to keep sides.
    brightness / contrast: factors drawn uniformly from [1 - x, 1 + x] (0 = off), applied with
        probability jitter_prob (brightness, then contrast around the image mean, as torchvision).
    blur_prob, blur_sigma: Gaussian blur with this probability, sigma uniform in blur_sigma
        (output pixels; MoCo v2 uses p = 0.5, sigma in [0.1, 2.0] at 224 px).
    eval_crop: the eval transform keeps this central fraction of the side, resized to `size`.
    where: "host" (the pipeline's workers augment; batches hold finished views) or "device" (batches
        hold the prepared pixels + per-view seeds; the train step runs `device_augment`). Eval and
        vision-language examples are always transformed on the host.
    """

    size: int = 224
    crop_scale: tuple[float, float] = (0.95, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 10.0
    hflip_prob: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    jitter_prob: float = 0.8
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    eval_crop: float = 1.0
    where: str = "host"

    def __post_init__(self):
        def check(ok, what):
            if not ok:
                raise ValueError(f"AugmentConfig: {what}")

        check(self.size >= 1, f"size must be >= 1, got {self.size}")
        check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        check(0 < self.crop_ratio[0] <= self.crop_ratio[1], f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        check(0 <= self.rotation <= 180, f"rotation must be in [0, 180] degrees, got {self.rotation}")
        for name in ("hflip_prob", "jitter_prob", "blur_prob"):
            check(0 <= getattr(self, name) <= 1, f"{name} must be a probability, got {getattr(self, name)}")
        check(0 <= self.brightness < 1 and 0 <= self.contrast < 1, "brightness / contrast must be in [0, 1)")
        check(0 < self.blur_sigma[0] <= self.blur_sigma[1], f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        check(0 < self.eval_crop <= 1, f"eval_crop must be in (0, 1], got {self.eval_crop}")
        check(self.where in WHERE, f"where must be one of {WHERE}, got {self.where!r}")

    @classmethod
    def from_dict(cls, d) -> "AugmentConfig":
        """From a dict / ml_collections ConfigDict (lists become tuples); unknown keys are an error."""
        d = known_fields(cls, d)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# MoCo v2's "aug-plus" photometric part on top of MedAug's geometry (for ablations).
STRONG = AugmentConfig(brightness=0.4, contrast=0.4, jitter_prob=0.8, blur_prob=0.5)


@dataclasses.dataclass(frozen=True)
class Params:
    """The random draws of one view (all a pure function of its rng)."""

    crop: tuple[float, float, float, float]  # centre x, centre y, width, height in source pixels
    angle: float  # degrees, counter-clockwise
    flip: bool
    brightness: float
    contrast: float
    blur_sigma: float  # 0 = no blur


def example_rng(seed: int, epoch: int, row: int, slot: int) -> np.random.Generator:
    """The random stream of one view of one example: (seed, epoch, table row, slot)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(row), int(slot)])


def view_seed(seed: int, epoch: int, row: int, slot: int) -> np.ndarray:
    """(2,) uint32: the jax.random key data of one view for on-device augmentation.

    A pure function of (seed, epoch, table row, slot) like `example_rng` (splitmix64 hashing as in
    `pairs`), so device-side draws are as independent of batch layout and resume as host-side ones.
    """
    k = int(pairs._key(seed, epoch, _STREAM_AUGMENT))
    h = pairs._splitmix64_int(pairs._splitmix64_int(k ^ (int(row) & pairs._M64)) ^ (int(slot) & pairs._M64))
    return np.array([h >> 32, h & 0xFFFFFFFF], np.uint32)


def sample_params(cfg: AugmentConfig, rng: np.random.Generator, height: int, width: int) -> Params:
    """Draw one view's parameters for a height x width source image.

    A fixed number of draws is taken whatever the outcome (10 crop candidates, then one each for
    angle, flip, jitter, blur), so the stream stays aligned if a config switch turns a part off.
    """
    area = height * width
    scale = rng.uniform(cfg.crop_scale[0], cfg.crop_scale[1], _MAX_CROP_TRIES)
    log_ratio = rng.uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), _MAX_CROP_TRIES)
    pos = rng.random((_MAX_CROP_TRIES, 2))
    w = np.sqrt(area * scale * np.exp(log_ratio))
    h = np.sqrt(area * scale / np.exp(log_ratio))
    ok = np.flatnonzero((w <= width) & (h <= height))
    if len(ok):
        i = ok[0]
        cw, ch = float(w[i]), float(h[i])
        cx = cw / 2 + pos[i, 0] * (width - cw)
        cy = ch / 2 + pos[i, 1] * (height - ch)
    else:  # no candidate fits (extreme ratios): the whole image
        cw, ch, cx, cy = float(width), float(height), width / 2, height / 2
    u = rng.random(6)
    angle = (2 * u[0] - 1) * cfg.rotation
    flip = bool(u[1] < cfg.hflip_prob)
    jitter = u[2] < cfg.jitter_prob
    b = 1 + (2 * u[3] - 1) * cfg.brightness if jitter else 1.0
    c = 1 + (2 * u[4] - 1) * cfg.contrast if jitter else 1.0
    v = rng.random(2)
    sigma = cfg.blur_sigma[0] + v[1] * (cfg.blur_sigma[1] - cfg.blur_sigma[0]) if v[0] < cfg.blur_prob else 0.0
    return Params((float(cx), float(cy), cw, ch), float(angle), flip, float(b), float(c), float(sigma))


def affine_coefficients(params: Params, size: int) -> tuple[float, ...]:
    """Pillow AFFINE coefficients (a, b, c, d, e, f): source = (a x + b y + c, d x + e y + f).

    Output (x, y) in continuous pixel coordinates [0, size]^2 -> centred unit square -> flip ->
    scale to the crop's width/height -> rotate by the angle -> translate to the crop centre.
    """
    cx, cy, cw, ch = params.crop
    sx = (-cw if params.flip else cw) / size
    sy = ch / size
    t = math.radians(params.angle)
    cos, sin = math.cos(t), math.sin(t)
    # source = C + R @ diag(sx, sy) @ (p - size/2)
    a, b = cos * sx, -sin * sy
    d, e = sin * sx, cos * sy
    half = size / 2
    return (a, b, cx - a * half - b * half, d, e, cy - d * half - e * half)


def _to_pil(image: np.ndarray) -> tuple[Image.Image, np.dtype]:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image (H, W) or (H, W, 1), got shape {a.shape}")
    if a.dtype == np.uint8:
        return Image.fromarray(a), a.dtype
    if a.dtype == np.uint16:
        return Image.fromarray(a.astype(np.float32), mode="F"), a.dtype
    raise ValueError(f"expected uint8 or uint16 pixels, got {a.dtype}")


def apply(image: np.ndarray, params: Params, size: int) -> np.ndarray:
    """Apply drawn parameters to one image -> (size, size), same dtype."""
    im, dtype = _to_pil(image)
    im = im.transform((size, size), Image.Transform.AFFINE, affine_coefficients(params, size),
                      resample=Image.Resampling.BILINEAR, fillcolor=0)
    jitter = params.brightness != 1.0 or params.contrast != 1.0
    if dtype == np.uint8:
        if jitter:
            # torchvision order: brightness (x*b), then contrast around the mean of that image.
            mean = float(np.asarray(im).mean()) * params.brightness
            v = np.arange(256, dtype=np.float64) * params.brightness
            lut = np.clip(np.rint(params.contrast * (v - mean) + mean), 0, 255).astype(np.uint8)
            im = im.point(lut.tolist())
        if params.blur_sigma > 0:
            im = im.filter(ImageFilter.GaussianBlur(params.blur_sigma))
        return np.asarray(im)
    # 16-bit: float32 all the way, back to uint16 at the end.
    out = np.asarray(im, dtype=np.float32)
    if jitter:
        out = out * params.brightness
        out = params.contrast * (out - out.mean()) + out.mean()
    if params.blur_sigma > 0:
        from scipy import ndimage

        out = ndimage.gaussian_filter(out, params.blur_sigma, mode="reflect", truncate=3.0)
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


def augment(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One random training view of `image` -> (cfg.size, cfg.size), same dtype."""
    h, w = np.shape(image)[:2]
    return apply(image, sample_params(cfg, rng, h, w), cfg.size)


def eval_params(cfg: AugmentConfig, height: int, width: int) -> Params:
    """The eval transform as parameters: the central `eval_crop` square of the shorter side."""
    side = min(height, width) * cfg.eval_crop
    return Params((width / 2, height / 2, side, side), 0.0, False, 1.0, 1.0, 0.0)


def eval_transform(image: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Resize + centre crop (deterministic) -> (cfg.size, cfg.size), same dtype."""
    h, w = np.shape(image)[:2]
    return apply(image, eval_params(cfg, h, w), cfg.size)


def normalize(x, mean: float = CXR_MEAN, std: float = CXR_STD, max_value: float = 255.0):
    """uint8/uint16 pixels -> float32 (x / max_value - mean) / std; numpy or jax arrays alike.

    Meant to run on the device in the train step (4x less host->device traffic than float32).
    """
    scale = 1.0 / (max_value * std)
    return x.astype("float32") * scale - (mean / std)
