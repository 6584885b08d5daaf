"""The baseline contract, generated from :data:`fmconvert.sampling.baselines.BASELINES`: every alias is
held to what its entry declares, so a new alias gets these tests by being registered. Configs only: no
network runs here (tests/sampling/test_baselines.py::test_every_alias_builds_samples_and_counts_its_evaluations
samples with each alias and counts its evaluations).

- it parses, alone and with options after a colon;
- on a DDPM source (DDPMScheduler's config as a pipeline folder stores it) it builds a diffusers scheduler
  of the class it names (``default``: the source's own), with the alias's options and the source's
  prediction type on top of the source's config;
- ``set_timesteps(n)`` gives n distinct timesteps, non-increasing, inside the trained range (Heun and PLMS
  repeat some: an evaluation more at those);
- ``grid``: "own", or a grid of :data:`fmconvert.math.grids.GRIDS` whose times its timesteps are;
- it says "(stochastic)" exactly when its scheduler draws noise in its step;
- on a flow-matching source it runs in flow mode or is refused with a UsageError, never another error.
"""

import pytest
import torch

from fmconvert.errors import UsageError
from fmconvert.integration.source import inspect_source
from fmconvert.math.grids import GRIDS, time_grid
from fmconvert.math.paths import RectifiedFlow
from fmconvert.sampling.baselines import BASELINES, build_scheduler, parse_baseline, stochastic

STEPS = (1, 4, 7)


@pytest.fixture(scope="module")
def ddpm_source(ddpm_folder):
    return inspect_source(str(ddpm_folder))


@pytest.fixture(scope="module")
def flow_source(flow_folder):
    return inspect_source(str(flow_folder))


@pytest.mark.parametrize("alias", BASELINES)
def test_alias_parses_alone_and_with_options(alias):
    baseline = BASELINES[alias]
    assert baseline.name == alias and baseline.summary
    assert parse_baseline(alias) == (baseline, ())
    assert parse_baseline(f"{alias}:zeta=true, alpha=0.5") == (baseline, (("alpha", 0.5), ("zeta", True)))


@pytest.mark.parametrize("alias", BASELINES)
def test_alias_builds_the_class_it_names_with_its_options(alias, ddpm_source):
    baseline, scheduler = BASELINES[alias], build_scheduler(alias, ddpm_source)
    assert type(scheduler).__name__ == (baseline.scheduler_class or ddpm_source.scheduler["_class_name"])
    for key, value in baseline.options:
        assert scheduler.config[key] == value, key
    assert scheduler.config.prediction_type == ddpm_source.prediction_type
    # the source's own settings stay where the alias sets nothing
    mine = dict(baseline.options)
    for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "timestep_spacing"):
        if key not in mine and key in scheduler.config:
            assert scheduler.config[key] == ddpm_source.scheduler[key], key


@pytest.mark.parametrize("alias", BASELINES)
@pytest.mark.parametrize("steps", STEPS)
def test_set_timesteps_gives_that_many_timesteps(alias, steps, ddpm_source):
    scheduler = build_scheduler(alias, ddpm_source)
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps.double()
    T = ddpm_source.scheduler["num_train_timesteps"]
    assert len(torch.unique(t)) == steps, t.tolist()
    assert bool((t.diff() <= 0).all()) and 0 <= t.min() and t.max() < T, t.tolist()


@pytest.mark.parametrize("alias", BASELINES)
@pytest.mark.parametrize("steps", STEPS)
def test_its_timesteps_are_the_grid_it_declares(alias, steps, ddpm_source):
    grid = BASELINES[alias].grid
    assert grid == "own" or grid in GRIDS, grid
    if grid == "own":
        return
    scheduler = build_scheduler(alias, ddpm_source)
    scheduler.set_timesteps(steps)
    path = ddpm_source.path
    times = RectifiedFlow().time_at_log_snr(path.log_snr(scheduler.timesteps.double()))
    expected = time_grid(grid, steps, path, steps_offset=ddpm_source.scheduler.get("steps_offset", 0))
    torch.testing.assert_close(times, expected[:-1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("alias", [name for name, b in BASELINES.items() if b.scheduler_class])
def test_it_says_stochastic_exactly_when_it_draws_noise(alias, ddpm_source):
    """(``default`` is whatever the source ships with: its own scheduler's nature, not the alias's.)"""
    assert stochastic(build_scheduler(alias, ddpm_source)) == ("(stochastic)" in BASELINES[alias].summary)


@pytest.mark.parametrize("alias", BASELINES)
def test_on_a_flow_source_it_runs_in_flow_mode_or_is_refused(alias, flow_source):
    try:
        scheduler = build_scheduler(alias, flow_source)
    except UsageError as refusal:
        assert "has no flow mode" in str(refusal)
        return
    name = type(scheduler).__name__
    assert name.startswith("FlowMatch") or (scheduler.config.use_flow_sigmas
                                           and scheduler.config.prediction_type == "flow_prediction"), name
    scheduler.set_timesteps(4)
    assert len(torch.unique(scheduler.timesteps)) == 4
