"""Length, Algorithm 1 and the optimal schedule (docs/derivations.md, sections 3-5)."""

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy.optimize import brentq

import models
import scoreopt as so
from oracles import gaussian_corrector_cost, gaussian_predictor_cost
from strategies import costs, schedules, schedules_with_costs

VE, VP = so.ve(), so.vp_linear()


def closed_form_sigmas(c, d, lo, hi, T):
    """sigma_i with Lambda(sigma_i) uniform, Lambda(sigma) = 2 sqrt(d)[asinh(sigma/c) - sigma/sqrt(c^2+sigma^2)]."""
    Lam = lambda s: 2 * np.sqrt(d) * (np.arcsinh(s / c) - s / np.sqrt(c ** 2 + s ** 2))
    goal = lambda i: Lam(lo) + i / T * (Lam(hi) - Lam(lo))
    return np.array([brentq(lambda s: Lam(s) - goal(i), lo, hi, xtol=1e-15, rtol=1e-15)
                     for i in range(T + 1)]), Lam(hi) - Lam(lo)


def dense_grid(process, n=5000):
    nu = so.nsr(process, np.array([process.t_min, process.t_max]))
    return so.time_from_nsr(process, np.geomspace(nu[0], nu[1], n))


@pytest.mark.parametrize("c", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("sigmas", [(0.002, 80.0), (0.01, 10.0)])
@pytest.mark.parametrize("T", [5, 18, 64])
def test_optimal_schedule_matches_closed_form_from_exact_delta(c, sigmas, T):
    p = so.ve(*sigmas)
    ts = dense_grid(p)
    sched = so.optimal_schedule(ts, so.gaussian_local_cost(p, ts, [c ** 2]), T)
    ref, _ = closed_form_sigmas(c, 1, *sigmas, T)
    np.testing.assert_allclose(p.sigma(sched), ref, rtol=1e-4)


@pytest.mark.parametrize("c, d", [(0.5, 1), (2.0, 1), (0.5, 8)])
def test_schedule_map_from_black_box_score_matches_closed_form(c, d):
    target = models.Gaussian(np.zeros(d), np.full(d, c ** 2))
    score = lambda x, t: target.score(x, t, VE)
    smap = so.estimate_schedule_map(score, VE, target.sample(4000, 0), 1, n_grid=400)
    for T in (10, 50):
        ref, length = closed_form_sigmas(c, d, 0.002, 80.0, T)
        np.testing.assert_allclose(VE.sigma(smap.schedule(T)), ref, rtol=0.01)
    assert abs(smap.length - length) < 4 * smap.length_stderr + 2e-3 * length


def test_optimal_schedule_does_not_depend_on_dimension():
    ts = dense_grid(VE)
    one = so.optimal_schedule(ts, so.gaussian_local_cost(VE, ts, [0.3]), 20)
    many = so.optimal_schedule(ts, so.gaussian_local_cost(VE, ts, np.full(50, 0.3)), 20)
    np.testing.assert_allclose(one, many, rtol=1e-12)


def test_optimal_noise_levels_do_not_depend_on_time_coordinate():
    # VE with sigma linear in t instead of geometric: the same sigma levels (the optimal set of noise levels does not depend on the time coordinate).
    lin = so.Process(s=lambda t: 1.0 + 0.0 * t, sigma=lambda t: 0.002 + (80 - 0.002) * t,
                     t_min=0.0, t_max=1.0, name="ve-linear")
    levels = []
    for p in (VE, lin):
        ts = dense_grid(p, 20000)
        levels.append(p.sigma(so.optimal_schedule(ts, so.gaussian_local_cost(p, ts, [0.25]), 25)))
    np.testing.assert_allclose(levels[0], levels[1], rtol=1e-3)


def test_schedule_map_round_trip_n_2n_n():
    ts = dense_grid(VP, 3000)
    smap_delta = so.gaussian_local_cost(VP, ts, [0.2])
    for N in (3, 10, 37):
        fine = so.optimal_schedule(ts, smap_delta, 2 * N)
        np.testing.assert_allclose(fine[::2], so.optimal_schedule(ts, smap_delta, N), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("c", [0.1, 1.0])
def test_optimal_schedule_spends_equal_length_per_step(c):
    # Exact Lambda increments of the schedule are equal to the grid's accuracy.
    p = so.ve()
    ts = dense_grid(p, 5000)
    sched = so.optimal_schedule(ts, so.gaussian_local_cost(p, ts, [c ** 2]), 30)
    Lam = lambda s: 2 * (np.arcsinh(s / c) - s / np.sqrt(c ** 2 + s ** 2))
    inc = np.diff(Lam(p.sigma(sched)))
    np.testing.assert_allclose(inc, inc.mean(), rtol=1e-4)


def total_cost(process, ts, c):
    return gaussian_corrector_cost(process, ts[1:], ts[:-1], [c ** 2]).sum()


@pytest.mark.parametrize("process", [VE, VP], ids=["ve", "vp_linear"])
@pytest.mark.parametrize("c", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("T", [10, 20, 50, 100])
def test_optimal_schedule_beats_every_baseline_on_finite_step_cost(process, c, T):
    grid = dense_grid(process, 20000)
    opt = so.optimal_schedule(grid, so.gaussian_local_cost(process, grid, [c ** 2]), T)
    best = min(total_cost(process, b, c) for b in so.baseline_schedules(process, T, c).values())
    assert total_cost(process, opt, c) <= 0.85 * best


def test_at_five_steps_a_hand_tuned_schedule_can_win():
    # The inversion rests on L ~ delta h^2; at T = 5 it breaks down (README, "Measured: exact finite-step cost"): for
    # vp_linear and N(0, 0.5^2), EDM rho = 3 has a lower finite-step cost (measured: 5.7x
    # lower, `examples/finite_step_cost.py`), while from T = 10 on the optimum wins.
    grid = dense_grid(VP, 20000)
    delta = so.gaussian_local_cost(VP, grid, [0.25])
    ratio = {T: total_cost(VP, so.optimal_schedule(grid, delta, T), 0.5)
             / total_cost(VP, so.edm_schedule(VP, T, 3.0), 0.5) for T in (5, 10)}
    assert ratio[5] > 1 > ratio[10]


def test_zero_cost_path_returns_uniform_schedule_with_warning():
    # vp_linear with data N(0, 1): every marginal is N(0, 1), delta = 0 (up to rounding).
    grid = dense_grid(VP, 200)
    delta = so.gaussian_local_cost(VP, grid, [1.0])
    assert np.max(delta) < 1e-20
    with pytest.warns(RuntimeWarning, match="zero"):
        out = so.optimal_schedule(grid, np.zeros_like(grid), 10)
    np.testing.assert_allclose(out, np.linspace(grid[0], grid[-1], 11))
    with pytest.warns(RuntimeWarning, match="zero"):
        assert np.all(np.isfinite(so.update_schedule(so.uniform_schedule(VP, 4), np.zeros(4))))


# --- Algorithm 1 -------------------------------------------------------------------

@given(schedules(), positive := st.floats(1e-6, 1e6))
def test_equal_costs_are_a_fixed_point(ts, c):
    out = so.update_schedule(ts, np.full(len(ts) - 1, c))
    np.testing.assert_allclose(out, ts, rtol=1e-9, atol=1e-12)


@given(schedules_with_costs(), st.sampled_from([1, 2, 4]))
def test_update_returns_valid_schedule_with_exact_endpoints(tc, order):
    ts, c = tc
    out = so.update_schedule(ts, c, order=order)
    assert out.shape == ts.shape and out[0] == ts[0] and out[-1] == ts[-1]
    assert np.all(np.diff(out) > 0)


@given(schedules_with_costs(allow_zero=False), st.floats(1e-4, 1e4))
def test_update_is_invariant_to_scaling_the_costs(tc, scale):
    ts, c = tc
    np.testing.assert_allclose(so.update_schedule(ts, scale * c), so.update_schedule(ts, c),
                               rtol=1e-9, atol=1e-12)


def test_update_gives_equal_increments_for_piecewise_constant_metric():
    # Metric sqrt(delta) = 1 on [0, 0.3), 10 on [0.3, 0.7), 2 on [0.7, 1]; exact interval
    # costs are (int sqrt(delta))^2. One update already equalises most increments; the
    # damped iteration converges to exactly equal ones.
    edges, speed = np.array([0.0, 0.3, 0.7, 1.0]), np.array([1.0, 10.0, 2.0])
    Lam_edges = np.concatenate([[0], np.cumsum(speed * np.diff(edges))])
    Lam = lambda t: np.interp(t, edges, Lam_edges)
    ts = np.linspace(0, 1, 41)
    inc = lambda ts: np.diff(Lam(ts))
    spread0 = inc(ts).max() / inc(ts).min()
    ts1 = so.update_schedule(ts, inc(ts) ** 2)
    assert spread0 == pytest.approx(10.0) and inc(ts1).max() / inc(ts1).min() < 2.0
    for _ in range(60):
        ts = so.blend(ts, so.update_schedule(ts, inc(ts) ** 2), 0.5)
    np.testing.assert_allclose(inc(ts), Lam_edges[-1] / 40, rtol=1e-6)


@given(st.data(), st.floats(0.0, 1.0, exclude_min=True))
def test_blend_keeps_schedules_valid(data, gamma):
    ts = data.draw(schedules(min_steps=2))
    n = len(ts) - 1          # a second schedule with the same steps and endpoints, built directly
    other = data.draw(schedules(min_steps=n, max_steps=n, lo=ts[0], hi=ts[-1]))
    out = so.blend(ts, other, gamma)
    assert out[0] == ts[0] and out[-1] == ts[-1] and np.all(np.diff(out) > 0)
    np.testing.assert_array_equal(so.blend(ts, other, 1.0)[1:-1], other[1:-1])


@given(costs(12, allow_zero=True))
def test_cauchy_schwarz_length_and_energy(c):
    assert so.path_length(c) ** 2 <= so.path_energy(c) * (1 + 1e-12)
    equal = np.full(12, 0.7)
    assert so.path_length(equal) ** 2 == pytest.approx(so.path_energy(equal), rel=1e-12)


def test_cumulative_cost_orders():
    ts = np.linspace(0, 2, 2001)
    np.testing.assert_allclose(so.cumulative_cost(ts, 4 * ts ** 2)[-1], 4.0, rtol=1e-6)   # int 2t
    np.testing.assert_allclose(so.cumulative_cost(ts, 16 * ts ** 4, order=4)[-1], 4.0, rtol=1e-6)


# --- The damped fixed-point iteration (docs/derivations.md, sections 3-4) ------------------------------

def test_predictor_equal_cost_iteration_converges_to_equal_costs():
    cantor = models.mollified_cantor()
    score = lambda x, t: cantor.score(x, t, VP)
    res = so.equal_cost_schedule(score, VP, so.uniform_schedule(VP, 12), cantor.sample(1000, 0), 1,
                                 cost="predictor", max_iter=100, tol=1e-3)
    assert res.converged and res.n_iter < 100
    assert res.costs.max() / res.costs.min() < 1.03
    so.check_schedule(res.ts, VP)
    # Start: the uniform schedule's predictor costs are far from equal.
    assert res.history[0][1].max() / res.history[0][1].min() > 100


def test_iterate_schedule_with_closed_form_predictor_costs():
    # 64-dimensional power-law spectrum: exact L_p, no Monte Carlo, so equal to 1e-3.
    lam = np.arange(1, 65) ** -1.0
    costs = lambda ts: gaussian_predictor_cost(VE, ts[1:], ts[:-1], lam)
    res = so.iterate_schedule(costs, so.uniform_schedule(VE, 15), gamma=0.5, order=4, tol=1e-6, max_iter=300)
    assert res.converged and res.costs.max() / res.costs.min() < 1.001
    assert np.all(np.isnan(res.stderr))


def test_corrector_iteration_pitfall_one_huge_last_step():
    # docs/derivations.md section 4: smooth data, few points, v = sigma at the clean end: v(t_min)^2 = sigma_min^2
    # makes the last step look free, and the iteration puts one huge step there.
    g = models.Gaussian([0.0], [0.25])
    score = lambda x, t: g.score(x, t, VE)
    res = so.equal_cost_schedule(score, VE, so.uniform_schedule(VE, 5), g.sample(2000, 0), 1,
                                 cost="corrector", max_iter=200)
    assert VE.sigma(res.ts[1]) > 10.0        # from sigma = 0.002 straight to > 10
    assert res.costs.max() / res.costs.min() < 1.05   # and yet its costs "look" equal
    # The dense-grid route does not have this problem: its first level is 25x lower.
    grid = dense_grid(VE)
    dense = so.optimal_schedule(grid, so.gaussian_local_cost(VE, grid, [0.25]), 5)
    assert VE.sigma(dense[1]) < VE.sigma(res.ts[1]) / 20
    # The finite-step cost itself is fooled: the degenerate schedule's sum of L_c is lower.
    total = lambda ts: gaussian_corrector_cost(VE, ts[1:], ts[:-1], [0.25]).sum()
    assert total(res.ts) < total(dense)


def test_schedule_map_error_bars_are_honest():
    # Lambda from independent seeds scatters as much as the reported standard error says.
    # With 60 seeds the sample s.d. has a relative s.d. of about 1/sqrt(2 * 59) = 0.09,
    # so the bands below are about 3.5 of those wide: a factor-1.5 error fails.
    g = models.Gaussian([0.0], [0.25])
    score = lambda x, t: g.score(x, t, VE)
    maps = [so.estimate_schedule_map(score, VE, g.sample(1000, s), s + 500, n_grid=100)
            for s in range(60)]
    lengths = np.array([m.length for m in maps])
    se = np.mean([m.length_stderr for m in maps])
    assert 0.7 < lengths.std(ddof=1) / se < 1.35
    # The batch-means s.e. is unbiased for the mean too: the closed-form Lambda lies within
    # 4.5 s.e. of the mean over seeds (the grid's trapezoid error is 2e-7 here).
    c = 0.5
    closed = 2 * (np.arcsinh(80 / c) - 80 / np.sqrt(c ** 2 + 80 ** 2)) - 2 * (
        np.arcsinh(0.002 / c) - 0.002 / np.sqrt(c ** 2 + 0.002 ** 2))
    assert abs(lengths.mean() - closed) < 4.5 * se / np.sqrt(len(maps))
    spread = np.std([m.schedule(8) for m in maps], axis=0, ddof=1)[1:-1]
    reported = np.mean([m.schedule_stderr(8) for m in maps], axis=0)[1:-1]
    ratio = spread / reported
    assert np.all((0.6 < ratio) & (ratio < 1.6)) and 0.75 < np.mean(ratio) < 1.3
    assert maps[0].cost_per_step(8) == pytest.approx((maps[0].length / 8) ** 2)
