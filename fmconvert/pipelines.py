"""A module path that converted folders import, kept for every folder ever written.

The first release's scheduler shim was ``from fmconvert.pipelines import FlowMatchEulerScheduler``
(:data:`fmconvert.integration.source.SHIM_TEXTS`; tests/integration/test_folder_contract.py loads such a
folder in stock diffusers). :func:`load` was public here too. Both live in
:mod:`fmconvert.integration`; nothing else belongs here.
"""

from fmconvert.integration.folder import load
from fmconvert.integration.schedulers import FlowMatchEulerScheduler

__all__ = ["FlowMatchEulerScheduler", "load"]
