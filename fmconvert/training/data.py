"""What a training run trains on (``fmconvert train``'s ``data``, ``fmconvert reflow``'s couplings).

:class:`TrainingData` holds the data points x0 as they are stored, (N, C, H, W): uint8 images,
mapped to the model's data space as x0 = v/127.5 − 1 ∈ [−1, 1], or float latents or samples,
taken as they are. For paired training (``fmconvert reflow``, :mod:`fmconvert.training.reflow`)
each x0 is a sample of the model's ODE and comes with the noise ε its trajectory started from
(``noise``, (N, C, H, W) float32; on diffusers' rectified path s = 1 is noise, s = 0 is data);
:class:`fmconvert.training.objective.Draws` takes the pair's ε instead of a fresh draw.

:func:`load_training_data` reads ``builtin:digits[/SPLIT]``, an image folder, or a folder of latent
shards, and refuses, in one line, data that do not fit the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmconvert.errors import UsageError


@dataclass
class TrainingData:
    """``values``: (N, C, H, W), uint8 images (x0 = v/127.5 − 1 ∈ [−1, 1]) or float latents or
    samples (x0 = the values as they are); held in memory as they are stored. ``noise``: None, or
    (N, C, H, W) float32, the noise ε each x0 is coupled to (paired training:
    :class:`~fmconvert.training.objective.Draws` takes ``noise[i]`` with ``values[i]`` instead of
    a fresh draw)."""

    values: torch.Tensor
    kind: str  # "images", "latents" or "couplings"
    noise: torch.Tensor | None = None

    def x0(self, index: torch.Tensor) -> torch.Tensor:
        """The data points ``index`` in the model's data space, float32."""
        batch = self.values[index]
        return batch.float() / 127.5 - 1 if self.kind == "images" else batch.float()


def load_training_data(data: str, shape: tuple[int, ...], latent_model: bool, model: str = "the model") -> TrainingData:
    """``data`` (builtin:digits[/SPLIT], an image folder, or a folder of latent shards
    ``shard-NNNNNN.safetensors`` with key "samples", as a ``samples_dir`` keeps them) for a
    model whose samples are ``shape`` (C, H, W). UsageError, one line, for an empty folder, data
    of another channel count or size, and images for a model that samples latents."""
    from fmconvert.files.references import parse_data

    ref = parse_data(data)
    shards = sorted(ref.path.glob("shard-*.safetensors")) if ref.path is not None else []
    if shards:
        from safetensors.torch import load_file

        found = TrainingData(torch.cat([load_file(str(p))["samples"] for p in shards]).float(), "latents")
    else:
        from fmconvert.files.images import IMAGE_SUFFIXES, image_files

        if ref.path is not None and not image_files(ref.path):
            raise UsageError(f"data={data!r} has no images ({', '.join(IMAGE_SUFFIXES)}) and no latent shards "
                             "(shard-*.safetensors)")
        found = TrainingData(ref.images(), "images")
    have, want = tuple(found.values.shape[1:]), tuple(shape)
    what = "latents" if found.kind == "latents" else "images"
    if latent_model and found.kind == "images":
        raise UsageError(f"{model} samples latents ({'×'.join(map(str, want))}); data={data!r} holds images: give a "
                         "folder of latent shards (shard-*.safetensors, key 'samples') of that shape")
    if len(found.values) == 0:
        raise UsageError(f"data={data!r} holds no {what}")
    if have[:1] != want[:1]:
        raise UsageError(f"data={data!r} holds {have[0]}-channel {what}; {model} takes {want[0]} channels "
                         f"({'×'.join(map(str, want))})")
    if have != want:
        raise UsageError(f"data={data!r} holds {'×'.join(map(str, have[1:]))} {what}; {model} takes "
                         f"{'×'.join(map(str, want[1:]))} ({'×'.join(map(str, want))})")
    return found
