"""Baselines: the source's own diffusers samplers, driving the unconverted network on the same
noise and conditioning as fmconvert's solvers (``--baseline``; :func:`fmconvert.sampling.iter_baseline`
runs them).

:data:`BASELINES` is the registry: each :class:`Baseline` names its diffusers scheduler class and
the options fmconvert sets on the source's scheduler config; the command line's choices and help
are read from it. diffusers is imported where a scheduler is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from .pipelines import Source


@dataclass(frozen=True)
class Baseline:
    """A diffusers scheduler built from the source's scheduler config with ``options`` on top;
    ``summary``: one line for --help; ``grid``: the name of the timesteps it steps through."""

    name: str
    scheduler_class: str
    summary: str
    grid: str
    options: tuple[tuple[str, Any], ...] = ()

    def build(self, source: Source):
        """The scheduler for ``source`` (a diffusion source: a flow model or a converted folder
        has no diffusion scheduler of its own to compare with; UsageError)."""
        import diffusers

        if source.prediction_type == "flow_prediction" or source.converted:
            what = "a converted model" if source.converted else "a flow model"
            raise UsageError(f"--baseline {self.name} runs a diffusion source's own scheduler; "
                             f"'{source.reference}' is {what}")
        cls = getattr(diffusers, self.scheduler_class)
        return cls.from_config({**source.scheduler, "prediction_type": source.prediction_type}, **dict(self.options))


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    # the ODE sampler that Euler on the converted field reproduces on the trailing grid (clipping and
    # thresholding clamp x̂0, which no ODE does)
    Baseline("ddim", "DDIMScheduler", "DDIMScheduler (trailing, no clipping): Euler on the trailing grid equals it",
             "trailing", (("timestep_spacing", "trailing"), ("clip_sample", False), ("set_alpha_to_one", True),
                          ("thresholding", False))),
)}
