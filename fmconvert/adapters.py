"""Adapters: a network on one Gaussian path and prediction type, seen on another.

One core, :func:`reparameterize`, serves every direction. For a request (x, timestep)
on the target path:

1. t_dst from the timestep, its point P_dst = (α, σ) and log-SNR λ = log(α/σ);
2. the source time t_src with the same λ (clamped to the range the source was trained
   on, snapped to a trained integer time when λ is within the timestep's rounding);
3. the source sees x·|P_src|/|P_dst| (|P| = √(α²+σ²); equal to α_src/α_dst at equal λ);
4. its output becomes (x̂0, ε̂) at P_src (:mod:`fmconvert.predictions`), which are the
   same numbers on every path, and then the target prediction at P_dst.

Steps 1–4 are linear in (x, output) with coefficients that depend on the timestep alone:
:func:`plan_conversion` computes them once (a :class:`Conversion`: source timestep,
scale, k_x, k_out; the adapters remember them per timestep value) and
:func:`apply_conversion` returns k_x·x + k_out·model(scale·x, timestep_src).

Endpoint policy, where the target asks for a noise level the source never saw
(s = 1 above a DDPM schedule's last timestep; below its first): the source is evaluated
at its nearest trained time, then (x̂0, ε̂) are made consistent with the actual point —
noisier than trained: keep x̂0 and set ε̂ = (x − α·x̂0)/σ; cleaner than trained: keep ε̂
and set x̂0 = (x − σ·ε̂)/α. So s = 1 gives u = x − x̂0 and s = 0 gives u = ε̂ − x, both finite.
An epsilon model on a zero-terminal-SNR schedule (α = 0 at its last timestep) has no x̂0
there and is refused.

Two diffusers modules (ModelMixin + ConfigMixin, JSON config, safetensors weights):

- :class:`VelocityAdapter`: an epsilon / sample / v_prediction model on a discrete
  schedule, exposed in diffusers' FlowMatch convention (timestep = 1000·s,
  x_s = (1 − s)·x0 + s·ε, output ε̂ − x̂0);
- :class:`DiffusionAdapter`: a flow-matching velocity model, exposed as an epsilon or
  v_prediction model on a discrete VP schedule (integer or float timesteps), for DDIM,
  DPM-Solver, Euler and the rest.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

from .predictions import canonical_prediction_type, from_x0_eps, to_x0_eps
from .schedules import (
    DiscreteVPSchedule,
    GaussianPath,
    RectifiedFlow,
    log_snr_of,
    path_from_config,
    path_from_scheduler_config,
    scheduler_config,
)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def check_pair(path: GaussianPath, prediction_type: str) -> str:
    """Validate a (path, prediction type) pair; returns the canonical prediction type."""
    kind = canonical_prediction_type(prediction_type)
    if kind in ("epsilon", "score") and getattr(path, "zero_terminal_snr", False):
        raise ValueError(
            f"prediction_type={kind!r} on a zero-terminal-SNR schedule (rescale_betas_zero_snr=True) has no "
            "x0 estimate at its last timestep (alpha = 0); use a v_prediction model there, or a schedule "
            "without rescale_betas_zero_snr"
        )
    return kind


@dataclass
class Conversion:
    """One request's conversion, per sample (it depends on the timestep only): the source
    network sees ``(scale·x, timestep)`` and the target prediction is ``k_x·x + k_out·output``.

    ``timestep``: (B,) or (1,) in the source's timestep convention; ``scale``, ``k_x``,
    ``k_out``: (B or 1, 1, ..., 1) in the compute dtype.
    """

    timestep: torch.Tensor
    scale: torch.Tensor
    k_x: torch.Tensor
    k_out: torch.Tensor

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "Conversion":
        """On ``device``, with the coefficients (not the timestep) in ``dtype`` if given."""
        coefficients = (v.to(device, dtype, non_blocking=True) for v in (self.scale, self.k_x, self.k_out))
        return Conversion(self.timestep.to(device, non_blocking=True), *coefficients)


def plan_conversion(
    timestep: torch.Tensor,
    ndim: int,
    source: GaussianPath,
    source_prediction: str,
    target: GaussianPath,
    target_prediction: str,
    compute_dtype: torch.dtype = torch.float64,
    timestep_dtype: torch.dtype = torch.float32,
) -> Conversion:
    """The :class:`Conversion` for requests at ``timestep`` (target convention, shape (B,))
    on samples with ``ndim`` dimensions, computed on the timestep's device. See the module
    docstring for the steps."""
    timestep = timestep.reshape(-1)
    t_dst = target.time_from_model_timestep(timestep).to(compute_dtype)
    lam = target.log_snr(t_dst)
    tol = target.timestep_log_snr_resolution(timestep)
    t_src = source.time_at_log_snr(lam, snap_tol=tol)
    p_src = source.point(t_src)
    # a timestep snapped to a trained time was that time, rounded: take the target point from it too
    lam_src = log_snr_of(p_src.alpha, p_src.sigma)
    snapped = (lam_src != lam) & ((lam_src - lam).abs() <= tol)
    t_dst = torch.where(snapped, target.time_at_log_snr(lam_src), t_dst)
    p_dst = target.point(t_dst)

    ends = torch.tensor([source.t_max, source.t_min], dtype=compute_dtype, device=timestep.device)
    lam_top, lam_bottom = source.log_snr(ends).unbind()
    noisier = lam < lam_top  # beyond the noisiest trained point
    cleaner = lam > lam_bottom  # beyond the cleanest trained point

    p_dst, p_src = p_dst.view_as_batch(ndim), p_src.view_as_batch(ndim)
    scale = p_src.norm / p_dst.norm
    noisier, cleaner = noisier.view(p_dst.alpha.shape), cleaner.view(p_dst.alpha.shape)

    def convert(x_dst: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x0, eps = to_x0_eps(source_prediction, out, x_dst * scale, p_src)
        one = torch.ones_like(p_dst.alpha)
        eps = torch.where(noisier, (x_dst - p_dst.alpha * x0) / torch.where(noisier, p_dst.sigma, one), eps)
        x0 = torch.where(cleaner, (x_dst - p_dst.sigma * eps) / torch.where(cleaner, p_dst.alpha, one), x0)
        return from_x0_eps(target_prediction, x0, eps, p_dst)

    # the whole conversion is linear in (x, output) with per-sample coefficients: evaluate it
    # on the basis (1, 0) and (0, 1)
    ones, zeros = torch.ones_like(scale), torch.zeros_like(scale)
    k_x, k_out = convert(ones, zeros), convert(zeros, ones)
    return Conversion(source.model_timestep(t_src, timestep_dtype), scale, k_x, k_out)


def apply_conversion(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    conversion: Conversion,
    compute_dtype: torch.dtype = torch.float64,
    input_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``k_x·x + k_out·model_fn(scale·x, timestep)``, each product and sum in ``compute_dtype``
    (type promotion against the coefficients: x and the output are not copied to it first)."""
    c = conversion
    if c.scale.device != x.device or c.scale.dtype != compute_dtype:
        c = c.to(x.device, compute_dtype)
    out = model_fn((x * c.scale).to(input_dtype or x.dtype), c.timestep.expand(x.shape[0]))
    return torch.addcmul(c.k_x * x, c.k_out, out).to(output_dtype or x.dtype)


def reparameterize(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    timestep: torch.Tensor,
    source: GaussianPath,
    source_prediction: str,
    target: GaussianPath,
    target_prediction: str,
    compute_dtype: torch.dtype = torch.float64,
    input_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
    timestep_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Evaluate ``model_fn(x_src, timestep_src)`` (source path and prediction) as the
    target prediction at (x, timestep) on the target path: :func:`plan_conversion`, then
    :func:`apply_conversion`.

    The model receives x_src in ``input_dtype`` and the result is returned in
    ``output_dtype`` (both default to x's dtype) and its timestep in ``timestep_dtype``
    (float32, as diffusers passes them); everything between runs in ``compute_dtype``.
    """
    timestep = torch.as_tensor(timestep, device=x.device)
    conversion = plan_conversion(timestep, x.ndim, source, source_prediction, target, target_prediction,
                                 compute_dtype, timestep_dtype)
    return apply_conversion(model_fn, x, conversion, compute_dtype, input_dtype, output_dtype)


@dataclass
class AdapterOutput(BaseOutput):
    """``sample``: the prediction on the adapter's target path."""

    sample: torch.Tensor


def _resolve_model_class(name: str) -> type:
    """A model class by name, from fmconvert.adapters or diffusers only (no arbitrary imports)."""
    import diffusers

    cls = globals().get(name) or getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ValueError(f"unknown model class {name!r}: expected a diffusers model class (e.g. UNet2DModel)")
    return cls


def _public_config(model: ModelMixin) -> dict[str, Any]:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


class PathAdapter(ModelMixin, ConfigMixin):
    """A wrapped diffusers model evaluated on another path and prediction type.

    Config (JSON): the wrapped model's class and config, the source and target paths
    (``GaussianPath.to_config``), both prediction types and ``compute_dtype``, the dtype the
    conversion is applied in (its coefficients are planned in float64 wherever the timestep
    is on the CPU, as samplers pass it). The wrapped model's weights are saved under ``model.``.
    """

    ignore_for_config = ["model"]
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        model_class: str,
        model_config: dict,
        source_path: dict,
        source_prediction: str,
        target_path: dict,
        target_prediction: str,
        compute_dtype: str = "float64",
        model: ModelMixin | None = None,
    ):
        super().__init__()
        if compute_dtype not in _DTYPES:
            raise ValueError(f"unsupported compute_dtype {compute_dtype!r}: supported are {', '.join(_DTYPES)}")
        self.source = path_from_config(source_path)
        self.target = path_from_config(target_path)
        self.source_prediction = check_pair(self.source, source_prediction)
        self.target_prediction = check_pair(self.target, target_prediction)
        self.model = model if model is not None else _resolve_model_class(model_class).from_config(model_config)
        # pipelines read the denoiser's config (sample_size, in_channels, ...): mirror it
        own = set(inspect.signature(PathAdapter.__init__).parameters)
        self.register_to_config(**{k: v for k, v in model_config.items() if k not in own})
        params = list(inspect.signature(self.model.forward).parameters)
        self._input_name = params[0]
        self._timestep_positional = len(params) > 1 and params[1] == "timestep"
        self._plans: dict[tuple, Conversion] = {}  # see conversion()
        self._dtype_cache: tuple = (None, None, None, None, None)  # see network_dtype

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # the mirrored model config keys are derived from model_config, not init arguments
        mirrored = set(config_dict.get("model_config", {})) - set(inspect.signature(PathAdapter.__init__).parameters)
        config_dict = {k: v for k, v in config_dict.items() if k not in mirrored}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def _wrap(cls, model: ModelMixin, source: GaussianPath, source_prediction: str, target: GaussianPath,
              target_prediction: str, compute_dtype: str) -> "PathAdapter":
        return cls(
            model_class=type(model).__name__,
            model_config=_public_config(model),
            source_path=source.to_config(),
            source_prediction=source_prediction,
            target_path=target.to_config(),
            target_prediction=target_prediction,
            compute_dtype=compute_dtype,
            model=model,
        )

    def _call_model(self, x: torch.Tensor, timestep: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if isinstance(self.model, PathAdapter):  # a round trip: keep full precision in between
            return self.model.evaluate(x, timestep, *args, output_dtype=x.dtype, **kwargs)
        if self._timestep_positional:
            out = self.model(x, timestep, *args, **kwargs, return_dict=False)
        else:
            out = self.model(*args, **{self._input_name: x, "timestep": timestep}, **kwargs, return_dict=False)
        return out[0]

    @property
    def network_dtype(self) -> torch.dtype:
        """The wrapped model's compute dtype. ``ModelMixin.dtype`` walks every submodule (as
        does ``parameters()``), so it is cached, keyed by the model and the dtype of its first
        parameter (which any cast changes), read from the module that holds it."""
        model, holder, name, key, dtype = self._dtype_cache
        if model is not self.model or name not in holder._parameters or holder._parameters[name].dtype != key:
            holder, name = next((m, n) for m in self.model.modules() for n, p in m._parameters.items() if p is not None)
            key, dtype = holder._parameters[name].dtype, self.model.dtype
            self._dtype_cache = (self.model, holder, name, key, dtype)
        return dtype

    def conversion(self, timestep: Any, ndim: int, device: torch.device) -> Conversion:
        """The :class:`Conversion` at ``timestep`` for ``ndim``-dimensional samples on ``device``.

        A timestep that can be read without waiting for a device (a number, or a CPU tensor
        with one value for the whole batch, as samplers pass it) is planned once per
        value and remembered; one on an accelerator is planned there, every call, so the
        sampling loop never synchronises with the host.
        """
        if not torch.is_tensor(timestep):
            timestep = torch.as_tensor(timestep)
        key = None
        if timestep.device.type == "cpu" and timestep.numel() >= 1:
            flat = timestep.reshape(-1)
            if flat.numel() == 1 or torch.equal(flat, flat[:1].expand_as(flat)):
                key = (float(flat[0]), timestep.dtype, ndim, str(device))
                if key in self._plans:
                    return self._plans[key]
                timestep = flat[:1]
        compute_dtype = _DTYPES[self.config.compute_dtype]
        nested = isinstance(self.model, PathAdapter)
        # planned in float64 wherever the timestep can be read (the coefficients are then
        # rounded to compute_dtype once); on an accelerator, in compute_dtype
        plan_dtype = torch.float64 if timestep.device.type == "cpu" else compute_dtype
        plan = plan_conversion(timestep, ndim, self.source, self.source_prediction, self.target, self.target_prediction,
                               plan_dtype, compute_dtype if nested else torch.float32)
        if plan.scale.device != torch.device(device) or plan.scale.dtype != compute_dtype:
            plan = plan.to(device, compute_dtype)
        if key is not None:
            if len(self._plans) >= 4096:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def evaluate(self, sample: torch.Tensor, timestep: Any, *args, output_dtype: torch.dtype | None = None,
                 **kwargs) -> torch.Tensor:
        """The target prediction as a tensor in ``output_dtype`` (default: the model's dtype)."""
        compute_dtype = _DTYPES[self.config.compute_dtype]
        network_dtype = self.network_dtype
        nested = isinstance(self.model, PathAdapter)
        return apply_conversion(
            lambda x, t: self._call_model(x, t, args, kwargs),
            sample, self.conversion(timestep, sample.ndim, sample.device),
            compute_dtype=compute_dtype,
            input_dtype=compute_dtype if nested else network_dtype,
            output_dtype=output_dtype or network_dtype,
        )

    def forward(self, sample: torch.Tensor | None = None, timestep: Any = None, *args,
                return_dict: bool = True, **kwargs) -> AdapterOutput | tuple:
        """``sample`` (or ``hidden_states``) and ``timestep`` on the target path; every other
        argument (encoder_hidden_states, class_labels, added_cond_kwargs, ...) passes through.
        Returns ``.sample`` in the model's dtype."""
        if sample is None:
            sample = kwargs.pop("hidden_states")
        out = self.evaluate(sample, timestep, *args, **kwargs)
        return AdapterOutput(sample=out) if return_dict else (out,)


class VelocityAdapter(PathAdapter):
    """A diffusion model (epsilon, sample or v_prediction on a discrete VP schedule) as a
    flow-matching velocity model in diffusers' FlowMatch convention.

    Called as ``adapter(x_s, timestep=1000·s, **cond)``: x_s = (1 − s)·x0 + s·ε, returns
    ``.sample`` = ε̂ − x̂0. Drive it with FlowMatchEulerDiscreteScheduler or any flow solver.
    """

    @classmethod
    def from_diffusion(cls, model: ModelMixin, scheduler: Any, prediction_type: str | None = None,
                       compute_dtype: str = "float64") -> "VelocityAdapter":
        """Wrap ``model`` trained with ``scheduler`` (a diffusers scheduler or its config dict)."""
        path, pred = path_from_scheduler_config(scheduler)
        pred = canonical_prediction_type(prediction_type or pred)
        if pred == "flow_prediction":
            raise ValueError("the source is already a flow-matching model; use DiffusionAdapter to convert it back")
        target = RectifiedFlow(num_train_timesteps=getattr(path, "num_train_timesteps", 1000))
        return cls._wrap(model, path, pred, target, "flow_prediction", compute_dtype)


class DiffusionAdapter(PathAdapter):
    """A flow-matching velocity model as an epsilon or v_prediction model on a discrete VP
    schedule, called with integer or float timesteps t ∈ [0, T−1] as DDIM, DPM-Solver and
    Euler schedulers pass them."""

    @classmethod
    def from_flow(cls, model: ModelMixin, prediction_type: str = "epsilon", schedule: Any = None,
                  flow_scheduler: Any = None, compute_dtype: str = "float64") -> "DiffusionAdapter":
        """Wrap a velocity ``model``.

        ``schedule``: the target discrete schedule, a :class:`DiscreteVPSchedule`, a diffusers
        scheduler or config (default: DDPMScheduler's, linear betas 1e-4..0.02, T = 1000).
        ``flow_scheduler``: the model's FlowMatch scheduler or config (default: T = 1000).
        """
        pred = canonical_prediction_type(prediction_type)
        if pred not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {pred!r} cannot be a diffusion target: use epsilon, v_prediction or sample")
        if schedule is None:
            schedule = DiscreteVPSchedule.from_config({"beta_schedule": "linear"})
        elif not isinstance(schedule, DiscreteVPSchedule):
            schedule = DiscreteVPSchedule.from_config(scheduler_config(schedule))
        source = RectifiedFlow()
        if flow_scheduler is not None:
            source, src_pred = path_from_scheduler_config(flow_scheduler)
            if src_pred != "flow_prediction":
                raise ValueError("flow_scheduler must describe a flow-matching model (e.g. FlowMatchEulerDiscreteScheduler)")
        return cls._wrap(model, source, "flow_prediction", schedule, pred, compute_dtype)
