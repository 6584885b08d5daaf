"""Time grids on the rectified path: decreasing s_0 > ... > s_N = 0 (s = 1 is noise).

- uniform:   s = shift(u) for u uniform from 1 to 0, with FlowMatchEulerDiscreteScheduler's
             time shift s = k·u / (1 + (k − 1)·u) (Esser et al. 2024, SD3, eq. 23): the
             source scheduler's ``shift`` k, or one given (k > 1 puts more steps near the
             noise; at 3 to 5 NFE a shift of 1.5 to 2 is what the zoo's models sample best
             with: docs/benchmarks/SAMPLERS.md);
- flowmatch: FlowMatchEulerDiscreteScheduler's own default, bit for bit: N times from 1 to
             shift(1/T), shifted (again, as diffusers does), then 0 (what a converted
             pipeline's __call__ uses);
- trailing, leading, linspace: the source scheduler's integer timesteps with diffusers'
             DDIM spacing rules, each mapped to s = σ/(α+σ), then 0 (trailing is the grid
             on which Euler reproduces DDIMScheduler step for step);
- karras:    Karras et al. (2022) ρ = 7 spacing of the VE sigma σ/α between the source's
             smallest and largest trained noise, mapped to s = σ/(1+σ), then 0;
- logsnr:    uniform in λ = log(α/σ) over the source's trained range, then 0.

Sources without a discrete schedule (flow-matching models) have no integer timesteps:
the trailing / leading / linspace grids are refused for them, and karras / logsnr use
s ∈ [1/T, 1 − 1/T].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a grid is computed: the command line's help reads GRIDS without them
    import numpy as np
    import torch

    from fmconvert.math.paths import GaussianPath


@dataclass(frozen=True)
class Grid:
    """A kind of time grid: ``summary`` for the command line's help; ``discrete``: it needs the
    source's integer timesteps (a discrete VP schedule); ``shifts``: it takes a time shift (``shift``)."""

    name: str
    summary: str
    discrete: bool = False
    shifts: bool = False


GRIDS: dict[str, Grid] = {g.name: g for g in (
    Grid("uniform", "uniform in s, with the scheduler's time shift or the shift given", shifts=True),
    Grid("flowmatch", "FlowMatchEulerDiscreteScheduler's own sigmas (what a flow pipeline's __call__ uses; "
                      "a shift given replaces its own)", shifts=True),
    Grid("trailing", "the source's DDIM trailing timesteps mapped to s (Euler on it is DDIM)", discrete=True),
    Grid("leading", "the source's leading timesteps (with its steps_offset) mapped to s", discrete=True),
    Grid("linspace", "the source's linspace timesteps mapped to s", discrete=True),
    Grid("karras", "Karras et al. rho = 7 in sigma/alpha over the trained range"),
    Grid("logsnr", "uniform in log-SNR over the trained range"),
)}


def check_shift(kind: str, shift: float | None) -> None:
    """ValueError unless ``shift`` (None: the scheduler's own) is a positive shift that ``kind`` takes."""
    if shift is None:
        return
    if not shift > 0:
        raise ValueError(f"the time shift must be positive, got {shift}")
    if not GRIDS[kind].shifts:
        takers = " and ".join(name for name, g in GRIDS.items() if g.shifts)
        raise ValueError(f"a time shift applies to the {takers} grids, not {kind}")


def discrete_timesteps(spacing: str, steps: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """Integer timesteps, noisiest first, by diffusers' DDIMScheduler.set_timesteps rules."""
    import numpy as np

    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = T // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    raise ValueError(f"unknown spacing {spacing!r}: supported are trailing, leading, linspace")


def trained_log_snr_range(source: GaussianPath | None) -> tuple[float, float]:
    """(λ_max, λ_min): the cleanest and noisiest log-SNR the source was trained on."""
    import torch

    from fmconvert.math.paths import DiscreteVPSchedule, RectifiedFlow

    F64 = torch.float64
    if isinstance(source, DiscreteVPSchedule):
        ends = source.log_snr(torch.tensor([source.t_min, source.t_max], dtype=F64))
        lam_max, lam_min = ends.tolist()
        if source.zero_terminal_snr:  # λ = −∞ at the end: use the last finite knot
            lam_min = source.log_snr(torch.tensor(source.t_max - 1, dtype=F64)).item()
        return lam_max, lam_min
    if source is not None:  # a continuous range (VE, EDM): its ends, where finite
        ends = source.log_snr(torch.tensor([source.t_min, source.t_max], dtype=F64))
        if bool(torch.isfinite(ends).all()):
            return float(ends[0]), float(ends[1])
    T = getattr(source, "num_train_timesteps", 1000)
    flow = RectifiedFlow()
    lam = flow.log_snr(torch.tensor([1 / T, 1 - 1 / T], dtype=F64)).tolist()
    return lam[0], lam[1]


def time_grid(kind: str, steps: int, source: GaussianPath | None = None, shift: float = 1.0,
              rho: float = 7.0, steps_offset: int = 0) -> torch.Tensor:
    """``steps + 1`` decreasing times s in [0, 1], ending at 0 (float64). ``steps_offset``:
    the source scheduler's, which its ``leading`` spacing adds to every timestep."""
    import numpy as np
    import torch

    from fmconvert.math.paths import DiscreteVPSchedule, RectifiedFlow

    F64 = torch.float64
    if kind not in GRIDS:
        raise ValueError(f"unknown grid {kind!r}: supported are {', '.join(GRIDS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    flow = RectifiedFlow(shift=shift)
    zero = torch.zeros(1, dtype=F64)
    if kind == "uniform":
        return flow.shifted(torch.linspace(1, 0, steps + 1, dtype=F64))
    if kind == "flowmatch":
        T = getattr(source, "num_train_timesteps", 1000)
        # the scheduler keeps sigma_min = shift(1/T) in float32 and shifts the linspace again
        s_min = float(np.float32(flow.shifted(torch.tensor(1 / T, dtype=F64))))
        u = torch.from_numpy(np.linspace(1.0, s_min, steps))
        return torch.cat([flow.shifted(u).to(torch.float32).to(F64), zero])
    if GRIDS[kind].discrete:
        if not isinstance(source, DiscreteVPSchedule):
            raise ValueError(f"grid {kind!r} needs a source with a discrete schedule; use uniform, karras or logsnr")
        if steps > source.num_train_timesteps:
            raise ValueError(f"steps={steps} exceeds the source's {source.num_train_timesteps} trained timesteps")
        t = torch.from_numpy(discrete_timesteps(kind, steps, source.num_train_timesteps, steps_offset).copy()).to(F64)
        if int(t.max()) >= source.num_train_timesteps:
            raise ValueError(f"steps_offset={steps_offset} puts a leading timestep at {int(t.max())}, beyond the "
                             f"source's {source.num_train_timesteps} trained timesteps")
        return torch.cat([flow.time_at_log_snr(source.log_snr(t)), zero])
    lam_max, lam_min = trained_log_snr_range(source)
    if kind == "logsnr":
        lam = torch.linspace(lam_min, lam_max, steps, dtype=F64)
        return torch.cat([flow.time_at_log_snr(lam), zero])
    # karras: σ_VE = e^{−λ}, ρ-spacing from σ_max down to σ_min
    sigma_min, sigma_max = np.exp(-lam_max), np.exp(-lam_min)
    ramp = torch.linspace(0, 1, steps, dtype=F64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas / (1 + sigmas), zero])
