"""Atomic outputs: everything is written to a temporary path beside the target and renamed
at the end, so an interrupted or failed run leaves either the old output or none."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from fmconvert.errors import UsageError


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; on success it becomes ``out``.

    An existing ``out`` is refused unless ``force``; with ``force`` it is replaced only
    after the new folder is complete. On any failure the temporary folder is removed.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"output '{out}' already exists; pass force=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` then rename tmp to ``path`` (same folder, same suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def link_or_copy(src: str, dst: str) -> str:
    """Hard-link a file (following Hub cache symlinks) where possible, else copy it."""
    real = os.path.realpath(src)
    try:
        os.link(real, dst)
    except OSError:
        shutil.copy2(real, dst)
    return dst


def link_large_or_copy(src: str, dst: str, threshold: int = 1 << 20) -> str:
    """:func:`link_or_copy` for files of ``threshold`` bytes or more (weights), a copy of smaller
    ones (configs, records, pictures): a folder made from another this way can have its small
    files rewritten in place (training.json, loss.png, ...) without writing through a link into
    the other folder; its large files are only ever replaced (unlinked, then written)."""
    if os.path.getsize(os.path.realpath(src)) >= threshold:
        return link_or_copy(src, dst)
    shutil.copy2(os.path.realpath(src), dst)
    return dst
