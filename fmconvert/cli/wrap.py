"""``fmconvert wrap``: convert a SOURCE into a folder stock diffusers loads (and publish it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fmconvert.cli.checks import new_output
from fmconvert.cli.options import AllowPickle, AsJson, Force, Private, Public, Revision, TrustRemoteCode
from fmconvert.cli.output import emit_json, handle_errors, interactive, log
from fmconvert.errors import UsageError, check_choice


@handle_errors
def wrap(
    source: str = typer.Argument(..., help="Hub id, local diffusers folder, or builtin:NAME."),
    out: Path = typer.Option(..., "--out", "-o", help="The converted pipeline folder to write."),
    to: str = typer.Option("velocity", help="velocity (for epsilon / v / sample sources), epsilon or v_prediction (for flow sources)."),
    schedule: Optional[str] = typer.Option(None, help="Discrete target schedule for --to epsilon (default linear) / v_prediction (default cosine): cosine, linear, scaled_linear, or a scheduler_config.json."),
    revision: Revision = None,
    variant: Optional[str] = typer.Option(None, help="Which of the source's weight files: fp16, bf16, ... (diffusers' variant); default: its plain files."),
    dtype: Optional[str] = typer.Option(None, help="The dtype the converted folder declares for loading its network (float32, float16, bfloat16); default: as the source loads."),
    force: Force = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    push_to: Optional[str] = typer.Option(None, "--push", help="Then publish the folder to this Hub repo id, as fmconvert push does (its refusals are made before converting)."),
    private: Private = False,
    public: Public = False,
    token: Optional[str] = typer.Option(None, "--token", help="With --push: Hub token (default: HF_TOKEN or the login cache); never printed."),
    as_json: AsJson = False,
):
    """Convert SOURCE into a pipeline folder that stock diffusers loads."""
    asked: bool | None = None  # --push's visibility: True private, False public, None the Hub's default
    if push_to is None:  # the publishing options without --push would be ignored: refused instead
        given = [flag for flag, value in (("--private", private), ("--public", public), ("--token", token)) if value]
        if given:
            raise UsageError(f"{' and '.join(given)} only apply with --push REPO: add --push or drop them")
    else:  # what push would refuse without the model, before the conversion's work
        from fmconvert.integration.push import preflight, visibility

        asked = visibility(private, public)
        preflight(push_to)
    from fmconvert.integration.folder import TARGETS, write_converted
    from fmconvert.integration.source import inspect_source

    interactive(as_json, import_diffusers=False)
    check_choice("to", to, TARGETS)
    new_output(out, force)
    src = inspect_source(source, revision, allow_pickle, trust_remote_code)
    log(f"converting {src.model_class} ({src.prediction_type}, {src.scheduler.get('_class_name')}) from {source}")
    summary = write_converted(src, out, to, schedule, force, variant, dtype, allow_pickle, trust_remote_code)
    if push_to is not None:
        from fmconvert.integration.push import push as push_folder

        summary["push"] = push_folder(out, push_to, private=asked, token=token)
        log(f"pushed {out} to {push_to}: {summary['push']['commit_url']}")
    if as_json:
        emit_json(summary)
    else:
        log(f"wrote {summary['adapter']} + {summary['scheduler']} ({summary['pipeline_class']}) to {out}")
