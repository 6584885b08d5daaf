"""How closely a converted velocity field agrees with its source, or two fields with each other.

Everything is compared on diffusers' rectified path (x_s = (1 − s)·x0 + s·ε, u = dx/ds):

- one model: the converted field u(x_s, s) (the adapter) against the source's
  probability-flow ODE drift computed independently of the adapter, from the source's
  native output in score form: at the source point (α, σ) with x = x_s·(α + σ),
  dx/dt = f·x − ½g²·∇log p, moved to the rectified coordinates by
  x_s = x/(α+σ), s = σ/(α+σ):  dx_s/ds = (dx/dt/(α+σ) − x·(α̇+σ̇)/(α+σ)²) / ((σ̇α − σα̇)/(α+σ)²);
- two models: both fields brought to the rectified path, at the same points.

Points x_s come from the forward process of real data (or of given samples). The numbers
accumulate in :class:`FieldAgreement`, a torchmetrics metric (device-side, synced across
processes): per time, relative L2 ‖u − r‖/‖r‖, cosine similarity ⟨u, r⟩/(‖u‖‖r‖), and the
largest |u − r|.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torchmetrics import Metric

from fmconvert.errors import UsageError
from fmconvert.integration.adapters import PathAdapter
from fmconvert.math.paths import RectifiedFlow
from fmconvert.math.predictions import from_x0_eps, pf_ode_drift, to_x0_eps
from fmconvert.sampling.runs import Run

if TYPE_CHECKING:
    from fmconvert.integration.source import Source

F64 = torch.float64


class FieldAgreement(Metric):
    """Agreement of a field u with a reference r at ``num_times`` time indices."""

    full_state_update = False
    higher_is_better = None
    # the states add_state registers (torchmetrics types them loosely)
    sq_diff: torch.Tensor
    sq_ref: torch.Tensor
    sq_field: torch.Tensor
    dot: torch.Tensor
    max_abs: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_times: int, **kwargs):
        super().__init__(**kwargs)
        for name in ("sq_diff", "sq_ref", "sq_field", "dot"):
            self.add_state(name, torch.zeros(num_times, dtype=F64), dist_reduce_fx="sum")
        self.add_state("max_abs", torch.zeros(num_times, dtype=F64), dist_reduce_fx="max")
        self.add_state("count", torch.zeros(num_times, dtype=F64), dist_reduce_fx="sum")

    def update(self, index: int, field: torch.Tensor, reference: torch.Tensor) -> None:
        u, r = field.to(F64), reference.to(F64)
        self.sq_diff[index] += (u - r).square().sum()
        self.sq_ref[index] += r.square().sum()
        self.sq_field[index] += u.square().sum()
        self.dot[index] += (u * r).sum()
        self.max_abs[index] = torch.maximum(self.max_abs[index], (u - r).abs().max())
        self.count[index] += u.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "relative_l2": (self.sq_diff / self.sq_ref).sqrt(),
            "cosine": self.dot / (self.sq_field * self.sq_ref).sqrt(),
            "max_abs_error": self.max_abs,
        }


def pf_ode_reference(adapter: PathAdapter, x_s: torch.Tensor, s: torch.Tensor, **kwargs) -> torch.Tensor:
    """dx_s/ds from the adapter's wrapped network through the PF-ODE drift in score form,
    without the adapter's conversion code (see the module docstring). Float64."""
    source = adapter.source_path
    lam = RectifiedFlow().log_snr(s.to(F64))
    t = source.time_at_log_snr(lam)
    p = source.point(t).view_as_batch(x_s.ndim)
    k = p.alpha + p.sigma
    x = x_s.to(F64) * k
    native = adapter.source_output(x, source.model_timestep(t), **kwargs)
    score = from_x0_eps("score", *to_x0_eps(adapter.source_prediction, native.to(F64), x, p), p)
    drift_t = pf_ode_drift(p, x, score)
    return (drift_t / k - x * (p.d_alpha + p.d_sigma) / k**2) / ((p.d_sigma * p.alpha - p.sigma * p.d_alpha) / k**2)


def agreement_times(adapter: PathAdapter, num_times: int) -> torch.Tensor:
    """``num_times`` values of s spread evenly in the source's own time over its trained range."""
    source = adapter.source_path
    t = torch.linspace(source.t_min, source.t_max, num_times, dtype=F64)
    s = RectifiedFlow().time_at_log_snr(source.log_snr(t))
    return s.clamp(1e-6, 1 - 1e-6)


def forward_process(x0: torch.Tensor, s: float, eps: torch.Tensor) -> torch.Tensor:
    """x_s = (1 − s)·x0 + s·ε."""
    return (1 - s) * x0 + s * eps.to(x0.dtype)


def _point_batches(data: torch.Tensor, batch_size: int, s_values: list[float], seed: int, device: str):
    """(time index, s, x_s) for this process's share of the points: batch j of every time
    goes to rank j mod K; ε for point n at time i is the n-th image of the noise stream
    seeded seed + i, so the points depend on neither the batch size nor the process count."""
    from fmconvert.sampling import distributed
    from fmconvert.sampling.noise import NoiseStream, batches_of

    ranges = batches_of(len(data), batch_size)
    for i, s in enumerate(s_values):
        noise = NoiseStream(len(data), tuple(data.shape[1:]), seed + i)
        for j in distributed.my_shards(len(ranges)):
            lo, hi = ranges[j]
            x_s = forward_process(data[lo:hi].to(F64), s, noise.take(lo, hi)).to(device)
            yield i, s, x_s


@dataclass
class AgreementResult:
    s: list[float]
    per_dtype: dict[str, dict[str, list[float]]]


def _with_dtype(adapter: PathAdapter, dtype: torch.dtype) -> PathAdapter:
    return adapter if adapter.model.dtype == dtype else copy.deepcopy(adapter).to(dtype)


@torch.no_grad()
def field_vs_source(adapter: PathAdapter, data: torch.Tensor, num_times: int = 20, dtypes=("float32",),
                    batch_size: int = 256, seed: int = 0, device: str = "cpu") -> AgreementResult:
    """The converted field in each dtype against the PF-ODE drift of the float32 source."""
    s_values = agreement_times(adapter, num_times)
    reference_adapter = _with_dtype(adapter, torch.float32).to(device)
    metrics = {d: FieldAgreement(num_times).to(device) for d in dtypes}
    fields = {d: _with_dtype(reference_adapter, getattr(torch, d)) for d in dtypes}
    for i, s, x_s in _point_batches(data, batch_size, s_values.tolist(), seed, device):
        s_batch = torch.full((x_s.shape[0],), s, dtype=F64, device=device)
        reference = pf_ode_reference(reference_adapter, x_s, s_batch)
        for d, field in fields.items():
            metrics[d].update(i, field.at(x_s, s_batch, output_dtype=F64), reference)
    return AgreementResult(s_values.tolist(), {d: {k: v.tolist() for k, v in m.compute().items()} for d, m in metrics.items()})


@torch.no_grad()
def field_vs_field(first: PathAdapter, second: PathAdapter, data: torch.Tensor, num_times: int = 20,
                   batch_size: int = 256, seed: int = 0, device: str = "cpu") -> AgreementResult:
    """Two velocity fields (any sources, brought to the rectified path) at the same points;
    the second is the reference. Times cover the range both were trained on."""
    s1, s2 = agreement_times(first, num_times), agreement_times(second, num_times)
    lo, hi = max(s1.min(), s2.min()).item(), min(s1.max(), s2.max()).item()
    s_values = torch.linspace(hi, lo, num_times, dtype=F64)
    metric = FieldAgreement(num_times).to(device)
    for i, s, x_s in _point_batches(data, batch_size, s_values.tolist(), seed, device):
        s_batch = torch.full((x_s.shape[0],), s, dtype=F64, device=device)
        metric.update(i, first.at(x_s, s_batch, output_dtype=F64), second.at(x_s, s_batch, output_dtype=F64))
    return AgreementResult(s_values.tolist(), {"float32": {k: v.tolist() for k, v in metric.compute().items()}})


def trajectory_agreement(vm, base: Run, steps_list, num_images: int = 64, batch_size: int = 64,
                         device: str = "cpu") -> tuple[list[dict], list[Run]]:
    """fmconvert's Euler on the trailing grid against DDIM on the source stepping along the same
    listed (trailing) timesteps, at the same NFE and seeds (``base``'s model, seed, dtype): relative
    L2 and largest |difference| of the final samples, per NFE; and the runs compared. (diffusers'
    DDIMScheduler.step steps to t − T//N, which for N not dividing T is not its next listed
    timestep: compared with it, the rows would measure that step rule, not the conversion.)"""
    import dataclasses

    from fmconvert.sampling.generate import generate_run
    from fmconvert.sampling.runs import OdeSampler, SchedulerSampler

    rows, runs = [], []
    for steps in steps_list:
        ours = dataclasses.replace(base, sampler=OdeSampler("euler", "trailing"), steps=steps, num_images=num_images,
                                   shard_size=batch_size)
        ddim = dataclasses.replace(ours, sampler=SchedulerSampler("ddim", spacing="trailing", along_list=True))
        ours_samples, ddim_samples = generate_run(vm, ours, device).samples, generate_run(vm, ddim, device).samples
        diff = (ours_samples.double() - ddim_samples.double())
        rows.append({"nfe": steps, "relative_l2": (diff.norm() / ddim_samples.double().norm()).item(),
                     "max_abs_error": diff.abs().max().item()})
        runs += [ours, ddim]
    return rows, runs


def agree_fields(source: Source, points_run: Run, *, data: str | None = None, other: str | None = None,
                 num_times: int = 20, dtypes: list[str] | tuple[str, ...] = ("float32",),
                 steps_list: list[int] | tuple[int, ...] = (4, 8, 16, 32), num_images: int = 64, loss: bool = False,
                 seed: int = 0, device: str = "cpu", log: Callable[[str], None] = lambda message: None) -> dict:
    """What ``fmconvert agree`` measures between its options and its output. ``source`` (inspected
    once) is loaded once, its conversion applied in float64 (the network keeps its dtype); the
    points are ``data`` (:meth:`fmconvert.files.references.DataRef.images`, ``points_run.num_images``
    of them, in the model's data space) or, with none, the samples of ``points_run`` (a run
    :func:`~fmconvert.sampling.runs.plan_run` made). Then, without ``other``: the field against the
    source's PF-ODE drift in each of ``dtypes`` (:func:`field_vs_source`), for a discrete source also
    Euler against its DDIM at each of ``steps_list`` on ``num_images`` (:func:`trajectory_agreement`),
    and with ``loss`` the loss identity (:func:`loss_identity`); with ``other`` (a second model
    reference): the two fields against each other (:func:`field_vs_field`). UsageError for a model
    that needs conditioning and for data of another shape than the model's samples."""
    from fmconvert.math.paths import DiscreteVPSchedule
    from fmconvert.sampling.generate import generate_run
    from fmconvert.sampling.model import load_velocity_model, sample_shape

    vm = load_velocity_model(source, device=device, compute_dtype="float64")
    if vm.source.family.accepts:
        raise UsageError(f"agree compares unconditional fields; {vm.source.pipeline_class} ({vm.source.family.title}) "
                         "needs its conditioning, which agree does not take yet")
    payload: dict = {"model": source.reference, "loaded": vm.info, "data": data or "own samples", "runs": []}
    points_run = points_run.loaded(vm.source.model_class, sample_shape(vm))
    shape = "×".join(map(str, points_run.shape or ()))
    if data is not None:
        points = load_points(data, points_run.num_images)
        if tuple(points.shape[1:]) != tuple(points_run.shape or ()):
            raise UsageError(f"data={data} holds {'×'.join(map(str, points.shape[1:]))} images; {source.reference} "
                             f"takes {shape} (channels × height × width): give data of that shape, or none to use the "
                             "model's own samples")
    else:
        log(f"no data: using {points_run.describe()} as the points")
        points = generate_run(vm, points_run, device).samples
        payload["runs"].append(points_run.manifest())
    payload["num_points"] = len(points)
    if other is not None:
        vm2 = load_velocity_model(other, device=device, compute_dtype="float64")
        log(f"field of {source.reference} against the field of {other} at {num_times} times")
        result = field_vs_field(vm.velocity, vm2.velocity, points, num_times, seed=seed, device=device)
        payload["other"] = other
        payload["field"] = {"s": result.s, **result.per_dtype}
        return payload
    log(f"field of {source.reference} against its source's PF-ODE drift at {num_times} times, dtypes {', '.join(dtypes)}")
    result = field_vs_source(vm.velocity, points, num_times, dtypes, seed=seed, device=device)
    payload["field"] = {"s": result.s, **result.per_dtype}
    if isinstance(vm.grid_source, DiscreteVPSchedule) and not vm.source.converted:  # DDIM needs its timesteps
        log(f"trajectories: Euler vs the source's DDIM along the same timesteps at steps {', '.join(map(str, steps_list))}")
        rows, runs = trajectory_agreement(vm, points_run, steps_list, num_images, device=device)
        payload["trajectories"] = rows
        payload["runs"] += [run.manifest() for run in runs]
    if loss:
        log(f"loss identity: flow-matching loss vs the source's epsilon loss × (1 − s)⁻² at {num_times} times")
        payload["loss"] = loss_identity(vm.velocity, points, num_times, seed=seed, device=device)
    return payload


def load_points(reference: str, limit: int | None = None) -> torch.Tensor:
    """Images in data space [−1, 1] from builtin:digits[/train|/held_out] or an image folder
    (:func:`fmconvert.files.references.parse_data`)."""
    from fmconvert.files.references import parse_data

    return parse_data(reference).images(limit).float() / 127.5 - 1


@torch.no_grad()
def weighted_epsilon_loss(adapter: PathAdapter, x0: torch.Tensor, eps: torch.Tensor, s: float | torch.Tensor,
                          t: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample (B,): the source's epsilon loss |ε̂ − ε|² (mean over elements) × (1 − s)⁻², at
    the source time ``t`` of equal log-SNR to ``s`` (a float, or one per sample; ``t`` computed
    from it where not given), with x_t = α·x0 + σ·ε. ε̂ comes from calling the source network
    directly in its own prediction type, not through the adapter's conversion: for a diffusion
    source this is the flow-matching loss of its converted field (:func:`loss_identity`)."""
    source = adapter.source_path
    s_values = torch.as_tensor(s, dtype=F64, device=x0.device)
    if t is None:
        t = source.time_at_log_snr(RectifiedFlow().log_snr(s_values.reshape(-1)))
    x0, eps = x0.to(F64), eps.to(F64)
    p = source.point(t).view_as_batch(x0.ndim)
    x_t = p.alpha * x0 + p.sigma * eps
    native = adapter.source_output(x_t, source.model_timestep(t).expand(len(x0)))
    _, eps_hat = to_x0_eps(adapter.source_prediction, native.to(F64), x_t, p)
    return (eps_hat - eps).square().flatten(1).mean(1) / (1 - s_values) ** 2


def loss_identity(adapter: PathAdapter, data: torch.Tensor, num_times: int = 10, batch_size: int = 256, seed: int = 0,
                  device: str = "cpu") -> dict[str, list[float]]:
    """The flow-matching loss of the converted field against the source's epsilon loss, per time.

    At x_s = (1 − s)·x0 + s·ε the converted field's error is û − (ε − x0) = (ε̂ − ε)/(1 − s), where
    ε̂ is the source's (from its own prediction type, at the matched point x_t = α·x0 + σ·ε): so the
    flow-matching loss |û − (ε − x0)|² is the epsilon loss |ε̂ − ε|² reweighted by (1 − s)⁻² (NOTES
    §8; the two training losses are one loss). Measured per sample at ``num_times`` times inside
    the trained range (a discrete source's integer timesteps, so that no rounding moves the time);
    the source side calls the network directly, not through the adapter's conversion.

    Returns per time: ``s``, ``flow_matching_loss`` and ``weighted_epsilon_loss`` (means over the
    points, per element) and ``max_relative_difference`` (largest over the points)."""
    from fmconvert.math.paths import DiscreteVPSchedule

    source = adapter.source_path
    t = torch.linspace(source.t_min, source.t_max, num_times, dtype=F64)
    if isinstance(source, DiscreteVPSchedule):
        t = t.round().unique()
    flow = RectifiedFlow()
    s_values = flow.time_at_log_snr(source.log_snr(t))
    sums = {"flow_matching_loss": torch.zeros(len(t), dtype=F64), "weighted_epsilon_loss": torch.zeros(len(t), dtype=F64)}
    worst, count = torch.zeros(len(t), dtype=F64), torch.zeros(len(t), dtype=F64)
    for i, s in enumerate(s_values.tolist()):
        from fmconvert.sampling.noise import NoiseStream

        noise = NoiseStream(len(data), tuple(data.shape[1:]), seed + i)
        for lo in range(0, len(data), batch_size):
            x0 = data[lo:lo + batch_size].to(F64).to(device)
            eps = noise.take(lo, lo + len(x0)).to(F64).to(device)
            x_s = forward_process(x0, s, eps)
            u = adapter.at(x_s, torch.full((len(x0),), s, dtype=F64, device=device), output_dtype=F64)
            fm = (u - (eps - x0)).square().flatten(1).mean(1)
            weighted = weighted_epsilon_loss(adapter, x0, eps, s, t[i].reshape(1).to(device))
            sums["flow_matching_loss"][i] += fm.sum().cpu()
            sums["weighted_epsilon_loss"][i] += weighted.sum().cpu()
            worst[i] = torch.maximum(worst[i], ((fm - weighted).abs() / weighted).max().cpu())
            count[i] += len(x0)
    return {"s": s_values.tolist(), **{k: (v / count).tolist() for k, v in sums.items()},
            "max_relative_difference": worst.tolist()}
