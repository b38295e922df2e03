"""Command-line parsing shared by cxrjax's entry points: every user mistake is one line, no traceback.

`run(main, prog=...)` is `absl.app.run` with a flags parser that turns each mistake a person makes on
the command line into one line on stderr and exit status 2 (the Unix convention for usage errors):

- an unknown `--config.KEY` override (with the closest existing key), a wrong value type, an unknown
  variant after the colon (the config file's own ValueError), a missing or broken config file;
- an unknown flag, a missing required flag, positional arguments.

The config file is loaded once here before absl parses the flags (the same `get_config(arg)` call
`ml_collections.config_flags` makes), so its problems are reported with the file's own words and the
overrides are checked against the real config. Errors of the run itself (bad data, a refused
checkpoint) are the entry point's business: `fail(prog, message, code=1)`.

`unknown_keys(config, reference)` is the check behind "a config key that does not exist is an error"
for config FILES (cxrjax.main compares a config file's keys with its job's `default_config()`).
"""

from __future__ import annotations

import difflib
import functools
import importlib.machinery
import os
import re
import sys
import traceback
from typing import Callable, Iterable

EXIT_USAGE = 2  # a mistake on the command line or in a config file (argparse's convention)
EXIT_ERROR = 1  # the run could not go on (data, checkpoint, NaN): the message says what to do


class UsageError(Exception):
    """A mistake the user can fix on the command line or in the config file."""


def fail(prog: str, message: str, code: int = EXIT_USAGE, *, label: str = "error"):
    """Print `prog: label: message` (one line) on stderr and exit with `code`."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{prog}: {label}: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run(main: Callable, *, prog: str, config_flag: str | None = "config") -> None:
    """`absl.app.run(main)` whose flag parsing reports mistakes in one line (see the module doc)."""
    from absl import app

    app.run(main, flags_parser=functools.partial(parse_flags, prog=prog, config_flag=config_flag))


def parse_flags(argv: list[str], *, prog: str, config_flag: str | None = "config") -> list[str]:
    """absl `flags_parser`: parse `argv` into absl's FLAGS; one line and exit 2 on any usage mistake."""
    from absl import flags

    config = None
    try:
        if config_flag is not None:
            config = check_config_overrides(argv, config_flag)
        rest = flags.FLAGS(argv)
    except UsageError as e:
        fail(prog, str(e))
    except flags.Error as e:
        fail(prog, _flag_error(str(e), config, config_flag))
    except (AttributeError, KeyError) as e:  # an override the pre-check could not see (e.g. a --flagfile)
        fail(prog, f"unknown config key: {_one_line(e)}")
    if len(rest) > 1:
        fail(prog, f"unexpected arguments {rest[1:]}: every option is a --flag"
                   + (f" (config overrides look like --{config_flag}.KEY=VALUE)" if config_flag else ""))
    return rest


# ----------------------------------------------------------------------------------------------
# The config file and its overrides


def check_config_overrides(argv: list[str], config_flag: str = "config"):
    """Load the config named by `--config=FILE[:ARG]` in `argv` and check that every
    `--config.KEY=...` override names an existing key. Returns the config (None without --config)."""
    spec = _flag_value(argv, config_flag)
    if spec is None:
        return None
    config = load_config_file(spec, flag=config_flag)
    for key in _override_keys(argv, config_flag):
        if not _has_path(config, key):
            raise UsageError(f"--{config_flag}.{key}: {config_flag} has no key {key!r}"
                             + _suggestion(key, _paths(config), prefix=""))
    return config


def load_config_file(spec: str, *, flag: str = "config"):
    """`get_config(ARG)` of the file in `spec` = 'FILE[:ARG]', as ml_collections' config_flags calls it;
    every failure becomes a one-line UsageError naming the file."""
    path, _, arg = spec.partition(":")
    if not path:
        raise UsageError(f"--{flag} is empty; give a config file, e.g. --{flag}=configs/moco_patient.py:demo")
    if not os.path.isfile(path):
        raise UsageError(f"--{flag}={spec}: config file {path} does not exist (paths are relative to "
                         f"{os.getcwd()})")
    try:
        module = importlib.machinery.SourceFileLoader(f"cxrjax_{flag}_file", path).load_module()
        if not hasattr(module, "get_config"):
            raise UsageError(f"{path} has no get_config() function: is it a cxrjax config file?")
        return module.get_config(*([arg] if ":" in spec else []))
    except UsageError:
        raise
    except ValueError as e:  # the config's own check: an unknown variant after the colon, a bad name
        raise UsageError(f"--{flag}={spec}: {_one_line(e)}") from None
    except Exception as e:  # a mistake inside the config file: say where
        where = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
        at = f"{path}:{where[-1].lineno}" if where else path
        raise UsageError(f"{at}: {type(e).__name__}: {_one_line(e)}") from None


def unknown_keys(config, reference, *, maps: Iterable[str] = ()) -> list[tuple[str, str | None]]:
    """Keys of `config` that `reference` does not have, each with the closest key `reference` has.

    `maps` are dotted keys whose value is a free-form mapping (e.g. the MVLM job's `data.shares`):
    their own keys are not checked here (the code that reads them checks them)."""
    ref_paths = _paths(reference)
    maps = tuple(maps)
    out = []
    for path in sorted(_paths(config)):
        if path in ref_paths or any(path.startswith(m + ".") for m in maps):
            continue
        parent = path.rpartition(".")[0]
        if parent and parent not in ref_paths and parent in {p for p, _ in out}:
            continue  # a whole new section: reported once, at its top
        out.append((path, _closest(path, ref_paths)))
    return out


def _paths(config, prefix: str = "") -> set[str]:
    """Every dotted key of a ConfigDict (sections and leaves)."""
    out = set()
    for k in config.keys():
        path = f"{prefix}{k}"
        out.add(path)
        value = config[k]
        if hasattr(value, "keys") and hasattr(value, "items"):
            out |= _paths(value, path + ".")
    return out


def _closest(key: str, candidates: set[str]) -> str | None:
    """The closest existing key: within the key's own section when that section exists (comparing the
    last names: 'queue_sise' -> 'queue_size'), else among all keys ('mocco.queue_size' -> 'moco.queue_size')."""
    parent, _, leaf = key.rpartition(".")
    if not parent or parent in candidates:
        siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == parent}
        match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        return siblings[match[0]] if match else None
    match = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def _suggestion(key: str, candidates: set[str], prefix: str) -> str:
    best = _closest(key, candidates)
    return f"; did you mean {prefix}{best}?" if best else ""


def _has_path(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not (hasattr(node, "keys") and part in node.keys()):
            return False
        node = node[part]
    return True


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of --name / -name in argv (last one wins, as in absl); None if absent."""
    value = None
    args = argv[1:]
    for i, a in enumerate(args):
        if a == "--":
            break
        for dash in ("--", "-"):
            if a.startswith(f"{dash}{name}="):
                value = a[len(dash) + len(name) + 1:]
            elif a == f"{dash}{name}" and i + 1 < len(args):
                value = args[i + 1]
    return value


def _override_keys(argv: list[str], name: str) -> list[str]:
    """The KEYs of every --name.KEY[=VALUE] / --noname.KEY in argv."""
    keys = []
    for a in argv[1:]:
        if a == "--":
            break
        m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)(=.*)?$", a)
        if m:
            keys.append(m.group(1))
    return keys


def _flag_error(message: str, config, config_flag: str | None) -> str:
    """absl's flag error text, with the expected type named for a --config.KEY override."""
    m = re.match(r"^flag --([\w.-]+)=(.*?): (.*)$", message.strip(), flags=re.S)
    if m and config is not None and config_flag and m.group(1).startswith(config_flag + "."):
        key = m.group(1)[len(config_flag) + 1:]
        expected = _type_name(config, key)
        if expected:
            return f"--{m.group(1)}={m.group(2)}: expected {expected} ({_one_line(m.group(3))})"
    m = re.search(r"Flag --([\w.-]+) must have a value other than None", message)
    if m:
        return f"--{m.group(1)} is required"
    return _one_line(message)


def _type_name(config, key: str) -> str | None:
    try:
        from ml_collections.config_flags import config_path

        t = config_path.get_type(key, config)
    except Exception:
        return None
    return getattr(t, "__name__", str(t))


def _one_line(e) -> str:
    text = str(e.args[0]) if isinstance(e, (KeyError, AttributeError)) and e.args else str(e)
    return " ".join(text.split())
