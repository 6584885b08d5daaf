"""Tiny, randomly initialised replicas of real Hub repos whose networks take a CONTINUOUS time: flow
matching (SD3, FLUX.1 dev / schnell), variance-exploding score SDE (NCSN++) and EDM-style samplers
on an SDXL UNet (Playground v2.5, CosXL).

Same conventions as tests/replicas.py (whose helpers this module uses): each replica copies one real
repo's folder layout (model_index.json components, pipeline class, model classes and libraries) and
its scheduler class with the scheduler config VALUES of that repo, while every network is shrunk to
40k-360k parameters (widths 16-48, one or two layers, 16x16 pixels, 8x8 latents).
Text encoders come from tiny configs and tokenizers are built locally, so nothing is downloaded;
everything is seeded (the same seed writes the same bytes).

How each stock pipeline (diffusers 0.42.1) calls its network, sigma being the scheduler's noise level:
  sd3           StableDiffusion3Pipeline: transformer(hidden_states, timestep=1000*sigma (the scheduler's
                own timesteps), encoder_hidden_states, pooled_projections); velocity output; `latents`
                are unpacked (B, 16, h, w); init_noise_sigma 1.
  flux_dev      FluxPipeline: latents packed in 2x2 patches (B, h*w/4, 64); transformer(hidden_states,
                timestep=sigma (the pipeline divides the scheduler's timestep by 1000; the transformer
                multiplies by 1000 again inside), guidance=guidance_scale (dev only, also x1000 inside),
                pooled_projections, encoder_hidden_states, txt_ids, img_ids); mu from the image's
                sequence length (calculate_shift) goes to set_timesteps (use_dynamic_shifting).
  flux_schnell  as flux_dev, guidance=None (guidance_embeds False); its scheduler has a fixed shift 1,
                so the mu the pipeline passes is ignored.
  ncsnpp_ve     ScoreSdeVePipeline: unet(sample, sigma) (the UNet's fourier embedding takes log sigma and
                the output is divided by sigma inside: it returns the score); each step calls it
                correct_steps (1) + 1 times; noise drawn from the generator x sigma_max; ignores
                output_type (returns numpy HWC clamped to [0, 1]).
  playground25  StableDiffusionXLPipeline + EDMDPMSolverMultistepScheduler: unet(scale_model_input(x)
                = x/sqrt(sigma^2+sigma_data^2), timestep=0.25*log(sigma)); epsilon output (EDM
                preconditioning, sigma_data 0.5); latents x init_noise_sigma = sqrt(sigma_max^2 + 1).
  cosxl         StableDiffusionXLPipeline + EulerDiscreteScheduler(timestep_type "continuous",
                v_prediction): unet(x/sqrt(sigma^2+1), timestep=0.25*log(sigma)); v-prediction with
                sigma_data 1 (c_skip 1/(sigma^2+1), c_out -sigma/sqrt(sigma^2+1)); Karras sigmas
                between sigma_max and sigma_min; latents x init_noise_sigma = sqrt(sigma_max^2 + 1)
                ("leading" spacing).

Use `CONTINUOUS_REPLICAS[name].save(folder)` to write one, or
`build_continuous_replica(name, tmp_path_factory)` for a per-session cached copy (tests).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from replicas import (
    PROMPT,
    TEXT_ARGS,
    TEXT_CALL,
    Replica,
    _clip_text_config,
    _clip_tokenizer,
    _kl_vae,
    _patch_model_index,
    _reinit_zero_weights,
    _t5,
    sdxl_components,
)

# --------------------------------------------------------------------------------------------------
# Scheduler configs of the real repos (scheduler/scheduler_config.json, `_diffusers_version` dropped).
# --------------------------------------------------------------------------------------------------

SCHEDULER_CONFIGS: dict[str, dict] = {
    # stabilityai/stable-diffusion-3-medium-diffusers: the file holds only these two values (the
    # scheduler's defaults give the rest: use_dynamic_shifting False, ...).
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    # black-forest-labs/FLUX.1-dev: resolution-dependent shift, mu = calculate_shift(seq_len) between
    # base_shift at base_image_seq_len and max_shift at max_image_seq_len (`shift` is then unused).
    "flux_dev": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
        "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True,
    },
    # black-forest-labs/FLUX.1-schnell: same keys, no dynamic shifting and shift 1 (plain linear sigmas).
    "flux_schnell": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
        "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
        "use_dynamic_shifting": False,
    },
    # google/ncsnpp-celebahq-256. sigma_min 0.01, sigma_max 348, 2000 scales, one corrector step
    # (n_steps_each) and sampling_eps 1e-5 are the score_sde training/sampling config of this model
    # (configs/ve/celebahq_256_ncsnpp_continuous.py + default_lsun_configs.py). snr: NOT FOUND offline.
    # score_sde samples CelebA-HQ 256 with snr 0.075, but the repo's scheduler_config.json (212 bytes
    # in a mirror's listing) only fits a two-decimal snr with these keys; 0.15 (ScoreSdeVeScheduler's
    # default, the value the sibling google/ncsnpp-ffhq-1024 file matches) is used.
    "ncsnpp_ve": {
        "_class_name": "ScoreSdeVeScheduler", "correct_steps": 1, "num_train_timesteps": 2000,
        "sampling_eps": 1e-05, "sigma_max": 348.0, "sigma_min": 0.01, "snr": 0.15,
    },
    # playgroundai/playground-v2.5-1024px-aesthetic (EDM, sigma_data 0.5, Karras rho 7, epsilon output).
    # Serialised with _diffusers_version "0.27.0.dev0" this is exactly the 497 bytes of the real file.
    "playground25": {
        "_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
        "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "final_sigmas_type": "zero",
        "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon", "rho": 7.0,
        "sample_max_value": 1.0, "sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002, "solver_order": 2,
        "solver_type": "midpoint", "thresholding": False,
    },
    # stabilityai/cosxl ships single-file checkpoints (cosxl.safetensors, cosxl_edit.safetensors) and NO
    # diffusers scheduler_config.json; diffusers' from_single_file does not read its schedule either
    # (it would build SDXL's epsilon EulerDiscreteScheduler). The checkpoint marks itself EDM v-pred with
    # edm_vpred.sigma_max / edm_vpred.sigma_min = 120 / 0.002 (as CosXL's ComfyUI workflow,
    # ModelSamplingContinuousEDM v_prediction). The keys are those of the one real diffusers file with
    # this scheduler mode, stabilityai/stable-video-diffusion-img2vid-xt's (EulerDiscreteScheduler,
    # timestep_type continuous, v_prediction, Karras sigmas, SDXL betas), with CosXL's sigma range in place
    # of SVD's 700 / 0.002.
    "cosxl": {
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "v_prediction", "set_alpha_to_one": False, "sigma_max": 120.0, "sigma_min": 0.002,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous",
        "trained_betas": None, "use_karras_sigmas": True,
    },
}

# Playground v2.5's VAE (vae/config.json): SDXL's KL VAE with per-channel latent statistics.
PLAYGROUND_LATENTS_MEAN = (-1.6574, 1.886, -1.383, 2.5155)
PLAYGROUND_LATENTS_STD = (8.4927, 5.9022, 6.5498, 5.2299)
# SD3 and FLUX VAEs (vae/config.json): 16 latent channels, no quant convs, latents (z - shift) * scale.
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (FLUX.1-dev's model card uses 3.5)


def _scheduler(name: str):
    import diffusers

    config = dict(SCHEDULER_CONFIGS[name])
    return getattr(diffusers, config.pop("_class_name")).from_config(config)


def _kl_vae16(scaling_factor: float, shift_factor: float):
    """SD3 / FLUX-style AutoencoderKL: 16 latent channels, no quant_conv / post_quant_conv (as their real
    vae/config.json), shift_factor; two levels, so 16x16 pixels <-> 8x8 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=16,
        layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


# --------------------------------------------------------------------------------------------------
# Flow matching: SD3, FLUX
# --------------------------------------------------------------------------------------------------

def save_sd3(folder: Path, seed: int = 20) -> Path:
    """stabilityai/stable-diffusion-3-medium-diffusers: StableDiffusion3Pipeline, SD3Transformer2DModel
    (MMDiT, patch 2, 16 latent channels, caption projection = inner width), CLIP-L and CLIP-G text
    encoders with projection (their hidden states are concatenated and zero-padded to T5's width; their
    projections concatenated give the pooled vector), a T5 encoder, 16-channel VAE with shift_factor."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer, vocab = _clip_tokenizer()
    tokenizer_2, vocab_2 = _clip_tokenizer(pad_token="!")
    # CLIP-L (quick_gelu, 768 wide) and OpenCLIP bigG (gelu, 1280 wide) in the real repo.
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(vocab, "<|endoftext|>", hidden=16, projection=16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(vocab_2, "!", hidden=24, act="gelu", projection=24))
    text_encoder_3, tokenizer_3 = _t5(d_model=48)
    clip_width = text_encoder.config.projection_dim + text_encoder_2.config.projection_dim  # 2048 real
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=text_encoder_3.config.d_model, caption_projection_dim=32,
        pooled_projection_dim=clip_width, pos_embed_max_size=16,
    )
    vae = _kl_vae16(**SD3_VAE)
    _reinit_zero_weights(transformer, vae)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_scheduler("sd3"), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    ).save_pretrained(folder)
    # transformers 5's T5TokenizerFast is T5Tokenizer; the real repo names the fast class.
    _patch_model_index(folder, drop_null=("image_encoder", "feature_extractor"),
                       tokenizer_3=["transformers", "T5TokenizerFast"])
    return folder


def _save_flux(folder: Path, seed: int, scheduler_name: str, guidance_embeds: bool) -> Path:
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer, vocab = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(vocab, "<|endoftext|>", hidden=32))  # CLIP-L: quick_gelu
    text_encoder_2, tokenizer_2 = _t5(d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # (16, 56, 56) real: sums to the head width
    )
    vae = _kl_vae16(**FLUX_VAE)
    _reinit_zero_weights(transformer, vae)
    FluxPipeline(
        scheduler=_scheduler(scheduler_name), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    ).save_pretrained(folder)
    _patch_model_index(folder, drop_null=("image_encoder", "feature_extractor"),
                       tokenizer_2=["transformers", "T5TokenizerFast"])
    return folder


def save_flux_dev(folder: Path, seed: int = 21) -> Path:
    """black-forest-labs/FLUX.1-dev: FluxPipeline, FluxTransformer2DModel with guidance_embeds=True
    (guidance-distilled: the guidance scale is an input, not CFG), double + single stream blocks, CLIP-L
    (pooled) + T5 (sequence), 16-channel VAE with shift_factor, dynamic-shift flow-matching Euler."""
    return _save_flux(folder, seed, "flux_dev", guidance_embeds=True)


def save_flux_schnell(folder: Path, seed: int = 22) -> Path:
    """black-forest-labs/FLUX.1-schnell: as FLUX.1-dev with guidance_embeds=False and its own scheduler
    (shift 1, no dynamic shifting)."""
    return _save_flux(folder, seed, "flux_schnell", guidance_embeds=False)


# --------------------------------------------------------------------------------------------------
# Variance-exploding score SDE: NCSN++
# --------------------------------------------------------------------------------------------------

def save_ncsnpp_ve(folder: Path, seed: int = 23) -> Path:
    """google/ncsnpp-celebahq-256: ScoreSdeVePipeline and a UNet2DModel with the NCSN++ settings that
    matter (score_sde's celebahq_256_ncsnpp_continuous config as diffusers ports it): Gaussian fourier
    time embedding (time_embedding_type "fourier": log sigma in, fourier scale 16, and the output divided
    by sigma, i.e. scale_by_sigma; flip_sin_to_cos / freq_shift are unused on this path), Skip / AttnSkip
    blocks (FIR resampling, progressive input / output skips, "biggan" resnets), attention at one level
    only (16x16 of the real model's seven), mid_block_scale_factor sqrt(2) (skip_rescale), norm_eps 1e-6,
    group norms of min(channels / 4, 32) groups (norm_num_groups None). Shrunk to two levels of width 32
    (AttnSkip blocks hard-code 32 groups in their attention and up-block norms), attention at the 8x8
    level, 16x16 pixels: ~316k parameters."""
    from diffusers import ScoreSdeVePipeline, UNet2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="fourier",
        flip_sin_to_cos=True, freq_shift=1, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        mid_block_scale_factor=math.sqrt(2.0), downsample_padding=1, act_fn="silu", attention_head_dim=None,
        norm_num_groups=None, norm_eps=1e-6,
    )
    _reinit_zero_weights(unet)
    ScoreSdeVePipeline(unet=unet, scheduler=_scheduler("ncsnpp_ve")).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# SDXL UNet under EDM-style schedulers: Playground v2.5, CosXL
# (the components: replicas.sdxl_components, as the sdxl replica's)
# --------------------------------------------------------------------------------------------------


def save_playground25(folder: Path, seed: int = 24) -> Path:
    """playgroundai/playground-v2.5-1024px-aesthetic: StableDiffusionXLPipeline (SDXL architecture) with
    EDMDPMSolverMultistepScheduler, and a VAE with scaling_factor 0.5 and per-channel latents_mean /
    latents_std (the pipeline decodes latents * std / scaling_factor + mean). Its model_index.json lists
    feature_extractor and image_encoder as [null, null] and has no add_watermarker entry."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    StableDiffusionXLPipeline(
        **sdxl_components(lambda: _kl_vae(0.5, latents_mean=PLAYGROUND_LATENTS_MEAN, latents_std=PLAYGROUND_LATENTS_STD)),
        scheduler=_scheduler("playground25"), force_zeros_for_empty_prompt=True, add_watermarker=False,
    ).save_pretrained(folder)
    return folder


def save_cosxl(folder: Path, seed: int = 25) -> Path:
    """stabilityai/cosxl (CosXL, an SDXL fine-tune with an EDM v-prediction "cosine-continuous"
    schedule): the real repo has single-file checkpoints only, so the layout is SDXL base's (the
    sdxl replica's model_index.json: add_watermarker null, no image_encoder / feature_extractor) with
    SDXL's VAE (scaling 0.13025) and EulerDiscreteScheduler(timestep_type "continuous", v_prediction,
    Karras sigmas from 120 down to 0.002)."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    StableDiffusionXLPipeline(
        **sdxl_components(lambda: _kl_vae(0.13025, force_upcast=True)), scheduler=_scheduler("cosxl"),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    ).save_pretrained(folder)
    _patch_model_index(folder, drop_null=("image_encoder", "feature_extractor"), add_watermarker=None)
    return folder


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

FLUX_DEV_CALL = {"prompt": PROMPT, "guidance_scale": FLUX_GUIDANCE, "height": 16, "width": 16}
FLUX_DEV_ARGS = ("--prompt", PROMPT, "--guidance-scale", str(FLUX_GUIDANCE), "--height", "16", "--width", "16")
# schnell has no guidance input (guidance_embeds False) and is not run with CFG: no guidance kwarg.
FLUX_SCHNELL_CALL = {"prompt": PROMPT, "height": 16, "width": 16}
FLUX_SCHNELL_ARGS = ("--prompt", PROMPT, "--height", "16", "--width", "16")

CONTINUOUS_REPLICAS: dict[str, Replica] = {
    r.name: r
    for r in [
        Replica(
            name="sd3", repo="stabilityai/stable-diffusion-3-medium-diffusers", save=save_sd3, call=dict(TEXT_CALL),
            noise_arg="latents", noise_shape=(16, 8, 8), sample_args=TEXT_ARGS,
        ),
        # FluxPipeline's `latents` takes PACKED latents (B, 16, 64); with noise_arg None the pipeline draws
        # randn(1, 16, 8, 8) from the generator (the noise_shape below) and packs it itself.
        Replica(
            name="flux_dev", repo="black-forest-labs/FLUX.1-dev", save=save_flux_dev, call=dict(FLUX_DEV_CALL),
            noise_arg=None, noise_shape=(16, 8, 8), sample_args=FLUX_DEV_ARGS,
        ),
        Replica(
            name="flux_schnell", repo="black-forest-labs/FLUX.1-schnell", save=save_flux_schnell,
            call=dict(FLUX_SCHNELL_CALL), noise_arg=None, noise_shape=(16, 8, 8), sample_args=FLUX_SCHNELL_ARGS,
        ),
        # ScoreSdeVePipeline draws randn(1, 3, 16, 16) x sigma_max from the generator; no size / conditioning.
        Replica(
            name="ncsnpp_ve", repo="google/ncsnpp-celebahq-256", save=save_ncsnpp_ve, call={}, noise_arg=None,
            noise_shape=(3, 16, 16), sample_args=(),
        ),
        Replica(
            name="playground25", repo="playgroundai/playground-v2.5-1024px-aesthetic", save=save_playground25,
            call=dict(TEXT_CALL), noise_arg="latents", noise_shape=(4, 8, 8), sample_args=TEXT_ARGS,
        ),
        Replica(
            name="cosxl", repo="stabilityai/cosxl", save=save_cosxl, call=dict(TEXT_CALL), noise_arg="latents",
            noise_shape=(4, 8, 8), sample_args=TEXT_ARGS,
        ),
    ]
}


_CACHE: dict[str, Path] = {}


def build_continuous_replica(name: str, tmp_path_factory) -> Path:
    """The replica's folder, written once per session (pass pytest's tmp_path_factory)."""
    if name not in _CACHE:
        _CACHE[name] = CONTINUOUS_REPLICAS[name].save(tmp_path_factory.mktemp(f"replica-{name}") / name)
    return _CACHE[name]
