"""Targets with exact scores, small MLP score models and their training.

Targets are Gaussian mixtures with diagonal components, because a
mixture stays a mixture under every process: component ``k`` of ``p_0``,
``N(mu_k, diag(std_k^2))``, becomes ``N(s mu_k, diag(s^2 std_k^2 + sigma^2))`` in
``p_t``. So the score, the log density and (in 1-D) the CDF of every marginal are
exact, and the score is written in ``autograd.numpy`` so that it can be
differentiated in ``x`` and ``t``. The log-sum-exp form keeps it finite far from
the modes and at tiny ``sigma``.

Score models are MLPs whose parameters are a plain list of ``(W, b)`` pairs
(:func:`init_mlp`), with the preconditioning of EDM (Karras et al. 2022) in the
process's own coordinates (:func:`mlp_score`), trained by denoising score matching
(:func:`dsm_loss`) with Adam as a pure function (:func:`adam_step`) in :func:`train`,
which can adapt the schedule online (the paper's Algorithm 2, :class:`OnlineSchedule`)
and writes atomic ``.npz`` checkpoints.

This module uses only public functions of ``scoreopt``.
"""

import ctypes
import json
import os
import tempfile
import time
import warnings
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad
from autograd.extend import defjvp, defvjp, primitive
from autograd.misc import flatten
from autograd.tracer import Box, getval
from scipy.special import ndtr

from scoreopt import (Process, as_rng, as_real_array, check_bool, check_callable, check_data, check_int,
                      check_positive, check_process, check_real, check_schedule, online_update, time_from_nsr,
                      write_atomically)

__all__ = ["GaussianMixture", "Gaussian", "MollifiedCantor", "mollified_cantor", "bimodal",
           "init_mlp", "mlp_score", "score_model", "ScoreModel", "preconditioning_coefficients", "silu",
           "noise_features", "dsm_loss", "DSMBatch", "prepare_dsm", "prepared_dsm_loss",
           "schedule_levels", "between_levels", "uniform_times", "lognormal_levels", "LOSS_WEIGHTS",
           "cosine_rate", "constant_rate", "AdamState", "adam_init", "adam_step", "OnlineSchedule",
           "TrainingState", "TrainingDiverged", "train", "retain_freed_memory", "save_checkpoint",
           "load_checkpoint"]

LOG_2PI = np.log(2.0 * np.pi)
MAX_CANTOR_LEVEL = 16      # 65,536 atoms: about 1.5 MB of temporaries per sample and score call


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
        n = check_int(n, "n", minimum=1)
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

        ``t`` is a float or one time per row (shape (n,)). Written in ``autograd.numpy``:
        differentiable in ``x`` and in ``t``.
        """
        check_process(process)
        self._check_shape(x)
        _check_level(t, process, len(getval(x)))
        s, sigma = process.s(t), process.sigma(t)
        if anp.ndim(t):                    # one time per row: coefficients of shape (n, 1, 1)
            s, sigma = anp.reshape(s, (-1, 1, 1)), anp.reshape(sigma, (-1, 1, 1))
        return _mixture_score(x, np.log(self.weights), s * self.means, s ** 2 * self.stds ** 2 + sigma ** 2)

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

    def _check_shape(self, x):
        """Shape (n, d) with d = ``dim`` (also for arrays autograd traces: no conversion)."""
        shape = np.shape(getval(x))
        if len(shape) != 2 or shape[1] != self.dim:
            raise ValueError(f"`x` must have shape (n, {self.dim}) for this {self.dim}-D target, got {shape}")

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
    level = check_int(level, "level", minimum=0)
    if level > MAX_CANTOR_LEVEL:
        raise ValueError(f"`level` = {level} would make 2^{level} = {2 ** level:,} mixture components, and "
                         f"every score evaluation would need {2 ** level * 8 * 3:,} bytes per sample; "
                         f"use `level` <= {MAX_CANTOR_LEVEL}")
    lo, hi = (float(v) for v in interval)
    if not lo < hi:
        raise ValueError("`interval` must be (lo, hi) with lo < hi")
    width = 0.25 * 3.0 ** -level * (hi - lo) if width is None else check_positive(width, "width")
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
    """``log w_k + log N(x; means_k, diag(var_k))``, shape (n, K); ``means`` and ``var`` are
    (K, d), or (n, K, d) for one time per row."""
    diff = x[:, None, :] - means
    return log_w - 0.5 * anp.sum(diff ** 2 / var + anp.log(var) + LOG_2PI, axis=2)


def _mixture_log_prob(x, log_w, means, var):
    logp = _component_log_probs(x, log_w, means, var)
    top = anp.max(logp, axis=1, keepdims=True)   # log-sum-exp, shifted by the largest term
    return (top + anp.log(anp.sum(anp.exp(logp - top), axis=1, keepdims=True)))[:, 0]


def _mixture_score(x, log_w, means, var):
    """``sum_k r_k(x) (means_k - x) / var_k``; responsibilities by a max-shifted softmax."""
    logp = _component_log_probs(x, log_w, means, var)
    p = anp.exp(logp - anp.max(logp, axis=1, keepdims=True))
    resp = p / anp.sum(p, axis=1, keepdims=True)
    return anp.sum(resp[:, :, None] * (means - x[:, None, :]) / var, axis=1)


def _check_level(t, process, n):
    """A time ``t`` (a scalar, or one per row of ``n``) must be finite and in the process's range."""
    value = np.asarray(getval(t))
    if np.iscomplexobj(value) or not np.all(np.isfinite(value)):
        raise ValueError(f"`t` must be a finite real time, got {value}")
    if value.ndim > 1 or (value.ndim == 1 and len(value) != n):
        raise ValueError(f"`t` must be a float or one time per row, shape ({n},); got shape {value.shape}")
    if np.any(value < process.t_min) or np.any(value > process.t_max):
        raise ValueError(f"`t` = {value} must lie in [{process.t_min}, {process.t_max}], the process's range")


def _scale_noise(process, t):
    check_process(process)
    t = float(t)
    if not process.t_min <= t <= process.t_max:
        raise ValueError(f"`t` = {t} must lie in [{process.t_min}, {process.t_max}]")
    return float(process.s(t)), float(process.sigma(t))


# --------------------------------------------------------------------------------
# MLP score model with EDM's preconditioning, in the process's own coordinates
# --------------------------------------------------------------------------------

def init_mlp(rng, dim=1, width=64, depth=3, n_fourier=4, input_scale=None):
    """Parameters of an MLP score model: a plain list of ``(W, b)`` pairs.

    Input: ``dim`` data coordinates plus ``1 + 2 n_fourier`` noise-level features;
    ``depth`` hidden layers of ``width`` units; output ``dim`` (the network ``F`` of
    :func:`mlp_score`). Weights are ``N(0, 1/fan_in)``, except the first layer's data
    weights, ``N(0, input_scale^2 / fan_in)``, with first-layer biases uniform on
    ``(-input_scale/2, input_scale/2)``: first-layer units then bend at places spread
    over the standardised data and vary on a fraction of its standard deviation,
    which narrow, well-separated modes need (measured on the mollified Cantor target:
    README). The default ``input_scale`` is ``10 / sqrt(dim)``: 10 was tuned on 1-D
    data and is poor in many dimensions, where the data weights' sum over ``dim``
    inputs is already large (``examples/input_scale_benchmark.py``, README). The output
    layer starts at zero, so the initial model is the Gaussian fit of :func:`mlp_score`
    (exact for Gaussian data with the standardisation's moments).
    """
    rng = as_rng(rng)
    dim = check_int(dim, "dim", minimum=1)
    width = check_int(width, "width", minimum=1)
    depth = check_int(depth, "depth", minimum=1)
    n_fourier = check_int(n_fourier, "n_fourier", minimum=0)
    input_scale = 10.0 / np.sqrt(dim) if input_scale is None else check_positive(input_scale, "input_scale")
    sizes = [dim + 1 + 2 * n_fourier] + [width] * depth
    params = [(rng.standard_normal((m, n)) / np.sqrt(m), np.zeros(n))
              for m, n in zip(sizes[:-1], sizes[1:])]
    W0, _ = params[0]
    W0[:dim] *= input_scale
    params[0] = (W0, rng.uniform(-0.5 * input_scale, 0.5 * input_scale, width))
    return params + [(np.zeros((width, dim)), np.zeros(dim))]


def noise_features(process, t, n_fourier):
    """``u = log nu(t)`` rescaled to ``[-1, 1]`` over the process range, with
    ``sin(k pi u / 2)``, ``cos(k pi u / 2)`` for ``k = 1..n_fourier``; shape (n, 1 + 2 n_fourier).

    ``t`` is a scalar or an array of shape (n,) or (n, 1).
    """
    lo, hi = np.log(process.nsr(process.t_min)), np.log(process.nsr(process.t_max))
    u = anp.reshape(2.0 * (anp.log(process.nsr(t)) - lo) / (hi - lo) - 1.0, (-1, 1))
    k = 0.5 * np.pi * np.arange(1, n_fourier + 1)
    return anp.concatenate([u, anp.sin(k * u), anp.cos(k * u)], axis=1)


@primitive
def silu(z):
    """SiLU ``z sigmoid(z)`` (Elfwing et al. 2018), one autograd primitive.

    Fused, so that autograd records one operation instead of five; its derivative
    ``sigmoid(z) (1 + z (1 - sigmoid(z)))`` is itself written in ``autograd.numpy``, so
    higher derivatives (the predictor cost's) and forward mode work. ``exp(-z)``
    overflows to ``inf`` for ``z < -709``, where the result is the correct ``-0``.
    """
    with np.errstate(over="ignore"):
        return z / (1.0 + np.exp(-z))


def _silu_slope(z):
    with np.errstate(over="ignore"):
        sig = 1.0 / (1.0 + anp.exp(-z))
    return sig * (1.0 + z * (1.0 - sig))


defvjp(silu, lambda ans, z: lambda g: g * _silu_slope(z))
defjvp(silu, lambda g, ans, z: g * _silu_slope(z))

PRECONDITIONINGS = ("edm", "eps")


def preconditioning_coefficients(nu, data_var, preconditioning="edm"):
    """``(c_skip, c_out, c_in)`` of the denoiser ``D = mean + c_skip (y - mean) + c_out F(c_in (y - mean))``.

    In the process's own coordinates ``y = x / s``, noise level ``nu = sigma / s``, with the
    per-coordinate data variance ``data_var``:

    - ``"edm"`` (Karras et al. 2022, Table 1, with sigma_data per coordinate):
      ``c_skip = data_var / (data_var + nu^2)``, ``c_out = nu sqrt(data_var) / sqrt(data_var + nu^2)``,
      ``c_in = 1 / sqrt(data_var + nu^2)``. ``c_out`` stays below both ``nu`` and the data's
      scale, so the network's error reaches the denoised estimate at most at the data's
      scale at every level; the loss weight ``1/c_out^2`` makes every level's target unit
      variance. A coordinate of variance 0 has ``c_out = 0``: its denoiser is the mean, exactly.
    - ``"eps"`` (noise prediction, ``S = -eps_hat / sigma``): the same ``c_skip`` and ``c_in``
      with ``c_out = -nu``: the network's error is multiplied by ``nu`` (about 150 at
      ``vp_linear``'s noisy end) in the denoised estimate (docs/derivations.md, section 10).

    VE's formulas are these with ``s = 1``, ``nu = sigma``; for VP they are EDM's VP
    counterparts written in ``y`` and ``nu``.
    """
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"`preconditioning` must be one of {PRECONDITIONINGS}, got {preconditioning!r}")
    total = data_var + nu ** 2
    c_out = nu * anp.sqrt(data_var) / anp.sqrt(total) if preconditioning == "edm" else -nu
    return data_var / total, c_out, 1.0 / anp.sqrt(total)


def mlp_score(params, x, t, process, data_mean=0.0, data_var=1.0, preconditioning="edm"):
    """Score ``S_theta(x, t)`` of the preconditioned MLP; shape (n, d).

    The model is a denoiser in ``y = x / s`` and ``nu``:
    ``D_theta(y, nu) = mean + c_skip (y - mean) + c_out F_theta(c_in (y - mean), features(nu))``
    (:func:`preconditioning_coefficients`, :func:`noise_features`), and its score, by
    Tweedie's formula, ``S = (D - y) / (s nu^2)``, computed as
    ``S = [-(y - mean) / (data_var + nu^2) + (c_out / nu^2) F] / s`` so that no two large
    terms cancel. The first term is the exact score of the Gaussian fit ``N(mean,
    data_var)``, so the zero-initialised output layer starts the model there, and far from
    the data the fit's pull-back dominates. Activation :func:`silu`: smooth, as the
    predictor cost needs second derivatives. ``t`` is a float or one time per row (n,).
    ``data_mean``, ``data_var``: scalars or per-coordinate arrays (d,), those the model was
    trained with (a variance may be 0). Differentiable by autograd in ``params``, ``x``
    and ``t``.
    """
    s, nu = _col(process.s(t)), _col(process.nsr(t))
    centred = x / s - data_mean
    c_skip, c_out, c_in = preconditioning_coefficients(nu, data_var, preconditioning)
    F = _network(params, _network_input(params, c_in * centred, process, t))
    return (-centred / (data_var + nu ** 2) + c_out / nu ** 2 * F) / s


def _col(a):
    """A per-row coefficient (shape (n,)) as a column (n, 1); scalars as they are."""
    return anp.reshape(a, (-1, 1)) if anp.ndim(a) else a


def _network_input(params, z, process, t):
    """The network's input rows: standardised data and the noise features, (n, d + F)."""
    dim = params[-1][0].shape[1]
    features = noise_features(process, t, (params[0][0].shape[0] - dim - 1) // 2)
    if anp.ndim(t) == 0:
        features = anp.broadcast_to(features, (z.shape[0], features.shape[1]))
    return anp.concatenate([z, features], axis=1)


def _network(params, h):
    """The network proper, ``F``: SiLU layers on the prepared input."""
    for W, b in params[:-1]:
        h = silu(anp.dot(h, W) + b)
    W, b = params[-1]
    return anp.dot(h, W) + b


class ScoreModel:
    """The MLP as a plain score callable ``score(x, t)`` for scoreopt and the sampler (picklable)."""

    def __init__(self, params, process, data_mean=0.0, data_var=1.0, preconditioning="edm"):
        self.params, self.process = params, check_process(process)
        self.data_mean, self.data_var, self.preconditioning = data_mean, data_var, preconditioning
        preconditioning_coefficients(1.0, 1.0, preconditioning)

    def __call__(self, x, t):
        return mlp_score(self.params, x, t, self.process, self.data_mean, self.data_var, self.preconditioning)


def score_model(params, process, data_mean=0.0, data_var=1.0, preconditioning="edm"):
    """The MLP as a plain score callable ``score(x, t)`` (a :class:`ScoreModel`)."""
    return ScoreModel(params, process, data_mean, data_var, preconditioning)


# --------------------------------------------------------------------------------
# Denoising score matching, and the noise levels it trains on
# --------------------------------------------------------------------------------

def schedule_levels(ts, n, rng, process):
    """``n`` training times drawn uniformly from the ``T + 1`` levels of ``ts`` (the paper's)."""
    return ts[rng.integers(0, len(ts), n)]


def between_levels(ts, n, rng, process):
    """``n`` training times from the schedule's density: a step of ``ts`` uniformly, then a time
    uniformly inside it (continuous times, as dense as the schedule's levels)."""
    i = rng.integers(0, len(ts) - 1, n)
    return ts[i] + rng.uniform(size=n) * (ts[i + 1] - ts[i])


def uniform_times(ts, n, rng, process):
    """``n`` training times uniform on ``[t_min, t_max]`` (schedule-free)."""
    return rng.uniform(process.t_min, process.t_max, n)


def lognormal_levels(ts, n, rng, process, p_mean=-1.2, p_std=1.2):
    """EDM's training levels: ``log nu ~ N(p_mean, p_std^2)`` (Karras et al. 2022, Table 1),
    clipped to the process range and mapped to ``t``. The defaults are EDM's for images."""
    nu_range = process.nsr(np.array([process.t_min, process.t_max]))
    nu = np.clip(np.exp(p_mean + p_std * rng.standard_normal(n)), *nu_range)
    return time_from_nsr(process, nu)


LEVELS = {"levels": schedule_levels, "between": between_levels, "uniform": uniform_times,
          "lognormal": lognormal_levels}


class DSMBatch(NamedTuple):
    """A batch of the DSM loss with everything that does not depend on the parameters done."""
    net_input: np.ndarray   # (n, d + F): standardised noisy data and noise features
    target: np.ndarray      # (n, d): what F should output
    weight: np.ndarray      # (n, d): 1, or 0 for a coordinate whose c_out is 0 (no error possible)


LOSS_WEIGHTS = ("dsm", "edm")


def prepare_dsm(params, x0, t, eps, process, data_mean=0.0, data_var=1.0, preconditioning="edm",
                loss_weight="dsm"):
    """The DSM loss's batch for data ``x0`` (n, d), times ``t`` (n,) and noise ``eps`` (n, d).

    With ``y = x0 + nu eps`` (``x_t / s``) and ``target = (x0 - mean - c_skip (y - mean)) /
    c_out`` (unit variance at every level for ``"edm"``; ``eps - eps_fit`` for ``"eps"``), the
    loss ``||D - x0||^2 w(nu)`` is ``sum_k weight_k (F - target)_k^2`` with ``weight =
    c_out^2 w``. ``loss_weight="dsm"``: ``w = 1 / nu^2``, the classic denoising score
    matching loss ``||sigma S + eps||^2`` (Vincent 2011), ``weight = c_out^2 / nu^2 =
    c_skip`` for EDM's ``c_out``. ``loss_weight="edm"``: ``w = 1 / c_out^2`` (Karras et al.
    2022), ``weight = 1``: every level's target weighs the same (docs/derivations.md, 10).
    A coordinate whose ``c_out`` is 0 (variance 0) has weight 0.
    """
    nu = process.nsr(t)[:, None]
    y = x0 + nu * eps
    c_skip, c_out, c_in = preconditioning_coefficients(nu, data_var, preconditioning)
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"`loss_weight` must be one of {LOSS_WEIGHTS}, got {loss_weight!r}")
    c_out = np.broadcast_to(c_out, y.shape)
    stuck = c_out == 0
    target = np.where(stuck, 0.0, (x0 - data_mean - c_skip * (y - data_mean)) / np.where(stuck, 1.0, c_out))
    weight = (c_out / nu) ** 2 if loss_weight == "dsm" else (~stuck).astype(float)
    return DSMBatch(_network_input(params, c_in * (y - data_mean), process, t), target, weight)


def prepared_dsm_loss(params, batch):
    """``mean over rows of sum_k weight_k (F_theta - target)_k^2`` on a :class:`DSMBatch`."""
    return anp.mean(anp.sum(batch.weight * (_network(params, batch.net_input) - batch.target) ** 2, axis=1))


def dsm_loss(params, x0, process, ts, rng, *, levels="levels", data_mean=0.0, data_var=1.0, preconditioning="edm",
             loss_weight="dsm"):
    """Denoising score matching, ``E ||sigma S_theta + eps||^2 = E ||D_theta - x0||^2 / nu^2``
    (``loss_weight="dsm"``, Vincent 2011) or EDM's ``E ||D_theta - x0||^2 / c_out^2``
    (``loss_weight="edm"``, Karras et al. 2022); see :func:`prepare_dsm`.

    ``t`` is drawn per sample by ``levels`` (:func:`schedule_levels` by default: uniformly
    over the ``T + 1`` levels of ``ts``; or :func:`between_levels`, :func:`uniform_times`,
    :func:`lognormal_levels`, or their aliases ``"between"``, ``"uniform"``, ``"lognormal"``).
    """
    process, rng, x0 = check_process(process), as_rng(rng), check_data(x0)
    t = _resolve_levels(levels)(check_schedule(ts, process), len(x0), rng, process)
    batch = prepare_dsm(params, x0, t, rng.standard_normal(x0.shape), process, data_mean, data_var, preconditioning,
                        loss_weight)
    return prepared_dsm_loss(params, batch)


def _resolve_levels(levels):
    if callable(levels):
        return levels
    if isinstance(levels, str) and levels in LEVELS:
        return LEVELS[levels]
    raise ValueError(f"`levels` must be a function levels(ts, n, rng, process) or one of {sorted(LEVELS)}, "
                     f"got {levels!r}")


# --------------------------------------------------------------------------------
# Adam (Kingma & Ba 2015) on a flat parameter vector, and the learning-rate schedule
# --------------------------------------------------------------------------------

class AdamState(NamedTuple):
    m: np.ndarray      # first-moment estimate
    v: np.ndarray      # second-moment estimate
    step: int          # updates taken


def adam_init(theta):
    """Zero moments for a flat parameter vector ``theta``."""
    return AdamState(np.zeros_like(theta), np.zeros_like(theta), 0)


def adam_step(theta, grad, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam update; returns ``(theta, state)`` and changes nothing in place."""
    step = state.step + 1
    m = b1 * state.m + (1 - b1) * grad
    v = b2 * state.v + (1 - b2) * grad ** 2
    m_hat, v_hat = m / (1 - b1 ** step), v / (1 - b2 ** step)
    return theta - lr * m_hat / (np.sqrt(v_hat) + eps), AdamState(m, v, step)


def cosine_rate(step, n_steps):
    """Cosine decay of the learning rate from 1 to 0 over the run: ``(1 + cos(pi step / n_steps)) / 2``."""
    return 0.5 * (1 + np.cos(np.pi * step / n_steps))


def constant_rate(step, n_steps):
    """A constant learning rate."""
    return 1.0


RATES = {"cosine": cosine_rate, "constant": constant_rate}


# --------------------------------------------------------------------------------
# Training with an optional online schedule (the paper's Algorithm 2)
# --------------------------------------------------------------------------------

class _OnlineSettings(NamedTuple):
    every: int = 50
    burn_in: int = 1000
    gamma: float = 0.05
    cost: object = "corrector"
    n_samples: int = 1000
    order: int = 2
    route: object = "intervals"
    n_grid: int = 200


class OnlineSchedule(_OnlineSettings):
    """Settings of the online schedule update (the paper's Algorithm 2).

    After ``burn_in`` steps on the initial schedule, every ``every`` steps, with the
    current model and ``n_samples`` fresh data samples, :func:`scoreopt.online_update`
    finds a target schedule and blends the current one towards it with rate ``gamma``.
    The target comes from ``route``:

    - ``"intervals"`` (``scoreopt.interval_route``, the paper's Algorithm 2): the interval
      costs of the current schedule (``cost``: ``"corrector"``, ``"predictor"`` or a cost
      function, of order ``order``) through ``update_schedule`` (Algorithm 1);
    - ``"grid"`` (``scoreopt.grid_route``, derived): the local corrector cost on ``n_grid``
      levels uniform in ``log nu``, through the optimal schedule. It avoids the pitfall
      (one huge last step) that the interval route falls into on smooth data (measured on
      the bimodal target: README, docs/derivations.md section 4).

    Every setting is checked here, at construction, not at the first update.
    """
    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args, **kwargs)
        check_int(self.every, "every", minimum=1)
        check_int(self.burn_in, "burn_in", minimum=0)
        check_int(self.n_samples, "n_samples", minimum=2)
        check_int(self.n_grid, "n_grid", minimum=2)
        check_positive(self.order, "order")
        gamma = check_real(self.gamma, "gamma")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"`gamma` must lie in (0, 1], got {gamma}")
        if not (callable(self.cost) or self.cost in ("corrector", "predictor")):
            raise ValueError(f"`cost` must be 'corrector', 'predictor' or a cost function, got {self.cost!r}")
        if not (callable(self.route) or self.route in ("intervals", "grid")):
            raise ValueError(f"`route` must be 'intervals', 'grid' or a route function, got {self.route!r}")
        if self.route == "grid" and self.cost != "corrector":
            raise ValueError("`cost` must be 'corrector' with route 'grid'")
        return self

    def due(self, step):
        """Whether the update runs after optimiser step ``step``."""
        return step >= self.burn_in and (step - self.burn_in) % self.every == 0

    def route_options(self):
        """The options of the built-in routes (a function of the caller's gets none)."""
        if self.route == "intervals":
            return {"cost": self.cost, "order": self.order}
        return {"n_grid": self.n_grid} if self.route == "grid" else {}

    def describe(self):
        """The settings as plain JSON values (functions by name), for a checkpoint's run definition."""
        return {k: getattr(v, "__name__", v) for k, v in self._asdict().items()}


class TrainingState(NamedTuple):
    """The state of a training run: what :func:`train` returns and a checkpoint holds.

    ``score(process)`` gives the trained model as a score callable.
    """
    params: list            # list of (W, b)
    ts: np.ndarray          # current schedule
    adam: "AdamState"
    step: int               # optimiser steps taken
    rng: np.random.Generator
    history: dict           # see `train`
    data_mean: np.ndarray   # input standardisation the model was trained with, (d,)
    data_var: np.ndarray
    run: dict = None        # what defines the run (architecture, process, settings), see `train`
    preconditioning: str = "edm"

    def score(self, process):
        """The trained model as a plain ``score(x, t)`` callable (a :class:`ScoreModel`)."""
        return ScoreModel(self.params, process, self.data_mean, self.data_var, self.preconditioning)


class TrainingDiverged(FloatingPointError):
    """Raised by `train` when the loss or the parameters stop being finite or explode."""


def train(params, data, process, ts=None, *, rng, n_steps, batch_size=256, lr=1e-3, lr_schedule="cosine",
          levels="levels", preconditioning="edm", loss_weight="dsm", online=None, callback=None, data_mean=None,
          data_var=None, checkpoint=None, checkpoint_every=1000, resume=False, max_loss_ratio=1e3, allow_changes=()):
    """Train an MLP score model by denoising score matching, optionally adapting the schedule.

    Parameters
    ----------
    params : list of (W, b), from :func:`init_mlp`
    data : a target (anything with ``sample(n, rng)``) or an array (N, d) of samples; a
        coordinate may be constant (variance 0), a single row is accepted
    process : scoreopt.Process
    ts : schedule whose levels the training times are drawn from; may be None with
        ``levels="uniform"`` and no ``online`` update
    rng : numpy Generator or int seed; the only source of randomness (keyword)
    n_steps : total optimiser steps (a resumed run counts the steps already taken)
    batch_size, lr : the batch and Adam's step size
    lr_schedule : ``lr_schedule(step, n_steps) -> factor``: :func:`cosine_rate` (``"cosine"``)
        or :func:`constant_rate` (``"constant"``)
    levels : ``levels(ts, n, rng, process) -> t``, how training times are drawn:
        :func:`schedule_levels` (``"levels"``, the paper's), :func:`between_levels`
        (``"between"``), :func:`uniform_times` (``"uniform"``), :func:`lognormal_levels`
        (``"lognormal"``)
    preconditioning : ``"edm"`` (default) or ``"eps"`` (:func:`preconditioning_coefficients`)
    loss_weight : ``"dsm"`` (default, ``||sigma S + eps||^2``) or ``"edm"`` (:func:`prepare_dsm`)
    online : :class:`OnlineSchedule` or None for a fixed schedule
    callback : ``callback(step, n_steps, info)`` after every step, ``info`` holding ``loss``,
        the current ``ts``, ``params``, ``elapsed`` seconds and last ``Lambda`` (None before
        the first update); ``scoreopt.progress_printer("training")`` prints a line ten
        times per run; None (the default) for silence
    data_mean, data_var : per-coordinate data mean and variance for the preconditioning
        (default: from ``data``); kept in the result and checkpoints
    checkpoint, checkpoint_every : path of an ``.npz`` checkpoint written atomically every
        ``checkpoint_every`` steps and at the end; its folder is checked (it must exist and
        take a file) before the first step. ``resume=True`` continues from it if it exists,
        after checking that it belongs to this run: the architecture, process, initial
        schedule, ``n_steps``, ``lr``, ``lr_schedule``, ``levels``, ``preconditioning``,
        ``batch_size``, ``online`` and ``max_loss_ratio`` must be those saved, or a
        ``ValueError`` says what differs
    max_loss_ratio : stop when the loss exceeds this multiple of the first loss
    allow_changes : names of those settings that may differ on resume, e.g.
        ``("n_steps",)`` to extend a run (with cosine decay the remaining steps then follow
        the new horizon)

    Returns
    -------
    TrainingState : the final parameters, schedule, optimiser state, step, generator,
        input standardisation (``result.score(process)`` is the trained score) and
        history ``{"loss": (n_steps,), "update_step", "Lambda": (U,),
        "schedules": (U, T+1), "costs": (U, T)}`` (schedule and costs before each update).

    Raises :class:`TrainingDiverged` naming the step if the loss or the parameters stop
    being finite or the loss explodes, and ``OSError`` naming the step if a checkpoint
    cannot be written (a full disk); in both cases the last checkpoint on disk is kept as
    it was. The allocator setting that speeds steps up (:func:`retain_freed_memory`) is not
    applied here: call it first if you want it.
    """
    setup = _train_iv(params, data, process, ts, n_steps, batch_size, lr, lr_schedule, levels, preconditioning,
                      loss_weight, online, callback, checkpoint, checkpoint_every, resume, max_loss_ratio, data_mean,
                      data_var)
    ts, n_steps, draw, moments, rate, draw_t, run = setup
    state = _start_state(params, ts, as_rng(rng), moments, run, checkpoint if resume else None, allow_changes,
                         preconditioning)
    theta, unflatten = flatten(state.params)
    _, ts, adam, step, rng, history, data_mean, data_var, _, _ = state
    loss_and_grad = value_and_grad(prepared_dsm_loss)
    losses, start, saved = list(history["loss"]), time.perf_counter(), step
    now = lambda: TrainingState(unflatten(theta), ts, adam, step, rng, dict(history, loss=np.array(losses)),
                                data_mean, data_var, run, preconditioning)
    while step < n_steps:
        # 1. DSM step on the score model, levels drawn from the current schedule
        x0 = draw(batch_size, rng)
        t = draw_t(ts, batch_size, rng, process)
        batch = prepare_dsm(state.params, x0, t, rng.standard_normal(x0.shape), process, data_mean, data_var,
                            preconditioning, loss_weight)
        loss, grad = loss_and_grad(unflatten(theta), batch)
        theta_new, adam = adam_step(theta, flatten(grad)[0], adam, lr * rate(step, n_steps))
        _check_divergence(step + 1, loss, losses[0] if losses else loss, theta_new, max_loss_ratio, checkpoint)
        theta, step = theta_new, step + 1
        losses.append(float(loss))
        # 2-4. Algorithm 2 after the burn-in: costs of ts with the model fixed, then blend
        if online is not None and online.due(step):
            model = ScoreModel(unflatten(theta), process, data_mean, data_var, preconditioning)
            update = online_update(model, process, ts, draw(online.n_samples, rng), rng, gamma=online.gamma,
                                   route=online.route, **online.route_options())
            history, ts = _record_update(history, step, ts, update), update.ts
        if checkpoint is not None and (step % checkpoint_every == 0 or step == n_steps):
            saved = _save_during_training(checkpoint, now(), saved)
        if callback is not None:
            callback(step, n_steps, {"loss": float(loss), "ts": ts, "params": unflatten(theta),
                                     "elapsed": time.perf_counter() - start,
                                     "Lambda": history["Lambda"][-1] if len(history["Lambda"]) else None})
    return now()


def _train_iv(params, data, process, ts, n_steps, batch_size, lr, lr_schedule, levels, preconditioning, loss_weight,
              online, callback, checkpoint, checkpoint_every, resume, max_loss_ratio, data_mean, data_var):
    """Validate `train`'s arguments once; returns the schedule, ``n_steps``, the data sampler,
    the standardisation moments, the learning-rate and level functions and the run's definition."""
    process = check_process(process)
    draw_t = _resolve_levels(levels)
    if ts is None:
        if draw_t is not uniform_times or online is not None:
            raise ValueError("`ts` is needed unless `levels='uniform'` without an `online` update")
        ts = np.array([process.t_min, process.t_max])
    ts = check_schedule(ts, process)
    n_steps = check_int(n_steps, "n_steps", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_int(checkpoint_every, "checkpoint_every", minimum=1)
    check_positive(lr, "lr")
    check_positive(max_loss_ratio, "max_loss_ratio")
    check_bool(resume, "resume")
    rate = _resolve(lr_schedule, RATES, "lr_schedule", "lr_schedule(step, n_steps)")
    preconditioning_coefficients(1.0, 1.0, preconditioning)
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"`loss_weight` must be one of {LOSS_WEIGHTS}, got {loss_weight!r}")
    if online is not None and not isinstance(online, OnlineSchedule):
        raise TypeError("`online` must be an OnlineSchedule or None")
    if callback is not None:
        check_callable(callback, "callback", "callback(step, n_steps, info)")
    if checkpoint is not None:
        _prepare_checkpoint_folder(checkpoint)
    dim = params[-1][0].shape[1]
    moments = _data_moments(data, dim, data_mean, data_var)
    _warn_about_scale(moments, process)
    run = {"layer_shapes": [list(W.shape) for W, _ in params], "process": process.name,
           "t_min": float(process.t_min), "t_max": float(process.t_max), "initial_ts": [float(t) for t in ts],
           "n_steps": int(n_steps), "lr": float(lr), "lr_schedule": rate.__name__, "levels": draw_t.__name__,
           "preconditioning": preconditioning, "loss_weight": loss_weight, "batch_size": int(batch_size),
           "online": None if online is None else online.describe(), "max_loss_ratio": float(max_loss_ratio)}
    return ts, n_steps, _data_sampler(data), moments, rate, draw_t, run


def _resolve(choice, aliases, name, signature):
    if callable(choice):
        return choice
    if isinstance(choice, str) and choice in aliases:
        return aliases[choice]
    raise ValueError(f"`{name}` must be a function {signature} or one of {sorted(aliases)}, got {choice!r}")


def _data_moments(data, dim, data_mean, data_var):
    """Per-coordinate mean and variance for the preconditioning: given, exact for a target, or
    from the samples. A variance of 0 (a constant coordinate) is valid; a single row too.

    An object with ``sample`` only is sampled 10,000 times with a private generator of fixed
    seed, so the training's own random stream is untouched.
    """
    if hasattr(data, "mean") and hasattr(data, "variance"):
        mean, var = np.asarray(data.mean(), float), np.asarray(data.variance(), float)
    else:
        x = data.sample(10_000, np.random.default_rng(0)) if hasattr(data, "sample") else data
        x = check_data(x, "data")
        mean, var = x.mean(axis=0), x.var(axis=0)
    if mean.shape != (dim,):
        raise ValueError(f"`data` has {mean.shape[0] if mean.ndim else 1} columns but `params` model {dim}")
    out = []
    for value, name, given in ((mean, "data_mean", data_mean), (var, "data_var", data_var)):
        if given is not None:
            value = as_real_array(given, name)
            try:
                value = np.broadcast_to(value, (dim,)).copy()
            except ValueError:
                raise ValueError(f"`{name}` must be a scalar or have shape ({dim},), got {value.shape}") from None
        bad = np.flatnonzero(~np.isfinite(value) | ((value < 0) if name == "data_var" else False))
        if len(bad):
            rule = "finite and non-negative" if name == "data_var" else "finite"
            source = f"`{name}`" if given is not None else f"the {'variance' if name == 'data_var' else 'mean'} of `data`"
            raise ValueError(f"{source} must be {rule}; coordinate {bad[0]} is {value[bad[0]]}")
        out.append(value)
    return tuple(out)


def _warn_about_scale(moments, process):
    """Warn when the data's scale lies outside the noise levels the process reaches."""
    mean, var = moments
    scale = float(np.sqrt(np.max(mean ** 2 + var)))
    nu_min, nu_max = (float(v) for v in process.nsr(np.array([process.t_min, process.t_max])))
    if scale > nu_max:
        warnings.warn(f"the data's scale ({scale:.3g}, root mean square of its largest coordinate) is above the "
                      f"largest noise-to-signal ratio of `process` {process.name} ({nu_max:.3g}): its noise never "
                      "covers the data, so the model learns little and sampling starts far from the data's law; "
                      "rescale the data (to about unit scale) or use a process that reaches further",
                      RuntimeWarning, stacklevel=3)
    elif 0 < scale < nu_min:
        warnings.warn(f"the data's scale ({scale:.3g}) is below the smallest noise-to-signal ratio of `process` "
                      f"{process.name} ({nu_min:.3g}): the cleanest level already hides the data; rescale it",
                      RuntimeWarning, stacklevel=3)


def _start_state(params, ts, rng, moments, run, resume_from, allow_changes, preconditioning):
    """A fresh training state, or the one saved at ``resume_from`` if that file exists and
    belongs to this run (else a ``ValueError`` listing what differs)."""
    theta, _ = flatten(params)
    if resume_from is None or not os.path.exists(resume_from):
        empty = {"loss": np.zeros(0), "update_step": np.zeros(0, int), "Lambda": np.zeros(0),
                 "schedules": np.zeros((0, len(ts))), "costs": np.zeros((0, len(ts) - 1))}
        return TrainingState(params, ts, adam_init(theta), 0, rng, empty, *moments, run, preconditioning)
    saved = load_checkpoint(resume_from)
    unknown = set(allow_changes) - set(run)
    if unknown:
        raise ValueError(f"`allow_changes` names unknown settings {sorted(unknown)}; known: {sorted(run)}")
    differ = [f"{k}: saved {saved.run.get(k)!r}, now {v!r}" for k, v in run.items()
              if k not in allow_changes and saved.run.get(k) != v]
    if differ:
        raise ValueError(f"`{resume_from}` belongs to another run; it differs in " + "; ".join(differ)
                         + " (pass `allow_changes` to accept a change on purpose)")
    if saved.step > run["n_steps"]:
        raise ValueError(f"`{resume_from}` is at step {saved.step}, beyond `n_steps` = {run['n_steps']}")
    return saved._replace(run=run)


def _prepare_checkpoint_folder(path):
    """Before step 1: the checkpoint's folder must take a file, so no run is lost at its first save."""
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"`checkpoint`: the folder `{folder}` does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"`checkpoint`: cannot write in `{folder}`: {err}") from err


def _save_during_training(path, state, last_saved):
    """Save a checkpoint; a failure (a full disk) names the step and the checkpoint kept."""
    try:
        save_checkpoint(path, state)
    except OSError as err:
        kept = f"the last good checkpoint `{path}` (step {last_saved}) is intact" if last_saved else \
            "no checkpoint had been written yet"
        raise OSError(err.errno, f"could not save the checkpoint at step {state.step}: {err.strerror}; {kept}; "
                                 "the run can resume from it with resume=True") from err
    return state.step


def _check_divergence(step, loss, first_loss, theta, max_loss_ratio, checkpoint):
    """Raise :class:`TrainingDiverged` naming ``step`` if the run has stopped being sound."""
    problem = ("the loss is not finite" if not np.isfinite(loss) else
               f"the loss exceeds {max_loss_ratio:g} x the first loss ({first_loss:.6g})"
               if loss > max_loss_ratio * first_loss else
               "the parameters are not finite" if not np.all(np.isfinite(theta)) else None)
    if problem:
        where = f"; the last checkpoint ({checkpoint}) is kept" if checkpoint else ""
        raise TrainingDiverged(f"training diverged at step {step}: {problem} (loss = {loss:.6g}){where}")


def _record_update(history, step, ts, update):
    """The history with one online update appended (schedule and costs before it)."""
    return dict(history, update_step=np.append(history["update_step"], step),
                Lambda=np.append(history["Lambda"], update.length),
                schedules=np.vstack([history["schedules"], ts]),
                costs=np.vstack([history["costs"], update.costs]))


def retain_freed_memory():
    """Ask glibc's allocator to keep freed memory for reuse; returns whether it applied.

    Opt-in and process-wide: nothing in this package calls it; the examples and
    benchmarks do, and say so. By default glibc serves arrays above 128 KiB with fresh
    ``mmap`` pages and returns freed memory to the system, so every training step's
    large temporaries are paged in (and zeroed) again: measured here, that made a
    3x128 batch-1024 step about 2 times slower (README). This raises
    ``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to 512 MiB for the whole
    process (as the environment variables ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` would). A no-op returning ``False`` where the C library
    is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 512 << 20))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def _data_sampler(data):
    if hasattr(data, "sample"):
        return lambda n, rng: data.sample(n, rng)
    data = check_data(data, "data")
    return lambda n, rng: data[rng.integers(0, len(data), n)]


# --------------------------------------------------------------------------------
# Checkpoints: .npz without pickle, written atomically
# --------------------------------------------------------------------------------

CHECKPOINT_VERSION = 3
_CHECKPOINT_KEYS = ("version", "layer_shapes", "theta", "ts", "adam_m", "adam_v", "adam_step",
                    "step", "rng_state", "loss", "update_step", "Lambda", "schedules", "costs",
                    "data_mean", "data_var", "run")


def save_checkpoint(path, state):
    """Save a :class:`TrainingState` to ``path`` (.npz): parameters, schedule, Adam state, step,
    RNG state, history, the preconditioning and its data moments, and the run's definition.

    Written through ``scoreopt.write_atomically`` (a temporary file, flushed, renamed over
    ``path``, the folder flushed too): an interrupted save never corrupts the previous
    checkpoint, and a temporary file left by a killed save is removed by the next. No pickle.
    """
    if not isinstance(state, TrainingState):
        raise TypeError(f"`state` must be a models.TrainingState, got {type(state).__name__}")
    params, ts, adam, history = state.params, state.ts, state.adam, state.history or {}
    theta, _ = flatten(params)
    dim = params[-1][0].shape[1]
    arrays = {
        "version": np.array(CHECKPOINT_VERSION), "layer_shapes": np.array([W.shape for W, _ in params]),
        "theta": theta, "ts": np.asarray(ts, dtype=float),
        "adam_m": adam.m, "adam_v": adam.v, "adam_step": np.array(adam.step), "step": np.array(state.step),
        "rng_state": np.array(json.dumps(as_rng(state.rng).bit_generator.state)),
        "loss": np.asarray(history.get("loss", np.zeros(0)), dtype=float),
        "update_step": np.asarray(history.get("update_step", np.zeros(0)), dtype=int),
        "Lambda": np.asarray(history.get("Lambda", np.zeros(0)), dtype=float),
        "schedules": np.asarray(history.get("schedules", np.zeros((0, len(ts)))), dtype=float),
        "costs": np.asarray(history.get("costs", np.zeros((0, len(ts) - 1))), dtype=float),
        "data_mean": np.broadcast_to(np.asarray(state.data_mean, float), (dim,)),
        "data_var": np.broadcast_to(np.asarray(state.data_var, float), (dim,)),
        "run": np.array(json.dumps(state.run or {})), "preconditioning": np.array(state.preconditioning),
    }
    write_atomically(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """Load a checkpoint written by :func:`save_checkpoint`; returns a :class:`TrainingState`.

    A missing, truncated or corrupted file raises ``ValueError`` naming the path. A version-2
    checkpoint (before the preconditioning was recorded) holds a noise-prediction model and
    loads as ``preconditioning="eps"``.
    """
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at `{path}`")
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
            data = {k: f[k] for k in _CHECKPOINT_KEYS}
            version = int(data["version"])
            preconditioning = str(f["preconditioning"]) if version >= 3 else "eps"
        state = json.loads(str(data["rng_state"]))
        rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
        rng.bit_generator.state = state
    except Exception as exc:   # zipfile.BadZipFile, EOFError, KeyError, ValueError, ...
        raise ValueError(f"`{path}` is not a readable checkpoint (truncated or corrupted): "
                         f"{type(exc).__name__}: {exc}") from exc
    if version not in (2, CHECKPOINT_VERSION):
        raise ValueError(f"`{path}` has checkpoint version {version}, expected 2 or {CHECKPOINT_VERSION}")
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"`{path}` is corrupted: unknown preconditioning {preconditioning!r}")
    theta, shapes = data["theta"], data["layer_shapes"]
    sizes = [m * n + n for m, n in shapes]
    if theta.shape != (sum(sizes),) or not np.all(np.isfinite(theta)):
        raise ValueError(f"`{path}` is corrupted: parameters do not match their recorded shapes")
    params, i = [], 0
    for (m, n), size in zip(shapes, sizes):
        params.append((theta[i:i + m * n].reshape(m, n), theta[i + m * n:i + size].copy()))
        i += size
    try:
        ts = check_schedule(data["ts"], name="ts")
        run = json.loads(str(data["run"]))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"`{path}` is corrupted: {exc}") from exc
    history = {k: data[k] for k in ("loss", "update_step", "Lambda", "schedules", "costs")}
    return TrainingState(params, ts, AdamState(data["adam_m"], data["adam_v"], int(data["adam_step"])),
                         int(data["step"]), rng, history, data["data_mean"], data["data_var"], run, preconditioning)
