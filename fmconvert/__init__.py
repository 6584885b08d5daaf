"""fmconvert: diffusion models and flow matching are one object in two coordinate systems.

The package is layered; each layer imports only from the layers above it in this list
(tests/test_layers.py checks every import):

- :mod:`fmconvert.files`: reading and writing files (images, references, atomic writes);
- :mod:`fmconvert.math`: pure torch: Gaussian paths, prediction types, the conversion, grids, solvers;
- :mod:`fmconvert.integration`: diffusers: configs, families, adapters, schedulers, folders, the Hub;
- :mod:`fmconvert.sampling`: a loaded model, noise, run records, samples, baselines;
- :mod:`fmconvert.evaluation`: features, FID/KID, field agreement, reports;
- :mod:`fmconvert.training`: fine-tuning and reflow in the converted coordinates;
- :mod:`fmconvert.cli`: the command line, one module per command.

:mod:`fmconvert.errors` is shared by all; :mod:`fmconvert.zoo` holds the bundled models.
:mod:`fmconvert.adapters`, :mod:`fmconvert.schedulers` and :mod:`fmconvert.pipelines` are the
module paths converted folders import (their shims): kept importable for every folder ever written.
"""

__version__ = "0.1.0"

# the public names, imported on first use (PEP 562): `import fmconvert.evaluation.fid` or the CLI's
# --help need not import diffusers
_EXPORTS = {
    "math.conversion": ("Conversion", "apply_conversion", "invert", "plan_conversion", "evaluate_converted"),
    "integration.adapters": ("DiffusionAdapter", "PathAdapter", "VelocityAdapter"),
    "integration.conditioning": ("Conditioning",),
    "integration.families": ("Family", "family_of"),
    "integration.schedulers": ("FlowMatchEulerScheduler", "FlowPipelineDDIMScheduler", "FlowPipelineDPMSolverMultistepScheduler",
                   "FlowPipelineEulerDiscreteScheduler", "FlowDPMSolverMultistepScheduler", "FlowUniPCMultistepScheduler",
                   "FlowDEISMultistepScheduler"),
    "math.predictions": ("PREDICTION_TYPES", "canonical_prediction_type", "from_x0_eps", "pf_ode_drift", "to_x0_eps"),
    "math.paths": ("CosinePath", "DiscreteVPSchedule", "EDMPath", "GaussianPath", "Point", "RectifiedFlow", "VEPath",
                   "VPSDEPath", "path_from_config"),
    "integration.configs": ("path_from_scheduler_config",),
    "integration.folder": ("load",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)
#: public names that were renamed for what they do: old name → new name (a DeprecationWarning names the new one)
_RENAMED = {"reparameterize": "evaluate_converted"}


def __getattr__(name: str):
    if name in _RENAMED:
        import warnings

        warnings.warn(f"fmconvert.{name} is now fmconvert.{_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return __getattr__(_RENAMED[name])
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fmconvert' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
