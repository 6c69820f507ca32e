"""Targets with exact scores."""
import autograd.numpy as anp
import numpy as np
import pytest
from autograd import elementwise_grad, make_jvp
from scipy.integrate import quad

import models
import scoreopt as so

PROCESS = so.vp_linear()
TARGETS = {
    "gaussian2d": models.Gaussian([0.5, -1.0], [0.3, 2.0]),
    "mixture2d": models.GaussianMixture([0.2, 0.8], [[0.0, 1.0], [2.0, -1.0]], [[0.5, 0.2], [0.3, 1.0]]),
    "cantor": models.mollified_cantor(),
    "bimodal": models.bimodal(),
}


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("t", [1e-3, 0.05, 0.4, 1.0])
def test_score_is_gradient_of_marginal_log_density(name, t):
    target = TARGETS[name]
    x = target.marginal(PROCESS, t).sample(50, 0)
    log_p = lambda y: anp.sum(target.marginal(PROCESS, t).log_prob(y))
    np.testing.assert_allclose(target.score(x, t, PROCESS), elementwise_grad(log_p)(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_score_is_differentiable_in_t(name):
    target, t, h = TARGETS[name], 0.3, 1e-5
    x = target.marginal(PROCESS, t).sample(20, 1)
    _, dS = make_jvp(lambda tt: target.score(x, tt, PROCESS))(t)(1.0)
    fd = (target.score(x, t + h, PROCESS) - target.score(x, t - h, PROCESS)) / (2 * h)
    np.testing.assert_allclose(dS, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_marginal_moments_match_forward_noised_samples(name):
    # Mean and variance of s x0 + sigma eps against the marginal's, within 5 standard errors.
    target, t, n = TARGETS[name], 0.2, 200_000
    rng = np.random.default_rng(3)
    x = PROCESS.s(t) * target.sample(n, rng) + PROCESS.sigma(t) * rng.standard_normal((n, target.dim))
    marg = target.marginal(PROCESS, t)
    var = marg.variance()
    assert np.all(np.abs(x.mean(0) - marg.mean()) < 5 * np.sqrt(var / n))
    # Var of the sample variance is (m4 - var^2)/n; bound m4 by the sample's.
    m4 = np.mean((x - x.mean(0)) ** 4, axis=0)
    assert np.all(np.abs(x.var(0) - var) < 5 * np.sqrt((m4 - var ** 2) / n))


def test_cantor_atoms():
    for level in range(5):
        c = models.mollified_cantor(level=level, interval=(-1.0, 2.0))
        assert len(c.atoms) == 2 ** level and len(c.weights) == 2 ** level
        # Level-1 atoms are the centres of [0,1/3] and [2/3,1], mapped to (-1, 2).
        if level == 1:
            np.testing.assert_allclose(c.atoms, -1 + 3 * np.array([1 / 6, 5 / 6]))
        # Symmetric about the middle of the interval, inside it, weights equal.
        np.testing.assert_allclose(np.sort(c.atoms) + np.sort(c.atoms)[::-1], 1.0, atol=1e-12)
        assert np.all((c.atoms > -1) & (c.atoms < 2))
    c = models.mollified_cantor()
    np.testing.assert_allclose(np.diff(c.atoms).min(), 2 / 27)  # closest modes
    assert c.level == 3 and c.interval == (0.0, 1.0) and c.width == pytest.approx(0.25 / 27)


@pytest.mark.parametrize("name", ["cantor", "bimodal"])
def test_cdf_is_integral_of_density(name):
    target = TARGETS[name]
    for x in (-1.2, 0.1, 0.5, 0.95):
        val, _ = quad(lambda y: np.exp(target.log_prob(np.array([[y]])))[0], -5, x, limit=400,
                      points=[a for a in target.means[:, 0] if a < x])
        assert target.cdf(x) == pytest.approx(val, abs=1e-7)


def test_scores_finite_far_from_modes_and_at_tiny_sigma():
    c = models.mollified_cantor(width=1e-4)
    p = so.ve(sigma_min=1e-6)
    x = np.array([[-1e4], [0.3], [1e4]])
    for t in (0.0, 0.5, 1.0):
        assert np.all(np.isfinite(c.score(x, t, p)))
        assert np.all(np.isfinite(c.marginal(p, t).log_prob(x)))
    # Far out, the score of a mixture is that of the nearest-variance component.
    np.testing.assert_allclose(c.score(np.array([[1e4]]), 1.0, p), -(1e4 - 0.5) / (80 ** 2 + 1e-8), rtol=1e-3)


def test_sampling_is_deterministic_under_a_seed():
    c = TARGETS["mixture2d"]
    np.testing.assert_array_equal(c.sample(100, 7), c.sample(100, np.random.default_rng(7)))


def test_target_bad_input():
    with pytest.raises(ValueError, match="weights"):
        models.GaussianMixture([1.0, -1.0], [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="stds"):
        models.GaussianMixture([1.0, 1.0], [0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="means"):
        models.GaussianMixture([1.0], [[0.0], [1.0]], [1.0])
    with pytest.raises(ValueError, match="var"):
        models.Gaussian([0.0], [-1.0])
    with pytest.raises(ValueError, match="interval"):
        models.mollified_cantor(interval=(1.0, 0.0))
    with pytest.raises(ValueError, match="cdf"):
        TARGETS["gaussian2d"].cdf(0.0)
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 2\) for this 2-D target, got \(3, 1\)"):
        TARGETS["gaussian2d"].log_prob(np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 2\) for this 2-D target, got \(3,\)"):
        TARGETS["gaussian2d"].score(np.zeros(3), 0.5, so.ve())
    with pytest.raises(TypeError, match="rng"):
        TARGETS["bimodal"].sample(3, rng=None)
    with pytest.raises(TypeError, match="process"):
        TARGETS["bimodal"].score(np.zeros((2, 1)), 0.5, process="vp")
