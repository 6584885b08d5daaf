"""fmconvert: diffusion models and flow matching are one object in two coordinate systems.

Core modules: :mod:`fmconvert.schedules` (Gaussian paths), :mod:`fmconvert.predictions`
(prediction types through (x̂0, ε̂)), :mod:`fmconvert.adapters` (the diffusers modules).
"""

__version__ = "0.1.0"

from .adapters import DiffusionAdapter, PathAdapter, VelocityAdapter, reparameterize
from .predictions import PREDICTION_TYPES, canonical_prediction_type, from_x0_eps, pf_ode_drift, to_x0_eps
from .schedules import (
    CosinePath,
    DiscreteVPSchedule,
    GaussianPath,
    Point,
    RectifiedFlow,
    VEPath,
    path_from_config,
    path_from_scheduler_config,
)
from .pipelines import load

__all__ = [
    "CosinePath", "DiffusionAdapter", "DiscreteVPSchedule", "GaussianPath", "PREDICTION_TYPES", "PathAdapter",
    "Point", "RectifiedFlow", "VEPath", "VelocityAdapter", "canonical_prediction_type", "from_x0_eps",
    "load", "path_from_config", "path_from_scheduler_config", "pf_ode_drift", "reparameterize", "to_x0_eps",
]
