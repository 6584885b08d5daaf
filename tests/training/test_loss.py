"""The two training losses are one loss: on the rectified path the converted field's flow-matching
loss at s is the source's epsilon loss at the matched time times (1 − s)⁻², per sample, inside the
trained range (issue 18, item 3)."""

import json

import pytest
import torch
from conftest import error, make_unet, ok
from diffusers import DDPMScheduler

from fmconvert import VelocityAdapter
from fmconvert.evaluation.agreement import load_points, loss_identity
from fmconvert.sampling.model import load_velocity_model


@pytest.mark.threads(1)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_flow_matching_loss_is_the_reweighted_epsilon_loss(prediction_type):
    adapter = VelocityAdapter.from_diffusion(make_unet(seed=2), DDPMScheduler(prediction_type=prediction_type))
    data = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    table = loss_identity(adapter, data, 6)
    assert len(table["s"]) == 6 and max(table["max_relative_difference"]) < 1e-6
    # the weight is (1 − s)⁻²: the two means differ by far more under any other power
    fm, weighted = table["flow_matching_loss"], table["weighted_epsilon_loss"]
    assert max(abs(a / b - 1) for a, b in zip(fm, weighted)) < 1e-6
    assert max(table["s"]) > 0.99 and fm[-1] != pytest.approx(weighted[-1] * (1 - table["s"][-1]), rel=1e-2)


@pytest.mark.threads(1)
def test_loss_identity_on_the_trained_zoo_model():
    """builtin:digits-eps on held-out digits: measured 5e-16 … 2e-14 relative, per sample."""
    vm = load_velocity_model("builtin:digits-eps", compute_dtype="float64")
    table = loss_identity(vm.velocity, load_points("builtin:digits/held_out", 128), 5)
    assert max(table["max_relative_difference"]) < 1e-6
    assert all(0 < v < 10 for v in table["flow_matching_loss"][:-1])  # (a trained model: small inside the range)


def test_agree_reports_the_loss_identity_per_time(ddpm_folder):
    report = json.loads(ok("agree", ddpm_folder, "--num-points", 16, "--num-times", 4, "--steps", 2, "--num-images", 2,
                           "--loss", "--json").stdout)
    assert len(report["loss"]["s"]) == 4 and max(report["loss"]["max_relative_difference"]) < 1e-6
    assert "drop OTHER or --loss" in error(2, "agree", ddpm_folder, ddpm_folder, "--loss")


def test_agree_refuses_data_of_another_shape(ddpm_folder):
    """1×8×8 digits for a 3-channel model: a one-line usage error (was a RuntimeError from a convolution)."""
    line = error(2, "agree", ddpm_folder, "--data", "builtin:digits/held_out", "--num-points", 4)
    assert "holds 1×8×8 images" in line and "3×8×8" in line
