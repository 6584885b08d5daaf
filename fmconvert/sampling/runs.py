"""What a run is: everything that determines a set of samples, in one frozen description.

``sample``, ``fid``, ``agree`` and ``report`` describe every set of samples they draw as a
:class:`Run`; a samples folder's ``manifest.json`` is written from :meth:`Run.manifest` and
compared against it (:class:`fmconvert.sampling.shards.ShardStore`), so samples made with other settings
are refused, never reused. A test checks that every field reaches the manifest: an option added
to Run cannot be forgotten there.

The model is named by its reference and a fingerprint of its files (:func:`model_fingerprint`),
so a folder whose weights changed under the same path is another model.

What a training run is: :class:`fmconvert.training.settings.TrainSettings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmconvert import __version__
from fmconvert.errors import UsageError, check_choice
from fmconvert.integration.conditioning import Conditioning

if TYPE_CHECKING:
    from fmconvert.integration.source import Source

#: how much of each file the fingerprint reads at each end (weights are hashed by their ends and size)
_EDGE = 1 << 20


def model_fingerprint(source: Source) -> str:
    """``hub:ID@COMMIT`` for a Hub model (the snapshot's commit), else ``sha256:…`` over the
    folder's files: their paths, sizes and first and last MiB (cheap at any size; a changed
    weight file changes its ends or its size in practice). In a converted folder, the sampler
    settings (:data:`~fmconvert.integration.folder.SAMPLER_SETTINGS`: its scheduler, the pipeline's
    index, a stored tuned sampler file) are left out: they never change the velocity field, and
    ``fmconvert tune --into`` rewrites them in the folder it tuned."""
    from fmconvert.integration.folder import SAMPLER_SETTINGS

    folder = Path(source.folder)
    if source.hub_id:
        commit = folder.name if folder.parent.name == "snapshots" else (source.revision or "main")
        return f"hub:{source.hub_id}@{commit}"
    return files_fingerprint([folder, Path(source.model_folder)], exclude=SAMPLER_SETTINGS if source.converted else ())


def files_fingerprint(roots: list[Path], edge: int = _EDGE, exclude: tuple[str, ...] = ()) -> str:
    """``sha256:…`` over the files below ``roots`` (README.md aside, and each path of ``exclude``,
    a file or a folder relative to a root): their relative paths, sizes and first and last
    ``edge`` bytes (0: paths and sizes only, for data folders of many files)."""
    digest = hashlib.sha256()
    for root in sorted({Path(r).resolve() for r in roots}):
        skipped = [root / name for name in exclude]
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "README.md"
                           and not any(p == s or s in p.parents for s in skipped)):
            size = path.stat().st_size
            digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
            if edge:
                with path.open("rb") as handle:
                    digest.update(handle.read(edge))
                    if size > 2 * edge:
                        handle.seek(size - edge)
                        digest.update(handle.read(edge))
    return "sha256:" + digest.hexdigest()[:20]


#: the grid name of a run whose times were tuned (:mod:`fmconvert.sampling.tuned`)
TUNED = "tuned"


@dataclass(frozen=True)
class OdeSampler:
    """fmconvert's ODE solver ``solver`` (:data:`fmconvert.math.solvers.SOLVERS`) on the converted
    velocity field, on the time grid ``grid`` (:data:`fmconvert.math.grids.GRIDS`) with time shift
    ``shift`` (None: the source scheduler's own), with the solver's ``options`` (rtol, atol); or, with
    grid ``"tuned"``, on the ``times`` s_0 > … > s_N themselves (a tuned sampler file's grid), with,
    where the file has them, its per-step ``weights`` (:func:`fmconvert.math.solvers.weighted_multistep`)."""

    solver: str
    grid: str = "uniform"
    shift: float | None = None
    options: tuple[tuple[str, Any], ...] = ()
    times: tuple[float, ...] | None = None
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.times is not None) != (self.grid == TUNED):
            raise ValueError(f"grid={self.grid!r} with times={self.times!r}: a tuned grid is its times "
                             f"(grid={TUNED!r}), and only a tuned grid has them")
        if self.times is not None and self.shift is not None:
            raise ValueError("a tuned grid takes no shift: its times are what was tuned")
        if self.weights is not None:
            from fmconvert.math.solvers import WEIGHTED

            if self.times is None or len(self.weights) != len(self.times) - 1:
                raise ValueError("per-step weights come with a tuned grid's times, one a step")

            if self.solver not in WEIGHTED:
                raise UsageError(f"a tuned grid for {self.solver} has per-step weights, which only "
                                 f"{', '.join(WEIGHTED)} take: the tuned sampler file is not one fmconvert tune wrote")

    @property
    def name(self) -> str:
        return self.solver

    def record(self) -> dict[str, Any]:
        """The sampler's part of a run's record (:meth:`Run.manifest`); a tuned grid's times under
        "times" (records of other grids have no such key, as before tuned grids)."""
        record: dict[str, Any] = {"sampler": self.solver, "grid": self.grid, "shift": self.shift, "baseline": False,
                                  "options": dict(self.options)}
        if self.times is not None:
            record["times"] = list(self.times)
        if self.weights is not None:
            record["weights"] = list(self.weights)
        return record

    def describe(self) -> str:
        shifted = "" if self.shift is None else f" (shift {self.shift:g})"
        weighted = "" if self.weights is None else " with tuned weights"
        return f"{self.solver}{weighted} on the {self.grid} grid{shifted}"


@dataclass(frozen=True)
class SchedulerSampler:
    """A diffusers scheduler driving the unconverted network on its own timesteps (a baseline):
    ``scheduler``, an alias of :data:`fmconvert.sampling.baselines.BASELINES` or a diffusers class
    name; ``options``: the user's settings of its config; ``spacing``: what its timesteps are called
    in a record (the alias's ``grid``); ``along_list``: step along its listed timesteps rather than
    by its own step rule (:func:`fmconvert.evaluation.agreement.trajectory_agreement`)."""

    scheduler: str
    options: tuple[tuple[str, Any], ...] = ()
    spacing: str = "own"
    along_list: bool = False

    def __post_init__(self) -> None:
        if self.along_list and self.scheduler != "ddim":
            raise ValueError("along_list is DDIM's: use scheduler 'ddim'")

    @property
    def name(self) -> str:
        return self.scheduler

    @property
    def spec(self) -> str:
        """As :func:`fmconvert.sampling.baselines.parse_baseline` reads it: ``NAME[:key=value,...]``."""
        options = [f"{k}={json.dumps(v)}" for k, v in self.options]
        return self.scheduler + (":" + ",".join(options) if options else "")

    def record(self) -> dict[str, Any]:
        """The sampler's part of a run's record (:meth:`Run.manifest`)."""
        options = dict(self.options) | ({"along_list": True} if self.along_list else {})
        return {"sampler": self.scheduler, "grid": self.spacing, "shift": None, "baseline": True, "options": options}

    def describe(self) -> str:
        return f"its own {self.scheduler} scheduler"


@dataclass(frozen=True)
class Run:
    """One set of samples: draw ``num_images`` samples of ``model`` with ``sampler`` (an
    :class:`OdeSampler` on the converted field, or a :class:`SchedulerSampler`, diffusers' own on the
    unconverted network; a string names an ODE solver on the uniform grid) in ``steps`` steps, from
    the noise of ``seed`` (:mod:`fmconvert.sampling.generate`'s convention), in ``dtype``,
    conditioned by ``conditioning``; ``shard_size`` samples a batch and a shard. ``shape``: one
    sample's (C, H, W), known once the model is loaded (None before)."""

    model: str
    fingerprint: str
    sampler: OdeSampler | SchedulerSampler
    steps: int
    seed: int = 0
    dtype: str = "float32"
    conditioning: Conditioning = field(default_factory=Conditioning)
    num_images: int = 16
    shard_size: int = 16
    model_class: str | None = None
    shape: tuple[int, ...] | None = None
    fmconvert_version: str = __version__

    def __post_init__(self) -> None:
        if isinstance(self.sampler, str):
            object.__setattr__(self, "sampler", OdeSampler(self.sampler))

    @property
    def baseline(self) -> bool:
        """Whether diffusers' own scheduler draws it (a :class:`SchedulerSampler`)."""
        return isinstance(self.sampler, SchedulerSampler)

    def manifest(self) -> dict[str, Any]:
        """The JSON-ready record of every field, the sampler's flattened into it (sampler, grid,
        shift, baseline, options: the keys samples folders and fingerprints have always had;
        ``conditioning``: its description; what loading tells, ``model_class`` and ``shape``, is left
        out while unknown, so a record made before loading compares with a whole one on what it has)."""
        record: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("model_class", "shape"):
                continue
            if f.name == "sampler":
                sampler = value.record()
                record["sampler"] = sampler.pop("sampler")
                record["steps"] = self.steps
                record.update(sampler)
                continue
            if f.name == "conditioning":
                value = value.describe()
            elif isinstance(value, tuple):
                value = list(value)
            record[f.name] = value
        return record

    def loaded(self, model_class: str, shape: tuple[int, ...]) -> "Run":
        """The same run with what loading the model tells: its class and one sample's shape."""
        return dataclasses.replace(self, model_class=model_class, shape=tuple(int(n) for n in shape))

    def slug(self) -> str:
        """A name for the run's samples folder: sampler-grid[-shiftK]-steps, and a hash of its options if any."""
        record = self.sampler.record()
        shift = record["shift"]
        name = f"{record['sampler']}-{record['grid']}{'' if shift is None else f'-shift{shift:g}'}-{self.steps}"
        options = tuple(record["options"].items())
        if options:
            name += "-" + hashlib.sha256(json.dumps(options, default=str).encode()).hexdigest()[:8]
        return name

    def describe(self) -> str:
        """In words, for logs."""
        return f"{self.num_images} images of {self.model} with {self.sampler.describe()}, {self.steps} steps"


def check_choices(solvers: list[str], grid: str = "uniform", shift: float | None = None, dtype: str = "float32",
                  baselines: list[str] | tuple[str, ...] = (), rtol: float | None = None, atol: float | None = None) -> None:
    """Refuse what no run could honour, before any file is read: a solver, grid, dtype or baseline
    not in its registry (:data:`~fmconvert.math.solvers.SOLVERS`, :data:`~fmconvert.math.grids.GRIDS`,
    :data:`~fmconvert.integration.configs.SAMPLE_DTYPES`, :func:`~fmconvert.sampling.baselines.parse_baseline`),
    a ``shift`` on a grid that takes none, an ``rtol``/``atol`` that none of ``solvers`` takes; a
    ``grid`` that names a tuned sampler file (:func:`is_tuned_file`) must exist, and it or ``"tuned"``
    (a converted folder's stored file, :func:`tuned_file_of`) takes no shift.
    UsageError naming the parameter and its value."""
    from fmconvert.integration.configs import SAMPLE_DTYPES
    from fmconvert.math.grids import GRIDS, check_shift
    from fmconvert.math.solvers import SOLVERS
    from fmconvert.sampling.baselines import parse_baseline

    for name in solvers:
        check_choice("solver", name, SOLVERS)
    if is_tuned_file(grid) or grid == TUNED:
        if grid != TUNED and not Path(grid).is_file():
            raise UsageError(f"grid={grid!r}: no such tuned sampler file (fmconvert tune writes one)")
        if shift is not None:
            raise UsageError(f"shift={shift}: a tuned grid takes no shift (its times are what was tuned)")
    else:
        check_choice("grid", grid, GRIDS)
        try:
            check_shift(grid, shift)
        except ValueError as error:
            raise UsageError(f"shift={shift}: {error}") from None
    check_choice("dtype", dtype, SAMPLE_DTYPES)
    for spec in baselines:
        parse_baseline(spec)  # (an unknown name or a malformed option: refused here)
    for option, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not any(option in dict(SOLVERS[name].options) for name in solvers):
            takers = ", ".join(n for n, s in SOLVERS.items() if option in dict(s.options))
            raise UsageError(f"{option}={value} is an option of {takers}; {', '.join(solvers)} does not take it")


def make_run(source: Source, solvers: list[str], *, grid: str = "uniform", dtype: str = "float32",
             shift: float | None = None, baselines: list[str] | tuple[str, ...] = (), rtol: float | None = None,
             atol: float | None = None, **fields: Any) -> Run:
    """The run of ``solvers[0]`` on ``source`` (an inspected source: its fingerprint is read from
    its files, nothing is loaded), after :func:`check_choices` and the family's check of the
    ``conditioning`` (:meth:`~fmconvert.integration.families.Family.check`, from configs); a sweep's
    other runs follow by :func:`sweep_runs`. ``fields``: the other :class:`Run` fields (steps, seed,
    num_images, ...). Solver ``auto`` stays ``auto`` here: :func:`resolved` replaces it, run by run."""
    check_choices(solvers, grid, shift, dtype, baselines, rtol, atol)
    return _checked_run(source, solvers[0], grid, dtype, shift, rtol, atol, fields)


def plan_run(reference: str, solvers: list[str], *, revision: str | None = None, allow_pickle: bool = False,
             trust_remote_code: bool = False, grid: str = "uniform", dtype: str = "float32", shift: float | None = None,
             baselines: list[str] | tuple[str, ...] = (), rtol: float | None = None, atol: float | None = None,
             **fields: Any) -> tuple[Run, Source]:
    """A model reference resolved once, and its first run: what no run could honour is refused
    before any file is read (:func:`check_choices`), then the source is inspected once (configs and
    the ends of its files, :func:`~fmconvert.integration.source.inspect_source`), then the run is made
    as :func:`make_run` makes it. Returns (run, source): load the source, not the reference again."""
    from fmconvert.integration.source import inspect_source

    check_choices(solvers, grid, shift, dtype, baselines, rtol, atol)
    source = inspect_source(reference, revision, allow_pickle, trust_remote_code)
    return _checked_run(source, solvers[0], grid, dtype, shift, rtol, atol, fields), source


def _checked_run(source: Source, solver: str, grid: str, dtype: str, shift: float | None, rtol: float | None,
                 atol: float | None, fields: dict[str, Any]) -> Run:
    source.family.check(fields.get("conditioning") or Conditioning(), source, fields.get("num_images"))
    given = {k: v for k, v in {"rtol": rtol, "atol": atol}.items() if v is not None}
    fingerprint = model_fingerprint(source)
    tuned_file = tuned_file_of(grid, source)
    if tuned_file is not None:
        sampler = tuned_sampler(tuned_file, fingerprint, solver, fields.get("steps", 50), given)
    else:
        sampler = OdeSampler(solver, grid, shift, solver_options(solver, **given))
    return Run(model=source.reference, fingerprint=fingerprint, sampler=sampler, dtype=dtype, **fields)


def is_tuned_file(grid: str) -> bool:
    """Whether ``grid`` names a tuned sampler file (a path ending in .json) rather than a grid of
    :data:`~fmconvert.math.grids.GRIDS`."""
    return grid.lower().endswith(".json")


def tuned_file_of(grid: str, source: Source) -> str | None:
    """The tuned sampler file ``grid`` names for ``source``: a .json path (:func:`is_tuned_file`), or
    ``"tuned"``, the file ``fmconvert tune --into`` stored in a converted folder (UsageError where
    the model holds none); None for a grid of :data:`~fmconvert.math.grids.GRIDS`."""
    from fmconvert.integration.folder import TUNED_SAMPLER

    if is_tuned_file(grid):
        return grid
    if grid != TUNED:
        return None
    stored = Path(source.folder) / TUNED_SAMPLER
    if not stored.is_file():
        raise UsageError(f"grid={TUNED!r} reads the tuned sampler file a converted folder holds ({TUNED_SAMPLER}, "
                         f"stored by fmconvert tune with into=FOLDER); {source.reference} has none")
    return str(stored)


def tuned_sampler(path: str, fingerprint: str, solver: str, steps: int, given: dict[str, Any] | None = None) -> OdeSampler:
    """The sampler of the tuned sampler file at ``path`` for ``steps`` steps: the grid
    :meth:`~fmconvert.sampling.tuned.TunedFile.best` takes for ``solver`` (``auto``: for any solver of
    one evaluation a step, ``steps`` NFE, whose solver it then is). UsageError, one line: a file tuned
    for other weights than ``fingerprint`` names, or without such a grid."""
    from fmconvert.sampling.tuned import load_tuned

    entry = load_tuned(path, fingerprint).best(steps, None if solver == "auto" else solver)
    return OdeSampler(entry.solver, TUNED, None, solver_options(entry.solver, **(given or {})), times=entry.s,
                      weights=entry.weights)


def solver_options(solver: str, **given: Any) -> tuple[tuple[str, Any], ...]:
    """The options ``solver`` takes (:attr:`fmconvert.math.solvers.Solver.options`), from ``given``
    where given, else their defaults; options it does not take are not recorded."""
    from fmconvert.math.solvers import SOLVERS

    return tuple((name, given.get(name, default) if given.get(name) is not None else default)
                 for name, default in SOLVERS[solver].options)


def sweep_runs(base: Run, solvers: list[str], steps_list: list[int], baselines: list[str] | tuple[str, ...] = (),
               grid_file: str | None = None, **given_options: Any) -> list[Run]:
    """The runs of an NFE sweep: each baseline (a spec of :func:`fmconvert.sampling.baselines.parse_baseline`,
    its options recorded, on its own timesteps: no grid shift) at every step count first, then
    every solver at every step count; everything else as in ``base``. ``grid_file``: the tuned
    sampler file ``base``'s grid came from, whose grid each solver and step count then takes
    (:func:`tuned_sampler`)."""
    from fmconvert.sampling.baselines import parse_baseline

    runs = []
    for spec in baselines:
        baseline, options = parse_baseline(spec)
        scheduler = SchedulerSampler(baseline.name, options, baseline.grid)
        runs += [dataclasses.replace(base, sampler=scheduler, steps=steps) for steps in steps_list]
    if grid_file is not None:
        given = {k: v for k, v in given_options.items() if v is not None}
        return runs + [dataclasses.replace(base, sampler=tuned_sampler(grid_file, base.fingerprint, solver, steps, given),
                                           steps=steps)
                       for solver in solvers for steps in steps_list]
    grid, shift = ((base.sampler.grid, base.sampler.shift) if isinstance(base.sampler, OdeSampler) else ("uniform", None))
    runs += [dataclasses.replace(base, sampler=OdeSampler(solver, grid, shift, solver_options(solver, **given_options)),
                                 steps=steps)
             for solver in solvers for steps in steps_list]
    return runs


def resolved(run: Run, source_shifts: bool) -> Run:
    """``run`` as it runs: solver ``auto`` replaced by the solver and grid shift it picks for
    ``run.steps`` (:func:`fmconvert.math.solvers.resolve_auto`; ``source_shifts``: whether the source's
    scheduler shifts its times, :attr:`fmconvert.integration.source.Source.shifts_times`), so that its
    records (manifest, samples folder, JSON summary) name what ran. Any other run is returned as it is."""
    sampler = run.sampler
    if not isinstance(sampler, OdeSampler) or sampler.solver != "auto":
        return run
    from fmconvert.math.solvers import resolve_auto

    solver, shift = resolve_auto(run.steps, sampler.grid, sampler.shift, source_shifts)
    return dataclasses.replace(run, sampler=OdeSampler(solver, sampler.grid, shift, solver_options(solver)))


def run_fingerprint(run: Run) -> str:
    """``sha256:…`` of ``run``'s manifest without what loading tells (``model_class`` and
    ``shape``, which the model determines): the identity of its samples, known before the model
    is loaded (a checkpoint trained on them names them by it: ``fmconvert reflow``)."""
    record = dataclasses.replace(run, model_class=None, shape=None).manifest()
    return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:20]
