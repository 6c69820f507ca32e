"""Targets with exact scores, small MLP score models and their training.

Targets (SPEC section 8) are Gaussian mixtures with diagonal components, because a
mixture stays a mixture under every process: component ``k`` of ``p_0``,
``N(mu_k, diag(std_k^2))``, becomes ``N(s mu_k, diag(s^2 std_k^2 + sigma^2))`` in
``p_t``. So the score, the log density and (in 1-D) the CDF of every marginal are
exact, and the score is written in ``autograd.numpy`` so that it can be
differentiated in ``x`` and ``t``. The log-sum-exp form keeps it finite far from
the modes and at tiny ``sigma``.

Score models (SPEC 9) are MLPs whose parameters are a plain list of ``(W, b)``
pairs (:func:`init_mlp`, :func:`mlp_score`), trained by denoising score matching
(:func:`dsm_loss`) with Adam as a pure function (:func:`adam_step`) in
:func:`train`, which can adapt the schedule online (the paper's Algorithm 2,
:class:`OnlineSchedule`) and writes atomic ``.npz`` checkpoints.
"""

import ctypes
import json
import os
import tempfile
import time
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad
from autograd.extend import defjvp, defvjp, primitive
from autograd.misc import flatten
from autograd.tracer import Box, getval
from scipy.special import ndtr

from scoreopt import (as_rng, check_data, check_schedule, online_update, _check_gamma, _check_int,
                      _check_positive, _check_process, _write_atomically)

__all__ = ["GaussianMixture", "Gaussian", "MollifiedCantor", "mollified_cantor", "bimodal",
           "init_mlp", "mlp_score", "score_model", "silu", "noise_features", "dsm_loss", "draw_levels",
           "AdamState", "adam_init", "adam_step", "OnlineSchedule", "TrainingState",
           "TrainingDiverged", "train", "progress_printer", "retain_freed_memory", "save_checkpoint", "load_checkpoint"]

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
        self._check_shape(x)
        _check_level(t, process)
        s, sigma = process.s(t), process.sigma(t)
        return _mixture_score(x, np.log(self.weights), s * self.means,
                              s ** 2 * self.stds ** 2 + sigma ** 2)

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
    level = _check_int(level, "level", minimum=0)
    if level > MAX_CANTOR_LEVEL:
        raise ValueError(f"`level` = {level} would make 2^{level} = {2 ** level:,} mixture components, and "
                         f"every score evaluation would need {2 ** level * 8 * 3:,} bytes per sample; "
                         f"use `level` <= {MAX_CANTOR_LEVEL}")
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
    logp = _component_log_probs(x, log_w, means, var)
    top = anp.max(logp, axis=1, keepdims=True)   # log-sum-exp, shifted by the largest term
    return (top + anp.log(anp.sum(anp.exp(logp - top), axis=1, keepdims=True)))[:, 0]


def _mixture_score(x, log_w, means, var):
    """``sum_k r_k(x) (means_k - x) / var_k``; responsibilities by a max-shifted softmax."""
    logp = _component_log_probs(x, log_w, means, var)
    p = anp.exp(logp - anp.max(logp, axis=1, keepdims=True))
    resp = p / anp.sum(p, axis=1, keepdims=True)
    return anp.sum(resp[:, :, None] * (means[None, :, :] - x[:, None, :]) / var, axis=1)


def _check_level(t, process):
    """A time ``t`` (a scalar, or one per row) must be finite and in the process's range."""
    value = np.asarray(getval(t))
    if np.iscomplexobj(value) or not np.all(np.isfinite(value)):
        raise ValueError(f"`t` must be a finite real time, got {value}")
    if np.any(value < process.t_min) or np.any(value > process.t_max):
        raise ValueError(f"`t` = {value} must lie in [{process.t_min}, {process.t_max}], the process's range")


def _scale_noise(process, t):
    _check_process(process)
    t = float(t)
    if not process.t_min <= t <= process.t_max:
        raise ValueError(f"`t` = {t} must lie in [{process.t_min}, {process.t_max}]")
    return float(process.s(t)), float(process.sigma(t))


# --------------------------------------------------------------------------------
# MLP score model (SPEC 9)
# --------------------------------------------------------------------------------

def init_mlp(rng, dim=1, width=64, depth=3, n_fourier=4, input_scale=None):
    """Parameters of an MLP score model: a plain list of ``(W, b)`` pairs.

    Input: ``dim`` data coordinates plus ``1 + 2 n_fourier`` noise-level features;
    ``depth`` hidden layers of ``width`` units; output ``dim`` (the predicted noise).
    Weights are ``N(0, 1/fan_in)``, except the first layer's data weights,
    ``N(0, input_scale^2 / fan_in)``, with first-layer biases uniform on
    ``(-input_scale/2, input_scale/2)``: first-layer units then bend at places spread
    over the standardised data and vary on a fraction of its standard deviation,
    which narrow, well-separated modes need (measured on the mollified Cantor target:
    README). The default ``input_scale`` is ``10 / sqrt(dim)``: 10 was tuned on 1-D
    data and is poor in many dimensions, where the data weights' sum over ``dim``
    inputs is already large. Held-out DSM loss after 3,000 steps (3x64, two seeds,
    README): d = 1, 10 / 3 / 1 give 0.1105 / 0.1112 / 0.1129; d = 8, 10 / 3.54 / 1 give
    1.331 / 1.311 / 1.308; d = 64, 10 / 1.25 / 1 give 11.80 / 9.66 / 9.65. The output
    layer starts at zero, so the initial model is the Gaussian fit of
    :func:`mlp_score` (exact for Gaussian data with the standardisation's moments).
    """
    rng = as_rng(rng)
    dim = _check_int(dim, "dim", minimum=1)
    width = _check_int(width, "width", minimum=1)
    depth = _check_int(depth, "depth", minimum=1)
    n_fourier = _check_int(n_fourier, "n_fourier", minimum=0)
    input_scale = 10.0 / np.sqrt(dim) if input_scale is None else _check_positive(input_scale, "input_scale")
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
    u = 2.0 * (anp.log(process.nsr(t)) - lo) / (hi - lo) - 1.0
    u = anp.reshape(u, (-1, 1))
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


def mlp_score(params, x, t, process, data_mean=0.0, data_var=1.0):
    """Score ``S_theta(x, t) = -eps_hat(x, t) / sigma(t)`` of an MLP; shape (n, d).

    Noise prediction keeps the output well scaled at every level: the loss
    ``||sigma S_theta + eps||^2 = ||eps_hat - eps||^2`` is O(1) everywhere. The input is
    the standardised ``x_in = (x - s data_mean) c_in``, ``c_in = 1/sqrt(s^2 data_var +
    sigma^2)`` (the marginal's mean and standard deviation, as EDM's ``c_in``), with the
    features of :func:`noise_features`. The network predicts a correction to the
    Gaussian fit: ``eps_hat = sigma c_in x_in + net(x_in, features)``, the first term
    being exact for Gaussian data with these moments (a skip connection, like EDM's
    ``c_skip``). The zero-initialised output layer starts the model at that fit, and
    far from the data the fit's pull-back dominates: without it, 6% of the ancestral
    samples of one Cantor model escaped to x ~ 36 (README). Activation :func:`silu`:
    smooth, as the predictor cost needs second derivatives; with it, 3x64 models fill
    all eight Cantor modes where ``tanh`` filled at most six (README). ``t`` is a
    scalar or one time per row, shape (n,). ``data_mean``, ``data_var``: scalars or
    per-coordinate arrays (d,), those the model was trained with. Differentiable by
    autograd in ``params``, ``x`` and ``t``.
    """
    x_in, features, fit, sigma = _mlp_inputs(params, x, t, process, data_mean, data_var)
    return -(fit + _mlp_eps(params, x_in, features)) / sigma


def _mlp_inputs(params, x, t, process, data_mean, data_var):
    """Standardised input ``x_in``, noise features (n, F), the Gaussian fit
    ``sigma c_in x_in`` of the noise, and ``sigma``, for times ``t`` (scalar or (n,))."""
    dim = params[-1][0].shape[1]
    n_fourier = (params[0][0].shape[0] - dim - 1) // 2
    t_col = anp.reshape(t, (-1, 1)) if anp.ndim(t) else t
    s, sigma = process.s(t_col), process.sigma(t_col)
    features = noise_features(process, t_col, n_fourier)
    if anp.ndim(t) == 0:
        features = anp.broadcast_to(features, (x.shape[0], features.shape[1]))
    c_in = 1.0 / anp.sqrt(s ** 2 * data_var + sigma ** 2)
    x_in = (x - s * data_mean) * c_in
    return x_in, features, sigma * c_in * x_in, sigma


def _mlp_eps(params, x_in, features):
    """The network proper: predicted noise from standardised data and noise features."""
    h = anp.concatenate([x_in, features], axis=1)
    for W, b in params[:-1]:
        h = silu(anp.dot(h, W) + b)
    W, b = params[-1]
    return anp.dot(h, W) + b


def score_model(params, process, data_mean=0.0, data_var=1.0):
    """The MLP as a plain score callable ``score(x, t)`` for scoreopt and the sampler."""
    return lambda x, t: mlp_score(params, x, t, process, data_mean, data_var)


def draw_levels(ts, n, rng, uniform=False):
    """Training times: uniform over the levels of ``ts`` or, if ``uniform``, over ``[ts[0], ts[-1]]``."""
    rng = as_rng(rng)
    return rng.uniform(ts[0], ts[-1], n) if uniform else ts[rng.integers(0, len(ts), n)]


def dsm_loss(params, x0, process, ts, rng, uniform=False, data_mean=0.0, data_var=1.0):
    """Denoising score matching ``E ||sigma S_theta(s x0 + sigma eps, t) + eps||^2`` (Vincent 2011).

    ``t`` is drawn per sample from the levels of the schedule ``ts`` (uniformly over
    the ``T + 1`` levels) or, with ``uniform=True``, uniformly on ``[t_min, t_max]``.
    """
    rng = as_rng(rng)
    x0 = check_data(x0)
    t = draw_levels(check_schedule(ts, process), len(x0), rng, uniform)
    eps = rng.standard_normal(x0.shape)
    return _dsm(params, x0, t, eps, process, data_mean, data_var)


def _dsm(params, x0, t, eps, process, data_mean, data_var):
    return _dsm_prepared(params, *_dsm_inputs(params, x0, t, eps, process, data_mean, data_var))


def _dsm_inputs(params, x0, t, eps, process, data_mean, data_var):
    """Everything of the loss that does not depend on ``params`` (kept out of the trace)."""
    x_t = process.s(t)[:, None] * x0 + process.sigma(t)[:, None] * eps
    x_in, features, fit, _ = _mlp_inputs(params, x_t, t, process, data_mean, data_var)
    return x_in, features, eps - fit     # the target of the learned correction


def _dsm_prepared(params, x_in, features, eps):
    # sigma S_theta + eps = eps - eps_hat with S_theta = -eps_hat / sigma
    return anp.mean(anp.sum((eps - _mlp_eps(params, x_in, features)) ** 2, axis=1))


# --------------------------------------------------------------------------------
# Adam (Kingma & Ba 2015) on a flat parameter vector
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


# --------------------------------------------------------------------------------
# Training with an optional online schedule (SPEC 6.3, 9)
# --------------------------------------------------------------------------------

class _OnlineSettings(NamedTuple):
    every: int = 50
    burn_in: int = 1000
    gamma: float = 0.05
    kind: str = "corrector"
    n_samples: int = 1000
    order: int = 2
    method: str = "intervals"
    n_grid: int = 200


class OnlineSchedule(_OnlineSettings):
    """Settings of the online schedule update (the paper's Algorithm 2).

    After ``burn_in`` steps on the initial schedule, every ``every`` steps, with the
    current model and ``n_samples`` fresh data samples, :func:`scoreopt.online_update`
    finds a target schedule and blends the current one towards it with rate ``gamma``.
    The target comes from

    - ``method="intervals"`` (the paper's Algorithm 2): the interval costs of the
      current schedule (``kind``: ``"corrector"`` or ``"predictor"``, of order
      ``order``) through ``update_schedule`` (Algorithm 1);
    - ``method="grid"`` (derived, SPEC 6.1): the local corrector cost on ``n_grid``
      levels uniform in ``log nu``, through ``optimal_schedule``. It avoids the pitfall
      of SPEC 6.3 (one huge last step) that the interval route falls into on smooth
      data (measured on the bimodal target: README).

    Every setting is checked here, at construction, not at the first update.
    """
    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args, **kwargs)
        _check_int(self.every, "every", minimum=1)
        _check_int(self.burn_in, "burn_in", minimum=0)
        _check_int(self.n_samples, "n_samples", minimum=2)
        _check_int(self.n_grid, "n_grid", minimum=2)
        _check_positive(self.order, "order")
        _check_gamma(self.gamma)
        if self.kind not in ("corrector", "predictor"):
            raise ValueError(f"`kind` must be 'corrector' or 'predictor', got {self.kind!r}")
        if self.method not in ("intervals", "grid"):
            raise ValueError(f"`method` must be 'intervals' or 'grid', got {self.method!r}")
        if self.method == "grid" and self.kind != "corrector":
            raise ValueError("`kind` must be 'corrector' with method 'grid'")
        return self

    def due(self, step):
        """Whether the update runs after optimiser step ``step``."""
        return step >= self.burn_in and (step - self.burn_in) % self.every == 0


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

    def score(self, process):
        """The trained model as a plain ``score(x, t)`` callable."""
        return score_model(self.params, process, self.data_mean, self.data_var)


class TrainingDiverged(FloatingPointError):
    """Raised by `train` when the loss or the parameters stop being finite or explode."""


def train(params, data, process, ts=None, *, rng, n_steps, batch_size=256, lr=1e-3,
          lr_decay="cosine", uniform_levels=False, online=None, callback="default",
          data_mean=None, data_var=None, checkpoint=None, checkpoint_every=1000, resume=False,
          max_loss_ratio=1e3, allow_changes=()):
    """Train an MLP score model by denoising score matching, optionally adapting the schedule.

    Parameters
    ----------
    params : list of (W, b), from :func:`init_mlp`
    data : a target (anything with ``sample(n, rng)``) or an array (N, d) of samples
    process : scoreopt.Process
    ts : schedule whose levels the training times are drawn from; may be None with
        ``uniform_levels=True`` and no ``online`` update
    rng : numpy Generator or int seed; the only source of randomness (keyword)
    n_steps : total optimiser steps (a resumed run counts the steps already taken)
    lr, lr_decay : Adam step size, constant (``None``) or cosine-decayed to 0 (``"cosine"``)
    uniform_levels : draw ``t`` uniformly on ``[t_min, t_max]`` instead (schedule-free baseline)
    online : :class:`OnlineSchedule` or None for a fixed schedule
    callback : ``callback(step, loss, info)`` after every step, ``info`` holding the current
        ``ts``, ``params``, ``elapsed`` seconds and last ``Lambda`` (None before the first
        update); ``"default"`` prints a progress line ten times per run; None for silence
    data_mean, data_var : per-coordinate data mean and variance for the input
        standardisation (default: from ``data``); kept in the result and checkpoints
    checkpoint, checkpoint_every : path of an ``.npz`` checkpoint written atomically every
        ``checkpoint_every`` steps and at the end; its folder is checked (it must exist and
        take a file) before the first step. ``resume=True`` continues from it if it exists,
        after checking that it belongs to this run: the architecture, process, initial
        schedule, ``n_steps``, ``lr``, ``lr_decay``, ``batch_size``, ``uniform_levels``,
        ``online`` and ``max_loss_ratio`` must be those saved, or a ``ValueError`` says what
        differs
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
    being finite or the loss explodes; the last checkpoint on disk is kept as it was.
    The allocator setting that speeds steps up (:func:`retain_freed_memory`) is not
    applied here: call it first if you want it.
    """
    ts, n_steps, draw, moments = _check_training(params, data, process, ts, n_steps, batch_size, lr,
                                                 lr_decay, uniform_levels, online, checkpoint_every,
                                                 max_loss_ratio, data_mean, data_var)
    run = _run_definition(params, process, ts, n_steps, lr, lr_decay, batch_size, uniform_levels, online,
                          max_loss_ratio)
    if checkpoint is not None:
        _prepare_checkpoint_folder(checkpoint)
    state = _start_state(params, ts, as_rng(rng), moments, run, checkpoint if resume else None, allow_changes)
    theta, unflatten = flatten(state.params)
    _, ts, adam, step, rng, history, data_mean, data_var, _ = state
    callback = progress_printer(n_steps) if callback == "default" else callback
    loss_and_grad = value_and_grad(_dsm_prepared)
    losses, start = list(history["loss"]), time.perf_counter()
    now = lambda: TrainingState(unflatten(theta), ts, adam, step, rng,
                                dict(history, loss=np.array(losses)), data_mean, data_var, run)
    while step < n_steps:
        # 1. DSM step on the score model, levels drawn from the current schedule
        x0, params = draw(batch_size, rng), unflatten(theta)
        t = draw_levels(ts, batch_size, rng, uniform_levels)
        loss, grad = loss_and_grad(params, *_dsm_inputs(params, x0, t, rng.standard_normal(x0.shape),
                                                        process, data_mean, data_var))
        rate = lr * (0.5 * (1 + np.cos(np.pi * step / n_steps)) if lr_decay == "cosine" else 1.0)
        theta_new, adam = adam_step(theta, flatten(grad)[0], adam, rate)
        _check_divergence(step + 1, loss, losses[0] if losses else loss, theta_new, max_loss_ratio, checkpoint)
        theta, step = theta_new, step + 1
        losses.append(float(loss))
        # 2-4. Algorithm 2 after the burn-in: costs of ts with the model fixed, then blend
        if online is not None and online.due(step):
            model = score_model(unflatten(theta), process, data_mean, data_var)
            update = online_update(model, process, ts, draw(online.n_samples, rng), rng, online.gamma,
                                   online.method, online.kind, online.order, online.n_grid)
            history, ts = _record_update(history, step, ts, update), update.ts
        if checkpoint is not None and (step % checkpoint_every == 0 or step == n_steps):
            save_checkpoint(checkpoint, *now())
        if callback is not None:
            callback(step, float(loss), {"ts": ts, "params": unflatten(theta), "elapsed": time.perf_counter() - start,
                                         "Lambda": history["Lambda"][-1] if len(history["Lambda"]) else None})
    return now()


def _check_training(params, data, process, ts, n_steps, batch_size, lr, lr_decay, uniform_levels,
                    online, checkpoint_every, max_loss_ratio, data_mean, data_var):
    """Validate `train`'s arguments once; returns the schedule, ``n_steps``, the data
    sampler and the standardisation moments."""
    _check_process(process)
    if ts is None:
        if not uniform_levels or online is not None:
            raise ValueError("`ts` is needed unless `uniform_levels=True` without an `online` update")
        ts = np.array([process.t_min, process.t_max])
    ts = check_schedule(ts, process)
    n_steps = _check_int(n_steps, "n_steps", minimum=1)
    _check_int(batch_size, "batch_size", minimum=1)
    _check_int(checkpoint_every, "checkpoint_every", minimum=1)
    _check_positive(lr, "lr")
    _check_positive(max_loss_ratio, "max_loss_ratio")
    if lr_decay not in (None, "cosine"):
        raise ValueError(f"`lr_decay` must be None or 'cosine', got {lr_decay!r}")
    if online is not None and not isinstance(online, OnlineSchedule):
        raise TypeError("`online` must be an OnlineSchedule or None")
    moments = _data_moments(data)
    dim = params[-1][0].shape[1]
    if moments[0].shape != (dim,):
        raise ValueError(f"`data` has {moments[0].shape[0]} columns but `params` model {dim}")
    mean = moments[0] if data_mean is None else np.broadcast_to(np.asarray(data_mean, float), (dim,))
    var = moments[1] if data_var is None else np.broadcast_to(np.asarray(data_var, float), (dim,))
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var > 0)):
        raise ValueError("`data_mean` must be finite and `data_var` finite and positive")
    return ts, n_steps, _data_sampler(data), (mean, var)


def _run_definition(params, process, ts, n_steps, lr, lr_decay, batch_size, uniform_levels, online,
                    max_loss_ratio):
    """What defines a run, as plain JSON-able values: a checkpoint must match it to resume."""
    return {"layer_shapes": [list(W.shape) for W, _ in params], "process": process.name,
            "t_min": float(process.t_min), "t_max": float(process.t_max),
            "initial_ts": [float(t) for t in ts], "n_steps": int(n_steps), "lr": float(lr),
            "lr_decay": lr_decay, "batch_size": int(batch_size), "uniform_levels": bool(uniform_levels),
            "online": None if online is None else dict(online._asdict()), "max_loss_ratio": float(max_loss_ratio)}


def _start_state(params, ts, rng, moments, run, resume_from, allow_changes):
    """A fresh training state, or the one saved at ``resume_from`` if that file exists and
    belongs to this run (else a ``ValueError`` listing what differs)."""
    theta, _ = flatten(params)
    if resume_from is None or not os.path.exists(resume_from):
        empty = {"loss": np.zeros(0), "update_step": np.zeros(0, int), "Lambda": np.zeros(0),
                 "schedules": np.zeros((0, len(ts))), "costs": np.zeros((0, len(ts) - 1))}
        return TrainingState(params, ts, adam_init(theta), 0, rng, empty, *moments, run)
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
    """Before step 1: the checkpoint's folder must take a file (so no run is lost at its first
    save), and temporary files left by an interrupted save of this checkpoint are removed."""
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"`checkpoint`: the folder `{folder}` does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"`checkpoint`: cannot write in `{folder}`: {err}") from err
    for name in os.listdir(folder):
        if name.startswith(f".{base}.") and name.endswith(".tmp"):
            os.unlink(os.path.join(folder, name))


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


def progress_printer(n_steps, lines=10):
    """A callback printing ``step, loss, Lambda, elapsed, steps/s`` about ``lines`` times a run."""
    every = max(1, n_steps // lines)

    def callback(step, loss, info):
        if step % every == 0 or step == n_steps:
            lam = "" if info["Lambda"] is None else f"  Lambda {info['Lambda']:.3f}"
            print(f"step {step:>7d}/{n_steps}  loss {loss:.4f}{lam}  {info['elapsed']:.1f} s  "
                  f"{step / max(info['elapsed'], 1e-9):.0f} steps/s", flush=True)
    return callback


def _data_sampler(data):
    if hasattr(data, "sample"):
        return lambda n, rng: data.sample(n, rng)
    data = check_data(data, "data")
    return lambda n, rng: data[rng.integers(0, len(data), n)]


def _data_moments(data):
    """Per-coordinate mean and variance: exact for a target, else from the samples.

    An object with ``sample`` only is sampled 10,000 times with a private generator
    of fixed seed, so the training's own random stream is untouched.
    """
    if hasattr(data, "mean") and hasattr(data, "variance"):
        return np.asarray(data.mean(), float), np.asarray(data.variance(), float)
    if hasattr(data, "sample"):
        data = data.sample(10_000, np.random.default_rng(0))
    data = check_data(data, "data")
    return data.mean(axis=0), data.var(axis=0)


# --------------------------------------------------------------------------------
# Checkpoints: .npz without pickle, written atomically
# --------------------------------------------------------------------------------

CHECKPOINT_VERSION = 2
_CHECKPOINT_KEYS = ("version", "layer_shapes", "theta", "ts", "adam_m", "adam_v", "adam_step",
                    "step", "rng_state", "loss", "update_step", "Lambda", "schedules", "costs",
                    "data_mean", "data_var", "run")


def save_checkpoint(path, params, ts, adam, step, rng, history=None, data_mean=0.0, data_var=1.0, run=None):
    """Save parameters, schedule, Adam state, step, RNG state, history, the input
    standardisation and the run's definition (``run``, see :func:`train`) to ``path`` (.npz).

    Written to a temporary file ``.<name>.<random>.tmp`` in the same folder, flushed to
    disk, renamed over ``path``, and the folder flushed too: an interrupted save never
    corrupts the previous checkpoint (a leftover temporary file is removed by the next
    :func:`train` with this checkpoint). The file gets the usual permissions (0666 less
    the umask). No pickle.
    """
    theta, _ = flatten(params)
    history = history or {}
    arrays = {
        "version": np.array(CHECKPOINT_VERSION),
        "layer_shapes": np.array([W.shape for W, _ in params]),
        "theta": theta, "ts": np.asarray(ts, dtype=float),
        "adam_m": adam.m, "adam_v": adam.v, "adam_step": np.array(adam.step), "step": np.array(step),
        "rng_state": np.array(json.dumps(as_rng(rng).bit_generator.state)),
        "loss": np.asarray(history.get("loss", np.zeros(0)), dtype=float),
        "update_step": np.asarray(history.get("update_step", np.zeros(0)), dtype=int),
        "Lambda": np.asarray(history.get("Lambda", np.zeros(0)), dtype=float),
        "schedules": np.asarray(history.get("schedules", np.zeros((0, len(ts)))), dtype=float),
        "costs": np.asarray(history.get("costs", np.zeros((0, len(ts) - 1))), dtype=float),
        "data_mean": np.broadcast_to(np.asarray(data_mean, float), (params[-1][0].shape[1],)),
        "data_var": np.broadcast_to(np.asarray(data_var, float), (params[-1][0].shape[1],)),
        "run": np.array(json.dumps(run or {})),
    }
    _write_atomically(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """Load a checkpoint written by :func:`save_checkpoint`; returns a :class:`TrainingState`.

    A missing, truncated or corrupted file raises ``ValueError`` naming the path.
    """
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at `{path}`")
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
            data = {k: f[k] for k in _CHECKPOINT_KEYS}
        state = json.loads(str(data["rng_state"]))
        rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
        rng.bit_generator.state = state
    except Exception as exc:   # zipfile.BadZipFile, EOFError, KeyError, ValueError, ...
        raise ValueError(f"`{path}` is not a readable checkpoint (truncated or corrupted): "
                         f"{type(exc).__name__}: {exc}") from exc
    if int(data["version"]) != CHECKPOINT_VERSION:
        raise ValueError(f"`{path}` has checkpoint version {int(data['version'])}, expected {CHECKPOINT_VERSION}")
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
                         int(data["step"]), rng, history, data["data_mean"], data["data_var"], run)
