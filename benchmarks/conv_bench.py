"""ResNet-18's pieces alone on this CPU: each 3x3 convolution shape forward / input-gradient / kernel-
gradient in XLA vs PyTorch, and the stem max-pool's gradient (XLA's select-and-scatter vs cxrjax's CPU
lowering). What benchmarks/step_profile.py attributes to whole groups, measured one piece at a time.

    python benchmarks/conv_bench.py                 # batch 16, ResNet-18's 4 stage shapes at 224 px (~1 min)
    python benchmarks/conv_bench.py --size=128

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

SMOKE_ARGS = ["--size=32", "--batch=2", "--repeats=1", "--stages=1"]  # tests/test_benchmarks.py


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="image side: stage sides are size/4 .. size/32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--stages", type=int, default=4, help="how many of ResNet-18's 4 stages")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip", default="", help="torch: XLA only")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
