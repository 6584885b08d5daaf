"""What a training run is (``train``, ``reflow``): :class:`TrainSettings`, the identity of its
checkpoint. Plain Python (no torch), so the command line reads its defaults from it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fmconvert import __version__
from fmconvert.errors import UsageError, check_choice
from fmconvert.sampling.runs import files_fingerprint, model_fingerprint

if TYPE_CHECKING:
    from fmconvert.integration.source import Source


TIME_SAMPLINGS = ("uniform", "logit_normal", "u_shaped")
LR_SCHEDULES = ("constant", "cosine")
LOSS_TYPES = ("l2", "pseudo_huber")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
#: the attention projections of diffusers' UNets and transformers (diffusers' own LoRA default)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: what a diffusion source's network can be trained to predict (``prediction_type``)
TRAINABLE_PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class TrainSettings:
    """One training run: everything that determines its weights, and so the identity of its
    checkpoint (:meth:`manifest`; a test checks that every field reaches it). How often it is
    checkpointed, on which device and with how many processes it runs are not settings: they
    do not change what is computed (up to rounding).

    ``model``/``data``: the references as given, named by ``fingerprint`` (the model's files,
    :func:`fmconvert.sampling.runs.model_fingerprint`) and ``data_fingerprint`` (the data's file paths and
    sizes). ``train_steps`` optimiser steps of ``batch_size`` samples (global, over all processes);
    ``lr`` after ``warmup`` steps, then ``lr_schedule``; ``weight_decay`` (AdamW's);
    ``max_grad_norm`` (0: no clipping); ``time_sampling`` with ``logit_mean``/``logit_std``
    (logit-normal) or ``u_shape_a`` (U-shaped); ``loss_type``: the per-sample loss of the velocity
    error (:func:`fmconvert.training.objective.per_sample_loss`);
    ``ema_decay`` (0: no EMA); ``lora_rank`` (0: the whole network trains) with ``lora_alpha``
    (None: the rank, scale 1) on ``lora_targets``; ``mixed_precision``; ``seed``.
    ``couplings``: for paired data (``fmconvert reflow``), the couplings' identity
    (:func:`fmconvert.sampling.runs.run_fingerprint` of the run that drew them), None for fresh noise at
    every step; ``distill``: every s = 1 (one-step distillation; paired data only).
    ``prediction_type``: what the network is trained to predict on the source's path (None: what
    it predicts now; see :mod:`fmconvert.training.objective`)."""

    model: str
    fingerprint: str
    data: str
    data_fingerprint: str
    train_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    warmup: int = 100
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    u_shape_a: float = 4.0
    loss_type: str = "l2"
    ema_decay: float = 0.999
    lora_rank: int = 0
    lora_alpha: int | None = None
    lora_targets: tuple[str, ...] = LORA_TARGETS
    mixed_precision: str = "no"
    seed: int = 0
    couplings: str | None = None
    distill: bool = False
    prediction_type: str | None = None
    fmconvert_version: str = __version__

    def __post_init__(self) -> None:
        checks = [
            (self.train_steps >= 1, "train_steps", "a positive integer"), (self.batch_size >= 1, "batch_size", "a positive integer"),
            (self.lr > 0, "lr", "positive"), (self.warmup >= 0, "warmup", "0 or more"),
            (self.weight_decay >= 0, "weight_decay", "0 or more"), (self.max_grad_norm >= 0, "max_grad_norm", "0 (off) or more"),
            (self.logit_std > 0, "logit_std", "positive"), (self.u_shape_a > 0, "u_shape_a", "positive"),
            (0 <= self.ema_decay < 1, "ema_decay", "in [0, 1) (0: off)"),
            (self.lora_rank >= 0, "lora_rank", "0 (off) or a positive integer"),
            (self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "positive"),
            (self.seed >= 0, "seed", "0 or more"), (bool(self.lora_targets), "lora_targets", "at least one module name"),
        ]
        for valid, name, what in checks:
            if not valid:
                raise UsageError(f"{name}={getattr(self, name)!r}: must be {what}")
        if self.prediction_type is not None:
            check_choice("prediction_type", self.prediction_type, TRAINABLE_PREDICTIONS)
        if self.distill and self.couplings is None:
            raise UsageError("distill=True trains one step from the noise to its coupled sample: it needs couplings "
                             "(reflow with distill=True)")
        for name, choices in (("lr_schedule", LR_SCHEDULES), ("time_sampling", TIME_SAMPLINGS), ("loss_type", LOSS_TYPES),
                              ("mixed_precision", MIXED_PRECISIONS)):
            check_choice(name, getattr(self, name), choices)

    @classmethod
    def create(cls, source: Source | str, data: str, **fields: Any) -> "TrainSettings":
        """Settings for ``source`` (inspected, :func:`fmconvert.integration.source.inspect_source`,
        or a reference inspected here) and ``data`` with their fingerprints, read from their files
        (configs and file ends, nothing loaded); UsageError for data that is not there."""
        if isinstance(source, str):
            from fmconvert.integration.source import inspect_source

            source = inspect_source(source)
        return cls(model=source.reference, fingerprint=model_fingerprint(source), data=data,
                   data_fingerprint=data_fingerprint(data), **fields)

    def manifest(self) -> dict[str, Any]:
        """The JSON-ready record of every field (a checkpoint's identity)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup``
        steps, then constant, or cosine from ``lr`` down to 0.1·lr at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup) / max(1, self.train_steps - 1 - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def data_fingerprint(data: str) -> str:
    """The data's identity for a checkpoint: builtin data by its file's ends, a folder by its
    files' paths and sizes (not their contents: a large folder is not read for it)."""
    from fmconvert.files.references import parse_data

    ref = parse_data(data)
    if ref.name is not None:  # (builtin data)
        from fmconvert.zoo.datasets import DATASETS

        return files_fingerprint([DATASETS[ref.name].path().parent]) + f"/{ref.split}"
    assert ref.path is not None
    return files_fingerprint([ref.path], edge=0)
