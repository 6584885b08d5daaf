"""Drawing samples: a loaded model (:mod:`fmconvert.sampling.model`) integrated by the ODE solvers
of :mod:`fmconvert.math.solvers` on its velocity field (:func:`iter_generate`), or driven by a
diffusers scheduler on the unconverted network (:func:`iter_baseline`), from the noise of
:mod:`fmconvert.sampling.noise`; a :class:`~fmconvert.sampling.runs.Run` as batches
(:func:`iter_run`), as resumable shards gathered over processes (:func:`generate_sharded`), and
as one call from an inspected source to its samples (:func:`draw`, what ``fmconvert sample`` does).

Each route checks the request once: :func:`iter_generate` and :func:`iter_baseline` check the
conditioning against the model's family; :func:`iter_run` and :func:`draw` take a run that
:func:`fmconvert.sampling.runs.make_run` made, which checked it (from configs, before any weight
was read), and do not check it again.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, cast

import torch

from fmconvert.errors import FmconvertError
from fmconvert.integration.conditioning import Conditioning, guide, network_kwargs
from fmconvert.integration.families import packs_latents
from fmconvert.integration.network import network_call
from fmconvert.integration.source import Source
from fmconvert.math.conversion import invert
from fmconvert.math.paths import RectifiedFlow
from fmconvert.math.solvers import SOLVERS, resolve_auto, solve
from fmconvert.sampling.model import VelocityModel, load_velocity_model, sample_shape, sampling_grid, to_images
from fmconvert.sampling.noise import NoiseStream, batches_of

if TYPE_CHECKING:
    from fmconvert.sampling.runs import Run

Batches = Iterator[tuple[torch.Tensor, torch.Tensor, int]]


@dataclass
class SampleResult:
    """``samples``: final states in the model's data space (float32, CPU); ``images``: in [0, 1];
    ``nfe``: field evaluations per trajectory, one entry per batch (they differ only for dopri5)."""

    samples: torch.Tensor
    images: torch.Tensor
    nfe: list[int]
    seconds: float


def iter_generate(vm: VelocityModel, num_images: int = 16, batch_size: int = 16, seed: int = 0, solver: str = "euler",
                  grid: str = "uniform", steps: int = 50, device: str = "cpu", conditioning: Conditioning | None = None,
                  progress: bool = False, solver_options: dict | None = None,
                  ranges: list[tuple[int, int]] | None = None,
                  shift: float | None = None, times: Sequence[float] | None = None) -> Batches:
    """Yield (samples, images, nfe) batch by batch (by default all of [0, num_images) in
    batches of ``batch_size``; or the given global index ranges): one batch is held.
    ``shift``: the grid's time shift instead of the scheduler's (:func:`sampling_grid`); with
    solver ``auto`` on the uniform grid of a source without a shift of its own, the one
    :func:`fmconvert.math.solvers.auto_choice` names. ``times``: the ``steps + 1`` times s
    themselves (a tuned grid, :mod:`fmconvert.sampling.tuned`; ``grid`` and ``shift`` then unused).
    ``conditioning``: what the family takes (prompt, class labels, image embeddings,
    guidance); refused in one line, when called, where the family cannot honour it."""
    conditioning = conditioning or Conditioning()
    vm.source.family.check(conditioning, vm.source, num_images)
    return _solved_batches(vm, num_images, batch_size, seed, solver, grid, steps, device, conditioning, progress,
                           solver_options, ranges, shift, times)


def _solved_batches(vm: VelocityModel, num_images: int, batch_size: int, seed: int, solver: str, grid: str, steps: int,
                    device: str, conditioning: Conditioning, progress: bool, solver_options: dict | None,
                    ranges: list[tuple[int, int]] | None, shift: float | None,
                    times: Sequence[float] | None = None, weights: Sequence[float] | None = None) -> Batches:
    """:func:`iter_generate`'s batches, the conditioning taken as checked."""
    if solver == "auto":
        solver, shift = resolve_auto(steps, grid, shift, vm.source.shifts_times)
    if times is not None:
        if len(times) != steps + 1:
            raise ValueError(f"times: {len(times)} given for {steps} steps (steps + 1 wanted)")
        s_grid = torch.tensor(list(times), dtype=torch.float64)
    else:
        s_grid = sampling_grid(vm, grid, steps, shift)
    noise = NoiseStream(num_images, sample_shape(vm), seed)
    ranges = batches_of(num_images, batch_size) if ranges is None else ranges
    start_scale = float(RectifiedFlow().point(s_grid[0]).norm)  # ε at the first grid time
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ranges) * steps, file=sys.stderr, desc=f"{solver} {steps} steps", unit="step", leave=False)
    try:
        for first, stop in ranges:
            eps = noise.take(first, stop).to(device)
            field = velocity_field(vm, conditioning, first, eps.shape[0], device)
            # inference mode: less bookkeeping per operation than no_grad (the network's too);
            # the result is cloned out of it below, so callers get ordinary tensors
            with torch.inference_mode():
                result = solve(field, eps * start_scale, s_grid, solver, callback=(lambda i: bar.update(1)) if bar else None,
                               weights=weights, **(solver_options or {}))
            if result.first_bad_nfe is not None:
                where = SOLVERS[solver].step_of(result.first_bad_nfe, steps)
                raise FmconvertError(
                    f"the model produced NaN/Inf at {where} (images {first}..{first + eps.shape[0] - 1}); "
                    "try dtype='float32', or check the model's weights"
                )
            x = result.x.float().clone()
            yield x, to_images(vm, x), result.nfe
    finally:
        if bar is not None:
            bar.close()


def _collect(batches) -> SampleResult:
    started = time.perf_counter()
    samples, images, nfe = [], [], []
    for x, image, count in batches:
        samples.append(x.cpu())
        images.append(image.cpu())
        nfe.append(count)
    return SampleResult(torch.cat(samples), torch.cat(images), nfe, time.perf_counter() - started)


def generate(vm: VelocityModel, num_images: int = 16, batch_size: int = 16, seed: int = 0, solver: str = "euler",
             grid: str = "uniform", steps: int = 50, device: str = "cpu", conditioning: Conditioning | None = None,
             progress: bool = False, solver_options: dict | None = None, shift: float | None = None) -> SampleResult:
    """Draw ``num_images`` samples, ``batch_size`` at a time, all kept (see iter_generate)."""
    batches = iter_generate(vm, num_images, batch_size, seed, solver, grid, steps, device, conditioning,
                            progress, solver_options, shift=shift)
    return _collect(batches)


def iter_baseline(vm: VelocityModel, num_images: int = 16, batch_size: int = 16, seed: int = 0, steps: int = 50,
                  device: str = "cpu", baseline: str = "ddim", ranges: list[tuple[int, int]] | None = None,
                  conditioning: Conditioning | None = None,
                  along_list: bool = False) -> Batches:
    """A diffusers scheduler (``baseline``: a spec of :func:`fmconvert.sampling.baselines.parse_baseline`)
    driving the unconverted source network on the same noise and conditioning (guidance on the
    source's prediction, as its pipeline applies it), batch by batch (or over the given global
    index ranges), as a pipeline drives it: noise × ``init_noise_sigma``, ``scale_model_input``,
    ``step``. Yields (samples, images, network evaluations per trajectory, counted). A stochastic
    scheduler draws its step noise from a generator seeded by (seed, first image index).

    ``along_list`` (ddim): DDIM stepping from each of the scheduler's listed timesteps to the next
    listed one (the last to α = 1), x' = α'·x̂0 + σ'·ε̂ in float64 on the source's ᾱ, instead of
    diffusers' ``DDIMScheduler.step``, which steps to t − T//N: for N not dividing T that is
    not the next timestep it evaluates (NOTES §8), so it is not one ODE solver on one grid."""
    from fmconvert.sampling.baselines import parse_baseline

    if along_list and parse_baseline(baseline)[0].name != "ddim":
        raise ValueError("along_list is DDIM's: use baseline 'ddim'")
    conditioning = conditioning or Conditioning()
    vm.source.family.check(conditioning, vm.source, num_images)
    return _scheduler_batches(vm, num_images, batch_size, seed, steps, device, baseline, ranges, conditioning, along_list)


def _scheduler_batches(vm: VelocityModel, num_images: int, batch_size: int, seed: int, steps: int, device: str,
                       baseline: str, ranges: list[tuple[int, int]] | None, conditioning: Conditioning,
                       along_list: bool) -> Batches:
    """:func:`iter_baseline`'s batches, the conditioning taken as checked."""
    import inspect

    from fmconvert.sampling.baselines import build_scheduler, stochastic

    family = vm.source.family
    scheduler = build_scheduler(baseline, vm.source)
    if steps > scheduler.config.num_train_timesteps:
        raise ValueError(f"steps={steps} exceeds the source's {scheduler.config.num_train_timesteps} trained timesteps")
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters and stochastic(scheduler)
    model = vm.velocity.model
    call = network_call(model, packs_latents(type(model).__name__))
    w, phi = conditioning.guidance_scale, conditioning.guidance_rescale
    noise = NoiseStream(num_images, sample_shape(vm), seed)
    for first, stop in (batches_of(num_images, batch_size) if ranges is None else ranges):
        scheduler.set_timesteps(steps)  # (also resets a multistep scheduler's history)
        # (FlowMatch schedulers have neither: their pipelines start from the noise and hand x_s as it is)
        x = noise.take(first, stop).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
        cond, both = network_kwargs(family, vm.pipeline, conditioning, first, x.shape[0], device, model.config,
                                    (x.shape[2], x.shape[3]), model.dtype)
        extra = {"generator": torch.Generator().manual_seed(seed * 1_000_003 + first)} if takes_generator else {}
        nfe = 0
        with torch.no_grad():
            for t in scheduler.timesteps:
                x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
                if both is None:
                    out = call.split(call(model, x_in.to(model.dtype), t.to(device).expand(x.shape[0]), (), cond))[0]
                else:
                    pair = call.split(call(model, torch.cat([x_in, x_in]).to(model.dtype),
                                           t.to(device).expand(2 * x.shape[0]), (), both))[0]
                    uncond, cond_out = pair.float().chunk(2)
                    out = guide(uncond, cond_out, w, phi)
                nfe += 1
                x = (_ddim_along(vm, scheduler.timesteps, out, x, t) if along_list
                     else scheduler.step(out.float(), t, x, **extra).prev_sample)
        yield x.float(), to_images(vm, x.float()), nfe


def _ddim_along(vm: VelocityModel, timesteps: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
    """One DDIM (η = 0) step from ``t`` to the next of ``timesteps`` (after the last: α = 1),
    float64 on the source's path: x' = α'·x̂0 + σ'·ε̂."""
    from fmconvert.math.predictions import to_x0_eps

    path, listed = vm.grid_source, timesteps.tolist()
    k = listed.index(t.item())
    p = path.point(t.to(torch.float64).reshape(1))
    x0, eps = to_x0_eps(vm.source.prediction_type, out.double(), x.double(), p)
    if k + 1 == len(listed):
        return x0.float()
    q = path.point(timesteps[k + 1].to(torch.float64).reshape(1))
    return (q.alpha * x0 + q.sigma * eps).float()


def iter_run(vm: VelocityModel, run: Run, device: str = "cpu", ranges: list[tuple[int, int]] | None = None,
             progress: bool = False) -> Batches:
    """The batches of ``run`` (:class:`fmconvert.sampling.runs.Run`, as
    :func:`~fmconvert.sampling.runs.make_run` made it: its conditioning checked there, not here):
    a :class:`~fmconvert.sampling.runs.SchedulerSampler` as :func:`iter_baseline` draws, an
    :class:`~fmconvert.sampling.runs.OdeSampler` as :func:`iter_generate` does, over the given
    global index ranges (default: all)."""
    from fmconvert.sampling.runs import SchedulerSampler

    sampler, conditioning = run.sampler, run.conditioning or Conditioning()
    if isinstance(sampler, SchedulerSampler):
        return _scheduler_batches(vm, run.num_images, run.shard_size, run.seed, run.steps, device, sampler.spec, ranges,
                                  conditioning, sampler.along_list)
    return _solved_batches(vm, run.num_images, run.shard_size, run.seed, sampler.solver, sampler.grid, run.steps, device,
                           conditioning, progress, dict(sampler.options), ranges, sampler.shift, sampler.times,
                           sampler.weights)


def generate_run(vm: VelocityModel, run: Run, device: str = "cpu", progress: bool = False) -> SampleResult:
    """All samples of ``run``, kept (:func:`iter_run`)."""
    return _collect(iter_run(vm, run, device, progress=progress))


def velocity_field(vm: VelocityModel, request: Conditioning, first: int, batch: int, device) -> Callable:
    """u(x, s) for images [first, first + batch) (x: (batch, C, H, W), s: (batch,) on the rectified
    path, 1 = noise; float32 out, differentiable in x and s): the family's conditioning, classifier-free
    guidance uncond + w·(cond − uncond) on the velocity (guidance is affine with weights
    summing to one, so it commutes with the conversion), and ``guidance_rescale`` applied to
    the source's own prediction (diffusers' ``rescale_noise_cfg``): the guided and the
    conditional velocity are taken back through the conversion, rescaled, and brought forward."""
    velocity = vm.velocity
    T = cast(RectifiedFlow, velocity.target_path).num_train_timesteps  # (the flow path, by construction)
    channels, height, width = sample_shape(vm)
    cond, both = network_kwargs(vm.source.family, vm.pipeline, request, first, batch, device, velocity.config,
                                (height, width), velocity.network_dtype)
    if both is None:
        return lambda x, s: velocity.evaluate(x, T * s, output_dtype=torch.float32, **cond)[:, :channels]
    w, phi = request.guidance_scale, request.guidance_rescale

    def guided(x, s):
        u_uncond, u_cond = velocity.evaluate(torch.cat([x, x]), torch.cat([T * s, T * s]), output_dtype=torch.float32,
                                             **both)[:, :channels].chunk(2)
        if phi == 0:
            return guide(u_uncond, u_cond, w)
        plan = velocity.conversion(T * s[:1], x.ndim, x.device)
        source = guide(invert(plan, x, u_uncond), invert(plan, x, u_cond), w, phi)
        return torch.addcmul(plan.k_x * x, plan.k_out, source).to(torch.float32)

    return guided


def iter_shards(vm: VelocityModel, make_batches, num_images: int, batch_size: int, store=None,
                device: str = "cpu") -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int, bool]]:
    """This rank's shards of [0, num_images) (shard j = [j·B, (j+1)·B), made by rank j mod K):
    yields (j, samples, images, nfe, reused). Shards ``store`` has are read from it (images
    decoded on ``device``); the others are made by ``make_batches(ranges)`` and saved there."""
    from fmconvert.sampling import distributed

    ranges = batches_of(num_images, batch_size)
    mine = distributed.my_shards(len(ranges))
    stored = [j for j in mine if store is not None and store.has(j)]
    todo = [j for j in mine if j not in stored]
    for j in stored:
        samples, count = store.load(j)
        yield j, samples, to_images(vm, samples.to(device)), count, True
    for j, (samples, images, count) in zip(todo, make_batches([ranges[j] for j in todo])):
        if store is not None:
            store.save(j, samples, count)
        yield j, samples, images, count, False


def generate_sharded(vm: VelocityModel, make_batches, num_images: int, batch_size: int, store=None,
                     device: str = "cpu") -> tuple[SampleResult | None, int]:
    """All samples of [0, num_images) (see :func:`iter_shards`), gathered on rank 0 in index
    order. Returns (result on rank 0 else None, shards reused)."""
    from fmconvert.sampling import distributed

    started = time.perf_counter()
    pieces, reused = [], 0
    for j, samples, images, count, was_stored in iter_shards(vm, make_batches, num_images, batch_size, store, device):
        pieces.append((j, samples.cpu(), images.cpu(), count))
        reused += was_stored
    gathered = sorted((p for part in distributed.gather_objects(pieces) for p in part), key=lambda p: p[0])
    reused = distributed.sum_int(reused)
    if not distributed.is_main():
        return None, reused
    result = SampleResult(torch.cat([p[1] for p in gathered]), torch.cat([p[2] for p in gathered]),
                          [p[3] for p in gathered], time.perf_counter() - started)
    return result, reused


@dataclass
class Drawn:
    """What :func:`draw` made: the loaded model, the run as it ran (``shape`` known), the samples
    (None on ranks other than 0 under torchrun, where rank 0 gathers them) and how many shards of
    ``samples_dir`` were reused."""

    vm: VelocityModel
    run: Run
    result: SampleResult | None
    reused: int


def draw(source: Source, run: Run, *, device: str = "cpu", revision: str | None = None, allow_pickle: bool = False,
         trust_remote_code: bool = False, channels_last: bool = False, compile: bool = False,
         height: int | None = None, width: int | None = None, samples_dir: str | Path | None = None,
         progress: bool = False, log: Callable[[str], None] = lambda message: None) -> Drawn:
    """The samples of ``run`` (made by :func:`fmconvert.sampling.runs.make_run`, so checked) from
    ``source`` (inspected once, :func:`~fmconvert.integration.source.inspect_source`): a
    ``samples_dir`` of other settings refused before the model is loaded, the model loaded once in
    ``run.dtype`` on ``device`` (``height``/``width``: the image size where the family allows
    another), then :func:`generate_sharded` (resumable shards in ``samples_dir``; under torchrun
    every rank draws its share). What ``fmconvert sample`` does between its options and its output."""
    from fmconvert.sampling.shards import ShardStore

    if samples_dir is not None:  # a folder of other settings is refused before the model is loaded
        ShardStore.check(Path(samples_dir), run.manifest())
    vm = load_velocity_model(source, revision, getattr(torch, run.dtype), device, allow_pickle, trust_remote_code,
                             channels_last=channels_last, compile=compile)
    vm.resize(height, width)
    run = run.loaded(vm.source.model_class, sample_shape(vm))
    store = ShardStore(Path(samples_dir), run.manifest()) if samples_dir is not None else None
    log(f"sampling {run.describe()}, on {device}")
    result, reused = generate_sharded(vm, lambda ranges: iter_run(vm, run, device, ranges, progress=progress),
                                      run.num_images, run.shard_size, store, device)
    return Drawn(vm, run, result, reused)
