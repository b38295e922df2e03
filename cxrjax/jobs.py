"""The jobs `cxrjax.main` runs: config.job -> its trainer module, and the check that a config file sets
only keys its job has (the command-line module `cxrjax.main` is a thin shell over this)."""

from __future__ import annotations

import importlib

from cxrjax import cli

# config.job -> the module whose default_config() lists the job's keys and whose
# train_and_evaluate(config, workdir) runs it (imported when chosen: a job's dependencies are loaded
# only by its runs).
JOBS = {"moco": "cxrjax.train.contrastive", "mvlm": "cxrjax.train.mvlm"}
# Keys whose value is a free-form mapping: their own keys are checked by the code that reads them
# (vl_pipeline checks data.shares' kinds), not against default_config().
CONFIG_MAPS = {"mvlm": ("data.shares",)}


def job_module(config):
    """The trainer module of config.job (a one-line UsageError if there is none)."""
    job = config.get("job")
    if job not in JOBS:
        raise cli.UsageError(f"config.job={job!r}; expected one of {tuple(JOBS)}")
    try:
        return importlib.import_module(JOBS[job])
    except ModuleNotFoundError as e:
        if e.name != JOBS[job]:
            raise
        raise cli.UsageError(f"config.job={job!r} needs {JOBS[job]}, which this installation does not have "
                             "yet") from None


def check_config_keys(config, trainer, source: str) -> None:
    """A config FILE may only set keys its job's default_config() has (a misspelt key would otherwise
    be silently ignored: the run would use the default)."""
    unknown = cli.unknown_keys(config, trainer.default_config(), maps=CONFIG_MAPS.get(config.job, ()))
    if unknown:
        shown = "; ".join(f"config.{k}" + (f" (did you mean config.{best}?)" if best else "") for k, best in unknown)
        raise cli.UsageError(f"{source} sets {shown}, which a {config.job} run does not have")
