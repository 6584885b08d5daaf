"""Conversion at the scale of real checkpoints: `wrap` keeps the source network's files byte for
byte (dtype, variants, shards), never loads the weights, and the converted folder loads as the
source does; folders of the earlier layout still load."""

import filecmp
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import error, make_unet, ok
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, ModelMixin, UNet2DModel
from replicas import build_replica

import fmconvert


def source(folder, dtype=torch.float16, variant=None, max_shard_size="10GB", plain=True):
    """A DDPMPipeline folder whose UNet is saved in ``dtype`` (and, with ``variant``, also as that
    variant in float16); ``plain=False`` leaves only the variant files."""
    unet = make_unet(seed=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    for name in os.listdir(folder / "unet"):
        if name != "config.json":
            os.remove(folder / "unet" / name)
    if plain:
        unet.to(dtype).save_pretrained(folder / "unet", max_shard_size=max_shard_size)
    if variant:
        unet.to(torch.float16).save_pretrained(folder / "unet", variant=variant, max_shard_size=max_shard_size)
    return folder


@pytest.mark.parametrize("shards", ["10GB", "40KB"])
def test_network_files_are_the_source_bytes_in_their_dtype(tmp_path, shards):
    src = source(tmp_path / "src", torch.float16, max_shard_size=shards)
    out = tmp_path / "out"
    summary = json.loads(ok("wrap", src, "--out", out, "--json").stdout)
    network = out / "unet" / "network"
    names = sorted(os.listdir(network))
    assert names == sorted(summary["network_files"])
    assert (len(names) > 3) == (shards == "40KB")  # config, index and shards when sharded
    for name in names:
        assert filecmp.cmp(src / "unet" / name, network / name, shallow=False), name
        if name != "config.json":  # the same file, linked: no bytes written
            assert os.stat(src / "unet" / name).st_ino == os.stat(network / name).st_ino
    adapter_config = (out / "unet" / "config.json").stat().st_size
    assert adapter_config < 100_000  # all the conversion adds besides the small files
    # loaded as the source loads: same dtype, same weights
    loaders = (lambda dtype: DiffusionPipeline.from_pretrained(out, trust_remote_code=True, dtype=dtype),
               lambda dtype: fmconvert.load(out, dtype=dtype))
    for load in loaders:
        for dtype in (None, torch.float16):
            converted = load(dtype)
            original = DiffusionPipeline.from_pretrained(src, dtype=dtype)
            assert converted.unet.model.dtype == original.unet.dtype
            for key, value in original.unet.state_dict().items():
                assert torch.equal(converted.unet.model.state_dict()[key], value), key


def test_wrap_reads_configs_only(tmp_path, monkeypatch):
    src = source(tmp_path / "src", torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("wrap loaded weights")

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    ok("wrap", src, "--out", tmp_path / "out")
    monkeypatch.undo()
    assert DiffusionPipeline.from_pretrained(tmp_path / "out", trust_remote_code=True).unet.model.dtype == torch.float32


def test_wrap_imports_neither_torch_nor_diffusers(tmp_path, tmp_path_factory):
    """--to velocity writes the folder from JSON configs: its time and memory are the file
    system's, whatever the model's size (torch and diffusers alone cost ~0.8 GB and seconds)."""
    names = ("ddpm", "sdxl", "dit", "kandinsky22")
    jobs = [[str(build_replica(name, tmp_path_factory)), str(tmp_path / name)] for name in names]
    script = """
import json, sys
from typer.testing import CliRunner
from fmconvert.cli import app
codes = [CliRunner().invoke(app, ["wrap", src, "--out", out]).exit_code for src, out in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "imported": sorted(m for m in ("torch", "diffusers") if m in sys.modules)}))
"""
    run = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout.splitlines()[-1]) == {"codes": [0] * len(names), "imported": []}
    for name in names:  # and what it wrote loads as a pipeline
        components = fmconvert.load(tmp_path / name).components.values()
        assert any(isinstance(c, fmconvert.VelocityAdapter) for c in components), name


def test_converted_config_mirrors_the_network_with_its_defaults(tmp_path):
    """The adapter's config mirrors the network's as loaded (pipelines read sample_size,
    in_channels, ...), keys a config.json leaves to the class's defaults included."""
    src = source(tmp_path / "src", torch.float32)
    config = json.loads((src / "unet" / "config.json").read_text())
    for key in ("norm_eps", "dropout", "time_embedding_type"):
        del config[key]
    (src / "unet" / "config.json").write_text(json.dumps(config))
    ok("wrap", src, "--out", tmp_path / "out")
    original = DiffusionPipeline.from_pretrained(src).unet.config
    converted = fmconvert.load(tmp_path / "out").unet.config
    assert all(converted[k] == v for k, v in original.items() if not k.startswith("_"))


def test_weight_file_names_are_diffusers(tmp_path):
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
    from diffusers.utils import _add_variant as diffusers_add_variant

    from fmconvert.integration import source as reading

    ours = (reading.SAFE_WEIGHTS_NAME, reading.SAFE_WEIGHTS_INDEX_NAME, reading.WEIGHTS_NAME,
            reading.WEIGHTS_INDEX_NAME)
    assert ours == (SAFETENSORS_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    for name in ours:
        for variant in (None, "fp16", "bf16"):
            assert reading._add_variant(name, variant) == diffusers_add_variant(name, variant)


def test_variants_and_declared_dtype(tmp_path):
    src = source(tmp_path / "src", torch.float32, variant="fp16")
    plain, fp16 = tmp_path / "plain", tmp_path / "fp16"
    ok("wrap", src, "--out", plain)
    assert sorted(os.listdir(plain / "unet" / "network")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ok("wrap", src, "--out", fp16, "--variant", "fp16", "--dtype", "float16")
    assert sorted(os.listdir(fp16 / "unet" / "network")) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    config = json.loads((fp16 / "unet" / "config.json").read_text())
    assert config["network_variant"] == "fp16" and config["network_dtype"] == "float16"
    loaded = DiffusionPipeline.from_pretrained(fp16, trust_remote_code=True)  # no dtype given: the declared one
    reference = UNet2DModel.from_pretrained(src / "unet", variant="fp16", dtype=torch.float16)
    assert loaded.unet.model.dtype == torch.float16
    assert all(torch.equal(loaded.unet.model.state_dict()[k], v) for k, v in reference.state_dict().items())
    assert fmconvert.load(fp16, dtype=torch.float32).unet.model.dtype == torch.float32  # the caller's dtype wins

    line = error(2, "wrap", src, "--out", tmp_path / "x", "--variant", "bf16")
    assert "has no weights of --variant 'bf16'" in line and "fp16" in line
    only = source(tmp_path / "only", variant="fp16", plain=False)
    assert "pass --variant 'fp16'" in error(2, "wrap", only, "--out", tmp_path / "x")
    assert "--dtype" in error(2, "wrap", src, "--out", tmp_path / "x", "--dtype", "float8")
    assert not (tmp_path / "x").exists()


def test_folders_of_the_earlier_layout_still_load(tmp_path):
    """fmconvert < 0.2 saved the adapter with diffusers' own save_pretrained: the weights under
    model.-prefixed keys beside the adapter config."""
    src = source(tmp_path / "src", torch.float32)
    out = tmp_path / "out"
    ok("wrap", src, "--out", out)
    new = fmconvert.load(out)
    legacy_unet = out / "unet"
    for path in sorted(legacy_unet.rglob("*"), reverse=True):
        if path.name != "fmconvert_adapter.py":
            path.unlink() if path.is_file() else path.rmdir()
    ModelMixin.save_pretrained(new.unet, legacy_unet)  # the earlier layout
    assert "network" not in os.listdir(legacy_unet)
    config = json.loads((legacy_unet / "config.json").read_text())  # and its source schedule as an ᾱ table
    config["source_path"] = {"kind": "discrete_vp", "alphas_cumprod": new.unet.source_path.alphas_cumprod.tolist()}
    (legacy_unet / "config.json").write_text(json.dumps(config))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for old in (fmconvert.load(out), DiffusionPipeline.from_pretrained(out, trust_remote_code=True)):
        assert torch.equal(old.unet(x, torch.tensor([300.0])).sample, new.unet(x, torch.tensor([300.0])).sample)
    ok("sample", out, "--steps", 2, "--num-images", 1)
    # an adapter config with neither network/ nor weights: one line, re-run wrap
    (legacy_unet / "diffusion_pytorch_model.safetensors").unlink()
    line = error(1, "sample", out, "--steps", 1)
    assert "fmconvert wrap" in line


def test_pickle_variant_is_the_one_converted_and_dtype_wins_over_torch_dtype(tmp_path):
    """--allow-pickle --variant fp16 turns the fp16 .bin (not the plain one) into safetensors;
    from_pretrained takes dtype over torch_dtype, as diffusers does."""
    src = source(tmp_path / "src", torch.float32, plain=True)
    unet = UNet2DModel.from_pretrained(src / "unet")
    for name in os.listdir(src / "unet"):
        if name != "config.json":
            os.remove(src / "unet" / name)
    unet.save_pretrained(src / "unet", safe_serialization=False)
    half = make_unet(seed=9).to(torch.float16)
    half.save_pretrained(src / "unet", safe_serialization=False, variant="fp16")
    out = tmp_path / "out"
    ok("wrap", src, "--out", out, "--allow-pickle", "--variant", "fp16")
    loaded = fmconvert.load(out).unet
    assert all(torch.equal(loaded.model.state_dict()[k].half(), v) for k, v in half.state_dict().items())
    from fmconvert.integration.adapters import VelocityAdapter

    both = VelocityAdapter.from_pretrained(out / "unet", dtype=torch.float16, torch_dtype=torch.float32)
    assert both.model.dtype == torch.float16
