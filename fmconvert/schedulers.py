"""A module path that converted folders import, kept for every folder ever written.

A converted folder's ``scheduler.py`` shim imports its scheduler classes from here
(:data:`fmconvert.integration.source.SHIM_TEXTS` lists every shim text fmconvert has written;
tests/integration/test_folder_contract.py loads a folder with each in stock diffusers). The classes live in
:mod:`fmconvert.integration.schedulers`; nothing else belongs here.
"""

from fmconvert.integration.schedulers import (
    FlowDEISMultistepScheduler,
    FlowDPMSolverMultistepScheduler,
    FlowMatchEulerScheduler,
    FlowPipelineDDIMScheduler,
    FlowPipelineDPMSolverMultistepScheduler,
    FlowPipelineEulerDiscreteScheduler,
    FlowUniPCMultistepScheduler,
)

__all__ = ["FlowDEISMultistepScheduler", "FlowDPMSolverMultistepScheduler", "FlowMatchEulerScheduler",
           "FlowPipelineDDIMScheduler", "FlowPipelineDPMSolverMultistepScheduler", "FlowPipelineEulerDiscreteScheduler",
           "FlowUniPCMultistepScheduler"]
