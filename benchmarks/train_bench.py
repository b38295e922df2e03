"""MoCo v2 train-step throughput: cxrjax's real step vs the same step in PyTorch, on CPU.

Both sides run one MedAug/MoCo v2 step on the same fixed synthetic batch (uint8 query and key
images, B x S x S x 1): ResNet-18 (1 input channel, width 64) + MLP head 512-512-128 for the query
and the key encoder, EMA of the key encoder, key forward without gradient under shuffle BN over G
groups, InfoNCE with a queue of K keys (logits [q.k+, q.queue] / T, cross-entropy), Adam step
with weight decay, enqueue. float32, the same number of threads. Throughput is QUERY images/s
(B per step; each step also encodes B key images without gradient); step time is the median over
the timed steps (robust to other load on a shared machine), compile / warm-up excluded. The sides
take turns step by step (`race`), so a machine that speeds up or slows down during the run does so
for every side alike.

    python benchmarks/train_bench.py                        # 224 and 128 px, batch 16 (~3.5 min on 2 cores)
    python benchmarks/train_bench.py --skip=torch --xla_pool  # cxrjax's CPU max-pool gradient vs XLA's
    python benchmarks/train_bench.py --sizes=224 --steps=5  # quicker
    python benchmarks/train_bench.py --sweep=128            # cxrjax alone under each XLA flag set (subprocesses)

cxrjax: `cxrjax.train.contrastive` builds the step exactly as `train_and_evaluate` does (config from
`default_config()`, `build_encoders`, `optimizer`, `make_train_step`, jitted with the trainer's
shardings and the state donated, compiled ahead of time); XLA's FLOPs per step come from
`compiled.cost_analysis()`.

PyTorch (optional dependency, `pip install cxrjax[torch]`): a torchvision-layout ResNet-18 (the
reference model of tests/test_resnet.py, torchvision itself is not needed). Shuffle BN is emulated
as cxrjax computes it: one encoder call on the whole (permuted) batch whose BatchNorm layers
normalise each of the G contiguous groups of B/G examples with that group's statistics (the
query encoder too, as cxrjax and per-GPU BN in the reference MoCo do); the permutation sends every
key to another group than its query's, as `moco.permute_for_shuffle_bn`. The faster of NCHW and
channels_last is reported (both are measured unless --torch_layout is given).

XLA flags: the set named by --flags (default: the fastest measured on this machine, see FLAG_SETS)
is put into XLA_FLAGS before JAX is imported, and printed; --xla_flags adds more.

Measured on 2 AMD EPYC cores (AVX2; shared machine, jaxlib 0.10.2, torch 2.13.0), batch 16, 10 steps per
side taking turns, four runs 2026-11-30 21:37-22:16 UTC (docs/cpu_step.md has the profile):
  224 px: cxrjax 7.70-8.49 img/s (1.9 s/step, 206 GFLOP/step), torch 7.63-8.64 (channels_last) -> 0.98-1.01x
  128 px: cxrjax 21.4-25.0 img/s, torch 22.8-25.4 (channels_last, BN split)               -> 0.94-0.99x
  XLA's default YNNPACK convolutions are 1.5x (128 px) to 2x (224 px) slower than its Eigen ones,
  hence the default --flags=eigen_conv. --xla_pool adds cxrjax with the stem max-pool's gradient left to
  XLA's select-and-scatter (1.03-1.06x slower: what cxrjax/models/pooling.py lowers otherwise on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Named XLA flag sets (the names are checked against this jaxlib: an unknown flag aborts the process).
FLAG_SETS = {
    "none": "",  # jaxlib 0.10.2 defaults: convolutions already run as YNNPACK fusions
    "eigen_conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",  # XLA's Eigen convolutions
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",  # no YNNPACK fusion at all
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=+individual_dot",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=+individual_dot",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "concurrency_sched": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "eigen_1thread": "--xla_cpu_multi_thread_eigen=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",  # reassociation: not the same numerics, never the default
}
DEFAULT_FLAGS = "eigen_conv"  # measured fastest here, see the module docstring


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="global batch (MedAug: 16)")
    p.add_argument("--sizes", default="224,128", help="comma list of image sides in px")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side and size")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--queue", type=int, default=4096, help="MoCo queue size K (multiple of --batch)")
    p.add_argument("--groups", type=int, default=4, help="shuffle-BN groups G (divides --batch)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads; XLA's CPU client uses every core it is given")
    p.add_argument("--flags", default=DEFAULT_FLAGS, choices=sorted(FLAG_SETS), help="named XLA flag set")
    p.add_argument("--xla_flags", default="", help="extra XLA flags (appended)")
    p.add_argument("--torch_layout", default="both", choices=("both", "nchw", "channels_last"))
    p.add_argument("--torch_bn", default="both", choices=("both", "split", "loop"),
                   help="torch shuffle-BN emulation: BN layers split the batch into G groups (split), or the "
                        "encoder runs once per group of B/G images (loop, as one GPU each in the reference MoCo)")
    p.add_argument("--skip", default="", help="comma list of sides to skip: cxrjax,torch")
    p.add_argument("--sweep", default="", help="SIZE: time cxrjax alone under every flag set, then exit")
    p.add_argument("--xla_pool", action="store_true",
                   help="also time cxrjax with the stem max-pool's gradient left to XLA (select-and-scatter; "
                        "cxrjax lowers it otherwise on the CPU, see cxrjax/models/pooling.py)")
    p.add_argument("--xla_conv", action="store_true",
                   help="also time cxrjax with every convolution left to XLA (cxrjax computes some as matmuls "
                        "on the CPU, see cxrjax/models/conv.py)")
    p.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    return p.parse_args(argv)


def set_xla_flags(args) -> str:
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), FLAG_SETS[args.flags], args.xla_flags]))
    os.environ["XLA_FLAGS"] = flags
    return flags


# ----------------------------------------------------------------------------------------------
# The synthetic batch (same values for both sides)


def make_batch(batch: int, size: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8)
    ids = lambda hi: rng.integers(0, hi, (batch,), dtype=np.int32)
    return {"query": img(), "key": img(), "patient": ids(1000), "study": ids(5), "laterality": ids(2),
            "key_study": ids(5), "key_laterality": ids(2)}


def race(steps: dict, rounds: int, warmup: int) -> dict[str, list[tuple[float, int, float]]]:
    """(wall seconds, page faults, system CPU seconds) of each timed call of every step() (each must block
    until its result is ready).

    The contenders take turns, one step each per round (the order rotates every round), so a shared
    machine that slows down or speeds up during the run slows every side alike; warm-up rounds first.
    Only one side runs at a time, so the process's page faults and kernel time during a call are mostly
    that side's: memory the allocator maps anew each step is faulted in page by page (docs/cpu_step.md).
    (Counted over all threads: work a side leaves running after its result is ready, e.g. freeing its
    buffers, lands in the next call, which the rotating order gives to every side alike.)"""
    import resource

    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            before = resource.getrusage(resource.RUSAGE_SELF)
            t = time.perf_counter()
            steps[name]()
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_SELF)
            times[name].append((wall, after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt,
                                after.ru_stime - before.ru_stime))
    return times


def summary(calls: list[tuple[float, int, float]], batch: int) -> dict:
    walls = [c[0] for c in calls]
    med = statistics.median(walls)
    return {"img_per_s": batch / med, "ms_per_step": 1e3 * med, "ms_min": 1e3 * min(walls),
            "page_faults_per_step": statistics.median(c[1] for c in calls),
            "sys_ms_per_step": 1e3 * statistics.median(c[2] for c in calls)}


def memory_note(r: dict) -> str:
    """Page faults and kernel CPU time per step (medians), for a result row."""
    return f"{r['page_faults_per_step']:.0f} page faults/step, sys {r['sys_ms_per_step']:.0f} ms/step"


# ----------------------------------------------------------------------------------------------
# cxrjax: the trainer's own step


def cxrjax_config(args, size: int):
    from cxrjax.train import contrastive

    c = contrastive.default_config()
    c.model.update(arch="resnet18", width=64, init="random", dtype="float32")
    c.batch_size = args.batch
    c.augment.size = size
    c.moco.update(queue_size=args.queue, shuffle_bn=True, shuffle_bn_groups=args.groups)
    c.total_steps = 1000
    return c


def compile_cxrjax_step(args, size: int, xla_pool: bool = False, xla_conv: bool = False):
    """(compiled step, state, batch, compile seconds): the trainer's step, compiled ahead of time.
    `xla_pool`: the stem max-pool differentiated by XLA (select-and-scatter) instead of cxrjax's CPU lowering.
    `xla_conv`: every convolution XLA's, none lowered as a matmul on the CPU (cxrjax/models/conv.py)."""
    import contextlib
    from unittest import mock

    import jax

    from cxrjax.data import pipeline
    from cxrjax.models import conv as conv_lib
    from cxrjax.models import pooling
    from cxrjax.train import contrastive as ct
    from cxrjax.train import mesh as mesh_lib

    config = cxrjax_config(args, size)
    mesh = ct.make_mesh(config)
    setup = ct.build_training(config, mesh, config.total_steps)  # exactly the trainer's state and step
    batch_sharding = pipeline.batch_sharding(mesh, mesh_lib.BATCH_AXES)  # as the trainer's iterator
    batch = jax.device_put(make_batch(args.batch, size), batch_sharding)

    t = time.perf_counter()
    with contextlib.ExitStack() as patches:  # the model is traced by lower(): the patches hold only then
        if xla_pool:  # autodiff of reduce-window: select-and-scatter
            patches.enter_context(mock.patch.object(pooling, "max_pool_3x3_s2", pooling._max_pool_xla))
        if xla_conv:
            patches.enter_context(conv_lib.xla_convolutions())
        compiled = setup.train_step.lower(setup.state, batch).compile()
    return compiled, setup.state, batch, time.perf_counter() - t


def cxrjax_step(args, size: int, xla_pool: bool = False, xla_conv: bool = False):
    """(step, info): one call runs the trainer's compiled step on the fixed batch and blocks."""
    import jax

    from cxrjax.train import contrastive as ct

    compiled, state, batch, compile_s = compile_cxrjax_step(args, size, xla_pool, xla_conv)
    info = {"side": "cxrjax" + (", XLA pool" if xla_pool else "") + (", XLA conv" if xla_conv else ""),
            "size": size, "batch": args.batch,
            "compile_s": compile_s, "gflop_per_step": ct._flops(compiled) / 1e9,
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,  # XLA's temporaries, one block
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        info["loss"] = float(jax.block_until_ready(metrics["loss"]))

    return step, info


# ----------------------------------------------------------------------------------------------
# PyTorch: the same MoCo v2 step


def torch_encoder(groups: int):
    """torchvision-layout ResNet-18 (1 channel, features) + MoCo v2 head, BN per group of the batch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GroupBatchNorm2d(nn.BatchNorm2d):
        """Train mode: each of `groups` contiguous chunks of the batch is normalised with its own
        statistics (cxrjax's `BatchNorm(num_groups=G)`). The running statistics are updated by each
        group's call (same cost as cxrjax's mean of the group statistics; they do not enter the step)."""

        def forward(self, x):
            if not self.training or groups == 1:
                return super().forward(x)
            return torch.cat([F.batch_norm(c, self.running_mean, self.running_var, self.weight, self.bias, True,
                                           self.momentum, self.eps) for c in x.chunk(groups)])

    class BasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = GroupBatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = GroupBatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + idt)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
            self.bn1 = GroupBatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(64, 2)
            self.layer2 = self._make_layer(128, 2, 2)
            self.layer3 = self._make_layer(256, 2, 2)
            self.layer4 = self._make_layer(512, 2, 2)
            self.head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, 128))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def _make_layer(self, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                           GroupBatchNorm2d(planes))
            layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes
            layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return F.normalize(self.head(x.mean((2, 3))), dim=1)

    return Encoder()


def cross_group_permutation(gen, n: int, groups: int):
    """torch twin of `moco.permute_for_shuffle_bn`: (perm, inverse), every key lands in another group."""
    import torch

    s = n // groups
    slots = torch.stack([torch.randperm(s, generator=gen) for _ in range(groups)])  # (G, s)
    offsets = torch.randint(1, groups, (s,), generator=gen) if groups > 1 else torch.zeros(s, dtype=torch.long)
    dest_group = (torch.arange(groups)[:, None] + offsets[slots]) % groups
    inverse = (dest_group * s + slots).reshape(n)
    perm = torch.empty_like(inverse)
    perm[inverse] = torch.arange(n)
    return perm, inverse


def torch_step(args, size: int, layout: str, bn: str):
    """(step, info): one call runs the PyTorch MoCo v2 step (`loss.item()` waits for it)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cxrjax.data import augment

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    bn_groups = args.groups if bn == "split" else 1
    enc_q = torch_encoder(bn_groups).to(memory_format=fmt).train()
    enc_k = torch_encoder(bn_groups).to(memory_format=fmt).train()
    if bn == "split":
        encode_q, encode_k = enc_q, enc_k
    else:  # one call per group: BN statistics of that group only
        encode_q = lambda x: torch.cat([enc_q(c) for c in x.chunk(args.groups)])
        encode_k = lambda x: torch.cat([enc_k(c) for c in x.chunk(args.groups)])
    enc_k.load_state_dict(enc_q.state_dict())
    for p in enc_k.parameters():
        p.requires_grad_(False)
    q_params, k_params = list(enc_q.parameters()), list(enc_k.parameters())
    opt = torch.optim.Adam(q_params, lr=1e-4, weight_decay=1e-4, foreach=True)  # MedAug: Adam 1e-4, wd 1e-4
    momentum, temperature, K = 0.999, 0.2, args.queue
    queue = F.normalize(torch.randn(K, 128), dim=1)
    q_meta = torch.full((K, 3), -1, dtype=torch.int32)  # patient, study, laterality (as cxrjax's queue)
    ptr = [0]
    gen = torch.Generator().manual_seed(0)
    b = make_batch(args.batch, size)
    scale, shift = 1.0 / (255.0 * augment.CXR_STD), augment.CXR_MEAN / augment.CXR_STD
    query_u8 = torch.from_numpy(b["query"]).permute(0, 3, 1, 2)  # (B, 1, S, S) view of the NHWC bytes
    key_u8 = torch.from_numpy(b["key"]).permute(0, 3, 1, 2)
    meta = torch.from_numpy(np.stack([b["patient"], b["key_study"], b["key_laterality"]], 1))

    def step():
        x_q = (query_u8.float() * scale - shift).contiguous(memory_format=fmt)
        x_k = (key_u8.float() * scale - shift).contiguous(memory_format=fmt)
        n = x_k.shape[0]
        with torch.no_grad():
            torch._foreach_mul_(k_params, momentum)  # EMA first, then the keys (reference MoCo)
            torch._foreach_add_(k_params, q_params, alpha=1 - momentum)
            perm, inverse = cross_group_permutation(gen, n, args.groups)
            k = encode_k(x_k[perm])[inverse]
        q = encode_q(x_q)
        l_pos = (q * k).sum(1, keepdim=True)
        l_neg = q @ queue.T
        logits = torch.cat([l_pos, l_neg], 1) / temperature
        loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            queue[ptr[0]:ptr[0] + n] = k
            q_meta[ptr[0]:ptr[0] + n] = meta
            ptr[0] = (ptr[0] + n) % K
        step.loss = loss.item()

    def timed_step():
        step()
        info["loss"] = step.loss

    info = {"side": "torch", "layout": layout, "bn": bn, "size": size, "batch": args.batch,
            "threads": torch.get_num_threads()}
    return timed_step, info


# ----------------------------------------------------------------------------------------------


def sweep(args) -> None:
    """cxrjax alone at one size under every flag set, each in its own process (flags are read once)."""
    size = int(args.sweep)
    print(f"XLA flag sets, cxrjax MoCo step, {size} px, batch {args.batch}, median of {args.steps} steps:")
    for name in FLAG_SETS:
        cmd = [sys.executable, __file__, f"--sizes={size}", f"--batch={args.batch}", f"--steps={args.steps}",
               f"--warmup={args.warmup}", f"--queue={args.queue}", f"--groups={args.groups}", f"--flags={name}",
               "--skip=torch", "--json"] + ([f"--xla_flags={args.xla_flags}"] if args.xla_flags else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode or not rows:
            print(f"  {name:17s} FAILED: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
            continue
        x = rows[0]
        print(f"  {name:17s} {x['img_per_s']:7.2f} img/s  {x['ms_per_step']:8.1f} ms/step (min {x['ms_min']:7.1f})  "
              f"{x['gflop_per_s']:6.1f} GFLOP/s  compile {x['compile_s']:5.1f} s   [{FLAG_SETS[name] or '-'}]",
              flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.sweep:
        return sweep(args)
    flags = set_xla_flags(args)  # before JAX is imported
    sizes = [int(s) for s in args.sizes.split(",") if s]
    skip = set(filter(None, args.skip.split(",")))
    if args.queue % args.batch or args.batch % args.groups:
        raise SystemExit(f"--queue ({args.queue}) must be a multiple of --batch ({args.batch}), "
                         f"and --batch a multiple of --groups ({args.groups})")
    layouts = ["nchw", "channels_last"] if args.torch_layout == "both" else [args.torch_layout]
    bns = ["split", "loop"] if args.torch_bn == "both" else [args.torch_bn]
    variants = [(lay, bn) for lay in layouts for bn in bns]
    if "torch" not in skip:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed (pip install cxrjax[torch]): cxrjax side only", file=sys.stderr)
            skip.add("torch")
    say = (lambda r: print(json.dumps(r), flush=True)) if args.json else (lambda r: None)
    log = (lambda s: None) if args.json else (lambda s: print(s, flush=True))

    import jax

    log(f"MoCo v2 step, ResNet-18 width 64 + head 512-512-128, batch {args.batch}, queue {args.queue}, "
        f"shuffle-BN groups {args.groups}, float32; images/s = query images (B per step)")
    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} cores; "
        f"XLA_FLAGS={flags!r} (set {args.flags!r})")
    rows = []
    for size in sizes:
        row = {"size": size}
        steps, infos = {}, {}
        if "cxrjax" not in skip:
            steps["cxrjax"], infos["cxrjax"] = cxrjax_step(args, size)
            if args.xla_pool:
                steps["cxrjax, XLA pool"], infos["cxrjax, XLA pool"] = cxrjax_step(args, size, xla_pool=True)
            if args.xla_conv:
                steps["cxrjax, XLA conv"], infos["cxrjax, XLA conv"] = cxrjax_step(args, size, xla_conv=True)
        if "torch" not in skip:
            for layout, bn in variants:
                name = f"torch {layout}/{bn}"
                steps[name], infos[name] = torch_step(args, size, layout, bn)
        times = race(steps, args.steps, args.warmup)
        results = {name: {**infos[name], **summary(times[name], args.batch)} for name in steps}
        gf = results["cxrjax"]["gflop_per_step"] if "cxrjax" in results else 0.0
        for name, r in results.items():
            say(r)
            if name.startswith("cxrjax"):
                log(f"  {name} {size:4d}px: {r['img_per_s']:7.2f} img/s, {r['ms_per_step']:8.1f} ms/step "
                    f"(min {r['ms_min']:.1f}), {gf:.1f} GFLOP/step (XLA), {gf * 1e3 / r['ms_per_step']:.1f} GFLOP/s, "
                    f"compile {r['compile_s']:.1f} s, loss {r['loss']:.3f}; {memory_note(r)}, "
                    f"temporaries {r['temp_mib']:.0f} MiB")
            else:
                log(f"  torch  {size:4d}px {r['layout']:13s} BN {r['bn']:5s}: {r['img_per_s']:7.2f} img/s, "
                    f"{r['ms_per_step']:8.1f} ms/step (min {r['ms_min']:.1f})"
                    + (f", {gf * 1e3 / r['ms_per_step']:.1f} GFLOP/s at XLA's count" if gf else "")
                    + f", {r['threads']} threads, loss {r['loss']:.3f}; {memory_note(r)}")
        if "cxrjax" in results:
            row["cxrjax"] = results["cxrjax"]
        torch_rows = [r for name, r in results.items() if name.startswith("torch")]
        if "cxrjax, XLA pool" in results and "cxrjax" in results:
            log(f"  cxrjax with its CPU max-pool gradient / with XLA's: "
                f"{results['cxrjax']['img_per_s'] / results['cxrjax, XLA pool']['img_per_s']:.2f}x")
        if "cxrjax, XLA conv" in results and "cxrjax" in results:
            log(f"  cxrjax with its CPU matmul convolutions / with XLA's: "
                f"{results['cxrjax']['img_per_s'] / results['cxrjax, XLA conv']['img_per_s']:.2f}x")
        if torch_rows:
            row["torch"] = max(torch_rows, key=lambda r: r["img_per_s"])
        del steps, infos
        rows.append(row)
    if args.json:
        return
    print(f"\n{'size':>5} {'batch':>5} {'cxrjax img/s':>13} {'torch img/s':>12} {'torch variant':>20} {'ratio':>7}")
    for row in rows:
        c = row.get("cxrjax", {}).get("img_per_s")
        t = row.get("torch", {}).get("img_per_s")
        print(f"{row['size']:5d} {args.batch:5d} {c or float('nan'):13.2f} {t or float('nan'):12.2f} "
              f"{(row['torch']['layout'] + '/' + row['torch']['bn']) if 'torch' in row else '-':>20} {(c / t if c and t else float('nan')):6.2f}x")
    print(f"(ratio = cxrjax / the fastest torch variant; medians of {args.steps} steps per side, the sides taking "
          f"turns step by step; XLA_FLAGS={flags!r})")


if __name__ == "__main__":
    main()
