"""``fmconvert agree``: how closely a converted field agrees with its source, or two fields."""

from __future__ import annotations

from typing import Optional

import typer

from fmconvert.cli.checks import parse_steps, plan, positive
from fmconvert.cli.options import AsJson, Device, NumImages, NumTimes, Seed, Steps
from fmconvert.cli.output import computed_on, emit_json, handle_errors, interactive, join_device, log, say
from fmconvert.errors import UsageError, check_choice
from fmconvert.integration.configs import SAMPLE_DTYPES


@handle_errors
def agree(
    model: str = typer.Argument(..., help="A converted folder or any SOURCE."),
    other: Optional[str] = typer.Argument(None, help="A second model: compare the two fields on one path."),
    data: Optional[str] = typer.Option(None, help="Points from the forward process of this data: builtin:digits or an image folder (default: the model's own samples)."),
    num_times: NumTimes = 20,
    num_points: int = typer.Option(256, "--num-points", help="Data points per time."),
    dtypes: str = typer.Option("float32", help="Network dtypes to measure the field in, comma-separated: " + ", ".join(SAMPLE_DTYPES) + "."),
    steps: Steps = "4,8,16,32",
    num_images: NumImages = 64,
    loss: bool = typer.Option(False, "--loss", help="Also the loss identity per time: the converted field's flow-matching loss against the source's epsilon loss × (1 − s)⁻², per sample, on the points."),
    seed: Seed = 0,
    device: Device = "auto",
    as_json: AsJson = False,
):
    """How closely the converted field agrees with its source (or two fields with each other); with a discrete
    source, also Euler on the trailing grid against the source's DDIM along the same timesteps, per --steps."""
    from fmconvert.evaluation.agreement import agree_fields
    from fmconvert.files.references import parse_data

    interactive(as_json)
    dtype_list = [d.strip() for d in dtypes.split(",") if d.strip()]
    for d in dtype_list:
        check_choice("dtypes", d, SAMPLE_DTYPES)
    steps_list = parse_steps(steps)
    positive(num_times=num_times, num_points=num_points, num_images=num_images)
    if loss and other is not None:
        raise UsageError("--loss compares a model's converted field with its own source; drop OTHER or --loss")
    if data is not None:
        parse_data(data)  # (before any model is loaded)
    # the points, when no --data: the model's own samples, Euler 50 steps (a run like any other)
    points_run, source = plan(model, solvers=["euler"], grid="uniform", dtype="float32", steps=50, seed=seed,
                              num_images=num_points, shard_size=256)
    device = join_device(device)
    payload = agree_fields(source, points_run, data=data, other=other, num_times=num_times, dtypes=dtype_list,
                           steps_list=steps_list, num_images=num_images, loss=loss, seed=seed, device=device, log=log)
    payload.update(computed_on(device))
    if as_json:
        emit_json(payload)
        return
    for d in [k for k in payload["field"] if k != "s"]:
        rows = payload["field"][d]
        say(f"{d}: s, relative L2, cosine, max |error|")
        for i, s in enumerate(payload["field"]["s"]):
            say(f"  {s:.4f}  {rows['relative_l2'][i]:.3e}  {rows['cosine'][i]:.8f}  {rows['max_abs_error'][i]:.3e}")
    for row in payload.get("trajectories", []):
        say(f"NFE {row['nfe']:4d}: Euler vs DDIM relative L2 {row['relative_l2']:.3e}, max |error| {row['max_abs_error']:.3e}")
    if "loss" in payload:
        say("loss identity: s, flow-matching loss, epsilon loss × (1 − s)⁻², largest relative difference per sample")
        table = payload["loss"]
        for i, s in enumerate(table["s"]):
            say(f"  {s:.4f}  {table['flow_matching_loss'][i]:.6e}  {table['weighted_epsilon_loss'][i]:.6e}  "
                f"{table['max_relative_difference'][i]:.2e}")
