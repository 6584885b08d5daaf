"""Reflow (``fmconvert reflow``): straighten a velocity model's trajectories by training it on
its own couplings (Liu, Gong, Liu 2022, "Flow Straight and Fast: Learning to Generate and
Transfer Data with Rectified Flow": k-rectification, and distillation for one step).

On diffusers' rectified path (s = 1 is noise, s = 0 is data; u = dx/ds, so u = ε − x0 on a
straight path):

1. Couplings: N pairs (ε_i, x0_i), x0_i the model's ODE solved with an accurate solver from the
   noise ε_i: a :class:`~fmconvert.sampling.runs.Run` like any set of samples, drawn by
   :func:`fmconvert.sampling.generate.generate_sharded` into a :class:`~fmconvert.sampling.shards.ShardStore` whose
   manifest is the run's (``OUT.partial/couplings`` unless ``couplings_dir``), so an interrupted
   reflow keeps its complete shards and a rerun draws only the missing ones. ε_i is not stored:
   it is image i of the run's noise (:class:`fmconvert.sampling.noise.NoiseStream`, the documented
   ``torch.randn`` stream of the seed), the trajectory starting from ε_i·√((1 − s_0)² + s_0²)
   at the grid's first time s_0 (ε_i itself on the uniform grid, s_0 = 1).
2. Training (:func:`fmconvert.training.loop.train`, its one loop, paired): on the straight path of each
   pair, x_s = (1 − s)·x0 + s·ε, L = mean |u_θ(x_s, T·s) − (ε − x0)|², s drawn on the source's
   trained range; with ``distill``, s = 1 only (x_1 = ε): one-step distillation, x0 ≈ ε − u(ε, 1)
   (:mod:`fmconvert.training.objective`). The settings name the couplings by
   :func:`fmconvert.sampling.runs.run_fingerprint`, so a checkpoint resumes only on the same couplings.
3. Output: a converted folder (:func:`fmconvert.integration.folder.write_trained`) that ``fmconvert
   sample`` / ``fid`` and stock diffusers load, with ``training.json``, ``loss.png`` and
   ``couplings.json`` (the couplings' run manifest and fingerprint: they can be drawn again).

Reflowing the output again is 2-rectification; ``distill`` on a reflowed model is the paper's
distillation of a k-rectified flow.

An epsilon network is best reflowed into ``prediction_type="v_prediction"``
(:mod:`fmconvert.training.objective`, parametrisation): one step from the noise returns x̂0 of the noisiest
trained time, which epsilon computes as (x − σ·ε̂)/α, its ε̂ error × 1/α_T (digits-eps: 157), and
v_prediction as α·x − σ·v̂. The field then starts away from the source's (docs/benchmarks/REFLOW.md measures what
it buys); left out, the network keeps its parametrisation and a note says so.

Lee, Lin, Fanti (2024, "Improving the Training of Rectified Flows") train reflow with U-shaped
times and the pseudo-Huber loss (``time_sampling="u_shaped"``, ``loss_type="pseudo_huber"``,
:mod:`fmconvert.training.objective`), which docs/benchmarks/REFLOW.md uses. A distilled one-step map fits its couplings far
better than held-out noise (docs/benchmarks/REFLOW.md measures both), so distillation wants many couplings; a
reflowed model's are cheap (a few steps of a straight field).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fmconvert.errors import UsageError
from fmconvert.integration.source import COUPLINGS_RECORD, Source

if TYPE_CHECKING:  # (torch is imported where it is used)
    import torch

    from fmconvert.sampling.runs import Run
    from fmconvert.training.data import TrainingData

COUPLINGS = "couplings"
#: the record beside a reflowed model: the couplings' run manifest and fingerprint


def _quiet(message: str) -> None:
    pass


def load_couplings(folder: Path, run: Run) -> TrainingData:
    """The couplings of ``run`` (loaded: its ``shape`` known) in ``folder``: samples (N, C, H, W)
    float32 from its shards in index order, each with its noise ε (N, C, H, W) regenerated from
    the run's seed (:class:`~fmconvert.sampling.noise.NoiseStream`)."""
    import torch

    from fmconvert.sampling.noise import NoiseStream, batches_of
    from fmconvert.sampling.shards import ShardStore
    from fmconvert.training.data import TrainingData

    assert run.shape is not None
    store = ShardStore(folder, run.manifest())
    samples = torch.cat([store.load(j)[0] for j in range(len(batches_of(run.num_images, run.shard_size)))])
    noise = NoiseStream(run.num_images, run.shape, run.seed).take(0, run.num_images)
    return TrainingData(samples, COUPLINGS, noise)


def draw_couplings(couplings: Run, folder: Path, device: str = "cpu", progress: bool = False,
                   log: Callable[[str], None] = _quiet,
                   check: Callable[[torch.nn.Module], None] | None = None, source: Source | None = None,
                   denoiser: torch.nn.Module | None = None) -> tuple[Run, int]:
    """Solve the ``couplings`` run into shards in ``folder`` (:func:`fmconvert.sampling.generate.generate_sharded`;
    complete shards of the same run are reused, another run's folder is refused). Returns the
    run, loaded (its shape known), and the number of shards reused. UsageError for a model
    that needs conditioning; ``check(network)``: called on the loaded network before anything is
    drawn (reflow checks the LoRA targets there). ``source``: ``couplings.model`` already inspected;
    ``denoiser``: its denoiser already loaded in ``couplings.dtype`` (else it is loaded here)."""
    import torch

    from fmconvert.sampling.generate import generate_sharded, iter_run
    from fmconvert.sampling.model import load_velocity_model, sample_shape
    from fmconvert.sampling.shards import ShardStore

    vm = load_velocity_model(source or couplings.model, dtype=getattr(torch, couplings.dtype), device=device,
                             denoiser=denoiser)
    family = vm.source.family
    if family.accepts:
        raise UsageError(f"reflow straightens unconditional models; {vm.source.pipeline_class} ({family.title}) needs "
                         "its conditioning, which reflow does not take yet")
    if check is not None:
        check(vm.velocity.source_network)
    run = couplings.loaded(vm.source.model_class, sample_shape(vm))
    store = ShardStore(folder, run.manifest())
    log(f"couplings: {run.describe()} into {folder}")
    _, reused = generate_sharded(vm, lambda ranges: iter_run(vm, run, device, ranges, progress=progress),
                                 run.num_images, run.shard_size, store, device)
    return run, reused


def reflow(couplings: Run, out: Path, *, distill: bool = False, couplings_dir: Path | None = None,
           device: str = "auto", checkpoint_every: int = 500, force: bool = False, progress: bool = False,
           log: Callable[[str], None] = _quiet, on_step: Callable[[int], None] | None = None,
           source: Source | None = None, **training: Any) -> dict[str, Any]:
    """Reflow ``couplings.model`` (see the module docstring): draw the ``couplings`` run (its
    model, solver, grid, steps, seed and ``num_images`` pairs) into ``couplings_dir`` (default
    ``OUT.partial/couplings``, removed with the checkpoint once ``out`` is written), then train on
    the pairs with ``training`` (fields of :class:`~fmconvert.training.settings.TrainSettings`: train_steps,
    batch_size, lr, ..., seed) and write ``out``.

    Before anything is drawn or trained, in one line each: an existing ``out`` without ``force``,
    a bad training setting, a device or precision train cannot use (UsageError); couplings of
    another run in the folder, a checkpoint of other settings in ``OUT.partial``
    (FmconvertError); nothing is written then. Couplings and checkpoint of the same settings are
    resumed. ``source``: ``couplings.model`` already inspected (else it is inspected here, once).
    Returns train's summary with the couplings' record under "couplings"."""
    from fmconvert.integration.source import inspect_source, load_denoiser
    from fmconvert.sampling import distributed
    from fmconvert.sampling.runs import run_fingerprint
    from fmconvert.sampling.shards import ShardStore
    from fmconvert.training.checkpoint import CHECKPOINT, check_checkpoint, work_folder
    from fmconvert.training.loop import check_device, train
    from fmconvert.training.lora import check_lora_targets
    from fmconvert.training.objective import check_prediction_type, network_prediction
    from fmconvert.training.settings import TrainSettings

    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"output '{out}' already exists; pass force=True to replace it")
    if couplings.num_images < 1:
        raise UsageError(f"couplings.num_images={couplings.num_images}: the number of couplings must be a positive "
                         "integer")
    if checkpoint_every < 1:
        raise UsageError(f"checkpoint_every={checkpoint_every}: must be a positive integer")
    if couplings.baseline:
        raise UsageError("couplings are solved with fmconvert's solvers from the documented noise, not with a baseline "
                         "scheduler")
    folder = Path(couplings_dir) if couplings_dir is not None else work_folder(out) / COUPLINGS
    fingerprint = run_fingerprint(couplings)
    settings = TrainSettings(model=couplings.model, fingerprint=couplings.fingerprint,
                             data=f"couplings: {couplings.describe()}", data_fingerprint=fingerprint,
                             couplings=fingerprint, distill=distill, **training)
    ShardStore.check(folder, couplings.manifest())
    source = source or inspect_source(couplings.model)
    check_prediction_type(source, settings.prediction_type)
    if settings.prediction_type is None and network_prediction(source) == "epsilon":
        log("note: the network predicts epsilon, whose x0 estimate at the noise end divides by alpha_T; "
            "prediction_type='v_prediction' trains it into v, which few steps need (docs/benchmarks/REFLOW.md)")
    check_checkpoint(work_folder(out) / CHECKPOINT, settings)
    check_device(settings, device)
    # the weights are read once: train loads them in their stored dtype; the couplings share them where
    # they are drawn in that dtype (the default, float32, for float32 weights), else load their own copy
    import torch

    denoiser = load_denoiser(source)
    shared = denoiser if denoiser.dtype == getattr(torch, couplings.dtype) else None
    run, reused = draw_couplings(couplings, folder, distributed.init(device), progress, log,
                                 lambda network: check_lora_targets(network, settings), source, shared)
    data = load_couplings(folder, run)
    record = {"run": run.manifest(), "fingerprint": fingerprint, "folder": str(folder),
              "kept": couplings_dir is not None, "shards_reused": reused}
    log(f"couplings ready ({reused} shards reused); training on them"
        + (" at the noise end only (distillation)" if distill else ""))

    def write_record(tmp: Path) -> None:
        (tmp / COUPLINGS_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")

    summary = train(settings, out, device=device, checkpoint_every=checkpoint_every, force=force, progress=progress,
                    log=log, on_step=on_step, data=data, add_files=write_record, source=source, denoiser=denoiser)
    return {**summary, "couplings": record}
