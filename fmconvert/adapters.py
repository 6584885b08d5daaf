"""A module path that converted folders import, kept for every folder ever written.

A converted folder's ``adapters.py`` shim is ``from fmconvert.adapters import DiffusionAdapter,
VelocityAdapter`` (:data:`fmconvert.integration.source.SHIM_TEXTS` lists every shim text
fmconvert has written; tests/integration/test_folder_contract.py loads a folder with each in stock diffusers).
The classes live in :mod:`fmconvert.integration.adapters`; nothing else belongs here.
"""

from fmconvert.integration.adapters import DiffusionAdapter, PathAdapter, VelocityAdapter

__all__ = ["DiffusionAdapter", "PathAdapter", "VelocityAdapter"]
