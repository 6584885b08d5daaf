"""Tuned samplers: time grids fitted to one model's velocity field (:mod:`fmconvert.math.tuning`),
from teacher pairs drawn here, and the tuned sampler file that ``sample`` and ``fid`` take.

A tuning run, for each step count N (= NFE for the one-evaluation solvers), on the loaded model:

1. K teacher pairs: noise ε of the documented convention (seed ``seed``, images 0..K−1) and the
   teacher's endpoint, ``teacher_solver`` on ``teacher_steps`` uniform steps (a converged solve);
   every solve, the teacher's and each grid's, starts from ε scaled to its grid's first time, as
   :func:`fmconvert.sampling.generate.iter_generate` starts;
2. the candidates without tuning (the uniform grid with the source's own shift and shifted by 1.5
   and 2, karras, logsnr), each solved with ``solver``; the best on the training pairs is "best untuned";
3. ``gits``: :func:`fmconvert.math.tuning.gits_grid` on a fine uniform grid of ``fine_steps``;
   ``ld3``: :func:`fmconvert.math.tuning.learn_grid` warm-started from the best untuned grid;
   ``s4s``: :func:`fmconvert.math.tuning.learn_sampler`, the same with one correction a step of the
   solver's weights (stored as ``weights``; only fmconvert's samplers run them, not a stock scheduler);
   both minimise the ``objective`` (:data:`OBJECTIVES`: the endpoints' mean squared distance, a
   perceptual network's, :func:`perceptual_distance`, or that plus the Fréchet distance of the batch's
   endpoints to the teacher's, :func:`frechet_objective`), at a constant or annealed learning rate
   (``lr_schedule``);
   a tuned grid starts at the top of the source's trained range (:func:`trained_top`: s = 1 for a
   flow-matching or zero-terminal-SNR source and for a converted folder, s of its noisiest
   timestep for any other), so each of its times is one the network was trained at, with a
   finite σ/α;
4. validation on ``validation_pairs`` other pairs (seed ``validation_seed``, never tuned on): the
   RMSE to the teacher of every grid above, recorded with the tuned grid;
5. with a ``selection`` (:class:`Selection`: a distance between sets of images, FID's Fréchet distance
   in the fid command's features: :func:`fmconvert.evaluation.fid.frechet_selection`), the held-out
   pairs also choose: the untuned grid tuning starts from is the one whose held-out endpoints lie
   closest to the teacher's in that distance, and ld3 / s4s keep, among their checkpoints, the one
   closest (early stopping on a validation set, as LD3 and S4S pick their results). Closer to the
   teacher in the squared distance is not closer to the data at 3 or 4 NFE on some models
   (docs/benchmarks/TUNING.md); a distribution measure is what FID judges. The distance may also be
   to a dataset's images rather than the teacher's (``frechet_selection(..., reference=REF)``): FID to
   the teacher ranks the zoo's tuned samplers poorly, FID to the data well from 2,048 held-out pairs
   (docs/benchmarks/JUDGE.md). The held-out pairs then take part in the choice: the numbers to report
   come from other noise (the benchmarks' seed 1000).

The file (JSON, no pickle; :class:`TunedFile`) names the model's fingerprint; each entry holds the
times in s (fmconvert's, 1 = noise) and in the source's own coordinates: its model timesteps and
its σ/α (the sigmas diffusers' Euler / DPM schedulers take with ``sigmas=``). A file tuned for
other weights is refused in one line (:func:`check_fingerprint`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from fmconvert.errors import UsageError, check_choice
from fmconvert.integration.conditioning import Conditioning
from fmconvert.integration.source import Source
from fmconvert.math.paths import RectifiedFlow
from fmconvert.math.solvers import SOLVERS, WEIGHTED, integrate
from fmconvert.sampling import distributed
from fmconvert.sampling.generate import velocity_field
from fmconvert.sampling.model import VelocityModel, sample_shape, sampling_grid
from fmconvert.sampling.noise import NoiseStream

FORMAT, VERSION = "fmconvert-tuned-sampler", 1
#: the tuning methods: name → what it is, for help and records
METHODS = {"gits": "dynamic programming over a fine teacher trajectory (GITS, Chen et al. ICML 2024)",
           "ld3": "time steps learnt by gradient descent through the solver (LD3, Tong et al. ICLR 2025)",
           "s4s": "time steps and one solver-weight correction a step, learnt together (S4S, Frankel et al. ICML "
                  "2025, in its smallest form; euler, ab2 and the exponential integrators)"}
#: what the learnt methods (ld3, s4s) minimise between the solver's endpoints and the teacher's
OBJECTIVES = {"mse": "the mean squared distance of the endpoints, in the model's data space (latents for a latent model)",
              "features": "the mean squared distance of the decoded images' early feature maps in a perceptual network "
                          "(LPIPS's idea, Zhang et al. CVPR 2018; LD3 tunes on LPIPS): for 8x8 pixel images, the two "
                          "convolutions of the digits classifier",
              "frechet": "features, plus the Frechet distance (FID's formula) between the batch's endpoints and all the "
                         "teacher's endpoints in the digits classifier's last layer, FID's features on the zoo (a "
                         "distribution term, as GAS adds an adversarial one), each term divided by its value at the "
                         "start grid; on all the pairs each iteration by default"}
#: the pairs each iteration of ld3 and s4s takes, by objective, where ``batch_size`` is ``"auto"`` (None: all the
#: pairs; frechet's covariance wants many, and the zoo's tuning on whole batches is what
#: docs/benchmarks/TUNING-frechet.md measures)
AUTO_BATCH: dict[str, int | None] = {"mse": 32, "features": 32, "frechet": None}
#: how a tuning run chooses its start grid and the checkpoint it keeps (:class:`Selection`): name → what it is
SELECTIONS = {"loss": "the objective on the tuning pairs: the untuned grid of least error starts, and the better of the "
                      "start and the end is kept (LD3's own)",
              "fid": "FID's Fréchet distance to the teacher's endpoints on the held-out pairs, in the fid command's "
                     "features: the closest untuned grid starts, and the closest checkpoint is kept (early stopping on "
                     "a distribution measure; fmconvert.evaluation.fid.frechet_selection), or with a reference "
                     "dataset FID to its images instead"}
#: tuning settings recorded since a later version, with the value earlier files ran with
_LATER_SETTINGS = {"objective": "mse", "select": "loss", "restarts": 1, "lr_schedule": "constant"}
#: the grids a tuned one is compared with: (grid, shift)
UNTUNED = (("uniform", None), ("uniform", 1.5), ("uniform", 2.0), ("karras", None), ("logsnr", None))


@dataclass(frozen=True)
class Selection:
    """How a tuning run picks the untuned grid it starts from and the checkpoint it keeps, on the held-out
    pairs (step 5 of the module docstring). ``name``: recorded as the run's ``select`` (``"loss"``, no
    selection, is the objective on the tuning pairs, between the start and the end); ``against(teacher)``:
    for the teacher's held-out images (B, C, H, W) in [0, 1] (the family's decode), the distance of
    another such set of images to them, a float, lower better; ``check(shape)``: UsageError, before
    any teacher solve, for images (C, H, W) it cannot take."""

    name: str
    against: Callable[[torch.Tensor], Callable[[torch.Tensor], float]]
    check: Callable[[tuple[int, ...]], None] = lambda shape: None
    #: the distance of a set of images, given as an iterable of batches (B, C, H, W) in [0, 1], to a dataset's:
    #: for a selection that needs no teacher (FID to the data), which :func:`judge` takes; None for one that does
    to_data: Callable[[Iterable[torch.Tensor]], float] | None = None


@dataclass(frozen=True)
class TunedGrid:
    """One tuned grid: ``solver`` in ``steps`` steps (``nfe`` field evaluations), found by ``method``;
    ``s``: the times (steps + 1, decreasing, 1 = noise); ``timesteps`` and ``sigmas``: the same times
    as the source's model timesteps and its σ/α (∞ at a time beyond the source's noisiest, written
    as null); ``validation``: held-out RMSE to the teacher of this grid and of each untuned one;
    ``tuning``: how it was found (teacher, pairs, seeds, loss per iteration, seconds, ``select``,
    ``computed_on``: device, torch, CPU kernels, threads, which the grid depends on; with a
    selection, ``validation`` also holds ``score``, this grid's held-out distance, and
    ``untuned_score``, each untuned one's); ``weights``: the
    per-step corrections of the solver's weights (:func:`fmconvert.math.solvers.weighted_multistep`;
    method s4s), None for times alone (and absent from the file then)."""

    solver: str
    steps: int
    nfe: int
    method: str
    s: tuple[float, ...]
    timesteps: tuple[float, ...]
    sigmas: tuple[float | None, ...]
    validation: dict[str, Any]
    tuning: dict[str, Any]
    weights: tuple[float, ...] | None = None

    @property
    def one_evaluation_a_step(self) -> bool:
        """Whether its solver spends one field evaluation a step (its step count is its NFE: what
        ``--solver auto --steps N`` compares; heun's 2N − 1 is not)."""
        return self.nfe == self.steps

    def asked(self, nfe_list: list[int] | None) -> bool:
        """Whether a request for the NFEs of ``nfe_list`` (None: all) covers this grid."""
        return nfe_list is None or self.nfe in nfe_list

    @property
    def rmse(self) -> float:
        return float(self.validation["rmse"])


@dataclass
class TunedFile:
    """A tuned sampler file: the ``model`` reference and ``fingerprint`` it was tuned for, and its grids."""

    model: str
    fingerprint: str
    grids: list[TunedGrid] = field(default_factory=list)

    def text(self) -> str:
        """The file's JSON text (a grid's ``weights`` key only where it has weights)."""
        record = {"format": FORMAT, "version": VERSION, "model": self.model, "fingerprint": self.fingerprint,
                  "grids": [{k: v for k, v in asdict(g).items() if k != "weights" or v is not None}
                            for g in self.grids]}
        return json.dumps(record, indent=1, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        from fmconvert.files.atomic import atomic_write

        text = self.text()
        return atomic_write(Path(path), lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: str | Path) -> TunedFile:
        """UsageError, one line naming the file: not JSON, not a tuned sampler file, another version."""
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read tuned sampler file '{path}': {str(error).splitlines()[0]}") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise UsageError(f"'{path}' is not a tuned sampler file (format {FORMAT!r}; made by fmconvert tune)")
        if record.get("version") != VERSION:
            raise UsageError(f"'{path}' is a version {record.get('version')} tuned sampler file; this fmconvert reads "
                             f"version {VERSION}")
        grids = [TunedGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()})  # type: ignore[arg-type]
                 for g in record["grids"]]
        return cls(record["model"], record["fingerprint"], grids)

    def best(self, steps: int, solver: str | None = None, times_only: bool = False) -> TunedGrid:
        """The grid of ``steps`` steps of ``solver`` (None: of any solver that spends one evaluation a
        step, so ``steps`` is also the NFE, as ``sample --solver auto --steps N`` counts them: a heun
        grid of N steps, 2N − 1 evaluations, is not compared with ab2's of N; ``times_only``: without
        weights) with the least judged score where all such grids were scored by the same judge
        (:func:`judge`: the same measure, images, seed, conditioning and shape), else with the least
        held-out score where all were chosen by the same selection (:class:`Selection`), else with the
        least held-out RMSE; UsageError listing what the file has."""
        found = [g for g in self.grids if g.steps == steps and (g.solver == solver if solver else g.one_evaluation_a_step)
                 and not (times_only and g.weights is not None)]
        if not found:
            have = ", ".join(sorted({f"{g.solver} in {g.steps} steps ({g.nfe} NFE)" + (" with weights" if g.weights else "")
                                     for g in self.grids})) or "nothing"
            alone = " without weights" if times_only else ""
            which = f"{solver} in {steps} steps" if solver else f"{steps} NFE in {steps} steps (any solver of one evaluation a step)"
            raise UsageError(f"the tuned sampler file has no grid for {which}{alone}; it has {have}")
        judges = {None if "judge" not in g.validation else  # (the judge's record but its score)
                  json.dumps({k: v for k, v in g.validation["judge"].items() if k != "score"}, sort_keys=True)
                  for g in found}
        if len(judges) == 1 and None not in judges:
            return min(found, key=lambda g: float(g.validation["judge"]["score"]))
        selections = {g.tuning.get("select", _LATER_SETTINGS["select"]) for g in found}
        if len(selections) == 1 and all("score" in g.validation for g in found):
            return min(found, key=lambda g: float(g.validation["score"]))
        return min(found, key=lambda g: g.rmse)

    def picks(self, nfe_list: list[int] | None = None) -> dict[str, int]:
        """For each step count N (of ``nfe_list``'s NFE where given) of a grid of one evaluation a step,
        the index in ``grids`` of :meth:`best` (N) of any solver: what ``--grid FILE --solver auto --steps N``
        takes (JSON's keys: N as text)."""
        counts = sorted({g.steps for g in self.grids if g.one_evaluation_a_step and g.asked(nfe_list)})
        best = {n: self.best(n) for n in counts}
        return {str(n): next(i for i, g in enumerate(self.grids) if g is best[n]) for n in counts}


def check_fingerprint(tuned: TunedFile, fingerprint: str, path: str | Path) -> None:
    """UsageError unless ``tuned`` was made for the weights ``fingerprint`` names."""
    if tuned.fingerprint != fingerprint:
        raise UsageError(f"tuned sampler file '{path}' was tuned for other weights ({tuned.model}, {tuned.fingerprint}); "
                         f"this model is {fingerprint}: tune it with fmconvert tune")


def nfe_of(solver: str, steps: int) -> int:
    """Field evaluations of ``solver`` in ``steps`` steps on a grid ending at s = 0 (heun's last step
    is Euler's: :func:`fmconvert.math.solvers.heun`)."""
    return (SOLVERS[solver].evals_per_step or 0) * steps - (1 if solver == "heun" else 0)


def steps_for(solver: str, nfe: int) -> int:
    """Grid steps that spend ``nfe`` evaluations with ``solver`` (:func:`nfe_of`); UsageError where none
    do or the NFE is below the solver's order."""
    spec = SOLVERS[solver]
    if spec.evals_per_step is None or solver == "auto":
        raise UsageError(f"solver={solver!r} cannot be tuned: its steps are chosen for it; name a solver")
    if nfe < spec.order:
        raise UsageError(f"nfe={nfe} is below {solver}'s order {spec.order}: tune it for {spec.order} or more")
    found = [steps for steps in range(1, nfe + 1) if nfe_of(solver, steps) == nfe]
    if not found:
        possible = ", ".join(str(nfe_of(solver, k)) for k in range(1, 5))
        raise UsageError(f"nfe={nfe}: {solver} spends {possible}, ... evaluations; give one of those")
    return found[0]


def source_coordinates(vm: VelocityModel, s: torch.Tensor) -> tuple[list[float], list[float | None]]:
    """The times ``s`` in the source's own coordinates: (model timesteps, σ/α) on its path at equal
    log-SNR; σ/α is None where it is infinite (s = 1 on a path that reaches pure noise)."""
    path = vm.grid_source
    lam = RectifiedFlow().log_snr(s.to(torch.float64))
    t = path.time_at_log_snr(lam)
    timesteps = path.model_timestep(t).to(torch.float64).tolist()
    sigmas = [float(v) if torch.isfinite(v) else None for v in (-lam).exp()]  # λ = log(α/σ)
    return [float(v) for v in timesteps], sigmas


def trained_top(vm: VelocityModel) -> float:
    """Where a tuned grid starts: for a source as it is, the largest s of its trained range, the
    rectified-path time at the log-SNR of its noisiest trained time (1 where that is pure noise:
    flow matching, zero terminal SNR), so every time has a finite σ/α the source's own schedulers
    take; for a converted folder 1, where its pipeline starts (DDPMPipeline draws ε at s = 1 and
    never scales it), its velocity field being defined on all of [0, 1]."""
    if vm.source.converted:
        return 1.0
    path = vm.grid_source
    lam = path.log_snr(torch.tensor(float(path.t_max), dtype=torch.float64))
    return float(RectifiedFlow().time_at_log_snr(lam))


def start_at(grid: torch.Tensor, top: float) -> torch.Tensor:
    """``grid`` with its first time lowered to ``top`` where it lies above (a grid that starts at
    s = 1 on a source trained up to ``top``); ValueError if its second time is not below ``top``."""
    if float(grid[0]) <= top:
        return grid
    if float(grid[1]) >= top:
        raise ValueError(f"the grid's second time {float(grid[1]):.6g} is not below the trained range's top {top:.6g}")
    return torch.cat([grid.new_tensor([top]), grid[1:]])


def _start_scale(grid: torch.Tensor) -> float:
    """|x| / |ε| at the grid's first time: the noise's scale where a solve on ``grid`` starts."""
    return float(RectifiedFlow().point(grid[0].to(torch.float64)).norm)


def _rmse(x: torch.Tensor, target: torch.Tensor) -> float:
    return float((x.double() - target.double()).square().mean().sqrt())


def no_perceptual_network(reference: str, made: str) -> UsageError:
    """The refusal of objectives ``features`` and ``frechet`` for a model whose samples (``made``) fmconvert has
    no perceptual network for."""
    return UsageError(f"objectives 'features' and 'frechet' need a perceptual network for these samples, and fmconvert has one for "
                      f"8x8 pixel images (the digits classifier); {reference} makes {made}: use objective='mse'")


def perceptual_distance(vm: VelocityModel, device: str = "cpu") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Objective ``features``: (x, target) ↦ the mean squared distance between the early feature maps
    (two 3×3 convolutions with ReLU, 64 channels at 8×8) of the images decoded from x and from the
    target, in the digits classifier, differentiable in x. UsageError for models whose samples are not
    8×8 pixel images with 1 or 3 channels: fmconvert has no perceptual network for them (LPIPS's needs
    weights from the network). The FID of the zoo is read from the same classifier's last layer, so
    tuning on its first layers is not independent of that measure."""
    return _early_distance(vm, _perceptual_network(vm, device))


def _perceptual_network(vm: VelocityModel, device: str) -> Any:
    """The digits classifier, frozen, for ``vm``'s samples; UsageError as :func:`perceptual_distance`'s."""
    from fmconvert.zoo.digits import load_classifier

    shape = tuple(sample_shape(vm))
    if vm.source.family.decoder is not None or shape[1:] != (8, 8) or shape[0] not in (1, 3):
        made = "latents" if vm.source.family.decoder is not None else f"{shape[0]}x{shape[1]}x{shape[2]} images"
        raise no_perceptual_network(vm.source.reference, made)
    return load_classifier().to(device).eval().requires_grad_(False)


def _early_distance(vm: VelocityModel, classifier: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    early = classifier.body[:4]  # conv, ReLU, conv, ReLU

    def features(x: torch.Tensor) -> torch.Tensor:
        return early(classifier.prepare(vm.source.family.decode(vm.pipeline, x)))

    return lambda x, target: (features(x) - features(target)).square().mean()


def frechet_objective(vm: VelocityModel, teacher: torch.Tensor, device: str = "cpu"
                      ) -> Callable[[torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Objective ``frechet``, for a given ``start``: (x, target) ↦ F(x, target)/F₀ + D(x)/D₀, where F is
    :func:`perceptual_distance` (the pairs' early feature maps), D the Fréchet distance
    (:func:`fmconvert.math.tuning.frechet_distance_to`) between the digits classifier's last-layer
    features of the decoded batch x and of ``teacher`` (all the tuning pairs' teacher endpoints: the
    distribution the batch should match, not pair by pair), and F₀, D₀ their values for ``start`` (the
    endpoints of the grid the descent starts from, on all the tuning pairs), so each term counts alike
    at the start. FID of the zoo reads the same last layer: this objective tunes on FID's own features,
    on the tuning pairs (the reported numbers come from other noise). Returns start ↦ that objective (the
    network read and the teacher's statistics computed once, each start only scaling the terms).
    UsageError as :func:`perceptual_distance`'s."""
    from fmconvert.math.tuning import frechet_distance_to

    classifier = _perceptual_network(vm, device)
    paired = _early_distance(vm, classifier)

    def last(x: torch.Tensor) -> torch.Tensor:
        return classifier.features(vm.source.family.decode(vm.pipeline, x))

    with torch.no_grad():
        spread = frechet_distance_to(last(teacher))

    def starting_at(start: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            paired_0, spread_0 = (max(float(v), 1e-12) for v in (paired(start, teacher), spread(last(start))))
        return lambda x, target: paired(x, target) / paired_0 + spread(last(x)) / spread_0

    return starting_at


def batch_of(batch_size: int | str | None, objective: str) -> int | None:
    """``batch_size`` as the descent takes it: ``"auto"`` → :data:`AUTO_BATCH` of ``objective``, else itself
    (a count, or None for all the pairs). UsageError for another string or a count below 1."""
    if batch_size == "auto":
        return AUTO_BATCH[objective]
    if isinstance(batch_size, str) or (batch_size is not None and batch_size < 1):
        raise UsageError(f"batch_size={batch_size!r}: a positive count of pairs, None (all of them) or 'auto'")
    return batch_size


def check_tuning(solver: str, nfe_list: list[int], methods: tuple[str, ...], pairs: int, validation_pairs: int,
                 seed: int, validation_seed: int, teacher_steps: int, fine_steps: int, objective: str = "mse",
                 restarts: int = 1, batch_size: int | str | None = "auto", lr_schedule: str = "constant") -> None:
    """UsageError, before any model is read, for what no tuning run
    could honour: an unknown method or solver, a solver that cannot be tuned (or not by LD3), an NFE
    below its order, non-positive counts, held-out pairs on the tuning seed, restarts without a learnt
    method, objective frechet on batches of one pair (a covariance needs two), an unknown learning-rate
    schedule."""
    from fmconvert.math.tuning import DIFFERENTIABLE, LR_SCHEDULES

    for method in methods:
        check_choice("method", method, METHODS)
    check_choice("solver", solver, SOLVERS)
    check_choice("objective", objective, OBJECTIVES)
    check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
    if objective != "mse" and not {"ld3", "s4s"} & set(methods):
        raise UsageError(f"objective={objective!r} is what ld3 and s4s minimise; gits's cost is its own: add method "
                         "ld3 or s4s, or leave the objective")
    batch = batch_of(batch_size, objective)
    if objective == "frechet" and min(pairs, batch or pairs) < 2:
        raise UsageError(f"objective='frechet' compares the spread of a batch's endpoints with the teacher's, and "
                         f"{min(pairs, batch or pairs)} pair has none: tune on batches of two or more pairs "
                         "(batch_size 'auto': all of them)")
    if restarts < 1:
        raise UsageError(f"restarts={restarts}: ld3 and s4s descend once or more")
    if restarts > 1 and not {"ld3", "s4s"} & set(methods):
        raise UsageError(f"restarts={restarts} repeats ld3's and s4s's descent; gits has none: add method ld3 or s4s, "
                         "or leave restarts at 1")
    if solver not in DIFFERENTIABLE:
        raise UsageError(f"solver={solver!r} is not tuned yet: tune one of {', '.join(DIFFERENTIABLE)} (LD3 "
                         "differentiates through the solver's steps, which these take as torch arithmetic)")
    if "s4s" in methods and solver not in WEIGHTED:
        raise UsageError(f"method='s4s' corrects the weights of {', '.join(WEIGHTED)}, not {solver}: tune one of "
                         "those, or use method ld3 or gits")
    steps_list = [steps_for(solver, n) for n in nfe_list]
    if teacher_steps < 1 or fine_steps < max(steps_list) or pairs < 1 or validation_pairs < 1:
        raise UsageError("teacher_steps, pairs and validation_pairs must be positive and fine_steps at least the "
                         "largest step count")
    if seed == validation_seed:
        raise UsageError(f"validation_seed={validation_seed} is the tuning seed: held-out pairs need another seed")


def tune(vm: VelocityModel, fingerprint: str, nfe_list: list[int], solver: str = "ab2", *,
         methods: tuple[str, ...] = ("gits", "ld3"), conditioning: Conditioning | None = None, pairs: int = 128,
         seed: int = 0, validation_pairs: int = 256, validation_seed: int = 1, teacher_solver: str = "rk4",
         teacher_steps: int = 64, fine_steps: int = 64, iterations: int = 150, lr: float = 0.1,
         soft_radius: float = 0.0, batch_size: int | str | None = "auto", objective: str = "mse",
         selection: Selection | None = None, check_every: int = 10, restarts: int = 1,
         lr_schedule: str = "constant", device: str = "cpu",
         existing: TunedFile | None = None, save: Callable[[TunedFile], object] | None = None,
         progress: Callable[[str, int, float], None] | None = None) -> TunedFile:
    """Tune ``solver``'s grid for each NFE of ``nfe_list`` by each of ``methods`` on ``vm`` (see the
    module docstring). ``existing``: a file of an earlier run of the same settings, whose grids are
    kept and not tuned again (a rerun continues); ``save(file)``: called after each grid (the CLI
    writes the file there). ``progress(what, iteration, loss)``: during LD3. ``selection``: how the
    start grid and the kept checkpoint (one every ``check_every`` iterations) are chosen on the
    held-out pairs (module docstring, step 5); None: by the objective on the tuning pairs.
    ``restarts``: ld3's and s4s's descents from the same start, each on its own batch order, the
    best candidate of all kept (:func:`~fmconvert.math.tuning.learn_grid`); the record's losses are
    the kept one's descent's. ``lr_schedule``: their learning rate's
    (:data:`~fmconvert.math.tuning.LR_SCHEDULES`).
    UsageError, before any teacher solve, for an unknown method, a solver that cannot be tuned, an
    NFE below its order, a model that needs conditioning it is not given (the family's check) and
    images the selection cannot take."""
    check_tuning(solver, nfe_list, methods, pairs, validation_pairs, seed, validation_seed, teacher_steps, fine_steps,
                 objective, restarts, batch_size, lr_schedule)
    conditioning = conditioning or Conditioning()
    vm.source.family.check(conditioning, vm.source, max(pairs, validation_pairs))
    return _tune(vm, fingerprint, nfe_list, solver, methods=methods, conditioning=conditioning, pairs=pairs, seed=seed,
                 validation_pairs=validation_pairs, validation_seed=validation_seed, teacher_solver=teacher_solver,
                 teacher_steps=teacher_steps, fine_steps=fine_steps, iterations=iterations, lr=lr,
                 soft_radius=soft_radius, batch_size=batch_of(batch_size, objective), objective=objective, selection=selection,
                 check_every=check_every, restarts=restarts, lr_schedule=lr_schedule, device=device, existing=existing,
                 save=save,
                 progress=progress)


def _tune(vm: VelocityModel, fingerprint: str, nfe_list: list[int], solver: str, *, methods: tuple[str, ...],
          conditioning: Conditioning, pairs: int, seed: int, validation_pairs: int, validation_seed: int,
          teacher_solver: str, teacher_steps: int, fine_steps: int, iterations: int, lr: float, soft_radius: float,
          batch_size: int | None, objective: str, selection: Selection | None, check_every: int, restarts: int,
          lr_schedule: str,
          device: str,
          existing: TunedFile | None, save: Callable[[TunedFile], object] | None,
          progress: Callable[[str, int, float], None] | None) -> TunedFile:
    """:func:`tune`'s work, the request taken as checked."""
    from fmconvert.math.tuning import gits_grid, learn_grid, learn_sampler

    steps_list = [steps_for(solver, n) for n in nfe_list]
    tuned = existing or TunedFile(vm.source.reference, fingerprint)
    settings = {"teacher": {"solver": teacher_solver, "steps": teacher_steps, "grid": "uniform"}, "pairs": pairs,
                "seed": seed, "validation_pairs": validation_pairs, "validation_seed": validation_seed,
                "fine_steps": fine_steps, "iterations": iterations, "lr": lr, "soft_radius": soft_radius, "objective": objective,
                "batch_size": batch_size, "sample_shape": list(sample_shape(vm)),
                "conditioning": conditioning.describe(), "select": selection.name if selection else "loss",
                "restarts": restarts, "lr_schedule": lr_schedule}
    if selection is not None:
        settings["check_every"] = check_every

    def settings_of(method: str) -> dict[str, Any]:  # (gits's cost and search are its own: these are the learnt methods')
        return {**settings, **{k: v for k, v in _LATER_SETTINGS.items() if k != "select"}} if method == "gits" \
            else settings

    for g in tuned.grids:  # (a rerun continues a file of the same settings only)
        if g.solver == solver and g.steps in steps_list and g.method in methods and \
                {k: g.tuning.get(k, _LATER_SETTINGS.get(k)) for k in settings} != settings_of(g.method):
            raise UsageError(f"the tuned sampler file already holds a {g.method} grid for {solver} in {g.steps} steps "
                             "tuned with other settings; write to another file")

    def pairs_of(count: int, noise_seed: int):
        field_ = velocity_field(vm, conditioning, 0, count, device)
        teacher = sampling_grid(vm, "uniform", teacher_steps)
        noise = NoiseStream(count, sample_shape(vm), noise_seed).take(0, count).to(device)
        with torch.no_grad():
            target = SOLVERS[teacher_solver].step(field_, noise * _start_scale(teacher), teacher)
        return field_, noise, target

    learnt = {"ld3", "s4s"} & set(methods)
    if objective != "mse" and learnt:  # (refused before any solve)
        classifier = _perceptual_network(vm, device)
    distance = _early_distance(vm, classifier) if objective == "features" and learnt else None

    def decode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vm.source.family.decode(vm.pipeline, x)

    if selection is not None:  # (before any solve: one decode of the sample shape)
        selection.check(tuple(decode(torch.zeros(1, *sample_shape(vm), device=device)).shape[1:]))
    train_field, train_noise, train_target = pairs_of(pairs, seed)
    held_field, held_noise, held_target = pairs_of(validation_pairs, validation_seed)
    frechet_at = frechet_objective(vm, train_target, device) if objective == "frechet" and learnt else None
    top = trained_top(vm)
    judge = selection.against(decode(held_target)) if selection is not None else None

    def solve_on(grid: torch.Tensor, on_held_out: bool, weights: torch.Tensor | None = None) -> torch.Tensor:
        f, noise = (held_field, held_noise) if on_held_out else (train_field, train_noise)
        with torch.no_grad():
            return integrate(f, noise * _start_scale(grid), grid, solver, weights)

    def error(grid: torch.Tensor, on_held_out: bool, weights: torch.Tensor | None = None) -> float:
        return _rmse(solve_on(grid, on_held_out, weights), held_target if on_held_out else train_target)

    def score(grid: torch.Tensor, weights: torch.Tensor | None = None) -> float:
        assert judge is not None
        return judge(decode(solve_on(grid, True, weights)))

    for nfe, steps in zip(nfe_list, steps_list):
        candidates = {}
        for grid_name, shift in UNTUNED:
            try:
                name = grid_name + ("" if shift is None else f"@{shift:g}")
                candidates[name] = sampling_grid(vm, grid_name, steps, shift)
            except ValueError:  # (a grid this source cannot have)
                continue
        untuned = {name: error(grid, False) for name, grid in candidates.items()}
        held_untuned = {name: error(grid, True) for name, grid in candidates.items()}
        # the start: the candidate of least training error, or of least held-out score (as tuned: its first time
        # at the trained range's top)
        scored = {name: score(start_at(grid, top)) for name, grid in candidates.items()} if judge else None
        ranking = scored or untuned
        best_name = min(ranking, key=ranking.__getitem__)
        for method in methods:
            if any(g.steps == steps and g.solver == solver and g.method == method for g in tuned.grids):
                continue
            started = time.perf_counter()
            losses: list[float] = []
            weights: torch.Tensor | None = None
            if method == "gits":
                fine = torch.linspace(top, 0, fine_steps + 1, dtype=torch.float64)
                grid = gits_grid(train_field, train_noise * _start_scale(fine), steps, fine, teacher_solver,
                                 substeps=max(1, teacher_steps // fine_steps), solver=solver)
            else:
                callback = (lambda k, loss: progress(f"{method} {solver} NFE {nfe}", k, loss)) if progress else None
                init = start_at(candidates[best_name], top)
                x_train = train_noise * _start_scale(init)
                if frechet_at is not None:  # (its terms scaled by their values at this start)
                    distance = frechet_at(solve_on(init, False))
                keep = score if judge else None
                if method == "ld3":
                    grid, losses = learn_grid(train_field, x_train, train_target, init, solver, iterations=iterations,
                                              lr=lr, soft_radius=soft_radius, batch_size=batch_size, seed=seed,
                                              callback=callback, distance=distance, keep=keep, check_every=check_every,
                                              restarts=restarts, lr_schedule=lr_schedule)
                else:
                    grid, weights, losses = learn_sampler(train_field, x_train, train_target, init, solver,
                                                          iterations=iterations, lr=lr, soft_radius=soft_radius,
                                                          batch_size=batch_size, seed=seed, callback=callback,
                                                          distance=distance, keep=keep, check_every=check_every,
                                                          restarts=restarts, lr_schedule=lr_schedule)
            seconds = time.perf_counter() - started
            grid = grid.detach().to(torch.float64)
            timesteps, sigmas = source_coordinates(vm, grid)
            validation = {"rmse": error(grid, True, weights), "untuned_rmse": held_untuned, "best_untuned": best_name,
                          "best_untuned_rmse": held_untuned[best_name], "train_rmse": error(grid, False, weights),
                          "untuned_train_rmse": untuned}
            if scored is not None:
                validation.update(score=score(grid, weights), untuned_score=scored)
            record = {**settings_of(method), "best_untuned_on_train": min(untuned, key=untuned.__getitem__),
                      "losses": losses, "seconds": round(seconds, 3), "computed_on": distributed.computed_on(device)}
            tuned.grids.append(TunedGrid(solver, steps, nfe, method, tuple(grid.tolist()), tuple(timesteps),
                                         tuple(sigmas), validation, record,
                                         None if weights is None else tuple(weights.tolist())))
            if save is not None:
                save(tuned)
    return tuned


#: a judge's defaults: held-out noise of tune's validation seed (neither the tuning pairs' seed 0 nor the benchmarks'
#: seed 1000), and as many images as the benchmarks' FID: from 2,048 the judge took another grid at 3 of the zoo's 12
#: points, each worse by the benchmarks' FID (docs/benchmarks/JUDGED.md, JUDGED-2048.md), from
#: 256 it ranks no better than FID to the teacher (docs/benchmarks/JUDGE.md)
JUDGE_IMAGES, JUDGE_SEED = 10_000, 1


def check_judge(tuned: TunedFile, nfe_list: list[int] | None, images: int, batch_size: int) -> None:
    """UsageError, one line, for a judge of ``tuned`` that cannot run: a file without grids, an NFE of
    ``nfe_list`` it has no grid for, fewer than 2 images, a batch below 1 (:func:`judge`'s request)."""
    if images < 2 or batch_size < 1:
        raise UsageError(f"a judge takes at least 2 images and a batch of at least 1, got images={images}, "
                         f"batch_size={batch_size}")
    if not tuned.grids:
        raise UsageError("the tuned sampler file has no grids to judge")
    missing = sorted(set(nfe_list or ()) - {g.nfe for g in tuned.grids})
    if missing or nfe_list == []:
        raise UsageError(f"the tuned sampler file has no grid for NFE {', '.join(map(str, missing)) or '(none asked)'}; "
                         f"it has NFE {', '.join(map(str, sorted({g.nfe for g in tuned.grids})))}")


def judged_as(selection: Selection, images: int, seed: int, conditioning: Conditioning,
              shape: tuple[int, ...]) -> dict[str, Any]:
    """What a judge's record names besides its score: the measure, the images and seed, the conditioning
    and the sample shape (a grid judged otherwise in any of them is judged again)."""
    return {"by": selection.name, "images": images, "seed": seed, "conditioning": conditioning.describe(),
            "sample_shape": list(shape)}


def _judged_so(grid: TunedGrid, how: dict[str, Any]) -> bool:
    """Whether ``grid`` holds a judge's score recorded as ``how`` (:func:`judged_as`) says."""
    done = grid.validation.get("judge", {})
    return {k: done.get(k) for k in how} == how


def judge(vm: VelocityModel, tuned: TunedFile, selection: Selection, *, images: int = JUDGE_IMAGES,
          seed: int = JUDGE_SEED, nfe_list: list[int] | None = None, conditioning: Conditioning | None = None,
          batch_size: int = 250, device: str = "cpu", save: Callable[[TunedFile], object] | None = None,
          progress: Callable[[TunedGrid, float], None] | None = None) -> TunedFile:
    """Score each grid of ``tuned`` (those for the NFEs of ``nfe_list``, or all) on ``vm`` by FID to a dataset:
    ``selection.to_data`` (:func:`fmconvert.evaluation.fid.frechet_selection` with a reference) of the
    grid's endpoints from ``images`` noises of ``seed`` (image n's noise the n-th of the documented stream,
    scaled to the grid's first time, as ``sample --seed`` draws them; solved with the grid's solver and
    weights, ``batch_size`` at a time, and decoded by the family). No teacher solve: a judge of a whole file
    costs one few-step solve per grid. Recorded in each grid's ``validation["judge"]`` as ``{"by":
    selection.name, "images", "seed", "conditioning", "sample_shape", "score"}`` (:func:`judged_as`); a grid
    judged the same way already keeps its score (a rerun continues; ``save(file)`` after each grid), another
    judge's record is replaced. :meth:`TunedFile.best` then takes the grid of least judged score wherever
    every candidate has the same judge's. Why: a tuning run's own choice judges by the teacher, which ranks
    tuned samplers poorly, and cannot compare grids of other runs; FID to the data ranks them as the
    benchmarks' FID does, the better the more images (docs/benchmarks/JUDGE.md, JUDGED.md). ``conditioning``: a conditional model's, as
    ``sample`` takes it (the family's check). ``progress(grid, score)``: after each grid judged. UsageError,
    before any solve, for a selection that needs the teacher, a request :func:`check_judge` refuses,
    conditioning the model needs and images the selection cannot take."""
    to_data = selection.to_data
    if to_data is None:
        raise UsageError(f"{selection.name} judges by the teacher's endpoints, which judging a file does not solve; "
                         "judge by FID to a dataset (frechet_selection with a reference)")
    check_judge(tuned, nfe_list, images, batch_size)
    conditioning = conditioning or Conditioning()
    vm.source.family.check(conditioning, vm.source, images)
    shape = sample_shape(vm)

    def decode(x: torch.Tensor) -> torch.Tensor:
        return vm.source.family.decode(vm.pipeline, x)

    with torch.no_grad():  # (before any solve: one decode of the sample shape)
        selection.check(tuple(decode(torch.zeros(1, *shape, device=device)).shape[1:]))
    stream = NoiseStream(images, shape, seed)
    how = judged_as(selection, images, seed, conditioning, shape)
    for i, g in enumerate(tuned.grids):
        if not g.asked(nfe_list) or _judged_so(g, how):
            continue
        grid = torch.tensor(g.s, dtype=torch.float64)
        weights = None if g.weights is None else torch.tensor(g.weights, dtype=torch.float64)

        def endpoints(grid: torch.Tensor = grid, weights: torch.Tensor | None = weights, solver: str = g.solver):
            for first in range(0, images, batch_size):
                count = min(batch_size, images - first)
                field_ = velocity_field(vm, conditioning, first, count, device)
                noise = stream.take(first, first + count).to(device)
                with torch.no_grad():
                    yield decode(integrate(field_, noise * _start_scale(grid), grid, solver, weights))

        score = float(to_data(endpoints()))
        tuned.grids[i] = g = replace(g, validation={**g.validation, "judge": {**how, "score": score}})
        if save is not None:
            save(tuned)
        if progress is not None:
            progress(g, score)
    return tuned


def load_tuned(path: str | Path, fingerprint: str) -> TunedFile:
    """A tuned sampler file for the weights ``fingerprint`` names (:func:`check_fingerprint`)."""
    tuned = TunedFile.load(path)
    check_fingerprint(tuned, fingerprint, path)
    return tuned


def tune_model(reference: str | Source, nfe_list: list[int], solver: str = "ab2", *, out: str | Path,
               methods: tuple[str, ...] = ("gits", "ld3"), conditioning: Conditioning | None = None,
               pairs: int = 128, seed: int = 0, validation_pairs: int = 256, validation_seed: int = 1,
               teacher_steps: int = 64, fine_steps: int = 64, iterations: int = 150, lr: float = 0.1,
               soft_radius: float = 0.0, batch_size: int | str | None = "auto", objective: str = "mse",
               selection: Selection | None = None, check_every: int = 10, restarts: int = 1,
               lr_schedule: str = "constant", device: str = "cpu",
               existing: TunedFile | None = None, plot: str | Path | None = None, into: str | Path | None = None,
               height: int | None = None, width: int | None = None, progress: bool = False,
               revision: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
               log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """What ``fmconvert tune`` does between its options and its output: ``reference`` (or a source
    inspected once) checked (:func:`check_tuning`; the family's check of ``conditioning`` from its
    configs) before its weights are read, loaded once (float32, on ``device``), tuned (:func:`tune`),
    the file written to ``out`` after each grid (atomically: an interrupted run keeps the grids
    done, and a rerun with ``existing`` continues), and with ``plot`` LD3's loss per iteration as a
    PNG. ``into``: a converted folder of the same weights (the model itself, when it is one) whose
    stock pipeline then steps the tuned Euler times (:func:`~fmconvert.integration.folder.store_tuned_times`:
    ``pipe(num_inference_steps=N)`` for each tuned N; the file stored beside); only for
    ``solver="euler"``, the scheduler's, refused with the rest before the weights are read.
    ``selection``, ``check_every``, ``restarts``, ``lr_schedule``: as :func:`tune` takes them.
    ``height``, ``width``: the image size tuned for, in pixels (the family's rule, as ``sample``
    takes it; default the model's). ``revision``, ``allow_pickle``, ``trust_remote_code``: as
    :func:`~fmconvert.integration.source.inspect_source` reads them. Returns the file's record with
    the seconds (and with ``into``, what was stored)."""
    from fmconvert.integration.folder import check_tuned_folder, store_tuned_times
    from fmconvert.integration.source import inspect_source
    from fmconvert.sampling.model import load_velocity_model
    from fmconvert.sampling.runs import model_fingerprint

    check_tuning(solver, nfe_list, methods, pairs, validation_pairs, seed, validation_seed, teacher_steps, fine_steps,
                 objective, restarts, batch_size, lr_schedule)
    if into is not None and solver != "euler":
        raise UsageError(f"into='{into}': a converted folder's pipeline steps Euler (FlowMatchEulerScheduler); tune "
                         "solver=euler to store times it runs")
    if into is not None and set(methods) <= {"s4s"}:
        raise UsageError(f"into='{into}': a converted folder's scheduler steps plain Euler on stored times, and s4s "
                         "also corrects the solver's weights; tune method ld3 or gits (as well) to store times")
    source = (reference if isinstance(reference, Source)
              else inspect_source(reference, revision, allow_pickle, trust_remote_code))
    conditioning = conditioning or Conditioning()
    source.family.check(conditioning, source, max(pairs, validation_pairs))
    if objective != "mse" and source.family.decoder is not None:  # (before gigabytes are read)
        raise no_perceptual_network(source.reference, "latents")
    fingerprint = model_fingerprint(source)
    if into is not None:
        check_tuned_folder(into)
        same_folder = Path(into).resolve() == Path(source.folder).resolve()  # (the usual case: read it once)
        if not same_folder and model_fingerprint(inspect_source(str(into), allow_pickle=allow_pickle,
                                                                trust_remote_code=trust_remote_code)) != fingerprint:
            raise UsageError(f"into='{into}' holds other weights than {source.reference}: tune the converted folder "
                             "itself and store the times in it (the reference and into the same folder)")
    if existing is not None:
        check_fingerprint(existing, fingerprint, out)
    vm = load_velocity_model(source, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    vm.resize(height, width)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations * restarts, desc="tune", unit="it", leave=False, file=__import__("sys").stderr)

    def step(what: str, k: int, loss: float) -> None:
        if bar is not None:
            if k == 0:
                bar.reset()
                bar.set_description(what)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3g}")

    started = time.perf_counter()
    chosen = f"; start and result chosen by {selection.name} on the held-out pairs" if selection else ""
    log(f"tuning {solver} for NFE {', '.join(map(str, nfe_list))} on {source.reference} ({', '.join(methods)}; "
        f"{pairs} pairs, teacher rk4 {teacher_steps} steps{chosen})")
    try:
        tuned = _tune(vm, fingerprint, nfe_list, solver, methods=methods, conditioning=conditioning, pairs=pairs,
                      seed=seed, validation_pairs=validation_pairs, validation_seed=validation_seed,
                      teacher_solver="rk4", teacher_steps=teacher_steps, fine_steps=fine_steps, iterations=iterations,
                      lr=lr, soft_radius=soft_radius, batch_size=batch_of(batch_size, objective), objective=objective,
                      selection=selection, check_every=check_every, restarts=restarts, lr_schedule=lr_schedule,
                      device=device, existing=existing,
                      save=lambda file: file.save(out), progress=step)
    finally:
        if bar is not None:
            bar.close()
    tuned.save(out)
    record = json.loads(Path(out).read_text())
    record["file"], record["seconds"] = str(out), round(time.perf_counter() - started, 3)
    if plot is not None:
        record["plot"] = str(plot_losses(tuned, plot))
    if into is not None:
        times = {steps: list(tuned.best(steps, solver, times_only=True).s)
                 for steps in sorted({steps_for(solver, n) for n in nfe_list})}
        # the folder's file holds the grids its pipeline can step (times alone), so that sample's grid=tuned
        # on the folder takes the times its pipeline steps
        stored = TunedFile(tuned.model, tuned.fingerprint, [g for g in tuned.grids if g.weights is None])
        record["into"] = store_tuned_times(into, times, stored.text())
        log(f"stored the tuned times for {', '.join(map(str, times))} steps in {into}: its pipeline's "
            "num_inference_steps steps them")
    return record


def judge_model(reference: str | Source, path: str | Path, selection: Selection, *, images: int = JUDGE_IMAGES,
                seed: int = JUDGE_SEED, nfe_list: list[int] | None = None, conditioning: Conditioning | None = None,
                batch_size: int = 250, device: str = "cpu", height: int | None = None, width: int | None = None,
                progress: bool = False, revision: str | None = None, allow_pickle: bool = False,
                trust_remote_code: bool = False, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """What ``fmconvert judge`` does between its options and its output: the tuned sampler file ``path``
    read and checked against ``reference``'s weights (:func:`check_fingerprint`) and ``conditioning``
    (the family's check) before the weights are read, the model loaded once (float32, on ``device``;
    ``height``, ``width`` as :func:`tune_model` takes them), its grids judged (:func:`judge`), the file
    rewritten after each grid (atomically: an interrupted run keeps the scores done). Returns the
    file's record with ``picks``: for each step count judged, the index in ``grids`` of the grid
    ``sample --grid FILE --solver auto --steps N`` now takes (:meth:`TunedFile.best` of any solver of
    one evaluation a step: N steps, N NFE), and the seconds. The request (:func:`check_judge`) and the
    file's weights (:func:`check_fingerprint`) are refused before the weights are read."""
    from fmconvert.integration.source import inspect_source
    from fmconvert.sampling.model import load_velocity_model
    from fmconvert.sampling.runs import model_fingerprint

    tuned = TunedFile.load(path)
    check_judge(tuned, nfe_list, images, batch_size)
    source = (reference if isinstance(reference, Source)
              else inspect_source(reference, revision, allow_pickle, trust_remote_code))
    check_fingerprint(tuned, model_fingerprint(source), path)
    conditioning = conditioning or Conditioning()
    source.family.check(conditioning, source, images)
    vm = load_velocity_model(source, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    vm.resize(height, width)
    count = sum(1 for g in tuned.grids if g.asked(nfe_list))
    how = judged_as(selection, images, seed, conditioning, sample_shape(vm))
    done = sum(1 for g in tuned.grids if g.asked(nfe_list) and _judged_so(g, how))
    log(f"judging {count} grids of {path} by {selection.name} on {images} images of seed {seed}"
        + (f" ({done} judged so already, kept)" if done else ""))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=count - done, desc="judge", unit="grid", leave=False, file=__import__("sys").stderr)
    started = time.perf_counter()
    try:
        judge(vm, tuned, selection, images=images, seed=seed, nfe_list=nfe_list, conditioning=conditioning,
              batch_size=batch_size, device=device, save=lambda file: file.save(path),
              progress=(lambda grid, score: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    tuned.save(path)
    record = json.loads(Path(path).read_text())
    record.update(file=str(path), picks=tuned.picks(nfe_list), seconds=round(time.perf_counter() - started, 3))
    return record


def plot_losses(tuned: TunedFile, path: str | Path) -> Path:
    """The training loss per iteration of each learnt grid (ld3, s4s), one line each (matplotlib PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmconvert.files.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for g in tuned.grids:
        if g.tuning.get("losses"):
            ax.plot(range(1, len(g.tuning["losses"]) + 1), g.tuning["losses"], label=f"{g.method} {g.solver} NFE {g.nfe}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    objectives = {g.tuning.get("objective", "mse") for g in tuned.grids if g.tuning.get("losses")}
    ax.set_ylabel("loss to the teacher (" + ", ".join(sorted(objectives)) + ")")
    ax.set_title(f"tuning of {tuned.model}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    written = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return written
