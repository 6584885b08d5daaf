"""``fmconvert judge``: a tuned sampler file's grids scored by FID to a dataset, so that --grid FILE takes the best."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fmconvert.cli.checks import parse_steps
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
def judge(
    model: str = typer.Argument(..., help="The model the file was tuned for: a converted folder or any SOURCE."),
    grid: Path = typer.Option(..., "--grid", help="The tuned sampler file (.json, written by fmconvert tune), rewritten with each grid's score."),
    reference: str = typer.Option(..., "--reference", help="The dataset FID is measured to, as the fid command takes it: builtin:digits[/train|/held_out], an image folder, or a statistics file (.safetensors)."),
    nfe: Optional[str] = typer.Option(None, "--nfe", help="Judge only the grids for these NFEs, comma-separated (default: every grid in the file)."),
    num_images: int = typer.Option(10000, "--num-images", help="Held-out images each grid is judged on, as many as the benchmarks' FID (about 25-55 s a grid for the zoo on a 2-core CPU). 2,048 cost a fifth and took another grid at 3 of the zoo's 12 points, each worse by the benchmarks' FID (docs/benchmarks/JUDGED.md); a few hundred rank no better than FID to the teacher (docs/benchmarks/JUDGE.md)."),
    seed: int = typer.Option(1, "--seed", help="Seeds the held-out noise (image n's noise is the n-th of the stream): tune's --validation-seed by default, never its tuning pairs' (--seed 0), nor the benchmarks' (1000)."),
    batch_size: int = typer.Option(250, "--batch-size", help="Images per model call (fewer for a large model). The score is the fid command's FID of the same samples (--num-images, --seed) at the same batch size; another batch size moves it at rounding (a pixel's uint8 value can flip)."),
    features: Features = "digits",
    inception_weights: InceptionWeights = None,
    inception_layer: InceptionLayer = "2048",
    device: Device = "auto",
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: AsJson = False,
    conditioning=None,
    height: Optional[int] = None,
    width: Optional[int] = None,
):
    """Score each grid of a tuned sampler file by the FID of its samples from held-out noise to --reference, and
    record the scores in the file: sample and fid (--grid FILE; --solver auto for the grids of any solver of one
    evaluation a step, --solver NAME for that solver's) then take, for each step count, the grid of least FID
    (among candidates tuned in several runs, solvers and methods)."""
    from fmconvert.evaluation.fid import frechet_selection, make_extractor
    from fmconvert.sampling.tuned import TunedFile, check_judge, judge_model

    bars = interactive(as_json)
    nfe_list = parse_steps(nfe, option="--nfe") if nfe is not None else None
    if num_images < 2 or batch_size < 1:
        raise UsageError(f"--num-images must be at least 2 and --batch-size at least 1, got {num_images} and {batch_size}")
    check_choice("features", features, FEATURES)
    check_judge(TunedFile.load(grid), nfe_list, num_images, batch_size)  # (before the reference's statistics)
    device = join_device(device)
    selection = frechet_selection(make_extractor(features, inception_weights, inception_layer, device), device,
                                  reference)
    result = judge_model(model, grid, selection, images=num_images, seed=seed, nfe_list=nfe_list,
                         conditioning=conditioning, batch_size=batch_size, device=device, height=height, width=width,
                         progress=bars, revision=revision, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code, log=log)
    if as_json:
        emit_json({**result, **computed_on(device)})
        return
    picked = set(result["picks"].values())
    say(f"| NFE | steps | solver | method | objective | FID to {reference} ({num_images} images, seed {seed}) | "
        "RMSE to teacher (held out) | taken by --grid --solver auto |")
    say("|---|---|---|---|---|---|---|---|")
    for index, row in sorted(enumerate(result["grids"]), key=lambda item: (item[1]["steps"], item[1]["nfe"])):
        judged = row["validation"].get("judge")
        if judged is None or (nfe_list is not None and row["nfe"] not in nfe_list):
            continue
        method = row["method"] + (" (with weights)" if row.get("weights") else "")
        objective = row["tuning"].get("objective", "mse") if row["method"] != "gits" else "gits's own"
        say(f"| {row['nfe']} | {row['steps']} | {row['solver']} | {method} | {objective} | {judged['score']:.4g} | "
            f"{row['validation']['rmse']:.4g} | {'yes' if index in picked else ''} |")
    log(f"wrote {grid}")
