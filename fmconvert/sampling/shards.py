"""Generated samples kept on disk in shards, so long runs survive interruption.

A samples folder holds ``manifest.json`` (the settings that determine the samples: model,
solver, grid, steps, seed, shape, shard size, ...) and ``shard-000000.safetensors``, ...
(key ``samples``: float32, data space; shard j holds global indices [j·S, (j+1)·S)).
Each shard is written to a temporary name and renamed, so a killed run leaves complete
shards and at most some ``.tmp`` files, which are never read and are removed on the next
run. A folder made with other settings is refused, never mixed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fmconvert.errors import FmconvertError
from fmconvert.files.atomic import atomic_write


def differences(existing: dict, settings: dict, whole: bool = True) -> str:
    """The settings that differ between a stored record and ``settings`` (compared as JSON), as
    "key: X there, Y now" for the first three; "" when none. ``whole``: on every key of either,
    else on the keys ``settings`` has."""
    settings = json.loads(json.dumps(settings, default=str))
    keys = set(existing) | set(settings) if whole else set(settings)
    differ = sorted(k for k in keys if existing.get(k) != settings.get(k))
    return ", ".join(f"{k}: {existing.get(k)!r} there, {settings.get(k)!r} now" for k in differ[:3])


class ShardStore:
    """The shards of one run in ``folder``, whose manifest is ``settings`` (a run's
    :meth:`~fmconvert.sampling.runs.Run.manifest`): created with it, or refused if made with others."""

    def __init__(self, folder: Path, settings: dict):
        from fmconvert.sampling import distributed

        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings, default=str))
        manifest = self.folder / "manifest.json"
        if manifest.is_file():
            self.check(self.folder, self.settings, whole=True)
        elif distributed.is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(manifest, lambda tmp: tmp.write_text(json.dumps(self.settings, indent=2, sort_keys=True) + "\n"))
        if distributed.is_main():  # half-written shards of an interrupted run: never read, removed
            for stale in self.folder.glob(".shard-*"):
                stale.unlink(missing_ok=True)
        distributed.barrier()

    @staticmethod
    def check(folder: Path, settings: dict, whole: bool = False) -> None:
        """Refuse (FmconvertError, one line naming the settings that differ) a samples folder
        whose manifest differs from ``settings``: on every key, or (``whole=False``, a check
        before the model is loaded) on the keys ``settings`` has. Nothing to check where there
        is no manifest yet."""
        manifest = Path(folder) / "manifest.json"
        if not manifest.is_file():
            return
        existing = json.loads(manifest.read_text())
        detail = differences(existing, settings, whole)
        if detail:
            raise FmconvertError(f"samples folder '{folder}' was made with other settings ({detail}); "
                                 "use another folder or remove it")

    def path(self, index: int) -> Path:
        return self.folder / f"shard-{index:06d}.safetensors"

    def has(self, index: int) -> bool:
        return self.path(index).is_file()

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """(samples, NFE per trajectory) of shard ``index``."""
        from safetensors import safe_open

        with safe_open(str(self.path(index)), framework="pt") as handle:
            return handle.get_tensor("samples"), int((handle.metadata() or {}).get("nfe", 0))

    def save(self, index: int, samples: torch.Tensor, nfe: int) -> None:
        from safetensors.torch import save_file

        atomic_write(self.path(index), lambda tmp: save_file({"samples": samples.float().contiguous().cpu()}, str(tmp),
                                                             metadata={"nfe": str(nfe)}))
