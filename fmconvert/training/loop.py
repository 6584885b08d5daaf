"""Fine-tuning a velocity model with the conditional flow-matching loss (``fmconvert train``): the loop.

The model is any MODEL that ``fmconvert sample`` takes: a converted folder, or a diffusion or
flow-matching source wrapped on the fly (:func:`fmconvert.sampling.model.load_velocity_model`). The
loss is computed through the adapter, so the gradients reach the source network through the
conversion; the network is what is trained, and what is written is a converted folder with its
new weights (:func:`fmconvert.integration.folder.write_trained`) that stock diffusers loads.

What one step computes (on diffusers' rectified path, s = 1 is noise): its times, draws and loss,
:mod:`fmconvert.training.objective`; what it trains on, :mod:`fmconvert.training.data`; the
checkpoint a run resumes from, :mod:`fmconvert.training.checkpoint`; LoRA,
:mod:`fmconvert.training.lora`.

Optimiser: AdamW (β = (0.9, 0.999)), the learning rate rising linearly over ``warmup`` steps,
then constant or cosine down to 10 %. EMA: ``torch.optim.swa_utils.AveragedModel`` with
``get_ema_multi_avg_fn(decay)``: e₁ = θ₁, e_k = decay·e_{k−1} + (1 − decay)·θ_k (0 = off).
Mixed precision: accelerate's autocast (bf16, or fp16 with loss scaling, GPU only). The run
writes ``loss.png`` (:func:`plot_loss`) and ``training.json`` beside the weights.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from fmconvert.errors import FmconvertError, UsageError
from fmconvert.files.atomic import atomic_write
from fmconvert.training.checkpoint import (
    CHECKPOINT,
    TrainState,
    check_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    work_folder,
)
from fmconvert.training.data import TrainingData, load_training_data
from fmconvert.training.lora import add_lora, merged, require_peft
from fmconvert.training.objective import (
    Draws,
    check_prediction_type,
    flow_matching_loss,
    per_sample_loss,
    trained_range,
)

if TYPE_CHECKING:
    from fmconvert.integration.source import Source
    from fmconvert.sampling.model import VelocityModel
    from fmconvert.training.settings import TrainSettings

F64 = torch.float64


# -- the device and the network --------------------------------------------------------------------


def check_device(settings: TrainSettings, device: str) -> bool:
    """UsageError (one line) for a ``device`` train cannot use (not auto, cpu or cuda; cuda
    without one; fp16 without a GPU); LoRA without peft. Returns whether it trains on the CPU."""
    if settings.lora_rank:
        require_peft()
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device={device!r}: train takes 'auto', 'cpu' or 'cuda' (pick GPUs with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device='cuda' asked for but no CUDA device is available; use device='cpu'")
    cpu = device == "cpu" or not torch.cuda.is_available()
    if settings.mixed_precision == "fp16" and cpu:
        raise UsageError("mixed_precision='fp16' needs a GPU (loss scaling is CUDA's); use 'bf16' or 'no' on the CPU")
    return cpu


def _accelerator(settings: TrainSettings, device: str):
    """accelerate's Accelerator for ``device`` (:func:`check_device`) and the mixed precision.
    In a single process any earlier accelerate state is dropped first (it is a process-wide
    singleton that refuses another precision)."""
    import os

    cpu = check_device(settings, device)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=settings.mixed_precision)


def _trainable(vm: VelocityModel, settings: TrainSettings, device: torch.device) -> torch.nn.Module:
    network = vm.velocity.source_network
    if settings.lora_rank:
        add_lora(network, settings)
    else:
        network.requires_grad_(True)
    vm.velocity.to(device).train()
    return network


# -- the run ---------------------------------------------------------------------------------------


def _quiet(message: str) -> None:
    pass


def train(settings: TrainSettings, out: Path, *, device: str = "auto", checkpoint_every: int = 500,
          force: bool = False, progress: bool = False, log: Callable[[str], None] = _quiet,
          on_step: Callable[[int], None] | None = None, data: TrainingData | None = None,
          add_files: Callable[[Path], None] | None = None, source: Source | None = None,
          denoiser: torch.nn.Module | None = None) -> dict[str, Any]:
    """Fine-tune ``settings.model`` on ``settings.data`` and write ``out`` (see the module
    docstring): a converted folder with the trained weights (the EMA's, if any), ``loss.png``
    and ``training.json`` (the settings, the loss of every step, the seconds).

    ``data``: the data already loaded (paired data, which ``settings.couplings`` names, come
    only this way: :func:`fmconvert.training.reflow.reflow`), else
    :func:`~fmconvert.training.data.load_training_data` reads ``settings.data``. ``add_files(tmp)``:
    writes more files into the output folder. ``source``: ``settings.model`` already inspected
    (else it is inspected here); ``denoiser``: its denoiser already loaded as train loads it (in
    its stored dtype: :func:`~fmconvert.integration.source.load_denoiser` with no dtype), trained
    in place (else it is loaded here).

    Before any step, in one line each: an existing ``out`` without ``force``, a checkpoint in
    ``OUT.partial`` made with other settings (FmconvertError), fp16 without a GPU, LoRA without
    peft, data that do not fit the model (UsageError); nothing is written then. A checkpoint
    with the same settings is resumed. ``on_step(k)``: called after step k (1-based) is done and
    checkpointed if due. Returns a summary (JSON-ready)."""
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"output '{out}' already exists; pass force=True to replace it")
    if checkpoint_every < 1:
        raise UsageError(f"checkpoint_every={checkpoint_every}: must be a positive integer")
    if (settings.couplings is not None) != (data is not None and data.noise is not None):
        raise FmconvertError("paired training (couplings) needs the paired data, and paired data their couplings' "
                             "identity in the settings: use fmconvert reflow")
    work = work_folder(out)
    check_checkpoint(work / CHECKPOINT, settings)
    accelerator = _accelerator(settings, device)
    from fmconvert.sampling.model import load_velocity_model, sample_shape

    # the conversion runs in float64 (the network in its own dtype): the loss is the converted field's
    vm = load_velocity_model(source or settings.model, compute_dtype="float64", denoiser=denoiser)
    family = vm.source.family
    if family.accepts:
        raise UsageError(f"train fine-tunes unconditional models; {vm.source.pipeline_class} ({family.title}) needs "
                         "its conditioning, which train does not take yet")
    check_prediction_type(vm.source, settings.prediction_type)
    if settings.prediction_type is not None:
        try:
            vm.velocity.set_source_prediction(settings.prediction_type)
        except ValueError as error:
            raise UsageError(f"prediction_type={settings.prediction_type!r}: {error}") from None
    if data is None:
        data = load_training_data(settings.data, sample_shape(vm), family.decoder is not None, settings.model)
    s_range = trained_range(vm.velocity)
    draws = Draws(settings, data, s_range, accelerator.device, accelerator.process_index, accelerator.num_processes)
    torch.manual_seed(settings.seed)  # (for whatever draws from torch's own generator; a resume restores its state)
    network = _trainable(vm, settings, accelerator.device)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    ema = None
    if settings.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
    losses = torch.zeros(settings.train_steps, dtype=F64)
    start, seconds = 0, 0.0
    if (work / CHECKPOINT).is_file():
        state = load_checkpoint(work / CHECKPOINT)
        network.load_state_dict(state.network)
        if ema is not None and state.ema is not None:
            ema.load_state_dict(state.ema)
        params = optimizer.state_dict()["param_groups"]
        optimizer.load_state_dict({"state": state.optimizer, "param_groups": params})
        set_rng_state(state.rng)
        losses[:state.step] = state.losses[:state.step]
        start, seconds = state.step, state.seconds
        if accelerator.scaler is not None and state.scaler is not None:
            accelerator.scaler.load_state_dict(state.scaler)
        log(f"resuming from step {start} (checkpoint in {work})")
    model, optimizer = accelerator.prepare(vm.velocity, optimizer)
    target = vm.velocity.target_path
    on_device = torch.zeros(settings.train_steps, dtype=F64, device=accelerator.device)
    log(f"training {settings.model} on {settings.data} ({len(data.values)} {data.kind}): {settings.train_steps} steps of "
        f"{settings.batch_size}, s in [{s_range[0]:.4g}, {s_range[1]:.4g}] "
        f"({'s = 1 only: distillation' if settings.distill else settings.time_sampling}), "
        f"{sum(p.numel() for p in trainable) / 1e6:.3g}M trainable parameters, on {accelerator.device}"
        + (f" × {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""))
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.train_steps, initial=start, file=sys.stderr, desc="train", unit="step", leave=False)
    started = time.perf_counter()

    def checkpoint(step: int) -> None:
        losses[start:step] = on_device[start:step].cpu()
        if accelerator.is_main_process:
            work.mkdir(parents=True, exist_ok=True)
            state = TrainState(step, network.state_dict(), ema.state_dict() if ema is not None else None,
                               optimizer.state_dict()["state"], rng_state(), losses[:step],
                               seconds + time.perf_counter() - started,
                               accelerator.scaler.state_dict() if accelerator.scaler is not None else None)
            save_checkpoint(work / CHECKPOINT, settings, state)
            if not (work / "settings.json").is_file():
                atomic_write(work / "settings.json", lambda tmp: tmp.write_text(json.dumps(settings.manifest(), indent=2)))
        accelerator.wait_for_everyone()

    try:
        for step in range(start, settings.train_steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_at(step)
            x0, eps, s = draws.batch(step)
            with accelerator.autocast():
                loss = per_sample_loss(flow_matching_loss(model, target, x0, eps, s), x0[0].numel(),
                                       settings.loss_type).mean()
            accelerator.backward(loss)
            if settings.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(network)
            on_device[step] = accelerator.reduce(loss.detach(), "mean")
            if bar is not None:
                bar.update(1)
                if (step + 1) % 20 == 0:
                    bar.set_postfix(loss=f"{on_device[step].item():.4g}")
            if (step + 1) % checkpoint_every == 0 and step + 1 < settings.train_steps:
                checkpoint(step + 1)
            if on_step is not None:
                on_step(step + 1)
    finally:
        if bar is not None:
            bar.close()
    losses[start:] = on_device[start:].cpu()
    seconds += time.perf_counter() - started
    summary = {"out": str(out), "train_steps": settings.train_steps, "resumed_from": start, "seconds": round(seconds, 3),
               "first_loss": float(losses[0]), "last_loss": float(losses[-1]), "time_range": list(s_range),
               "processes": accelerator.num_processes, "device": str(accelerator.device), "settings": settings.manifest()}
    if accelerator.is_main_process:
        final = merged((ema.module if ema is not None else network)).to("cpu").eval()
        record = {**summary, "loss": losses.tolist()}

        def write_records(tmp: Path) -> None:
            (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
            plot_loss(losses, tmp / "loss.png", title=f"{Path(settings.model).name} on {settings.data}")
            if add_files is not None:
                add_files(tmp)

        from fmconvert.integration.folder import write_trained

        write_trained(vm.source, out, final, {k: v for k, v in summary.items() if k != "out"}, force, write_records,
                      settings.prediction_type)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return summary


def plot_loss(losses: torch.Tensor, path: Path, title: str = "") -> Path:
    """The loss of every step (light) and its running mean over ~2 % of the run, log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = losses.double()
    window = max(1, len(values) // 50)
    kernel = torch.ones(window, dtype=F64) / window
    smooth = torch.nn.functional.conv1d(values.view(1, 1, -1), kernel.view(1, 1, -1)).view(-1)
    steps = torch.arange(1, len(values) + 1)
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss per step")
    axes.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=1.6, label=f"mean of {window} steps")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("flow-matching loss")
    axes.set_title(title, fontsize=10)
    axes.legend()
    figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
    return Path(path)
