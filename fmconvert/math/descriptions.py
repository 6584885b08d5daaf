"""Gaussian paths as plain data: the *path description*, a dict with a ``kind`` and the
constructor's arguments, that a converted folder records and
:func:`fmconvert.math.paths.path_from_config` builds a path from. Plain Python (no torch), so
``fmconvert wrap`` can write one in milliseconds.

A discrete VP schedule is described by its beta settings (diffusers' config keys, since they are
the schedule's parameters: Ho et al. 2020; Nichol & Dhariwal 2021; Lin et al. 2024 for zero
terminal SNR), so its betas are computed in one place,
:meth:`fmconvert.math.paths.DiscreteVPSchedule.from_config`.
"""

from __future__ import annotations

from typing import Any, Mapping

#: the config keys that define a discrete VP schedule (its betas)
DISCRETE_VP_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                    "rescale_betas_zero_snr")
#: diffusers' beta_schedule names that fmconvert reproduces bit for bit
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def discrete_vp_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The path description of the discrete VP schedule in a scheduler config: its
    :data:`DISCRETE_VP_KEYS` that are set. ValueError for a schedule fmconvert cannot reproduce."""
    schedule = {k: config[k] for k in DISCRETE_VP_KEYS if config.get(k) is not None}
    betas = schedule.get("trained_betas")
    if betas is not None:
        if len(betas) < 2 or not all(0 <= float(b) <= 1 for b in betas):
            raise ValueError("trained_betas must hold at least 2 values in [0, 1]")
    elif schedule.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ValueError(f"unsupported beta_schedule {schedule['beta_schedule']!r}: supported are "
                         f"{', '.join(repr(s) for s in BETA_SCHEDULES)}, or trained_betas")
    return {"kind": "discrete_vp", **schedule}


def rectified_flow(shift: float = 1.0, num_train_timesteps: int = 1000,
                   timestep_scale: float | None = None) -> dict[str, Any]:
    """The path description of diffusers' FlowMatch path (:class:`~fmconvert.math.paths.RectifiedFlow`);
    ``timestep_scale``: the network's timestep per unit of s where it is not num_train_timesteps."""
    path = {"kind": "rectified_flow", "shift": float(shift), "num_train_timesteps": int(num_train_timesteps)}
    if timestep_scale is not None:
        path["timestep_scale"] = float(timestep_scale)
    return path


def num_train_timesteps(path: Mapping[str, Any]) -> int:
    """T of a path description: the length of a discrete VP schedule (its ᾱ table or
    trained_betas, else num_train_timesteps), a FlowMatch path's num_train_timesteps; 1000 else."""
    for table in ("alphas_cumprod", "trained_betas"):
        if path.get(table) is not None:
            return len(path[table])
    return int(path.get("num_train_timesteps", 1000))


def describe_path(path: Mapping[str, Any]) -> str:
    """A path description in one line, ``kind(key=value, ...)``, tables shortened to their length."""
    args = ", ".join(f"{k}=[{len(v)} values]" if isinstance(v, (list, tuple)) else f"{k}={v!r}"
                     for k, v in path.items() if k != "kind")
    return f"{path.get('kind')}({args})"
