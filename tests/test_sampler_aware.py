"""Sampler-aware schedules: the KL-optimal limit and the step cost (derived: docs/derivations.md, sections 7-9)."""
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


def pushed_variances(target, process, t, t2, predictor):
    """Exact variances after one step from p_t: the sampler's law on the one-step
    sub-process [t2, t], started from the exact marginal at t."""
    sub = process._replace(t_min=t2, t_max=t)
    start = target.marginal(process, t)
    return sm.gaussian_output_law(target, sub, np.array([t2, t]), predictor=predictor, start=(start.mean(), start.var))[1]


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("target", [models.Gaussian([0.0], [0.25]), models.Gaussian(np.zeros(8), np.arange(1, 9) ** -1.0)],
                         ids=["1d", "8d"])
@pytest.mark.parametrize("predictor", ["euler", "heun", "ancestral"])
def test_limit_is_at_least_as_good_as_every_baseline(process, target, predictor):
    T = 6
    limit = sm.gaussian_schedule_kl(target, process, sm.gaussian_optimal_schedule(target, process, T, predictor=predictor),
                                    predictor=predictor)
    c = float(np.sqrt(np.mean(target.variance())))
    for name, ts in so.baseline_schedules(process, T, c).items():
        assert limit <= sm.gaussian_schedule_kl(target, process, ts, predictor=predictor) * (1 + 1e-9), name


def test_limit_improves_on_its_starts_and_heun_beats_the_baselines_by_far():
    # Measured (README): for Heun the limit is several times below the best baseline.
    target = models.Gaussian(np.zeros(8), np.arange(1, 9) ** -1.0)
    start = so.edm_schedule(VE, 8, 5.0)
    ts = sm.gaussian_optimal_schedule(target, VE, 8, predictor="heun", starts=[start])
    so.check_schedule(ts, VE)
    kl = lambda ts: sm.gaussian_schedule_kl(target, VE, ts, predictor="heun")
    best_baseline = min(kl(b) for b in so.baseline_schedules(VE, 8, 0.5).values())
    assert kl(ts) < kl(start) and kl(ts) < 0.5 * best_baseline


def test_euler_maruyama_limit_is_degenerate():
    # Its per-step variance errors change sign: the optimiser cancels them (docs/derivations.md, section 7).
    target = models.Gaussian([0.0], [0.25])
    ts = sm.gaussian_optimal_schedule(target, VE, 6, predictor="euler_maruyama")
    assert sm.gaussian_schedule_kl(target, VE, ts, predictor="euler_maruyama") < 1e-9


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("predictor", ["euler", "heun", "ancestral"])
def test_step_cost_matches_its_gaussian_closed_form(process, predictor):
    # Data N(0, diag lam): L_step = sum_k (1 - P_k / A'_k)^2 with P the pushed variances.
    lam = np.arange(1, 9) ** -1.5
    target = models.Gaussian(np.zeros(8), lam)
    t, t2 = 0.5, 0.2
    closed = sm.gaussian_step_cost(process, t, t2, lam, pushed_variances(target, process, t, t2, predictor))
    L, se = sm.step_cost(exact(target, process), process, t, t2, target.sample(40_000, 0), 1,
                         step=sm.PREDICTORS[predictor])
    assert closed > 1e-3 and abs(L - closed) < 4.5 * se and se < 0.05 * closed


def test_step_cost_is_zero_for_an_exact_step():
    # y = sqrt(A'/A) x maps N(0, A) onto N(0, A') exactly; for isotropic data
    # y S(y, t')^T = -(A'/A) x x^T / A' = x S(x, t)^T sample by sample, so every group
    # residual is 0, and so are L and its error bar.
    lam = np.array([0.3, 0.3])
    target = models.Gaussian(np.zeros(2), lam)

    def exact_step(score, process, x, t_cur, t_next, rng):
        A = process.s(t_cur) ** 2 * lam + process.sigma(t_cur) ** 2
        A2 = process.s(t_next) ** 2 * lam + process.sigma(t_next) ** 2
        return np.sqrt(A2 / A) * x, 0
    L, se = sm.step_cost(exact(target, VP), VP, 0.5, 0.2, target.sample(1000, 0), 1, step=exact_step)
    assert abs(L) < 1e-24 and se < 1e-24


def test_the_constant_test_function_sees_a_shift_of_the_mean():
    # A step exact in variance but shifted by b: the affine cost adds the constant test
    # function's U-statistic, sigma'^2 ||E S(y, t')||^2 = sigma'^2 sum_k b_k^2 / A'_k^2 (its
    # linear part is common: the same samples, the same seed, and the columns add).
    lam, b = np.array([0.3, 0.8]), np.array([0.05, -0.1])
    target = models.Gaussian(np.zeros(2), lam)

    def shifted_step(score, process, x, t_cur, t_next, rng):
        A = process.s(t_cur) ** 2 * lam + process.sigma(t_cur) ** 2
        A2 = process.s(t_next) ** 2 * lam + process.sigma(t_next) ** 2
        return np.sqrt(A2 / A) * x + b, 0
    args = (exact(target, VP), VP, 0.5, 0.2, target.sample(40_000, 0), 1)
    linear = sm.step_cost(*args, step=shifted_step)
    affine = sm.step_cost(*args, step=shifted_step, affine=True)
    A2 = VP.s(0.2) ** 2 * lam + VP.sigma(0.2) ** 2
    closed = VP.sigma(0.2) ** 2 * np.sum(b ** 2 / A2 ** 2)
    assert abs((affine.value - linear.value) - closed) < 0.05 * closed
    assert affine.value > linear.value


def test_pair_product_mean_is_the_u_statistic_with_a_jackknife_error():
    M = np.random.default_rng(0).standard_normal((7, 5)) + 0.3
    U, se = sm._pair_product_mean(M)
    pairs = [M[g] @ M[h] for g, h in itertools.permutations(range(7), 2)]
    assert U == pytest.approx(np.mean(pairs), rel=1e-12)
    leave_out = [np.mean([M[g] @ M[h] for g, h in itertools.permutations([i for i in range(7) if i != k], 2)])
                 for k in range(7)]
    assert se == pytest.approx(np.sqrt(6 / 7 * np.sum((np.array(leave_out) - np.mean(leave_out)) ** 2)), rel=1e-10)


@pytest.mark.parametrize("predictor, ratio", [("euler", 1.05), ("heun", 1.1), ("ancestral", 1.3)])
def test_equal_step_cost_schedule_is_near_the_limit(predictor, ratio):
    # docs/derivations.md section 8: N(0, diag k^-1.5), d = 16, 4,000 samples, T = 10, costs by Monte Carlo
    # from scores. Measured here: 1.008 (Euler), 1.024 (Heun), 1.099 (ancestral).
    target = models.Gaussian(np.zeros(16), np.arange(1, 17) ** -1.5)
    res = so.equal_cost_schedule(exact(target, VE), VE, so.loglinear_schedule(VE, 10), target.sample(4000, 0), 1,
                                 cost=sm.step_cost, step=sm.PREDICTORS[predictor], max_iter=100, tol=1e-3)
    assert res.converged
    limit = sm.gaussian_schedule_kl(target, VE, sm.gaussian_optimal_schedule(target, VE, 10, predictor=predictor), predictor=predictor)
    kl = sm.gaussian_schedule_kl(target, VE, res.ts, predictor=predictor)
    assert limit <= kl < ratio * limit


def test_step_cost_bad_input():
    target = models.Gaussian([0.0], [0.25])
    score, x0 = exact(target, VE), target.sample(100, 0)
    with pytest.raises(ValueError, match="`t_next` must be below `t_cur`"):
        sm.step_cost(score, VE, 0.5, 0.5, x0, 0, step=sm.euler_step)
    with pytest.raises(ValueError, match="`predictor` must be one of"):
        sm.step_cost(score, VE, 0.5, 0.4, x0, 0, step="rk4")
    with pytest.raises(TypeError, match="`affine` must be True or False"):
        sm.step_cost(score, VE, 0.5, 0.4, x0, 0, step=sm.euler_step, affine="yes")
    with pytest.raises(ValueError, match="at least 20 samples"):
        sm.step_cost(score, VE, 0.5, 0.4, x0[:10], 0, step=sm.euler_step)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'step'"):
        so.equal_cost_schedule(score, VE, so.uniform_schedule(VE, 4), x0, 0, cost=sm.step_cost)
    with pytest.raises(ValueError, match="must have T \\+ 1 = 5 times"):
        sm.gaussian_optimal_schedule(target, VE, 4, predictor="euler", starts=[so.uniform_schedule(VE, 3)])
