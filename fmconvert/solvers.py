"""ODE solvers for a velocity field u(x, s) on the rectified path, s from noise (1) to data (0).

Each solver is a short function ``solver(velocity, x, grid) -> x`` over a decreasing grid
s_0 > s_1 > ... > s_N, with h_i = s_{i+1} − s_i < 0:

- euler:     x ← x + h·u(x, s)                                  (1 NFE per step)
- midpoint:  x ← x + h·u(x + ½h·u(x, s), s + ½h)                (2)
- heun:      x̃ = x + h·u₁;  x ← x + ½h·(u₁ + u(x̃, s + h))       (2; Euler on the last step into s = 0,
             as k-diffusion's Heun does, so the field is never asked for s = 0 twice)
- rk4:       classic fourth-order Runge–Kutta                    (4)
- ab2:       second-order Adams–Bashforth on variable steps:     (1)
             x ← x + h·((1 + r/2)·u_i − (r/2)·u_{i−1}),  r = h_i/h_{i−1}; Euler first
- dopri5:    adaptive Dormand–Prince through torchdiffeq (optional extra), --rtol / --atol

NFE is counted by :class:`CountingField`, never assumed from the step count.

:data:`SOLVERS` is the registry: each :class:`Solver` carries its step function, evaluations
per step, order and options; the command line's choices and help, the NaN report and the tests
are read from it. torch is imported where a solver runs (the CLI's --help does not need it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch

Velocity = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class CountingField:
    """Wraps u(x, s); counts evaluations (a Python int: no device synchronisation) and keeps,
    on the device, one number per evaluation that is finite iff its output was: the sum in
    float64 (NaN and ±Inf propagate through a sum; a float64 sum of float32-or-narrower
    values cannot overflow). One reduction per evaluation; read once, after the loop."""

    def __init__(self, velocity: Velocity):
        self.velocity = velocity
        self.nfe = 0
        self.sums: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        import torch

        u = self.velocity(x, s)
        self.sums.append(u.sum(dtype=torch.float32 if u.device.type == "mps" else torch.float64))
        self.nfe += 1
        return u

    def first_bad(self) -> Optional[int]:
        """The first evaluation that returned NaN/Inf, or None (one synchronisation)."""
        import torch

        if not self.sums:
            return None
        bad = ~torch.isfinite(torch.stack(self.sums))
        first = int(torch.where(bad.any(), bad.to(torch.uint8).argmax(), -1))  # argmax: the first maximum
        return first if first >= 0 else None


def _s(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The time for a batch, (B,), on the grid's device. fmconvert's sampler keeps the grid on
    the CPU: the field reads s without waiting for the accelerator, and the adapters plan
    (and remember) their conversion from it."""
    return value.expand(x.shape[0])


def euler(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None) -> torch.Tensor:
    for i, h in enumerate(grid.diff().tolist()):  # h as a Python number: x + h·u in one pass
        x = x.add(u(x, _s(grid[i], x)), alpha=h)
        callback and callback(i)
    return x


def midpoint(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None) -> torch.Tensor:
    for i in range(len(grid) - 1):
        h = grid[i + 1] - grid[i]
        x_mid = x + 0.5 * h * u(x, _s(grid[i], x))
        x = x + h * u(x_mid, _s(grid[i] + 0.5 * h, x))
        callback and callback(i)
    return x


def heun(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None) -> torch.Tensor:
    for i in range(len(grid) - 1):
        h = grid[i + 1] - grid[i]
        u1 = u(x, _s(grid[i], x))
        x_euler = x + h * u1
        if grid[i + 1] == 0:
            x = x_euler
        else:
            x = x + 0.5 * h * (u1 + u(x_euler, _s(grid[i + 1], x)))
        callback and callback(i)
    return x


def rk4(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None) -> torch.Tensor:
    for i in range(len(grid) - 1):
        s, h = grid[i], grid[i + 1] - grid[i]
        k1 = u(x, _s(s, x))
        k2 = u(x + 0.5 * h * k1, _s(s + 0.5 * h, x))
        k3 = u(x + 0.5 * h * k2, _s(s + 0.5 * h, x))
        k4 = u(x + h * k3, _s(s + h, x))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        callback and callback(i)
    return x


def ab2(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None) -> torch.Tensor:
    previous, h_prev = None, grid[1] - grid[0]
    for i in range(len(grid) - 1):
        h = grid[i + 1] - grid[i]
        current = u(x, _s(grid[i], x))
        if previous is None:
            x = x + h * current
        else:
            r = h / h_prev
            x = x + h * ((1 + 0.5 * r) * current - 0.5 * r * previous)
        previous, h_prev = current, h
        callback and callback(i)
    return x


def dopri5(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None, rtol: float = 1e-5,
           atol: float = 1e-5) -> torch.Tensor:
    import torch

    try:
        from torchdiffeq import odeint
    except ImportError as error:  # pragma: no cover - depends on the extra
        raise RuntimeError("solver 'dopri5' needs torchdiffeq: pip install 'fmconvert[adaptive]'") from error
    ends = torch.stack([grid[0], grid[-1]]).to(device=x.device, dtype=torch.float64)
    out = odeint(lambda s, y: u(y, _s(s, y)), x, ends.to(x.dtype), rtol=rtol, atol=atol, method="dopri5")
    callback and callback(len(grid) - 2)
    return out[-1]


@dataclass(frozen=True)
class Solver:
    """A solver of dx/ds = u(x, s): ``step`` integrates along a whole grid (the module's
    signature); ``evals_per_step``: field evaluations per grid step (None: adaptive, counted);
    ``order``: its order of accuracy; ``options``: (name, default) of the keyword options it
    takes (the command line's --rtol / --atol); ``summary``: one line for --help."""

    name: str
    step: Callable
    evals_per_step: int | None
    order: int
    summary: str
    options: tuple[tuple[str, float], ...] = ()

    def step_of(self, evaluation: int, steps: int) -> str:
        """Where the 0-based field ``evaluation`` falls, in words ("step 3 of 10")."""
        if self.evals_per_step is None:
            return f"evaluation {evaluation + 1}"
        return f"step {min(evaluation // self.evals_per_step, steps - 1) + 1} of {steps}"


SOLVERS: dict[str, Solver] = {s.name: s for s in (
    Solver("euler", euler, 1, 1, "1st order, 1 evaluation a step (DDIM's grid: DDIM itself)"),
    Solver("heun", heun, 2, 2, "2nd order, 2 evaluations a step (Euler into s = 0)"),
    Solver("midpoint", midpoint, 2, 2, "2nd order, 2 evaluations a step"),
    Solver("rk4", rk4, 4, 4, "classic Runge-Kutta, 4 evaluations a step"),
    Solver("ab2", ab2, 1, 2, "Adams-Bashforth 2 on variable steps, 1 evaluation a step"),
    Solver("dopri5", dopri5, None, 5, "adaptive Dormand-Prince (torchdiffeq), --rtol / --atol",
           (("rtol", 1e-5), ("atol", 1e-5))),
)}


@dataclass
class SolveResult:
    """``x``: the final state; ``nfe``: evaluations of the field; ``first_bad_nfe``: the
    first evaluation that returned NaN/Inf, or None."""

    x: torch.Tensor
    nfe: int
    first_bad_nfe: Optional[int]


def solve(velocity: Velocity, x: torch.Tensor, grid: torch.Tensor, solver: str = "euler", callback=None,
          **options) -> SolveResult:
    """Integrate dx/ds = u(x, s) along ``grid`` (float64, decreasing) with the named solver.

    ``u`` receives s as a (B,) tensor on the grid's device: a CPU grid (as fmconvert's
    sampler uses) keeps every step free of host-device synchronisation. ``options``: the
    solver's own (:attr:`Solver.options`); any other is refused (ValueError)."""
    import torch

    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: supported are {', '.join(SOLVERS)}")
    known = dict(SOLVERS[solver].options)
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise ValueError(f"solver {solver!r} has no option {unknown[0]!r} ({takes})")
    field = CountingField(velocity)
    grid = grid.to(torch.float64)
    x = SOLVERS[solver].step(field, x, grid, callback=callback, **options)
    return SolveResult(x=x, nfe=field.nfe, first_bad_nfe=field.first_bad())
