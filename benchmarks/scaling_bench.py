r"""Scaling: measured step time vs (simulated) device count, and expected accelerator throughput from FLOPs.

    python benchmarks/scaling_bench.py --part=devices            # MoCo demo step on 1, 2, 4, 8 simulated CPU devices
    python benchmarks/scaling_bench.py --part=flops              # XLA FLOPs of the MoCo step -> img/s on GPU/TPU
    python benchmarks/scaling_bench.py --part=devices --devices=1,8 --batch=32 --steps=10

Part `devices`: each device count runs in its own process (XLA_FLAGS must be set before JAX starts),
builds exactly the trainer's state and jitted step (`contrastive.build_training`, queue sharded over
`data`), feeds one fixed synthetic global batch, and reports the median step time. Simulated CPU
devices share the machine's cores, so this measures the overhead of partitioning (collectives,
smaller per-device convolutions) and checks the loss does not change -- not a speed-up.

Part `flops`: XLA's cost analysis of the lowered step (query forward+backward, key forward, queue) per
image for ResNet-18/50 MoCo at 224/320 px; expected img/s per chip = peak FLOP/s x MFU / FLOPs per image.
A ViT-B masked vision-language step is estimated from the transformer FLOPs formula (stated below).
Results go to stdout as a table and to --out (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 peak per chip (TFLOP/s) from the vendors' data sheets; H100 is the SXM part without sparsity.
PEAKS = {"TPU v4": 275.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "A100": 312.0, "H100": 989.0}


def _config(arch: str, size: int, batch: int, width: int = 64):
    from cxrjax.train import contrastive as ct

    c = ct.apply_variants(ct.default_config(), "demo") if arch == "demo" else ct.default_config()
    if arch != "demo":
        c.model.update(arch=arch, width=width, init="random")
        c.augment.size = size
        c.moco.queue_size = 65536 // batch * batch  # MoCo v2's queue; FLOPs barely depend on it
    c.batch_size = batch
    c.moco.shuffle_bn_groups = min(c.moco.shuffle_bn_groups, batch)
    return c


def _batch(batch: int, size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8)
    ids = lambda: rng.integers(0, 1000, (batch,), dtype=np.int32)
    return {"query": img(), "key": img(), "patient": ids(), "study": ids(), "laterality": ids() % 2,
            "key_study": ids(), "key_laterality": ids() % 2}


def child(args) -> dict:
    """One device count (this process was started with that many simulated devices)."""
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from cxrjax.data import pipeline
    from cxrjax.train import contrastive as ct
    from cxrjax.train import mesh as mesh_lib

    config = _config("demo", 0, args.batch)
    size = config.augment.size
    mesh = ct.make_mesh(config)
    setup = ct.build_training(config, mesh, total_steps=args.steps + args.warmup)
    batch = jax.device_put(_batch(args.batch, size), pipeline.batch_sharding(mesh, mesh_lib.BATCH_AXES))
    t = time.perf_counter()
    compiled = setup.train_step.lower(setup.state, batch).compile()
    compile_s = time.perf_counter() - t
    state, times, losses = setup.state, [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        loss = float(m["loss"])  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            losses.append(loss)
    med = statistics.median(times)
    return {"part": "devices", "devices": jax.device_count(), "batch": args.batch, "size": size,
            "ms_per_step": 1e3 * med, "ms_min": 1e3 * min(times), "img_per_s": args.batch / med,
            "compile_s": compile_s, "losses": losses, "cpu_cores": os.cpu_count()}


def run_devices(args) -> list[dict]:
    rows = []
    for n in [int(x) for x in args.devices.split(",")]:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={n} "
                             "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")  # as cxrjax.main
        cmd = [sys.executable, __file__, "--child", f"--batch={args.batch}", f"--steps={args.steps}",
               f"--warmup={args.warmup}"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if r.returncode:
            raise SystemExit(f"{n} devices failed:\n{r.stderr[-3000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n} device(s): {row['ms_per_step']:.0f} ms/step (min {row['ms_min']:.0f}), {row['img_per_s']:.1f} img/s, "
              f"compile {row['compile_s']:.1f} s, losses {['%.6f' % x for x in row['losses'][:3]]}", flush=True)
    return rows


def step_flops(arch: str, size: int, batch: int) -> float:
    """XLA's FLOP count of one MoCo train step (lowered HLO; no compile, no execution)."""
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from cxrjax.data import pipeline
    from cxrjax.train import contrastive as ct
    from cxrjax.train import mesh as mesh_lib

    config = _config(arch, size, batch)
    mesh = ct.make_mesh(config)
    setup = ct.build_training(config, mesh, total_steps=1000)
    batch_arrays = jax.device_put(_batch(batch, size), pipeline.batch_sharding(mesh, mesh_lib.BATCH_AXES))
    cost = setup.train_step.lower(setup.state, batch_arrays).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def vit_mvlm_flops_per_example(layers=12, dim=768, mlp=3072, image=224, patch=16, text_tokens=128) -> float:
    """Transformer training FLOPs (forward x 3) for one image+report through one shared encoder:
    per token and layer 2 x (4 d^2 + 2 d mlp) for the projections + 4 T d for attention scores/values;
    every token goes through the encoder (M3AE style; an MAE-style encoder of visible tokens only
    would cost less)."""
    t = (image // patch) ** 2 + 1 + text_tokens
    per_token_layer = 2 * (4 * dim * dim + 2 * dim * mlp) + 4 * t * dim
    return 3.0 * layers * t * per_token_layer


def run_flops(args) -> list[dict]:
    rows = []
    for arch, size in [("resnet18", 224), ("resnet18", 320), ("resnet50", 224), ("resnet50", 320)]:
        f = step_flops(arch, size, args.flops_batch) / args.flops_batch
        rows.append({"part": "flops", "model": f"MoCo {arch}", "size": size, "gflop_per_image": f / 1e9,
                     "source": "XLA cost analysis of the lowered step"})
        print(f"MoCo {arch} {size}px: {f / 1e9:.2f} GFLOP per image per step (XLA)", flush=True)
    f = vit_mvlm_flops_per_example()
    rows.append({"part": "flops", "model": "MVLM ViT-B/16 (+128 text tokens)", "size": 224,
                 "gflop_per_image": f / 1e9, "source": "formula (vit_mvlm_flops_per_example)"})
    print(f"MVLM ViT-B/16 224px + 128 tokens: {f / 1e9:.1f} GFLOP per example (formula)")
    print(f"\nexpected img/s per chip at MFU {args.mfu:.0%} (peak bf16 dense):")
    print("| model | px | GFLOP/img | " + " | ".join(PEAKS) + " |")
    print("|---|---|---|" + "---|" * len(PEAKS))
    for r in rows:
        tput = {k: v * 1e12 * args.mfu / (r["gflop_per_image"] * 1e9) for k, v in PEAKS.items()}
        r["img_per_s_per_chip"] = tput
        r["mfu"] = args.mfu
        print(f"| {r['model']} | {r['size']} | {r['gflop_per_image']:.2f} | "
              + " | ".join(f"{v:,.0f}" for v in tput.values()) + " |")
    per_chip = args.per_chip_batch
    print(f"\nstep time (ms) at {per_chip} images per chip, MFU {args.mfu:.0%} / host CPU cores per chip to feed it "
          f"({args.host_cpu_ms} CPU-ms per image on the host):")
    print("| model | px | " + " | ".join(PEAKS) + " |")
    print("|---|---|" + "---|" * len(PEAKS))
    for r in rows:
        cells = []
        for k, ips in r["img_per_s_per_chip"].items():
            ms, cores = 1000 * per_chip / ips, ips * args.host_cpu_ms / 1000
            r.setdefault("step_ms", {})[k], r.setdefault("host_cores_per_chip", {})[k] = ms, cores
            cells.append(f"{ms:.0f} ms / {cores:.1f} cores")
        print(f"| {r['model']} | {r['size']} | " + " | ".join(cells) + " |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["devices", "flops", "all"], default="all")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=32, help="global batch of the device sweep (demo model, 56 px)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--flops_batch", type=int, default=16)
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation for the table")
    ap.add_argument("--per_chip_batch", type=int, default=32, help="images per chip per step for the step-time table")
    ap.add_argument("--host_cpu_ms", type=float, default=0.44,
                    help="host CPU-ms per image (README: pipeline_bench raw:device:hostonly, 4576 img/s on 2 cores)")
    ap.add_argument("--out", default="", help="append JSON lines here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    if args.part in ("devices", "all"):
        rows += run_devices(args)
    if args.part in ("flops", "all"):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        rows += run_flops(args)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")


if __name__ == "__main__":
    main()
