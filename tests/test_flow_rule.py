"""Schedules for a trained model: the local error against the model's own flow, GITS, the oracle.

(derived: docs/derivations.md, section 9)
"""
import itertools

import numpy as np
import pytest

import models
import sampler as sm
import scoreopt as so

VE, VP = so.ve(), so.vp_linear()
PROCESSES = [pytest.param(VE, id="ve"), pytest.param(VP, id="vp_linear")]


def exact(target, process):
    return lambda x, t: target.score(x, t, process)


def diagonal_weight(lam, kind="data"):
    """The weight of a diagonal covariance, exactly (no sample covariance)."""
    return sm.FlowWeight(kind, np.eye(len(lam)), np.asarray(lam, dtype=float), 0.0)


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("step", ["euler", "heun", "ancestral", "dpmpp_2m"])
def test_every_step_on_per_row_times_equals_the_step_on_each_time(process, step):
    # One time per row is the same computation as one call per time: the batched costs
    # rest on this. Rows 0-2 step from 0.6 to 0.3, 0.8 to 0.5, 0.4 to 0.1.
    target = models.Gaussian(np.zeros(2), [0.3, 1.2])
    score = exact(target, process)
    x = target.marginal(process, 0.6).sample(3, 0)
    t, t2 = np.array([0.6, 0.8, 0.4]), np.array([0.3, 0.5, 0.1])
    noise = np.random.default_rng(1).standard_normal(x.shape)

    class Fixed:                              # the same noise for both ways of calling
        def standard_normal(self, shape):
            return noise[:shape[0]] if shape[0] == len(noise) else noise[self.rows]
    f = sm.ALL_PREDICTORS[step]
    carry = (x / process.s(t)[:, None] + 0.1, t + 0.05) if step == "dpmpp_2m" else None
    extra = (carry,) if step == "dpmpp_2m" else ()
    batched = f(score, process, x, t, t2, Fixed(), *extra)[0]
    for i in range(3):
        rng = Fixed()
        rng.rows = [i]
        one = (tuple(c[i:i + 1] if np.ndim(c) == 2 else c[i] for c in carry),) if carry is not None else ()
        single = f(score, process, x[i:i + 1], t[i], t2[i], rng, *one)[0]
        np.testing.assert_allclose(batched[i:i + 1], single, rtol=1e-12, atol=1e-14)


def test_heun_per_row_takes_no_second_stage_on_rows_that_end_at_nu_zero():
    # nu(t_min) = 0 makes no process for the library's public functions (nu must be positive), but a step
    # takes any process: the exact score of N(0, 1) as a plain function, one time per row.
    p = so.Process(s=lambda t: 1.0 + 0.0 * t, sigma=lambda t: 1.0 * t, t_min=0.0, t_max=1.0)
    score = lambda x, t: -x / (1.0 + so.as_column(p.nsr(t)) ** 2)
    x = np.array([[0.7], [0.7]])
    out, nfe = sm.heun_step(score, p, x, np.array([0.5, 0.5]), np.array([0.0, 0.25]), None)
    np.testing.assert_allclose(out[0], sm.heun_step(score, p, x[:1], 0.5, 0.0, None)[0][0], rtol=1e-14)
    np.testing.assert_allclose(out[1], sm.heun_step(score, p, x[1:], 0.5, 0.25, None)[0][0], rtol=1e-14)
    assert nfe == 2


def test_the_cost_is_zero_when_the_step_is_the_fine_solver():
    # The reference is K Heun substeps; a step that is exactly those substeps has no error.
    target = models.Gaussian(np.zeros(3), [0.2, 0.5, 1.5])
    weight = sm.flow_weight(target.sample(500, 0))
    c = np.sqrt(np.mean(weight.variances))

    def fine_step(score, process, x, t_cur, t_next, rng):
        t_cur, t_next = np.broadcast_to(t_cur, len(x)), np.broadcast_to(t_next, len(x))
        return sm._heun_substeps(score, process, x, t_cur, t_next, 2, c), 4
    cost = sm.flow_error_cost(exact(target, VP), VP, np.array([0.7, 0.4]), np.array([0.4, 0.1]),
                              target.sample(64, 1), 2, step=fine_step, weight=weight)
    assert np.all(cost.value == 0) and np.all(cost.stderr == 0)


def heun_factor(lam, nu, nu2):
    """Heun's step for the Gaussian flow dy/dnu = nu y / (lam + nu^2) maps y to this times y."""
    f = lambda v: v / (lam + v ** 2)
    h = nu2 - nu
    return 1 + 0.5 * h * (f(nu) + f(nu2) * (1 + h * f(nu)))


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("step", ["euler", "heun"])
def test_local_error_matches_its_closed_form_for_gaussian_data(process, step):
    # Data N(0, diag lam): the score is linear, the flow in y = x/s is dy/dnu = nu y/(lam + nu^2),
    # Euler maps y to (1 - nu (nu - nu')/(lam + nu^2)) y, Heun to `heun_factor`, and the
    # reference to the product of K Heun factors over its substeps. So delta = s'(a - a_K) y with
    # y ~ N(0, lam + nu^2), and the cost is (1/d) sum_k w_k s'^2 (a_k - a_K,k)^2 (lam_k + nu^2).
    lam = np.array([0.05, 0.4, 2.0])
    target = models.Gaussian(np.zeros(3), lam)
    weight = diagonal_weight(lam)
    t, t2 = 0.7, 0.35
    value, se = sm.flow_error_cost(exact(target, process), process, t, t2, target.sample(20_000, 0), 1,
                                   step=step, weight=weight)
    nu, nu2 = float(process.nsr(t)), float(process.nsr(t2))
    a = 1 - nu * (nu - nu2) / (lam + nu ** 2) if step == "euler" else heun_factor(lam, nu, nu2)
    c = np.sqrt(np.mean(lam))
    grid = c * np.sinh(np.arcsinh(nu / c) + np.array([0, 0.5, 1]) * (np.arcsinh(nu2 / c) - np.arcsinh(nu / c)))
    a_K = heun_factor(lam, grid[0], grid[1]) * heun_factor(lam, grid[1], grid[2])
    s0, sigma0 = float(process.s(process.t_min)), float(process.sigma(process.t_min))
    s2, sigma2 = float(process.s(t2)), float(process.sigma(t2))
    w = (s0 ** 2 * lam + sigma0 ** 2) / (s2 ** 2 * lam + sigma2 ** 2)
    closed = np.mean(w * s2 ** 2 * (a - a_K) ** 2 * (lam + nu ** 2))
    assert closed > 0 and abs(value - closed) < 4.5 * se and se < 0.05 * closed


def test_the_ancestral_cost_is_the_missing_posterior_covariance_in_closed_form():
    # The posterior step lacks (1 - r)^2 Cov(x0 | y) = (1 - r)^2 nu^2 lam / (lam + nu^2) per
    # coordinate (docs/derivations.md 9.3); with the KL weight, the cost is
    # (1/d) sum_k g_k^4 deficit_k^2 / A0_k^2, g = (lam + nu0^2)/(lam + nu'^2). The Jacobian of a
    # linear denoiser is exact in one finite difference, so the only noise is the U-statistic's.
    lam = np.array([0.1, 0.7])
    target = models.Gaussian(np.zeros(2), lam)
    t, t2 = 0.6, 0.3
    value, se = sm.flow_error_cost(exact(target, VE), VE, t, t2, target.sample(400, 0), 1, step="ancestral",
                                   weight=diagonal_weight(lam, "kl"))
    nu, nu2, nu0 = float(VE.sigma(t)), float(VE.sigma(t2)), float(VE.sigma(0.0))
    deficit = (1 - (nu2 / nu) ** 2) ** 2 * nu ** 2 * lam / (lam + nu ** 2)
    g = (lam + nu0 ** 2) / (lam + nu2 ** 2)
    closed = np.mean(g ** 4 * deficit ** 2 / (lam + nu0 ** 2) ** 2)
    np.testing.assert_allclose(value, closed, rtol=1e-4)
    assert se < 1e-4 * closed


def test_the_equalised_schedule_does_not_change_when_the_cost_is_scaled():
    # update_schedule is invariant to scaling all costs, so the whole fixed point is.
    target = models.Gaussian(np.zeros(2), [0.2, 1.0])
    score, x0, start = exact(target, VE), target.sample(32, 0), so.loglinear_schedule(VE, 6)
    scaled = lambda *args, **kw: so.Estimate(*(7.5 * np.asarray(v) for v in sm.flow_error_cost(*args, **kw)))
    runs = [so.equal_cost_schedule(score, VE, start, x0, 3, cost=cost, step="euler", order=4, max_iter=15, tol=1e-3)
            for cost in (sm.flow_error_cost, scaled)]
    np.testing.assert_allclose(runs[0].ts, runs[1].ts, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:the equal-cost iteration did not converge")  # few updates on purpose
def test_equal_error_schedule_is_deterministic_in_its_seed_and_counts_its_evaluations():
    target = models.Gaussian(np.zeros(2), [0.2, 1.0])
    score, x0 = exact(target, VP), target.sample(1000, 0)
    run = lambda seed: sm.equal_error_schedule(score, VP, 8, x0, seed, step="heun", n_samples=16, max_iter=6)
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a.ts, b.ts)
    assert not np.array_equal(a.ts, c.ts)
    # Each evaluation of the costs: 8 intervals x 16 rows x (2 K reference + 2 Heun) evaluations;
    # one per update and a last one for the final costs.
    assert a.n_evaluations == (a.n_iter + 1) * 8 * 16 * (2 * 2 + 2)
    # The budget caps the updates.
    capped = sm.equal_error_schedule(score, VP, 8, x0, 1, step="heun", n_samples=16, max_iter=6,
                                     budget=3 * 8 * 16 * 6)
    assert capped.n_iter == 2 and capped.n_evaluations == 3 * 8 * 16 * 6
    with pytest.raises(ValueError, match="`budget` = 100 allows no update"):
        sm.equal_error_schedule(score, VP, 8, x0, 1, step="heun", n_samples=16, budget=100)


@pytest.mark.parametrize("step, goal", [("euler", 1.2), ("heun", 1.1), ("ancestral", 1.15)])
def test_equal_error_schedule_is_near_the_kl_limit_for_gaussian_data(step, goal):
    # Exact scores, KL weight, N(0, diag k^-1.5), d = 16, T = 10, VE: measured 1.07 (Euler),
    # 1.01 (Heun) and 1.04 (ancestral) times the limit (docs/benchmark.md).
    target = models.Gaussian(np.zeros(16), np.arange(1, 17) ** -1.5)
    res = sm.equal_error_schedule(exact(target, VE), VE, 10, target.sample(4000, 0), 0, step=step, weight="kl",
                                  max_iter=30)
    kl = lambda ts: sm.gaussian_schedule_kl(target, VE, ts, predictor=step)
    limit = kl(sm.gaussian_optimal_schedule(target, VE, 10, predictor=step))
    assert res.converged and limit <= kl(res.ts) < goal * limit
    assert kl(res.ts) < min(kl(b) for b in so.baseline_schedules(VE, 10, 0.5).values())


def test_gits_finds_the_cheapest_path_of_its_costs():
    target = models.Gaussian(np.zeros(2), [0.3, 1.0])
    res = sm.teacher_schedule(exact(target, VP), VP, 3, target.sample(500, 0), 1, step="euler", n_draws=8,
                              n_cells=7)
    G = len(res.nodes) - 1
    paths = [(0, *inner, G) for inner in itertools.combinations(range(1, G), 2)]
    costs = {p: sum(res.costs[a, b] for a, b in zip(p[:-1], p[1:])) for p in paths}
    best = min(costs, key=costs.get)
    assert tuple(res.path) == best and res.cost == pytest.approx(costs[best], rel=1e-12)
    so.check_schedule(res.ts, VP)
    np.testing.assert_array_equal(res.ts, res.nodes[res.path][::-1])
    # Teacher: 8 draws x 7 cells x 2 substeps x 2 evaluations; Euler steps: 8 x 7 first stages.
    assert res.n_evaluations == 8 * 7 * 2 * 2 + 8 * 7


def test_the_oracle_is_never_above_its_starting_schedules():
    target = models.Gaussian(np.zeros(2), [0.3, 1.0])
    score = exact(target, VE)
    start = so.edm_schedule(VE, 5, 3.0)
    res = sm.coupled_optimal_schedule(score, VE, 5, target.sample(500, 0), 2, step="heun", n_draws=16,
                                      reference_steps=60, starts=[start], max_iter=30)
    so.check_schedule(res.ts, VE)
    assert res.error <= min(res.start_errors.values())
    assert res.error == pytest.approx(sm.coupled_error(score, VE, res.ts, res.x_T, res.reference, step="heun"),
                                      rel=1e-9)
    assert res.error < 0.5 * res.start_errors["start 0"]


def test_flow_rule_bad_input():
    target = models.Gaussian([0.0], [0.25])
    score, x0 = exact(target, VE), target.sample(100, 0)
    with pytest.raises(ValueError, match="draws noise: the local error against the model's flow needs"):
        sm.flow_error_cost(score, VE, 0.5, 0.4, x0, 0, step="euler_maruyama")
    with pytest.raises(ValueError, match="`weight` must be 'data', 'kl', 'scalar' or a FlowWeight"):
        sm.flow_error_cost(score, VE, 0.5, 0.4, x0, 0, weight="whitened")
    with pytest.raises(ValueError, match="`t_next` must be below `t_cur`"):
        sm.flow_error_cost(score, VE, 0.4, 0.5, x0, 0)
    with pytest.raises(ValueError, match="teacher_schedule takes one-step samplers"):
        sm.teacher_schedule(score, VE, 3, x0, 0, step="dpmpp_2m")
    with pytest.raises(ValueError, match="`step` must be deterministic"):
        sm.coupled_optimal_schedule(score, VE, 3, x0, 0, step="ancestral")
    with pytest.raises(ValueError, match="`T` must be >= 1"):
        sm.equal_error_schedule(score, VE, 0, x0, 0)
