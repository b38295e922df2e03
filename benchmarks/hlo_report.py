r"""What one train step computes and communicates per device, from XLA's compiled program (compile only).

    python benchmarks/hlo_report.py --devices=8,64 --job=moco                 # ResNet-50, batch 256, 224 px
    python benchmarks/hlo_report.py --devices=8,64 --job=moco --batch=1024
    python benchmarks/hlo_report.py --devices=8 --job=moco --arch=resnet18 --batch=16 --groups=1   # MedAug's run
    python benchmarks/hlo_report.py --devices=8 --job=mvlm                    # ViT-B/16 MVLM step, batch 64
    python benchmarks/hlo_report.py --devices=64 --job=mvlm --batch=256       # (every kind splits over the devices)
    python benchmarks/hlo_report.py --devices=8 --tiny                        # seconds: the smoke-test size

Each device count runs in its own process with `--xla_force_host_platform_device_count=N` (simulated CPU
devices: nothing runs, the step is only lowered from abstract shapes and compiled), and prints
`cxrjax.train.hlo_stats.format_report`: XLA's FLOPs per device, every collective with the bytes of its
per-device result, and how many examples every convolution / matmul runs on. `--json=PATH` also
writes the numbers. docs/scaling.md is written from this report.

MoCo defaults are the reference MoCo v2 recipe on an accelerator pod: ResNet-50, global batch 256,
224 px views made on the device from 256 px records (`augment.where=device`), queue 65,536, one
shuffle-BN group per batch shard (`--groups=0`). `--groups=1` is MedAug's whole-batch BN.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=("moco", "mvlm"), default="moco")
    p.add_argument("--devices", default="8", help="comma-separated simulated device counts")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=None, help="global batch (default: moco 256, mvlm the config's 64)")
    p.add_argument("--size", type=int, default=224, help="training view size")
    p.add_argument("--prepared_size", type=int, default=256, help="record size (device augmentation input)")
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--groups", type=int, default=0, help="shuffle-BN groups; 0 = one per batch shard")
    p.add_argument("--where", choices=("device", "host"), default="device")
    p.add_argument("--hard_negatives", type=int, default=0, help="metadata hard negatives per query")
    p.add_argument("--mvlm_variant", default="", help="mvlm: config variant of configs/mvlm_mixed.py")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (smoke test)")
    p.add_argument("--json", default="", help="also write the reports as JSON")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    reports = {}
    for n in [int(x) for x in args.devices.split(",") if x]:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), f"--child={n}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr[-4000:])
            return out.returncode
        text, _, js = out.stdout.partition("\n@@JSON@@\n")
        print(text)
        reports[n] = json.loads(js)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    return 0


def moco_step(args, n):
    from configs import moco_patient
    from cxrjax.train import contrastive as ct
    from cxrjax.train import mesh as mesh_lib

    c = moco_patient.get_config()
    c.model.update(arch=args.arch, width=args.width, init="random")
    c.batch_size, c.moco.queue_size = args.batch or 256, args.queue
    c.augment.update(size=args.size, where=args.where)
    c.moco.shuffle_bn_groups = args.groups or n
    if args.tiny:
        c.model.update(arch="resnet18", width=8)
        c.batch_size, c.moco.queue_size = 2 * n, 8 * n
        c.augment.size = args.prepared_size = 32
    if args.hard_negatives:
        c.data.hard_negatives, c.data.num_hard_negatives = "patient-other-study", args.hard_negatives
    mesh = ct.make_mesh(c)
    setup = ct.build_training(c, mesh, total_steps=1000, materialize=False)
    b, k = c.batch_size, args.hard_negatives
    batch = ct.abstract_batch(c, mesh, c.augment.size if args.where == "host" else args.prepared_size)
    state = mesh_lib.with_shardings(setup.abstract, setup.state_sharding)
    title = (f"MoCo {c.model.arch} (width {c.model.width}), global batch {b}, {c.augment.size} px "
             f"({args.where} augmentation), queue {c.moco.queue_size}, {c.moco.shuffle_bn_groups} BN group(s), "
             f"{k} hard negatives, on {n} devices ({mesh_lib.describe(mesh)})")
    return setup.train_step.lower(state, batch), title


def mvlm_step(args, n):
    from cxrjax.train import mvlm as mvlm_train

    if not hasattr(mvlm_train, "abstract_step"):
        raise SystemExit("cxrjax.train.mvlm has no abstract_step(config, mesh) yet: the MVLM report needs it")
    from configs import mvlm_mixed

    c = mvlm_mixed.get_config(args.mvlm_variant or None)
    if args.tiny:
        c = mvlm_mixed.get_config("demo")
        c.batch_size = 4 * n  # 2n paired + n image-only + n text-only: every kind splits over the devices
    if args.batch:
        c.batch_size = args.batch
    return mvlm_train.abstract_step(c, n)


def child(args) -> int:
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    from cxrjax.train import hlo_stats

    n = args.child
    if jax.device_count() != n:
        raise SystemExit(f"expected {n} simulated devices, JAX sees {jax.device_count()}")
    lowered, title = (moco_step if args.job == "moco" else mvlm_step)(args, n)
    report = hlo_stats.step_report(lowered)
    print(hlo_stats.format_report(report, title=title))
    js = {"title": title, "devices": n, "flops": report.flops,
          "collectives": [{"kind": c.kind, "bytes": c.bytes, "shapes": [str(s) for s in c.shapes], "op": c.op_name}
                          for c in report.collectives],
          "contractions": [{"kind": c.kind, "examples": c.examples, "weight_grad": c.is_weight_gradient,
                            "lhs": str(c.lhs), "rhs": str(c.rhs), "out": str(c.out), "op": c.op_name}
                           for c in report.contractions]}
    print("\n@@JSON@@\n" + json.dumps(js))
    return 0


if __name__ == "__main__":
    sys.exit(main())
