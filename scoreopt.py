"""Score-optimal diffusion schedules.

Reference implementation of C. Williams, A. Campbell, A. Doucet, S. Syed,
*Score-Optimal Diffusion Schedules*, NeurIPS 2024 (arXiv:2412.07877): the cost of
moving samples between noise levels, the path length it induces, and the schedule
that spends equal cost on every step.

The file has two parts. **Part I, the paper**, in the paper's order: processes and
baseline schedules; the corrector and predictor costs; the local cost delta_c; the
cumulative cost and its inversion, the optimal schedule and Algorithm 1; the blend
and Algorithm 2. **Part II, derived here** (not in the paper; the derivations are in
``docs/derivations.md``): Gaussian closed forms, the equal-cost fixed point, the
budgeted and parallel dense-grid estimator with its error bars, adapters and export
for a user's model, the schedule-map file, a command line. Validation helpers and
small utilities close the file; every public function checks its arguments once, at
the top, and the math below works on checked values.

Conventions (stated once): time ``t`` runs over ``[t_min, t_max]``; ``t = 0`` is
the data end and ``t = 1`` the Gaussian end. A *schedule* ``ts`` is a 1-D float64
array of ``T + 1`` strictly increasing times with ``ts[0] == t_min`` and
``ts[-1] == t_max`` exactly; sampling walks it backwards. Marginals are
``x_t = s(t) x_0 + sigma(t) eps``. A score is any callable ``score(x, t)`` with
``x`` of shape ``(n, d)`` and ``t`` a float (or an array ``(n,)``, one time per row,
where a function says so) returning ``(n, d)``.

Symbols (code name: meaning):

    s, sigma            signal scale and noise std of the marginal
    drift, diffusion_sq f = s'/s and g^2 = 2 sigma sigma' - 2 f sigma^2
    nsr, nu             nu = sigma / s, the noise-to-signal ratio (EDM's "sigma")
    velocity            v(t), corrector speed, default v = sigma
    cost                L(t, t'), incremental cost of one step
    local_cost, delta   delta(t), L(t, t + h) = delta(t) h^2 + O(h^3)
    Lambda, length      cumulative length Lambda(t) = int sqrt(delta), total length
    energy              E = int delta(phi) phi'^2 du of a schedule generator phi
    gamma               blend rate of the online update

Vocabulary (one word per idea, in every module): ``x0`` data samples ``(n, d)``;
``x_T`` the sampler's starting batch; ``t_cur`` the noisier and ``t_next`` the
cleaner end of one step (``t_next < t_cur``); ``ts`` a schedule; ``T`` its number of
steps; ``rng`` a ``numpy.random.Generator`` or an int seed; ``cost`` a function
``cost(score, process, t_cur, t_next, x0, rng, **options) -> Estimate``; ``step`` a
sampler step ``step(score, process, x, t_cur, t_next, rng) -> (x, nfe)``;
``callback(done, total, info)`` progress of a long call; every result with several
values is a NamedTuple.
"""

import argparse
import json
import math
import os
import pickle
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from functools import partial
from importlib.metadata import version as package_version
from typing import Callable, NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad, make_jvp
from autograd.tracer import getval
from scipy.interpolate import PchipInterpolator
from scipy.stats import t as student_t

__all__ = [
    # Part I: the paper
    "Process", "ve", "vp_linear", "vp_cosine", "nsr", "time_from_nsr",
    "uniform_schedule", "edm_schedule", "loglinear_schedule", "cosine_schedule", "arctan_schedule",
    "baseline_schedules",
    "Estimate", "corrector_cost", "ddim_coefficients", "predictor_cost",
    "local_cost", "central_difference", "forward_mode",
    "cumulative_cost", "optimal_schedule", "update_schedule", "path_length", "path_energy",
    "blend", "OnlineUpdate", "online_update", "interval_route",
    # Part II: derived here
    "gaussian_local_cost", "gaussian_corrector_cost", "gaussian_predictor_cost",
    "interval_costs", "EqualCostResult", "equal_cost_schedule", "iterate_schedule",
    "ScheduleMap", "estimate_schedule_map", "grid_route",
    "flow_matching", "process_from_alphas_cumprod", "to_timesteps", "to_sigmas",
    "score_from_denoiser", "score_from_eps", "score_from_v", "score_from_flow", "rowwise_score",
    "load_schedule_map", "main",
    # validation and utilities, used by sampler.py and models.py too
    "ScoreEvaluationError", "as_rng", "check_schedule", "check_data", "check_process", "check_int",
    "check_real", "check_positive", "check_bool", "check_callable", "check_step_times", "as_real_array",
    "checked_score",
    "noised", "mean_stderr", "write_atomically", "progress_printer",
]


# ================================================================================
# PART I. THE PAPER
# ================================================================================

# --------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------

class Process(NamedTuple):
    """A forward noising process with marginals ``x_t = s(t) x_0 + sigma(t) eps``.

    ``s`` and ``sigma`` are functions of ``t`` (scalar or array) written with
    ``autograd.numpy`` so that everything below can be differentiated in ``t``.
    The forward SDE ``dX = f X dt + g dW`` with ``f = s'/s`` and
    ``g^2 = 2 sigma sigma' - 2 f sigma^2`` has exactly these marginals. The built-in
    processes hold module-level functions (``functools.partial``), so they pickle.
    """
    s: Callable
    sigma: Callable
    t_min: float
    t_max: float
    name: str = "process"
    n_timesteps: int = 0     # a discrete-time model's table length (process_from_alphas_cumprod), else 0

    def nsr(self, t):
        """Noise-to-signal ratio ``nu(t) = sigma(t) / s(t)``."""
        return self.sigma(t) / self.s(t)

    def drift(self, t):
        """``f(t) = s'(t) / s(t)`` (autograd-differentiable in ``t``)."""
        return elementwise_grad(self.s)(t) / self.s(t)

    def diffusion_sq(self, t):
        """``g(t)^2 = 2 sigma sigma' - 2 f sigma^2`` (autograd-differentiable)."""
        sigma = self.sigma(t)
        return 2.0 * sigma * elementwise_grad(self.sigma)(t) - 2.0 * self.drift(t) * sigma ** 2


def _one(t):
    return 1.0 + 0.0 * t


def _geometric(sigma_min, log_ratio, t):
    return sigma_min * anp.exp(log_ratio * t)


def ve(sigma_min=0.002, sigma_max=80.0):
    """Variance-exploding process: ``s = 1``, ``sigma = sigma_min (sigma_max/sigma_min)^t``.

    Geometric in ``t`` so that uniform ``t`` is uniform in ``log sigma``; a choice of
    coordinates only (nothing optimal depends on it). Range ``t`` in ``[0, 1]``.
    """
    sigma_min, sigma_max = check_positive(sigma_min, "sigma_min"), check_positive(sigma_max, "sigma_max")
    if not sigma_min < sigma_max:
        raise ValueError("`sigma_min` must be smaller than `sigma_max`")
    return Process(s=_one, sigma=partial(_geometric, sigma_min, math.log(sigma_max / sigma_min)),
                   t_min=0.0, t_max=1.0, name=f"ve({sigma_min:g}, {sigma_max:g})")


def _vp_linear_log_s(beta_min, beta_max, t):
    return -0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t ** 2)


def _exp_of(log_s, t):
    return anp.exp(log_s(t))


def _vp_sigma_from_log_s(log_s, t):
    return anp.sqrt(-anp.expm1(2.0 * log_s(t)))


def vp_linear(beta_min=0.1, beta_max=20.0, t_min=1e-3):
    """Variance-preserving process with linear ``beta(t) = beta_min + t (beta_max - beta_min)``.

    ``s(t) = exp(-1/2 int_0^t beta)`` and ``sigma = sqrt(1 - s^2)`` (Song et al. 2021,
    the "linear" schedule of the paper's 1-D experiments). Range ``[t_min, 1]``.
    """
    beta_min, beta_max = check_positive(beta_min, "beta_min"), check_positive(beta_max, "beta_max")
    t_min = check_positive(t_min, "t_min")
    if not t_min < 1.0:
        raise ValueError("`t_min` must be smaller than 1")
    log_s = partial(_vp_linear_log_s, beta_min, beta_max)
    return Process(s=partial(_exp_of, log_s), sigma=partial(_vp_sigma_from_log_s, log_s),
                   t_min=t_min, t_max=1.0, name=f"vp_linear({beta_min:g}, {beta_max:g})")


def _cosine_s(offset, cos0, t):
    return anp.cos((t + offset) / (1.0 + offset) * np.pi / 2.0) / cos0


def _vp_sigma(s, t):
    return anp.sqrt(1.0 - s(t) ** 2)


def vp_cosine(offset=0.008, t_min=1e-3, t_max=0.99):
    """Variance-preserving cosine process of iDDPM (Nichol & Dhariwal 2021).

    ``s = sqrt(alpha_bar)``, ``alpha_bar(t) = cos^2(((t + offset)/(1 + offset)) pi/2)
    / cos^2((offset/(1 + offset)) pi/2)``, ``sigma = sqrt(1 - s^2)``. ``t_max`` is kept
    away from 1, where ``s = 0``; the default 0.99 gives ``nu_max`` of about 64.
    """
    offset = check_positive(offset, "offset")
    t_min, t_max = check_real(t_min, "t_min"), check_real(t_max, "t_max")
    if not 0.0 < t_min < t_max < 1.0:
        raise ValueError("need 0 < `t_min` < `t_max` < 1 for vp_cosine")
    s = partial(_cosine_s, offset, math.cos(offset / (1.0 + offset) * math.pi / 2.0))
    return Process(s=s, sigma=partial(_vp_sigma, s), t_min=t_min, t_max=t_max, name=f"vp_cosine({offset:g})")


def nsr(process, ts):
    """Noise-to-signal ratio ``nu = sigma / s`` at the times ``ts`` (array out).

    ``ts`` must be finite and inside ``[t_min, t_max]``, where the process is defined.
    """
    process = check_process(process)
    return np.asarray(process.nsr(_check_times(ts, process, "ts")), dtype=float)


def time_from_nsr(process, nu):
    """Invert ``nu(t)``: the times at which the process has noise-to-signal ratio ``nu``.

    Vectorised bisection on ``log nu`` (``nu`` is strictly increasing in ``t``), to
    full float64 resolution. Monotone, and exact at the endpoints: ``nu`` equal to
    ``nu(t_min)`` or ``nu(t_max)`` (to 1e-9 relative) maps to ``t_min``/``t_max``.
    """
    process = check_process(process)
    nu = as_real_array(nu, "nu")
    nu_lo, nu_hi = _nsr_range(process)
    if not np.all(np.isfinite(nu)) or np.any(nu <= 0):
        raise ValueError("`nu` must be finite and positive")
    if np.any(nu < nu_lo * (1 - 1e-9)) or np.any(nu > nu_hi * (1 + 1e-9)):
        raise ValueError(f"`nu` must lie in the process range [{nu_lo:.6g}, {nu_hi:.6g}]")
    return _time_from_nsr(process, nu)


def _time_from_nsr(process, nu):
    nu_lo, nu_hi = _nsr_range(process)
    target = np.log(nu)
    lo = np.full(nu.shape, float(process.t_min))
    hi = np.full(nu.shape, float(process.t_max))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        below = np.log(process.nsr(mid)) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        if np.all(hi - lo <= 2 * np.spacing(np.maximum(abs(hi), 1.0))):
            break
    t = 0.5 * (lo + hi)
    t = np.where(nu <= nu_lo * (1 + 1e-9), process.t_min, t)
    return np.where(nu >= nu_hi * (1 - 1e-9), process.t_max, t)


# --------------------------------------------------------------------------------
# Baseline schedules
# --------------------------------------------------------------------------------

def uniform_schedule(process, T):
    """Uniform in ``t`` (the paper's "linear" schedule for a VP process)."""
    process, T = check_process(process), _check_steps(T)
    return _pin(np.linspace(process.t_min, process.t_max, T + 1), process)


def edm_schedule(process, T, rho=7.0):
    """EDM schedule, the paper's Eq. (22) (Karras et al. 2022).

    ``nu_i = (nu_max^(1/rho) + (i/T)(nu_min^(1/rho) - nu_max^(1/rho)))^rho``, mapped to
    ``t`` through ``nu(t)``; the paper compares rho = 3, 7 and 100.
    """
    process, T, rho = check_process(process), _check_steps(T), check_positive(rho, "rho")
    nu_min, nu_max = _nsr_range(process)
    u = np.arange(T + 1) / T
    return _schedule_from_nsr(process, (nu_max ** (1 / rho) + u * (nu_min ** (1 / rho) - nu_max ** (1 / rho))) ** rho)


def loglinear_schedule(process, T):
    """Uniform in ``log nu`` ("LogLinear", Lu et al. 2022)."""
    process, T = check_process(process), _check_steps(T)
    return _schedule_from_nsr(process, np.geomspace(*_nsr_range(process), T + 1))


def cosine_schedule(process, T, offset=0.008):
    """iDDPM cosine noise levels at uniform index, mapped to ``t`` (Nichol & Dhariwal 2021).

    The cosine law ``alpha_bar(u) = cos^2(((u + offset)/(1 + offset)) pi/2) / alpha_bar(0)``
    gives ``nu(u) = sqrt(1/alpha_bar - 1)``; ``u`` is uniform between the values at
    which it meets the process's ``nu_min`` and ``nu_max``. The paper's initial schedule
    for online training. For ``vp_cosine`` with the same offset it is uniform in ``t``.
    """
    process, T, offset = check_process(process), _check_steps(T), check_positive(offset, "offset")
    nu_min, nu_max = _nsr_range(process)
    cos0 = np.cos(offset / (1.0 + offset) * np.pi / 2.0)
    # alpha_bar = 1 / (1 + nu^2)  <=>  cos(theta) = cos0 / sqrt(1 + nu^2)
    theta_lo, theta_hi = np.arccos(cos0 / np.sqrt(1.0 + np.array([nu_min, nu_max]) ** 2))
    nu = np.sqrt(np.maximum(cos0 ** 2 / np.cos(np.linspace(theta_lo, theta_hi, T + 1)) ** 2 - 1.0, 0.0))
    nu[0], nu[-1] = nu_min, nu_max
    return _schedule_from_nsr(process, nu)


def arctan_schedule(process, T, c):
    """``arctan(nu_i / c)`` uniform in ``i``: the Gaussian optimum of Align Your Steps.

    Sabour et al. (2024) show this is optimal for an Euler solver on data
    ``N(0, c^2 I)``; ``c`` is the data standard deviation.
    """
    process, T, c = check_process(process), _check_steps(T), check_positive(c, "c")
    nu_min, nu_max = _nsr_range(process)
    theta = np.linspace(np.arctan(nu_min / c), np.arctan(nu_max / c), T + 1)
    return _schedule_from_nsr(process, c * np.tan(theta))


def baseline_schedules(process, T, c=0.5):
    """Every baseline above for ``T`` steps, by name: ``uniform``, ``cosine``,
    ``loglinear``, ``arctan`` (with data standard deviation ``c``, default 0.5, EDM's sigma_data) and ``edm3``,
    ``edm7``, ``edm100`` (the rho values the paper compares)."""
    out = {"uniform": uniform_schedule(process, T), "cosine": cosine_schedule(process, T),
           "loglinear": loglinear_schedule(process, T), "arctan": arctan_schedule(process, T, c)}
    out.update({f"edm{rho}": edm_schedule(process, T, float(rho)) for rho in (3, 7, 100)})
    return out


# --------------------------------------------------------------------------------
# The corrector and predictor costs of one step
# --------------------------------------------------------------------------------

class Estimate(NamedTuple):
    """A Monte-Carlo estimate and its standard error (floats, or arrays of one shape)."""
    value: object
    stderr: object


def corrector_cost(score, process, t_cur, t_next, x0, rng, *, velocity=None):
    """Corrector-optimised incremental cost ``L_c(t, t')`` by Monte Carlo (paper, Sec. 3).

    ``L_c(t, t') = v(t')^2 E_{x ~ p_t} ||S(x, t') - S(x, t)||^2`` with ``t = t_cur``
    and ``t' = t_next``: the predictor is the identity and a Langevin corrector at speed
    ``v(t')`` must carry ``p_t`` to ``p_t'``. Both scores are evaluated at the same
    ``x = s(t) x0 + sigma(t) eps``, a fresh ``eps`` per interval.

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``
    process : Process
    t_cur, t_next : floats, or arrays of one shape (one interval each), in ``[t_min, t_max]``.
        The formula is defined for either order (its expansion is written ``L(t, t + h)``).
    x0 : array (n, d), data samples, n >= 2
    rng : numpy Generator or int seed
    velocity : callable ``v(t)``, default ``process.sigma``

    Returns
    -------
    Estimate : ``(value, stderr)``, the Monte-Carlo mean and its standard error, of the
        shape of ``t_cur``.
    """
    args = _cost_iv(score, process, t_cur, t_next, x0, rng, velocity)
    return _per_interval(_corrector_cost, *args)


def _corrector_cost(score, process, t, t2, x0, rng, v):
    x = noised(process, x0, t, rng)
    diff = score(x, t2) - score(x, t)
    return mean_stderr(v(t2) ** 2 * np.sum(diff ** 2, axis=1))


def ddim_coefficients(process, t_cur, t_next):
    """Coefficients ``(a, b)`` of the DDIM / Euler predictor ``F(x) = a x + b S(x, t_cur)``.

    Euler's method for the probability-flow ODE in the coordinates ``(nu, x / s)``, in
    which it reads ``d(x/s)/d nu = -nu s S(x, t)``. This is DDIM for VP processes (Song
    et al. 2021) and the Euler stage of EDM's sampler (Karras et al. 2022):
    ``a = s(t') / s(t)``, ``b = s(t') s(t) nu(t) (nu(t) - nu(t'))``. It depends on the
    noise levels only, not on how ``t`` parametrises them.
    """
    s, s_next = process.s(t_cur), process.s(t_next)
    nu, nu_next = process.nsr(t_cur), process.nsr(t_next)
    return s_next / s, s_next * s * nu * (nu - nu_next)


def predictor_cost(score, process, t_cur, t_next, x0, rng, *, velocity=None):
    """Predictor-optimised cost ``L_p(t, t')`` for the DDIM / Euler predictor.

    The paper's ``v(t')^2 D(p_t' || F#p_t)`` for ``F(x) = a x + b S(x, t)``
    (:func:`ddim_coefficients`); its explicit form is derived here (docs/derivations.md,
    section 2): by the change of variables, with ``J = dF/dx = a I + b H`` and
    ``H = dS/dx``, ``grad log(F#p_t)(F(x)) = J^{-T} [S(x, t) - grad_x log|det J(x)|]`` and

        L_p = v(t')^2 E_{x ~ p_t} || S(F(x), t') - J^{-T}[S(x, t) - grad log|det J|] ||^2.

    With exact scores it is ``O(h^4)``. The Euler step is taken in ``(nu, x/s)``, which
    is DDIM and what ``sampler.euler_step`` does, so the cost is that of the predictor
    actually used and does not depend on the time parametrisation. ``H`` and
    ``grad log|det J|`` come from autograd, so the score must be autograd-differentiable
    in ``x`` and act on rows independently. Cost: ``O(d)`` reverse passes per batch, for
    small ``d``. Arguments and returns as :func:`corrector_cost`.
    """
    args = _cost_iv(score, process, t_cur, t_next, x0, rng, velocity)
    return _per_interval(_predictor_cost, *args)


def _predictor_cost(score, process, t, t2, x0, rng, v):
    x = noised(process, x0, t, rng)
    a, b = (float(c) for c in ddim_coefficients(process, t, t2))
    raw = getattr(score, "score", score)      # autograd traces the unchecked score
    d = x.shape[1]

    def jacobian_F(x):  # (n, d, d), J[i, k, j] = dF_k / dx_j at row i
        H = anp.stack([elementwise_grad(lambda y, k=k: raw(y, t)[:, k])(x) for k in range(d)], axis=1)
        return a * anp.eye(d) + b * H

    def log_abs_det(x):
        return anp.sum(anp.linalg.slogdet(jacobian_F(x))[1])

    S = score(x, t)
    J = jacobian_F(x)
    grad_log_det = elementwise_grad(log_abs_det)(x)
    pushed = np.linalg.solve(np.swapaxes(J, 1, 2), (S - grad_log_det)[:, :, None])[:, :, 0]
    diff = score(a * x + b * S, t2) - pushed
    return mean_stderr(v(t2) ** 2 * np.sum(diff ** 2, axis=1))


# --------------------------------------------------------------------------------
# The local cost delta_c
# --------------------------------------------------------------------------------

def local_cost(score, process, ts, x0, rng, *, velocity=None, derivative="central"):
    """Local cost ``delta_c(t) = v(t)^2 E_{x ~ p_t} ||d/dt S(x, t)||^2`` on a grid (paper, Sec. 3).

    ``L_c(t, t + h) = delta_c(t) h^2 + O(h^3)``: the leading term of the corrector cost.
    At each time a fresh ``x = s(t) x0 + sigma(t) eps`` is drawn and the time derivative
    of the score is taken at fixed ``x`` by ``derivative``: :func:`central_difference`
    (alias ``"central"``) or :func:`forward_mode` (alias ``"autograd"``, for scores that
    autograd can differentiate in ``t``), or any function with their signature.

    Returns
    -------
    Estimate : ``(delta, stderr)``, arrays of the shape of ``ts``.
    """
    score, process, ts, x0, rng, v = _local_cost_iv(score, process, ts, x0, rng, velocity)
    derivative = _resolve(derivative, DERIVATIVES, "derivative")
    levels = [mean_stderr(_local_cost_samples(score, process, noised(process, x0, t, rng), t, v, derivative))
              for t in ts]
    return Estimate(*(np.array(a) for a in zip(*levels)))


def _local_cost_samples(score, process, x, t, v, derivative):
    """The integrand of delta_c per sample: ``v(t)^2 ||dS/dt (x_j, t)||^2`` at fixed ``x``."""
    return v(t) ** 2 * np.sum(derivative(score, process, x, t) ** 2, axis=1)


def central_difference(score, process, x, t, rel_step=1e-3):
    """``dS/dt`` at fixed ``x``: a central difference whose step is ``rel_step`` in ``log nu``.

    The time step is ``h = rel_step / |d log nu / dt|`` (a uniform relative step in the
    noise level), at most a quarter of the process range; where ``t +- h`` would leave
    ``[t_min, t_max]`` the second-order one-sided stencil is used. 2 score calls (3 at the
    ends); the score is never evaluated outside the range.
    """
    h = float(_fd_steps(process, np.array([t]), rel_step)[0])
    if t - h < process.t_min:    # one-sided, second order, at the clean end
        return (-3 * score(x, t) + 4 * score(x, t + h) - score(x, t + 2 * h)) / (2 * h)
    if t + h > process.t_max:    # one-sided, second order, at the noisy end
        return (3 * score(x, t) - 4 * score(x, t - h) + score(x, t - 2 * h)) / (2 * h)
    return (score(x, t + h) - score(x, t - h)) / (2 * h)


def forward_mode(score, process, x, t):
    """``dS/dt`` at fixed ``x`` by forward-mode autograd through ``t`` (1 score call)."""
    raw = getattr(score, "score", score)
    value = make_jvp(lambda tt: raw(x, tt))(float(t))(1.0)[1]
    return score.check(value, x, t) if hasattr(score, "check") else value


DERIVATIVES = {"central": central_difference, "fd": central_difference,
               "autograd": forward_mode, "forward": forward_mode}


# --------------------------------------------------------------------------------
# Cumulative cost, its inversion, the optimal schedule and Algorithm 1
# --------------------------------------------------------------------------------

def cumulative_cost(ts, delta, *, order=2):
    """Cumulative length ``Lambda(t) = int_{t_0}^t delta(r)^(1/order) dr`` (paper, Sec. 3).

    Trapezoid rule on ``delta^(1/order)`` over the grid ``ts`` (any strictly increasing
    times); ``Lambda[0] = 0`` and ``Lambda[-1]`` is the path length. ``order = 2`` is
    the paper's; ``order = n`` is the length for a cost ``L = delta h^n`` (derived:
    docs/derivations.md, section 3).
    """
    ts, delta, order = _grid_iv(ts, delta, order)
    return np.concatenate([[0.0], np.cumsum(_trapezoid_increments(ts, delta, order))])


def optimal_schedule(ts, delta, T, *, order=2):
    """Optimal ``T``-step schedule from a local cost on a dense grid (paper, Sec. 3).

    ``t*_i = Lambda^{-1}(i Lambda / T)``: constant speed in the metric ``delta``, so that
    every step costs ``(Lambda/T)^2`` to leading order (the minimiser of the path
    energy, by Cauchy-Schwarz). The inverse is a monotone cubic (PCHIP) through
    ``(Lambda(t_j), t_j)``. Output endpoints are ``ts[0]`` and ``ts[-1]`` exactly.
    If ``delta`` vanishes on the whole grid every schedule is free: a warning is
    issued and the uniform schedule returned.
    """
    ts, delta, order = _grid_iv(ts, delta, order)
    return _invert_cumulative(ts, _trapezoid_increments(ts, delta, order), _check_steps(T))


def update_schedule(ts, costs, *, order=2):
    """Algorithm 1 (UpdateSchedule) of the paper: equalise the cost of every step.

    ``Lambda_0 = 0``, ``Lambda_{i+1} = Lambda_i + L_i^(1/order)`` with
    ``L_i = L(t_{i+1}, t_i)``; then ``t*_i = Lambda^{-1}(i Lambda_T / T)`` through a
    monotone cubic interpolant (PCHIP). ``order`` generalises the square root to a
    cost of order ``h^n`` (derived: docs/derivations.md, section 3). Increments below
    ``INCREMENT_FLOOR`` times the largest are raised to it, so zero-cost steps keep a
    well-defined inverse.

    Returns a schedule with the same endpoints (exactly) and number of steps.
    Equal costs are a fixed point; multiplying all costs by a constant changes nothing.
    """
    ts = check_schedule(ts, endpoints=False)
    costs, order = _check_costs(costs, len(ts) - 1), check_positive(order, "order")
    return _invert_cumulative(ts, costs ** (1.0 / order), len(ts) - 1)


# Relative floor on the length increments of a step (Algorithm 1): a zero-cost
# interval would make the cumulative length flat and its inverse undefined, so each
# increment is raised to at least this fraction of the largest one.
INCREMENT_FLOOR = 1e-8


def _invert_cumulative(ts, increments, T):
    """``Lambda^{-1}(i Lambda / T)`` for the cumulative sum of ``increments`` over ``ts``."""
    top = np.max(increments)
    if top == 0.0:
        warnings.warn("the cost is zero on the whole range: every schedule is free; "
                      "returning the uniform schedule", RuntimeWarning, stacklevel=3)
        return _pin(np.linspace(ts[0], ts[-1], T + 1), ts)
    # Flat stretches (zero cost) would make Lambda non-invertible: floor them.
    increments = np.maximum(increments, INCREMENT_FLOOR * top)
    Lambda = np.concatenate([[0.0], np.cumsum(increments)])
    out = _pin(PchipInterpolator(Lambda, ts)(Lambda[-1] * np.arange(T + 1) / T), ts)
    if not np.all(np.diff(out) > 0):
        raise ValueError(f"`T` = {T} is too large for the resolution of the grid: "
                         "two schedule times coincide in float64")
    return out


def path_length(costs, *, order=2):
    """Discrete path length ``sum_i L_i^(1/order)`` of a schedule's step costs (paper, Sec. 3).

    For a fine schedule it approximates ``Lambda``; it does not depend on the schedule
    to leading order, which is why ``(path_length / T)^2`` is the per-step cost that an
    optimal ``T``-step schedule reaches.
    """
    costs, order = _check_costs(costs, nonempty=True), check_positive(order, "order")
    return float(np.sum(costs ** (1.0 / order)))


def path_energy(costs):
    """Discrete path energy ``T sum_i L_i`` of a schedule (paper, Sec. 3).

    ``sum_i L_i ~ E(phi) / T``, so this approximates ``E(phi)``. Cauchy-Schwarz gives
    ``path_length(costs)^2 <= path_energy(costs)`` with equality iff all costs are equal.
    """
    costs = _check_costs(costs, nonempty=True)
    return float(len(costs) * np.sum(costs))


# --------------------------------------------------------------------------------
# The blend and Algorithm 2
# --------------------------------------------------------------------------------

def blend(ts, ts_star, gamma):
    """Algorithm 2, step 4: ``gamma ts_star + (1 - gamma) ts`` for ``gamma`` in ``(0, 1]``.

    A convex combination of two strictly increasing schedules with the same
    endpoints is one too; the endpoints are kept exactly.
    """
    ts = check_schedule(ts, endpoints=False)
    ts_star = check_schedule(ts_star, endpoints=False, name="ts_star")
    if ts.shape != ts_star.shape or ts[0] != ts_star[0] or ts[-1] != ts_star[-1]:
        raise ValueError("`ts` and `ts_star` must have the same length and endpoints")
    return _blend(ts, ts_star, _check_gamma(gamma))


def _blend(ts, ts_star, gamma):
    out = gamma * ts_star + (1.0 - gamma) * ts
    out[0], out[-1] = ts[0], ts[-1]
    return out


class OnlineUpdate(NamedTuple):
    """One schedule update of Algorithm 2 (:func:`online_update`)."""
    ts: np.ndarray          # the next schedule, blend(ts, ts_star, gamma)
    ts_star: np.ndarray     # the target schedule of this update
    costs: np.ndarray       # interval costs of the current schedule, shape (T,)
    length: float           # the path length measured by this update


def online_update(score, process, ts, x0, rng, *, gamma, route="intervals", **route_options):
    """Algorithm 2 of the paper, steps 2-4: one schedule update with the score model fixed.

    2-3. ``route`` finds the target schedule ``ts*`` from the current schedule and model:
    :func:`interval_route` (alias ``"intervals"``, the paper's: the interval costs of
    ``ts``, then Algorithm 1) or :func:`grid_route` (alias ``"grid"``, derived here: the
    dense-grid map, which avoids the one-huge-last-step pitfall of the interval route on
    smooth data: docs/derivations.md, section 4); any function with their signature
    ``route(score, process, ts, x0, rng, **route_options) -> (ts_star, costs, length)``.
    4. ``ts <- gamma ts* + (1 - gamma) ts`` (:func:`blend`).

    Step 1 of Algorithm 2 (optimiser steps on the model with ``ts`` fixed) is the
    caller's: ``models.train`` calls this every few steps after a burn-in.

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``, the current model
    process : Process
    ts : schedule (``T + 1`` times, endpoints ``t_min``, ``t_max``)
    x0 : array (n, d), fresh data samples for the costs
    rng : numpy Generator or int seed
    gamma : float in ``(0, 1]``, the blend rate
    route, route_options : as above (``cost=``, ``order=`` for the interval route;
        ``n_grid=`` for the grid route)

    Returns
    -------
    OnlineUpdate : ``(ts, ts_star, costs, length)``.
    """
    process = check_process(process)
    ts, gamma = check_schedule(ts, process), _check_gamma(gamma)
    route = _resolve(route, ROUTES, "route")
    ts_star, costs, length = route(score, process, ts, x0, rng, **route_options)
    return OnlineUpdate(_blend(ts, ts_star, gamma), ts_star, costs, float(length))


def interval_route(score, process, ts, x0, rng, *, cost="corrector", order=2):
    """Algorithm 2, steps 2-3, as in the paper: the interval costs ``L_i`` of the current
    schedule (:func:`interval_costs` with ``cost``, by default the corrector cost), then
    ``ts* = UpdateSchedule(ts, L)`` (Algorithm 1). Returns ``(ts_star, costs, length)``
    with ``length`` the :func:`path_length` of the costs."""
    costs = interval_costs(score, process, ts, x0, rng, cost=cost).value
    return update_schedule(ts, costs, order=order), costs, path_length(costs, order=order)


# ================================================================================
# PART II. DERIVED HERE (docs/derivations.md)
# ================================================================================

# --------------------------------------------------------------------------------
# Closed forms for Gaussian data (docs/derivations.md, section 1)
# --------------------------------------------------------------------------------

def gaussian_local_cost(process, ts, variances, mean=None):
    """Exact ``delta_c(t)`` for data ``N(mean, diag(variances))`` with ``v = sigma`` (derived).

    ``p_t = N(s mean, diag(a))`` with ``a_k = s^2 lambda_k + sigma^2``, and

        delta_c(t) = sigma^2 [ sum_k a_k'^2 / a_k^3 + sum_k s'^2 mean_k^2 / a_k^2 ],
        a_k' = 2 s s' lambda_k + 2 sigma sigma'.

    (docs/derivations.md, section 1.) ``ts`` may have any shape.
    """
    process = check_process(process)
    ts = _check_times(ts, process, "ts")
    lam, mu = _gaussian_moments(variances, mean)
    s, sigma = process.s(ts), process.sigma(ts)
    ds, dsigma = elementwise_grad(process.s)(ts), elementwise_grad(process.sigma)(ts)
    s, sigma, ds, dsigma = (np.asarray(a, dtype=float)[..., None] for a in (s, sigma, ds, dsigma))
    a = s ** 2 * lam + sigma ** 2
    da = 2 * s * ds * lam + 2 * sigma * dsigma
    inner = np.sum(da ** 2 / a ** 3, axis=-1) + np.sum(ds ** 2 * mu ** 2 / a ** 2, axis=-1)
    return sigma[..., 0] ** 2 * inner


def gaussian_corrector_cost(process, t_cur, t_next, variances, mean=None):
    """Exact finite-step ``L_c(t, t')`` for data ``N(mean, diag(variances))``, ``v = sigma`` (derived).

    With ``p_t = N(m, diag(a))`` and ``p_t' = N(m', diag(a'))`` (``m = s mean``,
    ``a = s^2 lambda + sigma^2``), the score difference at ``x ~ p_t`` is Gaussian and

        L_c = sigma(t')^2 sum_k [ (m'_k - m_k)^2 / a'_k^2 + a_k (1/a_k - 1/a'_k)^2 ].

    ``t_cur`` and ``t_next`` may be arrays of the same shape (one cost per pair).
    """
    t, t2, lam, mu, s, s2, a, a2 = _gaussian_step(process, t_cur, t_next, variances, mean)
    inner = (s2 - s) ** 2 * mu ** 2 / a2 ** 2 + a * (1 / a - 1 / a2) ** 2
    return process.sigma(t2[..., 0]) ** 2 * np.sum(inner, axis=-1)


def gaussian_predictor_cost(process, t_cur, t_next, variances, mean=None):
    """Exact DDIM-predictor cost ``L_p(t, t')`` for data ``N(mean, diag(variances))``, ``v = sigma`` (derived).

    With the score ``-(x - m)/A`` of ``p_t = N(m, A)``, the predictor
    ``F(x) = a x + b S(x, t)`` (:func:`ddim_coefficients`) is affine per coordinate,
    ``F(x) = alpha x + beta`` with ``alpha = a - b / A`` and ``beta = b m / A``, so
    ``F#p_t = N(alpha m + beta, alpha^2 A)`` and, with the Fisher divergence between
    Gaussians ``D(N(m1, v1) || N(m2, v2)) = (m1 - m2)^2 / v1^2 + v2 (1/v2 - 1/v1)^2``,

        L_p = sigma(t')^2 sum_k D(N(m'_k, a'_k) || N(alpha_k m_k + beta_k, alpha_k^2 a_k)).

    ``t_cur`` and ``t_next`` may be arrays of the same shape.
    """
    t, t2, lam, mu, s, s2, a, a2 = _gaussian_step(process, t_cur, t_next, variances, mean)
    ca, cb = ddim_coefficients(process, t, t2)
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


# --------------------------------------------------------------------------------
# The equal-cost fixed point (docs/derivations.md, section 3)
# --------------------------------------------------------------------------------

def interval_costs(score, process, ts, x0, rng, *, cost="corrector", **cost_options):
    """Costs ``L_i = L(t_{i+1}, t_i)`` of every step of a schedule (Algorithm 1's input).

    ``cost`` is a cost function (:func:`corrector_cost`, alias ``"corrector"``;
    :func:`predictor_cost`, alias ``"predictor"``; ``sampler.step_cost``,
    ``sampler.flow_error_cost``, or your own) called once with the arrays of the
    schedule's noisier and cleaner ends; ``cost_options`` are passed on. Negative
    Monte-Carlo values of an unbiased cost are clipped at zero.

    Returns
    -------
    Estimate : ``(costs, stderr)``, each of shape ``(T,)``.
    """
    process = check_process(process)
    ts = check_schedule(ts, process, endpoints=False)
    cost = _resolve(cost, COSTS, "cost")
    value, stderr = cost(score, process, ts[1:], ts[:-1], x0, rng, **cost_options)
    return Estimate(np.maximum(np.asarray(value, dtype=float), 0.0), np.asarray(stderr, dtype=float))


COSTS = {"corrector": corrector_cost, "predictor": predictor_cost}


class EqualCostResult(NamedTuple):
    """Outcome of :func:`equal_cost_schedule` and :func:`iterate_schedule`."""
    ts: np.ndarray          # final schedule
    costs: np.ndarray       # its interval costs L_i
    stderr: np.ndarray      # their standard errors (NaN where the cost gives none)
    converged: bool         # the last update moved no time by more than tol local steps
    n_iter: int             # updates performed
    history: list           # (ts, costs) before each update
    n_evaluations: int = 0  # per-sample score evaluations (rows passed to the score)


def equal_cost_schedule(score, process, ts, x0, rng, *, cost="predictor", gamma=0.5, order=None,
                        max_iter=100, tol=1e-4, budget=None, batch_size=None, callback=None, **cost_options):
    """Damped Algorithm 1 iterated to its equal-cost fixed point for a fixed score (derived).

    Repeats ``ts <- blend(ts, update_schedule(ts, L(ts)), gamma)`` (Algorithm 2 with the
    model held fixed). Its fixed points have equal interval costs whatever the order of
    the cost, which is how schedules for costs of higher order are found
    (docs/derivations.md, section 3): the predictor cost (``O(h^4)``), and the
    sampler-aware costs ``sampler.step_cost`` and ``sampler.flow_error_cost``. Costs are
    estimated by :func:`interval_costs` with common random numbers (the same seed at
    every iteration), so the map iterated is deterministic.

    Parameters
    ----------
    score, process, ts, x0, rng : as :func:`interval_costs` (``ts`` the starting schedule)
    cost : a cost function or ``"corrector"`` / ``"predictor"`` (default)
    gamma : blend rate of each update
    order : the update's order (default 2 for the corrector cost, 4 otherwise); the fixed
        point has equal costs whatever it is, it only sets how far each update moves
    max_iter, tol : stop after ``max_iter`` updates, or when an update moves no time by
        more than ``tol`` times the shorter of its two adjacent steps
    budget : int or None, at most this many per-sample score evaluations: the updates stop
        before the next one would exceed it (the count of one evaluation of the costs is
        measured on the first)
    batch_size : at most this many rows per score call (results identical)
    callback : ``callback(iteration, max_iter, info)`` after every update, ``info`` with
        ``ts``, ``costs``, ``moved`` and ``elapsed``
    cost_options : passed to ``cost`` (e.g. ``velocity=``, ``step=``, ``weight=``)

    Limitation (docs/derivations.md, section 4): with the corrector cost, smooth data and
    few steps, ``v(t_min)^2 = sigma_min^2`` makes the last step look free and the
    iteration drifts towards one huge last step; prefer :func:`estimate_schedule_map`
    for the corrector cost.

    Returns
    -------
    EqualCostResult, whose ``n_evaluations`` counts the rows passed to the score.
    """
    process = check_process(process)
    ts = check_schedule(ts, process)
    cost = _resolve(cost, COSTS, "cost")
    score = checked_score(score, batch_size=batch_size)
    x0 = check_data(x0)
    seed = int(as_rng(rng).integers(2 ** 63))
    order = (2 if cost is corrector_cost else 4) if order is None else order
    budget = None if budget is None else check_int(budget, "budget", minimum=1)
    costs = lambda ts: interval_costs(score, process, ts, x0, seed, cost=cost, **cost_options)
    first = costs(ts)                 # the first update's costs; they also measure what one evaluation spends
    if budget is not None:
        per_evaluation = score.evaluations
        if 2 * per_evaluation > budget:
            raise ValueError(f"`budget` = {budget} allows no update: one evaluation of the costs spends "
                             f"{per_evaluation} per-sample score evaluations, and an update needs two")
        max_iter = min(check_int(max_iter, "max_iter", minimum=1), budget // per_evaluation - 1)
    pending = [first]                 # handed to the first update, then the costs are evaluated afresh
    result = iterate_schedule(lambda ts: pending.pop() if pending else costs(ts), ts, gamma=gamma, order=order,
                              max_iter=max_iter, tol=tol, callback=callback)
    return result._replace(n_evaluations=score.evaluations)


def iterate_schedule(costs, ts, *, gamma=0.5, order=2, max_iter=100, tol=1e-4, callback=None):
    """Iterate ``ts <- blend(ts, update_schedule(ts, costs(ts)), gamma)`` to a fixed point.

    ``costs(ts)`` returns the interval costs, or ``(costs, stderr)``. Converged when an
    update moves no time by more than ``tol`` times the shorter of its two adjacent
    steps. ``callback`` as :func:`equal_cost_schedule`. Returns an :class:`EqualCostResult`.
    """
    ts = check_schedule(ts, endpoints=False)
    gamma, order = _check_gamma(gamma), check_positive(order, "order")
    max_iter, tol = check_int(max_iter, "max_iter", minimum=1), check_positive(tol, "tol")
    callback = _check_callback(callback)
    start = time.perf_counter()

    def evaluate(ts):
        out = costs(ts)
        value, stderr = out if isinstance(out, tuple) else (out, np.full(len(ts) - 1, np.nan))
        return _check_costs(value, len(ts) - 1), np.asarray(stderr, dtype=float)

    history = []
    for it in range(1, max_iter + 1):
        L, _ = evaluate(ts)
        history.append((ts, L))
        ts_new = _blend(ts, _invert_cumulative(ts, L ** (1.0 / order), len(ts) - 1), gamma)
        moved, ts = _relative_motion(ts, ts_new), ts_new
        if callback is not None:
            callback(it, max_iter, {"ts": ts, "costs": L, "moved": moved, "elapsed": time.perf_counter() - start})
        if moved <= tol:
            break
    L, stderr = evaluate(ts)
    return EqualCostResult(ts, L, stderr, bool(moved <= tol), it, history)


def _relative_motion(ts, ts_new):
    """Largest move of a time in units of the shorter of its two adjacent steps."""
    steps = np.diff(ts)
    local = np.minimum(np.append(steps, np.inf), np.insert(steps, 0, np.inf))
    return float(np.max(np.abs(ts_new - ts) / local))


# --------------------------------------------------------------------------------
# The dense-grid schedule map: estimated on a budget, in parallel, with error bars
# (docs/derivations.md, section 5)
# --------------------------------------------------------------------------------

class ScheduleMap(NamedTuple):
    """A continuous schedule: the cumulative length on a dense grid.

    Fields: ``ts`` grid, ``delta`` and ``delta_stderr`` local cost, ``Lambda``
    cumulative length, ``length`` and ``length_stderr`` (batch means over
    ``Lambda_groups``, the cumulative lengths of independent sample groups), ``order``,
    ``n_evaluations`` (per-sample score evaluations spent), ``metadata`` (a dict: the
    process, ``nu`` on the grid, the estimate's settings, see :func:`estimate_schedule_map`)
    and ``grid_error``, the quadrature error of ``length`` estimated from the same map at
    half resolution (0 for maps that do not record it). Call :meth:`schedule` for any
    number of steps, :meth:`sigmas` / :meth:`timesteps` / :meth:`flow_times` to export
    it; :meth:`save` writes it as JSON, :func:`load_schedule_map` reads it back.
    """
    ts: np.ndarray
    delta: np.ndarray
    delta_stderr: np.ndarray
    Lambda: np.ndarray
    length: float
    length_stderr: float
    Lambda_groups: np.ndarray
    order: int = 2
    n_evaluations: int = 0
    metadata: dict = None
    grid_error: float = 0.0

    @property
    def length_uncertainty(self):
        """``sqrt(length_stderr^2 + grid_error^2)``: the Monte-Carlo and the quadrature error."""
        return float(np.hypot(self.length_stderr, self.grid_error))

    def length_interval(self, level=0.95):
        """A ``level`` confidence interval for ``length``: ``length +- q length_uncertainty``
        with ``q`` the Student-t quantile of the batch means' ``n_groups - 1`` degrees of
        freedom (2.26, not 1.96, for 10 groups at 95%: ``length_stderr`` is estimated from
        the groups' spread, docs/derivations.md, section 5). Returns ``(low, high)``."""
        level = check_real(level, "level")
        if not 0.0 < level < 1.0:
            raise ValueError(f"`level` must be in (0, 1), got {level}")
        dof = max(int(np.shape(self.Lambda_groups)[0]) - 1, 1) if np.ndim(self.Lambda_groups) == 2 else 1
        half = float(student_t.ppf(0.5 + level / 2.0, dof)) * self.length_uncertainty
        return self.length - half, self.length + half

    def schedule(self, T):
        """The optimal ``T``-step schedule ``Lambda^{-1}(i Lambda / T)`` from the stored ``Lambda``.

        With ``nu`` on the grid (maps from :func:`estimate_schedule_map`) the inverse is a
        monotone cubic through ``(Lambda_j, log nu_j)`` (the coordinate in which the grid
        is uniform), mapped to ``t`` by a monotone cubic through ``(log nu_j, t_j)``;
        otherwise a monotone cubic through ``(Lambda_j, t_j)``. Endpoints are exact.
        """
        return self._invert(self.Lambda, _check_steps(T))

    def _invert(self, Lambda, T):
        nu_grid = self._nu_grid()
        if nu_grid is None:
            return _invert_cumulative(self.ts, np.diff(Lambda), T)
        u = np.log(nu_grid)
        ts = _pin(PchipInterpolator(u, self.ts)(_invert_cumulative(u, np.diff(Lambda), T)), self.ts)
        if not np.all(np.diff(ts) > 0):
            raise ValueError(f"`T` = {T} is too large for the resolution of the grid: two schedule times coincide")
        return ts

    def _nu_grid(self):
        nu = np.asarray((self.metadata or {}).get("nu", []), dtype=float)
        return nu if nu.shape == self.ts.shape else None

    def cost_per_step(self, T):
        """Leading-order cost of every step of the optimal ``T``-step schedule, ``(Lambda/T)^order``."""
        return (self.length / _check_steps(T)) ** self.order

    def schedule_stderr(self, T):
        """Standard error of each time of :meth:`schedule` (batch means over the groups)."""
        T = _check_steps(T)
        groups = np.array([self._invert(L, T) for L in self.Lambda_groups])
        return groups.std(axis=0, ddof=1) / np.sqrt(len(groups))

    def sigmas(self, n, *, dtype=np.float64):
        """``n`` noise levels ``nu``, descending, then 0: exactly the convention of k-diffusion's
        ``get_sigmas_karras(n, ...)`` and of diffusers' ``set_timesteps(sigmas=...)``.

        With an Euler sampler that is ``n`` model calls: ``n - 1`` steps between the levels
        of the ``(n - 1)``-step schedule ``schedule(n - 1)`` and a last one from ``nu_min``
        to 0 (the final denoising). Read from the ``nu`` stored on the grid, so no process
        is needed. ``dtype`` (e.g. ``np.float32``) for a model that computes in it: a
        float64 array would turn float32 samples into float64 after one step.
        """
        n = check_int(n, "n", minimum=2)
        nu_grid = self._nu_grid()
        if nu_grid is None:
            raise ValueError("this map has no `nu` on its grid; use to_sigmas(process, smap.schedule(n - 1))")
        log_nu = _invert_cumulative(np.log(nu_grid), np.diff(self.Lambda), n - 1)
        return np.append(np.exp(log_nu)[::-1], 0.0).astype(_check_dtype(dtype))

    def timesteps(self, process, n):
        """``n`` integer timesteps of a discrete-time model, descending (diffusers' ``timesteps=``):
        ``to_timesteps(process, schedule(n - 1))``, ``n`` model calls as with :meth:`sigmas`.
        ``process`` must be the one the map was estimated with (recorded in its metadata)."""
        self._check_process_matches(process)
        return to_timesteps(process, self.schedule(check_int(n, "n", minimum=2) - 1))

    def flow_times(self, process, n, *, from_one=True, dtype=np.float64):
        """``n`` flow-matching times, descending: the times of ``schedule(n - 1)``, for diffusers'
        ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)``, which appends the final 0
        itself. ``from_one=True`` starts at ``t = 1`` (pure noise, where such models start)
        instead of the map's ``t_max`` (``nu_max`` is finite). ``process`` must be the map's,
        a :func:`flow_matching` process."""
        process = self._check_process_matches(process)
        if not process.name.startswith("flow_matching"):
            raise ValueError(f"`process` must be a flow_matching process for flow times, got {process.name!r}")
        return self._flow_times(n, check_bool(from_one, "from_one")).astype(_check_dtype(dtype))

    def _flow_times(self, n, from_one):
        t = self.schedule(check_int(n, "n", minimum=2) - 1)[::-1].copy()
        if from_one:
            t[0] = 1.0
        return t

    def _check_process_matches(self, process):
        process = check_process(process)
        recorded = (self.metadata or {}).get("process")
        if recorded is not None and recorded != process.name:
            raise ValueError(f"this map was estimated with the process {recorded!r}, not {process.name!r}: "
                             "its noise levels do not translate into that process's timesteps")
        return process

    def save(self, path):
        """Write the map as JSON with its metadata, atomically (temporary file, flush, rename).

        Every field is converted to plain JSON (NumPy scalars and arrays included); a
        non-finite value is refused with a ``ValueError`` naming the field. A symbolic link
        at ``path`` is followed: its target is replaced (write_atomically).
        """
        data = {"format": SCHEDULE_MAP_FORMAT, "metadata": self.metadata or {}, "order": self.order,
                "length": self.length, "length_stderr": self.length_stderr, "grid_error": self.grid_error,
                "n_evaluations": self.n_evaluations}
        data.update({k: getattr(self, k) for k in ("ts", "delta", "delta_stderr", "Lambda", "Lambda_groups")})
        write_atomically(path, json.dumps({k: _jsonable(v, k) for k, v in data.items()}, allow_nan=False))


def estimate_schedule_map(score, process, x0, rng, *, n_grid=1000, velocity=None, derivative="central",
                          n_groups=10, budget=None, workers=1, control_variate=None, batch_size=None,
                          callback=None):
    """Dense-grid estimate of the corrector-optimised schedule map (the paper's route for a
    fixed model; its numerics are derived here: docs/derivations.md, section 5).

    ``delta_c`` is estimated as in :func:`local_cost` at ``n_grid`` times uniform in
    ``log nu``; ``Lambda`` is the trapezoid integral of ``sqrt(delta_c)`` in ``log nu``, in
    which the grid is uniform. The samples are split into ``n_groups`` groups whose
    cumulative lengths give batch-means error bars for ``Lambda`` and the schedule; the
    same integral over every other level gives the quadrature error (``grid_error``, the
    Richardson estimate: a third of the difference).

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``, called with the whole batch of a level
        (2 calls per level for central differences, 3 at the ends), or with chunks of at
        most ``batch_size`` rows
    process : Process
    x0 : array (n, d), data samples
    rng : numpy Generator or int seed
    n_grid, n_groups, velocity, derivative : as above and :func:`local_cost`
    budget : int or None. At most this many per-sample score evaluations: the grid size
        and the number of samples are then chosen here, ``n_grid = sqrt(budget / 40)``
        levels (clipped to [20, 1000]) and as many of ``x0``'s rows as the budget allows
        (fewer levels with more samples measured best: docs/budget.md).
    workers : SciPy's convention. 1 (serial); an int n > 1 (n processes; ``score`` and
        ``process`` must pickle); -1 (one per CPU); or a map-like callable
        ``workers(func, iterable)`` such as ``multiprocessing.Pool(4).map``,
        ``concurrent.futures.Executor.map``, Dask's ``client.get_executor().map`` or Ray's
        ``ray.util.multiprocessing.Pool().map`` (README, "Scaling out"). One task per level;
        the noise is drawn here, so the result is identical for every ``workers``, and what
        comes back is checked (one finite result per task).
    control_variate : bool or None. Subtract, level by level, the centred local cost of
        the data's Gaussian fit, whose mean is known in closed form: the same expectation,
        less variance where the marginal is close to Gaussian (the noisy end). None (the
        default) turns it on with ``budget`` and off without (docs/budget.md).
    batch_size : int or None, at most this many rows per score call (results identical).
    callback : ``callback(level, n_grid, info)`` after every level, ``info`` with
        ``evaluations`` so far and ``elapsed`` seconds; ``progress_printer("map")`` prints.

    Returns a :class:`ScheduleMap` whose ``n_evaluations`` counts the per-sample score
    evaluations and whose ``metadata`` records the process (name, range, ``nu`` on the
    grid), cost, velocity, derivative, grid size, samples, groups, evaluations, score calls,
    seed (if an int was given), package version and creation time.
    """
    args = _estimate_iv(score, process, x0, rng, n_grid, velocity, derivative, n_groups, budget, workers,
                        control_variate, batch_size, callback)
    (task, process, x0, rng, ts, v, derivative, n_groups, control_variate, mapper, close, chunk,
     batch_size, callback, seed) = args
    start, calls, evaluations, low_precision = time.perf_counter(), 0, 0, None
    delta, delta_stderr = np.empty(len(ts)), np.empty(len(ts))
    group_delta = np.empty((n_groups, len(ts)))
    moments = _group_moments(x0, n_groups) if control_variate else None
    try:
        for first in range(0, len(ts), chunk):         # a few levels in memory at once
            levels = range(first, min(first + chunk, len(ts)))
            xs = [noised(process, x0, ts[j], rng) for j in levels]   # the noise is drawn here, in order
            results = _checked_results(mapper(task, [(j, x, ts[j]) for j, x in zip(levels, xs)]), levels, len(x0))
            for j, x, (values, n_calls, n_evaluations, low) in zip(levels, xs, results):
                calls, evaluations, low_precision = calls + n_calls, evaluations + n_evaluations, low_precision or low
                values = v(ts[j]) ** 2 * values
                if control_variate:
                    values = _gaussian_control(values, process, x, ts[j], v(ts[j]) ** 2, *moments)
                delta[j], delta_stderr[j] = mean_stderr(values)
                group_delta[:, j] = [g.mean() for g in np.array_split(values, n_groups)]
                if callback is not None:
                    callback(j + 1, len(ts), {"evaluations": evaluations, "elapsed": time.perf_counter() - start})
    finally:
        close()
    if low_precision:
        _warn_low_precision("score", low_precision)
    groups = np.array([_cumulative_in_log_nu(process, ts, g) for g in group_delta])
    Lambda = _cumulative_in_log_nu(process, ts, delta)
    # Richardson: the trapezoid's error falls like h^2, so the full grid's is a third of the
    # difference to the same integral on every other level.
    half = np.unique(np.append(np.arange(0, len(ts), 2), len(ts) - 1))
    grid_error = abs(float(Lambda[-1]) - float(_cumulative_in_log_nu(process, ts[half], delta[half])[-1])) / 3
    metadata = {"process": process.name, "t_min": process.t_min, "t_max": process.t_max,
                "n_timesteps": process.n_timesteps, "nu": process.nsr(ts).tolist(), "cost": "corrector",
                "velocity": "sigma" if velocity is None else getattr(velocity, "__name__", "custom"),
                "derivative": derivative.__name__, "n_grid": len(ts), "n_samples": len(x0), "n_groups": n_groups,
                "n_evaluations": evaluations, "n_calls": calls, "budget": budget,
                "control_variate": bool(control_variate), "batch_size": batch_size, "seed": seed,
                "version": _version(), "created": datetime.now(timezone.utc).isoformat()}
    return ScheduleMap(ts, delta, delta_stderr, Lambda, float(Lambda[-1]),
                       float(groups[:, -1].std(ddof=1) / np.sqrt(n_groups)), groups, 2, evaluations, metadata,
                       grid_error)


def _estimate_iv(score, process, x0, rng, n_grid, velocity, derivative, n_groups, budget, workers,
                 control_variate, batch_size, callback):
    """Check :func:`estimate_schedule_map`'s arguments once; choose the grid and samples. Returns the
    per-level task (the score's work, in a form every ``workers`` map can run) in place of the score."""
    process = check_process(process)
    check_callable(score, "score", "score(x, t)")
    x0 = check_data(x0)
    n_groups = check_int(n_groups, "n_groups", minimum=2)
    seed = int(rng) if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) else None
    rng = as_rng(rng)
    derivative = _resolve(derivative, DERIVATIVES, "derivative")
    control_variate = (budget is not None) if control_variate is None else check_bool(control_variate,
                                                                                       "control_variate")
    if budget is not None:
        budget = check_int(budget, "budget", minimum=1)
        n_grid = int(np.clip(np.rint(np.sqrt(budget / 40)), 20, 1000))
    n_grid = check_int(n_grid, "n_grid", minimum=2)
    ts = _schedule_from_nsr(process, np.geomspace(*_nsr_range(process), n_grid))
    if budget is not None:
        steps = _fd_steps(process, ts, 1e-3)
        one_sided = np.sum((ts - steps < process.t_min) | (ts + steps > process.t_max))
        per_sample = n_grid if derivative is forward_mode else 2 * n_grid + one_sided
        x0 = x0[:min(len(x0), budget // per_sample)]
    if len(x0) < 2 * n_groups:
        raise ValueError(f"`x0` needs at least {2 * n_groups} samples for {n_groups} groups"
                         + ("" if budget is None else f" (the budget allows {len(x0)})"))
    v = _checked_velocity(velocity, process)
    batch_size = None if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
    task = partial(_level_task, score, process, derivative, batch_size)
    mapper, close, chunk = _mapper(workers, task)
    return (task, process, x0, rng, ts, v, derivative, n_groups, control_variate, mapper, close, chunk,
            batch_size, _check_callback(callback), seed)


def _level_task(score, process, derivative, batch_size, task):
    """One level's work, wherever it runs: ``task = (j, x, t)`` -> ``(j, ||dS/dt||^2 per row, calls, rows,
    the dtype of a low-precision score or None)``; the caller warns of low precision once."""
    j, x, t = task
    checked = _CheckedScore(score, "score", batch_size, warn=False)
    values = np.sum(derivative(checked, process, x, t) ** 2, axis=1)
    return j, values, checked.calls, checked.evaluations, checked.low_precision


def _checked_results(results, levels, n):
    """The map's results, checked: one per task, each ``(j, values (n,), calls, rows, low)``, finite; put in
    task order (a map that returns in completion order is fine), else a ValueError naming the task."""
    by_level = {}
    for item in results:
        if not (isinstance(item, tuple) and len(item) == 5):
            raise ValueError(f"`workers` returned {type(item).__name__} where a level's result was expected: "
                             "the map must return func(task) for every task")
        j, values, calls, rows, low = item
        values = np.asarray(values, dtype=float)
        if values.shape != (n,) or not np.all(np.isfinite(values)):
            raise ValueError(f"`workers` returned a {'non-finite' if values.shape == (n,) else 'wrong-shaped'} "
                             f"result for level {j}")
        by_level[int(j)] = (values, int(calls), int(rows), low)
    missing = [j for j in levels if j not in by_level]
    if missing or len(by_level) != len(levels):
        raise ValueError(f"`workers` returned {len(by_level)} results for {len(levels)} tasks "
                         f"(levels {missing[:5]} missing): the map must return one result per task")
    return [by_level[j] for j in levels]


def _mapper(workers, func):
    """``(map, close, chunk)`` for ``workers`` in SciPy's convention: 1 is serial, an int n > 1
    a pool of n processes (``func`` must then pickle), -1 one per CPU, a map-like callable
    ``workers(func, iterable)`` is used as it is. ``chunk`` levels are in memory at once."""
    if callable(workers):
        return workers, (lambda: None), 16
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers == 0 or workers < -1:
        raise ValueError(f"`workers` must be a positive int, -1, or a map-like callable workers(func, iterable), "
                         f"got {workers!r}")
    if workers == 1:
        return map, (lambda: None), 1
    try:
        pickle.dumps(func)
    except Exception as err:
        raise TypeError(f"`workers` = {workers} runs the score in other processes, so the score and the process "
                        f"must pickle, and they do not ({type(err).__name__}: {err}). Define the model at module "
                        "level, use the adapters (they pickle when the model does), or pass a map-like callable "
                        "such as concurrent.futures.ThreadPoolExecutor(4).map") from None
    n = (os.cpu_count() or 1) if workers == -1 else int(workers)
    pool = ProcessPoolExecutor(max_workers=n)
    return pool.map, pool.shutdown, 4 * n


def grid_route(score, process, ts, x0, rng, *, n_grid=200, velocity=None):
    """Algorithm 2, steps 2-3, by the dense-grid map (derived here: docs/derivations.md,
    section 4): :func:`estimate_schedule_map` on ``n_grid`` levels, ``ts* = Lambda^{-1}(i
    Lambda / T)``; ``costs`` are the squared shares of the map's length over the steps of
    ``ts``. Returns ``(ts_star, costs, length)``."""
    smap = estimate_schedule_map(score, process, x0, rng, n_grid=n_grid, velocity=velocity, n_groups=2)
    costs = np.diff(np.interp(ts, smap.ts, smap.Lambda)) ** 2
    return smap.schedule(len(ts) - 1), costs, smap.length


ROUTES = {"intervals": interval_route, "grid": grid_route}


def _cumulative_in_log_nu(process, ts, delta):
    """``Lambda`` on a grid uniform in ``u = log nu``: the trapezoid rule in ``u`` on
    ``sqrt(delta) dt/du`` (docs/derivations.md, section 5). The integrand is far smoother in
    ``u`` than in ``t``: on 50 levels its error for N(0, diag k^-1.5), d = 64, under
    ``vp_linear`` is 2e-5 relative, against 2e-3 for the trapezoid in ``t``."""
    u = np.log(process.nsr(ts))
    dt_du = 1.0 / np.abs(elementwise_grad(lambda t: anp.log(process.nsr(t)))(ts))
    f = np.sqrt(np.maximum(delta, 0.0)) * dt_du
    return np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(u))])


def _group_moments(x0, n_groups):
    """Per-row mean and variance of the row's sample group (``n_groups`` as in the batch
    means), each of shape (n, d)."""
    mean, var = np.empty_like(x0), np.empty_like(x0)
    for g in np.array_split(np.arange(len(x0)), int(n_groups)):
        mean[g], var[g] = x0[g].mean(axis=0), x0[g].var(axis=0)
    return mean, var


def _gaussian_control(values, process, x, t, v2, mean, var):
    """Control variate from the data's Gaussian fit N(mean, diag var) (docs/derivations.md, 5.2).

    Its score ``S_G = -(x - s mean)/A``, ``A = s^2 var + sigma^2``, has the per-sample
    local cost ``g = v^2 ||s' mean / A + (x - s mean) A' / A^2||^2`` whose mean under
    the noising of the data depends only on the data's first two moments:
    ``E g = v^2 sum_k [s'^2 mean_k^2 / A_k^2 + A'_k^2 / A_k^3]`` (the closed form of
    :func:`gaussian_local_cost`). The moments are those of each row's sample group, so
    that ``E g`` is exact given the group's data and the groups stay independent: the
    batch-means error bars remain honest. Returns ``values - beta (g - E g)`` with the
    variance-minimising ``beta = cov(values, g) / var(g)`` of this level's samples.
    """
    s, sigma = float(process.s(t)), float(process.sigma(t))
    s_dot, sigma_dot = (float(elementwise_grad(f)(float(t))) for f in (process.s, process.sigma))
    A = s ** 2 * var + sigma ** 2
    A_dot = 2 * s * s_dot * var + 2 * sigma * sigma_dot
    g = v2 * np.sum((s_dot * mean / A + (x - s * mean) * A_dot / A ** 2) ** 2, axis=1)
    g_mean = v2 * np.sum(s_dot ** 2 * mean ** 2 / A ** 2 + A_dot ** 2 / A ** 3, axis=1)
    centred = g - g_mean
    denominator = np.dot(centred - centred.mean(), centred - centred.mean())
    beta = np.dot(values - values.mean(), centred - centred.mean()) / denominator if denominator > 0 else 0.0
    return values - beta * centred


def _version():
    try:
        return package_version("scoreopt")
    except Exception:           # not installed (a vendored copy)
        return "unknown"


# --------------------------------------------------------------------------------
# Your model: processes of other conventions, adapters, export
# --------------------------------------------------------------------------------

def _flow_s(t):
    return 1.0 - t


def _flow_sigma(t):
    return 1.0 * t


def flow_matching(t_min=0.002 / 1.002, t_max=80.0 / 81.0):
    """Flow matching / rectified flow: ``s = 1 - t``, ``sigma = t``, so ``x_t = (1 - t) x_0 + t eps``.

    ``nu = t / (1 - t)`` is infinite at ``t = 1``, so ``t_max < 1``. The default range
    is EDM's ``nu`` in ``[0.002, 80]`` (``t = nu / (1 + nu)``), so schedules compare with
    the other processes'; :meth:`ScheduleMap.flow_times` exports a schedule from
    ``t = 1``, where flow-matching models start. A model's velocity
    ``u(x, t) = E[eps - x_0 | x_t]`` becomes a score through :func:`score_from_flow`.
    """
    t_min, t_max = check_real(t_min, "t_min"), check_real(t_max, "t_max")
    if not 0.0 < t_min < t_max < 1.0:
        raise ValueError(f"need 0 < `t_min` < `t_max` < 1 for flow_matching, got {t_min}, {t_max}")
    return Process(s=_flow_s, sigma=_flow_sigma, t_min=t_min, t_max=t_max,
                   name=f"flow_matching({t_min:.6g}, {t_max:.6g})")


def _table_log_snr(log_snr, t):
    """Piecewise linear in ``t`` through ``(k / (N - 1), log_snr[k])``."""
    N = len(log_snr)
    u = t * (N - 1)
    k = np.clip(np.floor(np.asarray(getval(u))), 0, N - 2).astype(int)
    return log_snr[k] + (u - k) * (log_snr[k + 1] - log_snr[k])


def _sigmoid_sqrt(log_snr, sign, t):
    return anp.sqrt(1.0 / (1.0 + anp.exp(-sign * _table_log_snr(log_snr, t))))


def process_from_alphas_cumprod(alphas_cumprod):
    """The process of a discrete-time model defined on a table ``alphas_cumprod[k]``, k = 0..N-1.

    diffusers' DDPM/DDIM models: timestep ``k`` has ``x = sqrt(abar_k) x_0 +
    sqrt(1 - abar_k) eps``. Here time ``t_k = k / (N - 1)`` on ``[0, 1]``, and between the
    table's points the log-SNR ``lambda = log(abar / (1 - abar))`` is interpolated
    linearly, so ``s = sqrt(sigmoid(lambda))``, ``sigma = sqrt(sigmoid(-lambda))`` are exact
    at every table point and the schedule refers to the model's own noise levels.
    :func:`to_timesteps` maps schedule times back to the model's integer timesteps.
    ``alphas_cumprod`` must be strictly decreasing in ``(0, 1)``, with at least 2 entries,
    and its log-SNR must fall by a resolvable amount (more than 1e-9) at every step.
    """
    abar = as_real_array(alphas_cumprod, "alphas_cumprod")
    if abar.ndim != 1 or len(abar) < 2:
        raise ValueError("`alphas_cumprod` must be a 1-D table of at least 2 values")
    if not (np.all(np.isfinite(abar)) and np.all((abar > 0) & (abar < 1))):
        raise ValueError("`alphas_cumprod` must lie strictly between 0 and 1")
    if not np.all(np.diff(abar) < 0):
        raise ValueError("`alphas_cumprod` must be strictly decreasing (noise grows with the timestep)")
    log_snr = np.log(abar) - np.log1p(-abar)
    flat = np.flatnonzero(np.diff(log_snr) > -1e-9)
    if len(flat):
        raise ValueError(f"`alphas_cumprod` is too flat: its log-SNR falls by {-np.diff(log_snr)[flat[0]]:.3g} "
                         f"from entry {flat[0]} to {flat[0] + 1} (at least 1e-9 is needed to tell the levels apart)")
    return Process(s=partial(_sigmoid_sqrt, log_snr, 1.0), sigma=partial(_sigmoid_sqrt, log_snr, -1.0),
                   t_min=0.0, t_max=1.0, name=f"alphas_cumprod(N={len(abar)})", n_timesteps=len(abar))


def to_timesteps(process, ts, *, merge=False):
    """A schedule's times as a discrete-time model's integer timesteps, descending (diffusers' order).

    For a process from :func:`process_from_alphas_cumprod`: ``k = round(t (N - 1))``, exact
    for times on the table. A discrete-time model cannot take two levels between the same
    pair of its table's points: if two times round to the same timestep, that is an
    error, or with ``merge=True`` they are merged with a ``RuntimeWarning`` that says how
    many steps remain.
    """
    process = check_process(process)
    ts, merge = check_schedule(ts, process), check_bool(merge, "merge")
    if process.n_timesteps < 2:
        raise ValueError("`process` must come from `process_from_alphas_cumprod` (a discrete-time model)")
    return _table_timesteps(ts, process.n_timesteps, merge)


def _table_timesteps(ts, N, merge):
    k = np.rint(ts * (N - 1)).astype(int)
    if np.any(np.diff(k) <= 0):
        if not merge:
            raise ValueError("two schedule times round to the same timestep of the model's table: use fewer "
                             "steps, or merge=True")
        k = np.unique(k)
        warnings.warn(f"levels closer than the model's table merged: {len(k) - 1} of {len(ts) - 1} steps remain",
                      RuntimeWarning, stacklevel=3)
    return k[::-1].copy()


def to_sigmas(process, ts):
    """The levels of a schedule as descending ``nu`` with a trailing 0 (k-diffusion / diffusers
    ``sigmas=``): ``T + 1`` levels for a ``T``-step schedule, so ``T + 1`` Euler model calls,
    the last from ``nu(t_min)`` to 0 (the final denoising; ``sampler.sample(...,
    denoise=True)`` with the Euler step, tested against k-diffusion's ``sample_euler``).
    :meth:`ScheduleMap.sigmas` takes the number of levels ``n`` as k-diffusion does."""
    process = check_process(process)
    return np.append(process.nsr(check_schedule(ts, process))[::-1], 0.0)


class _Adapter:
    """A user's model and the process it was trained on, as a score ``score(x, t)``.

    A module-level class, so it pickles whenever the model does (``workers=<int>``). The
    model's output is checked where it comes back, before any arithmetic: its type, its
    shape (exactly that of ``x``), its finiteness, and its precision (a dtype below
    float32's is warned of once). ``t`` may be a float or one time per row (an array
    (n,)); the model then gets its per-row ``t`` (or ``nu``) as an array.
    """
    formula = ""

    def __init__(self, model, process, name):
        self.model, self.process, self.name = check_callable(model, name, f"{name}(x, t)"), check_process(process), name
        self.warned, self.low_precision, self.warn = False, None, True

    def __call__(self, x, t):
        raise NotImplementedError

    def run(self, *args, x, t):
        """The model's output on ``args``, checked; a raise is chained with the model's name and the time."""
        try:
            value = self.model(*args)
        except Exception as err:
            raise ScoreEvaluationError(f"`{self.name}` raised {type(err).__name__} at {_when(t)}: {err}"
                                       + _rowwise_hint(t)) from err
        return _checked_array(value, x.shape, t, self.name, self)


class _DenoiserScore(_Adapter):
    def __call__(self, x, t):
        s, nu = _column(self.process.s(t)), self.process.nsr(t)
        y = x / s
        return (self.run(y, nu, x=x, t=t) - y) / (s * _column(nu) ** 2)


class _EpsScore(_Adapter):
    def __call__(self, x, t):
        return -self.run(x, t, x=x, t=t) / _column(self.process.sigma(t))


class _VScore(_Adapter):
    def __call__(self, x, t):
        s, sigma = _column(self.process.s(t)), _column(self.process.sigma(t))
        return -(sigma * x + s * self.run(x, t, x=x, t=t)) / ((s ** 2 + sigma ** 2) * sigma)


class _FlowScore(_Adapter):
    def __call__(self, x, t):
        p = self.process
        s, sigma = _column(p.s(t)), _column(p.sigma(t))
        s_dot, sigma_dot = _column(elementwise_grad(p.s)(t)), _column(elementwise_grad(p.sigma)(t))
        eps = (s * self.run(x, t, x=x, t=t) - s_dot * x) / (s * sigma_dot - sigma * s_dot)
        return -eps / sigma


def score_from_denoiser(denoiser, process):
    """Score of a denoiser ``D(y, nu) ~ E[x_0 | y]`` in k-diffusion/EDM convention.

    EDM's model sees ``y = x / s`` with noise level ``nu`` ("sigma"). Tweedie's formula
    in ``y``, ``D = y + nu^2 grad_y log p(y)``, and ``grad_x = grad_y / s`` give

        S(x, t) = (D(x / s, nu) - x / s) / (s nu^2).
    """
    return _DenoiserScore(denoiser, process, "denoiser")


def score_from_eps(eps_model, process):
    """Score of a noise prediction ``eps(x, t) ~ E[eps | x_t]``: ``S = -eps / sigma``."""
    return _EpsScore(eps_model, process, "eps_model")


def score_from_v(v_model, process):
    """Score of a v-prediction ``v(x, t) ~ E[s eps - sigma x_0 | x_t]`` (Salimans & Ho 2022).

    From ``x = s x_0 + sigma eps`` and ``v = s eps - sigma x_0``:
    ``eps = (sigma x + s v) / (s^2 + sigma^2)`` and ``S = -eps / sigma``.
    """
    return _VScore(v_model, process, "v_model")


def score_from_flow(flow_model, process):
    """Score of a flow-matching velocity ``u(x, t) ~ E[d x_t / dt | x_t] = E[s' x_0 + sigma' eps | x_t]``.

    Solving ``x = s x_0 + sigma eps`` and ``u = s' x_0 + sigma' eps`` for ``eps``:
    ``eps = (s u - s' x) / (s sigma' - sigma s')`` and ``S = -eps / sigma``. Under
    :func:`flow_matching` (``s = 1 - t``, ``sigma = t``) ``u = eps - x_0`` and
    ``S = -(x + (1 - t) u) / t``.
    """
    return _FlowScore(flow_model, process, "flow_model")


class _RowwiseScore:
    def __init__(self, score):
        self.score = check_callable(score, "score", "score(x, t)")

    def __call__(self, x, t):
        if np.ndim(t) == 0:
            return self.score(x, t)
        t = np.asarray(t, dtype=float)
        times, where = np.unique(t, return_inverse=True)
        parts = [np.asarray(self.score(x[where == k], float(tk)), dtype=float) for k, tk in enumerate(times)]
        out = np.empty(x.shape, dtype=float)
        for k, part in enumerate(parts):
            out[where == k] = part
        return out


def rowwise_score(score):
    """A score that takes one float ``t`` at a time, made to take one time per row.

    ``rowwise_score(score)(x, t)`` with ``t`` an array (n,) calls ``score`` once per
    distinct time on the rows that have it. The sampler-aware rules of ``sampler``
    evaluate many times in one call; the built-in targets, ``models.mlp_score`` and the
    adapters take per-row times already. Picklable when ``score`` is.
    """
    return _RowwiseScore(score)


def _column(a):
    """A per-row coefficient (shape (n,)) as a column (n, 1), to scale rows of x; scalars as they are."""
    return anp.reshape(a, (-1, 1)) if anp.ndim(a) else a


# --------------------------------------------------------------------------------
# The schedule-map file (JSON)
# --------------------------------------------------------------------------------

SCHEDULE_MAP_FORMAT = "scoreopt.ScheduleMap/1"
_ORDERS = (1, 2, 3, 4, 6, 8)


def load_schedule_map(path):
    """Read a :class:`ScheduleMap` written by :meth:`ScheduleMap.save`, checking every field.

    A truncated, hand-edited or foreign file raises ``ValueError`` naming the path, the
    field and the rule it breaks: not JSON (or nested too deeply), the wrong format, a
    missing field or one of the wrong type, the grid (times finite and increasing, inside
    the recorded range; ``nu`` finite, positive, increasing, one per time), ``delta``,
    ``Lambda`` and its groups (finite, non-negative, ``Lambda`` starting at 0, not
    decreasing, not all zero), ``length`` (the end of ``Lambda``), the error bars
    (finite, non-negative), ``order`` (one of 1, 2, 3, 4, 6, 8), the counts.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"`{path}` is not a readable schedule map: {type(err).__name__}: {err}") from None
    try:
        return _schedule_map_from_json(data)
    except KeyError as err:
        raise ValueError(f"`{path}` is not a valid schedule map: missing field {err}") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"`{path}` is not a valid schedule map: {err}") from None


def _schedule_map_from_json(data):
    if not isinstance(data, dict) or data.get("format") != SCHEDULE_MAP_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"format is {found!r}, expected {SCHEDULE_MAP_FORMAT!r}")
    arrays = {k: _json_numbers(data[k], k, ndim=2 if k == "Lambda_groups" else 1)
              for k in ("ts", "delta", "delta_stderr", "Lambda", "Lambda_groups")}
    ts = check_schedule(arrays["ts"], endpoints=False)
    n = len(ts)
    for k in ("delta", "delta_stderr", "Lambda"):
        _check_costs(arrays[k], n, name=k)
    Lambda, groups = arrays["Lambda"], arrays["Lambda_groups"]
    if Lambda[0] != 0 or np.any(np.diff(Lambda) < 0) or Lambda[-1] <= 0:
        raise ValueError("`Lambda` must start at 0, not decrease, and not be all zero")
    if groups.shape[1:] != (n,) or len(groups) < 2 or np.any(groups < 0) or np.any(np.diff(groups, axis=1) < 0):
        raise ValueError(f"`Lambda_groups` must be non-negative and non-decreasing with shape (groups >= 2, {n})")
    length = _json_scalar(data["length"], "length")
    if not np.isclose(length, Lambda[-1], rtol=1e-12, atol=0):
        raise ValueError("`length` is not the end of `Lambda`")
    stderr = _json_scalar(data["length_stderr"], "length_stderr")
    grid_error = _json_scalar(data.get("grid_error", 0.0), "grid_error")
    order = data["order"]
    if isinstance(order, bool) or order not in _ORDERS:
        raise ValueError(f"`order` must be one of {_ORDERS}, got {order!r}")
    if isinstance(data["n_evaluations"], bool) or not isinstance(data["n_evaluations"], int) or data["n_evaluations"] < 0:
        raise ValueError(f"`n_evaluations` must be a non-negative integer, got {data['n_evaluations']!r}")
    metadata = data["metadata"]
    if not isinstance(metadata, dict):
        raise ValueError("`metadata` must be an object")
    _check_metadata(metadata, ts)
    return ScheduleMap(ts, arrays["delta"], arrays["delta_stderr"], Lambda, length, stderr, groups, int(order),
                       data["n_evaluations"], metadata, grid_error)


def _check_metadata(metadata, ts):
    """The metadata fields the map's methods use: ``nu`` (one per time, finite, positive,
    increasing), the recorded range (``ts`` inside it), the process name (a string)."""
    if "nu" in metadata:
        nu = _json_numbers(metadata["nu"], "metadata.nu", ndim=1)
        if nu.shape != ts.shape or np.any(nu <= 0) or np.any(np.diff(nu) <= 0):
            raise ValueError(f"`metadata.nu` must be {len(ts)} finite, positive, increasing noise levels")
    if "t_min" in metadata or "t_max" in metadata:
        lo, hi = _json_scalar(metadata.get("t_min"), "metadata.t_min", 0), _json_scalar(metadata.get("t_max"),
                                                                                          "metadata.t_max", 0)
        slack = 1e-6 * (hi - lo)            # bounds saved from float32 values
        if not lo < hi or ts[0] < lo - slack or ts[-1] > hi + slack:
            raise ValueError(f"`ts` must lie inside the recorded range [`metadata.t_min`, `metadata.t_max`] = "
                             f"[{lo}, {hi}]")
    if "process" in metadata and not isinstance(metadata["process"], str):
        raise ValueError("`metadata.process` must be a string")


def _json_numbers(value, name, ndim):
    """A (nested) list of finite numbers, of ``ndim`` dimensions, as a float array."""
    def numbers(v, depth):
        if depth == 0:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"`{name}` must hold numbers, found {type(v).__name__}")
            return
        if not isinstance(v, list):
            raise TypeError(f"`{name}` must be a {ndim}-D list of numbers, found {type(v).__name__}")
        for item in v:
            numbers(item, depth - 1)
    numbers(value, ndim)
    out = np.array(value, dtype=float)
    if out.ndim != ndim or not np.all(np.isfinite(out)):
        raise ValueError(f"`{name}` must be a finite {ndim}-D array (rows of one length)")
    return out


def _json_scalar(value, name, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return float(value)


def _jsonable(value, name):
    """``value`` as plain JSON (NumPy scalars and arrays converted), refusing non-finite
    numbers and unknown types with a ``ValueError``/``TypeError`` naming the field."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, name) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), name)
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot save field `{name}`: it holds {value}, not a finite number")
        return value
    raise TypeError(f"cannot save field `{name}`: {type(value).__name__} is not a number, string, list or dict")


# --------------------------------------------------------------------------------
# Command line: python -m scoreopt MAP.json --steps N
# --------------------------------------------------------------------------------

def main(argv=None):
    """``python -m scoreopt MAP.json -n 20 [--convention ...] [--json]``: inspect a saved map and
    print its schedule for ``n`` model calls in a sampler's convention. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m scoreopt", description=(
        "Inspect a schedule map saved by ScheduleMap.save and print its schedule in a sampler's convention."))
    parser.add_argument("path", help="a schedule map (JSON) written by ScheduleMap.save")
    parser.add_argument("-n", "--levels", type=int, default=None,
                        help="number of noise levels = model calls with an Euler sampler (k-diffusion's n)")
    parser.add_argument("--convention", default="k-diffusion",
                        choices=["k-diffusion", "diffusers-sigmas", "diffusers-timesteps", "flow", "times"],
                        help="k-diffusion / diffusers-sigmas: n descending nu then 0; diffusers-timesteps: n "
                             "integer timesteps of an alphas_cumprod map; flow: n flow-matching times from 1; "
                             "times: the map's own n - 1 step schedule in t")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        smap = load_schedule_map(args.path)
        values = None if args.levels is None else _export(smap, args.convention, args.levels)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = {"path": args.path, "process": (smap.metadata or {}).get("process"), "length": smap.length,
            "length_stderr": smap.length_stderr, "grid_error": smap.grid_error, "n_grid": len(smap.ts),
            "n_evaluations": smap.n_evaluations}
    if values is not None:
        info.update(convention=args.convention, n=args.levels, values=values.tolist())
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.path}: process {info['process']}, Lambda = {smap.length:.4f} +- {smap.length_stderr:.4f} "
          f"(grid error {smap.grid_error:.2g}), {len(smap.ts)} levels, {smap.n_evaluations} evaluations")
    if values is not None:
        print(f"{args.convention}, n = {args.levels}:")
        print(" ".join(f"{v:.6g}" for v in values))
    return 0


def _export(smap, convention, n):
    """The CLI's export of a loaded map (no process object: the metadata says which it was)."""
    if convention in ("k-diffusion", "diffusers-sigmas"):
        return smap.sigmas(n)
    if convention == "times":
        return smap.schedule(check_int(n, "n", minimum=2) - 1)
    name = (smap.metadata or {}).get("process", "")
    if convention == "flow":
        if not name.startswith("flow_matching"):
            raise ValueError(f"`--convention flow` needs a map of a flow_matching process; this one is {name!r}")
        return smap._flow_times(n, True)
    N = (smap.metadata or {}).get("n_timesteps", 0)
    if not (isinstance(N, int) and N >= 2):
        raise ValueError(f"`--convention diffusers-timesteps` needs a map of an alphas_cumprod process; this one "
                         f"is {name!r}")
    return _table_timesteps(smap.schedule(check_int(n, "n", minimum=2) - 1), N, False)


# ================================================================================
# VALIDATION HELPERS AND UTILITIES (public: sampler.py and models.py use them too)
# ================================================================================

class ScoreEvaluationError(RuntimeError):
    """A score (or another user callable) raised; the original error is its ``__cause__``."""


class _CheckedScore:
    """``score(x, t)`` checked at every call (:func:`checked_score`)."""

    def __init__(self, score, name, batch_size, warn=True):
        self.score, self.name, self.batch_size = score, name, batch_size
        self.calls = self.evaluations = 0
        self.warned, self.low_precision, self.warn = False, None, warn

    def __call__(self, x, t):
        n = len(x)
        size = n if self.batch_size is None else self.batch_size
        parts = [self._call(x[i:i + size], t if np.ndim(t) == 0 else t[i:i + size]) for i in range(0, n, size)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _call(self, x, t):
        self.calls, self.evaluations = self.calls + 1, self.evaluations + len(x)
        if isinstance(self.score, _Adapter):      # it checks and names its model's output itself
            self.score.warn = self.warn
            value = self.score(x, t)
            self.low_precision = self.low_precision or self.score.low_precision
            return self.check(value, x, t)
        try:
            value = self.score(x, t)
        except Exception as err:
            raise ScoreEvaluationError(f"`{self.name}` raised {type(err).__name__} at {_when(t)}: {err}"
                                       + _rowwise_hint(t)) from err
        return self.check(value, x, t)

    def check(self, value, x, t):
        return _checked_array(value, x.shape, t, self.name, self)


def checked_score(score, name="score", batch_size=None):
    """``score`` wrapped so that every call is checked and counted.

    A raise is re-raised as :class:`ScoreEvaluationError` naming the time, with the
    original error as its cause; a result that is not an array of ``x``'s shape, or not
    finite, is a ``ValueError`` naming the time; a dtype below float32 precision is
    warned of once. ``batch_size`` splits calls into chunks of at most that many rows
    (the results are concatenated, identical to one call). The wrapper counts ``calls``
    and ``evaluations`` (rows). The original callable is ``.score``. A checked score
    passed again is returned as it is.
    """
    if isinstance(score, _CheckedScore) and batch_size is None:
        return score
    check_callable(score, name, f"{name}(x, t)")
    batch_size = None if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
    return _CheckedScore(getattr(score, "score", score) if isinstance(score, _CheckedScore) else score, name,
                         batch_size)


def _when(t):
    if np.ndim(t) == 0:
        return f"t = {float(getval(t)):.6g}"
    t = np.asarray(getval(t), dtype=float)
    return f"t in [{t.min():.6g}, {t.max():.6g}] (one time per row)"


def _rowwise_hint(t):
    return ("; it was given one time per row, an array of shape (n,): a score that takes one float t at a time "
            "can be wrapped with scoreopt.rowwise_score(score)") if np.ndim(t) else ""


def _checked_array(value, shape, t, name, owner=None):
    """``value`` as a float64 array of ``shape``, finite; else a TypeError/ValueError naming
    ``name`` and the time. A dtype below float32 precision is warned of once per ``owner``
    (or recorded in ``owner.low_precision`` for the caller to warn of)."""
    if not (isinstance(value, np.ndarray) or hasattr(value, "__array__")):      # None, a list, a float, ...
        raise TypeError(f"`{name}` returned {type(value).__name__} at {_when(t)}; expected an array of shape "
                        f"{tuple(shape)}")
    if np.iscomplexobj(value):
        raise ValueError(f"`{name}` returned complex values at {_when(t)}")
    dtype = getattr(value, "dtype", None)
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` returned {type(value).__name__} at {_when(t)}, which is not an array of "
                        f"numbers; expected shape {shape}") from None
    if array.shape != tuple(shape):
        raise ValueError(f"`{name}` returned shape {array.shape} at {_when(t)}; expected {tuple(shape)}"
                         + _rowwise_hint(t))
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` returned non-finite values at {_when(t)}")
    if owner is not None and not owner.warned and _low_precision(dtype):
        owner.warned, owner.low_precision = True, np.dtype(dtype).name
        if owner.warn:
            _warn_low_precision(name, owner.low_precision)
    return array


def _warn_low_precision(name, dtype):
    warnings.warn(f"`{name}` returns {dtype}, below float32 precision: costs and schedules computed from it are "
                  "biased (measured: about 9% in Lambda with float16); cast the model's output to float32 or "
                  "float64", RuntimeWarning, stacklevel=5)


def _low_precision(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return False
    return dtype.kind == "f" and np.finfo(dtype).eps > np.finfo(np.float32).eps


def as_rng(rng):
    """A ``numpy.random.Generator`` from a Generator or a non-negative int seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"`rng` as a seed must be a non-negative integer, got {rng}")
        return np.random.default_rng(int(rng))
    raise TypeError(f"`rng` must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def noised(process, x0, t, rng):
    """A draw of ``x_t = s(t) x0 + sigma(t) eps`` with fresh ``eps`` (``t`` a float)."""
    return float(process.s(t)) * x0 + float(process.sigma(t)) * rng.standard_normal(x0.shape)


def mean_stderr(values):
    """Monte-Carlo mean and standard error over the last axis (floats for 1-D input)."""
    mean = np.mean(values, axis=-1)
    stderr = np.std(values, axis=-1, ddof=1) / np.sqrt(values.shape[-1])
    return Estimate(float(mean), float(stderr)) if np.ndim(values) == 1 else Estimate(mean, stderr)


def write_atomically(path, data):
    """Write ``path`` through a temporary file in the same folder: ``data`` (``str``, ``bytes``,
    or a function ``data(f)`` writing to the open binary file) is written, flushed, renamed
    over ``path``, and the folder flushed too; permissions are 0666 less the umask.

    What holds after any interruption, a SIGKILL included: ``path`` is either the previous
    file or the new one, never a mixture. The temporary file is named
    ``.<name>.<pid>.<random>.tmp``; one left by a killed writer is removed by the next write
    of the same path (only if its process is gone, so concurrent writers are safe). A symbolic
    link at ``path`` is followed: the file it points to is replaced. An ``OSError`` (a full
    disk) names the path and says the previous file is unchanged.
    """
    if isinstance(data, (str, bytes)):
        payload = data.encode() if isinstance(data, str) else data
        data = lambda f: f.write(payload)
    path = os.path.realpath(path)
    folder, base = os.path.split(path)
    _remove_stale_temporaries(folder, base)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.{os.getpid()}.", suffix=".tmp")
    except OSError as err:
        raise OSError(err.errno, f"cannot write `{path}`: {err.strerror}; the previous file is unchanged") from err
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write `{path}`: {err.strerror}; the previous file is "
                                     "unchanged") from err
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _remove_stale_temporaries(folder, base):
    """Remove ``.<base>.<pid>.*.tmp`` files whose writing process no longer exists."""
    prefix = f".{base}."
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _process_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def progress_printer(label="", lines=10, file=None):
    """A callback ``callback(done, total, info)`` that prints ``label done/total`` about ``lines``
    times a run, with what ``info`` holds of ``loss``, ``Lambda``, ``evaluations`` and ``elapsed``."""
    lines = check_int(lines, "lines", minimum=1)

    def callback(done, total, info):
        every = max(1, total // lines)
        if done % every and done != total:
            return
        parts = [f"{label} {done}/{total}".strip()]
        for key, fmt in (("loss", "loss {:.4f}"), ("Lambda", "Lambda {:.3f}"), ("evaluations", "{:,} evaluations")):
            if info.get(key) is not None:
                parts.append(fmt.format(info[key]))
        if "elapsed" in info:
            parts.append(f"{info['elapsed']:.1f} s")
        print("  ".join(parts), file=file or sys.stdout, flush=True)
    return callback


def check_schedule(ts, process=None, endpoints=True, name="ts", min_len=2):
    """Validate a schedule and return it as a float64 array.

    Rules: 1-D, at least ``min_len`` finite times, strictly increasing; with a ``process``,
    inside ``[t_min, t_max]`` and (if ``endpoints``) starting at ``t_min`` and ending
    at ``t_max`` exactly.
    """
    ts = as_real_array(ts, name)
    if ts.ndim != 1 or len(ts) < min_len:
        raise ValueError(f"`{name}` must be a 1-D array of at least {min_len} times")
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"`{name}` must be finite")
    bad = np.flatnonzero(np.diff(ts) <= 0)
    if len(bad):
        raise ValueError(f"`{name}` must be strictly increasing (index {bad[0]} to {bad[0] + 1})")
    if process is not None:
        process = check_process(process)
        if endpoints and (ts[0] != process.t_min or ts[-1] != process.t_max):
            raise ValueError(f"`{name}` must start at t_min = {process.t_min} and end at "
                             f"t_max = {process.t_max} exactly")
        if ts[0] < process.t_min or ts[-1] > process.t_max:
            raise ValueError(f"`{name}` must lie in [{process.t_min}, {process.t_max}]")
    return ts


def check_data(x, name="x0", min_rows=1):
    """Validate a batch of samples: a finite float array of shape ``(n, d)``, ``n >= min_rows``."""
    x = as_real_array(x, name)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must have shape (n, d), got {x.shape} (1-D data: pass x[:, None])")
    if len(x) < min_rows or x.shape[1] < 1:
        raise ValueError(f"`{name}` needs at least {min_rows} row{'s' if min_rows > 1 else ''} and one column, "
                         f"got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{name}` must be finite")
    return x


def check_process(process):
    """``process`` if it is a :class:`Process` with finite ``t_min < t_max``, else an error."""
    if not isinstance(process, Process):
        raise TypeError(f"`process` must be a scoreopt.Process, got {type(process).__name__}")
    if not (np.isfinite(process.t_min) and np.isfinite(process.t_max) and process.t_min < process.t_max):
        raise ValueError(f"`process` must have finite t_min < t_max, got [{process.t_min}, {process.t_max}]")
    return process


def check_int(value, name, minimum):
    """An integer (not a bool) at least ``minimum``, as ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_real(value, name):
    """A finite real number (not a bool, not complex), as ``float``."""
    if np.iscomplexobj(value):
        raise TypeError(f"`{name}` must be a real number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        if not (isinstance(value, np.ndarray) and value.ndim == 0):
            raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be finite")
    return value


def check_positive(value, name):
    """A finite positive real number, as ``float``."""
    value = check_real(value, name)
    if value <= 0:
        raise ValueError(f"`{name}` must be positive, got {value}")
    return value


def check_bool(value, name):
    """``True`` or ``False`` (or a NumPy bool): a string such as ``'no'`` or ``'False'`` is refused,
    not read as truthy."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"`{name}` must be True or False, got {value!r}")


def check_callable(f, name, signature):
    """``f`` if it is callable, else a TypeError naming ``name`` and the ``signature`` expected."""
    if not callable(f):
        raise TypeError(f"`{name}` must be callable as {signature}, got {type(f).__name__}")
    return f


def as_real_array(x, name):
    """``x`` as a float64 array; complex or non-numeric input is a TypeError naming ``name``."""
    if np.iscomplexobj(x):
        raise TypeError(f"`{name}` must be real, got complex values")
    try:
        return np.array(x, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be an array of real numbers") from None


def _check_steps(T):
    return check_int(T, "T", minimum=1)


def _check_gamma(gamma):
    gamma = check_real(gamma, "gamma")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"`gamma` must lie in (0, 1], got {gamma}")
    return gamma


def _check_dtype(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"`dtype` must be a NumPy floating dtype such as np.float32, got {dtype!r}") from None
    if dtype.kind != "f":
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}")
    return dtype


def _check_callback(callback):
    return None if callback is None else check_callable(callback, "callback", "callback(done, total, info)")


def _check_costs(costs, length=None, name="costs", nonempty=False):
    costs = as_real_array(costs, name)
    if costs.ndim != 1 or (length is not None and len(costs) != length):
        want = "a 1-D array" if length is None else f"a 1-D array of length {length}"
        raise ValueError(f"`{name}` must be {want}, got shape {costs.shape}")
    if nonempty and len(costs) == 0:
        raise ValueError(f"`{name}` must not be empty: a schedule has at least one step")
    bad = np.flatnonzero(~np.isfinite(costs) | (costs < 0))
    if len(bad):
        raise ValueError(f"`{name}` must be finite and non-negative; entry {bad[0]} "
                         f"(interval {bad[0]}) is {costs[bad[0]]}")
    return costs


def _grid_iv(ts, delta, order):
    ts = check_schedule(ts, endpoints=False)
    return ts, _check_costs(delta, len(ts), name="delta"), check_positive(order, "order")


def _cost_iv(score, process, t_cur, t_next, x0, rng, velocity, towards_data=False):
    """The checked arguments of a cost: ``(score, process, t_cur, t_next, x0, rng, v)``."""
    process = check_process(process)
    score = checked_score(score)
    t_cur, t_next = check_step_times(t_cur, t_next, process, towards_data)
    x0 = check_data(x0, min_rows=2)
    return score, process, t_cur, t_next, x0, as_rng(rng), _checked_velocity(velocity, process)


def _local_cost_iv(score, process, ts, x0, rng, velocity):
    process = check_process(process)
    ts = check_schedule(ts, process, endpoints=False, min_len=1)
    return (checked_score(score), process, ts, check_data(x0, min_rows=2), as_rng(rng),
            _checked_velocity(velocity, process))


def _per_interval(cost, score, process, t, t2, x0, rng, v):
    """A one-interval cost on scalar times, or on each pair of arrays of times (in order)."""
    if t.ndim == 0:
        return cost(score, process, float(t), float(t2), x0, rng, v)
    out = [cost(score, process, float(a), float(b), x0, rng, v) for a, b in zip(t.ravel(), t2.ravel())]
    return Estimate(*(np.array(c).reshape(t.shape) for c in zip(*out)))


def _checked_velocity(velocity, process):
    """``process.sigma`` for None; else ``velocity`` whose every value is checked: finite and
    non-negative, else a ``ValueError`` naming the time (not a NaN cost blamed on ``delta``)."""
    if velocity is None:
        return process.sigma
    check_callable(velocity, "velocity", "v(t)")

    def v(t):
        value = velocity(t)
        if np.iscomplexobj(value) or not np.all(np.isfinite(value)) or np.any(np.asarray(value) < 0):
            raise ValueError(f"`velocity` returned {value} at t = {float(t):.6g}; it must be finite and >= 0")
        return value
    return v


def check_step_times(t_cur, t_next, process, towards_data=False):
    """The times of a step's two ends, as float arrays: finite, in ``[t_min, t_max]``, of one shape.
    The corrector and predictor costs are defined for either order (their local expansion
    is written ``L(t, t + h)``); a sampler step (``towards_data``) needs ``t_next < t_cur``."""
    t_cur, t_next = _check_times(t_cur, process, "t_cur"), _check_times(t_next, process, "t_next")
    if t_cur.shape != t_next.shape:
        raise ValueError(f"`t_cur` and `t_next` must have the same shape, got {t_cur.shape} and {t_next.shape}")
    if towards_data and np.any(t_next >= t_cur):
        raise ValueError("`t_next` must be below `t_cur` (a step goes from the noisier time towards the data), "
                         f"got t_cur = {t_cur}, t_next = {t_next}")
    return t_cur, t_next


def _check_times(ts, process, name):
    """Finite real times (any shape) inside ``[t_min, t_max]``, as a float array."""
    ts = as_real_array(ts, name)
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"`{name}` must be finite")
    if np.any(ts < process.t_min) or np.any(ts > process.t_max):
        raise ValueError(f"`{name}` must lie in [{process.t_min}, {process.t_max}], the process's range")
    return ts


def _resolve(choice, aliases, name):
    """A function given as itself or by one of its alias names."""
    if callable(choice):
        return choice
    if isinstance(choice, str) and choice in aliases:
        return aliases[choice]
    raise ValueError(f"`{name}` must be a function or one of {sorted(aliases)}, got {choice!r}")


def _fd_steps(process, ts, rel_step):
    """Time steps with a relative step ``rel_step`` in log nu, ``h = rel_step / (d log nu / dt)``,
    at most a quarter of the process range (so one stencil always fits inside it)."""
    rate = np.abs(elementwise_grad(lambda t: anp.log(process.nsr(t)))(ts))
    return np.minimum(rel_step / rate, 0.25 * (process.t_max - process.t_min))


def _nsr_range(process):
    nu_min, nu_max = process.nsr(np.array([process.t_min, process.t_max]))
    return float(nu_min), float(nu_max)


def _schedule_from_nsr(process, nu):
    """Map noise levels (any order) to an increasing schedule with exact endpoints."""
    ts = _pin(_time_from_nsr(process, np.sort(nu)), process)
    if not np.all(np.diff(ts) > 0):
        raise ValueError("the noise levels map to coinciding times; use fewer steps")
    return ts


def _trapezoid_increments(ts, delta, order):
    root = delta ** (1.0 / order)
    return 0.5 * (root[1:] + root[:-1]) * np.diff(ts)


def _pin(ts, ref):
    """Set the endpoints exactly: ``ref`` is a Process or a reference schedule."""
    ts = np.array(ts, dtype=float)
    lo, hi = (ref.t_min, ref.t_max) if isinstance(ref, Process) else (ref[0], ref[-1])
    ts[0], ts[-1] = lo, hi
    return ts


if __name__ == "__main__":
    sys.exit(main())
