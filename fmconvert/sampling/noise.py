"""The noise every sampler starts from, by global image index.

Convention: ``seed=S`` draws
``torch.randn((num_images, C, H, W), generator=torch.Generator("cpu").manual_seed(S))`` once,
so the samples depend neither on the batch size nor on the device (nor on the number of
processes: :class:`NoiseStream` gives any index range of the same draw). The start of a solve
is x_{s_0} = ε·√((1 − s_0)² + s_0²), the noise at the first grid time (ε itself at s_0 = 1, and
ε/(α_T + σ_T) on DDIM's grid, as DDIMScheduler starts from x_T = ε).
"""

from __future__ import annotations

import torch


def initial_noise(num_images: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The documented noise convention (CPU generator, drawn once for all images)."""
    return torch.randn((num_images, *shape), generator=torch.Generator("cpu").manual_seed(seed))


class NoiseStream:
    """The same noise as :func:`initial_noise`, by global image index, without drawing it all
    at once: torch's CPU normal sampler fills blocks of 16 values, so drawing the stream in
    chunks whose sizes are multiples of 16 values gives the same numbers (the last chunk,
    drawn whole, reproduces the sampler's treatment of the tail). Any process can take any
    index range; reading forward is cheap, going back restarts the stream."""

    def __init__(self, num_images: int, shape: tuple[int, ...], seed: int, chunk_values: int = 1 << 16):
        import math

        self.num_images, self.shape, self.seed = num_images, tuple(shape), seed
        per_image = math.prod(self.shape)
        step = 16 // math.gcd(per_image, 16)  # images per block of whole 16-value groups
        chunk = step * max(1, chunk_values // (step * per_image))
        bounds = list(range(0, num_images, chunk)) + [num_images]
        if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * per_image < 16:
            del bounds[-2]  # the sampler recomputes the last 16 values: keep them in one chunk
        self.bounds = bounds
        self._restart()

    def _restart(self):
        self.generator = torch.Generator("cpu").manual_seed(self.seed)
        self.chunk_index, self.chunk = -1, None

    def _advance(self):
        self.chunk_index += 1
        lo, hi = self.bounds[self.chunk_index], self.bounds[self.chunk_index + 1]
        self.chunk = torch.randn((hi - lo, *self.shape), generator=self.generator)

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Noise of images [start, stop)."""
        if not 0 <= start <= stop <= self.num_images:
            raise ValueError(f"indices [{start}, {stop}) outside [0, {self.num_images})")
        if self.chunk_index >= 0 and start < self.bounds[self.chunk_index]:
            self._restart()
        parts = []
        while start < stop:
            while self.chunk_index < 0 or start >= self.bounds[self.chunk_index + 1]:
                self._advance()
            lo, hi = self.bounds[self.chunk_index], self.bounds[self.chunk_index + 1]
            end = min(stop, hi)
            parts.append(self.chunk[start - lo:end - lo])
            start = end
        return torch.cat(parts) if parts else torch.zeros((0, *self.shape))


def batches_of(num_images: int, batch_size: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) index ranges; shard j is [j·B, (j+1)·B)."""
    return [(lo, min(num_images, lo + batch_size)) for lo in range(0, num_images, batch_size)]
