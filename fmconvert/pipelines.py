"""Reading a diffusers source folder and writing a converted pipeline that stock diffusers loads.

A SOURCE folder is either a pipeline folder (model_index.json with a ``unet`` or
``transformer`` component and a ``scheduler``) or a model folder (config.json) with a
scheduler config beside it (``scheduler_config.json`` in it, or a ``scheduler/`` folder
in it or next to it).

The converted folder is a pipeline folder:

- the denoiser component holds the adapter (config.json + safetensors) and a one-line
  shim module ``fmconvert_adapter.py``, so that
  ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` finds the class;
- ``--to velocity``: unconditional sources (DDPMPipeline / DDIMPipeline, or a bare
  UNet2DModel) become a DDPMPipeline with the stock FlowMatchEulerDiscreteScheduler; every
  other family (:mod:`fmconvert.families`) keeps its pipeline class and gets
  :class:`~fmconvert.schedulers.FlowMatchEulerScheduler` (exact, float timesteps, with the
  family's ``sample_scaling``), also through a shim;
- ``--to epsilon`` / ``--to v_prediction``: an unconditional flow source becomes a
  DDPMPipeline with DDIMScheduler(timestep_spacing="trailing", clip_sample=False,
  set_alpha_to_one=True) on the chosen discrete schedule. Defaults: v_prediction on
  squaredcos_cap_v2 (its s-range [0.006, 0.99995] covers the flow path best, and
  x̂0 = α·x − σ·v stays well conditioned); epsilon on DDPM's linear betas, because
  x̂0 = (x − σ·ε̂)/α divides by α_T, which is 5e-5 on the cosine schedule (float32
  schedulers then lose four digits at the first step) and 6e-3 on the linear one.

``fmconvert.load(DIR)`` loads such a folder without running any code from it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from . import __version__
from .adapters import DiffusionAdapter, PathAdapter, VelocityAdapter
from .errors import FmconvertError, UsageError
from .families import Family, PixelUnconditional, family_of
from .hub import BUILTIN_PREFIX, PICKLE_SUFFIXES, looks_like_path, resolve
from .io import atomic_folder, link_or_copy
from .schedulers import FlowMatchEulerScheduler
from .schedules import DiscreteVPSchedule, GaussianPath, RectifiedFlow, path_from_scheduler_config

ADAPTER_SHIM = "fmconvert_adapter"
SCHEDULER_SHIM = "fmconvert_scheduler"
_SHIMS = {
    ADAPTER_SHIM: "from fmconvert.adapters import DiffusionAdapter, VelocityAdapter  # noqa: F401\n",
    SCHEDULER_SHIM: "from fmconvert.schedulers import FlowMatchEulerScheduler  # noqa: F401\n",
}
#: shim texts written by earlier versions (still fmconvert's own one-line imports)
_LEGACY_SHIMS = {SCHEDULER_SHIM: "from fmconvert.pipelines import FlowMatchEulerScheduler  # noqa: F401\n"}
_OWN_CLASSES = {"VelocityAdapter": VelocityAdapter, "DiffusionAdapter": DiffusionAdapter,
                "FlowMatchEulerScheduler": FlowMatchEulerScheduler}
TRUSTED_LIBRARIES = ("diffusers", "transformers")
DENOISERS = ("unet", "transformer")


def trusted_library(library: str) -> bool:
    """diffusers, transformers, fmconvert's shims, or a module of diffusers' own pipelines
    (``stable_diffusion`` for SD's safety checker, ``deepfloyd_if``): installed code, not the
    repo's."""
    if library in TRUSTED_LIBRARIES or library in _SHIMS:
        return True
    if not library.isidentifier():
        return False
    import importlib.util

    try:
        return importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None
    except (ImportError, ValueError):
        return False
SCHEDULES = {
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
    """A resolved SOURCE: where its parts are and what it predicts."""

    reference: str
    revision: str | None
    folder: Path
    model_index: dict | None
    denoiser: str
    model_folder: Path
    model_class: str
    scheduler: dict
    path: GaussianPath = field(repr=False)
    prediction_type: str = "epsilon"
    family: Family = field(default_factory=PixelUnconditional, repr=False)

    @property
    def converted(self) -> bool:
        return self.model_class in ("VelocityAdapter", "DiffusionAdapter")

    @property
    def pipeline_class(self) -> str | None:
        return self.model_index.get("_class_name") if self.model_index else None

    @property
    def unconditional(self) -> bool:
        return isinstance(self.family, PixelUnconditional)

    @property
    def hub_id(self) -> str | None:
        ref = self.reference
        is_local = ref.startswith(BUILTIN_PREFIX) or looks_like_path(ref) or Path(ref).expanduser().exists()
        return None if is_local else ref

    def describe(self) -> dict[str, Any]:
        """What was loaded, for logs and --json."""
        lam = self.path.log_snr(torch.tensor([self.path.t_min, self.path.t_max], dtype=torch.float64))
        return {
            "source": self.reference,
            "revision": self.revision,
            "pipeline_class": self.pipeline_class,
            "family": self.family.name,
            "model_class": self.model_class,
            "prediction_type": self.prediction_type,
            "scheduler": self.scheduler.get("_class_name"),
            "schedule": repr(self.path),
            "trained_log_snr_range": [float(lam[1]), float(lam[0])],
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
                "convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        code = [p for p in files if p.suffix == ".py" and p.read_text() not in (_SHIMS.get(p.stem), _LEGACY_SHIMS.get(p.stem))]
        if code and not trust_remote_code:
            raise FmconvertError(
                f"'{part}' contains code ({code[0].name}) that would run on load; pass --trust-remote-code "
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
            raise FmconvertError(f"'{reference}' uses a custom pipeline (code); pass --trust-remote-code if you trust it")
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
                    "pass --trust-remote-code if you trust it"
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
        sched = _scheduler_beside(folder) if model_class not in _OWN_CLASSES else {}
    else:
        raise FmconvertError(
            f"'{reference}' is not a diffusers folder: expected model_index.json (a pipeline) or config.json "
            "(a model, with its scheduler config beside it)"
        )
    path, prediction = _path_and_prediction(model_folder, model_class, sched)
    import diffusers

    converted = model_class in _OWN_CLASSES
    # a model class diffusers does not have is custom code: load_denoiser refuses it or, with
    # --trust-remote-code, loads it for the pipeline's family
    family = family_of(index.get("_class_name") if index else None, model_class,
                       check_model=not converted and hasattr(diffusers, model_class))
    if not converted:
        try:
            family.check_variance(_read_json(model_folder / "config.json"), sched)
        except ValueError as error:
            raise FmconvertError(f"'{reference}': {error}") from None
    return Source(reference, revision, folder, index, denoiser, model_folder, model_class, sched, path, prediction,
                  family)


def _path_and_prediction(model_folder: Path, model_class: str, sched: dict) -> tuple[GaussianPath, str]:
    from .schedules import path_from_config

    if model_class in ("VelocityAdapter", "DiffusionAdapter"):
        config = _read_json(model_folder / "config.json")
        return path_from_config(config["target_path"]), config["target_prediction"]
    try:
        return path_from_scheduler_config(sched)
    except ValueError as error:
        raise FmconvertError(str(error)) from None


def denoiser_class(source: Source, trust_remote_code: bool = False) -> type:
    """The source denoiser's class: fmconvert's, diffusers', or (``trust_remote_code``) the repo's."""
    import diffusers

    cls = _OWN_CLASSES.get(source.model_class) or getattr(diffusers, source.model_class, None)
    if cls is not None:
        return cls
    if not (trust_remote_code and source.model_index):
        raise FmconvertError(
            f"model class '{source.model_class}' is not a diffusers model; pass --trust-remote-code to load custom code"
        )
    from diffusers.utils import get_class_from_dynamic_module

    library = source.model_index[source.denoiser][0]
    return get_class_from_dynamic_module(str(source.model_folder), module_file=library + ".py",
                                         class_name=source.model_class, trust_remote_code=True)


def load_denoiser(source: Source, dtype: torch.dtype | None = None, allow_pickle: bool = False,
                  trust_remote_code: bool = False, variant: str | None = None) -> torch.nn.Module:
    """The source's denoiser (its ``variant``'s weight files), from safetensors unless ``allow_pickle``."""
    cls = denoiser_class(source, trust_remote_code)
    try:
        model = cls.from_pretrained(source.model_folder, use_safetensors=None if allow_pickle else True,
                                    dtype=dtype, variant=variant)
    except (OSError, ValueError, EnvironmentError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FmconvertError(f"cannot load the {source.denoiser} of '{source.reference}': {first}") from None
    return model.eval()


def denoiser_skeleton(source: Source, trust_remote_code: bool = False) -> torch.nn.Module:
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
    from diffusers.utils import (SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
                                 _add_variant)

    kinds = [(SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME)]
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
        raise UsageError(f"'{folder}' has no {variant} variant of its weights (variants there: {have}); "
                         "drop --variant or pick one of those")
    if variants:
        raise UsageError(f"'{folder}' has only the weight variants {', '.join(variants)}; pass --variant {variants[0]}")
    raise FmconvertError(f"'{folder}' has no safetensors weights"
                         + ("" if allow_pickle else " (pass --allow-pickle to use .bin)"))


def link_network(source: Source, dest: Path, names: list[str], variant: str | None = None) -> list[str]:
    """The source network's files ``names`` (:func:`network_files`) into ``dest``, byte for
    byte (hard links where the file system allows, copies otherwise). A converted folder's
    denoiser goes whole."""
    if source.converted:
        shutil.copytree(source.model_folder, dest, copy_function=link_or_copy)
        return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    if any(name.endswith(PICKLE_SUFFIXES) for name in names):
        # the one format change wrap makes: a pickle (allowed with --allow-pickle) becomes
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
    raise UsageError(f"unknown --schedule '{name}': use {', '.join(SCHEDULES)} or a scheduler_config.json path")


def convert(source: Source, model: torch.nn.Module, to: str = "velocity",
            schedule: str | None = None) -> tuple[PathAdapter, Any]:
    """The converted denoiser and a stock scheduler to drive it."""
    if to not in TARGETS:
        raise UsageError(f"unknown --to '{to}': use {', '.join(TARGETS)}")
    is_flow = source.prediction_type == "flow_prediction"
    T = getattr(source.path, "num_train_timesteps", 1000)
    if to == "velocity":
        if is_flow:
            raise UsageError(
                f"'{source.reference}' is already a flow-matching model; use --to epsilon or --to v_prediction"
            )
        adapter = VelocityAdapter._wrap(model, source.path, source.prediction_type, RectifiedFlow(num_train_timesteps=T),
                                        "flow_prediction", "float64")
        if source.family.sample_scaling is None:
            return adapter, FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
        schedule = {k: source.scheduler[k] for k in DiscreteVPSchedule.CONFIG_KEYS if k in source.scheduler}
        return adapter, FlowMatchEulerScheduler(num_train_timesteps=T, sample_scaling=source.family.sample_scaling,
                                                source_schedule=schedule)
    if not is_flow:
        raise UsageError(
            f"'{source.reference}' is a diffusion model ({source.prediction_type}); --to {to} converts flow-matching "
            "models, use --to velocity"
        )
    if not source.unconditional:
        raise FmconvertError(
            f"pipeline {source.pipeline_class} calls its scheduler with flow-only arguments; --to {to} supports "
            "unconditional pipelines (DDPMPipeline) and bare UNet2DModel folders"
        )
    config = target_schedule(schedule, to)
    ddim = DDIMScheduler.from_config({**config, "prediction_type": to, "timestep_spacing": "trailing",
                                      "clip_sample": False, "set_alpha_to_one": True})
    try:
        adapter = DiffusionAdapter.from_flow(model, to, schedule=config, flow_scheduler=source.scheduler or None)
    except ValueError as error:
        raise FmconvertError(str(error)) from None
    return adapter, ddim


def _model_card(source: Source, adapter: PathAdapter, to: str, out_name: str) -> str:
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

Source path: `{source.path!r}`; target path: `{adapter.target!r}`.

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
                    allow_pickle: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """Convert the source's denoiser and write the pipeline folder ``out`` atomically, from
    configs alone: the network's files are linked into the adapter's ``network/`` byte for
    byte (``variant``: which of the source's weight files), never loaded, so time and memory
    do not grow with the model. ``dtype``: the dtype the folder declares for loading the
    network (None: as diffusers loads the source's). Returns a summary for --json."""
    from .adapters import LOAD_DTYPES, NETWORK_FOLDER

    if dtype is not None and dtype not in LOAD_DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}': use {', '.join(LOAD_DTYPES)}")
    if source.converted and variant is not None:
        raise UsageError("--variant picks a source's weight files; a converted folder keeps the variant it was written with")
    files = [] if source.converted else network_files(source.model_folder, variant, allow_pickle)  # checked first
    adapter, scheduler = convert(source, denoiser_skeleton(source, trust_remote_code), to, schedule)
    adapter.register_to_config(network_variant=variant, network_dtype=dtype)
    out = Path(out)
    with atomic_folder(out, force) as tmp:
        index = dict(source.model_index) if source.model_index else {"_class_name": "DDPMPipeline"}
        if source.unconditional:
            index["_class_name"] = "DDPMPipeline"
        index.pop("_name_or_path", None)
        index["_diffusers_version"] = __import__("diffusers").__version__
        # the other components, unchanged
        for name, value in (source.model_index or {}).items():
            if isinstance(value, list) and value[0] and name not in (source.denoiser, "scheduler"):
                if (source.folder / name).is_dir():
                    shutil.copytree(source.folder / name, tmp / name, copy_function=link_or_copy)
        denoiser = "unet" if source.model_index is None else source.denoiser
        adapter.save_config(tmp / denoiser)
        files = link_network(source, tmp / denoiser / NETWORK_FOLDER, files, variant)
        (tmp / denoiser / f"{ADAPTER_SHIM}.py").write_text(_SHIMS[ADAPTER_SHIM])
        index[denoiser] = [ADAPTER_SHIM, type(adapter).__name__]
        scheduler.save_pretrained(tmp / "scheduler")
        if isinstance(scheduler, FlowMatchEulerScheduler):
            (tmp / "scheduler" / f"{SCHEDULER_SHIM}.py").write_text(_SHIMS[SCHEDULER_SHIM])
            index["scheduler"] = [SCHEDULER_SHIM, "FlowMatchEulerScheduler"]
        else:
            index["scheduler"] = ["diffusers", type(scheduler).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        provenance = {
            "fmconvert_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "to": to,
            **source.describe(),
        }
        (tmp / "fmconvert.json").write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(source, adapter, to, out.name))
    return {"out": str(out), "to": to, "adapter": type(adapter).__name__, "scheduler": type(scheduler).__name__,
            "pipeline_class": index["_class_name"], "network_files": files, "network_variant": variant,
            "network_dtype": dtype, **{"loaded": source.describe()}}


def _register_shim_modules() -> None:
    """diffusers checks passed components against the library named in model_index.json:
    let the shim names refer to fmconvert's own classes in this process (no code from the
    folder runs), with the base classes diffusers looks up."""
    import sys
    import types

    from diffusers import ModelMixin, SchedulerMixin

    for name, classes in ((ADAPTER_SHIM, ("VelocityAdapter", "DiffusionAdapter")), (SCHEDULER_SHIM, ("FlowMatchEulerScheduler",))):
        if name not in sys.modules:
            module = types.ModuleType(name, f"fmconvert's classes under the shim name {name}")
            module.__dict__.update({c: _OWN_CLASSES[c] for c in classes}, ModelMixin=ModelMixin, SchedulerMixin=SchedulerMixin)
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
            cls = _OWN_CLASSES[value[1]]
            if name == "scheduler":
                components[name] = cls.from_pretrained(folder, subfolder=name)
            else:
                components[name] = cls.from_pretrained(folder / name, dtype=dtype).eval()
    return DiffusionPipeline.from_pretrained(folder, dtype=dtype, **components, **kwargs)
