"""What one training step computes: its times, its draws and its loss (the conditional
flow-matching objective of ``fmconvert train`` and ``fmconvert reflow``).

The loss, on diffusers' rectified path (s = 1 is noise, s = 0 is data): for data x0 (N, C, H, W)
in the model's data space, noise ε ~ N(0, I) of the same shape and a time s per sample,

    x_s = (1 − s)·x0 + s·ε,    u = ε − x0,    L = mean over elements of |u_θ(x_s, T·s) − u|²,

u_θ being the adapter's velocity at the timestep T·s (T: the target path's
``num_train_timesteps``; :func:`flow_matching_loss`). For a converted diffusion source, L at s is
the source's epsilon loss |ε̂ − ε|² at the matched time times (1 − s)⁻²
(:func:`fmconvert.evaluation.agreement.loss_identity`), so fine-tuning starts at the pretrained
optimum of that weighting of the epsilon loss. With ``loss_type="pseudo_huber"`` the step trains
(√(‖δ‖² + c²) − c)/d of the error δ = u_θ − u instead (:func:`per_sample_loss`).

Times. s is drawn by inverse transform from one uniform u per sample, from one of the densities
(:func:`sample_times`)

- ``uniform``: π(s) = 1;
- ``logit_normal`` (Esser et al. 2024, SD3, eq. 19):
  π(s; m, σ) = 1/(σ√(2π)) · 1/(s(1 − s)) · exp(−(logit(s) − m)²/(2σ²)), i.e. logit(s) ~ N(m, σ²);
- ``u_shaped`` (Lee, Lin, Fanti 2024, "Improving the Training of Rectified Flows", sec. 4.1, for
  reflow, where the loss is largest at the two ends): π(s; a) = a/(2(eᵃ − 1)) · (e^{a·s} + e^{a(1−s)}),
  whose distribution function F(s) = (e^{a·s} − e^{a(1−s)} + eᵃ − 1)/(2(eᵃ − 1)) inverts in closed
  form (a quadratic in e^{a·s});

truncated to the source's trained range [s_lo, s_hi] (:func:`trained_range`: the s of its least
and most noisy trained times; [0, 1] for a flow source; digits-eps: [0.0099, 0.9936]) and
renormalised there: s = F⁻¹(F(s_lo) + (F(s_hi) − F(s_lo))·u). Outside that range the adapter
evaluates the network at its nearest trained time and fills in the rest from the actual s (its
endpoint policy), so a loss there would train the network's end times on noise levels it is not
told about, pulling them off their own optimum. Inside it the FM loss weights the epsilon loss by
(1 − s)⁻² ≤ (1 − s_hi)⁻² (digits-eps: 2.4e4; a cosine schedule's α_T = 5e-5: 4e8), so the
gradient's norm is clipped (``max_grad_norm``).

Draws (:class:`Draws`). Step k (0-based) takes the global batch of positions k·B … k·B + B − 1 of
the data stream, where epoch e is a permutation of the data seeded by (seed, e), and draws ε then
u with a generator seeded by (seed, k) on the training device. So the draws depend on the seed
and the step only: a resumed run repeats them exactly, and K processes (``accelerate launch`` /
``torchrun``) each take their B/K share of the same global batch.

Pairs (``fmconvert reflow``, :mod:`fmconvert.training.reflow`; Liu, Gong, Liu 2022, "Flow Straight and
Fast", rectified flow): each x0 is a sample of the model's ODE and comes with the noise ε its
trajectory started from (:class:`~fmconvert.training.data.TrainingData` ``noise``); the step takes
the pair's ε instead of a fresh draw, so the loss above trains the straight paths between the two
ends of every trajectory. With ``distill`` every s is 1, the noise end, where x_1 = ε: one-step
distillation, L = |u_θ(ε, T) − (ε − x0)|², as one Euler step from the noise is x0 ≈ ε − u(ε, 1).
For a diffusion source s = 1 lies beyond the trained range, and the adapter answers it from the
network's noisiest trained time t_max (the endpoint policy: u = ε − x̂0), so what trains is x̂0 at
t_max on the input the sampler gives it. Not s_hi: x_{s_hi} = ε + (1 − s_hi)·(x0 − ε) tells the
network a little of the x0 the sampler never has (a test on a model whose samples are large
shows the difference).

Parametrisation (``prediction_type``; :func:`network_prediction`, :func:`check_prediction_type`).
A diffusion source's network can be trained to predict another quantity on its own path:
``epsilon``, ``v_prediction`` (α·ε − σ·x0, Salimans & Ho 2022) or ``sample`` (x0). The adapter
reads its output as that from step 1
(:meth:`~fmconvert.integration.adapters.PathAdapter.set_source_prediction`) and the written folder says so; the
weights are the source's, so the field no longer starts at the source's and the output is learnt
anew (as SD 2's v models were fine-tuned from epsilon ones). What it buys is conditioning: an
output error δ is a velocity error of δ/(1 − s) for epsilon (the noisiest trained time of
digits-eps: ×159), (α + σ)·δ ∈ [1, √2]·δ for v_prediction, δ/s for sample; few-step sampling
leans on u near s = 1, where epsilon is worst (docs/benchmarks/REFLOW.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from fmconvert.errors import UsageError

if TYPE_CHECKING:
    from fmconvert.integration.adapters import PathAdapter
    from fmconvert.integration.source import Source
    from fmconvert.training.data import TrainingData
    from fmconvert.training.settings import TrainSettings

F64 = torch.float64


def trained_range(adapter: PathAdapter) -> tuple[float, float]:
    """[s_lo, s_hi]: the times s on the rectified path of the source's least and most noisy
    trained times (equal log-SNR)."""
    from fmconvert.math.paths import RectifiedFlow

    source = adapter.source_path
    lam = source.log_snr(torch.tensor([source.t_min, source.t_max], dtype=F64))
    s = RectifiedFlow().time_at_log_snr(lam).clamp(0.0, 1.0)
    return float(s.min()), float(s.max())


def sample_times(settings: TrainSettings, u: torch.Tensor, s_range: tuple[float, float]) -> torch.Tensor:
    """Times s for uniforms ``u`` ∈ [0, 1): the inverse of the density's distribution function
    truncated to ``s_range`` (see the module docstring), float64; with ``distill``, 1 (the noise
    end) for every u."""
    lo, hi = s_range
    u = u.to(F64)
    if settings.distill:
        return torch.ones_like(u)
    if settings.time_sampling == "uniform":
        return lo + (hi - lo) * u
    if settings.time_sampling == "u_shaped":
        a, ea = settings.u_shape_a, math.exp(settings.u_shape_a)

        def cdf(s: torch.Tensor) -> torch.Tensor:
            return (torch.exp(a * s) - torch.exp(a * (1 - s)) + ea - 1) / (2 * (ea - 1))

        def inverse(v: torch.Tensor) -> torch.Tensor:  # F(s) = v  ⇔  y² − c·y − e^a = 0 for y = e^{a·s}
            c = (ea - 1) * (2 * v - 1)
            return torch.log((c + torch.sqrt(c * c + 4 * ea)) / 2) / a
    else:
        m, sd = settings.logit_mean, settings.logit_std

        def cdf(s: torch.Tensor) -> torch.Tensor:
            return torch.special.ndtr((torch.logit(s) - m) / sd)  # (logit(0) = −∞: Φ = 0)

        def inverse(v: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(m + sd * torch.special.ndtri(v))
    # truncated to [lo, hi]: s = F⁻¹(F(lo) + (F(hi) − F(lo))·u)
    bounds = torch.tensor([lo, hi], dtype=F64, device=u.device)
    f_lo, f_hi = cdf(bounds).unbind()
    return inverse(f_lo + (f_hi - f_lo) * u).clamp(lo, hi)


def network_prediction(source: Source) -> str:
    """What ``source``'s network predicts: in a converted folder its adapter's ``source_prediction``
    (read from its config), else the source's prediction type."""
    if source.converted:
        return str(json.loads((Path(source.model_folder) / "config.json").read_text())["source_prediction"])
    return source.prediction_type


def check_prediction_type(source: Source, prediction_type: str | None) -> None:
    """UsageError, in one line, for a ``prediction_type`` the source's network cannot be trained
    into: a flow-matching network (or a converted-back one) predicts the velocity itself, which
    stock diffusers reads as such."""
    if prediction_type is not None and network_prediction(source) == "flow_prediction":
        raise UsageError(f"prediction_type={prediction_type!r} reparametrises a diffusion model's network; "
                         f"'{source.reference}' is a flow-matching model, whose network predicts the velocity: "
                         "leave it out")


def _seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class Draws:
    """The draws of every step (see the module docstring): ``batch(step)`` → (x0, ε, s) of this
    process's share [rank·B/K, (rank + 1)·B/K) of the global batch, on ``device``."""

    def __init__(self, settings: TrainSettings, data: TrainingData, s_range: tuple[float, float],
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1):
        if settings.batch_size % world_size:
            raise UsageError(f"batch_size={settings.batch_size} is the global batch: it must divide evenly over the "
                             f"{world_size} processes")
        self.settings, self.data, self.s_range = settings, data, s_range
        self.device = torch.device(device)
        share = settings.batch_size // world_size
        self.mine = slice(rank * share, (rank + 1) * share)
        self._epochs: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            generator = torch.Generator().manual_seed(_seed_of("epoch", self.settings.seed, epoch))
            self._epochs[epoch] = torch.randperm(len(self.data.values), generator=generator)
        return self._epochs[epoch]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, size = len(self.data.values), self.settings.batch_size
        positions = torch.arange(step * size, (step + 1) * size)[self.mine]
        index = torch.stack([self._order(int(p) // n)[int(p) % n] for p in positions])
        generator = torch.Generator(self.device).manual_seed(_seed_of("step", self.settings.seed, step))
        if self.data.noise is None:
            eps = torch.randn((size, *self.data.values.shape[1:]), generator=generator, device=self.device)[self.mine]
        else:  # the pair's own noise
            eps = self.data.noise[index].to(self.device)
        u = torch.rand(size, generator=generator, dtype=F64, device=self.device)[self.mine]
        return self.data.x0(index).to(self.device), eps, sample_times(self.settings, u, self.s_range)


def flow_matching_loss(model: Callable[..., Any], target_path: Any, x0: torch.Tensor, eps: torch.Tensor,
                       s: torch.Tensor) -> torch.Tensor:
    """Per sample (B,): the mean over elements of |u_θ(x_s, timestep(s)) − (ε − x0)|², with
    x_s = (1 − s)·x0 + s·ε formed in float64 (the adapter scales it in its compute dtype and
    hands the network its own dtype). ``model``: a velocity adapter (or its DDP wrapper), called
    as ``model(x_s, timestep, return_dict=False)``; ``target_path``: its rectified path, whose
    ``model_timestep`` gives the timestep (T·s)."""
    s_b = s.view(-1, *([1] * (x0.ndim - 1)))
    x_s = (1 - s_b) * x0.to(F64) + s_b * eps.to(F64)
    u = model(x_s, target_path.model_timestep(s, F64), return_dict=False)[0]
    dtype = torch.promote_types(u.dtype, torch.float32)
    return (u.to(dtype) - (eps - x0).to(dtype)).square().flatten(1).mean(1)


def per_sample_loss(mse: torch.Tensor, dim: int, loss_type: str) -> torch.Tensor:
    """The training loss per sample (B,) from its velocity error's mean square ``mse`` (B,)
    (:func:`flow_matching_loss`) over ``dim`` elements:

    - ``l2``: mse itself, the conditional flow-matching loss (the one the loss identity is about);
    - ``pseudo_huber`` (Song & Dhariwal 2023, improved consistency training; as Lee, Lin, Fanti
      2024 train reflow): (√(‖δ‖² + c²) − c)/d with ‖δ‖² = d·mse and c = 0.00054·d, quadratic for
      ‖δ‖ ≪ c and ‖δ‖/d above, so a sample with a large error pulls no harder than one with a
      moderate one."""
    if loss_type == "l2":
        return mse
    c = 0.00054 * dim
    return (torch.sqrt(dim * mse + c * c) - c) / dim
