"""The adapters against diffusers' own schedulers: DDIM = Euler on the rectified path (both
directions), round trips, the PF-ODE drift, guidance, the endpoint policy, bad input, and
save / load. Tiny random diffusers models built here stand in for Hub models."""

import json

import pytest
import torch
from conftest import make_unet
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    ModelMixin,
    SD3Transformer2DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config

from fmconvert import CosinePath, DiffusionAdapter, PathAdapter, RectifiedFlow, VelocityAdapter

F64 = torch.float64


def ddim(beta_schedule, prediction_type="epsilon", **extra):
    return DDIMScheduler(
        beta_schedule=beta_schedule, prediction_type=prediction_type, timestep_spacing="trailing",
        clip_sample=False, set_alpha_to_one=True, **extra,
    )


def run_ddim(model, scheduler, x, steps):
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return x


def run_flowmatch_euler(model, sigmas, x):
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            x = scheduler.step(model(x, timestep).sample, timestep, x).prev_sample
    return x


def mapped_sigmas(schedule, timesteps):
    """The DDIM grid on the rectified path: s = σ/(α+σ) at each timestep."""
    return RectifiedFlow().time_at_log_snr(schedule.log_snr(timesteps.to(F64)))


def rel_max(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def noise(shape=(2, 3, 8, 8), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- DDIM = Euler on the rectified path ---------------------------------------------------


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("prediction_type, beta_schedule", [("epsilon", "linear"), ("v_prediction", "squaredcos_cap_v2")])
def test_forward_identity_ddim_equals_flowmatch_euler_on_the_wrap(unet, prediction_type, beta_schedule, steps):
    scheduler = ddim(beta_schedule, prediction_type)
    eps = noise()
    reference = run_ddim(unet, scheduler, eps.clone(), steps)

    wrapped = VelocityAdapter.from_diffusion(unet, scheduler)
    schedule = wrapped.source_path
    p = schedule.point(scheduler.timesteps[:1])
    x_start = (eps.double() / (p.alpha + p.sigma)).float()  # x_s0 = ε/(α_T + σ_T)
    ours = run_flowmatch_euler(wrapped, mapped_sigmas(schedule, scheduler.timesteps), x_start)
    assert rel_max(ours, reference) <= 1e-5


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("prediction_type, beta_schedule", [("epsilon", "linear"), ("v_prediction", "squaredcos_cap_v2")])
def test_back_identity_ddim_on_the_wrap_equals_flowmatch_euler_on_the_flow_model(prediction_type, beta_schedule, steps):
    flow_model = make_unet(seed=5)  # a random network read as a velocity field
    scheduler = ddim(beta_schedule, prediction_type)
    wrapped = DiffusionAdapter.from_flow(flow_model, prediction_type, schedule=scheduler)
    eps = noise(seed=2)
    ours = run_ddim(wrapped, scheduler, eps.clone(), steps)

    schedule = wrapped.target_path
    p = schedule.point(scheduler.timesteps[:1])
    x_start = (eps.double() / (p.alpha + p.sigma)).float()
    reference = run_flowmatch_euler(flow_model, mapped_sigmas(schedule, scheduler.timesteps), x_start)
    assert rel_max(ours, reference) <= 1e-5


def test_identity_fails_without_the_mapping(unet):
    """The identity test can fail: uniform sigmas instead of the mapped grid do not match DDIM."""
    scheduler = ddim("linear")
    eps = noise()
    reference = run_ddim(unet, scheduler, eps.clone(), 10)
    wrapped = VelocityAdapter.from_diffusion(unet, scheduler)
    p = wrapped.source_path.point(scheduler.timesteps[:1])
    x_start = (eps.double() / (p.alpha + p.sigma)).float()
    ours = run_flowmatch_euler(wrapped, torch.linspace(mapped_sigmas(wrapped.source_path, scheduler.timesteps)[0].item(), 0.1, 10), x_start)
    assert rel_max(ours, reference) > 1e-3


# -- round trips ---------------------------------------------------------------------------

TIMES = torch.tensor([0, 1, 2, 10, 100, 250, 500, 750, 900, 990, 998, 999])


@pytest.mark.parametrize("prediction_type, beta_schedule", [
    ("epsilon", "linear"), ("v_prediction", "squaredcos_cap_v2"), ("sample", "scaled_linear"), ("epsilon", "sigmoid"),
])
def test_round_trip_is_the_identity(unet, prediction_type, beta_schedule):
    scheduler = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    there = VelocityAdapter.from_diffusion(unet, scheduler)
    back = DiffusionAdapter.from_flow(there, prediction_type, schedule=scheduler)
    x = noise((len(TIMES), 3, 8, 8), seed=3)
    with torch.no_grad():
        original, round_trip = unet(x, TIMES).sample, back(x, TIMES).sample
    assert round_trip.dtype == torch.float32
    for i in range(len(TIMES)):
        assert rel_l2(round_trip[i], original[i]) <= 1e-6, f"t={TIMES[i].item()}"
    # in between the integers too (continuous time, log-SNR interpolation on both sides)
    t_float = TIMES.to(torch.float32).clamp(max=998) + 0.375
    with torch.no_grad():
        original, round_trip = unet(x, t_float).sample, back(x, t_float).sample
    assert rel_l2(round_trip, original) <= 1e-6


def test_round_trip_from_the_flow_side(unet):
    """velocity → epsilon → velocity is the identity on a flow model."""
    scheduler = ddim("linear")
    as_eps = DiffusionAdapter.from_flow(unet, "epsilon", schedule=scheduler)
    again = VelocityAdapter.from_diffusion(as_eps, scheduler)
    s = mapped_sigmas(as_eps.target_path, TIMES)
    timesteps = RectifiedFlow().model_timestep(s)
    x = noise((len(TIMES), 3, 8, 8), seed=4)
    with torch.no_grad():
        assert rel_l2(again(x, timesteps).sample, unet(x, timesteps).sample) <= 1e-6


# -- the seed claim: the wrapped velocity IS the probability-flow ODE drift ---------------


@pytest.mark.parametrize("prediction_type, beta_schedule", [("epsilon", "linear"), ("v_prediction", "squaredcos_cap_v2")])
def test_velocity_equals_pf_ode_drift(unet, prediction_type, beta_schedule):
    """Drift f·x − ½g²·score in VP time t from the raw network output, moved by hand to
    (s, x_s) = (σ/(α+σ), x/(α+σ)), equals the adapter's output at 1000·s."""
    wrapped = VelocityAdapter.from_diffusion(unet, ddim(beta_schedule, prediction_type))
    schedule = wrapped.source_path
    t = torch.tensor([0.25, 1.5, 10.25, 100.5, 250.75, 500.5, 750.25, 900.5, 990.75, 998.5])
    p = schedule.point(t.to(F64))
    a, s_, da, ds = (v.view(-1, 1, 1, 1) for v in (p.alpha, p.sigma, p.d_alpha, p.d_sigma))
    x = noise((len(t), 3, 8, 8), seed=6)
    with torch.no_grad():
        raw = unet(x, t).sample.double()
    xd = x.double()
    score = -raw / s_ if prediction_type == "epsilon" else -(s_ * xd + a * raw) / s_  # ε̂ = σx + αv for v
    f = da / a
    g2 = 2 * s_ * ds - 2 * f * s_**2
    drift_t = f * xd - 0.5 * g2 * score  # dx/dt
    k = a + s_
    x_s = xd / k
    ds_dt = (ds * a - s_ * da) / k**2
    drift_s = (drift_t / k - xd * (da + ds) / k**2) / ds_dt  # d x_s / d s
    s = (s_ / k).flatten()
    with torch.no_grad():
        velocity = wrapped.evaluate(x_s, 1000 * s, output_dtype=F64)
    for i in range(len(t)):
        assert rel_l2(velocity[i], drift_s[i]) <= 1e-6, f"t={t[i].item()}"


def test_velocity_equals_pf_ode_drift_on_a_continuous_path(unet):
    """The same claim for an epsilon model on the continuous cosine path."""
    wrapped = PathAdapter._wrap(unet, CosinePath(), "epsilon", RectifiedFlow(), "flow_prediction", "float64")
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=F64)
    p = CosinePath().point(t)
    a, s_, da, ds = (v.view(-1, 1, 1, 1) for v in (p.alpha, p.sigma, p.d_alpha, p.d_sigma))
    x = noise((len(t), 3, 8, 8), seed=7).double()
    with torch.no_grad():
        score = -unet(x.float(), t.float()).sample.double() / s_
    drift_t = (da / a) * x - 0.5 * (2 * s_ * ds - 2 * (da / a) * s_**2) * score
    k = a + s_
    drift_s = (drift_t / k - x * (da + ds) / k**2) / ((ds * a - s_ * da) / k**2)
    with torch.no_grad():
        velocity = wrapped.evaluate(x / k, 1000 * (s_ / k).flatten(), output_dtype=F64)
    assert rel_l2(velocity, drift_s) <= 1e-6


# -- guidance and conditioning --------------------------------------------------------------


def test_classifier_free_guidance_commutes_with_conversion(cond_unet):
    scheduler = ddim("scaled_linear", beta_start=0.00085, beta_end=0.012)
    wrapped = VelocityAdapter.from_diffusion(cond_unet, scheduler)
    x = noise((3, 4, 8, 8), seed=8)
    cond, uncond = torch.randn(3, 5, 16), torch.zeros(3, 5, 16)
    timestep = torch.tensor([50.0, 500.0, 990.0])
    w = 7.5
    with torch.no_grad():
        u_c = wrapped.evaluate(x, timestep, encoder_hidden_states=cond, output_dtype=F64)
        u_u = wrapped.evaluate(x, timestep, encoder_hidden_states=uncond, output_dtype=F64)
        guided_velocity = u_u + w * (u_c - u_u)

        def guided_eps(x_in, t_in):
            e_c = cond_unet(x_in, t_in, encoder_hidden_states=cond).sample.double()
            e_u = cond_unet(x_in, t_in, encoder_hidden_states=uncond).sample.double()
            return e_u + w * (e_c - e_u)

        from fmconvert import evaluate_converted

        velocity_of_guided = evaluate_converted(guided_eps, x, timestep, wrapped.source_path, "epsilon", wrapped.target_path,
                                            "flow_prediction", input_dtype=torch.float32, output_dtype=F64)
    assert rel_l2(guided_velocity, velocity_of_guided) <= 1e-12
    assert rel_l2(u_c, u_u) > 1e-3  # the conditioning matters, so the check has teeth


@pytest.mark.parametrize("timestep", [torch.full((2,), 437.5), torch.tensor(437.5), 437.5, 999.0,
                                      torch.full((2,), 600, dtype=torch.long), torch.tensor([100.0, 900.0])])
def test_remembered_conversion_is_the_conversion(unet, timestep):
    """The adapter plans a conversion once per timestep value (samplers ask for the same grid
    every batch); what it remembers gives bit for bit what the core computes afresh."""
    from fmconvert import evaluate_converted

    wrapped = VelocityAdapter.from_diffusion(unet, ddim("linear"))
    uniform = torch.as_tensor(timestep).unique().numel() == 1
    with torch.no_grad():
        for x in (noise(), noise((3, 3, 8, 8))) if uniform else (noise(),):  # one plan serves any batch size
            if uniform and torch.is_tensor(timestep) and timestep.numel() > 1:
                timestep = timestep[:1].expand(len(x))
            afresh = evaluate_converted(lambda x_in, t_in: unet(x_in, t_in).sample, x, timestep, wrapped.source_path,
                                    "epsilon", wrapped.target_path, "flow_prediction", output_dtype=F64)
            first = wrapped.evaluate(x, timestep, output_dtype=F64)
            again = wrapped.evaluate(x, timestep, output_dtype=F64)
            assert torch.equal(first, afresh) and torch.equal(again, afresh)
    assert len(wrapped._plans) == (1 if uniform else 0)  # a mixed batch is planned every call


class _Spy(ModelMixin, ConfigMixin):
    """Records what it is called with; returns 0.5·sample."""

    @register_to_config
    def __init__(self, channels: int = 3):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls, self.input_dtypes = [], []

    def forward(self, sample, timestep, *args, return_dict=True, **kwargs):
        self.calls.append((args, kwargs))
        self.input_dtypes.append(sample.dtype)
        return (self.scale * sample,)


def test_conditioning_arguments_pass_through_unchanged():
    spy = _Spy()
    wrapped = VelocityAdapter.from_diffusion(spy, ddim("linear"))
    hidden, labels = torch.randn(2, 4, 8), torch.tensor([1, 7])
    added = {"text_embeds": torch.randn(2, 6), "time_ids": torch.randn(2, 6)}
    wrapped(noise(), torch.tensor(500.0), hidden, class_labels=labels, added_cond_kwargs=added,
            cross_attention_kwargs={"scale": 0.3}, return_dict=False)
    args, kwargs = spy.calls[-1]
    assert args[0] is hidden and kwargs["class_labels"] is labels and kwargs["added_cond_kwargs"] is added
    assert kwargs["cross_attention_kwargs"] == {"scale": 0.3}


def test_network_is_fed_its_own_dtype_after_casts_and_swaps():
    """The adapter remembers the network's dtype (ModelMixin.dtype walks every submodule): a
    cast, a replaced parameter and a replaced network must each be noticed."""
    spy = _Spy()
    wrapped = VelocityAdapter.from_diffusion(spy, ddim("linear"))
    t = torch.tensor(500.0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        wrapped.to(dtype)
        assert wrapped(noise(), t).sample.dtype == dtype and spy.input_dtypes[-1] == dtype
    spy.scale = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float16))
    wrapped(noise(), t)
    assert spy.input_dtypes[-1] == torch.float16
    wrapped.model = other = _Spy().double()
    wrapped(noise(), t)
    assert other.input_dtypes[-1] == torch.float64


def test_class_conditional_unet_sees_its_labels():
    unet = make_unet(num_class_embeds=10)
    wrapped = VelocityAdapter.from_diffusion(unet, ddim("linear"))
    x, timestep = noise(), torch.tensor(500.0)
    with torch.no_grad():
        a = wrapped(x, timestep, class_labels=torch.tensor([0, 0])).sample
        b = wrapped(x, timestep, class_labels=torch.tensor([3, 3])).sample
    assert rel_l2(a, b) > 1e-4


def test_transformer_flow_model_called_with_hidden_states():
    """An SD3-style transformer (hidden_states=..., timestep=...) wrapped as epsilon."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4,
    ).eval()
    wrapped = DiffusionAdapter.from_flow(transformer, "epsilon", schedule=ddim("linear"))
    x = noise((2, 4, 8, 8), seed=9)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}
    t = torch.tensor([100, 900])
    with torch.no_grad():
        eps = wrapped(hidden_states=x, timestep=t, **cond, return_dict=False)[0]
        p = wrapped.target_path.point(t.to(F64))
        s = (p.sigma / (p.alpha + p.sigma)).view(-1, 1, 1, 1)
        x_s = x.double() / (p.alpha + p.sigma).view(-1, 1, 1, 1)
        u = transformer(hidden_states=x_s.float(), timestep=(1000 * s.flatten()).float(), **cond).sample.double()
    torch.testing.assert_close(eps.double(), x_s + (1 - s) * u, rtol=1e-5, atol=1e-5)  # ε̂ = x_s + (1−s)·u


# -- endpoints -------------------------------------------------------------------------------

S_GRID = torch.cat([torch.tensor([0.0, 1e-6, 1e-3, 0.999, 0.99999, 1.0]), torch.linspace(0, 1, 41)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("prediction_type, config", [
    ("epsilon", {"beta_schedule": "linear"}),
    ("epsilon", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    ("epsilon", {"beta_schedule": "squaredcos_cap_v2"}),
    ("v_prediction", {"beta_schedule": "squaredcos_cap_v2"}),
    ("sample", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    ("v_prediction", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True}),
])
def test_endpoints_are_finite_in_every_dtype(prediction_type, config, dtype):
    unet = make_unet().to(dtype)
    wrapped = VelocityAdapter.from_diffusion(unet, ddim(prediction_type=prediction_type, **config))
    x = noise((len(S_GRID), 3, 8, 8), seed=10).to(dtype)
    with torch.no_grad():
        u = wrapped(x, (1000 * S_GRID).to(dtype)).sample
        back = DiffusionAdapter.from_flow(unet, prediction_type if prediction_type != "sample" else "epsilon",
                                          schedule=ddim(**config))
        e = back(x[:4], torch.tensor([0, 1, 998, 999])).sample
    assert u.dtype == dtype and e.dtype == dtype
    assert torch.isfinite(u).all() and torch.isfinite(e).all()


def test_float16_output_beyond_its_range_is_its_largest_value():
    """An epsilon source on the cosine schedule: near s = 1 the velocity is ~1e4–1e5 (x̂0 divides by
    α = 5e-5), beyond float16's 65504. In float16 those entries are ±65504, never Inf; every other
    entry is the float32 value rounded; asked for float32, the value is exact."""
    unet = make_unet(seed=2).half()
    wrapped = VelocityAdapter.from_diffusion(unet, ddim("squaredcos_cap_v2"))
    x = noise((2, 3, 8, 8), seed=12).half()
    s = torch.tensor([1.0, 0.9999])
    with torch.no_grad():
        exact = wrapped.evaluate(x, 1000 * s, output_dtype=torch.float32)
        half = wrapped(x, 1000 * s).sample
    big = exact.abs() > torch.finfo(torch.float16).max
    assert big.any() and torch.isfinite(half).all()
    assert torch.equal(half[big].float(), torch.finfo(torch.float16).max * exact[big].sign())
    assert torch.equal(half[~big], exact[~big].half())


def test_endpoint_policy_values(unet):
    """s = 1: x̂0 from the last trained timestep, u = x − x̂0. s = 0: ε̂ from t = 0, u = ε̂ − x."""
    scheduler = ddim("linear")
    wrapped = VelocityAdapter.from_diffusion(unet, scheduler)
    schedule = wrapped.source_path
    x = noise((1, 3, 8, 8), seed=11).double()
    with torch.no_grad():
        u1 = wrapped.evaluate(x, torch.tensor([1000.0]), output_dtype=F64)
        u0 = wrapped.evaluate(x, torch.tensor([0.0]), output_dtype=F64)
        top, bottom = schedule.point(torch.tensor(999.0)), schedule.point(torch.tensor(0.0))
        x_top = x * (top.norm / 1.0)  # |P_dst| = 1 at s = 1 and at s = 0
        eps_top = unet(x_top.float(), torch.tensor([999])).sample.double()
        x0_top = (x_top - top.sigma * eps_top) / top.alpha
        eps_bottom = unet((x * bottom.norm).float(), torch.tensor([0])).sample.double()
    torch.testing.assert_close(u1, x - x0_top, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(u0, eps_bottom - x, rtol=1e-9, atol=1e-9)


def test_x0_and_eps_stay_consistent_beyond_the_trained_range(unet):
    """(1 − s)·x̂0 + s·ε̂ = x_s for every s, the clamped ends included."""
    scheduler = ddim("linear")
    source = VelocityAdapter.from_diffusion(unet, scheduler).source_path
    as_x0 = PathAdapter._wrap(unet, source, "epsilon", RectifiedFlow(), "sample", "float64")
    as_eps = PathAdapter._wrap(unet, source, "epsilon", RectifiedFlow(), "epsilon", "float64")
    s = torch.tensor([0.0, 0.001, 0.005, 0.5, 0.995, 0.9999, 1.0], dtype=F64)
    x = noise((len(s), 3, 8, 8), seed=12).double()
    with torch.no_grad():
        x0 = as_x0.evaluate(x, 1000 * s, output_dtype=F64)
        eps = as_eps.evaluate(x, 1000 * s, output_dtype=F64)
    s4 = s.view(-1, 1, 1, 1)
    torch.testing.assert_close((1 - s4) * x0 + s4 * eps, x, rtol=1e-9, atol=1e-9)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("build, words", [
    (lambda m: VelocityAdapter.from_diffusion(m, ddim("linear"), prediction_type="noise"),
     ["prediction_type", "'noise'", "epsilon", "v_prediction"]),
    (lambda m: VelocityAdapter.from_diffusion(m, {"_class_name": "CMStochasticIterativeScheduler"}),
     ["CMStochasticIterativeScheduler", "DDIMScheduler"]),
    (lambda m: VelocityAdapter.from_diffusion(m, {"_class_name": "DDIMScheduler", "beta_schedule": "cubic"}),
     ["beta_schedule", "'cubic'", "linear"]),
    (lambda m: VelocityAdapter.from_diffusion(m, ddim("linear", rescale_betas_zero_snr=True)),
     ["epsilon", "zero-terminal-SNR", "rescale_betas_zero_snr", "v_prediction"]),
    (lambda m: DiffusionAdapter.from_flow(m, "epsilon", schedule=ddim("linear", rescale_betas_zero_snr=True)),
     ["epsilon", "zero-terminal-SNR", "v_prediction"]),
    (lambda m: DiffusionAdapter.from_flow(m, "flow_prediction"), ["flow_prediction", "epsilon", "v_prediction"]),
    (lambda m: VelocityAdapter.from_diffusion(m, FlowMatchEulerDiscreteScheduler()), ["DiffusionAdapter"]),
])
def test_bad_input_raises_value_error_naming_the_problem(unet, build, words):
    with pytest.raises(ValueError) as info:
        build(unet)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


# -- save / load -------------------------------------------------------------------------------


def test_save_and_load_like_a_diffusers_model(tmp_path, cond_unet):
    wrapped = VelocityAdapter.from_diffusion(cond_unet, ddim("scaled_linear", "v_prediction"))
    wrapped.save_pretrained(tmp_path / "velocity")
    files = sorted(p.name for p in (tmp_path / "velocity").iterdir())
    assert files == ["config.json", "network"]  # the adapter's config; the network as it saves itself
    assert sorted(p.name for p in (tmp_path / "velocity" / "network").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "velocity" / "config.json").read_text())
    assert config["_class_name"] == "VelocityAdapter" and config["source_prediction"] == "v_prediction"
    loaded = VelocityAdapter.from_pretrained(tmp_path / "velocity").eval()
    x, t, hidden = noise((2, 4, 8, 8)), torch.tensor([120.0, 870.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, encoder_hidden_states=hidden).sample,
                           wrapped(x, t, encoder_hidden_states=hidden).sample)


def test_nested_round_trip_saves_and_loads(tmp_path, unet):
    back = DiffusionAdapter.from_flow(VelocityAdapter.from_diffusion(unet, ddim("linear")), "epsilon", schedule=ddim("linear"))
    back.save_pretrained(tmp_path / "rt")
    loaded = DiffusionAdapter.from_pretrained(tmp_path / "rt").eval()
    x, t = noise(), torch.tensor([3, 600])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, back(x, t).sample)


def test_unknown_model_class_in_config_is_refused():
    with pytest.raises(ValueError, match="unknown model class 'os'"):
        VelocityAdapter(model_class="os", model_config={}, source_path=RectifiedFlow().to_config(),
                        source_prediction="epsilon", target_path=RectifiedFlow().to_config(),
                        target_prediction="flow_prediction")
