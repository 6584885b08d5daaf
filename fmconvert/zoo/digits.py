"""The digits feature extractor, shipped with the package for offline use (the data set it
was trained on is :func:`fmconvert.zoo.datasets.load_digits`).

:class:`DigitsClassifier` is a small CNN trained on the train split; its penultimate layer
(128 features, before the ReLU) is the feature extractor for FID on the zoo:
``DigitsClassifier.features(images)``, and :class:`DigitsFeatures` wraps it as a
torchmetrics FID feature module.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn


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
