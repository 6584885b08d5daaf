"""Streaming feature statistics of one image set, a torchmetrics ``Metric``, and FID/KID between two.

Modelled on torchmetrics' ``image/fid.py``: :class:`FrechetInceptionDistance` keeps, per set,
the sum of the features, the sum of their outer products and the count, in float64, summed
across processes; its ``compute`` turns them into a mean and an unbiased covariance and calls
the module-level ``_compute_fid``. :class:`FeatureStatistics` keeps the same three states for
ONE set (declared with ``add_state`` and their reductions), so a reference's statistics are
computed once and compared with any number of sample sets; :func:`fid_between` is then a pure
formula over two metrics' states, the very arithmetic of ``FrechetInceptionDistance.compute``
(the same numbers, bit for bit). KID needs the features themselves: the metric also keeps those
of the first ``KID_KEEP`` images by global index (a ``cat`` list state, with the indices), and
:func:`kid_between` feeds them to torchmetrics' ``KernelInceptionDistance`` through its public
``update``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import _compute_fid

F64 = torch.float64
KID_KEEP = 10_000


class Identity(nn.Module):
    """Features already computed: the torchmetrics 'feature' module passes them through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def mean_and_covariance(features_sum: Tensor, features_cov_sum: Tensor, num_samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of N samples of D-dimensional features, in the
    features' own units, from their sum (D,), the sum of their outer products (D, D) (float64)
    and N (a 0-d integer tensor): ``FrechetInceptionDistance.compute``'s arithmetic, op for op,
    Σ = (Σᵢ xᵢxᵢᵀ − N·μμᵀ) / (N − 1). RuntimeError (as torchmetrics) for N < 2."""
    if num_samples < 2:
        raise RuntimeError("More than one sample is required for both the real and fake distributed to compute FID")
    mean = (features_sum / num_samples).unsqueeze(0)
    cov_num = features_cov_sum - num_samples * mean.t().mm(mean)
    return mean.squeeze(0), cov_num / (num_samples - 1)


class FeatureStatistics(Metric):
    """Streaming statistics of ONE set of D-dimensional features (N samples so far), the
    per-set state of torchmetrics' ``FrechetInceptionDistance``:

    - ``features_sum`` (D,) float64, Σᵢ xᵢ; ``features_cov_sum`` (D, D) float64, Σᵢ xᵢxᵢᵀ;
      ``num_samples`` 0-d int64, N: reduced across processes by ``sum``;
    - ``kid_features`` (list of (n, D) float32) and ``kid_index`` (list of (n,) int64): the
      features of the images whose global index is below ``KID_KEEP``, and those indices,
      reduced by ``cat`` (rank order); :attr:`kept` puts them in index order.

    :meth:`compute` returns (mean (D,), covariance (D, D)), float64, the covariance unbiased
    (divided by N − 1) as torchmetrics'. Statistics are summed over processes once, explicitly
    (:meth:`sum_over_processes`), never on ``compute``: statistics read from a file are
    already global on every rank. Saved as the tensors of :meth:`tensors` (safetensors).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False
    # the states add_state registers (torchmetrics types them loosely)
    features_sum: Tensor
    features_cov_sum: Tensor
    num_samples: Tensor
    kid_features: list[Tensor]
    kid_index: list[Tensor]
    _LIST_STATES = ("kid_features", "kid_index")  # (a list's ``cat`` reduction leaves one tensor)

    def __init__(self, num_features: int, device: str | torch.device = "cpu", **kwargs: Any):
        kwargs.setdefault("sync_on_compute", False)  # (see the class docstring)
        kwargs.setdefault("compute_with_cache", False)  # states may be set from a file or summed after a compute
        super().__init__(**kwargs)
        self.num_features = num_features
        self.add_state("features_sum", torch.zeros(num_features, dtype=F64), dist_reduce_fx="sum")
        self.add_state("features_cov_sum", torch.zeros(num_features, num_features, dtype=F64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("kid_features", [], dist_reduce_fx="cat")
        self.add_state("kid_index", [], dist_reduce_fx="cat")
        self.to(device)

    def update(self, features: Tensor, start: int | None = None) -> None:
        """Add features (n, D) of the images with global indices start, start + 1, ... (default:
        the next ones, ``start`` = N so far), accumulated in float64 as torchmetrics does."""
        start = self.count if start is None else start
        as_f64 = features.double()
        self.features_sum += as_f64.sum(dim=0)
        self.features_cov_sum += as_f64.t().mm(as_f64)
        self.num_samples += features.shape[0]
        if start < KID_KEEP:
            kept = features[: KID_KEEP - start].float()
            self.kid_features.append(kept)
            self.kid_index.append(torch.arange(start, start + len(kept), device=kept.device))

    def compute(self) -> tuple[Tensor, Tensor]:
        """(mean (D,), unbiased covariance (D, D)), float64: :func:`mean_and_covariance`."""
        return mean_and_covariance(self.features_sum, self.features_cov_sum, self.num_samples)

    def sum_over_processes(self) -> FeatureStatistics:
        """Make the states the totals over every process, by torchmetrics' own sync (each state's
        declared reduction; gloo or NCCL, the default group): call it once on every rank after the
        last update. Nothing happens in a single process. Returns the metric."""
        if not self.kid_features:  # a (0, D) block: torchmetrics' placeholder for an empty list is 1-d and
            # cannot be gathered with the (n, D) blocks of the other ranks
            self.kid_features.append(torch.zeros(0, self.num_features, device=self.device))
            self.kid_index.append(torch.zeros(0, dtype=torch.long, device=self.device))
        with self.sync_context():
            totals = dict(self.metric_state)  # (inside: synced; on leaving, the local states come back)
        for name, value in totals.items():
            setattr(self, name, [value] if name in self._LIST_STATES and isinstance(value, Tensor) else value)
        return self

    @property
    def count(self) -> int:
        """N, the number of samples."""
        return int(self.num_samples)

    @property
    def num_kept(self) -> int:
        return sum(len(piece) for piece in self.kid_features)

    @property
    def kept(self) -> Tensor:
        """Features of the first KID_KEEP images by global index, in index order: (n, D) on the CPU."""
        if not self.kid_features:
            return torch.zeros(0, self.num_features)
        features, index = torch.cat(self.kid_features), torch.cat(self.kid_index)
        return features[index.argsort(stable=True)].cpu()

    def tensors(self) -> dict[str, Tensor]:
        """The statistics as CPU tensors, a statistics file's keys: features_sum (D,), features_cov_sum
        (D, D), num_samples (1,), kid_features (n, D)."""
        return {
            "features_sum": self.features_sum.cpu(),
            "features_cov_sum": self.features_cov_sum.cpu(),
            "num_samples": torch.as_tensor(self.num_samples).reshape(1).cpu(),
            "kid_features": self.kept,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], device: str | torch.device = "cpu") -> FeatureStatistics:
        """Statistics from the tensors of :meth:`tensors` (a statistics file, already global)."""
        stats = cls(tensors["features_sum"].numel(), device)
        stats.features_sum = tensors["features_sum"].to(device, F64)
        stats.features_cov_sum = tensors["features_cov_sum"].to(device, F64)
        stats.num_samples = tensors["num_samples"].reshape(()).to(device)
        kept = tensors["kid_features"]
        if len(kept):
            stats.kid_features = [kept.to(device)]
            stats.kid_index = [torch.arange(len(kept), device=device)]
        return stats


def fid_between(reference: FeatureStatistics, other: FeatureStatistics) -> float:
    """FID with ``reference`` as torchmetrics' real set and ``other`` as the fake one:
    ``_compute_fid`` of their means and covariances (:func:`mean_and_covariance`), float64."""
    mu1, sigma1 = mean_and_covariance(reference.features_sum, reference.features_cov_sum, reference.num_samples)
    mu2, sigma2 = mean_and_covariance(other.features_sum, other.features_cov_sum, other.num_samples)
    return float(_compute_fid(mu1, sigma1, mu2, sigma2))


def kid_between(reference: FeatureStatistics, other: FeatureStatistics, seed: int = 0) -> tuple[float, float] | None:
    """KID mean and std (torchmetrics' ``KernelInceptionDistance``, 50 subsets of up to 1,000,
    torch's generator seeded ``seed``) of the kept features, when both sets kept at least 100."""
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(reference.num_kept, other.num_kept)
    if n < 100:
        return None
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # its note on keeping features: we keep at most KID_KEEP
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=Identity(reference.num_features), subset_size=min(1000, n), subsets=50,
                                         normalize=False, sync_on_compute=False)
    metric.update(reference.kept.double(), real=True)
    metric.update(other.kept.double(), real=False)
    mean, std = metric.compute()
    return float(mean), float(std)
