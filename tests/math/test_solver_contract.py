"""The solver contract, generated from :data:`fmconvert.math.solvers.SOLVERS`: every entry is held to
what it declares (in the manner of diffusers' tests/schedulers/test_schedulers.py, the suite every
scheduler inherits), so a new entry gets these tests by being registered.

- ``order``: the observed order of convergence of the final error, step count doubled, is the declared
  one (±0.35) on a nonlinear field; an adaptive solver (``evals_per_step`` None) is measured as the slope
  of its error against its counted evaluations over five decades of tolerance (at least order − 1);
  the chooser ``auto`` declares the least order of what it may choose and runs its resolved choice;
- ``evals_per_step``: every step costs exactly that many field evaluations (the step into s = 0 may
  cost fewer), the count :func:`solve` reports is the field's own, and :meth:`Solver.step_of` names
  the step each evaluation belongs to;
- ``options``: their declared defaults are the solver's defaults, and nothing else is taken;
- every solver runs the whole [1 → 0] grid from pure noise in float32, staying finite and in float32,
  and calls back once per step.

tests/math/test_solvers.py measures the same orders on hand-written lists (test_convergence_order_and_nfe,
test_exponential_integrators_converge_at_their_order_with_one_evaluation_a_step); those lists are what
this suite replaces.
"""

import math
from functools import lru_cache

import pytest
import torch
from test_solvers import exact_flow, gaussian_velocity, log_snr_grid

from fmconvert.math.solvers import AUTO_CHOICE, SOLVERS, auto_choice, solve

F64 = torch.float64
#: the chooser: it declares no method of its own but the least order / the evaluations of what it picks
CHOOSER = "auto"
#: order measured from N to 2N steps (asymptotic for every registered solver, see the docstring)
N = 80
#: how far an observed order may be from the declared one (measured: 0.03 .. 0.2)
ORDER_SLACK = 0.35


def nonlinear_velocity(x, s):
    """The Gaussian flow of test_solvers plus a smooth nonlinear term: no solver superconverges on it
    (on the linear field alone midpoint shows order 3)."""
    sv = s.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return gaussian_velocity(x, s) + 0.5 * torch.sin(2 * x) * (1 + sv)


def _start():
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    return exact_flow(log_snr_grid(2)[0].item(), z)  # (every log_snr_grid starts at the same s)


@lru_cache(maxsize=1)
def _reference() -> torch.Tensor:
    """x at s = 0 from _start(): classic RK4 written here (not the registry's), 1024 steps on
    log_snr_grid (its error, ~4e-11, is far below every error measured against it)."""
    x, grid = _start(), log_snr_grid(1024)
    for i in range(len(grid) - 1):
        s, h = grid[i].expand(x.shape[0]), (grid[i + 1] - grid[i]).item()
        k1 = nonlinear_velocity(x, s)
        k2 = nonlinear_velocity(x + 0.5 * h * k1, s + 0.5 * h)
        k3 = nonlinear_velocity(x + 0.5 * h * k2, s + 0.5 * h)
        k4 = nonlinear_velocity(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _error(name: str, grid: torch.Tensor, **options) -> tuple[float, int]:
    result = solve(nonlinear_velocity, _start(), grid, name, **options)
    return (result.x - _reference()).abs().max().item(), result.nfe


class Recorder:
    """A field that counts its own evaluations and, through the solver's callback, how many each step made."""

    def __init__(self, velocity=gaussian_velocity):
        self.velocity, self.calls, self.per_step, self.steps_called = velocity, 0, [], []

    def __call__(self, x, s):
        self.calls += 1
        return self.velocity(x, s)

    def callback(self, i):
        self.per_step.append(self.calls - sum(self.per_step))
        self.steps_called.append(i)


def _interior_grid(steps: int) -> torch.Tensor:
    """A decreasing grid that stays away from both ends (s from 0.95 to 0.05, uniform in log-SNR)."""
    return torch.sigmoid(-torch.linspace(-3, 3, steps + 1, dtype=F64))


def test_the_registry_is_consistent():
    for name, solver in SOLVERS.items():
        assert solver.name == name and solver.summary and solver.order >= 1
        assert solver.evals_per_step is None or solver.evals_per_step >= 1
        assert all(isinstance(key, str) for key, _ in solver.options)
    assert CHOOSER in SOLVERS


@pytest.mark.threads(1)
@pytest.mark.parametrize("name", SOLVERS)
def test_observed_order_is_the_declared_order(name):
    solver = SOLVERS[name]
    if solver.evals_per_step is None:  # adaptive: error against counted evaluations as the tolerances tighten
        (e1, n1), (e2, n2) = (_error(name, log_snr_grid(4), **{k: v * scale for k, v in solver.options})
                              for scale in (1.0, 1e-5))
        slope = math.log(e1 / e2) / math.log(n2 / n1)
        assert n2 > n1 and slope >= solver.order - 1, f"{name}: error ~ NFE^-{slope:.2f}, declared order {solver.order}"
        return
    (e1, _), (e2, _) = _error(name, log_snr_grid(N)), _error(name, log_snr_grid(2 * N))
    measured = math.log2(e1 / e2)
    if name == CHOOSER:  # it runs its choice for this many steps: at least the order it declares
        assert measured >= solver.order - ORDER_SLACK, f"{name} (runs {auto_choice(N)[0]}): observed order {measured:.2f}"
    else:
        assert abs(measured - solver.order) <= ORDER_SLACK, f"{name}: observed order {measured:.2f}, declared {solver.order}"


@pytest.mark.parametrize("name", [name for name, s in SOLVERS.items() if s.evals_per_step is not None])
@pytest.mark.parametrize("to_zero", [False, True], ids=["interior", "to-zero"])
def test_every_step_costs_its_declared_evaluations(name, to_zero):
    """On a grid inside (0, 1) every step costs exactly evals_per_step; into s = 0 the last may cost fewer
    (heun takes an Euler step there), never more. The NaN report's step_of names the right step."""
    steps, evals = 16, SOLVERS[name].evals_per_step
    grid = log_snr_grid(steps) if to_zero else _interior_grid(steps)
    field = Recorder()
    result = solve(field, exact_flow(grid[0].item(), torch.ones(2, 3, dtype=F64)), grid, name, callback=field.callback)
    assert result.nfe == field.calls == sum(field.per_step)
    assert field.steps_called == list(range(steps))
    last = field.per_step[-1]
    assert field.per_step[:-1] == [evals] * (steps - 1), f"{name}: evaluations per step {field.per_step}, declared {evals}"
    assert last == evals or (to_zero and 1 <= last < evals), f"{name}: last step {last} evaluations, declared {evals}"
    owner = [i for i, count in enumerate(field.per_step) for _ in range(count)]
    assert [SOLVERS[name].step_of(k, steps) for k in range(result.nfe)] == [f"step {i + 1} of {steps}" for i in owner]


@pytest.mark.parametrize("name", [name for name, s in SOLVERS.items() if s.evals_per_step is None])
def test_adaptive_solvers_count_what_they_evaluate(name):
    field = Recorder()
    grid = torch.linspace(1, 0, 5, dtype=F64)
    result = solve(field, torch.ones(2, 3, dtype=F64), grid, name, callback=field.callback)
    assert result.nfe == field.calls > 0 and field.steps_called[-1] == len(grid) - 2
    assert [SOLVERS[name].step_of(k, 4) for k in (0, 5)] == ["evaluation 1", "evaluation 6"]


@pytest.mark.parametrize("name", SOLVERS)
def test_declared_option_defaults_are_the_solvers_own_and_nothing_else_is_taken(name):
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    grid = torch.linspace(1, 0, 7, dtype=F64)
    plain = solve(gaussian_velocity, z, grid, name)
    explicit = solve(gaussian_velocity, z, grid, name, **dict(SOLVERS[name].options))
    assert torch.equal(plain.x, explicit.x) and plain.nfe == explicit.nfe
    with pytest.raises(ValueError, match="has no option 'not_an_option'"):
        solve(gaussian_velocity, z, grid, name, not_an_option=1.0)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_runs_from_pure_noise_in_float32(name, steps):
    """The default grid, uniform from s = 1 (λ = −∞): finite, float32 in and out, every step called back."""
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    field = Recorder()
    result = solve(field, z, torch.linspace(1, 0, steps + 1, dtype=F64), name, callback=field.callback)
    assert result.x.dtype == torch.float32 and result.x.shape == z.shape
    assert result.first_bad_nfe is None and bool(torch.isfinite(result.x).all())
    expected = [steps - 1] if SOLVERS[name].evals_per_step is None else list(range(steps))
    assert field.steps_called == expected
    # within the accuracy of a few steps of a first-order method, at the flow's end M + C·z
    assert (result.x.double() - exact_flow(0.0, z.double())).abs().max() < 0.5


def test_the_chooser_declares_what_it_may_choose():
    """auto declares the least order and the evaluations of the solvers AUTO_CHOICE names, takes no
    options, and at every step count is its choice, bit for bit (either side of each boundary)."""
    chooser = SOLVERS[CHOOSER]
    choices = {solver for _, solver, _ in AUTO_CHOICE}
    assert choices <= set(SOLVERS) - {CHOOSER}
    assert chooser.order == min(SOLVERS[c].order for c in choices)
    assert {SOLVERS[c].evals_per_step for c in choices} == {chooser.evals_per_step} and chooser.options == ()
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    for steps in sorted({1} | {m + d for m, _, _ in AUTO_CHOICE[:-1] for d in (0, 1)}):
        grid = torch.linspace(1, 0, steps + 1, dtype=F64)
        chosen, ran = solve(gaussian_velocity, z, grid, auto_choice(steps)[0]), solve(gaussian_velocity, z, grid, CHOOSER)
        assert torch.equal(chosen.x, ran.x) and chosen.nfe == ran.nfe, steps
