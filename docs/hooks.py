"""MkDocs hook (mkdocs.yml: hooks): renders ``<!-- fmconvert-command: NAME -->`` as the command's
reference, from the typer declarations themselves (``fmconvert.cli.NAME_command``): its help, usage,
and each argument and option as ``fmconvert NAME --help`` prints it (the same help records). A
command page thus cannot drift from the code; tests/test_docs.py checks every command has one."""

from __future__ import annotations

import re

MARKER = re.compile(r"<!-- fmconvert-command: ([a-z_]+) -->")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(name: str) -> str:
    """The Markdown reference of ``fmconvert NAME``."""
    import fmconvert.cli

    command = getattr(fmconvert.cli, f"{name}_command")
    ctx = command.make_context(f"fmconvert {name}", [], resilient_parsing=True)
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [(command.help or "").strip(), "", "```text", f"fmconvert {name} {usage}", "```", ""]
    for title, kind in (("Arguments", "argument"), ("Options", "option")):
        records = [p.get_help_record(ctx) for p in command.get_params(ctx) if p.param_type_name == kind]
        records = [r for r in records if r is not None]
        if records:
            lines += [f"**{title}**", "", f"| {kind} | what it does |", "|---|---|"]
            lines += [f"| `{_cell(flags)}` | {_cell(help_)} |" for flags, help_ in records]
            lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARKER.sub(lambda m: render(m.group(1)), markdown)
