"""Adapters: the diffusers modules around the conversion core (:mod:`fmconvert.math.conversion`).

Two diffusers modules (ModelMixin + ConfigMixin, JSON config, safetensors weights):

- :class:`VelocityAdapter`: an epsilon / sample / v_prediction model on a discrete
  schedule, exposed in diffusers' FlowMatch convention (timestep = 1000·s,
  x_s = (1 − s)·x0 + s·ε, output ε̂ − x̂0);
- :class:`DiffusionAdapter`: a flow-matching velocity model, exposed as an epsilon or
  v_prediction model on a discrete VP schedule (integer or float timesteps), for DDIM,
  DPM-Solver, Euler and the rest.

How the wrapped network is called and how its output is read (learned variance, packed latents) is
:func:`fmconvert.integration.network.network_call`'s; the adapter passes every other argument through and
exposes the wrapped network's attributes (SDXL's pipeline reads ``unet.add_embedding``). A stock
pipeline's options that would act nonlinearly on a converted prediction (``guidance_rescale``) are
refused in the adapter's forward (:func:`refuse_nonlinear_options`).
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

from fmconvert.integration.configs import (  # noqa: F401 (LOAD_DTYPES re-exported)
    LOAD_DTYPES,
    NETWORK_FOLDER,
    adapter_init,
    canonical_prediction_type,
    path_config,
    scheduler_config,
    velocity_adapter_init,
)
from fmconvert.integration.families import family_timestep_path, packs_latents
from fmconvert.integration.network import network_call
from fmconvert.math.conversion import Conversion, apply_conversion, check_pair, evaluate_converted, plan_conversion  # noqa: F401 (re-exported)
from fmconvert.math.paths import DiscreteVPSchedule, GaussianPath, RectifiedFlow, path_from_config

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class AdapterOutput(BaseOutput):
    """``sample``: the prediction on the adapter's target path."""

    sample: torch.Tensor


def _resolve_model_class(name: str) -> type[ModelMixin]:
    """A model class by name, from fmconvert.integration.adapters or diffusers only (no arbitrary imports)."""
    import diffusers

    cls = globals().get(name) or getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ValueError(f"unknown model class {name!r}: expected a diffusers model class (e.g. UNet2DModel)")
    return cls


def _public_config(model: ModelMixin) -> dict[str, Any]:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


#: pipeline attribute → the __call__ option that sets it
NONLINEAR_OPTIONS = {"_guidance_rescale": "guidance_rescale"}


def refuse_nonlinear_options(max_depth: int = 12) -> None:
    """Called from a converted network's forward: if a diffusers pipeline's ``__call__`` up
    the stack has set an option that rescales the guided prediction nonlinearly (its std,
    as ``guidance_rescale``), raise ValueError — applied to a velocity instead of the
    source's prediction it would give another image, silently."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return
        if frame.f_code.co_name == "__call__":
            pipe = frame.f_locals.get("self")
            if pipe is not None and hasattr(pipe, "components"):
                for attribute, option in NONLINEAR_OPTIONS.items():
                    value = getattr(pipe, attribute, 0.0) or 0.0
                    guided = getattr(pipe, "_guidance_scale", 1.0) > 1.0
                    if value > 0 and guided:
                        raise ValueError(
                            f"{option}={value} rescales the guided prediction by its standard deviation, which is "
                            f"not the same on a converted model's velocity; use {option}=0, or fmconvert's sampling "
                            f"with Conditioning({option}={value}) (`fmconvert sample --guidance-rescale {value}`), "
                            "applied to the source's prediction, exact"
                        )
                return
        frame = frame.f_back


class PathAdapter(ModelMixin, ConfigMixin):
    """A wrapped diffusers model evaluated on another path and prediction type.

    Config (JSON): the wrapped model's class and config, the source and target paths
    (``GaussianPath.to_config``), both prediction types and ``compute_dtype``, the dtype the
    conversion is applied in (its coefficients are planned in float64 wherever the timestep
    is on the CPU, as samplers pass it), and how to load the network: ``network_variant``
    (its weight files' variant, e.g. fp16) and ``network_dtype`` (the dtype to load it in when
    the caller names none; None: as diffusers loads the network itself).

    Saved layout (:meth:`save_pretrained`): the adapter's config.json, and the network's own
    folder in ``network/`` (its config and safetensors, sharded or not): ``fmconvert wrap``
    hard-links the source's files there byte for byte. Folders written by fmconvert before
    0.2 hold the weights under ``model.``-prefixed keys beside the config; they still load.
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
        network_variant: str | None = None,
        network_dtype: str | None = None,
        model: ModelMixin | None = None,
    ):
        super().__init__()
        if compute_dtype not in _DTYPES:
            raise ValueError(f"unsupported compute_dtype {compute_dtype!r}: supported are {', '.join(_DTYPES)}")
        if network_dtype is not None and network_dtype not in LOAD_DTYPES:
            raise ValueError(f"unsupported network_dtype {network_dtype!r}: supported are {', '.join(LOAD_DTYPES)}")
        self.source_path = path_from_config(source_path)
        self.target_path = path_from_config(target_path)
        self.source_prediction = check_pair(self.source_path, source_prediction)
        self.target_prediction = check_pair(self.target_path, target_prediction)
        self.model = model if model is not None else _resolve_model_class(model_class).from_config(model_config)
        # pipelines read the denoiser's config (sample_size, in_channels, ...): mirror the
        # network's, with the defaults its class filled in (model_config may be the raw config.json)
        own = set(inspect.signature(PathAdapter.__init__).parameters)
        self.register_to_config(**{k: v for k, v in _public_config(self.model).items() if k not in own})
        self._call = network_call(self.model, packs_latents(type(self.model).__name__))
        self._plans: dict[tuple, Conversion] = {}  # see conversion()
        self._dtype_cache: tuple = (None, None, None, None, None)  # see network_dtype

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # the mirrored network config keys are derived from the network, not init arguments
        own = set(inspect.signature(PathAdapter.__init__).parameters)
        config_dict = {k: v for k, v in config_dict.items() if k in own or k.startswith("_")}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def _wrap(cls, model: ModelMixin, source: GaussianPath, source_prediction: str, target: GaussianPath,
              target_prediction: str, compute_dtype: str) -> "PathAdapter":
        return cls(**adapter_init(type(model).__name__, _public_config(model), source.to_config(), source_prediction,
                                  target.to_config(), target_prediction, compute_dtype), model=model)

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        safe_serialization: bool = True, variant: str | None = None, **kwargs: Any) -> None:
        """The adapter's config.json in ``save_directory``; the network's own save_pretrained in
        ``network/`` (safetensors; ``variant`` and ``max_shard_size`` are the network's)."""
        if not safe_serialization:
            raise ValueError("fmconvert saves safetensors only")
        if not is_main_process:
            return
        save_directory = Path(save_directory)
        if variant is not None:
            self.register_to_config(network_variant=variant)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.save_config(save_directory)
        self.model.save_pretrained(save_directory / NETWORK_FOLDER, safe_serialization=True, variant=variant, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "PathAdapter":
        """Load a saved adapter: its config, then the network with the network's own
        ``from_pretrained`` from ``network/`` and every loading option passed through
        (torch_dtype, device_map, low_cpu_mem_usage, ...); so loading costs what loading the
        network alone does. A folder of the earlier layout loads as diffusers saved it."""
        if not Path(pretrained_model_name_or_path).is_dir():  # a Hub id: this component's files, once
            from huggingface_hub import snapshot_download

            sub = kwargs.get("subfolder")
            pretrained_model_name_or_path = snapshot_download(
                str(pretrained_model_name_or_path), revision=kwargs.pop("revision", None),
                token=kwargs.pop("token", None), cache_dir=kwargs.pop("cache_dir", None),
                local_files_only=kwargs.pop("local_files_only", False), allow_patterns=[f"{sub}/*"] if sub else None)
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        if not (folder / NETWORK_FOLDER / "config.json").is_file():
            if folder.is_dir() and (folder / "config.json").is_file() and not any(
                    folder.glob("diffusion_pytorch_model*")):
                raise OSError(f"'{folder}' has an fmconvert adapter config but neither a {NETWORK_FOLDER}/ folder nor "
                              "weights; write it again with fmconvert wrap")
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)  # the earlier layout
        kwargs.pop("subfolder", None)
        config = cls.load_config(folder)
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        dtype = dtype if dtype is not None else torch_dtype  # (diffusers' rule: dtype wins)
        if dtype is None and config.get("network_dtype"):
            dtype = getattr(torch, config["network_dtype"])
        variant = kwargs.pop("variant", None) or config.get("network_variant")
        network_class = _resolve_model_class(config["model_class"])
        network = network_class.from_pretrained(folder / NETWORK_FOLDER, dtype=dtype, variant=variant, **kwargs)
        init, _, _ = cls.extract_init_dict(config)  # (from_config would drop `model`: it is not config)
        return cls(**init, model=network).eval()

    def set_source_prediction(self, prediction_type: str) -> None:
        """Read the network's output as ``prediction_type`` on the source path from now on (the
        config follows): what training a network into another parametrisation starts from, as
        SD 2's v_prediction models were fine-tuned from epsilon ones. The network is unchanged, so
        the field changes too. ValueError for a pair :func:`~fmconvert.math.conversion.check_pair` refuses."""
        self.source_prediction = check_pair(self.source_path, prediction_type)
        self.register_to_config(source_prediction=self.source_prediction)
        self._plans.clear()

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped network that the adapter does not have itself (stock
        pipelines read some, such as SDXL's ``unet.add_embedding``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("_"):
                raise
            return getattr(model, name)

    def _call_model(self, x: torch.Tensor, timestep: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if isinstance(self.model, PathAdapter):  # a round trip: keep full precision in between
            return self.model.evaluate(x, timestep, *args, output_dtype=x.dtype, **kwargs)
        return self._call(self.model, x, timestep, args, kwargs)

    @property
    def source(self) -> GaussianPath:
        """Renamed :attr:`source_path` ("source" is a resolved model reference,
        :class:`fmconvert.integration.source.Source`); kept for code written before, with a DeprecationWarning."""
        warnings.warn("PathAdapter.source is now PathAdapter.source_path", DeprecationWarning, stacklevel=2)
        return self.source_path

    @property
    def target(self) -> GaussianPath:
        """Renamed :attr:`target_path`; kept with a DeprecationWarning."""
        warnings.warn("PathAdapter.target is now PathAdapter.target_path", DeprecationWarning, stacklevel=2)
        return self.target_path

    def source_output(self, x: torch.Tensor, timestep: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The wrapped network's own prediction (``source_prediction`` on the ``source`` path) at
        ``x`` and its own ``timestep``, through :class:`~fmconvert.integration.network.NetworkCall`
        (the one place that knows how the network is called and which channels are the prediction),
        in the network's dtype; no conversion. For checks that read the source without the adapter's
        conversion code (:mod:`fmconvert.evaluation.agreement`)."""
        return self._call.split(self._call_model(x.to(self.network_dtype), timestep, args, kwargs))[0]

    def at(self, sample: torch.Tensor, s: torch.Tensor, *args, output_dtype: torch.dtype | None = None,
           **kwargs) -> torch.Tensor:
        """:meth:`evaluate` at the target path's time ``s`` (s = 1 noise) rather than its network
        timestep: the timestep is the target path's ``model_timestep(s)`` in float64, the one rule
        (for the FlowMatch path, num_train_timesteps·s)."""
        timestep = self.target_path.model_timestep(torch.as_tensor(s, dtype=torch.float64), torch.float64)
        return self.evaluate(sample, timestep, *args, output_dtype=output_dtype, **kwargs)

    @property
    def source_network(self) -> torch.nn.Module:
        """The network itself: the wrapped model, or inside a round trip the model the inner adapter wraps."""
        return self.model.model if isinstance(self.model, PathAdapter) else self.model

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
        sampling loop never synchronises with the host; one that requires grad (a time grid
        being tuned) is planned every call, so the plan carries its gradient.
        """
        if not torch.is_tensor(timestep):
            timestep = torch.as_tensor(timestep)
        key = None
        if timestep.device.type == "cpu" and timestep.numel() >= 1 and not timestep.requires_grad:
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
        plan = plan_conversion(timestep, ndim, self.source_path, self.source_prediction, self.target_path, self.target_prediction,
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
        """The target prediction as a tensor in ``output_dtype`` (default: the model's dtype).
        A learned-variance network's extra channels follow the prediction unchanged."""
        compute_dtype = _DTYPES[self.config.compute_dtype]
        network_dtype = self.network_dtype
        nested = isinstance(self.model, PathAdapter)
        rest: list[torch.Tensor] = []

        def prediction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            predicted, extra = self._call.split(self._call_model(x, t, args, kwargs))
            if extra is not None:
                rest.append(extra)
            return predicted

        out = apply_conversion(
            prediction, sample, self.conversion(timestep, sample.ndim, sample.device),
            compute_dtype=compute_dtype,
            input_dtype=compute_dtype if nested else network_dtype,
            output_dtype=output_dtype or network_dtype,
        )
        return torch.cat([out, rest[0].to(out.dtype)], dim=1) if rest else out

    def forward(self, sample: torch.Tensor | None = None, timestep: Any = None, *args,
                return_dict: bool = True, **kwargs) -> AdapterOutput | tuple:
        """``sample`` (or ``hidden_states``) and ``timestep`` on the target path; every other
        argument (encoder_hidden_states, class_labels, added_cond_kwargs, ...) passes through.
        Returns ``.sample`` in the model's dtype."""
        if sample is None:
            sample = kwargs.pop("hidden_states")
        refuse_nonlinear_options()
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
        """Wrap ``model`` trained with ``scheduler`` (a diffusers scheduler or its config dict);
        the arguments are :func:`fmconvert.integration.configs.velocity_adapter_init`'s, which ``fmconvert
        wrap`` writes without loading the model."""
        source, prediction = path_config(scheduler)
        init = velocity_adapter_init(type(model).__name__, _public_config(model), source, prediction_type or prediction,
                                     compute_dtype)
        return cls(**init, model=model)


class DiffusionAdapter(PathAdapter):
    """A flow-matching velocity model as an epsilon or v_prediction model on a discrete VP
    schedule, called with integer or float timesteps t ∈ [0, T−1] as DDIM, DPM-Solver and
    Euler schedulers pass them (t / 1000 for a FLUX network: its pipeline divides them)."""

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
        flow = RectifiedFlow().to_config()
        if flow_scheduler is not None:
            flow, src_pred = path_config(flow_scheduler)
            if src_pred != "flow_prediction":
                raise ValueError("flow_scheduler must describe a flow-matching model (e.g. FlowMatchEulerDiscreteScheduler)")
        # the timesteps as the family's pipeline hands them over (FLUX's network: s; the adapter: t / 1000)
        name = type(model).__name__
        source = path_from_config(family_timestep_path(flow, name))
        target = path_from_config(family_timestep_path(schedule.to_config(), name))
        return cls._wrap(model, source, "flow_prediction", target, pred, compute_dtype)
