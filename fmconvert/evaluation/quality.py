"""Sample quality on the digits zoo, measured with the bundled digits classifier.

- confident: the fraction of samples whose top class probability is ≥ 0.9;
- class balance: the fraction of samples in each class (a good model: 5–15% each);
- FID in digits features (the classifier's 128-d penultimate layer), with torchmetrics'
  FrechetInceptionDistance, against the 1,797 real digits; the real-vs-real floor is the
  train split against the held-out split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fmconvert.files.images import to_uint8
from fmconvert.zoo.datasets import load_digits
from fmconvert.zoo.digits import DigitsClassifier, DigitsFeatures, load_classifier


@dataclass
class DigitsQuality:
    confident: float
    class_fractions: list[float]
    fid: float | None
    num_samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def classify(images: torch.Tensor, classifier: DigitsClassifier) -> torch.Tensor:
    """Class probabilities for images in [0, 1] (N, 1, 8, 8)."""
    with torch.no_grad():
        return classifier(to_uint8(images)).softmax(dim=1)


def digits_fid(fake_uint8: torch.Tensor, real_uint8: torch.Tensor, features: DigitsFeatures, batch: int = 500) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features, normalize=False)
    for images, real in ((real_uint8, True), (fake_uint8, False)):
        for first in range(0, len(images), batch):
            metric.update(images[first:first + batch], real=real)
    return float(metric.compute())


def digits_quality(images: torch.Tensor, classifier: DigitsClassifier | None = None, with_fid: bool = True) -> DigitsQuality:
    """Quality numbers for generated digits, images in [0, 1] of shape (N, 1, 8, 8)."""
    classifier = classifier or load_classifier()
    probs = classify(images, classifier)
    confident = (probs.max(dim=1).values >= 0.9).float().mean().item()
    counts = torch.bincount(probs.argmax(dim=1), minlength=10).float()
    fid = None
    if with_fid:
        fid = digits_fid(to_uint8(images), load_digits("all").images, DigitsFeatures(classifier))
    return DigitsQuality(confident, (counts / counts.sum()).tolist(), fid, len(images))


def real_floor_fid(classifier: DigitsClassifier | None = None) -> float:
    """FID between the train split and the held-out split: the floor for scale."""
    features = DigitsFeatures(classifier or load_classifier())
    return digits_fid(load_digits("held_out").images, load_digits("train").images, features)
