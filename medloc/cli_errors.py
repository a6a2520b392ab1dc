"""Configuration mistakes end a ``python -m medloc.train`` run with one clear message, no traceback.

``run_hydra_main(main)`` calls a ``@hydra.main`` function and turns these errors into one message on
stderr and exit code 2:

- a value the schema rejects (``medloc.config.ConfigError``: the dataclass checks and
  ``to_run_config``'s key check);
- an override Hydra cannot apply (``ConfigCompositionException``: an unknown key, a value of the wrong
  type; ``OverrideParseException``: a malformed override);
- a config group option that does not exist (``MissingConfigException``).

An unknown key names its node, the close matches (difflib) and that node's valid keys, and does not
suggest Hydra's ``+key=value`` (which would add a key the schema does not have). Option lists leave
out the internal ``*_schema`` entries (the dataclass schemas registered under each group).

Inside the task function, ``exit_on_config_error()`` reports a ``ConfigError`` the same way before
Hydra adds its "Error executing job" line. Every other exception is reported as Hydra reports it (the traceback from the task function on),
and ``HYDRA_FULL_ERROR=1`` shows the full traceback of any error, configuration errors included.
Hydra's own handler (``hydra._internal.utils.run_and_report``) prints and exits before a caller could
see the exception, so the wrapper sets ``HYDRA_FULL_ERROR=1`` while Hydra runs and reports here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

EXIT_CONFIG_ERROR = 2
SCHEMA_SUFFIX = "_schema"


_USER_FULL_ERROR: bool | None = None  # the user's HYDRA_FULL_ERROR, saved by run_hydra_main



class ConfigError(ValueError):
    """A configuration the schema rejects (``medloc.config``'s checks); ``python -m medloc.train``
    prints it without a traceback."""

def _full_error_requested() -> bool:
    if _USER_FULL_ERROR is not None:
        return _USER_FULL_ERROR
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Inside a Hydra task function: a ``ConfigError`` prints its message and exits 2 at once.

    (An exception leaving the task function makes Hydra print "Error executing job with
    overrides: ..." first; ``SystemExit`` passes Hydra's handlers.)"""

    try:
        yield
    except ConfigError as ex:
        if _full_error_requested():
            raise
        sys.stderr.write(f"config error: {ex}".rstrip() + "\n")
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def close_matches(word: str, choices: Iterable[str]) -> list[str]:
    """Up to 3 entries of ``choices`` spelled like ``word`` (difflib ratio >= 0.6)."""
    return difflib.get_close_matches(word, sorted(choices), n=3, cutoff=0.6)


def unknown_name_message(container: str, name: str, valid: Iterable[str], kind: str = "key") -> str:
    """``<container> has no <kind> 'name'. Did you mean ...?`` and the valid names, sorted."""
    valid = sorted(valid)
    matches = close_matches(name, valid)
    hint = f" Did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
    return f"{container} has no {kind} '{name}'.{hint}\nvalid {kind}s of {container}: {', '.join(valid)}"


def _node_keys(cause: BaseException) -> list[str]:
    """The keys of the node an OmegaConf key error happened in (its object or dataclass type)."""
    from omegaconf import DictConfig

    parent = getattr(cause, "parent_node", None)
    if isinstance(parent, DictConfig):
        return [str(k) for k in parent]
    kind = getattr(cause, "object_type", None)
    if kind is not None and dataclasses.is_dataclass(kind):
        return [f.name for f in dataclasses.fields(kind)]
    return []


def format_config_error(ex: BaseException) -> str | None:
    """One message for a configuration error, or ``None`` for any other exception."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


    if isinstance(ex, ConfigError):
        return f"config error: {ex}"
    if isinstance(ex, MissingConfigException):
        missing = getattr(ex, "missing_cfg_file", None) or ""
        options = [o for o in (getattr(ex, "options", None) or []) if not o.endswith(SCHEMA_SUFFIX)]
        if "/" in missing and options:
            group, name = missing.rsplit("/", 1)
            return "config error: " + unknown_name_message(f"config group '{group}'", name, options,
                                                           kind="option") + \
                f"\n(the options are the files conf/{group}/*.yaml; choose one with {group}=<name>)"
        lines = [ln for ln in str(ex).splitlines() if not ln.strip().endswith(SCHEMA_SUFFIX)]
        return "config error: " + "\n".join(lines).split("\nConfig search path:")[0].strip()
    if isinstance(ex, OverrideParseException):
        return f"config error: {ex}"
    if isinstance(ex, ConfigCompositionException):
        cause = ex.__cause__
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            full_key = str(getattr(cause, "full_key", "") or "")
            key = str(getattr(cause, "key", "") or full_key.rsplit(".", 1)[-1])
            node = full_key.rsplit(".", 1)[0] if "." in full_key else ""
            valid = _node_keys(cause)
            if key and valid:
                where = f"'{node}'" if node else "the top-level config"
                return f"config error: {full_key or key}: " + unknown_name_message(where, key, valid)
        # Hydra's first line ("Could not override 'x'." / "Error merging override x") and the
        # OmegaConf message, without the "To append to your config use +x" advice.
        lines = [ln for ln in str(ex).splitlines() if not ln.startswith("To append to your config")]
        if isinstance(cause, OmegaConfBaseException):  # without OmegaConf's type-name lines
            lines += [ln for ln in str(cause).splitlines()
                      if not ln.strip().startswith(("reference_type=", "object_type="))]
        return "config error: " + "\n".join(lines)
    return None


def _report_like_hydra(ex: BaseException) -> None:
    """Hydra's default report: the traceback from the task function on (after ``run_job``)."""
    tb = ex.__traceback__
    start = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "run_job":
            start = tb.tb_next
        tb = tb.tb_next
    traceback.print_exception(type(ex), ex, start if start is not None else ex.__traceback__)
    sys.stderr.write("\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n")


def run_hydra_main(main: Callable[[], object]) -> None:
    """Call a ``@hydra.main`` function; configuration errors end the process with one message."""
    global _USER_FULL_ERROR
    _USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")
    if _USER_FULL_ERROR:
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as ex:  # noqa: BLE001 -- every error is reported, then the process exits 1/2
        message = format_config_error(ex)
        if message is None:
            _report_like_hydra(ex)
            sys.exit(1)
        sys.stderr.write(message.rstrip() + "\n")
        sys.exit(EXIT_CONFIG_ERROR)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
