"""LoRA (``lora_rank`` > 0, peft): low-rank adapters on the modules named ``lora_targets`` of the
source's network; only they train, and they are merged into the weights that are written (a
plain network that loads without peft).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from fmconvert.errors import UsageError
from fmconvert.training.settings import LORA_TARGETS

if TYPE_CHECKING:
    from fmconvert.training.settings import TrainSettings


def require_peft() -> None:
    """UsageError (one line) where peft, which LoRA needs, is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError("LoRA needs peft, which is not installed: pip install 'fmconvert[train]' "
                         "(or pip install peft), or train the whole network (lora_rank=0)") from None


def add_lora(network: torch.nn.Module, settings: TrainSettings) -> None:
    """LoRA adapters of ``settings.lora_rank`` on the modules named ``settings.lora_targets``
    (peft; A from torch's generator, which :func:`~fmconvert.training.loop.train` seeds, and B = 0,
    so the network computes what it did); only they train. UsageError where no module has those
    names."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha or settings.lora_rank,
                        target_modules=list(settings.lora_targets), init_lora_weights=True)
    try:
        inject_adapter_in_model(config, network)
    except ValueError as error:
        raise UsageError(f"lora_targets={settings.lora_targets!r}: {str(error).strip().splitlines()[0]}") from None
    for name, parameter in network.named_parameters():
        parameter.requires_grad_("lora_" in name)


def check_lora_targets(network: torch.nn.Module, settings: TrainSettings) -> None:
    """UsageError, in one line, where ``settings`` asks for LoRA and no module of ``network`` has
    one of the ``lora_targets`` names (peft's rule: the module's name is the target or ends in
    "." + target), checked without touching the network: reflow asks before drawing couplings."""
    if not settings.lora_rank:
        return
    names = [name for name, _ in network.named_modules()]
    if not any(name == target or name.endswith("." + target) for target in settings.lora_targets for name in names):
        raise UsageError(f"lora_targets={settings.lora_targets!r}: no module of the "
                         f"{type(network).__name__} has those names (its attention projections, for instance, are "
                         f"{', '.join(LORA_TARGETS)} where it has attention)")


def merged(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` with its LoRA adapters merged into the weights and removed (a
    plain network that loads without peft); the network itself if it has none."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in network.modules()):
        return network
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    plain = copy.deepcopy(network)
    for module in plain.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return recurse_remove_peft_layers(plain)
