"""The network: how a diffusers denoiser is called and how its output is read.

A :class:`NetworkCall` answers, for one network: the name of its sample argument, whether
the timestep is positional, whether its latents are packed, and how the prediction is read
from its output (learned variance: out_channels = 2 × in_channels, the first C channels are
the prediction and the rest passes through unchanged, so stock pipelines that split it keep
working). Samples are (B, C, h, w) on both sides of a call; a packed network (FLUX) sees
(B, h/2·w/2, 4·C).

:func:`network_call` reads one from the network's forward and config; whether its latents are
packed is its family's (:func:`fmconvert.integration.families.packs_latents`), passed in, so this
module knows no model class. Adapters and sampling call every network through it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it computes: `fmconvert wrap` reads configs only
    import torch


@dataclass(frozen=True)
class NetworkCall:
    """How a diffusers network is called and read.

    ``input_name``: its sample argument (``sample`` for UNets, ``hidden_states`` for
    transformers); ``timestep_positional``: whether ``timestep`` is its second positional
    parameter; ``channels``: C, the sample's channels; ``learned_variance``: whether the output
    has 2·C channels (prediction, then the variance interpolation of Nichol & Dhariwal 2021).
    """

    input_name: str
    timestep_positional: bool
    channels: int | None
    learned_variance: bool
    #: the network takes its latents packed in 2×2 patches, (B, h/2·w/2, 4·C) (FLUX): packed
    #: and unpacked around a call on (B, C, h, w) latents by its pipeline's own static methods (its
    #: pipeline hands a converted network packed latents: they pass as they are)
    packed: bool = False

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, args: tuple,
                 kwargs: dict) -> torch.Tensor:
        """The network's raw output (all its channels), shaped as ``x``."""
        if self.packed and x.ndim == 4:  # (its own pipeline hands it packed latents, (B, h/2·w/2, 4·C))
            from diffusers import FluxPipeline

            b, c, h, w = x.shape
            packed = FluxPipeline._pack_latents(x, b, c, h, w)
            out = model(*args, **{self.input_name: packed, "timestep": timestep}, **kwargs, return_dict=False)[0]
            return FluxPipeline._unpack_latents(out, h, w, 1)
        if self.timestep_positional:
            return model(x, timestep, *args, **kwargs, return_dict=False)[0]
        return model(*args, **{self.input_name: x, "timestep": timestep}, **kwargs, return_dict=False)[0]

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, the rest or None): the first C channels of a learned-variance output."""
        if not self.learned_variance:
            return output, None
        return output[:, : self.channels], output[:, self.channels:]


LEARNED_VARIANCE = ("learned", "learned_range")


def learned_variance(config: Any) -> bool:
    """out_channels = 2 × in_channels: a learned-variance network (DiT, PixArt-α, IF, Kandinsky 2.2)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    c_in, c_out = get("in_channels"), get("out_channels")
    return c_in is not None and c_out is not None and c_out == 2 * c_in


def network_call(model: torch.nn.Module, packed: bool) -> NetworkCall:
    """The :class:`NetworkCall` of a diffusers model (read from its forward and config);
    ``packed``: whether it takes its latents packed (its family's ``packs_latents``)."""
    params = list(inspect.signature(model.forward).parameters)
    config = getattr(model, "config", {})
    channels = config.get("in_channels") if hasattr(config, "get") else None
    return NetworkCall(params[0], len(params) > 1 and params[1] == "timestep", channels, learned_variance(config),
                       packed)
