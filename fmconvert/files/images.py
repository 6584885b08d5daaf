"""Pictures: sample grids and folders of PNGs, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fmconvert.errors import UsageError
from fmconvert.files.atomic import atomic_folder, atomic_write


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: bumped when what the reader gives for a file changes (it keys cached reference statistics)
READER_VERSION = 2

GREY_MODES = ("1", "L", "LA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
PALETTE_MODES = ("P", "PA")


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` (suffixes IMAGE_SUFFIXES, any case), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _open(path: Path, decode: bool = True):
    """The image at ``path``, its pixels decoded unless ``decode`` is False (then only its header is
    read: mode, size); UsageError naming the file if Pillow cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        if decode:
            image.load()
    except UnidentifiedImageError:
        raise UsageError(f"cannot read '{path}': not an image Pillow recognises") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UsageError(f"cannot read '{path}' as an image ({reason})") from None
    return image


def _channels(image, path: Path) -> int:
    """1 (grey) or 3 (colour): what the reader makes of ``image``'s mode; UsageError otherwise."""
    if image.mode in GREY_MODES or image.mode in SIXTEEN_BIT_MODES:
        return 1
    if image.mode in COLOUR_MODES:
        return 3
    if image.mode in PALETTE_MODES:
        import numpy as np

        palette = np.asarray(image.getpalette("RGB") or [0, 0, 0]).reshape(-1, 3)
        return 1 if (palette == palette[:, :1]).all() else 3
    raise UsageError(f"cannot read '{path}': mode '{image.mode}' is not read (8-bit grey or colour, grey or colour "
                     "palette, 16-bit grey, with or without alpha); save it as 8-bit grey or RGB")


def _pixels(image, path: Path):
    """(H, W) uint8 for a grey image, (H, W, 3) uint8 for a colour one (see :func:`read_image`)."""
    import numpy as np

    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UsageError(f"cannot read '{path}': mode '{image.mode}' with values outside 0..65535 "
                             f"({values.min()}..{values.max()}); save it as 8- or 16-bit grey")
        return ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v·255/65535)
    return np.asarray(image.convert("L" if _channels(image, path) == 1 else "RGB"))


def read_image(path: str | Path, channels: int | None = None):
    """One image file as a NumPy array (H, W, C), uint8 0..255. Pillow's conversions, by mode:

    - grey, C = 1: 'L'; '1' (0 or 255); 'LA' (alpha dropped); 16-bit grey 'I;16', 'I;16B', 'I'
      (values 0..65535; others refused) as round(v·255/65535), so 8-bit v stored as v·257 reads
      back as v;
    - colour, C = 3: 'RGB'; 'RGBA' and 'RGBX' (alpha dropped); 'CMYK' and 'YCbCr' (JPEG) as
      Pillow's RGB of them;
    - palette 'P' and 'PA' (alpha dropped): the colours of the palette, grey (C = 1, the same
      pixels as 'L') when every palette entry is grey, else RGB.

    Alpha is dropped, not composited, as torch-fidelity and clean-fid read such files, so FID
    against a folder is theirs. JPEG (lossy) gives the pixels Pillow decodes. ``channels`` 3
    puts a grey image's value in all three channels; 1 refuses a colour image. UsageError, one
    line naming the file: not an image Pillow can read (truncated, another format), or another
    mode ('F' floats, 'I;16S', 'LAB', ...)."""
    path = Path(path)
    with _open(path) as image:
        pixels = _pixels(image, path)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if channels is not None and pixels.shape[-1] != channels:
        if channels != 3:
            raise UsageError(f"'{path}' is a colour image; {channels}-channel images are wanted")
        pixels = pixels.repeat(3, axis=-1)
    return pixels


def folder_shape(files: list[Path]) -> tuple[int, int, int]:
    """(C, H, W) that :func:`load_files` reads ``files`` as, from their headers (and palettes): C = 3
    when any file is colour (grey ones then fill all three channels), else 1. UsageError, one
    line naming the file: one Pillow cannot open, a mode :func:`read_image` does not read, or a
    size that differs from the first file's."""
    shape: tuple[int, int, int] | None = None
    channels = 1
    for path in files:
        image = _open(path, decode=False)
        if image.mode in PALETTE_MODES:  # grey or colour: its palette says
            image.close()
            image = _open(path)
        channels = max(channels, _channels(image, path))
        size = (image.height, image.width)
        image.close()
        if shape is None:
            shape = (1, *size)
        elif size != shape[1:]:
            raise UsageError(f"'{path}' is {size[0]}×{size[1]} (height×width) but '{files[0].name}' is "
                             f"{shape[1]}×{shape[2]}: the images of a folder must share one size; resize them")
    if shape is None:
        raise UsageError("no image files given")
    return (channels, *shape[1:])


def load_files(files: list[Path], shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Image files as uint8 (N, C, H, W), 0..255, each read by :func:`read_image`. ``shape``
    (C, H, W): what :func:`folder_shape` gave for the folder these files come from (so batches
    of one folder agree); default: ``folder_shape(files)``. UsageError, one line naming the file,
    as those two refuse."""
    import numpy as np

    channels, height, width = shape or folder_shape(files)
    arrays = [read_image(p, channels) for p in files]
    for path, array in zip(files, arrays):
        if array.shape[:2] != (height, width):
            raise UsageError(f"'{path}' is {array.shape[0]}×{array.shape[1]} (height×width), not {height}×{width}: "
                             "the images of a folder must share one size; resize them")
    images = torch.empty((len(arrays), channels, height, width), dtype=torch.uint8)  # plain (N, C, H, W) strides
    return images.copy_(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


def folder_files(folder: Path, limit: int | None = None) -> list[Path]:
    """The first ``limit`` (default all) of :func:`image_files`; UsageError if there are none."""
    files = image_files(folder)[:limit] if limit else image_files(folder)
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    return files


def load_folder(folder: Path, limit: int | None = None) -> torch.Tensor:
    """The first ``limit`` (default all) images of a folder, sorted by name, as uint8
    (N, C, H, W) in 0..255 (:func:`load_files`). UsageError for a folder without images."""
    return load_files(folder_files(folder, limit))
