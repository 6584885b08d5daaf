"""Baselines: diffusers' own schedulers driving the unconverted source network on the same noise
and conditioning as fmconvert's solvers (``baseline``; :func:`fmconvert.sampling.generate.iter_baseline`
runs them, counting network evaluations).

A baseline is named by an alias of :data:`BASELINES` (ddim, dpm++2m, unipc, ...), by ``default``
(the scheduler the source ships with), or by any diffusers scheduler class name; options follow a
colon, ``NAME:key=value,key=value`` (``dpm++2m:use_karras_sigmas=true``), and are set on top of
the source's scheduler config and the alias's own settings (:func:`parse_baseline`).

For a flow-matching source the multistep schedulers that have a flow mode (DPM-Solver++, UniPC,
DEIS) run with ``use_flow_sigmas``, ``prediction_type="flow_prediction"`` and the source's shift,
as diffusers configures them for flow models; schedulers without one are refused. diffusers is
imported where a scheduler is built; this module is plain Python otherwise (the command line's
help reads it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fmconvert.errors import UsageError

if TYPE_CHECKING:
    from fmconvert.integration.source import Source

#: settings that make DDIMScheduler the Euler ODE step on the trailing grid (clipping and thresholding
#: clamp x̂0, which no ODE does)
ODE_DDIM = (("timestep_spacing", "trailing"), ("clip_sample", False), ("set_alpha_to_one", True),
            ("thresholding", False))


@dataclass(frozen=True)
class Baseline:
    """A diffusers scheduler class with fmconvert's ``options`` on top of the source's config;
    ``summary``: one line for the command line's help; ``grid``: what its timesteps are called in a run's record
    (``own``: the scheduler's own spacing)."""

    name: str
    scheduler_class: str
    summary: str
    options: tuple[tuple[str, Any], ...] = ()
    grid: str = "own"


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline("ddim", "DDIMScheduler", "DDIM on its trailing timesteps, no clipping: Euler on the trailing grid equals it",
             ODE_DDIM, grid="trailing"),
    Baseline("ddpm", "DDPMScheduler", "DDPM ancestral sampling (stochastic)"),
    Baseline("pndm", "PNDMScheduler", "PLMS (skip_prk_steps), as Stable Diffusion 1.x ships", (("skip_prk_steps", True),)),
    Baseline("euler", "EulerDiscreteScheduler", "Euler in sigma (k-diffusion's)"),
    Baseline("euler_a", "EulerAncestralDiscreteScheduler", "Euler ancestral (stochastic)"),
    Baseline("heun", "HeunDiscreteScheduler", "Heun in sigma (2 evaluations a step)"),
    Baseline("lms", "LMSDiscreteScheduler", "linear multistep in sigma"),
    Baseline("dpm++2m", "DPMSolverMultistepScheduler", "DPM-Solver++ 2M",
             (("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
    Baseline("dpm++3m", "DPMSolverMultistepScheduler", "DPM-Solver++ 3M",
             (("algorithm_type", "dpmsolver++"), ("solver_order", 3))),
    Baseline("dpm++2m-sde", "DPMSolverMultistepScheduler", "DPM-Solver++ 2M SDE (stochastic)",
             (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2))),
    Baseline("unipc", "UniPCMultistepScheduler", "UniPC (bh2, order 2, corrector)"),
    Baseline("deis", "DEISMultistepScheduler", "DEIS multistep"),
    Baseline("default", "", "the scheduler the source ships with, as configured"),
)}


def _value(text: str) -> Any:
    """An option value: JSON (true, 3, 0.5, "x", null), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_baseline(spec: str) -> tuple[Baseline, tuple[tuple[str, Any], ...]]:
    """``NAME[:key=value,...]`` → (the baseline, the user's options, sorted). NAME: an alias of
    :data:`BASELINES` or a diffusers scheduler class name. UsageError for anything else."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    options = []
    for item in (part for part in rest.split(",") if part.strip()):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"baseline={spec!r}: its options are key=value pairs after a colon, "
                             "e.g. dpm++2m:use_karras_sigmas=true")
        options.append((key.strip(), _value(value.strip())))
    if name in BASELINES:
        return BASELINES[name], tuple(sorted(options))
    if name.endswith("Scheduler") and name.isidentifier():
        import diffusers

        if hasattr(diffusers, name):
            return Baseline(name, name, f"diffusers' {name}"), tuple(sorted(options))
    raise UsageError(f"unknown baseline={name!r}: use one of {', '.join(BASELINES)}, or a diffusers scheduler "
                     "class name (e.g. KDPM2DiscreteScheduler)")


def build_scheduler(spec: str, source: Source):
    """The diffusers scheduler that baseline ``spec`` stands for on ``source``: its class (the
    source's own for ``default``) from the source's scheduler config, prediction type and, for a
    flow source, flow mode; then the alias's settings, then the user's options. UsageError where
    it cannot run: a converted folder (no scheduler of its own), a flow source with a scheduler
    that has no flow mode, an option the class does not take."""
    import inspect

    import diffusers

    baseline, user = parse_baseline(spec)
    if source.converted:
        raise UsageError(f"baseline={spec!r} runs a source's own scheduler; '{source.reference}' is a converted model: "
                         "give its source")
    class_name = baseline.scheduler_class or source.scheduler.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise UsageError(f"baseline={spec!r}: diffusers has no {class_name}")
    takes = set(inspect.signature(cls.__init__).parameters)
    # diffusers' private keys dropped: a live config's _use_default_values names the keys from_config
    # resets to their defaults, which would silently undo the alias's settings (ddim's trailing spacing)
    config = {k: v for k, v in source.scheduler.items() if not k.startswith("_")}
    flow = source.prediction_type == "flow_prediction"
    if flow and not class_name.startswith("FlowMatch"):
        if "use_flow_sigmas" not in takes:
            flows = ", ".join(n for n, b in BASELINES.items() if b.scheduler_class in (
                "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")) + ", default"
            raise UsageError(f"baseline={spec!r}: {class_name} has no flow mode for the flow model '{source.reference}'; "
                             f"use {flows}")
        config.update(use_flow_sigmas=True, prediction_type="flow_prediction",
                      flow_shift=float(source.scheduler.get("shift", 1.0) or 1.0))
    elif not flow:
        if class_name.startswith("FlowMatch"):
            raise UsageError(f"baseline={spec!r}: {class_name} drives flow models; '{source.reference}' predicts "
                             f"{source.prediction_type}")
        config["prediction_type"] = source.prediction_type
    unknown = [key for key, _ in user if key not in takes]
    if unknown:
        raise UsageError(f"baseline={spec!r}: {class_name} takes no option {unknown[0]!r}")
    return cls.from_config({**config, **dict(baseline.options), **dict(user)})


def stochastic(scheduler) -> bool:
    """Whether the scheduler draws noise in its step (it then takes a ``generator``)."""
    name = type(scheduler).__name__
    return name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler") or "sde" in str(
        getattr(scheduler.config, "algorithm_type", ""))
