"""Targets with exact scores, small MLP score models and their training.

Targets (SPEC section 8) are Gaussian mixtures with diagonal components, because a
mixture stays a mixture under every process: component ``k`` of ``p_0``,
``N(mu_k, diag(std_k^2))``, becomes ``N(s mu_k, diag(s^2 std_k^2 + sigma^2))`` in
``p_t``. So the score, the log density and (in 1-D) the CDF of every marginal are
exact, and the score is written in ``autograd.numpy`` so that it can be
differentiated in ``x`` and ``t``. The log-sum-exp form keeps it finite far from
the modes and at tiny ``sigma``.
"""

import autograd.numpy as anp
import numpy as np
from autograd.scipy.special import logsumexp
from autograd.tracer import Box
from scipy.special import ndtr

from scoreopt import as_rng, check_data, _check_int, _check_positive, _check_process

__all__ = ["GaussianMixture", "Gaussian", "MollifiedCantor", "mollified_cantor", "bimodal"]

LOG_2PI = np.log(2.0 * np.pi)


class GaussianMixture:
    """Mixture of Gaussians with diagonal covariances, in any dimension ``d``.

    Parameters
    ----------
    weights : array (K,), positive; normalised to sum to 1
    means : array (K, d), or (K,) for 1-D data
    stds : array broadcastable to ``means``' shape, positive standard deviations
    """

    def __init__(self, weights, means, stds):
        means = np.array(means, dtype=float)
        means = means[:, None] if means.ndim == 1 else means
        weights = np.array(weights, dtype=float).reshape(-1)
        stds = np.array(stds, dtype=float)
        stds = stds[:, None] if stds.ndim == 1 and len(stds) == len(means) else stds
        if means.ndim != 2 or len(weights) != len(means):
            raise ValueError("`means` must have shape (K, d) with K = len(weights)")
        try:
            stds = np.broadcast_to(stds, means.shape).copy()
        except ValueError:
            raise ValueError(f"`stds` must broadcast to the shape of `means` {means.shape}") from None
        if not (np.all(np.isfinite(means)) and np.all(np.isfinite(stds))):
            raise ValueError("`means` and `stds` must be finite")
        if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
            raise ValueError("`weights` must be positive and finite")
        if np.any(stds <= 0):
            raise ValueError("`stds` must be positive")
        self.weights = weights / weights.sum()
        self.means = means
        self.stds = stds

    @property
    def dim(self):
        """Dimension ``d`` of the data."""
        return self.means.shape[1]

    def mean(self):
        """Mean of ``p_0``, shape (d,)."""
        return self.weights @ self.means

    def variance(self):
        """Per-coordinate variance of ``p_0``, shape (d,)."""
        second = self.weights @ (self.means ** 2 + self.stds ** 2)
        return second - self.mean() ** 2

    def sample(self, n, rng):
        """``n`` independent draws of ``p_0``, shape (n, d)."""
        n = _check_int(n, "n", minimum=1)
        rng = as_rng(rng)
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + self.stds[k] * rng.standard_normal((n, self.dim))

    def marginal(self, process, t):
        """``p_t`` under ``process``: the same family with ``s mu_k`` and ``s^2 std_k^2 + sigma^2``."""
        s, sigma = _scale_noise(process, t)
        return GaussianMixture(self.weights, s * self.means,
                               np.sqrt(s ** 2 * self.stds ** 2 + sigma ** 2))

    def log_prob(self, x):
        """Log density of ``p_0`` at a batch ``x`` of shape (n, d); shape (n,). Differentiable."""
        return _mixture_log_prob(self._check_x(x), np.log(self.weights), self.means,
                                 self.stds ** 2)

    def score(self, x, t, process):
        """Exact score ``grad_x log p_t(x)`` of the marginal at time ``t``; shape (n, d).

        Written in ``autograd.numpy``: differentiable in ``x`` and in ``t``.
        """
        _check_process(process)
        s, sigma = process.s(t), process.sigma(t)
        return _mixture_score(x, np.log(self.weights), s * self.means,
                              s ** 2 * self.stds ** 2 + sigma ** 2)

    def score0(self, x):
        """Score of ``p_0`` itself, shape (n, d)."""
        return _mixture_score(self._check_x(x), np.log(self.weights), self.means, self.stds ** 2)

    def cdf(self, x):
        """CDF of ``p_0`` (1-D targets only) at points ``x`` of any shape."""
        if self.dim != 1:
            raise ValueError("`cdf` is defined for 1-D targets only")
        x = np.asarray(x, dtype=float)[..., None]
        return np.sum(self.weights * ndtr((x - self.means[:, 0]) / self.stds[:, 0]), axis=-1)

    def _check_x(self, x):
        if isinstance(x, Box):  # traced by autograd: the caller differentiates log_prob
            return x
        x = check_data(x, "x")
        if x.shape[1] != self.dim:
            raise ValueError(f"`x` must have {self.dim} columns, got {x.shape[1]}")
        return x

    def __repr__(self):
        return (f"{type(self).__name__}(K={len(self.weights)}, d={self.dim})")


class Gaussian(GaussianMixture):
    """Gaussian ``N(mean, diag(var))`` in any dimension (a one-component mixture).

    ``mean`` and ``var`` are arrays of shape (d,) (scalars give d = 1); ``var > 0``.
    """

    def __init__(self, mean, var):
        mean = np.atleast_1d(np.array(mean, dtype=float))
        var = np.broadcast_to(np.array(var, dtype=float), mean.shape)
        if np.any(var <= 0) or not np.all(np.isfinite(var)):
            raise ValueError("`var` must be positive and finite")
        super().__init__([1.0], mean[None, :], np.sqrt(var)[None, :])

    @property
    def var(self):
        """Diagonal covariance, shape (d,)."""
        return self.stds[0] ** 2

    def marginal(self, process, t):
        s, sigma = _scale_noise(process, t)
        return Gaussian(s * self.means[0], s ** 2 * self.var + sigma ** 2)


class MollifiedCantor(GaussianMixture):
    """The Cantor construction to ``level``, each atom convolved with ``N(0, width^2)``.

    Built by :func:`mollified_cantor`; exposes ``level``, ``width``, ``interval`` and
    ``atoms``.
    """

    def __init__(self, level, width, interval):
        self.level, self.width, self.interval = level, width, interval
        lo, hi = interval
        bits = (np.arange(2 ** level)[:, None] >> np.arange(level - 1, -1, -1)) & 1
        left = bits @ (2.0 * 3.0 ** -np.arange(1, level + 1)) if level else np.zeros(1)
        # Centres of the 2^level intervals of length 3^-level left by the construction.
        self.atoms = lo + (hi - lo) * (left + 0.5 * 3.0 ** -level)
        super().__init__(np.ones(2 ** level), self.atoms, width)

    def __repr__(self):
        return (f"MollifiedCantor(level={self.level}, width={self.width:g}, "
                f"interval={self.interval})")


def mollified_cantor(level=3, width=None, interval=(0.0, 1.0)):
    """Mollified Cantor target of the paper's Figure 1 (parameters chosen here).

    The level-``level`` Cantor construction on ``[0, 1]`` leaves ``2^level`` intervals
    of length ``3^-level``, with left ends ``sum_{j<=level} 2 b_j 3^-j``; the atoms are
    their centres, mapped affinely onto ``interval``, equally weighted, each
    convolved with ``N(0, width^2)``. ``level = 3`` gives eight modes. The default
    ``width`` is a quarter of ``3^-level`` in data units, so that the closest modes
    are eight widths apart. The paper's exact width and interval are not known to us;
    these are this project's choices.
    """
    level = _check_int(level, "level", minimum=0)
    lo, hi = (float(v) for v in interval)
    if not lo < hi:
        raise ValueError("`interval` must be (lo, hi) with lo < hi")
    width = 0.25 * 3.0 ** -level * (hi - lo) if width is None else _check_positive(width, "width")
    return MollifiedCantor(level, width, (lo, hi))


def bimodal(weights=(0.5, 0.5), means=(-1.0, 1.0), stds=(0.1, 0.1)):
    """1-D two-component mixture for the online-learning experiment (paper, Figs. 2-4).

    The paper's exact parameters are not known to us; the default, modes at +-1 with
    standard deviation 0.1 (twenty standard deviations apart), is this project's
    choice of a well-separated pair.
    """
    return GaussianMixture(weights, np.asarray(means, dtype=float)[:, None],
                           np.asarray(stds, dtype=float)[:, None])


# --------------------------------------------------------------------------------
# Mixture formulas (autograd-differentiable)
# --------------------------------------------------------------------------------

def _component_log_probs(x, log_w, means, var):
    """``log w_k + log N(x; means_k, diag(var_k))``, shape (n, K)."""
    diff = x[:, None, :] - means[None, :, :]
    return log_w - 0.5 * anp.sum(diff ** 2 / var + anp.log(var) + LOG_2PI, axis=2)


def _mixture_log_prob(x, log_w, means, var):
    return logsumexp(_component_log_probs(x, log_w, means, var), axis=1)


def _mixture_score(x, log_w, means, var):
    """``sum_k r_k(x) (means_k - x) / var_k`` with responsibilities from log-sum-exp."""
    logp = _component_log_probs(x, log_w, means, var)
    resp = anp.exp(logp - logsumexp(logp, axis=1, keepdims=True))
    return anp.sum(resp[:, :, None] * (means[None, :, :] - x[:, None, :]) / var, axis=1)


def _scale_noise(process, t):
    _check_process(process)
    t = float(t)
    if not process.t_min <= t <= process.t_max:
        raise ValueError(f"`t` = {t} must lie in [{process.t_min}, {process.t_max}]")
    return float(process.s(t)), float(process.sigma(t))
