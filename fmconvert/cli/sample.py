"""``fmconvert sample``: samples of a model, with an ODE solver or a diffusers scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fmconvert.cli.checks import new_output, parse_steps, plan, positive
from fmconvert.cli.options import (
    AllowPickle,
    AsJson,
    Atol,
    Baseline,
    BatchSize,
    ChannelsLast,
    Compile,
    Device,
    Dtype,
    Force,
    Grid,
    NumImages,
    Revision,
    Rtol,
    SamplesDir,
    Seed,
    Shift,
    Solver,
    Steps,
    TrustRemoteCode,
    conditioning_options,
)
from fmconvert.cli.output import computed_on, emit_json, handle_errors, interactive, join_device, log
from fmconvert.errors import UsageError
from fmconvert.sampling.runs import resolved


@handle_errors
@conditioning_options
def sample(
    model: str = typer.Argument(..., help="A converted folder, or any SOURCE (wrapped on the fly)."),
    solver: Solver = "euler",
    grid: Grid = "uniform",
    shift: Shift = None,
    steps: Steps = "50",
    num_images: NumImages = 16,
    batch_size: BatchSize = 16,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "float32",
    channels_last: ChannelsLast = False,
    compile: Compile = False,
    baseline: Baseline = None,
    rtol: Rtol = None,
    atol: Atol = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="A .png grid, or a folder of PNGs."),
    save_tensor: Optional[Path] = typer.Option(None, "--save-tensor", help="Write the final samples (float32, data space: latents for latent models) as safetensors, key 'samples', and the decoded images in [0, 1], key 'images'."),
    force: Force = False,
    samples_dir: SamplesDir = None,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: AsJson = False,
    conditioning=None,
    height: Optional[int] = None,
    width: Optional[int] = None,
):
    """Sample MODEL as a velocity field with an ODE solver (or, with --baseline, its own sampler)."""
    (steps_value,) = parse_steps(steps, single=True)
    positive(num_images=num_images, batch_size=batch_size)
    if out is not None and out.suffix.lower() != ".png":  # (a .png grid is replaced, as an image file is)
        new_output(out, force)
    if baseline is not None and len(baseline) > 1:
        raise UsageError(f"sample draws one run: give one --baseline, got {len(baseline)} (fid compares several)")
    run, source = plan(model, revision, allow_pickle, trust_remote_code, solvers=[solver], baselines=baseline or [],
                       grid=grid, shift=shift, steps=steps_value, seed=seed, dtype=dtype, conditioning=conditioning,
                       num_images=num_images, shard_size=batch_size, rtol=rtol, atol=atol)
    run = resolved(run, source.shifts_times)
    if baseline:
        mixed = [f"--{k} {v}" for k, v, default in (("solver", solver, "euler"), ("grid", grid, "uniform"),
                                                    ("shift", shift, None), ("rtol", rtol, None), ("atol", atol, None))
                 if v != default]
        if mixed:
            raise UsageError(f"--baseline {baseline[0]} samples with its own scheduler on its own timesteps: "
                             f"{mixed[0]} does not apply")
        from fmconvert.sampling.runs import sweep_runs

        (run,) = sweep_runs(run, [], [steps_value], baseline)
    device = join_device(device)
    from fmconvert.sampling.generate import draw

    drawn = draw(source, run, device=device, revision=revision, allow_pickle=allow_pickle,
                 trust_remote_code=trust_remote_code, channels_last=channels_last, compile=compile, height=height,
                 width=width, samples_dir=samples_dir, progress=interactive(as_json), log=log)
    result, run = drawn.result, drawn.run
    if result is None:  # not rank 0: rank 0 writes and prints
        return
    outputs = {}
    if out is not None:
        from fmconvert.files.images import save_folder, save_grid

        outputs["images"] = str(save_grid(result.images, out) if out.suffix.lower() == ".png" else save_folder(result.images, out, force))
    if save_tensor is not None:
        from safetensors.torch import save_file

        from fmconvert.files.atomic import atomic_write

        atomic_write(save_tensor, lambda tmp: save_file({"samples": result.samples.contiguous(),
                                                          "images": result.images.contiguous()}, str(tmp)))
        outputs["tensor"] = str(save_tensor)
    record = run.manifest()
    payload = {
        "loaded": drawn.vm.info, "run": record, "solver": record["sampler"], "grid": record["grid"], "shift": record["shift"],
        "steps": run.steps,
        "nfe": max(result.nfe), "nfe_per_batch": result.nfe, "num_images": num_images, "batch_size": batch_size,
        "seed": seed, **computed_on(device), "dtype": dtype, "shape": list(run.shape or ()),
        "conditioning": conditioning.describe(), "seconds": round(result.seconds, 4), "outputs": outputs,
    }
    if samples_dir is not None:
        payload["samples_dir"], payload["shards_reused"] = str(samples_dir), drawn.reused
    if as_json:
        emit_json(payload)
    else:
        log(f"done: NFE {payload['nfe']}, {result.seconds:.2f} s" +
            "".join(f"; wrote {v}" for v in outputs.values()))
