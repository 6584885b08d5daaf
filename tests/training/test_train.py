"""fmconvert train: the flow-matching loss through the adapter, its identity with the source's
weighted epsilon loss, resumable checkpoints, EMA, LoRA, and the one-line refusals."""

import dataclasses
import hashlib
import json
import math
import sys

import pytest
import torch
from conftest import error, invoke, make_unet, ok, save_ddpm_folder, save_flow_folder, stop_training_at
from safetensors.torch import load_file, save_file

from fmconvert.evaluation.agreement import weighted_epsilon_loss
from fmconvert.training.checkpoint import CHECKPOINT, TrainState, check_checkpoint, load_checkpoint, save_checkpoint, work_folder
from fmconvert.training.data import load_training_data
from fmconvert.training.loop import train
from fmconvert.training.objective import Draws, flow_matching_loss, sample_times, trained_range
from fmconvert.training.settings import LORA_TARGETS, TrainSettings

DATA = "builtin:digits/train"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-channel 8×8 DDPM folder (random ~100k-parameter UNet, linear betas, epsilon): digits fit it."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path_factory.mktemp("train") / "tiny"
    DDPMPipeline(unet=make_unet(0, channels=1), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


def run(model, out, **fields):
    """Library train() with small defaults; returns (summary, training.json)."""
    checkpoint_every = fields.pop("checkpoint_every", 500)
    on_step = fields.pop("on_step", None)
    settings = TrainSettings.create(str(model), fields.pop("data", DATA),
                                    **{"train_steps": 3, "batch_size": 8, "lr": 1e-3, "warmup": 0, "ema_decay": 0.0, **fields})
    summary = train(settings, out, checkpoint_every=checkpoint_every, on_step=on_step)
    return summary, json.loads((out / "training.json").read_text())


def network_weights(out):
    return load_file(str(out / "unet" / "network" / "diffusion_pytorch_model.safetensors"))


def source_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_the_output_loads_in_stock_diffusers_and_fmconvert_sample(tmp_path, tiny):
    """The trained folder is a converted folder: stock diffusers loads it (and its pipeline runs), fmconvert
    samples it, its network is the trained one (not the source's), and it carries loss.png and training.json."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "trained"
    summary = json.loads(ok("train", tiny, "--data", DATA, "--out", out, "--train-steps", 3, "--batch-size", 8, "--lr", 1e-3,
                            "--warmup", 0, "--time-sampling", "u-shaped", "--loss-type", "pseudo-huber", "--json").stdout)
    assert summary["train_steps"] == 3 and summary["resumed_from"] == 0 and not work_folder(out).exists()
    record = json.loads((out / "training.json").read_text())
    assert len(record["loss"]) == 3 and all(v > 0 for v in record["loss"])
    assert record["settings"]["model"] == str(tiny) and record["settings"]["ema_decay"] == 0.999
    assert (record["settings"]["time_sampling"], record["settings"]["loss_type"]) == ("u_shaped", "pseudo_huber")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "fmconvert.json").read_text())["trained"]["train_steps"] == 3
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.unet).__name__ == "VelocityAdapter"
    trained, before = network_weights(out), source_weights(tiny)
    assert trained.keys() == before.keys() and any(not torch.equal(trained[k], before[k]) for k in trained)
    assert all(torch.equal(v, pipe.unet.model.state_dict()[k]) for k, v in trained.items())
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 1)
    sampled = json.loads(ok("sample", out, "--steps", 2, "--num-images", 2, "--json").stdout)
    assert sampled["shape"] == [1, 8, 8] and sampled["nfe"] == 2


def test_the_first_loss_is_the_sources_reweighted_epsilon_loss(tmp_path):
    """Step 1's logged loss (the pretrained digits-eps, before any update) is the source's epsilon loss on
    the same draws, each sample weighted by (1 − s)⁻², computed from the network directly (float32); and in
    float64 the flow-matching loss per sample equals it to rounding."""
    from fmconvert.sampling.model import load_velocity_model

    settings = TrainSettings.create("builtin:digits-eps", DATA, train_steps=1, batch_size=32, lr=1e-4, warmup=0)
    out = tmp_path / "eps"
    train(settings, out)
    logged = json.loads((out / "training.json").read_text())["loss"][0]
    vm = load_velocity_model("builtin:digits-eps", compute_dtype="float64")
    data = load_training_data(DATA, (1, 8, 8), False)
    x0, eps, s = Draws(settings, data, trained_range(vm.velocity)).batch(0)
    with torch.no_grad():
        reference = weighted_epsilon_loss(vm.velocity, x0, eps, s)
        assert logged == pytest.approx(reference.mean().item(), rel=1e-6)
        vm64 = load_velocity_model("builtin:digits-eps", dtype=torch.float64, compute_dtype="float64")
        fm = flow_matching_loss(vm64.velocity, vm64.velocity.target_path, x0.double(), eps.double(), s)
        torch.testing.assert_close(fm, weighted_epsilon_loss(vm64.velocity, x0, eps, s), rtol=1e-12, atol=0)
    assert s.min() >= trained_range(vm.velocity)[0] and s.max() <= trained_range(vm.velocity)[1]


def test_a_diffusion_network_trains_into_another_prediction_type(tmp_path, tiny):
    """--prediction-type v_prediction: from step 1 the network's output is read as v on the source's schedule (the
    first loss is the flow-matching loss of the source's network wrapped by VelocityAdapter.from_diffusion as a v
    model, on the same draws), and the written folder says so: loaded, its field is the trained network read as v,
    and stock diffusers samples it. A converted folder trains into another type the same way."""
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel

    from fmconvert.integration.adapters import VelocityAdapter
    from fmconvert.sampling.model import load_velocity_model

    out = tmp_path / "v"
    _, record = run(tiny, out, train_steps=2, batch_size=16, prediction_type="v_prediction")
    scheduler = DDPMScheduler.from_pretrained(tiny / "scheduler")
    settings = TrainSettings.create(str(tiny), DATA, train_steps=2, batch_size=16)
    source = VelocityAdapter.from_diffusion(UNet2DModel.from_pretrained(tiny / "unet"), scheduler, "v_prediction")
    x0, eps, s = Draws(settings, load_training_data(DATA, (1, 8, 8), False), trained_range(source)).batch(0)
    with torch.no_grad():
        first = flow_matching_loss(source, source.target_path, x0, eps, s).mean().item()
        assert record["loss"][0] == pytest.approx(first, rel=1e-6)
        as_epsilon = VelocityAdapter.from_diffusion(UNet2DModel.from_pretrained(tiny / "unet"), scheduler)
        assert flow_matching_loss(as_epsilon, as_epsilon.target_path, x0, eps, s).mean().item() != pytest.approx(first, rel=1e-3)
        assert json.loads((out / "unet" / "config.json").read_text())["source_prediction"] == "v_prediction"
        trained = UNet2DModel.from_pretrained(out / "unet" / "network")
        expected = VelocityAdapter.from_diffusion(trained, scheduler, "v_prediction", compute_dtype="float32")
        x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(700.0)
        got = load_velocity_model(str(out)).velocity(x, t).sample
        torch.testing.assert_close(got, expected(x, t).sample, rtol=1e-6, atol=1e-6)
    assert DiffusionPipeline.from_pretrained(out, trust_remote_code=True)(batch_size=1, num_inference_steps=2,
                                                                           output_type="np").images.shape == (1, 8, 8, 1)
    wrapped = tmp_path / "wrapped"
    ok("wrap", tiny, "--out", wrapped)
    run(wrapped, tmp_path / "x0", train_steps=1, prediction_type="sample")
    assert json.loads((tmp_path / "x0" / "unet" / "config.json").read_text())["source_prediction"] == "sample"
    assert json.loads((wrapped / "unet" / "config.json").read_text())["source_prediction"] == "epsilon"


def test_the_loss_decreases_from_a_random_network(tmp_path, tiny):
    """50 steps from random initialisation: the last ten losses average under a quarter of the first ten."""
    _, record = run(tiny, tmp_path / "fit", train_steps=50, batch_size=32, lr=3e-3, warmup=5)
    losses = record["loss"]
    assert sum(losses[-10:]) < 0.25 * sum(losses[:10]), losses


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny):
    """Interrupted after step 5 with checkpoints every 3: the rerun resumes from step 3, runs steps 4–8 only,
    and writes the same weights (network and EMA) and losses as the run that was never interrupted."""
    fields = dict(train_steps=8, checkpoint_every=3, ema_decay=0.9, time_sampling="logit_normal")
    _, whole = run(tiny, tmp_path / "whole", **fields)

    def interrupt(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path / "cut", on_step=interrupt, **fields)
    assert not (tmp_path / "cut").exists()
    assert load_file(str(work_folder(tmp_path / "cut") / CHECKPOINT))["losses"].shape == (3,)
    done = []
    summary, resumed = run(tiny, tmp_path / "cut", on_step=done.append, **fields)
    assert summary["resumed_from"] == 3 and done == [4, 5, 6, 7, 8]
    assert resumed["loss"] == whole["loss"]
    a, b = network_weights(tmp_path / "whole"), network_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not work_folder(tmp_path / "cut").exists()


def test_the_command_line_says_how_to_resume_an_interrupted_run(tmp_path, tiny, monkeypatch):
    """An interruption in the middle of a step (here: drawing step 3's batch) exits 130 with a line saying
    how to resume; the checkpoint of step 2 stays, and the same command resumes from it."""
    args = ["train", tiny, "--data", DATA, "--out", tmp_path / "o", "--train-steps", 4, "--batch-size", 4,
            "--checkpoint-every", 2, "--json"]
    batch = stop_training_at(monkeypatch, 2)
    result = invoke(*args)
    assert result.exit_code == 130 and "rerun the same command to resume from step 2" in result.stderr
    monkeypatch.setattr(Draws, "batch", batch)
    assert json.loads(ok(*args).stdout)["resumed_from"] == 2


@pytest.fixture
def no_steps(monkeypatch):
    """Any training step fails the test loudly: a refusal must come before the first step."""

    def step_taken(self, step):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(Draws, "batch", step_taken)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_data_is_refused_in_one_line_before_any_step(tmp_path, tiny, ddpm_folder, no_steps):
    """Wrong channel count, wrong size, an empty folder, latents of the wrong shape: one line, exit 2, no output."""
    from PIL import Image

    out = tmp_path / "out"
    line = error(2, "train", ddpm_folder, "--data", DATA, "--out", out)
    assert "1-channel images" in line and "takes 3 channels" in line
    big = tmp_path / "big"
    big.mkdir()
    for i in range(2):
        Image.new("L", (16, 16), 40 * i).save(big / f"{i}.png")
    line = error(2, "train", tiny, "--data", big, "--out", out)
    assert "16×16 images" in line and "takes 8×8" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no images" in error(2, "train", tiny, "--data", empty, "--out", out)
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"samples": torch.zeros(4, 3, 8, 8)}, str(shards / "shard-000000.safetensors"))
    assert "3-channel latents" in error(2, "train", tiny, "--data", shards, "--out", out)
    assert not out.exists() and not work_folder(out).exists()


def test_settings_and_options_that_cannot_run_are_refused_in_one_line(tmp_path, tiny, monkeypatch, no_steps):
    """fp16 on the CPU, LoRA without peft, an existing output without --force, a bad option value: one line
    each, before any step, and the existing output untouched."""
    out = tmp_path / "out"
    base = ["train", tiny, "--data", DATA, "--out", out]
    assert "--mixed-precision 'fp16' needs a GPU" in error(2, *base, "--mixed-precision", "fp16", "--device", "cpu")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "peft", None)
        assert "needs peft" in error(2, *base, "--lora-rank", 4)
    assert "--ema-decay 1.0: must be in [0, 1)" in error(2, *base, "--ema-decay", 1.0)
    assert "unknown --time-sampling" in error(2, *base, "--time-sampling", "beta")
    assert "unknown --loss-type 'l1'" in error(2, *base, "--loss-type", "l1")
    assert "--u-shape-a 0.0: must be positive" in error(2, *base, "--time-sampling", "u-shaped", "--u-shape-a", 0)
    # optimiser steps are --train-steps in train as in reflow; the old spelling is refused, naming the new one
    assert "train's optimiser steps are --train-steps 3" in error(2, *base, "--steps", 3)
    assert "unknown --prediction-type 'score'" in error(2, *base, "--prediction-type", "score")
    flow = save_flow_folder(tmp_path / "flow")
    assert "flow-matching model" in error(2, "train", flow, "--data", DATA, "--out", out, "--prediction-type", "sample")
    assert "--lora-targets ('nothing',)" in error(2, *base, "--lora-rank", 2, "--lora-targets", "nothing")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in error(2, *base)
    assert (out / "keep.txt").read_text() == "mine" and not work_folder(out).exists()


def test_a_checkpoint_of_other_settings_is_refused_and_kept(tmp_path, tiny, monkeypatch):
    """A rerun with another --lr against an interrupted run's checkpoint: exit 1, one line naming lr, before
    any step; the checkpoint is byte for byte what it was and no output appears."""
    out = tmp_path / "out"
    stop_training_at(monkeypatch, 2)
    error_code = ["train", tiny, "--data", DATA, "--out", out, "--train-steps", 4, "--batch-size", 4, "--checkpoint-every", 1]
    assert invoke(*error_code).exit_code == 130
    before = digest(work_folder(out))

    def step_taken(self, step):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(Draws, "batch", step_taken)
    line = error(1, *error_code, "--lr", 0.01)
    assert "other settings" in line and "lr: 0.0001 there, 0.01 now" in line
    assert digest(work_folder(out)) == before and not out.exists()


def test_lora_trains_only_its_adapters_and_writes_merged_weights(tmp_path, tiny):
    """--lora-rank: AdamW holds state for the LoRA matrices alone (two per adapted projection); the written
    network has the source's keys (merged: no peft needed to load it) and differs from the source exactly in
    the adapted projections' weights."""
    out = tmp_path / "lora"
    seen = {}

    def keep_checkpoint(step):
        if step == 2:
            seen.update(load_file(str(work_folder(out) / CHECKPOINT)))

    run(tiny, out, train_steps=3, lora_rank=2, lr=1e-2, checkpoint_every=2, on_step=keep_checkpoint)
    targets = LORA_TARGETS
    adapted = [k for k in seen if k.startswith("network.") and ".lora_A." in k]
    assert adapted and all(any(f".{t}.lora_A." in k for t in targets) for k in adapted)
    optimised = {k.split(".")[1] for k in seen if k.startswith("optimizer.")}
    assert len(optimised) == 2 * len(adapted)
    trained, before = network_weights(out), source_weights(tiny)
    assert trained.keys() == before.keys()
    changed = {k for k in trained if not torch.equal(trained[k], before[k])}
    assert changed and all(k.endswith(".weight") and any(f".{t}." in k for t in targets) for k in changed)


def test_the_ema_is_the_documented_recursion(tmp_path, tiny):
    """With a constant learning rate the first k steps do not depend on the run's length, so the raw weights
    θ1, θ2, θ3 come from runs of 1, 2, 3 steps without EMA; with decay 0.5 the written weights are
    e3 = 0.25·θ1 + 0.25·θ2 + 0.5·θ3 (e1 = θ1, e_k = d·e_(k−1) + (1 − d)·θ_k); decay 0 writes θ3 itself."""
    theta = []
    for k in (1, 2, 3):
        run(tiny, tmp_path / f"raw{k}", train_steps=k)
        theta.append(network_weights(tmp_path / f"raw{k}"))
    run(tiny, tmp_path / "ema", train_steps=3, ema_decay=0.5)
    ema = network_weights(tmp_path / "ema")
    for key, value in ema.items():
        torch.testing.assert_close(value, 0.25 * theta[0][key] + 0.25 * theta[1][key] + 0.5 * theta[2][key])
    assert any(not torch.equal(ema[k], theta[2][k]) for k in ema)


def test_latent_shards_train_as_they_are_and_bf16_runs_on_the_cpu(tmp_path, tiny):
    """A folder of shards (key 'samples') is data as it is; bf16 autocast runs on the CPU."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for j in range(2):
        save_file({"samples": torch.randn(5, 1, 8, 8)}, str(shards / f"shard-{j:06d}.safetensors"))
    data = load_training_data(str(shards), (1, 8, 8), latent_model=True)
    assert data.kind == "latents" and len(data.values) == 10
    torch.testing.assert_close(data.x0(torch.tensor([7])), load_file(str(shards / "shard-000001.safetensors"))["samples"][2:3])
    summary, record = run(tiny, tmp_path / "bf16", data=str(shards), train_steps=2, mixed_precision="bf16")
    assert record["settings"]["mixed_precision"] == "bf16" and all(torch.isfinite(torch.tensor(record["loss"])))


def test_times_follow_the_truncated_densities():
    """Uniform: linear in u over the trained range; logit-normal: Φ((logit s − m)/σ) is linear in u between
    its values at the range's ends (the truncated distribution function), and u = ½ on [0, 1] is sigmoid(m);
    U-shaped: its distribution function likewise, symmetric about s = ½.
    The trained range: digits-eps's t = 0 and 999 at equal log-SNR; a flow source's [0, 1]."""
    from fmconvert.sampling.model import load_velocity_model

    u = torch.linspace(0, 0.999, 7, dtype=torch.float64)
    settings = TrainSettings("m", "f", "d", "g")
    torch.testing.assert_close(sample_times(settings, u, (0.1, 0.7)), 0.1 + 0.6 * u)
    logit = dataclasses.replace(settings, time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    s = sample_times(logit, u, (0.05, 0.9))
    cdf = torch.special.ndtr((torch.logit(s) - 0.5) / 0.8)
    a, b = (torch.special.ndtr((torch.logit(torch.tensor(x, dtype=torch.float64)) - 0.5) / 0.8) for x in (0.05, 0.9))
    torch.testing.assert_close(cdf, a + (b - a) * u)
    assert sample_times(logit, torch.tensor([0.5]), (0.0, 1.0)).item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())
    # U-shaped (Lee et al. 2024): F(s) = (e^{as} − e^{a(1−s)} + e^a − 1)/(2(e^a − 1)), linear in u between the ends
    u_shaped = dataclasses.replace(settings, time_sampling="u_shaped", u_shape_a=3.0)
    s = sample_times(u_shaped, u, (0.05, 0.9))
    e3 = math.exp(3.0)
    F = lambda x: (torch.exp(3.0 * torch.as_tensor(x, dtype=torch.float64)) - torch.exp(3.0 * (1 - torch.as_tensor(x, dtype=torch.float64)))  # noqa: E731
                   + e3 - 1) / (2 * (e3 - 1))
    torch.testing.assert_close(F(s), F(0.05) + (F(0.9) - F(0.05)) * u)
    whole = sample_times(u_shaped, torch.tensor([0.0, 0.5, 1.0]), (0.0, 1.0))  # symmetric about ½
    torch.testing.assert_close(whole, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    lo, hi = trained_range(load_velocity_model("builtin:digits-eps").velocity)
    acp0 = float(1 - torch.tensor(1e-4, dtype=torch.float32))  # ᾱ_0 of linear betas, in diffusers' float32
    assert lo == pytest.approx((1 - acp0) ** 0.5 / (acp0 ** 0.5 + (1 - acp0) ** 0.5), rel=1e-9)
    assert hi == pytest.approx(0.99369, abs=1e-5)
    assert trained_range(load_velocity_model("builtin:digits-flow").velocity) == (0.0, 1.0)


def test_pseudo_huber_is_quadratic_for_small_errors_and_linear_for_large_ones(tmp_path, tiny):
    """per_sample_loss: l2 is the mean square itself; pseudo_huber is (√(‖δ‖² + c²) − c)/d with c = 0.00054·d
    computed from the error vector, ≈ ‖δ‖²/(2c·d) far below c and ‖δ‖/d − c/d far above; and it is what
    --loss-type pseudo_huber trains: step 1's recorded loss is it on step 1's draws."""
    from fmconvert.integration.adapters import VelocityAdapter
    from fmconvert.training.objective import per_sample_loss

    delta = torch.randn(5, 1, 8, 8, dtype=torch.float64) * torch.tensor([1e-5, 1e-3, 1e-1, 1.0, 10.0],
                                                                        dtype=torch.float64).view(-1, 1, 1, 1)
    mse, d = delta.square().flatten(1).mean(1), 64
    assert torch.equal(per_sample_loss(mse, d, "l2"), mse)
    c, norm = 0.00054 * d, delta.flatten(1).norm(dim=1)
    huber = per_sample_loss(mse, d, "pseudo_huber")
    torch.testing.assert_close(huber, ((norm ** 2 + c ** 2).sqrt() - c) / d, rtol=1e-12, atol=0)
    assert huber[0].item() == pytest.approx(norm[0].item() ** 2 / (2 * c * d), rel=1e-4)
    assert huber[-1].item() == pytest.approx((norm[-1].item() - c) / d, rel=1e-4)

    from diffusers import DDPMScheduler, UNet2DModel

    _, record = run(tiny, tmp_path / "huber", train_steps=1, batch_size=16, loss_type="pseudo_huber")
    assert record["settings"]["loss_type"] == "pseudo_huber"
    settings = TrainSettings.create(str(tiny), DATA, train_steps=1, batch_size=16)
    source = VelocityAdapter.from_diffusion(UNet2DModel.from_pretrained(tiny / "unet"),
                                            DDPMScheduler.from_pretrained(tiny / "scheduler"))
    x0, eps, s = Draws(settings, load_training_data(DATA, (1, 8, 8), False), trained_range(source)).batch(0)
    with torch.no_grad():
        mse = flow_matching_loss(source, source.target_path, x0, eps, s)
    assert record["loss"][0] == pytest.approx(per_sample_loss(mse, 64, "pseudo_huber").mean().item(), rel=1e-6)
    assert record["loss"][0] != pytest.approx(mse.mean().item(), rel=1e-2)


OTHER = {
    "model": "other", "fingerprint": "sha256:y", "data": "other", "data_fingerprint": "sha256:z", "train_steps": 7,
    "batch_size": 3, "lr": 0.5, "warmup": 9, "lr_schedule": "cosine", "weight_decay": 0.1, "max_grad_norm": 0.0,
    "time_sampling": "logit_normal", "logit_mean": 1.0, "logit_std": 2.0, "u_shape_a": 2.0, "loss_type": "pseudo_huber",
    "ema_decay": 0.5, "lora_rank": 4,
    "lora_alpha": 8, "lora_targets": ("to_q",), "mixed_precision": "bf16", "seed": 3, "couplings": "sha256:c",
    "distill": True, "prediction_type": "v_prediction", "fmconvert_version": "9",
}


def test_every_setting_reaches_the_manifest_and_is_compared_on_resume(tmp_path):
    """Each field of TrainSettings, changed alone, changes the manifest, and a checkpoint made with the other
    value is refused naming it. A new field without an entry in OTHER fails here. (The base trains on couplings,
    which --distill needs.)"""
    base = TrainSettings(model="m", fingerprint="sha256:x", data="d", data_fingerprint="sha256:d", couplings="sha256:b")
    assert set(OTHER) == {f.name for f in dataclasses.fields(TrainSettings)} == set(base.manifest())
    state = TrainState(1, {"w": torch.zeros(2)}, None, {0: {"step": torch.tensor(1.0)}}, {"cpu": torch.get_rng_state()},
                       torch.zeros(1, dtype=torch.float64))
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, base, state)
    check_checkpoint(path, base)
    for name, value in OTHER.items():
        changed = dataclasses.replace(base, **{name: value})
        assert changed.manifest() != base.manifest(), name
        with pytest.raises(Exception, match=f"other settings \\({name}: "):
            check_checkpoint(path, changed)


def test_a_checkpoint_round_trips(tmp_path):
    """Every tensor, the step, the seconds and the scaler state come back as saved."""
    base = TrainSettings(model="m", fingerprint="sha256:x", data="d", data_fingerprint="sha256:d")
    state = TrainState(4, {"a.weight": torch.randn(3, 2)}, {"n_averaged": torch.tensor(4), "module.a.weight": torch.randn(3, 2)},
                       {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(3, 2)}}, {"cpu": torch.get_rng_state()},
                       torch.rand(4, dtype=torch.float64), 1.5, {"scale": 1024.0})
    save_checkpoint(tmp_path / CHECKPOINT, base, state)
    back = load_checkpoint(tmp_path / CHECKPOINT)
    assert (back.step, back.seconds, back.scaler) == (4, 1.5, {"scale": 1024.0})
    for mine, theirs in ((state.network, back.network), (state.ema, back.ema), (state.optimizer[0], back.optimizer[0]),
                         (state.rng, back.rng)):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(back.losses, state.losses)


def test_a_ddpm_source_of_three_channels_trains_on_an_image_folder(tmp_path):
    """RGB PNGs of the model's size are data in [-1, 1]: x0 = v/127.5 − 1."""
    from PIL import Image

    folder = save_ddpm_folder(tmp_path / "rgb")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (255, 0, 10 * i)).save(images / f"{i}.png")
    data = load_training_data(str(images), (3, 8, 8), latent_model=False)
    assert data.kind == "images" and data.values.dtype == torch.uint8
    torch.testing.assert_close(data.x0(torch.tensor([2]))[0, :, 0, 0], torch.tensor([1.0, -1.0, 20 / 127.5 - 1]))
    summary, record = run(folder, tmp_path / "out", data=str(images), train_steps=2, batch_size=4)
    assert len(record["loss"]) == 2


def test_a_flow_source_keeps_its_layout_and_its_loss_is_the_plain_flow_matching_loss(tmp_path):
    """A flow-matching source is its own velocity model: the output keeps its pipeline (FlowMatch scheduler,
    the network in unet/ itself), loads in stock diffusers, and step 1's loss is |v_θ(x_s, 1000·s) − (ε − x0)|²
    of the network called directly on the same draws (the identity adapter adds nothing)."""
    from diffusers import DDPMPipeline, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    source = tmp_path / "flow"
    DDPMPipeline(unet=make_unet(5, channels=1), scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(source)
    before = digest(source)
    out = tmp_path / "out"
    summary, record = run(source, out, train_steps=2, batch_size=16)
    assert summary["time_range"] == [0.0, 1.0] and digest(source) == before
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and type(pipe.unet).__name__ == "UNet2DModel"
    settings = TrainSettings.create(str(source), DATA, train_steps=2, batch_size=16, lr=1e-3, warmup=0, ema_decay=0.0)
    x0, eps, s = Draws(settings, load_training_data(DATA, (1, 8, 8), False), (0.0, 1.0)).batch(0)
    network = make_unet(5, channels=1)
    with torch.no_grad():
        x_s = ((1 - s.view(-1, 1, 1, 1)) * x0.double() + s.view(-1, 1, 1, 1) * eps.double()).float()
        v = network(x_s, (s * 1000).float()).sample
    assert record["loss"][0] == pytest.approx((v - (eps - x0)).square().mean().item(), rel=1e-6)


def test_training_a_converted_folder_leaves_it_untouched(tmp_path, tiny):
    """A folder written by fmconvert wrap trains in place of its source: the output has its layout with new
    network weights, and the converted folder (whose files the output first links) is byte for byte as before."""
    wrapped = tmp_path / "wrapped"
    ok("wrap", tiny, "--out", wrapped)
    before, source_before = digest(wrapped), digest(tiny)
    out = tmp_path / "out"
    run(wrapped, out, train_steps=2)
    assert digest(wrapped) == before and digest(tiny) == source_before
    trained = network_weights(out)
    assert any(not torch.equal(v, source_weights(tiny)[k]) for k, v in trained.items())
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "VelocityAdapter"
    ok("sample", out, "--steps", 2, "--num-images", 2)
    # a trained folder carries training.json and loss.png, which training it again writes anew: not through links
    trained_before = digest(out)
    _, again = run(out, tmp_path / "again", train_steps=1, lr=1e-4)
    assert digest(out) == trained_before and again["train_steps"] == 1
    assert json.loads((out / "training.json").read_text())["train_steps"] == 2


def test_two_processes_take_halves_of_the_same_batches(tmp_path, tiny):
    """torchrun with 2 processes (gloo): each takes half of every global batch, DDP averages the gradients, so
    every step's loss (after the first, computed with the weights both runs updated) equals one process's."""
    import os
    import subprocess

    args = ["-m", "fmconvert", "train", str(tiny), "--data", DATA, "--train-steps", 3, "--batch-size", 8, "--lr", 1e-3,
            "--warmup", 0, "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*launcher, *map(str, args), "--out", str(tmp_path / "two")], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "training.json").read_text())
    assert two["processes"] == 2
    from replicas import one_thread

    with one_thread():  # as each of the two processes runs (OMP_NUM_THREADS=1): the same reduction order
        _, one = run(tiny, tmp_path / "one", train_steps=3)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_the_cli_offers_every_training_setting_with_the_settings_default():
    """train and reflow take every TrainSettings field a user sets (not the identities the command fills in, the
    seed, or reflow's --distill) as an option whose default is the field's own (--lora-targets: None, meaning the
    field's default), read from fmconvert.training.settings, under the field's own name in both (optimiser steps are
    --train-steps in each); and importing the command line still imports no torch."""
    import inspect
    import subprocess

    from fmconvert.cli import options
    from fmconvert.cli import train as commands

    filled_in = {"model", "fingerprint", "data", "data_fingerprint", "seed", "couplings", "distill", "fmconvert_version"}
    assert set(options.TRAINING_OPTIONS) == {f.name for f in dataclasses.fields(TrainSettings)} - filled_in
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)} | {"lora_targets": None}
    for command in (commands.train, commands.reflow):
        parameters = inspect.signature(command).parameters
        for name in options.TRAINING_OPTIONS:
            assert parameters[name].default == defaults[name], (command.__name__, name)
    code = "import sys, fmconvert.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
