"""A model loaded once and ready to sample: every model brought to one form, a
:class:`~fmconvert.integration.adapters.PathAdapter` whose target is diffusers' rectified path
(u(x_s, 1000·s) = ε̂ − x̂0): a converted velocity folder as it is, a diffusion source through
:class:`~fmconvert.integration.adapters.VelocityAdapter`, a flow source through the identity
adapter, a converted epsilon / v folder through VelocityAdapter around it (an exact round trip).
Also what follows from the loaded model alone: its time grids (:func:`sampling_grid`), the shape
of one sample and of one image, and its decoder (:func:`to_images`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fmconvert.errors import FmconvertError
from fmconvert.integration.adapters import DiffusionAdapter, PathAdapter, VelocityAdapter
from fmconvert.integration.configs import FLOW_SCHEDULERS
from fmconvert.integration.source import DENOISERS, Source, inspect_source, load_denoiser
from fmconvert.math.grids import time_grid
from fmconvert.math.paths import GaussianPath, RectifiedFlow


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
                        compute_dtype: str | None = None, denoiser: torch.nn.Module | None = None) -> VelocityModel:
    """Load and wrap a model for sampling: ``reference`` is a source already inspected
    (:func:`~fmconvert.integration.source.inspect_source`: the command line resolves a
    reference once, and loads what it resolved), or a reference string, inspected here with
    ``revision``, ``allow_pickle`` and ``trust_remote_code`` (``channels_last`` / ``compile``: the GPU
    fast path for the wrapped network; ``compute_dtype``: the dtype a source wrapped here
    applies its conversion in, default below; ``denoiser``: the source's denoiser already loaded
    by :func:`~fmconvert.integration.source.load_denoiser` in ``dtype``, wrapped here, not read again).

    The conversion's coefficients are planned in float64; a source wrapped here applies them
    (k_x·x + k_out·output) in float32 unless the network is float64: against a float64 DDIM
    that is as exact as a float64 combination, since the network's own rounding dominates
    (docs/benchmarks/BENCHMARKS.md). A converted folder keeps the compute_dtype it was written with."""
    source = (reference if isinstance(reference, Source)
              else inspect_source(reference, revision, allow_pickle, trust_remote_code))
    if denoiser is not None and dtype is not None and denoiser.dtype != dtype:
        raise ValueError(f"the denoiser given is {denoiser.dtype}, not {dtype}")
    model = denoiser if denoiser is not None else load_denoiser(source, dtype, allow_pickle, trust_remote_code)
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


def to_images(vm: VelocityModel, x: torch.Tensor) -> torch.Tensor:
    """Data space → images in [0, 1]: the family's decoder (VAE, VQ-VAE, MoVQ), or pixels."""
    return vm.source.family.decode(vm.pipeline, x)
