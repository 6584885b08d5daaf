"""fmconvert: diffusion models and flow matching are one object in two coordinate systems.

Configs alone (plain Python, what ``wrap`` needs): :mod:`fmconvert.configs`. The math (pure
torch): :mod:`fmconvert.schedules` (Gaussian paths), :mod:`fmconvert.predictions`
(prediction types through (x̂0, ε̂)), :mod:`fmconvert.core` (the conversion between two paths),
:mod:`fmconvert.grids` and :mod:`fmconvert.solvers`. The diffusers glue: :mod:`fmconvert.adapters`,
:mod:`fmconvert.families` (what each model family needs), :mod:`fmconvert.schedulers`,
:mod:`fmconvert.pipelines`.
"""

__version__ = "0.1.0"

# the public names, imported on first use (PEP 562): `import fmconvert.fid` or the CLI's
# --help need not import diffusers
_EXPORTS = {
    "core": ("Conversion", "apply_conversion", "invert", "plan_conversion", "reparameterize"),
    "adapters": ("DiffusionAdapter", "PathAdapter", "VelocityAdapter"),
    "families": ("Conditioning", "Family", "family_of"),
    "schedulers": ("FlowMatchEulerScheduler", "FlowPipelineDDIMScheduler", "FlowPipelineDPMSolverMultistepScheduler",
                   "FlowPipelineEulerDiscreteScheduler", "FlowDPMSolverMultistepScheduler", "FlowUniPCMultistepScheduler",
                   "FlowDEISMultistepScheduler"),
    "configs": ("PREDICTION_TYPES", "canonical_prediction_type"),
    "predictions": ("from_x0_eps", "pf_ode_drift", "to_x0_eps"),
    "schedules": ("CosinePath", "DiscreteVPSchedule", "EDMPath", "GaussianPath", "Point", "RectifiedFlow", "VEPath",
                  "VPSDEPath", "path_from_config", "path_from_scheduler_config"),
    "pipelines": ("load",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fmconvert' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
