"""Gaussian paths: exact agreement with diffusers' schedulers, the log-SNR interpolation,
the float32 timestep snapping, derivatives, and the config reader's errors."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from fmconvert import (
    CosinePath,
    DiscreteVPSchedule,
    EDMPath,
    RectifiedFlow,
    VEPath,
    VPSDEPath,
    path_from_config,
    path_from_scheduler_config,
)

F64 = torch.float64

BETA_CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"beta_schedule": "linear", "rescale_betas_zero_snr": True},
    {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True, "num_train_timesteps": 500},
    {"trained_betas": torch.linspace(1e-3, 0.05, 100).tolist(), "num_train_timesteps": 100},
]


@pytest.mark.parametrize("config", BETA_CONFIGS, ids=lambda c: c.get("beta_schedule", "trained") + ("-zsnr" if c.get("rescale_betas_zero_snr") else ""))
def test_alphas_cumprod_match_diffusers_bit_for_bit(config):
    reference = DDPMScheduler(**config).alphas_cumprod
    schedule = DiscreteVPSchedule.from_config(config)
    assert torch.equal(schedule.alphas_cumprod, reference.to(F64))
    t = torch.arange(schedule.num_train_timesteps, dtype=F64)
    p = schedule.point(t)
    torch.testing.assert_close(p.alpha, reference.to(F64).sqrt(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(p.sigma, (1 - reference.to(F64)).sqrt(), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("config", BETA_CONFIGS[:5], ids=lambda c: c.get("beta_schedule", "trained"))
def test_log_snr_is_linear_between_integers_and_inverts(config):
    schedule = DiscreteVPSchedule.from_config(config)
    T = schedule.num_train_timesteps
    n = torch.arange(T - 2, dtype=F64)  # stay off the last interval (special with zero terminal SNR)
    frac = torch.rand(n.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    lam_lo, lam_hi = schedule.log_snr(n), schedule.log_snr(n + 1)
    lam = schedule.log_snr(n + frac)
    torch.testing.assert_close(lam, lam_lo + frac * (lam_hi - lam_lo), rtol=1e-12, atol=1e-12)
    # inverse, everywhere (the last interval of a zero-SNR schedule included)
    t = torch.linspace(0, T - 1, 4001, dtype=F64)[1:-1]
    back = schedule.time_at_log_snr(schedule.log_snr(t))
    torch.testing.assert_close(back, t, rtol=0, atol=1e-8)
    # monotone: noisier with t
    assert bool((schedule.log_snr(t).diff() < 0).all())


@pytest.mark.parametrize("config", BETA_CONFIGS[:5], ids=lambda c: c.get("beta_schedule", "trained"))
def test_float32_flow_timesteps_snap_back_to_their_integer(config):
    """1000·s as diffusers hands it over (float32) maps back to the exact integer source time."""
    schedule, flow = DiscreteVPSchedule.from_config(config), RectifiedFlow()
    t = torch.arange(schedule.num_train_timesteps, dtype=F64)
    s = flow.time_at_log_snr(schedule.log_snr(t))
    timestep = flow.model_timestep(s)
    assert timestep.dtype == torch.float32
    lam = flow.log_snr(flow.time_from_model_timestep(timestep))
    back = schedule.time_at_log_snr(lam, snap_tol=flow.timestep_log_snr_resolution(timestep))
    assert torch.equal(back, t)
    # without the snap the float32 rounding is visible: the snap is doing work
    assert (schedule.time_at_log_snr(lam) - t).abs().max() > 1e-4


def test_snap_does_not_capture_genuine_in_between_times():
    schedule, flow = DiscreteVPSchedule.from_config({"beta_schedule": "linear"}), RectifiedFlow()
    t = torch.arange(0, 999, dtype=F64) + 0.01  # 1% of a step away from the integers
    timestep = flow.model_timestep(flow.time_at_log_snr(schedule.log_snr(t)))
    lam = flow.log_snr(flow.time_from_model_timestep(timestep))
    back = schedule.time_at_log_snr(lam, snap_tol=flow.timestep_log_snr_resolution(timestep))
    assert bool((back != back.round()).all())
    torch.testing.assert_close(back, t, rtol=0, atol=5e-3)


PATHS = [
    DiscreteVPSchedule.from_config({"beta_schedule": "linear"}),
    DiscreteVPSchedule.from_config({"beta_schedule": "linear", "rescale_betas_zero_snr": True}),
    RectifiedFlow(),
    CosinePath(),
    VEPath(0.002, 80.0),
    EDMPath(0.002, 80.0, 0.5),
    VPSDEPath(0.1, 20.0, 1e-3),
]


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_derivatives_match_finite_differences(path):
    lo, hi = path.t_min, path.t_max
    t = lo + (hi - lo) * torch.rand(200, dtype=F64, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01 * (hi - lo)
    if isinstance(path, DiscreteVPSchedule):  # piecewise: stay inside one interval
        t = t.floor() + 0.5 + 0.4 * (t - t.floor() - 0.5)
    h = 1e-6 * (hi - lo)
    p, p_plus, p_minus = path.point(t), path.point(t + h), path.point(t - h)
    torch.testing.assert_close(p.d_alpha, (p_plus.alpha - p_minus.alpha) / (2 * h), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.d_sigma, (p_plus.sigma - p_minus.sigma) / (2 * h), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS[2:], ids=repr)
def test_continuous_paths_invert_log_snr(path):
    t = torch.linspace(path.t_min, path.t_max, 1001, dtype=F64)[1:-1]
    torch.testing.assert_close(path.time_at_log_snr(path.log_snr(t)), t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_rectified_flow_shift_matches_flowmatch_scheduler(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0.02, 25).tolist())
    path = RectifiedFlow(shift=shift)
    ours = path.shifted(torch.linspace(1, 0.02, 25, dtype=torch.float32).to(F64))
    torch.testing.assert_close(ours, scheduler.sigmas[:-1].to(F64), rtol=1e-6, atol=1e-7)


def test_rectified_flow_and_vp_agree_at_equal_log_snr():
    """s = σ/(α+σ) and x_s = x_vp/(α+σ): the NOTES' change of path."""
    schedule, flow = DiscreteVPSchedule.from_config({"beta_schedule": "linear"}), RectifiedFlow()
    t = torch.arange(1000, dtype=F64)
    p = schedule.point(t)
    s = flow.time_at_log_snr(schedule.log_snr(t))
    torch.testing.assert_close(s, p.sigma / (p.alpha + p.sigma), rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_path_config_round_trip(path):
    again = path_from_config(path.to_config())
    t = torch.linspace(path.t_min, path.t_max, 17, dtype=F64)
    assert torch.equal(again.log_snr(t), path.log_snr(t))


def test_scheduler_configs_map_to_paths():
    path, pred = path_from_scheduler_config(DDIMScheduler(prediction_type="v_prediction"))
    assert isinstance(path, DiscreteVPSchedule) and pred == "v_prediction"
    path, pred = path_from_scheduler_config(EulerDiscreteScheduler(beta_schedule="scaled_linear"))
    assert isinstance(path, DiscreteVPSchedule) and pred == "epsilon"
    path, pred = path_from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert isinstance(path, RectifiedFlow) and path.shift == 3.0 and pred == "flow_prediction"
    path, pred = path_from_scheduler_config(
        DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0)
    )
    assert isinstance(path, RectifiedFlow) and path.shift == 2.0 and pred == "flow_prediction"
    # a saved config dict carries its class name
    saved = {**FlowMatchEulerDiscreteScheduler().config, "_class_name": "FlowMatchEulerDiscreteScheduler"}
    assert isinstance(path_from_scheduler_config(saved)[0], RectifiedFlow)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"_class_name": "KarrasVeScheduler"}, ["KarrasVeScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler"]),
        ({"_class_name": "DDIMScheduler", "beta_schedule": "quadratic"}, ["quadratic", "scaled_linear", "squaredcos_cap_v2"]),
        ({"_class_name": "DDIMScheduler", "prediction_type": "noise"}, ["noise", "epsilon", "v_prediction"]),
        ({"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction"}, ["use_flow_sigmas"]),
        ({"_class_name": "DDIMScheduler", "prediction_type": "flow_prediction"}, ["use_flow_sigmas"]),
    ],
)
def test_unsupported_scheduler_settings_raise_clear_errors(config, words):
    with pytest.raises(ValueError) as info:
        path_from_scheduler_config(config)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_alphas_cumprod_is_refused():
    with pytest.raises(ValueError, match="non-increasing"):
        DiscreteVPSchedule([0.5, 0.9])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        DiscreteVPSchedule([1.5, 0.9])
    with pytest.raises(ValueError, match="unknown path kind"):
        path_from_config({"kind": "spiral"})


def test_cosine_path_is_variance_preserving_and_ends_at_noise():
    p = CosinePath().point(torch.tensor([0.0, 0.3, 1.0], dtype=F64))
    torch.testing.assert_close(p.alpha**2 + p.sigma**2, torch.ones(3, dtype=F64))
    assert p.alpha[-1] < 1e-15 and p.sigma[0] == 0 and math.isclose(p.sigma[-1].item(), 1.0)


@pytest.mark.parametrize("config", BETA_CONFIGS)
def test_a_schedule_is_described_by_its_beta_settings(config):
    """A discrete VP path is written to configs as its beta settings (what `wrap` writes without
    torch, :func:`fmconvert.integration.configs.path_config`), read back to the same ᾱ bit for bit as
    diffusers' and as the ᾱ table fmconvert 0.1 wrote."""
    from fmconvert.integration.configs import path_config

    description, _ = path_config({"_class_name": "DDIMScheduler", **config})
    path = path_from_config(description)
    assert path.to_config() == description and "alphas_cumprod" not in description
    expected = DDPMScheduler(**config).alphas_cumprod.to(F64)
    table = path_from_config({"kind": "discrete_vp", "alphas_cumprod": expected.tolist()})
    assert torch.equal(path.alphas_cumprod, expected) and torch.equal(table.alphas_cumprod, expected)
    assert torch.equal(path_from_config(table.to_config()).alphas_cumprod, expected)


def test_trained_betas_out_of_range_are_refused_from_the_config():
    from fmconvert.integration.configs import path_config

    with pytest.raises(ValueError, match="trained_betas"):
        path_config({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 1.5]})


def test_vp_sde_path_is_score_sde_vp_schedulers():
    """α and σ of ScoreSdeVpScheduler's step (log_mean_coeff, std), its config read as the path."""
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    from fmconvert.integration.configs import path_config

    scheduler = ScoreSdeVpScheduler(beta_min=0.1, beta_max=20.0, sampling_eps=1e-3)
    description, prediction = path_config(scheduler)
    path = path_from_config(description)
    assert isinstance(path, VPSDEPath) and prediction == "epsilon" and (path.t_min, path.t_max) == (1e-3, 1.0)
    t = torch.linspace(1e-3, 1, 50, dtype=F64)
    log_mean = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    p = path.point(t)
    torch.testing.assert_close(p.alpha, log_mean.exp(), rtol=1e-14, atol=0)
    torch.testing.assert_close(p.sigma, torch.sqrt(1.0 - torch.exp(2.0 * log_mean)), rtol=1e-12, atol=0)
