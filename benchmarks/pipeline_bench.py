"""Input pipeline throughput: cxrjax (Grain over ArrayRecord) vs a file-based PyTorch DataLoader.

Both loaders do the same work per training example: read the query image and its MedAug partner
(same pairs: `pairs.sample_positive`), augment both to 224 px (random resized crop, rotation, flip;
--strong adds MoCo v2's brightness/contrast jitter and Gaussian blur) and batch them as normalised
float tensors. Throughput is decoded+augmented IMAGES/s (2 per example), the median of --repeats
timed windows of --seconds each (the machine is shared: the spread is printed too).

    python benchmarks/pipeline_bench.py --workers=2                 # all cxrjax variants vs torch on PNG files
    python benchmarks/pipeline_bench.py --workers=2 --file_ext=jpg --file_size=320x390   # vs CheXpert-like JPEGs
    python benchmarks/pipeline_bench.py --workers=2 --train         # + ResNet-18 step input-wait fraction
    python benchmarks/pipeline_bench.py --profile                   # where the time goes, stage by stage

cxrjax variants (--variants, comma list of PIXELS:WHERE):
  png:host     PNG records, augmentation in the workers (numpy/OpenCV)
  raw:host     raw-pixel records (prepare --pixels=raw: no decode), augmentation in the workers: what
               the trainer runs on a CPU backend (augment.where="auto")
  png:device   PNG records; workers only decode; augmentation jitted on the JAX device
  raw:device   raw-pixel records; workers only copy bytes; augmentation jitted on the device (what
               "auto" picks on an accelerator)
  raw:device:hostonly   the host part of raw:device alone (batches of pixels + seeds, no augmentation):
               what stays on the CPU when the device is an accelerator (not a like-for-like number)
For ":device" the clock stops when the augmented float32 batch is ready on the device
(`device_augment.contrastive_views` + block_until_ready): host->device transfer and the jitted
augmentation are inside the measured time. On this CPU-only machine the "device" is the same 2
cores the workers run on.

--data holds one prepare output per pixel format (--data/png, --data/raw; made with the phantom if
missing: --patients, --prepared_size; same seed, so the same pixels). The reference reads the same
images from files written once into --data/files_<ext>_<size>/: at the prepared size (default: the
very pixels the records hold) or at --file_size=WxH (e.g. 320x390, CheXpert-small's shape), as PNG
or JPEG (--file_ext), PIL decode + torchvision's PIL-backend transform chain (RandomResizedCrop,
RandomRotation, RandomHorizontalFlip[, ColorJitter, GaussianBlur], ToTensor, Normalize;
torchvision itself is not installed, its PIL calls are reproduced) and a `torch.utils.data.DataLoader`
with the same number of workers.

--train runs a ResNet-18 (cxrjax.models.resnet, NNX) MoCo-like step on raw-pixel batches augmented
where augment.where="auto" puts it (--train_where; on this CPU: in the workers, the step only
normalises; with "device" the augmentation is inside the jitted step): query forward+backward, key
forward. It reports the fraction of wall time the loop waited for data, and the step's images/s
alone (one batch fed again and again).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cxrjax.data import augment, pairs, pipeline

AUG = augment.AugmentConfig(size=224)  # MedAug geometry: crop scale [0.95, 1], +-10 deg, flip 0.5


# ----------------------------------------------------------------------------------------------
# cxrjax


def ensure_data(args, pixels: str) -> Path:
    out = Path(args.data) / pixels
    if not (out / "manifest.json").is_file():
        from cxrjax import prepare

        print(f"preparing phantom data in {out} ({args.patients} patients, {args.prepared_size} px, {pixels}) ...",
              flush=True)
        prepare.prepare_dataset("phantom", out, patients=args.patients, size=args.prepared_size, workers=0,
                                pixels=pixels, strategies=[pairs.BEST_STRATEGY, "study-any_lat-any"])
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and all its descendants (workers) so far."""
    import psutil

    total = 0.0
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed(next_batch, args) -> list[tuple[float, float]]:
    """(images/s, CPU ms per image) of `next_batch()` (returns the number of images) over --repeats
    windows after --warmup calls. CPU time counts this process and its workers: on a shared machine
    it is the load-independent cost, wall-clock images/s the one a user sees."""
    for _ in range(args.warmup):
        next_batch()
    out = []
    for _ in range(args.repeats):
        t, cpu, n = time.perf_counter(), _cpu_seconds(), 0
        while n == 0 or time.perf_counter() - t < args.seconds:  # at least one batch per window
            n += next_batch()
        out.append((n / (time.perf_counter() - t), 1000 * (_cpu_seconds() - cpu) / n))
    return out


def bench_cxrjax(out: Path, args, where: str, host_only: bool = False) -> list[tuple[float, float]]:
    aug = dataclasses.replace(args.aug, where=where)
    cfg = pipeline.PipelineConfig(str(out), strategy=args.strategy, batch_size=args.batch, augment=aug,
                                  num_workers=args.workers, read_threads=args.threads, process_index=0,
                                  process_count=1, worker_buffer_size=2, device_prefetch=2)
    if where == "host" or host_only:
        it = pipeline.make_dataset(cfg).__iter__()

        def next_batch():
            b = next(it)
            return 2 * len(b["row"])
    else:
        import jax

        from cxrjax.data import device_augment

        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        it = pipeline.make_iterator(cfg, mesh)  # global arrays, transferred ahead in a thread
        views = jax.jit(lambda b: device_augment.contrastive_views(b, aug)[:2])

        def next_batch():
            q, k = views(next(it))
            jax.block_until_ready((q, k))
            return q.shape[0] + k.shape[0]
    try:
        return timed(next_batch, args)
    finally:
        it.close()


# ----------------------------------------------------------------------------------------------
# file-based PyTorch reference


def export_files(out: Path, args) -> tuple[Path, pipeline.PreparedData]:
    """The train images as individual files (once); returns (folder, prepared data of the split)."""
    data = pipeline.load_prepared(out, "train", args.strategy)
    size = _file_size(args)
    folder = Path(args.data) / f"files_{args.file_ext}_{'x'.join(map(str, size)) if size else 'prepared'}"
    done = folder / "_done"
    if not done.exists():
        folder.mkdir(exist_ok=True)
        reader = pipeline.RecordReader(data.out, data.name, "train")
        print(f"writing {data.n} {args.file_ext} files to {folder} ...", flush=True)
        for rec in range(data.n):
            im = Image.fromarray(reader.image(rec))
            if size:
                im = im.resize(size, Image.Resampling.BICUBIC)
            path = folder / f"{data.split_rows[rec]}.{args.file_ext}"
            im.save(path, quality=95) if args.file_ext == "jpg" else im.save(path, compress_level=6)
        done.touch()
    return folder, data


def _file_size(args) -> tuple[int, int] | None:
    """--file_size as (width, height): '320x390', '1024' (square) or '' / '0' (the prepared size)."""
    if not args.file_size or args.file_size == "0":
        return None
    w, _, h = args.file_size.partition("x")
    return int(w), int(h or w)


class TorchvisionStyleTransform:
    """torchvision's RandomResizedCrop(224, scale, ratio) -> RandomRotation(deg) -> RandomHorizontalFlip
    [-> RandomApply(ColorJitter(b, c), p) -> RandomApply(GaussianBlur(sigma), p) as MoCo v2 (PIL filter)]
    -> ToTensor -> Normalize, on PIL images with the PIL calls torchvision makes."""

    def __init__(self, cfg: augment.AugmentConfig):
        self.cfg = cfg

    def __call__(self, im: Image.Image):
        import torch
        from PIL import ImageEnhance, ImageFilter

        cfg, (w, h) = self.cfg, im.size
        area = w * h
        for _ in range(10):
            s = random.uniform(*cfg.crop_scale) * area
            r = math.exp(random.uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
            cw, ch = int(round(math.sqrt(s * r))), int(round(math.sqrt(s / r)))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
                break
        else:
            cw, ch, x0, y0 = w, h, 0, 0
        im = im.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        im = im.rotate(random.uniform(-cfg.rotation, cfg.rotation), Image.Resampling.NEAREST, fillcolor=0)
        if random.random() < cfg.hflip_prob:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if (cfg.brightness or cfg.contrast) and random.random() < cfg.jitter_prob:
            if cfg.brightness:
                im = ImageEnhance.Brightness(im).enhance(random.uniform(1 - cfg.brightness, 1 + cfg.brightness))
            if cfg.contrast:
                im = ImageEnhance.Contrast(im).enhance(random.uniform(1 - cfg.contrast, 1 + cfg.contrast))
        if cfg.blur_prob and random.random() < cfg.blur_prob:
            im = im.filter(ImageFilter.GaussianBlur(random.uniform(*cfg.blur_sigma)))
        x = torch.from_numpy(np.asarray(im, np.float32) / 255.0)[None]  # ToTensor: (1, H, W) in [0, 1]
        return (x - augment.CXR_MEAN) / augment.CXR_STD  # Normalize


class FilePairs:
    """torch Dataset: query + partner image files, the partner drawn as cxrjax draws it."""

    def __init__(self, folder: Path, data: pipeline.PreparedData, ext: str, aug: augment.AugmentConfig, seed: int = 0):
        self.folder, self.data, self.ext, self.seed = folder, data, ext, seed
        self.transform = TorchvisionStyleTransform(aug)

    def __len__(self):
        return self.data.n

    def _load(self, row: int):
        with Image.open(self.folder / f"{row}.{self.ext}") as im:
            return self.transform(im.convert("L"))

    def __getitem__(self, rec: int):
        row = int(self.data.split_rows[rec])
        partner = pairs.positive_of(self.data.positives, row, self.seed, 0)
        return self._load(row), self._load(partner), row


def bench_torch(out: Path, args) -> list[float]:
    import torch

    torch.set_num_threads(1)
    folder, data = export_files(out, args)
    ds = FilePairs(folder, data, args.file_ext, args.aug)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                                         persistent_workers=args.workers > 0, drop_last=True,
                                         prefetch_factor=2 if args.workers else None)
    it = iter(loader)

    def next_batch():
        q, k, _ = next(it)
        return q.shape[0] + k.shape[0]

    try:
        return timed(next_batch, args)
    finally:
        del it  # the DataLoader's workers end before JAX starts its threads in this process


# ----------------------------------------------------------------------------------------------
# ResNet-18 step and input wait


def bench_train(out: Path, args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from cxrjax.data import device_augment
    from cxrjax.models import resnet

    aug = dataclasses.replace(args.aug, where=augment.resolve_where(args.train_where))
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    model = resnet.resnet18(in_channels=1, num_classes=128, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        q, k, _ = device_augment.contrastive_views(batch, aug)  # augmentation inside the step
        keys = jax.lax.stop_gradient(model(k, train=False))

        def loss_fn(m):
            z = m(q, train=True)
            z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
            kk = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
            logits = z @ kk.T / 0.2
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(len(z))).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    b = args.train_batch
    cfg = pipeline.PipelineConfig(str(out), strategy=args.strategy, batch_size=b, augment=aug,
                                  num_workers=args.workers, read_threads=args.threads, device_prefetch=2)
    it = pipeline.make_iterator(cfg, mesh)
    batch = next(it)
    keys = [k for k in ("query", "key", "query_seed", "key_seed") if k in batch]
    step(model, opt, {k: batch[k] for k in keys}).block_until_ready()
    wait, t = 0.0, time.perf_counter()
    for _ in range(args.train_steps):
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        loss = step(model, opt, {k: batch[k] for k in keys})
        loss.block_until_ready()
    total = time.perf_counter() - t
    it.close()  # before timing the step alone: the workers' start-up must not overlap it

    fake = {k: batch[k] for k in keys}  # "alone": this one batch over and over, no input pipeline
    t = time.perf_counter()
    for _ in range(args.train_steps):
        loss = step(model, opt, fake)
        loss.block_until_ready()
    alone = b * 2 * args.train_steps / (time.perf_counter() - t)
    return {"where": aug.where, "step_images_per_s_alone": alone, "step_images_per_s_with_pipeline": b * 2 * args.train_steps / total,
            "input_wait_fraction": wait / total}


def profile_stages(args) -> None:
    """Where the time goes: each stage alone, one thread, CPU microseconds per image (median of 3 passes;
    CPU time of this process, so other load on a shared machine inflates it less than wall time)."""
    import jax

    from cxrjax.data import device_augment

    png_dir, raw_dir = ensure_data(args, "png"), ensure_data(args, "raw")
    n = min(256, pipeline.load_prepared(png_dir, "train", None).n)
    png = pipeline.RecordReader(png_dir, "phantom", "train")
    raw = pipeline.RecordReader(raw_dir, "phantom", "train")
    folder, data = export_files(png_dir, args)
    files = [folder / f"{data.split_rows[i]}.{args.file_ext}" for i in range(n)]
    host_aug = [augment.example_rng(0, 0, i, 0) for i in range(n)]
    images = [png.image(i) for i in range(n)]
    import torch

    torch.set_num_threads(1)  # as in the DataLoader workers
    torch_transform = TorchvisionStyleTransform(args.aug)

    def per_image(fn) -> float:
        times = []
        for _ in range(3):
            t = time.process_time()
            fn()
            times.append((time.process_time() - t) / n * 1e6)
        return float(np.median(times))

    def decode_file(f):
        with Image.open(f) as im:
            return im.convert("L")

    stages = {
        "read record bytes (ArrayRecord)": lambda: [png.read(i) for i in range(n)],
        "read + decode PNG record": lambda: [png.image(i) for i in range(n)],
        "read + decode raw record": lambda: [raw.image(i) for i in range(n)],
        "host augment (OpenCV affine, numpy)": lambda: [augment.augment(im, args.aug, r) for im, r in zip(images, host_aug)],
        f"torch ref: open + decode {args.file_ext} file (PIL)": lambda: [decode_file(f) for f in files],
        "torch ref: transform chain (PIL + torch)": lambda: [torch_transform(Image.fromarray(im)) for im in images],
    }
    for name, fn in stages.items():
        print(f"profile  {name:44s} {per_image(fn):8.1f} CPU us/image", flush=True)
    batch = np.stack(images[:args.batch])[..., None]
    seeds = np.stack([augment.view_seed(0, 0, i, 0) for i in range(args.batch)])
    aug = dataclasses.replace(args.aug, where="device")
    device_augment.augment_batch(batch, seeds, aug).block_until_ready()
    times = []
    for _ in range(5):
        t = time.process_time()
        device_augment.augment_batch(jax.device_put(batch), jax.device_put(seeds), aug).block_until_ready()
        times.append((time.process_time() - t) / args.batch * 1e6)
    print(f"profile  {'device augment (jit, batch ' + str(args.batch) + ', ' + jax.default_backend() + ')':44s} "
          f"{np.median(times):8.1f} CPU us/image", flush=True)


def _summary(runs: list[tuple[float, float]]) -> str:
    rates, cpu = [r for r, _ in runs], [c for _, c in runs]
    return (f"{np.median(rates):8.1f} images/s wall (median of {len(rates)}: {', '.join(f'{r:.0f}' for r in rates)}); "
            f"CPU {np.median(cpu):6.2f} ms/image -> {1000 / np.median(cpu):7.1f} images/s per busy core")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/cxr_bench")
    p.add_argument("--patients", type=int, default=400)
    p.add_argument("--prepared_size", type=int, default=256)
    p.add_argument("--strategy", default=pairs.BEST_STRATEGY)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--threads", type=int, default=2, help="cxrjax read threads per worker")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0, help="length of one timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per loader (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing (worker start-up, compilation)")
    p.add_argument("--variants", default="png:host,raw:host,png:device,raw:device",
                   help="cxrjax variants PIXELS:WHERE (pixels png|raw, where host|device)")
    p.add_argument("--strong", action="store_true", help="add MoCo v2 jitter (0.4, p 0.8) and blur (p 0.5)")
    p.add_argument("--file_ext", default="png", choices=("png", "jpg"))
    p.add_argument("--file_size", default="", help="reference files' WxH in px, e.g. 320x390 ('' = prepared size)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: cxrjax,torch")
    p.add_argument("--profile", action="store_true", help="only time each stage alone (one thread), then exit")
    p.add_argument("--train", action="store_true", help="also measure ResNet-18 steps and the input wait")
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--train_steps", type=int, default=10)
    p.add_argument("--train_where", default="auto", choices=augment.WHERE, help="augmentation of the --train run")
    args = p.parse_args()
    args.aug = augment.STRONG if args.strong else AUG
    args.aug = dataclasses.replace(args.aug, size=224)
    skip = set(filter(None, args.skip.split(",")))
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start; batch {args.batch}, "
          f"{args.workers} workers, augmentation {'MoCo v2 strong' if args.strong else 'MedAug'} at 224 px", flush=True)
    if args.profile:
        profile_stages(args)
        return
    res = {}
    # torch first: its DataLoader forks its workers, which must happen before JAX starts its threads
    if "torch" not in skip:
        res["torch"] = bench_torch(ensure_data(args, "png"), args)
        print(f"torch  DataLoader ({args.workers} workers, {args.file_ext} files at "
              f"{args.file_size or args.prepared_size} px): {_summary(res['torch'])}", flush=True)
    if "cxrjax" not in skip:
        for variant in filter(None, args.variants.split(",")):
            pixels, where, *rest = variant.split(":")
            res[variant] = bench_cxrjax(ensure_data(args, pixels), args, where, host_only=rest == ["hostonly"])
            print(f"cxrjax {variant:10s} (grain, {args.workers} workers x {args.threads} threads): "
                  f"{_summary(res[variant])}", flush=True)
    if "torch" in res:
        for k, v in res.items():
            if k != "torch":
                wall = np.median([r for r, _ in v]) / np.median([r for r, _ in res["torch"]])
                cpu = np.median([c for _, c in res["torch"]]) / np.median([c for _, c in v])
                print(f"ratio cxrjax {k} / torch: {wall:.2f}x wall-clock images/s, {cpu:.2f}x by CPU cost per image")
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    if args.train:
        r = bench_train(ensure_data(args, "raw"), args)
        print(f"ResNet-18 MoCo-like step alone (batch {args.train_batch}, augmentation on the {r['where']}): "
              f"{r['step_images_per_s_alone']:.1f} images/s; with the raw:{r['where']} pipeline: "
              f"{r['step_images_per_s_with_pipeline']:.1f} images/s; input-wait fraction {r['input_wait_fraction']:.3f}")


if __name__ == "__main__":
    main()
