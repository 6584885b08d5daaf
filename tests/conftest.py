"""Shared fixtures: tiny randomly initialised diffusers models, built here, never downloaded."""

import os

# No test touches the network: the Hub client stays offline unless a test points it at
# the loopback fake Hub explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import random

# imported up front: importing diffusers sets TORCHINDUCTOR_CACHE_DIR, for which the isolation check below would
# blame whichever test imports it first (a module run alone, or an order where no earlier module imported it)
import diffusers  # noqa: F401
import numpy as np
import pytest
import torch

# two threads; one in each of pytest-xdist's workers (scripts/test.sh runs one a core), whose threads would
# otherwise outnumber the cores, and OpenMP's spinning threads then wait on each other
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def _global_state() -> dict:
    """What a test must leave as it found it: torch's and the process's global settings."""
    return {
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "torch grad mode": torch.is_grad_enabled(),
        "torch inference mode": torch.is_inference_mode_enabled(),
        "torch deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                           torch.is_deterministic_algorithms_warn_only_enabled()),
        "torch float32 matmul precision": torch.get_float32_matmul_precision(),
        "environment": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},  # (pytest's own)
        "working directory": os.getcwd(),
    }


def _restore(state: dict) -> None:
    torch.set_num_threads(state["torch threads"])
    torch.set_default_dtype(state["torch default dtype"])
    torch.set_grad_enabled(state["torch grad mode"])
    enabled, warn_only = state["torch deterministic algorithms"]
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.set_float32_matmul_precision(state["torch float32 matmul precision"])
    for name in set(os.environ) - set(state["environment"]) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[name]
    os.environ.update(state["environment"])
    os.chdir(state["working directory"])


def _difference(before, after) -> str:
    if isinstance(before, dict):
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        return ", ".join(f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}" for k in changed)
    return f"{before!r} -> {after!r}"


@pytest.fixture(autouse=True)
def _isolated(request):
    """Every test leaves torch's global state and the environment as it found it, so the suite
    passes in any order: the global settings above are restored after each test, and a test that
    changed one fails, naming it (a test that needs another setting takes it from a fixture that
    restores it, e.g. pytest's monkeypatch, or the ``threads`` marker). The random number
    generators (torch's, NumPy's, Python's), which tests seed to build their models, are restored
    without complaint."""
    marker = request.node.get_closest_marker("threads")
    before = _global_state()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    if marker is not None:
        torch.set_num_threads(marker.args[0])
    yield
    if marker is not None:
        torch.set_num_threads(before["torch threads"])
    after = _global_state()
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    if after != before:
        _restore(before)
        leaks = "; ".join(f"{name} ({_difference(before[name], after[name])})" for name in before
                          if after[name] != before[name])
        pytest.fail(f"the test changed global state and left it so: {leaks}", pytrace=False)


def make_unet(seed: int = 0, channels: int = 3, size: int = 8, **extra):
    """A ~100k-parameter UNet2DModel with the DDPM layout (attention in the lower block)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, **extra,
    ).eval()


def make_cond_unet(seed: int = 0, cross_attention_dim: int = 16):
    """A tiny text-conditioned UNet2DConditionModel (encoder_hidden_states of width 16)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def invoke(*args):
    """`fmconvert ARGS` through typer's CliRunner, whatever its exit code."""
    from typer.testing import CliRunner

    from fmconvert.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    """`fmconvert ARGS` through typer's CliRunner; asserts exit code 0."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output + result.stderr
    return result


def error(code, *args):
    """`fmconvert ARGS`; asserts exit ``code`` and one error line, no traceback; returns the line."""
    result = invoke(*args)
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def stop_training_at(monkeypatch, step):
    """Training is interrupted (KeyboardInterrupt) as it draws the batch of ``step`` (0-based): the steps
    before it are done. Returns the original ``Draws.batch``, to put back."""
    from fmconvert.training.objective import Draws

    batch = Draws.batch

    def interrupted(self, k):
        if k == step:
            raise KeyboardInterrupt
        return batch(self, k)

    monkeypatch.setattr(Draws, "batch", interrupted)
    return batch


@pytest.fixture
def unet():
    return make_unet()


@pytest.fixture
def cond_unet():
    return make_cond_unet()


def save_ddpm_folder(folder, seed: int = 0, scheduler=None):
    """An unconditional DDPMPipeline folder (tiny UNet, DDPMScheduler linear betas, epsilon)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=make_unet(seed), scheduler=scheduler or DDPMScheduler()).save_pretrained(folder)
    return folder


def save_flow_folder(folder, seed: int = 5):
    """An unconditional flow-matching pipeline folder: a tiny UNet read as a velocity field."""
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

    DDPMPipeline(unet=make_unet(seed), scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(folder)
    return folder


def save_sd_folder(folder, seed: int = 0):
    """A tiny StableDiffusionPipeline folder: character-level CLIP tokenizer written here,
    1-layer CLIP text encoder, 2-block VAE, the tiny conditional UNet, DDIM scheduler."""
    import json
    import string
    from pathlib import Path

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    vocab_dir = folder.parent / f".{folder.name}-vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + " .,":
        for token in (c, c + "</w>"):
            vocab.setdefault(token, len(vocab))
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=16,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=make_cond_unet(seed), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def ddpm_folder(tmp_path_factory):
    return save_ddpm_folder(tmp_path_factory.mktemp("src") / "ddpm")


@pytest.fixture(scope="session")
def flow_folder(tmp_path_factory):
    return save_flow_folder(tmp_path_factory.mktemp("src") / "flow")


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    return save_sd_folder(tmp_path_factory.mktemp("src") / "sd")


def interior_points(path, n=64, seed=0):
    """(point, x0, ε, x) at n times inside ``path``'s range (2 % … 98 % of it), x = α·x0 + σ·ε, float64, 5 values
    each: where the prediction-type round trips are measured."""
    g = torch.Generator().manual_seed(seed)
    t = path.t_min + (path.t_max - path.t_min) * (0.02 + 0.96 * torch.rand(n, dtype=torch.float64, generator=g))
    p = path.point(t).view_as_batch(2)
    x0, eps = torch.randn(n, 5, dtype=torch.float64, generator=g), torch.randn(n, 5, dtype=torch.float64, generator=g)
    return p, x0, eps, p.alpha * x0 + p.sigma * eps


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A loopback fake Hub (tests/fakehub.py) that huggingface_hub and diffusers talk to, offline mode off."""
    from fakehub import FakeHub

    with FakeHub() as fake:
        import huggingface_hub.constants as constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        import huggingface_hub.hf_api as hf_api

        monkeypatch.setattr(hf_api.api, "endpoint", fake.endpoint)  # the module-level client diffusers uses
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield fake
