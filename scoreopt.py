"""Score-optimal diffusion schedules.

Reference implementation of C. Williams, A. Campbell, A. Doucet, S. Syed,
*Score-Optimal Diffusion Schedules*, NeurIPS 2024 (arXiv:2412.07877): the cost of
moving samples between noise levels, the path length it induces, and the schedule
that spends equal cost on every step.

Conventions (stated once): time ``t`` runs over ``[t_min, t_max]``; ``t = 0`` is
the data end and ``t = 1`` the Gaussian end. A *schedule* ``ts`` is a 1-D float64
array of ``T + 1`` strictly increasing times with ``ts[0] == t_min`` and
``ts[-1] == t_max`` exactly; sampling walks it backwards. Marginals are
``x_t = s(t) x_0 + sigma(t) eps``. A score is any callable ``score(x, t)`` with
``x`` of shape ``(n, d)`` and scalar ``t`` returning ``(n, d)``.

Symbols (code name: meaning):

    s, sigma          signal scale and noise std of the marginal
    drift, diffusion_sq   f = s'/s and g^2 = 2 sigma sigma' - 2 f sigma^2
    nsr               nu = sigma / s, the noise-to-signal ratio (EDM's "sigma")
    velocity          v(t), corrector speed, default v = sigma
    cost              L(t, t'), incremental cost of one step
    local_cost        delta(t), L(t, t + h) = delta(t) h^2 + O(h^3)
    Lambda, length    cumulative length Lambda(t) = int sqrt(delta), total length
    energy            E = int delta(phi) phi'^2 du of a schedule generator phi
    gamma             blend rate of the online update

Which parts follow the paper and which are derived here is said in each
docstring ("derived" marks the latter; see the README).
"""

import functools
import json
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from typing import Callable, NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad, make_jvp
from autograd.tracer import getval
from scipy.interpolate import PchipInterpolator

__all__ = [
    "Process", "ve", "vp_linear", "vp_cosine", "flow_matching", "process_from_alphas_cumprod",
    "to_timesteps", "score_from_denoiser", "score_from_eps", "score_from_v", "score_from_flow",
    "nsr", "time_from_nsr", "to_sigmas",
    "uniform_schedule", "edm_schedule", "loglinear_schedule", "cosine_schedule",
    "arctan_schedule", "baseline_schedules", "corrector_cost", "predictor_cost", "step_cost", "gaussian_step_cost", "interval_costs",
    "local_cost", "gaussian_local_cost", "gaussian_corrector_cost",
    "gaussian_predictor_cost", "iterate_schedule", "ddim_coefficients", "cumulative_cost", "optimal_schedule",
    "update_schedule", "blend", "OnlineUpdate", "online_update", "path_length", "path_energy", "ScheduleMap",
    "estimate_schedule_map", "load_schedule_map", "EqualCostResult", "equal_cost_schedule",
    "as_rng", "check_schedule", "check_data", "ScoreEvaluationError",
]

# Relative floor on the length increments of a step (Algorithm 1): a zero-cost
# interval would make the cumulative length flat and its inverse undefined, so each
# increment is raised to at least this fraction of the largest one.
INCREMENT_FLOOR = 1e-8


# --------------------------------------------------------------------------------
# Processes (SPEC section 2)
# --------------------------------------------------------------------------------

class Process(NamedTuple):
    """A forward noising process with marginals ``x_t = s(t) x_0 + sigma(t) eps``.

    ``s`` and ``sigma`` are functions of ``t`` (scalar or array) written with
    ``autograd.numpy`` so that everything below can be differentiated in ``t``.
    The forward SDE ``dX = f X dt + g dW`` with ``f = s'/s`` and
    ``g^2 = 2 sigma sigma' - 2 f sigma^2`` has exactly these marginals.
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


def ve(sigma_min=0.002, sigma_max=80.0):
    """Variance-exploding process: ``s = 1``, ``sigma = sigma_min (sigma_max/sigma_min)^t``.

    Geometric in ``t`` so that uniform ``t`` is uniform in ``log sigma``; a choice of
    coordinates only (nothing optimal depends on it). Range ``t`` in ``[0, 1]``.
    """
    _check_positive(sigma_min, "sigma_min")
    _check_positive(sigma_max, "sigma_max")
    if not sigma_min < sigma_max:
        raise ValueError("`sigma_min` must be smaller than `sigma_max`")
    log_ratio = np.log(sigma_max / sigma_min)
    return Process(s=lambda t: 1.0 + 0.0 * t,
                   sigma=lambda t: sigma_min * anp.exp(log_ratio * t),
                   t_min=0.0, t_max=1.0, name=f"ve({sigma_min:g}, {sigma_max:g})")


def vp_linear(beta_min=0.1, beta_max=20.0, t_min=1e-3):
    """Variance-preserving process with linear ``beta(t) = beta_min + t (beta_max - beta_min)``.

    ``s(t) = exp(-1/2 int_0^t beta)`` and ``sigma = sqrt(1 - s^2)`` (Song et al. 2021,
    the "linear" schedule of the paper's 1-D experiments). Range ``[t_min, 1]``.
    """
    _check_positive(beta_min, "beta_min")
    _check_positive(beta_max, "beta_max")
    _check_positive(t_min, "t_min")
    if not t_min < 1.0:
        raise ValueError("`t_min` must be smaller than 1")

    def log_s(t):
        return -0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t ** 2)

    return Process(s=lambda t: anp.exp(log_s(t)),
                   sigma=lambda t: anp.sqrt(-anp.expm1(2.0 * log_s(t))),
                   t_min=float(t_min), t_max=1.0,
                   name=f"vp_linear({beta_min:g}, {beta_max:g})")


def vp_cosine(offset=0.008, t_min=1e-3, t_max=0.99):
    """Variance-preserving cosine process of iDDPM (Nichol & Dhariwal 2021).

    ``s = sqrt(alpha_bar)``, ``alpha_bar(t) = cos^2(((t + offset)/(1 + offset)) pi/2)
    / cos^2((offset/(1 + offset)) pi/2)``, ``sigma = sqrt(1 - s^2)``. ``t_max`` is kept
    away from 1, where ``s = 0``; the default 0.99 gives ``nu_max`` of about 64.
    """
    _check_positive(offset, "offset")
    if not 0.0 < t_min < t_max < 1.0:
        raise ValueError("need 0 < `t_min` < `t_max` < 1 for vp_cosine")
    cos0 = np.cos(offset / (1.0 + offset) * np.pi / 2.0)

    def s(t):
        return anp.cos((t + offset) / (1.0 + offset) * np.pi / 2.0) / cos0

    return Process(s=s, sigma=lambda t: anp.sqrt(1.0 - s(t) ** 2),
                   t_min=float(t_min), t_max=float(t_max),
                   name=f"vp_cosine({offset:g})")


def flow_matching(t_min=0.002 / 1.002, t_max=80.0 / 81.0):
    """Flow matching / rectified flow: ``s = 1 - t``, ``sigma = t``, so ``x_t = (1 - t) x_0 + t eps``.

    ``nu = t / (1 - t)`` is infinite at ``t = 1``, so ``t_max < 1``. The default range
    is EDM's ``nu`` in ``[0.002, 80]`` (``t = nu / (1 + nu)``), so schedules compare with
    the other processes' (SPEC 2). A model's velocity ``u(x, t) = E[eps - x_0 | x_t]``
    becomes a score through :func:`score_from_flow`.
    """
    t_min, t_max = _check_real(t_min, "t_min"), _check_real(t_max, "t_max")
    if not 0.0 < t_min < t_max < 1.0:
        raise ValueError(f"need 0 < `t_min` < `t_max` < 1 for flow_matching, got {t_min}, {t_max}")
    return Process(s=lambda t: 1.0 - t, sigma=lambda t: 1.0 * t, t_min=float(t_min), t_max=float(t_max),
                   name=f"flow_matching({t_min:.6g}, {t_max:.6g})")


def process_from_alphas_cumprod(alphas_cumprod):
    """The process of a discrete-time model defined on a table ``alphas_cumprod[k]``, k = 0..N-1.

    diffusers' DDPM/DDIM models: timestep ``k`` has ``x = sqrt(abar_k) x_0 +
    sqrt(1 - abar_k) eps``. Here time ``t_k = k / (N - 1)`` on ``[0, 1]``, and between the
    table's points the log-SNR ``lambda = log(abar / (1 - abar))`` is interpolated
    linearly, so ``s = sqrt(sigmoid(lambda))``, ``sigma = sqrt(sigmoid(-lambda))`` are exact
    at every table point and the schedule refers to the model's own noise levels.
    :func:`to_timesteps` maps schedule times back to the model's integer timesteps.
    ``alphas_cumprod`` must be strictly decreasing in ``(0, 1)``, with at least 2 entries.
    """
    abar = _as_float_array(alphas_cumprod, "alphas_cumprod")
    if abar.ndim != 1 or len(abar) < 2:
        raise ValueError("`alphas_cumprod` must be a 1-D table of at least 2 values")
    if not (np.all(np.isfinite(abar)) and np.all((abar > 0) & (abar < 1))):
        raise ValueError("`alphas_cumprod` must lie strictly between 0 and 1")
    if not np.all(np.diff(abar) < 0):
        raise ValueError("`alphas_cumprod` must be strictly decreasing (noise grows with the timestep)")
    log_snr = np.log(abar) - np.log1p(-abar)
    N = len(abar)

    def lam(t):        # piecewise linear in t through (k / (N - 1), log_snr[k])
        u = t * (N - 1)
        k = np.clip(np.floor(np.asarray(getval(u))), 0, N - 2).astype(int)
        return log_snr[k] + (u - k) * (log_snr[k + 1] - log_snr[k])

    return Process(s=lambda t: anp.sqrt(1.0 / (1.0 + anp.exp(-lam(t)))),
                   sigma=lambda t: anp.sqrt(1.0 / (1.0 + anp.exp(lam(t)))),
                   t_min=0.0, t_max=1.0, name=f"alphas_cumprod(N={N})", n_timesteps=N)


def to_timesteps(process, ts, merge=False):
    """A schedule's times as a discrete-time model's integer timesteps, descending (diffusers' order).

    For a process from :func:`process_from_alphas_cumprod`: ``k = round(t (N - 1))``, exact
    for times on the table. A discrete-time model cannot take two levels between the same
    pair of its table's points: if two times round to the same timestep, that is an
    error, or with ``merge=True`` they are merged with a ``RuntimeWarning`` that says how
    many steps remain.
    """
    ts = check_schedule(ts, process)
    if process.n_timesteps < 2:
        raise ValueError("`process` must come from `process_from_alphas_cumprod` (a discrete-time model)")
    k = np.rint(ts * (process.n_timesteps - 1)).astype(int)
    if np.any(np.diff(k) <= 0):
        if not merge:
            raise ValueError("two schedule times round to the same timestep of the model's table: use fewer "
                             "steps, or merge=True")
        k = np.unique(k)
        warnings.warn(f"levels closer than the model's table merged: {len(k) - 1} of {len(ts) - 1} steps remain",
                      RuntimeWarning, stacklevel=2)
    return k[::-1].copy()


# --------------------------------------------------------------------------------
# Model adapters: a model in any common parametrisation as score(x, t)
# --------------------------------------------------------------------------------

def score_from_denoiser(denoiser, process):
    """Score of a denoiser ``D(y, nu) ~ E[x_0 | y]`` in k-diffusion/EDM convention.

    EDM's model sees ``y = x / s`` with noise level ``nu`` ("sigma"). Tweedie's formula
    in ``y``, ``D = y + nu^2 grad_y log p(y)``, and ``grad_x = grad_y / s`` give

        S(x, t) = (D(x / s, nu) - x / s) / (s nu^2).
    """
    _check_process(process)
    _check_callable(denoiser, "denoiser", "denoiser(y, nu)")

    def score(x, t):
        s, nu = process.s(t), process.nsr(t)
        y = x / s
        return (denoiser(y, nu) - y) / (s * nu ** 2)
    return score


def score_from_eps(eps_model, process):
    """Score of a noise prediction ``eps(x, t) ~ E[eps | x_t]``: ``S = -eps / sigma``."""
    _check_process(process)
    _check_callable(eps_model, "eps_model", "eps_model(x, t)")
    return lambda x, t: -eps_model(x, t) / process.sigma(t)


def score_from_v(v_model, process):
    """Score of a v-prediction ``v(x, t) ~ E[s eps - sigma x_0 | x_t]`` (Salimans & Ho 2022).

    From ``x = s x_0 + sigma eps`` and ``v = s eps - sigma x_0``:
    ``eps = (sigma x + s v) / (s^2 + sigma^2)`` and ``S = -eps / sigma``.
    """
    _check_process(process)
    _check_callable(v_model, "v_model", "v_model(x, t)")

    def score(x, t):
        s, sigma = process.s(t), process.sigma(t)
        return -(sigma * x + s * v_model(x, t)) / ((s ** 2 + sigma ** 2) * sigma)
    return score


def score_from_flow(velocity_model, process):
    """Score of a flow-matching velocity ``u(x, t) ~ E[d x_t / dt | x_t] = E[s' x_0 + sigma' eps | x_t]``.

    Solving ``x = s x_0 + sigma eps`` and ``u = s' x_0 + sigma' eps`` for ``eps``:
    ``eps = (s u - s' x) / (s sigma' - sigma s')`` and ``S = -eps / sigma``. Under
    :func:`flow_matching` (``s = 1 - t``, ``sigma = t``) ``u = eps - x_0`` and
    ``S = -(x + (1 - t) u) / t``.
    """
    _check_process(process)
    _check_callable(velocity_model, "velocity_model", "velocity_model(x, t)")
    ds, dsigma = elementwise_grad(process.s), elementwise_grad(process.sigma)

    def score(x, t):
        s, sigma, s_dot, sigma_dot = process.s(t), process.sigma(t), ds(t), dsigma(t)
        eps = (s * velocity_model(x, t) - s_dot * x) / (s * sigma_dot - sigma * s_dot)
        return -eps / sigma
    return score


def _check_callable(f, name, signature):
    if not callable(f):
        raise TypeError(f"`{name}` must be callable as {signature}")


def nsr(process, ts):
    """Noise-to-signal ratio ``nu = sigma / s`` at the times ``ts`` (array out).

    ``ts`` must be finite and inside ``[t_min, t_max]``, where the process is defined.
    """
    _check_process(process)
    return np.asarray(process.nsr(_check_times(ts, process, "ts")), dtype=float)


def time_from_nsr(process, nu):
    """Invert ``nu(t)``: the times at which the process has noise-to-signal ratio ``nu``.

    Vectorised bisection on ``log nu`` (``nu`` is strictly increasing in ``t``), to
    full float64 resolution. Monotone, and exact at the endpoints: ``nu`` equal to
    ``nu(t_min)`` or ``nu(t_max)`` (to 1e-9 relative) maps to ``t_min``/``t_max``.
    """
    _check_process(process)
    nu = _as_float_array(nu, "nu")
    if np.any(nu <= 0):
        raise ValueError("`nu` must be positive")
    nu_lo, nu_hi = nsr(process, np.array([process.t_min, process.t_max]))
    if np.any(nu < nu_lo * (1 - 1e-9)) or np.any(nu > nu_hi * (1 + 1e-9)):
        raise ValueError(f"`nu` must lie in the process range [{nu_lo:.6g}, {nu_hi:.6g}]")
    target = np.log(nu)
    lo = np.full(nu.shape, float(process.t_min))
    hi = np.full(nu.shape, float(process.t_max))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        below = np.log(nsr(process, mid)) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        if np.all(hi - lo <= 2 * np.spacing(np.maximum(abs(hi), 1.0))):
            break
    t = 0.5 * (lo + hi)
    t = np.where(nu <= nu_lo * (1 + 1e-9), process.t_min, t)
    return np.where(nu >= nu_hi * (1 - 1e-9), process.t_max, t)


def to_sigmas(process, ts):
    """Descending ``nu`` levels with a trailing 0 (k-diffusion / diffusers ``sigmas=``).

    A ``T``-step schedule has ``T + 1`` levels, so k-diffusion's samplers and diffusers'
    ``set_timesteps(sigmas=...)`` take ``T + 1`` steps with it: the last goes from
    ``nu(t_min)`` to 0, i.e. the final denoising (``sampler.sample(..., denoise=True)``
    for the Euler step; tested against k-diffusion's ``sample_euler``).
    """
    ts = check_schedule(ts, process)
    return np.append(nsr(process, ts)[::-1], 0.0)


# --------------------------------------------------------------------------------
# Baseline schedules (SPEC section 3)
# --------------------------------------------------------------------------------

def uniform_schedule(process, T):
    """Uniform in ``t`` (the paper's "linear" schedule for a VP process)."""
    _check_process(process)
    return _pin(np.linspace(process.t_min, process.t_max, _check_steps(T) + 1), process)


def edm_schedule(process, T, rho=7.0):
    """EDM schedule, the paper's Eq. (22) (Karras et al. 2022).

    ``nu_i = (nu_max^(1/rho) + (i/T)(nu_min^(1/rho) - nu_max^(1/rho)))^rho``, mapped to
    ``t`` through ``nu(t)``; the paper compares rho = 3, 7 and 100.
    """
    T = _check_steps(T)
    _check_positive(rho, "rho")
    nu_min, nu_max = _nsr_range(process)
    u = np.arange(T + 1) / T
    nu = (nu_max ** (1 / rho) + u * (nu_min ** (1 / rho) - nu_max ** (1 / rho))) ** rho
    return _schedule_from_nsr(process, nu)


def loglinear_schedule(process, T):
    """Uniform in ``log nu`` ("LogLinear", Lu et al. 2022)."""
    T = _check_steps(T)
    nu_min, nu_max = _nsr_range(process)
    return _schedule_from_nsr(process, np.geomspace(nu_min, nu_max, T + 1))


def cosine_schedule(process, T, offset=0.008):
    """iDDPM cosine noise levels at uniform index, mapped to ``t`` (Nichol & Dhariwal 2021).

    The cosine law ``alpha_bar(u) = cos^2(((u + offset)/(1 + offset)) pi/2) / alpha_bar(0)``
    gives ``nu(u) = sqrt(1/alpha_bar - 1)``; ``u`` is uniform between the values at
    which it meets the process's ``nu_min`` and ``nu_max``. The paper's initial schedule
    for online training. For ``vp_cosine`` with the same offset it is uniform in ``t``.
    """
    T = _check_steps(T)
    nu_min, nu_max = _nsr_range(process)
    cos0 = np.cos(offset / (1.0 + offset) * np.pi / 2.0)
    # alpha_bar = 1 / (1 + nu^2)  <=>  cos(theta) = cos0 / sqrt(1 + nu^2)
    theta_lo, theta_hi = np.arccos(cos0 / np.sqrt(1.0 + np.array([nu_min, nu_max]) ** 2))
    theta = np.linspace(theta_lo, theta_hi, T + 1)
    nu = np.sqrt(np.maximum(cos0 ** 2 / np.cos(theta) ** 2 - 1.0, 0.0))
    nu[0], nu[-1] = nu_min, nu_max
    return _schedule_from_nsr(process, nu)


def arctan_schedule(process, T, c):
    """``arctan(nu_i / c)`` uniform in ``i``: the Gaussian optimum of Align Your Steps.

    Sabour et al. (2024) show this is optimal for an Euler solver on data
    ``N(0, c^2 I)``; ``c`` is the data standard deviation.
    """
    T = _check_steps(T)
    _check_positive(c, "c")
    nu_min, nu_max = _nsr_range(process)
    theta = np.linspace(np.arctan(nu_min / c), np.arctan(nu_max / c), T + 1)
    return _schedule_from_nsr(process, c * np.tan(theta))


def baseline_schedules(process, T, c=0.5):
    """Every baseline of SPEC 3 for ``T`` steps, by name: ``uniform``, ``cosine``,
    ``loglinear``, ``arctan`` (with data standard deviation ``c``) and ``edm3``,
    ``edm7``, ``edm100`` (the rho values the paper compares)."""
    out = {"uniform": uniform_schedule(process, T), "cosine": cosine_schedule(process, T),
           "loglinear": loglinear_schedule(process, T), "arctan": arctan_schedule(process, T, c)}
    out.update({f"edm{rho}": edm_schedule(process, T, float(rho)) for rho in (3, 7, 100)})
    return out


# --------------------------------------------------------------------------------
# Costs (SPEC section 4)
# --------------------------------------------------------------------------------

def corrector_cost(score, process, t_from, t_to, x0, rng, velocity=None):
    """Corrector-optimised incremental cost ``L_c(t, t')`` by Monte Carlo (paper, Sec. 3).

    ``L_c(t, t') = v(t')^2 E_{x ~ p_t} ||S(x, t') - S(x, t)||^2`` with ``t = t_from``
    (noisier) and ``t' = t_to``: the predictor is the identity and a Langevin
    corrector at speed ``v(t')`` must carry ``p_t`` to ``p_t'``. Both scores are
    evaluated at the same ``x = s(t) x0 + sigma(t) eps``.

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``
    process : Process
    t_from, t_to : float, times in ``[t_min, t_max]``
    x0 : array (n, d), data samples, n >= 2
    rng : numpy Generator or int seed
    velocity : callable ``v(t)``, default ``process.sigma``

    Returns
    -------
    (L, stderr) : floats, the Monte-Carlo mean and its standard error.
    """
    x0, rng, v = _check_cost_inputs(score, process, x0, rng, velocity)
    t_from, t_to = (float(t) for t in _check_step_times(_check_real(t_from, "t_from"),
                                                         _check_real(t_to, "t_to"), process))
    x = _noised(process, x0, t_from, rng)
    diff = _eval_score(score, x, t_to) - _eval_score(score, x, t_from)
    return _mean_stderr(v(t_to) ** 2 * np.sum(diff ** 2, axis=1))


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


def predictor_cost(score, process, t_from, t_to, x0, rng, velocity=None):
    """Predictor-optimised cost ``L_p(t, t')`` for the DDIM / Euler predictor (derived).

    ``F(x) = a x + b S(x, t)`` (:func:`ddim_coefficients`). By the change of variables,
    with ``J = dF/dx = a I + b H`` and ``H = dS/dx``,
    ``grad log(F#p_t)(F(x)) = J^{-T} [S(x, t) - grad_x log|det J(x)|]`` and

        L_p = v(t')^2 E_{x ~ p_t} || S(F(x), t') - J^{-T}[S(x, t) - grad log|det J|] ||^2.

    This reading of ``v^2 D(p_t' || F#p_t)`` is derived here (SPEC 4.3, 13); with exact
    scores it is ``O(h^4)``. SPEC 4.3 writes the predictor as an Euler step in ``t``;
    this uses the same Euler method in ``(nu, x/s)``, which is what DDIM is and what
    :func:`sampler.euler_step` does, so the cost is that of the predictor actually
    used and does not depend on the time parametrisation (README). ``H`` and
    ``grad log|det J|`` come from autograd, so the score must be autograd-differentiable
    in ``x`` and act on rows independently. Cost: ``O(d)`` reverse passes per batch,
    for small ``d``. Arguments and returns as :func:`corrector_cost`.
    """
    x0, rng, v = _check_cost_inputs(score, process, x0, rng, velocity)
    t_from, t_to = (float(t) for t in _check_step_times(_check_real(t_from, "t_from"),
                                                         _check_real(t_to, "t_to"), process))
    x = _noised(process, x0, t_from, rng)
    a, b = (float(c) for c in ddim_coefficients(process, t_from, t_to))
    d = x.shape[1]

    def jacobian_F(x):  # (n, d, d), J[i, k, j] = dF_k / dx_j at row i
        H = anp.stack([elementwise_grad(lambda y, k=k: score(y, t_from)[:, k])(x)
                       for k in range(d)], axis=1)
        return a * anp.eye(d) + b * H

    def log_abs_det(x):
        return anp.sum(anp.linalg.slogdet(jacobian_F(x))[1])

    S = _eval_score(score, x, t_from)
    J = jacobian_F(x)
    grad_log_det = elementwise_grad(log_abs_det)(x)
    pushed = np.linalg.solve(np.swapaxes(J, 1, 2), (S - grad_log_det)[:, :, None])[:, :, 0]
    diff = _eval_score(score, a * x + b * S, t_to) - pushed
    return _mean_stderr(v(t_to) ** 2 * np.sum(diff ** 2, axis=1))


def step_cost(score, process, t_from, t_to, x0, rng, step, test="linear", n_groups=10):
    """Cost of one sampler step from the Stein identity, with scores only (derived, SPEC 14.2).

    With ``x = s(t) x0 + sigma(t) eps`` at ``t = t_from`` and ``y = step(score, process,
    x, t, t', rng)`` the sampler's own step to ``t' = t_to`` (its noise included), the
    Stein identity ``E_{p_t'}[y S(y, t')^T] = -I`` holds for the true marginal and fails
    for the pushed samples in proportion to the step's error. Since
    ``E_{p_t}[x S(x, t)^T] = -I`` too, the residual is estimated with that control
    variate, on the same samples:

        M = E[ y S(y, t')^T - x S(x, t)^T ],     L_step = ||M||_F^2,

    unbiasedly, as the mean of ``<M_g, M_h>_F`` over pairs of ``n_groups`` independent
    sample groups (a U-statistic), with a jackknife standard error. No velocity
    weighting. ``test="affine"`` adds the constant test function, which sees the mean:
    ``+ ||sigma(t') E[S(y, t') - S(x, t)]||^2`` (``E_{p_t}[S] = 0``), estimated the same
    way. For data ``N(0, diag lambda)`` and the exact score, ``L_step = sum_k (1 - P_k /
    A'_k)^2`` with ``P_k`` the pushed and ``A'_k`` the target variance
    (:func:`gaussian_step_cost`); it is zero for an exact step.

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``
    process : Process
    t_from, t_to : float, ``t_min <= t_to < t_from <= t_max``
    x0 : array (n, d), data samples, ``n >= 2 n_groups``
    rng : numpy Generator or int seed (draws ``x`` and the step's noise)
    step : a sampler step ``step(score, process, x, t_cur, t_next, rng) -> (x, nfe)``
        (``sampler.euler_step``, ``sampler.heun_step``, ``sampler.ancestral_step``, ...);
        ``scoreopt`` does not import the sampler
    test : ``"linear"`` or ``"affine"``
    n_groups : int >= 2

    Returns
    -------
    (L, stderr) : floats. ``L`` may be slightly negative by Monte-Carlo error (it is
        unbiased); :func:`interval_costs` clips it at zero. Over 30 seeds (N(0, diag
        k^-1.5), d = 8, 10,000 samples) the estimates scattered 1.15-1.22 times the
        reported jackknife error: it is slightly optimistic with 10 groups.

    Costs ``O(n d^2)`` memory-free work (group sums of outer products) and the step's
    NFE plus two score evaluations per sample. For large ``d`` a Hutchinson estimate
    would scale better; it is not implemented.
    """
    x0, rng, _ = _check_cost_inputs(score, process, x0, rng, None)
    t_from, t_to = (float(t) for t in _check_step_times(_check_real(t_from, "t_from"),
                                                         _check_real(t_to, "t_to"), process, True))
    if not callable(step):
        raise TypeError("`step` must be a sampler step step(score, process, x, t_cur, t_next, rng)")
    if test not in ("linear", "affine"):
        raise ValueError(f"`test` must be 'linear' or 'affine', got {test!r}")
    n_groups = _check_int(n_groups, "n_groups", minimum=2)
    if len(x0) < 2 * n_groups:
        raise ValueError(f"`x0` needs at least {2 * n_groups} samples for {n_groups} groups")
    x = _noised(process, x0, t_from, rng)
    S_x = _eval_score(score, x, t_from)
    checked = lambda z, t: _eval_score(score, z, t)
    y = _check_step_output(step(checked, process, x, t_from, t_to, rng), x.shape, t_from, t_to)
    S_y = _eval_score(score, y, t_to)
    groups = np.array_split(np.arange(len(x)), n_groups)
    # Per-group residuals, flattened: (G, d*d), plus (G, d) for the constant test function.
    M = np.array([((y[g].T @ S_y[g]) - (x[g].T @ S_x[g])).ravel() / len(g) for g in groups])
    if test == "affine":
        sigma_to = float(process.sigma(t_to))
        M = np.hstack([M, np.array([sigma_to * (S_y[g] - S_x[g]).mean(axis=0) for g in groups])])
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
    return float(U), float(stderr)


def _check_step_output(out, shape, t_from, t_to):
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("`step` must return (x, nfe)")
    y = np.asarray(out[0], dtype=float)
    if y.shape != shape or not np.all(np.isfinite(y)):
        raise ValueError(f"`step` from t = {t_from:.6g} to t = {t_to:.6g} returned "
                         f"{'shape ' + str(y.shape) if y.shape != shape else 'non-finite values'}")
    return y


def gaussian_step_cost(process, t_from, t_to, variances, pushed_variances):
    """Exact ``L_step = sum_k (1 - P_k / A'_k)^2`` for zero-mean data ``N(0, diag(lambda))`` (derived).

    For a step that maps ``p_t = N(0, diag(A))`` to ``N(0, diag(P))`` (``P`` the pushed
    variances: every built-in step is affine per coordinate with the exact score) and
    the target ``p_t' = N(0, diag(A'))``: ``E[y S(y, t')^T] = -diag(P / A')`` and
    ``E[x S(x, t)^T] = -I``, so ``M = diag(1 - P / A')``. ``t_from`` (checked, above
    ``t_to``) keeps the signature of :func:`step_cost`.
    """
    _check_process(process)
    lam = _as_float_array(variances, "variances").reshape(-1)
    P = _as_float_array(pushed_variances, "pushed_variances").reshape(-1)
    if P.shape != lam.shape:
        raise ValueError("`pushed_variances` and `variances` must have the same length")
    _, t_to = _check_step_times(_check_real(t_from, "t_from"), _check_real(t_to, "t_to"), process, True)
    A2 = process.s(t_to) ** 2 * lam + process.sigma(t_to) ** 2
    return float(np.sum((1.0 - P / A2) ** 2))


def interval_costs(score, process, ts, x0, rng, kind="corrector", velocity=None, step=None, test="linear"):
    """Costs ``L_i = L(t_{i+1}, t_i)`` of every step of a schedule (Algorithm 1's input).

    ``kind`` is ``"corrector"`` (:func:`corrector_cost`), ``"predictor"``
    (:func:`predictor_cost`) or ``"step"`` (:func:`step_cost` of the sampler step
    ``step`` with test functions ``test``, clipped at zero). Returns ``(costs, stderr)``,
    each of shape ``(T,)``.
    """
    ts = check_schedule(ts, process, endpoints=False)
    cost = _cost_function(kind, velocity, step, test)
    rng = as_rng(rng)
    out = np.array([cost(score, process, ts[i + 1], ts[i], x0, rng) for i in range(len(ts) - 1)])
    return np.maximum(out[:, 0], 0.0), out[:, 1]


def local_cost(score, process, ts, x0, rng, velocity=None, method="fd", rel_step=1e-3):
    """Local cost ``delta_c(t) = v(t)^2 E_{x ~ p_t} ||d/dt S(x, t)||^2`` on a grid (paper, Sec. 3).

    ``L_c(t, t + h) = delta_c(t) h^2 + O(h^3)``. The time derivative of the score is
    taken at fixed ``x`` either by a central finite difference whose step is
    ``rel_step`` in ``log nu`` (one-sided second order at the ends of the range), or
    by forward-mode autograd through ``t`` (``method="autograd"``, for scores that
    autograd can differentiate in ``t``). A fresh ``eps`` is drawn at every level.

    Returns
    -------
    (delta, stderr) : arrays of shape ``ts.shape``.
    """
    levels = [_mean_stderr(values) for values in _local_cost_values(score, process, ts, x0, rng, velocity,
                                                                     method, rel_step)]
    return tuple(np.array(a) for a in zip(*levels))


def gaussian_local_cost(process, ts, variances, mean=None):
    """Exact ``delta_c(t)`` for data ``N(mean, diag(variances))`` with ``v = sigma`` (derived).

    ``p_t = N(s mean, diag(a))`` with ``a_k = s^2 lambda_k + sigma^2``, and

        delta_c(t) = sigma^2 [ sum_k a_k'^2 / a_k^3 + sum_k s'^2 mean_k^2 / a_k^2 ],
        a_k' = 2 s s' lambda_k + 2 sigma sigma'.

    (SPEC 4.4; a closed form derived here, not taken from the paper.)
    """
    _check_process(process)
    ts = _check_times(ts, process, "ts")
    lam, mu = _gaussian_moments(variances, mean)
    s, sigma = process.s(ts), process.sigma(ts)
    ds, dsigma = elementwise_grad(process.s)(ts), elementwise_grad(process.sigma)(ts)
    s, sigma, ds, dsigma = (np.asarray(a, dtype=float)[..., None] for a in (s, sigma, ds, dsigma))
    a = s ** 2 * lam + sigma ** 2
    da = 2 * s * ds * lam + 2 * sigma * dsigma
    inner = np.sum(da ** 2 / a ** 3, axis=-1) + np.sum(ds ** 2 * mu ** 2 / a ** 2, axis=-1)
    return sigma[..., 0] ** 2 * inner


def gaussian_corrector_cost(process, t_from, t_to, variances, mean=None):
    """Exact finite-step ``L_c(t, t')`` for data ``N(mean, diag(variances))``, ``v = sigma`` (derived).

    With ``p_t = N(m, diag(a))`` and ``p_t' = N(m', diag(a'))`` (``m = s mean``,
    ``a = s^2 lambda + sigma^2``), the score difference at ``x ~ p_t`` is Gaussian and

        L_c = sigma(t')^2 sum_k [ (m'_k - m_k)^2 / a'_k^2 + a_k (1/a_k - 1/a'_k)^2 ].

    ``t_from`` and ``t_to`` may be arrays of the same shape (one cost per pair).
    """
    t, t2, lam, mu, s, s2, a, a2 = _gaussian_step(process, t_from, t_to, variances, mean)
    inner = (s2 - s) ** 2 * mu ** 2 / a2 ** 2 + a * (1 / a - 1 / a2) ** 2
    return process.sigma(t2[..., 0]) ** 2 * np.sum(inner, axis=-1)


def gaussian_predictor_cost(process, t_from, t_to, variances, mean=None):
    """Exact DDIM-predictor cost ``L_p(t, t')`` for data ``N(mean, diag(variances))``, ``v = sigma`` (derived).

    With the score ``-(x - m)/A`` of ``p_t = N(m, A)``, the predictor
    ``F(x) = a x + b S(x, t)`` (:func:`ddim_coefficients`) is affine per coordinate,
    ``F(x) = alpha x + beta`` with ``alpha = a - b / A`` and ``beta = b m / A``, so
    ``F#p_t = N(alpha m + beta, alpha^2 A)`` and, with the Fisher divergence between
    Gaussians ``D(N(m1, v1) || N(m2, v2)) = (m1 - m2)^2 / v1^2 + v2 (1/v2 - 1/v1)^2``,

        L_p = sigma(t')^2 sum_k D(N(m'_k, a'_k) || N(alpha_k m_k + beta_k, alpha_k^2 a_k)).

    ``t_from`` and ``t_to`` may be arrays of the same shape.
    """
    t, t2, lam, mu, s, s2, a, a2 = _gaussian_step(process, t_from, t_to, variances, mean)
    ca, cb = ddim_coefficients(process, t, t2)
    alpha = ca - cb / a
    m_push, a_push = alpha * s * mu + cb * s * mu / a, alpha ** 2 * a
    inner = (s2 * mu - m_push) ** 2 / a2 ** 2 + a_push * (1 / a_push - 1 / a2) ** 2
    return process.sigma(t2[..., 0]) ** 2 * np.sum(inner, axis=-1)


def _gaussian_moments(variances, mean):
    lam = _as_float_array(variances, "variances").reshape(-1)
    if np.any(lam < 0) or not np.all(np.isfinite(lam)):
        raise ValueError("`variances` must be finite and non-negative")
    mu = np.zeros_like(lam) if mean is None else _as_float_array(mean, "mean").reshape(-1)
    if mu.shape != lam.shape:
        raise ValueError("`mean` and `variances` must have the same length")
    return lam, mu


def _gaussian_step(process, t_from, t_to, variances, mean):
    """Times as columns, data moments, and ``s``, ``a = s^2 lambda + sigma^2`` at both ends."""
    _check_process(process)
    lam, mu = _gaussian_moments(variances, mean)
    t, t2 = _check_step_times(t_from, t_to, process)
    t, t2 = t[..., None], t2[..., None]
    s, s2 = process.s(t), process.s(t2)
    return t, t2, lam, mu, s, s2, s ** 2 * lam + process.sigma(t) ** 2, s2 ** 2 * lam + process.sigma(t2) ** 2


# --------------------------------------------------------------------------------
# Length, energy and the optimal schedule (SPEC sections 5 and 6)
# --------------------------------------------------------------------------------

def cumulative_cost(ts, delta, order=2):
    """Cumulative length ``Lambda(t) = int_{t_0}^t delta(r)^(1/order) dr`` (paper, Sec. 3).

    Trapezoid rule on ``delta^(1/order)`` over the grid ``ts`` (any strictly increasing
    times); ``Lambda[0] = 0`` and ``Lambda[-1]`` is the path length. ``order = 2`` is
    the paper's; ``order = n`` is the length for a cost ``L = delta h^n`` (derived,
    SPEC 5.3).
    """
    return np.concatenate([[0.0], np.cumsum(_trapezoid_increments(ts, delta, order))])


def optimal_schedule(ts, delta, T, order=2):
    """Optimal ``T``-step schedule from a local cost on a dense grid (paper, Sec. 3).

    ``t*_i = Lambda^{-1}(i Lambda / T)``: constant speed in the metric ``delta``, so that
    every step costs ``(Lambda/T)^2`` to leading order (the minimiser of the path
    energy by Cauchy-Schwarz). The inverse is a monotone cubic (PCHIP) through
    ``(Lambda(t_j), t_j)``. Output endpoints are ``ts[0]`` and ``ts[-1]`` exactly.
    If ``delta`` vanishes on the whole grid every schedule is free: a warning is
    issued and the uniform schedule returned.
    """
    return _invert_cumulative(ts, _trapezoid_increments(ts, delta, order), _check_steps(T))


def update_schedule(ts, costs, order=2):
    """Algorithm 1 (UpdateSchedule) of the paper: equalise the cost of every step.

    ``Lambda_0 = 0``, ``Lambda_{i+1} = Lambda_i + L_i^(1/order)`` with
    ``L_i = L(t_{i+1}, t_i)``; then ``t*_i = Lambda^{-1}(i Lambda_T / T)`` through a
    monotone cubic interpolant (PCHIP). ``order`` generalises the square root to a
    cost of order ``h^n`` (derived, SPEC 5.3). Increments below ``INCREMENT_FLOOR``
    times the largest are raised to it, so zero-cost steps keep a well-defined inverse.

    Returns a schedule with the same endpoints (exactly) and number of steps.
    Equal costs are a fixed point; multiplying all costs by a constant changes nothing.
    """
    ts = check_schedule(ts, endpoints=False)
    costs = _check_costs(costs, len(ts) - 1)
    _check_positive(order, "order")
    return _invert_cumulative(ts, costs ** (1.0 / order), len(ts) - 1)


def blend(ts, ts_star, gamma):
    """Algorithm 2, step 4: ``gamma ts_star + (1 - gamma) ts`` for ``gamma`` in ``(0, 1]``.

    A convex combination of two strictly increasing schedules with the same
    endpoints is one too; the endpoints are kept exactly.
    """
    ts = check_schedule(ts, endpoints=False)
    ts_star = check_schedule(ts_star, endpoints=False, name="ts_star")
    if ts.shape != ts_star.shape or ts[0] != ts_star[0] or ts[-1] != ts_star[-1]:
        raise ValueError("`ts` and `ts_star` must have the same length and endpoints")
    gamma = _check_gamma(gamma)
    out = gamma * ts_star + (1.0 - gamma) * ts
    out[0], out[-1] = ts[0], ts[-1]
    return out


class OnlineUpdate(NamedTuple):
    """One schedule update of Algorithm 2 (:func:`online_update`)."""
    ts: np.ndarray          # the next schedule, blend(ts, ts_star, gamma)
    ts_star: np.ndarray     # the target schedule of this update
    costs: np.ndarray       # interval costs of the current schedule, shape (T,)
    length: float           # the path length measured by this update


def online_update(score, process, ts, x0, rng, gamma, method="intervals", kind="corrector",
                  order=2, n_grid=200, velocity=None):
    """Algorithm 2 of the paper, steps 2-4: one schedule update with the score model fixed.

    ``method="intervals"`` is the paper's route: 2. the interval costs ``L_i`` of the
    current schedule ``ts`` (:func:`interval_costs`, ``kind`` ``"corrector"`` or
    ``"predictor"``); 3. ``ts* = UpdateSchedule(ts, L)`` (Algorithm 1,
    :func:`update_schedule`); 4. ``ts <- gamma ts* + (1 - gamma) ts`` (:func:`blend`).
    Its length is :func:`path_length` of the costs.

    ``method="grid"`` (derived here, SPEC 6.1) replaces steps 2-3 by the dense-grid map
    of the local corrector cost on ``n_grid`` levels (:func:`estimate_schedule_map`),
    ``ts* = Lambda^{-1}(i Lambda / T)``; ``costs`` are then the squared shares of the
    map's length over the steps of ``ts``. It avoids the pitfall of SPEC 6.3 (one huge
    last step) that the interval route falls into on smooth data.

    Step 1 of Algorithm 2 (optimiser steps on the model with ``ts`` fixed) is the
    caller's: :func:`models.train` calls this every few steps after a burn-in.

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``, the current model
    process : Process
    ts : schedule (``T + 1`` times, endpoints ``t_min``, ``t_max``)
    x0 : array (n, d), fresh data samples for the costs
    rng : numpy Generator or int seed
    gamma : float in ``(0, 1]``, the blend rate
    method, kind, order, n_grid, velocity : as above

    Returns
    -------
    OnlineUpdate : ``(ts, ts_star, costs, length)``.
    """
    ts = check_schedule(ts, process)
    gamma = _check_gamma(gamma)
    if method == "intervals":
        costs, _ = interval_costs(score, process, ts, x0, rng, kind, velocity)
        ts_star, length = update_schedule(ts, costs, order), path_length(costs, order)
    elif method == "grid":
        if kind != "corrector":
            raise ValueError(f"`kind` must be 'corrector' with method 'grid', got {kind!r}")
        smap = estimate_schedule_map(score, process, x0, rng, n_grid=n_grid, velocity=velocity,
                                     n_groups=2)
        costs = np.diff(np.interp(ts, smap.ts, smap.Lambda)) ** 2
        ts_star, length = smap.schedule(len(ts) - 1), smap.length
    else:
        raise ValueError(f"`method` must be 'intervals' or 'grid', got {method!r}")
    return OnlineUpdate(blend(ts, ts_star, gamma), ts_star, costs, float(length))


def path_length(costs, order=2):
    """Discrete path length ``sum_i L_i^(1/order)`` of a schedule's step costs (paper, Sec. 3).

    For a fine schedule it approximates ``Lambda``; it does not depend on the schedule
    to leading order, which is why ``(path_length / T)^2`` is the per-step cost that an
    optimal ``T``-step schedule reaches.
    """
    costs = _check_costs(costs, nonempty=True)
    _check_positive(order, "order")
    return float(np.sum(costs ** (1.0 / order)))


def path_energy(costs):
    """Discrete path energy ``T sum_i L_i`` of a schedule (paper, Sec. 3).

    ``sum_i L_i ~ E(phi) / T``, so this approximates ``E(phi)``. Cauchy-Schwarz gives
    ``path_length(costs)^2 <= path_energy(costs)`` with equality iff all costs are equal.
    """
    costs = _check_costs(costs, nonempty=True)
    return float(len(costs) * np.sum(costs))


class ScheduleMap(NamedTuple):
    """A continuous schedule: the cumulative length on a dense grid (SPEC 6.1).

    Fields: ``ts`` grid, ``delta`` and ``delta_stderr`` local cost, ``Lambda``
    cumulative length, ``length`` and ``length_stderr`` (batch means over
    ``Lambda_groups``, the cumulative lengths of independent sample groups), ``order``,
    ``n_evaluations`` (per-sample score evaluations spent) and ``metadata`` (a dict: the
    process, ``nu`` on the grid, the estimate's settings, see :func:`estimate_schedule_map`).
    Call :meth:`schedule` for any number of steps; :meth:`save` writes it as JSON,
    :func:`load_schedule_map` reads it back.
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

    def schedule(self, T):
        """The optimal ``T``-step schedule ``Lambda^{-1}(i Lambda / T)`` from the stored ``Lambda``.

        With ``nu`` on the grid (maps from :func:`estimate_schedule_map`) the inverse is a
        monotone cubic through ``(Lambda_j, log nu_j)`` (the coordinate in which the grid
        is uniform), mapped to ``t`` by a monotone cubic through ``(log nu_j, t_j)``;
        otherwise a monotone cubic through ``(Lambda_j, t_j)``. Endpoints are exact.
        """
        return self._invert(self.Lambda, _check_steps(T))

    def _invert(self, Lambda, T):
        nu_grid = np.asarray((self.metadata or {}).get("nu", []), dtype=float)
        if nu_grid.shape != self.ts.shape:
            return _invert_cumulative(self.ts, np.diff(Lambda), T)
        u = np.log(nu_grid)
        ts = _pin(PchipInterpolator(u, self.ts)(_invert_cumulative(u, np.diff(Lambda), T)), self.ts)
        if not np.all(np.diff(ts) > 0):
            raise ValueError(f"`T` = {T} is too large for the resolution of the grid: two schedule times coincide")
        return ts

    def step_cost(self, T):
        """Leading-order cost of every step of the optimal ``T``-step schedule, ``(Lambda/T)^order``."""
        return (self.length / _check_steps(T)) ** self.order

    def schedule_stderr(self, T):
        """Standard error of each time of :meth:`schedule` (batch means over the groups)."""
        T = _check_steps(T)
        groups = np.array([self._invert(L, T) for L in self.Lambda_groups])
        return groups.std(axis=0, ddof=1) / np.sqrt(len(groups))

    def sigmas(self, T):
        """The ``T``-step schedule as descending ``nu`` levels with a trailing 0: k-diffusion's
        ``sigmas`` and diffusers' ``set_timesteps(sigmas=...)`` (SPEC 3, :func:`to_sigmas`).

        Read from the ``nu`` stored on the grid, so that no process is needed (a loaded
        map): ``Lambda^{-1}(i Lambda / T)`` is inverted in ``log nu`` instead of ``t``.
        Both are interpolations of the same grid; they agree with
        ``to_sigmas(process, self.schedule(T))`` to the grid's resolution (1e-4 relative
        on 50 levels, far less on the default 1,000).
        """
        nu_grid = np.asarray((self.metadata or {}).get("nu", []), dtype=float)
        if nu_grid.shape != self.ts.shape:
            raise ValueError("this map has no `nu` on its grid; use to_sigmas(process, smap.schedule(T))")
        log_nu = _invert_cumulative(np.log(nu_grid), np.diff(self.Lambda), _check_steps(T))
        return np.append(np.exp(log_nu)[::-1], 0.0)

    def save(self, path):
        """Write the map as JSON with its metadata, atomically (temporary file, flush, rename)."""
        data = {"format": SCHEDULE_MAP_FORMAT, "metadata": self.metadata or {}, "order": self.order,
                "length": self.length, "length_stderr": self.length_stderr,
                "n_evaluations": int(self.n_evaluations)}
        data.update({k: np.asarray(getattr(self, k)).tolist()
                     for k in ("ts", "delta", "delta_stderr", "Lambda", "Lambda_groups")})
        _write_atomically(path, json.dumps(data, allow_nan=False))


SCHEDULE_MAP_FORMAT = "scoreopt.ScheduleMap/1"


def load_schedule_map(path):
    """Read a :class:`ScheduleMap` written by :meth:`ScheduleMap.save`, checking it.

    A truncated, hand-edited or foreign file raises ``ValueError`` naming the path and
    what is wrong (not JSON, wrong format, a missing field, wrong lengths, a grid that is
    not increasing, a length that is not the end of ``Lambda``, non-finite values).
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"`{path}` is not a readable schedule map: {err}") from err
    try:
        if not isinstance(data, dict) or data.get("format") != SCHEDULE_MAP_FORMAT:
            raise ValueError(f"format is {data.get('format') if isinstance(data, dict) else type(data).__name__!r}, "
                             f"expected {SCHEDULE_MAP_FORMAT!r}")
        arrays = {k: np.array(data[k], dtype=float) for k in ("ts", "delta", "delta_stderr", "Lambda",
                                                              "Lambda_groups")}
        ts = check_schedule(arrays["ts"], endpoints=False)
        n = len(ts)
        for k in ("delta", "delta_stderr", "Lambda"):
            _check_costs(arrays[k], n, name=k)
        G = arrays["Lambda_groups"]
        if G.ndim != 2 or G.shape[1] != n or len(G) < 2 or not np.all(np.isfinite(G)):
            raise ValueError(f"`Lambda_groups` must be finite with shape (groups >= 2, {n})")
        if arrays["Lambda"][0] != 0 or np.any(np.diff(arrays["Lambda"]) < 0):
            raise ValueError("`Lambda` must start at 0 and not decrease")
        length, stderr = _check_real(data["length"], "length"), _check_real(data["length_stderr"], "length_stderr")
        if not np.isclose(length, arrays["Lambda"][-1], rtol=1e-12, atol=0):
            raise ValueError("`length` is not the end of `Lambda`")
        order = _check_positive(data["order"], "order")
        metadata = data["metadata"]
        if not isinstance(metadata, dict):
            raise ValueError("`metadata` must be an object")
        n_evaluations = _check_int(data["n_evaluations"], "n_evaluations", minimum=0)
    except KeyError as err:
        raise ValueError(f"`{path}` is not a valid schedule map: missing field {err}") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"`{path}` is not a valid schedule map: {err}") from err
    return ScheduleMap(ts, arrays["delta"], arrays["delta_stderr"], arrays["Lambda"], length, stderr, G,
                       order, n_evaluations, metadata)


def _write_atomically(path, write):
    """Write ``path`` through a temporary file in the same folder: ``write(f)`` on the open
    binary file (or ``str``/``bytes`` to write as they are), flushed, renamed over
    ``path``, the folder flushed too; permissions 0666 less the umask. An interrupted
    write leaves the previous file as it was and no temporary file behind."""
    if isinstance(write, (str, bytes)):
        data = write.encode() if isinstance(write, str) else write
        write = lambda f: f.write(data)
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def estimate_schedule_map(score, process, x0, rng, n_grid=1000, velocity=None,
                          method="fd", n_groups=10, budget=None, workers=1, control_variate=None):
    """Dense-grid estimate of the corrector-optimised schedule map (SPEC 6.1).

    ``delta_c`` is estimated by :func:`local_cost` at ``n_grid`` times uniform in
    ``log nu``; ``Lambda`` is the trapezoid integral of ``sqrt(delta_c)`` in ``log nu``, in
    which the grid is uniform (:func:`_cumulative_in_log_nu`). The samples are split into
    ``n_groups`` groups whose cumulative lengths give batch-means error bars for
    ``Lambda`` and the schedule (SPEC 5.4).

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``, called with the whole batch of a level
        (a few calls per level: 2 for central differences, 3 at the ends)
    process : Process
    x0 : array (n, d), data samples
    rng : numpy Generator or int seed
    n_grid, n_groups, velocity, method : as above (``method="autograd"`` differentiates
        the score in ``t`` by forward-mode autograd)
    budget : int or None. At most this many per-sample score evaluations: the grid size
        and the number of samples are then chosen here, ``n_grid = sqrt(budget / 40)``
        levels (clipped to [20, 1000]) and as many of ``x0``'s rows as the budget allows
        (fewer levels with more samples measured best: SPEC 6.1, `docs/budget.md`).
    workers : 1 (serial), an int n > 1 (n processes; ``score`` must be picklable, e.g.
        a module-level function), -1 (one per CPU), or a map-like callable such as
        ``concurrent.futures.Executor.map``, ``multiprocessing.Pool.map`` or, on a cluster,
        ``dask.distributed.Client(...).get_executor().map``. Only the score evaluations are
        distributed; the noise is drawn here, level by level, so the result is the same
        for every ``workers``.
    control_variate : bool or None. Subtract, level by level, the centred local cost of
        the data's Gaussian fit, whose mean is known in closed form (derived here; see
        ``_gaussian_control``): the same expectation, less variance where the marginal is
        close to Gaussian (the noisy end). None (the default) turns it on with ``budget``
        and off without (measured in `docs/budget.md`: it never hurt, and on the Cantor
        target at 10^5 evaluations it cut the spread of the T = 50 levels from 1.77% to 1.17%).

    Returns a :class:`ScheduleMap` whose ``n_evaluations`` counts the per-sample score
    evaluations and whose ``metadata`` records the process (name, range, ``nu`` on the
    grid), cost, velocity, method, grid size, samples, groups, evaluations, score calls,
    seed (if an int was given), package version and creation time.
    """
    _check_process(process)
    x0 = check_data(x0)
    n_groups = _check_int(n_groups, "n_groups", minimum=2)
    seed = int(rng) if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) else None
    _check_workers(workers)
    control_variate = (budget is not None) if control_variate is None else bool(control_variate)
    if budget is not None:
        budget = _check_int(budget, "budget", minimum=1)
        n_grid = int(np.clip(np.rint(np.sqrt(budget / 40)), 20, 1000))
    n_grid = _check_int(n_grid, "n_grid", minimum=2)
    nu_min, nu_max = _nsr_range(process)
    ts = _schedule_from_nsr(process, np.geomspace(nu_min, nu_max, n_grid))
    steps = _fd_steps(process, ts, 1e-3)
    if budget is not None:
        one_sided = np.sum((ts - steps < process.t_min) | (ts + steps > process.t_max))
        per_sample = n_grid if method == "autograd" else 2 * n_grid + one_sided
        x0 = x0[:min(len(x0), budget // per_sample)]
    if len(x0) < 2 * n_groups:
        raise ValueError(f"`x0` needs at least {2 * n_groups} samples for {n_groups} groups"
                         + ("" if budget is None else f" (the budget allows {len(x0)})"))
    x0, rng, v = _check_cost_inputs(score, process, x0, rng, velocity)
    if method not in ("fd", "autograd"):
        raise ValueError(f"`method` must be 'fd' or 'autograd', got {method!r}")
    # Accumulated level by level: memory grows with n + n_grid * n_groups, not n_grid * n.
    delta, delta_stderr = np.empty(n_grid), np.empty(n_grid)
    group_delta = np.empty((n_groups, n_grid))
    counts = [0, 0]
    levels = _level_values(score, process, ts, steps, x0, rng, v, method, workers, counts,
                           n_groups if control_variate else 0)
    for j, values in enumerate(levels):
        delta[j], delta_stderr[j] = _mean_stderr(values)
        group_delta[:, j] = [g.mean() for g in np.array_split(values, n_groups)]
    groups = np.array([_cumulative_in_log_nu(process, ts, g) for g in group_delta])
    Lambda = _cumulative_in_log_nu(process, ts, delta)
    metadata = {"process": process.name, "t_min": process.t_min, "t_max": process.t_max,
                "nu": nsr(process, ts).tolist(), "cost": "corrector", "velocity": "sigma" if velocity is None else
                getattr(velocity, "__name__", "custom"), "method": method, "n_grid": n_grid, "n_samples": len(x0),
                "n_groups": n_groups, "n_evaluations": counts[1], "n_calls": counts[0], "budget": budget,
                "control_variate": bool(control_variate),
                "seed": seed, "version": _version(), "created": datetime.now(timezone.utc).isoformat()}
    return ScheduleMap(ts, delta, delta_stderr, Lambda, float(Lambda[-1]),
                       float(groups[:, -1].std(ddof=1) / np.sqrt(n_groups)), groups, 2, counts[1], metadata)


def _cumulative_in_log_nu(process, ts, delta):
    """``Lambda`` on a grid uniform in ``u = log nu``: the trapezoid rule in ``u`` on
    ``sqrt(delta) dt/du`` (derived here). The integrand is far smoother in ``u`` than in
    ``t``: on 50 levels its error for N(0, diag k^-1.5), d = 64, under ``vp_linear`` is
    2e-5 relative, against 2e-3 for the trapezoid in ``t`` (:func:`cumulative_cost`)."""
    u = np.log(nsr(process, ts))
    dt_du = 1.0 / np.abs(elementwise_grad(lambda t: anp.log(process.nsr(t)))(ts))
    f = np.sqrt(np.maximum(delta, 0.0)) * dt_du
    return np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(u))])


def _version():
    try:
        return package_version("scoreopt")
    except Exception:           # not installed (a vendored copy)
        return "unknown"


class EqualCostResult(NamedTuple):
    """Outcome of :func:`equal_cost_schedule`."""
    ts: np.ndarray          # final schedule
    costs: np.ndarray       # its interval costs L_i
    stderr: np.ndarray      # their standard errors
    converged: bool         # the last update moved no time by more than tol local steps
    n_iter: int             # updates performed
    history: list           # (ts, costs) before each update


def equal_cost_schedule(score, process, ts, x0, rng, kind="predictor", gamma=0.5,
                        order=None, max_iter=100, tol=1e-4, velocity=None, step=None, test="linear"):
    """Damped Algorithm 1 iterated to its equal-cost fixed point for a fixed score.

    Repeats ``ts <- blend(ts, update_schedule(ts, L(ts)), gamma)`` (Algorithm 2 with
    the model held fixed). Its fixed points have equal interval costs whatever the
    order of the cost, which is how predictor-optimised schedules are found (derived,
    SPEC 5.3 and 6.3). Costs are estimated by :func:`interval_costs` with common
    random numbers (the same seed at every iteration), so the map iterated is
    deterministic. ``order`` defaults to 4 for the predictor cost (``O(h^4)`` with
    accurate scores) and 2 for the corrector cost. See :func:`iterate_schedule`.

    ``kind="step"`` equalises :func:`step_cost` of the sampler step ``step`` (test
    functions ``test``; derived, SPEC 14.2): the schedule for that sampler. Its ``order`` defaults to 4 (a first-order
    step's residual is ``O(h^2)``); the fixed point has equal costs whatever the order,
    which only sets how far each update moves.

    Limitation (derived, SPEC 6.3): with the corrector cost, smooth data and few
    steps, ``v(t_min)^2 = sigma_min^2`` makes the last step look free and the iteration
    drifts towards one huge last step; prefer :func:`estimate_schedule_map` for the
    corrector cost.
    """
    ts = check_schedule(ts, process)
    _cost_function(kind, velocity, step, test)
    seed = int(as_rng(rng).integers(2 ** 63))
    costs = lambda ts: interval_costs(score, process, ts, x0, seed, kind, velocity, step, test)
    order = (2 if kind == "corrector" else 4) if order is None else order
    return iterate_schedule(costs, ts, gamma, order, max_iter, tol)


def iterate_schedule(costs, ts, gamma=0.5, order=2, max_iter=100, tol=1e-4):
    """Iterate ``ts <- blend(ts, update_schedule(ts, costs(ts)), gamma)`` to a fixed point.

    ``costs(ts)`` returns the interval costs, or ``(costs, stderr)``. Converged when an
    update moves no time by more than ``tol`` times the shorter of its two adjacent
    steps. Returns an :class:`EqualCostResult`.
    """
    ts = check_schedule(ts, endpoints=False)
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    _check_positive(tol, "tol")

    def evaluate(ts):
        out = costs(ts)
        return out if isinstance(out, tuple) else (out, np.full(len(ts) - 1, np.nan))

    history = []
    for it in range(1, max_iter + 1):
        L, _ = evaluate(ts)
        history.append((ts, L))
        ts_new = blend(ts, update_schedule(ts, L, order), gamma)
        moved = _relative_motion(ts, ts_new)
        ts = ts_new
        if moved <= tol:
            break
    L, stderr = evaluate(ts)
    return EqualCostResult(ts, L, stderr, bool(moved <= tol), it, history)


# --------------------------------------------------------------------------------
# Helpers: numerics
# --------------------------------------------------------------------------------

def _trapezoid_increments(ts, delta, order):
    ts = check_schedule(ts, endpoints=False)
    delta = _check_costs(delta, len(ts), name="delta")
    _check_positive(order, "order")
    root = delta ** (1.0 / order)
    return 0.5 * (root[1:] + root[:-1]) * np.diff(ts)


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
    out = PchipInterpolator(Lambda, ts)(Lambda[-1] * np.arange(T + 1) / T)
    out = _pin(out, ts)
    if not np.all(np.diff(out) > 0):
        raise ValueError(f"`T` = {T} is too large for the resolution of the grid: "
                         "two schedule times coincide in float64")
    return out


def _relative_motion(ts, ts_new):
    """Largest move of a time in units of the shorter of its two adjacent steps."""
    steps = np.diff(ts)
    local = np.minimum(np.append(steps, np.inf), np.insert(steps, 0, np.inf))
    return float(np.max(np.abs(ts_new - ts) / local))


def _local_cost_values(score, process, ts, x0, rng, velocity, method, rel_step):
    """Per-sample values ``v(t)^2 ||d/dt S(x_j, t)||^2``, one array (n,) per level, as a
    generator (arguments are checked before the first level is computed)."""
    x0, rng, v = _check_cost_inputs(score, process, x0, rng, velocity)
    ts = check_schedule(ts, process, endpoints=False, min_len=1)
    if method not in ("fd", "autograd"):
        raise ValueError(f"`method` must be 'fd' or 'autograd', got {method!r}")
    _check_positive(rel_step, "rel_step")
    # Time step with a relative step rel_step in log nu: h = rel_step / (d log nu / dt).
    steps = _fd_steps(process, ts, rel_step)
    return _level_values(score, process, ts, steps, x0, rng, v, method)


def _fd_steps(process, ts, rel_step):
    """Time steps with a relative step ``rel_step`` in log nu: ``h = rel_step / (d log nu / dt)``."""
    return rel_step / np.abs(elementwise_grad(lambda t: anp.log(process.nsr(t)))(ts))


def _level_values(score, process, ts, steps, x0, rng, v, method, workers=1, counts=None,
                  control_variate=0):
    """Per-level values; the noise is drawn here, level by level in order, and only the
    score work is mapped (serially, or over ``workers``), so the result does not depend
    on how it is evaluated. ``counts`` (a list [calls, evaluations]) is incremented.
    ``control_variate`` (a number of sample groups, or 0) subtracts the Gaussian fit's
    centred values (:func:`_gaussian_control`), with the moments of each group."""
    mapper, close, batch = _mapper(workers)
    job = functools.partial(_time_derivative_sq, score, method, process.t_min, process.t_max)
    moments = _group_moments(x0, control_variate) if control_variate else None
    try:
        for start in range(0, len(ts), batch):
            chunk = range(start, min(start + batch, len(ts)))
            xs = [_noised(process, x0, ts[j], rng) for j in chunk]
            for j, x, (values, calls) in zip(chunk, xs, mapper(job, xs, ts[chunk], steps[chunk])):
                if counts is not None:
                    counts[0] += calls
                    counts[1] += calls * len(x0)
                values = v(ts[j]) ** 2 * values
                if control_variate:
                    values = _gaussian_control(values, process, x, ts[j], v(ts[j]) ** 2, *moments)
                yield values
    finally:
        close()


def _group_moments(x0, n_groups):
    """Per-row mean and variance of the row's sample group (``n_groups`` as in the batch
    means), each of shape (n, d)."""
    mean, var = np.empty_like(x0), np.empty_like(x0)
    for g in np.array_split(np.arange(len(x0)), int(n_groups)):
        mean[g], var[g] = x0[g].mean(axis=0), x0[g].var(axis=0)
    return mean, var


def _gaussian_control(values, process, x, t, v2, mean, var):
    """Control variate from the data's Gaussian fit N(mean, diag var) (derived here).

    Its score ``S_G = -(x - s mean)/A``, ``A = s^2 var + sigma^2``, has the per-sample
    local cost ``g = v^2 ||s' mean / A + (x - s mean) A' / A^2||^2`` whose mean under
    the noising of the data depends only on the data's first two moments:
    ``E g = v^2 sum_k [s'^2 mean_k^2 / A_k^2 + A'_k^2 / A_k^3]`` (the closed form of
    :func:`gaussian_local_cost`). The moments are those of each row's sample group
    (``mean``, ``var`` of shape (n, d)), so that ``E g`` is exact given the group's
    data and the groups stay independent: the batch-means error bars remain honest
    (with moments shared by all groups they came out several times too small).
    Returns ``values - beta (g - E g)`` with the variance-minimising
    ``beta = cov(values, g) / var(g)`` of this level's samples.
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


def _check_workers(workers):
    if not callable(workers) and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                  or workers == 0 or workers < -1):
        raise ValueError(f"`workers` must be a positive int, -1, or a map-like callable, got {workers!r}")
    return workers


def _time_derivative_sq(score, method, t_min, t_max, x, t, h):
    """``||d/dt S(x_j, t)||^2`` per sample at fixed ``x``, and the number of score calls."""
    if method == "autograd":
        dS, calls = _check_finite(make_jvp(lambda tt: score(x, tt))(t)(1.0)[1], t, x.shape), 1
    elif t - h < t_min:   # one-sided, second order, at the clean end
        dS, calls = (-3 * _eval_score(score, x, t) + 4 * _eval_score(score, x, t + h)
                     - _eval_score(score, x, t + 2 * h)) / (2 * h), 3
    elif t + h > t_max:   # one-sided, second order, at the noisy end
        dS, calls = (3 * _eval_score(score, x, t) - 4 * _eval_score(score, x, t - h)
                     + _eval_score(score, x, t - 2 * h)) / (2 * h), 3
    else:
        dS, calls = (_eval_score(score, x, t + h) - _eval_score(score, x, t - h)) / (2 * h), 2
    return np.sum(dS ** 2, axis=1), calls


def _mapper(workers):
    """``(map, close, batch)`` for ``workers`` in SciPy's convention: 1 is serial, an int
    n > 1 a pool of n processes (the score must then be picklable), -1 one per CPU, a
    map-like callable (``Executor.map``, ``multiprocessing.Pool.map``, dask's
    ``Client.get_executor().map``) is used as it is. ``batch`` levels are in memory at once."""
    if callable(_check_workers(workers)):
        return workers, (lambda: None), 16
    if workers == 1:
        return map, (lambda: None), 1
    n = (os.cpu_count() or 1) if workers == -1 else int(workers)
    pool = ProcessPoolExecutor(max_workers=n)
    return pool.map, pool.shutdown, 4 * n


def _noised(process, x0, t, rng):
    """A draw of ``x_t = s(t) x0 + sigma(t) eps`` with fresh ``eps``."""
    return float(process.s(t)) * x0 + float(process.sigma(t)) * rng.standard_normal(x0.shape)


class ScoreEvaluationError(RuntimeError):
    """A score (or another user callable) raised; the original error is its ``__cause__``."""


def _eval_score(score, x, t, where="", name="score"):
    """``score(x, t)``, checked: a raise is chained with the time (and ``where``, e.g. the
    sampler's step); a wrong shape or a non-finite value is a ``ValueError`` naming both."""
    try:
        value = score(x, t)
    except Exception as err:
        raise ScoreEvaluationError(f"`{name}` raised {type(err).__name__} at t = {float(t):.6g}{where}: "
                                   f"{err}") from err
    return _check_finite(value, t, x.shape, where, name)


def _check_finite(value, t, shape, where="", name="score"):
    if np.iscomplexobj(value):
        raise ValueError(f"`{name}` returned complex values at t = {float(t):.6g}{where}")
    value = np.asarray(value, dtype=float)
    if value.shape != shape:
        raise ValueError(f"`{name}` returned shape {value.shape} at t = {float(t):.6g}{where}; "
                         f"expected {shape}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"`{name}` returned non-finite values at t = {float(t):.6g}{where}")
    return value


def _checked_velocity(velocity):
    """``velocity`` whose every value is checked: finite and non-negative, else a
    ``ValueError`` naming the time (not a NaN cost blamed on ``delta`` later)."""
    def v(t):
        value = velocity(t)
        if np.iscomplexobj(value) or not np.all(np.isfinite(value)) or np.any(np.asarray(value) < 0):
            raise ValueError(f"`velocity` returned {value} at t = {float(t):.6g}; it must be finite and >= 0")
        return value
    return v


def _mean_stderr(values):
    """Monte-Carlo mean and standard error over the last axis (floats for 1-D input)."""
    mean = np.mean(values, axis=-1)
    stderr = np.std(values, axis=-1, ddof=1) / np.sqrt(values.shape[-1])
    return (float(mean), float(stderr)) if np.ndim(values) == 1 else (mean, stderr)


def _cost_function(kind, velocity=None, step=None, test="linear"):
    """The cost of ``kind`` as ``cost(score, process, t_from, t_to, x0, rng) -> (L, stderr)``."""
    if kind == "corrector":
        return lambda *args: corrector_cost(*args, velocity=velocity)
    if kind == "predictor":
        return lambda *args: predictor_cost(*args, velocity=velocity)
    if kind == "step":
        if not callable(step):
            raise TypeError("`step` must be a sampler step function with kind='step'")
        return lambda *args: step_cost(*args, step=step, test=test)
    raise ValueError(f"`kind` must be 'corrector', 'predictor' or 'step', got {kind!r}")


def _nsr_range(process):
    _check_process(process)
    nu_min, nu_max = nsr(process, np.array([process.t_min, process.t_max]))
    return float(nu_min), float(nu_max)


def _schedule_from_nsr(process, nu):
    """Map noise levels (any order) to an increasing schedule with exact endpoints."""
    ts = _pin(time_from_nsr(process, np.sort(nu)), process)
    if not np.all(np.diff(ts) > 0):
        raise ValueError("the noise levels map to coinciding times; use fewer steps")
    return ts


def _pin(ts, ref):
    """Set the endpoints exactly: ``ref`` is a Process or a reference schedule."""
    ts = np.array(ts, dtype=float)
    lo, hi = (ref.t_min, ref.t_max) if isinstance(ref, Process) else (ref[0], ref[-1])
    ts[0], ts[-1] = lo, hi
    return ts


# --------------------------------------------------------------------------------
# Helpers: validation at the public boundary
# --------------------------------------------------------------------------------

def as_rng(rng):
    """A ``numpy.random.Generator`` from a Generator or an int seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"`rng` as a seed must be a non-negative integer, got {rng}")
        return np.random.default_rng(int(rng))
    raise TypeError(f"`rng` must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def check_schedule(ts, process=None, endpoints=True, name="ts", min_len=2):
    """Validate a schedule and return it as a float64 array.

    Rules: 1-D, at least ``min_len`` finite times, strictly increasing; with a ``process``,
    inside ``[t_min, t_max]`` and (if ``endpoints``) starting at ``t_min`` and ending
    at ``t_max`` exactly.
    """
    ts = _as_float_array(ts, name)
    if ts.ndim != 1 or len(ts) < min_len:
        raise ValueError(f"`{name}` must be a 1-D array of at least {min_len} times")
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"`{name}` must be finite")
    bad = np.flatnonzero(np.diff(ts) <= 0)
    if len(bad):
        raise ValueError(f"`{name}` must be strictly increasing (index {bad[0]} to {bad[0] + 1})")
    if process is not None:
        _check_process(process)
        if endpoints and (ts[0] != process.t_min or ts[-1] != process.t_max):
            raise ValueError(f"`{name}` must start at t_min = {process.t_min} and end at "
                             f"t_max = {process.t_max} exactly")
        if ts[0] < process.t_min or ts[-1] > process.t_max:
            raise ValueError(f"`{name}` must lie in [{process.t_min}, {process.t_max}]")
    return ts


def _check_costs(costs, length=None, name="costs", nonempty=False):
    costs = _as_float_array(costs, name)
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


def _check_cost_inputs(score, process, x0, rng, velocity):
    _check_process(process)
    if not callable(score):
        raise TypeError("`score` must be callable as score(x, t)")
    x0 = check_data(x0)
    if len(x0) < 2:
        raise ValueError("`x0` needs at least 2 samples for a standard error")
    if velocity is not None and not callable(velocity):
        raise TypeError("`velocity` must be a callable v(t) or None")
    return x0, as_rng(rng), (process.sigma if velocity is None else _checked_velocity(velocity))


def check_data(x, name="x0"):
    """Validate a batch of samples: finite float array of shape ``(n, d)``."""
    x = _as_float_array(x, name)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must have shape (n, d), got {x.shape} "
                         "(1-D data: pass x[:, None])")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{name}` must be finite")
    return x


def _check_process(process):
    if not isinstance(process, Process):
        raise TypeError(f"`process` must be a scoreopt.Process, got {type(process).__name__}")
    if not (np.isfinite(process.t_min) and np.isfinite(process.t_max) and process.t_min < process.t_max):
        raise ValueError(f"`process` must have finite t_min < t_max, got [{process.t_min}, {process.t_max}]")


def _check_step_times(t_from, t_to, process, towards_data=False):
    """Times of a cost's two ends, in ``[t_min, t_max]`` and of one shape (arrays or
    scalars). The corrector and predictor costs are defined for either order (their local
    expansion is written ``L(t, t + h)``); a sampler step (``towards_data``) needs
    ``t_to < t_from``."""
    t_from, t_to = _check_times(t_from, process, "t_from"), _check_times(t_to, process, "t_to")
    if t_from.shape != t_to.shape:
        raise ValueError(f"`t_from` and `t_to` must have the same shape, got {t_from.shape} and {t_to.shape}")
    if towards_data and np.any(t_to >= t_from):
        raise ValueError("`t_to` must be below `t_from` (a step goes from the noisier time towards the data), "
                         f"got t_from = {t_from}, t_to = {t_to}")
    return t_from, t_to


def _check_times(ts, process, name):
    """Finite real times (any shape) inside ``[t_min, t_max]``, as a float array."""
    ts = _as_float_array(ts, name)
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"`{name}` must be finite")
    if np.any(ts < process.t_min) or np.any(ts > process.t_max):
        raise ValueError(f"`{name}` must lie in [{process.t_min}, {process.t_max}], the process's range")
    return ts


def _check_steps(T):
    return _check_int(T, "T", minimum=1)


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def _check_real(value, name):
    if np.iscomplexobj(value):
        raise TypeError(f"`{name}` must be a real number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        if not (isinstance(value, np.ndarray) and value.ndim == 0):
            raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be finite")
    return value


def _check_gamma(gamma):
    gamma = _check_real(gamma, "gamma")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"`gamma` must lie in (0, 1], got {gamma}")
    return gamma


def _check_positive(value, name):
    value = _check_real(value, name)
    if value <= 0:
        raise ValueError(f"`{name}` must be positive, got {value}")
    return value


def _as_float_array(x, name):
    if np.iscomplexobj(x):
        raise TypeError(f"`{name}` must be real, got complex values")
    try:
        return np.array(x, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be an array of real numbers") from None
