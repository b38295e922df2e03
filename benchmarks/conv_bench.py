"""ResNet-18's pieces alone on this CPU: each 3x3 convolution shape forward / input-gradient / kernel-
gradient in XLA vs PyTorch, the stem max-pool's gradient (XLA's select-and-scatter vs cxrjax's CPU
lowering) and, with --matmul, every convolution as XLA's vs as cxrjax's CPU matmul (cxrjax/models/conv.py).
What benchmarks/step_profile.py attributes to whole groups, measured one piece at a time.

    python benchmarks/conv_bench.py                 # batch 16, ResNet-18's 4 stage shapes at 224 px (~1 min)
    python benchmarks/conv_bench.py --size=128
    python benchmarks/conv_bench.py --matmul --stages=0 --skip=torch --size=64  # convolution vs matmul lowering

XLA runs under the trainer's flags (train_bench.DEFAULT_FLAGS); torch (optional) with the same number of
threads, channels_last and NCHW (torch has no separate input/kernel-gradient timing here: its row is
forward alone and forward + both gradients). Median of --repeats calls after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import train_bench  # benchmarks/ is this script's folder

SMOKE_ARGS = ["--size=32", "--batch=2", "--repeats=1", "--stages=1", "--matmul"]  # tests/test_benchmarks.py


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def xla_rows(batch, side, channels, repeats):
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (batch, side, side, channels))
    w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.05

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = jnp.ones_like(conv(x, w))
    parts = {
        "forward": (conv, (x, w)),
        "input-grad": (lambda g, w: jax.vjp(lambda x: conv(x, w), x)[1](g)[0], (g, w)),
        "kernel-grad": (lambda x, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0], (x, g)),
    }
    flops = 2.0 * batch * side * side * channels * channels * 9
    out = {}
    for name, (fn, args) in parts.items():
        compiled = jax.jit(fn).lower(*args).compile()
        out[name] = median_ms(lambda: jax.block_until_ready(compiled(*args)), repeats)
    return out, flops


def torch_rows(batch, side, channels, repeats, threads):
    import torch

    torch.set_num_threads(threads)
    out = {}
    for fmt_name, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
        conv = torch.nn.Conv2d(channels, channels, 3, 1, 1, bias=False).to(memory_format=fmt)
        x = torch.randn(batch, channels, side, side).contiguous(memory_format=fmt).requires_grad_(True)

        def forward():
            with torch.no_grad():
                conv(x)

        def train():
            y = conv(x)
            y.backward(torch.ones_like(y))

        out[fmt_name] = (median_ms(forward, repeats), median_ms(train, repeats))
    return out


def pool_rows(batch, side, repeats):
    import jax

    from cxrjax.models import pooling

    x = jax.nn.relu(jax.random.normal(jax.random.key(2), (batch, side, side, 64)))
    y = pooling._max_pool_xla(x)
    g = jax.random.normal(jax.random.key(3), y.shape)
    out = {}
    for name, fn in (("XLA select-and-scatter", pooling._select_and_scatter_grad),
                     ("cxrjax CPU parity planes", pooling._parity_planes_grad)):
        compiled = jax.jit(fn).lower(x, y, g).compile()
        out[name] = median_ms(lambda: jax.block_until_ready(compiled(x, y, g)), repeats)
    return out


def resnet_convs(size: int) -> list[tuple[str, int, int, int, int, int]]:
    """(name, input side, Cin, Cout, kernel, stride) of every distinct convolution of ResNet-18 (width 64)
    at `size` px, then ResNet-50's 1x1 convolutions (stride 1; their stride-2 downsample is ResNet-18's shape
    with 4x the channels)."""
    rows = []
    for stage in range(4):
        side, c = size // (4 * 2 ** stage), 64 * 2 ** stage
        if stage:
            rows.append((f"r18 layer{stage + 1}.0.conv1 3x3/2", 2 * side, c // 2, c, 3, 2))
            rows.append((f"r18 layer{stage + 1}.0.downsample 1x1/2", 2 * side, c // 2, c, 1, 2))
        rows.append((f"r18 layer{stage + 1} 3x3", side, c, c, 3, 1))
    for stage in range(4):
        side, c = size // (4 * 2 ** stage), 64 * 2 ** stage
        rows.append((f"r50 layer{stage + 1} 1x1 in", side, 4 * c, c, 1, 1))
        rows.append((f"r50 layer{stage + 1} 1x1 out", side, c, 4 * c, 1, 1))
    return rows


def matmul_rows(batch: int, size: int, repeats: int) -> None:
    """Each convolution as XLA's convolution and as cxrjax's CPU matmul lowering (cxrjax/models/conv.py):
    forward, and forward + both gradients; which one the trainer uses on the CPU."""
    import jax
    import jax.numpy as jnp

    from cxrjax.models import conv as conv_lib

    print(f"\nconvolutions as XLA convolutions vs as slices + matmul, {size} px, batch {batch}, ms "
          f"(chosen = what cxrjax.models.conv uses on the CPU)")
    print(f"{'convolution':34s} {'(B,H,W,Cin)->Cout':>24} {'conv fwd':>9} {'matmul':>8} {'conv f+b':>9} {'matmul':>8} "
          f"{'ratio f+b':>10}  chosen")
    for name, side, cin, cout, k, stride in resnet_convs(size):
        pad = ((k - 1) // 2,) * 2
        x = jax.random.normal(jax.random.key(0), (batch, side, side, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
        lowerings = {
            "conv": lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), (pad, pad),
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC")),
            "matmul": lambda x, w: conv_lib._conv_as_matmul(x, w, strides=(stride, stride), padding=(pad, pad),
                                                           precision=None, preferred_element_type=None),
        }
        ms = {}
        for lowering, fn in lowerings.items():
            both = jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2), argnums=(0, 1))
            for part, f in (("fwd", fn), ("f+b", both)):
                compiled = jax.jit(f).lower(x, w).compile()
                ms[lowering, part] = median_ms(lambda: jax.block_until_ready(compiled(x, w)), repeats)
        chosen = "matmul" if conv_lib.cpu_matmul_applies(x.shape, w.shape, (stride, stride), (pad, pad)) else "conv"
        print(f"{name:34s} {str((batch, side, side, cin)) + '->' + str(cout):>24} {ms['conv', 'fwd']:9.2f} "
              f"{ms['matmul', 'fwd']:8.2f} {ms['conv', 'f+b']:9.2f} {ms['matmul', 'f+b']:8.2f} "
              f"{ms['conv', 'f+b'] / ms['matmul', 'f+b']:9.2f}x  {chosen}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="image side: stage sides are size/4 .. size/32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--stages", type=int, default=4, help="how many of ResNet-18's 4 stages")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip", default="", help="torch: XLA only")
    p.add_argument("--matmul", action="store_true",
                   help="then every ResNet-18 (and ResNet-50 1x1) convolution at --size as XLA's convolution vs "
                        "cxrjax's CPU matmul lowering, and which one cxrjax uses (--stages=0 --skip=torch: that and the pool row)")
    p.add_argument("--flags", default=train_bench.DEFAULT_FLAGS, choices=sorted(train_bench.FLAG_SETS),
                   help="named XLA flag set (benchmarks/train_bench.py), e.g. none = jaxlib's YNNPACK convolutions")
    args = p.parse_args(argv)
    flags = train_bench.set_xla_flags(train_bench.parse_args([f"--flags={args.flags}"]))
    import jax

    have_torch = "torch" not in args.skip
    if have_torch:
        try:
            import torch  # noqa: F401 - only whether it is installed
        except ImportError:
            have_torch = False
            print("torch is not installed: XLA rows only", file=sys.stderr)
    print(f"batch {args.batch}, float32, jax {jax.__version__}, {os.cpu_count()} cores, XLA_FLAGS={flags!r}")
    print(f"{'3x3 conv (B,H,W,C)':22s} {'XLA fwd':>9} {'in-grad':>9} {'k-grad':>9} {'XLA f+b':>9} "
          f"{'torch CL fwd':>13} {'f+b':>8} {'NCHW fwd':>9} {'f+b':>8}   ms (GFLOP/s of the XLA forward / torch CL forward)")
    for stage in range(args.stages):
        side, channels = args.size // (4 * 2 ** stage), 64 * 2 ** stage
        xla, flops = xla_rows(args.batch, side, channels, args.repeats)
        line = (f"{str((args.batch, side, side, channels)):22s} {xla['forward']:9.1f} {xla['input-grad']:9.1f} "
                f"{xla['kernel-grad']:9.1f} {sum(xla.values()):9.1f}")
        rates = f"{flops / xla['forward'] / 1e6:.0f}"
        if have_torch:
            t = torch_rows(args.batch, side, channels, args.repeats, args.threads)
            line += (f" {t['channels_last'][0]:13.1f} {t['channels_last'][1]:8.1f} {t['nchw'][0]:9.1f} "
                     f"{t['nchw'][1]:8.1f}")
            rates += f" / {flops / t['channels_last'][0] / 1e6:.0f}"
        print(f"{line}   ({rates})")
    side = args.size // 2
    pools = pool_rows(args.batch, side, args.repeats)
    print(f"stem max-pool 3x3/2 gradient, input {(args.batch, side, side, 64)}: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in pools.items()))
    if args.matmul:
        matmul_rows(args.batch, args.size, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
