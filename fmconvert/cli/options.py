"""The options commands share, declared once (as the ``hf`` CLI does): their types, defaults and
help. Plain Python: ``--help`` imports neither torch nor diffusers."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from fmconvert.errors import UsageError
from fmconvert.evaluation.features import FEATURES
from fmconvert.integration.configs import SAMPLE_DTYPES
from fmconvert.math.grids import GRIDS
from fmconvert.math.solvers import SOLVERS
from fmconvert.sampling.baselines import BASELINES
from fmconvert.training.settings import LORA_TARGETS, TrainSettings


def listing(registry: dict) -> str:
    return "; ".join(f"{name}: {entry.summary}" for name, entry in registry.items())


def _solver_option_help(option: str) -> str:
    takers = {name: dict(s.options)[option] for name, s in SOLVERS.items() if option in dict(s.options)}
    return f"Solver option {option} ({', '.join(f'{n}: default {d:g}' for n, d in takers.items())}); refused for other solvers."


# -- options shared by several commands, declared once (read from the registries) ---------------------
Steps = Annotated[str, typer.Option(help="Solver steps (the NFE is counted and reported, not assumed); comma-separated for a sweep.")]


Solver = Annotated[str, typer.Option(help="ODE solver: " + listing(SOLVERS) + ".")]


Grid = Annotated[str, typer.Option(help="Time grid: " + listing(GRIDS) + "; or a tuned sampler file (.json, written by fmconvert tune): its grid for these steps; or tuned: the file fmconvert tune --into stored in a converted folder.")]


Shift = Annotated[Optional[float], typer.Option(help="Time shift k of the uniform or flowmatch grid, s = k·u/(1 + (k − 1)·u) (SD3's shift: k > 1 puts more steps near the noise); default: the source scheduler's own (1 for a diffusion model). Few-step sampling gains from 1.5 to 2 (docs/benchmarks/SAMPLERS.md).")]


Baseline = Annotated[Optional[list[str]], typer.Option(help="A diffusers scheduler driving the unconverted source on the same noise (NFE counted from network calls), NAME[:key=value,...]; repeat it for several. NAME: " + listing(BASELINES) + "; or a diffusers scheduler class name.")]


Rtol = Annotated[Optional[float], typer.Option(help=_solver_option_help("rtol"))]


Atol = Annotated[Optional[float], typer.Option(help=_solver_option_help("atol"))]


Dtype = Annotated[str, typer.Option(help="Network dtype: " + ", ".join(SAMPLE_DTYPES) + " (the conversion's coefficients stay float64).")]


Features = Annotated[str, typer.Option("--features", help="Feature extractor: " + listing(FEATURES) + ".")]
InceptionWeights = Annotated[Optional[Path], typer.Option("--inception-weights", help="weights-inception-2015-12-05-6726825d.pth; default: torch hub cache, else download.")]
InceptionLayer = Annotated[str, typer.Option("--inception-layer", help="Inception feature layer: 64, 192, 768, 2048.")]
Seed = Annotated[int, typer.Option(help="Noise seed: torch.randn((N, C, H, W), generator=Generator('cpu').manual_seed(seed)).")]


Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]


# what a conditional model is asked for (sample, tune): fmconvert.integration.conditioning.Conditioning
Prompt = Annotated[Optional[str], typer.Option(help="Text prompt (text-conditioned pipelines).")]


NegativePrompt = Annotated[Optional[str], typer.Option("--negative-prompt", help="Negative prompt (the unconditional branch of guidance).")]


ClassLabel = Annotated[Optional[list[str]], typer.Option("--class-label", help="Class label (int or id2label name) for class-conditional models (DiT); repeat it to cycle labels over the images.")]


GuidanceScale = Annotated[float, typer.Option("--guidance-scale", help="Classifier-free guidance weight (1 = none).")]


GuidanceRescale = Annotated[float, typer.Option("--guidance-rescale", help="Rescale the guided prediction (Lin et al. 2024), applied to the source's own prediction: exact (SD, SDXL).")]


ImageEmbeds = Annotated[Optional[Path], typer.Option("--image-embeds", help="A .safetensors file with 'image_embeds' (and 'negative_image_embeds' for guidance), (1 or N, D), from the model's prior (Kandinsky 2.2).")]


Height = Annotated[Optional[int], typer.Option("--height", help="Image height in pixels (default: the model's sample_size).")]


Width = Annotated[Optional[int], typer.Option("--width", help="Image width in pixels (default: the model's sample_size).")]


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


#: the fields of fmconvert.training.settings.TrainSettings that train and reflow take as options, each under
#: its field's name: name: (type, help); the defaults are the settings' own (--lora-targets: None, the
#: settings' LORA_TARGETS). Optimiser steps are --train-steps in every command (--steps: a solver's steps)
TRAINING_OPTIONS: dict[str, tuple[object, str]] = {
    "train_steps": (int, "Optimiser steps (--steps is a solver's steps)."),
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


def training_options(command):
    """Add :data:`TRAINING_OPTIONS` and --checkpoint-every to a command's options (after its own),
    declared once for every command that trains. The command receives them as ``training``, a dict
    of TrainSettings fields (--time-sampling's and --loss-type's dashes made underscores,
    --lora-targets split; left out where not given), and ``checkpoint_every``."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name not in ("training", "checkpoint_every")]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)} | {"lora_targets": None}
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name],
                               annotation=Annotated[kind, typer.Option("--" + name.replace("_", "-"), help=text)])
             for name, (kind, text) in TRAINING_OPTIONS.items()]
    added.append(inspect.Parameter("checkpoint_every", inspect.Parameter.KEYWORD_ONLY, default=500,
                                   annotation=CheckpointEvery))

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        training = {name: kwargs.pop(name) for name in TRAINING_OPTIONS}
        for choice in ("time_sampling", "loss_type"):  # (logit-normal, u-shaped, pseudo-huber as written)
            training[choice] = training[choice].replace("-", "_")
        if training["lora_targets"] is None:
            del training["lora_targets"]
        else:
            training["lora_targets"] = tuple(t.strip() for t in training["lora_targets"].split(",") if t.strip())
        return command(*args, training=training, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + added)
    return wrapper


#: what a conditional model is asked for, as sample and tune take it: parameter → its option
CONDITIONING_OPTIONS = {"prompt": (Prompt, None), "negative_prompt": (NegativePrompt, None), "class_label": (ClassLabel, None),
                        "guidance_scale": (GuidanceScale, 1.0), "image_embeds": (ImageEmbeds, None), "height": (Height, None),
                        "width": (Width, None), "guidance_rescale": (GuidanceRescale, 0.0)}


def conditioning_options(command):
    """Add :data:`CONDITIONING_OPTIONS` to a command's options (after its own), declared once for
    every command that samples a conditional model. The command receives ``conditioning``, the
    library's Conditioning (:func:`fmconvert.cli.checks.conditioning_from`: the image size checked,
    the embeddings read), and ``height`` and ``width`` (the image size, which is no conditioning)."""
    from fmconvert.cli.checks import conditioning_from

    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name not in ("conditioning", "height", "width")]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, (annotation, default) in CONDITIONING_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in CONDITIONING_OPTIONS}
        conditioning = conditioning_from(**given)
        return command(*args, conditioning=conditioning, height=given["height"], width=given["width"], **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + added)
    return wrapper


#: train's former spelling of its optimiser steps, hidden and refused in one line naming --train-steps
OldTrainSteps = Annotated[Optional[str], typer.Option("--steps", hidden=True, help="Renamed --train-steps.")]


def refuse_old_train_steps(steps: str | None) -> None:
    """train took its optimiser steps as --steps until they were given one name in every command."""
    if steps is not None:
        raise UsageError(f"train's optimiser steps are --train-steps {steps} (--steps is a solver's steps, as in "
                         "sample, fid and reflow)")
