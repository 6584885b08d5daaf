"""The bundled model zoo, named builtin:NAME, shipped inside the package (no network needed).

- builtin:digits-eps, builtin:digits-v, builtin:digits-flow: diffusers pipeline folders
  (DDPMPipeline-compatible; epsilon on linear betas, v_prediction on squaredcos_cap_v2,
  rectified flow with FlowMatchEulerDiscreteScheduler), trained by scripts/train_zoo.py;
- builtin:digits-features: the digits classifier whose penultimate layer is the FID feature
  extractor (:class:`fmconvert.zoo.digits.DigitsClassifier`);
- builtin:digits: the reference images (:mod:`fmconvert.zoo.datasets`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError

ZOO_DIR = Path(__file__).resolve().parent
KINDS = {"model_index.json": "model", "config.json": "features", "digits.safetensors": "images"}
NOUNS = {"model": "a model", "features": "a feature extractor", "images": "an image set"}


def kind_of(folder: Path) -> str | None:
    return next((kind for marker, kind in KINDS.items() if (folder / marker).is_file()), None)


def available(kind: str | None = None) -> list[str]:
    """Names of the bundled entries (of one kind: model, features or images)."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if p.is_dir() and kind_of(p) and kind in (None, kind_of(p)))


def builtin_path(name: str, kind: str | None = None) -> Path:
    """The folder of builtin:NAME; an unknown name lists the available ones."""
    names = available(kind)
    if name not in names:
        listing = ", ".join(f"builtin:{n}" for n in names) or "none are installed"
        actual = kind_of(ZOO_DIR / name) if name in available() else None
        if actual is not None and kind is not None:  # (another kind of entry)
            raise UsageError(f"builtin:{name} is {NOUNS[actual]}, not {NOUNS[kind]}: available are {listing}")
        raise UsageError(f"unknown builtin {NOUNS.get(kind or '', 'an entry').split(' ', 1)[1]} 'builtin:{name}': "
                         f"available are {listing}")
    return ZOO_DIR / name
