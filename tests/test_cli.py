"""Every user mistake on `python -m cxrjax.main` is ONE line on stderr, no traceback, a non-zero exit
(2 for the command line and config files), run as users run it (subprocesses). None of these gets as
far as creating a JAX backend, so each costs only the imports."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MOCO = str(REPO / "configs" / "moco_patient.py")


def _main(*args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "cxrjax.main", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def _one_line_error(r, *expected, code=2):
    """The run failed with exit `code` and printed exactly one line on stderr, containing `expected`."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("cxrjax: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_unknown_override_key_names_the_closest_key(tmp_path):
    r = _main(f"--config={MOCO}:demo", f"--workdir={tmp_path}", "--config.moco.queue_sise=5")
    _one_line_error(r, "--config.moco.queue_sise", "did you mean moco.queue_size?")
    r = _main(f"--config={MOCO}:demo", f"--workdir={tmp_path}", "--config.mocco.queue_size=5")
    _one_line_error(r, "no key 'mocco.queue_size'", "did you mean moco.queue_size?")
    r = _main(f"--config={MOCO}:demo", f"--workdir={tmp_path}", "--noconfig.moco.shufle_bn")
    _one_line_error(r, "did you mean moco.shuffle_bn?")


def test_unknown_variant(tmp_path):
    r = _main(f"--config={MOCO}:dmeo", f"--workdir={tmp_path}")
    _one_line_error(r, "unknown config variant 'dmeo'", "known: demo")


def test_wrong_value_type(tmp_path):
    r = _main(f"--config={MOCO}:demo", f"--workdir={tmp_path}", "--config.moco.queue_size=abc")
    _one_line_error(r, "--config.moco.queue_size=abc: expected int")


def test_positional_arguments(tmp_path):
    r = _main(f"--config={MOCO}:demo", f"--workdir={tmp_path}", "config.optim.lr=0.1")
    _one_line_error(r, "unexpected arguments ['config.optim.lr=0.1']", "--config.KEY=VALUE")


def test_missing_config_file_and_missing_flags(tmp_path):
    r = _main("--config=configs/nope.py:demo", f"--workdir={tmp_path}", cwd=tmp_path)
    _one_line_error(r, "config file configs/nope.py does not exist")
    r = _main(f"--config={MOCO}:demo")
    _one_line_error(r, "--workdir is required")
    r = _main(f"--workdir={tmp_path}")
    _one_line_error(r, "--config is required")
    r = _main(f"--config={MOCO}:demo", f"--wrokdir={tmp_path}")
    _one_line_error(r, "wrokdir", "workdir")


def test_config_file_with_a_key_the_job_does_not_have(tmp_path):
    """Issue 13.10: a misspelt key in a config FILE is an error, not a silently ignored setting."""
    cfg = tmp_path / "typo.py"
    cfg.write_text("from cxrjax.train.contrastive import apply_variants, default_config\n"
                   "def get_config(arg=None):\n    c = apply_variants(default_config(), arg)\n"
                   "    c.moco.queue_sise = 64\n    c.optimm = {'lr': 1.0}\n    return c\n")
    r = _main(f"--config={cfg}:demo", f"--workdir={tmp_path / 'w'}")
    _one_line_error(r, f"{cfg}:demo sets config.moco.queue_sise (did you mean config.moco.queue_size?)",
                    "config.optimm (did you mean config.optim?)", "which a moco run does not have")
    assert not (tmp_path / "w").exists()  # refused before anything was written

    mvlm = tmp_path / "mvlm_typo.py"
    mvlm.write_text("from cxrjax.train.mvlm import default_config\n"
                    "def get_config(arg=None):\n    c = default_config()\n    c.optim.warmup = 5\n    return c\n")
    r = _main(f"--config={mvlm}", f"--workdir={tmp_path / 'm'}")
    _one_line_error(r, "sets config.optim.warmup (did you mean config.optim.warmup_steps?)", "a mvlm run")


def test_broken_config_file_and_unknown_job(tmp_path):
    cfg = tmp_path / "broken.py"
    cfg.write_text("def get_config(arg=None):\n    return default_config()\n")
    r = _main(f"--config={cfg}", f"--workdir={tmp_path / 'w'}")
    _one_line_error(r, f"{cfg}:2: NameError", "default_config")
    job = tmp_path / "job.py"
    job.write_text("from cxrjax.train.contrastive import default_config\n"
                   "def get_config():\n    c = default_config()\n    c.job = 'simclr'\n    return c\n")
    r = _main(f"--config={job}", f"--workdir={tmp_path / 'w'}")
    _one_line_error(r, "config.job='simclr'", "'moco'", "'mvlm'")


@pytest.mark.parametrize("spec", ["moco_patient.py", "moco_patient.py:demo,sgd,crop,bf16", "moco_instance.py:demo",
                                  "moco_medaug.py:study-different_lat-any,hardneg", "mvlm_paired.py:demo",
                                  "mvlm_mixed.py", "mvlm_mixed.py:demo,conv"])
def test_every_shipped_config_passes_the_key_check(spec):
    """No false alarms: the configs in configs/ set only keys their job has (data.shares of the MVLM
    configs is a free-form mapping, checked by vl_pipeline)."""
    from cxrjax import cli, jobs

    config = cli.load_config_file(str(REPO / "configs" / spec))
    jobs.check_config_keys(config, jobs.job_module(config), spec)


def test_unknown_keys_reports_each_new_section_once():
    import ml_collections as mlc

    from cxrjax import cli

    ref = mlc.ConfigDict({"optim": {"lr": 0.1, "warmup_steps": 0}, "data": {"shares": {"paired": 1.0}}})
    cfg = mlc.ConfigDict({"optim": {"lr": 0.1, "warmup_stpes": 0}, "optimizer": {"lr": 1, "b1": 2},
                          "data": {"shares": {"paired": 0.5, "text": 0.5}}})
    assert cli.unknown_keys(cfg, ref, maps=("data.shares",)) == [("optim.warmup_stpes", "optim.warmup_steps"),
                                                                 ("optimizer", "optim")]
    assert cli.unknown_keys(cfg, ref) == [("data.shares.text", None), ("optim.warmup_stpes", "optim.warmup_steps"),
                                          ("optimizer", "optim")]


@pytest.mark.parametrize("how", ["--require_accelerator", "--config.require_accelerator=True"])
def test_a_required_accelerator_that_is_missing_stops_the_run(tmp_path, how):
    """JAX_PLATFORMS=cpu here: asking for an accelerator is one line and exit 1, before any data is read."""
    r = _main(f"--config={MOCO}:demo", f"--workdir={tmp_path / 'w'}", how)
    _one_line_error(r, "accelerator", code=1)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module", ["cxrjax.eval.mvlm_heldout", "cxrjax.eval.regeneration", "cxrjax.eval.retrieval"])
def test_masked_vision_language_eval_commands_say_one_line(tmp_path, module):
    """The MVLM eval commands go through the same parser: a stray argument or an unknown flag is one line
    and exit 2; a folder that is not a run is one line and exit 1 (it names the config.json it looked for)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", module, *a], capture_output=True, text=True, env=env,
                                    timeout=300)
    for args, says, code in (([f"--checkpoint={tmp_path}", "stray"], "unexpected arguments ['stray']", 2),
                             ([f"--checkpoint={tmp_path}", "--splt=test"], "splt", 2),
                             ([f"--checkpoint={tmp_path}"], f"{tmp_path}/config.json not found", 1)):
        r = run(*args)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert lines[0].startswith(f"{module}: error: ") and says in lines[0], lines[0]
