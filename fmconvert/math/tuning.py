"""Time grids tuned to one model's velocity field u(x, s) on the rectified path (s = 1 is noise,
s = 0 is data): for a given number of steps N, the grid 1 = s_0 > s_1 > … > s_N = s_end whose
N-step solve lands closest to a teacher's (a converged solve from the same noise).

Two methods, both on teacher pairs (x_1 = ε, x_0 = the teacher's endpoint), pure torch:

- :func:`gits_grid`, training-free (GITS: Chen et al., ICML 2024, "A Geometric Perspective on
  Optimal Timesteps for Accelerating Diffusion Sampling", §4): one fine teacher trajectory
  x(τ_0), …, x(τ_M) on a fine grid τ; the cost of a jump τ_i → τ_j is the mean squared distance
  between one Euler step from the teacher's state, x(τ_i) + (τ_j − τ_i)·u(x(τ_i), τ_i), and the
  teacher's x(τ_j) (:func:`jump_costs`); the N-step grid is the N-edge path from τ_0 to τ_M of
  least total cost (:func:`shortest_path`, dynamic programming). M field evaluations in all.
- :func:`learn_grid`, learnt (LD3: Tong et al., ICLR 2025, "Learning to Discretize Denoising
  Diffusion ODEs", §3): the interior times are a monotone function of N free logits θ
  (:func:`grid_from_logits`: increments softmax(θ)·(s_0 − s_N)), optimised by Adam on the mean
  squared distance between the solver's endpoint on that grid and the teacher's, gradients taken
  through the solver and the field; with the soft-teacher relaxation (LD3 eq. 6) each student
  starts anywhere in the ball |x' − ε| ≤ r·|ε| (``soft_radius`` r) rather than at ε itself.
  Warm-started from a given grid (the best untuned one), so it can only improve on it on the
  training pairs; or, given a ``keep`` score (a distribution measure on held-out pairs, say), the
  checkpoint of least score among the start, every ``check_every`` iterations and the end (early
  stopping, as LD3 and S4S pick their result on a validation set); with ``restarts``, the best
  candidate of several descents, each on its own batch order.
- :func:`learn_sampler`, the same descent on the times and one correction a step of the solver's
  weight on its previous evaluation (:func:`fmconvert.math.solvers.weighted_multistep`; the solver
  coefficients S4S, Frankel et al. ICML 2025, and BNS learn, in their smallest form): at zero
  correction the plain solver, consistent at any.

Nothing here loads a model: ``field`` is any u(x, s) with s a (B,) tensor (a converted model's,
:mod:`fmconvert.sampling.tuned`; a closed-form one in the tests).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from fmconvert.math.solvers import SOLVERS, WEIGHTED, integrate

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: a loss between the solver's endpoints and the teacher's, (B, …) each → a scalar
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: a score of a candidate (grid (N + 1,), weights (N,) or None for times alone), lower better: what
#: the learnt methods keep the least of among their checkpoints (``keep``)
Score = Callable[[torch.Tensor, "torch.Tensor | None"], float]
#: the solvers :func:`learn_grid` differentiates through (their step arithmetic is torch's on a
#: grid that requires grad); :func:`gits_grid` takes any solver's NFE
DIFFERENTIABLE = ("euler", "heun", "midpoint", "rk4", "ab2", "dpmpp_2m", "dpmpp_3m", "unipc")
#: the learning-rate schedules of the learnt methods' descents: name → what it is
LR_SCHEDULES = {"constant": "lr at every iteration (LD3's own)",
                "cosine": "lr annealed to 0 along a half cosine over the iterations (Loshchilov & Hutter, ICLR 2017)"}


def grid_from_logits(logits: torch.Tensor, start: float = 1.0, end: float = 0.0) -> torch.Tensor:
    """The grid s_0 = ``start`` > s_1 > … > s_N = ``end`` (float64, (N + 1,)) whose N increments are
    softmax(``logits``)·(start − end): strictly decreasing for any finite logits, its ends fixed
    (LD3's monotone parametrisation). Differentiable in ``logits`` ((N,))."""
    increments = torch.softmax(logits.to(torch.float64), 0) * (start - end)
    inner = start - torch.cumsum(increments, 0)[:-1]
    return torch.cat([inner.new_tensor([start]), inner, inner.new_tensor([end])])


def logits_from_grid(grid: torch.Tensor) -> torch.Tensor:
    """Logits θ with :func:`grid_from_logits`(θ, grid[0], grid[-1]) = ``grid`` (a decreasing grid):
    the logarithms of its increments."""
    return (-grid.to(torch.float64).diff()).log()


def mean_squared_distance(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over elements of (x − target)²: the learnt methods' loss by default (LD3 §3 with L2)."""
    return (x - target).square().mean()


def frechet_distance_to(target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """features (B, D) ↦ the Fréchet distance between the Gaussians fitted to ``features`` and to ``target``
    ((M, D), fixed), differentiable in ``features`` (a 0-d float64 tensor):

        |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2·tr (Σ₂^½ Σ₁ Σ₂^½)^½

    (Dowson & Landau 1982; FID's formula, Heusel et al. NeurIPS 2017, on unbiased covariances as
    torchmetrics' ``FrechetInceptionDistance``, whose tr (Σ₁Σ₂)^½ it equals: the same eigenvalues, here
    of a symmetric matrix, so ``eigvalsh`` and its gradient apply). The distance of a batch's features to
    a teacher's, as a loss: GAS (2025) adds a distribution term, adversarial there, to the teacher
    distance for the same reason, that at 3 or 4 NFE the endpoint closest to each teacher endpoint is a
    blur of the plausible ones. Eigenvalues below 10⁻¹² count as 10⁻¹² and pass no gradient (a batch of
    fewer rows than dimensions has zero ones, whose square root has no derivative): each such one
    lowers the value below FID's by 2·10⁻⁶ at most. ValueError for fewer than two rows on either side."""
    if target.shape[0] < 2:
        raise ValueError(f"{target.shape[0]} target rows: a covariance needs two or more")
    target = target.detach().to(torch.float64)
    mean_t, cov_t = target.mean(0), torch.cov(target.T)
    w, v = torch.linalg.eigh(cov_t)
    root_t = (v * w.clamp_min(0).sqrt()) @ v.T

    def distance(features: torch.Tensor) -> torch.Tensor:
        if features.shape[0] < 2:
            raise ValueError(f"{features.shape[0]} rows: a covariance needs two or more")
        features = features.to(torch.float64)
        cov = torch.cov(features.T)
        middle = root_t @ cov @ root_t
        roots = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(1e-12).sqrt()
        return (features.mean(0) - mean_t).square().sum() + cov.trace() + cov_t.trace() - 2 * roots.sum()

    return distance


def shortest_path(cost: torch.Tensor, steps: int) -> list[int]:
    """Indices 0 = i_0 < i_1 < … < i_N = M (N = ``steps``) minimising the path's total cost, by dynamic
    programming over the number of edges (GITS §4.2). ``cost``: (M + 1, M + 1), the cost of the edge
    i → j (read above the diagonal), or (M + 1, M + 1, M + 1), the cost of the edge i → j after the
    edge k → i, with cost[0, 0, j] the first edge's (nothing before it): a multistep solver's step
    depends on the step before. ValueError if ``steps`` is not in 1..M."""
    m = cost.shape[0] - 1
    if not 1 <= steps <= m:
        raise ValueError(f"steps={steps}: a path of that many edges needs a fine grid of at least {steps} intervals "
                         f"(the fine grid has {m})")
    cost = cost.to(torch.float64).cpu()
    if cost.ndim == 2:
        cost = cost[None].expand(m + 1, m + 1, m + 1)
    best = torch.full((m + 1, m + 1), math.inf, dtype=torch.float64)  # [i, j]: the best path whose last edge is i → j
    best[0, 1:] = cost[0, 0, 1:]
    k, i, j = torch.meshgrid(*(torch.arange(m + 1),) * 3, indexing="ij")
    cost = torch.where((k < i) & (i < j), cost, torch.full_like(cost, math.inf))
    came = []
    for _ in range(1, steps):
        best, previous = (best[:, :, None] + cost).min(0)  # over k: the path to k → i, then i → j
        came.append(previous)
    path = [m, int(best[:, m].argmin())]
    for previous in reversed(came):
        path.append(int(previous[path[-1], path[-2]]))
    return path[::-1]


@torch.no_grad()
def teacher_trajectory(field: Field, noise: torch.Tensor, fine: torch.Tensor, solver: str = "heun",
                       substeps: int = 1) -> torch.Tensor:
    """The teacher's states at every time of the decreasing ``fine`` grid, (M + 1, *noise.shape):
    ``solver`` with ``substeps`` equal steps between consecutive fine times, from ``noise`` at
    fine[0] (float64 time arithmetic; the states in noise's dtype)."""
    states = [noise]
    x = noise
    for a, b in zip(fine[:-1].tolist(), fine[1:].tolist()):
        sub = torch.linspace(a, b, substeps + 1, dtype=torch.float64)
        x = SOLVERS[solver].step(field, x, sub)
        states.append(x)
    return torch.stack(states)


@torch.no_grad()
def jump_costs(field: Field, trajectory: torch.Tensor, fine: torch.Tensor, solver: str = "euler") -> torch.Tensor:
    """GITS's costs on the teacher trajectory (from :func:`teacher_trajectory` on ``fine``): the mean
    squared distance, per element, between one ``solver`` step from the teacher's state and the
    teacher's state at the step's end, the field evaluated only at the teacher's states (one
    evaluation per fine time). ``ab2``: its step after k → i, x(τ_i) + h·((1 + r/2)·u_i − (r/2)·u_k),
    h = τ_j − τ_i, r = h/(τ_i − τ_k), Euler on the first edge, as a (M + 1)³ tensor for
    :func:`shortest_path` (the teacher-forced error of the recursion, as OSS measures it); any other
    solver: the Euler step x(τ_i) + h·u_i, GITS's own cost, (M + 1, M + 1). Computed from the Gram
    matrices of the states and velocities; +∞ off the path."""
    m = len(fine) - 1
    flat = trajectory.to(torch.float64).flatten(1)  # (M + 1, K·D)
    velocity = torch.stack([field(trajectory[i], fine[i].expand(trajectory.shape[1])).to(torch.float64).flatten()
                            for i in range(m + 1)])
    n = flat.shape[1]
    xx, xu, uu = ((a @ b.T / n).cpu() for a, b in ((flat, flat), (flat, velocity), (velocity, velocity)))
    tau = fine.to(torch.float64).cpu()
    h = tau[None, :] - tau[:, None]  # [i, j] = τ_j − τ_i
    sq_x, sq_u, xu_own = xx.diagonal(), uu.diagonal(), xu.diagonal()
    # |x_i − x_j|² and |x_i − x_j + h·u_i|², as functions of (i, j)
    apart = sq_x[:, None] + sq_x[None, :] - 2 * xx
    euler = apart + h ** 2 * sq_u[:, None] + 2 * h * (xu_own[:, None] - xu.T)
    if solver != "ab2":
        return torch.where(h < 0, euler, torch.full_like(euler, math.inf))
    h_prev = h[:, :, None]  # [k, i, ·] = τ_i − τ_k < 0, the step before
    h_now = h[None, :, :]  # [·, i, j] = τ_j − τ_i < 0
    r = h_now / h_prev
    a, b = h_now * (1 + r / 2), -h_now * r / 2  # the step is x_i + a·u_i + b·u_k
    cost = (apart[None] + a ** 2 * sq_u[None, :, None] + b ** 2 * sq_u[:, None, None]
            + 2 * a * (xu_own[None, :, None] - xu.T[None, :, :])  # <x_i − x_j, u_i>
            + 2 * b * (xu.T[:, :, None] - xu.T[:, None, :])  # <x_i − x_j, u_k>
            + 2 * a * b * uu[:, :, None])  # <u_i, u_k>
    valid = (h_prev < 0) & (h_now < 0)
    cost = torch.where(valid, cost, torch.full_like(cost, math.inf))
    cost[0, 0, :] = torch.where(h[0] < 0, euler[0], torch.full_like(euler[0], math.inf))  # the first edge: Euler
    return cost


def gits_grid(field: Field, noise: torch.Tensor, steps: int, fine: torch.Tensor, teacher_solver: str = "heun",
              substeps: int = 1, solver: str = "euler") -> torch.Tensor:
    """The ``steps``-step grid (a subset of ``fine``, ends included) of least total cost of
    ``solver``'s steps (:func:`jump_costs`) on the teacher trajectory from ``noise`` (see the module
    docstring: GITS). Float64, (steps + 1,)."""
    fine = fine.to(torch.float64)
    trajectory = teacher_trajectory(field, noise, fine, teacher_solver, substeps)
    return fine[shortest_path(jump_costs(field, trajectory, fine, solver), steps)]


def learn_grid(field: Field, noise: torch.Tensor, target: torch.Tensor, init: torch.Tensor, solver: str = "ab2", *,
               iterations: int = 100, lr: float = 0.05, soft_radius: float = 0.0, batch_size: int | None = None,
               seed: int = 0, callback: Callable[[int, float], None] | None = None,
               distance: Distance | None = None, keep: Score | None = None,
               check_every: int = 10, restarts: int = 1, lr_schedule: str = "constant") -> tuple[torch.Tensor, list[float]]:
    """LD3: the grid with ``init``'s ends (and, at the start, its times) minimising the mean squared
    distance, per element, between ``solver``'s endpoint from each noise and its ``target`` (the
    teacher's endpoint), by ``iterations`` steps of Adam (``lr``) on the logits of
    :func:`grid_from_logits`, on batches of ``batch_size`` pairs (default all; drawn by ``seed``).
    ``soft_radius`` r > 0: the soft teacher, each student starting at ε + δ with |δ| ≤ r·|ε|, δ
    learnt alongside (LD3 eq. 6). Returns (the grid whose loss on all pairs, started at ε itself,
    is least among the initial and the final one: float64, detached; the loss per iteration).
    ``callback(k, loss)`` after iteration k. ``distance(x, target)``: the loss in place of the mean
    squared distance (a scalar, differentiable in x: LD3 tunes on LPIPS). ``keep(grid, weights)``:
    return instead the grid of least such score among the initial one, the one after every
    ``check_every`` iterations and the final one (the latest among equals; ``weights`` None here).
    ``restarts`` R > 1: R descents from ``init``, the r-th drawing its batches with seed ``seed`` + r
    (the descent is chaotic at these learning rates: on digits-v at 4 NFE, s4s descents that differ
    only in their batches keep grids 3.8 to 4.5 FID apart, docs/benchmarks/TUNING-restarts.md), the
    candidates of all of them compared alike (by
    ``keep``, or by the loss on all pairs); the losses returned are the kept candidate's descent's,
    ``callback``'s k counts on across them (0 … R·iterations − 1). R = 1 is one descent, as before.
    ``lr_schedule`` (:data:`LR_SCHEDULES`): ``constant``, or ``cosine``, each descent's learning rate
    annealed from ``lr`` to 0 over its iterations (Loshchilov & Hutter, ICLR 2017, without restarts;
    torch's ``CosineAnnealingLR``): the early steps range as widely, the late ones settle, so the
    descent ends in one place (at a constant 0.1 the held-out FID of its checkpoints jumps by a factor
    of two from one to the next, docs/benchmarks/TUNING-frechet.md).
    ValueError for a solver not in :data:`DIFFERENTIABLE`, ``restarts`` below 1 or an unknown schedule."""
    if solver not in DIFFERENTIABLE:
        raise ValueError(f"solver={solver!r}: learn_grid differentiates through {', '.join(DIFFERENTIABLE)}")
    grid, _, losses = _descend(field, noise, target, init, solver, False, iterations=iterations, lr=lr,
                               soft_radius=soft_radius, batch_size=batch_size, seed=seed, callback=callback,
                               distance=distance, keep=keep, check_every=check_every, restarts=restarts,
                               lr_schedule=lr_schedule)
    return grid, losses


def learn_sampler(field: Field, noise: torch.Tensor, target: torch.Tensor, init: torch.Tensor, solver: str = "ab2", *,
                  iterations: int = 100, lr: float = 0.05, soft_radius: float = 0.0, batch_size: int | None = None,
                  seed: int = 0, callback: Callable[[int, float], None] | None = None,
                  distance: Distance | None = None, keep: Score | None = None,
                  check_every: int = 10, restarts: int = 1,
                  lr_schedule: str = "constant") -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The times and, with them, one correction a step of ``solver``'s weight on its previous
    evaluation (:func:`~fmconvert.math.solvers.weighted_multistep`; S4S, Frankel et al. ICML 2025,
    learns times and solver coefficients against a teacher; here both by one Adam on the same loss
    as :func:`learn_grid`, from ``init`` and zero corrections, i.e. the plain solver). Settings as
    :func:`learn_grid`'s. Returns (grid, weights (N,), float64, detached, the pair with the least
    loss on all pairs among the initial and the final one, or with ``keep`` the pair of least score
    among the checkpoints; the loss per iteration). ValueError for a solver not in
    :data:`~fmconvert.math.solvers.WEIGHTED`."""
    if solver not in WEIGHTED:
        raise ValueError(f"solver={solver!r}: learn_sampler corrects the weights of {', '.join(WEIGHTED)}")
    grid, weights, losses = _descend(field, noise, target, init, solver, True, iterations=iterations, lr=lr,
                                     soft_radius=soft_radius, batch_size=batch_size, seed=seed, callback=callback,
                                     distance=distance, keep=keep, check_every=check_every, restarts=restarts,
                                     lr_schedule=lr_schedule)
    assert weights is not None
    return grid, weights, losses


def _descend(field: Field, noise: torch.Tensor, target: torch.Tensor, init: torch.Tensor, solver: str,
             with_weights: bool, *, iterations: int, lr: float, soft_radius: float, batch_size: int | None, seed: int,
             callback: Callable[[int, float], None] | None, distance: Distance | None, keep: Score | None = None,
             check_every: int = 10, restarts: int = 1,
             lr_schedule: str = "constant") -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
    """The descent of :func:`learn_grid` (``with_weights``: and of :func:`learn_sampler`'s corrections),
    ``restarts`` times, the best candidate of all kept."""
    if check_every < 1:
        raise ValueError(f"check_every={check_every}: checkpoints come every 1 or more iterations")
    if restarts < 1:
        raise ValueError(f"restarts={restarts}: one descent or more")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={lr_schedule!r}: one of {', '.join(LR_SCHEDULES)}")
    loss_of = distance or mean_squared_distance
    init = init.to(torch.float64)
    start, end = float(init[0]), float(init[-1])
    n = noise.shape[0]

    def endpoint(x: torch.Tensor, grid: torch.Tensor, corrections: torch.Tensor) -> torch.Tensor:
        return integrate(field, x, grid, solver, corrections if with_weights else None)

    def snapshot(logits: torch.Tensor, weights: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return grid_from_logits(logits.detach(), start, end), weights.detach().clone(), r

    # (candidate grid, corrections, the descent it comes from); without keep: the initial and each final one
    checkpoints = [(init, torch.zeros(len(init) - 1, dtype=torch.float64), 0)]
    runs: list[list[float]] = []
    for r in range(restarts):
        losses: list[float] = []
        runs.append(losses)
        logits = logits_from_grid(init).clone().requires_grad_(True)
        weights = torch.zeros(len(init) - 1, dtype=torch.float64, requires_grad=with_weights)
        delta = torch.zeros_like(noise, requires_grad=True)
        parameters = [logits] + ([weights] if with_weights else []) + ([delta] if soft_radius > 0 else [])
        optimizer = torch.optim.Adam(parameters, lr=lr)
        annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations) if lr_schedule == "cosine" else None
        generator = torch.Generator().manual_seed(seed + r)
        for k in range(iterations):
            index = torch.randperm(n, generator=generator)[:batch_size] if batch_size else torch.arange(n)
            grid = grid_from_logits(logits, start, end)
            x = noise[index] + delta[index] if soft_radius > 0 else noise[index]
            loss = loss_of(endpoint(x, grid, weights), target[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if annealing is not None:
                annealing.step()
            if soft_radius > 0:
                with torch.no_grad():  # back into the ball |δ| ≤ r·|ε|, per sample
                    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
                    limit = soft_radius * noise.flatten(1).norm(dim=1)
                    delta.mul_((limit / norms).clamp(max=1).view((-1,) + (1,) * (noise.ndim - 1)))
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(r * iterations + k, losses[-1])
            if keep is not None and (k + 1) % check_every == 0 and k + 1 < iterations:
                checkpoints.append(snapshot(logits, weights, r))
        checkpoints.append(snapshot(logits, weights, r))
    with torch.no_grad():
        def score(candidate: tuple[torch.Tensor, torch.Tensor, int]) -> float:
            if keep is not None:
                return keep(candidate[0], candidate[1] if with_weights else None)
            return float(loss_of(endpoint(noise, candidate[0], candidate[1]), target))

        scores = [score(candidate) for candidate in checkpoints]
        grid, corrections, kept = checkpoints[max(i for i, v in enumerate(scores) if v == min(scores))]  # (the latest)
    return grid, (corrections if with_weights else None), runs[kept]
