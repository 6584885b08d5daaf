"""Prediction types, all through one core: the pair (x̂0, ε̂).

At a point (α, σ) of a Gaussian path x = α·x0 + σ·ε (time derivatives α̇, σ̇), every
prediction type is a linear functional  p = a·x̂0 + b·ε̂:

=================  ==============================  ===============
prediction_type    p                                (a, b)
=================  ==============================  ===============
epsilon            ε̂                                (0, 1)
sample             x̂0                               (1, 0)
v_prediction       α·ε̂ − σ·x̂0  (Salimans & Ho)      (−σ, α)
flow_prediction    dx/dt = α̇·x̂0 + σ̇·ε̂              (α̇, σ̇)
score              ∇log p = −ε̂/σ                    (0, −1/σ)
edm                F_θ = (σ·x̂0 − σ_d²·α·ε̂)/σ_d      (σ/σ_d, −σ_d·α)
edm_v              −F_θ                             (−σ/σ_d, σ_d·α)
=================  ==============================  ===============

On diffusers' rectified path (α = 1 − s, σ = s) flow_prediction is ε̂ − x̂0. ``edm`` is the raw
output F_θ of a network with Karras et al. (2022, eq. 7) preconditioning, D = c_skip·x_VE +
c_out·F_θ with c_skip = σ_d²/(σ_VE² + σ_d²), c_out = σ_VE·σ_d/√(σ_VE² + σ_d²) (diffusers' EDM
schedulers with prediction_type "epsilon"; "v_prediction" flips c_out's sign: ``edm_v``), on the
path the network sees, α = c_in = 1/√(σ_VE² + σ_d²), σ = σ_VE·c_in (:class:`~fmconvert.math.paths.EDMPath`),
where σ_d = √(1 − σ²)/α. With σ_d = 1 that path is variance preserving and edm_v is
v_prediction.

Recovering (x̂0, ε̂) solves the 2×2 system [α σ; a b]·(x̂0, ε̂) = (x, p). This module is the
only place these formulas are written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (torch is imported where a tensor is computed: the names below are plain Python)
    import torch

    from fmconvert.math.paths import Point

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction", "score", "edm", "edm_v")
_ALIASES = {"flow": "flow_prediction", "velocity": "flow_prediction", "v": "v_prediction", "x0": "sample"}


def canonical_prediction_type(name: str) -> str:
    """diffusers' name for a prediction type; accepts the aliases flow, velocity, v, x0."""
    canonical = _ALIASES.get(name, name)
    if canonical not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {name!r}: supported are {', '.join(PREDICTION_TYPES)} "
            f"(aliases: {', '.join(_ALIASES)})"
        )
    return canonical


def coefficients(prediction_type: str, p: Point) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(a, b) with prediction = a·x̂0 + b·ε̂ at point p."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return 0.0, 1.0
    if kind == "sample":
        return 1.0, 0.0
    if kind == "v_prediction":
        return -p.sigma, p.alpha
    if kind == "flow_prediction":
        return p.d_alpha, p.d_sigma
    if kind in ("edm", "edm_v"):
        # on the EDM path (α = c_in, σ = σ_VE·c_in, c_in = 1/√(σ_VE² + σ_d²)): σ_d = √(1 − σ²)/α
        import torch

        sigma_data = torch.sqrt(1 - p.sigma**2) / p.alpha
        sign = 1.0 if kind == "edm" else -1.0
        return sign * p.sigma / sigma_data, -sign * sigma_data * p.alpha
    return 0.0, -1.0 / p.sigma  # score


def to_x0_eps(prediction_type: str, output: torch.Tensor, x: torch.Tensor, p: Point) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a model output: solve x = α·x̂0 + σ·ε̂, output = a·x̂0 + b·ε̂.

    x̂0 = (b·x − σ·output)/(α·b − σ·a),  ε̂ = (α·output − a·x)/(α·b − σ·a).
    """
    a, b = coefficients(prediction_type, p)
    det = p.alpha * b - p.sigma * a
    return (b * x - p.sigma * output) / det, (p.alpha * output - a * x) / det


def from_x0_eps(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, p: Point) -> torch.Tensor:
    """The prediction a·x̂0 + b·ε̂ at point p."""
    a, b = coefficients(prediction_type, p)
    return a * x0 + b * eps


def pf_ode_drift(p: Point, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE drift of dx = f·x dt + g dW:  dx/dt = f·x − ½·g²·∇log p(x),

    with f = α̇/α and g² = 2σσ̇ − 2(α̇/α)σ². With the score −ε̂/σ this equals α̇·x̂0 + σ̇·ε̂,
    the flow_prediction above; fmconvert computes it this way only to check that claim.
    """
    f = p.d_alpha / p.alpha
    g2 = 2 * p.sigma * p.d_sigma - 2 * f * p.sigma**2
    return f * x - 0.5 * g2 * score
