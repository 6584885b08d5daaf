"""``fmconvert tune``: time grids tuned to one model, written as a tuned sampler file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fmconvert.cli.checks import parse_batch, parse_steps, positive
from fmconvert.cli.options import (
    AllowPickle,
    AsJson,
    Device,
    Features,
    InceptionLayer,
    InceptionWeights,
    Revision,
    TrustRemoteCode,
    conditioning_options,
)
from fmconvert.cli.output import computed_on, emit_json, handle_errors, interactive, join_device, log, say
from fmconvert.errors import UsageError, check_choice
from fmconvert.evaluation.features import FEATURES


@handle_errors
@conditioning_options
def tune(
    model: str = typer.Argument(..., help="A converted folder, or any SOURCE (wrapped on the fly)."),
    out: Path = typer.Option(..., "--out", "-o", help="The tuned sampler file (.json) to write; a file of an earlier run of the same model and settings is continued (the grids it has are kept)."),
    nfe: str = typer.Option("4", "--nfe", help="Field evaluations to tune for, comma-separated (e.g. 3,4,5,6)."),
    solver: str = typer.Option("ab2", "--solver", help="The solver whose grid is tuned: ab2, euler, dpmpp_2m, dpmpp_3m (one evaluation a step), unipc (one a step, NFE 3 or more), heun (2 a step, 1 on the last), midpoint, rk4."),
    method: str = typer.Option("gits,ld3", "--method", help="Tuning methods, comma-separated: gits (dynamic programming over a teacher trajectory, training-free), ld3 (time steps learnt through the solver) and s4s (time steps and one solver-weight correction a step, learnt together; euler, ab2, dpmpp_2m, dpmpp_3m and unipc; run by fmconvert's samplers, not a stock scheduler)."),
    pairs: int = typer.Option(128, "--pairs", help="Teacher pairs (noise, converged endpoint) tuned on."),
    seed: int = typer.Option(0, "--seed", help="Seeds the tuning pairs' noise."),
    validation_pairs: int = typer.Option(256, "--validation-pairs", help="Held-out pairs the tuned grids are judged on."),
    validation_seed: int = typer.Option(1, "--validation-seed", help="Seeds the held-out pairs' noise (not --seed)."),
    teacher_steps: int = typer.Option(64, "--teacher-steps", help="Steps of the teacher (rk4 on the uniform grid)."),
    fine_steps: int = typer.Option(64, "--fine-steps", help="Steps of GITS's fine grid (uniform), the times its grids are chosen from."),
    iterations: int = typer.Option(150, "--iterations", help="LD3's and s4s's optimiser steps."),
    lr: float = typer.Option(0.1, "--lr", help="LD3's and s4s's learning rate (Adam, on the grid's logits and s4s's weight corrections)."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="The learning rate along the descent: constant (LD3's) or cosine (annealed to 0 over --iterations, so the descent settles; docs/benchmarks/TUNING-frechet.md)."),
    batch_size: str = typer.Option("auto", "--batch-size", help="Pairs per LD3 / s4s iteration, drawn afresh each time: a count, all, or auto (32; all the pairs with --objective frechet). The defaults are scripts/tune_bench.py's, measured in docs/benchmarks/TUNING.md and TUNING-frechet.md."),
    objective: str = typer.Option("mse", "--objective", help="What ld3 and s4s minimise between the solver's endpoints and the teacher's: mse (in the model's data space), features (the decoded images' early feature maps in a perceptual network; 8x8 pixel models) or frechet (features plus the Frechet distance of the batch's endpoints to the teacher's in FID's digits features, a distribution term). gits's cost is its own."),
    select: str = typer.Option("loss", "--select", help="How the untuned grid tuning starts from and the grid ld3 and s4s keep are chosen: loss (their objective on the tuning pairs, the better of start and end) or fid (FID's Fréchet distance to the teacher on the held-out pairs, in --features; the closest start and the closest of the checkpoints, one every --check-every iterations)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="With --select fid: judge by FID against this dataset (as the fid command's --reference: builtin:digits, an image folder, a statistics file) instead of FID to the teacher's held-out endpoints. It ranks tuned samplers well from about 2,048 --validation-pairs, where FID to the teacher does not at any count (docs/benchmarks/JUDGE.md)."),
    check_every: int = typer.Option(10, "--check-every", help="With --select fid: iterations between the checkpoints ld3 and s4s choose among."),
    restarts: int = typer.Option(1, "--restarts", help="ld3's and s4s's descents from the same start, each drawing its own batches; the best checkpoint of all is kept (by --select). Their result varies by several FID points between batch orders on the zoo models; with --select fid, take more --validation-pairs too (docs/benchmarks/TUNING-restarts.md)."),
    features: Features = "digits",
    inception_weights: InceptionWeights = None,
    inception_layer: InceptionLayer = "2048",
    soft_radius: float = typer.Option(0.0, "--soft-radius", help="LD3's soft teacher: each student may start within this fraction of its noise's norm (0: the noise itself)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write LD3's and s4s's loss per iteration as a PNG."),
    into: Optional[Path] = typer.Option(None, "--into", help="A converted folder of these weights (MODEL itself): store the tuned times in its scheduler, so its stock pipeline's num_inference_steps=N steps them, and the file beside (with --solver euler, the scheduler's; the times of gits or ld3, s4s's weights being fmconvert's own)."),
    device: Device = "auto",
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: AsJson = False,
    conditioning=None,
    height: Optional[int] = None,
    width: Optional[int] = None,
):
    """Tune MODEL's time grid for each --nfe against a converged teacher; write a tuned sampler file that sample and
    fid take as --grid FILE."""
    from fmconvert.sampling.tuned import SELECTIONS, TunedFile, check_tuning, tune_model

    bars = interactive(as_json)
    nfe_list = parse_steps(nfe)
    methods = tuple(m.strip() for m in method.split(",") if m.strip())
    positive(pairs=pairs, validation_pairs=validation_pairs, teacher_steps=teacher_steps, fine_steps=fine_steps,
             iterations=iterations, check_every=check_every, restarts=restarts)
    batch = parse_batch(batch_size)
    check_choice("select", select, SELECTIONS)
    check_choice("features", features, FEATURES)
    if out.suffix.lower() != ".json":
        raise UsageError(f"--out {out}: a tuned sampler file is JSON; name it *.json")
    existing = TunedFile.load(out) if out.exists() else None
    device = join_device(device)
    if reference is not None and select != "fid":
        raise UsageError("--reference judges tuned grids by FID to a dataset: it needs --select fid")
    selection = None
    if select == "fid":  # (the request checked before the extractor is read)
        check_tuning(solver, nfe_list, methods, pairs, validation_pairs, seed, validation_seed, teacher_steps,
                     fine_steps, objective, restarts, batch, lr_schedule)
        from fmconvert.evaluation.fid import frechet_selection, make_extractor

        selection = frechet_selection(make_extractor(features, inception_weights, inception_layer, device), device,
                                      reference)
    result = tune_model(model, nfe_list, solver, methods=methods, conditioning=conditioning, pairs=pairs, seed=seed,
                        validation_pairs=validation_pairs, validation_seed=validation_seed,
                        teacher_steps=teacher_steps, fine_steps=fine_steps, iterations=iterations, lr=lr, soft_radius=soft_radius,
                        batch_size=batch, objective=objective, selection=selection, check_every=check_every,
                        restarts=restarts, lr_schedule=lr_schedule, device=device, existing=existing, out=out, plot=plot, into=into, height=height, width=width,
                        progress=bars, revision=revision,
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, log=log)
    if as_json:
        emit_json({**result, **computed_on(device)})
        return
    scored = any("score" in row["validation"] for row in result["grids"])  # (--select fid: its held-out FID too)
    say("| NFE | method | RMSE to teacher (held out) | best untuned | its RMSE | ratio | "
        + ("FID to teacher (held out) | the best untuned's | " if scored else "") + "seconds |")
    say("|---|---|---|---|---|---|" + ("---|---|" if scored else "") + "---|")
    for row in result["grids"]:
        v = row["validation"]
        fid = (f"{v['score']:.4g} | {v['untuned_score'][v['best_untuned']]:.4g} | " if "score" in v
               else "| | " if scored else "")
        say(f"| {row['nfe']} | {row['method']} | {v['rmse']:.4g} | {v['best_untuned']} | {v['best_untuned_rmse']:.4g} | "
            f"{v['rmse'] / v['best_untuned_rmse']:.3f} | {fid}{row['tuning']['seconds']:.1f} |")
    log(f"wrote {out}")

