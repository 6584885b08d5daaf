"""`fmconvert wrap` and `fmconvert sample` through typer's CliRunner and stock diffusers."""

import json
import os
import shutil

import pytest
import torch
from conftest import save_ddpm_folder
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel
from safetensors.torch import load_file
from typer.testing import CliRunner

import fmconvert
from fmconvert.cli import app
from fmconvert.math.paths import RectifiedFlow

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output + result.stderr
    return result


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def ddim_reference(folder, steps, noise, dtype=torch.float32):
    """diffusers' own DDIMScheduler (trailing, no clipping, alpha one) on the source UNet; in
    float64, network and scheduler arithmetic both run in float64 (from the same alphas)."""
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval().to(dtype)
    config = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").config
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(dtype)
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(dtype)
    x = noise.clone().to(dtype)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


# -- wrap -> stock diffusers ------------------------------------------------------------------


def test_wrap_unconditional_loads_and_samples_with_stock_diffusers(tmp_path, ddpm_folder):
    out = tmp_path / "velocity"
    result = ok("wrap", ddpm_folder, "--out", out, "--json")
    summary = json.loads(result.stdout)
    assert summary["adapter"] == "VelocityAdapter" and summary["loaded"]["prediction_type"] == "epsilon"
    assert summary["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    files = sorted(os.listdir(out / "unet"))
    assert files == ["config.json", "fmconvert_adapter.py", "network"]  # the source network itself in network/
    assert sorted(os.listdir(out / "unet" / "network")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not any(name.endswith((".bin", ".pt", ".ckpt")) for _, _, fs in os.walk(out) for name in fs)
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "- flow-matching" in card and "- epsilon" in card

    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.unet).__name__ == "VelocityAdapter"
    images = pipe(batch_size=3, num_inference_steps=8, generator=torch.Generator().manual_seed(3), output_type="pt").images
    # the pipeline's own __call__ equals fmconvert's Euler on the scheduler's default grid, same noise
    sampled = ok("sample", out, "--grid", "flowmatch", "--steps", 8, "--num-images", 3, "--seed", 3,
                 "--save-tensor", tmp_path / "s.safetensors", "--json")
    samples = load_file(tmp_path / "s.safetensors")["samples"]
    assert rel((samples / 2 + 0.5).clamp(0, 1), images) < 1e-5
    assert json.loads(sampled.stdout)["nfe"] == 8

    again = fmconvert.load(out)
    assert type(again.unet).__name__ == "VelocityAdapter"
    images2 = again(batch_size=3, num_inference_steps=8, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.equal(images, images2)


def test_wrap_text_conditioned_pipeline_reproduces_ddim_through_stock_diffusers(tmp_path, sd_folder):
    """The converted StableDiffusionPipeline, driven with the DDIM grid as sigmas, equals the
    source pipeline with DDIMScheduler(trailing) — guidance, VAE decode and all."""
    out = tmp_path / "sd-velocity"
    ok("wrap", sd_folder, "--out", out)
    converted = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(converted.scheduler).__name__ == "FlowMatchEulerScheduler"
    source = DiffusionPipeline.from_pretrained(sd_folder)
    source.scheduler = DDIMScheduler.from_config(source.scheduler.config, timestep_spacing="trailing",
                                                 clip_sample=False, set_alpha_to_one=True)
    steps = 10
    source.scheduler.set_timesteps(steps)
    schedule = converted.unet.source_path
    sigmas = RectifiedFlow().time_at_log_snr(schedule.log_snr(source.scheduler.timesteps.double()))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    common = dict(prompt="a red circle", guidance_scale=4.0, output_type="pt")
    reference = source(num_inference_steps=steps, latents=eps, **common).images
    # the same noise: the scheduler keeps DDIM's variance-preserving scaling of the latents
    ours = converted(sigmas=sigmas.tolist(), latents=eps, **common).images
    assert rel(ours, reference) < 1e-5
    # and fmconvert's own sampler runs the text path (prompt, guidance, VAE decode)
    result = ok("sample", out, "--prompt", "a red circle", "--guidance-scale", 4, "--steps", 4, "--num-images", 2,
                "--out", tmp_path / "grid.png", "--json")
    assert json.loads(result.stdout)["outputs"]["images"].endswith("grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_identity_through_the_cli(tmp_path, ddpm_folder, steps):
    noise = torch.randn((4, 3, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    reference = ddim_reference(ddpm_folder, steps, noise)
    out = tmp_path / "converted"
    ok("wrap", ddpm_folder, "--out", out)
    for model in (ddpm_folder, out):  # on the fly, and the written folder
        ok("sample", model, "--solver", "euler", "--grid", "trailing", "--steps", steps, "--num-images", 4,
           "--batch-size", 3, "--seed", 7, "--save-tensor", tmp_path / "x.safetensors")
        assert rel(load_file(tmp_path / "x.safetensors")["samples"], reference) <= 1e-5


@pytest.mark.threads(2)
@pytest.mark.parametrize("steps", [10, 50])
def test_float32_combination_is_as_exact_as_float64(ddpm_folder, steps):
    """`fmconvert sample` applies the (float64-planned) conversion of a float32 network in
    float32: measured against DDIM run wholly in float64, it is no further off than the
    float64 combination, and closer than diffusers' own float32 DDIM. Both combinations run the
    float32 network, whose rounding depends on the thread count, and the errors are about one
    float32 ulp of the samples, so the test pins the threads: at 10 steps, with 2 threads float32
    2.83e-7, float64 2.83e-7; with 1 thread float32 2.83e-7, float64 1.75e-7 (ratio 1.6)."""
    from fmconvert.integration.source import load_denoiser
    from fmconvert.sampling.generate import generate
    from fmconvert.sampling.model import VelocityModel, as_velocity, load_velocity_model

    noise = torch.randn((4, 3, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    truth = ddim_reference(ddpm_folder, steps, noise, torch.float64)
    fast = load_velocity_model(str(ddpm_folder))
    assert fast.velocity.config.compute_dtype == "float32"
    wide, grid_source = as_velocity(load_denoiser(fast.source, None, False, False), fast.source, "float64")
    wide = VelocityModel(wide.eval(), grid_source, fast.source)
    error = {name: rel(generate(vm, 4, 4, 7, "euler", "trailing", steps).samples, truth)
             for name, vm in (("float32", fast), ("float64", wide))}
    assert error["float32"] <= 1.5 * error["float64"]
    assert error["float32"] < rel(ddim_reference(ddpm_folder, steps, noise), truth)


@pytest.mark.parametrize("to", ["epsilon", "v_prediction"])
def test_to_diffusion_round_trip_through_stock_diffusers(tmp_path, flow_folder, to):
    """A flow model written as an epsilon / v DDPMPipeline: its own __call__ (DDIM) equals
    fmconvert's Euler on the trailing grid of the same schedule."""
    out = tmp_path / "eps"
    summary = json.loads(ok("wrap", flow_folder, "--out", out, "--to", to, "--json").stdout)
    assert summary["adapter"] == "DiffusionAdapter" and summary["scheduler"] == "DDIMScheduler"
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    images = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(1), output_type="pt").images
    ok("sample", out, "--grid", "trailing", "--steps", 10, "--num-images", 2, "--seed", 1,
       "--save-tensor", tmp_path / "x.safetensors")
    samples = load_file(tmp_path / "x.safetensors")["samples"]
    assert rel((samples / 2 + 0.5).clamp(0, 1), images) < 1e-5


def test_samples_do_not_depend_on_batch_size(tmp_path, ddpm_folder):
    for batch in (1, 4):
        ok("sample", ddpm_folder, "--steps", 5, "--num-images", 4, "--batch-size", batch, "--solver", "heun",
           "--save-tensor", tmp_path / f"b{batch}.safetensors")
    a, b = (load_file(tmp_path / f"b{k}.safetensors")["samples"] for k in (1, 4))
    assert rel(a, b) < 1e-6


@pytest.mark.parametrize("solver, per_step", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4), ("ab2", 1)])
def test_sample_solvers_report_counted_nfe(tmp_path, ddpm_folder, solver, per_step):
    result = json.loads(ok("sample", ddpm_folder, "--solver", solver, "--grid", "karras", "--steps", 3,
                           "--num-images", 1, "--json").stdout)
    assert result["nfe"] == 3 * per_step - (1 if solver == "heun" else 0)
    assert result["grid"] == "karras" and result["loaded"]["model_class"] == "UNet2DModel"


def test_sample_writes_a_folder_of_pngs(tmp_path, ddpm_folder):
    ok("sample", ddpm_folder, "--steps", 2, "--num-images", 3, "--out", tmp_path / "pngs")
    assert sorted(os.listdir(tmp_path / "pngs")) == ["000000.png", "000001.png", "000002.png"]
    assert run("sample", ddpm_folder, "--steps", 2, "--num-images", 3, "--out", tmp_path / "pngs").exit_code == 2


# -- atomic writes --------------------------------------------------------------------------


def test_wrap_is_atomic_after_an_injected_failure(tmp_path, ddpm_folder, monkeypatch):
    import fmconvert.integration.folder as writing

    def broken(*args, **kwargs):
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(writing, "_model_card", broken)
    out = tmp_path / "out"
    result = run("wrap", ddpm_folder, "--out", out)
    assert result.exit_code == 1 and "disk full" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and os.listdir(tmp_path) == []
    # with --force over an existing folder, a failure keeps the old one
    monkeypatch.undo()
    ok("wrap", ddpm_folder, "--out", out)
    before = sorted(os.listdir(out))
    monkeypatch.setattr(writing, "_model_card", broken)
    assert run("wrap", ddpm_folder, "--out", out, "--force").exit_code == 1
    assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ["out"]


def test_existing_output_needs_force(tmp_path, ddpm_folder):
    out = tmp_path / "out"
    ok("wrap", ddpm_folder, "--out", out)
    result = run("wrap", ddpm_folder, "--out", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    ok("wrap", ddpm_folder, "--out", out, "--force")


# -- errors ---------------------------------------------------------------------------------


def one_line_error(result, code, *words):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_mistyped_local_path_is_not_blamed_on_the_network(tmp_path):
    line = one_line_error(run("wrap", "./no/such/model", "--out", tmp_path / "o"), 2, "does not exist")
    assert "connect" not in line and "huggingface.co" not in line
    one_line_error(run("sample", str(tmp_path / "missing") + "/"), 2, "does not exist")


def test_uncached_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    one_line_error(run("wrap", "someone/not-cached-model", "--out", tmp_path / "o"), 1, "not in the local cache",
                   "HF_HUB_OFFLINE")


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    one_line_error(run("wrap", tmp_path / "stuff", "--out", tmp_path / "o"), 1, "not a diffusers folder")


def test_unsupported_scheduler(tmp_path):
    folder = save_ddpm_folder(tmp_path / "consistency")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config["_class_name"] = "CMStochasticIterativeScheduler"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    one_line_error(run("wrap", folder, "--out", tmp_path / "o"), 1, "unsupported scheduler", "CMStochasticIterativeScheduler")


def test_unsupported_model_class(tmp_path):
    folder = save_ddpm_folder(tmp_path / "odd")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["_class_name"] = "NotARealModel"
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    one_line_error(run("sample", folder), 1, "NotARealModel", "--trust-remote-code")


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], ["--steps", "positive"]),
    (["--steps", "-3"], ["--steps", "positive"]),
    (["--solver", "rk45"], ["--solver", "'rk45'", "euler"]),
    (["--grid", "cubic"], ["--grid", "'cubic'", "trailing"]),
    (["--dtype", "float8"], ["--dtype", "bfloat16"]),
    (["--steps", "2000", "--grid", "trailing"], ["--steps 2000"]),
])
def test_bad_sample_options_are_usage_errors(ddpm_folder, args, words):
    one_line_error(run("sample", ddpm_folder, *args), 2, *words)


def test_wrong_direction_is_a_usage_error(tmp_path, ddpm_folder, flow_folder):
    one_line_error(run("wrap", flow_folder, "--out", tmp_path / "o"), 2, "already a flow-matching model", "--to 'epsilon'")
    one_line_error(run("wrap", ddpm_folder, "--out", tmp_path / "o", "--to", "epsilon"), 2, "--to 'velocity'")
    one_line_error(run("wrap", ddpm_folder, "--out", tmp_path / "o", "--to", "noise"), 2, "--to", "velocity")


def test_nan_model_says_at_which_step(tmp_path):
    folder = save_ddpm_folder(tmp_path / "nan")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    unet.save_pretrained(folder / "unet")
    one_line_error(run("sample", folder, "--steps", 4, "--num-images", 1), 1, "NaN", "step 1 of 4")


def test_pickle_weights_are_refused_without_the_flag(tmp_path):
    folder = save_ddpm_folder(tmp_path / "pickled")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    one_line_error(run("wrap", folder, "--out", tmp_path / "o"), 1, "pickle", "--allow-pickle")
    ok("wrap", folder, "--out", tmp_path / "o", "--allow-pickle")  # the one case wrap loads weights: to safetensors
    network = tmp_path / "o" / "unet" / "network"
    assert sorted(os.listdir(network)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ok("sample", tmp_path / "o", "--steps", 1, "--num-images", 1)  # and it loads without --allow-pickle


def test_remote_code_is_refused_without_the_flag(tmp_path):
    folder = save_ddpm_folder(tmp_path / "code")
    (folder / "unet" / "my_unet.py").write_text("raise SystemExit('this must never run')\n")
    one_line_error(run("wrap", folder, "--out", tmp_path / "o"), 1, "code", "--trust-remote-code")


def test_model_folder_with_scheduler_beside_it(tmp_path):
    folder = save_ddpm_folder(tmp_path / "pipe", scheduler=DDPMScheduler(prediction_type="v_prediction",
                                                                        beta_schedule="squaredcos_cap_v2"))
    model_only = tmp_path / "model"
    shutil.copytree(folder / "unet", model_only)
    shutil.copy(folder / "scheduler" / "scheduler_config.json", model_only / "scheduler_config.json")
    summary = json.loads(ok("wrap", model_only, "--out", tmp_path / "o", "--json").stdout)
    assert summary["loaded"]["prediction_type"] == "v_prediction" and summary["pipeline_class"] == "DDPMPipeline"
    (model_only / "scheduler_config.json").unlink()
    one_line_error(run("wrap", model_only, "--out", tmp_path / "o2"), 1, "scheduler_config.json")


def test_json_output_is_one_object_and_logs_go_to_stderr(tmp_path, ddpm_folder):
    result = ok("sample", ddpm_folder, "--steps", 2, "--num-images", 1, "--json")
    payload = json.loads(result.stdout)
    assert {"solver", "grid", "nfe", "seconds", "outputs", "loaded"} <= set(payload)
    assert "sampling" in result.stderr and "sampling" not in result.stdout


def test_builtin_prefix_unknown_name_lists_the_zoo(tmp_path):
    one_line_error(run("sample", "builtin:nope"), 2, "unknown builtin model", "builtin:nope")


def test_bfloat16_sampling_is_finite(tmp_path, ddpm_folder):
    ok("sample", ddpm_folder, "--dtype", "bfloat16", "--steps", 4, "--num-images", 2, "--grid", "trailing",
       "--save-tensor", tmp_path / "bf16.safetensors")
    samples = load_file(tmp_path / "bf16.safetensors")["samples"]
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()


def test_progress_bar_only_when_interactive_and_never_with_json(monkeypatch):
    import sys

    from fmconvert.cli.output import interactive as _interactive

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert _interactive(as_json=False) is True
    assert _interactive(as_json=True) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert _interactive(as_json=False) is False


def test_cached_hub_model_works_offline(tmp_path, monkeypatch, ddpm_folder):
    """A Hub id already in the cache (laid out as huggingface_hub does) loads with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-ddpm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(ddpm_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    summary = json.loads(ok("wrap", "someone/tiny-ddpm", "--out", tmp_path / "o", "--json").stdout)
    assert summary["loaded"]["source"] == "someone/tiny-ddpm"
    assert "base_model: someone/tiny-ddpm" in (tmp_path / "o" / "README.md").read_text()
    one_line_error(run("wrap", "someone/tiny-ddpm", "--revision", "v2", "--out", tmp_path / "o2"), 1, "v2")


def test_baseline_runs_the_sources_own_ddim_on_the_same_noise(tmp_path, ddpm_folder, flow_folder):
    noise = torch.randn((3, 3, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    reference = ddim_reference(ddpm_folder, 10, noise)
    ok("sample", ddpm_folder, "--baseline", "ddim", "--steps", 10, "--num-images", 3, "--seed", 5,
       "--save-tensor", tmp_path / "b.safetensors")
    ok("sample", ddpm_folder, "--grid", "trailing", "--steps", 10, "--num-images", 3, "--seed", 5,
       "--save-tensor", tmp_path / "e.safetensors")
    baseline, euler = (load_file(tmp_path / f"{k}.safetensors")["samples"] for k in "be")
    assert rel(baseline, reference) < 1e-6 and rel(euler, baseline) <= 1e-5
    one_line_error(run("sample", flow_folder, "--baseline", "ddim"), 2, "flow model")  # a usage error
    one_line_error(run("sample", ddpm_folder, "--baseline", "plms"), 2, "--baseline", "ddim")


def test_value_errors_are_usage_errors_in_every_command(tmp_path):
    """A ValueError from the library (an argument the model cannot honour) was exit 2 in sample and fid
    only; agree printed "ValueError: ..." with exit 1. One place maps it now, for every command."""
    folder = save_ddpm_folder(tmp_path / "m")
    line = one_line_error(run("agree", folder, "--steps", "2000", "--num-points", 2, "--num-times", 2, "--num-images", 1),
                          2, "exceeds")
    assert "ValueError" not in line
    one_line_error(run("sample", folder, "--steps", 2000, "--grid", "trailing", "--num-images", 1), 2, "exceeds")


@pytest.mark.slow
def test_piped_stderr_gets_no_progress_bar_of_any_library(sd_folder):
    """With stderr piped (and --json), the libraries' own bars follow fmconvert's rule too: none of
    transformers' "Loading weights" (the text encoder), diffusers' or huggingface_hub's; the logs stay."""
    import subprocess
    import sys

    for extra in ((), ("--json",)):
        result = subprocess.run([sys.executable, "-m", "fmconvert", "sample", str(sd_folder), "--prompt", "a", "--steps",
                                 "1", "--num-images", "1", *extra], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        assert "it/s]" not in result.stderr and "Loading weights" not in result.stderr, result.stderr
        assert result.stderr.startswith("sampling 1 images"), result.stderr
