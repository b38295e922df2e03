"""Input pipeline throughput: cxrjax (Grain over ArrayRecord) vs a file-based PyTorch DataLoader.

Both loaders do the same work per training example: decode the query image and its MedAug partner
(same pairs: `pairs.sample_positive`), augment both to 224 px (random resized crop, rotation, flip)
and batch them. Throughput is decoded+augmented IMAGES/s (2 per example).

    python benchmarks/pipeline_bench.py --data=/tmp/cxr_bench --workers=2
    python benchmarks/pipeline_bench.py --data=/tmp/cxr_bench --workers=2 --train   # + ResNet-18 input wait

--data is a prepare output dir (made with the phantom if missing: --patients, --prepared_size).
The reference reads the same images from files written once into --data/files_<ext>_<px>/ at
--file_size px (default: the prepared size, i.e. the same pixels; use e.g. 1024 for the size CXR
datasets ship at), as PNG or JPEG (--file_ext), with torchvision's PIL-backend transform chain
(crop+resize, rotate, flip, ToTensor, Normalize; torchvision itself is not installed, its PIL
calls are reproduced) and a `torch.utils.data.DataLoader` with the same number of workers.

--train runs a ResNet-18 (cxrjax.models.resnet, NNX) MoCo-like step on the batches: query
forward+backward, key forward, on device normalisation; it reports the fraction of wall time the
loop waited for data, and the step's images/s alone on synthetic data.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cxrjax.data import augment, pairs, pipeline

AUG = augment.AugmentConfig(size=224)  # MedAug geometry: crop scale [0.95, 1], +-10 deg, flip 0.5


def ensure_data(args) -> Path:
    out = Path(args.data)
    if not (out / "manifest.json").is_file():
        from cxrjax import prepare

        print(f"preparing phantom data in {out} ({args.patients} patients, {args.prepared_size} px) ...", flush=True)
        prepare.prepare_dataset("phantom", out, patients=args.patients, size=args.prepared_size, workers=0,
                                strategies=[pairs.BEST_STRATEGY, "study-any_lat-any"])
    return out


# ----------------------------------------------------------------------------------------------
# cxrjax


def bench_cxrjax(out: Path, args) -> float:
    cfg = pipeline.PipelineConfig(str(out), strategy=args.strategy, batch_size=args.batch, augment=AUG,
                                  num_workers=args.workers, read_threads=args.threads, process_index=0,
                                  process_count=1, worker_buffer_size=2)
    it = pipeline.make_dataset(cfg).__iter__()
    for _ in range(args.warmup):
        next(it)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < args.seconds:
        b = next(it)
        n += 2 * len(b["row"])
    rate = n / (time.perf_counter() - t)
    it.close()
    return rate


# ----------------------------------------------------------------------------------------------
# file-based PyTorch reference


def export_files(out: Path, args) -> tuple[Path, np.ndarray]:
    """The train images as individual files (once); returns (folder, table rows of the records)."""
    data = pipeline.load_prepared(out, "train", args.strategy)
    px = args.file_size or 0
    folder = out / f"files_{args.file_ext}_{px or 'prepared'}"
    done = folder / "_done"
    if not done.exists():
        folder.mkdir(exist_ok=True)
        reader = pipeline.RecordReader(data.out, data.name, "train")
        print(f"writing {data.n} {args.file_ext} files to {folder} ...", flush=True)
        for rec in range(data.n):
            im = Image.fromarray(reader.image(rec))
            if px:
                im = im.resize((px, px), Image.Resampling.BICUBIC)
            path = folder / f"{data.split_rows[rec]}.{args.file_ext}"
            im.save(path, quality=95) if args.file_ext == "jpg" else im.save(path, compress_level=6)
        done.touch()
    return folder, data


class RandomResizedCropRotateFlip:
    """torchvision's RandomResizedCrop(224, scale=(0.95, 1)) -> RandomRotation(10) -> RandomHorizontalFlip
    -> ToTensor -> Normalize on PIL images, with the PIL calls torchvision makes."""

    def __init__(self, cfg: augment.AugmentConfig):
        self.cfg = cfg

    def __call__(self, im: Image.Image):
        import torch

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
        x = torch.from_numpy(np.asarray(im, np.float32) / 255.0)[None]  # ToTensor: (1, H, W) in [0, 1]
        return (x - augment.CXR_MEAN) / augment.CXR_STD  # Normalize


class FilePairs:
    """torch Dataset: query + partner image files, the partner drawn as cxrjax draws it."""

    def __init__(self, folder: Path, data: pipeline.PreparedData, ext: str, seed: int = 0):
        self.folder, self.data, self.ext, self.seed = folder, data, ext, seed
        self.transform = RandomResizedCropRotateFlip(AUG)

    def __len__(self):
        return self.data.n

    def _load(self, row: int):
        with Image.open(self.folder / f"{row}.{self.ext}") as im:
            return self.transform(im.convert("L"))

    def __getitem__(self, rec: int):
        row = int(self.data.split_rows[rec])
        partner = int(pairs.sample_positive(self.data.positives, np.array([row]), self.seed, 0)[0])
        return self._load(row), self._load(partner), row


def bench_torch(out: Path, args) -> float:
    import torch

    torch.set_num_threads(1)
    folder, data = export_files(out, args)
    ds = FilePairs(folder, data, args.file_ext)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                                         persistent_workers=args.workers > 0, drop_last=True,
                                         prefetch_factor=2 if args.workers else None)
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < args.seconds:
        q, k, _ = next(it)
        n += q.shape[0] + k.shape[0]
    rate = n / (time.perf_counter() - t)
    del it
    return rate


# ----------------------------------------------------------------------------------------------
# ResNet-18 step and input wait


def bench_train(out: Path, args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from cxrjax.models import resnet

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    model = resnet.resnet18(in_channels=1, num_classes=128, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, q, k):
        q, k = augment.normalize(q), augment.normalize(k)
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
    fake = jnp.zeros((b, 224, 224, 1), jnp.uint8)
    step(model, opt, fake, fake).block_until_ready()
    t = time.perf_counter()
    for _ in range(args.train_steps):
        loss = step(model, opt, fake, fake)
    loss.block_until_ready()
    alone = b * 2 * args.train_steps / (time.perf_counter() - t)

    cfg = pipeline.PipelineConfig(str(out), strategy=args.strategy, batch_size=b, augment=AUG,
                                  num_workers=args.workers, read_threads=args.threads, device_prefetch=2)
    it = pipeline.make_iterator(cfg, mesh)
    batch = next(it)
    step(model, opt, batch["query"], batch["key"]).block_until_ready()
    wait, t = 0.0, time.perf_counter()
    for _ in range(args.train_steps):
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        loss = step(model, opt, batch["query"], batch["key"])
        loss.block_until_ready()
    total = time.perf_counter() - t
    it.close()
    return {"step_images_per_s_synthetic": alone, "step_images_per_s_with_pipeline": b * 2 * args.train_steps / total,
            "input_wait_fraction": wait / total}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/cxr_bench")
    p.add_argument("--patients", type=int, default=400)
    p.add_argument("--prepared_size", type=int, default=256)
    p.add_argument("--strategy", default=pairs.BEST_STRATEGY)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--threads", type=int, default=2, help="cxrjax read threads per worker")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=int, default=3, help="batches before timing (worker start-up)")
    p.add_argument("--file_ext", default="png", choices=("png", "jpg"))
    p.add_argument("--file_size", type=int, default=0, help="reference files' side in px (0 = prepared size)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: cxrjax,torch")
    p.add_argument("--train", action="store_true", help="also measure ResNet-18 steps and the input wait")
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--train_steps", type=int, default=10)
    args = p.parse_args()
    out = ensure_data(args)
    skip = set(filter(None, args.skip.split(",")))
    res = {}
    if "cxrjax" not in skip:
        res["cxrjax"] = bench_cxrjax(out, args)
        print(f"cxrjax  (grain, {args.workers} workers x {args.threads} threads): {res['cxrjax']:8.1f} images/s", flush=True)
    if "torch" not in skip:
        res["torch"] = bench_torch(out, args)
        print(f"torch   (DataLoader, {args.workers} workers, {args.file_ext} files at "
              f"{args.file_size or args.prepared_size} px): {res['torch']:8.1f} images/s", flush=True)
    if len(res) == 2:
        print(f"ratio cxrjax / torch: {res['cxrjax'] / res['torch']:.2f}x")
    if args.train:
        r = bench_train(out, args)
        print(f"ResNet-18 MoCo-like step alone (batch {args.train_batch}): {r['step_images_per_s_synthetic']:.1f} images/s; "
              f"with the pipeline: {r['step_images_per_s_with_pipeline']:.1f} images/s; "
              f"input-wait fraction {r['input_wait_fraction']:.3f}")


if __name__ == "__main__":
    main()
