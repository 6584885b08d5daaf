"""The continuous-time replicas in tests/replicas_continuous.py copy their real Hub repos (layout, classes,
scheduler config values, the VAE / network settings the pipelines read); each loads with the stock
DiffusionPipeline and runs two steps under its OWN scheduler with finite output, calling its network with
the timestep form documented there; and each is deterministic (same seed, same bytes)."""

import json
import math

import pytest
import torch
from diffusers import DiffusionPipeline
from replicas import one_thread
from replicas_continuous import CONTINUOUS_REPLICAS, build_continuous_replica

T = ["transformers"]
D = ["diffusers"]
SDXL_COMPONENTS = {
    "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
    "text_encoder": T + ["CLIPTextModel"], "text_encoder_2": T + ["CLIPTextModelWithProjection"],
    "tokenizer": T + ["CLIPTokenizer"], "tokenizer_2": T + ["CLIPTokenizer"],
    "unet": D + ["UNet2DConditionModel"], "vae": D + ["AutoencoderKL"],
}
FLUX_INDEX = {
    "_class_name": "FluxPipeline", "scheduler": D + ["FlowMatchEulerDiscreteScheduler"],
    "text_encoder": T + ["CLIPTextModel"], "text_encoder_2": T + ["T5EncoderModel"],
    "tokenizer": T + ["CLIPTokenizer"], "tokenizer_2": T + ["T5TokenizerFast"],
    "transformer": D + ["FluxTransformer2DModel"], "vae": D + ["AutoencoderKL"],
}
# model_index.json of the real repos (`_diffusers_version` dropped).
REAL_MODEL_INDEX = {
    "sd3": {
        "_class_name": "StableDiffusion3Pipeline", "scheduler": D + ["FlowMatchEulerDiscreteScheduler"],
        "text_encoder": T + ["CLIPTextModelWithProjection"], "text_encoder_2": T + ["CLIPTextModelWithProjection"],
        "text_encoder_3": T + ["T5EncoderModel"], "tokenizer": T + ["CLIPTokenizer"],
        "tokenizer_2": T + ["CLIPTokenizer"], "tokenizer_3": T + ["T5TokenizerFast"],
        "transformer": D + ["SD3Transformer2DModel"], "vae": D + ["AutoencoderKL"],
    },
    "flux_dev": FLUX_INDEX,
    "flux_schnell": FLUX_INDEX,
    "ncsnpp_ve": {
        "_class_name": "ScoreSdeVePipeline", "scheduler": D + ["ScoreSdeVeScheduler"], "unet": D + ["UNet2DModel"],
    },
    # Written by diffusers 0.27.0.dev0: the optional image_encoder / feature_extractor as [null, null], no
    # add_watermarker (with the version string this is the real file's 684 bytes).
    "playground25": {
        **SDXL_COMPONENTS, "scheduler": D + ["EDMDPMSolverMultistepScheduler"],
        "feature_extractor": [None, None], "image_encoder": [None, None],
    },
    # stabilityai/cosxl has no diffusers folder: SDXL base's model_index.json with the CosXL scheduler.
    "cosxl": {**SDXL_COMPONENTS, "scheduler": D + ["EulerDiscreteScheduler"], "add_watermarker": None},
}

# scheduler/scheduler_config.json of the real repos (see replicas_continuous.SCHEDULER_CONFIGS for sources
# and the two values that could not be read offline: ncsnpp's snr, cosxl's whole file).
REAL_SCHEDULER = {
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "flux_dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                 "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": True},
    "flux_schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                     "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": False},
    "ncsnpp_ve": {"_class_name": "ScoreSdeVeScheduler", "correct_steps": 1, "num_train_timesteps": 2000,
                  "sampling_eps": 1e-05, "sigma_max": 348.0, "sigma_min": 0.01, "snr": 0.15},
    "playground25": {"_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
                     "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "final_sigmas_type": "zero",
                     "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                     "rho": 7.0, "sample_max_value": 1.0, "sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002,
                     "solver_order": 2, "solver_type": "midpoint", "thresholding": False},
    "cosxl": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
              "prediction_type": "v_prediction", "set_alpha_to_one": False, "sigma_max": 120.0, "sigma_min": 0.002,
              "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
              "timestep_type": "continuous", "trained_betas": None, "use_karras_sigmas": True},
}
# What loading the real file gives for keys it leaves out.
IMPLIED_DEFAULTS = {
    "sd3": {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
            "time_shift_type": "exponential", "stochastic_sampling": False},
    "flux_dev": {"time_shift_type": "exponential", "shift_terminal": None, "invert_sigmas": False},
    "flux_schnell": {"time_shift_type": "exponential", "shift_terminal": None, "invert_sigmas": False},
    "playground25": {"sigma_schedule": "karras"},
    "cosxl": {"final_sigmas_type": "zero", "rescale_betas_zero_snr": False},
}

# Settings of the real repos' model configs that the pipelines / conversions read.
REAL_MODEL_CONFIG = {
    "sd3": {"vae": {"scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_channels": 16,
                    "use_quant_conv": False, "use_post_quant_conv": False},
            "transformer": {"patch_size": 2, "in_channels": 16, "out_channels": 16, "qk_norm": None,
                            "dual_attention_layers": []}},
    "flux_dev": {"vae": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16,
                         "use_quant_conv": False, "use_post_quant_conv": False},
                 "transformer": {"patch_size": 1, "in_channels": 64, "guidance_embeds": True}},
    "flux_schnell": {"vae": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16},
                     "transformer": {"patch_size": 1, "in_channels": 64, "guidance_embeds": False}},
    "ncsnpp_ve": {"unet": {"time_embedding_type": "fourier", "in_channels": 3, "out_channels": 3,
                           "norm_eps": 1e-6, "norm_num_groups": None, "center_input_sample": False}},
    "playground25": {"vae": {"scaling_factor": 0.5, "latents_mean": [-1.6574, 1.886, -1.383, 2.5155],
                             "latents_std": [8.4927, 5.9022, 6.5498, 5.2299]},
                     "unet": {"addition_embed_type": "text_time", "in_channels": 4}},
    "cosxl": {"vae": {"scaling_factor": 0.13025}, "unet": {"addition_embed_type": "text_time", "in_channels": 4}},
}


def _log_quarter(sigma):
    return 0.25 * math.log(sigma)


# Network timestep as a function of the scheduler's sigma at that step, and network calls per step.
TIMESTEP_FORM = {
    "sd3": (lambda s: 1000.0 * s, 1),
    "flux_dev": (lambda s: s, 1),
    "flux_schnell": (lambda s: s, 1),
    "ncsnpp_ve": (lambda s: s, 2),  # correct_steps (1) corrector calls + 1 predictor call, both at sigma
    "playground25": (_log_quarter, 1),
    "cosxl": (_log_quarter, 1),
}
# Output of `output_type="latent"`: FLUX returns packed latents; ScoreSdeVe ignores output_type (numpy HWC).
OUTPUT_SHAPE = {
    "sd3": (1, 16, 8, 8), "flux_dev": (1, 16, 64), "flux_schnell": (1, 16, 64), "ncsnpp_ve": (1, 16, 16, 3),
    "playground25": (1, 4, 8, 8), "cosxl": (1, 4, 8, 8),
}

NAMES = sorted(CONTINUOUS_REPLICAS)


@pytest.fixture
def replica_folder(tmp_path_factory):
    def get(name):
        with one_thread():
            return build_continuous_replica(name, tmp_path_factory)

    return get


def test_registry():
    assert NAMES == sorted(REAL_MODEL_INDEX) == sorted(REAL_SCHEDULER) == sorted(TIMESTEP_FORM)
    for name, r in CONTINUOUS_REPLICAS.items():
        assert r.name == name and "/" in r.repo
        assert not {"num_inference_steps", "generator", "latents", "output_type"} & set(r.call)
        assert len(r.noise_shape) == 3


@pytest.mark.parametrize("name", NAMES)
def test_copies_real_repo(name, replica_folder):
    folder = replica_folder(name)
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("_diffusers_version")
    assert index == REAL_MODEL_INDEX[name]
    for component, entry in index.items():
        if isinstance(entry, list) and entry[0] is not None:
            assert (folder / component).is_dir(), component

    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for key, value in {**REAL_SCHEDULER[name], **IMPLIED_DEFAULTS.get(name, {})}.items():
        assert saved.get(key, "missing") == value, (key, saved.get(key, "missing"), value)

    for component, expected in REAL_MODEL_CONFIG[name].items():
        config = json.loads((folder / component / "config.json").read_text())
        for key, value in expected.items():
            assert config.get(key, "missing") == value, (component, key, config.get(key, "missing"), value)


@pytest.mark.parametrize("name", NAMES)
def test_runs_under_own_scheduler(name, replica_folder):
    r = CONTINUOUS_REPLICAS[name]
    steps = 2
    with one_thread():
        pipe = DiffusionPipeline.from_pretrained(replica_folder(name))
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.scheduler).__name__ == REAL_SCHEDULER[name]["_class_name"]
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        n_params = sum(p.numel() for p in denoiser.parameters())
        assert n_params < 400_000, n_params

        seen = []

        def record(module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            seen.append(float(torch.as_tensor(t).flatten()[0]))

        hook = denoiser.register_forward_pre_hook(record, with_kwargs=True)
        kwargs = dict(r.call)
        if r.noise_arg is not None:
            kwargs[r.noise_arg] = torch.randn(1, *r.noise_shape, generator=torch.Generator().manual_seed(1))
        try:
            out = pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                       output_type="latent")
        finally:
            hook.remove()

    images = torch.as_tensor(out.images).float()
    assert tuple(images.shape) == OUTPUT_SHAPE[name]
    assert torch.isfinite(images).all()
    assert images.std() > 1e-3

    form, calls_per_step = TIMESTEP_FORM[name]
    sigmas = [float(s) for s in pipe.scheduler.sigmas[:steps]]
    expected = [form(s) for s in sigmas for _ in range(calls_per_step)]
    assert seen == pytest.approx(expected, rel=1e-4, abs=1e-5), (seen, sigmas)
    assert sigmas[0] > sigmas[1] > 0


@pytest.mark.parametrize("name", NAMES)
def test_replica_is_deterministic(name, replica_folder, tmp_path):
    first = replica_folder(name)
    with one_thread():
        second = CONTINUOUS_REPLICAS[name].save(tmp_path / name)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
