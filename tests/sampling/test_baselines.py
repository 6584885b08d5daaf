"""--baseline: any diffusers scheduler the source's config can build, by alias or class name, with
options, several in one fid sweep, NFE counted from the network calls."""

import json

import pytest
import torch
from conftest import error, ok

from fmconvert.errors import UsageError
from fmconvert.sampling.baselines import BASELINES, build_scheduler, parse_baseline
from fmconvert.sampling.generate import iter_baseline
from fmconvert.sampling.model import load_velocity_model

STEPS = 3


def _calls(vm):
    """Count the network's forward calls (the NFE a baseline reports must be this count)."""
    count = {"n": 0}
    vm.velocity.model.register_forward_pre_hook(lambda module, args: count.update(n=count["n"] + 1))
    return count


@pytest.mark.threads(1)
@pytest.mark.parametrize("alias", [name for name in BASELINES if name != "dpm++2m-sde"] + ["dpm++2m-sde"])
def test_every_alias_builds_samples_and_counts_its_evaluations(alias, ddpm_folder):
    vm = load_velocity_model(str(ddpm_folder))
    count = _calls(vm)
    (x, images, nfe), = list(iter_baseline(vm, 2, 2, 0, STEPS, "cpu", alias))
    assert bool(torch.isfinite(x).all()) and images.shape[0] == 2
    assert nfe == count["n"] >= STEPS  # (heun: 2 per step but the last; counted, not assumed)
    scheduler = build_scheduler(alias, vm.source)
    expected = BASELINES[alias].scheduler_class or "DDPMScheduler"  # default: the source's own
    assert type(scheduler).__name__ == expected
    for key, value in BASELINES[alias].options:
        assert scheduler.config[key] == value, key


def test_options_class_names_and_refusals(ddpm_folder, flow_folder):
    vm = load_velocity_model(str(ddpm_folder))
    karras = build_scheduler("dpm++2m:use_karras_sigmas=true,timestep_spacing=\"trailing\"", vm.source)
    assert karras.config.use_karras_sigmas is True and karras.config.timestep_spacing == "trailing"
    assert parse_baseline("KDPM2DiscreteScheduler")[0].scheduler_class == "KDPM2DiscreteScheduler"
    with pytest.raises(UsageError, match="unknown baseline='dpm\\+\\+9m'"):
        parse_baseline("dpm++9m")
    with pytest.raises(UsageError, match="takes no option 'karras'"):
        build_scheduler("euler:karras=true", vm.source)
    with pytest.raises(UsageError, match="key=value"):
        parse_baseline("euler:karras")
    flow = load_velocity_model(str(flow_folder))
    assert build_scheduler("unipc", flow.source).config.use_flow_sigmas is True
    assert type(build_scheduler("default", flow.source)).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(UsageError, match="has no flow mode"):
        build_scheduler("ddim", flow.source)
    for spec in ("dpm++2m", "default"):  # (FlowMatchEuler has no init_noise_sigma or scale_model_input)
        (x, _, nfe), = list(iter_baseline(flow, 2, 2, 0, STEPS, "cpu", spec))
        assert nfe == STEPS and bool(torch.isfinite(x).all())


def test_fid_sweeps_several_baselines_with_options(tmp_path, ddpm_folder):
    """Each baseline spec is its own run (recorded with its options, its own samples folder); 'FID vs
    baseline' compares with the first one listed."""
    result = json.loads(ok("fid", ddpm_folder, "--reference", "builtin:digits", "--steps", 2, "--num-images", 4,
                           "--batch-size", 2, "--baseline", "ddim", "--baseline", "dpm++2m:use_karras_sigmas=true",
                           "--samples-dir", tmp_path / "s", "--json").stdout)
    baselines = [row for row in result["rows"] if row["baseline"]]
    assert [row["sampler"] for row in baselines] == ["ddim", "dpm++2m:use_karras_sigmas=true"]
    assert all(row["nfe"] == 2 for row in baselines)
    assert "fid_vs_baseline" in next(row for row in result["rows"] if not row["baseline"])
    assert len(list((tmp_path / "s").iterdir())) == 3
    assert "one --baseline" in error(2, "sample", ddpm_folder, "--baseline", "ddim", "--baseline", "unipc", "--steps", 2)


# -- diffusers' multistep schedulers in flow mode, exact on a converted model ---------------------------


@pytest.mark.parametrize("name,options", [("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
                                          ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
                                          ("UniPCMultistepScheduler", {"solver_order": 2})])
@pytest.mark.threads(1)
@pytest.mark.parametrize("steps", [5, 8])
def test_multistep_solvers_are_invariant_under_the_change_of_path(name, options, steps):
    """DPM-Solver++ (and UniPC) in data prediction depend only on λ and x/α: diffusers' scheduler on the
    source epsilon network equals the same scheduler in flow mode, through fmconvert's Flow* shim (float
    timesteps 1000·s), on the converted field with the source's sigmas mapped (s = σ/(α + σ)), from the same
    noise mapped to the flow path. Measured 4.8e-7 … 8.9e-7; the stock flow mode hands floor(1000·s)."""
    import diffusers
    from conftest import make_unet
    from diffusers import DDPMScheduler

    from fmconvert import VelocityAdapter
    from fmconvert.integration import schedulers

    unet = make_unet(seed=3)
    config = dict(DDPMScheduler().config)
    adapter = VelocityAdapter.from_diffusion(unet, config)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    source = getattr(diffusers, name).from_config(config, timestep_spacing="trailing", **options)
    source.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in source.timesteps:
            x = source.step(unet(x, t).sample, t, x).prev_sample
    p = adapter.source_path.point(source.timesteps.to(torch.float64))
    shim = getattr(schedulers, "Flow" + name).from_config({"num_train_timesteps": 1000, "shift": 1.0}, **options)
    shim.set_timesteps(sigmas=(p.sigma / (p.alpha + p.sigma)).tolist())
    assert shim.timesteps.dtype == torch.float32 and not torch.equal(shim.timesteps, shim.timesteps.round())
    y = (x_T.double() / (p.alpha[0] + p.sigma[0])).float()
    with torch.no_grad():
        for t in shim.timesteps:
            y = shim.step(adapter(y, t.expand(2)).sample, t, y).prev_sample
    assert float((y.double() - x.double()).norm() / x.double().norm()) < 1e-5


@pytest.mark.parametrize("shim", ["FlowDPMSolverMultistepScheduler", "FlowUniPCMultistepScheduler",
                                  "FlowDEISMultistepScheduler"])
@pytest.mark.threads(1)
def test_flow_shims_drive_a_converted_pipeline_with_float_timesteps(shim, tmp_path, ddpm_folder):
    """Swapped into a converted folder's stock pipeline from its scheduler config: flow mode, the network
    handed 1000·s as float (the stock classes' int64 floor(1000·s) is not the s they step at); mu and custom
    timesteps are refused in one line."""
    from diffusers import DiffusionPipeline

    from fmconvert.integration import schedulers

    ok("wrap", ddpm_folder, "--out", tmp_path / "v")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "v", trust_remote_code=True)
    pipe.scheduler = getattr(schedulers, shim).from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.prediction_type == "flow_prediction"
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("timestep", args[1] if len(args) > 1 else None)),
                                        with_kwargs=True)
    images = pipe(num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert bool(torch.isfinite(torch.from_numpy(images)).all()) and len(seen) == 4
    assert all(torch.as_tensor(t).is_floating_point() for t in seen)
    assert float(torch.as_tensor(seen[0]).flatten()[0]) == pytest.approx(1000 * float(pipe.scheduler.sigmas[0]), rel=1e-6)
    with pytest.raises(ValueError, match="mu"):
        pipe.scheduler.set_timesteps(4, mu=0.5)


def test_a_live_schedulers_config_keeps_the_aliass_settings(ddpm_folder):
    """A source read from a live scheduler's config carries diffusers' ``_use_default_values`` (the keys
    it left at their defaults); from_config resets those keys, so ddim's trailing spacing was silently
    dropped for such a source: ddim then stepped on leading timesteps."""
    import dataclasses

    from diffusers import DDPMScheduler

    from fmconvert.integration.configs import scheduler_config
    from fmconvert.integration.source import inspect_source

    source = inspect_source(str(ddpm_folder))
    live = {**DDPMScheduler.from_config({"num_train_timesteps": 1000}).config, "_class_name": "DDPMScheduler"}
    assert "timestep_spacing" in live["_use_default_values"]  # (what makes the case)
    as_saved = {k: v for k, v in live.items() if k != "_use_default_values"}  # (save_config drops it)
    expected = build_scheduler("ddim", dataclasses.replace(source, scheduler=as_saved))
    expected.set_timesteps(4)
    assert expected.config.timestep_spacing == "trailing"
    for config in (live, scheduler_config(DDPMScheduler.from_config(live))):
        scheduler = build_scheduler("ddim", dataclasses.replace(source, scheduler=config))
        scheduler.set_timesteps(4)
        assert scheduler.config.timestep_spacing == "trailing"
        assert scheduler.timesteps.tolist() == expected.timesteps.tolist()
