"""What a data or reference string names, parsed once for every command (``data`` of agree,
train and report, ``reference`` of fid), and the one reader of the images it names
(:meth:`DataRef.images`, :meth:`DataRef.batches`):

- ``builtin:NAME[/SPLIT]``: data shipped with fmconvert (:data:`fmconvert.zoo.datasets.DATASETS`:
  ``builtin:digits``, splits ``train`` and ``held_out``; none means all);
- an image folder;
- a statistics file (``.safetensors``, reference statistics saved by fid), where the
  command takes feature statistics.

Anything else is refused in one line that lists what is valid (UsageError, exit 2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from fmconvert.errors import UsageError
from fmconvert.zoo.datasets import DATASETS

if TYPE_CHECKING:
    import torch

BUILTIN = "builtin:"
#: builtin data and their splits ("all" is the name without a split)
BUILTIN_DATA = {name: dataset.splits for name, dataset in DATASETS.items()}


@dataclass(frozen=True)
class DataRef:
    """A parsed data or reference string: ``kind`` "builtin" (``name``, ``split``), "folder" or
    "stats" (``path``)."""

    text: str
    kind: str
    name: str | None = None
    split: str = "all"
    path: Path | None = None

    def images(self, limit: int | None = None) -> torch.Tensor:
        """The first ``limit`` (default all) images, uint8 (N, C, H, W) in 0..255: a builtin data
        set's split, or an image folder's files sorted by name as
        :func:`fmconvert.files.images.load_files` reads them. UsageError, one line naming the file
        or folder: a folder without images, a file that is not read, sizes that differ."""
        if self.kind == "builtin":
            assert self.name is not None
            return DATASETS[self.name].images(self.split)[:limit]
        from fmconvert.files.images import load_files

        return load_files(self._files(limit))

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """All the images as :meth:`images` gives them, ``batch_size`` at a time (an image folder is
        read a batch at a time; its files' shapes are checked, from their headers, before the first
        batch, so every batch has one (C, H, W) and a refusal comes before any is used)."""
        if self.kind == "builtin":
            images = self.images()
            yield from (images[i:i + batch_size] for i in range(0, len(images), batch_size))
            return
        from fmconvert.files.images import folder_shape, load_files

        files = self._files()
        shape = folder_shape(files)
        for first in range(0, len(files), batch_size):
            yield load_files(files[first:first + batch_size], shape)

    def cache_key(self) -> str:
        """A key that changes when the images :meth:`images` gives may: a builtin data set's name,
        split and file digest; an image folder's path, its files' names, sizes and modification
        times, and the reader's version (:data:`fmconvert.files.images.READER_VERSION`)."""
        if self.kind == "builtin":
            assert self.name is not None
            return f"{BUILTIN}{self.name}/{self.split}:{file_sha256(DATASETS[self.name].path())}"
        from fmconvert.files.images import READER_VERSION

        assert self.path is not None
        listing = "\n".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self._files())
        return f"{self.path.resolve()}:{hashlib.sha256(listing.encode()).hexdigest()}:reader{READER_VERSION}"

    def _files(self, limit: int | None = None) -> list[Path]:
        from fmconvert.files.images import folder_files

        if self.kind != "folder" or self.path is None:
            raise UsageError(f"'{self.text}' is a statistics file, not images")
        return folder_files(self.path, limit)


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _valid(statistics: bool) -> str:
    names = [f"{BUILTIN}{name}[/{'|/'.join(s for s in splits if s != 'all')}]" for name, splits in BUILTIN_DATA.items()]
    return ", ".join(names) + ", an image folder" + (" or a .safetensors statistics file" if statistics else "")


def parse_data(text: str, statistics: bool = False) -> DataRef:
    """Parse ``text``; ``statistics``: whether a statistics file is acceptable here.
    UsageError naming the problem and the valid forms."""
    if text.startswith(BUILTIN):
        name, _, split = text[len(BUILTIN):].partition("/")
        if name not in BUILTIN_DATA:
            raise UsageError(f"unknown builtin data '{name}' in '{text}': use {_valid(statistics)}")
        split = split or "all"
        if split not in BUILTIN_DATA[name]:
            splits = ", ".join(f"{BUILTIN}{name}/{s}" for s in BUILTIN_DATA[name] if s != "all")
            raise UsageError(f"unknown split '{split}' in '{text}': use {BUILTIN}{name} (all of it) or {splits}")
        return DataRef(text, "builtin", name, split)
    path = Path(text).expanduser()
    if path.is_dir():
        return DataRef(text, "folder", path=path)
    if path.is_file():
        if statistics and path.suffix == ".safetensors":
            return DataRef(text, "stats", path=path)
        raise UsageError(f"'{text}' is a file; use {_valid(statistics)}")
    raise UsageError(f"'{text}' does not exist; use {_valid(statistics)}")
