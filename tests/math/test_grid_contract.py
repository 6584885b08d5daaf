"""The grid contract, generated from :data:`fmconvert.math.grids.GRIDS` (and, for the sources a grid is
made for, from the path registry :data:`fmconvert.math.paths._PATHS`): a new grid, or a new kind of
path, gets these tests by being registered.

- every grid, on every source it accepts, is ``steps + 1`` float64 times, strictly decreasing, from at
  most 1 (s = 1 is noise) to exactly 0; a grid that needs a discrete schedule (``Grid.discrete``)
  refuses any other source with a ValueError, never another exception;
- a grid with ``shifts`` applies the time shift s = k·u/(1 + (k − 1)·u) of FlowMatchEulerDiscreteScheduler
  to uniform u (at float32 rounding where the grid is diffusers' float32 sigmas, bit for bit): k > 1
  moves every interior time toward the noise, k < 1 toward the data, the ends stay;
- a grid without ``shifts`` refuses a shift (:func:`check_shift` raises ValueError) and is not changed
  by one handed to :func:`time_grid`.

tests/math/test_solvers.py::test_every_grid_decreases_to_zero checks the first point on one schedule.
"""

import pytest
import torch

from fmconvert.math.grids import GRIDS, check_shift, time_grid
from fmconvert.math.paths import _PATHS, DiscreteVPSchedule, RectifiedFlow, path_from_config

F64 = torch.float64

#: every registered kind of path at its defaults, plus discrete schedules with their own edges (a cosine
#: schedule; zero terminal SNR, where the trailing grid starts at s = 1 exactly) and no source at all
SOURCES = {
    **{kind: path_from_config({"kind": kind}) for kind in _PATHS},
    "discrete_vp-cosine": DiscreteVPSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"}),
    "discrete_vp-zsnr": DiscreteVPSchedule.from_config({"beta_schedule": "linear", "rescale_betas_zero_snr": True}),
    "none": None,
}
SHIFTING = [name for name, grid in GRIDS.items() if grid.shifts]
FIXED = [name for name, grid in GRIDS.items() if not grid.shifts]


def accepts(kind: str, source) -> bool:
    return not GRIDS[kind].discrete or isinstance(source, DiscreteVPSchedule)


def assert_is_a_grid(grid: torch.Tensor, steps: int) -> None:
    assert grid.dtype == F64 and grid.shape == (steps + 1,), (grid.dtype, grid.shape)
    assert grid[-1] == 0 and 0 < grid[0] <= 1, grid
    assert bool((grid.diff() < 0).all()), f"not strictly decreasing: {grid.tolist()}"


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("steps", [1, 2, 13])
def test_every_grid_decreases_from_at_most_one_to_zero_or_refuses_the_source(kind, source, steps):
    path = SOURCES[source]
    if accepts(kind, path):
        assert_is_a_grid(time_grid(kind, steps, path), steps)
    else:
        with pytest.raises(ValueError, match="discrete schedule"):
            time_grid(kind, steps, path)


@pytest.mark.parametrize("kind", [name for name, grid in GRIDS.items() if grid.discrete])
def test_a_discrete_grid_takes_up_to_the_trained_timesteps(kind):
    path = DiscreteVPSchedule.from_config({"beta_schedule": "linear", "num_train_timesteps": 20})
    assert_is_a_grid(time_grid(kind, 20, path), 20)
    with pytest.raises(ValueError, match="exceeds"):
        time_grid(kind, 21, path)


def _unshift(s: torch.Tensor, k: float) -> torch.Tensor:
    """u with s = k·u/(1 + (k − 1)·u)."""
    return s / (k - (k - 1) * s)


@pytest.mark.parametrize("kind", SHIFTING)
@pytest.mark.parametrize("source", ["rectified_flow", "discrete_vp-cosine"])
@pytest.mark.parametrize("k", [0.5, 3.0])
def test_a_shift_moves_uniform_times_by_the_flowmatch_formula(kind, source, k):
    steps, path = 13, SOURCES[source]
    check_shift(kind, k)  # taken
    plain, shifted = time_grid(kind, steps, path), time_grid(kind, steps, path, shift=k)
    assert_is_a_grid(shifted, steps)
    # the positive times are the shift of uniform u, from u = 1 down to the last one's
    u = torch.linspace(1.0, _unshift(shifted[-2], k).item(), steps, dtype=F64)
    float32_sigmas = torch.equal(shifted, shifted.float().double())  # (flowmatch: diffusers' float32 sigmas)
    torch.testing.assert_close(shifted[:-1], RectifiedFlow(shift=k).shifted(u), rtol=4e-7 if float32_sigmas else 1e-14,
                               atol=0)
    # toward the noise for k > 1, toward the data for k < 1; the ends stay
    assert shifted[0] == plain[0] and shifted[-1] == plain[-1] == 0
    moved = shifted[1:-1] - plain[1:-1]
    assert bool((moved > 0).all() if k > 1 else (moved < 0).all()), moved


@pytest.mark.parametrize("kind", SHIFTING)
def test_a_shifting_grid_takes_positive_shifts_only(kind):
    check_shift(kind, None)
    check_shift(kind, 2.0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="positive"):
            check_shift(kind, bad)


@pytest.mark.parametrize("kind", FIXED)
def test_a_grid_without_shift_refuses_one(kind):
    check_shift(kind, None)  # (None: the scheduler's own)
    for k in (0.5, 3.0):
        with pytest.raises(ValueError, match=f"not {kind}"):
            check_shift(kind, k)
        path = SOURCES["discrete_vp-cosine"]
        assert torch.equal(time_grid(kind, 9, path, shift=k), time_grid(kind, 9, path))
