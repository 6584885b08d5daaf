"""A training run's checkpoint: its work folder, and saving, checking and resuming its state.

Checkpoints: ``OUT.partial/checkpoint.safetensors`` (:func:`work_folder`, :data:`CHECKPOINT`),
replaced atomically every ``checkpoint_every`` steps: network, EMA and AdamW state as tensors, the
RNG state, the loss so far (float64, one per step), the step, and the settings
(:meth:`~fmconvert.training.settings.TrainSettings.manifest`) in its metadata (:class:`TrainState`,
:func:`save_checkpoint`; no pickle). Rerunning the same command resumes from it
(:func:`load_checkpoint`); other settings are refused in one line and nothing is written
(:func:`check_checkpoint`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fmconvert.errors import FmconvertError
from fmconvert.files.atomic import atomic_write

if TYPE_CHECKING:
    from fmconvert.training.settings import TrainSettings

CHECKPOINT = "checkpoint.safetensors"


def work_folder(out: Path) -> Path:
    """Where a run keeps its checkpoint until the output is written: ``OUT.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


@dataclass
class TrainState:
    """What a checkpoint holds besides the settings: the steps done, the network's and the
    EMA's state dicts, AdamW's per-parameter state (tensors), the CPU (and CUDA) RNG state, the
    global loss of every step done (float64), the seconds spent, and the fp16 loss scaler's state."""

    step: int
    network: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[int, dict[str, torch.Tensor]]
    rng: dict[str, torch.Tensor]
    losses: torch.Tensor
    seconds: float = 0.0
    scaler: dict[str, Any] | None = None


def save_checkpoint(path: Path, settings: TrainSettings, state: TrainState) -> None:
    """``state`` as one safetensors file (written to a temporary name and renamed): tensors
    under network.*, ema.*, optimizer.<param>.<key>, rng.*, and "losses"; the settings,
    step, seconds and scaler state in its metadata. No pickle."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {"losses": state.losses.to(torch.float64)}
    tensors.update({f"network.{k}": v for k, v in state.network.items()})
    tensors.update({f"ema.{k}": v for k, v in (state.ema or {}).items()})
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    for index, entries in state.optimizer.items():
        tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in entries.items()})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"settings": json.dumps(settings.manifest(), sort_keys=True), "step": str(state.step),
                "seconds": repr(state.seconds), "ema": str(state.ema is not None),
                "scaler": json.dumps(state.scaler)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _metadata(path: Path) -> dict[str, str] | None:
    if not Path(path).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def checkpoint_settings(path: Path) -> dict[str, Any] | None:
    """The settings a checkpoint was made with (None: no checkpoint there)."""
    metadata = _metadata(path)
    return None if metadata is None else json.loads(metadata["settings"])


def checkpoint_step(path: Path) -> int | None:
    """The steps a checkpoint holds (None: no checkpoint there)."""
    metadata = _metadata(path)
    return None if metadata is None else int(metadata["step"])


def check_checkpoint(path: Path, settings: TrainSettings) -> None:
    """Refuse (FmconvertError, one line naming what differs) a checkpoint made with other settings."""
    from fmconvert.sampling.shards import differences

    existing = checkpoint_settings(path)
    detail = differences(existing, settings.manifest()) if existing is not None else ""
    if detail:
        raise FmconvertError(f"the checkpoint in '{Path(path).parent}' was made with other settings ({detail}); rerun "
                             "with those settings to resume it, or remove the folder to start again")


def load_checkpoint(path: Path) -> TrainState:
    """The state :func:`save_checkpoint` wrote."""
    from safetensors import safe_open

    groups: dict[str, dict[str, torch.Tensor]] = {"network": {}, "ema": {}, "rng": {}, "optimizer": {}}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        losses = handle.get_tensor("losses")
        for key in handle.keys():
            head, _, rest = key.partition(".")
            if head in groups:
                groups[head][rest] = handle.get_tensor(key)
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in groups["optimizer"].items():
        index, _, name = key.partition(".")
        optimizer.setdefault(int(index), {})[name] = value
    return TrainState(int(metadata["step"]), groups["network"], groups["ema"] if metadata.get("ema") == "True" else None,
                      optimizer, groups["rng"], losses, float(metadata.get("seconds", 0.0)),
                      json.loads(metadata.get("scaler", "null")))


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU RNG state, and each CUDA device's where CUDA is in use (a checkpoint's ``rng``)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`rng_state`'s ``state`` (the CUDA states where there are as many devices)."""
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
