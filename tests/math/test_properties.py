"""Property-based tests of the core (hypothesis): random valid diffusers scheduler configs (every
beta schedule, beta ranges, T from 10 to 4000, zero terminal SNR where legal, every prediction type)
and random times s in [0, 1], endpoints included.

- the conversion onto diffusers' rectified path and back is a round trip to 1e-6 (it is affine
  in the network's output, and ``invert`` undoes it);
- the converted output is finite at every s in float32, bfloat16 and float16;
- a (schedule, prediction) pair the core cannot convert is refused with a one-line ValueError;
- the path's time ↔ log-SNR maps invert each other on the trained range.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmconvert.integration.configs import path_config
from fmconvert.math.conversion import apply_conversion, check_pair, invert, plan_conversion
from fmconvert.math.paths import RectifiedFlow, path_from_config

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

betas = st.tuples(st.floats(1e-5, 2e-3), st.floats(5e-3, 0.03))
configs = st.builds(
    lambda kind, ends, T, zsnr, spacing: {"_class_name": "DDIMScheduler", "beta_schedule": kind, "beta_start": ends[0],
                                          "beta_end": ends[1], "num_train_timesteps": T, "rescale_betas_zero_snr": zsnr},
    st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]), betas, st.integers(10, 4000),
    st.booleans(), st.just("trailing"),
)
predictions = st.sampled_from(["epsilon", "sample", "v_prediction"])
times = st.lists(st.one_of(st.sampled_from([0.0, 1.0, 1e-7, 1 - 1e-7]), st.floats(0.0, 1.0)), min_size=1, max_size=6)


def _source(config, prediction):
    description, _ = path_config(config)
    path = path_from_config(description)
    return path, check_pair(path, prediction)


@SETTINGS
@given(configs, predictions, times, st.integers(0, 2**31 - 1))
def test_conversion_round_trips_and_is_finite(config, prediction, s_values, seed):
    if config["rescale_betas_zero_snr"] and prediction == "epsilon":
        with pytest.raises(ValueError) as info:
            _source(config, prediction)
        assert "\n" not in str(info.value) and "zero" in str(info.value)
        return
    source, prediction = _source(config, prediction)
    target = RectifiedFlow(num_train_timesteps=source.num_train_timesteps)
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(s_values, dtype=F64)
    x = torch.randn(len(s_values), 3, 4, 4, dtype=F64, generator=g)
    output = torch.randn(len(s_values), 3, 4, 4, dtype=F64, generator=g).clamp(-4, 4)
    plan = plan_conversion(target.num_train_timesteps * s, x.ndim, source, prediction, target, "flow_prediction",
                           F64, F64)
    velocity = apply_conversion(lambda x_src, t: output, x, plan, F64)
    assert torch.isfinite(velocity).all()
    back = invert(plan, x, velocity)
    assert ((back - output).abs().max() / output.abs().max()).item() <= 1e-6
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        low = apply_conversion(lambda x_src, t: output.to(dtype), x.to(dtype), plan, torch.float32,
                               output_dtype=dtype)
        assert low.dtype == dtype and torch.isfinite(low).all()


@SETTINGS
@given(configs, st.sampled_from(["epsilon", "v_prediction"]), times)
def test_back_conversion_round_trips(config, prediction, s_values):
    """A flow model as an epsilon / v model on the random discrete schedule, at random
    (continuous) timesteps of that schedule."""
    if config["rescale_betas_zero_snr"] and prediction == "epsilon":
        return  # (refused: the test above)
    target, prediction = _source(config, prediction)
    source = RectifiedFlow(num_train_timesteps=target.num_train_timesteps)
    t = torch.tensor(s_values, dtype=F64) * target.t_max
    x = torch.randn(len(s_values), 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    output = torch.randn_like(x)
    plan = plan_conversion(t, x.ndim, source, "flow_prediction", target, prediction, F64, F64)
    converted = apply_conversion(lambda x_src, timestep: output, x, plan, F64)
    assert torch.isfinite(converted).all()
    assert ((invert(plan, x, converted) - output).abs().max() / output.abs().max()).item() <= 1e-6


@SETTINGS
@given(configs)
def test_time_and_log_snr_invert_each_other(config):
    path, _ = _source(config, "v_prediction")
    t = torch.linspace(0, path.t_max, 97, dtype=F64)
    lam = path.log_snr(t)
    finite = torch.isfinite(lam)
    torch.testing.assert_close(path.time_at_log_snr(lam[finite]), t[finite], rtol=0, atol=1e-6)


@given(st.text(min_size=1, max_size=12).filter(lambda s: s not in ("linear", "scaled_linear", "squaredcos_cap_v2",
                                                                    "sigmoid")),
       st.text(min_size=1, max_size=12).filter(lambda s: s not in ("epsilon", "sample", "v_prediction",
                                                                    "flow_prediction", "v", "x0", "flow",
                                                                    "velocity", "score", "edm", "edm_v")))
@SETTINGS
def test_invalid_configs_are_refused_in_one_line(schedule, prediction):
    for config in ({"_class_name": "DDIMScheduler", "beta_schedule": schedule},
                   {"_class_name": "DDIMScheduler", "prediction_type": prediction}):
        with pytest.raises(ValueError) as info:
            path_config(config)
        assert "\n" not in str(info.value)
