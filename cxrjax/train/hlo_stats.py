"""What each device computes and communicates in a compiled step, read from XLA's own HLO.

"Same loss on 1 and 8 devices" says a sharded step is right, not that it splits the work: a step
that runs the whole batch on every device passes it too. This module reads the per-device program
XLA built and reports, per device:

* every convolution and matmul with its operand shapes and the number of examples it runs on (the
  examples dimension of its activation operand: NHWC dim 0 for forward, input-gradient and weight-
  gradient convolutions alike, read after SPMD partitioning and before XLA:CPU's layout rewrites,
  which transpose weight-gradient convolutions);
* every collective (all-reduce, all-gather, all-to-all, collective-permute, reduce-scatter) with the
  bytes of its per-device result, as the optimised program runs them (after XLA combined them);
* XLA's FLOP count for the compiled program (per device).

`step_report(lowered)` compiles a `jax.jit(...).lower(...)` result once with the partitioned module
dumped to a temporary folder; `benchmarks/hlo_report.py` prints it for the MoCo and MVLM steps and
tests assert on it (tests/test_hlo.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import tempfile
from pathlib import Path

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
# "  %name = TYPE opcode(operands), attributes"  (TYPE may be a tuple)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: str
    dims: tuple[int, ...]

    @property
    def bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype] * math.prod(self.dims)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str                   # one of COLLECTIVES
    shapes: tuple[Shape, ...]   # per-device result (several when XLA combined collectives)
    op_name: str

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shapes)


@dataclasses.dataclass(frozen=True)
class Contraction:
    kind: str                   # "convolution" or "dot"
    out: Shape
    lhs: Shape
    rhs: Shape
    labels: str                 # convolution dim_labels, or the dot's contracting dims
    op_name: str

    @property
    def examples(self) -> int:
        """Examples this op runs on: the activation's (lhs) leading dimension. Forward and input-
        gradient convolutions label it 'b'; JAX's weight-gradient convolutions contract over it
        (label 'f', output labelled like the kernel), so the leading dim is the one to read."""
        return self.lhs.dims[0] if self.lhs.dims else 1

    @property
    def is_weight_gradient(self) -> bool:
        return self.kind == "convolution" and "->" in self.labels and not self.labels.split("->")[1].startswith("b")


@dataclasses.dataclass
class StepReport:
    flops: float                       # XLA's count for the compiled per-device program
    contractions: list[Contraction]
    collectives: list[Collective]

    @property
    def convolutions(self) -> list[Contraction]:
        return [c for c in self.contractions if c.kind == "convolution"]

    def collective_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0) + c.bytes
        return out


def parse_shapes(text: str) -> tuple[Shape, ...]:
    return tuple(Shape(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(text))


def _instructions(hlo_text: str):
    """(name, result shapes, opcode, rest of line) for every instruction line."""
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            yield m.group(1), parse_shapes(m.group(2)), m.group(3), m.group(4)


def _operand_names(rest: str) -> list[str]:
    args = rest.split(")", 1)[0]  # operands end at the first ')' (they hold no parentheses)
    return re.findall(r"%([\w.\-]+)", args)


def parse_collectives(hlo_text: str) -> list[Collective]:
    out = []
    for _, shapes, opcode, rest in _instructions(hlo_text):
        kind = opcode.removesuffix("-start")
        if kind in COLLECTIVES and not opcode.endswith("-done"):
            m = _OP_NAME.search(rest)
            # async "-start" ops return (operand, result, ...) tuples: count the result half only
            if opcode.endswith("-start") and len(shapes) >= 2:
                shapes = shapes[len(shapes) // 2:]
            out.append(Collective(kind, shapes, m.group(1) if m else ""))
    return out


def parse_contractions(hlo_text: str) -> list[Contraction]:
    instrs = list(_instructions(hlo_text))
    shape_of = {name: shapes[0] for name, shapes, _, _ in instrs if shapes}
    out = []
    for _, shapes, opcode, rest in instrs:
        if opcode not in ("convolution", "dot") or not shapes:
            continue
        ops = _operand_names(rest)
        inline = parse_shapes(rest.split(")", 1)[0])  # newer HLO prints operand types inline
        if len(inline) >= 2:
            lhs, rhs = inline[0], inline[1]
        elif len(ops) >= 2 and ops[0] in shape_of and ops[1] in shape_of:
            lhs, rhs = shape_of[ops[0]], shape_of[ops[1]]
        else:
            continue
        if opcode == "convolution":
            m = re.search(r"dim_labels=([\w>\-]+)", rest)
            labels = m.group(1) if m else ""
        else:
            labels = ", ".join(re.findall(r"(?:lhs|rhs)_(?:batch|contracting)_dims=\{[^}]*\}", rest))
        name = _OP_NAME.search(rest)
        out.append(Contraction(opcode, shapes[0], lhs, rhs, labels, name.group(1) if name else ""))
    return out


@contextlib.contextmanager
def _no_persistent_cache():
    """Compile for real: an executable loaded from the persistent compilation cache comes without the
    partitioned module XLA dumps while compiling (the dump options are not part of the cache key)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once per process whether to use the cache: ask again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def step_report(lowered) -> StepReport:
    """Compile `lowered` (a `jax.jit(f).lower(...)`) and read what each device computes and moves."""
    with tempfile.TemporaryDirectory(prefix="cxrjax-hlo-") as tmp, _no_persistent_cache():
        compiled = lowered.compile(compiler_options={"xla_dump_to": tmp,
                                                     "xla_dump_hlo_pass_re": "spmd-partitioning"})
        dumps = sorted(Path(tmp).glob("*after_spmd-partitioning*.txt"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise RuntimeError("XLA wrote no partitioned module (is the step jitted over a mesh?)")
        partitioned = dumps[-1].read_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return StepReport(flops=float((cost or {}).get("flops", 0.0)),
                      contractions=parse_contractions(partitioned),
                      collectives=parse_collectives(compiled.as_text()))


def format_report(report: StepReport, *, title: str = "") -> str:
    """A human-readable table: FLOPs, collectives with bytes, contractions grouped by examples."""
    lines = [title] if title else []
    lines.append(f"  XLA FLOPs per device per step: {report.flops / 1e9:.3f} GFLOP")
    lines.append(f"  collectives ({len(report.collectives)}), per-device result bytes:")
    for c in sorted(report.collectives, key=lambda c: -c.bytes):
        shapes = ", ".join(map(str, c.shapes[:4])) + (f", ... ({len(c.shapes)} arrays)" if len(c.shapes) > 4 else "")
        lines.append(f"    {c.kind:<19}{_fmt_bytes(c.bytes):>11}  {shapes}  [{_short(c.op_name)}]")
    groups: dict[tuple, int] = {}
    for c in report.contractions:
        kind = c.kind + (" (weight grad)" if c.is_weight_gradient else "")
        key = (kind, c.examples)
        groups[key] = groups.get(key, 0) + 1
    lines.append("  convolutions / matmuls by the number of examples they run on:")
    for (kind, ex), n in sorted(groups.items()):
        lines.append(f"    {n:4d} x {kind:<28} on {ex} examples")
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _short(op_name: str) -> str:
    return op_name.removeprefix("jit(train_step)/")[-60:]
