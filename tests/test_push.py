"""`fmconvert push` against a loopback fake Hub (tests/fakehub.py) with the real HfApi."""

import json
import time

import pytest
import torch
from fakehub import FakeHub
from typer.testing import CliRunner

from fmconvert.cli import app

runner = CliRunner()
TOKEN = "hf_fmconvertTestToken0123456789"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub() as fake:
        import huggingface_hub.constants as constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        import huggingface_hub.hf_api as hf_api

        monkeypatch.setattr(hf_api.api, "endpoint", fake.endpoint)  # the module-level client diffusers uses
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield fake


@pytest.fixture
def converted(tmp_path, ddpm_folder):
    out = tmp_path / "converted"
    result = runner.invoke(app, ["wrap", str(ddpm_folder), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def test_push_then_stock_diffusers_loads_it_from_the_hub(hub, converted):
    result = runner.invoke(app, ["push", str(converted), "someone/ddpm-velocity", "--token", TOKEN, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["repo_id"] == "someone/ddpm-velocity" and summary["commit_oid"]
    assert summary["commit_url"].endswith(summary["commit_oid"])
    assert "unet/network/diffusion_pytorch_model.safetensors" in summary["files"] and "README.md" in summary["files"]
    assert TOKEN not in result.stdout + result.stderr  # never printed
    repo = hub.repos["someone/ddpm-velocity"]
    assert len(repo.commits) == 2  # the empty initial one, then exactly one upload commit
    assert sorted(repo.snapshots[repo.branches["main"]]) == summary["files"]

    from diffusers import DiffusionPipeline

    remote = DiffusionPipeline.from_pretrained("someone/ddpm-velocity", trust_remote_code=True)
    local = DiffusionPipeline.from_pretrained(converted, trust_remote_code=True)
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="pt")
    a = remote(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = local(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(a, b)
    assert any(path.startswith("/someone/ddpm-velocity/resolve/") for _, path in hub.requests)
    from fmconvert import VelocityAdapter  # the component alone, by Hub id: its config and network/

    alone = VelocityAdapter.from_pretrained("someone/ddpm-velocity", subfolder="unet")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(alone(x, torch.tensor([250.0])).sample, local.unet(x, torch.tensor([250.0])).sample)


def test_push_twice_and_private(hub, converted):
    for _ in range(2):
        result = runner.invoke(app, ["push", str(converted), "someone/twice", "--token", TOKEN, "--private"])
        assert result.exit_code == 0, result.stderr
    assert len(hub.repos["someone/twice"].commits) == 3
    assert hub.repos["someone/twice"].private
    assert all(p.get("visibility") == "private" or p.get("private") is True for p in hub.create_payloads)


def test_wrap_with_push(hub, tmp_path, ddpm_folder):
    result = runner.invoke(app, ["wrap", str(ddpm_folder), "--out", str(tmp_path / "o"), "--push", "someone/wrapped",
                                 "--token", TOKEN, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["push"]["repo_id"] == "someone/wrapped"
    assert "model_index.json" in hub.repos["someone/wrapped"].snapshots[hub.repos["someone/wrapped"].branches["main"]]


def test_model_card_carries_the_report(hub, converted, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# fmconvert report: x\n\n| s | rel |\n|---|---|\n| 0.5 | 1e-9 |\n\n![samples](samples.png)\n")
    (report / "samples.png").write_bytes(b"\x89PNG fake")
    result = runner.invoke(app, ["push", str(converted), "someone/carded", "--token", TOKEN, "--report", str(report)])
    assert result.exit_code == 0, result.stderr
    files = hub.repos["someone/carded"].snapshots[hub.repos["someone/carded"].branches["main"]]
    card = files["README.md"].decode()
    assert "library_name: diffusers" in card and "- flow-matching" in card and "- fmconvert" in card
    assert "trust_remote_code=True" in card and "fmconvert.load" in card
    assert "| 0.5 | 1e-9 |" in card and "![samples](eval/samples.png)" in card and "eval/samples.png" in files
    assert (converted / "README.md").read_text() != card  # the local folder is left as it was


def test_not_a_converted_folder_is_refused_before_any_request(hub, ddpm_folder):
    result = runner.invoke(app, ["push", str(ddpm_folder), "someone/nope", "--token", TOKEN])
    assert result.exit_code == 1 and "fmconvert wrap" in result.stderr
    assert hub.requests == []


def test_offline_push_fails_fast(monkeypatch, converted):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    result = runner.invoke(app, ["push", str(converted), "someone/offline", "--token", TOKEN])
    assert time.perf_counter() - started < 2
    assert result.exit_code == 1 and "offline" in result.stderr and TOKEN not in result.stderr
