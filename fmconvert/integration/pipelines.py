"""Reading a diffusers source folder and writing a converted pipeline that stock diffusers loads.

A SOURCE folder is either a pipeline folder (model_index.json with a ``unet`` or
``transformer`` component and a ``scheduler``) or a model folder (config.json) with a
scheduler config beside it (``scheduler_config.json`` in it, or a ``scheduler/`` folder
in it or next to it).

The converted folder is a pipeline folder:

- the denoiser component holds the adapter (config.json + safetensors) and a one-line
  shim module ``fmconvert_adapter.py``, so that
  ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` finds the class;
- ``to="velocity"``: unconditional sources (DDPMPipeline / DDIMPipeline, or a bare
  UNet2DModel) become a DDPMPipeline with the stock FlowMatchEulerDiscreteScheduler; every
  other family (:mod:`fmconvert.integration.families`) keeps its pipeline class and gets
  :class:`~fmconvert.integration.schedulers.FlowMatchEulerScheduler` (exact, float timesteps, with the
  family's ``sample_scaling``), also through a shim;
- ``to="epsilon"`` / ``to="v_prediction"``: an unconditional flow source becomes a
  DDPMPipeline, a Stable Diffusion 3 or FLUX.1 source keeps its pipeline, each with
  DDIMScheduler(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True) on the
  chosen discrete schedule; FLUX's pipeline hands every scheduler flow-only arguments (sigmas,
  mu), so its folder gets :class:`~fmconvert.integration.schedulers.FlowPipelineDDIMScheduler`, through the
  scheduler shim (swap in FlowPipelineEulerDiscreteScheduler or
  FlowPipelineDPMSolverMultistepScheduler the same way). Defaults: v_prediction on
  squaredcos_cap_v2 (its s-range [0.006, 0.99995] covers the flow path best, and
  x̂0 = α·x − σ·v stays well conditioned); epsilon on DDPM's linear betas, because
  x̂0 = (x − σ·ε̂)/α divides by α_T, which is 5e-5 on the cosine schedule (float32
  schedulers then lose four digits at the first step) and 6e-3 on the linear one.

``fmconvert.load(DIR)`` loads such a folder without running any code from it.

Reading a source and writing the converted folder (``to="velocity"``) take configs only
(:mod:`fmconvert.integration.configs`): the network's files are linked, never loaded, and neither torch nor
diffusers is imported, so ``wrap`` costs the same at any model size. torch and diffusers are
imported where a model or a diffusers object is built: ``to="epsilon"|"v_prediction"``, pickle
weights, a custom model class, and loading.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fmconvert import __version__
from fmconvert.errors import FmconvertError, UsageError
from fmconvert.files.atomic import atomic_folder, link_large_or_copy, link_or_copy
from fmconvert.integration.configs import (
    LOAD_DTYPES,
    NETWORK_FOLDER,
    describe_path,
    path_config,
    velocity_adapter_init,
    velocity_scheduler_config,
)
from fmconvert.integration.families import FAMILIES, Family, PixelUnconditional, family_of, family_timestep_path
from fmconvert.integration.hub import BUILTIN_PREFIX, PICKLE_SUFFIXES, looks_like_path, resolve

if TYPE_CHECKING:
    import torch
    from diffusers import ModelMixin, SchedulerMixin

    from fmconvert.math.paths import GaussianPath

ADAPTER_SHIM = "fmconvert_adapter"
SCHEDULER_SHIM = "fmconvert_scheduler"
#: Every text fmconvert has ever written into a shim module, by module name, the one it writes now
#: first. A written (or pushed) folder is a public contract: stock diffusers imports its shim, so
#: each text here stays importable whatever fmconvert moves (the modules they name,
#: fmconvert/adapters.py, schedulers.py and pipelines.py, are kept as re-exports), the safety check accepts exactly
#: these texts (:func:`_check_safety`), and tests/integration/test_folder_contract.py loads a folder written
#: with each in stock ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)``.
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
_SHIMS = {name: texts[0] for name, texts in SHIM_TEXTS.items()}
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


def _own_class(name: str) -> type[ModelMixin] | type[SchedulerMixin]:
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


def _diffusers_version() -> str:
    return metadata.version("diffusers")


def trusted_library(library: str) -> bool:
    """diffusers, transformers, fmconvert's shims, or a module of diffusers' own pipelines
    (``stable_diffusion`` for SD's safety checker, ``deepfloyd_if``): installed code, not the
    repo's. Looked up in diffusers' installed files, without importing it."""
    if library in TRUSTED_LIBRARIES or library in _SHIMS:
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


SCHEDULES: dict[str, dict[str, Any]] = {
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
}
TARGETS = ("velocity", "epsilon", "v_prediction")


def _read_json(path: Path) -> dict:
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

        config = _read_json(self.model_folder / "config.json")
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
            return _read_json(candidate)
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
        index = _read_json(index_file)
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
        model_class = _read_json(model_folder / "config.json").get("_class_name", index[denoiser][1])
        sched_file = folder / "scheduler" / "scheduler_config.json"
        if not sched_file.is_file():
            raise FmconvertError(f"pipeline '{reference}' has no scheduler/scheduler_config.json")
        sched = _read_json(sched_file)
    elif config_file.is_file():
        index, denoiser, model_folder = None, "unet", folder
        model_class = _read_json(config_file).get("_class_name")
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
            family.check_variance(_read_json(model_folder / "config.json"), sched)
        except ValueError as error:
            raise FmconvertError(f"'{reference}': {error}") from None
    return Source(reference, revision, folder, index, denoiser, model_folder, model_class, sched, path, prediction,
                  family)


def _path_and_prediction(model_folder: Path, model_class: str, sched: dict) -> tuple[dict, str]:
    if model_class in ADAPTER_CLASSES:
        config = _read_json(model_folder / "config.json")
        return config["target_path"], config["target_prediction"]
    try:
        return path_config(sched)
    except ValueError as error:
        raise FmconvertError(str(error)) from None


def denoiser_class(source: Source, trust_remote_code: bool = False) -> type[ModelMixin]:
    """The source denoiser's class: fmconvert's, diffusers', or (``trust_remote_code``) the repo's."""
    import diffusers

    cls = _own_class(source.model_class) if source.converted else getattr(diffusers, source.model_class, None)
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
        return cls.from_config(_read_json(source.model_folder / "config.json"))


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
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
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


def link_network(source: Source, dest: Path, names: list[str], variant: str | None = None) -> list[str]:
    """The source network's files ``names`` (:func:`network_files`) into ``dest``, byte for
    byte (hard links where the file system allows, copies otherwise). A converted folder's
    denoiser goes whole."""
    if source.converted:
        shutil.copytree(source.model_folder, dest, copy_function=link_or_copy)
        return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    if any(name.endswith(PICKLE_SUFFIXES) for name in names):
        # the one format change wrap makes: a pickle (allowed with allow_pickle) becomes
        # safetensors, so the converted folder loads without running pickle code
        network = load_denoiser(source, None, allow_pickle=True, variant=variant)
        network.save_pretrained(dest, safe_serialization=True, variant=variant)
        return sorted(p.name for p in dest.iterdir())
    dest.mkdir(parents=True)
    for name in names:
        link_or_copy(str(source.model_folder / name), str(dest / name))
    return names


DEFAULT_SCHEDULE = {"epsilon": "linear", "v_prediction": "cosine"}


def target_schedule(schedule: str | None, to: str = "v_prediction") -> dict:
    """A DDIM config for the discrete target schedule: a name in SCHEDULES or a scheduler_config.json."""
    name = schedule or DEFAULT_SCHEDULE[to]
    if name in SCHEDULES:
        return {"_class_name": "DDIMScheduler", **SCHEDULES[name]}
    path = Path(name).expanduser()
    if path.is_file():
        return _read_json(path)
    raise UsageError(f"unknown schedule={name!r}: use {', '.join(SCHEDULES)} or a scheduler_config.json path")


def convert(source: Source, to: str = "velocity", schedule: str | None = None,
            trust_remote_code: bool = False) -> tuple[dict, dict]:
    """The converted denoiser's config (its class's arguments, under ``_class_name``) and the
    config of a stock scheduler that drives it in the pipeline.

    ``to="velocity"``: from configs alone (:mod:`fmconvert.integration.configs`), for any model size.
    ``to="epsilon"`` / ``"v_prediction"`` (flow sources): :meth:`DiffusionAdapter.from_flow` on a
    meta-device skeleton of the network, with DDIMScheduler on the target schedule.
    """
    if to not in TARGETS:
        raise UsageError(f"unknown to={to!r}: use one of {', '.join(TARGETS)}")
    is_flow = source.prediction_type == "flow_prediction"
    if to == "velocity":
        if is_flow:
            back = ("to='epsilon' or to='v_prediction' converts it back" if source.family.steps_discrete_schedulers
                    else f"converting a {source.pipeline_class} back to epsilon / v_prediction is not supported yet")
            raise UsageError(f"'{source.reference}' is already a flow-matching model (fmconvert sample drives it as "
                             f"it is); {back}")
        model_config = _read_json(source.model_folder / "config.json")
        try:
            init = velocity_adapter_init(source.model_class, model_config, source.path_config, source.prediction_type)
            scheduler = velocity_scheduler_config(source.path_config, source.family.sample_scaling,
                                                  int(source.scheduler.get("steps_offset") or 0))
        except ValueError as error:
            raise FmconvertError(f"'{source.reference}': {error}") from None
        return {"_class_name": "VelocityAdapter", **init}, scheduler
    if not is_flow:
        raise UsageError(
            f"'{source.reference}' is a diffusion model ({source.prediction_type}); to={to!r} converts flow-matching "
            "models, use to='velocity'"
        )
    if not source.family.steps_discrete_schedulers:
        raise FmconvertError(f"to={to!r} for a {source.pipeline_class} is not supported yet; supported: unconditional "
                             "pipelines, bare UNet2DModel folders, Stable Diffusion 3 and FLUX.1")
    from diffusers import DDIMScheduler

    from fmconvert.integration.adapters import DiffusionAdapter

    config = target_schedule(schedule, to)
    ddim = DDIMScheduler.from_config({**config, "prediction_type": to, "timestep_spacing": "trailing",
                                      "clip_sample": False, "set_alpha_to_one": True})
    try:
        adapter = DiffusionAdapter.from_flow(denoiser_skeleton(source, trust_remote_code), to, schedule=config,
                                             flow_scheduler=source.scheduler or None)
    except ValueError as error:
        raise FmconvertError(str(error)) from None
    scheduler_class = "FlowPipelineDDIMScheduler" if source.family.hands_flow_arguments else "DDIMScheduler"
    return ({"_class_name": "DiffusionAdapter", **dict(adapter.config)}, {**dict(ddim.config), "_class_name": scheduler_class})


def _write_config(folder: Path, name: str, config: dict) -> None:
    """A diffusers config file (as ConfigMixin.save_config writes it: ``_class_name``,
    ``_diffusers_version``, then the arguments; private keys dropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {"_class_name": config["_class_name"], "_diffusers_version": _diffusers_version(),
            **{k: v for k, v in config.items() if not k.startswith("_")}}
    (folder / name).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def _model_card(source: Source, adapter: dict, to: str, out_name: str) -> str:
    tags = ["flow-matching", "fmconvert", source.prediction_type, f"to-{to}"]
    front = ["---"]
    if source.hub_id:
        front.append(f"base_model: {source.hub_id}")
    front += ["library_name: diffusers", "tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    what = ("a flow-matching velocity model in diffusers' FlowMatch convention (x_s = (1-s)·x0 + s·ε, "
            "timestep = 1000·s, output ε̂ − x̂0)" if to == "velocity" else f"a {to} model on a discrete VP schedule")
    body = f"""# {out_name}

`{source.reference}` ({source.model_class}, {source.prediction_type} prediction, {source.scheduler.get('_class_name')})
converted by [fmconvert](https://pypi.org/project/fmconvert/) {__version__} into {what}.
The conversion is exact to floating-point rounding: the same network, other coordinates.

Source path: `{describe_path(source.path_config)}`; target path: `{describe_path(adapter["target_path"])}`.

## Load with stock diffusers

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{out_name}", trust_remote_code=True)  # the code is a one-line import of fmconvert
images = pipe(num_inference_steps=50).images
```

## Load with fmconvert (runs no code from the folder)

```python
import fmconvert
pipe = fmconvert.load("{out_name}")
```

or from the command line: `fmconvert sample {out_name} --solver heun --steps 20 --out grid.png`.
"""
    return "\n".join(front) + body


def write_converted(source: Source, out: Path, to: str = "velocity", schedule: str | None = None,
                    force: bool = False, variant: str | None = None, dtype: str | None = None,
                    allow_pickle: bool = False, trust_remote_code: bool = False,
                    finish: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Convert the source's denoiser and write the pipeline folder ``out`` atomically, from
    configs alone: the network's files are linked into the adapter's ``network/`` byte for
    byte (``variant``: which of the source's weight files), never loaded, so time and memory
    do not grow with the model. ``dtype``: the dtype the folder declares for loading the
    network (None: as diffusers loads the source's). ``finish(tmp)``: called on the complete
    temporary folder before it becomes ``out`` (:func:`write_trained` replaces the network
    there). Returns a summary (JSON-ready)."""
    if dtype is not None and dtype not in LOAD_DTYPES:
        raise UsageError(f"unknown dtype={dtype!r}: use one of {', '.join(LOAD_DTYPES)}")
    if source.converted and variant is not None:
        raise UsageError(f"variant={variant!r} picks a source's weight files; a converted folder keeps the variant it was "
                         "written with")
    files = [] if source.converted else network_files(source.model_folder, variant, allow_pickle)  # checked first
    adapter, scheduler = convert(source, to, schedule, trust_remote_code)
    adapter.update(network_variant=variant, network_dtype=dtype)
    out = Path(out)
    with atomic_folder(out, force) as tmp:
        index = dict(source.model_index) if source.model_index else {"_class_name": "DDPMPipeline"}
        if source.unconditional:
            index["_class_name"] = "DDPMPipeline"
        index.pop("_name_or_path", None)
        index["_diffusers_version"] = _diffusers_version()
        # the other components, unchanged
        for name, value in (source.model_index or {}).items():
            if isinstance(value, list) and value[0] and name not in (source.denoiser, "scheduler"):
                if (source.folder / name).is_dir():
                    shutil.copytree(source.folder / name, tmp / name, copy_function=link_or_copy)
        denoiser = "unet" if source.model_index is None else source.denoiser
        _write_config(tmp / denoiser, "config.json", adapter)
        files = link_network(source, tmp / denoiser / NETWORK_FOLDER, files, variant)
        (tmp / denoiser / f"{ADAPTER_SHIM}.py").write_text(_SHIMS[ADAPTER_SHIM])
        index[denoiser] = [ADAPTER_SHIM, adapter["_class_name"]]
        _write_config(tmp / "scheduler", "scheduler_config.json", scheduler)
        if scheduler["_class_name"] in OWN_CLASSES:
            (tmp / "scheduler" / f"{SCHEDULER_SHIM}.py").write_text(_SHIMS[SCHEDULER_SHIM])
            index["scheduler"] = [SCHEDULER_SHIM, scheduler["_class_name"]]
        else:
            index["scheduler"] = ["diffusers", scheduler["_class_name"]]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        provenance = {
            "fmconvert_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "to": to,
            **source.describe(),
        }
        (tmp / "fmconvert.json").write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(source, adapter, to, out.name))
        if finish is not None:
            finish(tmp)
    return {"out": str(out), "to": to, "adapter": adapter["_class_name"], "scheduler": scheduler["_class_name"],
            "pipeline_class": index["_class_name"], "network_files": files, "network_variant": variant,
            "network_dtype": dtype, **{"loaded": source.describe()}}


def _replace_file(path: Path, text: str) -> None:
    """Write ``path`` as a new file: a file linked from the source is replaced, never written through."""
    path.unlink(missing_ok=True)
    path.write_text(text)


def _save_network(folder: Path, network: ModelMixin, variant: str | None) -> None:
    """``network``'s config and safetensors weights in ``folder``, in place of the network files
    there (links to the source's: unlinked, so the source's files stay as they are)."""
    for path in list(folder.iterdir()):
        if path.is_file() and (path.name == "config.json" or path.name.startswith("diffusion_pytorch_model")):
            path.unlink()
    network.save_pretrained(folder, safe_serialization=True, variant=variant)


def write_trained(source: Source, out: Path, network: ModelMixin, training: dict[str, Any], force: bool = False,
                  add_files: Callable[[Path], None] | None = None, source_prediction: str | None = None) -> Path:
    """``source``'s folder as ``fmconvert sample`` and stock diffusers take it, with ``network``'s
    weights in place of the source network's, written atomically (what ``fmconvert train`` writes):

    - a diffusion source: the converted folder :func:`write_converted` writes (``to="velocity"``);
    - a converted folder or a flow-matching source: its own layout, its large files (the other
      components' weights) linked, the small ones copied, so that what is written into the new
      folder (training.json, loss.png, ...) never writes through a link into the source.

    The network is saved fresh (safetensors; a converted folder's ``network_variant`` kept);
    ``training`` goes into ``fmconvert.json`` under "trained"; ``add_files(tmp)`` writes more
    files into the folder before it becomes ``out``. ``source_prediction``: what the network was
    trained to predict, where not what the source's network predicts (the adapter's config says
    so; :meth:`fmconvert.integration.adapters.PathAdapter.set_source_prediction`)."""
    copied = source.converted or source.prediction_type == "flow_prediction"
    variant = _read_json(source.model_folder / "config.json").get("network_variant") if source.converted else None

    def finish(tmp: Path) -> None:
        if copied:
            denoiser = tmp / Path(source.model_folder).relative_to(source.folder)
        else:
            denoiser = tmp / ("unet" if source.model_index is None else source.denoiser)
        if source.model_index is None and copied and not (denoiser / "scheduler_config.json").is_file():
            _write_config(denoiser, "scheduler_config.json", source.scheduler)  # (it was beside the folder)
        _save_network(denoiser / NETWORK_FOLDER if source.converted or not copied else denoiser, network, variant)
        if source_prediction is not None:  # (the adapter's own config: a converted folder's, or the one just written)
            _replace_file(denoiser / "config.json", json.dumps(
                {**_read_json(denoiser / "config.json"), "source_prediction": source_prediction}, indent=2, sort_keys=True) + "\n")
        provenance = _read_json(tmp / "fmconvert.json") if (tmp / "fmconvert.json").is_file() else {
            "fmconvert_version": __version__, **source.describe()}
        _replace_file(tmp / "fmconvert.json", json.dumps({**provenance, "trained": training}, indent=2, default=str) + "\n")
        if add_files is not None:
            add_files(tmp)

    if copied:
        with atomic_folder(Path(out), force) as tmp:
            shutil.copytree(source.folder, tmp, copy_function=link_large_or_copy, dirs_exist_ok=True)
            finish(tmp)
    else:
        write_converted(source, Path(out), "velocity", force=force, finish=finish)
    return Path(out)


def _register_shim_modules() -> None:
    """diffusers checks passed components against the library named in model_index.json:
    let the shim names refer to fmconvert's own classes in this process (no code from the
    folder runs), with the base classes diffusers looks up."""
    import sys
    import types

    from diffusers import ModelMixin, SchedulerMixin

    for name, classes in ((ADAPTER_SHIM, ADAPTER_CLASSES), (SCHEDULER_SHIM, SCHEDULER_CLASSES)):
        if name not in sys.modules:
            module = types.ModuleType(name, f"fmconvert's classes under the shim name {name}")
            module.__dict__.update({c: _own_class(c) for c in classes}, ModelMixin=ModelMixin, SchedulerMixin=SchedulerMixin)
            sys.modules[name] = module


def load(folder: str | Path, dtype: torch.dtype | None = None, **kwargs):
    """Load a folder written by ``fmconvert wrap`` as a diffusers pipeline, running no code
    from the folder: fmconvert's own classes are constructed directly."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    _register_shim_modules()
    components = {}
    for name, value in index.items():
        if isinstance(value, list) and value[0] in _SHIMS:
            cls = _own_class(value[1])
            if name == "scheduler":
                components[name] = cls.from_pretrained(folder, subfolder=name)
            else:
                components[name] = cls.from_pretrained(folder / name, dtype=dtype).eval()
    return DiffusionPipeline.from_pretrained(folder, dtype=dtype, **components, **kwargs)
