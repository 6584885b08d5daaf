"""Solvers and grids on a field whose exact flow is known: data x0 ~ N(m, c²) per coordinate.

On x_s = (1 − s)·x0 + s·ε the marginal is N((1 − s)·m, v(s)) with v = (1 − s)²c² + s², and
the velocity is u(x, s) = −m + (v'(s) / 2v(s))·(x − (1 − s)·m). The ODE carries x_1 = z to
x_0 = m + c·z exactly.
"""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from fmconvert.math.grids import discrete_timesteps, time_grid
from fmconvert.math.paths import DiscreteVPSchedule, RectifiedFlow
from fmconvert.math.solvers import SOLVERS, solve

M, C = 0.7, 0.3


def gaussian_velocity(x, s):
    s = s.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    v = (1 - s) ** 2 * C**2 + s**2
    dv = -2 * (1 - s) * C**2 + 2 * s
    return -M + dv / (2 * v) * (x - (1 - s) * M)


def exact_flow(s, z):
    """The exact solution at s from x_1 = z."""
    return (1 - s) * M + math.sqrt((1 - s) ** 2 * C**2 + s**2) * z


def log_snr_grid(steps):
    """steps − 1 intervals uniform in λ = log((1 − s)/s) from −5 to 9, then the step into s = 0.
    Exponential integrators take the last step as x ← x̂0, whose error is O(σ²) at the last
    s (here 1.2e-4: below 1e-7); on linspace(1, 0) it is O(1/N²) with a large constant."""
    s = torch.sigmoid(-torch.linspace(-5, 9, steps, dtype=torch.float64))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def exponential_error(solver, steps):
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = log_snr_grid(steps)
    result = solve(gaussian_velocity, exact_flow(grid[0].item(), z), grid, solver)
    return (result.x - (M + C * z)).abs().max().item(), result.nfe


@pytest.mark.threads(1)
@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_exponential_integrators_converge_at_their_order_with_one_evaluation_a_step(solver):
    """Measured 40 → 80 → 160 steps: dpmpp_2m 1.98, 2.01; dpmpp_3m 2.32, 2.11 (diffusers'
    D2 is halved: second order); unipc 2.98, 3.01."""
    e1, nfe1 = exponential_error(solver, 40)
    e2, nfe2 = exponential_error(solver, 80)
    measured = math.log2(e1 / e2)
    order = SOLVERS[solver].order
    assert measured >= order - 0.3, f"{solver}: observed order {measured:.2f}"
    assert (nfe1, nfe2) == (40, 80) and SOLVERS[solver].evals_per_step == 1
    if solver == "dpmpp_3m":  # diffusers' D2 ≈ h²·x̂0''/2 where its φ₃ coefficient needs h²·x̂0'': O(h³) a step
        assert math.log2(e2 / exponential_error(solver, 160)[0]) < 2.5


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_exponential_integrators_start_at_pure_noise(solver):
    """s = 1 is λ = −∞: the first step is DDIM's from pure noise (x̂0 = x − u), the next ones
    see r = ∞ and drop the terms it multiplies by 0; nothing is NaN, one evaluation a step."""
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = solve(gaussian_velocity, z, torch.linspace(1, 0, 41, dtype=torch.float64), solver)
    assert result.nfe == 40 and result.first_bad_nfe is None
    assert (result.x - (M + C * z)).abs().max() < 1e-2  # measured 4e-3 .. 8e-3: the last step's O(σ²) at s = 1/40


# -- the exponential integrators are diffusers' multistep schedulers, step for step ------------------------------


def _scheduler(solver, spacing):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    config = DDPMScheduler().config  # linear betas 1e-4 .. 0.02, epsilon, T = 1000
    if solver == "unipc":
        return UniPCMultistepScheduler.from_config(config, solver_order=2, predict_x0=True, solver_type="bh2",
                                                   lower_order_final=True, disable_corrector=[], timestep_spacing=spacing)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=int(solver[6]),
                                                   solver_type="midpoint", final_sigmas_type="zero", lower_order_final=True,
                                                   timestep_spacing=spacing)


@pytest.mark.threads(1)
@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "unipc"])
@pytest.mark.parametrize("spacing, steps", [("linspace", 5), ("linspace", 8), ("trailing", 5), ("trailing", 8)])
def test_exponential_integrators_are_diffusers_schedulers_on_the_converted_field(solver, spacing, steps):
    """DPM-Solver++ and UniPC in data prediction read only λ, σ'/σ, α' and x̂0, all the same on
    every Gaussian path with the same λ: on the converted field, on s = σ/(α + σ) of the
    scheduler's timesteps then 0, from x_T/(α_T + σ_T), each is the diffusers scheduler's own
    loop on the epsilon UNet. Measured: 3.0e-7 to 5.5e-7 relative (float32); the wrong solver
    (dpmpp_2m against the 3M scheduler, unipc against 2M, unipc without its corrector)
    differs by 4.2e-3 to 1.5e-2."""
    from conftest import make_unet
    from integration.test_adapters import noise, rel_max

    from fmconvert import VelocityAdapter

    unet = make_unet(seed=3)
    scheduler = _scheduler(solver, spacing)
    scheduler.set_timesteps(steps)
    x = noise() * scheduler.init_noise_sigma
    reference = x.clone()
    adapter = VelocityAdapter.from_diffusion(unet, scheduler)
    with torch.no_grad():
        for t in scheduler.timesteps:
            reference = scheduler.step(unet(reference, t).sample, t, reference).prev_sample
        p = adapter.source_path.point(scheduler.timesteps.to(torch.float64))
        grid = torch.cat([p.sigma / (p.alpha + p.sigma), torch.zeros(1, dtype=torch.float64)])
        result = solve(lambda y, s: adapter.evaluate(y, 1000 * s), (x.double() / (p.alpha[0] + p.sigma[0])).float(),
                       grid, solver)
    assert result.nfe == steps
    assert rel_max(result.x.double(), reference.double()) <= 1e-5  # x at s = 0 is the VP sample: α + σ = 1


def test_dopri5_is_accurate_and_counts_its_evaluations():
    pytest.importorskip("torchdiffeq")
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = solve(gaussian_velocity, z, torch.tensor([1.0, 0.0], dtype=torch.float64), "dopri5", rtol=1e-8, atol=1e-8)
    assert (result.x - (M + C * z)).abs().max() < 1e-6
    assert result.nfe > 6  # adaptive: counted, not assumed


def test_nan_is_located():
    def bad(x, s):
        return torch.where(s.view(-1, 1) < 0.45, torch.nan, 1.0) * torch.ones_like(x)

    result = solve(bad, torch.zeros(2, 3), torch.linspace(1, 0, 11, dtype=torch.float64), "euler")
    assert result.first_bad_nfe == 6  # s = 0.4 is the 7th evaluation
    assert solve(gaussian_velocity, torch.zeros(2, 3, dtype=torch.float64),
                 torch.linspace(1, 0, 5, dtype=torch.float64), "euler").first_bad_nfe is None


def test_unknown_solver_and_grid():
    with pytest.raises(ValueError, match="unknown solver 'rk5'.*euler"):
        solve(gaussian_velocity, torch.zeros(1, 1), torch.tensor([1.0, 0.0]), "rk5")
    with pytest.raises(ValueError, match="unknown grid 'cubic'.*uniform"):
        time_grid("cubic", 10)
    with pytest.raises(ValueError, match="positive"):
        time_grid("uniform", 0)


# -- grids --------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [7, 10, 50])
def test_discrete_spacings_match_ddim(spacing, steps):
    scheduler = DDIMScheduler(timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert np.array_equal(discrete_timesteps(spacing, steps, 1000), scheduler.timesteps.numpy())


def test_trailing_grid_is_ddim_mapped_to_s():
    schedule = DiscreteVPSchedule.from_config({"beta_schedule": "linear"})
    grid = time_grid("trailing", 10, schedule)
    p = schedule.point(torch.arange(999, 0, -100, dtype=torch.float64))
    torch.testing.assert_close(grid[:-1], p.sigma / (p.alpha + p.sigma), rtol=1e-14, atol=0)
    assert grid[-1] == 0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flowmatch_grid_is_the_schedulers_default(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(12)
    ours = time_grid("flowmatch", 12, RectifiedFlow(), shift=shift)
    torch.testing.assert_close(ours, scheduler.sigmas.to(torch.float64), rtol=0, atol=0)


def test_log_snr_grid_is_uniform_in_log_snr():
    schedule = DiscreteVPSchedule.from_config({"beta_schedule": "linear"})
    lam = RectifiedFlow().log_snr(time_grid("logsnr", 9, schedule)[:-1])
    torch.testing.assert_close(lam.diff(), torch.full((8,), lam.diff()[0].item(), dtype=torch.float64))
    torch.testing.assert_close(lam[[0, -1]], schedule.log_snr(torch.tensor([999.0, 0.0], dtype=torch.float64)))


def test_flow_sources_have_no_discrete_spacing():
    with pytest.raises(ValueError, match="discrete schedule"):
        time_grid("trailing", 10, RectifiedFlow())
    assert time_grid("karras", 10, RectifiedFlow())[0] < 1


def test_all_solvers_registered():
    assert set(SOLVERS) == {"euler", "heun", "midpoint", "rk4", "ab2", "dpmpp_2m", "dpmpp_3m", "unipc", "auto", "dopri5"}


# -- grids honour the options of the scheduler they copy ------------------------------------------------------


def _vm(scheduler: dict, path):
    """What sampling_grid reads of a loaded model: its source's scheduler config and path."""
    from types import SimpleNamespace

    from fmconvert.integration.families import PixelUnconditional

    source = SimpleNamespace(scheduler=scheduler, shift=scheduler.get("shift", 1.0), reference="src", pipeline_class=None,
                             family=PixelUnconditional())
    velocity = SimpleNamespace(config={"in_channels": 3, "sample_size": 8})
    return SimpleNamespace(source=source, grid_source=path, velocity=velocity, size=None, pipeline=None)


@pytest.mark.parametrize("steps", [10, 7])
def test_leading_grid_keeps_the_sources_steps_offset(steps):
    """SD 1.5 ships DDIM/PNDM with steps_offset=1: its leading timesteps are 901 … 1, not 900 … 0
    (sampling, and the converted pipeline's scheduler with timestep_spacing="leading")."""
    from fmconvert.integration.schedulers import FlowMatchEulerScheduler
    from fmconvert.sampling.model import sampling_grid

    config = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "steps_offset": 1}
    path = DiscreteVPSchedule.from_config(config)
    ddim = DDIMScheduler.from_config({**config, "timestep_spacing": "leading"})
    ddim.set_timesteps(steps)
    expected = RectifiedFlow().time_at_log_snr(path.log_snr(ddim.timesteps.to(torch.float64)))
    grid = sampling_grid(_vm(config, path), "leading", steps)
    torch.testing.assert_close(grid[:-1], expected, rtol=1e-14, atol=0)
    converted = FlowMatchEulerScheduler(sample_scaling="variance_preserving", timestep_spacing="leading",
                                        source_schedule={"kind": "discrete_vp", **{k: config[k] for k in config if k.startswith("beta")}},
                                        steps_offset=1)
    converted.set_timesteps(steps)
    torch.testing.assert_close(converted.sigmas[:-1].to(torch.float64), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("options", [{}, {"shift": 3.0}, {"shift_terminal": 0.1}, {"use_karras_sigmas": True},
                                     {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
                                     {"shift": 3.0, "use_karras_sigmas": True}],
                         ids=lambda o: ",".join(o) or "default")
def test_flowmatch_grid_is_the_flow_sources_own_scheduler(options):
    """A flow source's --grid flowmatch is its FlowMatchEulerDiscreteScheduler's sigmas, every option
    honoured, bit for bit (it was the static-shift grid whatever the config said)."""
    from fmconvert.sampling.model import sampling_grid

    scheduler = FlowMatchEulerDiscreteScheduler(**options)
    scheduler.set_timesteps(9)
    config = {**scheduler.config, "_class_name": "FlowMatchEulerDiscreteScheduler"}
    grid = sampling_grid(_vm(config, RectifiedFlow(shift=options.get("shift", 1.0))), "flowmatch", 9)
    torch.testing.assert_close(grid, scheduler.sigmas.to(torch.float64), rtol=0, atol=0)


def test_options_a_grid_cannot_honour_are_refused():
    from fmconvert.integration.configs import path_config
    from fmconvert.integration.schedulers import FlowMatchEulerScheduler
    from fmconvert.sampling.model import sampling_grid

    dynamic = {**FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config,
               "_class_name": "FlowMatchEulerDiscreteScheduler"}
    for kind in ("flowmatch", "uniform"):
        with pytest.raises(ValueError, match="use_dynamic_shifting"):
            sampling_grid(_vm(dynamic, RectifiedFlow()), kind, 8)
    assert len(sampling_grid(_vm(dynamic, RectifiedFlow()), "karras", 8)) == 9
    with pytest.raises(ValueError, match="invert_sigmas"):
        path_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True})
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatchEulerScheduler(timestep_spacing="trailing", use_karras_sigmas=True)


def test_auto_is_the_measured_choice_for_its_step_count():
    """`auto` runs the solver AUTO_CHOICE names for the grid's step count, step for step."""
    from fmconvert.math.solvers import auto_choice

    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert [auto_choice(n) for n in (3, 5, 6, 50)] == [("ab2", 1.5), ("ab2", 1.5), ("unipc", None), ("unipc", None)]
    for steps in (3, 4, 5, 8):
        grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        chosen, auto = solve(gaussian_velocity, z, grid, auto_choice(steps)[0]), solve(gaussian_velocity, z, grid, "auto")
        assert torch.equal(chosen.x, auto.x) and auto.nfe == chosen.nfe == steps


def test_auto_samples_on_its_shifted_grid_where_the_source_has_no_shift(tmp_path):
    """`sample --solver auto` is ab2 with --shift 1.5 at few steps and unshifted unipc at more; an explicit
    --shift, another grid, or a source scheduler with a shift of its own keeps its grid."""
    from conftest import ok, save_ddpm_folder, save_flow_folder
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import load_file

    folder = save_ddpm_folder(tmp_path / "m")
    shifted = save_flow_folder(tmp_path / "f")
    config = shifted / "scheduler" / "scheduler_config.json"
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(config.parent)

    def samples(model, *args):
        ok("sample", model, "--num-images", 2, "--seed", 1, *args, "--save-tensor", tmp_path / "x.safetensors")
        return load_file(tmp_path / "x.safetensors")["samples"]

    for steps, same in ((4, ("--solver", "ab2", "--shift", 1.5)), (7, ("--solver", "unipc"))):
        assert torch.equal(samples(folder, "--solver", "auto", "--steps", steps), samples(folder, *same, "--steps", steps))
    assert torch.equal(samples(folder, "--solver", "auto", "--shift", 2, "--steps", 4),
                       samples(folder, "--solver", "ab2", "--shift", 2, "--steps", 4))
    assert torch.equal(samples(folder, "--solver", "auto", "--grid", "karras", "--steps", 4),
                       samples(folder, "--solver", "ab2", "--grid", "karras", "--steps", 4))
    assert not torch.equal(samples(folder, "--solver", "auto", "--steps", 4), samples(folder, "--solver", "ab2", "--steps", 4))
    assert torch.equal(samples(shifted, "--solver", "auto", "--steps", 4), samples(shifted, "--solver", "ab2", "--steps", 4))


def test_runs_record_what_auto_ran(tmp_path, ddpm_folder):
    """`--solver auto` is resolved where the run is made: its record (--json, the samples folder's
    manifest, fid's rows) names the solver and shift that ran, not `auto` and the shift asked for."""
    from conftest import ok

    out = json.loads(ok("sample", ddpm_folder, "--solver", "auto", "--steps", 4, "--num-images", 2, "--json",
                        "--samples-dir", tmp_path / "s").stdout)
    assert (out["solver"], out["shift"]) == ("ab2", 1.5)
    assert (out["run"]["sampler"], out["run"]["shift"]) == ("ab2", 1.5)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert (manifest["sampler"], manifest["shift"]) == ("ab2", 1.5)
    out = json.loads(ok("fid", ddpm_folder, "--reference", "builtin:digits", "--solver", "auto,euler", "--steps", "4,6",
                        "--num-images", 4, "--batch-size", 4, "--samples-dir", tmp_path / "f", "--json").stdout)
    assert [(row["sampler"], row["steps"]) for row in out["rows"]] == [("ab2", 4), ("unipc", 6), ("euler", 4), ("euler", 6)]
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["ab2-uniform-shift1.5-4", "euler-uniform-4",
                                                                  "euler-uniform-6", "unipc-uniform-6"]
