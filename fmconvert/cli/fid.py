"""``fmconvert fid``: FID and KID of a model's samples over an NFE sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fmconvert.cli.checks import parse_steps, plan
from fmconvert.cli.options import (
    AsJson,
    Atol,
    Baseline,
    BatchSize,
    ChannelsLast,
    Compile,
    Device,
    Dtype,
    Features,
    Grid,
    InceptionLayer,
    InceptionWeights,
    NumImages,
    Rtol,
    SamplesDir,
    Seed,
    Shift,
    Solver,
    Steps,
)
from fmconvert.cli.output import computed_on, emit_json, handle_errors, interactive, join_device, log, say
from fmconvert.errors import UsageError, check_choice
from fmconvert.evaluation.features import FEATURES
from fmconvert.files.references import parse_data
from fmconvert.sampling.runs import resolved


@handle_errors
def fid(
    model: str = typer.Argument(..., help="A converted folder or any SOURCE."),
    reference: str = typer.Option(..., "--reference", help="builtin:digits[/train|/held_out], an image folder, or a statistics file (.safetensors)."),
    features: Features = "digits",
    inception_weights: InceptionWeights = None,
    inception_layer: InceptionLayer = "2048",
    steps: Steps = "4,8,16,32",
    solver: Solver = "euler",
    grid: Grid = "uniform",
    shift: Shift = None,
    baseline: Baseline = None,
    rtol: Rtol = None,
    atol: Atol = None,
    num_images: NumImages = 1000,
    batch_size: BatchSize = 250,
    dtype: Dtype = "float32",
    channels_last: ChannelsLast = False,
    compile: Compile = False,
    seed: Seed = 0,
    device: Device = "auto",
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the reference statistics (and do not store them)."),
    samples_dir: SamplesDir = None,
    save_reference_stats: Optional[Path] = typer.Option(None, "--save-reference-stats", help="Also write the reference statistics to this .safetensors file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write FID against NFE as a PNG."),
    as_json: AsJson = False,
):
    """FID of MODEL's samples against a reference (and its baseline sampler) over an NFE sweep; --solver takes a
    comma-separated list."""
    from fmconvert.evaluation.fid import fid_sweep
    from fmconvert.sampling.runs import sweep_runs, tuned_file_of

    bars = interactive(as_json)
    check_choice("features", features, FEATURES)
    solvers = [v.strip() for v in solver.split(",") if v.strip()]
    steps_list = parse_steps(steps)
    for name, value in (("--num-images", num_images), ("--batch-size", batch_size)):
        if value < 2:
            raise UsageError(f"{name} must be at least 2, got {value}")
    parse_data(reference, statistics=True)  # (before the model is inspected)
    base, source = plan(model, solvers=solvers, baselines=baseline, grid=grid, shift=shift,
                        dtype=dtype, rtol=rtol, atol=atol, steps=steps_list[0], seed=seed, num_images=num_images,
                        shard_size=batch_size)
    runs = [resolved(run, source.shifts_times)
            for run in sweep_runs(base, solvers, steps_list, baseline or [], tuned_file_of(grid, source),
                                  rtol=rtol, atol=atol)]
    device = join_device(device)
    result = fid_sweep(source, runs, reference, features=features, inception_weights=inception_weights,
                       inception_layer=inception_layer, device=device, channels_last=channels_last, compile=compile,
                       use_cache=not no_cache, samples_dir=samples_dir, save_reference_stats=save_reference_stats,
                       plot=plot, progress=bars, log=log)
    result.update(computed_on(device))
    if as_json:
        emit_json(result)
        return
    log(f"reference statistics: {result['reference_stats']['source']} ({result['reference_stats']['num_samples']} images)")
    say("| sampler | steps | NFE | FID vs reference | KID vs reference | FID vs baseline |")
    say("|---|---|---|---|---|---|")
    for row in result["rows"]:
        kid = f"{row['kid']:.4f} ± {row['kid_std']:.4f}" if "kid" in row else "n/a"
        vs = f"{row['fid_vs_baseline']:.4f}" if "fid_vs_baseline" in row else ""
        name = row["sampler"] + (" (baseline)" if row["baseline"] else "")
        say(f"| {name} | {row['steps']} | {row['nfe']} | {row['fid']:.4f} | {kid} | {vs} |")
