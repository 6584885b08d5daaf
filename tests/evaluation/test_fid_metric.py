"""FeatureStatistics, the torchmetrics Metric of one image set's feature statistics: its FID is
torchmetrics' own FrechetInceptionDistance bit for bit, its states are declared with their
reductions, merge and sync as torchmetrics does, and no code writes torchmetrics' private state."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum

from fmconvert.evaluation import fid, statistics
from fmconvert.evaluation.statistics import KID_KEEP, FeatureStatistics, Identity, fid_between, kid_between

D = 8


def features(n, seed, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=generator, dtype=torch.float64) * scale + shift


def fed(*batches, metric=None):
    metric = metric if metric is not None else FeatureStatistics(D)
    for batch in batches:
        metric.update(batch)
    return metric


def test_fid_is_torchmetrics_fid_bit_for_bit():
    real, fake = features(300, 0), features(250, 1, scale=1.3, shift=0.2)
    theirs = FrechetInceptionDistance(feature=Identity(D), normalize=False)
    for batch in real.split(64):
        theirs.update(batch, real=True)
    for batch in fake.split(100):
        theirs.update(batch, real=False)
    reference, other = fed(*real.split(64)), fed(*fake.split(100))
    assert fid_between(reference, other) == float(theirs.compute())
    # the metric's compute: mean and unbiased covariance, as torch computes them from the features
    mean, cov = reference.compute()
    assert mean.shape == (D,) and cov.shape == (D, D) and mean.dtype == cov.dtype == torch.float64
    assert torch.allclose(mean, real.mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(cov, torch.cov(real.t()), rtol=0, atol=1e-12)


def test_states_are_declared_with_their_reductions():
    metric = FeatureStatistics(D)
    assert set(metric.metric_state) == {"features_sum", "features_cov_sum", "num_samples", "kid_features", "kid_index"}
    reductions = metric._reductions  # (read only: torchmetrics keeps add_state's reductions there)
    assert {name: reductions[name] for name in metric.metric_state} == {
        "features_sum": dim_zero_sum, "features_cov_sum": dim_zero_sum, "num_samples": dim_zero_sum,
        "kid_features": dim_zero_cat, "kid_index": dim_zero_cat}
    assert metric.features_sum.dtype == metric.features_cov_sum.dtype == torch.float64
    assert metric.features_cov_sum.shape == (D, D) and metric.num_samples.dtype == torch.int64


def test_halves_merged_equal_the_whole():
    x, y = features(400, 2), features(300, 3, shift=0.1)
    whole, other = fed(*x.split(50)), fed(y)
    first, second = FeatureStatistics(D), FeatureStatistics(D)
    for j, batch in enumerate(x.split(50)):  # shards j ≡ rank (mod 2), by global index, as the sweep splits them
        (first if j % 2 == 0 else second).update(batch, 50 * j)
    second.merge_state(first)  # (incoming first, then local: the kept features are put back in index order)
    assert second.count == whole.count == 400
    assert fid_between(second, other) == pytest.approx(fid_between(whole, other), rel=1e-12, abs=1e-12)
    assert torch.equal(second.kept, whole.kept)
    assert fid_between(whole, whole) == pytest.approx(0, abs=1e-9)
    assert whole.sum_over_processes() is whole and whole.count == 400  # one process: nothing to sum


def test_kept_features_are_the_first_kid_keep_by_index():
    x = features(KID_KEEP + 500, 4)
    metric = FeatureStatistics(D)
    for start in (6000, 0, 9000, 3000):  # out of order, the last shard past KID_KEEP
        metric.update(x[start:start + 3000 if start < 9000 else None], start)
    assert metric.count == len(x) and metric.num_kept == KID_KEEP
    assert torch.equal(metric.kept, x[:KID_KEEP].float())
    assert kid_between(metric, fed(x[:99])) is None  # fewer than 100 kept
    mean, std = kid_between(metric, fed(features(500, 5, shift=0.5)))
    assert mean > 0 and std > 0


def test_statistics_files_keep_their_keys():
    x = features(150, 6)
    stats = fed(x[:100], x[100:])
    tensors = stats.tensors()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "features_sum": (torch.float64, (D,)), "features_cov_sum": (torch.float64, (D, D)),
        "num_samples": (torch.int64, (1,)), "kid_features": (torch.float32, (150, D))}
    again = FeatureStatistics.from_tensors(tensors)
    assert fid_between(again, fed(features(90, 7))) == fid_between(stats, fed(features(90, 7)))
    assert torch.equal(again.tensors()["kid_features"], tensors["kid_features"]) and again.count == 150


def test_no_code_writes_torchmetrics_private_state():
    for module in (fid, statistics):
        source = inspect.getsource(module)
        for name in ("_update_count", "fake_features", "real_features", "orig_dtype"):
            assert name not in source, (module.__name__, name)
        assert not re.search(r"\w\._\w+\s*=[^=]", source), module.__name__  # no `obj._private = ...`


SYNC = r"""
import json, sys, torch
from fmconvert.sampling import distributed
from fmconvert.evaluation.statistics import FeatureStatistics, fid_between, KID_KEEP
distributed.init("cpu")
rank = distributed.rank()
x = torch.randn(KID_KEEP + 600, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
shards = [(0, 4000), (4000, 8000), (8000, KID_KEEP + 300), (KID_KEEP + 300, KID_KEEP + 600)]
mine = FeatureStatistics(8)
for j in distributed.my_shards(len(shards)):  # rank 1's shards: 4000..8000 and past KID_KEEP
    mine.update(x[slice(*shards[j])], shards[j][0])
late = FeatureStatistics(8)  # rank 1 keeps no features for KID
if rank == 0:
    late.update(x[:300], 0)
else:
    late.update(x[KID_KEEP:KID_KEEP + 300], KID_KEEP)
mine.sum_over_processes(); late.sum_over_processes()
if rank == 0:
    one = FeatureStatistics(8)
    one.update(x)
    other = FeatureStatistics(8)
    other.update(x[:500] * 1.1)
    print(json.dumps({"count": [mine.count, late.count], "kept": [mine.num_kept, late.num_kept],
                      "kept_equal": bool(torch.equal(mine.kept, x[:KID_KEEP].float())),
                      "late_kept_equal": bool(torch.equal(late.kept, x[:300].float())),
                      "fid": [fid_between(mine, other), fid_between(one, other)]}))
"""


def test_sum_over_processes_with_gloo(tmp_path):
    """Two processes (torchrun, gloo): the states are the totals and the kept features are in index
    order, also when one rank kept none."""
    script = tmp_path / "sync.py"
    script.write_text(SYNC)
    root = str(Path(statistics.__file__).parents[2])  # this checkout's fmconvert, whatever is installed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["count"] == [KID_KEEP + 600, 600] and out["kept"] == [KID_KEEP, 300]
    assert out["kept_equal"] and out["late_kept_equal"]
    assert out["fid"][0] == pytest.approx(out["fid"][1], rel=1e-10)
