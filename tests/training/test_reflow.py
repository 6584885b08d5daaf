"""fmconvert reflow: couplings drawn as a resumable run, paired training on the straight paths between their ends,
distillation at the noise end, resumption, the one-line refusals, and the straightening itself."""

import hashlib
import json

import pytest
import torch
from conftest import error, invoke, ok, save_ddpm_folder, save_flow_folder, stop_training_at
from safetensors.torch import load_file

from fmconvert.errors import UsageError
from fmconvert.evaluation.agreement import weighted_epsilon_loss
from fmconvert.integration.source import inspect_source
from fmconvert.sampling.runs import OdeSampler, Run, model_fingerprint, run_fingerprint, solver_options
from fmconvert.sampling.shards import ShardStore
from fmconvert.training import loop
from fmconvert.training.checkpoint import CHECKPOINT, checkpoint_step, work_folder
from fmconvert.training.data import TrainingData
from fmconvert.training.objective import Draws, flow_matching_loss, trained_range
from fmconvert.training.reflow import load_couplings, reflow
from fmconvert.training.settings import TrainSettings

N, SHARD = 20, 8  # couplings, and per shard: shards of 8, 8 and 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-channel 8×8 DDPM folder (random tiny UNet, linear betas, epsilon)."""
    return save_ddpm_folder(tmp_path_factory.mktemp("reflow") / "tiny")


def couplings_run(model, num=N, solver="unipc", steps=3, seed=0, **fields):
    return Run(model=str(model), fingerprint=model_fingerprint(inspect_source(str(model))),
               sampler=OdeSampler(solver, options=solver_options(solver)), steps=steps, seed=seed, num_images=num,
               shard_size=SHARD, **fields)


def run(model, out, couplings=None, **fields):
    """Library reflow() with small defaults; returns (summary, training.json)."""
    fields = {"train_steps": 3, "batch_size": 8, "lr": 1e-3, "warmup": 0, "ema_decay": 0.0, **fields}
    summary = reflow(couplings or couplings_run(model), out, **fields)
    return summary, json.loads((out / "training.json").read_text())


def stored(folder):
    return torch.cat([load_file(str(p))["samples"] for p in sorted(folder.glob("shard-*.safetensors"))])


def network_weights(out):
    return load_file(str(out / "unet" / "network" / "diffusion_pytorch_model.safetensors"))


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_couplings_are_the_solvers_samples_of_the_regenerated_noise(tmp_path, tiny):
    """The stored couplings are, bit for bit, UniPC's solve from the documented noise of the seed (drawn here at once,
    batch by batch as the shards split it); the noise paired with them in training is that noise, regenerated, not
    stored; the output is a converted folder stock diffusers and fmconvert sample load, with couplings.json naming
    the run whose fingerprint the training settings carry."""
    from diffusers import DiffusionPipeline

    from fmconvert.math.solvers import solve
    from fmconvert.sampling.model import load_velocity_model, sampling_grid

    out, folder = tmp_path / "reflowed", tmp_path / "couplings"
    summary = json.loads(ok("reflow", tiny, "--out", out, "--num-couplings", N, "--solver", "unipc", "--steps", 3,
                            "--sample-batch-size", SHARD, "--couplings-dir", folder, "--train-steps", 2,
                            "--batch-size", 4, "--seed", 5, "--json").stdout)
    vm = load_velocity_model(str(tiny))
    eps = torch.randn((N, 3, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    grid = sampling_grid(vm, "uniform", 3)
    assert grid[0] == 1  # the trajectory starts at ε itself

    def field(x, s):
        return vm.velocity.evaluate(x, 1000 * s, output_dtype=torch.float32)

    with torch.no_grad():
        expected = torch.cat([solve(field, eps[i:i + SHARD], grid, "unipc").x for i in range(0, N, SHARD)])
    couplings = stored(folder)
    assert couplings.shape == (N, 3, 8, 8) and torch.equal(couplings, expected.float())
    assert set(load_file(str(next(folder.glob("shard-*.safetensors"))))) == {"samples"}  # the noise is not stored
    run_ = couplings_run(tiny, seed=5).loaded("UNet2DModel", (3, 8, 8))
    data = load_couplings(folder, run_)
    assert torch.equal(data.noise, eps) and torch.equal(data.values, couplings)
    record = json.loads((out / "couplings.json").read_text())
    settings = json.loads((out / "training.json").read_text())["settings"]
    assert record["run"] == run_.manifest() == json.loads((folder / "manifest.json").read_text())
    assert settings["couplings"] == record["fingerprint"] == run_fingerprint(run_) == summary["couplings"]["fingerprint"]
    assert settings["distill"] is False and settings["seed"] == 5 and summary["train_steps"] == 2
    assert not work_folder(out).exists() and record["kept"]
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.unet).__name__ == "VelocityAdapter"
    assert json.loads(ok("sample", out, "--steps", 2, "--num-images", 2, "--json").stdout)["nfe"] == 2
    # the couplings' noise (seed 5) is training data: sampling from it says so, from another seed it does not
    assert "note: seed 5 is the noise" in ok("sample", out, "--steps", 2, "--num-images", 2, "--seed", 5).stderr
    assert "note" not in ok("sample", out, "--steps", 2, "--num-images", 2, "--seed", 6).stderr


def test_the_first_loss_is_the_source_fields_loss_on_the_pairs(tmp_path, tiny):
    """Step 1's logged loss is the source field's flow-matching loss on the couplings' straight paths: each x0 of the
    batch is a stored coupling and its ε is that coupling's own noise (regenerated here from the seed), and the loss
    computed from the network directly on them matches; with fresh noise instead of the pairs' the loss differs."""
    from fmconvert.sampling.model import load_velocity_model

    out, folder = tmp_path / "out", tmp_path / "couplings"
    summary, record = run(tiny, out, couplings_dir=folder, train_steps=1, batch_size=16)
    vm = load_velocity_model(str(tiny), compute_dtype="float64")
    settings = TrainSettings(**{k: tuple(v) if k == "lora_targets" else v for k, v in record["settings"].items()})
    data = load_couplings(folder, couplings_run(tiny).loaded("UNet2DModel", (3, 8, 8)))
    x0, eps, s = Draws(settings, data, trained_range(vm.velocity)).batch(0)
    couplings = stored(folder)
    noise = torch.randn((N, 3, 8, 8), generator=torch.Generator("cpu").manual_seed(0))
    index = [next(j for j in range(N) if torch.equal(couplings[j], row)) for row in x0]
    assert len(set(index)) == 16 and torch.equal(eps, noise[index])
    with torch.no_grad():
        reference = weighted_epsilon_loss(vm.velocity, couplings[index], noise[index], s).mean().item()
        unpaired = Draws(settings, TrainingData(data.values, "couplings"), trained_range(vm.velocity)).batch(0)
        fresh = weighted_epsilon_loss(vm.velocity, *unpaired).mean().item()
    assert record["loss"][0] == pytest.approx(reference, rel=1e-5)
    assert abs(fresh - reference) > 1e-3 * reference


def test_resuming_after_interruptions_in_the_couplings_and_in_training_equals_an_uninterrupted_run(tmp_path, tiny,
                                                                                                 monkeypatch):
    """Interrupted while drawing the couplings (after shard 1 of 3), the command exits 130 saying the shard is kept;
    the rerun draws only shards 2 and 3 and is interrupted after training step 3 (checkpoints every 2); the next
    rerun resumes from step 2 and writes the weights and losses of the run never interrupted."""
    fields = dict(train_steps=6, checkpoint_every=2, ema_decay=0.9, time_sampling="logit_normal")
    _, whole = run(tiny, tmp_path / "whole", **fields)
    save, saved = ShardStore.save, []

    def save_then_stop(self, index, samples, nfe):
        if saved and saved[-1] == "stop":
            raise KeyboardInterrupt
        save(self, index, samples, nfe)
        saved.append(index)

    out = tmp_path / "cut"
    monkeypatch.setattr(ShardStore, "save", lambda self, *a: (save_then_stop(self, *a), saved.append("stop")))
    args = ["reflow", tiny, "--out", out, "--num-couplings", N, "--steps", 3, "--sample-batch-size", SHARD,
            "--train-steps", 6, "--batch-size", 8, "--lr", 1e-3, "--warmup", 0, "--ema-decay", 0.9,
            "--time-sampling", "logit-normal", "--checkpoint-every", 2]
    result = invoke(*args)
    assert result.exit_code == 130 and "the 1 complete shards of couplings" in result.stderr and "kept" in result.stderr
    assert saved == [0, "stop"] and len(list((work_folder(out) / "couplings").glob("shard-*"))) == 1
    monkeypatch.setattr(ShardStore, "save", save_then_stop)
    saved.clear()

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny, out, on_step=interrupt, **fields)
    assert saved == [1, 2] and checkpoint_step(work_folder(out) / CHECKPOINT) == 2 and not out.exists()
    saved.clear()
    done = []
    summary, resumed = run(tiny, out, on_step=done.append, **fields)
    assert saved == [] and summary["couplings"]["shards_reused"] == 3
    assert summary["resumed_from"] == 2 and done == [3, 4, 5, 6]
    assert resumed["loss"] == whole["loss"]
    a, b = network_weights(tmp_path / "whole"), network_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not work_folder(out).exists()


def _fails(what):
    def fail(*args, **kwargs):
        raise AssertionError(what)

    return fail


@pytest.fixture
def nothing_runs(monkeypatch):
    """Any coupling drawn or training step taken fails the test: a refusal comes before both."""
    monkeypatch.setattr("fmconvert.sampling.generate.iter_run", _fails("a coupling was drawn"))
    monkeypatch.setattr(Draws, "batch", _fails("a training step ran"))


def test_bad_option_values_are_refused_in_one_line_before_anything_runs(tmp_path, tiny, nothing_runs):
    """Each bad value: exit 2, one line naming the option, nothing drawn or trained, no output or work folder; an
    existing output without --force is left as it was."""
    out = tmp_path / "out"
    base = ["reflow", tiny, "--out", out]
    cases = [
        (["--num-couplings", 0], "--num-couplings must be a positive integer"),
        (["--sample-batch-size", 0], "--sample-batch-size must be a positive integer"),
        (["--train-steps", 0], "--train-steps 0: must be a positive integer"),
        (["--lr", -1], "--lr -1.0: must be positive"),
        (["--steps", "2,3"], "give one --steps value"),
        (["--solver", "nope"], "unknown --solver 'nope'"),
        (["--grid", "karras", "--shift", 2], "--shift 2.0"),
        (["--time-sampling", "beta"], "unknown --time-sampling"),
        (["--mixed-precision", "fp16", "--device", "cpu"], "--mixed-precision 'fp16' needs a GPU"),
        (["--checkpoint-every", 0], "--checkpoint-every must be a positive integer"),
        (["--prediction-type", "score"], "unknown --prediction-type 'score'"),
        (["--lora-rank", 2, "--lora-targets", "nothing"], "--lora-targets ('nothing',): no module"),
    ]
    for extra, message in cases:
        assert message in error(2, *base, *extra), extra
    assert not out.exists() and not work_folder(out).exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in error(2, *base)
    assert (out / "keep.txt").read_text() == "mine" and not work_folder(out).exists()
    flow = save_flow_folder(tmp_path / "flow")
    assert "flow-matching model" in error(2, "reflow", flow, "--out", out / "f", "--prediction-type", "v_prediction")
    assert not (out / "f").exists() and not work_folder(out / "f").exists()
    with pytest.raises(UsageError, match="distill=True .* needs couplings"):
        TrainSettings(model="m", fingerprint="f", data="d", data_fingerprint="g", distill=True)


def test_an_epsilon_network_is_told_of_v_prediction(tmp_path, tiny, nothing_runs):
    """Reflowing an epsilon network without prediction_type logs one note naming prediction_type='v_prediction'
    before anything is drawn; with it, no note."""
    for prediction_type, notes in ((None, 1), ("v_prediction", 0)):
        lines: list[str] = []
        with pytest.raises(AssertionError, match="a coupling was drawn"):
            reflow(couplings_run(tiny), tmp_path / str(prediction_type), log=lines.append, train_steps=1,
                   prediction_type=prediction_type)
        assert sum("prediction_type='v_prediction'" in line for line in lines) == notes, lines


def test_a_rerun_against_other_settings_is_refused_and_nothing_is_overwritten(tmp_path, tiny, monkeypatch):
    """An interrupted reflow (couplings drawn, checkpoint at step 2) rerun with another --lr: refused naming lr; with
    other couplings (--steps) in the same folder: refused naming steps; with another --couplings-dir holding other
    couplings (--steps 4) than those the checkpoint was trained on: refused naming couplings. Each exit 1, one line, before any
    coupling is drawn or step taken; the work folder is byte for byte as it was and no output appears."""
    out, folder = tmp_path / "out", tmp_path / "couplings"
    args = ["reflow", tiny, "--out", out, "--num-couplings", N, "--steps", 3, "--sample-batch-size", SHARD,
            "--train-steps", 4, "--batch-size", 4, "--checkpoint-every", 2]
    stop_training_at(monkeypatch, 2)
    result = invoke(*args)
    assert result.exit_code == 130 and "resume from step 2" in result.stderr
    before = digest(work_folder(out))
    assert "couplings/manifest.json" in before and CHECKPOINT in before
    monkeypatch.setattr("fmconvert.sampling.generate.iter_run", _fails("a coupling was drawn"))
    monkeypatch.setattr(Draws, "batch", _fails("a training step ran"))
    line = error(1, *args, "--lr", 0.01)
    assert "other settings" in line and "lr: 0.0001 there, 0.01 now" in line
    steps_4 = [4 if i == args.index("--steps") + 1 else a for i, a in enumerate(args)]
    line = error(1, *steps_4)
    assert "samples folder" in line and "steps: 3 there, 4 now" in line
    line = error(1, *steps_4, "--couplings-dir", folder)
    assert "other settings (couplings: 'sha256:" in line
    assert digest(work_folder(out)) == before and not out.exists() and not folder.exists()


def one_step_error(model, couplings):
    """Mean squared distance between one Euler step from each coupling's noise (s = 1 to 0) and its coupled sample."""
    from fmconvert.sampling.generate import generate
    from fmconvert.sampling.model import load_velocity_model

    vm = load_velocity_model(str(model))
    return (generate(vm, N, SHARD, 0, "euler", "uniform", 1).samples - couplings).square().mean().item()


def test_distill_trains_at_the_noise_end_only(tmp_path, tiny, monkeypatch):
    """--distill: every step's times are 1, the noise end (the loss's s recorded at each call), where x_s = ε, and the
    distilled model's one Euler step lands closer to the coupled samples than the source's: step 1's loss is the
    source's one-step error, and 60 steps cut it fivefold. (At s_hi, the top of the
    trained range, this fails: x_{s_hi} = ε + (1 − s_hi)·(x0 − ε) is far from ε for this random model's large samples.)"""
    seen = []
    loss = flow_matching_loss

    def recorded(model, target, x0, eps, s):
        seen.append(s.clone())
        return loss(model, target, x0, eps, s)

    monkeypatch.setattr(loop, "flow_matching_loss", recorded)  # where train looks it up
    out, folder = tmp_path / "distilled", tmp_path / "couplings"
    summary, record = run(tiny, out, couplings_dir=folder, distill=True, train_steps=60, batch_size=N, lr=1e-4)
    assert len(seen) == 60 and all(torch.equal(s, torch.ones(N, dtype=torch.float64)) for s in seen)
    assert record["settings"]["distill"] is True
    couplings = stored(folder)
    before, after = one_step_error(tiny, couplings), one_step_error(out, couplings)
    assert record["loss"][0] == pytest.approx(before, rel=1e-4)  # the loss is the one-step error itself
    assert after < 0.2 * before, (before, after)


def test_reflow_straightens_a_tiny_flow(tmp_path):
    """On a tiny flow-matching model, 150 reflow steps on its couplings bring one Euler step from each coupling's
    noise closer to the coupled sample (the paths straighter) than before: a mean squared distance of 3.7e-3 falls
    to 3.5e-4 (a factor of 10; asserted: at least 3)."""
    source = save_flow_folder(tmp_path / "flow")
    out, folder = tmp_path / "reflowed", tmp_path / "couplings"
    run(source, out, couplings=couplings_run(source, steps=8), couplings_dir=folder, train_steps=150, batch_size=N, lr=1e-3,
        warmup=10)
    couplings = stored(folder)
    before, after = one_step_error(source, couplings), one_step_error(out, couplings)
    assert after < 0.3 * before, (before, after)


@pytest.mark.parametrize("dtype,loads", [("float32", 1), ("float64", 2)])
def test_reflow_reads_the_weights_once_where_couplings_and_training_share_a_dtype(tmp_path, tiny, monkeypatch, dtype,
                                                                                 loads):
    """Couplings drawn in the weights' stored dtype (float32 here, the default) share the network train loads;
    in another dtype they load their own copy, so what each trains or samples is what it was before."""
    import fmconvert.integration.source as source_module
    import fmconvert.sampling.model as model_module

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("dtype"))
        return load(*args, **kwargs)

    load = source_module.load_denoiser
    monkeypatch.setattr(source_module, "load_denoiser", counted)
    monkeypatch.setattr(model_module, "load_denoiser", counted)
    run(tiny, tmp_path / "out", couplings_run(tiny, num=4, dtype=dtype), train_steps=1, batch_size=4)
    assert len(calls) == loads, calls
