"""The bundled model zoo: diffusers folders shipped inside the package, named builtin:NAME.

Each model is a subfolder of this package (``fmconvert/zoo/NAME/``) holding a standard
diffusers pipeline folder, so ``pip install`` carries it and no network is needed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError

ZOO_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the bundled models (folders with a model_index.json)."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "model_index.json").is_file())


def builtin_path(name: str) -> Path:
    """The folder of builtin:NAME; an unknown name lists the available ones."""
    names = available()
    if name not in names:
        listing = ", ".join(f"builtin:{n}" for n in names) or "none are installed"
        raise UsageError(f"unknown builtin model 'builtin:{name}': available are {listing}")
    return ZOO_DIR / name
