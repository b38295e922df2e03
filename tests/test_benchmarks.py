"""Every script in benchmarks/ runs end to end in a tiny setting, so a benchmark cannot rot unnoticed.

The scripts are globbed: a new one is covered the day it lands. Its tiny arguments come from a
module-level `SMOKE_ARGS = [...]` list of strings in the script itself (read with `ast`, not
imported; "{tmp}" stands for a scratch folder), or else from TINY_ARGS below; a script with
neither fails here with what to add. The numbers printed are not checked (they are not meaningful
at this size); the exit status and that something was printed are.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))

# Flags the scripts already have, chosen for seconds of work per part (every part still runs).
TINY_ARGS = {
    "prepare_bench.py": ["--images=12", "--size=32", "--workers=0"],
    "pipeline_bench.py": ["--data={tmp}", "--patients=8", "--prepared_size=32", "--workers=0", "--threads=1",
                          "--batch=2", "--seconds=0.05", "--repeats=1", "--warmup=1",
                          "--variants=png:host,raw:host,raw:device,raw:device:hostonly",
                          "--train", "--train_batch=2", "--train_steps=1", "--train_where=device"],
    "train_bench.py": ["--sizes=32", "--steps=1", "--warmup=0", "--batch=4", "--queue=8", "--groups=2",
                       "--threads=1", "--torch_layout=nchw", "--torch_bn=split", "--xla_pool", "--xla_conv"],
    "scaling_bench.py": ["--part=devices", "--devices=1,2", "--batch=4", "--steps=1", "--warmup=0"],
    "hlo_report.py": ["--devices=8", "--tiny"],
    "pair_stats.py": ["--rows=2000", "--queries=200", "--epochs=5"],
    "phantom_check.py": ["--probe", "--supervised", "--patients=40", "--seeds=1", "--epochs=1", "--batch=16",
                         "--size=32", "--pixels=8", "--fractions", "0.5", "1.0", "--cache={tmp}/phantom-check"],
}


def smoke_args(script: Path) -> list[str] | None:
    """SMOKE_ARGS from the script's source (a literal list of strings), else TINY_ARGS, else None."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SMOKE_ARGS" for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"{script.name}: SMOKE_ARGS"
            return value
    return TINY_ARGS.get(script.name)


def test_benchmarks_are_found():
    assert {"prepare_bench.py", "pipeline_bench.py", "train_bench.py", "scaling_bench.py"} <= {s.name for s in SCRIPTS}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_runs_in_a_tiny_setting(script, tmp_path):
    args = smoke_args(script)
    assert args is not None, (
        f"benchmarks/{script.name} has no tiny mode for this smoke test: add a module-level "
        "SMOKE_ARGS = ['--flag=value', ...] to it (arguments that make it run for seconds; '{tmp}' is a scratch "
        "folder), or an entry in TINY_ARGS in tests/test_benchmarks.py")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    # As a user runs it: no simulated-device count from the test session (the scripts set their own).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", CXRJAX_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert r.returncode == 0, f"{script.name} {' '.join(args)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.strip(), f"{script.name} printed nothing"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
