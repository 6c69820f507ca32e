"""Targets with exact scores, small MLP score models, and their training with the paper's Algorithm 2.

**Part I** (it stands alone with Part I of ``scoreopt``): Gaussian-mixture targets, which stay
mixtures under every process (component ``N(mu_k, diag std_k^2)`` of ``p_0`` becomes
``N(s mu_k, diag(s^2 std_k^2 + sigma^2))`` in ``p_t``), so their scores are exact and written in
``autograd.numpy``; the paper's Cantor and bimodal targets; an MLP score model whose parameters
are a plain list of ``(W, b)`` pairs, with EDM's preconditioning; denoising score matching; Adam
as a pure function; and ``train``, the paper's Algorithm 2 (``scoreopt.online_update`` every few
steps). **Part II**: more training levels, atomic ``.npz`` checkpoints, a checkpointing callback
and resuming.
"""

import time
from functools import partial
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad
from autograd.extend import defjvp, defvjp, primitive
from autograd.misc import flatten
from autograd.tracer import Box, getval
from scipy.special import ndtr

from scoreopt import (COSTS, ROUTES, as_column, as_rng, check_callable, check_data, check_gamma, check_int,
                      check_positive, check_process, check_real, check_schedule, check_times, grid_route,
                      interval_route, nsr_range, online_update, resolve)

__all__ = ["GaussianMixture", "Gaussian", "MollifiedCantor", "mollified_cantor", "bimodal",
           "init_mlp", "noise_features", "silu", "preconditioning_coefficients", "mlp_score", "ScoreModel",
           "score_model", "schedule_levels", "uniform_times", "DSMBatch", "prepare_dsm", "prepared_dsm_loss",
           "dsm_loss", "AdamState", "adam_init", "adam_step", "OnlineSchedule", "TrainingState", "TrainingDiverged",
           "train"]

LOG_2PI = np.log(2.0 * np.pi)
MAX_CANTOR_LEVEL = 16      # 65,536 atoms: about 1.5 MB of temporaries per sample and score call


# ================================================================================
# PART I. THE PAPER'S TARGETS, SCORE MODEL AND TRAINING
# ================================================================================

# -- Targets with exact scores ---------------------------------------------------

class GaussianMixture:
    """Mixture of Gaussians with diagonal covariances in any dimension ``d``: ``weights`` (K,), positive
    (normalised); ``means`` (K, d) or (K,) for 1-D data; ``stds`` broadcastable to ``means``, positive.

    >>> import scoreopt as so
    >>> g = GaussianMixture([1, 1], [-1.0, 1.0], [0.1, 0.1])
    >>> g.dim, g.variance().round(2).tolist(), g.score(np.zeros((1, 1)), 0.5, so.ve()).tolist()
    (1, [1.01], [[0.0]])
    """

    def __init__(self, weights, means, stds):
        means = np.array(means, dtype=float)
        means = means[:, None] if means.ndim == 1 else means
        weights, stds = np.array(weights, dtype=float).reshape(-1), np.array(stds, dtype=float)
        stds = stds[:, None] if stds.ndim == 1 and len(stds) == len(means) else stds
        try:
            stds = np.broadcast_to(stds, means.shape).copy()
        except ValueError:
            stds = None
        if means.ndim != 2 or len(weights) != len(means) or stds is None:
            raise ValueError("`means` must have shape (K, d) with K = len(weights), and `stds` broadcast to it")
        if not (np.all(np.isfinite(means)) and np.all(np.isfinite(stds)) and np.all(stds > 0)
                and np.all(np.isfinite(weights)) and np.all(weights > 0)):
            raise ValueError("`means` must be finite, `stds` and `weights` finite and positive")
        self.weights, self.means, self.stds = weights / weights.sum(), means, stds

    @property
    def dim(self):
        """Dimension ``d`` of the data."""
        return self.means.shape[1]

    def mean(self):
        """Mean of ``p_0``, shape (d,)."""
        return self.weights @ self.means

    def variance(self):
        """Per-coordinate variance of ``p_0``, shape (d,)."""
        return self.weights @ (self.means ** 2 + self.stds ** 2) - self.mean() ** 2

    def sample(self, n, rng):
        """``n`` independent draws of ``p_0``, shape (n, d)."""
        n, rng = check_int(n, "n", 1), as_rng(rng)
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + self.stds[k] * rng.standard_normal((n, self.dim))

    def marginal(self, process, t):
        """``p_t`` under ``process``: the same family with ``s mu_k`` and ``s^2 std_k^2 + sigma^2``."""
        s, sigma = _scale_noise(process, t)
        return GaussianMixture(self.weights, s * self.means, np.sqrt(s ** 2 * self.stds ** 2 + sigma ** 2))

    def log_prob(self, x):
        """Log density of ``p_0`` at ``x`` (n, d); shape (n,). Differentiable by autograd."""
        return _mixture_log_prob(self._check_x(x), np.log(self.weights), self.means, self.stds ** 2)

    def score(self, x, t, process):
        """Exact score ``grad_x log p_t(x)`` of the marginal, (n, d); ``t`` a float or one per row.
        Written in ``autograd.numpy``: differentiable in ``x`` and ``t``."""
        check_process(process)
        _check_level(t, process, self._check_shape(np.shape(getval(x)))[0])
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
        self._check_shape(np.shape(x))
        return check_data(x, "x")

    def _check_shape(self, shape):
        if len(shape) != 2 or shape[1] != self.dim:
            raise ValueError(f"`x` must have shape (n, {self.dim}) for this {self.dim}-D target, got {shape}")
        return shape

    def __repr__(self):
        return f"{type(self).__name__}(K={len(self.weights)}, d={self.dim})"


class Gaussian(GaussianMixture):
    """Gaussian ``N(mean, diag(var))`` in any dimension: ``mean``, ``var`` arrays (d,) (scalars: d = 1), ``var > 0``.

    >>> Gaussian([0.0, 1.0], [1.0, 4.0]).variance().tolist()
    [1.0, 4.0]
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
    """The Cantor construction to ``level``, each atom convolved with ``N(0, width^2)``; built by
    :func:`mollified_cantor`, with ``level``, ``width``, ``interval`` and ``atoms``."""

    def __init__(self, level, width, interval):
        self.level, self.width, self.interval = level, width, interval
        lo, hi = interval
        bits = (np.arange(2 ** level)[:, None] >> np.arange(level - 1, -1, -1)) & 1
        left = bits @ (2.0 * 3.0 ** -np.arange(1, level + 1)) if level else np.zeros(1)
        # Centres of the 2^level intervals of length 3^-level left by the construction.
        self.atoms = lo + (hi - lo) * (left + 0.5 * 3.0 ** -level)
        super().__init__(np.ones(2 ** level), self.atoms, width)

    def __repr__(self):
        return f"MollifiedCantor(level={self.level}, width={self.width:g}, interval={self.interval})"


def mollified_cantor(level=3, width=None, interval=(0.0, 1.0)):
    """The mollified Cantor target of the paper's Figure 1 (parameters chosen here).

    The level-``level`` Cantor construction on ``[0, 1]`` leaves ``2^level`` intervals of length
    ``3^-level``; the atoms are their centres, mapped onto ``interval``, equally weighted, each convolved
    with ``N(0, width^2)``: ``level = 3`` gives eight modes. The default ``width`` is a quarter of
    ``3^-level`` in data units. The paper's exact width and interval are not known to us.

    >>> [round(a, 4) for a in mollified_cantor().atoms.tolist()][:3]
    [0.0185, 0.0926, 0.2407]
    """
    level = check_int(level, "level", 0)
    if level > MAX_CANTOR_LEVEL:
        raise ValueError(f"`level` = {level} would make 2^{level} = {2 ** level:,} mixture components, and every "
                         f"score evaluation would need {2 ** level * 8 * 3:,} bytes per sample; use `level` <= "
                         f"{MAX_CANTOR_LEVEL}")
    lo, hi = (float(v) for v in interval)
    if not lo < hi:
        raise ValueError("`interval` must be (lo, hi) with lo < hi")
    width = 0.25 * 3.0 ** -level * (hi - lo) if width is None else check_positive(width, "width")
    return MollifiedCantor(level, width, (lo, hi))


def bimodal(weights=(0.5, 0.5), means=(-1.0, 1.0), stds=(0.1, 0.1)):
    """The 1-D two-component mixture of the paper's online-learning experiment (its parameters are not known
    to us; the default, modes at +-1 with standard deviation 0.1, is this project's choice).

    >>> bimodal().means.ravel().tolist()
    [-1.0, 1.0]
    """
    return GaussianMixture(weights, np.asarray(means, dtype=float)[:, None], np.asarray(stds, dtype=float)[:, None])


def _component_log_probs(x, log_w, means, var):
    """``log w_k + log N(x; means_k, diag var_k)``, (n, K); ``means``, ``var`` (K, d) or (n, K, d)."""
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
    return anp.sum((p / anp.sum(p, axis=1, keepdims=True))[:, :, None] * (means - x[:, None, :]) / var, axis=1)


def _check_level(t, process, n):
    """A time ``t`` (a scalar, or one per row of ``n``), finite and in the process's range."""
    value = check_times(getval(t), process, "t")
    if value.ndim > 1 or (value.ndim == 1 and len(value) != n):
        raise ValueError(f"`t` must be a float or one time per row, shape ({n},); got shape {value.shape}")


def _scale_noise(process, t):
    _check_level(t, check_process(process), 1)
    return float(process.s(t)), float(process.sigma(t))


# -- The MLP score model, with EDM's preconditioning in the process's own coordinates --

def init_mlp(rng, dim=1, width=64, depth=3, n_fourier=4, input_scale=None):
    """Parameters of an MLP score model: a plain list of ``(W, b)`` pairs.

    Input: ``dim`` data coordinates and ``1 + 2 n_fourier`` noise-level features; ``depth`` hidden layers
    of ``width``; output ``dim`` (the network ``F`` of :func:`mlp_score`). Weights ``N(0, 1/fan_in)``,
    except the first layer's data weights, ``N(0, input_scale^2 / fan_in)``, with first-layer biases
    uniform on ``(-input_scale/2, input_scale/2)``, so that the units' bends fall across the standardised
    data, which narrow, separated modes need (default ``10 / sqrt(dim)``, measured in
    ``examples/benchmarks/input_scale_benchmark.py``). The output layer starts at zero, so the initial
    model is the data's Gaussian fit.

    >>> [W.shape for W, b in init_mlp(0, dim=2, width=8, depth=2, n_fourier=1)]
    [(5, 8), (8, 8), (8, 2)]
    """
    rng = as_rng(rng)
    dim, width, depth = check_int(dim, "dim", 1), check_int(width, "width", 1), check_int(depth, "depth", 1)
    n_fourier = check_int(n_fourier, "n_fourier", 0)
    input_scale = 10.0 / np.sqrt(dim) if input_scale is None else check_positive(input_scale, "input_scale")
    sizes = [dim + 1 + 2 * n_fourier] + [width] * depth
    params = [(rng.standard_normal((m, n)) / np.sqrt(m), np.zeros(n)) for m, n in zip(sizes[:-1], sizes[1:])]
    W0, _ = params[0]
    W0[:dim] *= input_scale
    params[0] = (W0, rng.uniform(-0.5 * input_scale, 0.5 * input_scale, width))
    return params + [(np.zeros((width, dim)), np.zeros(dim))]


def noise_features(process, t, n_fourier):
    """``u = log nu(t)`` rescaled to ``[-1, 1]`` over the process range, with ``sin(k pi u / 2)``,
    ``cos(k pi u / 2)``, ``k = 1..n_fourier``: shape (n, 1 + 2 n_fourier); ``t`` a scalar or (n,).

    >>> import scoreopt as so
    >>> noise_features(so.ve(), np.array([0.0, 1.0]), 0).ravel().tolist()
    [-1.0, 1.0]
    """
    lo, hi = np.log(nsr_range(process))
    u = anp.reshape(2.0 * (anp.log(process.nsr(t)) - lo) / (hi - lo) - 1.0, (-1, 1))
    k = 0.5 * np.pi * np.arange(1, n_fourier + 1)
    return anp.concatenate([u, anp.sin(k * u), anp.cos(k * u)], axis=1)


@primitive
def silu(z):
    """SiLU ``z sigmoid(z)`` (Elfwing et al. 2018) as one autograd primitive; smooth, as the predictor cost's
    second derivatives need. Its derivative is written in ``autograd.numpy``, so higher derivatives work.

    >>> float(silu(np.array(0.0)))
    0.0
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
    """``(c_skip, c_out, c_in)`` of the denoiser ``D = mean + c_skip (y - mean) + c_out F(c_in (y - mean))``
    in ``y = x / s`` and ``nu`` (docs/derivations.md, 10). ``"edm"`` (Karras et al. 2022, Table 1, per
    coordinate): ``c_skip = v / (v + nu^2)``, ``c_out = nu sqrt(v) / sqrt(v + nu^2)``, ``c_in = 1 / sqrt(v +
    nu^2)``, ``v`` the data variance; the network's error reaches ``D`` at most at the data's scale.
    ``"eps"`` (noise prediction): the same with ``c_out = -nu``.

    >>> [round(float(c), 3) for c in preconditioning_coefficients(1.0, 1.0)]
    [0.5, 0.707, 0.707]
    """
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"`preconditioning` must be one of {PRECONDITIONINGS}, got {preconditioning!r}")
    total = data_var + nu ** 2
    c_out = nu * anp.sqrt(data_var) / anp.sqrt(total) if preconditioning == "edm" else -nu
    return data_var / total, c_out, 1.0 / anp.sqrt(total)


def mlp_score(params, x, t, process, data_mean=0.0, data_var=1.0, preconditioning="edm"):
    """Score ``S_theta(x, t)`` of the preconditioned MLP, (n, d); ``t`` a float or one per row (n,).

    The model is a denoiser ``D_theta(y, nu) = mean + c_skip (y - mean) + c_out F_theta(c_in (y - mean),
    features(nu))`` in ``y = x / s`` (:func:`preconditioning_coefficients`, :func:`noise_features`), and its
    score by Tweedie's formula ``S = (D - y) / (s nu^2) = [-(y - mean) / (data_var + nu^2) + (c_out / nu^2)
    F] / s``, written so that no two large terms cancel; the first term is the exact score of the data's
    Gaussian fit. ``data_mean``, ``data_var``: scalars or per coordinate (d,), those the model was trained
    with. Differentiable by autograd in ``params``, ``x`` and ``t``.

    >>> import scoreopt as so
    >>> mlp_score(init_mlp(0), np.ones((1, 1)), 0.5, so.ve()).round(4).tolist()    # untrained: N(0, 1)'s score
    [[-0.8621]]
    """
    s, nu = as_column(process.s(t)), as_column(process.nsr(t))
    centred = x / s - data_mean
    c_skip, c_out, c_in = preconditioning_coefficients(nu, data_var, preconditioning)
    F = _network(params, _network_input(params, c_in * centred, process, t))
    return (-centred / (data_var + nu ** 2) + c_out / nu ** 2 * F) / s


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
    """The MLP as a plain, picklable score callable ``score(x, t)``; it records its ``process``.

    >>> import scoreopt as so
    >>> score = ScoreModel(init_mlp(np.random.default_rng(0)), so.ve())
    >>> score(np.zeros((3, 1)), 0.5).shape, score.process.name
    ((3, 1), 've(0.002, 80)')
    """

    def __init__(self, params, process, data_mean=0.0, data_var=1.0, preconditioning="edm"):
        self.params, self.process = params, check_process(process)
        self.data_mean, self.data_var, self.preconditioning = data_mean, data_var, preconditioning
        preconditioning_coefficients(1.0, 1.0, preconditioning)

    def __call__(self, x, t):
        return mlp_score(self.params, x, t, self.process, self.data_mean, self.data_var, self.preconditioning)


def score_model(params, process, data_mean=0.0, data_var=1.0, preconditioning="edm"):
    """The MLP as a plain score callable ``score(x, t)`` (a :class:`ScoreModel`).

    >>> import scoreopt as so
    >>> score_model(init_mlp(0), so.ve())(np.ones((2, 1)), 0.5).shape
    (2, 1)
    """
    return ScoreModel(params, process, data_mean, data_var, preconditioning)


# -- Denoising score matching on the schedule's levels, and Adam -----------------

def schedule_levels(ts, n, rng, process):
    """``n`` training times drawn uniformly from the ``T + 1`` levels of ``ts``: the paper's.

    >>> schedule_levels(np.array([0.0, 0.5, 1.0]), 4, np.random.default_rng(0), None).tolist()
    [1.0, 0.5, 0.5, 0.0]
    """
    return ts[rng.integers(0, len(ts), n)]


def uniform_times(ts, n, rng, process):
    """``n`` training times uniform on ``[t_min, t_max]`` (schedule-free).

    >>> import scoreopt as so
    >>> bool(np.all(uniform_times(None, 5, np.random.default_rng(0), so.vp_linear()) >= 1e-3))
    True
    """
    return rng.uniform(process.t_min, process.t_max, n)


LEVELS = {"levels": schedule_levels, "uniform": uniform_times}


class DSMBatch(NamedTuple):
    """A batch of the DSM loss with everything that does not depend on the parameters done."""
    net_input: np.ndarray   # (n, d + F): standardised noisy data and noise features
    target: np.ndarray      # (n, d): what F should output
    weight: np.ndarray      # (n, d): (c_out / nu)^2 (c_skip for "edm", 1 for "eps"), 0 where c_out is 0


def prepare_dsm(params, x0, t, eps, process, data_mean=0.0, data_var=1.0, preconditioning="edm"):
    """The DSM loss's batch for data ``x0`` (n, d), times ``t`` (n,) and noise ``eps`` (n, d).

    With ``y = x0 + nu eps`` and ``target = (x0 - mean - c_skip (y - mean)) / c_out`` (unit variance at every
    level for ``"edm"``), the loss ``||sigma S + eps||^2 = ||D - x0||^2 / nu^2`` (Vincent 2011) is
    ``sum_k weight_k (F - target)_k^2`` with ``weight = c_out^2 / nu^2``; a coordinate of variance 0 has
    ``c_out = 0`` and weight 0 (docs/derivations.md, 10).

    >>> import scoreopt as so
    >>> rng = np.random.default_rng(0)
    >>> batch = prepare_dsm(init_mlp(0), rng.standard_normal((8, 1)), np.full(8, 0.5), rng.standard_normal((8, 1)),
    ...                     so.ve())
    >>> batch.net_input.shape, batch.target.shape, float(prepared_dsm_loss(init_mlp(0), batch)) > 0
    ((8, 10), (8, 1), True)
    """
    nu = process.nsr(t)[:, None]
    y = x0 + nu * eps
    c_skip, c_out, c_in = preconditioning_coefficients(nu, data_var, preconditioning)
    c_out = np.broadcast_to(c_out, y.shape)
    stuck = c_out == 0
    target = np.where(stuck, 0.0, (x0 - data_mean - c_skip * (y - data_mean)) / np.where(stuck, 1.0, c_out))
    return DSMBatch(_network_input(params, c_in * (y - data_mean), process, t), target, (c_out / nu) ** 2)


def prepared_dsm_loss(params, batch):
    """``mean over rows of sum_k weight_k (F_theta - target)_k^2`` on a :class:`DSMBatch` (example:
    :func:`prepare_dsm`).

    >>> batch = DSMBatch(np.zeros((1, 10)), np.ones((1, 1)), np.full((1, 1), 0.5))
    >>> float(prepared_dsm_loss(init_mlp(0), batch))             # the output layer starts at zero
    0.5
    """
    return anp.mean(anp.sum(batch.weight * (_network(params, batch.net_input) - batch.target) ** 2, axis=1))


def dsm_loss(params, x0, process, ts, rng, *, levels="levels", data_mean=0.0, data_var=1.0, preconditioning="edm"):
    """Denoising score matching ``E ||sigma S_theta + eps||^2`` (Vincent 2011), ``t`` drawn per sample by
    ``levels`` (:func:`schedule_levels`, the paper's, by default; see ``LEVELS``); :func:`prepare_dsm`.

    >>> import scoreopt as so
    >>> x0 = np.random.default_rng(1).standard_normal((4000, 1))
    >>> loss = dsm_loss(init_mlp(0), x0, so.ve(), so.uniform_schedule(so.ve(), 10), rng=0)
    >>> bool(0.5 < float(loss) < 1.0)         # the Gaussian fit, exact here: the loss's floor E[c_skip]
    True
    """
    process, rng, x0 = check_process(process), as_rng(rng), check_data(x0)
    t = resolve(levels, LEVELS, "levels")(check_schedule(ts, process), len(x0), rng, process)
    batch = prepare_dsm(params, x0, t, rng.standard_normal(x0.shape), process, data_mean, data_var, preconditioning)
    return prepared_dsm_loss(params, batch)


class AdamState(NamedTuple):
    m: np.ndarray      # first-moment estimate
    v: np.ndarray      # second-moment estimate
    step: int          # updates taken


def adam_init(theta):
    """Zero moments for a flat parameter vector ``theta``.

    >>> adam_init(np.ones(3)).m.tolist()
    [0.0, 0.0, 0.0]
    """
    return AdamState(np.zeros_like(theta), np.zeros_like(theta), 0)


def adam_step(theta, grad, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam update (Kingma & Ba 2015); returns ``(theta, state)`` and changes nothing in place.

    >>> theta, state = adam_step(np.zeros(2), np.array([1.0, -1.0]), adam_init(np.zeros(2)), 0.1)
    >>> theta.round(6).tolist(), state.step
    ([-0.1, 0.1], 1)
    """
    step = state.step + 1
    m, v = b1 * state.m + (1 - b1) * grad, b2 * state.v + (1 - b2) * grad ** 2
    return theta - lr * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps), AdamState(m, v, step)


# -- Training with the online schedule: the paper's Algorithm 2 ------------------

class _OnlineSettings(NamedTuple):
    every: int = 50
    burn_in: int = 1000
    gamma: float = 0.05
    cost: object = "corrector"
    n_samples: int = 1000
    order: int = 2
    route: object = "grid"
    n_grid: int = 200


class OnlineSchedule(_OnlineSettings):
    """Settings of Algorithm 2's schedule update, checked at construction. After ``burn_in`` optimiser steps,
    every ``every`` steps, ``scoreopt.online_update`` finds a target schedule from the current model and
    ``n_samples`` fresh data samples and blends the schedule towards it by ``gamma``. ``route``: ``"grid"``
    (the default, ``scoreopt.grid_route``: Theorem 3.1 on ``n_grid`` levels), ``"intervals"``
    (``scoreopt.interval_route``, the paper's: the interval costs, ``cost`` of ``order``, through Algorithm 1;
    it degenerates on smooth data with few steps) or a route function, called with no options.

    >>> settings = OnlineSchedule(every=100, burn_in=500, gamma=0.1)
    >>> settings.route, settings.due(400), settings.due(600), settings.due(650)
    ('grid', False, True, False)
    """
    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args, **kwargs)
        check_int(self.every, "every", 1), check_int(self.burn_in, "burn_in", 0), check_gamma(self.gamma)
        check_int(self.n_samples, "n_samples", 2), check_int(self.n_grid, "n_grid", 2)
        check_positive(self.order, "order"), resolve(self.cost, COSTS, "cost")
        if resolve(self.route, ROUTES, "route") is grid_route and self.cost != "corrector":
            raise ValueError("`cost` must be 'corrector' with route 'grid'")
        return self

    def due(self, step):
        """Whether the update runs after optimiser step ``step``."""
        return step >= self.burn_in and (step - self.burn_in) % self.every == 0

    def update(self, model, process, ts, x0, rng):
        """Algorithm 2's steps 2-4 with these settings (``scoreopt.online_update``)."""
        route = resolve(self.route, ROUTES, "route")
        options = ({"n_grid": self.n_grid} if route is grid_route else
                   {"cost": self.cost, "order": self.order} if route is interval_route else {})
        return online_update(model, process, ts, x0, rng, gamma=self.gamma, route=route, **options)


class TrainingState(NamedTuple):
    """The state of a training run: what :func:`train` returns and takes back to continue; ``score(process)`` is
    the trained model as a score callable. ``history``: ``loss`` per step, and per online update its
    ``update_step``, ``Lambda``, and the ``schedules`` and ``costs`` before it."""
    params: list            # list of (W, b)
    ts: np.ndarray          # current schedule
    adam: AdamState
    step: int               # optimiser steps taken
    rng: np.random.Generator
    history: dict
    data_mean: np.ndarray   # input standardisation the model was trained with, (d,)
    data_var: np.ndarray
    run: dict = None        # what defines the run, recorded by a caller that saves it (None here)
    preconditioning: str = "edm"

    def score(self, process):
        """The trained model as a plain ``score(x, t)`` callable (a :class:`ScoreModel`)."""
        return ScoreModel(self.params, process, self.data_mean, self.data_var, self.preconditioning)


class TrainingDiverged(FloatingPointError):
    """Raised by :func:`train` when the loss or the parameters stop being finite, or the loss explodes."""


# The run stops (TrainingDiverged) when the loss exceeds this multiple of the first loss.
MAX_LOSS_RATIO = 1e3


def train(params, data, process, ts=None, *, rng, n_steps, batch_size=256, lr=1e-3, levels="levels",
          preconditioning="edm", online=None, callback=None, gradient=None):
    """Train an MLP score model by denoising score matching, adapting the schedule online: Algorithm 2.

    1. a DSM step with Adam, training times drawn from the levels of the current ``ts`` (``levels``);
    2-4. with an :class:`OnlineSchedule`, every few steps after a burn-in, ``scoreopt.online_update``.

    ``params``: from :func:`init_mlp`, or a :class:`TrainingState` to continue. ``data``: a target
    (anything with ``sample(n, rng)``) or samples ``(N, d)``; a constant coordinate and a single row
    are valid. ``ts``: the initial schedule (may be None with
    ``levels="uniform"`` and no ``online``). ``rng``: the only source of randomness. ``lr``: Adam's step,
    decayed by a cosine to 0 over ``n_steps``, or a function ``lr(step, n_steps)``. ``levels``:
    ``levels(ts, n, rng, process) -> t`` or a name of ``LEVELS``. ``preconditioning``: ``"edm"`` or
    ``"eps"``. ``callback(step, n_steps, info)`` after every step, ``info`` with ``loss``, ``ts``,
    ``params``, ``elapsed``, the last ``Lambda`` and ``state()``, the :class:`TrainingState` (to save
    it); a callback may raise ``StopIteration`` to end the run early. Returns the final
    :class:`TrainingState`; raises :class:`TrainingDiverged` naming the step if the loss or the
    parameters stop being finite or the loss exceeds ``MAX_LOSS_RATIO`` times the first. ``gradient(params,
    batch) -> (loss, grad)``: autograd's ``value_and_grad(prepared_dsm_loss)`` by default.

    >>> import scoreopt as so
    >>> state = train(init_mlp(0, width=16), Gaussian([0.0], [0.25]), so.ve(), so.uniform_schedule(so.ve(), 8),
    ...               rng=0, n_steps=20, batch_size=64, online=OnlineSchedule(every=10, burn_in=10, n_samples=100))
    >>> state.step, len(state.history["loss"]), len(state.history["update_step"])
    (20, 20, 2)
    """
    process, ts, draw_t = _train_iv(params, process, ts, n_steps, batch_size, lr, levels, preconditioning, online,
                                    callback)
    resumed = isinstance(params, TrainingState)
    moments = (params.data_mean, params.data_var) if resumed else _data_moments(data, params[-1][0].shape[1])
    draw, rate = _data_sampler(data), lr if callable(lr) else partial(_cosine_decay, float(lr))
    state = params if resumed else _fresh_state(params, ts, rng, moments, preconditioning)
    theta, unflatten = _flatten(state.params)
    ts, adam, step, rng, history = state.ts, state.adam, state.step, as_rng(state.rng), state.history
    losses, start = list(history["loss"]), time.perf_counter()
    loss_and_grad = value_and_grad(prepared_dsm_loss) if gradient is None else check_callable(
        gradient, "gradient", "gradient(params, batch) -> (loss, grad)")
    now = lambda: TrainingState(unflatten(theta), ts, adam, step, rng, dict(history, loss=np.array(losses)),
                                *moments, state.run, preconditioning)
    while step < n_steps:
        # 1. DSM step on the score model, levels drawn from the current schedule
        x0 = draw(batch_size, rng)
        batch = prepare_dsm(state.params, x0, draw_t(ts, batch_size, rng, process), rng.standard_normal(x0.shape),
                            process, *moments, preconditioning)
        loss, grad = loss_and_grad(unflatten(theta), batch)
        theta_new, adam = adam_step(theta, _flatten(grad)[0], adam, rate(step, n_steps))
        _check_divergence(step + 1, loss, losses[0] if losses else loss, theta_new)
        theta, step = theta_new, step + 1
        losses.append(float(loss))
        # 2-4. Algorithm 2 after the burn-in: costs of ts with the model fixed, then the blend
        if online is not None and online.due(step):
            model = ScoreModel(unflatten(theta), process, *moments, preconditioning)
            update = online.update(model, process, ts, draw(online.n_samples, rng), rng)
            history, ts = _record_update(history, step, ts, update), update.ts
        if callback is not None:
            try:
                callback(step, n_steps, {"loss": float(loss), "ts": ts, "params": unflatten(theta), "state": now,
                                         "elapsed": time.perf_counter() - start,
                                         "Lambda": history["Lambda"][-1] if len(history["Lambda"]) else None})
            except StopIteration:
                break
    return now()


def _train_iv(params, process, ts, n_steps, batch_size, lr, levels, preconditioning, online, callback):
    """Check :func:`train`'s arguments once; returns the process, the schedule and the level function."""
    process, draw_t = check_process(process), resolve(levels, LEVELS, "levels")
    if not check_real(MAX_LOSS_RATIO, "models.MAX_LOSS_RATIO") > 1:
        raise ValueError(f"`models.MAX_LOSS_RATIO` must be above 1 (a loss ratio that stops the run), got "
                         f"{MAX_LOSS_RATIO}")
    if ts is None:
        if draw_t is not uniform_times or online is not None:
            raise ValueError("`ts` is needed unless `levels='uniform'` without an `online` update")
        ts = np.array([process.t_min, process.t_max])
    ts, n_steps = check_schedule(ts, process), check_int(n_steps, "n_steps", 1)
    check_int(batch_size, "batch_size", 1)
    if not callable(lr):
        check_positive(lr, "lr")
    preconditioning_coefficients(1.0, 1.0, preconditioning)
    if online is not None and not isinstance(online, OnlineSchedule):
        raise TypeError("`online` must be an OnlineSchedule or None")
    if callback is not None:
        check_callable(callback, "callback", "callback(step, n_steps, info)")
    if isinstance(params, TrainingState) and params.step > n_steps:
        raise ValueError(f"`params` is a training state at step {params.step}, beyond `n_steps` = {n_steps}")
    return process, ts, draw_t


def _flatten(params):
    """``(theta, unflatten)`` for a list of ``(W, b)``: autograd's ``flatten`` in plain NumPy, the same order, and
    without its tracing (which cost a fifth of a training step); ``unflatten`` gives views of ``theta``."""
    shapes = [a.shape for layer in params for a in layer]
    ends = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]

    def unflatten(theta):
        parts = [a.reshape(shape) for a, shape in zip(np.split(theta, ends), shapes)]
        return [tuple(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    return np.concatenate([np.ravel(a) for layer in params for a in layer]), unflatten


def _cosine_decay(lr, step, n_steps):
    return lr * (0.5 * (1 + np.cos(np.pi * step / n_steps)))


def _fresh_state(params, ts, rng, moments, preconditioning):
    empty = {"loss": np.zeros(0), "update_step": np.zeros(0, int), "Lambda": np.zeros(0),
             "schedules": np.zeros((0, len(ts))), "costs": np.zeros((0, len(ts) - 1))}
    return TrainingState(params, ts, adam_init(flatten(params)[0]), 0, as_rng(rng), empty, *moments, None,
                         preconditioning)


def _data_moments(data, dim):
    """Per-coordinate mean and variance for the preconditioning: exact for a target, else from the samples
    (a target with ``sample`` only is sampled 10,000 times with a private generator, so the training's own
    random stream is untouched). A variance of 0 (a constant coordinate) is valid; a single row too."""
    if hasattr(data, "mean") and hasattr(data, "variance"):
        mean, var = np.asarray(data.mean(), float), np.asarray(data.variance(), float)
    else:
        x = check_data(data.sample(10_000, np.random.default_rng(0)) if hasattr(data, "sample") else data, "data")
        mean, var = x.mean(axis=0), x.var(axis=0)
    if mean.shape != (dim,):
        raise ValueError(f"`data` has {mean.shape[0] if mean.ndim else 1} columns but `params` model {dim}")
    bad = np.flatnonzero(~np.isfinite(mean) | ~np.isfinite(var) | (var < 0))
    if len(bad):
        raise ValueError(f"the mean and variance of `data` must be finite (variance >= 0); coordinate {bad[0]} has "
                         f"mean {mean[bad[0]]} and variance {var[bad[0]]}")
    return mean, var


def _data_sampler(data):
    if hasattr(data, "sample"):
        return lambda n, rng: data.sample(n, rng)
    data = check_data(data, "data")
    return lambda n, rng: data[rng.integers(0, len(data), n)]


def _check_divergence(step, loss, first_loss, theta):
    """Raise :class:`TrainingDiverged` naming ``step`` if the run has stopped being sound."""
    problem = ("the loss is not finite" if not np.isfinite(loss) else
               f"the loss exceeds {MAX_LOSS_RATIO:g} x the first loss ({first_loss:.6g})"
               if loss > MAX_LOSS_RATIO * first_loss else
               "the parameters are not finite" if not np.all(np.isfinite(theta)) else None)
    if problem:
        raise TrainingDiverged(f"training diverged at step {step}: {problem} (loss = {loss:.6g})")


def _record_update(history, step, ts, update):
    """The history with one online update appended (the schedule and costs before it)."""
    return dict(history, update_step=np.append(history["update_step"], step),
                Lambda=np.append(history["Lambda"], update.length), schedules=np.vstack([history["schedules"], ts]),
                costs=np.vstack([history["costs"], update.costs]))


# ================================================================================
# PART II. DERIVED OR ADDED HERE
# ================================================================================

import ctypes                                                              # noqa: E402
import io                                                                  # noqa: E402
import json                                                                # noqa: E402
import os                                                                  # noqa: E402
import tempfile                                                            # noqa: E402
from functools import wraps                                                # noqa: E402

import scoreopt                                                             # noqa: E402
from scoreopt import check_data_scale, read_regular_file, time_from_nsr, write_atomically  # noqa: E402

__all__ += ["between_levels", "lognormal_levels", "ALL_LEVELS", "dsm_loss_and_grad", "retain_freed_memory",
            "save_checkpoint", "load_checkpoint", "checkpointer", "resume"]


def between_levels(ts, n, rng, process):
    """``n`` training times from the schedule's density: a step of ``ts`` uniformly, then a time uniformly in
    it (continuous times, as dense as the schedule's levels; what ``examples/cantor.py`` trains on)."""
    i = rng.integers(0, len(ts) - 1, n)
    return ts[i] + rng.uniform(size=n) * (ts[i + 1] - ts[i])


def lognormal_levels(ts, n, rng, process, p_mean=-1.2, p_std=1.2):
    """EDM's training levels, ``log nu ~ N(p_mean, p_std^2)`` (Karras et al. 2022, Table 1; their defaults for
    images), clipped to the process range and mapped to ``t``."""
    nu = np.clip(np.exp(p_mean + p_std * rng.standard_normal(n)), *nsr_range(process))
    return time_from_nsr(process, nu)


# Every name of a level sampler: Part I's (``LEVELS``) and these. Part I's ``dsm_loss`` and ``train`` take the
# functions; this part's ``train`` and ``resume`` also take these names.
ALL_LEVELS = {**LEVELS, "between": between_levels, "lognormal": lognormal_levels}


# -- Training that records what defines the run, for checkpoints and resume ------

def _checked_levels(draw_t):
    """A user's ``levels`` function whose every draw is checked: ``n`` finite real times inside the process's
    range, or a ``ValueError`` naming it."""
    @wraps(draw_t)
    def levels(ts, n, rng, process):
        t = np.asarray(draw_t(ts, n, rng, process))
        if t.shape != (n,) or t.dtype.kind not in "fiu" or not np.all((t >= process.t_min) & (t <= process.t_max)):
            raise ValueError(f"`levels` {getattr(draw_t, '__name__', '')} must return {n} real times in [t_min, t_max]"
                             f" = [{process.t_min}, {process.t_max}]; it returned shape {t.shape}, {t.dtype}"
                             + (f", from {t.min():.6g} to {t.max():.6g}" if t.size and t.dtype.kind in "fiu" else ""))
        return t
    return levels


_paper_train = train


@wraps(_paper_train)
def train(params, data, process, ts=None, *, levels="levels", **options):
    # Part I's train with the level names of ALL_LEVELS, and the run's definition recorded in every state that
    # it returns or shows a callback (a checkpoint saves it; resume compares it).
    levels = resolve(levels, ALL_LEVELS, "levels")
    levels = levels if levels in ALL_LEVELS.values() else _checked_levels(levels)      # a user's: every draw checked
    checked = _train_iv(params, process, ts, options.get("n_steps"), options.get("batch_size", 256),
                        options.get("lr", 1e-3), levels, options.get("preconditioning", "edm"), options.get("online"),
                        options.get("callback"))
    run = _run_definition(params, *checked[:2], options.get("n_steps"), options.get("batch_size", 256),
                          options.get("lr", 1e-3), levels, options.get("preconditioning", "edm"), options.get("online"))
    moments = (params.data_mean, params.data_var) if isinstance(params, TrainingState) else \
        _data_moments(data, params[-1][0].shape[1])
    check_data_scale(moments[0] ** 2 + moments[1], checked[0])         # data the process never covers: warned of
    callback = options.get("callback")
    if callback is not None:
        options["callback"] = lambda step, n_steps, info: callback(
            step, n_steps, dict(info, state=lambda: info["state"]()._replace(run=run)))
    if isinstance(params, TrainingState):
        params = params._replace(run=run)
    return _paper_train(params, data, process, ts, levels=levels, **options)._replace(run=run)


train.__doc__ = _paper_train.__doc__ + """
    Part II: ``levels`` may also be a name of ``ALL_LEVELS``; every state (returned, or ``info["state"]()``)
    records what defines the run in ``run``, which a checkpoint saves and :func:`resume` compares.
    """


def _run_definition(params, process, ts, n_steps, batch_size, lr, draw_t, preconditioning, online):
    """What defines a run, as plain JSON values: a checkpoint records it and :func:`resume` compares it."""
    layers = params.params if isinstance(params, TrainingState) else params
    return {"layer_shapes": [list(W.shape) for W, _ in layers], "process": process.name,
            "t_min": float(process.t_min), "t_max": float(process.t_max), "initial_ts": [float(t) for t in ts],
            "n_steps": int(n_steps), "lr": getattr(lr, "__name__", lr), "levels": draw_t.__name__,
            "preconditioning": preconditioning, "batch_size": batch_size,
            "online": None if online is None else {k: getattr(v, "__name__", v) for k, v in online._asdict().items()}}



def dsm_loss_and_grad(params, batch):
    """``prepared_dsm_loss`` and its gradient in ``params`` by hand-written backpropagation: what
    ``autograd.value_and_grad(prepared_dsm_loss)`` gives, to rounding (tested), at about half its cost for the
    small MLPs here, whose steps are mostly autograd's bookkeeping. A named speed trick, opt-in:
    ``train(..., gradient=dsm_loss_and_grad)`` (``examples/cantor.py`` uses it).

    >>> batch = DSMBatch(np.ones((4, 10)), np.ones((4, 1)), np.full((4, 1), 0.5))
    >>> loss, grad = dsm_loss_and_grad(init_mlp(0), batch)
    >>> auto_loss, auto_grad = value_and_grad(prepared_dsm_loss)(init_mlp(0), batch)
    >>> same = [np.allclose(a, b, rtol=1e-12, atol=0) for g, h in zip(grad, auto_grad) for a, b in zip(g, h)]
    >>> bool(np.isclose(loss, auto_loss, rtol=1e-14)), all(same)
    (True, True)
    """
    hs, pre = [batch.net_input], []
    for W, b in params[:-1]:                                   # forward, keeping each layer's input and pre-activation
        pre.append(hs[-1] @ W + b)
        hs.append(silu(pre[-1]))
    residual = hs[-1] @ params[-1][0] + params[-1][1] - batch.target
    n = len(residual)
    loss = np.mean(np.sum(batch.weight * residual ** 2, axis=1))
    delta = 2.0 * batch.weight * residual / n                  # d loss / d output
    grads = []
    for k in range(len(params) - 1, -1, -1):                   # backward
        grads.append((hs[k].T @ delta, np.sum(delta, axis=0)))
        if k:
            delta = (delta @ params[k][0].T) * _silu_slope(pre[k - 1])
    return loss, grads[::-1]


def retain_freed_memory():
    """Ask glibc's allocator to keep freed memory for reuse; returns whether it applied. Opt-in and
    process-wide, never called by the library: a training step's large temporaries are otherwise paged in
    afresh every step (measured: about 2 times slower for a 3x128 batch-1024 step). Raises
    ``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to 512 MiB; ``False`` where libc is not glibc.

    >>> if __name__ == "__main__":       # in a script, before its work (examples/cantor.py); never in a library
    ...     retain_freed_memory()
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 512 << 20))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


# -- Checkpoints: .npz without pickle, written atomically, never one their loader refuses --

CHECKPOINT_VERSION = 4
_CHECKPOINT_KEYS = ("version", "layer_shapes", "theta", "ts", "adam_m", "adam_v", "adam_step", "step", "rng_state",
                    "loss", "update_step", "Lambda", "schedules", "costs", "data_mean", "data_var", "run",
                    "preconditioning")


def save_checkpoint(path, state):
    """Save a :class:`TrainingState` to ``path`` (.npz, no pickle): parameters, schedule, Adam state, step, RNG
    state, history, the preconditioning and its data moments, the run's definition. The file is first checked
    by :func:`load_checkpoint`'s rules (a state it would refuse, e.g. NaN parameters or a schedule that does
    not increase, is a ``ValueError`` naming the field, and ``path`` is left as it was), then written through
    ``scoreopt.write_atomically``: an interrupted save never corrupts the previous checkpoint.

    >>> import os, tempfile, scoreopt as so
    >>> state = train(init_mlp(0, width=8, depth=1), Gaussian([0.0], [0.25]), so.ve(), so.uniform_schedule(so.ve(), 4),
    ...               rng=0, n_steps=3, batch_size=8)
    >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
    >>> save_checkpoint(path, state)
    >>> load_checkpoint(path).step
    3
    """
    if not isinstance(state, TrainingState):
        raise TypeError(f"`state` must be a models.TrainingState, got {type(state).__name__}")
    buffer = io.BytesIO()
    try:
        np.savez(buffer, **_arrays_of(state))
        _state_from_arrays(np.load(io.BytesIO(buffer.getvalue()), allow_pickle=False))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"cannot save this training state to `{path}`: its loader would refuse it: {err}") from None
    write_atomically(path, buffer.getvalue())


def _arrays_of(state):
    params, history, dim = state.params, state.history or {}, state.params[-1][0].shape[1]
    T = len(state.ts) - 1
    arrays = {"version": np.array(CHECKPOINT_VERSION), "layer_shapes": np.array([W.shape for W, _ in params]),
              "theta": flatten(params)[0], "ts": np.asarray(state.ts, dtype=float), "adam_m": state.adam.m,
              "adam_v": state.adam.v, "adam_step": np.array(state.adam.step), "step": np.array(state.step),
              "rng_state": np.array(json.dumps(as_rng(state.rng).bit_generator.state, default=lambda v: v.tolist())),
              "data_mean": np.broadcast_to(np.asarray(state.data_mean, float), (dim,)),
              "data_var": np.broadcast_to(np.asarray(state.data_var, float), (dim,)),
              "run": np.array(json.dumps(state.run or {})), "preconditioning": np.array(state.preconditioning)}
    for key, empty in (("loss", (0,)), ("update_step", (0,)), ("Lambda", (0,)), ("schedules", (0, T + 1)),
                       ("costs", (0, T))):
        arrays[key] = np.asarray(history.get(key, np.zeros(empty)), dtype=int if key == "update_step" else float)
    return arrays


def load_checkpoint(path):
    """Load a checkpoint written by :func:`save_checkpoint` as a :class:`TrainingState`. A missing, truncated
    or corrupted file, or one whose fields break a rule (parameters, moments or Adam state not finite, a
    schedule that does not increase, an unknown preconditioning or version), is a ``ValueError`` naming the
    path and the field. Checkpoints of versions 2 and 3 load too (version 2 as ``preconditioning="eps"``).

    >>> import os, tempfile, scoreopt as so
    >>> state = train(init_mlp(0, width=8, depth=1), Gaussian([0.0], [0.25]), so.ve(), so.uniform_schedule(so.ve(), 4),
    ...               rng=0, n_steps=3, batch_size=8)
    >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
    >>> save_checkpoint(path, state)
    >>> back = load_checkpoint(path)
    >>> back.step, bool(np.array_equal(back.ts, state.ts)), back.run["n_steps"]
    (3, True, 3)
    """
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at `{path}`")
    try:
        content = read_regular_file(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"`{path}` is not a readable checkpoint: {err}") from None
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as f:
            if sum(info.file_size for info in f.zip.infolist()) > scoreopt.MAX_FILE_BYTES:
                raise ValueError(f"its arrays would take more than {scoreopt.MAX_FILE_BYTES:,} bytes "
                                 "(scoreopt.MAX_FILE_BYTES)")
            return _state_from_arrays(f)
    except ValueError as err:
        raise ValueError(f"`{path}` is not a valid checkpoint: {err}") from None
    except Exception as err:   # zipfile.BadZipFile, EOFError, KeyError, ...
        raise ValueError(f"`{path}` is not a readable checkpoint (truncated or corrupted): "
                         f"{type(err).__name__}: {err}") from err


def _state_from_arrays(f):
    data = {k: f[k] for k in _CHECKPOINT_KEYS if k in f.files or k != "preconditioning"}
    version = _integer_field(data, "version")
    if version not in (2, 3, CHECKPOINT_VERSION):
        raise ValueError(f"checkpoint version {version}, expected 2 to {CHECKPOINT_VERSION}")
    preconditioning = _text_field(data, "preconditioning") if version >= 3 else "eps"
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"field `preconditioning`: unknown {preconditioning!r}")
    shapes = _layer_shapes(data["layer_shapes"])
    for key, ndim in (("theta", 1), ("ts", 1), ("adam_m", 1), ("adam_v", 1), ("data_mean", 1), ("data_var", 1),
                      ("loss", 1), ("Lambda", 1), ("schedules", 2), ("costs", 2)):
        _real_field(data, key, ndim)
    theta, sizes = data["theta"], [m * n + n for m, n in shapes]
    if theta.shape != (sum(sizes),):
        raise ValueError("field `theta`: the parameters do not match their recorded shapes `layer_shapes`")
    if data["adam_m"].shape != theta.shape or data["adam_v"].shape != theta.shape or np.any(data["adam_v"] < 0):
        raise ValueError("fields `adam_m`, `adam_v`: Adam's moments must match the parameters (`adam_v` >= 0)")
    if np.any(data["data_var"] < 0) or not data["data_mean"].shape == data["data_var"].shape == (shapes[-1][1],):
        raise ValueError(f"fields `data_mean`, `data_var`: one per coordinate ({shapes[-1][1]}, the model's "
                         "output), the variances >= 0")
    try:
        ts = check_schedule(data["ts"], name="ts")
    except (ValueError, TypeError) as err:
        raise ValueError(f"field {err}") from None
    run = _json_field(data, "run", dict)
    step, n_steps = _integer_field(data, "step"), run.get("n_steps")
    if not 0 <= step <= (n_steps if isinstance(n_steps, int) and not isinstance(n_steps, bool) else MAX_STEP):
        raise ValueError(f"field `step`: {step} is not between 0 and the run's `n_steps` ({n_steps})")
    if not 0 <= _integer_field(data, "adam_step") <= step:
        raise ValueError(f"field `adam_step`: {int(data['adam_step'])} is not between 0 and `step` ({step})")
    if len(data["loss"]) > step:
        raise ValueError(f"field `loss`: {len(data['loss'])} values for {step} steps")
    _check_history(data, ts, step)
    params, i = [], 0
    for (m, n), size in zip(shapes, sizes):
        params.append((theta[i:i + m * n].reshape(m, n), theta[i + m * n:i + size].copy()))
        i += size
    history = {k: data[k] for k in ("loss", "update_step", "Lambda", "schedules", "costs")}
    return TrainingState(params, ts, AdamState(data["adam_m"], data["adam_v"], int(data["adam_step"])), step,
                         _rng_field(data), history, data["data_mean"], data["data_var"], run, preconditioning)


MAX_STEP = 2 ** 53           # a checkpoint's step beyond this is refused (a float64 no longer counts it exactly)
BIT_GENERATORS = {"PCG64": np.random.PCG64, "Philox": np.random.Philox, "SFC64": np.random.SFC64,
                  "MT19937": np.random.MT19937}          # the only ones a checkpoint may name


def _integer_field(data, key):
    value = data[key]
    if value.shape != () or value.dtype.kind not in "iu" or not 0 <= int(value) <= MAX_STEP:
        raise ValueError(f"field `{key}` must be an integer from 0 to 2**53, got {value.dtype} {value.shape}")
    return int(value)


def _real_field(data, key, ndim):
    value = data[key]
    if value.dtype.kind != "f" or value.ndim != ndim:
        raise ValueError(f"field `{key}` must be a {ndim}-D array of floats, got {value.dtype} {value.shape}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"field `{key}` is not finite")


def _text_field(data, key):
    value = data[key]
    if value.shape != () or value.dtype.kind != "U":
        raise ValueError(f"field `{key}` must be a string, got {value.dtype} {value.shape}")
    return str(value)


def _json_field(data, key, kind):
    try:
        value = json.loads(_text_field(data, key))
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"field `{key}` is not JSON: {err}") from None
    if not isinstance(value, kind):
        raise ValueError(f"field `{key}` must hold a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _layer_shapes(shapes):
    """``layer_shapes``: one (inputs, outputs) pair of positive integers per layer, each layer's outputs the
    next one's inputs."""
    if shapes.dtype.kind not in "iu" or shapes.ndim != 2 or shapes.shape[1:] != (2,) or len(shapes) < 1 or np.any(
            shapes < 1) or np.any(shapes[1:, 0] != shapes[:-1, 1]) or np.any(shapes > MAX_STEP):
        raise ValueError("field `layer_shapes` must list (inputs, outputs) pairs of positive integers, each layer's "
                         "outputs the next one's inputs")
    return [(int(m), int(n)) for m, n in shapes]


def _check_history(data, ts, step):
    """The online updates' history: one step (increasing, within the run), Lambda (>= 0), schedule and costs
    per update."""
    update_step, n = data["update_step"], len(data["update_step"])
    if update_step.dtype.kind not in "iu" or update_step.ndim != 1 or np.any(update_step < 1) or np.any(
            update_step > step) or np.any(np.diff(update_step) <= 0):
        raise ValueError(f"field `update_step` must be increasing integer steps from 1 to `step` ({step})")
    if data["schedules"].shape != (n, len(ts)) or data["costs"].shape != (n, len(ts) - 1) or data["Lambda"].shape != (
            n,) or np.any(data["Lambda"] < 0) or np.any(data["costs"] < 0):
        raise ValueError(f"fields `Lambda`, `schedules`, `costs`: one per update ({n}), rows of {len(ts)} and "
                         f"{len(ts) - 1} values, `Lambda` and `costs` >= 0")


def _rng_field(data):
    """The generator from ``rng_state``: its bit generator one of ``BIT_GENERATORS`` (a file never names code
    to run), its state as NumPy checks it."""
    state = _json_field(data, "rng_state", dict)
    kind = state.get("bit_generator")
    if not isinstance(kind, str) or kind not in BIT_GENERATORS:
        raise ValueError(f"field `rng_state`: the bit generator must be one of {sorted(BIT_GENERATORS)}, got "
                         f"{str(kind)[:40]!r}")
    rng = np.random.Generator(BIT_GENERATORS[kind]())
    try:
        rng.bit_generator.state = state
    except (ValueError, TypeError, KeyError, OverflowError) as err:
        raise ValueError(f"field `rng_state` is not a valid {kind} state: {type(err).__name__}: {err}") from None
    return rng


def checkpointer(path, every=1000, callback=None):
    """A :func:`train` callback that saves the run to ``path`` every ``every`` steps and at the last step
    (:func:`save_checkpoint`), then calls ``callback`` if given. The folder is checked now: it must exist and
    take a file. A failed save (a full disk) is an ``OSError`` naming the step and the last good checkpoint,
    which is intact; :func:`resume` continues from it.

    >>> import os, tempfile, scoreopt as so
    >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
    >>> state = train(init_mlp(0, width=8, depth=1), Gaussian([0.0], [0.25]), so.ve(), so.uniform_schedule(so.ve(), 4),
    ...               rng=0, n_steps=4, batch_size=8, callback=checkpointer(path, every=2))
    >>> load_checkpoint(path).step
    4
    """
    every = check_int(every, "every", 1)
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"`path`: the folder `{folder}` does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"`path`: cannot write in `{folder}`: {err}") from err
    saved = [load_checkpoint(path).step if os.path.exists(path) else None]     # a run resumed from it

    def save(step, n_steps, info):
        if step % every == 0 or step == n_steps:
            try:
                save_checkpoint(path, info["state"]())
            except OSError as err:
                kept = (f"the last good checkpoint `{path}` (step {saved[0]}) is intact; the run can resume from "
                        "it with models.resume" if saved[0] is not None else "no checkpoint had been written yet")
                raise OSError(err.errno, f"could not save the checkpoint at step {step}: {err.strerror}; {kept}") \
                    from err
            saved[0] = step
        if callback is not None:
            callback(step, n_steps, info)
    return save


def resume(path, params, data, process, ts=None, *, allow_changes=(), **options):
    """:func:`train` continued from the checkpoint at ``path`` if there is one, else from ``params``: the same
    arguments as ``train`` (pass ``callback=checkpointer(path, ...)`` to keep saving). A checkpoint of another
    run (architecture, process, initial schedule, ``n_steps``, ``lr``, ``levels``, ``preconditioning``,
    ``batch_size``, ``online``) is refused, listing what differs, unless named in ``allow_changes`` (a name or
    a sequence of names, e.g. ``"n_steps"`` to extend a run). A resumed run gives the same parameters, bit for
    bit, as an uninterrupted one.

    >>> import os, tempfile, scoreopt as so
    >>> path, p = os.path.join(tempfile.mkdtemp(), "run.npz"), so.ve()
    >>> run = lambda n_steps, **kw: resume(path, init_mlp(0, width=8, depth=1), Gaussian([0.0], [0.25]), p,
    ...                                    so.uniform_schedule(p, 4), rng=0, n_steps=n_steps, batch_size=8,
    ...                                    callback=checkpointer(path, every=1), **kw)
    >>> run(3).step, run(6, allow_changes="n_steps").step                 # the second continues the first
    (3, 6)
    """
    if not os.path.exists(path):
        return train(params, data, process, ts, **options)
    saved = load_checkpoint(path)
    allow = {allow_changes} if isinstance(allow_changes, str) else set(allow_changes)
    settings = [options.get("n_steps"), options.get("batch_size", 256), options.get("lr", 1e-3)]
    preconditioning, online = options.get("preconditioning", "edm"), options.get("online")
    process, ts, draw_t = _train_iv(params, process, ts, *settings,
                                    resolve(options.get("levels", "levels"), ALL_LEVELS, "levels"), preconditioning,
                                    online, options.get("callback"))
    run = _run_definition(params, process, ts, *settings, draw_t, preconditioning, online)
    unknown = allow - set(run)
    if unknown:
        raise ValueError(f"`allow_changes` names unknown settings {sorted(unknown)}; known: {sorted(run)}")
    differ = [f"{k}: saved {saved.run.get(k)!r}, now {v!r}" for k, v in run.items()
              if k not in allow and saved.run.get(k) != v]
    if differ:
        raise ValueError(f"`{path}` belongs to another run; it differs in " + "; ".join(differ)
                         + " (pass `allow_changes` to accept a change on purpose)")
    return train(saved._replace(run=run), data, process, ts, **options)
