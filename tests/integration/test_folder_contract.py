"""A folder fmconvert wrote keeps loading: every shim text it has ever written (SHIM_TEXTS) is
imported by stock diffusers in a fresh process, and fmconvert's own safety check accepts exactly
those texts."""

import json
import subprocess
import sys

import pytest
from conftest import ok

from fmconvert.errors import FmconvertError
from fmconvert.integration.source import ADAPTER_SHIM, SCHEDULER_SHIM, SHIM_TEXTS, inspect_source

#: loads each folder with stock diffusers, in a process where fmconvert has registered nothing
STOCK_LOAD = """
import json, sys
from diffusers import DiffusionPipeline
for folder in sys.argv[1:]:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    print(json.dumps({"unet": type(pipe.unet).__name__, "scheduler": type(pipe.scheduler).__name__}))
"""


def _with_shims(tmp_path, converted, texts: dict[str, str], name: str):
    """A copy of ``converted`` whose shim modules hold ``texts`` ({module name: text})."""
    import shutil

    folder = tmp_path / name
    shutil.copytree(converted, folder)
    for module, text in texts.items():
        for path in folder.rglob(f"{module}.py"):
            path.write_text(text)
    return folder


@pytest.fixture(scope="module")
def converted_sd(sd_folder, tmp_path_factory):
    """A converted Stable Diffusion folder: both shims (adapter and scheduler)."""
    out = tmp_path_factory.mktemp("contract") / "sd-velocity"
    ok("wrap", sd_folder, "--out", out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"][0] == ADAPTER_SHIM and index["scheduler"] == [SCHEDULER_SHIM, "FlowMatchEulerScheduler"]
    return out


def test_every_shim_text_ever_written_loads_in_stock_diffusers(tmp_path, converted_sd):
    folders = [_with_shims(tmp_path, converted_sd, {ADAPTER_SHIM: adapter, SCHEDULER_SHIM: scheduler}, f"v{i}-{j}")
               for i, adapter in enumerate(SHIM_TEXTS[ADAPTER_SHIM])
               for j, scheduler in enumerate(SHIM_TEXTS[SCHEDULER_SHIM])]
    assert len(folders) == 3  # (the adapter's one text, the scheduler's three: the first release's among them)
    assert "from fmconvert.pipelines import FlowMatchEulerScheduler  # noqa: F401\n" in SHIM_TEXTS[SCHEDULER_SHIM]
    result = subprocess.run([sys.executable, "-c", STOCK_LOAD, *map(str, folders)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert loaded == [{"unet": "VelocityAdapter", "scheduler": "FlowMatchEulerScheduler"}] * len(folders)
    for folder in folders:  # and fmconvert's own check and loader take them
        inspect_source(str(folder))
        ok("sample", folder, "--steps", 1, "--num-images", 1, "--prompt", "a")


def test_the_safety_check_accepts_exactly_the_shim_texts(tmp_path, converted_sd):
    """A shim module holding anything else (another import path, an edit, code) is code from the
    folder: refused without --trust-remote-code, whatever stock diffusers would make of it."""
    current = SHIM_TEXTS[SCHEDULER_SHIM][0]
    for i, text in enumerate(["from fmconvert.samplers import FlowMatchEulerScheduler  # noqa: F401\n",  # never written
                              current + "import os\n"]):
        folder = _with_shims(tmp_path, converted_sd, {SCHEDULER_SHIM: text}, f"other-{i}")
        with pytest.raises(FmconvertError, match="contains code"):
            inspect_source(str(folder))
        inspect_source(str(folder), trust_remote_code=True)
