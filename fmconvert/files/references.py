"""What a data or reference string names, parsed once for every command (``data`` of agree,
``reference`` of fid, report):

- ``builtin:NAME[/SPLIT]``: data shipped with fmconvert (``builtin:digits``, splits ``train``
  and ``held_out``; none means all);
- an image folder;
- a statistics file (``.safetensors``, reference statistics saved by fid), where the
  command takes feature statistics.

Anything else is refused in one line that lists what is valid (UsageError, exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fmconvert.errors import UsageError

BUILTIN = "builtin:"
#: builtin data and their splits ("all" is the name without a split)
BUILTIN_DATA = {"digits": ("all", "train", "held_out")}


@dataclass(frozen=True)
class DataRef:
    """A parsed data or reference string: ``kind`` "builtin" (``name``, ``split``), "folder" or
    "stats" (``path``)."""

    text: str
    kind: str
    name: str | None = None
    split: str = "all"
    path: Path | None = None


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
