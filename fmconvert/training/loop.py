"""Fine-tuning a velocity model with the conditional flow-matching loss (``fmconvert train``).

The model is any MODEL that ``fmconvert sample`` takes: a converted folder, or a diffusion or
flow-matching source wrapped on the fly (:func:`fmconvert.sampling.generate.load_velocity_model`). The
loss is computed through the adapter, so the gradients reach the source network through the
conversion; the network is what is trained, and what is written is a converted folder with its
new weights (:func:`fmconvert.integration.pipelines.write_trained`) that stock diffusers loads.

The loss, on diffusers' rectified path (s = 1 is noise, s = 0 is data): for data x0 (N, C, H, W)
in the model's data space, noise ε ~ N(0, I) of the same shape and a time s per sample,

    x_s = (1 − s)·x0 + s·ε,    u = ε − x0,    L = mean over elements of |u_θ(x_s, T·s) − u|²,

u_θ being the adapter's velocity at the timestep T·s (T: the target path's
``num_train_timesteps``). For a converted diffusion source, L at s is the source's epsilon loss
|ε̂ − ε|² at the matched time times (1 − s)⁻² (:func:`fmconvert.evaluation.agreement.loss_identity`), so
fine-tuning starts at the pretrained optimum of that weighting of the epsilon loss. With
``loss_type="pseudo_huber"`` the step trains (√(‖δ‖² + c²) − c)/d of the error δ = u_θ − u
instead (:func:`per_sample_loss`).

Times. s is drawn by inverse transform from one uniform u per sample, from one of the densities

- ``uniform``: π(s) = 1;
- ``logit_normal`` (Esser et al. 2024, SD3, eq. 19):
  π(s; m, σ) = 1/(σ√(2π)) · 1/(s(1 − s)) · exp(−(logit(s) − m)²/(2σ²)), i.e. logit(s) ~ N(m, σ²);
- ``u_shaped`` (Lee, Lin, Fanti 2024, "Improving the Training of Rectified Flows", sec. 4.1, for
  reflow, where the loss is largest at the two ends): π(s; a) = a/(2(eᵃ − 1)) · (e^{a·s} + e^{a(1−s)}),
  whose distribution function F(s) = (e^{a·s} − e^{a(1−s)} + eᵃ − 1)/(2(eᵃ − 1)) inverts in closed
  form (a quadratic in e^{a·s});

truncated to the source's trained range [s_lo, s_hi] (the s of its least and most noisy trained
times; [0, 1] for a flow source; digits-eps: [0.0099, 0.9936]) and renormalised there:
s = F⁻¹(F(s_lo) + (F(s_hi) − F(s_lo))·u). Outside that range the adapter evaluates the network
at its nearest trained time and fills in the rest from the actual s (its endpoint policy), so a
loss there would train the network's end times on noise levels it is not told about, pulling
them off their own optimum. Inside it the FM loss weights the epsilon loss by (1 − s)⁻² ≤
(1 − s_hi)⁻² (digits-eps: 2.4e4; a cosine schedule's α_T = 5e-5: 4e8), so the gradient's norm
is clipped (``max_grad_norm``).

Draws. Step k (0-based) takes the global batch of positions k·B … k·B + B − 1 of the data
stream, where epoch e is a permutation of the data seeded by (seed, e), and draws ε then u with
a generator seeded by (seed, k) on the training device. So the draws depend on the seed and the
step only: a resumed run repeats them exactly, and K processes (``accelerate launch`` /
``torchrun``) each take their B/K share of the same global batch.

Pairs (``fmconvert reflow``, :mod:`fmconvert.training.reflow`; Liu, Gong, Liu 2022, "Flow Straight and
Fast", rectified flow): each x0 is a sample of the model's ODE and comes with the noise ε its
trajectory started from (:class:`TrainingData` ``noise``); the step takes the pair's ε instead of
a fresh draw, so the loss above trains the straight paths between the two ends of every
trajectory. With ``distill`` every s is 1, the noise end, where x_1 = ε: one-step distillation,
L = |u_θ(ε, T) − (ε − x0)|², as one Euler step from the noise is x0 ≈ ε − u(ε, 1). For a
diffusion source s = 1 lies beyond the trained range, and the adapter answers it from the
network's noisiest trained time t_max (the endpoint policy: u = ε − x̂0), so what trains is x̂0 at
t_max on the input the sampler gives it. Not s_hi: x_{s_hi} = ε + (1 − s_hi)·(x0 − ε) tells the
network a little of the x0 the sampler never has (a test on a model whose samples are large
shows the difference).

Parametrisation (``prediction_type``). A diffusion source's network can be trained to predict
another quantity on its own path: ``epsilon``, ``v_prediction`` (α·ε − σ·x0, Salimans & Ho 2022)
or ``sample`` (x0). The adapter reads its output as that from step 1
(:meth:`~fmconvert.integration.adapters.PathAdapter.set_source_prediction`) and the written folder says so; the
weights are the source's, so the field no longer starts at the source's and the output is learnt
anew (as SD 2's v models were fine-tuned from epsilon ones). What it buys is conditioning: an
output error δ is a velocity error of δ/(1 − s) for epsilon (the noisiest trained time of
digits-eps: ×159), (α + σ)·δ ∈ [1, √2]·δ for v_prediction, δ/s for sample; few-step sampling
leans on u near s = 1, where epsilon is worst (REFLOW.md).

Optimiser: AdamW (β = (0.9, 0.999)), the learning rate rising linearly over ``warmup`` steps,
then constant or cosine down to 10 %. EMA: ``torch.optim.swa_utils.AveragedModel`` with
``get_ema_multi_avg_fn(decay)``: e₁ = θ₁, e_k = decay·e_{k−1} + (1 − decay)·θ_k (0 = off).
LoRA (``lora_rank`` > 0, peft): adapters on ``lora_targets``, only they train, merged into the
weights that are written. Mixed precision: accelerate's autocast (bf16, or fp16 with loss
scaling, GPU only).

Checkpoints: ``OUT.partial/checkpoint.safetensors``, replaced atomically every
``checkpoint_every`` steps: network, EMA and AdamW state as tensors, the RNG state, the loss so
far, the step, and the settings (:meth:`TrainSettings.manifest`) in its metadata. Rerunning the
same command resumes from it; other settings are refused in one line and nothing is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from fmconvert.errors import FmconvertError, UsageError
from fmconvert.files.atomic import atomic_write
from fmconvert.training.settings import (  # noqa: F401 (TrainSettings and its choices, re-exported)
    LORA_TARGETS,
    LOSS_TYPES,
    LR_SCHEDULES,
    MIXED_PRECISIONS,
    TIME_SAMPLINGS,
    TRAINABLE_PREDICTIONS,
    TrainSettings,
    data_fingerprint,
)

if TYPE_CHECKING:
    from fmconvert.integration.adapters import PathAdapter
    from fmconvert.integration.pipelines import Source
    from fmconvert.sampling.generate import VelocityModel

F64 = torch.float64

CHECKPOINT = "checkpoint.safetensors"


# -- data ------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """``values``: (N, C, H, W), uint8 images (x0 = v/127.5 − 1 ∈ [−1, 1]) or float latents or
    samples (x0 = the values as they are); held in memory as they are stored. ``noise``: None, or
    (N, C, H, W) float32, the noise ε each x0 is coupled to (paired training: :class:`Draws` takes
    ``noise[i]`` with ``values[i]`` instead of a fresh draw)."""

    values: torch.Tensor
    kind: str  # "images", "latents" or "couplings"
    noise: torch.Tensor | None = None

    def x0(self, index: torch.Tensor) -> torch.Tensor:
        """The data points ``index`` in the model's data space, float32."""
        batch = self.values[index]
        return batch.float() / 127.5 - 1 if self.kind == "images" else batch.float()


def load_training_data(data: str, shape: tuple[int, ...], latent_model: bool, model: str = "the model") -> TrainingData:
    """``data`` (builtin:digits[/SPLIT], an image folder, or a folder of latent shards
    ``shard-NNNNNN.safetensors`` with key "samples", as a ``samples_dir`` keeps them) for a
    model whose samples are ``shape`` (C, H, W). UsageError, one line, for an empty folder, data
    of another channel count or size, and images for a model that samples latents."""
    from fmconvert.files.references import parse_data

    ref = parse_data(data)
    if ref.kind == "builtin":
        from fmconvert.zoo.digits import load_digits

        found = TrainingData(load_digits(ref.split).images, "images")
    else:
        assert ref.path is not None
        shards = sorted(ref.path.glob("shard-*.safetensors"))
        if shards:
            from safetensors.torch import load_file

            found = TrainingData(torch.cat([load_file(str(p))["samples"] for p in shards]).float(), "latents")
        else:
            from fmconvert.files.images import IMAGE_SUFFIXES, image_files, load_files

            files = image_files(ref.path)
            if not files:
                raise UsageError(f"data={data!r} has no images ({', '.join(IMAGE_SUFFIXES)}) and no latent shards "
                                 "(shard-*.safetensors)")
            found = TrainingData(load_files(files), "images")
    have, want = tuple(found.values.shape[1:]), tuple(shape)
    what = "latents" if found.kind == "latents" else "images"
    if latent_model and found.kind == "images":
        raise UsageError(f"{model} samples latents ({'×'.join(map(str, want))}); data={data!r} holds images: give a "
                         "folder of latent shards (shard-*.safetensors, key 'samples') of that shape")
    if len(found.values) == 0:
        raise UsageError(f"data={data!r} holds no {what}")
    if have[:1] != want[:1]:
        raise UsageError(f"data={data!r} holds {have[0]}-channel {what}; {model} takes {want[0]} channels "
                         f"({'×'.join(map(str, want))})")
    if have != want:
        raise UsageError(f"data={data!r} holds {'×'.join(map(str, have[1:]))} {what}; {model} takes "
                         f"{'×'.join(map(str, want[1:]))} ({'×'.join(map(str, want))})")
    return found


# -- times, draws, loss ----------------------------------------------------------------------------


def trained_range(adapter: PathAdapter) -> tuple[float, float]:
    """[s_lo, s_hi]: the times s on the rectified path of the source's least and most noisy
    trained times (equal log-SNR)."""
    from fmconvert.math.paths import RectifiedFlow

    source = adapter.source
    lam = source.log_snr(torch.tensor([source.t_min, source.t_max], dtype=F64))
    s = RectifiedFlow().time_at_log_snr(lam).clamp(0.0, 1.0)
    return float(s.min()), float(s.max())


def sample_times(settings: TrainSettings, u: torch.Tensor, s_range: tuple[float, float]) -> torch.Tensor:
    """Times s for uniforms ``u`` ∈ [0, 1): the inverse of the density's distribution function
    truncated to ``s_range`` (see the module docstring), float64; with ``distill``, 1 (the noise
    end) for every u."""
    lo, hi = s_range
    u = u.to(F64)
    if settings.distill:
        return torch.ones_like(u)
    if settings.time_sampling == "uniform":
        return lo + (hi - lo) * u
    if settings.time_sampling == "u_shaped":
        a, ea = settings.u_shape_a, math.exp(settings.u_shape_a)

        def cdf(s: torch.Tensor) -> torch.Tensor:
            return (torch.exp(a * s) - torch.exp(a * (1 - s)) + ea - 1) / (2 * (ea - 1))

        def inverse(v: torch.Tensor) -> torch.Tensor:  # F(s) = v  ⇔  y² − c·y − e^a = 0 for y = e^{a·s}
            c = (ea - 1) * (2 * v - 1)
            return torch.log((c + torch.sqrt(c * c + 4 * ea)) / 2) / a
    else:
        m, sd = settings.logit_mean, settings.logit_std

        def cdf(s: torch.Tensor) -> torch.Tensor:
            return torch.special.ndtr((torch.logit(s) - m) / sd)  # (logit(0) = −∞: Φ = 0)

        def inverse(v: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(m + sd * torch.special.ndtri(v))
    # truncated to [lo, hi]: s = F⁻¹(F(lo) + (F(hi) − F(lo))·u)
    bounds = torch.tensor([lo, hi], dtype=F64, device=u.device)
    f_lo, f_hi = cdf(bounds).unbind()
    return inverse(f_lo + (f_hi - f_lo) * u).clamp(lo, hi)


def network_prediction(source: Source) -> str:
    """What ``source``'s network predicts: in a converted folder its adapter's ``source_prediction``
    (read from its config), else the source's prediction type."""
    if source.converted:
        return str(json.loads((Path(source.model_folder) / "config.json").read_text())["source_prediction"])
    return source.prediction_type


def check_prediction_type(source: Source, prediction_type: str | None) -> None:
    """UsageError, in one line, for a ``prediction_type`` the source's network cannot be trained
    into: a flow-matching network (or a converted-back one) predicts the velocity itself, which
    stock diffusers reads as such."""
    if prediction_type is not None and network_prediction(source) == "flow_prediction":
        raise UsageError(f"prediction_type={prediction_type!r} reparametrises a diffusion model's network; "
                         f"'{source.reference}' is a flow-matching model, whose network predicts the velocity: "
                         "leave it out")


def _seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class Draws:
    """The draws of every step (see the module docstring): ``batch(step)`` → (x0, ε, s) of this
    process's share [rank·B/K, (rank + 1)·B/K) of the global batch, on ``device``."""

    def __init__(self, settings: TrainSettings, data: TrainingData, s_range: tuple[float, float],
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1):
        if settings.batch_size % world_size:
            raise UsageError(f"batch_size={settings.batch_size} is the global batch: it must divide evenly over the "
                             f"{world_size} processes")
        self.settings, self.data, self.s_range = settings, data, s_range
        self.device = torch.device(device)
        share = settings.batch_size // world_size
        self.mine = slice(rank * share, (rank + 1) * share)
        self._epochs: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            generator = torch.Generator().manual_seed(_seed_of("epoch", self.settings.seed, epoch))
            self._epochs[epoch] = torch.randperm(len(self.data.values), generator=generator)
        return self._epochs[epoch]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, size = len(self.data.values), self.settings.batch_size
        positions = torch.arange(step * size, (step + 1) * size)[self.mine]
        index = torch.stack([self._order(int(p) // n)[int(p) % n] for p in positions])
        generator = torch.Generator(self.device).manual_seed(_seed_of("step", self.settings.seed, step))
        if self.data.noise is None:
            eps = torch.randn((size, *self.data.values.shape[1:]), generator=generator, device=self.device)[self.mine]
        else:  # the pair's own noise
            eps = self.data.noise[index].to(self.device)
        u = torch.rand(size, generator=generator, dtype=F64, device=self.device)[self.mine]
        return self.data.x0(index).to(self.device), eps, sample_times(self.settings, u, self.s_range)


def flow_matching_loss(model: Callable[..., Any], target_path: Any, x0: torch.Tensor, eps: torch.Tensor,
                       s: torch.Tensor) -> torch.Tensor:
    """Per sample (B,): the mean over elements of |u_θ(x_s, timestep(s)) − (ε − x0)|², with
    x_s = (1 − s)·x0 + s·ε formed in float64 (the adapter scales it in its compute dtype and
    hands the network its own dtype). ``model``: a velocity adapter (or its DDP wrapper), called
    as ``model(x_s, timestep, return_dict=False)``; ``target_path``: its rectified path, whose
    ``model_timestep`` gives the timestep (T·s)."""
    s_b = s.view(-1, *([1] * (x0.ndim - 1)))
    x_s = (1 - s_b) * x0.to(F64) + s_b * eps.to(F64)
    u = model(x_s, target_path.model_timestep(s, F64), return_dict=False)[0]
    dtype = torch.promote_types(u.dtype, torch.float32)
    return (u.to(dtype) - (eps - x0).to(dtype)).square().flatten(1).mean(1)


def per_sample_loss(mse: torch.Tensor, dim: int, loss_type: str) -> torch.Tensor:
    """The training loss per sample (B,) from its velocity error's mean square ``mse`` (B,)
    (:func:`flow_matching_loss`) over ``dim`` elements:

    - ``l2``: mse itself, the conditional flow-matching loss (the one the loss identity is about);
    - ``pseudo_huber`` (Song & Dhariwal 2023, improved consistency training; as Lee, Lin, Fanti
      2024 train reflow): (√(‖δ‖² + c²) − c)/d with ‖δ‖² = d·mse and c = 0.00054·d, quadratic for
      ‖δ‖ ≪ c and ‖δ‖/d above, so a sample with a large error pulls no harder than one with a
      moderate one."""
    if loss_type == "l2":
        return mse
    c = 0.00054 * dim
    return (torch.sqrt(dim * mse + c * c) - c) / dim


# -- checkpoints -----------------------------------------------------------------------------------


def work_folder(out: Path) -> Path:
    """Where a run keeps its checkpoint until the output is written: ``OUT.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


@dataclass
class TrainState:
    """What a checkpoint holds besides the settings: the steps done, the network's and the
    EMA's state dicts, AdamW's per-parameter state (tensors), the CPU (and CUDA) RNG state, the
    global loss of every step done (float64), the seconds spent, and the fp16 loss scaler's state."""

    step: int
    network: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[int, dict[str, torch.Tensor]]
    rng: dict[str, torch.Tensor]
    losses: torch.Tensor
    seconds: float = 0.0
    scaler: dict[str, Any] | None = None


def save_checkpoint(path: Path, settings: TrainSettings, state: TrainState) -> None:
    """``state`` as one safetensors file (written to a temporary name and renamed): tensors
    under network.*, ema.*, optimizer.<param>.<key>, rng.*, and "losses"; the settings,
    step, seconds and scaler state in its metadata. No pickle."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {"losses": state.losses.to(F64)}
    tensors.update({f"network.{k}": v for k, v in state.network.items()})
    tensors.update({f"ema.{k}": v for k, v in (state.ema or {}).items()})
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    for index, entries in state.optimizer.items():
        tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in entries.items()})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"settings": json.dumps(settings.manifest(), sort_keys=True), "step": str(state.step),
                "seconds": repr(state.seconds), "ema": str(state.ema is not None),
                "scaler": json.dumps(state.scaler)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _metadata(path: Path) -> dict[str, str] | None:
    if not Path(path).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def checkpoint_settings(path: Path) -> dict[str, Any] | None:
    """The settings a checkpoint was made with (None: no checkpoint there)."""
    metadata = _metadata(path)
    return None if metadata is None else json.loads(metadata["settings"])


def checkpoint_step(path: Path) -> int | None:
    """The steps a checkpoint holds (None: no checkpoint there)."""
    metadata = _metadata(path)
    return None if metadata is None else int(metadata["step"])


def check_checkpoint(path: Path, settings: TrainSettings) -> None:
    """Refuse (FmconvertError, one line naming what differs) a checkpoint made with other settings."""
    from fmconvert.sampling.shards import differences

    existing = checkpoint_settings(path)
    detail = differences(existing, settings.manifest()) if existing is not None else ""
    if detail:
        raise FmconvertError(f"the checkpoint in '{Path(path).parent}' was made with other settings ({detail}); rerun "
                             "with those settings to resume it, or remove the folder to start again")


def load_checkpoint(path: Path) -> TrainState:
    """The state :func:`save_checkpoint` wrote."""
    from safetensors import safe_open

    groups: dict[str, dict[str, torch.Tensor]] = {"network": {}, "ema": {}, "rng": {}, "optimizer": {}}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        losses = handle.get_tensor("losses")
        for key in handle.keys():
            head, _, rest = key.partition(".")
            if head in groups:
                groups[head][rest] = handle.get_tensor(key)
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in groups["optimizer"].items():
        index, _, name = key.partition(".")
        optimizer.setdefault(int(index), {})[name] = value
    return TrainState(int(metadata["step"]), groups["network"], groups["ema"] if metadata.get("ema") == "True" else None,
                      optimizer, groups["rng"], losses, float(metadata.get("seconds", 0.0)),
                      json.loads(metadata.get("scaler", "null")))


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# -- the model ------------------------------------------------------------------------------------


def require_peft() -> None:
    """UsageError (one line) where peft, which LoRA needs, is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError("LoRA needs peft, which is not installed: pip install 'fmconvert[train]' "
                         "(or pip install peft), or train the whole network (lora_rank=0)") from None


def add_lora(network: torch.nn.Module, settings: TrainSettings) -> None:
    """LoRA adapters of ``settings.lora_rank`` on the modules named ``settings.lora_targets``
    (peft; A from torch's generator, which :func:`train` seeds, and B = 0, so the network
    computes what it did); only they train. UsageError where no module has those names."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha or settings.lora_rank,
                        target_modules=list(settings.lora_targets), init_lora_weights=True)
    try:
        inject_adapter_in_model(config, network)
    except ValueError as error:
        raise UsageError(f"lora_targets={settings.lora_targets!r}: {str(error).strip().splitlines()[0]}") from None
    for name, parameter in network.named_parameters():
        parameter.requires_grad_("lora_" in name)


def check_lora_targets(network: torch.nn.Module, settings: TrainSettings) -> None:
    """UsageError, in one line, where ``settings`` asks for LoRA and no module of ``network`` has
    one of the ``lora_targets`` names (peft's rule: the module's name is the target or ends in
    "." + target), checked without touching the network: reflow asks before drawing couplings."""
    if not settings.lora_rank:
        return
    names = [name for name, _ in network.named_modules()]
    if not any(name == target or name.endswith("." + target) for target in settings.lora_targets for name in names):
        raise UsageError(f"lora_targets={settings.lora_targets!r}: no module of the "
                         f"{type(network).__name__} has those names (its attention projections, for instance, are "
                         f"{', '.join(LORA_TARGETS)} where it has attention)")


def merged(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` with its LoRA adapters merged into the weights and removed (a
    plain network that loads without peft); the network itself if it has none."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in network.modules()):
        return network
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    plain = copy.deepcopy(network)
    for module in plain.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return recurse_remove_peft_layers(plain)


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


# -- the run --------------------------------------------------------------------------------------


def _quiet(message: str) -> None:
    pass


def train(settings: TrainSettings, out: Path, *, device: str = "auto", checkpoint_every: int = 500,
          force: bool = False, progress: bool = False, log: Callable[[str], None] = _quiet,
          on_step: Callable[[int], None] | None = None, data: TrainingData | None = None,
          add_files: Callable[[Path], None] | None = None, source: Source | None = None) -> dict[str, Any]:
    """Fine-tune ``settings.model`` on ``settings.data`` and write ``out`` (see the module
    docstring): a converted folder with the trained weights (the EMA's, if any), ``loss.png``
    and ``training.json`` (the settings, the loss of every step, the seconds).

    ``data``: the data already loaded (paired data, which ``settings.couplings`` names, come
    only this way: :func:`fmconvert.training.reflow.reflow`), else :func:`load_training_data` reads
    ``settings.data``. ``add_files(tmp)``: writes more files into the output folder. ``source``:
    ``settings.model`` already inspected (else it is inspected here).

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
    from fmconvert.sampling.generate import load_velocity_model, sample_shape

    # the conversion runs in float64 (the network in its own dtype): the loss is the converted field's
    vm = load_velocity_model(source or settings.model, compute_dtype="float64")
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
        _set_rng_state(state.rng)
        losses[:state.step] = state.losses[:state.step]
        start, seconds = state.step, state.seconds
        if accelerator.scaler is not None and state.scaler is not None:
            accelerator.scaler.load_state_dict(state.scaler)
        log(f"resuming from step {start} (checkpoint in {work})")
    model, optimizer = accelerator.prepare(vm.velocity, optimizer)
    target = vm.velocity.target
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
                               optimizer.state_dict()["state"], _rng_state(), losses[:step],
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

        from fmconvert.integration.pipelines import write_trained

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
