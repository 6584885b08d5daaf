"""The path and prediction-type contract, generated from the registries :data:`fmconvert.math.paths._PATHS`
(kind → class) and :data:`fmconvert.math.predictions.PREDICTION_TYPES`: a new kind of path or a new
prediction type gets these tests by being registered.

Every kind is built from its description alone (``{"kind": kind}``: its defaults), plus the variants
below where a kind has branches of its own. For each:

- its description round-trips, through JSON as a converted folder stores it: the same class, the same
  description, α, σ and their derivatives bit for bit;
- log-SNR decreases with t (larger t is noisier) and ``time_at_log_snr`` inverts it at rounding
  (rtol = atol = 1e-12, tighter than tests/math/test_paths.py's 1e-10 / 1e-8);
- ``d_alpha``, ``d_sigma`` are the derivatives of α, σ (central differences, as test_paths);
- the timestep the network receives maps back to t (float64);
- every prediction type it is paired with (:func:`check_pair`; a refused pair is a ValueError) goes to
  (x̂0, ε̂) and back at rounding (1e-9, as tests/math/test_predictions.py), at interior points;
- every prediction type is its own linear functional of (x̂0, ε̂): none falls through to another's.

tests/math/test_paths.py and test_predictions.py check the same properties on hand-written path lists
(test_path_config_round_trip, test_continuous_paths_invert_log_snr, test_derivatives_match_finite_differences,
test_every_prediction_type_round_trips); their diffusers comparisons are not repeated here.
"""

import json

import pytest
import torch
from conftest import interior_points

from fmconvert.math.conversion import check_pair
from fmconvert.math.paths import _PATHS, DiscreteVPSchedule, path_from_config
from fmconvert.math.predictions import PREDICTION_TYPES, canonical_prediction_type, coefficients, from_x0_eps, to_x0_eps

F64 = torch.float64
FIELDS = ("alpha", "sigma", "d_alpha", "d_sigma")

#: descriptions besides a kind's defaults that reach its other branches
VARIANTS = {
    "discrete_vp": [{"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True},  # λ = −∞ at T − 1
                    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_scale": 1e-3}],
    "rectified_flow": [{"shift": 3.0, "timestep_scale": 1.0}],
    "edm": [{"sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0}],  # variance preserving: edm_v is v
}
DESCRIPTIONS = [{"kind": kind} for kind in _PATHS] + [{"kind": kind, **v} for kind in VARIANTS for v in VARIANTS[kind]]
IDS = [",".join(f"{k}={v}" for k, v in d.items() if k != "kind") or d["kind"] for d in DESCRIPTIONS]
IDS = [d["kind"] + ("" if i == d["kind"] else f"({i})") for d, i in zip(DESCRIPTIONS, IDS)]


def test_variants_are_of_registered_kinds():
    assert set(VARIANTS) <= set(_PATHS)


def interior_times(path, n=4001):
    return torch.linspace(path.t_min, path.t_max, n, dtype=F64)[1:-1]


@pytest.mark.parametrize("description", DESCRIPTIONS, ids=IDS)
def test_description_round_trips_through_json(description):
    path = path_from_config(description)
    assert type(path) is _PATHS[description["kind"]] and path.kind == description["kind"]
    stored = json.loads(json.dumps(path.to_config()))
    again = path_from_config(stored)
    assert type(again) is type(path) and again.to_config() == path.to_config()
    assert (again.t_min, again.t_max) == (path.t_min, path.t_max)
    t = interior_times(path, 257)
    p, q = path.point(t), again.point(t)
    for name in FIELDS:
        assert torch.equal(getattr(p, name), getattr(q, name)), name


@pytest.mark.parametrize("description", DESCRIPTIONS, ids=IDS)
def test_log_snr_decreases_and_inverts(description):
    path = path_from_config(description)
    assert path.t_min < path.t_max
    t = interior_times(path)
    lam = path.log_snr(t)
    assert lam.dtype == F64 and bool(torch.isfinite(lam).all())
    assert bool((lam.diff() < 0).all()), "larger t must be noisier"
    torch.testing.assert_close(path.time_at_log_snr(lam), t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("description", DESCRIPTIONS, ids=IDS)
def test_derivatives_match_finite_differences(description):
    path = path_from_config(description)
    lo, hi = path.t_min, path.t_max
    t = lo + (hi - lo) * (0.01 + 0.98 * torch.rand(200, dtype=F64, generator=torch.Generator().manual_seed(1)))
    if isinstance(path, DiscreteVPSchedule):  # piecewise between the integers: stay inside one interval
        t = t.floor() + 0.5 + 0.4 * (t - t.floor() - 0.5)
    h = 1e-6 * (hi - lo)
    p, plus, minus = path.point(t), path.point(t + h), path.point(t - h)
    torch.testing.assert_close(p.d_alpha, (plus.alpha - minus.alpha) / (2 * h), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.d_sigma, (plus.sigma - minus.sigma) / (2 * h), rtol=1e-5, atol=1e-7)
    assert bool((p.alpha > 0).all() and (p.sigma > 0).all())


@pytest.mark.parametrize("description", DESCRIPTIONS, ids=IDS)
def test_the_networks_timestep_maps_back_to_t(description):
    path = path_from_config(description)
    t = interior_times(path, 101)
    torch.testing.assert_close(path.time_from_model_timestep(path.model_timestep(t, F64)), t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("description", DESCRIPTIONS, ids=IDS)
@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_every_prediction_type_round_trips_where_it_is_paired(kind, description):
    path = path_from_config(description)
    try:
        assert check_pair(path, kind) == kind
    except ValueError:  # a refused pair is refused cleanly, and only so
        return
    p, x0, eps, x = interior_points(path)
    output = from_x0_eps(kind, x0, eps, p)
    assert bool(torch.isfinite(output).all())
    x0_back, eps_back = to_x0_eps(kind, output, x, p)
    torch.testing.assert_close(x0_back, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=1e-9, atol=1e-9)


def test_every_prediction_type_is_its_own_functional():
    """(a, b) of prediction = a·x̂0 + b·ε̂, at a generic point of the default EDM path (where every type
    is paired): no two types agree, so none has fallen through to another's branch."""
    path = path_from_config({"kind": "edm"})
    p = path.point(torch.tensor([0.7], dtype=F64))
    seen = {}
    for kind in PREDICTION_TYPES:
        assert canonical_prediction_type(kind) == kind and check_pair(path, kind) == kind
        a, b = (torch.as_tensor(c, dtype=F64).reshape(()).item() for c in coefficients(kind, p))
        assert (a, b) not in seen, f"{kind} has the coefficients of {seen.get((a, b))}"
        seen[(a, b)] = kind
