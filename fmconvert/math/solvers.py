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
- dpmpp_2m:  DPM-Solver++(2M) in data prediction x̂0 = x − s·u:      (1)
             x ← (σ_{i+1}/σ_i)·x − α_{i+1}(e^{−h} − 1)·(x̂0_i + ½(x̂0_i − x̂0_{i−1})/r),
             α = 1 − s, σ = s, λ = log(α/σ), h = λ_{i+1} − λ_i, r = h_{i−1}/h; first order
             first and into s = 0 (x ← x̂0): diffusers' DPMSolverMultistepScheduler
- dpmpp_3m:  DPM-Solver++(3M) as diffusers has it (second order:   (1)
             its D2 is half the third-order term)
- unipc:     UniPC: UniP-2 predictor + UniC corrector,             (1)
             B(h) = e^h − 1, data prediction, as diffusers' UniPCMultistepScheduler(solver_order=2);
             the corrector reuses the next step's evaluation
- dopri5:    adaptive Dormand–Prince through torchdiffeq (optional extra), options rtol / atol

The exponential integrators read only λ, σ_{i+1}/σ_i, α_{i+1} and x̂0: on the grid
s = σ/(α + σ) of a VP schedule, with x = x_VP/(α + σ), they take the diffusers scheduler's
steps exactly.

NFE is counted by :class:`CountingField`, never assumed from the step count.

:data:`SOLVERS` is the registry: each :class:`Solver` carries its step function, evaluations
per step, order and options; the command line's choices and help, the NaN report and the tests
are read from it. torch is imported where a solver runs (the command line's help does not need it).
"""

from __future__ import annotations

import math
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
    if grid.requires_grad:  # (a grid being tuned: the step sizes carry its gradient)
        for i in range(len(grid) - 1):
            x = x + (grid[i + 1] - grid[i]) * u(x, _s(grid[i], x))
            callback and callback(i)
        return x
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
    return _two_step(u, x, grid, True, None, callback)


def _two_step(u: Velocity, x: torch.Tensor, grid: torch.Tensor, adams: bool, corrections, callback=None) -> torch.Tensor:
    """x ← x + h_i·((1 + b_i)·u_i − b_i·u_{i−1}), Euler on the first step: b_i = r_i/2 (``adams``: ab2)
    or 0 (euler), plus ``corrections[i]`` where given (:func:`weighted_multistep`)."""
    previous, h_prev = None, grid[1] - grid[0]
    for i in range(len(grid) - 1):
        h = grid[i + 1] - grid[i]
        current = u(x, _s(grid[i], x))
        if previous is None:
            x = x + h * current
        else:
            b = 0.5 * (h / h_prev) if adams else 0.0
            if corrections is not None:
                b = b + corrections[i]
            x = x + h * ((1 + b) * current - b * previous)
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


# -- exponential integrators in data prediction ------------------------------------------------------
#
# On the rectified path α_s = 1 − s, σ_s = s and λ = log(α/σ) (−∞ at s = 1, +∞ at s = 0); the
# data prediction of a velocity is x̂0 = x − s·u. The exact solution from s to t (λ_s < λ_t) is
# x_t = (σ_t/σ_s)·x_s + σ_t·∫ e^λ x̂0 dλ: these solvers approximate x̂0 in λ by polynomials
# through earlier evaluations. Their update reads only λ, σ_t/σ_s, α_t and x̂0, so they are the
# same solver on every Gaussian path with the same λ: on s = σ/(α + σ), x = x_VP/(α + σ), each
# takes the steps of the diffusers scheduler it mirrors on the source's own VP path.


def _lambdas(grid: torch.Tensor) -> list:
    """λ_i = log((1 − s_i)/s_i): −∞ at s = 1, +∞ at s = 0. Python floats; on a grid that requires
    grad (one being tuned: :mod:`fmconvert.math.tuning`) the interior ones are 0-d tensors that carry
    its gradient (the infinite ends, fixed by the tuning, stay floats)."""
    import torch

    if grid.requires_grad:
        return [-math.inf if v >= 1 else math.inf if v <= 0 else torch.log1p(-s) - torch.log(s)
                for v, s in zip(grid.detach().tolist(), grid.unbind())]
    return [-math.inf if s >= 1 else math.inf if s <= 0 else math.log1p(-s) - math.log(s) for s in grid.tolist()]


def _times(grid: torch.Tensor) -> list:
    """The grid's times for the exponential integrators' coefficients: Python floats, or 0-d tensors
    that carry the gradient of a grid that requires grad."""
    return list(grid.unbind()) if grid.requires_grad else grid.tolist()


def _expm1(h):
    """e^h − 1 of a float or of a 0-d tensor (differentiable)."""
    import torch

    return math.expm1(h) if isinstance(h, float) else torch.expm1(h)


def _far(lam) -> bool:
    """λ = −∞ (s = 1): an evaluation there lies infinitely far back in λ, so every difference quotient
    against it is 0 (diffusers computes the 0 from 1/∞). The solvers skip such a term: the same sum,
    and a tuned grid's gradient free of ∞·0."""
    return isinstance(lam, float) and math.isinf(lam)


def _data_prediction(u: Velocity, x: torch.Tensor, grid: torch.Tensor, i: int) -> torch.Tensor:
    """x̂0 = x − s_i·u(x, s_i): one evaluation (differentiable in s_i on a grid that requires grad)."""
    if grid.requires_grad:
        return x - grid[i] * u(x, _s(grid[i], x))
    return x.add(u(x, _s(grid[i], x)), alpha=-float(grid[i]))


def _dpm_order(order: int, i: int, n: int, final_zero: bool) -> int:
    """DPMSolverMultistepScheduler.step's order for step i of n (lower_order_final=True):
    warm-up 1, 2, ...; the last step first order when it goes to s = 0 or n < 15; with
    n < 15 the second-to-last at most second order."""
    if i == n - 1 and (final_zero or n < 15):
        return 1
    if i == n - 2 and n < 15:
        order = min(order, 2)
    return min(order, i + 1)


def _dpmpp_multistep(u: Velocity, x: torch.Tensor, grid: torch.Tensor, order: int, callback=None,
                     corrections=None) -> torch.Tensor:
    """DPM-Solver++(order M) in data prediction, diffusers' dpmsolver++ updates ("midpoint" at order 2);
    with ``corrections``, :func:`weighted_multistep`'s term on each step after the first."""
    lam, s = _lambdas(grid), _times(grid)
    n, final_zero = len(s) - 1, float(grid[-1].detach()) == 0
    m: list[torch.Tensor] = []  # x̂0 of the last (up to) three evaluations, newest last
    for i in range(n):
        m = (m + [_data_prediction(u, x, grid, i)])[-3:]
        k = _dpm_order(order, i, n, final_zero)
        h = lam[i + 1] - lam[i]
        ratio, alpha, phi = s[i + 1] / s[i], 1 - s[i + 1], _expm1(-h)  # σ_t/σ_s, α_t, e^{−h} − 1
        if k == 1 or (k == 2 and _far(lam[i - 1])):
            x = ratio * x - (alpha * phi) * m[-1]
        elif k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1 = (1.0 / r0) * (m[-1] - m[-2])
            x = ratio * x - (alpha * phi) * m[-1] - (0.5 * alpha * phi) * d1
        elif _far(lam[i - 2]):  # (D1_1 = 0 and D2 = 0)
            d1 = (1.0 / ((lam[i] - lam[i - 1]) / h)) * (m[-1] - m[-2])
            x = ratio * x - (alpha * phi) * m[-1] + (alpha * (phi / h + 1.0)) * d1
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (1.0 / r0) * (m[-1] - m[-2]), (1.0 / r1) * (m[-2] - m[-3])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
            x = (ratio * x - (alpha * phi) * m[-1] + (alpha * (phi / h + 1.0)) * d1
                 - (alpha * ((phi + h) / h**2 - 0.5)) * d2)
        if corrections is not None and i > 0:
            x = x - (alpha * phi * corrections[i]) * (m[-1] - m[-2])
        callback and callback(i)
    return x


def dpmpp_2m(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None, corrections=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), in data prediction on
    the rectified path (α = 1 − s, σ = s, λ = log(α/σ), x̂0 = x − s·u). Step s_i → s_{i+1},
    h = λ_{i+1} − λ_i, r = h_{i−1}/h:

        x ← (σ_{i+1}/σ_i)·x − α_{i+1}·(e^{−h} − 1)·(D0 + ½·D1),  D0 = x̂0_i,  D1 = (x̂0_i − x̂0_{i−1})/r

    D1 = 0 on the first step; the step into s = 0 (σ = 0) is first order: x ← x̂0 of the last
    evaluation. Mirrors diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_order=2, solver_type="midpoint", lower_order_final=True) step for step
    (multistep_dpm_solver_first_order_update / multistep_dpm_solver_second_order_update).
    One evaluation a step. ``corrections``: :func:`weighted_multistep`'s term on each step after the first."""
    return _dpmpp_multistep(u, x, grid, 2, callback, corrections)


def dpmpp_3m(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None, corrections=None) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, "DPM-Solver++"), in data prediction on the rectified
    path. With r0 = h_{i−1}/h, r1 = h_{i−2}/h, D1_0 = (x̂0_i − x̂0_{i−1})/r0,
    D1_1 = (x̂0_{i−1} − x̂0_{i−2})/r1, D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1),
    D2 = (D1_0 − D1_1)/(r0 + r1):

        x ← (σ_{i+1}/σ_i)·x − α_{i+1}(e^{−h} − 1)·x̂0_i + α_{i+1}((e^{−h} − 1)/h + 1)·D1
              − α_{i+1}((e^{−h} − 1 + h)/h² − ½)·D2

    Warm-up: first order on the first step, (2M) on the second; the step into s = 0 first order
    (x ← x̂0); with fewer than 15 steps the second-to-last is at most (2M) (diffusers'
    lower_order_final). Mirrors DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_order=3) (multistep_dpm_solver_third_order_update). One evaluation a step.

    Its order is 2, not 3: D2 ≈ h²·x̂0''/2 while the φ₃ coefficient needs h²·x̂0'' (the
    Taylor term of x̂0 in λ), so the local error is O(h³), not O(h⁴) (with 2·D2 it is O(h⁴)).
    It is kept as diffusers (and Lu et al.'s dpm_solver_pytorch) computes it, step for step.
    ``corrections``: :func:`weighted_multistep`'s term on each step after the first."""
    return _dpmpp_multistep(u, x, grid, 3, callback, corrections)


def unipc(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None, corrections=None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), B(h) = e^h − 1
    ("bh2"), in data prediction on the rectified path: the predictor UniP-2, which with
    B(h) = e^{−h} − 1 is DPM-Solver++(2M) (φ = e^{−h} − 1, D1 = (x̂0_{i−1} − x̂0_i)/r_k,
    r_k = (λ_{i−1} − λ_i)/h):

        x̃_{i+1} = (σ_{i+1}/σ_i)·x_i − α_{i+1}·φ·x̂0_i − α_{i+1}·φ·½·D1

    then, once x̂0_{i+1} = x̃_{i+1} − s_{i+1}·u(x̃_{i+1}, s_{i+1}) has been evaluated for the next
    step, the corrector UniC of the same order replaces x̃_{i+1} by

        x_{i+1} = (σ_{i+1}/σ_i)·x_i − α_{i+1}·φ·x̂0_i − α_{i+1}·φ·(ρ_0·D1 + ρ_1·(x̂0_{i+1} − x̂0_i))

    (ρ = ½ at order 1; at order 2 ρ solves [[1, 1], [r_k, 1]]·ρ = b, b_1 = (φ/(−h) − 1)/φ,
    b_2 = 2·((φ/(−h) − 1)/(−h) − ½)/φ). The next predictor starts from the corrected x_{i+1}
    with the x̂0 evaluated at x̃_{i+1}: no extra evaluation. Warm-up: first order on the first
    step; the last step first order (x ← x̂0 into s = 0) and not corrected. Mirrors diffusers'
    UniPCMultistepScheduler(solver_order=2, predict_x0=True, solver_type="bh2",
    lower_order_final=True) (multistep_uni_p_bh_update / multistep_uni_c_bh_update).
    One evaluation a step. ``corrections``: :func:`weighted_multistep`'s term on each step after the
    first, in the predictor and in its corrector alike."""
    lam, s = _lambdas(grid), _times(grid)
    n = len(s) - 1
    m: list[torch.Tensor] = []  # x̂0 of the last (up to) three evaluations, newest last
    base = x  # the corrected sample the last predictor started from
    order = 0  # the last predictor's order
    for i in range(n):
        m = (m + [_data_prediction(u, x, grid, i)])[-3:]
        if i > 0:  # UniC on the step s_{i−1} → s_i, with the evaluation just made
            h = lam[i] - lam[i - 1]
            ratio, alpha, phi = s[i] / s[i - 1], 1 - s[i], _expm1(-h)
            x = ratio * base - (alpha * phi) * m[-2]
            if order == 1:
                x = x - (alpha * phi * 0.5) * (m[-1] - m[-2])
            elif _far(lam[i - 2]):  # (ρ_0 = 0, ρ_1 = b_1)
                x = x - (alpha * phi) * ((phi / -h - 1) / phi * (m[-1] - m[-2]))
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                b1 = (phi / -h - 1) / phi
                b2 = 2 * ((phi / -h - 1) / -h - 0.5) / phi
                rho0 = (b1 - b2) / (1 - rk)
                rho1 = b1 - rho0
                d1 = (1.0 / rk) * (m[-3] - m[-2])
                x = x - (alpha * phi) * (rho0 * d1 + rho1 * (m[-1] - m[-2]))
            if corrections is not None and i > 1:
                x = x - (alpha * phi * corrections[i - 1]) * (m[-2] - m[-3])
        order = min(2, n - i, i + 1)
        base = x
        h = lam[i + 1] - lam[i]
        ratio, alpha, phi = s[i + 1] / s[i], 1 - s[i + 1], _expm1(-h)
        x = ratio * x - (alpha * phi) * m[-1]
        if order == 2 and not _far(lam[i - 1]):
            rk = (lam[i - 1] - lam[i]) / h
            x = x - (alpha * phi * 0.5) * ((1.0 / rk) * (m[-2] - m[-1]))
        if corrections is not None and i > 0:
            x = x - (alpha * phi * corrections[i]) * (m[-1] - m[-2])
        callback and callback(i)
    return x


#: the solvers a tuned sampler may correct with per-step weights (:func:`weighted_multistep`)
WEIGHTED = ("euler", "ab2", "dpmpp_2m", "dpmpp_3m", "unipc")


def weighted_multistep(u: Velocity, x: torch.Tensor, grid: torch.Tensor, solver: str, weights,
                       callback=None) -> torch.Tensor:
    """``solver`` (one of :data:`WEIGHTED`) with a learnt correction c_i of each step's weight on the
    previous evaluation: the idea of S4S (Frankel et al., ICML 2025, "S4S: Solving for a Diffusion
    Model Solver") and Bespoke / BNS solvers (Shaul et al., ICLR / ICML 2024), in its smallest form,
    one number a step. Step s_i → s_{i+1}, h_i = s_{i+1} − s_i; euler and ab2, on the velocity:

        x ← x + h_i·((1 + b_i + c_i)·u_i − (b_i + c_i)·u_{i−1}),  b_i = 0 (euler), r_i/2 (ab2), r_i = h_i/h_{i−1}

    the exponential integrators (dpmpp_2m, dpmpp_3m, unipc), on the data prediction x̂0 = x − s·u, their
    step plus (α = 1 − s, φ_i = e^{−(λ_{i+1} − λ_i)} − 1, as in their own update)

        x ← step_i(x) − α_{i+1}·φ_i·c_i·(x̂0_i − x̂0_{i−1})

    (unipc: in the predictor and in the corrector of step i alike; into s = 0, where α = 1 and φ = −1,
    x ← x̂0_i + c_i·(x̂0_i − x̂0_{i−1}), an extrapolation of the data prediction). Nothing is corrected
    on the first step (c_0 is not used: nothing was evaluated before it). The weights on the
    evaluations sum as the plain solver's at any c (a difference of two evaluations is added), so every
    step stays consistent (a constant field is integrated exactly); c = 0 is the plain solver.
    ``weights``: (c_0, …, c_{N−1}) for the N steps, a (N,) tensor (float64; it may require grad) or a
    sequence of floats. One evaluation a step. ValueError for another solver or another number of
    weights."""
    import torch

    if solver not in WEIGHTED:
        raise ValueError(f"solver={solver!r}: per-step weights correct {', '.join(WEIGHTED)}")
    n = len(grid) - 1
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (n,):
        raise ValueError(f"{tuple(weights.shape)} weights for a grid of {n} steps: one a step wanted")
    if solver in ("euler", "ab2"):
        return _two_step(u, x, grid, solver == "ab2", weights, callback)
    return SOLVERS[solver].step(u, x, grid, callback=callback, corrections=weights)  # (the exponential integrators)


def integrate(u: Velocity, x: torch.Tensor, grid: torch.Tensor, solver: str, weights=None, callback=None,
              **options) -> torch.Tensor:
    """``solver``'s endpoint on ``grid``: its step function, or with per-step ``weights`` (a tuned
    sampler's) :func:`weighted_multistep`. No counting: :func:`solve` counts."""
    if weights is not None:
        return weighted_multistep(u, x, grid, solver, weights, callback=callback)
    return SOLVERS[solver].step(u, x, grid, callback=callback, **options)


@dataclass(frozen=True)
class Solver:
    """A solver of dx/ds = u(x, s): ``step`` integrates along a whole grid (the module's
    signature); ``evals_per_step``: field evaluations per grid step (None: adaptive, counted);
    ``order``: its order of accuracy; ``options``: (name, default) of the keyword options it
    takes (``rtol`` / ``atol``); ``summary``: one line for the command line's help."""

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


#: ``auto``'s choice by step count (= NFE for these one-evaluation solvers): (most steps, solver,
#: time shift of the uniform grid or None), from the measurements in docs/benchmarks/SAMPLERS.md (scripts/samplers.py:
#: FID per NFE on the three zoo models, against diffusers' schedulers): up to 5 steps ab2 on the
#: uniform grid shifted by 1.5 is the best or within 0.5 FID of it on each model; from 6 steps UniPC
#: on the unshifted grid (a shift makes it worse there)
AUTO_CHOICE: tuple[tuple[int, str, float | None], ...] = ((5, "ab2", 1.5), (1 << 30, "unipc", None))


def auto_choice(steps: int) -> tuple[str, float | None]:
    """(solver, time shift of the uniform grid or None) that :data:`AUTO_CHOICE` names for ``steps``."""
    return next((solver, shift) for most, solver, shift in AUTO_CHOICE if steps <= most)


def resolve_auto(steps: int, grid: str, shift: float | None, source_shifts: bool) -> tuple[str, float | None]:
    """What ``auto`` runs in ``steps`` steps on ``grid``: (solver, time shift of the grid, None for
    the source's own). :data:`AUTO_CHOICE`'s shift applies on the uniform grid where no ``shift``
    is given and the source's scheduler has no shift of its own (``source_shifts``:
    :attr:`fmconvert.integration.source.Source.shifts_times`), the sources it was measured on; else the
    grid keeps ``shift``. Runs record this, not ``auto`` (:func:`fmconvert.sampling.runs.resolved`)."""
    solver, auto_shift = auto_choice(steps)
    if grid == "uniform" and shift is None and not source_shifts:
        shift = auto_shift
    return solver, shift


def auto(u: Velocity, x: torch.Tensor, grid: torch.Tensor, callback=None) -> torch.Tensor:
    """The solver :data:`AUTO_CHOICE` names for this many steps (``len(grid) − 1``), on a grid made
    already (its shift is chosen with the grid: :func:`resolve_auto`)."""
    name, _ = auto_choice(len(grid) - 1)
    return SOLVERS[name].step(u, x, grid, callback=callback)


SOLVERS: dict[str, Solver] = {s.name: s for s in (
    Solver("euler", euler, 1, 1, "1st order, 1 evaluation a step (DDIM's grid: DDIM itself)"),
    Solver("heun", heun, 2, 2, "2nd order, 2 evaluations a step (Euler into s = 0)"),
    Solver("midpoint", midpoint, 2, 2, "2nd order, 2 evaluations a step"),
    Solver("rk4", rk4, 4, 4, "classic Runge-Kutta, 4 evaluations a step"),
    Solver("ab2", ab2, 1, 2, "Adams-Bashforth 2 on variable steps, 1 evaluation a step"),
    Solver("dpmpp_2m", dpmpp_2m, 1, 2, "DPM-Solver++(2M) in data prediction, 1 evaluation a step (diffusers' DPMSolverMultistep)"),
    Solver("dpmpp_3m", dpmpp_3m, 1, 2, "DPM-Solver++(3M) as diffusers has it (2nd order: D2 halved), 1 evaluation a step"),
    Solver("unipc", unipc, 1, 3, "UniPC-2 bh2 predictor-corrector, 1 evaluation a step (diffusers' UniPCMultistep)"),
    Solver("auto", auto, 1, 2, "ab2 on the uniform grid with shift 1.5 up to 5 steps, unipc unshifted above: "
           "the measured best in docs/benchmarks/SAMPLERS.md, 1 evaluation a step (the shift: where neither a shift nor the "
           "scheduler gives one)"),
    Solver("dopri5", dopri5, None, 5, "adaptive Dormand-Prince (torchdiffeq), options rtol / atol",
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
          weights=None, **options) -> SolveResult:
    """Integrate dx/ds = u(x, s) along ``grid`` (float64, decreasing) with the named solver.

    ``u`` receives s as a (B,) tensor on the grid's device: a CPU grid (as fmconvert's
    sampler uses) keeps every step free of host-device synchronisation. ``weights``: per-step
    corrections of a tuned sampler (:func:`weighted_multistep`; None: the plain solver).
    ``options``: the solver's own (:attr:`Solver.options`); any other is refused (ValueError)."""
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
    x = integrate(field, x, grid, solver, weights, callback, **options)
    return SolveResult(x=x, nfe=field.nfe, first_bad_nfe=field.first_bad())
