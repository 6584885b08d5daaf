"""Every family converts, loads with stock diffusers, runs in its own pipeline and reproduces
the source's DDIM exactly; `fmconvert sample` takes its conditioning and writes decoded images.

Each family is a tiny replica of a real Hub repo (tests/replicas.py). The reference is the
source pipeline's own ``__call__`` under DDIMScheduler(timestep_spacing="trailing",
clip_sample=False, set_alpha_to_one=True, thresholding=False), on the same noise."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import error, ok
from diffusers import DiffusionPipeline
from replicas import REPLICAS, build_replica, ddim_trailing, one_thread
from safetensors.torch import load_file, save_file

import fmconvert
from fmconvert.integration.schedulers import FlowMatchEulerScheduler

NAMES = list(REPLICAS)
STEPS, SEED = 4, 3
#: how a family's pipeline hands back its final sample (data space: latents, or raw pixels):
#: output_type="latent", or "pt" (IF returns pixels before clamping); DDPM, LDM and DiT return
#: only decoded images, so their samples are compared with diffusers' DDIMScheduler driving the
#: source network on the same noise (`fmconvert sample SOURCE --baseline ddim`)
SAMPLE_OUTPUT = {"sd15": "latent", "sd21": "latent", "zsnr": "latent", "sdxl": "latent", "pixart": "latent",
                 "kandinsky22": "latent", "if1": "pt"}


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max()).item()


def as_images(name, images):
    """A pipeline's output_type="pt" images as fmconvert's: (N, C, H, W) in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if name in ("kandinsky22", "if1"):  # these return their decoder's raw output in [-1, 1]
        images = (images * 0.5 + 0.5).clamp(0, 1)
    return images


def call(pipe, replica, output="images", **extra):
    """The pipeline's own __call__ on the seeded noise: its images, or (output="samples") its
    final sample in data space where it can hand that back."""
    output_type = SAMPLE_OUTPUT[replica.name] if output == "samples" else "pt"
    kwargs = dict(replica.call, num_inference_steps=STEPS, output_type=output_type,
                  generator=torch.Generator().manual_seed(SEED), **extra)
    if replica.noise_arg:
        kwargs[replica.noise_arg] = torch.randn((1, *replica.noise_shape), generator=torch.Generator().manual_seed(SEED))
    result = pipe(**kwargs).images
    return result if output == "samples" else as_images(replica.name, result)


def decoder_input(pipe, replica):
    """The final latents a pipeline that returns only images hands its decoder (LDM, DiT)."""
    decoder = getattr(pipe, "vqvae", None) or pipe.vae
    seen = []

    def spy(latents, *args, **kwargs):
        seen.append(latents.detach().clone())
        return type(decoder).decode(decoder, latents, *args, **kwargs)

    decoder.decode = spy
    try:
        call(pipe, replica)
    finally:
        del decoder.decode
    return seen[-1]


def source_ddim(folder, replica, output="images", **extra):
    source = DiffusionPipeline.from_pretrained(folder)
    source.scheduler = ddim_trailing(source.scheduler.config)
    return call(source, replica, output, **extra)


def sample(model, replica, tmp_path, *args):
    """`fmconvert sample MODEL` with the family's conditioning and the seeded noise: (samples, images)."""
    saved = tmp_path / "x.safetensors"
    ok("sample", model, "--steps", STEPS, "--num-images", 1, "--seed", SEED, *replica.sample_args,
       *embeddings(replica, tmp_path), *args, "--save-tensor", saved)
    tensors = load_file(saved)
    return tensors["samples"], tensors["images"]


def embeddings(replica, tmp_path):
    """--image-embeds FILE for a family conditioned on image embeddings."""
    if "image_embeds" not in replica.call:
        return ()
    path = tmp_path / "embeds.safetensors"
    save_file({k: replica.call[k].contiguous() for k in ("image_embeds", "negative_image_embeds")}, str(path))
    return ("--image-embeds", path)


@pytest.mark.parametrize("name", NAMES)
def test_family_converts_and_reproduces_its_ddim(name, tmp_path, tmp_path_factory):
    """Exactness is measured on the final samples in data space (latents or pixels): a random
    replica's decoder can amplify a 1e-7 difference in its input a thousandfold."""
    replica = REPLICAS[name]
    with one_thread():
        folder = build_replica(name, tmp_path_factory)
        out = tmp_path / "converted"
        summary = json.loads(ok("wrap", folder, "--out", out, "--json").stdout)  # no extra flag
        source_class = json.loads((folder / "model_index.json").read_text())["_class_name"]
        assert summary["pipeline_class"] == ("DDPMPipeline" if name == "ddpm" else source_class)
        reference_images = source_ddim(folder, replica)
        if name in SAMPLE_OUTPUT:
            reference = source_ddim(folder, replica, "samples")
        else:  # diffusers' DDIMScheduler on the source network; its images are the pipeline's
            reference, images = sample(folder, replica, tmp_path, "--baseline", "ddim")
            assert rel(images, reference_images) < 1e-5

        # stock diffusers loads it and the pipeline's own __call__ runs with its usual arguments
        converted = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        assert type(converted).__name__ == summary["pipeline_class"]
        if name == "ddpm":  # DDPMPipeline takes no grid: its default one, from s = 1
            assert torch.isfinite(torch.as_tensor(call(converted, replica))).all()
        else:
            converted.scheduler = FlowMatchEulerScheduler.from_config(converted.scheduler.config,
                                                                      timestep_spacing="trailing")
            if name in SAMPLE_OUTPUT:
                assert rel(call(converted, replica, "samples"), reference) < 1e-5
            else:
                source = DiffusionPipeline.from_pretrained(folder)
                source.scheduler = ddim_trailing(source.scheduler.config)
                assert rel(decoder_input(converted, replica), decoder_input(source, replica)) < 1e-5
            again = fmconvert.load(out)  # the same without running code from the folder
            again.scheduler = converted.scheduler
            assert torch.equal(call(again, replica), call(converted, replica))

        # fmconvert sample: the family's conditioning, Euler on DDIM's grid, decoded images
        samples, images = sample(out, replica, tmp_path, "--solver", "euler", "--grid", "trailing")
        assert samples.shape == reference.shape and rel(samples, reference) < 1e-5
        assert images.shape == reference_images.shape  # decoded: image channels, pixel size
        assert (images - reference_images).abs().mean() < 1e-3


def test_image_conditioned_sampling_through_the_python_api(tmp_path_factory):
    """Kandinsky 2.2: image embeddings (from its prior) through fmconvert.sampling.generate, guided."""
    from fmconvert.integration.conditioning import Conditioning
    from fmconvert.sampling.generate import generate
    from fmconvert.sampling.model import load_velocity_model

    replica = REPLICAS["kandinsky22"]
    with one_thread():
        folder = build_replica("kandinsky22", tmp_path_factory)
        reference = source_ddim(folder, replica, "samples")
        vm = load_velocity_model(str(folder))
        request = Conditioning(image_embeds=replica.call["image_embeds"],
                               negative_image_embeds=replica.call["negative_image_embeds"], guidance_scale=4.0)
        result = generate(vm, 1, 1, SEED, "euler", "trailing", STEPS, conditioning=request)
        assert rel(result.samples, reference) < 1e-5
        with pytest.raises(fmconvert.errors.UsageError, match="image embeddings"):
            generate(vm, 1, 1, SEED, "euler", "trailing", STEPS)


def test_guidance_rescale_is_exact_in_fmconvert_and_refused_in_the_stock_pipeline(tmp_path, tmp_path_factory):
    replica = REPLICAS["zsnr"]
    with one_thread():
        folder = build_replica("zsnr", tmp_path_factory)
        reference = source_ddim(folder, replica, "samples", guidance_rescale=0.7)
        assert rel(reference, source_ddim(folder, replica, "samples")) > 1e-3  # the option matters here
        out = tmp_path / "converted"
        ok("wrap", folder, "--out", out)
        converted = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        with pytest.raises(ValueError, match="guidance_rescale=0.7 .*fmconvert sample --guidance-rescale 0.7"):
            call(converted, replica, guidance_rescale=0.7)
        samples, _ = sample(out, replica, tmp_path, "--solver", "euler", "--grid", "trailing", "--guidance-rescale", 0.7)
        assert rel(samples, reference) < 1e-5
        assert "--guidance-rescale" in error(2, "sample", build_replica("dit", tmp_path_factory), "--steps", 1,
                                             "--class-label", 1, "--guidance-scale", 2, "--guidance-rescale", 0.5)


def _copy(name, tmp_path, tmp_path_factory):
    copy = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(build_replica(name, tmp_path_factory), copy)
    return copy


def _edit(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tmp_path_factory):
    out = tmp_path / "out"
    with one_thread():
        fixed = _copy("ddpm", tmp_path, tmp_path_factory)  # DDPMPipeline would step with all 6 channels
        _edit(fixed / "unet" / "config.json", out_channels=6)
        line = error(1, "wrap", fixed, "--out", out)
        assert "learned variance" in line and "fixed_large" in line
        learned = _copy("sd15", tmp_path, tmp_path_factory)  # the scheduler promises a variance half that is not there
        _edit(learned / "scheduler" / "scheduler_config.json", variance_type="learned_range")
        assert "learned_range" in error(1, "wrap", learned, "--out", out)

        missing = _copy("sd15", tmp_path, tmp_path_factory)
        shutil.rmtree(missing / "vae")
        line = error(1, "wrap", missing, "--out", out)
        assert "'vae'" in line and "incomplete" in line

        unknown = _copy("sd21", tmp_path, tmp_path_factory)
        _edit(unknown / "model_index.json", _class_name="StableDiffusionUpscalePipeline")
        line = error(1, "wrap", unknown, "--out", out)
        assert "StableDiffusionUpscalePipeline" in line and "UNet2DConditionModel" in line and "DiTPipeline" in line
        assert not out.exists()

        dit = build_replica("dit", tmp_path_factory)
        assert "out of range" in error(2, "sample", dit, "--steps", 1, "--class-label", 1000)
        assert "unknown class label" in error(2, "sample", dit, "--steps", 1, "--class-label", "no-such-thing")
        assert "images only" in error(2, "sample", dit, "--steps", 1, "--class-label", 1, "--height", 64)
        line = error(2, "sample", build_replica("ddpm", tmp_path_factory), "--steps", 1, "--prompt", "a cat",
                     "--out", tmp_path / "pics")
        assert "--prompt 'a cat' cannot be honoured" in line and not (tmp_path / "pics").exists()
        assert "agree compares unconditional" in error(2, "agree", build_replica("sd15", tmp_path_factory))
        line = error(2, "sample", build_replica("sd15", tmp_path_factory), "--steps", 1, "--class-label", 3)
        assert "takes --guidance-rescale ..., --negative-prompt ..., --prompt ...; --class-label ... cannot" in line


def test_refused_before_any_work(tmp_path, tmp_path_factory):
    """Options a family cannot honour, or that would do nothing, are usage errors before a
    shard, a manifest or an image is written."""
    with one_thread():
        dit, kandinsky = build_replica("dit", tmp_path_factory), build_replica("kandinsky22", tmp_path_factory)
        sd = build_replica("sd15", tmp_path_factory)
        embeds = tmp_path / "three.safetensors"
        width = REPLICAS["kandinsky22"].call["image_embeds"].shape[1]
        save_file({"image_embeds": torch.randn(3, width), "negative_image_embeds": torch.randn(1, width)}, str(embeds))
        narrow = tmp_path / "narrow.safetensors"
        save_file({"image_embeds": torch.randn(1, 5)}, str(narrow))
        shards = tmp_path / "shards"
        cases = [
            ((sd, "--prompt", "x", "--image-embeds", embeds), "--image-embeds (negative_image_embeds) ... cannot be honoured"),
            ((kandinsky, "--image-embeds", embeds, "--guidance-scale", 4, "--num-images", 5), "3 embeddings for 5"),
            ((kandinsky, "--image-embeds", narrow), f"the model takes (1 or N, {width})"),
            ((dit, "--class-label", 5000), "out of range"),
            ((dit, "--guidance-scale", 4), "pass --class-label"),
            ((sd, "--prompt", "x", "--negative-prompt", "y"), "--negative-prompt 'y' has no effect at --guidance-scale 1.0"),
            ((sd, "--prompt", "x", "--guidance-rescale", 0.5), "--guidance-rescale 0.5 has no effect at --guidance-scale 1.0"),
            ((sd, "--height", -16), "must be a positive integer"),
            ((sd, "--height", 0), "must be a positive integer"),
        ]
        for args, words in cases:
            line = error(2, "sample", *args, "--steps", 1, "--samples-dir", shards, "--out", tmp_path / "pics")
            assert words in line, line
            assert not shards.exists() and not (tmp_path / "pics").exists()
        out = tmp_path / "converted"
        ok("wrap", build_replica("ldm", tmp_path_factory), "--out", out)
        assert "--baseline 'ddim'" in error(2, "sample", out, "--baseline", "ddim", "--steps", 1)
        assert "--features 'inception'" in error(2, "fid", out, "--reference", "builtin:digits", "--steps", 1,
                                               "--num-images", 4)


def test_option_refusals_come_before_any_weight_is_read(tmp_path, tmp_path_factory):
    """What a family cannot honour is refused from the configs: on a copy whose weights are cut
    short, each is still the usage error, not a failure to load (an SDXL-size load per wrong flag)."""
    broken = tmp_path / "sd15-truncated"
    shutil.copytree(build_replica("sd15", tmp_path_factory), broken)
    for weights in broken.rglob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:64])
    cases = [(("--guidance-rescale", 0.7), "has no effect at --guidance-scale 1.0"),
             (("--negative-prompt", "y"), "has no effect at --guidance-scale 1.0"),
             (("--class-label", 3), "--class-label ... cannot be honoured"),
             (("--height", -16), "--height must be a positive integer")]
    for args, words in cases:
        assert words in error(2, "sample", broken, "--prompt", "x", "--steps", 1, *args)
    assert "cannot load" in error(1, "sample", broken, "--prompt", "x", "--steps", 1)  # (and the weights are bad)


def test_dtype_options_and_one_step(tmp_path, tmp_path_factory):
    """Embeddings follow the network's dtype; the converted scheduler keeps its parent's options
    and gives (prev, x̂0) as a tuple, so PixArt's one-step path runs."""
    with one_thread():
        replica = REPLICAS["kandinsky22"]
        result = ok("sample", build_replica("kandinsky22", tmp_path_factory), "--dtype", "bfloat16", "--steps", 2,
                    "--num-images", 1, "--guidance-scale", 4, *embeddings(replica, tmp_path), "--json")
        assert json.loads(result.stdout)["conditioning"]["guidance_scale"] == 4.0
        scheduler = FlowMatchEulerScheduler.from_config(FlowMatchEulerScheduler().config, use_karras_sigmas=True,
                                                        shift_terminal=0.1)
        assert scheduler.config.use_karras_sigmas and scheduler.config.shift_terminal == 0.1
        out = tmp_path / "pixart"
        ok("wrap", build_replica("pixart", tmp_path_factory), "--out", out)
        pipe = fmconvert.load(out)
        one = pipe(**REPLICAS["pixart"].call, num_inference_steps=1, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(one).all()


def test_class_labels_by_name_and_cycled_by_index(tmp_path, tmp_path_factory):
    with one_thread():
        dit = build_replica("dit", tmp_path_factory)
        id2label = json.loads((dit / "model_index.json").read_text())["id2label"]
        name = id2label["7"].split(",")[0].strip()
        by_name, by_id = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
        ok("sample", dit, "--steps", 2, "--num-images", 2, "--class-label", name, "--class-label", 2,
           "--save-tensor", by_name)
        ok("sample", dit, "--steps", 2, "--num-images", 2, "--batch-size", 1, "--class-label", 7, "--class-label", 2,
           "--save-tensor", by_id)
        assert rel(load_file(by_name)["samples"], load_file(by_id)["samples"]) < 1e-6


def test_diffusers_pipeline_modules_are_not_remote_code():
    from fmconvert.integration.source import trusted_library

    assert trusted_library("stable_diffusion") and trusted_library("deepfloyd_if") and trusted_library("diffusers")
    assert not trusted_library("my_pipeline") and not trusted_library("os.path") and not trusted_library("../evil")


def test_the_math_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import fmconvert.math.paths, fmconvert.math.predictions, fmconvert.math.conversion, fmconvert.math.grids\n"
            "import fmconvert.math.solvers, fmconvert.math.descriptions as d\n"
            "import torch\n"
            "p = fmconvert.math.paths.path_from_config(d.discrete_vp_config({'beta_schedule': 'squaredcos_cap_v2',"
            " 'rescale_betas_zero_snr': True}))\n"
            "print(len(fmconvert.math.grids.time_grid('trailing', 4, p)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "5", result.stderr
    blocked = subprocess.run([sys.executable, "-c", "import sys; sys.modules['diffusers'] = None; import fmconvert.integration.adapters"],
                             capture_output=True, text=True)
    assert blocked.returncode != 0  # the check above can fail: the glue does need diffusers


def test_one_of_height_and_width_without_a_sample_size_is_a_usage_error():
    """A denoiser config with no sample_size and only --height: a one-line usage error (was a TypeError)."""
    from fmconvert.errors import UsageError
    from fmconvert.integration.families import PixelUnconditional

    with pytest.raises(UsageError, match=r"pass height=\.\.\. and width=\.\.\."):
        PixelUnconditional().sample_size(None, {}, 64, None)
    assert PixelUnconditional().sample_size(None, {"sample_size": 8}, 16, None) == (16, 8)
