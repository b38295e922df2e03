"""Where the MoCo step's time goes on this machine: XLA's own trace of the trainer's compiled step,
summed per kind of work.

    python benchmarks/step_profile.py                      # 224 px, batch 16, the trainer's XLA flags
    python benchmarks/step_profile.py --size=128 --top=15  # also the 15 slowest instructions
    python benchmarks/step_profile.py --torch              # PyTorch's step first (torch.profiler), same groups

The step is built exactly as benchmarks/train_bench.py builds it (the trainer's state, step and
shardings; the same synthetic batch). `jax.profiler.trace` records one event per executed XLA
instruction (thunk) of the compiled module; each event is matched to its instruction in the
optimized HLO and put into one group:

  conv forward / conv input-grad / conv weight-grad   (convolutions; FLOPs from their shapes: a stride-2
                                                       layer's input-gradient counts the zeros of its dilated
                                                       input, so that row sums above XLA's own count)
  dot                                                 (matrix products: MLP head, InfoNCE, queue)
  layout copy / transpose                             (copies and transposes only, nothing computed)
  max-pool (reduce-window, select-and-scatter)
  elementwise + reductions                            (BatchNorm, ReLU, Adam, EMA, ... fusions)

An instruction's time runs from its start to its end (for XLA:CPU's asynchronous Eigen convolutions,
to the "end: NAME" event). XLA runs independent instructions at once, and on 2 cores one that waits
for threads busy with another would be charged the other's work: each moment of wall time is split
evenly among the instructions running then, so the groups add up to the busy wall time per step.
Times are summed over the traced steps and divided by their number. GFLOP/s is per group (its
FLOPs over its share of the time).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import train_bench  # benchmarks/ is this script's folder: the same step and batch as the throughput benchmark

SMOKE_ARGS = ["--size=32", "--batch=8", "--steps=1", "--top=3", "--xla_pool", "--xla_conv", "--torch"]  # tests/test_benchmarks.py: seconds of work

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\](?:\{[^}]*\})? (\w[\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """(instructions: name -> dict(opcode, shape, line, computation), computations: name -> [names])."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            name, _, dims, opcode = m.groups()
            shape = tuple(int(d) for d in dims.split(",") if d)
            instrs[name] = {"opcode": opcode, "shape": shape, "line": line, "comp": current}
            comps[current].append(name)
    return instrs, comps


def conv_flops(ins: dict, instrs: dict) -> float:
    """2 x output elements x window elements x kernel input features (/ feature groups)."""
    line = ins["line"]
    window = re.search(r"window=\{size=([\dx]+)", line)
    labels = re.search(r"dim_labels=\w+_(\w+)->", line)
    operands = re.search(r"convolution\(%?([\w.\-]+), %?([\w.\-]+)\)", line)
    if not (labels and operands) or operands.group(2) not in instrs:
        return 0.0
    kernel = instrs[operands.group(2)]["shape"]
    cin = kernel[labels.group(1).index("i")]
    win = 1
    for w in (window.group(1).split("x") if window else []):
        win *= int(w)
    groups = re.search(r"feature_group_count=(\d+)", line)
    out = 1
    for d in ins["shape"]:
        out *= d
    return 2.0 * out * win * cin / (int(groups.group(1)) if groups else 1)


def dot_flops(ins: dict, instrs: dict) -> float:
    line = ins["line"]
    operands = re.search(r"dot\(%?([\w.\-]+), %?([\w.\-]+)\)", line)
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if not (operands and contract) or operands.group(1) not in instrs:
        return 0.0
    lhs = instrs[operands.group(1)]["shape"]
    k = 1
    for d in contract.group(1).split(","):
        if d:
            k *= lhs[int(d)]
    out = 1
    for d in ins["shape"]:
        out *= d
    return 2.0 * out * k


def kernel_shapes(instrs: dict) -> set:
    """Sorted shapes of the step's convolution kernels (4-D entry parameters named ...kernel...)."""
    return {tuple(sorted(i["shape"])) for n, i in instrs.items()
            if i["opcode"] == "parameter" and "kernel" in n and len(i["shape"]) == 4}


def classify(name: str, instrs: dict, comps: dict, kernels: set) -> tuple[str, float]:
    """(group, FLOPs) of one executed instruction; fusions are looked into. `kernels`: `kernel_shapes`."""
    ins = instrs[name]
    inner = [ins]
    if ins["opcode"] in ("fusion", "call", "custom-call"):
        called = _CALLS.search(ins["line"])
        inner = [instrs[n] for n in comps.get(called.group(1), [])] if called else []
    ops = {i["opcode"] for i in inner}
    convs = [i for i in inner if i["opcode"] == "convolution"]
    if convs:
        c = convs[0]
        flops = sum(conv_flops(i, instrs) for i in convs)
        # a kernel's gradient is a convolution whose output holds a kernel's elements (any order)
        if tuple(sorted(c["shape"])) in kernels:
            return "conv weight-grad", flops
        return ("conv input-grad" if "transpose(" in c["line"] else "conv forward"), flops
    dots = [i for i in inner if i["opcode"] == "dot"]
    if dots:
        return "dot", sum(dot_flops(i, instrs) for i in dots)
    if ops & {"reduce-window", "select-and-scatter"}:
        return "max-pool (reduce-window, select-and-scatter)", 0.0
    if ops and ops <= {"copy", "transpose", "reverse", "bitcast", "parameter", "reshape", "broadcast", "slice",
                       "concatenate", "pad", "tuple", "get-tuple-element", "dynamic-slice",
                       "dynamic-update-slice", "constant"}:
        return "layout copy / transpose / slice", 0.0
    return "elementwise + reductions", 0.0


def trace_events(log_dir: str) -> list[dict]:
    files = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"jax.profiler wrote no trace under {log_dir}")
    with gzip.open(files[0]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def thunk_durations(events: list[dict], instrs: dict) -> list[dict]:
    """One {name, dur} per executed instruction. A thunk that runs asynchronously (XLA:CPU's Eigen
    convolutions) returns at once and later logs "end: NAME": its time runs until that end event."""
    timed = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    pending: dict[str, list[dict]] = collections.defaultdict(list)
    out = []
    for e in timed:
        name = e["name"]
        if name in instrs:
            item = {"name": name, "dur": e["dur"], "ts": e["ts"]}
            pending[name].append(item)
            out.append(item)
        elif name.startswith("end: ") and pending.get(name[5:]):
            item = pending[name[5:]].pop(0)
            item["dur"] = max(item["dur"], e["ts"] + e["dur"] - item["ts"])
    return out


def shared_time(items: list[dict]) -> None:
    """Replace each item's "dur" by its share of the wall time: at any moment the k instructions
    running at once split that moment evenly. On 2 cores an instruction that waits for another's
    threads is otherwise charged the other's work; shares add up to the busy wall time."""
    bounds = []
    for i, it in enumerate(items):
        bounds.append((it["ts"], 1, i))
        bounds.append((it["ts"] + it["dur"], -1, i))
    bounds.sort()
    share = [0.0] * len(items)
    active: set[int] = set()
    last = None
    for t, kind, i in bounds:
        if active and last is not None and t > last:
            for j in active:
                share[j] += (t - last) / len(active)
        last = t
        (active.add if kind == 1 else active.discard)(i)
    for it, sh in zip(items, share):
        it["dur"] = sh


def print_groups(per_group: dict, n: int, total_ms: float) -> None:
    """The table: per group ms/step, share of `total_ms`, GFLOP/step and GFLOP/s (group -> [us, flops] over n steps)."""
    print(f"{'group':48s} {'ms/step':>9} {'share':>7} {'GFLOP/step':>11} {'GFLOP/s':>8}")
    for group, (us, flops) in sorted(per_group.items(), key=lambda kv: -kv[1][0]):
        ms = us / n / 1e3
        gf = flops / n / 1e9
        rate = f"{gf / (ms / 1e3):8.1f}" if flops and ms else f"{'':8s}"
        print(f"{group:48s} {ms:9.1f} {ms / total_ms:7.1%} {gf:11.2f} {rate}")


def torch_group(event) -> str:
    """The group of one torch.profiler event by its operator's name (and the optimizer step it runs in)."""
    name = event.name
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer (Adam) + EMA"
        parent = parent.cpu_parent
    if name.startswith("aten::_foreach"):  # the EMA of the key encoder
        return "optimizer (Adam) + EMA"
    if "convolution_backward" in name:
        return "conv input-grad + weight-grad"
    if "conv" in name:  # aten::conv2d (where the profiler counts the FLOPs), convolution, mkldnn_convolution
        return "conv forward"
    if "max_pool" in name:
        return "max-pool (reduce-window, select-and-scatter)"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "dot"
    if "batch_norm" in name:
        return "BatchNorm (forward, backward)"
    if name.startswith(("autograd::", "torch::autograd::", "Optimizer.")) or name.endswith("Backward0") \
            or name in ("aten::empty", "aten::empty_like", "aten::empty_strided"):
        # autograd nodes' own time (their work is in the aten ops under them) and allocation
        return "autograd engine / framework"
    return "elementwise + reductions"


def profile_torch(args) -> None:
    """PyTorch's side of the comparison: the same step (train_bench.torch_step), grouped like XLA's."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    bench_args = train_bench.parse_args([f"--batch={args.batch}"])
    step, info = train_bench.torch_step(bench_args, args.size, "channels_last", "split")
    for _ in range(2):
        step()
    walls = []
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
    per_group = collections.defaultdict(lambda: [0.0, 0.0])  # group -> [self us, flops]
    for e in prof.events():
        group = torch_group(e)
        per_group[group][0] += e.self_cpu_time_total
        per_group[group][1] += e.flops or 0
    n = args.steps
    total = sum(us for us, _ in per_group.values()) / n / 1e3
    print(f"PyTorch MoCo step (benchmarks/train_bench.py), ResNet-18 width 64, batch {args.batch}, {args.size} px, "
          f"float32, channels_last, BN split; {n} profiled steps; torch {torch.__version__}, {info['threads']} threads")
    print(f"wall {statistics.median(walls) * 1e3:.0f} ms/step (median, profiled), operators' own time "
          f"{total:.0f} ms/step (self CPU time on the calling thread)")
    print_groups(per_group, n, total)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="traced steps (after 2 untraced)")
    p.add_argument("--top", type=int, default=0, help="also list the N slowest instructions")
    p.add_argument("--flags", default=train_bench.DEFAULT_FLAGS, choices=sorted(train_bench.FLAG_SETS))
    p.add_argument("--xla_flags", default="")
    p.add_argument("--xla_pool", action="store_true",
                   help="the stem max-pool's gradient left to XLA (select-and-scatter): the step before "
                        "cxrjax/models/pooling.py")
    p.add_argument("--xla_conv", action="store_true",
                   help="every convolution left to XLA: the step before cxrjax/models/conv.py")
    p.add_argument("--torch", action="store_true",
                   help="first profile benchmarks/train_bench.py's PyTorch step (torch.profiler, channels_last, "
                        "BN split: its fastest variant there) in a process of its own, in the same groups")
    p.add_argument("--torch_only", action="store_true", help=argparse.SUPPRESS)  # the process --torch starts
    args = p.parse_args(argv)
    if args.torch_only:
        profile_torch(args)
        return 0
    if args.torch:
        # First, in a process of its own: after XLA's traced steps, even from a child process while this one
        # waited, torch's 224 px step ran 1.5x slower (2956 vs ~1950 ms profiled), mostly elementwise work.
        cmd = [sys.executable, os.path.abspath(__file__), "--torch_only", f"--size={args.size}",
               f"--batch={args.batch}", f"--steps={args.steps}"]
        if subprocess.run(cmd).returncode:
            return 1
        print(flush=True)
    bench_args = train_bench.parse_args([f"--batch={args.batch}", f"--flags={args.flags}",
                                         f"--xla_flags={args.xla_flags}"])
    flags = train_bench.set_xla_flags(bench_args)

    import jax

    compiled, state, batch, _ = train_bench.compile_cxrjax_step(bench_args, args.size, args.xla_pool, args.xla_conv)
    instrs, comps = parse_hlo(compiled.as_text())
    kernels = kernel_shapes(instrs)
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])

    walls = []
    with tempfile.TemporaryDirectory(prefix="cxrjax-step-profile-") as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=False):
            for _ in range(args.steps):
                t = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics["loss"])
                walls.append(time.perf_counter() - t)
        events = thunk_durations(trace_events(log_dir), instrs)
    shared_time(events)
    per_group = collections.defaultdict(lambda: [0.0, 0.0])  # group -> [us, flops]
    per_instr = collections.defaultdict(float)
    for e in events:
        group, flops = classify(e["name"], instrs, comps, kernels)
        per_group[group][0] += e["dur"]
        per_group[group][1] += flops
        per_instr[e["name"]] += e["dur"]
    n = args.steps
    wall = statistics.median(walls)
    total = sum(us for us, _ in per_group.values()) / n / 1e3
    print(f"MoCo step, ResNet-18 width 64, batch {args.batch}, {args.size} px, float32"
          f"{', XLA max-pool gradient' if args.xla_pool else ''}{', XLA convolutions' if args.xla_conv else ''}; "
          f"{n} traced steps; "
          f"XLA_FLAGS={flags!r}")
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; wall {wall * 1e3:.0f} ms/step (median), "
          f"instructions busy {total:.0f} ms/step, {len(per_instr)} distinct executed")
    print_groups(per_group, n, total)
    if args.top:
        print(f"\nslowest {args.top} instructions (ms/step, group, shape):")
        for name, us in sorted(per_instr.items(), key=lambda kv: -kv[1])[:args.top]:
            group, flops = classify(name, instrs, comps, kernels)
            ins = instrs[name]
            print(f"  {us / n / 1e3:8.1f}  {group:32s} {name:40s} {ins['opcode']:12s} {list(ins['shape'])}"
                  + (f"  {flops / 1e9 / (us / n / 1e6):.1f} GFLOP/s" if flops else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
