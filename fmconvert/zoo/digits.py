"""The digits data set and its feature extractor, shipped with the package for offline use.

Data: scikit-learn's ``load_digits`` (1,797 images, 8×8, 17 grey levels 0..16), stored in
``fmconvert/zoo/digits/digits.safetensors`` as uint8 images scaled to 0..255 (v·255/16,
rounded), their labels, and the fixed held-out split: a permutation of the indices by
``numpy.random.default_rng(0)``; its first 297 are held out, the other 1,500 train.
Model data space: x = v/8 − 1 ∈ [−1, 1] (so images in [0, 1] are (x + 1)/2).

:class:`DigitsClassifier` is a small CNN trained on the train split; its penultimate layer
(128 features, before the ReLU) is the feature extractor for FID on the zoo:
``DigitsClassifier.features(images)``, and :class:`DigitsFeatures` wraps it as a
torchmetrics FID feature module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

NUM_HELD_OUT = 297
SPLIT_SEED = 0


@dataclass
class Digits:
    """``images``: (N, 1, 8, 8) uint8 in 0..255; ``labels``: (N,) int64; ``held_out``: bool mask."""

    images: torch.Tensor
    labels: torch.Tensor
    held_out: torch.Tensor

    def subset(self, which: str) -> "Digits":
        """'all', 'train' or 'held_out'."""
        if which == "all":
            return self
        mask = self.held_out if which == "held_out" else ~self.held_out
        return Digits(self.images[mask], self.labels[mask], self.held_out[mask])

    @property
    def data(self) -> torch.Tensor:
        """Images in the models' data space, x ∈ [−1, 1], float32."""
        return self.images.float() / 127.5 - 1


def split_mask(n: int = 1797) -> torch.Tensor:
    import numpy as np

    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.from_numpy(order[:NUM_HELD_OUT])] = True
    return mask


def build_digits() -> Digits:
    """From scikit-learn (needed only here, when the zoo is built)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    values = torch.from_numpy(bunch.images).float()  # 0..16
    images = (values * 255 / 16).round().to(torch.uint8).reshape(-1, 1, 8, 8)
    return Digits(images, torch.from_numpy(bunch.target).long(), split_mask(len(images)))


def digits_path() -> Path:
    from fmconvert.zoo import ZOO_DIR

    return ZOO_DIR / "digits" / "digits.safetensors"


def load_digits(which: str = "all") -> Digits:
    """The shipped digits (no scikit-learn needed); ``which``: all, train or held_out."""
    from safetensors.torch import load_file

    tensors = load_file(digits_path())
    return Digits(tensors["images"], tensors["labels"], tensors["held_out"].bool()).subset(which)


def save_digits(digits: Digits, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": digits.images, "labels": digits.labels, "held_out": digits.held_out.to(torch.uint8)}, str(path))


class DigitsClassifier(ModelMixin, ConfigMixin):
    """conv 3×3 (32) → conv 3×3 (64) → max-pool → linear (features) → linear (10 classes).

    Input: images (N, 1 or 3, 8, 8), uint8 in 0..255 or float in [0, 1].
    """

    @register_to_config
    def __init__(self, num_features: int = 128, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 4 * 4, num_features),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.25), nn.Linear(num_features, num_classes))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 0..255 or float [0, 1], 1 or 3 channels → float (N, 1, 8, 8) centred at 0."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        return x * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, (N, num_features)."""
        return self.body(self.prepare(images).to(self.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        return self.head(self.features(images))


class DigitsFeatures(nn.Module):
    """The classifier's penultimate layer as a torchmetrics FID feature module:
    ``FrechetInceptionDistance(feature=DigitsFeatures())``."""

    def __init__(self, classifier: DigitsClassifier | None = None):
        super().__init__()
        self.classifier = (classifier or load_classifier()).eval()
        self.num_features = self.classifier.config.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).float()


def load_classifier() -> DigitsClassifier:
    from fmconvert.zoo import builtin_path

    return DigitsClassifier.from_pretrained(builtin_path("digits-features", kind="features")).eval()
