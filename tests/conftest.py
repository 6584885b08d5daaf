"""Shared fixtures: tiny randomly initialised diffusers models, built here, never downloaded."""

import os

# No test touches the network: the Hub client stays offline unless a test points it at
# the loopback fake Hub explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


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


@pytest.fixture
def unet():
    return make_unet()


@pytest.fixture
def cond_unet():
    return make_cond_unet()
