"""The command line, one module per command (as the ``hf`` CLI): a command parses its options,
makes one library call and prints what it returns.

- :mod:`~fmconvert.cli.options`: the options commands share, declared once;
- :mod:`~fmconvert.cli.output`: errors and exit codes, logs, ``--json``, progress-bar policy;
- :mod:`~fmconvert.cli.checks`: reading option values into the library's values;
- one module per command: :mod:`~fmconvert.cli.wrap`, :mod:`~fmconvert.cli.sample`,
  :mod:`~fmconvert.cli.agree`, :mod:`~fmconvert.cli.fid`, :mod:`~fmconvert.cli.tune`,
  :mod:`~fmconvert.cli.judge`, :mod:`~fmconvert.cli.train` (train and reflow), :mod:`~fmconvert.cli.report`, :mod:`~fmconvert.cli.push`.

A new command is one module whose function this file registers. Importing the command line
imports neither torch nor diffusers (``--help`` and ``wrap`` stay fast).
"""

from __future__ import annotations

import typer

from fmconvert.cli import agree, fid, judge, push, report, sample, train, tune, wrap

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
    help="Convert diffusion models to flow-matching velocity fields and back, exactly; sample them with ODE solvers.",
)
for command in (wrap.wrap, sample.sample, agree.agree, fid.fid, tune.tune, judge.judge, train.train, train.reflow,
                report.report, push.push):
    app.command()(command)


def main() -> None:
    app(prog_name="fmconvert")


def __getattr__(name: str):
    """``NAME_command``: the command NAME as the click command typer builds (the documentation's
    command pages render it with mkdocs-click, so their options are the code's)."""
    if name.endswith("_command"):
        commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
        if name[: -len("_command")] in commands:
            return commands[name[: -len("_command")]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
