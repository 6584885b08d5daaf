"""Writing a converted pipeline folder that stock diffusers loads, and loading it.

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

Writing the converted folder (``to="velocity"``) takes configs only
(:mod:`fmconvert.integration.configs`, the source as :func:`fmconvert.integration.source.inspect_source`
read it): the network's files are linked, never loaded, and neither torch nor diffusers is
imported, so ``wrap`` costs the same at any model size. torch and diffusers are imported where a
model or a diffusers object is built: ``to="epsilon"|"v_prediction"``, pickle weights, a custom
model class, and loading. What a converted folder may contain (its shim texts, the classes it
names) is :mod:`fmconvert.integration.source`'s, which reads such a folder back as a source.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fmconvert import __version__
from fmconvert.errors import FmconvertError, UsageError, check_choice
from fmconvert.files.atomic import atomic_folder, link_large_or_copy, link_or_copy
from fmconvert.integration.configs import LOAD_DTYPES, NETWORK_FOLDER, describe_path, velocity_adapter_init, velocity_scheduler_config
from fmconvert.integration.hub import PICKLE_SUFFIXES
from fmconvert.integration.source import (
    ADAPTER_CLASSES,
    ADAPTER_SHIM,
    OWN_CLASSES,
    SCHEDULER_CLASSES,
    SCHEDULER_SHIM,
    SHIM_TEXTS,
    Source,
    denoiser_skeleton,
    load_denoiser,
    network_files,
    own_class,
    read_json,
)

if TYPE_CHECKING:
    import torch
    from diffusers import ModelMixin

#: the shim texts fmconvert writes now (the first of each in SHIM_TEXTS)
_SHIMS = {name: texts[0] for name, texts in SHIM_TEXTS.items()}
SCHEDULES: dict[str, dict[str, Any]] = {
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
}
TARGETS = ("velocity", "epsilon", "v_prediction")
#: the tuned sampler file ``fmconvert tune --into`` stores in a converted folder
TUNED_SAMPLER = "tuned_sampler.json"
#: what in a converted folder says how to sample it, not what the velocity field is: the scheduler,
#: the pipeline's index, a stored tuned sampler file (``tune --into`` rewrites them; the model's
#: fingerprint, :func:`fmconvert.sampling.runs.model_fingerprint`, leaves them out)
SAMPLER_SETTINGS = ("model_index.json", "scheduler", TUNED_SAMPLER)
#: the schedulers of converted folders that step Euler on the flow path (tuned Euler times go into them)
EULER_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchEulerScheduler")
DEFAULT_SCHEDULE = {"epsilon": "linear", "v_prediction": "cosine"}


def _diffusers_version() -> str:
    return metadata.version("diffusers")


def link_network(source: Source, dest: Path, names: list[str], variant: str | None = None) -> list[str]:
    """The source network's files ``names`` (:func:`~fmconvert.integration.source.network_files`) into ``dest``, byte for
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


def target_schedule(schedule: str | None, to: str = "v_prediction") -> dict:
    """A DDIM config for the discrete target schedule: a name in SCHEDULES or a scheduler_config.json."""
    name = schedule or DEFAULT_SCHEDULE[to]
    if name in SCHEDULES:
        return {"_class_name": "DDIMScheduler", **SCHEDULES[name]}
    path = Path(name).expanduser()
    if path.is_file():
        return read_json(path)
    raise UsageError(f"unknown schedule={name!r}: use {', '.join(SCHEDULES)} or a scheduler_config.json path")


def convert(source: Source, to: str = "velocity", schedule: str | None = None,
            trust_remote_code: bool = False) -> tuple[dict, dict]:
    """The converted denoiser's config (its class's arguments, under ``_class_name``) and the
    config of a stock scheduler that drives it in the pipeline.

    ``to="velocity"``: from configs alone (:mod:`fmconvert.integration.configs`), for any model size.
    ``to="epsilon"`` / ``"v_prediction"`` (flow sources): :meth:`DiffusionAdapter.from_flow` on a
    meta-device skeleton of the network, with DDIMScheduler on the target schedule.
    """
    check_choice("to", to, TARGETS)
    is_flow = source.prediction_type == "flow_prediction"
    if to == "velocity":
        if is_flow:
            back = ("to='epsilon' or to='v_prediction' converts it back" if source.family.steps_discrete_schedulers
                    else f"converting a {source.pipeline_class} back to epsilon / v_prediction is not supported yet")
            raise UsageError(f"'{source.reference}' is already a flow-matching model (fmconvert sample drives it as "
                             f"it is); {back}")
        model_config = read_json(source.model_folder / "config.json")
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
    if dtype is not None:
        check_choice("dtype", dtype, LOAD_DTYPES)
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


def check_tuned_folder(folder: str | Path) -> Path:
    """``folder`` as :func:`store_tuned_times` takes it: a converted velocity folder whose pipeline
    steps Euler on the flow path (:data:`EULER_SCHEDULERS`). UsageError, one line naming it."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not (folder / "fmconvert.json").is_file() or not index.is_file():
        raise UsageError(f"into='{folder}': not a pipeline folder written by fmconvert wrap (no fmconvert.json "
                         "beside model_index.json)")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name")
    if scheduler not in EULER_SCHEDULERS:
        raise UsageError(f"into='{folder}': its pipeline steps with {scheduler}, not Euler on the flow path; tuned "
                         "times go into a velocity folder (what fmconvert wrap writes by default)")
    return folder


def store_tuned_times(folder: str | Path, times: dict[int, list[float]], tuned_text: str) -> dict[str, Any]:
    """Make ``folder``'s stock pipeline step the tuned Euler ``times`` (steps → s_0 > … > s_N = 0):
    its scheduler becomes :class:`~fmconvert.integration.schedulers.FlowMatchEulerScheduler` (through
    the scheduler shim), its config unchanged but for ``tuned_times`` (merged with those it has), so
    ``pipe(num_inference_steps=N)`` steps the tuned grid for each N of ``times`` and the scheduler's
    own for any other; ``tuned_text`` (the tuned sampler file) is stored as :data:`TUNED_SAMPLER`.
    Each file is replaced atomically; the velocity field, and with it the model's fingerprint, stay
    as they were. UsageError as :func:`check_tuned_folder`. Returns what was written."""
    from fmconvert.files.atomic import atomic_write

    folder = check_tuned_folder(folder)
    config = read_json(folder / "scheduler" / "scheduler_config.json")
    tuned = {**(config.get("tuned_times") or {}), **{str(steps): list(s) for steps, s in sorted(times.items())}}
    config = {**config, "_class_name": "FlowMatchEulerScheduler", "tuned_times": tuned}
    shim = folder / "scheduler" / f"{SCHEDULER_SHIM}.py"
    if not shim.is_file() or shim.read_text() not in SHIM_TEXTS[SCHEDULER_SHIM]:
        atomic_write(shim, lambda tmp: tmp.write_text(_SHIMS[SCHEDULER_SHIM]))
    atomic_write(folder / "scheduler" / "scheduler_config.json",
                 lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    index = {**read_json(folder / "model_index.json"), "scheduler": [SCHEDULER_SHIM, "FlowMatchEulerScheduler"]}
    atomic_write(folder / "model_index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    atomic_write(folder / TUNED_SAMPLER, lambda tmp: tmp.write_text(tuned_text))
    return {"into": str(folder), "scheduler": "FlowMatchEulerScheduler", "tuned_steps": sorted(int(k) for k in tuned),
            "file": str(folder / TUNED_SAMPLER)}


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
    variant = read_json(source.model_folder / "config.json").get("network_variant") if source.converted else None

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
                {**read_json(denoiser / "config.json"), "source_prediction": source_prediction}, indent=2, sort_keys=True) + "\n")
        provenance = read_json(tmp / "fmconvert.json") if (tmp / "fmconvert.json").is_file() else {
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
            module.__dict__.update({c: own_class(c) for c in classes}, ModelMixin=ModelMixin, SchedulerMixin=SchedulerMixin)
            sys.modules[name] = module


def load(folder: str | Path, dtype: torch.dtype | None = None, **kwargs):
    """Load a folder written by ``fmconvert wrap`` as a diffusers pipeline, running no code
    from the folder: fmconvert's own classes are constructed directly."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    _register_shim_modules()
    components = {}
    for name, value in index.items():
        if isinstance(value, list) and value[0] in _SHIMS:
            cls = own_class(value[1])
            if name == "scheduler":
                components[name] = cls.from_pretrained(folder, subfolder=name)
            else:
                components[name] = cls.from_pretrained(folder / name, dtype=dtype).eval()
    return DiffusionPipeline.from_pretrained(folder, dtype=dtype, **components, **kwargs)
