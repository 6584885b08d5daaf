"""Pictures: sample grids and folders of PNGs, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .io import atomic_folder, atomic_write


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] → uint8, rounding to nearest."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def make_grid(images: torch.Tensor, columns: int | None = None, padding: int = 1, min_tile: int = 64) -> torch.Tensor:
    """Tile (N, C, H, W) images in [0, 1] into one (C, H', W') uint8 grid; tiny images are
    enlarged (nearest neighbour) so each tile is at least ``min_tile`` pixels wide."""
    n, c, h, w = images.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for i in range(n):
        r, k = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return to_uint8(grid[None])[0]


def _pil(image: torch.Tensor):
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    grid = make_grid(images, columns)
    return atomic_write(Path(path), lambda tmp: _pil(grid).save(tmp, format="PNG"))


def save_folder(images: torch.Tensor, folder: str | Path, force: bool = False) -> Path:
    """One PNG per image, 000000.png, 000001.png, ..."""
    folder = Path(folder)
    with atomic_folder(folder, force) as tmp:
        for i, image in enumerate(to_uint8(images)):
            _pil(image).save(tmp / f"{i:06d}.png", format="PNG")
    return folder


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(folder: Path, limit: int | None = None) -> torch.Tensor:
    """Images of a folder (sorted by name) as uint8 (N, C, H, W); all must share one size."""
    from .errors import FmconvertError

    files = image_files(folder)[:limit] if limit else image_files(folder)
    if not files:
        raise FmconvertError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    return load_files(files)


def load_files(files: list[Path]) -> torch.Tensor:
    """Image files as uint8 (N, C, H, W), grey images with C = 1; all must share one size."""
    import numpy as np
    from PIL import Image

    from .errors import FmconvertError

    arrays = [np.asarray(Image.open(p)) for p in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise FmconvertError(f"images in '{files[0].parent}' differ in size ({sorted(shapes)[:2]}); resize them to one size")
    stacked = torch.from_numpy(np.stack(arrays))
    return (stacked[:, None] if stacked.ndim == 3 else stacked.permute(0, 3, 1, 2)).contiguous()
