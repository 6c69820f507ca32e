"""Incremental and local costs against closed forms (docs/derivations.md, sections 1-2)."""
import autograd.numpy as anp
import numpy as np
import pytest
from scipy.integrate import trapezoid

import models
import scoreopt as so
from oracles import gaussian_corrector_cost, gaussian_predictor_cost

VE, VP = so.ve(), so.vp_linear()
GAUSS = models.Gaussian([0.3, -1.0], [0.2, 2.0])      # non-isotropic, non-zero mean


def exact(target, process):
    """A black-box score callable from a target (the estimators see only this)."""
    return lambda x, t: target.score(x, t, process)


def fisher_gaussian(m1, v1, m2, v2):
    """D(N(m1,v1) || N(m2,v2)) = E_{N(m2,v2)} ||grad log p1 - grad log p2||^2, diagonal."""
    return np.sum((m1 - m2) ** 2 / v1 ** 2 + v2 * (1 / v2 - 1 / v1) ** 2)


@pytest.mark.parametrize("process", [VE, VP], ids=["ve", "vp_linear"])
@pytest.mark.parametrize("derivative", ["central", "autograd"])
def test_local_cost_matches_gaussian_closed_form(process, derivative):
    nu = so.nsr(process, np.array([process.t_min, process.t_max]))
    ts = so.time_from_nsr(process, np.geomspace(nu[0], nu[1], 9))
    x0 = GAUSS.sample(40_000, 0)
    delta, se = so.local_cost(exact(GAUSS, process), process, ts, x0, 1, derivative=derivative)
    closed = so.gaussian_local_cost(process, ts, GAUSS.var, GAUSS.means[0])
    assert np.all(np.abs(delta - closed) < 4.5 * se), (delta - closed) / se
    assert np.all(se < 0.05 * closed)  # the comparison has power


def test_gaussian_local_cost_isotropic_ve_formula():
    # docs/derivations.md section 1: in the sigma coordinate delta(sigma) = 4 d sigma^4 / (c^2 + sigma^2)^3;
    # with sigma = sigma_min r^t, d sigma / dt = sigma log r, so delta_t = delta_sigma (sigma log r)^2.
    p, c, d = so.ve(0.002, 80.0), 0.7, 5
    t = np.linspace(0, 1, 11)
    sigma = p.sigma(t)
    expect = 4 * d * sigma ** 4 / (c ** 2 + sigma ** 2) ** 3 * (sigma * np.log(80 / 0.002)) ** 2
    np.testing.assert_allclose(so.gaussian_local_cost(p, t, np.full(d, c ** 2)), expect, rtol=1e-12)


@pytest.mark.parametrize("process", [VE, VP], ids=["ve", "vp_linear"])
def test_corrector_cost_matches_exact_finite_step(process):
    t_cur, t_next = 0.5, 0.45
    L, se = so.corrector_cost(exact(GAUSS, process), process, t_cur, t_next, GAUSS.sample(40_000, 2), 3)
    closed = gaussian_corrector_cost(process, t_cur, t_next, GAUSS.var, GAUSS.means[0])
    assert abs(L - closed) < 4.5 * se and se < 0.05 * closed


def test_corrector_cost_over_h_squared_tends_to_local_cost():
    # Exact Gaussian: L_c(t, t + h) / h^2 - delta(t) = O(h): the error halves with h.
    t, var, mean = 0.4, GAUSS.var, GAUSS.means[0]
    delta = so.gaussian_local_cost(VP, np.array([t]), var, mean)[0]
    errors = [abs(gaussian_corrector_cost(VP, t, t + h, var, mean) / h ** 2 - delta)
              for h in (4e-3, 2e-3, 1e-3)]
    assert errors[0] / errors[1] == pytest.approx(2, rel=0.05)
    assert errors[1] / errors[2] == pytest.approx(2, rel=0.05)
    assert errors[2] < 0.01 * delta
    # Monte Carlo, mixture target: same samples on both sides (the same seed).
    cantor = models.mollified_cantor()
    score, x0 = exact(cantor, VP), cantor.sample(20_000, 4)
    d_hat, d_se = so.local_cost(score, VP, np.array([t]), x0, 5)
    h = 1e-4
    L, L_se = so.corrector_cost(score, VP, t, t + h, x0, 5)
    assert abs(L / h ** 2 - d_hat[0]) < 0.01 * d_hat[0]


def test_costs_scale_as_h2_and_h4_with_exact_scores():
    # docs/derivations.md section 2: halving h divides L_c by ~4 and the Euler-predictor cost L_p by ~16.
    # A wrong Jacobian or log-det term leaves an O(h^2) error in L_p.
    cantor = models.mollified_cantor()
    score, x0, t = exact(cantor, VP), cantor.sample(4000, 0), 0.3
    hs = [0.02, 0.01, 0.005]
    Lc = [so.corrector_cost(score, VP, t + h, t, x0, 1)[0] for h in hs]
    Lp = [so.predictor_cost(score, VP, t + h, t, x0, 1)[0] for h in hs]
    for i in range(2):
        assert 3.5 < Lc[i] / Lc[i + 1] < 4.5
        assert 14 < Lp[i] / Lp[i + 1] < 18


@pytest.mark.parametrize("process", [VE, VP], ids=["ve", "vp_linear"])
def test_predictor_cost_matches_gaussian_fisher_divergence(process):
    # DDIM written out: x' = s' x0_hat + sigma' eps_hat with eps_hat = -sigma S and
    # x0_hat = (x + sigma^2 S)/s. For Gaussian data S = -(x - m)/a, so the map is affine
    # per coordinate, F(x) = alpha x + beta, F#p_t = N(alpha m + beta, alpha^2 a), and
    # L_p = sigma(t')^2 D(p_t' || F#p_t) exactly.
    t, t2 = 0.5, 0.4
    s, sig, s2, sig2 = process.s(t), process.sigma(t), process.s(t2), process.sigma(t2)
    m, a = GAUSS.marginal(process, t).means[0], GAUSS.marginal(process, t).var
    m2, a2 = GAUSS.marginal(process, t2).means[0], GAUSS.marginal(process, t2).var
    coef = s2 * sig ** 2 / s - sig2 * sig          # x' = (s'/s) x + coef * S(x)
    alpha, beta = s2 / s - coef / a, coef * m / a
    closed = process.sigma(t2) ** 2 * fisher_gaussian(m2, a2, alpha * m + beta, alpha ** 2 * a)
    assert gaussian_predictor_cost(process, t, t2, GAUSS.var, GAUSS.means[0]) == pytest.approx(closed, rel=1e-12)
    L, se = so.predictor_cost(exact(GAUSS, process), process, t, t2, GAUSS.sample(40_000, 5), 6)
    assert abs(L - closed) < 4.5 * se and se < 0.05 * closed


def test_predictor_cost_matches_change_of_variables_by_quadrature():
    # Independent oracle in 1-D: q = F#p_t has log q(F(x)) = log p_t(x) - log|F'(x)|, so
    # grad log q(F(x)) = d/dx[log p_t(x) - log|F'(x)|] / F'(x), here by finite differences,
    # and L_p = sigma(t')^2 int p_t(x) (S(F(x), t') - grad log q(F(x)))^2 dx by quadrature.
    # A narrow and a wide component at one place: strongly varying curvature.
    target = models.GaussianMixture([0.5, 0.5], [0.0, 0.0], [0.05, 0.5])
    t, t2 = 0.05, 0.03
    s, sig, s2, sig2 = VP.s(t), VP.sigma(t), VP.s(t2), VP.sigma(t2)
    F = lambda x: s2 / s * x + (s2 * sig ** 2 / s - sig2 * sig) * target.score(x[:, None], t, VP)[:, 0]   # DDIM
    x = np.linspace(-4, 4, 80_001)
    e = 1e-5
    dF = (F(x + e) - F(x - e)) / (2 * e)
    log_q = lambda y: (target.marginal(VP, t).log_prob(y[:, None])
                       - np.log(np.abs((F(y + e) - F(y - e)) / (2 * e))))
    grad_q = (log_q(x + e) - log_q(x - e)) / (2 * e) / dF
    grad_q_naive = target.score(x[:, None], t, VP)[:, 0] / dF   # log-det term dropped
    p_t = np.exp(target.marginal(VP, t).log_prob(x[:, None]))
    S2 = target.score(F(x)[:, None], t2, VP)[:, 0]
    quad = VP.sigma(t2) ** 2 * trapezoid(p_t * (S2 - grad_q) ** 2, x)
    quad_naive = VP.sigma(t2) ** 2 * trapezoid(p_t * (S2 - grad_q_naive) ** 2, x)
    L, se = so.predictor_cost(exact(target, VP), VP, t, t2, target.sample(40_000, 7), 8)
    assert abs(L - quad) < 4.5 * se
    assert abs(quad_naive - quad) > 20 * se   # the test can tell the log-det term is there


def test_predictor_cost_in_two_dimensions_matches_one_dimensional_sum():
    # A product target: the cost of independent coordinates adds, which checks the
    # d-dimensional Jacobian, its transpose-solve and the log-det gradient against d = 1.
    mix = models.GaussianMixture([0.5, 0.5], [[-0.5], [0.5]], [[0.1], [0.1]])
    gauss = models.Gaussian([0.2], [0.5])
    pair = lambda x, t: anp.concatenate([mix.score(x[:, :1], t, VP), gauss.score(x[:, 1:], t, VP)], 1)
    rng = np.random.default_rng(0)
    x0 = np.concatenate([mix.sample(20_000, rng), gauss.sample(20_000, rng)], 1)
    L2, se2 = so.predictor_cost(pair, VP, 0.2, 0.15, x0, 9)
    La, sea = so.predictor_cost(exact(mix, VP), VP, 0.2, 0.15, x0[:, :1], 10)
    Lb, seb = so.predictor_cost(exact(gauss, VP), VP, 0.2, 0.15, x0[:, 1:], 11)
    assert abs(L2 - (La + Lb)) < 4.5 * np.sqrt(se2 ** 2 + sea ** 2 + seb ** 2)


def test_velocity_is_a_parameter():
    score, x0 = exact(GAUSS, VP), GAUSS.sample(1000, 0)
    L, _ = so.corrector_cost(score, VP, 0.5, 0.4, x0, 1)
    L2, _ = so.corrector_cost(score, VP, 0.5, 0.4, x0, 1, velocity=lambda t: 2 * VP.sigma(t))
    assert L2 == pytest.approx(4 * L, rel=1e-12)
    d1, _ = so.local_cost(score, VP, np.array([0.3, 0.6]), x0, 1)
    d2, _ = so.local_cost(score, VP, np.array([0.3, 0.6]), x0, 1, velocity=lambda t: 1.0)
    np.testing.assert_allclose(d2 * VP.sigma(np.array([0.3, 0.6])) ** 2, d1, rtol=1e-12)


def test_interval_costs_and_determinism():
    score, x0 = exact(GAUSS, VP), GAUSS.sample(500, 0)
    ts = so.uniform_schedule(VP, 6)
    c1, s1 = so.interval_costs(score, VP, ts, x0, 3)
    c2, s2 = so.interval_costs(score, VP, ts, x0, np.random.default_rng(3))
    np.testing.assert_array_equal(c1, c2)
    assert c1.shape == s1.shape == (6,) and np.all(c1 > 0)
    # With exact scores the DDIM predictor removes most of the work on a fine schedule
    # (measured 0.4% of the total; on the uniform schedule's last step, a 16-fold drop
    # in nu, it removes almost none, and on a coarse schedule it can cost more).
    fine = so.uniform_schedule(VP, 40)
    c40, _ = so.interval_costs(score, VP, fine, x0, 3)
    p40, _ = so.interval_costs(score, VP, fine, x0, 3, cost="predictor")
    assert p40.sum() < 0.01 * c40.sum()
