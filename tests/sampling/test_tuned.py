"""fmconvert tune: a tuned sampler file for a model (GITS and LD3 grids, validated on held-out pairs),
read back by sample and fid (--grid FILE), refused for other weights, continued when rerun; every
refusal before any teacher solve."""

import json

import pytest
import torch
from conftest import error, ok
from replicas import build_replica

from fmconvert.sampling.generate import generate
from fmconvert.sampling.model import load_velocity_model
from fmconvert.sampling.runs import model_fingerprint
from fmconvert.sampling.tuned import TunedFile, steps_for

MODEL = "builtin:digits-eps"
SMALL = ("--pairs", 16, "--validation-pairs", 24, "--teacher-steps", 16, "--fine-steps", 16, "--iterations", 8)


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
    for g in file.grids:
        s = torch.tensor(g.s, dtype=torch.float64)
        assert g.solver == "ab2" and len(s) == g.steps + 1 == g.nfe + 1
        assert s[0] == 1 and s[-1] == 0 and bool((s.diff() < 0).all())
        assert all(0 <= t <= T for t in g.timesteps) and list(g.timesteps) == sorted(g.timesteps, reverse=True)
        assert g.sigmas[-1] == 0 and all(v is None or v >= 0 for v in g.sigmas)
        v = g.validation
        assert set(v["untuned_rmse"]) >= {"uniform", "uniform@1.5", "karras", "logsnr"}
        assert v["best_untuned"] == min(v["untuned_train_rmse"], key=v["untuned_train_rmse"].get)
        if g.method == "ld3":  # warm-started from the best untuned grid, kept only where it beats it on the pairs
            assert v["train_rmse"] <= v["untuned_train_rmse"][v["best_untuned"]]
            assert len(g.tuning["losses"]) == 8
        assert g.tuning["seed"] != g.tuning["validation_seed"] and g.tuning["pairs"] == 16
    assert out.with_suffix(".png").stat().st_size > 0


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
    assert "no grid for any solver in 5 steps" in line and "ab2 in 3 steps" in line
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
    (("--nfe", 4, "--solver", "unipc"), "is not tuned yet"),
    (("--nfe", 4, "--method", "oss"), "method"),
    (("--nfe", 4, "--validation-seed", 0), "held-out pairs need another seed"),
    (("--nfe", 4, "--out", "grid.txt"), "*.json"),
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
