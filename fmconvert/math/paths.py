"""Noise schedules as Gaussian paths  x = α(t)·x0 + σ(t)·ε.

Every schedule here is a :class:`GaussianPath`: a time variable ``t`` with
``α(t)``, ``σ(t)`` and their time derivatives, evaluated in float64. Two paths
describe the same distributions at points of equal log-SNR ``λ = log(α/σ)``;
:meth:`GaussianPath.time_at_log_snr` is the inverse that the adapters use to move
between them. Convention everywhere: larger ``t`` is noisier.

- :class:`DiscreteVPSchedule`: a DDPM-style schedule (ᾱ_n for n = 0..T−1, α = √ᾱ,
  σ = √(1−ᾱ)), continuous in between by linear interpolation of λ, exact at the integers.
- :class:`RectifiedFlow`: diffusers' FlowMatch convention, time s ∈ [0, 1], s = 1 noise,
  α = 1 − s, σ = s, model timestep = num_train_timesteps·s; ``shift`` remaps uniform
  sampling times as FlowMatchEulerDiscreteScheduler does.
- :class:`CosinePath`: α = cos(πt/2), σ = sin(πt/2), t ∈ [0, 1].
- :class:`VEPath`: variance-exploding sigmas (score SDE), α = 1, σ = t ∈ [σ_min, σ_max], timestep σ.
- :class:`EDMPath`: Karras et al. (2022) preconditioning, α = c_in, σ = t·c_in, timestep ¼·log t.
- :class:`VPSDEPath`: the continuous-time VP SDE of score-SDE models, t ∈ [sampling_eps, 1].

:func:`path_from_config` builds a path from its description (:mod:`fmconvert.math.descriptions`);
reading one from a diffusers scheduler config is the integration's work
(:func:`fmconvert.integration.configs.path_from_scheduler_config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fmconvert.math.descriptions import discrete_vp_config, rectified_flow

F64 = torch.float64


@dataclass
class Point:
    """A point on a Gaussian path: x = alpha·x0 + sigma·eps, with d/dt of both.

    All fields are float64 tensors that broadcast against the sample.
    """

    alpha: torch.Tensor
    sigma: torch.Tensor
    d_alpha: torch.Tensor
    d_sigma: torch.Tensor

    def view_as_batch(self, ndim: int) -> "Point":
        """Reshape per-sample values (B,) to (B, 1, ..., 1) for a sample with ``ndim`` dims."""
        shape = (-1,) + (1,) * (ndim - 1)
        return Point(*(v.reshape(shape) for v in (self.alpha, self.sigma, self.d_alpha, self.d_sigma)))

    @property
    def norm(self) -> torch.Tensor:
        """√(α² + σ²): the scale of x relative to a variance-preserving path at the same λ."""
        return torch.sqrt(self.alpha**2 + self.sigma**2)


def log_snr_of(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """λ = log(α/σ); +inf at σ = 0 (clean), −inf at α = 0 (pure noise)."""
    return torch.log(alpha) - torch.log(sigma)


def vp_point(log_snr: torch.Tensor, d_log_snr: torch.Tensor) -> Point:
    """The variance-preserving point with log-SNR λ: α² = sigmoid(2λ), σ² = sigmoid(−2λ).

    Since dα/dλ = α·σ² and dσ/dλ = −σ·α², the time derivatives follow from dλ/dt.
    """
    alpha = torch.sigmoid(2 * log_snr).sqrt()
    sigma = torch.sigmoid(-2 * log_snr).sqrt()
    return Point(alpha, sigma, alpha * sigma**2 * d_log_snr, -sigma * alpha**2 * d_log_snr)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The squaredcos_cap_v2 betas (Nichol & Dhariwal 2021, eq. 17, offset 0.008): β_n =
    min(1 − ᾱ((n+1)/T)/ᾱ(n/T), max_beta) with ᾱ(u) = cos²((u + 0.008)/1.008 · π/2), each in
    Python floats and stored as float32, as diffusers' ``betas_for_alpha_bar`` does (the
    suite checks the two bit for bit)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return torch.tensor([min(1 - alpha_bar((n + 1) / T) / alpha_bar(n / T), max_beta) for n in range(T)],
                        dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", Algorithm 1): √ᾱ shifted so its last value is 0 and scaled
    so its first is unchanged; in the betas' dtype, operation for operation as diffusers'
    ``rescale_zero_terminal_snr``."""
    sqrt_acp = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_acp[0].clone(), sqrt_acp[-1].clone()
    sqrt_acp = (sqrt_acp - last) * (first / (first - last))
    acp = sqrt_acp**2
    return 1 - torch.cat([acp[0:1], acp[1:] / acp[:-1]])


class GaussianPath:
    """Base class. Subclasses define ``point``, ``time_at_log_snr`` and the time range."""

    #: name used in configs (``to_config`` / ``path_from_config``)
    kind: str = ""
    #: the range of t the model was trained on (the adapters clamp to it)
    t_min: float = 0.0
    t_max: float = 1.0

    def point(self, t: torch.Tensor) -> Point:
        raise NotImplementedError

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        p = self.point(t)
        return log_snr_of(p.alpha, p.sigma)

    def time_at_log_snr(self, log_snr: torch.Tensor, snap_tol: torch.Tensor | float = 0.0) -> torch.Tensor:
        """The time t in [t_min, t_max] whose log-SNR is λ (clamped at the ends).

        ``snap_tol`` is how far λ may be from a trained integer time of a discrete schedule
        and still be taken as that time (the rounding of the caller's timestep); continuous
        paths ignore it.
        """
        raise NotImplementedError

    def model_timestep(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The timestep value the network was trained to receive at time t, in ``dtype``."""
        return torch.as_tensor(t).to(dtype)

    def time_from_model_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep.to(F64)

    def timestep_log_snr_resolution(self, timestep: torch.Tensor) -> torch.Tensor | float:
        """How uncertain λ is because ``timestep`` arrived rounded to its dtype (0 = exact)."""
        return 0.0

    def to_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "kind" and k != "alphas_cumprod")
        return f"{type(self).__name__}({args})"


class DiscreteVPSchedule(GaussianPath):
    """A discrete variance-preserving schedule: ᾱ_n for integer n = 0..T−1 (n = T−1 noisiest).

    Between integers, λ(t) = log(α/σ) is interpolated linearly in t (as k-diffusion and
    diffusers' ``_sigma_to_t`` do), so every integer is exact. Where the schedule has zero
    terminal SNR (λ_{T−1} = −∞) the last interval is interpolated linearly in
    s = σ/(α+σ) instead.

    The network receives timestep = t (as the schedulers hand it over), or t·``timestep_scale``
    where its pipeline rescales the scheduler's timesteps (FLUX's divides them by 1000:
    ``timestep_scale`` = 1/1000); such a timestep is snapped back to the integer t it was
    rounded from.
    """

    kind = "discrete_vp"

    def __init__(self, alphas_cumprod: torch.Tensor | list[float], timestep_scale: float | None = None):
        acp = torch.as_tensor(alphas_cumprod, dtype=F64).flatten()
        if acp.numel() < 2 or not bool(((acp >= 0) & (acp <= 1)).all()):
            raise ValueError("alphas_cumprod must hold at least 2 values in [0, 1]")
        if not bool((acp[1:] <= acp[:-1]).all()):
            raise ValueError("alphas_cumprod must be non-increasing (timestep T-1 is the noisiest)")
        self.alphas_cumprod = acp
        self.num_train_timesteps = acp.numel()
        self.t_min, self.t_max = 0.0, float(self.num_train_timesteps - 1)
        self._lambdas = 0.5 * (torch.log(acp) - torch.log1p(-acp))
        self.zero_terminal_snr = bool(acp[-1] == 0)
        # knots where λ is finite; with zero terminal SNR the last one is −∞
        self._finite = self.num_train_timesteps - 1 if self.zero_terminal_snr else self.num_train_timesteps
        self._description: dict[str, Any] | None = None  # the beta settings it was built from, if any
        self.timestep_scale = None if timestep_scale is None else float(timestep_scale)
        if self.timestep_scale is not None and not self.timestep_scale > 0:
            raise ValueError(f"timestep_scale must be positive, got {timestep_scale}")

    @classmethod
    def from_betas(cls, betas: torch.Tensor, timestep_scale: float | None = None) -> "DiscreteVPSchedule":
        """ᾱ_n = Π_{i≤n}(1 − β_i), accumulated in the betas' dtype exactly as diffusers does."""
        return cls(torch.cumprod(1.0 - betas, dim=0), timestep_scale)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DiscreteVPSchedule":
        """Build from a diffusers scheduler config (beta_schedule, beta_start, beta_end,
        trained_betas, num_train_timesteps, rescale_betas_zero_snr) or the path description
        :func:`~fmconvert.integration.configs.discrete_vp_config` makes of one, reproducing diffusers'
        float32 betas bit for bit. ValueError for a schedule it cannot reproduce."""
        description = discrete_vp_config(config)
        T = int(description.get("num_train_timesteps", 1000))
        start, end = float(description.get("beta_start", 0.0001)), float(description.get("beta_end", 0.02))
        schedule = description.get("beta_schedule", "linear")
        if description.get("trained_betas") is not None:
            betas = torch.tensor(description["trained_betas"], dtype=torch.float32)
        elif schedule == "linear":
            betas = torch.linspace(start, end, T, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = cosine_betas(T)
        else:  # "sigmoid", the last of configs.BETA_SCHEDULES
            betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (end - start) + start
        if description.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        path = cls.from_betas(betas, config.get("timestep_scale"))
        if path.timestep_scale is not None:
            description["timestep_scale"] = path.timestep_scale
        path._description = description
        return path

    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.to(F64).clamp(self.t_min, self.t_max)
        i = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        return i, t - i

    def point(self, t: torch.Tensor) -> Point:
        t = torch.as_tensor(t, dtype=F64)
        lam = self._lambdas.to(t.device)
        i, frac = self._segment(t)
        lo, hi = lam[i], lam[i + 1]
        if not self.zero_terminal_snr:
            return vp_point(lo + frac * (hi - lo), hi - lo)
        # last interval of a zero-terminal-SNR schedule: linear in s = σ/(α+σ)
        last = i == self.num_train_timesteps - 2
        p_lin = vp_point(torch.where(last, lo, lo + frac * (hi - lo)), torch.where(last, 0.0, hi - lo))
        s0 = 1 / (1 + lo.exp())
        s = s0 + frac * (1 - s0)
        d_s = 1 - s0
        # on the rectified path α_r = 1 − s, σ_r = s; VP-normalise and differentiate
        n = torch.sqrt((1 - s) ** 2 + s**2)
        d_n = (2 * s - 1) * d_s / n
        alpha, sigma = (1 - s) / n, s / n
        d_alpha = (-d_s * n - (1 - s) * d_n) / n**2
        d_sigma = (d_s * n - s * d_n) / n**2
        p_last = Point(alpha, sigma, d_alpha, d_sigma)
        return Point(*(torch.where(last, a, b) for a, b in zip(
            (p_last.alpha, p_last.sigma, p_last.d_alpha, p_last.d_sigma),
            (p_lin.alpha, p_lin.sigma, p_lin.d_alpha, p_lin.d_sigma))))

    def time_at_log_snr(self, log_snr: torch.Tensor, snap_tol: torch.Tensor | float = 0.0) -> torch.Tensor:
        lam = log_snr.to(F64)
        knots = self._lambdas[: self._finite].to(lam.device)
        desc = -knots  # increasing, for searchsorted
        x = (-lam).clamp(desc[0], desc[-1])
        j = torch.searchsorted(desc, x.contiguous(), right=False).clamp(1, self._finite - 1)
        a, b = desc[j - 1], desc[j]
        t = (j - 1).to(F64) + (x - a) / (b - a)
        if self.zero_terminal_snr:
            # beyond the last finite knot: linear in s up to s = 1 at t = T−1
            s_last = 1 / (1 + knots[-1].exp())
            s = 1 / (1 + lam.exp())
            beyond = lam < knots[-1]
            t = torch.where(beyond, (self._finite - 1) + (s - s_last) / (1 - s_last), t)
        # snap to a trained integer time when λ is within the caller's rounding of its knot
        n = t.round().long().clamp(0, self.num_train_timesteps - 1)
        near = (lam - self._lambdas.to(lam.device)[n]).abs() <= snap_tol
        near = near | ((lam == self._lambdas.to(lam.device)[n]))
        return torch.where(near, n.to(F64), t)

    def model_timestep(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = torch.as_tensor(t).to(dtype)
        return t if self.timestep_scale is None else t * self.timestep_scale

    def time_from_model_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep.to(F64)
        if self.timestep_scale is None:
            return t
        t = t / self.timestep_scale
        if not timestep.is_floating_point():
            return t
        # t·scale arrived rounded to its dtype: an integer t it is within that rounding of is that t
        n = t.round()
        near = (t - n).abs() <= 8 * torch.finfo(timestep.dtype).eps * n.abs().clamp_min(1.0)
        return torch.where(near, n, t)

    def to_config(self) -> dict[str, Any]:
        """The beta settings it was built from (:meth:`from_config`), else the ᾱ table."""
        if self._description is not None:
            return dict(self._description)
        config: dict[str, Any] = {"kind": self.kind, "alphas_cumprod": self.alphas_cumprod.tolist()}
        if self.timestep_scale is not None:
            config["timestep_scale"] = self.timestep_scale
        return config


class RectifiedFlow(GaussianPath):
    """diffusers' FlowMatch convention: x_s = (1 − s)·x0 + s·ε, s ∈ [0, 1], s = 1 noise.

    The network receives timestep = num_train_timesteps·s (float32, as
    FlowMatchEulerDiscreteScheduler hands it over) and predicts the velocity
    dx/ds = ε − x0. ``shift`` k does not change the path: it remaps uniform sampling
    times u to s = k·u / (1 + (k − 1)·u), as the scheduler's ``shift`` does.
    """

    kind = "rectified_flow"

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000, timestep_scale: float | None = None):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.timestep_scale = None if timestep_scale is None else float(timestep_scale)
        # the network's timestep per unit of s: T as diffusers' FlowMatch schedulers hand it, or
        # the family's (FLUX's pipeline divides by 1000: s itself)
        self._scale: float = self.num_train_timesteps if self.timestep_scale is None else self.timestep_scale

    def point(self, t: torch.Tensor) -> Point:
        s = torch.as_tensor(t, dtype=F64)
        one = torch.ones_like(s)
        return Point(1 - s, s, -one, one)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(t, dtype=F64)
        return torch.log1p(-s) - torch.log(s)

    def time_at_log_snr(self, log_snr: torch.Tensor, snap_tol: torch.Tensor | float = 0.0) -> torch.Tensor:
        return torch.sigmoid(-log_snr.to(F64))  # s = σ/(α+σ) = 1/(1 + e^λ)

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        """s = k·u / (1 + (k − 1)·u): the sampling-time shift of FlowMatchEulerDiscreteScheduler."""
        u = torch.as_tensor(u, dtype=F64)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def model_timestep(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # in float32 exactly as diffusers computes it: sigmas.float() * num_train_timesteps
        return torch.as_tensor(t).to(dtype) * self._scale

    def time_from_model_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        return (timestep.to(F64) / self._scale).clamp(0.0, 1.0)

    def timestep_log_snr_resolution(self, timestep: torch.Tensor) -> torch.Tensor | float:
        # a timestep rounded to its dtype has |δs| ≤ eps·s, so |δλ| = |δs|/(s(1−s)) ≤ eps/(1−s);
        # allow 4× that for the float32 rounding of s before it was scaled
        if not timestep.is_floating_point():
            return 0.0
        eps = torch.finfo(timestep.dtype).eps
        s = self.time_from_model_timestep(timestep)
        return 4 * eps / (1 - s).clamp_min(eps)

    def to_config(self) -> dict[str, Any]:
        return rectified_flow(self.shift, self.num_train_timesteps, self.timestep_scale)


class CosinePath(GaussianPath):
    """α = cos(πt/2), σ = sin(πt/2), t ∈ [0, 1], t = 1 noise (variance preserving)."""

    kind = "cosine"

    def point(self, t: torch.Tensor) -> Point:
        t = torch.as_tensor(t, dtype=F64)
        h = math.pi / 2
        return Point(torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t))

    def time_at_log_snr(self, log_snr: torch.Tensor, snap_tol: torch.Tensor | float = 0.0) -> torch.Tensor:
        return torch.atan(torch.exp(-log_snr.to(F64))) * (2 / math.pi)  # tan(πt/2) = σ/α = e^{−λ}

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind}


class VEPath(GaussianPath):
    """Variance exploding (score SDE, Song et al. 2021): x = x0 + σ·ε, time t = σ ∈ [sigma_min,
    sigma_max]; the network's timestep is σ itself (ScoreSdeVeScheduler, NCSN++)."""

    kind = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max

    def point(self, t: torch.Tensor) -> Point:
        t = torch.as_tensor(t, dtype=F64)
        return Point(torch.ones_like(t), t, torch.zeros_like(t), torch.ones_like(t))

    def time_at_log_snr(self, log_snr: torch.Tensor, snap_tol: torch.Tensor | float = 0.0) -> torch.Tensor:
        return torch.exp(-log_snr.to(F64)).clamp(self.sigma_min, self.sigma_max)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class EDMPath(VEPath):
    """Karras et al. (2022) preconditioning as a path: the network sees x = c_in·(x0 + σ_VE·ε),
    c_in = 1/√(σ_VE² + σ_d²), so α = c_in, σ = σ_VE·c_in; time t = σ_VE ∈ [sigma_min,
    sigma_max], timestep c_noise = ¼·log σ_VE (diffusers' EDM schedulers; also
    EulerDiscreteScheduler's ``timestep_type="continuous"``, where σ_d = 1 and the path is
    variance preserving). λ = −log σ_VE, as on the VE path."""

    kind = "edm"
    _schedule: Mapping[str, Any] | None  # the beta schedule it was described from (from_config), if any

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        super().__init__(sigma_min, sigma_max)
        if not sigma_min > 0 or not sigma_data > 0:
            raise ValueError(f"need sigma_min > 0 and sigma_data > 0, got {sigma_min}, {sigma_data}")
        self.sigma_data = float(sigma_data)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "EDMPath":
        """From its description (``kind`` "edm"); a missing sigma bound is taken from the beta
        schedule in ``schedule`` (σ_VE = √((1 − ᾱ)/ᾱ) at its first and last timestep)."""
        config = {k: v for k, v in config.items() if k != "kind"}
        schedule = config.pop("schedule", None)
        if schedule is not None and (config.get("sigma_min") is None or config.get("sigma_max") is None):
            acp = DiscreteVPSchedule.from_config(schedule).alphas_cumprod
            ends = ((1 - acp[[0, -1]]) / acp[[0, -1]]).sqrt().tolist()
            config["sigma_min"] = config.get("sigma_min") or ends[0]
            config["sigma_max"] = config.get("sigma_max") or ends[1]
        path = cls(**config)
        path._schedule = schedule
        return path

    def point(self, t: torch.Tensor) -> Point:
        s = torch.as_tensor(t, dtype=F64)
        c = 1 / torch.sqrt(s**2 + self.sigma_data**2)
        return Point(c, s * c, -s * c**3, self.sigma_data**2 * c**3)

    def model_timestep(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (0.25 * torch.log(torch.as_tensor(t, dtype=F64))).to(dtype)

    def time_from_model_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        return torch.exp(4 * timestep.to(F64))

    def timestep_log_snr_resolution(self, timestep: torch.Tensor) -> torch.Tensor | float:
        # λ = −4·timestep: a timestep rounded to its dtype moves λ by at most 4·eps·|timestep|; twice that
        if not timestep.is_floating_point():
            return 0.0
        return 8 * torch.finfo(timestep.dtype).eps * timestep.to(F64).abs()

    def to_config(self) -> dict[str, Any]:
        config = {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                  "sigma_data": self.sigma_data}
        if getattr(self, "_schedule", None) is not None:
            config["schedule"] = self._schedule
        return config


class VPSDEPath(GaussianPath):
    """The continuous-time VP SDE (Song et al. 2021, eq. 11; ScoreSdeVpScheduler): β(t) = β_min +
    t·(β_max − β_min), log α(t) = −¼·t²·(β_max − β_min) − ½·t·β_min, σ = √(1 − α²), t ∈
    [sampling_eps, 1] (1 = noise); the network receives t itself, as the scheduler's timesteps."""

    kind = "vp_sde"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, sampling_eps: float = 1e-3):
        if not 0 <= beta_min < beta_max or not 0 < sampling_eps < 1:
            raise ValueError(f"need 0 <= beta_min < beta_max and 0 < sampling_eps < 1, got {beta_min}, {beta_max}, "
                             f"{sampling_eps}")
        self.beta_min, self.beta_max, self.sampling_eps = float(beta_min), float(beta_max), float(sampling_eps)
        self.t_min, self.t_max = self.sampling_eps, 1.0

    def point(self, t: torch.Tensor) -> Point:
        t = torch.as_tensor(t, dtype=F64)
        spread = self.beta_max - self.beta_min
        log_alpha = -0.25 * t**2 * spread - 0.5 * t * self.beta_min
        d_log_alpha = -0.5 * t * spread - 0.5 * self.beta_min
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2 * log_alpha))
        d_alpha = alpha * d_log_alpha
        return Point(alpha, sigma, d_alpha, -alpha * d_alpha / sigma)

    def time_at_log_snr(self, log_snr: torch.Tensor, snap_tol: torch.Tensor | float = 0.0) -> torch.Tensor:
        # α² = sigmoid(2λ): solve ¼·Δβ·t² + ½·β_min·t + log α = 0 for t ≥ 0
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * log_snr.to(F64))
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        t = 2 * (-log_alpha) / (b + torch.sqrt(b**2 - 4 * a * log_alpha))  # (the stable root)
        t = torch.where(torch.isinf(log_alpha), self.t_max, t)  # λ = −∞ (pure noise): ∞/∞ above
        return t.clamp(self.t_min, self.t_max)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "sampling_eps": self.sampling_eps}


_PATHS = {cls.kind: cls for cls in (DiscreteVPSchedule, RectifiedFlow, CosinePath, VEPath, EDMPath, VPSDEPath)}


def path_from_config(config: Mapping[str, Any]) -> GaussianPath:
    """Inverse of ``GaussianPath.to_config``: the path a description stands for (a discrete VP
    schedule by its beta settings or, as fmconvert 0.1 wrote it, its ᾱ table)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in _PATHS:
        raise ValueError(f"unknown path kind {kind!r}: supported are {', '.join(_PATHS)}")
    if kind == DiscreteVPSchedule.kind and "alphas_cumprod" not in config:
        return DiscreteVPSchedule.from_config(config)
    if kind == EDMPath.kind:
        return EDMPath.from_config(config)
    return _PATHS[kind](**config)
