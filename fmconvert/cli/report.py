"""``fmconvert report``: the full story for one model, as a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fmconvert.cli.checks import new_output, parse_steps, positive
from fmconvert.cli.options import AsJson, Device, Force, NumImages, NumTimes, Seed, Steps
from fmconvert.cli.output import emit_json, handle_errors, interactive, join_device, log


@handle_errors
def report(
    model: str = typer.Argument("builtin:digits-eps", help="A diffusion SOURCE to convert and evaluate."),
    other: Optional[str] = typer.Option("builtin:digits-flow", help="A second model whose field to compare ('' for none)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="The report folder."),
    data: str = typer.Option("builtin:digits/held_out", help="Points for the field agreement."),
    reference: str = typer.Option("builtin:digits", help="FID reference (digits features)."),
    steps: Steps = "4,8,16,32",
    sampler_steps: str = typer.Option("3,4,6", "--sampler-steps", help="NFEs at which the default sampler, the tuned one and the peers are compared."),
    peer: Optional[list[str]] = typer.Option(None, "--peer", help="A diffusers scheduler the samplers are compared with, NAME[:key=value,...] as fid --baseline takes; repeat it for several (default: dpm++2m and unipc; --peer none for none)."),
    tune_steps: str = typer.Option("4", "--tune-steps", help="NFEs (among --sampler-steps) to tune a sampler for with fmconvert tune ('' for none)."),
    tune_pairs: int = typer.Option(128, "--tune-pairs", help="Teacher pairs the tuned sampler is tuned on (fmconvert tune --pairs)."),
    tune_validation_pairs: int = typer.Option(256, "--tune-validation-pairs", help="Held-out pairs it is judged on (fmconvert tune --validation-pairs)."),
    tune_iterations: int = typer.Option(150, "--tune-iterations", help="Its descent's steps (fmconvert tune --iterations)."),
    tune_teacher_steps: int = typer.Option(64, "--tune-teacher-steps", help="Steps of the teacher it is tuned against (fmconvert tune --teacher-steps)."),
    num_images: NumImages = 1000,
    num_times: NumTimes = 20,
    seed: Seed = 0,
    device: Device = "auto",
    force: Force = False,
    as_json: AsJson = False,
):
    """Convert MODEL, compare it with its source (and OTHER), run the FID sweep; write a report folder."""
    from fmconvert.evaluation.report import PEERS, build_report

    positive(tune_pairs=tune_pairs, tune_validation_pairs=tune_validation_pairs, tune_iterations=tune_iterations,
             tune_teacher_steps=tune_teacher_steps)
    bars = interactive(as_json)
    new_output(out, force)
    peer_list = PEERS if not peer else tuple(p for p in peer if p != "none")
    numbers = build_report(model, other or None, out, data, reference, tuple(parse_steps(steps)),
                           num_images=num_images, num_times=num_times, seed=seed, peers=peer_list,
                           sampler_steps=tuple(parse_steps(sampler_steps, option="--sampler-steps")),
                           tune_steps=tuple(parse_steps(tune_steps, option="--tune-steps", allow_none=True)),
                           tune_pairs=tune_pairs, tune_validation_pairs=tune_validation_pairs,
                           tune_iterations=tune_iterations, tune_teacher_steps=tune_teacher_steps,
                           device=join_device(device), force=force, progress=bars, log=log)
    if as_json:
        emit_json(numbers)
    else:
        log(f"wrote {out}/report.md ({numbers['seconds']} s)")
