"""One run description (fmconvert.sampling.runs.Run) from the command line to the shards, and registries that
carry their own metadata (solvers, grids, baselines, features): the CLI's choices, help, option
checks and the NaN report are read from them."""

import dataclasses
import json

import pytest
import torch
from conftest import error, ok, save_ddpm_folder
from typer.testing import CliRunner

from fmconvert.cli import app
from fmconvert.evaluation.features import FEATURES
from fmconvert.integration.conditioning import Conditioning
from fmconvert.integration.source import inspect_source
from fmconvert.math.grids import GRIDS
from fmconvert.math.solvers import SOLVERS, solve
from fmconvert.sampling.baselines import BASELINES
from fmconvert.sampling.runs import OdeSampler, Run, SchedulerSampler, model_fingerprint, run_fingerprint, sweep_runs
from fmconvert.sampling.shards import ShardStore

runner = CliRunner()

#: a value other than the default for every field of Run (a new field without one fails the test below)
OTHER = {"model": "elsewhere", "fingerprint": "sha256:other", "sampler": OdeSampler("heun"), "steps": 9, "seed": 7,
         "dtype": "bfloat16", "conditioning": Conditioning(prompt="a cat", guidance_scale=3.0), "num_images": 5,
         "shard_size": 3, "model_class": "UNet2DModel", "shape": (3, 8, 8), "fmconvert_version": "9.9"}
#: other samplers than the base's (euler on the uniform grid): each field of each sampler type changed alone
OTHER_SAMPLERS = [OdeSampler("euler", grid="karras"), OdeSampler("euler", shift=2.0),
                  OdeSampler("euler", options=(("rtol", 1e-3),)), OdeSampler("euler", "tuned", times=(1.0, 0.4, 0.0)),
                  OdeSampler("euler", "tuned", times=(1.0, 0.4, 0.0), weights=(0.0, 0.5)),
                  SchedulerSampler("euler"),
                  SchedulerSampler("euler", options=(("use_karras_sigmas", True),)),
                  SchedulerSampler("euler", spacing="trailing"), SchedulerSampler("ddim", along_list=True)]


def test_every_field_of_a_run_reaches_its_manifest_and_is_compared(tmp_path):
    """Each field of Run, changed alone, changes the manifest; a samples folder made with the other value
    is refused, before loading (the fields known then) and after. A new Run field without an entry in OTHER
    fails here, so it cannot be left out of the record."""
    base = Run(model="m", fingerprint="sha256:x", sampler="euler", steps=4, model_class="A", shape=(1, 2, 2))
    assert base.sampler == OdeSampler("euler", "uniform") and not base.baseline
    assert set(OTHER) == {f.name for f in dataclasses.fields(Run)}
    # the sampler's fields are flattened into the record under the keys samples folders have always had
    assert set(base.manifest()) == set(OTHER) | {"grid", "shift", "baseline", "options"}
    for sampler in (OdeSampler, SchedulerSampler):  # a new sampler field without a changed value fails here
        changed_fields = {f.name for s in OTHER_SAMPLERS if isinstance(s, sampler) for f in dataclasses.fields(s)
                          if getattr(s, f.name) != getattr(sampler(s.name), f.name)}
        assert changed_fields == {f.name for f in dataclasses.fields(sampler)} - {"solver", "scheduler"}, sampler
    ShardStore(tmp_path / "s", base.manifest())
    for name, value in [*OTHER.items(), *(("sampler", s) for s in OTHER_SAMPLERS)]:
        changed = dataclasses.replace(base, **{name: value})
        assert changed.manifest() != base.manifest(), name
        with pytest.raises(Exception, match="other settings"):
            ShardStore(tmp_path / "s", changed.manifest())
        with pytest.raises(Exception, match="other settings"):
            ShardStore.check(tmp_path / "s", changed.manifest())
    # a record made before loading (no shape or class yet) compares on what it has
    ShardStore.check(tmp_path / "s", dataclasses.replace(base, model_class=None, shape=None).manifest())


def test_the_fingerprint_names_the_files_not_the_path(tmp_path):
    """A folder's fingerprint follows its weights (same path, other weights: another model) and not its path."""
    first = save_ddpm_folder(tmp_path / "a", seed=0)
    save_ddpm_folder(tmp_path / "b", seed=0)
    printed = model_fingerprint(inspect_source(str(first)))
    assert printed.startswith("sha256:") and printed == model_fingerprint(inspect_source(str(tmp_path / "b")))
    save_ddpm_folder(first, seed=1)
    assert model_fingerprint(inspect_source(str(first))) != printed


def test_sample_refuses_a_samples_dir_of_other_settings_before_loading(tmp_path):
    """The manifest is compared before the model is loaded: with weights that cannot load, the samples-dir
    refusal comes first (it used to come after loading and sampling had been set up)."""
    folder = save_ddpm_folder(tmp_path / "m")
    args = ["sample", folder, "--steps", 2, "--num-images", 2, "--batch-size", 2, "--samples-dir", tmp_path / "s"]
    ok(*args)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: loading fails; the fingerprint changes too
    assert "other settings" in error(1, *args)
    assert "other settings" in error(1, *args[:-2], "--samples-dir", tmp_path / "s", "--seed", 5)


def test_solver_options_come_from_the_registry_in_every_command(tmp_path):
    """fid passes --rtol/--atol to dopri5 (it could not before) and records them in each run; a solver that
    takes no such option refuses it in one line; --baseline refuses the solver's options and grid."""
    folder = save_ddpm_folder(tmp_path / "m")
    result = json.loads(ok("fid", folder, "--reference", "builtin:digits", "--solver", "euler,dopri5", "--steps", 2,
                           "--num-images", 2, "--batch-size", 2, "--rtol", 1e-3, "--json").stdout)
    options = {run["sampler"]: run["options"] for run in result["runs"]}
    assert options == {"euler": {}, "dopri5": {"rtol": 1e-3, "atol": 1e-5}}
    line = error(2, "sample", folder, "--solver", "heun", "--rtol", 1e-3, "--steps", 2)
    assert "--rtol 0.001 is an option of dopri5" in line
    assert "does not apply" in error(2, "sample", folder, "--baseline", "ddim", "--grid", "karras", "--steps", 2)
    with pytest.raises(ValueError, match="has no option 'rtol'"):
        solve(lambda x, s: x, torch.zeros(1, 1), torch.tensor([1.0, 0.0]), "euler", rtol=1e-3)


def test_steps_means_solver_steps_everywhere(tmp_path):
    """--steps is one declaration: solver steps, a comma list; a command that draws one run takes one value."""
    folder = save_ddpm_folder(tmp_path / "m")
    assert "give one --steps value" in error(2, "sample", folder, "--steps", "2,4")
    for command in ("sample", "agree", "fid", "report"):
        help_text = runner.invoke(app, [command, "--help"], terminal_width=400).stdout
        assert "Solver steps (the NFE is counted and reported, not assumed)" in " ".join(help_text.split()), command


def test_the_cli_reads_its_choices_and_help_from_the_registries():
    """Every registered solver, grid, baseline and feature extractor is offered with its summary; an
    unknown one is refused with the registry's names."""
    sample_help = " ".join(runner.invoke(app, ["sample", "--help"], terminal_width=400).stdout.split())
    fid_help = " ".join(runner.invoke(app, ["fid", "--help"], terminal_width=400).stdout.split())
    for registry, text in ((SOLVERS, sample_help), (GRIDS, sample_help), (BASELINES, sample_help), (FEATURES, fid_help)):
        for name, entry in registry.items():
            assert f"{name}: {entry.summary}" in text, name
    result = runner.invoke(app, ["sample", "x", "--solver", "rk5"])
    assert result.exit_code == 2 and ", ".join(SOLVERS) in result.stderr


@pytest.mark.parametrize("solver", [name for name, s in SOLVERS.items() if s.evals_per_step])
def test_the_nan_report_counts_steps_by_the_registry(solver):
    """A field that turns NaN at its k-th evaluation is reported at step k // evaluations-per-step + 1."""
    per_step = SOLVERS[solver].evals_per_step
    calls = []

    def field(x, s):
        calls.append(1)
        return x * float("nan") if len(calls) > 2 * per_step else -x

    grid = torch.linspace(1, 0.1, 5, dtype=torch.float64)
    result = solve(field, torch.ones(1, 2), grid, solver)
    assert result.first_bad_nfe == 2 * per_step
    assert SOLVERS[solver].step_of(result.first_bad_nfe, 4) == "step 3 of 4"


def test_a_sweep_is_its_runs():
    base = Run(model="m", fingerprint="f", sampler="euler", steps=1, seed=3, num_images=8)
    runs = sweep_runs(base, ["euler", "dopri5"], [2, 4], ["ddim"], rtol=1e-4)
    assert [(r.sampler.name, r.steps, r.baseline) for r in runs] == [
        ("ddim", 2, True), ("ddim", 4, True), ("euler", 2, False), ("euler", 4, False), ("dopri5", 2, False),
        ("dopri5", 4, False)]
    # a baseline run and a solver run differ by their sampler's type, not by a label
    assert all(isinstance(r.sampler, SchedulerSampler) for r in runs[:2])
    assert all(isinstance(r.sampler, OdeSampler) for r in runs[2:])
    assert runs[0].sampler.spacing == BASELINES["ddim"].grid and all(r.seed == 3 and r.num_images == 8 for r in runs)
    assert dict(runs[-1].sampler.options) == {"rtol": 1e-4, "atol": 1e-5} and runs[2].sampler.options == ()


def test_images_the_features_cannot_take_are_refused_before_sampling(tmp_path, monkeypatch):
    """fid of a 16×16 model with --features digits sampled every image and then failed with a matrix-shape
    error inside the classifier; now a one-line usage error from the registry's input size, before any sample."""
    from conftest import make_unet
    from diffusers import DDPMPipeline, DDPMScheduler

    import fmconvert.sampling.generate

    folder = tmp_path / "big"
    DDPMPipeline(unet=make_unet(size=16), scheduler=DDPMScheduler()).save_pretrained(folder)
    monkeypatch.setattr(fmconvert.sampling.generate, "iter_generate", lambda *a, **k: pytest.fail("sampled before the check"))
    result = runner.invoke(app, ["fid", str(folder), "--reference", "builtin:digits", "--steps", "1", "--num-images", "4",
                                 "--batch-size", "4"])
    assert result.exit_code == 2
    assert "--features 'digits' takes 8×8 images; these are 16×16: use --features 'inception'" in result.stderr


def test_a_time_shift_reaches_the_grid_the_samples_and_the_record(tmp_path):
    """--shift k samples on s = k·u / (1 + (k − 1)·u): Euler in 3 steps with k = 2 is Euler on
    [1, 0.8, 0.5, 0]; the run's record and samples folder carry it, so other shifts are other runs."""
    from safetensors.torch import load_file

    from fmconvert.sampling.generate import Conditioning, velocity_field
    from fmconvert.sampling.model import load_velocity_model, sample_shape
    from fmconvert.sampling.noise import NoiseStream

    folder = save_ddpm_folder(tmp_path / "m")
    args = ["sample", folder, "--steps", 3, "--num-images", 2, "--batch-size", 2, "--seed", 4]
    record = json.loads(ok(*args, "--shift", 2, "--save-tensor", tmp_path / "x.safetensors", "--json",
                           "--samples-dir", tmp_path / "s").stdout)["run"]
    assert record["shift"] == 2.0 and record["grid"] == "uniform"
    vm = load_velocity_model(str(folder))
    field = velocity_field(vm, Conditioning(), 0, 2, "cpu")
    x = NoiseStream(2, sample_shape(vm), 4).take(0, 2)
    with torch.inference_mode():
        expected = solve(field, x, torch.tensor([1.0, 0.8, 0.5, 0.0], dtype=torch.float64), "euler").x
    assert torch.allclose(load_file(tmp_path / "x.safetensors")["samples"], expected, rtol=0, atol=1e-6)
    ok(*args, "--save-tensor", tmp_path / "y.safetensors")
    assert (load_file(tmp_path / "y.safetensors")["samples"] - expected).abs().max() > 1e-3  # (the shift mattered)
    assert "other settings" in error(1, *args, "--samples-dir", tmp_path / "s")  # shift 1 is another run
    assert Run(model="m", fingerprint="f", sampler=OdeSampler("ab2", shift=1.5), steps=3).slug() == "ab2-uniform-shift1.5-3"


def test_a_time_shift_is_refused_where_it_cannot_apply(tmp_path):
    """Grids without a shift, a baseline on its own timesteps, and shifts ≤ 0: one line, exit 2, before loading."""
    folder = save_ddpm_folder(tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # (nothing may load: the refusals come first)
    assert "applies to the uniform and flowmatch grids, not karras" in error(2, "sample", folder, "--grid", "karras", "--shift", 2)
    assert "must be positive" in error(2, "fid", folder, "--reference", "builtin:digits", "--shift", 0)
    assert "--shift 2.0 does not apply" in error(2, "sample", folder, "--baseline", "ddim", "--shift", 2)


def test_the_flowmatch_grid_with_a_shift_is_the_flow_scheduler_with_that_shift(tmp_path, flow_folder):
    """On a flow model, Euler on the flowmatch grid with --shift 3 is the pipeline's own __call__ with
    FlowMatchEulerDiscreteScheduler(shift=3): the shift replaces the scheduler's, and the grid is diffusers'."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    from safetensors.torch import load_file

    pipe = DiffusionPipeline.from_pretrained(flow_folder)
    assert pipe.scheduler.config.shift != 3.0
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(3), output_type="pt").images
    ok("sample", flow_folder, "--grid", "flowmatch", "--shift", 3, "--steps", 5, "--num-images", 2, "--seed", 3,
       "--save-tensor", tmp_path / "s.safetensors")
    samples = load_file(tmp_path / "s.safetensors")["samples"]
    assert ((samples / 2 + 0.5).clamp(0, 1) - images).abs().max() < 1e-5
    ok("sample", flow_folder, "--grid", "flowmatch", "--steps", 5, "--num-images", 2, "--seed", 3,
       "--save-tensor", tmp_path / "t.safetensors")
    assert (load_file(tmp_path / "t.safetensors")["samples"] - samples).abs().max() > 1e-3


def test_a_runs_record_is_what_it_was_before_samplers_had_types():
    """The sampler became a typed value (OdeSampler | SchedulerSampler) instead of a name, a grid label, a
    baseline flag and options of either kind; its record did not change: samples folders and reflow
    checkpoints made before keep their identity (fingerprints computed with the code before the change)."""
    ode = Run(model="m", fingerprint="f", sampler=OdeSampler("ab2", shift=1.5), steps=4, seed=2, fmconvert_version="0.1.0")
    assert ode.manifest() == {"model": "m", "fingerprint": "f", "sampler": "ab2", "steps": 4, "grid": "uniform",
                              "shift": 1.5, "baseline": False, "options": {}, "seed": 2, "dtype": "float32",
                              "conditioning": ode.conditioning.describe(), "num_images": 16, "shard_size": 16,
                              "fmconvert_version": "0.1.0"}
    assert run_fingerprint(ode) == "sha256:428bf0bafdc4a2f7af1a"
    (baseline,) = sweep_runs(dataclasses.replace(ode, sampler=OdeSampler("euler"), seed=0), [], [4],
                             ["dpm++2m:use_karras_sigmas=true"])
    assert baseline.sampler == SchedulerSampler("dpm++2m", (("use_karras_sigmas", True),))
    assert run_fingerprint(baseline) == "sha256:63545921bd75a279e088" and baseline.slug() == "dpm++2m-own-4-d35808d3"
    assert baseline.sampler.spec == "dpm++2m:use_karras_sigmas=true"


@pytest.mark.parametrize("command", [["sample", "--out", "{tmp}/grid.png"],
                                     ["fid", "--reference", "builtin:digits", "--features", "digits", "--no-cache"]])
def test_a_command_resolves_loads_and_checks_its_model_once(tmp_path, monkeypatch, command):
    """One route per model: the reference inspected once, the network loaded once, the family's
    check of the request run once (from configs, before the weights), however many steps."""
    import fmconvert.integration.source as source_module
    import fmconvert.sampling.model as model_module
    from fmconvert.integration.families import Family

    calls = {"inspect": 0, "load": 0, "check": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(source_module, "inspect_source", counting("inspect", source_module.inspect_source))
    monkeypatch.setattr(model_module, "load_denoiser", counting("load", model_module.load_denoiser))
    monkeypatch.setattr(Family, "check", counting("check", Family.check))
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    ok(args[0], "builtin:digits-eps", *args[1:], "--steps", 2, "--num-images", 4, "--batch-size", 2)
    assert calls == {"inspect": 1, "load": 1, "check": 1}


def test_stepping_along_the_listed_timesteps_is_ddims_alone():
    with pytest.raises(ValueError, match="along_list is DDIM's"):
        SchedulerSampler("euler", along_list=True)


def test_a_tuned_grid_is_its_times_and_only_it_has_times():
    with pytest.raises(ValueError, match="a tuned grid is its times"):
        OdeSampler("euler", "uniform", times=(1.0, 0.0))
    with pytest.raises(ValueError, match="a tuned grid is its times"):
        OdeSampler("euler", "tuned")
    with pytest.raises(ValueError, match="takes no shift"):
        OdeSampler("euler", "tuned", 1.5, times=(1.0, 0.0))
    assert "times" not in OdeSampler("euler").record()  # (records of other grids are as they were)


def test_a_request_the_family_cannot_honour_is_refused_when_the_batches_are_asked_for():
    """iter_generate and iter_baseline (the library's direct route, without a Run) check the request
    themselves, at the call, before any batch is drawn."""
    from fmconvert.errors import UsageError
    from fmconvert.integration.conditioning import Conditioning
    from fmconvert.sampling.generate import iter_baseline, iter_generate
    from fmconvert.sampling.model import load_velocity_model

    vm = load_velocity_model("builtin:digits-eps")
    for iterate in (iter_generate, iter_baseline):
        with pytest.raises(UsageError):
            iterate(vm, 2, conditioning=Conditioning(prompt="a digit"))
