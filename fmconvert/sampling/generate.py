"""Sampling any model as a velocity field with the ODE solvers of :mod:`fmconvert.math.solvers`.

Every model is brought to one form, a :class:`~fmconvert.integration.adapters.PathAdapter` whose target
is diffusers' rectified path (u(x_s, 1000·s) = ε̂ − x̂0): a converted velocity folder as it
is, a diffusion source through :class:`VelocityAdapter`, a flow source through the identity
adapter, a converted epsilon / v folder through VelocityAdapter around it (an exact round trip).

Noise convention: ``seed=S`` draws
``torch.randn((num_images, C, H, W), generator=torch.Generator("cpu").manual_seed(S))`` once,
so the samples depend neither on the batch size nor on the device. The start is
x_{s_0} = ε·√((1 − s_0)² + s_0²), the noise at the first grid time (ε itself at s_0 = 1, and
ε/(α_T + σ_T) on DDIM's grid, as DDIMScheduler starts from x_T = ε).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

import torch

from fmconvert.errors import FmconvertError
from fmconvert.integration.adapters import DiffusionAdapter, PathAdapter, VelocityAdapter
from fmconvert.integration.conditioning import Conditioning, guide, network_kwargs
from fmconvert.integration.configs import FLOW_SCHEDULERS
from fmconvert.integration.families import packs_latents
from fmconvert.integration.network import network_call
from fmconvert.integration.source import DENOISERS, Source, inspect_source, load_denoiser
from fmconvert.math.conversion import invert
from fmconvert.math.grids import time_grid
from fmconvert.math.paths import GaussianPath, RectifiedFlow
from fmconvert.math.solvers import SOLVERS, resolve_auto, solve

if TYPE_CHECKING:
    from fmconvert.sampling.runs import Run


@dataclass
class VelocityModel:
    """A model ready to sample: the velocity adapter, the path its grids come from, and
    (for latent or text-conditioned pipelines) the rest of the pipeline."""

    velocity: PathAdapter
    grid_source: GaussianPath
    source: Source
    pipeline: Any = None
    info: dict = field(default_factory=dict)
    #: the sample's (h, w); None: the denoiser's sample_size (see :meth:`resize`)
    size: tuple[int, int] | None = None

    def resize(self, height: int | None, width: int | None) -> "VelocityModel":
        """Sample images of height × width pixels (the family's rule; None keeps the default)."""
        self.size = self.source.family.sample_size(self.pipeline, self.velocity.config, height, width)
        return self


def as_velocity(model: torch.nn.Module, source: Source, compute_dtype: str = "float64") -> tuple[PathAdapter, GaussianPath]:
    """Any source denoiser as a PathAdapter onto the rectified path; plus its grid path.
    ``compute_dtype``: the dtype the new adapter applies its conversion in (a round trip
    through a converted diffusion folder stays float64 throughout)."""
    T = getattr(source.path, "num_train_timesteps", 1000)
    target = RectifiedFlow(num_train_timesteps=T)
    if isinstance(model, VelocityAdapter):
        return model, model.source_path
    if isinstance(model, DiffusionAdapter):  # converted back to a diffusion model: round trip, exact
        return PathAdapter._wrap(model, model.target_path, model.target_prediction, target, "flow_prediction", "float64"), model.target_path
    if source.prediction_type == "flow_prediction":
        return PathAdapter._wrap(model, source.path, "flow_prediction", target, "flow_prediction", compute_dtype), source.path
    return VelocityAdapter._wrap(model, source.path, source.prediction_type, target, "flow_prediction", compute_dtype), source.path


def load_velocity_model(reference: str | Source, revision: str | None = None, dtype: torch.dtype | None = None,
                        device: str = "cpu", allow_pickle: bool = False, trust_remote_code: bool = False,
                        need_pipeline: bool = False, channels_last: bool = False, compile: bool = False,
                        compute_dtype: str | None = None) -> VelocityModel:
    """Load and wrap a model for sampling: ``reference`` is a source already inspected
    (:func:`~fmconvert.integration.source.inspect_source`: the command line resolves a
    reference once, and loads what it resolved), or a reference string, inspected here with
    ``revision``, ``allow_pickle`` and ``trust_remote_code`` (``channels_last`` / ``compile``: the GPU
    fast path for the wrapped network; ``compute_dtype``: the dtype a source wrapped here
    applies its conversion in, default below).

    The conversion's coefficients are planned in float64; a source wrapped here applies them
    (k_x·x + k_out·output) in float32 unless the network is float64: against a float64 DDIM
    that is as exact as a float64 combination, since the network's own rounding dominates
    (BENCHMARKS.md). A converted folder keeps the compute_dtype it was written with."""
    source = (reference if isinstance(reference, Source)
              else inspect_source(reference, revision, allow_pickle, trust_remote_code))
    model = load_denoiser(source, dtype, allow_pickle, trust_remote_code)
    if compute_dtype is None:
        compute_dtype = "float64" if model.dtype == torch.float64 else "float32"
    velocity, grid_source = as_velocity(model, source, compute_dtype)
    pipeline = None
    if need_pipeline or source.family.needs_pipeline:
        pipeline = _load_pipeline(source, model, dtype, allow_pickle, trust_remote_code)
    velocity.to(device)
    network = velocity.source_network
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if compile:
        compiled = torch.compile(network)
        if isinstance(velocity.model, PathAdapter):
            velocity.model.model = compiled
        else:
            velocity.model = compiled
    if pipeline is not None:
        for name, component in pipeline.components.items():
            if isinstance(component, torch.nn.Module) and name not in DENOISERS:
                component.to(device)
    return VelocityModel(velocity.eval(), grid_source, source, pipeline, source.describe())


def sampling_grid(vm: VelocityModel, kind: str, steps: int, shift: float | None = None) -> torch.Tensor:
    """``steps + 1`` times s from 1 (noise) to 0 for ``vm``: :func:`fmconvert.math.grids.time_grid`
    with the options of the scheduler a grid copies: the source's ``steps_offset`` (leading), and
    for a source that ships FlowMatchEulerDiscreteScheduler, ``flowmatch`` is that scheduler's
    own sigmas (shift, shift_terminal, karras / exponential / beta sigmas: computed by diffusers).
    ValueError where the source's scheduler shifts dynamically (mu from the image's sequence
    length, by a pipeline rule fmconvert does not have for this model) and the grid would use it.

    With ``use_dynamic_shifting`` the shift is that of the family's pipeline: mu from the
    sample's sequence length (diffusers' ``calculate_shift``); ``flowmatch`` hands the scheduler
    the sigmas that pipeline does (FLUX: linspace(1, 1/N, N)), ``uniform`` shifts by e^mu.

    ``shift``: a time shift to use instead of the scheduler's (static or dynamic) one, for the
    grids that take one (:func:`fmconvert.math.grids.check_shift`: ValueError for the others)."""
    from fmconvert.math.grids import GRIDS, check_shift

    check_shift(kind, shift)
    config, family = vm.source.scheduler, vm.source.family
    flow_source = config.get("_class_name") in FLOW_SCHEDULERS
    own = shift is None
    k: float = vm.source.shift if shift is None else shift
    mu = None
    if own and config.get("use_dynamic_shifting") and GRIDS[kind].shifts:
        length = family.image_seq_len(vm.velocity.config, sample_shape(vm)[1:]) if flow_source else None
        if length is None or config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"{config.get('_class_name')} of {vm.source.reference} shifts its times dynamically "
                             "(use_dynamic_shifting: mu from the image's sequence length, a rule of its pipeline that "
                             f"fmconvert does not have for {vm.source.pipeline_class or 'a bare model'}); use "
                             "grid='karras' or grid='logsnr'")
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(length, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        k = math.exp(mu)
    if kind == "flowmatch" and flow_source:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            config, **({} if own else {"shift": k, "use_dynamic_shifting": False}))
        sigmas = family.flow_sigmas(steps)
        scheduler.set_timesteps(None if sigmas is not None else steps, sigmas=sigmas, mu=mu)
        return scheduler.sigmas.to(torch.float64)
    return time_grid(kind, steps, vm.grid_source, shift=k, steps_offset=int(config.get("steps_offset") or 0))


def _load_pipeline(source: Source, model, dtype, allow_pickle, trust_remote_code):
    """The source pipeline's other components, with the already-loaded denoiser passed in."""
    if source.model_index is None:
        return None
    from diffusers import DiffusionPipeline

    from fmconvert.integration.folder import load

    if source.converted:
        return load(source.folder, dtype=dtype)
    try:
        return DiffusionPipeline.from_pretrained(
            source.folder, **{source.denoiser: model}, dtype=dtype,
            use_safetensors=None if allow_pickle else True, trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise FmconvertError(f"cannot load the pipeline '{source.reference}': {first}") from None


def initial_noise(num_images: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The documented noise convention (CPU generator, drawn once for all images)."""
    return torch.randn((num_images, *shape), generator=torch.Generator("cpu").manual_seed(seed))


class NoiseStream:
    """The same noise as :func:`initial_noise`, by global image index, without drawing it all
    at once: torch's CPU normal sampler fills blocks of 16 values, so drawing the stream in
    chunks whose sizes are multiples of 16 values gives the same numbers (the last chunk,
    drawn whole, reproduces the sampler's treatment of the tail). Any process can take any
    index range; reading forward is cheap, going back restarts the stream."""

    def __init__(self, num_images: int, shape: tuple[int, ...], seed: int, chunk_values: int = 1 << 16):
        import math

        self.num_images, self.shape, self.seed = num_images, tuple(shape), seed
        per_image = math.prod(self.shape)
        step = 16 // math.gcd(per_image, 16)  # images per block of whole 16-value groups
        chunk = step * max(1, chunk_values // (step * per_image))
        bounds = list(range(0, num_images, chunk)) + [num_images]
        if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * per_image < 16:
            del bounds[-2]  # the sampler recomputes the last 16 values: keep them in one chunk
        self.bounds = bounds
        self._restart()

    def _restart(self):
        self.generator = torch.Generator("cpu").manual_seed(self.seed)
        self.chunk_index, self.chunk = -1, None

    def _advance(self):
        self.chunk_index += 1
        lo, hi = self.bounds[self.chunk_index], self.bounds[self.chunk_index + 1]
        self.chunk = torch.randn((hi - lo, *self.shape), generator=self.generator)

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Noise of images [start, stop)."""
        if not 0 <= start <= stop <= self.num_images:
            raise ValueError(f"indices [{start}, {stop}) outside [0, {self.num_images})")
        if self.chunk_index >= 0 and start < self.bounds[self.chunk_index]:
            self._restart()
        parts = []
        while start < stop:
            while self.chunk_index < 0 or start >= self.bounds[self.chunk_index + 1]:
                self._advance()
            lo, hi = self.bounds[self.chunk_index], self.bounds[self.chunk_index + 1]
            end = min(stop, hi)
            parts.append(self.chunk[start - lo:end - lo])
            start = end
        return torch.cat(parts) if parts else torch.zeros((0, *self.shape))


def batches_of(num_images: int, batch_size: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) index ranges; shard j is [j·B, (j+1)·B)."""
    return [(lo, min(num_images, lo + batch_size)) for lo in range(0, num_images, batch_size)]


def sample_shape(vm: VelocityModel) -> tuple[int, int, int]:
    """(C, h, w) of one sample: the denoiser's channels at :attr:`VelocityModel.size`."""
    channels = vm.source.family.latent_channels(vm.velocity.config)
    if channels is None:
        raise FmconvertError(f"cannot tell the sample shape of {vm.source.model_class}: its config has no in_channels")
    height, width = vm.size or vm.source.family.sample_size(vm.pipeline, vm.velocity.config, None, None)
    return (channels, height, width)


def image_shape(vm: VelocityModel) -> tuple[int, ...]:
    """(C, H, W) of one decoded image (the decoder run once on zeros; pixels need none)."""
    shape = sample_shape(vm)
    if vm.source.family.decoder is None:
        return shape
    return tuple(to_images(vm, torch.zeros((1, *shape), device=vm.velocity.device)).shape[1:])


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
                  shift: float | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Yield (samples, images, nfe) batch by batch (by default all of [0, num_images) in
    batches of ``batch_size``; or the given global index ranges): one batch is held.
    ``shift``: the grid's time shift instead of the scheduler's (:func:`sampling_grid`); with
    solver ``auto`` on the uniform grid of a source without a shift of its own, the one
    :func:`fmconvert.math.solvers.auto_choice` names.
    ``conditioning``: what the family takes (prompt, class labels, image embeddings,
    guidance); refused in one line where the family cannot honour it."""
    conditioning = conditioning or Conditioning()
    vm.source.family.check(conditioning, vm.source, num_images)
    if solver == "auto":
        solver, shift = resolve_auto(steps, grid, shift, vm.source.shifts_times)
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
            field = _velocity_field(vm, conditioning, first, eps.shape[0], device)
            # inference mode: less bookkeeping per operation than no_grad (the network's too);
            # the result is cloned out of it below, so callers get ordinary tensors
            with torch.inference_mode():
                result = solve(field, eps * start_scale, s_grid, solver, callback=(lambda i: bar.update(1)) if bar else None,
                               **(solver_options or {}))
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
                  along_list: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
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
    import inspect

    from fmconvert.sampling.baselines import build_scheduler, parse_baseline, stochastic

    if along_list and parse_baseline(baseline)[0].name != "ddim":
        raise ValueError("along_list is DDIM's: use baseline 'ddim'")
    conditioning = conditioning or Conditioning()
    family = vm.source.family
    family.check(conditioning, vm.source, num_images)
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
             progress: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The batches of ``run`` (:class:`fmconvert.sampling.runs.Run`): :func:`iter_baseline` for a
    :class:`~fmconvert.sampling.runs.SchedulerSampler`, :func:`iter_generate` for an
    :class:`~fmconvert.sampling.runs.OdeSampler`, over the given global index ranges (default: all)."""
    from fmconvert.sampling.runs import SchedulerSampler

    sampler = run.sampler
    if isinstance(sampler, SchedulerSampler):
        return iter_baseline(vm, run.num_images, run.shard_size, run.seed, run.steps, device, sampler.spec,
                             ranges=ranges, conditioning=run.conditioning, along_list=sampler.along_list)
    return iter_generate(vm, run.num_images, run.shard_size, run.seed, sampler.solver, sampler.grid, run.steps, device,
                         run.conditioning, progress, dict(sampler.options), ranges, sampler.shift)


def generate_run(vm: VelocityModel, run: Run, device: str = "cpu", progress: bool = False) -> SampleResult:
    """All samples of ``run``, kept (:func:`iter_run`)."""
    return _collect(iter_run(vm, run, device, progress=progress))


def _velocity_field(vm: VelocityModel, request: Conditioning, first: int, batch: int, device) -> Callable:
    """u(x, s) for images [first, first + batch): the family's conditioning, classifier-free
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


def to_images(vm: VelocityModel, x: torch.Tensor) -> torch.Tensor:
    """Data space → images in [0, 1]: the family's decoder (VAE, VQ-VAE, MoVQ), or pixels."""
    return vm.source.family.decode(vm.pipeline, x)


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
