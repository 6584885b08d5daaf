"""The data sets shipped with the package for offline use, named ``builtin:NAME[/SPLIT]``
(:data:`DATASETS`; :func:`fmconvert.files.references.parse_data` reads the names).

digits: scikit-learn's ``load_digits`` (1,797 images, 8×8, 17 grey levels 0..16), stored in
``fmconvert/zoo/digits/digits.safetensors`` as uint8 images scaled to 0..255 (v·255/16,
rounded), their labels, and the fixed held-out split: a permutation of the indices by
``numpy.random.default_rng(0)``; its first 297 are held out, the other 1,500 train.
Model data space: x = u/127.5 − 1 ∈ [−1, 1] for a stored value u (≈ v/8 − 1; images in [0, 1] are
(x + 1)/2).

Importing this module imports neither torch nor diffusers: the digits classifier is in :mod:`fmconvert.zoo.digits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

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
    import torch

    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.from_numpy(order[:NUM_HELD_OUT])] = True
    return mask


def build_digits() -> Digits:
    """From scikit-learn (needed only here, when the zoo is built)."""
    import torch
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
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": digits.images, "labels": digits.labels, "held_out": digits.held_out.to(torch.uint8)}, str(path))


@dataclass(frozen=True)
class Dataset:
    """A bundled data set: its splits ("all" is the name without one), the uint8 (N, C, H, W)
    images of a split, and the file they are stored in (whose bytes identify them)."""

    splits: tuple[str, ...]
    images: Callable[[str], torch.Tensor]
    path: Callable[[], Path]


#: builtin:NAME → its data set; a new bundled data set is one entry
DATASETS = {"digits": Dataset(("all", "train", "held_out"), lambda split: load_digits(split).images, digits_path)}
