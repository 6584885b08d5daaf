"""Tuned grids (fmconvert.math.tuning) on a field with a closed-form flow: Gaussian data, whose
probability-flow ODE carries ε at s = 1 to μ + √v·ε at s = 0 exactly. Tuning (GITS's dynamic
programming, LD3's gradient descent) must beat the uniform grid against that exact solution at
every step count; the gradient through the solver must be the finite differences'; the dynamic
programme must find the brute-force optimum; learnt corrections of the solver's weights (s4s) must keep
the solver at zero and consistent at any value, and beat times alone."""

import itertools

import pytest
import torch

from fmconvert.math.solvers import SOLVERS, WEIGHTED, weighted_multistep
from fmconvert.math.tuning import (
    DIFFERENTIABLE,
    frechet_distance_to,
    gits_grid,
    grid_from_logits,
    learn_grid,
    learn_sampler,
    logits_from_grid,
    shortest_path,
)

F64 = torch.float64
D = 16  # dimensions of the Gaussian data


def gaussian(seed=0):
    """(μ, v, u): data N(μ, diag(v)) with variances from 1e-3 to 1 (curved trajectories), and its exact
    velocity on the rectified path x_s = (1 − s)·x0 + s·ε: u = E[ε | x_s] − E[x0 | x_s]."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(D, generator=g, dtype=F64)
    v = torch.logspace(-3, 0, D, dtype=F64)

    def u(x, s):
        s = s.to(F64).view(-1, 1)
        var = (1 - s) ** 2 * v + s ** 2
        centred = x.to(F64) - (1 - s) * mu
        return (s / var - (1 - s) * v / var) * centred - mu

    return mu, v, u


def exact(mu, v, noise):
    return mu + v.sqrt() * noise


def error(u, grid, noise, target, solver):
    return float((SOLVERS[solver].step(u, noise, grid) - target).square().mean())


def noise_of(n, seed):
    return torch.randn((n, D), generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_the_closed_form_field_is_the_exact_flow():
    """A converged solve of the field lands on μ + √v·ε: the reference the tests below measure against."""
    mu, v, u = gaussian()
    noise = noise_of(8, 1)
    grid = torch.linspace(1, 0, 2001, dtype=F64)
    assert error(u, grid, noise, exact(mu, v, noise), "rk4") < 1e-12


def test_grid_parametrisation_is_monotone_with_fixed_ends_and_invertible():
    logits = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    grid = grid_from_logits(logits, 1.0, 0.002)
    assert grid[0] == 1.0 and grid[-1] == 0.002 and bool((grid.diff() < 0).all())
    torch.testing.assert_close(grid_from_logits(logits_from_grid(grid), 1.0, 0.002), grid, rtol=1e-14, atol=1e-15)


def test_the_dynamic_programme_finds_the_brute_force_optimum():
    g = torch.Generator().manual_seed(3)
    for trial in range(5):
        cost = torch.rand(9, 9, generator=g, dtype=F64)
        for steps in (1, 2, 3, 5, 8):
            path = shortest_path(cost, steps)
            best = min(itertools.combinations(range(1, 8), steps - 1),
                       key=lambda inner: sum(cost[a, b] for a, b in zip((0, *inner), (*inner, 8))))
            total = lambda p: float(sum(cost[a, b] for a, b in zip(p[:-1], p[1:])))  # noqa: E731
            assert path[0] == 0 and path[-1] == 8 and len(path) == steps + 1
            assert total(path) == pytest.approx(total((0, *best, 8)), rel=1e-12), (trial, steps)
    with pytest.raises(ValueError, match="steps=9"):
        shortest_path(cost, 9)


@pytest.mark.parametrize("solver", DIFFERENTIABLE)
@pytest.mark.parametrize("start,end,logits", [(1.0, 0.0, [0.3, -0.2, 0.1, 0.4]), (1.0, 0.0, [0.3, -0.2, 0.1, 0.4, -0.1, 0.2]),
                                              (0.97, 0.0, [0.3, -0.2, 0.1, 0.4, -0.1]),
                                              (0.97, 0.03, [0.1 * (k % 5) - 0.2 for k in range(16)])])
def test_the_gradient_through_the_solver_is_the_finite_differences(solver, start, end, logits):
    """From s = 1 (the exponential integrators' λ = −∞: their terms against it vanish, without ∞·0 in the
    gradient) and from below it, in 4 to 16 steps (dpmpp_3m's third-order step from the fifth; at 16 steps
    ending above 0, its last step too)."""
    mu, v, u = gaussian()
    noise = noise_of(4, 2)
    target = exact(mu, v, noise)
    logits = torch.tensor(logits, dtype=F64, requires_grad=True)

    def loss(theta):
        return (SOLVERS[solver].step(u, noise, grid_from_logits(theta, start, end)) - target).square().mean()

    loss(logits).backward()
    eps = 1e-6
    numeric = torch.stack([(loss(logits.detach() + eps * e) - loss(logits.detach() - eps * e)) / (2 * eps)
                           for e in torch.eye(len(logits), dtype=F64)])
    assert bool(torch.isfinite(logits.grad).all())
    torch.testing.assert_close(logits.grad, numeric, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("solver", DIFFERENTIABLE)
@pytest.mark.parametrize("start,steps", [(1.0, 3), (1.0, 6), (0.97, 5)])
def test_a_grid_being_tuned_takes_the_plain_solvers_steps(solver, start, steps):
    """The torch arithmetic a grid that requires grad runs (the exponential integrators' coefficients as
    tensors) lands where the plain solver does, at float64 rounding."""
    mu, v, u = gaussian()
    noise = noise_of(8, 3)
    grid = grid_from_logits(torch.linspace(-0.5, 0.5, steps, dtype=F64), start, 0.0)
    plain = SOLVERS[solver].step(u, noise, grid)
    tuned = SOLVERS[solver].step(u, noise, grid.clone().requires_grad_(True))
    torch.testing.assert_close(tuned.detach(), plain, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("steps", [2, 3, 4, 6])
def test_tuning_beats_the_uniform_grid_against_the_exact_solution(solver, steps):
    """Tuned on 64 noises, judged on 256 others: both methods below the uniform grid's error at every N
    (measured: Euler 0.051 → 0.048 (GITS) and 0.047 (LD3) at 2 steps; Heun 0.029 → 0.012 and 0.0038)."""
    mu, v, u = gaussian()
    train, held_out = noise_of(64, 4), noise_of(256, 5)
    uniform = torch.linspace(1, 0, steps + 1, dtype=F64)
    fine = torch.linspace(1, 0, 65, dtype=F64)
    gits = gits_grid(u, train, steps, fine, "rk4")
    learnt, losses = learn_grid(u, train, exact(mu, v, train), uniform, solver, iterations=150, lr=0.05)
    before = error(u, uniform, held_out, exact(mu, v, held_out), solver)
    assert error(u, gits, held_out, exact(mu, v, held_out), solver) < before
    assert error(u, learnt, held_out, exact(mu, v, held_out), solver) < before
    assert losses[-1] < losses[0]
    assert learnt[0] == 1 and learnt[-1] == 0 and bool((learnt.diff() < 0).all())


@pytest.mark.parametrize("steps", [3, 4, 6])
def test_learnt_grids_improve_a_multistep_solver(steps):
    """ab2 (one evaluation a step): LD3 lowers the held-out error from 3 steps (at 2 its one free time is
    already near its best on the uniform grid: 0.0210 either way)."""
    mu, v, u = gaussian()
    train, held_out = noise_of(64, 4), noise_of(256, 5)
    uniform = torch.linspace(1, 0, steps + 1, dtype=F64)
    learnt, _ = learn_grid(u, train, exact(mu, v, train), uniform, "ab2", iterations=150)
    assert error(u, learnt, held_out, exact(mu, v, held_out), "ab2") < error(u, uniform, held_out, exact(mu, v, held_out), "ab2")


def test_the_soft_teacher_tunes_and_a_solver_without_gradients_is_refused():
    mu, v, u = gaussian()
    train = noise_of(16, 6)
    grid, losses = learn_grid(u, train, exact(mu, v, train), torch.linspace(1, 0, 4, dtype=F64), "euler",
                              iterations=20, soft_radius=0.1)
    assert len(losses) == 20 and bool((grid.diff() < 0).all())
    with pytest.raises(ValueError, match="differentiates through"):
        learn_grid(u, train, train, torch.linspace(1, 0, 4, dtype=F64), "dopri5")


def test_the_ab2_costs_are_its_teacher_forced_steps_and_the_programme_their_optimum():
    """jump_costs for ab2 from Gram matrices equals the step computed directly; the (k, i, j) programme
    finds the brute-force optimum of the recursion's summed costs."""
    from fmconvert.math.tuning import jump_costs, teacher_trajectory

    mu, v, u = gaussian()
    noise = noise_of(8, 7)
    fine = torch.linspace(1, 0, 9, dtype=F64)
    trajectory = teacher_trajectory(u, noise, fine, "rk4", 4)
    cost = jump_costs(u, trajectory, fine, "ab2")
    vel = [u(trajectory[i], fine[i].expand(8)) for i in range(9)]
    for k, i, j in [(0, 2, 5), (1, 3, 8), (4, 6, 7)]:
        h, r = fine[j] - fine[i], (fine[j] - fine[i]) / (fine[i] - fine[k])
        step = trajectory[i] + h * ((1 + r / 2) * vel[i] - r / 2 * vel[k])
        assert float(cost[k, i, j]) == pytest.approx(float((step - trajectory[j]).square().mean()), rel=1e-9)
    first = trajectory[0] + (fine[3] - fine[0]) * vel[0]
    assert float(cost[0, 0, 3]) == pytest.approx(float((first - trajectory[3]).square().mean()), rel=1e-9)
    for steps in (2, 3, 4):
        path = shortest_path(cost, steps)

        def total(p):
            return float(cost[0, 0, p[1]] + sum(cost[a, b, c] for a, b, c in zip(p, p[1:], p[2:])))

        best = min(((0, *inner, 8) for inner in itertools.combinations(range(1, 8), steps - 1)), key=total)
        assert total(path) == pytest.approx(total(best), rel=1e-12), steps


# -- s4s: per-step corrections of the solver's weights (weighted_multistep, learn_sampler) -----------------


@pytest.mark.parametrize("solver", WEIGHTED)
def test_zero_corrections_are_the_plain_solver_and_any_corrections_stay_consistent(solver):
    """weighted_multistep with c = 0 is the plain solver at rounding; any c adds a multiple of a difference of
    two evaluations (velocities, or data predictions for the exponential integrators), so the field u = const
    is integrated exactly (a step that changed the weights' sum would miss by h·Σ·const)."""
    mu, v, u = gaussian()
    noise = noise_of(8, 8)
    grid = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], dtype=F64)
    plain = SOLVERS[solver].step(u, noise, grid)
    torch.testing.assert_close(weighted_multistep(u, noise, grid, solver, torch.zeros(5, dtype=F64)), plain,
                               rtol=0, atol=1e-14)
    corrections = [0.0, 0.7, -0.4, 1.3, -2.0]
    assert (weighted_multistep(u, noise, grid, solver, corrections) - plain).abs().max() > 1e-3  # (they act)
    constant = torch.linspace(-1, 1, D, dtype=F64)
    moved = weighted_multistep(lambda x, s: constant.expand_as(x), noise, grid, solver, corrections)
    torch.testing.assert_close(moved, noise - constant, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="one a step"):
        weighted_multistep(u, noise, grid, solver, [0.0, 1.0])
    with pytest.raises(ValueError, match="per-step weights correct"):
        weighted_multistep(u, noise, grid, "heun", corrections)


@pytest.mark.parametrize("solver", WEIGHTED)
def test_the_gradient_in_the_weights_and_times_is_the_finite_differences(solver):
    mu, v, u = gaussian()
    noise = noise_of(4, 2)
    target = exact(mu, v, noise)
    theta = torch.tensor([0.3, -0.2, 0.1, 0.4, 0.0, 0.5, -0.3, 0.2], dtype=F64, requires_grad=True)

    def loss(p):
        grid = grid_from_logits(p[:4], 1.0, 0.0)
        return (weighted_multistep(u, noise, grid, solver, p[4:]) - target).square().mean()

    loss(theta).backward()
    eps = 1e-6
    numeric = torch.stack([(loss(theta.detach() + eps * e) - loss(theta.detach() - eps * e)) / (2 * eps)
                           for e in torch.eye(8, dtype=F64)])
    assert float(theta.grad[4]) == 0  # c_0: nothing before the first step
    torch.testing.assert_close(theta.grad, numeric, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("solver", WEIGHTED)
@pytest.mark.parametrize("steps", [2, 3, 4, 6])
def test_learnt_weights_beat_the_uniform_grid_and_times_alone(solver, steps):
    """Times and corrections learnt together (s4s), tuned on 64 noises and judged on 256 others: below the
    uniform grid's error against the exact solution at every N, and below LD3's (times alone, the same
    descent) on the training pairs, whose optimum it contains."""
    mu, v, u = gaussian()
    train, held_out = noise_of(64, 4), noise_of(256, 5)
    uniform = torch.linspace(1, 0, steps + 1, dtype=F64)
    grid, weights, losses = learn_sampler(u, train, exact(mu, v, train), uniform, solver, iterations=150)
    times_only, _ = learn_grid(u, train, exact(mu, v, train), uniform, solver, iterations=150)

    def weighted_error(noise, g, w):
        return float((weighted_multistep(u, noise, g, solver, w) - exact(mu, v, noise)).square().mean())

    assert weighted_error(held_out, grid, weights) < error(u, uniform, held_out, exact(mu, v, held_out), solver)
    assert weighted_error(train, grid, weights) < error(u, times_only, train, exact(mu, v, train), solver)
    assert grid[0] == 1 and grid[-1] == 0 and bool((grid.diff() < 0).all()) and weights.shape == (steps,)
    assert len(losses) == 150


def test_learn_sampler_refuses_a_solver_it_cannot_correct():
    mu, v, u = gaussian()
    with pytest.raises(ValueError, match="corrects the weights of euler, ab2"):
        learn_sampler(u, noise_of(4, 0), noise_of(4, 1), torch.linspace(1, 0, 4, dtype=F64), "heun")


def test_the_learnt_methods_minimise_the_distance_they_are_given():
    """``distance``: the loss of LD3 and s4s in place of the mean squared distance. Tuned on the last
    coordinate alone (variance 1, the largest), the grid lowers that error more
    than the grid tuned on all coordinates does, and the losses recorded are that distance's."""
    mu, v, u = gaussian()
    train = noise_of(64, 4)
    target = exact(mu, v, train)
    init = torch.linspace(1, 0, 4, dtype=F64)

    def first(x, y):
        return (x[:, -1] - y[:, -1]).square().mean()

    for learn in (learn_grid, learn_sampler):
        *found, losses = learn(u, train, target, init, "euler", iterations=60, distance=first)
        *plain, _ = learn(u, train, target, init, "euler", iterations=60)
        weights = found[1] if learn is learn_sampler else torch.zeros(3, dtype=F64)
        plain_weights = plain[1] if learn is learn_sampler else torch.zeros(3, dtype=F64)
        on_first = float(first(weighted_multistep(u, train, found[0], "euler", weights), target))
        assert on_first < float(first(weighted_multistep(u, train, plain[0], "euler", plain_weights), target))
        start = float(first(SOLVERS["euler"].step(u, train, init), target))
        assert losses[0] == pytest.approx(start, rel=1e-12)  # (the full batch: the loss is that distance)


@pytest.mark.parametrize("learn", [learn_grid, learn_sampler])
def test_with_a_keep_score_the_checkpoint_of_least_score_is_returned(learn):
    """``keep``: the result is the candidate of least score among the start, one every ``check_every``
    iterations and the end, the latest among equals; a score least at the start keeps the start
    (early stopping), one that follows the descent keeps the end; check_every below 1 is refused."""
    mu, v, u = gaussian()
    train = noise_of(32, 5)
    target = exact(mu, v, train)
    init = torch.linspace(1, 0, 4, dtype=F64)
    seen = []

    def record(score):
        def keep(grid, weights):
            assert (weights is None) == (learn is learn_grid)
            seen.append((grid.clone(), None if weights is None else weights.clone()))
            return score(grid, weights)
        return keep

    *found, _ = learn(u, train, target, init, "euler", iterations=25, keep=record(lambda g, w: float((g - init).abs().sum())),
                      check_every=10)
    assert len(seen) == 4 and torch.equal(seen[0][0], init)  # the start, after 10 and 20 iterations, the end
    assert torch.equal(found[0], init)  # (the start: its own distance is 0)
    assert not torch.equal(seen[-1][0], init)  # (the descent moved)
    if learn is learn_sampler:
        assert torch.equal(found[1], torch.zeros(3, dtype=F64))
    seen.clear()
    *found, _ = learn(u, train, target, init, "euler", iterations=25, keep=record(lambda g, w: 1.0), check_every=10)
    assert torch.equal(found[0], seen[-1][0])  # (all equal: the latest, the end)
    plain, *_ = learn(u, train, target, init, "euler", iterations=25)
    assert torch.equal(found[0], plain)  # (the same descent: the checkpoints change nothing but the choice)
    seen.clear()

    def second(g, w):  # least at the checkpoint after 10 iterations (the second scored)
        return 0.0 if len(seen) == 2 else 1.0

    *found, _ = learn(u, train, target, init, "euler", iterations=25, keep=record(second), check_every=10)
    assert torch.equal(found[0], seen[1][0]) and not torch.equal(found[0], seen[-1][0])
    with pytest.raises(ValueError, match="check_every=0"):
        learn(u, train, target, init, "euler", iterations=5, keep=record(second), check_every=0)


@pytest.mark.parametrize("learn", [learn_grid, learn_sampler])
def test_restarts_keep_the_best_candidate_of_descents_on_their_own_batches(learn):
    """``restarts`` R: R descents from the same start, the r-th on batches of seed ``seed`` + r; the
    result is, bit for bit, the one of the R single descents (seeds seed … seed + R − 1) whose candidate
    scores least, with that descent's losses; ``callback`` counts on across them; R = 1 is the single
    descent; R below 1 is refused."""
    mu, v, u = gaussian()
    train = noise_of(32, 6)
    target = exact(mu, v, train)
    init = torch.linspace(1, 0, 5, dtype=F64)
    held = noise_of(64, 7)

    def score(grid, weights):
        x = weighted_multistep(u, held, grid, "ab2", torch.zeros(4, dtype=F64) if weights is None else weights)
        return float((x - exact(mu, v, held)).square().mean())

    settings = dict(iterations=20, lr=0.1, batch_size=8, check_every=5)
    for keep in (score, None):
        singles = [learn(u, train, target, init, "ab2", seed=10 + r, keep=keep, **settings) for r in range(3)]
        ks = []
        found = learn(u, train, target, init, "ab2", seed=10, keep=keep, restarts=3,
                      callback=lambda k, loss: ks.append(k), **settings)
        assert ks == list(range(60))
        judged = [score(single[0], single[1] if learn is learn_sampler else None) if keep else
                  float((weighted_multistep(u, train, single[0], "ab2", single[1] if learn is learn_sampler
                                            else torch.zeros(4, dtype=F64)) - target).square().mean())
                  for single in singles]
        assert len(set(judged)) == 3  # (the batch orders lead to different results: a choice is made)
        best = singles[judged.index(min(judged))]
        for got, want in zip(found[:-1], best[:-1]):
            assert torch.equal(got, want)
        assert found[-1] == best[-1]  # (the kept descent's losses)
        once = learn(u, train, target, init, "ab2", seed=10, keep=keep, restarts=1, **settings)
        assert all(torch.equal(a, b) for a, b in zip(once[:-1], singles[0][:-1]))
    with pytest.raises(ValueError, match="restarts=0"):
        learn(u, train, target, init, "ab2", restarts=0)


def test_the_frechet_distance_is_fids_and_its_gradient_the_finite_differences():
    """frechet_distance_to: torchmetrics' FID formula (_compute_fid on unbiased covariances, as the fid
    command computes) at rounding, for sets of other sizes and a batch of fewer rows than dimensions;
    zero from a set to itself; its gradient in the features is the finite differences'."""
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    target = torch.randn(300, 8, generator=g, dtype=F64) @ torch.randn(8, 8, generator=g, dtype=F64)
    for rows in (200, 5):
        batch = torch.randn(rows, 8, generator=g, dtype=F64) * 0.7 + 0.3
        expected = _compute_fid(target.mean(0), torch.cov(target.T), batch.mean(0), torch.cov(batch.T))
        # (5 rows: 4 zero eigenvalues, each counted as 1e-12, √ = 1e-6: within 1e-5)
        assert float(frechet_distance_to(target)(batch)) == pytest.approx(float(expected), rel=1e-9,
                                                                          abs=1e-9 if rows > 8 else 1e-5)
    assert float(frechet_distance_to(target)(target)) == pytest.approx(0, abs=1e-9)
    batch = torch.randn(40, 8, generator=g, dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(frechet_distance_to(target), (batch,))
    with pytest.raises(ValueError, match="two or more"):
        frechet_distance_to(target)(batch[:1])


def test_the_cosine_schedule_settles_the_descent_and_an_unknown_schedule_is_refused():
    """lr_schedule cosine: each iteration's step shrinks with the learning rate, (1 + cos πk/K)/2 of
    lr, so the last one moves the grid a thousandth of what the first does; at the constant rate the
    last step still moves it a few hundredths of the first (Adam's steps are about lr whatever the
    gradient's size). Both start alike (the first step is lr's in each)."""
    mu, v, u = gaussian()
    train = noise_of(64, 4)
    target = exact(mu, v, train)
    init = torch.linspace(1, 0, 5, dtype=F64)
    moves = {}
    for schedule in ("constant", "cosine"):
        grids = []
        learn_grid(u, train, target, init, "ab2", iterations=40, lr=0.1, check_every=1, lr_schedule=schedule,
                   keep=lambda grid, weights: grids.append(grid) or 0.0)  # (every iteration's grid, in order)
        assert len(grids) == 41
        moves[schedule] = [float((b - a).abs().max()) for a, b in zip(grids[:-1], grids[1:])]
    assert moves["cosine"][0] == moves["constant"][0]
    assert moves["cosine"][-1] < 0.005 * moves["cosine"][0]
    assert moves["constant"][-1] > 0.02 * moves["constant"][0]
    with pytest.raises(ValueError, match="lr_schedule='step'"):
        learn_sampler(u, train, target, init, "ab2", iterations=1, lr_schedule="step")
