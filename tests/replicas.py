"""Tiny, randomly initialised replicas of real Hub diffusion repos, built offline.

Each replica copies one real repo's folder layout (component names in model_index.json, pipeline
class, model classes and their libraries) and its scheduler class with the scheduler config VALUES
of that repo (transcribed from its scheduler/scheduler_config.json), while every network is shrunk
to a few hundred thousand parameters (widths 8-32, one layer per block, 8x8 latents, 16x16 pixels).
Text encoders come from tiny configs and tokenizers are built here from a handful of characters, so
nothing is downloaded. Everything is seeded: the same seed writes the same weights.

Use `REPLICAS[name].save(folder)` to write one, or `build_replica(name, tmp_path_factory)` for a
per-session cached copy (tests).
"""

from __future__ import annotations

import json
import string
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class Replica:
    name: str  # short name, e.g. "sd15"
    repo: str  # the real Hub repo it copies
    save: Callable[[Path], Path]  # save(folder) writes the source pipeline folder there and returns it
    call: dict  # __call__ kwargs that condition it and keep it tiny (no steps/generator/latents/output_type)
    noise_arg: str | None  # __call__ argument taking the initial noise, or None when the pipeline draws it
    noise_shape: tuple  # (C, H, W) of one image's initial noise for the sizes in `call`
    sample_args: tuple  # CLI conditioning args equivalent to `call`


# --------------------------------------------------------------------------------------------------
# Scheduler configs of the real repos (scheduler/scheduler_config.json, `_diffusers_version` dropped).
# Built with `SchedulerClass.from_config(...)`, so keys the class does not take but a compatible
# scheduler does (set_alpha_to_one on a DDPMScheduler, ...) are kept and written back, as on the Hub.
# --------------------------------------------------------------------------------------------------

SCHEDULER_CONFIGS: dict[str, dict] = {
    "ddpm": {  # google/ddpm-cifar10-32
        "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large",
    },
    "ldm": {  # CompVis/ldm-celebahq-256
        "_class_name": "DDIMScheduler", "beta_end": 0.0195, "beta_schedule": "scaled_linear", "beta_start": 0.0015,
        "clip_sample": False, "num_train_timesteps": 1000, "trained_betas": None,
    },
    "sd15": {  # stable-diffusion-v1-5/stable-diffusion-v1-5
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False,
    },
    "sd21": {  # stabilityai/stable-diffusion-2-1
        "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    },
    "zsnr": {  # ByteDance/sd2.1-base-zsnr-laionaes6-perceptual
        "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": True, "steps_offset": 1, "trained_betas": None, "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
    },
    "sdxl": {  # stabilityai/stable-diffusion-xl-base-1.0
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    },
    "dit": {  # facebook/DiT-XL-2-256
        "_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
        "steps_offset": 0, "trained_betas": None,
    },
    "pixart": {  # PixArt-alpha/PixArt-XL-2-1024-MS
        "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
        "beta_schedule": "linear", "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995, "euler_at_final": False,
        "lambda_min_clipped": float("-inf"), "lower_order_final": True, "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint",
        "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
        "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None,
    },
    "if1": {  # DeepFloyd/IF-I-XL-v1.0
        "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001,
        "clip_sample": True, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.95,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.5, "thresholding": True,
        "trained_betas": None, "variance_type": "learned_range", "lambda_min_clipped": -5.1,
    },
    "kandinsky22": {  # kandinsky-community/kandinsky-2-2-decoder
        "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
        "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "prediction_type": "epsilon", "thresholding": False,
    },
}

PROMPT, NEGATIVE = "a red circle", "blurry"
TEXT_ARGS = ("--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--guidance-scale", "4", "--height", "16", "--width", "16")
TEXT_CALL = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": 4.0, "height": 16, "width": 16}


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------

def _scheduler(name: str):
    import diffusers

    config = dict(SCHEDULER_CONFIGS[name])
    return getattr(diffusers, config.pop("_class_name")).from_config(config)


def _reinit_zero_weights(*modules: torch.nn.Module, std: float = 0.05) -> list[str]:
    """Give every all-zero weight matrix / conv kernel small random values (zero-initialised layers
    such as adaLN-zero or zero output projections would make a random replica output constants)."""
    touched = []
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if p.dim() >= 2 and p.numel() > 0 and not bool(p.any()):
                    p.normal_(0.0, std)
                    touched.append(name)
    return touched


def _patch_model_index(folder: Path, drop_null: tuple[str, ...] = (), **extra) -> None:
    """Drop optional components that diffusers writes as [null, null] but the real repo does not list,
    and add top-level entries the real repo has (e.g. SDXL's add_watermarker)."""
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    for key in drop_null:
        if index.get(key) == [None, None]:
            del index[key]
    index.update(extra)
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


CHARS = string.ascii_lowercase + string.digits + " .,"


def _clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77):
    """A character-level CLIPTokenizer: vocab.json of single characters (+ their </w> forms) and a
    merges.txt holding only the version header. SD 1.x pads with <|endoftext|>, SD 2.x / SDXL's second
    tokenizer pad with "!" (as the real repos)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "!</w>": 3}
    for c in CHARS:
        for token in (c, c + "</w>"):
            vocab.setdefault(token, len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad_token,
            model_max_length=max_length,
        )
    return tokenizer, vocab


def _clip_text_config(vocab: dict, pad_token: str, hidden: int = 32, act: str = "quick_gelu", projection: int = 32,
                      layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=projection,
        bos_token_id=0, eos_token_id=1, pad_token_id=vocab[pad_token],
    )


def _t5(d_model: int = 32, layers: int = 1):
    """A tiny T5 v1.1-style encoder (gated-gelu, as t5-v1_1-xxl used by IF and PixArt) and a Unigram
    T5Tokenizer built from an in-memory (piece, score) list."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,"]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    config = T5Config(
        vocab_size=len(pieces), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config), tokenizer


def _kl_vae(scaling_factor: float, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=scaling_factor, **extra,
    )


def _sd_unet(cross_attention_dim: int, sd2: bool, **extra):
    """UNet2DConditionModel with SD's block layout; SD 2.x uses per-block head counts and linear
    projections in the transformer blocks (as its unet/config.json)."""
    from diffusers import UNet2DConditionModel

    kwargs = dict(attention_head_dim=(2, 4), use_linear_projection=True) if sd2 else dict(attention_head_dim=4)
    kwargs.update(extra)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=8, **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------

def save_ddpm(folder: Path, seed: int = 0) -> Path:
    """google/ddpm-cifar10-32: DDPMPipeline, UNet2DModel (3 channels, attention in the second level,
    flip_sin_to_cos False / freq_shift 1 / downsample_padding 0 / norm_eps 1e-6 as the real config)."""
    from diffusers import DDPMPipeline, UNet2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6,
    )
    _reinit_zero_weights(unet)
    DDPMPipeline(unet=unet, scheduler=_scheduler("ddpm")).save_pretrained(folder)
    return folder


def save_ldm(folder: Path, seed: int = 1) -> Path:
    """CompVis/ldm-celebahq-256: LDMPipeline with vqvae (VQModel, 3 latent channels) + UNet2DModel
    (flip_sin_to_cos True, freq_shift 0, attention from the second level) + its DDIMScheduler."""
    from diffusers import LDMPipeline, UNet2DModel, VQModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        norm_eps=1e-5,
    )
    vqvae = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=3, num_vq_embeddings=64, norm_num_groups=8, sample_size=16,
    )
    _reinit_zero_weights(unet, vqvae)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=_scheduler("ldm")).save_pretrained(folder)
    return folder


def _safety_checker():
    """A real StableDiffusionSafetyChecker on a tiny CLIPConfig whose thresholds (concept weights) are
    so large that every score is negative: it runs, but never blacks an image out."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(10.0)  # cosine <= 1 < 10: no score ever exceeds 0
        checker.special_care_embeds_weights.fill_(10.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return checker.eval(), extractor


def save_sd15(folder: Path, seed: int = 2) -> Path:
    """stable-diffusion-v1-5/stable-diffusion-v1-5: StableDiffusionPipeline, PNDMScheduler, with a real
    (tiny, never-flagging) safety checker and a CLIPImageProcessor feature extractor."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer, vocab = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(vocab, "<|endoftext|>", act="quick_gelu"))
    unet = _sd_unet(cross_attention_dim=32, sd2=False)
    vae = _kl_vae(0.18215)
    safety_checker, feature_extractor = _safety_checker()
    _reinit_zero_weights(unet, vae)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler("sd15"),
        safety_checker=safety_checker, feature_extractor=feature_extractor, requires_safety_checker=True,
    ).save_pretrained(folder)
    _patch_model_index(folder, drop_null=("image_encoder",))
    return folder


def _save_sd2(folder: Path, seed: int, scheduler_name: str, upcast_attention: bool) -> Path:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer, vocab = _clip_tokenizer(pad_token="!")
    text_encoder = CLIPTextModel(_clip_text_config(vocab, "!", act="gelu"))
    unet = _sd_unet(cross_attention_dim=32, sd2=True, upcast_attention=upcast_attention)
    vae = _kl_vae(0.18215)
    _reinit_zero_weights(unet, vae)
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(scheduler_name),
        safety_checker=None, feature_extractor=feature_extractor, requires_safety_checker=False,
    ).save_pretrained(folder)
    _patch_model_index(folder, drop_null=("image_encoder",))
    return folder


def save_sd21(folder: Path, seed: int = 3) -> Path:
    """stabilityai/stable-diffusion-2-1: v_prediction DDIMScheduler, OpenCLIP-style text encoder (gelu,
    "!" padding), linear-projection transformer blocks, upcast_attention; safety_checker null."""
    return _save_sd2(folder, seed, "sd21", upcast_attention=True)


def save_zsnr(folder: Path, seed: int = 4) -> Path:
    """ByteDance/sd2.1-base-zsnr-laionaes6-perceptual (the zero-terminal-SNR paper's SD 2.1-base
    fine-tune): v_prediction DDIMScheduler with rescale_betas_zero_snr and trailing spacing."""
    return _save_sd2(folder, seed, "zsnr", upcast_attention=False)


SDXL_TIME_DIM = 8  # addition_time_embed_dim (256 in the real UNet)


def sdxl_components(make_vae) -> dict:
    """The SDXL replica's components but its scheduler: a CLIP-L-like encoder (quick_gelu,
    <|endoftext|> padding) and a bigG-like one with projection ("!" padding), whose pooled output and
    6 time ids feed the UNet's "text_time" added embedding, and the VAE ``make_vae()`` builds (after
    the UNet). Call after seeding; replicas of other SDXL repos (tests/replicas_continuous.py) share it."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = _clip_tokenizer()
    tokenizer_2, vocab_2 = _clip_tokenizer(pad_token="!")
    text_encoder = CLIPTextModel(_clip_text_config(vocab, "<|endoftext|>", hidden=16, act="quick_gelu", projection=16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(vocab_2, "!", hidden=32, act="gelu", projection=32))
    projection_dim = text_encoder_2.config.projection_dim
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=16 + 32, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM, projection_class_embeddings_input_dim=projection_dim + 6 * SDXL_TIME_DIM,
    )
    vae = make_vae()
    _reinit_zero_weights(unet, vae)
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet)


def save_sdxl(folder: Path, seed: int = 5) -> Path:
    """stabilityai/stable-diffusion-xl-base-1.0: two CLIP text encoders (the second with projection,
    whose pooled output + 6 time ids feed the "text_time" added embedding), EulerDiscreteScheduler."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    StableDiffusionXLPipeline(
        **sdxl_components(lambda: _kl_vae(0.13025, force_upcast=True)), scheduler=_scheduler("sdxl"),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    ).save_pretrained(folder)
    _patch_model_index(folder, drop_null=("image_encoder", "feature_extractor"), add_watermarker=None)
    return folder


DIT_NUM_CLASSES = 1000  # DiTPipeline hard-codes the null (unconditional) class id 1000


def save_dit(folder: Path, seed: int = 6) -> Path:
    """facebook/DiT-XL-2-256: DiTPipeline with a Transformer2DModel (norm_type ada_norm_zero, patch 2,
    learned sigma: out_channels = 2 x in_channels) that diffusers 0.42 loads as DiTTransformer2DModel,
    1000 classes (+1 null embedding, id 1000), id2label in model_index.json, AutoencoderKL."""
    from diffusers import DiTPipeline, Transformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = Transformer2DModel(
        sample_size=8, num_layers=1, attention_head_dim=16, num_attention_heads=2, in_channels=4, out_channels=8,
        patch_size=2, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=DIT_NUM_CLASSES,
        norm_type="ada_norm_zero", norm_elementwise_affine=False,
    )
    vae = _kl_vae(0.18215)
    _reinit_zero_weights(transformer, vae)
    id2label = {str(i): f"class {i}" for i in range(DIT_NUM_CLASSES)}
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=_scheduler("dit"), id2label=id2label)
    pipe.save_pretrained(folder)
    _patch_model_index(folder, id2label=id2label)  # DiTPipeline does not write it; the real repo has it
    return folder


def save_pixart(folder: Path, seed: int = 7) -> Path:
    """PixArt-alpha/PixArt-XL-2-1024-MS: PixArtAlphaPipeline with a Transformer2DModel (ada_norm_single,
    caption projection from T5, learned sigma) that diffusers 0.42 loads as PixArtTransformer2DModel.
    sample_size stays 128 as in the real config: that is what switches on the resolution / aspect-ratio
    added conditions in both the model and the pipeline (the call still runs at 8x8 latents)."""
    from diffusers import PixArtAlphaPipeline, Transformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    text_encoder, tokenizer = _t5(d_model=32)
    transformer = Transformer2DModel(
        sample_size=128, num_layers=1, attention_head_dim=24, num_attention_heads=2, in_channels=4, out_channels=8,
        patch_size=2, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, cross_attention_dim=48,
        caption_channels=text_encoder.config.d_model,
    )
    vae = _kl_vae(0.18215)
    _reinit_zero_weights(transformer, vae)
    PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=_scheduler("pixart"),
    ).save_pretrained(folder)
    return folder


def save_if1(folder: Path, seed: int = 8) -> Path:
    """DeepFloyd/IF-I-XL-v1.0 (stage I): IFPipeline, pixel-space UNet2DConditionModel 3 -> 6 channels
    (learned_range variance), T5 text encoder projected by encoder_hid_proj ("text_proj") plus the
    "text" added embedding, IF's block types and gelu activations. Saved without safety_checker,
    watermarker and feature_extractor (IF's safety checker does not load with these versions)."""
    from diffusers import IFPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    text_encoder, tokenizer = _t5(d_model=32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", act_fn="gelu", attention_head_dim=8,
        cross_attention_dim=32, cross_attention_norm="group_norm", encoder_hid_dim=text_encoder.config.d_model,
        encoder_hid_dim_type="text_proj", addition_embed_type="text", addition_embed_type_num_heads=2,
        resnet_time_scale_shift="scale_shift", norm_num_groups=8,
    )
    _reinit_zero_weights(unet)
    IFPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=_scheduler("if1"),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


KANDINSKY_EMBED_DIM = 32  # image embedding width (1280 for the real prior/decoder)


def save_kandinsky22(folder: Path, seed: int = 9) -> Path:
    """kandinsky-community/kandinsky-2-2-decoder: KandinskyV22Pipeline, UNet2DConditionModel 4 -> 8
    channels conditioned only on an image embedding ("image" added embedding + "image_proj" encoder
    hidden states), MoVQ (VQModel with spatial norm) decoder, DDPMScheduler."""
    from diffusers import KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=8, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8, cross_attention_dim=32,
        encoder_hid_dim=KANDINSKY_EMBED_DIM, encoder_hid_dim_type="image_proj", addition_embed_type="image",
        addition_embed_type_num_heads=2, resnet_time_scale_shift="scale_shift", class_embed_type=None,
        norm_num_groups=8,
    )
    movq = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 32),
        layers_per_block=1, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=64, norm_num_groups=8,
        norm_type="spatial", sample_size=16,
    )
    _reinit_zero_weights(unet, movq)
    KandinskyV22Pipeline(unet=unet, scheduler=_scheduler("kandinsky22"), movq=movq).save_pretrained(folder)
    return folder


# How each source pipeline (diffusers 0.42.1) treats the initial noise and the scheduler:
#   ddpm         DDPMPipeline: noise from the generator only; never multiplies by init_noise_sigma, never
#                calls scale_model_input; passes generator to scheduler.step.
#   ldm          LDMPipeline: noise from the generator only; x init_noise_sigma BEFORE set_timesteps;
#                calls scale_model_input; ignores output_type (returns numpy HWC in [0, 1]).
#   sd15/sd21/zsnr/sdxl/pixart: `latents`; x init_noise_sigma AFTER set_timesteps (also for given
#                latents); call scale_model_input (SD guarded by hasattr).
#   dit          DiTPipeline: noise from the generator only, NEVER x init_noise_sigma; calls
#                scale_model_input; null class id hard-coded to 1000; learned sigma split when
#                transformer.config.out_channels // 2 == in_channels; guidance on the eps half only.
#   if1          IFPipeline: noise from the generator only; x init_noise_sigma AFTER set_timesteps; calls
#                scale_model_input; keeps the 6 channels when scheduler.config.variance_type is learned*;
#                output_type="pt" returns the raw sample (no clamp, range [-1, 1] under thresholding).
#   kandinsky22  KandinskyV22Pipeline: `latents`; x init_noise_sigma AFTER set_timesteps; does NOT call
#                scale_model_input; drops the variance half unless variance_type is learned*;
#                output_type="pt" returns the raw MoVQ decode (not rescaled to [0, 1]).


def _image_embeds(seed: int) -> torch.Tensor:
    return torch.randn(1, KANDINSKY_EMBED_DIM, generator=torch.Generator().manual_seed(seed))


REPLICAS: dict[str, Replica] = {
    r.name: r
    for r in [
        Replica(
            name="ddpm", repo="google/ddpm-cifar10-32", save=save_ddpm, call={}, noise_arg=None,
            noise_shape=(3, 16, 16), sample_args=(),
        ),
        Replica(
            name="ldm", repo="CompVis/ldm-celebahq-256", save=save_ldm, call={}, noise_arg=None,
            noise_shape=(3, 8, 8), sample_args=(),
        ),
        Replica(
            name="sd15", repo="stable-diffusion-v1-5/stable-diffusion-v1-5", save=save_sd15, call=dict(TEXT_CALL),
            noise_arg="latents", noise_shape=(4, 8, 8), sample_args=TEXT_ARGS,
        ),
        Replica(
            name="sd21", repo="stabilityai/stable-diffusion-2-1", save=save_sd21, call=dict(TEXT_CALL),
            noise_arg="latents", noise_shape=(4, 8, 8), sample_args=TEXT_ARGS,
        ),
        Replica(
            name="zsnr", repo="ByteDance/sd2.1-base-zsnr-laionaes6-perceptual", save=save_zsnr, call=dict(TEXT_CALL),
            noise_arg="latents", noise_shape=(4, 8, 8), sample_args=TEXT_ARGS,
        ),
        Replica(
            name="sdxl", repo="stabilityai/stable-diffusion-xl-base-1.0", save=save_sdxl, call=dict(TEXT_CALL),
            noise_arg="latents", noise_shape=(4, 8, 8), sample_args=TEXT_ARGS,
        ),
        Replica(
            name="dit", repo="facebook/DiT-XL-2-256", save=save_dit, call={"class_labels": [3], "guidance_scale": 4.0},
            noise_arg=None, noise_shape=(4, 8, 8), sample_args=("--class-label", "3", "--guidance-scale", "4"),
        ),
        Replica(
            name="pixart", repo="PixArt-alpha/PixArt-XL-2-1024-MS", save=save_pixart,
            call={**TEXT_CALL, "use_resolution_binning": False}, noise_arg="latents", noise_shape=(4, 8, 8),
            sample_args=TEXT_ARGS,
        ),
        Replica(
            name="if1", repo="DeepFloyd/IF-I-XL-v1.0", save=save_if1, call=dict(TEXT_CALL), noise_arg=None,
            noise_shape=(3, 16, 16), sample_args=TEXT_ARGS,
        ),
        Replica(
            name="kandinsky22", repo="kandinsky-community/kandinsky-2-2-decoder", save=save_kandinsky22,
            call={"image_embeds": _image_embeds(1), "negative_image_embeds": _image_embeds(2), "guidance_scale": 4.0,
                  "height": 16, "width": 16},
            noise_arg="latents", noise_shape=(4, 8, 8), sample_args=("--guidance-scale", "4"),
        ),
    ]
}


_CACHE: dict[str, Path] = {}


def build_replica(name: str, tmp_path_factory) -> Path:
    """The replica's folder, written once per session (pass pytest's tmp_path_factory)."""
    if name not in _CACHE:
        _CACHE[name] = REPLICAS[name].save(tmp_path_factory.mktemp(f"replica-{name}") / name)
    return _CACHE[name]


@contextmanager
def one_thread():
    """These networks are tiny: one thread is ~100x faster than two on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ddim_trailing(config):
    """The DDIM (trailing, no clipping, final alpha 1) that a conversion is compared against. DDIMScheduler
    keeps a learned variance_type from the source config (IF): IFPipeline would then hand DDIM the 6-channel
    output, so that one key is replaced."""
    config = dict(config)
    if config.get("variance_type") in ("learned", "learned_range"):
        config["variance_type"] = "fixed_small"
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
                                     thresholding=False)
