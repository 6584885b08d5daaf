"""The prediction-type core: every type round-trips through (x̂0, ε̂), agrees with
diffusers' own formulas, and the flow velocity equals the PF-ODE drift analytically."""

import pytest
import torch
from conftest import interior_points
from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler

from fmconvert import (
    PREDICTION_TYPES,
    CosinePath,
    DiscreteVPSchedule,
    EDMPath,
    RectifiedFlow,
    VEPath,
    VPSDEPath,
    canonical_prediction_type,
    from_x0_eps,
    pf_ode_drift,
    to_x0_eps,
)

F64 = torch.float64
PATHS = [DiscreteVPSchedule.from_config({"beta_schedule": "linear"}), RectifiedFlow(), CosinePath(), VEPath(0.01, 50.0),
         EDMPath(0.002, 80.0, 0.5), EDMPath(0.002, 120.0, 1.0), VPSDEPath()]


# (the EDM output is defined on the EDM path only: check_pair refuses the others)
PAIRS = [(path, kind) for path in PATHS for kind in PREDICTION_TYPES
         if isinstance(path, EDMPath) or not kind.startswith("edm")]


@pytest.mark.parametrize("path, kind", PAIRS, ids=[f"{p!r}-{k}" for p, k in PAIRS])
def test_every_prediction_type_round_trips(path, kind):
    p, x0, eps, x = interior_points(path)
    out = from_x0_eps(kind, x0, eps, p)
    x0_back, eps_back = to_x0_eps(kind, out, x, p)
    torch.testing.assert_close(x0_back, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=1e-9, atol=1e-9)


def test_matches_diffusers_scheduler_formulas():
    """v from DDPMScheduler.get_velocity; x̂0 from DDIMScheduler.step for each type."""
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    path = DiscreteVPSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([3, 250, 700, 999])
    p = path.point(t).view_as_batch(4)
    v = from_x0_eps("v_prediction", x0.double(), eps.double(), p)
    torch.testing.assert_close(v.float(), sched.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    x = sched.add_noise(x0, eps, t)
    for kind, out in (("epsilon", eps), ("sample", x0), ("v_prediction", v.float())):
        ddim = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=kind, clip_sample=False)
        ddim.set_timesteps(10)
        for i in range(4):
            ref = ddim.step(out[i : i + 1], int(t[i]), x[i : i + 1]).pred_original_sample
            ours, _ = to_x0_eps(kind, out[i : i + 1].double(), x[i : i + 1].double(), path.point(t[i]))
            torch.testing.assert_close(ours.float(), ref, rtol=1e-4, atol=1e-4)


def test_rectified_velocity_is_eps_minus_x0():
    p, x0, eps, x = interior_points(RectifiedFlow())
    torch.testing.assert_close(from_x0_eps("flow_prediction", x0, eps, p), eps - x0)


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_pf_ode_drift_from_score_is_the_velocity(path):
    p, x0, eps, x = interior_points(path, seed=3)
    score = from_x0_eps("score", x0, eps, p)
    torch.testing.assert_close(pf_ode_drift(p, x, score), from_x0_eps("flow_prediction", x0, eps, p), rtol=1e-10, atol=1e-10)


def test_prediction_type_names():
    assert canonical_prediction_type("flow") == "flow_prediction"
    assert canonical_prediction_type("velocity") == "flow_prediction"
    assert canonical_prediction_type("epsilon") == "epsilon"
    with pytest.raises(ValueError) as info:
        canonical_prediction_type("noise")
    message = str(info.value)
    assert "'noise'" in message and all(k in message for k in PREDICTION_TYPES)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_output_matches_diffusers_preconditioning(prediction_type, sigma_data):
    """x̂0 from the EDM output equals EDMEulerScheduler.precondition_outputs (D = c_skip·x_VE +
    c_out·F) on the unscaled sample, at the EDM path's point; with σ_d = 1, edm_v is v_prediction."""
    from fmconvert.integration.configs import path_config
    from fmconvert.math.paths import path_from_config

    scheduler = EDMEulerScheduler(sigma_data=sigma_data, prediction_type=prediction_type)
    description, kind = path_config(scheduler)
    path = path_from_config(description)
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.002, 0.3, 1.0, 7.0, 80.0], dtype=F64)
    x_ve, out = torch.randn(5, 4, dtype=F64, generator=g), torch.randn(5, 4, dtype=F64, generator=g)
    p = path.point(sigma).view_as_batch(2)
    ours, _ = to_x0_eps(kind, out, p.alpha * x_ve, p)  # the network sees c_in·x_VE
    reference = scheduler.precondition_outputs(x_ve, out, sigma.view(-1, 1))
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    if sigma_data == 1.0:
        torch.testing.assert_close(from_x0_eps("edm_v", x_ve, out, p), from_x0_eps("v_prediction", x_ve, out, p))
