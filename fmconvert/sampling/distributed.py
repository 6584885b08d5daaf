"""Running under torchrun / accelerate launch: process group, ranks, and splitting work.

Launched with ``torchrun --nproc_per_node K -m fmconvert ...`` (or ``accelerate launch``),
every process sees RANK / WORLD_SIZE / LOCAL_RANK; :func:`init` joins the group (NCCL on
GPUs, gloo on CPU). Work is split by global sample index in shards: shard j goes to rank
j mod K. Metrics are torchmetrics states, summed across ranks; rank 0 alone writes and
prints. Without those variables everything runs as one process.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str = "auto") -> str:
    """Join the process group if launched by torchrun; returns the device for this rank."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        # left to interpreter teardown, gloo's threads can abort the process after its work
        # is done ("terminate called without an active exception"): shut the group down first
        atexit.register(_shutdown)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if launched and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def computed_on(device: str) -> dict:
    """Where numbers are computed, for records: the device, torch's version, the CPU kernels torch
    dispatches to (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, …), this process's torch
    threads and the number of processes. Results are bit-identical only where these (and the batch
    size) are the same, or the world size alone changes (docs/scaling.md, "Reproducibility"); a
    tuning descent's grid differs with the CPU kernels, not with the threads (measured there)."""
    return {"device": device, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "world_size": world_size()}


def machine() -> str:
    """This machine in a benchmark's words: its architecture, the CPU kernels torch dispatches to, and the
    process's torch threads (e.g. ``x86_64 (AVX512), 2 threads``): what a tuning's grids depend on."""
    import platform

    return f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"


def my_shards(num_shards: int) -> list[int]:
    """The shard indices this rank works on: j ≡ rank (mod world size)."""
    return list(range(rank(), num_shards, world_size()))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_objects(value) -> list:
    """Every rank's ``value``, in rank order (on every rank)."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def sum_int(value: int) -> int:
    return sum(gather_objects(value))
