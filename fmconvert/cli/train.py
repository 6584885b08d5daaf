"""``fmconvert train`` and ``fmconvert reflow``: training in the converted coordinates."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from fmconvert.cli.checks import new_output, parse_steps, plan, positive
from fmconvert.cli.options import (
    AsJson,
    Device,
    Force,
    Grid,
    OldTrainSteps,
    Shift,
    Solver,
    Steps,
    refuse_old_train_steps,
    training_options,
)
from fmconvert.cli.output import emit_json, handle_errors, interactive, log
from fmconvert.sampling.runs import resolved


@handle_errors
@training_options
def train(
    model: str = typer.Argument(..., help="A converted folder, or any SOURCE (wrapped on the fly): the velocity model to fine-tune."),
    data: str = typer.Option(..., "--data", help="builtin:digits[/train|/held_out], an image folder (pixels → [-1, 1]), or a folder of latent shards (shard-*.safetensors, key 'samples', as --samples-dir writes them)."),
    out: Path = typer.Option(..., "--out", "-o", help="The trained converted folder to write; its checkpoint lives in OUT.partial until then."),
    seed: int = typer.Option(0, "--seed", help="Seeds the data order and the noise and times of every step (by step, so a resume repeats them)."),
    device: Device = "auto",
    force: Force = False,
    as_json: AsJson = False,
    steps: OldTrainSteps = None,
    *,
    training: dict,
    checkpoint_every: int,
):
    """Fine-tune MODEL with the conditional flow-matching loss on the rectified path; write a converted folder."""
    from fmconvert.integration.source import inspect_source
    from fmconvert.training.loop import train as train_model
    from fmconvert.training.settings import TrainSettings

    refuse_old_train_steps(steps)
    bars = interactive(as_json)
    new_output(out, force)
    source = inspect_source(model)
    settings = TrainSettings.create(source, data, seed=seed, **training)
    with _resumable(out):
        summary = train_model(settings, out, device=device, checkpoint_every=checkpoint_every, force=force,
                              progress=bars, log=log, source=source)
    if as_json:
        emit_json(summary)
    else:
        log(f"trained {settings.train_steps} steps in {summary['seconds']:.1f} s (loss {summary['first_loss']:.4g} → "
            f"{summary['last_loss']:.4g}); wrote {out}")


@handle_errors
@training_options
def reflow(
    model: str = typer.Argument(..., help="A converted folder, or any SOURCE (wrapped on the fly): the velocity model to straighten."),
    out: Path = typer.Option(..., "--out", "-o", help="The reflowed converted folder to write; its couplings and checkpoint live in OUT.partial until then."),
    num_couplings: int = typer.Option(10000, "--num-couplings", help="How many (noise, sample) pairs to solve and train on."),
    solver: Solver = "unipc",
    steps: Steps = "16",
    grid: Grid = "uniform",
    shift: Shift = None,
    sample_batch_size: int = typer.Option(250, "--sample-batch-size", help="Couplings per solver call and per shard."),
    device: Device = "auto",
    couplings_dir: Optional[Path] = typer.Option(None, "--couplings-dir", help="Keep the couplings in shards here (a rerun with the same couplings settings reuses them; other settings are refused) instead of in OUT.partial, which is removed once OUT is written."),
    distill: bool = typer.Option(False, "--distill", help="Train at the noise end only (s = 1, x = ε): one-step distillation of the couplings, x0 ≈ ε − u(ε, 1); --time-sampling does not apply."),
    seed: int = typer.Option(0, "--seed", help="Seeds the couplings' noise (the documented torch.randn stream) and the training's data order and times."),
    force: Force = False,
    as_json: AsJson = False,
    *,
    training: dict,
    checkpoint_every: int,
):
    """Reflow MODEL (rectified flow, Liu et al. 2022): solve --num-couplings (noise, sample) pairs with an accurate
    solver (--solver/--steps/--grid/--shift), train on the straight paths between them (or, with --distill, one step),
    write a converted folder. Interrupted, the same command resumes the couplings and the training."""
    from fmconvert.training.reflow import reflow as reflow_model

    bars = interactive(as_json)
    new_output(out, force)
    (steps_value,) = parse_steps(steps, single=True)
    positive(num_couplings=num_couplings, sample_batch_size=sample_batch_size, checkpoint_every=checkpoint_every)
    couplings, source = plan(model, solvers=[solver], grid=grid, shift=shift, dtype="float32",
                             steps=steps_value, seed=seed, num_images=num_couplings, shard_size=sample_batch_size)
    couplings = resolved(couplings, source.shifts_times)
    with _resumable(out, couplings_dir):
        summary = reflow_model(couplings, out, distill=distill, couplings_dir=couplings_dir, device=device,
                               checkpoint_every=checkpoint_every, force=force, progress=bars, log=log,
                               seed=seed, source=source, **training)
    if as_json:
        emit_json(summary)
    else:
        log(f"reflowed {model}: {num_couplings} couplings, {summary['train_steps']} training steps in {summary['seconds']:.1f} s "
            f"(loss {summary['first_loss']:.4g} → {summary['last_loss']:.4g}); wrote {out}")


@contextlib.contextmanager
def _resumable(out: Path, couplings_dir: Path | None = None):
    """On an interruption (exit 130), say what a rerun of the same command resumes: the last
    checkpoint in OUT.partial, else the couplings' complete shards (reflow), else nothing."""
    from fmconvert.training.checkpoint import CHECKPOINT, checkpoint_step, work_folder

    try:
        yield
    except KeyboardInterrupt:
        work = work_folder(out)
        done = checkpoint_step(work / CHECKPOINT)
        from fmconvert.training.reflow import COUPLINGS

        shards = sorted((couplings_dir or work / COUPLINGS).glob("shard-*.safetensors"))
        if done is not None:
            log(f"interrupted: rerun the same command to resume from step {done} (the checkpoint in {work})")
        elif shards:
            log(f"interrupted before the first checkpoint: rerun the same command to resume; the {len(shards)} complete "
                f"shards of couplings in {shards[0].parent} are kept")
        else:
            log("interrupted before the first checkpoint: a rerun starts again")
        raise typer.Exit(130) from None
