"""Rules and closed forms retired from the library; kept so that the benchmarks can compare against them;
their measurements are in docs/derivations.md.

- :func:`step_cost`, the cost of one sampler step from the Stein identity, with its closed form for
  Gaussian data :func:`gaussian_step_cost` (they were ``sampler.step_cost`` and
  ``sampler.gaussian_step_cost``; docs/derivations.md, section 8). It sees the model's error as
  well as the step's; ``sampler.flow_error_cost`` replaced it.
- :func:`gaussian_corrector_cost` and :func:`gaussian_predictor_cost`, the exact finite-step
  corrector and DDIM-predictor costs for Gaussian data (they were ``scoreopt.gaussian_corrector_cost``
  and ``scoreopt.gaussian_predictor_cost``; docs/derivations.md, section 1; the tests load them from
  here, through ``tests/oracles.py``, as the oracles of the Monte-Carlo costs).

Imported by the scripts of this folder as ``import retired`` (each puts its own folder on
``sys.path``). It uses only names that ``scoreopt`` and ``sampler`` still share.
"""
import numpy as np

import sampler
import scoreopt
from scoreopt import (Estimate, as_real_array, as_rng, check_bool, check_data, check_int, check_process,
                      check_step_times, checked_score, noised)

__all__ = ["step_cost", "gaussian_step_cost", "gaussian_corrector_cost", "gaussian_predictor_cost"]


# --------------------------------------------------------------------------------
# The step cost of the Stein identity (was sampler.step_cost)
# --------------------------------------------------------------------------------

def step_cost(score, process, t_cur, t_next, x0, rng, *, step, affine=False, n_groups=10):
    """Cost of one sampler step from the Stein identity, with scores only (derived, docs/derivations.md, 8).

    With ``x = s(t) x0 + sigma(t) eps`` at ``t = t_cur`` and ``y = step(score, process,
    x, t, t', rng)`` the sampler's own step to ``t' = t_next`` (its noise included), the
    Stein identity ``E_{p_t'}[y S(y, t')^T] = -I`` holds for the true marginal and fails
    for the pushed samples in proportion to the step's error. Since
    ``E_{p_t}[x S(x, t)^T] = -I`` too, the residual is estimated with that control
    variate, on the same samples:

        M = E[ y S(y, t')^T - x S(x, t)^T ],     L_step = ||M||_F^2,

    unbiasedly, as the mean of ``<M_g, M_h>_F`` over pairs of ``n_groups`` independent
    sample groups (a U-statistic), with a jackknife standard error. No velocity
    weighting. ``affine=True`` adds the constant test function, which sees the mean:
    ``+ ||sigma(t') E[S(y, t') - S(x, t)]||^2`` (``E_{p_t}[S] = 0``), estimated the same
    way. For data ``N(0, diag lambda)`` and the exact score, ``L_step = sum_k (1 - P_k /
    A'_k)^2`` with ``P_k`` the pushed and ``A'_k`` the target variance
    (:func:`gaussian_step_cost`); it is zero for an exact step.

    It measures the model's error as well as the step's, so it is meant for exact (or
    very accurate) scores; for a trained model use ``sampler.flow_error_cost``.

    ``t_cur``, ``t_next``: floats (or arrays of one shape, one interval each), ``t_next < t_cur``;
    ``x0``: data ``(n, d)``, ``n >= 2 n_groups``; ``step``: a one-step sampler step or its name
    (``sampler.PREDICTORS``), stochastic ones included, not a multistep one. Returns an ``Estimate``
    ``(value, stderr)``; the value may be slightly negative by Monte-Carlo error (it is unbiased);
    ``scoreopt.interval_costs`` clips it at zero. Over 30 seeds (N(0, diag k^-1.5), d = 8, 10,000
    samples) the estimates scattered 1.15-1.22 times the reported jackknife error: it is slightly
    optimistic with 10 groups.
    """
    process = check_process(process)
    t_cur, t_next = check_step_times(t_cur, t_next, process, towards_data=True)
    score, x0, rng = checked_score(score, process=process), check_data(x0, min_rows=2), as_rng(rng)
    step = sampler.resolve_predictor(step, "step")
    if getattr(step, "multistep", False):
        raise ValueError("`step` carries a state from step to step; step_cost takes one-step samplers")
    affine, n_groups = check_bool(affine, "affine"), check_int(n_groups, "n_groups", 2)
    if len(x0) < 2 * n_groups:
        raise ValueError(f"`x0` needs at least {2 * n_groups} samples for {n_groups} groups")
    out = [_step_cost(score, process, float(a), float(b), x0, rng, step, affine, n_groups)
           for a, b in zip(np.ravel(t_cur), np.ravel(t_next))]
    if np.ndim(t_cur) == 0:
        return out[0]
    return Estimate(*(np.array(c).reshape(np.shape(t_cur)) for c in zip(*out)))


def _step_cost(score, process, t, t2, x0, rng, step, affine, n_groups):
    x = noised(process, x0, t, rng)
    S_x = score(x, t)
    y = step(score, process, x, t, t2, rng)[0]
    S_y = score(y, t2)
    groups = np.array_split(np.arange(len(x)), n_groups)
    # Per-group residuals, flattened: (G, d*d), plus (G, d) for the constant test function.
    M = np.array([((y[g].T @ S_y[g]) - (x[g].T @ S_x[g])).ravel() / len(g) for g in groups])
    if affine:
        sigma_next = float(process.sigma(t2))
        M = np.hstack([M, np.array([sigma_next * (S_y[g] - S_x[g]).mean(axis=0) for g in groups])])
    return _pair_product_mean(M)


def _pair_product_mean(M):
    """Unbiased ``||E m||^2`` from independent group means ``M`` (G, k): the mean of
    ``<M_g, M_h>`` over ``g != h``, and its jackknife standard error."""
    G = len(M)
    total, squares = M.sum(axis=0), np.sum(M ** 2, axis=1)
    U = (total @ total - squares.sum()) / (G * (G - 1))
    # Leave group g out: sums over the other G - 1 groups.
    rest = total[None, :] - M
    U_minus = (np.sum(rest ** 2, axis=1) - (squares.sum() - squares)) / ((G - 1) * (G - 2)) if G > 2 else np.full(G, U)
    stderr = np.sqrt((G - 1) / G * np.sum((U_minus - U_minus.mean()) ** 2))
    return Estimate(float(U), float(stderr))


def gaussian_step_cost(process, t_cur, t_next, variances, pushed_variances):
    """Exact ``L_step = sum_k (1 - P_k / A'_k)^2`` for zero-mean data ``N(0, diag(lambda))`` (derived).

    For a step that maps ``p_t = N(0, diag(A))`` to ``N(0, diag(P))`` (``P`` the pushed
    variances: every built-in step is affine per coordinate with the exact score) and
    the target ``p_t' = N(0, diag(A'))``: ``E[y S(y, t')^T] = -diag(P / A')`` and
    ``E[x S(x, t)^T] = -I``, so ``M = diag(1 - P / A')``. ``t_cur`` (checked, above
    ``t_next``) keeps the signature of :func:`step_cost`.
    """
    process = check_process(process)
    lam = as_real_array(variances, "variances").reshape(-1)
    P = as_real_array(pushed_variances, "pushed_variances").reshape(-1)
    if P.shape != lam.shape:
        raise ValueError("`pushed_variances` and `variances` must have the same length")
    _, t_next = check_step_times(t_cur, t_next, process, towards_data=True)
    A2 = process.s(t_next) ** 2 * lam + process.sigma(t_next) ** 2
    return float(np.sum((1.0 - P / A2) ** 2))


# --------------------------------------------------------------------------------
# Closed forms of the finite-step costs for Gaussian data (were scoreopt.gaussian_*_cost)
# --------------------------------------------------------------------------------

def gaussian_corrector_cost(process, t_cur, t_next, variances, mean=None):
    """Exact finite-step ``L_c(t, t')`` for data ``N(mean, diag(variances))``, ``v = sigma``.

    With ``p_t = N(m, diag(a))`` and ``p_t' = N(m', diag(a'))`` (``m = s mean``,
    ``a = s^2 lambda + sigma^2``), the score difference at ``x ~ p_t`` is Gaussian and

        L_c = sigma(t')^2 sum_k [ (m'_k - m_k)^2 / a'_k^2 + a_k (1/a_k - 1/a'_k)^2 ].

    ``t_cur`` and ``t_next`` may be arrays of the same shape (one cost per pair).
    """
    t, t2, lam, mu, s, s2, a, a2 = _gaussian_step(process, t_cur, t_next, variances, mean)
    inner = (s2 - s) ** 2 * mu ** 2 / a2 ** 2 + a * (1 / a - 1 / a2) ** 2
    return process.sigma(t2[..., 0]) ** 2 * np.sum(inner, axis=-1)


def gaussian_predictor_cost(process, t_cur, t_next, variances, mean=None):
    """Exact DDIM-predictor cost ``L_p(t, t')`` for data ``N(mean, diag(variances))``, ``v = sigma``.

    With the score ``-(x - m)/A`` of ``p_t = N(m, A)``, the predictor
    ``F(x) = a x + b S(x, t)`` (``scoreopt.ddim_coefficients``) is affine per coordinate,
    ``F(x) = alpha x + beta`` with ``alpha = a - b / A`` and ``beta = b m / A``, so
    ``F#p_t = N(alpha m + beta, alpha^2 A)`` and, with the Fisher divergence between
    Gaussians ``D(N(m1, v1) || N(m2, v2)) = (m1 - m2)^2 / v1^2 + v2 (1/v2 - 1/v1)^2``,

        L_p = sigma(t')^2 sum_k D(N(m'_k, a'_k) || N(alpha_k m_k + beta_k, alpha_k^2 a_k)).

    ``t_cur`` and ``t_next`` may be arrays of the same shape.
    """
    t, t2, lam, mu, s, s2, a, a2 = _gaussian_step(process, t_cur, t_next, variances, mean)
    ca, cb = scoreopt.ddim_coefficients(process, t, t2)
    alpha = ca - cb / a
    m_push, a_push = alpha * s * mu + cb * s * mu / a, alpha ** 2 * a
    inner = (s2 * mu - m_push) ** 2 / a2 ** 2 + a_push * (1 / a_push - 1 / a2) ** 2
    return process.sigma(t2[..., 0]) ** 2 * np.sum(inner, axis=-1)


def _gaussian_moments(variances, mean):
    lam = as_real_array(variances, "variances").reshape(-1)
    if np.any(lam < 0) or not np.all(np.isfinite(lam)):
        raise ValueError("`variances` must be finite and non-negative")
    mu = np.zeros_like(lam) if mean is None else as_real_array(mean, "mean").reshape(-1)
    if mu.shape != lam.shape:
        raise ValueError("`mean` and `variances` must have the same length")
    return lam, mu


def _gaussian_step(process, t_cur, t_next, variances, mean):
    """Times as columns, data moments, and ``s``, ``a = s^2 lambda + sigma^2`` at both ends."""
    process = check_process(process)
    lam, mu = _gaussian_moments(variances, mean)
    t, t2 = check_step_times(t_cur, t_next, process)
    t, t2 = t[..., None], t2[..., None]
    s, s2 = process.s(t), process.s(t2)
    return t, t2, lam, mu, s, s2, s ** 2 * lam + process.sigma(t) ** 2, s2 ** 2 * lam + process.sigma(t2) ** 2
