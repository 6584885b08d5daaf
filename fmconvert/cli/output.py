"""What every command does around its one library call: one-line errors with exit codes (the
library's errors name parameters, ``num_images=0``; here they name the command's options,
``--num-images 0``), logs and results (rank 0 alone under torchrun), progress-bar policy, the device.

Conventions (as the ``hf`` CLI): ``--json`` prints one JSON object on stdout; logs and the progress
bar (interactive terminals only) go to stderr. Exit codes: 0 done, 1 runtime error, 2 usage error;
errors are one line, with the traceback only under FMCONVERT_DEBUG=1.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import re
import sys

import typer

from fmconvert.errors import FmconvertError, UsageError


def main_process() -> bool:
    if "torch.distributed" not in sys.modules:  # no process group joined (and torch not needed to know it)
        return True
    from fmconvert.sampling import distributed

    return distributed.is_main()


#: the options of the command running now (:func:`handle_errors` sets them): library log lines, which name
#: parameters, are printed with these flags (:func:`in_flags`)
_FLAGS: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("flags", default={})


def log(message: str) -> None:
    """A log line on stderr (rank 0 alone under torchrun), in the running command's words."""
    if main_process():
        print(in_flags(message, _FLAGS.get()), file=sys.stderr, flush=True)


def say(message: str) -> None:
    """A result line on stdout (rank 0 alone)."""
    if main_process():
        print(message, flush=True)


def emit_json(payload: dict) -> None:
    say(json.dumps(payload, indent=2, default=str))


#: the environment variables a command may set for the libraries it imports (:func:`_interactive`)
_SETS_ENVIRONMENT = ("DIFFUSERS_VERBOSITY",)


def handle_errors(command):
    """One-line errors with the right exit code; tracebacks only with FMCONVERT_DEBUG=1.

    FmconvertError: its exit code (UsageError 2, else 1). ValueError: the library's way of
    saying an argument cannot be honoured (a grid the source cannot have, steps beyond its
    schedule, a config it cannot map), so a usage error, exit 2, in every command. Anything
    else: exit 1, with its type. The library names parameters (``num_images=0``); the message
    names the command's options instead (``--num-images 0``, :func:`in_flags`)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        saved = {name: os.environ.get(name) for name in _SETS_ENVIRONMENT}
        token = _FLAGS.set(option_flags(command))  # (read when the command runs, not when the CLI is imported)
        try:
            result = command(*args, **kwargs)
            _leave_together()
            return result
        except typer.Exit:
            raise
        except FmconvertError as error:
            if os.environ.get("FMCONVERT_DEBUG") == "1":
                raise
            log(f"error: {error}")
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            log("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except ValueError as error:
            if os.environ.get("FMCONVERT_DEBUG") == "1":
                raise
            log(f"error: {_first_line(error)}")
            raise typer.Exit(UsageError.exit_code) from None
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("FMCONVERT_DEBUG") == "1":
                raise
            log(f"error: {type(error).__name__}: {_first_line(error)} (set FMCONVERT_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None
        finally:  # a command called in-process (typer's CliRunner, a notebook) leaves the environment as it was
            _FLAGS.reset(token)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    return wrapper


#: the library's names for what an option sets, where they differ from the option's name
PARAMETER_FLAGS = {"class_labels": "--class-label", "negative_image_embeds": "--image-embeds (negative_image_embeds)",
                   "image_embeds": "--image-embeds"}


def option_flags(command) -> dict[str, str]:
    """{parameter: flag} of a command's options (its typer declarations, ``--name`` else)."""
    flags = dict(PARAMETER_FLAGS)
    for name, parameter in inspect.signature(command, eval_str=True).parameters.items():
        declared = [d for info in getattr(parameter.annotation, "__metadata__", ()) + (parameter.default,)
                    for d in getattr(info, "param_decls", None) or () if d.startswith("--")]
        if isinstance(parameter.default, typer.models.ArgumentInfo) or any(
                isinstance(m, typer.models.ArgumentInfo) for m in getattr(parameter.annotation, "__metadata__", ())):
            flags[name] = name.upper()
            continue
        flags[name] = declared[0] if declared else "--" + name.replace("_", "-")
    return flags


def in_flags(message: str, flags: dict[str, str]) -> str:
    """A library message in the command line's words: each ``parameter=value`` of one of the
    command's options becomes ``--option value`` (``num_images=0`` → ``--num-images 0``), and a
    switch set, ``parameter=True``, the flag alone (``force=True`` → ``--force``)."""
    def option(match: re.Match) -> str:
        name, switched = match.group(1), match.group(2)
        if name not in flags:
            return match.group(0)
        return flags[name] if switched else f"{flags[name]} "

    return re.sub(r"(?<![\w.-])([a-z][a-z0-9_]*)=(?!=)(True\b)?", option, message)


def _leave_together() -> None:
    """Under torchrun, a command that finished waits for every rank before the process exits: the
    others are done once rank 0 has gathered their samples, and one leaving while rank 0 still writes
    can abort rank 0 in gloo's teardown ("terminate called without an active exception": 4 of 30
    two-process `sample` runs without this wait, 0 of 30 with it). Not on an error, where a peer may
    never arrive."""
    if "torch.distributed" in sys.modules:  # (torch not imported: no group joined)
        from fmconvert.sampling import distributed

        distributed.barrier()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def interactive(as_json: bool, import_diffusers: bool = True) -> bool:
    """Progress bars only on an interactive stderr, and never with --json: fmconvert's and the
    libraries' own (diffusers', transformers' "Loading weights", huggingface_hub's), whose logs are
    set to errors only. A command that may not import diffusers at all (``import_diffusers=False``:
    wrap) sets its level through DIFFUSERS_VERBOSITY, which diffusers reads when it is imported (and
    :func:`handle_errors` puts back as it was when the command returns)."""
    interactive = not as_json and sys.stderr.isatty()
    if os.environ.get("FMCONVERT_DEBUG") == "1":
        return interactive
    if not interactive:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # (transformers takes its own setting from it when it is imported)
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
    if not import_diffusers and "diffusers" not in sys.modules:
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        return interactive
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if not interactive:
        diffusers_logging.disable_progress_bar()
    return interactive


def computed_on(device: str) -> dict:
    """:func:`fmconvert.sampling.distributed.computed_on`, imported when called (the CLI starts without torch)."""
    from fmconvert.sampling import distributed

    return distributed.computed_on(device)


def join_device(device: str) -> str:
    """Validate --device and, under torchrun, join the process group (this rank's device)."""
    import torch

    from fmconvert.sampling import distributed

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for but no CUDA device is available; use --device cpu")
    return distributed.init(device)
