"""What a user asks for, and classifier-free guidance.

A :class:`Conditioning` holds what conditions a sample, as a user gives it (CLI options or
Python values): a prompt, class labels, image embeddings (from a prior), the guidance scale w
and rescale φ. A family (:mod:`fmconvert.integration.families`) checks it against what it can
honour and builds network keyword arguments from it (:func:`network_kwargs`: conditional, and
for guidance the batch [uncond; cond], in the network's dtype); :func:`guide` combines the two
predictions, uncond + w·(cond − uncond), then φ as diffusers' ``rescale_noise_cfg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it computes: `fmconvert wrap` reads configs only
    import torch

    from fmconvert.integration.families import Family


@dataclass(frozen=True)
class Conditioning:
    """What conditions a sample, as a user gives it (CLI options or Python values).

    ``class_labels``: ints or id2label names, assigned to images by global index n as
    labels[n mod len]; ``image_embeds`` / ``negative_image_embeds``: (1 or N, D) tensors (from
    a prior); ``guidance_scale``: classifier-free guidance weight w (1 = none), the guided
    prediction is uncond + w·(cond − uncond); ``guidance_rescale``: φ of Lin et al. (2024),
    applied to the source's own prediction.
    """

    prompt: str | None = None
    negative_prompt: str | None = None
    class_labels: tuple = ()
    image_embeds: torch.Tensor | None = None
    negative_image_embeds: torch.Tensor | None = None
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def describe(self) -> dict[str, Any]:
        """JSON-friendly: what the run's samples depend on."""
        out: dict[str, Any] = {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                               "class_labels": list(self.class_labels), "guidance_scale": self.guidance_scale,
                               "guidance_rescale": self.guidance_rescale}
        for name in ("image_embeds", "negative_image_embeds"):
            value = getattr(self, name)
            out[name] = None if value is None else [list(value.shape), float(value.double().sum())]
        return out


def is_given(value: Any) -> bool:
    """Whether a Conditioning field was set (tensors compared by identity, not value)."""
    if value is None:
        return False
    if isinstance(value, (tuple, list)):
        return len(value) > 0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    return True


def as_setting(name: str, value: Any = ...) -> str:
    """A Conditioning field as a message names it, ``name=value`` (the command line shows its
    option instead): strings and numbers as they are, anything else (labels, tensors) as ``...``."""
    shown = repr(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else "..."
    return f"{name}={shown}"


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance uncond + w·(cond − uncond), then, with ``rescale`` φ > 0,
    diffusers' ``rescale_noise_cfg`` (Lin et al. 2024, eq. 16: the guided prediction rescaled
    to the conditional one's standard deviation, mixed by φ). Nonlinear only through φ."""
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        guided = rescale_noise_cfg(guided, cond, guidance_rescale=rescale)
    return guided


def cast_floats(kwargs: dict, dtype: torch.dtype) -> dict:
    """Network keyword arguments with every floating tensor in ``dtype`` (nested dicts too),
    as pipelines cast their embeddings to the network's dtype."""
    import torch

    out = {}
    for key, value in kwargs.items():
        if isinstance(value, dict):
            value = cast_floats(value, dtype)
        elif torch.is_tensor(value) and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value
    return out


def concat_kwargs(first: dict, second: dict) -> dict:
    """Network keyword arguments for the batch [first; second] (tensors concatenated on dim 0,
    nested dicts recursively, anything else taken from ``second``)."""
    import torch

    out: dict[str, Any] = {}
    for key, value in second.items():
        other = first.get(key)
        if isinstance(value, dict):
            out[key] = concat_kwargs(other or {}, value)
        elif torch.is_tensor(value) and torch.is_tensor(other):
            out[key] = torch.cat([other, value])
        else:
            out[key] = value
    return out


def network_kwargs(family: Family, pipe: Any, request: Conditioning, first: int, batch: int, device: Any,
                   config: Any, size: tuple[int, int], dtype: torch.dtype) -> tuple[dict, dict | None]:
    """The family's conditioning for images [first, first + batch) as network keyword
    arguments in the network's ``dtype``: (conditional, the guidance batch [uncond; cond] or
    None without guidance)."""
    cond, uncond = family.encode(pipe, request, first, batch, device, config, size)
    both = None if uncond is None else cast_floats(concat_kwargs(uncond, cond), dtype)
    return cast_floats(cond, dtype), both
