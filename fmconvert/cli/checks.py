"""Reading the command line's values into the library's: step lists, positive counts, outputs that
must not be overwritten, embeddings files, and the runs a sampling command draws."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fmconvert.cli.output import log
from fmconvert.errors import UsageError

if TYPE_CHECKING:
    from fmconvert.integration.source import Source
    from fmconvert.sampling.runs import Run


def new_output(out: Path, force: bool) -> None:
    """Refuse an existing output without --force (before any work)."""
    if out.exists() and not force:
        raise UsageError(f"output '{out}' already exists; pass --force to replace it")


def positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def parse_batch(text: str) -> int | str | None:
    """--batch-size: ``auto`` (the library's default), ``all`` (None: every pair) or a positive count."""
    if text in ("auto", "all"):
        return None if text == "all" else text
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--batch-size must be a positive integer, all or auto, got {text!r}") from None
    positive(batch_size=value)
    return value


def conditioning_from(prompt: str | None, negative_prompt: str | None, class_label: list[str] | None,
                      guidance_scale: float, guidance_rescale: float = 0.0, image_embeds: Path | None = None,
                      height: int | None = None, width: int | None = None):
    """The conditioning options (options.py: Prompt ... Width) as the library's Conditioning, the
    image size checked positive and the embeddings read (:func:`read_embeddings`)."""
    from fmconvert.integration.conditioning import Conditioning

    if not 0.0 <= guidance_rescale <= 1.0:
        raise UsageError(f"--guidance-rescale must be in [0, 1], got {guidance_rescale}")
    positive(**{name: value for name, value in (("height", height), ("width", width)) if value is not None})
    embeds = read_embeddings(image_embeds) if image_embeds is not None else {}
    return Conditioning(prompt=prompt, negative_prompt=negative_prompt, class_labels=tuple(class_label or ()),
                        image_embeds=embeds.get("image_embeds"), negative_image_embeds=embeds.get("negative_image_embeds"),
                        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)


def read_embeddings(path: Path) -> dict:
    """--image-embeds: a safetensors file whose 'image_embeds' (and 'negative_image_embeds') are (1 or N, D)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UsageError(f"--image-embeds '{path}' does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UsageError(f"--image-embeds '{path}' is not a safetensors file: {error}") from None
    if "image_embeds" not in tensors or any(t.ndim != 2 for t in tensors.values()):
        raise UsageError(f"--image-embeds '{path}' needs a 2-d 'image_embeds' tensor (and optionally "
                         f"'negative_image_embeds'); it has {', '.join(tensors) or 'nothing'}")
    return tensors


def parse_steps(value: str, single: bool = False, option: str = "--steps", allow_none: bool = False) -> list[int]:
    """--steps (or ``option``): solver steps, comma-separated for a sweep (``single``: a command that draws
    one run; ``allow_none``: '' for none)."""
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated positive integers, got '{value}'") from None
    if allow_none and not value.strip():
        return []
    if not values or min(values) < 1:
        raise UsageError(f"{option} values must be positive integers, got '{value}'")
    if single and len(values) > 1:
        raise UsageError(f"this command draws one run: give one --steps value, got '{value}' (fid sweeps step counts)")
    return values


def plan(model: str, revision: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False, *,
         solvers: list[str], grid: str, dtype: str, baselines: list[str] | None = None, rtol: float | None = None,
         atol: float | None = None, shift: float | None = None, **fields) -> tuple[Run, Source]:
    """MODEL resolved once, and its first run (:func:`fmconvert.sampling.runs.plan_run`); a note where
    the seed is the noise a reflowed MODEL was trained on. Commands load the source it returns, not the
    reference again; a sweep's other runs follow by :func:`~fmconvert.sampling.runs.sweep_runs`, and
    solver ``auto`` is resolved run by run (:func:`~fmconvert.sampling.runs.resolved`)."""
    from fmconvert.sampling.runs import plan_run

    run, source = plan_run(model, solvers, revision=revision, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, grid=grid, dtype=dtype, shift=shift,
                           baselines=baselines or (), rtol=rtol, atol=atol, **fields)
    if "seed" in fields and source.reflow_seed == fields["seed"]:
        log(f"note: seed {fields['seed']} is the noise '{model}' was reflowed on (its couplings.json): its samples from it "
            "repeat training pairs; pass another --seed to measure it on held-out noise")
    return run, source
