"""The feature extractors FID and KID are computed in (``features``): the registry, with what
each takes. Plain Python (the command line's help reads it); :func:`fmconvert.evaluation.fid.make_extractor`
builds them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Features:
    """``summary``: one line for the command line's help; ``size``: the (H, W) it takes, None: any (resized as
    its own preprocessing does); ``paper_comparable``: numbers compare with published FIDs."""

    name: str
    summary: str
    size: tuple[int, int] | None = None
    paper_comparable: bool = False


FEATURES: dict[str, Features] = {f.name: f for f in (
    Features("digits", "the zoo's digits classifier, 128-d (8x8 images)", size=(8, 8)),
    Features("inception", "torch-fidelity's InceptionV3, as torchmetrics wraps it (any size; paper-comparable)",
             paper_comparable=True),
)}
