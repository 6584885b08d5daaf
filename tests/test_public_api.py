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
