"""`fmconvert push` against a loopback fake Hub (tests/fakehub.py) with the real HfApi."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from fmconvert.cli import app

runner = CliRunner()
TOKEN = "hf_fmconvertTestToken0123456789"


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


def _one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1


def test_without_a_flag_the_hub_picks_the_visibility(hub, converted):
    # create_repo(private=None) sends no visibility; private=False sent "public", overriding the Hub
    result = runner.invoke(app, ["push", str(converted), "someone/plain", "--token", TOKEN, "--json"])
    assert result.exit_code == 0, result.stderr
    (payload,) = hub.create_payloads
    assert "visibility" not in payload and "private" not in payload
    assert hub.repos["someone/plain"].private is False and json.loads(result.stdout)["private"] is False


def test_an_organisation_private_by_default_stays_private(hub, converted):
    hub.private_by_default = True
    result = runner.invoke(app, ["push", str(converted), "org/model", "--token", TOKEN, "--json"])
    assert result.exit_code == 0, result.stderr
    assert hub.repos["org/model"].private is True
    assert json.loads(result.stdout)["private"] is True


def test_public_creates_a_public_repo_even_where_the_default_is_private(hub, converted):
    hub.private_by_default = True
    result = runner.invoke(app, ["push", str(converted), "org/open", "--token", TOKEN, "--public", "--json"])
    assert result.exit_code == 0, result.stderr
    assert [p.get("visibility") for p in hub.create_payloads] == ["public"]
    assert hub.repos["org/open"].private is False and json.loads(result.stdout)["private"] is False


@pytest.mark.parametrize("existing_private, flag", [(False, "--private"), (True, "--public")])
def test_a_flag_against_an_existing_repo_is_refused_before_any_upload(hub, converted, existing_private, flag):
    repo = hub.existing("someone/there", private=existing_private)
    result = runner.invoke(app, ["push", str(converted), "someone/there", "--token", TOKEN, flag, "--json"])
    assert result.exit_code == 2 and result.stdout == ""  # no JSON claiming a visibility the repo does not have
    assert _one_line(result.stderr) and f"hf repos settings someone/there {flag}" in result.stderr
    assert "nothing was uploaded" in result.stderr and TOKEN not in result.stderr
    assert len(repo.commits) == 1 and repo.private is existing_private  # never uploaded to, never flipped
    assert not [path for method, path in hub.requests if method in ("POST", "PUT") and not path.endswith("/create")]


def test_json_private_is_read_back_from_the_hub(hub, converted):
    hub.existing("someone/secret", private=True)  # private already: a push without a flag keeps it so
    result = runner.invoke(app, ["push", str(converted), "someone/secret", "--token", TOKEN, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["private"] is True
    commit = max(i for i, (method, path) in enumerate(hub.requests) if path.endswith("/commit/main"))
    assert ("GET", "/api/models/someone/secret") in hub.requests[commit + 1:]  # asked after the upload


@pytest.mark.parametrize("command", ["push", "wrap"])
def test_private_and_public_together_are_refused(hub, converted, ddpm_folder, tmp_path, command):
    args = (["push", str(converted), "someone/both"] if command == "push"
            else ["wrap", str(ddpm_folder), "--out", str(tmp_path / "w"), "--push", "someone/both"])
    result = runner.invoke(app, [*args, "--private", "--public", "--token", TOKEN])
    assert result.exit_code == 2 and _one_line(result.stderr)
    assert "--private and --public" in result.stderr
    assert hub.requests == [] and not (tmp_path / "w").exists()  # wrap refuses before converting


@pytest.mark.parametrize("flags", [["--private"], ["--public"], ["--token", TOKEN]])
def test_wrap_publishing_options_without_push_are_refused(tmp_path, ddpm_folder, flags):
    result = runner.invoke(app, ["wrap", str(ddpm_folder), "--out", str(tmp_path / "w"), *flags])
    assert result.exit_code == 2 and _one_line(result.stderr) and "--push" in result.stderr
    assert flags[0] in result.stderr and TOKEN not in result.stderr and not (tmp_path / "w").exists()


PROBE = """
import json, sys
sys.argv = ["fmconvert", *json.loads(sys.argv[1])]
from fmconvert.cli import main
try:
    main()
    code = 0
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "diffusers") if m in sys.modules)}))
"""


@pytest.mark.parametrize("case, code, says", [
    ("offline", 1, "offline mode is on"),
    ("bad repo id", 2, "not a valid Hub repo id"),
    ("private and public", 2, "--private and --public"),
    ("missing folder", 2, "does not exist"),
    ("missing report", 2, "has no report.md"),
    ("wrap --push offline", 1, "offline mode is on"),
])
def test_refusals_that_need_no_model_import_neither_torch_nor_diffusers(tmp_path, case, code, says):
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    args = {"offline": ["push", str(folder), "owner/name", "--token", TOKEN],
            "bad repo id": ["push", str(folder), "owner/na me/x"],
            "private and public": ["push", str(folder), "owner/name", "--private", "--public"],
            "missing folder": ["push", str(tmp_path / "nowhere"), "owner/name"],
            "missing report": ["push", str(folder), "owner/name", "--report", str(tmp_path)],
            "wrap --push offline": ["wrap", "builtin:digits-eps", "--out", str(tmp_path / "w"), "--push", "owner/name"],
            }[case]
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    assert probe == {"code": code, "heavy": []}, (probe, run.stderr)
    assert _one_line(run.stderr) and says in run.stderr and TOKEN not in run.stderr
    assert not (tmp_path / "w").exists()
