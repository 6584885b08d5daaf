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
from fmconvert.configs import path_config

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
    1000·s by 1000), so ε̂ = x_s + (1 − s)·u(x_s, s) at the mapped point (it was handed 1000·s)."""
    with one_thread():
        pipe = DiffusionPipeline.from_pretrained(build_continuous_replica("flux_dev", tmp_path_factory))
        transformer = pipe.transformer
        back = DiffusionAdapter.from_flow(transformer, "epsilon", flow_scheduler=pipe.scheduler)
        assert back.source.to_config()["timestep_scale"] == 1.0
        assert path_config(pipe.scheduler)[0].get("timestep_scale") is None  # (the scheduler alone cannot tell)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 8, 8, generator=g)
        kwargs = {"encoder_hidden_states": torch.randn(1, 4, transformer.config.joint_attention_dim, generator=g),
                  "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim, generator=g),
                  "txt_ids": torch.zeros(4, 3), "img_ids": pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                  "guidance": torch.full([1], 3.5)}
        t = torch.tensor([600])
        with torch.no_grad():
            eps = back(x, t, **kwargs).sample.double()
            p = back.target.point(t.double())
            s = RectifiedFlow().time_at_log_snr(back.target.log_snr(t.double()))
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
    DPMSolverMultistepScheduler runs in it too."""
    import json

    from conftest import ok
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

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
        target = converted.transformer.target
        p = target.point(ddim.timesteps.to(F64))
        grid = (p.sigma / (p.alpha + p.sigma)).tolist()
        source = DiffusionPipeline.from_pretrained(folder)
        source.scheduler = FlowMatchEulerDiscreteScheduler.from_config(source.scheduler.config, shift=1.0)
        start = (noise.double() / (p.alpha[0] + p.sigma[0])).float()
        reference = source(**{k: v for k, v in kwargs.items() if k != "num_inference_steps"}, sigmas=grid,
                           latents=start).images
        assert rel(ours, reference) < 1e-5
        converted.scheduler = DPMSolverMultistepScheduler.from_config(converted.scheduler.config)
        assert bool(torch.isfinite(converted(**kwargs, latents=noise.clone()).images).all())


def test_flux_back_conversion_is_refused_in_one_line(tmp_path, tmp_path_factory):
    with one_thread():
        folder = build_continuous_replica("flux_schnell", tmp_path_factory)
        assert "flow-only arguments" in error(1, "wrap", folder, "--out", tmp_path / "o", "--to", "epsilon")
        assert "not supported yet" in error(2, "wrap", folder, "--out", tmp_path / "o")
        assert not (tmp_path / "o").exists()
