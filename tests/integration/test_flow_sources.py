"""Flow-matching transformer sources: Stable Diffusion 3 (timestep 1000·s) and FLUX.1 dev and schnell
(latents packed in 2×2 patches, timestep s, a guidance embedding on dev, a dynamic shift). `fmconvert
sample` drives them with the family's conditioning and reproduces the source pipeline's own __call__
(FlowMatchEulerDiscreteScheduler) on its `flowmatch` grid; the Python API hands FLUX's network s."""

import pytest
import torch
from conftest import error
from diffusers import DiffusionPipeline, FluxPipeline
from replicas import one_thread
from replicas_continuous import CONTINUOUS_REPLICAS, build_continuous_replica
from test_families import SEED, STEPS, rel, sample

from fmconvert import DiffusionAdapter, RectifiedFlow
from fmconvert.integration.configs import path_config

F64 = torch.float64


def source_latents(pipe, replica):
    """The source pipeline's own __call__ on the seeded noise: its final latents, unpacked (C, h, w)."""
    kwargs = dict(replica.call, num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(SEED))
    if replica.noise_arg:
        kwargs[replica.noise_arg] = torch.randn((1, *replica.noise_shape), generator=torch.Generator().manual_seed(SEED))
    latents = pipe(**kwargs).images
    if isinstance(pipe, FluxPipeline):
        latents = FluxPipeline._unpack_latents(latents, replica.call["height"], replica.call["width"],
                                               pipe.vae_scale_factor)
    return latents


@pytest.mark.parametrize("name", ["sd3", "flux_dev", "flux_schnell"])
def test_sample_reproduces_the_flow_pipeline(name, tmp_path, tmp_path_factory):
    replica = CONTINUOUS_REPLICAS[name]
    with one_thread():
        folder = build_continuous_replica(name, tmp_path_factory)
        reference = source_latents(DiffusionPipeline.from_pretrained(folder), replica)
        samples, images = sample(folder, replica, tmp_path, "--solver", "euler", "--grid", "flowmatch")
        assert samples.shape == reference.shape and rel(samples, reference) < 1e-5
        assert images.shape[1] == 3 and bool(torch.isfinite(images).all())


def test_flux_options_it_cannot_honour_are_refused(tmp_path, tmp_path_factory):
    with one_thread():
        schnell = build_continuous_replica("flux_schnell", tmp_path_factory)
        assert "guidance" in error(2, "sample", schnell, "--prompt", "x", "--guidance-scale", 3, "--steps", 1)
        assert "--negative-prompt" in error(2, "sample", schnell, "--prompt", "x", "--negative-prompt", "y",
                                            "--steps", 1)
        assert "multiples of 4" in error(2, "sample", schnell, "--prompt", "x", "--height", 18, "--steps", 1)  # (VAE: 2×)


def test_flux_network_is_handed_s_through_the_python_api(tmp_path_factory):
    """DiffusionAdapter.from_flow on FLUX's transformer: the network gets s (its pipeline divides
    1000·s by 1000), so ε̂ = x_s + (1 − s)·u(x_s, s) at the mapped point (it was handed 1000·s); the
    adapter takes t / 1000 for the same reason."""
    with one_thread():
        pipe = DiffusionPipeline.from_pretrained(build_continuous_replica("flux_dev", tmp_path_factory))
        transformer = pipe.transformer
        back = DiffusionAdapter.from_flow(transformer, "epsilon", flow_scheduler=pipe.scheduler)
        assert back.source_path.to_config()["timestep_scale"] == 1.0 and back.target_path.to_config()["timestep_scale"] == 1e-3
        assert path_config(pipe.scheduler)[0].get("timestep_scale") is None  # (the scheduler alone cannot tell)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 8, 8, generator=g)
        kwargs = {"encoder_hidden_states": torch.randn(1, 4, transformer.config.joint_attention_dim, generator=g),
                  "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim, generator=g),
                  "txt_ids": torch.zeros(4, 3), "img_ids": pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                  "guidance": torch.full([1], 3.5)}
        t = torch.tensor([600])
        with torch.no_grad():
            eps = back(x, t.float() / 1000, **kwargs).sample.double()
            p = back.target_path.point(t.double())
            s = RectifiedFlow().time_at_log_snr(back.target_path.log_snr(t.double()))
            x_s = (x.double() / (p.alpha + p.sigma)).float()
            packed = FluxPipeline._pack_latents(x_s, 1, 16, 8, 8)
            u = transformer(hidden_states=packed, timestep=s.float(), **kwargs, return_dict=False)[0]
            u = FluxPipeline._unpack_latents(u, 8, 8, 1).double()
        expected = x_s.double() + (1 - s) * u
        assert rel(eps, expected) < 1e-5


@pytest.mark.parametrize("to", ["epsilon", "v_prediction"])
def test_sd3_converted_back_runs_ddim_in_its_own_pipeline(to, tmp_path, tmp_path_factory):
    """`wrap --to epsilon|v_prediction` keeps StableDiffusion3Pipeline with DDIMScheduler (trailing) and a
    DiffusionAdapter: the stock __call__ with DDIM equals the source pipeline under FlowMatchEulerDiscreteScheduler
    on the mapped grid s(t_k) (shift 1: the grid is given as it is), on the same noise mapped to the flow path;
    so does FlowPipelineEulerDiscreteScheduler; DPMSolverMultistepScheduler runs in it too."""
    import json

    from conftest import ok
    from diffusers import DPMSolverMultistepScheduler

    from fmconvert import FlowPipelineEulerDiscreteScheduler

    replica = CONTINUOUS_REPLICAS["sd3"]
    with one_thread():
        folder = build_continuous_replica("sd3", tmp_path_factory)
        out = tmp_path / "back"
        summary = json.loads(ok("wrap", folder, "--out", out, "--to", to, "--json").stdout)
        assert summary["pipeline_class"] == "StableDiffusion3Pipeline" and summary["scheduler"] == "DDIMScheduler"
        converted = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        noise = torch.randn((1, *replica.noise_shape), generator=torch.Generator().manual_seed(SEED))
        kwargs = dict(replica.call, output_type="latent", num_inference_steps=STEPS)
        ours = converted(**kwargs, latents=noise.clone()).images
        ddim = converted.scheduler
        reference = flow_match_reference(folder, converted, kwargs, noise)
        assert rel(ours, reference) < 1e-5
        # SD3's pipeline neither scales its noise nor calls scale_model_input: Euler through fmconvert's class.
        # (v_prediction's default cosine schedule has σ_max = 2e4: Euler's float32 variable x·√(σ² + 1) then
        # keeps 3 digits, 2.9e-4 measured, as stock Euler does in any pipeline; DDIM has no such variable)
        converted.scheduler = FlowPipelineEulerDiscreteScheduler.from_config(ddim.config)
        euler = converted(**kwargs, latents=noise.clone()).images
        assert rel(euler, reference) < (1e-5 if to == "epsilon" else 1e-3)
        converted.scheduler = DPMSolverMultistepScheduler.from_config(ddim.config)
        assert bool(torch.isfinite(converted(**kwargs, latents=noise.clone()).images).all())


def flow_match_reference(folder, converted, kwargs, noise):
    """The source pipeline under FlowMatchEulerDiscreteScheduler (no shift) on the grid s(t_k) that the
    converted pipeline's DDIM steps through, from the same noise mapped to the flow path."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    p = converted.transformer.target_path.point(converted.scheduler.timesteps.to(F64))
    grid = (p.sigma / (p.alpha + p.sigma)).tolist()
    source = DiffusionPipeline.from_pretrained(folder)
    source.scheduler = FlowMatchEulerDiscreteScheduler.from_config(source.scheduler.config, shift=1.0,
                                                                   use_dynamic_shifting=False)
    start = (noise.double() / (p.alpha[0] + p.sigma[0])).float()
    return source(**{k: v for k, v in kwargs.items() if k != "num_inference_steps"}, sigmas=grid, latents=start).images


@pytest.mark.parametrize("name,to,schedule", [("flux_dev", "epsilon", None), ("flux_schnell", "v_prediction",
                                                                              "scaled_linear")])
def test_flux_converted_back_runs_discrete_schedulers_in_its_own_pipeline(name, to, schedule, tmp_path,
                                                                          tmp_path_factory):
    """`wrap --to epsilon|v_prediction` on FLUX.1 keeps FluxPipeline, whose __call__ hands every scheduler
    flow sigmas and mu and the network timestep / 1000: the folder steps fmconvert's FlowPipelineDDIMScheduler
    (the stock loader finds it through the shim) and the adapter takes t / 1000. DDIM equals the source's
    FlowMatchEulerDiscreteScheduler on the mapped grid; so does FlowPipelineEulerDiscreteScheduler (Euler on
    the PF-ODE in σ, with the pipeline's unscaled latents); DPM-Solver++ runs; `fmconvert sample` of the folder
    equals its pipeline's DDIM; custom flow sigmas are refused. (Before: --to epsilon was refused.)"""
    import json

    from conftest import ok

    from fmconvert import FlowPipelineDPMSolverMultistepScheduler, FlowPipelineEulerDiscreteScheduler

    replica = CONTINUOUS_REPLICAS[name]
    with one_thread():
        folder = build_continuous_replica(name, tmp_path_factory)
        out = tmp_path / "back"
        summary = json.loads(ok("wrap", folder, "--out", out, "--to", to, *(("--schedule", schedule) if schedule else ()),
                                "--json").stdout)
        assert (summary["pipeline_class"], summary["scheduler"]) == ("FluxPipeline", "FlowPipelineDDIMScheduler")
        converted = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        assert type(converted.scheduler).__name__ == "FlowPipelineDDIMScheduler"
        assert converted.transformer.target_path.to_config()["timestep_scale"] == 1e-3
        noise = FluxPipeline._pack_latents(torch.randn((1, *replica.noise_shape), generator=torch.Generator().manual_seed(SEED)),
                                           1, *replica.noise_shape)
        kwargs = dict(replica.call, output_type="latent", num_inference_steps=STEPS)
        ddim = converted(**kwargs, latents=noise.clone()).images
        reference = flow_match_reference(folder, converted, kwargs, noise)
        assert rel(ddim, reference) < 1e-5
        ddim_scheduler, ddim_config = converted.scheduler, converted.scheduler.config
        converted.scheduler = FlowPipelineEulerDiscreteScheduler.from_config(ddim_config)
        assert rel(converted(**kwargs, latents=noise.clone()).images, reference) < 1e-5
        converted.scheduler = FlowPipelineDPMSolverMultistepScheduler.from_config(ddim_config)
        assert bool(torch.isfinite(converted(**kwargs, latents=noise.clone()).images).all())
        with pytest.raises(ValueError, match="custom flow sigmas"):
            converted(**{k: v for k, v in kwargs.items() if k != "num_inference_steps"}, sigmas=[1.0, 0.3])
        converted.scheduler = ddim_scheduler
        own = source_latents(converted, replica)
        samples, _ = sample(out, replica, tmp_path, "--solver", "euler", "--grid", "trailing")
        assert rel(samples, own) < 1e-5


def test_discrete_schedule_takes_the_timestep_its_pipeline_hands_over():
    """FLUX's pipeline divides the scheduler's timestep by 1000: a converted network's discrete schedule
    takes t / 1000 and snaps it back to the integer t it was rounded from (in float32 and bfloat16); the
    description round-trips; a path with no timestep form under that rule is refused."""
    from fmconvert.integration.families import family_timestep_path
    from fmconvert.math.paths import DiscreteVPSchedule, path_from_config

    described = family_timestep_path({"kind": "discrete_vp", "beta_schedule": "linear"}, "FluxTransformer2DModel")
    path = path_from_config(described)
    assert path.to_config() == described and described["timestep_scale"] == 1e-3
    t = torch.arange(1000)
    for dtype in (torch.float32, torch.bfloat16):
        handed = t.to(dtype) / 1000  # as FluxPipeline computes it
        back = path.time_from_model_timestep(handed)
        if dtype == torch.float32:
            assert torch.equal(back, t.to(F64))
        assert bool(((back - t).abs() <= 8 * torch.finfo(dtype).eps * t.clamp_min(1)).all())
    assert float(path.time_from_model_timestep(torch.tensor([0.4995]))) == pytest.approx(499.5, abs=1e-4)  # (between)
    assert torch.equal(path.model_timestep(t.double()), t.float() * 1e-3)
    table = DiscreteVPSchedule(path.alphas_cumprod, timestep_scale=1e-3)
    assert path_from_config(table.to_config()).timestep_scale == 1e-3
    assert family_timestep_path({"kind": "discrete_vp"}, "UNet2DConditionModel") == {"kind": "discrete_vp"}
    with pytest.raises(ValueError, match="no timestep form"):
        family_timestep_path({"kind": "ve", "sigma_min": 0.01, "sigma_max": 50.0}, "FluxTransformer2DModel")
