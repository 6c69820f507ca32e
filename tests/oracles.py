"""Closed forms for Gaussian data, used by the tests as oracles (docs/derivations.md, section 1).

For data ``N(mean, diag(variances))`` every marginal is Gaussian and the finite-step corrector and
DDIM-predictor costs have exact expressions (with ``v = sigma``); the Monte-Carlo estimates of
``scoreopt.corrector_cost`` and ``scoreopt.predictor_cost`` are checked against them. They left the
library (they were ``scoreopt.gaussian_corrector_cost`` and ``scoreopt.gaussian_predictor_cost``)
and use only the names that ``scoreopt`` shares.
"""
import numpy as np

import scoreopt


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
    lam = scoreopt.as_real_array(variances, "variances").reshape(-1)
    if np.any(lam < 0) or not np.all(np.isfinite(lam)):
        raise ValueError("`variances` must be finite and non-negative")
    mu = np.zeros_like(lam) if mean is None else scoreopt.as_real_array(mean, "mean").reshape(-1)
    if mu.shape != lam.shape:
        raise ValueError("`mean` and `variances` must have the same length")
    return lam, mu


def _gaussian_step(process, t_cur, t_next, variances, mean):
    """Times as columns, data moments, and ``s``, ``a = s^2 lambda + sigma^2`` at both ends."""
    process = scoreopt.check_process(process)
    lam, mu = _gaussian_moments(variances, mean)
    t, t2 = scoreopt.check_step_times(t_cur, t_next, process)
    t, t2 = t[..., None], t2[..., None]
    s, s2 = process.s(t), process.s(t2)
    return t, t2, lam, mu, s, s2, s ** 2 * lam + process.sigma(t) ** 2, s2 ** 2 * lam + process.sigma(t2) ** 2
