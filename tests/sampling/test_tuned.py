"""fmconvert tune: a tuned sampler file for a model (GITS and LD3 grids, validated on held-out pairs),
read back by sample and fid (--grid FILE), refused for other weights, continued when rerun; every
refusal before any teacher solve."""

import json

import pytest
import torch
from conftest import error, ok
from replicas import build_replica

from fmconvert.errors import UsageError
from fmconvert.sampling.generate import generate
from fmconvert.sampling.model import load_velocity_model
from fmconvert.sampling.runs import model_fingerprint
from fmconvert.sampling.tuned import TunedFile, _start_scale, steps_for, trained_top

MODEL = "builtin:digits-eps"
SMALL = ("--pairs", 16, "--validation-pairs", 24, "--teacher-steps", 8, "--fine-steps", 8, "--iterations", 8)


def tune(out, *args):
    return json.loads(ok("tune", MODEL, "--out", out, *SMALL, "--json", *args).stdout)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "digits-eps.json"
    return out, tune(out, "--nfe", "3,4", "--method", "gits,ld3", "--plot", out.with_suffix(".png"))


def test_the_file_names_the_weights_and_each_grid_is_a_valid_validated_grid(tuned):
    out, record = tuned
    file = TunedFile.load(out)
    vm = load_velocity_model(MODEL)
    assert file.fingerprint == model_fingerprint(vm.source) and record["fingerprint"] == file.fingerprint
    assert {(g.nfe, g.method) for g in file.grids} == {(3, "gits"), (3, "ld3"), (4, "gits"), (4, "ld3")}
    T = vm.grid_source.num_train_timesteps
    top = trained_top(vm)  # the source's noisiest trained timestep, on the rectified path
    from diffusers import DDPMScheduler

    ac = DDPMScheduler.from_config(vm.source.scheduler).alphas_cumprod.double()
    assert 0.99 < top < 1 and vm.grid_source.model_timestep(torch.tensor(999.0)) == 999
    for g in file.grids:
        s = torch.tensor(g.s, dtype=torch.float64)
        assert g.solver == "ab2" and len(s) == g.steps + 1 == g.nfe + 1
        assert s[0] == top and s[-1] == 0 and bool((s.diff() < 0).all())  # monotone, inside the trained range
        assert g.timesteps[0] == T - 1 and all(0 <= t <= T - 1 for t in g.timesteps)
        assert list(g.timesteps) == sorted(g.timesteps, reverse=True)
        assert g.sigmas[-1] == 0 and all(v is not None and v >= 0 for v in g.sigmas)  # finite: the source's own
        # σ/α is the VE sigma diffusers' Euler scheduler has at the same time: s/(1 − s) on the rectified path
        assert g.sigmas[:-1] == pytest.approx([v / (1 - v) for v in g.s[:-1]], rel=1e-12)
        assert g.sigmas[0] == pytest.approx(float(((1 - ac[-1]) / ac[-1]) ** 0.5), rel=1e-5)
        v = g.validation
        assert set(v["untuned_rmse"]) >= {"uniform", "uniform@1.5", "karras", "logsnr"}
        assert v["best_untuned"] == min(v["untuned_train_rmse"], key=v["untuned_train_rmse"].get)
        if g.method == "ld3":  # warm-started from the best untuned grid, kept only where it beats it on the pairs
            assert v["train_rmse"] <= v["untuned_train_rmse"][v["best_untuned"]]
            assert len(g.tuning["losses"]) == 8
        assert g.tuning["seed"] != g.tuning["validation_seed"] and g.tuning["pairs"] == 16
    assert out.with_suffix(".png").stat().st_size > 0


def test_tune_again_gives_the_same_grids_bit_for_bit_at_any_thread_count_and_records_where_it_ran(tmp_path):
    """docs/scaling.md: the same tune command gives the same file's grids and weights bit for bit, at 1
    thread as at 2; the record names what that holds for (torch, the CPU kernels, threads), since
    another CPU kernel set rounds otherwise and the descent carries that into another grid."""
    before = torch.get_num_threads()
    files = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            tune(tmp_path / f"{threads}.json", "--nfe", 3, "--method", "ld3,s4s")
            files.append(TunedFile.load(tmp_path / f"{threads}.json"))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(files[0].grids, files[1].grids):
        assert one.s == two.s and one.weights == two.weights and one.tuning["losses"] == two.tuning["losses"]
        assert one.tuning["computed_on"] == {"device": "cpu", "torch": torch.__version__, "threads": 1, "world_size": 1,
                                             "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        assert two.tuning["computed_on"]["threads"] == 2
    assert files[0].grids[1].weights is not None and len(files[0].grids) == 2


def test_sample_with_the_file_is_the_solver_on_its_times(tuned, tmp_path):
    out, _ = tuned
    best = TunedFile.load(out).best(4)
    payload = json.loads(ok("sample", MODEL, "--grid", out, "--solver", "auto", "--steps", 4, "--num-images", 6,
                            "--save-tensor", tmp_path / "x.safetensors", "--json").stdout)
    assert payload["grid"] == "tuned" and payload["run"]["times"] == list(best.s) and payload["solver"] == best.solver
    assert payload["nfe"] == 4
    from safetensors.torch import load_file

    vm = load_velocity_model(MODEL)
    from fmconvert.sampling.generate import iter_generate

    expected = torch.cat([x for x, _, _ in iter_generate(vm, 6, 6, 0, best.solver, steps=4, times=best.s)])
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["samples"], expected)
    untuned = generate(vm, 6, 6, 0, best.solver, "uniform", 4).samples
    assert not torch.equal(untuned, expected)


def test_s4s_weights_are_stored_validated_and_run_by_sample(tmp_path):
    """method s4s: the file holds one weight correction a step besides the times; its held-out RMSE is the
    weighted solver's; sample with the file runs weighted_multistep on those times and weights (equal
    to it bit for bit) and records them; a file of times alone has no weights key."""
    from fmconvert.integration.conditioning import Conditioning
    from fmconvert.math.solvers import weighted_multistep
    from fmconvert.sampling.generate import generate_run, velocity_field
    from fmconvert.sampling.noise import NoiseStream
    from fmconvert.sampling.runs import TUNED, OdeSampler, Run

    out = tmp_path / "s4s.json"
    tune(out, "--nfe", 3, "--method", "s4s,ld3", "--iterations", 20)
    file = TunedFile.load(out)
    s4s, ld3 = (next(g for g in file.grids if g.method == m) for m in ("s4s", "ld3"))
    assert ld3.weights is None and "weights" not in json.loads(out.read_text())["grids"][1]
    assert len(s4s.weights) == 3 and any(w != 0 for w in s4s.weights[1:])
    assert s4s.validation["train_rmse"] < s4s.validation["untuned_train_rmse"][s4s.validation["best_untuned"]]
    alone = tmp_path / "s4s-alone.json"  # (a file whose only grid has weights: sample must run them)
    alone.write_text(TunedFile(file.model, file.fingerprint, [s4s]).text())
    payload = json.loads(ok("sample", MODEL, "--grid", alone, "--solver", "ab2", "--steps", 3, "--num-images", 6,
                            "--save-tensor", tmp_path / "x.safetensors", "--json").stdout)
    assert payload["run"]["times"] == list(s4s.s) and payload["run"]["weights"] == list(s4s.weights)
    from safetensors.torch import load_file

    vm = load_velocity_model(MODEL)
    s = torch.tensor(s4s.s, dtype=torch.float64)
    noise = NoiseStream(6, (1, 8, 8), 0).take(0, 6) * _start_scale(s)
    with torch.no_grad():
        x = weighted_multistep(velocity_field(vm, Conditioning(), 0, 6, "cpu"), noise, s, "ab2", s4s.weights)
    run = Run(model=MODEL, fingerprint=file.fingerprint, sampler=OdeSampler("ab2", TUNED, times=s4s.s, weights=s4s.weights),
              steps=3, seed=0, num_images=6, shard_size=6)
    assert torch.equal(generate_run(vm, run).samples, x.float())
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["samples"], x.float())
    assert "with tuned weights" in run.sampler.describe() and run.manifest()["weights"] == list(s4s.weights)


def test_the_features_objective_is_what_ld3_minimises_and_is_refused_without_a_perceptual_network(tmp_path,
                                                                                                   tmp_path_factory):
    """objective features: ld3's losses are distances of the digits classifier's early feature maps (not
    the data-space MSE the file's RMSE measures), recorded as such, gits's record keeps its own cost;
    a latent model (the DiT replica) is refused in one line before any teacher solve."""
    from fmconvert.sampling.tuned import perceptual_distance

    out = tmp_path / "features.json"
    tune(out, "--nfe", 3, "--method", "gits,ld3", "--objective", "features")
    file = TunedFile.load(out)
    ld3, gits = (next(g for g in file.grids if g.method == m) for m in ("ld3", "gits"))
    assert ld3.tuning["objective"] == "features" and gits.tuning["objective"] == "mse"
    vm = load_velocity_model(MODEL)
    distance = perceptual_distance(vm)
    x, y = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.5)
    assert float(distance(x, y)) > 0 and float(distance(x, x)) == 0
    assert abs(float(distance(x, y)) - float((x - y).square().mean())) > 1e-3  # (not the data-space distance)
    mse = tmp_path / "mse.json"
    tune(mse, "--nfe", 3, "--method", "ld3")
    assert TunedFile.load(mse).grids[0].tuning["losses"][0] != ld3.tuning["losses"][0]
    line = error(2, "tune", MODEL, "--out", out, "--nfe", 3, "--method", "ld3", *SMALL)  # (the file's own objective)
    assert "tuned with other settings" in line
    dit = build_replica("dit", tmp_path_factory)
    line = error(2, "tune", dit, "--out", tmp_path / "dit.json", "--nfe", 2, "--class-label", 1, "--objective", "features",
                 *SMALL)
    assert "need a perceptual network" in line and "makes latents" in line, line
    line = error(2, "tune", dit, "--out", tmp_path / "dit.json", "--nfe", 2, "--class-label", 1, "--objective", "frechet",
                 "--method", "s4s", *SMALL)
    assert "need a perceptual network" in line and "makes latents" in line, line


def test_the_frechet_objective_adds_the_batchs_distribution_to_the_pairs_features(tmp_path):
    """objective frechet (here with the cosine schedule, recorded): each iteration takes all the pairs (batch
    size auto for it), and the loss is the pairs' early-feature distance plus the Fréchet distance of the
    batch's last-layer features to all the teacher's, each over its value at the start grid: 2 at the
    first iteration (the start grid, on all the pairs), recorded as such. (A latent model is refused as
    for features: the features test.)"""
    from fmconvert.sampling.tuned import frechet_objective

    out = tmp_path / "frechet.json"
    tune(out, "--nfe", 3, "--method", "s4s", "--objective", "frechet", "--iterations", 3, "--lr-schedule", "cosine")
    g = TunedFile.load(out).grids[0]
    assert g.tuning["objective"] == "frechet" and g.tuning["batch_size"] is None
    assert g.tuning["lr_schedule"] == "cosine"
    assert g.tuning["losses"][0] == pytest.approx(2, rel=1e-6)
    assert g.tuning["losses"][1] != pytest.approx(2, rel=1e-6)  # (it moved)
    vm = load_velocity_model(MODEL)  # the objective away from the start: both terms, each against its start value
    x, teacher = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(6, 1, 8, 8)
    teacher[:3] = 0.5
    objective = frechet_objective(vm, teacher)(x)
    assert float(objective(x, teacher)) == pytest.approx(2, rel=1e-9)
    assert float(objective(teacher, teacher)) < 1e-6  # (both terms zero at the teacher itself)


def test_every_grid_is_judged_from_the_noise_scaled_to_its_own_first_time(tuned):
    """The held-out RMSE of a grid that starts below s = 1 (karras, a tuned one) is that of its
    samples as sample draws them (noise scaled to the grid's first time), not of a solve started
    with the noise meant for s = 1."""
    out, _ = tuned
    g = TunedFile.load(out).best(4)
    vm = load_velocity_model(MODEL)
    from fmconvert.math.solvers import SOLVERS
    from fmconvert.sampling.model import sample_shape, sampling_grid
    from fmconvert.sampling.noise import NoiseStream

    noise = NoiseStream(24, sample_shape(vm), 1).take(0, 24)  # the held-out pairs: --validation-pairs 24, seed 1
    field = __import__("fmconvert.sampling.generate", fromlist=["velocity_field"]).velocity_field(vm, None, 0, 24, "cpu")
    teacher = sampling_grid(vm, "uniform", SMALL[SMALL.index("--teacher-steps") + 1])
    with torch.no_grad():
        target = SOLVERS["rk4"].step(field, noise, teacher)
        for name, grid in (("karras", sampling_grid(vm, "karras", 4)), ("tuned", torch.tensor(g.s, dtype=torch.float64))):
            assert float(grid[0]) < 1
            x = SOLVERS["ab2"].step(field, noise * _start_scale(grid), grid)
            rmse = float((x.double() - target.double()).square().mean().sqrt())
            recorded = g.validation["untuned_rmse"]["karras"] if name == "karras" else g.rmse
            assert rmse == pytest.approx(recorded, rel=1e-6), name


def test_fid_sweeps_the_files_grids(tuned):
    out, _ = tuned
    result = json.loads(ok("fid", MODEL, "--reference", "builtin:digits", "--grid", out, "--solver", "ab2", "--steps", "3,4",
                           "--num-images", 64,
                           "--batch-size", 32, "--features", "digits", "--no-cache", "--json").stdout)
    assert [(row["steps"], row["grid"]) for row in result["rows"]] == [(3, "tuned"), (4, "tuned")]


def test_a_file_for_other_weights_or_steps_is_refused_in_one_line(tuned):
    out, _ = tuned
    line = error(2, "sample", "builtin:digits-v", "--grid", out, "--solver", "auto", "--steps", 4)
    assert "tuned for other weights" in line and str(out) in line
    line = error(2, "sample", MODEL, "--grid", out, "--solver", "auto", "--steps", 5)
    assert "no grid for 5 NFE in 5 steps" in line and "ab2 in 3 steps (3 NFE)" in line
    assert "no grid for euler" in error(2, "sample", MODEL, "--grid", out, "--steps", 4)
    assert "no such tuned sampler file" in error(2, "sample", MODEL, "--grid", out.with_name("none.json"))
    assert "takes no shift" in error(2, "sample", MODEL, "--grid", out, "--shift", 1.5)


def test_a_rerun_continues_the_file_and_other_settings_are_refused(tuned, tmp_path):
    out, _ = tuned
    copy = tmp_path / "copy.json"
    copy.write_text(out.read_text())
    before = TunedFile.load(copy)
    tune(copy, "--nfe", "3,4,5", "--method", "gits")
    after = TunedFile.load(copy)
    assert after.grids[:4] == before.grids  # kept as they were, not tuned again
    assert [(g.nfe, g.method) for g in after.grids[4:]] == [(5, "gits")]
    line = error(2, "tune", MODEL, "--out", copy, "--nfe", 3, "--method", "gits", "--pairs", 8)
    assert "tuned with other settings" in line
    line = error(2, "tune", "builtin:digits-v", "--out", copy, "--nfe", 3)
    assert "tuned for other weights" in line


@pytest.mark.parametrize("args,message", [
    (("--nfe", 1), "below ab2's order 2"),
    (("--nfe", 4, "--solver", "heun"), "heun spends 1, 3, 5, 7"),
    (("--nfe", 4, "--solver", "dopri5"), "is not tuned yet"),
    (("--nfe", 4, "--method", "oss"), "method"),
    (("--nfe", 4, "--validation-seed", 0), "held-out pairs need another seed"),
    (("--nfe", 4, "--out", "grid.txt"), "*.json"),
    (("--nfe", 3, "--solver", "heun", "--method", "s4s"), "corrects the weights of euler, ab2, dpmpp_2m, dpmpp_3m, unipc, not heun"),
    (("--nfe", 3, "--objective", "lpips"), "objective"),
    (("--nfe", 3, "--objective", "features", "--method", "gits"), "is what ld3 and s4s minimise"),
    (("--nfe", 3, "--select", "kid"), "select"),
    (("--nfe", 3, "--select", "fid", "--features", "clip"), "features"),
    (("--nfe", 3, "--select", "fid", "--check-every", 0), "--check-every must be a positive integer"),
    (("--nfe", 3, "--select", "fid", "--method", "oss"), "method"),
    (("--nfe", 3, "--reference", "builtin:digits"), "--reference judges tuned grids by FID to a dataset: it needs --select fid"),
    (("--nfe", 3, "--select", "fid", "--reference", "no/such/folder"), "'no/such/folder' does not exist"),
    (("--nfe", 3, "--restarts", 0), "--restarts must be a positive integer"),
    (("--nfe", 3, "--restarts", 2, "--method", "gits"), "gits has none"),
    (("--nfe", 3, "--method", "s4s", "--objective", "frechet", "--batch-size", 1), "1 pair has none"),
    (("--nfe", 3, "--method", "s4s", "--objective", "frechet", "--batch-size", 0), "--batch-size must be a positive"),
    (("--nfe", 3, "--method", "s4s", "--batch-size", "half"), "--batch-size must be a positive integer, all or auto"),
    (("--nfe", 3, "--method", "s4s", "--lr-schedule", "step"), "unknown --lr-schedule 'step'"),
])
def test_bad_requests_are_refused_before_any_teacher_solve(tmp_path, monkeypatch, args, message):
    import fmconvert.sampling.model as model_module

    monkeypatch.setattr(model_module, "load_denoiser", lambda *a, **k: pytest.fail("the model was loaded"))
    out = ["--out", tmp_path / "t.json"] if "--out" not in args else []
    line = error(2, "tune", MODEL, *out, *args)
    assert message in line, line


def test_a_conditional_model_tunes_with_its_labels_and_is_refused_without(tmp_path_factory, tmp_path):
    dit = build_replica("dit", tmp_path_factory)
    line = error(2, "tune", dit, "--out", tmp_path / "none.json", "--nfe", 2, *SMALL)
    assert "pass --class-label" in line, line
    record = json.loads(ok("tune", dit, "--out", tmp_path / "dit.json", "--nfe", 2, "--method", "gits",
                           "--class-label", 3, "--guidance-scale", 4, "--pairs", 4, "--validation-pairs", 4,
                           "--teacher-steps", 8, "--fine-steps", 8, "--json").stdout)
    assert record["grids"][0]["tuning"]["conditioning"]["class_labels"] == ["3"]
    ok("sample", dit, "--grid", tmp_path / "dit.json", "--solver", "auto", "--steps", 2, "--class-label", 3,
       "--guidance-scale", 4, "--num-images", 1)


def test_steps_for_counts_evaluations_as_the_solvers_spend_them():
    assert [steps_for("ab2", n) for n in (2, 3, 6)] == [2, 3, 6]
    assert [steps_for("heun", n) for n in (3, 5)] == [2, 3]  # (2 a step, Euler into s = 0)
    assert steps_for("rk4", 8) == 2


def test_stored_in_a_converted_folder_its_stock_pipeline_steps_the_tuned_times(tmp_path):
    """tune FOLDER --into FOLDER: the folder's own DDPMPipeline, num_inference_steps=N, equals
    fmconvert sample with the stored file's grid; the velocity field and its fingerprint are unchanged."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    folder = tmp_path / "digits-eps-velocity"
    ok("wrap", MODEL, "--out", folder)
    before = model_fingerprint(load_velocity_model(str(folder)).source)
    record = json.loads(ok("tune", folder, "--out", tmp_path / "t.json", "--solver", "euler", "--nfe", "3,4",
                           "--method", "gits", *SMALL, "--into", folder, "--json").stdout)
    assert record["into"]["tuned_steps"] == [3, 4] and (folder / "tuned_sampler.json").read_text() == (
        tmp_path / "t.json").read_text()
    assert model_fingerprint(load_velocity_model(str(folder)).source) == before
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerScheduler"
    best = TunedFile.load(folder / "tuned_sampler.json").best(4, "euler")
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np").images
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.sigmas.tolist() == torch.tensor(best.s, dtype=torch.float32).tolist()
    ok("sample", folder, "--grid", folder / "tuned_sampler.json", "--solver", "euler", "--steps", 4, "--num-images", 2,
       "--seed", 3, "--save-tensor", tmp_path / "s.safetensors")
    ours = (load_file(str(tmp_path / "s.safetensors"))["samples"] / 2 + 0.5).clamp(0, 1)
    assert (torch.from_numpy(images).permute(0, 3, 1, 2) - ours).abs().max() < 1e-5
    # --grid tuned names the folder's stored file
    ok("sample", folder, "--grid", "tuned", "--solver", "euler", "--steps", 4, "--num-images", 2, "--seed", 3,
       "--save-tensor", tmp_path / "t.safetensors")
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["samples"], load_file(str(tmp_path / "s.safetensors"))["samples"])
    assert "has none" in error(2, "sample", MODEL, "--grid", "tuned", "--steps", 4)
    pipe.scheduler.set_timesteps(5)  # a step count it has no tuned times for: the scheduler's own grid
    assert pipe.scheduler.sigmas[0] == 1 and len(pipe.scheduler.sigmas) == 6
    import fmconvert

    again = fmconvert.load(folder)  # without running the folder's code: the same scheduler and times
    again.scheduler.set_timesteps(4)
    assert torch.equal(again.scheduler.sigmas, torch.tensor(best.s, dtype=torch.float32))
    from fmconvert.integration.schedulers import FlowMatchEulerScheduler

    with pytest.raises(ValueError, match="decreasing times"):
        FlowMatchEulerScheduler(tuned_times={"3": [1.0, 0.5, 0.0]})


def test_into_stores_the_times_its_pipeline_steps_when_s4s_is_tuned_too(tmp_path):
    """tune --method ld3,s4s --into: the folder's scheduler steps the best grid of times alone, and the
    folder's stored file holds only such grids, so sample --grid tuned on the folder takes the same times
    (not the s4s grid, whose weights the pipeline cannot run); the --out file keeps both."""
    folder = tmp_path / "digits-eps-velocity"
    ok("wrap", MODEL, "--out", folder)
    ok("tune", folder, "--out", tmp_path / "t.json", "--solver", "euler", "--nfe", 3, "--method", "ld3,s4s", *SMALL,
       "--iterations", 20, "--into", folder)
    assert {g.method for g in TunedFile.load(tmp_path / "t.json").grids} == {"ld3", "s4s"}
    stored = TunedFile.load(folder / "tuned_sampler.json")
    assert [g.method for g in stored.grids] == ["ld3"] and stored.grids[0].weights is None
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["tuned_times"]["3"] == list(stored.grids[0].s)
    payload = json.loads(ok("sample", folder, "--grid", "tuned", "--solver", "euler", "--steps", 3, "--num-images", 2,
                            "--json", "--out", tmp_path / "g.png").stdout)
    assert payload["run"]["times"] == list(stored.grids[0].s) and "weights" not in payload["run"]


def test_a_file_written_before_objectives_continues_and_weights_need_a_solver_that_takes_them(tmp_path):
    """A tuned file of an earlier fmconvert (no objective recorded: it ran mse) is continued by a rerun of
    the same settings, not refused; a grid with weights for a solver that cannot take them is refused."""
    from fmconvert.sampling.runs import TUNED, OdeSampler

    out = tmp_path / "old.json"
    tune(out, "--nfe", 3, "--method", "ld3")
    record = json.loads(out.read_text())
    for g in record["grids"]:
        del g["tuning"]["objective"], g["tuning"]["select"], g["tuning"]["restarts"], g["tuning"]["lr_schedule"]
    out.write_text(json.dumps(record))
    again = tune(out, "--nfe", "3,4", "--method", "ld3")
    assert [(g["nfe"], g["tuning"].get("objective")) for g in again["grids"]] == [(3, None), (4, "mse")]
    assert again["grids"][1]["tuning"]["restarts"] == 1 and again["grids"][1]["tuning"]["lr_schedule"] == "constant"
    with pytest.raises(UsageError, match="only euler, ab2, dpmpp_2m, dpmpp_3m, unipc take"):
        OdeSampler("heun", TUNED, times=(1.0, 0.5, 0.0), weights=(0.0, 0.3))


@pytest.mark.parametrize("args,message", [
    (("--solver", "ab2"), "tune --solver euler to store times it runs"),
    (("--into", "{other}"), "holds other weights"),
    (("--into", "{tmp}"), "not a pipeline folder written by fmconvert wrap"),
    (("--method", "s4s"), "s4s also corrects the solver's weights"),
])
def test_into_is_refused_for_another_solver_other_weights_or_a_non_converted_folder(tmp_path, args, message):
    other = tmp_path / "digits-v-velocity"
    ok("wrap", "builtin:digits-v", "--out", other)
    folder = tmp_path / "digits-eps-velocity"
    ok("wrap", MODEL, "--out", folder)
    args = [str(a).format(other=other, tmp=tmp_path) for a in args]
    into = [] if "--into" in args else ["--into", folder]
    line = error(2, "tune", folder, "--out", tmp_path / "t.json", "--nfe", 3, "--solver", "euler", *into, *args, *SMALL)
    assert message in line, line
    assert not (folder / "tuned_sampler.json").exists()


def test_the_files_sigmas_drive_the_unconverted_models_stock_pipeline(tmp_path_factory, tmp_path):
    """A conditional replica (Stable Diffusion 1.5) tuned with its prompt: its own pipeline with
    EulerDiscreteScheduler and sigmas= the file's σ/α equals fmconvert sample on the file's grid."""
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler
    from replicas import PROMPT, REPLICAS, one_thread
    from safetensors.torch import load_file

    replica = REPLICAS["sd15"]
    with one_thread():
        sd = build_replica("sd15", tmp_path_factory)
        out = tmp_path / "sd.json"
        ok("tune", sd, "--out", out, "--solver", "euler", "--nfe", 3, "--method", "gits,ld3", *replica.sample_args,
           "--pairs", 4, "--validation-pairs", 4, "--teacher-steps", 8, "--fine-steps", 8, "--iterations", 3)
        g = TunedFile.load(out).best(3, "euler")
        assert g.tuning["conditioning"]["prompt"] == [PROMPT] or PROMPT in str(g.tuning["conditioning"])
        pipe = DiffusionPipeline.from_pretrained(sd)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        noise = torch.randn((1, *replica.noise_shape), generator=torch.Generator().manual_seed(3))
        stock = pipe(**replica.call, sigmas=list(g.sigmas), latents=noise.clone(), output_type="latent").images
        ok("sample", sd, "--grid", out, "--solver", "euler", "--steps", 3, "--num-images", 1, "--seed", 3,
           *replica.sample_args, "--save-tensor", tmp_path / "s.safetensors")
        ours = load_file(str(tmp_path / "s.safetensors"))["samples"]
    assert ((ours.double() - stock.double()).abs().max() / stock.abs().max()) < 1e-5


def test_the_command_lines_defaults_are_the_librarys():
    """tune's options repeat tune_model's defaults (the command line imports no torch): the same values."""
    import inspect

    import typer.main

    from fmconvert.cli import app
    from fmconvert.sampling.tuned import tune_model

    command = typer.main.get_command(app).commands["tune"]
    library = inspect.signature(tune_model).parameters
    shared = [p for p in command.params if p.name in library and library[p.name].default is not inspect.Parameter.empty
              and p.name != "device"]  # (the command line's "auto" picks a device; the library takes one)
    assert len(shared) >= 12
    for param in shared:
        assert param.default == library[param.name].default, param.name


def test_select_fid_starts_from_and_keeps_the_grid_closest_to_the_teacher_in_fid(tmp_path, tmp_path_factory):
    """--select fid: each learnt grid starts from the untuned grid of least held-out FID to the teacher's
    endpoints (every untuned one's recorded), keeps a checkpoint at least as close (the start included),
    records its selection, and the file's --grid ranks by that score; the FID is the fid command's
    formula in its features; images the features cannot take are refused before any teacher solve."""
    from fmconvert.evaluation.fid import frechet_selection, make_extractor
    from fmconvert.evaluation.statistics import FeatureStatistics, fid_between
    from fmconvert.files.images import to_uint8

    out = tmp_path / "fid.json"
    tune(out, "--nfe", 3, "--method", "gits,ld3,s4s", "--select", "fid", "--check-every", 3)
    file = TunedFile.load(out)
    assert {g.method for g in file.grids} == {"gits", "ld3", "s4s"}
    for g in file.grids:
        v = g.validation
        assert g.tuning["select"] == "fid-digits" and g.tuning["check_every"] == 3
        assert v["best_untuned"] == min(v["untuned_score"], key=v["untuned_score"].get)
        assert g.tuning["best_untuned_on_train"] == min(v["untuned_train_rmse"], key=v["untuned_train_rmse"].get)
        if g.method != "gits":
            assert v["score"] <= v["untuned_score"][v["best_untuned"]] + 1e-9
    assert file.best(3) is min(file.grids, key=lambda g: g.validation["score"])
    # the score: FID of the digits features of two image sets, as the fid command computes it
    extractor = make_extractor("digits")
    a, b = (torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(k)) for k in (0, 1))
    distance = frechet_selection(extractor).against(a)
    stats = [FeatureStatistics(extractor.num_features) for _ in range(2)]
    for st, images in zip(stats, (a, b)):
        st.update(extractor(to_uint8(images)))
    assert distance(b) == pytest.approx(fid_between(*stats), rel=1e-9) and distance(b) > 0
    assert abs(distance(a)) < 1e-6 * distance(b)  # (itself: 0 up to the square root's rounding)
    dit = build_replica("dit", tmp_path_factory)  # (its latents decode to 16x16 images: not the digits features')
    line = error(2, "tune", dit, "--out", tmp_path / "dit.json", "--nfe", 2, "--class-label", 1, "--select", "fid",
                 *SMALL)
    assert "takes 8×8 images" in line, line


def test_select_fid_with_a_reference_judges_by_fid_to_the_data(tmp_path):
    """--select fid --reference REF: the start grid, the kept checkpoint and the recorded score are FID of the
    held-out endpoints to REF's images (the fid command's statistics), not to the teacher's, and the run records
    that selection by name."""
    from fmconvert.evaluation.fid import make_extractor, reference_stats, stats_of
    from fmconvert.evaluation.statistics import fid_between
    from fmconvert.files.images import to_uint8
    from fmconvert.math.solvers import integrate
    from fmconvert.sampling.generate import velocity_field
    from fmconvert.sampling.model import sample_shape
    from fmconvert.sampling.noise import NoiseStream

    out = tmp_path / "data.json"
    tune(out, "--nfe", 3, "--method", "s4s", "--select", "fid", "--reference", "builtin:digits", "--check-every", 4)
    (g,) = TunedFile.load(out).grids
    v = g.validation
    assert g.tuning["select"] == "fid-digits-to-builtin:digits"
    assert v["best_untuned"] == min(v["untuned_score"], key=v["untuned_score"].get)
    assert v["score"] <= v["untuned_score"][v["best_untuned"]] + 1e-9
    # the kept grid's score, recomputed: its held-out endpoints (24 pairs of seed 1) against builtin:digits
    vm = load_velocity_model(MODEL)
    grid, weights = torch.tensor(g.s, dtype=torch.float64), torch.tensor(g.weights, dtype=torch.float64)
    noise = NoiseStream(24, sample_shape(vm), 1).take(0, 24)
    with torch.no_grad():
        x = integrate(velocity_field(vm, None, 0, 24, "cpu"), noise * _start_scale(grid), grid, "ab2", weights)
        images = to_uint8(vm.source.family.decode(vm.pipeline, x))
    extractor = make_extractor("digits")
    data = fid_between(reference_stats("builtin:digits", extractor).stats, stats_of([images], extractor))
    assert v["score"] == pytest.approx(data, rel=1e-6)


def test_best_ranks_by_the_selection_score_when_every_grid_has_one_else_by_rmse():
    from fmconvert.sampling.tuned import TunedGrid

    def grid(rmse, score=None, select="fid-digits"):
        validation = {"rmse": rmse, **({} if score is None else {"score": score})}
        return TunedGrid("ab2", 3, 3, "ld3", (1.0, 0.5, 0.2, 0.0), (999, 500, 200, 0), (None, 1.0, 0.25, 0.0),
                         validation, {"select": select if score is not None else "loss"})

    sharp, blurred = grid(0.3, 5.0), grid(0.2, 9.0)
    assert TunedFile("m", "f", [blurred, sharp]).best(3) is sharp
    plain = grid(0.25)
    assert TunedFile("m", "f", [blurred, sharp, plain]).best(3) is blurred  # (not all scored alike: RMSE)
    assert TunedFile("m", "f", [grid(0.3, 5.0, "fid-inception-2048"), blurred]).best(3) is blurred


def test_one_file_holds_several_solvers_and_the_grid_takes_the_least_held_out_score(tmp_path):
    """tune --solver ab2 and --solver unipc (an exponential integrator, s4s: times and weights) into one file,
    both chosen by FID: sample --grid FILE --solver auto runs the grid of least held-out score whichever
    solver it is, with its weights; --solver unipc the unipc one."""
    from fmconvert.integration.conditioning import Conditioning
    from fmconvert.sampling.generate import _solved_batches

    out = tmp_path / "both.json"
    tune(out, "--nfe", 3, "--method", "s4s", "--select", "fid", "--check-every", 4)
    tune(out, "--nfe", 3, "--method", "s4s", "--select", "fid", "--check-every", 4, "--solver", "unipc")
    file = TunedFile.load(out)
    assert sorted(g.solver for g in file.grids) == ["ab2", "unipc"] and all(g.weights for g in file.grids)
    vm = load_velocity_model(MODEL)
    for solver in ("auto", "unipc"):
        best = file.best(3, None if solver == "auto" else solver)
        assert best is min((g for g in file.grids if solver in ("auto", g.solver)), key=lambda g: g.validation["score"])
        payload = json.loads(ok("sample", MODEL, "--grid", out, "--solver", solver, "--steps", 3, "--num-images", 4,
                                "--save-tensor", tmp_path / f"{solver}.safetensors", "--json").stdout)
        assert payload["solver"] == best.solver and payload["run"]["times"] == list(best.s) and payload["nfe"] == 3
        assert payload["run"]["weights"] == list(best.weights)
        from safetensors.torch import load_file

        expected = torch.cat([x for x, _, _ in _solved_batches(vm, 4, 4, 0, best.solver, "uniform", 3, "cpu", Conditioning(),
                                                               False, None, None, None, best.s, best.weights)])
        assert torch.equal(load_file(str(tmp_path / f"{solver}.safetensors"))["samples"], expected)


def test_restarts_are_recorded_with_the_kept_descents_losses(tmp_path):
    """--restarts R: the file records R (gits, which has no descent, 1) and the kept descent's losses,
    one a iteration; which descent is kept, and that it is the best of them, math.tuning's tests show."""
    two = tune(tmp_path / "two.json", "--nfe", 3, "--method", "gits,s4s", "--select", "fid", "--check-every", 4,
               "--restarts", 2)
    gits, s4s = two["grids"]
    assert gits["tuning"]["restarts"] == 1 and s4s["tuning"]["restarts"] == 2
    assert len(s4s["tuning"]["losses"]) == 8
    assert s4s["validation"]["score"] <= s4s["validation"]["untuned_score"][s4s["validation"]["best_untuned"]] + 1e-9


def test_judge_scores_every_grid_by_the_fid_of_its_samples_and_grid_takes_the_least(tuned, tmp_path, monkeypatch):
    """fmconvert judge: each grid's score is the fid command's FID to the reference of that grid's samples from
    the same held-out noise (--seed; the sample command's draw, weights and all); --grid FILE then takes, for
    each step count, the grid of least score; a rerun with the same judge solves nothing, another judge
    replaces the scores."""
    from dataclasses import replace

    out, _ = tuned
    judged = tmp_path / "judged.json"
    file = TunedFile.load(out)
    three = next(g for g in file.grids if g.steps == 3)  # (and one with weights, as s4s writes them)
    file.grids.append(replace(three, method="s4s", weights=(0.0, 0.3, -0.2)))
    judged.write_text(file.text())
    record = json.loads(ok("judge", MODEL, "--grid", judged, "--reference", "builtin:digits", "--num-images", 48,
                           "--batch-size", 20, "--json").stdout)  # (batches of 20, 20 and 8)
    file = TunedFile.load(judged)
    assert len(file.grids) == 5 and record["file"] == str(judged)
    for g in file.grids:
        assert {k: g.validation["judge"][k] for k in ("by", "images", "seed")} == {
            "by": "fid-digits-to-builtin:digits", "images": 48, "seed": 1}
        alone = tmp_path / f"{g.method}-{g.steps}-{g.weights is None}.json"
        alone.write_text(TunedFile(file.model, file.fingerprint, [g]).text())
        fid = json.loads(ok("fid", MODEL, "--reference", "builtin:digits", "--grid", alone, "--solver", g.solver,
                            "--steps", g.steps, "--num-images", 48, "--seed", 1, "--batch-size", 20,
                            "--json").stdout)["rows"][0]["fid"]
        assert g.validation["judge"]["score"] == pytest.approx(fid, rel=1e-12), (g.method, g.steps)
    for steps in (3, 4):
        here = [g for g in file.grids if g.steps == steps]
        least = min(here, key=lambda g: g.validation["judge"]["score"])
        assert file.best(steps) == least and file.grids[record["picks"][str(steps)]] == least
        assert json.loads(ok("sample", MODEL, "--grid", judged, "--solver", "auto", "--steps", steps, "--num-images", 2,
                             "--json").stdout)["run"]["times"] == list(least.s)
    import fmconvert.sampling.tuned as tuned_module

    def no_solve(*args, **kwargs):
        raise AssertionError("a grid judged the same way was solved again")

    monkeypatch.setattr(tuned_module, "integrate", no_solve)
    ok("judge", MODEL, "--grid", judged, "--reference", "builtin:digits", "--num-images", 48)
    monkeypatch.undo()
    ok("judge", MODEL, "--grid", judged, "--reference", "builtin:digits", "--num-images", 32, "--nfe", 3)
    again = TunedFile.load(judged)
    assert len({g.validation["judge"]["score"] for g in file.grids}) == 5
    assert [g.validation["judge"] for g in again.grids if g.nfe == 4] == [g.validation["judge"] for g in file.grids
                                                                          if g.nfe == 4]  # (kept)
    for before, after in zip(file.grids, again.grids):
        if before.nfe == 3:  # (judged again: another count, another score)
            assert after.validation["judge"]["images"] == 32
            assert after.validation["judge"]["score"] != before.validation["judge"]["score"]


def test_best_takes_the_judges_least_score_only_where_one_judge_scored_every_candidate():
    from fmconvert.sampling.tuned import TunedGrid

    def grid(rmse, score=None, judged=None, images=2048):
        validation = {"rmse": rmse, "score": score or rmse}
        if judged is not None:
            validation["judge"] = {"by": "fid-digits-to-builtin:digits", "images": images, "seed": 1, "score": judged}
        return TunedGrid("ab2", 3, 3, "ld3", (1.0, 0.5, 0.2, 0.0), (999, 500, 200, 0), (None, 1.0, 0.25, 0.0),
                         validation, {"select": "fid-digits"})

    a, b = grid(0.2, judged=7.0), grid(0.3, judged=4.0)
    assert TunedFile("m", "f", [a, b]).best(3) is b  # (the judge, over the held-out score and RMSE)
    assert TunedFile("m", "f", [a, b, grid(0.25)]).best(3) is a  # (one not judged: the tuning runs' own score)
    assert TunedFile("m", "f", [a, grid(0.3, judged=4.0, images=256)]).best(3) is a  # (judged otherwise: likewise)


def test_any_solvers_best_grid_of_n_steps_spends_n_evaluations():
    """best(N) of any solver (sample --solver auto --steps N, and judge's picks) compares the grids of
    N steps that spend N evaluations: heun's 4 steps (7 NFE) score better but are not a 4-NFE grid."""
    from fmconvert.sampling.tuned import TunedGrid

    def grid(solver, steps, nfe, score):
        s = tuple(1.0 - i / steps for i in range(steps + 1))
        return TunedGrid(solver, steps, nfe, "ld3", s, tuple(999 * v for v in s), (None,) * (steps + 1),
                         {"rmse": score, "score": score}, {"select": "fid-digits"})

    ab2, heun = grid("ab2", 4, 4, 9.0), grid("heun", 4, 7, 2.0)
    file = TunedFile("m", "f", [heun, ab2])
    assert file.best(4) is ab2 and file.best(4, "heun") is heun
    # judge's picks: the same rule; a step count with heun's grid alone (2 steps, 3 NFE) has none
    assert TunedFile("m", "f", [heun, grid("heun", 2, 3, 1.0), ab2, grid("ab2", 3, 3, 5.0)]).picks() == {"3": 3, "4": 2}
    assert TunedFile("m", "f", [heun, ab2]).picks([3]) == {}
    with pytest.raises(UsageError, match=r"no grid for 4 NFE in 4 steps .*; it has heun in 4 steps \(7 NFE\)"):
        TunedFile("m", "f", [heun]).best(4)


@pytest.mark.parametrize("args,message", [
    (["--grid", "no/such.json"], "cannot read tuned sampler file 'no/such.json'"),
    (["--nfe", 7], "no grid for NFE 7; it has NFE 3, 4"),
    (["--num-images", 1], "--num-images must be at least 2"),
    (["--reference", "builtin:nosuch"], "unknown builtin data 'nosuch'"),
    (["--model", "builtin:digits-v"], "was tuned for other weights"),
])
def test_judge_refuses_bad_requests_in_one_line_before_any_solve(tuned, tmp_path, monkeypatch, args, message):
    import fmconvert.sampling.tuned as tuned_module

    out, _ = tuned
    copy = tmp_path / "copy.json"
    copy.write_text(out.read_text())
    monkeypatch.setattr(tuned_module, "integrate", lambda *a, **k: pytest.fail("solved before the refusal"))
    request = {"--model": MODEL, "--grid": copy, "--reference": "builtin:digits", **dict(zip(args[::2], args[1::2]))}
    model = request.pop("--model")
    line = error(2, "judge", model, *[v for k, value in request.items() for v in (k, value)])
    assert message in line and "\n" not in line.strip()
    assert TunedFile.load(copy).text() == out.read_text() or args[0] == "--grid"  # (the file untouched)


def test_judge_refuses_a_file_without_grids_and_an_empty_nfe_list(tmp_path):
    from fmconvert.sampling.tuned import TunedGrid, check_judge

    with pytest.raises(UsageError, match="has no grids to judge"):
        check_judge(TunedFile("m", "f", []), None, 2048, 250)
    one = TunedGrid("ab2", 3, 3, "ld3", (1.0, 0.5, 0.2, 0.0), (999, 500, 200, 0), (None, 1.0, 0.25, 0.0), {"rmse": 1}, {})
    with pytest.raises(UsageError, match=r"no grid for NFE \(none asked\); it has NFE 3"):
        check_judge(TunedFile("m", "f", [one]), [], 2048, 250)


def test_judge_needs_a_dataset_not_the_teacher():
    """The library's judge solves no teacher: a selection by FID to the teacher is refused in one line."""
    from fmconvert.evaluation.fid import frechet_selection, make_extractor
    from fmconvert.sampling.tuned import judge

    file = TunedFile("m", "f", [])
    with pytest.raises(UsageError, match="judge by FID to a dataset"):
        judge(load_velocity_model(MODEL), file, frechet_selection(make_extractor("digits")))


def test_the_judge_command_and_the_library_judge_on_as_many_images_as_the_benchmarks_fid():
    """``fmconvert judge``'s --num-images default is the library's (JUDGE_IMAGES, declared twice: the command line
    imports no torch at start) and the benchmarks' 10,000: a default judge reproduces docs/benchmarks/JUDGED.md's
    picks, and its help says what that costs."""
    import inspect

    from fmconvert.cli.judge import judge as judge_command
    from fmconvert.sampling.tuned import JUDGE_IMAGES, judge, judge_model

    option = inspect.signature(judge_command).parameters["num_images"].default
    assert option.default == JUDGE_IMAGES == 10_000
    assert "s a grid" in option.help
    for function in (judge, judge_model):
        assert inspect.signature(function).parameters["images"].default == JUDGE_IMAGES
