"""The replicas in tests/replicas.py copy their real Hub repos: layout, classes, scheduler config values;
and each source pipeline runs under DDIM (trailing) with finite, non-constant images."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from replicas import REPLICAS, build_replica, ddim_trailing, one_thread
from safetensors.torch import load_file

# model_index.json of the real repos (components, pipeline class, top-level flags), transcribed from the Hub.
SD_COMPONENTS = {
    "scheduler": None,  # filled per repo
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
}
SD2_INDEX = {
    "_class_name": "StableDiffusionPipeline", **SD_COMPONENTS, "scheduler": ["diffusers", "DDIMScheduler"],
    "requires_safety_checker": False, "safety_checker": [None, None],
}
REAL_MODEL_INDEX = {
    "ddpm": {
        "_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    },
    "ldm": {
        "_class_name": "LDMPipeline", "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"],
        "vqvae": ["diffusers", "VQModel"],
    },
    "sd15": {  # the real file has no requires_safety_checker key: its default (True) is what diffusers writes
        "_class_name": "StableDiffusionPipeline", **SD_COMPONENTS, "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "requires_safety_checker": True,
    },
    "sd21": SD2_INDEX,
    "zsnr": SD2_INDEX,
    "sdxl": {
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True, "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "dit": {
        "_class_name": "DiTPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
        "transformer": ["diffusers", "Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    },
    "pixart": {
        "_class_name": "PixArtAlphaPipeline", "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    },
    "if1": {
        "_class_name": "IFPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": True, "safety_checker": ["deepfloyd_if", "IFSafetyChecker"],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "watermarker": ["deepfloyd_if", "IFWatermarker"],
    },
    "kandinsky22": {
        "_class_name": "KandinskyV22Pipeline", "movq": ["diffusers", "VQModel"],
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
    },
}
# Left out on purpose: IF's safety checker does not load with diffusers 0.42 / transformers 5.
REPLICA_OVERRIDES = {
    "if1": {"feature_extractor": [None, None], "safety_checker": [None, None], "watermarker": [None, None],
            "requires_safety_checker": False},
}

# scheduler/scheduler_config.json of the real repos.
REAL_SCHEDULER = {
    "ddpm": {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
             "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"},
    "ldm": {"_class_name": "DDIMScheduler", "beta_end": 0.0195, "beta_schedule": "scaled_linear", "beta_start": 0.0015,
            "clip_sample": False, "num_train_timesteps": 1000, "trained_betas": None},
    "sd15": {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None, "clip_sample": False},
    "sd21": {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None},
    "zsnr": {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
             "set_alpha_to_one": True, "steps_offset": 1, "trained_betas": None, "timestep_spacing": "trailing",
             "rescale_betas_zero_snr": True},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
    "dit": {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
            "steps_offset": 0, "trained_betas": None},
    "pixart": {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
               "beta_schedule": "linear", "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995,
               "euler_at_final": False, "lambda_min_clipped": float("-inf"), "lower_order_final": True,
               "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "solver_order": 2,
               "solver_type": "midpoint", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
               "trained_betas": None, "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None},
    "if1": {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
            "beta_start": 0.0001,
            "clip_sample": True, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.95,
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.5, "thresholding": True,
            "trained_betas": None, "variance_type": "learned_range", "lambda_min_clipped": -5.1},
    "kandinsky22": {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                    "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
                    "steps_offset": 1, "prediction_type": "epsilon", "thresholding": False},
}

# Values a scheduler takes when its real config file leaves a key out (what loading the real repo gives).
IMPLIED_DEFAULTS = {
    "ddpm": {"prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0, "thresholding": False},
    "ldm": {"prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading",
            "rescale_betas_zero_snr": False},
    "sd15": {"prediction_type": "epsilon", "timestep_spacing": "leading"},
    "sd21": {"timestep_spacing": "leading", "rescale_betas_zero_snr": False, "thresholding": False},
    "dit": {"timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "if1": {"steps_offset": 0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "kandinsky22": {"variance_type": "fixed_small", "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
}

NAMES = sorted(REPLICAS)


@pytest.fixture
def replica_folder(tmp_path_factory):
    def get(name):
        with one_thread():
            return build_replica(name, tmp_path_factory)

    return get


def test_registry():
    assert NAMES == sorted(REAL_MODEL_INDEX) == sorted(REAL_SCHEDULER)
    for name, r in REPLICAS.items():
        assert r.name == name and "/" in r.repo
        assert not {"num_inference_steps", "generator", "latents", "output_type"} & set(r.call)
        assert len(r.noise_shape) == 3


@pytest.mark.parametrize("name", NAMES)
def test_model_index_copies_real_repo(name, replica_folder):
    index = json.loads((replica_folder(name) / "model_index.json").read_text())
    index.pop("_diffusers_version")
    id2label = index.pop("id2label", None)
    expected = {**REAL_MODEL_INDEX[name], **REPLICA_OVERRIDES.get(name, {})}
    assert index == expected
    if name == "dit":  # DiTPipeline's null class is id 1000: the 1000 real classes are all there
        assert sorted(map(int, id2label)) == list(range(1000))
    for component, entry in index.items():
        if isinstance(entry, list) and entry[0] is not None:
            assert (replica_folder(name) / component).is_dir(), component


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_config_carries_real_values(name, replica_folder):
    saved = json.loads((replica_folder(name) / "scheduler" / "scheduler_config.json").read_text())
    for key, value in {**REAL_SCHEDULER[name], **IMPLIED_DEFAULTS.get(name, {})}.items():
        assert saved.get(key, "missing") == value, (key, saved.get(key, "missing"), value)


@pytest.mark.parametrize("name", NAMES)
def test_replica_is_deterministic(name, replica_folder, tmp_path):
    first = replica_folder(name)
    with one_thread():
        second = REPLICAS[name].save(tmp_path / name)
    files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(second) for p in second.rglob("*.safetensors"))
    for rel in files:
        a, b = load_file(first / rel), load_file(second / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


@pytest.mark.parametrize("name", NAMES)
def test_source_runs_under_ddim_trailing(name, replica_folder):
    r = REPLICAS[name]
    with one_thread():
        pipe = DiffusionPipeline.from_pretrained(replica_folder(name))
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = ddim_trailing(pipe.scheduler.config)
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        n_params = sum(p.numel() for p in denoiser.parameters())
        assert n_params < 400_000, n_params

        seen = []
        hook = denoiser.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(tuple((args[0] if args else kwargs.get("sample",
                                                            kwargs.get("hidden_states"))).shape)),
            with_kwargs=True,
        )
        kwargs = dict(r.call)
        if r.noise_arg is not None:
            kwargs[r.noise_arg] = torch.randn(1, *r.noise_shape, generator=torch.Generator().manual_seed(1))
        try:
            out = pipe(**kwargs, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
        finally:
            hook.remove()

    assert len(seen) == 3 and all(s[1:] == tuple(r.noise_shape) for s in seen), seen
    images = torch.as_tensor(out.images)  # LDMPipeline returns numpy HWC whatever output_type says
    assert images.shape[0] == 1 and 3 in images.shape[1:]
    assert torch.isfinite(images).all()
    assert images.float().std() > 1e-3
    if name == "sd15":  # the real safety checker ran and, by construction, flagged nothing
        assert out.nsfw_content_detected == [False]
