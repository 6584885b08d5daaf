"""The names ``import fmconvert`` offers: every one resolves (imported on first use), and a name renamed
for what it does still resolves under its old spelling, with a DeprecationWarning naming the new one."""

import subprocess
import sys

import pytest

import fmconvert


@pytest.mark.parametrize("name", fmconvert.__all__)
def test_every_public_name_resolves(name):
    assert getattr(fmconvert, name) is not None


@pytest.mark.parametrize("old, new", sorted(fmconvert._RENAMED.items()))
def test_a_renamed_name_warns_and_resolves(old, new):
    with pytest.warns(DeprecationWarning, match=f"fmconvert.{new}"):
        assert getattr(fmconvert, old) is getattr(fmconvert, new)


def test_importing_fmconvert_imports_neither_torch_nor_diffusers():
    code = "import sys, fmconvert; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_the_adapters_paths_are_named_paths():
    """A PathAdapter's Gaussian paths are ``source_path`` and ``target_path`` (as in its config); "source" names a
    resolved model reference (fmconvert.integration.source.Source). The old attribute names still resolve, with a
    DeprecationWarning naming the new ones."""
    from conftest import make_unet

    from fmconvert import RectifiedFlow, VelocityAdapter

    adapter = VelocityAdapter.from_diffusion(make_unet(), {"num_train_timesteps": 1000})
    assert isinstance(adapter.target_path, RectifiedFlow) and adapter.config.target_path == adapter.target_path.to_config()
    with pytest.warns(DeprecationWarning, match="source_path"):
        assert adapter.source is adapter.source_path
    with pytest.warns(DeprecationWarning, match="target_path"):
        assert adapter.target is adapter.target_path
