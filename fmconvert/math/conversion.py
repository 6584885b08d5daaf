"""The conversion core: a network on one Gaussian path and prediction type, evaluated on
another. Pure torch: nothing here imports diffusers (the suite imports this module with
diffusers made unimportable); :mod:`fmconvert.integration.adapters` is the diffusers glue around it.

For a request (x, timestep) on the target path:

1. t_dst from the timestep, its point P_dst = (α, σ) and log-SNR λ = log(α/σ);
2. the source time t_src with the same λ (clamped to the range the source was trained
   on, snapped to a trained integer time when λ is within the timestep's rounding);
3. the source sees x·|P_src|/|P_dst| (|P| = √(α²+σ²); equal to α_src/α_dst at equal λ);
4. its output becomes (x̂0, ε̂) at P_src (:mod:`fmconvert.math.predictions`), which are the
   same numbers on every path, and then the target prediction at P_dst.

Steps 1–4 are linear in (x, output) with coefficients that depend on the timestep alone:
:func:`plan_conversion` computes them once (a :class:`Conversion`: source timestep,
scale, k_x, k_out) and :func:`apply_conversion` returns k_x·x + k_out·model(scale·x,
timestep_src).

Endpoint policy, where the target asks for a noise level the source never saw
(s = 1 above a DDPM schedule's last timestep; below its first): the source is evaluated
at its nearest trained time, then (x̂0, ε̂) are made consistent with the actual point —
noisier than trained: keep x̂0 and set ε̂ = (x − α·x̂0)/σ; cleaner than trained: keep ε̂
and set x̂0 = (x − σ·ε̂)/α. So s = 1 gives u = x − x̂0 and s = 0 gives u = ε̂ − x, both finite.
An epsilon model on a zero-terminal-SNR schedule (α = 0 at its last timestep) has no x̂0
there and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fmconvert.math.paths import GaussianPath, log_snr_of
from fmconvert.math.predictions import canonical_prediction_type, from_x0_eps, to_x0_eps

HALF_MAX = torch.finfo(torch.float16).max


def check_pair(path: GaussianPath, prediction_type: str) -> str:
    """Validate a (path, prediction type) pair; returns the canonical prediction type."""
    kind = canonical_prediction_type(prediction_type)
    if kind in ("edm", "edm_v") and getattr(path, "kind", None) != "edm":
        raise ValueError(f"prediction_type={kind!r} is the output of a Karras-preconditioned network: it needs the "
                         f"EDM path (an EDM scheduler's config), not {path!r}")
    if kind in ("epsilon", "score") and getattr(path, "zero_terminal_snr", False):
        raise ValueError(
            f"prediction_type={kind!r} on a zero-terminal-SNR schedule (rescale_betas_zero_snr=True) has no "
            "x0 estimate at its last timestep (alpha = 0); use a v_prediction model there, or a schedule "
            "without rescale_betas_zero_snr"
        )
    return kind


@dataclass
class Conversion:
    """One request's conversion, per sample (it depends on the timestep only): the source
    network sees ``(scale·x, timestep)`` and the target prediction is ``k_x·x + k_out·output``.

    ``timestep``: (B,) or (1,) in the source's timestep convention; ``scale``, ``k_x``,
    ``k_out``: (B or 1, 1, ..., 1) in the compute dtype.
    """

    timestep: torch.Tensor
    scale: torch.Tensor
    k_x: torch.Tensor
    k_out: torch.Tensor

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "Conversion":
        """On ``device``, with the coefficients (not the timestep) in ``dtype`` if given."""
        coefficients = (v.to(device, dtype, non_blocking=True) for v in (self.scale, self.k_x, self.k_out))
        return Conversion(self.timestep.to(device, non_blocking=True), *coefficients)


def plan_conversion(
    timestep: torch.Tensor,
    ndim: int,
    source: GaussianPath,
    source_prediction: str,
    target: GaussianPath,
    target_prediction: str,
    compute_dtype: torch.dtype = torch.float64,
    timestep_dtype: torch.dtype = torch.float32,
) -> Conversion:
    """The :class:`Conversion` for requests at ``timestep`` (target convention, shape (B,))
    on samples with ``ndim`` dimensions, computed on the timestep's device. See the module
    docstring for the steps."""
    timestep = timestep.reshape(-1)
    t_dst = target.time_from_model_timestep(timestep).to(compute_dtype)
    lam = target.log_snr(t_dst)
    tol = target.timestep_log_snr_resolution(timestep)
    t_src = source.time_at_log_snr(lam, snap_tol=tol)
    p_src = source.point(t_src)
    # a timestep snapped to a trained time was that time, rounded: take the target point from it too
    lam_src = log_snr_of(p_src.alpha, p_src.sigma)
    snapped = (lam_src != lam) & ((lam_src - lam).abs() <= tol)
    t_dst = torch.where(snapped, target.time_at_log_snr(lam_src), t_dst)
    p_dst = target.point(t_dst)

    ends = torch.tensor([source.t_max, source.t_min], dtype=compute_dtype, device=timestep.device)
    lam_top, lam_bottom = source.log_snr(ends).unbind()
    noisier = lam < lam_top  # beyond the noisiest trained point
    cleaner = lam > lam_bottom  # beyond the cleanest trained point

    p_dst, p_src = p_dst.view_as_batch(ndim), p_src.view_as_batch(ndim)
    scale = p_src.norm / p_dst.norm
    noisier, cleaner = noisier.view(p_dst.alpha.shape), cleaner.view(p_dst.alpha.shape)

    def convert(x_dst: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x0, eps = to_x0_eps(source_prediction, out, x_dst * scale, p_src)
        one = torch.ones_like(p_dst.alpha)
        eps = torch.where(noisier, (x_dst - p_dst.alpha * x0) / torch.where(noisier, p_dst.sigma, one), eps)
        x0 = torch.where(cleaner, (x_dst - p_dst.sigma * eps) / torch.where(cleaner, p_dst.alpha, one), x0)
        return from_x0_eps(target_prediction, x0, eps, p_dst)

    # the whole conversion is linear in (x, output) with per-sample coefficients: evaluate it
    # on the basis (1, 0) and (0, 1)
    ones, zeros = torch.ones_like(scale), torch.zeros_like(scale)
    k_x, k_out = convert(ones, zeros), convert(zeros, ones)
    return Conversion(source.model_timestep(t_src, timestep_dtype), scale, k_x, k_out)


def invert(conversion: Conversion, x: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """The source network's output that :func:`apply_conversion` turned into ``prediction``:
    (prediction − k_x·x)/k_out (for options that act on the source's own prediction, such as
    guidance_rescale). Shapes as in apply_conversion; in the promoted dtype."""
    c = conversion
    if c.scale.device != x.device:
        c = c.to(x.device)
    return (prediction - c.k_x * x) / c.k_out


def apply_conversion(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    conversion: Conversion,
    compute_dtype: torch.dtype = torch.float64,
    input_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``k_x·x + k_out·model_fn(scale·x, timestep)``, each product and sum in ``compute_dtype``
    (type promotion against the coefficients: x and the output are not copied to it first).

    Returned in ``output_dtype`` (default x's). In float16 a value beyond its range (±65504)
    is returned as the largest finite one, not ±Inf: near s = 1 the velocity of a source whose
    α at its noisiest trained time is small (cosine: 5e-5) reaches 1e4–1e5. Ask for float32
    (fmconvert's sampler does) for the exact value."""
    c = conversion
    if c.scale.device != x.device or c.scale.dtype != compute_dtype:
        c = c.to(x.device, compute_dtype)
    out = model_fn((x * c.scale).to(input_dtype or x.dtype), c.timestep.expand(x.shape[0]))
    result = torch.addcmul(c.k_x * x, c.k_out, out)
    output_dtype = output_dtype or x.dtype
    if output_dtype == torch.float16:
        result = result.clamp(-HALF_MAX, HALF_MAX)
    return result.to(output_dtype)


def evaluate_converted(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    timestep: torch.Tensor,
    source: GaussianPath,
    source_prediction: str,
    target: GaussianPath,
    target_prediction: str,
    compute_dtype: torch.dtype = torch.float64,
    input_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
    timestep_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Evaluate ``model_fn(x_src, timestep_src)`` (source path and prediction) as the
    target prediction at (x, timestep) on the target path: :func:`plan_conversion`, then
    :func:`apply_conversion`.

    The model receives x_src in ``input_dtype`` and the result is returned in
    ``output_dtype`` (both default to x's dtype) and its timestep in ``timestep_dtype``
    (float32, as diffusers passes them); everything between runs in ``compute_dtype``.
    """
    timestep = torch.as_tensor(timestep, device=x.device)
    conversion = plan_conversion(timestep, x.ndim, source, source_prediction, target, target_prediction,
                                 compute_dtype, timestep_dtype)
    return apply_conversion(model_fn, x, conversion, compute_dtype, input_dtype, output_dtype)
