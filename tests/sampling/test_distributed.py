"""Scale-out on CPU with gloo: torchrun with 2 processes gives the single-process numbers;
sample shards survive a SIGKILL and a rerun regenerates only what is missing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import error, ok
from safetensors.torch import load_file

from fmconvert.sampling.noise import NoiseStream, initial_noise


def env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "FMCONVERT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def two_processes(tmp_path, *commands):
    """The fmconvert ``commands`` (argument lists) one after another in each of two torchrun processes, one
    launch for all (tests/commands_in_one_process.py); rank 0's stdout of each."""
    out = tmp_path / "two-processes"
    out.mkdir()
    root = Path(__file__).parents[2]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(root / "tests" / "commands_in_one_process.py")]
    # (a script's own folder leads its sys.path: the checkout's fmconvert, as python -m fmconvert here imports it)
    result = subprocess.run([*launcher, str(out), json.dumps([list(map(str, args)) for args in commands])],
                            capture_output=True, text=True, timeout=600,
                            env={**env(tmp_path), "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(out / f"{i}.rank{rank}.code").read_text() for i in range(len(commands)) for rank in (0, 1)] == \
        ["0"] * 2 * len(commands)
    return [(out / f"{i}.rank0.out").read_text() for i in range(len(commands))]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 5)])
def test_noise_by_index_is_the_documented_convention(shape):
    full = initial_noise(203, shape, 11)
    stream = NoiseStream(203, shape, 11, chunk_values=400)
    for lo, hi in [(0, 3), (3, 50), (150, 203), (7, 8), (0, 203), (60, 61)]:
        assert torch.equal(stream.take(lo, hi), full[lo:hi])


@pytest.mark.slow
@pytest.mark.threads(1)
def test_fid_agree_and_sample_from_two_processes_equal_one(tmp_path, ddpm_folder, monkeypatch):
    fid_args = ["fid", ddpm_folder, "--reference", "builtin:digits", "--steps", "2,3", "--solver", "euler",
                "--baseline", "ddim", "--num-images", 200, "--batch-size", 25, "--json"]  # > 128 features
    agree_args = ["agree", ddpm_folder, "--num-times", 3, "--num-points", 40, "--steps", 2, "--num-images", 4,
                  "--dtypes", "float32,bfloat16", "--json"]
    sample_args = ["sample", ddpm_folder, "--steps", 3, "--num-images", 10, "--batch-size", 3]
    monkeypatch.setenv("FMCONVERT_CACHE", str(tmp_path / "cache"))
    # in this process, at one thread (the marker)
    one_fid, one_agree = (json.loads(ok(*args).stdout) for args in (fid_args, agree_args))
    ok(*sample_args, "--save-tensor", tmp_path / "one.safetensors")
    two_fid, two_agree, _ = map(json.loads, two_processes(tmp_path, fid_args, agree_args,
                                                          [*sample_args, "--json", "--save-tensor", tmp_path / "two.safetensors"]))
    # one thread a process in both (OMP_NUM_THREADS=1, as torchrun sets it): the samples and features are
    # bit-identical; only the float64 sums of the feature statistics add up in another order
    assert (one_fid["world_size"], one_fid["threads"], two_fid["world_size"], two_fid["threads"]) == (1, 1, 2, 1)
    assert len(one_fid["rows"]) == len(two_fid["rows"]) == 4
    for a, b in zip(one_fid["rows"], two_fid["rows"]):
        # float64 rounding of sums of the size of the features' moments: measured 2e-13 relative to an FID of
        # 766 against the reference, 8e-11 absolute on the FID of 0.17 between two samplers (a small
        # difference of such sums), KID equal
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-10)
        assert b.get("fid_vs_baseline", 0) == pytest.approx(a.get("fid_vs_baseline", 0), rel=0, abs=1e-9)
        assert b["kid"] == pytest.approx(a["kid"], rel=1e-10)
    for dtype in ("float32", "bfloat16"):
        for key in ("relative_l2", "cosine", "max_abs_error"):
            assert two_agree["field"][dtype][key] == pytest.approx(one_agree["field"][dtype][key], rel=1e-6, abs=1e-18)
    assert torch.equal(load_file(tmp_path / "one.safetensors")["samples"], load_file(tmp_path / "two.safetensors")["samples"])


@pytest.mark.slow
@pytest.mark.threads(1)
def test_killed_run_resumes_from_complete_shards(tmp_path, ddpm_folder, monkeypatch):
    args = ["fid", ddpm_folder, "--reference", "builtin:digits", "--steps", 10, "--num-images", 240, "--batch-size", 8,
            "--json"]
    monkeypatch.setenv("FMCONVERT_CACHE", str(tmp_path / "cache"))
    # the killed run is a process of its own; the others run in this one, at one thread (the marker) as it does
    reference = json.loads(ok(*args, "--samples-dir", tmp_path / "full").stdout)
    samples = tmp_path / "killed"
    run_dir = samples / "euler-uniform-10"
    process = subprocess.Popen([sys.executable, "-m", "fmconvert", *map(str, args), "--samples-dir", str(samples)],
                               env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(run_dir.glob("shard-*.safetensors"))) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(run_dir.glob("shard-*.safetensors")))
    assert 3 <= done < 30, done
    (run_dir / ".shard-000029.tmp-deadbeef.safetensors").write_bytes(b"half a shard")  # what a kill can leave
    resumed = json.loads(ok(*args, "--samples-dir", samples).stdout)
    row = resumed["rows"][0]
    assert row["shards_reused"] == done
    assert row["fid"] == pytest.approx(reference["rows"][0]["fid"], rel=1e-9)
    assert not list(run_dir.glob(".shard-*"))
    again = json.loads(ok(*args, "--samples-dir", samples).stdout)
    assert again["rows"][0]["shards_reused"] == 30


def test_samples_dir_with_other_settings_is_refused(tmp_path, ddpm_folder):
    args = ["sample", ddpm_folder, "--steps", 2, "--num-images", 4, "--batch-size", 2, "--samples-dir", tmp_path / "s"]
    first = json.loads(ok(*args, "--json").stdout)
    assert first["shards_reused"] == 0
    assert json.loads(ok(*args, "--json").stdout)["shards_reused"] == 2
    for change in (["--seed", "1"], ["--solver", "heun"]):
        assert "other settings" in error(1, *args, *change)
