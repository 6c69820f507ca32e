"""Predictor-corrector sampler and the exact evaluations (docs/derivations.md, section 6)."""
import numpy as np
import pytest
from scipy.integrate import trapezoid

import models
import sampler as sm
import scoreopt as so

VE, VP = so.ve(), so.vp_linear()
GAUSS = models.Gaussian([0.3, -1.0], [0.2, 2.0])
COMBINATIONS = [("euler", 0), ("heun", 0), ("ancestral", 0), ("euler_maruyama", 0), ("none", 2),
                ("euler", 1), ("heun", 1), ("ancestral", 2)]


def exact(target, process):
    return lambda x, t: target.score(x, t, process)


@pytest.mark.parametrize("process", [VE, VP], ids=["ve", "vp_linear"])
@pytest.mark.parametrize("predictor, m", COMBINATIONS)
def test_samples_match_exact_gaussian_output_law(process, predictor, m):
    ts = so.edm_schedule(process, 8)
    mean, var = sm.gaussian_output_law(GAUSS, process, ts, predictor=predictor, corrector_steps=m, corrector_ratio=0.05)
    n = 100_000
    x_T = sm.prior_sample(process, n, GAUSS.variance(), 1)
    x, _ = sm.sample(exact(GAUSS, process), process, ts, x_T, 2, predictor=predictor, corrector_steps=m, corrector_ratio=0.05)
    # Mean: standard error sqrt(var/n). Variance of a Gaussian sample: sqrt(2/n) var.
    assert np.all(np.abs(x.mean(0) - mean) < 4.5 * np.sqrt(var / n))
    assert np.all(np.abs(x.var(0) - var) < 4.5 * np.sqrt(2 / n) * var)
    # The exact law is diagonal: the sample covariance's off-diagonal entry has
    # standard error sqrt(var_0 var_1 / n).
    assert abs(np.cov(x.T)[0, 1]) < 4.5 * np.sqrt(var[0] * var[1] / n)


def test_exact_law_converges_to_the_marginal_first_and_second_order():
    # Started from the exact p_{t_max} (mean-zero data), the only error is the
    # discretisation: the state error is O(1/T) for Euler and O(1/T^2) for Heun, so the
    # KL (quadratic in it) falls by ~4 and ~16 when T doubles.
    target = models.Gaussian([0.0], [0.25])
    goal = target.marginal(VE, VE.t_min)
    kl = {p: [sm.gaussian_kl(*sm.gaussian_output_law(target, VE, so.uniform_schedule(VE, T), predictor=p),
                             goal.mean(), goal.var) for T in (20, 40, 80, 160)]
          for p in ("euler", "heun")}
    for p, rate in (("euler", 4.0), ("heun", 16.0)):
        ratios = np.array(kl[p][:-1]) / np.array(kl[p][1:])
        assert np.all(np.diff(kl[p]) < 0)
        assert ratios[-1] == pytest.approx(rate, rel=0.25)
    assert kl["heun"][-1] < kl["euler"][-1] / 100


def test_ancestral_and_annealed_langevin_converge_too():
    target = models.Gaussian([0.5], [0.1])
    goal = target.marginal(VP, VP.t_min)
    for predictor, m in (("ancestral", 0), ("euler_maruyama", 0), ("none", 3)):
        kl = [sm.gaussian_kl(*sm.gaussian_output_law(target, VP, so.uniform_schedule(VP, T), predictor=predictor, corrector_steps=m,
                                                     corrector_ratio=0.05), goal.mean(), goal.var)
              for T in (25, 100, 400)]
        # Annealed Langevin keeps an O(r) bias from the unadjusted corrector.
        assert kl[0] > kl[1] > kl[2] and kl[2] < 0.2 * kl[0]


def test_corrector_leaves_the_marginal_nearly_invariant():
    # Unadjusted Langevin on N(m, a) with step eps has stationary variance a / (1 - eps/(2a)):
    # a 1e-2 relative bias at r = 0.02. A wrong sign or a wrong sqrt(2) changes the
    # variance by O(1), which these bounds exclude.
    t, r, n = 0.3, 0.02, 200_000
    marginal = models.mollified_cantor().marginal(VP, t)
    x = marginal.sample(n, 0)
    eps = r * VP.sigma(t) ** 2
    rng = np.random.default_rng(1)
    score = exact(models.mollified_cantor(), VP)
    for _ in range(30):
        x = sm.langevin_step(score, x, t, eps, rng)
    var = marginal.variance()[0]
    assert abs(x.mean() - marginal.mean()[0]) < 4.5 * np.sqrt(var / n)
    assert abs(x.var() / var - 1) < 0.02
    assert sm.wasserstein1(x, marginal.cdf) < 0.01 * np.sqrt(var)


@pytest.mark.parametrize("predictor", ["euler", "heun"])
def test_flow_density_integrates_to_one_and_matches_histogram(predictor):
    target = models.bimodal()
    prior = models.Gaussian([0.0], sm.prior_variance(VP, target.variance()))
    score = exact(target, VP)
    # On a grid of starting points: the output spacing comes from the map itself, not
    # from the tracked Jacobian, so both checks below test the Jacobian.
    ts = so.loglinear_schedule(VP, 12)
    grid = np.linspace(-6, 6, 100_001)[:, None] * np.sqrt(prior.var)
    x_out, log_p = sm.flow_log_density(score, VP, ts, grid, prior.log_prob, predictor=predictor)
    assert trapezoid(np.exp(log_p), x_out[:, 0]) == pytest.approx(1.0, abs=1e-3)
    slope = np.exp(prior.log_prob(grid) - log_p)             # tracked dx_out / dx_T
    mass = log_p > log_p.max() + np.log(1e-2)                # where the output has mass
    np.testing.assert_allclose(np.gradient(x_out[:, 0], grid[:, 0])[mass], slope[mass], rtol=1e-2)
    # Against a histogram of the sampler's own output: expected counts from the output CDF.
    x, _ = sm.sample(score, VP, ts, prior.sample(200_000, 3), 4, predictor=predictor)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (np.exp(log_p[1:]) + np.exp(log_p[:-1])) * np.diff(x_out[:, 0]))])
    edges = np.linspace(-1.5, 1.5, 61)
    expected = len(x) * np.diff(np.interp(edges, x_out[:, 0], cdf))
    hist, _ = np.histogram(x[:, 0], edges)
    big = expected > 50
    assert big.sum() > 20
    assert np.max(np.abs(hist[big] - expected[big]) / np.sqrt(expected[big])) < 5


def test_flow_density_refuses_a_folding_step():
    target = models.bimodal()
    prior = models.Gaussian([0.0], sm.prior_variance(VP, target.variance()))
    grid = np.linspace(-6, 6, 100_001)[:, None] * np.sqrt(prior.var)   # the fold is narrow
    with pytest.raises(ValueError, match="folds the line"):
        sm.flow_log_density(exact(target, VP), VP, so.loglinear_schedule(VP, 8), grid, prior.log_prob, predictor="heun")


def test_flow_kl_is_small_for_a_fine_schedule_and_larger_for_a_coarse_one():
    target = models.bimodal()
    prior = models.Gaussian([0.0], sm.prior_variance(VP, target.variance()))
    x_T = prior.sample(5000, 5)
    kls = []
    for T in (10, 100):
        x, log_p = sm.flow_log_density(exact(target, VP), VP, so.uniform_schedule(VP, T), x_T, prior.log_prob, predictor="heun")
        kls.append(np.mean(log_p - target.log_prob(x)))
    assert kls[1] < 0.05 < kls[0]


def test_cantor_ancestral_twenty_steps_optimised_fills_all_modes_uniform_does_not():
    # The paper's Figure 1 with exact scores.
    cantor = models.mollified_cantor()
    score = exact(cantor, VP)
    smap = so.estimate_schedule_map(score, VP, cantor.sample(4000, 0), 1)
    x_T = sm.prior_sample(VP, 20_000, cantor.variance(), 2)
    optimised, _ = sm.sample(score, VP, smap.schedule(20), x_T, 3, predictor="ancestral")
    uniform, _ = sm.sample(score, VP, so.uniform_schedule(VP, 20), x_T, 3, predictor="ancestral")
    assert sm.mode_coverage(optimised, cantor.atoms).covered == 8
    assert sm.mode_coverage(uniform, cantor.atoms).covered <= 2
    assert sm.wasserstein1(optimised, cantor.cdf) < 0.5 * sm.wasserstein1(uniform, cantor.cdf)
    assert sm.mean_log_density(optimised, cantor) > sm.mean_log_density(uniform, cantor) + 1


@pytest.mark.parametrize("predictor, m", COMBINATIONS)
@pytest.mark.parametrize("denoise", [False, True])
def test_nfe_is_exact_and_seed_determines_samples(predictor, m, denoise):
    calls = []

    def counting(x, t):
        calls.append(t)
        return GAUSS.score(x, t, VP)

    ts = so.uniform_schedule(VP, 7)
    x_T = sm.prior_sample(VP, 10, GAUSS.variance(), 0)
    x1, nfe = sm.sample(counting, VP, ts, x_T, 5, predictor=predictor, corrector_steps=m, denoise=denoise)
    per_step = {"none": 0, "euler": 1, "heun": 2, "ancestral": 1, "euler_maruyama": 1}[predictor]
    assert nfe == len(calls) == 7 * (per_step + m) + denoise
    x2, _ = sm.sample(counting, VP, ts, x_T, np.random.default_rng(5), predictor=predictor, corrector_steps=m, denoise=denoise)
    np.testing.assert_array_equal(x1, x2)


def test_heun_has_no_second_stage_on_a_step_to_sigma_zero():
    # s = 1, sigma = 2t, data N(0, 1): S(x, t) = -x / (1 + nu^2) and the slope of x in nu
    # is d = nu x / (1 + nu^2). From nu = 2 to 1: Euler stage x_bar = x - 0.4 x = 0.6 x,
    # d_next = 0.3 x, trapezoid x1 = x - 0.5 (0.4 + 0.3) x = 0.65 x. From nu = 1 to 0:
    # x_bar = x1 - x1 / 2 = 0.325 x, and no second stage (it would give 0.75 x1 = 0.4875 x).
    # A process whose nu is 0 at t_min is no process for the sampler (nu must be positive), so
    # the steps are taken directly, with the exact score as a plain function.
    p = so.Process(s=lambda t: 1.0 + 0.0 * t, sigma=lambda t: 2.0 * t, t_min=0.0, t_max=1.0)
    score = lambda x, t: -x / (1.0 + so.as_column(p.nsr(t)) ** 2)
    x1, nfe1 = sm.heun_step(score, p, np.ones((3, 1)), 1.0, 0.5, None)
    x, nfe = sm.heun_step(score, p, x1, 0.5, 0.0, None)
    assert (nfe1, nfe) == (2, 1)
    np.testing.assert_allclose(x1, 0.65, rtol=1e-14)
    np.testing.assert_allclose(x, 0.325, rtol=1e-14)
    with pytest.raises(ValueError, match="nu = sigma/s must be finite, positive and increasing from t_min to t_max"):
        sm.sample(score, p, np.array([0.0, 0.5, 1.0]), np.ones((3, 1)), 0, predictor="heun")


# The peers' samplers, transcribed independently, on three processes and three schedules.
THREE_PROCESSES = pytest.mark.parametrize("process", [VE, VP, so.vp_cosine()], ids=["ve", "vp_linear", "vp_cosine"])
THREE_SCHEDULES = pytest.mark.parametrize("make_schedule", [so.uniform_schedule, so.loglinear_schedule,
                                                            lambda p, T: so.edm_schedule(p, T, 7.0)],
                                          ids=["uniform", "loglinear", "edm7"])


def gauss_denoiser():
    """Denoiser of N(m, lam) data in y = x/s with noise nu: E[x0 | y] = m + lam (y - m) / (lam + nu^2)."""
    m, lam = GAUSS.means[0], GAUSS.var
    return lambda y, nu: m + lam * (y - m) / (lam + nu ** 2)


def k_diffusion_ancestral(denoiser, y, sigmas, rng):
    """k-diffusion's sample_euler_ancestral with get_ancestral_step (eta = 1), written out
    independently from its formulas: sigma_up = min(sigma_to, sqrt(sigma_to^2 (sigma_from^2 -
    sigma_to^2) / sigma_from^2)), sigma_down = sqrt(sigma_to^2 - sigma_up^2), then an Euler
    step to sigma_down and noise of size sigma_up. `sigmas` descending, `y = x / s`."""
    for sigma_from, sigma_to in zip(sigmas[:-1], sigmas[1:]):
        sigma_up = min(sigma_to, np.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
        sigma_down = np.sqrt(sigma_to ** 2 - sigma_up ** 2)
        d = (y - denoiser(y, sigma_from)) / sigma_from
        y = y + d * (sigma_down - sigma_from) + rng.standard_normal(y.shape) * sigma_up
    return y


@THREE_PROCESSES
@THREE_SCHEDULES
def test_ancestral_step_is_k_diffusions_euler_ancestral(process, make_schedule):
    denoiser = gauss_denoiser()
    ts = make_schedule(process, 9)
    x_T = sm.prior_sample(process, 200, GAUSS.variance(), 0)
    x, nfe = sm.sample(exact(GAUSS, process), process, ts, x_T, 7, predictor="ancestral")
    y = k_diffusion_ancestral(denoiser, x_T / process.s(ts[-1]), so.nsr(process, ts)[::-1],
                              np.random.default_rng(7))
    assert nfe == 9
    np.testing.assert_allclose(x, process.s(ts[0]) * y, rtol=1e-11, atol=1e-13)


def k_diffusion_dpmpp_2m(denoiser, y, sigmas):
    """k-diffusion's sample_dpmpp_2m written out independently from its formulas: with
    t = -log sigma and h = t_next - t, the first step and a step to sigma = 0 are first order,
    y = (sigma_next / sigma) y - expm1(-h) D; later steps use D_d = (1 + 1/(2r)) D - (1/(2r)) D_old
    with r = h_last / h. `sigmas` descending, ending with 0; `y = x / s`."""
    old = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        D = denoiser(y, sigma)
        if sigma_next == 0:
            y = D
        else:
            h = np.log(sigma) - np.log(sigma_next)
            if old is None:
                y = (sigma_next / sigma) * y - np.expm1(-h) * D
            else:
                r = (np.log(sigmas[i - 1]) - np.log(sigma)) / h
                y = (sigma_next / sigma) * y - np.expm1(-h) * ((1 + 1 / (2 * r)) * D - 1 / (2 * r) * old)
        old = D
    return y


@THREE_PROCESSES
@THREE_SCHEDULES
def test_dpmpp_2m_is_k_diffusions_sample_dpmpp_2m(process, make_schedule):
    # Our T-step schedule plus the final denoising is k-diffusion's T + 1 sigmas and a 0.
    denoiser = gauss_denoiser()
    ts = make_schedule(process, 9)
    x_T = sm.prior_sample(process, 50, GAUSS.variance(), 0)
    x, nfe = sm.sample(exact(GAUSS, process), process, ts, x_T, 0, predictor="dpmpp_2m", denoise=True)
    y = k_diffusion_dpmpp_2m(denoiser, x_T / process.s(ts[-1]), so.to_sigmas(process, ts))
    assert nfe == 10
    np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-13)      # denoised: x = x0-estimate, s = 1


def test_dpmpp_2m_is_second_order_and_its_exact_law_matches_its_samples():
    # Started from the exact p_{t_max}: the KL falls by about 16 when T doubles (second order);
    # the exact law of the loop (its state is affine too) matches 100,000 samples.
    target = models.Gaussian([0.0], [0.25])
    goal = target.marginal(VP, VP.t_min)
    kl = [sm.gaussian_kl(*sm.gaussian_output_law(target, VP, so.loglinear_schedule(VP, T), predictor="dpmpp_2m"),
                         goal.mean(), goal.var) for T in (40, 80, 160)]
    assert kl[0] / kl[1] == pytest.approx(16, rel=0.3) and kl[1] / kl[2] == pytest.approx(16, rel=0.3)
    ts = so.edm_schedule(VP, 8)
    mean, var = sm.gaussian_output_law(GAUSS, VP, ts, predictor="dpmpp_2m")
    x = sm.sample(exact(GAUSS, VP), VP, ts, sm.prior_sample(VP, 100_000, GAUSS.variance(), 1), 2,
                  predictor="dpmpp_2m").x
    assert np.all(np.abs(x.mean(0) - mean) < 4.5 * np.sqrt(var / 100_000))
    assert np.all(np.abs(x.var(0) - var) < 4.5 * np.sqrt(2 / 100_000) * var)


def test_ancestral_step_cannot_blow_up_where_euler_maruyama_does():
    # Issue 7: VE, 10 log-linear steps from 80 to 0.002, data N(0, 0.5^2). Euler-Maruyama
    # multiplies x by 1 - 2 sigma^2 dlog(sigma) / (sigma^2 + c^2) per step, beyond 1 in size
    # once sigma falls by more than e per step; the posterior step is a convex combination.
    target = models.Gaussian([0.0], [0.25])
    goal = target.marginal(VE, VE.t_min)
    ts = so.loglinear_schedule(VE, 10)
    kl = {p: sm.gaussian_kl(*sm.gaussian_output_law(target, VE, ts, predictor=p), goal.mean(), goal.var)
          for p in ("ancestral", "euler_maruyama")}
    assert kl["euler_maruyama"] > 1000 and kl["ancestral"] < 0.2   # measured: 1039 and 0.147


def eta_step(eta):
    """A user-defined DDIM(eta) step in y = x/s: eta = 0 is DDIM, eta = 1 the ancestral step."""
    def step(score, process, x, t_cur, t_next, rng):
        s_cur, s_next = process.s(t_cur), process.s(t_next)
        nu, nu_next = process.nsr(t_cur), process.nsr(t_next)
        y = x / s_cur
        denoised = y + nu ** 2 * s_cur * score(x, t_cur)
        c = eta * nu_next * np.sqrt(1 - (nu_next / nu) ** 2)
        y_next = denoised + np.sqrt(nu_next ** 2 - c ** 2) * (y - denoised) / nu
        noise = c * rng.standard_normal(x.shape) if eta > 0 else 0.0   # DDIM draws nothing
        return s_next * (y_next + noise), 1
    return step


@pytest.mark.parametrize("process", [VE, VP], ids=["ve", "vp_linear"])
def test_user_defined_steps_work_in_sample_output_law_and_flow_density(process):
    ts, score = so.edm_schedule(process, 8), exact(GAUSS, process)
    x_T = sm.prior_sample(process, 100_000, GAUSS.variance(), 1)
    half = eta_step(0.5)
    x, nfe = sm.sample(score, process, ts, x_T, 2, predictor=half, corrector_steps=1, corrector_ratio=0.05)
    assert nfe == 16
    # Its exact law (noise draws counted by running it) against Monte Carlo, as above.
    mean, var = sm.gaussian_output_law(GAUSS, process, ts, predictor=half, corrector_steps=1, corrector_ratio=0.05)
    n = len(x)
    assert np.all(np.abs(x.mean(0) - mean) < 4.5 * np.sqrt(var / n))
    assert np.all(np.abs(x.var(0) - var) < 4.5 * np.sqrt(2 / n) * var)
    # eta = 1 is the built-in ancestral step, eta = 0 DDIM (the built-in Euler step).
    for eta, name in ((1.0, "ancestral"), (0.0, "euler")):
        a, _ = sm.sample(score, process, ts, x_T[:50], 3, predictor=eta_step(eta))
        b, _ = sm.sample(score, process, ts, x_T[:50], 3, predictor=name)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sm.gaussian_output_law(GAUSS, process, ts, predictor=eta_step(eta)),
                                   sm.gaussian_output_law(GAUSS, process, ts, predictor=name), rtol=1e-10)
    # The flow density follows a deterministic user step and refuses a stochastic one.
    one_d = models.bimodal()
    prior = models.Gaussian([0.0], sm.prior_variance(process, one_d.variance()))
    start = prior.sample(500, 4)
    ddim = eta_step(0.0)
    out_user = sm.flow_log_density(exact(one_d, process), process, ts, start, prior.log_prob, predictor=ddim)
    out_builtin = sm.flow_log_density(exact(one_d, process), process, ts, start, prior.log_prob, predictor="euler")
    np.testing.assert_allclose(out_user[1], out_builtin[1], rtol=1e-9)
    for stochastic in (half, "ancestral", "euler_maruyama"):
        with pytest.raises(ValueError, match="draws noise"):
            sm.flow_log_density(exact(one_d, process), process, ts, start, prior.log_prob, predictor=stochastic)


def test_tweedie_denoising_is_the_posterior_mean():
    # Gaussian data: E[x0 | x_t] = mu + s lambda (x_t - s mu) / (s^2 lambda + sigma^2).
    t = 0.4
    x = GAUSS.marginal(VP, t).sample(5, 0)
    s, sig = VP.s(t), VP.sigma(t)
    expect = GAUSS.means[0] + s * GAUSS.var * (x - s * GAUSS.means[0]) / (s ** 2 * GAUSS.var + sig ** 2)
    np.testing.assert_allclose(sm.tweedie_denoise(exact(GAUSS, VP), VP, x, t), expect, rtol=1e-12)


def test_gaussian_kl_is_the_closed_form_with_its_mean_term():
    # KL(N(m1, v1) || N(m2, v2)) = 0.5 [v1/v2 - 1 - log(v1/v2) + (m1 - m2)^2 / v2], summed.
    m1, v1, m2, v2 = np.array([0.3, -1.0]), np.array([0.5, 2.0]), np.array([0.0, 0.5]), np.array([1.0, 1.5])
    closed = 0.5 * np.sum(v1 / v2 - 1 - np.log(v1 / v2) + (m1 - m2) ** 2 / v2)
    assert sm.gaussian_kl(m1, v1, m2, v2) == pytest.approx(closed, rel=1e-14)
    assert sm.gaussian_kl(m1, v2, m2, v2) == pytest.approx(0.5 * np.sum((m1 - m2) ** 2 / v2), rel=1e-14)
    assert sm.gaussian_kl(m1, v1, m1, v1) == 0.0


def test_metrics():
    target = models.Gaussian([0.0], [1.0])
    x = target.sample(100_000, 0)
    assert sm.wasserstein1(x, target.cdf) < 0.01
    assert sm.wasserstein1(x + 0.5, target.cdf) == pytest.approx(0.5, abs=0.01)   # a shift costs its size
    cov = sm.mode_coverage(np.array([0.0, 0.01, 1.0, 5.0]), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(cov.masses, [0.5, 0.25, 0.0])
    assert cov.covered == 2 and cov.radius == 0.25
    assert sm.mean_log_density(x, target) == pytest.approx(-0.5 * np.log(2 * np.pi) - 0.5, abs=0.01)
    grid = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(sm.density_estimate(x, grid), np.exp(target.log_prob(grid[:, None])), atol=0.01)
    err, se = sm.score_error(exact(target, VP), exact(target, VP), VP, so.uniform_schedule(VP, 4), x[:100], 0)
    assert err == 0.0 and se == 0.0
    biased = lambda y, t: target.score(y, t, VP) + 1.0 / VP.sigma(t)
    err, se = sm.score_error(biased, exact(target, VP), VP, so.uniform_schedule(VP, 4), x[:100], 0)
    assert err == pytest.approx(1.0)


def test_sampler_bad_input():
    score, ts = exact(GAUSS, VP), so.uniform_schedule(VP, 5)
    x_T = np.zeros((4, 2))
    with pytest.raises(ValueError, match="`predictor` must be one of"):
        sm.sample(score, VP, ts, x_T, 0, predictor="rk4")
    with pytest.raises(ValueError, match="`predictor` must be one of"):
        sm.sample(score, VP, ts, x_T, 0, predictor=["euler"])
    with pytest.raises(ValueError, match="strictly increasing"):
        sm.sample(score, VP, ts[::-1], x_T, 0)
    with pytest.raises(ValueError, match="start at t_min"):
        sm.sample(score, VP, ts[1:], x_T, 0)
    with pytest.raises(ValueError, match=r"`x_T` must have shape \(n, d\)"):
        sm.sample(score, VP, ts, np.zeros(4), 0)
    with pytest.raises(ValueError, match=r"returned shape \(4, 2\) at t = 1; expected \(4, 1\) \(step 1 of 5, "):
        sm.sample(lambda x, t: np.zeros((len(x), 2)), VP, ts, np.zeros((4, 1)), 0)
    with pytest.raises(so.ScoreEvaluationError, match=r"`score` raised ValueError at t = 1: `x` must have shape "
                       r"\(n, 2\).* \(step 1 of 5"):
        sm.sample(score, VP, ts, np.zeros((4, 1)), 0)        # the 2-D target refuses 1-D x
    with pytest.raises(ValueError, match="`corrector_steps` must be >= 0"):
        sm.sample(score, VP, ts, x_T, 0, corrector_steps=-1)
    with pytest.raises(ValueError, match="`corrector_ratio` must be positive"):
        sm.sample(score, VP, ts, x_T, 0, corrector_ratio=0.0)
    nan_late = lambda x, t: score(x, t) * (np.nan if t < 0.5 else 1.0)
    with pytest.raises(ValueError, match=r"non-finite values at t = 0\.4"):
        sm.sample(nan_late, VP, ts, x_T, 0, predictor="euler")
    with pytest.raises(ValueError, match="Gaussian"):
        sm.gaussian_output_law(models.bimodal(), VP, ts)
    with pytest.raises(ValueError, match="`predictor` must be one of"):
        sm.gaussian_output_law(GAUSS, VP, ts, predictor="rk4")
    with pytest.raises(ValueError, match="`corrector_steps` must be >= 0"):
        sm.gaussian_output_law(GAUSS, VP, ts, corrector_steps=-2)


@pytest.mark.parametrize("predictor", ["euler", "heun"])
def test_ode_samplers_depend_on_noise_levels_only(predictor):
    # The same sigma levels reached through a geometric or a linear VE time coordinate
    # give the same samples: the steps work in (nu, x/s).
    lin = so.Process(s=lambda t: 1.0 + 0.0 * t, sigma=lambda t: 0.002 + (80 - 0.002) * t,
                     t_min=0.0, t_max=1.0)
    sigmas = VE.sigma(so.edm_schedule(VE, 12))
    ts_lin = so.time_from_nsr(lin, sigmas)
    ts_lin[0], ts_lin[-1] = 0.0, 1.0
    x_T = sm.prior_sample(VE, 50, GAUSS.variance(), 0)
    a, _ = sm.sample(exact(GAUSS, VE), VE, so.edm_schedule(VE, 12), x_T, 1, predictor=predictor)
    b, _ = sm.sample(exact(GAUSS, lin), lin, ts_lin, x_T, 1, predictor=predictor)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
