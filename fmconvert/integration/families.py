"""Model families: everything fmconvert knows about a kind of diffusers model, in one place.

A :class:`Family` answers, for one pipeline class (or a bare model folder):

- which denoiser classes it holds;
- what conditions it, and how that is built from a user's
  :class:`~fmconvert.integration.conditioning.Conditioning` (text through the pipeline's own
  ``encode_prompt``, called by keyword; class labels with the null class for guidance; image
  embeddings) as keyword arguments for the network;
- whether its pipeline post-processes the prediction nonlinearly (``guidance_rescale``);
- whether its network takes latents packed in 2×2 patches
  (:class:`~fmconvert.integration.network.NetworkCall`) and which timestep form its pipeline hands it;
- how samples are decoded (``vae`` / ``vqvae`` / ``movq``, scaling and shift factors);
- what the converted pipeline's scheduler must keep in its ``latents``
  (:mod:`fmconvert.integration.schedulers`: ``sample_scaling``).

One small class per family (as k-diffusion's ``external.py``); :data:`FAMILIES` is the registry,
:func:`family_of` the lookup. Adapters, sampling and pipelines ask these; nothing else holds a
list of model classes.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from fmconvert.errors import FmconvertError, UsageError
from fmconvert.integration.conditioning import Conditioning, as_setting, is_given
from fmconvert.integration.network import LEARNED_VARIANCE, learned_variance

if TYPE_CHECKING:  # torch is imported where it computes: `fmconvert wrap` reads configs only
    import torch

    from fmconvert.integration.source import Source

# -- families ------------------------------------------------------------------------------------


def _images(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 2 + 0.5).clamp(0, 1)


def _autoencoder_factor(autoencoder: torch.nn.Module) -> int:
    """2^(levels − 1): pixels per latent along a side, as the pipelines' vae_scale_factor."""
    config: Any = autoencoder.config  # a diffusers model's config (torch's stubs: Tensor | Module)
    return 2 ** (len(config.block_out_channels) - 1)


class Family:
    """One family of diffusers pipelines. Subclasses set the class attributes and override
    :meth:`encode` / :meth:`decode` where the family differs from an unconditional pixel model."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    pipelines: ClassVar[tuple[str, ...]] = ()
    models: ClassVar[tuple[str, ...]] = ()
    #: the user options it takes (Conditioning field names)
    accepts: ClassVar[tuple[str, ...]] = ()
    #: the component that decodes samples into images, or None (pixel space)
    decoder: ClassVar[str | None] = None
    #: FlowMatchEulerScheduler.sample_scaling for its pipeline; None: the stock
    #: FlowMatchEulerDiscreteScheduler (the pipeline calls neither scale_model_input nor init_noise_sigma)
    sample_scaling: ClassVar[str | None] = "variance_preserving"
    #: its pipeline's __call__ applies guidance_rescale to the prediction
    guidance_rescale: ClassVar[bool] = False
    #: its pipeline drops a learned variance itself before the scheduler sees the output
    #: (DiT, PixArt by the network's out_channels; IF, Kandinsky unless variance_type is learned*)
    splits_variance: ClassVar[bool] = False
    #: the network takes only the sample size it was built for (positional embeddings)
    fixed_size: ClassVar[bool] = False
    #: its pipeline hands the network the scheduler's timestep divided by this (FLUX: 1000, so a
    #: flow network gets s): part of the path descriptions on both sides (:func:`family_timestep_path`)
    timestep_divisor: ClassVar[float | None] = None
    #: its pipeline hands every scheduler the flow-only arguments sigmas (a FlowMatch grid) and mu:
    #: a converted folder steps fmconvert's FlowPipeline* schedulers (:mod:`fmconvert.integration.schedulers`)
    hands_flow_arguments: ClassVar[bool] = False
    #: the network takes latents packed in 2×2 patches (:func:`packs_latents`, read by
    #: :class:`~fmconvert.integration.network.NetworkCall`)
    packs_latents: ClassVar[bool] = False
    #: a flow family whose pipeline can step a discrete scheduler (DDIM, DPM-Solver, Euler; through
    #: fmconvert's FlowPipeline* schedulers where it hands flow-only arguments or calls no
    #: ``scale_model_input``): converting it with ``to="epsilon"`` or ``"v_prediction"`` keeps its pipeline
    steps_discrete_schedulers: ClassVar[bool] = False

    def latent_channels(self, config: Any) -> int | None:
        """C of one sample (the network's in_channels, unpacked)."""
        return config.get("in_channels")

    def image_seq_len(self, config: Any, size: tuple[int, int]) -> int | None:
        """The sequence length its pipeline computes a dynamic shift (mu) from, for a sample of
        ``size`` (h, w); None: its pipeline has no such rule."""
        return None

    def flow_sigmas(self, steps: int) -> list[float] | None:
        """The sigmas its pipeline hands a FlowMatch scheduler's set_timesteps (None: the
        scheduler's own default grid)."""
        return None

    def downsampling(self, pipe: Any) -> int:
        """Pixels per sample element along each side (1 in pixel space)."""
        return 1

    def pixels(self, pipe: Any, size: tuple[int, int]) -> tuple[int, int]:
        """The image's (height, width) in pixels for a sample of ``size`` (h, w)."""
        return size[0] * self.downsampling(pipe), size[1] * self.downsampling(pipe)

    def sample_size(self, pipe: Any, config: Any, height: int | None, width: int | None) -> tuple[int, int]:
        """The sample's (h, w) for an image of height × width pixels (None: the denoiser's
        own sample_size). UsageError where the family cannot honour it."""
        given = config.get("sample_size")
        if given is None:
            if height is None or width is None:
                raise UsageError(f"the {self.title} denoiser has no sample_size in its config: pass height=... and width=...")
            own = None
        else:
            own = (int(given), int(given)) if isinstance(given, int) else (int(given[0]), int(given[1]))
            if height is None and width is None:
                return own
        bad = [f"{name}={v}" for name, v in (("height", height), ("width", width)) if v is not None and v <= 0]
        if bad:
            raise UsageError(f"{' and '.join(bad)}: must be positive")
        factor = self.downsampling(pipe)
        if own is not None:  # (one of them may be missing: the other from sample_size)
            height = height if height is not None else own[0] * factor
            width = width if width is not None else own[1] * factor
        assert height is not None and width is not None
        if height % factor or width % factor:
            raise UsageError(f"height={height}, width={width}: must be multiples of {factor} for {self.title}")
        size = (height // factor, width // factor)
        if self.fixed_size and own is not None and size != own:
            raise UsageError(f"{self.title} generates {own[0] * factor}×{own[1] * factor} images only "
                             f"(its positional embeddings), got height={height}, width={width}")
        return size

    @property
    def needs_pipeline(self) -> bool:
        """Whether sampling needs the pipeline's other components (encoders, decoder)."""
        return self.decoder is not None or "prompt" in self.accepts

    def check(self, request: Conditioning, source: Source, num_images: int | None = None) -> None:
        """Refuse, before any work, what this family cannot honour (UsageError, one line,
        naming the Conditioning fields, ``name=value``): options it does not take, options that would
        have no effect, and values it cannot use. From the configs of ``source`` alone (its pipeline
        class, its denoiser's config, its model index): nothing needs to be loaded, so a run is
        checked once, when it is made (:func:`fmconvert.sampling.runs.make_run`), before any weight
        is read. ``num_images``: how many images the run makes."""
        pipeline_class = source.pipeline_class
        allowed = set(self.accepts) | ({"guidance_rescale"} if self.guidance_rescale else set())
        wrong = [as_setting(f.name, getattr(request, f.name)) for f in fields(request)
                 if f.name not in allowed | {"guidance_scale"} and is_given(getattr(request, f.name))]
        if wrong:
            takes = ", ".join(as_setting(a) for a in sorted(allowed)) or "no conditioning"
            raise UsageError(f"{pipeline_class or 'this model'} ({self.title}) takes {takes}; "
                             f"{', '.join(wrong)} cannot be honoured")
        if request.guided and not self.accepts:
            raise UsageError(f"guidance_scale={request.guidance_scale} needs a conditional model; "
                             f"{pipeline_class or self.title} is unconditional")
        if not request.guided:
            idle = [name for name in ("negative_prompt", "negative_image_embeds", "guidance_rescale")
                    if is_given(getattr(request, name))]
            if idle:
                raise UsageError(f"{as_setting(idle[0], getattr(request, idle[0]))} has no effect at "
                                 f"guidance_scale={request.guidance_scale}: it acts on classifier-free guidance, "
                                 "which needs a guidance scale above 1")
        self._check_values(request, source, num_images)

    def _check_values(self, request: Conditioning, source: Source, num_images: int | None) -> None:
        """Family-specific checks of the conditioning's values (the source's configs)."""

    def check_variance(self, model_config: dict, scheduler_config: dict) -> None:
        """A network's output channels and its scheduler's variance_type must tell one story
        (a family whose pipeline drops the variance half itself may pair a learned-variance
        network with a fixed-variance scheduler: Kandinsky 2.2's decoder does). ValueError."""
        default = "fixed_small" if "DDPM" in scheduler_config.get("_class_name", "DDPM") else None
        variance = scheduler_config.get("variance_type", default)
        learned = learned_variance(model_config)
        shape = f"{model_config.get('out_channels')} channels for {model_config.get('in_channels')}"
        if learned and not self.splits_variance and variance not in LEARNED_VARIANCE:
            raise ValueError(f"the network outputs {shape} (a learned variance) but its scheduler says variance_type="
                             f"'{variance}', so the {self.title} pipeline would step with both halves; fix the "
                             "scheduler config (learned_range or learned) or the model config")
        if variance in LEARNED_VARIANCE and not learned:
            raise ValueError(f"the scheduler says variance_type='{variance}' but the network outputs {shape} (no "
                             "variance half); fix the scheduler config or the model config")

    def encode(self, pipe: Any, request: Conditioning, first: int, batch: int, device: Any, config: Any,
               size: tuple[int, int]) -> tuple[dict, dict | None]:
        """Network keyword arguments for images [first, first + batch): (conditional,
        unconditional or None when there is no guidance). ``config``: the denoiser's config;
        ``size``: the sample's (h, w)."""
        return {}, None

    def decode(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        """Final samples (data space) → images in [0, 1]."""
        return _images(x)

    def _decoder(self, pipe: Any) -> torch.nn.Module:
        module = getattr(pipe, self.decoder, None) if pipe is not None and self.decoder is not None else None
        if module is None:
            raise FmconvertError(f"cannot decode {self.title} samples: the pipeline has no '{self.decoder}' component")
        return module


class PixelUnconditional(Family):
    name, title = "ddpm", "unconditional pixel diffusion (DDPM / DDIM / score-SDE VE pipelines)"
    pipelines = ("DDPMPipeline", "DDIMPipeline", "ScoreSdeVePipeline")
    models = ("UNet2DModel",)
    sample_scaling = None
    steps_discrete_schedulers = True  # (as a DDPMPipeline)


class LatentUnconditional(Family):
    name, title = "ldm", "unconditional latent diffusion (LDMPipeline, VQModel)"
    pipelines = ("LDMPipeline",)
    models = ("UNet2DModel",)
    decoder = "vqvae"

    def downsampling(self, pipe):
        return _autoencoder_factor(self._decoder(pipe))

    def decode(self, pipe, x):
        import torch

        vq = self._decoder(pipe)
        with torch.no_grad():
            return _images(vq.decode(x.to(vq.dtype) / vq.config.scaling_factor).sample)


class _VAEDecoded(Family):
    decoder = "vae"

    def downsampling(self, pipe):  # (DiT's pipeline has no vae_scale_factor)
        return _autoencoder_factor(self._decoder(pipe))

    def decode(self, pipe, x):
        """AutoencoderKL: latents·std/scaling + mean where the VAE has latents_mean/std
        (SDXL's pipeline), else latents/scaling + shift_factor; float32 where the VAE asks
        for it (force_upcast) and is float16."""
        import torch

        vae = self._decoder(pipe)
        config = vae.config
        dtype = torch.float32 if (vae.dtype == torch.float16 and config.get("force_upcast", False)) else vae.dtype
        x = x.to(torch.float32)
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            mean = torch.tensor(config.latents_mean).view(shape).to(x)
            std = torch.tensor(config.latents_std).view(shape).to(x)
            x = x * std / config.scaling_factor + mean
        else:
            x = x / config.scaling_factor + (config.get("shift_factor") or 0.0)
        own = vae.dtype
        try:
            with torch.no_grad():
                return _images(vae.to(dtype).decode(x.to(dtype)).sample)
        finally:
            vae.to(own)


def _text(pipe: Any, request: Conditioning, batch: int, device: Any, negative_default: str | None = None,
          **extra) -> tuple:
    """The pipeline's own encode_prompt, by keyword (the signatures differ per pipeline)."""
    import torch

    if not hasattr(pipe, "encode_prompt"):
        raise FmconvertError(f"{type(pipe).__name__} has no encode_prompt; cannot encode the prompt")
    with torch.no_grad():
        return pipe.encode_prompt(prompt=request.prompt or "", device=device, num_images_per_prompt=batch,
                                  do_classifier_free_guidance=request.guided,
                                  negative_prompt=request.negative_prompt or negative_default, **extra)


class _TextConditioned(Family):
    """Text through encode_prompt → (embeddings, negative embeddings) → encoder_hidden_states."""

    accepts = ("prompt", "negative_prompt")
    #: extra keywords for the pipeline's encode_prompt
    prompt_options: ClassVar[dict] = {}

    def encode(self, pipe, request, first, batch, device, config, size):
        cond, uncond = _text(pipe, request, batch, device, **self.prompt_options)[:2]
        return {"encoder_hidden_states": cond}, ({"encoder_hidden_states": uncond} if request.guided else None)


class StableDiffusion(_TextConditioned, _VAEDecoded):
    name, title = "stable-diffusion", "Stable Diffusion 1.x / 2.x"
    pipelines = ("StableDiffusionPipeline",)
    models = ("UNet2DConditionModel",)
    guidance_rescale = True


class StableDiffusionXL(_TextConditioned, _VAEDecoded):
    name, title = "sdxl", "Stable Diffusion XL"
    pipelines = ("StableDiffusionXLPipeline",)
    models = ("UNet2DConditionModel",)
    guidance_rescale = True

    def encode(self, pipe, request, first, batch, device, config, size):
        cond, uncond, pooled, uncond_pooled = _text(pipe, request, batch, device)
        size = self.pixels(pipe, size)  # the time ids are in pixels, as the pipeline builds them
        projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype,
                                          text_encoder_projection_dim=projection).to(device).repeat(batch, 1)
        kwargs = {"encoder_hidden_states": cond, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        if not request.guided:
            return kwargs, None
        return kwargs, {"encoder_hidden_states": uncond,
                        "added_cond_kwargs": {"text_embeds": uncond_pooled, "time_ids": time_ids}}


class DiT(_VAEDecoded):
    name, title = "dit", "DiT (class-conditional, learned sigma)"
    pipelines = ("DiTPipeline",)
    models = ("Transformer2DModel", "DiTTransformer2DModel")
    accepts = ("class_labels",)
    sample_scaling = "initial"  # its pipeline keeps what scale_model_input returns
    fixed_size = True
    splits_variance = True

    @staticmethod
    def class_names(id2label: dict | None) -> dict[str, int]:
        """{name: class} from a model index's id2label, as DiTPipeline reads it (comma-separated
        synonyms, stripped)."""
        return {name.strip(): int(key) for key, value in (id2label or {}).items() for name in value.split(",")}

    def labels(self, request: Conditioning, names: dict[str, int], config: Any) -> list[int]:
        """The class labels as ints: names through ``names`` (the pipeline's id2label), each in range."""
        num_classes = config.get("num_embeds_ada_norm")
        if not request.class_labels:
            raise UsageError(f"{self.title} is class-conditional: pass class_labels=... (integers in 0 … "
                             f"{num_classes - 1}, or names from its id2label)")
        labels = []
        for label in request.class_labels:
            if isinstance(label, str) and not label.lstrip("-").isdigit():
                known = names
                if label not in known:
                    raise UsageError(f"unknown class label '{label}': use an integer in [0, {num_classes}) or a "
                                     "name from the pipeline's id2label")
                label = known[label]
            label = int(label)
            if not 0 <= label < num_classes:
                name = config.get("model_class") or config.get("_class_name", "the model")
                raise UsageError(f"class label {label} out of range: {name} has classes 0 … {num_classes - 1}")
            labels.append(label)
        return labels

    def _check_values(self, request, source, num_images):
        self.labels(request, self.class_names((source.model_index or {}).get("id2label")), source.model_config)

    def encode(self, pipe, request, first, batch, device, config, size):
        import torch

        labels = self.labels(request, getattr(pipe, "labels", None) or {}, config)
        index = torch.arange(first, first + batch) % len(labels)
        cond = torch.tensor(labels)[index].to(device)
        null = torch.full_like(cond, config.num_embeds_ada_norm)  # the null class trained for guidance
        return {"class_labels": cond}, ({"class_labels": null} if request.guided else None)


class PixArtAlpha(_TextConditioned, _VAEDecoded):
    name, title = "pixart-alpha", "PixArt-α (T5 text, learned sigma)"
    pipelines = ("PixArtAlphaPipeline",)
    models = ("Transformer2DModel", "PixArtTransformer2DModel")
    splits_variance = True

    def encode(self, pipe, request, first, batch, device, config, size):
        import torch

        cond, mask, uncond, uncond_mask = _text(pipe, request, batch, device, negative_default="", clean_caption=False)
        added = {"resolution": None, "aspect_ratio": None}
        if config.sample_size == 128:  # PixArt-α 1024's micro-conditions, as its pipeline builds them
            height, width = self.pixels(pipe, size)
            added = {"resolution": torch.tensor([[height, width]] * batch, dtype=cond.dtype, device=device),
                     "aspect_ratio": torch.tensor([[height / width]] * batch, dtype=cond.dtype, device=device)}
        kwargs = {"encoder_hidden_states": cond, "encoder_attention_mask": mask, "added_cond_kwargs": added}
        if not request.guided:
            return kwargs, None
        return kwargs, {"encoder_hidden_states": uncond, "encoder_attention_mask": uncond_mask,
                        "added_cond_kwargs": added}


class DeepFloydIF(_TextConditioned):
    name, title = "deepfloyd-if", "DeepFloyd IF stage I (T5 text, pixel space, learned range)"
    pipelines = ("IFPipeline",)
    models = ("UNet2DConditionModel",)
    prompt_options = {"clean_caption": False}  # True needs bs4 and ftfy
    splits_variance = True


class KandinskyV22(Family):
    name, title = "kandinsky-2.2", "Kandinsky 2.2 decoder (image embeddings, MoVQ, learned variance)"
    pipelines = ("KandinskyV22Pipeline",)
    models = ("UNet2DConditionModel",)
    accepts = ("image_embeds", "negative_image_embeds")
    decoder = "movq"
    sample_scaling = "none"  # its pipeline never calls scale_model_input
    splits_variance = True

    def downsampling(self, pipe):
        return pipe.movq_scale_factor

    def sample_size(self, pipe, config, height, width):
        """Kandinsky's own rounding (``downscale_height_and_width``): ⌈h/f²⌉·f latents for h pixels."""
        if height is None and width is None:
            return super().sample_size(pipe, config, None, None)
        from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import downscale_height_and_width

        own = super().sample_size(pipe, config, None, None)
        f = pipe.movq_scale_factor
        return downscale_height_and_width(height or own[0] * f, width or own[1] * f, f)

    def _check_values(self, request, source, num_images):
        config = source.model_config
        if request.image_embeds is None:
            raise UsageError("Kandinsky 2.2 is conditioned on image embeddings (from its prior): pass image_embeds=...")
        if request.guided and request.negative_image_embeds is None:
            raise UsageError(f"guidance_scale={request.guidance_scale} on Kandinsky 2.2 needs "
                             "negative_image_embeds=... (from its prior)")
        width = config.get("encoder_hid_dim")
        for name in ("image_embeds", "negative_image_embeds"):
            embeds = getattr(request, name)
            if embeds is None:
                continue
            if embeds.ndim != 2 or (width is not None and embeds.shape[1] != width):
                raise UsageError(f"{name} is {tuple(embeds.shape)}; the model takes (1 or N, {width})")
            if num_images is not None and embeds.shape[0] not in (1, num_images):
                raise UsageError(f"{name} holds {embeds.shape[0]} embeddings for {num_images} images: give 1 (for all) "
                                 f"or {num_images} (one each)")

    def encode(self, pipe, request, first, batch, device, config, size):
        def per_image(embeds):
            embeds = embeds.to(device)
            return embeds.expand(batch, -1) if embeds.shape[0] == 1 else embeds[first:first + batch]

        cond = {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": per_image(request.image_embeds)}}
        if not request.guided:
            return cond, None
        return cond, {"encoder_hidden_states": None,
                      "added_cond_kwargs": {"image_embeds": per_image(request.negative_image_embeds)}}

    def decode(self, pipe, x):
        import torch

        movq = self._decoder(pipe)
        with torch.no_grad():
            return _images(movq.decode(x.to(movq.dtype), force_not_quantize=True).sample)


class StableDiffusion3(_TextConditioned, _VAEDecoded):
    """Flow matching: the transformer takes 1000·s, text from three encoders (pooled too)."""

    name, title = "sd3", "Stable Diffusion 3 / 3.5 (flow matching)"
    pipelines = ("StableDiffusion3Pipeline",)
    models = ("SD3Transformer2DModel",)
    steps_discrete_schedulers = True  # (it hands the scheduler mu only where its config shifts dynamically)

    def encode(self, pipe, request, first, batch, device, config, size):
        cond, uncond, pooled, uncond_pooled = _text(pipe, request, batch, device, prompt_2=None, prompt_3=None)
        kwargs = {"encoder_hidden_states": cond, "pooled_projections": pooled}
        if not request.guided:
            return kwargs, None
        return kwargs, {"encoder_hidden_states": uncond, "pooled_projections": uncond_pooled}

    def image_seq_len(self, config, size):
        patch = config.get("patch_size", 2)
        return (size[0] // patch) * (size[1] // patch)


class Flux(_VAEDecoded):
    """FLUX.1: latents packed in 2×2 patches with their position ids, timestep s (its pipeline
    divides 1000·s by 1000), no classifier-free guidance: FLUX.1-dev's guidance is an input
    of the network (``guidance_scale``, default 1 here, 3.5 in the pipeline's __call__),
    FLUX.1-schnell has none. Its pipeline hands the scheduler sigmas linspace(1, 1/N, N)
    and a dynamic shift from the packed sequence length."""

    name, title = "flux", "FLUX.1 (flow matching, packed latents, guidance embedding)"
    pipelines = ("FluxPipeline",)
    models = ("FluxTransformer2DModel",)
    accepts = ("prompt",)
    timestep_divisor = 1000.0
    packs_latents = True
    steps_discrete_schedulers = True
    hands_flow_arguments = True

    def latent_channels(self, config):
        return config.get("in_channels") // 4

    def sample_size(self, pipe, config, height, width):
        own = getattr(pipe, "default_sample_size", 128)
        factor = self.downsampling(pipe)
        size = Family.sample_size(self, pipe, {"sample_size": own}, height, width)
        if size[0] % 2 or size[1] % 2:
            raise UsageError(f"height={size[0] * factor}, width={size[1] * factor}: must be multiples of {2 * factor} "
                             f"for {self.title} (its latents are packed in 2×2 patches)")
        return size

    def image_seq_len(self, config, size):
        return (size[0] // 2) * (size[1] // 2)

    def flow_sigmas(self, steps):
        from fmconvert.integration.schedulers import pipeline_default_sigmas

        return pipeline_default_sigmas(steps).tolist()

    def check(self, request, source, num_images=None):
        guided = request.guidance_scale != 1.0
        if guided and not source.model_config.get("guidance_embeds", False):
            raise UsageError(f"{source.pipeline_class} ({self.title}) without a guidance embedding (FLUX.1-schnell) takes "
                             f"no guidance scale, got guidance_scale={request.guidance_scale}: leave it at 1")
        # the guidance scale is an input of the network here, not classifier-free guidance
        Family.check(self, replace(request, guidance_scale=1.0), source, num_images)

    def encode(self, pipe, request, first, batch, device, config, size):
        import torch

        with torch.no_grad():
            cond, pooled, text_ids = pipe.encode_prompt(prompt=request.prompt or "", prompt_2=None, device=device,
                                                        num_images_per_prompt=batch)
        image_ids = pipe._prepare_latent_image_ids(batch, size[0] // 2, size[1] // 2, device, cond.dtype)
        guidance = (torch.full([batch], request.guidance_scale, device=device, dtype=torch.float32)
                    if config.get("guidance_embeds", False) else None)
        return {"encoder_hidden_states": cond, "pooled_projections": pooled, "txt_ids": text_ids,
                "img_ids": image_ids, "guidance": guidance}, None


FAMILIES: tuple[Family, ...] = (PixelUnconditional(), LatentUnconditional(), StableDiffusion(), StableDiffusionXL(),
                                DiT(), PixArtAlpha(), DeepFloydIF(), KandinskyV22(), StableDiffusion3(), Flux())
_BY_PIPELINE = {p: f for f in FAMILIES for p in f.pipelines}


def packs_latents(model_class: str) -> bool:
    """Whether a denoiser of ``model_class`` takes its latents packed in 2×2 patches (FLUX), as
    :func:`fmconvert.integration.network.network_call` is told."""
    return any(model_class in f.models and f.packs_latents for f in FAMILIES)


def family_timestep_path(path: dict, model_class: str | None) -> dict:
    """A path description with the timestep form that ``model_class``'s family's pipeline hands
    its network: the scheduler's timestep over the family's ``timestep_divisor`` (FLUX: a flow
    network gets 1000·s / 1000 = s, a converted one t / 1000). Unchanged for other families."""
    divisor = next((f.timestep_divisor for f in FAMILIES if model_class in f.models and f.timestep_divisor), None)
    if divisor is None:
        return path
    if path.get("kind") == "rectified_flow":
        return {**path, "timestep_scale": path.get("num_train_timesteps", 1000) / divisor}
    if path.get("kind") == "discrete_vp":
        return {**path, "timestep_scale": 1.0 / divisor}
    raise ValueError(f"{model_class}'s pipeline divides its timesteps by {divisor:g}: no timestep form for a "
                     f"{path.get('kind')} path")


def supported() -> str:
    return "; ".join(f"{f.title} ({', '.join(f.pipelines)})" for f in FAMILIES)


def family_of(pipeline_class: str | None, model_class: str | None, check_model: bool = True) -> Family:
    """The family of a pipeline class (None: a bare model folder); with ``check_model``, the
    denoiser class must be one of the family's. Raises FmconvertError naming the pipeline and
    model class and listing the supported families."""
    family = FAMILIES[0] if pipeline_class is None else _BY_PIPELINE.get(pipeline_class)
    if family is None or (check_model and model_class not in family.models):
        what = f"pipeline {pipeline_class} with {model_class}" if pipeline_class else f"a bare {model_class} folder"
        raise FmconvertError(f"fmconvert does not know {what}; supported: {supported()}")
    return family
