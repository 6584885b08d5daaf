"""FlowMatchEulerScheduler: diffusers' FlowMatchEulerDiscreteScheduler for the pipelines of
diffusion models (Stable Diffusion, SDXL, DiT, PixArt, IF, Kandinsky, LDM), which call
``scheduler.scale_model_input`` and scale their initial noise by ``init_noise_sigma``.

Two config options beyond the parent's:

- ``sample_scaling`` — what the pipeline's ``latents`` hold while it loops:

  - ``"variance_preserving"``: x_s / √((1 − s)² + s²), DDIM's x_t at the same noise level
    (Euler's x/√(σ² + 1) in the same way). Noise drawn for the source's scheduler is then the
    right start on any grid; ``scale_model_input`` multiplies by √((1 − s)² + s²) for the
    network and ``step`` maps in and out. For pipelines that call ``scale_model_input``
    (whether or not they apply ``init_noise_sigma``, and whenever they do).
  - ``"initial"``: for pipelines that replace their sample with what ``scale_model_input``
    returns (DiT): the first call after ``set_timesteps`` lifts the noise to
    x_{s_0} = ε·√((1 − s_0)² + s_0²); later calls are the identity.
  - ``"none"``: the pipeline holds x_s itself; ``scale_model_input`` is the identity and
    ``init_noise_sigma`` is √((1 − s_0)² + s_0²) once ``set_timesteps`` has run. For
    pipelines that never call ``scale_model_input`` but scale their noise after
    ``set_timesteps`` (Kandinsky 2.2).

  The scalings are 1 at s = 1 and s = 0, so with the parent's default grid (from s = 1) the
  images are the parent's.
- ``timestep_spacing``: ``"flowmatch"`` (the parent's grid) or a grid of
  :func:`fmconvert.math.grids.time_grid` (``trailing`` on the source's schedule, whose path
  description is ``source_schedule``, makes the pipeline's own ``__call__`` reproduce the source's
  DDIMScheduler(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)).

- ``tuned_times``: grids fitted to the model for Euler (``fmconvert tune --solver euler --into
  DIR`` writes them): ``{"N": [s_0, …, s_N = 0]}``; ``set_timesteps(N)`` (the pipeline's
  ``num_inference_steps=N``) steps exactly those times, unshifted; other step counts, and
  explicit ``sigmas`` / ``timesteps``, are as without them.

``variance_type`` is None (there is no variance to learn on an ODE): pipelines that read it
(IF, Kandinsky) then drop a learned-variance network's extra channels before ``step``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import register_to_config

from fmconvert.math.paths import RectifiedFlow, path_from_config

if TYPE_CHECKING:  # what the mixin's super() reaches: the diffusers scheduler it is mixed into
    from diffusers import SchedulerMixin as _SchedulerBase
else:
    _SchedulerBase = object

SAMPLE_SCALINGS = ("variance_preserving", "initial", "none")


def _norm(s: torch.Tensor | float) -> float:
    """√((1 − s)² + s²) (:attr:`Point.norm` on the rectified path): |x_s| relative to the
    variance-preserving point of equal noise level."""
    return float(RectifiedFlow().point(torch.tensor(float(s), dtype=torch.float64)).norm)


class FlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler with ``scale_model_input``, ``init_noise_sigma``, a
    choice of what the pipeline's sample holds and of the default grid (module docstring).
    Timesteps are float (1000·s); a converted network snaps them back to the source's
    integer timesteps where they came from one."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, sample_scaling: str = "none",
                 timestep_spacing: str = "flowmatch", source_schedule: dict | None = None,
                 variance_type: str | None = None, steps_offset: int = 0,
                 tuned_times: dict[str, list[float]] | None = None, **kwargs: Any):
        from fmconvert.math.grids import GRIDS

        if sample_scaling not in SAMPLE_SCALINGS:
            raise ValueError(f"unknown sample_scaling {sample_scaling!r}: use {', '.join(SAMPLE_SCALINGS)}")
        if timestep_spacing not in GRIDS:
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}: use {', '.join(GRIDS)}")
        if variance_type is not None:
            raise ValueError("FlowMatchEulerScheduler has no variance: variance_type must be None")
        reshaping = [k for k in ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                 "use_beta_sigmas", "invert_sigmas") if kwargs.get(k)]
        if timestep_spacing != "flowmatch" and reshaping:
            raise ValueError(f"timestep_spacing={timestep_spacing!r} is a grid of the source's times; {reshaping[0]} "
                             "would reshape it: use one or the other")
        for steps, times in (tuned_times or {}).items():
            s = np.asarray(times, dtype=np.float64)
            if not (str(steps).isdigit() and len(s) == int(steps) + 1 and s[-1] == 0 and s[0] <= 1
                    and bool((np.diff(s) < 0).all())):
                raise ValueError(f"tuned_times[{steps!r}] must be {steps} + 1 decreasing times s in [0, 1] ending at 0")
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift, **kwargs)
        self._lifted = False

    @staticmethod
    def _get_init_keys(input_class):
        """The parent's options count as this class's own (they arrive through ``**kwargs``):
        ``from_config`` keeps them instead of dropping them with a warning."""
        keys = set(inspect.signature(input_class.__init__).parameters)
        if issubclass(input_class, FlowMatchEulerScheduler):
            keys |= set(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters)
        return keys

    @property
    def init_noise_sigma(self) -> float:
        if self.config.sample_scaling == "none":
            return _norm(self.sigmas[0])
        return 1.0

    def _source_path(self):
        schedule = self.config.source_schedule
        if schedule:  # a path description; beta settings alone (fmconvert 0.1) are a discrete schedule
            return path_from_config(schedule if "kind" in schedule else {"kind": "discrete_vp", **schedule})
        return RectifiedFlow(num_train_timesteps=self.config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      mu: float | None = None, timesteps: Any = None) -> None:
        """The parent's ``set_timesteps``; without sigmas or timesteps and with a
        ``timestep_spacing`` other than flowmatch, the grid is that of fmconvert's grids
        (the parent then applies ``shift`` and appends s = 0, as to any custom sigmas)."""
        spacing = self.config.timestep_spacing
        tuned = (self.config.tuned_times or {}).get(str(num_inference_steps))
        if sigmas is None and timesteps is None and tuned is not None:
            s = torch.tensor(tuned, dtype=torch.float32, device=device)
            self.num_inference_steps = len(tuned) - 1
            self.timesteps, self.sigmas = s[:-1] * self.config.num_train_timesteps, s
            self._step_index = self._begin_index = None
            self._lifted = False
            return
        if sigmas is None and timesteps is None and spacing != "flowmatch":
            from fmconvert.math.grids import time_grid

            if num_inference_steps is None:  # the TypeError int(None) raised, with its reason
                raise TypeError("set_timesteps needs num_inference_steps, sigmas or timesteps")
            sigmas = time_grid(spacing, int(num_inference_steps), self._source_path(),
                               steps_offset=self.config.steps_offset)[:-1].tolist()
            num_inference_steps = None
        super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        self._lifted = False

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network's input x_s from the pipeline's sample (identity under ``"none"``)."""
        mode = self.config.sample_scaling
        if mode == "none" or (mode == "initial" and self._lifted):
            return sample
        if self.step_index is None:
            self._init_step_index(timestep)
        self._lifted = True
        return sample * _norm(self.sigmas[self.step_index])

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args, return_dict: bool = True,
             **kwargs):
        """Euler from s_i to s_{i+1} on x_s (the parent's step), in the pipeline's sample
        scaling. As a tuple: (prev_sample, x̂0 = x_s − s·u), as DDIM's step gives its
        pred_original_sample (PixArt's one-step path reads it)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        vp = self.config.sample_scaling == "variance_preserving"
        x = sample.to(torch.float32) * _norm(self.sigmas[index]) if vp else sample
        out = super().step(model_output, timestep, x, *args, return_dict=return_dict, **kwargs)
        prev = out.prev_sample if return_dict else out[0]
        if vp:
            prev = (prev.to(torch.float32) / _norm(self.sigmas[index + 1])).to(model_output.dtype)
        if return_dict:
            out.prev_sample = prev
            return out
        x0 = (x.to(torch.float32) - float(self.sigmas[index]) * model_output.to(torch.float32)).to(model_output.dtype)
        return prev, x0


# -- discrete schedulers in the pipelines of flow models -------------------------------------------


def pipeline_default_sigmas(num_inference_steps: int) -> np.ndarray:
    """The grid a flow pipeline (FluxPipeline) hands its scheduler when the user gives none:
    linspace(1, 1/N, N), exactly as its ``__call__`` computes it."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


class FlowPipelineSchedulerMixin(_SchedulerBase):
    """``set_timesteps`` that accepts the flow-only arguments flow pipelines hand every scheduler.

    FluxPipeline calls ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=...)`` whether or not the
    user chose a grid. On a discrete schedule:

    - ``sigmas`` equal to that default stand for ``num_inference_steps = N`` (the scheduler's own
      grid, by its ``timestep_spacing``); any other sigmas are refused (ValueError, one line):
      a FlowMatch grid has no exact counterpart on integer timesteps;
    - ``mu``, the dynamic shift the pipeline computes from the image size, shifts FlowMatch grids
      only: unused here, as FlowMatchEulerDiscreteScheduler leaves it unused without
      ``use_dynamic_shifting`` (the converted folder's grid is the discrete scheduler's);
    - ``timesteps`` go to the parent where it takes them (DPM-Solver, Euler).

    These pipelines neither scale their initial noise nor call ``scale_model_input``: their
    latents hold the variance-preserving x_t from randn, as DDIM's and DPM-Solver's do.
    """

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      mu: float | None = None, timesteps: Any = None) -> None:
        if sigmas is not None:
            sigmas = np.asarray(sigmas.cpu() if torch.is_tensor(sigmas) else sigmas, dtype=np.float64)
            n = len(sigmas)
            if n == 0 or not np.array_equal(sigmas, pipeline_default_sigmas(n)):
                raise ValueError(f"{type(self).__name__} steps a discrete schedule and cannot follow custom flow sigmas; "
                                 "pass num_inference_steps (and leave sigmas unset)")
            num_inference_steps = n
        if timesteps is None:
            super().set_timesteps(num_inference_steps, device)
        elif "timesteps" in inspect.signature(super().set_timesteps).parameters:
            super().set_timesteps(device=device, timesteps=timesteps)
        else:
            raise ValueError(f"{type(self).__name__} takes no custom timesteps; pass num_inference_steps")


class FlowPipelineDDIMScheduler(FlowPipelineSchedulerMixin, DDIMScheduler):
    """DDIMScheduler for flow pipelines (:class:`FlowPipelineSchedulerMixin`). On a converted
    FLUX.1 / SD3 folder, DDIM(trailing) equals the source's FlowMatchEulerDiscreteScheduler on
    the mapped grid s(t_k) (DDIM is Euler on the rectified path)."""

    def set_begin_index(self, begin_index: int = 0) -> None:
        """FluxPipeline calls it; DDIM steps by the timestep it is handed, so there is no index to set."""


class FlowPipelineDPMSolverMultistepScheduler(FlowPipelineSchedulerMixin, DPMSolverMultistepScheduler):
    """DPMSolverMultistepScheduler for flow pipelines (:class:`FlowPipelineSchedulerMixin`)."""


class FlowPipelineEulerDiscreteScheduler(FlowPipelineSchedulerMixin, EulerDiscreteScheduler):
    """EulerDiscreteScheduler for flow pipelines (:class:`FlowPipelineSchedulerMixin`).

    Euler works on x_t·√(σ_t² + 1) (σ = √((1 − ᾱ)/ᾱ)) and expects its pipeline to scale the
    noise by ``init_noise_sigma`` and call ``scale_model_input``; flow pipelines do neither and
    hold x_t. So ``init_noise_sigma`` is 1, ``scale_model_input`` is the identity, and ``step``
    maps x_t in and out of Euler's variable: the images are those of the stock scheduler in a
    pipeline that scales (and equal DDIM's on the same timesteps, both being Euler on the
    probability-flow ODE in σ).
    """

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        self.is_scale_input_called = True
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args, return_dict: bool = True,
             **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        sigma, sigma_next = (self.sigmas[index].double(), self.sigmas[index + 1].double())
        self.is_scale_input_called = True
        x = (sample.double() * (sigma**2 + 1).sqrt()).to(torch.float32)
        out = super().step(model_output, timestep, x, *args, return_dict=return_dict, **kwargs)
        prev = out.prev_sample if return_dict else out[0]
        prev = (prev.double() / (sigma_next**2 + 1).sqrt()).to(model_output.dtype)
        if return_dict:
            out.prev_sample = prev
            return out
        return (prev, *out[1:])


# -- multistep schedulers in flow mode, for converted velocity models -----------------------------------


class FlowSigmasMixin:
    """diffusers' multistep schedulers in their flow mode (``use_flow_sigmas``,
    ``prediction_type="flow_prediction"``: x̂0 = x − s·u, λ = log((1 − s)/s)) with float timesteps.

    The stock classes hand the network int64 timesteps floor(1000·s); a converted network then
    answers at another s than the step assumes ("usable, not exact"). Here the timesteps are
    1000·s in float32, as FlowMatchEulerDiscreteScheduler hands them, and ``set_timesteps`` also
    takes ``sigmas`` (flow times s, from 1 towards 0, without the final one, which stays the
    parent's: 0, or DEIS's own; default: the parent's flow sigmas). DPM-Solver++ in data
    prediction depends only on λ and x/α, so on a converted model with the source's sigmas
    mapped it is the same solver as on the source (test; UniPC too).

    ``from_config`` of a converted folder's scheduler config sets the flow mode and takes its
    ``shift`` as ``flow_shift``: ``pipe.scheduler = FlowDPMSolverMultistepScheduler.from_config(
    pipe.scheduler.config)``. ``init_noise_sigma`` is 1 and ``scale_model_input`` the identity, so
    the pipeline's sample is x_s whether or not it calls them.
    """

    config: Any

    @classmethod
    def from_config(cls, config: Any = None, **kwargs: Any):
        config = {k: v for k, v in dict(config or {}).items() if k not in ("sample_scaling", "source_schedule")}
        config.update(use_flow_sigmas=True, prediction_type="flow_prediction",
                      flow_shift=float(config.get("flow_shift", config.get("shift", 1.0)) or 1.0))
        if config.get("timestep_spacing") not in (None, "linspace", "leading", "trailing"):
            config.pop("timestep_spacing")  # (fmconvert's grid names: the flow mode has its own sigmas)
        return super().from_config(config, **kwargs)  # type: ignore[misc]

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      mu: float | None = None, timesteps: Any = None) -> None:
        T = self.config.num_train_timesteps
        if timesteps is not None:
            raise ValueError(f"{type(self).__name__} takes sigmas (flow times s), not timesteps")
        if mu is not None:
            raise ValueError(f"{type(self).__name__} has no dynamic shifting: mu cannot be honoured; pass sigmas")
        if sigmas is None:
            super().set_timesteps(num_inference_steps, device)  # type: ignore[misc]
            s = self.sigmas[:-1].to(torch.float64)  # type: ignore[has-type]
        else:
            s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if s.numel() == 0 or not bool(((s > 0) & (s <= 1)).all()) or not bool((s[1:] < s[:-1]).all()):
                raise ValueError("sigmas must be flow times s in (0, 1], decreasing (the final one is the scheduler's)")
            super().set_timesteps(len(s), device)  # type: ignore[misc]
            # (that reset the multistep state); the final sigma stays the parent's: 0, or DEIS's
            last: torch.Tensor = self.sigmas[-1:]  # type: ignore[has-type]
            self.sigmas = torch.cat([s, last.to(torch.float64)]).to(torch.float32)
            self.num_inference_steps = len(s)
        self.timesteps = (s.to(torch.float32) * T).to(device)


class _NoNoiseStep:
    """``step`` that accepts a ``generator`` (DDPMPipeline passes one) and uses none: these steps
    draw no noise."""

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
             generator: Any = None, **kwargs: Any):
        return super().step(model_output, timestep, sample, *args, **kwargs)  # type: ignore[misc]


class FlowDPMSolverMultistepScheduler(FlowSigmasMixin, DPMSolverMultistepScheduler):
    """DPMSolverMultistepScheduler in flow mode with float timesteps (:class:`FlowSigmasMixin`)."""


class FlowUniPCMultistepScheduler(FlowSigmasMixin, _NoNoiseStep, UniPCMultistepScheduler):
    """UniPCMultistepScheduler in flow mode with float timesteps (:class:`FlowSigmasMixin`)."""


class FlowDEISMultistepScheduler(FlowSigmasMixin, _NoNoiseStep, DEISMultistepScheduler):
    """DEISMultistepScheduler in flow mode with float timesteps (:class:`FlowSigmasMixin`)."""
