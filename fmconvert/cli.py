"""The command line: ``fmconvert wrap`` and ``fmconvert sample``.

Conventions (as the ``hf`` CLI): ``--json`` prints one JSON object on stdout; logs and the
progress bar (interactive terminals only) go to stderr. Exit codes: 0 done, 1 runtime
error, 2 usage error; errors are one line, with the traceback only under FMCONVERT_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fmconvert.errors import FmconvertError, UsageError
from fmconvert.evaluation.features import FEATURES
from fmconvert.integration.configs import SAMPLE_DTYPES
from fmconvert.math.grids import GRIDS, check_shift
from fmconvert.math.solvers import SOLVERS
from fmconvert.sampling.baselines import BASELINES
from fmconvert.sampling.runs import LORA_TARGETS, TrainSettings, resolved

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
    help="Convert diffusion models to flow-matching velocity fields and back, exactly; sample them with ODE solvers.",
)


def _listing(registry: dict) -> str:
    return "; ".join(f"{name}: {entry.summary}" for name, entry in registry.items())


def _solver_option_help(option: str) -> str:
    takers = {name: dict(s.options)[option] for name, s in SOLVERS.items() if option in dict(s.options)}
    return f"Solver option {option} ({', '.join(f'{n}: default {d:g}' for n, d in takers.items())}); refused for other solvers."


# -- options shared by several commands, declared once (read from the registries) ---------------------
Steps = Annotated[str, typer.Option(help="Solver steps (the NFE is counted and reported, not assumed); comma-separated for a sweep.")]
Solver = Annotated[str, typer.Option(help="ODE solver: " + _listing(SOLVERS) + ".")]
Grid = Annotated[str, typer.Option(help="Time grid: " + _listing(GRIDS) + ".")]
Shift = Annotated[Optional[float], typer.Option(help="Time shift k of the uniform or flowmatch grid, s = k·u/(1 + (k − 1)·u) (SD3's shift: k > 1 puts more steps near the noise); default: the source scheduler's own (1 for a diffusion model). Few-step sampling gains from 1.5 to 2 (SAMPLERS.md).")]
Baseline = Annotated[Optional[list[str]], typer.Option(help="A diffusers scheduler driving the unconverted source on the same noise (NFE counted from network calls), NAME[:key=value,...]; repeat it for several. NAME: " + _listing(BASELINES) + "; or a diffusers scheduler class name.")]
Rtol = Annotated[Optional[float], typer.Option(help=_solver_option_help("rtol"))]
Atol = Annotated[Optional[float], typer.Option(help=_solver_option_help("atol"))]
Dtype = Annotated[str, typer.Option(help="Network dtype: " + ", ".join(SAMPLE_DTYPES) + " (the conversion's coefficients stay float64).")]
Seed = Annotated[int, typer.Option(help="Noise seed: torch.randn((N, C, H, W), generator=Generator('cpu').manual_seed(seed)).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
NumImages = Annotated[int, typer.Option("--num-images", help="How many samples (per run).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Samples per model call, and per shard of --samples-dir.")]
SamplesDir = Annotated[Optional[Path], typer.Option("--samples-dir", help="Keep samples in shards here; a rerun reuses complete shards of the same run and refuses other settings.")]
ChannelsLast = Annotated[bool, typer.Option("--channels-last", help="GPU fast path: channels-last memory format.")]
Compile = Annotated[bool, typer.Option("--compile", help="GPU fast path: torch.compile the network.")]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow loading pickle weights (.bin/.ckpt): they can run code.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow running code shipped with the model.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
NumTimes = Annotated[int, typer.Option("--num-times", help="Times spread over the trained range.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
CheckpointEvery = Annotated[int, typer.Option("--checkpoint-every", help="Training steps between checkpoints; a rerun of the same command resumes from the last.")]
Private = Annotated[bool, typer.Option("--private", help="Publishing: create the Hub repo private. An existing repo must already be private: its visibility is never changed (refused before any upload; change it with hf repos settings REPO --private). Neither --private nor --public: the Hub's default for a new repo (public, or an organisation's private default), an existing one as it is.")]
Public = Annotated[bool, typer.Option("--public", help="Publishing: create the Hub repo public, even where an organisation's new repos are private by default. An existing repo must already be public (else refused before any upload). Not with --private.")]

#: the fields of fmconvert.sampling.runs.TrainSettings that train and reflow take as options: name: (type, help); the
#: defaults are the settings' own (--lora-targets: None, the settings' LORA_TARGETS)
TRAINING_OPTIONS: dict[str, tuple[object, str]] = {
    "steps": (int, "Optimiser steps."),
    "batch_size": (int, "Samples per step, over all processes."),
    "lr": (float, "AdamW's learning rate after the warm-up."),
    "warmup": (int, "Steps of linear learning-rate warm-up."),
    "lr_schedule": (str, "After the warm-up: constant, or cosine down to 10 %."),
    "weight_decay": (float, "AdamW's weight decay."),
    "max_grad_norm": (float, "Clip the gradient's norm to this (0: no clipping)."),
    "time_sampling": (str, "Density of s (s = 1 is noise), truncated to the source's trained range: uniform; logit_normal (SD3: logit(s) ~ N(mean, std²)); or u_shaped (Lee et al. 2024, for reflow: ∝ exp(a·s) + exp(a·(1 − s)), more weight at both ends)."),
    "logit_mean": (float, "logit-normal's mean m."),
    "logit_std": (float, "logit-normal's standard deviation."),
    "u_shape_a": (float, "u_shaped's a: the ends' density is (1 + exp(a))/(2·exp(a/2)) times the middle's (a = 4: 3.8)."),
    "loss_type": (str, "The per-sample loss of the velocity error: l2 (the flow-matching loss), or pseudo_huber (√(‖δ‖² + c²) − c, c = 0.00054·d; Lee et al. 2024 for reflow): a large error pulls no harder than a moderate one."),
    "ema_decay": (float, "EMA of the weights (torch's AveragedModel), written instead of the raw weights; 0: off."),
    "lora_rank": (int, "Train LoRA adapters of this rank (peft) instead of the whole network, merged into the written weights; 0: off."),
    "lora_alpha": (Optional[int], "LoRA's alpha (default: the rank)."),
    "lora_targets": (Optional[str], "Comma-separated names of the modules LoRA adapts (default: the attention projections "
                     f"{', '.join(LORA_TARGETS)})."),
    "mixed_precision": (str, "no, bf16, or fp16 (GPU only), through accelerate's autocast."),
    "prediction_type": (Optional[str], "What the network learns to predict on the source's path: epsilon, v_prediction or sample (default: what it predicts now; diffusion sources only). Another one reinterprets its output, which training then re-learns: v_prediction is well conditioned at the noise end, where epsilon's x0 estimate divides by alpha."),
}


def training_options(**renamed: str):
    """Add :data:`TRAINING_OPTIONS` and --checkpoint-every to a command's options (after its own),
    declared once for every command that trains; ``renamed``: an option under another name
    (steps="train_steps": --train-steps). The command receives them as ``training``, a dict of
    TrainSettings fields (--time-sampling's and --loss-type's dashes made underscores, --lora-targets split; left
    out where not given), and ``checkpoint_every``."""
    names = {field: renamed.get(field, field) for field in TRAINING_OPTIONS}

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in ("training", "checkpoint_every")]
        defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)} | {"lora_targets": None}
        added = [inspect.Parameter(names[f], inspect.Parameter.KEYWORD_ONLY, default=defaults[f],
                                   annotation=Annotated[kind, typer.Option("--" + names[f].replace("_", "-"), help=text)])
                 for f, (kind, text) in TRAINING_OPTIONS.items()]
        added.append(inspect.Parameter("checkpoint_every", inspect.Parameter.KEYWORD_ONLY, default=500,
                                       annotation=CheckpointEvery))

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            training = {f: kwargs.pop(names[f]) for f in TRAINING_OPTIONS}
            for choice in ("time_sampling", "loss_type"):  # (logit-normal, u-shaped, pseudo-huber as written)
                training[choice] = training[choice].replace("-", "_")
            if training["lora_targets"] is None:
                del training["lora_targets"]
            else:
                training["lora_targets"] = tuple(t.strip() for t in training["lora_targets"].split(",") if t.strip())
            return command(*args, training=training, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + added)
        return wrapper

    return decorate


def _main_process() -> bool:
    if "torch.distributed" not in sys.modules:  # no process group joined (and torch not needed to know it)
        return True
    from fmconvert.sampling import distributed

    return distributed.is_main()


def log(message: str) -> None:
    """A log line on stderr (rank 0 alone under torchrun)."""
    if _main_process():
        print(message, file=sys.stderr, flush=True)


def say(message: str) -> None:
    """A result line on stdout (rank 0 alone)."""
    if _main_process():
        print(message, flush=True)


def emit_json(payload: dict) -> None:
    say(json.dumps(payload, indent=2, default=str))


#: the environment variables a command may set for the libraries it imports (:func:`_interactive`)
_SETS_ENVIRONMENT = ("DIFFUSERS_VERBOSITY",)


def handle_errors(command):
    """One-line errors with the right exit code; tracebacks only with FMCONVERT_DEBUG=1.

    FmconvertError: its exit code (UsageError 2, else 1). ValueError: the library's way of
    saying an argument cannot be honoured (a grid the source cannot have, steps beyond its
    schedule, a config it cannot map), so a usage error, exit 2, in every command. Anything
    else: exit 1, with its type."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        saved = {name: os.environ.get(name) for name in _SETS_ENVIRONMENT}
        try:
            result = command(*args, **kwargs)
            _leave_together()
            return result
        except typer.Exit:
            raise
        except FmconvertError as error:
            if os.environ.get("FMCONVERT_DEBUG") == "1":
                raise
            log(f"error: {error}")
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            log("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except ValueError as error:
            if os.environ.get("FMCONVERT_DEBUG") == "1":
                raise
            log(f"error: {_first_line(error)}")
            raise typer.Exit(UsageError.exit_code) from None
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("FMCONVERT_DEBUG") == "1":
                raise
            log(f"error: {type(error).__name__}: {_first_line(error)} (set FMCONVERT_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None
        finally:  # a command called in-process (typer's CliRunner, a notebook) leaves the environment as it was
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    return wrapper


def _leave_together() -> None:
    """Under torchrun, a command that finished waits for every rank before the process exits: the
    others are done once rank 0 has gathered their samples, and one leaving while rank 0 still writes
    can abort rank 0 in gloo's teardown ("terminate called without an active exception": 4 of 30
    two-process `sample` runs without this wait, 0 of 30 with it). Not on an error, where a peer may
    never arrive."""
    if "torch.distributed" in sys.modules:  # (torch not imported: no group joined)
        from fmconvert.sampling import distributed

        distributed.barrier()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _choice(value: str, choices, option: str) -> str:
    if value not in choices:
        raise UsageError(f"unknown {option} '{value}': use one of {', '.join(choices)}")
    return value


def _device(device: str) -> str:
    """Validate --device and, under torchrun, join the process group (this rank's device)."""
    import torch

    from fmconvert.sampling import distributed

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for but no CUDA device is available; use --device cpu")
    return distributed.init(device)


def _computed_on(device: str) -> dict:
    """Where the numbers were computed, for --json: the device, this process's torch threads and
    the number of processes. Results are bit-identical only where these (and the batch size) are
    the same, or the world size alone changes (README, "Reproducibility")."""
    import torch

    from fmconvert.sampling import distributed

    return {"device": device, "threads": torch.get_num_threads(), "world_size": distributed.world_size()}


def _interactive(as_json: bool, import_diffusers: bool = True) -> bool:
    """Progress bars only on an interactive stderr, and never with --json: fmconvert's and the
    libraries' own (diffusers', transformers' "Loading weights", huggingface_hub's), whose logs are
    set to errors only. A command that may not import diffusers at all (``import_diffusers=False``:
    wrap) sets its level through DIFFUSERS_VERBOSITY, which diffusers reads when it is imported (and
    :func:`handle_errors` puts back as it was when the command returns)."""
    interactive = not as_json and sys.stderr.isatty()
    if os.environ.get("FMCONVERT_DEBUG") == "1":
        return interactive
    if not interactive:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # (transformers takes its own setting from it when it is imported)
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
    if not import_diffusers and "diffusers" not in sys.modules:
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        return interactive
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if not interactive:
        diffusers_logging.disable_progress_bar()
    return interactive


@app.command()
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
    from fmconvert.integration.pipelines import TARGETS, inspect_source, write_converted

    _interactive(as_json, import_diffusers=False)
    _choice(to, TARGETS, "--to")
    _new_output(out, force)
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


@app.command()
@handle_errors
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
    prompt: Optional[str] = typer.Option(None, help="Text prompt (text-conditioned pipelines)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt (the unconditional branch of guidance)."),
    class_label: Optional[list[str]] = typer.Option(None, "--class-label", help="Class label (int or id2label name) for class-conditional models (DiT); repeat it to cycle labels over the images."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="Classifier-free guidance weight (1 = none)."),
    image_embeds: Optional[Path] = typer.Option(None, "--image-embeds", help="A .safetensors file with 'image_embeds' (and 'negative_image_embeds' for guidance), (1 or N, D), from the model's prior (Kandinsky 2.2)."),
    height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the model's sample_size)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the model's sample_size)."),
    guidance_rescale: float = typer.Option(0.0, "--guidance-rescale", help="Rescale the guided prediction (Lin et al. 2024), applied to the source's own prediction: exact (SD, SDXL)."),
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
):
    """Sample MODEL as a velocity field with an ODE solver (or, with --baseline, its own sampler)."""
    from fmconvert.integration.families import Conditioning

    (steps_value,) = _steps(steps, single=True)
    if not 0.0 <= guidance_rescale <= 1.0:
        raise UsageError(f"--guidance-rescale must be in [0, 1], got {guidance_rescale}")
    embeds = _read_embeddings(image_embeds) if image_embeds is not None else {}
    conditioning = Conditioning(prompt=prompt, negative_prompt=negative_prompt, class_labels=tuple(class_label or ()),
                                image_embeds=embeds.get("image_embeds"),
                                negative_image_embeds=embeds.get("negative_image_embeds"),
                                guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
    _positive(num_images=num_images, batch_size=batch_size,
              **{name: value for name, value in (("height", height), ("width", width)) if value is not None})
    if out is not None and out.suffix.lower() != ".png" and out.exists() and not force:
        raise UsageError(f"output '{out}' already exists; pass --force to replace it")
    if baseline is not None and len(baseline) > 1:
        raise UsageError(f"sample draws one run: give one --baseline, got {len(baseline)} (fid compares several)")
    run, source = _run(model, revision, allow_pickle, trust_remote_code, solvers=[solver], baselines=baseline or [],
                       grid=grid, shift=shift, steps=steps_value, seed=seed, dtype=dtype, conditioning=conditioning,
                       num_images=num_images, shard_size=batch_size, rtol=rtol, atol=atol)
    run = resolved(run, source.shifts_times)
    # what the family cannot honour, from the configs alone: before any weight is read (again with the
    # pipeline and network once loaded, for the checks that need them)
    source.family.check(conditioning, source.pipeline_class, num_images=num_images)
    if baseline:
        mixed = [f"--{k} {v}" for k, v, default in (("solver", solver, "euler"), ("grid", grid, "uniform"),
                                                    ("shift", shift, None), ("rtol", rtol, None), ("atol", atol, None))
                 if v != default]
        if mixed:
            raise UsageError(f"--baseline {baseline[0]} samples with its own scheduler on its own timesteps: "
                             f"{mixed[0]} does not apply")
        from fmconvert.sampling.runs import sweep_runs

        (run,) = sweep_runs(run, [], [steps_value], baseline)
    if samples_dir is not None:  # a folder of other settings is refused before the model is loaded
        from fmconvert.sampling.shards import ShardStore

        ShardStore.check(samples_dir, run.manifest())
    device = _device(device)

    import torch

    from fmconvert.sampling.generate import generate_sharded, iter_run, load_velocity_model, sample_shape

    interactive = _interactive(as_json)
    vm = load_velocity_model(model, revision, getattr(torch, dtype), device, allow_pickle, trust_remote_code,
                             channels_last=channels_last, compile=compile)
    vm.resize(height, width)
    vm.source.family.check(conditioning, vm.source.pipeline_class, vm.pipeline, vm.velocity.config, num_images)
    run = run.loaded(vm.source.model_class, sample_shape(vm))
    store = None
    if samples_dir is not None:
        from fmconvert.sampling.shards import ShardStore

        store = ShardStore(samples_dir, run.manifest())
    log(f"sampling {run.describe()}, on {device}")
    result, reused = generate_sharded(vm, lambda ranges: iter_run(vm, run, device, ranges, progress=interactive),
                                      num_images, batch_size, store, device)
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
    payload = {
        "loaded": vm.info, "run": run.manifest(), "solver": run.sampler, "grid": run.grid, "shift": run.shift,
        "steps": run.steps,
        "nfe": max(result.nfe), "nfe_per_batch": result.nfe, "num_images": num_images, "batch_size": batch_size,
        "seed": seed, **_computed_on(device), "dtype": dtype, "shape": list(run.shape or ()),
        "conditioning": conditioning.describe(), "seconds": round(result.seconds, 4), "outputs": outputs,
    }
    if samples_dir is not None:
        payload["samples_dir"], payload["shards_reused"] = str(samples_dir), reused
    if as_json:
        emit_json(payload)
    else:
        log(f"done: NFE {payload['nfe']}, {result.seconds:.2f} s" +
            "".join(f"; wrote {v}" for v in outputs.values()))


def _run(model: str, revision, allow_pickle: bool, trust_remote_code: bool, *, solvers: list[str], grid: str,
         dtype: str, baselines: list[str] | None = None, rtol: float | None = None, atol: float | None = None,
         shift: float | None = None, **fields):
    """The first solver's run from the command line (:class:`fmconvert.sampling.runs.Run`; a sweep's others
    follow by :func:`fmconvert.sampling.runs.sweep_runs`), every choice checked against its registry, and
    the source it names (read for its fingerprint only: configs and the ends of its files, no
    loading). Solver ``auto`` is left to the caller to resolve, run by run, once the runs are made
    (:func:`fmconvert.sampling.runs.resolved`)."""
    from fmconvert.integration.pipelines import inspect_source
    from fmconvert.sampling.runs import Run, model_fingerprint, solver_options

    for name in solvers:
        _choice(name, SOLVERS, "--solver")
    _choice(grid, GRIDS, "--grid")
    try:
        check_shift(grid, shift)
    except ValueError as error:
        raise UsageError(f"--shift {shift}: {error}") from None
    _choice(dtype, SAMPLE_DTYPES, "--dtype")
    from fmconvert.sampling.baselines import parse_baseline

    for spec in baselines or []:
        parse_baseline(spec)  # (an unknown name or a malformed option: refused here)
    given = {k: v for k, v in {"rtol": rtol, "atol": atol}.items() if v is not None}
    for option in given:
        if not any(option in dict(SOLVERS[name].options) for name in solvers):
            takers = ", ".join(n for n, s in SOLVERS.items() if option in dict(s.options))
            raise UsageError(f"--{option} is an option of {takers}; {', '.join(solvers)} does not take it")
    source = inspect_source(model, revision, allow_pickle, trust_remote_code)
    from fmconvert.training.reflow import couplings_seed

    if "seed" in fields and couplings_seed(source.folder) == fields["seed"]:
        log(f"note: seed {fields['seed']} is the noise '{model}' was reflowed on (its couplings.json): its samples from it "
            "repeat training pairs; pass another --seed to measure it on held-out noise")
    return Run(model=model, fingerprint=model_fingerprint(source), sampler=solvers[0], grid=grid, shift=shift, dtype=dtype,
               options=solver_options(solvers[0], **given), **fields), source


def _new_output(out: Path, force: bool) -> None:
    """Refuse an existing output without --force (before any work)."""
    if out.exists() and not force:
        raise UsageError(f"output '{out}' already exists; pass --force to replace it")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _read_embeddings(path: Path) -> dict:
    """--image-embeds: a safetensors file whose 'image_embeds' (and 'negative_image_embeds') are (1 or N, D)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UsageError(f"--image-embeds '{path}' does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UsageError(f"--image-embeds '{path}' is not a safetensors file: {error}") from None
    if "image_embeds" not in tensors or any(t.ndim != 2 for t in tensors.values()):
        raise UsageError(f"--image-embeds '{path}' needs a 2-d 'image_embeds' tensor (and optionally "
                         f"'negative_image_embeds'); it has {', '.join(tensors) or 'nothing'}")
    return tensors


def _steps(value: str, single: bool = False) -> list[int]:
    """--steps: solver steps, comma-separated for a sweep (``single``: a command that draws one run)."""
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--steps takes comma-separated positive integers, got '{value}'") from None
    if not values or min(values) < 1:
        raise UsageError(f"--steps values must be positive integers, got '{value}'")
    if single and len(values) > 1:
        raise UsageError(f"this command draws one run: give one --steps value, got '{value}' (fid sweeps step counts)")
    return values


@app.command()
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
    from fmconvert.evaluation.agreement import field_vs_field, field_vs_source, load_points, loss_identity, trajectory_agreement
    from fmconvert.files.references import parse_data
    from fmconvert.math.paths import DiscreteVPSchedule
    from fmconvert.sampling.generate import generate_run, load_velocity_model, sample_shape

    _interactive(as_json)
    dtype_list = [d.strip() for d in dtypes.split(",") if d.strip()]
    for d in dtype_list:
        _choice(d, SAMPLE_DTYPES, "--dtypes")
    steps_list = _steps(steps)
    _positive(num_times=num_times, num_points=num_points, num_images=num_images)
    if loss and other is not None:
        raise UsageError("--loss compares a model's converted field with its own source; drop OTHER or --loss")
    if data is not None:
        parse_data(data)  # (before any model is loaded)
    # the points, when no --data: the model's own samples, Euler 50 steps (a run like any other)
    points_run, _ = _run(model, None, False, False, solvers=["euler"], grid="uniform", dtype="float32", steps=50, seed=seed,
                      num_images=num_points, shard_size=256)
    device = _device(device)
    # the agreement measures the conversion: apply it in float64 (the network keeps its dtype)
    vm = load_velocity_model(model, device=device, compute_dtype="float64")
    if vm.source.family.accepts:
        raise UsageError(f"agree compares unconditional fields; {vm.source.pipeline_class} ({vm.source.family.title}) "
                         "needs its conditioning, which agree does not take yet")
    payload: dict = {"model": model, "loaded": vm.info, "data": data or "own samples", **_computed_on(device), "runs": []}
    points_run = points_run.loaded(vm.source.model_class, sample_shape(vm))
    if data is not None:
        points = load_points(data, num_points)
        if tuple(points.shape[1:]) != tuple(points_run.shape or ()):
            raise UsageError(f"--data {data} holds {'×'.join(map(str, points.shape[1:]))} images; {model} takes "
                             f"{'×'.join(map(str, points_run.shape or ()))} (channels × height × width): give data of "
                             "that shape, or leave --data out to use the model's own samples")
    else:
        log(f"no --data: using {points_run.describe()} as the points")
        points = generate_run(vm, points_run, device).samples
        payload["runs"].append(points_run.manifest())
    payload["num_points"] = len(points)
    if other is None:
        log(f"field of {model} against its source's PF-ODE drift at {num_times} times, dtypes {', '.join(dtype_list)}")
        result = field_vs_source(vm.velocity, points, num_times, dtype_list, seed=seed, device=device)
        payload["field"] = {"s": result.s, **result.per_dtype}
        if isinstance(vm.grid_source, DiscreteVPSchedule) and not vm.source.converted:  # DDIM needs its timesteps
            log(f"trajectories: Euler vs the source's DDIM along the same timesteps at steps {steps}")
            rows, runs = trajectory_agreement(vm, points_run, steps_list, num_images, device=device)
            payload["trajectories"] = rows
            payload["runs"] += [run.manifest() for run in runs]
        if loss:
            log(f"loss identity: flow-matching loss vs the source's epsilon loss × (1 − s)⁻² at {num_times} times")
            payload["loss"] = loss_identity(vm.velocity, points, num_times, seed=seed, device=device)
    else:
        vm2 = load_velocity_model(other, device=device, compute_dtype="float64")
        log(f"field of {model} against the field of {other} at {num_times} times")
        result = field_vs_field(vm.velocity, vm2.velocity, points, num_times, seed=seed, device=device)
        payload["other"] = other
        payload["field"] = {"s": result.s, **result.per_dtype}
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


@app.command()
@handle_errors
def fid(
    model: str = typer.Argument(..., help="A converted folder or any SOURCE."),
    reference: str = typer.Option(..., "--reference", help="builtin:digits[/train|/held_out], an image folder, or a statistics file (.safetensors)."),
    features: str = typer.Option("digits", help="Feature extractor: " + _listing(FEATURES) + "."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="weights-inception-2015-12-05-6726825d.pth; default: torch hub cache, else download."),
    inception_layer: str = typer.Option("2048", "--inception-layer", help="Inception feature layer: 64, 192, 768, 2048."),
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
    from fmconvert.evaluation.fid import make_extractor, reference_stats, save_stats, sweep
    from fmconvert.files.references import parse_data
    from fmconvert.sampling.generate import load_velocity_model
    from fmconvert.sampling.runs import sweep_runs

    interactive = _interactive(as_json)
    _choice(features, FEATURES, "--features")
    solvers = [v.strip() for v in solver.split(",") if v.strip()]
    steps_list = _steps(steps)
    for name, value in (("--num-images", num_images), ("--batch-size", batch_size)):
        if value < 2:
            raise UsageError(f"{name} must be at least 2, got {value}")
    parse_data(reference, statistics=True)  # (before any model is loaded or sample drawn)
    base, source = _run(model, None, False, False, solvers=solvers, baselines=baseline, grid=grid, shift=shift,
                        dtype=dtype, rtol=rtol, atol=atol, steps=steps_list[0], seed=seed, num_images=num_images,
                        shard_size=batch_size)
    runs = [resolved(run, source.shifts_times) for run in sweep_runs(base, solvers, steps_list, baseline or [], rtol=rtol,
                                                                      atol=atol)]
    if samples_dir is not None:  # a folder of other settings is refused before the model is loaded
        from fmconvert.sampling.shards import ShardStore

        for run in runs:
            ShardStore.check(Path(samples_dir) / run.slug(), run.manifest())
    device = _device(device)
    import torch

    extractor = make_extractor(features, inception_weights, inception_layer, device)
    if num_images <= extractor.num_features:
        log(f"warning: {num_images} samples for {extractor.num_features}-dimensional {extractor.name} features: the "
            "covariance is singular and the FID is biased high; use more samples than dimensions to compare numbers")
    vm = load_velocity_model(model, dtype=getattr(torch, dtype), device=device, channels_last=channels_last, compile=compile)
    from fmconvert.sampling.generate import image_shape

    extractor.check(image_shape(vm))
    log(f"FID of {model} against {reference} in {extractor.name} features: {', '.join(solvers)}"
        f"{''.join(f' and {b} (baseline)' for b in baseline or [])} at steps {steps}, {num_images} samples each")
    result = sweep(vm, reference, extractor, runs, device, progress=interactive, use_cache=not no_cache,
                   samples_dir=samples_dir)
    result["model"], result["loaded"] = model, vm.info
    result.update(_computed_on(device))
    if save_reference_stats is not None:
        stats = reference_stats(reference, extractor, device=device).stats  # every rank: it may synchronise
        if _main_process():
            save_stats(stats, save_reference_stats, extractor, reference)
        result["saved_reference_stats"] = str(save_reference_stats)
    if plot is not None and _main_process():
        from fmconvert.evaluation.fid import plot_sweep

        result["plot"] = str(plot_sweep(result, plot))
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


@app.command()
@handle_errors
@training_options()
def train(
    model: str = typer.Argument(..., help="A converted folder, or any SOURCE (wrapped on the fly): the velocity model to fine-tune."),
    data: str = typer.Option(..., "--data", help="builtin:digits[/train|/held_out], an image folder (pixels → [-1, 1]), or a folder of latent shards (shard-*.safetensors, key 'samples', as --samples-dir writes them)."),
    out: Path = typer.Option(..., "--out", "-o", help="The trained converted folder to write; its checkpoint lives in OUT.partial until then."),
    seed: int = typer.Option(0, "--seed", help="Seeds the data order and the noise and times of every step (by step, so a resume repeats them)."),
    device: Device = "auto",
    force: Force = False,
    as_json: AsJson = False,
    *,
    training: dict,
    checkpoint_every: int,
):
    """Fine-tune MODEL with the conditional flow-matching loss on the rectified path; write a converted folder."""
    from fmconvert.training.loop import TrainSettings
    from fmconvert.training.loop import train as train_model

    interactive = _interactive(as_json)
    _new_output(out, force)
    settings = TrainSettings.create(model, data, seed=seed, **training)
    with _resumable(out):
        summary = train_model(settings, out, device=device, checkpoint_every=checkpoint_every, force=force,
                              progress=interactive, log=log)
    if as_json:
        emit_json(summary)
    else:
        log(f"trained {settings.steps} steps in {summary['seconds']:.1f} s (loss {summary['first_loss']:.4g} → "
            f"{summary['last_loss']:.4g}); wrote {out}")


@app.command()
@handle_errors
@training_options(steps="train_steps")
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

    interactive = _interactive(as_json)
    _new_output(out, force)
    (steps_value,) = _steps(steps, single=True)
    _positive(num_couplings=num_couplings, sample_batch_size=sample_batch_size, checkpoint_every=checkpoint_every)
    couplings, source = _run(model, None, False, False, solvers=[solver], grid=grid, shift=shift, dtype="float32",
                             steps=steps_value, seed=seed, num_images=num_couplings, shard_size=sample_batch_size)
    couplings = resolved(couplings, source.shifts_times)
    with _resumable(out, couplings_dir):
        summary = reflow_model(couplings, out, distill=distill, couplings_dir=couplings_dir, device=device,
                               checkpoint_every=checkpoint_every, force=force, progress=interactive, log=log,
                               seed=seed, **training)
    if as_json:
        emit_json(summary)
    else:
        log(f"reflowed {model}: {num_couplings} couplings, {summary['steps']} training steps in {summary['seconds']:.1f} s "
            f"(loss {summary['first_loss']:.4g} → {summary['last_loss']:.4g}); wrote {out}")


@contextlib.contextmanager
def _resumable(out: Path, couplings_dir: Path | None = None):
    """On an interruption (exit 130), say what a rerun of the same command resumes: the last
    checkpoint in OUT.partial, else the couplings' complete shards (reflow), else nothing."""
    from fmconvert.training.loop import CHECKPOINT, checkpoint_step, work_folder

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


@app.command()
@handle_errors
def report(
    model: str = typer.Argument("builtin:digits-eps", help="A diffusion SOURCE to convert and evaluate."),
    other: Optional[str] = typer.Option("builtin:digits-flow", help="A second model whose field to compare ('' for none)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="The report folder."),
    data: str = typer.Option("builtin:digits/held_out", help="Points for the field agreement."),
    reference: str = typer.Option("builtin:digits", help="FID reference (digits features)."),
    steps: Steps = "4,8,16,32",
    num_images: NumImages = 1000,
    num_times: NumTimes = 20,
    seed: Seed = 0,
    device: Device = "auto",
    force: Force = False,
    as_json: AsJson = False,
):
    """Convert MODEL, compare it with its source (and OTHER), run the FID sweep; write a report folder."""
    from fmconvert.evaluation.report import build_report

    interactive = _interactive(as_json)
    _new_output(out, force)
    numbers = build_report(model, other or None, out, data, reference, tuple(_steps(steps)),
                           num_images=num_images, num_times=num_times, seed=seed, device=_device(device), force=force,
                           progress=interactive, log=log)
    if as_json:
        emit_json(numbers)
    else:
        log(f"wrote {out}/report.md ({numbers['seconds']} s)")


@app.command()
@handle_errors
def push(
    folder: Path = typer.Argument(..., help="A folder written by fmconvert wrap."),
    repo_id: str = typer.Argument(..., help="owner/name on the Hub (HF_ENDPOINT picks the Hub)."),
    private: Private = False,
    public: Public = False,
    revision: Optional[str] = typer.Option(None, help="Branch to commit to (created if missing)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing to the branch."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message"),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or the login cache); never printed."),
    report_dir: Optional[Path] = typer.Option(None, "--report", help="A folder from fmconvert report: its tables and grids go into the model card."),
    as_json: AsJson = False,
):
    """Publish a converted folder to the Hugging Face Hub in one commit.

    Refused before diffusers or torch is imported: --private with --public, an invalid repo
    id, a missing FOLDER or --report, offline mode (HF_HUB_OFFLINE=1). --private/--public set
    a new repo's visibility (HfApi.create_repo); an existing repo of the other visibility is
    refused before any upload, never changed (hf repos settings REPO --private changes it).
    --json's "private" is the visibility the Hub reports after the upload (HfApi.model_info)."""
    from fmconvert.integration.push import preflight, visibility
    from fmconvert.integration.push import push as push_folder

    asked = visibility(private, public)
    preflight(repo_id, folder, report_dir)
    _interactive(as_json)
    summary = push_folder(folder, repo_id, asked, revision, create_pr, commit_message, token, report_dir)
    if as_json:
        emit_json(summary)
    else:
        seen = {True: "private", False: "public"}.get(summary["private"], "visibility unknown")
        log(f"pushed {len(summary['files'])} files to {repo_id} ({seen}): {summary['pr_url'] or summary['commit_url']}")


def main() -> None:
    app(prog_name="fmconvert")


if __name__ == "__main__":
    main()
