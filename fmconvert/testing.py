"""Stand-ins for what this offline machine cannot download, shared by the tests and
scripts/bench.py. Not used by the tool itself."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch


def random_inception_weights(path: str | Path, calibrate_on: torch.Tensor, seed: int = 0) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved as a plain state dict at ``path``.

    Random convolutions under unit batch-norm statistics blow activations up layer by layer
    (2048-d features of ~1e9, FIDs of ~1e17); so every batch norm takes its running mean and
    variance from one training-mode pass over ``calibrate_on`` (uint8 images, N×3×H×W), as
    data-dependent initialisation does. Features are then O(1) and FIDs of a readable size.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        torch.manual_seed(seed)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one pass, the batch's statistics
    with torch.no_grad():
        torch.nn.Module.train(model, True)  # the extractor's own train() refuses training mode
        model(calibrate_on)
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path
