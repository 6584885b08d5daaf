"""Sampling any model as a velocity field with the ODE solvers of :mod:`fmconvert.solvers`.

Every model is brought to one form, a :class:`~fmconvert.adapters.PathAdapter` whose target
is diffusers' rectified path (u(x_s, 1000·s) = ε̂ − x̂0): a converted velocity folder as it
is, a diffusion source through :class:`VelocityAdapter`, a flow source through the identity
adapter, a converted epsilon / v folder through VelocityAdapter around it (an exact round trip).

Noise convention: ``--seed S`` draws
``torch.randn((num_images, C, H, W), generator=torch.Generator("cpu").manual_seed(S))`` once,
so the samples depend neither on the batch size nor on the device. The start is
x_{s_0} = ε·√((1 − s_0)² + s_0²), the noise at the first grid time (ε itself at s_0 = 1, and
ε/(α_T + σ_T) on DDIM's grid, as DDIMScheduler starts from x_T = ε).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .adapters import DiffusionAdapter, PathAdapter, VelocityAdapter
from .errors import FmconvertError
from .grids import time_grid
from .pipelines import Source, inspect_source, load_denoiser
from .schedules import GaussianPath, RectifiedFlow
from .solvers import solve

EVALS_PER_STEP = {"euler": 1, "ab2": 1, "heun": 2, "midpoint": 2, "rk4": 4}


@dataclass
class VelocityModel:
    """A model ready to sample: the velocity adapter, the path its grids come from, and
    (for latent or text-conditioned pipelines) the rest of the pipeline."""

    velocity: PathAdapter
    grid_source: GaussianPath
    source: Source
    shift: float = 1.0
    pipeline: Any = None
    info: dict = field(default_factory=dict)


def as_velocity(model: torch.nn.Module, source: Source, compute_dtype: str = "float64") -> tuple[PathAdapter, GaussianPath]:
    """Any source denoiser as a PathAdapter onto the rectified path; plus its grid path.
    ``compute_dtype``: the dtype the new adapter applies its conversion in (a round trip
    through a converted diffusion folder stays float64 throughout)."""
    T = getattr(source.path, "num_train_timesteps", 1000)
    target = RectifiedFlow(num_train_timesteps=T)
    if isinstance(model, VelocityAdapter):
        return model, model.source
    if isinstance(model, DiffusionAdapter):  # converted back to a diffusion model: round trip, exact
        return PathAdapter._wrap(model, model.target, model.target_prediction, target, "flow_prediction", "float64"), model.target
    if source.prediction_type == "flow_prediction":
        return PathAdapter._wrap(model, source.path, "flow_prediction", target, "flow_prediction", compute_dtype), source.path
    return VelocityAdapter._wrap(model, source.path, source.prediction_type, target, "flow_prediction", compute_dtype), source.path


def load_velocity_model(reference: str, revision: str | None = None, dtype: torch.dtype | None = None,
                        device: str = "cpu", allow_pickle: bool = False, trust_remote_code: bool = False,
                        need_pipeline: bool = False, channels_last: bool = False, compile: bool = False) -> VelocityModel:
    """Resolve, load and wrap a MODEL for sampling (``channels_last`` / ``compile``: the GPU
    fast path for the wrapped network).

    The conversion's coefficients are planned in float64; a source wrapped here applies them
    (k_x·x + k_out·output) in float32 unless the network is float64: against a float64 DDIM
    that is as exact as a float64 combination, since the network's own rounding dominates
    (BENCHMARKS.md). A converted folder keeps the compute_dtype it was written with."""
    source = inspect_source(reference, revision, allow_pickle, trust_remote_code)
    model = load_denoiser(source, dtype, allow_pickle, trust_remote_code)
    velocity, grid_source = as_velocity(model, source, "float64" if model.dtype == torch.float64 else "float32")
    shift = float(source.scheduler.get("shift", source.scheduler.get("flow_shift", 1.0)) or 1.0)
    pipeline = None
    index = source.model_index or {}
    if need_pipeline or "vae" in index or "text_encoder" in index:
        pipeline = _load_pipeline(source, model, dtype, allow_pickle, trust_remote_code)
    velocity.to(device)
    network = velocity.model.model if isinstance(velocity.model, PathAdapter) else velocity.model
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if compile:
        compiled = torch.compile(network)
        if isinstance(velocity.model, PathAdapter):
            velocity.model.model = compiled
        else:
            velocity.model = compiled
    if pipeline is not None:
        for name in ("vae", "text_encoder"):
            if getattr(pipeline, name, None) is not None:
                getattr(pipeline, name).to(device)
    return VelocityModel(velocity.eval(), grid_source, source, shift, pipeline, source.describe())


def _load_pipeline(source: Source, model, dtype, allow_pickle, trust_remote_code):
    """The source pipeline's other components, with the already-loaded denoiser passed in."""
    if source.model_index is None:
        return None
    from diffusers import DiffusionPipeline
    from .pipelines import load

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


def sample_shape(vm: VelocityModel) -> tuple[int, ...]:
    config = vm.velocity.config
    size = config.get("sample_size")
    channels = config.get("in_channels")
    if size is None or channels is None:
        raise FmconvertError(f"cannot tell the sample shape of {vm.source.model_class}: its config has no sample_size / in_channels")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (channels, *size)


@dataclass
class SampleResult:
    """``samples``: final states in the model's data space (float32, CPU); ``images``: in [0, 1];
    ``nfe``: field evaluations per trajectory, one entry per batch (they differ only for dopri5)."""

    samples: torch.Tensor
    images: torch.Tensor
    nfe: list[int]
    seconds: float


def _conditioning(vm: VelocityModel, prompt: str | None, guidance_scale: float, device, batch: int):
    """Text embeddings (cond, uncond) for text-conditioned pipelines, else None."""
    pipe = vm.pipeline
    if pipe is None or getattr(pipe, "text_encoder", None) is None:
        if prompt is not None:
            raise FmconvertError(f"--prompt given but {vm.source.pipeline_class or vm.source.model_class} is not text-conditioned")
        return None
    if not hasattr(pipe, "encode_prompt"):
        raise FmconvertError(f"text-conditioned sampling supports pipelines with encode_prompt; {type(pipe).__name__} has none")
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt or "", device, batch, guidance_scale > 1.0, negative_prompt=None)
    return cond, uncond


def iter_generate(vm: VelocityModel, num_images: int = 16, batch_size: int = 16, seed: int = 0, solver: str = "euler",
                  grid: str = "uniform", steps: int = 50, device: str = "cpu", prompt: str | None = None,
                  guidance_scale: float = 1.0, progress: bool = False, solver_options: dict | None = None,
                  ranges: list[tuple[int, int]] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Yield (samples, images, nfe) batch by batch (by default all of [0, num_images) in
    batches of ``batch_size``; or the given global index ranges): one batch is held."""
    s_grid = time_grid(grid, steps, vm.grid_source, shift=vm.shift)
    noise = NoiseStream(num_images, sample_shape(vm), seed)
    ranges = batches_of(num_images, batch_size) if ranges is None else ranges
    s0 = s_grid[0]
    start_scale = float(torch.sqrt((1 - s0) ** 2 + s0**2))
    per_step = EVALS_PER_STEP.get(solver)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ranges) * steps, file=sys.stderr, desc=f"{solver} {steps} steps", unit="step", leave=False)
    try:
        for first, stop in ranges:
            eps = noise.take(first, stop).to(device)
            field = _velocity_field(vm, eps.shape[0], prompt, guidance_scale, device)
            # inference mode: less bookkeeping per operation than no_grad (the network's too);
            # the result is cloned out of it below, so callers get ordinary tensors
            with torch.inference_mode():
                result = solve(field, eps * start_scale, s_grid, solver, callback=(lambda i: bar.update(1)) if bar else None,
                               **(solver_options or {}))
            if result.first_bad_nfe is not None:
                k = result.first_bad_nfe
                where = f"step {min(k // per_step, steps - 1) + 1} of {steps}" if per_step else f"evaluation {k + 1}"
                raise FmconvertError(
                    f"the model produced NaN/Inf at {where} (images {first}..{first + eps.shape[0] - 1}); "
                    "try --dtype float32, or check the model's weights"
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
             grid: str = "uniform", steps: int = 50, device: str = "cpu", prompt: str | None = None,
             guidance_scale: float = 1.0, progress: bool = False, solver_options: dict | None = None) -> SampleResult:
    """Draw ``num_images`` samples, ``batch_size`` at a time, all kept (see iter_generate)."""
    batches = iter_generate(vm, num_images, batch_size, seed, solver, grid, steps, device, prompt, guidance_scale,
                            progress, solver_options)
    return _collect(batches)


BASELINES = ("ddim",)


def ddim_baseline(vm: VelocityModel):
    """DDIMScheduler(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    from the source's scheduler config (unconditional diffusion sources)."""
    from diffusers import DDIMScheduler

    source = vm.source
    if source.prediction_type == "flow_prediction" or source.converted:
        raise FmconvertError("--baseline ddim runs a diffusion source's own scheduler; "
                             f"'{source.reference}' is {'a converted model' if source.converted else 'a flow model'}")
    return DDIMScheduler.from_config({**source.scheduler, "prediction_type": source.prediction_type},
                                     timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)


def iter_baseline(vm: VelocityModel, num_images: int = 16, batch_size: int = 16, seed: int = 0, steps: int = 50,
                  device: str = "cpu", baseline: str = "ddim",
                  ranges: list[tuple[int, int]] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The source's own diffusers sampler driving the unconverted network on the same noise,
    batch by batch (or over the given global index ranges)."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}: supported are {', '.join(BASELINES)}")
    scheduler = ddim_baseline(vm)
    if steps > scheduler.config.num_train_timesteps:
        raise ValueError(f"steps={steps} exceeds the source's {scheduler.config.num_train_timesteps} trained timesteps")
    model = vm.velocity.model
    noise = NoiseStream(num_images, sample_shape(vm), seed)
    for first, stop in (batches_of(num_images, batch_size) if ranges is None else ranges):
        x = noise.take(first, stop).to(device)
        scheduler.set_timesteps(steps)
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(model(x.to(model.dtype), t.to(device)).sample.float(), t, x).prev_sample
        yield x.float(), to_images(vm, x.float()), steps


def generate_baseline(vm: VelocityModel, num_images: int = 16, batch_size: int = 16, seed: int = 0,
                      steps: int = 50, device: str = "cpu", baseline: str = "ddim") -> SampleResult:
    """All samples of :func:`iter_baseline`."""
    batches = iter_baseline(vm, num_images, batch_size, seed, steps, device, baseline)
    return _collect(batches)


def _velocity_field(vm: VelocityModel, batch: int, prompt, guidance_scale, device) -> Callable:
    velocity, T = vm.velocity, vm.velocity.target.num_train_timesteps
    embeddings = _conditioning(vm, prompt, guidance_scale, device, batch)
    if embeddings is None:
        return lambda x, s: velocity.evaluate(x, T * s, output_dtype=torch.float32)
    cond, uncond = embeddings
    if guidance_scale <= 1.0:
        return lambda x, s: velocity.evaluate(x, T * s, encoder_hidden_states=cond, output_dtype=torch.float32)
    both = torch.cat([uncond, cond])

    def guided(x, s):  # guidance is affine, so it commutes with the conversion
        u_uncond, u_cond = velocity.evaluate(torch.cat([x, x]), torch.cat([T * s, T * s]),
                                             encoder_hidden_states=both, output_dtype=torch.float32).chunk(2)
        return u_uncond + guidance_scale * (u_cond - u_uncond)

    return guided


def to_images(vm: VelocityModel, x: torch.Tensor) -> torch.Tensor:
    """Data space → images in [0, 1] (decoding latents with the pipeline's VAE)."""
    vae = getattr(vm.pipeline, "vae", None) if vm.pipeline is not None else None
    if vae is not None:
        with torch.no_grad():
            x = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample.float()
    return (x / 2 + 0.5).clamp(0, 1)


def iter_shards(vm: VelocityModel, make_batches, num_images: int, batch_size: int, store=None,
                device: str = "cpu") -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int, bool]]:
    """This rank's shards of [0, num_images) (shard j = [j·B, (j+1)·B), made by rank j mod K):
    yields (j, samples, images, nfe, reused). Shards ``store`` has are read from it (images
    decoded on ``device``); the others are made by ``make_batches(ranges)`` and saved there."""
    from . import distributed

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
    from . import distributed

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
