"""What a run is: everything that determines a set of samples, in one frozen description.

``sample``, ``fid``, ``agree`` and ``report`` describe every set of samples they draw as a
:class:`Run`; a samples folder's ``manifest.json`` is written from :meth:`Run.manifest` and
compared against it (:class:`fmconvert.sampling.shards.ShardStore`), so samples made with other settings
are refused, never reused. A test checks that every field reaches the manifest: an option added
to Run cannot be forgotten there.

The model is named by its reference and a fingerprint of its files (:func:`model_fingerprint`),
so a folder whose weights changed under the same path is another model.

What a training run is (``train``, ``reflow``): :class:`TrainSettings`, the identity of its
checkpoint, here too, torch-free, so the command line reads its defaults from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmconvert import __version__
from fmconvert.errors import UsageError
from fmconvert.integration.families import Conditioning

if TYPE_CHECKING:
    from fmconvert.integration.pipelines import Source

#: how much of each file the fingerprint reads at each end (weights are hashed by their ends and size)
_EDGE = 1 << 20


def model_fingerprint(source: Source) -> str:
    """``hub:ID@COMMIT`` for a Hub model (the snapshot's commit), else ``sha256:…`` over the
    folder's files: their paths, sizes and first and last MiB (cheap at any size; a changed
    weight file changes its ends or its size in practice)."""
    folder = Path(source.folder)
    if source.hub_id:
        commit = folder.name if folder.parent.name == "snapshots" else (source.revision or "main")
        return f"hub:{source.hub_id}@{commit}"
    return files_fingerprint([folder, Path(source.model_folder)])


def files_fingerprint(roots: list[Path], edge: int = _EDGE) -> str:
    """``sha256:…`` over the files below ``roots`` (README.md aside): their relative paths, sizes
    and first and last ``edge`` bytes (0: paths and sizes only, for data folders of many files)."""
    digest = hashlib.sha256()
    for root in sorted({Path(r).resolve() for r in roots}):
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "README.md"):
            size = path.stat().st_size
            digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
            if edge:
                with path.open("rb") as handle:
                    digest.update(handle.read(edge))
                    if size > 2 * edge:
                        handle.seek(size - edge)
                        digest.update(handle.read(edge))
    return "sha256:" + digest.hexdigest()[:20]


@dataclass(frozen=True)
class Run:
    """One set of samples: draw ``num_images`` samples of ``model`` with ``sampler`` (a solver
    of :data:`fmconvert.math.solvers.SOLVERS` on ``grid``, or with ``baseline`` a scheduler of
    :data:`fmconvert.sampling.baselines.BASELINES` on its own timesteps) in ``steps`` steps, from the
    noise of ``seed`` (:mod:`fmconvert.sampling.generate`'s convention), in ``dtype``, conditioned by
    ``conditioning``; ``shard_size`` samples a batch and a shard. ``options``: the solver's
    (rtol, atol) or the baseline scheduler's (use_karras_sigmas, ...). ``shift``: the grid's
    time shift where not the source scheduler's own (None). ``shape``: one sample's (C, H, W),
    known once the model is loaded (None before)."""

    model: str
    fingerprint: str
    sampler: str
    steps: int
    grid: str = "uniform"
    shift: float | None = None
    baseline: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    dtype: str = "float32"
    conditioning: Conditioning = field(default_factory=Conditioning)
    num_images: int = 16
    shard_size: int = 16
    model_class: str | None = None
    shape: tuple[int, ...] | None = None
    fmconvert_version: str = __version__

    def manifest(self) -> dict[str, Any]:
        """The JSON-ready record of every field (``conditioning``: its description; what loading
        tells, ``model_class`` and ``shape``, is left out while unknown, so a record made before
        loading compares with a whole one on what it has)."""
        record: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("model_class", "shape"):
                continue
            if f.name == "conditioning":
                value = value.describe()
            elif f.name == "options":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            record[f.name] = value
        return record

    def loaded(self, model_class: str, shape: tuple[int, ...]) -> "Run":
        """The same run with what loading the model tells: its class and one sample's shape."""
        return dataclasses.replace(self, model_class=model_class, shape=tuple(int(n) for n in shape))

    @property
    def baseline_spec(self) -> str:
        """A baseline run's scheduler as :func:`fmconvert.sampling.baselines.parse_baseline` reads it."""
        options = [f"{k}={json.dumps(v)}" for k, v in self.options if k != "along_list"]
        return self.sampler + (":" + ",".join(options) if options else "")

    def slug(self) -> str:
        """A name for the run's samples folder: sampler-grid[-shiftK]-steps, and a hash of its options if any."""
        name = f"{self.sampler}-{self.grid}{'' if self.shift is None else f'-shift{self.shift:g}'}-{self.steps}"
        if self.options:
            name += "-" + hashlib.sha256(json.dumps(self.options, default=str).encode()).hexdigest()[:8]
        return name

    def describe(self) -> str:
        """In words, for logs."""
        shifted = "" if self.shift is None else f" (shift {self.shift:g})"
        how = f"its own {self.sampler} scheduler" if self.baseline else f"{self.sampler} on the {self.grid} grid{shifted}"
        return f"{self.num_images} images of {self.model} with {how}, {self.steps} steps"


def solver_options(solver: str, **given: Any) -> tuple[tuple[str, Any], ...]:
    """The options ``solver`` takes (:attr:`fmconvert.math.solvers.Solver.options`), from ``given``
    where given, else their defaults; options it does not take are not recorded."""
    from fmconvert.math.solvers import SOLVERS

    return tuple((name, given.get(name, default) if given.get(name) is not None else default)
                 for name, default in SOLVERS[solver].options)


def sweep_runs(base: Run, solvers: list[str], steps_list: list[int], baselines: list[str] | tuple[str, ...] = (),
               **given_options: Any) -> list[Run]:
    """The runs of an NFE sweep: each baseline (a spec of :func:`fmconvert.sampling.baselines.parse_baseline`,
    its options recorded, on its own timesteps: no grid shift) at every step count first, then
    every solver at every step count; everything else as in ``base``."""
    from fmconvert.sampling.baselines import parse_baseline

    runs = []
    for spec in baselines:
        baseline, options = parse_baseline(spec)
        runs += [dataclasses.replace(base, sampler=baseline.name, baseline=True, grid=baseline.grid, shift=None,
                                     steps=steps, options=options) for steps in steps_list]
    runs += [dataclasses.replace(base, sampler=solver, baseline=False, steps=steps,
                                 options=solver_options(solver, **given_options))
             for solver in solvers for steps in steps_list]
    return runs


def resolved(run: Run, source_shifts: bool) -> Run:
    """``run`` as it runs: solver ``auto`` replaced by the solver and grid shift it picks for
    ``run.steps`` (:func:`fmconvert.math.solvers.resolve_auto`; ``source_shifts``: whether the source's
    scheduler shifts its times, :attr:`fmconvert.integration.pipelines.Source.shifts_times`), so that its
    records (manifest, samples folder, --json) name what ran. Any other run is returned as it is."""
    if run.baseline or run.sampler != "auto":
        return run
    from fmconvert.math.solvers import resolve_auto

    solver, shift = resolve_auto(run.steps, run.grid, run.shift, source_shifts)
    return dataclasses.replace(run, sampler=solver, shift=shift, options=solver_options(solver))


def run_fingerprint(run: Run) -> str:
    """``sha256:…`` of ``run``'s manifest without what loading tells (``model_class`` and
    ``shape``, which the model determines): the identity of its samples, known before the model
    is loaded (a checkpoint trained on them names them by it: ``fmconvert reflow``)."""
    record = dataclasses.replace(run, model_class=None, shape=None).manifest()
    return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:20]


# -- training runs ---------------------------------------------------------------------------------

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
    sizes). ``steps`` optimiser steps of ``batch_size`` samples (global, over all processes);
    ``lr`` after ``warmup`` steps, then ``lr_schedule``; ``weight_decay`` (AdamW's);
    ``max_grad_norm`` (0: no clipping); ``time_sampling`` with ``logit_mean``/``logit_std``
    (logit-normal) or ``u_shape_a`` (U-shaped); ``loss_type``: the per-sample loss of the velocity
    error (:func:`fmconvert.training.loop.per_sample_loss`);
    ``ema_decay`` (0: no EMA); ``lora_rank`` (0: the whole network trains) with ``lora_alpha``
    (None: the rank, scale 1) on ``lora_targets``; ``mixed_precision``; ``seed``.
    ``couplings``: for paired data (``fmconvert reflow``), the couplings' identity
    (:func:`fmconvert.sampling.runs.run_fingerprint` of the run that drew them), None for fresh noise at
    every step; ``distill``: every s = 1 (one-step distillation; paired data only).
    ``prediction_type``: what the network is trained to predict on the source's path (None: what
    it predicts now; see the module docstring)."""

    model: str
    fingerprint: str
    data: str
    data_fingerprint: str
    steps: int = 1000
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
            (self.steps >= 1, "steps", "a positive integer"), (self.batch_size >= 1, "batch_size", "a positive integer"),
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
                raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)!r}")
        if self.prediction_type is not None and self.prediction_type not in TRAINABLE_PREDICTIONS:
            raise UsageError(f"unknown --prediction-type '{self.prediction_type}': use one of {', '.join(TRAINABLE_PREDICTIONS)}")
        if self.distill and self.couplings is None:
            raise UsageError("--distill trains one step from the noise to its coupled sample: it needs couplings "
                             "(fmconvert reflow --distill)")
        for name, choices in (("lr_schedule", LR_SCHEDULES), ("time_sampling", TIME_SAMPLINGS), ("loss_type", LOSS_TYPES),
                              ("mixed_precision", MIXED_PRECISIONS)):
            if getattr(self, name) not in choices:
                raise UsageError(f"unknown --{name.replace('_', '-')} '{getattr(self, name)}': use one of "
                                 f"{', '.join(choices)}")

    @classmethod
    def create(cls, model: str, data: str, **fields: Any) -> "TrainSettings":
        """Settings for ``model`` and ``data`` with their fingerprints, read from their files
        (configs and file ends, nothing loaded); UsageError for data that is not there."""
        from fmconvert.integration.pipelines import inspect_source

        return cls(model=model, fingerprint=model_fingerprint(inspect_source(model)), data=data,
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
        progress = (step - self.warmup) / max(1, self.steps - 1 - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def data_fingerprint(data: str) -> str:
    """The data's identity for a checkpoint: builtin data by its file's ends, a folder by its
    files' paths and sizes (not their contents: a large folder is not read for it)."""
    from fmconvert.files.references import parse_data

    ref = parse_data(data)
    if ref.kind == "builtin":
        from fmconvert.zoo.digits import digits_path

        return files_fingerprint([digits_path().parent]) + f"/{ref.split}"
    assert ref.path is not None
    return files_fingerprint([ref.path], edge=0)
