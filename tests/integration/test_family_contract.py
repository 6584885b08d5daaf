"""The family contract, generated from :data:`fmconvert.integration.families.FAMILIES`: every family has a
replica (a tiny copy of a real Hub repo of its pipeline, tests/replicas.py or tests/replicas_continuous.py),
and on it the converted model, with fmconvert's euler on the trailing grid, reproduces the source
pipeline's own DDIM at rounding; for a flow-matching family, whose "DDIM" is its own
FlowMatchEulerDiscreteScheduler, `fmconvert sample` drives the source as it is on the flowmatch grid.
A new family gets these tests by being registered, and fails the first until it has a replica.

A replica's family is read from the model_index.json it copies (transcribed in tests/integration/
test_replicas.py and test_replicas_continuous.py, which check the written folders against them).
tests/integration/test_families.py::test_family_converts_and_reproduces_its_ddim checks more (the stock
diffusers pipeline, fmconvert.load) per replica, over the discrete replicas; this suite is the one keyed
by family. The helpers are test_families' and test_flow_sources'.
"""

import json

import pytest
from conftest import ok
from diffusers import DiffusionPipeline
from replicas import REPLICAS, build_replica, one_thread
from replicas_continuous import CONTINUOUS_REPLICAS, build_continuous_replica
from test_families import SAMPLE_OUTPUT, rel, sample, source_ddim
from test_flow_sources import source_latents
from test_replicas import REAL_MODEL_INDEX as DISCRETE_INDEX
from test_replicas_continuous import REAL_MODEL_INDEX as CONTINUOUS_INDEX

from fmconvert.errors import FmconvertError
from fmconvert.integration.configs import path_config
from fmconvert.integration.families import FAMILIES, family_of

ALL_REPLICAS = {**REPLICAS, **CONTINUOUS_REPLICAS}  # (discrete ones first: a family's first replica is its DDIM source)
INDEX = {**DISCRETE_INDEX, **CONTINUOUS_INDEX}
DENOISERS = ("unet", "transformer")


def replica_family(name: str):
    """The family fmconvert gives the replica's pipeline and denoiser classes (FmconvertError if none)."""
    index = INDEX[name]
    denoiser = next(index[key][1] for key in DENOISERS if key in index)
    return family_of(index["_class_name"], denoiser)


def replicas_of(family) -> list[str]:
    found = []
    for name in ALL_REPLICAS:
        try:
            if replica_family(name).name == family.name:
                found.append(name)
        except (KeyError, StopIteration, FmconvertError):  # (test_every_replica_is_of_a_registered_family)
            continue
    return found


def test_families_are_named_uniquely():
    assert len({f.name for f in FAMILIES}) == len(FAMILIES) and all(f.name and f.pipelines for f in FAMILIES)


@pytest.mark.parametrize("name", ALL_REPLICAS)
def test_every_replica_is_of_a_registered_family(name):
    assert name in INDEX, f"replica {name}: transcribe its repo's model_index.json in tests/integration/test_replicas*.py"
    assert any(key in INDEX[name] for key in DENOISERS)
    replica_family(name)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_has_a_replica(family):
    assert replicas_of(family), (f"family {family.name} ({', '.join(family.pipelines)}) has no replica: add a tiny copy "
                                 "of a real Hub repo of its pipeline to tests/replicas.py or tests/replicas_continuous.py")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_its_replica_reproduces_its_ddim(family, tmp_path, tmp_path_factory):
    """Exactness on the final samples in data space (latents or pixels), as test_families measures it."""
    names = replicas_of(family)
    if not names:
        pytest.fail(f"family {family.name} has no replica (test_every_family_has_a_replica)")
    name = names[0]
    replica = ALL_REPLICAS[name]
    with one_thread():
        folder = (build_replica if name in REPLICAS else build_continuous_replica)(name, tmp_path_factory)
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        kind = path_config(scheduler)[0]["kind"]
        if kind == "discrete_vp":
            out = tmp_path / "converted"
            ok("wrap", folder, "--out", out)
            if name in SAMPLE_OUTPUT:  # the pipeline hands back its final sample
                reference = source_ddim(folder, replica, "samples")
            else:  # diffusers' DDIMScheduler on the source network; its images are the pipeline's own
                reference, images = sample(folder, replica, tmp_path, "--baseline", "ddim")
                assert rel(images, source_ddim(folder, replica)) < 1e-5
            samples, _ = sample(out, replica, tmp_path, "--solver", "euler", "--grid", "trailing")
        elif kind == "rectified_flow":  # already a velocity field: `sample` drives the source as it is
            reference = source_latents(DiffusionPipeline.from_pretrained(folder), replica)
            samples, _ = sample(folder, replica, tmp_path, "--solver", "euler", "--grid", "flowmatch")
        else:
            pytest.fail(f"{family.name}'s first replica {name} has a {kind} path: no DDIM to compare with; "
                        "list a replica with a discrete or flow-matching scheduler first")
    assert samples.shape == reference.shape and rel(samples, reference) < 1e-5, (name, rel(samples, reference))
