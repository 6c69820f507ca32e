"""The equal local-error rule at image scale: the low-rank-plus-isotropic weight and the fixed point.

The weight (docs/derivations.md, 9.1) keeps the data covariance's top ``k`` eigenpairs and gives the
other ``d - k`` directions their mean variance. It is exact when the spectrum beyond ``k`` is flat
(checked on data built to have exactly such a sample covariance), it recovers the top eigenpairs, it
scales with the data as the flow does, it never forms a ``d x d`` matrix (a memory bound at
d = 16,384), and it is deterministic in its seed. The fixed point halves its step when an update
overshoots, and a result that did not converge is warned of.
"""
import tracemalloc
import warnings

import numpy as np
import pytest

import sampler as sm
import scoreopt as so


def spiked_data(n, d, spikes, flat, seed=0):
    """Rows whose *sample* covariance is exactly R diag(spikes, flat, ..., flat) R^T (R a random rotation)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d))
    q = np.linalg.qr(a - a.mean(axis=0))[0] * np.sqrt(n - 1)        # centred, sample covariance exactly I
    lam = np.concatenate([spikes, np.full(d - len(spikes), flat)])
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return q * np.sqrt(lam) @ rotation.T, lam, rotation


SPIKES = np.array([2.0, 1.0, 0.5])


def gaussian_score(variance, process):
    """The score of N(0, variance I) data under ``process`` (t a float or one time per row)."""
    return lambda x, t: -x / (variance + np.reshape(process.sigma(t), (-1, 1)) ** 2)


def test_the_low_rank_weight_is_the_full_weight_when_the_rest_of_the_spectrum_is_flat():
    x0, lam, rotation = spiked_data(400, 24, SPIKES, 0.05)
    full, low = sm.flow_weight(x0, "data"), sm.flow_weight(x0, "data", rank=3)
    assert full.basis.shape == (24, 24) and low.basis.shape == (24, 3)
    np.testing.assert_allclose(low.variances, SPIKES, rtol=1e-9)           # the top eigenpairs, by subspace iteration
    np.testing.assert_allclose(np.abs(low.basis.T @ rotation[:, :3]), np.eye(3), atol=1e-7)
    assert low.rest == pytest.approx(0.05, rel=1e-9) and low.scale == pytest.approx(full.scale, rel=1e-12)
    score = gaussian_score(0.2, so.ve())
    t_cur, t_next = np.array([0.9, 0.6, 0.3]), np.array([0.6, 0.3, 0.05])
    # (To the subspace iteration's accuracy, about 1e-8 in the basis, which the spikes' 40 times larger
    # weight amplifies. The ancestral step's cost is a Hutchinson estimate whose directions outside the
    # basis differ between the two weights: equal in expectation only, not compared here.)
    for step, rtol in (("euler", 1e-6), ("heun", 1e-6)):
        costs = [sm.flow_error_cost(score, so.ve(), t_cur, t_next, x0, 7, step=step, weight=w).value
                 for w in (full, low)]
        np.testing.assert_allclose(costs[1], costs[0], rtol=rtol)
    costs = [sm.flow_error_cost(score, so.ve(), t_cur, t_next, x0, 7, step="euler", weight=w).value
             for w in (full, low)]
    # ...and differs from the isotropic guess, which replaces the spikes by the mean variance too.
    scalar = sm.flow_error_cost(score, so.ve(), t_cur, t_next, x0, 7, step="euler", weight="scalar").value
    assert np.max(np.abs(scalar / costs[0] - 1)) > 0.05


def test_the_weight_has_its_closed_form_per_eigen_direction():
    # One error along each eigenvector: the weighted error is (1/d) w(lambda_k) with
    # w = (s0^2 lam + sigma0^2) / (s'^2 lam + sigma'^2) for "data", and the same over s0^2 lam + sigma0^2 for "kl".
    process = so.vp_linear()
    x0, lam, rotation = spiked_data(300, 8, SPIKES, 0.1, seed=3)
    t = 0.4
    s0, g0 = process.s(process.t_min), process.sigma(process.t_min)
    s1, g1 = process.s(t), process.sigma(t)
    for kind, rank in (("data", 8), ("data", 3), ("kl", 3)):
        weight = sm.flow_weight(x0, kind, rank=rank)
        got = sm._weighted_error(weight, process, rotation.T.copy(), np.full((8, 1), t))
        w = (s0 ** 2 * lam + g0 ** 2) / (s1 ** 2 * lam + g1 ** 2)
        if kind == "kl":
            w = w / (s0 ** 2 * lam + g0 ** 2)
        np.testing.assert_allclose(got, w / 8, rtol=1e-8)


@pytest.mark.parametrize("rank", [None, 3])
def test_the_cost_scales_with_the_data_as_the_flow_does(rank):
    # Data c x0 under the process whose noise levels are c times as large, with the score of c x0:
    # every error is c times as large and the weight is unchanged, so the cost is c^2 times as large
    # (and the schedule that equalises it the same).
    c = 3.0
    x0 = spiked_data(200, 12, SPIKES, 0.05, seed=1)[0]
    base, scaled = so.ve(0.01, 20.0), so.ve(0.01 * c, 20.0 * c)
    score = gaussian_score(0.3, base)
    score_c = lambda x, t: score(x / c, t) / c
    t_cur, t_next = np.array([0.8, 0.5, 0.2]), np.array([0.5, 0.2, 0.0])
    for step in ("euler", "heun"):
        one = sm.flow_error_cost(score, base, t_cur, t_next, x0, 5, step=step,
                                 weight=sm.flow_weight(x0, "data", rank=rank)).value
        other = sm.flow_error_cost(score_c, scaled, t_cur, t_next, c * x0, 5, step=step,
                                   weight=sm.flow_weight(c * x0, "data", rank=rank)).value
        np.testing.assert_allclose(other, c ** 2 * one, rtol=1e-9)


def test_the_weight_is_deterministic_in_its_seed():
    x0 = spiked_data(300, 40, SPIKES, 0.05, seed=2)[0]
    a, b = sm.flow_weight(x0, rank=3, rng=0), sm.flow_weight(x0, rank=3, rng=0)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    c = sm.flow_weight(x0, rank=3, rng=1)                  # another start: the same subspace, other rounding
    np.testing.assert_allclose(c.variances, a.variances, rtol=1e-9)
    assert not np.array_equal(c.basis, a.basis)


def test_the_default_weight_at_d_16384_needs_no_d_by_d_matrix():
    # Above FULL_RANK_MAX the default keeps the top LOW_RANK eigenpairs: memory O(n d + d k), not the
    # 2.1 GB of a 16,384 x 16,384 covariance.
    n, d = 192, 16_384
    x0 = np.random.default_rng(0).standard_normal((n, d)) * np.linspace(0.2, 1.0, d)
    tracemalloc.start()
    try:
        weight = sm.flow_weight(x0)
        score = gaussian_score(0.5, so.ve())
        value = sm.flow_error_cost(score, so.ve(), np.array([0.5]), np.array([0.2]), x0[:8], 0, weight=weight).value
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert weight.basis.shape == (d, sm.LOW_RANK) and d > sm.FULL_RANK_MAX
    assert np.isfinite(value).all() and value[0] > 0
    assert peak < 8 * x0.nbytes, f"{peak / 2 ** 20:.0f} MB traced for {x0.nbytes / 2 ** 20:.0f} MB of data"


def test_the_fixed_point_halves_its_step_when_an_update_overshoots():
    # A cost of order h^4 updated as if it were of order 1 overshoots at gamma = 1 (each update moves
    # the times about four times too far and reverses); the safeguard halves gamma and still reaches
    # equal costs.
    process = so.ve()

    def cost(score, process, t_cur, t_next, x0, rng):
        h = t_cur - t_next
        return h ** 4 * (1.0 + 30.0 * t_next), np.zeros_like(h)

    seen = []
    ts = so.uniform_schedule(process, 8)
    result = so.equal_cost_schedule(lambda x, t: -x, process, ts, np.ones((4, 1)), 0, cost=cost, order=1, max_iter=200,
                                    tol=1e-6,
                                    callback=lambda it, n, info: seen.append(info["gamma"]))
    assert result.converged
    assert result.costs.max() / result.costs.min() < 1.001
    assert min(seen) < 1.0 and seen[0] == 1.0


def test_a_result_that_did_not_converge_is_warned_of():
    x0 = np.random.default_rng(0).normal(0, 0.5, (200, 2))
    score = gaussian_score(0.25, so.ve())
    with pytest.warns(RuntimeWarning, match="did not converge in 1 update"):
        result = sm.equal_error_schedule(score, so.ve(), 6, x0, 0, step="heun", max_iter=1)
    assert not result.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sm.equal_error_schedule(score, so.ve(), 6, x0, 0, step="heun").converged
