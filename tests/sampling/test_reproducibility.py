"""What leaves results bit-identical and what moves them at rounding, as docs/scaling.md's
"Reproducibility" states it (the world size: tests/sampling/test_distributed.py; a resumed samples folder:
there too; the device: tests/test_cuda.py)."""

import json

import pytest
import torch
from conftest import ok
from safetensors.torch import load_file

DIGITS_FID = ("fid", "builtin:digits-eps", "--reference", "builtin:digits", "--features", "digits", "--steps", 4,
              "--num-images", 512, "--seed", 5, "--json")


def _samples(tmp_path, model, *args):
    ok("sample", model, "--steps", 3, "--num-images", 10, "--seed", 4, *args, "--save-tensor", tmp_path / "x.safetensors")
    return load_file(tmp_path / "x.safetensors")["samples"]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_the_same_command_gives_bit_identical_numbers(tmp_path, ddpm_folder):
    assert torch.equal(_samples(tmp_path, ddpm_folder), _samples(tmp_path, ddpm_folder))
    first, again = (json.loads(ok(*DIGITS_FID, "--num-images", 200).stdout) for _ in range(2))
    assert first["rows"][0]["fid"] == again["rows"][0]["fid"] and first["rows"][0]["kid"] == again["rows"][0]["kid"]


def test_the_batch_size_moves_samples_at_rounding_only(tmp_path, ddpm_folder):
    """The noise is drawn by image index (tests/sampling/test_distributed.py), but the network's batched
    kernels round differently per batch shape: measured 2.1e-7 relative here (batches of 2 and 5),
    4.5e-5 on digits-eps after 8 steps (batches of 16 and 64), whose first step divides by alpha_T."""
    one, other = _samples(tmp_path, ddpm_folder, "--batch-size", 2), _samples(tmp_path, ddpm_folder, "--batch-size", 5)
    assert _rel(one, other) <= 1e-6


def test_the_thread_count_moves_numbers_at_rounding_only():
    """CPU kernels may split their reductions by thread: at 4 steps FID 71.03170864093863 with 1 thread,
    71.0317086409409 with 2 (3e-15 relative); at 8 steps 27.472064 and 27.472923 (3.1e-5)."""
    before = torch.get_num_threads()
    try:
        fids = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            result = json.loads(ok(*DIGITS_FID).stdout)
            assert result["threads"] == threads and result["world_size"] == 1
            fids[threads] = result["rows"][0]["fid"]
    finally:
        torch.set_num_threads(before)
    assert fids[2] == pytest.approx(fids[1], rel=1e-4)
