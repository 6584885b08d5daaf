"""The conversion on configs alone: plain Python, no torch and no diffusers import.

``fmconvert wrap`` writes a converted folder from JSON configs (the weights are linked,
never loaded), so what it needs to know is here, importable in milliseconds:

- prediction type names (:func:`canonical_prediction_type`);
- which diffusers schedulers describe which Gaussian path: :func:`path_config` turns a
  scheduler config into a *path description*, the dict that
  :func:`fmconvert.math.paths.path_from_config` builds a :class:`~fmconvert.math.paths.GaussianPath`
  from (a discrete VP schedule is described by its beta settings, so diffusers' betas are
  computed in one place, :meth:`~fmconvert.math.paths.DiscreteVPSchedule.from_config`);
- the converted model's configs: :func:`velocity_adapter_init` (the arguments of
  :class:`~fmconvert.integration.adapters.VelocityAdapter`, which its Python constructor uses too) and
  :func:`velocity_scheduler_config` (the scheduler that drives it in a stock pipeline);
- where a converted folder keeps the network (:data:`NETWORK_FOLDER`) and the dtypes it may
  declare for loading it (:data:`LOAD_DTYPES`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from fmconvert.math.descriptions import (  # noqa: F401 (re-exported: the vocabulary of configs)
    BETA_SCHEDULES,
    DISCRETE_VP_KEYS,
    describe_path,
    discrete_vp_config,
    num_train_timesteps,
    rectified_flow,
)
from fmconvert.math.predictions import PREDICTION_TYPES, canonical_prediction_type  # noqa: F401

if TYPE_CHECKING:
    from fmconvert.math.paths import GaussianPath

#: diffusers schedulers whose config describes a discrete VP (beta) schedule
VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "SASolverScheduler", "LCMScheduler", "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
)
#: diffusers schedulers for flow-matching (rectified flow) models
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
#: score-SDE variance-exploding schedulers (NCSN++: the network takes σ and returns the score)
VE_SCHEDULERS = ("ScoreSdeVeScheduler",)
#: the continuous-time VP SDE (DDPM++ cont.: the network takes t ∈ [sampling_eps, 1], returns ε)
VP_SDE_SCHEDULERS = ("ScoreSdeVpScheduler",)
#: schedulers with Karras et al. (2022) preconditioning (c_in, c_noise = ¼·log σ, c_skip, c_out)
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
#: their prediction_type → fmconvert's name for what the network outputs (F_θ, or −F_θ)
EDM_PREDICTIONS = {"epsilon": "edm", "v_prediction": "edm_v"}
SUPPORTED_SCHEDULERS = VP_SCHEDULERS + FLOW_SCHEDULERS + VE_SCHEDULERS + VP_SDE_SCHEDULERS + EDM_SCHEDULERS
#: schedulers that take prediction_type="flow_prediction" together with use_flow_sigmas=True
FLOW_CAPABLE = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                "DEISMultistepScheduler", "SASolverScheduler")
#: dtypes a converted folder may declare for loading its network
LOAD_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: dtypes a network is run in to sample or to measure agreement (the conversion itself stays float64)
SAMPLE_DTYPES = ("float32", "bfloat16", "float16")
#: the subfolder of a saved adapter that holds the network's own files
NETWORK_FOLDER = "network"


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A config dict with ``_class_name`` from a diffusers scheduler or its config dict."""
    if isinstance(scheduler, Mapping):
        return dict(scheduler)
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}  # (as save_config writes it)
    config["_class_name"] = type(scheduler).__name__
    return config


def path_config(scheduler: Any) -> tuple[dict[str, Any], str]:
    """The path description and prediction type that a diffusers scheduler (or its config
    dict; without ``_class_name`` taken as DDPMScheduler's) stands for.

    Returns ``(path, prediction_type)``: ``path`` is what
    :func:`fmconvert.math.paths.path_from_config` reads; prediction_type in diffusers' names
    ("epsilon", "sample", "v_prediction", "flow_prediction"), or "score" (score-SDE VE) and
    "edm" / "edm_v" (Karras-preconditioned networks). Raises ValueError naming the offending
    option for schedulers or settings fmconvert cannot map exactly.

    - FlowMatch schedulers: diffusers' rectified path (timestep 1000·s);
    - ScoreSdeVeScheduler: the VE path x0 + σ·ε, σ ∈ [sigma_min, sigma_max], timestep σ,
      output the score;
    - ScoreSdeVpScheduler: the continuous VP SDE, t ∈ [sampling_eps, 1], timestep t, output ε;
    - EDM schedulers: x = c_in·(x0 + σ·ε), c_in = 1/√(σ² + σ_d²), timestep ¼·log σ;
    - EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
      (the only combination diffusers hands ¼·log σ): the same with σ_d = 1, between
      sigma_min and sigma_max where the config sets them, else the beta schedule's σ range;
    - every other VP scheduler: its discrete beta schedule, integer timesteps.
    """
    config = scheduler_config(scheduler)
    name = config.get("_class_name", "DDPMScheduler")
    T = int(config.get("num_train_timesteps", 1000))
    if name in FLOW_SCHEDULERS:
        if config.get("invert_sigmas"):
            raise ValueError(f"{name} with invert_sigmas=True hands its network 1 − s (noise at 0): fmconvert cannot "
                             "map that timestep yet")
        # (use_dynamic_shifting, shift_terminal and the sigma options change sampling times only, not the path)
        return rectified_flow(config.get("shift", 1.0), T), "flow_prediction"
    if name in VE_SCHEDULERS:
        return {"kind": "ve", "sigma_min": float(config.get("sigma_min", 0.01)),
                "sigma_max": float(config.get("sigma_max", 1348.0))}, "score"
    if name in VP_SDE_SCHEDULERS:
        return {"kind": "vp_sde", "beta_min": float(config.get("beta_min", 0.1)),
                "beta_max": float(config.get("beta_max", 20.0)),
                "sampling_eps": float(config.get("sampling_eps", 1e-3))}, "epsilon"
    if name in EDM_SCHEDULERS:
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in EDM_PREDICTIONS:
            raise ValueError(f"{name} with prediction_type={prediction!r}: supported are {', '.join(EDM_PREDICTIONS)}")
        return {"kind": "edm", "sigma_min": float(config.get("sigma_min", 0.002)),
                "sigma_max": float(config.get("sigma_max", 80.0)),
                "sigma_data": float(config.get("sigma_data", 0.5))}, EDM_PREDICTIONS[prediction]
    if name not in VP_SCHEDULERS:
        raise ValueError(f"unsupported scheduler {name!r}: supported are {', '.join(SUPPORTED_SCHEDULERS)}")
    prediction = canonical_prediction_type(config.get("prediction_type", "epsilon"))
    if prediction == "flow_prediction":
        if not (name in FLOW_CAPABLE and config.get("use_flow_sigmas", False)):
            raise ValueError(
                f"{name} with prediction_type='flow_prediction' needs use_flow_sigmas=True "
                "(with VP sigmas the flow output is misread); set use_flow_sigmas=True or use "
                "FlowMatchEulerDiscreteScheduler"
            )
        return rectified_flow(config.get("flow_shift", 1.0), T), "flow_prediction"
    if name == "EulerDiscreteScheduler" and config.get("timestep_type") == "continuous" and prediction == "v_prediction":
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("EulerDiscreteScheduler with timestep_type='continuous' and rescale_betas_zero_snr has "
                             "σ = ∞ at its last step; fmconvert cannot map it")
        path = {"kind": "edm", "sigma_min": config.get("sigma_min"), "sigma_max": config.get("sigma_max"),
                "sigma_data": 1.0}
        if path["sigma_min"] is None or path["sigma_max"] is None:  # the beta schedule's range
            path["schedule"] = {k: v for k, v in discrete_vp_config(config).items() if k != "kind"}
        return path, prediction
    return discrete_vp_config(config), prediction


def adapter_init(model_class: str, model_config: Mapping[str, Any], source_path: Mapping[str, Any],
                 source_prediction: str, target_path: Mapping[str, Any], target_prediction: str,
                 compute_dtype: str = "float64") -> dict[str, Any]:
    """The arguments of a :class:`~fmconvert.integration.adapters.PathAdapter` (its config): a ``model_class``
    network with config ``model_config`` (private keys dropped), seen from the source path and
    prediction on the target's (paths as descriptions)."""
    return {
        "model_class": model_class,
        "model_config": {k: v for k, v in model_config.items() if not k.startswith("_")},
        "source_path": dict(source_path),
        "source_prediction": source_prediction,
        "target_path": dict(target_path),
        "target_prediction": target_prediction,
        "compute_dtype": compute_dtype,
    }


def velocity_adapter_init(model_class: str, model_config: Mapping[str, Any], source_path: Mapping[str, Any],
                          source_prediction: str, compute_dtype: str = "float64") -> dict[str, Any]:
    """The arguments of :class:`~fmconvert.integration.adapters.VelocityAdapter` for a ``model_class``
    network with config ``model_config`` that predicts ``source_prediction`` on the path
    ``source_path`` (a description, :func:`path_config`). The target is diffusers' FlowMatch
    path with the source's T. ValueError for a flow source."""
    source_prediction = canonical_prediction_type(source_prediction)
    if source_prediction == "flow_prediction":
        raise ValueError("the source is already a flow-matching model; use DiffusionAdapter to convert it back")
    target = rectified_flow(num_train_timesteps=num_train_timesteps(source_path))
    return adapter_init(model_class, model_config, source_path, source_prediction, target, "flow_prediction",
                        compute_dtype)


def velocity_scheduler_config(source_path: Mapping[str, Any], sample_scaling: str | None,
                              steps_offset: int = 0) -> dict[str, Any]:
    """The config of the scheduler that drives a converted velocity model in its stock
    pipeline: diffusers' FlowMatchEulerDiscreteScheduler where the pipeline calls neither
    ``scale_model_input`` nor ``init_noise_sigma`` (``sample_scaling`` None), else fmconvert's
    :class:`~fmconvert.integration.schedulers.FlowMatchEulerScheduler` with that ``sample_scaling`` and the
    source's path description (``source_schedule``: for the grids that follow the source's
    timesteps) and ``steps_offset`` (its scheduler's, for the leading spacing). Keys left out
    take the class's defaults."""
    T = num_train_timesteps(source_path)
    if sample_scaling is None:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": T}
    config = {"_class_name": "FlowMatchEulerScheduler", "num_train_timesteps": T, "sample_scaling": sample_scaling,
              "source_schedule": dict(source_path)}
    if steps_offset:
        config["steps_offset"] = int(steps_offset)
    return config


def path_from_scheduler_config(scheduler: Any) -> tuple[GaussianPath, str]:
    """The Gaussian path and prediction type a diffusers scheduler (or its config dict;
    without ``_class_name`` taken as DDPMScheduler's) describes: :func:`path_config`, built
    (:func:`fmconvert.math.paths.path_from_config`). Raises ValueError naming the offending option for schedulers or settings fmconvert
    cannot map exactly."""
    from fmconvert.math.paths import path_from_config

    description, prediction = path_config(scheduler)
    return path_from_config(description), prediction
