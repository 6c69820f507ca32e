"""The sample metrics of the real-data benchmark (sliced W1, MMD^2), the training levels, and the
multistep state of the flow rule: each against an independent oracle."""
import numpy as np
import pytest
from scipy import special, stats

import models
import sampler as sm
import scoreopt as so


# --- Sliced W1 ------------------------------------------------------------------------

def test_sliced_w1_in_one_dimension_is_scipys_w1():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 1)), rng.gamma(2.0, size=(200, 1))
    assert sm.sliced_wasserstein(x, y, 1, n_projections=3) == pytest.approx(
        stats.wasserstein_distance(x[:, 0], y[:, 0]), rel=1e-12)


def test_sliced_w1_of_a_shift_is_the_mean_projected_shift():
    # Shifting a sample by m shifts every projection by theta . m, so the W1 of each
    # projection is |theta . m| exactly, whatever the sample.
    x = np.random.default_rng(0).standard_normal((500, 5))
    m = np.array([0.3, -1.0, 0.0, 2.0, 0.5])
    theta = np.random.default_rng(7).standard_normal((64, 5))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    assert sm.sliced_wasserstein(x, x + m, 7, n_projections=64) == pytest.approx(np.mean(np.abs(theta @ m)),
                                                                                 rel=1e-10)


def test_sliced_w1_over_many_directions_approaches_its_spherical_mean():
    # E|theta . m| = |m| Gamma(d/2) / (sqrt(pi) Gamma((d + 1)/2)) for theta uniform on the sphere.
    d, m = 8, np.full(8, 0.5)
    x = np.zeros((3, d))
    values = [sm.sliced_wasserstein(x, x + m, seed, n_projections=400) for seed in range(10)]
    expected = np.linalg.norm(m) * np.exp(special.gammaln(d / 2) - special.gammaln((d + 1) / 2)) / np.sqrt(np.pi)
    mean, stderr = np.mean(values), np.std(values, ddof=1) / np.sqrt(len(values))
    assert abs(mean - expected) < 4 * stderr + 1e-12
    assert len(set(values)) == len(values)                   # different seeds, different directions


def test_sliced_w1_is_zero_for_equal_samples_and_symmetric():
    x = np.random.default_rng(0).standard_normal((100, 3))
    y = np.random.default_rng(1).standard_normal((80, 3))
    assert sm.sliced_wasserstein(x, x[::-1], 0) == 0.0
    assert sm.sliced_wasserstein(x, y, 3) == pytest.approx(sm.sliced_wasserstein(y, x, 3), rel=1e-12)


def test_sliced_w1_refuses_samples_of_different_dimension():
    with pytest.raises(ValueError, match="same number of columns"):
        sm.sliced_wasserstein(np.zeros((4, 2)), np.zeros((4, 3)), 0)


# --- MMD^2 -----------------------------------------------------------------------------

def brute_force_mmd2(x, y, h):
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * h * h))
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_mmd2_is_the_unbiased_u_statistic():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 2)), rng.normal(0.5, 1.0, size=(9, 2))
    assert sm.mmd2(x, y, bandwidth=0.8) == pytest.approx(brute_force_mmd2(x, y, 0.8), rel=1e-12)


def test_mmd2_median_bandwidth_is_scale_invariant():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 3)), rng.normal(0.3, 1.0, size=(30, 3))
    assert sm.mmd2(10.0 * x, 10.0 * y) == pytest.approx(sm.mmd2(x, y), rel=1e-10)


def test_mmd2_is_unbiased_for_equal_laws_and_positive_for_different_ones():
    same = [sm.mmd2(np.random.default_rng(2 * i).normal(size=(60, 2)),
                    np.random.default_rng(2 * i + 1).normal(size=(60, 2)), bandwidth=1.0) for i in range(40)]
    assert abs(np.mean(same)) < 4 * np.std(same, ddof=1) / np.sqrt(len(same))
    assert min(same) < 0.0 < max(same)                        # unbiased: it can go below zero
    shifted = sm.mmd2(np.random.default_rng(0).normal(size=(60, 2)),
                      np.random.default_rng(1).normal(1.0, 1.0, size=(60, 2)), bandwidth=1.0)
    assert shifted > np.mean(same) + 10 * np.std(same, ddof=1)


def test_mmd2_refuses_coincident_samples_without_a_bandwidth():
    with pytest.raises(ValueError, match="bandwidth"):
        sm.mmd2(np.ones((3, 2)), np.ones((4, 2)))


# --- Training levels -------------------------------------------------------------------

def test_between_levels_picks_a_step_uniformly_then_a_time_uniformly_inside_it():
    process = so.vp_linear()
    ts = so.loglinear_schedule(process, 6)
    t = models.between_levels(ts, 60_000, np.random.default_rng(0), process)
    step = np.searchsorted(ts, t, side="right") - 1
    assert np.all((ts[0] <= t) & (t <= ts[-1]))
    counts = np.bincount(step, minlength=6)
    assert stats.chisquare(counts).pvalue > 1e-3              # each step equally often
    within = (t - ts[step]) / (ts[step + 1] - ts[step])
    assert stats.kstest(within, "uniform").pvalue > 1e-3      # uniform inside its step
    assert len(np.unique(t)) == len(t)                        # continuous, not the levels


def test_schedule_levels_are_the_schedules_levels_equally_often():
    process = so.ve()
    ts = so.uniform_schedule(process, 4)
    t = models.schedule_levels(ts, 50_000, np.random.default_rng(1), process)
    assert set(t) <= set(ts)
    assert stats.chisquare([np.sum(t == level) for level in ts]).pvalue > 1e-3


def test_lognormal_levels_have_edms_log_normal_noise_levels():
    process = so.ve(sigma_min=1e-6, sigma_max=1e4)            # wide: clipping negligible
    t = models.lognormal_levels(None, 40_000, np.random.default_rng(2), process)
    log_nu = np.log(process.nsr(t))
    assert np.mean(log_nu) == pytest.approx(-1.2, abs=4 * 1.2 / np.sqrt(len(t)))
    assert np.std(log_nu) == pytest.approx(1.2, rel=0.02)


# --- The multistep state of the flow rule ------------------------------------------------

def test_dpmpp_flow_error_is_eulers_on_its_first_step_and_second_order_after():
    # DPM-Solver++(2M) without a state is DDIM (the Euler step in (nu, x/s)): on the top
    # interval, which has no predecessor, its local error equals Euler's exactly. Below,
    # with the state carried on the model's flow, it is a second-order step: far smaller.
    process = so.vp_linear()
    target = models.Gaussian(np.zeros(2), [0.3, 1.2])
    score = lambda x, t: target.score(x, t, process)
    x0 = target.sample(64, 0)
    ts = so.loglinear_schedule(process, 40)
    t_cur, t_next = ts[1:], ts[:-1]                           # a schedule's intervals, the top one last
    euler = sm.flow_error_cost(score, process, t_cur, t_next, x0, 3, step="euler").value
    dpmpp = sm.flow_error_cost(score, process, t_cur, t_next, x0, 3, step="dpmpp_2m").value
    assert dpmpp[-1] == pytest.approx(euler[-1], rel=1e-10)
    assert np.max(dpmpp[:-1] / euler[:-1]) < 0.25             # 0.004-0.2 here: second order
    shuffled = sm.flow_error_cost(score, process, t_cur[::-1], t_next[::-1], x0, 3, step="dpmpp_2m").value
    assert np.allclose(shuffled, euler[::-1], rtol=1e-10)     # not consecutive: no state, first order
