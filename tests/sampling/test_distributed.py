"""Scale-out on CPU with gloo: torchrun with 2 processes gives the single-process numbers;
sample shards survive a SIGKILL and a rerun regenerates only what is missing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import error, ok
from safetensors.torch import load_file

from fmconvert.sampling.noise import NoiseStream, initial_noise


def env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "FMCONVERT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def fmconvert(tmp_path, *args, nproc=1, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    result = subprocess.run([*launcher, "-m", "fmconvert", *map(str, args)], capture_output=True, text=True,
                            env=env(tmp_path), timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 5)])
def test_noise_by_index_is_the_documented_convention(shape):
    full = initial_noise(203, shape, 11)
    stream = NoiseStream(203, shape, 11, chunk_values=400)
    for lo, hi in [(0, 3), (3, 50), (150, 203), (7, 8), (0, 203), (60, 61)]:
        assert torch.equal(stream.take(lo, hi), full[lo:hi])


@pytest.mark.slow
@pytest.mark.threads(1)
def test_fid_and_agree_from_two_processes_equal_one(tmp_path, ddpm_folder, monkeypatch):
    fid_args = ["fid", ddpm_folder, "--reference", "builtin:digits", "--steps", "2,3", "--solver", "euler",
                "--baseline", "ddim", "--num-images", 200, "--batch-size", 25, "--json"]  # > 128 features
    monkeypatch.setenv("FMCONVERT_CACHE", str(tmp_path / "cache"))
    one = json.loads(ok(*fid_args).stdout)  # in this process, at one thread (the marker)
    two = json.loads(fmconvert(tmp_path, *fid_args, nproc=2).stdout)
    # one thread a process in both (OMP_NUM_THREADS=1, as torchrun sets it): the samples and features are
    # bit-identical; only the float64 sums of the feature statistics add up in another order
    assert (one["world_size"], one["threads"], two["world_size"], two["threads"]) == (1, 1, 2, 1)
    assert len(one["rows"]) == len(two["rows"]) == 4
    for a, b in zip(one["rows"], two["rows"]):
        # float64 rounding of sums of the size of the features' moments: measured 2e-13 relative to an FID of
        # 766 against the reference, 8e-11 absolute on the FID of 0.17 between two samplers (a small
        # difference of such sums), KID equal
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-10)
        assert b.get("fid_vs_baseline", 0) == pytest.approx(a.get("fid_vs_baseline", 0), rel=0, abs=1e-9)
        assert b["kid"] == pytest.approx(a["kid"], rel=1e-10)
    agree_args = ["agree", ddpm_folder, "--num-times", 3, "--num-points", 40, "--steps", 2, "--num-images", 4,
                  "--dtypes", "float32,bfloat16", "--json"]
    one = json.loads(ok(*agree_args).stdout)
    two = json.loads(fmconvert(tmp_path, *agree_args, nproc=2).stdout)
    for dtype in ("float32", "bfloat16"):
        for key in ("relative_l2", "cosine", "max_abs_error"):
            assert two["field"][dtype][key] == pytest.approx(one["field"][dtype][key], rel=1e-6, abs=1e-18)


@pytest.mark.slow
@pytest.mark.threads(1)
def test_sample_from_two_processes_equals_one(tmp_path, ddpm_folder):
    args = ["sample", ddpm_folder, "--steps", 3, "--num-images", 10, "--batch-size", 3]
    ok(*args, "--save-tensor", tmp_path / "one.safetensors")  # in this process, at one thread (the marker)
    fmconvert(tmp_path, *args, "--save-tensor", tmp_path / "two.safetensors", nproc=2)
    assert torch.equal(load_file(tmp_path / "one.safetensors")["samples"], load_file(tmp_path / "two.safetensors")["samples"])


@pytest.mark.slow
@pytest.mark.threads(1)
def test_killed_run_resumes_from_complete_shards(tmp_path, ddpm_folder, monkeypatch):
    args = ["fid", ddpm_folder, "--reference", "builtin:digits", "--steps", 25, "--num-images", 480, "--batch-size", 8,
            "--json"]
    monkeypatch.setenv("FMCONVERT_CACHE", str(tmp_path / "cache"))
    # the killed run is a process of its own; the others run in this one, at one thread (the marker) as it does
    reference = json.loads(ok(*args, "--samples-dir", tmp_path / "full").stdout)
    samples = tmp_path / "killed"
    run_dir = samples / "euler-uniform-25"
    process = subprocess.Popen([sys.executable, "-m", "fmconvert", *map(str, args), "--samples-dir", str(samples)],
                               env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(run_dir.glob("shard-*.safetensors"))) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(run_dir.glob("shard-*.safetensors")))
    assert 3 <= done < 60, done
    (run_dir / ".shard-000059.tmp-deadbeef.safetensors").write_bytes(b"half a shard")  # what a kill can leave
    resumed = json.loads(ok(*args, "--samples-dir", samples).stdout)
    row = resumed["rows"][0]
    assert row["shards_reused"] == done
    assert row["fid"] == pytest.approx(reference["rows"][0]["fid"], rel=1e-9)
    assert not list(run_dir.glob(".shard-*"))
    again = json.loads(ok(*args, "--samples-dir", samples).stdout)
    assert again["rows"][0]["shards_reused"] == 60


def test_samples_dir_with_other_settings_is_refused(tmp_path, ddpm_folder):
    args = ["sample", ddpm_folder, "--steps", 2, "--num-images", 4, "--batch-size", 2, "--samples-dir", tmp_path / "s"]
    first = json.loads(ok(*args, "--json").stdout)
    assert first["shards_reused"] == 0
    assert json.loads(ok(*args, "--json").stdout)["shards_reused"] == 2
    for change in (["--seed", "1"], ["--solver", "heun"]):
        assert "other settings" in error(1, *args, *change)
