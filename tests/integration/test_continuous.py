"""Continuous-time sources: score-SDE VE (NCSN++: the network takes σ and returns the score),
EDM-preconditioned networks (diffusers' EDM schedulers, sigma_data), and
EulerDiscreteScheduler's continuous timesteps (¼·log σ). Each converts to a velocity field
exactly: Euler on the probability-flow ODE in the source's own variable σ (the step of the
source's own ODE scheduler) equals fmconvert's Euler on the converted field on the mapped grid
s = σ/(1 + σ), with x_s = x_VE/(1 + σ)."""

import pytest
import torch
from conftest import make_unet
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, EulerDiscreteScheduler, ScoreSdeVeScheduler
from test_adapters import noise, rel_max

from fmconvert import EDMPath, VelocityAdapter, VEPath, VPSDEPath
from fmconvert.evaluation.agreement import pf_ode_reference
from fmconvert.integration.configs import path_config
from fmconvert.math.solvers import solve

F64 = torch.float64


def converted_euler(unet, scheduler, sigmas, x_ve):
    """fmconvert's Euler on the converted field (float64 grid, as its sampler passes it) from
    the VE sample at sigmas[0] through every σ; returns the VE sample at the last σ."""
    adapter = VelocityAdapter.from_diffusion(unet, scheduler)
    sigmas = sigmas.to(F64)
    grid = sigmas / (1 + sigmas)
    with torch.no_grad():
        x_s = solve(lambda y, s: adapter.evaluate(y, 1000 * s), (x_ve.double() / (1 + sigmas[0])).float(), grid).x
    return x_s.double() * (1 + sigmas[-1])


def own_scheduler(unet, scheduler):
    """(initial VE sample, final sample) of the source's own scheduler loop, as its pipeline runs it."""
    x = noise() * scheduler.init_noise_sigma
    reference = x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(reference, t), t).sample
            reference = scheduler.step(out, t, reference).prev_sample
    return x, reference


@pytest.mark.threads(1)
def test_score_sde_ve_pf_ode_is_euler_on_the_converted_field():
    """NCSN++ layout (fourier time embedding: the UNet divides by σ, returning the score):
    PF-ODE dx/dσ = −σ·∇log p, Euler in σ down the scheduler's geometric sigmas, then to 0."""
    unet = make_unet(seed=5, time_embedding_type="fourier")
    scheduler = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=348.0, num_train_timesteps=2000)
    assert path_config(scheduler) == ({"kind": "ve", "sigma_min": 0.01, "sigma_max": 348.0}, "score")
    scheduler.set_timesteps(12)
    scheduler.set_sigmas(12)  # (without set_timesteps it keeps the 2000 of its constructor)
    sigmas = torch.cat([scheduler.sigmas.to(F64), torch.zeros(1, dtype=F64)])
    x = noise() * sigmas[0]
    reference = x.double()
    with torch.no_grad():
        for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
            score = unet(reference.float(), sigma.float().expand(x.shape[0])).sample.double()
            reference = reference + (nxt - sigma) * (-sigma * score)
    ours = converted_euler(unet, scheduler, sigmas, x)
    assert rel_max(ours, reference) <= 1e-5


@pytest.mark.threads(1)
def test_vp_sde_ddim_in_its_own_time_is_euler_on_the_converted_field():
    """ScoreSdeVpScheduler (continuous VP SDE, the network takes t ∈ [sampling_eps, 1] and returns ε):
    DDIM along the scheduler's own continuous times, x' = α(t')·x̂0 + σ(t')·ε̂ (Euler on its PF-ODE
    in σ/α), equals Euler on the converted field on s = σ/(α + σ)."""
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    unet = make_unet(seed=9)
    scheduler = ScoreSdeVpScheduler()
    scheduler.set_timesteps(12)
    adapter = VelocityAdapter.from_diffusion(unet, scheduler)
    t = scheduler.timesteps.to(F64)
    p = adapter.source_path.point(t)
    x = noise()
    reference = x.double()
    with torch.no_grad():
        for k in range(len(t) - 1):
            eps = unet(reference.float(), t[k].float().expand(x.shape[0])).sample.double()
            x0 = (reference - p.sigma[k] * eps) / p.alpha[k]
            reference = p.alpha[k + 1] * x0 + p.sigma[k + 1] * eps
        grid = p.sigma / (p.alpha + p.sigma)
        ours = solve(lambda y, s: adapter.evaluate(y, 1000 * s), (x.double() / (p.alpha[0] + p.sigma[0])).float(), grid).x
    assert rel_max(ours.double() * (p.alpha[-1] + p.sigma[-1]), reference) <= 1e-5


@pytest.mark.threads(1)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_euler_scheduler_is_euler_on_the_converted_field(prediction_type, sigma_data):
    """diffusers' EDMEulerScheduler (c_in, c_noise = ¼·log σ, c_skip, c_out) step for step."""
    unet = make_unet(seed=6)
    scheduler = EDMEulerScheduler(sigma_data=sigma_data, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    x, reference = own_scheduler(unet, scheduler)
    ours = converted_euler(unet, EDMEulerScheduler(sigma_data=sigma_data, prediction_type=prediction_type),
                           scheduler.sigmas, x)
    assert rel_max(ours, reference.double()) <= 1e-5


@pytest.mark.threads(1)
def test_continuous_euler_discrete_is_euler_on_the_converted_field():
    """EulerDiscreteScheduler(timestep_type="continuous", v_prediction) as CosXL configures it:
    the network takes ¼·log σ, over karras sigmas between the config's sigma_min and sigma_max."""
    unet = make_unet(seed=7)
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                  timestep_type="continuous", use_karras_sigmas=True, sigma_min=0.002, sigma_max=120.0)
    description, prediction = path_config({"_class_name": "EulerDiscreteScheduler", **config})
    assert description == {"kind": "edm", "sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0}
    assert prediction == "v_prediction"
    scheduler = EulerDiscreteScheduler(**config)
    scheduler.set_timesteps(10)
    assert torch.allclose(scheduler.timesteps.double(), 0.25 * scheduler.sigmas[:-1].double().log(), atol=1e-6)
    x, reference = own_scheduler(unet, scheduler)
    ours = converted_euler(unet, EulerDiscreteScheduler(**config), scheduler.sigmas, x)
    assert rel_max(ours, reference.double()) <= 1e-5


def test_continuous_sources_describe_their_paths():
    edm, prediction = path_config(EDMDPMSolverMultistepScheduler(sigma_data=0.5, prediction_type="epsilon"))
    assert edm == {"kind": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5} and prediction == "edm"
    # continuous Euler without sigma bounds: the beta schedule's σ range
    description, _ = path_config({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous",
                                  "prediction_type": "v_prediction", "beta_schedule": "scaled_linear",
                                  "beta_start": 0.00085, "beta_end": 0.012})
    from fmconvert.math.paths import path_from_config

    path = path_from_config(description)
    table = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).sigmas
    assert isinstance(path, EDMPath) and path.sigma_data == 1.0
    assert path.sigma_max == pytest.approx(float(table[0]), rel=1e-6)
    assert path.sigma_min == pytest.approx(float(table[-2]), rel=1e-6)
    # epsilon with timestep_type continuous: diffusers hands it integer timesteps; the discrete path
    discrete, _ = path_config({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"})
    assert discrete["kind"] == "discrete_vp"
    with pytest.raises(ValueError, match="EDM path"):
        VelocityAdapter.from_diffusion(make_unet(), {"_class_name": "DDIMScheduler"}, prediction_type="edm")


@pytest.mark.parametrize("scheduler", [ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=348.0),
                                       EDMEulerScheduler(sigma_data=0.5), {"_class_name": "ScoreSdeVpScheduler"}],
                         ids=["ve", "edm", "vp-sde"])
@pytest.mark.threads(1)
def test_converted_field_is_the_pf_ode_drift(scheduler):
    """The converted field against the PF-ODE drift f·x − ½g²·∇log p computed from the
    network's output in score form (agree's reference), across the trained range."""
    unet = make_unet(seed=8, **({"time_embedding_type": "fourier"} if isinstance(scheduler, ScoreSdeVeScheduler) else {}))
    adapter = VelocityAdapter.from_diffusion(unet, scheduler)
    assert isinstance(adapter.source_path, (VEPath, VPSDEPath))
    x = noise()
    for sigma in (0.02, 0.5, 3.0, 40.0):
        s = torch.full((2,), sigma / (1 + sigma), dtype=F64)
        with torch.no_grad():
            field = adapter.evaluate(x, 1000 * s, output_dtype=F64)
            drift = pf_ode_reference(adapter, x, s)
        assert rel_max(field, drift) <= 1e-5, sigma


# -- the replicas of real continuous-time repos, through wrap, stock diffusers and sample -------------------


@pytest.mark.parametrize("name", ["playground25", "cosxl"])
def test_converted_sdxl_reproduces_the_source_ode(name, tmp_path, tmp_path_factory):
    """playground-v2.5 (EDM, σ_d = 0.5) and CosXL (continuous Euler, v): the converted folder's
    stock StableDiffusionXLPipeline on the mapped sigmas, and `fmconvert sample --grid karras`,
    reproduce the source pipeline under its Euler ODE scheduler (EDMEulerScheduler for the
    DPM-Solver++ one playground ships; CosXL's own EulerDiscreteScheduler), on the same noise."""
    from conftest import ok
    from diffusers import DiffusionPipeline
    from replicas import one_thread
    from replicas_continuous import CONTINUOUS_REPLICAS, build_continuous_replica
    from test_families import SEED, STEPS, rel, sample

    replica = CONTINUOUS_REPLICAS[name]
    with one_thread():
        folder = build_continuous_replica(name, tmp_path_factory)
        out = tmp_path / "converted"
        ok("wrap", folder, "--out", out)
        noise_ = torch.randn((1, *replica.noise_shape), generator=torch.Generator().manual_seed(SEED))
        kwargs = dict(replica.call, output_type="latent")
        source = DiffusionPipeline.from_pretrained(folder)
        if name == "playground25":
            source.scheduler = EDMEulerScheduler.from_config(source.scheduler.config)
        reference = source(**kwargs, num_inference_steps=STEPS, latents=noise_.clone()).images
        sigmas = source.scheduler.sigmas.to(F64)
        converted = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        ours = converted(**kwargs, sigmas=(sigmas / (1 + sigmas))[:-1].tolist(), latents=noise_.clone()).images
        assert rel(ours, reference) < 1e-5
        samples, _ = sample(out, replica, tmp_path, "--solver", "euler", "--grid", "karras")
        assert rel(samples, reference) < 1e-5


def test_score_sde_ve_replica_converts_and_agrees(tmp_path, tmp_path_factory):
    """google/ncsnpp-celebahq-256's layout: wrap writes a DDPMPipeline that stock diffusers runs,
    and `fmconvert agree` measures the converted field against the PF-ODE drift to rounding."""
    import json

    from conftest import ok
    from diffusers import DiffusionPipeline
    from replicas import one_thread
    from replicas_continuous import build_continuous_replica

    with one_thread():
        folder = build_continuous_replica("ncsnpp_ve", tmp_path_factory)
        out = tmp_path / "converted"
        summary = json.loads(ok("wrap", folder, "--out", out, "--json").stdout)
        assert summary["pipeline_class"] == "DDPMPipeline" and summary["loaded"]["prediction_type"] == "score"
        pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        images = pipe(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert images.shape[-1] == 3 and bool(torch.isfinite(torch.from_numpy(images)).all())
        report = json.loads(ok("agree", folder, "--num-points", 8, "--num-times", 5, "--json").stdout)
        assert max(report["field"]["float32"]["relative_l2"]) < 1e-5
        assert "trajectories" not in report  # (its rows compare with DDIM: a discrete schedule's)


def test_vp_sde_model_folder_converts_and_agrees(tmp_path):
    """A continuous-time VP score model (score_sde's DDPM++ cont. VP, as ScoreSdeVpScheduler describes it: β(t)
    linear from 0.1 to 20, t ∈ [1e-3, 1], 2000 training steps, network output ε). diffusers has no pipeline
    for it, so it is a bare model folder with its scheduler_config.json beside: wrap writes a DDPMPipeline that
    stock diffusers runs, and `fmconvert agree` measures the converted field against the PF-ODE drift."""
    import json

    from conftest import ok
    from diffusers import DiffusionPipeline
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler
    from replicas import one_thread

    with one_thread():
        folder = tmp_path / "vp-sde"
        make_unet(seed=10).save_pretrained(folder)
        ScoreSdeVpScheduler(num_train_timesteps=2000, beta_min=0.1, beta_max=20.0, sampling_eps=1e-3).save_config(folder)
        out = tmp_path / "converted"
        summary = json.loads(ok("wrap", folder, "--out", out, "--json").stdout)
        assert summary["pipeline_class"] == "DDPMPipeline" and summary["loaded"]["path"]["kind"] == "vp_sde"
        pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        images = pipe(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert bool(torch.isfinite(torch.from_numpy(images)).all())
        report = json.loads(ok("agree", folder, "--num-points", 8, "--num-times", 5, "--json").stdout)
        assert max(report["field"]["float32"]["relative_l2"]) < 1e-5


@pytest.mark.parametrize("scheduler", [ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=348.0),
                                       EDMEulerScheduler(sigma_data=0.5),
                                       EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction",
                                                              use_karras_sigmas=True, sigma_min=0.002, sigma_max=120.0),
                                       {"_class_name": "ScoreSdeVpScheduler"}],
                         ids=["ve", "edm", "continuous-euler", "vp-sde"])
@pytest.mark.threads(1)
def test_converted_continuous_sources_are_finite_at_both_ends(scheduler):
    """s = 1 (pure noise, λ = −∞) and s = 0 lie beyond every continuous source's trained range: the
    endpoint policy gives finite velocities there. (The VP SDE's time at λ = −∞ was ∞/∞ = NaN before.)"""
    unet = make_unet(seed=8, **({"time_embedding_type": "fourier"} if isinstance(scheduler, ScoreSdeVeScheduler) else {}))
    adapter = VelocityAdapter.from_diffusion(unet, scheduler)
    x = noise()
    with torch.no_grad():
        for s in (1.0, 0.0):
            assert bool(torch.isfinite(adapter(x, torch.tensor([1000 * s])).sample).all()), s
