"""Bad input raises ValueError/TypeError naming the argument and the rule (README, "Reliability")."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import models
import scoreopt as so
from strategies import broken_schedules, schedules

VP = so.vp_linear()
GAUSS = models.Gaussian([0.0], [0.25])
SCORE = lambda x, t: GAUSS.score(x, t, VP)
X0 = GAUSS.sample(50, 0)


@given(broken_schedules())
def test_invalid_schedules_are_rejected_everywhere(ts):
    match = "`ts` must be (strictly increasing|finite)"
    with pytest.raises(ValueError, match=match):
        so.update_schedule(ts, np.ones(len(ts) - 1))
    with pytest.raises(ValueError, match=match):
        so.optimal_schedule(ts, np.ones(len(ts)), 4)
    with pytest.raises(ValueError, match=match):
        so.cumulative_cost(ts, np.ones(len(ts)))
    with pytest.raises(ValueError, match=match):
        so.blend(ts, ts, 0.5)


@given(schedules(min_steps=2), st.sampled_from([-1.0, np.nan, np.inf, -1e-300]), st.data())
def test_negative_or_nonfinite_costs_name_the_interval(ts, bad, data):
    c = np.ones(len(ts) - 1)
    i = data.draw(st.integers(0, len(c) - 1))
    c[i] = bad
    with pytest.raises(ValueError, match=f"`costs` must be finite and non-negative; entry {i} \\(interval {i}\\)"):
        so.update_schedule(ts, c)


@given(schedules(), st.integers(-3, 3).filter(lambda k: k != 0))
def test_mismatched_cost_length(ts, extra):
    n = max(len(ts) - 1 + extra, 0)
    with pytest.raises(ValueError, match="`costs` must be a 1-D array of length"):
        so.update_schedule(ts, np.ones(n))


@given(st.one_of(st.floats(-10, 0), st.floats(1.0, 10, exclude_min=True), st.just(np.nan)))
def test_gamma_outside_unit_interval(gamma):
    ts = so.uniform_schedule(VP, 4)
    with pytest.raises(ValueError, match="`gamma`"):
        so.blend(ts, ts, gamma)


def test_blend_needs_matching_schedules():
    with pytest.raises(ValueError, match="same length and endpoints"):
        so.blend(np.linspace(0, 1, 5), np.linspace(0, 1, 6), 0.5)
    with pytest.raises(TypeError, match="`gamma`"):
        so.blend(np.linspace(0, 1, 5), np.linspace(0, 1, 5), "0.5")


@pytest.mark.parametrize("T", [0, -3])
def test_steps_below_one(T):
    for fn in (so.uniform_schedule, so.edm_schedule, so.loglinear_schedule, so.cosine_schedule):
        with pytest.raises(ValueError, match="`T` must be >= 1"):
            fn(VP, T)
    with pytest.raises(ValueError, match="`T` must be >= 1"):
        so.optimal_schedule(np.linspace(0, 1, 5), np.ones(5), T)


@pytest.mark.parametrize("T", [2.0, "3", None, True])
def test_steps_of_wrong_type(T):
    with pytest.raises(TypeError, match="`T` must be an integer"):
        so.uniform_schedule(VP, T)


def test_schedule_endpoints_and_range():
    with pytest.raises(ValueError, match="start at t_min"):
        so.equal_cost_schedule(SCORE, VP, np.linspace(0.01, 1.0, 5), X0, 0)
    with pytest.raises(ValueError, match="must lie in"):        # call levels: the ends free, the range not
        so.to_sigmas(VP, np.linspace(0.0005, 1.0, 5))
    with pytest.raises(ValueError, match="must lie in"):
        so.local_cost(SCORE, VP, np.array([0.0005, 0.5]), X0, 0)
    with pytest.raises(ValueError, match="`t_cur`"):
        so.corrector_cost(SCORE, VP, 1.5, 0.5, X0, 0)
    with pytest.raises(ValueError, match=r"`nu` must be finite and lie in the process range \[.*\], got 1000000.0"):
        so.time_from_nsr(VP, [1.0, 1e6])
    with pytest.raises(ValueError, match=r"`nu` must be finite and lie in the process range \[.*\], got -1.0"):
        so.time_from_nsr(VP, [-1.0])


def test_data_shape_and_types():
    with pytest.raises(ValueError, match=r"`x0` must have shape \(n, d\)"):
        so.corrector_cost(SCORE, VP, 0.5, 0.4, X0[:, 0], 0)
    with pytest.raises(ValueError, match="`x0` must be finite"):
        so.corrector_cost(SCORE, VP, 0.5, 0.4, np.full((5, 1), np.nan), 0)
    with pytest.raises(TypeError, match="`score` must be callable"):
        so.corrector_cost("score", VP, 0.5, 0.4, X0, 0)
    with pytest.raises(TypeError, match="`process`"):
        so.uniform_schedule("vp", 5)
    with pytest.raises(TypeError, match="`rng` must be a numpy.random.Generator or an int seed, got float"):
        so.corrector_cost(SCORE, VP, 0.5, 0.4, X0, rng=0.5)
    with pytest.raises(TypeError, match="`rng` must be a numpy.random.Generator or an int seed, got RandomState"):
        so.as_rng(np.random.RandomState(0))


def test_the_routes_check_what_they_are_given():
    ts = so.uniform_schedule(VP, 4)
    with pytest.raises(TypeError, match="`process` must be a scoreopt.Process, got NoneType"):
        so.grid_route(SCORE, None, ts, X0, 0)
    with pytest.raises(ValueError, match=r"`ts` must be strictly increasing \(index 0 to 1\)"):
        so.grid_route(SCORE, VP, ts[::-1], X0, 0)
    with pytest.raises(ValueError, match="`ts` must be a 1-D array of at least 2 times"):
        so.grid_route(SCORE, VP, ts[:1], X0, 0)
    with pytest.raises(ValueError, match="`ts` must start at t_min"):
        so.grid_route(SCORE, VP, ts[1:], X0, 0)            # its target spans the whole range
    with pytest.raises(ValueError, match=r"`ts` must be strictly increasing \(index 0 to 1\)"):
        so.interval_route(SCORE, VP, ts[::-1], X0, 0)
    with pytest.raises(ValueError, match="`delta` must be a 1-D array of length 5"):
        so.optimal_schedule(np.linspace(0, 1, 5), np.ones(4), 3)
    with pytest.raises(ValueError, match="`cost` must be a function or one of"):
        so.interval_costs(SCORE, VP, so.uniform_schedule(VP, 3), X0, 0, cost="heun")
    with pytest.raises(ValueError, match="`derivative` must be a function or one of"):
        so.local_cost(SCORE, VP, np.array([0.5]), X0, 0, derivative="spline")


@pytest.mark.parametrize("where", [0.3, 0.7])
def test_non_finite_model_output_is_reported_with_its_level(where):
    def broken(x, t):
        return SCORE(x, t) * (np.nan if t > where else 1.0)
    with pytest.raises(ValueError, match=r"non-finite values at t = 0\.8"):
        so.corrector_cost(broken, VP, 0.8, 0.1, X0, 0)
    ts = so.uniform_schedule(VP, 10)
    with pytest.raises(ValueError, match="non-finite values at t = "):
        so.interval_costs(broken, VP, ts, X0, 0)
    with pytest.raises(ValueError, match="non-finite values at t = "):
        so.local_cost(broken, VP, ts, X0, 0)


def test_wrong_model_output_shape_is_reported():
    with pytest.raises(ValueError, match=r"`score` returned shape \(50,\) at t = 0\.4"):
        so.corrector_cost(lambda x, t: x[:, 0], VP, 0.5, 0.4, X0, 0)


def test_process_constructor_arguments():
    with pytest.raises(ValueError, match="`sigma_min` must be smaller"):
        so.ve(sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="`beta_min` must be positive"):
        so.vp_linear(beta_min=-1.0)
    with pytest.raises(ValueError, match="vp_cosine"):
        so.vp_cosine(t_max=1.0)
    with pytest.raises(ValueError, match="`rho` must be positive"):
        so.edm_schedule(VP, 5, rho=0.0)
    with pytest.raises(ValueError, match="`c` must be positive"):
        so.arctan_schedule(VP, 5, c=-1.0)
