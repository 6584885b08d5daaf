"""Reading a SOURCE: where its parts are, what it predicts, its family; and what a converted folder is.

A SOURCE folder is either a pipeline folder (model_index.json with a ``unet`` or
``transformer`` component and a ``scheduler``) or a model folder (config.json) with a
scheduler config beside it (``scheduler_config.json`` in it, or a ``scheduler/`` folder
in it or next to it). A folder converted by fmconvert (:mod:`fmconvert.integration.folder`)
is a source too: its denoiser is one of :data:`ADAPTER_CLASSES`, behind a shim module whose
every accepted text is in :data:`SHIM_TEXTS` (what a converted folder may contain).

:func:`inspect_source` reads a source from its configs and file names alone
(:mod:`fmconvert.integration.configs`): no weights are loaded and neither torch nor diffusers is
imported, so ``wrap`` costs the same at any model size. :func:`load_denoiser` and
:func:`denoiser_skeleton` build its network (torch and diffusers imported there);
:func:`network_files` names the files diffusers would read for it.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmconvert.errors import FmconvertError, UsageError
from fmconvert.integration.configs import path_config
from fmconvert.integration.families import FAMILIES, Family, PixelUnconditional, family_of, family_timestep_path
from fmconvert.integration.hub import BUILTIN_PREFIX, PICKLE_SUFFIXES, looks_like_path, resolve

if TYPE_CHECKING:
    import torch
    from diffusers import ModelMixin, SchedulerMixin

    from fmconvert.math.paths import GaussianPath

ADAPTER_SHIM = "fmconvert_adapter"
SCHEDULER_SHIM = "fmconvert_scheduler"
#: Every text fmconvert has ever written into a shim module, by module name, the one it writes now
#: first (:func:`fmconvert.integration.folder.write_converted`). A written (or pushed) folder is a
#: public contract: stock diffusers imports its shim, so each text here stays importable whatever
#: fmconvert moves (the modules they name, fmconvert/adapters.py, schedulers.py and pipelines.py, are
#: kept as re-exports), the safety check accepts exactly these texts (:func:`_check_safety`), and
#: tests/integration/test_folder_contract.py loads a folder written with each in stock
#: ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)``.
SHIM_TEXTS: dict[str, tuple[str, ...]] = {
    ADAPTER_SHIM: ("from fmconvert.adapters import DiffusionAdapter, VelocityAdapter  # noqa: F401\n",),
    SCHEDULER_SHIM: (
        # since 3fce15d (FLUX's folders name FlowPipelineDDIMScheduler)
        "from fmconvert.schedulers import (  # noqa: F401\n"
        "    FlowMatchEulerScheduler, FlowPipelineDDIMScheduler, FlowPipelineDPMSolverMultistepScheduler,\n"
        "    FlowPipelineEulerDiscreteScheduler)\n",
        # 07e7ec8 to 3fce15d
        "from fmconvert.schedulers import FlowMatchEulerScheduler  # noqa: F401\n",
        # the first release (8e0a981)
        "from fmconvert.pipelines import FlowMatchEulerScheduler  # noqa: F401\n",
    ),
}
#: fmconvert's classes that a converted folder names (behind the shims): its denoisers, its schedulers
ADAPTER_CLASSES = ("VelocityAdapter", "DiffusionAdapter")
SCHEDULER_CLASSES = ("FlowMatchEulerScheduler", "FlowPipelineDDIMScheduler", "FlowPipelineDPMSolverMultistepScheduler",
                     "FlowPipelineEulerDiscreteScheduler")
OWN_CLASSES = (*ADAPTER_CLASSES, *SCHEDULER_CLASSES)
TRUSTED_LIBRARIES = ("diffusers", "transformers")
#: the record a folder written by reflow keeps of its couplings (the run that drew them)
COUPLINGS_RECORD = "couplings.json"
DENOISERS = ("unet", "transformer")
#: diffusers' weight file names (diffusers.utils.constants)
SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"


def own_class(name: str) -> type[ModelMixin] | type[SchedulerMixin]:
    """fmconvert's class named ``name`` in a converted folder (one of :data:`OWN_CLASSES`)."""
    from fmconvert.integration import adapters, schedulers

    if name not in OWN_CLASSES:
        raise KeyError(name)
    return getattr(adapters if name in ADAPTER_CLASSES else schedulers, name)


def _add_variant(name: str, variant: str | None) -> str:
    """A weight file's name for ``variant`` (diffusers' rule, ``diffusers.utils._add_variant``):
    the variant goes before the last suffix."""
    if variant is None:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


def trusted_library(library: str) -> bool:
    """diffusers, transformers, fmconvert's shims, or a module of diffusers' own pipelines
    (``stable_diffusion`` for SD's safety checker, ``deepfloyd_if``): installed code, not the
    repo's. Looked up in diffusers' installed files, without importing it."""
    if library in TRUSTED_LIBRARIES or library in SHIM_TEXTS:
        return True
    if not library.isidentifier():
        return False
    spec = importlib.util.find_spec("diffusers")  # (a top-level spec imports nothing)
    roots = [Path(root) / "pipelines" for root in (spec.submodule_search_locations or [])] if spec else []
    return any((root / library).is_dir() or (root / f"{library}.py").is_file() for root in roots)


def _diffusers_model(name: str) -> bool:
    """Whether ``name`` is a diffusers model class: the families' classes are; any other is
    looked up in diffusers (importing it)."""
    if any(name in family.models for family in FAMILIES):
        return True
    import diffusers

    return hasattr(diffusers, name)


def read_json(path: Path) -> dict:
    """A JSON file of a folder; FmconvertError (the folder is incomplete) where it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FmconvertError(f"cannot read {path}: {error}; is the folder complete?") from None


@dataclass
class Source:
    """A resolved SOURCE: where its parts are and what it predicts. ``path_config``: the
    description of its Gaussian path (:func:`fmconvert.integration.configs.path_config`); ``path`` builds it."""

    reference: str
    revision: str | None
    folder: Path
    model_index: dict | None
    denoiser: str
    model_folder: Path
    model_class: str
    scheduler: dict
    path_config: dict = field(repr=False)
    prediction_type: str = "epsilon"
    family: Family = field(default_factory=PixelUnconditional, repr=False)

    @cached_property
    def path(self) -> GaussianPath:
        from fmconvert.math.paths import path_from_config

        return path_from_config(self.path_config)

    @cached_property
    def model_config(self) -> dict:
        """The network's config with its class's defaults filled in where it leaves them out, as
        diffusers' ``from_config`` fills them: the denoiser's config.json, or in a converted folder the
        network's config that the adapter's config.json records (``model_config``). Read, not loaded:
        no weights."""
        import inspect

        import diffusers

        config = read_json(self.model_folder / "config.json")
        model_class = self.model_class
        if self.converted:
            config, model_class = dict(config.get("model_config") or {}), config.get("model_class", "")
        cls = getattr(diffusers, model_class, None)
        if cls is None:
            return config
        defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **config}

    @property
    def converted(self) -> bool:
        return self.model_class in ADAPTER_CLASSES

    @property
    def pipeline_class(self) -> str | None:
        return self.model_index.get("_class_name") if self.model_index else None

    @property
    def unconditional(self) -> bool:
        return isinstance(self.family, PixelUnconditional)

    @property
    def shift(self) -> float:
        """The time shift of its scheduler (FlowMatchEulerDiscreteScheduler's ``shift``, UniPC's
        ``flow_shift``), 1 where it has none."""
        return float(self.scheduler.get("shift", self.scheduler.get("flow_shift", 1.0)) or 1.0)

    @property
    def shifts_times(self) -> bool:
        """Whether its scheduler shifts the times, by a static shift other than 1 or dynamically."""
        return self.shift != 1.0 or bool(self.scheduler.get("use_dynamic_shifting"))

    @property
    def reflow_seed(self) -> int | None:
        """The seed of the noise a folder written by reflow was trained on (its
        :data:`COUPLINGS_RECORD`), None for any other source: samples from that seed's noise repeat
        training pairs."""
        record = Path(self.folder) / COUPLINGS_RECORD
        if not record.is_file():
            return None
        try:
            return int(json.loads(record.read_text())["run"]["seed"])
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def hub_id(self) -> str | None:
        ref = self.reference
        is_local = ref.startswith(BUILTIN_PREFIX) or looks_like_path(ref) or Path(ref).expanduser().exists()
        return None if is_local else ref

    def describe(self) -> dict[str, Any]:
        """What was loaded, for logs and JSON summaries (configs only)."""
        return {
            "source": self.reference,
            "revision": self.revision,
            "pipeline_class": self.pipeline_class,
            "family": self.family.name,
            "model_class": self.model_class,
            "prediction_type": self.prediction_type,
            "scheduler": self.scheduler.get("_class_name"),
            "path": self.path_config,
        }


def _scheduler_beside(model_folder: Path) -> dict:
    for candidate in (model_folder / "scheduler_config.json", model_folder / "scheduler" / "scheduler_config.json",
                      model_folder.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return read_json(candidate)
    raise FmconvertError(
        f"no scheduler config beside the model in '{model_folder}': put the training scheduler's "
        "scheduler_config.json in the folder (or a scheduler/ folder next to it)"
    )


def _check_safety(folder: Path, components: list[str], allow_pickle: bool, trust_remote_code: bool) -> None:
    for name in components:
        part = folder / name if name else folder
        if not part.is_dir():
            continue
        files = [p for p in part.rglob("*") if p.is_file()]  # a converted network/ too
        weights = [p for p in files if p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors"]
        if weights and not any(p.suffix == ".safetensors" for p in weights) and not allow_pickle:
            raise FmconvertError(
                f"'{part}' has only pickle weights ({weights[0].name}); loading pickles can run code: "
                "convert them to safetensors, or pass allow_pickle=True if you trust the source"
            )
        code = [p for p in files if p.suffix == ".py" and p.read_text() not in SHIM_TEXTS.get(p.stem, ())]
        if code and not trust_remote_code:
            raise FmconvertError(
                f"'{part}' contains code ({code[0].name}) that would run on load; pass trust_remote_code=True "
                "if you trust the source"
            )


def inspect_source(reference: str, revision: str | None = None, allow_pickle: bool = False,
                   trust_remote_code: bool = False) -> Source:
    """Resolve and read a SOURCE without loading weights."""
    folder = resolve(reference, revision, allow_pickle)
    index_file, config_file = folder / "model_index.json", folder / "config.json"
    if index_file.is_file():
        index = read_json(index_file)
        if not isinstance(index.get("_class_name"), str) and not trust_remote_code:
            raise FmconvertError(f"'{reference}' uses a custom pipeline (code); pass trust_remote_code=True if you trust it")
        denoiser = next((d for d in DENOISERS if isinstance(index.get(d), list) and index[d][0]), None)
        if denoiser is None:
            raise FmconvertError(
                f"pipeline '{reference}' ({index.get('_class_name')}) has no unet or transformer component; "
                "fmconvert converts a pipeline's denoiser"
            )
        components = [k for k, v in index.items() if isinstance(v, list) and v[0]]
        for name in components:
            library = index[name][0]
            if not trusted_library(library) and not trust_remote_code:
                raise FmconvertError(
                    f"component '{name}' of '{reference}' comes from '{library}', not diffusers or transformers; "
                    "pass trust_remote_code=True if you trust it"
                )
            if not (folder / name).is_dir():
                raise FmconvertError(
                    f"model_index.json of '{reference}' names the component '{name}' ({index[name][1]}) but there is "
                    f"no {name}/ folder; the download is incomplete: fetch the whole repo again"
                )
        _check_safety(folder, components, allow_pickle, trust_remote_code)
        model_folder = folder / denoiser
        model_class = read_json(model_folder / "config.json").get("_class_name", index[denoiser][1])
        sched_file = folder / "scheduler" / "scheduler_config.json"
        if not sched_file.is_file():
            raise FmconvertError(f"pipeline '{reference}' has no scheduler/scheduler_config.json")
        sched = read_json(sched_file)
    elif config_file.is_file():
        index, denoiser, model_folder = None, "unet", folder
        model_class = read_json(config_file).get("_class_name")
        if not isinstance(model_class, str):
            raise FmconvertError(f"'{reference}' has a config.json without a diffusers _class_name; not a diffusers model")
        _check_safety(folder, [""], allow_pickle, trust_remote_code)
        sched = _scheduler_beside(folder) if model_class not in ADAPTER_CLASSES else {}
    else:
        raise FmconvertError(
            f"'{reference}' is not a diffusers folder: expected model_index.json (a pipeline) or config.json "
            "(a model, with its scheduler config beside it)"
        )
    path, prediction = _path_and_prediction(model_folder, model_class, sched)
    path = family_timestep_path(path, model_class)
    converted = model_class in ADAPTER_CLASSES
    # a model class diffusers does not have is custom code: load_denoiser refuses it or, with
    # trust_remote_code, loads it for the pipeline's family
    family = family_of(index.get("_class_name") if index else None, model_class,
                       check_model=not converted and _diffusers_model(model_class))
    if not converted:
        try:
            family.check_variance(read_json(model_folder / "config.json"), sched)
        except ValueError as error:
            raise FmconvertError(f"'{reference}': {error}") from None
    return Source(reference, revision, folder, index, denoiser, model_folder, model_class, sched, path, prediction,
                  family)


def _path_and_prediction(model_folder: Path, model_class: str, sched: dict) -> tuple[dict, str]:
    if model_class in ADAPTER_CLASSES:
        config = read_json(model_folder / "config.json")
        return config["target_path"], config["target_prediction"]
    try:
        return path_config(sched)
    except ValueError as error:
        raise FmconvertError(str(error)) from None


def denoiser_class(source: Source, trust_remote_code: bool = False) -> type[ModelMixin]:
    """The source denoiser's class: fmconvert's, diffusers', or (``trust_remote_code``) the repo's."""
    import diffusers

    cls = own_class(source.model_class) if source.converted else getattr(diffusers, source.model_class, None)
    if cls is not None:
        return cls
    if not (trust_remote_code and source.model_index):
        raise FmconvertError(
            f"model class '{source.model_class}' is not a diffusers model; pass trust_remote_code=True to load custom code"
        )
    from diffusers.utils import get_class_from_dynamic_module

    library = source.model_index[source.denoiser][0]
    return get_class_from_dynamic_module(str(source.model_folder), module_file=library + ".py",
                                         class_name=source.model_class, trust_remote_code=True)


def load_denoiser(source: Source, dtype: torch.dtype | None = None, allow_pickle: bool = False,
                  trust_remote_code: bool = False, variant: str | None = None) -> ModelMixin:
    """The source's denoiser (its ``variant``'s weight files), from safetensors unless ``allow_pickle``."""
    cls = denoiser_class(source, trust_remote_code)
    try:
        model = cls.from_pretrained(source.model_folder, use_safetensors=None if allow_pickle else True,
                                    dtype=dtype, variant=variant)
    except (OSError, ValueError, EnvironmentError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FmconvertError(f"cannot load the {source.denoiser} of '{source.reference}': {first}") from None
    return model.eval()


def denoiser_skeleton(source: Source, trust_remote_code: bool = False) -> ModelMixin:
    """The source's denoiser built from its config on the meta device (accelerate's
    ``init_empty_weights``): its class, config and call signature, no weights, no memory."""
    from accelerate import init_empty_weights

    cls = denoiser_class(source, trust_remote_code)
    with init_empty_weights():
        if source.converted:
            return cls.from_config(cls.load_config(source.model_folder))
        return cls.from_config(read_json(source.model_folder / "config.json"))


def _variants(folder: Path) -> list[str]:
    """The weight variants (fp16, bf16, ...) a model folder has, from diffusers' file names."""
    found = set()
    for path in folder.glob("diffusion_pytorch_model.*"):
        parts = path.name.split(".")
        if parts[1] not in ("safetensors", "bin"):
            found.add(parts[1].split("-")[0])
        elif len(parts) == 5 and parts[2] == "index":
            found.add(parts[3])
    return sorted(found)


def network_files(folder: Path, variant: str | None = None, allow_pickle: bool = False) -> list[str]:
    """The files diffusers' ``from_pretrained`` reads for the network in ``folder`` with
    ``variant``: config.json and its weights (one file, or an index and the shards it
    lists), safetensors unless ``allow_pickle``. Raises FmconvertError naming what is there."""
    kinds = [(SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME)]
    if allow_pickle:
        kinds.append((WEIGHTS_INDEX_NAME, WEIGHTS_NAME))
    for index_name, weights_name in kinds:
        index = folder / _add_variant(index_name, variant)
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing or not shards:
                raise FmconvertError(f"'{index}' lists shard {missing[0] if missing else '(none)'} that is not there; "
                                     "the download is incomplete: fetch the model again")
            return ["config.json", index.name, *shards]
        if (folder / _add_variant(weights_name, variant)).is_file():
            return ["config.json", _add_variant(weights_name, variant)]
    variants = _variants(folder)
    if variant is not None:
        have = ", ".join(variants) if variants else "none"
        raise UsageError(f"'{folder}' has no weights of variant={variant!r} (variants there: {have}); "
                         "leave the variant out or pick one of those")
    if variants:
        raise UsageError(f"'{folder}' has only the weight variants {', '.join(variants)}; pass variant={variants[0]!r}")
    raise FmconvertError(f"'{folder}' has no safetensors weights"
                         + ("" if allow_pickle else " (pass allow_pickle=True to use .bin)"))
