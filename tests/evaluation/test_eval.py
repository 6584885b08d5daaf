"""`fmconvert agree` and `fmconvert fid`: agreement numbers, FID against torch-fidelity,
the statistics cache, the offline Inception error, and FID of a set against itself."""

import json

import pytest
import torch
from conftest import error, ok
from typer.testing import CliRunner

from fmconvert.cli import app
from fmconvert.evaluation.fid import fid_between, make_extractor, reference_stats, stats_of
from fmconvert.evaluation.statistics import FeatureStatistics
from fmconvert.zoo.datasets import load_digits

runner = CliRunner()


def ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FMCONVERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


# -- agree ------------------------------------------------------------------------------------


def test_agree_converted_field_matches_the_source_drift(ddpm_folder):
    payload = json.loads(ok("agree", ddpm_folder, "--num-times", 6, "--num-points", 8, "--dtypes", "float32,bfloat16",
                            "--steps", "2,7", "--num-images", 4, "--json").stdout)
    field = payload["field"]
    assert len(field["s"]) == 6 and min(field["s"]) > 0 and max(field["s"]) < 1
    assert max(field["float32"]["relative_l2"]) < 1e-5
    assert min(field["float32"]["cosine"]) > 1 - 1e-9
    # bfloat16 is measurably worse but still close: the check can tell dtypes apart
    assert 1e-5 < max(field["bfloat16"]["relative_l2"]) < 0.1
    # against DDIM along its own listed timesteps: 7 does not divide 1000, where diffusers' DDIM step
    # (to t − T//N) read 6.5e-3 while fmconvert matched DDIM along the list to 2e-7
    assert [row["nfe"] for row in payload["trajectories"]] == [2, 7]
    assert all(row["relative_l2"] < 1e-5 for row in payload["trajectories"])


def test_agree_two_models_on_one_path(ddpm_folder, flow_folder):
    same = json.loads(ok("agree", ddpm_folder, ddpm_folder, "--num-times", 4, "--num-points", 8, "--json").stdout)
    assert max(same["field"]["float32"]["relative_l2"]) == 0.0
    other = json.loads(ok("agree", ddpm_folder, flow_folder, "--num-times", 4, "--num-points", 8, "--json").stdout)
    rel = other["field"]["float32"]["relative_l2"]
    assert len(rel) == 4 and all(0 < r < float("inf") for r in rel)  # two random networks disagree


def test_agree_with_data_points():
    digits = load_digits("held_out")
    assert digits.data.shape[1:] == (1, 8, 8)
    result = runner.invoke(app, ["agree", "builtin:digits-eps", "--data", "builtin:digits/held_out", "--num-times", "3",
                                 "--num-points", "16", "--steps", "2", "--num-images", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["num_points"] == 16 and max(payload["field"]["float32"]["relative_l2"]) < 1e-5


def test_agree_is_one_library_call_whose_errors_name_parameters(ddpm_folder):
    """The command's numbers are agree_fields' (the library's one call); its refusal of data of
    another shape names the parameter, data=..., which the command line says as --data."""
    from fmconvert.errors import UsageError
    from fmconvert.evaluation.agreement import agree_fields
    from fmconvert.sampling.runs import plan_run

    run, source = plan_run("builtin:digits-eps", ["euler"], steps=50, num_images=8, shard_size=256)
    payload = agree_fields(source, run, data="builtin:digits/held_out", num_times=3, steps_list=(2,), num_images=2)
    command = json.loads(ok("agree", "builtin:digits-eps", "--data", "builtin:digits/held_out", "--num-times", 3,
                            "--num-points", 8, "--steps", 2, "--num-images", 2, "--json").stdout)
    assert payload["field"] == command["field"] and payload["trajectories"] == command["trajectories"]
    assert payload["num_points"] == 8
    run, source = plan_run(str(ddpm_folder), ["euler"], steps=50, num_images=8, shard_size=256)
    with pytest.raises(UsageError, match=r"^data=builtin:digits holds 1×8×8 images"):
        agree_fields(source, run, data="builtin:digits")
    line = error(2, "agree", ddpm_folder, "--data", "builtin:digits", "--num-points", 8)
    assert "--data builtin:digits holds 1×8×8 images" in line, line


# -- FID ----------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero():
    extractor = make_extractor("digits")
    images = load_digits().images
    stats = stats_of([images[:900], images[900:]], extractor)
    assert abs(fid_between(stats, stats)) < 1e-6
    ref = reference_stats("builtin:digits", extractor)
    assert abs(fid_between(ref.stats, stats)) < 1e-6


def test_fid_sweep_caches_reference_statistics(tmp_path, ddpm_folder):
    args = ["fid", ddpm_folder, "--reference", "builtin:digits", "--steps", "2,3", "--solver", "euler,heun",
            "--baseline", "ddim", "--num-images", 120, "--batch-size", 60, "--json"]
    first = json.loads(ok(*args, "--plot", tmp_path / "fid.png").stdout)
    second = json.loads(ok(*args).stdout)
    assert first["reference_stats"]["reused"] is False and second["reference_stats"]["reused"] is True
    assert [r["fid"] for r in first["rows"]] == [r["fid"] for r in second["rows"]]
    samplers = [(r["sampler"], r["steps"], r["baseline"]) for r in first["rows"]]
    assert samplers == [("ddim", 2, True), ("ddim", 3, True), ("euler", 2, False), ("euler", 3, False),
                        ("heun", 2, False), ("heun", 3, False)]
    assert all("fid_vs_baseline" in r for r in first["rows"] if not r["baseline"])
    assert all("kid" in r for r in first["rows"])  # 120 samples: KID is reported
    assert [r["nfe"] for r in first["rows"] if r["sampler"] == "heun"] == [3, 5]
    assert (tmp_path / "fid.png").stat().st_size > 1000
    # a statistics file as the reference gives the same numbers
    ok("fid", ddpm_folder, "--reference", "builtin:digits", "--steps", 2, "--num-images", 120, "--batch-size", 60,
       "--save-reference-stats", tmp_path / "ref.safetensors")
    from_file = json.loads(ok("fid", ddpm_folder, "--reference", tmp_path / "ref.safetensors", "--steps", 2,
                              "--num-images", 120, "--batch-size", 60, "--json").stdout)
    assert from_file["reference_stats"]["source"] == "file"
    assert from_file["rows"][0]["fid"] == pytest.approx(first["rows"][2]["fid"], rel=1e-12)


def test_fid_streams_samples(monkeypatch, ddpm_folder):
    """The sweep never holds more than one batch of samples."""
    import fmconvert.sampling.generate as sampling

    largest = []
    original = sampling.iter_run

    def spy(*args, **kwargs):
        for x, images, nfe in original(*args, **kwargs):
            largest.append(len(x))
            yield x, images, nfe

    monkeypatch.setattr(sampling, "iter_run", spy)
    ok("fid", ddpm_folder, "--reference", "builtin:digits", "--steps", 2, "--num-images", 100, "--batch-size", 25)
    assert largest == [25, 25, 25, 25]


def test_offline_inception_error_names_the_file(tmp_path, ddpm_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["fid", str(ddpm_folder), "--reference", "builtin:digits", "--features", "inception"])
    assert result.exit_code == 1
    line = [x for x in result.stderr.splitlines() if x.startswith("error:")][0]
    assert "weights-inception-2015-12-05-6726825d.pth" in line and "checkpoints" in line and "--inception-weights" in line


def _random_inception_weights(path):
    """torch-fidelity's InceptionV3 with random weights (no download), saved as a state dict."""
    pytest.importorskip("torch_fidelity")
    from fmconvert.testing import random_inception_weights

    return random_inception_weights(path, load_digits().images[::200].expand(-1, 3, -1, -1))


class _UInt8Dataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.mark.slow
def test_inception_fid_equals_torch_fidelity(tmp_path):
    torch_fidelity = pytest.importorskip("torch_fidelity")
    weights = _random_inception_weights(tmp_path / "inception.pth")
    digits = load_digits().images.expand(-1, 3, -1, -1).contiguous()
    # mirrored digits: a real difference; more images than the 64 features, so both covariances have full rank
    real, fake = digits[:96], digits[300:372].flip(-1)
    theirs = torch_fidelity.calculate_metrics(
        input1=_UInt8Dataset(fake), input2=_UInt8Dataset(real), fid=True, cuda=False, batch_size=100,
        feature_extractor="inception-v3-compat", feature_layer_fid="64", feature_extractor_weights_path=str(weights),
        verbose=False, cache=False, save_cpu_ram=True,
    )["frechet_inception_distance"]
    extractor = make_extractor("inception", weights, inception_layer="64")
    ours = fid_between(stats_of([real[:48], real[48:]], extractor), stats_of([fake], extractor))
    assert theirs > 1e-3
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_inception_weights_must_be_plain_tensors(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv": torch.zeros(1), "extra": FeatureStatistics}, bad)  # a pickled class, not just tensors
    from fmconvert.errors import FmconvertError

    with pytest.raises(FmconvertError, match="plain state dict"):
        make_extractor("inception", bad)


def test_report_writes_the_whole_story(tmp_path, ddpm_folder, flow_folder):
    """The report command end to end on tiny models (the README's main command runs it on the zoo)."""
    from fmconvert.files.images import save_folder

    data = tmp_path / "points"
    save_folder(torch.rand(24, 3, 8, 8), data)
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(ddpm_folder), "--other", str(flow_folder), "--out", str(out),
                                 "--data", str(data), "--steps", "2,3", "--num-images", "40", "--num-times", "3",
                                 "--sampler-steps", "2,3", "--tune-steps", "3", "--tune-pairs", "16",
                                 "--tune-validation-pairs", "24", "--tune-iterations", "12", "--tune-teacher-steps", "16",
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    numbers = json.loads(result.stdout)
    files = sorted(p.name for p in out.iterdir())
    for name in ("report.md", "report.json", "samples.png", "agreement.png", "two-models.png", "fid.png", "converted"):
        assert name in files
    assert numbers["samples"]["relative_l2"] < 1e-5  # converted Euler = source DDIM, 50 steps
    assert max(numbers["field"]["float32"]["relative_l2"]) < 1e-5
    text = (out / "report.md").read_text()
    assert "FID vs DDIM baseline" in text and "![samples](samples.png)" in text
    assert runner.invoke(app, ["report", str(ddpm_folder), "--out", str(out)]).exit_code == 2  # exists: needs --force
    # the samplers at few steps: the default and the tuned one against the peers, from the same noise
    samplers = numbers["samplers"]
    assert {"samplers.png", "tuned_sampler.json"} <= set(files) and "## Samplers at few steps" in text
    rows = samplers["rows"]
    assert rows[0]["sampler"] == "rk4" and rows[0]["nfe"] == 100 and samplers["seed"] == 1000
    assert {(r["sampler"], r["nfe"]) for r in rows if r["kind"] == "peer"} == {
        (p, n) for p in ("dpm++2m", "unipc") for n in (2, 3)}
    assert [r["sampler"] for r in rows if r["kind"] == "default"] == ["ab2", "ab2"]  # auto, as it ran
    (tuned,) = [r for r in rows if r["kind"] == "tuned"]
    assert tuned["grid"] == "tuned" and tuned["nfe"] == 3
    at3 = next(e for e in samplers["table"] if e["nfe"] == 3)
    best = min((r for r in rows if r["kind"] == "peer" and r["nfe"] == 3), key=lambda r: r["fid"])
    assert at3["best_peer"] == best["sampler"]
    floor = rows[0]["fid"]
    if best["fid"] > floor:
        assert at3["tuned_ratio"] == pytest.approx((tuned["fid"] - floor) / (best["fid"] - floor))
    from fmconvert.sampling.tuned import TunedFile

    (grid,) = TunedFile.load(out / "tuned_sampler.json").grids
    assert grid.method == "ld3" and (grid.tuning["pairs"], grid.tuning["validation_pairs"]) == (16, 24)
    assert grid.tuning["iterations"] == len(grid.tuning["losses"]) == 12 and grid.tuning["teacher"]["steps"] == 16
    assert {k: samplers["tuning"][k] for k in ("pairs", "iterations", "teacher_steps")} == {
        "pairs": 16, "iterations": 12, "teacher_steps": 16}
    assert "16 pairs, 12 iterations, teacher rk4 in 16 steps" in text  # (the report says how it was tuned)
    refused = runner.invoke(app, ["report", str(ddpm_folder), "--out", str(tmp_path / "r2"), "--sampler-steps", "2,3",
                                  "--tune-steps", "4"])
    assert refused.exit_code == 2 and "tune at some of those" in refused.output + refused.stderr
    for args, message in ((["--sampler-steps", "1,2", "--tune-steps", "1"], "below ab2's order 2"),
                          (["--peer", "nosuch"], "unknown baseline"),
                          (["--tune-validation-pairs", "0"], "must be a positive integer"),
                          (["--tune-iterations", "0"], "--tune-iterations must be a positive integer")):  # (refused before any work: no folder left)
        refused = runner.invoke(app, ["report", str(ddpm_folder), "--out", str(tmp_path / "r3"), *args])
        assert refused.exit_code == 2 and message in refused.output + refused.stderr, refused.output
        assert not (tmp_path / "r3").exists()


def test_data_and_reference_strings_have_one_parser(ddpm_folder, tmp_path):
    """`agree --data builtin:digits/heldout` (a typo for held_out) used the 1,500-image train split
    silently while `fid` refused it: both refuse it now, in one line listing the valid forms,
    before any model is loaded; an unknown builtin name too."""
    from fmconvert.files.references import parse_data

    line = error(2, "agree", "no/such/model", "--data", "builtin:digits/heldout")
    assert "heldout" in line and "builtin:digits/held_out" in line and "builtin:digits/train" in line
    line = error(2, "fid", "no/such/model", "--reference", "builtin:digits/heldout")
    assert "heldout" in line and "builtin:digits/held_out" in line
    assert "builtin:digits" in error(2, "fid", ddpm_folder, "--reference", "builtin:digitz", "--steps", 1)
    assert "does not exist" in error(2, "agree", ddpm_folder, "--data", tmp_path / "missing")
    (tmp_path / "stats.txt").write_text("x")
    assert "is a file" in error(2, "fid", ddpm_folder, "--reference", tmp_path / "stats.txt", "--steps", 1)
    assert parse_data("builtin:digits").split == "all" and parse_data("builtin:digits/train").split == "train"
    assert parse_data(str(tmp_path)).kind == "folder"


def test_fid_samples_dir_knows_the_dtype(tmp_path, ddpm_folder):
    """The same fid command with --dtype bfloat16 after float32 reported every shard reused and the
    identical FID: fid's record of a run had no dtype. Now the second run is refused."""
    args = ["fid", ddpm_folder, "--reference", "builtin:digits", "--steps", 2, "--num-images", 4, "--batch-size", 2,
            "--samples-dir", tmp_path / "s"]
    first = json.loads(ok(*args, "--dtype", "float32", "--json").stdout)
    assert first["rows"][0]["shards_reused"] == 0
    assert json.loads(ok(*args, "--dtype", "float32", "--json").stdout)["rows"][0]["shards_reused"] == 2
    assert "other settings" in error(1, *args, "--dtype", "bfloat16")


def test_fewer_samples_than_feature_dimensions_are_warned_of(ddpm_folder):
    result = runner.invoke(app, ["fid", str(ddpm_folder), "--reference", "builtin:digits", "--steps", "1",
                                 "--num-images", "4", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    assert "warning: 4 samples for 128-dimensional digits features" in result.stderr
    assert json.loads(result.stdout)["rows"][0]["num_samples"] == 4
